//! The worker Service is headless, and a ClusterIP one left by an earlier version is replaced
//! (`spec.clusterIP` is immutable): under the real API server, the EndpointSlice controller and
//! the garbage collector. A Service with a ClusterIP that the StreamConsumer does not control is
//! never deleted.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use streamops_crds::v1alpha1::HandlerKind;
use streamops_crds::StreamConsumer;

use crate::harness::{admin, env, eventually, unique, Operator, OperatorSpec, TestNs, TEST_LABEL};
use crate::lifecycle::{consumer, mark_pods_ready};

const WAIT: Duration = Duration::from_secs(60);

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

#[tokio::test]
async fn an_old_cluster_ip_service_of_ours_is_replaced_by_a_headless_one_with_endpoint_slices() {
    let ns = TestNs::new("svc").await;
    let client = admin().await;
    let api: Api<StreamConsumer> = Api::namespaced(client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);

    // Before any operator runs: a StreamConsumer with the ClusterIP Service an earlier version
    // made for it, and another one whose name is held by someone else's ClusterIP Service.
    let sc = api
        .create(
            &PostParams::default(),
            &consumer("orders", HandlerKind::MovingAverage, "svc-orders"),
        )
        .await
        .unwrap();
    let uid = sc.metadata.uid.clone().unwrap();
    let old = services
        .create(
            &PostParams::default(),
            &cluster_ip_service("orders", Some(&uid)),
        )
        .await
        .unwrap();
    let old_ip = cluster_ip(&old).unwrap().to_string();
    assert_ne!(old_ip, "None", "the API server allocated a ClusterIP");
    api.create(
        &PostParams::default(),
        &consumer("foreign", HandlerKind::MovingAverage, "svc-foreign"),
    )
    .await
    .unwrap();
    let foreign = services
        .create(&PostParams::default(), &cluster_ip_service("foreign", None))
        .await
        .unwrap();

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
