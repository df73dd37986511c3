//! Deleting a StreamConsumer's consumer group (`cleanupPolicy: DeleteConsumerGroup`).
//!
//! The reconciler talks to Kafka only through [`GroupDeleter`], so its tests use a fake.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::admin::{AdminClient, AdminOptions, GroupResult};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use streamops_crds::v1alpha1::{SecurityProtocol, StreamConsumerSpec};

use crate::brokers::BrokerPolicy;

/// The group to delete and how to reach its brokers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupTarget {
    /// Bootstrap brokers.
    pub bootstrap_servers: String,
    /// The consumer group.
    pub group_id: String,
    /// Security protocol (only PLAINTEXT and SSL with the system CAs: the operator never reads
    /// Secrets, see [`GroupTarget::from_spec`]).
    pub security_protocol: SecurityProtocol,
}

impl GroupTarget {
    /// The target of a spec, or why the operator cannot reach the brokers itself: it never reads
    /// Secrets, so it has no SASL credentials, client certificate or private CA.
    pub fn from_spec(spec: &StreamConsumerSpec) -> Result<Self, &'static str> {
        let security = spec.kafka.security.as_ref();
        let protocol = security
            .map(|s| s.protocol)
            .unwrap_or(SecurityProtocol::Plaintext);
        if protocol.uses_sasl() {
            return Err("the brokers require SASL credentials, which the operator never reads");
        }
        if protocol.uses_tls() {
            let tls = security.and_then(|s| s.tls.as_ref());
            if tls.is_some_and(|t| t.client_cert_secret_name.is_some()) {
                return Err(
                    "the brokers require a client certificate, which the operator never reads",
                );
            }
            if tls.is_some_and(|t| t.ca_secret_ref.is_some()) {
                return Err("the brokers use a private CA, which the operator never reads");
            }
        }
        Ok(Self {
            bootstrap_servers: spec.kafka.bootstrap_servers.clone(),
            group_id: spec.kafka.group_id.clone(),
            security_protocol: protocol,
        })
    }
}

/// A successful deletion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupDeletion {
    /// The group and its committed offsets are gone.
    Deleted,
    /// There was no such group (already deleted, or never committed): nothing to do.
    NotFound,
}

/// Why a deletion failed. Every variant is retried until the cleanup deadline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupDeleteError {
    /// Members are still in the group (workers still stopping, or static members waiting for their
    /// session timeout).
    #[error("the group still has members")]
    NotEmpty,
    /// No answer in time (unreachable or nonexistent brokers).
    #[error("no answer from the brokers within {0:?}")]
    Timeout(Duration),
    /// Any other Kafka error.
    #[error("{0}")]
    Kafka(String),
    /// The operator's broker policy does not let it delete this group: the brokers are not
    /// allowed, or reaching them takes credentials (with the operator's credentials a
    /// StreamConsumer could delete any team's group). Nothing was sent.
    #[error("{0}")]
    NotAllowed(String),
}

/// Deletes consumer groups.
pub trait GroupDeleter: Send + Sync {
    /// Deletes one group. Must return within a bounded time.
    fn delete_group<'a>(
        &'a self,
        target: &'a GroupTarget,
    ) -> BoxFuture<'a, Result<GroupDeletion, GroupDeleteError>>;
}

/// [`GroupDeleter`] with the rdkafka admin API.
#[derive(Debug, Clone)]
pub struct KafkaGroupDeleter {
    /// Bound on one deletion, including connecting.
    pub timeout: Duration,
    /// The brokers the deleter may connect to. `None`: any (tests); the operator always sets it.
    pub brokers: Option<Arc<BrokerPolicy>>,
}

impl Default for KafkaGroupDeleter {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            brokers: None,
        }
    }
}

impl KafkaGroupDeleter {
    /// A deleter that connects only to brokers `policy` allows without credentials.
    pub fn allowed(policy: Arc<BrokerPolicy>) -> Self {
        Self {
            brokers: Some(policy),
            ..Self::default()
        }
    }

    /// The target as this deleter connects to it, and the CA file to use; an error, before any
    /// connection, when the policy does not allow it.
    pub fn connect_as(
        &self,
        target: &GroupTarget,
    ) -> Result<(GroupTarget, Option<String>), GroupDeleteError> {
        let Some(policy) = &self.brokers else {
            return Ok((target.clone(), None));
        };
        let allowed = policy
            .resolve(&target.bootstrap_servers)
            .map_err(|e| GroupDeleteError::NotAllowed(e.message))?;
        let c = allowed.connection();
        if c.security_protocol.uses_sasl() {
            return Err(GroupDeleteError::NotAllowed(format!(
                "the operator reaches brokers {} only with its own credentials, and never deletes consumer groups with them (it could delete any team's group)",
                c.name
            )));
        }
        Ok((
            GroupTarget {
                security_protocol: c.security_protocol,
                ..target.clone()
            },
            c.ssl_ca_location,
        ))
    }
}

impl GroupDeleter for KafkaGroupDeleter {
    fn delete_group<'a>(
        &'a self,
        target: &'a GroupTarget,
    ) -> BoxFuture<'a, Result<GroupDeletion, GroupDeleteError>> {
        let connect = self.connect_as(target);
        let timeout = self.timeout;
        Box::pin(async move {
            let (target, ca) = connect?;
            // Creating and dropping an admin client blocks (threads, broker connections): keep it
            // off the async workers.
            let task = tokio::task::spawn_blocking(move || {
                let mut cfg = ClientConfig::new();
                cfg.set("bootstrap.servers", &target.bootstrap_servers)
                    .set("security.protocol", target.security_protocol.as_str())
                    .set("socket.timeout.ms", timeout.as_millis().to_string());
                if let Some(ca) = ca.filter(|_| target.security_protocol.uses_tls()) {
                    cfg.set("ssl.ca.location", ca);
                }
                let admin: AdminClient<DefaultClientContext> = cfg
                    .create()
                    .map_err(|e| GroupDeleteError::Kafka(e.to_string()))?;
                let opts = AdminOptions::new()
                    .request_timeout(Some(timeout))
                    .operation_timeout(Some(timeout));
                let result =
                    futures::executor::block_on(admin.delete_groups(&[&target.group_id], &opts));
                classify(result, timeout)
            });
            match tokio::time::timeout(timeout + Duration::from_secs(5), task).await {
                Ok(Ok(result)) => result,
                Ok(Err(join)) => Err(GroupDeleteError::Kafka(format!(
                    "the deletion task failed: {join}"
                ))),
                Err(_) => Err(GroupDeleteError::Timeout(timeout)),
            }
        })
    }
}

/// Maps the admin API's answer: `GroupIdNotFound` is success, `NonEmptyGroup` is
/// [`GroupDeleteError::NotEmpty`].
pub fn classify(
    result: Result<Vec<GroupResult>, KafkaError>,
    timeout: Duration,
) -> Result<GroupDeletion, GroupDeleteError> {
    let results = result.map_err(|e| {
        let code = match &e {
            KafkaError::AdminOp(code) => Some(*code),
            other => other.rdkafka_error_code(),
        };
        match code {
            Some(RDKafkaErrorCode::OperationTimedOut | RDKafkaErrorCode::RequestTimedOut) => {
                GroupDeleteError::Timeout(timeout)
            }
            _ => GroupDeleteError::Kafka(e.to_string()),
        }
    })?;
    match results.into_iter().next() {
        Some(Ok(_)) => Ok(GroupDeletion::Deleted),
        Some(Err((_, RDKafkaErrorCode::GroupIdNotFound))) => Ok(GroupDeletion::NotFound),
        Some(Err((_, RDKafkaErrorCode::NonEmptyGroup))) => Err(GroupDeleteError::NotEmpty),
        Some(Err((_, RDKafkaErrorCode::OperationTimedOut | RDKafkaErrorCode::RequestTimedOut))) => {
            Err(GroupDeleteError::Timeout(timeout))
        }
        Some(Err((_, code))) => Err(GroupDeleteError::Kafka(code.to_string())),
        None => Err(GroupDeleteError::Kafka(
            "the brokers returned no result for the group".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use streamops_crds::v1alpha1::{
        CredentialsSecretRef, KafkaSecurity, SaslMechanism, SaslSpec, SecretKeyRef, TlsSpec,
    };
    use streamops_crds::StreamConsumer;

    const T: Duration = Duration::from_secs(1);

    #[test]
    fn unknown_group_counts_as_deleted() {
        let r = classify(
            Ok(vec![Err(("g".into(), RDKafkaErrorCode::GroupIdNotFound))]),
            T,
        );
        assert_eq!(r, Ok(GroupDeletion::NotFound));
    }

    #[test]
    fn deleted_group_is_success() {
        assert_eq!(
            classify(Ok(vec![Ok("g".into())]), T),
            Ok(GroupDeletion::Deleted)
        );
    }

    #[test]
    fn group_with_members_is_not_empty() {
        let r = classify(
            Ok(vec![Err(("g".into(), RDKafkaErrorCode::NonEmptyGroup))]),
            T,
        );
        assert_eq!(r, Err(GroupDeleteError::NotEmpty));
    }

    #[test]
    fn timed_out_request_is_a_timeout() {
        let r = classify(
            Err(KafkaError::AdminOp(RDKafkaErrorCode::OperationTimedOut)),
            T,
        );
        assert_eq!(r, Err(GroupDeleteError::Timeout(T)));
    }

    #[test]
    fn plaintext_brokers_are_reachable_without_secrets() {
        let t = GroupTarget::from_spec(&StreamConsumer::test().spec).unwrap();
        assert_eq!(t.group_id, "moving-average-consumer");
        assert_eq!(t.security_protocol, SecurityProtocol::Plaintext);
    }

    #[test]
    fn sasl_or_private_tls_brokers_are_out_of_the_operators_reach() {
        let with = |protocol, sasl: bool, ca: bool, client: bool| {
            StreamConsumer::test()
                .with_spec(|s| {
                    s.kafka.security = Some(KafkaSecurity {
                        protocol,
                        sasl: sasl.then(|| SaslSpec {
                            mechanism: SaslMechanism::Plain,
                            credentials_secret_ref: CredentialsSecretRef {
                                name: "c".into(),
                                username_key: "u".into(),
                                password_key: "p".into(),
                            },
                        }),
                        tls: Some(TlsSpec {
                            ca_secret_ref: ca.then(|| SecretKeyRef {
                                name: "ca".into(),
                                key: "ca.crt".into(),
                            }),
                            client_cert_secret_name: client.then(|| "client".into()),
                        }),
                    })
                })
                .spec
        };
        assert!(
            GroupTarget::from_spec(&with(SecurityProtocol::SaslSsl, true, false, false)).is_err()
        );
        assert!(GroupTarget::from_spec(&with(SecurityProtocol::Ssl, false, true, false)).is_err());
        assert!(GroupTarget::from_spec(&with(SecurityProtocol::Ssl, false, false, true)).is_err());
        assert!(GroupTarget::from_spec(&with(SecurityProtocol::Ssl, false, false, false)).is_ok());
        // TLS material is ignored by PLAINTEXT.
        assert!(
            GroupTarget::from_spec(&with(SecurityProtocol::Plaintext, false, true, true)).is_ok()
        );
    }

    /// A broker outside the allow-list, or one that takes credentials, is never contacted.
    #[tokio::test]
    async fn groups_are_deleted_only_on_allowed_brokers_reached_without_credentials() {
        let policy = BrokerPolicy::from_json(
            r#"[{"name": "open", "bootstrapServers": ["127.0.0.1:1"]},
                {"name": "secured", "bootstrapServers": ["127.0.0.1:2"], "securityProtocol": "SASL_SSL", "saslMechanism": "SCRAM-SHA-512"}]"#,
            &|_| Some("x".into()),
        )
        .unwrap();
        let deleter = KafkaGroupDeleter {
            timeout: Duration::from_millis(500),
            ..KafkaGroupDeleter::allowed(Arc::new(policy))
        };
        let target = |servers: &str| GroupTarget {
            bootstrap_servers: servers.into(),
            group_id: "g".into(),
            security_protocol: SecurityProtocol::Plaintext,
        };
        assert!(matches!(
            deleter.delete_group(&target("attacker.invalid:9092")).await,
            Err(GroupDeleteError::NotAllowed(_))
        ));
        assert!(matches!(
            deleter.delete_group(&target("127.0.0.1:2")).await,
            Err(GroupDeleteError::NotAllowed(_))
        ));
        // Allowed and open: it does try (and fails, nothing listens on port 1).
        let r = deleter.delete_group(&target("127.0.0.1:1")).await;
        assert!(
            !matches!(r, Err(GroupDeleteError::NotAllowed(_)) | Ok(_)),
            "{r:?}"
        );
    }

    /// A broker that does not exist must not block: the deleter gives up within its timeout.
    #[tokio::test]
    async fn unreachable_brokers_fail_within_the_timeout() {
        let deleter = KafkaGroupDeleter {
            timeout: Duration::from_millis(500),
            ..KafkaGroupDeleter::default()
        };
        let target = GroupTarget {
            // Nothing listens on port 1.
            bootstrap_servers: "127.0.0.1:1".into(),
            group_id: "g".into(),
            security_protocol: SecurityProtocol::Plaintext,
        };
        let started = std::time::Instant::now();
        let r = deleter.delete_group(&target).await;
        assert!(r.is_err(), "{r:?}");
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{:?}",
            started.elapsed()
        );
    }
}
