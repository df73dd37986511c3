//! sensor worker against the real broker and PostgreSQL.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::PgPool;
use streamops_crds::{HandlerKind, StreamConsumerSpec, WorkerConfig};
use streamops_worker::generate::{Event, Generated};
use streamops_worker::handlers::sensor::{decode_reading, Reading, SensorHandler};
use streamops_worker::handlers::{
    Decoded, HandlerContext, MessageHandler, Position, TopicPartition,
};
use streamops_worker::kafka::KafkaClientSettings;
use support::*;

type MachineRow = (String, DateTime<Utc>, DateTime<Utc>);
type FailureRow = (String, String, DateTime<Utc>, Option<DateTime<Utc>>, bool);
type ReadingRow = (
    String,
    i32,
    i64,
    String,
    DateTime<Utc>,
    String,
    bool,
    Option<String>,
    bool,
);

/// Every row of the three tables, in a fixed order.
#[derive(Debug, PartialEq)]
struct Dump {
    machines: Vec<MachineRow>,
    failures: Vec<FailureRow>,
    readings: Vec<ReadingRow>,
}

async fn dump(pool: &PgPool) -> Dump {
    Dump {
        machines: sqlx::query_as(
            "SELECT machine_id, first_seen, last_seen FROM machines ORDER BY 1",
        )
        .fetch_all(pool)
        .await
        .unwrap(),
        failures: sqlx::query_as(
            "SELECT failure_id, machine_id, started_at, ended_at, active FROM failures ORDER BY 1",
        )
        .fetch_all(pool)
        .await
        .unwrap(),
        readings: sqlx::query_as(
            "SELECT source_topic, source_partition, source_offset, machine_id, reading_time, \
                    sensor_values::text, failure, failure_id, late \
             FROM sensor_readings ORDER BY 1, 2, 3",
        )
        .fetch_all(pool)
        .await
        .unwrap(),
    }
}

fn ts(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// The tables computed from the generated events alone, given where each event landed (its
/// partition and offset, read back by machine and timestamp, which are unique per event).
fn independent_tables(topic: &str, events: &[Generated], stored: &Dump) -> Dump {
    let position: HashMap<(String, DateTime<Utc>), (i32, i64)> = stored
        .readings
        .iter()
        .map(|r| ((r.3.clone(), r.4), (r.1, r.2)))
        .collect();
    let mut machines: BTreeMap<String, (DateTime<Utc>, DateTime<Utc>)> = BTreeMap::new();
    let mut open: HashMap<String, (String, DateTime<Utc>)> = HashMap::new();
    let mut failures: BTreeMap<String, FailureRow> = BTreeMap::new();
    let mut readings = Vec::new();
    for g in events {
        let Some(Event::Sensor(r)) = &g.event else {
            continue;
        };
        let t = ts(&r.timestamp);
        let (partition, offset) = *position
            .get(&(r.machine_id.clone(), t))
            .unwrap_or_else(|| panic!("reading {} at {t} is not stored", r.machine_id));
        let m = machines.entry(r.machine_id.clone()).or_insert((t, t));
        m.0 = m.0.min(t);
        m.1 = m.1.max(t);
        let link = match (r.failure, open.get(&r.machine_id).cloned()) {
            (true, Some((id, _))) => Some(id),
            (true, None) => {
                let id = format!("{topic}:{partition}:{offset}");
                open.insert(r.machine_id.clone(), (id.clone(), t));
                failures.insert(
                    id.clone(),
                    (id.clone(), r.machine_id.clone(), t, None, true),
                );
                Some(id)
            }
            (false, Some((id, _))) => {
                open.remove(&r.machine_id);
                let f = failures.get_mut(&id).unwrap();
                f.3 = Some(t);
                f.4 = false;
                None
            }
            (false, None) => None,
        };
        let values: serde_json::Value = serde_json::to_value(&r.readings).unwrap();
        readings.push((
            topic.to_string(),
            partition,
            offset,
            r.machine_id.clone(),
            t,
            serde_json::to_string(&values).unwrap(),
            r.failure,
            link,
            false,
        ));
    }
    readings.sort_by_key(|r| (r.1, r.2));
    Dump {
        machines: machines.into_iter().map(|(k, (f, l))| (k, f, l)).collect(),
        failures: failures.into_values().collect(),
        readings,
    }
}

/// Compares a stored dump with the independent one; JSONB text is compared as JSON values.
fn assert_tables_match(expected: &Dump, got: &Dump) {
    assert_eq!(expected.machines, got.machines, "machines differ");
    assert_eq!(expected.failures, got.failures, "failures differ");
    assert_eq!(expected.readings.len(), got.readings.len(), "reading count");
    for (e, g) in expected.readings.iter().zip(&got.readings) {
        let ev: serde_json::Value = serde_json::from_str(&e.5).unwrap();
        let gv: serde_json::Value = serde_json::from_str(&g.5).unwrap();
        assert_eq!(ev, gv, "values of {}:{}:{}", g.0, g.1, g.2);
        let (mut e, mut g) = (e.clone(), g.clone());
        e.5.clear();
        g.5.clear();
        assert_eq!(e, g);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_equal_an_independent_computation_from_the_generated_readings() {
    let env = TestEnv::new("sensor-ok", HandlerKind::Sensor, 3).await;
    let spec = ProduceSpec::new(HandlerKind::Sensor, 3000).seed(7);
    let events = env.produce(&spec).await;
    let mut w = env.start_worker("w-0");
    w.wait_ready().await;
    env.wait_for_offsets(3000).await;
    let stored = dump(&env.pool).await;
    let expected = independent_tables(&env.topic, &events, &stored);
    assert!(
        expected.failures.len() > 10,
        "the stream holds too few episodes"
    );
    assert_tables_match(&expected, &stored);
    assert!(w.metric("streamops_sensor_failures_opened_total") >= expected.failures.len() as f64);
    assert!(w.terminate_and_wait().success());
    env.cleanup().await;
}

/// A second world reading the same topic with its own group and database.
async fn twin(env: &TestEnv, prefix: &str) -> TestEnv {
    let (db_url, pool) = fresh_database(prefix).await;
    let group = format!("{}-{prefix}", env.group);
    let mut config = env.config.clone();
    config.kafka.group_id = group.clone();
    let dir = env.dir.join(prefix);
    std::fs::create_dir_all(&dir).unwrap();
    TestEnv {
        db_url,
        pool,
        topic: env.topic.clone(),
        error_topic: env.error_topic.clone(),
        group,
        config,
        dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_are_identical_whether_the_stream_ran_in_one_go_or_through_kills_restarts_and_rebalances(
) {
    let mut env = TestEnv::new("sensor-kill", HandlerKind::Sensor, 3).await;
    env.config.batch.max_messages = 50;
    env.config.batch.max_wait_ms = 20;
    let total = 5000u64;
    let spec = ProduceSpec::new(HandlerKind::Sensor, total)
        .seed(29)
        .rate(1200);
    let producer = {
        let topic = env.topic.clone();
        let spec = spec.clone();
        tokio::spawn(async move { produce_events(&topic, &spec).await })
    };

    // Interrupted run: SIGKILL, restart, a second member joining, then leaving. w-0 is a static
    // member, as the operator runs it, so each restart is a container restart in its pod; w-1 is
    // dynamic and leaves the group when it stops.
    let mut w0 = env.start_static_worker("w-0");
    w0.wait_ready().await;
    env.wait_for_offsets(800).await;
    w0.kill();
    assert!(
        env.applied_offsets().await < total as i64,
        "the kill was not mid-stream"
    );
    let mut w0 = env.start_static_worker("w-0");
    w0.wait_ready().await;
    env.wait_for_offsets(2000).await;
    let mut w1 = env.start_worker("w-1");
    w1.wait_ready().await;
    env.wait_for_offsets(3000).await;
    w0.kill();
    let mut w0 = env.start_static_worker("w-0");
    w0.wait_ready().await;
    env.wait_for_offsets(3800).await;
    assert!(w1.terminate_and_wait().success());
    let events = producer.await.expect("producer task");
    env.wait_for_offsets(total as i64).await;
    assert!(w0.terminate_and_wait().success());

    // Uninterrupted run of the same topic into another database.
    let clean = twin(&env, "clean").await;
    let mut c = clean.start_worker("c-0");
    c.wait_ready().await;
    clean.wait_for_offsets(total as i64).await;
    assert!(c.terminate_and_wait().success());

    let interrupted = dump(&env.pool).await;
    let uninterrupted = dump(&clean.pool).await;
    assert_eq!(
        interrupted.readings.len(),
        total as usize,
        "missing or duplicate readings"
    );
    assert_eq!(interrupted, uninterrupted, "tables differ between the runs");
    assert_tables_match(
        &independent_tables(&env.topic, &events, &interrupted),
        &interrupted,
    );
    clean.cleanup().await;
    env.cleanup().await;
}

async fn send_raw(topic: &str, messages: &[(&str, String)]) {
    let producer: FutureProducer = KafkaClientSettings::plaintext(BROKER)
        .reliable_producer()
        .set("linger.ms", "0")
        .set("batch.num.messages", "1")
        .create()
        .expect("producer");
    for (key, value) in messages {
        producer
            .send(
                FutureRecord::to(topic).key(*key).payload(value.as_str()),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("delivered");
    }
}

fn reading(machine: &str, second: u32, failure: bool) -> (&str, String) {
    (
        machine,
        format!(
            r#"{{"machine_id": "{machine}", "timestamp": "2024-03-20T10:{:02}:{:02}Z", "readings": {{"temperature": 70.5}}, "failure": {failure}}}"#,
            second / 60,
            second % 60
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_readings_are_stored_marked_late_and_linked_to_the_episode_covering_their_time() {
    let env = TestEnv::new("sensor-late", HandlerKind::Sensor, 1).await;
    let t = &env.topic;
    send_raw(
        t,
        &[
            reading("m", 10, false), // 0
            reading("m", 20, true),  // 1 opens F1 at :20
            reading("m", 15, true),  // 2 late, before F1: no episode, opens nothing
            reading("m", 30, true),  // 3 in F1
            reading("m", 25, false), // 4 late, inside F1: linked, closes nothing
            reading("m", 40, false), // 5 closes F1 at :40
            reading("m", 35, true),  // 6 late, inside [:20, :40): linked to F1
            reading("m", 5, false),  // 7 late, lowers first_seen
            reading("m", 40, true),  // 8 same time as the latest: in order, opens F2
            reading("m", 45, false), // 9 closes F2
            reading("m", 41, true),  // 10 late inside F2
            reading("m", 50, true),  // 11 opens F3 (still open)
        ],
    )
    .await;
    let mut w = env.start_worker("w-0");
    w.wait_ready().await;
    env.wait_for_offsets(12).await;
    let d = dump(&env.pool).await;
    let f1 = format!("{t}:0:1");
    let f2 = format!("{t}:0:8");
    let f3 = format!("{t}:0:11");
    let links: Vec<(i64, Option<String>, bool)> =
        d.readings.iter().map(|r| (r.2, r.7.clone(), r.8)).collect();
    assert_eq!(
        links,
        vec![
            (0, None, false),
            (1, Some(f1.clone()), false),
            (2, None, true),
            (3, Some(f1.clone()), false),
            (4, Some(f1.clone()), true),
            (5, None, false),
            (6, Some(f1.clone()), true),
            (7, None, true),
            (8, Some(f2.clone()), false),
            (9, None, false),
            (10, Some(f2.clone()), true),
            (11, Some(f3.clone()), false),
        ]
    );
    assert_eq!(
        d.failures,
        vec![
            (
                f1,
                "m".into(),
                ts("2024-03-20T10:00:20Z"),
                Some(ts("2024-03-20T10:00:40Z")),
                false
            ),
            (f3, "m".into(), ts("2024-03-20T10:00:50Z"), None, true),
            (
                f2,
                "m".into(),
                ts("2024-03-20T10:00:40Z"),
                Some(ts("2024-03-20T10:00:45Z")),
                false
            ),
        ]
    );
    assert_eq!(
        d.machines,
        vec![(
            "m".into(),
            ts("2024-03-20T10:00:05Z"),
            ts("2024-03-20T10:00:50Z")
        )]
    );
    assert_eq!(
        w.metric("streamops_sensor_readings_total{order=\"late\"}"),
        5.0
    );
    assert!(w.terminate_and_wait().success());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_readings_land_in_the_error_topic_with_their_reasons_and_valid_ones_in_postgres() {
    let env = TestEnv::new("sensor-poison", HandlerKind::Sensor, 3).await;
    let spec = ProduceSpec::new(HandlerKind::Sensor, 2000)
        .seed(5)
        .poison(10.0);
    let events = env.produce(&spec).await;
    let poison: Vec<&Generated> = events.iter().filter(|g| g.poison.is_some()).collect();
    assert!(poison.len() > 100, "the generator made too little poison");
    let mut w = env.start_worker("w-0");
    w.wait_ready().await;
    env.wait_for_offsets(events.len() as i64).await;

    assert_eq!(
        env.count("sensor_readings").await,
        (events.len() - poison.len()) as i64
    );
    assert_eq!(env.count("streamops_rejections").await, poison.len() as i64);
    let stored = dump(&env.pool).await;
    assert_tables_match(&independent_tables(&env.topic, &events, &stored), &stored);

    let records = env.consume_error_topic(poison.len());
    assert_eq!(records.len(), poison.len(), "error topic count");
    let mut expected: HashMap<String, usize> = HashMap::new();
    for g in &poison {
        *expected
            .entry(g.poison.unwrap().expected_reason().into())
            .or_default() += 1;
    }
    let mut got: HashMap<String, usize> = HashMap::new();
    for r in &records {
        let reason = header(r, "streamops.error.reason").expect("reason header");
        let detail = header(r, "streamops.error.detail").expect("detail header");
        match reason.as_str() {
            "missing_field" => assert_eq!(detail, "missing field `machine_id`"),
            "wrong_type" => assert_eq!(
                detail,
                "field `readings.temperature` must be a number, got a string"
            ),
            "invalid_value" => assert!(detail.contains("not finite"), "{detail}"),
            _ => {}
        }
        *got.entry(reason).or_default() += 1;
    }
    assert_eq!(expected, got);
    assert!(w.terminate_and_wait().success());
    env.cleanup().await;
}

/// Builds a handler on `pool` (migrations applied).
fn handler(pool: &PgPool) -> SensorHandler {
    let spec = StreamConsumerSpec::example(HandlerKind::Sensor);
    let config = WorkerConfig::from_spec("sensor-direct", None, &spec).unwrap();
    let ctx = HandlerContext {
        config: Arc::new(config),
        pool: pool.clone(),
        redis_url: None,
        registry: prometheus::Registry::new(),
        shutdown: tokio_util::sync::CancellationToken::new(),
        instance_id: None,
    };
    SensorHandler::new(&ctx, &Default::default()).unwrap()
}

async fn write(h: &mut SensorHandler, pool: &PgPool, batch: &[Decoded<Reading>], commit: bool) {
    let mut tx = pool.begin().await.unwrap();
    h.write(&mut tx, batch).await.unwrap();
    if commit {
        tx.commit().await.unwrap();
        h.committed().await.unwrap();
    } else {
        tx.rollback().await.unwrap();
        h.reset();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_recovered_after_rollbacks_restarts_revocations_and_replays_gives_the_same_tables() {
    require_services();
    let topic: Arc<str> = Arc::from("readings");
    let batch: Vec<Decoded<Reading>> = ProduceSpec::new(HandlerKind::Sensor, 600)
        .seed(3)
        .events()
        .iter()
        .enumerate()
        .map(|(i, g)| Decoded {
            pos: Position {
                topic: topic.clone(),
                partition: (i % 2) as i32,
                offset: i as i64,
            },
            timestamp_ms: None,
            item: decode_reading(&g.payload).unwrap(),
        })
        .collect();
    let (_, one) = fresh_database("sensor-direct-a").await;
    let (_, many) = fresh_database("sensor-direct-b").await;
    for p in [&one, &many] {
        streamops_worker::db::MIGRATOR.run(p).await.unwrap();
    }
    let mut h = handler(&one);
    write(&mut h, &one, &batch, true).await;

    let mut h = handler(&many);
    for (i, chunk) in batch.chunks(37).enumerate() {
        if i % 3 == 1 {
            // A failed transaction: rolled back, state reset, then retried.
            write(&mut h, &many, chunk, false).await;
        }
        if i % 4 == 2 {
            // A restart: a fresh handler with nothing in memory.
            h = handler(&many);
        }
        if i % 5 == 3 {
            h.revoke(&[TopicPartition {
                topic: topic.clone(),
                partition: 1,
            }]);
        }
        write(&mut h, &many, chunk, true).await;
    }
    assert_eq!(dump(&one).await, dump(&many).await);
    assert!(!dump(&one).await.failures.is_empty());

    // Committed readings delivered again (by a fresh worker) change nothing.
    let mut h = handler(&many);
    write(&mut h, &many, &batch[500..], true).await;
    write(&mut h, &many, &batch[200..300], true).await;
    assert_eq!(dump(&one).await, dump(&many).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_reading_arriving_again_from_another_partition_is_left_alone_and_the_batch_commits(
) {
    require_services();
    let (_, pool) = fresh_database("sensor-dup").await;
    streamops_worker::db::MIGRATOR.run(&pool).await.unwrap();
    let topic: Arc<str> = Arc::from("readings");
    let at = |partition: i32, offset: i64, second: u32| Decoded {
        pos: Position {
            topic: topic.clone(),
            partition,
            offset,
        },
        timestamp_ms: None,
        item: decode_reading(reading("m", second, false).1.as_bytes()).unwrap(),
    };
    let mut h = handler(&pool);
    write(&mut h, &pool, &[at(0, 0, 9), at(1, 0, 9)], true).await;
    // A fresh worker gets partition 0's first reading again: not a replay of the machine's last
    // partition, in order (same time as the latest), and already stored.
    let mut h = handler(&pool);
    write(&mut h, &pool, &[at(0, 0, 9), at(0, 1, 10)], true).await;
    let offsets: Vec<(i32, i64)> = dump(&pool)
        .await
        .readings
        .iter()
        .map(|r| (r.1, r.2))
        .collect();
    assert_eq!(offsets, vec![(0, 0), (0, 1), (1, 0)]);
}
