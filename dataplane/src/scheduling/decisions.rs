//! `/debug/routing/decisions`: the most recent scheduling decisions with every
//! plugin's score for the ranked pods.
//!
//! A fixed ring of slots, each with its own lock and buffers reused from one
//! decision to the next: a request locks one slot (never contended unless
//! [`DECISION_SLOTS`] requests are scheduled at the same instant) and
//! allocates nothing once the slot has held a decision of its size.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::pod::PodState;

/// Decisions kept: enough to see a burst of traffic, small enough to dump as JSON at once.
pub const DECISION_SLOTS: usize = 256;

/// One decision.
#[derive(Debug, Default)]
pub struct DecisionRecord {
    sequence: u64,
    at_unix_ms: i64,
    request_id: String,
    model: String,
    server: String,
    /// `prefill` or `decode` when the ModelServer disaggregates them.
    pub(super) role: Option<&'static str>,
    considered: usize,
    after_filters: usize,
    pub(super) filters: Vec<&'static str>,
    pub(super) plugins: Vec<(&'static str, u32)>,
    ranked: Vec<RankedPod>,
    /// Per-plugin scores of `ranked`, row-major (`plugins.len()` per pod).
    scores: Vec<u32>,
}

#[derive(Debug)]
struct RankedPod {
    pod: Arc<PodState>,
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
        self.filters.clear();
        self.plugins.clear();
        self.ranked.clear();
        self.scores.clear();
    }

    pub(super) fn push_candidate(
        &mut self,
        pod: Arc<PodState>,
        total: u32,
        ejected: bool,
        scores: impl Iterator<Item = u32>,
    ) {
        self.ranked.push(RankedPod {
            pod,
            total,
            ejected,
        });
        self.scores.extend(scores);
    }

    fn to_json(&self) -> Value {
        let width = self.plugins.len();
        let ranked: Vec<Value> = self
            .ranked
            .iter()
            .enumerate()
            .map(|(row, ranked)| {
                let scores: serde_json::Map<String, Value> = self
                    .plugins
                    .iter()
                    .enumerate()
                    .map(|(p, (name, _))| ((*name).to_owned(), json!(self.scores[row * width + p])))
                    .collect();
                json!({
                    "pod": ranked.pod.key,
                    "total": ranked.total,
                    "ejected": ranked.ejected,
                    "scores": scores,
                })
            })
            .collect();
        let mut decision = json!({
            "sequence": self.sequence,
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
        if let Some(role) = self.role {
            decision["role"] = role.into();
        }
        decision
    }
}

/// The ring of recent decisions.
#[derive(Debug)]
pub struct DecisionLog {
    slots: Vec<Mutex<DecisionRecord>>,
    next: AtomicU64,
}

impl Default for DecisionLog {
    fn default() -> Self {
        Self::new()
    }
}

impl DecisionLog {
    pub fn new() -> Self {
        Self {
            slots: (0..DECISION_SLOTS).map(|_| Mutex::default()).collect(),
            next: AtomicU64::new(1),
        }
    }

    /// Fills the next slot.
    pub(super) fn record(&self, fill: impl FnOnce(&mut DecisionRecord)) {
        let sequence = self.next.fetch_add(1, Ordering::Relaxed);
        let mut slot = self.slots[(sequence % DECISION_SLOTS as u64) as usize].lock();
        fill(&mut slot);
        slot.sequence = sequence;
    }

    /// Up to `limit` decisions, newest first.
    pub fn recent(&self, limit: usize) -> Vec<Value> {
        let mut records: Vec<(u64, Value)> = self
            .slots
            .iter()
            .filter_map(|slot| {
                let slot = slot.lock();
                (slot.sequence > 0).then(|| (slot.sequence, slot.to_json()))
            })
            .collect();
        records.sort_by_key(|(sequence, _)| std::cmp::Reverse(*sequence));
        records.into_iter().take(limit).map(|(_, v)| v).collect()
    }
}
