//! PostgreSQL helpers: the local server of DEVELOPERS.md (127.0.0.1:5432, trust auth) and a fresh
//! database per test.

use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

/// PostgreSQL server (trust auth).
pub const PG_HOST: &str = "127.0.0.1:5432";

/// Panics with a clear message when PostgreSQL is not listening.
pub fn require_postgres() {
    crate::require_service("PostgreSQL", PG_HOST);
}

/// A pool of one connection on the server's `postgres` database (for CREATE/DROP DATABASE).
async fn admin() -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("postgres://postgres@{PG_HOST}/postgres"))
        .await
}

/// Creates a fresh database; returns its URL and a pool on it (no migrations applied).
pub async fn fresh_database(prefix: &str) -> (String, PgPool) {
    let name = crate::unique(prefix).replace('-', "_").to_lowercase();
    let admin = admin()
        .await
        .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL at {PG_HOST}: {e}"));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
    admin.close().await;
    let url = format!("postgres://postgres@{PG_HOST}/{name}");
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    (url, pool)
}

/// Drops the database `url` names; failures are ignored (clean-up only).
pub async fn drop_database(url: &str) {
    let name = url.rsplit('/').next().unwrap_or_default();
    if let Ok(admin) = admin().await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&admin)
            .await;
    }
}
