//! OpenAI-compatible wire shapes as vLLM 0.32 writes them: request parsing for the two inference
//! endpoints, response bodies, stream chunks, `/v1/models` and error bodies.

use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::generation::count_prompt_tokens;
use super::stats::FinishReason;

/// The two inference endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
}

impl Endpoint {
    /// Prefix of response ids, as vLLM builds them.
    fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chatcmpl",
            Endpoint::Completions => "cmpl",
        }
    }

    /// `object` of stream chunks (vLLM's completion chunks reuse `text_completion`).
    fn chunk_object(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        }
    }
}

/// What the mock needs from an inference request body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InferenceRequest {
    /// `None` when the body names no model: vLLM then serves its base model.
    pub model: Option<String>,
    pub prompt_tokens: u32,
    pub max_tokens: Option<u32>,
    pub stream: bool,
    pub include_usage: bool,
}

/// A body that is valid JSON but not a valid request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("{0}")]
    Invalid(String),
    #[error("max_tokens must be at least 1, got {0}.")]
    MaxTokensTooSmall(u32),
}

impl RequestError {
    /// The request field the error is about (`param` of the error body).
    pub fn param(&self) -> Option<&'static str> {
        match self {
            RequestError::Invalid(_) => None,
            RequestError::MaxTokensTooSmall(_) => Some("max_tokens"),
        }
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct ChatCompletionBody {
    model: Option<String>,
    messages: Vec<ChatMessage>,
    max_tokens: Option<u32>,
    /// Newer OpenAI clients send this instead of `max_tokens`.
    max_completion_tokens: Option<u32>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct ChatMessage {
    content: Option<MessageContent>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// Only text parts count towards the prompt; images and audio parts carry no `text`.
#[derive(Deserialize)]
struct ContentPart {
    text: Option<String>,
}

#[derive(Deserialize)]
struct CompletionBody {
    model: Option<String>,
    prompt: Prompt,
    max_tokens: Option<u32>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
}

/// Every prompt form `/v1/completions` accepts.
#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    TokenIds(Vec<u64>),
    TokenIdBatches(Vec<Vec<u64>>),
}

impl Prompt {
    fn tokens(&self) -> u32 {
        let ids = |count: usize| u32::try_from(count).unwrap_or(u32::MAX).max(1);
        match self {
            Prompt::Text(text) => count_prompt_tokens([text.as_str()]),
            Prompt::Texts(texts) => count_prompt_tokens(texts.iter().map(String::as_str)),
            Prompt::TokenIds(tokens) => ids(tokens.len()),
            Prompt::TokenIdBatches(batches) => ids(batches.iter().map(Vec::len).sum()),
        }
    }
}

/// Parses an inference body already known to be JSON.
pub fn parse_request(endpoint: Endpoint, body: Value) -> Result<InferenceRequest, RequestError> {
    let invalid = |error: serde_json::Error| RequestError::Invalid(error.to_string());
    let request = match endpoint {
        Endpoint::ChatCompletions => {
            let body: ChatCompletionBody = serde_json::from_value(body).map_err(invalid)?;
            let texts: Vec<&str> = body
                .messages
                .iter()
                .filter_map(|message| message.content.as_ref())
                .flat_map(|content| match content {
                    MessageContent::Text(text) => vec![text.as_str()],
                    MessageContent::Parts(parts) => parts
                        .iter()
                        .filter_map(|part| part.text.as_deref())
                        .collect(),
                })
                .collect();
            InferenceRequest {
                model: body.model,
                prompt_tokens: count_prompt_tokens(texts),
                max_tokens: body.max_completion_tokens.or(body.max_tokens),
                stream: body.stream.unwrap_or(false),
                include_usage: include_usage(body.stream_options.as_ref()),
            }
        }
        Endpoint::Completions => {
            let body: CompletionBody = serde_json::from_value(body).map_err(invalid)?;
            InferenceRequest {
                model: body.model,
                prompt_tokens: body.prompt.tokens(),
                max_tokens: body.max_tokens,
                stream: body.stream.unwrap_or(false),
                include_usage: include_usage(body.stream_options.as_ref()),
            }
        }
    };
    if let Some(max_tokens) = request.max_tokens
        && max_tokens < 1
    {
        return Err(RequestError::MaxTokensTooSmall(max_tokens));
    }
    Ok(request)
}

fn include_usage(options: Option<&StreamOptions>) -> bool {
    options.and_then(|options| options.include_usage) == Some(true)
}

/// Fields every response and chunk of one request shares.
#[derive(Clone, Debug)]
pub struct ResponseMeta {
    pub endpoint: Endpoint,
    pub id: String,
    pub created: u64,
    /// The requested model (base or LoRA), echoed like vLLM does.
    pub model: String,
}

impl ResponseMeta {
    /// vLLM reuses the caller's `x-request-id` in the response id when one is sent.
    pub fn new(endpoint: Endpoint, request_id: &str, created: u64, model: String) -> Self {
        let suffix = if request_id.is_empty() {
            format!("{:016x}", rand::random::<u64>())
        } else {
            request_id.to_string()
        };
        Self {
            endpoint,
            id: format!("{}-{suffix}", endpoint.id_prefix()),
            created,
            model,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub total_tokens: u32,
    pub completion_tokens: u32,
    /// `null` as vLLM writes it, except on a decode engine of a prefill/decode pair, which says
    /// how much of the prompt's KV it got from the prefill engine.
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: u32,
}

impl Usage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
            completion_tokens,
            prompt_tokens_details: None,
        }
    }

    /// The usage with `cached_tokens` of the prompt reported as cached.
    pub fn with_cached(self, cached_tokens: u32) -> Self {
        Self {
            prompt_tokens_details: Some(PromptTokensDetails { cached_tokens }),
            ..self
        }
    }
}

/// A non-streamed response: `C` is a [`ChatChoice`] or a [`TextChoice`].
#[derive(Serialize)]
struct Completion<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [C; 1],
    usage: Usage,
    #[serde(skip_serializing_if = "Option::is_none")]
    kv_transfer_params: Option<&'a Value>,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    message: AssistantMessage<'a>,
    logprobs: (),
    finish_reason: &'static str,
    stop_reason: (),
}

#[derive(Serialize)]
struct AssistantMessage<'a> {
    role: &'static str,
    content: &'a str,
    refusal: (),
}

#[derive(Serialize)]
struct TextChoice<'a> {
    index: u32,
    text: &'a str,
    logprobs: (),
    finish_reason: &'static str,
    stop_reason: (),
}

/// The non-streamed response body; a prefill engine adds the `kv_transfer_params` a decode
/// engine needs.
pub fn completion_body(
    meta: &ResponseMeta,
    text: &str,
    finish_reason: FinishReason,
    usage: Usage,
    kv_transfer_params: Option<&Value>,
) -> Vec<u8> {
    let finish_reason = finish_reason.as_str();
    let serialized = match meta.endpoint {
        Endpoint::ChatCompletions => serde_json::to_vec(&Completion {
            id: &meta.id,
            object: "chat.completion",
            created: meta.created,
            model: &meta.model,
            choices: [ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content: text,
                    refusal: (),
                },
                logprobs: (),
                finish_reason,
                stop_reason: (),
            }],
            usage,
            kv_transfer_params,
        }),
        Endpoint::Completions => serde_json::to_vec(&Completion {
            id: &meta.id,
            object: "text_completion",
            created: meta.created,
            model: &meta.model,
            choices: [TextChoice {
                index: 0,
                text,
                logprobs: (),
                finish_reason,
                stop_reason: (),
            }],
            usage,
            kv_transfer_params,
        }),
    };
    serialized.unwrap_or_default()
}

#[derive(Serialize)]
struct Chunk<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: C,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct ChatDeltaChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: (),
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    content: &'a str,
}

#[derive(Serialize)]
struct TextDeltaChoice<'a> {
    index: u32,
    text: &'a str,
    logprobs: (),
    finish_reason: Option<&'static str>,
    stop_reason: (),
}

/// One server-sent event carrying `payload`.
fn sse_event<T: Serialize>(payload: &T) -> String {
    let json = serde_json::to_string(payload).unwrap_or_default();
    format!("data: {json}\n\n")
}

/// The stream's closing event.
pub const SSE_DONE: &str = "data: [DONE]\n\n";

impl ResponseMeta {
    fn chunk<C: Serialize>(&self, choices: C, usage: Option<Usage>) -> String {
        sse_event(&Chunk {
            id: &self.id,
            object: self.endpoint.chunk_object(),
            created: self.created,
            model: &self.model,
            choices,
            usage,
        })
    }

    /// The chat stream's opening event: the assistant role with empty content.
    pub fn role_event(&self) -> String {
        self.chunk(
            [ChatDeltaChoice {
                index: 0,
                delta: Delta {
                    role: Some("assistant"),
                    content: "",
                },
                logprobs: (),
                finish_reason: None,
            }],
            None,
        )
    }

    /// One token; the last one carries the finish reason.
    pub fn token_event(&self, text: &str, finish_reason: Option<FinishReason>) -> String {
        let finish_reason = finish_reason.map(FinishReason::as_str);
        match self.endpoint {
            Endpoint::ChatCompletions => self.chunk(
                [ChatDeltaChoice {
                    index: 0,
                    delta: Delta {
                        role: None,
                        content: text,
                    },
                    logprobs: (),
                    finish_reason,
                }],
                None,
            ),
            Endpoint::Completions => self.chunk(
                [TextDeltaChoice {
                    index: 0,
                    text,
                    logprobs: (),
                    finish_reason,
                    stop_reason: (),
                }],
                None,
            ),
        }
    }

    /// The usage-only event sent when `stream_options.include_usage` is true.
    pub fn usage_event(&self, usage: Usage) -> String {
        self.chunk([(); 0], Some(usage))
    }
}

/// vLLM's error body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorInfo<'a>,
}

#[derive(Serialize)]
struct ErrorInfo<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: String,
    param: Option<&'a str>,
    code: u16,
}

pub fn error_body(status: StatusCode, message: &str, param: Option<&str>) -> Vec<u8> {
    serde_json::to_vec(&ErrorBody {
        error: ErrorInfo {
            message,
            kind: error_type(status),
            param,
            code: status.as_u16(),
        },
    })
    .unwrap_or_default()
}

/// vLLM names error types after the status phrase: `BadRequestError`, `NotFoundError`,
/// `InternalServerError`, `ServiceUnavailableError`.
pub fn error_type(status: StatusCode) -> String {
    let phrase = status.canonical_reason().unwrap_or("Unknown");
    let camel: String = phrase
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|word| !word.is_empty())
        .map(|word| {
            let mut chars = word.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_ascii_uppercase().to_string() + &chars.as_str().to_ascii_lowercase()
            })
        })
        .collect();
    if camel.ends_with("Error") {
        camel
    } else {
        camel + "Error"
    }
}

/// `/v1/models`.
#[derive(Serialize)]
pub struct ModelList {
    object: &'static str,
    data: Vec<ModelCard>,
}

#[derive(Serialize)]
struct ModelCard {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    root: String,
    parent: Option<String>,
    max_model_len: Option<u64>,
    permission: [ModelPermission; 1],
}

#[derive(Serialize)]
struct ModelPermission {
    id: String,
    object: &'static str,
    created: u64,
    allow_create_engine: bool,
    allow_sampling: bool,
    allow_logprobs: bool,
    allow_search_indices: bool,
    allow_view: bool,
    allow_fine_tuning: bool,
    organization: &'static str,
    group: (),
    is_blocking: bool,
}

impl ModelList {
    /// The base model first, then its adapters with `parent` pointing at it; only the base
    /// model has a `max_model_len`, as in vLLM.
    pub fn new(
        base_model: &str,
        adapters: &[String],
        owned_by: &'static str,
        created: u64,
        max_model_len: u64,
    ) -> Self {
        let card = |id: &str, parent: Option<&str>| ModelCard {
            id: id.to_string(),
            object: "model",
            created,
            owned_by,
            root: id.to_string(),
            parent: parent.map(str::to_string),
            max_model_len: parent.is_none().then_some(max_model_len),
            permission: [ModelPermission {
                id: format!("modelperm-{:016x}", rand::random::<u64>()),
                object: "model_permission",
                created,
                allow_create_engine: false,
                allow_sampling: true,
                allow_logprobs: true,
                allow_search_indices: false,
                allow_view: true,
                allow_fine_tuning: false,
                organization: "*",
                group: (),
                is_blocking: false,
            }],
        };
        let data = std::iter::once(card(base_model, None))
            .chain(
                adapters
                    .iter()
                    .map(|adapter| card(adapter, Some(base_model))),
            )
            .collect();
        Self {
            object: "list",
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn chat_request_counts_words_of_every_message() {
        let body = json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": [{"type": "text", "text": "Say hello."}, {"type": "image_url", "image_url": {"url": "x"}}]},
                {"role": "assistant", "content": null}
            ],
            "max_completion_tokens": 5,
            "stream": true,
            "stream_options": {"include_usage": true}
        });
        assert_eq!(
            parse_request(Endpoint::ChatCompletions, body),
            Ok(InferenceRequest {
                model: Some("m".into()),
                prompt_tokens: 5,
                max_tokens: Some(5),
                stream: true,
                include_usage: true,
            })
        );
    }

    #[test]
    fn completion_request_accepts_every_prompt_form() {
        let tokens = |prompt: Value| {
            parse_request(
                Endpoint::Completions,
                json!({"model": "m", "prompt": prompt}),
            )
            .map(|request| request.prompt_tokens)
        };
        assert_eq!(tokens(json!("The license grants")), Ok(3));
        assert_eq!(tokens(json!(["a b", "c"])), Ok(3));
        assert_eq!(tokens(json!([1, 2, 3, 4])), Ok(4));
        assert_eq!(tokens(json!([[1, 2], [3]])), Ok(3));
        assert!(tokens(json!({"not": "a prompt"})).is_err());
    }

    #[test]
    fn request_without_model_or_stream_defaults_like_vllm() {
        let request = parse_request(
            Endpoint::Completions,
            json!({"prompt": "hi", "stream": null}),
        );
        assert_eq!(
            request,
            Ok(InferenceRequest {
                model: None,
                prompt_tokens: 1,
                max_tokens: None,
                stream: false,
                include_usage: false,
            })
        );
    }

    #[test]
    fn invalid_requests_are_rejected() {
        let zero = parse_request(
            Endpoint::Completions,
            json!({"model": "m", "prompt": "hi", "max_tokens": 0}),
        );
        assert_eq!(zero, Err(RequestError::MaxTokensTooSmall(0)));
        assert!(parse_request(Endpoint::ChatCompletions, json!({"model": "m"})).is_err());
        assert!(parse_request(Endpoint::ChatCompletions, json!([1, 2])).is_err());
        assert!(parse_request(Endpoint::Completions, json!({"model": 7, "prompt": "hi"})).is_err());
    }

    #[test]
    fn error_types_follow_the_status_phrase() {
        assert_eq!(error_type(StatusCode::BAD_REQUEST), "BadRequestError");
        assert_eq!(error_type(StatusCode::NOT_FOUND), "NotFoundError");
        assert_eq!(
            error_type(StatusCode::INTERNAL_SERVER_ERROR),
            "InternalServerError"
        );
        assert_eq!(
            error_type(StatusCode::SERVICE_UNAVAILABLE),
            "ServiceUnavailableError"
        );
        assert_eq!(
            error_type(StatusCode::TOO_MANY_REQUESTS),
            "TooManyRequestsError"
        );
    }

    #[test]
    fn error_body_has_vllm_shape() {
        let body = error_body(StatusCode::NOT_FOUND, "no such model", Some("model"));
        let value: Value = serde_json::from_slice(&body).expect("error body is JSON");
        assert_eq!(
            value,
            json!({"error": {"message": "no such model", "type": "NotFoundError", "param": "model", "code": 404}})
        );
    }

    #[test]
    fn response_id_reuses_the_request_id() {
        let meta = ResponseMeta::new(Endpoint::ChatCompletions, "abc-1", 1, "m".into());
        assert_eq!(meta.id, "chatcmpl-abc-1");
        let meta = ResponseMeta::new(Endpoint::Completions, "", 1, "m".into());
        assert!(meta.id.starts_with("cmpl-"));
        assert_eq!(meta.id.len(), "cmpl-".len() + 16);
    }

    #[test]
    fn stream_events_have_vllm_chunk_shapes() {
        let meta = ResponseMeta {
            endpoint: Endpoint::ChatCompletions,
            id: "chatcmpl-1".into(),
            created: 7,
            model: "m".into(),
        };
        let parse = |event: String| -> Value {
            let json = event
                .strip_prefix("data: ")
                .and_then(|rest| rest.strip_suffix("\n\n"))
                .expect("event is `data: ...` followed by a blank line");
            serde_json::from_str(json).expect("event payload is JSON")
        };
        assert_eq!(
            parse(meta.role_event()),
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]})
        );
        assert_eq!(
            parse(meta.token_event(" hi", Some(FinishReason::Length)))["choices"][0],
            json!({"index": 0, "delta": {"content": " hi"}, "logprobs": null, "finish_reason": "length"})
        );
        assert_eq!(
            parse(meta.usage_event(Usage::new(2, 3))),
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m", "choices": [],
                   "usage": {"prompt_tokens": 2, "total_tokens": 5, "completion_tokens": 3, "prompt_tokens_details": null}})
        );
        let completion = ResponseMeta {
            endpoint: Endpoint::Completions,
            ..meta
        };
        assert_eq!(
            parse(completion.token_event("x", None)),
            json!({"id": "chatcmpl-1", "object": "text_completion", "created": 7, "model": "m",
                   "choices": [{"index": 0, "text": "x", "logprobs": null, "finish_reason": null, "stop_reason": null}]})
        );
    }

    #[test]
    fn model_list_puts_adapters_under_the_base_model() {
        let list = ModelList::new("base", &["lora-a".to_string()], "vllm", 5, 4096);
        let value = serde_json::to_value(&list).expect("model list serializes");
        assert_eq!(value["object"], "list");
        assert_eq!(value["data"][0]["id"], "base");
        assert_eq!(value["data"][0]["parent"], Value::Null);
        assert_eq!(value["data"][0]["max_model_len"], 4096);
        assert_eq!(value["data"][0]["owned_by"], "vllm");
        assert_eq!(value["data"][1]["id"], "lora-a");
        assert_eq!(value["data"][1]["root"], "lora-a");
        assert_eq!(value["data"][1]["parent"], "base");
        assert_eq!(value["data"][1]["max_model_len"], Value::Null);
    }
}
