//! The stream's wire form: a published response is encoded once and its
//! bytes are shared by every stream, which adds only its own nonce.
//!
//! The generated `RoutingDiscoveryServer` would make each stream clone the
//! whole decoded resource and encode it again (a 400 KiB RouteConfig, a
//! hundred streams: 40 MB of copying per change). `super::grpc` serves the
//! same gRPC method with [`EncodedResponse`] as its message type; on the wire
//! nothing changes.

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use prost::encoding::{DecodeContext, WireType};
use switchyard_snapshot::pb;

/// Field number of `SnapshotResponse.nonce`.
const NONCE_FIELD: u32 = 3;

/// A `SnapshotResponse` made of shared pre-encoded bytes plus a nonce.
///
/// Protobuf lets fields come in any order, so appending the nonce (field 3)
/// after the shared bytes, which were encoded with an empty nonce and hence
/// without field 3, gives exactly the message with that nonce set.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EncodedResponse {
    shared: Bytes,
    nonce: String,
}

impl EncodedResponse {
    /// Encodes `response` (whose nonce must be empty) for sharing.
    pub fn share(response: &pb::SnapshotResponse) -> Bytes {
        debug_assert!(response.nonce.is_empty(), "each stream sets its own nonce");
        Bytes::from(response.encode_to_vec())
    }

    pub fn new(shared: Bytes, nonce: String) -> Self {
        Self { shared, nonce }
    }
}

impl Message for EncodedResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.shared);
        if !self.nonce.is_empty() {
            prost::encoding::string::encode(NONCE_FIELD, &self.nonce, buf);
        }
    }

    /// Only ever encoded by the server; a decoder skips every field.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.shared.len()
            + if self.nonce.is_empty() {
                0
            } else {
                prost::encoding::string::encoded_len(NONCE_FIELD, &self.nonce)
            }
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_bytes_plus_nonce_decode_as_the_response_with_that_nonce() {
        let mut response = pb::SnapshotResponse {
            type_url: "t".into(),
            version_info: "v1".into(),
            nonce: String::new(),
            control_plane_id: "c".into(),
            generated_at_unix_ms: 7,
            resource: Some(pb::snapshot_response::Resource::EndpointLoads(
                pb::EndpointLoads {
                    observed_at_unix_ms: 5,
                    ..Default::default()
                },
            )),
        };
        let encoded = EncodedResponse::new(EncodedResponse::share(&response), "42".into());
        let bytes = encoded.encode_to_vec();
        assert_eq!(bytes.len(), encoded.encoded_len());
        response.nonce = "42".into();
        assert_eq!(
            pb::SnapshotResponse::decode(bytes.as_slice()).expect("decodes"),
            response
        );
    }
}
