//! ModelServer validation and pod selection (prefill/decode grouping in
//! [`super::prefill_decode`]).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use switchyard_crd::{ModelServer, parse_go_duration};
use switchyard_snapshot::{object_key, pb};

use super::pod_index::{PodIndex, format_labels};
use super::prefill_decode::{self, ReadyPod};
use super::report::{ConditionReport, ObjectKind, ObjectReport, Problem, Reason};
use super::{non_empty, start_validation};
use crate::scrape::ScrapeTarget;

/// Retry interval when `trafficPolicy.retry` is set without `retryInterval`
/// (Kthena's documented API default).
pub const DEFAULT_RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// The only workload protocol the dataplane speaks to pods.
const SUPPORTED_PROTOCOL: &str = "http";

/// A ModelServer that passed validation, with its selected pods.
pub(crate) struct CompiledServer {
    pub server: pb::ModelServer,
    pub scrape_targets: Vec<ScrapeTarget>,
}

/// Validates one ModelServer and selects its ready pods.
pub(crate) fn compile_server(
    server: &ModelServer,
    pods: &PodIndex<'_>,
) -> (Option<CompiledServer>, ObjectReport) {
    let (namespace, name, mut problems) = start_validation(&server.metadata, Reason::InvalidName);
    let spec = &server.spec;
    let port = u16::try_from(spec.workload_port.port)
        .ok()
        .filter(|port| *port != 0);
    if port.is_none() {
        problems.push(Problem::new(
            Reason::InvalidPort,
            format!(
                "spec.workloadPort.port: {} is outside 1..=65535",
                spec.workload_port.port
            ),
        ));
    }
    let protocol = spec.workload_port.protocol.as_str();
    if !protocol.eq_ignore_ascii_case(SUPPORTED_PROTOCOL) {
        let message = if protocol.eq_ignore_ascii_case("https") {
            "spec.workloadPort.protocol: https to model pods is not supported yet; use http"
                .to_owned()
        } else {
            format!(
                "spec.workloadPort.protocol: unknown protocol {protocol:?}; only http is supported"
            )
        };
        problems.push(Problem::new(Reason::UnsupportedProtocol, message));
    }
    if spec.workload_selector.match_labels.is_empty() {
        problems.push(Problem::new(
            Reason::InvalidSelector,
            "spec.workloadSelector.matchLabels: must not be empty (an empty selector would select no pod)",
        ));
    }
    let pd_group = spec.workload_selector.pd_group.as_ref();
    if let Some(group) = pd_group {
        prefill_decode::validate(group, &mut problems);
    }
    let connector = prefill_decode::kv_connector(spec)
        .map_err(|problem| problems.push(problem))
        .ok();
    let traffic_policy = compile_traffic_policy(spec.traffic_policy.as_ref(), &mut problems);

    let generation = server.metadata.generation;
    let ignored_fields = super::ignored::server_fields(server);
    let (Some(port), Some(connector), true) = (port, connector, problems.is_empty()) else {
        let accepted = ConditionReport::from_problems(&problems, Reason::Accepted, "");
        let report = ObjectReport {
            kind: ObjectKind::ModelServer,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            generation,
            resolved_refs: ConditionReport {
                status: false,
                reason: accepted.reason,
                message: "not evaluated: the ModelServer was not accepted".to_owned(),
            },
            accepted,
            ready_pods: None,
            total_pods: None,
            pd_groups: None,
            complete_pd_groups: None,
            in_snapshot: false,
            ignored_fields,
        };
        return (None, report);
    };
    let accepted = match (pd_group, &spec.kv_connector) {
        (None, Some(_)) => ConditionReport::ok(
            Reason::Accepted,
            "spec.kvConnector has no effect without spec.workloadSelector.pdGroup: requests go to one pod each",
        ),
        _ => ConditionReport::ok(Reason::Accepted, ""),
    };

    // Sorted by pod name.
    let selected: Vec<(&str, &Pod)> = pods.select(namespace, &spec.workload_selector.match_labels);
    let mut ready: Vec<ReadyPod<'_>> = Vec::with_capacity(selected.len());
    let mut unusable: Vec<String> = Vec::new();
    for (pod_name, pod) in &selected {
        match ready_pod_ip(pod) {
            Ok(Some(ip)) => ready.push(ReadyPod {
                name: pod_name,
                pod,
                ip,
            }),
            Ok(None) => {}
            Err(why) => unusable.push(format!("{pod_name}: {why}")),
        }
    }
    let total_pods = u32::try_from(selected.len()).unwrap_or(u32::MAX);
    let ready_pods = u32::try_from(ready.len()).unwrap_or(u32::MAX);
    let pods_message = format!("{ready_pods} of {total_pods} selected pods ready");
    let no_pods = || ConditionReport {
        status: false,
        reason: Reason::NoMatchingPods,
        message: format!(
            "spec.workloadSelector.matchLabels: {} selects no pod in namespace {namespace}; requests routed here get 503",
            format_labels(&spec.workload_selector.match_labels)
        ),
    };

    let (endpoints, prefill_decode, resolved_refs, pd_counts) = match pd_group {
        None => {
            let endpoints: Vec<(&ReadyPod<'_>, u32)> = ready.iter().map(|pod| (pod, 0)).collect();
            let resolved_refs = if selected.is_empty() {
                no_pods()
            } else {
                ConditionReport::ok(Reason::ResolvedRefs, pods_message.clone())
            };
            (endpoints, None, resolved_refs, None)
        }
        Some(group) => {
            let grouping = prefill_decode::group(group, connector, &selected, &ready);
            let mut details = grouping.notes.join("; ");
            if !details.is_empty() {
                details.insert_str(0, "; ");
            }
            let resolved_refs = if selected.is_empty() {
                no_pods()
            } else if grouping.complete == 0 {
                ConditionReport {
                    status: false,
                    reason: Reason::NoCompletePdGroup,
                    message: format!(
                        "spec.workloadSelector.pdGroup: no group (pods with one value of label {}) has both a ready prefill pod {} and a ready decode pod {}; requests routed here get 503 ({pods_message}{details})",
                        group.group_key,
                        format_labels(&group.prefill_labels),
                        format_labels(&group.decode_labels),
                    ),
                }
            } else {
                ConditionReport::ok(
                    Reason::ResolvedRefs,
                    format!(
                        "{pods_message}; {} of {} prefill/decode groups complete{details}",
                        grouping.complete, grouping.groups
                    ),
                )
            };
            let counts = (grouping.groups, grouping.complete);
            (
                grouping.endpoints,
                Some(grouping.prefill_decode),
                resolved_refs,
                Some(counts),
            )
        }
    };

    let scrape_targets = endpoints
        .iter()
        .map(|(pod, _)| ScrapeTarget {
            key: object_key(namespace, pod.name),
            addr: SocketAddr::new(pod.ip, port),
            engine: spec.inference_engine,
        })
        .collect();
    let endpoints = endpoints
        .iter()
        .map(|(pod, bootstrap_port)| pb::Endpoint {
            bootstrap_port: *bootstrap_port,
            ..endpoint(pod.name, pod.ip, pod.pod)
        })
        .collect();
    // Pods no request can reach outrank every other reference problem: they are named.
    let resolved_refs = if unusable.is_empty() {
        resolved_refs
    } else {
        ConditionReport {
            status: false,
            reason: Reason::InvalidPodIP,
            message: format!(
                "{pods_message}; left out, Running and Ready but with no usable address: {}",
                unusable.join("; ")
            ),
        }
    };

    let compiled = CompiledServer {
        server: pb::ModelServer {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            model: non_empty(spec.model.as_deref()).map(str::to_owned),
            inference_engine: spec.inference_engine.as_str().to_owned(),
            port: u32::from(port),
            traffic_policy: Some(traffic_policy),
            endpoints,
            generation: generation.unwrap_or(0),
            prefill_decode,
            ..Default::default()
        },
        scrape_targets,
    };
    let report = ObjectReport {
        kind: ObjectKind::ModelServer,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        generation,
        accepted,
        resolved_refs,
        ready_pods: Some(ready_pods),
        total_pods: Some(total_pods),
        pd_groups: pd_counts.map(|(groups, _)| groups),
        complete_pd_groups: pd_counts.map(|(_, complete)| complete),
        in_snapshot: true,
        ignored_fields,
    };
    (Some(compiled), report)
}

fn compile_traffic_policy(
    policy: Option<&switchyard_crd::TrafficPolicy>,
    problems: &mut Vec<Problem>,
) -> pb::TrafficPolicy {
    let mut compiled = pb::TrafficPolicy::default();
    let Some(policy) = policy else {
        return compiled;
    };
    if let Some(timeout) = policy.timeout.as_deref() {
        match parse_go_duration(timeout) {
            Ok(duration) => compiled.timeout_ms = duration_ms(duration),
            Err(error) => problems.push(Problem::new(
                Reason::InvalidDuration,
                format!("spec.trafficPolicy.timeout: {error}"),
            )),
        }
    }
    if let Some(retry) = &policy.retry {
        match u32::try_from(retry.attempts) {
            Ok(attempts) => compiled.retry_attempts = attempts,
            Err(_) => problems.push(Problem::new(
                Reason::InvalidRetry,
                format!(
                    "spec.trafficPolicy.retry.attempts: {} is negative",
                    retry.attempts
                ),
            )),
        }
        let interval = match retry.retry_interval.as_deref() {
            None => Ok(DEFAULT_RETRY_INTERVAL),
            Some(text) => parse_go_duration(text),
        };
        match interval {
            Ok(duration) => compiled.retry_interval_ms = duration_ms(duration),
            Err(error) => problems.push(Problem::new(
                Reason::InvalidDuration,
                format!("spec.trafficPolicy.retry.retryInterval: {error}"),
            )),
        }
    }
    compiled
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The snapshot endpoint of a ready pod at `ip`, with the pod facts debug
/// dumps show (the ModelServer's port, no bootstrap port).
pub(crate) fn endpoint(name: &str, ip: IpAddr, pod: &Pod) -> pb::Endpoint {
    pb::Endpoint {
        name: name.to_owned(),
        ip: ip.to_string(),
        bootstrap_port: 0,
        port: 0,
        node_name: pod
            .spec
            .as_ref()
            .and_then(|spec| spec.node_name.clone())
            .unwrap_or_default(),
        start_time_unix_ms: pod
            .status
            .as_ref()
            .and_then(|status| status.start_time.as_ref())
            .map_or(0, |time| time.0.as_millisecond()),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
    }
}

/// The pod's IP when it may receive traffic: Running, condition Ready=True,
/// not being deleted, with a `status.podIP`. `Ok(None)` for a pod that is
/// not ready; an error for a ready pod whose `status.podIP` no request can
/// go to (not an IP address, unspecified, multicast or broadcast).
pub(crate) fn ready_pod_ip(pod: &Pod) -> Result<Option<IpAddr>, String> {
    if pod.metadata.deletion_timestamp.is_some() {
        return Ok(None);
    }
    let Some(status) = pod.status.as_ref() else {
        return Ok(None);
    };
    if status.phase.as_deref() != Some("Running") {
        return Ok(None);
    }
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|condition| condition.type_ == "Ready" && condition.status == "True");
    if !ready {
        return Ok(None);
    }
    // No address yet: not ready (as before the kubelet sets one).
    let Some(text) = non_empty(status.pod_ip.as_deref()) else {
        return Ok(None);
    };
    let ip: IpAddr = text
        .parse()
        .map_err(|_| format!("status.podIP {text:?} is not an IP address"))?;
    let unusable = if ip.is_unspecified() {
        Some("the unspecified address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if ip == IpAddr::V4(std::net::Ipv4Addr::BROADCAST) {
        Some("the broadcast address")
    } else {
        None
    };
    match unusable {
        Some(what) => Err(format!("status.podIP {text:?} is {what}")),
        None => Ok(Some(ip)),
    }
}
