//! `gpu-usage`: pods with free KV cache; score = (1 - usage) x 100.

use switchyard_snapshot::scheduler;

use super::{
    Candidate, Implementation, MAX_SCORE, PluginInput, ScorePlugin, fill_unknown, round_score,
};

pub const IMPLEMENTATION: Implementation =
    Implementation::scorer(&scheduler::gpu_usage::SPEC, |_| Ok(Box::new(GpuUsage)));

#[derive(Debug)]
struct GpuUsage;

impl ScorePlugin for GpuUsage {
    fn score(&self, candidates: &[Candidate], _: &PluginInput<'_>, out: &mut [u32]) {
        score(candidates, out);
    }
}

pub fn score(candidates: &[Candidate], out: &mut [u32]) {
    let mut unknown = false;
    for (slot, candidate) in out.iter_mut().zip(candidates) {
        *slot = match &candidate.load {
            Some(load) => {
                round_score((1.0 - load.kv_cache_usage.clamp(0.0, 1.0)) * f64::from(MAX_SCORE))
            }
            None => {
                unknown = true;
                0
            }
        };
    }
    // Usually every pod has fresh load, and there is nothing to fill.
    if unknown {
        fill_unknown(out, candidates, |c| c.load.is_some());
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{candidate, load};
    use super::*;

    #[test]
    fn free_cache_scores_higher_and_unknown_is_neutral() {
        let pods = [
            candidate(0, 0, Some(load(0.0, 0.0, 0.9))),
            candidate(1, 0, Some(load(0.0, 0.0, 0.1))),
            candidate(2, 0, None),
        ];
        let mut out = [0; 3];
        score(&pods, &mut out);
        assert_eq!(out, [10, 90, 50]);
    }
}
