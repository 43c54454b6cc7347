//! `/debug/routing/decisions`: the most recent scheduling decisions with every
//! plugin's score for the ranked pods.
//!
//! One fixed ring of slots per traffic worker, each slot with its own lock
//! and buffers reused from one decision to the next: a request locks a slot
//! of its own worker's ring (never contended: only the debug endpoint reads
//! it) and allocates nothing once the slot has held a decision of its size.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use serde_json::{Value, json};
use switchyard_runtime::clock::{self, Instant};

use crate::per_worker::{self, PerWorker};
use crate::pod::PodState;

/// Decisions kept (split between the workers' rings): enough to see a burst
/// of traffic, small enough to dump as JSON at once.
pub const DECISION_SLOTS: usize = 256;

/// One decision.
#[derive(Debug, Default)]
pub struct DecisionRecord {
    /// Order among the decisions of its worker.
    sequence: u64,
    worker: usize,
    /// Orders decisions across workers.
    at: Option<Instant>,
    at_unix_ms: i64,
    request_id: String,
    model: String,
    server: String,
    /// `prefill` or `decode` when the ModelServer disaggregates them.
    pub(super) role: Option<&'static str>,
    considered: usize,
    after_filters: usize,
    /// The candidates a sample was drawn from, when the pick scored a sample.
    pub(super) sampled_from: Option<usize>,
    pub(super) filters: Vec<&'static str>,
    pub(super) plugins: Vec<(&'static str, u32)>,
    ranked: Vec<RankedPod>,
    /// The ranked pods' keys, one after the other: copied into a reused
    /// buffer rather than holding the pods (whose reference counts every
    /// worker's requests would then write).
    pod_keys: String,
    /// Per-plugin scores of `ranked`, row-major (`plugins.len()` per pod).
    scores: Vec<u32>,
}

#[derive(Debug)]
struct RankedPod {
    /// Where its key ends in `DecisionRecord::pod_keys`.
    key_end: usize,
    total: u32,
    ejected: bool,
}

impl DecisionRecord {
    pub(super) fn begin(
        &mut self,
        at_unix_ms: i64,
        request_id: &str,
        model: &str,
        server: &str,
        considered: usize,
        after_filters: usize,
    ) {
        self.at_unix_ms = at_unix_ms;
        self.role = None;
        for (buffer, value) in [
            (&mut self.request_id, request_id),
            (&mut self.model, model),
            (&mut self.server, server),
        ] {
            buffer.clear();
            buffer.push_str(value);
        }
        self.considered = considered;
        self.after_filters = after_filters;
        self.sampled_from = None;
        self.filters.clear();
        self.plugins.clear();
        self.ranked.clear();
        self.pod_keys.clear();
        self.scores.clear();
    }

    pub(super) fn push_candidate(
        &mut self,
        pod: &PodState,
        total: u32,
        ejected: bool,
        scores: impl Iterator<Item = u32>,
    ) {
        self.pod_keys.push_str(&pod.key);
        self.ranked.push(RankedPod {
            key_end: self.pod_keys.len(),
            total,
            ejected,
        });
        self.scores.extend(scores);
    }

    fn to_json(&self) -> Value {
        let width = self.plugins.len();
        let mut key_start = 0;
        let ranked: Vec<Value> = self
            .ranked
            .iter()
            .enumerate()
            .map(|(row, ranked)| {
                let key = &self.pod_keys[key_start..ranked.key_end];
                key_start = ranked.key_end;
                let scores: serde_json::Map<String, Value> = self
                    .plugins
                    .iter()
                    .enumerate()
                    .map(|(p, (name, _))| ((*name).to_owned(), json!(self.scores[row * width + p])))
                    .collect();
                json!({
                    "pod": key,
                    "total": ranked.total,
                    "ejected": ranked.ejected,
                    "scores": scores,
                })
            })
            .collect();
        let mut decision = json!({
            "sequence": self.sequence,
            "worker": self.worker,
            "timeUnixMs": self.at_unix_ms,
            "requestId": self.request_id,
            "model": self.model,
            "modelServer": self.server,
            "podsConsidered": self.considered,
            "podsAfterFilters": self.after_filters,
            "filters": self.filters,
            "plugins": self.plugins.iter().map(|(n, w)| json!({"name": n, "weight": w})).collect::<Vec<_>>(),
            "ranked": ranked,
        });
        if let Some(candidates) = self.sampled_from {
            decision["podsSampledFrom"] = candidates.into();
        }
        if let Some(role) = self.role {
            decision["role"] = role.into();
        }
        decision
    }
}

/// The recent decisions: one ring per worker.
#[derive(Debug, Default)]
pub struct DecisionLog {
    rings: PerWorker<Ring>,
}

/// One worker's recent decisions.
#[derive(Debug)]
struct Ring {
    slots: Vec<Mutex<DecisionRecord>>,
    next: AtomicU64,
}

impl Default for Ring {
    fn default() -> Self {
        let slots = (DECISION_SLOTS / per_worker::count()).max(1);
        Self {
            slots: (0..slots).map(|_| Mutex::default()).collect(),
            next: AtomicU64::new(1),
        }
    }
}

impl DecisionLog {
    pub fn new() -> Self {
        Self::default()
    }

    /// Fills the next slot of the calling worker's ring.
    pub(super) fn record(&self, fill: impl FnOnce(&mut DecisionRecord)) {
        let ring = self.rings.local();
        let sequence = ring.next.fetch_add(1, Ordering::Relaxed);
        let mut slot = ring.slots[(sequence % ring.slots.len() as u64) as usize].lock();
        fill(&mut slot);
        slot.sequence = sequence;
        slot.worker = per_worker::index();
        slot.at = Some(clock::now());
    }

    /// Up to `limit` decisions, newest first.
    pub fn recent(&self, limit: usize) -> Vec<Value> {
        let mut records: Vec<(Instant, Value)> = self
            .rings
            .iter()
            .flat_map(|ring| &ring.slots)
            .filter_map(|slot| {
                let slot = slot.lock();
                slot.at.map(|at| (at, slot.to_json()))
            })
            .collect();
        records.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
        records.into_iter().take(limit).map(|(_, v)| v).collect()
    }
}
