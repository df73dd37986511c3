//! Tests of the API crate: the committed CRD, spec validation, and the worker configuration
//! derived from a spec.

use streamops_crds::config::{stream_consumer_from_manifest, Handler, WorkerConfig};
use streamops_crds::v1alpha1::*;
use streamops_crds::{validate_spec, HandlerKind, StreamConsumer};

fn first_error_field(spec: &StreamConsumerSpec) -> String {
    validate_spec(spec)
        .expect_err("spec should be invalid")
        .first_field()
        .to_string()
}

#[test]
fn committed_crd_is_identical_to_the_generated_one() {
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/streamconsumer.yaml"))
            .expect("crds/streamconsumer.yaml is committed");
    let generated = streamops_crds::crd_yaml().expect("CRD renders");
    assert!(
        committed == generated,
        "crds/streamconsumer.yaml is out of date: run `make crds` and commit the result"
    );
}

#[test]
fn crd_has_scale_subresource_status_and_short_name_that_is_not_sc() {
    let yaml = streamops_crds::crd_yaml().unwrap();
    let crd: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
    let version = &crd["spec"]["versions"][0];
    assert_eq!(crd["spec"]["group"], "streamops.dev");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(
        version["subresources"]["scale"]["specReplicasPath"],
        ".spec.replicas"
    );
    assert_eq!(
        version["subresources"]["scale"]["statusReplicasPath"],
        ".status.replicas"
    );
    assert_eq!(
        version["subresources"]["scale"]["labelSelectorPath"],
        ".status.selector"
    );
    assert!(version["subresources"]["status"].is_object());
    let short: Vec<&str> = crd["spec"]["names"]["shortNames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(!short.contains(&"sc"), "sc belongs to StorageClass");
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        ["Handler", "Topics", "Desired", "Ready", "Lag", "Phase", "Age"]
    );
}

#[test]
fn every_spec_property_carries_a_description_for_kubectl_explain() {
    fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
            for (name, prop) in props {
                let p = format!("{path}.{name}");
                if prop.get("description").is_none() {
                    missing.push(p.clone());
                }
                walk(&p, prop, missing);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    let yaml = streamops_crds::crd_yaml().unwrap();
    let crd: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
    let root = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"];
    let mut missing = Vec::new();
    // spec is ours end to end; status embeds metav1.Condition, whose fields are documented upstream.
    walk("spec", &root["spec"], &mut missing);
    assert!(
        missing.is_empty(),
        "fields without doc comments: {missing:?}"
    );
}

#[test]
fn example_specs_of_every_kind_are_valid() {
    for kind in HandlerKind::ALL {
        let spec = StreamConsumerSpec::example(kind);
        validate_spec(&spec).unwrap_or_else(|e| panic!("{kind}: {e}"));
        let sc = StreamConsumer::test_of(kind);
        sc.validate_cel()
            .unwrap_or_else(|e| panic!("{kind}: CEL rejects a valid object: {e:?}"));
    }
}

#[test]
fn fraud_kind_without_fraud_settings_is_rejected_naming_the_field() {
    let mut spec = StreamConsumerSpec::example(HandlerKind::Fraud);
    spec.handler.fraud = None;
    assert_eq!(first_error_field(&spec), "spec.handler.fraud");
}

#[test]
fn settings_block_of_another_kind_is_rejected_naming_the_block() {
    let mut spec = StreamConsumerSpec::example(HandlerKind::MovingAverage);
    spec.handler.sensor = Some(SensorSettings::default());
    assert_eq!(first_error_field(&spec), "spec.handler.sensor");
}

#[test]
fn pipeline_trigger_needs_redis_and_exactly_one_trigger() {
    let mut spec = StreamConsumerSpec::example(HandlerKind::PipelineTrigger);
    spec.redis = None;
    assert_eq!(first_error_field(&spec), "spec.redis");

    let mut both = StreamConsumerSpec::example(HandlerKind::PipelineTrigger);
    both.handler.pipeline_trigger.as_mut().unwrap().job = Some(JobTriggerSpec {
        template: serde_json::json!({"template": {"spec": {"containers": []}}}),
    });
    let err = validate_spec(&both).unwrap_err();
    assert!(
        err.to_string().contains("exactly one of webhook and job"),
        "{err}"
    );
}

#[test]
fn invalid_topic_names_are_rejected_with_their_index() {
    let mut spec = StreamConsumerSpec::example(HandlerKind::Sensor);
    spec.kafka.topics = vec!["ok-topic".into(), "bad topic!".into()];
    assert_eq!(first_error_field(&spec), "spec.kafka.topics[1]");
}

#[test]
fn sasl_protocol_without_sasl_settings_is_rejected() {
    let mut spec = StreamConsumerSpec::example(HandlerKind::MovingAverage);
    spec.kafka.security = Some(KafkaSecurity {
        protocol: SecurityProtocol::SaslSsl,
        sasl: None,
        tls: None,
    });
    assert_eq!(first_error_field(&spec), "spec.kafka.security.sasl");
}

#[test]
fn error_topic_equal_to_a_source_topic_is_rejected() {
    let mut spec = StreamConsumerSpec::example(HandlerKind::MovingAverage);
    spec.error_topic = Some("price-events".into());
    assert_eq!(first_error_field(&spec), "spec.errorTopic");
}

#[test]
fn default_error_topic_that_is_a_consumed_topic_is_rejected() {
    // topics [a, a-failed] without errorTopic would send rejections of `a` back into `a-failed`,
    // which the same consumer reads.
    let mut spec = StreamConsumerSpec::example(HandlerKind::MovingAverage);
    spec.kafka.topics = vec!["a".into(), "a-failed".into()];
    spec.error_topic = None;
    assert_eq!(first_error_field(&spec), "spec.errorTopic");
    spec.error_topic = Some("a-rejections".into());
    validate_spec(&spec).unwrap();
}

fn webhook_spec(f: impl FnOnce(&mut WebhookSpec)) -> StreamConsumerSpec {
    let mut spec = StreamConsumerSpec::example(HandlerKind::PipelineTrigger);
    f(spec
        .handler
        .pipeline_trigger
        .as_mut()
        .unwrap()
        .webhook
        .as_mut()
        .unwrap());
    spec
}

#[test]
fn credential_webhook_headers_must_come_from_secrets() {
    for name in ["Authorization", "X-Api-Key", "X-Auth-Token", "Cookie"] {
        let spec = webhook_spec(|w| {
            w.headers.insert(name.into(), "value".into());
        });
        assert_eq!(
            first_error_field(&spec),
            format!("spec.handler.pipelineTrigger.webhook.headers.{name}")
        );
    }
    let spec = webhook_spec(|w| {
        w.headers.insert("X-Team".into(), "data".into());
        w.secret_headers.push(SecretHeader {
            name: "Authorization".into(),
            secret_key_ref: SecretKeyRef {
                name: "hook".into(),
                key: "authorization".into(),
            },
        });
    });
    validate_spec(&spec).unwrap();
}

#[test]
fn secret_headers_need_valid_unique_names_and_a_secret_key() {
    let header = |name: &str, key: &str| SecretHeader {
        name: name.into(),
        secret_key_ref: SecretKeyRef {
            name: "hook".into(),
            key: key.into(),
        },
    };
    let spec = webhook_spec(|w| w.secret_headers.push(header("bad header", "k")));
    assert_eq!(
        first_error_field(&spec),
        "spec.handler.pipelineTrigger.webhook.secretHeaders[0].name"
    );
    let spec = webhook_spec(|w| {
        w.secret_headers.push(header("Authorization", "k"));
        w.secret_headers.push(header("authorization", "k"));
    });
    assert_eq!(
        first_error_field(&spec),
        "spec.handler.pipelineTrigger.webhook.secretHeaders[1].name"
    );
    let spec = webhook_spec(|w| w.secret_headers.push(header("Authorization", "")));
    assert_eq!(
        first_error_field(&spec),
        "spec.handler.pipelineTrigger.webhook.secretHeaders[0].secretKeyRef"
    );
}

#[test]
fn job_template_that_breaks_the_restricted_standard_names_the_field() {
    let mut spec = StreamConsumerSpec::example(HandlerKind::PipelineTrigger);
    let p = spec.handler.pipeline_trigger.as_mut().unwrap();
    p.webhook = None;
    p.job = Some(JobTriggerSpec {
        template: serde_json::json!({"template": {"spec": {
            "containers": [{"name": "c", "image": "i", "securityContext": {"privileged": true}}]
        }}}),
    });
    assert_eq!(
        first_error_field(&spec),
        "spec.handler.pipelineTrigger.job.template.template.spec.containers[0].securityContext.privileged"
    );
    spec.handler.pipeline_trigger.as_mut().unwrap().job = Some(JobTriggerSpec {
        template: serde_json::json!({"template": {"spec": {"containers": [{"name": 7}]}}}),
    });
    assert_eq!(
        first_error_field(&spec),
        "spec.handler.pipelineTrigger.job.template.template.spec.containers[0].name"
    );
}

#[test]
fn bootstrap_servers_must_be_host_port_pairs() {
    let mut spec = StreamConsumerSpec::example(HandlerKind::MovingAverage);
    spec.kafka.bootstrap_servers = "kafka".into();
    assert_eq!(first_error_field(&spec), "spec.kafka.bootstrapServers");
    spec.kafka.bootstrap_servers = "kafka-0:9092, kafka-1:9092".into();
    validate_spec(&spec).unwrap();
}

#[test]
fn every_invalid_field_is_reported_not_only_the_first() {
    let mut spec = StreamConsumerSpec::example(HandlerKind::Fraud);
    spec.replicas = -1;
    spec.batch.max_messages = 0;
    spec.handler.fraud.as_mut().unwrap().fraud_threshold = 1.5;
    let err = validate_spec(&spec).unwrap_err();
    let fields: Vec<&str> = err.errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.replicas",
            "spec.batch.maxMessages",
            "spec.handler.fraud.fraudThreshold"
        ]
    );
}

#[test]
fn config_defaults_the_error_topic_to_the_first_topic_plus_failed() {
    let sc = StreamConsumer::test_of(HandlerKind::Fraud);
    let cfg = WorkerConfig::from_resource(&sc).unwrap();
    assert_eq!(cfg.error_topic, "transactions-failed");
    assert_eq!(cfg.consumer_id, "default/test");
    assert!(matches!(cfg.handler, Handler::Fraud(_)));
}

#[test]
fn config_fills_in_the_default_moving_average_window() {
    let sc = StreamConsumer::test().with_spec(|s| s.handler.moving_average = None);
    let cfg = WorkerConfig::from_resource(&sc).unwrap();
    assert_eq!(
        cfg.handler,
        Handler::MovingAverage(MovingAverageSettings { window: 5 })
    );
}

#[test]
fn config_carries_tls_file_paths_and_sasl_mechanism_but_never_credentials() {
    let sc = StreamConsumer::test().with_spec(|s| {
        s.kafka.security = Some(KafkaSecurity {
            protocol: SecurityProtocol::SaslSsl,
            sasl: Some(SaslSpec {
                mechanism: SaslMechanism::ScramSha512,
                credentials_secret_ref: CredentialsSecretRef {
                    name: "kafka-creds".into(),
                    username_key: "username".into(),
                    password_key: "password".into(),
                },
            }),
            tls: Some(TlsSpec {
                ca_secret_ref: Some(SecretKeyRef {
                    name: "kafka-ca".into(),
                    key: "ca.crt".into(),
                }),
                client_cert_secret_name: None,
            }),
        })
    });
    let cfg = WorkerConfig::from_resource(&sc).unwrap();
    assert_eq!(cfg.kafka.security_protocol, SecurityProtocol::SaslSsl);
    assert_eq!(cfg.kafka.sasl_mechanism, Some(SaslMechanism::ScramSha512));
    assert_eq!(
        cfg.kafka.ssl_ca_location.as_deref(),
        Some("/etc/streamops/tls/ca/ca.crt")
    );
    let yaml = cfg.to_yaml().unwrap();
    assert!(
        !yaml.contains("kafka-creds"),
        "secret names leak into the config:\n{yaml}"
    );
    assert!(
        !yaml.contains("urlSecretRef"),
        "secret refs leak into the config:\n{yaml}"
    );
}

#[test]
fn rendered_config_round_trips_through_yaml() {
    for kind in HandlerKind::ALL {
        let cfg = WorkerConfig::from_resource(&StreamConsumer::test_of(kind)).unwrap();
        let back = WorkerConfig::from_yaml(&cfg.to_yaml().unwrap()).unwrap();
        assert_eq!(back, cfg, "{kind}");
    }
}

#[test]
fn rendered_config_rejects_unknown_fields() {
    let cfg = WorkerConfig::from_resource(&StreamConsumer::test()).unwrap();
    let yaml = format!("{}typo: 1\n", cfg.to_yaml().unwrap());
    let err = WorkerConfig::from_yaml(&yaml).unwrap_err().to_string();
    assert!(err.contains("typo"), "{err}");
}

#[test]
fn manifest_with_secrets_yields_its_one_stream_consumer() {
    let manifest = r#"
apiVersion: v1
kind: Secret
metadata: {name: pg}
stringData: {url: "postgres://x@y/z"}
---
apiVersion: streamops.dev/v1alpha1
kind: StreamConsumer
metadata: {name: price-averages}
spec:
  kafka: {bootstrapServers: "kafka:9092", topics: [price-events], groupId: g}
  handler: {kind: moving-average, movingAverage: {window: 7}}
  sink: {postgres: {urlSecretRef: {name: pg, key: url}}}
"#;
    let sc = stream_consumer_from_manifest(manifest).unwrap();
    assert_eq!(sc.metadata.name.as_deref(), Some("price-averages"));
    assert_eq!(sc.spec.replicas, 1, "replicas defaults to 1");
    let cfg = WorkerConfig::from_resource(&sc).unwrap();
    assert_eq!(
        cfg.handler,
        Handler::MovingAverage(MovingAverageSettings { window: 7 })
    );
    assert_eq!(
        cfg.batch.max_messages, 5_000,
        "the adaptive batch's default ceiling"
    );
    assert_eq!(cfg.error_topic, "price-events-failed");
}

#[test]
fn manifest_without_a_stream_consumer_is_an_error() {
    let err = stream_consumer_from_manifest("apiVersion: v1\nkind: Secret\nmetadata: {name: x}\n")
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("no document of kind StreamConsumer"),
        "{err}"
    );
}

#[test]
fn manifest_with_a_wrongly_typed_field_names_it() {
    let manifest = r#"
apiVersion: streamops.dev/v1alpha1
kind: StreamConsumer
metadata: {name: x}
spec:
  replicas: "two"
  kafka: {bootstrapServers: "kafka:9092", topics: [t], groupId: g}
  handler: {kind: sensor}
  sink: {postgres: {urlSecretRef: {name: pg, key: url}}}
"#;
    let err = stream_consumer_from_manifest(manifest)
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid type"), "{err}");
}

#[test]
fn cel_rules_reject_what_the_rust_validation_rejects() {
    let no_redis =
        StreamConsumer::test_of(HandlerKind::PipelineTrigger).with_spec(|s| s.redis = None);
    assert!(
        no_redis.validate_cel().is_err(),
        "pipeline-trigger without redis passes CEL"
    );

    let wrong_block =
        StreamConsumer::test().with_spec(|s| s.handler.sensor = Some(SensorSettings::default()));
    assert!(
        wrong_block.validate_cel().is_err(),
        "sensor block on moving-average passes CEL"
    );

    let fraud_missing =
        StreamConsumer::test_of(HandlerKind::Fraud).with_spec(|s| s.handler.fraud = None);
    assert!(
        fraud_missing.validate_cel().is_err(),
        "fraud without settings passes CEL"
    );

    let bad_autoscaling = StreamConsumer::test().with_spec(|s| {
        s.autoscaling = Some(AutoscalingSpec {
            min_replicas: 5,
            max_replicas: 2,
            lag_threshold: 100,
            scale_up_stabilization_seconds: 0,
            scale_down_stabilization_seconds: 300,
            scale_to_zero: false,
            activation_lag: 1,
            allow_idle_consumers: false,
            poll_interval_seconds: 5,
        })
    });
    assert!(
        bad_autoscaling.validate_cel().is_err(),
        "min > max passes CEL"
    );
    assert_eq!(
        first_error_field(&bad_autoscaling.spec),
        "spec.autoscaling.minReplicas"
    );
}

#[test]
fn a_local_spec_with_misspelt_fields_is_refused_and_every_one_is_named() {
    let manifest = r#"
apiVersion: streamops.dev/v1alpha1
kind: StreamConsumer
metadata: {name: x}
spec:
  replicaz: 3
  kafka: {bootstrapServers: "kafka:9092", topics: [t], groupId: g, autoOfsetReset: latest}
  handler: {kind: moving-average, movingAverage: {windw: 7}}
  sink: {postgres: {urlSecretRef: {name: pg, key: url}}}
"#;
    let err = stream_consumer_from_manifest(manifest)
        .unwrap_err()
        .to_string();
    for field in [
        "\"spec.replicaz\"",
        "\"spec.kafka.autoOfsetReset\"",
        "\"spec.handler.movingAverage.windw\"",
    ] {
        assert!(err.contains(field), "{field} is not named in: {err}");
    }
    assert!(err.contains("did you mean \"window\""), "{err}");
}

#[test]
fn new_settings_are_range_checked_and_name_their_field() {
    use streamops_crds::v1alpha1::RetryBackoff;
    let fields = |spec: &StreamConsumerSpec| -> Vec<String> {
        validate_spec(spec)
            .err()
            .map(|e| e.errors.into_iter().map(|f| f.field).collect())
            .unwrap_or_default()
    };
    let mut s = StreamConsumerSpec::example(HandlerKind::Fraud);
    assert!(fields(&s).is_empty());
    s.kafka.session_timeout_ms = 1_000;
    s.kafka.max_poll_interval_ms = 5_000;
    assert_eq!(
        fields(&s),
        vec![
            "spec.kafka.sessionTimeoutMs",
            "spec.kafka.maxPollIntervalMs"
        ]
    );
    s.kafka.session_timeout_ms = 120_000;
    s.kafka.max_poll_interval_ms = 60_000;
    assert_eq!(fields(&s), vec!["spec.kafka.sessionTimeoutMs"]);
    let mut s = StreamConsumerSpec::example(HandlerKind::Fraud);
    s.handler.fraud.as_mut().unwrap().retry_backoff = RetryBackoff {
        base_ms: 10_000,
        factor: 0.5,
        cap_ms: 1_000,
    };
    assert_eq!(
        fields(&s),
        vec![
            "spec.handler.fraud.retryBackoff.factor",
            "spec.handler.fraud.retryBackoff.baseMs"
        ]
    );
    let mut s = StreamConsumerSpec::example(HandlerKind::PipelineTrigger);
    let pt = s.handler.pipeline_trigger.as_mut().unwrap();
    pt.webhook.as_mut().unwrap().retry_backoff.cap_ms = 0;
    pt.consumer_id = Some("consumer 1".into());
    s.progress_every = Some(0);
    assert_eq!(
        fields(&s),
        vec![
            "spec.progressEvery",
            "spec.handler.pipelineTrigger.webhook.retryBackoff.capMs",
            "spec.handler.pipelineTrigger.webhook.retryBackoff.baseMs",
            "spec.handler.pipelineTrigger.consumerId"
        ]
    );
}

#[test]
fn the_new_settings_reach_the_worker_configuration_with_the_documented_defaults() {
    let manifest = r#"
apiVersion: streamops.dev/v1alpha1
kind: StreamConsumer
metadata: {name: x, namespace: ns}
spec:
  kafka: {bootstrapServers: "kafka:9092", topics: [t], groupId: g, sessionTimeoutMs: 10000}
  handler: {kind: fraud, fraud: {scoringUrl: "http://m/v2/models/f/infer", protocol: open-inference-v2}}
  sink: {postgres: {urlSecretRef: {name: pg, key: url}}}
"#;
    let cfg =
        WorkerConfig::from_resource(&stream_consumer_from_manifest(manifest).unwrap()).unwrap();
    assert_eq!(cfg.kafka.session_timeout_ms, 10_000);
    assert_eq!(cfg.progress_every, 10_000, "the default progress interval");
    assert_eq!(cfg.kafka.max_poll_interval_ms, 300_000);
    let Handler::Fraud(f) = cfg.handler else {
        panic!("fraud")
    };
    assert_eq!(
        f.protocol,
        streamops_crds::v1alpha1::ScoringProtocol::OpenInferenceV2
    );
    assert_eq!(
        (
            f.retry_backoff.base_ms,
            f.retry_backoff.factor,
            f.retry_backoff.cap_ms
        ),
        (100, 2.0, 5_000)
    );
}
