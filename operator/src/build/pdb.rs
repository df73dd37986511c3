use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::BuildContext;
use crate::names::{selector_labels, workload_name, Component};

/// With more than one replica, a PodDisruptionBudget that lets voluntary disruptions (node drains)
/// take one worker at a time, so the group rebalances once per evicted pod instead of losing all
/// consumers at once. Unhealthy pods may always be evicted, so a crash-looping worker never blocks a
/// drain. With one replica or none there is nothing to protect, and no budget.
pub fn build_pdb(ctx: &BuildContext<'_>) -> Option<PodDisruptionBudget> {
    (ctx.replicas > 1).then(|| PodDisruptionBudget {
        metadata: ctx.child_meta(workload_name(ctx.name), Component::Worker),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(ctx.name)),
                ..LabelSelector::default()
            }),
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::test_support::with_ctx;
    use streamops_crds::StreamConsumer;

    #[test]
    fn pdb_exists_only_with_more_than_one_replica() {
        for (replicas, wanted) in [(0, false), (1, false), (2, true), (5, true)] {
            let sc = StreamConsumer::test().with_replicas(replicas);
            assert_eq!(
                with_ctx(&sc, build_pdb).is_some(),
                wanted,
                "replicas {replicas}"
            );
        }
    }

    #[test]
    fn pdb_allows_one_worker_down_at_a_time() {
        let pdb = with_ctx(&StreamConsumer::test().with_replicas(3), build_pdb).unwrap();
        let spec = pdb.spec.unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(spec.min_available, None);
        assert_eq!(
            spec.selector.unwrap().match_labels.unwrap(),
            selector_labels("test")
        );
    }
}
