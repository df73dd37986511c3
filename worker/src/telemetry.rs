//! Logging (`tracing`, text or JSON lines on stderr) and distributed tracing (OpenTelemetry,
//! exported over OTLP/HTTP protobuf).
//!
//! # When spans are exported
//! Export is on only when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is
//! set (not empty) and `OTEL_SDK_DISABLED` is not `true` ([`export_decision`]). The rest of the
//! standard `OTEL_*` variables are read by the OpenTelemetry SDK and exporter as usual:
//! `OTEL_SERVICE_NAME` (default here `streamops-worker`), `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` (default `parentbased_always_on`),
//! `OTEL_EXPORTER_OTLP_HEADERS` / `..._TRACES_HEADERS` (never logged), `..._TIMEOUT`, and the
//! batch processor's `OTEL_BSP_*`. Only the `http/protobuf` protocol is built in: a
//! `OTEL_EXPORTER_OTLP_PROTOCOL` (or `..._TRACES_PROTOCOL`) of `grpc` or `http/json` turns export
//! off with an error in the log rather than sending protobuf to a port that expects another
//! protocol. Without export nothing below happens: no header is read, no span is created
//! ([`enabled`] is false), so the cost is one relaxed atomic load per message.
//!
//! Spans are flushed when the worker stops ([`Telemetry::shutdown`], on the SIGTERM path too),
//! waiting at most [`SHUTDOWN_FLUSH_TIMEOUT`] (5 s) for the collector.
//!
//! # The trace model
//! A Kafka message carrying a W3C `traceparent` (and `tracestate`) header continues that trace
//! in the worker. Messages arrive in batches, and one batch may hold messages of many traces,
//! so spans are of two kinds:
//!
//! - **Per message**, a child of the message's own context: `streamops.decode` (the pipeline's
//!   checks and the handler's decoding; a rejection sets `error.type` to the reason) and
//!   `streamops.reject` (the record produced to the error topic; its context is the
//!   `traceparent` header of that record).
//! - **Per batch operation**, serving many messages at once: `streamops.db.write` (the
//!   PostgreSQL transaction of the batch: rows, offsets, rejections), `streamops.score` (one
//!   call to the fraud scorer for a group of transactions). Such a span is a child of the
//!   context of the *first* traced message it serves, so a trace with one message per upstream
//!   request reads as one tree, and it carries a span *link* to the context of every other
//!   traced message it serves (distinct contexts, at most [`MAX_LINKS`]), so each of those traces
//!   can find it. The scorer request carries the `streamops.score` span's context as its
//!   `traceparent`.
//!
//! Messages without a (valid) `traceparent` start no trace: they get no per-message span, and a
//! batch operation none of whose messages is traced gets no span either. The sampler therefore
//! only decides over spans whose parent is a message's context (the default,
//! `parentbased_always_on`, follows the sampled flag the producer set).
//!
//! The pipeline-trigger webhook is delivered later than its messages are processed, possibly by
//! another replica, so the contexts travel with the window: when an event with a context is
//! counted into the window (one Redis script), its `traceparent` / `tracestate` join the
//! window's list while it holds fewer than [`MAX_TRIGGER_TRACES`]; the claimed trigger takes the
//! list (Redis pending hash, and `pipeline_runs.traces`, so a trigger restored after Redis lost
//! its data keeps it). Each delivery attempt is a span `streamops.webhook`, a child of the
//! window's *first* traced message (the one that opened the window's trace, the same whichever
//! replica counted it and however often a batch is replayed) and linked to the next distinct
//! ones; the request carries that span's context as its `traceparent`, so the receiver's work
//! belongs to the message's trace. Bounded rather than one link per event because a window may
//! hold millions of events and the list travels in every copy of the trigger. A window with no
//! traced message stores nothing, and its delivery is a root span sampled by the configured
//! sampler, as before. A replay rebuilds an open window from PostgreSQL, which does not keep
//! the open window's contexts: the list restarts with the events counted again.
//!
//! A `traceparent` that does not parse is ignored (the message itself is processed as usual).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, Key};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::handlers::{Position, RawMessage, Rejection};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    /// One JSON object per line (clusters).
    Json,
    /// Human-readable lines.
    #[default]
    Text,
}

/// `service.name` when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` names one.
pub const DEFAULT_SERVICE_NAME: &str = "streamops-worker";

/// Longest wait for the exporter's flush when the worker stops.
pub const SHUTDOWN_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Most span links a batch span carries (the SDK's default limit per span is 128).
pub const MAX_LINKS: usize = 128;

/// The W3C trace-context header names.
pub const TRACEPARENT: &str = "traceparent";
/// See [`TRACEPARENT`].
pub const TRACESTATE: &str = "tracestate";

/// Whether spans are being exported (set once by [`init`]).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether OpenTelemetry export is on: only then are trace headers read and spans created.
#[inline]
pub fn enabled() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Installs the global subscriber for logs only (no OpenTelemetry). `RUST_LOG`, when set, wins
/// over `default_level`. Calling it twice is harmless (the second call is ignored).
pub fn init_logging(format: LogFormat, default_level: &str) {
    install(format, default_level, None);
}

/// What the environment says about exporting spans: `Ok(None)` off, `Ok(Some(endpoint
/// variable))` on, `Err(reason)` asked for but impossible. `var` reads one variable.
pub fn export_decision(
    var: impl Fn(&str) -> Option<String>,
) -> Result<Option<&'static str>, String> {
    let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    let endpoint = if set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some() {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    } else if set("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() {
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    } else {
        return Ok(None);
    };
    let protocol =
        set("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| set("OTEL_EXPORTER_OTLP_PROTOCOL"));
    match protocol.as_deref().map(str::trim) {
        None | Some("http/protobuf") => Ok(Some(endpoint)),
        Some(other) => Err(format!(
            "OTEL_EXPORTER_OTLP_PROTOCOL is {other:?}, but this worker exports only http/protobuf; \
             trace export is off"
        )),
    }
}

/// The process's tracing: flush it with [`Telemetry::shutdown`] before exiting.
#[must_use = "call shutdown() before exiting, or buffered spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is buffered and stops the exporter, waiting at most
    /// [`SHUTDOWN_FLUSH_TIMEOUT`]: an unreachable collector must not eat the pod's termination
    /// grace period (the flush runs on a thread of its own, left behind when it takes longer).
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        EXPORTING.store(false, Ordering::Relaxed);
        let (done, flushed) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("otel-shutdown".into())
            .spawn(move || {
                let _ = done.send(provider.shutdown());
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot flush spans at shutdown");
            return;
        }
        match tokio::time::timeout(SHUTDOWN_FLUSH_TIMEOUT, flushed).await {
            Ok(Ok(Ok(()))) => tracing::debug!("trace exporter flushed and stopped"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "flushing spans at shutdown failed"),
            Ok(Err(_)) => tracing::warn!("flushing spans at shutdown failed"),
            Err(_) => tracing::warn!(
                timeout_s = SHUTDOWN_FLUSH_TIMEOUT.as_secs(),
                "flushing spans at shutdown timed out; the rest are dropped"
            ),
        }
    }
}

/// Installs logging like [`init_logging`] and, when the environment asks for it
/// ([`export_decision`]), an OpenTelemetry layer exporting the worker's spans over OTLP/HTTP.
/// Logs are unchanged either way (JSON lines carry no span fields).
pub fn init(format: LogFormat, default_level: &str) -> Telemetry {
    let decision = export_decision(|k| std::env::var(k).ok());
    let provider = match &decision {
        Ok(Some(_)) => match build_provider() {
            Ok(p) => Some(p),
            Err(e) => {
                install(format, default_level, None);
                tracing::error!(error = %e, "cannot build the OTLP trace exporter; trace export is off");
                return Telemetry { provider: None };
            }
        },
        _ => None,
    };
    install(format, default_level, provider.as_ref());
    match decision {
        Ok(Some(var)) if provider.is_some() => {
            EXPORTING.store(true, Ordering::Relaxed);
            // The endpoint itself is not logged: it may carry credentials.
            tracing::info!(
                endpoint_from = var,
                "OpenTelemetry trace export on (OTLP/HTTP protobuf)"
            );
        }
        Err(reason) => tracing::error!("{reason}"),
        _ => {}
    }
    Telemetry { provider }
}

fn build_provider() -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()
        .map_err(|e| e.to_string())?;
    // The sampler comes from OTEL_TRACES_SAMPLER(_ARG) (the SDK's default configuration), the
    // batch processor's settings from OTEL_BSP_*.
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource())
        .build())
}

/// The resource from `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`, with
/// [`DEFAULT_SERVICE_NAME`] when they name no service.
fn resource() -> Resource {
    let detected = Resource::builder().build();
    let unnamed = detected
        .get(&Key::from_static_str("service.name"))
        .is_none_or(|v| v.as_str().starts_with("unknown_service"));
    if unnamed {
        Resource::builder()
            .with_service_name(DEFAULT_SERVICE_NAME)
            .build()
    } else {
        detected
    }
}

fn install(format: LogFormat, default_level: &str, provider: Option<&SdkTracerProvider>) {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{default_level},sqlx=warn,rdkafka=warn,librdkafka=warn"
        ))
    });
    // The worker's spans are all made in this module: they pass whatever the log level, so the
    // log filter does not decide which spans are exported. (One global filter, not a filter per
    // layer: with per-layer filters, `tracing::enabled!` checks such as sqlx's leave a thread's
    // filter state behind and the next log line or span on that thread was dropped.)
    if provider.is_some() {
        if let Ok(d) = concat!(module_path!(), "=info").parse() {
            filter = filter.add_directive(d);
        }
    }
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    let otel =
        provider.map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("streamops-worker")));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(otel)
        .try_init();
}

// ---------------------------------------------------------------------------------------------
// Extraction, spans, injection.

/// A message's trace context, from its headers (boxed: most messages carry none, and the
/// pipeline buffers thousands).
pub type MessageTrace = Box<SpanContext>;

struct KafkaHeaders<'a, H>(&'a H);

impl<H: rdkafka::message::Headers> Extractor for KafkaHeaders<'_, H> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|h| h.key.eq_ignore_ascii_case(key))
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|h| h.key).collect()
    }
}

/// The trace context in a Kafka message's `traceparent` / `tracestate` headers, when export is
/// on and the header parses.
pub fn extract<H: rdkafka::message::Headers>(headers: Option<&H>) -> Option<MessageTrace> {
    if !enabled() {
        return None;
    }
    let headers = headers?;
    let carrier = KafkaHeaders(headers);
    carrier.get(TRACEPARENT)?;
    let cx = TraceContextPropagator::new().extract(&carrier);
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| Box::new(sc))
}

/// The trace context of W3C header values (tests and tools).
pub fn parse_traceparent(traceparent: &str, tracestate: Option<&str>) -> Option<SpanContext> {
    let mut carrier = HashMap::new();
    carrier.insert(TRACEPARENT.to_string(), traceparent.to_string());
    if let Some(s) = tracestate {
        carrier.insert(TRACESTATE.to_string(), s.to_string());
    }
    let cx = TraceContextPropagator::new().extract(&carrier);
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

fn remote(sc: &SpanContext) -> Context {
    Context::new().with_remote_span_context(sc.clone())
}

/// Runs `f` (the pipeline's checks and the handler's decoding of `msg`) in a
/// `streamops.decode` span that continues the message's trace; just `f` for an untraced message.
pub fn decode<T>(
    trace: Option<&SpanContext>,
    msg: &RawMessage,
    f: impl FnOnce() -> Result<T, Rejection>,
) -> Result<T, Rejection> {
    let Some(sc) = trace else {
        return f();
    };
    let span = tracing::info_span!(
        "streamops.decode",
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.operation.name = "process",
        messaging.destination.name = %msg.topic,
        messaging.destination.partition.id = msg.partition,
        messaging.kafka.offset = msg.offset,
        error.type = Empty,
        otel.status_code = Empty,
    );
    let _ = span.set_parent(remote(sc));
    let result = span.in_scope(f);
    if let Err(r) = &result {
        span.record("error.type", r.kind.as_str());
        span.record("otel.status_code", "ERROR");
    }
    result
}

/// The `traceparent` (and `tracestate`, when not empty) of the error-topic record for `msg`,
/// rejected with `rejection`: the context of a `streamops.reject` span, a child of the message's
/// own context. `None` for an untraced message.
pub fn reject_headers(
    trace: Option<&SpanContext>,
    msg: &RawMessage,
    rejection: &Rejection,
    error_topic: &str,
) -> Option<(String, Option<String>)> {
    let sc = trace?;
    let span = tracing::info_span!(
        "streamops.reject",
        otel.kind = "producer",
        messaging.system = "kafka",
        messaging.operation.name = "send",
        messaging.destination.name = error_topic,
        streamops.source.topic = %msg.topic,
        streamops.source.partition = msg.partition,
        streamops.source.offset = msg.offset,
        error.type = rejection.kind.as_str(),
    );
    let _ = span.set_parent(remote(sc));
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    let parent = carrier.remove(TRACEPARENT)?;
    Some((parent, carrier.remove(TRACESTATE).filter(|s| !s.is_empty())))
}

/// An operation that serves a batch of messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOp {
    /// The PostgreSQL transaction of a batch (`streamops.db.write`).
    DbWrite,
    /// One call to the fraud scorer (`streamops.score`).
    Score,
}

/// The span of `op` serving `messages` messages whose trace contexts are `traces`: a child of
/// the first context, linked to the other distinct ones (at most [`MAX_LINKS`]). A disabled span
/// when none is traced.
pub fn batch_span<'a>(
    op: BatchOp,
    messages: usize,
    traces: impl IntoIterator<Item = &'a SpanContext>,
) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    let mut traces = traces.into_iter();
    let Some(first) = traces.next() else {
        return tracing::Span::none();
    };
    let span = match op {
        BatchOp::DbWrite => tracing::info_span!(
            "streamops.db.write",
            otel.kind = "client",
            db.system.name = "postgresql",
            db.operation.name = "transaction",
            streamops.messages = messages,
            streamops.linked_messages = Empty,
            error.type = Empty,
            otel.status_code = Empty,
        ),
        BatchOp::Score => tracing::info_span!(
            "streamops.score",
            otel.kind = "client",
            http.request.method = "POST",
            streamops.transactions = messages,
            streamops.linked_messages = Empty,
            http.response.status_code = Empty,
            error.type = Empty,
            otel.status_code = Empty,
        ),
    };
    parent_and_links(&span, first, traces, MAX_LINKS);
    span
}

/// Makes `first` the parent of `span` and links it to the distinct contexts of `rest` (other
/// than `first`), at most `max_links` of them; records how many in `streamops.linked_messages`.
fn parent_and_links<'a>(
    span: &tracing::Span,
    first: &SpanContext,
    rest: impl IntoIterator<Item = &'a SpanContext>,
    max_links: usize,
) {
    let _ = span.set_parent(remote(first));
    let mut seen: HashSet<(opentelemetry::trace::TraceId, opentelemetry::trace::SpanId)> =
        HashSet::new();
    seen.insert((first.trace_id(), first.span_id()));
    let mut links = 0usize;
    for sc in rest {
        if links >= max_links {
            break;
        }
        if seen.insert((sc.trace_id(), sc.span_id())) {
            span.add_link(sc.clone());
            links += 1;
        }
    }
    span.record("streamops.linked_messages", links);
}

/// Marks the current span (a batch operation's) as failed with `error_type`.
pub fn record_failure(span: &tracing::Span, error_type: &str) {
    if !span.is_disabled() {
        span.record("error.type", error_type);
        span.record("otel.status_code", "ERROR");
    }
}

/// Most message contexts a pipeline-trigger window keeps for its webhook delivery span: the
/// first traced message of the window becomes the span's parent, the next ones (distinct) its
/// links. Bounded because the contexts travel in the trigger's JSON (Redis pending hash,
/// `pipeline_runs.traces`), and a window may hold millions of events.
pub const MAX_TRIGGER_TRACES: usize = 16;

/// The W3C header values of a message's context, as a pipeline-trigger window stores them:
/// `(traceparent, tracestate)`, the latter `None` when empty.
pub fn header_values(sc: &SpanContext) -> Option<(String, Option<String>)> {
    if !sc.is_valid() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&remote(sc), &mut carrier);
    let parent = carrier.remove(TRACEPARENT)?;
    Some((parent, carrier.remove(TRACESTATE).filter(|s| !s.is_empty())))
}

/// The span of one pipeline-trigger webhook delivery attempt (see the module docs): a child of
/// the first of `traces` (the contexts of the window's first traced messages), linked to the
/// other distinct ones; a root span when the window held no traced message.
pub fn webhook_span<'a>(
    trigger_id: &str,
    traces: impl IntoIterator<Item = &'a SpanContext>,
) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "streamops.webhook",
        otel.kind = "client",
        http.request.method = "POST",
        streamops.trigger.id = trigger_id,
        streamops.linked_messages = Empty,
        http.response.status_code = Empty,
        error.type = Empty,
        otel.status_code = Empty,
    );
    let mut traces = traces.into_iter();
    if let Some(first) = traces.next() {
        // The parent and its links together: at most MAX_TRIGGER_TRACES contexts.
        parent_and_links(&span, first, traces, MAX_TRIGGER_TRACES.saturating_sub(1));
    }
    span
}

/// Adds the current span's `traceparent` (and `tracestate`) to an outgoing request's headers.
/// Nothing when export is off or no traced span is current.
pub fn inject_current(headers: &mut reqwest::header::HeaderMap) {
    if !enabled() {
        return;
    }
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return;
    }
    TraceContextPropagator::new()
        .inject_context(&cx, &mut opentelemetry_http::HeaderInjector(headers));
}

/// Records the HTTP status of the current span's call.
pub fn record_status(status: u16) {
    if enabled() {
        let span = tracing::Span::current();
        span.record("http.response.status_code", status);
        if status >= 400 {
            span.record("error.type", status.to_string().as_str());
            span.record("otel.status_code", "ERROR");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The trace contexts of a batch, for handlers: `prepare` only sees positions.

/// Trace contexts of a batch's traced messages, by position.
#[derive(Debug, Default, Clone)]
pub struct BatchTraces(Arc<HashMap<MessageKey, SpanContext>>);

/// Topic, partition and offset of a message.
type MessageKey = (Arc<str>, i32, i64);

impl BatchTraces {
    /// The contexts of `messages` (`(position, context)` pairs; untraced ones are skipped).
    /// `None` when none is traced.
    pub fn collect<'a>(
        messages: impl IntoIterator<Item = (&'a RawMessage, Option<&'a SpanContext>)>,
    ) -> Option<Self> {
        if !enabled() {
            return None;
        }
        let map: HashMap<_, _> = messages
            .into_iter()
            .filter_map(|(m, sc)| Some(((m.topic.clone(), m.partition, m.offset), sc?.clone())))
            .collect();
        (!map.is_empty()).then(|| Self(Arc::new(map)))
    }
}

tokio::task_local! {
    static BATCH_TRACES: BatchTraces;
}

/// Runs `fut` (a handler's `prepare`) with `traces` readable through [`traces_of`].
pub async fn with_batch_traces<F: Future>(traces: Option<BatchTraces>, fut: F) -> F::Output {
    match traces {
        Some(t) => BATCH_TRACES.scope(t, fut).await,
        None => fut.await,
    }
}

/// The trace context of the message at `position`, as far as the running
/// [`with_batch_traces`] knows it.
pub fn trace_of(position: &Position) -> Option<SpanContext> {
    if !enabled() {
        return None;
    }
    BATCH_TRACES
        .try_with(|t| {
            t.0.get(&(position.topic.clone(), position.partition, position.offset))
                .cloned()
        })
        .ok()
        .flatten()
}

/// The trace contexts of the messages at `positions`, in order, as far as the running
/// [`with_batch_traces`] knows them.
pub fn traces_of<'a>(positions: impl IntoIterator<Item = &'a Position>) -> Vec<SpanContext> {
    if !enabled() {
        return Vec::new();
    }
    BATCH_TRACES
        .try_with(|t| {
            positions
                .into_iter()
                .filter_map(|p| t.0.get(&(p.topic.clone(), p.partition, p.offset)).cloned())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn export_is_on_only_with_an_otlp_endpoint_and_not_disabled() {
        assert_eq!(export_decision(env(&[])), Ok(None));
        assert_eq!(
            export_decision(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")])),
            Ok(None)
        );
        assert_eq!(
            export_decision(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")])),
            Ok(Some("OTEL_EXPORTER_OTLP_ENDPOINT"))
        );
        assert_eq!(
            export_decision(env(&[(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://c:4318/v1/traces"
            )])),
            Ok(Some("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        );
        assert_eq!(
            export_decision(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_SDK_DISABLED", "TRUE"),
            ])),
            Ok(None)
        );
        assert_eq!(
            export_decision(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_SDK_DISABLED", "false"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ])),
            Ok(Some("OTEL_EXPORTER_OTLP_ENDPOINT"))
        );
    }

    #[test]
    fn a_protocol_other_than_http_protobuf_turns_export_off_with_a_reason() {
        let e = export_decision(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ]))
        .unwrap_err();
        assert!(e.contains("grpc") && e.contains("http/protobuf"), "{e}");
    }

    #[test]
    fn traceparent_headers_parse_and_malformed_ones_are_ignored() {
        let sc = parse_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("vendor=x"),
        )
        .expect("valid");
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(sc.trace_state().header(), "vendor=x");
        assert!(parse_traceparent("00-zz-00f067aa0ba902b7-01", None).is_none());
        assert!(parse_traceparent(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            None
        )
        .is_none());
    }

    #[test]
    fn without_export_no_span_is_made_and_nothing_is_injected() {
        assert!(!enabled());
        let sc = parse_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            None,
        )
        .unwrap();
        assert!(batch_span(BatchOp::DbWrite, 1, [&sc]).is_disabled());
        let mut h = reqwest::header::HeaderMap::new();
        inject_current(&mut h);
        assert!(h.is_empty());
    }
}
