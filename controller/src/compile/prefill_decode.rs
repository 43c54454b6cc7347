//! Prefill/decode ModelServers (`workloadSelector.pdGroup`): which connector
//! shapes the two legs of a request, and which ready pods pair up.
//!
//! A selected pod is a decode pod when it carries every `decodeLabels` pair
//! (checked first, as Kthena does), else a prefill pod when it carries every
//! `prefillLabels` pair; its group is the value of its `groupKey` label. A
//! prefill and a decode pod pair only within one group, so a group needs at
//! least one ready pod of each role to serve anything ("complete").

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
use switchyard_crd::{InferenceEngine, ModelServerSpec, PdGroup};
use switchyard_snapshot::pb;

use super::pod_index::selector_matches;
use super::report::{Problem, Reason};

/// Pod annotation naming an SGLang prefill pod's KV bootstrap port, as
/// SGLang's own router reads it.
pub const SGLANG_BOOTSTRAP_PORT_ANNOTATION: &str = "sglang.ai/bootstrap-port";

/// Incomplete groups named one by one in a status message; beyond this the
/// message only counts them (a message is for humans, not an inventory).
const NAMED_INCOMPLETE_GROUPS: usize = 5;

/// The connector the two legs of a request use: `spec.kvConnector.type`
/// (its default `http` when the object is present but the type is not),
/// else SGLang's bootstrap protocol for an SGLang engine, else `http`.
pub(crate) fn kv_connector(spec: &ModelServerSpec) -> Result<pb::KvConnector, Problem> {
    let Some(connector) = &spec.kv_connector else {
        return Ok(match spec.inference_engine {
            InferenceEngine::Sglang => pb::KvConnector::Sglang,
            InferenceEngine::Vllm => pb::KvConnector::Http,
        });
    };
    let name = connector
        .connector_type
        .as_deref()
        .unwrap_or(switchyard_crd::DEFAULT_KV_CONNECTOR_TYPE);
    match name {
        "http" => Ok(pb::KvConnector::Http),
        "lmcache" => Ok(pb::KvConnector::Lmcache),
        "nixl" => Ok(pb::KvConnector::Nixl),
        "mooncake" => Ok(pb::KvConnector::Mooncake),
        other => Err(Problem::new(
            Reason::InvalidKvConnector,
            format!(
                "spec.kvConnector.type: unknown connector {other:?}; use http, lmcache, nixl or mooncake"
            ),
        )),
    }
}

/// Problems of a `pdGroup` that would make it select nothing useful.
pub(crate) fn validate(group: &PdGroup, problems: &mut Vec<Problem>) {
    let path = "spec.workloadSelector.pdGroup";
    if group.group_key.is_empty() {
        problems.push(Problem::new(
            Reason::InvalidSelector,
            format!("{path}.groupKey: must name a pod label"),
        ));
    }
    for (field, labels) in [
        ("prefillLabels", &group.prefill_labels),
        ("decodeLabels", &group.decode_labels),
    ] {
        if labels.is_empty() {
            problems.push(Problem::new(
                Reason::InvalidSelector,
                format!("{path}.{field}: must not be empty (it would match every pod)"),
            ));
        }
    }
    if !group.prefill_labels.is_empty() && group.prefill_labels == group.decode_labels {
        problems.push(Problem::new(
            Reason::InvalidSelector,
            format!(
                "{path}: prefillLabels and decodeLabels are equal, so every pod is a decode pod and none can prefill"
            ),
        ));
    }
}

/// A selected pod that is ready to receive traffic.
pub(crate) struct ReadyPod<'a> {
    pub name: &'a str,
    pub pod: &'a Pod,
    pub ip: IpAddr,
}

/// The outcome of grouping a ModelServer's pods.
pub(crate) struct Grouping<'a> {
    pub prefill_decode: pb::PrefillDecode,
    /// Ready pods in a group, sorted by name, with their bootstrap port (0 = unset).
    pub endpoints: Vec<(&'a ReadyPod<'a>, u32)>,
    /// Groups with at least one ready pod.
    pub groups: u32,
    /// Groups with a ready prefill and a ready decode pod.
    pub complete: u32,
    /// For humans: incomplete groups, pods without a role or a group, bad annotations.
    pub notes: Vec<String>,
}

#[derive(Default)]
struct GroupPods<'a> {
    prefill: Vec<&'a str>,
    decode: Vec<&'a str>,
}

/// Sorts the `selected` pods (sorted by name) into roles and groups;
/// `ready` are those of them that may receive traffic, in the same order.
pub(crate) fn group<'a>(
    group: &PdGroup,
    connector: pb::KvConnector,
    selected: &[(&'a str, &'a Pod)],
    ready: &'a [ReadyPod<'a>],
) -> Grouping<'a> {
    let mut notes = Vec::new();
    let (mut without_role, mut without_group) = (Vec::new(), Vec::new());
    for (name, pod) in selected {
        match role_and_group(group, pod) {
            (None, _) => without_role.push(*name),
            (Some(_), None) => without_group.push(*name),
            _ => {}
        }
    }
    let mut groups: BTreeMap<&'a str, GroupPods<'a>> = BTreeMap::new();
    let mut endpoints = Vec::with_capacity(ready.len());
    for ready_pod in ready {
        let (Some(is_decode), Some(value)) = role_and_group(group, ready_pod.pod) else {
            continue;
        };
        let pods = groups.entry(value).or_default();
        let bootstrap_port = if is_decode {
            pods.decode.push(ready_pod.name);
            0
        } else {
            pods.prefill.push(ready_pod.name);
            if connector == pb::KvConnector::Sglang {
                bootstrap_port(ready_pod, &mut notes)
            } else {
                0
            }
        };
        endpoints.push((ready_pod, bootstrap_port));
    }
    let complete = groups
        .values()
        .filter(|pods| !pods.prefill.is_empty() && !pods.decode.is_empty())
        .count();
    let incomplete: Vec<String> = groups
        .iter()
        .filter(|(_, pods)| pods.prefill.is_empty() || pods.decode.is_empty())
        .map(|(name, pods)| {
            let missing = if pods.prefill.is_empty() {
                "prefill"
            } else {
                "decode"
            };
            format!("{name} (no ready {missing} pod)")
        })
        .collect();
    if !incomplete.is_empty() {
        let mut note = format!("incomplete groups: {}", incomplete.len());
        let named = incomplete.iter().take(NAMED_INCOMPLETE_GROUPS);
        let _ = write!(note, " [{}]", named.cloned().collect::<Vec<_>>().join(", "));
        notes.push(note);
    }
    for (pods, what) in [
        (
            &without_role,
            "match neither prefillLabels nor decodeLabels and get no traffic",
        ),
        (&without_group, "have no group label and get no traffic"),
    ] {
        if let Some(first) = pods.first() {
            notes.push(format!(
                "{} selected pods (first: {first}) {what}",
                pods.len()
            ));
        }
    }
    let group_count = groups.len();
    Grouping {
        prefill_decode: pb::PrefillDecode {
            kv_connector: connector.into(),
            group_label: group.group_key.clone(),
            groups: groups
                .into_iter()
                .map(|(name, pods)| pb::PdGroup {
                    name: name.to_owned(),
                    prefill: pods.prefill.into_iter().map(str::to_owned).collect(),
                    decode: pods.decode.into_iter().map(str::to_owned).collect(),
                })
                .collect(),
        },
        endpoints,
        groups: u32::try_from(group_count).unwrap_or(u32::MAX),
        complete: u32::try_from(complete).unwrap_or(u32::MAX),
        notes,
    }
}

/// (is a decode pod, group) of `pod`: role None when it matches neither
/// role's labels, group None when it lacks the group label.
fn role_and_group<'a>(group: &PdGroup, pod: &'a Pod) -> (Option<bool>, Option<&'a str>) {
    let role = if selector_matches(&group.decode_labels, pod) {
        Some(true)
    } else if selector_matches(&group.prefill_labels, pod) {
        Some(false)
    } else {
        None
    };
    let value = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(&group.group_key))
        .map(String::as_str);
    (role, value)
}

/// The pod's `sglang.ai/bootstrap-port` annotation as a port, 0 when absent
/// or unusable (a note says which).
fn bootstrap_port(pod: &ReadyPod<'_>, notes: &mut Vec<String>) -> u32 {
    let Some(value) = pod
        .pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(SGLANG_BOOTSTRAP_PORT_ANNOTATION))
    else {
        return 0;
    };
    match value.trim().parse::<u16>() {
        Ok(port) if port != 0 => u32::from(port),
        _ => {
            notes.push(format!(
                "pod {}: annotation {SGLANG_BOOTSTRAP_PORT_ANNOTATION} {value:?} is not a port in 1..=65535; the engine's default bootstrap port is used",
                pod.name
            ));
            0
        }
    }
}
