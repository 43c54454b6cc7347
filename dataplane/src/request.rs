//! Parsing an OpenAI request body: only what routing needs (`model`, `stream`,
//! `stream_options`, the size of the prompt), in one pass, without building a
//! JSON tree; and editing it by splicing byte ranges, never re-serialising it.

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
    /// The client asked for usage in the stream (`stream_options.include_usage: true`).
    pub include_usage: bool,
    /// Byte range of the `stream_options` value, when present.
    pub stream_options_span: Option<Range<usize>>,
    /// Rough input token count for limits before the engine reports usage:
    /// ~4 bytes of prompt JSON per token, like the Kthena router's estimator.
    pub estimated_input_tokens: u64,
    /// Which prompt field the body has and its value's byte range, for prefix hashing.
    pub prompt_span: Option<(PromptField, Range<usize>)>,
}

/// The field holding a request's prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptField {
    /// `/v1/completions`: a string or a list of strings.
    Prompt,
    /// `/v1/chat/completions`: a list of `{role, content}`.
    Messages,
    /// `/v1/responses`: a string or a list of messages.
    Input,
}

/// Bytes of prompt text per token in the pre-response estimate (the Kthena
/// router's ceil(chars / 4) rule).
pub const BYTES_PER_ESTIMATED_TOKEN: usize = 4;

/// The field added to streaming requests so the engine reports usage.
const INCLUDE_USAGE_FIELD: &str = r#""stream_options":{"include_usage":true},"#;

/// The top-level fields routing needs; serde skips every other field without
/// materialising it.
#[derive(Deserialize)]
struct RoutingFields<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    stream: Option<&'a RawValue>,
    /// Kept even when `null`, so an edit replaces it rather than adding a duplicate key.
    #[serde(borrow, default, deserialize_with = "raw_even_if_null")]
    stream_options: Option<&'a RawValue>,
    /// Prompt fields: only their length is used (completions, chat, responses).
    #[serde(borrow)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow)]
    messages: Option<&'a RawValue>,
    #[serde(borrow)]
    input: Option<&'a RawValue>,
}

fn raw_even_if_null<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(deserializer).map(Some)
}

/// `stream_options`, read only when present.
#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
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
    let span_of = |raw: &RawValue| {
        let start = raw.get().as_ptr() as usize - text.as_ptr() as usize;
        start..start + raw.get().len()
    };
    let include_usage = fields.stream_options.is_some_and(|raw| {
        serde_json::from_str::<StreamOptions>(raw.get())
            .is_ok_and(|options| options.include_usage == Some(true))
    });
    let prompt_bytes: usize = [fields.prompt, fields.messages, fields.input]
        .iter()
        .flatten()
        .map(|raw| raw.get().len())
        .sum();
    Ok(ParsedBody {
        model,
        model_span: span_of(raw_model),
        stream: fields.stream.is_some_and(|raw| raw.get() == "true"),
        include_usage,
        stream_options_span: fields.stream_options.map(span_of),
        estimated_input_tokens: prompt_bytes.div_ceil(BYTES_PER_ESTIMATED_TOKEN) as u64,
        prompt_span: [
            (PromptField::Messages, fields.messages),
            (PromptField::Prompt, fields.prompt),
            (PromptField::Input, fields.input),
        ]
        .into_iter()
        .find_map(|(field, raw)| raw.map(|raw| (field, span_of(raw)))),
    })
}

/// One replacement of `range` in a body by `replacement`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    pub range: Range<usize>,
    pub replacement: Bytes,
}

impl ParsedBody {
    /// The edit that makes a streaming request report usage in its last
    /// chunk, or None when the client already asked for it.
    pub fn include_usage_edit(&self, body: &[u8]) -> Option<Edit> {
        if !self.stream || self.include_usage {
            return None;
        }
        match &self.stream_options_span {
            // `"stream_options": {...}` without include_usage: true. Rewrite
            // that one small value; the rest of the body is untouched.
            Some(span) => {
                let mut options = serde_json::from_slice::<serde_json::Value>(&body[span.clone()])
                    .ok()
                    .and_then(|value| match value {
                        serde_json::Value::Object(map) => Some(map),
                        _ => None,
                    })
                    .unwrap_or_default();
                options.insert("include_usage".to_owned(), serde_json::Value::Bool(true));
                Some(Edit {
                    range: span.clone(),
                    replacement: Bytes::from(serde_json::Value::Object(options).to_string()),
                })
            }
            // Insert the field right after the object's opening brace.
            None => {
                let brace = body.iter().position(|b| *b == b'{')?;
                Some(Edit {
                    range: brace + 1..brace + 1,
                    replacement: Bytes::from_static(INCLUDE_USAGE_FIELD.as_bytes()),
                })
            }
        }
    }
}

/// Applies non-overlapping `edits` to `body`, copying it once; returns the
/// body untouched (no copy) when there is nothing to edit.
pub fn apply_edits(body: Bytes, edits: &mut [Edit]) -> Bytes {
    if edits.is_empty() {
        return body;
    }
    edits.sort_by_key(|edit| edit.range.start);
    let added: usize = edits.iter().map(|e| e.replacement.len()).sum();
    let removed: usize = edits.iter().map(|e| e.range.len()).sum();
    let mut out = BytesMut::with_capacity(body.len() - removed + added);
    let mut cursor = 0;
    for edit in edits.iter() {
        out.extend_from_slice(&body[cursor..edit.range.start]);
        out.extend_from_slice(&edit.replacement);
        cursor = edit.range.end;
    }
    out.extend_from_slice(&body[cursor..]);
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
        let out = apply_edits(
            body,
            &mut [Edit {
                range: parsed.model_span,
                replacement: Bytes::from_static(br#""org/a-much-longer-name""#),
            }],
        );
        assert_eq!(
            &out[..],
            br#"{"model": "org/a-much-longer-name", "prompt": "model \"short\""}"#
        );
    }

    fn edited(body: &'static str) -> String {
        let body = Bytes::from_static(body.as_bytes());
        let parsed = parse_body(&body).expect("parses");
        let edits: Vec<Edit> = parsed.include_usage_edit(&body).into_iter().collect();
        let out = apply_edits(body, &mut edits.clone());
        let value: serde_json::Value = serde_json::from_slice(&out).expect("still JSON");
        assert_eq!(value["stream_options"]["include_usage"], true, "{value}");
        String::from_utf8(out.to_vec()).expect("utf-8")
    }

    #[test]
    fn include_usage_is_added_only_to_streams_that_lack_it() {
        assert_eq!(
            edited(r#"{"model":"m","stream":true}"#),
            r#"{"stream_options":{"include_usage":true},"model":"m","stream":true}"#
        );
        assert_eq!(
            edited(
                r#"{"model":"m","stream":true,"stream_options":{"continuous_usage_stats":false}}"#
            ),
            r#"{"model":"m","stream":true,"stream_options":{"continuous_usage_stats":false,"include_usage":true}}"#
        );
        edited(r#"{"model":"m","stream":true,"stream_options":null}"#);
        let asked =
            parse_body(br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#)
                .expect("parses");
        assert!(asked.include_usage);
        assert!(asked.include_usage_edit(b"{}").is_none());
        let not_streaming = parse_body(br#"{"model":"m"}"#).expect("parses");
        assert!(
            not_streaming
                .include_usage_edit(br#"{"model":"m"}"#)
                .is_none()
        );
    }

    #[test]
    fn model_and_usage_edits_combine() {
        let body = Bytes::from_static(br#"{"model":"a","stream":true}"#);
        let parsed = parse_body(&body).expect("parses");
        let mut edits = vec![Edit {
            range: parsed.model_span.clone(),
            replacement: Bytes::from_static(br#""org/b""#),
        }];
        edits.extend(parsed.include_usage_edit(&body));
        let out = apply_edits(body, &mut edits);
        assert_eq!(
            &out[..],
            br#"{"stream_options":{"include_usage":true},"model":"org/b","stream":true}"#
        );
    }

    #[test]
    fn estimates_input_tokens_from_prompt_fields() {
        let parsed = parse_body(br#"{"model":"m","prompt":"abcdefgh"}"#).expect("parses");
        assert_eq!(
            parsed.estimated_input_tokens, 3,
            "10 bytes incl. quotes -> 3 tokens"
        );
        let parsed = parse_body(br#"{"model":"m"}"#).expect("parses");
        assert_eq!(parsed.estimated_input_tokens, 0);
    }
}
