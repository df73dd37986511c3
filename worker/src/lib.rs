//! The streamops worker: consumes Kafka topics and applies one handler's effects to PostgreSQL
//! exactly once (results and offsets in one transaction).
//!
//! Entry points for other code:
//! - [`pipeline::run_pipeline`]: run any [`handlers::MessageHandler`] over a configuration.
//! - [`worker::WorkerRuntime`]: the process assembly `main` uses (database, migrations, HTTP,
//!   signals) around `run_pipeline`.
//! - [`generate`]: the deterministic event generator behind `produce`, tests and the bench.
//! - [`admin`]: topic creation and deletion.

pub mod admin;
pub mod backoff;
pub mod cli;
pub mod consumer_liveness;
pub mod copy;
pub mod db;
pub mod error;
pub mod errortopic;
pub mod gaps;
pub mod generate;
pub mod handlers;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod offsets;
pub mod pipeline;
pub mod produce;
pub mod producer_health;
pub mod replay;
pub mod scorer;
pub mod secrets;
pub mod telemetry;
pub mod worker;

pub use error::WorkerError;
