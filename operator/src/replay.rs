//! Suspend and replay (issue 17): pure decisions and the replay Job.
//!
//! The operator reads no Secrets and holds no database credentials, so the steps that touch
//! PostgreSQL and Redis are run by the worker binary, `streamops-worker replay`, in a one-shot
//! Job built from the worker Deployment's own pod template (same image, ServiceAccount, Secret
//! references, configuration and security context; nothing the StreamConsumer's author could not
//! already run as a worker). The sequence for a request `spec.replay`:
//!
//! 1. **Suspending**: the Deployment is held at 0 replicas (autoscaling paused); the workers
//!    commit the batches they hold and leave.
//! 2. **Running**: once no worker pod remains, the Job is created. It waits for the consumer
//!    group to be empty (`--wait-idle`), then, in one PostgreSQL transaction, records the request
//!    id (a request runs once, even if the Job is retried), moves the offsets of record and
//!    rebuilds the handler's tables, and commits the positions to Kafka.
//! 3. **Completed** (or **Failed**, with the Job's reason): the workers come back, unless
//!    `spec.suspend` holds them, and resume from the offsets of record.
//!
//! `status.replay.requestId` with a finished phase is what makes a request run once: the same
//! id is never acted on again, whatever the reconciler sees later.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sha2::{Digest, Sha256};
use streamops_crds::v1alpha1::{ReplaySpec, ReplayStatus, StreamConsumer};

use crate::build::BuildContext;
use crate::names::{labels, Component, LABEL_COMPONENT, LABEL_NAME, WORKER_CONTAINER};

/// `status.phase` of a consumer whose workers run.
pub const PHASE_RUNNING: &str = "Running";
/// `status.phase` of a suspended consumer.
pub const PHASE_SUSPENDED: &str = "Suspended";
/// `status.phase` while a replay holds the workers stopped.
pub const PHASE_REPLAYING: &str = "Replaying";

/// `status.replay.phase` values.
pub const REPLAY_SUSPENDING: &str = "Suspending";
/// The Job runs.
pub const REPLAY_RUNNING: &str = "Running";
/// Done.
pub const REPLAY_COMPLETED: &str = "Completed";
/// The Job failed; a new requestId is needed to try again.
pub const REPLAY_FAILED: &str = "Failed";

/// `app.kubernetes.io/name` of replay Jobs and their pods: not the workers' value, so the
/// Deployment, the Service and the PodDisruptionBudget never select them.
pub const REPLAY_APP_NAME: &str = "streamops-replay";
/// `app.kubernetes.io/component` of replay Jobs.
pub const REPLAY_COMPONENT: &str = "replay";
/// How long the Job waits for the consumer group to empty (a stopped static member stays
/// listed until its session times out, 45 s by default).
pub const WAIT_IDLE_SECONDS: u32 = 120;
/// Attempts of the replay pod (the request id makes a retry after a committed replay a no-op).
pub const JOB_BACKOFF_LIMIT: i32 = 3;
/// How often a reconciler looks at a replay in progress.
pub const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(3);
/// A finished Job is deleted after this long.
pub const JOB_TTL_SECONDS: i32 = 86_400;

/// The replay request still to be carried out: `spec.replay`, unless `status.replay` shows the
/// same id finished.
pub fn pending_request(sc: &StreamConsumer) -> Option<&ReplaySpec> {
    let req = sc.spec.replay.as_ref()?;
    let seen = sc.status.as_ref().and_then(|s| s.replay.as_ref());
    match seen {
        Some(s)
            if s.request_id == req.request_id
                && (s.phase == REPLAY_COMPLETED || s.phase == REPLAY_FAILED) =>
        {
            None
        }
        _ => Some(req),
    }
}

/// Whether the workers must be held at zero replicas: suspended, or a replay in progress.
pub fn holds_workers(sc: &StreamConsumer) -> bool {
    sc.spec.suspend || pending_request(sc).is_some()
}

/// The `status.phase` of a consumer.
pub fn phase(sc: &StreamConsumer) -> &'static str {
    if pending_request(sc).is_some() {
        PHASE_REPLAYING
    } else if sc.spec.suspend {
        PHASE_SUSPENDED
    } else {
        PHASE_RUNNING
    }
}

/// Name of the Job of a request: `<consumer>-replay-<request id>`, or, when that exceeds 63
/// characters, shortened with a hash of both so that it stays unique.
pub fn job_name(consumer: &str, request_id: &str) -> String {
    let full = format!("{consumer}-replay-{request_id}");
    if full.len() <= 63 {
        return full;
    }
    let digest = Sha256::digest(full.as_bytes());
    let hash = hex::encode(&digest[..4]);
    let keep = 63 - "-replay-".len() - hash.len();
    let head: String = consumer.chars().take(keep).collect();
    format!("{}-replay-{hash}", head.trim_end_matches('-'))
}

/// The arguments of `streamops-worker replay` for a request.
pub fn replay_args(config_path: &str, req: &ReplaySpec) -> Vec<String> {
    let mut args = vec![
        "replay".to_string(),
        "--config".to_string(),
        config_path.to_string(),
        "--request-id".to_string(),
        req.request_id.clone(),
        "--wait-idle".to_string(),
        WAIT_IDLE_SECONDS.to_string(),
        "--log-format".to_string(),
        "json".to_string(),
    ];
    if req.to_earliest {
        args.push("--to-earliest".into());
    } else if let Some(t) = &req.from_timestamp {
        args.push("--from-timestamp".into());
        args.push(t.clone());
    } else {
        args.push("--to-offsets".into());
        args.push(
            req.offsets
                .iter()
                .map(|o| format!("{}:{}={}", o.topic, o.partition, o.offset))
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    args
}

/// The replay Job of `req`: the worker pod template of `deployment` (as built for the same
/// StreamConsumer) running `streamops-worker replay` once, without probes or ports.
pub fn build_replay_job(ctx: &BuildContext<'_>, deployment: &Deployment, req: &ReplaySpec) -> Job {
    let mut meta = ctx.child_meta(job_name(ctx.name, &req.request_id), Component::Worker);
    let mut job_labels = labels(ctx.name, Component::Worker);
    job_labels.insert(LABEL_NAME.into(), REPLAY_APP_NAME.into());
    job_labels.insert(LABEL_COMPONENT.into(), REPLAY_COMPONENT.into());
    meta.labels = Some(job_labels.clone());

    let mut template = deployment
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default();
    let mut pod_meta = template.metadata.take().unwrap_or_default();
    pod_meta.labels = Some(job_labels);
    let mut pod = template.spec.take().unwrap_or_default();
    pod.restart_policy = Some("Never".into());
    for c in pod.containers.iter_mut() {
        if c.name != WORKER_CONTAINER {
            continue;
        }
        let config_path = c
            .args
            .as_ref()
            .and_then(|a| {
                a.iter()
                    .position(|x| x == "--config")
                    .and_then(|i| a.get(i + 1))
            })
            .cloned()
            .unwrap_or_else(|| "/etc/streamops/worker.yaml".into());
        c.args = Some(replay_args(&config_path, req));
        c.ports = None;
        c.startup_probe = None;
        c.liveness_probe = None;
        c.readiness_probe = None;
    }
    Job {
        metadata: meta,
        spec: Some(JobSpec {
            backoff_limit: Some(JOB_BACKOFF_LIMIT),
            ttl_seconds_after_finished: Some(JOB_TTL_SECONDS),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: pod_meta.labels,
                    annotations: pod_meta.annotations,
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..JobSpec::default()
        }),
        ..Job::default()
    }
}

/// What the replay Job is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Not created.
    Absent,
    /// Created, not finished.
    Running,
    /// Finished successfully.
    Succeeded,
    /// Failed for good, with the Job's reason.
    Failed(String),
}

/// The state of a Job from its status conditions.
pub fn job_state(job: Option<&Job>) -> JobState {
    let Some(job) = job else {
        return JobState::Absent;
    };
    let conditions = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .cloned()
        .unwrap_or_default();
    for c in &conditions {
        if c.status != "True" {
            continue;
        }
        match c.type_.as_str() {
            "Complete" | "SuccessCriteriaMet" => return JobState::Succeeded,
            "Failed" | "FailureTarget" => {
                return JobState::Failed(
                    c.message
                        .clone()
                        .or_else(|| c.reason.clone())
                        .unwrap_or_else(|| "the replay Job failed".into()),
                )
            }
            _ => {}
        }
    }
    JobState::Running
}

/// What the reconciler does next for a pending request.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The new `status.replay`.
    pub status: ReplayStatus,
    /// Create the Job now.
    pub create_job: bool,
    /// An event to announce (reason, message), when the phase changed.
    pub event: Option<(&'static str, String)>,
}

/// The next step of request `req` of `sc`, given the worker pods still present and the Job.
pub fn next_step(
    sc: &StreamConsumer,
    req: &ReplaySpec,
    worker_pods: i32,
    job: &JobState,
    now: &str,
) -> Step {
    let name = sc.metadata.name.as_deref().unwrap_or_default();
    let previous = sc
        .status
        .as_ref()
        .and_then(|s| s.replay.as_ref())
        .filter(|s| s.request_id == req.request_id);
    let started_at = previous
        .and_then(|p| p.started_at.clone())
        .or_else(|| Some(now.to_string()));
    let job_name = job_name(name, &req.request_id);
    let status = |phase: &str, message: String, completed: bool| ReplayStatus {
        request_id: req.request_id.clone(),
        phase: phase.to_string(),
        job_name: Some(job_name.clone()),
        message: Some(message),
        started_at: started_at.clone(),
        completed_at: completed.then(|| now.to_string()),
    };
    let (phase, message, create_job, completed) = match job {
        JobState::Succeeded => (
            REPLAY_COMPLETED,
            "replayed: offsets of record moved and tables rebuilt; the workers resume from there"
                .to_string(),
            false,
            true,
        ),
        JobState::Failed(why) => (
            REPLAY_FAILED,
            format!(
                "the replay Job {job_name} failed: {why}; the workers resume from the offsets of record; set a new requestId to try again"
            ),
            false,
            true,
        ),
        JobState::Running => (
            REPLAY_RUNNING,
            format!("the replay Job {job_name} runs"),
            false,
            false,
        ),
        JobState::Absent if worker_pods > 0 => (
            REPLAY_SUSPENDING,
            format!("waiting for {worker_pods} worker pod(s) to commit and stop"),
            false,
            false,
        ),
        JobState::Absent => (
            REPLAY_RUNNING,
            format!("the workers stopped; starting the replay Job {job_name}"),
            true,
            false,
        ),
    };
    let status = status(phase, message.clone(), completed);
    let changed = previous.map(|p| p.phase.as_str()) != Some(phase);
    let event = changed.then(|| {
        let reason = match phase {
            REPLAY_COMPLETED => "ReplayCompleted",
            REPLAY_FAILED => "ReplayFailed",
            REPLAY_SUSPENDING => "ReplaySuspending",
            _ => "ReplayRunning",
        };
        (reason, format!("replay {}: {message}", req.request_id))
    });
    Step {
        status,
        create_job,
        event,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{build_deployment, RenderedConfig};
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
    use streamops_crds::v1alpha1::{ReplayOffset, StreamConsumerStatus};

    fn request(id: &str) -> ReplaySpec {
        ReplaySpec {
            request_id: id.into(),
            to_earliest: false,
            from_timestamp: Some("2024-03-20T10:30:00Z".into()),
            offsets: Vec::new(),
        }
    }

    fn with_replay(id: &str, seen: Option<(&str, &str)>) -> StreamConsumer {
        let mut sc = StreamConsumer::test();
        sc.spec.replay = Some(request(id));
        if let Some((seen_id, phase)) = seen {
            sc.status = Some(StreamConsumerStatus {
                replay: Some(ReplayStatus {
                    request_id: seen_id.into(),
                    phase: phase.into(),
                    ..ReplayStatus::default()
                }),
                ..StreamConsumerStatus::default()
            });
        }
        sc
    }

    #[test]
    fn a_request_runs_until_its_id_is_recorded_as_finished_and_never_again() {
        assert!(pending_request(&with_replay("r1", None)).is_some());
        assert!(pending_request(&with_replay("r1", Some(("r1", REPLAY_RUNNING)))).is_some());
        assert!(pending_request(&with_replay("r1", Some(("r1", REPLAY_COMPLETED)))).is_none());
        assert!(pending_request(&with_replay("r1", Some(("r1", REPLAY_FAILED)))).is_none());
        // A new id is a new request.
        assert!(pending_request(&with_replay("r2", Some(("r1", REPLAY_COMPLETED)))).is_some());
        assert!(pending_request(&StreamConsumer::test()).is_none());
    }

    #[test]
    fn suspend_and_pending_replays_hold_the_workers_and_show_in_the_phase() {
        let mut sc = StreamConsumer::test();
        assert!(!holds_workers(&sc));
        assert_eq!(phase(&sc), PHASE_RUNNING);
        sc.spec.suspend = true;
        assert!(holds_workers(&sc));
        assert_eq!(phase(&sc), PHASE_SUSPENDED);
        let sc = with_replay("r1", None);
        assert!(holds_workers(&sc));
        assert_eq!(phase(&sc), PHASE_REPLAYING);
        let done = with_replay("r1", Some(("r1", REPLAY_COMPLETED)));
        assert!(!holds_workers(&done));
        assert_eq!(phase(&done), PHASE_RUNNING);
    }

    #[test]
    fn the_job_waits_for_the_workers_to_stop_then_runs_once_and_completes() {
        let sc = with_replay("r1", None);
        let req = sc.spec.replay.clone().unwrap();
        let s = next_step(&sc, &req, 2, &JobState::Absent, "t0");
        assert_eq!(s.status.phase, REPLAY_SUSPENDING);
        assert!(!s.create_job, "a Job must not start while workers run");
        let s = next_step(&sc, &req, 0, &JobState::Absent, "t1");
        assert_eq!(s.status.phase, REPLAY_RUNNING);
        assert!(s.create_job);
        let running = with_replay("r1", Some(("r1", REPLAY_RUNNING)));
        let s = next_step(&running, &req, 0, &JobState::Running, "t2");
        assert!(!s.create_job);
        assert!(s.event.is_none(), "no event without a phase change");
        let s = next_step(&running, &req, 0, &JobState::Succeeded, "t3");
        assert_eq!(s.status.phase, REPLAY_COMPLETED);
        assert_eq!(s.status.completed_at.as_deref(), Some("t3"));
        assert_eq!(s.event.unwrap().0, "ReplayCompleted");
        let s = next_step(
            &running,
            &req,
            0,
            &JobState::Failed("BackoffLimitExceeded".into()),
            "t3",
        );
        assert_eq!(s.status.phase, REPLAY_FAILED);
        assert!(s.status.message.unwrap().contains("BackoffLimitExceeded"));
    }

    #[test]
    fn job_state_follows_the_job_conditions() {
        let job = |type_: &str, status: &str| Job {
            status: Some(JobStatus {
                conditions: Some(vec![JobCondition {
                    type_: type_.into(),
                    status: status.into(),
                    message: Some("why".into()),
                    ..JobCondition::default()
                }]),
                ..JobStatus::default()
            }),
            ..Job::default()
        };
        assert_eq!(job_state(None), JobState::Absent);
        assert_eq!(job_state(Some(&Job::default())), JobState::Running);
        assert_eq!(
            job_state(Some(&job("Complete", "True"))),
            JobState::Succeeded
        );
        assert_eq!(
            job_state(Some(&job("Complete", "False"))),
            JobState::Running
        );
        assert_eq!(
            job_state(Some(&job("Failed", "True"))),
            JobState::Failed("why".into())
        );
    }

    #[test]
    fn the_replay_job_runs_the_worker_pod_template_with_the_replay_command_only() {
        let mut sc = StreamConsumer::test();
        sc.spec.replay = Some(ReplaySpec {
            request_id: "fix-1".into(),
            to_earliest: false,
            from_timestamp: None,
            offsets: vec![
                ReplayOffset {
                    topic: "price-events".into(),
                    partition: 0,
                    offset: 10,
                },
                ReplayOffset {
                    topic: "price-events".into(),
                    partition: 1,
                    offset: 20,
                },
            ],
        });
        let rendered = RenderedConfig::render(&sc).unwrap();
        let ctx = BuildContext::new(&sc, "example.com/worker:1", &rendered, 0).unwrap();
        let deployment = build_deployment(&ctx);
        let job = build_replay_job(&ctx, &deployment, sc.spec.replay.as_ref().unwrap());
        assert_eq!(job.metadata.name.as_deref(), Some("test-replay-fix-1"));
        assert_eq!(
            job.metadata.owner_references.as_ref().unwrap()[0].uid,
            sc.metadata.uid.clone().unwrap()
        );
        let spec = job.spec.unwrap();
        let pod = spec.template.spec.unwrap();
        let worker_pod = deployment.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(pod.volumes, worker_pod.volumes);
        assert_eq!(pod.service_account_name, worker_pod.service_account_name);
        assert_eq!(pod.security_context, worker_pod.security_context);
        let c = &pod.containers[0];
        let w = &worker_pod.containers[0];
        assert_eq!(c.image, w.image);
        assert_eq!(c.env, w.env, "the same Secret references, nothing more");
        assert_eq!(c.security_context, w.security_context);
        assert!(c.readiness_probe.is_none() && c.ports.is_none());
        let args = c.args.clone().unwrap();
        assert_eq!(args[0], "replay");
        assert!(args
            .windows(2)
            .any(|w| w[0] == "--request-id" && w[1] == "fix-1"));
        assert!(args
            .windows(2)
            .any(|w| w[0] == "--to-offsets" && w[1] == "price-events:0=10,price-events:1=20"));
        // Neither the Deployment nor the Service selects the replay pod.
        let pod_labels = spec.template.metadata.unwrap().labels.unwrap();
        let selector = crate::names::selector_labels("test");
        assert!(selector.iter().any(|(k, v)| pod_labels.get(k) != Some(v)));
    }

    #[test]
    fn long_job_names_are_shortened_to_a_unique_dns_label() {
        let a = job_name(&"c".repeat(60), "request-a");
        let b = job_name(&"c".repeat(60), "request-b");
        assert!(a.len() <= 63 && b.len() <= 63);
        assert_ne!(a, b);
        assert_eq!(job_name("prices", "r1"), "prices-replay-r1");
    }
}

/// Drives a pending request one step (reads the Job, creates it when the workers are gone) and
/// writes `status.phase` and `status.replay` into `status`. Returns an event to announce.
pub async fn drive(
    client: &kube::Client,
    sc: &StreamConsumer,
    ctx: &BuildContext<'_>,
    desired: &Deployment,
    applied: &Deployment,
    status: &mut streamops_crds::v1alpha1::StreamConsumerStatus,
) -> crate::Result<Option<(&'static str, String)>> {
    status.replay = sc.status.as_ref().and_then(|s| s.replay.clone());
    status.phase = Some(phase(sc).to_string());
    let Some(req) = pending_request(sc) else {
        return Ok(None);
    };
    let jobs: kube::Api<Job> = kube::Api::namespaced(client.clone(), ctx.namespace);
    let name = job_name(ctx.name, &req.request_id);
    let job = jobs
        .get_opt(&name)
        .await
        .map_err(|source| crate::Error::GetChild {
            kind: "Job".into(),
            name: name.clone(),
            source,
        })?;
    if let Some(j) = &job {
        let ours = j
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| Some(&o.uid) == sc.metadata.uid.as_ref());
        if !ours {
            return Err(crate::Error::ChildConflict {
                kind: "Job".into(),
                name,
            });
        }
    }
    let worker_pods = applied
        .status
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(0);
    let now = crate::status::now().0.to_string();
    let step = next_step(sc, req, worker_pods, &job_state(job.as_ref()), &now);
    if step.create_job {
        let job = build_replay_job(ctx, desired, req);
        let created = jobs
            .create(
                &kube::api::PostParams {
                    field_manager: Some(crate::names::FIELD_MANAGER.into()),
                    ..Default::default()
                },
                &job,
            )
            .await;
        match created {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(source) => {
                return Err(crate::Error::ApplyChild {
                    kind: "Job".into(),
                    name,
                    source,
                })
            }
        }
    }
    let finished = step.status.phase == REPLAY_COMPLETED || step.status.phase == REPLAY_FAILED;
    status.phase = Some(
        if !finished {
            PHASE_REPLAYING
        } else if sc.spec.suspend {
            PHASE_SUSPENDED
        } else {
            PHASE_RUNNING
        }
        .to_string(),
    );
    status.replay = Some(step.status);
    Ok(step.event)
}

/// The reconciler's side of suspend and replay, against the mock API server.
#[cfg(test)]
mod reconcile_tests {
    use std::sync::Arc;
    use std::time::Duration;

    use http::Method;
    use kube::runtime::controller::Action;
    use serde_json::json;
    use streamops_crds::v1alpha1::{ReplayStatus, StreamConsumerStatus};
    use streamops_crds::StreamConsumer;

    use super::*;
    use crate::build::{build_deployment, RenderedConfig};
    use crate::fixtures::*;
    use crate::reconcile::{reconcile, Context};

    fn live_deployment(sc: &StreamConsumer, replicas: i32) -> Deployment {
        let rendered = RenderedConfig::render(sc).unwrap();
        let ctx = BuildContext::new(sc, TEST_IMAGE, &rendered, replicas).unwrap();
        let mut d = build_deployment(&ctx);
        d.metadata.generation = Some(1);
        d.metadata.uid = Some("deployment-uid".into());
        d
    }

    fn jobs_path(name: &str) -> String {
        path("batch/v1", "jobs", name)
    }

    fn with_request(sc: StreamConsumer, seen_phase: Option<&str>) -> StreamConsumer {
        let mut sc = sc.with_spec(|s| {
            s.replay = Some(ReplaySpec {
                request_id: "fix-1".into(),
                to_earliest: true,
                from_timestamp: None,
                offsets: Vec::new(),
            })
        });
        if let Some(phase) = seen_phase {
            sc.status = Some(StreamConsumerStatus {
                replay: Some(ReplayStatus {
                    request_id: "fix-1".into(),
                    phase: phase.into(),
                    started_at: Some("2026-01-01T00:00:00Z".into()),
                    ..ReplayStatus::default()
                }),
                ..StreamConsumerStatus::default()
            });
        }
        sc
    }

    /// The requests of one pass over `sc` whose Deployment had `running` replicas and now
    /// reports `remaining` pods, with `extra` requests before the status patch.
    fn pass(
        sc: &StreamConsumer,
        running: i32,
        remaining: i32,
        events: Vec<&'static str>,
        extra: Vec<Expect>,
        status: serde_json::Value,
    ) -> Vec<Expect> {
        let mut p = ApplyPass::new(sc.clone());
        p.existing = Some(live_deployment(sc, running));
        p.deployment_answer = rollout(1, remaining, remaining);
        p.events = events;
        p.status = None;
        let mut steps = p.steps_for_test();
        steps.extend(extra);
        steps.push(status_patch(sc, status));
        steps
    }

    async fn run(sc: StreamConsumer, steps: Vec<Expect>) -> (Action, Vec<Recorded>) {
        let (ctx, server, _) = Context::test();
        let mock = server.run_steps(steps);
        let result = reconcile(guard(sc), Arc::clone(&ctx)).await;
        drop(ctx);
        let requests = finish(mock).await;
        (result.unwrap(), requests)
    }

    #[tokio::test]
    async fn a_suspended_consumer_scales_its_workers_to_zero_and_says_so() {
        let sc = StreamConsumer::test()
            .finalized()
            .with_replicas(2)
            .with_spec(|s| s.suspend = true);
        let steps = pass(
            &sc,
            2,
            0,
            vec!["Scaled"],
            vec![],
            json!({"phase": "Suspended", "conditions": [{"type": "Ready", "status": "True", "reason": "Suspended"}]}),
        );
        let (_, requests) = run(sc, steps).await;
        let d = body_of(&requests, Method::PATCH, &Kind::Deployment.path("test"));
        assert_eq!(d["spec"]["replicas"], 0);
    }

    #[tokio::test]
    async fn a_replay_waits_for_the_workers_to_stop_before_its_job_starts() {
        let sc = with_request(StreamConsumer::test().finalized(), None);
        let steps = pass(
            &sc,
            1,
            1,
            vec!["Scaled"],
            vec![
                Expect::new(Method::GET, jobs_path("test-replay-fix-1"))
                    .reply(Reply::Error(404, "NotFound")),
                event("Normal", "ReplaySuspending"),
            ],
            json!({"phase": "Replaying", "replay": {"requestId": "fix-1", "phase": "Suspending"}}),
        );
        let (action, requests) = run(sc, steps).await;
        assert_eq!(action, Action::requeue(POLL_INTERVAL));
        let d = body_of(&requests, Method::PATCH, &Kind::Deployment.path("test"));
        assert_eq!(d["spec"]["replicas"], 0);
        assert!(!requests
            .iter()
            .any(|r| r.method == Method::POST && r.path == jobs_path("")));
    }

    #[tokio::test]
    async fn once_no_worker_remains_the_replay_job_is_created() {
        let sc = with_request(StreamConsumer::test().finalized(), Some(REPLAY_SUSPENDING));
        let steps = pass(
            &sc,
            0,
            0,
            vec![],
            vec![
                Expect::new(Method::GET, jobs_path("test-replay-fix-1"))
                    .reply(Reply::Error(404, "NotFound")),
                Expect::new(Method::POST, jobs_path(""))
                    .body(json!({"metadata": {"name": "test-replay-fix-1"}}))
                    .reply(Reply::MergedOverRequest(json!({}))),
                event("Normal", "ReplayRunning"),
            ],
            json!({"phase": "Replaying", "replay": {"requestId": "fix-1", "phase": "Running", "startedAt": "2026-01-01T00:00:00Z"}}),
        );
        let (_, requests) = run(sc, steps).await;
        let job = body_of(&requests, Method::POST, &jobs_path(""));
        let args = &job["spec"]["template"]["spec"]["containers"][0]["args"];
        assert_eq!(args[0], "replay");
        assert!(args
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "--to-earliest"));
    }

    #[tokio::test]
    async fn a_finished_job_completes_the_request_and_a_completed_request_never_runs_again() {
        let sc = with_request(StreamConsumer::test().finalized(), Some(REPLAY_RUNNING));
        let job = json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "test-replay-fix-1", "namespace": "default",
                         "ownerReferences": [{"apiVersion": "streamops.dev/v1alpha1", "kind": "StreamConsumer",
                                              "name": "test", "uid": sc.metadata.uid.clone().unwrap(), "controller": true}]},
            "status": {"conditions": [{"type": "Complete", "status": "True"}]}
        });
        let steps = pass(
            &sc,
            0,
            0,
            vec![],
            vec![
                Expect::new(Method::GET, jobs_path("test-replay-fix-1"))
                    .reply(Reply::Json(200, job)),
                event("Normal", "ReplayCompleted"),
            ],
            json!({"phase": "Running", "replay": {"requestId": "fix-1", "phase": "Completed"}}),
        );
        run(sc.clone(), steps).await;

        // The next pass: the request is recorded as completed; the workers come back and no Job
        // is looked at or created.
        let mut done = sc.clone();
        done.status.as_mut().unwrap().replay.as_mut().unwrap().phase = REPLAY_COMPLETED.into();
        let mut p = ApplyPass::new(done.clone());
        p.existing = Some(live_deployment(&done, 0));
        p.events = vec!["Scaled"];
        p.status = Some(
            json!({"phase": "Running", "replay": {"requestId": "fix-1", "phase": "Completed"}}),
        );
        let (action, requests) = run(done, p.steps_for_test()).await;
        assert_eq!(action, Action::requeue(Duration::from_secs(300)));
        let d = body_of(&requests, Method::PATCH, &Kind::Deployment.path("test"));
        assert_eq!(d["spec"]["replicas"], 1);
    }
}
