//! The StreamConsumer controller.
//!
//! [`reconcile`] runs under [`kube::runtime::finalizer`]: Apply validates the object, renders the
//! worker configuration, server-side applies every child under one field manager, deletes the
//! children it no longer wants, reports changes as events and writes the status; Cleanup applies
//! `spec.cleanupPolicy`. Errors requeue with a per-object exponential backoff ([`error_policy`]).
//!
//! Lag and autoscaling reach the reconciler only through [`ReplicaDecider`]: the replicas to apply,
//! the lag to publish in the status, and the scale decision to announce. With `spec.autoscaling`
//! the reconciler also keeps `spec.replicas` equal to the applied count, so `kubectl get`, the
//! scale subresource and the Deployment agree; a hand-made change of `spec.replicas` is set back
//! with a `ReplicasOverridden` warning. The [lag poller](crate::lag_poller) triggers a
//! reconciliation (`Controller::reconcile_on`) when a reading changes any of these.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::core::error_boundary::{DeserializeGuard, InvalidObject};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;
use streamops_crds::v1alpha1::{CleanupPolicy, StreamConsumer, StreamConsumerStatus};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::autoscale::Decision;
use crate::build::{build_children, BuildContext, Children, RenderedConfig};
use crate::consumer_group::{GroupDeleter, GroupDeletion, GroupTarget};
use crate::lag_book::LagView;
use crate::lag_poller::LagPoller;
use crate::metrics::Metrics;
use crate::names::{
    children_selector, managed_selector, workload_name, CONFIG_HASH_ANNOTATION, CONTROLLER_NAME,
    FIELD_MANAGER, FINALIZER,
};
use crate::status;
use crate::validation::validate_object;
use crate::{Error, Result};

/// Decides the replicas of the worker Deployment and tells the reconciler what it knows of the
/// lag. [`SpecReplicas`] takes `spec.replicas` and knows no lag; the operator runs with
/// [`LagBook`](crate::lag_book::LagBook), which the lag poller fills. Every method must answer from
/// memory: they run inside every reconciliation.
pub trait ReplicaDecider: Send + Sync {
    /// Replicas of the worker Deployment of `sc`.
    fn desired_replicas(&self, sc: &StreamConsumer) -> i32;

    /// What is known of the consumer-group lag of `sc`, for its status; `None` when nothing was
    /// read (the status keeps what it had).
    fn lag(&self, _sc: &StreamConsumer) -> Option<LagView> {
        None
    }

    /// The autoscaling decision that set `replicas`, if it has not been announced yet; it counts
    /// as announced once returned.
    fn announce(&self, _sc: &StreamConsumer, _replicas: i32) -> Option<Decision> {
        None
    }
}

/// Replicas as written in `spec.replicas`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SpecReplicas;

impl ReplicaDecider for SpecReplicas {
    fn desired_replicas(&self, sc: &StreamConsumer) -> i32 {
        sc.spec.replicas
    }
}

/// Settings of the controller.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// Worker image for StreamConsumers without `spec.image`.
    pub worker_image: String,
    /// Requeue after a successful reconciliation (drift is also corrected through the watches on
    /// every child).
    pub resync_period: Duration,
    /// How long after a StreamConsumer's deletion was requested cleanup keeps retrying to delete
    /// the consumer group before it gives up with a warning and lets the object go.
    pub cleanup_deadline: Duration,
    /// First requeue delay after a failure; doubled on each consecutive failure of the same object.
    pub backoff_base: Duration,
    /// Longest requeue delay after failures.
    pub backoff_max: Duration,
}

impl OperatorConfig {
    /// The defaults, with the given worker image.
    pub fn new(worker_image: impl Into<String>) -> Self {
        Self {
            worker_image: worker_image.into(),
            resync_period: Duration::from_secs(300),
            cleanup_deadline: Duration::from_secs(300),
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(300),
        }
    }
}

/// Per-object exponential backoff for failed reconciliations. The delays come from `backon`, the
/// backoff the worker's retry loops use too (there without jitter: one object's retries are
/// spread by the controller's own queue).
#[derive(Debug)]
pub struct ErrorBackoff {
    builder: backon::ExponentialBuilder,
    delays: Mutex<HashMap<String, backon::ExponentialBackoff>>,
}

impl ErrorBackoff {
    /// Backoff from `base`, doubling, capped at `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            builder: backon::ExponentialBuilder::new()
                .with_min_delay(base)
                .with_max_delay(max.max(base))
                .with_factor(2.0)
                .without_max_times(),
            delays: Mutex::default(),
        }
    }

    /// Counts one more consecutive failure of `key` and returns the delay before its retry.
    pub fn next_delay(&self, key: &str) -> Duration {
        use backon::BackoffBuilder;
        let mut delays = self.delays.lock().unwrap_or_else(|p| p.into_inner());
        let builder = self.builder;
        delays
            .entry(key.to_string())
            .or_insert_with(|| builder.build())
            .next()
            .unwrap_or_else(|| builder.build().next().unwrap_or_default())
    }

    /// Forgets the failures of `key` after a success.
    pub fn reset(&self, key: &str) {
        self.delays
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

/// What every reconciliation shares.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Publishes events on StreamConsumers.
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Settings.
    pub config: OperatorConfig,
    /// Deletes consumer groups on cleanup.
    pub group_deleter: Arc<dyn GroupDeleter>,
    /// Decides the worker replicas.
    pub replicas: Arc<dyn ReplicaDecider>,
    backoff: ErrorBackoff,
}

impl Context {
    /// A context; events are reported as `streamops-operator` from this host (the pod name).
    pub fn new(
        client: Client,
        metrics: Metrics,
        config: OperatorConfig,
        group_deleter: Arc<dyn GroupDeleter>,
        replicas: Arc<dyn ReplicaDecider>,
    ) -> Self {
        let recorder = Recorder::new(client.clone(), Reporter::from(CONTROLLER_NAME));
        let backoff = ErrorBackoff::new(config.backoff_base, config.backoff_max);
        Self {
            client,
            recorder,
            metrics,
            config,
            group_deleter,
            replicas,
            backoff,
        }
    }
}

fn object_key(meta: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    )
}

/// Runs the controller until `stop` is cancelled (then finishes the reconciliations in flight).
/// Watches StreamConsumers through a [`DeserializeGuard`], so a malformed object is skipped instead
/// of stalling the watch, and every kind of child the operator makes, so drift is corrected. With a
/// `lag` poller, it reads lag over the controller's own store and triggers the reconciliations its
/// readings call for; it should write into the same book as `ctx.replicas`.
pub async fn run_controller(
    client: Client,
    namespace: Option<String>,
    ctx: Arc<Context>,
    stop: CancellationToken,
    lag: Option<LagPoller>,
) {
    fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let ns = namespace.as_deref();
    let children = watcher::Config::default().labels(&managed_selector());
    let controller = Controller::new(
        api::<DeserializeGuard<StreamConsumer>>(&client, ns),
        watcher::Config::default(),
    )
    .owns(api::<Deployment>(&client, ns), children.clone())
    .owns(api::<ConfigMap>(&client, ns), children.clone())
    .owns(api::<Service>(&client, ns), children.clone())
    .owns(api::<PodDisruptionBudget>(&client, ns), children.clone())
    .owns(api::<ServiceAccount>(&client, ns), children.clone())
    .owns(api::<Role>(&client, ns), children.clone())
    .owns(api::<RoleBinding>(&client, ns), children);
    let poller_stop = stop.child_token();
    let (controller, poller) = match lag {
        Some(poller) => {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let task = tokio::spawn(poller.run(controller.store(), tx, poller_stop.clone()));
            let triggers = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
            (controller.reconcile_on(triggers), Some(task))
        }
        None => (controller, None),
    };
    let stopped = stop.clone();
    controller
        .graceful_shutdown_on(async move { stopped.cancelled().await })
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => debug!(object = %object, "reconciled"),
                Err(error) => warn!(%error, "reconciliation failed"),
            }
        })
        .await;
    if let Some(task) = poller {
        poller_stop.cancel();
        if let Err(e) = task.await {
            warn!(error = %e, "the lag poller failed");
        }
    }
}

/// Reconciles one StreamConsumer. Objects that cannot be parsed are reported and skipped.
pub async fn reconcile(
    object: Arc<DeserializeGuard<StreamConsumer>>,
    ctx: Arc<Context>,
) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started();
    let sc = match &object.0 {
        Ok(sc) => Arc::new(sc.clone()),
        Err(invalid) => return skip_malformed(invalid, &ctx).await,
    };
    let key = object_key(&sc.metadata);
    let reference = sc.object_ref(&());
    let result = reconcile_consumer(sc, &ctx).await;
    match &result {
        Ok(_) => ctx.backoff.reset(&key),
        Err(error) => {
            publish(
                &ctx,
                &reference,
                EventType::Warning,
                error.reason(),
                "Reconcile",
                error.to_string(),
            )
            .await
        }
    }
    result
}

/// Requeues a failed object after its backoff delay: 5 s, doubling per consecutive failure, at most
/// 5 minutes (see [`OperatorConfig`]).
pub fn error_policy(
    object: Arc<DeserializeGuard<StreamConsumer>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    ctx.metrics.reconcile_failed(error);
    let key = object_key(object.meta());
    let delay = ctx.backoff.next_delay(&key);
    warn!(object = %key, %error, kind = %error.kind(), retry_in = ?delay, "reconciliation failed");
    Action::requeue(delay)
}

async fn reconcile_consumer(sc: Arc<StreamConsumer>, ctx: &Context) -> Result<Action> {
    let ns = sc
        .metadata
        .namespace
        .clone()
        .ok_or(Error::MissingMetadata("namespace"))?;
    let api: Api<StreamConsumer> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, sc, |event| async move {
        match event {
            FinalizerEvent::Apply(sc) => apply(&sc, ctx).await,
            FinalizerEvent::Cleanup(sc) => cleanup(&sc, ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

struct Identity<'a> {
    name: &'a str,
    namespace: &'a str,
    uid: &'a str,
}

fn identity(sc: &StreamConsumer) -> Result<Identity<'_>> {
    Ok(Identity {
        name: sc
            .metadata
            .name
            .as_deref()
            .ok_or(Error::MissingMetadata("name"))?,
        namespace: sc
            .metadata
            .namespace
            .as_deref()
            .ok_or(Error::MissingMetadata("namespace"))?,
        uid: sc
            .metadata
            .uid
            .as_deref()
            .ok_or(Error::MissingMetadata("uid"))?,
    })
}

async fn apply(sc: &StreamConsumer, ctx: &Context) -> Result<Action> {
    let id = identity(sc)?;
    let consumers: Api<StreamConsumer> = Api::namespaced(ctx.client.clone(), id.namespace);
    let reference = sc.object_ref(&());

    if let Err(invalid) = validate_object(sc) {
        // Nothing is applied: the workers keep running their last valid configuration. No
        // requeue: only a new spec can change the verdict.
        let new_status = status::invalid_spec(sc, &invalid, status::now());
        if sc.status.as_ref() != Some(&new_status) {
            warn!(object = %object_key(&sc.metadata), field = invalid.first_field(), error = %invalid, "invalid spec");
            publish(
                ctx,
                &reference,
                EventType::Warning,
                status::REASON_INVALID_SPEC,
                "Validate",
                invalid.to_string(),
            )
            .await;
            patch_status(&consumers, id.name, &new_status).await?;
        }
        return Ok(Action::await_change());
    }

    let replicas = ctx.replicas.desired_replicas(sc);
    let lag = ctx.replicas.lag(sc);
    let rendered = RenderedConfig::render(sc)?;
    let build = BuildContext::new(sc, &ctx.config.worker_image, &rendered, replicas)?;
    let children = build_children(&build);

    let applied = match apply_children(ctx, &id, &children).await {
        Ok(applied) => applied,
        Err(error) => {
            let new_status = status::failed(sc, error.reason(), &error.to_string(), status::now());
            if sc.status.as_ref() != Some(&new_status) {
                if let Err(e) = patch_status(&consumers, id.name, &new_status).await {
                    warn!(error = %e, "cannot record the failure in the status");
                }
            }
            return Err(error);
        }
    };

    let previous_replicas = applied.previous.as_ref().map(deployment_replicas);
    let decision = if previous_replicas != Some(replicas) {
        ctx.replicas.announce(sc, replicas)
    } else {
        None
    };
    report_changes(
        ctx,
        &reference,
        applied.previous.as_ref(),
        &children.deployment,
        &rendered.hash,
        replicas,
        decision.as_ref(),
    )
    .await;

    let new_status = status::observed(
        sc,
        &applied.deployment,
        replicas,
        &rendered.hash,
        lag.as_ref(),
        status::now(),
    );
    if let Some(lost) = status::lag_lost(sc.status.as_ref(), &new_status) {
        publish(
            ctx,
            &reference,
            EventType::Warning,
            status::REASON_LAG_UNAVAILABLE,
            "ReadLag",
            lost,
        )
        .await;
    }
    if sc.spec.autoscaling.is_some() && sc.spec.replicas != replicas {
        // A hand-made change: spec.replicas moved away from what the workers ran.
        if previous_replicas.is_some_and(|old| old != sc.spec.replicas) {
            publish(
                ctx,
                &reference,
                EventType::Warning,
                "ReplicasOverridden",
                "Scale",
                format!(
                    "spec.replicas was set to {} but spec.autoscaling owns the replicas: set back to {replicas}; \
                     change spec.autoscaling (minReplicas, maxReplicas) instead, or remove it to scale by hand",
                    sc.spec.replicas
                ),
            )
            .await;
        }
        patch_spec_replicas(
            &consumers,
            id.name,
            sc.metadata.resource_version.as_deref(),
            replicas,
        )
        .await?;
    }
    if sc.status.as_ref() != Some(&new_status) {
        patch_status(&consumers, id.name, &new_status).await?;
    }
    Ok(Action::requeue(ctx.config.resync_period))
}

fn deployment_replicas(d: &Deployment) -> i32 {
    // The API server defaults an absent spec.replicas to 1.
    d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

/// Keeps `spec.replicas` equal to the autoscaled count (a merge patch: only that field changes).
/// The patch carries the `resourceVersion` this reconciliation read, so a patch computed from a
/// stale copy is refused (409) instead of undoing a newer edit; the newer object is reconciled
/// next (the watch delivers it), so a refusal is not an error.
async fn patch_spec_replicas(
    api: &Api<StreamConsumer>,
    name: &str,
    resource_version: Option<&str>,
    replicas: i32,
) -> Result<()> {
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    };
    let body = match resource_version {
        Some(rv) => json!({"metadata": {"resourceVersion": rv}, "spec": {"replicas": replicas}}),
        None => json!({"spec": {"replicas": replicas}}),
    };
    match api.patch(name, &params, &Patch::Merge(body)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            debug!(
                object = name,
                "spec.replicas changed since it was read; the newer object is reconciled next"
            );
            Ok(())
        }
        Err(e) => Err(Error::PatchReplicas(e)),
    }
}

struct Applied {
    /// The Deployment before this reconciliation, if any.
    previous: Option<Deployment>,
    /// The Deployment as the API server returned it from the apply, with its current status.
    deployment: Deployment,
}

/// Applies the children in dependency order (configuration and RBAC before the pods that use
/// them), then deletes the ones no longer wanted.
async fn apply_children(ctx: &Context, id: &Identity<'_>, children: &Children) -> Result<Applied> {
    let client = &ctx.client;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), id.namespace);
    let deployment_name = workload_name(id.name);
    let previous = deployments
        .get_opt(&deployment_name)
        .await
        .map_err(|source| Error::GetChild {
            kind: "Deployment".into(),
            name: deployment_name.clone(),
            source,
        })?;
    if let Some(existing) = &previous {
        if !controlled_by(&existing.metadata, id.uid) {
            return Err(Error::ChildConflict {
                kind: "Deployment".into(),
                name: deployment_name,
            });
        }
    }

    apply_child(
        &Api::namespaced(client.clone(), id.namespace),
        &children.config_map,
    )
    .await?;
    if let Some(rbac) = &children.worker_rbac {
        apply_child(
            &Api::namespaced(client.clone(), id.namespace),
            &rbac.service_account,
        )
        .await?;
        apply_child(&Api::namespaced(client.clone(), id.namespace), &rbac.role).await?;
        apply_child(
            &Api::namespaced(client.clone(), id.namespace),
            &rbac.role_binding,
        )
        .await?;
    }
    let deployment = apply_child(&deployments, &children.deployment).await?;
    apply_child(
        &Api::namespaced(client.clone(), id.namespace),
        &children.service,
    )
    .await?;
    if let Some(pdb) = &children.pdb {
        apply_child(&Api::namespaced(client.clone(), id.namespace), pdb).await?;
    }
    delete_orphans(client, id, children).await?;
    Ok(Applied {
        previous,
        deployment,
    })
}

async fn apply_child<K>(api: &Api<K>, object: &K) -> Result<K>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let name = object.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(|source| Error::ApplyChild {
        kind: K::kind(&()).into_owned(),
        name,
        source,
    })
}

fn controlled_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.controller == Some(true))
}

/// Deletes the optional children this pass does not want: the PodDisruptionBudget after scaling
/// to one replica, the RBAC after leaving the job trigger. Candidates are selected by label and
/// must be controlled by this StreamConsumer.
async fn delete_orphans(client: &Client, id: &Identity<'_>, children: &Children) -> Result<()> {
    let selector = children_selector(id.name);
    let keep = |meta: Option<&ObjectMeta>| meta.and_then(|m| m.name.clone());
    let rbac = children.worker_rbac.as_ref();
    delete_owned::<PodDisruptionBudget>(
        client,
        id,
        &selector,
        keep(children.pdb.as_ref().map(|p| &p.metadata)).as_deref(),
    )
    .await?;
    delete_owned::<ServiceAccount>(
        client,
        id,
        &selector,
        keep(rbac.map(|r| &r.service_account.metadata)).as_deref(),
    )
    .await?;
    delete_owned::<Role>(
        client,
        id,
        &selector,
        keep(rbac.map(|r| &r.role.metadata)).as_deref(),
    )
    .await?;
    delete_owned::<RoleBinding>(
        client,
        id,
        &selector,
        keep(rbac.map(|r| &r.role_binding.metadata)).as_deref(),
    )
    .await?;
    Ok(())
}

/// Deletes every `K` matching `selector` and controlled by the StreamConsumer, except `keep`.
/// Returns how many were deleted.
async fn delete_owned<K>(
    client: &Client,
    id: &Identity<'_>,
    selector: &str,
    keep: Option<&str>,
) -> Result<usize>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Debug
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), id.namespace);
    let kind = K::kind(&()).into_owned();
    let list = api
        .list_metadata(&ListParams::default().labels(selector))
        .await
        .map_err(|source| Error::ListChildren {
            kind: kind.clone(),
            source,
        })?;
    let mut deleted = 0;
    for item in list.items {
        let Some(name) = item.metadata.name.as_deref() else {
            continue;
        };
        if Some(name) == keep {
            continue;
        }
        if !controlled_by(&item.metadata, id.uid) {
            debug!(%kind, name, "labelled like a child but controlled by something else; left alone");
            continue;
        }
        let params = DeleteParams::background().preconditions(Preconditions {
            uid: item.metadata.uid.clone(),
            resource_version: None,
        });
        match api.delete(name, &params).await {
            Ok(_) => {
                info!(%kind, name, namespace = id.namespace, "deleted a child that is no longer wanted");
                deleted += 1;
            }
            // Already gone, or replaced by another object since the list.
            Err(kube::Error::Api(s)) if s.is_not_found() || s.is_conflict() => {}
            Err(source) => {
                return Err(Error::DeleteChild {
                    kind,
                    name: name.to_string(),
                    source,
                })
            }
        }
    }
    Ok(deleted)
}

async fn patch_status(
    api: &Api<StreamConsumer>,
    name: &str,
    status: &StreamConsumerStatus,
) -> Result<()> {
    let body = json!({
        "apiVersion": StreamConsumer::api_version(&()),
        "kind": StreamConsumer::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(Error::PatchStatus)?;
    Ok(())
}

fn template_annotation<'a>(d: &'a Deployment, key: &str) -> Option<&'a str> {
    d.spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

fn worker_image(d: &Deployment) -> Option<&str> {
    d.spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers
        .first()?
        .image
        .as_deref()
}

/// Events for what this pass changed: the workers were created, rolled (new configuration or
/// image) or scaled. A scale the autoscaler decided is announced with the decision's reason
/// (`ScaleUp`, `ScaleDown`, `Activate`, `ScaleToZero`) and message, which names the lag.
async fn report_changes(
    ctx: &Context,
    reference: &ObjectReference,
    previous: Option<&Deployment>,
    desired: &Deployment,
    config_hash: &str,
    replicas: i32,
    decision: Option<&Decision>,
) {
    if let Some(d) = decision {
        // Published first: on creation it explains the replica count of the Created event.
        publish(
            ctx,
            reference,
            EventType::Normal,
            d.reason.as_str(),
            "Scale",
            d.message.clone(),
        )
        .await;
    }
    let Some(previous) = previous else {
        publish(
            ctx,
            reference,
            EventType::Normal,
            "Created",
            "Create",
            format!(
                "created the workers: {replicas} replica(s) of {}, configuration {config_hash}",
                worker_image(desired).unwrap_or_default()
            ),
        )
        .await;
        return;
    };
    let mut changes = Vec::new();
    let old_hash = template_annotation(previous, CONFIG_HASH_ANNOTATION);
    if old_hash != Some(config_hash) {
        changes.push(format!(
            "configuration {} -> {config_hash}",
            old_hash.unwrap_or("none")
        ));
    }
    let (old_image, new_image) = (worker_image(previous), worker_image(desired));
    if old_image != new_image {
        changes.push(format!(
            "image {} -> {}",
            old_image.unwrap_or("none"),
            new_image.unwrap_or("none")
        ));
    }
    if !changes.is_empty() {
        publish(
            ctx,
            reference,
            EventType::Normal,
            "Updated",
            "Update",
            format!("rolling out the workers: {}", changes.join(", ")),
        )
        .await;
    }
    let old_replicas = deployment_replicas(previous);
    if old_replicas != replicas && decision.is_none() {
        publish(
            ctx,
            reference,
            EventType::Normal,
            "Scaled",
            "Scale",
            format!("scaled the workers from {old_replicas} to {replicas}"),
        )
        .await;
    }
}

/// Applies `spec.cleanupPolicy`. The children go with the StreamConsumer through their owner
/// references; sink data is never touched.
async fn cleanup(sc: &StreamConsumer, ctx: &Context) -> Result<Action> {
    let reference = sc.object_ref(&());
    let group = &sc.spec.kafka.group_id;
    match sc.spec.cleanup_policy {
        CleanupPolicy::Retain => {
            ctx.metrics
                .group_cleanups
                .with_label_values(&["retained"])
                .inc();
            publish(
                ctx,
                &reference,
                EventType::Normal,
                "ConsumerGroupRetained",
                "Delete",
                format!(
                    "kept consumer group {group} and its committed offsets (cleanupPolicy Retain)"
                ),
            )
            .await;
            Ok(Action::await_change())
        }
        CleanupPolicy::DeleteConsumerGroup => delete_consumer_group(sc, ctx, &reference).await,
    }
}

/// Deletes the consumer group: stops the workers (a group with members cannot be deleted), then
/// asks the brokers. Failures are retried with backoff until `cleanup_deadline` after the deletion
/// request; then cleanup gives up with a warning so the object is not stuck forever.
async fn delete_consumer_group(
    sc: &StreamConsumer,
    ctx: &Context,
    reference: &ObjectReference,
) -> Result<Action> {
    let group = sc.spec.kafka.group_id.clone();
    let target = match GroupTarget::from_spec(&sc.spec) {
        Ok(target) => target,
        Err(why) => {
            ctx.metrics
                .group_cleanups
                .with_label_values(&["skipped"])
                .inc();
            publish(
                ctx,
                reference,
                EventType::Warning,
                "ConsumerGroupCleanupSkipped",
                "Delete",
                format!("consumer group {group} was not deleted: {why}; delete it with your Kafka tools"),
            )
            .await;
            return Ok(Action::await_change());
        }
    };
    let id = identity(sc)?;
    let stopped =
        delete_owned::<Deployment>(&ctx.client, &id, &children_selector(id.name), None).await?;
    if stopped > 0 {
        info!(object = %object_key(&sc.metadata), "stopped the workers before deleting their consumer group");
    }
    match ctx.group_deleter.delete_group(&target).await {
        Ok(outcome) => {
            let (label, note) = match outcome {
                GroupDeletion::Deleted => (
                    "deleted",
                    format!("deleted consumer group {group} and its committed offsets"),
                ),
                GroupDeletion::NotFound => (
                    "not_found",
                    format!("consumer group {group} did not exist; nothing to delete"),
                ),
            };
            ctx.metrics.group_cleanups.with_label_values(&[label]).inc();
            publish(
                ctx,
                reference,
                EventType::Normal,
                "ConsumerGroupDeleted",
                "Delete",
                note,
            )
            .await;
            Ok(Action::await_change())
        }
        Err(source) => {
            let waited = since(sc.metadata.deletion_timestamp.as_ref().map(|t| t.0));
            if waited >= ctx.config.cleanup_deadline {
                ctx.metrics
                    .group_cleanups
                    .with_label_values(&["abandoned"])
                    .inc();
                publish(
                    ctx,
                    reference,
                    EventType::Warning,
                    "ConsumerGroupCleanupAbandoned",
                    "Delete",
                    format!(
                        "gave up deleting consumer group {group} {}s after the deletion request: {source}; \
                         its committed offsets remain",
                        waited.as_secs()
                    ),
                )
                .await;
                Ok(Action::await_change())
            } else {
                Err(Error::ConsumerGroupCleanup { group, source })
            }
        }
    }
}

fn since(t: Option<Timestamp>) -> Duration {
    let Some(t) = t else {
        return Duration::ZERO;
    };
    let secs = Timestamp::now().as_second().saturating_sub(t.as_second());
    Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// An object that cannot be parsed: a warning, and no work until it is fixed. If it is being
/// deleted, its cleanup policy cannot be read, so the group is retained and the finalizer removed:
/// an unparseable object must not block its own deletion.
async fn skip_malformed(invalid: &InvalidObject, ctx: &Context) -> Result<Action> {
    let meta = &invalid.metadata;
    ctx.metrics.malformed_objects.inc();
    warn!(object = %object_key(meta), error = %invalid.error, "skipping a StreamConsumer that cannot be parsed");
    let reference = ObjectReference {
        api_version: Some(StreamConsumer::api_version(&()).into_owned()),
        kind: Some(StreamConsumer::kind(&()).into_owned()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        ..ObjectReference::default()
    };
    publish(
        ctx,
        &reference,
        EventType::Warning,
        "MalformedObject",
        "Reconcile",
        format!(
            "the object cannot be parsed and is skipped until it is fixed: {}",
            invalid.error
        ),
    )
    .await;

    let finalizers = meta.finalizers.clone().unwrap_or_default();
    if meta.deletion_timestamp.is_none() || !finalizers.iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let (Some(name), Some(ns)) = (meta.name.as_deref(), meta.namespace.as_deref()) else {
        return Ok(Action::await_change());
    };
    let remaining: Vec<&String> = finalizers.iter().filter(|f| *f != FINALIZER).collect();
    // The resourceVersion makes the patch fail rather than drop a finalizer added meanwhile.
    let patch = json!({
        "metadata": { "resourceVersion": meta.resource_version, "finalizers": remaining }
    });
    let api: Api<DeserializeGuard<StreamConsumer>> = Api::namespaced(ctx.client.clone(), ns);
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(Error::MalformedObjectFinalizer)?;
    ctx.metrics
        .group_cleanups
        .with_label_values(&["skipped"])
        .inc();
    publish(
        ctx,
        &reference,
        EventType::Warning,
        "ConsumerGroupCleanupSkipped",
        "Delete",
        "the object cannot be parsed, so its cleanup policy is unknown: the consumer group is retained"
            .to_string(),
    )
    .await;
    Ok(Action::await_change())
}

/// Publishes an event; a failure is logged, never fails the reconciliation.
async fn publish(
    ctx: &Context,
    reference: &ObjectReference,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(truncate(note, 1024)),
        action: action.into(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, reference).await {
        warn!(%error, reason, "cannot publish an event");
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests;
