//! Pure functions from a StreamConsumer to each child object.
//!
//! Every `build_*` function takes a [`BuildContext`] and returns one object, ready for server-side
//! apply: `apiVersion`, `kind`, name, namespace, the four `app.kubernetes.io` labels and a
//! controller owner reference, so deleting the StreamConsumer cascades. Nothing here talks to the
//! API server.

mod config_map;
mod deployment;
mod network_policy;
mod pdb;
mod rbac;
mod service;
mod worker_tracing;

pub use config_map::build_config_map;
pub use deployment::{
    build_deployment, termination_grace_period_seconds, CONFIG_VOLUME, POD_USER_ID,
    SHUTDOWN_MARGIN_MS,
};
pub use network_policy::{build_network_policy, egress_ports, url_port, WorkerNetwork};
pub use pdb::build_pdb;
pub use rbac::{build_role_binding, build_service_account, build_worker_rbac, WorkerRbac};
pub use service::build_service;
pub use worker_tracing::{tracing_env, TracingSettingsError, WorkerTracing, OTLP_PROTOCOL};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use sha2::{Digest, Sha256};
use streamops_crds::config::WorkerConfig;
use streamops_crds::v1alpha1::{HandlerKind, StreamConsumer};

use crate::names::{labels, Component, DEFAULT_JOB_TRIGGER_CLUSTER_ROLE};
use crate::Error;

/// The worker configuration of a StreamConsumer, rendered as it goes into the ConfigMap.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderedConfig {
    /// The configuration.
    pub config: WorkerConfig,
    /// Its YAML rendering, the ConfigMap's `worker.yaml`.
    pub yaml: String,
    /// [`config_hash`] of `yaml`.
    pub hash: String,
}

impl RenderedConfig {
    /// Derives and renders the worker configuration of `sc`.
    pub fn render(sc: &StreamConsumer) -> Result<Self, Error> {
        let config = WorkerConfig::from_resource(sc)?;
        let yaml = config.to_yaml().map_err(Error::RenderConfig)?;
        let hash = config_hash(&yaml);
        Ok(Self { config, yaml, hash })
    }
}

/// Hash of a rendered configuration: the first 16 hex digits of its SHA-256. It goes into the pod
/// template, so a configuration change rolls the workers and nothing else does.
pub fn config_hash(rendered: &str) -> String {
    let digest = Sha256::digest(rendered.as_bytes());
    hex::encode(&digest[..8])
}

/// Everything the `build_*` functions need.
#[derive(Debug, Clone)]
pub struct BuildContext<'a> {
    /// The StreamConsumer.
    pub consumer: &'a StreamConsumer,
    /// Its name.
    pub name: &'a str,
    /// Its namespace; every child lives there.
    pub namespace: &'a str,
    /// Controller owner reference to the StreamConsumer.
    pub owner: OwnerReference,
    /// Worker image: `spec.image`, or the operator's default.
    pub image: String,
    /// The rendered worker configuration.
    pub config: &'a RenderedConfig,
    /// Replicas of the worker Deployment. Equal to `spec.replicas` unless a
    /// [`ReplicaDecider`](crate::ReplicaDecider) decides otherwise (autoscaling).
    pub replicas: i32,
    /// The ClusterRole Job-trigger workers are bound to.
    pub job_trigger_cluster_role: String,
    /// The admin's worker NetworkPolicy settings; `None`: no NetworkPolicy.
    pub network: Option<WorkerNetwork>,
    /// The admin's worker OpenTelemetry settings; `None`: the workers export no spans.
    pub tracing: Option<WorkerTracing>,
    /// Whether the operator reads this StreamConsumer's lag from its workers' reports (its brokers
    /// are not among those the admin allowed the operator to contact), and so needs the worker
    /// Service to find them. See [`build_service`].
    pub worker_lag_reports: bool,
}

impl<'a> BuildContext<'a> {
    /// A context for `sc`, which must have a name, a namespace and a uid.
    pub fn new(
        sc: &'a StreamConsumer,
        default_image: &str,
        config: &'a RenderedConfig,
        replicas: i32,
    ) -> Result<Self, Error> {
        let name = sc
            .metadata
            .name
            .as_deref()
            .ok_or(Error::MissingMetadata("name"))?;
        let namespace = sc
            .metadata
            .namespace
            .as_deref()
            .ok_or(Error::MissingMetadata("namespace"))?;
        let owner = sc
            .controller_owner_ref(&())
            .ok_or(Error::MissingMetadata("uid"))?;
        let image = sc
            .spec
            .image
            .clone()
            .filter(|i| !i.trim().is_empty())
            .unwrap_or_else(|| default_image.to_string());
        Ok(Self {
            consumer: sc,
            name,
            namespace,
            owner,
            image,
            config,
            replicas,
            job_trigger_cluster_role: DEFAULT_JOB_TRIGGER_CLUSTER_ROLE.to_string(),
            network: None,
            tracing: None,
            worker_lag_reports: true,
        })
    }

    /// With the operator's settings: the Job-trigger ClusterRole and the worker NetworkPolicy.
    pub fn with_settings(
        mut self,
        job_trigger_cluster_role: &str,
        network: Option<&WorkerNetwork>,
    ) -> Self {
        self.job_trigger_cluster_role = job_trigger_cluster_role.to_string();
        self.network = network.cloned();
        self
    }

    /// Whether the operator reads the lag from the workers' reports (see
    /// [`BuildContext::worker_lag_reports`]; `true` unless told otherwise).
    pub fn with_worker_lag_reports(mut self, reports: bool) -> Self {
        self.worker_lag_reports = reports;
        self
    }

    /// With the operator's worker OpenTelemetry settings.
    pub fn with_tracing(mut self, tracing: Option<&WorkerTracing>) -> Self {
        self.tracing = tracing.cloned();
        self
    }

    /// Metadata of a child: name, namespace, labels and the owner reference.
    pub fn child_meta(&self, name: String, component: Component) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.to_string()),
            labels: Some(labels(self.name, component)),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }

    /// Whether the workers create Kubernetes Jobs (pipeline-trigger with a `job` trigger) and so
    /// need their own ServiceAccount and Role.
    pub fn creates_jobs(&self) -> bool {
        let handler = &self.consumer.spec.handler;
        handler.kind == HandlerKind::PipelineTrigger
            && handler
                .pipeline_trigger
                .as_ref()
                .is_some_and(|p| p.job.is_some())
    }
}

/// Every child one StreamConsumer wants, in the order they are applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Children {
    /// The rendered worker configuration.
    pub config_map: ConfigMap,
    /// ServiceAccount and RoleBinding, for workers that create Jobs.
    pub worker_rbac: Option<WorkerRbac>,
    /// The workers.
    pub deployment: Deployment,
    /// The headless worker Service, only for a StreamConsumer whose lag the operator reads from
    /// its workers (see [`build_service`]).
    pub service: Option<Service>,
    /// Only with more than one replica.
    pub pdb: Option<PodDisruptionBudget>,
    /// Only when the admin turned worker NetworkPolicies on.
    pub network_policy: Option<NetworkPolicy>,
}

/// Builds every child.
pub fn build_children(ctx: &BuildContext<'_>) -> Children {
    Children {
        config_map: build_config_map(ctx),
        worker_rbac: build_worker_rbac(ctx),
        deployment: build_deployment(ctx),
        service: ctx.worker_lag_reports.then(|| build_service(ctx)),
        pdb: build_pdb(ctx),
        network_policy: ctx
            .network
            .as_ref()
            .map(|net| build_network_policy(ctx, net)),
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// Renders `sc` and calls `f` with a context using the default image and `spec.replicas`.
    pub fn with_ctx<T>(sc: &StreamConsumer, f: impl FnOnce(&BuildContext<'_>) -> T) -> T {
        let rendered = RenderedConfig::render(sc).unwrap();
        let ctx =
            BuildContext::new(sc, "example.com/worker:1", &rendered, sc.spec.replicas).unwrap();
        f(&ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::with_ctx;
    use super::*;
    use streamops_crds::v1alpha1::HandlerKind;

    #[test]
    fn config_hash_changes_with_the_configuration() {
        let a = RenderedConfig::render(&StreamConsumer::test()).unwrap();
        let b = RenderedConfig::render(
            &StreamConsumer::test().with_spec(|s| s.batch.max_wait_ms = 500),
        )
        .unwrap();
        assert_ne!(a.hash, b.hash);
        assert_eq!(a.hash.len(), 16);
    }

    #[test]
    fn the_worker_service_is_built_only_when_the_lag_comes_from_the_workers() {
        let sc = StreamConsumer::test();
        let rendered = RenderedConfig::render(&sc).unwrap();
        let ctx = BuildContext::new(&sc, "example.com/worker:1", &rendered, 1).unwrap();
        assert!(
            build_children(&ctx).service.is_some(),
            "by default: reports"
        );
        let from_brokers = ctx.with_worker_lag_reports(false);
        assert_eq!(build_children(&from_brokers).service, None);
    }

    #[test]
    fn config_hash_ignores_replicas() {
        let a = RenderedConfig::render(&StreamConsumer::test()).unwrap();
        let b = RenderedConfig::render(&StreamConsumer::test().with_replicas(5)).unwrap();
        assert_eq!(a.hash, b.hash);
    }

    #[test]
    fn every_child_is_owned_by_the_stream_consumer_as_controller() {
        let sc = StreamConsumer::test_of(HandlerKind::PipelineTrigger)
            .with_replicas(3)
            .with_spec(|s| {
                let p = s.handler.pipeline_trigger.as_mut().unwrap();
                p.webhook = None;
                p.job = Some(streamops_crds::v1alpha1::JobTriggerSpec {
                    template: serde_json::json!({"template": {"spec": {}}}),
                });
            });
        with_ctx(&sc, |ctx| {
            let c = build_children(ctx);
            let rbac = c.worker_rbac.clone().unwrap();
            let pdb = c.pdb.clone().unwrap();
            let metas = [
                &c.config_map.metadata,
                &c.deployment.metadata,
                &c.service.as_ref().unwrap().metadata,
                &pdb.metadata,
                &rbac.service_account.metadata,
                &rbac.role_binding.metadata,
            ];
            for m in metas {
                let owners = m.owner_references.as_ref().unwrap();
                assert_eq!(owners.len(), 1);
                assert_eq!(owners[0].controller, Some(true));
                assert_eq!(owners[0].kind, "StreamConsumer");
                assert_eq!(owners[0].uid, "752d59ef-2671-4890-9feb-0097459b18c8");
                assert_eq!(m.namespace.as_deref(), Some("default"));
                let l = m.labels.as_ref().unwrap();
                for key in [
                    crate::names::LABEL_NAME,
                    crate::names::LABEL_INSTANCE,
                    crate::names::LABEL_MANAGED_BY,
                    crate::names::LABEL_COMPONENT,
                ] {
                    assert!(l.contains_key(key), "{key} missing on {:?}", m.name);
                }
                assert_eq!(l[crate::names::LABEL_INSTANCE], "test");
            }
        });
    }

    #[test]
    fn spec_image_overrides_the_operator_default() {
        let sc = StreamConsumer::test().with_spec(|s| s.image = Some("mine:2".into()));
        with_ctx(&sc, |ctx| assert_eq!(ctx.image, "mine:2"));
        with_ctx(&StreamConsumer::test(), |ctx| {
            assert_eq!(ctx.image, "example.com/worker:1")
        });
    }

    #[test]
    fn context_requires_a_uid_for_the_owner_reference() {
        let mut sc = StreamConsumer::test();
        sc.metadata.uid = None;
        let rendered = RenderedConfig::render(&sc).unwrap();
        let err = BuildContext::new(&sc, "img", &rendered, 1).unwrap_err();
        assert!(matches!(err, Error::MissingMetadata("uid")));
    }
}
