//! Strict field validation of a StreamConsumer manifest, as the API server's
//! `fieldValidation=Strict` does: every field that the CRD's structural schema does not declare is
//! an error naming its path, so a typo (`autoOfsetReset`, `windw`, `replicaz`) fails a local
//! `streamops-worker run --spec` instead of being ignored.

use kube::CustomResourceExt;
use serde_json::Value;

use crate::v1alpha1::StreamConsumer;

/// Fields of `metadata` (ObjectMeta) that the API server accepts.
const OBJECT_META: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

/// The CRD's `openAPIV3Schema` (of its one version) as JSON; `null` if the derived CRD had none.
/// It generates the whole CRD: callers that need it often should keep what they derive from it.
pub fn open_api_schema() -> Value {
    StreamConsumer::crd()
        .spec
        .versions
        .first()
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .and_then(|s| serde_json::to_value(s).ok())
        .unwrap_or(Value::Null)
}

/// One field the schema does not declare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownField {
    /// Path such as `spec.kafka.autoOfsetReset` (list items as `topics[0]`).
    pub path: String,
    /// A declared sibling with a similar name, if any.
    pub suggestion: Option<String>,
}

impl std::fmt::Display for UnknownField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unknown field \"{}\"", self.path)?;
        if let Some(s) = &self.suggestion {
            write!(f, " (did you mean \"{s}\"?)")?;
        }
        Ok(())
    }
}

/// The fields of a StreamConsumer document (`apiVersion`, `kind`, `metadata`, `spec`, ...) that
/// the CRD schema of this build does not declare, sorted by path.
pub fn unknown_fields(doc: &Value) -> Vec<UnknownField> {
    let schema = open_api_schema();
    let mut out = Vec::new();
    let Some(obj) = doc.as_object() else {
        return out;
    };
    for (k, v) in obj {
        match k.as_str() {
            "apiVersion" | "kind" => {}
            "metadata" => {
                if let Some(m) = v.as_object() {
                    for mk in m.keys() {
                        if !OBJECT_META.contains(&mk.as_str()) {
                            out.push(UnknownField {
                                path: format!("metadata.{mk}"),
                                suggestion: closest(mk, OBJECT_META.iter().copied()),
                            });
                        }
                    }
                }
            }
            _ => match schema.get("properties").and_then(|p| p.get(k)) {
                Some(s) => walk(v, s, k, &mut out),
                None => out.push(UnknownField {
                    path: k.clone(),
                    suggestion: closest(
                        k,
                        ["apiVersion", "kind", "metadata", "spec", "status"].into_iter(),
                    ),
                }),
            },
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

fn walk(v: &Value, schema: &Value, path: &str, out: &mut Vec<UnknownField>) {
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return;
    }
    match v {
        Value::Object(obj) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, child) in obj {
                    let p = format!("{path}.{k}");
                    match props.get(k) {
                        Some(s) => walk(child, s, &p, out),
                        None => out.push(UnknownField {
                            path: p,
                            suggestion: closest(k, props.keys().map(String::as_str)),
                        }),
                    }
                }
            } else if let Some(additional) = schema.get("additionalProperties") {
                if additional.is_object() {
                    for (k, child) in obj {
                        walk(child, additional, &format!("{path}.{k}"), out);
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for (i, child) in items.iter().enumerate() {
                    walk(child, s, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

/// The candidate closest to `name` by edit distance (case-insensitive), if close enough to be a
/// likely typo.
fn closest<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    candidates
        .map(|c| (distance(&lower, &c.to_ascii_lowercase()), c))
        .filter(|(d, c)| *d <= (c.len() / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.to_string())
}

/// Levenshtein distance.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(yaml: &str) -> Value {
        serde_yaml::from_str(yaml).unwrap()
    }

    const GOOD: &str = r#"
apiVersion: streamops.dev/v1alpha1
kind: StreamConsumer
metadata: {name: a, labels: {x: y}}
spec:
  replicas: 1
  kafka: {bootstrapServers: "k:9092", topics: [t], groupId: g, autoOffsetReset: latest}
  handler:
    kind: pipeline-trigger
    pipelineTrigger:
      pipelineName: p
      maxEvents: 1
      maxTimeSeconds: 1
      webhook: {url: "http://h", headers: {X-Anything: v}}
  sink: {postgres: {urlSecretRef: {name: pg, key: url}}}
  redis: {urlSecretRef: {name: r, key: url}}
"#;

    #[test]
    fn a_manifest_with_only_declared_fields_has_no_unknown_field() {
        assert_eq!(unknown_fields(&doc(GOOD)), vec![]);
    }

    #[test]
    fn every_typo_is_named_with_its_path_and_the_likely_field() {
        let bad = GOOD
            .replace("autoOffsetReset", "autoOfsetReset")
            .replace("replicas: 1", "replicaz: 3")
            .replace("maxEvents", "maxEvent");
        let found = unknown_fields(&doc(&bad));
        let text: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            vec![
                "unknown field \"spec.handler.pipelineTrigger.maxEvent\" (did you mean \"maxEvents\"?)",
                "unknown field \"spec.kafka.autoOfsetReset\" (did you mean \"autoOffsetReset\"?)",
                "unknown field \"spec.replicaz\" (did you mean \"replicas\"?)",
            ]
        );
    }

    #[test]
    fn unknown_metadata_and_top_level_fields_are_named() {
        let bad = GOOD.replace("metadata: {name: a", "metdata: {}\nmetadata: {nmae: a");
        let text: Vec<String> = unknown_fields(&doc(&bad))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            text,
            vec![
                "unknown field \"metadata.nmae\" (did you mean \"name\"?)",
                "unknown field \"metdata\" (did you mean \"metadata\"?)",
            ]
        );
    }

    #[test]
    fn job_templates_keep_their_free_form_fields() {
        let with_job = GOOD.replace(
            "webhook: {url: \"http://h\", headers: {X-Anything: v}}",
            "job: {template: {anything: {goes: here}}}",
        );
        assert_eq!(unknown_fields(&doc(&with_job)), vec![]);
    }
}
