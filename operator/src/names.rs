//! Names, labels and annotations shared by every child object.

use std::collections::BTreeMap;

/// The one field manager of every server-side apply the operator makes (children and status).
pub const FIELD_MANAGER: &str = "streamops-operator";
/// The finalizer that runs [`CleanupPolicy`](streamops_crds::v1alpha1::CleanupPolicy) on delete.
pub const FINALIZER: &str = "streamops.dev/cleanup";
/// Name of the controller in events (`reportingController`).
pub const CONTROLLER_NAME: &str = "streamops-operator";

/// `app.kubernetes.io/name`: always [`APP_NAME`].
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
/// `app.kubernetes.io/instance`: the StreamConsumer's name.
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
/// `app.kubernetes.io/managed-by`: always [`MANAGED_BY`].
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// `app.kubernetes.io/component`: see [`Component`].
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
/// Value of [`LABEL_NAME`].
pub const APP_NAME: &str = "streamops-worker";
/// Value of [`LABEL_MANAGED_BY`].
pub const MANAGED_BY: &str = "streamops-operator";

/// Pod-template annotation holding the hash of the rendered worker configuration. A new hash rolls
/// the Deployment.
pub const CONFIG_HASH_ANNOTATION: &str = "streamops.dev/config-hash";
/// Name of the worker container.
pub const WORKER_CONTAINER: &str = "worker";
/// Name of the worker's HTTP port (`/healthz`, `/readyz`, `/metrics`).
pub const HTTP_PORT_NAME: &str = "http";

/// What a child object is for; the value of [`LABEL_COMPONENT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// The worker Deployment, its pods and their PodDisruptionBudget.
    Worker,
    /// The ConfigMap with the rendered worker configuration.
    Config,
    /// The metrics Service.
    Metrics,
    /// The ServiceAccount and RoleBinding of workers that create Jobs.
    Rbac,
}

impl Component {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Worker => "worker",
            Self::Config => "config",
            Self::Metrics => "metrics",
            Self::Rbac => "rbac",
        }
    }
}

/// Name of the worker Deployment, the metrics Service and the PodDisruptionBudget.
pub fn workload_name(instance: &str) -> String {
    instance.to_string()
}

/// Name of the worker ConfigMap.
pub fn config_map_name(instance: &str) -> String {
    format!("{instance}-config")
}

/// Name of the ServiceAccount, Role and RoleBinding of workers that create Jobs.
pub fn worker_rbac_name(instance: &str) -> String {
    format!("{instance}-worker")
}

/// Name of the RoleBinding that binds Job-trigger workers to the Job-trigger ClusterRole.
pub fn job_trigger_binding_name(instance: &str) -> String {
    format!("{instance}-job-trigger")
}

/// Default name of the ClusterRole Job-trigger workers are bound to (the chart's is
/// `<release>-job-trigger`, passed with `--job-trigger-cluster-role`).
pub const DEFAULT_JOB_TRIGGER_CLUSTER_ROLE: &str = "streamops-job-trigger";

/// The four `app.kubernetes.io` labels of a child.
pub fn labels(instance: &str, component: Component) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_string(), APP_NAME.to_string()),
        (LABEL_INSTANCE.to_string(), instance.to_string()),
        (LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
        (LABEL_COMPONENT.to_string(), component.as_str().to_string()),
    ])
}

/// The labels that select the worker pods of one StreamConsumer (the Deployment's immutable
/// selector, the Service and the PodDisruptionBudget).
pub fn selector_labels(instance: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_string(), APP_NAME.to_string()),
        (LABEL_INSTANCE.to_string(), instance.to_string()),
    ])
}

/// [`selector_labels`] as a label-selector string, for `status.selector` (the scale subresource).
pub fn selector_string(instance: &str) -> String {
    to_selector(&selector_labels(instance))
}

/// Selects every child the operator made for one StreamConsumer (orphan cleanup).
pub fn children_selector(instance: &str) -> String {
    to_selector(&BTreeMap::from([
        (LABEL_INSTANCE.to_string(), instance.to_string()),
        (LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
    ]))
}

/// Selects every child the operator made (the watches on owned objects).
pub fn managed_selector() -> String {
    format!("{LABEL_MANAGED_BY}={MANAGED_BY}")
}

fn to_selector(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_string_lists_name_and_instance_sorted() {
        assert_eq!(
            selector_string("orders"),
            "app.kubernetes.io/instance=orders,app.kubernetes.io/name=streamops-worker"
        );
    }

    #[test]
    fn children_selector_matches_instance_and_manager() {
        assert_eq!(
            children_selector("orders"),
            "app.kubernetes.io/instance=orders,app.kubernetes.io/managed-by=streamops-operator"
        );
    }

    #[test]
    fn every_child_label_set_carries_the_four_app_labels() {
        let l = labels("orders", Component::Config);
        assert_eq!(l.len(), 4);
        assert_eq!(l[LABEL_COMPONENT], "config");
        assert_eq!(l[LABEL_MANAGED_BY], "streamops-operator");
    }
}
