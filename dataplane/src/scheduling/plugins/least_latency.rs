//! `least-latency`: pods with low TTFT and TPOT. Each metric is min-max
//! normalised over the pods that have data (100 = fastest); the final score
//! is `alpha x TTFT score + (1 - alpha) x TPOT score`. Pods without data (or
//! with stale data) do not move the min / max and get, per metric, the mean
//! score of the pods that have data (50 when none has). The Kthena router gives
//! them a flat 50, which makes the only pod that served traffic in the last
//! scrape interval (score 100) win every request, and so keep being the only
//! one with data; the mean keeps such pods level instead.

use switchyard_snapshot::pb;
use switchyard_snapshot::scheduler::{self, SchedulerConfigError};

use super::{Candidate, Implementation, MAX_SCORE, PluginContext, PluginInput, ScorePlugin};

pub const IMPLEMENTATION: Implementation = Implementation {
    spec: &scheduler::least_latency::SPEC,
    filter: None,
    score: Some(build_scorer),
};

fn build_scorer(context: &PluginContext<'_>) -> Result<Box<dyn ScorePlugin>, SchedulerConfigError> {
    let args: pb::LeastLatencyArgs = scheduler::plugin_args(context.config);
    Ok(Box::new(LeastLatency {
        ttft_weight: args.ttft_tpot_weight_factor(),
    }))
}

#[derive(Debug)]
struct LeastLatency {
    /// α: the weight of TTFT against TPOT.
    ttft_weight: f64,
}

impl ScorePlugin for LeastLatency {
    fn score(&self, candidates: &[Candidate], _: &PluginInput<'_>, out: &mut [u32]) {
        score(candidates, self.ttft_weight, out);
    }
}

/// Score for a metric no pod has data for.
const NO_DATA_SCORE: f64 = 50.0;

pub fn score(candidates: &[Candidate], ttft_weight: f64, out: &mut [u32]) {
    let ttft = |c: &Candidate| c.load.as_ref().map(|l| l.ttft_seconds).filter(|v| *v > 0.0);
    let tpot = |c: &Candidate| c.load.as_ref().map(|l| l.tpot_seconds).filter(|v| *v > 0.0);
    let range = |metric: &dyn Fn(&Candidate) -> Option<f64>| {
        candidates
            .iter()
            .filter_map(metric)
            .fold(None, |acc: Option<(f64, f64)>, v| {
                Some(acc.map_or((v, v), |(lo, hi)| (lo.min(v), hi.max(v))))
            })
    };
    let (ttft_range, tpot_range) = (range(&ttft), range(&tpot));
    let normalised = |value: f64, (lo, hi): (f64, f64)| {
        if hi > lo {
            f64::from(MAX_SCORE) * (hi - value) / (hi - lo)
        } else {
            f64::from(MAX_SCORE)
        }
    };
    // Per metric: the mean score of the pods with data, for the pods without.
    let neutral = |metric: &dyn Fn(&Candidate) -> Option<f64>, range: Option<(f64, f64)>| {
        let Some(range) = range else {
            return NO_DATA_SCORE;
        };
        let (sum, count) = candidates
            .iter()
            .filter_map(metric)
            .fold((0.0, 0.0), |(s, n), v| (s + normalised(v, range), n + 1.0));
        if count > 0.0 {
            sum / count
        } else {
            NO_DATA_SCORE
        }
    };
    let (ttft_neutral, tpot_neutral) = (neutral(&ttft, ttft_range), neutral(&tpot, tpot_range));
    for (slot, candidate) in out.iter_mut().zip(candidates) {
        let ttft_score = match (ttft(candidate), ttft_range) {
            (Some(v), Some(range)) => normalised(v, range),
            _ => ttft_neutral,
        };
        let tpot_score = match (tpot(candidate), tpot_range) {
            (Some(v), Some(range)) => normalised(v, range),
            _ => tpot_neutral,
        };
        let s = ttft_weight * ttft_score + (1.0 - ttft_weight) * tpot_score;
        *slot = s.round().clamp(0.0, f64::from(MAX_SCORE)) as u32;
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::candidate;
    use super::*;

    fn latency(ttft: f64, tpot: f64) -> Option<pb::EndpointLoad> {
        Some(pb::EndpointLoad {
            ttft_seconds: ttft,
            tpot_seconds: tpot,
            observed_at_unix_ms: 1,
            ..Default::default()
        })
    }

    #[test]
    fn fast_pods_win_and_no_data_is_neutral() {
        let pods = [
            candidate(0, 0, latency(0.1, 0.01)),
            candidate(1, 0, latency(0.5, 0.05)),
            candidate(2, 0, latency(0.3, 0.0)),
            candidate(3, 0, None),
        ];
        let mut out = [0; 4];
        score(&pods, 0.5, &mut out);
        assert_eq!(out[0], 100);
        assert_eq!(out[1], 0);
        assert_eq!(out[2], 50, "TTFT halfway (50), TPOT unknown (50)");
        assert_eq!(out[3], 50);
        score(&pods, 1.0, &mut out);
        assert_eq!(out[2], 50);
        score(&pods, 0.0, &mut out);
        assert_eq!((out[0], out[1]), (100, 0));
    }

    #[test]
    fn the_only_pod_with_data_does_not_win_by_default() {
        let pods = [candidate(0, 0, latency(0.2, 0.02)), candidate(1, 0, None)];
        let mut out = [0; 2];
        score(&pods, 0.5, &mut out);
        assert_eq!(out[0], out[1], "{out:?}");
    }
}
