//! Workers consuming from a broker that is frozen past its session (SIGSTOP, as the chaos
//! suite's broker stalled): when it runs again the KRaft controller fences it for a moment, the
//! window in which librdkafka 2.12 can leave a consumer without brokers, or with partitions
//! delegated to no broker (see `consumer_liveness`). Afterwards every message must be applied
//! exactly once and every worker must be ready again, including for messages produced after the
//! recovery; a worker may stop on its own only with exit code 75 (its consumer was wedged), and
//! is then started again under its instance id, as the kubelet would. Prints whether the broker
//! was fenced and whether a wedge happened (it depends on timing; the test holds either way).
//!
//! A broker of the test's own ([`support::own_broker`]); the dev stack's PostgreSQL.
//! `STREAMOPS_TEST_FREEZE_SECS` sets the freeze (20 s by default: 12 s did not get the broker
//! fenced in two runs on a 2-core machine, 20 s did).

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use streamops_crds::HandlerKind;
use streamops_worker::error::EXIT_RESTART;

use support::own_broker::OwnBroker;
use support::{ProduceSpec, TestEnv, WorkerProcess};

const PARTITIONS: i32 = 6;
const WORKERS: usize = 3;
/// Messages before and during the freeze, at [`RATE`] per second (production spans the freeze).
const MESSAGES: u64 = 6_000;
const RATE: u64 = 100;
/// Messages produced once every worker is ready again.
const AFTER: u64 = 600;

/// From the broker's resume until every worker is ready and every message applied: room for a
/// wedge to be seen (60 s), judged (a 10 s check, a 10 s probe), drained (30 s at most) and
/// restarted, plus the catch-up.
const RECOVERY_BOUND: Duration = Duration::from_secs(300);

/// The fleet: one static member per id, as the operator runs pods.
struct Fleet {
    ids: Vec<String>,
    workers: Vec<WorkerProcess>,
    /// Ids of the members restarted after exiting with [`EXIT_RESTART`].
    restarts: Vec<String>,
}

impl Fleet {
    /// Restarts members that exited with [`EXIT_RESTART`]; any other exit fails the test.
    fn tend(&mut self, env: &TestEnv, since: Instant) {
        for (i, w) in self.workers.iter_mut().enumerate() {
            if let Some(status) = w.try_exit() {
                assert_eq!(
                    status.code(),
                    Some(i32::from(EXIT_RESTART)),
                    "worker {} exited on its own with {status}, not to be restarted; log: {}",
                    self.ids[i],
                    w.log.display()
                );
                eprintln!(
                    "worker {} exited with {EXIT_RESTART} {:.0}s after the resume: restarting it",
                    self.ids[i],
                    since.elapsed().as_secs_f64()
                );
                self.restarts.push(self.ids[i].clone());
                *w = env.start_static_worker(&self.ids[i]);
            }
        }
    }

    fn all_ready(&self) -> bool {
        self.workers.iter().all(|w| w.readyz() == Some(200))
    }

    /// Tends the fleet until `done` holds and every member is ready, up to `bound` from `since`.
    async fn settle(&mut self, env: &TestEnv, since: Instant, bound: Duration, want: i64) {
        loop {
            self.tend(env, since);
            if self.all_ready() && env.applied_offsets().await >= want {
                return;
            }
            assert!(
                since.elapsed() < bound,
                "{} of {want} messages applied, workers ready: {:?}, {bound:?} after the resume; \
                 logs in {}",
                env.applied_offsets().await,
                self.workers.iter().map(|w| w.readyz()).collect::<Vec<_>>(),
                env.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// The worker logs in `dir` with a line containing `needle`.
fn logs_with(dir: &PathBuf, needle: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("the log directory")
        .filter_map(|e| e.ok())
        .filter(|e| std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains(needle)))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_apply_every_message_once_across_a_broker_fence_restarting_a_wedged_consumer() {
    let broker = OwnBroker::start("wedge");
    let bootstrap = broker.bootstrap();
    let env = TestEnv::new_on(&bootstrap, "wedge", HandlerKind::MovingAverage, PARTITIONS).await;
    let freeze = Duration::from_secs(
        std::env::var("STREAMOPS_TEST_FREEZE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20),
    );
    let ids: Vec<String> = (0..WORKERS).map(|i| format!("w{i}")).collect();
    let mut fleet = Fleet {
        workers: ids.iter().map(|id| env.start_static_worker(id)).collect(),
        ids,
        restarts: Vec::new(),
    };
    for w in &mut fleet.workers {
        w.wait_ready().await;
    }
    let producer = {
        let (bootstrap, topic) = (bootstrap.clone(), env.topic.clone());
        let spec = ProduceSpec::new(HandlerKind::MovingAverage, MESSAGES).rate(RATE);
        tokio::spawn(async move { support::produce_events_on(&bootstrap, &topic, &spec).await })
    };
    let start = Instant::now();
    while env.applied_offsets().await < 500 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "nothing applied before the freeze; logs in {}",
            env.dir.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let resumed = broker.freeze(freeze).await;

    fleet
        .settle(&env, resumed, RECOVERY_BOUND, MESSAGES as i64)
        .await;
    producer.await.expect("the producer task");
    let recovered = resumed.elapsed();
    // The fleet as it is now consumes what comes next.
    let after = ProduceSpec::new(HandlerKind::MovingAverage, AFTER).seed(2);
    support::produce_events_on(&bootstrap, &env.topic, &after).await;
    fleet
        .settle(
            &env,
            resumed,
            RECOVERY_BOUND + Duration::from_secs(120),
            (MESSAGES + AFTER) as i64,
        )
        .await;

    let total = (MESSAGES + AFTER) as i64;
    let (rows, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT (topic, partition, \"offset\")) FROM price_points",
    )
    .fetch_one(&env.pool)
    .await
    .expect("count the rows");
    assert_eq!(
        (rows, distinct),
        (total, total),
        "every message applied exactly once"
    );
    let fenced = std::fs::read_to_string(broker.log())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Fencing broker"))
        .count();
    eprintln!(
        "broker fenced {fenced} time(s); every worker ready with every message applied {:.0}s \
         after the resume; wedge restarts: {:?}; logs with an unfetchable partition: {:?}; \
         logs with a wedge: {:?}",
        recovered.as_secs_f64(),
        fleet.restarts,
        logs_with(&env.dir, "owned partition not fetchable"),
        logs_with(&env.dir, "\"kafka consumer wedged: /healthz fails"),
    );
    for w in fleet.workers {
        let status = w.terminate_and_wait();
        assert!(status.success(), "a worker stopped with {status}");
    }
    env.cleanup().await;
}
