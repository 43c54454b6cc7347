//! The scheduling side of the engine: when each token of a request comes out, and how loaded the
//! engine is right now.
//!
//! The HTTP layer talks only to [`Backend`]. [`PacedBackend`] serves every request at once at a
//! fixed pace (nothing ever waits); the batching simulator in [`sim`](super::sim) implements the
//! same trait (queueing requests, stretching inter-token latency with the batch size) without any
//! change to request parsing, response shapes or `/metrics` rendering.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use parking_lot::Mutex;

/// What the scheduler needs to know about one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenerationRequest {
    /// Requested model: the base model or one of its LoRA adapters.
    pub model: String,
    pub prompt_tokens: u32,
    /// Exactly this many tokens are generated (already capped by `max_tokens`), at least 1.
    pub output_tokens: u32,
}

/// One item per generated token, exactly `output_tokens` of them, each yielded at the moment the
/// engine produces it. Dropping the stream aborts the request and releases everything it holds
/// (running slot, KV cache), which is how client disconnects reach the scheduler.
pub type TokenStream = Pin<Box<dyn Stream<Item = ()> + Send>>;

/// A token scheduler.
pub trait Backend: Send + Sync {
    /// Accepts a request; the request counts as running or waiting until the stream is dropped.
    fn admit(&self, request: GenerationRequest) -> TokenStream;
    /// The load the engine reports on `/metrics` at this instant.
    fn load(&self) -> EngineLoad;
    /// Prefix-cache counters, for backends that model a prefix cache; `/metrics` leaves the
    /// prefix-cache families out when this is `None`, as an engine without prefix caching does.
    fn prefix_cache(&self) -> Option<PrefixCacheStats> {
        None
    }
}

/// Prefix-cache and preemption counters, cumulative since the engine started.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PrefixCacheStats {
    /// Prompt tokens looked up in the prefix cache when requests were admitted (vLLM's
    /// `prefix_cache_queries`).
    pub queried_tokens: u64,
    /// Of those, tokens whose KV was already cached (vLLM's `prefix_cache_hits`).
    pub hit_tokens: u64,
    /// Hit rate of the most recently admitted batch of prompts: SGLang's `cache_hit_rate`
    /// gauge, which describes the last prefill batch rather than the whole run.
    pub last_batch_hit_rate: f64,
    /// Running sequences pushed back to the waiting queue to free KV blocks for others.
    pub preemptions: u64,
}

/// Instantaneous engine load, the gauges of `/metrics`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineLoad {
    pub running: u64,
    pub waiting: u64,
    pub kv_cache_used_tokens: u64,
    pub kv_cache_capacity_tokens: u64,
    /// Models (base or LoRA) with at least one running request.
    pub running_models: BTreeSet<String>,
    /// Models (base or LoRA) with at least one waiting request.
    pub waiting_models: BTreeSet<String>,
}

impl EngineLoad {
    /// Fraction of the KV cache in use, 0.0 ..= 1.0.
    pub fn kv_cache_usage(&self) -> f64 {
        if self.kv_cache_capacity_tokens == 0 {
            return 0.0;
        }
        (self.kv_cache_used_tokens as f64 / self.kv_cache_capacity_tokens as f64).min(1.0)
    }
}

/// Serves every request immediately: the first token after `time_to_first_token`, then one every
/// `inter_token_latency`, whatever else is running. Nothing ever waits.
pub struct PacedBackend {
    tracker: Arc<LoadTracker>,
    time_to_first_token: Duration,
    inter_token_latency: Duration,
    kv_cache_capacity_tokens: u64,
}

impl PacedBackend {
    pub fn new(
        time_to_first_token: Duration,
        inter_token_latency: Duration,
        kv_cache_capacity_tokens: u64,
    ) -> Self {
        Self {
            tracker: Arc::default(),
            time_to_first_token,
            inter_token_latency,
            kv_cache_capacity_tokens,
        }
    }
}

struct PacedGeneration {
    lease: RunningLease,
    produced: u32,
    total: u32,
    time_to_first_token: Duration,
    inter_token_latency: Duration,
}

impl Backend for PacedBackend {
    fn admit(&self, request: GenerationRequest) -> TokenStream {
        let lease = RunningLease::acquire(&self.tracker, request.model, request.prompt_tokens);
        let generation = PacedGeneration {
            lease,
            produced: 0,
            total: request.output_tokens,
            time_to_first_token: self.time_to_first_token,
            inter_token_latency: self.inter_token_latency,
        };
        Box::pin(futures::stream::unfold(
            generation,
            |mut generation| async move {
                if generation.produced >= generation.total {
                    return None;
                }
                let delay = if generation.produced == 0 {
                    generation.time_to_first_token
                } else {
                    generation.inter_token_latency
                };
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                generation.produced += 1;
                // Each new token's KV entry stays allocated until the request ends.
                generation.lease.add_kv_tokens(1);
                Some(((), generation))
            },
        ))
    }

    fn load(&self) -> EngineLoad {
        let state = self.tracker.state.lock();
        EngineLoad {
            running: state.running_by_model.values().sum(),
            waiting: 0,
            kv_cache_used_tokens: state.kv_tokens,
            kv_cache_capacity_tokens: self.kv_cache_capacity_tokens,
            running_models: state.running_by_model.keys().cloned().collect(),
            waiting_models: BTreeSet::new(),
        }
    }
}

#[derive(Default)]
struct LoadTracker {
    state: Mutex<TrackedLoad>,
}

#[derive(Default)]
struct TrackedLoad {
    /// Only models with at least one running request have an entry.
    running_by_model: BTreeMap<String, u64>,
    kv_tokens: u64,
}

/// One running request's share of the load; given back on drop, whichever way the request ends.
struct RunningLease {
    tracker: Arc<LoadTracker>,
    model: String,
    kv_tokens: u64,
}

impl RunningLease {
    fn acquire(tracker: &Arc<LoadTracker>, model: String, prompt_tokens: u32) -> Self {
        let kv_tokens = u64::from(prompt_tokens);
        {
            let mut state = tracker.state.lock();
            *state.running_by_model.entry(model.clone()).or_default() += 1;
            state.kv_tokens += kv_tokens;
        }
        Self {
            tracker: Arc::clone(tracker),
            model,
            kv_tokens,
        }
    }

    fn add_kv_tokens(&mut self, tokens: u64) {
        self.tracker.state.lock().kv_tokens += tokens;
        self.kv_tokens += tokens;
    }
}

impl Drop for RunningLease {
    fn drop(&mut self) {
        let mut state = self.tracker.state.lock();
        state.kv_tokens = state.kv_tokens.saturating_sub(self.kv_tokens);
        if let Some(running) = state.running_by_model.get_mut(&self.model) {
            *running = running.saturating_sub(1);
            if *running == 0 {
                state.running_by_model.remove(&self.model);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    fn request(model: &str, prompt_tokens: u32, output_tokens: u32) -> GenerationRequest {
        GenerationRequest {
            model: model.into(),
            prompt_tokens,
            output_tokens,
        }
    }

    #[tokio::test]
    async fn yields_exactly_the_requested_tokens_and_releases_the_load_at_the_end() {
        let backend = PacedBackend::new(Duration::ZERO, Duration::ZERO, 100);
        let mut tokens = backend.admit(request("m", 10, 3));
        let load = backend.load();
        assert_eq!(load.running, 1);
        assert_eq!(load.kv_cache_used_tokens, 10);
        assert_eq!(load.running_models, BTreeSet::from(["m".to_string()]));

        let mut produced = 0;
        while tokens.next().await.is_some() {
            produced += 1;
        }
        assert_eq!(produced, 3);
        assert_eq!(
            backend.load(),
            EngineLoad {
                kv_cache_capacity_tokens: 100,
                ..EngineLoad::default()
            }
        );
    }

    #[tokio::test]
    async fn dropping_the_stream_mid_generation_releases_the_load() {
        let backend = PacedBackend::new(Duration::ZERO, Duration::ZERO, 100);
        let mut first = backend.admit(request("base", 4, 5));
        let second = backend.admit(request("adapter", 6, 5));
        assert_eq!(first.next().await, Some(()));
        let load = backend.load();
        assert_eq!(load.running, 2);
        assert_eq!(load.kv_cache_used_tokens, 11);
        assert!((load.kv_cache_usage() - 0.11).abs() < 1e-9);

        drop(second);
        let load = backend.load();
        assert_eq!(load.running, 1);
        assert_eq!(load.kv_cache_used_tokens, 5);
        assert_eq!(load.running_models, BTreeSet::from(["base".to_string()]));
        drop(first);
        assert_eq!(backend.load().running, 0);
        assert_eq!(backend.load().kv_cache_used_tokens, 0);
    }

    #[test]
    fn kv_cache_usage_is_clamped_to_one() {
        let load = EngineLoad {
            kv_cache_used_tokens: 300,
            kv_cache_capacity_tokens: 100,
            ..EngineLoad::default()
        };
        assert_eq!(load.kv_cache_usage(), 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_are_paced_by_ttft_then_itl() {
        let backend = PacedBackend::new(Duration::from_millis(300), Duration::from_millis(50), 100);
        let started = tokio::time::Instant::now();
        let mut tokens = backend.admit(request("m", 1, 3));
        tokens.next().await;
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        tokens.next().await;
        tokens.next().await;
        assert_eq!(started.elapsed(), Duration::from_millis(400));
    }
}
