//! Parsing an OpenAI request body: only what routing needs (`model`, `stream`),
//! in one pass, without building a JSON tree or re-serialising the body.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{ApiError, ErrorKind};

/// What the router reads from a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedBody {
    /// The decoded `model` value.
    pub model: String,
    /// Byte range of `model`'s JSON string literal (quotes included) in the body,
    /// so a rewrite splices that one field.
    pub model_span: Range<usize>,
    /// `stream` is honoured only when it is JSON `true`.
    pub stream: bool,
}

/// The top-level fields routing needs; serde skips every other field without
/// materialising it.
#[derive(Deserialize)]
struct RoutingFields<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    stream: Option<&'a RawValue>,
}

/// Parses `body`: it must be UTF-8 JSON, an object, with a string `model`.
pub fn parse_body(body: &[u8]) -> Result<ParsedBody, ApiError> {
    let text = std::str::from_utf8(body).map_err(|error| {
        ApiError::new(
            ErrorKind::InvalidBody,
            format!(
                "request body is not valid UTF-8 (at byte {})",
                error.valid_up_to()
            ),
        )
    })?;
    // serde would also accept an array as a struct; the API only takes objects.
    if !text.trim_start().starts_with('{') && !text.trim().is_empty() {
        return Err(ApiError::new(
            ErrorKind::InvalidBody,
            "request body must be a JSON object",
        ));
    }
    let fields: RoutingFields<'_> = serde_json::from_str(text).map_err(|error| {
        ApiError::new(
            ErrorKind::InvalidBody,
            format!("request body is not valid JSON: {error}"),
        )
    })?;
    let raw_model = fields.model.ok_or_else(|| {
        ApiError::new(
            ErrorKind::InvalidModel,
            "missing required field `model` in request body",
        )
    })?;
    let model: String = serde_json::from_str(raw_model.get()).map_err(|_| {
        ApiError::new(
            ErrorKind::InvalidModel,
            "field `model` in request body must be a string",
        )
    })?;
    if model.trim().is_empty() {
        return Err(ApiError::new(
            ErrorKind::InvalidModel,
            "field `model` in request body must not be empty",
        ));
    }
    let start = raw_model.get().as_ptr() as usize - text.as_ptr() as usize;
    let stream = fields.stream.is_some_and(|raw| raw.get() == "true");
    Ok(ParsedBody {
        model,
        model_span: start..start + raw_model.get().len(),
        stream,
    })
}

/// Replaces the `model` string literal at `span` with `replacement_literal`
/// (an already JSON-encoded string, quotes included), copying the body once.
pub fn splice_model(body: &Bytes, span: &Range<usize>, replacement_literal: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(body.len() - span.len() + replacement_literal.len());
    out.extend_from_slice(&body[..span.start]);
    out.extend_from_slice(replacement_literal.as_bytes());
    out.extend_from_slice(&body[span.end..]);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_model_and_stream() {
        let body =
            br#"{"messages":[{"role":"user","content":"hi"}],"model":"llama","stream":true}"#;
        let parsed = parse_body(body).expect("parses");
        assert_eq!(parsed.model, "llama");
        assert!(parsed.stream);
        assert_eq!(&body[parsed.model_span.clone()], br#""llama""#);
    }

    #[test]
    fn stream_only_when_true() {
        for (body, expected) in [
            (r#"{"model":"m"}"#, false),
            (r#"{"model":"m","stream":false}"#, false),
            (r#"{"model":"m","stream":"true"}"#, false),
            (r#"{"model":"m","stream":1}"#, false),
            (r#"{"model":"m","stream":true}"#, true),
        ] {
            assert_eq!(
                parse_body(body.as_bytes()).expect(body).stream,
                expected,
                "{body}"
            );
        }
    }

    #[test]
    fn decodes_escaped_model() {
        let body = br#"{"model":"a\"b\u00e9"}"#;
        let parsed = parse_body(body).expect("parses");
        assert_eq!(parsed.model, "a\"bé");
        assert_eq!(&body[parsed.model_span.clone()], br#""a\"b\u00e9""#);
    }

    #[test]
    fn rejects_bad_bodies_with_specific_kinds() {
        let cases: [(&[u8], ErrorKind); 8] = [
            (b"", ErrorKind::InvalidBody),
            (b"{", ErrorKind::InvalidBody),
            (b"[1,2]", ErrorKind::InvalidBody),
            (b"\"model\"", ErrorKind::InvalidBody),
            (b"{\"model\":\"\xff\"}", ErrorKind::InvalidBody),
            (b"{\"prompt\":\"x\"}", ErrorKind::InvalidModel),
            (b"{\"model\":42}", ErrorKind::InvalidModel),
            (b"{\"model\":\"  \"}", ErrorKind::InvalidModel),
        ];
        for (body, kind) in cases {
            let error = parse_body(body).expect_err("must fail");
            assert_eq!(
                error.kind,
                kind,
                "{:?}: {}",
                String::from_utf8_lossy(body),
                error
            );
        }
    }

    #[test]
    fn duplicate_model_is_rejected() {
        let error = parse_body(br#"{"model":"a","model":"b"}"#).expect_err("duplicate");
        assert_eq!(error.kind, ErrorKind::InvalidBody);
    }

    #[test]
    fn splice_replaces_only_the_model_literal() {
        let body = Bytes::from_static(br#"{"model": "short", "prompt": "model \"short\""}"#);
        let parsed = parse_body(&body).expect("parses");
        let out = splice_model(&body, &parsed.model_span, r#""org/a-much-longer-name""#);
        assert_eq!(
            &out[..],
            br#"{"model": "org/a-much-longer-name", "prompt": "model \"short\""}"#
        );
    }
}
