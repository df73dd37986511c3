//! The brokers the operator may connect to, and the credentials it uses for each.
//!
//! A StreamConsumer names its own `bootstrapServers`. The operator never connects there just
//! because a spec says so: its admin lists, in the chart values (`lag.brokers`), the brokers it may
//! reach, each with how to connect (protocol, SASL mechanism, CA) and, optionally, credentials.
//! The chart passes the list as JSON in `STREAMOPS_LAG_BROKERS` and each entry's credentials as the
//! environment variables [`username_env`] / [`password_env`], which the kubelet fills from the
//! Secret the entry names; the operator never reads a Secret.
//!
//! - Every `host:port` of a spec's `bootstrapServers` must match one entry, all the same entry;
//!   otherwise [`BrokerPolicy::resolve`] refuses and the operator opens no connection at all.
//! - How to connect comes from the entry only. The spec's `security` block is how the *workers*
//!   connect, with their own credentials; it never chooses what the operator sends.
//! - PLAIN is refused without TLS: an entry with `SASL_PLAINTEXT` and `PLAIN` is a configuration
//!   error at start-up.

use std::fmt;

use serde::Deserialize;
use streamops_crds::v1alpha1::{SaslMechanism, SecurityProtocol};

/// Environment variable holding the JSON list of allowed brokers.
pub const ENV_LAG_BROKERS: &str = "STREAMOPS_LAG_BROKERS";

/// Environment variable holding the SASL username of allowed-broker entry `index`.
pub fn username_env(index: usize) -> String {
    format!("STREAMOPS_LAG_BROKER_{index}_USERNAME")
}

/// Environment variable holding the SASL password of allowed-broker entry `index`.
pub fn password_env(index: usize) -> String {
    format!("STREAMOPS_LAG_BROKER_{index}_PASSWORD")
}

/// One entry of `STREAMOPS_LAG_BROKERS`, as the chart renders it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BrokerEntry {
    /// A name for messages and logs.
    pub name: String,
    /// Exact `host:port` bootstrap addresses.
    #[serde(default)]
    pub bootstrap_servers: Vec<String>,
    /// `*.domain:port` patterns: any host under `domain`, on that port.
    #[serde(default)]
    pub host_patterns: Vec<String>,
    /// How the operator connects (default PLAINTEXT).
    #[serde(default = "plaintext")]
    pub security_protocol: SecurityProtocol,
    /// SASL mechanism, with a SASL protocol.
    #[serde(default)]
    pub sasl_mechanism: Option<SaslMechanism>,
    /// PEM CA file in the operator's pod, for TLS protocols (default: the system CAs).
    #[serde(default)]
    pub ssl_ca_location: Option<String>,
}

fn plaintext() -> SecurityProtocol {
    SecurityProtocol::Plaintext
}

/// SASL credentials. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Username.
    pub username: String,
    /// Password.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// An allowed broker with its credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedBroker {
    /// The entry.
    pub entry: BrokerEntry,
    /// Its credentials, when the chart mapped a Secret for it.
    pub credentials: Option<Credentials>,
}

/// How the operator connects to one allowed broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// Name of the entry.
    pub name: String,
    /// Protocol.
    pub security_protocol: SecurityProtocol,
    /// SASL mechanism (SASL protocols only).
    pub sasl_mechanism: Option<SaslMechanism>,
    /// Credentials (SASL protocols only).
    pub credentials: Option<Credentials>,
    /// CA file (TLS protocols only).
    pub ssl_ca_location: Option<String>,
}

/// The allow-list is malformed: the operator refuses to start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerPolicyError {
    /// Not valid JSON of the expected form.
    #[error("{ENV_LAG_BROKERS} is not a valid broker list: {0}")]
    Parse(String),
    /// An entry is unusable.
    #[error("{ENV_LAG_BROKERS} entry {index} ({name}): {message}")]
    Entry {
        /// Index in the list.
        index: usize,
        /// Its name.
        name: String,
        /// What is wrong.
        message: String,
    },
}

/// Why the operator will not connect to a StreamConsumer's brokers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct NotAllowed {
    /// For the `LagAvailable` condition.
    pub message: String,
}

/// The brokers the operator may connect to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerPolicy {
    brokers: Vec<AllowedBroker>,
}

fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.trim().rsplit_once(':')?;
    let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
    let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
    (!host.is_empty()).then_some((host, port))
}

impl AllowedBroker {
    /// Whether `address` (`host:port`) is one of this entry's brokers.
    pub fn allows(&self, address: &str) -> bool {
        let Some((host, port)) = split_host_port(address) else {
            return false;
        };
        let exact = self
            .entry
            .bootstrap_servers
            .iter()
            .filter_map(|s| split_host_port(s))
            .any(|(h, p)| h == host && p == port);
        let pattern = self.entry.host_patterns.iter().any(|pat| {
            let Some((pat_host, pat_port)) = split_host_port(pat) else {
                return false;
            };
            let Some(domain) = pat_host.strip_prefix("*.") else {
                return false;
            };
            pat_port == port
                && host.len() > domain.len() + 1
                && host.ends_with(domain)
                && host[..host.len() - domain.len()].ends_with('.')
        });
        exact || pattern
    }

    /// How to connect to this entry's brokers.
    pub fn connection(&self) -> Connection {
        let protocol = self.entry.security_protocol;
        Connection {
            name: self.entry.name.clone(),
            security_protocol: protocol,
            sasl_mechanism: self.entry.sasl_mechanism.filter(|_| protocol.uses_sasl()),
            credentials: self.credentials.clone().filter(|_| protocol.uses_sasl()),
            ssl_ca_location: self
                .entry
                .ssl_ca_location
                .clone()
                .filter(|_| protocol.uses_tls()),
        }
    }
}

impl BrokerPolicy {
    /// No broker allowed: the operator connects to none.
    pub fn none() -> Self {
        Self::default()
    }

    /// A policy of the given entries (tests, and callers that built them already).
    pub fn new(brokers: Vec<AllowedBroker>) -> Result<Self, BrokerPolicyError> {
        for (index, b) in brokers.iter().enumerate() {
            check_entry(index, &b.entry)?;
        }
        Ok(Self { brokers })
    }

    /// Parses `STREAMOPS_LAG_BROKERS` (`json`; empty means none) and reads each entry's
    /// credentials through `lookup` (the process environment in production).
    pub fn from_json(
        json: &str,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, BrokerPolicyError> {
        if json.trim().is_empty() {
            return Ok(Self::none());
        }
        let entries: Vec<BrokerEntry> =
            serde_json::from_str(json).map_err(|e| BrokerPolicyError::Parse(e.to_string()))?;
        let brokers = entries
            .into_iter()
            .enumerate()
            .map(|(index, entry)| {
                let credentials = match (lookup(&username_env(index)), lookup(&password_env(index)))
                {
                    (Some(username), Some(password)) if !username.is_empty() => {
                        Some(Credentials { username, password })
                    }
                    _ => None,
                };
                AllowedBroker { entry, credentials }
            })
            .collect();
        Self::new(brokers)
    }

    /// The policy of the process environment.
    pub fn from_env() -> Result<Self, BrokerPolicyError> {
        let json = std::env::var(ENV_LAG_BROKERS).unwrap_or_default();
        Self::from_json(&json, &|name| std::env::var(name).ok())
    }

    /// The allowed entries.
    pub fn brokers(&self) -> &[AllowedBroker] {
        &self.brokers
    }

    /// The entry that allows every address of `bootstrap_servers`, or why there is none.
    pub fn resolve(&self, bootstrap_servers: &str) -> Result<&AllowedBroker, NotAllowed> {
        let addresses: Vec<&str> = bootstrap_servers
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .collect();
        if self.brokers.is_empty() {
            return Err(NotAllowed {
                message: format!(
                    "the operator's admin allowed no Kafka brokers (chart value lag.brokers), so the operator does not connect to {bootstrap_servers}: no lag is read"
                ),
            });
        }
        if let Some(b) = self
            .brokers
            .iter()
            .find(|b| !addresses.is_empty() && addresses.iter().all(|a| b.allows(a)))
        {
            return Ok(b);
        }
        let denied: Vec<&str> = addresses
            .iter()
            .copied()
            .filter(|a| !self.brokers.iter().any(|b| b.allows(a)))
            .collect();
        let message = if denied.is_empty() {
            format!("spec.kafka.bootstrapServers {bootstrap_servers} mixes brokers of different allowed clusters; the operator does not connect to it: no lag is read")
        } else {
            format!(
                "spec.kafka.bootstrapServers names {}, which is not among the brokers the operator's admin allowed (chart value lag.brokers); the operator does not connect to it: no lag is read",
                denied.join(", ")
            )
        };
        Err(NotAllowed { message })
    }
}

fn check_entry(index: usize, e: &BrokerEntry) -> Result<(), BrokerPolicyError> {
    let fail = |message: String| BrokerPolicyError::Entry {
        index,
        name: e.name.clone(),
        message,
    };
    if e.bootstrap_servers.is_empty() && e.host_patterns.is_empty() {
        return Err(fail("names no bootstrapServers and no hostPatterns".into()));
    }
    for s in &e.bootstrap_servers {
        if split_host_port(s).is_none() || s.contains('*') {
            return Err(fail(format!("bootstrap server {s:?} is not host:port")));
        }
    }
    for p in &e.host_patterns {
        let ok = split_host_port(p).is_some_and(|(h, _)| {
            h.strip_prefix("*.")
                .is_some_and(|d| !d.is_empty() && !d.contains('*') && d.contains('.'))
        });
        if !ok {
            return Err(fail(format!(
                "host pattern {p:?} is not of the form *.domain.tld:port"
            )));
        }
    }
    if e.security_protocol.uses_sasl() && e.sasl_mechanism.is_none() {
        return Err(fail(format!(
            "securityProtocol {} needs a saslMechanism",
            e.security_protocol.as_str()
        )));
    }
    if e.sasl_mechanism == Some(SaslMechanism::Plain) && !e.security_protocol.uses_tls() {
        return Err(fail(
            "SASL PLAIN sends the password in clear text: it is only allowed with SASL_SSL".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(json: &str) -> BrokerPolicy {
        BrokerPolicy::from_json(json, &|name| match name {
            "STREAMOPS_LAG_BROKER_0_USERNAME" => Some("lag-reader".into()),
            "STREAMOPS_LAG_BROKER_0_PASSWORD" => Some("p4ss".into()),
            _ => None,
        })
        .unwrap()
    }

    const PROD: &str = r#"[
        {"name": "prod", "bootstrapServers": ["kafka-0.prod.svc:9093"], "hostPatterns": ["*.kafka.prod.svc:9093"],
         "securityProtocol": "SASL_SSL", "saslMechanism": "SCRAM-SHA-512"},
        {"name": "dev", "bootstrapServers": ["kafka.dev:9092"]}
    ]"#;

    #[test]
    fn exact_servers_and_host_patterns_are_allowed_with_their_entry() {
        let p = policy(PROD);
        let prod = p
            .resolve("kafka-0.prod.svc:9093, b-1.kafka.prod.svc:9093")
            .unwrap();
        assert_eq!(prod.entry.name, "prod");
        let c = prod.connection();
        assert_eq!(c.security_protocol, SecurityProtocol::SaslSsl);
        assert_eq!(c.sasl_mechanism, Some(SaslMechanism::ScramSha512));
        assert_eq!(c.credentials.unwrap().username, "lag-reader");
        let dev = p.resolve("KAFKA.dev:9092").unwrap();
        assert_eq!(dev.entry.name, "dev");
        assert_eq!(
            dev.connection().credentials,
            None,
            "entry 1 has no credentials"
        );
    }

    #[test]
    fn other_hosts_ports_and_look_alikes_are_refused() {
        let p = policy(PROD);
        for s in [
            "attacker.example:9093",
            "kafka-0.prod.svc:9092",
            "kafka.prod.svc:9093",
            "evilkafka.prod.svc:9093",
            "x.kafka.prod.svc.attacker.example:9093",
            "kafka-0.prod.svc:9093,attacker.example:9093",
            "kafka-0.prod.svc:9093,kafka.dev:9092",
        ] {
            let err = p.resolve(s).unwrap_err();
            assert!(err.message.contains("no lag is read"), "{s}: {err}");
        }
        let err = p.resolve("attacker.example:9093").unwrap_err();
        assert!(err.message.contains("attacker.example:9093"), "{err}");
        assert!(BrokerPolicy::none().resolve("kafka.dev:9092").is_err());
    }

    #[test]
    fn plain_without_tls_and_malformed_entries_stop_the_operator() {
        let bad = [
            r#"[{"name": "x", "bootstrapServers": ["k:9092"], "securityProtocol": "SASL_PLAINTEXT", "saslMechanism": "PLAIN"}]"#,
            r#"[{"name": "x", "bootstrapServers": ["k:9092"], "securityProtocol": "SASL_SSL"}]"#,
            r#"[{"name": "x"}]"#,
            r#"[{"name": "x", "hostPatterns": ["*:9092"]}]"#,
            r#"[{"name": "x", "hostPatterns": ["*.com:9092"]}]"#,
            r#"[{"name": "x", "bootstrapServers": ["k"]}]"#,
            r#"[{"name": "x", "bootstrapServers": ["k:9092"], "password": "inline"}]"#,
            "not json",
        ];
        for json in bad {
            assert!(
                BrokerPolicy::from_json(json, &|_| None).is_err(),
                "{json} accepted"
            );
        }
        let ok = r#"[{"name": "x", "bootstrapServers": ["k:9093"], "securityProtocol": "SASL_SSL", "saslMechanism": "PLAIN"}]"#;
        assert!(BrokerPolicy::from_json(ok, &|_| None).is_ok());
        assert_eq!(
            BrokerPolicy::from_json("", &|_| None).unwrap(),
            BrokerPolicy::none()
        );
    }

    #[test]
    fn credentials_never_show_in_debug_output() {
        let p = policy(PROD);
        let text = format!("{p:?} {:?}", p.brokers()[0].connection());
        assert!(!text.contains("p4ss"), "{text}");
        assert!(text.contains("lag-reader"));
    }
}
