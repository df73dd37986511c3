//! A broker that freezes (SIGSTOP, as a long GC or controller stall does) while an idempotent
//! producer has messages in flight: once it resumes, sends must succeed again within a bound.
//!
//! Each test starts a broker of its own ([`support::own_broker`]; freezing the shared
//! development broker would break every other test).
//! `STREAMOPS_TEST_RDKAFKA_DEBUG=eos,msg,protocol,broker` prints librdkafka's debug log (with
//! `--nocapture`); `STREAMOPS_TEST_FREEZE_SECS` sets the freeze (12 s by default).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::producer::Producer;
use rdkafka::ClientConfig;
use streamops_test_support::BROKER;
use streamops_worker::errortopic::{ErrorRecord, ErrorSink};
use streamops_worker::handlers::{RawMessage, RejectKind, Rejection};
use streamops_worker::kafka::KafkaClientSettings;

mod support;

use support::own_broker::OwnBroker;

/// Longest time from the broker's resume to a successful send (a correctness bound: a healthy
/// producer needs a few seconds; a wedged one never gets there).
const RECOVERY_BOUND: Duration = Duration::from_secs(60);

fn with_debug(mut cfg: ClientConfig) -> ClientConfig {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("RUST_LOG")
                .unwrap_or_else(|_| "librdkafka=debug,streamops_worker=info".into()),
        ))
        .with_writer(std::io::stderr)
        .try_init();
    if let Ok(d) = std::env::var("STREAMOPS_TEST_RDKAFKA_DEBUG") {
        cfg.set("debug", d).set_log_level(RDKafkaLogLevel::Debug);
    }
    cfg
}

async fn create_topic(bootstrap: &str, topic: &str, partitions: i32) {
    streamops_worker::admin::create_topic(
        &KafkaClientSettings::plaintext(bootstrap),
        topic,
        partitions,
        1,
    )
    .await
    .unwrap_or_else(|e| panic!("cannot create topic {topic}: {e}"));
}

fn poison(topic: &str, offset: i64) -> ErrorRecord {
    let msg = RawMessage {
        topic: Arc::from(topic),
        partition: 0,
        offset,
        key: Some(format!("k{offset}").into_bytes()),
        payload: Some(format!("{{not json {offset}").into_bytes()),
        timestamp_ms: None,
    };
    ErrorRecord::new(
        &msg,
        &Rejection::new(RejectKind::InvalidJson, "expected value"),
        1 << 20,
    )
}

/// Delivers `records` the way the pipeline does: retry (after a short pause) until every one is
/// acknowledged. Returns the number of attempts.
async fn deliver_until_acknowledged(sink: &ErrorSink, mut records: Vec<ErrorRecord>) -> u32 {
    let mut delivered = vec![false; records.len()];
    let mut attempts = 0;
    loop {
        attempts += 1;
        match sink.deliver(&mut records, &mut delivered).await {
            Ok(()) => return attempts,
            Err(e) => eprintln!("attempt {attempts}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads every record of `topic` (one partition) and returns their source offsets.
fn error_topic_offsets(bootstrap: &str, topic: &str) -> Vec<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", streamops_test_support::unique("freeze-read"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("a consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let (_, high) = consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .expect("watermarks");
    let mut offsets = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while (offsets.len() as i64) < high && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) {
            let source = m.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == streamops_worker::errortopic::headers::SOURCE_OFFSET)
                    .and_then(|h| h.value)
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|v| v.parse().ok())
            });
            offsets.push(source.expect("every error record names its source offset"));
        }
    }
    offsets
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_error_topic_producer_delivers_again_after_the_broker_was_frozen() {
    let broker = OwnBroker::start("freeze");
    let bootstrap = broker.bootstrap();
    let topic = "orders-failed";
    create_topic(&bootstrap, topic, 1).await;
    let mut cfg = KafkaClientSettings::plaintext(&bootstrap).reliable_producer();
    cfg.set("linger.ms", "2");
    let sink = Arc::new(
        ErrorSink::with_config(with_debug(cfg), topic, "test/freeze").expect("an error sink"),
    );
    let freeze = Duration::from_secs(
        std::env::var("STREAMOPS_TEST_FREEZE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(12),
    );

    // A steady flow of rejected batches, as under poison traffic: each batch is retried until
    // the error topic acknowledged all of it, as the pipeline does before it commits.
    let stop = Arc::new(AtomicBool::new(false));
    let batches = Arc::new(AtomicU64::new(0));
    let resumed_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let first_after_resume = Arc::new(std::sync::Mutex::new(None::<Duration>));
    let flow = {
        let (sink, stop, batches, resumed_at, first) = (
            sink.clone(),
            stop.clone(),
            batches.clone(),
            resumed_at.clone(),
            first_after_resume.clone(),
        );
        tokio::spawn(async move {
            let mut offset = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let records = (0..5).map(|i| poison("orders", offset + i)).collect();
                offset += 5;
                deliver_until_acknowledged(&sink, records).await;
                batches.fetch_add(1, Ordering::Relaxed);
                let resumed = *resumed_at.lock().expect("lock");
                if let Some(r) = resumed.filter(|r| started >= *r) {
                    first.lock().expect("lock").get_or_insert(r.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            offset
        })
    };
    let start = Instant::now();
    while batches.load(Ordering::Relaxed) < 20 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "nothing delivered before the freeze"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resumed = broker.freeze(freeze).await;
    *resumed_at.lock().expect("lock") = Some(resumed);
    while first_after_resume.lock().expect("lock").is_none() && resumed.elapsed() < RECOVERY_BOUND {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let recovered = *first_after_resume.lock().expect("lock");
    assert!(
        recovered.is_some(),
        "no batch begun after the broker resumed was acknowledged within {RECOVERY_BOUND:?}"
    );
    stop.store(true, Ordering::Relaxed);
    let produced = flow.await.expect("the flow task");
    eprintln!("recovered {recovered:?} after the resume; {produced} records produced");

    // Nothing lost: every record is on the error topic. (A record whose delivery timed out may
    // be written twice: the error topic is at-least-once, `streamops_rejections` is the exact
    // record.)
    let mut offsets = error_topic_offsets(&bootstrap, topic);
    offsets.sort_unstable();
    offsets.dedup();
    assert_eq!(
        offsets,
        (0..produced).collect::<Vec<_>>(),
        "records missing from the error topic"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_topic_producer_with_a_fatal_error_is_replaced_and_delivers() {
    streamops_test_support::kafka::require_broker();
    let topic = streamops_test_support::unique("fatal-failed");
    streamops_test_support::kafka::create_topic(&topic, 1).await;
    let metrics = streamops_worker::metrics::Metrics::new();
    let sink = ErrorSink::new(
        &KafkaClientSettings::plaintext(BROKER),
        &topic,
        "test/fatal",
        1 << 20,
    )
    .expect("an error sink")
    .with_rebuild_counter(metrics.producer_rebuilds.clone());
    assert_eq!(
        deliver_until_acknowledged(&sink, vec![poison("src", 0)]).await,
        1
    );

    // What a wedged idempotent producer can come to: a fatal error, after which librdkafka
    // fails every send for the producer's lifetime.
    let producer = sink.producer();
    let reason = std::ffi::CString::new("injected by the test").expect("a C string");
    // SAFETY: the producer's handle is alive (we hold a reference); the call only raises an
    // error on it.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_test_fatal_error(
            producer.client().native_ptr(),
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
            reason.as_ptr(),
        )
    };
    assert_eq!(
        err,
        rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
    );
    assert!(producer.client().fatal_error().is_some());
    drop(producer);

    let attempts = tokio::time::timeout(
        RECOVERY_BOUND,
        deliver_until_acknowledged(&sink, vec![poison("src", 1), poison("src", 2)]),
    )
    .await
    .unwrap_or_else(|_| panic!("nothing delivered within {RECOVERY_BOUND:?} of the fatal error"));
    assert_eq!(attempts, 2, "one failed attempt, then the fresh producer");
    assert_eq!(
        metrics
            .producer_rebuilds
            .with_label_values(&[streamops_worker::errortopic::REBUILD_PURPOSE])
            .get(),
        1
    );
    assert!(sink.producer().client().fatal_error().is_none());
    let mut offsets = error_topic_offsets(BROKER, &topic);
    offsets.sort_unstable();
    assert_eq!(offsets, vec![0, 1, 2]);
    streamops_test_support::kafka::delete_topic(&topic).await;
}

/// Every record of `topic` (all `partitions`), read from the beginning up to the high watermarks.
fn read_all(bootstrap: &str, topic: &str, partitions: i32) -> Vec<Vec<u8>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", streamops_test_support::unique("gen-read"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("a consumer");
    let mut tpl = TopicPartitionList::new();
    let mut total = 0;
    for p in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .expect("watermarks");
        total += high - low;
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("a partition");
    }
    consumer.assign(&tpl).expect("assign");
    let mut payloads = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while (payloads.len() as i64) < total && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => payloads.push(m.payload().unwrap_or_default().to_vec()),
            Some(Err(e)) => eprintln!("read: {e}"),
            None => {}
        }
    }
    assert_eq!(
        payloads.len() as i64,
        total,
        "could not read the topic back"
    );
    payloads
}

/// The load generator's run spans a freeze longer than the broker's session (so the controller
/// fences it when it runs again) with a message timeout shorter than the freeze: the requests
/// already sent when the broker stopped are appended when it resumes, after their messages timed
/// out. The generator must count those as written rather than send them again, and send the
/// others: the topic holds every generated message exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generator_writes_each_message_exactly_once_across_a_freeze_that_outlasts_its_timeout()
{
    use streamops_crds::HandlerKind;
    use streamops_worker::generate::{GenOptions, Generator};
    use streamops_worker::produce::{produce, ProduceOptions};

    let broker = OwnBroker::start("gen-freeze");
    let bootstrap = broker.bootstrap();
    let topic = "gen-input";
    let partitions = 3;
    create_topic(&bootstrap, topic, partitions).await;
    let freeze = Duration::from_secs(
        std::env::var("STREAMOPS_TEST_FREEZE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(12),
    );
    let opts = ProduceOptions {
        topic: topic.into(),
        count: 6000,
        rate: 400,
        gen: GenOptions {
            kind: HandlerKind::PipelineTrigger,
            seed: 7,
            keys: 12,
            poison_percent: 0.0,
            max_message_bytes: 1 << 20,
        },
        // Shorter than the freeze: the messages in flight when it begins time out during it.
        message_timeout: Duration::from_secs(4),
    };
    let expected: Vec<Vec<u8>> = Generator::new(opts.gen.clone())
        .take(opts.count as usize)
        .map(|g| g.payload)
        .collect();
    let mut distinct = expected.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), expected.len(), "generated payloads repeat");

    let settings = KafkaClientSettings::plaintext(&bootstrap);
    // Sets up the log subscriber (the generator logs each round it ends).
    let _ = with_debug(ClientConfig::new());
    let run = {
        let opts = opts.clone();
        tokio::spawn(async move { produce(&settings, &opts).await })
    };
    // Let it deliver for a while, then freeze the broker mid-stream.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!run.is_finished(), "the run ended before the freeze");
    broker.freeze(freeze).await;
    let summary = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("the run ends within 600 s")
        .expect("the produce task")
        .expect("the run succeeds");
    eprintln!("generator: {summary}");
    assert_eq!(summary.failed, 0, "{summary}");
    assert!(
        summary.rebuilds >= 1,
        "no round ended during the freeze, so the test proved nothing: {summary}"
    );
    assert!(
        summary.written_unacknowledged >= 1,
        "no message was written without its acknowledgement, so the test proved nothing: {summary}"
    );

    let mut found = read_all(&bootstrap, topic, partitions);
    let records = found.len();
    found.sort();
    let mut doubled = found.clone();
    doubled.dedup();
    let duplicates = records - doubled.len();
    let missing = distinct
        .iter()
        .filter(|p| found.binary_search(p).is_err())
        .count();
    assert_eq!(
        (records, duplicates, missing),
        (expected.len(), 0, 0),
        "(records, duplicated, missing) in the topic after {summary}"
    );
    assert_eq!(found, distinct);
}
