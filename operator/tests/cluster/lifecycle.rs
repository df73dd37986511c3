//! A StreamConsumer's life under the real operator process (chart ServiceAccount and RBAC) and the
//! real controllers: create, status, update, scale through the scale subresource, field ownership
//! under server-side apply, deletion under both cleanup policies (the finalizer only where the
//! group is deleted), and garbage collection of the children by kube-controller-manager.
//!
//! There is no kubelet: worker pods are created by the ReplicaSet controller and stay Pending, and
//! `mark_pods_ready` plays the kubelet's part by writing their status.

use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::json;
use streamops_crds::v1alpha1::{CleanupPolicy, HandlerKind, StreamConsumerStatus};
use streamops_crds::StreamConsumer;

use crate::harness::{admin, env, eventually, Operator, OperatorSpec, TestNs};
use crate::kafka;

const WAIT: Duration = Duration::from_secs(60);
const FINALIZER: &str = "streamops.dev/cleanup";

/// A valid StreamConsumer `name` of `kind` reading `topic` on the local broker.
pub fn consumer(name: &str, kind: HandlerKind, topic: &str) -> StreamConsumer {
    let mut sc = StreamConsumer::test_of(kind);
    sc.metadata = Default::default();
    sc.metadata.name = Some(name.into());
    sc.spec.kafka.topics = vec![topic.into()];
    sc.spec.kafka.group_id = format!("{name}-group");
    sc
}

fn condition<'a>(
    status: &'a StreamConsumerStatus,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

/// Waits until the status describes the current generation and `check` holds.
pub async fn wait_status(
    api: &Api<StreamConsumer>,
    name: &str,
    what: &str,
    check: impl Fn(&StreamConsumerStatus) -> bool,
) -> (StreamConsumer, StreamConsumerStatus) {
    eventually(what, WAIT, || async {
        let sc = api.get(name).await.ok()?;
        let status = sc.status.clone()?;
        (status.observed_generation == sc.metadata.generation && check(&status))
            .then_some((sc, status))
    })
    .await
}

/// Plays the kubelet: every pod of the Deployment `name` becomes Running and Ready.
pub async fn mark_pods_ready(client: &Client, ns: &str, name: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = format!("app.kubernetes.io/instance={name}");
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    for pod in pods
        .list(&ListParams::default().labels(&selector))
        .await
        .unwrap()
        .items
    {
        let pod_name = pod.metadata.name.clone().unwrap();
        let ready = |t: &str| json!({"type": t, "status": "True", "lastTransitionTime": now});
        pods.patch_status(
            &pod_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "phase": "Running",
                "conditions": [ready("PodScheduled"), ready("Initialized"), ready("ContainersReady"), ready("Ready")],
            }})),
        )
        .await
        .unwrap_or_else(|e| panic!("cannot mark pod {pod_name} ready: {e}"));
    }
}

/// Waits until the Deployment `name` exists with `replicas` pods created by the ReplicaSet
/// controller, and returns it.
async fn wait_deployment(client: &Client, ns: &str, name: &str, replicas: i32) -> Deployment {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = format!("app.kubernetes.io/instance={name}");
    eventually(
        &format!("Deployment {name} with {replicas} pods"),
        WAIT,
        || async {
            let d = deployments.get(name).await.ok()?;
            let n = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .ok()?
                .items
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .count();
            (d.spec.as_ref()?.replicas == Some(replicas) && n == replicas as usize).then_some(d)
        },
    )
    .await
}

/// The first value of `key` anywhere in `v`.
fn find_key<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    match v {
        serde_json::Value::Object(m) => m
            .get(key)
            .or_else(|| m.values().find_map(|x| find_key(x, key))),
        serde_json::Value::Array(a) => a.iter().find_map(|x| find_key(x, key)),
        _ => None,
    }
}

fn controller_uid<K: kube::Resource>(obj: &K) -> Option<String> {
    obj.meta()
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true) && r.kind == "StreamConsumer")
        .map(|r| r.uid.clone())
}

#[tokio::test]
async fn a_consumer_gets_its_children_and_a_status_that_follows_the_workers() {
    let ns = TestNs::new("create").await;
    let _op = Operator::start(OperatorSpec::watching(&ns.name));
    let client = admin().await;
    let api: Api<StreamConsumer> = Api::namespaced(client.clone(), &ns.name);
    kafka::require_broker();
    let topic = kafka::unique("cluster-create");
    kafka::create_topic(&topic, 3).await;

    let sc = api
        .create(
            &PostParams::default(),
            &consumer("orders", HandlerKind::MovingAverage, &topic),
        )
        .await
        .unwrap();
    let uid = sc.metadata.uid.clone().unwrap();

    // Children, each controlled by the StreamConsumer.
    let d = wait_deployment(&client, &ns.name, "orders", 1).await;
    assert_eq!(controller_uid(&d).as_deref(), Some(uid.as_str()));
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns.name)
        .get("orders-config")
        .await
        .unwrap();
    assert_eq!(controller_uid(&cm).as_deref(), Some(uid.as_str()));
    assert!(cm.data.unwrap_or_default().contains_key("worker.yaml"));

    // A status for generation 1: pods exist but none is ready. No finalizer: under Retain (the
    // default) the deletion has nothing for the operator to do.
    let (sc, status) = wait_status(&api, "orders", "Ready=False WorkersNotReady", |s| {
        condition(s, "Ready").is_some_and(|c| c.status == "False" && c.reason == "WorkersNotReady")
    })
    .await;
    assert_eq!(sc.spec.cleanup_policy, CleanupPolicy::Retain);
    assert_eq!(sc.metadata.finalizers, None);
    assert_eq!(status.observed_generation, Some(1));
    // Its lag comes from its brokers, which the operator is allowed to read: no worker Service
    // (every child was written before that status).
    assert!(
        Api::<Service>::namespaced(client.clone(), &ns.name)
            .get_opt("orders")
            .await
            .unwrap()
            .is_none(),
        "no worker Service for a StreamConsumer on an allowed broker"
    );
    let ready = condition(&status, "Ready").unwrap();
    assert_eq!(ready.reason, "WorkersNotReady", "{ready:?}");
    assert_eq!(ready.observed_generation, Some(1));
    let progressing = condition(&status, "Progressing").unwrap();
    assert_eq!(
        (progressing.status.as_str(), progressing.reason.as_str()),
        ("True", "WaitingForReadiness"),
        "{progressing:?}"
    );
    let degraded = condition(&status, "Degraded").unwrap();
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("False", "AsExpected")
    );
    assert!(status
        .selector
        .as_deref()
        .is_some_and(|s| s.contains("app.kubernetes.io/instance=orders")));
    assert!(status.config_hash.is_some());

    // The workers become ready: Ready=True, the rollout is complete.
    mark_pods_ready(&client, &ns.name, "orders").await;
    let (_, status) = wait_status(&api, "orders", "Ready=True", |s| {
        condition(s, "Ready").is_some_and(|c| c.status == "True")
    })
    .await;
    assert_eq!(status.ready_replicas, 1);
    assert_eq!(condition(&status, "Ready").unwrap().reason, "WorkersReady");
    let progressing = condition(&status, "Progressing").unwrap();
    assert_eq!(
        (progressing.status.as_str(), progressing.reason.as_str()),
        ("False", "RolloutComplete")
    );

    // The lag of the group is read from the broker: an existing topic, nothing consumed.
    let (_, status) = wait_status(&api, "orders", "status.lag and LagAvailable=True", |s| {
        s.lag.is_some() && condition(s, "LagAvailable").is_some_and(|c| c.status == "True")
    })
    .await;
    let lag = status.lag.unwrap();
    assert_eq!((lag.total, lag.partitions), (0, 3));
    let out = env().kubectl(&["get", "streamconsumers", "-n", &ns.name, "orders"]);
    let row: Vec<&str> = out.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[3..6], ["1", "1", "0"], "DESIRED READY LAG:\n{out}");

    // An update: a new generation, a new configuration rolled out.
    let old_hash = status.config_hash.clone();
    api.patch(
        "orders",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"batch": {"maxWaitMs": 250}}})),
    )
    .await
    .unwrap();
    let (sc, status) = wait_status(&api, "orders", "status for generation 2", |s| {
        s.config_hash != old_hash
    })
    .await;
    assert_eq!(sc.metadata.generation, Some(2));
    assert_eq!(status.observed_generation, Some(2));
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns.name)
        .get("orders-config")
        .await
        .unwrap();
    let config: serde_json::Value = serde_yaml::from_str(&cm.data.unwrap()["worker.yaml"]).unwrap();
    assert!(
        find_key(&config, "maxWaitMs") == Some(&json!(250)),
        "the new batch wait reaches the worker configuration: {config}"
    );
    kafka::delete_topic(&topic).await;
}

#[tokio::test]
async fn kubectl_scale_goes_through_the_scale_subresource_to_the_deployment() {
    let env = env();
    let ns = TestNs::new("scale").await;
    let _op = Operator::start(OperatorSpec::watching(&ns.name));
    let client = admin().await;
    let api: Api<StreamConsumer> = Api::namespaced(client.clone(), &ns.name);
    api.create(
        &PostParams::default(),
        &consumer("sensors", HandlerKind::Sensor, "readings"),
    )
    .await
    .unwrap();
    wait_deployment(&client, &ns.name, "sensors", 1).await;
    wait_status(&api, "sensors", "a first status", |s| s.selector.is_some()).await;

    let out = env.kubectl(&[
        "scale",
        "streamconsumer/sensors",
        "--replicas=3",
        "-n",
        &ns.name,
    ]);
    assert!(out.contains("scaled"), "{out}");
    assert_eq!(api.get("sensors").await.unwrap().spec.replicas, 3);

    // The Deployment follows, its ReplicaSet creates the pods, and with more than one replica
    // the operator adds a disruption budget.
    wait_deployment(&client, &ns.name, "sensors", 3).await;
    let (_, status) = wait_status(&api, "sensors", "status.replicas 3", |s| s.replicas == 3).await;
    assert_eq!(status.replicas, 3);
    eventually("the PodDisruptionBudget", WAIT, || async {
        Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns.name)
            .get("sensors")
            .await
            .ok()
    })
    .await;

    // The scale subresource reports what the operator wrote.
    let scale: serde_json::Value = serde_json::from_str(&env.kubectl(&[
        "get",
        "--raw",
        &format!(
            "/apis/streamops.dev/v1alpha1/namespaces/{}/streamconsumers/sensors/scale",
            ns.name
        ),
    ]))
    .unwrap();
    assert_eq!(scale["kind"], "Scale");
    assert_eq!(scale["spec"]["replicas"], 3);
    assert_eq!(scale["status"]["replicas"], 3);
    assert!(scale["status"]["selector"]
        .as_str()
        .is_some_and(|s| s.contains("app.kubernetes.io/instance=sensors")));
}

#[tokio::test]
async fn an_edit_of_an_owned_field_is_reverted_and_a_field_the_operator_does_not_own_is_kept() {
    let ns = TestNs::new("ssa").await;
    let _op = Operator::start(OperatorSpec::watching(&ns.name));
    let client = admin().await;
    let api: Api<StreamConsumer> = Api::namespaced(client.clone(), &ns.name);
    api.create(
        &PostParams::default(),
        &consumer("fraud", HandlerKind::Fraud, "transactions"),
    )
    .await
    .unwrap();
    let d = wait_deployment(&client, &ns.name, "fraud", 1).await;
    let image = d
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .image
        .clone()
        .unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let appliers = |d: &Deployment| -> Vec<String> {
        let mut managers: Vec<String> = d
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .filter(|m| m.operation.as_deref() == Some("Apply"))
            .filter_map(|m| m.manager.clone())
            .collect();
        managers.sort();
        managers
    };
    assert!(
        appliers(&d).is_empty(),
        "a new child's fields stay with its create until it is next written"
    );

    // Someone else changes a field the operator owns (the image) and adds one it does not own
    // (an annotation), in one server-side apply with force.
    deployments
        .patch(
            "fraud",
            &PatchParams::apply("someone-else").force(),
            &Patch::Apply(json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "fraud", "annotations": {"example.com/owner": "team-a"}},
                "spec": {"template": {"spec": {"containers": [{"name": "worker", "image": "example.com/evil:1"}]}}}
            })),
        )
        .await
        .unwrap();
    let d = eventually("the image to be set back", WAIT, || async {
        let d = deployments.get("fraud").await.ok()?;
        let current = d.spec.as_ref()?.template.spec.as_ref()?.containers[0]
            .image
            .clone()?;
        (current == image).then_some(d)
    })
    .await;
    // Writing it back, the operator first handed the create's fields to server-side apply.
    assert_eq!(
        appliers(&d),
        ["someone-else", "streamops-operator"],
        "the operator applies under its one field manager"
    );
    assert_eq!(
        d.metadata
            .annotations
            .unwrap_or_default()
            .get("example.com/owner")
            .map(String::as_str),
        Some("team-a"),
        "a field the operator does not own is kept"
    );
}

#[tokio::test]
async fn delete_with_retain_releases_the_object_and_the_garbage_collector_removes_the_children() {
    let ns = TestNs::new("retain").await;
    let _op = Operator::start(OperatorSpec::watching(&ns.name));
    let client = admin().await;
    let api: Api<StreamConsumer> = Api::namespaced(client.clone(), &ns.name);
    let mut sc = consumer("keep", HandlerKind::MovingAverage, "prices").with_replicas(2);
    sc.spec.cleanup_policy = CleanupPolicy::Retain;
    api.create(&PostParams::default(), &sc).await.unwrap();
    wait_deployment(&client, &ns.name, "keep", 2).await;
    wait_status(&api, "keep", "a first status", |s| s.replicas == 2).await;
    eventually("the PodDisruptionBudget", WAIT, || async {
        Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns.name)
            .get("keep")
            .await
            .ok()
    })
    .await;

    api.delete("keep", &Default::default()).await.unwrap();
    eventually("the StreamConsumer to be gone", WAIT, || async {
        match api.get_opt("keep").await {
            Ok(None) => Some(()),
            _ => None,
        }
    })
    .await;
    // With Retain the operator deletes nothing itself: the Deployment, its ReplicaSet and pods,
    // the ConfigMap, the Service and the disruption budget go through their owner references.
    let sel = ListParams::default().labels("app.kubernetes.io/instance=keep");
    eventually("every child collected", Duration::from_secs(90), || async {
        let n = Api::<Deployment>::namespaced(client.clone(), &ns.name)
            .list(&sel)
            .await
            .ok()?
            .items
            .len()
            + Api::<ReplicaSet>::namespaced(client.clone(), &ns.name)
                .list(&sel)
                .await
                .ok()?
                .items
                .len()
            + Api::<Pod>::namespaced(client.clone(), &ns.name)
                .list(&sel)
                .await
                .ok()?
                .items
                .len()
            + Api::<ConfigMap>::namespaced(client.clone(), &ns.name)
                .list(&sel)
                .await
                .ok()?
                .items
                .len()
            + Api::<Service>::namespaced(client.clone(), &ns.name)
                .list(&sel)
                .await
                .ok()?
                .items
                .len()
            + Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns.name)
                .list(&sel)
                .await
                .ok()?
                .items
                .len();
        (n == 0).then_some(())
    })
    .await;
    // The event says the group was kept (the operator reports it when its watch sees the object
    // gone: there was no finalizer, so no cleanup pass).
    let events = env().kubectl(&[
        "get",
        "events.events.k8s.io",
        "-n",
        &ns.name,
        "-o",
        "jsonpath={.items[*].reason}",
    ]);
    assert!(events.contains("ConsumerGroupRetained"), "{events}");
}

#[tokio::test]
async fn the_garbage_collector_removes_children_of_a_consumer_deleted_while_no_operator_runs() {
    let ns = TestNs::new("gc").await;
    let client = admin().await;
    let api: Api<StreamConsumer> = Api::namespaced(client.clone(), &ns.name);
    api.create(
        &PostParams::default(),
        &consumer("orphan", HandlerKind::Sensor, "readings"),
    )
    .await
    .unwrap();
    {
        let _op = Operator::start(OperatorSpec::watching(&ns.name));
        wait_deployment(&client, &ns.name, "orphan", 1).await;
        wait_status(&api, "orphan", "a first status", |s| s.selector.is_some()).await;
    }
    // The operator is gone. Under Retain the object carries no finalizer: its deletion needs no
    // operator.
    assert_eq!(api.get("orphan").await.unwrap().metadata.finalizers, None);
    api.delete("orphan", &Default::default()).await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let sel = ListParams::default().labels("app.kubernetes.io/instance=orphan");
    eventually(
        "the Deployment and its pods collected",
        Duration::from_secs(90),
        || async {
            let n = deployments.list(&sel).await.ok()?.items.len()
                + pods.list(&sel).await.ok()?.items.len();
            (n == 0).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn delete_with_delete_consumer_group_stops_the_workers_and_deletes_the_group() {
    kafka::require_broker();
    let ns = TestNs::new("dropgroup").await;
    let _op = Operator::start(OperatorSpec::watching(&ns.name));
    let client = admin().await;
    let api: Api<StreamConsumer> = Api::namespaced(client.clone(), &ns.name);
    let topic = kafka::unique("cluster-dropgroup");
    kafka::create_topic(&topic, 1).await;
    let mut sc = consumer("drop", HandlerKind::MovingAverage, &topic);
    sc.spec.cleanup_policy = CleanupPolicy::DeleteConsumerGroup;
    let group = sc.spec.kafka.group_id.clone();
    commit_offset(&group, &topic);
    assert!(group_exists(&group), "the group exists before the deletion");

    api.create(&PostParams::default(), &sc).await.unwrap();
    wait_deployment(&client, &ns.name, "drop", 1).await;
    let (stored, _) = wait_status(&api, "drop", "a first status", |s| s.selector.is_some()).await;
    assert_eq!(
        stored.metadata.finalizers,
        Some(vec![FINALIZER.to_string()]),
        "the group's deletion needs the operator: the object carries its finalizer"
    );
    api.delete("drop", &Default::default()).await.unwrap();
    eventually(
        "the StreamConsumer to be gone",
        Duration::from_secs(90),
        || async {
            match api.get_opt("drop").await {
                Ok(None) => Some(()),
                _ => None,
            }
        },
    )
    .await;
    assert!(
        !group_exists(&group),
        "the consumer group {group} was deleted"
    );
    let events = env().kubectl(&[
        "get",
        "events.events.k8s.io",
        "-n",
        &ns.name,
        "-o",
        "jsonpath={.items[*].reason}",
    ]);
    assert!(
        !events.contains("ConsumerGroupCleanupAbandoned"),
        "{events}"
    );
    kafka::delete_topic(&topic).await;
}

/// Commits offset 0 of partition 0 for `group`, which creates the group on the broker.
fn commit_offset(group: &str, topic: &str) {
    kafka::commit_offsets(group, topic, &[(0, 0)]);
}

/// Whether the broker knows `group` (a deleted group is described as `Dead`, or not at all).
fn group_exists(group: &str) -> bool {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::ClientConfig;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka::BROKER)
        .create()
        .expect("a client");
    let list = consumer
        .fetch_group_list(Some(group), Duration::from_secs(10))
        .expect("ListGroups");
    list.groups()
        .iter()
        .any(|g| g.name() == group && !g.state().is_empty() && g.state() != "Dead")
}
