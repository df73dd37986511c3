//! The reference scoring service over real HTTP: the API, the model's determinism, the fault
//! mode, the admin endpoints and the load loop.

use std::time::Duration;

use serde_json::{json, Value};
use streamops_worker::scorer::api::{PredictRequest, PredictResponse, ScoreInput};
use streamops_worker::scorer::load::{self, LoadArgs};
use streamops_worker::scorer::model::{self, MODEL_VERSION};
use streamops_worker::scorer::{FaultPlan, ScorerServer, ScorerStats};

async fn server() -> ScorerServer {
    ScorerServer::spawn("127.0.0.1:0".parse().unwrap(), FaultPlan::default())
        .await
        .unwrap()
}

fn input(id: &str, amount: f64) -> ScoreInput {
    ScoreInput {
        transaction_id: id.into(),
        account_id: "acc-1042".into(),
        merchant: "Corner Grocery".into(),
        amount,
        currency: "USD".into(),
        timestamp: "2024-03-20T10:30:00Z".into(),
    }
}

async fn post(url: &str, body: Value) -> (u16, String) {
    let resp = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test]
async fn predict_returns_one_model_score_per_transaction_in_request_order() {
    let s = server().await;
    let req = PredictRequest {
        transactions: vec![input("a", 12.0), input("b", 25_000.0), input("c", 300.0)],
    };
    let resp: PredictResponse = reqwest::Client::new()
        .post(s.predict_url())
        .json(&req)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(resp.model_version, MODEL_VERSION);
    let ids: Vec<_> = resp
        .predictions
        .iter()
        .map(|p| p.transaction_id.as_str())
        .collect();
    assert_eq!(ids, ["a", "b", "c"]);
    for (p, i) in resp.predictions.iter().zip(&req.transactions) {
        // JSON carries the shortest representation; serde_json parses it back to within an ulp.
        assert!(
            (p.score - model::score(i)).abs() < 1e-15,
            "{} vs {}",
            p.score,
            model::score(i)
        );
    }
    assert!(resp.predictions[1].score > resp.predictions[0].score);
    assert_eq!(
        s.stats(),
        ScorerStats {
            predict_requests: 1,
            transactions: 3,
            faults_injected: 0
        }
    );
    s.stop().await.unwrap();
}

#[tokio::test]
async fn invalid_transaction_is_answered_422_naming_the_field() {
    let s = server().await;
    let (status, body) = post(
        &s.predict_url(),
        json!({"transactions": [
            {"transaction_id": "a", "account_id": "x", "merchant": "m", "amount": 1.0, "currency": "USD", "timestamp": "2024-03-20T10:30:00Z"},
            {"transaction_id": "b", "account_id": "x", "merchant": "m", "amount": -1.0, "currency": "USD", "timestamp": "2024-03-20T10:30:00Z"}
        ]}),
    )
    .await;
    assert_eq!(status, 422);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["error"],
        "transactions[1].amount must be finite and positive"
    );
    let (status, _) = post(&s.predict_url(), json!({"transactions": []})).await;
    assert_eq!(status, 422);
    s.stop().await.unwrap();
}

#[tokio::test]
async fn body_that_is_not_json_is_answered_400() {
    let s = server().await;
    let resp = reqwest::Client::new()
        .post(s.predict_url())
        .header("content-type", "application/json")
        .body("{\"transactions\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"].is_string());
    s.stop().await.unwrap();
}

#[tokio::test]
async fn health_reports_ok_and_the_model_version() {
    let s = server().await;
    let v: Value = reqwest::get(format!("http://{}/health", s.addr()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v, json!({"status": "ok", "model_version": MODEL_VERSION}));
    s.stop().await.unwrap();
}

#[tokio::test]
async fn status_fault_applies_to_the_next_requests_only() {
    let s = server().await;
    s.set_faults(FaultPlan {
        status: Some(503),
        count: Some(2),
        ..FaultPlan::default()
    });
    let body = json!({"transactions": [input("a", 5.0)]});
    assert_eq!(post(&s.predict_url(), body.clone()).await.0, 503);
    assert_eq!(post(&s.predict_url(), body.clone()).await.0, 503);
    assert_eq!(post(&s.predict_url(), body).await.0, 200);
    assert_eq!(s.stats().faults_injected, 2);
    s.stop().await.unwrap();
}

#[tokio::test]
async fn malformed_fault_answers_200_with_a_body_that_is_not_a_prediction_batch() {
    let s = server().await;
    s.set_faults(FaultPlan {
        malformed: true,
        ..FaultPlan::default()
    });
    let (status, body) = post(&s.predict_url(), json!({"transactions": [input("a", 5.0)]})).await;
    assert_eq!(status, 200);
    assert!(serde_json::from_str::<PredictResponse>(&body).is_err());
    s.stop().await.unwrap();
}

#[tokio::test]
async fn delay_fault_makes_a_short_client_timeout_expire() {
    let s = server().await;
    s.set_faults(FaultPlan {
        delay_ms: 2_000,
        count: Some(1),
        ..FaultPlan::default()
    });
    let err = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap()
        .post(s.predict_url())
        .json(&json!({"transactions": [input("a", 5.0)]}))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    s.stop().await.unwrap();
}

#[tokio::test]
async fn admin_endpoint_sets_the_fault_plan_and_reports_stats() {
    let s = server().await;
    let base = format!("http://{}", s.addr());
    let (status, _) = post(
        &format!("{base}/admin/faults"),
        json!({"status": 500, "count": 1}),
    )
    .await;
    assert_eq!(status, 200);
    let body = json!({"transactions": [input("a", 5.0)]});
    assert_eq!(post(&s.predict_url(), body.clone()).await.0, 500);
    assert_eq!(post(&s.predict_url(), body).await.0, 200);
    let stats: ScorerStats = reqwest::get(format!("{base}/admin/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats.predict_requests, 2);
    assert_eq!(stats.faults_injected, 1);
    assert_eq!(stats.transactions, 1);
    let (status, _) = post(&format!("{base}/admin/faults"), json!({"colour": "red"})).await;
    assert_eq!(status, 422);
    s.stop().await.unwrap();
}

#[tokio::test]
async fn metrics_count_requests_by_outcome() {
    let s = server().await;
    post(&s.predict_url(), json!({"transactions": [input("a", 5.0)]})).await;
    post(&s.predict_url(), json!({"transactions": []})).await;
    let text = reqwest::get(format!("http://{}/metrics", s.addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("streamops_scorer_requests_total{outcome=\"ok\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("streamops_scorer_requests_total{outcome=\"invalid\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("streamops_scorer_transactions_total 1"),
        "{text}"
    );
    s.stop().await.unwrap();
}

#[tokio::test]
async fn load_loop_gets_every_transaction_scored() {
    let s = server().await;
    let report = load::run(&LoadArgs {
        url: s.predict_url(),
        requests: 20,
        batch_size: 50,
        concurrency: 4,
        timeout_ms: 10_000,
    })
    .await
    .unwrap();
    assert_eq!(report.ok_requests, 20);
    assert_eq!(report.failed_requests, 0);
    assert_eq!(report.transactions, 1000);
    assert_eq!(s.stats().transactions, 1000);
    s.stop().await.unwrap();
}

#[tokio::test]
async fn scorer_subcommand_serves_until_sigterm_and_exits_zero() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_streamops-worker"))
        .args([
            "scorer",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--fault-status",
            "503",
            "--fault-count",
            "1",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let start = std::time::Instant::now();
    loop {
        if let Ok(r) = reqwest::get(format!("{base}/health")).await {
            assert_eq!(r.status().as_u16(), 200);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the scorer never answered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = json!({"transactions": [input("a", 5.0)]});
    let url = format!("{base}/predict");
    assert_eq!(
        post(&url, body.clone()).await.0,
        503,
        "the fault flags apply"
    );
    assert_eq!(post(&url, body).await.0, 200);
    assert_eq!(
        reqwest::Client::new()
            .post(format!("{base}/admin/faults"))
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        404,
        "admin endpoints need --admin"
    );
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}
