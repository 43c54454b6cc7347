//! `ModelServer`: a set of model pods and how to talk to them.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::ModelServerStatus;

/// A group of inference pods serving one model with one engine.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "networking.serving.volcano.sh",
    version = "v1alpha1",
    kind = "ModelServer",
    namespaced,
    status = "ModelServerStatus",
    printcolumn = r#"{"name":"ENGINE","type":"string","jsonPath":".spec.inferenceEngine"}"#,
    printcolumn = r#"{"name":"PORT","type":"integer","jsonPath":".spec.workloadPort.port"}"#,
    printcolumn = r#"{"name":"READY-PODS","type":"integer","jsonPath":".status.readyPods"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ModelServerSpec {
    /// When set, requests (other than LoRA matches) have their `model` rewritten to this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The engine behind the pods; selects the metrics parser.
    pub inference_engine: InferenceEngine,
    /// Selects the pods (in the ModelServer's namespace).
    pub workload_selector: WorkloadSelector,
    /// Port used for inference, `/metrics` and `/v1/models`.
    pub workload_port: WorkloadPort,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
    /// Prefill/decode KV connector (accepted for compatibility).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_connector: Option<KvConnector>,
}

/// Inference engines whose metrics Switchyard understands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum InferenceEngine {
    #[serde(rename = "vLLM")]
    Vllm,
    #[serde(rename = "SGLang")]
    Sglang,
}

impl InferenceEngine {
    /// The engine's name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vllm => "vLLM",
            Self::Sglang => "SGLang",
        }
    }
}

/// Which pods belong to the ModelServer.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pd_group: Option<PdGroup>,
}

/// Prefill/decode disaggregation groups (accepted for compatibility).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PdGroup {
    pub group_key: String,
    pub prefill_labels: BTreeMap<String, String>,
    pub decode_labels: BTreeMap<String, String>,
}

/// The pods' serving port.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadPort {
    pub port: i32,
    /// `http` or `https`; default `http`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
}

fn default_protocol() -> String {
    "http".to_owned()
}

/// Timeouts and retries towards the pods.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    /// Bounds connect + send + wait for response headers (Go duration, e.g. `10s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
}

/// Retry policy towards the pods.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retry {
    #[serde(default)]
    pub attempts: i32,
    /// Go duration; default `100ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_interval: Option<String>,
}

/// KV connector for prefill/decode disaggregation.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KvConnector {
    /// `http` | `lmcache` | `nixl` | `mooncake`; default `http`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub connector_type: Option<String>,
}
