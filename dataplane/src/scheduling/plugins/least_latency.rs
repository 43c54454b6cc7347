//! `least-latency`: pods with low TTFT and TPOT. Each metric is min-max
//! normalised over the pods that have data (100 = fastest); the final score
//! is `alpha x TTFT score + (1 - alpha) x TPOT score`. Pods without data (or
//! with stale data) get 50 and do not move the min / max, as in the reference.

use super::{Candidate, MAX_SCORE};

/// Score of a pod the metric says nothing about.
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
    let normalised = |value: Option<f64>, range: Option<(f64, f64)>| match (value, range) {
        (Some(v), Some((lo, hi))) if hi > lo => f64::from(MAX_SCORE) * (hi - v) / (hi - lo),
        (Some(_), Some(_)) => f64::from(MAX_SCORE),
        _ => NO_DATA_SCORE,
    };
    for (slot, candidate) in out.iter_mut().zip(candidates) {
        let s = ttft_weight * normalised(ttft(candidate), ttft_range)
            + (1.0 - ttft_weight) * normalised(tpot(candidate), tpot_range);
        *slot = s.round().clamp(0.0, f64::from(MAX_SCORE)) as u32;
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::candidate;
    use super::*;
    use switchyard_snapshot::pb;

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
}
