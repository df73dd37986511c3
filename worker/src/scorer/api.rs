//! Wire types of the scoring API, shared by the reference service and the fraud handler's client.

use serde::{Deserialize, Serialize};

/// Body of `POST /predict`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictRequest {
    /// Transactions to score, at most [`MAX_BATCH`].
    pub transactions: Vec<ScoreInput>,
}

/// Most transactions in one `POST /predict`.
pub const MAX_BATCH: usize = 10_000;

/// One transaction to score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreInput {
    /// Transaction id, echoed back in the prediction.
    pub transaction_id: String,
    /// Account (card holder) id.
    pub account_id: String,
    /// Merchant.
    pub merchant: String,
    /// Amount in major units of `currency`.
    pub amount: f64,
    /// ISO 4217 code.
    pub currency: String,
    /// RFC 3339 timestamp of the transaction.
    pub timestamp: String,
}

/// Response of `POST /predict`: one prediction per input, in input order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictResponse {
    /// Version of the model that produced the scores.
    pub model_version: String,
    /// Predictions, in the order of the request's transactions.
    pub predictions: Vec<ScoreOutput>,
}

/// One prediction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreOutput {
    /// The transaction's id.
    pub transaction_id: String,
    /// Fraud probability in `[0, 1]`.
    pub score: f64,
}

/// Body of every error answer (4xx and 5xx).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}

/// Body of `GET /health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthBody {
    /// Always `ok` when the service answers.
    pub status: String,
    /// Version of the model served.
    pub model_version: String,
}

// ---- KServe/Seldon V1 (`POST /v1/models/<name>:predict`).

/// KServe V1 request: one feature vector per instance (see [`crate::scorer::model::features`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct V1Request {
    /// Feature vectors.
    pub instances: Vec<Vec<f64>>,
}

/// KServe V1 response: one prediction per instance, in order. A prediction is a probability, or
/// a list of class probabilities whose last entry is the fraud class (`predict_proba`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct V1Response {
    /// Predictions.
    pub predictions: Vec<serde_json::Value>,
    /// Optional model version (KServe does not require one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
}

// ---- Open Inference Protocol, V2 (`POST /v2/models/<name>/infer`).

/// A tensor of the Open Inference Protocol, with its data flattened in row-major order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct V2Tensor {
    /// Tensor name.
    pub name: String,
    /// Shape, such as `[batch, 7]`.
    pub shape: Vec<u64>,
    /// Data type: `FP64` or `FP32` for the fraud model.
    pub datatype: String,
    /// Row-major data.
    pub data: Vec<f64>,
}

/// Open Inference Protocol request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct V2Request {
    /// Request id, echoed back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Input tensors; the fraud model reads the first.
    pub inputs: Vec<V2Tensor>,
}

/// Open Inference Protocol response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct V2Response {
    /// Model name.
    pub model_name: String,
    /// Model version, if the server reports one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    /// The request's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Output tensors; the client reads the first: shape `[batch]` or `[batch, 1]` (fraud
    /// probability) or `[batch, 2]` (class probabilities, fraud last).
    pub outputs: Vec<V2Tensor>,
}
