//! The Cleanup side of the reconciler: `spec.cleanupPolicy` when a StreamConsumer is deleted
//! (keep the consumer group, or stop the workers and delete it), and the release of a malformed
//! object, whose policy cannot be read.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::core::error_boundary::{DeserializeGuard, InvalidObject};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::Resource;
use serde_json::json;
use streamops_crds::v1alpha1::{CleanupPolicy, StreamConsumer};
use tracing::{info, warn};

use super::apply::delete_owned;
use super::events::publish;
use super::{identity, object_key, Context};
use crate::consumer_group::{GroupDeletion, GroupTarget};
use crate::names::{children_selector, FINALIZER};
use crate::{Error, Result};

/// Applies `spec.cleanupPolicy`. The children go with the StreamConsumer through their owner
/// references; sink data is never touched.
pub(super) async fn cleanup(sc: &StreamConsumer, ctx: &Context) -> Result<Action> {
    let reference = sc.object_ref(&());
    // Its children go with it: the memo of their writes too.
    if let (Some(stores), Some(uid)) = (ctx.installed_child_stores(), sc.metadata.uid.as_deref()) {
        stores.memo.forget_owner(uid);
    }
    match sc.spec.cleanup_policy {
        // Reported when the watch sees the object gone (`report_retained`), as for an object
        // without the finalizer.
        CleanupPolicy::Retain => Ok(Action::await_change()),
        CleanupPolicy::DeleteConsumerGroup => delete_consumer_group(sc, ctx, &reference).await,
    }
}

/// Reports that a deleted StreamConsumer's consumer group was kept (`cleanupPolicy: Retain`): an
/// event and the cleanup metric. Called when the leader's watch reports the deletion, since an
/// object under `Retain` has no finalizer, hence no cleanup pass. A deletion the watch misses (it
/// lists again after a gap, or no leader runs) is not reported; nothing else depends on it.
pub(super) async fn report_retained(ctx: &Context, sc: &StreamConsumer) {
    let group = &sc.spec.kafka.group_id;
    report_cleanup(
        ctx,
        &sc.object_ref(&()),
        "retained",
        EventType::Normal,
        "ConsumerGroupRetained",
        format!("kept consumer group {group} and its committed offsets (cleanupPolicy Retain)"),
    )
    .await;
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
            report_cleanup(
                ctx,
                reference,
                "skipped",
                EventType::Warning,
                "ConsumerGroupCleanupSkipped",
                format!("consumer group {group} was not deleted: {why}; delete it with your Kafka tools"),
            )
            .await;
            return Ok(Action::await_change());
        }
    };
    let id = identity(sc)?;
    let stores = ctx.child_stores().await;
    let stopped = delete_owned::<Deployment>(
        &ctx.client,
        stores.as_deref(),
        &id,
        &children_selector(id.name),
        None,
    )
    .await?;
    for name in &stopped.foreign {
        publish(
            ctx,
            reference,
            EventType::Warning,
            "ChildConflict",
            "Delete",
            format!("Deployment {name} is labelled like this StreamConsumer's workers but is not controlled by it: left running"),
        )
        .await;
    }
    if stopped.deleted > 0 {
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
            report_cleanup(
                ctx,
                reference,
                label,
                EventType::Normal,
                "ConsumerGroupDeleted",
                note,
            )
            .await;
            Ok(Action::await_change())
        }
        Err(source) => {
            let waited = since(sc.metadata.deletion_timestamp.as_ref().map(|t| t.0));
            if waited >= ctx.config.cleanup_deadline {
                report_cleanup(
                    ctx,
                    reference,
                    "abandoned",
                    EventType::Warning,
                    "ConsumerGroupCleanupAbandoned",
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
pub(super) async fn skip_malformed(invalid: &InvalidObject, ctx: &Context) -> Result<Action> {
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

    if meta.deletion_timestamp.is_none() || !super::carries_finalizer(meta) {
        return Ok(Action::await_change());
    }
    let finalizers = meta.finalizers.clone().unwrap_or_default();
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
    report_cleanup(
        ctx,
        &reference,
        "skipped",
        EventType::Warning,
        "ConsumerGroupCleanupSkipped",
        "the object cannot be parsed, so its cleanup policy is unknown: the consumer group is retained"
            .to_string(),
    )
    .await;
    Ok(Action::await_change())
}

/// Counts an outcome of the consumer-group cleanup (`group_cleanups`, labelled with `outcome`)
/// and reports it in an event on the StreamConsumer.
async fn report_cleanup(
    ctx: &Context,
    reference: &ObjectReference,
    outcome: &str,
    type_: EventType,
    reason: &str,
    note: String,
) {
    ctx.metrics
        .group_cleanups
        .with_label_values(&[outcome])
        .inc();
    publish(ctx, reference, type_, reason, "Delete", note).await;
}
