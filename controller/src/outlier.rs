//! Pod ejections reported by dataplanes (their outlier detection), merged
//! into one board the compile loop ships to every dataplane inside
//! EndpointLoads: a pod one dataplane found bad is avoided by all of them
//! after one push, instead of each finding out by failing requests of its
//! own.
//!
//! A report is the whole set of pods its dataplane ejects on its own
//! evidence, each with the time left; the board keeps, per pod, the latest
//! end any dataplane reported (on the controller's clock) and forgets it
//! once passed.

use std::collections::BTreeMap;
use std::sync::Arc;

use switchyard_snapshot::{object_key, pb};
use tokio::sync::watch;

use crate::report_limit::first_entries;
use crate::router_config::MAX_EJECTION_TIME_LIMIT;
use crate::scrape::PodKey;

/// Entries read from one report: more pods than a dataplane ejects at once
/// in any real fleet, and a bound on what a faulty one can make us hold.
pub const MAX_EJECTIONS_PER_REPORT: usize = 4096;

/// Pods the board holds at most; further reports are ignored (and logged)
/// until entries expire.
pub const MAX_REPORTED_EJECTIONS: usize = 65_536;

/// Reasons a report may name; anything else is recorded as `other`.
const KNOWN_REASONS: [&str; 5] = ["5xx", "connect_failure", "reset", "timeout", "stream_cut"];

/// One pod's ejection as the fleet knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportedEjection {
    /// When it ends (Unix milliseconds, this controller's clock).
    pub until_unix_ms: i64,
    /// The failure that caused the latest report.
    pub reason: &'static str,
}

/// Reported ejections by pod (`namespace/name`).
pub type ReportedEjections = BTreeMap<PodKey, ReportedEjection>;

/// The ejections every dataplane reported, as a channel that changes with
/// every report that changes them.
#[derive(Debug)]
pub struct EjectionBoard {
    reported: watch::Sender<Arc<ReportedEjections>>,
}

impl Default for EjectionBoard {
    fn default() -> Self {
        Self {
            reported: watch::Sender::new(Arc::default()),
        }
    }
}

impl EjectionBoard {
    pub fn subscribe(&self) -> watch::Receiver<Arc<ReportedEjections>> {
        self.reported.subscribe()
    }

    /// Merges `node`'s report received at `now_unix_ms`; expired entries go.
    pub fn report(&self, node: &str, report: &pb::OutlierReport, now_unix_ms: i64) {
        let ejections = first_entries(node, "outlier", &report.ejections, MAX_EJECTIONS_PER_REPORT);
        let limit_ms = i64::try_from(MAX_EJECTION_TIME_LIMIT.as_millis()).unwrap_or(i64::MAX);
        self.reported.send_if_modified(|reported| {
            let before = reported.clone();
            let board = Arc::make_mut(reported);
            board.retain(|_, ejection| ejection.until_unix_ms > now_unix_ms);
            for ejection in ejections {
                let remaining = i64::try_from(ejection.remaining_ms)
                    .unwrap_or(i64::MAX)
                    .min(limit_ms);
                if remaining <= 0 || ejection.pod.is_empty() {
                    continue;
                }
                let key = object_key(&ejection.namespace, &ejection.pod);
                if !board.contains_key(&key) && board.len() >= MAX_REPORTED_EJECTIONS {
                    tracing::warn!(node, pod = %key, "too many reported ejections; ignoring this one");
                    continue;
                }
                let reason = KNOWN_REASONS
                    .iter()
                    .find(|known| **known == ejection.reason)
                    .copied()
                    .unwrap_or("other");
                let until_unix_ms = now_unix_ms.saturating_add(remaining);
                tracing::info!(node, pod = %key, reason, remaining_ms = remaining, "dataplane reported an ejection");
                let entry = board.entry(key).or_insert(ReportedEjection {
                    until_unix_ms,
                    reason,
                });
                if until_unix_ms >= entry.until_unix_ms {
                    *entry = ReportedEjection {
                        until_unix_ms,
                        reason,
                    };
                }
            }
            **reported != *before
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(entries: &[(&str, u64, &str)]) -> pb::OutlierReport {
        pb::OutlierReport {
            ejections: entries
                .iter()
                .map(|(pod, remaining_ms, reason)| pb::PodEjection {
                    namespace: "default".into(),
                    pod: (*pod).into(),
                    remaining_ms: *remaining_ms,
                    reason: (*reason).into(),
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn reports_merge_keep_the_latest_end_and_expire() {
        let board = EjectionBoard::default();
        let mut changes = board.subscribe();
        board.report("dp-0", &report(&[("a", 10_000, "5xx")]), 1_000);
        board.report(
            "dp-1",
            &report(&[("a", 5_000, "timeout"), ("b", 3_000, "bogus")]),
            2_000,
        );
        assert!(changes.has_changed().expect("open"));
        let held = changes.borrow_and_update().clone();
        assert_eq!(
            held["default/a"],
            ReportedEjection {
                until_unix_ms: 11_000,
                reason: "5xx"
            },
            "an earlier end does not shorten it"
        );
        assert_eq!(held["default/b"].reason, "other");
        board.report("dp-0", &report(&[]), 5_001);
        let held = changes.borrow_and_update().clone();
        assert_eq!(held.len(), 1, "b expired");
        board.report("dp-0", &report(&[]), 5_002);
        assert!(!changes.has_changed().expect("open"), "nothing changed");
    }

    #[test]
    fn a_report_is_bounded() {
        let board = EjectionBoard::default();
        let limit = u64::try_from(MAX_EJECTION_TIME_LIMIT.as_millis()).expect("fits");
        board.report(
            "dp-0",
            &report(&[("a", u64::MAX, "5xx"), ("", 1_000, "5xx")]),
            0,
        );
        let held = board.subscribe().borrow().clone();
        assert_eq!(held.len(), 1, "a nameless pod is skipped");
        assert_eq!(
            held["default/a"].until_unix_ms,
            i64::try_from(limit).expect("fits"),
            "no longer than the longest ejection"
        );
    }
}
