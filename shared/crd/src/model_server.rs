//! `ModelServer`: a set of model pods and how to talk to them.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::ModelServerStatus;

/// A group of inference pods serving one model with one engine.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "networking.serving.volcano.sh",
    version = "v1alpha1",
    kind = "ModelServer",
    doc = "A group of inference pods serving one model with one engine, and how to reach them.",
    namespaced,
    status = "ModelServerStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"ENGINE","type":"string","jsonPath":".spec.inferenceEngine"}"#,
    printcolumn = r#"{"name":"PORT","type":"integer","jsonPath":".spec.workloadPort.port"}"#,
    printcolumn = r#"{"name":"READY-PODS","type":"integer","jsonPath":".status.readyPods"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ModelServerSpec {
    /// When set, requests (other than LoRA matches) have their `model` rewritten to this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub model: Option<String>,
    /// The engine behind the pods; selects the metrics parser.
    pub inference_engine: InferenceEngine,
    /// Selects the pods (in the ModelServer's namespace).
    pub workload_selector: WorkloadSelector,
    /// Port used for inference, `/metrics` and `/v1/models`.
    pub workload_port: WorkloadPort,
    /// Timeouts and retries towards the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
    /// How the router shapes the prefill and decode requests of a
    /// prefill/decode ModelServer (`workloadSelector.pdGroup`); without it,
    /// SGLang engines use SGLang's bootstrap protocol and vLLM engines `http`.
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
    /// Labels every selected pod carries. At least one: an empty selector would select every
    /// pod in the namespace.
    #[serde(default)]
    #[schemars(transform = require_at_least_one_property)]
    pub match_labels: BTreeMap<String, String>,
    /// Enables prefill/decode-disaggregated routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pd_group: Option<PdGroup>,
}

/// Prefill/decode disaggregation: every request goes to a prefill pod and a
/// decode pod of the same group.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PdGroup {
    /// Label key; a prefill and a decode pod pair only if their values for it are equal.
    #[schemars(length(min = 1))]
    pub group_key: String,
    /// Labels of the prefill pods.
    #[schemars(transform = require_at_least_one_property)]
    pub prefill_labels: BTreeMap<String, String>,
    /// Labels of the decode pods.
    #[schemars(transform = require_at_least_one_property)]
    pub decode_labels: BTreeMap<String, String>,
}

/// Label maps are required and non-empty in the API; the schema default `{}` that
/// `#[serde(default)]` would add is dropped because the API server would fill it in
/// and then reject it with a less helpful message.
fn require_at_least_one_property(schema: &mut schemars::Schema) {
    schema.remove("default");
    schema.insert("minProperties".to_owned(), 1.into());
}

/// The pods' serving port.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadPort {
    /// The pods' container port.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// `http` or `https`; default `http`.
    #[serde(default = "default_protocol")]
    #[schemars(extend("enum" = ["http", "https"]))]
    pub protocol: String,
}

/// Engines serve plain HTTP unless configured otherwise, and Kthena's API defaults to it.
pub const DEFAULT_WORKLOAD_PROTOCOL: &str = "http";

fn default_protocol() -> String {
    DEFAULT_WORKLOAD_PROTOCOL.to_owned()
}

/// Timeouts and retries towards the pods.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    /// Bounds connect + send + wait for response headers (Go duration, e.g. `10s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new(GO_DURATION_RULE)
        .message("timeout must be a non-negative Go duration such as 10s, 1m30s or 500ms"))]
    pub timeout: Option<String>,
    /// Retry policy towards the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
}

/// What [`crate::parse_go_duration`] accepts, as a CEL rule. A regular expression rather
/// than `duration(self)`, because a string `duration()` cannot parse is an evaluation error,
/// which the API server reports without the rule's message.
const GO_DURATION_RULE: &str =
    "self == '0' || self.matches('^(([0-9]+([.][0-9]*)?|[.][0-9]+)(ns|us|µs|μs|ms|s|m|h))+$')";

/// Retry policy towards the pods.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retry {
    /// How many times a failed request is retried.
    #[serde(default)]
    #[schemars(transform = without_default)]
    pub attempts: i32,
    /// Go duration; default `100ms`.
    #[serde(
        default = "default_retry_interval",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(extend("default" = DEFAULT_RETRY_INTERVAL), length(max = 64))]
    #[x_kube(validation = Rule::new(GO_DURATION_RULE)
        .message("retryInterval must be a non-negative Go duration such as 100ms or 1s"))]
    pub retry_interval: Option<String>,
}

/// Kthena's API default: short enough not to add visible latency to a retried request.
pub const DEFAULT_RETRY_INTERVAL: &str = "100ms";

fn default_retry_interval() -> Option<String> {
    Some(DEFAULT_RETRY_INTERVAL.to_owned())
}

/// `attempts` has no default in Kthena's API; `#[serde(default)]` is only there so a
/// missing value reads as 0 in Rust, and must not become a schema default.
fn without_default(schema: &mut schemars::Schema) {
    schema.remove("default");
}

/// KV connector of a prefill/decode ModelServer.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KvConnector {
    /// `http` | `lmcache` | `nixl` | `mooncake`; default `http`.
    #[serde(
        default = "default_kv_connector_type",
        rename = "type",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(extend("enum" = ["http", "lmcache", "nixl", "mooncake"], "default" = DEFAULT_KV_CONNECTOR_TYPE))]
    pub connector_type: Option<String>,
}

/// Kthena's API default: the plain HTTP connector needs no extra engine setup.
pub const DEFAULT_KV_CONNECTOR_TYPE: &str = "http";

fn default_kv_connector_type() -> Option<String> {
    Some(DEFAULT_KV_CONNECTOR_TYPE.to_owned())
}
