//! InferencePool validation and endpoint selection: every ready pod its
//! selector matches, on every target port (one endpoint per pod and port).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use k8s_openapi::api::core::v1::Pod;
use serde::Serialize;
use switchyard_crd::{InferenceEngine, InferencePool};
use switchyard_snapshot::{object_key, pb};

use super::super::pod_index::{PodIndex, format_labels};
use super::super::report::{ConditionReport, Problem, Reason};
use super::super::servers::{endpoint, ready_pod_ip};
use super::super::{non_empty, start_validation};
use crate::scrape::ScrapeTarget;

/// The API's bound on `targetPorts` (data-parallel ranks of one pod).
const MAX_TARGET_PORTS: usize = 8;
/// `appProtocol` values dataplanes speak to pods (HTTP/1.1).
const SUPPORTED_APP_PROTOCOL: &str = "http";

/// What the compile concluded about an InferencePool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoolReport {
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    pub accepted: ConditionReport,
    pub resolved_refs: ConditionReport,
    pub ready_pods: u32,
    pub total_pods: u32,
    /// The Gateways of Switchyard's that route to it, through the HTTPRoutes
    /// in the snapshot; filled in once routes are compiled.
    pub parents: Vec<PoolParentReport>,
}

/// The pool's state with respect to one Gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolParentReport {
    pub gateway_namespace: String,
    pub gateway_name: String,
    /// `namespace/name` of the HTTPRoutes through which the Gateway routes here.
    pub routes: Vec<String>,
}

/// A pool that passed validation.
pub(crate) struct CompiledPool {
    pub pool: pb::InferencePool,
    /// One per ready pod on its first target port (an engine's `/metrics`
    /// covers its ranks).
    pub scrape_targets: Vec<ScrapeTarget>,
}

/// Validates one InferencePool and selects its endpoints.
pub(crate) fn compile_pool(
    pool: &InferencePool,
    pods: &PodIndex<'_>,
) -> (Option<CompiledPool>, InferencePoolReport) {
    let (namespace, name, mut problems) = start_validation(&pool.metadata, Reason::InvalidName);
    let spec = &pool.spec;
    if spec.selector.match_labels.is_empty() {
        problems.push(Problem::new(
            Reason::InvalidSelector,
            "spec.selector.matchLabels: must not be empty (an empty selector would select no pod)",
        ));
    }
    let mut ports = Vec::new();
    let mut seen = BTreeSet::new();
    if spec.target_ports.is_empty() || spec.target_ports.len() > MAX_TARGET_PORTS {
        problems.push(Problem::new(
            Reason::InvalidPort,
            format!(
                "spec.targetPorts: {} ports; 1 to {MAX_TARGET_PORTS} are required",
                spec.target_ports.len()
            ),
        ));
    }
    for (index, port) in spec.target_ports.iter().enumerate() {
        match u16::try_from(port.number).ok().filter(|port| *port != 0) {
            Some(number) if seen.insert(number) => ports.push(number),
            Some(number) => problems.push(Problem::new(
                Reason::InvalidPort,
                format!("spec.targetPorts[{index}].number: {number} is listed twice"),
            )),
            None => problems.push(Problem::new(
                Reason::InvalidPort,
                format!(
                    "spec.targetPorts[{index}].number: {} is outside 1..=65535",
                    port.number
                ),
            )),
        }
    }
    if let Some(protocol) = non_empty(spec.app_protocol.as_deref())
        && !protocol.eq_ignore_ascii_case(SUPPORTED_APP_PROTOCOL)
    {
        problems.push(Problem::new(
            Reason::UnsupportedProtocol,
            format!(
                "spec.appProtocol {protocol:?} is not supported: dataplanes speak http to pods"
            ),
        ));
    }
    let generation = pool.metadata.generation;
    let report =
        |accepted: ConditionReport, resolved_refs, ready_pods, total_pods| InferencePoolReport {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            generation,
            accepted,
            resolved_refs,
            ready_pods,
            total_pods,
            parents: Vec::new(),
        };
    if !problems.is_empty() {
        let accepted = ConditionReport::from_problems(&problems, Reason::Accepted, "");
        let resolved_refs = ConditionReport {
            status: false,
            reason: accepted.reason,
            message: "not evaluated: the InferencePool was not accepted".to_owned(),
        };
        return (None, report(accepted, resolved_refs, 0, 0));
    }
    let accepted = ConditionReport::ok(
        Reason::Accepted,
        if spec.endpoint_picker_ref.is_some() {
            "spec.endpointPickerRef is not called: Switchyard's dataplanes pick the endpoints themselves"
        } else {
            ""
        },
    );
    let selected = pods.select(namespace, &spec.selector.match_labels);
    // A ready pod without a usable address is no endpoint (its ModelServer, if any, names it).
    let ready: Vec<(&str, &Pod, std::net::IpAddr)> = selected
        .iter()
        .filter_map(|(pod_name, pod)| {
            ready_pod_ip(pod)
                .ok()
                .flatten()
                .map(|ip| (*pod_name, *pod, ip))
        })
        .collect();
    let total_pods = u32::try_from(selected.len()).unwrap_or(u32::MAX);
    let ready_pods = u32::try_from(ready.len()).unwrap_or(u32::MAX);
    let resolved_refs = if selected.is_empty() {
        ConditionReport {
            status: false,
            reason: Reason::NoMatchingPods,
            message: format!(
                "spec.selector.matchLabels: {} selects no pod in namespace {namespace}; requests routed here get 503",
                format_labels(&spec.selector.match_labels)
            ),
        }
    } else {
        ConditionReport::ok(
            Reason::ResolvedRefs,
            format!(
                "{ready_pods} of {total_pods} selected pods ready, {} endpoints per pod",
                ports.len()
            ),
        )
    };
    let mut sorted_ports = ports.clone();
    sorted_ports.sort_unstable();
    let mut endpoints = Vec::with_capacity(ready.len() * ports.len());
    for (pod_name, pod, ip) in &ready {
        for port in &sorted_ports {
            endpoints.push(pb::Endpoint {
                port: u32::from(*port),
                ..endpoint(pod_name, *ip, pod)
            });
        }
    }
    let first_port = ports.first().copied().unwrap_or_default();
    let scrape_targets = ready
        .iter()
        .map(|(pod_name, _, ip)| ScrapeTarget {
            key: object_key(namespace, pod_name),
            addr: SocketAddr::new(*ip, first_port),
            // The Inference Extension's model server protocol is vLLM's
            // metric names; a pod a ModelServer also selects is scraped as
            // that ModelServer says.
            engine: InferenceEngine::Vllm,
        })
        .collect();
    let compiled = CompiledPool {
        pool: pb::InferencePool {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            endpoints,
            generation: generation.unwrap_or(0),
        },
        scrape_targets,
    };
    (
        Some(compiled),
        report(accepted, resolved_refs, ready_pods, total_pods),
    )
}

/// Which pools an HTTPRoute sends to, through which Gateways.
#[derive(Debug, Default)]
pub(crate) struct PoolReferences {
    /// `namespace/name` of the route.
    pub route: String,
    /// Gateway keys of the listeners the route serves on.
    pub gateways: BTreeSet<String>,
    /// Pool keys its kept rules name (whether or not the pool was accepted).
    pub pools: BTreeSet<String>,
}

/// Fills each pool report's parents: a Gateway of Switchyard's is a pool's
/// parent when a route serving on one of its listeners has a rule that
/// sends to the pool.
pub(crate) fn fill_parents(reports: &mut [InferencePoolReport], references: &[PoolReferences]) {
    let mut parents: BTreeMap<&str, BTreeMap<&str, BTreeSet<&str>>> = BTreeMap::new();
    for reference in references {
        for pool in &reference.pools {
            let pool = parents.entry(pool.as_str()).or_default();
            for gateway in &reference.gateways {
                pool.entry(gateway.as_str())
                    .or_default()
                    .insert(reference.route.as_str());
            }
        }
    }
    for report in reports {
        let key = object_key(&report.namespace, &report.name);
        let Some(gateways) = parents.get(key.as_str()) else {
            continue;
        };
        report.parents = gateways
            .iter()
            .filter_map(|(gateway, routes)| {
                let (namespace, name) = gateway.split_once('/')?;
                Some(PoolParentReport {
                    gateway_namespace: namespace.to_owned(),
                    gateway_name: name.to_owned(),
                    routes: routes.iter().map(|route| (*route).to_owned()).collect(),
                })
            })
            .collect();
    }
}
