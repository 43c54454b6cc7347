//! `least-request`: as a filter, pods whose engine queue is below a bound; as
//! a scorer, pods with the fewest requests.

use switchyard_snapshot::pb;
use switchyard_snapshot::scheduler::{self, SchedulerConfigError};

use super::{
    Candidate, FilterError, FilterPlugin, Implementation, MAX_SCORE, PluginContext, PluginInput,
    ScorePlugin, round_score, with_scratch,
};

pub const IMPLEMENTATION: Implementation =
    Implementation::filter_and_scorer(&scheduler::least_request::SPEC, build_filter, |_| {
        Ok(Box::new(LeastRequestScorer))
    });

fn build_filter(
    context: &PluginContext<'_>,
) -> Result<Box<dyn FilterPlugin>, SchedulerConfigError> {
    let args: pb::LeastRequestArgs = scheduler::plugin_args(context.config);
    Ok(Box::new(LeastRequestFilter {
        max_waiting_requests: args.max_waiting_requests(),
    }))
}

#[derive(Debug)]
struct LeastRequestFilter {
    max_waiting_requests: u32,
}

impl FilterPlugin for LeastRequestFilter {
    fn filter(
        &self,
        candidates: &mut Vec<Candidate>,
        _: &PluginInput<'_>,
    ) -> Result<(), FilterError> {
        filter(candidates, self.max_waiting_requests);
        Ok(())
    }

    /// A pod's own queue decides; only when every pod is over the bound are
    /// all kept, and a sample whose pods are all over it is a fleet mostly
    /// over it.
    fn judges_each_pod_alone(&self) -> bool {
        true
    }
}

#[derive(Debug)]
struct LeastRequestScorer;

impl ScorePlugin for LeastRequestScorer {
    fn score(&self, candidates: &[Candidate], _: &PluginInput<'_>, out: &mut [u32]) {
        score(candidates, out);
    }
}

/// Keeps pods whose fresh engine `waiting` is below `max_waiting`; pods with
/// unknown load stay. When every pod is over the bound, all stay: the filter
/// steers load, it does not shed it (rejecting would turn a spike into errors
/// while the queues drain on their own).
pub fn filter(candidates: &mut Vec<Candidate>, max_waiting: u32) {
    let under = |c: &Candidate| {
        c.load
            .as_ref()
            .is_none_or(|load| load.requests_waiting < f64::from(max_waiting))
    };
    if candidates.iter().any(under) {
        candidates.retain(under);
    }
}

/// Requests at which a pod scores 0 when no pod is busier. Scores are relative
/// to the busiest pod, as in the Kthena router, but never to fewer requests than
/// this: there, two pods with 1 and 0 requests score 0 and 100, so a single
/// request of difference outweighs a prefix-cache hit. Engines batch at least
/// this many sequences (8 is the smallest `--max-num-seqs` in this project's
/// real-engine setups; the engines' defaults are far larger), so here one
/// request costs 12 points.
pub const MIN_FULL_SCALE: f64 = 8.0;

/// The pod's load: the larger of this dataplane's in-flight count (current,
/// but only its own) and the engine's running + waiting (everyone's, but a
/// scrape old), plus the waiting queue again, because a queue means the pod is
/// already full. score = (scale - load) / scale x 100, where scale is the
/// busiest pod's load but at least [`MIN_FULL_SCALE`]; all idle = 100.
pub fn score(candidates: &[Candidate], out: &mut [u32]) {
    let load_of = |c: &Candidate| {
        let (engine, waiting) = c.load.as_ref().map_or((0.0, 0.0), |load| {
            let waiting = load.requests_waiting.max(0.0);
            (load.requests_running.max(0.0) + waiting, waiting)
        });
        (c.in_flight as f64).max(engine) + waiting
    };
    with_scratch(|scratch| {
        // Each load once: read again per candidate it cost as much as the score.
        let loads = &mut scratch.loads;
        loads.clear();
        loads.extend(candidates.iter().map(load_of));
        let scale = loads.iter().copied().fold(MIN_FULL_SCALE, f64::max);
        for (slot, load) in out.iter_mut().zip(loads.iter()) {
            *slot = round_score((scale - load) / scale * f64::from(MAX_SCORE));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::super::testing::{candidate, load};
    use super::*;

    #[test]
    fn filter_drops_queued_pods_but_never_all() {
        let mut pods = vec![
            candidate(0, 0, Some(load(12.0, 8.0, 0.5))),
            candidate(1, 0, Some(load(2.0, 8.0, 0.5))),
            candidate(2, 0, None),
        ];
        filter(&mut pods, 10);
        assert_eq!(pods.iter().map(|c| c.index).collect::<Vec<_>>(), [1, 2]);
        let mut all_queued = vec![candidate(0, 0, Some(load(12.0, 8.0, 0.5)))];
        filter(&mut all_queued, 10);
        assert_eq!(all_queued.len(), 1);
    }

    #[test]
    fn fewer_requests_score_higher() {
        let pods = [
            candidate(0, 0, Some(load(0.0, 0.0, 0.0))),
            candidate(1, 2, Some(load(0.0, 1.0, 0.0))),
            candidate(2, 0, Some(load(4.0, 8.0, 0.0))),
        ];
        let mut out = [0; 3];
        score(&pods, &mut out);
        assert_eq!(out[0], 100);
        assert!(out[1] > out[2], "{out:?}");
        assert_eq!(out[2], 0);
        let idle = [candidate(0, 0, None), candidate(1, 0, None)];
        let mut out = [0; 2];
        score(&idle, &mut out);
        assert_eq!(out, [100, 100]);
    }

    #[test]
    fn one_request_of_difference_costs_little() {
        let pods = [candidate(0, 1, None), candidate(1, 0, None)];
        let mut out = [0; 2];
        score(&pods, &mut out);
        assert_eq!(out, [88, 100], "not 0 and 100");
        let pods = [candidate(0, 3, None), candidate(1, 0, None)];
        score(&pods, &mut out);
        assert_eq!(out, [63, 100]);
    }
}
