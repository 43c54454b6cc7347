//! The scheduler plugins, by the reference router's names. Filters narrow
//! the candidate pods; scorers give each candidate 0..=100.
//!
//! Plugins read engine load only when it is fresh ([`Candidate::load`] is
//! `None` otherwise): a stale number is treated as unknown, never as current.

use std::cell::RefCell;
use std::sync::Arc;

use switchyard_snapshot::pb;
use switchyard_snapshot::scheduler as names;

use super::prefix::PrefixIndex;

pub mod gpu_usage;
pub mod least_latency;
pub mod least_request;
pub mod lora_affinity;
pub mod prefix_cache;
pub mod random;
pub mod session_affinity;

/// Highest score a plugin gives.
pub const MAX_SCORE: u32 = 100;

/// One pod under consideration for one request.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Index into the ModelServer's pods.
    pub index: usize,
    pub pod_id: u64,
    /// This dataplane's in-flight requests on the pod (always current).
    pub in_flight: u64,
    /// Connect failures recently: considered last.
    pub ejected: bool,
    /// The engine load, only if fresh.
    pub load: Option<Arc<pb::EndpointLoad>>,
    /// The engine load whatever its age (model lists change rarely).
    pub any_load: Option<Arc<pb::EndpointLoad>>,
}

/// What scorers may read about the request.
#[derive(Debug)]
pub struct ScoreInput<'a> {
    pub prompt_hashes: &'a [u64],
    pub session_key: Option<u64>,
    pub prefix: &'a PrefixIndex,
}

/// A filter plugin with its arguments.
#[derive(Debug, Clone)]
pub enum Filter {
    LeastRequest { max_waiting_requests: u32 },
    LoraAffinity,
}

/// A score plugin with its arguments.
#[derive(Debug, Clone)]
pub enum Scorer {
    LeastRequest,
    GpuUsage,
    LeastLatency {
        ttft_weight: f64,
    },
    PrefixCache {
        affinity_blocks: usize,
        load_bound_factor: f64,
    },
    Random,
    SessionAffinity {
        load_bound_factor: f64,
    },
}

/// Why filtering left no pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("no pod has model {0:?} loaded")]
    ModelNotLoaded(String),
}

impl Filter {
    pub fn name(&self) -> &'static str {
        match self {
            Self::LeastRequest { .. } => names::LEAST_REQUEST,
            Self::LoraAffinity => names::LORA_AFFINITY,
        }
    }

    /// Narrows `candidates` for a request that needs `served_model` loaded.
    pub fn apply(
        &self,
        candidates: &mut Vec<Candidate>,
        served_model: &str,
    ) -> Result<(), FilterError> {
        match self {
            Self::LeastRequest {
                max_waiting_requests,
            } => {
                least_request::filter(candidates, *max_waiting_requests);
                Ok(())
            }
            Self::LoraAffinity => lora_affinity::filter(candidates, served_model),
        }
    }
}

impl Scorer {
    pub fn name(&self) -> &'static str {
        match self {
            Self::LeastRequest => names::LEAST_REQUEST,
            Self::GpuUsage => names::GPU_USAGE,
            Self::LeastLatency { .. } => names::LEAST_LATENCY,
            Self::PrefixCache { .. } => names::PREFIX_CACHE,
            Self::Random => names::RANDOM,
            Self::SessionAffinity { .. } => names::SESSION_AFFINITY,
        }
    }

    /// Writes one score (0..=100) per candidate into `out`.
    pub fn score(&self, candidates: &[Candidate], input: &ScoreInput<'_>, out: &mut [u32]) {
        match self {
            Self::LeastRequest => least_request::score(candidates, out),
            Self::GpuUsage => gpu_usage::score(candidates, out),
            Self::LeastLatency { ttft_weight } => {
                least_latency::score(candidates, *ttft_weight, out)
            }
            Self::PrefixCache {
                affinity_blocks,
                load_bound_factor,
            } => prefix_cache::score(candidates, input, *affinity_blocks, *load_bound_factor, out),
            Self::Random => random::score(out),
            Self::SessionAffinity { load_bound_factor } => {
                session_affinity::score(candidates, input.session_key, *load_bound_factor, out);
            }
        }
    }
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
}

impl PluginScratch {
    /// Loads the bounded-load inputs of `candidates`.
    pub fn fill(&mut self, candidates: &[Candidate]) {
        self.ids.clear();
        self.loads.clear();
        self.eligible.clear();
        self.matched.clear();
        for candidate in candidates {
            self.ids.push(candidate.pod_id);
            self.loads.push(bounded_load(candidate));
            self.eligible.push(!candidate.ejected);
            self.matched.push(0);
        }
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

    /// A candidate with a fresh load.
    pub fn candidate(index: usize, in_flight: u64, load: Option<pb::EndpointLoad>) -> Candidate {
        let load = load.map(Arc::new);
        Candidate {
            index,
            pod_id: 1000 + index as u64,
            in_flight,
            ejected: false,
            load: load.clone(),
            any_load: load,
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
