//! Parsing an OpenAI request body: only what routing needs (`model`, `stream`,
//! `stream_options`, the size of the prompt), in one pass, without building a
//! JSON tree; and editing it by splicing byte ranges, never re-serialising it.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{ApiError, ErrorKind};
use crate::json_members::top_level_members;

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

/// Longest `model` accepted, in bytes once decoded: model names and LoRA
/// adapter names are short (Kubernetes names stop at 253 bytes, Hugging Face
/// repository ids at 96); a longer one is refused without being echoed.
pub const MAX_MODEL_BYTES: usize = 1024;

/// Bytes of JSON a decoded byte can take at most (`\u0041`), so a `model`
/// literal longer than this many times [`MAX_MODEL_BYTES`] is too long
/// without being decoded.
const MAX_ESCAPED_BYTES_PER_BYTE: usize = 6;

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
    /// Prompt fields: only their spans are kept (completions, chat, responses).
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
    let [model, stream, stream_options, prompt, messages, input] = routing_fields(text)?;
    let model_span = model.ok_or_else(|| {
        ApiError::new(
            ErrorKind::InvalidModel,
            "missing required field `model` in request body",
        )
    })?;
    let raw_model = &text[model_span.clone()];
    let too_long = || {
        ApiError::new(
            ErrorKind::InvalidModel,
            format!("field `model` in request body is longer than {MAX_MODEL_BYTES} bytes"),
        )
    };
    let not_a_string = || {
        ApiError::new(
            ErrorKind::InvalidModel,
            "field `model` in request body must be a string",
        )
    };
    if !raw_model.starts_with('"') {
        return Err(not_a_string());
    }
    if raw_model.len() > MAX_MODEL_BYTES * MAX_ESCAPED_BYTES_PER_BYTE + 2 {
        return Err(too_long());
    }
    let model: String = serde_json::from_str(raw_model).map_err(|_| not_a_string())?;
    if model.len() > MAX_MODEL_BYTES {
        return Err(too_long());
    }
    if model.trim().is_empty() {
        return Err(ApiError::new(
            ErrorKind::InvalidModel,
            "field `model` in request body must not be empty",
        ));
    }
    let include_usage = stream_options.as_ref().is_some_and(|span| {
        serde_json::from_str::<StreamOptions>(&text[span.clone()])
            .is_ok_and(|options| options.include_usage == Some(true))
    });
    Ok(ParsedBody {
        model,
        model_span,
        stream: stream.is_some_and(|span| &text[span] == "true"),
        include_usage,
        stream_options_span: stream_options,
        prompt_span: [
            (PromptField::Messages, messages),
            (PromptField::Prompt, prompt),
            (PromptField::Input, input),
        ]
        .into_iter()
        .find_map(|(field, span)| span.map(|span| (field, span))),
    })
}

/// The byte ranges of the values of `model`, `stream`, `stream_options`,
/// `prompt`, `messages` and `input` (None when absent or, but for
/// `stream_options`, null): found by one scan of the body, or by serde when
/// the scan leaves the body to it (which also says what is wrong with it).
fn routing_fields(text: &str) -> Result<[Option<Range<usize>>; 6], ApiError> {
    const MEMBERS: [&[u8]; 6] = [
        b"model",
        b"stream",
        b"stream_options",
        b"prompt",
        b"messages",
        b"input",
    ];
    let mut spans = [const { None }; 6];
    if top_level_members(text, &MEMBERS, &mut spans).is_ok() {
        for (name, span) in MEMBERS.iter().zip(&mut spans) {
            // As serde reads an optional member; `stream_options` keeps its
            // null so an edit replaces it rather than adding a duplicate key.
            if *name != b"stream_options"
                && span
                    .as_ref()
                    .is_some_and(|span| &text[span.clone()] == "null")
            {
                *span = None;
            }
        }
        return Ok(spans);
    }
    serde_routing_fields(text).map_err(|error| {
        ApiError::new(
            ErrorKind::InvalidBody,
            format!("request body is not valid JSON: {error}"),
        )
    })
}

/// [`routing_fields`] as serde reads them.
fn serde_routing_fields(text: &str) -> Result<[Option<Range<usize>>; 6], serde_json::Error> {
    let fields: RoutingFields<'_> = serde_json::from_str(text)?;
    let span_of = |raw: &RawValue| {
        let start = raw.get().as_ptr() as usize - text.as_ptr() as usize;
        start..start + raw.get().len()
    };
    Ok([
        fields.model,
        fields.stream,
        fields.stream_options,
        fields.prompt,
        fields.messages,
        fields.input,
    ]
    .map(|raw| raw.map(span_of)))
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

/// Top-level fields the decode leg of a prefill/decode pair may set: their
/// byte ranges in the client's body, so an edit replaces a value the client
/// sent instead of adding a duplicate key. Read only for such requests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PairFieldSpans {
    pub kv_transfer_params: Option<Range<usize>>,
    pub bootstrap_host: Option<Range<usize>>,
    pub bootstrap_port: Option<Range<usize>>,
    pub bootstrap_room: Option<Range<usize>>,
}

#[derive(Deserialize)]
struct PairFields<'a> {
    #[serde(borrow, default, deserialize_with = "raw_even_if_null")]
    kv_transfer_params: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw_even_if_null")]
    bootstrap_host: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw_even_if_null")]
    bootstrap_port: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw_even_if_null")]
    bootstrap_room: Option<&'a RawValue>,
}

impl PairFieldSpans {
    /// The spans in `body`, already admitted as a JSON object.
    pub fn of(body: &[u8]) -> Self {
        let Ok(text) = std::str::from_utf8(body) else {
            return Self::default();
        };
        let Ok(fields) = serde_json::from_str::<PairFields<'_>>(text) else {
            return Self::default();
        };
        let span = |raw: Option<&RawValue>| {
            raw.map(|raw| {
                let start = raw.get().as_ptr() as usize - text.as_ptr() as usize;
                start..start + raw.get().len()
            })
        };
        Self {
            kv_transfer_params: span(fields.kv_transfer_params),
            bootstrap_host: span(fields.bootstrap_host),
            bootstrap_port: span(fields.bootstrap_port),
            bootstrap_room: span(fields.bootstrap_room),
        }
    }
}

/// SGLang's pairing of a prefill and a decode request: the prefill pod's
/// address and a room number both requests carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bootstrap {
    pub host: std::net::IpAddr,
    /// None: the engine's default port.
    pub port: Option<u16>,
    /// 63 bits, so engines that read it as a signed 64-bit integer agree.
    pub room: u64,
}

impl Bootstrap {
    fn fields(&self) -> [(&'static str, Bytes); 3] {
        let port = match self.port {
            Some(port) => Bytes::from(port.to_string()),
            None => Bytes::from_static(b"null"),
        };
        [
            ("bootstrap_host", Bytes::from(format!("\"{}\"", self.host))),
            ("bootstrap_port", port),
            ("bootstrap_room", Bytes::from(self.room.to_string())),
        ]
    }

    /// The edits that set these fields in a body with `spans`: a value the
    /// client sent is replaced, a missing field is inserted (a missing port
    /// stays missing, so the engine uses its default).
    pub fn edits(&self, body: &[u8], spans: &PairFieldSpans) -> Vec<Edit> {
        let existing = [
            &spans.bootstrap_host,
            &spans.bootstrap_port,
            &spans.bootstrap_room,
        ];
        self.fields()
            .into_iter()
            .zip(existing)
            .filter(|((name, _), span)| {
                span.is_some() || *name != "bootstrap_port" || self.port.is_some()
            })
            .filter_map(|((name, value), span)| set_field_edit(body, span.as_ref(), name, value))
            .collect()
    }
}

/// `"kv_transfer_params"` of a prefill request for NIXL and Mooncake: keep
/// the KV for a remote decode instead of decoding here.
pub const PREFILL_KV_TRANSFER_PARAMS: &str =
    r#"{"do_remote_decode":true,"do_remote_prefill":false}"#;

/// The edit that sets the top-level field `name` to the JSON `value`:
/// replacing the value at `span` when the body has the field, else inserting
/// it after the object's opening brace.
pub fn set_field_edit(
    body: &[u8],
    span: Option<&Range<usize>>,
    name: &str,
    value: Bytes,
) -> Option<Edit> {
    if let Some(span) = span {
        return Some(Edit {
            range: span.clone(),
            replacement: value,
        });
    }
    let brace = body.iter().position(|b| *b == b'{')?;
    let mut field = BytesMut::with_capacity(name.len() + value.len() + 4);
    field.extend_from_slice(b"\"");
    field.extend_from_slice(name.as_bytes());
    field.extend_from_slice(b"\":");
    field.extend_from_slice(&value);
    field.extend_from_slice(b",");
    Some(Edit {
        range: brace + 1..brace + 1,
        replacement: field.freeze(),
    })
}

/// What a prefill request changes in the client's body.
#[derive(Debug, Clone, Copy, Default)]
pub struct PrefillShape<'a> {
    /// The ModelServer's model name (a JSON string literal), when it rewrites it.
    pub model: Option<&'a [u8]>,
    /// Ask the engine to keep the KV for a remote decode (NIXL, Mooncake).
    pub kv_transfer_params: bool,
    pub bootstrap: Option<Bootstrap>,
}

/// Fields a prefill request never carries: it is not streamed, generates a
/// single token and one choice, and must not be held to a minimum length.
const PREFILL_DROPPED_FIELDS: [&str; 3] = ["stream", "stream_options", "min_tokens"];

/// The body of a prefill request: a copy of the client's object with
/// `stream`, `stream_options` and `min_tokens` removed, the length field the
/// client used (`max_completion_tokens`, else `max_tokens`; `max_tokens`
/// when it used none) set to 1 and the other one removed, `n` set to 1 when
/// present, and `shape`'s fields set. Every other value keeps the client's
/// bytes. A second body is unavoidable here (the prefill request differs from
/// the client's); the decode request still gets the client's body.
pub fn prefill_body(body: &[u8], shape: &PrefillShape<'_>) -> Result<Bytes, ApiError> {
    let entries: TopLevelEntries<'_> = serde_json::from_slice(body).map_err(|error| {
        ApiError::new(
            ErrorKind::InvalidBody,
            format!("request body is not a JSON object: {error}"),
        )
    })?;
    let length_field = if entries.has("max_completion_tokens") {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let mut set: Vec<(&str, Bytes)> = vec![(length_field, Bytes::from_static(b"1"))];
    if entries.has("n") {
        set.push(("n", Bytes::from_static(b"1")));
    }
    if let Some(model) = shape.model {
        set.push(("model", Bytes::copy_from_slice(model)));
    }
    if shape.kv_transfer_params {
        set.push((
            "kv_transfer_params",
            Bytes::from_static(PREFILL_KV_TRANSFER_PARAMS.as_bytes()),
        ));
    }
    if let Some(bootstrap) = &shape.bootstrap {
        for (name, value) in bootstrap.fields() {
            if name != "bootstrap_port" || bootstrap.port.is_some() {
                set.push((name, value));
            }
        }
    }
    let mut out = BytesMut::with_capacity(body.len() + 128);
    out.extend_from_slice(b"{");
    let mut first = true;
    let mut field = |out: &mut BytesMut, name: &str, value: &[u8]| {
        if !first {
            out.extend_from_slice(b",");
        }
        first = false;
        // A key is a plain string; serialising one cannot fail.
        out.extend_from_slice(serde_json::to_string(name).unwrap_or_default().as_bytes());
        out.extend_from_slice(b":");
        out.extend_from_slice(value);
    };
    for (name, value) in &entries.0 {
        let name = name.as_str();
        if PREFILL_DROPPED_FIELDS.contains(&name)
            || (name == "max_tokens" && length_field != "max_tokens")
        {
            continue;
        }
        match set.iter().position(|(set_name, _)| *set_name == name) {
            Some(index) => {
                let (_, value) = set.swap_remove(index);
                field(&mut out, name, &value);
            }
            None => field(&mut out, name, value.get().as_bytes()),
        }
    }
    for (name, value) in set {
        field(&mut out, name, &value);
    }
    out.extend_from_slice(b"}");
    Ok(out.freeze())
}

/// The top-level fields of a JSON object in their order, each value as its
/// original bytes.
struct TopLevelEntries<'a>(Vec<(String, &'a RawValue)>);

impl TopLevelEntries<'_> {
    fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(key, _)| key == name)
    }
}

impl<'de> Deserialize<'de> for TopLevelEntries<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = TopLevelEntries<'de>;

            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(entry) = map.next_entry::<String, &'de RawValue>()? {
                    entries.push(entry);
                }
                Ok(TopLevelEntries(entries))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// The `kv_transfer_params` object of a prefill answer, verbatim, when the
/// engine sent one (JSON `null` counts as none).
pub fn kv_transfer_params_of(answer: &[u8]) -> Option<Bytes> {
    #[derive(Deserialize)]
    struct PrefillAnswer<'a> {
        #[serde(borrow)]
        kv_transfer_params: Option<&'a RawValue>,
    }
    let answer: PrefillAnswer<'_> = serde_json::from_slice(answer).ok()?;
    let raw = answer.kv_transfer_params?.get();
    (raw != "null").then(|| Bytes::copy_from_slice(raw.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spans serde finds, or serde's error: what `routing_fields` gave
    /// before the scan.
    fn by_serde(text: &str) -> Result<[Option<Range<usize>>; 6], String> {
        serde_routing_fields(text).map_err(|e| e.to_string())
    }

    #[test]
    fn the_scan_finds_what_serde_finds_and_bad_bodies_get_serdes_error() {
        for text in [
            r#"{"model":"m","messages":[{"role":"user","content":"hi \"x\" \u00e9"}],"stream":true}"#,
            r#" { "model" : "m" , "prompt" : ["a","b"], "stream_options": null, "stream": null } "#,
            r#"{"model":null,"input":"x","messages":null,"extra":{"deep":[[[1.5e-3,-0,true,false]]]}}"#,
            r#"{"model":"m","model":"twice"}"#,
            r#"{"m\u006fdel":"escaped key"}"#,
            r#"{"model":"m","temperature":01}"#,
            r#"{"model":"m","messages":[{"content":"tab	here"}]}"#,
            r#"{"model":"m","messages":[}"#,
            r#"{"model":"m",}"#,
            r#"{"model":"m"} trailing"#,
            r#"{"model":"m","x":"\q"}"#,
            "{",
            "",
        ] {
            let scanned = routing_fields(text).map_err(|error| error.message);
            let expected =
                by_serde(text).map_err(|error| format!("request body is not valid JSON: {error}"));
            assert_eq!(scanned, expected, "{text}");
        }
    }

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
    fn an_overlong_model_is_refused_without_echoing_it() {
        let exactly = format!(r#"{{"model":"{}"}}"#, "m".repeat(MAX_MODEL_BYTES));
        assert!(parse_body(exactly.as_bytes()).is_ok());
        for model in [
            "m".repeat(MAX_MODEL_BYTES + 1),
            "\\u0041".repeat(MAX_MODEL_BYTES + 1),
            "x".repeat(1 << 20),
        ] {
            let body = format!(r#"{{"model":"{model}"}}"#);
            let error = parse_body(body.as_bytes()).expect_err("too long");
            assert_eq!(error.kind, ErrorKind::InvalidModel);
            assert!(error.message.len() < 100, "{}", error.message);
            assert!(!error.message.contains("mmmm") && !error.message.contains("xxxx"));
        }
    }

    #[test]
    fn deep_nesting_is_skipped_without_recursion() {
        let deep = "[".repeat(200_000) + &"]".repeat(200_000);
        let body = format!(r#"{{"model":"m","x":{deep}}}"#);
        assert_eq!(parse_body(body.as_bytes()).expect("valid JSON").model, "m");
        let body = format!(r#"{{"model":{deep}}}"#);
        let error = parse_body(body.as_bytes()).expect_err("not a string");
        assert_eq!(error.kind, ErrorKind::InvalidModel);
        assert!(
            error.message.contains("must be a string"),
            "{}",
            error.message
        );
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

    fn prefill(body: &str, shape: &PrefillShape<'_>) -> String {
        let out = prefill_body(body.as_bytes(), shape).expect("an object");
        serde_json::from_slice::<serde_json::Value>(&out).expect("still JSON");
        String::from_utf8(out.to_vec()).expect("UTF-8")
    }

    #[test]
    fn the_prefill_copy_keeps_every_other_value_byte_for_byte() {
        let body = r#"{ "model" : "m", "messages":[{"role":"user","content":"caf\u00e9 1e400"}],"temperature":0.70,"n":4,"stream":true,"stream_options":{"include_usage":true},"min_tokens":8,"max_tokens":128,"logprobs":true}"#;
        assert_eq!(
            prefill(body, &PrefillShape::default()),
            r#"{"model":"m","messages":[{"role":"user","content":"caf\u00e9 1e400"}],"temperature":0.70,"n":1,"max_tokens":1,"logprobs":true}"#
        );
    }

    #[test]
    fn the_prefill_copy_renames_the_model_and_asks_for_a_remote_decode() {
        let shape = PrefillShape {
            model: Some(br#""org/m""#),
            kv_transfer_params: true,
            bootstrap: None,
        };
        assert_eq!(
            prefill(
                r#"{"model":"m","prompt":"x","kv_transfer_params":{"x":1}}"#,
                &shape
            ),
            r#"{"model":"org/m","prompt":"x","kv_transfer_params":{"do_remote_decode":true,"do_remote_prefill":false},"max_tokens":1}"#
        );
    }

    #[test]
    fn bootstrap_fields_are_set_on_both_legs() {
        let bootstrap = Bootstrap {
            host: "10.0.0.7".parse().expect("IP"),
            port: Some(8998),
            room: 42,
        };
        let shape = PrefillShape {
            bootstrap: Some(bootstrap),
            ..PrefillShape::default()
        };
        assert_eq!(
            prefill(r#"{"model":"m","prompt":"x"}"#, &shape),
            r#"{"model":"m","prompt":"x","max_tokens":1,"bootstrap_host":"10.0.0.7","bootstrap_port":8998,"bootstrap_room":42}"#
        );
        let decode = |body: &'static str, bootstrap: Bootstrap| {
            let body = Bytes::from_static(body.as_bytes());
            let spans = PairFieldSpans::of(&body);
            let mut edits = bootstrap.edits(&body, &spans);
            String::from_utf8(apply_edits(body, &mut edits).to_vec()).expect("UTF-8")
        };
        assert_eq!(
            decode(r#"{"model":"m","stream":true}"#, bootstrap),
            r#"{"bootstrap_host":"10.0.0.7","bootstrap_port":8998,"bootstrap_room":42,"model":"m","stream":true}"#
        );
        assert_eq!(
            decode(
                r#"{"model":"m","bootstrap_room":7,"bootstrap_port":1}"#,
                Bootstrap {
                    port: None,
                    ..bootstrap
                }
            ),
            r#"{"bootstrap_host":"10.0.0.7","model":"m","bootstrap_room":42,"bootstrap_port":null}"#,
            "the client's values are replaced, not duplicated; no port: the engine's default"
        );
    }

    #[test]
    fn kv_transfer_params_are_read_verbatim_or_not_at_all() {
        assert_eq!(
            kv_transfer_params_of(
                br#"{"id":"x","kv_transfer_params":{"remote_block_ids":[1, 2],"remote_host":"h"}}"#
            )
            .as_deref(),
            Some(&br#"{"remote_block_ids":[1, 2],"remote_host":"h"}"#[..])
        );
        assert_eq!(
            kv_transfer_params_of(br#"{"kv_transfer_params":null}"#),
            None
        );
        assert_eq!(kv_transfer_params_of(br#"{"id":"x"}"#), None);
        assert_eq!(kv_transfer_params_of(b"not json"), None);
    }
}
