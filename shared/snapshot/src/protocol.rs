//! The stream's vocabulary, written once for both ends: the resource types
//! with their type URLs and version prefixes, content versions, and why a
//! dataplane rejects a response. How the stream uses them: `docs/protocol.md`.

use prost::Message;

use crate::pb;

/// Type URL of [`pb::RouteConfig`] on the stream.
pub const ROUTE_CONFIG_TYPE_URL: &str = "type.switchyard.dev/switchyard.routing.v1.RouteConfig";
/// Type URL of [`pb::EndpointLoads`] on the stream.
pub const ENDPOINT_LOADS_TYPE_URL: &str = "type.switchyard.dev/switchyard.routing.v1.EndpointLoads";

/// gRPC status code of every NACK's `error_detail` (INVALID_ARGUMENT, as in
/// xDS); [`pb::NackReason`] tells the reasons apart.
pub const NACK_INVALID_ARGUMENT: i32 = 3;

/// Key ids read from one `unknown_jwt_key_ids` hint: a rotation introduces
/// one or two keys; the ids come from client tokens, so the list is bounded.
pub const MAX_UNKNOWN_KEY_IDS: usize = 4;
/// Longest key id read from a hint; real `kid`s are short (thumbprints, UUIDs).
pub const MAX_KEY_ID_BYTES: usize = 128;

/// `kid` cut to at most [`MAX_KEY_ID_BYTES`] (on a character boundary), as
/// both ends bound the key ids of a hint.
pub fn bounded_key_id(kid: &str) -> &str {
    let mut end = kid.len().min(MAX_KEY_ID_BYTES);
    while !kid.is_char_boundary(end) {
        end -= 1;
    }
    &kid[..end]
}

/// The resource types a stream carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceType {
    RouteConfig,
    EndpointLoads,
}

impl ResourceType {
    /// Every type, in the order a stream subscribes to and sends them: routes
    /// before the loads of their endpoints.
    pub const ALL: [Self; 2] = [Self::RouteConfig, Self::EndpointLoads];

    /// The `type_url` of this type on the stream.
    pub const fn type_url(self) -> &'static str {
        match self {
            Self::RouteConfig => ROUTE_CONFIG_TYPE_URL,
            Self::EndpointLoads => ENDPOINT_LOADS_TYPE_URL,
        }
    }

    /// The type a `type_url` names; `None` for one this build does not know.
    pub fn from_type_url(type_url: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|resource| resource.type_url() == type_url)
    }

    /// The type of a response's resource.
    pub fn of(resource: &pb::snapshot_response::Resource) -> Self {
        match resource {
            pb::snapshot_response::Resource::RouteConfig(_) => Self::RouteConfig,
            pb::snapshot_response::Resource::EndpointLoads(_) => Self::EndpointLoads,
        }
    }

    /// The message name, for humans.
    pub const fn name(self) -> &'static str {
        match self {
            Self::RouteConfig => "RouteConfig",
            Self::EndpointLoads => "EndpointLoads",
        }
    }

    /// Metric label and log field value.
    pub const fn label(self) -> &'static str {
        match self {
            Self::RouteConfig => "route_config",
            Self::EndpointLoads => "endpoint_loads",
        }
    }

    /// What a [`content_version`] of this type starts with, so a version
    /// names its type in logs.
    pub const fn version_prefix(self) -> &'static str {
        match self {
            Self::RouteConfig => "rc",
            Self::EndpointLoads => "el",
        }
    }

    /// Position in [`Self::ALL`], for per-type arrays.
    pub const fn index(self) -> usize {
        match self {
            Self::RouteConfig => 0,
            Self::EndpointLoads => 1,
        }
    }
}

/// Content version of a resource: a hash of its protobuf encoding.
///
/// The controller builds every repeated field in a canonical order, so two
/// controller replicas with the same inputs produce the same bytes, hence the
/// same version, and a dataplane that already has it is sent nothing.
pub fn content_version<M: Message>(resource: ResourceType, message: &M) -> String {
    let bytes = message.encode_to_vec();
    format!(
        "{}-{:016x}",
        resource.version_prefix(),
        xxhash_rust::xxh3::xxh3_64(&bytes)
    )
}

/// A dataplane's rejection of one response: the reason both ends branch on,
/// and a message for humans (logs, debug views).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Nack {
    pub reason: pb::NackReason,
    pub message: String,
}

impl Nack {
    pub fn new(reason: pb::NackReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    /// A resource that is well formed but cannot be used.
    pub fn invalid_resource(message: impl Into<String>) -> Self {
        Self::new(pb::NackReason::InvalidResource, message)
    }

    /// The NACK's `error_detail`.
    pub fn into_error_detail(self) -> pb::ErrorDetail {
        pb::ErrorDetail {
            code: NACK_INVALID_ARGUMENT,
            message: self.message,
            reason: self.reason.into(),
        }
    }

    /// The NACK a request's `error_detail` carries. A reason this build does
    /// not know, or none (an older dataplane), counts as an invalid resource:
    /// the one answer that never makes the controller send the version again.
    pub fn from_error_detail(detail: pb::ErrorDetail) -> Self {
        let reason = match pb::NackReason::try_from(detail.reason) {
            Ok(pb::NackReason::Unspecified) | Err(_) => pb::NackReason::InvalidResource,
            Ok(reason) => reason,
        };
        Self::new(reason, detail.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_types_round_trip_their_type_urls() {
        for resource in ResourceType::ALL {
            assert_eq!(
                ResourceType::from_type_url(resource.type_url()),
                Some(resource)
            );
            assert_eq!(ResourceType::ALL[resource.index()], resource);
            assert!(resource.type_url().ends_with(resource.name()));
        }
        assert_eq!(ResourceType::from_type_url("type.example/Other"), None);
        assert_eq!(
            ResourceType::of(&pb::snapshot_response::Resource::EndpointLoads(
                pb::EndpointLoads::default()
            )),
            ResourceType::EndpointLoads
        );
    }

    #[test]
    fn a_nack_survives_the_wire_and_unknown_reasons_count_as_invalid() {
        let nack = Nack::new(pb::NackReason::UnknownBaseVersion, "base el-1 not held");
        let detail = nack.clone().into_error_detail();
        assert_eq!(detail.code, NACK_INVALID_ARGUMENT);
        assert_eq!(Nack::from_error_detail(detail), nack);

        let from_older_dataplane = pb::ErrorDetail {
            code: NACK_INVALID_ARGUMENT,
            message: "bad".into(),
            reason: 0,
        };
        assert_eq!(
            Nack::from_error_detail(from_older_dataplane).reason,
            pb::NackReason::InvalidResource
        );
        let from_newer_dataplane = pb::ErrorDetail {
            reason: 99,
            ..Default::default()
        };
        assert_eq!(
            Nack::from_error_detail(from_newer_dataplane).reason,
            pb::NackReason::InvalidResource
        );
    }
}
