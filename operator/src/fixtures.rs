//! Test helpers: a mock API server built on `tower_test::mock::pair` that walks through the
//! requests a [`Scenario`] expects, asserts each one's method, path, query parameters (in any
//! order) and a partial JSON body, and answers it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use assert_json_diff::assert_json_include;
use futures::future::BoxFuture;
use http::{Method, Request, Response};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::core::error_boundary::DeserializeGuard;
use kube::Client;
use prometheus::Registry;
use serde_json::{json, Value};
use streamops_crds::v1alpha1::{CleanupPolicy, HandlerKind, JobTriggerSpec};
use streamops_crds::StreamConsumer;
use tokio::task::JoinHandle;
use tower_test::mock::{self, Handle};

use crate::brokers::BrokerPolicy;
use crate::consumer_group::{GroupDeleteError, GroupDeleter, GroupDeletion, GroupTarget};
use crate::lag::{GroupLag, LagError, LagReader, LagTarget};
use crate::metrics::Metrics;
use crate::names::{FIELD_MANAGER, FINALIZER};
use crate::{Context, OperatorConfig, ReplicaDecider, SpecReplicas};

/// UID of `StreamConsumer::test()`.
pub const SC_UID: &str = "752d59ef-2671-4890-9feb-0097459b18c8";
/// Default worker image of test contexts.
pub const TEST_IMAGE: &str = "example.com/streamops-worker:test";

/// Test-only builders on top of the crds fixtures.
pub trait TestConsumer: Sized {
    /// Carries the operator's finalizer.
    fn finalized(self) -> Self;
    /// Deletion requested just now, finalizer still on.
    fn deleted_now(self) -> Self;
    /// Deletion requested long ago (the fixture's epoch timestamp), finalizer still on.
    fn deleted_long_ago(self) -> Self;
    /// Sets `spec.cleanupPolicy`.
    fn with_cleanup(self, policy: CleanupPolicy) -> Self;
    /// A pipeline-trigger whose trigger creates Jobs.
    fn job_trigger() -> Self;
}

impl TestConsumer for StreamConsumer {
    fn finalized(mut self) -> Self {
        self.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
        self
    }

    fn deleted_now(self) -> Self {
        let mut sc = self.being_deleted(FINALIZER);
        sc.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        sc
    }

    fn deleted_long_ago(self) -> Self {
        self.being_deleted(FINALIZER)
    }

    fn with_cleanup(self, policy: CleanupPolicy) -> Self {
        self.with_spec(|s| s.cleanup_policy = policy)
    }

    fn job_trigger() -> Self {
        StreamConsumer::test_of(HandlerKind::PipelineTrigger).with_spec(|s| {
            if let Some(p) = s.handler.pipeline_trigger.as_mut() {
                p.webhook = None;
                p.job = Some(JobTriggerSpec {
                    template: json!({"template": {"spec": {"restartPolicy": "Never"}}}),
                });
            }
        })
    }
}

/// Wraps an object as the controller hands it to `reconcile`.
pub fn guard(sc: StreamConsumer) -> Arc<DeserializeGuard<StreamConsumer>> {
    Arc::new(DeserializeGuard(Ok(sc)))
}

/// A [`GroupDeleter`] that answers with a fixed outcome and records its calls.
pub struct FakeGroupDeleter {
    outcome: Result<GroupDeletion, GroupDeleteError>,
    /// Every target it was asked to delete.
    pub calls: Mutex<Vec<GroupTarget>>,
}

impl FakeGroupDeleter {
    /// Answers every call with `outcome`.
    pub fn new(outcome: Result<GroupDeletion, GroupDeleteError>) -> Arc<Self> {
        Arc::new(Self {
            outcome,
            calls: Mutex::default(),
        })
    }

    /// The recorded calls.
    pub fn calls(&self) -> Vec<GroupTarget> {
        self.calls.lock().unwrap().clone()
    }
}

impl GroupDeleter for FakeGroupDeleter {
    fn delete_group<'a>(
        &'a self,
        target: &'a GroupTarget,
    ) -> BoxFuture<'a, Result<GroupDeletion, GroupDeleteError>> {
        self.calls.lock().unwrap().push(target.clone());
        let outcome = self.outcome.clone();
        Box::pin(async move { outcome })
    }
}

/// A [`LagReader`] answering from a script: per consumer group, the answers of successive readings
/// (the last one repeats). An unscripted group fails as if the brokers were down.
#[derive(Default)]
pub struct FakeLagReader {
    script: Mutex<
        std::collections::HashMap<String, std::collections::VecDeque<Result<GroupLag, String>>>,
    >,
    /// Every target read, in order.
    pub reads: Mutex<Vec<LagTarget>>,
    /// The size of each [`LagReader::read_many`] call, in order.
    pub batches: Mutex<Vec<usize>>,
}

impl FakeLagReader {
    /// Scripts the next answers for `group`.
    pub fn answer(&self, group: &str, answers: Vec<Result<GroupLag, String>>) {
        self.script
            .lock()
            .unwrap()
            .entry(group.to_string())
            .or_default()
            .extend(answers);
    }

    /// Groups read, in order.
    pub fn groups_read(&self) -> Vec<String> {
        self.reads
            .lock()
            .unwrap()
            .iter()
            .map(|t| t.group_id.clone())
            .collect()
    }
}

impl LagReader for Arc<FakeLagReader> {
    async fn read(&self, target: &LagTarget) -> Result<GroupLag, LagError> {
        self.reads.lock().unwrap().push(target.clone());
        let mut script = self.script.lock().unwrap();
        let answers = script.entry(target.group_id.clone()).or_default();
        let answer = if answers.len() > 1 {
            answers.pop_front()
        } else {
            answers.front().cloned()
        };
        match answer {
            Some(Ok(lag)) => Ok(lag),
            Some(Err(why)) => Err(LagError::Task(why)),
            None => Err(LagError::Task("no broker answers for this group".into())),
        }
    }

    async fn read_many(&self, targets: &[LagTarget]) -> Vec<Result<GroupLag, LagError>> {
        self.batches.lock().unwrap().push(targets.len());
        crate::lag::read_one_by_one(self, targets).await
    }
}

/// A group lag of `total` over `partitions` partitions (all on partition 0), with `members`.
pub fn group_lag(total: i64, partitions: i32, members: i32) -> GroupLag {
    let per = (0..partitions)
        .map(|p| crate::lag::PartitionLag {
            topic: "t".into(),
            partition: p,
            committed: Some(0),
            high_watermark: if p == 0 { total } else { 0 },
            lag: if p == 0 { total } else { 0 },
            gap: None,
        })
        .collect();
    crate::lag::summarize(per, members)
}

/// The operator settings of test contexts: [`TEST_IMAGE`], Job triggers allowed (the policy's own
/// tests use stricter ones).
pub fn test_config() -> OperatorConfig {
    let mut config = OperatorConfig::new(TEST_IMAGE);
    config.policy.job_triggers = true;
    config
}

/// A client whose requests go to the returned verifier.
pub fn mock_client() -> (Client, ApiServerVerifier) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), ApiServerVerifier(handle))
}

impl Context {
    /// A context on a mock API server, with its own metrics registry and a group deleter that
    /// succeeds.
    pub fn test() -> (Arc<Self>, ApiServerVerifier, Arc<FakeGroupDeleter>) {
        Self::test_with(Ok(GroupDeletion::Deleted))
    }

    /// Like [`Context::test`], with the operator allowed to read lag from `broker` itself (so a
    /// StreamConsumer on it gets no worker Service).
    pub fn test_reading_lag_from(broker: &str) -> (Arc<Self>, ApiServerVerifier) {
        let (client, verifier) = mock_client();
        let mut config = test_config();
        config.lag_brokers = Arc::new(
            BrokerPolicy::from_json(
                &json!([{"name": "test", "bootstrapServers": [broker]}]).to_string(),
                &|_| None,
            )
            .unwrap(),
        );
        let ctx = Context::new(
            client,
            Metrics::register(&Registry::new()).unwrap(),
            config,
            FakeGroupDeleter::new(Ok(GroupDeletion::Deleted)),
            Arc::new(SpecReplicas),
        );
        (Arc::new(ctx), verifier)
    }

    /// Like [`Context::test`], with the group deleter's answer.
    pub fn test_with(
        outcome: Result<GroupDeletion, GroupDeleteError>,
    ) -> (Arc<Self>, ApiServerVerifier, Arc<FakeGroupDeleter>) {
        let (client, verifier) = mock_client();
        let metrics = Metrics::register(&Registry::new()).unwrap();
        let deleter = FakeGroupDeleter::new(outcome);
        let ctx = Context::new(
            client,
            metrics,
            test_config(),
            deleter.clone(),
            Arc::new(SpecReplicas),
        );
        (Arc::new(ctx), verifier, deleter)
    }

    /// Like [`Context::test`], deciding replicas (and knowing lag) with `decider`.
    pub fn test_deciding(decider: Arc<dyn ReplicaDecider>) -> (Arc<Self>, ApiServerVerifier) {
        let (client, verifier) = mock_client();
        let ctx = Context::new(
            client,
            Metrics::register(&Registry::new()).unwrap(),
            test_config(),
            FakeGroupDeleter::new(Ok(GroupDeletion::Deleted)),
            decider,
        );
        (Arc::new(ctx), verifier)
    }
}

/// How the mock answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// This status and body.
    Json(u16, Value),
    /// The request body with this value merged over it (an apply's answer: the applied object
    /// plus server-set fields).
    MergedOverRequest(Value),
    /// This value with the request body merged over it (a status patch's answer).
    RequestMergedInto(Value),
    /// A `Status` failure with this code and reason.
    Error(u16, &'static str),
}

/// One expected request.
#[derive(Debug, Clone)]
pub struct Expect {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    body: Option<Value>,
    contains: Vec<(String, String)>,
    reply: Reply,
}

impl Expect {
    /// A request with this method and path (without the query string), answered with `{}`.
    pub fn new(method: Method, path: impl Into<String>) -> Self {
        Self {
            method,
            path: path.into(),
            query: Vec::new(),
            body: None,
            contains: Vec::new(),
            reply: Reply::Json(200, json!({})),
        }
    }

    /// The query must contain this parameter (order does not matter).
    pub fn query(mut self, key: &str, value: &str) -> Self {
        self.query.push((key.into(), value.into()));
        self
    }

    /// The body must include this JSON (extra fields allowed).
    pub fn body(mut self, partial: Value) -> Self {
        self.body = Some(partial);
        self
    }

    /// The string at JSON `pointer` in the body must contain `needle`.
    pub fn contains(mut self, pointer: &str, needle: &str) -> Self {
        self.contains.push((pointer.into(), needle.into()));
        self
    }

    /// Whether this expects `method path`.
    pub fn is(&self, method: Method, path: &str) -> bool {
        self.method == method && self.path == path
    }

    /// The answer.
    pub fn reply(mut self, reply: Reply) -> Self {
        self.reply = reply;
        self
    }
}

/// A request the mock received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// HTTP method.
    pub method: Method,
    /// Path without query.
    pub path: String,
    /// Decoded query parameters.
    pub query: Vec<(String, String)>,
    /// JSON body (`null` when empty).
    pub body: Value,
}

impl Recorded {
    /// Whether this is a server-side apply to `path`.
    pub fn is_apply_to(&self, path: &str) -> bool {
        self.method == Method::PATCH
            && self.path == path
            && self.has_query("fieldManager", FIELD_MANAGER)
    }

    /// Whether this creates an object in collection `path` under the operator's field manager.
    pub fn is_create_in(&self, path: &str) -> bool {
        self.method == Method::POST
            && self.path == path
            && self.has_query("fieldManager", FIELD_MANAGER)
    }

    fn has_query(&self, k: &str, v: &str) -> bool {
        self.query.iter().any(|(a, b)| a == k && b == v)
    }
}

/// Finds the body of the one recorded request to `method path`. A `PATCH` of an object also
/// finds the `POST` that created it in its collection (a child whose name was free is created,
/// not applied).
pub fn body_of(requests: &[Recorded], method: Method, path: &str) -> Value {
    let creation = |r: &Recorded| {
        method == Method::PATCH
            && r.method == Method::POST
            && path.rsplit_once('/').is_some_and(|(collection, name)| {
                r.path == collection && r.body["metadata"]["name"] == name
            })
    };
    let found: Vec<_> = requests
        .iter()
        .filter(|r| (r.method == method && r.path == path) || creation(r))
        .collect();
    assert_eq!(found.len(), 1, "exactly one {method} {path}: {requests:#?}");
    found[0].body.clone()
}

fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

fn parse_query(q: Option<&str>) -> Vec<(String, String)> {
    q.unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// The server side of [`mock_client`].
pub struct ApiServerVerifier(Handle<Request<Body>, Response<Body>>);

impl ApiServerVerifier {
    /// The raw handle, for tests that answer requests in whatever order they come.
    pub fn into_handle(self) -> Handle<Request<Body>, Response<Body>> {
        self.0
    }

    /// Serves `scenario`, then asserts that no further request arrives before every client is
    /// dropped. Await the handle with [`finish`].
    pub fn run(self, scenario: Scenario) -> JoinHandle<Vec<Recorded>> {
        self.run_steps(scenario.steps())
    }

    /// Serves exactly these requests, in order.
    pub fn run_steps(self, steps: Vec<Expect>) -> JoinHandle<Vec<Recorded>> {
        let mut handle = self.0;
        tokio::spawn(async move {
            let mut recorded = Vec::new();
            let total = steps.len();
            for (i, step) in steps.into_iter().enumerate() {
                let what = format!("request {}/{total}: {} {}", i + 1, step.method, step.path);
                let (request, send) = handle
                    .next_request()
                    .await
                    .unwrap_or_else(|| panic!("{what} expected, but the client went away"));
                let (parts, body) = request.into_parts();
                let bytes = body.collect_bytes().await.unwrap();
                let body: Value = if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).unwrap()
                };
                let rec = Recorded {
                    method: parts.method.clone(),
                    path: parts.uri.path().to_string(),
                    query: parse_query(parts.uri.query()),
                    body,
                };
                assert_eq!(
                    (&rec.method, rec.path.as_str()),
                    (&step.method, step.path.as_str()),
                    "{what}: got {} {} with body {}",
                    rec.method,
                    rec.path,
                    rec.body
                );
                for (k, v) in &step.query {
                    assert!(
                        rec.has_query(k, v),
                        "{what}: query {k}={v} missing from {:?}",
                        rec.query
                    );
                }
                if let Some(expected) = &step.body {
                    assert_json_include!(actual: rec.body.clone(), expected: expected.clone());
                }
                for (pointer, needle) in &step.contains {
                    let found = rec
                        .body
                        .pointer(pointer)
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    assert!(
                        found.contains(needle.as_str()),
                        "{what}: {pointer} = {found:?} lacks {needle:?}"
                    );
                }
                let (code, answer) = match step.reply {
                    Reply::Json(code, v) => (code, v),
                    Reply::MergedOverRequest(over) => {
                        let mut v = rec.body.clone();
                        merge(&mut v, &over);
                        (200, v)
                    }
                    Reply::RequestMergedInto(mut base) => {
                        merge(&mut base, &rec.body);
                        (200, base)
                    }
                    Reply::Error(code, reason) => (
                        code,
                        json!({
                            "kind": "Status", "apiVersion": "v1", "metadata": {},
                            "status": "Failure", "message": format!("mock {reason}"),
                            "reason": reason, "code": code
                        }),
                    ),
                };
                send.send_response(
                    Response::builder()
                        .status(code)
                        .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                        .unwrap(),
                );
                recorded.push(rec);
            }
            if let Some((request, _)) = handle.next_request().await {
                panic!(
                    "unexpected request after the scenario: {} {}",
                    request.method(),
                    request.uri()
                );
            }
            recorded
        })
    }
}

/// Waits for the mock server: every expected request came and nothing else. Drop every client
/// (the context) first.
pub async fn finish(mock: JoinHandle<Vec<Recorded>>) -> Vec<Recorded> {
    tokio::time::timeout(Duration::from_secs(10), mock)
        .await
        .expect("the mock API server timed out: an expected request never came, or a client is still alive")
        .expect("the mock API server's assertions failed")
}

// ---- request builders ------------------------------------------------------------------------

const NS: &str = "default";

/// Path of a namespaced object (`name` empty: the collection).
pub fn path(api: &str, plural: &str, name: &str) -> String {
    let base = if api == "v1" {
        format!("/api/v1/namespaces/{NS}/{plural}")
    } else {
        format!("/apis/{api}/namespaces/{NS}/{plural}")
    };
    if name.is_empty() {
        base
    } else {
        format!("{base}/{name}")
    }
}

/// The children the operator manages, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// ConfigMap.
    ConfigMap,
    /// Deployment.
    Deployment,
    /// Service.
    Service,
    /// PodDisruptionBudget.
    Pdb,
    /// ServiceAccount.
    ServiceAccount,
    /// RoleBinding.
    RoleBinding,
    /// NetworkPolicy.
    NetworkPolicy,
}

impl Kind {
    /// Path of this kind of child of StreamConsumer `test` (`""` for the collection).
    pub fn path(self, name: &str) -> String {
        let (api, plural) = match self {
            Kind::ConfigMap => ("v1", "configmaps"),
            Kind::Deployment => ("apps/v1", "deployments"),
            Kind::Service => ("v1", "services"),
            Kind::Pdb => ("policy/v1", "poddisruptionbudgets"),
            Kind::ServiceAccount => ("v1", "serviceaccounts"),
            Kind::RoleBinding => ("rbac.authorization.k8s.io/v1", "rolebindings"),
            Kind::NetworkPolicy => ("networking.k8s.io/v1", "networkpolicies"),
        };
        path(api, plural, name)
    }

    /// Name of this child of StreamConsumer `test`.
    pub fn child_name(self) -> &'static str {
        match self {
            Kind::ConfigMap => "test-config",
            Kind::Deployment | Kind::Service | Kind::Pdb | Kind::NetworkPolicy => "test",
            Kind::ServiceAccount => "test-worker",
            Kind::RoleBinding => "test-job-trigger",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Kind::ConfigMap => "ConfigMap",
            Kind::Deployment => "Deployment",
            Kind::Service => "Service",
            Kind::Pdb => "PodDisruptionBudget",
            Kind::ServiceAccount => "ServiceAccount",
            Kind::RoleBinding => "RoleBinding",
            Kind::NetworkPolicy => "NetworkPolicy",
        }
    }
}

/// Server-side apply of a child of `test`, answered with the applied object plus `server`.
pub fn apply(kind: Kind, server: Value) -> Expect {
    Expect::new(Method::PATCH, kind.path(kind.child_name()))
        .query("fieldManager", FIELD_MANAGER)
        .query("force", "true")
        .body(json!({
            "kind": kind.kind(),
            "metadata": {
                "name": kind.child_name(),
                "namespace": NS,
                "labels": {"app.kubernetes.io/instance": "test", "app.kubernetes.io/managed-by": "streamops-operator"},
                "ownerReferences": [{"kind": "StreamConsumer", "name": "test", "uid": SC_UID, "controller": true}]
            }
        }))
        .reply(Reply::MergedOverRequest(server))
}

/// Creation of a child of `test` (its name was read as free), answered with the created object
/// plus `server`.
pub fn create(kind: Kind, server: Value) -> Expect {
    Expect::new(Method::POST, kind.path(""))
        .query("fieldManager", FIELD_MANAGER)
        .body(json!({
            "kind": kind.kind(),
            "metadata": {
                "name": kind.child_name(),
                "namespace": NS,
                "labels": {"app.kubernetes.io/instance": "test", "app.kubernetes.io/managed-by": "streamops-operator"},
                "ownerReferences": [{"kind": "StreamConsumer", "name": "test", "uid": SC_UID, "controller": true}]
            }
        }))
        .reply(Reply::MergedOverRequest(server))
}

/// The write of a child of `test`: an apply carrying the `resourceVersion` read (`Some`), or a
/// creation (`None`: the name was free).
pub fn write(kind: Kind, read_version: Option<&str>, server: Value) -> Expect {
    match read_version {
        Some(rv) => {
            let mut e = apply(kind, server);
            if let (Some(body), false) = (&mut e.body, rv.is_empty()) {
                body["metadata"]["resourceVersion"] = json!(rv);
            }
            e
        }
        None => create(kind, server),
    }
}

/// A child of `test` as the API server lists its metadata; `owner_uid` is its controller.
pub fn child_metadata(kind: Kind, owner_uid: &str) -> Value {
    json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": {
            "name": kind.child_name(),
            "namespace": NS,
            "uid": format!("uid-of-{}", kind.kind()),
            "labels": {"app.kubernetes.io/instance": "test", "app.kubernetes.io/managed-by": "streamops-operator"},
            "ownerReferences": [{
                "apiVersion": "streamops.dev/v1alpha1", "kind": "StreamConsumer",
                "name": "test", "uid": owner_uid, "controller": true
            }]
        }
    })
}

/// The read of a child of `test` before anything is written: absent (404), or `object`.
pub fn get_child(kind: Kind, object: Option<Value>) -> Expect {
    let e = Expect::new(Method::GET, kind.path(kind.child_name()));
    match object {
        Some(o) => e.reply(Reply::Json(200, o)),
        None => e.reply(Reply::Error(404, "NotFound")),
    }
}

/// A child of `test` as the API server returns it; `owner_uid` is its controller (`None`: it has
/// no owner at all).
pub fn child_object(kind: Kind, owner_uid: Option<&str>) -> Value {
    let collection = kind.path("");
    let api_version = collection
        .split_once("/namespaces")
        .map(|(a, _)| a)
        .unwrap_or_default()
        .trim_start_matches("/apis/")
        .trim_start_matches("/api/")
        .to_string();
    let mut meta = json!({
        "name": kind.child_name(),
        "namespace": NS,
        "uid": format!("uid-of-{}", kind.kind()),
        "resourceVersion": "7"
    });
    if let Some(uid) = owner_uid {
        meta["ownerReferences"] = json!([{
            "apiVersion": "streamops.dev/v1alpha1", "kind": "StreamConsumer",
            "name": "test", "uid": uid, "controller": true
        }]);
    }
    let mut o = json!({"apiVersion": api_version, "kind": kind.kind(), "metadata": meta});
    if kind == Kind::RoleBinding {
        o["roleRef"] =
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "x"});
    }
    o
}

/// The label-selected list of `kind` children of `test`, answered with `items`.
pub fn list_children(kind: Kind, items: Vec<Value>) -> Expect {
    Expect::new(Method::GET, kind.path(""))
        .query(
            "labelSelector",
            "app.kubernetes.io/instance=test,app.kubernetes.io/managed-by=streamops-operator",
        )
        .reply(Reply::Json(
            200,
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList", "metadata": {}, "items": items}),
        ))
}

/// Deletion of a child of `test`, guarded by its uid.
pub fn delete_child(kind: Kind) -> Expect {
    Expect::new(Method::DELETE, kind.path(kind.child_name()))
        .body(json!({
            "propagationPolicy": "Background",
            "preconditions": {"uid": format!("uid-of-{}", kind.kind())}
        }))
        .reply(Reply::Json(
            200,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
        ))
}

/// The type of the events the reconciler publishes with `reason`.
pub fn event_type(reason: &str) -> &'static str {
    match reason {
        "ReplicasOverridden" | "LagUnavailable" => "Warning",
        _ => "Normal",
    }
}

/// The merge patch that sets `spec.replicas` of `test`.
pub fn spec_replicas_patch(sc: &StreamConsumer, replicas: i32) -> Expect {
    let mut answer = serde_json::to_value(sc).unwrap();
    answer["spec"]["replicas"] = json!(replicas);
    Expect::new(Method::PATCH, sc_path(""))
        .query("fieldManager", FIELD_MANAGER)
        .body(json!({"spec": {"replicas": replicas}}))
        .reply(Reply::Json(200, answer))
}

/// An event on StreamConsumer `test`.
pub fn event(type_: &str, reason: &str) -> Expect {
    Expect::new(Method::POST, path("events.k8s.io/v1", "events", ""))
        .body(json!({
            "type": type_,
            "reason": reason,
            "reportingController": "streamops-operator",
            "regarding": {"kind": "StreamConsumer", "name": "test", "namespace": NS}
        }))
        .reply(Reply::MergedOverRequest(json!({})))
}

/// Server-side apply of `test`'s status, whose body must include `partial_status`.
pub fn status_patch(sc: &StreamConsumer, partial_status: Value) -> Expect {
    Expect::new(
        Method::PATCH,
        path("streamops.dev/v1alpha1", "streamconsumers", "test/status"),
    )
    .query("fieldManager", FIELD_MANAGER)
    .query("force", "true")
    .body(json!({
        "apiVersion": "streamops.dev/v1alpha1",
        "kind": "StreamConsumer",
        "status": partial_status
    }))
    .reply(Reply::RequestMergedInto(serde_json::to_value(sc).unwrap()))
}

/// The Deployment read before the applies.
pub fn get_deployment(existing: Option<&Deployment>) -> Expect {
    let e = Expect::new(Method::GET, Kind::Deployment.path("test"));
    match existing {
        Some(d) => e.reply(Reply::Json(200, serde_json::to_value(d).unwrap())),
        None => e.reply(Reply::Error(404, "NotFound")),
    }
}

/// A Deployment status: `ready` of `replicas` ready, all updated, at `generation`.
pub fn rollout(generation: i64, replicas: i32, ready: i32) -> Value {
    json!({
        "metadata": {"generation": generation},
        "status": {
            "observedGeneration": generation,
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": ready,
            "availableReplicas": ready
        }
    })
}

/// One apply pass of StreamConsumer `test` (which must carry the finalizer unless it retains its
/// consumer group).
#[derive(Debug, Clone)]
pub struct ApplyPass {
    /// The object reconciled.
    pub sc: StreamConsumer,
    /// The Deployment before the pass.
    pub existing: Option<Deployment>,
    /// Merged over the applied Deployment in the API server's answer (generation and status).
    pub deployment_answer: Value,
    /// Whether the workers' RBAC is applied.
    pub rbac: bool,
    /// Whether a PodDisruptionBudget is applied.
    pub pdb: bool,
    /// Whether worker NetworkPolicies are on (one is applied, and orphans are looked for).
    pub network: bool,
    /// Whether the worker Service is wanted (the lag comes from the workers' reports, as under
    /// [`test_config`], which allows no broker); when not, Services of `test` are looked for and
    /// deleted.
    pub service: bool,
    /// Optional children that exist, owned by `test`.
    pub live: Vec<Kind>,
    /// Of those, the ones the pass must delete.
    pub deleted: Vec<Kind>,
    /// Reasons of the events expected, in order (typed by [`event_type`]).
    pub events: Vec<&'static str>,
    /// The `spec.replicas` merge patch expected (autoscaling), if any.
    pub spec_replicas: Option<i32>,
    /// Partial status the status patch must include; `None`: no status patch.
    pub status: Option<Value>,
}

impl ApplyPass {
    /// A first pass over `sc`: nothing exists, the Deployment comes back with no ready pod.
    pub fn new(sc: StreamConsumer) -> Self {
        let replicas = sc.spec.replicas;
        Self {
            sc,
            existing: None,
            deployment_answer: rollout(1, replicas, 0),
            rbac: false,
            pdb: false,
            network: false,
            service: true,
            live: Vec::new(),
            deleted: Vec::new(),
            events: vec!["Created"],
            spec_replicas: None,
            status: Some(json!({})),
        }
    }

    /// The requests of this pass, for tests that alter them.
    pub fn steps_for_test(self) -> Vec<Expect> {
        self.steps()
    }

    /// The children this pass wants, in the order they are read and applied (Deployment aside).
    pub fn wanted(&self) -> Vec<Kind> {
        let mut k = vec![Kind::ConfigMap];
        if self.rbac {
            k.extend([Kind::ServiceAccount, Kind::RoleBinding]);
        }
        if self.service {
            k.push(Kind::Service);
        }
        if self.pdb {
            k.push(Kind::Pdb);
        }
        if self.network {
            k.push(Kind::NetworkPolicy);
        }
        k
    }

    fn steps(self) -> Vec<Expect> {
        let mut s = vec![get_deployment(self.existing.as_ref())];
        for kind in self.wanted() {
            let live = self
                .live
                .contains(&kind)
                .then(|| child_object(kind, Some(SC_UID)));
            s.push(get_child(kind, live));
        }
        let live = |kind: Kind| self.live.contains(&kind).then_some("7");
        s.push(write(Kind::ConfigMap, live(Kind::ConfigMap), json!({})));
        if self.rbac {
            s.push(write(
                Kind::ServiceAccount,
                live(Kind::ServiceAccount),
                json!({}),
            ));
            s.push(write(Kind::RoleBinding, live(Kind::RoleBinding), json!({})));
        }
        s.push(match &self.existing {
            Some(d) => write(
                Kind::Deployment,
                Some(d.metadata.resource_version.as_deref().unwrap_or_default()),
                self.deployment_answer.clone(),
            ),
            None => create(Kind::Deployment, self.deployment_answer.clone()),
        });
        if self.service {
            s.push(write(Kind::Service, live(Kind::Service), json!({})));
        }
        if self.pdb {
            s.push(write(Kind::Pdb, live(Kind::Pdb), json!({})));
        }
        if self.network {
            s.push(write(
                Kind::NetworkPolicy,
                live(Kind::NetworkPolicy),
                json!({}),
            ));
        }
        let mut swept = vec![Kind::Pdb];
        if !self.service {
            swept.push(Kind::Service);
        }
        swept.extend([Kind::ServiceAccount, Kind::RoleBinding]);
        if self.network {
            swept.push(Kind::NetworkPolicy);
        }
        for kind in swept {
            let items = if self.live.contains(&kind) {
                vec![child_metadata(kind, SC_UID)]
            } else {
                vec![]
            };
            s.push(list_children(kind, items));
            if self.deleted.contains(&kind) {
                s.push(delete_child(kind));
            }
        }
        for reason in &self.events {
            s.push(event(event_type(reason), reason));
        }
        if let Some(replicas) = self.spec_replicas {
            s.push(spec_replicas_patch(&self.sc, replicas));
        }
        if let Some(status) = &self.status {
            s.push(status_patch(&self.sc, status.clone()));
        }
        s
    }
}

/// What the mock API server expects from one reconciliation.
#[derive(Debug, Clone)]
pub enum Scenario {
    /// An object with `cleanupPolicy: DeleteConsumerGroup` without the finalizer: the finalizer is
    /// added, then (in the same pass) a first [`ApplyPass`] over the object the patch returned.
    FinalizerCreation(StreamConsumer),
    /// A pass that applies the children.
    Apply(Box<ApplyPass>),
    /// An invalid spec: a warning event and a `Degraded` status naming `field`; nothing applied.
    InvalidSpec {
        /// The object.
        sc: StreamConsumer,
        /// The field the condition must name.
        field: &'static str,
    },
    /// The ConfigMap apply fails with `code`/`reason`: a `Degraded` status, a warning event.
    ChildApplyFails {
        /// The object.
        sc: StreamConsumer,
        /// HTTP status.
        code: u16,
        /// `Status.reason`.
        reason: &'static str,
    },
    /// Deletion with `cleanupPolicy: Retain` of an object carrying the finalizer: the finalizer
    /// removed (the event follows when the watch sees the object gone).
    CleanupRetain(StreamConsumer),
    /// Deletion with `cleanupPolicy: DeleteConsumerGroup`: the workers are stopped, then the group
    /// deleter runs; `event` is expected (if any), and the finalizer is removed if
    /// `finalizer_removed`.
    CleanupDeleteGroup {
        /// The object.
        sc: StreamConsumer,
        /// Whether a worker Deployment still exists.
        workers_running: bool,
        /// Event reason and type expected after the deletion attempt.
        event: Option<(&'static str, &'static str)>,
        /// Whether the cleanup completes.
        finalizer_removed: bool,
    },
    /// Deletion when the brokers cannot be reached without secrets: a warning, the finalizer
    /// removed, Kafka never contacted.
    CleanupSkipped(StreamConsumer),
    /// Exactly these requests.
    Steps(Vec<Expect>),
}

fn sc_path(suffix: &str) -> String {
    path(
        "streamops.dev/v1alpha1",
        "streamconsumers",
        &format!("test{suffix}"),
    )
}

/// The JSON patch that adds the finalizer to `test` (which has none), answered with `finalized`.
pub fn finalizer_addition(finalized: &StreamConsumer) -> Expect {
    Expect::new(Method::PATCH, sc_path(""))
        .body(json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}
        ]))
        .reply(Reply::Json(200, serde_json::to_value(finalized).unwrap()))
}

fn finalizer_removal(sc: &StreamConsumer) -> Expect {
    Expect::new(Method::PATCH, sc_path(""))
        .body(json!([
            {"op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER},
            {"op": "remove", "path": "/metadata/finalizers/0"}
        ]))
        .reply(Reply::Json(200, serde_json::to_value(sc).unwrap()))
}

impl Scenario {
    /// The requests, in order.
    pub fn steps(self) -> Vec<Expect> {
        match self {
            Scenario::FinalizerCreation(sc) => {
                let finalized = sc.finalized();
                let mut steps = vec![finalizer_addition(&finalized)];
                steps.extend(ApplyPass::new(finalized).steps());
                steps
            }
            Scenario::Apply(pass) => pass.steps(),
            Scenario::InvalidSpec { sc, field } => vec![
                event("Warning", "InvalidSpec"),
                status_patch(
                    &sc,
                    json!({"conditions": [
                        {"type": "Ready"},
                        {"type": "Progressing", "status": "False", "reason": "InvalidSpec"},
                        {"type": "Degraded", "status": "True", "reason": "InvalidSpec"}
                    ]}),
                )
                .contains("/status/conditions/2/message", field),
            ],
            Scenario::ChildApplyFails { sc, code, reason } => vec![
                get_deployment(None),
                get_child(Kind::ConfigMap, None),
                get_child(Kind::Service, None),
                create(Kind::ConfigMap, json!({})).reply(Reply::Error(code, reason)),
                status_patch(
                    &sc,
                    json!({"conditions": [
                        {"type": "Ready", "status": "False"},
                        {"type": "Progressing", "status": "False"},
                        {"type": "Degraded", "status": "True", "reason": "ApplyFailed"}
                    ]}),
                ),
                event("Warning", "ApplyFailed"),
            ],
            Scenario::CleanupRetain(sc) => vec![finalizer_removal(&sc)],
            Scenario::CleanupDeleteGroup {
                sc,
                workers_running,
                event: ev,
                finalizer_removed,
            } => {
                let items = if workers_running {
                    vec![child_metadata(Kind::Deployment, SC_UID)]
                } else {
                    vec![]
                };
                let mut s = vec![list_children(Kind::Deployment, items)];
                if workers_running {
                    s.push(delete_child(Kind::Deployment));
                }
                if let Some((type_, reason)) = ev {
                    s.push(event(type_, reason));
                }
                if finalizer_removed {
                    s.push(finalizer_removal(&sc));
                }
                s
            }
            Scenario::CleanupSkipped(sc) => vec![
                event("Warning", "ConsumerGroupCleanupSkipped"),
                finalizer_removal(&sc),
            ],
            Scenario::Steps(steps) => steps,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing_decodes_and_ignores_order() {
        let q = parse_query(Some(
            "&force=true&fieldManager=streamops-operator&labelSelector=a%3Db%2Cc%3Dd",
        ));
        assert!(q.contains(&("fieldManager".into(), "streamops-operator".into())));
        assert!(q.contains(&("labelSelector".into(), "a=b,c=d".into())));
        assert!(q.contains(&("force".into(), "true".into())));
    }
}
