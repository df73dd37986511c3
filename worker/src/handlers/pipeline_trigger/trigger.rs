//! A claimed trigger, its webhook payload, and the Kubernetes Job built for it. All pure.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{Container, EnvVar};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use crate::scorer::model::fnv1a64;

/// Why a trigger fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    /// `maxEvents` events were counted.
    Count,
    /// `maxTimeSeconds` passed since the last trigger.
    Time,
}

impl Reason {
    /// As stored in `pipeline_runs.reason` and sent in payloads.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Count => "count",
            Self::Time => "time",
        }
    }
}

/// A trigger as the Redis scripts record it when they claim its sequence number (JSON in the
/// `pending` hash and in `last_trigger`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claimed {
    /// Sequence number of the trigger within its consumer, from 1, without gaps.
    pub seq: u64,
    /// Why it fired.
    pub reason: Reason,
    /// Events in its window.
    pub event_count: u64,
    /// Window start, milliseconds since the epoch (Redis server time).
    pub window_start_ms: i64,
    /// Window end (the claim time), milliseconds since the epoch (Redis server time).
    pub window_end_ms: i64,
    /// Pipeline name when it was claimed.
    pub pipeline: String,
    /// The window's events per partition, by topic and partition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub offsets: Vec<PartitionRange>,
    /// The W3C trace contexts of the window's first traced messages (in the order they were
    /// counted, at most [`MAX_TRIGGER_TRACES`](crate::telemetry::MAX_TRIGGER_TRACES)); empty when
    /// none was traced or export is off. The webhook delivery span continues the first and links
    /// the others.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traces: Vec<TraceContext>,
}

/// A message's W3C trace context, as its `traceparent` / `tracestate` headers carried it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    /// The `traceparent` value.
    pub traceparent: String,
    /// The `tracestate` value, if not empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// The span context, if the values parse.
    pub fn span_context(&self) -> Option<opentelemetry::trace::SpanContext> {
        crate::telemetry::parse_traceparent(&self.traceparent, self.tracestate.as_deref())
    }
}

/// The events a window holds in one partition: those counted with offsets from `first_offset`
/// to `last_offset`, both included. Consecutive windows never overlap in a partition, so a
/// pipeline that reads each partition from `first_offset` to `last_offset` reads exactly its
/// window. Messages inside the range that were not counted (rejected as invalid, sent to the
/// error topic) are the difference between `last_offset - first_offset + 1` and `events`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PartitionRange {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset of the window's first event in this partition.
    #[serde(deserialize_with = "int_or_string")]
    pub first_offset: i64,
    /// Offset of the window's last event in this partition (included).
    #[serde(deserialize_with = "int_or_string")]
    pub last_offset: i64,
    /// Events of the window in this partition.
    pub events: u64,
}

/// An integer written as a JSON number or, as the Redis scripts write offsets, a string.
fn int_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum IntOrString {
        Int(i64),
        String(String),
    }
    match IntOrString::deserialize(d)? {
        IntOrString::Int(i) => Ok(i),
        IntOrString::String(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

impl Claimed {
    /// The offset ranges sorted by topic and partition (the scripts list them in no order).
    pub fn sorted(mut self) -> Self {
        self.offsets.sort();
        self
    }
}

/// The id of trigger `seq` of `consumer_id`: `<consumer_id>:<seq>`. It is the `Idempotency-Key`
/// of the webhook call and the primary key of `pipeline_runs`.
pub fn trigger_id(consumer_id: &str, seq: u64) -> String {
    format!("{consumer_id}:{seq}")
}

/// Milliseconds since the epoch as a UTC time (the epoch itself if out of range).
pub fn ms_to_time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

fn rfc3339(ms: i64) -> String {
    ms_to_time(ms).to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Body of the webhook call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookPayload {
    /// Unique, deterministic trigger id (also the `Idempotency-Key` header).
    pub trigger_id: String,
    /// The StreamConsumer (`namespace/name`, or the name alone outside a cluster).
    pub consumer_id: String,
    /// Pipeline to run.
    pub pipeline_name: String,
    /// Sequence number of the trigger within the consumer.
    pub sequence: u64,
    /// `count` or `time`.
    pub reason: Reason,
    /// Events in the window.
    pub event_count: u64,
    /// Window start, RFC 3339.
    pub window_start: String,
    /// Window end, RFC 3339.
    pub window_end: String,
    /// What to read for exactly this window: per partition, the offsets of its first and last
    /// event (both included) and its event count. Empty for a window without events.
    pub offsets: Vec<PartitionRange>,
}

impl WebhookPayload {
    /// The payload of a claimed trigger.
    pub fn new(consumer_id: &str, t: &Claimed) -> Self {
        Self {
            trigger_id: trigger_id(consumer_id, t.seq),
            consumer_id: consumer_id.to_string(),
            pipeline_name: t.pipeline.clone(),
            sequence: t.seq,
            reason: t.reason,
            event_count: t.event_count,
            window_start: rfc3339(t.window_start_ms),
            window_end: rfc3339(t.window_end_ms),
            offsets: t.offsets.clone(),
        }
    }
}

/// Longest pipeline part of a Job name; with the consumer hash and the sequence number, the name
/// stays within 63 characters (the `job-name` label limit).
const MAX_JOB_PIPELINE_PART: usize = 32;

/// Lowercase alphanumerics and `-`, no leading or trailing `-`, at most `max` characters; `x` if
/// nothing is left.
fn dns_label_part(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    let mut dash = false;
    for c in s.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            out.push(c);
            dash = false;
        } else if !dash && !out.is_empty() {
            out.push('-');
            dash = true;
        }
        if out.len() >= max {
            break;
        }
    }
    let trimmed = out.trim_end_matches('-').to_string();
    if trimmed.is_empty() {
        "x".into()
    } else {
        trimmed
    }
}

/// The Job name of trigger `seq`: `<pipeline>-<8 hex of fnv1a64(consumer_id)>-<seq>`. Derived only
/// from the consumer, the pipeline and the sequence number, so a retried creation hits
/// `AlreadyExists`, and two consumers triggering the same pipeline never collide.
pub fn job_name(consumer_id: &str, pipeline: &str, seq: u64) -> String {
    format!(
        "{}-{:08x}-{seq}",
        dns_label_part(pipeline, MAX_JOB_PIPELINE_PART),
        fnv1a64(consumer_id) as u32
    )
}

/// A label value: at most 63 characters of `[A-Za-z0-9._-]`, starting and ending alphanumeric.
fn label_value(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(63)
        .collect();
    cleaned
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

fn add_env(c: &mut Container, vars: &[(&str, String)]) {
    let env = c.env.get_or_insert_with(Vec::new);
    for (name, value) in vars {
        env.retain(|e| e.name != *name);
        env.push(EnvVar {
            name: (*name).to_string(),
            value: Some(value.clone()),
            value_from: None,
        });
    }
}

/// The Job created for a trigger: the template's spec, named by [`job_name`], labelled as managed
/// by streamops, annotated with the trigger, and with the trigger passed to every container as
/// `STREAMOPS_TRIGGER_ID`, `STREAMOPS_CONSUMER_ID`, `STREAMOPS_PIPELINE_NAME`,
/// `STREAMOPS_TRIGGER_REASON`, `STREAMOPS_EVENT_COUNT`, `STREAMOPS_WINDOW_START`,
/// `STREAMOPS_WINDOW_END` and `STREAMOPS_WINDOW_OFFSETS` (the payload's `offsets`, as JSON).
pub fn build_job(template: &JobSpec, namespace: &str, consumer_id: &str, t: &Claimed) -> Job {
    let p = WebhookPayload::new(consumer_id, t);
    let name = job_name(consumer_id, &t.pipeline, t.seq);
    let labels: BTreeMap<String, String> = [
        ("app.kubernetes.io/managed-by", "streamops".to_string()),
        ("app.kubernetes.io/name", "streamops-pipeline".to_string()),
        ("streamops.dev/pipeline", label_value(&t.pipeline)),
        (
            "streamops.dev/consumer",
            label_value(consumer_id.rsplit('/').next().unwrap_or(consumer_id)),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let annotations: BTreeMap<String, String> = [
        ("streamops.dev/trigger-id", p.trigger_id.clone()),
        ("streamops.dev/consumer-id", p.consumer_id.clone()),
        (
            "streamops.dev/trigger-reason",
            p.reason.as_str().to_string(),
        ),
        ("streamops.dev/event-count", p.event_count.to_string()),
        ("streamops.dev/window-start", p.window_start.clone()),
        ("streamops.dev/window-end", p.window_end.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let vars = [
        ("STREAMOPS_TRIGGER_ID", p.trigger_id.clone()),
        ("STREAMOPS_CONSUMER_ID", p.consumer_id.clone()),
        ("STREAMOPS_PIPELINE_NAME", p.pipeline_name.clone()),
        ("STREAMOPS_TRIGGER_REASON", p.reason.as_str().to_string()),
        ("STREAMOPS_EVENT_COUNT", p.event_count.to_string()),
        ("STREAMOPS_WINDOW_START", p.window_start.clone()),
        ("STREAMOPS_WINDOW_END", p.window_end.clone()),
        (
            "STREAMOPS_WINDOW_OFFSETS",
            serde_json::to_string(&p.offsets).unwrap_or_else(|_| "[]".into()),
        ),
    ];
    let mut spec = template.clone();
    if let Some(pod) = spec.template.spec.as_mut() {
        for c in pod.containers.iter_mut() {
            add_env(c, &vars);
        }
        if let Some(init) = pod.init_containers.as_mut() {
            for c in init.iter_mut() {
                add_env(c, &vars);
            }
        }
    }
    Job {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.to_string()),
            labels: Some(labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodSpec, PodTemplateSpec};

    use super::*;

    fn claimed(seq: u64) -> Claimed {
        Claimed {
            seq,
            reason: Reason::Count,
            event_count: 1000,
            window_start_ms: 1_710_930_600_000,
            window_end_ms: 1_710_930_660_500,
            pipeline: "Nightly Load".into(),
            offsets: vec![PartitionRange {
                topic: "clicks".into(),
                partition: 2,
                first_offset: 9_007_199_254_740_993,
                last_offset: 9_007_199_254_741_992,
                events: 1000,
            }],
            traces: Vec::new(),
        }
    }

    fn template() -> JobSpec {
        JobSpec {
            backoff_limit: Some(2),
            template: PodTemplateSpec {
                metadata: None,
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    containers: vec![Container {
                        name: "load".into(),
                        image: Some("busybox".into()),
                        env: Some(vec![EnvVar {
                            name: "STREAMOPS_EVENT_COUNT".into(),
                            value: Some("stale".into()),
                            value_from: None,
                        }]),
                        ..Container::default()
                    }],
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }
    }

    #[test]
    fn payload_carries_the_trigger_and_its_window_in_rfc3339() {
        let p = WebhookPayload::new("team-a/clicks", &claimed(7));
        assert_eq!(p.trigger_id, "team-a/clicks:7");
        assert_eq!(p.pipeline_name, "Nightly Load");
        assert_eq!(p.window_start, "2024-03-20T10:30:00.000Z");
        assert_eq!(p.window_end, "2024-03-20T10:31:00.500Z");
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["reason"], "count");
        assert_eq!(json["event_count"], 1000);
        assert_eq!(
            json["offsets"],
            serde_json::json!([{"topic": "clicks", "partition": 2,
                "first_offset": 9_007_199_254_740_993_i64, "last_offset": 9_007_199_254_741_992_i64,
                "events": 1000}])
        );
    }

    #[test]
    fn job_name_is_deterministic_dns_safe_and_short() {
        let a = job_name("team-a/clicks", "Nightly Load!", 12);
        assert_eq!(a, job_name("team-a/clicks", "Nightly Load!", 12));
        assert!(a.starts_with("nightly-load-"), "{a}");
        assert!(a.ends_with("-12"));
        let long = job_name("c", &"x".repeat(300), u64::MAX);
        assert!(long.len() <= 63, "{} chars", long.len());
        assert!(long
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
        assert_ne!(
            job_name("team-a/clicks", "p", 1),
            job_name("team-b/clicks", "p", 1)
        );
        assert_ne!(job_name("c", "p", 1), job_name("c", "p", 2));
        assert_eq!(job_name("c", "!!!", 1).split('-').next(), Some("x"));
    }

    #[test]
    fn built_job_has_name_labels_annotations_and_trigger_env() {
        let job = build_job(&template(), "team-a", "team-a/clicks", &claimed(3));
        let meta = &job.metadata;
        assert_eq!(
            meta.name.as_deref(),
            Some(job_name("team-a/clicks", "Nightly Load", 3).as_str())
        );
        assert_eq!(meta.namespace.as_deref(), Some("team-a"));
        let labels = meta.labels.as_ref().unwrap();
        assert_eq!(labels["app.kubernetes.io/managed-by"], "streamops");
        assert_eq!(labels["streamops.dev/pipeline"], "Nightly_Load");
        assert_eq!(labels["streamops.dev/consumer"], "clicks");
        let ann = meta.annotations.as_ref().unwrap();
        assert_eq!(ann["streamops.dev/trigger-id"], "team-a/clicks:3");
        let spec = job.spec.unwrap();
        assert_eq!(spec.backoff_limit, Some(2));
        let env = spec.template.spec.unwrap().containers[0]
            .env
            .clone()
            .unwrap();
        let get = |n: &str| {
            env.iter()
                .filter(|e| e.name == n)
                .map(|e| e.value.clone().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(get("STREAMOPS_EVENT_COUNT"), vec!["1000".to_string()]);
        assert_eq!(
            get("STREAMOPS_TRIGGER_ID"),
            vec!["team-a/clicks:3".to_string()]
        );
        assert_eq!(get("STREAMOPS_TRIGGER_REASON"), vec!["count".to_string()]);
        let offsets: Vec<PartitionRange> =
            serde_json::from_str(&get("STREAMOPS_WINDOW_OFFSETS")[0]).unwrap();
        assert_eq!(offsets, claimed(3).offsets);
    }

    #[test]
    fn claimed_trigger_round_trips_through_the_script_json() {
        let json = r#"{"seq":4,"reason":"time","event_count":0,"window_start_ms":1710930600000,"window_end_ms":1710930900000,"pipeline":"p"}"#;
        let c: Claimed = serde_json::from_str(json).unwrap();
        assert_eq!(c.reason, Reason::Time);
        assert_eq!(c.seq, 4);
        assert!(c.offsets.is_empty());
        // Offsets above 2^53 come as strings from the scripts and stay exact.
        let json = r#"{"seq":5,"reason":"count","event_count":3,"window_start_ms":1,"window_end_ms":2,"pipeline":"p","offsets":[{"topic":"a.b:c","partition":1,"first_offset":"9007199254740993","last_offset":"9007199254740995","events":3}]}"#;
        let c: Claimed = serde_json::from_str(json).unwrap();
        assert_eq!(c.offsets[0].first_offset, 9_007_199_254_740_993);
        let back: Claimed = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }
}
