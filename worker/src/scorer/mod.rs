//! The reference fraud-scoring service: `streamops-worker scorer --listen 127.0.0.1:8080`.
//!
//! It stands in for seed 003's "ML API" so the fraud handler, its demo and its tests run against a
//! real HTTP server. The model is deterministic, so equal inputs always get equal scores.
//!
//! # Endpoints
//! - `POST /predict`: scores a batch.
//!   Request: `{"transactions": [{"transaction_id": "t-1", "account_id": "acc-7",
//!   "merchant": "Corner Grocery", "amount": 42.5, "currency": "USD",
//!   "timestamp": "2024-03-20T10:30:00Z"}]}` (1 to 10,000 transactions).
//!   Response `200`: `{"model_version": "streamops-logit-v1", "predictions":
//!   [{"transaction_id": "t-1", "score": 0.0731}]}`, one prediction per transaction, in request
//!   order. A body that is not such JSON gets `400` (syntax) or `422` (shape); an invalid
//!   transaction (empty id, amount not finite and positive, currency not three uppercase letters,
//!   timestamp not RFC 3339) gets `422`. Error bodies are `{"error": "..."}`.
//! - `POST /v1/models/<name>:predict` (KServe/Seldon V1): `{"instances": [[f0, ..., f6], ...]}`
//!   -> `{"predictions": [0.0731, ...], "model_version": "streamops-logit-v1"}`; each instance is
//!   the feature vector of [`model::features`]. A batch that is not 1 to 10,000 rows of 7 finite
//!   numbers gets `400`.
//! - `POST /v2/models/<name>/infer` (Open Inference Protocol): one input tensor of shape
//!   `[batch, 7]`, `FP64` or `FP32`, the same feature vectors in row-major order; the answer has
//!   one output `fraud_probability`, shape `[batch]`, `FP64`. `GET /v2/models/<name>` gives the
//!   model's metadata, `GET /v2/health/ready` and `/v2/health/live` answer `200`.
//!   Every scoring endpoint scores with the same model and obeys the same fault plan.
//! - `GET /health`: `{"status": "ok", "model_version": "streamops-logit-v1"}`.
//! - `GET /metrics`: Prometheus text (`streamops_scorer_requests_total{outcome}`,
//!   `streamops_scorer_transactions_total`).
//! - `POST /admin/faults` (only with `--admin`): sets the fault plan below, body as JSON
//!   (`{"delay_ms": 0, "status": 503, "malformed": false, "count": 5}`); `GET /admin/stats`:
//!   `{"predict_requests": N, "transactions": N, "faults_injected": N}`.
//!
//! # Model `streamops-logit-v1`
//! `score = 1 / (1 + exp(-z))` with
//!
//! ```text
//! z = -5.2
//!   + 0.9 * ln(1 + amount_usd)
//!   + 0.8 * [UTC hour of timestamp < 6]
//!   + 0.5 * [currency not in the rate table]
//!   + 1.5 * (fnv1a64(merchant)   / 2^64 - 0.5)
//!   + 1.0 * (fnv1a64(account_id) / 2^64 - 0.5)
//! ```
//!
//! `amount_usd` divides the amount by a fixed rate (units per dollar) for 16 major currencies
//! ([`model::USD_RATES`]); other currencies are taken as dollars. `fnv1a64` is the 64-bit FNV-1a
//! hash of the UTF-8 bytes, standing in for learned per-merchant and per-account risk. A 20 USD
//! daytime purchase scores about 0.02-0.1, a 20,000 USD one about 0.9.
//!
//! # Fault mode (tests and demos only)
//! `--fault-delay-ms N` delays every `/predict` answer, `--fault-status CODE` answers it with that
//! status, `--fault-malformed` answers `200` with a truncated JSON body; `--fault-count N` limits
//! the faults to the next N requests (default: all). `--admin` exposes `/admin/faults` to change
//! the plan at run time. In-process tests use [`ScorerServer::set_faults`].

pub mod api;
pub mod load;
pub mod model;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::DateTime;
use prometheus::{Encoder, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use api::{
    ErrorBody, HealthBody, PredictRequest, PredictResponse, ScoreInput, ScoreOutput, V1Request,
    V1Response, V2Request, V2Response, V2Tensor, MAX_BATCH,
};

/// Command-line arguments of `streamops-worker scorer`.
#[derive(Debug, Clone, clap::Args)]
pub struct ScorerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Fault mode: delay every /predict answer by this many milliseconds.
    #[arg(long, default_value_t = 0)]
    pub fault_delay_ms: u64,
    /// Fault mode: answer /predict with this HTTP status.
    #[arg(long)]
    pub fault_status: Option<u16>,
    /// Fault mode: answer /predict with a truncated JSON body.
    #[arg(long)]
    pub fault_malformed: bool,
    /// Fault mode: apply the faults to the next N requests only.
    #[arg(long)]
    pub fault_count: Option<u64>,
    /// Serve POST /admin/faults and GET /admin/stats.
    #[arg(long)]
    pub admin: bool,
}

/// Faults applied to `/predict` answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultPlan {
    /// Delay before answering, in milliseconds.
    pub delay_ms: u64,
    /// Answer with this status instead of scoring.
    pub status: Option<u16>,
    /// Answer `200` with a truncated JSON body.
    pub malformed: bool,
    /// Apply to this many more requests; `None` means all.
    pub count: Option<u64>,
}

impl FaultPlan {
    fn is_none(&self) -> bool {
        self.delay_ms == 0 && self.status.is_none() && !self.malformed
    }
}

/// Counters of a scorer, for tests and `/admin/stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScorerStats {
    /// `POST /predict` requests received.
    pub predict_requests: u64,
    /// Transactions scored.
    pub transactions: u64,
    /// Requests that got a fault instead of (or delaying) a normal answer.
    pub faults_injected: u64,
}

struct Shared {
    faults: Mutex<FaultPlan>,
    predict_requests: AtomicU64,
    transactions: AtomicU64,
    faults_injected: AtomicU64,
    registry: Registry,
    requests: IntCounterVec,
    scored: IntCounter,
}

impl Shared {
    fn new(faults: FaultPlan) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "streamops_scorer_requests_total",
                "POST /predict requests by outcome (ok, invalid, fault).",
            ),
            &["outcome"],
        )?;
        let scored = IntCounter::new(
            "streamops_scorer_transactions_total",
            "Transactions scored.",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(scored.clone()))?;
        Ok(Self {
            faults: Mutex::new(faults),
            predict_requests: AtomicU64::new(0),
            transactions: AtomicU64::new(0),
            faults_injected: AtomicU64::new(0),
            registry,
            requests,
            scored,
        })
    }

    /// Takes the fault for one request, if any, counting it down.
    fn take_fault(&self) -> Option<FaultPlan> {
        let mut plan = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        if plan.is_none() || plan.count == Some(0) {
            return None;
        }
        if let Some(n) = plan.count.as_mut() {
            *n -= 1;
        }
        Some(plan.clone())
    }

    fn stats(&self) -> ScorerStats {
        ScorerStats {
            predict_requests: self.predict_requests.load(Ordering::Relaxed),
            transactions: self.transactions.load(Ordering::Relaxed),
            faults_injected: self.faults_injected.load(Ordering::Relaxed),
        }
    }
}

/// Errors starting the scorer.
#[derive(Debug, thiserror::Error)]
pub enum ScorerError {
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The server failed.
    #[error("scorer server failed: {0}")]
    Serve(#[source] std::io::Error),
    /// Metrics could not be registered.
    #[error("cannot register scorer metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(ErrorBody { error: msg.into() })).into_response()
}

fn validate(i: usize, t: &ScoreInput) -> Result<(), String> {
    if t.transaction_id.trim().is_empty() {
        return Err(format!(
            "transactions[{i}].transaction_id must not be empty"
        ));
    }
    if !(t.amount.is_finite() && t.amount > 0.0) {
        return Err(format!(
            "transactions[{i}].amount must be finite and positive"
        ));
    }
    if !(t.currency.len() == 3 && t.currency.bytes().all(|b| b.is_ascii_uppercase())) {
        return Err(format!(
            "transactions[{i}].currency must be three uppercase letters"
        ));
    }
    if DateTime::parse_from_rfc3339(&t.timestamp).is_err() {
        return Err(format!("transactions[{i}].timestamp must be RFC 3339"));
    }
    Ok(())
}

/// Counts a scoring request and applies the fault plan to it; `Some` is the faulty answer.
async fn apply_fault(s: &Shared) -> Option<Response> {
    s.predict_requests.fetch_add(1, Ordering::Relaxed);
    let fault = s.take_fault()?;
    s.faults_injected.fetch_add(1, Ordering::Relaxed);
    s.requests.with_label_values(&["fault"]).inc();
    if fault.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(fault.delay_ms)).await;
    }
    if let Some(code) = fault.status {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return Some(error(status, format!("injected fault: status {code}")));
    }
    if fault.malformed {
        return Some(
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                r#"{"model_version": "streamops-logit-v1", "predictions": [{"transaction_id""#,
            )
                .into_response(),
        );
    }
    None
}

/// Checks the feature vectors of a tensor request: 1 to [`MAX_BATCH`] rows of
/// [`model::FEATURES`] finite values each.
fn validate_rows(rows: &[&[f64]]) -> Result<(), String> {
    if rows.is_empty() || rows.len() > MAX_BATCH {
        return Err(format!("the batch must hold 1 to {MAX_BATCH} instances"));
    }
    for (i, r) in rows.iter().enumerate() {
        if r.len() != model::FEATURES.len() {
            return Err(format!(
                "instance {i} has {} features; the model takes {} ({})",
                r.len(),
                model::FEATURES.len(),
                model::FEATURES.join(", ")
            ));
        }
        if let Some(j) = r.iter().position(|v| !v.is_finite()) {
            return Err(format!(
                "instance {i}: feature {} is not finite",
                model::FEATURES[j]
            ));
        }
    }
    Ok(())
}

fn scored_rows(s: &Shared, rows: &[&[f64]]) -> Vec<f64> {
    let scores: Vec<f64> = rows.iter().map(|r| model::score_features(r)).collect();
    let n = scores.len() as u64;
    s.transactions.fetch_add(n, Ordering::Relaxed);
    s.scored.inc_by(n);
    s.requests.with_label_values(&["ok"]).inc();
    scores
}

/// `POST /v1/models/<name>:predict` (KServe/Seldon V1). The model name is not checked.
async fn predict_v1(
    State(s): State<Arc<Shared>>,
    Path(target): Path<String>,
    body: Result<Json<V1Request>, JsonRejection>,
) -> Response {
    if !target.ends_with(":predict") {
        return error(StatusCode::NOT_FOUND, "use POST /v1/models/<name>:predict");
    }
    if let Some(r) = apply_fault(&s).await {
        return r;
    }
    let Json(req) = match body {
        Ok(b) => b,
        Err(rejection) => {
            s.requests.with_label_values(&["invalid"]).inc();
            return error(rejection.status(), rejection.body_text());
        }
    };
    let rows: Vec<&[f64]> = req.instances.iter().map(Vec::as_slice).collect();
    if let Err(e) = validate_rows(&rows) {
        s.requests.with_label_values(&["invalid"]).inc();
        return error(StatusCode::BAD_REQUEST, e);
    }
    let scores = scored_rows(&s, &rows);
    Json(V1Response {
        predictions: scores.into_iter().map(serde_json::Value::from).collect(),
        model_version: Some(model::MODEL_VERSION.to_string()),
    })
    .into_response()
}

/// `POST /v2/models/<name>/infer` (Open Inference Protocol). Reads the first input tensor,
/// `[batch, 7]` FP64 or FP32, and answers one `[batch]` FP64 tensor named `fraud_probability`.
async fn infer_v2(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    body: Result<Json<V2Request>, JsonRejection>,
) -> Response {
    if let Some(r) = apply_fault(&s).await {
        return r;
    }
    let Json(req) = match body {
        Ok(b) => b,
        Err(rejection) => {
            s.requests.with_label_values(&["invalid"]).inc();
            return error(rejection.status(), rejection.body_text());
        }
    };
    let width = model::FEATURES.len();
    let checked = match req.inputs.first() {
        None => Err("the request has no input tensor".to_string()),
        Some(t) if !matches!(t.datatype.as_str(), "FP64" | "FP32") => Err(format!(
            "input {:?} has datatype {}; expected FP64 or FP32",
            t.name, t.datatype
        )),
        Some(t) if t.shape.len() != 2 || t.shape[1] as usize != width => Err(format!(
            "input {:?} has shape {:?}; expected [batch, {width}]",
            t.name, t.shape
        )),
        Some(t) if t.data.len() as u64 != t.shape[0].saturating_mul(width as u64) => Err(format!(
            "input {:?} holds {} values for shape {:?}",
            t.name,
            t.data.len(),
            t.shape
        )),
        Some(t) => {
            let rows: Vec<&[f64]> = t.data.chunks(width).collect();
            validate_rows(&rows).map(|()| rows)
        }
    };
    let rows = match checked {
        Ok(rows) => rows,
        Err(e) => {
            s.requests.with_label_values(&["invalid"]).inc();
            return error(StatusCode::BAD_REQUEST, e);
        }
    };
    let scores = scored_rows(&s, &rows);
    Json(V2Response {
        model_name: name,
        model_version: Some(model::MODEL_VERSION.to_string()),
        id: req.id,
        outputs: vec![V2Tensor {
            name: "fraud_probability".into(),
            shape: vec![scores.len() as u64],
            datatype: "FP64".into(),
            data: scores,
        }],
    })
    .into_response()
}

/// `GET /v2/health/ready` and `GET /v2/health/live`.
async fn v2_health() -> StatusCode {
    StatusCode::OK
}

/// `GET /v2/models/<name>`: model metadata.
async fn v2_metadata(Path(name): Path<String>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "name": name,
        "versions": [model::MODEL_VERSION],
        "platform": "streamops-reference",
        "inputs": [{"name": "transactions", "datatype": "FP64", "shape": [-1, model::FEATURES.len()]}],
        "outputs": [{"name": "fraud_probability", "datatype": "FP64", "shape": [-1]}],
    }))
}

async fn predict(
    State(s): State<Arc<Shared>>,
    body: Result<Json<PredictRequest>, JsonRejection>,
) -> Response {
    if let Some(r) = apply_fault(&s).await {
        return r;
    }
    let Json(req) = match body {
        Ok(b) => b,
        Err(rejection) => {
            s.requests.with_label_values(&["invalid"]).inc();
            return error(rejection.status(), rejection.body_text());
        }
    };
    if req.transactions.is_empty() || req.transactions.len() > MAX_BATCH {
        s.requests.with_label_values(&["invalid"]).inc();
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("transactions must hold 1 to {MAX_BATCH} entries"),
        );
    }
    for (i, t) in req.transactions.iter().enumerate() {
        if let Err(e) = validate(i, t) {
            s.requests.with_label_values(&["invalid"]).inc();
            return error(StatusCode::UNPROCESSABLE_ENTITY, e);
        }
    }
    let predictions: Vec<ScoreOutput> = req
        .transactions
        .into_iter()
        .map(|t| ScoreOutput {
            score: model::score(&t),
            transaction_id: t.transaction_id,
        })
        .collect();
    let n = predictions.len() as u64;
    s.transactions.fetch_add(n, Ordering::Relaxed);
    s.scored.inc_by(n);
    s.requests.with_label_values(&["ok"]).inc();
    Json(PredictResponse {
        model_version: model::MODEL_VERSION.to_string(),
        predictions,
    })
    .into_response()
}

async fn health() -> Json<HealthBody> {
    Json(HealthBody {
        status: "ok".into(),
        model_version: model::MODEL_VERSION.into(),
    })
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&s.registry.gather(), &mut buf) {
        Ok(()) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], buf).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn set_faults(
    State(s): State<Arc<Shared>>,
    body: Result<Json<FaultPlan>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(plan)) => {
            info!(?plan, "scorer fault plan changed");
            *s.faults.lock().unwrap_or_else(|p| p.into_inner()) = plan.clone();
            Json(plan).into_response()
        }
        Err(r) => error(r.status(), r.body_text()),
    }
}

async fn stats(State(s): State<Arc<Shared>>) -> Json<ScorerStats> {
    Json(s.stats())
}

fn router(shared: Arc<Shared>, admin: bool) -> Router {
    let mut r = Router::new()
        .route("/predict", post(predict))
        .route("/v1/models/{target}", post(predict_v1))
        .route("/v2/models/{name}/infer", post(infer_v2))
        .route("/v2/models/{name}", get(v2_metadata))
        .route("/v2/health/ready", get(v2_health))
        .route("/v2/health/live", get(v2_health))
        .route("/health", get(health))
        .route("/metrics", get(metrics));
    if admin {
        r = r
            .route("/admin/faults", post(set_faults))
            .route("/admin/stats", get(stats));
    }
    r.layer(DefaultBodyLimit::max(32 * 1024 * 1024))
        .with_state(shared)
}

/// A running scorer.
pub struct ScorerServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ScorerError>>,
}

impl ScorerServer {
    /// Binds `listen` (port 0 picks a free port) and serves in a background task, with the
    /// admin endpoints.
    pub async fn spawn(listen: SocketAddr, faults: FaultPlan) -> Result<Self, ScorerError> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| ScorerError::Bind {
                addr: listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ScorerError::Bind {
            addr: listen,
            source,
        })?;
        let shared = Arc::new(Shared::new(faults)?);
        let shutdown = CancellationToken::new();
        let app = router(shared.clone(), true);
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await
                .map_err(ScorerError::Serve)
        });
        Ok(Self {
            addr,
            shared,
            shutdown,
            task,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `POST /predict` URL.
    pub fn predict_url(&self) -> String {
        format!("http://{}/predict", self.addr)
    }

    /// The scoring URL for `protocol` (model name `fraud` for the tensor protocols).
    pub fn url_for(&self, protocol: streamops_crds::v1alpha1::ScoringProtocol) -> String {
        use streamops_crds::v1alpha1::ScoringProtocol as P;
        match protocol {
            P::Streamops => self.predict_url(),
            P::KserveV1 => format!("http://{}/v1/models/fraud:predict", self.addr),
            P::OpenInferenceV2 => format!("http://{}/v2/models/fraud/infer", self.addr),
        }
    }

    /// Replaces the fault plan.
    pub fn set_faults(&self, plan: FaultPlan) {
        *self.shared.faults.lock().unwrap_or_else(|p| p.into_inner()) = plan;
    }

    /// Counters so far.
    pub fn stats(&self) -> ScorerStats {
        self.shared.stats()
    }

    /// Stops accepting connections and waits for the server to finish.
    pub async fn stop(self) -> Result<(), ScorerError> {
        self.shutdown.cancel();
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(ScorerError::Serve(std::io::Error::other(e))),
        }
    }
}

/// Runs the scorer until `shutdown` is cancelled.
pub async fn run(args: ScorerArgs, shutdown: CancellationToken) -> Result<(), ScorerError> {
    let plan = FaultPlan {
        delay_ms: args.fault_delay_ms,
        status: args.fault_status,
        malformed: args.fault_malformed,
        count: args.fault_count,
    };
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|source| ScorerError::Bind {
            addr: args.listen,
            source,
        })?;
    let shared = Arc::new(Shared::new(plan.clone())?);
    info!(
        listen = %args.listen,
        model_version = model::MODEL_VERSION,
        admin = args.admin,
        faults = ?plan,
        "scorer listening"
    );
    axum::serve(listener, router(shared, args.admin))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(ScorerError::Serve)
}
