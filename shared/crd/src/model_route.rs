//! `ModelRoute`: which request `model` values go to which ModelServers.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::ModelRouteStatus;

/// Routes requests by their `model` (or LoRA adapter name) to weighted ModelServers.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "networking.serving.volcano.sh",
    version = "v1alpha1",
    kind = "ModelRoute",
    doc = "Routes OpenAI-style requests by their `model` (or LoRA adapter name) to weighted ModelServers.",
    namespaced,
    status = "ModelRouteStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"MODEL","type":"string","jsonPath":".spec.modelName"}"#,
    printcolumn = r#"{"name":"ACCEPTED","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"PROGRAMMED","type":"string","jsonPath":".status.conditions[?(@.type==\"Programmed\")].status"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
// `has()` guards: both fields are optional, and CEL errors (rather than yields false) on a missing field.
#[x_kube(validation = Rule::new(
    "(has(self.modelName) && self.modelName != '') || (has(self.loraAdapters) && size(self.loraAdapters) > 0)"
).message("ModelName and LoraAdapters cannot both be empty"))]
// A LoRA adapter name only means something to the pods that loaded it, never to an external provider.
#[x_kube(validation = Rule::new(
    "!has(self.loraAdapters) || size(self.loraAdapters) == 0 || self.rules.all(r, r.targetModels.all(t, !has(t.externalModelProviderName) || t.externalModelProviderName == ''))"
).message("a route with loraAdapters cannot target an ExternalModelProvider"))]
#[serde(rename_all = "camelCase")]
pub struct ModelRouteSpec {
    /// The request `model` this route serves (a base model, LoRA or virtual name). Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("modelName is immutable"))]
    pub model_name: Option<String>,
    /// Further request `model` values (LoRA adapter names) this route serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10), inner(length(min = 1)))]
    pub lora_adapters: Vec<String>,
    /// Gateways this route attaches to (accepted for compatibility).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    // Gateway API's own bound for a route's parentRefs.
    #[schemars(length(max = 32))]
    pub parent_refs: Vec<ParentReference>,
    /// Ordered rules; the first whose `modelMatch` holds wins.
    // Spelled out because `KubeSchema` re-declares this struct inside a function that imports
    // `kube::core::Rule` (the CEL rule type), which would shadow our `Rule` there.
    #[schemars(length(max = 16))]
    pub rules: Vec<crate::model_route::Rule>,
    /// Token rate limit for the whole route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// A Gateway API `ParentReference` (gateway.networking.k8s.io/v1).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParentReference {
    /// API group of the parent; absent = `gateway.networking.k8s.io`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Kind of the parent; absent = `Gateway`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Namespace of the parent; absent = the route's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name of the parent.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// A listener of the parent Gateway; absent = all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    /// A listener port of the parent Gateway; absent = all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
}

/// One routing rule: a match and the weighted targets it sends to.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
// Weights are relative, so a rule whose weights are all 0 could never pick a target.
#[x_kube(validation = Rule::new("self.targetModels.exists(t, !has(t.weight) || t.weight > 0)")
    .message("the weights of a rule's targetModels must not all be 0"))]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// A label for humans and logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Conditions on the request; absent = match every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_match: Option<ModelMatch>,
    /// Weighted destinations.
    #[schemars(length(min = 1, max = 16))]
    pub target_models: Vec<TargetModel>,
}

/// Conditions on a request; all present conditions must hold.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelMatch {
    /// Every listed header must match (a missing header is the empty string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, StringMatch>>,
    /// Matched against the request path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<StringMatch>,
    /// Matched against the request body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<BodyMatch>,
}

/// Conditions on the request body.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BodyMatch {
    /// Exact value of the body's `model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// Matches a string exactly, by prefix, or by regular expression (unanchored). Only one
/// may be set: the schema accepts several, as Kthena's API does, and the controller
/// rejects such a route (reason `InvalidMatch`) rather than guess. None set = matches anything.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StringMatch {
    /// The whole value equals this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// The value starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// RE2 syntax, unanchored: matching anywhere in the value is enough.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// A weighted destination of a rule.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[x_kube(validation = Rule::new(
    "(has(self.modelServerName) && self.modelServerName != '') != (has(self.externalModelProviderName) && self.externalModelProviderName != '')"
).message("exactly one of modelServerName and externalModelProviderName must be set"))]
#[serde(rename_all = "camelCase")]
pub struct TargetModel {
    /// A ModelServer in the route's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub model_server_name: Option<String>,
    /// An ExternalModelProvider in the route's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub external_model_provider_name: Option<String>,
    /// Relative weight, 0..=100; default 100.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 0, max = 100))]
    pub weight: u32,
}

/// Default target weight, as in Kthena's API.
pub const DEFAULT_TARGET_WEIGHT: u32 = 100;

fn default_weight() -> u32 {
    DEFAULT_TARGET_WEIGHT
}

/// Token rate limit of a route.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Prompt tokens allowed per `unit`; absent = unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub input_tokens_per_unit: Option<u32>,
    /// Completion tokens allowed per `unit`; absent = unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub output_tokens_per_unit: Option<u32>,
    /// The period the token counts apply to; default `second`.
    #[serde(default)]
    pub unit: RateLimitUnit,
    /// A budget shared by every router through Redis; absent = each router enforces the limit on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global: Option<GlobalRateLimit>,
}

/// Where a limit shared by every router lives.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GlobalRateLimit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisAddress>,
    /// What routers do while Redis cannot be reached: `FailOpen` (default)
    /// admits requests unlimited, `FailClose` refuses them. A Switchyard field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_mode: Option<FailureMode>,
}

/// A Redis server.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct RedisAddress {
    /// Redis `host:port`.
    pub address: String,
}

/// What a global limit does while its store is unreachable.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum FailureMode {
    /// Admit requests without limiting them.
    #[default]
    FailOpen,
    /// Refuse requests.
    FailClose,
}

/// The period a rate limit's token counts apply to.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitUnit {
    #[default]
    Second,
    Minute,
    Hour,
    Day,
    /// 30 days.
    Month,
}

impl RateLimitUnit {
    /// The unit's name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Second => "second",
            Self::Minute => "minute",
            Self::Hour => "hour",
            Self::Day => "day",
            Self::Month => "month",
        }
    }
}
