//! The scoring client: one call per batch in the configured protocol (`streamops`, `kserve-v1`,
//! `open-inference-v2`), with a per-call timeout, capped exponential backoff between attempts,
//! and a circuit breaker shared by all calls of the worker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};
use reqwest::StatusCode;
use tracing::{debug, warn};

use streamops_crds::v1alpha1::{RetryBackoff, ScoringProtocol};

use super::breaker::CircuitBreaker;
use crate::scorer::api::{
    PredictRequest, PredictResponse, ScoreInput, ScoreOutput, V1Request, V1Response, V2Request,
    V2Response, V2Tensor,
};
use crate::scorer::model;
/// Longest error body kept in a rejection reason.
const MAX_BODY_IN_REASON: usize = 200;

/// Why one scoring call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// No connection could be made.
    #[error("scoring service unreachable: {0}")]
    Connect(String),
    /// No complete answer within the timeout.
    #[error("scoring call timed out after {0} ms")]
    Timeout(u64),
    /// The service answered with an error status.
    #[error("scoring service answered HTTP {status}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// Start of the body.
        body: String,
    },
    /// The answer was not a valid prediction batch for the request.
    #[error("malformed scoring response: {0}")]
    Malformed(String),
    /// Another transport failure.
    #[error("scoring call failed: {0}")]
    Other(String),
    /// The circuit breaker is open; no call was made.
    #[error("circuit breaker open for another {0} ms")]
    CircuitOpen(u64),
}

impl CallError {
    /// Whether another attempt may succeed: everything but a client error other than 408 and 429
    /// (the request itself is wrong).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Status { status, .. } => {
                !(400..500).contains(status) || *status == 408 || *status == 429
            }
            _ => true,
        }
    }

    /// Whether the failure says something about the service's health (counts for the breaker).
    fn counts_for_breaker(&self) -> bool {
        !matches!(self, Self::CircuitOpen(_)) && self.is_retryable()
    }

    /// Stable name, used as a metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Timeout(_) => "timeout",
            Self::Status { status, .. } if *status >= 500 => "http_5xx",
            Self::Status { .. } => "http_4xx",
            Self::Malformed(_) => "malformed",
            Self::Other(_) => "other",
            Self::CircuitOpen(_) => "circuit_open",
        }
    }
}

/// A batch that could not be scored within the retry budget.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("scoring failed after {attempts} attempt(s): {last}")]
pub struct ScoringFailure {
    /// Attempts made (calls and fast failures of an open breaker).
    pub attempts: u32,
    /// The last failure.
    pub last: CallError,
}

/// Scores of one batch, aligned with its inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// Model version reported by the service.
    pub model_version: Arc<str>,
    /// One score per input, in input order.
    pub scores: Vec<f64>,
}

/// Metrics of the scoring client.
#[derive(Clone)]
pub struct ClientMetrics {
    /// Calls by outcome.
    pub calls: IntCounterVec,
    /// Retries.
    pub retries: IntCounter,
    /// Call durations.
    pub duration: Histogram,
    /// Breaker state (0 closed, 1 open, 2 half-open).
    pub circuit: IntGauge,
    /// Times the breaker opened.
    pub circuit_opened: IntCounter,
}

impl ClientMetrics {
    /// Creates and registers the metrics.
    pub fn register(registry: &prometheus::Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            calls: IntCounterVec::new(
                Opts::new(
                    "streamops_fraud_scoring_calls_total",
                    "Scoring attempts by outcome (ok, connect, timeout, http_5xx, http_4xx, malformed, other, circuit_open).",
                ),
                &["outcome"],
            )?,
            retries: IntCounter::new(
                "streamops_fraud_scoring_retries_total",
                "Scoring attempts that were retries of a failed one.",
            )?,
            duration: Histogram::with_opts(
                HistogramOpts::new(
                    "streamops_fraud_scoring_duration_seconds",
                    "Duration of scoring calls that reached the network.",
                )
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            )?,
            circuit: IntGauge::new(
                "streamops_fraud_circuit_state",
                "Circuit breaker of the scoring service: 0 closed, 1 open, 2 half-open.",
            )?,
            circuit_opened: IntCounter::new(
                "streamops_fraud_circuit_opened_total",
                "Times the scoring circuit breaker opened.",
            )?,
        };
        registry.register(Box::new(m.calls.clone()))?;
        registry.register(Box::new(m.retries.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        registry.register(Box::new(m.circuit.clone()))?;
        registry.register(Box::new(m.circuit_opened.clone()))?;
        Ok(m)
    }
}

/// Settings of a [`ScoringClient`].
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// URL of the scoring endpoint.
    pub url: String,
    /// Wire protocol.
    pub protocol: ScoringProtocol,
    /// Backoff between retries.
    pub backoff: RetryBackoff,
    /// Timeout of one call.
    pub timeout: Duration,
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// Consecutive failures that open the breaker.
    pub breaker_failures: u32,
    /// How long the breaker stays open.
    pub breaker_reset: Duration,
}

/// The backoff between scoring attempts, from the spec's `retryBackoff` (base, factor, cap),
/// with jitter (the worker's one [`Backoff`](crate::backoff::Backoff)).
pub fn backoff(b: &RetryBackoff) -> crate::backoff::Backoff {
    crate::backoff::Backoff::from_spec(b)
}

/// The scoring client.
pub struct ScoringClient {
    http: reqwest::Client,
    settings: ClientSettings,
    breaker: CircuitBreaker,
    metrics: ClientMetrics,
}

impl ScoringClient {
    /// Builds the client.
    pub fn new(settings: ClientSettings, metrics: ClientMetrics) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .pool_max_idle_per_host(4)
            .build()?;
        Ok(Self {
            http,
            breaker: CircuitBreaker::new(settings.breaker_failures, settings.breaker_reset),
            settings,
            metrics,
        })
    }

    /// Scores one batch: up to `1 + max_retries` attempts with capped exponential backoff in
    /// between. An open breaker fails an attempt without a call. The time this takes is bounded
    /// by the settings, so a graceful shutdown simply lets it finish: the batch then commits,
    /// scored or on the error topic.
    pub async fn score(&mut self, inputs: &[ScoreInput]) -> Result<Scored, ScoringFailure> {
        let body = encode_request(self.settings.protocol, inputs).map_err(|e| ScoringFailure {
            attempts: 0,
            last: CallError::Other(format!("cannot encode the request: {e}")),
        })?;
        let mut attempts = 0;
        let mut delays = backoff(&self.settings.backoff);
        loop {
            attempts += 1;
            if attempts > 1 {
                self.metrics.retries.inc();
                delays.wait().await;
            }
            let result = match self.breaker.allow(Instant::now()) {
                Err(left) => Err(CallError::CircuitOpen(left.as_millis() as u64)),
                Ok(()) => {
                    let started = Instant::now();
                    let r = self.call(&body, inputs).await;
                    self.metrics
                        .duration
                        .observe(started.elapsed().as_secs_f64());
                    r
                }
            };
            match result {
                Ok(scored) => {
                    self.metrics.calls.with_label_values(&["ok"]).inc();
                    self.breaker.on_success();
                    self.metrics
                        .circuit
                        .set(self.breaker.state(Instant::now()).gauge());
                    return Ok(scored);
                }
                Err(e) => {
                    self.metrics.calls.with_label_values(&[e.label()]).inc();
                    if e.counts_for_breaker() && self.breaker.on_failure(Instant::now()) {
                        self.metrics.circuit_opened.inc();
                        warn!(error = %e, "scoring circuit breaker opened");
                    }
                    self.metrics
                        .circuit
                        .set(self.breaker.state(Instant::now()).gauge());
                    let retry = e.is_retryable() && attempts <= self.settings.max_retries;
                    debug!(error = %e, attempts, retry, batch = inputs.len(), "scoring attempt failed");
                    if !retry {
                        return Err(ScoringFailure { attempts, last: e });
                    }
                }
            }
        }
    }

    async fn call(&self, body: &[u8], inputs: &[ScoreInput]) -> Result<Scored, CallError> {
        let timeout_ms = self.settings.timeout.as_millis() as u64;
        let transport = |e: reqwest::Error| {
            if e.is_timeout() {
                CallError::Timeout(timeout_ms)
            } else if e.is_connect() {
                CallError::Connect(e.to_string())
            } else {
                CallError::Other(e.to_string())
            }
        };
        // The current span is the group's `streamops.score` span, if any (see telemetry).
        let mut trace = reqwest::header::HeaderMap::new();
        crate::telemetry::inject_current(&mut trace);
        let resp = self
            .http
            .post(&self.settings.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .headers(trace)
            .body(body.to_vec())
            .send()
            .await
            .map_err(transport)?;
        let status = resp.status();
        crate::telemetry::record_status(status.as_u16());
        let bytes = resp.bytes().await.map_err(transport)?;
        if status != StatusCode::OK {
            let text = String::from_utf8_lossy(&bytes);
            let mut body: String = text.chars().take(MAX_BODY_IN_REASON).collect();
            if text.chars().count() > MAX_BODY_IN_REASON {
                body.push('…');
            }
            return Err(CallError::Status {
                status: status.as_u16(),
                body,
            });
        }
        let parsed = decode_response(self.settings.protocol, &self.settings.url, &bytes, inputs)?;
        check_response(parsed, inputs)
    }
}

/// The request body of one call in `protocol`.
pub fn encode_request(
    protocol: ScoringProtocol,
    inputs: &[ScoreInput],
) -> Result<Vec<u8>, serde_json::Error> {
    match protocol {
        ScoringProtocol::Streamops => serde_json::to_vec(&PredictRequest {
            transactions: inputs.to_vec(),
        }),
        ScoringProtocol::KserveV1 => serde_json::to_vec(&V1Request {
            instances: inputs.iter().map(|i| model::features(i).to_vec()).collect(),
        }),
        ScoringProtocol::OpenInferenceV2 => serde_json::to_vec(&V2Request {
            id: inputs.first().map(|i| i.transaction_id.clone()),
            inputs: vec![V2Tensor {
                name: "transactions".into(),
                shape: vec![inputs.len() as u64, model::FEATURES.len() as u64],
                datatype: "FP64".into(),
                data: inputs.iter().flat_map(model::features).collect(),
            }],
        }),
    }
}

/// The model name in a KServe (`.../v1/models/NAME:predict`) or Open Inference
/// (`.../v2/models/NAME/infer`) URL, used as the model version when the answer names none.
fn model_name_of(url: &str) -> Option<&str> {
    let rest = url.split("/models/").nth(1)?;
    let name = rest.split([':', '/', '?']).next()?;
    (!name.is_empty()).then_some(name)
}

/// The probability of the fraud class in one KServe V1 prediction: a number, or a list of class
/// probabilities whose last entry is the fraud class.
fn v1_score(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::Array(a) if !a.is_empty() => a.last()?.as_f64(),
        _ => None,
    }
}

/// Decodes an answer in `protocol` into the streamops shape (one prediction per input, ids from
/// the inputs for the tensor protocols, which answer by position).
pub fn decode_response(
    protocol: ScoringProtocol,
    url: &str,
    bytes: &[u8],
    inputs: &[ScoreInput],
) -> Result<PredictResponse, CallError> {
    let malformed = |e: String| CallError::Malformed(e);
    let by_position = |scores: Vec<f64>, version: String| PredictResponse {
        model_version: version,
        predictions: scores
            .into_iter()
            .zip(inputs)
            .map(|(score, i)| ScoreOutput {
                transaction_id: i.transaction_id.clone(),
                score,
            })
            .collect(),
    };
    let fallback_version = || model_name_of(url).unwrap_or("unknown").to_string();
    match protocol {
        ScoringProtocol::Streamops => serde_json::from_slice(bytes)
            .map_err(|e| malformed(format!("not a prediction batch: {e}"))),
        ScoringProtocol::KserveV1 => {
            let r: V1Response = serde_json::from_slice(bytes)
                .map_err(|e| malformed(format!("not a KServe V1 answer: {e}")))?;
            let scores = r
                .predictions
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v1_score(v).ok_or_else(|| {
                        malformed(format!("predictions[{i}] is neither a number nor a list of class probabilities"))
                    })
                })
                .collect::<Result<Vec<f64>, _>>()?;
            if scores.len() != inputs.len() {
                return Err(malformed(format!(
                    "{} predictions for {} transactions",
                    scores.len(),
                    inputs.len()
                )));
            }
            Ok(by_position(
                scores,
                r.model_version.unwrap_or_else(fallback_version),
            ))
        }
        ScoringProtocol::OpenInferenceV2 => {
            let r: V2Response = serde_json::from_slice(bytes)
                .map_err(|e| malformed(format!("not an Open Inference answer: {e}")))?;
            let out = r
                .outputs
                .first()
                .ok_or_else(|| malformed("the answer has no output tensor".into()))?;
            let n = inputs.len() as u64;
            let columns = match out.shape.as_slice() {
                [rows] if *rows == n => 1,
                [rows, cols] if *rows == n && (1..=2).contains(cols) => *cols as usize,
                shape => {
                    return Err(malformed(format!(
                        "output {:?} has shape {shape:?}; expected [{n}], [{n}, 1] or [{n}, 2]",
                        out.name
                    )))
                }
            };
            if out.data.len() != inputs.len() * columns {
                return Err(malformed(format!(
                    "output {:?} holds {} values for shape {:?}",
                    out.name,
                    out.data.len(),
                    out.shape
                )));
            }
            // The last column is the fraud class.
            let scores = out
                .data
                .chunks(columns)
                .filter_map(|c| c.last().copied())
                .collect();
            let version = match r.model_version {
                Some(v) if !v.trim().is_empty() => v,
                _ => r.model_name,
            };
            Ok(by_position(scores, version))
        }
    }
}

/// Checks that a response holds one valid score per input, in input order.
pub fn check_response(resp: PredictResponse, inputs: &[ScoreInput]) -> Result<Scored, CallError> {
    if resp.model_version.trim().is_empty() || resp.model_version.len() > 128 {
        return Err(CallError::Malformed(
            "model_version must be 1-128 bytes".into(),
        ));
    }
    if resp.predictions.len() != inputs.len() {
        return Err(CallError::Malformed(format!(
            "{} predictions for {} transactions",
            resp.predictions.len(),
            inputs.len()
        )));
    }
    let mut scores = Vec::with_capacity(inputs.len());
    for (i, (p, input)) in resp.predictions.iter().zip(inputs).enumerate() {
        if p.transaction_id != input.transaction_id {
            return Err(CallError::Malformed(format!(
                "prediction {i} is for {:?}, expected {:?}",
                p.transaction_id, input.transaction_id
            )));
        }
        if !(p.score.is_finite() && (0.0..=1.0).contains(&p.score)) {
            return Err(CallError::Malformed(format!(
                "score of {:?} is {}, not in [0, 1]",
                p.transaction_id, p.score
            )));
        }
        scores.push(p.score);
    }
    Ok(Scored {
        model_version: Arc::from(resp.model_version),
        scores,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scorer::api::ScoreOutput;

    fn input(id: &str) -> ScoreInput {
        ScoreInput {
            transaction_id: id.into(),
            account_id: "a".into(),
            merchant: "m".into(),
            amount: 1.0,
            currency: "USD".into(),
            timestamp: "2024-03-20T10:30:00Z".into(),
        }
    }

    fn response(scores: &[(&str, f64)]) -> PredictResponse {
        PredictResponse {
            model_version: "v1".into(),
            predictions: scores
                .iter()
                .map(|(id, s)| ScoreOutput {
                    transaction_id: (*id).into(),
                    score: *s,
                })
                .collect(),
        }
    }

    #[test]
    fn retries_follow_the_spec_backoff() {
        let b = RetryBackoff {
            base_ms: 50,
            factor: 3.0,
            cap_ms: 2_000,
        };
        let mut delays = backoff(&b);
        for retry in 1..=20u32 {
            let d = delays.next_delay();
            let full = b.ceiling(retry);
            assert!(
                d <= full && d >= full / 2,
                "retry {retry}: {d:?} vs {full:?}"
            );
        }
        assert_eq!(b.ceiling(1), Duration::from_millis(50));
        assert_eq!(b.ceiling(2), Duration::from_millis(150));
        assert_eq!(b.ceiling(30), Duration::from_millis(2_000));
        let default = RetryBackoff::default();
        assert_eq!(default.ceiling(1), Duration::from_millis(100));
        assert_eq!(default.ceiling(2), Duration::from_millis(200));
        assert_eq!(default.ceiling(10), Duration::from_secs(5));
    }

    #[test]
    fn requests_carry_the_documented_feature_vector_in_the_tensor_protocols() {
        let inputs = [input("a"), input("b")];
        let v1: serde_json::Value =
            serde_json::from_slice(&encode_request(ScoringProtocol::KserveV1, &inputs).unwrap())
                .unwrap();
        let f = model::features(&inputs[0]);
        assert_eq!(v1["instances"].as_array().unwrap().len(), 2);
        // serde_json's default float parsing may differ from the printed value in the last bit.
        let sent: Vec<f64> = v1["instances"][0]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(sent.len(), model::FEATURES.len());
        for (s, e) in sent.iter().zip(f) {
            assert!((s - e).abs() <= e.abs() * 1e-15, "{s} vs {e}");
        }
        let v2: serde_json::Value = serde_json::from_slice(
            &encode_request(ScoringProtocol::OpenInferenceV2, &inputs).unwrap(),
        )
        .unwrap();
        assert_eq!(v2["inputs"][0]["shape"], serde_json::json!([2, 7]));
        assert_eq!(v2["inputs"][0]["datatype"], "FP64");
        assert_eq!(v2["inputs"][0]["data"].as_array().unwrap().len(), 14);
    }

    #[test]
    fn tensor_answers_are_read_by_position_with_the_fraud_class_last() {
        let inputs = [input("a"), input("b")];
        let url = "http://m/v1/models/fraud:predict";
        let r = decode_response(
            ScoringProtocol::KserveV1,
            url,
            br#"{"predictions": [[0.9, 0.1], [0.2, 0.8]]}"#,
            &inputs,
        )
        .unwrap();
        let s = check_response(r, &inputs).unwrap();
        assert_eq!(s.scores, vec![0.1, 0.8]);
        assert_eq!(&*s.model_version, "fraud");
        let r = decode_response(
            ScoringProtocol::KserveV1,
            url,
            br#"{"predictions": [0.3, 0.4]}"#,
            &inputs,
        )
        .unwrap();
        assert_eq!(check_response(r, &inputs).unwrap().scores, vec![0.3, 0.4]);
        let v2 = br#"{"model_name": "fraud", "model_version": "3", "outputs":
            [{"name": "p", "shape": [2, 2], "datatype": "FP32", "data": [0.9, 0.1, 0.2, 0.8]}]}"#;
        let r = decode_response(ScoringProtocol::OpenInferenceV2, url, v2, &inputs).unwrap();
        let s = check_response(r, &inputs).unwrap();
        assert_eq!(s.scores, vec![0.1, 0.8]);
        assert_eq!(&*s.model_version, "3");
    }

    #[test]
    fn tensor_answers_of_the_wrong_size_are_malformed() {
        let inputs = [input("a"), input("b")];
        let url = "http://m/v2/models/fraud/infer";
        for (p, body) in [
            (ScoringProtocol::KserveV1, &br#"{"predictions": [0.3]}"#[..]),
            (ScoringProtocol::KserveV1, br#"{"predictions": ["x", 0.1]}"#),
            (
                ScoringProtocol::OpenInferenceV2,
                br#"{"model_name": "f", "outputs": [{"name": "p", "shape": [3], "datatype": "FP64", "data": [1, 2, 3]}]}"#,
            ),
            (
                ScoringProtocol::OpenInferenceV2,
                br#"{"model_name": "f", "outputs": [{"name": "p", "shape": [2], "datatype": "FP64", "data": [1]}]}"#,
            ),
            (ScoringProtocol::OpenInferenceV2, br#"{"model_name": "f", "outputs": []}"#),
        ] {
            assert!(
                matches!(
                    decode_response(p, url, body, &inputs),
                    Err(CallError::Malformed(_))
                ),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn client_errors_are_not_retried_but_408_429_and_5xx_are() {
        let status = |s| CallError::Status {
            status: s,
            body: String::new(),
        };
        assert!(!status(400).is_retryable());
        assert!(!status(422).is_retryable());
        assert!(status(408).is_retryable());
        assert!(status(429).is_retryable());
        assert!(status(503).is_retryable());
        assert!(CallError::Timeout(1).is_retryable());
        assert!(CallError::Malformed(String::new()).is_retryable());
    }

    #[test]
    fn response_in_request_order_is_accepted() {
        let s = check_response(
            response(&[("a", 0.1), ("b", 0.9)]),
            &[input("a"), input("b")],
        )
        .unwrap();
        assert_eq!(s.scores, vec![0.1, 0.9]);
        assert_eq!(&*s.model_version, "v1");
    }

    #[test]
    fn response_with_missing_reordered_or_out_of_range_scores_is_malformed() {
        let inputs = [input("a"), input("b")];
        for bad in [
            response(&[("a", 0.1)]),
            response(&[("b", 0.1), ("a", 0.2)]),
            response(&[("a", 0.1), ("b", 1.5)]),
            response(&[("a", f64::NAN), ("b", 0.5)]),
        ] {
            assert!(matches!(
                check_response(bad, &inputs),
                Err(CallError::Malformed(_))
            ));
        }
        let mut no_version = response(&[("a", 0.1), ("b", 0.2)]);
        no_version.model_version.clear();
        assert!(check_response(no_version, &inputs).is_err());
    }
}
