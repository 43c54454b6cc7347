//! The routing snapshot protocol: generated protobuf/gRPC types plus the few
//! rules both ends must agree on (type URLs, content versions).
#![forbid(unsafe_code)]

/// Generated from `proto/switchyard/routing/v1/routing.proto`.
pub mod pb {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("switchyard.routing.v1");
}

pub mod config_dump;
pub mod scheduler;

use prost::Message;

/// Type URL of [`pb::RouteConfig`] on the stream.
pub const ROUTE_CONFIG_TYPE_URL: &str = "type.switchyard.dev/switchyard.routing.v1.RouteConfig";
/// Type URL of [`pb::EndpointLoads`] on the stream.
pub const ENDPOINT_LOADS_TYPE_URL: &str = "type.switchyard.dev/switchyard.routing.v1.EndpointLoads";

/// gRPC status code a dataplane puts in a NACK's `error_detail` for a snapshot it rejected.
pub const NACK_INVALID_ARGUMENT: i32 = 3;

/// Key ids read from one `unknown_jwt_key_ids` hint: a rotation introduces
/// one or two keys; the ids come from client tokens, so the list is bounded.
pub const MAX_UNKNOWN_KEY_IDS: usize = 4;
/// Longest key id read from a hint; real `kid`s are short (thumbprints, UUIDs).
pub const MAX_KEY_ID_BYTES: usize = 128;

/// Content version of a resource: a hash of its protobuf encoding.
///
/// The controller builds every repeated field in a canonical order, so two
/// controller replicas with the same inputs produce the same bytes, hence the
/// same version, and a dataplane that already has it is sent nothing.
pub fn content_version<M: Message>(prefix: &str, message: &M) -> String {
    let bytes = message.encode_to_vec();
    format!("{prefix}-{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes))
}

/// Key of a ModelServer or pod in the snapshot: `namespace/name`.
pub fn object_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> pb::RouteConfig {
        pb::RouteConfig {
            scheduler: None,
            routes: vec![pb::ModelRoute {
                namespace: "default".into(),
                name: "r".into(),
                model_name: "m".into(),
                rules: vec![pb::Rule {
                    name: "default".into(),
                    r#match: None,
                    targets: vec![pb::WeightedTarget {
                        model_server: "default/s".into(),
                        weight: 100,
                    }],
                }],
                ..Default::default()
            }],
            servers: vec![pb::ModelServer {
                namespace: "default".into(),
                name: "s".into(),
                port: 8000,
                endpoints: vec![pb::Endpoint {
                    name: "p".into(),
                    ip: "127.0.0.1".into(),
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn encode_decode_round_trips() {
        let config = sample();
        let decoded = pb::RouteConfig::decode(config.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(decoded, config);
    }

    #[test]
    fn version_depends_only_on_content() {
        let a = content_version("rc", &sample());
        assert_eq!(a, content_version("rc", &sample()));
        assert!(a.starts_with("rc-") && a.len() == 3 + 16, "{a}");
        let mut changed = sample();
        changed.routes[0].rules[0].targets[0].weight = 50;
        assert_ne!(a, content_version("rc", &changed));
    }
}
