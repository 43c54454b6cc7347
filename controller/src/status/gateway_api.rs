//! Status of the Gateway API kinds, as the Gateway API (and its Inference
//! Extension) defines it, computed purely from a compile's
//! [`GatewayApiReports`](crate::compile::GatewayApiReports), the dataplanes'
//! ACK state and the status the object already carries.
//!
//! - GatewayClass: `Accepted`.
//! - Gateway: `Accepted` and `Programmed`, the addresses, and per listener
//!   `Accepted`, `ResolvedRefs`, `Conflicted`, `Programmed`, its supported
//!   kinds and attached routes.
//! - HTTPRoute: one `status.parents[]` entry per parentRef naming a Gateway
//!   of Switchyard's (`Accepted`, `ResolvedRefs`, and `PartiallyInvalid`
//!   when rules were dropped); other controllers' entries are kept.
//! - InferencePool: one `status.parents[]` entry per Gateway of Switchyard's
//!   routing to it (`Accepted`, `ResolvedRefs`); entries of other Gateways
//!   are kept.

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use switchyard_crd::gateway_api::{GatewayStatusAddress, ListenerStatus, ParentStatus};
use switchyard_crd::status::{CONDITION_ACCEPTED, CONDITION_PROGRAMMED, CONDITION_RESOLVED_REFS};
use switchyard_crd::{
    GATEWAY_API_GROUP, GatewayClassStatus, GatewayStatus, HTTPRouteStatus, InferencePoolStatus,
    ParentReference,
};

use super::{AckSummary, condition};
use crate::compile::ConditionReport;
use crate::compile::gateway_api::{
    GatewayClassReport, GatewayReport, HttpRouteReport, InferencePoolReport,
};

/// Listener condition: another listener holds its port and hostname.
pub const CONDITION_CONFLICTED: &str = "Conflicted";
/// HTTPRoute condition: some rules were dropped, the others serve.
pub const CONDITION_PARTIALLY_INVALID: &str = "PartiallyInvalid";
/// Reason of `Programmed=False` for an object the snapshot does not hold.
const INVALID: &str = "Invalid";

/// The status a GatewayClass of Switchyard's should carry.
pub fn gateway_class_status(
    report: &GatewayClassReport,
    previous: Option<&GatewayClassStatus>,
    now: Timestamp,
) -> GatewayClassStatus {
    let previous = previous.map_or(&[][..], |status| &status.conditions);
    let mut conditions = vec![from_report(
        CONDITION_ACCEPTED,
        &report.accepted,
        report.generation,
        previous,
        now,
    )];
    keep_others(&mut conditions, previous, &[CONDITION_ACCEPTED]);
    GatewayClassStatus { conditions }
}

/// The status a Gateway of Switchyard's should carry; `addresses` are the
/// dataplanes' (`--gateway-addresses`).
pub fn gateway_status(
    report: &GatewayReport,
    acks: &AckSummary,
    addresses: &[GatewayStatusAddress],
    previous: Option<&GatewayStatus>,
    now: Timestamp,
) -> GatewayStatus {
    let generation = report.generation;
    let previous_conditions = previous.map_or(&[][..], |status| &status.conditions);
    let (programmed, reason, mut message) = programmed(acks, report.in_snapshot);
    if addresses.is_empty() && report.in_snapshot {
        message.push_str("; no address configured (--gateway-addresses)");
    }
    let mut conditions = vec![
        from_report(
            CONDITION_ACCEPTED,
            &report.accepted,
            generation,
            previous_conditions,
            now,
        ),
        condition(
            CONDITION_PROGRAMMED,
            programmed,
            reason,
            message.clone(),
            generation,
            previous_conditions,
            now,
        ),
    ];
    keep_others(
        &mut conditions,
        previous_conditions,
        &[CONDITION_ACCEPTED, CONDITION_PROGRAMMED],
    );
    let listeners = report
        .listeners
        .iter()
        .map(|listener| {
            let previous = previous
                .and_then(|status| status.listeners.iter().find(|l| l.name == listener.name))
                .map_or(&[][..], |status| &status.conditions);
            let (programmed, reason, message) = if listener.in_snapshot {
                (programmed, reason, message.clone())
            } else {
                (
                    false,
                    INVALID,
                    "the listener is not served: see its other conditions".to_owned(),
                )
            };
            ListenerStatus {
                name: listener.name.clone(),
                supported_kinds: listener.supported_kinds.clone(),
                attached_routes: i32::try_from(listener.attached_routes).unwrap_or(i32::MAX),
                conditions: vec![
                    from_report(
                        CONDITION_ACCEPTED,
                        &listener.accepted,
                        generation,
                        previous,
                        now,
                    ),
                    from_report(
                        CONDITION_RESOLVED_REFS,
                        &listener.resolved_refs,
                        generation,
                        previous,
                        now,
                    ),
                    from_report(
                        CONDITION_CONFLICTED,
                        &listener.conflicted,
                        generation,
                        previous,
                        now,
                    ),
                    condition(
                        CONDITION_PROGRAMMED,
                        programmed,
                        reason,
                        message,
                        generation,
                        previous,
                        now,
                    ),
                ],
            }
        })
        .collect();
    GatewayStatus {
        addresses: if report.in_snapshot {
            addresses.to_vec()
        } else {
            Vec::new()
        },
        conditions,
        listeners,
    }
}

/// The status an HTTPRoute should carry: the entries of other controllers
/// kept, Switchyard's (`controller_name`) replaced by the report's.
pub fn http_route_status(
    report: &HttpRouteReport,
    controller_name: &str,
    previous: Option<&HTTPRouteStatus>,
    now: Timestamp,
) -> HTTPRouteStatus {
    let ours = report.parents.iter().map(|parent| {
        let mut conditions = vec![
            (CONDITION_ACCEPTED, parent.accepted.clone()),
            (CONDITION_RESOLVED_REFS, parent.resolved_refs.clone()),
        ];
        if let Some(partially_invalid) = &parent.partially_invalid {
            conditions.push((CONDITION_PARTIALLY_INVALID, partially_invalid.clone()));
        }
        (parent.parent_ref.clone(), conditions)
    });
    let parents = parent_statuses(
        previous.map_or(&[][..], |status| &status.parents),
        |parent| parent.controller_name.as_deref() == Some(controller_name),
        Some(controller_name),
        ours,
        report.generation,
        now,
    );
    HTTPRouteStatus { parents }
}

/// The status an InferencePool should carry: one entry per Gateway of
/// Switchyard's routing to it; entries of Gateways not in `ours` are kept.
pub fn inference_pool_status(
    report: &InferencePoolReport,
    ours: &BTreeSet<(String, String)>,
    previous: Option<&InferencePoolStatus>,
    now: Timestamp,
) -> InferencePoolStatus {
    let is_ours = |parent: &ParentStatus| {
        let parent = &parent.parent_ref;
        let kind = parent.kind.as_deref().unwrap_or("Gateway");
        let group = parent.group.as_deref().unwrap_or(GATEWAY_API_GROUP);
        kind == "Gateway"
            && group == GATEWAY_API_GROUP
            && ours.contains(&(
                parent
                    .namespace
                    .clone()
                    .unwrap_or_else(|| report.namespace.clone()),
                parent.name.clone(),
            ))
    };
    let parents = report.parents.iter().map(|parent| {
        let parent_ref = ParentReference {
            group: Some(GATEWAY_API_GROUP.to_owned()),
            kind: Some("Gateway".to_owned()),
            name: parent.gateway_name.clone(),
            namespace: Some(parent.gateway_namespace.clone()),
            ..ParentReference::default()
        };
        let accepted = if report.accepted.status {
            let via = format!("routed to by HTTPRoute {}", parent.routes.join(", "));
            ConditionReport {
                status: true,
                reason: report.accepted.reason,
                message: if report.accepted.message.is_empty() {
                    via
                } else {
                    format!("{via}; {}", report.accepted.message)
                },
            }
        } else {
            report.accepted.clone()
        };
        let conditions = vec![
            (CONDITION_ACCEPTED, accepted),
            (CONDITION_RESOLVED_REFS, report.resolved_refs.clone()),
        ];
        (parent_ref, conditions)
    });
    let parents = parent_statuses(
        previous.map_or(&[][..], |status| &status.parents),
        is_ours,
        None,
        parents,
        report.generation,
        now,
    );
    InferencePoolStatus { parents }
}

/// The `status.parents` of an HTTPRoute or InferencePool: the `previous`
/// entries that are not `is_ours` kept, then one entry per parent of
/// `ours`, written by `controller_name`, with its conditions (each
/// continuing the entry it replaces).
fn parent_statuses(
    previous: &[ParentStatus],
    is_ours: impl Fn(&ParentStatus) -> bool,
    controller_name: Option<&str>,
    ours: impl IntoIterator<Item = (ParentReference, Vec<(&'static str, ConditionReport)>)>,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<ParentStatus> {
    let mut parents: Vec<ParentStatus> = previous
        .iter()
        .filter(|parent| !is_ours(parent))
        .cloned()
        .collect();
    for (parent_ref, conditions) in ours {
        let previous = previous
            .iter()
            .find(|entry| {
                entry.controller_name.as_deref() == controller_name
                    && entry.parent_ref == parent_ref
            })
            .map_or(&[][..], |entry| &entry.conditions);
        let conditions = conditions
            .into_iter()
            .map(|(type_, report)| from_report(type_, &report, generation, previous, now))
            .collect();
        parents.push(ParentStatus {
            parent_ref,
            controller_name: controller_name.map(str::to_owned),
            conditions,
        });
    }
    parents
}

/// `Programmed` of an object as the dataplanes' ACKs say.
fn programmed(acks: &AckSummary, in_snapshot: bool) -> (bool, &'static str, String) {
    if !in_snapshot {
        return (
            false,
            INVALID,
            "not part of the routing snapshot: see the Accepted condition".to_owned(),
        );
    }
    let (status, reason, message) = acks.programmed(true);
    (status, reason.as_str(), message)
}

fn from_report(
    type_: &str,
    report: &ConditionReport,
    generation: Option<i64>,
    previous: &[Condition],
    now: Timestamp,
) -> Condition {
    let message = if report.message.is_empty() {
        match (type_, report.status) {
            (CONDITION_ACCEPTED, true) => "accepted by Switchyard".to_owned(),
            (CONDITION_RESOLVED_REFS, true) => "every reference resolved".to_owned(),
            (CONDITION_CONFLICTED, false) => {
                "no other listener holds this port and hostname".to_owned()
            }
            _ => String::new(),
        }
    } else {
        report.message.clone()
    };
    condition(
        type_,
        report.status,
        report.reason.as_str(),
        message,
        generation,
        previous,
        now,
    )
}

/// Keeps the conditions of types other writers own.
fn keep_others(conditions: &mut Vec<Condition>, previous: &[Condition], ours: &[&str]) {
    conditions.extend(
        previous
            .iter()
            .filter(|condition| !ours.contains(&condition.type_.as_str()))
            .cloned(),
    );
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::compile::Reason;
    use crate::compile::gateway_api::{PoolParentReport, RouteParentReport};

    const OURS: &str = "switchyard.dev/gateway-controller";

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_780_000_000 + second).expect("valid timestamp")
    }

    fn gateway(namespace: &str, name: &str) -> ParentReference {
        ParentReference {
            group: Some(GATEWAY_API_GROUP.to_owned()),
            kind: Some("Gateway".to_owned()),
            namespace: Some(namespace.to_owned()),
            name: name.to_owned(),
            ..ParentReference::default()
        }
    }

    fn accepted_at(second: i64) -> Vec<Condition> {
        vec![Condition {
            type_: CONDITION_ACCEPTED.to_owned(),
            status: "True".to_owned(),
            reason: "Accepted".to_owned(),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: Time(at(second)),
        }]
    }

    fn ok() -> ConditionReport {
        ConditionReport::ok(Reason::Accepted, "")
    }

    #[test]
    fn an_http_route_keeps_other_controllers_entries_and_continues_its_own() {
        let theirs = ParentStatus {
            parent_ref: gateway("infra", "other"),
            controller_name: Some("example.com/other".to_owned()),
            conditions: accepted_at(0),
        };
        let ours_before = ParentStatus {
            parent_ref: gateway("infra", "default"),
            controller_name: Some(OURS.to_owned()),
            conditions: accepted_at(5),
        };
        let previous = HTTPRouteStatus {
            parents: vec![theirs.clone(), ours_before],
        };
        let report = HttpRouteReport {
            namespace: "default".to_owned(),
            name: "route".to_owned(),
            generation: Some(2),
            parents: vec![RouteParentReport {
                parent_ref: gateway("infra", "default"),
                accepted: ok(),
                resolved_refs: ok(),
                partially_invalid: Some(ConditionReport::ok(Reason::Accepted, "rule 1 dropped")),
            }],
            in_snapshot: true,
        };
        let status = http_route_status(&report, OURS, Some(&previous), at(60));
        assert_eq!(status.parents.len(), 2);
        assert_eq!(
            status.parents[0], theirs,
            "another controller's entry is kept"
        );
        let ours = &status.parents[1];
        assert_eq!(ours.controller_name.as_deref(), Some(OURS));
        let types: Vec<&str> = ours.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(
            types,
            [
                CONDITION_ACCEPTED,
                CONDITION_RESOLVED_REFS,
                CONDITION_PARTIALLY_INVALID
            ]
        );
        assert_eq!(
            ours.conditions[0].last_transition_time,
            Time(at(5)),
            "unchanged: kept"
        );
        assert_eq!(
            ours.conditions[1].last_transition_time,
            Time(at(60)),
            "new: now"
        );
        assert_eq!(ours.conditions[0].observed_generation, Some(2));
    }

    #[test]
    fn an_inference_pool_keeps_other_gateways_entries_and_names_no_controller() {
        let theirs = ParentStatus {
            parent_ref: gateway("infra", "other"),
            controller_name: None,
            conditions: accepted_at(0),
        };
        let previous = InferencePoolStatus {
            parents: vec![
                theirs.clone(),
                ParentStatus {
                    parent_ref: gateway("infra", "default"),
                    controller_name: None,
                    conditions: accepted_at(5),
                },
            ],
        };
        let report = InferencePoolReport {
            namespace: "default".to_owned(),
            name: "pool".to_owned(),
            generation: Some(3),
            accepted: ok(),
            resolved_refs: ok(),
            ready_pods: 1,
            total_pods: 1,
            parents: vec![PoolParentReport {
                gateway_namespace: "infra".to_owned(),
                gateway_name: "default".to_owned(),
                routes: vec!["default/to-pool".to_owned()],
            }],
        };
        let ours = BTreeSet::from([("infra".to_owned(), "default".to_owned())]);
        let status = inference_pool_status(&report, &ours, Some(&previous), at(60));
        assert_eq!(status.parents.len(), 2);
        assert_eq!(status.parents[0], theirs, "another Gateway's entry is kept");
        let entry = &status.parents[1];
        assert_eq!(entry.parent_ref, gateway("infra", "default"));
        assert_eq!(
            entry.conditions[0].message,
            "routed to by HTTPRoute default/to-pool"
        );
        assert_eq!(entry.conditions[0].last_transition_time, Time(at(5)));
        let json = serde_json::to_value(entry).expect("serializes");
        assert_eq!(
            json["parentRef"],
            serde_json::json!({"group": GATEWAY_API_GROUP, "kind": "Gateway", "namespace": "infra", "name": "default"})
        );
        assert!(json.get("controllerName").is_none(), "{json}");
    }
}
