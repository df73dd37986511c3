//! The scheduler's rules with explicit instants, and the loop against a fake reader and a real
//! reflector store (tokio's paused clock: no test waits for wall time).

use std::time::Duration;

use kube::runtime::reflector;
use kube::runtime::watcher;
use streamops_crds::v1alpha1::AutoscalingSpec;

use super::*;
use crate::autoscale::DecisionReason;
use crate::fixtures::{group_lag, FakeLagReader};
use crate::lag_book::LagFigures;
use crate::ReplicaDecider;

fn consumer(name: &str, autoscaled: bool) -> StreamConsumer {
    let mut sc = StreamConsumer::test().with_spec(|s| {
        s.kafka.group_id = format!("group-{name}");
        s.autoscaling = autoscaled.then_some(AutoscalingSpec {
            min_replicas: 1,
            max_replicas: 6,
            lag_threshold: 100,
            scale_up_stabilization_seconds: 0,
            scale_down_stabilization_seconds: 300,
            scale_to_zero: false,
            activation_lag: 1,
            allow_idle_consumers: false,
            poll_interval_seconds: 5,
        });
    });
    sc.metadata.name = Some(name.to_string());
    sc.metadata.uid = Some(format!("uid-{name}"));
    sc
}

fn guarded(sc: StreamConsumer) -> Arc<Guarded> {
    Arc::new(DeserializeGuard(Ok(sc)))
}

fn settings() -> PollSettings {
    PollSettings::default()
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn recorded(total: Option<i64>, was_available: Option<bool>, changed: bool) -> Recorded {
    Recorded {
        figures: total.map(|t| LagFigures {
            total: t,
            partitions: 6,
            members: 1,
            max_partition_lag: t,
        }),
        was_available,
        decision: None,
        replicas_changed_from: changed.then_some(1),
    }
}

#[test]
fn a_new_object_is_read_at_once_then_on_its_interval() {
    let mut s = Scheduler::default();
    let objects = vec![guarded(consumer("a", true))];
    let t0 = Instant::now();
    let plan = s.plan(&objects, t0, &settings(), 4);
    assert_eq!(plan.jobs().len(), 1);
    assert_eq!(plan.jobs()[0].key, "default/a");
    assert_eq!(plan.jobs()[0].target.group_id, "group-a");
    s.finished("default/a", None, t0 + secs(1), &settings());
    assert!(s
        .plan(&objects, t0 + secs(4), &settings(), 4)
        .jobs()
        .is_empty());
    assert_eq!(
        s.plan(&objects, t0 + secs(5), &settings(), 4).jobs().len(),
        1
    );
}

#[test]
fn an_object_is_never_read_twice_at_once() {
    let mut s = Scheduler::default();
    let objects = vec![guarded(consumer("a", true))];
    let t0 = Instant::now();
    assert_eq!(s.plan(&objects, t0, &settings(), 4).jobs().len(), 1);
    // The reading outlives its interval: no second one until it finishes.
    assert!(s
        .plan(&objects, t0 + secs(30), &settings(), 4)
        .jobs()
        .is_empty());
    s.finished("default/a", None, t0 + secs(30), &settings());
    assert_eq!(
        s.plan(&objects, t0 + secs(30), &settings(), 4).jobs().len(),
        1
    );
}

#[test]
fn objects_without_autoscaling_use_the_default_interval_or_are_not_read() {
    let mut s = Scheduler::default();
    let objects = vec![guarded(consumer("plain", false))];
    let t0 = Instant::now();
    assert_eq!(s.plan(&objects, t0, &settings(), 4).jobs().len(), 1);
    s.finished("default/plain", None, t0, &settings());
    assert!(s
        .plan(&objects, t0 + secs(29), &settings(), 4)
        .jobs()
        .is_empty());
    assert_eq!(
        s.plan(&objects, t0 + secs(30), &settings(), 4).jobs().len(),
        1
    );

    let off = PollSettings {
        default_interval: None,
        ..settings()
    };
    let plan = s.plan(&objects, t0 + secs(60), &off, 4);
    assert!(plan.jobs().is_empty());
    assert_eq!(
        plan.forgotten,
        ["default/plain"],
        "no longer read: forgotten"
    );
}

#[test]
fn gone_deleted_and_malformed_objects_are_forgotten() {
    let mut s = Scheduler::default();
    let t0 = Instant::now();
    let a = guarded(consumer("a", true));
    let b = guarded(consumer("b", true));
    s.plan(&[a.clone(), b.clone()], t0, &settings(), 4);
    let deleting = guarded(consumer("b", true).being_deleted("streamops.dev/cleanup"));
    let plan = s.plan(&[a.clone(), deleting], t0, &settings(), 4);
    assert_eq!(plan.forgotten, ["default/b"]);
    assert!(!s.tracks("default/b"));
    let plan = s.plan(&[], t0, &settings(), 4);
    assert_eq!(plan.forgotten, ["default/a"]);
    // A reading that finishes after its object went is not acted on.
    assert!(!s.finished(
        "default/a",
        Some(&recorded(Some(5), None, true)),
        t0,
        &settings()
    ));
}

#[test]
fn concurrent_batches_and_their_sizes_are_bounded() {
    let mut s = Scheduler::default();
    let objects: Vec<_> = ["a", "b", "c", "d", "e"]
        .into_iter()
        .map(|n| guarded(consumer(n, true)))
        .collect();
    let pairs = PollSettings {
        max_batch: 2,
        ..settings()
    };
    let t0 = Instant::now();
    let plan = s.plan(&objects, t0, &pairs, 1);
    assert_eq!(plan.batches.len(), 1);
    assert_eq!(plan.batches[0].len(), 2, "one batch of at most max_batch");
    let plan = s.plan(&objects, t0, &pairs, 2);
    assert_eq!(
        plan.batches.iter().map(Vec::len).collect::<Vec<_>>(),
        [2, 1],
        "the others next, in as many batches as are free"
    );
    assert!(s.plan(&objects, t0, &pairs, 0).batches.is_empty());
    assert!(
        s.plan(&objects, t0, &pairs, 4).batches.is_empty(),
        "every object is being read"
    );
}

#[test]
fn readings_due_together_share_a_batch_only_with_readings_on_the_same_brokers() {
    let mut s = Scheduler::default();
    let on = |name: &str, brokers: &str| {
        let mut sc = consumer(name, true);
        sc.spec.kafka.bootstrap_servers = brokers.to_string();
        guarded(sc)
    };
    let objects = vec![
        on("a", "kafka-1:9092"),
        on("b", "kafka-2:9092"),
        on("c", "kafka-1:9092"),
        on("d", "kafka-2:9092"),
        on("e", "kafka-1:9092"),
    ];
    let t0 = Instant::now();
    let plan = s.plan(&objects, t0, &settings(), 4);
    let batches: Vec<Vec<(&str, &str)>> = plan
        .batches
        .iter()
        .map(|b| {
            b.iter()
                .map(|j| (j.key.as_str(), j.target.bootstrap_servers.as_str()))
                .collect()
        })
        .collect();
    assert_eq!(
        batches,
        [
            vec![
                ("default/a", "kafka-1:9092"),
                ("default/c", "kafka-1:9092"),
                ("default/e", "kafka-1:9092")
            ],
            vec![("default/b", "kafka-2:9092"), ("default/d", "kafka-2:9092")]
        ]
    );
    // With one batch free, the readings on the other brokers wait for the next plan.
    let mut s = Scheduler::default();
    let plan = s.plan(&objects, t0, &settings(), 1);
    assert_eq!(plan.jobs().len(), 3);
    let plan = s.plan(&objects, t0, &settings(), 1);
    assert_eq!(
        plan.jobs()
            .iter()
            .map(|j| j.key.as_str())
            .collect::<Vec<_>>(),
        ["default/b", "default/d"]
    );
}

#[test]
fn readings_trigger_a_reconciliation_only_when_they_matter() {
    let mut s = Scheduler::default();
    let objects = vec![guarded(consumer("a", false))];
    let key = "default/a";
    let t0 = Instant::now();
    let mut read = |at: Duration, r: Recorded| {
        s.plan(&objects, t0 + at, &settings(), 4);
        s.finished(key, Some(&r), t0 + at, &settings())
    };
    assert!(
        read(secs(0), recorded(Some(10), None, false)),
        "first reading"
    );
    assert!(
        !read(secs(30), recorded(Some(10), Some(true), false)),
        "nothing changed"
    );
    assert!(
        read(secs(60), recorded(Some(20), Some(true), false)),
        "new figures, status old enough"
    );
    assert!(
        read(secs(90), recorded(None, Some(true), false)),
        "lag became unavailable"
    );
    assert!(
        !read(secs(120), recorded(None, Some(false), false)),
        "still unavailable"
    );
    assert!(
        read(secs(150), recorded(Some(20), Some(false), false)),
        "available again"
    );
}

#[test]
fn status_refreshes_are_rate_limited_but_scale_decisions_are_not() {
    let mut s = Scheduler::default();
    let objects = vec![guarded(consumer("a", true))];
    let key = "default/a";
    let t0 = Instant::now();
    let mut read = |at: Duration, r: Recorded| {
        s.plan(&objects, t0 + at, &settings(), 4);
        s.finished(key, Some(&r), t0 + at, &settings())
    };
    assert!(read(secs(0), recorded(Some(10), None, false)));
    assert!(
        !read(secs(5), recorded(Some(20), Some(true), false)),
        "within the status interval"
    );
    assert!(
        read(secs(10), recorded(Some(450), Some(true), true)),
        "a scale decision at once"
    );
    assert!(!read(secs(15), recorded(Some(460), Some(true), false)));
    assert!(
        read(secs(25), recorded(Some(470), Some(true), false)),
        "15 s after the last one"
    );
}

#[test]
fn the_loop_wakes_for_the_earliest_due_reading_within_a_tick() {
    let mut s = Scheduler::default();
    let t0 = Instant::now();
    let tick = settings().tick;
    assert_eq!(
        s.next_wake(t0, &settings(), false),
        t0 + tick,
        "nothing tracked"
    );
    let objects = vec![guarded(consumer("a", true))];
    s.plan(&objects, t0, &settings(), 4);
    assert_eq!(s.next_wake(t0, &settings(), false), t0 + tick, "in flight");
    s.finished("default/a", None, t0, &settings());
    let at = t0 + secs(5) - Duration::from_millis(300);
    assert_eq!(s.next_wake(at, &settings(), false), t0 + secs(5));
    let late = t0 + secs(9);
    assert!(
        s.next_wake(late, &settings(), false) > late,
        "an overdue reading never spins"
    );
    assert_eq!(s.next_wake(at, &settings(), true), at + tick, "saturated");
}

// ---- the loop -------------------------------------------------------------------------------

struct Harness {
    writer: reflector::store::Writer<Guarded>,
    rx: tokio::sync::mpsc::UnboundedReceiver<ObjectRef<Guarded>>,
    book: Arc<LagBook>,
    metrics: Metrics,
    reader: Arc<FakeLagReader>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn start() -> Harness {
    let (store, writer) = reflector::store::<Guarded>();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let book = Arc::new(LagBook::new());
    let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
    let reader = Arc::new(FakeLagReader::default());
    let stop = CancellationToken::new();
    let poller = LagPoller::new(reader.clone(), book.clone(), metrics.clone(), settings());
    let task = tokio::spawn(poller.run(store, tx, stop.clone()));
    Harness {
        writer,
        rx,
        book,
        metrics,
        reader,
        stop,
        task,
    }
}

impl Harness {
    fn apply(&mut self, sc: &StreamConsumer) {
        self.writer
            .apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Ok(sc.clone()))));
    }

    async fn next_trigger(&mut self) -> String {
        let object = tokio::time::timeout(Duration::from_secs(600), self.rx.recv())
            .await
            .expect("a reconciliation is triggered")
            .expect("the poller is running");
        object.name
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn the_poller_records_each_objects_lag_and_triggers_its_reconciliation() {
    let mut h = start();
    let scaled = consumer("scaled", true);
    let plain = consumer("plain", false);
    h.reader
        .answer("group-scaled", vec![Ok(group_lag(350, 6, 2))]);
    h.reader.answer("group-plain", vec![Ok(group_lag(7, 3, 1))]);
    h.apply(&scaled);
    h.apply(&plain);

    let mut triggered = vec![h.next_trigger().await, h.next_trigger().await];
    triggered.sort();
    assert_eq!(triggered, ["plain", "scaled"]);
    assert_eq!(
        h.reader.batches.lock().unwrap().first(),
        Some(&2),
        "due together on the same brokers: read in one batch"
    );

    assert_eq!(
        h.book.desired_replicas(&scaled),
        4,
        "lag 350, threshold 100"
    );
    assert_eq!(h.book.desired_replicas(&plain), 1, "spec.replicas");
    assert_eq!(h.book.lag(&plain).unwrap().last.unwrap().total, 7);
    let announced = h.book.announce(&scaled, 4).unwrap();
    assert_eq!(announced.reason, DecisionReason::ScaleUp);
    let m = &h.metrics;
    assert_eq!(
        m.consumer_lag
            .with_label_values(&["default", "scaled"])
            .get(),
        350
    );
    assert_eq!(
        m.consumer_lag
            .with_label_values(&["default", "plain"])
            .get(),
        7
    );
    assert_eq!(
        m.consumer_members
            .with_label_values(&["default", "scaled"])
            .get(),
        2
    );
    assert_eq!(
        m.consumer_max_partition_lag
            .with_label_values(&["default", "plain"])
            .get(),
        7
    );
    assert_eq!(
        m.autoscaler_replicas
            .with_label_values(&["default", "scaled"])
            .get(),
        4
    );
    assert_eq!(m.scale_decisions.with_label_values(&["ScaleUp"]).get(), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_unreadable_group_is_counted_reported_once_and_holds_the_replicas() {
    let mut h = start();
    let sc = consumer("down", true).with_replicas(3);
    // No script for the group: every reading fails.
    h.apply(&sc);
    assert_eq!(h.next_trigger().await, "down");
    let view = h.book.lag(&sc).unwrap();
    assert_eq!(view.failure.unwrap().reason, "ReaderFailed");
    assert_eq!(h.book.desired_replicas(&sc), 3);

    // Further failures are counted, not triggered. Then the group becomes readable.
    while h.reader.groups_read().len() < 4 {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        h.rx.try_recv().is_err(),
        "no trigger while still unavailable"
    );
    assert!(
        h.metrics
            .lag_read_failures
            .with_label_values(&["reader_failed"])
            .get()
            >= 4
    );
    h.reader.answer("group-down", vec![Ok(group_lag(0, 6, 3))]);
    assert_eq!(h.next_trigger().await, "down", "available again");
    assert_eq!(h.book.lag(&sc).unwrap().failure, None);
    assert_eq!(
        h.book.desired_replicas(&sc),
        3,
        "a fresh history never scales down at once"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_deleted_object_is_forgotten_with_its_metrics() {
    let mut h = start();
    let sc = consumer("gone", false);
    h.reader.answer("group-gone", vec![Ok(group_lag(9, 1, 1))]);
    h.apply(&sc);
    assert_eq!(h.next_trigger().await, "gone");
    assert!(h.book.lag(&sc).is_some());
    h.writer
        .apply_watcher_event(&watcher::Event::Delete(DeserializeGuard(Ok(sc.clone()))));
    while !h.book.keys().is_empty() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let series = h
        .metrics
        .consumer_lag
        .remove_label_values(&["default", "gone"]);
    assert!(series.is_err(), "the series was already removed");
    h.stop().await;
}
