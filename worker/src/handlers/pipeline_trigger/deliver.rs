//! Trigger targets: an HTTP webhook, or a Kubernetes Job. One `send` is one attempt; the delivery
//! loop retries.

use std::time::Duration;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use kube::api::PostParams;
use kube::Api;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, USER_AGENT};
use streamops_crds::config::webhook_header_env;
use streamops_crds::job_template::{harden, parse_template, restricted_violations};
use streamops_crds::v1alpha1::{
    default_webhook_backoff, JobTriggerSpec, RetryBackoff, WebhookSpec,
};
use tokio::sync::OnceCell;
use tracing::Instrument;

use super::trigger::{build_job, job_name, Claimed, WebhookPayload};

/// Name of the header carrying the trigger id.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";
/// Retries of a failed Job creation (the Job target has no setting of its own).
pub const JOB_MAX_RETRIES: u32 = 5;

/// Why one attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Another attempt may succeed (transport error, timeout, 5xx, 408, 429).
    #[error("{0}")]
    Retryable(String),
    /// Retrying cannot help (other 4xx, invalid object).
    #[error("{0}")]
    Permanent(String),
}

impl SendError {
    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable(_))
    }
}

/// A successful attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The Job created (job target).
    pub job_name: Option<String>,
}

/// The HTTP webhook target.
pub struct WebhookSink {
    http: reqwest::Client,
    url: String,
    headers: HeaderMap,
    max_retries: u32,
    backoff: RetryBackoff,
}

impl WebhookSink {
    /// Builds the target; fails on a header that is not valid HTTP. The values of
    /// `secretHeaders` come from the process environment ([`webhook_header_env`]).
    pub fn new(spec: &WebhookSpec) -> Result<Self, String> {
        Self::with_lookup(spec, &|name| std::env::var(name).ok())
    }

    /// [`WebhookSink::new`], reading the secret header values through `lookup`. No error message
    /// ever contains a header value.
    pub fn with_lookup(
        spec: &WebhookSpec,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let mut headers = HeaderMap::new();
        for (k, v) in &spec.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| format!("webhook header name {k:?}: {e}"))?;
            let value = HeaderValue::from_str(v)
                .map_err(|e| format!("webhook header {k:?} has an invalid value: {e}"))?;
            headers.insert(name, value);
        }
        for (i, h) in spec.secret_headers.iter().enumerate() {
            let env = webhook_header_env(i);
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|e| format!("webhook secret header name {:?}: {e}", h.name))?;
            let raw = lookup(&env).ok_or_else(|| {
                format!(
                    "webhook header {:?}: {env} is not set (Secret {} key {})",
                    h.name, h.secret_key_ref.name, h.secret_key_ref.key
                )
            })?;
            let mut value = HeaderValue::from_str(raw.trim_end_matches(['\r', '\n'])).map_err(|_| {
                format!(
                    "webhook header {:?}: the value in Secret {} key {} is not a valid header value",
                    h.name, h.secret_key_ref.name, h.secret_key_ref.key
                )
            })?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("streamops-worker/", env!("CARGO_PKG_VERSION"))),
        );
        let timeout = Duration::from_millis(u64::from(spec.timeout_ms.max(1)));
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| format!("cannot build the webhook client: {e}"))?;
        Ok(Self {
            http,
            url: spec.url.clone(),
            headers,
            max_retries: spec.max_retries,
            backoff: spec.retry_backoff.clone(),
        })
    }

    /// POSTs the trigger's payload with `Idempotency-Key: <trigger id>`. A 2xx answer is a
    /// delivery, and so is `409 Conflict`, which idempotency-aware receivers answer for a key
    /// they already processed.
    pub async fn send(&self, consumer_id: &str, t: &Claimed) -> Result<Sent, SendError> {
        let payload = WebhookPayload::new(consumer_id, t);
        // The window's traced messages: the delivery continues the first one's trace.
        let traces: Vec<_> = t.traces.iter().filter_map(|c| c.span_context()).collect();
        let span = crate::telemetry::webhook_span(&payload.trigger_id, &traces);
        let result = self.post(&payload).instrument(span.clone()).await;
        if let Err(e) = &result {
            crate::telemetry::record_failure(
                &span,
                match e {
                    SendError::Retryable(_) => "retryable",
                    SendError::Permanent(_) => "permanent",
                },
            );
        }
        result
    }

    async fn post(&self, payload: &WebhookPayload) -> Result<Sent, SendError> {
        // The current span is this attempt's `streamops.webhook` span, if any (see telemetry).
        let mut headers = self.headers.clone();
        crate::telemetry::inject_current(&mut headers);
        let resp = self
            .http
            .post(&self.url)
            .headers(headers)
            .header(IDEMPOTENCY_KEY, payload.trigger_id.as_str())
            .json(payload)
            .send()
            .await
            .map_err(|e| {
                // Without the URL: it may carry a token in its query string.
                let e = e.without_url();
                SendError::Retryable(if e.is_timeout() {
                    format!("webhook timed out: {e}")
                } else {
                    format!("webhook unreachable: {e}")
                })
            })?;
        let status = resp.status();
        crate::telemetry::record_status(status.as_u16());
        if status.is_success() || status.as_u16() == 409 {
            return Ok(Sent { job_name: None });
        }
        // The body is never kept: what a remote service answers is not echoed into
        // pipeline_runs, /consumer/info or the logs (it may be an internal service's data).
        let msg = format!("webhook answered HTTP {status}");
        if status.is_client_error() && status.as_u16() != 408 && status.as_u16() != 429 {
            Err(SendError::Permanent(msg))
        } else {
            Err(SendError::Retryable(msg))
        }
    }
}

/// The Kubernetes Job target.
pub struct JobSink {
    client: OnceCell<kube::Client>,
    namespace: Option<String>,
    template: JobSpec,
}

impl JobSink {
    /// Builds the target; fails when the template is not a `batch/v1` JobSpec or breaks the
    /// restricted Pod Security Standard, naming the field. What the template leaves unset is set to
    /// the restricted values ([`harden`]). The Kubernetes client (in-cluster configuration, or the
    /// local kubeconfig) is made on first use.
    pub fn new(spec: &JobTriggerSpec, namespace: Option<String>) -> Result<Self, String> {
        let mut template: JobSpec =
            parse_template(&spec.template).map_err(|e| format!("{}: {}", e.field, e.message))?;
        if let Some(v) = restricted_violations(&template).first() {
            return Err(format!("{}: {}", v.field, v.message));
        }
        harden(&mut template);
        Ok(Self {
            client: OnceCell::new(),
            namespace,
            template,
        })
    }

    /// Uses `client` instead of the inferred configuration.
    pub fn with_client(self, client: kube::Client) -> Self {
        Self {
            client: OnceCell::new_with(Some(client)),
            ..self
        }
    }

    async fn client(&self) -> Result<&kube::Client, SendError> {
        self.client
            .get_or_try_init(|| async { kube::Client::try_default().await })
            .await
            .map_err(|e| SendError::Retryable(format!("no Kubernetes client: {e}")))
    }

    /// Creates the trigger's Job. `AlreadyExists` means an earlier attempt (of this or another
    /// worker) created it: a success.
    pub async fn send(&self, consumer_id: &str, t: &Claimed) -> Result<Sent, SendError> {
        let client = self.client().await?;
        let ns = self
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string());
        let job = build_job(&self.template, &ns, consumer_id, t);
        let name = job_name(consumer_id, &t.pipeline, t.seq);
        let api: Api<Job> = Api::namespaced(client.clone(), &ns);
        match api.create(&PostParams::default(), &job).await {
            Ok(_) => Ok(Sent {
                job_name: Some(name),
            }),
            Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(Sent {
                job_name: Some(name),
            }),
            Err(kube::Error::Api(s)) => {
                let msg = format!("creating Job {ns}/{name}: HTTP {}: {}", s.code, s.message);
                if s.code == 429 || s.code >= 500 || s.code == 408 {
                    Err(SendError::Retryable(msg))
                } else {
                    Err(SendError::Permanent(msg))
                }
            }
            Err(e) => Err(SendError::Retryable(format!(
                "creating Job {ns}/{name}: {e}"
            ))),
        }
    }
}

/// Where triggers go.
pub enum Sink {
    /// HTTP webhook.
    Webhook(WebhookSink),
    /// Kubernetes Job.
    Job(Box<JobSink>),
}

impl Sink {
    /// `webhook` or `job`, as stored in `pipeline_runs.target`.
    pub fn target(&self) -> &'static str {
        match self {
            Self::Webhook(_) => "webhook",
            Self::Job(_) => "job",
        }
    }

    /// Retries after a failed attempt.
    pub fn max_retries(&self) -> u32 {
        match self {
            Self::Webhook(w) => w.max_retries,
            Self::Job(_) => JOB_MAX_RETRIES,
        }
    }

    /// Backoff between attempts.
    pub fn backoff(&self) -> RetryBackoff {
        match self {
            Self::Webhook(w) => w.backoff.clone(),
            Self::Job(_) => default_webhook_backoff(),
        }
    }

    /// One attempt.
    pub async fn send(&self, consumer_id: &str, t: &Claimed) -> Result<Sent, SendError> {
        match self {
            Self::Webhook(w) => w.send(consumer_id, t).await,
            Self::Job(j) => j.send(consumer_id, t).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn invalid_webhook_header_is_refused_at_construction() {
        let mut headers = BTreeMap::new();
        headers.insert("bad header".to_string(), "x".to_string());
        let spec = WebhookSpec {
            url: "http://127.0.0.1:1/hook".into(),
            timeout_ms: 100,
            max_retries: 0,
            headers,
            retry_backoff: default_webhook_backoff(),
            secret_headers: Vec::new(),
        };
        assert!(WebhookSink::new(&spec).is_err());
    }

    fn webhook(secret_headers: Vec<streamops_crds::v1alpha1::SecretHeader>) -> WebhookSpec {
        WebhookSpec {
            url: "http://127.0.0.1:1/hook".into(),
            timeout_ms: 100,
            max_retries: 0,
            headers: BTreeMap::new(),
            retry_backoff: default_webhook_backoff(),
            secret_headers,
        }
    }

    fn authorization() -> streamops_crds::v1alpha1::SecretHeader {
        streamops_crds::v1alpha1::SecretHeader {
            name: "Authorization".into(),
            secret_key_ref: streamops_crds::v1alpha1::SecretKeyRef {
                name: "hook".into(),
                key: "auth".into(),
            },
        }
    }

    #[test]
    fn secret_header_values_come_from_the_environment_and_are_sensitive() {
        let sink = WebhookSink::with_lookup(&webhook(vec![authorization()]), &|name| {
            (name == "STREAMOPS_WEBHOOK_HEADER_0").then(|| "Bearer s3cr3t\n".to_string())
        })
        .unwrap();
        let v = sink.headers.get("authorization").unwrap();
        assert_eq!(v, "Bearer s3cr3t");
        assert!(v.is_sensitive());
        assert!(!format!("{:?}", sink.headers).contains("s3cr3t"));
    }

    #[test]
    fn a_missing_or_invalid_secret_header_is_an_error_without_the_value() {
        let err = WebhookSink::with_lookup(&webhook(vec![authorization()]), &|_| None)
            .err()
            .unwrap();
        assert!(err.contains("STREAMOPS_WEBHOOK_HEADER_0"), "{err}");
        let err = WebhookSink::with_lookup(&webhook(vec![authorization()]), &|_| {
            Some("s3cr3t\u{7f}bad".to_string())
        })
        .err()
        .unwrap();
        assert!(!err.contains("s3cr3t"), "{err}");
    }

    #[test]
    fn job_template_that_breaks_the_restricted_standard_is_refused_and_short_ones_hardened() {
        let spec = JobTriggerSpec {
            template: serde_json::json!({"template": {"spec": {"hostNetwork": true, "containers": [{"name": "c", "image": "i"}]}}}),
        };
        let err = JobSink::new(&spec, None).err().unwrap();
        assert!(err.contains("template.spec.hostNetwork"), "{err}");
        let spec = JobTriggerSpec {
            template: serde_json::json!({"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "i"}]}}}),
        };
        let sink = JobSink::new(&spec, None).unwrap();
        let pod = sink.template.template.spec.as_ref().unwrap();
        assert_eq!(
            pod.security_context.as_ref().unwrap().run_as_non_root,
            Some(true)
        );
    }

    #[test]
    fn job_template_that_is_not_a_job_spec_is_refused_at_construction() {
        let spec = JobTriggerSpec {
            template: serde_json::json!({"template": "nope"}),
        };
        assert!(JobSink::new(&spec, None).is_err());
    }
}
