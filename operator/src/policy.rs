//! The operator's policy: what a StreamConsumer's author may make the operator run on their
//! behalf. Set by the operator's admin in the chart values (`policy.*`), passed as flags.
//!
//! - Worker images: the operator's own worker image, plus those `allowedWorkerImages` lists
//!   (exact, or a prefix ending in `*`). Any other `spec.image` is refused: a worker runs with the
//!   Secrets its StreamConsumer names, and an arbitrary image would run arbitrary code with them
//!   under the operator's name.
//! - Job triggers: off unless the admin turns them on. With them on, a Job template must meet the
//!   restricted Pod Security Standard and may name only the ServiceAccounts listed in
//!   `jobServiceAccounts` ([`streamops_crds::job_template`]).
//!
//! A violation is an invalid spec: nothing is applied, and the `Degraded` condition names the
//! field.

use streamops_crds::job_template::{check_template, JobTemplatePolicy};
use streamops_crds::v1alpha1::StreamConsumerSpec;
use streamops_crds::{FieldError, SpecError};

/// The operator's policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The worker image of StreamConsumers without `spec.image`; always allowed.
    pub default_image: String,
    /// Further images `spec.image` may name: exact, or a prefix ending in `*`.
    pub allowed_images: Vec<String>,
    /// Whether pipeline-trigger may create Jobs.
    pub job_triggers: bool,
    /// ServiceAccounts a Job template may name.
    pub job_service_accounts: Vec<String>,
}

impl Policy {
    /// The strictest policy: only `default_image`, no Job triggers.
    pub fn strict(default_image: impl Into<String>) -> Self {
        Self {
            default_image: default_image.into(),
            allowed_images: Vec::new(),
            job_triggers: false,
            job_service_accounts: Vec::new(),
        }
    }

    /// Whether the workers may run `image`.
    pub fn allows_image(&self, image: &str) -> bool {
        image == self.default_image
            || self
                .allowed_images
                .iter()
                .any(|a| match a.strip_suffix('*') {
                    Some(prefix) => !prefix.is_empty() && image.starts_with(prefix),
                    None => a == image,
                })
    }

    /// Checks `spec` against the policy; every violation names its field.
    pub fn check(&self, spec: &StreamConsumerSpec) -> Result<(), SpecError> {
        let mut errors = Vec::new();
        if let Some(image) = spec.image.as_deref().filter(|i| !i.trim().is_empty()) {
            if !self.allows_image(image) {
                let mut allowed = vec![self.default_image.clone()];
                allowed.extend(self.allowed_images.iter().cloned());
                errors.push(FieldError {
                    field: "spec.image".into(),
                    message: format!(
                        "image {image:?} is not allowed by the operator's policy (chart value policy.allowedWorkerImages); allowed: {}",
                        allowed.join(", ")
                    ),
                });
            }
        }
        let job = spec
            .handler
            .pipeline_trigger
            .as_ref()
            .and_then(|p| p.job.as_ref());
        if let Some(job) = job {
            if !self.job_triggers {
                errors.push(FieldError {
                    field: "spec.handler.pipelineTrigger.job".into(),
                    message: "Job triggers are disabled by the operator's policy (chart value policy.jobTriggers.enabled); use a webhook".into(),
                });
            } else if let Err(violations) = check_template(
                &job.template,
                &JobTemplatePolicy {
                    allowed_service_accounts: self.job_service_accounts.clone(),
                },
            ) {
                errors.extend(violations);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(SpecError { errors })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use streamops_crds::v1alpha1::{HandlerKind, JobTriggerSpec};
    use streamops_crds::StreamConsumer;

    fn job_spec(pod: serde_json::Value) -> StreamConsumerSpec {
        StreamConsumer::test_of(HandlerKind::PipelineTrigger)
            .with_spec(|s| {
                let p = s.handler.pipeline_trigger.as_mut().unwrap();
                p.webhook = None;
                p.job = Some(JobTriggerSpec {
                    template: json!({"template": {"spec": pod}}),
                });
            })
            .spec
    }

    fn fields(r: Result<(), SpecError>) -> Vec<String> {
        r.err()
            .map(|e| e.errors.into_iter().map(|e| e.field).collect())
            .unwrap_or_default()
    }

    #[test]
    fn only_the_operators_worker_image_is_allowed_by_default() {
        let p = Policy::strict("ghcr.io/streamops/streamops-worker:0.1.0");
        let mut spec = StreamConsumer::test().spec;
        assert!(p.check(&spec).is_ok(), "no spec.image");
        spec.image = Some("ghcr.io/streamops/streamops-worker:0.1.0".into());
        assert!(p.check(&spec).is_ok());
        spec.image = Some("attacker.example/miner:latest".into());
        let err = p.check(&spec).unwrap_err();
        assert_eq!(err.first_field(), "spec.image");
        assert!(
            err.to_string().contains("policy.allowedWorkerImages"),
            "{err}"
        );
    }

    #[test]
    fn listed_images_and_prefixes_are_allowed() {
        let p = Policy {
            allowed_images: vec![
                "registry.local/worker:2".into(),
                "registry.local/team-a/*".into(),
                "*".into(),
            ],
            ..Policy::strict("w:1")
        };
        assert!(p.allows_image("registry.local/worker:2"));
        assert!(p.allows_image("registry.local/team-a/worker:9"));
        assert!(!p.allows_image("registry.local/worker:3"));
        assert!(
            !p.allows_image("evil/x"),
            "a bare * is no wildcard for everything"
        );
    }

    #[test]
    fn job_triggers_are_refused_unless_the_admin_enables_them() {
        let spec = job_spec(json!({"containers": [{"name": "c", "image": "i"}]}));
        assert_eq!(
            fields(Policy::strict("w").check(&spec)),
            ["spec.handler.pipelineTrigger.job"]
        );
        let on = Policy {
            job_triggers: true,
            ..Policy::strict("w")
        };
        assert!(on.check(&spec).is_ok());
    }

    #[test]
    fn job_templates_may_name_only_allowed_service_accounts_and_must_be_restricted() {
        let on = Policy {
            job_triggers: true,
            job_service_accounts: vec!["loader".into()],
            ..Policy::strict("w")
        };
        let sa = |name: &str| {
            job_spec(
                json!({"serviceAccountName": name, "containers": [{"name": "c", "image": "i"}]}),
            )
        };
        assert!(on.check(&sa("loader")).is_ok());
        assert_eq!(
            fields(on.check(&sa("operator-admin"))),
            ["spec.handler.pipelineTrigger.job.template.template.spec.serviceAccountName"]
        );
        let privileged =
            job_spec(json!({"hostPID": true, "containers": [{"name": "c", "image": "i"}]}));
        assert_eq!(
            fields(on.check(&privileged)),
            ["spec.handler.pipelineTrigger.job.template.template.spec.hostPID"]
        );
    }
}
