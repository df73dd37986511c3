//! Faults of the group coordinator that the local broker will not produce on demand, played by
//! librdkafka's mock cluster (`rdkafka::mocking`): a lag reading while the coordinator of the
//! group is loading or has moved.
//!
//! librdkafka 2.12 answers such an OffsetFetch error by asking the client's own consumer group to
//! look the coordinator up again; a client created without a `group.id` has none, and the process
//! crashed (a null dereference in `rd_kafka_cgrp_op`). The lag client therefore carries a group
//! of its own that it never joins. Without it, this test binary dies of SIGSEGV.

use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use streamops_crds::v1alpha1::{AutoOffsetReset, SecurityProtocol};
use streamops_operator::lag::{KafkaLagReader, LagReader, LagTarget};

fn target(bootstrap: String, topic: &str) -> LagTarget {
    LagTarget {
        bootstrap_servers: bootstrap,
        group_id: "orders".into(),
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
async fn a_reading_while_the_coordinator_loads_or_moves_returns_instead_of_crashing() {
    let cluster = MockCluster::new(1).expect("librdkafka mock cluster");
    cluster.create_topic("events", 2, 1).expect("mock topic");
    let reader = KafkaLagReader::with_timeout(Duration::from_secs(5));
    let target = target(cluster.bootstrap_servers(), "events");

    for error in [
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
    ] {
        cluster.request_errors(RDKafkaApiKey::OffsetFetch, &[error, error]);
        // The reading may fail or succeed after a retry; what matters is that it returns.
        let result = reader.read(&target).await;
        if let Ok(lag) = &result {
            assert_eq!(lag.partitions, 2, "{error:?}: {lag:?}");
        }
        cluster.clear_request_errors(RDKafkaApiKey::OffsetFetch);
    }

    // Once the coordinator answers again, the reading succeeds: nothing committed, nothing
    // produced, so no lag on either partition.
    let lag = reader
        .read(&target)
        .await
        .expect("a reading after the fault");
    assert_eq!((lag.total, lag.partitions), (0, 2), "{lag:?}");
}
