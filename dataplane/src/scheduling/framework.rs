//! The scheduling framework: filter plugins narrow a ModelServer's pods, score
//! plugins give each survivor 0..=100, the weighted sum ranks them, and the
//! top N are tried in order (the next one when a connection fails).
//!
//! A [`Scheduler`] is built once per snapshot from the snapshot's
//! `SchedulerConfig` (validated, defaults filled in): each enabled plugin is
//! built by its [`plugins::Implementation`] with its arguments; a model's
//! metric handles are created by its first request. The request path only
//! reads it. State that must outlive a snapshot (the prefix index, the
//! decision log) lives in [`SchedulingShared`].

use std::cell::RefCell;
use std::ops::Range;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};

use http::HeaderMap;
use prometheus::Histogram;
use switchyard_runtime::clock::{self, Instant, unix_ms_now};
use switchyard_snapshot::pb;
use switchyard_snapshot::scheduler::{self, MAX_TOP_N, SchedulerConfigError};

use super::decisions::DecisionLog;
use super::metrics::{PluginLabels, PluginMetrics};
use super::plugins::{
    self, Candidate, FilterError, FilterPlugin, PluginContext, PluginInput, PromptHashing,
    ScorePlugin,
};
use super::prefix::{SharedPrefixIndex, hash_prompt};
use super::sample::{self, Pool, PoolIds, SAMPLED_CANDIDATES};
use crate::fast_map::FastMap;
use crate::pod::figures::EngineFigures;
use crate::pod::is_fresh;
use crate::pod::outlier::EjectionClock;
use crate::request::PromptField;
use crate::routing::{PrefillDecode, Server};

/// Why no pod can be tried for a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("no ready pod for ModelServer {0}")]
    NoPods(String),
    #[error(
        "ModelServer {0} has no prefill/decode group with a ready prefill and a ready decode pod"
    )]
    NoCompleteGroup(String),
    #[error("ModelServer {server}: {source}")]
    Filtered {
        server: String,
        #[source]
        source: FilterError,
    },
}

/// State shared by the schedulers of successive snapshots.
#[derive(Debug)]
pub struct SchedulingShared {
    prefix: SharedPrefixIndex,
    metrics: Option<PluginMetrics>,
    pub decisions: DecisionLog,
    /// `EndpointLoads.observed_at_unix_ms` of the latest loads: the observation
    /// time of every load whose own time is 0. One atomic written once per
    /// update, so an update need not touch the pods whose load did not change.
    loads_observed_at_unix_ms: AtomicI64,
}

impl SchedulingShared {
    pub fn new(metrics: Option<PluginMetrics>) -> Self {
        Self {
            prefix: SharedPrefixIndex::default(),
            metrics,
            decisions: DecisionLog::new(),
            loads_observed_at_unix_ms: AtomicI64::new(0),
        }
    }

    pub fn set_loads_observed_at(&self, unix_ms: i64) {
        self.loads_observed_at_unix_ms
            .store(unix_ms, Ordering::Relaxed);
    }

    /// When `load` was observed (0 = unknown).
    pub fn observed_at(&self, load: &pb::EndpointLoad) -> i64 {
        self.observed_at_or_latest(load.observed_at_unix_ms)
    }

    /// A load's own observation time, or that of the latest loads when it
    /// has none (0).
    fn observed_at_or_latest(&self, own_unix_ms: i64) -> i64 {
        if own_unix_ms != 0 {
            own_unix_ms
        } else {
            self.loads_observed_at_unix_ms.load(Ordering::Relaxed)
        }
    }
}

impl Default for SchedulingShared {
    fn default() -> Self {
        Self::new(None)
    }
}

/// Plugin duration histograms of one model, resolved when the snapshot is applied.
#[derive(Debug, Default)]
struct ModelHandles {
    filters: Vec<Histogram>,
    scores: Vec<Histogram>,
}

/// What the scheduler reads about one request.
#[derive(Debug)]
pub struct ScheduleRequest<'a> {
    /// The request's `model` (the metrics label).
    pub model: &'a str,
    /// The model a pod must have loaded: the LoRA adapter, or the upstream model name.
    pub served_model: &'a str,
    pub headers: &'a HeaderMap,
    pub prompt_hashes: &'a [u64],
    pub request_id: &'a str,
}

impl ScheduleRequest<'_> {
    /// What the plugins read of it.
    fn plugin_input(&self) -> PluginInput<'_> {
        PluginInput {
            served_model: self.served_model,
            headers: self.headers,
            prompt_hashes: self.prompt_hashes,
        }
    }
}

/// The pods to try for one request, best first (indices into the ModelServer's pods).
#[derive(Debug, Clone, Copy, Default)]
pub struct Ranking {
    pods: [u32; MAX_TOP_N as usize],
    len: usize,
}

impl Ranking {
    fn push(&mut self, index: usize) {
        if self.len < self.pods.len() {
            self.pods[self.len] = index as u32;
            self.len += 1;
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `n`-th candidate's index into the ModelServer's pods.
    pub fn get(&self, n: usize) -> Option<usize> {
        (n < self.len).then(|| self.pods[n] as usize)
    }
}

/// The (prefill, decode) pairs to try for one request, best first (indices
/// into the ModelServer's pods).
#[derive(Debug, Clone, Copy, Default)]
pub struct PairRanking {
    pairs: [(u32, u32); MAX_TOP_N as usize],
    len: usize,
}

impl PairRanking {
    fn push(&mut self, prefill: usize, decode: usize) {
        if self.len < self.pairs.len() {
            self.pairs[self.len] = (prefill as u32, decode as u32);
            self.len += 1;
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `n`-th pair: (prefill, decode) indices into the ModelServer's pods.
    pub fn get(&self, n: usize) -> Option<(usize, usize)> {
        (n < self.len).then(|| {
            let (prefill, decode) = self.pairs[n];
            (prefill as usize, decode as usize)
        })
    }
}

/// How one ranking is made and recorded.
#[derive(Debug, Clone, Copy)]
struct Ranked {
    /// The prefill/decode role of the pods ranked, if any (for the decision log).
    role: Option<&'static str>,
    top_n: usize,
    /// Whether the decision goes to the decision log.
    record: bool,
}

/// One snapshot's scheduler.
#[derive(Debug)]
pub struct Scheduler {
    filters: Vec<Filtering>,
    scorers: Vec<Scoring>,
    top_n: usize,
    max_load_age_ms: u64,
    /// Candidates above which a pick scores a sample ([`SAMPLED_CANDIDATES`]).
    sample_above: usize,
    /// Set when a scorer reads the prompt's block hashes.
    prompt_hashing: Option<PromptHashing>,
    /// Whether a filter reads the candidates' model lists.
    reads_model_lists: bool,
    /// Per model, the plugin histograms, created by its first request.
    handles: FastMap<String, OnceLock<Option<ModelHandles>>>,
    /// Filters then scorers, as (plugin, type) labels.
    plugin_labels: Vec<PluginLabels>,
    shared: Arc<SchedulingShared>,
    /// The effective configuration (defaults filled in), for debug dumps.
    pub effective: pb::SchedulerConfig,
    /// Whether the snapshot configured the scheduler (else the defaults apply).
    pub from_snapshot: bool,
}

/// An enabled filter plugin.
#[derive(Debug)]
struct Filtering {
    name: &'static str,
    plugin: Box<dyn FilterPlugin>,
}

/// An enabled score plugin and its weight.
#[derive(Debug)]
struct Scoring {
    name: &'static str,
    plugin: Box<dyn ScorePlugin>,
    weight: u32,
}

impl Scheduler {
    /// Builds the scheduler of a snapshot; `models` are the request models its
    /// routes serve (plugin metric handles are resolved for each).
    pub fn build(
        snapshot_config: Option<&pb::SchedulerConfig>,
        models: &[&str],
        shared: &Arc<SchedulingShared>,
    ) -> Result<Self, SchedulerConfigError> {
        let config = snapshot_config
            .cloned()
            .unwrap_or_else(scheduler::default_config);
        scheduler::validate(&config)?;
        let effective = scheduler::effective(&config);
        let context = PluginContext {
            config: &effective,
            prefix_index: &shared.prefix,
        };
        let filters = effective
            .filters
            .iter()
            .map(|name| {
                let implementation = plugins::implementation(name);
                match implementation.and_then(|i| Some((i.spec.name, i.filter?))) {
                    Some((name, build)) => Ok(Filtering {
                        name,
                        plugin: build(&context)?,
                    }),
                    None => Err(SchedulerConfigError::UnknownFilter(name.clone())),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let scorers = effective
            .scores
            .iter()
            .map(|score| {
                let implementation = plugins::implementation(&score.name);
                match implementation.and_then(|i| Some((i.spec.name, i.score?))) {
                    Some((name, build)) => Ok(Scoring {
                        name,
                        plugin: build(&context)?,
                        weight: score.weight,
                    }),
                    None => Err(SchedulerConfigError::UnknownScore(score.name.clone())),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let reads_model_lists = filters
            .iter()
            .any(|filtering| filtering.plugin.reads_model_lists());
        let prompt_hashing = scorers
            .iter()
            .find_map(|scoring| scoring.plugin.prompt_hashing());
        let plugin_labels: Vec<PluginLabels> = filters
            .iter()
            .map(|f| (f.name, "filter"))
            .chain(scorers.iter().map(|s| (s.name, "score")))
            .collect();
        if let Some(metrics) = &shared.metrics {
            metrics.begin_snapshot(models, &plugin_labels);
        }
        let handles = models
            .iter()
            .map(|model| ((*model).to_owned(), OnceLock::new()))
            .collect();
        Ok(Self {
            top_n: effective.top_n as usize,
            max_load_age_ms: effective.max_load_age_ms,
            sample_above: SAMPLED_CANDIDATES,
            filters,
            scorers,
            prompt_hashing,
            reads_model_lists,
            handles,
            plugin_labels,
            shared: shared.clone(),
            effective,
            from_snapshot: snapshot_config.is_some(),
        })
    }

    /// The prompt's chained block hashes when a plugin needs them (empty, and
    /// no allocation, otherwise).
    pub fn prompt_hashes(
        &self,
        model: &str,
        body: &[u8],
        span: Option<&(PromptField, Range<usize>)>,
    ) -> Vec<u64> {
        let mut hashes = Vec::new();
        let Some(hashing) = self.prompt_hashing else {
            return hashes;
        };
        let Some((field, range)) = span else {
            return hashes;
        };
        let Some(raw) = body.get(range.clone()) else {
            return hashes;
        };
        hashes.reserve_exact(
            hashing
                .max_blocks
                .min(raw.len() / hashing.block_size.max(1) + 1),
        );
        hash_prompt(
            model,
            *field,
            raw,
            hashing.block_size,
            hashing.max_blocks,
            &mut hashes,
        );
        hashes
    }

    /// `pod`'s engine figures when they are recent enough to act on.
    pub fn fresh_load(&self, pod: &crate::pod::PodState) -> Option<EngineFigures> {
        self.fresh_load_at(pod, unix_ms_now())
    }

    /// [`Scheduler::fresh_load`] at `now_ms` (a pick reads the clock once).
    fn fresh_load_at(&self, pod: &crate::pod::PodState, now_ms: i64) -> Option<EngineFigures> {
        pod.figures().filter(|figures| {
            let observed_at = self
                .shared
                .observed_at_or_latest(figures.observed_at_unix_ms);
            is_fresh(observed_at, now_ms, self.max_load_age_ms)
        })
    }

    /// Ranks `server`'s pods for one request.
    pub fn schedule(
        &self,
        server: &Server,
        request: &ScheduleRequest<'_>,
    ) -> Result<Ranking, ScheduleError> {
        self.schedule_pool(server, Pool::All(server.pods.len()), request)
    }

    /// [`Scheduler::schedule`] among `server`'s pods at `indices` only (an
    /// endpoint picker's subset hint).
    pub fn schedule_among(
        &self,
        server: &Server,
        indices: &[usize],
        request: &ScheduleRequest<'_>,
    ) -> Result<Ranking, ScheduleError> {
        self.schedule_pool(server, Pool::Among(indices), request)
    }

    /// [`Scheduler::schedule`] among the pods of `pool`, none when it is empty.
    fn schedule_pool(
        &self,
        server: &Server,
        pool: Pool<'_>,
        request: &ScheduleRequest<'_>,
    ) -> Result<Ranking, ScheduleError> {
        if pool.is_empty() {
            return Err(ScheduleError::NoPods(server.key.clone()));
        }
        self.rank(
            server,
            pool,
            &request.plugin_input(),
            request,
            Ranked {
                role: None,
                top_n: self.top_n,
                record: true,
            },
        )
    }

    /// Ranks the (prefill, decode) pairs of a prefill/decode `server` for one
    /// request: its decode pods (of complete groups) by the filters and
    /// scores, then for each of the top ones the best prefill pod of its
    /// group. Prefix affinity scores prefill pods only, since the prompt's KV
    /// is computed (and cached) there; load counts for both.
    pub fn schedule_pairs(
        &self,
        server: &Server,
        pd: &PrefillDecode,
        request: &ScheduleRequest<'_>,
    ) -> Result<PairRanking, ScheduleError> {
        if pd.decode_candidates.is_empty() {
            return Err(ScheduleError::NoCompleteGroup(server.key.clone()));
        }
        let prefill_input = request.plugin_input();
        let decode_input = PluginInput {
            prompt_hashes: &[],
            ..prefill_input
        };
        let decodes = self.rank(
            server,
            Pool::Among(&pd.decode_candidates),
            &decode_input,
            request,
            Ranked {
                role: Some("decode"),
                top_n: self.top_n,
                record: true,
            },
        )?;
        let mut pairs = PairRanking::default();
        let mut filtered = None;
        for position in 0..decodes.len() {
            let Some(decode) = decodes.get(position) else {
                continue;
            };
            let Some(group) = pd.group_of.get(decode).and_then(|g| pd.groups.get(*g)) else {
                continue;
            };
            let best = self.rank(
                server,
                Pool::Among(&group.prefill),
                &prefill_input,
                request,
                Ranked {
                    role: Some("prefill"),
                    top_n: 1,
                    // The first pair's choice; the others would flood the log.
                    record: position == 0,
                },
            );
            match best.map(|ranking| ranking.get(0)) {
                Ok(Some(prefill)) => pairs.push(prefill, decode),
                Ok(None) => {}
                Err(error) => filtered = Some(error),
            }
        }
        if pairs.is_empty() {
            return Err(
                filtered.unwrap_or_else(|| ScheduleError::NoCompleteGroup(server.key.clone()))
            );
        }
        Ok(pairs)
    }

    /// Ranks the pods of `pool` with the filters and the scorers: all of
    /// them, or a sample when they are many ([`sample`]).
    fn rank(
        &self,
        server: &Server,
        pool: Pool<'_>,
        input: &PluginInput<'_>,
        request: &ScheduleRequest<'_>,
        ranked: Ranked,
    ) -> Result<Ranking, ScheduleError> {
        let now = clock::now();
        let now_ms = unix_ms_now();
        let handles = self.handles(request.model);
        // Moves the sample's window, and rotates ties when the whole pool is ranked.
        let turn = server.rotation.local().fetch_add(1, Ordering::Relaxed);
        with_framework_scratch(|scratch| {
            let FrameworkScratch {
                candidates,
                totals,
                scores,
                pod_ids,
                nominated,
                sample,
            } = scratch;
            let mut sampled = pool.len() > self.sample_above && {
                let all = server.pod_ids();
                let ids = match pool {
                    Pool::All(count) if count == all.ids().len() => PoolIds::whole(all),
                    Pool::All(count) => PoolIds::among(all.ids().get(..count).unwrap_or_default()),
                    Pool::Among(indices) => {
                        pod_ids.clear();
                        pod_ids.extend(
                            indices
                                .iter()
                                .map(|i| all.ids().get(*i).copied().unwrap_or(0)),
                        );
                        PoolIds::among(pod_ids)
                    }
                };
                nominated.clear();
                for scoring in &self.scorers {
                    scoring.plugin.nominate(ids, input, nominated);
                }
                nominated.sort_unstable();
                nominated.dedup();
                sample::fill(&server.pods, pool, nominated, turn, now, sample)
            };
            if sampled {
                self.fill_candidates(server, sample.iter().copied(), now, now_ms, candidates);
            } else {
                self.fill_candidates(server, pool.indices(), now, now_ms, candidates);
            }
            let mut considered = candidates.len();
            let filtered = self.filter(server, candidates, input, handles);
            let representative = matches!(filtered, Ok(false)) && candidates.len() >= ranked.top_n;
            if sampled && !representative {
                // What the filters keep of the sample is not what they keep
                // of the whole pool there (lora-affinity drops pods without
                // the adapter), or too little is left: rank the whole pool.
                sampled = false;
                self.fill_candidates(server, pool.indices(), now, now_ms, candidates);
                considered = candidates.len();
                self.filter(server, candidates, input, handles)?;
            } else {
                filtered?;
            }
            let count = candidates.len();
            totals.clear();
            totals.resize(count, 0);
            scores.clear();
            scores.resize(count * self.scorers.len(), 0);
            for (position, scoring) in self.scorers.iter().enumerate() {
                let started = clock::now();
                let out = &mut scores[position * count..(position + 1) * count];
                scoring.plugin.score(candidates, input, out);
                observe(handles.and_then(|h| h.scores.get(position)), started);
                for (total, score) in totals.iter_mut().zip(out.iter()) {
                    *total = total.saturating_add(scoring.weight.saturating_mul(*score));
                }
            }
            // Ties rotate, so equal pods share the load: a sample's window
            // moves on every pick and its first pod wins ties.
            let start = if sampled { 0 } else { turn % count.max(1) };
            // Only the top N are tried: keep just those, in order, as the
            // keys go by (a full sort of 1000 candidates was most of a pick,
            // and collecting every key to select among them most of the rest).
            let mut best = TopKeys::new(ranked.top_n.min(count));
            for (i, (&total, candidate)) in totals.iter().zip(candidates.iter()).enumerate() {
                best.offer(rank_key(
                    candidate.ejected,
                    total,
                    rotate(i, count - start, count),
                ));
            }
            let best = best.sorted();
            let position = |key: &u64| rotate(rotation_of(*key), start, count);
            let mut ranking = Ranking::default();
            for i in best.iter().map(position) {
                ranking.push(candidates[i].index);
            }
            if !ranked.record {
                return Ok(ranking);
            }
            self.shared.decisions.record(|record| {
                record.begin(
                    now_ms,
                    request.request_id,
                    request.model,
                    &server.key,
                    considered,
                    count,
                );
                record.sampled_from = sampled.then(|| pool.len());
                record.role = ranked.role;
                record
                    .plugins
                    .extend(self.scorers.iter().map(|s| (s.name, s.weight)));
                record.filters.extend(self.filters.iter().map(|f| f.name));
                for i in best.iter().map(position) {
                    let candidate = &candidates[i];
                    let plugin_scores = (0..self.scorers.len()).map(|p| scores[p * count + i]);
                    record.push_candidate(
                        &server.pods[candidate.index],
                        totals[i],
                        candidate.ejected,
                        plugin_scores,
                    );
                }
            });
            Ok(ranking)
        })
    }

    /// Replaces `candidates` with the pods of `server` at `indices`.
    fn fill_candidates(
        &self,
        server: &Server,
        indices: impl Iterator<Item = usize>,
        now: Instant,
        now_ms: i64,
        candidates: &mut Vec<Candidate>,
    ) {
        candidates.clear();
        let ejection_now = EjectionClock::at(now);
        for index in indices {
            let Some(pod) = server.pods.get(index) else {
                continue;
            };
            let load = self.fresh_load_at(pod, now_ms);
            candidates.push(Candidate {
                index,
                pod_id: pod.id,
                // A failure in a row counts as one more request in
                // flight: a pod that fails fast never looks idle.
                in_flight: pod.in_flight() + pod.health.failure_load(),
                ejected: pod.health.is_ejected_at(ejection_now),
                load,
                any_load: if self.reads_model_lists {
                    pod.load()
                } else {
                    None
                },
            });
        }
    }

    /// Runs the filters over `candidates`. True when a filter whose verdict
    /// on a pod depends on the other pods ([`FilterPlugin::judges_each_pod_alone`])
    /// dropped one.
    fn filter(
        &self,
        server: &Server,
        candidates: &mut Vec<Candidate>,
        input: &PluginInput<'_>,
        handles: Option<&ModelHandles>,
    ) -> Result<bool, ScheduleError> {
        let mut narrowed_by_pool = false;
        for (position, filtering) in self.filters.iter().enumerate() {
            let before = candidates.len();
            let started = clock::now();
            let outcome = filtering.plugin.filter(candidates, input);
            observe(handles.and_then(|h| h.filters.get(position)), started);
            outcome.map_err(|source| ScheduleError::Filtered {
                server: server.key.clone(),
                source,
            })?;
            narrowed_by_pool |=
                candidates.len() < before && !filtering.plugin.judges_each_pod_alone();
        }
        Ok(narrowed_by_pool)
    }

    /// `model`'s plugin histograms (filters, then scorers), created on its
    /// first request under this snapshot.
    fn handles(&self, model: &str) -> Option<&ModelHandles> {
        let metrics = self.shared.metrics.as_ref()?;
        self.handles
            .get(model)?
            .get_or_init(|| {
                let mut histograms = metrics.create(model, &self.plugin_labels)?;
                let scores = histograms.split_off(self.filters.len());
                Some(ModelHandles {
                    filters: histograms,
                    scores,
                })
            })
            .as_ref()
    }

    /// After a pod accepted the request (Kthena's PostSchedule): each
    /// scorer may learn from it (prefix-cache remembers where the prefix went).
    pub fn on_dispatched(&self, pod_id: u64, prompt_hashes: &[u64]) {
        for scoring in &self.scorers {
            scoring.plugin.on_dispatched(pod_id, prompt_hashes);
        }
    }
}

/// Bits of a [`rank_key`] that hold the candidate's rotated position
/// (a server has far fewer than 2^31 pods).
const ROTATION_BITS: u32 = 31;

/// One integer that orders candidates as they are tried: not ejected first,
/// then the highest total score, then by position rotated per request (ties
/// take turns). Sorting plain integers is what makes a pick among many
/// candidates cheap; [`rotation_of`] gives the position back.
fn rank_key(ejected: bool, total: u32, rotation: usize) -> u64 {
    let rotation = rotation as u64 & ((1 << ROTATION_BITS) - 1);
    (u64::from(ejected) << 63) | (u64::from(u32::MAX - total) << ROTATION_BITS) | rotation
}

fn rotation_of(key: u64) -> usize {
    (key & ((1 << ROTATION_BITS) - 1)) as usize
}

/// The smallest of the [`rank_key`]s offered, at most `limit` of them
/// (a top N), kept sorted.
#[derive(Debug)]
struct TopKeys {
    keys: [u64; MAX_TOP_N as usize],
    len: usize,
    limit: usize,
}

impl TopKeys {
    fn new(limit: usize) -> Self {
        Self {
            keys: [0; MAX_TOP_N as usize],
            len: 0,
            limit: limit.min(MAX_TOP_N as usize),
        }
    }

    /// Keeps `key` if it is among the smallest so far. Most candidates of a
    /// large pick are not: one comparison with the last key kept.
    fn offer(&mut self, key: u64) {
        if self.len == self.limit {
            match self.len.checked_sub(1).map(|last| self.keys[last]) {
                Some(last) if key < last => self.len -= 1,
                _ => return,
            }
        }
        let mut at = self.len;
        while at > 0 && self.keys[at - 1] > key {
            self.keys[at] = self.keys[at - 1];
            at -= 1;
        }
        self.keys[at] = key;
        self.len += 1;
    }

    fn sorted(&self) -> &[u64] {
        &self.keys[..self.len]
    }
}

/// `(position + by) % count` for `position < count` and `by <= count`,
/// without a division per candidate.
fn rotate(position: usize, by: usize, count: usize) -> usize {
    let rotated = position + by;
    if rotated >= count {
        rotated - count
    } else {
        rotated
    }
}

fn observe(handle: Option<&Histogram>, started: Instant) {
    if let Some(handle) = handle {
        handle.observe(started.elapsed().as_secs_f64());
    }
}

/// Reusable per-thread buffers of [`Scheduler::schedule`].
#[derive(Debug, Default)]
struct FrameworkScratch {
    candidates: Vec<Candidate>,
    totals: Vec<u32>,
    scores: Vec<u32>,
    /// The ids of a sampled subset's pods, in pool order.
    pod_ids: Vec<u64>,
    /// Positions in the pool the scorers nominated for the sample.
    nominated: Vec<usize>,
    /// The server pod indices of the sample.
    sample: Vec<usize>,
}

thread_local! {
    static FRAMEWORK_SCRATCH: RefCell<FrameworkScratch> = RefCell::default();
}

fn with_framework_scratch<R>(f: impl FnOnce(&mut FrameworkScratch) -> R) -> R {
    FRAMEWORK_SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => {
            let result = f(&mut scratch);
            // Do not keep engine loads of an old snapshot alive in idle threads.
            scratch.candidates.clear();
            result
        }
        Err(_) => f(&mut FrameworkScratch::default()),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};
    use std::net::SocketAddr;
    use std::time::Duration;

    use switchyard_snapshot::scheduler::gpu_usage::NAME as GPU_USAGE;
    use switchyard_snapshot::scheduler::least_latency::NAME as LEAST_LATENCY;
    use switchyard_snapshot::scheduler::least_request::NAME as LEAST_REQUEST;
    use switchyard_snapshot::scheduler::lora_affinity::NAME as LORA_AFFINITY;
    use switchyard_snapshot::scheduler::prefix_cache::NAME as PREFIX_CACHE;
    use switchyard_snapshot::scheduler::random::NAME as RANDOM;

    use super::*;
    use crate::pod::PodState;
    use crate::pod::outlier::Failure;
    use crate::scheduling::metrics::PluginMetrics;

    fn server(pods: usize) -> Server {
        Server::for_tests(
            "default/s",
            PodState::numbered_for_tests(pods, |i| {
                SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16))
            }),
        )
    }

    fn only(scores: &[(&str, u32)], filters: &[&str]) -> pb::SchedulerConfig {
        pb::SchedulerConfig {
            filters: filters.iter().map(|f| (*f).to_owned()).collect(),
            scores: scores
                .iter()
                .map(|(name, weight)| pb::ScorePlugin {
                    name: (*name).to_owned(),
                    weight: *weight,
                })
                .collect(),
            ..Default::default()
        }
    }

    fn request<'a>(headers: &'a HeaderMap, hashes: &'a [u64]) -> ScheduleRequest<'a> {
        ScheduleRequest {
            model: "m",
            served_model: "m",
            headers,
            prompt_hashes: hashes,
            request_id: "r",
        }
    }

    fn names(server: &Server, ranking: &Ranking) -> Vec<String> {
        (0..ranking.len())
            .filter_map(|n| ranking.get(n))
            .map(|i| server.pods[i].name.clone())
            .collect()
    }

    #[test]
    fn rank_keys_put_ejected_last_then_order_by_score_then_rotation() {
        let mut keys = [
            rank_key(true, u32::MAX, 0),
            rank_key(false, 5, 2),
            rank_key(false, 9, 3),
            rank_key(false, 5, 1),
            rank_key(false, 0, 4),
        ];
        keys.sort_unstable();
        let positions: Vec<usize> = keys.iter().map(|key| rotation_of(*key)).collect();
        assert_eq!(positions, [3, 1, 2, 4, 0]);
    }

    #[test]
    fn top_keys_are_the_smallest_sorted() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(13);
        for round in 0..300 {
            let count = rng.random_range(0..200);
            // Few distinct values in some rounds: repeats must be kept too.
            let range = if round % 3 == 0 { 8 } else { u64::MAX };
            let keys: Vec<u64> = (0..count).map(|_| rng.random_range(0..range)).collect();
            for limit in [0, 1, 5, MAX_TOP_N as usize] {
                let mut top = TopKeys::new(limit);
                for key in &keys {
                    top.offer(*key);
                }
                let mut sorted = keys.clone();
                sorted.sort_unstable();
                sorted.truncate(limit);
                assert_eq!(top.sorted(), sorted, "round {round}, limit {limit}");
            }
        }
    }

    #[test]
    fn rotate_is_the_remainder_it_replaces() {
        for count in 1..20 {
            for position in 0..count {
                for by in 0..=count {
                    assert_eq!(
                        rotate(position, by, count),
                        (position + by) % count,
                        "{position} + {by} mod {count}"
                    );
                }
            }
        }
    }

    #[test]
    fn ranks_by_score_puts_ejected_last_and_keeps_top_n() {
        let shared = Arc::new(SchedulingShared::default());
        let scheduler = Scheduler::build(Some(&only(&[(LEAST_REQUEST, 1)], &[])), &["m"], &shared)
            .expect("valid");
        let server = server(7);
        let _busy: Vec<_> = (0..3).map(|_| server.pods[0].begin_request()).collect();
        let _one = server.pods[2].begin_request();
        let ejected = server.outlier.record_failure(
            &server.pods,
            &server.pods[1],
            Failure::ConnectFailure,
            clock::now(),
        );
        assert!(ejected.is_some());
        let headers = HeaderMap::new();
        let ranking = scheduler
            .schedule(&server, &request(&headers, &[]))
            .expect("pods");
        assert_eq!(ranking.len(), 5, "default top-N");
        let order = names(&server, &ranking);
        assert!(
            !order.contains(&"p0".to_owned()),
            "busiest pod is not in the top 5: {order:?}"
        );
        assert!(
            !order.contains(&"p1".to_owned()),
            "ejected pod comes last: {order:?}"
        );
        assert_eq!(
            order[..4].iter().filter(|n| *n == "p2").count(),
            0,
            "{order:?}"
        );
    }

    #[test]
    fn equal_pods_share_requests() {
        let shared = Arc::new(SchedulingShared::default());
        let scheduler = Scheduler::build(Some(&only(&[(LEAST_REQUEST, 1)], &[])), &["m"], &shared)
            .expect("valid");
        let server = server(3);
        let headers = HeaderMap::new();
        let mut counts = HashMap::new();
        for _ in 0..30 {
            let ranking = scheduler
                .schedule(&server, &request(&headers, &[]))
                .expect("pods");
            *counts
                .entry(names(&server, &ranking)[0].clone())
                .or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 3);
        assert!(counts.values().all(|&n| n == 10), "{counts:?}");
    }

    #[test]
    fn lora_filter_without_any_pod_is_a_clear_error() {
        let shared = Arc::new(SchedulingShared::default());
        let scheduler = Scheduler::build(
            Some(&only(&[(RANDOM, 1)], &[LORA_AFFINITY])),
            &["m"],
            &shared,
        )
        .expect("valid");
        let server = server(2);
        for pod in &server.pods {
            pod.set_load(Some(Arc::new(pb::EndpointLoad {
                models: vec!["base".into()],
                observed_at_unix_ms: 1,
                ..Default::default()
            })));
        }
        let headers = HeaderMap::new();
        let error = scheduler
            .schedule(&server, &request(&headers, &[]))
            .expect_err("no pod has m");
        assert_eq!(
            error.to_string(),
            "ModelServer default/s: no pod has model \"m\" loaded"
        );
        assert_eq!(
            scheduler
                .schedule(&self::server(0), &request(&headers, &[]))
                .expect_err("no pods"),
            ScheduleError::NoPods("default/s".into())
        );
    }

    #[test]
    fn stale_engine_load_is_ignored() {
        let shared = Arc::new(SchedulingShared::default());
        let scheduler =
            Scheduler::build(Some(&only(&[(GPU_USAGE, 1)], &[])), &["m"], &shared).expect("valid");
        let server = server(2);
        let now = unix_ms_now();
        let kv = |usage: f64, at: i64| {
            Some(Arc::new(pb::EndpointLoad {
                kv_cache_usage: usage,
                observed_at_unix_ms: at,
                ..Default::default()
            }))
        };
        server.pods[0].set_load(kv(0.1, now));
        server.pods[1].set_load(kv(0.9, now));
        let headers = HeaderMap::new();
        for _ in 0..4 {
            let ranking = scheduler
                .schedule(&server, &request(&headers, &[]))
                .expect("pods");
            assert_eq!(names(&server, &ranking)[0], "p0");
        }
        // p0's low usage is a minute old: it no longer wins; both are equal and rotate.
        server.pods[0].set_load(kv(0.1, now - 60_000));
        let firsts: HashSet<String> = (0..4)
            .map(|_| {
                let ranking = scheduler
                    .schedule(&server, &request(&headers, &[]))
                    .expect("pods");
                names(&server, &ranking)[0].clone()
            })
            .collect();
        assert_eq!(firsts.len(), 2, "{firsts:?}");
    }

    #[test]
    fn decisions_and_plugin_metrics_are_recorded() {
        let registry = prometheus::Registry::new();
        let shared = Arc::new(SchedulingShared::new(Some(
            PluginMetrics::register(&registry).expect("register"),
        )));
        let scheduler = Scheduler::build(None, &["m", "gone"], &shared).expect("defaults");
        let server = server(2);
        let headers = HeaderMap::new();
        scheduler
            .schedule(&server, &request(&headers, &[1, 2]))
            .expect("pods");
        let recent = shared.decisions.recent(10);
        assert_eq!(recent.len(), 1);
        let decision = &recent[0];
        assert_eq!(decision["model"], "m");
        assert_eq!(decision["ranked"].as_array().expect("ranked").len(), 2);
        for plugin in [LEAST_REQUEST, GPU_USAGE, LEAST_LATENCY, PREFIX_CACHE] {
            assert!(
                decision["ranked"][0]["scores"][plugin].is_u64(),
                "{decision}"
            );
        }
        let families = registry.gather();
        let family = families
            .iter()
            .find(|f| f.name() == "kthena_router_scheduler_plugin_duration_seconds")
            .expect("registered");
        let observed: u64 = family
            .get_metric()
            .iter()
            .map(|m| m.get_histogram().get_sample_count())
            .sum();
        assert_eq!(observed, 5, "one filter and four scorers, once each");
        assert_eq!(
            family.get_metric().len(),
            5,
            "series of the scheduled model only, none for the idle one"
        );
        // A snapshot without "m" drops its series.
        let previous = Scheduler::build(None, &["m"], &shared).expect("defaults");
        let _next = Scheduler::build(None, &["other"], &shared).expect("defaults");
        let has_family = || {
            registry
                .gather()
                .iter()
                .any(|f| f.name() == "kthena_router_scheduler_plugin_duration_seconds")
        };
        assert!(!has_family(), "m's series are gone");
        // A request still scheduled by the previous snapshot creates none.
        previous
            .schedule(&server, &request(&headers, &[1, 2]))
            .expect("pods");
        assert!(previous.handles("m").is_none());
        assert!(!has_family());
    }

    #[test]
    fn invalid_configuration_is_rejected() {
        let shared = Arc::new(SchedulingShared::default());
        let error = Scheduler::build(Some(&only(&[("kvcache-aware", 1)], &[])), &["m"], &shared)
            .expect_err("unknown plugin");
        assert!(
            error
                .to_string()
                .contains("unknown score plugin \"kvcache-aware\""),
            "{error}"
        );
    }

    fn pair_names<'s>(server: &'s Server, pairs: &PairRanking) -> Vec<(&'s str, &'s str)> {
        (0..pairs.len())
            .filter_map(|n| pairs.get(n))
            .map(|(p, d)| (server.pods[p].name.as_str(), server.pods[d].name.as_str()))
            .collect()
    }

    #[test]
    fn pairs_rank_decode_pods_by_load_then_the_best_prefill_of_their_group() {
        use crate::proxy::testing::pd_server;
        use crate::routing::KvConnector;
        let shared = Arc::new(SchedulingShared::default());
        let scheduler = Scheduler::build(Some(&only(&[(LEAST_REQUEST, 1)], &[])), &["m"], &shared)
            .expect("valid");
        // g0: prefill p0 p1, decode p2 p3; g1: prefill p4, no decode; g2: prefill p5, decode p6.
        let server = pd_server(
            &[("g0", 2, 2), ("g1", 1, 0), ("g2", 1, 1)],
            KvConnector::Http,
            0,
            Duration::ZERO,
            None,
        );
        let pd = server.prefill_decode.as_ref().expect("PD");
        assert_eq!(pd.decode_candidates, [2, 3, 6], "g1 is incomplete");
        let _busy_decode = server.pods[2].begin_request();
        let _busy_prefill = server.pods[0].begin_request();
        let headers = HeaderMap::new();
        let pairs = scheduler
            .schedule_pairs(&server, pd, &request(&headers, &[]))
            .expect("pairs");
        assert_eq!(
            pair_names(&server, &pairs),
            [("p1", "p3"), ("p5", "p6"), ("p1", "p2")],
            "the busy decode pod last, each with its group's idle prefill pod"
        );
        let unpaired = pd_server(&[("g1", 1, 0)], KvConnector::Http, 0, Duration::ZERO, None);
        let error = scheduler
            .schedule_pairs(
                &unpaired,
                unpaired.prefill_decode.as_ref().expect("PD"),
                &request(&headers, &[]),
            )
            .expect_err("no complete group");
        assert_eq!(
            error.to_string(),
            "ModelServer default/s has no prefill/decode group with a ready prefill and a ready decode pod"
        );
    }

    #[test]
    fn prefix_affinity_scores_prefill_pods_only() {
        use crate::proxy::testing::pd_server;
        use crate::routing::KvConnector;
        let shared = Arc::new(SchedulingShared::default());
        let scheduler = Scheduler::build(
            Some(&only(&[(PREFIX_CACHE, 1), (LEAST_REQUEST, 1)], &[])),
            &["m"],
            &shared,
        )
        .expect("valid");
        let server = pd_server(&[("g0", 3, 3)], KvConnector::Nixl, 0, Duration::ZERO, None);
        let pd = server.prefill_decode.as_ref().expect("PD");
        let hashes: Vec<u64> = (1..=8).collect();
        // The prefix went to p2 (a prefill pod) and to p5 (a decode pod) before.
        scheduler.on_dispatched(server.pods[2].id, &hashes);
        scheduler.on_dispatched(server.pods[5].id, &hashes);
        let headers = HeaderMap::new();
        let pairs = scheduler
            .schedule_pairs(&server, pd, &request(&headers, &hashes))
            .expect("pairs");
        let names = pair_names(&server, &pairs);
        assert!(
            names.iter().all(|(prefill, _)| *prefill == "p2"),
            "{names:?}"
        );
        let decisions = shared.decisions.recent(2);
        let score = |decision: &serde_json::Value, pod: &str| {
            decision["ranked"]
                .as_array()
                .expect("ranked")
                .iter()
                .find(|ranked| ranked["pod"] == pod)
                .map(|ranked| ranked["scores"][PREFIX_CACHE].clone())
        };
        let (prefill, decode) = (&decisions[0], &decisions[1]);
        assert_eq!(
            (prefill["role"].as_str(), decode["role"].as_str()),
            (Some("prefill"), Some("decode"))
        );
        assert_eq!(score(prefill, "default/p2"), Some(100.into()));
        for pod in ["default/p3", "default/p4", "default/p5"] {
            assert_eq!(
                score(decode, pod),
                Some(0.into()),
                "decode pods ignore the prefix: {decode}"
            );
        }
    }

    /// Two schedulers of `config`, each with the state of a dataplane of its
    /// own: one samples large pools, the other ranks them whole.
    fn sampling_and_whole(config: &pb::SchedulerConfig) -> (Scheduler, Scheduler) {
        let build = || {
            Scheduler::build(Some(config), &["m"], &Arc::new(SchedulingShared::default()))
                .expect("valid")
        };
        let mut whole = build();
        whole.sample_above = usize::MAX;
        (build(), whole)
    }

    fn first(scheduler: &Scheduler, server: &Server, request: &ScheduleRequest<'_>) -> usize {
        scheduler
            .schedule(server, request)
            .expect("pods")
            .get(0)
            .expect("ranked")
    }

    fn fresh_load(waiting: f64) -> Option<Arc<pb::EndpointLoad>> {
        Some(Arc::new(pb::EndpointLoad {
            requests_waiting: waiting,
            kv_cache_usage: 0.1,
            kv_cache_capacity_tokens: 100_000,
            observed_at_unix_ms: unix_ms_now(),
            ..Default::default()
        }))
    }

    #[test]
    fn a_sampled_pick_scores_a_bounded_sample_that_holds_the_prefix_home() {
        let (sampling, whole) =
            sampling_and_whole(&only(&[(PREFIX_CACHE, 1), (LEAST_REQUEST, 1)], &[]));
        let server = server(300);
        for pod in &server.pods {
            pod.set_load(fresh_load(0.0));
        }
        let headers = HeaderMap::new();
        for group in 0..60u64 {
            let hashes: Vec<u64> = (0..4).map(|block| group << 8 | block).collect();
            let request = request(&headers, &hashes);
            let home = first(&whole, &server, &request);
            assert_eq!(first(&sampling, &server, &request), home, "group {group}");
            sampling.on_dispatched(server.pods[home].id, &hashes);
            whole.on_dispatched(server.pods[home].id, &hashes);
            // The home saturates: both spill to the same pod, the next
            // rendezvous choice, and the group goes back home afterwards.
            server.pods[home].set_load(fresh_load(5.0));
            let spill = first(&whole, &server, &request);
            assert_ne!(spill, home);
            assert_eq!(first(&sampling, &server, &request), spill, "group {group}");
            server.pods[home].set_load(fresh_load(0.0));
            assert_eq!(first(&sampling, &server, &request), home, "group {group}");
        }
        let decision = &sampling.shared.decisions.recent(1)[0];
        assert_eq!(decision["podsSampledFrom"], 300, "{decision}");
        let considered = decision["podsConsidered"].as_u64().expect("count");
        assert!(
            (SAMPLED_CANDIDATES as u64..=SAMPLED_CANDIDATES as u64 + 8).contains(&considered),
            "a window plus the nominated pods: {considered}"
        );
        let whole_decision = &whole.shared.decisions.recent(1)[0];
        assert_eq!(whole_decision["podsConsidered"], 300);
        assert!(whole_decision.get("podsSampledFrom").is_none());
    }

    /// How well `scheduler` spreads a steady stream of requests of random
    /// lengths over `pods` equal pods holding `per_pod` requests each on
    /// average: per pick, how many more requests the chosen pod held than
    /// the idlest pod (the mean, and the share of picks over by more than
    /// one), and the most any pod held.
    fn spread(scheduler: &Scheduler, pods: usize, per_pod: usize) -> (f64, f64, u64) {
        let server = server(pods);
        let headers = HeaderMap::new();
        let concurrency = pods * per_pod;
        // Lengths 1..2 x concurrency - 1 picks: `concurrency` requests held
        // on average once the first of them could have ended.
        let mut ending: Vec<Vec<crate::pod::InFlightGuard>> =
            (0..2 * concurrency).map(|_| Vec::new()).collect();
        let mut random = 0x9E37_79B9_7F4A_7C15_u64;
        let (mut measured, mut excess, mut over_one, mut most) = (0, 0, 0, 0);
        let slots = ending.len();
        for step in 0..4 * concurrency {
            ending[step % slots].clear();
            let index = first(scheduler, &server, &request(&headers, &[]));
            if step >= 2 * concurrency {
                let held: Vec<u64> = server.pods.iter().map(|pod| pod.in_flight()).collect();
                let idlest = held.iter().copied().min().unwrap_or(0);
                let over = held[index] - idlest;
                measured += 1;
                excess += over;
                over_one += u64::from(over > 1);
                most = most.max(held.iter().copied().max().unwrap_or(0));
            }
            random ^= random << 13;
            random ^= random >> 7;
            random ^= random << 17;
            let length = 1 + (random % (2 * concurrency as u64 - 1)) as usize;
            ending[(step + length) % slots].push(server.pods[index].begin_request());
        }
        (
            excess as f64 / measured as f64,
            over_one as f64 / measured as f64,
            most,
        )
    }

    #[test]
    fn a_sampled_pick_spreads_load_nearly_as_evenly_as_ranking_every_pod() {
        let (sampling, whole) = sampling_and_whole(&scheduler::default_config());
        let (whole_excess, _, whole_most) = spread(&whole, 1000, 2);
        assert_eq!(whole_excess, 0.0, "the whole pool: always the idlest");
        // Measured: a window of 64 picks a pod 0.24 requests busier than
        // the idlest on average and more than one busier 1.6 % of the time;
        // a window of 32, 0.49 and 5.3 %. No pod holds more than with the
        // whole pool.
        let (excess, over_one, most) = spread(&sampling, 1000, 2);
        assert!(excess < 0.35, "mean excess {excess}");
        assert!(over_one < 0.04, "picks over by more than one: {over_one}");
        assert!(most <= whole_most, "{most} against {whole_most}");
    }

    #[test]
    fn a_sampled_pick_keeps_a_session_on_its_pod() {
        use switchyard_snapshot::scheduler::session_affinity::{
            DEFAULT_SESSION_HEADER, NAME as SESSION_AFFINITY,
        };
        let (sampling, whole) =
            sampling_and_whole(&only(&[(SESSION_AFFINITY, 1), (LEAST_REQUEST, 1)], &[]));
        let server = server(500);
        for session in 0..50 {
            let mut headers = HeaderMap::new();
            headers.insert(
                DEFAULT_SESSION_HEADER,
                format!("session-{session}").parse().expect("value"),
            );
            let request = request(&headers, &[]);
            let pod = first(&whole, &server, &request);
            for _ in 0..3 {
                assert_eq!(
                    first(&sampling, &server, &request),
                    pod,
                    "session {session}"
                );
            }
        }
    }

    #[test]
    fn over_a_cycle_of_sampled_picks_every_one_of_many_equal_pods_is_picked_once() {
        let (sampling, _) = sampling_and_whole(&only(&[(LEAST_REQUEST, 1)], &[]));
        let server = server(250);
        let headers = HeaderMap::new();
        let mut picked = HashMap::new();
        for _ in 0..server.pods.len() {
            *picked
                .entry(first(&sampling, &server, &request(&headers, &[])))
                .or_insert(0) += 1;
        }
        assert_eq!(picked.len(), server.pods.len());
        assert!(picked.values().all(|n| *n == 1), "{picked:?}");
        // A busy pod is passed over by every window it is in.
        let mut busy: Vec<_> = server.pods.iter().map(|pod| pod.begin_request()).collect();
        let idle = 17;
        drop(busy.swap_remove(idle));
        let mut picked = 0;
        for _ in 0..server.pods.len() {
            if first(&sampling, &server, &request(&headers, &[])) == idle {
                picked += 1;
            }
        }
        assert_eq!(
            picked, SAMPLED_CANDIDATES,
            "the idle pod wins each of the windows it is in"
        );
    }

    #[test]
    fn ejected_pods_are_never_sampled_and_rank_last_when_few_are_healthy() {
        let (sampling, _) = sampling_and_whole(&only(&[(LEAST_REQUEST, 1)], &[]));
        let server = server(300);
        let far = clock::now() + Duration::from_secs(600);
        for pod in server.pods.iter().step_by(3) {
            pod.health.eject_until(far);
        }
        let headers = HeaderMap::new();
        for _ in 0..600 {
            let ranking = sampling
                .schedule(&server, &request(&headers, &[]))
                .expect("pods");
            assert_eq!(ranking.len(), 5);
            for n in 0..ranking.len() {
                let index = ranking.get(n).expect("ranked");
                assert_ne!(index % 3, 0, "pod {index} is ejected");
            }
        }
        // Fewer healthy pods than a window: the whole pool, ejected last.
        for pod in &server.pods[3..] {
            pod.health.eject_until(far);
        }
        let ranking = sampling
            .schedule(&server, &request(&headers, &[]))
            .expect("pods");
        let ranked: Vec<usize> = (0..ranking.len()).filter_map(|n| ranking.get(n)).collect();
        assert_eq!(ranked.len(), 5);
        assert_eq!(
            ranked[..2].iter().copied().collect::<HashSet<_>>(),
            HashSet::from([1, 2]),
            "the two healthy pods first: {ranked:?}"
        );
    }

    #[test]
    fn a_filter_that_narrows_a_sample_by_the_whole_pool_ranks_the_whole_pool() {
        let (sampling, _) = sampling_and_whole(&only(&[(LEAST_REQUEST, 1)], &[LORA_AFFINITY]));
        let server = server(300);
        let with_adapter = [7, 211];
        for (i, pod) in server.pods.iter().enumerate() {
            let model = if with_adapter.contains(&i) {
                "m"
            } else {
                "base"
            };
            pod.set_load(Some(Arc::new(pb::EndpointLoad {
                models: vec![model.into()],
                observed_at_unix_ms: 1,
                ..Default::default()
            })));
        }
        let headers = HeaderMap::new();
        for _ in 0..20 {
            let ranking = sampling
                .schedule(&server, &request(&headers, &[]))
                .expect("two pods have it");
            let ranked: Vec<usize> = (0..ranking.len()).filter_map(|n| ranking.get(n)).collect();
            assert_eq!(ranked.len(), 2);
            assert!(
                ranked.iter().all(|i| with_adapter.contains(i)),
                "{ranked:?}"
            );
        }
        let decision = &sampling.shared.decisions.recent(1)[0];
        assert_eq!(decision["podsConsidered"], 300, "{decision}");
    }
}
