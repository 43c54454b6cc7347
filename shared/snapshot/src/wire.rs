//! Top-level fields taken out of an encoded message without decoding them,
//! so a big message can be decoded a part at a time: a dataplane decodes a
//! RouteConfig's ModelServers (most of its decoded size, about twelve times
//! the encoded) one by one while it builds its routing table, instead of
//! holding the whole decoded config and the table at once.

use prost::DecodeError;
use prost::bytes::Bytes;
use prost::encoding::{
    DecodeContext, WireType, check_wire_type, decode_key, decode_varint, skip_field,
};

/// An encoded message split in two: the fields numbered one of `tags` (each
/// a message, string or bytes field), and the message without them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Split {
    /// The message without the taken fields, still encoded: it decodes as
    /// the message with those fields empty.
    pub rest: Bytes,
    /// The taken fields in the order they came: field number and payload
    /// (a slice of the input, not a copy).
    pub taken: Vec<(u32, Bytes)>,
}

/// Splits the encoded `message` (see [`Split`]). Fails when `message` is not
/// well-formed protobuf at the top level, or a taken field is not
/// length-delimited; the payloads themselves are not checked.
pub fn split_fields(message: &Bytes, tags: &[u32]) -> Result<Split, DecodeError> {
    let mut rest = Vec::new();
    let mut taken = Vec::new();
    let mut cursor: &[u8] = message;
    while !cursor.is_empty() {
        let start = message.len() - cursor.len();
        let (tag, wire_type) = decode_key(&mut cursor)?;
        let mut value = cursor;
        skip_field(wire_type, tag, &mut cursor, DecodeContext::default())?;
        let end = message.len() - cursor.len();
        if tags.contains(&tag) {
            check_wire_type(WireType::LengthDelimited, wire_type)?;
            decode_varint(&mut value)?;
            let payload = end - (value.len() - cursor.len());
            taken.push((tag, message.slice(payload..end)));
        } else {
            rest.extend_from_slice(&message[start..end]);
        }
    }
    Ok(Split {
        rest: Bytes::from(rest),
        taken,
    })
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;
    use crate::pb;

    fn endpoint(name: &str) -> pb::Endpoint {
        pb::Endpoint {
            name: name.into(),
            ip: "10.0.0.1".into(),
            labels: [("app".to_owned(), name.to_owned())].into(),
            ..Default::default()
        }
    }

    fn server(name: &str, endpoints: &[&str]) -> pb::ModelServer {
        pb::ModelServer {
            namespace: "default".into(),
            name: name.into(),
            port: 8000,
            endpoints: endpoints.iter().map(|e| endpoint(e)).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn taken_fields_decode_as_they_were_and_the_rest_as_the_message_without_them() {
        let config = pb::RouteConfig {
            routes: vec![pb::ModelRoute {
                name: "r".into(),
                model_name: "m".into(),
                ..Default::default()
            }],
            servers: vec![server("a", &["a-0", "a-1"]), server("b", &[])],
            default_gateway: "default/gw".into(),
            ..Default::default()
        };
        let encoded = Bytes::from(config.encode_to_vec());

        let split = split_fields(&encoded, &[2]).expect("well formed");

        let servers: Vec<pb::ModelServer> = split
            .taken
            .iter()
            .map(|(tag, payload)| {
                assert_eq!(*tag, 2);
                pb::ModelServer::decode(payload.clone()).expect("a ModelServer")
            })
            .collect();
        assert_eq!(servers, config.servers);
        let rest = pb::RouteConfig::decode(split.rest).expect("a RouteConfig");
        assert_eq!(
            rest,
            pb::RouteConfig {
                servers: Vec::new(),
                ..config
            }
        );
    }

    #[test]
    fn an_empty_payload_is_taken_too() {
        let config = pb::RouteConfig {
            servers: vec![pb::ModelServer::default()],
            ..Default::default()
        };
        let split = split_fields(&Bytes::from(config.encode_to_vec()), &[2]).expect("well formed");
        assert_eq!(split.taken, [(2, Bytes::new())]);
        assert!(split.rest.is_empty());
    }

    #[test]
    fn malformed_input_is_an_error() {
        let encoded = pb::RouteConfig {
            servers: vec![server("a", &["a-0"])],
            ..Default::default()
        }
        .encode_to_vec();
        let truncated = Bytes::copy_from_slice(&encoded[..encoded.len() - 1]);
        assert!(split_fields(&truncated, &[2]).is_err());
        // Field 11 (`default_gateway`) as a varint instead of a string.
        let wrong_type = Bytes::from_static(&[11 << 3, 1]);
        assert!(split_fields(&wrong_type, &[11]).is_err());
        assert!(split_fields(&wrong_type, &[2]).is_ok());
    }
}
