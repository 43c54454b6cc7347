//! What a compile reads of the objects, whichever source read them.

use k8s_openapi::api::core::v1::Pod;
use serde::Serialize;
use switchyard_crd::{
    ExternalModelProvider, Gateway, GatewayClass, HTTPRoute, InferencePool, ModelRoute, ModelServer,
};

use super::providers::CredentialSecret;
use crate::auth::ApiKeySecret;

/// One consistent set of objects: the config directory's files (local mode)
/// or the Kubernetes caches after a burst of watch events.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ObjectSet {
    pub routes: Vec<ModelRoute>,
    pub servers: Vec<ModelServer>,
    pub pods: Vec<Pod>,
    pub providers: Vec<ExternalModelProvider>,
    /// Secrets labelled as provider credentials (their data, which the
    /// compile puts into the snapshot only for a Ready provider).
    pub provider_secrets: Vec<CredentialSecret>,
    /// Gateway API mode's objects (empty when it is off, but for local files).
    pub gateway_classes: Vec<GatewayClass>,
    pub gateways: Vec<Gateway>,
    pub http_routes: Vec<HTTPRoute>,
    pub inference_pools: Vec<InferencePool>,
    /// API keys from `Secret`s labelled as such (digests only, never the keys).
    pub api_keys: Vec<ApiKeySecret>,
    /// Documents or files that were skipped, in file then document order
    /// (local mode; the Kubernetes API only hands out well-formed objects).
    pub problems: Vec<LoadProblem>,
    /// Why the source cannot be read at all right now (local mode: the
    /// directory cannot be listed); the objects are the last ones read.
    pub source_error: Option<String>,
}

/// The objects of one compile, borrowed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Objects<'a> {
    pub routes: &'a [ModelRoute],
    pub servers: &'a [ModelServer],
    pub pods: &'a [Pod],
    pub gateway_classes: &'a [GatewayClass],
    pub gateways: &'a [Gateway],
    pub http_routes: &'a [HTTPRoute],
    pub inference_pools: &'a [InferencePool],
}

impl ObjectSet {
    /// Every object, borrowed.
    pub fn view(&self) -> Objects<'_> {
        Objects {
            routes: &self.routes,
            servers: &self.servers,
            pods: &self.pods,
            gateway_classes: &self.gateway_classes,
            gateways: &self.gateways,
            http_routes: &self.http_routes,
            inference_pools: &self.inference_pools,
        }
    }
}

/// A file or document that could not be loaded; the rest of the directory still is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LoadProblem {
    /// File name within the directory.
    pub file: String,
    /// 0-based index of the document in a multi-document file; `None` when the
    /// whole file was unreadable.
    pub document_index: Option<usize>,
    pub kind: Option<String>,
    pub name: Option<String>,
    pub error: String,
}

impl std::fmt::Display for LoadProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(index) = self.document_index {
            write!(f, " document {index}")?;
        }
        if let Some(kind) = &self.kind {
            write!(f, " {kind}")?;
        }
        if let Some(name) = &self.name {
            write!(f, " {name:?}")?;
        }
        write!(f, ": {}", self.error)
    }
}
