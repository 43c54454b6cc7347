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
use super::config::{EngineMode, Fault, MockEngineConfig};
use super::generation::{Generation, GenerationPlan, completion_pieces, output_length};
use super::metrics::{self, MetricsInput};
use super::openai::{
    self, Endpoint, ModelList, ResponseMeta, SSE_DONE, Usage, error_body, parse_request,
};
use super::pd::{
    BootstrapClient, BootstrapRooms, DECODE_STATUS_HEADER, HandshakeError, KV_SOURCE_HEADER,
    KV_TRANSFER_HEADER, KvOrigin, PdFields, PdRole, prefill_answer_params,
};
use super::sim::{self, Simulator};
use super::stats::{Delivery, EngineStats, FinishReason};

/// Error type request bodies must convert into.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Response body of every route: streamed frames for SSE, one frame otherwise.
/// A body error cuts the connection (a broken engine, [`Fault::CutStreamAfter`]).
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

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
const DECODE_STATUS: HeaderName = HeaderName::from_static(DECODE_STATUS_HEADER);
const KV_TRANSFER: HeaderName = HeaderName::from_static(KV_TRANSFER_HEADER);
const KV_SOURCE: HeaderName = HeaderName::from_static(KV_SOURCE_HEADER);

/// Inference requests `GET /mock/requests` keeps: the latest ones, enough for any test.
pub const LOGGED_REQUESTS: usize = 256;

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
    /// Prefill engines: the SGLang bootstrap rooms their requests wait in.
    rooms: BootstrapRooms,
    /// Decode engines: the way to a prefill engine's bootstrap server.
    bootstrap: BootstrapClient,
    /// The latest inference requests, for `GET /mock/requests`.
    requests: RequestLog,
}

/// Per-request values echoed back in response headers.
struct Echo {
    request_id: String,
    received_model: Option<String>,
    /// Decode engines: where the prompt's KV came from.
    kv_origin: Option<KvOrigin>,
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
            rooms: BootstrapRooms::default(),
            bootstrap: BootstrapClient::default(),
            requests: RequestLog::default(),
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
            kv_origin: None,
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
            (Method::GET, "/mock/requests") => json_response(StatusCode::OK, &self.requests.view()),
            (Method::GET, path) if path.starts_with("/bootstrap/") => {
                self.bootstrap_room(path).await
            }
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
        if let Some(origin) = &echo.kv_origin {
            headers.insert(KV_TRANSFER, HeaderValue::from_static(origin.header()));
            if let KvOrigin::Transferred { source, .. } = origin {
                headers.insert(KV_SOURCE, header_value(source));
            }
        }
        response
    }

    /// `GET /bootstrap/{room}` on a prefill engine: a decode engine joins the room and waits
    /// for this engine's request with that room.
    async fn bootstrap_room(&self, path: &str) -> Response<ResponseBody> {
        let Some(pd) = self
            .config
            .pd
            .as_ref()
            .filter(|pd| pd.role == PdRole::Prefill)
        else {
            return fastapi_detail(StatusCode::NOT_FOUND, "Not Found");
        };
        let Some(room) = path
            .strip_prefix("/bootstrap/")
            .and_then(|room| room.parse::<u64>().ok())
        else {
            return fastapi_detail(StatusCode::BAD_REQUEST, "bootstrap room must be a number");
        };
        match self.rooms.decode(room, pd.handshake_timeout).await {
            Ok(()) => json_response(
                StatusCode::OK,
                &serde_json::json!({"prefill_pod": self.config.pod_name, "room": room}),
            ),
            Err(error) => fastapi_detail(StatusCode::REQUEST_TIMEOUT, &error.to_string()),
        }
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
        let decode_status = forced_status(&request, &DECODE_STATUS)?;
        let forced_status = forced_status(&request, &FORCED_STATUS_HEADER)?;
        let authority = request
            .headers()
            .get(http::header::HOST)
            .and_then(|host| host.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let path = request.uri().path().to_owned();
        let body = read_body(request.into_body()).await?;
        let json: Value = serde_json::from_slice(&body)
            .map_err(|error| ApiError::bad_request(format!("Invalid JSON body: {error}")))?;
        let logged = self.requests.record(path, &echo.request_id, json.clone());
        let answer = self
            .answer(
                endpoint,
                json,
                forced_status,
                decode_status,
                &authority,
                arrived_at,
                echo,
            )
            .await;
        logged.answered();
        answer
    }

    /// The answer to an inference request whose body is `json`.
    #[allow(clippy::too_many_arguments)]
    async fn answer(
        &self,
        endpoint: Endpoint,
        json: Value,
        forced_status: Option<StatusCode>,
        decode_status: Option<StatusCode>,
        authority: &str,
        arrived_at: Instant,
        echo: &mut Echo,
    ) -> Result<Response<ResponseBody>, ApiError> {
        let pd_fields = PdFields::of(&json);
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
        match self.config.fault {
            Some(Fault::Status(status)) => {
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let message = format!(
                    "Simulated fault: pod {} fails every request.",
                    self.config.pod_name
                );
                return Err(ApiError::new(status, message));
            }
            Some(Fault::Hang) => std::future::pending::<()>().await,
            Some(Fault::CutStreamAfter(_)) | None => {}
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

        let role = self
            .config
            .pd
            .as_ref()
            .map(|pd| (pd.role, pd.handshake_timeout));
        let mut kv_transfer_params = None;
        match role {
            None => {}
            Some((PdRole::Prefill, timeout)) => {
                if let Some(bootstrap) = &pd_fields.bootstrap {
                    self.rooms
                        .prefill(bootstrap.room, timeout)
                        .await
                        .map_err(bootstrap_failed)?;
                }
                if pd_fields.wants_remote_decode() {
                    let (host, port) = authority.rsplit_once(':').unwrap_or((authority, "0"));
                    kv_transfer_params = Some(prefill_answer_params(
                        &self.config.pod_name,
                        &echo.request_id,
                        host,
                        port.parse().unwrap_or(0),
                    ));
                }
            }
            Some((PdRole::Decode, timeout)) => {
                let origin = if let Some(bootstrap) = &pd_fields.bootstrap {
                    let source = self
                        .bootstrap
                        .join(bootstrap, timeout)
                        .await
                        .map_err(bootstrap_failed)?;
                    KvOrigin::Transferred {
                        how: "bootstrap",
                        source,
                    }
                } else if let Some(engine) = pd_fields.remote_prefill_engine() {
                    KvOrigin::Transferred {
                        how: "received",
                        source: engine.to_owned(),
                    }
                } else {
                    KvOrigin::Recomputed
                };
                echo.kv_origin = Some(origin);
                if let Some(status) = decode_status {
                    let message = format!(
                        "Simulated failure: {DECODE_STATUS} requested this status from decode pod {}.",
                        self.config.pod_name
                    );
                    return Err(ApiError::new(status, message));
                }
            }
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
        // A decode engine reports how much of the prompt it did not compute itself.
        let cached_tokens = echo.kv_origin.as_ref().map(|origin| match origin {
            KvOrigin::Transferred { .. } => generation.prompt_tokens(),
            KvOrigin::Recomputed => 0,
        });
        let usage_of = |generation: &Generation| {
            let usage = Usage::new(generation.prompt_tokens(), generation.completion_tokens());
            match cached_tokens {
                Some(cached) => usage.with_cached(cached),
                None => usage,
            }
        };
        if parsed.stream {
            let cut_after = match self.config.fault {
                Some(Fault::CutStreamAfter(events)) => Some(events),
                _ => None,
            };
            return Ok(event_stream(SseStream {
                generation,
                meta,
                include_usage: parsed.include_usage,
                cached_tokens,
                phase: SsePhase::Tokens,
                cut_after,
            }));
        }
        let text = generation.collect_text().await;
        let usage = usage_of(&generation);
        let body = openai::completion_body(
            &meta,
            &text,
            generation.finish_reason(),
            usage,
            kv_transfer_params.as_ref(),
        );
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

/// SGLang fails a request whose bootstrap pairing failed with a server error.
fn bootstrap_failed(error: HandshakeError) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("KV bootstrap failed: {error}"),
    )
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

/// The status the caller asked for in `header`, if any; only 4xx and 5xx make sense there.
fn forced_status<B>(
    request: &Request<B>,
    header: &HeaderName,
) -> Result<Option<StatusCode>, ApiError> {
    let Some(value) = request.headers().get(header) else {
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
                "{header} must be a 4xx or 5xx status code, got {value:?}."
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
    /// Decode engines: prompt tokens whose KV came from a prefill engine.
    cached_tokens: Option<u32>,
    phase: SsePhase,
    /// Events left before the connection is cut ([`Fault::CutStreamAfter`]).
    cut_after: Option<u32>,
}

/// Pause before a broken engine cuts a stream, so the events before the cut
/// are written out first.
const CUT_FLUSH_PAUSE: Duration = Duration::from_millis(10);

/// Why a broken engine's stream ended early.
#[derive(Debug, thiserror::Error)]
#[error("simulated fault: the stream is cut")]
struct StreamCut;

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
                        let mut usage = Usage::new(
                            self.generation.prompt_tokens(),
                            self.generation.completion_tokens(),
                        );
                        if let Some(cached) = self.cached_tokens {
                            usage = usage.with_cached(cached);
                        }
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
        match &mut stream.cut_after {
            Some(0) => {
                // What was produced reaches the client first, as from an
                // engine that dies mid-stream: hyper writes while the body
                // is pending, and drops its buffer when the body fails.
                tokio::time::sleep(CUT_FLUSH_PAUSE).await;
                stream.cut_after = None;
                stream.phase = SsePhase::Finished;
                return Some((Err(BoxError::from(StreamCut)), stream));
            }
            Some(left) => *left -= 1,
            None => {}
        }
        let frame = stream.next_frame().await?;
        Some((Ok::<_, BoxError>(Frame::data(frame)), stream))
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
    let body = Full::new(body).map_err(|never: Infallible| match never {});
    let mut response = Response::new(UnsyncBoxBody::new(body));
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

/// The latest inference requests an engine received.
#[derive(Default)]
struct RequestLog {
    entries: parking_lot::Mutex<std::collections::VecDeque<Arc<LoggedRequest>>>,
}

struct LoggedRequest {
    path: String,
    request_id: String,
    body: Value,
    /// 0: in progress, 1: answered, 2: the sender went away first.
    outcome: std::sync::atomic::AtomicU8,
}

impl RequestLog {
    fn record(&self, path: String, request_id: &str, body: Value) -> Logged {
        let entry = Arc::new(LoggedRequest {
            path,
            request_id: request_id.to_owned(),
            body,
            outcome: std::sync::atomic::AtomicU8::new(0),
        });
        let mut entries = self.entries.lock();
        if entries.len() == LOGGED_REQUESTS {
            entries.pop_front();
        }
        entries.push_back(Arc::clone(&entry));
        Logged(entry)
    }

    fn view(&self) -> Value {
        let entries = self.entries.lock();
        let requests: Vec<Value> = entries
            .iter()
            .map(|entry| {
                let outcome = match entry.outcome.load(std::sync::atomic::Ordering::Relaxed) {
                    0 => "in_progress",
                    1 => "answered",
                    _ => "cancelled",
                };
                serde_json::json!({
                    "path": entry.path,
                    "requestId": entry.request_id,
                    "body": entry.body,
                    "outcome": outcome,
                })
            })
            .collect();
        serde_json::json!({"requests": requests})
    }
}

/// One logged request: answered when told so, cancelled when dropped before.
struct Logged(Arc<LoggedRequest>);

impl Logged {
    fn answered(self) {
        self.0
            .outcome
            .store(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.0.outcome.compare_exchange(
            0,
            2,
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}
