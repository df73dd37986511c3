use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapProjection, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, KeyToPath, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ProjectedVolumeSource, SeccompProfile, SecretKeySelector, SecretProjection, SecurityContext,
    Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use streamops_crds::config::{
    webhook_header_env, Handler, CONFIG_FILE_NAME, CONFIG_MOUNT_DIR, ENV_CONFIG_PATH,
    ENV_DATABASE_URL, ENV_KAFKA_PASSWORD, ENV_KAFKA_USERNAME, ENV_REDIS_URL, TLS_CERT_KEY,
    TLS_KEY_KEY, WORKER_HTTP_PORT,
};

use super::BuildContext;
use crate::names::{
    config_map_name, labels, selector_labels, worker_rbac_name, workload_name, Component,
    CONFIG_HASH_ANNOTATION, HTTP_PORT_NAME, WORKER_CONTAINER,
};

/// Numeric, non-root user and group the workers run as (the distroless `nonroot` user).
pub const POD_USER_ID: i64 = 65532;
/// Projected volume at [`CONFIG_MOUNT_DIR`] with the configuration and the Kafka TLS material.
pub const CONFIG_VOLUME: &str = "config";
const TMP_VOLUME: &str = "tmp";

/// Slack in the termination grace period for what follows the last batch: committing offsets,
/// leaving the group, flushing the error-topic producer.
pub const SHUTDOWN_MARGIN_MS: u64 = 15_000;
/// Allowance for the delay between two attempts of a retried call.
const RETRY_DELAY_ALLOWANCE_MS: u64 = 1_000;
/// Allowance for creating one Kubernetes Job.
const JOB_CREATE_ALLOWANCE_MS: u64 = 10_000;
const MIN_GRACE_SECONDS: i64 = 30;
const MAX_GRACE_SECONDS: i64 = 3_600;

/// The worker Deployment.
///
/// - `replicas` is outside the pod template, so scaling restarts no pods; the template carries the
///   configuration hash ([`CONFIG_HASH_ANNOTATION`]), so a configuration change rolls them.
/// - One projected volume at `/etc/streamops` holds `worker.yaml` and, at the paths the worker
///   configuration names, the Kafka TLS material from its Secrets (`tls/ca/ca.crt`,
///   `tls/client/tls.crt`, `tls/client/tls.key`). One volume rather than Secret volumes nested in
///   the ConfigMap volume, because the runtime cannot create mount points inside a read-only
///   ConfigMap mount.
/// - Secrets reach the worker only as `secretKeyRef` environment variables; the operator never
///   reads them.
/// - Restricted pod security: non-root uid 65532, read-only root filesystem (an `emptyDir` at
///   `/tmp`), no privilege escalation, all capabilities dropped, `RuntimeDefault` seccomp.
/// - Workers that create Jobs run as their own ServiceAccount; every other worker gets no token.
pub fn build_deployment(ctx: &BuildContext<'_>) -> Deployment {
    let creates_jobs = ctx.creates_jobs();
    let mut annotations = BTreeMap::from([
        (CONFIG_HASH_ANNOTATION.to_string(), ctx.config.hash.clone()),
        (
            "kubectl.kubernetes.io/default-container".to_string(),
            WORKER_CONTAINER.to_string(),
        ),
    ]);
    annotations.retain(|_, v| !v.is_empty());

    let pod_spec = PodSpec {
        containers: vec![worker_container(ctx)],
        volumes: Some(volumes(ctx)),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(POD_USER_ID),
            run_as_group: Some(POD_USER_ID),
            fs_group: Some(POD_USER_ID),
            seccomp_profile: Some(runtime_default_seccomp()),
            ..PodSecurityContext::default()
        }),
        service_account_name: creates_jobs.then(|| worker_rbac_name(ctx.name)),
        automount_service_account_token: Some(creates_jobs),
        termination_grace_period_seconds: Some(termination_grace_period_seconds(
            &ctx.config.config.handler,
            ctx.config.config.batch.max_wait_ms,
        )),
        enable_service_links: Some(false),
        ..PodSpec::default()
    };

    Deployment {
        metadata: ctx.child_meta(workload_name(ctx.name), Component::Worker),
        spec: Some(DeploymentSpec {
            replicas: Some(ctx.replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(ctx.name)),
                ..LabelSelector::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            revision_history_limit: Some(5),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(ctx.name, Component::Worker)),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// Seconds between SIGTERM and SIGKILL: long enough for a worker to finish the batch in hand.
///
/// `batch.maxWaitMs` (the batch may still be filling) + the handler's worst case for one call
/// (fraud scoring and webhooks: `timeoutMs × (maxRetries + 1)` plus 1 s between attempts; the job
/// trigger: 10 s to create a Job) + 15 s to commit, leave the group and flush. Rounded up to whole
/// seconds, at least 30 s and at most one hour.
pub fn termination_grace_period_seconds(handler: &Handler, batch_max_wait_ms: u32) -> i64 {
    fn retried(timeout_ms: u32, max_retries: u32) -> u64 {
        let attempts = u64::from(max_retries) + 1;
        u64::from(timeout_ms)
            .saturating_mul(attempts)
            .saturating_add(u64::from(max_retries).saturating_mul(RETRY_DELAY_ALLOWANCE_MS))
    }
    let handler_ms = match handler {
        Handler::MovingAverage(_) | Handler::Sensor(_) => 0,
        Handler::Fraud(f) => retried(f.timeout_ms, f.max_retries),
        Handler::PipelineTrigger(p) => match (&p.webhook, &p.job) {
            (Some(w), _) => retried(w.timeout_ms, w.max_retries),
            (None, Some(_)) => JOB_CREATE_ALLOWANCE_MS,
            (None, None) => 0,
        },
    };
    let total_ms = u64::from(batch_max_wait_ms)
        .saturating_add(handler_ms)
        .saturating_add(SHUTDOWN_MARGIN_MS);
    let seconds = i64::try_from(total_ms.div_ceil(1000)).unwrap_or(MAX_GRACE_SECONDS);
    seconds.clamp(MIN_GRACE_SECONDS, MAX_GRACE_SECONDS)
}

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".into(),
        localhost_profile: None,
    }
}

fn config_path() -> String {
    format!("{CONFIG_MOUNT_DIR}/{CONFIG_FILE_NAME}")
}

fn worker_container(ctx: &BuildContext<'_>) -> Container {
    let http_probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(HTTP_PORT_NAME.into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failures),
        ..Probe::default()
    };
    Container {
        name: WORKER_CONTAINER.into(),
        image: Some(ctx.image.clone()),
        args: Some(vec!["run".into(), "--config".into(), config_path()]),
        env: Some(env(ctx)),
        ports: Some(vec![ContainerPort {
            name: Some(HTTP_PORT_NAME.into()),
            container_port: i32::from(WORKER_HTTP_PORT),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        // Migrations run at start: give the worker two minutes before liveness counts.
        startup_probe: Some(http_probe("/healthz", 5, 24)),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        readiness_probe: Some(http_probe("/readyz", 5, 3)),
        resources: ctx.consumer.spec.resources.clone(),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(POD_USER_ID),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(runtime_default_seccomp()),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(volume_mounts(ctx)),
        ..Container::default()
    }
}

fn env_value(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value),
        value_from: None,
    }
}

fn env_secret(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// Environment: the config path and each secret the worker needs as a `secretKeyRef`.
///
/// No `STREAMOPS_INSTANCE_ID`: the workers are dynamic group members. A Deployment's pods get
/// new names on every rollout, and librdkafka sends no LeaveGroup for a static member, so with
/// the pod name as `group.instance.id` each replaced pod's partitions waited out the session
/// timeout (45 s); as dynamic members they move as soon as the old pod leaves (measured by
/// `streamops-bench rollout`, see `make bench`). A secret the worker does not need (Redis for handlers other
/// than pipeline-trigger, SASL credentials without a SASL protocol) is left out: a reference to a
/// missing Secret would keep the pod from starting.
fn env(ctx: &BuildContext<'_>) -> Vec<EnvVar> {
    let spec = &ctx.consumer.spec;
    let config = &ctx.config.config;
    let mut env = vec![
        env_value(ENV_CONFIG_PATH, config_path()),
        // One JSON object per log line, for the cluster's log pipeline.
        env_value("STREAMOPS_LOG_FORMAT", "json".into()),
    ];
    let pg = &spec.sink.postgres.url_secret_ref;
    env.push(env_secret(ENV_DATABASE_URL, &pg.name, &pg.key));
    if config.handler.needs_redis() {
        if let Some(redis) = &spec.redis {
            let r = &redis.url_secret_ref;
            env.push(env_secret(ENV_REDIS_URL, &r.name, &r.key));
        }
    }
    if config.kafka.sasl_mechanism.is_some() {
        if let Some(sasl) = spec.kafka.security.as_ref().and_then(|s| s.sasl.as_ref()) {
            let c = &sasl.credentials_secret_ref;
            env.push(env_secret(ENV_KAFKA_USERNAME, &c.name, &c.username_key));
            env.push(env_secret(ENV_KAFKA_PASSWORD, &c.name, &c.password_key));
        }
    }
    if let Handler::PipelineTrigger(p) = &config.handler {
        for (i, h) in p
            .webhook
            .iter()
            .flat_map(|w| w.secret_headers.iter())
            .enumerate()
        {
            let r = &h.secret_key_ref;
            env.push(env_secret(&webhook_header_env(i), &r.name, &r.key));
        }
    }
    if let Some(t) = &ctx.tracing {
        env.extend(super::tracing_env(ctx, t));
    }
    env
}

/// A file the worker configuration names, placed in the projected config volume.
struct SecretFile<'a> {
    secret: &'a str,
    key: &'a str,
    /// Absolute path in the container, from the worker configuration.
    path: &'a str,
}

fn tls_files<'a>(ctx: &'a BuildContext<'a>) -> Vec<SecretFile<'a>> {
    let kafka = &ctx.config.config.kafka;
    let tls = ctx
        .consumer
        .spec
        .kafka
        .security
        .as_ref()
        .and_then(|s| s.tls.as_ref());
    let mut files = Vec::new();
    let Some(tls) = tls else { return files };
    if let (Some(path), Some(ca)) = (kafka.ssl_ca_location.as_deref(), tls.ca_secret_ref.as_ref()) {
        files.push(SecretFile {
            secret: &ca.name,
            key: &ca.key,
            path,
        });
    }
    if let Some(secret) = tls.client_cert_secret_name.as_deref() {
        if let Some(path) = kafka.ssl_certificate_location.as_deref() {
            files.push(SecretFile {
                secret,
                key: TLS_CERT_KEY,
                path,
            });
        }
        if let Some(path) = kafka.ssl_key_location.as_deref() {
            files.push(SecretFile {
                secret,
                key: TLS_KEY_KEY,
                path,
            });
        }
    }
    files
}

fn relative_to_config_dir(path: &str) -> Option<&str> {
    path.strip_prefix(CONFIG_MOUNT_DIR)
        .and_then(|p| p.strip_prefix('/'))
        .filter(|p| !p.is_empty())
}

/// The projected config volume (configuration and TLS files), `/tmp`, and, should the worker
/// configuration ever name a TLS path outside `/etc/streamops`, a Secret volume per such file.
fn volumes(ctx: &BuildContext<'_>) -> Vec<Volume> {
    let mut sources = vec![VolumeProjection {
        config_map: Some(ConfigMapProjection {
            name: config_map_name(ctx.name),
            items: Some(vec![KeyToPath {
                key: CONFIG_FILE_NAME.into(),
                path: CONFIG_FILE_NAME.into(),
                mode: None,
            }]),
            optional: Some(false),
        }),
        ..VolumeProjection::default()
    }];
    let mut extra = Vec::new();
    for (i, file) in tls_files(ctx).into_iter().enumerate() {
        match relative_to_config_dir(file.path) {
            Some(rel) => sources.push(secret_projection(file.secret, file.key, rel)),
            None => extra.push(Volume {
                name: format!("tls-{i}"),
                projected: Some(ProjectedVolumeSource {
                    default_mode: Some(0o440),
                    sources: Some(vec![secret_projection(
                        file.secret,
                        file.key,
                        file_name(file.path),
                    )]),
                }),
                ..Volume::default()
            }),
        }
    }
    let mut volumes = vec![
        Volume {
            name: CONFIG_VOLUME.into(),
            projected: Some(ProjectedVolumeSource {
                // Owner and group (fsGroup 65532) may read; nobody else.
                default_mode: Some(0o440),
                sources: Some(sources),
            }),
            ..Volume::default()
        },
        Volume {
            name: TMP_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: None,
                size_limit: Some(Quantity("64Mi".into())),
            }),
            ..Volume::default()
        },
    ];
    volumes.extend(extra);
    volumes
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn secret_projection(secret: &str, key: &str, path: &str) -> VolumeProjection {
    VolumeProjection {
        secret: Some(SecretProjection {
            name: secret.into(),
            items: Some(vec![KeyToPath {
                key: key.into(),
                path: path.into(),
                mode: None,
            }]),
            optional: Some(false),
        }),
        ..VolumeProjection::default()
    }
}

fn volume_mounts(ctx: &BuildContext<'_>) -> Vec<VolumeMount> {
    let mut mounts = vec![
        VolumeMount {
            name: CONFIG_VOLUME.into(),
            mount_path: CONFIG_MOUNT_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: TMP_VOLUME.into(),
            mount_path: "/tmp".into(),
            ..VolumeMount::default()
        },
    ];
    for (i, file) in tls_files(ctx).into_iter().enumerate() {
        if relative_to_config_dir(file.path).is_none() {
            mounts.push(VolumeMount {
                name: format!("tls-{i}"),
                mount_path: file.path.into(),
                sub_path: Some(file_name(file.path).into()),
                read_only: Some(true),
                ..VolumeMount::default()
            });
        }
    }
    mounts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::test_support::with_ctx;
    use crate::build::{BuildContext, RenderedConfig};
    use k8s_openapi::api::core::v1::ResourceRequirements;
    use streamops_crds::v1alpha1::{
        CredentialsSecretRef, HandlerKind, JobTriggerSpec, KafkaSecurity, SaslMechanism, SaslSpec,
        SecretKeyRef, SecurityProtocol, TlsSpec,
    };
    use streamops_crds::StreamConsumer;

    fn pod(d: &Deployment) -> &PodSpec {
        d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    fn container(d: &Deployment) -> &Container {
        &pod(d).containers[0]
    }

    fn env_of<'a>(d: &'a Deployment, name: &str) -> Option<&'a EnvVar> {
        container(d)
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == name)
    }

    fn secret_ref(e: &EnvVar) -> (&str, &str) {
        let s = e
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        (s.name.as_str(), s.key.as_str())
    }

    fn template_hash(d: &Deployment) -> String {
        d.spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()[CONFIG_HASH_ANNOTATION]
            .clone()
    }

    fn secured(protocol: SecurityProtocol) -> StreamConsumer {
        StreamConsumer::test().with_spec(|s| {
            s.kafka.security = Some(KafkaSecurity {
                protocol,
                sasl: Some(SaslSpec {
                    mechanism: SaslMechanism::ScramSha512,
                    credentials_secret_ref: CredentialsSecretRef {
                        name: "kafka-creds".into(),
                        username_key: "user".into(),
                        password_key: "pass".into(),
                    },
                }),
                tls: Some(TlsSpec {
                    ca_secret_ref: Some(SecretKeyRef {
                        name: "kafka-ca".into(),
                        key: "ca.pem".into(),
                    }),
                    client_cert_secret_name: Some("kafka-client".into()),
                }),
            })
        })
    }

    #[test]
    fn worker_runs_under_the_restricted_pod_security_standard() {
        let d = with_ctx(&StreamConsumer::test(), build_deployment);
        let psc = pod(&d).security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.run_as_user, Some(65532));
        assert_eq!(
            psc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        let sc = container(&d).security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        assert_eq!(sc.privileged, Some(false));
    }

    #[test]
    fn worker_reads_the_mounted_config_file() {
        let d = with_ctx(&StreamConsumer::test(), build_deployment);
        let c = container(&d);
        assert_eq!(
            c.args.as_deref().unwrap(),
            ["run", "--config", "/etc/streamops/worker.yaml"]
        );
        assert_eq!(
            env_of(&d, "STREAMOPS_CONFIG").unwrap().value.as_deref(),
            Some("/etc/streamops/worker.yaml")
        );
        let mount = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == CONFIG_VOLUME)
            .unwrap();
        assert_eq!(mount.mount_path, "/etc/streamops");
        assert_eq!(mount.read_only, Some(true));
        let vol = pod(&d)
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == CONFIG_VOLUME)
            .unwrap();
        let cm = vol.projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
            .config_map
            .as_ref()
            .unwrap();
        assert_eq!(cm.name, "test-config");
        assert_eq!(cm.items.as_ref().unwrap()[0].path, "worker.yaml");
    }

    #[test]
    fn workers_are_dynamic_group_members_so_a_rollout_moves_partitions_at_once() {
        for kind in streamops_crds::HandlerKind::ALL {
            let d = with_ctx(&StreamConsumer::test_of(kind), build_deployment);
            assert!(
                env_of(&d, "STREAMOPS_INSTANCE_ID").is_none(),
                "{kind}: a pod-name instance id makes every rollout wait out the session timeout"
            );
        }
    }

    #[test]
    fn workers_log_json() {
        let d = with_ctx(&StreamConsumer::test(), build_deployment);
        let e = env_of(&d, "STREAMOPS_LOG_FORMAT").expect("STREAMOPS_LOG_FORMAT is set");
        assert_eq!(e.value.as_deref(), Some("json"));
    }

    #[test]
    fn database_url_comes_from_the_sink_secret() {
        let d = with_ctx(&StreamConsumer::test(), build_deployment);
        assert_eq!(
            secret_ref(env_of(&d, "STREAMOPS_DATABASE_URL").unwrap()),
            ("pg", "url")
        );
        assert!(env_of(&d, "STREAMOPS_REDIS_URL").is_none());
        assert!(env_of(&d, "STREAMOPS_KAFKA_USERNAME").is_none());
        for e in container(&d).env.as_ref().unwrap() {
            assert!(
                e.value
                    .as_deref()
                    .is_none_or(|v| !v.contains("postgres://")),
                "no secret value inline"
            );
        }
    }

    #[test]
    fn redis_url_comes_from_the_redis_secret_for_pipeline_trigger() {
        let d = with_ctx(
            &StreamConsumer::test_of(HandlerKind::PipelineTrigger),
            build_deployment,
        );
        assert_eq!(
            secret_ref(env_of(&d, "STREAMOPS_REDIS_URL").unwrap()),
            ("redis", "url")
        );
    }

    #[test]
    fn webhook_secret_headers_come_from_their_secrets() {
        let sc = StreamConsumer::test_of(HandlerKind::PipelineTrigger).with_spec(|s| {
            let w = s
                .handler
                .pipeline_trigger
                .as_mut()
                .unwrap()
                .webhook
                .as_mut()
                .unwrap();
            w.secret_headers = vec![streamops_crds::v1alpha1::SecretHeader {
                name: "Authorization".into(),
                secret_key_ref: streamops_crds::v1alpha1::SecretKeyRef {
                    name: "hook-auth".into(),
                    key: "header".into(),
                },
            }];
        });
        let d = with_ctx(&sc, build_deployment);
        assert_eq!(
            secret_ref(env_of(&d, "STREAMOPS_WEBHOOK_HEADER_0").unwrap()),
            ("hook-auth", "header")
        );
        assert!(env_of(&d, "STREAMOPS_WEBHOOK_HEADER_1").is_none());
    }

    #[test]
    fn sasl_credentials_come_from_the_secret_with_the_configured_keys() {
        let d = with_ctx(&secured(SecurityProtocol::SaslSsl), build_deployment);
        assert_eq!(
            secret_ref(env_of(&d, "STREAMOPS_KAFKA_USERNAME").unwrap()),
            ("kafka-creds", "user")
        );
        assert_eq!(
            secret_ref(env_of(&d, "STREAMOPS_KAFKA_PASSWORD").unwrap()),
            ("kafka-creds", "pass")
        );
    }

    #[test]
    fn sasl_credentials_are_left_out_without_a_sasl_protocol() {
        let d = with_ctx(&secured(SecurityProtocol::Ssl), build_deployment);
        assert!(env_of(&d, "STREAMOPS_KAFKA_USERNAME").is_none());
        assert!(env_of(&d, "STREAMOPS_KAFKA_PASSWORD").is_none());
    }

    /// Every TLS path the worker configuration names is a file of the projected volume.
    #[test]
    fn tls_secrets_are_mounted_at_the_paths_the_worker_configuration_names() {
        let sc = secured(SecurityProtocol::SaslSsl);
        let rendered = RenderedConfig::render(&sc).unwrap();
        let ctx = BuildContext::new(&sc, "img", &rendered, 1).unwrap();
        let d = build_deployment(&ctx);
        let vol = pod(&d)
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == CONFIG_VOLUME)
            .unwrap();
        let projected: Vec<(String, String, String)> = vol
            .projected
            .as_ref()
            .unwrap()
            .sources
            .as_ref()
            .unwrap()
            .iter()
            .filter_map(|s| s.secret.as_ref())
            .flat_map(|s| {
                s.items.as_ref().unwrap().iter().map(|i| {
                    (
                        s.name.clone(),
                        i.key.clone(),
                        format!("/etc/streamops/{}", i.path),
                    )
                })
            })
            .collect();
        let k = &rendered.config.kafka;
        assert_eq!(
            k.ssl_ca_location.as_deref(),
            Some("/etc/streamops/tls/ca/ca.crt")
        );
        assert_eq!(
            projected,
            vec![
                (
                    "kafka-ca".into(),
                    "ca.pem".into(),
                    k.ssl_ca_location.clone().unwrap()
                ),
                (
                    "kafka-client".into(),
                    "tls.crt".into(),
                    k.ssl_certificate_location.clone().unwrap()
                ),
                (
                    "kafka-client".into(),
                    "tls.key".into(),
                    k.ssl_key_location.clone().unwrap()
                ),
            ]
        );
        assert_eq!(
            k.ssl_certificate_location.as_deref(),
            Some("/etc/streamops/tls/client/tls.crt")
        );
        assert_eq!(vol.projected.as_ref().unwrap().default_mode, Some(0o440));
    }

    #[test]
    fn tls_secrets_are_not_mounted_for_plaintext() {
        let d = with_ctx(&secured(SecurityProtocol::SaslPlaintext), build_deployment);
        let vol = pod(&d)
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == CONFIG_VOLUME)
            .unwrap();
        let secrets = vol
            .projected
            .as_ref()
            .unwrap()
            .sources
            .as_ref()
            .unwrap()
            .iter()
            .filter(|s| s.secret.is_some())
            .count();
        assert_eq!(secrets, 0);
        assert_eq!(pod(&d).volumes.as_ref().unwrap().len(), 2);
    }

    #[test]
    fn probes_use_the_named_http_port() {
        let d = with_ctx(&StreamConsumer::test(), build_deployment);
        let c = container(&d);
        let port = &c.ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.container_port),
            (Some("http"), 8080)
        );
        let get = |p: &Option<Probe>| {
            let h = p.as_ref().unwrap().http_get.as_ref().unwrap();
            (h.path.clone().unwrap(), h.port.clone())
        };
        assert_eq!(
            get(&c.liveness_probe),
            ("/healthz".into(), IntOrString::String("http".into()))
        );
        assert_eq!(
            get(&c.readiness_probe),
            ("/readyz".into(), IntOrString::String("http".into()))
        );
    }

    #[test]
    fn resources_come_from_the_spec() {
        let res = ResourceRequirements {
            limits: Some([("memory".to_string(), Quantity("256Mi".into()))].into()),
            requests: Some([("cpu".to_string(), Quantity("100m".into()))].into()),
            ..ResourceRequirements::default()
        };
        let sc = StreamConsumer::test().with_spec(|s| s.resources = Some(res.clone()));
        let d = with_ctx(&sc, build_deployment);
        assert_eq!(container(&d).resources, Some(res));
    }

    #[test]
    fn workers_without_jobs_get_no_service_account_token() {
        for kind in HandlerKind::ALL {
            let d = with_ctx(&StreamConsumer::test_of(kind), build_deployment);
            assert_eq!(
                pod(&d).automount_service_account_token,
                Some(false),
                "{kind}"
            );
            assert_eq!(pod(&d).service_account_name, None);
        }
    }

    #[test]
    fn job_trigger_workers_run_as_their_own_service_account() {
        let sc = StreamConsumer::test_of(HandlerKind::PipelineTrigger).with_spec(|s| {
            let p = s.handler.pipeline_trigger.as_mut().unwrap();
            p.webhook = None;
            p.job = Some(JobTriggerSpec {
                template: serde_json::json!({"template": {}}),
            });
        });
        let d = with_ctx(&sc, build_deployment);
        assert_eq!(pod(&d).automount_service_account_token, Some(true));
        assert_eq!(pod(&d).service_account_name.as_deref(), Some("test-worker"));
    }

    #[test]
    fn config_change_changes_the_template_hash() {
        let a = with_ctx(&StreamConsumer::test(), build_deployment);
        let b = with_ctx(
            &StreamConsumer::test().with_spec(|s| s.kafka.topics.push("more".into())),
            build_deployment,
        );
        assert_ne!(template_hash(&a), template_hash(&b));
        assert_ne!(
            a.spec.as_ref().unwrap().template,
            b.spec.as_ref().unwrap().template
        );
    }

    #[test]
    fn replicas_only_change_leaves_the_pod_template_identical() {
        let a = with_ctx(&StreamConsumer::test().with_replicas(1), build_deployment);
        let b = with_ctx(&StreamConsumer::test().with_replicas(4), build_deployment);
        assert_eq!(
            a.spec.as_ref().unwrap().template,
            b.spec.as_ref().unwrap().template
        );
        assert_eq!(a.spec.as_ref().unwrap().replicas, Some(1));
        assert_eq!(b.spec.as_ref().unwrap().replicas, Some(4));
    }

    #[test]
    fn template_hash_is_the_hash_of_the_config_map_contents() {
        let sc = StreamConsumer::test();
        let d = with_ctx(&sc, build_deployment);
        let cm = with_ctx(&sc, crate::build::build_config_map);
        assert_eq!(
            template_hash(&d),
            crate::build::config_hash(&cm.data.unwrap()["worker.yaml"])
        );
    }

    #[test]
    fn selector_is_a_subset_of_the_pod_labels() {
        let d = with_ctx(&StreamConsumer::test(), build_deployment);
        let spec = d.spec.as_ref().unwrap();
        let pod_labels = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        for (k, v) in spec.selector.match_labels.as_ref().unwrap() {
            assert_eq!(pod_labels.get(k), Some(v));
        }
    }

    #[test]
    fn grace_period_is_at_least_thirty_seconds() {
        let cfg = RenderedConfig::render(&StreamConsumer::test())
            .unwrap()
            .config;
        assert_eq!(termination_grace_period_seconds(&cfg.handler, 100), 30);
    }

    #[test]
    fn grace_period_covers_the_batch_wait_and_retried_handler_calls() {
        // Webhook defaults: 5 s timeout, 5 retries -> 6 × 5 s + 5 × 1 s = 35 s;
        // + 100 ms batch wait + 15 s margin = 50.1 s -> 51 s.
        let cfg = RenderedConfig::render(&StreamConsumer::test_of(HandlerKind::PipelineTrigger))
            .unwrap()
            .config;
        assert_eq!(termination_grace_period_seconds(&cfg.handler, 100), 51);
        // A long batch wait alone: 60 s + 15 s.
        let ma = RenderedConfig::render(&StreamConsumer::test())
            .unwrap()
            .config;
        assert_eq!(termination_grace_period_seconds(&ma.handler, 60_000), 75);
    }

    #[test]
    fn grace_period_is_capped_at_one_hour() {
        let sc = StreamConsumer::test_of(HandlerKind::Fraud).with_spec(|s| {
            let f = s.handler.fraud.as_mut().unwrap();
            f.timeout_ms = 600_000;
            f.max_retries = 20;
        });
        let cfg = RenderedConfig::render(&sc).unwrap().config;
        assert_eq!(termination_grace_period_seconds(&cfg.handler, 100), 3600);
    }

    #[test]
    fn deployment_sets_the_grace_period_from_the_spec() {
        let sc = StreamConsumer::test().with_spec(|s| s.batch.max_wait_ms = 60_000);
        let d = with_ctx(&sc, build_deployment);
        assert_eq!(pod(&d).termination_grace_period_seconds, Some(75));
    }
}
