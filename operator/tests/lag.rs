//! Consumer-group lag of a real group on the local broker (Apache Kafka, DEVELOPERS.md): a topic
//! with 3 partitions, records produced in ordinary (multi-record, compressed) batches, offsets
//! committed for some partitions only.
//! Fails loudly when the broker is absent.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;
use streamops_crds::gap::{GapKind, GapNote};
use streamops_crds::v1alpha1::{AutoOffsetReset, SecurityProtocol};
use streamops_operator::lag::{render, GroupLag, KafkaLagReader, LagError, LagReader, LagTarget};
use support::kafka::{self, BROKER};

/// Records produced to partitions 0, 1 and 2.
const PRODUCED: [i64; 3] = [10, 20, 30];

struct Fixture {
    topic: String,
    group: String,
}

/// A fresh topic with [`PRODUCED`] records, and a group that committed offset 4 on partition 0
/// and 20 (everything) on partition 1, and nothing on partition 2.
async fn fixture() -> Fixture {
    kafka::require_broker();
    let topic = kafka::unique("operator-lag");
    let group = kafka::unique("operator-lag-group");
    kafka::create_topic(&topic, 3).await;
    let producer = kafka::producer();
    for (partition, count) in PRODUCED.iter().enumerate() {
        kafka::produce(&producer, &topic, partition as i32, *count as usize).await;
    }
    commit(&group, &topic, &[(0, 4), (1, 20)]);
    Fixture { topic, group }
}

/// Commits offsets for `group` without joining it (a consumer that never subscribes).
fn commit(group: &str, topic: &str, offsets: &[(i32, i64)]) {
    kafka::commit_offsets(group, topic, offsets);
}

fn target(f: &Fixture, reset: AutoOffsetReset) -> LagTarget {
    LagTarget {
        bootstrap_servers: BROKER.into(),
        group_id: f.group.clone(),
        topics: vec![f.topic.clone()],
        auto_offset_reset: reset,
        security_protocol: SecurityProtocol::Plaintext,
        sasl_mechanism: None,
        credentials: None,
        ssl_ca_location: None,
        workers: None,
    }
}

async fn read(target: &LagTarget) -> GroupLag {
    KafkaLagReader::default()
        .read(target)
        .await
        .unwrap_or_else(|e| panic!("cannot read the lag of {}: {e}", target.group_id))
}

/// partition -> (committed, high watermark, lag)
fn per_partition(lag: &GroupLag) -> BTreeMap<i32, (Option<i64>, i64, i64)> {
    lag.per_partition
        .iter()
        .map(|p| (p.partition, (p.committed, p.high_watermark, p.lag)))
        .collect()
}

#[tokio::test]
async fn lag_of_a_real_group_counts_uncommitted_partitions_from_the_start_or_the_end() {
    let f = fixture().await;

    let earliest = read(&target(&f, AutoOffsetReset::Earliest)).await;
    assert_eq!(
        per_partition(&earliest),
        BTreeMap::from([
            (0, (Some(4), 10, 6)),
            (1, (Some(20), 20, 0)),
            (2, (None, 30, 30)),
        ]),
        "{earliest:#?}"
    );
    assert_eq!(earliest.total, 36);
    assert_eq!(earliest.max_partition_lag, 30);
    assert_eq!(earliest.partitions, 3);
    assert_eq!(earliest.members, 0, "nobody joined the group");

    let latest = read(&target(&f, AutoOffsetReset::Latest)).await;
    assert_eq!(
        per_partition(&latest),
        BTreeMap::from([
            (0, (Some(4), 10, 6)),
            (1, (Some(20), 20, 0)),
            (2, (None, 30, 0)),
        ]),
        "{latest:#?}"
    );
    assert_eq!((latest.total, latest.max_partition_lag), (6, 6));

    // More records and a commit move the figures exactly.
    kafka::produce(&kafka::producer(), &f.topic, 1, 5).await;
    commit(&f.group, &f.topic, &[(2, 25)]);
    let later = read(&target(&f, AutoOffsetReset::Earliest)).await;
    assert_eq!(
        per_partition(&later),
        BTreeMap::from([
            (0, (Some(4), 10, 6)),
            (1, (Some(20), 25, 5)),
            (2, (Some(25), 30, 5)),
        ])
    );
    assert_eq!((later.total, later.max_partition_lag), (16, 6));
    kafka::delete_topic(&f.topic).await;
}

#[tokio::test]
async fn a_group_that_never_committed_has_all_of_its_topics_as_lag_under_earliest() {
    let f = fixture().await;
    let fresh = LagTarget {
        group_id: kafka::unique("operator-lag-nobody"),
        ..target(&f, AutoOffsetReset::Earliest)
    };
    let lag = read(&fresh).await;
    assert_eq!(lag.total, PRODUCED.iter().sum::<i64>());
    assert!(lag.per_partition.iter().all(|p| p.committed.is_none()));
    let lag = read(&LagTarget {
        auto_offset_reset: AutoOffsetReset::Latest,
        ..fresh
    })
    .await;
    assert_eq!(lag.total, 0);
    assert_eq!(
        lag.uncommitted, 3,
        "a zero lag without commits is not \"no work\""
    );
    kafka::delete_topic(&f.topic).await;
}

#[tokio::test]
async fn a_gap_a_worker_attached_to_its_commit_is_read_with_the_lag() {
    let f = fixture().await;
    let note = GapNote {
        kind: GapKind::Retention,
        from: 2,
        to: 7,
        skipped: true,
        detected_at: 1_733_000_000,
    };
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", BROKER)
        .set("group.id", &f.group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("a consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&f.topic, 2, Offset::Offset(7))
        .unwrap();
    tpl.find_partition(&f.topic, 2)
        .expect("the partition")
        .set_metadata(note.to_string());
    consumer.commit(&tpl, CommitMode::Sync).expect("commit");
    let lag = read(&target(&f, AutoOffsetReset::Earliest)).await;
    assert_eq!(lag.gaps.len(), 1, "{lag:#?}");
    assert_eq!((lag.gaps[0].partition, lag.gaps[0].note), (2, note));
    kafka::delete_topic(&f.topic).await;
}

#[tokio::test]
async fn readings_of_every_group_on_a_cluster_share_one_client_and_keep_groups_apart() {
    let f = fixture().await;
    let reader = KafkaLagReader::with_timeout(Duration::from_secs(5));
    let t = target(&f, AutoOffsetReset::Earliest);
    for _ in 0..3 {
        reader.read(&t).await.expect("lag");
    }
    assert_eq!(reader.clients().len(), 1);
    let other = LagTarget {
        group_id: kafka::unique("operator-lag-other"),
        ..t.clone()
    };
    commit(&other.group_id, &f.topic, &[(2, 7)]);
    let other_lag = reader.read(&other).await.expect("lag");
    assert_eq!(
        reader.clients().len(),
        1,
        "a second group on the same cluster uses the same client"
    );
    // Each reading sees its own group's commits, whatever the shared client read before.
    assert_eq!(
        per_partition(&other_lag),
        BTreeMap::from([
            (0, (None, 10, 10)),
            (1, (None, 20, 20)),
            (2, (Some(7), 30, 23))
        ])
    );
    let again = reader.read(&t).await.expect("lag");
    assert_eq!(
        per_partition(&again),
        BTreeMap::from([
            (0, (Some(4), 10, 6)),
            (1, (Some(20), 20, 0)),
            (2, (None, 30, 30))
        ])
    );
    assert_eq!(
        reader.clients().available(),
        streamops_operator::lag::DEFAULT_MAX_IN_FLIGHT,
        "every permit came back"
    );
    kafka::delete_topic(&f.topic).await;
}

#[tokio::test]
async fn a_batch_of_readings_on_one_cluster_gives_each_group_its_own_reading() {
    let f = fixture().await;
    // A second topic, read by one of the groups together with the fixture's.
    let second = kafka::unique("operator-lag-second");
    kafka::create_topic(&second, 1).await;
    kafka::produce(&kafka::producer(), &second, 0, 5).await;
    let reader = KafkaLagReader::with_timeout(Duration::from_secs(5));
    let earliest = target(&f, AutoOffsetReset::Earliest);
    let other = LagTarget {
        group_id: kafka::unique("operator-lag-other"),
        ..earliest.clone()
    };
    commit(&other.group_id, &f.topic, &[(2, 7)]);
    let both_topics = LagTarget {
        group_id: kafka::unique("operator-lag-both"),
        topics: vec![f.topic.clone(), second.clone()],
        ..earliest.clone()
    };
    commit(&both_topics.group_id, &second, &[(0, 2)]);
    let missing = LagTarget {
        group_id: kafka::unique("operator-lag-missing"),
        topics: vec![kafka::unique("no-such-topic")],
        ..earliest.clone()
    };
    let latest = target(&f, AutoOffsetReset::Latest);
    let batch = [
        earliest.clone(),
        other.clone(),
        missing.clone(),
        both_topics.clone(),
        latest.clone(),
    ];

    let together = reader.read_many(&batch).await;
    assert_eq!(together.len(), batch.len());
    for (t, r) in batch.iter().zip(&together) {
        let alone = reader.read(t).await;
        match (r, alone) {
            (Ok(r), Ok(alone)) => assert_eq!(
                (per_partition(r), r.total, r.uncommitted, r.members),
                (
                    per_partition(&alone),
                    alone.total,
                    alone.uncommitted,
                    alone.members
                ),
                "{}: the batch reads what a reading of its own reads",
                t.group_id
            ),
            (Err(r), Err(alone)) => assert_eq!(r.to_string(), alone.to_string()),
            (r, alone) => panic!("{}: batch {r:?}, alone {alone:?}", t.group_id),
        }
    }
    assert_eq!(
        per_partition(together[1].as_ref().unwrap()),
        BTreeMap::from([
            (0, (None, 10, 10)),
            (1, (None, 20, 20)),
            (2, (Some(7), 30, 23))
        ]),
        "each group's own commits"
    );
    assert!(
        matches!(&together[2], Err(LagError::Topic { .. })),
        "only the group of the missing topic fails: {:?}",
        together[2]
    );
    let both = together[3].as_ref().unwrap();
    assert_eq!((both.partitions, both.total, both.uncommitted), (4, 63, 3));
    assert_eq!(
        together[4].as_ref().unwrap().total,
        6,
        "latest: partitions without a commit count no lag"
    );
    assert_eq!(reader.clients().len(), 1, "one client for the cluster");
    assert_eq!(
        reader.clients().available(),
        streamops_operator::lag::DEFAULT_MAX_IN_FLIGHT,
        "every permit came back"
    );
    kafka::delete_topic(&f.topic).await;
    kafka::delete_topic(&second).await;
}

/// A target on 127.0.0.1:1, where nothing listens: every request runs into its timeout.
fn unreachable(group: &str, topic: &str) -> LagTarget {
    LagTarget {
        bootstrap_servers: "127.0.0.1:1".into(),
        group_id: group.into(),
        topics: vec![topic.into()],
        auto_offset_reset: AutoOffsetReset::Earliest,
        security_protocol: SecurityProtocol::Plaintext,
        sasl_mechanism: None,
        credentials: None,
        ssl_ca_location: None,
        workers: None,
    }
}

#[tokio::test]
async fn readings_that_time_out_hold_no_more_threads_than_the_bound() {
    // Nothing answers on port 1: every request runs into its timeout.
    let reader = KafkaLagReader::new(Duration::from_millis(500), 2);
    let target = unreachable("g", "t");
    // Ten callers that give up after 50 ms, as the poller's timeout would.
    for _ in 0..10 {
        let r = tokio::time::timeout(Duration::from_millis(50), reader.read(&target)).await;
        assert!(r.is_err(), "no answer within 50 ms");
    }
    assert!(reader.clients().available() <= 2);
    assert!(
        reader.clients().len() <= 1,
        "one client for the cluster, reused"
    );
    // Once the blocking work ends, every permit is back.
    let start = std::time::Instant::now();
    while reader.clients().available() < 2 {
        assert!(start.elapsed() < Duration::from_secs(30), "permits leaked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_missing_topic_is_an_error_not_zero_lag() {
    kafka::require_broker();
    let target = LagTarget {
        bootstrap_servers: BROKER.into(),
        group_id: kafka::unique("operator-lag-missing"),
        topics: vec![kafka::unique("operator-lag-no-such-topic")],
        auto_offset_reset: AutoOffsetReset::Earliest,
        security_protocol: SecurityProtocol::Plaintext,
        sasl_mechanism: None,
        credentials: None,
        ssl_ca_location: None,
        workers: None,
    };
    let err = KafkaLagReader::default()
        .read(&target)
        .await
        .expect_err("a topic that does not exist has no lag");
    assert!(
        matches!(err, LagError::Topic { .. } | LagError::Partition { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn a_batch_on_brokers_answering_only_at_their_timeout_leaves_its_later_groups_for_the_next_turn(
) {
    // Nothing listens on port 1: every Metadata request waits for the 1 s timeout. Each group
    // reads its own topic, so none can use another's answer; the batch's budget is 2 s.
    let on = |i: usize| unreachable(&format!("g{i}"), &format!("t{i}"));
    let reader = KafkaLagReader::with_timeout(Duration::from_secs(1));
    assert_eq!(reader.batch_budget(), Duration::from_secs(2));
    let batch: Vec<LagTarget> = (0..6).map(on).collect();
    let results = reader.read_many(&batch).await;
    let reasons: Vec<&str> = results
        .iter()
        .map(|r| r.as_ref().expect_err("no broker, no lag").reason())
        .collect();
    assert_eq!(reasons[0], "KafkaError", "the first group is always tried");
    let left = results
        .iter()
        .filter(|r| {
            r.as_ref()
                .is_err_and(|e| e.to_string().contains("not read in this batch"))
        })
        .count();
    assert!(
        (1..=4).contains(&left),
        "the groups past the budget are left for their next turn: {results:?}"
    );
    assert!(
        matches!(results.last(), Some(Err(e)) if e.reason() == "ReaderFailed"),
        "the last group is never reached: {results:?}"
    );
}

#[tokio::test]
async fn unreachable_brokers_are_an_error() {
    let target = unreachable("g", "t");
    let reader = KafkaLagReader::with_timeout(Duration::from_secs(1));
    let err = reader.read(&target).await.expect_err("no broker, no lag");
    assert_eq!(err.reason(), "KafkaError", "{err}");
}

#[tokio::test]
async fn the_lag_command_prints_what_the_operator_reads() {
    let f = fixture().await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_streamops-operator"))
        .args([
            "lag",
            "--bootstrap-servers",
            BROKER,
            "--group",
            &f.group,
            "--topic",
            &f.topic,
            "--auto-offset-reset",
            "earliest",
        ])
        .output()
        .expect("the operator binary runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let target = target(&f, AutoOffsetReset::Earliest);
    assert_eq!(stdout, render(&target, &read(&target).await));
    assert!(
        stdout.contains("total lag 36, partitions 3, members 0, max partition lag 30"),
        "{stdout}"
    );

    let failed = std::process::Command::new(env!("CARGO_BIN_EXE_streamops-operator"))
        .args([
            "lag",
            "--bootstrap-servers",
            "127.0.0.1:1",
            "--group",
            "g",
            "--topic",
            "t",
            "--timeout-seconds",
            "1",
        ])
        .output()
        .expect("the operator binary runs");
    assert_eq!(failed.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&failed.stderr).contains("cannot read the lag of group g"));
    kafka::delete_topic(&f.topic).await;
}
