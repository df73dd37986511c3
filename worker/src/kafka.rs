//! librdkafka client configurations shared by the pipeline, the error-topic producer, the
//! `produce` tool and the admin commands.

use rdkafka::ClientConfig;
use streamops_crds::v1alpha1::{GroupProtocol, SaslMechanism, SecurityProtocol};
use streamops_crds::KafkaConfig;

use crate::secrets::SaslCredentials;

/// Connection and security settings common to every Kafka client of the worker.
#[derive(Clone, Debug)]
pub struct KafkaClientSettings {
    /// Bootstrap brokers.
    pub bootstrap_servers: String,
    /// `security.protocol`.
    pub security_protocol: SecurityProtocol,
    /// `sasl.mechanism`.
    pub sasl_mechanism: Option<SaslMechanism>,
    /// SASL credentials (from the environment).
    pub credentials: Option<SaslCredentials>,
    /// `ssl.ca.location`.
    pub ssl_ca_location: Option<String>,
    /// `ssl.certificate.location`.
    pub ssl_certificate_location: Option<String>,
    /// `ssl.key.location`.
    pub ssl_key_location: Option<String>,
}

impl KafkaClientSettings {
    /// Plain-text connection to `bootstrap_servers` (local tools and tests).
    pub fn plaintext(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            security_protocol: SecurityProtocol::Plaintext,
            sasl_mechanism: None,
            credentials: None,
            ssl_ca_location: None,
            ssl_certificate_location: None,
            ssl_key_location: None,
        }
    }

    /// The settings of a worker configuration, with credentials from the environment.
    pub fn from_config(config: &KafkaConfig, credentials: Option<SaslCredentials>) -> Self {
        Self {
            bootstrap_servers: config.bootstrap_servers.clone(),
            security_protocol: config.security_protocol,
            sasl_mechanism: config.sasl_mechanism,
            credentials,
            ssl_ca_location: config.ssl_ca_location.clone(),
            ssl_certificate_location: config.ssl_certificate_location.clone(),
            ssl_key_location: config.ssl_key_location.clone(),
        }
    }

    /// Connection and security properties only.
    pub fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers)
            .set("security.protocol", self.security_protocol.as_str())
            .set("client.id", "streamops-worker");
        if self.security_protocol.uses_sasl() {
            if let Some(m) = self.sasl_mechanism {
                c.set("sasl.mechanism", m.as_str());
            }
            if let Some(cred) = &self.credentials {
                c.set("sasl.username", &cred.username)
                    .set("sasl.password", &cred.password);
            }
        }
        if self.security_protocol.uses_tls() {
            if let Some(p) = &self.ssl_ca_location {
                c.set("ssl.ca.location", p);
            }
            if let Some(p) = &self.ssl_certificate_location {
                c.set("ssl.certificate.location", p);
            }
            if let Some(p) = &self.ssl_key_location {
                c.set("ssl.key.location", p);
            }
        }
        c
    }

    /// A reliable producer: `acks=all`, idempotence, retries, snappy.
    pub fn reliable_producer(&self) -> ClientConfig {
        let mut c = self.base();
        c.set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.send.max.retries", "10")
            .set("retry.backoff.ms", "100")
            .set("compression.type", "snappy")
            .set("message.timeout.ms", "30000");
        c
    }
}

/// Settings of the pipeline's consumer.
#[derive(Clone, Debug)]
pub struct ConsumerSettings<'a> {
    /// Consumer group.
    pub group_id: &'a str,
    /// `group.instance.id` (static membership), if any.
    pub instance_id: Option<&'a str>,
    /// `auto.offset.reset`.
    pub auto_offset_reset: &'a str,
    /// `statistics.interval.ms` (0 disables the lag gauge).
    pub statistics_interval_ms: u32,
    /// `group.protocol`.
    pub group_protocol: GroupProtocol,
    /// `session.timeout.ms`.
    pub session_timeout_ms: u32,
    /// `max.poll.interval.ms`.
    pub max_poll_interval_ms: u32,
}

impl KafkaClientSettings {
    /// The pipeline consumer: manual offsets (PostgreSQL is the source of truth), statistics
    /// for the lag gauge. Under the classic group protocol the members assign partitions
    /// themselves with cooperative-sticky; under `consumer` (KIP-848) the broker assigns them
    /// and owns the session timeout and heartbeat interval (`group.consumer.*` on the broker),
    /// so none of the classic-only settings is set (librdkafka rejects them there).
    pub fn consumer(&self, s: &ConsumerSettings<'_>) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", s.group_id)
            .set("group.protocol", s.group_protocol.as_str());
        if s.group_protocol == GroupProtocol::Classic {
            // Members learn that a rebalance started at their next heartbeat, and a cooperative
            // rebalance takes two rounds: the heartbeat interval bounds how long the moved
            // partitions pause (`streamops-bench rollout`: see DEVELOPERS.md). One heartbeat a
            // second per member is a negligible load on the group coordinator.
            c.set("partition.assignment.strategy", "cooperative-sticky")
                .set("session.timeout.ms", s.session_timeout_ms.to_string())
                // 1 s, well under a third of the shortest allowed session timeout (6 s).
                .set("heartbeat.interval.ms", HEARTBEAT_INTERVAL_MS);
        }
        c.set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", s.auto_offset_reset)
            .set("max.poll.interval.ms", s.max_poll_interval_ms.to_string())
            .set("fetch.wait.max.ms", "100")
            // Prefetch: enough to keep the poll loop fed, small enough to bound memory. The
            // byte cap is for the whole consumer whatever the partition count; the fetcher
            // re-checks a full queue after `fetch.queue.backoff.ms` (librdkafka's 1 s default
            // starves a small queue: that is what halved throughput under a 16 MiB cap).
            // Measured in `make bench`: ~44 MiB peak RSS at the same or better rate than a
            // 200,000-message prefetch at ~110 MiB. A larger message is still fetched
            // (librdkafka grows the fetch size). Tunable through STREAMOPS_KAFKA_CONSUMER_OVERRIDES.
            .set("queued.max.messages.kbytes", "1536")
            .set("queued.min.messages", "5000")
            .set("fetch.queue.backoff.ms", "5")
            .set("fetch.message.max.bytes", "262144")
            .set(
                "statistics.interval.ms",
                s.statistics_interval_ms.to_string(),
            );
        if let Some(id) = s.instance_id {
            c.set("group.instance.id", id);
        }
        for (k, v) in parse_overrides(&std::env::var(ENV_CONSUMER_OVERRIDES).unwrap_or_default()) {
            c.set(k, v);
        }
        c
    }
}

/// `heartbeat.interval.ms` of a classic-protocol member (librdkafka's default is 3 s).
pub const HEARTBEAT_INTERVAL_MS: &str = "1000";

/// librdkafka consumer properties applied last, as `key=value,key=value` (tuning and
/// debugging, e.g. `debug=cgrp`). Never put credentials here.
pub const ENV_CONSUMER_OVERRIDES: &str = "STREAMOPS_KAFKA_CONSUMER_OVERRIDES";

/// Parses `key=value,key=value`; entries without `=` are ignored.
pub fn parse_overrides(text: &str) -> Vec<(&str, &str)> {
    text.split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sasl_credentials_are_set_only_for_sasl_protocols() {
        let mut s = KafkaClientSettings::plaintext("b:9092");
        s.sasl_mechanism = Some(SaslMechanism::ScramSha512);
        s.credentials = Some(SaslCredentials {
            username: "u".into(),
            password: "p".into(),
        });
        assert_eq!(s.base().get("sasl.username"), None);
        s.security_protocol = SecurityProtocol::SaslSsl;
        s.ssl_ca_location = Some("/ca.crt".into());
        let c = s.base();
        assert_eq!(c.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(c.get("sasl.username"), Some("u"));
        assert_eq!(c.get("ssl.ca.location"), Some("/ca.crt"));
    }

    #[test]
    fn overrides_are_parsed_as_key_value_pairs() {
        assert_eq!(
            parse_overrides("debug=cgrp, fetch.max.bytes = 1000,junk,"),
            vec![("debug", "cgrp"), ("fetch.max.bytes", "1000")]
        );
    }

    #[test]
    fn consumer_never_auto_commits_and_uses_static_membership_when_given() {
        let c = KafkaClientSettings::plaintext("b:9092").consumer(&ConsumerSettings {
            group_id: "g",
            instance_id: Some("w-0"),
            auto_offset_reset: "earliest",
            statistics_interval_ms: 5000,
            group_protocol: GroupProtocol::Classic,
            session_timeout_ms: 12_000,
            max_poll_interval_ms: 600_000,
        });
        assert_eq!(c.get("session.timeout.ms"), Some("12000"));
        assert_eq!(c.get("heartbeat.interval.ms"), Some("1000"));
        assert_eq!(c.get("max.poll.interval.ms"), Some("600000"));
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(c.get("group.instance.id"), Some("w-0"));
        assert_eq!(c.get("group.protocol"), Some("classic"));
        assert_eq!(
            c.get("partition.assignment.strategy"),
            Some("cooperative-sticky")
        );
    }

    #[test]
    fn consumer_protocol_leaves_assignment_and_session_timeout_to_the_broker() {
        let c = KafkaClientSettings::plaintext("b:9092").consumer(&ConsumerSettings {
            group_id: "g",
            instance_id: None,
            auto_offset_reset: "earliest",
            statistics_interval_ms: 5000,
            group_protocol: GroupProtocol::Consumer,
            session_timeout_ms: 12_000,
            max_poll_interval_ms: 600_000,
        });
        assert_eq!(c.get("group.protocol"), Some("consumer"));
        for classic_only in [
            "partition.assignment.strategy",
            "session.timeout.ms",
            "heartbeat.interval.ms",
        ] {
            assert_eq!(c.get(classic_only), None, "{classic_only} is set");
        }
        // Everything that is not about group membership stays as under classic.
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("queued.max.messages.kbytes"), Some("1536"));
        assert_eq!(c.get("group.instance.id"), None);
        assert_eq!(c.get("max.poll.interval.ms"), Some("600000"));
    }

    #[test]
    fn librdkafka_accepts_the_consumer_configuration_of_both_protocols() {
        for group_protocol in [GroupProtocol::Classic, GroupProtocol::Consumer] {
            let c = KafkaClientSettings::plaintext("127.0.0.1:1").consumer(&ConsumerSettings {
                group_id: "g",
                instance_id: None,
                auto_offset_reset: "earliest",
                statistics_interval_ms: 0,
                group_protocol,
                session_timeout_ms: 45_000,
                max_poll_interval_ms: 300_000,
            });
            // Creating a consumer validates every property without connecting.
            let created: Result<rdkafka::consumer::BaseConsumer, _> = c.create();
            assert!(created.is_ok(), "{group_protocol:?}: {:?}", created.err());
        }
    }
}
