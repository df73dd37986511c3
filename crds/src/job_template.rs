//! Job templates of the pipeline-trigger handler (`spec.handler.pipelineTrigger.job.template`).
//!
//! A StreamConsumer's author must not be able to run, through the workers, a pod they could not
//! run themselves. So a template must parse as a `batch/v1` JobSpec, its pod must meet the
//! restricted Pod Security Standard, and it may name only a ServiceAccount that the operator's
//! policy allows. The CRD's CEL rules reject what CEL can express; [`check_template`] is the
//! second look (the operator and the worker both run it), and names the offending field.
//!
//! [`harden`] fills in what a template leaves unset with the restricted values (non-root,
//! no privilege escalation, every capability dropped, the runtime's default seccomp profile), so
//! a short template still yields a restricted pod.

use k8s_openapi::api::batch::v1::JobSpec;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, PodSecurityContext, PodSpec, SeccompProfile, SecurityContext,
};

use crate::validate::FieldError;

/// Path of the template in the spec; every error names a field below it.
pub const TEMPLATE_FIELD: &str = "spec.handler.pipelineTrigger.job.template";

/// Volume sources the restricted Pod Security Standard allows.
const RESTRICTED_VOLUMES: [&str; 8] = [
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
];

/// Parses a template as a JobSpec; an error names the field that does not fit.
pub fn parse_template(template: &serde_json::Value) -> Result<JobSpec, FieldError> {
    if !template.is_object() {
        return Err(FieldError {
            field: TEMPLATE_FIELD.into(),
            message: "must be a batch/v1 JobSpec object".into(),
        });
    }
    serde_path_to_error::deserialize::<_, JobSpec>(template).map_err(|e| {
        let path = e.path().to_string();
        let field = if path.is_empty() || path == "." {
            TEMPLATE_FIELD.to_string()
        } else {
            format!("{TEMPLATE_FIELD}.{path}")
        };
        FieldError {
            field,
            message: format!("not a valid batch/v1 JobSpec field: {}", e.inner()),
        }
    })
}

/// Every way `job` breaks the restricted Pod Security Standard, each naming its field.
pub fn restricted_violations(job: &JobSpec) -> Vec<FieldError> {
    let mut out = Vec::new();
    let Some(pod) = job.template.spec.as_ref() else {
        return out;
    };
    let base = format!("{TEMPLATE_FIELD}.template.spec");
    let mut deny = |ok: bool, field: String, message: &str| {
        if !ok {
            out.push(FieldError {
                field,
                message: format!("{message} (restricted Pod Security Standard)"),
            });
        }
    };
    deny(
        pod.host_network != Some(true),
        format!("{base}.hostNetwork"),
        "host networking is not allowed",
    );
    deny(
        pod.host_pid != Some(true),
        format!("{base}.hostPID"),
        "the host PID namespace is not allowed",
    );
    deny(
        pod.host_ipc != Some(true),
        format!("{base}.hostIPC"),
        "the host IPC namespace is not allowed",
    );
    for (i, v) in pod.volumes.iter().flatten().enumerate() {
        let source = serde_json::to_value(v).ok();
        let kinds: Vec<String> = source
            .as_ref()
            .and_then(|s| s.as_object())
            .map(|o| o.keys().filter(|k| *k != "name").cloned().collect())
            .unwrap_or_default();
        for kind in kinds {
            deny(
                RESTRICTED_VOLUMES.contains(&kind.as_str()),
                format!("{base}.volumes[{i}].{kind}"),
                &format!("{kind} volumes are not allowed"),
            );
        }
    }
    if let Some(sc) = &pod.security_context {
        deny(
            sc.run_as_non_root != Some(false),
            format!("{base}.securityContext.runAsNonRoot"),
            "runAsNonRoot must not be false",
        );
        deny(
            sc.run_as_user != Some(0),
            format!("{base}.securityContext.runAsUser"),
            "running as root (runAsUser 0) is not allowed",
        );
        deny(
            sc.seccomp_profile
                .as_ref()
                .is_none_or(|p| p.type_ != "Unconfined"),
            format!("{base}.securityContext.seccompProfile.type"),
            "an Unconfined seccomp profile is not allowed",
        );
    }
    let groups: [(&str, Vec<&Container>); 2] = [
        ("containers", pod.containers.iter().collect()),
        (
            "initContainers",
            pod.init_containers.iter().flatten().collect(),
        ),
    ];
    for (group, containers) in groups {
        for (i, c) in containers.into_iter().enumerate() {
            container_violations(c, &format!("{base}.{group}[{i}]"), &mut deny);
        }
    }
    for (i, c) in pod.ephemeral_containers.iter().flatten().enumerate() {
        let field = format!("{base}.ephemeralContainers[{i}]");
        if let Some(sc) = &c.security_context {
            security_context_violations(sc, &field, &mut deny);
        }
    }
    out
}

fn container_violations(c: &Container, field: &str, deny: &mut impl FnMut(bool, String, &str)) {
    for (j, p) in c.ports.iter().flatten().enumerate() {
        deny(
            p.host_port.unwrap_or(0) == 0,
            format!("{field}.ports[{j}].hostPort"),
            "host ports are not allowed",
        );
    }
    if let Some(sc) = &c.security_context {
        security_context_violations(sc, field, deny);
    }
}

fn security_context_violations(
    sc: &SecurityContext,
    field: &str,
    deny: &mut impl FnMut(bool, String, &str),
) {
    let field = format!("{field}.securityContext");
    deny(
        sc.privileged != Some(true),
        format!("{field}.privileged"),
        "privileged containers are not allowed",
    );
    deny(
        sc.allow_privilege_escalation != Some(true),
        format!("{field}.allowPrivilegeEscalation"),
        "privilege escalation is not allowed",
    );
    deny(
        sc.run_as_non_root != Some(false),
        format!("{field}.runAsNonRoot"),
        "runAsNonRoot must not be false",
    );
    deny(
        sc.run_as_user != Some(0),
        format!("{field}.runAsUser"),
        "running as root (runAsUser 0) is not allowed",
    );
    deny(
        sc.capabilities
            .as_ref()
            .and_then(|c| c.add.as_ref())
            .is_none_or(Vec::is_empty),
        format!("{field}.capabilities.add"),
        "added capabilities are not allowed",
    );
    deny(
        sc.proc_mount.as_deref().is_none_or(|m| m == "Default"),
        format!("{field}.procMount"),
        "an unmasked /proc is not allowed",
    );
    deny(
        sc.seccomp_profile
            .as_ref()
            .is_none_or(|p| p.type_ != "Unconfined"),
        format!("{field}.seccompProfile.type"),
        "an Unconfined seccomp profile is not allowed",
    );
}

/// Who may run the pods of Job templates: the ServiceAccounts a template may name. A template
/// that names none runs as the namespace's `default` ServiceAccount.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobTemplatePolicy {
    /// ServiceAccount names a template may set in `template.spec.serviceAccountName`.
    pub allowed_service_accounts: Vec<String>,
}

/// Parses `template` and checks it against the restricted Pod Security Standard and `policy`.
/// Returns the JobSpec, or every violation with its field.
pub fn check_template(
    template: &serde_json::Value,
    policy: &JobTemplatePolicy,
) -> Result<JobSpec, Vec<FieldError>> {
    let job = parse_template(template).map_err(|e| vec![e])?;
    let mut errors = restricted_violations(&job);
    let pod = job.template.spec.as_ref();
    for (field, sa) in [
        (
            "serviceAccountName",
            pod.and_then(|p| p.service_account_name.as_deref()),
        ),
        (
            "serviceAccount",
            pod.and_then(|p| p.service_account.as_deref()),
        ),
    ] {
        if let Some(sa) = sa.filter(|s| !s.is_empty()) {
            if !policy.allowed_service_accounts.iter().any(|a| a == sa) {
                errors.push(FieldError {
                    field: format!("{TEMPLATE_FIELD}.template.spec.{field}"),
                    message: if policy.allowed_service_accounts.is_empty() {
                        format!("ServiceAccount {sa:?} is not allowed: the operator's policy allows Job templates no ServiceAccount of their own")
                    } else {
                        format!(
                            "ServiceAccount {sa:?} is not allowed; the operator's policy allows {}",
                            policy.allowed_service_accounts.join(", ")
                        )
                    },
                });
            }
        }
    }
    if errors.is_empty() {
        Ok(job)
    } else {
        Err(errors)
    }
}

/// Fills in the restricted values a template leaves unset: `runAsNonRoot: true` and the
/// `RuntimeDefault` seccomp profile on the pod, `allowPrivilegeEscalation: false` and every
/// capability dropped on each container. Values a template sets are kept ([`check_template`]
/// refuses the ones that break the standard).
pub fn harden(job: &mut JobSpec) {
    let Some(pod) = job.template.spec.as_mut() else {
        return;
    };
    harden_pod(pod);
}

fn harden_pod(pod: &mut PodSpec) {
    let sc = pod
        .security_context
        .get_or_insert_with(PodSecurityContext::default);
    sc.run_as_non_root.get_or_insert(true);
    sc.seccomp_profile.get_or_insert_with(|| SeccompProfile {
        type_: "RuntimeDefault".into(),
        ..SeccompProfile::default()
    });
    let containers = pod
        .containers
        .iter_mut()
        .chain(pod.init_containers.iter_mut().flatten());
    for c in containers {
        let sc = c
            .security_context
            .get_or_insert_with(SecurityContext::default);
        sc.allow_privilege_escalation.get_or_insert(false);
        let caps = sc.capabilities.get_or_insert_with(Capabilities::default);
        let drop = caps.drop.get_or_insert_with(Vec::new);
        if !drop.iter().any(|d| d == "ALL") {
            drop.push("ALL".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn template(pod: serde_json::Value) -> serde_json::Value {
        json!({"template": {"spec": pod}})
    }

    fn container(extra: serde_json::Value) -> serde_json::Value {
        let mut c = json!({"name": "load", "image": "loader:1"});
        if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            c.extend(extra.clone());
        }
        c
    }

    fn fields(template: serde_json::Value) -> Vec<String> {
        match check_template(&template, &JobTemplatePolicy::default()) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.into_iter().map(|e| e.field).collect(),
        }
    }

    fn plain() -> serde_json::Value {
        template(json!({"restartPolicy": "Never", "containers": [container(json!({}))]}))
    }

    #[test]
    fn a_plain_template_is_accepted() {
        assert_eq!(fields(plain()), Vec::<String>::new());
    }

    #[test]
    fn a_template_that_is_not_a_job_spec_names_the_field() {
        let err =
            parse_template(&json!({"template": {"spec": {"containers": "nope"}}})).unwrap_err();
        assert_eq!(
            err.field,
            "spec.handler.pipelineTrigger.job.template.template.spec.containers"
        );
        let err = parse_template(&json!("x")).unwrap_err();
        assert_eq!(err.field, TEMPLATE_FIELD);
        let err = parse_template(&json!({"backoffLimit": "three"})).unwrap_err();
        assert_eq!(err.field, format!("{TEMPLATE_FIELD}.backoffLimit"));
    }

    #[test]
    fn host_namespaces_are_refused() {
        for key in ["hostNetwork", "hostPID", "hostIPC"] {
            let t = template(json!({key: true, "containers": [container(json!({}))]}));
            assert_eq!(
                fields(t),
                [format!("{TEMPLATE_FIELD}.template.spec.{key}")],
                "{key}"
            );
        }
    }

    #[test]
    fn host_path_and_other_non_restricted_volumes_are_refused() {
        let t = template(json!({
            "containers": [container(json!({}))],
            "volumes": [
                {"name": "ok", "emptyDir": {}},
                {"name": "root", "hostPath": {"path": "/"}},
                {"name": "nfs", "nfs": {"server": "x", "path": "/"}}
            ]
        }));
        assert_eq!(
            fields(t),
            [
                format!("{TEMPLATE_FIELD}.template.spec.volumes[1].hostPath"),
                format!("{TEMPLATE_FIELD}.template.spec.volumes[2].nfs"),
            ]
        );
    }

    #[test]
    fn privileged_escalating_root_and_capable_containers_are_refused() {
        let sc = |v: serde_json::Value| {
            template(json!({"containers": [container(json!({"securityContext": v}))]}))
        };
        let c = format!("{TEMPLATE_FIELD}.template.spec.containers[0].securityContext");
        assert_eq!(
            fields(sc(json!({"privileged": true}))),
            [format!("{c}.privileged")]
        );
        assert_eq!(
            fields(sc(json!({"allowPrivilegeEscalation": true}))),
            [format!("{c}.allowPrivilegeEscalation")]
        );
        assert_eq!(
            fields(sc(json!({"runAsUser": 0}))),
            [format!("{c}.runAsUser")]
        );
        assert_eq!(
            fields(sc(json!({"runAsNonRoot": false}))),
            [format!("{c}.runAsNonRoot")]
        );
        assert_eq!(
            fields(sc(json!({"capabilities": {"add": ["SYS_ADMIN"]}}))),
            [format!("{c}.capabilities.add")]
        );
        assert_eq!(
            fields(sc(json!({"runAsUser": 1000, "privileged": false}))),
            Vec::<String>::new()
        );
        let init = template(json!({
            "containers": [container(json!({}))],
            "initContainers": [container(json!({"securityContext": {"privileged": true}}))]
        }));
        assert_eq!(
            fields(init),
            [format!(
                "{TEMPLATE_FIELD}.template.spec.initContainers[0].securityContext.privileged"
            )]
        );
    }

    #[test]
    fn pod_level_root_and_host_ports_are_refused() {
        let t = template(json!({
            "securityContext": {"runAsUser": 0},
            "containers": [container(json!({"ports": [{"containerPort": 80, "hostPort": 80}]}))]
        }));
        assert_eq!(
            fields(t),
            [
                format!("{TEMPLATE_FIELD}.template.spec.securityContext.runAsUser"),
                format!("{TEMPLATE_FIELD}.template.spec.containers[0].ports[0].hostPort"),
            ]
        );
    }

    #[test]
    fn only_service_accounts_the_policy_allows_may_be_named() {
        let t = template(
            json!({"serviceAccountName": "cluster-admin-sa", "containers": [container(json!({}))]}),
        );
        let none = check_template(&t, &JobTemplatePolicy::default()).unwrap_err();
        assert_eq!(
            none[0].field,
            format!("{TEMPLATE_FIELD}.template.spec.serviceAccountName")
        );
        let policy = JobTemplatePolicy {
            allowed_service_accounts: vec!["loader".into()],
        };
        assert!(check_template(&t, &policy).is_err());
        let ok =
            template(json!({"serviceAccountName": "loader", "containers": [container(json!({}))]}));
        assert!(check_template(&ok, &policy).is_ok());
    }

    #[test]
    fn hardening_fills_in_the_restricted_values_and_keeps_what_is_set() {
        let mut job = check_template(&plain(), &JobTemplatePolicy::default()).unwrap();
        harden(&mut job);
        let pod = job.template.spec.as_ref().unwrap();
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(
            psc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        let sc = pod.containers[0].security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        assert!(restricted_violations(&job).is_empty());

        let mut job = parse_template(&template(json!({
            "securityContext": {"runAsUser": 1000},
            "containers": [container(json!({"securityContext": {"capabilities": {"drop": ["NET_RAW"]}}}))]
        })))
        .unwrap();
        harden(&mut job);
        let pod = job.template.spec.as_ref().unwrap();
        assert_eq!(
            pod.security_context.as_ref().unwrap().run_as_user,
            Some(1000)
        );
        let caps = pod.containers[0]
            .security_context
            .as_ref()
            .unwrap()
            .capabilities
            .as_ref();
        assert_eq!(
            caps.unwrap().drop.as_deref(),
            Some(&["NET_RAW".to_string(), "ALL".to_string()][..])
        );
    }
}
