//! The CRD as the real API server serves it: installation, validation (OpenAPI schema and every CEL
//! rule, evaluated by the API server itself), printer columns and `kubectl explain`.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{json, Value};
use streamops_crds::v1alpha1::HandlerKind;
use streamops_crds::StreamConsumer;

use crate::harness::{admin, env, eventually, TestNs};

const CRD_NAME: &str = "streamconsumers.streamops.dev";

fn api_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("streamops.dev", "v1alpha1", "StreamConsumer"),
        "streamconsumers",
    )
}

/// A valid StreamConsumer of the given kind as JSON, named `name`.
pub fn consumer_json(name: &str, kind: HandlerKind) -> Value {
    let sc = StreamConsumer::test_of(kind);
    json!({
        "apiVersion": "streamops.dev/v1alpha1",
        "kind": "StreamConsumer",
        "metadata": {"name": name},
        "spec": serde_json::to_value(&sc.spec).expect("spec serializes"),
    })
}

/// Every `x-kubernetes-validations` message in the committed CRD.
fn cel_messages() -> BTreeSet<String> {
    fn walk(v: &Value, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::Array(rules)) = m.get("x-kubernetes-validations") {
                    for r in rules {
                        out.insert(r["message"].as_str().expect("a message").to_string());
                    }
                }
                m.values().for_each(|x| walk(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let text = std::fs::read_to_string(env().root.join("crds/streamconsumer.yaml")).unwrap();
    let crd: Value = serde_yaml::from_str(&text).unwrap();
    let mut out = BTreeSet::new();
    walk(&crd, &mut out);
    out
}

#[tokio::test]
async fn kubectl_apply_of_crds_installs_an_established_crd() {
    let env = env();
    let out = env.kubectl(&["apply", "-f", "crds/"]);
    assert!(
        out.contains("customresourcedefinition.apiextensions.k8s.io/streamconsumers.streamops.dev"),
        "{out}"
    );
    let crd = Api::<CustomResourceDefinition>::all(admin().await)
        .get(CRD_NAME)
        .await
        .expect("the CRD exists");
    let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
    for t in ["Established", "NamesAccepted"] {
        assert!(
            conditions
                .iter()
                .any(|c| c.type_ == t && c.status == "True"),
            "{t}: {conditions:?}"
        );
    }
    // The API server estimates every CEL rule's cost when the CRD is written and refuses a CRD
    // whose rules exceed the budget; it also serves the scale and status subresources.
    let version = &crd.spec.versions[0];
    let subresources = version.subresources.as_ref().expect("subresources");
    assert!(subresources.status.is_some() && subresources.scale.is_some());
}

#[tokio::test]
async fn the_apiserver_accepts_every_example() {
    let env = env();
    let ns = TestNs::new("examples").await;
    let mut files: Vec<_> = std::fs::read_dir(env.root.join("manifests/examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 4, "one example per handler kind: {files:?}");
    for f in &files {
        let out = env.kubectl(&["apply", "-n", &ns.name, "-f", f.to_str().unwrap()]);
        assert!(
            out.contains("streamconsumer.streamops.dev/"),
            "{}: {out}",
            f.display()
        );
    }
    let api: Api<DynamicObject> = Api::namespaced_with(admin().await, &ns.name, &api_resource());
    let names: BTreeSet<String> = api
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|o| o.metadata.name)
        .collect();
    assert_eq!(
        names,
        ["fraud", "moving-average", "pipeline-trigger", "sensor"]
            .map(String::from)
            .into(),
    );
}

/// One invalid spec: what to change in a valid object, and what the rejection must name.
struct Invalid {
    what: &'static str,
    kind: HandlerKind,
    change: fn(&mut Value),
    /// The field path the API server reports.
    field: &'static str,
    /// A part of its message (the CEL rule's message for CEL rules).
    message: &'static str,
}

#[rustfmt::skip]
fn invalid_specs() -> Vec<Invalid> {
    use HandlerKind::*;
    vec![
        // OpenAPI schema.
        Invalid { what: "negative replicas", kind: MovingAverage, change: |s| s["replicas"] = json!(-1), field: "spec.replicas", message: "should be greater than or equal to 0" },
        Invalid { what: "unknown handler kind", kind: MovingAverage, change: |s| s["handler"]["kind"] = json!("median"), field: "spec.handler.kind", message: "Unsupported value: \"median\"" },
        Invalid { what: "no topics", kind: MovingAverage, change: |s| s["kafka"]["topics"] = json!([]), field: "spec.kafka.topics", message: "should have at least 1 items" },
        Invalid { what: "topic name with a space", kind: MovingAverage, change: |s| s["kafka"]["topics"] = json!(["bad topic"]), field: "spec.kafka.topics[0]", message: "should match" },
        Invalid { what: "missing kafka", kind: MovingAverage, change: |s| { s.as_object_mut().unwrap().remove("kafka"); }, field: "spec.kafka", message: "Required value" },
        Invalid { what: "batch of zero messages", kind: MovingAverage, change: |s| s["batch"] = json!({"maxMessages": 0, "maxWaitMs": 100}), field: "spec.batch.maxMessages", message: "should be greater than or equal to 1" },
        Invalid { what: "unknown cleanup policy", kind: MovingAverage, change: |s| s["cleanupPolicy"] = json!("Delete"), field: "spec.cleanupPolicy", message: "Unsupported value: \"Delete\"" },
        Invalid { what: "tiny maxMessageBytes", kind: MovingAverage, change: |s| s["maxMessageBytes"] = json!(10), field: "spec.maxMessageBytes", message: "should be greater than or equal to 1024" },
        Invalid { what: "scoring URL that is not HTTP", kind: Fraud, change: |s| s["handler"]["fraud"]["scoringUrl"] = json!("ftp://scorer"), field: "spec.handler.fraud.scoringUrl", message: "should match '^https?://'" },
        Invalid { what: "unknown log level", kind: Sensor, change: |s| s["logLevel"] = json!("verbose"), field: "spec.logLevel", message: "Unsupported value" },
        // CEL rules, each evaluated by the API server.
        Invalid { what: "pipeline-trigger without redis", kind: PipelineTrigger, change: |s| { s.as_object_mut().unwrap().remove("redis"); }, field: "spec.redis", message: "spec.redis is required when spec.handler.kind is pipeline-trigger" },
        Invalid { what: "minReplicas over maxReplicas", kind: MovingAverage, change: |s| s["autoscaling"] = json!({"minReplicas": 5, "maxReplicas": 3, "lagThreshold": 100}), field: "spec.autoscaling", message: "spec.autoscaling.minReplicas must not exceed spec.autoscaling.maxReplicas" },
        Invalid { what: "SASL_SSL without sasl", kind: MovingAverage, change: |s| s["kafka"]["security"] = json!({"protocol": "SASL_SSL"}), field: "spec.kafka.security.sasl", message: "sasl is required for the SASL_SSL and SASL_PLAINTEXT protocols" },
        Invalid { what: "SASL_PLAINTEXT without sasl", kind: MovingAverage, change: |s| s["kafka"]["security"] = json!({"protocol": "SASL_PLAINTEXT"}), field: "spec.kafka.security.sasl", message: "sasl is required for the SASL_SSL and SASL_PLAINTEXT protocols" },
        Invalid { what: "movingAverage settings on a sensor", kind: Sensor, change: |s| s["handler"]["movingAverage"] = json!({"window": 5}), field: "spec.handler.movingAverage", message: "handler.movingAverage is only allowed when handler.kind is moving-average" },
        Invalid { what: "sensor settings on a moving-average", kind: MovingAverage, change: |s| s["handler"]["sensor"] = json!({}), field: "spec.handler.sensor", message: "handler.sensor is only allowed when handler.kind is sensor" },
        Invalid { what: "session timeout over the max poll interval", kind: MovingAverage, change: |s| { s["kafka"]["sessionTimeoutMs"] = json!(120000); s["kafka"]["maxPollIntervalMs"] = json!(60000); }, field: "spec.kafka.sessionTimeoutMs", message: "sessionTimeoutMs must not exceed maxPollIntervalMs" },
        Invalid { what: "scorer retry backoff base over its cap", kind: Fraud, change: |s| s["handler"]["fraud"]["retryBackoff"] = json!({"baseMs": 5000, "capMs": 1000, "factor": 2.0}), field: "spec.handler.fraud.retryBackoff.baseMs", message: "baseMs must not exceed capMs" },
        Invalid { what: "fraud without its settings", kind: Fraud, change: |s| { s["handler"].as_object_mut().unwrap().remove("fraud"); }, field: "spec.handler.fraud", message: "handler.fraud is required when, and only when, handler.kind is fraud" },
        Invalid { what: "pipeline-trigger without its settings", kind: PipelineTrigger, change: |s| { s["handler"].as_object_mut().unwrap().remove("pipelineTrigger"); }, field: "spec.handler.pipelineTrigger", message: "handler.pipelineTrigger is required when, and only when, handler.kind is pipeline-trigger" },
        Invalid { what: "pipeline trigger with both webhook and job", kind: PipelineTrigger, change: |s| s["handler"]["pipelineTrigger"]["job"] = json!({"template": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}}), field: "spec.handler.pipelineTrigger", message: "exactly one of pipelineTrigger.webhook and pipelineTrigger.job must be set" },
        Invalid { what: "pipeline trigger with neither webhook nor job", kind: PipelineTrigger, change: |s| { s["handler"]["pipelineTrigger"].as_object_mut().unwrap().remove("webhook"); }, field: "spec.handler.pipelineTrigger", message: "exactly one of pipelineTrigger.webhook and pipelineTrigger.job must be set" },
        Invalid { what: "job container privileged", kind: PipelineTrigger, change: |s| { let p = s["handler"]["pipelineTrigger"].as_object_mut().unwrap(); p.remove("webhook"); p.insert("job".into(), json!({"template": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox", "securityContext": {"privileged": true}}]}}}})); }, field: "spec.handler.pipelineTrigger.job.template.template.spec.containers[0].securityContext.privileged", message: "privileged containers are not allowed (restricted Pod Security Standard)" },
        Invalid { what: "job container privilege escalation", kind: PipelineTrigger, change: |s| { let p = s["handler"]["pipelineTrigger"].as_object_mut().unwrap(); p.remove("webhook"); p.insert("job".into(), json!({"template": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox", "securityContext": {"allowPrivilegeEscalation": true}}]}}}})); }, field: "spec.handler.pipelineTrigger.job.template.template.spec.containers[0].securityContext.allowPrivilegeEscalation", message: "allowPrivilegeEscalation must be false (restricted Pod Security Standard)" },
        Invalid { what: "job container runAsNonRoot false", kind: PipelineTrigger, change: |s| { let p = s["handler"]["pipelineTrigger"].as_object_mut().unwrap(); p.remove("webhook"); p.insert("job".into(), json!({"template": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox", "securityContext": {"runAsNonRoot": false}}]}}}})); }, field: "spec.handler.pipelineTrigger.job.template.template.spec.containers[0].securityContext.runAsNonRoot", message: "runAsNonRoot must not be false (restricted Pod Security Standard)" },
        Invalid { what: "job container as root", kind: PipelineTrigger, change: |s| { let p = s["handler"]["pipelineTrigger"].as_object_mut().unwrap(); p.remove("webhook"); p.insert("job".into(), json!({"template": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox", "securityContext": {"runAsUser": 0}}]}}}})); }, field: "spec.handler.pipelineTrigger.job.template.template.spec.containers[0].securityContext.runAsUser", message: "running as root (runAsUser 0) is not allowed (restricted Pod Security Standard)" },
        Invalid { what: "job container adds capabilities", kind: PipelineTrigger, change: |s| { let p = s["handler"]["pipelineTrigger"].as_object_mut().unwrap(); p.remove("webhook"); p.insert("job".into(), json!({"template": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox", "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}]}}}})); }, field: "spec.handler.pipelineTrigger.job.template.template.spec.containers[0].securityContext.capabilities.add", message: "added capabilities are not allowed (restricted Pod Security Standard)" },
        Invalid { what: "job container host port", kind: PipelineTrigger, change: |s| { let p = s["handler"]["pipelineTrigger"].as_object_mut().unwrap(); p.remove("webhook"); p.insert("job".into(), json!({"template": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox", "ports": [{"containerPort": 80, "hostPort": 80}]}]}}}})); }, field: "spec.handler.pipelineTrigger.job.template.template.spec.containers[0].ports", message: "host ports are not allowed (restricted Pod Security Standard)" },
        Invalid { what: "job pod hostNetwork", kind: PipelineTrigger, change: |s| { let p = s["handler"]["pipelineTrigger"].as_object_mut().unwrap(); p.remove("webhook"); p.insert("job".into(), json!({"template": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}], "hostNetwork": true}}}})); }, field: "spec.handler.pipelineTrigger.job.template.template.spec.hostNetwork", message: "hostNetwork is not allowed (restricted Pod Security Standard)" },
        Invalid { what: "job pod hostPID", kind: PipelineTrigger, change: |s| { let p = s["handler"]["pipelineTrigger"].as_object_mut().unwrap(); p.remove("webhook"); p.insert("job".into(), json!({"template": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}], "hostPID": true}}}})); }, field: "spec.handler.pipelineTrigger.job.template.template.spec.hostPID", message: "hostPID is not allowed (restricted Pod Security Standard)" },
        Invalid { what: "job pod hostIPC", kind: PipelineTrigger, change: |s| { let p = s["handler"]["pipelineTrigger"].as_object_mut().unwrap(); p.remove("webhook"); p.insert("job".into(), json!({"template": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}], "hostIPC": true}}}})); }, field: "spec.handler.pipelineTrigger.job.template.template.spec.hostIPC", message: "hostIPC is not allowed (restricted Pod Security Standard)" },
        Invalid { what: "job pod hostPath volume", kind: PipelineTrigger, change: |s| { let p = s["handler"]["pipelineTrigger"].as_object_mut().unwrap(); p.remove("webhook"); p.insert("job".into(), json!({"template": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}], "volumes": [{"name": "h", "hostPath": {"path": "/"}}]}}}})); }, field: "spec.handler.pipelineTrigger.job.template.template.spec.volumes", message: "hostPath volumes are not allowed (restricted Pod Security Standard)" },
        Invalid { what: "replay with two targets", kind: MovingAverage, change: |s| s["replay"] = json!({"requestId": "r1", "toEarliest": true, "fromTimestamp": "2024-03-20T10:30:00Z"}), field: "spec.replay", message: "replay needs exactly one of toEarliest, fromTimestamp and offsets" },
        Invalid { what: "error topic among the consumed topics", kind: MovingAverage, change: |s| s["errorTopic"] = s["kafka"]["topics"][0].clone(), field: "spec.errorTopic", message: "spec.errorTopic (default: the first topic plus -failed) must differ from every consumed topic, or rejected messages loop back into the consumer" },
    ]
}

#[tokio::test]
async fn the_apiserver_rejects_invalid_specs_naming_the_field_and_evaluates_every_cel_rule() {
    let ns = TestNs::new("invalid").await;
    let api: Api<DynamicObject> = Api::namespaced_with(admin().await, &ns.name, &api_resource());
    let mut seen = BTreeSet::new();
    let mut failures = Vec::new();
    for (i, case) in invalid_specs().into_iter().enumerate() {
        let name = format!("invalid-{i}");
        let mut obj = consumer_json(&name, case.kind);
        // The unchanged object is accepted (server-side dry run), so the rejection below is the
        // change's doing.
        let valid: DynamicObject = serde_json::from_value(obj.clone()).unwrap();
        if let Err(e) = api
            .create(
                &PostParams {
                    dry_run: true,
                    ..Default::default()
                },
                &valid,
            )
            .await
        {
            failures.push(format!(
                "{}: the valid base object was rejected: {e}",
                case.what
            ));
            continue;
        }
        (case.change)(&mut obj["spec"]);
        let bad: DynamicObject = serde_json::from_value(obj).unwrap();
        match api.create(&PostParams::default(), &bad).await {
            Ok(_) => failures.push(format!("{}: accepted", case.what)),
            Err(kube::Error::Api(status)) => {
                let m = &status.message;
                if status.code != 422 || !m.contains(case.field) || !m.contains(case.message) {
                    failures.push(format!(
                        "{}: expected 422 naming `{}` with `{}`, got {}: {m}",
                        case.what, case.field, case.message, status.code
                    ));
                }
                seen.insert(case.message.to_string());
            }
            Err(e) => failures.push(format!("{}: {e}", case.what)),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let untested: Vec<_> = cel_messages().difference(&seen).cloned().collect();
    assert!(
        untested.is_empty(),
        "CEL rules never exercised against the API server (add a case): {untested:?}"
    );
}

#[tokio::test]
async fn kubectl_get_shows_the_printer_columns_with_lag() {
    let env = env();
    let ns = TestNs::new("columns").await;
    let client = admin().await;
    let api: Api<DynamicObject> = Api::namespaced_with(client, &ns.name, &api_resource());
    let obj: DynamicObject =
        serde_json::from_value(consumer_json("columns", HandlerKind::Sensor)).unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap();
    // No operator here: the status is written directly, the way the operator writes it.
    api.patch_status(
        "columns",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "replicas": 1, "readyReplicas": 1, "phase": "Running",
            "lag": {"total": 4242, "partitions": 3, "members": 1, "maxPartitionLag": 2000,
                    "observedAt": "2026-01-01T00:00:00Z"}
        }})),
    )
    .await
    .unwrap();
    let out = env.kubectl(&["get", "streamconsumers", "-n", &ns.name]);
    let mut lines = out.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "HANDLER", "TOPICS", "DESIRED", "READY", "LAG", "PHASE", "AGE"],
        "{out}"
    );
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(row.len(), header.len(), "{out}");
    assert_eq!(row[0], "columns");
    assert_eq!(row[1], "sensor");
    assert_eq!(row[2], "[\"machine.sensor.readings\"]");
    assert_eq!(row[3], "1");
    assert_eq!(row[4], "1");
    assert_eq!(row[5], "4242", "{out}");
    assert_eq!(row[6], "Running", "{out}");
    // The short name and the category work too.
    let out = env.kubectl(&["get", "stc", "-n", &ns.name, "-o", "name"]);
    assert_eq!(out.trim(), "streamconsumer.streamops.dev/columns");
    let out = env.kubectl(&["get", "streamops", "-n", &ns.name, "-o", "name"]);
    assert!(
        out.contains("streamconsumer.streamops.dev/columns"),
        "{out}"
    );
}

#[tokio::test]
async fn kubectl_explain_shows_the_handler_field_docs() {
    let env = env();
    // The API server publishes the CRD's OpenAPI a moment after it is established.
    let out = eventually(
        "kubectl explain streamconsumer.spec.handler",
        Duration::from_secs(60),
        || async {
            let out = env.kubectl_output(&["explain", "streamconsumer.spec.handler"]);
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        },
    )
    .await;
    for expected in [
        "KIND:       StreamConsumer",
        "FIELD: handler <Object>",
        "What the workers do with each message.",
        "kind\t<string> -required-",
        "movingAverage\t<Object>",
        "pipelineTrigger\t<Object>",
        "Settings of the fraud handler.",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
}
