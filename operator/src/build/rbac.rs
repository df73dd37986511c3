use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};

use super::BuildContext;
use crate::names::{worker_rbac_name, Component};

/// The ServiceAccount, Role and RoleBinding of workers that create Jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRbac {
    /// The workers' ServiceAccount.
    pub service_account: ServiceAccount,
    /// create/get/list on `jobs.batch` in the StreamConsumer's namespace.
    pub role: Role,
    /// Binds the Role to the ServiceAccount.
    pub role_binding: RoleBinding,
}

/// RBAC for a pipeline-trigger worker with a `job` trigger; `None` for every other worker (those
/// run without a ServiceAccount token).
pub fn build_worker_rbac(ctx: &BuildContext<'_>) -> Option<WorkerRbac> {
    ctx.creates_jobs().then(|| WorkerRbac {
        service_account: build_service_account(ctx),
        role: build_role(ctx),
        role_binding: build_role_binding(ctx),
    })
}

/// The workers' ServiceAccount.
pub fn build_service_account(ctx: &BuildContext<'_>) -> ServiceAccount {
    ServiceAccount {
        metadata: ctx.child_meta(worker_rbac_name(ctx.name), Component::Rbac),
        ..ServiceAccount::default()
    }
}

/// Lets the workers create Jobs, and read them back, in their own namespace.
pub fn build_role(ctx: &BuildContext<'_>) -> Role {
    Role {
        metadata: ctx.child_meta(worker_rbac_name(ctx.name), Component::Rbac),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["batch".into()]),
            resources: Some(vec!["jobs".into()]),
            verbs: vec!["create".into(), "get".into(), "list".into()],
            ..PolicyRule::default()
        }]),
    }
}

/// Binds [`build_role`] to [`build_service_account`].
pub fn build_role_binding(ctx: &BuildContext<'_>) -> RoleBinding {
    let name = worker_rbac_name(ctx.name);
    RoleBinding {
        metadata: ctx.child_meta(name.clone(), Component::Rbac),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name,
            namespace: Some(ctx.namespace.to_string()),
            ..Subject::default()
        }]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::test_support::with_ctx;
    use streamops_crds::v1alpha1::{HandlerKind, JobTriggerSpec};
    use streamops_crds::StreamConsumer;

    fn job_trigger() -> StreamConsumer {
        StreamConsumer::test_of(HandlerKind::PipelineTrigger).with_spec(|s| {
            let p = s.handler.pipeline_trigger.as_mut().unwrap();
            p.webhook = None;
            p.job = Some(JobTriggerSpec {
                template: serde_json::json!({"template": {"spec": {"restartPolicy": "Never"}}}),
            });
        })
    }

    #[test]
    fn job_trigger_workers_get_a_role_that_creates_jobs_in_their_namespace() {
        let rbac = with_ctx(&job_trigger(), build_worker_rbac).unwrap();
        let rule = &rbac.role.rules.unwrap()[0];
        assert_eq!(rule.api_groups.as_deref(), Some(&["batch".to_string()][..]));
        assert_eq!(rule.resources.as_deref(), Some(&["jobs".to_string()][..]));
        assert_eq!(rule.verbs, vec!["create", "get", "list"]);
        assert_eq!(rbac.role_binding.role_ref.name, "test-worker");
        let subject = &rbac.role_binding.subjects.unwrap()[0];
        assert_eq!(subject.name, "test-worker");
        assert_eq!(subject.namespace.as_deref(), Some("default"));
        assert_eq!(
            rbac.service_account.metadata.name.as_deref(),
            Some("test-worker")
        );
    }

    #[test]
    fn webhook_and_other_handlers_get_no_rbac() {
        for kind in HandlerKind::ALL {
            let sc = StreamConsumer::test_of(kind);
            assert!(with_ctx(&sc, build_worker_rbac).is_none(), "{kind}");
        }
    }
}
