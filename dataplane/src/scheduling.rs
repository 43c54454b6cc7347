//! Picking a pod of a ModelServer, and counting this dataplane's in-flight
//! requests per pod.
//!
//! Per-pod state lives in [`PodState`], shared by every snapshot that contains
//! the pod, so a snapshot swap never resets its counters.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use switchyard_snapshot::pb;

/// How long a pod whose connection failed is avoided by this dataplane: long
/// enough to stop sending it traffic until the controller's next snapshot
/// (pods are scraped every second) drops it, short enough that a pod that
/// merely restarted gets traffic back soon.
pub const CONNECT_FAILURE_EJECTION: Duration = Duration::from_secs(5);

/// State of one pod that outlives snapshots.
#[derive(Debug)]
pub struct PodState {
    /// `namespace/name`.
    pub key: String,
    pub name: String,
    pub addr: SocketAddr,
    /// `ip:port`, ready to use as the upstream URI authority.
    pub authority: http::uri::Authority,
    in_flight: AtomicU64,
    /// Latest engine load pushed by the controller, if any.
    load: ArcSwapOption<pb::EndpointLoad>,
    /// Until when (ms on [`monotonic_ms`]'s clock) a connect failure ejected this pod; 0 = never.
    ejected_until_ms: AtomicU64,
}

impl PodState {
    pub fn new(key: String, name: String, addr: SocketAddr) -> Result<Self, http::uri::InvalidUri> {
        let authority = http::uri::Authority::try_from(addr.to_string())?;
        Ok(Self {
            key,
            name,
            addr,
            authority,
            in_flight: AtomicU64::new(0),
            load: ArcSwapOption::empty(),
            ejected_until_ms: AtomicU64::new(0),
        })
    }

    /// Requests this dataplane has sent to the pod that have not finished.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request as in flight until the returned guard is dropped.
    pub fn begin_request(self: &Arc<Self>) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlightGuard { pod: self.clone() }
    }

    pub fn load(&self) -> Option<Arc<pb::EndpointLoad>> {
        self.load.load_full()
    }

    pub fn set_load(&self, load: Option<Arc<pb::EndpointLoad>>) {
        self.load.store(load);
    }

    /// Avoid this pod for [`CONNECT_FAILURE_EJECTION`].
    pub fn eject(&self, now: Instant) {
        let until = monotonic_ms(now + CONNECT_FAILURE_EJECTION);
        self.ejected_until_ms.fetch_max(until, Ordering::Relaxed);
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        monotonic_ms(now) < self.ejected_until_ms.load(Ordering::Relaxed)
    }
}

/// Milliseconds since the first call in this process, so an instant fits in an atomic.
fn monotonic_ms(at: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    // +1 so that no real instant maps to 0 ("never ejected").
    at.saturating_duration_since(epoch).as_millis() as u64 + 1
}

/// Decrements the pod's in-flight count exactly once, when dropped: at the end
/// of the response body, on client disconnect, or when the attempt fails.
#[derive(Debug)]
pub struct InFlightGuard {
    pod: Arc<PodState>,
}

impl InFlightGuard {
    pub fn pod(&self) -> &Arc<PodState> {
        &self.pod
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.pod.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Orders a ModelServer's pods for one request: healthy pods first, fewest
/// in-flight requests first; ties rotate so equal pods share the load.
/// `skip` holds pods already tried by this request.
pub fn pick_pod<'a>(
    pods: &'a [Arc<PodState>],
    rotation: &AtomicUsize,
    skip: &[Arc<PodState>],
    now: Instant,
) -> Option<&'a Arc<PodState>> {
    if pods.is_empty() {
        return None;
    }
    let start = rotation.fetch_add(1, Ordering::Relaxed) % pods.len();
    let mut best: Option<(&Arc<PodState>, (bool, u64))> = None;
    for offset in 0..pods.len() {
        let pod = &pods[(start + offset) % pods.len()];
        if skip.iter().any(|tried| Arc::ptr_eq(tried, pod)) {
            continue;
        }
        let rank = (pod.is_ejected(now), pod.in_flight());
        if best.is_none_or(|(_, best_rank)| rank < best_rank) {
            best = Some((pod, rank));
        }
    }
    best.map(|(pod, _)| pod)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, port: u16) -> Arc<PodState> {
        Arc::new(
            PodState::new(
                format!("default/{name}"),
                name.into(),
                SocketAddr::from(([127, 0, 0, 1], port)),
            )
            .expect("valid"),
        )
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

    #[test]
    fn picks_least_in_flight_and_avoids_ejected_and_tried() {
        let (a, b, c) = (pod("a", 1), pod("b", 2), pod("c", 3));
        let pods = vec![a.clone(), b.clone(), c.clone()];
        let rotation = AtomicUsize::new(0);
        let now = Instant::now();
        let _busy_a = a.begin_request();
        let _busy_c = (c.begin_request(), c.begin_request());
        let chosen = pick_pod(&pods, &rotation, &[], now).expect("pod");
        assert_eq!(chosen.name, "b");
        b.eject(now);
        let chosen = pick_pod(&pods, &rotation, &[], now).expect("pod");
        assert_eq!(chosen.name, "a", "ejected pods come last");
        let chosen = pick_pod(&pods, &rotation, std::slice::from_ref(&a), now).expect("pod");
        assert_eq!(
            chosen.name, "c",
            "tried pods are skipped; ejected b ranks after c"
        );
        assert!(pick_pod(&pods, &rotation, &pods, now).is_none());
    }

    #[test]
    fn equal_pods_share_requests() {
        let pods = vec![pod("a", 1), pod("b", 2), pod("c", 3)];
        let rotation = AtomicUsize::new(0);
        let now = Instant::now();
        let mut counts = std::collections::HashMap::new();
        for _ in 0..30 {
            let chosen = pick_pod(&pods, &rotation, &[], now).expect("pod");
            *counts.entry(chosen.name.clone()).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 3);
        assert!(counts.values().all(|&n| n == 10), "{counts:?}");
    }
}
