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

/// Applies the migrations, retrying while the database is unreachable.
pub async fn migrate(
    pool: &PgPool,
    shutdown: &CancellationToken,
) -> Result<bool, sqlx::migrate::MigrateError> {
    let mut backoff = Backoff::default_worker();
    loop {
        match MIGRATOR.run(pool).await {
            Ok(()) => return Ok(true),
            Err(sqlx::migrate::MigrateError::Execute(e)) if is_connection_error(&e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, "cannot apply migrations (database unreachable); retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return Ok(false),
                }
            }
            Err(e) => return Err(e),
        }
    }
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
