//! Validation of a `StreamConsumerSpec` beyond what its schema can express, and a second line of
//! defence for what it can: the reconciler and the worker both run it, so a spec that slipped past
//! the API server (an older CRD, a disabled validation) still fails with a message naming the field.

use std::fmt;

use crate::v1alpha1::{HandlerKind, RetryBackoff, StreamConsumerSpec};

/// One invalid field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the field, such as `spec.handler.fraud.scoringUrl`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// An invalid spec: every field that is wrong, in the order they were found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    /// The invalid fields; never empty.
    pub errors: Vec<FieldError>,
}

impl SpecError {
    /// An error about one field.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            errors: vec![FieldError {
                field: field.into(),
                message: message.into(),
            }],
        }
    }

    /// The first invalid field's path.
    pub fn first_field(&self) -> &str {
        self.errors
            .first()
            .map(|e| e.field.as_str())
            .unwrap_or("spec")
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", e.field, e.message)?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Collector(Vec<FieldError>);

fn check_backoff(c: &mut Collector, field: &str, b: &RetryBackoff) {
    c.check(
        (1..=60_000).contains(&b.base_ms),
        &format!("{field}.baseMs"),
        "must be between 1 and 60000",
    );
    c.check(
        b.factor.is_finite() && (1.0..=10.0).contains(&b.factor),
        &format!("{field}.factor"),
        "must be between 1 and 10",
    );
    c.check(
        (1..=600_000).contains(&b.cap_ms),
        &format!("{field}.capMs"),
        "must be between 1 and 600000",
    );
    c.check(
        b.base_ms <= b.cap_ms,
        &format!("{field}.baseMs"),
        "must not exceed capMs",
    );
}

impl Collector {
    fn check(&mut self, ok: bool, field: &str, message: impl Into<String>) {
        if !ok {
            self.0.push(FieldError {
                field: field.to_string(),
                message: message.into(),
            });
        }
    }
}

fn is_topic_name(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn is_http_url(u: &str) -> bool {
    let rest = u
        .strip_prefix("http://")
        .or_else(|| u.strip_prefix("https://"));
    matches!(rest, Some(r) if !r.is_empty() && !r.starts_with('/'))
}

fn is_bootstrap_list(s: &str) -> bool {
    !s.trim().is_empty()
        && s.split(',').all(|hp| {
            let hp = hp.trim();
            match hp.rsplit_once(':') {
                Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
                None => false,
            }
        })
}

/// Whether an inline webhook header looks like it carries a credential; such headers must come
/// from a Secret (`secretHeaders`).
pub fn is_credential_header(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    matches!(
        n.as_str(),
        "authorization" | "proxy-authorization" | "cookie" | "set-cookie"
    ) || ["token", "secret", "key", "password", "auth", "session"]
        .iter()
        .any(|w| n.contains(w))
}

fn is_header_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 256
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn check_webhook_headers(c: &mut Collector, w: &crate::v1alpha1::WebhookSpec) {
    for name in w.headers.keys() {
        c.check(
            !is_credential_header(name),
            &format!("spec.handler.pipelineTrigger.webhook.headers.{name}"),
            "looks like a credential: inline header values are visible to anyone who can read the StreamConsumer; use secretHeaders",
        );
    }
    c.check(
        w.secret_headers.len() <= 32,
        "spec.handler.pipelineTrigger.webhook.secretHeaders",
        "at most 32 entries",
    );
    for (i, h) in w.secret_headers.iter().enumerate() {
        let field = format!("spec.handler.pipelineTrigger.webhook.secretHeaders[{i}]");
        c.check(
            is_header_name(&h.name),
            &format!("{field}.name"),
            format!("{:?} is not a valid HTTP header name", h.name),
        );
        c.check(
            !w.headers.keys().any(|k| k.eq_ignore_ascii_case(&h.name))
                && !w.secret_headers[..i]
                    .iter()
                    .any(|o| o.name.eq_ignore_ascii_case(&h.name)),
            &format!("{field}.name"),
            format!("header {:?} is set twice", h.name),
        );
        c.check(
            !h.secret_key_ref.name.is_empty() && !h.secret_key_ref.key.is_empty(),
            &format!("{field}.secretKeyRef"),
            "name and key must not be empty",
        );
    }
}

/// Validates a spec; every error names its field.
pub fn validate_spec(spec: &StreamConsumerSpec) -> Result<(), SpecError> {
    let mut c = Collector::default();
    c.check(
        (0..=1000).contains(&spec.replicas),
        "spec.replicas",
        "must be between 0 and 1000",
    );

    let k = &spec.kafka;
    c.check(
        is_bootstrap_list(&k.bootstrap_servers),
        "spec.kafka.bootstrapServers",
        "must be a comma-separated list of host:port",
    );
    c.check(
        !k.topics.is_empty(),
        "spec.kafka.topics",
        "must name at least one topic",
    );
    for (i, t) in k.topics.iter().enumerate() {
        c.check(
            is_topic_name(t),
            &format!("spec.kafka.topics[{i}]"),
            format!("{t:?} is not a valid topic name (1-249 characters of [a-zA-Z0-9._-])"),
        );
    }
    c.check(
        !k.group_id.trim().is_empty() && k.group_id.len() <= 255,
        "spec.kafka.groupId",
        "must be 1-255 characters",
    );
    c.check(
        (6_000..=300_000).contains(&k.session_timeout_ms),
        "spec.kafka.sessionTimeoutMs",
        "must be between 6000 and 300000",
    );
    c.check(
        (10_000..=86_400_000).contains(&k.max_poll_interval_ms),
        "spec.kafka.maxPollIntervalMs",
        "must be between 10000 and 86400000",
    );
    c.check(
        k.session_timeout_ms <= k.max_poll_interval_ms,
        "spec.kafka.sessionTimeoutMs",
        "must not exceed maxPollIntervalMs",
    );
    if let Some(sec) = &k.security {
        if sec.protocol.uses_sasl() {
            c.check(
                sec.sasl.is_some(),
                "spec.kafka.security.sasl",
                format!("required for protocol {}", sec.protocol.as_str()),
            );
        }
        if let Some(sasl) = &sec.sasl {
            c.check(
                !sasl.credentials_secret_ref.name.is_empty(),
                "spec.kafka.security.sasl.credentialsSecretRef.name",
                "must not be empty",
            );
        }
    }

    if let Some(et) = &spec.error_topic {
        c.check(
            is_topic_name(et),
            "spec.errorTopic",
            format!("{et:?} is not a valid topic name"),
        );
        c.check(
            !k.topics.contains(et),
            "spec.errorTopic",
            "must differ from every consumed topic",
        );
    } else if let Some(first) = k.topics.first() {
        let derived = format!("{first}-failed");
        c.check(
            derived.len() <= 249,
            "spec.errorTopic",
            "the default error topic name would exceed 249 characters; set errorTopic",
        );
        c.check(
            !k.topics.contains(&derived),
            "spec.errorTopic",
            format!("the default error topic {derived:?} is a consumed topic: rejected messages would loop back into the consumer; set errorTopic to another topic"),
        );
    }

    c.check(
        (1..=100_000).contains(&spec.batch.max_messages),
        "spec.batch.maxMessages",
        "must be between 1 and 100000",
    );
    c.check(
        (1..=60_000).contains(&spec.batch.max_wait_ms),
        "spec.batch.maxWaitMs",
        "must be between 1 and 60000",
    );
    if let Some(p) = spec.progress_every {
        c.check(
            (1..=100_000_000).contains(&p),
            "spec.progressEvery",
            "must be between 1 and 100000000",
        );
    }
    c.check(
        (1024..=64 * 1024 * 1024).contains(&spec.max_message_bytes),
        "spec.maxMessageBytes",
        "must be between 1024 and 67108864",
    );
    c.check(
        !spec.sink.postgres.url_secret_ref.name.is_empty()
            && !spec.sink.postgres.url_secret_ref.key.is_empty(),
        "spec.sink.postgres.urlSecretRef",
        "name and key must not be empty",
    );

    let h = &spec.handler;
    let blocks = [
        (
            "movingAverage",
            h.moving_average.is_some(),
            HandlerKind::MovingAverage,
        ),
        ("sensor", h.sensor.is_some(), HandlerKind::Sensor),
        ("fraud", h.fraud.is_some(), HandlerKind::Fraud),
        (
            "pipelineTrigger",
            h.pipeline_trigger.is_some(),
            HandlerKind::PipelineTrigger,
        ),
    ];
    for (name, present, kind) in blocks {
        c.check(
            !present || h.kind == kind,
            &format!("spec.handler.{name}"),
            format!("only allowed when handler.kind is {kind}"),
        );
    }
    if let Some(ma) = &h.moving_average {
        c.check(
            (2..=1000).contains(&ma.window),
            "spec.handler.movingAverage.window",
            "must be between 2 and 1000",
        );
    }
    match h.kind {
        HandlerKind::Fraud => match &h.fraud {
            None => c.check(
                false,
                "spec.handler.fraud",
                "required when handler.kind is fraud",
            ),
            Some(f) => {
                c.check(
                    is_http_url(&f.scoring_url),
                    "spec.handler.fraud.scoringUrl",
                    "must be an http:// or https:// URL",
                );
                c.check(
                    (1..=600_000).contains(&f.timeout_ms),
                    "spec.handler.fraud.timeoutMs",
                    "must be between 1 and 600000",
                );
                c.check(
                    f.max_retries <= 20,
                    "spec.handler.fraud.maxRetries",
                    "must be at most 20",
                );
                c.check(
                    (1..=10_000).contains(&f.batch_size),
                    "spec.handler.fraud.batchSize",
                    "must be between 1 and 10000",
                );
                c.check(
                    f.fraud_threshold.is_finite() && (0.0..=1.0).contains(&f.fraud_threshold),
                    "spec.handler.fraud.fraudThreshold",
                    "must be between 0 and 1",
                );
                c.check(
                    f.circuit_breaker_failures >= 1,
                    "spec.handler.fraud.circuitBreakerFailures",
                    "must be at least 1",
                );
                check_backoff(&mut c, "spec.handler.fraud.retryBackoff", &f.retry_backoff);
            }
        },
        HandlerKind::PipelineTrigger => match &h.pipeline_trigger {
            None => c.check(
                false,
                "spec.handler.pipelineTrigger",
                "required when handler.kind is pipeline-trigger",
            ),
            Some(p) => {
                c.check(
                    !p.pipeline_name.trim().is_empty(),
                    "spec.handler.pipelineTrigger.pipelineName",
                    "must not be empty",
                );
                c.check(
                    p.max_events >= 1,
                    "spec.handler.pipelineTrigger.maxEvents",
                    "must be at least 1",
                );
                c.check(
                    (1..=31_536_000).contains(&p.max_time_seconds),
                    "spec.handler.pipelineTrigger.maxTimeSeconds",
                    "must be between 1 and 31536000",
                );
                c.check(
                    p.webhook.is_some() != p.job.is_some(),
                    "spec.handler.pipelineTrigger",
                    "exactly one of webhook and job must be set",
                );
                if let Some(w) = &p.webhook {
                    c.check(
                        is_http_url(&w.url),
                        "spec.handler.pipelineTrigger.webhook.url",
                        "must be an http:// or https:// URL",
                    );
                    check_backoff(
                        &mut c,
                        "spec.handler.pipelineTrigger.webhook.retryBackoff",
                        &w.retry_backoff,
                    );
                    check_webhook_headers(&mut c, w);
                }
                if let Some(id) = &p.consumer_id {
                    c.check(
                        !id.is_empty()
                            && id.len() <= 253
                            && id.bytes().all(|b| {
                                b.is_ascii_alphanumeric()
                                    || matches!(b, b'.' | b'_' | b':' | b'/' | b'-')
                            }),
                        "spec.handler.pipelineTrigger.consumerId",
                        "must be 1-253 characters of [a-zA-Z0-9._:/-]",
                    );
                }
                if let Some(j) = &p.job {
                    match crate::job_template::parse_template(&j.template) {
                        Ok(job) => c.0.extend(crate::job_template::restricted_violations(&job)),
                        Err(e) => c.0.push(e),
                    }
                }
                c.check(
                    spec.redis.is_some(),
                    "spec.redis",
                    "required when handler.kind is pipeline-trigger",
                );
            }
        },
        HandlerKind::MovingAverage | HandlerKind::Sensor => {}
    }

    if let Some(a) = &spec.autoscaling {
        c.check(
            a.min_replicas >= 0,
            "spec.autoscaling.minReplicas",
            "must not be negative",
        );
        c.check(
            a.max_replicas >= 1,
            "spec.autoscaling.maxReplicas",
            "must be at least 1",
        );
        c.check(
            a.min_replicas <= a.max_replicas,
            "spec.autoscaling.minReplicas",
            "must not exceed maxReplicas",
        );
        c.check(
            a.lag_threshold >= 1,
            "spec.autoscaling.lagThreshold",
            "must be at least 1",
        );
        c.check(
            a.poll_interval_seconds >= 1,
            "spec.autoscaling.pollIntervalSeconds",
            "must be at least 1",
        );
    }

    if let Some(r) = &spec.replay {
        check_replay(&mut c, r, &k.topics);
    }

    if c.0.is_empty() {
        Ok(())
    } else {
        Err(SpecError { errors: c.0 })
    }
}

fn check_replay(c: &mut Collector, r: &crate::v1alpha1::ReplaySpec, topics: &[String]) {
    let id_ok = (1..=40).contains(&r.request_id.len())
        && r.request_id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !r.request_id.starts_with('-')
        && !r.request_id.ends_with('-');
    c.check(
        id_ok,
        "spec.replay.requestId",
        "must be 1-40 lowercase letters, digits or '-', starting and ending with a letter or digit",
    );
    let targets = usize::from(r.to_earliest)
        + usize::from(r.from_timestamp.is_some())
        + usize::from(!r.offsets.is_empty());
    c.check(
        targets == 1,
        "spec.replay",
        "needs exactly one of toEarliest, fromTimestamp and offsets",
    );
    if let Some(t) = &r.from_timestamp {
        c.check(
            t.parse::<k8s_openapi::jiff::Timestamp>().is_ok(),
            "spec.replay.fromTimestamp",
            format!("{t:?} is not an RFC 3339 timestamp"),
        );
    }
    for (i, o) in r.offsets.iter().enumerate() {
        c.check(
            topics.contains(&o.topic),
            &format!("spec.replay.offsets[{i}].topic"),
            format!("{:?} is not one of spec.kafka.topics", o.topic),
        );
        c.check(
            o.partition >= 0 && o.offset >= 0,
            &format!("spec.replay.offsets[{i}]"),
            "partition and offset must not be negative",
        );
    }
}

#[cfg(test)]
mod replay_tests {
    use super::*;
    use crate::v1alpha1::{ReplayOffset, ReplaySpec};

    fn with(replay: ReplaySpec) -> Result<(), SpecError> {
        let mut spec = StreamConsumerSpec::example(HandlerKind::MovingAverage);
        spec.replay = Some(replay);
        validate_spec(&spec)
    }

    fn replay(id: &str) -> ReplaySpec {
        ReplaySpec {
            request_id: id.into(),
            to_earliest: false,
            from_timestamp: None,
            offsets: Vec::new(),
        }
    }

    #[test]
    fn a_replay_needs_exactly_one_target_and_bad_fields_are_named() {
        let mut r = replay("fix-1");
        assert_eq!(with(r.clone()).unwrap_err().first_field(), "spec.replay");
        r.to_earliest = true;
        assert!(with(r.clone()).is_ok());
        r.from_timestamp = Some("2024-03-20T10:30:00Z".into());
        assert_eq!(with(r.clone()).unwrap_err().first_field(), "spec.replay");
        r.to_earliest = false;
        assert!(with(r.clone()).is_ok());
        r.from_timestamp = Some("yesterday".into());
        assert_eq!(
            with(r.clone()).unwrap_err().first_field(),
            "spec.replay.fromTimestamp"
        );
        let mut r = replay("Bad_Id");
        r.to_earliest = true;
        assert_eq!(with(r).unwrap_err().first_field(), "spec.replay.requestId");
        let mut r = replay("x");
        r.offsets = vec![ReplayOffset {
            topic: "not-consumed".into(),
            partition: 0,
            offset: 3,
        }];
        assert_eq!(
            with(r).unwrap_err().first_field(),
            "spec.replay.offsets[0].topic"
        );
    }
}
