//! Deterministic test-event generator, shared by `streamops-worker produce`, the tests and the
//! benchmark. The same `(kind, seed, keys, poison_percent)` always yields the same sequence, so a
//! test can compute the expected results independently of the worker.
//!
//! Shapes (one per handler kind), keyed so that one key always maps to one partition:
//! - moving-average, key = symbol:
//!   `{"symbol":"AAPL","price":150.25,"timestamp":"2024-03-20T10:30:00Z","source":"alpha_vantage","raw_response_id":"<uuid>"}`
//! - sensor, key = machine_id (failures come in episodes: runs of failing readings):
//!   `{"machine_id":"m-7","timestamp":"...","readings":{"temperature":71.2,"vibration":0.03},"failure":false}`
//! - fraud, key = account_id (transaction ids are unique per seed):
//!   `{"transaction_id":"t-...","account_id":"a-1","merchant_id":"m-1","amount":12.5,"currency":"EUR","timestamp":"..."}`
//! - pipeline-trigger, key = `k-<n>`: `{"event_id":"...","type":"click","payload":{...}}`

use chrono::{DateTime, Duration as ChronoDuration, SecondsFormat, Utc};
use serde::Serialize;
use streamops_crds::HandlerKind;

/// SplitMix64: tiny, fast, and stable across versions of every dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in `[0, n)`; `n` must be > 0.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// A malformed message variant, with the rejection reason the worker must give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Poison {
    /// Truncated JSON.
    BadJson,
    /// A required field is missing.
    MissingField,
    /// A field has the wrong JSON type.
    WrongType,
    /// A number that is not finite (`1e999`) or a `"NaN"` string.
    NonFinite,
    /// Bytes that are not UTF-8.
    InvalidUtf8,
    /// Larger than the consumer's `maxMessageBytes`.
    Oversized,
    /// An empty value.
    Empty,
}

impl Poison {
    /// The `streamops.error.reason` the worker gives this variant.
    pub fn expected_reason(self) -> &'static str {
        match self {
            Self::BadJson => "invalid_json",
            Self::MissingField => "missing_field",
            Self::WrongType => "wrong_type",
            Self::NonFinite => "invalid_value",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::Oversized => "too_large",
            Self::Empty => "empty_payload",
        }
    }

    /// The variants that apply to a kind (pipeline-trigger accepts any JSON object, so it has no
    /// missing-field or non-finite variant).
    pub fn variants(kind: HandlerKind) -> &'static [Poison] {
        match kind {
            HandlerKind::PipelineTrigger => &[
                Self::BadJson,
                Self::WrongType,
                Self::InvalidUtf8,
                Self::Oversized,
                Self::Empty,
            ],
            _ => &[
                Self::BadJson,
                Self::MissingField,
                Self::WrongType,
                Self::NonFinite,
                Self::InvalidUtf8,
                Self::Oversized,
                Self::Empty,
            ],
        }
    }
}

/// A price event (moving-average).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PriceEvent {
    /// Ticker.
    pub symbol: String,
    /// Price, rounded to cents.
    pub price: f64,
    /// RFC 3339 timestamp.
    pub timestamp: String,
    /// Provider.
    pub source: String,
    /// Id of the raw provider response.
    pub raw_response_id: String,
}

/// Sensor readings.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Readings {
    /// Degrees.
    pub temperature: f64,
    /// g.
    pub vibration: f64,
}

/// A sensor reading (sensor).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SensorReading {
    /// Machine id.
    pub machine_id: String,
    /// RFC 3339 timestamp.
    pub timestamp: String,
    /// Readings.
    pub readings: Readings,
    /// Whether the machine is failing.
    pub failure: bool,
}

/// A transaction (fraud).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Transaction {
    /// Unique id.
    pub transaction_id: String,
    /// Account.
    pub account_id: String,
    /// Merchant.
    pub merchant_id: String,
    /// Amount.
    pub amount: f64,
    /// ISO 4217 code.
    pub currency: String,
    /// RFC 3339 timestamp.
    pub timestamp: String,
}

/// A valid generated event.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// moving-average.
    Price(PriceEvent),
    /// sensor.
    Sensor(SensorReading),
    /// fraud.
    Transaction(Transaction),
    /// pipeline-trigger.
    Pipeline(serde_json::Value),
}

impl Event {
    fn to_json(&self) -> Vec<u8> {
        let r = match self {
            Event::Price(e) => serde_json::to_vec(e),
            Event::Sensor(e) => serde_json::to_vec(e),
            Event::Transaction(e) => serde_json::to_vec(e),
            Event::Pipeline(v) => serde_json::to_vec(v),
        };
        // Serializing these plain structs cannot fail.
        r.unwrap_or_default()
    }
}

/// One generated message.
#[derive(Debug, Clone)]
pub struct Generated {
    /// Position in the sequence (0-based).
    pub index: u64,
    /// Message key.
    pub key: String,
    /// Message value.
    pub payload: Vec<u8>,
    /// The valid event, or `None` for poison.
    pub event: Option<Event>,
    /// The poison variant, if any.
    pub poison: Option<Poison>,
}

/// Generator options.
#[derive(Debug, Clone)]
pub struct GenOptions {
    /// Shape of the events.
    pub kind: HandlerKind,
    /// Seed.
    pub seed: u64,
    /// Distinct keys (symbols, machines, accounts...).
    pub keys: u32,
    /// Percentage of poison messages, 0-100.
    pub poison_percent: f64,
    /// The consumer's `maxMessageBytes`; oversized poison is one byte larger.
    pub max_message_bytes: usize,
}

const SYMBOLS: [&str; 16] = [
    "AAPL", "MSFT", "GOOG", "AMZN", "META", "NVDA", "TSLA", "NFLX", "ORCL", "IBM", "INTC", "AMD",
    "CRM", "ADBE", "PYPL", "UBER",
];
const SOURCES: [&str; 3] = ["alpha_vantage", "finnhub", "yfinance"];
const CURRENCIES: [&str; 4] = ["EUR", "USD", "GBP", "CHF"];
const EVENT_TYPES: [&str; 4] = ["click", "view", "purchase", "signup"];

/// The deterministic event sequence.
pub struct Generator {
    opts: GenOptions,
    rng: Rng,
    index: u64,
    start: DateTime<Utc>,
    prices: Vec<f64>,
    /// Remaining failing readings of each machine's current episode.
    episodes: Vec<u32>,
}

impl Generator {
    /// A generator.
    pub fn new(opts: GenOptions) -> Self {
        let keys = opts.keys.max(1) as usize;
        let mut rng = Rng::new(opts.seed);
        let prices = (0..keys)
            .map(|_| (5000.0 + rng.below(45_000) as f64) / 100.0)
            .collect();
        let start = DateTime::parse_from_rfc3339("2024-03-20T10:30:00Z")
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default();
        Self {
            opts,
            rng,
            index: 0,
            start,
            prices,
            episodes: vec![0; keys],
        }
    }

    /// The key name of key number `k`.
    pub fn key_name(kind: HandlerKind, k: usize) -> String {
        match kind {
            HandlerKind::MovingAverage => match SYMBOLS.get(k) {
                Some(s) => (*s).to_string(),
                None => format!("SYM{k}"),
            },
            HandlerKind::Sensor => format!("m-{k}"),
            HandlerKind::Fraud => format!("a-{k}"),
            HandlerKind::PipelineTrigger => format!("k-{k}"),
        }
    }

    fn timestamp(&self) -> String {
        (self.start + ChronoDuration::seconds(self.index as i64))
            .to_rfc3339_opts(SecondsFormat::Secs, true)
    }

    fn uuid(&mut self) -> String {
        let a = self.rng.next_u64();
        let b = self.rng.next_u64();
        uuid::Builder::from_random_bytes({
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&a.to_le_bytes());
            bytes[8..].copy_from_slice(&b.to_le_bytes());
            bytes
        })
        .into_uuid()
        .to_string()
    }

    fn valid(&mut self, k: usize) -> Event {
        let kind = self.opts.kind;
        let key = Self::key_name(kind, k);
        let ts = self.timestamp();
        match kind {
            HandlerKind::MovingAverage => {
                let step = (self.rng.unit() - 0.5) * 0.02;
                let p = (self.prices[k] * (1.0 + step)).max(1.0);
                let p = (p * 100.0).round() / 100.0;
                self.prices[k] = p;
                let source = SOURCES[self.rng.below(SOURCES.len() as u64) as usize].to_string();
                Event::Price(PriceEvent {
                    symbol: key,
                    price: p,
                    timestamp: ts,
                    source,
                    raw_response_id: self.uuid(),
                })
            }
            HandlerKind::Sensor => {
                if self.episodes[k] == 0 && self.rng.unit() < 0.03 {
                    self.episodes[k] = 3 + self.rng.below(8) as u32;
                }
                let failure = self.episodes[k] > 0;
                if failure {
                    self.episodes[k] -= 1;
                }
                let base = if failure { 95.0 } else { 70.0 };
                let temperature = ((base + self.rng.unit() * 10.0) * 10.0).round() / 10.0;
                let vib = if failure { 0.3 } else { 0.02 };
                let vibration = ((vib + self.rng.unit() * 0.05) * 1000.0).round() / 1000.0;
                Event::Sensor(SensorReading {
                    machine_id: key,
                    timestamp: ts,
                    readings: Readings {
                        temperature,
                        vibration,
                    },
                    failure,
                })
            }
            HandlerKind::Fraud => {
                let cents = if self.rng.unit() < 0.02 {
                    100_000 + self.rng.below(900_000)
                } else {
                    100 + self.rng.below(20_000)
                };
                Event::Transaction(Transaction {
                    transaction_id: format!("t-{:x}-{}", self.opts.seed, self.index),
                    account_id: key,
                    merchant_id: format!("m-{}", self.rng.below(50)),
                    amount: cents as f64 / 100.0,
                    currency: CURRENCIES[self.rng.below(CURRENCIES.len() as u64) as usize]
                        .to_string(),
                    timestamp: ts,
                })
            }
            HandlerKind::PipelineTrigger => {
                let t = EVENT_TYPES[self.rng.below(EVENT_TYPES.len() as u64) as usize];
                Event::Pipeline(serde_json::json!({
                    "event_id": format!("e-{:x}-{}", self.opts.seed, self.index),
                    "type": t,
                    "timestamp": ts,
                    "payload": { "key": key, "value": self.rng.below(1000) },
                }))
            }
        }
    }

    fn poison_payload(&mut self, p: Poison, k: usize) -> Vec<u8> {
        let kind = self.opts.kind;
        let key = Self::key_name(kind, k);
        let ts = self.timestamp();
        let s = match (p, kind) {
            (Poison::Empty, _) => String::new(),
            (Poison::InvalidUtf8, _) => {
                let mut v = format!("{{\"symbol\":\"{key}\",\"price\":1.0,\"note\":\"").into_bytes();
                v.extend_from_slice(&[0xff, 0xfe, 0xc3, 0x28]);
                v.extend_from_slice(b"\"}");
                return v;
            }
            (Poison::Oversized, _) => {
                let pad = "x".repeat(self.opts.max_message_bytes + 1);
                format!("{{\"key\":\"{key}\",\"padding\":\"{pad}\"}}")
            }
            (Poison::BadJson, _) => format!("{{\"key\":\"{key}\",\"timestamp\":\"{ts}\","),
            (Poison::WrongType, HandlerKind::PipelineTrigger) => format!("[\"{key}\", 1, 2]"),
            (Poison::MissingField, HandlerKind::MovingAverage) => format!(
                "{{\"symbol\":\"{key}\",\"timestamp\":\"{ts}\",\"source\":\"alpha_vantage\"}}"
            ),
            (Poison::WrongType, HandlerKind::MovingAverage) => format!(
                "{{\"symbol\":\"{key}\",\"price\":\"abc\",\"timestamp\":\"{ts}\"}}"
            ),
            (Poison::NonFinite, HandlerKind::MovingAverage) => {
                if self.rng.unit() < 0.5 {
                    format!("{{\"symbol\":\"{key}\",\"price\":1e999,\"timestamp\":\"{ts}\"}}")
                } else {
                    format!("{{\"symbol\":\"{key}\",\"price\":\"NaN\",\"timestamp\":\"{ts}\"}}")
                }
            }
            (Poison::MissingField, HandlerKind::Sensor) => format!(
                "{{\"timestamp\":\"{ts}\",\"readings\":{{\"temperature\":70.0,\"vibration\":0.02}},\"failure\":false}}"
            ),
            (Poison::WrongType, HandlerKind::Sensor) => format!(
                "{{\"machine_id\":\"{key}\",\"timestamp\":\"{ts}\",\"readings\":{{\"temperature\":\"hot\",\"vibration\":0.02}},\"failure\":false}}"
            ),
            (Poison::NonFinite, HandlerKind::Sensor) => format!(
                "{{\"machine_id\":\"{key}\",\"timestamp\":\"{ts}\",\"readings\":{{\"temperature\":1e999,\"vibration\":0.02}},\"failure\":false}}"
            ),
            (Poison::MissingField, HandlerKind::Fraud) => format!(
                "{{\"transaction_id\":\"bad-{}\",\"account_id\":\"{key}\",\"merchant_id\":\"m-1\",\"currency\":\"EUR\",\"timestamp\":\"{ts}\"}}",
                self.index
            ),
            (Poison::WrongType, HandlerKind::Fraud) => format!(
                "{{\"transaction_id\":\"bad-{}\",\"account_id\":\"{key}\",\"merchant_id\":\"m-1\",\"amount\":\"twelve\",\"currency\":\"EUR\",\"timestamp\":\"{ts}\"}}",
                self.index
            ),
            (Poison::NonFinite, HandlerKind::Fraud) => format!(
                "{{\"transaction_id\":\"bad-{}\",\"account_id\":\"{key}\",\"merchant_id\":\"m-1\",\"amount\":1e999,\"currency\":\"EUR\",\"timestamp\":\"{ts}\"}}",
                self.index
            ),
            // Not generated for pipeline-trigger (see `Poison::variants`).
            (Poison::MissingField | Poison::NonFinite, HandlerKind::PipelineTrigger) => {
                format!("{{\"key\":\"{key}\",")
            }
        };
        s.into_bytes()
    }
}

impl Iterator for Generator {
    type Item = Generated;

    fn next(&mut self) -> Option<Generated> {
        let k = self.rng.below(self.prices.len() as u64) as usize;
        let poison = if self.opts.poison_percent > 0.0
            && self.rng.unit() * 100.0 < self.opts.poison_percent
        {
            let v = Poison::variants(self.opts.kind);
            Some(v[self.rng.below(v.len() as u64) as usize])
        } else {
            None
        };
        let key = Self::key_name(self.opts.kind, k);
        let (payload, event) = match poison {
            Some(p) => (self.poison_payload(p, k), None),
            None => {
                let e = self.valid(k);
                (e.to_json(), Some(e))
            }
        };
        let g = Generated {
            index: self.index,
            key,
            payload,
            event,
            poison,
        };
        self.index += 1;
        Some(g)
    }
}

/// The first `count` events of a sequence.
pub fn generate(opts: GenOptions, count: u64) -> Vec<Generated> {
    Generator::new(opts).take(count as usize).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(kind: HandlerKind, poison: f64) -> GenOptions {
        GenOptions {
            kind,
            seed: 42,
            keys: 5,
            poison_percent: poison,
            max_message_bytes: 1024,
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_sequence() {
        let a = generate(opts(HandlerKind::MovingAverage, 10.0), 500);
        let b = generate(opts(HandlerKind::MovingAverage, 10.0), 500);
        assert!(a
            .iter()
            .zip(&b)
            .all(|(x, y)| x.payload == y.payload && x.key == y.key));
        let mut o = opts(HandlerKind::MovingAverage, 10.0);
        o.seed = 43;
        let c = generate(o, 500);
        assert!(a.iter().zip(&c).any(|(x, y)| x.payload != y.payload));
    }

    #[test]
    fn price_events_have_the_seed_schema_and_a_key_equal_to_the_symbol() {
        for g in generate(opts(HandlerKind::MovingAverage, 0.0), 100) {
            let v: serde_json::Value = serde_json::from_slice(&g.payload).unwrap();
            assert_eq!(v["symbol"].as_str().unwrap(), g.key);
            assert!(v["price"].as_f64().unwrap() > 0.0);
            assert!(DateTime::parse_from_rfc3339(v["timestamp"].as_str().unwrap()).is_ok());
            assert!(uuid::Uuid::parse_str(v["raw_response_id"].as_str().unwrap()).is_ok());
        }
    }

    #[test]
    fn poison_is_generated_at_roughly_the_requested_rate_in_every_variant() {
        let events = generate(opts(HandlerKind::Sensor, 20.0), 5000);
        let poison: Vec<_> = events.iter().filter_map(|g| g.poison).collect();
        assert!((800..1200).contains(&poison.len()), "{}", poison.len());
        for v in Poison::variants(HandlerKind::Sensor) {
            assert!(poison.contains(v), "{v:?} never generated");
        }
        let oversized = events
            .iter()
            .find(|g| g.poison == Some(Poison::Oversized))
            .unwrap();
        assert!(oversized.payload.len() > 1024);
    }

    #[test]
    fn sensor_failures_come_in_episodes() {
        let events = generate(opts(HandlerKind::Sensor, 0.0), 5000);
        let mut runs = Vec::new();
        let mut current: std::collections::HashMap<String, u32> = Default::default();
        for g in &events {
            if let Some(Event::Sensor(r)) = &g.event {
                let c = current.entry(r.machine_id.clone()).or_default();
                if r.failure {
                    *c += 1;
                } else if *c > 0 {
                    runs.push(*c);
                    *c = 0;
                }
            }
        }
        assert!(!runs.is_empty());
        assert!(runs.iter().all(|r| *r >= 3), "{runs:?}");
    }

    #[test]
    fn transaction_ids_are_unique() {
        let events = generate(opts(HandlerKind::Fraud, 0.0), 2000);
        let ids: std::collections::HashSet<_> = events
            .iter()
            .filter_map(|g| match &g.event {
                Some(Event::Transaction(t)) => Some(t.transaction_id.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(ids.len(), 2000);
    }
}
