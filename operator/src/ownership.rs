//! Ownership of children. The operator writes and deletes only objects this StreamConsumer
//! controls: an object that holds a child's name without this StreamConsumer's controller
//! reference (made by someone else, or by another StreamConsumer) is never applied over, adopted
//! or deleted. The reconciler reports it as [`Error::ChildConflict`], which names it: a `Degraded`
//! condition and a warning event.
//!
//! The check and the write must not race: between the read that checked a name and the write,
//! another actor could create, replace or delete the object. So the write itself carries the
//! check ([`write_child`]):
//! - an object read as ours is server-side applied with the `resourceVersion` that was read as a
//!   precondition: if anything replaced or changed it since, the API server refuses (409), and
//!   an apply carrying a `resourceVersion` never creates an object that was deleted meanwhile;
//! - a name read as free is written with `create`, which the API server refuses
//!   (`AlreadyExists`) when someone took the name meanwhile; a server-side apply would merge into
//!   their object instead. The created object's field ownership is then handed to server-side
//!   apply (its `managedFields` entry becomes an `Apply` entry of the same manager, under a
//!   `resourceVersion` precondition, as `kubectl`'s client-side-to-server-side upgrade does), so
//!   later applies can remove fields they no longer set.
//!
//! Either refusal stops the pass with nothing written ([`Error::ChildChanged`], or
//! [`Error::ChildConflict`] when the object now there is someone else's).

use std::fmt::Debug;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Resource;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;
use tracing::debug;

use crate::names::FIELD_MANAGER;
use crate::{Error, Result};

/// Whether `meta` carries a controller reference to the object with `uid`.
pub fn controlled_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.controller == Some(true))
}

/// Reads the object `name`: `None` when absent, the object when the StreamConsumer `uid` controls
/// it, [`Error::ChildConflict`] otherwise.
pub async fn existing_child<K>(api: &Api<K>, name: &str, uid: &str) -> Result<Option<K>>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned,
{
    let kind = K::kind(&()).into_owned();
    let existing = api.get_opt(name).await.map_err(|source| Error::GetChild {
        kind: kind.clone(),
        name: name.to_string(),
        source,
    })?;
    match existing {
        Some(o) if !controlled_by(o.meta(), uid) => Err(Error::ChildConflict {
            kind,
            name: name.to_string(),
        }),
        other => Ok(other),
    }
}

/// What a sweep of label-selected candidates did.
#[derive(Debug, Default)]
pub struct Swept {
    /// Objects deleted.
    pub deleted: usize,
    /// Names of the candidates controlled by something else, left alone.
    pub foreign: Vec<String>,
}

impl Swept {
    /// The left-alone objects that hold one of `child_names` (a child's name), as
    /// `(kind, name)`.
    pub fn conflicts(&self, kind: &str, child_names: &[&str]) -> Vec<(String, String)> {
        self.foreign
            .iter()
            .filter(|n| child_names.contains(&n.as_str()))
            .map(|n| (kind.to_string(), n.clone()))
            .collect()
    }
}

/// Attempts of [`write_child`] when the object changes under it (a controller writing the
/// status of a Deployment moves its `resourceVersion`).
pub const WRITE_ATTEMPTS: usize = 3;

/// Writes the child `desired`, whose name was read as `live` (`None`: free; `Some`: an object
/// this StreamConsumer `uid` controls), without racing another writer (see the module notes).
/// When the object changed since it was read, it is read (and its ownership checked) again, up
/// to [`WRITE_ATTEMPTS`] times. Returns the object as the API server stored it.
pub async fn write_child<K>(api: &Api<K>, desired: &K, live: Option<K>, uid: &str) -> Result<K>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let name = name_of(desired);
    let mut live = live;
    let mut attempt = 1;
    loop {
        let result = match live {
            Some(live) => {
                let live = hand_to_apply(api, live, uid).await?;
                let mut body = desired.clone();
                body.meta_mut().resource_version = live.meta().resource_version.clone();
                apply_with_precondition(api, &body).await
            }
            None => create_child(api, desired, uid).await,
        };
        match result {
            Err(Error::ChildChanged { .. }) if attempt < WRITE_ATTEMPTS => {
                debug!(kind = %K::kind(&()), name, attempt, "changed since it was read; reading it again");
                attempt += 1;
                live = existing_child(api, &name, uid).await?;
            }
            Err(Error::ChildChanged { .. }) => {
                // Whoever holds the name now: someone else's object is a conflict.
                existing_child(api, &name, uid).await?;
                return Err(changed::<K>(name));
            }
            other => return other,
        }
    }
}

fn name_of<K: Resource>(object: &K) -> String {
    object.meta().name.clone().unwrap_or_default()
}

fn changed<K: Resource<DynamicType = ()>>(name: String) -> Error {
    Error::ChildChanged {
        kind: K::kind(&()).into_owned(),
        name,
    }
}

/// Forced server-side apply under the operator's field manager; `object` carries the
/// `resourceVersion` read, so a 409 means the object changed since (or was replaced).
async fn apply_with_precondition<K>(api: &Api<K>, object: &K) -> Result<K>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let name = name_of(object);
    match api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(object),
        )
        .await
    {
        Ok(o) => Ok(o),
        // Changed since it was read; or deleted since (an apply with a resourceVersion does not
        // create).
        Err(kube::Error::Api(s)) if s.is_conflict() || s.is_not_found() => Err(changed::<K>(name)),
        Err(source) => Err(Error::ApplyChild {
            kind: K::kind(&()).into_owned(),
            name,
            source,
        }),
    }
}

/// Creates `desired`. A name taken meanwhile is [`Error::ChildChanged`]: the caller reads it
/// again, and someone else's object there is a [`Error::ChildConflict`]; nothing is written to it.
async fn create_child<K>(api: &Api<K>, desired: &K, uid: &str) -> Result<K>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let name = name_of(desired);
    let params = PostParams {
        dry_run: false,
        field_manager: Some(FIELD_MANAGER.to_string()),
    };
    match api.create(&params, desired).await {
        Ok(created) => hand_to_apply(api, created, uid).await,
        Err(kube::Error::Api(s)) if s.reason == "AlreadyExists" => Err(changed::<K>(name)),
        Err(source) => Err(Error::ApplyChild {
            kind: K::kind(&()).into_owned(),
            name,
            source,
        }),
    }
}

/// The `managedFields` of `object` with the operator's `Update` entry (left by `create`) turned
/// into its `Apply` entry; `None` when there is nothing to hand over (no such entry, or an `Apply`
/// entry already exists beside it).
pub fn handed_to_apply(managed: &[ManagedFieldsEntry]) -> Option<Vec<ManagedFieldsEntry>> {
    let ours = |e: &ManagedFieldsEntry, op: &str| {
        e.manager.as_deref() == Some(FIELD_MANAGER)
            && e.operation.as_deref() == Some(op)
            && e.subresource.as_deref().unwrap_or_default().is_empty()
    };
    if managed.iter().any(|e| ours(e, "Apply")) || !managed.iter().any(|e| ours(e, "Update")) {
        return None;
    }
    Some(
        managed
            .iter()
            .map(|e| {
                let mut e = e.clone();
                if ours(&e, "Update") {
                    e.operation = Some("Apply".into());
                }
                e
            })
            .collect(),
    )
}

/// Hands the fields `create` gave the operator's manager to server-side apply (see
/// [`handed_to_apply`]), under a `resourceVersion` precondition. A controller writing the status
/// meanwhile (a new Deployment's) moves the `resourceVersion`: the object is read again and the
/// handover retried, up to [`WRITE_ATTEMPTS`] times, as long as this StreamConsumer `uid` still
/// controls it; otherwise the next pass hands it over. Returns the object as stored.
async fn hand_to_apply<K>(api: &Api<K>, object: K, uid: &str) -> Result<K>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let name = name_of(&object);
    let mut object = object;
    for _ in 0..WRITE_ATTEMPTS {
        let Some(managed) = object
            .meta()
            .managed_fields
            .as_deref()
            .and_then(handed_to_apply)
        else {
            return Ok(object);
        };
        let body = json!({"metadata": {
            "resourceVersion": object.meta().resource_version,
            "managedFields": managed,
        }});
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            Ok(o) => return Ok(o),
            Err(kube::Error::Api(s)) if s.is_conflict() => {
                debug!(kind = %K::kind(&()), name, "changed before its fields were handed over; reading it again");
                match api.get_opt(&name).await {
                    Ok(Some(fresh)) if controlled_by(fresh.meta(), uid) => object = fresh,
                    _ => return Ok(object),
                }
            }
            Err(source) => {
                return Err(Error::ApplyChild {
                    kind: K::kind(&()).into_owned(),
                    name,
                    source,
                })
            }
        }
    }
    Ok(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(manager: &str, operation: &str, subresource: Option<&str>) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some(operation.into()),
            subresource: subresource.map(Into::into),
            ..ManagedFieldsEntry::default()
        }
    }

    #[test]
    fn only_the_operators_own_create_entry_is_handed_to_apply() {
        let created = [
            entry(FIELD_MANAGER, "Update", None),
            entry("kube-controller-manager", "Update", Some("status")),
            entry("someone", "Update", None),
        ];
        let handed = handed_to_apply(&created).expect("an Update entry of ours");
        assert_eq!(handed[0].operation.as_deref(), Some("Apply"));
        assert_eq!(handed[1], created[1]);
        assert_eq!(
            handed[2], created[2],
            "another manager's entry is left alone"
        );
    }

    #[test]
    fn nothing_is_handed_over_twice_or_from_a_status_write() {
        assert_eq!(handed_to_apply(&[]), None);
        assert_eq!(
            handed_to_apply(&[entry(FIELD_MANAGER, "Update", Some("status"))]),
            None
        );
        assert_eq!(
            handed_to_apply(&[
                entry(FIELD_MANAGER, "Apply", None),
                entry(FIELD_MANAGER, "Update", None)
            ]),
            None
        );
    }
}
