//! The fuzz corpus replayed in the normal test suite: every payload of the committed seeds
//! (`fuzz/seeds/<target>/`, which hold hostile inputs — U+0000 in values and keys, lone
//! surrogates, extreme numbers, sizes, field counts and nesting, and every input a fuzzer run
//! found a bug with) and of the corpus `make fuzz` grew (`.dev/fuzz/corpus/`, when present) is
//! checked by the fuzz targets' own assertions (`fuzz/src/oracle.rs`, included here). Whatever a
//! handler's decoder accepts is then written by the handler into a real PostgreSQL database and
//! committed, one message per transaction, and must commit. So a decoder that panics, or lets
//! through a value PostgreSQL refuses, fails here, naming the file.
//!
//! The decoders' tests need PostgreSQL (they fail loudly without it); the others do not.

mod support;

#[path = "../../fuzz/src/oracle.rs"]
mod oracle;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sqlx::PgPool;
use streamops_crds::{HandlerKind, StreamConsumerSpec, WorkerConfig};
use streamops_worker::handlers::fraud::{FraudHandler, FraudItem, Prediction};
use streamops_worker::handlers::moving_average::MovingAverageHandler;
use streamops_worker::handlers::sensor::SensorHandler;
use streamops_worker::handlers::{Decoded, HandlerContext, MessageHandler, Position};
use support::*;

/// The committed seeds of all targets together stay below this many bytes (only minimized,
/// interesting inputs are committed; the grown corpus stays in `.dev/`).
const MAX_SEED_BYTES: u64 = 256 * 1024;
/// No committed seed is larger than this.
const MAX_SEED_FILE_BYTES: u64 = 64 * 1024;
/// No target has more committed seeds than this.
const MAX_SEEDS_PER_TARGET: usize = 64;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The payloads of a fuzz target: committed seeds and the grown corpus, sorted by path. Panics
/// when fewer than `min` are found (the seeds are missing).
fn corpus(target: &str, min: usize) -> Vec<(PathBuf, Vec<u8>)> {
    let root = root();
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
        files.len() >= min,
        "the seeds of {target} are missing: found {} files",
        files.len()
    );
    files
}

/// Runs `f`, one fuzz check of the file at `path`; a panic is re-raised naming the file.
fn check<T>(path: &Path, f: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(e) => {
            let text = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{} fails its fuzz check: {text}", path.display())
        }
    }
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
    for (i, (path, bytes)) in corpus("decode_price", 5).into_iter().enumerate() {
        match check(&path, || oracle::price(&bytes)) {
            Some(p) => accepted.push((path, decoded(i as i64, p))),
            None => rejected += 1,
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
    for (i, (path, bytes)) in corpus("decode_sensor", 5).into_iter().enumerate() {
        match check(&path, || oracle::sensor(&bytes)) {
            Some(r) => accepted.push((path, decoded(i as i64, r))),
            None => rejected += 1,
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
    let mut accepted = Vec::new();
    let mut rejected = 0;
    for (i, (path, bytes)) in corpus("decode_transaction", 5).into_iter().enumerate() {
        match check(&path, || oracle::transaction(&bytes, oracle::reference())) {
            Some(t) => {
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
            None => rejected += 1,
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

#[test]
fn every_record_timestamp_in_the_corpus_decodes_or_is_rejected_with_a_reason() {
    let (mut accepted, mut rejected) = (0, 0);
    for (path, bytes) in corpus("decode_transaction_record", 4) {
        match check(&path, || oracle::transaction_record(&bytes)) {
            Some(_) => accepted += 1,
            None => rejected += 1,
        }
    }
    assert!(
        accepted >= 1 && rejected >= 1,
        "{accepted} accepted, {rejected} rejected"
    );
}

#[test]
fn every_pipeline_event_in_the_corpus_is_an_object_within_the_limits_or_is_rejected() {
    let (mut accepted, mut rejected) = (0, 0);
    for (path, bytes) in corpus("decode_pipeline_event", 5) {
        if check(&path, || oracle::pipeline_event(&bytes)) {
            accepted += 1;
        } else {
            rejected += 1;
        }
    }
    assert!(
        accepted >= 1 && rejected >= 3,
        "{accepted} accepted, {rejected} rejected"
    );
}

#[test]
fn every_manifest_in_the_corpus_fails_or_derives_a_configuration_that_round_trips() {
    let derived = corpus("spec_to_config", 4)
        .into_iter()
        .filter(|(path, bytes)| check(path, || oracle::spec_to_config(bytes)))
        .count();
    assert!(
        derived >= 4,
        "only {derived} manifests derived a configuration"
    );
}

#[test]
fn the_committed_seeds_stay_small() {
    let seeds = root().join("fuzz/seeds");
    let mut total = 0;
    let targets = std::fs::read_dir(&seeds).expect("fuzz/seeds exists");
    for dir in targets.flatten() {
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .expect("a seed directory")
            .flatten()
            .collect();
        assert!(
            files.len() <= MAX_SEEDS_PER_TARGET,
            "{} holds {} seeds; commit only minimized, interesting inputs (at most {MAX_SEEDS_PER_TARGET})",
            dir.path().display(),
            files.len()
        );
        for f in files {
            let len = f.metadata().expect("seed metadata").len();
            assert!(
                len <= MAX_SEED_FILE_BYTES,
                "{} is {len} bytes; minimize it (`cargo fuzz tmin`) below {MAX_SEED_FILE_BYTES}",
                f.path().display()
            );
            total += len;
        }
    }
    assert!(
        total <= MAX_SEED_BYTES,
        "the seeds hold {total} bytes; at most {MAX_SEED_BYTES}"
    );
}
