//! The engine figures a pick scores a pod on, published apart from its
//! whole load so that a pick reads them with plain loads.
//!
//! A pick among many pods reads the figures of each candidate. A handle to
//! the pod's `EndpointLoad` (an `Arc` behind an `ArcSwap`) costs locked
//! read-modify-writes on counters other threads share, to take it and to
//! give it back: a pick among 1000 pods whose engines all report loads
//! took 5.2 µs with such handles and takes 3.5 µs reading these
//! (`switchyard-bench-hotpath`). The figures are copied here when a load
//! arrives, once per scrape, and read back field by field. A pick that
//! reads while an update is being written may see some figures of each;
//! both are the pod's recent load, and scoring is a heuristic.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use switchyard_snapshot::pb;

/// What the scorers read of an engine's load (the fields of
/// [`pb::EndpointLoad`] of the same names).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineFigures {
    pub requests_waiting: f64,
    pub requests_running: f64,
    pub kv_cache_usage: f64,
    pub kv_cache_capacity_tokens: u64,
    pub ttft_seconds: f64,
    pub tpot_seconds: f64,
    /// 0 = observed in the latest scrape pass (see [`pb::EndpointLoad`]).
    pub observed_at_unix_ms: i64,
}

impl From<&pb::EndpointLoad> for EngineFigures {
    fn from(load: &pb::EndpointLoad) -> Self {
        Self {
            requests_waiting: load.requests_waiting,
            requests_running: load.requests_running,
            kv_cache_usage: load.kv_cache_usage,
            kv_cache_capacity_tokens: load.kv_cache_capacity_tokens,
            ttft_seconds: load.ttft_seconds,
            tpot_seconds: load.tpot_seconds,
            observed_at_unix_ms: load.observed_at_unix_ms,
        }
    }
}

/// A pod's latest [`EngineFigures`], written when its load changes and read
/// by every pick.
#[derive(Debug, Default)]
pub struct PublishedFigures {
    present: AtomicBool,
    /// `f64` bits, as the others below.
    requests_waiting: AtomicU64,
    requests_running: AtomicU64,
    kv_cache_usage: AtomicU64,
    kv_cache_capacity_tokens: AtomicU64,
    ttft_seconds: AtomicU64,
    tpot_seconds: AtomicU64,
    observed_at_unix_ms: AtomicI64,
}

impl PublishedFigures {
    pub fn publish(&self, figures: Option<EngineFigures>) {
        let Some(figures) = figures else {
            self.present.store(false, Ordering::Relaxed);
            return;
        };
        let float = |cell: &AtomicU64, value: f64| cell.store(value.to_bits(), Ordering::Relaxed);
        float(&self.requests_waiting, figures.requests_waiting);
        float(&self.requests_running, figures.requests_running);
        float(&self.kv_cache_usage, figures.kv_cache_usage);
        float(&self.ttft_seconds, figures.ttft_seconds);
        float(&self.tpot_seconds, figures.tpot_seconds);
        self.kv_cache_capacity_tokens
            .store(figures.kv_cache_capacity_tokens, Ordering::Relaxed);
        self.observed_at_unix_ms
            .store(figures.observed_at_unix_ms, Ordering::Relaxed);
        // Release, with the reader's acquire: a reader that sees the pod's
        // first figures present sees them, not the zeros before them.
        self.present.store(true, Ordering::Release);
    }

    pub fn read(&self) -> Option<EngineFigures> {
        if !self.present.load(Ordering::Acquire) {
            return None;
        }
        let float = |cell: &AtomicU64| f64::from_bits(cell.load(Ordering::Relaxed));
        Some(EngineFigures {
            requests_waiting: float(&self.requests_waiting),
            requests_running: float(&self.requests_running),
            kv_cache_usage: float(&self.kv_cache_usage),
            kv_cache_capacity_tokens: self.kv_cache_capacity_tokens.load(Ordering::Relaxed),
            ttft_seconds: float(&self.ttft_seconds),
            tpot_seconds: float(&self.tpot_seconds),
            observed_at_unix_ms: self.observed_at_unix_ms.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_figures_read_back_as_the_load_had_them() {
        let published = PublishedFigures::default();
        assert_eq!(published.read(), None);
        let load = pb::EndpointLoad {
            requests_waiting: 2.0,
            requests_running: 7.0,
            kv_cache_usage: 0.25,
            kv_cache_capacity_tokens: 4096,
            ttft_seconds: 0.125,
            tpot_seconds: 0.03,
            observed_at_unix_ms: 1_700_000_000_000,
            models: vec!["m".into()],
            ..Default::default()
        };
        let figures = EngineFigures::from(&load);
        published.publish(Some(figures));
        assert_eq!(published.read(), Some(figures));
        assert_eq!(figures.kv_cache_capacity_tokens, 4096);
        assert_eq!(figures.observed_at_unix_ms, 1_700_000_000_000);
        published.publish(None);
        assert_eq!(published.read(), None);
    }
}
