//! The security rules of issue 15 on the real API server, under the operator process with the
//! chart's RBAC: an object holding a child's name is never written or deleted (every kind of
//! child), the admin's policy refuses images, Job triggers and ServiceAccounts it does not allow,
//! and a webhook header read from a Secret never shows in the status, the events or the operator's
//! log. (The CEL rules that refuse Job templates breaking the restricted Pod Security Standard are
//! exercised against this API server in `validation.rs`.)

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{Api, PostParams};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use streamops_crds::v1alpha1::HandlerKind;
use streamops_crds::StreamConsumer;

use crate::harness::{admin, env, eventually, Operator, OperatorSpec, TestNs};
use crate::lifecycle::wait_status;
use crate::validation::consumer_json;

const WAIT: Duration = Duration::from_secs(60);

fn job_template(service_account: Option<&str>) -> Value {
    let mut spec =
        json!({"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]});
    if let Some(sa) = service_account {
        spec["serviceAccountName"] = json!(sa);
    }
    json!({"template": {"template": {"spec": spec}}})
}

fn job_trigger_json(name: &str, service_account: Option<&str>) -> Value {
    let mut sc = consumer_json(name, HandlerKind::PipelineTrigger);
    let p = sc["spec"]["handler"]["pipelineTrigger"]
        .as_object_mut()
        .unwrap();
    p.remove("webhook");
    p.insert("job".into(), job_template(service_account));
    sc
}

async fn create_consumer(client: &Client, ns: &str, sc: Value) -> StreamConsumer {
    let sc: StreamConsumer = serde_json::from_value(sc).expect("a StreamConsumer");
    Api::<StreamConsumer>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sc)
        .await
        .unwrap_or_else(|e| panic!("cannot create the StreamConsumer: {e}"))
}

async fn create<K>(client: &Client, ns: &str, object: Value) -> K
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + Serialize
        + DeserializeOwned,
{
    let object: K = serde_json::from_value(object).expect("an object");
    Api::<K>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &object)
        .await
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", K::kind(&())))
}

/// The events on StreamConsumer `name` as `reason: note` lines.
fn events_of(ns: &str, name: &str) -> String {
    env().kubectl(&[
        "get",
        "events.events.k8s.io",
        "-n",
        ns,
        "--field-selector",
        &format!("regarding.name={name}"),
        "-o",
        "custom-columns=REASON:.reason,NOTE:.note",
        "--no-headers",
    ])
}

/// Waits for `Degraded=True` with `reason` and a message containing `needle`.
async fn wait_degraded(client: &Client, ns: &str, name: &str, reason: &str, needle: &str) {
    let api: Api<StreamConsumer> = Api::namespaced(client.clone(), ns);
    eventually(
        &format!("{name}: Degraded {reason} naming {needle}"),
        WAIT,
        || async {
            let status = api.get(name).await.ok()?.status?;
            status
                .conditions
                .iter()
                .any(|c| {
                    c.type_ == "Degraded"
                        && c.status == "True"
                        && c.reason == reason
                        && c.message.contains(needle)
                })
                .then_some(())
        },
    )
    .await;
}

/// One foreign object holding the name of one kind of child of StreamConsumer `sc`.
struct Held {
    sc: &'static str,
    kind: &'static str,
    name: String,
}

async fn foreign<K>(client: &Client, ns: &str, object: Value) -> String
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + Serialize
        + DeserializeOwned,
{
    let created: K = create(client, ns, object).await;
    created.meta().resource_version.clone().unwrap()
}

async fn version_of<K>(client: &Client, ns: &str, name: &str) -> Option<(bool, bool)>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + DeserializeOwned,
{
    let o = Api::<K>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .unwrap()?;
    // Whether the operator ever wrote to it (every write of the operator is recorded under its
    // field manager), and whether anything adopted it.
    let written_by_operator = o
        .meta()
        .managed_fields
        .iter()
        .flatten()
        .any(|m| m.manager.as_deref() == Some("streamops-operator"));
    Some((
        written_by_operator,
        o.meta()
            .owner_references
            .as_ref()
            .is_some_and(|r| !r.is_empty()),
    ))
}

#[tokio::test]
async fn an_object_holding_a_childs_name_is_never_written_or_deleted_for_every_kind_of_child() {
    let ns = TestNs::new("conflict").await;
    let client = admin().await;
    let n = ns.name.as_str();
    let meta = |name: &str| json!({"name": name, "labels": {"app.kubernetes.io/instance": name.split('-').next().unwrap(), "app.kubernetes.io/managed-by": "streamops-operator"}});
    // Held before any StreamConsumer exists, each by "someone else" (no controller reference).
    let mut held = Vec::new();
    let rv = foreign::<ConfigMap>(
        &client,
        n,
        json!({"metadata": meta("cm-config"), "data": {"mine": "yes"}}),
    )
    .await;
    held.push((
        Held {
            sc: "cm",
            kind: "ConfigMap",
            name: "cm-config".into(),
        },
        rv,
    ));
    let rv = foreign::<Service>(
        &client,
        n,
        json!({"metadata": meta("svc"), "spec": {"ports": [{"port": 80}]}}),
    )
    .await;
    held.push((
        Held {
            sc: "svc",
            kind: "Service",
            name: "svc".into(),
        },
        rv,
    ));
    let rv = foreign::<Deployment>(&client, n, json!({"metadata": meta("dep"), "spec": {
        "replicas": 0, "selector": {"matchLabels": {"mine": "dep"}},
        "template": {"metadata": {"labels": {"mine": "dep"}}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}})).await;
    held.push((
        Held {
            sc: "dep",
            kind: "Deployment",
            name: "dep".into(),
        },
        rv,
    ));
    let rv = foreign::<PodDisruptionBudget>(&client, n, json!({"metadata": meta("pdb"), "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"mine": "pdb"}}}})).await;
    held.push((
        Held {
            sc: "pdb",
            kind: "PodDisruptionBudget",
            name: "pdb".into(),
        },
        rv,
    ));
    let rv = foreign::<ServiceAccount>(&client, n, json!({"metadata": meta("sa-worker")})).await;
    held.push((
        Held {
            sc: "sa",
            kind: "ServiceAccount",
            name: "sa-worker".into(),
        },
        rv,
    ));
    let rv = foreign::<RoleBinding>(&client, n, json!({"metadata": meta("rb-job-trigger"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"}})).await;
    held.push((
        Held {
            sc: "rb",
            kind: "RoleBinding",
            name: "rb-job-trigger".into(),
        },
        rv,
    ));

    let _op = Operator::start(OperatorSpec {
        // (NetworkPolicies are covered by the mock-API tests: the shared chart release here is
        // installed without workerNetworkPolicy.enabled, so the operator may not read them.)
        args: vec!["--job-triggers".into()],
        ..OperatorSpec::watching(n)
    });
    for (h, _) in &held {
        let sc = match h.sc {
            "sa" | "rb" => job_trigger_json(h.sc, None),
            "pdb" => {
                let mut sc = consumer_json(h.sc, HandlerKind::MovingAverage);
                sc["spec"]["replicas"] = json!(2);
                sc
            }
            "svc" => {
                // A worker Service is only wanted when the operator reads the lag from the
                // workers: on a broker the admin did not allow (the harness allows the dev
                // stack's).
                let mut sc = consumer_json(h.sc, HandlerKind::MovingAverage);
                sc["spec"]["kafka"]["bootstrapServers"] = json!("kafka.elsewhere.example:9092");
                sc
            }
            other => consumer_json(other, HandlerKind::MovingAverage),
        };
        create_consumer(&client, n, sc).await;
    }
    for (h, rv) in &held {
        let named = format!("{} {}", h.kind, h.name);
        wait_degraded(&client, n, h.sc, "ChildConflict", &named).await;
        eventually(
            &format!("a ChildConflict event naming {named}"),
            WAIT,
            || async {
                let events = events_of(n, h.sc);
                events
                    .lines()
                    .any(|l| l.starts_with("ChildConflict") && l.contains(&named))
                    .then_some(())
            },
        )
        .await;
        let now = match h.kind {
            "ConfigMap" => version_of::<ConfigMap>(&client, n, &h.name).await,
            "Service" => version_of::<Service>(&client, n, &h.name).await,
            "Deployment" => version_of::<Deployment>(&client, n, &h.name).await,
            "PodDisruptionBudget" => version_of::<PodDisruptionBudget>(&client, n, &h.name).await,
            "ServiceAccount" => version_of::<ServiceAccount>(&client, n, &h.name).await,
            _ => version_of::<RoleBinding>(&client, n, &h.name).await,
        };
        assert_eq!(
            now,
            Some((false, false)),
            "{named} (created at resourceVersion {rv}): deleted, written by the operator or adopted"
        );
        // The pass stopped before writing anything: the workers were never created.
        if h.kind != "Deployment" {
            assert!(
                version_of::<Deployment>(&client, n, h.sc).await.is_none(),
                "{}: workers created despite the conflict",
                h.sc
            );
        }
    }
}

#[tokio::test]
async fn images_job_triggers_and_service_accounts_outside_the_policy_are_refused_and_nothing_is_made(
) {
    let ns = TestNs::new("policy").await;
    let client = admin().await;
    let n = ns.name.as_str();
    // The default policy: only the operator's own worker image, no Job triggers.
    let _strict = Operator::start(OperatorSpec::watching(n));
    let mut image = consumer_json("image", HandlerKind::MovingAverage);
    image["spec"]["image"] = json!("registry.example/evil/worker:1");
    create_consumer(&client, n, image).await;
    create_consumer(&client, n, job_trigger_json("job", None)).await;
    wait_degraded(&client, n, "image", "InvalidSpec", "spec.image").await;
    wait_degraded(
        &client,
        n,
        "job",
        "InvalidSpec",
        "spec.handler.pipelineTrigger.job",
    )
    .await;
    for name in ["image", "job"] {
        assert!(
            version_of::<Deployment>(&client, n, name).await.is_none(),
            "{name}: workers created"
        );
        assert!(
            version_of::<ConfigMap>(&client, n, &format!("{name}-config"))
                .await
                .is_none(),
            "{name}: configuration written"
        );
    }
    drop(_strict);

    // Job triggers on, with one allowed ServiceAccount: a template naming another is refused.
    let ns2 = TestNs::new("policy-sa").await;
    let n2 = ns2.name.as_str();
    let _op = Operator::start(OperatorSpec {
        args: vec![
            "--job-triggers".into(),
            "--job-service-accounts=pipeline-runner".into(),
        ],
        ..OperatorSpec::watching(n2)
    });
    create_consumer(
        &client,
        n2,
        job_trigger_json("other-sa", Some("cluster-admin-sa")),
    )
    .await;
    wait_degraded(&client, n2, "other-sa", "InvalidSpec", "serviceAccountName").await;
    assert!(version_of::<Deployment>(&client, n2, "other-sa")
        .await
        .is_none());
    assert!(
        version_of::<RoleBinding>(&client, n2, "other-sa-job-trigger")
            .await
            .is_none(),
        "no RoleBinding for a refused template"
    );
}

#[tokio::test]
async fn a_webhook_header_from_a_secret_never_appears_in_status_events_or_logs() {
    let ns = TestNs::new("secret-header").await;
    let client = admin().await;
    let n = ns.name.as_str();
    let secret_value = format!("Bearer known-secret-{}", std::process::id());
    let _: Secret = create(
        &client,
        n,
        json!({"metadata": {"name": "hook-token"}, "stringData": {"token": secret_value}}),
    )
    .await;
    let op = Operator::start(OperatorSpec::watching(n));
    let mut sc = consumer_json("hook", HandlerKind::PipelineTrigger);
    sc["spec"]["handler"]["pipelineTrigger"]["webhook"]["secretHeaders"] = json!([
        {"name": "Authorization", "secretKeyRef": {"name": "hook-token", "key": "token"}}
    ]);
    create_consumer(&client, n, sc).await;
    let api: Api<StreamConsumer> = Api::namespaced(client.clone(), n);
    wait_status(&api, "hook", "the webhook consumer reconciled", |s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Degraded" && c.status == "False")
    })
    .await;
    // The workers get the header by reference only.
    let d = Api::<Deployment>::namespaced(client.clone(), n)
        .get("hook")
        .await
        .unwrap();
    let d = serde_json::to_string(&d).unwrap();
    assert!(d.contains("hook-token"), "the Secret is referenced");
    let outputs = [
        (
            "the StreamConsumer",
            env().kubectl(&["get", "streamconsumer", "hook", "-n", n, "-o", "yaml"]),
        ),
        ("the events", events_of(n, "hook")),
        ("the Deployment", d),
        (
            "the ConfigMap",
            env().kubectl(&["get", "configmap", "hook-config", "-n", n, "-o", "yaml"]),
        ),
        ("the operator's log", op.log_text()),
    ];
    for (what, text) in outputs {
        assert!(
            !text.contains("known-secret-"),
            "{what} shows the secret value:\n{text}"
        );
    }
}
