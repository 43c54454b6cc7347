//! `least-latency`: pods with low TTFT and TPOT. Each metric scores a pod by
//! how much slower it is than the fastest pod with data: within
//! [`DEAD_BAND`] of it 100, [`ZERO_SCORE_RATIO`] times its latency or more 0,
//! linear in between. The final score is `alpha x TTFT score + (1 - alpha) x
//! TPOT score`.
//!
//! The Kthena router min-max normalises each metric over the pods (100 for the
//! fastest, 0 for the slowest), which turns any difference into the full
//! range: with two pods a 3% difference in one scrape interval's mean is
//! 100 vs 0, enough to override a prefix-cache hit worth a whole prefill.
//! Here a pod must be measurably slower to lose points, and only twice as
//! slow loses them all.
//!
//! Pods without data (or with stale data) get, per metric, the mean score of
//! the pods that have data (50 when none has). The Kthena router gives them a
//! flat 50, which makes the only pod that served traffic in the last scrape
//! interval (score 100) win every request, and so keep being the only one with
//! data; the mean keeps such pods level instead.

use switchyard_snapshot::pb;
use switchyard_snapshot::scheduler::{self, SchedulerConfigError};

use super::{
    Candidate, Implementation, MAX_SCORE, PluginContext, PluginInput, ScorePlugin, round_score,
};

pub const IMPLEMENTATION: Implementation =
    Implementation::scorer(&scheduler::least_latency::SPEC, build_scorer);

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

/// Latency up to this fraction above the fastest pod's scores as the fastest:
/// a scrape interval's mean moves by several per cent with batching alone.
pub const DEAD_BAND: f64 = 0.1;

/// A pod with this multiple of the fastest pod's latency (or more) scores 0.
pub const ZERO_SCORE_RATIO: f64 = 2.0;

/// The score of `value` when the fastest pod has `fastest` (both > 0).
fn relative_score(value: f64, fastest: f64) -> f64 {
    let excess = value / fastest - 1.0;
    let span = ZERO_SCORE_RATIO - 1.0 - DEAD_BAND;
    f64::from(MAX_SCORE) * ((ZERO_SCORE_RATIO - 1.0 - excess) / span).clamp(0.0, 1.0)
}

pub fn score(candidates: &[Candidate], ttft_weight: f64, out: &mut [u32]) {
    let ttft = |c: &Candidate| c.load.as_ref().map(|l| l.ttft_seconds).filter(|v| *v > 0.0);
    let tpot = |c: &Candidate| c.load.as_ref().map(|l| l.tpot_seconds).filter(|v| *v > 0.0);
    // Both metrics in one pass: the fastest, and how many pods have data.
    let (mut fastest_ttft, mut fastest_tpot) = (None, None);
    let (mut with_ttft, mut with_tpot) = (0, 0);
    let faster = |fastest: Option<f64>, value: f64| Some(fastest.map_or(value, |f| value.min(f)));
    for candidate in candidates {
        if let Some(value) = ttft(candidate) {
            fastest_ttft = faster(fastest_ttft, value);
            with_ttft += 1;
        }
        if let Some(value) = tpot(candidate) {
            fastest_tpot = faster(fastest_tpot, value);
            with_tpot += 1;
        }
    }
    if fastest_ttft.is_none() && fastest_tpot.is_none() {
        // No pod has data (engines that export no latency, or none yet):
        // every pod scores the same.
        out.fill(round_score(NO_DATA_SCORE).min(MAX_SCORE));
        return;
    }
    // Per metric: the mean score of the pods with data, for the pods without
    // (not computed when every pod has data: no pod would use it).
    let neutral =
        |metric: &dyn Fn(&Candidate) -> Option<f64>, fastest: Option<f64>, with_data: usize| {
            let Some(fastest) = fastest else {
                return NO_DATA_SCORE;
            };
            if with_data == candidates.len() {
                return NO_DATA_SCORE;
            }
            let (sum, count) = candidates
                .iter()
                .filter_map(metric)
                .fold((0.0, 0.0), |(s, n), v| {
                    (s + relative_score(v, fastest), n + 1.0)
                });
            if count > 0.0 {
                sum / count
            } else {
                NO_DATA_SCORE
            }
        };
    let (ttft_neutral, tpot_neutral) = (
        neutral(&ttft, fastest_ttft, with_ttft),
        neutral(&tpot, fastest_tpot, with_tpot),
    );
    for (slot, candidate) in out.iter_mut().zip(candidates) {
        let ttft_score = match (ttft(candidate), fastest_ttft) {
            (Some(v), Some(fastest)) => relative_score(v, fastest),
            _ => ttft_neutral,
        };
        let tpot_score = match (tpot(candidate), fastest_tpot) {
            (Some(v), Some(fastest)) => relative_score(v, fastest),
            _ => tpot_neutral,
        };
        let s = ttft_weight * ttft_score + (1.0 - ttft_weight) * tpot_score;
        *slot = round_score(s).min(MAX_SCORE);
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

    fn scores(pods: &[Candidate], ttft_weight: f64) -> Vec<u32> {
        let mut out = vec![0; pods.len()];
        score(pods, ttft_weight, &mut out);
        out
    }

    #[test]
    fn fast_pods_win_and_no_data_is_neutral() {
        let pods = [
            candidate(0, 0, latency(0.1, 0.01)),
            candidate(1, 0, latency(0.5, 0.05)),
            candidate(2, 0, latency(0.3, 0.0)),
            candidate(3, 0, None),
        ];
        let out = scores(&pods, 0.5);
        assert_eq!(out[0], 100);
        assert_eq!(out[1], 0, "5x slower on both");
        assert_eq!(
            out[2], 25,
            "TTFT 3x the fastest (0), TPOT unknown (the mean, 50)"
        );
        assert_eq!(out[3], 42, "the mean of both: TTFT 33, TPOT 50");
        assert_eq!(scores(&pods, 0.0)[..2], [100, 0]);
    }

    #[test]
    fn a_few_per_cent_is_no_difference_and_twice_as_slow_is_all_of_it() {
        let pods = [
            candidate(0, 0, latency(0.100, 0.010)),
            candidate(1, 0, latency(0.104, 0.0108)),
        ];
        assert_eq!(scores(&pods, 0.5), [100, 100], "4% and 8% slower");
        let pods = [
            candidate(0, 0, latency(0.100, 0.010)),
            candidate(1, 0, latency(0.150, 0.010)),
            candidate(2, 0, latency(0.200, 0.010)),
        ];
        assert_eq!(
            scores(&pods, 1.0),
            [100, 56, 0],
            "50% slower: 40 points past the dead band out of 90"
        );
    }

    #[test]
    fn without_any_data_every_pod_scores_the_middle() {
        let pods = [
            candidate(0, 0, None),
            candidate(1, 3, latency(0.0, 0.0)),
            candidate(2, 0, None),
        ];
        for weight in [0.0, 0.3, 1.0] {
            assert_eq!(scores(&pods, weight), [50, 50, 50], "alpha {weight}");
        }
    }

    #[test]
    fn the_only_pod_with_data_does_not_win_by_default() {
        let pods = [candidate(0, 0, latency(0.2, 0.02)), candidate(1, 0, None)];
        let out = scores(&pods, 0.5);
        assert_eq!(out[0], out[1], "{out:?}");
    }
}
