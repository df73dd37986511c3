//! What the operator knows of its children without asking the API server: one reflector store
//! per kind of child, fed by the watches the controller already runs to be told of changes, and a
//! memo of its own last write of each child.
//!
//! The stores replace the reads of every pass (a `GET` per child name, a `LIST` per kind swept
//! for orphans): a reconciliation looks its children up in memory. They may be a little behind
//! the API server; [`crate::ownership`] keeps its guarantees anyway, since every write still
//! carries its own check (a `resourceVersion` precondition for an object seen as ours, `create`
//! for a name seen as free, a `uid` precondition for a delete). A stale entry costs a refused write
//! and a fresh `GET`, never a wrong write. An object the store shows held by someone else is read
//! again before it is reported as a conflict.
//!
//! [`WriteMemo`] lets a pass skip the writes that cannot change anything: when the store shows a
//! child with the `uid` and `resourceVersion` the API server returned from the operator's own last
//! write of it, and the operator wants to write the same object again, nobody (not even a
//! controller writing a status) changed it since, so the write would be a no-op. Any change by
//! anyone moves the `resourceVersion`, and the next pass (the watch triggers one) applies again:
//! drift is corrected as before.
//!
//! Everything here lives for one leader term: [`run_controller`](crate::run_controller) makes new
//! stores and an empty memo, so a new leader's first pass applies everything.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, PodSpec, PodTemplateSpec, Service, ServiceAccount, ServiceSpec,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::RoleBinding;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::Resource;
use serde::Serialize;
use tracing::warn;

use crate::names::{FIELD_MANAGER, LABEL_INSTANCE, LABEL_MANAGED_BY, MANAGED_BY};

/// Annotation `kubectl apply` keeps a copy of the whole object in.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// How long a reconciliation waits for the stores' first list before it reads from the API
/// server instead.
pub const READY_WAIT: Duration = Duration::from_secs(10);

/// Keeps of a child's metadata only what a reconciliation reads from a store, before the store
/// keeps it: name, namespace, `uid`, `resourceVersion`, `generation`, the controller references
/// (the ownership check), the labels that select a StreamConsumer's children
/// (`app.kubernetes.io/instance`, `managed-by`), and which of the operator's own `managedFields`
/// entries exist (only whether its `Apply`/`Update` entries exist is read, to know whether a
/// created object's fields still have to be handed to server-side apply; the handover itself
/// reads the whole object again). Every other manager's entry, every field set, the annotations
/// (`kubectl apply`'s copy of the object among them) and the other labels are dropped: watched
/// objects often carry more `managedFields` than content. Nothing a store keeps is ever sent back
/// to the API server, so nothing is lost there.
pub fn trim_child_meta(meta: &mut ObjectMeta) {
    if let Some(managed) = meta.managed_fields.as_mut() {
        managed.retain(|e| e.manager.as_deref() == Some(FIELD_MANAGER));
        for e in managed.iter_mut() {
            e.fields_v1 = None;
            e.fields_type = None;
            e.time = None;
            e.api_version = None;
        }
        managed.shrink_to_fit();
    }
    if let Some(labels) = meta.labels.as_mut() {
        labels.retain(|k, _| k == LABEL_INSTANCE || k == LABEL_MANAGED_BY);
    }
    meta.annotations = None;
    meta.owner_references = meta
        .owner_references
        .take()
        .map(|refs| {
            refs.into_iter()
                .filter(|r| r.controller == Some(true))
                .collect::<Vec<_>>()
        })
        .filter(|refs| !refs.is_empty());
    meta.finalizers = None;
    meta.generate_name = None;
}

/// Internal annotation under which a stored Deployment carries the [`content_hash`] of the whole
/// object as watched (see [`compact_deployment`]). Only ever set on the store's copies, which are
/// never sent to the API server; a value on a watched object is overwritten.
pub const STORED_CONTENT_HASH: &str = "streamops.dev/stored-content-hash";

/// What a Deployment's store keeps of it: its [`content_hash`] (computed from the whole object
/// first, so the write memo tells a status report from any other change exactly as from a whole
/// object, see [`WriteMemo::unchanged`]), the metadata a store keeps of every child
/// ([`trim_child_meta`]), `spec.replicas`, the pod template's annotations (the configuration
/// hash) and its containers' names and images (the events word a rollout with them), and the
/// whole `status` (readiness). The rest of the pod template, the bulk of the object, is dropped.
pub fn compact_deployment(deployment: &mut Deployment) {
    let content = content_hash(deployment);
    trim_child_meta(&mut deployment.metadata);
    deployment.metadata.annotations = Some(BTreeMap::from([(
        STORED_CONTENT_HASH.to_string(),
        content.to_string(),
    )]));
    if let Some(spec) = deployment.spec.take() {
        let template = spec.template;
        deployment.spec = Some(DeploymentSpec {
            replicas: spec.replicas,
            template: PodTemplateSpec {
                metadata: template.metadata.map(|m| ObjectMeta {
                    annotations: m.annotations,
                    ..ObjectMeta::default()
                }),
                spec: template.spec.map(|s| PodSpec {
                    containers: s
                        .containers
                        .into_iter()
                        .map(|c| Container {
                            name: c.name,
                            image: c.image,
                            ..Container::default()
                        })
                        .collect(),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        });
    }
}

/// The [`content_hash`] a stored Deployment carries (see [`compact_deployment`]); `None` for an
/// object that was not compacted.
pub fn stored_content_hash(deployment: &Deployment) -> Option<u64> {
    deployment
        .metadata
        .annotations
        .as_ref()?
        .get(STORED_CONTENT_HASH)?
        .parse()
        .ok()
        .filter(|h| *h != 0)
}

/// What a Service's store keeps of it: the metadata a store keeps of every child
/// ([`trim_child_meta`]) and `spec.clusterIP`, which tells a worker Service of earlier versions
/// (a ClusterIP one) from the headless one wanted now without reading it again: `clusterIP` is
/// immutable, so such a Service is replaced, not applied over (see
/// `crate::reconcile::apply`). The rest of the spec and the status are dropped.
pub fn compact_service(service: &mut Service) {
    trim_child_meta(&mut service.metadata);
    let cluster_ip = service.spec.take().and_then(|s| s.cluster_ip);
    service.spec = cluster_ip.map(|ip| ServiceSpec {
        cluster_ip: Some(ip),
        ..ServiceSpec::default()
    });
    service.status = None;
}

/// The `spec.clusterIP` of a Service (whole or as stored, see [`compact_service`]): an address,
/// `"None"` (headless), or `None` (not set, or not allocated yet).
pub fn service_cluster_ip(service: &Service) -> Option<&str> {
    service
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.as_deref())
        .filter(|ip| !ip.is_empty())
}

/// What a store keeps of one kind of watched child.
pub trait StoredForm {
    /// Reduces a watched object to what its store keeps ([`compact_deployment`], or
    /// [`trim_child_meta`] for the kinds watched as metadata).
    fn to_stored_form(&mut self);
}

impl StoredForm for Deployment {
    fn to_stored_form(&mut self) {
        compact_deployment(self);
    }
}

impl StoredForm for Service {
    fn to_stored_form(&mut self) {
        compact_service(self);
    }
}

impl<K> StoredForm for PartialObjectMeta<K> {
    fn to_stored_form(&mut self) {
        trim_child_meta(&mut self.metadata);
    }
}

/// A child's name as the stores see it.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// The store has not finished its first list (or there is no store): ask the API server.
    Unknown,
    /// No object holds the name.
    Absent,
    /// The object holding the name (trimmed metadata, see [`trim_child_meta`]).
    Present(Box<ObjectMeta>),
}

/// The reflector stores of every kind of child, and the memo of the operator's writes, for one
/// leader term.
pub struct ChildStores {
    /// Worker Deployments, compacted ([`compact_deployment`]): their status feeds the
    /// StreamConsumer's status.
    pub deployments: Store<Deployment>,
    /// ConfigMaps (metadata).
    pub config_maps: Store<PartialObjectMeta<ConfigMap>>,
    /// Services, compacted ([`compact_service`]): metadata and `spec.clusterIP`.
    pub services: Store<Service>,
    /// PodDisruptionBudgets (metadata).
    pub pdbs: Store<PartialObjectMeta<PodDisruptionBudget>>,
    /// ServiceAccounts (metadata).
    pub service_accounts: Store<PartialObjectMeta<ServiceAccount>>,
    /// RoleBindings (metadata).
    pub role_bindings: Store<PartialObjectMeta<RoleBinding>>,
    /// NetworkPolicies (metadata); `None` when worker NetworkPolicies are off (not watched).
    pub network_policies: Option<Store<PartialObjectMeta<NetworkPolicy>>>,
    /// The operator's own last writes.
    pub memo: WriteMemo,
    settled: AtomicBool,
}

/// The writers of a new [`ChildStores`], for the reflectors that feed it.
pub struct ChildWriters {
    /// Deployments.
    pub deployments: reflector::store::Writer<Deployment>,
    /// ConfigMaps.
    pub config_maps: reflector::store::Writer<PartialObjectMeta<ConfigMap>>,
    /// Services.
    pub services: reflector::store::Writer<Service>,
    /// PodDisruptionBudgets.
    pub pdbs: reflector::store::Writer<PartialObjectMeta<PodDisruptionBudget>>,
    /// ServiceAccounts.
    pub service_accounts: reflector::store::Writer<PartialObjectMeta<ServiceAccount>>,
    /// RoleBindings.
    pub role_bindings: reflector::store::Writer<PartialObjectMeta<RoleBinding>>,
    /// NetworkPolicies, when watched.
    pub network_policies: Option<reflector::store::Writer<PartialObjectMeta<NetworkPolicy>>>,
}

impl ChildStores {
    /// Empty stores (not ready until their writers saw a first list) and an empty memo.
    pub fn new(network_policies: bool) -> (Arc<Self>, ChildWriters) {
        let (deployments, dw) = reflector::store();
        let (config_maps, cw) = reflector::store();
        let (services, sw) = reflector::store();
        let (pdbs, pw) = reflector::store();
        let (service_accounts, saw) = reflector::store();
        let (role_bindings, rw) = reflector::store();
        let (network_policies, nw) = if network_policies {
            let (s, w) = reflector::store();
            (Some(s), Some(w))
        } else {
            (None, None)
        };
        (
            Arc::new(Self {
                deployments,
                config_maps,
                services,
                pdbs,
                service_accounts,
                role_bindings,
                network_policies,
                memo: WriteMemo::default(),
                settled: AtomicBool::new(false),
            }),
            ChildWriters {
                deployments: dw,
                config_maps: cw,
                services: sw,
                pdbs: pw,
                service_accounts: saw,
                role_bindings: rw,
                network_policies: nw,
            },
        )
    }

    /// Waits (at most `wait`, and only until the first wait ended) until every store has its
    /// first list. Whether it came or not, each store answers only once it has its own
    /// ([`Lookup::Unknown`] until then): a kind whose watch cannot list is read from the API
    /// server, and costs no more waits.
    pub async fn settle(&self, wait: Duration) {
        if self.settled.load(Ordering::Relaxed) {
            return;
        }
        let all = async {
            let _ = self.deployments.wait_until_ready().await;
            let _ = self.config_maps.wait_until_ready().await;
            let _ = self.services.wait_until_ready().await;
            let _ = self.pdbs.wait_until_ready().await;
            let _ = self.service_accounts.wait_until_ready().await;
            let _ = self.role_bindings.wait_until_ready().await;
            if let Some(s) = &self.network_policies {
                let _ = s.wait_until_ready().await;
            }
        };
        if tokio::time::timeout(wait, all).await.is_err() {
            warn!(
                waited = ?wait,
                "not every child store has its first list; those kinds are read from the API server"
            );
        }
        self.settled.store(true, Ordering::Relaxed);
    }

    /// The Service `namespace/name` as stored (`Some(None)`: absent); `None` while the store has
    /// not listed.
    pub fn service(&self, namespace: &str, name: &str) -> Option<Option<Arc<Service>>> {
        is_ready(&self.services).then(|| self.services.get(&ObjectRef::new(name).within(namespace)))
    }

    /// The Deployment `namespace/name` as stored (`Some(None)`: absent); `None` while the store
    /// has not listed.
    pub fn deployment(&self, namespace: &str, name: &str) -> Option<Option<Arc<Deployment>>> {
        is_ready(&self.deployments).then(|| {
            self.deployments
                .get(&ObjectRef::new(name).within(namespace))
        })
    }
}

fn is_ready<K>(store: &Store<K>) -> bool
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    matches!(store.wait_until_ready().now_or_never(), Some(Ok(())))
}

/// The kinds of child kept in [`ChildStores`].
pub trait StoredChild: Resource<DynamicType = ()> + Sized {
    /// What the store of this kind holds under `namespace/name`.
    fn lookup(stores: &ChildStores, namespace: &str, name: &str) -> Lookup;

    /// The metadata of every stored object of this kind in `namespace` labelled as a child of the
    /// StreamConsumer `instance` (`app.kubernetes.io/instance` and `managed-by`); `None` when the
    /// kind is not stored.
    fn children_of(
        stores: &ChildStores,
        namespace: &str,
        instance: &str,
    ) -> Option<Vec<ObjectMeta>>;
}

fn labelled_child_of(meta: &ObjectMeta, namespace: &str, instance: &str) -> bool {
    let labels = meta.labels.as_ref();
    meta.namespace.as_deref() == Some(namespace)
        && labels
            .and_then(|l| l.get(LABEL_INSTANCE))
            .map(String::as_str)
            == Some(instance)
        && labels
            .and_then(|l| l.get(LABEL_MANAGED_BY))
            .map(String::as_str)
            == Some(MANAGED_BY)
}

fn lookup_in<K>(store: Option<&Store<K>>, namespace: &str, name: &str) -> Lookup
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    match store.filter(|s| is_ready(s)) {
        Some(store) => match store.get(&ObjectRef::new(name).within(namespace)) {
            Some(o) => Lookup::Present(Box::new(o.meta().clone())),
            None => Lookup::Absent,
        },
        None => Lookup::Unknown,
    }
}

fn children_in<K>(
    store: Option<&Store<K>>,
    namespace: &str,
    instance: &str,
) -> Option<Vec<ObjectMeta>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store.filter(|s| is_ready(s)).map(|s| {
        s.state_filter(|o| labelled_child_of(o.meta(), namespace, instance))
            .iter()
            .map(|o| o.meta().clone())
            .collect()
    })
}

macro_rules! stored_child {
    ($kind:ty, $field:ident) => {
        impl StoredChild for $kind {
            fn lookup(stores: &ChildStores, namespace: &str, name: &str) -> Lookup {
                lookup_in(Some(&stores.$field), namespace, name)
            }
            fn children_of(
                stores: &ChildStores,
                namespace: &str,
                instance: &str,
            ) -> Option<Vec<ObjectMeta>> {
                children_in(Some(&stores.$field), namespace, instance)
            }
        }
    };
}

stored_child!(Deployment, deployments);
stored_child!(ConfigMap, config_maps);
stored_child!(Service, services);
stored_child!(PodDisruptionBudget, pdbs);
stored_child!(ServiceAccount, service_accounts);
stored_child!(RoleBinding, role_bindings);

impl StoredChild for NetworkPolicy {
    fn lookup(stores: &ChildStores, namespace: &str, name: &str) -> Lookup {
        lookup_in(stores.network_policies.as_ref(), namespace, name)
    }
    fn children_of(
        stores: &ChildStores,
        namespace: &str,
        instance: &str,
    ) -> Option<Vec<ObjectMeta>> {
        children_in(stores.network_policies.as_ref(), namespace, instance)
    }
}

/// A child: kind, namespace, name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChildKey {
    kind: String,
    namespace: String,
    name: String,
}

impl ChildKey {
    /// The key of the `K` named `namespace/name`.
    pub fn of<K: Resource<DynamicType = ()>>(namespace: &str, name: &str) -> Self {
        Self {
            kind: K::kind(&()).into_owned(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

/// The operator's last write of one child.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Written {
    /// The StreamConsumer the child belongs to.
    owner: String,
    uid: String,
    resource_version: String,
    /// [`content_hash`] of the object the write returned, when the object was read whole.
    content: Option<u64>,
    desired: u64,
}

/// The operator's last write of each child: what the API server answered (`uid`,
/// `resourceVersion`) and a hash of the object written. See the module notes.
#[derive(Debug, Default)]
pub struct WriteMemo {
    written: Mutex<HashMap<ChildKey, Written>>,
}

/// A hash of the object the operator wants to write (its JSON form, which is stable: maps are
/// ordered).
pub fn desired_hash<K: Serialize>(desired: &K) -> u64 {
    let mut h = DefaultHasher::new();
    match serde_json::to_vec(desired) {
        Ok(bytes) => bytes.hash(&mut h),
        // Never equal to a recorded hash: nothing is skipped.
        Err(_) => return 0,
    }
    // 0 is reserved for "cannot hash".
    h.finish().max(1)
}

/// The Deployment controller's annotation of the current revision; the operator never sets it.
const DEPLOYMENT_REVISION: &str = "deployment.kubernetes.io/revision";

/// A hash of what a server-side apply of the operator's could change in `object`: everything
/// but its `status`, `resourceVersion`, `managedFields`, `kubectl apply`'s copy (so the view is
/// the same whether the object was read whole or kept trimmed in a store) and the Deployment
/// controller's revision annotation (a field the operator never sets, so no apply of its own
/// could change it). Two objects with the same content hash differ at most in what a controller
/// reports (a Deployment's rollout status and revision).
pub fn content_hash<K: Serialize>(object: &K) -> u64 {
    let Ok(mut v) = serde_json::to_value(object) else {
        return 0;
    };
    if let Some(o) = v.as_object_mut() {
        o.remove("status");
    }
    if let Some(meta) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("resourceVersion");
        meta.remove("managedFields");
        if let Some(a) = meta.get_mut("annotations").and_then(|a| a.as_object_mut()) {
            a.remove(LAST_APPLIED);
            a.remove(DEPLOYMENT_REVISION);
            if a.is_empty() {
                meta.remove("annotations");
            }
        }
    }
    let mut h = DefaultHasher::new();
    v.to_string().hash(&mut h);
    h.finish().max(1)
}

impl WriteMemo {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChildKey, Written>> {
        self.written.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether writing `desired` (by [`desired_hash`]) over the object seen as `seen` cannot
    /// change anything: the operator's last write of `key` wrote the same object, the API server
    /// answered with `seen`'s `uid`, and nothing changed the object since: the same
    /// `resourceVersion`, or, when the object was seen whole (`seen_content`, its
    /// [`content_hash`]), the same content (only a controller's status report moved the
    /// `resourceVersion`).
    pub fn unchanged(
        &self,
        key: &ChildKey,
        seen: &ObjectMeta,
        seen_content: Option<u64>,
        desired: u64,
    ) -> bool {
        let (Some(uid), Some(rv)) = (seen.uid.as_deref(), seen.resource_version.as_deref()) else {
            return false;
        };
        desired != 0
            && self.lock().get(key).is_some_and(|w| {
                w.uid == uid
                    && w.desired == desired
                    && (w.resource_version == rv
                        || (w.content.is_some() && w.content == seen_content))
            })
    }

    /// Records a write of `desired` (by [`desired_hash`]) for the StreamConsumer `owner`, answered
    /// with `stored` (and its [`content_hash`], when known). A write answered without `uid` or
    /// `resourceVersion` is forgotten instead.
    pub fn record(
        &self,
        key: ChildKey,
        owner: &str,
        stored: &ObjectMeta,
        content: Option<u64>,
        desired: u64,
    ) {
        match (stored.uid.as_deref(), stored.resource_version.as_deref()) {
            (Some(uid), Some(rv)) if desired != 0 => {
                self.lock().insert(
                    key,
                    Written {
                        owner: owner.to_string(),
                        uid: uid.to_string(),
                        resource_version: rv.to_string(),
                        content: content.filter(|c| *c != 0),
                        desired,
                    },
                );
            }
            _ => self.forget(&key),
        }
    }

    /// Forgets the child `key` (deleted).
    pub fn forget(&self, key: &ChildKey) {
        self.lock().remove(key);
    }

    /// Forgets every child of the StreamConsumer `owner` (deleted).
    pub fn forget_owner(&self, owner: &str) {
        self.lock().retain(|_, w| w.owner != owner);
    }

    /// Children remembered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
    use kube::runtime::watcher;
    use std::collections::BTreeMap;

    fn meta(uid: &str, rv: &str) -> ObjectMeta {
        ObjectMeta {
            uid: Some(uid.into()),
            resource_version: Some(rv.into()),
            ..ObjectMeta::default()
        }
    }

    fn key() -> ChildKey {
        ChildKey::of::<ConfigMap>("ns", "c")
    }

    #[test]
    fn a_write_is_skipped_only_over_the_very_object_the_last_write_returned() {
        let memo = WriteMemo::default();
        let desired = desired_hash(&BTreeMap::from([("a", 1)]));
        assert!(
            !memo.unchanged(&key(), &meta("u", "5"), None, desired),
            "nothing written yet"
        );
        memo.record(key(), "sc", &meta("u", "5"), None, desired);
        assert!(memo.unchanged(&key(), &meta("u", "5"), None, desired));
        assert!(
            !memo.unchanged(&key(), &meta("u", "6"), None, desired),
            "changed since (drift, or a controller): written again"
        );
        assert!(
            !memo.unchanged(&key(), &meta("u", "6"), Some(9), desired),
            "no content recorded: only the resourceVersion tells"
        );
        assert!(
            !memo.unchanged(&key(), &meta("other", "5"), None, desired),
            "another object under the name"
        );
        let other = desired_hash(&BTreeMap::from([("a", 2)]));
        assert!(
            !memo.unchanged(&key(), &meta("u", "5"), None, other),
            "a new desired object is written"
        );
        assert!(
            !memo.unchanged(
                &ChildKey::of::<Service>("ns", "c"),
                &meta("u", "5"),
                None,
                desired
            ),
            "another kind"
        );
        assert!(!memo.unchanged(&key(), &ObjectMeta::default(), None, desired));
    }

    #[test]
    fn forgotten_children_and_deleted_consumers_leave_the_memo() {
        let memo = WriteMemo::default();
        memo.record(key(), "sc", &meta("u", "5"), None, 7);
        memo.record(
            ChildKey::of::<Service>("ns", "c"),
            "sc",
            &meta("v", "5"),
            None,
            7,
        );
        memo.record(
            ChildKey::of::<Service>("ns", "d"),
            "other",
            &meta("w", "5"),
            None,
            7,
        );
        memo.forget(&key());
        assert!(!memo.unchanged(&key(), &meta("u", "5"), None, 7));
        assert_eq!(memo.len(), 2);
        memo.forget_owner("sc");
        assert_eq!(memo.len(), 1);
        // An answer without uid or resourceVersion cannot be compared later: forgotten.
        memo.record(
            ChildKey::of::<Service>("ns", "d"),
            "other",
            &ObjectMeta::default(),
            None,
            7,
        );
        assert!(memo.is_empty());
    }

    #[test]
    fn a_status_report_alone_does_not_make_a_whole_object_written_again() {
        use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};
        let written = Deployment {
            metadata: ObjectMeta {
                annotations: Some(BTreeMap::from([(LAST_APPLIED.into(), "{}".into())])),
                ..meta("u", "5")
            },
            spec: Some(DeploymentSpec {
                replicas: Some(2),
                ..DeploymentSpec::default()
            }),
            ..Deployment::default()
        };
        let memo = WriteMemo::default();
        let key = ChildKey::of::<Deployment>("ns", "d");
        memo.record(
            key.clone(),
            "sc",
            &written.metadata,
            Some(content_hash(&written)),
            3,
        );

        // The controller reports a rollout (new resourceVersion, new status, its revision
        // annotation); the store trimmed kubectl's copy.
        let mut reported = written.clone();
        reported.metadata.resource_version = Some("6".into());
        reported.metadata.annotations =
            Some(BTreeMap::from([(DEPLOYMENT_REVISION.into(), "1".into())]));
        reported.status = Some(DeploymentStatus {
            ready_replicas: Some(2),
            ..DeploymentStatus::default()
        });
        let seen = Some(content_hash(&reported));
        assert!(memo.unchanged(&key, &reported.metadata, seen, 3));

        // Someone scales it by hand, or labels it: written again.
        let mut scaled = reported.clone();
        scaled.spec.as_mut().unwrap().replicas = Some(5);
        assert!(!memo.unchanged(&key, &scaled.metadata, Some(content_hash(&scaled)), 3));
        let mut labelled = reported.clone();
        labelled.metadata.labels = Some(BTreeMap::from([("x".into(), "y".into())]));
        assert!(!memo.unchanged(&key, &labelled.metadata, Some(content_hash(&labelled)), 3));
        // Seen as metadata only: the resourceVersion alone tells.
        assert!(!memo.unchanged(&key, &reported.metadata, None, 3));
    }

    #[test]
    fn the_hash_of_an_object_is_stable_and_tells_objects_apart() {
        let a = ConfigMap {
            data: Some(BTreeMap::from([("k".to_string(), "v".to_string())])),
            ..ConfigMap::default()
        };
        let mut b = a.clone();
        assert_eq!(desired_hash(&a), desired_hash(&b));
        b.data = Some(BTreeMap::from([("k".to_string(), "w".to_string())]));
        assert_ne!(desired_hash(&a), desired_hash(&b));
    }

    #[test]
    fn a_stored_child_keeps_only_its_identity_its_controller_and_the_operators_field_entries() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
        let entry = |manager: &str| ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some("Update".into()),
            fields_v1: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1(
                serde_json::json!({"f:data": {}}),
            )),
            ..ManagedFieldsEntry::default()
        };
        let owner = |uid: &str, controller: bool| OwnerReference {
            uid: uid.into(),
            controller: Some(controller),
            ..OwnerReference::default()
        };
        let mut cm = PartialObjectMeta::<ConfigMap> {
            metadata: ObjectMeta {
                name: Some("test-config".into()),
                namespace: Some("ns".into()),
                managed_fields: Some(vec![entry(FIELD_MANAGER), entry("kubectl")]),
                annotations: Some(BTreeMap::from([
                    (LAST_APPLIED.to_string(), "{...}".to_string()),
                    ("other".to_string(), "x".to_string()),
                ])),
                labels: Some(BTreeMap::from([
                    (LABEL_INSTANCE.to_string(), "test".to_string()),
                    (LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
                    (
                        "app.kubernetes.io/component".to_string(),
                        "config".to_string(),
                    ),
                ])),
                owner_references: Some(vec![owner("sc", true), owner("gc-only", false)]),
                ..meta("u", "5")
            },
            ..Default::default()
        };
        cm.to_stored_form();
        let m = &cm.metadata;
        let managed = m.managed_fields.as_ref().unwrap();
        assert_eq!(managed.len(), 1);
        assert_eq!(managed[0].manager.as_deref(), Some(FIELD_MANAGER));
        assert_eq!(managed[0].operation.as_deref(), Some("Update"));
        assert_eq!(managed[0].fields_v1, None);
        assert_eq!(m.annotations, None);
        assert_eq!(
            m.labels.as_ref().unwrap().keys().collect::<Vec<_>>(),
            vec![LABEL_INSTANCE, LABEL_MANAGED_BY]
        );
        assert_eq!(
            (m.uid.as_deref(), m.resource_version.as_deref()),
            (Some("u"), Some("5"))
        );
        // What the reconciler reads of it still answers as before.
        assert!(crate::ownership::controlled_by(m, "sc"));
        assert!(!crate::ownership::controlled_by(m, "gc-only"));
        assert!(labelled_child_of(m, "ns", "test"));
        assert!(crate::ownership::handed_to_apply(managed).is_some());
    }

    /// A worker Deployment as the API server returns it: a pod template with what a real one
    /// carries, another manager's field entries, the controller's status.
    fn watched_deployment() -> Deployment {
        use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentStatus};
        use k8s_openapi::api::core::v1::{EnvVar, Volume};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
        let template_annotations = BTreeMap::from([(
            crate::names::CONFIG_HASH_ANNOTATION.to_string(),
            "abc".to_string(),
        )]);
        Deployment {
            metadata: ObjectMeta {
                name: Some("test".into()),
                namespace: Some("ns".into()),
                generation: Some(3),
                labels: Some(BTreeMap::from([
                    (LABEL_INSTANCE.to_string(), "test".to_string()),
                    (LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
                ])),
                annotations: Some(BTreeMap::from([(
                    DEPLOYMENT_REVISION.to_string(),
                    "2".to_string(),
                )])),
                owner_references: Some(vec![OwnerReference {
                    uid: "sc".into(),
                    controller: Some(true),
                    ..OwnerReference::default()
                }]),
                managed_fields: Some(vec![
                    ManagedFieldsEntry {
                        manager: Some(FIELD_MANAGER.into()),
                        operation: Some("Apply".into()),
                        ..ManagedFieldsEntry::default()
                    },
                    ManagedFieldsEntry {
                        manager: Some("kube-controller-manager".into()),
                        operation: Some("Update".into()),
                        subresource: Some("status".into()),
                        ..ManagedFieldsEntry::default()
                    },
                ]),
                ..meta("u", "7")
            },
            spec: Some(DeploymentSpec {
                replicas: Some(2),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        annotations: Some(template_annotations),
                        labels: Some(BTreeMap::from([("a".into(), "b".into())])),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(PodSpec {
                        containers: vec![Container {
                            name: "worker".into(),
                            image: Some("streamops/worker:1".into()),
                            env: Some(vec![EnvVar {
                                name: "X".into(),
                                value: Some("y".repeat(512)),
                                ..EnvVar::default()
                            }]),
                            ..Container::default()
                        }],
                        volumes: Some(vec![Volume {
                            name: "config".into(),
                            ..Volume::default()
                        }]),
                        ..PodSpec::default()
                    }),
                },
                ..DeploymentSpec::default()
            }),
            status: Some(DeploymentStatus {
                observed_generation: Some(3),
                replicas: Some(2),
                ready_replicas: Some(1),
                updated_replicas: Some(2),
                conditions: Some(vec![DeploymentCondition {
                    type_: "Progressing".into(),
                    status: "False".into(),
                    reason: Some("ProgressDeadlineExceeded".into()),
                    message: Some("too slow".into()),
                    ..DeploymentCondition::default()
                }]),
                ..DeploymentStatus::default()
            }),
        }
    }

    #[test]
    fn a_stored_deployment_still_answers_ownership_readiness_and_the_events_questions() {
        let whole = watched_deployment();
        let mut stored = whole.clone();
        stored.to_stored_form();
        let pod = stored
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap();
        assert_eq!(pod.volumes, None, "the rest of the pod template is dropped");
        assert_eq!(pod.containers[0].env, None);
        // Ownership and the handover check.
        assert!(crate::ownership::controlled_by(&stored.metadata, "sc"));
        assert!(labelled_child_of(&stored.metadata, "ns", "test"));
        let managed = stored.metadata.managed_fields.as_ref().unwrap();
        assert_eq!(managed.len(), 1, "only the operator's own entry");
        assert_eq!(crate::ownership::handed_to_apply(managed), None);
        // Readiness: the status and the generation it is compared with.
        assert_eq!(stored.status, whole.status);
        assert_eq!(stored.metadata.generation, Some(3));
        assert_eq!(
            crate::status::Rollout::of(&stored, 2),
            crate::status::Rollout::of(&whole, 2)
        );
        // What the events compare: replicas, configuration hash, image.
        let spec = stored.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(2));
        let template = &spec.template;
        assert_eq!(
            template.metadata.as_ref().unwrap().annotations,
            whole
                .spec
                .as_ref()
                .unwrap()
                .template
                .metadata
                .as_ref()
                .unwrap()
                .annotations
        );
        let container = &template.spec.as_ref().unwrap().containers[0];
        assert_eq!(
            (container.name.as_str(), container.image.as_deref()),
            ("worker", Some("streamops/worker:1"))
        );
        assert_eq!(container.env, None);
        // The write memo: the stored copy carries the content hash of the whole object.
        assert_eq!(stored_content_hash(&stored), Some(content_hash(&whole)));
        assert_eq!(
            stored_content_hash(&whole),
            None,
            "a whole object carries none"
        );
    }

    #[test]
    fn the_memo_tells_a_status_report_from_a_change_of_the_dropped_pod_template() {
        let written = watched_deployment();
        let memo = WriteMemo::default();
        let key = ChildKey::of::<Deployment>("ns", "test");
        memo.record(
            key.clone(),
            "sc",
            &written.metadata,
            Some(content_hash(&written)),
            3,
        );
        let stored_from = |d: &Deployment| {
            let mut s = d.clone();
            s.to_stored_form();
            s
        };

        // The controller reports progress: only the status and resourceVersion moved.
        let mut reported = written.clone();
        reported.metadata.resource_version = Some("8".into());
        reported.status.as_mut().unwrap().ready_replicas = Some(2);
        let s = stored_from(&reported);
        assert!(memo.unchanged(&key, &s.metadata, stored_content_hash(&s), 3));

        // Someone edits a part of the pod template the store does not keep (an env value):
        // the stored copies look alike, the content hash does not, so it is written again.
        let mut edited = written.clone();
        edited.metadata.resource_version = Some("9".into());
        edited
            .spec
            .as_mut()
            .unwrap()
            .template
            .spec
            .as_mut()
            .unwrap()
            .containers[0]
            .env = None;
        let s = stored_from(&edited);
        let mut without_hash = s.clone();
        without_hash.metadata.annotations = None;
        let mut reported_without_hash = stored_from(&reported);
        reported_without_hash.metadata.annotations = None;
        reported_without_hash.metadata.resource_version = Some("9".into());
        reported_without_hash.status = without_hash.status.clone();
        assert_eq!(
            without_hash, reported_without_hash,
            "the stored copies alike"
        );
        assert!(!memo.unchanged(&key, &s.metadata, stored_content_hash(&s), 3));

        // A hash planted on the watched object by someone else is overwritten.
        let mut planted = edited.clone();
        planted.metadata.annotations = Some(BTreeMap::from([(
            STORED_CONTENT_HASH.to_string(),
            content_hash(&written).to_string(),
        )]));
        let s = stored_from(&planted);
        assert!(!memo.unchanged(&key, &s.metadata, stored_content_hash(&s), 3));
    }

    #[tokio::test]
    async fn stores_answer_only_once_listed_and_select_children_by_label() {
        let (stores, mut w) = ChildStores::new(false);
        assert_eq!(
            ConfigMap::lookup(&stores, "ns", "test-config"),
            Lookup::Unknown
        );
        assert_eq!(ConfigMap::children_of(&stores, "ns", "test"), None);
        assert_eq!(stores.deployment("ns", "test"), None);
        let mut labelled = ObjectMeta {
            name: Some("test-config".into()),
            namespace: Some("ns".into()),
            labels: Some(BTreeMap::from([
                (LABEL_INSTANCE.to_string(), "test".to_string()),
                (LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
            ])),
            ..meta("u", "1")
        };
        let cm = PartialObjectMeta::<ConfigMap> {
            metadata: labelled.clone(),
            ..Default::default()
        };
        labelled.name = Some("other".into());
        labelled.namespace = Some("elsewhere".into());
        let elsewhere = PartialObjectMeta::<ConfigMap> {
            metadata: labelled,
            ..Default::default()
        };
        w.config_maps.apply_watcher_event(&watcher::Event::Init);
        w.config_maps
            .apply_watcher_event(&watcher::Event::InitApply(cm.clone()));
        w.config_maps
            .apply_watcher_event(&watcher::Event::InitApply(elsewhere));
        w.config_maps.apply_watcher_event(&watcher::Event::InitDone);
        // The other stores have not listed: settling gives up after the wait, once.
        stores.settle(Duration::from_millis(10)).await;
        assert_eq!(stores.deployment("ns", "test"), None);
        w.deployments.init_done();
        assert_eq!(stores.deployment("ns", "test"), Some(None));
        assert_eq!(
            ConfigMap::lookup(&stores, "ns", "test-config"),
            Lookup::Present(Box::new(cm.metadata.clone()))
        );
        assert_eq!(ConfigMap::lookup(&stores, "ns", "gone"), Lookup::Absent);
        assert_eq!(NetworkPolicy::lookup(&stores, "ns", "x"), Lookup::Unknown);
        let children = ConfigMap::children_of(&stores, "ns", "test").unwrap();
        assert_eq!(children, vec![cm.metadata]);
        assert_eq!(
            ConfigMap::children_of(&stores, "ns", "other").unwrap(),
            vec![]
        );
    }

    trait InitDone {
        fn init_done(&mut self);
    }

    #[tokio::test]
    async fn settling_waits_for_the_first_lists_only_once() {
        let (stores, mut w) = ChildStores::new(true);
        for e in [
            &mut w.config_maps as &mut dyn InitDone,
            &mut w.services,
            &mut w.pdbs,
            &mut w.service_accounts,
            &mut w.role_bindings,
            &mut w.deployments,
        ] {
            e.init_done();
        }
        let started = std::time::Instant::now();
        stores.settle(Duration::from_millis(50)).await;
        assert!(
            started.elapsed() >= Duration::from_millis(50),
            "the NetworkPolicies are not listed"
        );
        assert_eq!(NetworkPolicy::lookup(&stores, "ns", "x"), Lookup::Unknown);
        assert_eq!(ConfigMap::lookup(&stores, "ns", "x"), Lookup::Absent);
        let started = std::time::Instant::now();
        stores.settle(Duration::from_secs(5)).await;
        assert!(started.elapsed() < Duration::from_secs(1), "no second wait");
    }

    impl<K> InitDone for reflector::store::Writer<K>
    where
        K: Resource<DynamicType = ()> + Clone + 'static,
    {
        fn init_done(&mut self) {
            self.apply_watcher_event(&watcher::Event::Init);
            self.apply_watcher_event(&watcher::Event::InitDone);
        }
    }
}
