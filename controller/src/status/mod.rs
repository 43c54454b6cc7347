//! Status conditions of ModelRoutes and ModelServers, computed purely from a
//! compile's [`ObjectReport`]s, the dataplanes' ACK state and the conditions
//! the object already carries.
//!
//! Kubernetes conventions: one condition per type; `lastTransitionTime` moves
//! only when `status` flips (a new reason or message alone keeps it);
//! `observedGeneration` on the status and on every condition is the generation
//! the compile saw; reasons are CamelCase from fixed sets
//! ([`Reason`](crate::compile::Reason) and [`ProgrammedReason`]). Nothing here
//! reads the clock or talks to the API server, so the Kubernetes writer
//! (`crate::kubernetes::status_writer`) and the unit tests share exactly this
//! code.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use serde::Serialize;
use switchyard_crd::status::{
    CONDITION_ACCEPTED, CONDITION_CREDENTIALS_RESOLVED, CONDITION_IGNORED_FIELDS,
    CONDITION_PROGRAMMED, CONDITION_READY, CONDITION_RESOLVED_REFS,
};
use switchyard_crd::{ExternalModelProviderStatus, ModelRouteStatus, ModelServerStatus};

use crate::compile::{ConditionReport, ObjectKind, ObjectReport, ProviderReport};
use crate::xds::DataplaneStatus;

pub mod gateway_api;
mod reports;
#[cfg(test)]
mod tests;

pub use reports::{DataplaneReport, ReportedDataplane, ReportedSync};

/// Kubernetes caps `Condition.message` at 32768 bytes; compile messages join
/// every problem, so a pathological object could exceed it and make the whole
/// status patch fail validation.
pub const MAX_CONDITION_MESSAGE_BYTES: usize = 32 * 1024;

/// `status.lastScrapeTime` is refreshed only when it moved by at least this
/// much: scrapes happen every second, and writing every ModelServer's status
/// every second would load the API server for a value humans read in minutes.
/// Staleness of the routing data itself travels in the snapshot, not here.
pub const LAST_SCRAPE_TIME_RESOLUTION: Duration = Duration::from_secs(60);

/// Reasons of the `Programmed` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum ProgrammedReason {
    /// Every connected dataplane ACKed the RouteConfig version holding this generation.
    Programmed,
    /// Some connected dataplanes have not ACKed that version yet.
    Pending,
    /// No dataplane is connected to any controller replica.
    NoDataplanes,
    /// At least one dataplane NACKed that version (it keeps serving its previous one).
    RejectedByDataplane,
    /// The object is not part of the snapshot (not accepted, or no usable target).
    NotInSnapshot,
}

impl ProgrammedReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Programmed => "Programmed",
            Self::Pending => "Pending",
            Self::NoDataplanes => "NoDataplanes",
            Self::RejectedByDataplane => "RejectedByDataplane",
            Self::NotInSnapshot => "NotInSnapshot",
        }
    }
}

/// How far the connected dataplanes got with the published RouteConfig.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AckSummary {
    /// The published RouteConfig version; `None` before the first compile.
    pub version: Option<String>,
    /// Dataplanes subscribed to RouteConfig.
    pub dataplanes: usize,
    /// Of those, how many ACKed `version`.
    pub at_version: usize,
    /// `node id: error` of each dataplane that NACKed `version`.
    pub rejections: Vec<String>,
}

impl AckSummary {
    /// Summarises the registry's streams against the published `version`.
    pub fn from_dataplanes(version: Option<&str>, dataplanes: &[DataplaneStatus]) -> Self {
        let reported: Vec<ReportedDataplane> = dataplanes
            .iter()
            .map(ReportedDataplane::from_status)
            .collect();
        Self::from_reported(version, &reported)
    }

    /// The `Programmed` condition of an object (`in_snapshot`: it is part of `version`).
    pub fn programmed(&self, in_snapshot: bool) -> (bool, ProgrammedReason, String) {
        let version = self.version.as_deref().unwrap_or("none");
        if !in_snapshot {
            return (
                false,
                ProgrammedReason::NotInSnapshot,
                "not part of the routing snapshot: see the Accepted and ResolvedRefs conditions"
                    .to_owned(),
            );
        }
        let progress = format!(
            "{}/{} dataplanes at version {version}",
            self.at_version, self.dataplanes
        );
        if self.dataplanes == 0 {
            (
                false,
                ProgrammedReason::NoDataplanes,
                format!("{progress}: no dataplane is connected"),
            )
        } else if !self.rejections.is_empty() {
            (
                false,
                ProgrammedReason::RejectedByDataplane,
                format!("{progress}; rejected by {}", self.rejections.join("; ")),
            )
        } else if self.at_version < self.dataplanes {
            (false, ProgrammedReason::Pending, progress)
        } else {
            (true, ProgrammedReason::Programmed, progress)
        }
    }
}

/// The status a ModelRoute should carry.
pub fn route_status(
    report: &ObjectReport,
    acks: &AckSummary,
    previous: Option<&ModelRouteStatus>,
    now: Timestamp,
) -> ModelRouteStatus {
    let previous_conditions = previous.map_or(&[][..], |status| &status.conditions);
    ModelRouteStatus {
        observed_generation: report.generation,
        conditions: conditions(report, acks, previous_conditions, now),
    }
}

/// The status a ModelServer should carry. `last_scrape` is the newest
/// successful scrape among its pods; it replaces the previous value only when
/// it moved by [`LAST_SCRAPE_TIME_RESOLUTION`] or more.
pub fn server_status(
    report: &ObjectReport,
    acks: &AckSummary,
    previous: Option<&ModelServerStatus>,
    last_scrape: Option<Timestamp>,
    now: Timestamp,
) -> ModelServerStatus {
    let previous_conditions = previous.map_or(&[][..], |status| &status.conditions);
    let previous_scrape = previous.and_then(|status| status.last_scrape_time.as_deref());
    ModelServerStatus {
        observed_generation: report.generation,
        conditions: conditions(report, acks, previous_conditions, now),
        ready_pods: report.ready_pods.map(saturating_i32),
        total_pods: report.total_pods.map(saturating_i32),
        pd_groups: report.pd_groups.map(saturating_i32),
        complete_pd_groups: report.complete_pd_groups.map(saturating_i32),
        last_scrape_time: coarse_scrape_time(previous_scrape, last_scrape),
    }
}

/// The status an ExternalModelProvider should carry: `Ready` and
/// `CredentialsResolved`, from its compile report.
pub fn provider_status(
    report: &ProviderReport,
    previous: Option<&ExternalModelProviderStatus>,
    now: Timestamp,
) -> ExternalModelProviderStatus {
    let previous = previous.map_or(&[][..], |status| &status.conditions);
    let own = |type_: &str, reported: &ConditionReport| {
        condition(
            type_,
            reported.status,
            reported.reason.as_str(),
            reported.message.clone(),
            report.generation,
            previous,
            now,
        )
    };
    let mut conditions = vec![
        own(CONDITION_READY, &report.ready),
        own(CONDITION_CREDENTIALS_RESOLVED, &report.credentials),
    ];
    conditions.extend(
        previous
            .iter()
            .filter(|condition| {
                ![CONDITION_READY, CONDITION_CREDENTIALS_RESOLVED]
                    .contains(&condition.type_.as_str())
            })
            .cloned(),
    );
    ExternalModelProviderStatus {
        observed_generation: report.generation,
        conditions,
    }
}

/// The Warning event a provider deserves: one when it is not Ready for a
/// reason it did not already carry.
pub fn provider_events(report: &ProviderReport, previous: &[Condition]) -> Vec<WarningEvent> {
    if report.ready.status {
        return Vec::new();
    }
    let already_reported = previous.iter().any(|condition| {
        condition.type_ == CONDITION_READY
            && condition.status == "False"
            && condition.reason == report.ready.reason.as_str()
            && condition.observed_generation == report.generation
    });
    if already_reported {
        return Vec::new();
    }
    vec![WarningEvent {
        kind: ObjectKind::ExternalModelProvider,
        namespace: report.namespace.clone(),
        name: report.name.clone(),
        reason: report.ready.reason.as_str().to_owned(),
        note: truncate_note(&report.ready.message),
    }]
}

fn conditions(
    report: &ObjectReport,
    acks: &AckSummary,
    previous: &[Condition],
    now: Timestamp,
) -> Vec<Condition> {
    let (programmed, programmed_reason, programmed_message) = acks.programmed(report.in_snapshot);
    let mut conditions = vec![
        condition_from_report(CONDITION_ACCEPTED, &report.accepted, report, previous, now),
        condition_from_report(
            CONDITION_RESOLVED_REFS,
            &report.resolved_refs,
            report,
            previous,
            now,
        ),
        condition(
            CONDITION_PROGRAMMED,
            programmed,
            programmed_reason.as_str(),
            programmed_message,
            report.generation,
            previous,
            now,
        ),
    ];
    if let Some(message) = ignored_fields_message(report) {
        conditions.push(condition(
            CONDITION_IGNORED_FIELDS,
            true,
            IGNORED_FIELDS_REASON,
            message,
            report.generation,
            previous,
            now,
        ));
    }
    // Conditions other writers own (none today) are kept as they are; ours
    // that no longer apply (IgnoredFields once fixed) go.
    conditions.extend(
        previous
            .iter()
            .filter(|condition| {
                ![
                    CONDITION_ACCEPTED,
                    CONDITION_RESOLVED_REFS,
                    CONDITION_PROGRAMMED,
                    CONDITION_IGNORED_FIELDS,
                ]
                .contains(&condition.type_.as_str())
            })
            .cloned(),
    );
    conditions
}

fn condition_from_report(
    type_: &str,
    reported: &ConditionReport,
    report: &ObjectReport,
    previous: &[Condition],
    now: Timestamp,
) -> Condition {
    // `kubectl describe` reads better with a sentence than with an empty message.
    let message = match (reported.message.is_empty(), reported.status, type_) {
        (true, true, CONDITION_ACCEPTED) => "the object is valid".to_owned(),
        (true, true, _) => "every referenced object exists".to_owned(),
        _ => reported.message.clone(),
    };
    condition(
        type_,
        reported.status,
        reported.reason.as_str(),
        message,
        report.generation,
        previous,
        now,
    )
}

/// One condition; `lastTransitionTime` is the previous one's unless `status` flipped.
pub fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    observed_generation: Option<i64>,
    previous: &[Condition],
    now: Timestamp,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let last_transition_time = previous
        .iter()
        .find(|condition| condition.type_ == type_ && condition.status == status)
        .map_or(Time(now), |condition| {
            condition.last_transition_time.clone()
        });
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: truncate_message(message),
        observed_generation,
        last_transition_time,
    }
}

fn truncate_message(mut message: String) -> String {
    const ELLIPSIS: &str = "...";
    if message.len() <= MAX_CONDITION_MESSAGE_BYTES {
        return message;
    }
    let mut cut = MAX_CONDITION_MESSAGE_BYTES - ELLIPSIS.len();
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    message.truncate(cut);
    message.push_str(ELLIPSIS);
    message
}

fn coarse_scrape_time(previous: Option<&str>, latest: Option<Timestamp>) -> Option<String> {
    let Some(latest) = latest else {
        return previous.map(str::to_owned);
    };
    let previous_time = previous.and_then(|text| text.parse::<Timestamp>().ok());
    match previous_time {
        Some(previous_time)
            if latest.duration_since(previous_time).unsigned_abs()
                < LAST_SCRAPE_TIME_RESOLUTION =>
        {
            previous.map(str::to_owned)
        }
        _ => Some(rfc3339_seconds(latest)),
    }
}

/// RFC 3339 in whole seconds, as `metav1.Time` serialises.
pub fn rfc3339_seconds(timestamp: Timestamp) -> String {
    Timestamp::from_second(timestamp.as_second())
        .unwrap_or(timestamp)
        .to_string()
}

fn saturating_i32(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

/// The newest scrape time among the pods of each ModelServer, from the loads'
/// `observed_at_unix_ms` (pods keyed `namespace/pod`).
pub fn last_scrape_by_server(
    servers: &[switchyard_snapshot::pb::ModelServer],
    observed_at_unix_ms: &BTreeMap<String, i64>,
) -> BTreeMap<(String, String), Timestamp> {
    let mut newest = BTreeMap::new();
    for server in servers {
        let latest = server
            .endpoints
            .iter()
            .filter_map(|endpoint| {
                observed_at_unix_ms.get(&switchyard_snapshot::object_key(
                    &server.namespace,
                    &endpoint.name,
                ))
            })
            .copied()
            .filter(|ms| *ms > 0)
            .max();
        if let Some(timestamp) = latest.and_then(|ms| Timestamp::from_millisecond(ms).ok()) {
            newest.insert((server.namespace.clone(), server.name.clone()), timestamp);
        }
    }
    newest
}

/// A Warning Event to publish about an object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WarningEvent {
    pub kind: ObjectKind,
    pub namespace: String,
    pub name: String,
    /// The condition's reason, e.g. `InvalidRegex`, `BackendNotFound`, `IgnoredFields`.
    pub reason: String,
    pub note: String,
}

/// The Warning events `report` deserves given the conditions the object
/// already carries: one when `Accepted` or `ResolvedRefs` turns False with
/// a reason it did not already carry, one when `IgnoredFields` turns True
/// or names other fields; an unchanged state is reported once, not on every
/// compile.
pub fn warning_events(report: &ObjectReport, previous: &[Condition]) -> Vec<WarningEvent> {
    let carried = |type_: &str, status: &str, reason: &str, message: Option<&str>| {
        previous.iter().any(|condition| {
            condition.type_ == type_
                && condition.status == status
                && condition.reason == reason
                && message.is_none_or(|message| condition.message == message)
                && condition.observed_generation == report.generation
        })
    };
    let event = |reason: &str, note: &str| WarningEvent {
        kind: report.kind,
        namespace: report.namespace.clone(),
        name: report.name.clone(),
        reason: reason.to_owned(),
        note: truncate_note(note),
    };
    let mut events = Vec::new();
    let failed = if !report.accepted.status {
        Some((CONDITION_ACCEPTED, &report.accepted))
    } else if !report.resolved_refs.status {
        Some((CONDITION_RESOLVED_REFS, &report.resolved_refs))
    } else {
        None
    };
    if let Some((type_, failed)) = failed
        && !carried(type_, "False", failed.reason.as_str(), None)
    {
        events.push(event(failed.reason.as_str(), &failed.message));
    }
    if let Some(message) = ignored_fields_message(report) {
        let message = truncate_message(message);
        if !carried(
            CONDITION_IGNORED_FIELDS,
            "True",
            IGNORED_FIELDS_REASON,
            Some(&message),
        ) {
            events.push(event(CONDITION_IGNORED_FIELDS, &message));
        }
    }
    events
}

/// Reason of the `IgnoredFields` condition.
pub const IGNORED_FIELDS_REASON: &str = "NotImplemented";

/// The `IgnoredFields` message: every ignored field and what it means.
fn ignored_fields_message(report: &ObjectReport) -> Option<String> {
    if report.ignored_fields.is_empty() {
        return None;
    }
    let fields: Vec<String> = report
        .ignored_fields
        .iter()
        .map(|field| format!("{}: {}", field.path, field.message))
        .collect();
    Some(format!(
        "set but not acted on by the router: {}",
        fields.join("; ")
    ))
}

/// Kubernetes caps an Event's note at 1 kB.
const MAX_EVENT_NOTE_BYTES: usize = 1024;

fn truncate_note(message: &str) -> String {
    if message.len() <= MAX_EVENT_NOTE_BYTES {
        return message.to_owned();
    }
    let mut cut = MAX_EVENT_NOTE_BYTES - 3;
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}...", &message[..cut])
}
