//! The engine's scheduling decisions, free of clocks and tasks so they can be tested step by
//! step: continuous batching under `max_num_seqs`, a FIFO waiting queue, paged KV blocks with
//! prefix reuse, and recompute preemption when decoding runs out of blocks, as vLLM v1 does.
//!
//! One engine step is [`Scheduler::begin_step`] (decide the batch, return how long the step
//! takes), the step's duration of simulated time, then [`Scheduler::finish_step`] (every sequence
//! in the batch emits one token).

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;

use super::kv::{BlockId, BlockPool};
use super::tokenizer::{self, TokenId};
use crate::mock_engine::backend::{EngineLoad, PrefixCacheStats};
use crate::mock_engine::config::SimConfig;

/// Identifies one submitted sequence.
pub type SequenceId = u64;

/// Longest single step: finite but absurd latency settings must not make the engine sleep
/// for years; an hour is beyond any test or benchmark.
const MAX_STEP: Duration = Duration::from_secs(3600);

/// Why a sequence cannot be queued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the sequence needs {needed} KV blocks at its longest but the cache has {total}")]
    ExceedsKvCache { needed: u64, total: u64 },
}

/// The simulator's state as `GET /sim/state` reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimState {
    /// Sequences in the running batch.
    pub running: u64,
    /// Sequences queued for admission (new and preempted ones).
    pub waiting: u64,
    pub max_num_seqs: u32,
    pub block_size: u32,
    pub kv_blocks_total: u64,
    /// Blocks referenced by running sequences: the numerator of `kv_cache_usage`.
    pub kv_blocks_used: u64,
    /// Blocks holding a reusable prompt prefix, whether in use or not.
    pub kv_blocks_cached: u64,
    /// `kv_blocks_used / kv_blocks_total`, vLLM's `kv_cache_usage_perc`.
    pub kv_cache_usage: f64,
    /// Prompt tokens looked up in the prefix cache at admission.
    pub prefix_cache_queried_tokens: u64,
    /// Of those, tokens found cached.
    pub prefix_cache_hit_tokens: u64,
    /// `hit / queried` over the whole run, 0 before the first admission.
    pub prefix_cache_hit_rate: f64,
    /// Cached blocks dropped to make room for new ones.
    pub evicted_blocks: u64,
    pub preemptions: u64,
    /// Admissions into the running batch, re-admissions after preemption included.
    pub admitted: u64,
    pub finished: u64,
    pub aborted: u64,
    /// Engine steps run so far.
    pub steps: u64,
}

struct Sequence {
    id: SequenceId,
    model: String,
    prompt_len: u64,
    /// Chained hashes of the prompt's full blocks.
    prompt_block_hashes: Vec<u64>,
    output_tokens: u32,
    /// Tokens already sent to the client.
    generated: u32,
    /// KV blocks held, in token order; empty while waiting.
    blocks: Vec<BlockId>,
    tokens: UnboundedSender<()>,
}

impl Sequence {
    /// Tokens whose KV exists once this sequence's next step has run: the prompt plus every
    /// generated token but the one that step produces. After a preemption all of them are
    /// recomputed in one prefill.
    fn kv_target(&self) -> u64 {
        self.prompt_len + u64::from(self.generated)
    }
}

#[derive(Default)]
struct Counters {
    queried_tokens: u64,
    hit_tokens: u64,
    last_batch_hit_rate: f64,
    preemptions: u64,
    admitted: u64,
    finished: u64,
    aborted: u64,
    steps: u64,
}

pub struct Scheduler {
    config: SimConfig,
    pool: BlockPool,
    /// Admission order; preempted sequences go back to the front.
    waiting: VecDeque<Sequence>,
    /// Admission order; preemption takes from the back.
    running: Vec<Sequence>,
    next_id: SequenceId,
    jitter: StdRng,
    counters: Counters,
    /// Sequences the latest scheduling pass left waiting: what the engine
    /// reports as waiting (see [`Scheduler::load`]).
    left_waiting: usize,
}

impl Scheduler {
    pub fn new(config: SimConfig) -> Self {
        Self {
            pool: BlockPool::new(config.kv_blocks),
            jitter: StdRng::seed_from_u64(config.seed),
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            counters: Counters::default(),
            left_waiting: 0,
        }
    }

    fn block_size(&self) -> u64 {
        u64::from(self.config.block_size.max(1))
    }

    fn blocks_for(&self, tokens: u64) -> u64 {
        tokens.div_ceil(self.block_size())
    }

    /// Queues a request for `model` with these prompt tokens; each token it generates is sent
    /// on `tokens`, and dropping the sequence (finished or aborted) closes that channel.
    pub fn submit(
        &mut self,
        model: &str,
        prompt: &[TokenId],
        output_tokens: u32,
        tokens: UnboundedSender<()>,
    ) -> Result<SequenceId, SubmitError> {
        let output_tokens = output_tokens.max(1);
        let longest = prompt.len() as u64 + u64::from(output_tokens) - 1;
        let needed = self.blocks_for(longest);
        let total = self.pool.total() as u64;
        if needed > total {
            return Err(SubmitError::ExceedsKvCache { needed, total });
        }
        let id = self.next_id;
        self.next_id += 1;
        let root = tokenizer::chain_root(self.config.seed, model);
        self.waiting.push_back(Sequence {
            id,
            model: model.to_string(),
            prompt_len: prompt.len() as u64,
            prompt_block_hashes: tokenizer::block_hashes(
                root,
                prompt,
                self.config.block_size as usize,
            ),
            output_tokens,
            generated: 0,
            blocks: Vec::new(),
            tokens,
        });
        Ok(id)
    }

    /// Schedules the next step: first room for every running sequence's next token
    /// (preempting the newest sequences when the cache is full), then, if nobody was preempted,
    /// admission of waiting sequences in arrival order while the batch and the cache have room.
    /// Returns how long the step takes, `None` when there is nothing to run.
    pub fn begin_step(&mut self) -> Option<Duration> {
        let preempted = self.reserve_decode_slots();
        let prefill_tokens = if preempted { 0 } else { self.admit_waiting() };
        self.left_waiting = self.waiting.len();
        if self.running.is_empty() {
            return None;
        }
        self.counters.steps += 1;
        Some(self.step_duration(prefill_tokens))
    }

    /// Ends the step: every sequence in the batch emits one token (the first one for sequences
    /// prefilled in this step); finished sequences leave and release their blocks, which stay
    /// cached for reuse.
    pub fn finish_step(&mut self) {
        let pool = &mut self.pool;
        let counters = &mut self.counters;
        self.running.retain_mut(|sequence| {
            sequence.generated += 1;
            let delivered = sequence.tokens.send(()).is_ok();
            let done = sequence.generated >= sequence.output_tokens;
            if delivered && !done {
                return true;
            }
            pool.release(&sequence.blocks);
            if delivered {
                counters.finished += 1;
            } else {
                counters.aborted += 1;
            }
            false
        });
    }

    /// Removes a sequence wherever it is and frees its blocks; `false` if it already left.
    pub fn abort(&mut self, id: SequenceId) -> bool {
        let sequence = if let Some(index) = self.waiting.iter().position(|s| s.id == id) {
            self.waiting.remove(index)
        } else if let Some(index) = self.running.iter().position(|s| s.id == id) {
            Some(self.running.remove(index))
        } else {
            None
        };
        let Some(sequence) = sequence else {
            return false;
        };
        self.pool.release(&sequence.blocks);
        self.counters.aborted += 1;
        true
    }

    /// Drops every sequence, closing their token channels.
    pub fn shut_down(&mut self) {
        self.waiting.clear();
        for sequence in std::mem::take(&mut self.running) {
            self.pool.release(&sequence.blocks);
        }
    }

    /// Returns whether anything was preempted.
    fn reserve_decode_slots(&mut self) -> bool {
        let mut preempted = false;
        let mut index = 0;
        while index < self.running.len() {
            let sequence = &self.running[index];
            let needed = self
                .blocks_for(sequence.kv_target())
                .saturating_sub(sequence.blocks.len() as u64) as usize;
            if let Some(blocks) = self.pool.allocate(needed) {
                self.running[index].blocks.extend(blocks);
                index += 1;
                continue;
            }
            // Out of blocks: give up the most recently admitted sequence (possibly this one),
            // to be recomputed later, and retry.
            let Some(victim) = self.running.pop() else {
                break;
            };
            preempted = true;
            let victim_was_this_one = self.running.len() == index;
            self.preempt(victim);
            if victim_was_this_one {
                break;
            }
        }
        preempted
    }

    fn preempt(&mut self, mut sequence: Sequence) {
        self.pool.release(&sequence.blocks);
        sequence.blocks.clear();
        self.counters.preemptions += 1;
        self.waiting.push_front(sequence);
    }

    /// Returns the prompt tokens to prefill in this step.
    fn admit_waiting(&mut self) -> u64 {
        let block_size = self.block_size();
        let mut batch_queried = 0;
        let mut batch_hits = 0;
        let mut prefill_tokens = 0;
        while self.running.len() < self.config.max_num_seqs as usize {
            let Some(candidate) = self.waiting.front() else {
                break;
            };
            let target = candidate.kv_target();
            // The last token is always computed, to produce the next one, so a prefix hit
            // covers at most `target - 1` tokens.
            let max_hit_blocks = ((target.saturating_sub(1) / block_size) as usize)
                .min(candidate.prompt_block_hashes.len());
            let hits: Vec<BlockId> = candidate.prompt_block_hashes[..max_hit_blocks]
                .iter()
                .map_while(|hash| self.pool.lookup(*hash))
                .collect();
            let hits_taken_from_available = hits
                .iter()
                .filter(|id| self.pool.is_evictable(**id))
                .count();
            let fresh = (self.blocks_for(target) as usize).saturating_sub(hits.len());
            // First come, first served: a head that does not fit blocks those behind it.
            if fresh + hits_taken_from_available > self.pool.available() {
                break;
            }
            let Some(mut sequence) = self.waiting.pop_front() else {
                break;
            };
            for id in &hits {
                self.pool.reuse(*id);
            }
            let Some(fresh_blocks) = self.pool.allocate(fresh) else {
                self.pool.release(&hits);
                self.waiting.push_front(sequence);
                break;
            };
            let hit_blocks = hits.len();
            sequence.blocks = hits;
            sequence.blocks.extend(fresh_blocks);
            // The prompt's full blocks computed by this prefill become reusable at once, so a
            // request arriving during the prefill already hits them (as in vLLM).
            for (index, hash) in sequence
                .prompt_block_hashes
                .iter()
                .enumerate()
                .skip(hit_blocks)
            {
                if let Some(id) = sequence.blocks.get(index) {
                    self.pool.register(*id, *hash);
                }
            }
            let hit_tokens = hit_blocks as u64 * block_size;
            batch_queried += target;
            batch_hits += hit_tokens;
            prefill_tokens += target - hit_tokens;
            self.counters.admitted += 1;
            self.running.push(sequence);
        }
        if batch_queried > 0 {
            self.counters.queried_tokens += batch_queried;
            self.counters.hit_tokens += batch_hits;
            self.counters.last_batch_hit_rate = batch_hits as f64 / batch_queried as f64;
        }
        prefill_tokens
    }

    /// Decode cost grows with the batch; prefill cost with the uncached prompt tokens of the
    /// sequences admitted in this step.
    fn step_duration(&mut self, prefill_tokens: u64) -> Duration {
        let config = &self.config;
        let mut millis = config.itl_ms
            + config.itl_ms_per_seq * self.running.len() as f64
            + config.prefill_ms_per_token * prefill_tokens as f64;
        if config.latency_jitter > 0.0 {
            let jitter = config.latency_jitter;
            millis *= 1.0 + self.jitter.random_range(-jitter..=jitter);
        }
        millis *= config.time_scale;
        Duration::try_from_secs_f64(millis / 1000.0).map_or(MAX_STEP, |step| step.min(MAX_STEP))
    }

    /// What the engine reports. As in vLLM, whose gauges are set after each
    /// scheduling pass, `waiting` counts the sequences the latest pass could
    /// not admit (the batch or the cache was full), not one that arrived
    /// during the current step and will be admitted at the next.
    pub fn load(&self) -> EngineLoad {
        let block_size = self.block_size();
        EngineLoad {
            running: self.running.len() as u64,
            waiting: self.left_waiting.min(self.waiting.len()) as u64,
            kv_cache_used_tokens: self.pool.in_use() as u64 * block_size,
            kv_cache_capacity_tokens: self.pool.total() as u64 * block_size,
            running_models: models(&self.running),
            waiting_models: models(&self.waiting),
        }
    }

    pub fn prefix_cache(&self) -> PrefixCacheStats {
        PrefixCacheStats {
            queried_tokens: self.counters.queried_tokens,
            hit_tokens: self.counters.hit_tokens,
            last_batch_hit_rate: self.counters.last_batch_hit_rate,
            preemptions: self.counters.preemptions,
        }
    }

    pub fn state(&self) -> SimState {
        let counters = &self.counters;
        let total = self.pool.total() as u64;
        let used = self.pool.in_use() as u64;
        SimState {
            running: self.running.len() as u64,
            waiting: self.waiting.len() as u64,
            max_num_seqs: self.config.max_num_seqs,
            block_size: self.config.block_size,
            kv_blocks_total: total,
            kv_blocks_used: used,
            kv_blocks_cached: self.pool.cached() as u64,
            kv_cache_usage: ratio(used, total),
            prefix_cache_queried_tokens: counters.queried_tokens,
            prefix_cache_hit_tokens: counters.hit_tokens,
            prefix_cache_hit_rate: ratio(counters.hit_tokens, counters.queried_tokens),
            evicted_blocks: self.pool.evictions(),
            preemptions: counters.preemptions,
            admitted: counters.admitted,
            finished: counters.finished,
            aborted: counters.aborted,
            steps: counters.steps,
        }
    }
}

fn models<'a>(sequences: impl IntoIterator<Item = &'a Sequence>) -> BTreeSet<String> {
    sequences
        .into_iter()
        .map(|sequence| sequence.model.clone())
        .collect()
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

    use super::*;

    /// 4-token blocks and round latencies so expected step times are easy to read.
    fn config() -> SimConfig {
        SimConfig {
            max_num_seqs: 2,
            kv_blocks: 8,
            block_size: 4,
            prefill_ms_per_token: 1.0,
            itl_ms: 10.0,
            itl_ms_per_seq: 2.0,
            ..SimConfig::default()
        }
    }

    fn prompt(first: u64, len: u64) -> Vec<TokenId> {
        (first..first + len).collect()
    }

    struct Client {
        id: SequenceId,
        tokens: UnboundedReceiver<()>,
    }

    impl Client {
        /// Tokens received so far.
        fn received(&mut self) -> usize {
            let mut count = 0;
            while self.tokens.try_recv().is_ok() {
                count += 1;
            }
            count
        }
    }

    fn submit(scheduler: &mut Scheduler, prompt: &[TokenId], output_tokens: u32) -> Client {
        let (sender, tokens) = unbounded_channel();
        let id = scheduler
            .submit("m", prompt, output_tokens, sender)
            .expect("fits in the cache");
        Client { id, tokens }
    }

    fn step(scheduler: &mut Scheduler) -> Option<Duration> {
        let duration = scheduler.begin_step();
        scheduler.finish_step();
        duration
    }

    fn millis(value: u64) -> Option<Duration> {
        Some(Duration::from_millis(value))
    }

    #[test]
    fn prefill_then_one_token_per_step_then_blocks_stay_cached() {
        let mut scheduler = Scheduler::new(config());
        let mut client = submit(&mut scheduler, &prompt(0, 10), 3);
        // Prefill of 10 tokens with a batch of one: 10 + 2 + 10.
        assert_eq!(step(&mut scheduler), millis(22));
        assert_eq!(client.received(), 1);
        let state = scheduler.state();
        assert_eq!((state.running, state.kv_blocks_used), (1, 3));
        assert_eq!(state.kv_blocks_cached, 2);
        // Decode steps: 10 + 2 each; the 11th token still fits in block 3.
        assert_eq!(step(&mut scheduler), millis(12));
        assert_eq!(step(&mut scheduler), millis(12));
        assert_eq!(client.received(), 2);
        assert_eq!(step(&mut scheduler), None);
        let state = scheduler.state();
        assert_eq!((state.running, state.finished), (0, 1));
        assert_eq!(state.kv_blocks_used, 0);
        assert_eq!(state.kv_blocks_cached, 2);
        assert_eq!(client.tokens.try_recv().ok(), None);
    }

    #[test]
    fn a_repeated_prompt_hits_its_full_blocks_and_prefills_only_the_rest() {
        let mut scheduler = Scheduler::new(config());
        let mut first = submit(&mut scheduler, &prompt(0, 10), 1);
        assert_eq!(step(&mut scheduler), millis(22));
        assert_eq!(first.received(), 1);
        let mut second = submit(&mut scheduler, &prompt(0, 10), 1);
        // 8 of 10 tokens cached: prefill 2.
        assert_eq!(step(&mut scheduler), millis(14));
        assert_eq!(second.received(), 1);
        let stats = scheduler.prefix_cache();
        assert_eq!((stats.queried_tokens, stats.hit_tokens), (20, 8));
        assert_eq!(stats.last_batch_hit_rate, 0.8);
        // A prompt that is all full blocks still recomputes its last block.
        let _third = submit(&mut scheduler, &prompt(0, 8), 1);
        assert_eq!(step(&mut scheduler), millis(16));
        assert_eq!(scheduler.prefix_cache().hit_tokens, 12);
    }

    #[test]
    fn requests_beyond_max_num_seqs_wait_in_arrival_order() {
        let mut scheduler = Scheduler::new(config());
        let mut clients: Vec<Client> = (0..3)
            .map(|index| submit(&mut scheduler, &prompt(index * 100, 2), 2))
            .collect();
        assert!(scheduler.begin_step().is_some());
        let load = scheduler.load();
        assert_eq!((load.running, load.waiting), (2, 1));
        let _late = submit(&mut scheduler, &prompt(900, 2), 2);
        assert_eq!(
            scheduler.load().waiting,
            1,
            "a sequence arriving during a step is not waiting before the next pass"
        );
        assert_eq!(scheduler.state().waiting, 2, "the queue itself holds it");
        scheduler.finish_step();
        step(&mut scheduler);
        assert_eq!(clients[0].received(), 2);
        assert_eq!(clients[2].received(), 0);
        // The first two finished; the third and the late one are admitted now.
        step(&mut scheduler);
        assert_eq!(clients[2].received(), 1);
        assert_eq!(scheduler.load().waiting, 0);
    }

    #[test]
    fn inter_token_latency_grows_with_the_batch() {
        let mut scheduler = Scheduler::new(SimConfig {
            max_num_seqs: 4,
            kv_blocks: 64,
            ..config()
        });
        let mut clients = vec![submit(&mut scheduler, &prompt(0, 1), 10)];
        step(&mut scheduler);
        assert_eq!(step(&mut scheduler), millis(12));
        for index in 1..4 {
            clients.push(submit(&mut scheduler, &prompt(index * 100, 1), 10));
        }
        step(&mut scheduler);
        assert_eq!(step(&mut scheduler), millis(18));
        assert_eq!(clients[0].received(), 4);
    }

    #[test]
    fn a_head_that_does_not_fit_waits_and_lru_eviction_makes_room() {
        let mut scheduler = Scheduler::new(SimConfig {
            max_num_seqs: 4,
            ..config()
        });
        // Prompt A fills 4 of 8 blocks and stays cached after finishing.
        let _a = submit(&mut scheduler, &prompt(0, 16), 1);
        step(&mut scheduler);
        assert_eq!(scheduler.state().kv_blocks_cached, 4);
        // B (5 blocks) and C (4 blocks) cannot both run: C waits until B is done.
        let mut b = submit(&mut scheduler, &prompt(100, 20), 2);
        let mut c = submit(&mut scheduler, &prompt(200, 13), 1);
        scheduler.begin_step();
        let state = scheduler.state();
        assert_eq!((state.running, state.waiting), (1, 1));
        assert_eq!(state.kv_blocks_used, 5);
        // B took the 4 free blocks and evicted A's tail block.
        assert_eq!(state.evicted_blocks, 1);
        scheduler.finish_step();
        step(&mut scheduler);
        assert_eq!(b.received(), 2);
        step(&mut scheduler);
        assert_eq!(c.received(), 1);
        // A's head blocks were evicted after its tail: repeating A hits nothing now.
        let hits_before = scheduler.prefix_cache().hit_tokens;
        let _a_again = submit(&mut scheduler, &prompt(0, 16), 1);
        step(&mut scheduler);
        assert_eq!(scheduler.prefix_cache().hit_tokens, hits_before);
    }

    #[test]
    fn decoding_out_of_blocks_preempts_the_newest_sequence_which_resumes_later() {
        let mut scheduler = Scheduler::new(SimConfig {
            kv_blocks: 4,
            ..config()
        });
        // Two 8-token prompts fill the cache; the first decode token needs a ninth slot.
        let mut older = submit(&mut scheduler, &prompt(0, 8), 3);
        let mut newer = submit(&mut scheduler, &prompt(100, 8), 3);
        step(&mut scheduler);
        assert_eq!((older.received(), newer.received()), (1, 1));
        scheduler.begin_step();
        let state = scheduler.state();
        assert_eq!(state.preemptions, 1);
        assert_eq!((state.running, state.waiting), (1, 1));
        scheduler.finish_step();
        assert_eq!((older.received(), newer.received()), (1, 0));
        step(&mut scheduler);
        assert_eq!(older.received(), 1);
        // The older one finished; the newer one is recomputed (its prompt blocks are still
        // cached) and continues where it stopped.
        step(&mut scheduler);
        step(&mut scheduler);
        assert_eq!(newer.received(), 2);
        assert_eq!(scheduler.state().finished, 2);
        assert_eq!(scheduler.prefix_cache().hit_tokens, 4);
    }

    #[test]
    fn aborting_frees_the_sequence_wherever_it_is() {
        let mut scheduler = Scheduler::new(SimConfig {
            max_num_seqs: 1,
            ..config()
        });
        let running = submit(&mut scheduler, &prompt(0, 6), 5);
        let waiting = submit(&mut scheduler, &prompt(100, 6), 5);
        step(&mut scheduler);
        assert_eq!(scheduler.state().kv_blocks_used, 2);
        assert!(scheduler.abort(running.id));
        assert!(scheduler.abort(waiting.id));
        assert!(!scheduler.abort(waiting.id));
        let state = scheduler.state();
        assert_eq!((state.running, state.waiting, state.aborted), (0, 0, 2));
        assert_eq!(state.kv_blocks_used, 0);
        assert_eq!(scheduler.begin_step(), None);
    }

    #[test]
    fn sequences_longer_than_the_cache_are_refused() {
        let mut scheduler = Scheduler::new(config());
        let (sender, _tokens) = unbounded_channel();
        // 30 prompt tokens + 3 generated, 2 of them stored: 32 tokens, exactly 8 blocks.
        assert!(
            scheduler
                .submit("m", &prompt(0, 30), 3, sender.clone())
                .is_ok()
        );
        assert_eq!(
            scheduler.submit("m", &prompt(0, 30), 4, sender),
            Err(SubmitError::ExceedsKvCache {
                needed: 9,
                total: 8
            })
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_jittered_steps() {
        let jittered = |seed| {
            let mut scheduler = Scheduler::new(SimConfig {
                latency_jitter: 0.5,
                seed,
                ..config()
            });
            let _client = submit(&mut scheduler, &prompt(0, 4), 6);
            (0..6).map(|_| step(&mut scheduler)).collect::<Vec<_>>()
        };
        assert_eq!(jittered(7), jittered(7));
        assert_ne!(jittered(7), jittered(8));
        let steps = jittered(7);
        // Decode steps of 12 ms within ±50 %.
        assert!(steps[1..].iter().all(|step| {
            step.is_some_and(|d| d >= Duration::from_millis(6) && d <= Duration::from_millis(18))
        }));
    }
}
