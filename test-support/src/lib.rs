//! Shared support for the operator's and the worker's integration tests (and the operator's
//! autoscaling benchmark): the local services of DEVELOPERS.md, Apache Kafka on 127.0.0.1:9092
//! ([`kafka`]) and PostgreSQL on 127.0.0.1:5432 ([`pg`]), and names unique to a run
//! ([`unique`]). Every helper fails loudly, naming the service, when it is absent.
//!
//! Each crate's `tests/support/mod.rs` re-exports this crate and adds its own helpers (the
//! worker's fleet of worker processes, for instance).

use std::net::TcpStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub mod kafka;
pub mod pg;

pub use kafka::BROKER;
pub use pg::PG_HOST;

/// A name unique to this test run: `prefix-<pid>-<millis>-<n>`.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        millis % 100_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Panics with a clear message when `name` is not listening at `addr`.
pub fn require_service(name: &str, addr: &str) {
    let sock = addr
        .parse()
        .unwrap_or_else(|e| panic!("invalid address {addr}: {e}"));
    if TcpStream::connect_timeout(&sock, Duration::from_secs(3)).is_err() {
        panic!(
            "{name} is not reachable at {addr}; start it (see DEVELOPERS.md, `make dev-up`) \
             before running the integration tests"
        );
    }
}

/// Panics with a clear message when the Kafka broker or PostgreSQL is not listening.
pub fn require_services() {
    kafka::require_broker();
    pg::require_postgres();
}
