//! The Kthena-compatible custom resources Switchyard serves:
//! `ModelRoute`, `ModelServer` and `ExternalModelProvider` in
//! `networking.serving.volcano.sh/v1alpha1`; and the Gateway API kinds it
//! reads in Gateway API mode (`GatewayClass`, `Gateway`, `HTTPRoute`,
//! `InferencePool`), whose CRDs belong to their projects.
#![forbid(unsafe_code)]

pub mod duration;
pub mod external_model_provider;
pub mod gateway_api;
pub mod inference_pool;
pub mod manifests;
pub mod model_route;
pub mod model_server;
pub mod status;
#[cfg(feature = "test-support")]
pub mod test_builders;

pub use duration::{GoDurationError, parse_go_duration};
pub use external_model_provider::{
    AuthScheme, ExternalModelProvider, ExternalModelProviderSpec, PROVIDER_CREDENTIAL_LABEL,
    ProviderAuth, ProviderType, SecretKeySelector,
};
pub use gateway_api::{
    GATEWAY_API_GROUP, Gateway, GatewayClass, GatewayClassSpec, GatewayClassStatus, GatewaySpec,
    GatewayStatus, HTTPRoute, HTTPRouteSpec, HTTPRouteStatus,
};
pub use inference_pool::{
    INFERENCE_API_GROUP, InferencePool, InferencePoolSpec, InferencePoolStatus,
};
pub use manifests::{CrdManifest, crd_yaml, crd_yaml_stream};
pub use model_route::{
    BodyMatch, FailureMode, GlobalRateLimit, ModelMatch, ModelRoute, ModelRouteSpec,
    ParentReference, RateLimit, RateLimitUnit, RedisAddress, Rule, StringMatch, TargetModel,
};
pub use model_server::{
    DEFAULT_KV_CONNECTOR_TYPE, InferenceEngine, KvConnector, ModelServer, ModelServerSpec, PdGroup,
    Retry, TrafficPolicy, WorkloadPort, WorkloadSelector,
};
pub use status::{ExternalModelProviderStatus, ModelRouteStatus, ModelServerStatus};

/// API group shared with the Kthena router, so existing manifests apply unchanged.
pub const GROUP: &str = "networking.serving.volcano.sh";
/// API version of every kind.
pub const VERSION: &str = "v1alpha1";
