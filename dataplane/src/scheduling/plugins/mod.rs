//! How each scheduler plugin filters or scores, one file per plugin. What the
//! controller and the dataplane agree on about a plugin (its name, roles and
//! arguments) lives in `switchyard_snapshot::scheduler`; [`IMPLEMENTATIONS`]
//! pairs each of those specs with its code here.
//!
//! Plugins read engine load only when it is fresh ([`Candidate::load`] is
//! `None` otherwise): a stale number is treated as unknown, never as current.

use std::cell::RefCell;
use std::fmt::Debug;
use std::sync::Arc;

use http::HeaderMap;
use switchyard_snapshot::pb;
use switchyard_snapshot::scheduler::{PluginSpec, SchedulerConfigError};

use super::prefix::SharedPrefixIndex;
use super::sample::PoolIds;
use crate::pod::figures::EngineFigures;

pub mod gpu_usage;
pub mod least_latency;
pub mod least_request;
pub mod lora_affinity;
pub mod prefix_cache;
pub mod random;
pub mod session_affinity;

/// The code of every plugin in `switchyard_snapshot::scheduler::PLUGINS`.
pub const IMPLEMENTATIONS: &[Implementation] = &[
    least_request::IMPLEMENTATION,
    lora_affinity::IMPLEMENTATION,
    gpu_usage::IMPLEMENTATION,
    least_latency::IMPLEMENTATION,
    prefix_cache::IMPLEMENTATION,
    random::IMPLEMENTATION,
    session_affinity::IMPLEMENTATION,
];

/// One plugin's code: how to build its filter and its scorer for a snapshot.
#[derive(Debug)]
pub struct Implementation {
    pub spec: &'static PluginSpec,
    /// Set exactly when `spec.filter` is.
    pub filter: Option<BuildFilter>,
    /// Set exactly when `spec.score` is.
    pub score: Option<BuildScore>,
}

impl Implementation {
    /// A plugin that only scores.
    pub const fn scorer(spec: &'static PluginSpec, score: BuildScore) -> Self {
        Self {
            spec,
            filter: None,
            score: Some(score),
        }
    }

    /// A plugin that only filters.
    pub const fn filter(spec: &'static PluginSpec, filter: BuildFilter) -> Self {
        Self {
            spec,
            filter: Some(filter),
            score: None,
        }
    }

    /// A plugin that filters and scores.
    pub const fn filter_and_scorer(
        spec: &'static PluginSpec,
        filter: BuildFilter,
        score: BuildScore,
    ) -> Self {
        Self {
            spec,
            filter: Some(filter),
            score: Some(score),
        }
    }
}

/// Builds a filter from the snapshot's scheduler section.
pub type BuildFilter =
    fn(&PluginContext<'_>) -> Result<Box<dyn FilterPlugin>, SchedulerConfigError>;
/// Builds a scorer from the snapshot's scheduler section.
pub type BuildScore = fn(&PluginContext<'_>) -> Result<Box<dyn ScorePlugin>, SchedulerConfigError>;

/// The implementation of the plugin called `name`.
pub fn implementation(name: &str) -> Option<&'static Implementation> {
    IMPLEMENTATIONS
        .iter()
        .find(|implementation| implementation.spec.name == name)
}

/// What a plugin is built from, once per snapshot.
#[derive(Debug)]
pub struct PluginContext<'a> {
    /// The snapshot's scheduler section, validated; a plugin reads its own
    /// arguments with `switchyard_snapshot::scheduler::plugin_args`.
    pub config: &'a pb::SchedulerConfig,
    /// State that outlives the snapshot.
    pub prefix_index: &'a SharedPrefixIndex,
}

/// What plugins may read about the request.
#[derive(Debug)]
pub struct PluginInput<'a> {
    /// The model a pod must have loaded: the LoRA adapter, or the upstream model name.
    pub served_model: &'a str,
    pub headers: &'a HeaderMap,
    /// The prompt's chained block hashes, when a scorer asked for them
    /// ([`ScorePlugin::prompt_hashing`]); empty otherwise.
    pub prompt_hashes: &'a [u64],
}

/// A filter plugin, built with its arguments.
pub trait FilterPlugin: Debug + Send + Sync {
    /// Narrows `candidates` for one request.
    fn filter(
        &self,
        candidates: &mut Vec<Candidate>,
        request: &PluginInput<'_>,
    ) -> Result<(), FilterError>;

    /// Whether the filter keeps or drops a pod by that pod alone, so that
    /// what it keeps of a sample of the candidates is what it keeps of all of
    /// them, in the sample. A pick that scores a sample
    /// (`scheduling::sample`) ranks all candidates instead when any other
    /// filter drops a pod of it.
    fn judges_each_pod_alone(&self) -> bool {
        false
    }

    /// Whether the filter reads the candidates' model lists
    /// ([`Candidate::any_load`], taken only for such a filter).
    fn reads_model_lists(&self) -> bool {
        false
    }
}

/// A score plugin, built with its arguments.
pub trait ScorePlugin: Debug + Send + Sync {
    /// Writes one score (0..=[`MAX_SCORE`]) per candidate into `out`.
    fn score(&self, candidates: &[Candidate], request: &PluginInput<'_>, out: &mut [u32]);

    /// How the prompt is cut into hashed blocks, for a scorer that reads
    /// [`PluginInput::prompt_hashes`].
    fn prompt_hashing(&self) -> Option<PromptHashing> {
        None
    }

    /// Pods this scorer must see when the pick scores a sample of many
    /// candidates (`scheduling::sample`): appends their positions in
    /// `pool`, the ids of every candidate. A scorer that prefers one
    /// particular pod for a request (an affinity) nominates it and the pods
    /// it falls back to, so a sample never hides them. Runs once per pick
    /// among many pods: it should not take a pass over them all.
    fn nominate(&self, _pool: PoolIds<'_>, _request: &PluginInput<'_>, _out: &mut Vec<usize>) {}

    /// After a pod accepted the request (Kthena's PostSchedule).
    fn on_dispatched(&self, _pod_id: u64, _prompt_hashes: &[u64]) {}
}

/// Prompt block hashing parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PromptHashing {
    /// Prompt bytes per block.
    pub block_size: usize,
    /// Blocks hashed at most.
    pub max_blocks: usize,
}

/// Highest score a plugin gives.
pub const MAX_SCORE: u32 = 100;

/// One pod under consideration for one request.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Index into the ModelServer's pods.
    pub index: usize,
    pub pod_id: u64,
    /// This dataplane's in-flight requests on the pod (always current),
    /// plus its attempts on the pod that failed in a row: a failure counts
    /// as load, so a pod that fails fast never looks like the idlest.
    pub in_flight: u64,
    /// Ejected by outlier detection: considered last.
    pub ejected: bool,
    /// The engine's figures, only if fresh.
    pub load: Option<EngineFigures>,
    /// The engine load whatever its age (model lists change rarely), only
    /// when a filter reads model lists ([`FilterPlugin::reads_model_lists`]):
    /// a handle to it costs more than the rest of the candidate.
    pub any_load: Option<Arc<pb::EndpointLoad>>,
}

/// Why filtering left no pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("no pod has model {0:?} loaded")]
    ModelNotLoaded(String),
}

/// The load bounded-load rules compare: this dataplane's in-flight requests
/// (fresh, its own) plus the engine's waiting queue (everyone's, if fresh).
pub fn bounded_load(candidate: &Candidate) -> f64 {
    candidate.in_flight as f64
        + candidate
            .load
            .as_ref()
            .map_or(0.0, |load| load.requests_waiting.max(0.0))
}

/// Reusable per-thread buffers of the plugins that rank pods, so scoring a
/// request allocates nothing once a thread has served one.
#[derive(Debug, Default)]
pub struct PluginScratch {
    pub ids: Vec<u64>,
    pub loads: Vec<f64>,
    pub eligible: Vec<bool>,
    pub matched: Vec<usize>,
    /// Per candidate, filled by the plugin that needs it.
    pub counts: Vec<usize>,
}

impl PluginScratch {
    /// Loads the bounded-load inputs of `candidates`.
    pub fn fill(&mut self, candidates: &[Candidate]) {
        self.ids.clear();
        self.loads.clear();
        self.eligible.clear();
        self.matched.clear();
        // One pass per buffer over a slice: each sizes its buffer once, where
        // four pushes per candidate each checked capacity.
        self.ids.extend(candidates.iter().map(|c| c.pod_id));
        self.loads.extend(candidates.iter().map(bounded_load));
        self.eligible.extend(candidates.iter().map(|c| !c.ejected));
        self.matched.resize(candidates.len(), 0);
    }
}

thread_local! {
    static PLUGIN_SCRATCH: RefCell<PluginScratch> = RefCell::default();
}

/// Runs `f` with this thread's plugin buffers.
pub fn with_scratch<R>(f: impl FnOnce(&mut PluginScratch) -> R) -> R {
    PLUGIN_SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => f(&mut scratch),
        // Not reentrant in practice; stay correct if it ever is.
        Err(_) => f(&mut PluginScratch::default()),
    })
}

/// `value.round() as u32`, exactly (half away from zero; negative and NaN
/// give 0, too large saturates), without the call: the build's baseline x86
/// target has no rounding instruction, so `f64::round` is a library routine,
/// and every scorer rounds once per candidate (three of the five calls per
/// candidate of a pick among many pods).
pub fn round_score(value: f64) -> u32 {
    if value.is_nan() || value <= 0.0 {
        return 0;
    }
    let whole = value as u32;
    // Exact below 2^32: `whole` is `value` truncated, so the difference is
    // its fraction; above, `whole` saturated and the sum stays saturated.
    if value - f64::from(whole) >= 0.5 {
        whole.saturating_add(1)
    } else {
        whole
    }
}

/// Pods with no fresh data get the mean of the others: the plugin neither
/// favours nor punishes what it cannot see.
fn fill_unknown(out: &mut [u32], candidates: &[Candidate], known: impl Fn(&Candidate) -> bool) {
    let (sum, count) = out
        .iter()
        .zip(candidates)
        .filter(|(_, c)| known(c))
        .fold((0u32, 0u32), |(s, n), (v, _)| (s.saturating_add(*v), n + 1));
    let neutral = sum.checked_div(count).unwrap_or(MAX_SCORE / 2);
    for (value, candidate) in out.iter_mut().zip(candidates) {
        if !known(candidate) {
            *value = neutral;
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A request that carries `headers` and `prompt_hashes` for model "m".
    pub fn input<'a>(headers: &'a HeaderMap, prompt_hashes: &'a [u64]) -> PluginInput<'a> {
        PluginInput {
            served_model: "m",
            headers,
            prompt_hashes,
        }
    }

    /// A candidate with a fresh load.
    pub fn candidate(index: usize, in_flight: u64, load: Option<pb::EndpointLoad>) -> Candidate {
        Candidate {
            index,
            pod_id: 1000 + index as u64,
            in_flight,
            ejected: false,
            load: load.as_ref().map(EngineFigures::from),
            any_load: load.map(Arc::new),
        }
    }

    pub fn load(waiting: f64, running: f64, kv: f64) -> pb::EndpointLoad {
        pb::EndpointLoad {
            requests_waiting: waiting,
            requests_running: running,
            kv_cache_usage: kv,
            observed_at_unix_ms: 1,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use switchyard_snapshot::scheduler::{PLUGINS, default_config};

    use super::*;

    #[test]
    fn round_score_is_round_then_a_saturating_cast() {
        let tiny = f64::MIN_POSITIVE;
        let below_half = 0.5 - f64::EPSILON / 4.0;
        let values = [
            0.0,
            -0.0,
            tiny,
            below_half,
            0.5,
            1.5,
            2.5,
            49.999_999_999,
            99.5,
            99.499_999_999_999_99,
            100.0,
            -0.4,
            -0.5,
            -7.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            4_294_967_294.5,
            4_294_967_295.4,
            4_294_967_295.5,
            1e300,
        ];
        for value in values {
            assert_eq!(round_score(value), value.round() as u32, "{value}");
        }
        for step in 0..=200_000 {
            let value = f64::from(step) / 1000.0;
            assert_eq!(round_score(value), value.round() as u32, "{value}");
        }
    }

    #[test]
    fn every_plugin_spec_has_its_code_with_the_same_roles() {
        assert_eq!(IMPLEMENTATIONS.len(), PLUGINS.len());
        let config = default_config();
        let prefix_index = SharedPrefixIndex::default();
        let context = PluginContext {
            config: &config,
            prefix_index: &prefix_index,
        };
        for spec in PLUGINS {
            let implementation = implementation(spec.name).expect(spec.name);
            assert_eq!(
                implementation.filter.is_some(),
                spec.filter,
                "{}",
                spec.name
            );
            assert_eq!(implementation.score.is_some(), spec.score, "{}", spec.name);
            if let Some(build) = implementation.filter {
                build(&context).expect("builds from the defaults");
            }
            if let Some(build) = implementation.score {
                build(&context).expect("builds from the defaults");
            }
        }
    }
}
