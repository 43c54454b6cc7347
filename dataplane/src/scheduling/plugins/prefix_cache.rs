//! `prefix-cache`: the pod most likely to have the prompt's prefix in its KV
//! cache, consistently across dataplane replicas.
//!
//! Two sources, the higher wins per pod:
//! - the local index of where this dataplane sent each prefix block:
//!   `matched blocks / prompt blocks x 100`, as in the Kthena router;
//! - rendezvous hashing of the leading `affinity_blocks` blocks: the pod with
//!   the highest weight among those within the load bound scores 100. Every
//!   replica computes the same pod for a prefix it has never seen, so replicas
//!   build their caches on the same pods instead of scattering them.
//!
//! Pods over the load bound (`factor` x the mean) score 0, even when they hold
//! the prefix: requests for a hot prefix spill to the next pod in rendezvous
//! order (again the same on every replica) instead of piling onto a saturated
//! pod and turning cache hits into queueing.

use std::sync::Arc;

use switchyard_snapshot::pb;
use switchyard_snapshot::scheduler::{self, SchedulerConfigError};

use super::super::prefix::{PrefixIndex, bounded_rendezvous};
use super::{
    Candidate, Implementation, MAX_SCORE, PluginContext, PluginInput, PromptHashing, ScorePlugin,
    with_scratch,
};

pub const IMPLEMENTATION: Implementation = Implementation {
    spec: &scheduler::prefix_cache::SPEC,
    filter: None,
    score: Some(build_scorer),
};

fn build_scorer(context: &PluginContext<'_>) -> Result<Box<dyn ScorePlugin>, SchedulerConfigError> {
    let args: pb::PrefixCacheArgs = scheduler::plugin_args(context.config);
    Ok(Box::new(PrefixCache {
        index: context
            .prefix_index
            .get(args.max_hash_cache_size() as usize),
        hashing: PromptHashing {
            block_size: args.block_size_to_hash() as usize,
            max_blocks: args.max_blocks_to_match() as usize,
        },
        affinity_blocks: args.affinity_blocks() as usize,
        load_bound_factor: args.load_bound_factor(),
    }))
}

#[derive(Debug)]
struct PrefixCache {
    /// Where this dataplane sent each prefix; shared with the next snapshot's scorer.
    index: Arc<PrefixIndex>,
    hashing: PromptHashing,
    affinity_blocks: usize,
    load_bound_factor: f64,
}

impl ScorePlugin for PrefixCache {
    fn score(&self, candidates: &[Candidate], request: &PluginInput<'_>, out: &mut [u32]) {
        score(
            candidates,
            request.prompt_hashes,
            &self.index,
            self.affinity_blocks,
            self.load_bound_factor,
            out,
        );
    }

    fn prompt_hashing(&self) -> Option<PromptHashing> {
        Some(self.hashing)
    }

    /// Remembers where this prefix went (Kthena's PostSchedule).
    fn on_dispatched(&self, pod_id: u64, prompt_hashes: &[u64]) {
        if !prompt_hashes.is_empty() {
            self.index.record(prompt_hashes, pod_id);
        }
    }
}

pub fn score(
    candidates: &[Candidate],
    hashes: &[u64],
    index: &PrefixIndex,
    affinity_blocks: usize,
    factor: f64,
    out: &mut [u32],
) {
    out.fill(0);
    if hashes.is_empty() || candidates.is_empty() {
        return;
    }
    with_scratch(|scratch| {
        scratch.fill(candidates);
        let total = hashes.len();
        index.matches(hashes, &scratch.ids, &mut scratch.matched);
        let key = hashes[affinity_blocks.clamp(1, total) - 1];
        let chosen =
            bounded_rendezvous(key, &scratch.ids, &scratch.loads, &scratch.eligible, factor);
        let bound = load_bound(&scratch.loads, &scratch.eligible, factor);
        for (index, slot) in out.iter_mut().enumerate() {
            if !scratch.eligible[index] || scratch.loads[index] + 1.0 > bound {
                continue;
            }
            let matched = (scratch.matched[index] * MAX_SCORE as usize / total) as u32;
            let preferred = if chosen == Some(index) { MAX_SCORE } else { 0 };
            *slot = matched.max(preferred);
        }
    });
}

/// The bounded-load threshold of [`bounded_rendezvous`].
pub fn load_bound(loads: &[f64], eligible: &[bool], factor: f64) -> f64 {
    let count = eligible.iter().filter(|e| **e).count().max(1);
    let total: f64 = loads
        .iter()
        .zip(eligible)
        .filter(|(_, e)| **e)
        .map(|(l, _)| *l)
        .sum();
    (factor * (total + 1.0) / count as f64)
        .ceil()
        .max(super::super::prefix::BOUNDED_LOAD_FLOOR)
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;

    use super::super::super::prefix::SharedPrefixIndex;
    use super::super::testing::{candidate, input};
    use super::*;

    #[test]
    fn built_from_its_arguments_with_an_index_that_outlives_the_snapshot() {
        let mut config = scheduler::default_config();
        config.plugin_args = vec![pb::PluginArgs {
            plugin: Some(pb::plugin_args::Plugin::PrefixCache(pb::PrefixCacheArgs {
                block_size_to_hash: Some(32),
                max_blocks_to_match: Some(8),
                ..Default::default()
            })),
        }];
        let shared = SharedPrefixIndex::default();
        let context = PluginContext {
            config: &config,
            prefix_index: &shared,
        };
        let plugin = build_scorer(&context).expect("valid");
        assert_eq!(
            plugin.prompt_hashing(),
            Some(PromptHashing {
                block_size: 32,
                max_blocks: 8
            })
        );
        let pods: Vec<_> = (0..4).map(|i| candidate(i, 0, None)).collect();
        let headers = HeaderMap::new();
        let hashes = [5, 6, 7, 8];
        let mut out = [0; 4];
        plugin.score(&pods, &input(&headers, &hashes), &mut out);
        let preferred = out.iter().position(|s| *s == 100).expect("one preferred");
        let other = (preferred + 1) % 4;
        assert_eq!(out[other], 0);
        plugin.on_dispatched(pods[other].pod_id, &hashes);
        let next_snapshot = build_scorer(&context).expect("valid");
        next_snapshot.score(&pods, &input(&headers, &hashes), &mut out);
        assert_eq!(out[other], 100, "the whole prompt matched where it went");
    }

    #[test]
    fn unseen_prefix_goes_to_one_deterministic_pod() {
        let index = PrefixIndex::new(1000);
        let pods: Vec<_> = (0..4).map(|i| candidate(i, 0, None)).collect();
        let hashes = [5, 6, 7];
        let mut out = [0; 4];
        score(&pods, &hashes, &index, 16, 1.25, &mut out);
        assert_eq!(out.iter().filter(|s| **s == 100).count(), 1, "{out:?}");
        assert_eq!(out.iter().filter(|s| **s == 0).count(), 3, "{out:?}");
        let mut again = [0; 4];
        score(&pods, &hashes, &index, 16, 1.25, &mut again);
        assert_eq!(out, again);
    }

    #[test]
    fn indexed_prefix_scores_by_match_length() {
        let index = PrefixIndex::new(1000);
        let pods: Vec<_> = (0..4).map(|i| candidate(i, 0, None)).collect();
        let hashes = [5, 6, 7, 8];
        let mut out = [0; 4];
        score(&pods, &hashes, &index, 1, 1.25, &mut out);
        let preferred = out.iter().position(|s| *s == 100).expect("one preferred");
        let other = (preferred + 1) % 4;
        index.record(&hashes[..2], pods[other].pod_id);
        score(&pods, &hashes, &index, 1, 1.25, &mut out);
        assert_eq!(out[other], 50);
        assert_eq!(out[preferred], 100);
    }

    #[test]
    fn saturated_pod_scores_zero_even_with_the_prefix() {
        let index = PrefixIndex::new(1000);
        let mut pods: Vec<_> = (0..4).map(|i| candidate(i, 1, None)).collect();
        let hashes = [5, 6, 7, 8];
        let mut out = [0; 4];
        score(&pods, &hashes, &index, 16, 1.25, &mut out);
        let preferred = out.iter().position(|s| *s == 100).expect("one preferred");
        index.record(&hashes, pods[preferred].pod_id);
        pods[preferred].in_flight = 10;
        score(&pods, &hashes, &index, 16, 1.25, &mut out);
        assert_eq!(out[preferred], 0, "{out:?}");
        assert_eq!(
            out.iter().filter(|s| **s == 100).count(),
            1,
            "the spill has one target: {out:?}"
        );
    }
}
