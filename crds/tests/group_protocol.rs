//! `spec.kafka.groupProtocol`: the consumer group protocol reaches the worker configuration.

use streamops_crds::v1alpha1::GroupProtocol;
use streamops_crds::{StreamConsumer, WorkerConfig};

#[test]
fn group_protocol_defaults_to_classic_and_is_left_out_of_the_rendered_config() {
    let sc = StreamConsumer::test();
    assert_eq!(sc.spec.kafka.group_protocol, GroupProtocol::Classic);
    let cfg = WorkerConfig::from_resource(&sc).unwrap();
    assert_eq!(cfg.kafka.group_protocol, GroupProtocol::Classic);
    let yaml = cfg.to_yaml().unwrap();
    assert!(!yaml.contains("groupProtocol"), "{yaml}");
    // A configuration rendered before the field existed still reads.
    assert_eq!(WorkerConfig::from_yaml(&yaml).unwrap(), cfg);
}

#[test]
fn consumer_group_protocol_is_carried_from_the_spec_into_the_worker_config() {
    let sc = StreamConsumer::test().with_spec(|s| s.kafka.group_protocol = GroupProtocol::Consumer);
    let cfg = WorkerConfig::from_resource(&sc).unwrap();
    assert_eq!(cfg.kafka.group_protocol, GroupProtocol::Consumer);
    let yaml = cfg.to_yaml().unwrap();
    assert!(yaml.contains("groupProtocol: consumer"), "{yaml}");
    assert_eq!(WorkerConfig::from_yaml(&yaml).unwrap(), cfg);
}

#[test]
fn spec_reads_group_protocol_in_lowercase_and_rejects_other_values() {
    let manifest = |protocol: &str| {
        format!(
            r#"apiVersion: streamops.dev/v1alpha1
kind: StreamConsumer
metadata: {{name: t, namespace: d}}
spec:
  kafka: {{bootstrapServers: "k:9092", topics: [prices], groupId: g, groupProtocol: {protocol}}}
  handler: {{kind: moving-average}}
  sink: {{postgres: {{urlSecretRef: {{name: pg, key: url}}}}}}
"#
        )
    };
    let sc: StreamConsumer = serde_yaml::from_str(&manifest("consumer")).unwrap();
    assert_eq!(sc.spec.kafka.group_protocol, GroupProtocol::Consumer);
    let sc: StreamConsumer = serde_yaml::from_str(&manifest("classic")).unwrap();
    assert_eq!(sc.spec.kafka.group_protocol, GroupProtocol::Classic);
    let err = serde_yaml::from_str::<StreamConsumer>(&manifest("eager"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("eager"), "{err}");
}
