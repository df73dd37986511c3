//! The Helm chart with real helm (built from Go modules) against the real API server: lint,
//! template (and manifests/install.yaml being its default rendering), install, upgrade, uninstall,
//! and the operator running under the chart's namespaced-mode RBAC.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::{ClusterRole, Role};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use streamops_crds::v1alpha1::HandlerKind;
use streamops_crds::StreamConsumer;

use crate::harness::{admin, env, eventually, unique, Operator, OperatorSpec, TestNs};
use crate::lifecycle::{consumer, wait_status};

#[test]
fn helm_lint_passes() {
    let out = env().helm(&["lint", "charts/streamops", "--strict"]);
    assert!(
        out.contains("1 chart(s) linted, 0 chart(s) failed"),
        "{out}"
    );
}

#[test]
fn helm_template_with_default_values_is_manifests_install_yaml() {
    let env = env();
    let version = env.helm(&["version", "--template", "{{.Version}}"]);
    let expected_version = format!("v{}", versions_env("HELM_VERSION"));
    assert_eq!(
        version.trim(),
        expected_version,
        "helm reports its real version"
    );
    let rendered = env.helm(&[
        "template",
        "streamops",
        "charts/streamops",
        "--namespace",
        "streamops-system",
        "--include-crds",
    ]);
    let install = std::fs::read_to_string(env.root.join("manifests/install.yaml")).unwrap();
    // install.yaml = a comment header, the streamops-system Namespace, then the rendering.
    let body = install
        .split_once("\n---\n# Source: ")
        .map(|(_, rest)| format!("---\n# Source: {rest}"))
        .expect("install.yaml has the chart's rendering after its Namespace");
    assert!(
        body == rendered,
        "manifests/install.yaml differs from `helm template` with default values; run `make manifests`.\n{}",
        first_difference(&body, &rendered)
    );
    let head = &install[..install.len() - body.len()];
    assert!(
        head.contains("kind: Namespace\nmetadata:\n  name: streamops-system\n"),
        "{head}"
    );
}

fn first_difference(a: &str, b: &str) -> String {
    for (i, (x, y)) in a.lines().zip(b.lines()).enumerate() {
        if x != y {
            return format!("line {}: install.yaml {x:?} vs helm {y:?}", i + 1);
        }
    }
    format!(
        "one is a prefix of the other ({} vs {} lines)",
        a.lines().count(),
        b.lines().count()
    )
}

/// A value from versions.env (`KEY=value` lines).
fn versions_env(key: &str) -> String {
    let text = std::fs::read_to_string(env().root.join("versions.env")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key} in versions.env"))
        .trim()
        .to_string()
}

#[tokio::test]
async fn helm_install_upgrade_and_uninstall_keep_the_crd() {
    let env = env();
    let ns = TestNs::new("helm").await;
    let release = unique("streamops-h");
    let operator_name = format!("{release}-operator");
    let client = admin().await;

    let out = env.helm(&[
        "install",
        &release,
        "charts/streamops",
        "--namespace",
        &ns.name,
    ]);
    assert!(out.contains("STATUS: deployed"), "{out}");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let d = deployments.get(&operator_name).await.unwrap();
    let spec = d.spec.unwrap();
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(
        spec.template
            .spec
            .as_ref()
            .unwrap()
            .service_account_name
            .as_deref(),
        Some(operator_name.as_str())
    );
    Api::<ClusterRole>::all(client.clone())
        .get(&operator_name)
        .await
        .expect("the ClusterRole");
    let roles: Api<Role> = Api::namespaced(client.clone(), &ns.name);
    assert!(
        roles
            .get_opt(&format!("{operator_name}-leader-election"))
            .await
            .unwrap()
            .is_none(),
        "one replica: no leader election"
    );

    // Upgrade with changed values: two replicas turn leader election on.
    let out = env.helm(&[
        "upgrade",
        &release,
        "charts/streamops",
        "--namespace",
        &ns.name,
        "--set",
        "replicaCount=2",
        "--set",
        "logLevel=debug",
    ]);
    assert!(out.contains("REVISION: 2"), "{out}");
    let d = deployments.get(&operator_name).await.unwrap();
    let spec = d.spec.unwrap();
    assert_eq!(spec.replicas, Some(2));
    let container = &spec.template.spec.unwrap().containers[0];
    let env_value = |name: &str| {
        container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(env_value("RUST_LOG").as_deref(), Some("debug"));
    assert_eq!(
        env_value("STREAMOPS_LEADER_ELECTION").as_deref(),
        Some("true")
    );
    roles
        .get(&format!("{operator_name}-leader-election"))
        .await
        .expect("the leader-election Role");

    // Uninstall removes the release's objects and keeps the CRD.
    env.helm(&["uninstall", &release, "--namespace", &ns.name]);
    eventually(
        "the release's objects gone",
        Duration::from_secs(30),
        || async {
            let gone = deployments.get_opt(&operator_name).await.ok()?.is_none()
                && Api::<ClusterRole>::all(client.clone())
                    .get_opt(&operator_name)
                    .await
                    .ok()?
                    .is_none();
            gone.then_some(())
        },
    )
    .await;
    let crd = Api::<CustomResourceDefinition>::all(client.clone())
        .get("streamconsumers.streamops.dev")
        .await
        .expect("helm uninstall keeps the CRD");
    assert!(crd.metadata.deletion_timestamp.is_none());
    assert_eq!(
        crd.metadata
            .annotations
            .unwrap_or_default()
            .get("helm.sh/resource-policy")
            .map(String::as_str),
        Some("keep")
    );
}

#[tokio::test]
async fn the_operator_runs_under_the_charts_namespaced_rbac() {
    let env = env();
    let system = TestNs::new("nsmode-sys").await;
    let watched = TestNs::new("nsmode-app").await;
    let other = TestNs::new("nsmode-other").await;
    let release = unique("streamops-n");
    let operator_name = format!("{release}-operator");
    env.helm(&[
        "install",
        &release,
        "charts/streamops",
        "--namespace",
        &system.name,
        "--set",
        &format!("watchNamespace={}", watched.name),
        "--set",
        "leaderElection.force=true",
    ]);

    // The ServiceAccount may act in the watched namespace only.
    let sa = format!("system:serviceaccount:{}:{operator_name}", system.name);
    let can = |verb: &str, resource: &str, ns: &str| {
        env.kubectl_output(&["auth", "can-i", verb, resource, "-n", ns, "--as", &sa])
            .stdout
            .starts_with(b"yes")
    };
    assert!(can("watch", "streamconsumers.streamops.dev", &watched.name));
    assert!(can("patch", "deployments.apps", &watched.name));
    assert!(!can("list", "streamconsumers.streamops.dev", &other.name));
    assert!(!can("list", "streamconsumers.streamops.dev", "default"));
    assert!(
        !can("get", "secrets", &watched.name),
        "the operator reads no Secrets"
    );

    let _op = Operator::start(OperatorSpec {
        sa_namespace: system.name.clone(),
        service_account: operator_name.clone(),
        watch: Some(watched.name.clone()),
        leader_election: true,
        lease_name: operator_name.clone(),
        pod_name: unique("nsmode"),
        args: Vec::new(),
    });
    let client = admin().await;
    let api: Api<StreamConsumer> = Api::namespaced(client.clone(), &watched.name);
    // A webhook trigger (job triggers are off unless the admin enables them: policy.jobTriggers).
    let sc = consumer("scoped", HandlerKind::PipelineTrigger, "events");
    api.create(&PostParams::default(), &sc).await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &watched.name);
    eventually(
        "the Deployment in the watched namespace",
        Duration::from_secs(90),
        || async { deployments.get("scoped").await.ok() },
    )
    .await;
    wait_status(&api, "scoped", "a status", |s| s.selector.is_some()).await;
    Api::<ConfigMap>::namespaced(client.clone(), &watched.name)
        .get("scoped-config")
        .await
        .expect("the workers' ConfigMap, written under the namespaced Role");
    // The Lease is the chart's, in the release namespace.
    let lease =
        Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), &system.name)
            .get(&operator_name)
            .await
            .expect("the chart's Lease");
    assert!(lease.spec.unwrap().holder_identity.is_some());
    env.helm(&["uninstall", &release, "--namespace", &system.name]);
}
