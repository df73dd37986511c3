//! The events the reconciler publishes on a StreamConsumer, and how it words what a pass changed.
//! Publishing never fails a reconciliation: a failure is logged.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType};
use tracing::warn;

use super::apply::deployment_replicas;
use super::Context;
use crate::autoscale::Decision;
use crate::names::CONFIG_HASH_ANNOTATION;

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
pub(super) async fn report_changes(
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

/// Publishes an event; a failure is logged, never fails the reconciliation.
pub(super) async fn publish(
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
