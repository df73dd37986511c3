//! `GET /consumer/info/{id}` (seed 004's consumer info): counters, thresholds and the last trigger.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::engine::Engine;
use super::runs::{self, Run};
use super::trigger::{ms_to_time, trigger_id, Claimed};

/// The thresholds of the consumer.
#[derive(Debug, Clone, Serialize)]
pub struct Thresholds {
    /// `maxEvents`.
    pub max_events: u64,
    /// `maxTimeSeconds`.
    pub max_time_seconds: u64,
    /// `triggerOnEmptyWindow`.
    pub trigger_on_empty_window: bool,
}

/// Counters from Redis.
#[derive(Debug, Clone, Serialize)]
pub struct Counters {
    /// Events in the current window.
    pub events_in_window: u64,
    /// Events counted ever.
    pub events_total: u64,
    /// Start of the current window (the last trigger, or the first event).
    pub window_start: Option<DateTime<Utc>>,
    /// When the time threshold is reached, unless an event count trigger comes first.
    pub time_threshold_at: Option<DateTime<Utc>>,
    /// Triggers claimed so far (the last sequence number).
    pub triggers: u64,
    /// Triggers claimed and not yet delivered.
    pub pending_triggers: u64,
}

/// The last trigger: its `pipeline_runs` row, or, until it is recorded, the claim.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum LastTrigger {
    /// Recorded.
    Recorded(Run),
    /// Claimed in Redis, not yet recorded.
    Claimed {
        /// Trigger id.
        trigger_id: String,
        /// Sequence number.
        sequence: u64,
        /// The claim.
        #[serde(flatten)]
        claim: Claimed,
        /// Always `pending`.
        status: &'static str,
    },
}

/// Body of `GET /consumer/info/{id}`.
#[derive(Debug, Clone, Serialize)]
pub struct ConsumerInfo {
    /// Consumer id.
    pub consumer_id: String,
    /// Pipeline triggered.
    pub pipeline_name: String,
    /// `webhook` or `job`.
    pub target: &'static str,
    /// Thresholds.
    pub thresholds: Thresholds,
    /// Counters.
    pub counters: Counters,
    /// The last trigger, if any.
    pub last_trigger: Option<LastTrigger>,
}

fn error(status: StatusCode, msg: String) -> Response {
    (status, Json(serde_json::json!({ "error": msg }))).into_response()
}

/// Whether `id` names this consumer: its full id (`namespace/name`, URL-encoded in one segment)
/// or its name alone.
fn matches(consumer_id: &str, id: &str) -> bool {
    id == consumer_id
        || consumer_id
            .rsplit_once('/')
            .is_some_and(|(_, name)| name == id)
}

async fn info(engine: &Engine, id: &str) -> Response {
    if !matches(&engine.consumer_id, id) {
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "this worker serves consumer {:?}, not {id:?}",
                engine.consumer_id
            ),
        );
    }
    let snap = match engine.counter.snapshot().await {
        Ok(s) => s,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, format!("redis: {e}")),
    };
    let run = match runs::last_run(&engine.pool, &engine.consumer_id).await {
        Ok(r) => r,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, format!("database: {e}")),
    };
    let run = run.map(|mut r| {
        r.last_error = r.last_error.as_deref().map(without_remote_body);
        r
    });
    let last_trigger = match (run, snap.last_trigger) {
        (Some(r), Some(c)) if (c.seq as i64) > r.sequence => Some(claimed(engine, c)),
        (Some(r), _) => Some(LastTrigger::Recorded(r)),
        (None, Some(c)) => Some(claimed(engine, c)),
        (None, None) => None,
    };
    let max_time_ms = engine.max_time_ms() as i64;
    Json(ConsumerInfo {
        consumer_id: engine.consumer_id.clone(),
        pipeline_name: engine.settings.pipeline_name.clone(),
        target: engine.sink.target(),
        thresholds: Thresholds {
            max_events: engine.settings.max_events,
            max_time_seconds: engine.settings.max_time_seconds,
            trigger_on_empty_window: engine.settings.trigger_on_empty_window,
        },
        counters: Counters {
            events_in_window: snap.window_events,
            events_total: snap.events_total,
            window_start: snap.window_start_ms.map(ms_to_time),
            time_threshold_at: snap
                .window_start_ms
                .map(|s| ms_to_time(s.saturating_add(max_time_ms))),
            triggers: snap.seq,
            pending_triggers: snap.pending,
        },
        last_trigger,
    })
    .into_response()
}

/// A delivery error as `/consumer/info` shows it: never what a remote service answered. Rows
/// written by older workers kept up to 200 characters of the webhook's response body after
/// `webhook answered HTTP <code>: `; that part is cut.
pub fn without_remote_body(error: &str) -> String {
    const PREFIX: &str = "webhook answered HTTP ";
    match error.strip_prefix(PREFIX) {
        Some(rest) => {
            let status: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            format!("{PREFIX}{status}")
        }
        None => error.to_string(),
    }
}

fn claimed(engine: &Engine, c: Claimed) -> LastTrigger {
    LastTrigger::Claimed {
        trigger_id: trigger_id(&engine.consumer_id, c.seq),
        sequence: c.seq,
        claim: c,
        status: "pending",
    }
}

async fn by_id(State(engine): State<Arc<Engine>>, Path(id): Path<String>) -> Response {
    info(&engine, &id).await
}

async fn by_namespace_and_name(
    State(engine): State<Arc<Engine>>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    info(&engine, &format!("{ns}/{name}")).await
}

/// The routes: `/consumer/info/{id}` and `/consumer/info/{namespace}/{name}`.
pub fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/consumer/info/{id}", get(by_id))
        .route("/consumer/info/{ns}/{name}", get(by_namespace_and_name))
        .with_state(engine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_response_bodies_are_not_echoed() {
        assert_eq!(
            without_remote_body("webhook answered HTTP 500: {\"internal\": \"secret data\"}"),
            "webhook answered HTTP 500"
        );
        assert_eq!(
            without_remote_body("webhook answered HTTP 404 Not Found"),
            "webhook answered HTTP 404"
        );
        assert_eq!(
            without_remote_body("webhook timed out: operation timed out"),
            "webhook timed out: operation timed out"
        );
    }

    #[test]
    fn consumer_is_found_by_full_id_or_name() {
        assert!(matches("team-a/clicks", "team-a/clicks"));
        assert!(matches("team-a/clicks", "clicks"));
        assert!(matches("clicks", "clicks"));
        assert!(!matches("team-a/clicks", "team-a"));
        assert!(!matches("clicks", "other"));
    }
}
