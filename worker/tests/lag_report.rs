//! The worker's lag report (`GET /consumer/lag`), which the operator reads for StreamConsumers on
//! brokers it may not contact itself, against the real broker and PostgreSQL: it is parsed by the
//! same strict parser the operator uses, and its figures agree with the broker's high watermarks
//! and the offsets stored in PostgreSQL, both when the worker is caught up and when it is held back.

mod support;

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use streamops_crds::lag_report::{self, LagReport};
use streamops_crds::HandlerKind;
use streamops_worker::kafka::KafkaClientSettings;
use support::*;

fn report(w: &WorkerProcess, env: &TestEnv) -> Option<LagReport> {
    let (status, body) = w.http_get(lag_report::LAG_REPORT_PATH)?;
    assert_eq!(status, 200, "{body}");
    Some(
        lag_report::parse(
            body.as_bytes(),
            &env.group,
            std::slice::from_ref(&env.topic),
        )
        .unwrap_or_else(|e| panic!("the operator's parser refuses the report: {e}: {body}")),
    )
}

fn total_lag(r: &LagReport) -> Option<i64> {
    r.partitions.iter().map(|p| p.lag()).sum()
}

/// Waits until the report covers `partitions` partitions, all with known offsets, and `done`
/// holds for it.
async fn wait_for_report(
    w: &WorkerProcess,
    env: &TestEnv,
    partitions: usize,
    what: &str,
    done: impl Fn(&LagReport) -> bool,
) -> LagReport {
    let start = Instant::now();
    loop {
        let last = report(w, env);
        if let Some(r) = &last {
            if r.partitions.len() == partitions && total_lag(r).is_some() && done(r) {
                return r.clone();
            }
        }
        assert!(
            start.elapsed() < PATIENCE,
            "{what}: last report {last:?}; worker log in {}",
            env.dir.display()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn high_watermarks(topic: &str, partitions: i32) -> Vec<i64> {
    let c: BaseConsumer = KafkaClientSettings::plaintext(BROKER)
        .base()
        .set("group.id", unique("lag-report-probe"))
        .create()
        .expect("consumer");
    (0..partitions)
        .map(|p| {
            c.fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks")
                .1
        })
        .collect()
}

async fn stored_offsets(env: &TestEnv) -> Vec<(i32, i64)> {
    sqlx::query_as::<_, (i32, i64)>(
        "SELECT partition, next_offset FROM streamops_offsets WHERE consumer_group = $1 ORDER BY partition",
    )
    .bind(&env.group)
    .fetch_all(&env.pool)
    .await
    .expect("stored offsets")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_lag_report_matches_the_broker_and_the_stored_offsets_caught_up_and_held_back() {
    let env = TestEnv::new("lag-report", HandlerKind::MovingAverage, 2).await;
    env.produce(&ProduceSpec::new(HandlerKind::MovingAverage, 400).seed(1))
        .await;
    let mut w = env.start_worker("w-0");
    w.wait_ready().await;
    env.wait_for_offsets(400).await;

    // Caught up: every partition's next offset is its high watermark, as the broker says.
    let caught_up = wait_for_report(&w, &env, 2, "caught up", |r| total_lag(r) == Some(0)).await;
    let highs = high_watermarks(&env.topic, 2);
    let stored = stored_offsets(&env).await;
    for p in &caught_up.partitions {
        let i = usize::try_from(p.partition).unwrap();
        assert_eq!(p.high_watermark, Some(highs[i]), "{p:?}");
        assert_eq!(
            p.next_offset,
            stored.iter().find(|s| s.0 == p.partition).map(|s| s.1),
            "{p:?} against the stored offsets {stored:?}"
        );
    }
    assert_eq!(highs.iter().sum::<i64>(), 400);

    // Held back: the table the handler writes is locked, so nothing commits while 300 more
    // messages arrive. The report shows exactly those 300 behind.
    let mut blocker = env.pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE price_points IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .expect("lock");
    env.produce(&ProduceSpec::new(HandlerKind::MovingAverage, 300).seed(2))
        .await;
    let held = wait_for_report(&w, &env, 2, "held back", |r| total_lag(r) == Some(300)).await;
    let highs = high_watermarks(&env.topic, 2);
    assert_eq!(highs.iter().sum::<i64>(), 700);
    for p in &held.partitions {
        let i = usize::try_from(p.partition).unwrap();
        assert_eq!(p.high_watermark, Some(highs[i]), "{p:?}");
    }
    assert_eq!(
        held.partitions
            .iter()
            .map(|p| p.next_offset.unwrap())
            .sum::<i64>(),
        400,
        "nothing committed while the table was locked"
    );

    // Released: it catches up and the report says so.
    blocker.rollback().await.expect("release the lock");
    env.wait_for_offsets(700).await;
    wait_for_report(&w, &env, 2, "caught up again", |r| total_lag(r) == Some(0)).await;
    assert!(w.terminate_and_wait().success());
    env.cleanup().await;
}
