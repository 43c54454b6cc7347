//! `ModelRoute`: which request `model` values go to which ModelServers.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::ModelRouteStatus;

/// Routes requests by their `model` (or LoRA adapter name) to weighted ModelServers.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "networking.serving.volcano.sh",
    version = "v1alpha1",
    kind = "ModelRoute",
    namespaced,
    status = "ModelRouteStatus",
    printcolumn = r#"{"name":"MODEL","type":"string","jsonPath":".spec.modelName"}"#,
    printcolumn = r#"{"name":"ACCEPTED","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"PROGRAMMED","type":"string","jsonPath":".status.conditions[?(@.type==\"Programmed\")].status"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ModelRouteSpec {
    /// The request `model` this route serves (a base model, LoRA or virtual name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_name: Option<String>,
    /// Further request `model` values (LoRA adapter names) this route serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lora_adapters: Vec<String>,
    /// Gateways this route attaches to (accepted for compatibility).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parent_refs: Vec<ParentReference>,
    /// Ordered rules; the first whose `modelMatch` holds wins.
    pub rules: Vec<Rule>,
    /// Token rate limit for the whole route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// A Gateway API `ParentReference` (gateway.networking.k8s.io/v1).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParentReference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
}

/// One routing rule: a match and the weighted targets it sends to.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// A label for humans and logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Conditions on the request; absent = match every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_match: Option<ModelMatch>,
    /// Weighted destinations.
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

/// Matches a string exactly, by prefix, or by regular expression (unanchored).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StringMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// A weighted destination of a rule.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetModel {
    /// A ModelServer in the route's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_server_name: Option<String>,
    /// An ExternalModelProvider in the route's namespace (not served by Switchyard yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_model_provider_name: Option<String>,
    /// Relative weight, 0..=100; default 100.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// Default target weight, as in the reference API.
pub const DEFAULT_TARGET_WEIGHT: u32 = 100;

fn default_weight() -> u32 {
    DEFAULT_TARGET_WEIGHT
}

/// Token rate limit of a route.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens_per_unit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens_per_unit: Option<u32>,
    #[serde(default)]
    pub unit: RateLimitUnit,
    /// A Redis-backed limit shared by every router (accepted for compatibility).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global: Option<serde_json::Value>,
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
