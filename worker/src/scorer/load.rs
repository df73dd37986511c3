//! A bounded load loop against a scoring service, to measure its own limit (`make bench`). It sends
//! a fixed number of `POST /predict` requests of synthetic transactions, with a fixed number in
//! flight, and reports the rate. Point it only at a service on this machine.

use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use serde::Serialize;

use super::api::{PredictRequest, PredictResponse, ScoreInput};

/// Settings of one load run.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// `POST /predict` URL of the service under test.
    #[arg(long, default_value = "http://127.0.0.1:8080/predict")]
    pub url: String,
    /// Requests to send.
    #[arg(long, default_value_t = 2000)]
    pub requests: u64,
    /// Transactions per request.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Timeout of one request, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
}

/// Result of a load run.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// Requests answered with a valid prediction batch.
    pub ok_requests: u64,
    /// Requests that failed.
    pub failed_requests: u64,
    /// Transactions scored.
    pub transactions: u64,
    /// Wall time.
    pub seconds: f64,
    /// Transactions scored per second.
    pub transactions_per_second: f64,
}

/// Errors of a load run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

fn batch(request: u64, size: usize) -> PredictRequest {
    let currencies = ["USD", "EUR", "GBP", "JPY", "CHF", "SEK"];
    PredictRequest {
        transactions: (0..size)
            .map(|i| {
                let n = request * size as u64 + i as u64;
                ScoreInput {
                    transaction_id: format!("load-{n}"),
                    account_id: format!("acc-{}", n % 997),
                    merchant: format!("merchant-{}", n % 131),
                    amount: 1.0 + (n % 5000) as f64 * 0.37,
                    currency: currencies[(n % currencies.len() as u64) as usize].into(),
                    timestamp: format!("2024-03-20T{:02}:{:02}:00Z", n % 24, n % 60),
                }
            })
            .collect(),
    }
}

/// Runs the load loop.
pub async fn run(args: &LoadArgs) -> Result<LoadReport, LoadError> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(args.timeout_ms))
        .build()?;
    // Build every body first so the loop measures the service, not the generator.
    let bodies: Vec<Vec<u8>> = (0..args.requests)
        .map(|r| serde_json::to_vec(&batch(r, args.batch_size)).unwrap_or_default())
        .collect();
    let started = Instant::now();
    let results: Vec<Option<u64>> = stream::iter(bodies)
        .map(|body| {
            let client = client.clone();
            let url = args.url.clone();
            async move {
                let resp = client
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .ok()?;
                if !resp.status().is_success() {
                    return None;
                }
                let parsed: PredictResponse = resp.json().await.ok()?;
                Some(parsed.predictions.len() as u64)
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    let seconds = started.elapsed().as_secs_f64();
    let ok_requests = results.iter().filter(|r| r.is_some()).count() as u64;
    let transactions: u64 = results.iter().flatten().sum();
    Ok(LoadReport {
        ok_requests,
        failed_requests: args.requests - ok_requests,
        transactions,
        seconds,
        transactions_per_second: if seconds > 0.0 {
            transactions as f64 / seconds
        } else {
            0.0
        },
    })
}
