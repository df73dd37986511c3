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
//!   their object instead (an apply carrying a `metadata.uid` is no way out: the API server
//!   reads that as "the object must exist with this uid", and refuses to create). The created
//!   object's fields belong to an `Update` entry of the operator's manager. They are handed to
//!   server-side apply (the entry becomes an `Apply` entry of the same manager, under a
//!   `resourceVersion` precondition, as `kubectl`'s client-side-to-server-side upgrade does) right
//!   before the object is next written, so that apply can remove fields it no longer sets. Not
//!   right after the create: most children are never written again, and at scale the extra
//!   request per child (and its conflicts with a new Deployment's first status writes) was a third
//!   of the operator's requests.
//!
//! Either refusal stops the pass with nothing written ([`Error::ChildChanged`], or
//! [`Error::ChildConflict`] when the object now there is someone else's).
//!
//! The read may come from the operator's child stores ([`crate::children`]) instead of a `GET`:
//! a store may be behind, which the write's own check makes harmless. A name the store shows as
//! free is created (`AlreadyExists`: read again with a `GET`); an object it shows as ours is
//! applied over the `resourceVersion` it shows (409 or 404: read again with a `GET` and retried,
//! as above); an object it shows as someone else's is read again with a `GET` before it is
//! reported. A write that cannot change anything is skipped ([`WriteMemo`]); so is nothing else.

use std::fmt::Debug;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Resource;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;
use tracing::debug;

use crate::children::{content_hash, desired_hash, ChildKey, WriteMemo};
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

/// An object seen holding a child's name and controlled by the StreamConsumer.
#[derive(Debug, Clone, PartialEq)]
pub struct Ours {
    /// Its metadata as seen.
    pub meta: ObjectMeta,
    /// Whether `meta` was read whole from the API server; a store keeps only the operator's own
    /// `managedFields` entries, so a handover (which rewrites every entry) reads the object first.
    pub whole: bool,
    /// [`content_hash`] of the object, when it was seen whole (not as metadata only).
    pub content: Option<u64>,
}

impl Ours {
    /// An object read from the API server.
    pub fn read<K: Resource + Serialize>(object: &K) -> Self {
        Self {
            meta: object.meta().clone(),
            whole: true,
            content: Some(content_hash(object)),
        }
    }

    /// An object as a store keeps it (see [`crate::children::trim_child_meta`]), with the
    /// [`content_hash`] of the whole object when the store keeps one (a Deployment's, see
    /// [`crate::children::compact_deployment`]).
    pub fn stored(meta: ObjectMeta, content: Option<u64>) -> Self {
        Self {
            meta,
            whole: false,
            content,
        }
    }
}

/// Writes the child `desired`, whose name was seen as `live` (`None`: free; `Some`: an object
/// this StreamConsumer `uid` controls), without racing another writer (see the module notes).
/// When the object changed since it was seen, it is read (and its ownership checked) again, up
/// to [`WRITE_ATTEMPTS`] times.
///
/// With a `memo`, a write that cannot change anything is skipped (see
/// [`WriteMemo::unchanged`]) and every write is recorded. Returns the object as the API server
/// stored it, or `None` when the write was skipped over `live` itself.
pub async fn write_child<K>(
    api: &Api<K>,
    desired: &K,
    live: Option<Ours>,
    uid: &str,
    memo: Option<&WriteMemo>,
) -> Result<Option<K>>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let name = name_of(desired);
    let key = ChildKey::of::<K>(
        desired.meta().namespace.as_deref().unwrap_or_default(),
        &name,
    );
    let hash = memo.map(|_| desired_hash(desired)).unwrap_or_default();
    let unchanged = |seen: &ObjectMeta, content: Option<u64>| {
        memo.is_some_and(|m| m.unchanged(&key, seen, content, hash))
    };
    if live.as_ref().is_some_and(|l| unchanged(&l.meta, l.content)) {
        debug!(kind = %K::kind(&()), name, "unchanged since the operator wrote it; not written");
        return Ok(None);
    }
    let mut live = live;
    let mut attempt = 1;
    loop {
        let result = match live {
            Some(live) => {
                let rv = hand_to_apply(api, live, uid).await?;
                let mut body = desired.clone();
                body.meta_mut().resource_version = rv;
                apply_with_precondition(api, &body).await
            }
            None => create_child(api, desired).await,
        };
        match result {
            Ok(stored) => {
                if let Some(memo) = memo {
                    memo.record(key, uid, stored.meta(), Some(content_hash(&stored)), hash);
                }
                return Ok(Some(stored));
            }
            Err(Error::ChildChanged { .. }) if attempt < WRITE_ATTEMPTS => {
                debug!(kind = %K::kind(&()), name, attempt, "changed since it was read; reading it again");
                attempt += 1;
                let fresh = existing_child(api, &name, uid).await?;
                if let Some(fresh) = fresh
                    .as_ref()
                    .filter(|f| unchanged(f.meta(), Some(content_hash(*f))))
                {
                    // The store was behind the operator's own last write.
                    return Ok(Some(fresh.clone()));
                }
                live = fresh.as_ref().map(Ours::read);
            }
            Err(Error::ChildChanged { .. }) => {
                // Whoever holds the name now: someone else's object is a conflict.
                existing_child(api, &name, uid).await?;
                return Err(changed::<K>(name));
            }
            Err(other) => return Err(other),
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

/// Creates `desired` (its fields are handed to server-side apply when it is next written, see the
/// module notes). A name taken meanwhile is [`Error::ChildChanged`]: the caller reads it again,
/// and someone else's object there is a [`Error::ChildConflict`]; nothing is written to it.
async fn create_child<K>(api: &Api<K>, desired: &K) -> Result<K>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let name = name_of(desired);
    let params = PostParams {
        dry_run: false,
        field_manager: Some(FIELD_MANAGER.to_string()),
    };
    match api.create(&params, desired).await {
        Ok(created) => Ok(created),
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

/// Hands over the fields of `live` if `create` left them to an `Update` entry (see
/// [`hand_over`]); returns the `resourceVersion` to apply over.
async fn hand_to_apply<K>(api: &Api<K>, live: Ours, uid: &str) -> Result<Option<String>>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let rv = live.meta.resource_version.clone();
    Ok(match hand_over(api, live, uid).await? {
        Some(o) => o.meta().resource_version.clone(),
        None => rv,
    })
}

/// Hands the fields `create` gave the operator's manager to server-side apply (see
/// [`handed_to_apply`]), under a `resourceVersion` precondition. A controller writing the status
/// meanwhile moves the `resourceVersion`: the object is read again and the handover retried, up
/// to [`WRITE_ATTEMPTS`] times, as long as this StreamConsumer `uid` still controls it. An object
/// seen in a store is read whole first (the patch rewrites every entry); if it is no longer ours,
/// [`Error::ChildChanged`].
/// Returns the object as last read or stored, `None` when there was nothing to hand over.
async fn hand_over<K>(api: &Api<K>, live: Ours, uid: &str) -> Result<Option<K>>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let name = live.meta.name.clone().unwrap_or_default();
    let needed = live
        .meta
        .managed_fields
        .as_deref()
        .and_then(handed_to_apply)
        .is_some();
    if !needed {
        return Ok(None);
    }
    let mut meta = live.meta;
    let mut latest: Option<K> = None;
    if !live.whole {
        match api.get_opt(&name).await {
            Ok(Some(fresh)) if controlled_by(fresh.meta(), uid) => {
                meta = fresh.meta().clone();
                latest = Some(fresh);
            }
            Ok(_) => return Err(changed::<K>(name)),
            Err(source) => {
                return Err(Error::GetChild {
                    kind: K::kind(&()).into_owned(),
                    name,
                    source,
                })
            }
        }
    }
    for _ in 0..WRITE_ATTEMPTS {
        let Some(managed) = meta.managed_fields.as_deref().and_then(handed_to_apply) else {
            return Ok(latest);
        };
        let body = json!({"metadata": {
            "resourceVersion": meta.resource_version,
            "managedFields": managed,
        }});
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            Ok(o) => return Ok(Some(o)),
            Err(kube::Error::Api(s)) if s.is_conflict() => {
                debug!(kind = %K::kind(&()), name, "changed before its fields were handed over; reading it again");
                match api.get_opt(&name).await {
                    Ok(Some(fresh)) if controlled_by(fresh.meta(), uid) => {
                        meta = fresh.meta().clone();
                        latest = Some(fresh);
                    }
                    _ => return Ok(latest),
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
    Ok(latest)
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
