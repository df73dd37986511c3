//! Reconciler tests against the mock API server of `crate::fixtures`.

use std::time::Duration;

use http::Method;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::error_boundary::{DeserializeGuard, InvalidObject};
use kube::runtime::controller::Action;
use serde_json::{json, Value};
use streamops_crds::v1alpha1::{
    CleanupPolicy, CredentialsSecretRef, HandlerKind, KafkaSecurity, SaslMechanism, SaslSpec,
    SecurityProtocol,
};
use streamops_crds::StreamConsumer;

use super::*;
use crate::build::{build_deployment, BuildContext, RenderedConfig};
use crate::consumer_group::{GroupDeleteError, GroupDeletion};
use crate::fixtures::*;
use crate::names::{CONFIG_HASH_ANNOTATION, FIELD_MANAGER};
use crate::status;

/// The Deployment the operator would have applied for `sc`, as the API server stores it.
fn live_deployment(sc: &StreamConsumer, generation: i64) -> Deployment {
    let rendered = RenderedConfig::render(sc).unwrap();
    let ctx = BuildContext::new(sc, TEST_IMAGE, &rendered, sc.spec.replicas).unwrap();
    let mut d = build_deployment(&ctx);
    d.metadata.generation = Some(generation);
    d.metadata.uid = Some("deployment-uid".into());
    d.metadata.resource_version = Some("100".into());
    d
}

fn hash_of(sc: &StreamConsumer) -> String {
    RenderedConfig::render(sc).unwrap().hash
}

fn template(body: &Value) -> &Value {
    &body["spec"]["template"]
}

async fn reconcile_once(ctx: Arc<Context>, sc: StreamConsumer) -> Result<Action> {
    reconcile(guard(sc), ctx).await
}

/// A new object whose deletion deletes its consumer group gets the finalizer before anything
/// else is written, and the same pass goes on to its children (over the object the patch
/// returned) instead of waiting for the watch to bring the object back. The same holds for an
/// object whose policy changes to `DeleteConsumerGroup`: it lacks the finalizer.
#[tokio::test]
async fn a_new_object_whose_deletion_deletes_its_group_gets_the_finalizer_then_its_children_in_the_same_pass(
) {
    let (ctx, server, _) = Context::test();
    let sc = StreamConsumer::test().with_cleanup(CleanupPolicy::DeleteConsumerGroup);
    let mock = server.run(Scenario::FinalizerCreation(sc.clone()));
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    let requests = finish(mock).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(300)));
    assert_eq!(
        requests[0].body[1]["path"], "/metadata/finalizers",
        "the finalizer comes first"
    );
}

/// A new object that keeps its consumer group on deletion (`Retain`, the default) gets no
/// finalizer: its deletion has nothing for the operator to do. Its first pass writes its children
/// and its status, and nothing else.
#[tokio::test]
async fn a_new_object_that_retains_its_group_gets_its_children_and_no_finalizer() {
    let (ctx, server, _) = Context::test();
    let sc = StreamConsumer::test();
    assert!(sc.metadata.finalizers.is_none());
    let mock = server.run(Scenario::Apply(Box::new(ApplyPass::new(sc.clone()))));
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    let requests = finish(mock).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(300)));
    assert!(
        requests
            .iter()
            .all(|r| !r.body.to_string().contains("/metadata/finalizers")),
        "no finalizer is written"
    );
}

/// The deletion of an object without the finalizer sends nothing: its children go with it through
/// their owner references.
#[tokio::test]
async fn deleting_an_object_without_the_finalizer_sends_no_request() {
    let (ctx, server, deleter) = Context::test();
    let mut sc = StreamConsumer::test();
    sc.metadata.deletion_timestamp = StreamConsumer::test()
        .deleted_now()
        .metadata
        .deletion_timestamp;
    let mock = server.run(Scenario::Steps(vec![]));
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    finish(mock).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert!(deleter.calls().is_empty(), "Kafka is not touched");
}

/// Without a cleanup pass, a deleted object's child writes are forgotten when the watch reports
/// its deletion: its entries go, another object's stay.
#[test]
fn a_deleted_objects_child_writes_are_forgotten_when_the_watch_reports_its_deletion() {
    use crate::children::{ChildKey, ChildStores};
    use k8s_openapi::api::core::v1::ConfigMap;
    let (stores, _writers) = ChildStores::new(false);
    let sc = StreamConsumer::test();
    let uid = sc.metadata.uid.clone().unwrap();
    let written = ObjectMeta {
        uid: Some("child".into()),
        resource_version: Some("1".into()),
        ..ObjectMeta::default()
    };
    let ours = ChildKey::of::<ConfigMap>("default", "test");
    let theirs = ChildKey::of::<ConfigMap>("default", "other");
    stores.memo.record(ours, &uid, &written, None, 7);
    stores.memo.record(theirs, "other-uid", &written, None, 7);
    forget_deleted(&stores, &guard(sc));
    assert_eq!(
        stores.memo.len(),
        1,
        "only the other object's write is kept"
    );
}

/// When the finalizer cannot be added (a copy behind the API server fails the patch's `test`),
/// nothing is written: the failure is reported and retried.
#[tokio::test]
async fn no_child_is_written_before_the_finalizer_is_stored() {
    let (ctx, server, _) = Context::test();
    let sc = StreamConsumer::test().with_cleanup(CleanupPolicy::DeleteConsumerGroup);
    let mock = server.run(Scenario::Steps(vec![
        finalizer_addition(&sc.clone().finalized()).reply(Reply::Error(422, "Invalid")),
        event("Warning", "AddFinalizerFailed"),
    ]));
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    finish(mock).await;
    assert_eq!(result.unwrap_err().reason(), "AddFinalizerFailed");
}

/// Whether `action` comes back after a whole number of seconds in `range`.
fn held_for(action: &Action, range: std::ops::RangeInclusive<u64>) -> bool {
    range
        .into_iter()
        .any(|s| *action == Action::requeue(Duration::from_secs(s)))
}

/// A StreamConsumer `test` created `ago` seconds ago.
fn created_ago(ago: i64) -> StreamConsumer {
    let mut sc = StreamConsumer::test();
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    sc.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(now - ago).unwrap(),
    ));
    sc
}

/// The first status of an object created a moment ago only reports progress (its workers are not
/// ready): it is held, and the pass comes back when the hold after the creation ends.
#[tokio::test]
async fn a_new_objects_first_progress_waits_for_the_hold_after_its_creation() {
    let (ctx, server, _) = Context::test();
    let sc = created_ago(1);
    let mut pass = ApplyPass::new(sc.clone());
    pass.status = None;
    let mock = server.run(Scenario::Apply(Box::new(pass)));
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    finish(mock).await;
    assert!(
        held_for(&result.unwrap(), 1..=status::PROGRESS_HOLD.as_secs() - 1),
        "comes back when the hold after the creation ends"
    );
}

/// The same object once the hold after its creation has passed gets its status at once.
#[tokio::test]
async fn a_new_objects_first_progress_is_written_once_the_hold_after_its_creation_passed() {
    let (ctx, server, _) = Context::test();
    let sc = created_ago(status::PROGRESS_HOLD.as_secs() as i64 + 1);
    let mut pass = ApplyPass::new(sc.clone());
    pass.status = Some(json!({"conditions": [{"type": "Ready", "status": "False"}]}));
    let mock = server.run(Scenario::Apply(Box::new(pass)));
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    finish(mock).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(300)));
}

/// Workers ready within the hold: the first status is written at once, and it is the only one.
#[tokio::test]
async fn a_new_object_whose_workers_are_ready_gets_its_status_at_once() {
    let (ctx, server, _) = Context::test();
    let sc = created_ago(1);
    let mut pass = ApplyPass::new(sc.clone());
    pass.deployment_answer = rollout(1, 1, 1);
    pass.status = Some(json!({
        "readyReplicas": 1,
        "conditions": [{"type": "Ready", "status": "True", "reason": "WorkersReady"}]
    }));
    let mock = server.run(Scenario::Apply(Box::new(pass)));
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    finish(mock).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(300)));
}

/// Right after this process wrote the status, more progress (a pod created, not ready) waits;
/// the workers turning ready does not.
#[tokio::test]
async fn progress_right_after_a_status_write_waits_and_the_workers_turning_ready_do_not() {
    let sc = StreamConsumer::test();
    let hash = hash_of(&sc);
    let written = status::observed(&sc, &live_deployment(&sc, 1), 1, &hash, None, status::now());
    let sc = sc.with_status(written);
    for (ready, written) in [(0, false), (1, true)] {
        let (ctx, server, _) = Context::test();
        ctx.status_written(&sc);
        let mut pass = ApplyPass::new(sc.clone());
        pass.existing = Some(live_deployment(&sc, 1));
        pass.deployment_answer = rollout(1, 1, ready);
        pass.events = vec![];
        pass.status = written.then(|| json!({"conditions": [{"type": "Ready", "status": "True"}]}));
        let mock = server.run(Scenario::Apply(Box::new(pass)));
        let result = reconcile_once(ctx.clone(), sc.clone()).await;
        drop(ctx);
        finish(mock).await;
        let action = result.unwrap();
        if written {
            assert_eq!(action, Action::requeue(Duration::from_secs(300)));
        } else {
            assert!(
                held_for(&action, 1..=status::PROGRESS_HOLD.as_secs()),
                "{action:?}"
            );
        }
    }
}

#[tokio::test]
async fn create_applies_every_child_under_one_field_manager_and_reports_progress() {
    let (ctx, server, _) = Context::test();
    let sc = StreamConsumer::test().finalized();
    let hash = hash_of(&sc);
    let mut pass = ApplyPass::new(sc.clone());
    pass.status = Some(json!({
        "observedGeneration": 1,
        "replicas": 1,
        "readyReplicas": 0,
        "configHash": hash,
        "selector": "app.kubernetes.io/instance=test,app.kubernetes.io/name=streamops-worker",
        "conditions": [
            {"type": "Ready", "status": "False", "reason": "WorkersNotReady", "message": "0/1 workers ready"},
            {"type": "Progressing", "status": "True", "reason": "WaitingForReadiness"},
            {"type": "Degraded", "status": "False", "reason": "AsExpected"}
        ]
    }));
    let mock = server.run(Scenario::Apply(Box::new(pass)));
    let result = reconcile_once(ctx.clone(), sc.clone()).await;
    drop(ctx);
    let requests = finish(mock).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(300)));

    let cm = body_of(
        &requests,
        Method::PATCH,
        &Kind::ConfigMap.path("test-config"),
    );
    let yaml = cm["data"]["worker.yaml"].as_str().unwrap();
    assert_eq!(
        streamops_crds::WorkerConfig::from_yaml(yaml).unwrap(),
        streamops_crds::WorkerConfig::from_resource(&sc).unwrap()
    );
    let d = body_of(&requests, Method::PATCH, &Kind::Deployment.path("test"));
    assert_eq!(d["spec"]["replicas"], 1);
    assert_eq!(
        template(&d)["metadata"]["annotations"][CONFIG_HASH_ANNOTATION],
        hash.as_str()
    );
    assert_eq!(template(&d)["spec"]["containers"][0]["image"], TEST_IMAGE);
    // Every child is new: each is created (never applied over a name that could have been taken
    // meanwhile) under the one field manager; the status is a forced apply.
    for r in requests.iter().filter(|r| r.method == Method::PATCH) {
        assert!(r.is_apply_to(&r.path), "{} is not an apply", r.path);
        assert!(
            r.path.ends_with("/status"),
            "{} was applied, not created",
            r.path
        );
    }
    let created = requests
        .iter()
        .filter(|r| r.method == Method::POST && r.is_create_in(&r.path))
        .count();
    assert_eq!(
        created, 3,
        "ConfigMap, Deployment, Service, and no other child"
    );
}

#[tokio::test]
async fn ready_workers_at_the_current_generation_make_the_consumer_ready() {
    let (ctx, server, _) = Context::test();
    let sc = StreamConsumer::test().finalized().with_replicas(2);
    let mut pass = ApplyPass::new(sc.clone());
    pass.existing = Some(live_deployment(&sc, 3));
    pass.deployment_answer = rollout(3, 2, 2);
    pass.pdb = true;
    pass.live = vec![Kind::Pdb];
    pass.events = vec![];
    pass.status = Some(json!({
        "readyReplicas": 2,
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "WorkersReady", "message": "2/2 workers ready"},
            {"type": "Progressing", "status": "False", "reason": "RolloutComplete"},
            {"type": "Degraded", "status": "False"}
        ]
    }));
    let mock = server.run(Scenario::Apply(Box::new(pass)));
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    finish(mock).await;
    result.unwrap();
}

#[tokio::test]
async fn an_applied_deployment_whose_rollout_is_not_observed_yet_is_not_ready() {
    let (ctx, server, _) = Context::test();
    let sc = StreamConsumer::test().finalized();
    let mut pass = ApplyPass::new(sc.clone());
    pass.existing = Some(live_deployment(&sc, 1));
    pass.events = vec![];
    // The apply bumped the generation to 2; the Deployment controller still reports generation 1
    // with its one ready pod.
    pass.deployment_answer = json!({
        "metadata": {"generation": 2},
        "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1}
    });
    pass.status = Some(json!({"conditions": [
        {"type": "Ready", "status": "False", "reason": "RollingOut"},
        {"type": "Progressing", "status": "True", "reason": "RollingOut"}
    ]}));
    let mock = server.run(Scenario::Apply(Box::new(pass)));
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    finish(mock).await;
    result.unwrap();
}

#[tokio::test]
async fn config_change_rolls_the_workers_and_reports_an_update() {
    let (ctx, server, _) = Context::test();
    let old = StreamConsumer::test().finalized();
    let new = old
        .clone()
        .with_generation(2)
        .with_spec(|s| s.batch.max_wait_ms = 2_000);
    let (old_hash, new_hash) = (hash_of(&old), hash_of(&new));
    assert_ne!(old_hash, new_hash);
    let mut pass = ApplyPass::new(new.clone());
    pass.existing = Some(live_deployment(&old, 1));
    pass.deployment_answer = json!({
        "metadata": {"generation": 2},
        "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 0, "readyReplicas": 1}
    });
    pass.events = vec!["Updated"];
    pass.status = Some(json!({"observedGeneration": 2, "configHash": new_hash}));
    let mock = server.run(Scenario::Apply(Box::new(pass)));
    let result = reconcile_once(ctx.clone(), new).await;
    drop(ctx);
    let requests = finish(mock).await;
    result.unwrap();

    let d = body_of(&requests, Method::PATCH, &Kind::Deployment.path("test"));
    assert_eq!(
        template(&d)["metadata"]["annotations"][CONFIG_HASH_ANNOTATION],
        new_hash.as_str()
    );
    let cm = body_of(
        &requests,
        Method::PATCH,
        &Kind::ConfigMap.path("test-config"),
    );
    assert!(cm["data"]["worker.yaml"]
        .as_str()
        .unwrap()
        .contains("maxWaitMs: 2000"));
    let ev = requests
        .iter()
        .find(|r| r.path.ends_with("/events"))
        .unwrap();
    let note = ev.body["note"].as_str().unwrap();
    assert!(
        note.contains(&format!("{old_hash} -> {new_hash}")),
        "{note}"
    );
}

#[tokio::test]
async fn scale_only_change_keeps_the_pod_template_and_adds_a_disruption_budget() {
    let (ctx, server, _) = Context::test();
    let old = StreamConsumer::test().finalized();
    let new = old.clone().with_generation(2).with_replicas(3);
    let previous = live_deployment(&old, 1);
    let mut pass = ApplyPass::new(new.clone());
    pass.existing = Some(previous.clone());
    pass.deployment_answer = json!({
        "metadata": {"generation": 2},
        "status": {"observedGeneration": 2, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1}
    });
    pass.pdb = true;
    pass.events = vec!["Scaled"];
    pass.status = Some(json!({"conditions": [
        {"type": "Ready", "status": "False", "reason": "WorkersNotReady", "message": "1/3 workers ready"},
        {"type": "Progressing", "status": "True", "reason": "Scaling"}
    ]}));
    let mock = server.run(Scenario::Apply(Box::new(pass)));
    let result = reconcile_once(ctx.clone(), new).await;
    drop(ctx);
    let requests = finish(mock).await;
    result.unwrap();

    let d = body_of(&requests, Method::PATCH, &Kind::Deployment.path("test"));
    assert_eq!(d["spec"]["replicas"], 3);
    let previous_template = serde_json::to_value(&previous.spec.unwrap().template).unwrap();
    assert_eq!(
        template(&d),
        &previous_template,
        "no pod restarts: the template is unchanged"
    );
    let pdb = body_of(&requests, Method::PATCH, &Kind::Pdb.path("test"));
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    let ev = requests
        .iter()
        .find(|r| r.path.ends_with("/events"))
        .unwrap();
    assert_eq!(ev.body["note"], "scaled the workers from 1 to 3");
}

#[tokio::test]
async fn scaling_down_to_one_replica_deletes_the_disruption_budget() {
    let (ctx, server, _) = Context::test();
    let old = StreamConsumer::test().finalized().with_replicas(3);
    let new = old.clone().with_generation(2).with_replicas(1);
    let mut pass = ApplyPass::new(new.clone());
    pass.existing = Some(live_deployment(&old, 1));
    pass.deployment_answer = rollout(2, 1, 1);
    pass.live = vec![Kind::Pdb];
    pass.deleted = vec![Kind::Pdb];
    pass.events = vec!["Scaled"];
    let mock = server.run(Scenario::Apply(Box::new(pass)));
    let result = reconcile_once(ctx.clone(), new).await;
    drop(ctx);
    finish(mock).await;
    result.unwrap();
}

#[tokio::test]
async fn a_consumer_whose_lag_the_operator_reads_from_its_brokers_gets_no_worker_service() {
    let sc = StreamConsumer::test().finalized();
    let (ctx, server) = Context::test_reading_lag_from(&sc.spec.kafka.bootstrap_servers);
    let mut pass = ApplyPass::new(sc.clone());
    pass.service = false;
    let mock = server.run(Scenario::Apply(Box::new(pass)));
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    finish(mock).await;
    result.unwrap();
}

#[tokio::test]
async fn the_worker_service_of_a_consumer_whose_lag_now_comes_from_its_brokers_is_deleted() {
    // Made by an earlier version (one for every StreamConsumer), or while the admin had not
    // allowed the broker.
    let sc = StreamConsumer::test().finalized();
    let (ctx, server) = Context::test_reading_lag_from(&sc.spec.kafka.bootstrap_servers);
    let mut pass = ApplyPass::new(sc.clone());
    pass.existing = Some(live_deployment(&sc, 1));
    pass.deployment_answer = rollout(1, 1, 1);
    pass.events = vec![];
    pass.service = false;
    pass.live = vec![Kind::Service];
    pass.deleted = vec![Kind::Service];
    let mock = server.run(Scenario::Apply(Box::new(pass)));
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    finish(mock).await;
    result.unwrap();
}

#[tokio::test]
async fn job_trigger_workers_get_rbac_applied_before_their_deployment() {
    let (ctx, server, _) = Context::test();
    let sc = StreamConsumer::job_trigger().finalized();
    let mut pass = ApplyPass::new(sc.clone());
    pass.rbac = true;
    let mock = server.run(Scenario::Apply(Box::new(pass)));
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    let requests = finish(mock).await;
    result.unwrap();
    let binding = body_of(
        &requests,
        Method::PATCH,
        &Kind::RoleBinding.path("test-job-trigger"),
    );
    assert_eq!(
        binding["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "streamops-job-trigger"})
    );
    assert_eq!(binding["subjects"][0]["name"], "test-worker");
    assert!(
        !requests.iter().any(|r| r.path.contains("/roles")),
        "the operator makes no Role: {:?}",
        requests.iter().map(|r| &r.path).collect::<Vec<_>>()
    );
    let d = body_of(&requests, Method::PATCH, &Kind::Deployment.path("test"));
    assert_eq!(template(&d)["spec"]["serviceAccountName"], "test-worker");
    assert_eq!(template(&d)["spec"]["automountServiceAccountToken"], true);
}

#[tokio::test]
async fn switching_from_job_to_webhook_trigger_deletes_the_worker_rbac() {
    let (ctx, server, _) = Context::test();
    let old = StreamConsumer::job_trigger().finalized();
    let new = StreamConsumer::test_of(HandlerKind::PipelineTrigger)
        .finalized()
        .with_generation(2);
    let mut pass = ApplyPass::new(new.clone());
    pass.existing = Some(live_deployment(&old, 1));
    pass.deployment_answer = rollout(2, 1, 1);
    pass.live = vec![Kind::ServiceAccount, Kind::RoleBinding];
    pass.deleted = vec![Kind::ServiceAccount, Kind::RoleBinding];
    pass.events = vec!["Updated"];
    let mock = server.run(Scenario::Apply(Box::new(pass)));
    let result = reconcile_once(ctx.clone(), new).await;
    drop(ctx);
    let requests = finish(mock).await;
    result.unwrap();
    let d = body_of(&requests, Method::PATCH, &Kind::Deployment.path("test"));
    assert_eq!(template(&d)["spec"]["automountServiceAccountToken"], false);
    assert!(template(&d)["spec"].get("serviceAccountName").is_none());
}

/// Whether `p` names one child object of `test` other than its Deployment (a GET of it is the
/// ownership check before writing).
fn is_child_object(p: &str) -> bool {
    [
        Kind::ConfigMap,
        Kind::Service,
        Kind::Pdb,
        Kind::ServiceAccount,
        Kind::RoleBinding,
        Kind::NetworkPolicy,
    ]
    .iter()
    .any(|k| p == k.path(k.child_name()))
}

/// A StreamConsumer that wants every kind of child: job-trigger RBAC, a PDB (3 replicas) and,
/// with the admin's setting on, a NetworkPolicy.
fn every_child() -> (StreamConsumer, ApplyPass) {
    let sc = StreamConsumer::job_trigger().finalized().with_replicas(3);
    let mut pass = ApplyPass::new(sc.clone());
    pass.rbac = true;
    pass.pdb = true;
    pass.network = true;
    (sc, pass)
}

fn network_context() -> (Arc<Context>, ApiServerVerifier) {
    let (client, verifier) = mock_client();
    let mut config = test_config();
    config.worker_network = Some(crate::build::WorkerNetwork {
        postgres_ports: vec![5432],
        redis_ports: vec![6379],
        api_server_ports: vec![443],
    });
    let ctx = Context::new(
        client,
        crate::metrics::Metrics::register(&prometheus::Registry::new()).unwrap(),
        config,
        FakeGroupDeleter::new(Ok(GroupDeletion::Deleted)),
        Arc::new(SpecReplicas),
    );
    (Arc::new(ctx), verifier)
}

#[tokio::test]
async fn every_kind_of_child_is_applied_when_nothing_else_holds_its_name() {
    let (ctx, server) = network_context();
    let (sc, pass) = every_child();
    let wanted = pass.wanted();
    assert_eq!(wanted.len(), 6, "{wanted:?}");
    let mock = server.run(Scenario::Apply(Box::new(pass)));
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    let requests = finish(mock).await;
    result.unwrap();
    for kind in wanted.into_iter().chain([Kind::Deployment]) {
        assert!(
            requests.iter().any(|r| r.is_create_in(&kind.path(""))
                && r.body["metadata"]["name"] == kind.child_name()),
            "{kind:?} not created"
        );
    }
    let np = body_of(&requests, Method::PATCH, &Kind::NetworkPolicy.path("test"));
    assert_eq!(np["spec"]["ingress"][0]["ports"][0]["port"], 8080);
}

/// For every kind of child, an object under its name that this StreamConsumer does not control
/// (another owner, or none) stops the pass before anything is written: no apply, no delete; the
/// status is Degraded and an event names the object.
#[tokio::test]
async fn an_object_holding_a_childs_name_without_our_controller_reference_is_never_written() {
    let (_, probe) = every_child();
    let kinds: Vec<Kind> = [Kind::Deployment]
        .into_iter()
        .chain(probe.wanted())
        .collect();
    for (foreign_kind, owner, stored) in kinds.into_iter().flat_map(|k| {
        [Some("someone-else"), None]
            .into_iter()
            .flat_map(move |o| [(k, o, false), (k, o, true)])
    }) {
        {
            let (ctx, server) = network_context();
            let (sc, pass) = every_child();
            let mut steps = Vec::new();
            // From the stores, the other names are free without a read; the object the store
            // shows as someone else's is read again before it is reported.
            let _stores =
                stored.then(|| TestStores::install(&ctx, vec![child_object(foreign_kind, owner)]));
            if foreign_kind == Kind::Deployment {
                steps.push(
                    Expect::new(Method::GET, Kind::Deployment.path("test"))
                        .reply(Reply::Json(200, child_object(Kind::Deployment, owner))),
                );
            } else {
                if !stored {
                    steps.push(get_deployment(None));
                }
                for kind in pass.wanted() {
                    let foreign = kind == foreign_kind;
                    if foreign || !stored {
                        steps.push(get_child(kind, foreign.then(|| child_object(kind, owner))));
                    }
                    if foreign {
                        break;
                    }
                }
            }
            let name = foreign_kind.child_name();
            let kind_name = serde_json::to_value(child_object(foreign_kind, None)).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_string();
            let names_it = format!("{kind_name} {name}");
            steps.push(
                status_patch(
                    &sc,
                    json!({"conditions": [
                        {"type": "Ready", "status": "False"},
                        {"type": "Progressing", "status": "False"},
                        {"type": "Degraded", "status": "True", "reason": "ChildConflict"}
                    ]}),
                )
                .contains("/status/conditions/2/message", &names_it),
            );
            steps.push(event("Warning", "ChildConflict").contains("/note", &names_it));
            let mock = server.run(Scenario::Steps(steps));
            let result = reconcile_once(ctx.clone(), sc).await;
            drop(ctx);
            let requests = finish(mock).await;
            let err = result.expect_err("a conflict is an error (retried with backoff)");
            assert_eq!(
                err.reason(),
                "ChildConflict",
                "{foreign_kind:?} stored {stored}"
            );
            assert!(
                !requests.iter().any(|r| (r.method == Method::PATCH
                    && !r.path.ends_with("/status"))
                    || r.method == Method::DELETE),
                "{foreign_kind:?} (owner {owner:?}): something was written: {:?}",
                requests
                    .iter()
                    .map(|r| format!("{} {}", r.method, r.path))
                    .collect::<Vec<_>>()
            );
        }
    }
}

/// The waves in which a pass of [`every_child`] writes its children: the writes of a wave are
/// sent at once, in this order; a wave starts when the one before it is done.
const WRITE_WAVES: [&[Kind]; 2] = [
    &[Kind::ConfigMap, Kind::ServiceAccount, Kind::RoleBinding],
    &[
        Kind::Deployment,
        Kind::Service,
        Kind::Pdb,
        Kind::NetworkPolicy,
    ],
];

/// The order in which a pass of [`every_child`] sends its writes.
const WRITE_ORDER: [Kind; 7] = [
    Kind::ConfigMap,
    Kind::ServiceAccount,
    Kind::RoleBinding,
    Kind::Deployment,
    Kind::Service,
    Kind::Pdb,
    Kind::NetworkPolicy,
];

/// What the API server answers a write of a child of `kind` with in the race tests: a Deployment
/// mid-rollout, any other kind as an empty object.
fn written_answer(kind: Kind) -> Value {
    if kind == Kind::Deployment {
        rollout(1, 3, 0)
    } else {
        json!({})
    }
}

/// The writes of a pass of [`every_child`] in which the write of `raced` is refused with
/// `refused`, and its name is then read again (`reread`): every write of the waves up to the raced
/// one's (the others of its wave still go through), then the read. Returns the steps and the
/// index of the refused write.
fn raced_writes(
    raced: Kind,
    write_of: impl Fn(Kind) -> Expect,
    refused: Reply,
    reread: Expect,
) -> (Vec<Expect>, usize) {
    let mut steps = Vec::new();
    let mut refused_at = 0;
    for wave in WRITE_WAVES {
        for &kind in wave {
            if kind == raced {
                refused_at = steps.len();
                steps.push(write_of(kind).reply(refused.clone()));
            } else {
                steps.push(write_of(kind));
            }
        }
        if wave.contains(&raced) {
            steps.push(reread);
            return (steps, refused_at);
        }
    }
    panic!("{raced:?} is never written");
}

/// The name of `kind` as its conflict is reported: "Kind name".
fn named(kind: Kind) -> String {
    format!(
        "{} {}",
        child_object(kind, None)["kind"].as_str().unwrap(),
        kind.child_name()
    )
}

/// The end of a pass stopped by a conflict over `kind`: the status and the event name it.
fn conflict_reported(sc: &StreamConsumer, kind: Kind, reason: &str) -> [Expect; 2] {
    [
        status_patch(
            sc,
            json!({"conditions": [
                {"type": "Ready", "status": "False"},
                {"type": "Progressing", "status": "False"},
                {"type": "Degraded", "status": "True", "reason": reason}
            ]}),
        )
        .contains("/status/conditions/2/message", &named(kind)),
        event("Warning", reason).contains("/note", &named(kind)),
    ]
}

/// Nothing but creations of free names and applies to our own objects was written; `kind`'s name
/// in particular got no write after it turned out to be someone else's.
fn assert_nothing_written_to(requests: &[Recorded], kind: Kind, last_write: usize) {
    assert!(
        !requests.iter().any(|r| r.method == Method::DELETE),
        "{kind:?}: something was deleted"
    );
    let writes: Vec<_> = requests
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            (r.method == Method::PATCH && r.path == kind.path(kind.child_name()))
                || (r.method == Method::POST && r.path == kind.path(""))
        })
        .map(|(i, _)| i)
        .collect();
    assert!(
        writes.iter().all(|i| *i <= last_write),
        "{kind:?}: written after the conflict: {:?}",
        requests
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect::<Vec<_>>()
    );
}

/// The read-then-write race, on a free name: for every kind of child, the name is free when the
/// pass reads it, and another actor creates an object there before the pass writes. The pass
/// creates (it never applies over a name it read as free), the API server refuses with
/// `AlreadyExists`, the pass reads the name again, finds someone else's object, and stops: nothing
/// written to it, nothing deleted, Degraded and an event naming it.
#[tokio::test]
async fn a_child_created_by_someone_else_between_the_read_and_the_write_is_not_taken_over() {
    for (raced, stored) in WRITE_ORDER
        .into_iter()
        .flat_map(|k| [(k, false), (k, true)])
    {
        let (ctx, server) = network_context();
        let (sc, pass) = every_child();
        // The names are read as free, or seen free in the stores.
        let _stores = stored.then(|| TestStores::install(&ctx, vec![]));
        let mut steps = vec![];
        if !stored {
            steps.push(get_deployment(None));
            for kind in pass.wanted() {
                steps.push(get_child(kind, None));
            }
        }
        let (writes, refused_at) = raced_writes(
            raced,
            |kind| create(kind, written_answer(kind)),
            Reply::Error(409, "AlreadyExists"),
            get_child(raced, Some(child_object(raced, Some("someone-else")))),
        );
        let last_write = steps.len() + refused_at;
        steps.extend(writes);
        steps.extend(conflict_reported(&sc, raced, "ChildConflict"));
        let mock = server.run(Scenario::Steps(steps));
        let result = reconcile_once(ctx.clone(), sc).await;
        drop(ctx);
        let requests = finish(mock).await;
        assert_eq!(
            result.unwrap_err().reason(),
            "ChildConflict",
            "{raced:?} stored {stored}"
        );
        assert_nothing_written_to(&requests, raced, last_write);
    }
}

/// The read-then-write race, on our own object: for every kind of child, the object the pass read
/// as ours is replaced (deleted and created again by someone else) before the pass writes. The
/// apply carries the `resourceVersion` that was read, the API server refuses it (409), the pass
/// reads the name again, finds someone else's object, and stops without writing to it.
#[tokio::test]
async fn a_child_replaced_between_the_read_and_the_write_is_not_applied_over() {
    for (raced, stored) in WRITE_ORDER
        .into_iter()
        .flat_map(|k| [(k, false), (k, true)])
    {
        let (ctx, server) = network_context();
        let (sc, pass) = every_child();
        let mut steps = vec![];
        let ours: Vec<Value> = [Kind::Deployment]
            .into_iter()
            .chain(pass.wanted())
            .map(|kind| child_object(kind, Some(SC_UID)))
            .collect();
        // Read as ours, or seen as ours in the stores (which are behind: the object was
        // replaced since).
        let _stores = stored.then(|| TestStores::install(&ctx, ours.clone()));
        if !stored {
            steps.push(get_child(Kind::Deployment, Some(ours[0].clone())));
            for (kind, o) in pass.wanted().into_iter().zip(&ours[1..]) {
                steps.push(get_child(kind, Some(o.clone())));
            }
        }
        let (writes, refused_at) = raced_writes(
            raced,
            |kind| write(kind, Some("7"), written_answer(kind)),
            Reply::Error(409, "Conflict"),
            get_child(raced, Some(child_object(raced, Some("someone-else")))),
        );
        let last_write = steps.len() + refused_at;
        steps.extend(writes);
        steps.extend(conflict_reported(&sc, raced, "ChildConflict"));
        let mock = server.run(Scenario::Steps(steps));
        let result = reconcile_once(ctx.clone(), sc).await;
        drop(ctx);
        let requests = finish(mock).await;
        assert_eq!(
            result.unwrap_err().reason(),
            "ChildConflict",
            "{raced:?} stored {stored}"
        );
        assert_nothing_written_to(&requests, raced, last_write);
    }
}

/// A child of ours that keeps changing under the pass (every apply refused for a stale
/// `resourceVersion`) is read again and retried a bounded number of times, then the pass stops
/// with `ChildChanged`; a child that changed once is simply written on the second attempt.
#[tokio::test]
async fn a_child_that_keeps_changing_is_retried_a_bounded_number_of_times() {
    let (ctx, server, _) = Context::test();
    let sc = StreamConsumer::test().finalized();
    let ours = |rv: &str| {
        let mut o = child_object(Kind::ConfigMap, Some(SC_UID));
        o["metadata"]["resourceVersion"] = json!(rv);
        o
    };
    let mut steps = vec![
        get_deployment(None),
        get_child(Kind::ConfigMap, Some(ours("7"))),
        get_child(Kind::Service, None),
    ];
    for (attempt, rv) in ["7", "8", "9"].into_iter().enumerate() {
        steps
            .push(write(Kind::ConfigMap, Some(rv), json!({})).reply(Reply::Error(409, "Conflict")));
        steps.push(get_child(
            Kind::ConfigMap,
            Some(ours(["8", "9", "10"][attempt])),
        ));
    }
    steps.extend(conflict_reported(&sc, Kind::ConfigMap, "ChildChanged"));
    let mock = server.run(Scenario::Steps(steps));
    let result = reconcile_once(ctx.clone(), sc.clone()).await;
    drop(ctx);
    finish(mock).await;
    assert_eq!(result.unwrap_err().reason(), "ChildChanged");

    // Changed once: the second attempt, with the new resourceVersion, goes through.
    let (ctx, server, _) = Context::test();
    let mut pass = ApplyPass::new(sc.clone());
    pass.live = vec![Kind::ConfigMap];
    let mut steps = pass.steps_for_test();
    let at = steps
        .iter()
        .position(|e| e.is(Method::PATCH, &Kind::ConfigMap.path("test-config")))
        .unwrap();
    steps.splice(
        at..at + 1,
        [
            write(Kind::ConfigMap, Some("7"), json!({})).reply(Reply::Error(409, "Conflict")),
            get_child(Kind::ConfigMap, Some(ours("8"))),
            write(Kind::ConfigMap, Some("8"), json!({})),
        ],
    );
    let mock = server.run(Scenario::Steps(steps));
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    finish(mock).await;
    result.unwrap();
}

/// A created child's fields are under an `Update` entry of the operator's manager (the create's),
/// and stay there while nothing needs writing. Before the next apply they are handed to
/// server-side apply (the entry becomes the manager's `Apply` entry, a merge patch under a
/// `resourceVersion` precondition), so a later apply that stops setting a field removes it. The
/// apply then carries the handover's `resourceVersion`.
#[tokio::test]
async fn a_created_childs_fields_are_handed_to_server_side_apply_before_its_next_write() {
    let (ctx, server, _) = Context::test();
    let sc = StreamConsumer::test().finalized();
    let entry = |op: &str| {
        json!({"manager": FIELD_MANAGER, "operation": op, "apiVersion": "v1",
               "fieldsType": "FieldsV1", "fieldsV1": {"f:data": {"f:worker.yaml": {}}}})
    };
    let mut pass = ApplyPass::new(sc.clone());
    pass.live = vec![Kind::ConfigMap];
    let mut steps = pass.steps_for_test();
    let mut created = child_object(Kind::ConfigMap, Some(SC_UID));
    created["metadata"]["managedFields"] = json!([entry("Update")]);
    let read = steps
        .iter()
        .position(|e| e.is(Method::GET, &Kind::ConfigMap.path("test-config")))
        .unwrap();
    steps[read] = get_child(Kind::ConfigMap, Some(created));
    let at = steps
        .iter()
        .position(|e| e.is(Method::PATCH, &Kind::ConfigMap.path("test-config")))
        .unwrap();
    let mut handed = child_object(Kind::ConfigMap, Some(SC_UID));
    handed["metadata"]["resourceVersion"] = json!("8");
    handed["metadata"]["managedFields"] = json!([entry("Apply")]);
    steps.splice(
        at..at + 1,
        [
            Expect::new(Method::PATCH, Kind::ConfigMap.path("test-config"))
                .body(json!({"metadata": {"resourceVersion": "7", "managedFields": [entry("Apply")]}}))
                .reply(Reply::Json(200, handed)),
            write(Kind::ConfigMap, Some("8"), json!({})),
        ],
    );
    let mock = server.run(Scenario::Steps(steps));
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    let requests = finish(mock).await;
    result.unwrap();
    let handover = requests
        .iter()
        .find(|r| r.method == Method::PATCH && r.path == Kind::ConfigMap.path("test-config"))
        .unwrap();
    assert!(
        !handover.query.iter().any(|(k, _)| k == "force"),
        "a merge patch, not an apply"
    );
}

/// A new child is created with one request: its fields are not handed to server-side apply
/// right away (most children are never written again), even though the create left them to an
/// `Update` entry; the scenario serves no handover.
#[tokio::test]
async fn a_new_child_is_created_with_one_request_and_no_handover() {
    let (ctx, server, _) = Context::test();
    let sc = StreamConsumer::test().finalized();
    let update_entry = json!({"metadata": {"managedFields": [{
        "manager": FIELD_MANAGER, "operation": "Update", "apiVersion": "v1",
        "fieldsType": "FieldsV1", "fieldsV1": {"f:data": {"f:worker.yaml": {}}}
    }]}});
    let pass = ApplyPass::new(sc.clone());
    let mut steps = pass.steps_for_test();
    let at = steps
        .iter()
        .position(|e| e.is(Method::POST, &Kind::ConfigMap.path("")))
        .unwrap();
    steps[at] = create(Kind::ConfigMap, update_entry);
    let mock = server.run(Scenario::Steps(steps));
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    let requests = finish(mock).await;
    result.unwrap();
    assert_eq!(
        requests
            .iter()
            .filter(|r| r.method != Method::GET && r.path.starts_with(&Kind::ConfigMap.path("")))
            .count(),
        1,
        "the ConfigMap's create is its only write"
    );
}

/// Orphan cleanup: an object under the name of a child this pass no longer wants (PDB,
/// ServiceAccount, RoleBinding), labelled like a child but controlled by another owner, is not
/// deleted; the pass reports it. (A wanted NetworkPolicy is read before writing, like every wanted
/// child; with NetworkPolicies off the operator does not look at them at all.)
#[tokio::test]
async fn orphan_cleanup_never_deletes_an_object_it_does_not_control() {
    for foreign_kind in [Kind::Pdb, Kind::ServiceAccount, Kind::RoleBinding] {
        let (ctx, server, _) = Context::test();
        let sc = StreamConsumer::test().finalized();
        let mut pass = ApplyPass::new(sc.clone());
        pass.events = vec![];
        pass.status = None;
        let mut steps = pass.steps_for_test();
        let at = steps
            .iter()
            .position(|e| e.is(Method::GET, &foreign_kind.path("")))
            .unwrap();
        steps[at] = list_children(
            foreign_kind,
            vec![child_metadata(foreign_kind, "someone-else")],
        );
        steps.push(
            status_patch(
                &sc,
                json!({"conditions": [{"type": "Ready"}, {"type": "Progressing"},
                    {"type": "Degraded", "status": "True", "reason": "ChildConflict"}]}),
            )
            .contains("/status/conditions/2/message", foreign_kind.child_name()),
        );
        steps.push(event("Warning", "ChildConflict"));
        let mock = server.run(Scenario::Steps(steps));
        let result = reconcile_once(ctx.clone(), sc).await;
        drop(ctx);
        let requests = finish(mock).await;
        assert_eq!(
            result.expect_err("reported").reason(),
            "ChildConflict",
            "{foreign_kind:?}"
        );
        assert!(
            !requests.iter().any(|r| r.method == Method::DELETE),
            "{foreign_kind:?} was deleted"
        );
    }
}

#[tokio::test]
async fn cleanup_never_stops_workers_it_does_not_control() {
    let (ctx, server, deleter) = Context::test();
    let sc = StreamConsumer::test()
        .with_cleanup(CleanupPolicy::DeleteConsumerGroup)
        .deleted_now();
    let steps = vec![
        list_children(
            Kind::Deployment,
            vec![child_metadata(Kind::Deployment, "someone-else")],
        ),
        event("Warning", "ChildConflict"),
        event("Normal", "ConsumerGroupDeleted"),
        Expect::new(
            Method::PATCH,
            path("streamops.dev/v1alpha1", "streamconsumers", "test"),
        )
        .reply(Reply::Json(200, serde_json::to_value(&sc).unwrap())),
    ];
    let mock = server.run(Scenario::Steps(steps));
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    let requests = finish(mock).await;
    result.unwrap();
    assert!(!requests.iter().any(|r| r.method == Method::DELETE));
    assert_eq!(deleter.calls().len(), 1);
}

#[tokio::test]
async fn spec_image_and_job_triggers_outside_the_policy_are_refused_naming_the_field() {
    for (sc, field, job_triggers) in [
        (
            StreamConsumer::test()
                .finalized()
                .with_spec(|s| s.image = Some("attacker.example/miner:1".into())),
            "spec.image",
            true,
        ),
        (
            StreamConsumer::job_trigger().finalized(),
            "spec.handler.pipelineTrigger.job",
            false,
        ),
    ] {
        let (client, server) = mock_client();
        let mut config = test_config();
        config.policy.job_triggers = job_triggers;
        let ctx = Arc::new(Context::new(
            client,
            crate::metrics::Metrics::register(&prometheus::Registry::new()).unwrap(),
            config,
            FakeGroupDeleter::new(Ok(GroupDeletion::Deleted)),
            Arc::new(SpecReplicas),
        ));
        let mock = server.run(Scenario::InvalidSpec {
            sc: sc.clone(),
            field,
        });
        let result = reconcile_once(ctx.clone(), sc).await;
        drop(ctx);
        let requests = finish(mock).await;
        assert_eq!(result.unwrap(), Action::await_change());
        assert!(!requests
            .iter()
            .any(|r| r.method == Method::PATCH && !r.path.ends_with("/status")));
    }
}

#[tokio::test]
async fn drift_on_the_children_is_overwritten_with_the_desired_state() {
    let (ctx, server, _) = Context::test();
    let sc = StreamConsumer::test().finalized();
    // Someone scaled the Deployment and swapped the image by hand.
    let mut drifted = live_deployment(&sc, 4);
    let spec = drifted.spec.as_mut().unwrap();
    spec.replicas = Some(5);
    spec.template.spec.as_mut().unwrap().containers[0].image = Some("evil:latest".into());
    let mut pass = ApplyPass::new(sc.clone());
    pass.existing = Some(drifted);
    pass.deployment_answer = rollout(5, 1, 1);
    pass.events = vec!["Updated", "Scaled"];
    let mock = server.run(Scenario::Apply(Box::new(pass)));
    let result = reconcile_once(ctx.clone(), sc.clone()).await;
    drop(ctx);
    let requests = finish(mock).await;
    result.unwrap();
    let d = body_of(&requests, Method::PATCH, &Kind::Deployment.path("test"));
    assert_eq!(d["spec"]["replicas"], 1);
    assert_eq!(template(&d)["spec"]["containers"][0]["image"], TEST_IMAGE);
    // The ConfigMap is re-applied from the spec whatever it holds now.
    let cm = body_of(
        &requests,
        Method::PATCH,
        &Kind::ConfigMap.path("test-config"),
    );
    assert_eq!(
        cm["data"]["worker.yaml"],
        RenderedConfig::render(&sc).unwrap().yaml.as_str()
    );
}

#[tokio::test]
async fn a_deployment_of_the_same_name_that_is_not_ours_is_not_taken_over() {
    let (ctx, server, _) = Context::test();
    let sc = StreamConsumer::test().finalized();
    let mut foreign = live_deployment(&sc, 1);
    foreign.metadata.owner_references = None;
    let mock = server.run(Scenario::Steps(vec![
        get_deployment(Some(&foreign)),
        status_patch(&sc, json!({"conditions": [{"type": "Ready"}, {"type": "Progressing"}, {"type": "Degraded", "status": "True", "reason": "ChildConflict"}]})),
        event("Warning", "ChildConflict"),
    ]));
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    finish(mock).await;
    assert_eq!(result.unwrap_err().reason(), "ChildConflict");
}

#[tokio::test]
async fn invalid_spec_is_degraded_naming_the_field_and_applies_nothing() {
    let (ctx, server, _) = Context::test();
    let sc = StreamConsumer::test_of(HandlerKind::Fraud)
        .finalized()
        .with_spec(|s| s.handler.fraud.as_mut().unwrap().scoring_url = "ftp://scores".into());
    let mock = server.run(Scenario::InvalidSpec {
        sc: sc.clone(),
        field: "spec.handler.fraud.scoringUrl",
    });
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    let requests = finish(mock).await;
    assert_eq!(
        result.unwrap(),
        Action::await_change(),
        "no requeue, no crash loop"
    );
    let note = requests[0].body["note"].as_str().unwrap();
    assert!(note.contains("spec.handler.fraud.scoringUrl"), "{note}");
}

#[tokio::test]
async fn invalid_spec_already_reported_causes_no_requests() {
    let sc = StreamConsumer::test()
        .finalized()
        .with_spec(|s| s.kafka.bootstrap_servers = "no-port".into());
    // The first pass reports it...
    let (ctx, server, _) = Context::test();
    let mock = server.run(Scenario::InvalidSpec {
        sc: sc.clone(),
        field: "spec.kafka.bootstrapServers",
    });
    reconcile_once(ctx.clone(), sc.clone()).await.unwrap();
    drop(ctx);
    let requests = finish(mock).await;
    let status: streamops_crds::StreamConsumerStatus =
        serde_json::from_value(requests[1].body["status"].clone()).unwrap();
    // ...and the watch event of that status patch finds nothing new to say.
    let (ctx, server, _) = Context::test();
    let mock = server.run(Scenario::Steps(vec![]));
    let result = reconcile_once(ctx.clone(), sc.with_status(status)).await;
    drop(ctx);
    finish(mock).await;
    assert_eq!(result.unwrap(), Action::await_change());
}

#[tokio::test]
async fn name_that_cannot_name_a_service_is_an_invalid_spec() {
    let (ctx, server, _) = Context::test();
    let mut sc = StreamConsumer::test().finalized();
    sc.metadata.name = Some("9lives".into());
    // Paths use the object's name.
    let mock = server.run(Scenario::Steps(vec![
        event("Warning", "InvalidSpec").body(json!({"regarding": {"name": "9lives"}})),
        Expect::new(
            Method::PATCH,
            path("streamops.dev/v1alpha1", "streamconsumers", "9lives/status"),
        )
        .contains("/status/conditions/2/message", "metadata.name")
        .reply(Reply::RequestMergedInto(serde_json::to_value(&sc).unwrap())),
    ]));
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    finish(mock).await;
    assert_eq!(result.unwrap(), Action::await_change());
}

async fn failing_child_apply(code: u16, reason: &'static str) {
    let (ctx, server, _) = Context::test();
    let sc = StreamConsumer::test().finalized();
    let mock = server.run(Scenario::ChildApplyFails {
        sc: sc.clone(),
        code,
        reason,
    });
    let object = guard(sc);
    let result = reconcile(object.clone(), ctx.clone()).await;
    let error = result.unwrap_err();
    assert_eq!(error.reason(), "ApplyFailed");
    assert!(
        error.to_string().contains("ConfigMap test-config"),
        "{error}"
    );

    // The controller's error policy backs off exponentially per object, capped.
    let delays: Vec<_> = (0..8)
        .map(|_| error_policy(object.clone(), &error, ctx.clone()))
        .collect();
    let secs = [5, 10, 20, 40, 80, 160, 300, 300];
    let expected: Vec<_> = secs
        .iter()
        .map(|s| Action::requeue(Duration::from_secs(*s)))
        .collect();
    assert_eq!(delays, expected);
    assert_eq!(
        ctx.metrics
            .failures
            .with_label_values(&["apply_failed"])
            .get(),
        8
    );
    // Another object has its own backoff.
    let mut other = StreamConsumer::test();
    other.metadata.name = Some("other".into());
    assert_eq!(
        error_policy(guard(other), &error, ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
    drop(ctx);
    finish(mock).await;
}

#[tokio::test]
async fn child_apply_server_error_is_returned_and_backed_off() {
    failing_child_apply(500, "InternalError").await;
}

#[tokio::test]
async fn child_apply_conflict_is_returned_and_backed_off() {
    failing_child_apply(409, "Conflict").await;
}

#[tokio::test]
async fn success_resets_the_backoff() {
    let (ctx, server, _) = Context::test();
    let sc = StreamConsumer::test().finalized();
    let object = guard(sc.clone());
    let error = Error::MissingMetadata("uid");
    error_policy(object.clone(), &error, ctx.clone());
    error_policy(object.clone(), &error, ctx.clone());
    let mock = server.run(Scenario::Apply(Box::new(ApplyPass::new(sc))));
    reconcile(object.clone(), ctx.clone()).await.unwrap();
    assert_eq!(
        error_policy(object, &error, ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
    drop(ctx);
    finish(mock).await;
}

#[tokio::test]
async fn failing_status_patch_fails_the_reconciliation() {
    let (ctx, server, _) = Context::test();
    let sc = StreamConsumer::test().finalized();
    let mut steps = ApplyPass::new(sc.clone()).steps_for_test();
    let last = steps.pop().unwrap();
    steps.push(last.reply(Reply::Error(500, "InternalError")));
    steps.push(event("Warning", "StatusPatchFailed"));
    let mock = server.run(Scenario::Steps(steps));
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    finish(mock).await;
    assert_eq!(result.unwrap_err().kind(), "status_patch_failed");
}

#[tokio::test]
async fn reconcile_metrics_count_and_time_every_pass() {
    let (ctx, server, _) = Context::test();
    let sc = StreamConsumer::test();
    let mock = server.run(Scenario::Apply(Box::new(ApplyPass::new(sc.clone()))));
    reconcile_once(ctx.clone(), sc).await.unwrap();
    assert_eq!(ctx.metrics.reconciliations.get(), 1);
    assert_eq!(ctx.metrics.duration.get_sample_count(), 1);
    drop(ctx);
    finish(mock).await;
}

// ---- deletion ------------------------------------------------------------------------------

#[tokio::test]
async fn delete_with_retain_keeps_the_group_and_releases_the_object() {
    let (ctx, server, deleter) = Context::test();
    let sc = StreamConsumer::test().deleted_now();
    let mock = server.run(Scenario::CleanupRetain(sc.clone()));
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    finish(mock).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert!(deleter.calls().is_empty(), "Kafka is not touched");
}

#[tokio::test]
async fn delete_with_delete_consumer_group_stops_the_workers_then_deletes_the_group() {
    let (ctx, server, deleter) = Context::test();
    let sc = StreamConsumer::test()
        .with_cleanup(CleanupPolicy::DeleteConsumerGroup)
        .deleted_now();
    let mock = server.run(Scenario::CleanupDeleteGroup {
        sc: sc.clone(),
        workers_running: true,
        event: Some(("Normal", "ConsumerGroupDeleted")),
        finalizer_removed: true,
    });
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    finish(mock).await;
    result.unwrap();
    let calls = deleter.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].group_id, "moving-average-consumer");
    assert_eq!(calls[0].bootstrap_servers, "127.0.0.1:9092");
}

#[tokio::test]
async fn delete_of_an_object_whose_apply_never_ran_still_cleans_up() {
    let (ctx, server, deleter) = Context::test_with(Ok(GroupDeletion::NotFound));
    let sc = StreamConsumer::test()
        .with_cleanup(CleanupPolicy::DeleteConsumerGroup)
        .deleted_now();
    let mock = server.run(Scenario::CleanupDeleteGroup {
        sc: sc.clone(),
        workers_running: false,
        event: Some(("Normal", "ConsumerGroupDeleted")),
        finalizer_removed: true,
    });
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    let requests = finish(mock).await;
    result.unwrap();
    assert_eq!(deleter.calls().len(), 1);
    let ev = requests
        .iter()
        .find(|r| r.path.ends_with("/events"))
        .unwrap();
    assert!(ev.body["note"].as_str().unwrap().contains("did not exist"));
}

#[tokio::test]
async fn unreachable_brokers_keep_the_finalizer_and_retry_within_the_deadline() {
    let (ctx, server, _) =
        Context::test_with(Err(GroupDeleteError::Timeout(Duration::from_secs(10))));
    let sc = StreamConsumer::test()
        .with_cleanup(CleanupPolicy::DeleteConsumerGroup)
        .deleted_now();
    let mock = server.run(Scenario::CleanupDeleteGroup {
        sc: sc.clone(),
        workers_running: false,
        event: Some(("Warning", "ConsumerGroupCleanupFailed")),
        finalizer_removed: false,
    });
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    finish(mock).await;
    let error = result.unwrap_err();
    assert_eq!(error.kind(), "consumer_group_cleanup_failed");
}

#[tokio::test]
async fn unreachable_brokers_past_the_deadline_give_up_with_a_warning() {
    let (ctx, server, _) =
        Context::test_with(Err(GroupDeleteError::Timeout(Duration::from_secs(10))));
    // The fixture's deletion timestamp is the epoch: long past the deadline.
    let sc = StreamConsumer::test()
        .with_cleanup(CleanupPolicy::DeleteConsumerGroup)
        .deleted_long_ago();
    let mock = server.run(Scenario::CleanupDeleteGroup {
        sc: sc.clone(),
        workers_running: false,
        event: Some(("Warning", "ConsumerGroupCleanupAbandoned")),
        finalizer_removed: true,
    });
    let result = reconcile_once(ctx.clone(), sc).await;
    assert_eq!(
        ctx.metrics
            .group_cleanups
            .with_label_values(&["abandoned"])
            .get(),
        1
    );
    drop(ctx);
    finish(mock).await;
    assert_eq!(result.unwrap(), Action::await_change());
}

#[tokio::test]
async fn group_with_members_is_retried_not_abandoned_before_the_deadline() {
    let (ctx, server, _) = Context::test_with(Err(GroupDeleteError::NotEmpty));
    let sc = StreamConsumer::test()
        .with_cleanup(CleanupPolicy::DeleteConsumerGroup)
        .deleted_now();
    let mock = server.run(Scenario::CleanupDeleteGroup {
        sc: sc.clone(),
        workers_running: true,
        event: Some(("Warning", "ConsumerGroupCleanupFailed")),
        finalizer_removed: false,
    });
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    finish(mock).await;
    assert!(result.is_err());
}

#[tokio::test]
async fn brokers_behind_sasl_are_not_contacted_and_the_group_is_reported_as_kept() {
    let (ctx, server, deleter) = Context::test();
    let sc = StreamConsumer::test()
        .with_cleanup(CleanupPolicy::DeleteConsumerGroup)
        .with_spec(|s| {
            s.kafka.security = Some(KafkaSecurity {
                protocol: SecurityProtocol::SaslSsl,
                sasl: Some(SaslSpec {
                    mechanism: SaslMechanism::ScramSha256,
                    credentials_secret_ref: CredentialsSecretRef {
                        name: "creds".into(),
                        username_key: "username".into(),
                        password_key: "password".into(),
                    },
                }),
                tls: None,
            })
        })
        .deleted_now();
    let mock = server.run(Scenario::CleanupSkipped(sc.clone()));
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    finish(mock).await;
    result.unwrap();
    assert!(deleter.calls().is_empty());
}

// ---- malformed objects ---------------------------------------------------------------------

fn malformed(meta: ObjectMeta) -> Arc<DeserializeGuard<StreamConsumer>> {
    Arc::new(DeserializeGuard(Err(InvalidObject {
        error: "spec.replicas: invalid type: string \"three\", expected i32".into(),
        metadata: meta,
    })))
}

fn malformed_meta() -> ObjectMeta {
    ObjectMeta {
        name: Some("test".into()),
        namespace: Some("default".into()),
        uid: Some(SC_UID.into()),
        resource_version: Some("42".into()),
        ..ObjectMeta::default()
    }
}

#[tokio::test]
async fn malformed_object_gets_a_warning_and_is_skipped() {
    let (ctx, server, _) = Context::test();
    let mock = server.run(Scenario::Steps(vec![
        event("Warning", "MalformedObject").contains("/note", "expected i32")
    ]));
    let result = reconcile(malformed(malformed_meta()), ctx.clone()).await;
    assert_eq!(ctx.metrics.malformed_objects.get(), 1);
    drop(ctx);
    finish(mock).await;
    assert_eq!(result.unwrap(), Action::await_change());
}

#[tokio::test]
async fn malformed_object_being_deleted_is_released_without_touching_the_group() {
    let (ctx, server, deleter) = Context::test();
    let mut meta = malformed_meta();
    meta.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    meta.finalizers = Some(vec!["other.io/keep".into(), FINALIZER.into()]);
    let mock = server.run(Scenario::Steps(vec![
        event("Warning", "MalformedObject"),
        Expect::new(
            Method::PATCH,
            path("streamops.dev/v1alpha1", "streamconsumers", "test"),
        )
        .body(json!({"metadata": {"resourceVersion": "42", "finalizers": ["other.io/keep"]}}))
        .reply(Reply::Json(
            200,
            json!({
                "apiVersion": "streamops.dev/v1alpha1", "kind": "StreamConsumer",
                "metadata": {"name": "test", "namespace": "default"}, "spec": "garbage"
            }),
        )),
        event("Warning", "ConsumerGroupCleanupSkipped"),
    ]));
    let result = reconcile(malformed(meta), ctx.clone()).await;
    drop(ctx);
    finish(mock).await;
    result.unwrap();
    assert!(deleter.calls().is_empty());
}

// ---- the controller as a whole -------------------------------------------------------------

/// The controller, watching through a `DeserializeGuard`, lists one malformed and one valid
/// StreamConsumer: the malformed one gets a warning event, the valid one is reconciled (it deletes
/// its group on deletion, so its finalizer is added). Requests are answered in whatever order they
/// come; watches are left open.
#[tokio::test]
async fn controller_skips_a_malformed_object_and_reconciles_the_others() {
    use crate::metrics::Metrics;
    use crate::{OperatorConfig, SpecReplicas};
    use http::Response;
    use kube::client::Body;
    use tokio_util::sync::CancellationToken;

    let (client, verifier) = mock_client();
    let mut handle = verifier.into_handle();
    let ctx = Arc::new(Context::new(
        client.clone(),
        Metrics::register(&prometheus::Registry::new()).unwrap(),
        OperatorConfig::new(TEST_IMAGE),
        FakeGroupDeleter::new(Ok(GroupDeletion::Deleted)),
        Arc::new(SpecReplicas),
    ));
    let stop = CancellationToken::new();
    let controller = tokio::spawn(run_controller(
        client,
        Some("default".into()),
        ctx.clone(),
        stop.clone(),
        None,
    ));

    let mut good = StreamConsumer::test().with_cleanup(CleanupPolicy::DeleteConsumerGroup);
    good.metadata.name = Some("good".into());
    good.metadata.resource_version = Some("5".into());
    let bad = json!({
        "apiVersion": "streamops.dev/v1alpha1", "kind": "StreamConsumer",
        "metadata": {"name": "bad", "namespace": "default", "uid": "bad-uid", "resourceVersion": "6"},
        "spec": {"replicas": "three"}
    });
    let consumers = path("streamops.dev/v1alpha1", "streamconsumers", "");
    let list = |items: Vec<Value>| json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "10"}, "items": items});

    let mut open_watches = Vec::new();
    let (mut finalized_good, mut warned_bad) = (false, false);
    let served = tokio::time::timeout(Duration::from_secs(20), async {
        while !(finalized_good && warned_bad) {
            let (request, send) = handle.next_request().await.expect("the controller stopped");
            let (parts, body) = request.into_parts();
            let body: Value =
                serde_json::from_slice(&body.collect_bytes().await.unwrap()).unwrap_or(Value::Null);
            let path = parts.uri.path().to_string();
            if parts.uri.query().unwrap_or_default().contains("watch=true") {
                open_watches.push(send);
                continue;
            }
            let answer = match (parts.method.clone(), path.as_str()) {
                (Method::GET, p) if p == consumers => {
                    list(vec![bad.clone(), serde_json::to_value(&good).unwrap()])
                }
                (Method::GET, p) if is_child_object(p) => {
                    // The ownership check before writing: nothing holds the name yet.
                    let status =
                        kube::core::Status::failure("not found", "NotFound").with_code(404);
                    send.send_response(
                        Response::builder()
                            .status(404)
                            .body(Body::from(serde_json::to_vec(&status).unwrap()))
                            .unwrap(),
                    );
                    continue;
                }
                (Method::GET, _) => list(vec![]),
                (Method::PATCH, p) if p == format!("{consumers}/good") => {
                    finalized_good = true;
                    serde_json::to_value(good.clone().finalized()).unwrap()
                }
                (Method::POST, p) if p.ends_with("/events") => {
                    if body["reason"] == "MalformedObject" && body["regarding"]["name"] == "bad" {
                        warned_bad = true;
                    }
                    body
                }
                // The good object's pass goes on to its children once the finalizer is stored.
                (Method::POST, _) | (Method::PATCH, _) => body,
                (m, p) => panic!("unexpected request {m} {p}: {body}"),
            };
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
        }
    })
    .await;
    stop.cancel();
    drop(open_watches);
    served.expect("both objects were handled");
    // Let the pass in flight finish (it is graceful shutdown's to wait for), then stop.
    let drain = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            if request
                .uri()
                .query()
                .unwrap_or_default()
                .contains("watch=true")
            {
                held.push(send);
                continue;
            }
            let answer = if request.method() == Method::GET {
                list(vec![])
            } else {
                serde_json::from_slice(&request.into_body().collect_bytes().await.unwrap())
                    .unwrap_or(Value::Null)
            };
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
        }
    });
    tokio::time::timeout(Duration::from_secs(10), controller)
        .await
        .expect("the controller stops when asked")
        .unwrap();
    drain.abort();
    assert_eq!(ctx.metrics.malformed_objects.get(), 1);
}

/// Drift end to end, through the child stores: a first reconciliation reads no child from the
/// API server (the stores, filled by the watches, know the names are free); then the watch on
/// owned Deployments reports a Deployment scaled by hand; the store takes it, the controller
/// reconciles again and applies the desired replicas over the version the watch reported.
#[tokio::test]
async fn a_changed_child_reported_by_its_watch_is_reconciled_back() {
    use crate::metrics::Metrics;
    use crate::{OperatorConfig, SpecReplicas};
    use http::Response;
    use kube::client::Body;
    use std::collections::HashMap;
    use tokio_util::sync::CancellationToken;

    let (client, verifier) = mock_client();
    let mut handle = verifier.into_handle();
    let ctx = Arc::new(Context::new(
        client.clone(),
        Metrics::register(&prometheus::Registry::new()).unwrap(),
        OperatorConfig::new(TEST_IMAGE),
        FakeGroupDeleter::new(Ok(GroupDeletion::Deleted)),
        Arc::new(SpecReplicas),
    ));
    let stop = CancellationToken::new();
    let controller = tokio::spawn(run_controller(
        client,
        Some("default".into()),
        ctx,
        stop.clone(),
        None,
    ));

    let mut sc = StreamConsumer::test().finalized();
    sc.metadata.resource_version = Some("5".into());
    let mut drifted = live_deployment(&sc, 2);
    drifted.spec.as_mut().unwrap().replicas = Some(7);
    let consumers = path("streamops.dev/v1alpha1", "streamconsumers", "");
    let deployments = Kind::Deployment.path("");
    let list = |items: Vec<Value>| json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "10"}, "items": items});
    let not_found = || {
        let status = kube::core::Status::failure("not found", "NotFound").with_code(404);
        Response::builder()
            .status(404)
            .body(Body::from(serde_json::to_vec(&status).unwrap()))
            .unwrap()
    };

    let mut watches: HashMap<String, Vec<_>> = HashMap::new();
    // The children on the mock API server, by path.
    let mut objects: HashMap<String, Value> = HashMap::new();
    let mut deployment_applies = Vec::new();
    let mut drift_reported = false;
    let mut reads_before_drift = Vec::new();
    let served = tokio::time::timeout(Duration::from_secs(20), async {
        while deployment_applies.len() < 2 {
            let (request, send) = handle.next_request().await.expect("the controller stopped");
            let (parts, body) = request.into_parts();
            let body: Value =
                serde_json::from_slice(&body.collect_bytes().await.unwrap()).unwrap_or(Value::Null);
            let path = parts.uri.path().to_string();
            if parts.uri.query().unwrap_or_default().contains("watch=true") {
                watches.entry(path).or_default().push(send);
                continue;
            }
            let answer = match (parts.method.clone(), path.as_str()) {
                (Method::GET, p) if p == consumers => {
                    list(vec![serde_json::to_value(&sc).unwrap()])
                }
                (Method::GET, p) if p == Kind::Deployment.path("test") || is_child_object(p) => {
                    if !drift_reported {
                        reads_before_drift.push(p.to_string());
                    }
                    match objects.get(p) {
                        Some(o) => o.clone(),
                        None => {
                            send.send_response(not_found());
                            continue;
                        }
                    }
                }
                (Method::GET, _) => list(vec![]),
                (Method::POST, p) if !p.ends_with("/events") => {
                    let at = format!("{p}/{}", body["metadata"]["name"].as_str().unwrap());
                    if objects.contains_key(&at) {
                        let status =
                            kube::core::Status::failure("exists", "AlreadyExists").with_code(409);
                        send.send_response(
                            Response::builder()
                                .status(409)
                                .body(Body::from(serde_json::to_vec(&status).unwrap()))
                                .unwrap(),
                        );
                        continue;
                    }
                    let mut answer = body.clone();
                    answer["metadata"]["uid"] = json!(format!("uid-{at}"));
                    answer["metadata"]["resourceVersion"] = json!("11");
                    if p == deployments {
                        deployment_applies.push(body);
                        answer["metadata"]["generation"] = json!(1);
                    }
                    objects.insert(at, answer.clone());
                    answer
                }
                (Method::PATCH, p) if p == Kind::Deployment.path("test") => {
                    deployment_applies.push(body.clone());
                    let mut answer = body;
                    answer["metadata"]["generation"] = json!(3);
                    answer
                }
                (Method::PATCH, p) if p.ends_with("/status") => {
                    let mut answer = serde_json::to_value(&sc).unwrap();
                    answer["status"] = body["status"].clone();
                    // After the first pass, someone scales the Deployment by hand; the watch
                    // reports the whole object.
                    if !drift_reported {
                        drift_reported = true;
                        let drifted = serde_json::to_value(&drifted).unwrap();
                        objects.insert(Kind::Deployment.path("test"), drifted.clone());
                        let event = json!({"type": "MODIFIED", "object": drifted});
                        let mut line = serde_json::to_vec(&event).unwrap();
                        line.push(b'\n');
                        let watch = watches
                            .get_mut(&deployments)
                            .and_then(Vec::pop)
                            .expect("the controller watches Deployments");
                        watch.send_response(Response::builder().body(Body::from(line)).unwrap());
                    }
                    answer
                }
                (Method::PATCH, _) | (Method::POST, _) => body,
                (m, p) => panic!("unexpected request {m} {p}: {body}"),
            };
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
        }
    })
    .await;
    served.expect("the drift was reconciled");
    assert_eq!(
        reads_before_drift,
        Vec::<String>::new(),
        "the first pass read its children from the stores"
    );
    assert_eq!(
        deployment_applies[1]["spec"]["replicas"], 1,
        "the hand-made scale is undone"
    );
    assert_eq!(
        deployment_applies[1]["metadata"]["resourceVersion"], "100",
        "applied over the version the watch reported"
    );

    // Let the second pass finish (it is graceful shutdown's to wait for), then stop.
    stop.cancel();
    drop(watches);
    let drain = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            if request
                .uri()
                .query()
                .unwrap_or_default()
                .contains("watch=true")
            {
                held.push(send);
                continue;
            }
            let answer = if request.method() == Method::GET {
                list(vec![])
            } else {
                serde_json::from_slice(&request.into_body().collect_bytes().await.unwrap())
                    .unwrap_or(Value::Null)
            };
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
        }
    });
    tokio::time::timeout(Duration::from_secs(10), controller)
        .await
        .expect("the controller stops when asked")
        .unwrap();
    drain.abort();
}

/// The lag poller inside the controller: a reading over the threshold triggers a reconciliation
/// (through `reconcile_on`, without any watch event) that scales the Deployment, writes
/// `spec.replicas` and announces the decision with the lag.
#[tokio::test]
async fn a_lag_reading_over_the_threshold_triggers_a_scale_up_through_the_controller() {
    use crate::fixtures::FakeLagReader;
    use crate::lag_book::LagBook;
    use crate::lag_poller::{LagPoller, PollSettings};
    use crate::metrics::Metrics;
    use crate::OperatorConfig;
    use http::Response;
    use kube::client::Body;
    use streamops_crds::v1alpha1::AutoscalingSpec;
    use tokio_util::sync::CancellationToken;

    let (client, verifier) = mock_client();
    let mut handle = verifier.into_handle();
    let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
    let book = Arc::new(LagBook::new());
    let ctx = Arc::new(Context::new(
        client.clone(),
        metrics.clone(),
        OperatorConfig::new(TEST_IMAGE),
        FakeGroupDeleter::new(Ok(GroupDeletion::Deleted)),
        book.clone(),
    ));
    let mut sc = StreamConsumer::test().finalized().with_spec(|s| {
        s.autoscaling = Some(AutoscalingSpec {
            min_replicas: 1,
            max_replicas: 6,
            lag_threshold: 100,
            scale_up_stabilization_seconds: 0,
            scale_down_stabilization_seconds: 300,
            scale_to_zero: false,
            activation_lag: 1,
            allow_idle_consumers: false,
            poll_interval_seconds: 5,
        })
    });
    sc.metadata.resource_version = Some("5".into());
    let reader = Arc::new(FakeLagReader::default());
    // The first reading keeps 1 replica; only the second, a second later, crosses the threshold:
    // nothing but the poller's trigger can make the controller apply it.
    sc.spec.autoscaling.as_mut().unwrap().poll_interval_seconds = 1;
    reader.answer(
        &sc.spec.kafka.group_id,
        vec![
            Ok(crate::fixtures::group_lag(50, 6, 1)),
            Ok(crate::fixtures::group_lag(350, 6, 1)),
        ],
    );
    let poller = LagPoller::new(reader.clone(), book, metrics, PollSettings::default());
    let stop = CancellationToken::new();
    let controller = tokio::spawn(run_controller(
        client,
        Some("default".into()),
        ctx,
        stop.clone(),
        Some(poller),
    ));

    let consumers = path("streamops.dev/v1alpha1", "streamconsumers", "");
    let list = |items: Vec<Value>| json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "10"}, "items": items});
    let mut watches = Vec::new();
    let mut applied: Option<Value> = None;
    let (mut scaled_deployment, mut scaled_spec, mut announced) = (false, false, None);
    let served = tokio::time::timeout(Duration::from_secs(20), async {
        while !(scaled_deployment && scaled_spec && announced.is_some()) {
            let (request, send) = handle.next_request().await.expect("the controller stopped");
            let (parts, body) = request.into_parts();
            let body: Value =
                serde_json::from_slice(&body.collect_bytes().await.unwrap()).unwrap_or(Value::Null);
            let path = parts.uri.path().to_string();
            if parts.uri.query().unwrap_or_default().contains("watch=true") {
                watches.push(send);
                continue;
            }
            let answer = match (parts.method.clone(), path.as_str()) {
                (Method::GET, p) if p == consumers => {
                    list(vec![serde_json::to_value(&sc).unwrap()])
                }
                (Method::GET, p) if p == Kind::Deployment.path("test") => match &applied {
                    Some(d) => d.clone(),
                    None => {
                        let status =
                            kube::core::Status::failure("not found", "NotFound").with_code(404);
                        send.send_response(
                            Response::builder()
                                .status(404)
                                .body(Body::from(serde_json::to_vec(&status).unwrap()))
                                .unwrap(),
                        );
                        continue;
                    }
                },
                (Method::GET, p) if is_child_object(p) => {
                    // The ownership check before writing: nothing holds the name yet.
                    let status =
                        kube::core::Status::failure("not found", "NotFound").with_code(404);
                    send.send_response(
                        Response::builder()
                            .status(404)
                            .body(Body::from(serde_json::to_vec(&status).unwrap()))
                            .unwrap(),
                    );
                    continue;
                }
                (Method::GET, _) => list(vec![]),
                // The store of Deployments hears of nothing here (no watch event is sent): a
                // second creation is refused like the API server would, and the name read again.
                (Method::POST, p) if p == Kind::Deployment.path("") && applied.is_some() => {
                    let status =
                        kube::core::Status::failure("exists", "AlreadyExists").with_code(409);
                    send.send_response(
                        Response::builder()
                            .status(409)
                            .body(Body::from(serde_json::to_vec(&status).unwrap()))
                            .unwrap(),
                    );
                    continue;
                }
                (Method::POST, p) | (Method::PATCH, p)
                    if p == Kind::Deployment.path("") || p == Kind::Deployment.path("test") =>
                {
                    if applied.is_none() {
                        assert_eq!(
                            body["spec"]["replicas"], 1,
                            "created before the lag crossed"
                        );
                    }
                    scaled_deployment |= body["spec"]["replicas"] == 4;
                    let mut answer = body;
                    answer["metadata"]["generation"] = json!(1);
                    answer["metadata"]["uid"] = json!("deployment-uid");
                    answer["metadata"]["resourceVersion"] = json!("20");
                    applied = Some(answer.clone());
                    answer
                }
                (Method::PATCH, p) if p == format!("{consumers}/test") => {
                    // With the resourceVersion read: a stale copy cannot undo a newer edit.
                    scaled_spec |= body
                        == json!({"metadata": {"resourceVersion": "5"}, "spec": {"replicas": 4}});
                    serde_json::to_value(&sc).unwrap()
                }
                (Method::PATCH, p) if p.ends_with("/status") => serde_json::to_value(&sc).unwrap(),
                (Method::POST, p) if p.ends_with("/events") => {
                    if body["reason"] == "ScaleUp" {
                        announced = body["note"].as_str().map(str::to_string);
                    }
                    body
                }
                (Method::PATCH, _) | (Method::POST, _) => body,
                (m, p) => panic!("unexpected request {m} {p}: {body}"),
            };
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
        }
    })
    .await;
    served.expect("the reading scaled the workers");
    let note = announced.unwrap();
    assert!(note.contains("lag 350"), "{note}");
    assert!(reader.groups_read().len() >= 2);

    stop.cancel();
    drop(watches);
    let drain = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            if request
                .uri()
                .query()
                .unwrap_or_default()
                .contains("watch=true")
            {
                held.push(send);
                continue;
            }
            let answer = if request.method() == Method::GET {
                list(vec![])
            } else {
                serde_json::from_slice(&request.into_body().collect_bytes().await.unwrap())
                    .unwrap_or(Value::Null)
            };
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
        }
    });
    tokio::time::timeout(Duration::from_secs(10), controller)
        .await
        .expect("the controller and its poller stop when asked")
        .unwrap();
    drain.abort();
}

// ---- lag and autoscaling -------------------------------------------------------------------

mod lag {
    use super::*;
    use crate::lag::LagTarget;
    use crate::lag_book::{LagBook, LagFailure};
    use crate::ReplicaDecider;
    use k8s_openapi::jiff::Timestamp;
    use streamops_crds::v1alpha1::AutoscalingSpec;

    fn autoscaled(replicas: i32) -> StreamConsumer {
        StreamConsumer::test()
            .finalized()
            .with_replicas(replicas)
            .with_spec(|s| {
                s.autoscaling = Some(AutoscalingSpec {
                    min_replicas: 1,
                    max_replicas: 6,
                    lag_threshold: 100,
                    scale_up_stabilization_seconds: 0,
                    scale_down_stabilization_seconds: 300,
                    scale_to_zero: false,
                    activation_lag: 1,
                    allow_idle_consumers: false,
                    poll_interval_seconds: 5,
                })
            })
    }

    fn read(book: &LagBook, sc: &StreamConsumer, result: Result<i64, &str>, t: u64) {
        let lag = result.map(|total| group_lag(total, 6, 2));
        let failure = |why: &str| LagFailure {
            reason: "KafkaError",
            message: format!("kafka: {why}"),
        };
        book.record(
            sc,
            &LagTarget::from_resource(sc),
            lag.as_ref().map_err(|why| failure(why)),
            Duration::from_secs(t),
            Timestamp::from_second(1_750_000_000 + t as i64).unwrap(),
        )
        .expect("the reading is recorded");
    }

    fn ready(replicas: i32) -> Value {
        rollout(2, replicas, replicas)
    }

    /// A Deployment `test` running `replicas` workers of `sc`.
    fn running(sc: &StreamConsumer, replicas: i32) -> Deployment {
        live_deployment(&sc.clone().with_replicas(replicas), 1)
    }

    #[tokio::test]
    async fn a_lag_reading_is_published_in_the_status() {
        let book = Arc::new(LagBook::new());
        let sc = StreamConsumer::test().finalized();
        read(&book, &sc, Ok(420), 0);
        let (ctx, server) = Context::test_deciding(book);
        let mut pass = ApplyPass::new(sc.clone());
        pass.existing = Some(live_deployment(&sc, 2));
        pass.deployment_answer = ready(1);
        pass.events = vec![];
        pass.status = Some(json!({
            "lag": {"total": 420, "partitions": 6, "members": 2, "maxPartitionLag": 420,
                    "observedAt": "2025-06-15T15:06:40Z"},
            "conditions": [{}, {}, {},
                {"type": "LagAvailable", "status": "True", "reason": "LagRead"}]
        }));
        let mock = server.run(Scenario::Apply(Box::new(pass)));
        let result = reconcile_once(ctx.clone(), sc).await;
        drop(ctx);
        finish(mock).await;
        result.unwrap();
    }

    #[tokio::test]
    async fn autoscaled_replicas_go_to_the_deployment_and_the_spec_with_an_event_naming_the_lag() {
        let book = Arc::new(LagBook::new());
        let sc = autoscaled(1);
        read(&book, &sc, Ok(350), 0);
        let (ctx, server) = Context::test_deciding(book.clone());
        let mut pass = ApplyPass::new(sc.clone());
        pass.existing = Some(running(&sc, 1));
        pass.deployment_answer = rollout(2, 1, 1);
        pass.pdb = true;
        pass.events = vec!["ScaleUp"];
        pass.spec_replicas = Some(4);
        pass.status = Some(json!({
            "lag": {"total": 350, "partitions": 6},
            "conditions": [{}, {"type": "Progressing", "status": "True", "reason": "Scaling"}, {},
                {"type": "LagAvailable", "status": "True"}]
        }));
        let mock = server.run(Scenario::Apply(Box::new(pass)));
        let result = reconcile_once(ctx.clone(), sc.clone()).await;
        drop(ctx);
        let requests = finish(mock).await;
        result.unwrap();

        let d = body_of(&requests, Method::PATCH, &Kind::Deployment.path("test"));
        assert_eq!(d["spec"]["replicas"], 4);
        let ev = requests
            .iter()
            .find(|r| r.path.ends_with("/events"))
            .unwrap();
        let note = ev.body["note"].as_str().unwrap();
        assert!(note.contains("from 1 to 4 replicas"), "{note}");
        assert!(note.contains("lag 350 over 6 partitions"), "{note}");
        assert!(note.contains("threshold 100"), "{note}");
        assert_eq!(
            book.announce(&sc, 4),
            None,
            "the decision is announced once, not at every pass"
        );
    }

    #[tokio::test]
    async fn unreadable_lag_holds_the_replicas_and_reports_lag_unavailable() {
        let book = Arc::new(LagBook::new());
        let sc = autoscaled(1);
        read(&book, &sc, Ok(250), 0);
        book.announce(&sc, 3);
        // The previous pass applied 3 replicas and published the lag.
        let before = status::observed(
            &sc,
            &running(&sc, 3),
            3,
            &hash_of(&sc),
            book.lag(&sc).as_ref(),
            status::now(),
        );
        let sc = sc.with_replicas(3).with_status(before);
        read(&book, &sc, Err("all brokers down"), 5);
        assert_eq!(book.desired_replicas(&sc), 3);

        let (ctx, server) = Context::test_deciding(book);
        let mut pass = ApplyPass::new(sc.clone());
        pass.existing = Some(running(&sc, 3));
        pass.deployment_answer = ready(3);
        pass.pdb = true;
        pass.live = vec![Kind::Pdb];
        pass.events = vec!["LagUnavailable"];
        pass.status = Some(json!({
            "lag": {"total": 250},
            "conditions": [{"type": "Ready", "status": "True"}, {}, {"type": "Degraded", "status": "False"},
                {"type": "LagAvailable", "status": "False", "reason": "KafkaError"}]
        }));
        let mock = server.run(Scenario::Apply(Box::new(pass)));
        let result = reconcile_once(ctx.clone(), sc).await;
        drop(ctx);
        let requests = finish(mock).await;
        result.unwrap();

        let d = body_of(&requests, Method::PATCH, &Kind::Deployment.path("test"));
        assert_eq!(d["spec"]["replicas"], 3, "held");
        let ev = requests
            .iter()
            .find(|r| r.path.ends_with("/events"))
            .unwrap();
        let note = ev.body["note"].as_str().unwrap();
        assert!(note.contains("all brokers down"), "{note}");
        assert!(note.contains("holds 3 replicas"), "{note}");
    }

    #[tokio::test]
    async fn a_manual_scale_of_an_autoscaled_consumer_is_set_back_with_a_warning() {
        let book = Arc::new(LagBook::new());
        let sc = autoscaled(1);
        read(&book, &sc, Ok(250), 0);
        book.announce(&sc, 3);
        // Someone ran `kubectl scale stc/test --replicas=7`.
        let sc = sc.with_generation(2).with_replicas(7);
        let (ctx, server) = Context::test_deciding(book);
        let mut pass = ApplyPass::new(sc.clone());
        pass.existing = Some(running(&sc, 3));
        pass.deployment_answer = ready(3);
        pass.pdb = true;
        pass.live = vec![Kind::Pdb];
        pass.events = vec!["ReplicasOverridden"];
        pass.spec_replicas = Some(3);
        let mock = server.run(Scenario::Apply(Box::new(pass)));
        let result = reconcile_once(ctx.clone(), sc).await;
        drop(ctx);
        let requests = finish(mock).await;
        result.unwrap();

        let d = body_of(&requests, Method::PATCH, &Kind::Deployment.path("test"));
        assert_eq!(d["spec"]["replicas"], 3);
        let ev = requests
            .iter()
            .find(|r| r.path.ends_with("/events"))
            .unwrap();
        let note = ev.body["note"].as_str().unwrap();
        assert!(note.contains("set to 7"), "{note}");
        assert!(note.contains("set back to 3"), "{note}");
    }

    #[tokio::test]
    async fn before_any_reading_an_autoscaled_consumer_keeps_its_spec_replicas() {
        let book = Arc::new(LagBook::new());
        let sc = autoscaled(2);
        let (ctx, server) = Context::test_deciding(book);
        let mut pass = ApplyPass::new(sc.clone());
        pass.existing = Some(running(&sc, 2));
        pass.deployment_answer = ready(2);
        pass.pdb = true;
        pass.live = vec![Kind::Pdb];
        pass.events = vec![];
        let mock = server.run(Scenario::Apply(Box::new(pass)));
        let result = reconcile_once(ctx.clone(), sc).await;
        drop(ctx);
        let requests = finish(mock).await;
        result.unwrap();
        let d = body_of(&requests, Method::PATCH, &Kind::Deployment.path("test"));
        assert_eq!(d["spec"]["replicas"], 2);
        let status = requests.last().unwrap();
        assert!(status.body["status"].get("lag").is_none());
    }
}

#[tokio::test]
async fn a_replica_patch_from_a_stale_copy_is_refused_by_the_api_server_and_is_not_an_error() {
    let (client, verifier) = mock_client();
    let mut handle = verifier.into_handle();
    let server = tokio::spawn(async move {
        let (request, send) = handle.next_request().await.expect("a patch");
        let (parts, body) = request.into_parts();
        let body: Value = serde_json::from_slice(&body.collect_bytes().await.unwrap()).unwrap();
        assert_eq!(parts.method, Method::PATCH);
        assert_eq!(
            body,
            json!({"metadata": {"resourceVersion": "41"}, "spec": {"replicas": 3}})
        );
        // Someone edited the object since resourceVersion 41 was read.
        let status =
            kube::core::Status::failure("the object has been modified", "Conflict").with_code(409);
        send.send_response(
            http::Response::builder()
                .status(409)
                .body(kube::client::Body::from(
                    serde_json::to_vec(&status).unwrap(),
                ))
                .unwrap(),
        );
    });
    let api: Api<StreamConsumer> = Api::namespaced(client, "default");
    apply::patch_spec_replicas(&api, "test", Some("41"), 3)
        .await
        .expect("a refused stale patch is not an error");
    server.await.unwrap();
}

#[test]
fn the_store_keeps_no_managed_fields_nor_kubectls_copy_but_every_other_annotation() {
    let mut sc = StreamConsumer::test();
    sc.metadata.managed_fields = Some(vec![Default::default()]);
    sc.metadata.annotations = Some(
        [
            (LAST_APPLIED.to_string(), "{\"spec\":{}}".to_string()),
            ("team".to_string(), "payments".to_string()),
        ]
        .into(),
    );
    let mut guarded = DeserializeGuard(Ok(sc.clone()));
    trim_for_store(&mut guarded);
    let kept = guarded.0.as_ref().expect("a valid object");
    assert_eq!(kept.metadata.managed_fields, None);
    assert_eq!(
        kept.metadata.annotations,
        Some([("team".to_string(), "payments".to_string())].into())
    );
    assert_eq!(kept.spec, sc.spec, "the spec is kept whole");
    assert_eq!(kept.metadata.finalizers, sc.metadata.finalizers);
    assert_eq!(kept.metadata.resource_version, sc.metadata.resource_version);
}

// ---- the child stores ------------------------------------------------------------------------

mod stores {
    use kube::core::PartialObjectMeta;
    use kube::runtime::reflector::store::Writer;
    use kube::runtime::watcher;

    use super::*;
    use crate::children::{ChildStores, ChildWriters, StoredForm};

    /// The child stores of a test context, filled as the watches would fill them.
    pub struct TestStores {
        pub stores: Arc<ChildStores>,
        writers: ChildWriters,
    }

    fn listed<K>(w: &mut Writer<K>, objects: Vec<K>)
    where
        K: Resource<DynamicType = ()> + StoredForm + Clone + 'static,
    {
        w.apply_watcher_event(&watcher::Event::Init);
        for mut o in objects {
            o.to_stored_form();
            w.apply_watcher_event(&watcher::Event::InitApply(o));
        }
        w.apply_watcher_event(&watcher::Event::InitDone);
    }

    fn meta_of<K>(objects: &[Value], kind: Kind) -> Vec<PartialObjectMeta<K>>
    where
        K: Resource<DynamicType = ()>,
    {
        objects
            .iter()
            .filter(|o| o["kind"] == kind_name(kind))
            .map(|o| PartialObjectMeta::<K> {
                metadata: serde_json::from_value(o["metadata"].clone()).unwrap(),
                types: None,
                _phantom: Default::default(),
            })
            .collect()
    }

    fn whole<K: serde::de::DeserializeOwned>(objects: &[Value], kind: &str) -> Vec<K> {
        objects
            .iter()
            .filter(|o| o["kind"] == kind)
            .map(|o| serde_json::from_value(o.clone()).unwrap())
            .collect()
    }

    fn kind_name(kind: Kind) -> String {
        child_object(kind, None)["kind"]
            .as_str()
            .unwrap()
            .to_string()
    }

    impl TestStores {
        /// Stores that listed `objects` (children as the API server returns them), installed in
        /// `ctx`.
        pub fn install(ctx: &Context, objects: Vec<Value>) -> Self {
            let (stores, mut w) = ChildStores::new(ctx.config.worker_network.is_some());
            listed(&mut w.deployments, whole(&objects, "Deployment"));
            listed(&mut w.config_maps, meta_of(&objects, Kind::ConfigMap));
            listed(&mut w.services, whole(&objects, "Service"));
            listed(&mut w.pdbs, meta_of(&objects, Kind::Pdb));
            listed(
                &mut w.service_accounts,
                meta_of(&objects, Kind::ServiceAccount),
            );
            listed(&mut w.role_bindings, meta_of(&objects, Kind::RoleBinding));
            if let Some(np) = w.network_policies.as_mut() {
                listed(np, meta_of(&objects, Kind::NetworkPolicy));
            }
            ctx.install_child_stores(Some(stores.clone()));
            Self { stores, writers: w }
        }

        /// A watch event: `object` (a child as the API server returns it) was created or changed.
        pub fn put(&mut self, object: Value) {
            fn applied<K>(w: &mut Writer<K>, mut o: K)
            where
                K: Resource<DynamicType = ()> + StoredForm + Clone + 'static,
            {
                o.to_stored_form();
                w.apply_watcher_event(&watcher::Event::Apply(o));
            }
            let w = &mut self.writers;
            let one = std::slice::from_ref(&object);
            match object["kind"].as_str().unwrap() {
                "Deployment" => {
                    applied(&mut w.deployments, serde_json::from_value(object).unwrap())
                }
                "ConfigMap" => applied(&mut w.config_maps, meta_of(one, Kind::ConfigMap).remove(0)),
                "Service" => applied(&mut w.services, serde_json::from_value(object).unwrap()),
                other => panic!("no test store for {other}"),
            }
        }
    }
}

use stores::TestStores;

/// A child of `test` as the API server returns it: ours, labelled, with this `resourceVersion`.
fn stored_child(kind: Kind, rv: &str) -> Value {
    let mut o = child_object(kind, Some(SC_UID));
    o["metadata"]["resourceVersion"] = json!(rv);
    o["metadata"]["labels"] = json!({
        "app.kubernetes.io/instance": "test",
        "app.kubernetes.io/managed-by": "streamops-operator"
    });
    o
}

/// The answer of the API server to a write of a child: the object with its uid and this
/// `resourceVersion`.
fn stored_answer(kind: Kind, rv: &str) -> Value {
    json!({"metadata": {"uid": format!("uid-of-{}", child_object(kind, None)["kind"].as_str().unwrap()), "resourceVersion": rv}})
}

/// The object a recorded write left on the API server, as its watch reports it.
fn as_stored(request: &Recorded, answer: &Value) -> Value {
    let mut o = request.body.clone();
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
    merge(&mut o, answer);
    o
}

/// With the child stores ready, a first pass reads nothing from the API server: no GET of a
/// child's name, no list of a kind swept for orphans. The free names are created, as before.
#[tokio::test]
async fn with_ready_stores_a_first_pass_reads_no_child_from_the_api_server() {
    let (ctx, server, _) = Context::test();
    let _stores = TestStores::install(&ctx, vec![]);
    let sc = StreamConsumer::test().finalized();
    let steps = vec![
        create(Kind::ConfigMap, json!({})),
        create(Kind::Deployment, rollout(1, 1, 0)),
        create(Kind::Service, json!({})),
        event("Normal", "Created"),
        status_patch(&sc, json!({"configHash": hash_of(&sc)})),
    ];
    let mock = server.run(Scenario::Steps(steps));
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    let requests = finish(mock).await;
    result.unwrap();
    assert!(
        !requests.iter().any(|r| r.method == Method::GET),
        "{requests:#?}"
    );
}

/// The write memo: a second pass over an unchanged StreamConsumer whose children nobody touched
/// since the operator wrote them sends nothing at all. Then someone edits the ConfigMap (drift: a
/// new `resourceVersion` in the store) while the Deployment controller reports the rollout done
/// (a new `resourceVersion`, only the status changed): only the ConfigMap is applied again, over
/// the version seen, and the new status is written. Then someone scales the Deployment by hand:
/// it is applied again.
#[tokio::test]
async fn a_second_pass_over_an_unchanged_consumer_writes_no_child_and_drift_is_applied_again() {
    let (ctx, server, _) = Context::test();
    let mut stores = TestStores::install(&ctx, vec![]);
    let mut sc = StreamConsumer::test().finalized();
    let cm_answer = stored_answer(Kind::ConfigMap, "21");
    let mut d_answer = rollout(1, 1, 0);
    d_answer["metadata"]["uid"] = json!("uid-of-Deployment");
    d_answer["metadata"]["resourceVersion"] = json!("22");
    let svc_answer = stored_answer(Kind::Service, "23");
    let mock = server.run(Scenario::Steps(vec![
        create(Kind::ConfigMap, cm_answer.clone()),
        create(Kind::Deployment, d_answer.clone()),
        create(Kind::Service, svc_answer.clone()),
        event("Normal", "Created"),
        status_patch(&sc, json!({})),
    ]));
    let result = reconcile_once(ctx.clone(), sc.clone()).await;
    drop(ctx);
    let requests = finish(mock).await;
    result.unwrap();
    // The watches report what was written; the StreamConsumer now carries its status.
    for (request, answer) in requests
        .iter()
        .take(3)
        .zip([&cm_answer, &d_answer, &svc_answer])
    {
        stores.put(as_stored(request, answer));
    }
    sc.status = Some(serde_json::from_value(requests[4].body["status"].clone()).unwrap());
    assert_eq!(stores.stores.memo.len(), 3);
    let shared = stores.stores.clone();
    let pass = |steps: Vec<Expect>| {
        let (client, server) = mock_client();
        let ctx = Arc::new(Context::new(
            client,
            crate::metrics::Metrics::register(&prometheus::Registry::new()).unwrap(),
            test_config(),
            FakeGroupDeleter::new(Ok(GroupDeletion::Deleted)),
            Arc::new(SpecReplicas),
        ));
        ctx.install_child_stores(Some(shared.clone()));
        (ctx, server.run(Scenario::Steps(steps)))
    };

    // Nothing changed: no request at all.
    let (ctx, mock) = pass(vec![]);
    let result = reconcile_once(ctx.clone(), sc.clone()).await;
    drop(ctx);
    finish(mock).await;
    result.unwrap();

    // Someone edits the ConfigMap; the Deployment controller reports the rollout done.
    let mut edited = as_stored(&requests[0], &cm_answer);
    edited["metadata"]["resourceVersion"] = json!("30");
    edited["data"]["worker.yaml"] = json!("tampered");
    stores.put(edited);
    let mut rolled = as_stored(&requests[1], &d_answer);
    rolled["metadata"]["resourceVersion"] = json!("31");
    rolled["status"] = rollout(1, 1, 1)["status"].clone();
    stores.put(rolled.clone());
    let (ctx, mock) = pass(vec![
        write(
            Kind::ConfigMap,
            Some("30"),
            stored_answer(Kind::ConfigMap, "32"),
        ),
        status_patch(
            &sc,
            json!({"readyReplicas": 1, "conditions": [{"type": "Ready", "status": "True"}]}),
        ),
    ]);
    let result = reconcile_once(ctx.clone(), sc.clone()).await;
    drop(ctx);
    let written = finish(mock).await;
    result.unwrap();
    assert_eq!(
        written[0].body["data"]["worker.yaml"],
        RenderedConfig::render(&sc).unwrap().yaml.as_str(),
        "the drift is undone"
    );
    sc.status = Some(serde_json::from_value(written[1].body["status"].clone()).unwrap());
    stores.put(as_stored(
        &written[0],
        &stored_answer(Kind::ConfigMap, "32"),
    ));

    // Someone scales the Deployment by hand: applied again, over the version seen.
    let mut scaled = rolled;
    scaled["metadata"]["resourceVersion"] = json!("40");
    scaled["spec"]["replicas"] = json!(5);
    stores.put(scaled);
    let mut answer = rollout(1, 1, 1);
    answer["metadata"]["uid"] = json!("uid-of-Deployment");
    answer["metadata"]["resourceVersion"] = json!("41");
    let (ctx, mock) = pass(vec![
        write(Kind::Deployment, Some("40"), answer),
        event("Normal", "Scaled"),
    ]);
    let result = reconcile_once(ctx.clone(), sc.clone()).await;
    drop(ctx);
    let written = finish(mock).await;
    result.unwrap();
    assert_eq!(written[0].body["spec"]["replicas"], 1);
}

/// A store entry behind the API server costs a retry, never a wrong write: the apply over the
/// version the store showed is refused (409), the object is read again and the apply retried
/// over the version read.
#[tokio::test]
async fn a_stale_store_entry_is_read_again_and_the_write_retried() {
    let (ctx, server, _) = Context::test();
    let sc = StreamConsumer::test().finalized();
    let mut deployment = serde_json::to_value(live_deployment(&sc, 1)).unwrap();
    deployment["status"] = rollout(1, 1, 1)["status"].clone();
    let _stores = TestStores::install(
        &ctx,
        vec![
            deployment,
            stored_child(Kind::ConfigMap, "7"),
            stored_child(Kind::Service, "7"),
        ],
    );
    let mut fresh = stored_child(Kind::ConfigMap, "9");
    fresh["data"] = json!({"worker.yaml": "changed meanwhile"});
    let mock = server.run(Scenario::Steps(vec![
        write(Kind::ConfigMap, Some("7"), json!({})).reply(Reply::Error(409, "Conflict")),
        get_child(Kind::ConfigMap, Some(fresh)),
        write(Kind::ConfigMap, Some("9"), json!({})),
        write(Kind::Deployment, Some("100"), rollout(1, 1, 1)),
        write(Kind::Service, Some("7"), json!({})),
        status_patch(&sc, json!({"readyReplicas": 1})),
    ]));
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    finish(mock).await;
    result.unwrap();
}

/// A store keeps only the operator's own `managedFields` entries; a child whose fields `create`
/// still holds is read whole before its fields are handed to server-side apply (the handover
/// rewrites every entry, so another manager's must be in it).
#[tokio::test]
async fn a_stored_child_is_read_whole_before_its_fields_are_handed_over() {
    let (ctx, server, _) = Context::test();
    let sc = StreamConsumer::test().finalized();
    let entry = |manager: &str, op: &str| {
        json!({"manager": manager, "operation": op, "apiVersion": "v1",
               "fieldsType": "FieldsV1", "fieldsV1": {"f:data": {}}})
    };
    let mut cm = stored_child(Kind::ConfigMap, "7");
    cm["metadata"]["managedFields"] = json!([
        entry(FIELD_MANAGER, "Update"),
        entry("kubectl-edit", "Update")
    ]);
    let _stores = TestStores::install(&ctx, vec![cm.clone()]);
    let mut whole = cm.clone();
    whole["metadata"]["resourceVersion"] = json!("8");
    let mut handed = whole.clone();
    handed["metadata"]["resourceVersion"] = json!("9");
    let mock = server.run(Scenario::Steps(vec![
        get_child(Kind::ConfigMap, Some(whole)),
        Expect::new(Method::PATCH, Kind::ConfigMap.path("test-config"))
            .body(
                json!({"metadata": {"resourceVersion": "8", "managedFields": [
                    entry(FIELD_MANAGER, "Apply"), entry("kubectl-edit", "Update")
                ]}}),
            )
            .reply(Reply::Json(200, handed)),
        write(Kind::ConfigMap, Some("9"), json!({})),
        create(Kind::Deployment, rollout(1, 1, 0)),
        create(Kind::Service, json!({})),
        event("Normal", "Created"),
        status_patch(&sc, json!({})),
    ]));
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    finish(mock).await;
    result.unwrap();
}

/// The orphan sweep from the stores: an unwanted child of ours (the PodDisruptionBudget after
/// scaling to one replica) is deleted with its uid as precondition, without a list.
#[tokio::test]
async fn an_unwanted_child_in_the_store_is_deleted_with_its_uid_as_precondition() {
    let (ctx, server, _) = Context::test();
    let old = StreamConsumer::test().finalized().with_replicas(3);
    let new = old.clone().with_generation(2).with_replicas(1);
    let _stores = TestStores::install(
        &ctx,
        vec![
            serde_json::to_value(live_deployment(&old, 1)).unwrap(),
            stored_child(Kind::ConfigMap, "7"),
            stored_child(Kind::Service, "7"),
            stored_child(Kind::Pdb, "7"),
        ],
    );
    let mock = server.run(Scenario::Steps(vec![
        write(Kind::ConfigMap, Some("7"), json!({})),
        write(Kind::Deployment, Some("100"), rollout(2, 1, 1)),
        write(Kind::Service, Some("7"), json!({})),
        delete_child(Kind::Pdb),
        event("Normal", "Scaled"),
        status_patch(&new, json!({})),
    ]));
    let result = reconcile_once(ctx.clone(), new).await;
    drop(ctx);
    finish(mock).await;
    result.unwrap();
}

/// Orphan cleanup from the stores: an object under the name of a child this pass no longer
/// wants, labelled like a child but controlled by another owner, is read again (the store may be
/// behind) and, still someone else's, left alone and reported; nothing is deleted.
#[tokio::test]
async fn orphan_cleanup_from_the_stores_never_deletes_an_object_it_does_not_control() {
    for foreign_kind in [Kind::Pdb, Kind::ServiceAccount, Kind::RoleBinding] {
        let (ctx, server, _) = Context::test();
        let sc = StreamConsumer::test().finalized();
        let mut foreign = stored_child(foreign_kind, "7");
        foreign["metadata"]["ownerReferences"][0]["uid"] = json!("someone-else");
        let _stores = TestStores::install(&ctx, vec![foreign]);
        let steps = vec![
            create(Kind::ConfigMap, json!({})),
            create(Kind::Deployment, rollout(1, 1, 0)),
            create(Kind::Service, json!({})),
            Expect::new(Method::GET, foreign_kind.path(foreign_kind.child_name())).reply(
                Reply::Json(200, child_metadata(foreign_kind, "someone-else")),
            ),
            status_patch(
                &sc,
                json!({"conditions": [{"type": "Ready"}, {"type": "Progressing"},
                    {"type": "Degraded", "status": "True", "reason": "ChildConflict"}]}),
            )
            .contains("/status/conditions/2/message", foreign_kind.child_name()),
            event("Warning", "ChildConflict"),
        ];
        let mock = server.run(Scenario::Steps(steps));
        let result = reconcile_once(ctx.clone(), sc).await;
        drop(ctx);
        let requests = finish(mock).await;
        assert_eq!(
            result.expect_err("reported").reason(),
            "ChildConflict",
            "{foreign_kind:?}"
        );
        assert!(
            !requests.iter().any(|r| r.method == Method::DELETE),
            "{foreign_kind:?} was deleted"
        );
    }
}

/// Cleanup from the stores: the workers of the deleted StreamConsumer are stopped (deleted with
/// their uid as precondition) without a list; a Deployment labelled like them but someone else's
/// is left running; the memo forgets the StreamConsumer's children.
#[tokio::test]
async fn cleanup_from_the_stores_stops_only_its_own_workers_and_forgets_their_writes() {
    for ours in [true, false] {
        let (ctx, server, deleter) = Context::test();
        let sc = StreamConsumer::test()
            .with_cleanup(CleanupPolicy::DeleteConsumerGroup)
            .deleted_now();
        let mut workers = stored_child(Kind::Deployment, "7");
        if !ours {
            workers["metadata"]["ownerReferences"][0]["uid"] = json!("someone-else");
        }
        let stores = TestStores::install(&ctx, vec![workers]);
        stores.stores.memo.record(
            crate::children::ChildKey::of::<Deployment>("default", "test"),
            SC_UID,
            &ObjectMeta {
                uid: Some("uid-of-Deployment".into()),
                resource_version: Some("7".into()),
                ..ObjectMeta::default()
            },
            None,
            1,
        );
        let mut steps = if ours {
            vec![delete_child(Kind::Deployment)]
        } else {
            vec![
                Expect::new(Method::GET, Kind::Deployment.path("test")).reply(Reply::Json(
                    200,
                    child_metadata(Kind::Deployment, "someone-else"),
                )),
                event("Warning", "ChildConflict"),
            ]
        };
        steps.push(event("Normal", "ConsumerGroupDeleted"));
        steps.push(
            Expect::new(
                Method::PATCH,
                path("streamops.dev/v1alpha1", "streamconsumers", "test"),
            )
            .reply(Reply::Json(200, serde_json::to_value(&sc).unwrap())),
        );
        let mock = server.run(Scenario::Steps(steps));
        let result = reconcile_once(ctx.clone(), sc).await;
        drop(ctx);
        let requests = finish(mock).await;
        result.unwrap();
        assert_eq!(
            requests.iter().any(|r| r.method == Method::DELETE),
            ours,
            "ours: {ours}"
        );
        assert_eq!(deleter.calls().len(), 1);
        assert!(stores.stores.memo.is_empty());
    }
}

/// A worker Service of ours as earlier versions made it: with a ClusterIP.
fn cluster_ip_service(owner: &str) -> Value {
    let mut o = stored_child(Kind::Service, "7");
    o["metadata"]["ownerReferences"][0]["uid"] = json!(owner);
    o["spec"] =
        json!({"type": "ClusterIP", "clusterIP": "10.96.0.12", "clusterIPs": ["10.96.0.12"]});
    o
}

/// The creation of the headless worker Service.
fn create_headless_service() -> Expect {
    create(Kind::Service, json!({})).body(json!({"spec": {"clusterIP": "None"}}))
}

/// Migration to the headless worker Service: a Service of ours with a ClusterIP (earlier
/// versions) cannot be applied over (`clusterIP` is immutable), so it is deleted with its uid as
/// precondition and the headless one created in its place; the store tells its clusterIP without
/// a read, and without a store it is read as before.
#[tokio::test]
async fn an_owned_cluster_ip_service_is_replaced_by_a_headless_one() {
    for stored in [true, false] {
        let (ctx, server, _) = Context::test();
        let sc = StreamConsumer::test().finalized();
        let _stores = stored.then(|| TestStores::install(&ctx, vec![cluster_ip_service(SC_UID)]));
        let mut steps = vec![];
        if !stored {
            steps.extend([
                get_deployment(None),
                get_child(Kind::ConfigMap, None),
                get_child(Kind::Service, Some(cluster_ip_service(SC_UID))),
            ]);
        }
        steps.extend([
            create(Kind::ConfigMap, json!({})),
            create(Kind::Deployment, rollout(1, 1, 0)),
            delete_child(Kind::Service),
            create_headless_service(),
        ]);
        if !stored {
            steps.extend([
                list_children(Kind::Pdb, vec![]),
                list_children(Kind::ServiceAccount, vec![]),
                list_children(Kind::RoleBinding, vec![]),
            ]);
        }
        steps.extend([
            event("Normal", "Created"),
            status_patch(&sc, json!({"configHash": hash_of(&sc)})),
        ]);
        let mock = server.run(Scenario::Steps(steps));
        let result = reconcile_once(ctx.clone(), sc).await;
        drop(ctx);
        let requests = finish(mock).await;
        result.unwrap_or_else(|e| panic!("stored {stored}: {e}"));
        let deleted = requests
            .iter()
            .position(|r| r.method == Method::DELETE)
            .unwrap();
        let created = requests
            .iter()
            .position(|r| r.is_create_in(&Kind::Service.path("")))
            .unwrap();
        assert!(deleted < created, "deleted before it is created again");
    }
}

/// A Service holding the worker Service's name with a ClusterIP but without this
/// StreamConsumer's controller reference is never deleted (nor written): the pass stops with a
/// conflict naming it, whether the store or a read showed it.
#[tokio::test]
async fn a_cluster_ip_service_that_is_not_ours_is_not_deleted() {
    for stored in [true, false] {
        let (ctx, server, _) = Context::test();
        let sc = StreamConsumer::test().finalized();
        let foreign = cluster_ip_service("someone-else");
        let _stores = stored.then(|| TestStores::install(&ctx, vec![foreign.clone()]));
        let mut steps = vec![];
        if !stored {
            steps.extend([get_deployment(None), get_child(Kind::ConfigMap, None)]);
        }
        // The store may be behind: what it shows as someone else's is read again.
        steps.push(get_child(Kind::Service, Some(foreign)));
        steps.extend(conflict_reported(&sc, Kind::Service, "ChildConflict"));
        let mock = server.run(Scenario::Steps(steps));
        let result = reconcile_once(ctx.clone(), sc).await;
        drop(ctx);
        let requests = finish(mock).await;
        assert_eq!(result.unwrap_err().reason(), "ChildConflict");
        assert!(
            !requests.iter().any(|r| r.method == Method::DELETE
                || r.path.starts_with(&Kind::Service.path("")) && r.method != Method::GET),
            "stored {stored}: {requests:#?}"
        );
    }
}

/// The store may be behind the replacement: it still shows the old ClusterIP Service, whose
/// delete the API server refuses (the uid precondition: another object holds the name now). The
/// name is read again; the headless Service of ours found there is applied over, nothing deleted.
#[tokio::test]
async fn a_cluster_ip_service_already_replaced_is_read_again_not_deleted_twice() {
    let (ctx, server, _) = Context::test();
    let sc = StreamConsumer::test().finalized();
    let _stores = TestStores::install(&ctx, vec![cluster_ip_service(SC_UID)]);
    let mut headless = stored_child(Kind::Service, "9");
    headless["metadata"]["uid"] = json!("uid-of-the-headless-Service");
    headless["spec"] = json!({"type": "ClusterIP", "clusterIP": "None", "clusterIPs": ["None"]});
    let mock = server.run(Scenario::Steps(vec![
        create(Kind::ConfigMap, json!({})),
        create(Kind::Deployment, rollout(1, 1, 0)),
        delete_child(Kind::Service).reply(Reply::Error(409, "Conflict")),
        get_child(Kind::Service, Some(headless)),
        write(Kind::Service, Some("9"), json!({})),
        event("Normal", "Created"),
        status_patch(&sc, json!({"configHash": hash_of(&sc)})),
    ]));
    let result = reconcile_once(ctx.clone(), sc).await;
    drop(ctx);
    finish(mock).await;
    result.unwrap();
}

/// The Service's store keeps its clusterIP (and the metadata every child's store keeps), so the
/// migration is decided without a read.
#[test]
fn the_service_store_keeps_the_cluster_ip() {
    use crate::children::{service_cluster_ip, StoredForm};
    let mut svc: Service = serde_json::from_value(cluster_ip_service(SC_UID)).unwrap();
    svc.to_stored_form();
    assert_eq!(service_cluster_ip(&svc), Some("10.96.0.12"));
    let spec = svc.spec.as_ref().unwrap();
    assert_eq!(
        (spec.type_.as_ref(), spec.cluster_ips.as_ref()),
        (None, None)
    );
    assert!(crate::ownership::controlled_by(&svc.metadata, SC_UID));
}
