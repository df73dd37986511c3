//! The sensor reading message and its decoding. The schema is documented in the `sensor` module.

use std::borrow::Cow;
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Number, Value};

use crate::handlers::json_fields::{
    check_id, parse_object, parse_timestamp, req_bool, req_object, req_str,
};
use crate::handlers::{RejectKind, Rejection};

/// Longest accepted `machine_id`, in bytes.
pub const MAX_MACHINE_ID_BYTES: usize = 128;
/// Most sensor values in one reading.
pub const MAX_READINGS: usize = 256;
/// Longest sensor name, in bytes.
pub const MAX_SENSOR_NAME_BYTES: usize = 64;

/// A decoded, valid sensor reading.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// Machine that sent it.
    pub machine_id: String,
    /// When it was measured.
    pub timestamp: DateTime<Utc>,
    /// The sensor values as a JSON object text with keys in sorted order.
    pub values: String,
    /// Whether the machine reports a failure.
    pub failure: bool,
}

/// The well-formed shape, read in one pass without building a JSON tree.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    machine_id: Cow<'a, str>,
    #[serde(borrow)]
    timestamp: Cow<'a, str>,
    readings: BTreeMap<String, Number>,
    failure: bool,
}

/// Decodes and validates one reading. Well-formed messages take a typed fast path; anything it
/// does not accept goes through the field-by-field path, which accepts the same messages with the
/// same result and names the reason for the others.
pub fn decode_reading(payload: &[u8]) -> Result<Reading, Rejection> {
    crate::handlers::storable::check_shape(payload)?;
    let fast = std::str::from_utf8(payload)
        .ok()
        .and_then(|text| serde_json::from_str::<Wire>(text).ok())
        .and_then(|w| {
            let machine_id = check_id("machine_id", &w.machine_id, MAX_MACHINE_ID_BYTES).ok()?;
            let timestamp = parse_timestamp("timestamp", &w.timestamp, true).ok()?;
            let values = values_text(w.readings.iter().map(|(k, v)| (k.as_str(), v))).ok()?;
            Some(Reading {
                machine_id: machine_id.to_string(),
                timestamp,
                values,
                failure: w.failure,
            })
        });
    match fast {
        Some(r) => Ok(r),
        None => decode_fields(payload),
    }
}

/// The field-by-field path: the same rules, with a precise rejection.
fn decode_fields(payload: &[u8]) -> Result<Reading, Rejection> {
    let obj = parse_object(payload)?;
    let machine_id = check_id(
        "machine_id",
        req_str(&obj, &["machine_id"])?,
        MAX_MACHINE_ID_BYTES,
    )?;
    let timestamp = parse_timestamp("timestamp", req_str(&obj, &["timestamp"])?, true)?;
    let readings = req_object(&obj, &["readings"])?;
    let values = check_values(readings)?;
    let failure = req_bool(&obj, &["failure"])?;
    Ok(Reading {
        machine_id: machine_id.to_string(),
        timestamp,
        values,
        failure,
    })
}

/// Checks the count and names of sensor values and renders them as a JSON object with keys in
/// sorted order (numbers keep their written form: `70` stays `70`, `70.0` stays `70.0`).
fn values_text<'a>(
    values: impl ExactSizeIterator<Item = (&'a str, &'a Number)>,
) -> Result<String, Rejection> {
    if values.len() > MAX_READINGS {
        return Err(Rejection::new(
            RejectKind::InvalidValue,
            format!(
                "field `readings` has {} values; at most {MAX_READINGS} are allowed",
                values.len()
            ),
        ));
    }
    let mut sorted: BTreeMap<&str, &Number> = BTreeMap::new();
    for (name, n) in values {
        if name.is_empty() || name.len() > MAX_SENSOR_NAME_BYTES {
            return Err(Rejection::new(
                RejectKind::InvalidValue,
                format!(
                    "sensor names in `readings` must be 1-{MAX_SENSOR_NAME_BYTES} bytes long, got {name:?}"
                ),
            ));
        }
        // The name becomes a jsonb key: no U+0000 (`\u0000`).
        crate::handlers::storable::text("readings", name)?;
        if !n.as_f64().is_some_and(f64::is_finite) {
            return Err(Rejection::new(
                RejectKind::InvalidValue,
                format!("field `readings.{name}` must be finite"),
            ));
        }
        sorted.insert(name, n);
    }
    serde_json::to_string(&sorted).map_err(|e| {
        Rejection::new(
            RejectKind::InvalidValue,
            format!("field `readings` cannot be re-encoded: {e}"),
        )
    })
}

fn check_values(readings: &Map<String, Value>) -> Result<String, Rejection> {
    let mut numbers = Vec::with_capacity(readings.len());
    for (name, v) in readings {
        match v {
            Value::Number(n) => numbers.push((name.as_str(), n)),
            other => {
                return Err(Rejection::new(
                    RejectKind::WrongType,
                    format!(
                        "field `readings.{name}` must be a number, got {}",
                        crate::handlers::json_fields::type_name(other)
                    ),
                ))
            }
        }
    }
    values_text(numbers.into_iter())
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    const SEED_002: &str = r#"{"machine_id": "m-7", "timestamp": "2024-03-20T10:30:00Z", "readings": {"temperature": 71.2, "vibration": 0.03}, "failure": false}"#;

    #[test]
    fn seed_002_message_decodes() {
        let r = decode_reading(SEED_002.as_bytes()).unwrap();
        assert_eq!(r.machine_id, "m-7");
        assert_eq!(
            r.timestamp,
            Utc.with_ymd_and_hms(2024, 3, 20, 10, 30, 0).unwrap()
        );
        assert_eq!(r.values, r#"{"temperature":71.2,"vibration":0.03}"#);
        assert!(!r.failure);
    }

    #[test]
    fn values_text_is_independent_of_key_order() {
        let a = decode_reading(SEED_002.as_bytes()).unwrap();
        let b = decode_reading(
            br#"{"failure": false, "readings": {"vibration": 0.03, "temperature": 71.2}, "timestamp": "2024-03-20T10:30:00Z", "machine_id": "m-7"}"#,
        )
        .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn fast_and_field_by_field_paths_give_the_same_reading() {
        for msg in [
            SEED_002,
            r#"{"machine_id": "m", "timestamp": "2024-03-20T10:30:00", "readings": {"b": 70, "a": 70.0, "c": -1e-3}, "failure": true, "x": [1]}"#,
            r#"{"machine_id": "m", "timestamp": "2024-03-20T10:30:00+02:00", "readings": {"t": 1, "t": 2}, "failure": false}"#,
        ] {
            assert_eq!(
                decode_reading(msg.as_bytes()),
                decode_fields(msg.as_bytes()),
                "{msg}"
            );
        }
        let r = decode_reading(
            br#"{"machine_id": "m", "timestamp": "2024-03-20T10:30:00Z", "readings": {"b": 70, "a": 70.0}, "failure": true}"#,
        )
        .unwrap();
        assert_eq!(r.values, r#"{"a":70.0,"b":70}"#);
    }

    #[test]
    fn duplicate_fields_are_decided_by_the_field_by_field_path() {
        let msg = br#"{"machine_id": "a", "machine_id": "b", "timestamp": "2024-03-20T10:30:00Z", "readings": {}, "failure": false}"#;
        assert_eq!(decode_reading(msg).unwrap().machine_id, "b");
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let r = decode_reading(
            br#"{"machine_id": "m", "timestamp": "2024-03-20T10:30:00Z", "readings": {}, "failure": true, "site": "north"}"#,
        )
        .unwrap();
        assert!(r.failure);
        assert_eq!(r.values, "{}");
    }

    #[test]
    fn missing_failure_flag_is_a_missing_field() {
        let r = decode_reading(
            br#"{"machine_id": "m", "timestamp": "2024-03-20T10:30:00Z", "readings": {}}"#,
        )
        .unwrap_err();
        assert_eq!(r.kind, RejectKind::MissingField);
        assert_eq!(r.detail, "missing field `failure`");
    }

    #[test]
    fn non_numeric_sensor_value_is_a_wrong_type_naming_the_sensor() {
        let r = decode_reading(
            br#"{"machine_id": "m", "timestamp": "2024-03-20T10:30:00Z", "readings": {"temperature": "hot"}, "failure": false}"#,
        )
        .unwrap_err();
        assert_eq!(r.kind, RejectKind::WrongType);
        assert_eq!(
            r.detail,
            "field `readings.temperature` must be a number, got a string"
        );
    }

    #[test]
    fn bad_timestamp_is_an_invalid_value() {
        let r = decode_reading(
            br#"{"machine_id": "m", "timestamp": "yesterday", "readings": {}, "failure": false}"#,
        )
        .unwrap_err();
        assert_eq!(r.kind, RejectKind::InvalidValue);
        assert!(
            r.detail
                .starts_with("field `timestamp` is not an ISO 8601 timestamp"),
            "{}",
            r.detail
        );
    }

    #[test]
    fn empty_machine_id_is_an_invalid_value() {
        let r = decode_reading(
            br#"{"machine_id": "", "timestamp": "2024-03-20T10:30:00Z", "readings": {}, "failure": false}"#,
        )
        .unwrap_err();
        assert_eq!(r.kind, RejectKind::InvalidValue);
    }

    #[test]
    fn a_nul_in_a_sensor_name_is_unstorable_on_both_paths() {
        for msg in [
            r#"{"machine_id": "m", "timestamp": "2024-03-20T10:30:00Z", "readings": {"t\u0000": 1}, "failure": false}"#,
            r#"{"machine_id": "m", "timestamp": "2024-03-20T10:30:00Z", "readings": {"\u0000": 1, "x": "y"}, "failure": false}"#,
        ] {
            let r = decode_reading(msg.as_bytes()).unwrap_err();
            assert!(
                matches!(r.kind, RejectKind::Unstorable | RejectKind::WrongType),
                "{msg}: {r}"
            );
            assert!(!r.detail.contains('\0'), "{}", r.detail);
        }
        let r = decode_fields(
            br#"{"machine_id": "m", "timestamp": "2024-03-20T10:30:00Z", "readings": {"t\u0000": 1}, "failure": false}"#,
        )
        .unwrap_err();
        assert_eq!(r.kind, RejectKind::Unstorable);
    }

    #[test]
    fn a_nul_or_a_lone_surrogate_in_the_machine_id_is_rejected() {
        let nul = decode_reading(
            br#"{"machine_id": "m\u0000", "timestamp": "2024-03-20T10:30:00Z", "readings": {}, "failure": false}"#,
        )
        .unwrap_err();
        assert_eq!(nul.kind, RejectKind::InvalidValue);
        let surrogate = decode_reading(
            br#"{"machine_id": "m\ud83d", "timestamp": "2024-03-20T10:30:00Z", "readings": {}, "failure": false}"#,
        )
        .unwrap_err();
        assert_eq!(surrogate.kind, RejectKind::InvalidJson);
    }

    #[test]
    fn deep_nesting_in_an_ignored_field_is_too_complex() {
        let msg = format!(
            r#"{{"machine_id": "m", "timestamp": "2024-03-20T10:30:00Z", "readings": {{}}, "failure": false, "x": {}1{}}}"#,
            "[".repeat(64),
            "]".repeat(64)
        );
        assert_eq!(
            decode_reading(msg.as_bytes()).unwrap_err().kind,
            RejectKind::TooComplex
        );
    }

    #[test]
    fn readings_that_are_not_an_object_are_a_wrong_type() {
        let r = decode_reading(
            br#"{"machine_id": "m", "timestamp": "2024-03-20T10:30:00Z", "readings": [1], "failure": false}"#,
        )
        .unwrap_err();
        assert_eq!(r.kind, RejectKind::WrongType);
    }
}
