//! The fuzz corpus written through PostgreSQL: every payload of the fuzz seeds (`fuzz/seeds/`, which
//! hold hostile inputs: U+0000 in values and keys, lone surrogates, extreme numbers, sizes, field
//! counts and nesting) and of the corpus `make fuzz` grew (`.dev/fuzz/corpus/`, when present) is
//! decoded by its handler's decoder; whatever the decoder accepts is written by the handler into
//! a real PostgreSQL database and committed, one message per transaction, and must commit. So a
//! decoder that lets through a value PostgreSQL refuses fails here, naming the file.
//!
//! Needs PostgreSQL (fails loudly without it).

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use streamops_crds::{HandlerKind, StreamConsumerSpec, WorkerConfig};
use streamops_worker::handlers::fraud::{decode_transaction, FraudHandler, FraudItem, Prediction};
use streamops_worker::handlers::moving_average::{decode_price, MovingAverageHandler};
use streamops_worker::handlers::sensor::{decode_reading, SensorHandler};
use streamops_worker::handlers::{Decoded, HandlerContext, MessageHandler, Position};
use support::*;

/// The payloads of a fuzz target: committed seeds and the grown corpus, sorted by path.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for dir in [
        root.join("fuzz/seeds").join(target),
        root.join(".dev/fuzz/corpus").join(target),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_file() {
                let bytes = std::fs::read(&path)
                    .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
                files.push((path, bytes));
            }
        }
    }
    files.sort();
    assert!(
        files.len() >= 5,
        "the seeds of {target} are missing: found {} files",
        files.len()
    );
    files
}

fn context(pool: &PgPool, kind: HandlerKind) -> HandlerContext {
    let spec = StreamConsumerSpec::example(kind);
    let config = WorkerConfig::from_spec("fuzz-corpus", None, &spec).expect("example spec");
    HandlerContext {
        config: Arc::new(config),
        pool: pool.clone(),
        redis_url: None,
        registry: prometheus::Registry::new(),
        shutdown: tokio_util::sync::CancellationToken::new(),
        instance_id: None,
    }
}

async fn database(prefix: &str) -> PgPool {
    require_postgres();
    let (_, pool) = fresh_database(prefix).await;
    streamops_worker::db::MIGRATOR
        .run(&pool)
        .await
        .expect("migrations apply");
    pool
}

/// PostgreSQL only (these tests need no broker).
fn require_postgres() {
    let sock = PG_HOST.parse().expect("valid address");
    if std::net::TcpStream::connect_timeout(&sock, std::time::Duration::from_secs(3)).is_err() {
        panic!("PostgreSQL is not reachable at {PG_HOST}; start it (`make dev-up`)");
    }
}

fn decoded<T>(offset: i64, item: T) -> Decoded<T> {
    Decoded {
        pos: Position {
            topic: Arc::from("fuzz-corpus"),
            partition: 0,
            offset,
        },
        timestamp_ms: None,
        item,
    }
}

/// Writes each item in its own committed transaction; panics naming the first file PostgreSQL
/// refused. Returns how many were written.
async fn write_each<H: MessageHandler>(
    handler: &mut H,
    pool: &PgPool,
    items: Vec<(PathBuf, Decoded<H::Item>)>,
) -> usize {
    let n = items.len();
    for (path, item) in items {
        let mut tx = pool.begin().await.expect("begin");
        let written = handler.write(&mut tx, std::slice::from_ref(&item)).await;
        let committed = match written {
            Ok(()) => tx.commit().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = committed {
            panic!(
                "the decoder accepted {} but PostgreSQL refused it: {e}",
                path.display()
            );
        }
        handler.committed().await.expect("post-commit hook");
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_price_event_the_decoder_accepts_is_written_by_postgresql() {
    let pool = database("fuzz-price").await;
    let mut accepted = Vec::new();
    let mut rejected = 0;
    for (i, (path, bytes)) in corpus("decode_price").into_iter().enumerate() {
        match decode_price(&bytes) {
            Ok(p) => accepted.push((path, decoded(i as i64, p))),
            Err(_) => rejected += 1,
        }
    }
    assert!(
        accepted.len() >= 5 && rejected >= 5,
        "{} accepted, {rejected} rejected",
        accepted.len()
    );
    let n = accepted.len();
    let mut handler = MovingAverageHandler::with_window(2);
    assert_eq!(write_each(&mut handler, &pool, accepted).await, n);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM price_points")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, n as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sensor_reading_the_decoder_accepts_is_written_by_postgresql() {
    let pool = database("fuzz-sensor").await;
    let mut accepted = Vec::new();
    let mut rejected = 0;
    for (i, (path, bytes)) in corpus("decode_sensor").into_iter().enumerate() {
        match decode_reading(&bytes) {
            Ok(r) => accepted.push((path, decoded(i as i64, r))),
            Err(_) => rejected += 1,
        }
    }
    assert!(
        accepted.len() >= 5 && rejected >= 5,
        "{} accepted, {rejected} rejected",
        accepted.len()
    );
    let n = accepted.len();
    let ctx = context(&pool, HandlerKind::Sensor);
    let mut handler = SensorHandler::new(&ctx, &Default::default()).expect("handler");
    assert_eq!(write_each(&mut handler, &pool, accepted).await, n);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM sensor_readings")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, n as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transaction_the_decoder_accepts_is_written_by_postgresql() {
    let pool = database("fuzz-fraud").await;
    let reference = DateTime::<Utc>::from_timestamp(1_710_930_600, 0).unwrap();
    let mut accepted = Vec::new();
    let mut rejected = 0;
    for (i, (path, bytes)) in corpus("decode_transaction").into_iter().enumerate() {
        match decode_transaction(&bytes, reference) {
            Ok(t) => {
                // Each file is its own transaction: make the ids unique so none is deduplicated.
                let mut t = t;
                t.transaction_id = format!("{i}-{}", t.transaction_id);
                t.transaction_id.truncate(64);
                let item = FraudItem {
                    transaction: t,
                    prediction: Some(Prediction {
                        score: 0.5,
                        model_version: Arc::from("fuzz"),
                    }),
                };
                accepted.push((path, decoded(i as i64, item)));
            }
            Err(_) => rejected += 1,
        }
    }
    assert!(
        accepted.len() >= 4 && rejected >= 4,
        "{} accepted, {rejected} rejected",
        accepted.len()
    );
    let n = accepted.len();
    let ctx = context(&pool, HandlerKind::Fraud);
    let settings = match &ctx.config.handler {
        streamops_crds::Handler::Fraud(s) => s.clone(),
        other => panic!("not a fraud configuration: {other:?}"),
    };
    let mut handler = FraudHandler::new(&ctx, &settings).expect("handler");
    assert_eq!(write_each(&mut handler, &pool, accepted).await, n);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM transactions")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, n as i64);
}
