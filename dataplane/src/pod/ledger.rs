//! The load ledger: the one place that counts this dataplane's in-flight
//! requests per pod.
//!
//! A request is counted by taking an [`InFlightGuard`] before it is sent to a
//! pod; the count goes down when the guard is dropped, which happens exactly
//! once whatever the path: the attempt fails (the guard is dropped before the
//! next attempt takes its own), the response body ends (the body drops it),
//! or the client goes away (hyper drops the body, and with it the guard).
//! Ownership makes "exactly once" a property of the types rather than of
//! every call site.
//!
//! The count is kept per traffic worker ([`PerWorker`]): a request changes
//! only its own worker's counter, so workers never contend for a pod's
//! count, and scoring reads the sum, the whole dataplane's in-flight
//! requests on the pod, as a single counter would give.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::PodState;
use crate::per_worker::PerWorker;

/// A pod's in-flight counter. Only [`InFlightGuard`] changes it.
#[derive(Debug, Default)]
pub struct InFlight(PerWorker<AtomicU64>);

impl InFlight {
    /// Every worker's requests on the pod.
    pub fn get(&self) -> u64 {
        self.0
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .sum()
    }
}

impl PodState {
    /// Counts a request as in flight on this pod until the returned guard is dropped.
    pub fn begin_request(self: &Arc<Self>) -> InFlightGuard {
        let slot = self.in_flight.0.local_index();
        self.in_flight.0.slot(slot).fetch_add(1, Ordering::Relaxed);
        InFlightGuard {
            pod: self.clone(),
            slot,
        }
    }
}

/// One in-flight request on one pod; dropping it ends the request.
/// Deliberately not `Clone`: one guard, one decrement.
#[derive(Debug)]
pub struct InFlightGuard {
    pod: Arc<PodState>,
    /// The worker counter it incremented (decremented there even if the
    /// guard is dropped on another thread).
    slot: usize,
}

impl InFlightGuard {
    pub fn pod(&self) -> &Arc<PodState> {
        &self.pod
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        // Every guard was counted once by `begin_request`, so this cannot go
        // below zero; `fetch_update` keeps even a logic error from wrapping
        // the counter to 2^64 and making the pod look infinitely busy.
        let _ = self.pod.in_flight.0.slot(self.slot).fetch_update(
            Ordering::Relaxed,
            Ordering::Relaxed,
            |n| n.checked_sub(1),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn pod(name: &str, port: u16) -> Arc<PodState> {
        PodState::for_tests(name, SocketAddr::from(([127, 0, 0, 1], port)))
    }

    #[test]
    fn guard_counts_in_flight_once() {
        let p = pod("a", 1);
        let g1 = p.begin_request();
        let g2 = p.begin_request();
        assert_eq!(p.in_flight(), 2);
        drop(g1);
        assert_eq!(p.in_flight(), 1);
        drop(g2);
        assert_eq!(p.in_flight(), 0);
    }

    /// Where a request is in its life, as the proxy drives it.
    enum Stage {
        /// Sent to a pod, waiting for response headers: the attempt holds the guard.
        Dispatched(InFlightGuard, u32),
        /// Headers arrived; the response body (streaming or not) holds the guard.
        Streaming(Option<InFlightGuard>),
    }

    /// Random interleavings of dispatch / complete / abort / retry / client
    /// disconnect over several pods and many concurrent requests: the ledger
    /// never goes below zero, always equals the live requests per pod, and
    /// returns to zero at the end. 200 seeds x 2000 steps.
    #[test]
    fn random_interleavings_return_to_zero_and_never_go_negative() {
        for seed in 0..200u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let pods: Vec<_> = (0..4).map(|i| pod(&format!("p{i}"), i + 1)).collect();
            let mut live: Vec<Stage> = Vec::new();
            for _ in 0..2000 {
                let action = rng.random_range(0..6);
                match action {
                    // dispatch a new request
                    0 | 1 => {
                        let target = &pods[rng.random_range(0..pods.len())];
                        live.push(Stage::Dispatched(target.begin_request(), 0));
                    }
                    _ if live.is_empty() => {}
                    // the attempt failed: maybe retry on another pod, maybe give up
                    2 => {
                        let index = rng.random_range(0..live.len());
                        let retries = match &live[index] {
                            Stage::Dispatched(_, retries) => Some(*retries),
                            Stage::Streaming(_) => None,
                        };
                        if let Some(retries) = retries {
                            drop(live.swap_remove(index));
                            if retries < 3 && rng.random_bool(0.7) {
                                let target = &pods[rng.random_range(0..pods.len())];
                                live.push(Stage::Dispatched(target.begin_request(), retries + 1));
                            }
                        }
                    }
                    // headers arrived: the guard moves into the body
                    3 => {
                        let index = rng.random_range(0..live.len());
                        if let Stage::Dispatched(..) = &live[index]
                            && let Stage::Dispatched(guard, _) = live.swap_remove(index)
                        {
                            live.push(Stage::Streaming(Some(guard)));
                        }
                    }
                    // the body ended: the guard is released, the body lives on until dropped
                    4 => {
                        let index = rng.random_range(0..live.len());
                        if let Stage::Streaming(guard) = &mut live[index] {
                            guard.take();
                        }
                    }
                    // the client disconnected (or the finished body is dropped)
                    _ => {
                        let index = rng.random_range(0..live.len());
                        live.swap_remove(index);
                    }
                }
                for p in &pods {
                    let expected = live
                        .iter()
                        .filter(|stage| match stage {
                            Stage::Dispatched(guard, _) => Arc::ptr_eq(guard.pod(), p),
                            Stage::Streaming(Some(guard)) => Arc::ptr_eq(guard.pod(), p),
                            Stage::Streaming(None) => false,
                        })
                        .count() as u64;
                    assert_eq!(p.in_flight(), expected, "seed {seed}");
                    assert!(p.in_flight() < 1 << 32, "seed {seed}: wrapped below zero");
                }
            }
            live.clear();
            for p in &pods {
                assert_eq!(p.in_flight(), 0, "seed {seed}");
            }
        }
    }
}
