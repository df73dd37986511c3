use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};

use super::BuildContext;
use crate::names::{job_trigger_binding_name, worker_rbac_name, Component};

/// The ServiceAccount and RoleBinding of workers that create Jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRbac {
    /// The workers' ServiceAccount.
    pub service_account: ServiceAccount,
    /// Binds the operator's Job-trigger ClusterRole (create/get/list on `jobs.batch`) to the
    /// ServiceAccount, in the StreamConsumer's namespace only.
    pub role_binding: RoleBinding,
}

/// RBAC for a pipeline-trigger worker with a `job` trigger; `None` for every other worker (those
/// run without a ServiceAccount token).
pub fn build_worker_rbac(ctx: &BuildContext<'_>) -> Option<WorkerRbac> {
    ctx.creates_jobs().then(|| WorkerRbac {
        service_account: build_service_account(ctx),
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

/// Binds the Job-trigger ClusterRole ([`BuildContext::job_trigger_cluster_role`]) to
/// [`build_service_account`] in the StreamConsumer's namespace. The operator itself holds no
/// permission on Jobs: it may only `bind` that one ClusterRole.
pub fn build_role_binding(ctx: &BuildContext<'_>) -> RoleBinding {
    RoleBinding {
        metadata: ctx.child_meta(job_trigger_binding_name(ctx.name), Component::Rbac),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: ctx.job_trigger_cluster_role.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: worker_rbac_name(ctx.name),
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
    fn job_trigger_workers_are_bound_to_the_one_job_trigger_cluster_role_in_their_namespace() {
        let rbac = with_ctx(&job_trigger(), build_worker_rbac).unwrap();
        let binding = &rbac.role_binding;
        assert_eq!(binding.metadata.name.as_deref(), Some("test-job-trigger"));
        assert_eq!(binding.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(binding.role_ref.kind, "ClusterRole");
        assert_eq!(binding.role_ref.name, "streamops-job-trigger");
        let subject = &binding.subjects.as_ref().unwrap()[0];
        assert_eq!(subject.kind, "ServiceAccount");
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
