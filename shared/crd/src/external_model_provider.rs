//! `ExternalModelProvider`: an OpenAI- or Anthropic-compatible service
//! outside the cluster that ModelRoute targets may send requests to.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::ExternalModelProviderStatus;

/// A public or private AI provider reached over HTTPS with a credential from a Secret.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "networking.serving.volcano.sh",
    version = "v1alpha1",
    kind = "ExternalModelProvider",
    doc = "An OpenAI- or Anthropic-compatible model provider outside the cluster, reached over HTTPS.",
    namespaced,
    status = "ExternalModelProviderStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"TYPE","type":"string","jsonPath":".spec.providerType"}"#,
    printcolumn = r#"{"name":"BASE-URL","type":"string","jsonPath":".spec.baseURL"}"#,
    printcolumn = r#"{"name":"READY","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"REASON","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ExternalModelProviderSpec {
    /// The provider's API: `OpenAI` (default) or `Anthropic`.
    #[serde(default)]
    pub provider_type: ProviderType,
    /// When set, the request's `model` is replaced by this before it is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub model: Option<String>,
    /// `https://host[:port][/path]`; the request path is appended to it.
    #[serde(rename = "baseURL")]
    #[schemars(length(min = 1), regex(pattern = r"^https://.+"))]
    pub base_url: String,
    /// Skip verification of the provider's certificate (the connection is still TLS).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
    /// The credential sent with every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<ProviderAuth>,
    /// Static headers added to every upstream request.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// The API a provider speaks.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ProviderType {
    /// `/v1/chat/completions`, `/v1/completions`, `/v1/responses`, `/v1/embeddings`.
    #[default]
    OpenAI,
    /// `/v1/messages`.
    Anthropic,
}

impl ProviderType {
    /// The type's name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAI => "OpenAI",
            Self::Anthropic => "Anthropic",
        }
    }

    /// The scheme used when `auth.scheme` is not set, as each provider expects.
    pub fn default_scheme(self) -> AuthScheme {
        match self {
            Self::OpenAI => AuthScheme::Bearer,
            Self::Anthropic => AuthScheme::APIKey,
        }
    }
}

/// How the provider credential is sent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderAuth {
    /// `Bearer` (`Authorization: Bearer …`) or `APIKey` (`x-api-key: …`); the
    /// default is Bearer for OpenAI and APIKey for Anthropic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<AuthScheme>,
    /// The key of a Secret in the provider's namespace holding the credential.
    pub secret_ref: SecretKeySelector,
}

/// Where a provider credential is sent.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum AuthScheme {
    /// `Authorization: Bearer <credential>`.
    Bearer,
    /// `x-api-key: <credential>`.
    #[allow(clippy::upper_case_acronyms)]
    APIKey,
}

/// A key of a Secret in the same namespace (core/v1 `SecretKeySelector`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
// A provider without its credential cannot serve, so the reference may not be optional.
#[x_kube(validation = Rule::new("!has(self.optional) || !self.optional")
    .message("auth.secretRef.optional must be false: a provider needs its credential"))]
#[serde(rename_all = "camelCase")]
pub struct SecretKeySelector {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The Secret's data key holding the credential.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
    /// Must be false or unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}

/// The label a Secret must carry (value `"true"`) to be usable as a provider
/// credential: the controller reads only those Secrets, as Kthena's router does.
pub const PROVIDER_CREDENTIAL_LABEL: &str =
    "networking.serving.volcano.sh/external-model-provider-credential";
