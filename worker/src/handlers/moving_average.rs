//! The moving-average handler: N-point moving averages of price events, per symbol, into
//! PostgreSQL.
//!
//! # Input schema
//! One JSON object per message (the price-event producer's schema):
//!
//! ```json
//! {"symbol":"AAPL","price":150.25,"timestamp":"2024-03-20T10:30:00Z","source":"alpha_vantage","raw_response_id":"<uuid>"}
//! ```
//!
//! | field             | required | rule |
//! |-------------------|----------|------|
//! | `symbol`          | yes      | non-empty string, at most 64 bytes |
//! | `price`           | yes      | JSON number, finite, > 0 and at most 10^15 |
//! | `timestamp`       | yes      | RFC 3339 string |
//! | `source`          | no       | string, at most 1024 bytes |
//! | `raw_response_id` | no       | string, at most 1024 bytes |
//!
//! No string may hold U+0000 (`\u0000`), which PostgreSQL cannot store (`unstorable`); a message
//! nested deeper than 32 levels or with more than 4096 fields and elements is `too_complex` (see
//! [`storable`](super::storable)). Unknown fields are ignored. Other violations are rejected with
//! `missing_field`, `wrong_type` (for example `"price":"abc"`) or `invalid_value`
//! (`"price":1e999`, `"price":"NaN"`, a negative price, a timestamp that is not RFC 3339). The
//! price bound keeps every average finite (N prices of at most 10^15 cannot overflow a sum).
//!
//! # Output
//! - `price_points`: one row per valid event (topic, partition, offset, symbol, price, event
//!   time, source, raw_response_id).
//! - `moving_averages`: one row per valid event whose symbol window holds N points, i.e. the event
//!   and the N-1 events of the same symbol before it in the same partition, in offset order. The
//!   first N-1 events of a symbol produce no average: an average over fewer points would change
//!   meaning with N and could not be told apart from a full one.
//!
//! Windows are kept per partition and symbol because a key (the symbol) maps to one partition,
//! and offset order is only defined within a partition. They live in memory and are rebuilt
//! lazily from `price_points` (the last N-1 points of the symbol in that partition) the first time
//! a symbol is seen after an assignment, a revocation or a reset, so a restart or a rebalance
//! gives exactly the same averages as an uninterrupted run. Sums are recomputed over the window
//! in order for every event (no running sum), so the floating-point result does not depend on
//! history either.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::fmt;

use chrono::{DateTime, Utc};
use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::Deserialize;
use streamops_crds::v1alpha1::MovingAverageSettings;
use streamops_crds::HandlerKind;

use super::{
    decode_json, Decoded, HandlerContext, HandlerError, MessageHandler, RawMessage, RejectKind,
    Rejection, TopicPartition,
};
use crate::copy::BinaryCopy;

/// Longest accepted symbol, in bytes.
pub const MAX_SYMBOL_BYTES: usize = 64;
/// Longest accepted `source` and `raw_response_id`, in bytes.
pub const MAX_TEXT_BYTES: usize = 1024;
/// Largest accepted price.
pub const MAX_PRICE: f64 = 1e15;

/// A decoded price event.
#[derive(Debug, Clone, PartialEq)]
pub struct PricePoint {
    /// Ticker symbol.
    pub symbol: String,
    /// Price, finite and > 0.
    pub price: f64,
    /// Event time.
    pub event_time: DateTime<Utc>,
    /// Provider.
    pub source: Option<String>,
    /// Raw provider response id.
    pub raw_response_id: Option<String>,
}

/// A price that must be a finite JSON number; a string is a type error unless it spells a
/// non-finite number (`"NaN"`, `"Infinity"`), which is an invalid value.
struct Price(f64);

impl<'de> Deserialize<'de> for Price {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Price;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a finite number")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Price, E> {
                Ok(Price(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Price, E> {
                Ok(Price(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Price, E> {
                Ok(Price(v as f64))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Price, E> {
                match v.trim().parse::<f64>() {
                    Ok(x) if !x.is_finite() => Err(E::invalid_value(Unexpected::Str(v), &self)),
                    _ => Err(E::invalid_type(Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    symbol: Cow<'a, str>,
    price: Price,
    #[serde(borrow)]
    timestamp: Cow<'a, str>,
    #[serde(default, borrow)]
    source: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    raw_response_id: Option<Cow<'a, str>>,
}

/// Decodes one price event (see the module docs for the rules).
pub fn decode_price(payload: &[u8]) -> Result<PricePoint, Rejection> {
    let w: Wire<'_> = decode_json(payload)?;
    if w.symbol.is_empty() || w.symbol.len() > MAX_SYMBOL_BYTES {
        return Err(Rejection::new(
            RejectKind::InvalidValue,
            format!("symbol must be 1-{MAX_SYMBOL_BYTES} bytes"),
        ));
    }
    super::storable::text("symbol", &w.symbol)?;
    for (field, value) in [
        ("source", w.source.as_deref()),
        ("raw_response_id", w.raw_response_id.as_deref()),
    ] {
        if let Some(v) = value {
            if v.len() > MAX_TEXT_BYTES {
                return Err(Rejection::new(
                    RejectKind::InvalidValue,
                    format!(
                        "{field} is {} bytes long; at most {MAX_TEXT_BYTES} are allowed",
                        v.len()
                    ),
                ));
            }
            super::storable::text(field, v)?;
        }
    }
    let price = w.price.0;
    if !price.is_finite() || price <= 0.0 {
        return Err(Rejection::new(
            RejectKind::InvalidValue,
            format!("price must be a finite number > 0, got {price}"),
        ));
    }
    if price > MAX_PRICE {
        return Err(Rejection::new(
            RejectKind::InvalidValue,
            format!("price must be at most {MAX_PRICE:e}, got {price:e}"),
        ));
    }
    let event_time = DateTime::parse_from_rfc3339(&w.timestamp)
        .map_err(|e| {
            Rejection::new(
                RejectKind::InvalidValue,
                format!("timestamp {:?} is not RFC 3339: {e}", w.timestamp),
            )
        })?
        .with_timezone(&Utc);
    Ok(PricePoint {
        symbol: w.symbol.into_owned(),
        price,
        event_time,
        source: w.source.map(Cow::into_owned),
        raw_response_id: w.raw_response_id.map(Cow::into_owned),
    })
}

/// The last N prices of one symbol, oldest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    prices: VecDeque<f64>,
}

impl Window {
    /// A window holding `prices` (oldest first), keeping at most the last `n`.
    pub fn from_prices(prices: impl IntoIterator<Item = f64>, n: usize) -> Self {
        let mut w = Self::default();
        for p in prices {
            w.push(p, n);
        }
        w
    }

    /// Adds the newest price, keeping at most `n`; returns the average once `n` are held.
    pub fn push(&mut self, price: f64, n: usize) -> Option<f64> {
        self.prices.push_back(price);
        while self.prices.len() > n {
            self.prices.pop_front();
        }
        (self.prices.len() == n).then(|| {
            let mut sum = 0.0;
            for p in &self.prices {
                sum += p;
            }
            sum / n as f64
        })
    }

    /// Prices held.
    pub fn len(&self) -> usize {
        self.prices.len()
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.prices.is_empty()
    }
}

/// The handler.
pub struct MovingAverageHandler {
    window: usize,
    /// Windows per partition, per symbol. A symbol present here has been loaded from
    /// PostgreSQL (or started empty because it had no stored points).
    windows: HashMap<TopicPartition, HashMap<String, Window>>,
}

const PRICE_POINTS_COPY: &str = "COPY price_points (topic, partition, symbol, \"offset\", price, event_time, source, raw_response_id) FROM STDIN (FORMAT binary)";
const AVERAGES_COPY: &str = "COPY moving_averages (topic, partition, \"offset\", symbol, window_size, average, event_time) FROM STDIN (FORMAT binary)";

impl MovingAverageHandler {
    /// A handler with the given settings.
    pub fn new(_ctx: &HandlerContext, settings: &MovingAverageSettings) -> Self {
        Self::with_window(settings.window as usize)
    }

    /// A handler averaging over `window` points (at least 1).
    pub fn with_window(window: usize) -> Self {
        Self {
            window: window.max(1),
            windows: HashMap::new(),
        }
    }

    /// Loads the windows of the (partition, symbol) pairs of `items` not yet in memory.
    async fn load_missing(
        &mut self,
        tx: &mut sqlx::PgConnection,
        items: &[Decoded<PricePoint>],
    ) -> Result<(), sqlx::Error> {
        let mut topics: Vec<&str> = Vec::new();
        let mut parts: Vec<i32> = Vec::new();
        let mut symbols: Vec<&str> = Vec::new();
        let mut seen: std::collections::HashSet<(&str, i32, &str)> = Default::default();
        for d in items {
            let tp_known = self
                .windows
                .get(&TopicPartition {
                    topic: d.pos.topic.clone(),
                    partition: d.pos.partition,
                })
                .is_some_and(|m| m.contains_key(d.item.symbol.as_str()));
            if !tp_known && seen.insert((&d.pos.topic, d.pos.partition, &d.item.symbol)) {
                topics.push(&d.pos.topic);
                parts.push(d.pos.partition);
                symbols.push(&d.item.symbol);
            }
        }
        if symbols.is_empty() {
            return Ok(());
        }
        let keep = (self.window - 1) as i64;
        let rows: Vec<(String, i32, String, f64)> = sqlx::query_as(
            "SELECT k.topic, k.partition, k.symbol, p.price
               FROM UNNEST($1::text[], $2::int4[], $3::text[]) AS k(topic, partition, symbol)
               CROSS JOIN LATERAL (
                   SELECT pp.price, pp.\"offset\"
                     FROM price_points pp
                    WHERE pp.topic = (k.topic COLLATE \"C\") AND pp.partition = k.partition
                      AND pp.symbol = (k.symbol COLLATE \"C\")
                    ORDER BY pp.\"offset\" DESC
                    LIMIT $4
               ) p
              ORDER BY k.topic, k.partition, k.symbol, p.\"offset\"",
        )
        .bind(&topics)
        .bind(&parts)
        .bind(&symbols)
        .bind(keep)
        .fetch_all(&mut *tx)
        .await?;
        let mut loaded: HashMap<(String, i32, String), Vec<f64>> = HashMap::new();
        for (t, p, s, price) in rows {
            loaded.entry((t, p, s)).or_default().push(price);
        }
        let n = self.window;
        for i in 0..symbols.len() {
            let key = (topics[i].to_string(), parts[i], symbols[i].to_string());
            let prices = loaded.remove(&key).unwrap_or_default();
            let tp = TopicPartition {
                topic: items
                    .iter()
                    .find(|d| &*d.pos.topic == topics[i])
                    .map(|d| d.pos.topic.clone())
                    .unwrap_or_else(|| topics[i].into()),
                partition: parts[i],
            };
            self.windows
                .entry(tp)
                .or_default()
                .insert(key.2, Window::from_prices(prices, n));
        }
        Ok(())
    }
}

impl MessageHandler for MovingAverageHandler {
    type Item = PricePoint;

    fn kind(&self) -> HandlerKind {
        HandlerKind::MovingAverage
    }

    fn decode(&self, msg: &RawMessage) -> Result<PricePoint, Rejection> {
        decode_price(super::payload_of(msg)?)
    }

    async fn write(
        &mut self,
        tx: &mut sqlx::PgConnection,
        items: &[Decoded<PricePoint>],
    ) -> Result<(), HandlerError> {
        if items.is_empty() {
            return Ok(());
        }
        self.load_missing(tx, items).await?;
        let n = self.window;
        let mut points = BinaryCopy::with_capacity(8, items.len() * 120);
        let mut averages = BinaryCopy::with_capacity(7, items.len() * 80);
        for d in items {
            let tp = TopicPartition {
                topic: d.pos.topic.clone(),
                partition: d.pos.partition,
            };
            let by_symbol = self.windows.entry(tp).or_default();
            let window = match by_symbol.get_mut(d.item.symbol.as_str()) {
                Some(w) => w,
                None => by_symbol.entry(d.item.symbol.clone()).or_default(),
            };
            let avg = window.push(d.item.price, n);
            points
                .row()
                .text(&d.pos.topic)
                .int4(d.pos.partition)
                .text(&d.item.symbol)
                .int8(d.pos.offset)
                .float8(d.item.price)
                .timestamptz(d.item.event_time)
                .opt_text(d.item.source.as_deref())
                .opt_text(d.item.raw_response_id.as_deref());
            if let Some(a) = avg {
                averages
                    .row()
                    .text(&d.pos.topic)
                    .int4(d.pos.partition)
                    .int8(d.pos.offset)
                    .text(&d.item.symbol)
                    .int4(n as i32)
                    .float8(a)
                    .timestamptz(d.item.event_time);
            }
        }
        points.load(tx, PRICE_POINTS_COPY).await?;
        averages.load(tx, AVERAGES_COPY).await?;
        Ok(())
    }

    fn shared_decoder(&self) -> Option<super::SharedDecoder<PricePoint>> {
        Some(std::sync::Arc::new(|msg: &RawMessage| {
            decode_price(super::payload_of(msg)?)
        }))
    }

    fn revoke(&mut self, partitions: &[TopicPartition]) {
        for tp in partitions {
            self.windows.remove(tp);
        }
    }

    fn reset(&mut self) {
        self.windows.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(payload: &str) -> RejectKind {
        decode_price(payload.as_bytes()).unwrap_err().kind
    }

    #[test]
    fn decodes_the_seed_schema() {
        let p = decode_price(br#"{"symbol":"AAPL","price":150.25,"timestamp":"2024-03-20T10:30:00Z","source":"alpha_vantage","raw_response_id":"8f14e45f-ceea-467f-a8f0-5b5a2c3f0e11","extra":1}"#).unwrap();
        assert_eq!(p.symbol, "AAPL");
        assert_eq!(p.price, 150.25);
        assert_eq!(p.event_time.to_rfc3339(), "2024-03-20T10:30:00+00:00");
        assert_eq!(p.source.as_deref(), Some("alpha_vantage"));
        let minimal =
            decode_price(br#"{"symbol":"X","price":3,"timestamp":"2024-03-20T10:30:00+02:00"}"#)
                .unwrap();
        assert_eq!(minimal.price, 3.0);
        assert_eq!(minimal.source, None);
    }

    #[test]
    fn rejects_each_kind_of_bad_price_event_with_its_reason() {
        let ts = "\"timestamp\":\"2024-03-20T10:30:00Z\"";
        assert_eq!(
            kind(&format!("{{\"symbol\":\"A\",{ts}}}")),
            RejectKind::MissingField
        );
        assert_eq!(
            kind(&format!("{{\"price\":1,{ts}}}")),
            RejectKind::MissingField
        );
        assert_eq!(
            kind(&format!("{{\"symbol\":\"A\",\"price\":\"abc\",{ts}}}")),
            RejectKind::WrongType
        );
        assert_eq!(
            kind(&format!("{{\"symbol\":7,\"price\":1,{ts}}}")),
            RejectKind::WrongType
        );
        assert_eq!(
            kind(&format!("{{\"symbol\":\"A\",\"price\":1e999,{ts}}}")),
            RejectKind::InvalidValue
        );
        assert_eq!(
            kind(&format!("{{\"symbol\":\"A\",\"price\":\"NaN\",{ts}}}")),
            RejectKind::InvalidValue
        );
        assert_eq!(
            kind(&format!("{{\"symbol\":\"A\",\"price\":-1,{ts}}}")),
            RejectKind::InvalidValue
        );
        assert_eq!(
            kind(&format!("{{\"symbol\":\"\",\"price\":1,{ts}}}")),
            RejectKind::InvalidValue
        );
        assert_eq!(
            kind("{\"symbol\":\"A\",\"price\":1,\"timestamp\":\"yesterday\"}"),
            RejectKind::InvalidValue
        );
        assert_eq!(
            kind("{\"symbol\":\"A\",\"price\":"),
            RejectKind::InvalidJson
        );
    }

    #[test]
    fn values_postgresql_cannot_store_are_rejected_as_unstorable() {
        let ts = "\"timestamp\":\"2024-03-20T10:30:00Z\"";
        for msg in [
            format!("{{\"symbol\":\"A\\u0000\",\"price\":1,{ts}}}"),
            format!("{{\"symbol\":\"A\",\"price\":1,{ts},\"source\":\"x\\u0000y\"}}"),
            format!("{{\"symbol\":\"A\",\"price\":1,{ts},\"raw_response_id\":\"\\u0000\"}}"),
        ] {
            let r = decode_price(msg.as_bytes()).unwrap_err();
            assert_eq!(r.kind, RejectKind::Unstorable, "{msg}");
            assert!(!r.detail.contains('\0'), "{}", r.detail);
        }
        // An unknown field may hold anything: it is never stored.
        assert!(decode_price(
            format!("{{\"symbol\":\"A\",\"price\":1,{ts},\"x\\u0000\":\"\\u0000\"}}").as_bytes()
        )
        .is_ok());
    }

    #[test]
    fn lone_surrogates_extreme_sizes_and_nesting_are_rejected_with_a_reason() {
        let ts = "\"timestamp\":\"2024-03-20T10:30:00Z\"";
        assert_eq!(
            kind(&format!("{{\"symbol\":\"\\udc00\",\"price\":1,{ts}}}")),
            RejectKind::InvalidJson
        );
        assert_eq!(
            kind(&format!("{{\"symbol\":\"A\",\"price\":1e16,{ts}}}")),
            RejectKind::InvalidValue
        );
        let long = "s".repeat(MAX_TEXT_BYTES + 1);
        assert_eq!(
            kind(&format!(
                "{{\"symbol\":\"A\",\"price\":1,{ts},\"source\":\"{long}\"}}"
            )),
            RejectKind::InvalidValue
        );
        let deep = format!("{}0{}", "[".repeat(40), "]".repeat(40));
        assert_eq!(
            kind(&format!(
                "{{\"symbol\":\"A\",\"price\":1,{ts},\"x\":{deep}}}"
            )),
            RejectKind::TooComplex
        );
        let many: Vec<String> = (0..5000).map(|i| format!("\"f{i}\":0")).collect();
        assert_eq!(
            kind(&format!(
                "{{\"symbol\":\"A\",\"price\":1,{ts},{}}}",
                many.join(",")
            )),
            RejectKind::TooComplex
        );
    }

    #[test]
    fn the_average_appears_once_the_window_is_full_and_slides() {
        let mut w = Window::default();
        assert_eq!(w.push(1.0, 3), None);
        assert_eq!(w.push(2.0, 3), None);
        assert_eq!(w.push(3.0, 3), Some(2.0));
        assert_eq!(w.push(7.0, 3), Some(4.0));
        assert_eq!(w.len(), 3);
    }

    #[test]
    fn a_rebuilt_window_gives_the_same_averages_as_an_uninterrupted_one() {
        let prices = [150.25, 151.1, 149.97, 150.33, 152.01, 151.76, 150.02, 153.3];
        let n = 5;
        let mut live = Window::default();
        let expected: Vec<_> = prices.iter().map(|p| live.push(*p, n)).collect();
        for cut in 0..prices.len() {
            // What the handler reloads: at most the last N-1 stored points before `cut`.
            let stored = &prices[cut.saturating_sub(n - 1)..cut];
            let mut w = Window::from_prices(stored.iter().copied(), n);
            let got: Vec<_> = prices[cut..].iter().map(|p| w.push(*p, n)).collect();
            assert_eq!(got, expected[cut..], "cut at {cut}");
        }
    }
}
