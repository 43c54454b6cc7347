//! `switchyard-mock-engine`: an OpenAI-compatible fake inference engine standing in for vLLM or
//! SGLang pods in end-to-end tests and the demo.
//!
//! It answers `/v1/chat/completions` and `/v1/completions` (plain and SSE-streamed) with
//! vLLM-shaped bodies whose text names the model and pod that answered, lists its base model and
//! LoRA adapters on `/v1/models`, and exposes the real engine's load metrics on `/metrics`,
//! reflecting the requests it is actually serving.
//!
//! Test hooks:
//! - every response carries `x-mock-pod`, `x-mock-received-model` (the body's `model` as
//!   received) and `x-mock-request-id` (the request's `x-request-id`);
//! - `x-mock-status: NNN` on an inference request makes it fail with that status and a
//!   vLLM-style error body (`x-mock-decode-status: NNN`: decode engines only, once paired);
//! - `GET /mock/requests` lists the latest inference requests received: path, request id, body
//!   and whether the sender waited for the answer or cancelled it;
//! - with `--pd-role prefill|decode`, the engine plays one side of a prefill/decode pair for
//!   every KV connector ([`pd`]);
//! - in sim mode, `GET /sim/state` returns the simulator's [`SimState`] as JSON.
//!
//! Layout:
//! - [`config`]: [`MockEngineConfig`] and the command line;
//! - [`backend`]: when tokens come out and how loaded the engine is (the [`Backend`] trait);
//! - [`sim`]: `--mode sim`, a continuous-batching simulator with a paged, prefix-caching KV
//!   cache whose true state `/metrics` and `GET /sim/state` report;
//! - [`generation`]: one request's output text and its statistics;
//! - [`openai`]: request parsing and the response, chunk and error shapes;
//! - [`pd`]: the prefill and decode roles (KV transfer parameters, SGLang bootstrap rooms);
//! - [`stats`] and [`metrics`]: counters, histograms and the Prometheus page;
//! - [`http`]: routes and the SSE body; [`server`]: accept loop and graceful shutdown.

pub mod backend;
pub mod config;
pub mod generation;
pub mod http;
pub mod metrics;
pub mod openai;
pub mod pd;
pub mod server;
pub mod sim;
pub mod stats;

pub use backend::{
    Backend, EngineLoad, GenerationRequest, PacedBackend, PrefixCacheStats, TokenStream,
};
pub use config::{
    ConfigError, EngineFlavor, EngineMode, Fault, MockEngineArgs, MockEngineConfig, ModeArg,
    SimConfig,
};
pub use server::{RunningMockEngine, SHUTDOWN_GRACE_PERIOD, serve};
pub use sim::{SimState, Simulator};

/// Why the engine could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum MockEngineError {
    #[error("invalid mock engine configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot bind the listen address: {0}")]
    Bind(#[source] std::io::Error),
    #[error("the engine task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}
