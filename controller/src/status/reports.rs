//! `Programmed` across controller replicas. Every replica serves its own
//! dataplanes and knows only their ACKs; each publishes a [`DataplaneReport`]
//! of them, and the leader merges its own dataplanes with every unexpired
//! report of the other replicas before computing `Programmed`.
//!
//! RouteConfig versions are content hashes of a compile that is a pure
//! function of the (canonically ordered) cluster objects, so replicas that
//! saw the same objects published the same version and their ACKs compare
//! directly. EndpointLoads versions differ per replica (each scrapes the
//! engines itself) and are reported for inspection only.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::AckSummary;
use crate::xds::{DataplaneStatus, TypeSyncStatus};

/// What one replica tells the leader about the dataplanes connected to it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataplaneReport {
    /// The replica's identity (its pod name).
    pub replica: String,
    /// When the replica last wrote the report, by its clock; a report not
    /// renewed for the TTL is from a replica that died, and is ignored.
    pub renewed_at_unix_ms: i64,
    pub dataplanes: Vec<ReportedDataplane>,
}

/// One dataplane stream's ACK state, as reported.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportedDataplane {
    /// `Node.id`, or `stream N` before the dataplane sent one.
    pub node_id: String,
    pub route_config: ReportedSync,
    pub endpoint_loads: ReportedSync,
}

/// The ACK state of one resource type.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportedSync {
    pub subscribed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nacked_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_nack_error: Option<String>,
}

impl ReportedSync {
    fn from_sync(sync: &TypeSyncStatus) -> Self {
        Self {
            subscribed: sync.subscribed,
            acked_version: sync.acked_version.clone(),
            nacked_version: sync.nacked_version.clone(),
            last_nack_error: sync.last_nack_error.clone(),
        }
    }
}

impl ReportedDataplane {
    pub fn from_status(status: &DataplaneStatus) -> Self {
        Self {
            node_id: status
                .node_id
                .clone()
                .unwrap_or_else(|| format!("stream {}", status.stream_id)),
            route_config: ReportedSync::from_sync(&status.route_config),
            endpoint_loads: ReportedSync::from_sync(&status.endpoint_loads),
        }
    }
}

impl DataplaneReport {
    /// The report of `replica`'s open streams, renewed at `now_unix_ms`.
    pub fn from_dataplanes(
        replica: &str,
        dataplanes: &[DataplaneStatus],
        now_unix_ms: i64,
    ) -> Self {
        Self {
            replica: replica.to_owned(),
            renewed_at_unix_ms: now_unix_ms,
            dataplanes: dataplanes
                .iter()
                .map(ReportedDataplane::from_status)
                .collect(),
        }
    }

    /// Not renewed within `ttl` of `now_unix_ms`: its replica is gone (or cut off).
    pub fn is_expired(&self, now_unix_ms: i64, ttl: Duration) -> bool {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        now_unix_ms.saturating_sub(self.renewed_at_unix_ms) > ttl_ms
    }
}

impl AckSummary {
    /// Summarises reported dataplanes against the published `version`.
    pub fn from_reported<'a>(
        version: Option<&str>,
        dataplanes: impl IntoIterator<Item = &'a ReportedDataplane>,
    ) -> Self {
        let mut summary = Self {
            version: version.map(str::to_owned),
            ..Self::default()
        };
        for dataplane in dataplanes {
            let sync = &dataplane.route_config;
            if !sync.subscribed {
                continue;
            }
            summary.dataplanes += 1;
            let Some(version) = version else { continue };
            if sync.acked_version.as_deref() == Some(version) {
                summary.at_version += 1;
            } else if sync.nacked_version.as_deref() == Some(version) {
                let error = sync.last_nack_error.as_deref().unwrap_or("no error given");
                summary
                    .rejections
                    .push(format!("{}: {error}", dataplane.node_id));
            }
        }
        summary
    }

    /// This replica's dataplanes (`own`) plus those of every other replica
    /// whose report is unexpired at `now_unix_ms`. A report under `own`'s
    /// name is skipped: `own` is fresher.
    pub fn across_replicas(
        version: Option<&str>,
        own: &DataplaneReport,
        others: &[DataplaneReport],
        now_unix_ms: i64,
        ttl: Duration,
    ) -> Self {
        let live_others = others
            .iter()
            .filter(|report| report.replica != own.replica && !report.is_expired(now_unix_ms, ttl));
        let dataplanes = own
            .dataplanes
            .iter()
            .chain(live_others.flat_map(|report| report.dataplanes.iter()));
        Self::from_reported(version, dataplanes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(30);
    const NOW: i64 = 1_780_000_000_000;

    fn acked(node: &str, version: &str) -> ReportedDataplane {
        ReportedDataplane {
            node_id: node.to_owned(),
            route_config: ReportedSync {
                subscribed: true,
                acked_version: Some(version.to_owned()),
                ..ReportedSync::default()
            },
            endpoint_loads: ReportedSync::default(),
        }
    }

    fn report(
        replica: &str,
        renewed_at: i64,
        dataplanes: Vec<ReportedDataplane>,
    ) -> DataplaneReport {
        DataplaneReport {
            replica: replica.to_owned(),
            renewed_at_unix_ms: renewed_at,
            dataplanes,
        }
    }

    #[test]
    fn dataplanes_of_two_replicas_are_counted_together() {
        let own = report(
            "controller-a",
            NOW,
            vec![acked("dp-0", "rc-1"), acked("dp-1", "rc-1")],
        );
        let other = report("controller-b", NOW - 5_000, vec![acked("dp-2", "rc-1")]);
        let summary = AckSummary::across_replicas(Some("rc-1"), &own, &[other], NOW, TTL);
        assert_eq!((summary.dataplanes, summary.at_version), (3, 3));
        let (programmed, reason, message) = summary.programmed(true);
        assert!(programmed);
        assert_eq!(reason, super::super::ProgrammedReason::Programmed);
        assert_eq!(message, "3/3 dataplanes at version rc-1");
    }

    #[test]
    fn a_lagging_dataplane_on_the_other_replica_keeps_it_pending() {
        let own = report("controller-a", NOW, vec![acked("dp-0", "rc-2")]);
        let other = report("controller-b", NOW, vec![acked("dp-1", "rc-1")]);
        let summary = AckSummary::across_replicas(Some("rc-2"), &own, &[other], NOW, TTL);
        let (programmed, reason, message) = summary.programmed(true);
        assert!(!programmed);
        assert_eq!(reason, super::super::ProgrammedReason::Pending);
        assert_eq!(message, "1/2 dataplanes at version rc-2");
    }

    #[test]
    fn an_expired_report_is_ignored() {
        let own = report("controller-a", NOW, vec![acked("dp-0", "rc-1")]);
        let dead = report(
            "controller-b",
            NOW - 31_000,
            vec![acked("dp-1", "rc-0"), acked("dp-2", "rc-0")],
        );
        let summary = AckSummary::across_replicas(Some("rc-1"), &own, &[dead], NOW, TTL);
        assert_eq!((summary.dataplanes, summary.at_version), (1, 1));
        assert_eq!(summary.programmed(true).2, "1/1 dataplanes at version rc-1");
        // Exactly at the TTL it still counts.
        let edge = report("controller-b", NOW - 30_000, vec![acked("dp-1", "rc-1")]);
        let summary = AckSummary::across_replicas(Some("rc-1"), &own, &[edge], NOW, TTL);
        assert_eq!(summary.dataplanes, 2);
    }

    #[test]
    fn a_nack_from_a_dataplane_on_the_other_replica_shows() {
        let own = report("controller-a", NOW, vec![acked("dp-0", "rc-1")]);
        let mut rejecting = acked("dp-1", "rc-0");
        rejecting.route_config.nacked_version = Some("rc-1".to_owned());
        rejecting.route_config.last_nack_error = Some("route chat: unknown plugin".to_owned());
        let other = report("controller-b", NOW, vec![rejecting]);
        let summary = AckSummary::across_replicas(Some("rc-1"), &own, &[other], NOW, TTL);
        let (programmed, reason, message) = summary.programmed(true);
        assert!(!programmed);
        assert_eq!(reason, super::super::ProgrammedReason::RejectedByDataplane);
        assert_eq!(
            message,
            "1/2 dataplanes at version rc-1; rejected by dp-1: route chat: unknown plugin"
        );
    }

    #[test]
    fn the_leaders_own_published_report_is_not_counted_twice() {
        let own = report("controller-a", NOW, vec![acked("dp-0", "rc-1")]);
        let stale_own = report("controller-a", NOW - 1_000, vec![acked("dp-0", "rc-0")]);
        let summary = AckSummary::across_replicas(Some("rc-1"), &own, &[stale_own], NOW, TTL);
        assert_eq!((summary.dataplanes, summary.at_version), (1, 1));
    }

    #[test]
    fn unsubscribed_streams_are_not_counted_and_the_report_round_trips_as_json() {
        let mut idle = acked("dp-9", "rc-1");
        idle.route_config.subscribed = false;
        let other = report("controller-b", NOW, vec![idle, acked("dp-1", "rc-1")]);
        let json = serde_json::to_string(&other).expect("serialises");
        assert!(json.contains("\"renewedAtUnixMs\""), "{json}");
        let parsed: DataplaneReport = serde_json::from_str(&json).expect("parses");
        assert_eq!(parsed, other);
        let own = report("controller-a", NOW, Vec::new());
        let summary = AckSummary::across_replicas(Some("rc-1"), &own, &[parsed], NOW, TTL);
        assert_eq!((summary.dataplanes, summary.at_version), (1, 1));
    }
}
