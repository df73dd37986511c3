//! The Node object and its heartbeat (a Lease in kube-node-lease, renewed every 10 s, and the
//! Ready condition's heartbeat every 30 s), so the node lifecycle controller keeps it Ready and the
//! scheduler binds pods to it.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::Api;
use serde_json::json;

use crate::Shared;

const MANAGER: &str = "streamops-localnode";
const LEASE_SECONDS: i32 = 40;

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn node_status(shared: &Shared) -> serde_json::Value {
    let a = &shared.args;
    let t = now();
    let cond = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({"type": type_, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": t, "lastTransitionTime": t})
    };
    let resources = json!({"cpu": a.cpu, "memory": a.memory, "pods": a.max_pods.to_string(),
                           "ephemeral-storage": "100Gi"});
    json!({
        "capacity": resources,
        "allocatable": resources,
        "conditions": [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "test-only local node"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "test-only local node"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "test-only local node"),
            cond("Ready", "True", "KubeletReady", "streamops-localnode is running pods as local processes"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": a.node_name},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        "nodeInfo": {
            "architecture": std::env::consts::ARCH,
            "bootID": "", "machineID": "", "systemUUID": "",
            "containerRuntimeVersion": "streamops-localnode://processes",
            "kernelVersion": "", "kubeProxyVersion": "", "kubeletVersion": "v0.0.0-localnode",
            "operatingSystem": "linux", "osImage": "streamops-localnode (test tooling)",
        },
    })
}

/// Creates or updates the Node and sets it Ready.
pub async fn register(shared: &Shared) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(shared.client.clone());
    let name = &shared.args.node_name;
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
            "kubernetes.io/arch": std::env::consts::ARCH,
            "node.streamops.dev/type": "localnode",
        }},
    });
    let pp = PatchParams::apply(MANAGER).force();
    nodes.patch(name, &pp, &Patch::Apply(&node)).await?;
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": node_status(shared)})),
        )
        .await?;
    renew_lease(shared).await?;
    tracing::info!(node = %name, "node registered and Ready");
    Ok(())
}

async fn renew_lease(shared: &Shared) -> anyhow::Result<()> {
    let leases: Api<Lease> = Api::namespaced(shared.client.clone(), "kube-node-lease");
    let name = &shared.args.node_name;
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now()},
    });
    leases
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&lease),
        )
        .await?;
    Ok(())
}

pub async fn heartbeat(shared: Arc<Shared>) {
    let nodes: Api<Node> = Api::all(shared.client.clone());
    let mut tick = 0u64;
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        tick += 1;
        if let Err(e) = renew_lease(&shared).await {
            tracing::warn!(error = %e, "renewing the node lease failed");
        }
        if tick.is_multiple_of(3) {
            let patch = Patch::Merge(json!({"status": node_status(&shared)}));
            if let Err(e) = nodes
                .patch_status(&shared.args.node_name, &PatchParams::default(), &patch)
                .await
            {
                tracing::warn!(error = %e, "updating the node status failed");
            }
        }
    }
}
