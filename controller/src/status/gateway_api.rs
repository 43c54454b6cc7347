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
use switchyard_crd::gateway_api::{GatewayStatusAddress, ListenerStatus, RouteParentStatus};
use switchyard_crd::inference_pool::{PoolParentReference, PoolParentStatus};
use switchyard_crd::status::{CONDITION_ACCEPTED, CONDITION_PROGRAMMED, CONDITION_RESOLVED_REFS};
use switchyard_crd::{
    GATEWAY_API_GROUP, GatewayClassStatus, GatewayStatus, HTTPRouteStatus, InferencePoolStatus,
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
    let previous_parents = previous.map_or(&[][..], |status| &status.parents);
    let mut parents: Vec<RouteParentStatus> = previous_parents
        .iter()
        .filter(|parent| parent.controller_name != controller_name)
        .cloned()
        .collect();
    for parent in &report.parents {
        let previous = previous_parents
            .iter()
            .find(|entry| {
                entry.controller_name == controller_name && entry.parent_ref == parent.parent_ref
            })
            .map_or(&[][..], |entry| &entry.conditions);
        let mut conditions = vec![
            from_report(
                CONDITION_ACCEPTED,
                &parent.accepted,
                report.generation,
                previous,
                now,
            ),
            from_report(
                CONDITION_RESOLVED_REFS,
                &parent.resolved_refs,
                report.generation,
                previous,
                now,
            ),
        ];
        if let Some(partially_invalid) = &parent.partially_invalid {
            conditions.push(from_report(
                CONDITION_PARTIALLY_INVALID,
                partially_invalid,
                report.generation,
                previous,
                now,
            ));
        }
        parents.push(RouteParentStatus {
            parent_ref: parent.parent_ref.clone(),
            controller_name: controller_name.to_owned(),
            conditions,
        });
    }
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
    let previous_parents = previous.map_or(&[][..], |status| &status.parents);
    let is_ours = |parent: &PoolParentReference| {
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
    let mut parents: Vec<PoolParentStatus> = previous_parents
        .iter()
        .filter(|parent| !is_ours(&parent.parent_ref))
        .cloned()
        .collect();
    for parent in &report.parents {
        let parent_ref = PoolParentReference {
            group: Some(GATEWAY_API_GROUP.to_owned()),
            kind: Some("Gateway".to_owned()),
            name: parent.gateway_name.clone(),
            namespace: Some(parent.gateway_namespace.clone()),
        };
        let previous = previous_parents
            .iter()
            .find(|entry| entry.parent_ref == parent_ref)
            .map_or(&[][..], |entry| &entry.conditions);
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
        parents.push(PoolParentStatus {
            parent_ref,
            conditions: vec![
                from_report(
                    CONDITION_ACCEPTED,
                    &accepted,
                    report.generation,
                    previous,
                    now,
                ),
                from_report(
                    CONDITION_RESOLVED_REFS,
                    &report.resolved_refs,
                    report.generation,
                    previous,
                    now,
                ),
            ],
        });
    }
    InferencePoolStatus { parents }
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
