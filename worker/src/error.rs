//! Errors of the worker process.

use crate::handlers::HandlerError;

/// The exit code of a worker that stopped to be restarted: EX_TEMPFAIL of `sysexits.h` ("try
/// again later"). Used when the Kafka consumer is wedged ([`crate::consumer_liveness`]): the
/// worker drains as on SIGTERM and exits with it, and whatever runs it (the kubelet under
/// restartPolicy Always, `localnode`, the chaos suite's fleet) starts it again.
pub const EXIT_RESTART: u8 = 75;

/// Why the worker (or one of its commands) stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A required environment variable is not set.
    #[error("environment variable {0} is not set")]
    MissingEnv(&'static str),
    /// The configuration or manifest is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Kafka refused a client configuration or an operation that cannot be retried.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// PostgreSQL failed where retrying is not an option (migrations).
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A table the migrations would create already exists with other columns.
    #[error("database schema: {0}")]
    Schema(String),
    /// A handler failed in a way retrying cannot fix.
    #[error("handler: {0}")]
    Handler(#[from] HandlerError),
    /// The HTTP server could not start.
    #[error("http server on {addr}: {source}")]
    Http {
        /// The listen address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The handler kind is known to the API but not compiled into this worker.
    #[error("handler kind {0} is not built into this worker yet")]
    HandlerNotBuilt(streamops_crds::HandlerKind),
    /// The Kafka consumer is wedged: the worker stopped gracefully to be restarted.
    #[error("{0}; stopped to be restarted")]
    Wedged(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl WorkerError {
    /// The process exit code for this error: [`EXIT_RESTART`] for a wedge, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Wedged(_) => EXIT_RESTART,
            _ => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wedged_worker_exits_with_ex_tempfail_and_other_errors_with_one() {
        assert_eq!(
            WorkerError::Wedged("kafka consumer wedged".into()).exit_code(),
            75
        );
        assert_eq!(WorkerError::Other("boom".into()).exit_code(), 1);
        assert_eq!(WorkerError::Config("bad".into()).exit_code(), 1);
    }
}
