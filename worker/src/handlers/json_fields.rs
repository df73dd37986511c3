//! Field-by-field JSON decoding with precise rejections, shared by the sensor, fraud and
//! pipeline-trigger handlers.
//!
//! Messages are parsed into a [`serde_json::Value`] first, then each field is read with a helper
//! that names the field in its rejection (`missing field \`machine_id\``, `field \`amount\` must be
//! a number, got a string`), so a message on the error topic tells its producer exactly what to
//! fix.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{Map, Value};

use super::{RejectKind, Rejection};

/// Parses a message value as one JSON object, after checking its shape
/// ([`check_shape`](super::storable::check_shape)).
pub(crate) fn parse_object(payload: &[u8]) -> Result<Map<String, Value>, Rejection> {
    let text = std::str::from_utf8(payload)
        .map_err(|e| Rejection::new(RejectKind::InvalidUtf8, format!("value is not UTF-8: {e}")))?;
    super::storable::check_shape(payload)?;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        // `1e999` is valid JSON syntax but no finite number: a bad value, not bad JSON.
        if e.to_string().starts_with("number out of range") {
            Rejection::new(
                RejectKind::InvalidValue,
                format!("a number is not finite (out of range): {e}"),
            )
        } else {
            Rejection::new(RejectKind::InvalidJson, format!("value is not JSON: {e}"))
        }
    })?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(Rejection::new(
            RejectKind::WrongType,
            format!("value must be a JSON object, got {}", type_name(&other)),
        )),
    }
}

/// The JSON type of a value, for messages.
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn missing(field: &str) -> Rejection {
    Rejection::new(RejectKind::MissingField, format!("missing field `{field}`"))
}

fn wrong(field: &str, expected: &str, got: &Value) -> Rejection {
    Rejection::new(
        RejectKind::WrongType,
        format!("field `{field}` must be {expected}, got {}", type_name(got)),
    )
}

/// Returns the first of `names` present in `obj` (a field and its accepted aliases), with the name
/// found. A `null` counts as absent.
pub(crate) fn lookup<'a>(
    obj: &'a Map<String, Value>,
    names: &[&'static str],
) -> Option<(&'static str, &'a Value)> {
    names
        .iter()
        .find_map(|n| obj.get(*n).filter(|v| !v.is_null()).map(|v| (*n, v)))
}

/// A required string field (first name is the canonical one, the rest are aliases).
pub(crate) fn req_str<'a>(
    obj: &'a Map<String, Value>,
    names: &[&'static str],
) -> Result<&'a str, Rejection> {
    let (name, v) = lookup(obj, names).ok_or_else(|| missing(names[0]))?;
    v.as_str().ok_or_else(|| wrong(name, "a string", v))
}

/// A required finite number field.
pub(crate) fn req_f64(obj: &Map<String, Value>, names: &[&'static str]) -> Result<f64, Rejection> {
    let (name, v) = lookup(obj, names).ok_or_else(|| missing(names[0]))?;
    let n = v.as_f64().ok_or_else(|| wrong(name, "a number", v))?;
    if n.is_finite() {
        Ok(n)
    } else {
        Err(Rejection::new(
            RejectKind::InvalidValue,
            format!("field `{name}` must be finite"),
        ))
    }
}

/// A required boolean field.
pub(crate) fn req_bool(
    obj: &Map<String, Value>,
    names: &[&'static str],
) -> Result<bool, Rejection> {
    let (name, v) = lookup(obj, names).ok_or_else(|| missing(names[0]))?;
    v.as_bool().ok_or_else(|| wrong(name, "a boolean", v))
}

/// An optional string field.
pub(crate) fn opt_str<'a>(
    obj: &'a Map<String, Value>,
    names: &[&'static str],
) -> Result<Option<&'a str>, Rejection> {
    match lookup(obj, names) {
        None => Ok(None),
        Some((name, v)) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| wrong(name, "a string", v)),
    }
}

/// An optional boolean field.
pub(crate) fn opt_bool(
    obj: &Map<String, Value>,
    names: &[&'static str],
) -> Result<Option<bool>, Rejection> {
    match lookup(obj, names) {
        None => Ok(None),
        Some((name, v)) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| wrong(name, "a boolean", v)),
    }
}

/// A required object field.
pub(crate) fn req_object<'a>(
    obj: &'a Map<String, Value>,
    names: &[&'static str],
) -> Result<&'a Map<String, Value>, Rejection> {
    let (name, v) = lookup(obj, names).ok_or_else(|| missing(names[0]))?;
    v.as_object().ok_or_else(|| wrong(name, "an object", v))
}

/// Checks an identifier: non-empty after trimming, at most `max` bytes, no control characters
/// (so no U+0000, which PostgreSQL cannot store).
pub(crate) fn check_id<'a>(field: &str, value: &'a str, max: usize) -> Result<&'a str, Rejection> {
    if value.trim().is_empty() {
        return Err(Rejection::new(
            RejectKind::InvalidValue,
            format!("field `{field}` must not be empty"),
        ));
    }
    if value.len() > max {
        return Err(Rejection::new(
            RejectKind::InvalidValue,
            format!(
                "field `{field}` is {} bytes long; at most {max} are allowed",
                value.len()
            ),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Rejection::new(
            RejectKind::InvalidValue,
            format!("field `{field}` must not contain control characters"),
        ));
    }
    Ok(value)
}

/// Earliest timestamp accepted anywhere: 1970-01-01T00:00:00Z.
const MIN_TIMESTAMP_S: i64 = 0;
/// Latest timestamp accepted anywhere: 9999-12-31T23:59:59Z.
const MAX_TIMESTAMP_S: i64 = 253_402_300_799;

/// Parses a timestamp. With `allow_naive`, an ISO 8601 date-time without offset
/// (`2024-03-20T10:30:00`, optional fraction) is read as UTC; otherwise only RFC 3339 is accepted.
pub(crate) fn parse_timestamp(
    field: &str,
    value: &str,
    allow_naive: bool,
) -> Result<DateTime<Utc>, Rejection> {
    let parsed = match DateTime::parse_from_rfc3339(value) {
        Ok(t) => Ok(t.with_timezone(&Utc)),
        Err(e) if allow_naive => NaiveDateTime::parse_from_str(value, "%Y-%m-%dT%H:%M:%S%.f")
            .map(|n| n.and_utc())
            .map_err(|_| e),
        Err(e) => Err(e),
    };
    let t = parsed.map_err(|e| {
        Rejection::new(
            RejectKind::InvalidValue,
            format!(
                "field `{field}` is not an {} timestamp ({e}): {value:?}",
                if allow_naive { "ISO 8601" } else { "RFC 3339" }
            ),
        )
    })?;
    if !(MIN_TIMESTAMP_S..=MAX_TIMESTAMP_S).contains(&t.timestamp()) {
        return Err(Rejection::new(
            RejectKind::InvalidValue,
            format!("field `{field}` must lie between 1970 and 9999: {value:?}"),
        ));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_utf8_value_is_rejected_as_invalid_utf8() {
        let r = parse_object(&[0xff, 0xfe]).unwrap_err();
        assert_eq!(r.kind, RejectKind::InvalidUtf8);
    }

    #[test]
    fn truncated_json_is_rejected_as_invalid_json() {
        let r = parse_object(br#"{"a": 1"#).unwrap_err();
        assert_eq!(r.kind, RejectKind::InvalidJson);
    }

    #[test]
    fn out_of_range_number_is_rejected_as_invalid_value() {
        let r = parse_object(br#"{"amount": 1e999}"#).unwrap_err();
        assert_eq!(r.kind, RejectKind::InvalidValue);
        assert!(r.detail.contains("not finite"), "{}", r.detail);
    }

    #[test]
    fn json_array_is_rejected_as_wrong_type() {
        let r = parse_object(b"[1,2]").unwrap_err();
        assert_eq!(r.kind, RejectKind::WrongType);
        assert!(r.detail.contains("an array"), "{}", r.detail);
    }

    #[test]
    fn alias_is_found_when_canonical_name_is_absent() {
        let obj = parse_object(br#"{"id": "x"}"#).unwrap();
        assert_eq!(req_str(&obj, &["transaction_id", "id"]).unwrap(), "x");
    }

    #[test]
    fn missing_field_names_the_canonical_field() {
        let obj = parse_object(br#"{}"#).unwrap();
        let r = req_str(&obj, &["transaction_id", "id"]).unwrap_err();
        assert_eq!(r.kind, RejectKind::MissingField);
        assert!(r.detail.contains("`transaction_id`"), "{}", r.detail);
    }

    #[test]
    fn null_field_counts_as_missing() {
        let obj = parse_object(br#"{"a": null}"#).unwrap();
        assert_eq!(
            req_bool(&obj, &["a"]).unwrap_err().kind,
            RejectKind::MissingField
        );
    }

    #[test]
    fn wrong_type_names_field_and_types() {
        let obj = parse_object(br#"{"amount": "12"}"#).unwrap();
        let r = req_f64(&obj, &["amount"]).unwrap_err();
        assert_eq!(r.kind, RejectKind::WrongType);
        assert_eq!(r.detail, "field `amount` must be a number, got a string");
    }

    #[test]
    fn rfc3339_and_naive_timestamps_parse_as_utc() {
        let a = parse_timestamp("t", "2024-03-20T12:30:00+02:00", false).unwrap();
        let b = parse_timestamp("t", "2024-03-20T10:30:00", true).unwrap();
        assert_eq!(a, b);
        assert!(parse_timestamp("t", "2024-03-20T10:30:00", false).is_err());
    }

    #[test]
    fn timestamp_outside_1970_to_9999_is_invalid() {
        let r = parse_timestamp("t", "1969-12-31T23:59:59Z", false).unwrap_err();
        assert_eq!(r.kind, RejectKind::InvalidValue);
    }

    #[test]
    fn lone_surrogates_and_deep_nesting_are_rejected_before_any_field_is_read() {
        assert_eq!(
            parse_object(br#"{"a": "\ud800"}"#).unwrap_err().kind,
            RejectKind::InvalidJson
        );
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(40), "]".repeat(40));
        assert_eq!(
            parse_object(deep.as_bytes()).unwrap_err().kind,
            RejectKind::TooComplex
        );
    }

    #[test]
    fn id_checks_reject_nul_escapes() {
        let obj = parse_object(br#"{"id": "a\u0000b"}"#).unwrap();
        let id = req_str(&obj, &["id"]).unwrap();
        assert_eq!(
            check_id("id", id, 8).unwrap_err().kind,
            RejectKind::InvalidValue
        );
    }

    #[test]
    fn id_checks_reject_empty_long_and_control_characters() {
        assert!(check_id("id", " ", 8).is_err());
        assert!(check_id("id", "123456789", 8).is_err());
        assert!(check_id("id", "a\nb", 8).is_err());
        assert_eq!(check_id("id", "m-7", 8).unwrap(), "m-7");
    }
}
