//! The StreamConsumer controller.
//!
//! [`reconcile`] runs Apply, which validates the object, renders the worker configuration,
//! server-side applies every child under one field manager, deletes the children it no longer
//! wants, reports changes as events and writes the status. An object whose deletion needs the
//! operator (`cleanupPolicy: DeleteConsumerGroup`, or one carrying the finalizer already) runs
//! under [`kube::runtime::finalizer`], whose Cleanup applies `spec.cleanupPolicy`; one under
//! `Retain` gets no finalizer ([`needs_finalizer`]), and its deletion is reported from the watch.
//! Errors requeue with a per-object exponential backoff ([`error_policy`]).
//!
//! Lag and autoscaling reach the reconciler only through [`ReplicaDecider`]: the replicas to apply,
//! the lag to publish in the status, and the scale decision to announce. With `spec.autoscaling`
//! the reconciler also keeps `spec.replicas` equal to the applied count, so `kubectl get`, the
//! scale subresource and the Deployment agree; a hand-made change of `spec.replicas` is set back
//! with a `ReplicasOverridden` warning. The [lag poller](crate::lag_poller) triggers a
//! reconciliation (`Controller::reconcile_on`) when a reading changes any of these.
//!
//! This module holds the controller, its context and the dispatch; the work is in three parts:
//! - `apply`: the Apply side: validation, the children (server-side apply in dependency order,
//!   deletion of the ones no longer wanted), `spec.replicas` under autoscaling, and the status;
//! - `cleanup`: the Cleanup side: `spec.cleanupPolicy` (the consumer group), and the release of
//!   a malformed object being deleted;
//! - `events`: the Kubernetes events the other two publish, and how a change of the workers is
//!   worded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::RoleBinding;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams};
use kube::core::error_boundary::DeserializeGuard;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::runtime::reflector::{self, reflector};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use streamops_crds::v1alpha1::{CleanupPolicy, StreamConsumer, StreamConsumerStatus};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::autoscale::Decision;
use crate::brokers::BrokerPolicy;
use crate::build::WorkerNetwork;
use crate::children::{ChildStores, StoredForm, READY_WAIT};
use crate::consumer_group::GroupDeleter;
use crate::lag_book::LagView;
use crate::lag_poller::LagPoller;
use crate::metrics::Metrics;
use crate::names::{
    managed_selector, CONTROLLER_NAME, DEFAULT_JOB_TRIGGER_CLUSTER_ROLE, FINALIZER,
};
use crate::policy::Policy;
use crate::status;
use crate::{Error, Result};

mod apply;
mod cleanup;
mod events;

use apply::apply;
use cleanup::{cleanup, skip_malformed};
use events::publish;

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
    /// What a StreamConsumer may make the operator run (images, Job triggers).
    pub policy: Policy,
    /// The ClusterRole Job-trigger workers are bound to.
    pub job_trigger_cluster_role: String,
    /// Worker NetworkPolicies; `None`: none are made (and none are watched).
    pub worker_network: Option<WorkerNetwork>,
    /// The workers' OpenTelemetry export; `None`: none.
    pub worker_tracing: Option<crate::build::WorkerTracing>,
    /// Reconciliations run at once ([`DEFAULT_CONCURRENCY`]); 0: unbounded.
    pub concurrency: u16,
    /// The brokers the admin allowed the operator to contact: it reads the lag of a
    /// StreamConsumer on them from them, and of any other from its workers' reports, which it
    /// finds through a worker Service made only for such a StreamConsumer. Default: none.
    pub lag_brokers: Arc<BrokerPolicy>,
    /// How long a status that only reports progress may wait before it is written
    /// ([`status::PROGRESS_HOLD`]; see [`crate::status`]); zero: written at once.
    pub progress_hold: Duration,
}

/// Reconciliations run at once by default: enough to keep up with a thousand StreamConsumers,
/// few enough that a start or a fail-over does not send a thousand reconciliations' requests to
/// the API server together.
pub const DEFAULT_CONCURRENCY: u16 = 16;

impl OperatorConfig {
    /// The defaults, with the given worker image: the strictest policy (only that image, no
    /// Job triggers) and no worker NetworkPolicies.
    pub fn new(worker_image: impl Into<String>) -> Self {
        let worker_image = worker_image.into();
        Self {
            policy: Policy::strict(worker_image.clone()),
            job_trigger_cluster_role: DEFAULT_JOB_TRIGGER_CLUSTER_ROLE.to_string(),
            worker_network: None,
            worker_tracing: None,
            concurrency: DEFAULT_CONCURRENCY,
            lag_brokers: Arc::new(BrokerPolicy::none()),
            worker_image,
            resync_period: Duration::from_secs(300),
            cleanup_deadline: Duration::from_secs(300),
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(300),
            progress_hold: crate::status::PROGRESS_HOLD,
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
    /// The child stores and write memo of the current leader term (see [`crate::children`]);
    /// `None` outside a term (and in tests that read every child from the API server).
    children: RwLock<Option<Arc<ChildStores>>>,
    /// When this process last wrote each StreamConsumer's status (by uid), for the progress hold.
    status_writes: Mutex<HashMap<String, Instant>>,
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
            children: RwLock::new(None),
            status_writes: Mutex::default(),
        }
    }

    /// How long the write of `new`, `sc`'s next status, may still wait: `None` to write it now.
    /// Only progress waits ([`status::only_progress`]), at most `progress_hold` (rounded up to
    /// whole seconds) after this process last wrote the status, or, for a first status, after the
    /// object's creation. Without either time (another leader wrote the status, or no creation
    /// time) it is written now.
    pub fn progress_hold(
        &self,
        sc: &StreamConsumer,
        new: &StreamConsumerStatus,
    ) -> Option<Duration> {
        let hold = self.config.progress_hold;
        if hold.is_zero() || !status::only_progress(sc.status.as_ref(), new) {
            return None;
        }
        let since = match &sc.status {
            None => {
                let created = sc.metadata.creation_timestamp.as_ref()?.0;
                Duration::try_from(k8s_openapi::jiff::Timestamp::now().duration_since(created))
                    .ok()?
            }
            Some(_) => {
                let uid = sc.metadata.uid.as_deref()?;
                self.status_writes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(uid)?
                    .elapsed()
            }
        };
        // In whole seconds, rounded up: the pass after the hold comes no earlier than its end.
        hold.checked_sub(since)
            .filter(|left| !left.is_zero())
            .map(|left| Duration::from_secs(left.as_secs_f64().ceil() as u64))
    }

    /// Notes that `sc`'s status was written now.
    pub fn status_written(&self, sc: &StreamConsumer) {
        if let Some(uid) = sc.metadata.uid.as_deref() {
            self.status_writes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(uid.to_string(), Instant::now());
        }
    }

    /// Forgets the status writes of a deleted StreamConsumer.
    fn forget_status_writes(&self, uid: &str) {
        self.status_writes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
    }

    /// Installs the child stores of a new leader term (`None`: the term ended).
    pub fn install_child_stores(&self, stores: Option<Arc<ChildStores>>) {
        *self.children.write().unwrap_or_else(|p| p.into_inner()) = stores;
    }

    /// The child stores of this term, whether or not they are ready.
    pub fn installed_child_stores(&self) -> Option<Arc<ChildStores>> {
        self.children
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The child stores of this term, once they hold their first lists (at the start of a term,
    /// waiting at most [`READY_WAIT`] for them; a store without its list answers
    /// [`Lookup::Unknown`](crate::children::Lookup), and that kind is read from the API server);
    /// `None` when there are none.
    pub async fn child_stores(&self) -> Option<Arc<ChildStores>> {
        let stores = self.installed_child_stores()?;
        stores.settle(READY_WAIT).await;
        Some(stores)
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
    // Only the operator's own children (labelled `managed-by`) enter the watches and stores, and
    // their first lists come in pages of `LIST_PAGE_SIZE`: a page is held whole (the response
    // and every object in it, before `to_stored_form` reduces them) while it is read, and a new
    // leader reads every kind at once.
    let children = watcher::Config::default()
        .labels(&managed_selector())
        .page_size(LIST_PAGE_SIZE);
    // The StreamConsumer store keeps every object for the life of the leader term: without what
    // no reconciliation reads (see `trim_for_store`).
    // The children are watched to be told of their changes (drift, a Deployment's rollout), and
    // the same watches fill this term's child stores, which reconciliations read instead of the
    // API server (see `crate::children`): Deployments compacted to what is read of them and a
    // hash of the rest, Services to their metadata and clusterIP, the other kinds as metadata,
    // trimmed.
    let network = ctx.config.worker_network.is_some();
    let (child_stores, writers) = ChildStores::new(network);
    ctx.install_child_stores(Some(child_stores.clone()));
    let (store, writer) = reflector::store();
    let consumers = reflector(
        writer,
        watcher(
            api::<DeserializeGuard<StreamConsumer>>(&client, ns),
            watcher::Config::default().page_size(LIST_PAGE_SIZE),
        )
        .modify(trim_for_store)
        .map({
            let ctx = ctx.clone();
            move |event| {
                if let Ok(watcher::Event::Delete(object)) = &event {
                    deleted(&ctx, &child_stores, object);
                }
                event
            }
        }),
    )
    .applied_objects();
    let deployments = reflector(
        writers.deployments,
        watcher(api::<Deployment>(&client, ns), children.clone())
            .default_backoff()
            .modify(Deployment::to_stored_form),
    )
    .touched_objects();
    // Services whole (they are small), compacted to their metadata and `spec.clusterIP`.
    let services = reflector(
        writers.services,
        watcher(api::<Service>(&client, ns), children.clone())
            .default_backoff()
            .modify(Service::to_stored_form),
    )
    .touched_objects();
    let controller = Controller::for_stream(consumers, store)
        .owns_stream(deployments)
        .owns_stream(owned(
            writers.config_maps,
            api::<PartialObjectMeta<ConfigMap>>(&client, ns),
            &children,
        ))
        .owns_stream(services)
        .owns_stream(owned(
            writers.pdbs,
            api::<PartialObjectMeta<PodDisruptionBudget>>(&client, ns),
            &children,
        ))
        .owns_stream(owned(
            writers.service_accounts,
            api::<PartialObjectMeta<ServiceAccount>>(&client, ns),
            &children,
        ))
        .owns_stream(owned(
            writers.role_bindings,
            api::<PartialObjectMeta<RoleBinding>>(&client, ns),
            &children,
        ));
    // NetworkPolicies are watched (and the operator may touch them) only when the admin turned
    // them on.
    let controller = match writers.network_policies {
        Some(writer) => controller.owns_stream(owned(
            writer,
            api::<PartialObjectMeta<NetworkPolicy>>(&client, ns),
            &children,
        )),
        None => controller,
    };
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
    let term = ctx.clone();
    controller
        .with_config(controller::Config::default().concurrency(ctx.config.concurrency))
        .graceful_shutdown_on(async move { stopped.cancelled().await })
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => debug!(object = %object, "reconciled"),
                Err(error) => warn!(%error, "reconciliation failed"),
            }
        })
        .await;
    // The stores stop with the term; the next one starts with new stores and an empty memo.
    term.install_child_stores(None);
    if let Some(task) = poller {
        poller_stop.cancel();
        if let Err(e) = task.await {
            warn!(error = %e, "the lag poller failed");
        }
    }
}

/// A StreamConsumer the watch reports deleted. One without the finalizer gets no cleanup pass, so
/// this is where the writes of its children are forgotten (its children go with it through their
/// owner references; a deletion the watch misses, as it lists again after a gap, leaves them until
/// the term ends: a few hundred bytes per child) and, under `Retain`, where the kept consumer
/// group is reported.
fn deleted(ctx: &Arc<Context>, stores: &ChildStores, object: &DeserializeGuard<StreamConsumer>) {
    forget_deleted(stores, object);
    if let Some(uid) = object.meta().uid.as_deref() {
        ctx.forget_status_writes(uid);
    }
    if let Ok(sc) = &object.0 {
        if sc.spec.cleanup_policy == CleanupPolicy::Retain {
            let (ctx, sc) = (ctx.clone(), sc.clone());
            tokio::spawn(async move { cleanup::report_retained(&ctx, &sc).await });
        }
    }
}

/// Forgets the writes of a deleted StreamConsumer's children.
fn forget_deleted(stores: &ChildStores, object: &DeserializeGuard<StreamConsumer>) {
    if let Some(uid) = object.meta().uid.as_deref() {
        stores.memo.forget_owner(uid);
    }
}

/// Objects per page of the watches' first lists (kube's default: 500). See [`run_controller`].
pub const LIST_PAGE_SIZE: u32 = 100;

/// A metadata watch of one kind of child, filling its store (trimmed) on the way to the
/// controller.
fn owned<K>(
    writer: reflector::store::Writer<PartialObjectMeta<K>>,
    api: Api<PartialObjectMeta<K>>,
    config: &watcher::Config,
) -> impl futures::Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    // An `Api` of `PartialObjectMeta` lists and watches metadata only.
    reflector(
        writer,
        watcher(api, config.clone())
            .default_backoff()
            .modify(PartialObjectMeta::<K>::to_stored_form),
    )
    .touched_objects()
}

/// Annotation `kubectl apply` keeps a copy of the whole object in.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops from a watched object what no reconciliation reads, before the store keeps it: its
/// `managedFields` (often larger than the object) and `kubectl apply`'s copy of it. Writes never
/// send the stored object back whole (status and `spec.replicas` are patched, children are built
/// from the spec), so nothing is lost on the API server.
pub fn trim_for_store<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
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
    if !needs_finalizer(&sc) && !carries_finalizer(&sc.metadata) {
        // Nothing to do on deletion: no finalizer, no cleanup pass. The children go with the
        // object through their owner references, and their write memo entries when the watch
        // sees it deleted (`forget_deleted`).
        if sc.metadata.deletion_timestamp.is_some() {
            return Ok(Action::await_change());
        }
        return apply(&sc, ctx).await;
    }
    let sc = with_finalizer(&api, sc).await?;
    finalizer(&api, FINALIZER, sc, |event| async move {
        match event {
            FinalizerEvent::Apply(sc) => apply(&sc, ctx).await,
            FinalizerEvent::Cleanup(sc) => cleanup(&sc, ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Whether deleting `sc` needs the operator's cleanup, hence its finalizer: only
/// `cleanupPolicy: DeleteConsumerGroup` has work to do outside the cluster (the consumer group).
/// Under `Retain` (the default) the children go with the object through their owner references,
/// so a new object gets no finalizer: one write fewer per StreamConsumer, and its deletion never
/// waits for the operator. An object that already carries the finalizer (a policy changed back to
/// `Retain`, or an earlier version) keeps it, and its cleanup removes it as before.
pub fn needs_finalizer(sc: &StreamConsumer) -> bool {
    sc.spec.cleanup_policy == CleanupPolicy::DeleteConsumerGroup
}

/// Whether the object (a StreamConsumer, or a malformed one's metadata) carries the operator's
/// finalizer.
fn carries_finalizer(meta: &ObjectMeta) -> bool {
    meta.finalizers
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|f| f == FINALIZER)
}

/// Adds the finalizer to a StreamConsumer that lacks it (and is not being deleted), and returns
/// the object as stored, with it: the pass goes on to apply the children at once instead of
/// waiting for the watch to bring the object back (kube-runtime's `finalizer` stops after adding
/// it). The finalizer is stored before any child is written, as there. The patch is the one
/// `finalizer` sends: it `test`s the finalizers this copy holds, so a copy behind the API server
/// fails instead of dropping or doubling a finalizer.
async fn with_finalizer(
    api: &Api<StreamConsumer>,
    sc: Arc<StreamConsumer>,
) -> Result<Arc<StreamConsumer>> {
    if sc.metadata.deletion_timestamp.is_some() || carries_finalizer(&sc.metadata) {
        return Ok(sc);
    }
    let finalizers = sc.metadata.finalizers.as_deref().unwrap_or_default();
    let name = sc
        .metadata
        .name
        .as_deref()
        .ok_or(Error::MissingMetadata("name"))?;
    let operations = if finalizers.is_empty() {
        serde_json::json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}
        ])
    } else {
        serde_json::json!([
            {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER}
        ])
    };
    let patch: json_patch::Patch = serde_json::from_value(operations).map_err(|_| {
        Error::Finalizer(Box::new(kube::runtime::finalizer::Error::InvalidFinalizer))
    })?;
    let stored = api
        .patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .map_err(|e| {
            Error::Finalizer(Box::new(kube::runtime::finalizer::Error::AddFinalizer(e)))
        })?;
    Ok(Arc::new(stored))
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

#[cfg(test)]
mod tests;
