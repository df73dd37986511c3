//! PostgreSQL: the pool, the embedded migrations (every handler's tables live in one migration
//! set, `worker/migrations/`), and the reachability probe behind `/readyz`.

use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::pipeline::Health;

/// The embedded migrations, applied at worker start.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Connects to `url`, retrying with capped backoff until it succeeds or `shutdown` is
/// cancelled (then `None`). A malformed URL is an error at once.
pub async fn connect(
    url: &str,
    shutdown: &CancellationToken,
) -> Result<Option<PgPool>, sqlx::Error> {
    let mut backoff = Backoff::default_worker();
    loop {
        let attempt = PgPoolOptions::new()
            .max_connections(8)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await;
        match attempt {
            Ok(pool) => return Ok(Some(pool)),
            Err(e @ sqlx::Error::Configuration(_)) => return Err(e),
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64,
                    "cannot connect to PostgreSQL; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return Ok(None),
                }
            }
        }
    }
}

/// Applies the migrations, retrying while the database is unreachable. Before that, refuses to
/// adopt a table that one of the pending migrations would create but that already exists with
/// other columns (see [`check_foreign_tables`]).
pub async fn migrate(
    pool: &PgPool,
    shutdown: &CancellationToken,
) -> Result<bool, crate::error::WorkerError> {
    let mut backoff = Backoff::default_worker();
    loop {
        let checked = match check_foreign_tables(pool).await {
            Ok(()) => MIGRATOR.run(pool).await,
            Err(ForeignTableError::Database(e)) => Err(sqlx::migrate::MigrateError::Execute(e)),
            Err(e @ ForeignTableError::Foreign { .. }) => {
                return Err(crate::error::WorkerError::Schema(e.to_string()))
            }
        };
        match checked {
            Ok(()) => return Ok(true),
            Err(sqlx::migrate::MigrateError::Execute(e)) if is_connection_error(&e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, "cannot apply migrations (database unreachable); retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return Ok(false),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Why [`check_foreign_tables`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ForeignTableError {
    /// The database could not be read.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A table exists with other columns than the migration would create.
    #[error(
        "table {table:?} already exists with other columns than streamops creates (migration \
         {migration}): {detail}. streamops never adopts such a table (the services it replaces \
         may have created one of the same name): point spec.sink.postgres at a database or \
         schema of its own, or rename the existing table"
    )]
    Foreign {
        /// The table.
        table: String,
        /// The migration that would create it.
        migration: String,
        /// Missing and unexpected columns.
        detail: String,
    },
}

/// Tables created by a migration's SQL (`CREATE TABLE IF NOT EXISTS name (...)`), each with the
/// names of its columns.
pub fn created_tables(sql: &str) -> Vec<(String, Vec<String>)> {
    let lower = sql.to_ascii_lowercase();
    let marker = "create table if not exists ";
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = lower[from..].find(marker) {
        let start = from + i + marker.len();
        let Some(open) = lower[start..].find('(').map(|o| start + o) else {
            break;
        };
        let name = lower[start..open].trim().to_string();
        let mut depth = 0usize;
        let mut item = String::new();
        let mut columns = Vec::new();
        let mut end = open;
        for (j, line) in sql[open + 1..]
            .split_inclusive('\n')
            .scan(open + 1, |pos, l| {
                let at = *pos;
                *pos += l.len();
                Some((at, l))
            })
        {
            let code = line.split("--").next().unwrap_or_default();
            let mut closed = false;
            for c in code.chars() {
                match c {
                    '(' => depth += 1,
                    ')' if depth == 0 => {
                        closed = true;
                        break;
                    }
                    ')' => depth -= 1,
                    ',' if depth == 0 => {
                        columns.extend(column_name(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            item.push(' ');
            end = j + line.len();
            if closed {
                break;
            }
        }
        columns.extend(column_name(&item));
        out.push((name, columns));
        from = end.max(start);
    }
    out
}

/// The column name of one item of a CREATE TABLE body, or `None` for a table constraint.
fn column_name(item: &str) -> Option<String> {
    let first = item
        .split_whitespace()
        .next()?
        .trim_matches('"')
        .to_ascii_lowercase();
    const CONSTRAINTS: [&str; 6] = [
        "primary",
        "unique",
        "check",
        "constraint",
        "foreign",
        "exclude",
    ];
    (!first.is_empty() && !CONSTRAINTS.contains(&first.as_str())).then_some(first)
}

/// For every migration not yet applied to this database, checks that each table it creates
/// either does not exist or has exactly the columns the migration declares. A table left by
/// another service (seed 003's `transactions`, say) would otherwise be adopted by
/// `CREATE TABLE IF NOT EXISTS` and fail later, row by row, with an obscure error.
pub async fn check_foreign_tables(pool: &PgPool) -> Result<(), ForeignTableError> {
    let mut conn = pool.acquire().await?;
    let tracked: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
            .fetch_one(&mut *conn)
            .await?;
    let applied: Vec<i64> = if tracked.is_some() {
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(&mut *conn)
            .await?
    } else {
        Vec::new()
    };
    for m in MIGRATOR.iter() {
        if applied.contains(&m.version) {
            continue;
        }
        for (table, expected) in created_tables(&m.sql) {
            let existing: Vec<String> = sqlx::query_scalar(
                "SELECT attname::text FROM pg_attribute \
                 WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped \
                 ORDER BY attnum",
            )
            .bind(&table)
            .fetch_all(&mut *conn)
            .await?;
            if existing.is_empty() {
                continue;
            }
            let missing: Vec<&str> = expected
                .iter()
                .filter(|c| !existing.contains(c))
                .map(String::as_str)
                .collect();
            let extra: Vec<&str> = existing
                .iter()
                .filter(|c| !expected.contains(c))
                .map(String::as_str)
                .collect();
            if missing.is_empty() && extra.is_empty() {
                continue;
            }
            let mut detail = Vec::new();
            if !missing.is_empty() {
                detail.push(format!("missing {}", missing.join(", ")));
            }
            if !extra.is_empty() {
                detail.push(format!("unexpected {}", extra.join(", ")));
            }
            return Err(ForeignTableError::Foreign {
                table,
                migration: format!("{}_{}", m.version, m.description.replace(' ', "_")),
                detail: detail.join("; "),
            });
        }
    }
    Ok(())
}

/// Whether an error means the database could not be reached (retry) rather than a bad statement.
pub fn is_connection_error(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
    )
}

/// Probes the database every few seconds and records the result in `health`.
pub fn spawn_probe(pool: PgPool, health: Arc<Health>, shutdown: CancellationToken) {
    tokio::spawn(async move {
        loop {
            let ok = tokio::time::timeout(
                Duration::from_secs(3),
                sqlx::query("SELECT 1").execute(&pool),
            )
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false);
            if ok != health.db_ok() {
                if ok {
                    tracing::info!("database reachable");
                } else {
                    tracing::warn!("database unreachable");
                }
            }
            health.set_db_ok(ok);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(if ok { 5 } else { 1 })) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    });
}

#[cfg(test)]
mod foreign_table_tests {
    use super::*;

    #[test]
    fn created_tables_lists_every_table_of_the_migrations_with_its_columns() {
        let all: Vec<(String, Vec<String>)> = MIGRATOR
            .iter()
            .flat_map(|m| created_tables(&m.sql))
            .collect();
        let names: Vec<&str> = all.iter().map(|(t, _)| t.as_str()).collect();
        for t in [
            "streamops_offsets",
            "price_points",
            "moving_averages",
            "machines",
            "failures",
            "sensor_readings",
            "transactions",
            "predictions",
            "pipeline_runs",
        ] {
            assert!(names.contains(&t), "{t} not found in {names:?}");
        }
        let tx = &all.iter().find(|(t, _)| t == "transactions").unwrap().1;
        assert_eq!(tx.first().map(String::as_str), Some("transaction_id"));
        assert!(tx.contains(&"amount".to_string()) && tx.contains(&"created_at".to_string()));
        assert!(!tx.iter().any(|c| c == "primary" || c == "check"));
    }

    #[test]
    fn table_constraints_and_comments_are_not_columns() {
        let sql = "CREATE TABLE IF NOT EXISTS t (\n  a NUMERIC(20, 4) NOT NULL, -- a, b\n  b TEXT,\n  PRIMARY KEY (a, b),\n  CONSTRAINT c CHECK (a > 0)\n);\nCREATE TABLE IF NOT EXISTS u (x INT);";
        assert_eq!(
            created_tables(sql),
            vec![
                ("t".to_string(), vec!["a".to_string(), "b".to_string()]),
                ("u".to_string(), vec!["x".to_string()]),
            ]
        );
    }
}
