//! The first line of defence against well-formed but hostile input: what PostgreSQL would refuse,
//! and shapes no handler needs, rejected by the decoders with a reason.
//!
//! PostgreSQL refuses, among what valid JSON can carry:
//! - U+0000 (NUL) anywhere in a `text` value: `invalid byte sequence for encoding "UTF8": 0x00`;
//! - the escape `\u0000` in a `jsonb` key or string: `unsupported Unicode escape sequence`
//!   (the decoded key or string holds a NUL, so [`text`] catches both);
//! - lone UTF-16 surrogates (`"\ud800"`): `serde_json` already refuses them as invalid JSON, and a
//!   Rust `String` cannot hold one, so they never get this far.
//!
//! Non-finite numbers (`1e999`, `"NaN"`) are refused by each decoder's field rules.
//!
//! Shapes no handler needs are refused before parsing ([`check_shape`]): nesting deeper than
//! [`MAX_DEPTH`] and more than [`MAX_ELEMENTS`] fields and array elements in one message. Sizes are
//! bounded by `maxMessageBytes` (checked by the pipeline) and by each field's own length limit.
//!
//! What still gets through (a constraint of the handler's tables, a value a future PostgreSQL
//! refuses) is caught by the pipeline's second line of defence: a data error (SQLSTATE classes 22
//! and 23) isolates the offending message by splitting the batch, and sends it to the error topic
//! with the database's reason.

use super::{RejectKind, Rejection};

/// Deepest nesting of objects and arrays accepted in a message (the handlers' schemas need 2).
pub const MAX_DEPTH: usize = 32;
/// Most fields and array elements, counted over the whole message, accepted in one message.
pub const MAX_ELEMENTS: usize = 4096;

/// Checks that `value`, bound for a PostgreSQL `text` or `jsonb` column as the content of
/// `field`, holds nothing PostgreSQL refuses (U+0000).
pub fn text(field: &str, value: &str) -> Result<(), Rejection> {
    if value.contains('\0') {
        return Err(Rejection::new(
            RejectKind::Unstorable,
            format!(
                "field `{field}` contains U+0000 (NUL, or the escape \\u0000), which PostgreSQL \
                 text and jsonb cannot store"
            ),
        ));
    }
    Ok(())
}

/// Checks the shape of a JSON text without parsing it: nesting depth and the number of fields
/// and array elements. Linear in the length, allocation-free. Syntax errors are left to the
/// parser (an unbalanced text may pass).
pub fn check_shape(json: &[u8]) -> Result<(), Rejection> {
    let mut depth = 0usize;
    let mut elements = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                // The container's first member or element.
                elements += 1;
                if depth > MAX_DEPTH {
                    return Err(Rejection::new(
                        RejectKind::TooComplex,
                        format!("value is nested more than {MAX_DEPTH} levels deep"),
                    ));
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b',' => elements += 1,
            _ => continue,
        }
        if elements > MAX_ELEMENTS {
            return Err(Rejection::new(
                RejectKind::TooComplex,
                format!("value has more than {MAX_ELEMENTS} fields and array elements"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_in_text_is_unstorable_and_names_the_field() {
        let r = text("symbol", "A\0B").unwrap_err();
        assert_eq!(r.kind, RejectKind::Unstorable);
        assert!(r.detail.contains("`symbol`"), "{}", r.detail);
        assert!(text("symbol", "A\u{1}\u{ffff}é").is_ok());
    }

    #[test]
    fn nesting_beyond_the_limit_is_too_complex() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(check_shape(ok.as_bytes()).is_ok());
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        let r = check_shape(deep.as_bytes()).unwrap_err();
        assert_eq!(r.kind, RejectKind::TooComplex);
        assert!(r.detail.contains("nested"), "{}", r.detail);
    }

    #[test]
    fn brackets_and_commas_inside_strings_do_not_count() {
        let s = format!(
            "{{\"a\":\"{}\\\"{}\"}}",
            "[".repeat(100),
            ",".repeat(MAX_ELEMENTS * 2)
        );
        assert!(check_shape(s.as_bytes()).is_ok());
    }

    #[test]
    fn too_many_fields_or_elements_are_too_complex() {
        let fields: Vec<String> = (0..MAX_ELEMENTS + 1)
            .map(|i| format!("\"f{i}\":1"))
            .collect();
        let obj = format!("{{{}}}", fields.join(","));
        let r = check_shape(obj.as_bytes()).unwrap_err();
        assert_eq!(r.kind, RejectKind::TooComplex);
        let arr = format!("{{\"a\":[{}]}}", vec!["0"; MAX_ELEMENTS + 1].join(","));
        assert_eq!(
            check_shape(arr.as_bytes()).unwrap_err().kind,
            RejectKind::TooComplex
        );
        let fine: Vec<String> = (0..MAX_ELEMENTS - 1)
            .map(|i| format!("\"f{i}\":1"))
            .collect();
        assert!(check_shape(format!("{{{}}}", fine.join(",")).as_bytes()).is_ok());
    }
}
