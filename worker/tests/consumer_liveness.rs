//! The liveness probe of the Kafka consumer against the dev broker (127.0.0.1:9092): a fresh
//! client with the worker's settings reaches it, an address nothing listens on is unreachable,
//! and a check of a consumer reporting every broker down judges it wedged only in the first
//! case; a real worker exports the gauge and is live. Needs the dev stack
//! (`bash scripts/dev-up.sh`); fails loudly without it.

mod support;

use std::time::Duration;

use streamops_crds::HandlerKind;

use streamops_worker::consumer_liveness::{check, probe_brokers, Probe, PROBE_TIMEOUT};
use streamops_worker::kafka::KafkaClientSettings;
use streamops_worker::pipeline::Health;

fn broker() -> String {
    support::BROKER.to_string()
}

/// A local address nothing listens on: a port bound, then released.
fn dead_address() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    let addr = l.local_addr().expect("local address");
    drop(l);
    addr.to_string()
}

#[tokio::test]
async fn a_fresh_client_reaches_the_dev_broker() {
    let p = probe_brokers(
        &KafkaClientSettings::plaintext(broker()),
        None,
        PROBE_TIMEOUT,
    )
    .await;
    assert!(
        matches!(p, Probe::Reachable { brokers } if brokers >= 1),
        "the dev broker at {} is not reachable (is the dev stack up?): {p:?}",
        broker()
    );
}

#[tokio::test]
async fn a_fresh_client_finds_an_address_nothing_listens_on_unreachable() {
    let p = probe_brokers(
        &KafkaClientSettings::plaintext(dead_address()),
        None,
        Duration::from_secs(3),
    )
    .await;
    assert!(matches!(p, Probe::Unreachable(_)), "{p:?}");
}

/// One check of `health` against a fresh client of `address`, with no waiting threshold.
async fn check_now(health: &Health, address: String, g: &prometheus::IntGauge) {
    check(
        health,
        &KafkaClientSettings::plaintext(address),
        None,
        g,
        Duration::ZERO,
    )
    .await;
}

fn gauge() -> prometheus::IntGauge {
    prometheus::IntGauge::new("streamops_kafka_client_wedged", "test").expect("valid gauge")
}

#[tokio::test]
async fn a_consumer_reporting_no_broker_while_the_broker_answers_is_judged_wedged() {
    let health = Health::default();
    health.set_kafka_down(true);
    let g = gauge();
    check_now(&health, broker(), &g).await;
    let reason = health.live().expect_err("judged wedged");
    assert!(reason.contains("wedged"), "{reason}");
    assert_eq!(g.get(), 1);
    // The consumer reaches a broker again: live.
    health.set_kafka_down(false);
    check_now(&health, broker(), &g).await;
    assert_eq!(health.live(), Ok(()));
    assert_eq!(g.get(), 0);
}

#[tokio::test]
async fn a_consumer_reporting_no_broker_during_an_outage_stays_live() {
    let health = Health::default();
    health.set_kafka_down(true);
    let g = gauge();
    check_now(&health, dead_address(), &g).await;
    assert_eq!(health.live(), Ok(()));
    assert_eq!(g.get(), 0);
}

#[tokio::test]
async fn the_watcher_fails_liveness_of_a_wedged_consumer_and_stops_on_shutdown() {
    use std::sync::Arc;
    use streamops_worker::consumer_liveness::{spawn_with, Timing};
    use tokio_util::sync::CancellationToken;

    let health = Arc::new(Health::default());
    let g = gauge();
    let stop = CancellationToken::new();
    let task = spawn_with(
        health.clone(),
        KafkaClientSettings::plaintext(broker()),
        None,
        g.clone(),
        stop.clone(),
        Timing {
            wedge_after: Duration::from_millis(300),
            check_every: Duration::from_millis(100),
        },
    );
    // The consumer is up: the watcher leaves it live.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(health.live(), Ok(()));
    // It reports every broker down while the broker answers a fresh client.
    health.set_kafka_down(true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while health.live().is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the watcher did not judge the consumer wedged within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(g.get(), 1);
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("the watcher stops on shutdown")
        .expect("the watcher does not panic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_worker_is_live_and_exports_the_wedged_gauge_at_zero() {
    let env = support::TestEnv::new("liveness", HandlerKind::MovingAverage, 1).await;
    let mut w = env.start_worker("w-0");
    w.wait_ready().await;
    assert_eq!(w.http_get("/healthz"), Some((200, "ok\n".to_string())));
    let metrics = w.metrics();
    assert!(
        metrics
            .lines()
            .any(|l| l == "streamops_kafka_client_wedged 0"),
        "the gauge is not exported at 0:\n{metrics}"
    );
    assert!(w.terminate_and_wait().success());
    env.cleanup().await;
}
