//! Group membership as production runs it, on Apache Kafka: the worker's default consumer
//! (cooperative-sticky assignment, no strategy override) while messages keep arriving.
//!
//! - a member joins: only the partitions it takes are revoked from their owners;
//! - a member leaves with SIGTERM: it leaves the group, and its partitions move to the survivors;
//! - a member dies with SIGKILL: its partitions stay with it until `session.timeout.ms` expires,
//!   then move to the survivors.
//!
//! In each case every produced offset ends up as exactly one row (reconciled against the broker's
//! high watermarks), no partition that stays with a surviving member is revoked, and those
//! partitions keep progressing while the moved ones are paused. Progress is observed by sampling
//! the stored offsets (`streamops_offsets`) of every partition; the assertions are about order
//! (what advanced while what was paused), never about speed.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use streamops_crds::HandlerKind;
use support::*;

const PARTITIONS: i32 = 6;
/// Sampling period of the progress observer.
const SAMPLE: Duration = Duration::from_millis(25);
/// The shortest pause of a moved partition during which the stayed partitions must be seen
/// progressing (far above the batch wait of 20 ms and the sampling period).
const RESOLVABLE: Duration = Duration::from_secs(1);

/// One membership test at a time: each runs three workers, and running them side by side on a
/// small machine makes every partition stall now and then, whatever the group does.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `(when, partition, next_offset)` whenever a partition's stored offset changes.
type Advances = Arc<Mutex<Vec<(Instant, i32, i64)>>>;

/// Samples the group's stored offsets until the returned flag is set.
fn observe_progress(env: &TestEnv) -> (Advances, Arc<std::sync::atomic::AtomicBool>) {
    let advances: Advances = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (pool, group, out, done) = (
        env.pool.clone(),
        env.group.clone(),
        advances.clone(),
        stop.clone(),
    );
    tokio::spawn(async move {
        let mut last: BTreeMap<i32, i64> = BTreeMap::new();
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            let rows: Vec<(i32, i64)> = sqlx::query_as(
                "SELECT partition, next_offset FROM streamops_offsets WHERE consumer_group = $1",
            )
            .bind(&group)
            .fetch_all(&pool)
            .await
            .unwrap_or_default();
            let now = Instant::now();
            for (p, next) in rows {
                if last.get(&p) != Some(&next) {
                    last.insert(p, next);
                    out.lock().unwrap().push((now, p, next));
                }
            }
            tokio::time::sleep(SAMPLE).await;
        }
    });
    (advances, stop)
}

/// Partition ownership as a worker logged it: replays "partition assigned" / "partition
/// revoked" from byte `from` of its log; returns (assigned, revoked) partitions in that range.
fn logged_changes(w: &WorkerProcess, from: usize) -> (Vec<i32>, Vec<i32>) {
    let text = w.log_text();
    let mut assigned = Vec::new();
    let mut revoked = Vec::new();
    for line in text.get(from..).unwrap_or_default().lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(p) = v["partition"].as_i64() else {
            continue;
        };
        match v["message"].as_str() {
            Some("partition assigned") => assigned.push(p as i32),
            Some("partition revoked") => revoked.push(p as i32),
            _ => {}
        }
    }
    (assigned, revoked)
}

/// The partitions a worker owns according to its whole log so far.
fn owned(w: &WorkerProcess) -> BTreeSet<i32> {
    let text = w.log_text();
    let mut owned = BTreeSet::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(p) = v["partition"].as_i64() else {
            continue;
        };
        match v["message"].as_str() {
            Some("partition assigned") => {
                owned.insert(p as i32);
            }
            Some("partition revoked") => {
                owned.remove(&(p as i32));
            }
            _ => {}
        }
    }
    owned
}

/// Waits until the running workers own every partition between them, each at least one, and
/// every partition has advanced *since* that ownership was reached: its new owner is processing
/// it. (Owning is not enough: a partition moved by the previous change is still paused for a few
/// seconds after its assignment is logged, and a change started then would measure that pause
/// as its own.)
async fn wait_until_settled(env: &TestEnv, workers: &[&WorkerProcess]) {
    let start = Instant::now();
    // The database's clock when the ownership was first seen complete (the stored offsets'
    // `updated_at` is on that clock).
    let mut owned_since: Option<f64> = None;
    loop {
        let sets: Vec<BTreeSet<i32>> = workers.iter().map(|w| owned(w)).collect();
        let union: BTreeSet<i32> = sets.iter().flatten().copied().collect();
        let total: usize = sets.iter().map(|s| s.len()).sum();
        let complete = union.len() == PARTITIONS as usize
            && total == PARTITIONS as usize
            && sets.iter().all(|s| !s.is_empty());
        if !complete {
            owned_since = None;
        } else if owned_since.is_none() {
            let now: f64 =
                sqlx::query_scalar("SELECT extract(epoch FROM clock_timestamp())::float8")
                    .fetch_one(&env.pool)
                    .await
                    .expect("database clock");
            owned_since = Some(now);
        }
        let progressed: i64 = match owned_since {
            Some(since) => sqlx::query_scalar(
                "SELECT count(*) FROM streamops_offsets
                  WHERE consumer_group = $1 AND extract(epoch FROM updated_at) > $2",
            )
            .bind(&env.group)
            .bind(since)
            .fetch_one(&env.pool)
            .await
            .unwrap_or(0),
            None => 0,
        };
        if complete && progressed == PARTITIONS as i64 {
            return;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "the group never settled: ownership {sets:?}, {progressed} partitions processed since; logs in {}",
            env.dir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every produced offset is exactly one price point, and the stored offsets are at the end.
async fn assert_nothing_lost_or_doubled(env: &TestEnv, produced: u64) {
    let hw = high_watermarks(&env.topic, PARTITIONS);
    assert_eq!(
        hw.values().sum::<i64>(),
        produced as i64,
        "the broker holds {hw:?}, the producer sent {produced}"
    );
    for (p, high) in &hw {
        assert!(
            *high > 0,
            "partition {p} received nothing: the test does not exercise it"
        );
        let (rows, distinct, missing): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM price_points WHERE topic = $1 AND partition = $2),
                    (SELECT count(DISTINCT \"offset\") FROM price_points WHERE topic = $1 AND partition = $2),
                    (SELECT count(*) FROM generate_series(0, $3 - 1) AS s(off)
                      WHERE NOT EXISTS (SELECT 1 FROM price_points
                                         WHERE topic = $1 AND partition = $2 AND \"offset\" = s.off))",
        )
        .bind(&env.topic)
        .bind(p)
        .bind(high)
        .fetch_one(&env.pool)
        .await
        .expect("reconcile query");
        assert_eq!(
            missing, 0,
            "partition {p}: {missing} offsets below {high} have no row"
        );
        assert_eq!(
            rows,
            distinct,
            "partition {p}: {} duplicated rows",
            rows - distinct
        );
        assert_eq!(rows, *high, "partition {p}: rows beyond the high watermark");
        let next: i64 = sqlx::query_scalar(
            "SELECT next_offset FROM streamops_offsets
              WHERE consumer_group = $1 AND topic = $2 AND partition = $3",
        )
        .bind(&env.group)
        .bind(&env.topic)
        .bind(p)
        .fetch_one(&env.pool)
        .await
        .expect("stored offset");
        assert_eq!(next, *high, "partition {p}: stored offset");
    }
}

/// The longest interval between two consecutive observed advances of `p` that ends after `t0`:
/// the pause of a moved partition.
fn longest_gap_after(advances: &[(Instant, i32, i64)], p: i32, t0: Instant) -> (Instant, Instant) {
    let times: Vec<Instant> = advances.iter().filter(|a| a.1 == p).map(|a| a.0).collect();
    times
        .windows(2)
        .filter(|w| w[1] > t0)
        .map(|w| (w[0], w[1]))
        .max_by_key(|(a, b)| *b - *a)
        .unwrap_or_else(|| panic!("partition {p} did not progress after the change"))
}

/// `a - b` in milliseconds, negative when `a` is earlier (`Instant` subtraction saturates at 0).
fn signed_ms(a: Instant, b: Instant) -> f64 {
    if a >= b {
        (a - b).as_secs_f64() * 1000.0
    } else {
        -((b - a).as_secs_f64() * 1000.0)
    }
}

/// Asserts that every stayed partition advanced strictly inside every moved partition's pause,
/// and prints the measured gaps. A pause shorter than [`RESOLVABLE`] is reported, not asserted on:
/// on a loaded machine every partition of a worker can stall that long at once (PostgreSQL
/// commits, scheduling), which says nothing about the rebalance.
fn assert_stayed_partitions_kept_progressing(
    advances: &Advances,
    moved: &BTreeSet<i32>,
    stayed: &BTreeSet<i32>,
    t0: Instant,
    case: &str,
) {
    let advances = advances.lock().unwrap().clone();
    let mut checked = 0;
    for &m in moved {
        let (from, to) = longest_gap_after(&advances, m, t0);
        eprintln!(
            "{case}: moved partition {m} paused {:.0} ms",
            (to - from).as_secs_f64() * 1000.0
        );
        if to - from < RESOLVABLE {
            continue;
        }
        checked += 1;
        for &s in stayed {
            let inside = advances
                .iter()
                .filter(|a| a.1 == s && a.0 > from && a.0 < to)
                .count();
            let around: Vec<String> = advances
                .iter()
                .filter(|a| {
                    a.1 == s
                        && a.0 + Duration::from_secs(2) > from
                        && a.0 < to + Duration::from_secs(2)
                })
                .map(|a| format!("{:+.0}ms:{}", signed_ms(a.0, from), a.2))
                .collect();
            assert!(
                inside > 0,
                "{case}: stayed partition {s} made no progress while moved partition {m} was paused \
                 ({:.0} ms from {:+.0} ms after the change); its advances around then (ms from the \
                 start of that pause: offset): {around:?}",
                (to - from).as_secs_f64() * 1000.0,
                signed_ms(from, t0)
            );
        }
    }
    for &s in stayed {
        let (from, to) = longest_gap_after(&advances, s, t0);
        eprintln!(
            "{case}: stayed partition {s}: longest gap {:.0} ms",
            (to - from).as_secs_f64() * 1000.0
        );
    }
    eprintln!("{case}: progress of stayed partitions checked inside {checked} pauses");
}

/// A topic with [`PARTITIONS`] partitions, small batches, and a producer running at 600 msg/s
/// over 48 keys (so that every partition receives messages) for `seconds`.
async fn setup(prefix: &str, seconds: u64) -> (TestEnv, u64, tokio::task::JoinHandle<()>) {
    let mut env = TestEnv::new(prefix, HandlerKind::MovingAverage, PARTITIONS).await;
    env.config.batch.max_messages = 50;
    env.config.batch.max_wait_ms = 20;
    let rate = 600;
    let total = rate * seconds;
    let mut spec = ProduceSpec::new(HandlerKind::MovingAverage, total)
        .seed(prefix.len() as u64)
        .rate(rate);
    spec.gen.keys = 48;
    let topic = env.topic.clone();
    let producer = tokio::spawn(async move {
        produce_events(&topic, &spec).await;
    });
    (env, total, producer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joining_takes_partitions_without_pausing_the_ones_that_stay() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (env, total, producer) = setup("member-join", 20).await;
    let (advances, stop) = observe_progress(&env);
    let mut w0 = env.start_worker("w-0");
    let mut w1 = env.start_worker("w-1");
    w0.wait_ready().await;
    w1.wait_ready().await;
    wait_until_settled(&env, &[&w0, &w1]).await;
    let before = [owned(&w0), owned(&w1)];
    let marks = [w0.log_text().len(), w1.log_text().len()];

    let t0 = Instant::now();
    let mut w2 = env.start_worker("w-2");
    w2.wait_ready().await;
    wait_until_settled(&env, &[&w0, &w1, &w2]).await;
    assert!(
        !producer.is_finished(),
        "the producer finished before the group settled: the join was not mid-stream"
    );
    let moved = owned(&w2);
    let stayed: BTreeSet<i32> = (0..PARTITIONS).filter(|p| !moved.contains(p)).collect();
    for (i, w) in [&w0, &w1].into_iter().enumerate() {
        let (assigned, revoked) = logged_changes(w, marks[i]);
        let revoked: BTreeSet<i32> = revoked.into_iter().collect();
        assert!(
            revoked.is_subset(&moved),
            "w-{i} had {:?} revoked, but only {moved:?} moved to the new member",
            revoked
        );
        assert!(
            assigned.is_empty(),
            "w-{i} was assigned {assigned:?} by the join"
        );
        assert_eq!(
            owned(w),
            &before[i] - &moved,
            "w-{i} kept its partitions except the moved ones"
        );
    }

    producer.await.expect("producer task");
    env.wait_for_offsets(total as i64).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_nothing_lost_or_doubled(&env, total).await;
    assert_stayed_partitions_kept_progressing(&advances, &moved, &stayed, t0, "join");
    for w in [w2, w1, w0] {
        assert!(w.terminate_and_wait().success());
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_stopped_with_sigterm_leaves_and_only_its_partitions_move() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (env, total, producer) = setup("member-leave", 20).await;
    let (advances, stop) = observe_progress(&env);
    let mut w0 = env.start_worker("w-0");
    let mut w1 = env.start_worker("w-1");
    let mut w2 = env.start_worker("w-2");
    for w in [&mut w0, &mut w1, &mut w2] {
        w.wait_ready().await;
    }
    wait_until_settled(&env, &[&w0, &w1, &w2]).await;
    let moved = owned(&w2);
    let stayed: BTreeSet<i32> = (0..PARTITIONS).filter(|p| !moved.contains(p)).collect();
    let before = [owned(&w0), owned(&w1)];
    let marks = [w0.log_text().len(), w1.log_text().len()];

    let t0 = Instant::now();
    assert!(w2.terminate_and_wait().success(), "SIGTERM is a clean exit");
    wait_until_settled(&env, &[&w0, &w1]).await;
    assert!(
        !producer.is_finished(),
        "the producer finished before the group settled: the leave was not mid-stream"
    );
    for (i, w) in [&w0, &w1].into_iter().enumerate() {
        let (assigned, revoked) = logged_changes(w, marks[i]);
        assert!(
            revoked.is_empty(),
            "w-{i} had {revoked:?} revoked when another member left"
        );
        let assigned: BTreeSet<i32> = assigned.into_iter().collect();
        assert!(
            assigned.is_subset(&moved),
            "w-{i} got {assigned:?}, but only {moved:?} were left behind"
        );
        assert!(
            owned(w).is_superset(&before[i]),
            "w-{i} kept its partitions"
        );
    }

    producer.await.expect("producer task");
    env.wait_for_offsets(total as i64).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_nothing_lost_or_doubled(&env, total).await;
    assert_stayed_partitions_kept_progressing(&advances, &moved, &stayed, t0, "leave");
    for w in [w1, w0] {
        assert!(w.terminate_and_wait().success());
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_killed_with_sigkill_holds_its_partitions_until_its_session_expires_and_only_they_pause(
) {
    let _serial = ONE_AT_A_TIME.lock().await;
    // A shorter session timeout than the 45 s default, as a user who wants faster failover sets
    // it (the broker's minimum, group.min.session.timeout.ms, is 6 s), through the worker's
    // consumer overrides. The assignment strategy is left alone.
    let session = [(
        "STREAMOPS_KAFKA_CONSUMER_OVERRIDES",
        "session.timeout.ms=6000,heartbeat.interval.ms=1000",
    )];
    let (env, total, producer) = setup("member-kill", 25).await;
    let (advances, stop) = observe_progress(&env);
    let mut w0 = env.start_worker_with_env("w-0", &session);
    let mut w1 = env.start_worker_with_env("w-1", &session);
    let mut w2 = env.start_worker_with_env("w-2", &session);
    for w in [&mut w0, &mut w1, &mut w2] {
        w.wait_ready().await;
    }
    wait_until_settled(&env, &[&w0, &w1, &w2]).await;
    let moved = owned(&w2);
    let stayed: BTreeSet<i32> = (0..PARTITIONS).filter(|p| !moved.contains(p)).collect();
    let before = [owned(&w0), owned(&w1)];
    let marks = [w0.log_text().len(), w1.log_text().len()];

    let t0 = Instant::now();
    w2.kill();
    wait_until_settled(&env, &[&w0, &w1]).await;
    assert!(
        !producer.is_finished(),
        "the producer finished before the group settled: the kill was not mid-stream"
    );
    for (i, w) in [&w0, &w1].into_iter().enumerate() {
        let (assigned, revoked) = logged_changes(w, marks[i]);
        assert!(
            revoked.is_empty(),
            "w-{i} had {revoked:?} revoked when another member died"
        );
        let assigned: BTreeSet<i32> = assigned.into_iter().collect();
        assert!(
            assigned.is_subset(&moved),
            "w-{i} got {assigned:?}, but only {moved:?} were orphaned"
        );
        assert!(
            owned(w).is_superset(&before[i]),
            "w-{i} kept its partitions"
        );
    }

    producer.await.expect("producer task");
    env.wait_for_offsets(total as i64).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_nothing_lost_or_doubled(&env, total).await;
    // The dead member's partitions were paused at least until its session expired; the
    // survivors' partitions progressed meanwhile (the pause is far above the observer's
    // resolution, so this case always checks progress).
    {
        let adv = advances.lock().unwrap().clone();
        for &m in &moved {
            let (from, to) = longest_gap_after(&adv, m, t0);
            // The session expires 5 to 6 s after the kill (heartbeats every second).
            assert!(
                to - from >= Duration::from_secs(4),
                "partition {m} of the killed member moved before its session expired ({:?})",
                to - from
            );
        }
    }
    assert_stayed_partitions_kept_progressing(&advances, &moved, &stayed, t0, "kill");
    for w in [w1, w0] {
        assert!(w.terminate_and_wait().success());
    }
    env.cleanup().await;
}
