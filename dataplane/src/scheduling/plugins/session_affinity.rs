//! `session-affinity`: requests carrying the same session header go to the
//! same pod. The pod is chosen by rendezvous hashing of the session id, so
//! every dataplane replica agrees without shared state, and a session whose
//! pod is gone moves to the next pod in its order (the others keep theirs).
//! A pod over the load bound is passed over the same way, so one heavy
//! session cannot saturate its pod. Requests without the header score 0 everywhere.

use super::super::prefix::bounded_rendezvous;
use super::{Candidate, MAX_SCORE, with_scratch};

pub fn score(candidates: &[Candidate], session_key: Option<u64>, factor: f64, out: &mut [u32]) {
    out.fill(0);
    let Some(key) = session_key else {
        return;
    };
    with_scratch(|scratch| {
        scratch.fill(candidates);
        if let Some(chosen) =
            bounded_rendezvous(key, &scratch.ids, &scratch.loads, &scratch.eligible, factor)
        {
            out[chosen] = MAX_SCORE;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::super::testing::candidate;
    use super::*;

    #[test]
    fn same_session_same_pod_until_it_is_gone_or_overloaded() {
        let mut pods: Vec<_> = (0..4).map(|i| candidate(i, 0, None)).collect();
        let mut out = [0; 4];
        score(&pods, Some(42), 1.25, &mut out);
        let home = out.iter().position(|s| *s == 100).expect("a pod");
        score(&pods, Some(42), 1.25, &mut out);
        assert_eq!(out[home], 100);
        pods[home].in_flight = 20;
        score(&pods, Some(42), 1.25, &mut out);
        assert_eq!(out[home], 0, "overloaded home is passed over");
        pods[home].in_flight = 0;
        pods[home].ejected = true;
        score(&pods, Some(42), 1.25, &mut out);
        assert_eq!(out[home], 0, "failing home is passed over");
        score(&pods, None, 1.25, &mut out);
        assert_eq!(out, [0; 4]);
    }
}
