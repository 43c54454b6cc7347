//! Which candidates a pick scores when there are many.
//!
//! Every scorer walks every candidate, and each candidate costs an engine-load
//! read and a few cache lines of pod state: among 1,000 pods that was nearly
//! all of a pick. Above [`SAMPLED_CANDIDATES`] candidates a pick scores a
//! window of that many healthy candidates plus the pods the scorers nominate
//! (an affinity's choice and the pods it falls back to: a prefix group's home
//! and the pods holding the prompt, a session's pod), so its cost no longer
//! grows with the pod count beyond one pass over the candidates' ids.
//!
//! The window is the next [`SAMPLED_CANDIDATES`] candidates from a start, ejected
//! pods skipped. The start moves by a stride coprime with the number of
//! candidates, so over that many picks every candidate starts one window;
//! equal pods then share requests evenly (the window's first pod wins ties),
//! and a pod that is less loaded than the rest of its window wins it (the
//! least-loaded of many random choices, which balances almost as well as the
//! least-loaded of all). The windows of a process start at a random offset,
//! so dataplane replicas do not walk the pods in step.

use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, OnceLock};

use switchyard_runtime::clock::Instant;

use crate::pod::PodState;
use crate::pod::outlier::EjectionClock;
use crate::routing::PodIds;

/// Candidates above which a pick scores a sample: the window's size. 64
/// healthy pods hold a pod as idle as the idlest of 1,000 most of the time,
/// and score in a few microseconds.
pub const SAMPLED_CANDIDATES: usize = 64;

/// The pods one pick chooses among: all of a server's, or a subset of them.
#[derive(Debug, Clone, Copy)]
pub enum Pool<'a> {
    /// The server's pods `0..n`.
    All(usize),
    /// The server's pods at these indices (an endpoint picker's hint, the
    /// decode pods of complete prefill/decode groups, a group's prefill pods).
    Among(&'a [usize]),
}

impl Pool<'_> {
    pub fn len(&self) -> usize {
        match self {
            Pool::All(count) => *count,
            Pool::Among(indices) => indices.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The server pod index at `position` of the pool.
    pub fn index(&self, position: usize) -> usize {
        match self {
            Pool::All(_) => position,
            Pool::Among(indices) => indices[position],
        }
    }

    /// The server pod indices of the pool, in order.
    pub fn indices(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.len()).map(|position| self.index(position))
    }
}

/// The ids of a pool's pods, as the scorers' `nominate` sees them: what
/// they nominate are positions in it.
#[derive(Debug, Clone, Copy)]
pub struct PoolIds<'a> {
    ids: &'a [u64],
    /// Set when the pool is a server's whole pod list.
    whole: Option<&'a PodIds>,
}

impl<'a> PoolIds<'a> {
    /// All of a server's pods.
    pub fn whole(ids: &'a PodIds) -> Self {
        Self {
            ids: ids.ids(),
            whole: Some(ids),
        }
    }

    /// Any list of ids (a subset of a server's pods, gathered per pick).
    pub fn among(ids: &'a [u64]) -> Self {
        Self { ids, whole: None }
    }

    pub fn ids(&self) -> &'a [u64] {
        self.ids
    }

    /// A number that names this exact list for the life of the process,
    /// when it has one (a server's whole list): what a per-thread cache of
    /// something computed from the ids keys it by.
    pub fn generation(&self) -> Option<u64> {
        self.whole.map(PodIds::generation)
    }

    /// The first position of the pod `id`: looked up in a server's whole
    /// list, searched in a gathered one.
    pub fn position(&self, id: u64) -> Option<usize> {
        match self.whole {
            Some(whole) => whole.position(id),
            None => self.ids.iter().position(|each| *each == id),
        }
    }
}

/// Fills `sample` with the server pod indices a pick of `turn` scores: a
/// window of up to [`SAMPLED_CANDIDATES`] pods of `pool` that are not
/// ejected, then the `nominated` positions of `pool` (sorted, no repeats)
/// not already in it.
/// Returns false, and leaves `sample` in no particular state, when the pool's
/// healthy pods cannot fill a window: the pick then scores the whole pool,
/// ejected pods included (they rank last).
pub fn fill(
    pods: &[Arc<PodState>],
    pool: Pool<'_>,
    nominated: &[usize],
    turn: usize,
    now: Instant,
    sample: &mut Vec<usize>,
) -> bool {
    sample.clear();
    let total = pool.len();
    if total <= SAMPLED_CANDIDATES {
        return false;
    }
    let start = window_start(turn, total);
    let now = EjectionClock::at(now);
    let mut position = start;
    // The window walks positions upwards (wrapping once), so the next
    // nominated position to skip is found by a cursor, not by a search of
    // the nominated list per position.
    let mut next_nominated = nominated.partition_point(|n| *n < start);
    for _ in 0..total {
        let index = pool.index(position);
        let is_nominated = nominated.get(next_nominated) == Some(&position);
        if is_nominated {
            next_nominated += 1;
        }
        if !is_nominated
            && pods
                .get(index)
                .is_some_and(|pod| !pod.health.is_ejected_at(now))
        {
            sample.push(index);
            if sample.len() == SAMPLED_CANDIDATES {
                sample.extend(nominated.iter().map(|position| pool.index(*position)));
                return true;
            }
        }
        position += 1;
        if position == total {
            position = 0;
            next_nominated = 0;
        }
    }
    false
}

/// The pool position the window of pick `turn` starts at.
fn window_start(turn: usize, total: usize) -> usize {
    let stride = coprime_stride(total) as u128;
    let offset = u128::from(process_offset());
    ((offset + (turn % total) as u128 * stride) % total as u128) as usize
}

/// The smallest stride of at least [`SAMPLED_CANDIDATES`] that is coprime
/// with `total`: stepping by it from any start visits every position once
/// in `total` steps, and consecutive windows do not overlap.
fn coprime_stride(total: usize) -> usize {
    (SAMPLED_CANDIDATES..)
        .find(|stride| gcd(*stride, total) == 1)
        .unwrap_or(1)
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// A random number fixed for the life of the process.
fn process_offset() -> u64 {
    static OFFSET: OnceLock<u64> = OnceLock::new();
    *OFFSET.get_or_init(|| RandomState::new().hash_one(std::process::id()))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::net::SocketAddr;

    use switchyard_runtime::clock;

    use super::*;

    fn pods(count: usize) -> Vec<Arc<PodState>> {
        PodState::numbered_for_tests(count, |i| {
            SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16))
        })
    }

    #[test]
    fn strides_are_coprime_so_every_position_starts_a_window() {
        for total in [65, 100, 128, 1000, 1024, 3 * 5 * 7 * 11 * 13] {
            let stride = coprime_stride(total);
            assert!(stride >= SAMPLED_CANDIDATES);
            assert_eq!(gcd(stride, total), 1, "{total}");
            let starts: HashSet<usize> = (0..total).map(|t| window_start(t, total)).collect();
            assert_eq!(starts.len(), total, "{total}");
        }
    }

    #[test]
    fn small_pools_are_not_sampled() {
        let pods = pods(SAMPLED_CANDIDATES);
        let mut sample = Vec::new();
        assert!(!fill(
            &pods,
            Pool::All(pods.len()),
            &[],
            0,
            clock::now(),
            &mut sample
        ));
    }

    #[test]
    fn a_window_of_healthy_pods_then_the_nominated_ones_once() {
        let pods = pods(200);
        let now = clock::now();
        let far = now + std::time::Duration::from_secs(60);
        for pod in pods.iter().step_by(2) {
            pod.health.eject_until(far);
        }
        let among: Vec<usize> = (0..200).rev().collect();
        let pool = Pool::Among(&among);
        let mut sample = Vec::new();
        for turn in 0..50 {
            // Positions 0 and 1 of the pool: pods 199 (healthy) and 198 (ejected).
            assert!(fill(&pods, pool, &[0, 1], turn, now, &mut sample));
            assert_eq!(sample.len(), SAMPLED_CANDIDATES + 2);
            let (window, nominated) = sample.split_at(SAMPLED_CANDIDATES);
            assert!(window.iter().all(|i| i % 2 == 1), "{window:?}");
            assert!(!window.contains(&199), "nominated pods are not repeated");
            assert_eq!(nominated, [199, 198], "nominated, even if ejected");
            assert_eq!(window.iter().collect::<HashSet<_>>().len(), window.len());
        }
    }

    #[test]
    fn nominated_pods_anywhere_in_the_window_are_not_repeated() {
        let pods = pods(100);
        let now = clock::now();
        let nominated: Vec<usize> = (0..100).step_by(7).collect();
        let mut sample = Vec::new();
        for turn in 0..100 {
            // Windows start everywhere, so some wrap past the end of the pool.
            assert!(fill(
                &pods,
                Pool::All(100),
                &nominated,
                turn,
                now,
                &mut sample
            ));
            let (window, tail) = sample.split_at(SAMPLED_CANDIDATES);
            assert_eq!(tail, nominated, "turn {turn}");
            assert!(window.iter().all(|i| i % 7 != 0), "turn {turn}: {window:?}");
            assert_eq!(
                sample.iter().collect::<HashSet<_>>().len(),
                sample.len(),
                "turn {turn}"
            );
        }
    }

    #[test]
    fn too_few_healthy_pods_to_fill_a_window_score_the_whole_pool() {
        let pods = pods(100);
        let now = clock::now();
        let far = now + std::time::Duration::from_secs(60);
        for pod in &pods[SAMPLED_CANDIDATES / 2..] {
            pod.health.eject_until(far);
        }
        let mut sample = Vec::new();
        assert!(!fill(&pods, Pool::All(100), &[], 3, now, &mut sample));
    }
}
