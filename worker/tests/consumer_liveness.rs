//! The liveness probe of the Kafka consumer against the dev broker (127.0.0.1:9092): a fresh
//! client with the worker's settings reaches it and reads a partition from its leader; an
//! address nothing listens on is unreachable. A check of a consumer reporting every broker down,
//! or an owned partition unfetchable, judges it wedged (and asks for a restart) only when the
//! fresh client reaches the broker (and reads the partition from its leader there); a real
//! worker exports the gauge and is live. Needs the dev stack (`bash scripts/dev-up.sh`); fails
//! loudly without it.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use streamops_crds::HandlerKind;
use tokio_util::sync::CancellationToken;

use streamops_worker::consumer_liveness::{
    check, probe_brokers, spawn_with, Liveness, Probe, Target, Timing, Watched, PROBE_TIMEOUT,
};
use streamops_worker::handlers::TopicPartition;
use streamops_worker::kafka::KafkaClientSettings;
use streamops_worker::pipeline::fetchability::Unfetchable;
use streamops_worker::pipeline::{Health, Ownership};

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
async fn a_fresh_client_reaches_the_dev_broker_and_reads_a_partition_from_its_leader() {
    let topic = support::unique("liveness-probe");
    support::create_topic(&topic, 2).await;
    let target = Target {
        topic: Some(topic.clone()),
        partition: Some(1),
    };
    let p = probe_brokers(
        &KafkaClientSettings::plaintext(broker()),
        &target,
        PROBE_TIMEOUT,
    )
    .await;
    let Probe::Reachable(cluster) = &p else {
        panic!(
            "the dev broker at {} is not reachable (is the dev stack up?): {p:?}",
            broker()
        );
    };
    assert!(!cluster.brokers.is_empty(), "{p:?}");
    let tp = |partition| TopicPartition {
        topic: Arc::from(topic.as_str()),
        partition,
    };
    assert!(cluster.listed_leader(&tp(0)).is_some(), "{p:?}");
    assert!(cluster.answering_leader(&tp(1)).is_some(), "{p:?}");
    // Only the partition asked about is read from its leader.
    assert_eq!(cluster.answering_leader(&tp(0)), None, "{p:?}");
    support::kafka::delete_topic(&topic).await;
}

#[tokio::test]
async fn a_fresh_client_finds_an_address_nothing_listens_on_unreachable() {
    let p = probe_brokers(
        &KafkaClientSettings::plaintext(dead_address()),
        &Target::default(),
        Duration::from_secs(3),
    )
    .await;
    assert!(matches!(p, Probe::Unreachable(_)), "{p:?}");
}

fn gauge() -> prometheus::IntGauge {
    prometheus::IntGauge::new("streamops_kafka_client_wedged", "test").expect("valid gauge")
}

/// What a watcher of a consumer using `address` sees and acts on.
fn watched(address: String, topic: Option<String>) -> Watched {
    Watched {
        health: Arc::new(Health::default()),
        ownership: Arc::new(Ownership::default()),
        settings: KafkaClientSettings::plaintext(address),
        topic,
        wedged: gauge(),
        restart: CancellationToken::new(),
    }
}

/// Owns partition `partition` of `topic` in `w` and marks it delegated to no broker since now.
fn unfetchable(w: &Watched, topic: &str, partition: i32) {
    let tp = TopicPartition {
        topic: Arc::from(topic),
        partition,
    };
    w.ownership.assign(tp.clone(), Some(0));
    w.ownership.set_unfetchable(
        &tp,
        Some(Unfetchable::NoBroker { leader: -1 }),
        Instant::now(),
    );
}

#[tokio::test]
async fn a_consumer_reporting_no_broker_while_the_broker_answers_is_judged_wedged_and_restarted() {
    let w = watched(broker(), None);
    w.health.set_kafka_down(true);
    let verdict = check(&w, Duration::ZERO).await;
    assert!(matches!(verdict, Liveness::Wedged(_)), "{verdict:?}");
    let reason = w.health.live().expect_err("judged wedged");
    assert!(reason.contains("every broker down"), "{reason}");
    assert_eq!(w.wedged.get(), 1);
    assert!(w.restart.is_cancelled(), "a wedge asks for a restart");
}

#[tokio::test]
async fn a_consumer_reporting_no_broker_during_an_outage_stays_live() {
    let w = watched(dead_address(), None);
    w.health.set_kafka_down(true);
    assert_eq!(check(&w, Duration::ZERO).await, Liveness::Live);
    assert_eq!(w.health.live(), Ok(()));
    assert_eq!(w.wedged.get(), 0);
    assert!(!w.restart.is_cancelled());
}

#[tokio::test]
async fn an_unfetchable_partition_while_a_fresh_client_reaches_no_broker_stays_live() {
    let w = watched(dead_address(), None);
    unfetchable(&w, "orders", 0);
    assert_eq!(check(&w, Duration::ZERO).await, Liveness::Live);
    assert_eq!(w.health.live(), Ok(()));
    assert!(!w.restart.is_cancelled());
}

#[tokio::test]
async fn an_unfetchable_partition_without_a_leader_on_the_broker_stays_live() {
    let topic = support::unique("liveness-noleader");
    support::create_topic(&topic, 1).await;
    let w = watched(broker(), None);
    // Partition 3 of a one-partition topic: the broker answers, with no leader for it.
    unfetchable(&w, &topic, 3);
    assert_eq!(check(&w, Duration::ZERO).await, Liveness::Live);
    assert_eq!(w.health.live(), Ok(()));
    assert!(!w.restart.is_cancelled());
    support::kafka::delete_topic(&topic).await;
}

#[tokio::test]
async fn the_watcher_restarts_a_consumer_with_a_partition_unfetchable_past_the_threshold() {
    let topic = support::unique("liveness-stall");
    support::create_topic(&topic, 1).await;
    let w = watched(broker(), None);
    let stop = CancellationToken::new();
    let task = spawn_with(
        w.clone(),
        stop.clone(),
        Timing {
            wedge_after: Duration::from_millis(500),
            check_every: Duration::from_millis(100),
        },
    );
    let tp = TopicPartition {
        topic: Arc::from(topic.as_str()),
        partition: 0,
    };
    w.ownership.assign(tp.clone(), Some(0));
    // Fetchable: the watcher leaves it live.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(w.health.live(), Ok(()));
    assert!(!w.restart.is_cancelled());
    // Delegated to no broker from now on, while the broker leads the partition.
    let since = Instant::now();
    w.ownership
        .set_unfetchable(&tp, Some(Unfetchable::NoBroker { leader: -1 }), since);
    tokio::time::timeout(Duration::from_secs(30), w.restart.cancelled())
        .await
        .expect("the watcher asks for a restart within 30 s");
    assert!(
        since.elapsed() >= Duration::from_millis(500),
        "judged before the threshold"
    );
    let reason = w.health.live().expect_err("judged wedged");
    assert!(reason.contains(&format!("{topic}[0]")), "{reason}");
    assert!(reason.contains("delegated to no broker"), "{reason}");
    assert_eq!(w.wedged.get(), 1);
    // The watcher ends by itself after a wedge, leaving the verdict in place.
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the watcher ends after a wedge")
        .expect("the watcher does not panic");
    assert!(w.health.live().is_err());
    support::kafka::delete_topic(&topic).await;
}

#[tokio::test]
async fn the_watcher_leaves_a_consumer_that_fetches_live_and_stops_on_shutdown() {
    let w = watched(broker(), None);
    let stop = CancellationToken::new();
    let task = spawn_with(
        w.clone(),
        stop.clone(),
        Timing {
            wedge_after: Duration::from_millis(300),
            check_every: Duration::from_millis(100),
        },
    );
    // The consumer is up: the watcher leaves it live.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(w.health.live(), Ok(()));
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("the watcher stops on shutdown")
        .expect("the watcher does not panic");
    assert!(!w.restart.is_cancelled());
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
    let log = w.log.clone();
    let status = w.terminate_and_wait();
    assert!(
        status.success(),
        "stopped with {status}; log: {}",
        log.display()
    );
    env.cleanup().await;
}
