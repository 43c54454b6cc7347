//! `--mode sim`: a continuous-batching engine simulator behind the [`Backend`] trait.
//!
//! One engine task runs steps on tokio time (so `tokio::time::pause()` makes whole runs
//! deterministic): each step the [`Scheduler`] admits waiting requests FIFO while fewer than
//! `max_num_seqs` run and the KV cache has room (reusing cached prefix blocks, evicting
//! unreferenced cached blocks least recently released first), newly admitted requests prefill
//! their uncached prompt tokens, and every running sequence decodes one token. A step lasts
//! `itl_ms + itl_ms_per_seq × running + prefill_ms_per_token × prefilled tokens`, so time to
//! first token follows from queueing and prefix reuse, and inter-token latency from the batch
//! size. Dropping a request's token stream (client gone) aborts it and frees its blocks at once.
//!
//! - [`tokenizer`]: prompt → token ids → chained block hashes;
//! - [`kv`]: the paged, prefix-caching block pool;
//! - [`scheduler`]: admission, preemption and step timing, free of clocks and tasks.

pub mod kv;
pub mod scheduler;
pub mod tokenizer;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures::Stream;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio::task::JoinHandle;

pub use scheduler::{SimState, SubmitError};
pub use tokenizer::{TokenId, prompt_token_ids};

use self::scheduler::{Scheduler, SequenceId};
use super::backend::{Backend, EngineLoad, GenerationRequest, PrefixCacheStats, TokenStream};
use super::config::SimConfig;

/// A running engine simulator. Clones share the engine; the engine task stops, and every
/// unfinished token stream ends, when the last clone is dropped.
#[derive(Clone)]
pub struct Simulator {
    core: Arc<Core>,
    _engine: Arc<EngineTask>,
}

struct Core {
    scheduler: Mutex<Scheduler>,
    /// Wakes the idle engine task when work arrives.
    work_arrived: Notify,
    /// Numbers requests admitted without their prompt text, to give each a distinct prompt.
    anonymous_requests: AtomicU64,
    kv_capacity_tokens: u64,
}

struct EngineTask {
    core: Arc<Core>,
    task: JoinHandle<()>,
}

impl Drop for EngineTask {
    fn drop(&mut self) {
        self.task.abort();
        self.core.scheduler.lock().shut_down();
    }
}

impl Simulator {
    /// Starts the engine task; must be called within a tokio runtime.
    pub fn spawn(config: SimConfig) -> Self {
        let core = Arc::new(Core {
            kv_capacity_tokens: config.kv_capacity_tokens(),
            scheduler: Mutex::new(Scheduler::new(config)),
            work_arrived: Notify::new(),
            anonymous_requests: AtomicU64::new(0),
        });
        let task = tokio::spawn(run_engine(Arc::clone(&core)));
        Self {
            _engine: Arc::new(EngineTask {
                core: Arc::clone(&core),
                task,
            }),
            core,
        }
    }

    /// Queues a request whose prompt is `prompt`. A request that could never fit in the KV
    /// cache gets a stream that ends at once (the caller sees an aborted request); callers
    /// should check [`kv_capacity_tokens`](Self::kv_capacity_tokens) first.
    pub fn submit(&self, request: &GenerationRequest, prompt: &[TokenId]) -> TokenStream {
        let (sender, tokens) = unbounded_channel();
        let submitted = self.core.scheduler.lock().submit(
            &request.model,
            prompt,
            request.output_tokens,
            sender,
        );
        match submitted {
            Ok(id) => {
                self.core.work_arrived.notify_one();
                Box::pin(SimTokens {
                    tokens,
                    id,
                    core: Arc::clone(&self.core),
                })
            }
            Err(error) => {
                tracing::warn!(%error, model = %request.model, "request refused by the simulator");
                Box::pin(futures::stream::empty())
            }
        }
    }

    /// A [`Backend`] that admits requests with `prompt` as their token ids, so the prefix cache
    /// sees what the prompt says and not only how long it is.
    pub fn with_prompt(&self, prompt: Vec<TokenId>) -> PromptBackend<'_> {
        PromptBackend {
            simulator: self,
            prompt,
        }
    }

    /// Tokens the KV cache holds: no request can use more.
    pub fn kv_capacity_tokens(&self) -> u64 {
        self.core.kv_capacity_tokens
    }

    pub fn state(&self) -> SimState {
        self.core.scheduler.lock().state()
    }
}

impl Backend for Simulator {
    /// Without the prompt's text the request gets a prompt of its length that shares nothing
    /// with any other; use [`Simulator::with_prompt`] for prefix caching.
    fn admit(&self, request: GenerationRequest) -> TokenStream {
        let number = self.core.anonymous_requests.fetch_add(1, Ordering::Relaxed);
        let prompt = tokenizer::unique_prompt(number, request.prompt_tokens as usize);
        self.submit(&request, &prompt)
    }

    fn load(&self) -> EngineLoad {
        self.core.scheduler.lock().load()
    }

    fn prefix_cache(&self) -> Option<PrefixCacheStats> {
        Some(self.core.scheduler.lock().prefix_cache())
    }
}

/// The simulator seen as a [`Backend`] for one request whose prompt tokens are known.
pub struct PromptBackend<'a> {
    simulator: &'a Simulator,
    prompt: Vec<TokenId>,
}

impl Backend for PromptBackend<'_> {
    fn admit(&self, request: GenerationRequest) -> TokenStream {
        self.simulator.submit(&request, &self.prompt)
    }

    fn load(&self) -> EngineLoad {
        self.simulator.load()
    }

    fn prefix_cache(&self) -> Option<PrefixCacheStats> {
        self.simulator.prefix_cache()
    }
}

/// One request's tokens as the engine emits them; dropping it aborts the request.
struct SimTokens {
    tokens: UnboundedReceiver<()>,
    id: SequenceId,
    core: Arc<Core>,
}

impl Stream for SimTokens {
    type Item = ();

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<()>> {
        self.tokens.poll_recv(cx)
    }
}

impl Drop for SimTokens {
    fn drop(&mut self) {
        // A no-op when the sequence already finished.
        if self.core.scheduler.lock().abort(self.id) {
            // Freed blocks may let a waiting request in.
            self.core.work_arrived.notify_one();
        }
    }
}

async fn run_engine(core: Arc<Core>) {
    loop {
        let step = core.scheduler.lock().begin_step();
        let Some(duration) = step else {
            core.work_arrived.notified().await;
            continue;
        };
        if duration.is_zero() {
            // Zero-latency settings must not starve the clients reading the tokens.
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(duration).await;
        }
        core.scheduler.lock().finish_step();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;
    use tokio::time::Instant;

    use super::*;

    fn config() -> SimConfig {
        SimConfig {
            max_num_seqs: 2,
            kv_blocks: 16,
            block_size: 4,
            prefill_ms_per_token: 1.0,
            itl_ms: 10.0,
            itl_ms_per_seq: 2.0,
            ..SimConfig::default()
        }
    }

    fn request(prompt_tokens: u32, output_tokens: u32) -> GenerationRequest {
        GenerationRequest {
            model: "m".into(),
            prompt_tokens,
            output_tokens,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_come_out_at_the_modelled_times() {
        let simulator = Simulator::spawn(config());
        let started = Instant::now();
        let prompt: Vec<TokenId> = (0..10).collect();
        let mut tokens = simulator.with_prompt(prompt.clone()).admit(request(10, 3));
        assert_eq!(tokens.next().await, Some(()));
        // Prefill 10 tokens: 10 + 2 + 10.
        assert_eq!(started.elapsed(), Duration::from_millis(22));
        assert_eq!(tokens.next().await, Some(()));
        assert_eq!(tokens.next().await, Some(()));
        assert_eq!(started.elapsed(), Duration::from_millis(46));
        assert_eq!(tokens.next().await, None);

        // The same prompt again: 8 tokens cached, 2 prefilled.
        let started = Instant::now();
        let mut tokens = simulator.with_prompt(prompt).admit(request(10, 1));
        assert_eq!(tokens.next().await, Some(()));
        assert_eq!(started.elapsed(), Duration::from_millis(14));
        let state = simulator.state();
        assert_eq!(state.prefix_cache_hit_tokens, 8);
        assert_eq!(state.prefix_cache_queried_tokens, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_stream_aborts_and_lets_a_waiting_request_in() {
        let simulator = Simulator::spawn(SimConfig {
            max_num_seqs: 1,
            ..config()
        });
        let mut first = simulator.admit(request(8, 20));
        let mut second = simulator.admit(request(8, 1));
        assert_eq!(first.next().await, Some(()));
        let load = simulator.load();
        assert_eq!((load.running, load.waiting), (1, 1));
        // The engine already scheduled the next step, which holds a slot for a ninth token.
        assert_eq!(load.kv_cache_used_tokens, 12);
        assert_eq!(load.kv_cache_capacity_tokens, 64);

        drop(first);
        let state = simulator.state();
        assert_eq!(
            (state.running, state.aborted, state.kv_blocks_used),
            (0, 1, 0)
        );
        assert_eq!(second.next().await, Some(()));
        assert_eq!(second.next().await, None);
        assert_eq!(simulator.state().finished, 1);
        // Anonymous prompts never share blocks.
        assert_eq!(simulator.state().prefix_cache_hit_tokens, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_simulator_ends_open_streams() {
        let simulator = Simulator::spawn(config());
        let mut tokens = simulator.admit(request(4, 40));
        assert_eq!(tokens.next().await, Some(()));
        drop(simulator);
        let mut remaining = 0;
        while tokens.next().await.is_some() {
            remaining += 1;
        }
        assert!(remaining < 39);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_too_long_for_the_cache_ends_at_once() {
        let simulator = Simulator::spawn(config());
        let mut tokens = simulator.admit(request(64, 2));
        assert_eq!(tokens.next().await, None);
        assert_eq!(simulator.state().admitted, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_latencies_still_complete() {
        let simulator = Simulator::spawn(SimConfig {
            prefill_ms_per_token: 0.0,
            itl_ms: 0.0,
            itl_ms_per_seq: 0.0,
            ..config()
        });
        let mut tokens = simulator.admit(request(4, 5));
        let mut count = 0;
        while tokens.next().await.is_some() {
            count += 1;
        }
        assert_eq!(count, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn time_scale_shrinks_every_step() {
        let simulator = Simulator::spawn(SimConfig {
            time_scale: 0.5,
            ..config()
        });
        let started = Instant::now();
        let mut tokens = simulator.admit(request(10, 1));
        tokens.next().await;
        assert_eq!(started.elapsed(), Duration::from_millis(11));
    }
}
