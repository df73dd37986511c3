//! The worker Service, under the real API server, the EndpointSlice controller and the garbage
//! collector. Only a StreamConsumer whose lag the operator reads from its workers (its brokers are
//! not on the allow-list; the harness allows the dev stack's 127.0.0.1:9092) has one. It is
//! headless, and a ClusterIP one left by an earlier version is replaced (`spec.clusterIP` is
//! immutable); one that is no longer wanted is deleted. A Service that the StreamConsumer does not
//! control is never deleted.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use streamops_crds::v1alpha1::HandlerKind;
use streamops_crds::StreamConsumer;

use crate::harness::{admin, env, eventually, unique, Operator, OperatorSpec, TestNs, TEST_LABEL};
use crate::lifecycle::{consumer, mark_pods_ready, wait_status};

const WAIT: Duration = Duration::from_secs(60);

/// A broker the harness's operator is not allowed to contact: the lag of a StreamConsumer on it
/// comes from its workers, through the worker Service.
const OTHER_BROKER: &str = "kafka.elsewhere.example:9092";

/// [`consumer`] on [`OTHER_BROKER`].
fn reporting_consumer(name: &str, topic: &str) -> StreamConsumer {
    let mut sc = consumer(name, HandlerKind::MovingAverage, topic);
    sc.spec.kafka.bootstrap_servers = OTHER_BROKER.into();
    sc
}

/// The worker Service of StreamConsumer `name` as earlier versions made it: a ClusterIP, and a
/// controller reference to `owner_uid` (`None`: someone else's Service, no owner).
fn cluster_ip_service(name: &str, owner_uid: Option<&str>) -> Service {
    let mut meta = json!({
        "name": name,
        "labels": {
            "app.kubernetes.io/instance": name,
            "app.kubernetes.io/managed-by": "streamops-operator"
        }
    });
    if let Some(uid) = owner_uid {
        meta["ownerReferences"] = json!([{
            "apiVersion": "streamops.dev/v1alpha1", "kind": "StreamConsumer",
            "name": name, "uid": uid, "controller": true, "blockOwnerDeletion": true
        }]);
    }
    serde_json::from_value(json!({
        "metadata": meta,
        "spec": {
            "type": "ClusterIP",
            "selector": {"app.kubernetes.io/instance": name},
            "ports": [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
        }
    }))
    .unwrap()
}

fn cluster_ip(svc: &Service) -> Option<&str> {
    svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref())
}

/// Before any operator runs: StreamConsumer `orders` (`ours`) with the ClusterIP Service an
/// earlier version made for it, and StreamConsumer `foreign` (`theirs`) whose name is held by
/// someone else's ClusterIP Service (labelled like a child). Returns the uid of `orders`, its old
/// Service and the foreign Service.
async fn seed(
    api: &Api<StreamConsumer>,
    services: &Api<Service>,
    ours: StreamConsumer,
    theirs: StreamConsumer,
) -> (String, Service, Service) {
    let sc = api.create(&PostParams::default(), &ours).await.unwrap();
    let uid = sc.metadata.uid.clone().unwrap();
    let old = services
        .create(
            &PostParams::default(),
            &cluster_ip_service("orders", Some(&uid)),
        )
        .await
        .unwrap();
    api.create(&PostParams::default(), &theirs).await.unwrap();
    let foreign = services
        .create(&PostParams::default(), &cluster_ip_service("foreign", None))
        .await
        .unwrap();
    (uid, old, foreign)
}

#[tokio::test]
async fn an_old_cluster_ip_service_of_ours_is_replaced_by_a_headless_one_with_endpoint_slices() {
    let ns = TestNs::new("svc").await;
    let client = admin().await;
    let api: Api<StreamConsumer> = Api::namespaced(client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);

    let (uid, old, foreign) = seed(
        &api,
        &services,
        reporting_consumer("orders", "svc-orders"),
        reporting_consumer("foreign", "svc-foreign"),
    )
    .await;
    let old_ip = cluster_ip(&old).unwrap().to_string();
    assert_ne!(old_ip, "None", "the API server allocated a ClusterIP");

    let _op = Operator::start(OperatorSpec::watching(&ns.name));

    // Ours is replaced: a new object, headless, still controlled by the StreamConsumer.
    let new = eventually("a headless Service orders", WAIT, || async {
        let s = services.get("orders").await.ok()?;
        (cluster_ip(&s) == Some("None")).then_some(s)
    })
    .await;
    assert_ne!(new.metadata.uid, old.metadata.uid, "a new object");
    assert!(new
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.controller == Some(true)));

    // Someone else's is left alone, and reported.
    // (A failed pass leaves the top-level observedGeneration alone: only the conditions tell.)
    eventually("foreign: Degraded=True ChildConflict", WAIT, || async {
        let status = api.get("foreign").await.ok()?.status?;
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Degraded" && c.status == "True" && c.reason == "ChildConflict")
            .then_some(())
    })
    .await;
    let still = services.get("foreign").await.unwrap();
    assert_eq!(still.metadata.uid, foreign.metadata.uid, "not replaced");
    assert_eq!(cluster_ip(&still), cluster_ip(&foreign), "not changed");

    // The EndpointSlice controller keeps slices for the headless Service: once the worker pod
    // is ready, it is listed, ready, on the http port, in a slice the controller made for the new
    // Service. The controller lists only pods with an address on an existing Node, and there is
    // no kubelet: the pod is bound to a Node object made for this test (unschedulable: the
    // scheduler puts no other pod there) and given an address.
    let node = TestNode::new().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let pod = eventually("a worker pod", WAIT, || async {
        pods.list(&ListParams::default().labels("app.kubernetes.io/instance=orders"))
            .await
            .ok()?
            .items
            .into_iter()
            .next()
    })
    .await;
    let pod_name = pod.metadata.name.clone().unwrap();
    let binding = json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": pod_name},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node.name}
    });
    pods.create_subresource::<_, serde_json::Value>(
        "binding",
        &pod_name,
        &PostParams::default(),
        &binding,
    )
    .await
    .unwrap_or_else(|e| panic!("cannot bind {pod_name} to {}: {e}", node.name));
    pods.patch_status(
        &pod_name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"podIP": "10.244.0.7", "podIPs": [{"ip": "10.244.0.7"}]}})),
    )
    .await
    .unwrap();
    mark_pods_ready(&client, &ns.name, "orders").await;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns.name);
    let new_uid = new.metadata.uid.clone().unwrap();
    eventually(
        "an EndpointSlice of the headless Service listing the ready worker",
        WAIT,
        || async {
            let list = slices
                .list(&ListParams::default().labels("kubernetes.io/service-name=orders"))
                .await
                .ok()?;
            list.items.into_iter().find(|s| {
                let for_new =
                    s.metadata.owner_references.iter().flatten().any(|o| {
                        o.kind == "Service" && o.uid == new_uid && o.controller == Some(true)
                    });
                let http = s
                    .ports
                    .iter()
                    .flatten()
                    .any(|p| p.name.as_deref() == Some("http") && p.port == Some(8080));
                let ready = s.endpoints.iter().any(|e| {
                    e.addresses == ["10.244.0.7"]
                        && e.conditions.as_ref().and_then(|c| c.ready) == Some(true)
                });
                for_new && http && ready
            })
        },
    )
    .await;
}

#[tokio::test]
async fn the_worker_service_of_a_consumer_whose_lag_comes_from_its_brokers_is_deleted_and_someone_elses_kept(
) {
    let ns = TestNs::new("svc-gone").await;
    let client = admin().await;
    let api: Api<StreamConsumer> = Api::namespaced(client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);

    // Both StreamConsumers on the allowed broker: no Service is wanted for either.
    let (_, _, foreign) = seed(
        &api,
        &services,
        consumer("orders", HandlerKind::MovingAverage, "svc-gone-orders"),
        consumer("foreign", HandlerKind::MovingAverage, "svc-gone-foreign"),
    )
    .await;

    let _op = Operator::start(OperatorSpec::watching(&ns.name));

    // Ours is deleted; the workers are there.
    eventually("the Service orders deleted", WAIT, || async {
        services
            .get_opt("orders")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let (_, status) = wait_status(&api, "orders", "orders reconciled", |_| true).await;
    assert!(
        !status
            .conditions
            .iter()
            .any(|c| c.type_ == "Degraded" && c.status == "True"),
        "{status:?}"
    );
    // Someone else's is neither deleted, nor written, nor in the way: no Service is wanted.
    let (_, status) = wait_status(&api, "foreign", "foreign reconciled", |_| true).await;
    assert!(
        !status
            .conditions
            .iter()
            .any(|c| c.type_ == "Degraded" && c.status == "True"),
        "nothing in the way: {status:?}"
    );
    let still = services.get("foreign").await.unwrap();
    assert_eq!(still.metadata.uid, foreign.metadata.uid, "not replaced");
    assert_eq!(
        still.metadata.resource_version, foreign.metadata.resource_version,
        "not written"
    );
}

/// A Node object for one test (no kubelet behind it), unschedulable, deleted on drop.
struct TestNode {
    name: String,
}

impl TestNode {
    async fn new() -> Self {
        let name = unique("svc-node");
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {TEST_LABEL: "true"}},
            "spec": {"unschedulable": true}
        }))
        .unwrap();
        Api::<Node>::all(admin().await)
            .create(&PostParams::default(), &node)
            .await
            .unwrap_or_else(|e| panic!("cannot create node {name}: {e}"));
        Self { name }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let _ = env().kubectl_output(&["delete", "node", &self.name, "--wait=false"]);
    }
}
