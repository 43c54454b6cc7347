//! Per-pod state that outlives snapshots: identity, the latest engine load
//! pushed by the controller, and outlier ejection ([`outlier`]). The
//! in-flight counter lives in [`ledger`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwapOption;
use switchyard_runtime::clock::Instant;
use switchyard_snapshot::pb;

pub mod figures;
pub mod ledger;
pub mod outlier;

use self::figures::{EngineFigures, PublishedFigures};
use self::ledger::InFlight;
pub use self::ledger::InFlightGuard;
use self::outlier::PodHealth;

/// State of one pod that outlives snapshots.
#[derive(Debug)]
pub struct PodState {
    /// `namespace/name`, and `:port` for an InferencePool endpoint (a pod
    /// with several target ports is one endpoint per port).
    pub key: String,
    /// `namespace/name` of the pod: the engine load the controller pushes
    /// for the pod applies to each of its endpoints.
    pub load_key: String,
    pub name: String,
    pub addr: SocketAddr,
    /// `ip:port`, ready to use as the upstream URI authority.
    pub authority: http::uri::Authority,
    /// Hash of `key`: the pod's identity in prefix indexes and rendezvous hashing,
    /// the same on every dataplane.
    pub id: u64,
    in_flight: InFlight,
    /// Latest engine load pushed by the controller, if any.
    load: ArcSwapOption<pb::EndpointLoad>,
    /// What a pick reads of `load`.
    figures: PublishedFigures,
    /// The engine's requests (running + waiting) that were not this
    /// dataplane's when its latest load arrived: other dataplanes' share.
    load_from_elsewhere: AtomicU64,
    /// Failures in a row and ejections.
    pub health: PodHealth,
}

/// A pod is named by its key (in logs, for one).
impl std::fmt::Display for PodState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key)
    }
}

impl PodState {
    pub fn new(key: String, name: String, addr: SocketAddr) -> Result<Self, http::uri::InvalidUri> {
        Self::endpoint(key.clone(), key, name, addr)
    }

    /// Pod `default/<name>` at `addr`, for tests.
    #[cfg(test)]
    pub(crate) fn for_tests(name: &str, addr: SocketAddr) -> Arc<Self> {
        Arc::new(Self::new(format!("default/{name}"), name.to_owned(), addr).expect("valid pod"))
    }

    /// `count` pods `default/p0`, `default/p1`, ... at `addr(i)`, for tests.
    #[cfg(test)]
    pub(crate) fn numbered_for_tests(
        count: usize,
        addr: impl Fn(usize) -> SocketAddr,
    ) -> Vec<Arc<Self>> {
        (0..count)
            .map(|i| Self::for_tests(&format!("p{i}"), addr(i)))
            .collect()
    }

    /// An endpoint `key` of the pod `load_key` (see [`PodState::key`]).
    pub fn endpoint(
        key: String,
        load_key: String,
        name: String,
        addr: SocketAddr,
    ) -> Result<Self, http::uri::InvalidUri> {
        let authority = http::uri::Authority::try_from(addr.to_string())?;
        Ok(Self {
            id: xxhash_rust::xxh3::xxh3_64(key.as_bytes()),
            key,
            load_key,
            name,
            addr,
            authority,
            in_flight: InFlight::default(),
            load: ArcSwapOption::empty(),
            figures: PublishedFigures::default(),
            load_from_elsewhere: AtomicU64::new(0),
            health: PodHealth::default(),
        })
    }

    /// Requests this dataplane has sent to the pod that have not finished.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.get()
    }

    pub fn load(&self) -> Option<Arc<pb::EndpointLoad>> {
        self.load.load_full()
    }

    pub fn set_load(&self, load: Option<Arc<pb::EndpointLoad>>) {
        let engine = load.as_ref().map_or(0.0, |load| {
            (load.requests_running + load.requests_waiting).max(0.0)
        });
        // Engine counts are whole numbers; `as` saturates anything else.
        let elsewhere = (engine.round() as u64).saturating_sub(self.in_flight());
        self.load_from_elsewhere.store(elsewhere, Ordering::Relaxed);
        self.figures
            .publish(load.as_deref().map(EngineFigures::from));
        self.load.store(load);
    }

    /// The figures of the latest engine load, if any, whatever their age.
    pub fn figures(&self) -> Option<EngineFigures> {
        self.figures.read()
    }

    /// Requests on the pod's engine that this dataplane did not send, as of
    /// the latest load (the fairness queue's view of other dataplanes).
    pub fn load_from_elsewhere(&self) -> u64 {
        self.load_from_elsewhere.load(Ordering::Relaxed)
    }

    /// Ejected by outlier detection (this dataplane's or the fleet's).
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.health.is_ejected(now)
    }
}

/// A load observed at `observed_at_unix_ms` (0 = unknown) is fresh at `now_unix_ms`.
pub fn is_fresh(observed_at_unix_ms: i64, now_unix_ms: i64, max_age_ms: u64) -> bool {
    observed_at_unix_ms > 0
        && now_unix_ms.saturating_sub(observed_at_unix_ms)
            <= i64::try_from(max_age_ms).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staleness_uses_the_observation_time() {
        assert!(is_fresh(1_000, 1_500, 1_000));
        assert!(is_fresh(1_000, 2_000, 1_000));
        assert!(!is_fresh(1_000, 2_001, 1_000));
        assert!(!is_fresh(0, 10, 1_000), "never observed is not fresh");
    }
}
