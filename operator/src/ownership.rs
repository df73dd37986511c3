//! Ownership of children. The operator writes and deletes only objects this StreamConsumer
//! controls: an object that holds a child's name without this StreamConsumer's controller
//! reference (made by someone else, or by another StreamConsumer) is never applied over, adopted
//! or deleted. The reconciler reports it as [`Error::ChildConflict`], which names it: a `Degraded`
//! condition and a warning event.

use std::fmt::Debug;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::Api;
use kube::Resource;
use serde::de::DeserializeOwned;

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
