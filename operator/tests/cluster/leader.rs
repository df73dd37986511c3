//! Leader election with two operator processes on the chart's Lease, under the chart's RBAC.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams, PostParams};
use streamops_crds::v1alpha1::HandlerKind;
use streamops_crds::StreamConsumer;

use crate::harness::{
    admin, eventually, unique, Operator, OperatorSpec, TestNs, LEASE_NAME, SYSTEM_NS,
};
use crate::lifecycle::consumer;

/// The operator's lease settings (client-go's defaults, operator/src/leader.rs).
const LEASE_DURATION: Duration = Duration::from_secs(15);
const RETRY_PERIOD: Duration = Duration::from_secs(2);

fn holder(lease: &Lease) -> Option<String> {
    lease.spec.as_ref()?.holder_identity.clone()
}

fn micros(t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime>) -> i64 {
    t.as_ref()
        .map(|t| t.0.as_microsecond())
        .expect("a lease time")
}

#[tokio::test]
async fn killing_the_leader_hands_over_after_the_lease_expires_and_never_two_lead_at_once() {
    let ns = TestNs::new("leader").await;
    let client = admin().await;
    let spec = |who: &str| OperatorSpec {
        leader_election: true,
        pod_name: unique(who),
        ..OperatorSpec::watching(&ns.name)
    };
    let a = Operator::start(spec("leader-a"));
    let b = Operator::start(spec("leader-b"));
    let mut ops = [a, b];

    // Sample both processes' streamops_operator_leader every 100 ms for the whole test.
    let ports = [ops[0].metrics_port, ops[1].metrics_port];
    let stop = Arc::new(AtomicBool::new(false));
    let both = Arc::new(AtomicUsize::new(0));
    let samples = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, both, samples) = (stop.clone(), both.clone(), samples.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let g0 = crate::harness::leader_gauge_at(ports[0]).await;
                let g1 = crate::harness::leader_gauge_at(ports[1]).await;
                if g0 == Some(1) && g1 == Some(1) {
                    both.fetch_add(1, Ordering::SeqCst);
                }
                samples.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let leases: Api<Lease> = Api::namespaced(client.clone(), SYSTEM_NS);
    // A lease left by an earlier run expires first: allow twice its duration.
    let first = eventually(
        "one of the two to hold the lease",
        LEASE_DURATION * 2 + Duration::from_secs(10),
        || async {
            let lease = leases.get(LEASE_NAME).await.ok()?;
            let h = holder(&lease)?;
            ops.iter()
                .position(|o| h.starts_with(&format!("{}_", o.name)))
        },
    )
    .await;
    let second = 1 - first;

    // The leader reconciles.
    let api: Api<StreamConsumer> = Api::namespaced(client.clone(), &ns.name);
    api.create(
        &PostParams::default(),
        &consumer("led", HandlerKind::Sensor, "readings"),
    )
    .await
    .unwrap();
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(client.clone(), &ns.name);
    eventually(
        "the leader to apply the Deployment",
        Duration::from_secs(60),
        || async { deployments.get("led").await.ok() },
    )
    .await;
    assert!(
        !ops[second].log_text().contains("became the leader"),
        "the follower became a leader too:\n{}",
        ops[second].log_text()
    );

    // Kill the leader without a chance to release the lease.
    let before = leases.get(LEASE_NAME).await.unwrap();
    let transitions = before.spec.as_ref().unwrap().lease_transitions.unwrap_or(0);
    ops[first].kill();
    let last_renew = micros(
        &leases
            .get(LEASE_NAME)
            .await
            .unwrap()
            .spec
            .unwrap()
            .renew_time,
    );
    let taken = eventually(
        "the other process to take the lease over",
        LEASE_DURATION + RETRY_PERIOD * 5,
        || async {
            let lease = leases.get(LEASE_NAME).await.ok()?;
            holder(&lease)?
                .starts_with(&format!("{}_", ops[second].name))
                .then_some(lease)
        },
    )
    .await;
    let spec = taken.spec.unwrap();
    let acquired = micros(&spec.acquire_time);
    let gap = Duration::from_micros((acquired - last_renew).max(0) as u64);
    assert!(
        gap >= LEASE_DURATION,
        "taken over {gap:?} after the dead leader's last renewal, before its lease expired"
    );
    assert!(
        gap <= LEASE_DURATION + RETRY_PERIOD * 3,
        "taken over only {gap:?} after the dead leader's last renewal"
    );
    assert_eq!(spec.lease_transitions, Some(transitions + 1));
    assert_eq!(
        spec.lease_duration_seconds,
        Some(LEASE_DURATION.as_secs() as i32)
    );

    // The new leader reconciles: a scale reaches the Deployment.
    api.patch(
        "led",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"replicas": 2}})),
    )
    .await
    .unwrap();
    eventually(
        "the new leader to scale the Deployment",
        Duration::from_secs(60),
        || async {
            let d = deployments.get("led").await.ok()?;
            (d.spec?.replicas == Some(2)).then_some(())
        },
    )
    .await;
    assert!(!ops[second].exited(), "the new leader is still running");

    stop.store(true, Ordering::SeqCst);
    sampler.await.unwrap();
    assert!(
        samples.load(Ordering::SeqCst) > 50,
        "the gauges were sampled"
    );
    assert_eq!(
        both.load(Ordering::SeqCst),
        0,
        "both processes reported streamops_operator_leader 1 at the same time"
    );
}
