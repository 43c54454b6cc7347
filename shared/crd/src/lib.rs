//! The Kthena-compatible custom resources Switchyard serves:
//! `ModelRoute` and `ModelServer` in `networking.serving.volcano.sh/v1alpha1`.
#![forbid(unsafe_code)]

pub mod duration;
pub mod manifests;
pub mod model_route;
pub mod model_server;
pub mod status;
#[cfg(feature = "test-support")]
pub mod test_builders;

pub use duration::{GoDurationError, parse_go_duration};
pub use manifests::{CrdManifest, crd_yaml, crd_yaml_stream};
pub use model_route::{
    BodyMatch, FailureMode, GlobalRateLimit, ModelMatch, ModelRoute, ModelRouteSpec,
    ParentReference, RateLimit, RateLimitUnit, RedisAddress, Rule, StringMatch, TargetModel,
};
pub use model_server::{
    DEFAULT_KV_CONNECTOR_TYPE, InferenceEngine, KvConnector, ModelServer, ModelServerSpec, PdGroup,
    Retry, TrafficPolicy, WorkloadPort, WorkloadSelector,
};
pub use status::{ModelRouteStatus, ModelServerStatus};

/// API group shared with the Kthena router, so existing manifests apply unchanged.
pub const GROUP: &str = "networking.serving.volcano.sh";
/// API version of both kinds.
pub const VERSION: &str = "v1alpha1";
