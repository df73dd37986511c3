//! No secret value appears in anything the operator writes: logs (at trace level), events,
//! status, metrics. The only secret the operator holds is the credentials of the brokers its
//! admin allowed; here they have known values, the lag poller reads with them (from a broker that
//! does not answer, and for a StreamConsumer naming a broker that is not allowed), the reconciler
//! publishes what it learnt against the mock API, and every output is searched for the values.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::core::error_boundary::DeserializeGuard;
use kube::runtime::reflector;
use kube::runtime::watcher;
use prometheus::{Encoder, Registry, TextEncoder};
use streamops_crds::v1alpha1::StreamConsumer;
use tokio_util::sync::CancellationToken;

use crate::brokers::BrokerPolicy;
use crate::fixtures::*;
use crate::lag::KafkaLagReader;
use crate::lag_book::LagBook;
use crate::lag_poller::{Guarded, LagPoller, PollSettings};
use crate::metrics::Metrics;
use crate::{reconcile, Context, OperatorConfig};

const PASSWORD: &str = "operator-lag-password-51c0e2";

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn named(name: &str, uid: &str, bootstrap: &str) -> StreamConsumer {
    let mut sc = StreamConsumer::test()
        .finalized()
        .with_spec(|s| s.kafka.bootstrap_servers = bootstrap.into());
    sc.metadata.name = Some(name.into());
    sc.metadata.uid = Some(uid.into());
    sc
}

// One thread: every task logs through the subscriber set for this test.
#[tokio::test]
async fn no_secret_value_appears_in_logs_events_status_or_metrics() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .json()
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    // The admin allowed one SASL cluster (nothing listens there) with known credentials.
    let policy = Arc::new(
        BrokerPolicy::from_json(
            r#"[{"name": "shared", "bootstrapServers": ["127.0.0.1:1"], "securityProtocol": "SASL_SSL", "saslMechanism": "SCRAM-SHA-512"}]"#,
            &|name| match name {
                "STREAMOPS_LAG_BROKER_0_USERNAME" => Some("lag-reader".into()),
                "STREAMOPS_LAG_BROKER_0_PASSWORD" => Some(PASSWORD.into()),
                _ => None,
            },
        )
        .unwrap(),
    );
    tracing::debug!(?policy, "allow-list");

    // The poller reads both consumers: one on the allowed (silent) broker, one elsewhere.
    let allowed = named("test", SC_UID, "127.0.0.1:1");
    let elsewhere = named("other", "uid-other", "kafka.attacker.invalid:9092");
    let registry = Registry::new();
    let metrics = Metrics::register(&registry).unwrap();
    let book = Arc::new(LagBook::new());
    let (store, mut store_writer) = reflector::store::<Guarded>();
    for sc in [&allowed, &elsewhere] {
        store_writer.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Ok(sc.clone()))));
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let reader = KafkaLagReader::with_timeout(Duration::from_secs(1)).with_policy(policy);
    let poller = LagPoller::new(
        reader,
        book.clone(),
        metrics.clone(),
        PollSettings::default(),
    );
    let task = tokio::spawn(poller.run(store, tx, stop.clone()));
    let mut triggered = Vec::new();
    while triggered.len() < 2 {
        let object = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("both readings finish")
            .expect("the poller runs");
        triggered.push(object.name);
    }
    stop.cancel();
    task.await.unwrap();
    let lag_of = |sc: &StreamConsumer| crate::ReplicaDecider::lag(book.as_ref(), sc);
    let refused = lag_of(&elsewhere).and_then(|v| v.failure).unwrap();
    assert_eq!(refused.reason, "BrokerNotAllowed", "{refused:?}");
    assert!(lag_of(&allowed).and_then(|v| v.failure).is_some());

    // The reconciler publishes the failure: LagAvailable=False in the status and an event.
    let (client, server) = mock_client();
    let ctx = Arc::new(Context::new(
        client,
        metrics,
        OperatorConfig::new(TEST_IMAGE),
        FakeGroupDeleter::new(Ok(crate::consumer_group::GroupDeletion::Deleted)),
        book.clone(),
    ));
    let mut pass = ApplyPass::new(allowed.clone());
    pass.events = vec!["Created", "LagUnavailable"];
    pass.status = Some(serde_json::json!({}));
    let mock = server.run(Scenario::Apply(Box::new(pass)));
    reconcile(guard(allowed), ctx.clone()).await.unwrap();
    drop(ctx);
    let requests = finish(mock).await;

    let mut metrics_text = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut metrics_text)
        .unwrap();
    let metrics_text = String::from_utf8(metrics_text).unwrap();
    let written: String = requests
        .iter()
        .map(|r| format!("{} {} {}\n", r.method, r.path, r.body))
        .collect();
    let logs = logs.text();

    assert!(
        metrics_text.contains("streamops_operator_lag_read_failures_total"),
        "{metrics_text}"
    );
    let status = requests
        .iter()
        .find(|r| r.path.ends_with("/status"))
        .map(|r| r.body["status"]["conditions"].clone())
        .unwrap();
    assert!(
        status
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "LagAvailable" && c["status"] == "False"),
        "{status}"
    );
    assert!(logs.contains("lag"), "the operator logged: {logs}");
    for (what, text) in [
        ("the logs", &logs),
        ("events and status", &written),
        ("/metrics", &metrics_text),
    ] {
        assert!(
            !text.contains(PASSWORD),
            "the password appears in {what}:\n{text}"
        );
    }
}
