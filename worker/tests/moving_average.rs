//! moving-average worker against the real broker and PostgreSQL.

mod support;

use std::collections::{BTreeMap, HashMap};

use streamops_crds::HandlerKind;
use streamops_worker::generate::{Event, Generated};
use support::*;

/// Per symbol: (raw_response_id, price, average) in order.
type Averages = BTreeMap<String, Vec<(String, f64, Option<f64>)>>;

/// Per symbol, in production order: (raw_response_id, price, average once the window is full),
/// computed from the generated events alone.
fn independent_averages(events: &[Generated], window: usize) -> Averages {
    let mut out: Averages = BTreeMap::new();
    let mut history: HashMap<String, Vec<f64>> = HashMap::new();
    for g in events {
        if let Some(Event::Price(p)) = &g.event {
            let h = history.entry(p.symbol.clone()).or_default();
            h.push(p.price);
            let avg = (h.len() >= window).then(|| {
                let mut sum = 0.0;
                for x in &h[h.len() - window..] {
                    sum += x;
                }
                sum / window as f64
            });
            out.entry(p.symbol.clone()).or_default().push((
                p.raw_response_id.clone(),
                p.price,
                avg,
            ));
        }
    }
    out
}

/// What the database holds, per symbol in offset order (a symbol lives in one partition).
async fn stored_averages(env: &TestEnv) -> Averages {
    let rows: Vec<(String, String, f64, Option<f64>)> = sqlx::query_as(
        "SELECT p.symbol, p.raw_response_id, p.price, m.average
           FROM price_points p
           LEFT JOIN moving_averages m
             ON m.topic = p.topic AND m.partition = p.partition AND m.\"offset\" = p.\"offset\"
          ORDER BY p.symbol, p.\"offset\"",
    )
    .fetch_all(&env.pool)
    .await
    .expect("query stored averages");
    let mut out: Averages = BTreeMap::new();
    for (symbol, id, price, avg) in rows {
        out.entry(symbol).or_default().push((id, price, avg));
    }
    out
}

fn assert_same(expected: &Averages, got: &Averages) {
    assert_eq!(
        expected.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>(),
        "symbols differ"
    );
    for (symbol, exp) in expected {
        let g = &got[symbol];
        assert_eq!(exp.len(), g.len(), "row count of {symbol}");
        for (i, (e, r)) in exp.iter().zip(g).enumerate() {
            assert_eq!(e.0, r.0, "{symbol} #{i}: event order or identity differs");
            assert!(
                (e.1 - r.1).abs() < 1e-9,
                "{symbol} #{i}: price {} != {}",
                e.1,
                r.1
            );
            match (e.2, r.2) {
                (None, None) => {}
                (Some(a), Some(b)) => {
                    assert!((a - b).abs() < 1e-9, "{symbol} #{i}: average {a} != {b}")
                }
                other => panic!("{symbol} #{i}: average presence differs: {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn averages_equal_an_independent_computation_from_the_generated_events() {
    let env = TestEnv::new("ma-avg", HandlerKind::MovingAverage, 3).await;
    let spec = ProduceSpec::new(HandlerKind::MovingAverage, 3000).seed(11);
    let events = env.produce(&spec).await;
    let mut w = env.start_worker("w-0");
    w.wait_ready().await;
    env.wait_for_offsets(3000).await;
    let expected = independent_averages(&events, 5);
    assert_same(&expected, &stored_averages(&env).await);
    let with_avg: usize = expected
        .values()
        .flatten()
        .filter(|r| r.2.is_some())
        .count();
    assert_eq!(env.count("moving_averages").await, with_avg as i64);
    assert!(w.terminate_and_wait().success());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_and_restarted_leaves_no_missing_and_no_duplicate_rows() {
    let mut env = TestEnv::new("ma-kill", HandlerKind::MovingAverage, 3).await;
    env.config.batch.max_messages = 50;
    env.config.batch.max_wait_ms = 20;
    let total = 6000u64;
    let spec = ProduceSpec::new(HandlerKind::MovingAverage, total)
        .seed(23)
        .rate(1500);
    let producer = {
        let topic = env.topic.clone();
        let spec = spec.clone();
        tokio::spawn(async move { produce_events(&topic, &spec).await })
    };
    // Static membership, as the operator runs it: the restart below is a container restart in
    // its pod, which gets its partitions back at once.
    let mut w = env.start_static_worker("w-0");
    w.wait_ready().await;
    // Kill once part of the stream is committed, while the producer is still sending.
    env.wait_for_offsets(1000).await;
    w.kill();
    let committed_at_kill = env.applied_offsets().await;
    assert!(
        committed_at_kill < total as i64,
        "the kill was not mid-stream"
    );
    let mut w = env.start_static_worker("w-0");
    w.wait_ready().await;
    let events = producer.await.expect("producer task");
    env.wait_for_offsets(total as i64).await;

    let distinct: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT raw_response_id) FROM price_points")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        env.count("price_points").await,
        total as i64,
        "missing or duplicate price points"
    );
    assert_eq!(distinct, total as i64, "duplicate events");
    assert_same(
        &independent_averages(&events, 5),
        &stored_averages(&env).await,
    );
    assert!(w.terminate_and_wait().success());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_land_in_the_error_topic_with_their_reasons_and_valid_ones_in_postgres() {
    let env = TestEnv::new("ma-poison", HandlerKind::MovingAverage, 3).await;
    let spec = ProduceSpec::new(HandlerKind::MovingAverage, 2000)
        .seed(5)
        .poison(10.0);
    let events = env.produce(&spec).await;
    let poison: Vec<&Generated> = events.iter().filter(|g| g.poison.is_some()).collect();
    let valid = events.len() - poison.len();
    assert!(poison.len() > 100, "the generator made too little poison");
    let mut w = env.start_worker("w-0");
    w.wait_ready().await;
    env.wait_for_offsets(events.len() as i64).await;

    assert_eq!(env.count("price_points").await, valid as i64);
    assert_eq!(env.count("streamops_rejections").await, poison.len() as i64);
    assert_same(
        &independent_averages(&events, 5),
        &stored_averages(&env).await,
    );

    // Every poison message is in the error topic once, with its reason, key and source.
    let records = env.consume_error_topic(poison.len());
    assert_eq!(records.len(), poison.len(), "error topic count");
    let mut expected: HashMap<(Vec<u8>, String), usize> = HashMap::new();
    for g in &poison {
        let value = if g.payload.len() > 4096 {
            g.payload[..streamops_worker::errortopic::prefix_len(4096)].to_vec()
        } else {
            g.payload.clone()
        };
        *expected
            .entry((value, g.poison.unwrap().expected_reason().to_string()))
            .or_default() += 1;
    }
    let mut got: HashMap<(Vec<u8>, String), usize> = HashMap::new();
    for r in &records {
        use rdkafka::Message;
        let reason = header(r, "streamops.error.reason").expect("reason header");
        assert_eq!(
            header(r, "streamops.source.topic").as_deref(),
            Some(env.topic.as_str())
        );
        assert!(header(r, "streamops.source.partition").is_some());
        assert!(header(r, "streamops.source.offset").is_some());
        assert!(header(r, "streamops.error.detail").is_some());
        assert_eq!(
            header(r, "streamops.consumer").as_deref(),
            Some(env.topic.as_str())
        );
        if reason == "too_large" {
            assert_eq!(
                header(r, "streamops.error.truncated").as_deref(),
                Some("true")
            );
        }
        assert!(r.key().is_some(), "original key kept");
        *got.entry((r.payload().unwrap_or_default().to_vec(), reason))
            .or_default() += 1;
    }
    assert_eq!(
        expected, got,
        "error records differ from the generated poison"
    );
    let failed = w.metric("streamops_messages_failed_total");
    assert_eq!(failed as usize, poison.len());
    assert!(w.terminate_and_wait().success());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_commits_the_batch_in_flight_and_exits_zero() {
    let env = TestEnv::new("ma-term", HandlerKind::MovingAverage, 1).await;
    let mut w = env.start_worker("w-0");
    w.wait_ready().await;
    // Batches go as soon as the writer is free, so the writer is held instead: the table it
    // writes is locked, and the batch in flight waits on the lock until after the signal.
    let mut blocker = env.pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE price_points IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .expect("lock");
    let spec = ProduceSpec::new(HandlerKind::MovingAverage, 400).seed(3);
    let events = env.produce(&spec).await;
    let start = std::time::Instant::now();
    while w.metric("streamops_messages_consumed_total") < 400.0 {
        assert!(
            start.elapsed() < PATIENCE,
            "the worker never consumed the messages"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        env.applied_offsets().await,
        0,
        "nothing is committed before the signal"
    );
    // The lock goes 2 s after the signal, while the worker is shutting down.
    let release = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        blocker.rollback().await.expect("release the lock");
    });
    let status = w.terminate_and_wait();
    release.await.expect("the lock was released");
    assert!(status.success(), "exit status {status}");
    assert_eq!(env.count("price_points").await, 400);
    assert_eq!(env.applied_offsets().await, 400);
    assert_same(
        &independent_averages(&events, 5),
        &stored_averages(&env).await,
    );
    env.cleanup().await;
}
