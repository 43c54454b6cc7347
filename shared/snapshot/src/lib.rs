//! The routing snapshot protocol: generated protobuf/gRPC types plus the
//! rules both ends must agree on: the stream's vocabulary ([`protocol`]) and
//! the scheduler configuration with its plugins ([`scheduler`]).
#![forbid(unsafe_code)]

/// Generated from `proto/switchyard/routing/v1/routing.proto`.
pub mod pb {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("switchyard.routing.v1");
}

/// A provider credential prints as `ProviderCredential { scheme, .. }`: a
/// snapshot logged with `{:?}` never carries the secret into the log.
impl std::fmt::Debug for pb::ProviderCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderCredential")
            .field("scheme", &self.scheme())
            .finish_non_exhaustive()
    }
}

pub mod config_dump;
pub mod protocol;
pub mod scheduler;
#[cfg(any(test, feature = "test-support"))]
pub mod test_builders;
pub mod wire;

pub use protocol::{
    ENDPOINT_LOADS_TYPE_URL, MAX_KEY_ID_BYTES, MAX_UNKNOWN_KEY_IDS, NACK_INVALID_ARGUMENT, Nack,
    ROUTE_CONFIG_TYPE_URL, ResourceType, bounded_key_id, content_version,
};

/// Key of a ModelServer or pod in the snapshot: `namespace/name`.
pub fn object_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn sample() -> pb::RouteConfig {
        test_builders::route_config(
            vec![test_builders::route("r", "m", "s")],
            vec![test_builders::server("s", &[("p", "127.0.0.1")])],
        )
    }

    #[test]
    fn encode_decode_round_trips() {
        let config = sample();
        let decoded = pb::RouteConfig::decode(config.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(decoded, config);
    }

    #[test]
    fn a_provider_credential_never_prints() {
        let provider = pb::ExternalProvider {
            name: "openai".into(),
            credential: Some(pb::ProviderCredential {
                scheme: pb::CredentialScheme::ApiKey.into(),
                value: "sk-secret".into(),
            }),
            ..Default::default()
        };
        let printed = format!("{provider:?} {provider:#?}");
        assert!(!printed.contains("sk-secret"), "{printed}");
        assert!(printed.contains("ApiKey"), "{printed}");
    }

    #[test]
    fn version_depends_only_on_content() {
        let a = content_version(ResourceType::RouteConfig, &sample());
        assert_eq!(a, content_version(ResourceType::RouteConfig, &sample()));
        assert!(a.starts_with("rc-") && a.len() == 3 + 16, "{a}");
        let mut changed = sample();
        changed.routes[0].rules[0].targets[0].weight = 50;
        assert_ne!(a, content_version(ResourceType::RouteConfig, &changed));
    }
}
