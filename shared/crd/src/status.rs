//! Status of the custom resources: `observedGeneration` and Gateway-API-style conditions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Condition type: the object is valid enough to be compiled into a snapshot.
pub const CONDITION_ACCEPTED: &str = "Accepted";
/// Condition type: every object this one references exists.
pub const CONDITION_RESOLVED_REFS: &str = "ResolvedRefs";
/// Condition type: the snapshot holding this generation was ACKed by the dataplanes.
pub const CONDITION_PROGRAMMED: &str = "Programmed";
/// Condition type, present only while `True`: the object sets fields the
/// router does not act on (yet); the message names each one.
pub const CONDITION_IGNORED_FIELDS: &str = "IgnoredFields";

/// Condition type of an ExternalModelProvider: requests can be sent to it
/// (valid, credential resolved and deliverable to the dataplanes).
pub const CONDITION_READY: &str = "Ready";
/// Condition type of an ExternalModelProvider: its credential Secret and key were found.
pub const CONDITION_CREDENTIALS_RESOLVED: &str = "CredentialsResolved";

/// Observed state of a ModelRoute.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelRouteStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Current conditions, at most one per `type` (a list-map, so each writer can own its types).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".to_owned()]))]
    pub conditions: Vec<Condition>,
}

/// Observed state of a ModelServer.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelServerStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Current conditions, at most one per `type` (a list-map, so each writer can own its types).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".to_owned()]))]
    pub conditions: Vec<Condition>,
    /// Selected pods that are Running and Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_pods: Option<i32>,
    /// Selected pods in any state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_pods: Option<i32>,
    /// Prefill/decode ModelServers: groups (pods sharing a `groupKey` label
    /// value) with at least one ready pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pd_groups: Option<i32>,
    /// Prefill/decode ModelServers: groups with a ready prefill and a ready
    /// decode pod, the only ones requests can use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complete_pd_groups: Option<i32>,
    /// When the engine metrics of this ModelServer's pods were last scraped successfully (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub last_scrape_time: Option<String>,
}

/// Observed state of an ExternalModelProvider.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalModelProviderStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` and `CredentialsResolved`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".to_owned()]))]
    pub conditions: Vec<Condition>,
}
