//! The Apply side of the reconciler: validates the object, applies every child under one field
//! manager in dependency order, deletes the optional children it no longer wants, keeps
//! `spec.replicas` equal to the autoscaled count, and writes the status.

use std::fmt::Debug;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::RoleBinding;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use serde_json::json;
use streamops_crds::v1alpha1::{StreamConsumer, StreamConsumerStatus};
use tracing::{debug, info, warn};

use super::events::{publish, report_changes};
use super::{identity, object_key, Context, Identity};
use crate::build::{build_children, BuildContext, Children, RenderedConfig};
use crate::children::{
    service_cluster_ip, stored_content_hash, ChildKey, ChildStores, Lookup, StoredChild,
};
use crate::names::{
    children_selector, job_trigger_binding_name, worker_rbac_name, workload_name, FIELD_MANAGER,
};
use crate::ownership::{controlled_by, existing_child, write_child, Ours, Swept};
use crate::status;
use crate::validation::validate_with_policy;
use crate::{Error, Result};

pub(super) async fn apply(sc: &StreamConsumer, ctx: &Context) -> Result<Action> {
    let id = identity(sc)?;
    let consumers: Api<StreamConsumer> = Api::namespaced(ctx.client.clone(), id.namespace);
    let reference = sc.object_ref(&());

    if let Err(invalid) = validate_with_policy(sc, &ctx.config.policy) {
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

    // Suspended, or a replay in progress: the workers are held at zero and autoscaling is not
    // consulted (lag is still read and reported).
    let held = crate::replay::holds_workers(sc);
    let replicas = if held {
        0
    } else {
        ctx.replicas.desired_replicas(sc)
    };
    let lag = ctx.replicas.lag(sc);
    let rendered = RenderedConfig::render(sc)?;
    let build = BuildContext::new(sc, &ctx.config.worker_image, &rendered, replicas)?
        .with_settings(
            &ctx.config.job_trigger_cluster_role,
            ctx.config.worker_network.as_ref(),
        )
        .with_tracing(ctx.config.worker_tracing.as_ref())
        .with_worker_lag_reports(
            ctx.config
                .lag_brokers
                .resolve(&sc.spec.kafka.bootstrap_servers)
                .is_err(),
        );
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
    let decision = if !held && previous_replicas != Some(replicas) {
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

    let mut new_status = status::observed(
        sc,
        &applied.deployment,
        replicas,
        &rendered.hash,
        lag.as_ref(),
        status::now(),
    );
    let replaying = crate::replay::pending_request(sc).is_some();
    let replay_event = crate::replay::drive(
        &ctx.client,
        sc,
        &build,
        &children.deployment,
        &applied.deployment,
        &mut new_status,
    )
    .await?;
    if let Some((reason, message)) = replay_event {
        let kind = if reason == "ReplayFailed" {
            EventType::Warning
        } else {
            EventType::Normal
        };
        publish(ctx, &reference, kind, reason, "Replay", message).await;
    }
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
    if !held && sc.spec.autoscaling.is_some() && sc.spec.replicas != replicas {
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
    let mut next = ctx.config.resync_period;
    if sc.status.as_ref() != Some(&new_status) {
        match ctx.progress_hold(sc, &new_status) {
            // Only progress: it goes out with the next pass after the hold (or with a change
            // that cannot wait, whichever comes first).
            Some(left) => {
                debug!(object = %object_key(&sc.metadata), wait = ?left, "status progress held");
                next = left;
            }
            None => {
                patch_status(&consumers, id.name, &new_status).await?;
                ctx.status_written(sc);
            }
        }
    }
    if replaying {
        // The replay Job is not watched: look again soon.
        next = next.min(crate::replay::POLL_INTERVAL);
    }
    Ok(Action::requeue(next))
}

pub(super) fn deployment_replicas(d: &Deployment) -> i32 {
    // The API server defaults an absent spec.replicas to 1.
    d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

/// Keeps `spec.replicas` equal to the autoscaled count (a merge patch: only that field changes).
/// The patch carries the `resourceVersion` this reconciliation read, so a patch computed from a
/// stale copy is refused (409) instead of undoing a newer edit; the newer object is reconciled
/// next (the watch delivers it), so a refusal is not an error.
pub(super) async fn patch_spec_replicas(
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
    /// The Deployment as the API server returned it from the apply, with its current status (or
    /// as seen before, when the apply was skipped: nothing changed it since the last one).
    deployment: Deployment,
}

/// Applies the children in two waves, the writes of each wave sent at once: first what the pods
/// need (the ConfigMap, the workers' ServiceAccount and RoleBinding: pods are refused while their
/// ServiceAccount is missing), then the Deployment, the Service, the PodDisruptionBudget and the
/// NetworkPolicy, which do not depend on one another. Then it deletes the ones no longer wanted.
/// Every write of a wave runs to its end (none is abandoned half-way, e.g. between a handover
/// and its apply), and the first failure in that order is reported; a failed first wave stops the
/// pass before the second. First every child's name is looked up (in the child stores, or read
/// when they are not ready): if any object there is not controlled by this StreamConsumer, nothing
/// at all is written ([`Error::ChildConflict`], which names it; the status becomes `Degraded` and
/// an event says so). A write that cannot change anything is skipped (see [`crate::children`]).
async fn apply_children(ctx: &Context, id: &Identity<'_>, children: &Children) -> Result<Applied> {
    let client = &ctx.client;
    let ns = id.namespace;
    let stores = ctx.child_stores().await;
    let stores = stores.as_deref();
    let memo = stores.map(|s| &s.memo);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let workload = workload_name(id.name);
    let (previous, previous_seen) = match stores.and_then(|s| s.deployment(ns, &workload)) {
        Some(None) => (None, None),
        Some(Some(d)) if controlled_by(d.meta(), id.uid) => (
            Some(Deployment::clone(&d)),
            Some(Ours::stored(d.meta().clone(), stored_content_hash(&d))),
        ),
        // Someone else's as far as the store knows, or no store: read it.
        _ => {
            let read = existing_child(&deployments, &workload, id.uid).await?;
            let seen = read.as_ref().map(Ours::read);
            (read, seen)
        }
    };
    let config_map = check_name::<ConfigMap>(ctx, stores, id, &children.config_map).await?;
    let rbac = match &children.worker_rbac {
        Some(rbac) => Some((
            check_name::<ServiceAccount>(ctx, stores, id, &rbac.service_account).await?,
            check_name::<RoleBinding>(ctx, stores, id, &rbac.role_binding).await?,
        )),
        None => None,
    };
    let service = match &children.service {
        Some(desired) => Some(check_service(ctx, stores, id, desired).await?),
        None => None,
    };
    let pdb = match &children.pdb {
        Some(pdb) => Some(check_name::<PodDisruptionBudget>(ctx, stores, id, pdb).await?),
        None => None,
    };
    let network_policy = match &children.network_policy {
        Some(np) => Some(check_name::<NetworkPolicy>(ctx, stores, id, np).await?),
        None => None,
    };

    // Each write carries its ownership check: see `crate::ownership::write_child`.
    // First wave: what the pods need.
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let service_accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let role_bindings: Api<RoleBinding> = Api::namespaced(client.clone(), ns);
    let rbac_writes = async {
        match (&children.worker_rbac, rbac) {
            (Some(desired), Some((sa, rb))) => {
                let (sa, rb) = futures::join!(
                    Box::pin(write_child(
                        &service_accounts,
                        &desired.service_account,
                        sa,
                        id.uid,
                        memo,
                    )),
                    Box::pin(write_child(
                        &role_bindings,
                        &desired.role_binding,
                        rb,
                        id.uid,
                        memo,
                    )),
                );
                sa.and(rb).map(drop)
            }
            _ => Ok(()),
        }
    };
    let (config_map, rbac) = futures::join!(
        Box::pin(write_child(
            &config_maps,
            &children.config_map,
            config_map,
            id.uid,
            memo,
        )),
        Box::pin(rbac_writes),
    );
    config_map?;
    rbac?;

    // Second wave: the workers and what stands beside them.
    let (deployment, service, pdb, network_policy) = futures::join!(
        Box::pin(write_child(
            &deployments,
            &children.deployment,
            previous_seen,
            id.uid,
            memo,
        )),
        Box::pin(async {
            match (&children.service, service) {
                (Some(desired), Some(seen)) => write_service(ctx, stores, id, desired, seen).await,
                _ => Ok(()),
            }
        }),
        Box::pin(write_optional(
            client,
            ns,
            children.pdb.as_ref(),
            pdb,
            id.uid,
            memo
        )),
        Box::pin(write_optional(
            client,
            ns,
            children.network_policy.as_ref(),
            network_policy,
            id.uid,
            memo
        )),
    );
    let deployment = deployment?;
    service?;
    pdb?;
    network_policy?;
    // Skipped only over `previous` itself.
    let deployment = match (deployment, &previous) {
        (Some(d), _) => d,
        (None, Some(previous)) => previous.clone(),
        (None, None) => return Err(Error::MissingMetadata("deployment")),
    };
    delete_orphans(ctx, stores, id, children).await?;
    Ok(Applied {
        previous,
        deployment,
    })
}

/// [`write_child`] for a child that is only wanted with some settings (the PodDisruptionBudget,
/// the NetworkPolicy): nothing to do when it is not wanted (`desired` is `None`).
async fn write_optional<K>(
    client: &Client,
    ns: &str,
    desired: Option<&K>,
    live: Option<Option<Ours>>,
    uid: &str,
    memo: Option<&crate::children::WriteMemo>,
) -> Result<()>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Debug
        + serde::Serialize
        + DeserializeOwned,
{
    match (desired, live) {
        (Some(desired), Some(live)) => write_child(
            &Api::namespaced(client.clone(), ns),
            desired,
            live,
            uid,
            memo,
        )
        .await
        .map(drop),
        _ => Ok(()),
    }
}

/// The worker Service seen holding its name (ours), with its `spec.clusterIP`.
struct SeenService {
    ours: Ours,
    cluster_ip: Option<String>,
}

/// [`check_name`] for the worker Service: also tells its `spec.clusterIP` (kept in the store, see
/// [`crate::children::compact_service`], or read).
async fn check_service(
    ctx: &Context,
    stores: Option<&ChildStores>,
    id: &Identity<'_>,
    desired: &Service,
) -> Result<Option<SeenService>> {
    let name = desired.meta().name.as_deref().unwrap_or_default();
    match stores.and_then(|s| s.service(id.namespace, name)) {
        Some(None) => return Ok(None),
        Some(Some(stored)) if controlled_by(stored.meta(), id.uid) => {
            return Ok(Some(SeenService {
                ours: Ours::stored(stored.meta().clone(), None),
                cluster_ip: service_cluster_ip(&stored).map(str::to_string),
            }))
        }
        // Someone else's as far as the store knows (it may be behind), or no store: read it.
        _ => {}
    }
    read_service(ctx, id, name).await
}

async fn read_service(ctx: &Context, id: &Identity<'_>, name: &str) -> Result<Option<SeenService>> {
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), id.namespace);
    Ok(existing_child(&api, name, id.uid)
        .await?
        .map(|s| SeenService {
            ours: Ours::read(&s),
            cluster_ip: service_cluster_ip(&s).map(str::to_string),
        }))
}

/// Whether a Service with `live` as its `spec.clusterIP` cannot become `desired` by an apply:
/// `clusterIP` is immutable once set (a ClusterIP Service of earlier versions, where a headless
/// one is wanted now).
fn must_replace(desired: &Service, live: Option<&str>) -> bool {
    let wanted = service_cluster_ip(desired);
    matches!((wanted, live), (Some(w), Some(l)) if w != l)
}

/// Writes the worker Service. One of ours whose `clusterIP` cannot be changed into the desired
/// one (see [`must_replace`]) is deleted first, with the `uid` seen as a precondition, and the
/// desired one created in its place. Only a Service this StreamConsumer controls is ever deleted:
/// [`check_service`] reported any other as a conflict before anything was written.
async fn write_service(
    ctx: &Context,
    stores: Option<&ChildStores>,
    id: &Identity<'_>,
    desired: &Service,
    seen: Option<SeenService>,
) -> Result<()> {
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), id.namespace);
    let name = desired.meta().name.as_deref().unwrap_or_default();
    let mut seen = seen;
    // At most twice: the store may show an object already replaced.
    for _ in 0..2 {
        let live = match seen {
            Some(s) if must_replace(desired, s.cluster_ip.as_deref()) => s,
            other => {
                let live = other.map(|s| s.ours);
                write_child(&api, desired, live, id.uid, stores.map(|s| &s.memo)).await?;
                return Ok(());
            }
        };
        if !controlled_by(&live.ours.meta, id.uid) {
            // Never reached: `check_service` returns only ours. Kept as the last guard.
            return Err(Error::ChildConflict {
                kind: "Service".into(),
                name: name.to_string(),
            });
        }
        let params = DeleteParams::background().preconditions(Preconditions {
            uid: live.ours.meta.uid.clone(),
            resource_version: None,
        });
        match api.delete(name, &params).await {
            Ok(_) => info!(
                name,
                namespace = id.namespace,
                cluster_ip = live.cluster_ip.as_deref().unwrap_or_default(),
                "replacing the worker Service by a headless one (clusterIP is immutable)"
            ),
            // Gone already: created below.
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            // Replaced since it was seen: look again.
            Err(kube::Error::Api(s)) if s.is_conflict() => {
                seen = read_service(ctx, id, name).await?;
                continue;
            }
            Err(source) => {
                return Err(Error::DeleteChild {
                    kind: "Service".into(),
                    name: name.to_string(),
                    source,
                })
            }
        }
        if let Some(s) = stores {
            s.memo.forget(&ChildKey::of::<Service>(id.namespace, name));
        }
        write_child(&api, desired, None, id.uid, stores.map(|s| &s.memo)).await?;
        return Ok(());
    }
    Err(Error::ChildChanged {
        kind: "Service".into(),
        name: name.to_string(),
    })
}

/// Fails with [`Error::ChildConflict`] when the name of `desired` is held by an object this
/// StreamConsumer does not control; otherwise returns what holds it (ours), if anything. Looks
/// in the store when there is one; an object the store shows as someone else's is read again
/// first (the store may be behind), so a conflict is only reported as the API server has it.
async fn check_name<K>(
    ctx: &Context,
    stores: Option<&ChildStores>,
    id: &Identity<'_>,
    desired: &K,
) -> Result<Option<Ours>>
where
    K: StoredChild
        + Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Debug
        + DeserializeOwned
        + serde::Serialize,
{
    let name = desired.meta().name.as_deref().unwrap_or_default();
    let seen = stores.map_or(Lookup::Unknown, |s| K::lookup(s, id.namespace, name));
    match seen {
        Lookup::Absent => Ok(None),
        Lookup::Present(meta) if controlled_by(&meta, id.uid) => {
            Ok(Some(Ours::stored(*meta, None)))
        }
        Lookup::Present(_) | Lookup::Unknown => Ok(existing_child::<K>(
            &Api::namespaced(ctx.client.clone(), id.namespace),
            name,
            id.uid,
        )
        .await?
        .as_ref()
        .map(Ours::read)),
    }
}

/// Deletes the optional children this pass does not want: the PodDisruptionBudget after scaling
/// to one replica, the RBAC after leaving the job trigger, the worker Service once the operator
/// reads the lag from the brokers (or left by an earlier version, which made one for every
/// StreamConsumer). Candidates are selected by label and must be controlled by this
/// StreamConsumer; one under a child's name that is not is left alone and reported
/// ([`Error::ChildConflict`]; not for the Service, which stands in the way of nothing when none
/// is wanted).
async fn delete_orphans(
    ctx: &Context,
    stores: Option<&ChildStores>,
    id: &Identity<'_>,
    children: &Children,
) -> Result<()> {
    let client = &ctx.client;
    let selector = children_selector(id.name);
    let keep = |meta: Option<&ObjectMeta>| meta.and_then(|m| m.name.clone());
    let rbac = children.worker_rbac.as_ref();
    let mut foreign = Vec::new();
    let pdb = delete_owned::<PodDisruptionBudget>(
        client,
        stores,
        id,
        &selector,
        keep(children.pdb.as_ref().map(|p| &p.metadata)).as_deref(),
    )
    .await?;
    foreign.extend(pdb.conflicts("PodDisruptionBudget", &[&workload_name(id.name)]));
    if children.service.is_none() {
        // A Service under the workload's name that is not ours is left alone (and logged): no
        // Service is wanted, so it stands in the way of nothing.
        delete_owned::<Service>(client, stores, id, &selector, None).await?;
    }
    let sa = delete_owned::<ServiceAccount>(
        client,
        stores,
        id,
        &selector,
        keep(rbac.map(|r| &r.service_account.metadata)).as_deref(),
    )
    .await?;
    foreign.extend(sa.conflicts("ServiceAccount", &[&worker_rbac_name(id.name)]));
    // The RoleBinding of earlier versions was named like the ServiceAccount.
    let rb = delete_owned::<RoleBinding>(
        client,
        stores,
        id,
        &selector,
        keep(rbac.map(|r| &r.role_binding.metadata)).as_deref(),
    )
    .await?;
    foreign.extend(rb.conflicts(
        "RoleBinding",
        &[
            &job_trigger_binding_name(id.name),
            &worker_rbac_name(id.name),
        ],
    ));
    if ctx.config.worker_network.is_some() {
        let np = delete_owned::<NetworkPolicy>(
            client,
            stores,
            id,
            &selector,
            keep(children.network_policy.as_ref().map(|n| &n.metadata)).as_deref(),
        )
        .await?;
        foreign.extend(np.conflicts("NetworkPolicy", &[&workload_name(id.name)]));
    }
    match foreign.into_iter().next() {
        Some((kind, name)) => Err(Error::ChildConflict { kind, name }),
        None => Ok(()),
    }
}

/// Deletes every `K` matching `selector` and controlled by the StreamConsumer, except `keep`.
/// The candidates come from the store when there is one (an object it shows as someone else's is
/// read again before it is reported), else from a list. Objects controlled by anything else are
/// never touched; they are returned in [`Swept`]. Every delete carries the `uid` seen as a
/// precondition, so an object replaced meanwhile is not deleted.
pub(super) async fn delete_owned<K>(
    client: &Client,
    stores: Option<&ChildStores>,
    id: &Identity<'_>,
    selector: &str,
    keep: Option<&str>,
) -> Result<Swept>
where
    K: StoredChild
        + Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Debug
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), id.namespace);
    let kind = K::kind(&()).into_owned();
    let stored = stores.and_then(|s| K::children_of(s, id.namespace, id.name));
    let from_store = stored.is_some();
    let candidates = match stored {
        Some(candidates) => candidates,
        None => api
            .list_metadata(&ListParams::default().labels(selector))
            .await
            .map_err(|source| Error::ListChildren {
                kind: kind.clone(),
                source,
            })?
            .items
            .into_iter()
            .map(|i| i.metadata)
            .collect(),
    };
    let mut swept = Swept::default();
    for meta in candidates {
        let Some(name) = meta.name.as_deref() else {
            continue;
        };
        if Some(name) == keep {
            continue;
        }
        if !controlled_by(&meta, id.uid) {
            if from_store {
                // The store may be behind: report only what the API server still holds.
                let now = api
                    .get_metadata_opt(name)
                    .await
                    .map_err(|source| Error::GetChild {
                        kind: kind.clone(),
                        name: name.to_string(),
                        source,
                    })?;
                if now.is_none_or(|o| controlled_by(&o.metadata, id.uid)) {
                    // Gone, or ours now: the next pass (its watch event) sees it.
                    continue;
                }
            }
            warn!(%kind, name, namespace = id.namespace, "labelled like a child but not controlled by this StreamConsumer; left alone");
            swept.foreign.push(name.to_string());
            continue;
        }
        let params = DeleteParams::background().preconditions(Preconditions {
            uid: meta.uid.clone(),
            resource_version: None,
        });
        let forget = || {
            if let Some(s) = stores {
                s.memo.forget(&ChildKey::of::<K>(id.namespace, name));
            }
        };
        match api.delete(name, &params).await {
            Ok(_) => {
                info!(%kind, name, namespace = id.namespace, "deleted a child that is no longer wanted");
                forget();
                swept.deleted += 1;
            }
            // Already gone, or replaced by another object since the list.
            Err(kube::Error::Api(s)) if s.is_not_found() => forget(),
            Err(kube::Error::Api(s)) if s.is_conflict() => {}
            Err(source) => {
                return Err(Error::DeleteChild {
                    kind,
                    name: name.to_string(),
                    source,
                })
            }
        }
    }
    Ok(swept)
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
