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
