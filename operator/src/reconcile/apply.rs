//! The Apply side of the reconciler: validates the object, applies every child under one field
//! manager in dependency order, deletes the optional children it no longer wants, keeps
//! `spec.replicas` equal to the autoscaled count, and writes the status.

use std::fmt::Debug;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;
use streamops_crds::v1alpha1::{StreamConsumer, StreamConsumerStatus};
use tracing::{debug, info, warn};

use super::events::{publish, report_changes};
use super::{identity, object_key, Context, Identity};
use crate::build::{build_children, BuildContext, Children, RenderedConfig};
use crate::names::{children_selector, workload_name, FIELD_MANAGER};
use crate::status;
use crate::validation::validate_object;
use crate::{Error, Result};

pub(super) async fn apply(sc: &StreamConsumer, ctx: &Context) -> Result<Action> {
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
pub(super) async fn delete_owned<K>(
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
