//! Secrets, read only from the environment (never from the configuration).

use streamops_crds::config::{
    ENV_DATABASE_URL, ENV_KAFKA_PASSWORD, ENV_KAFKA_USERNAME, ENV_REDIS_URL,
};
use streamops_crds::WorkerConfig;

use crate::error::WorkerError;

/// SASL credentials.
#[derive(Clone)]
pub struct SaslCredentials {
    /// Username.
    pub username: String,
    /// Password.
    pub password: String,
}

impl std::fmt::Debug for SaslCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaslCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Every secret a worker may need.
#[derive(Clone)]
pub struct Secrets {
    /// PostgreSQL URL (`STREAMOPS_DATABASE_URL`).
    pub database_url: String,
    /// Redis URL (`STREAMOPS_REDIS_URL`), when the handler needs it.
    pub redis_url: Option<String>,
    /// SASL credentials, when the protocol uses SASL.
    pub sasl: Option<SaslCredentials>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("database_url", &"<redacted>")
            .field("redis_url", &self.redis_url.as_ref().map(|_| "<redacted>"))
            .field("sasl", &self.sasl)
            .finish()
    }
}

fn required(
    lookup: &dyn Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<String, WorkerError> {
    match lookup(name) {
        Some(v) if !v.trim().is_empty() => Ok(v),
        _ => Err(WorkerError::MissingEnv(name)),
    }
}

impl Secrets {
    /// Reads the secrets `config` needs from the process environment.
    pub fn from_env(config: &WorkerConfig) -> Result<Self, WorkerError> {
        Self::from_lookup(config, &|name| std::env::var(name).ok())
    }

    /// Reads the secrets `config` needs through `lookup` (testable without touching the
    /// process environment). A missing variable is an error naming it.
    pub fn from_lookup(
        config: &WorkerConfig,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, WorkerError> {
        let database_url = required(lookup, ENV_DATABASE_URL)?;
        let redis_url = if config.handler.needs_redis() {
            Some(required(lookup, ENV_REDIS_URL)?)
        } else {
            None
        };
        let sasl = if config.kafka.security_protocol.uses_sasl() {
            Some(SaslCredentials {
                username: required(lookup, ENV_KAFKA_USERNAME)?,
                password: required(lookup, ENV_KAFKA_PASSWORD)?,
            })
        } else {
            None
        };
        Ok(Self {
            database_url,
            redis_url,
            sasl,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use streamops_crds::{HandlerKind, StreamConsumerSpec};

    fn config(kind: HandlerKind) -> WorkerConfig {
        WorkerConfig::from_spec("t", None, &StreamConsumerSpec::example(kind)).unwrap()
    }

    #[test]
    fn missing_database_url_names_the_variable() {
        let err = Secrets::from_lookup(&config(HandlerKind::MovingAverage), &|_| None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("STREAMOPS_DATABASE_URL"), "{err}");
    }

    #[test]
    fn pipeline_trigger_requires_the_redis_url() {
        let err = Secrets::from_lookup(&config(HandlerKind::PipelineTrigger), &|n| {
            (n == ENV_DATABASE_URL).then(|| "postgres://x".to_string())
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("STREAMOPS_REDIS_URL"), "{err}");
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let s = Secrets {
            database_url: "postgres://u:hunter2@h/db".into(),
            redis_url: None,
            sasl: Some(SaslCredentials {
                username: "u".into(),
                password: "hunter2".into(),
            }),
        };
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
