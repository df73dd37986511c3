//! The operator sends its Kafka credentials only to brokers its admin allowed, and never in clear
//! text. A fake broker on loopback speaks enough of the Kafka protocol (ApiVersions,
//! SaslHandshake) to make a client authenticate, and records every byte it receives: every
//! SaslHandshake and SaslAuthenticate attempt. No test here needs a real broker.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use streamops_crds::v1alpha1::{
    CredentialsSecretRef, KafkaSecurity, SaslMechanism, SaslSpec, SecurityProtocol,
};
use streamops_crds::StreamConsumer;
use streamops_operator::brokers::BrokerPolicy;
use streamops_operator::consumer_group::{
    GroupDeleteError, GroupDeleter, GroupTarget, KafkaGroupDeleter,
};
use streamops_operator::lag::{KafkaLagReader, LagError, LagReader, LagTarget};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PASSWORD: &str = "lag-reader-password-7f3a9c";
const USERNAME: &str = "lag-reader";

const API_VERSIONS: i16 = 18;
const SASL_HANDSHAKE: i16 = 17;
const SASL_AUTHENTICATE: i16 = 36;

/// One request the fake broker received.
#[derive(Debug, Clone)]
struct Request {
    api_key: i16,
    /// The whole frame, size prefix excluded.
    bytes: Vec<u8>,
}

#[derive(Default)]
struct Recorded {
    connections: usize,
    requests: Vec<Request>,
}

/// A fake Kafka broker that records what it receives.
struct FakeBroker {
    address: String,
    recorded: Arc<Mutex<Recorded>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeBroker {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        let recorded = Arc::new(Mutex::new(Recorded::default()));
        let rec = recorded.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                rec.lock().unwrap().connections += 1;
                tokio::spawn(serve(stream, rec.clone()));
            }
        });
        Self {
            address,
            recorded,
            task,
        }
    }

    fn connections(&self) -> usize {
        self.recorded.lock().unwrap().connections
    }

    fn requests(&self) -> Vec<Request> {
        self.recorded.lock().unwrap().requests.clone()
    }

    fn auth_attempts(&self) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.api_key == SASL_HANDSHAKE || r.api_key == SASL_AUTHENTICATE)
            .collect()
    }

    /// Whether `secret` appears in anything received.
    fn received(&self, secret: &str) -> bool {
        self.requests()
            .iter()
            .any(|r| contains(&r.bytes, secret.as_bytes()))
    }
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn serve(mut stream: TcpStream, recorded: Arc<Mutex<Recorded>>) {
    loop {
        let mut size = [0u8; 4];
        if stream.read_exact(&mut size).await.is_err() {
            return;
        }
        let size = i32::from_be_bytes(size);
        if !(8..=1_048_576).contains(&size) {
            return;
        }
        let mut frame = vec![0u8; size as usize];
        if stream.read_exact(&mut frame).await.is_err() {
            return;
        }
        let api_key = i16::from_be_bytes([frame[0], frame[1]]);
        let version = i16::from_be_bytes([frame[2], frame[3]]);
        let correlation = [frame[4], frame[5], frame[6], frame[7]];
        recorded.lock().unwrap().requests.push(Request {
            api_key,
            bytes: frame.clone(),
        });
        let body = match api_key {
            API_VERSIONS => api_versions(version),
            SASL_HANDSHAKE => sasl_handshake(),
            // SaslAuthenticate and everything else: recorded, then the connection is dropped.
            _ => return,
        };
        let mut out = Vec::with_capacity(8 + body.len());
        out.extend_from_slice(&((4 + body.len()) as i32).to_be_bytes());
        out.extend_from_slice(&correlation);
        out.extend_from_slice(&body);
        if stream.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// ApiVersions: ApiVersions 0-3, SaslHandshake 0-1, SaslAuthenticate 0-1, Metadata 0-4.
fn api_versions(version: i16) -> Vec<u8> {
    let apis: [(i16, i16, i16); 4] = [
        (API_VERSIONS, 0, 3),
        (SASL_HANDSHAKE, 0, 1),
        (SASL_AUTHENTICATE, 0, 1),
        (3, 0, 4),
    ];
    let mut b = Vec::new();
    b.extend_from_slice(&0i16.to_be_bytes());
    if version >= 3 {
        // Flexible: compact array (length + 1 as an unsigned varint), tagged fields.
        b.push((apis.len() + 1) as u8);
        for (key, min, max) in apis {
            b.extend_from_slice(&key.to_be_bytes());
            b.extend_from_slice(&min.to_be_bytes());
            b.extend_from_slice(&max.to_be_bytes());
            b.push(0);
        }
        b.extend_from_slice(&0i32.to_be_bytes());
        b.push(0);
    } else {
        b.extend_from_slice(&(apis.len() as i32).to_be_bytes());
        for (key, min, max) in apis {
            b.extend_from_slice(&key.to_be_bytes());
            b.extend_from_slice(&min.to_be_bytes());
            b.extend_from_slice(&max.to_be_bytes());
        }
        if version >= 1 {
            b.extend_from_slice(&0i32.to_be_bytes());
        }
    }
    b
}

/// SaslHandshake: no error; every mechanism is enabled, as an attacker's broker would say.
fn sasl_handshake() -> Vec<u8> {
    let mechanisms = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];
    let mut b = Vec::new();
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&(mechanisms.len() as i32).to_be_bytes());
    for m in mechanisms {
        b.extend_from_slice(&(m.len() as i16).to_be_bytes());
        b.extend_from_slice(m.as_bytes());
    }
    b
}

/// Waits until `done` or `within` passed.
async fn wait_for(within: Duration, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !done() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The operator's allow-list as the chart renders it, with one allowed cluster whose
/// credentials are [`USERNAME`]/[`PASSWORD`].
fn policy(allowed: &str, protocol: &str, mechanism: &str) -> Arc<BrokerPolicy> {
    let json = format!(
        r#"[{{"name": "shared", "bootstrapServers": ["{allowed}"], "securityProtocol": "{protocol}", "saslMechanism": "{mechanism}"}}]"#
    );
    Arc::new(
        BrokerPolicy::from_json(&json, &|name| match name {
            "STREAMOPS_LAG_BROKER_0_USERNAME" => Some(USERNAME.into()),
            "STREAMOPS_LAG_BROKER_0_PASSWORD" => Some(PASSWORD.into()),
            _ => None,
        })
        .expect("a valid allow-list"),
    )
}

/// A StreamConsumer whose author points it at `bootstrap` and asks for SASL PLAIN in clear text.
fn hostile_consumer(bootstrap: &str) -> StreamConsumer {
    StreamConsumer::test().with_spec(|s| {
        s.kafka.bootstrap_servers = bootstrap.into();
        s.kafka.security = Some(KafkaSecurity {
            protocol: SecurityProtocol::SaslPlaintext,
            sasl: Some(SaslSpec {
                mechanism: SaslMechanism::Plain,
                credentials_secret_ref: CredentialsSecretRef {
                    name: "mine".into(),
                    username_key: "username".into(),
                    password_key: "password".into(),
                },
            }),
            tls: None,
        })
    })
}

/// The fake broker does catch a password sent in clear text: what the operator's lag reader did
/// before the allow-list, with the spec's SASL_PLAINTEXT and PLAIN and the operator's credentials.
#[tokio::test]
async fn the_fake_broker_records_a_password_sent_with_plain_in_clear_text() {
    let broker = FakeBroker::start().await;
    let address = broker.address.clone();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &address)
            .set("group.id", "g")
            .set("security.protocol", "SASL_PLAINTEXT")
            .set("sasl.mechanism", "PLAIN")
            .set("sasl.username", USERNAME)
            .set("sasl.password", PASSWORD)
            .set("log_level", "0")
            .create()
            .expect("a consumer");
        let _ = consumer.fetch_metadata(None, Duration::from_secs(3));
    })
    .await
    .unwrap();
    wait_for(Duration::from_secs(2), || broker.received(PASSWORD)).await;
    assert!(
        broker.received(PASSWORD),
        "the fake broker must see a clear-text password, or it proves nothing: {:?}",
        broker
            .requests()
            .iter()
            .map(|r| r.api_key)
            .collect::<Vec<_>>()
    );
}

/// A StreamConsumer naming a broker the admin did not allow gets no connection at all from the
/// operator: neither the lag reader nor the consumer-group deleter contacts it.
#[tokio::test]
async fn a_broker_the_admin_did_not_allow_is_never_contacted() {
    let broker = FakeBroker::start().await;
    let sc = hostile_consumer(&broker.address);
    let allowed = policy("kafka.shared.example:9093", "SASL_SSL", "SCRAM-SHA-512");

    let reader = KafkaLagReader::with_timeout(Duration::from_secs(2)).with_policy(allowed.clone());
    let err = reader
        .read(&LagTarget::from_resource(&sc))
        .await
        .expect_err("no lag from a broker that is not allowed");
    assert_eq!(err.reason(), "BrokerNotAllowed", "{err}");
    assert!(matches!(err, LagError::BrokerNotAllowed(_)));
    assert!(err.to_string().contains(&broker.address), "{err}");

    let deleter = KafkaGroupDeleter {
        timeout: Duration::from_secs(2),
        ..KafkaGroupDeleter::allowed(allowed)
    };
    let target = GroupTarget {
        bootstrap_servers: broker.address.clone(),
        group_id: "someone-elses-group".into(),
        security_protocol: SecurityProtocol::Plaintext,
    };
    let err = deleter.delete_group(&target).await.unwrap_err();
    assert!(matches!(err, GroupDeleteError::NotAllowed(_)), "{err}");

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(broker.connections(), 0, "{:?}", broker.requests());
    assert!(!broker.received(PASSWORD));
}

/// On an allowed broker, the operator authenticates as its admin configured (SCRAM here), never
/// as the spec asks (PLAIN in clear text): the broker sees the authentication attempt, never the
/// password.
#[tokio::test]
async fn an_allowed_broker_gets_the_admins_mechanism_never_the_password() {
    let broker = FakeBroker::start().await;
    let sc = hostile_consumer(&broker.address);
    let allowed = policy(&broker.address, "SASL_PLAINTEXT", "SCRAM-SHA-512");
    let reader = KafkaLagReader::with_timeout(Duration::from_secs(2)).with_policy(allowed);
    let result = reader.read(&LagTarget::from_resource(&sc)).await;
    assert!(result.is_err(), "the fake broker serves no lag");
    wait_for(Duration::from_secs(3), || {
        broker
            .auth_attempts()
            .iter()
            .any(|r| r.api_key == SASL_AUTHENTICATE)
    })
    .await;
    let attempts = broker.auth_attempts();
    assert!(
        attempts.iter().any(|r| r.api_key == SASL_HANDSHAKE
            && contains(&r.bytes, b"SCRAM-SHA-512")
            && !contains(&r.bytes, b"PLAIN")),
        "the handshake names the admin's mechanism: {attempts:?}"
    );
    assert!(
        attempts.iter().any(|r| r.api_key == SASL_AUTHENTICATE),
        "the client reached authentication: {attempts:?}"
    );
    assert!(
        !broker.received(PASSWORD),
        "the password reached the broker"
    );
}

/// The spec's own SASL_PLAINTEXT + PLAIN never makes the operator send its credentials, even
/// to a broker the admin allowed for SASL_SSL: the admin's protocol wins, and PLAIN without TLS is
/// refused outright.
#[tokio::test]
async fn plain_in_clear_text_is_never_used_whatever_the_spec_says() {
    let broker = FakeBroker::start().await;
    let reader = KafkaLagReader::with_timeout(Duration::from_secs(2));
    let mut target = LagTarget::from_resource(&hostile_consumer(&broker.address));
    target.credentials = Some((USERNAME.into(), PASSWORD.into()));
    let err = reader.read(&target).await.unwrap_err();
    assert_eq!(err.reason(), "PlainWithoutTls", "{err}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(broker.connections(), 0);
    assert!(
        BrokerPolicy::from_json(
            r#"[{"name": "x", "bootstrapServers": ["k:9092"], "securityProtocol": "SASL_PLAINTEXT", "saslMechanism": "PLAIN"}]"#,
            &|_| None
        )
        .is_err(),
        "an allow-list entry with PLAIN in clear text stops the operator"
    );
}
