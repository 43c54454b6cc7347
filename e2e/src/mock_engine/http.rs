//! The HTTP face of the engine: routes, request reading, responses and the SSE body. Knows nothing
//! about pacing or load; that is the [`Backend`]'s business.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use parking_lot::RwLock;
use serde::Deserialize;
use serde_json::Value;
use switchyard_runtime::clock;
use tokio::time::Instant;

use super::backend::{Backend, PacedBackend};
use super::config::{EngineMode, MockEngineConfig};
use super::generation::{Generation, GenerationPlan, completion_pieces, output_length};
use super::metrics::{self, MetricsInput};
use super::openai::{
    self, Endpoint, ModelList, ResponseMeta, SSE_DONE, Usage, error_body, parse_request,
};
use super::sim::{self, Simulator};
use super::stats::{Delivery, EngineStats, FinishReason};

/// Error type request bodies must convert into.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Response body of every route: streamed frames for SSE, one frame otherwise.
pub type ResponseBody = UnsyncBoxBody<Bytes, Infallible>;

/// Largest request body read; far above any test prompt, and it bounds what a stray client can
/// make the mock buffer.
pub const MAX_REQUEST_BODY_BYTES: usize = 8 * 1024 * 1024;

/// `max_model_len` reported in `/v1/models`: the context of the real vLLM capture, which equals
/// the default KV cache size, so a single request can fill the cache but not exceed it.
pub const MAX_MODEL_LEN_TOKENS: u64 = 4096;

/// Names the pod that answered.
pub const POD_HEADER: HeaderName = HeaderName::from_static("x-mock-pod");
/// The `model` field of the request body exactly as the engine received it (empty if none), so
/// tests can see what a router rewrote it to.
pub const RECEIVED_MODEL_HEADER: HeaderName = HeaderName::from_static("x-mock-received-model");
/// The request's `x-request-id` as received (empty if none), so tests can check propagation.
pub const REQUEST_ID_ECHO_HEADER: HeaderName = HeaderName::from_static("x-mock-request-id");
/// Request header asking the engine to fail an inference request with this status.
pub const FORCED_STATUS_HEADER: HeaderName = HeaderName::from_static("x-mock-status");
const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

const JSON: HeaderValue = HeaderValue::from_static("application/json");
const EVENT_STREAM: HeaderValue = HeaderValue::from_static("text/event-stream; charset=utf-8");
const PLAIN_TEXT: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");
const PROMETHEUS_TEXT: HeaderValue =
    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");

/// Shared state of one engine instance.
pub struct EngineState {
    config: MockEngineConfig,
    backend: Box<dyn Backend>,
    /// In sim mode, the simulator that `backend` also is, reached directly to hand it each
    /// prompt's token ids and to serve `/sim/state`.
    simulator: Option<Simulator>,
    stats: Arc<EngineStats>,
    /// Starts as the configured adapters; `/v1/load_lora_adapter` and
    /// `/v1/unload_lora_adapter` change it at runtime like vLLM's dynamic LoRA API.
    adapters: RwLock<Vec<String>>,
    started_at: SystemTime,
}

/// Per-request values echoed back in response headers.
struct Echo {
    request_id: String,
    received_model: Option<String>,
}

impl EngineState {
    /// An engine whose tokens are paced by [`PacedBackend`] from the configured latencies, or
    /// by a [`Simulator`] in sim mode (which needs a tokio runtime).
    pub fn new(config: MockEngineConfig) -> Self {
        match &config.mode {
            EngineMode::Simple => {
                let backend = PacedBackend::new(
                    config.time_to_first_token,
                    config.inter_token_latency,
                    config.kv_cache_capacity_tokens,
                );
                Self::with_backend(config, Box::new(backend))
            }
            EngineMode::Sim(sim_config) => {
                let simulator = Simulator::spawn(sim_config.clone());
                let mut state = Self::with_backend(config, Box::new(simulator.clone()));
                state.simulator = Some(simulator);
                state
            }
        }
    }

    /// An engine whose token timing and load come from `backend` (e.g. a batching simulator).
    pub fn with_backend(config: MockEngineConfig, backend: Box<dyn Backend>) -> Self {
        let stats = Arc::new(EngineStats::new(metrics::histogram_layout(config.engine)));
        Self {
            adapters: RwLock::new(config.lora_adapters.clone()),
            config,
            backend,
            simulator: None,
            stats,
            started_at: clock::wall_now(),
        }
    }

    /// Serves one request; never fails, every problem becomes an HTTP error response.
    pub async fn handle<B>(&self, request: Request<B>) -> Response<ResponseBody>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let arrived_at = Instant::now();
        let mut echo = Echo {
            request_id: request
                .headers()
                .get(REQUEST_ID_HEADER)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            received_model: None,
        };
        let path = request.uri().path().to_string();
        let method = request.method().clone();
        let mut response = match (method, path.as_str()) {
            (Method::POST, "/v1/chat/completions") => self
                .inference(Endpoint::ChatCompletions, request, arrived_at, &mut echo)
                .await
                .unwrap_or_else(ApiError::into_response),
            (Method::POST, "/v1/completions") => self
                .inference(Endpoint::Completions, request, arrived_at, &mut echo)
                .await
                .unwrap_or_else(ApiError::into_response),
            (Method::GET, "/v1/models") => self.models(),
            (Method::GET, "/metrics") => self.metrics(),
            (Method::GET, "/health") => full(StatusCode::OK, None, Bytes::new()),
            (method, "/sim/state") if self.simulator.is_some() => match method {
                Method::GET => self.sim_state(),
                _ => fastapi_detail(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed"),
            },
            (Method::POST, "/v1/load_lora_adapter") => self
                .load_adapter(request)
                .await
                .unwrap_or_else(ApiError::into_response),
            (Method::POST, "/v1/unload_lora_adapter") => self
                .unload_adapter(request)
                .await
                .unwrap_or_else(ApiError::into_response),
            (
                _,
                "/v1/chat/completions"
                | "/v1/completions"
                | "/v1/models"
                | "/metrics"
                | "/health"
                | "/v1/load_lora_adapter"
                | "/v1/unload_lora_adapter",
            ) => fastapi_detail(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed"),
            _ => fastapi_detail(StatusCode::NOT_FOUND, "Not Found"),
        };
        let headers = response.headers_mut();
        headers.insert(POD_HEADER, header_value(&self.config.pod_name));
        headers.insert(
            RECEIVED_MODEL_HEADER,
            header_value(echo.received_model.as_deref().unwrap_or_default()),
        );
        headers.insert(REQUEST_ID_ECHO_HEADER, header_value(&echo.request_id));
        response
    }

    async fn inference<B>(
        &self,
        endpoint: Endpoint,
        request: Request<B>,
        arrived_at: Instant,
        echo: &mut Echo,
    ) -> Result<Response<ResponseBody>, ApiError>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let forced_status = forced_status(&request)?;
        let body = read_body(request.into_body()).await?;
        let json: Value = serde_json::from_slice(&body)
            .map_err(|error| ApiError::bad_request(format!("Invalid JSON body: {error}")))?;
        let prompt = self
            .simulator
            .as_ref()
            .map(|_| sim::prompt_token_ids(endpoint, &json));
        echo.received_model = json
            .get("model")
            .and_then(Value::as_str)
            .map(str::to_string);
        if let Some(status) = forced_status {
            let message = format!(
                "Simulated failure: {} requested this status from pod {}.",
                FORCED_STATUS_HEADER, self.config.pod_name
            );
            return Err(ApiError::new(status, message));
        }
        let parsed = parse_request(endpoint, json).map_err(|error| ApiError {
            param: error.param(),
            ..ApiError::bad_request(error.to_string())
        })?;
        let model = parsed.model.unwrap_or_else(|| self.config.model.clone());
        if !self.serves(&model) {
            let message = format!(
                "The model `{model}` does not exist. Valid aliases: {}.",
                self.config.model
            );
            return Err(ApiError::new(StatusCode::NOT_FOUND, message).param("model"));
        }

        let (mut output_tokens, mut finish_reason) =
            output_length(self.config.output_tokens, parsed.max_tokens);
        let mut prompt_tokens = parsed.prompt_tokens;
        let mut backend = None;
        if let (Some(simulator), Some(prompt)) = (&self.simulator, prompt) {
            // The simulator's own token count, so usage and metrics agree with its KV cache.
            prompt_tokens = u32::try_from(prompt.len()).unwrap_or(u32::MAX);
            let context = self.max_model_len();
            let room = context.saturating_sub(u64::from(prompt_tokens));
            if room == 0 {
                return Err(context_length_exceeded(context, prompt_tokens));
            }
            // Like vLLM, a completion that would overrun the context is cut at its end.
            if u64::from(output_tokens) > room {
                output_tokens = u32::try_from(room).unwrap_or(u32::MAX);
                finish_reason = FinishReason::Length;
            }
            backend = Some(simulator.with_prompt(prompt));
        }
        let plan = GenerationPlan {
            pieces: completion_pieces(&model, &self.config.pod_name, output_tokens),
            model: model.clone(),
            prompt_tokens,
            finish_reason,
            delivery: Delivery::from_streaming(parsed.stream),
        };
        let backend: &dyn Backend = match &backend {
            Some(prompt_backend) => prompt_backend,
            None => self.backend.as_ref(),
        };
        let mut generation = Generation::start(backend, Arc::clone(&self.stats), plan, arrived_at);
        let meta = ResponseMeta::new(endpoint, &echo.request_id, unix_seconds(), model);
        if parsed.stream {
            return Ok(event_stream(SseStream {
                generation,
                meta,
                include_usage: parsed.include_usage,
                phase: SsePhase::Tokens,
            }));
        }
        let text = generation.collect_text().await;
        let usage = Usage::new(generation.prompt_tokens(), generation.completion_tokens());
        let body = openai::completion_body(&meta, &text, generation.finish_reason(), usage);
        Ok(full(StatusCode::OK, Some(JSON), body.into()))
    }

    /// The context length: [`MAX_MODEL_LEN_TOKENS`], or less when a simulated KV cache is
    /// smaller, since one sequence must fit in it.
    fn max_model_len(&self) -> u64 {
        self.simulator
            .as_ref()
            .map_or(MAX_MODEL_LEN_TOKENS, |simulator| {
                MAX_MODEL_LEN_TOKENS.min(simulator.kv_capacity_tokens())
            })
    }

    fn serves(&self, model: &str) -> bool {
        model == self.config.model || self.adapters.read().iter().any(|adapter| adapter == model)
    }

    fn models(&self) -> Response<ResponseBody> {
        let created = self
            .started_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let list = ModelList::new(
            &self.config.model,
            &self.adapters.read(),
            self.config.engine.owner(),
            created,
            self.max_model_len(),
        );
        json_response(StatusCode::OK, &list)
    }

    fn metrics(&self) -> Response<ResponseBody> {
        let load = self.backend.load();
        let prefix_cache = self.backend.prefix_cache();
        let stats = self.stats.snapshot();
        let adapters = self.adapters.read().clone();
        let page = metrics::render(&MetricsInput {
            flavor: self.config.engine,
            model: &self.config.model,
            lora_adapters: &adapters,
            load: &load,
            prefix_cache: prefix_cache.as_ref(),
            kv_cache_blocks: match &self.config.mode {
                EngineMode::Sim(sim) => Some((sim.kv_blocks, sim.block_size)),
                EngineMode::Simple => None,
            },
            stats: &stats,
            started_at_unix: unix_seconds_f64(self.started_at),
            now_unix: unix_seconds_f64(clock::wall_now()),
        });
        full(StatusCode::OK, Some(PROMETHEUS_TEXT), page.into())
    }

    /// `GET /sim/state`: the simulator's scheduler and cache state; only routed in sim mode.
    fn sim_state(&self) -> Response<ResponseBody> {
        match &self.simulator {
            Some(simulator) => json_response(StatusCode::OK, &simulator.state()),
            None => fastapi_detail(StatusCode::NOT_FOUND, "Not Found"),
        }
    }

    async fn load_adapter<B>(&self, request: Request<B>) -> Result<Response<ResponseBody>, ApiError>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let name = adapter_name(request).await?;
        let mut adapters = self.adapters.write();
        if name == self.config.model || adapters.contains(&name) {
            let message = format!("The lora adapter '{name}' has already been loaded.");
            return Err(ApiError::bad_request(message).param("lora_name"));
        }
        adapters.push(name.clone());
        let message = format!("Success: LoRA adapter '{name}' added successfully.");
        Ok(full(StatusCode::OK, Some(PLAIN_TEXT), message.into()))
    }

    async fn unload_adapter<B>(
        &self,
        request: Request<B>,
    ) -> Result<Response<ResponseBody>, ApiError>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let name = adapter_name(request).await?;
        let mut adapters = self.adapters.write();
        let Some(position) = adapters.iter().position(|adapter| *adapter == name) else {
            let message = format!("The lora adapter '{name}' cannot be found.");
            return Err(ApiError::new(StatusCode::NOT_FOUND, message).param("lora_name"));
        };
        adapters.remove(position);
        let message = format!("Success: LoRA adapter '{name}' removed successfully.");
        Ok(full(StatusCode::OK, Some(PLAIN_TEXT), message.into()))
    }
}

/// A failed request, answered with vLLM's error body.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    /// The request field at fault, if one is.
    param: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn param(self, param: &'static str) -> Self {
        Self {
            param: Some(param),
            ..self
        }
    }

    fn into_response(self) -> Response<ResponseBody> {
        let body = error_body(self.status, &self.message, self.param);
        full(self.status, Some(JSON), body.into())
    }
}

/// vLLM's answer to a prompt that leaves no room for a single output token.
fn context_length_exceeded(context: u64, prompt_tokens: u32) -> ApiError {
    let message = format!(
        "This model's maximum context length is {context} tokens. However, your prompt contains \
         {prompt_tokens} input tokens, which leaves no room for output tokens. Please reduce the \
         length of the input prompt. (parameter=input_tokens, value={prompt_tokens})"
    );
    ApiError::bad_request(message).param("input_tokens")
}

/// The `x-mock-status` the caller asked for, if any; only 4xx and 5xx make sense there.
fn forced_status<B>(request: &Request<B>) -> Result<Option<StatusCode>, ApiError> {
    let Some(value) = request.headers().get(FORCED_STATUS_HEADER) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|text| text.trim().parse::<u16>().ok())
        .and_then(|code| StatusCode::from_u16(code).ok())
        .filter(|status| status.is_client_error() || status.is_server_error())
        .map(Some)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "{FORCED_STATUS_HEADER} must be a 4xx or 5xx status code, got {value:?}."
            ))
        })
}

async fn read_body<B>(body: B) -> Result<Bytes, ApiError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    match Limited::new(body, MAX_REQUEST_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Request body exceeds {MAX_REQUEST_BODY_BYTES} bytes."),
        )),
        Err(error) => Err(ApiError::bad_request(format!(
            "Could not read the request body: {error}"
        ))),
    }
}

#[derive(Deserialize)]
struct AdapterRequest {
    lora_name: String,
}

async fn adapter_name<B>(request: Request<B>) -> Result<String, ApiError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let body = read_body(request.into_body()).await?;
    let request: AdapterRequest = serde_json::from_slice(&body)
        .map_err(|error| ApiError::bad_request(format!("Invalid adapter request: {error}")))?;
    if request.lora_name.trim().is_empty() {
        return Err(ApiError::bad_request("lora_name must not be empty.").param("lora_name"));
    }
    Ok(request.lora_name)
}

/// Where an event stream is.
enum SsePhase {
    Tokens,
    Usage,
    Done,
    Finished,
}

/// The body of a streamed response, one frame per event so each token reaches the client as
/// soon as it is produced. Dropping it (client gone) drops the generation, which aborts the
/// request in the backend.
struct SseStream {
    generation: Generation,
    meta: ResponseMeta,
    include_usage: bool,
    phase: SsePhase,
}

impl SseStream {
    async fn next_frame(&mut self) -> Option<Bytes> {
        loop {
            match self.phase {
                SsePhase::Tokens => {
                    let Some(token) = self.generation.next_token().await else {
                        self.phase = SsePhase::Usage;
                        continue;
                    };
                    let event = self.meta.token_event(&token.text, token.finish_reason);
                    let is_first = self.generation.completion_tokens() == 1;
                    // Like vLLM, the chat role event goes out with the first token, not before.
                    if is_first && self.meta.endpoint == Endpoint::ChatCompletions {
                        return Some(format!("{}{event}", self.meta.role_event()).into());
                    }
                    return Some(event.into());
                }
                SsePhase::Usage => {
                    self.phase = SsePhase::Done;
                    if self.include_usage {
                        let usage = Usage::new(
                            self.generation.prompt_tokens(),
                            self.generation.completion_tokens(),
                        );
                        return Some(self.meta.usage_event(usage).into());
                    }
                }
                SsePhase::Done => {
                    self.phase = SsePhase::Finished;
                    return Some(Bytes::from_static(SSE_DONE.as_bytes()));
                }
                SsePhase::Finished => return None,
            }
        }
    }
}

fn event_stream(stream: SseStream) -> Response<ResponseBody> {
    let frames = futures::stream::unfold(stream, |mut stream| async move {
        let frame = stream.next_frame().await?;
        Some((Ok::<_, Infallible>(Frame::data(frame)), stream))
    });
    let mut response = Response::new(UnsyncBoxBody::new(StreamBody::new(frames)));
    response.headers_mut().insert(CONTENT_TYPE, EVENT_STREAM);
    response
}

fn full(
    status: StatusCode,
    content_type: Option<HeaderValue>,
    body: Bytes,
) -> Response<ResponseBody> {
    let mut response = Response::new(UnsyncBoxBody::new(Full::new(body)));
    *response.status_mut() = status;
    if let Some(content_type) = content_type {
        response.headers_mut().insert(CONTENT_TYPE, content_type);
    }
    response
}

fn json_response<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<ResponseBody> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    full(status, Some(JSON), body.into())
}

/// FastAPI's own answer for unknown routes and methods, which vLLM does not override.
fn fastapi_detail(status: StatusCode, detail: &str) -> Response<ResponseBody> {
    json_response(status, &serde_json::json!({ "detail": detail }))
}

/// Header values cannot hold control characters; such a value is echoed as empty rather than
/// failing the response.
fn header_value(value: &str) -> HeaderValue {
    HeaderValue::from_bytes(value.as_bytes()).unwrap_or(HeaderValue::from_static(""))
}

fn unix_seconds() -> u64 {
    clock::wall_now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn unix_seconds_f64(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}
