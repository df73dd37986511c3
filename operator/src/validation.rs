//! The reconciler's own look at a StreamConsumer before it builds anything: the name (it names a
//! Service and is a label value), `validate_spec`, and the CRD's CEL rules, for objects that reached
//! the cluster past an older CRD or with validation off.

use std::sync::LazyLock;

use kube::core::cel::{compile_schema, CompiledSchema, ValidationErrors, Validator};
use streamops_crds::validate::FieldError;
use streamops_crds::{validate_spec, StreamConsumer};

/// Longest StreamConsumer name: it is a Service name and a label value.
pub const MAX_NAME_LEN: usize = 63;

/// Every invalid field of a StreamConsumer: the API crate's error, so the reconciler and the
/// worker report invalid specs the same way.
pub type InvalidSpec = streamops_crds::SpecError;

/// A DNS-1035 label: lowercase letters, digits and `-`, starting with a letter, ending with a letter
/// or digit, at most 63 characters.
pub fn is_dns1035_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME_LEN
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// [`validate_object`], then the operator's [`Policy`](crate::policy::Policy): every error of
/// both, each naming its field.
pub fn validate_with_policy(
    sc: &StreamConsumer,
    policy: &crate::policy::Policy,
) -> Result<(), InvalidSpec> {
    let mut errors = validate_object(sc)
        .err()
        .map(|e| e.errors)
        .unwrap_or_default();
    if let Err(e) = policy.check(&sc.spec) {
        for error in e.errors {
            if !errors.contains(&error) {
                errors.push(error);
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(InvalidSpec { errors })
    }
}

/// Validates a StreamConsumer; each error names its field.
pub fn validate_object(sc: &StreamConsumer) -> Result<(), InvalidSpec> {
    let mut errors = Vec::new();
    let name = sc.metadata.name.as_deref().unwrap_or_default();
    if !is_dns1035_label(name) {
        errors.push(FieldError {
            field: "metadata.name".into(),
            message: format!(
                "{name:?} must be a DNS-1035 label (at most {MAX_NAME_LEN} lowercase letters, \
                 digits and '-', starting with a letter): it names the worker Service"
            ),
        });
    }
    if let Err(e) = validate_spec(&sc.spec) {
        errors.extend(e.errors);
    }
    if let Err(cel) = validate_cel(sc) {
        for e in cel.into_vec() {
            let field = if e.field_path.is_empty() {
                "spec".to_string()
            } else {
                e.field_path.clone()
            };
            let error = FieldError {
                field,
                message: e.message.clone(),
            };
            if !errors.contains(&error) {
                errors.push(error);
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(InvalidSpec { errors })
    }
}

/// The CRD's CEL rules (`x-kubernetes-validations`), compiled once per process. The derived
/// `StreamConsumer::validate_cel` generates the whole CRD and compiles every rule on each call;
/// at a thousand StreamConsumers that was most of the operator's CPU.
static CEL_RULES: LazyLock<CompiledSchema> =
    LazyLock::new(|| compile_schema(&streamops_crds::strict::open_api_schema()));

thread_local! {
    /// A CEL evaluator with the Kubernetes functions registered (not shareable across threads).
    static CEL: Validator = Validator::new();
}

/// The CRD's CEL rules against `sc`, as the API server checks them on create (no `oldSelf`).
fn validate_cel(sc: &StreamConsumer) -> Result<(), ValidationErrors> {
    let object = match serde_json::to_value(sc) {
        Ok(object) => object,
        // A typed StreamConsumer always serializes; if it ever did not, the rules cannot run and
        // validate_spec still has.
        Err(_) => return Ok(()),
    };
    CEL.with(|cel| cel.validate_compiled(&CEL_RULES, &object, None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use streamops_crds::v1alpha1::HandlerKind;

    #[test]
    fn example_specs_of_every_kind_are_valid() {
        for kind in HandlerKind::ALL {
            validate_object(&StreamConsumer::test_of(kind)).unwrap();
        }
    }

    #[test]
    fn invalid_spec_names_the_field() {
        let sc = StreamConsumer::test().with_spec(|s| s.kafka.group_id = String::new());
        let e = validate_object(&sc).unwrap_err();
        assert_eq!(e.first_field(), "spec.kafka.groupId");
        assert!(e.to_string().starts_with("spec.kafka.groupId: "), "{e}");
    }

    #[test]
    fn cel_rules_are_checked_too() {
        // validate_spec and the CEL rule both catch a pipeline-trigger without redis.
        let sc =
            StreamConsumer::test_of(HandlerKind::PipelineTrigger).with_spec(|s| s.redis = None);
        let e = validate_object(&sc).unwrap_err();
        let fields: Vec<_> = e.errors.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"spec.redis"), "{fields:?}");
        assert!(
            e.errors
                .iter()
                .any(|e| e.message.contains("spec.redis is required")),
            "the CEL message is reported: {e}"
        );
    }

    /// What the rules compiled once report is what the derived `validate_cel` (which generates the
    /// CRD and compiles the rules on every call) reports, for valid specs of every kind and for
    /// specs each rule rejects.
    #[test]
    fn compiled_cel_rules_report_what_the_derived_validation_reports() {
        use streamops_crds::v1alpha1::SensorSettings;
        let mut cases: Vec<StreamConsumer> = HandlerKind::ALL
            .iter()
            .map(|k| StreamConsumer::test_of(*k))
            .collect();
        cases.push(
            StreamConsumer::test_of(HandlerKind::PipelineTrigger).with_spec(|s| s.redis = None),
        );
        cases.push(
            StreamConsumer::test()
                .with_spec(|s| s.handler.sensor = Some(SensorSettings::default())),
        );
        cases.push(
            StreamConsumer::test_of(HandlerKind::Fraud).with_spec(|s| s.handler.fraud = None),
        );
        let mut rejected = 0;
        for sc in &cases {
            let summary = |r: Result<(), ValidationErrors>| -> Vec<(String, String)> {
                r.err()
                    .map(|e| {
                        e.into_vec()
                            .into_iter()
                            .map(|e| (e.field_path, e.message))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let compiled = summary(validate_cel(sc));
            assert_eq!(
                compiled,
                summary(sc.validate_cel()),
                "{:?}",
                sc.spec.handler
            );
            rejected += usize::from(!compiled.is_empty());
        }
        assert_eq!(rejected, 3, "each invalid case is rejected by a CEL rule");
    }

    #[test]
    fn names_that_cannot_name_a_service_are_rejected() {
        for bad in ["1abc", "a.b", "Abc", "abc-", &"a".repeat(64)] {
            let mut sc = StreamConsumer::test();
            sc.metadata.name = Some(bad.to_string());
            let e = validate_object(&sc).unwrap_err();
            assert_eq!(e.first_field(), "metadata.name", "{bad}");
        }
        for good in ["a", "orders-1", &"a".repeat(63)] {
            assert!(is_dns1035_label(good), "{good}");
        }
    }
}
