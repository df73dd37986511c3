//! The generated CustomResourceDefinition is one the API server accepts: a structural schema, CEL
//! rules that compile, and each rule accepting a valid object and rejecting an invalid one.

use std::collections::BTreeSet;

use kube::core::cel::{compile_schema, CompiledSchema};
use kube::CustomResourceExt;
use serde_json::{json, Value};
use streamops_crds::v1alpha1::{
    AutoscalingSpec, CredentialsSecretRef, HandlerKind, JobTriggerSpec, KafkaSecurity,
    MovingAverageSettings, ReplayOffset, ReplaySpec, SaslMechanism, SaslSpec, SecurityProtocol,
    SensorSettings,
};
use streamops_crds::StreamConsumer;

fn crd() -> Value {
    serde_json::to_value(StreamConsumer::crd()).unwrap()
}

fn root_schema() -> Value {
    let crd = crd();
    let versions = crd["spec"]["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 1, "one served version");
    versions[0]["schema"]["openAPIV3Schema"].clone()
}

const TYPES: [&str; 6] = ["object", "array", "string", "integer", "number", "boolean"];
const JUNCTORS: [&str; 4] = ["allOf", "anyOf", "oneOf", "not"];
const FORBIDDEN: [&str; 8] = [
    "$ref",
    "$schema",
    "definitions",
    "$defs",
    "id",
    "patternProperties",
    "dependencies",
    "additionalItems",
];

fn is_true(node: &Value, key: &str) -> bool {
    node.get(key).and_then(Value::as_bool) == Some(true)
}

/// Checks the rules of a structural schema (Kubernetes "Specifying a structural schema") and the
/// apiextensions.k8s.io/v1 restrictions; returns every violation.
fn structural_violations(node: &Value, path: &str, in_junctor: bool, out: &mut Vec<String>) {
    let Some(obj) = node.as_object() else {
        out.push(format!("{path}: a schema must be an object"));
        return;
    };
    for key in FORBIDDEN {
        if obj.contains_key(key) {
            out.push(format!("{path}: {key} is not allowed"));
        }
    }
    if is_true(node, "uniqueItems") {
        out.push(format!("{path}: uniqueItems: true is not allowed"));
    }
    if obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(false)) {
        out.push(format!(
            "{path}: x-kubernetes-preserve-unknown-fields must be true or absent"
        ));
    }
    let int_or_string = is_true(node, "x-kubernetes-int-or-string");
    let preserve = is_true(node, "x-kubernetes-preserve-unknown-fields");

    match obj.get("type") {
        Some(Value::String(t)) if TYPES.contains(&t.as_str()) => {}
        Some(other) => out.push(format!("{path}: invalid type {other}")),
        None if in_junctor || int_or_string || preserve => {}
        None => out.push(format!(
            "{path}: no type (and neither int-or-string nor preserve-unknown-fields)"
        )),
    }

    if in_junctor {
        for key in [
            "description",
            "type",
            "default",
            "additionalProperties",
            "nullable",
        ] {
            if obj.contains_key(key) {
                out.push(format!(
                    "{path}: {key} is not allowed inside allOf/anyOf/oneOf/not"
                ));
            }
        }
    }

    if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
        out.push(format!(
            "{path}: properties and additionalProperties are mutually exclusive"
        ));
    }
    if obj.get("additionalProperties") == Some(&Value::Bool(false)) {
        out.push(format!(
            "{path}: additionalProperties: false is not allowed"
        ));
    }

    let ty = obj.get("type").and_then(Value::as_str);
    if ty == Some("array") && !obj.get("items").is_some_and(Value::is_object) {
        out.push(format!("{path}: an array needs a single items schema"));
    }
    if obj.contains_key("properties") && ty != Some("object") && !in_junctor {
        out.push(format!("{path}: properties on a non-object"));
    }
    if let Some(required) = obj.get("required").and_then(Value::as_array) {
        let props = obj.get("properties").and_then(Value::as_object);
        for r in required {
            let r = r.as_str().unwrap_or_default();
            if !props.is_some_and(|p| p.contains_key(r)) && !in_junctor {
                out.push(format!("{path}: required {r} is not a property"));
            }
        }
    }
    if let Some(values) = obj.get("enum").and_then(Value::as_array) {
        for v in values {
            let ok = match ty {
                Some("string") => v.is_string(),
                Some("integer") => v.is_i64() || v.is_u64(),
                Some("number") => v.is_number(),
                Some("boolean") => v.is_boolean(),
                _ => true,
            } || (v.is_null() && is_true(node, "nullable"));
            if !ok {
                out.push(format!("{path}: enum value {v} does not match type {ty:?}"));
            }
        }
    }
    if is_true(node, "x-kubernetes-embedded-resource") && ty != Some("object") {
        out.push(format!("{path}: an embedded resource must be an object"));
    }

    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            structural_violations(v, &format!("{path}.{k}"), in_junctor, out);
        }
    }
    if let Some(ap) = obj.get("additionalProperties").filter(|v| v.is_object()) {
        structural_violations(ap, &format!("{path}[*]"), in_junctor, out);
    }
    if let Some(items) = obj.get("items") {
        structural_violations(items, &format!("{path}[]"), in_junctor, out);
    }
    for j in JUNCTORS {
        let branches: Vec<&Value> = match obj.get(j) {
            Some(Value::Array(a)) => a.iter().collect(),
            Some(v @ Value::Object(_)) => vec![v],
            _ => continue,
        };
        let outer: BTreeSet<&String> = obj
            .get("properties")
            .and_then(Value::as_object)
            .map(|p| p.keys().collect())
            .unwrap_or_default();
        for (i, b) in branches.iter().enumerate() {
            let bpath = format!("{path}.{j}[{i}]");
            // The one exception: int-or-string's anyOf [integer, string].
            let int_or_string_branch = int_or_string
                && j == "anyOf"
                && b.as_object().is_some_and(|o| {
                    o.len() == 1
                        && matches!(
                            o.get("type").and_then(Value::as_str),
                            Some("integer" | "string")
                        )
                });
            if int_or_string_branch {
                continue;
            }
            if let Some(inner) = b.get("properties").and_then(Value::as_object) {
                for k in inner.keys() {
                    if !outer.contains(k) {
                        out.push(format!(
                            "{bpath}: property {k} is not also specified outside the junctor"
                        ));
                    }
                }
            }
            structural_violations(b, &bpath, true, out);
        }
    }
}

#[test]
fn crd_schema_is_structural() {
    let schema = root_schema();
    let mut violations = Vec::new();
    structural_violations(&schema, "openAPIV3Schema", false, &mut violations);
    // metadata: only name/generateName restrictions are allowed; the derive leaves it alone.
    if let Some(meta) = schema["properties"].get("metadata") {
        let keys: BTreeSet<&str> = meta
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let allowed = BTreeSet::from(["type", "properties", "description"]);
        assert!(keys.is_subset(&allowed), "metadata schema: {keys:?}");
        if let Some(p) = meta.get("properties").and_then(Value::as_object) {
            assert!(
                p.keys().all(|k| k == "name" || k == "generateName"),
                "{p:?}"
            );
        }
    }
    assert!(
        violations.is_empty(),
        "not a structural schema:\n{}",
        violations.join("\n")
    );
}

#[test]
fn structural_check_catches_what_it_should() {
    // The checker itself must flag the constructs it exists for.
    let bad = json!({
        "type": "object",
        "properties": {
            "untyped": {"description": "x"},
            "ref": {"$ref": "#/definitions/X"},
            "both": {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": {"type": "string"}},
            "junction": {"type": "object", "properties": {"a": {"type": "string"}},
                         "oneOf": [{"type": "object", "properties": {"b": {"type": "string"}}}]},
            "list": {"type": "array"},
            "ios": {"x-kubernetes-int-or-string": true, "anyOf": [{"type": "integer"}, {"type": "string"}]}
        }
    });
    let mut v = Vec::new();
    structural_violations(&bad, "root", false, &mut v);
    let joined = v.join("\n");
    for needle in [
        "root.untyped: no type",
        "root.ref: $ref is not allowed",
        "root.both: properties and additionalProperties",
        "root.junction.oneOf[0]: type is not allowed",
        "root.junction.oneOf[0]: property b is not also specified",
        "root.list: an array needs",
    ] {
        assert!(joined.contains(needle), "missing {needle:?} in:\n{joined}");
    }
    assert!(
        !joined.contains("root.ios"),
        "int-or-string is structural:\n{joined}"
    );
}

fn collect_rules(node: &Value, out: &mut BTreeSet<String>) {
    match node {
        Value::Object(o) => {
            if let Some(Value::Array(rules)) = o.get("x-kubernetes-validations") {
                for r in rules {
                    out.insert(r["rule"].as_str().unwrap().to_string());
                }
            }
            for v in o.values() {
                collect_rules(v, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| collect_rules(v, out)),
        _ => {}
    }
}

fn compilation_errors(c: &CompiledSchema, path: &str, out: &mut Vec<String>) {
    for e in c.compilation_errors() {
        out.push(format!("{path}: {e}"));
    }
    for (k, v) in &c.properties {
        compilation_errors(v, &format!("{path}.{k}"), out);
    }
    if let Some(i) = &c.items {
        compilation_errors(i, &format!("{path}[]"), out);
    }
    if let Some(a) = &c.additional_properties {
        compilation_errors(a, &format!("{path}[*]"), out);
    }
}

#[test]
fn every_cel_rule_compiles() {
    let schema = root_schema();
    let compiled = compile_schema(&schema);
    let mut errors = Vec::new();
    compilation_errors(&compiled, "openAPIV3Schema", &mut errors);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    let mut rules = BTreeSet::new();
    collect_rules(&schema, &mut rules);
    assert!(!rules.is_empty());
}

struct RuleCase {
    rule: &'static str,
    /// The message the rule reports (`None`: the default "failed rule" message).
    message: Option<&'static str>,
    valid: Vec<StreamConsumer>,
    invalid: Vec<StreamConsumer>,
}

fn sasl(protocol: SecurityProtocol, with_sasl: bool) -> StreamConsumer {
    StreamConsumer::test().with_spec(|s| {
        s.kafka.security = Some(KafkaSecurity {
            protocol,
            sasl: with_sasl.then(|| SaslSpec {
                mechanism: SaslMechanism::Plain,
                credentials_secret_ref: CredentialsSecretRef {
                    name: "c".into(),
                    username_key: "u".into(),
                    password_key: "p".into(),
                },
            }),
            tls: None,
        })
    })
}

fn autoscaling(min: i32, max: i32) -> StreamConsumer {
    StreamConsumer::test().with_spec(|s| {
        s.autoscaling = Some(AutoscalingSpec {
            min_replicas: min,
            max_replicas: max,
            lag_threshold: 100,
            scale_up_stabilization_seconds: 0,
            scale_down_stabilization_seconds: 300,
            scale_to_zero: false,
            activation_lag: 1,
            allow_idle_consumers: false,
            poll_interval_seconds: 5,
        })
    })
}

fn pipeline(webhook: bool, job: bool) -> StreamConsumer {
    StreamConsumer::test_of(HandlerKind::PipelineTrigger).with_spec(|s| {
        let p = s.handler.pipeline_trigger.as_mut().unwrap();
        if !webhook {
            p.webhook = None;
        }
        if job {
            p.job = Some(JobTriggerSpec {
                template: json!({"template": {"spec": {"restartPolicy": "Never"}}}),
            });
        }
    })
}

/// A job-trigger StreamConsumer whose template's pod spec is `pod`.
fn job(pod: Value) -> StreamConsumer {
    StreamConsumer::test_of(HandlerKind::PipelineTrigger).with_spec(|s| {
        let p = s.handler.pipeline_trigger.as_mut().unwrap();
        p.webhook = None;
        p.job = Some(JobTriggerSpec {
            template: json!({"template": {"spec": pod}}),
        });
    })
}

/// A job-trigger StreamConsumer with one container (or init container, or ephemeral container)
/// whose fields are `container`.
fn job_container(container: Value) -> Vec<StreamConsumer> {
    let mut c = json!({"name": "load", "image": "loader:1"});
    c.as_object_mut()
        .unwrap()
        .extend(container.as_object().unwrap().clone());
    let plain = json!({"name": "main", "image": "loader:1"});
    vec![
        job(json!({"containers": [c.clone()]})),
        job(json!({"containers": [plain.clone()], "initContainers": [c.clone()]})),
        job(json!({"containers": [plain], "ephemeralContainers": [c]})),
    ]
}

fn topics(topics: &[&str], error_topic: Option<&str>) -> StreamConsumer {
    StreamConsumer::test().with_spec(|s| {
        s.kafka.topics = topics.iter().map(|t| t.to_string()).collect();
        s.error_topic = error_topic.map(str::to_string);
    })
}

fn replay(earliest: bool, timestamp: bool, offsets: bool) -> StreamConsumer {
    StreamConsumer::test().with_spec(|s| {
        s.replay = Some(ReplaySpec {
            request_id: "fix-1".into(),
            to_earliest: earliest,
            from_timestamp: timestamp.then(|| "2024-03-20T10:30:00Z".into()),
            offsets: if offsets {
                vec![ReplayOffset {
                    topic: s.kafka.topics[0].clone(),
                    partition: 0,
                    offset: 5,
                }]
            } else {
                Vec::new()
            },
        })
    })
}

fn cases() -> Vec<RuleCase> {
    let of = StreamConsumer::test_of;
    let plain_container = json!({"name": "main", "image": "loader:1"});
    vec![
        RuleCase {
            rule: "has(self.errorTopic) ? !(self.errorTopic in self.kafka.topics) : !((self.kafka.topics[0] + '-failed') in self.kafka.topics)",
            message: Some("spec.errorTopic (default: the first topic plus -failed) must differ from every consumed topic, or rejected messages loop back into the consumer"),
            valid: vec![
                topics(&["a"], None),
                topics(&["a", "b"], Some("a-errors")),
                topics(&["a", "a-failed"], Some("rejects")),
            ],
            invalid: vec![
                topics(&["a", "a-failed"], None),
                topics(&["a", "b"], Some("b")),
            ],
        },
        RuleCase {
            rule: "!has(self.hostNetwork) || !self.hostNetwork",
            message: Some("hostNetwork is not allowed (restricted Pod Security Standard)"),
            valid: vec![job(json!({"hostNetwork": false, "containers": [plain_container.clone()]}))],
            invalid: vec![job(json!({"hostNetwork": true, "containers": [plain_container.clone()]}))],
        },
        RuleCase {
            rule: "!has(self.hostPID) || !self.hostPID",
            message: Some("hostPID is not allowed (restricted Pod Security Standard)"),
            valid: vec![job(json!({"hostPID": false}))],
            invalid: vec![job(json!({"hostPID": true}))],
        },
        RuleCase {
            rule: "!has(self.hostIPC) || !self.hostIPC",
            message: Some("hostIPC is not allowed (restricted Pod Security Standard)"),
            valid: vec![job(json!({"hostIPC": false}))],
            invalid: vec![job(json!({"hostIPC": true}))],
        },
        RuleCase {
            rule: "!has(self.volumes) || self.volumes.all(v, !has(v.hostPath))",
            message: Some("hostPath volumes are not allowed (restricted Pod Security Standard)"),
            valid: vec![job(json!({"volumes": [{"name": "scratch", "emptyDir": {}}]}))],
            invalid: vec![job(json!({"volumes": [{"name": "scratch", "emptyDir": {}}, {"name": "root", "hostPath": {"path": "/"}}]}))],
        },
        RuleCase {
            rule: "!has(self.securityContext) || !has(self.securityContext.runAsNonRoot) || self.securityContext.runAsNonRoot",
            message: Some("runAsNonRoot must not be false (restricted Pod Security Standard)"),
            valid: [job(json!({"securityContext": {"runAsNonRoot": true}}))]
                .into_iter()
                .chain(job_container(json!({"securityContext": {"runAsNonRoot": true}})))
                .collect(),
            invalid: [job(json!({"securityContext": {"runAsNonRoot": false}}))]
                .into_iter()
                .chain(job_container(json!({"securityContext": {"runAsNonRoot": false}})))
                .collect(),
        },
        RuleCase {
            rule: "!has(self.securityContext) || !has(self.securityContext.runAsUser) || self.securityContext.runAsUser != 0",
            message: Some("running as root (runAsUser 0) is not allowed (restricted Pod Security Standard)"),
            valid: [job(json!({"securityContext": {"runAsUser": 1000}}))]
                .into_iter()
                .chain(job_container(json!({"securityContext": {"runAsUser": 1000}})))
                .collect(),
            invalid: [job(json!({"securityContext": {"runAsUser": 0}}))]
                .into_iter()
                .chain(job_container(json!({"securityContext": {"runAsUser": 0}})))
                .collect(),
        },
        RuleCase {
            rule: "!has(self.securityContext) || !has(self.securityContext.privileged) || !self.securityContext.privileged",
            message: Some("privileged containers are not allowed (restricted Pod Security Standard)"),
            valid: job_container(json!({"securityContext": {"privileged": false}})),
            invalid: job_container(json!({"securityContext": {"privileged": true}})),
        },
        RuleCase {
            rule: "!has(self.securityContext) || !has(self.securityContext.allowPrivilegeEscalation) || !self.securityContext.allowPrivilegeEscalation",
            message: Some("allowPrivilegeEscalation must be false (restricted Pod Security Standard)"),
            valid: job_container(json!({"securityContext": {"allowPrivilegeEscalation": false}})),
            invalid: job_container(json!({"securityContext": {"allowPrivilegeEscalation": true}})),
        },
        RuleCase {
            rule: "!has(self.securityContext) || !has(self.securityContext.capabilities) || !has(self.securityContext.capabilities.add) || size(self.securityContext.capabilities.add) == 0",
            message: Some("added capabilities are not allowed (restricted Pod Security Standard)"),
            valid: job_container(json!({"securityContext": {"capabilities": {"drop": ["ALL"]}}})),
            invalid: job_container(json!({"securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}})),
        },
        RuleCase {
            rule: "!has(self.ports) || self.ports.all(p, !has(p.hostPort) || p.hostPort == 0)",
            message: Some("host ports are not allowed (restricted Pod Security Standard)"),
            valid: job_container(json!({"ports": [{"containerPort": 8080}]})),
            invalid: job_container(json!({"ports": [{"containerPort": 8080, "hostPort": 8080}]})),
        },
        RuleCase {
            rule: "self.handler.kind != 'pipeline-trigger' || has(self.redis)",
            message: Some("spec.redis is required when spec.handler.kind is pipeline-trigger"),
            valid: vec![of(HandlerKind::PipelineTrigger), of(HandlerKind::Sensor)],
            invalid: vec![of(HandlerKind::PipelineTrigger).with_spec(|s| s.redis = None)],
        },
        RuleCase {
            rule: "!has(self.autoscaling) || self.autoscaling.minReplicas <= self.autoscaling.maxReplicas",
            message: Some("spec.autoscaling.minReplicas must not exceed spec.autoscaling.maxReplicas"),
            valid: vec![StreamConsumer::test(), autoscaling(1, 3), autoscaling(3, 3)],
            invalid: vec![autoscaling(5, 3)],
        },
        RuleCase {
            rule: "!(self.protocol == 'SASL_SSL' || self.protocol == 'SASL_PLAINTEXT') || has(self.sasl)",
            message: Some("sasl is required for the SASL_SSL and SASL_PLAINTEXT protocols"),
            valid: vec![sasl(SecurityProtocol::SaslSsl, true), sasl(SecurityProtocol::Ssl, false)],
            invalid: vec![
                sasl(SecurityProtocol::SaslPlaintext, false),
                sasl(SecurityProtocol::SaslSsl, false),
            ],
        },
        RuleCase {
            rule: "!has(self.movingAverage) || self.kind == 'moving-average'",
            message: Some("handler.movingAverage is only allowed when handler.kind is moving-average"),
            valid: vec![of(HandlerKind::MovingAverage)],
            invalid: vec![of(HandlerKind::Sensor)
                .with_spec(|s| s.handler.moving_average = Some(MovingAverageSettings::default()))],
        },
        RuleCase {
            rule: "!has(self.sensor) || self.kind == 'sensor'",
            message: Some("handler.sensor is only allowed when handler.kind is sensor"),
            valid: vec![of(HandlerKind::Sensor)],
            invalid: vec![of(HandlerKind::MovingAverage)
                .with_spec(|s| s.handler.sensor = Some(SensorSettings::default()))],
        },
        RuleCase {
            rule: "has(self.fraud) == (self.kind == 'fraud')",
            message: Some("handler.fraud is required when, and only when, handler.kind is fraud"),
            valid: vec![of(HandlerKind::Fraud), of(HandlerKind::Sensor)],
            invalid: vec![
                of(HandlerKind::Fraud).with_spec(|s| s.handler.fraud = None),
                of(HandlerKind::Sensor).with_spec(|s| {
                    s.handler.fraud = of(HandlerKind::Fraud).spec.handler.fraud
                }),
            ],
        },
        RuleCase {
            rule: "has(self.pipelineTrigger) == (self.kind == 'pipeline-trigger')",
            message: Some("handler.pipelineTrigger is required when, and only when, handler.kind is pipeline-trigger"),
            valid: vec![of(HandlerKind::PipelineTrigger), of(HandlerKind::Fraud)],
            invalid: vec![
                of(HandlerKind::PipelineTrigger).with_spec(|s| s.handler.pipeline_trigger = None),
                of(HandlerKind::Sensor).with_spec(|s| {
                    s.handler.pipeline_trigger =
                        of(HandlerKind::PipelineTrigger).spec.handler.pipeline_trigger
                }),
            ],
        },
        RuleCase {
            rule: "(has(self.toEarliest) && self.toEarliest ? 1 : 0) + (has(self.fromTimestamp) ? 1 : 0) + (has(self.offsets) && size(self.offsets) > 0 ? 1 : 0) == 1",
            message: Some("replay needs exactly one of toEarliest, fromTimestamp and offsets"),
            valid: vec![
                replay(true, false, false),
                replay(false, true, false),
                replay(false, false, true),
            ],
            invalid: vec![
                replay(false, false, false),
                replay(true, true, false),
                replay(false, true, true),
            ],
        },
        RuleCase {
            rule: "has(self.webhook) != has(self.job)",
            message: Some("exactly one of pipelineTrigger.webhook and pipelineTrigger.job must be set"),
            valid: vec![pipeline(true, false), pipeline(false, true)],
            invalid: vec![pipeline(true, true), pipeline(false, false)],
        },
        RuleCase {
            rule: "self.sessionTimeoutMs <= self.maxPollIntervalMs",
            message: Some("sessionTimeoutMs must not exceed maxPollIntervalMs"),
            valid: vec![
                StreamConsumer::test(),
                StreamConsumer::test().with_spec(|s| {
                    s.kafka.session_timeout_ms = 60_000;
                    s.kafka.max_poll_interval_ms = 60_000;
                }),
            ],
            invalid: vec![StreamConsumer::test().with_spec(|s| {
                s.kafka.session_timeout_ms = 120_000;
                s.kafka.max_poll_interval_ms = 60_000;
            })],
        },
        RuleCase {
            rule: "self.baseMs <= self.capMs",
            message: Some("baseMs must not exceed capMs"),
            valid: vec![of(HandlerKind::Fraud), of(HandlerKind::PipelineTrigger)],
            invalid: vec![
                of(HandlerKind::Fraud).with_spec(|s| {
                    let b = &mut s.handler.fraud.as_mut().unwrap().retry_backoff;
                    b.base_ms = 6_000;
                    b.cap_ms = 5_000;
                }),
                of(HandlerKind::PipelineTrigger).with_spec(|s| {
                    let w = s.handler.pipeline_trigger.as_mut().unwrap().webhook.as_mut().unwrap();
                    w.retry_backoff.base_ms = 40_000;
                }),
            ],
        },
    ]
}

#[test]
fn every_cel_rule_of_the_crd_is_tested() {
    let mut in_crd = BTreeSet::new();
    collect_rules(&root_schema(), &mut in_crd);
    let tested: BTreeSet<String> = cases().iter().map(|c| c.rule.to_string()).collect();
    assert_eq!(in_crd, tested, "add a RuleCase for every new rule");
}

#[test]
fn every_cel_rule_accepts_valid_and_rejects_invalid_objects() {
    for case in cases() {
        for (i, sc) in case.valid.iter().enumerate() {
            if let Err(errors) = sc.validate_cel() {
                // A valid object for this rule may only fail other rules, never this one.
                let hits: Vec<_> = errors.iter().filter(|e| e.rule == case.rule).collect();
                assert!(
                    hits.is_empty(),
                    "{}: valid object {i} rejected: {hits:?}",
                    case.rule
                );
                panic!(
                    "{}: valid object {i} fails other rules: {errors}",
                    case.rule
                );
            }
        }
        for (i, sc) in case.invalid.iter().enumerate() {
            let errors = sc
                .validate_cel()
                .expect_err(&format!("{}: invalid object {i} accepted", case.rule));
            let hit = errors
                .iter()
                .find(|e| e.rule == case.rule)
                .unwrap_or_else(|| {
                    panic!(
                        "{}: invalid object {i} rejected by other rules only: {errors}",
                        case.rule
                    )
                });
            if let Some(m) = case.message {
                assert_eq!(hit.message, m, "{}", case.rule);
            }
        }
    }
}

#[test]
fn scale_subresource_and_printer_columns_point_at_fields_the_operator_writes() {
    let crd = crd();
    let version = &crd["spec"]["versions"][0];
    assert_eq!(
        version["subresources"]["scale"],
        json!({
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector"
        })
    );
    assert!(version["subresources"]["status"].is_object());
    let status = &version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"];
    for field in [
        "replicas",
        "readyReplicas",
        "selector",
        "conditions",
        "observedGeneration",
        "configHash",
    ] {
        assert!(status.get(field).is_some(), "status.{field}");
    }
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["jsonPath"].as_str().unwrap())
        .collect();
    assert!(columns.contains(&".status.readyReplicas"), "{columns:?}");
    assert!(columns.contains(&".spec.replicas"), "{columns:?}");
}
