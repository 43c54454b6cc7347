//! `prefix-cache`: the pod most likely to have the prompt's prefix in its KV
//! cache, the same on every dataplane replica, until that pod is saturated.
//!
//! A prompt's group is named by the hash of its leading `affinity_blocks`
//! blocks (a system prompt, the start of a conversation). Its *home* is the
//! candidate with the highest rendezvous weight for that name, so every
//! replica computes the same pod for a group it has never seen and replicas
//! build their caches on the same pods instead of scattering them. Hashing a
//! handful of groups over a few pods is lumpy (16 groups on two pods split
//! 10/6 or worse almost half the time), so a pod chosen first by more than
//! its share of groups ([`group_share`]: `loadBoundFactor` x the mean, rounded
//! down, at least the mean rounded up) keeps those that weigh the
//! most for it, and the others live at their next choice: which ones depends
//! on the groups seen, not on their order, so replicas agree on that too.
//!
//! A group goes home until its home is saturated by its engine's own signals
//! ([`saturation`]: a backlog of waiting requests, or a KV cache too full for
//! one more request of this size), not merely because a few of its requests
//! are in flight at once. Then it spills to a pod with room that this dataplane
//! already sent the group to (it holds the prefix; the longest match wins),
//! else to the next pod in the group's rendezvous order (the same on every
//! replica). The home stays the home: once it has room the group goes back,
//! instead of both pods scoring alike for ever and unrelated scorers
//! splitting the group between them.
//!
//! Scores: the pod chosen for the group 100; any other pod with room the
//! share of the prompt's blocks this dataplane last sent it (its local index),
//! scaled to [`HOLDER_SCORE`]; saturated pods 0. A pod without fresh engine
//! load is judged by this dataplane's in-flight requests: saturated above
//! `loadBoundFactor` x the mean (never below 2), the only signal left.

use std::sync::Arc;

use switchyard_snapshot::pb;
use switchyard_snapshot::scheduler::{self, SchedulerConfigError};

use super::super::prefix::{PrefixIndex, load_bound, nominate_rendezvous, rendezvous_weight};
use super::super::sample::PoolIds;
use super::super::saturation::{self, is_saturated};
use super::{
    Candidate, Implementation, MAX_SCORE, PluginContext, PluginInput, PluginScratch, PromptHashing,
    ScorePlugin, with_scratch,
};

pub const IMPLEMENTATION: Implementation =
    Implementation::scorer(&scheduler::prefix_cache::SPEC, build_scorer);

/// Highest score of a pod that holds part of the prompt but is not the one
/// chosen for its group: half, so that it ranks above pods holding nothing
/// when other scorers override the choice, and two such pods never tie with
/// the chosen one (the issue with scoring every holder by match length: after
/// one spill both pods hold the prefix, both score about 100, and least-request
/// or least-latency then split the group between them).
pub const HOLDER_SCORE: u32 = MAX_SCORE / 2;

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
        self.score_prompt(candidates, request.prompt_hashes, out);
    }

    fn prompt_hashing(&self) -> Option<PromptHashing> {
        Some(self.hashing)
    }

    /// The group's first rendezvous choices (its home and where it goes
    /// next), its recorded first choice, and the pods holding the prompt.
    fn nominate(&self, pool: PoolIds<'_>, request: &PluginInput<'_>, out: &mut Vec<usize>) {
        let hashes = request.prompt_hashes;
        let Some(key) = self.group_key(hashes) else {
            return;
        };
        nominate_rendezvous(key, pool, out);
        if let Some(first) = self.index.groups.first_choice(key)
            && let Some(position) = pool.position(first)
        {
            out.push(position);
        }
        // The pods holding the prompt: a handful, found by id, so no slot
        // per pod to zero and no pass over them all.
        let holders = out.len();
        self.index.each_match(
            hashes,
            pool.ids().len(),
            |owner| pool.position(owner),
            |position, _| {
                let new = !out[holders..].contains(&position);
                if new {
                    out.push(position);
                }
                new
            },
        );
    }

    /// Remembers where this prefix went (Kthena's PostSchedule).
    fn on_dispatched(&self, pod_id: u64, prompt_hashes: &[u64]) {
        if !prompt_hashes.is_empty() {
            self.index.record(prompt_hashes, pod_id);
        }
    }
}

impl PrefixCache {
    /// The name of the prompt's group: the hash of its first `affinity_blocks`
    /// blocks (or of the whole prompt, if shorter).
    fn group_key(&self, hashes: &[u64]) -> Option<u64> {
        let last = hashes.len().min(self.affinity_blocks).checked_sub(1)?;
        hashes.get(last).copied()
    }

    fn score_prompt(&self, candidates: &[Candidate], hashes: &[u64], out: &mut [u32]) {
        out.fill(0);
        let Some(key) = self.group_key(hashes) else {
            return;
        };
        let total = hashes.len();
        let key_block = self.affinity_blocks.clamp(1, total) - 1;
        let request_tokens = saturation::request_tokens(total, self.hashing.block_size);
        with_scratch(|scratch| {
            scratch.fill(candidates);
            self.index
                .matches(hashes, &scratch.ids, &mut scratch.matched);
            let home = self.home(key, scratch);
            let bound = load_bound(&scratch.loads, &scratch.eligible, self.load_bound_factor);
            // From here on `eligible` means "has room".
            for (i, candidate) in candidates.iter().enumerate() {
                let saturated = is_saturated(candidate.load.as_ref(), request_tokens)
                    .unwrap_or(scratch.loads[i] + 1.0 > bound);
                scratch.eligible[i] &= !saturated;
            }
            let room = &scratch.eligible;
            let matched = &scratch.matched;
            let chosen = match home {
                // The home with room ranks first by the key below: no need
                // to weigh every candidate.
                Some(home) if room[home] => Some(home),
                _ => (0..candidates.len()).filter(|&i| room[i]).max_by_key(|&i| {
                    (
                        Some(i) == home,
                        matched[i] > key_block,
                        matched[i],
                        rendezvous_weight(key, scratch.ids[i]),
                    )
                }),
            };
            for (i, slot) in out.iter_mut().enumerate() {
                if !room[i] {
                    continue;
                }
                *slot = if Some(i) == chosen {
                    MAX_SCORE
                } else if matched[i] == 0 {
                    // Most candidates hold nothing: no division for them.
                    0
                } else {
                    (matched[i] * HOLDER_SCORE as usize / total) as u32
                };
            }
        });
    }

    /// The group's home: the pod it chose first (the highest rendezvous
    /// weight for it when this dataplane first saw it), unless more than
    /// `loadBoundFactor` x the mean number of groups per candidate chose that
    /// pod and this group is among the lightest of them for it: then its next
    /// choice. Which groups move depends only on the groups seen, not on the
    /// order they came in, so dataplanes that have seen the same groups agree
    /// (bounded loads after Mirrokni et al., over groups).
    fn home(&self, key: u64, scratch: &PluginScratch) -> Option<usize> {
        let PluginScratch { ids, eligible, .. } = scratch;
        let choices = || (0..ids.len()).filter(|&i| eligible[i]);
        let weight = |i: usize| rendezvous_weight(key, ids[i]);
        // No candidate, no home (and the group is not recorded).
        let lowest = choices().next()?;
        // The rendezvous choice among the candidates, needed only for a
        // group seen for the first time, or whose first choice is not a
        // candidate now. Folded from the candidate known to exist, so there
        // is always one; of equal weights the last wins, as `max_by_key`.
        let best = || {
            choices()
                .skip(1)
                .map(|i| (weight(i), i))
                .fold((weight(lowest), lowest), |best, next| {
                    if next.0 >= best.0 { next } else { best }
                })
                .1
        };
        let mut current = None;
        let recorded = self.index.groups.observe_with(key, || {
            let chosen = best();
            current = Some(chosen);
            ids[chosen]
        });
        let first = choices()
            .find(|&i| ids[i] == recorded)
            .or(current)
            .unwrap_or_else(best);
        let standing = self.index.groups.standing(key, ids[first]);
        // The heaviest group of its pod (or its only one) stays whatever the
        // share, which is at least 1 when the pod has a group: no need to
        // count every candidate's groups (a lock and a lookup per candidate).
        if standing.lighter + 1 >= standing.groups {
            return Some(first);
        }
        let (groups, pods) = choices().fold((0, 0), |(groups, pods), i| {
            (groups + self.index.groups.chosen_by_count(ids[i]), pods + 1)
        });
        let share = group_share(groups, pods, self.load_bound_factor);
        if standing.lighter >= standing.groups.saturating_sub(share) {
            return Some(first);
        }
        choices()
            .filter(|&i| i != first)
            .max_by_key(|&i| weight(i))
            .or(Some(first))
    }
}

/// Groups a pod may be home to when `groups` groups share `pods` pods:
/// `factor` x the mean, rounded down, but never less than the mean rounded
/// up (else some groups would have no home). Rounding the slack down matters
/// with few groups, where one group is a large part of the load: rounding up,
/// 16 groups on two pods with 1.1 split 9/7 (56% of the requests on one
/// engine before any spill); now 8/8, while 100 groups may still split 55/45.
pub fn group_share(groups: usize, pods: usize, factor: f64) -> usize {
    let pods = pods.max(1);
    let mean = groups as f64 / pods as f64;
    ((factor * mean).floor() as usize).max(groups.div_ceil(pods))
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;

    use super::super::super::prefix::SharedPrefixIndex;
    use super::super::testing::{candidate, input};
    use super::*;
    use crate::pod::figures::EngineFigures;

    /// A scorer with its own index (one dataplane), 64-byte blocks, the
    /// group named by its first `affinity_blocks` blocks.
    fn scorer(affinity_blocks: usize) -> PrefixCache {
        PrefixCache {
            index: Arc::new(PrefixIndex::new(1000)),
            hashing: PromptHashing {
                block_size: 64,
                max_blocks: 128,
            },
            affinity_blocks,
            load_bound_factor: scheduler::prefix_cache::DEFAULT_LOAD_BOUND_FACTOR,
        }
    }

    fn scores(scorer: &PrefixCache, pods: &[Candidate], hashes: &[u64]) -> Vec<u32> {
        let mut out = vec![0; pods.len()];
        scorer.score_prompt(pods, hashes, &mut out);
        out
    }

    /// The one pod scoring 100.
    fn chosen(scores: &[u32]) -> usize {
        assert_eq!(
            scores.iter().filter(|s| **s == MAX_SCORE).count(),
            1,
            "{scores:?}"
        );
        scores
            .iter()
            .position(|s| *s == MAX_SCORE)
            .unwrap_or_default()
    }

    /// An engine with a 4096-token cache, `usage` of it in use, `waiting` queued.
    fn engine(waiting: f64, usage: f64) -> Option<pb::EndpointLoad> {
        Some(pb::EndpointLoad {
            requests_waiting: waiting,
            kv_cache_usage: usage,
            kv_cache_capacity_tokens: 4096,
            observed_at_unix_ms: 1,
            ..Default::default()
        })
    }

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
        let home = chosen(&out);
        let other = (home + 1) % 4;
        assert_eq!(out[other], 0);
        plugin.on_dispatched(pods[other].pod_id, &hashes);
        let next_snapshot = build_scorer(&context).expect("valid");
        next_snapshot.score(&pods, &input(&headers, &hashes), &mut out);
        assert_eq!(
            out[other], HOLDER_SCORE,
            "it holds the whole prompt, remembered across snapshots, but is not the home"
        );
        assert_eq!(out[home], MAX_SCORE);
    }

    #[test]
    fn unseen_prefix_goes_to_one_deterministic_pod() {
        let pods: Vec<_> = (0..4).map(|i| candidate(i, 0, None)).collect();
        let hashes = [5, 6, 7];
        let first = scores(&scorer(16), &pods, &hashes);
        chosen(&first);
        assert_eq!(first.iter().filter(|s| **s == 0).count(), 3, "{first:?}");
        assert_eq!(
            first,
            scores(&scorer(16), &pods, &hashes),
            "another dataplane, with an index of its own, agrees"
        );
    }

    #[test]
    fn holders_other_than_the_chosen_pod_score_by_match_length_up_to_half() {
        let scorer = scorer(1);
        let pods: Vec<_> = (0..4).map(|i| candidate(i, 0, None)).collect();
        let hashes = [5, 6, 7, 8];
        let home = chosen(&scores(&scorer, &pods, &hashes));
        let other = (home + 1) % 4;
        scorer.index.record(&hashes[..2], pods[other].pod_id);
        let out = scores(&scorer, &pods, &hashes);
        assert_eq!(out[other], HOLDER_SCORE / 2, "half the prompt: {out:?}");
        assert_eq!(out[home], MAX_SCORE);
    }

    #[test]
    fn a_group_stays_home_until_the_engine_is_saturated_and_then_comes_back() {
        let scorer = scorer(2);
        let hashes = [5, 6, 7, 8];
        let idle: Vec<_> = (0..2).map(|i| candidate(i, 0, engine(0.0, 0.1))).collect();
        let home = chosen(&scores(&scorer, &idle, &hashes));
        let away = 1 - home;
        scorer.on_dispatched(idle[home].pod_id, &hashes);

        // Four requests of the group in flight at home, none elsewhere: the
        // engine has room, so the group stays (the old in-flight bound spilled
        // the third).
        let mut pods = idle.clone();
        pods[home].in_flight = 4;
        pods[home].load = engine(0.0, 0.3).as_ref().map(EngineFigures::from);
        assert_eq!(chosen(&scores(&scorer, &pods, &hashes)), home);

        // The engine queues: the group spills, and the pod it spills to learns it.
        pods[home].load = engine(2.0, 0.6).as_ref().map(EngineFigures::from);
        let out = scores(&scorer, &pods, &hashes);
        assert_eq!((out[home], out[away]), (0, MAX_SCORE));
        scorer.on_dispatched(pods[away].pod_id, &hashes);

        // The queue drained: back home, although the other pod now holds the
        // prefix too and was sent it last.
        pods[home].load = engine(0.0, 0.3).as_ref().map(EngineFigures::from);
        let out = scores(&scorer, &pods, &hashes);
        assert_eq!((out[home], out[away]), (MAX_SCORE, HOLDER_SCORE));
    }

    #[test]
    fn a_full_kv_cache_saturates_before_the_engine_queues() {
        let scorer = scorer(16);
        // 18 blocks of 64 bytes: a request of about 288 tokens.
        let hashes: Vec<u64> = (100..118).collect();
        let mut pods: Vec<_> = (0..2).map(|i| candidate(i, 0, engine(0.0, 0.1))).collect();
        let home = chosen(&scores(&scorer, &pods, &hashes));
        pods[home].load = engine(0.0, 0.95).as_ref().map(EngineFigures::from);
        assert_eq!(scores(&scorer, &pods, &hashes)[home], 0, "205 tokens free");
        pods[home].load = engine(0.0, 0.1).as_ref().map(EngineFigures::from);
        pods[home].in_flight = 14;
        assert_eq!(
            scores(&scorer, &pods, &hashes)[home],
            MAX_SCORE,
            "requests in flight share the prefix: the engine's usage says there is room"
        );
    }

    #[test]
    fn a_spill_goes_to_a_pod_holding_the_group_else_the_next_in_rendezvous_order() {
        let scorer = scorer(2);
        let hashes = [5, 6, 7, 8];
        let mut pods: Vec<_> = (0..4).map(|i| candidate(i, 0, engine(0.0, 0.1))).collect();
        let home = chosen(&scores(&scorer, &pods, &hashes));
        pods[home].load = engine(1.0, 0.5).as_ref().map(EngineFigures::from);
        let next = chosen(&scores(&scorer, &pods, &hashes));
        assert_ne!(next, home);
        assert_eq!(
            next,
            chosen(&scores(&self::scorer(2), &pods, &hashes)),
            "every dataplane spills to the same pod"
        );
        let holder = (0..4)
            .find(|i| *i != home && *i != next)
            .unwrap_or_default();
        scorer.index.record(&hashes[..2], pods[holder].pod_id);
        assert_eq!(
            chosen(&scores(&scorer, &pods, &hashes)),
            holder,
            "a pod that already holds the group's blocks beats one that would start cold"
        );
    }

    #[test]
    fn groups_hashing_piles_on_one_pod_spread_the_same_way_on_every_dataplane() {
        let pods: Vec<_> = (0..2).map(|i| candidate(i, 0, engine(0.0, 0.1))).collect();
        // Eight groups that all weigh more for pod 0.
        let mut keys: Vec<u64> = (1..)
            .filter(|key| {
                rendezvous_weight(*key, pods[0].pod_id) > rendezvous_weight(*key, pods[1].pod_id)
            })
            .take(8)
            .collect();
        let homes = |scorer: &PrefixCache, keys: &[u64]| -> Vec<(u64, usize)> {
            for key in keys {
                scores(scorer, &pods, &[*key]);
            }
            let mut homes: Vec<_> = keys
                .iter()
                .map(|key| (*key, chosen(&scores(scorer, &pods, &[*key]))))
                .collect();
            homes.sort();
            homes
        };
        let one = homes(&scorer(1), &keys);
        let on_0: Vec<u64> = one
            .iter()
            .filter(|(_, pod)| *pod == 0)
            .map(|(k, _)| *k)
            .collect();
        assert_eq!(on_0.len(), 4, "1.1 x the mean of 4, rounded down: {one:?}");
        let lightest_kept = on_0
            .iter()
            .map(|key| rendezvous_weight(*key, pods[0].pod_id))
            .min();
        for (key, pod) in &one {
            if *pod == 1 {
                assert!(
                    Some(rendezvous_weight(*key, pods[0].pod_id)) < lightest_kept,
                    "pod 0 keeps the groups that weigh the most for it"
                );
            }
        }
        keys.reverse();
        assert_eq!(
            homes(&scorer(1), &keys),
            one,
            "another dataplane that saw the groups in another order agrees"
        );
    }

    #[test]
    fn few_groups_split_evenly_and_many_keep_the_factors_slack() {
        assert_eq!(group_share(16, 2, 1.1), 8, "not 9/7");
        assert_eq!(group_share(15, 2, 1.1), 8, "every group has a home");
        assert_eq!(group_share(100, 2, 1.1), 55);
        assert_eq!(group_share(3, 4, 1.1), 1);
        assert_eq!(group_share(0, 2, 1.1), 0);
        assert_eq!(group_share(10, 2, 2.0), 10);
    }

    #[test]
    fn without_engine_load_the_in_flight_bound_still_spills_a_hot_prefix() {
        let scorer = scorer(16);
        let hashes = [5, 6, 7, 8];
        let mut pods: Vec<_> = (0..4).map(|i| candidate(i, 1, None)).collect();
        let home = chosen(&scores(&scorer, &pods, &hashes));
        scorer.on_dispatched(pods[home].pod_id, &hashes);
        pods[home].in_flight = 10;
        let out = scores(&scorer, &pods, &hashes);
        assert_eq!(out[home], 0, "{out:?}");
        chosen(&out);
    }
}
