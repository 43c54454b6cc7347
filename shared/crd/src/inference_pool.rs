//! `InferencePool` (`inference.networking.k8s.io/v1`, the Gateway API
//! Inference Extension): the model server pods an HTTPRoute can send to.
//! Like the Gateway API kinds, its CRD belongs to its project; Switchyard
//! reads the objects and writes their status.

use kube::CustomResource;
use serde::{Deserialize, Serialize};

use crate::gateway_api::{MatchLabels, ParentStatus};

/// API group of InferencePool.
pub const INFERENCE_API_GROUP: &str = "inference.networking.k8s.io";

/// A pool of model server pods and the ports they serve on.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "inference.networking.k8s.io",
    version = "v1",
    kind = "InferencePool",
    namespaced,
    status = "InferencePoolStatus",
    derive = "PartialEq",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoolSpec {
    /// Pods of the pool's namespace carrying these labels.
    #[serde(default)]
    pub selector: PoolSelector,
    /// Every port is an endpoint of every selected pod (data-parallel ranks).
    #[serde(default)]
    pub target_ports: Vec<PoolPort>,
    /// `http` (default) or `kubernetes.io/h2c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    /// The endpoint picker other gateways call; Switchyard picks endpoints itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_picker_ref: Option<serde_json::Value>,
}

/// Which pods are members.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolSelector {
    #[serde(default)]
    pub match_labels: MatchLabels,
}

/// A port of the pool's pods.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct PoolPort {
    pub number: i32,
}

/// Observed state: one entry per parent Gateway routing to the pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoolStatus {
    #[serde(default)]
    pub parents: Vec<ParentStatus>,
}
