//! HTTP/1.1 on the wire, the client's side: the request head written into a
//! reused buffer, the response head parsed with `httparse` into an
//! `http::Response` whose header values share the bytes read, and the body's
//! framing (a length, chunks, or the connection's end) decoded in place, so
//! body data reaches the client as slices of the read buffer, uncopied.

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};

/// Response headers an engine may send at most (as hyper's default).
pub const MAX_RESPONSE_HEADERS: usize = 100;
/// A response head larger than this is refused: engines send a few hundred bytes.
pub const MAX_RESPONSE_HEAD_BYTES: usize = 64 * 1024;
/// A chunk-size line or trailer section longer than this is refused.
const MAX_CHUNK_LINE_BYTES: usize = 4 * 1024;

/// Why a response could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("invalid response head: {0}")]
    Head(String),
    #[error("response head larger than {MAX_RESPONSE_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("invalid chunked body: {0}")]
    Chunk(&'static str),
}

/// Appends the request head: request line, `host`, `content-length`, then
/// `headers` (which must not repeat those two).
pub fn encode_request_head(
    out: &mut Vec<u8>,
    method: &Method,
    path_and_query: &str,
    authority: &str,
    headers: &HeaderMap,
    body_len: usize,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path_and_query.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(authority.as_bytes());
    out.extend_from_slice(b"\r\ncontent-length: ");
    push_decimal(out, body_len);
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// `value` in decimal, without a formatter's allocation.
fn push_decimal(out: &mut Vec<u8>, mut value: usize) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

/// How the body of a response ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (1xx, 204, 304).
    Empty,
    /// `content-length` bytes.
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
    /// Until the engine closes the connection.
    UntilClose,
}

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    pub response: Response<()>,
    pub framing: Framing,
    /// The connection may carry another request once this body is read.
    pub keep_alive: bool,
}

/// Where one header's name and value lie in a response head.
#[derive(Debug, Clone, Copy)]
pub struct FieldSpan {
    name: (usize, usize),
    value: (usize, usize),
}

/// Parses the response head at the start of `buffer` and removes it from
/// there. `None`: the head is not complete yet. Informational (1xx) heads
/// are skipped: the response that follows is the one wanted. `fields` is
/// scratch space, kept by the caller so no response allocates it.
pub fn parse_response_head(
    buffer: &mut BytesMut,
    fields: &mut Vec<FieldSpan>,
) -> Result<Option<Head>, ProtocolError> {
    loop {
        let mut slots =
            [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let head_len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            buffer,
            &mut slots,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => {
                if buffer.len() > MAX_RESPONSE_HEAD_BYTES {
                    return Err(ProtocolError::HeadTooLarge);
                }
                return Ok(None);
            }
            Err(error) => return Err(ProtocolError::Head(error.to_string())),
        };
        let code = parsed.code.unwrap_or_default();
        let status = StatusCode::from_u16(code)
            .map_err(|_| ProtocolError::Head(format!("status {code}")))?;
        let version = if parsed.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // Offsets into the head, so the values can share its bytes once it is split off.
        let base = buffer.as_ptr() as usize;
        let offset = |part: &[u8]| (part.as_ptr() as usize - base, part.len());
        fields.clear();
        fields.extend(parsed.headers.iter().map(|header| FieldSpan {
            name: offset(header.name.as_bytes()),
            value: offset(header.value),
        }));
        let head = buffer.split_to(head_len).freeze();
        if status.is_informational() {
            continue;
        }
        // Room for the request id the router adds: a full map would grow
        // (and rehash) for that one header.
        let mut headers = HeaderMap::with_capacity(fields.len() + 1);
        for field in fields.iter() {
            let (name, name_len) = field.name;
            let (value, value_len) = field.value;
            let name = HeaderName::from_bytes(&head[name..name + name_len])
                .map_err(|_| ProtocolError::Head("invalid header name".into()))?;
            let value = HeaderValue::from_maybe_shared(head.slice(value..value + value_len))
                .map_err(|_| ProtocolError::Head(format!("invalid value of {name}")))?;
            headers.append(name, value);
        }
        let framing = framing(status, &headers)?;
        let keep_alive = keep_alive(version, &headers) && framing != Framing::UntilClose;
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        return Ok(Some(Head {
            response,
            framing,
            keep_alive,
        }));
    }
}

fn framing(status: StatusCode, headers: &HeaderMap) -> Result<Framing, ProtocolError> {
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Empty);
    }
    if let Some(encoding) = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
    {
        // Only the last coding frames the message (RFC 9112 §6.3).
        let last = encoding.as_bytes().rsplit(|b| *b == b',').next();
        return Ok(
            if last.is_some_and(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked")) {
                Framing::Chunked
            } else {
                Framing::UntilClose
            },
        );
    }
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    let Some(first) = lengths.next() else {
        return Ok(Framing::UntilClose);
    };
    let length = parse_length(first.as_bytes())?;
    if lengths.any(|other| parse_length(other.as_bytes()) != Ok(length)) {
        return Err(ProtocolError::Head("conflicting content-length".into()));
    }
    Ok(Framing::Length(length))
}

fn parse_length(value: &[u8]) -> Result<u64, ProtocolError> {
    std::str::from_utf8(value)
        .ok()
        .map(str::trim)
        .filter(|text| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| ProtocolError::Head("invalid content-length".into()))
}

/// HTTP/1.1 keeps the connection unless told `close`; HTTP/1.0 only when told `keep-alive`.
fn keep_alive(version: Version, headers: &HeaderMap) -> bool {
    let mut tokens = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|value| value.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii);
    if version == Version::HTTP_10 {
        tokens.any(|token| token.eq_ignore_ascii_case(b"keep-alive"))
    } else {
        !tokens.any(|token| token.eq_ignore_ascii_case(b"close"))
    }
}

/// What decoding found in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Body data, in order.
    Data(Bytes),
    /// The buffer ends before the next piece: read more.
    NeedMore,
    /// The body is complete.
    End,
}

/// Decodes a body of the given [`Framing`] from a read buffer.
#[derive(Debug)]
pub struct BodyDecoder {
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Bytes left of a sized body, or of the current chunk.
    Length(u64),
    /// Expecting a chunk-size line.
    ChunkSize,
    /// This many bytes of chunk data, then its CRLF.
    ChunkData(u64),
    ChunkEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
    UntilClose,
    Done,
}

impl BodyDecoder {
    pub fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(length) => State::Length(length),
            Framing::Chunked => State::ChunkSize,
            Framing::UntilClose => State::UntilClose,
        };
        Self { state }
    }

    /// Bytes still expected, when the framing says.
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(left) => Some(left),
            State::Done => Some(0),
            _ => None,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The next piece of the body found in `buffer` (consumed from it).
    pub fn decode(&mut self, buffer: &mut BytesMut) -> Result<Decoded, ProtocolError> {
        loop {
            match self.state {
                State::Done => return Ok(Decoded::End),
                State::Length(left) | State::ChunkData(left) => {
                    if buffer.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(buffer.len());
                    let left = left - take as u64;
                    self.state = match (self.state, left) {
                        (State::Length(_), 0) => State::Done,
                        (State::Length(_), left) => State::Length(left),
                        (_, 0) => State::ChunkEnd,
                        (_, left) => State::ChunkData(left),
                    };
                    return Ok(Decoded::Data(buffer.split_to(take).freeze()));
                }
                State::UntilClose => {
                    if buffer.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    return Ok(Decoded::Data(buffer.split().freeze()));
                }
                State::ChunkSize => {
                    let Some((line, consumed)) = next_line(buffer)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    let size = parse_chunk_size(&buffer[..line])?;
                    buffer.advance(consumed);
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::ChunkData(size)
                    };
                }
                State::ChunkEnd => {
                    let Some((line, consumed)) = next_line(buffer)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    if line != 0 {
                        return Err(ProtocolError::Chunk("data longer than its size"));
                    }
                    buffer.advance(consumed);
                    self.state = State::ChunkSize;
                }
                State::Trailers => {
                    let Some((line, consumed)) = next_line(buffer)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    buffer.advance(consumed);
                    if line == 0 {
                        self.state = State::Done;
                    }
                }
            }
        }
    }

    /// Every piece of the body already in `buffer`, as one: the chunks of
    /// a burst (an engine's stream events read together) leave as one frame,
    /// so one write to the client, instead of one each. A protocol error
    /// after some data waits for the next call (nothing invalid is consumed).
    pub fn decode_available(&mut self, buffer: &mut BytesMut) -> Result<Decoded, ProtocolError> {
        let first = match self.decode(buffer)? {
            Decoded::Data(first) => first,
            other => return Ok(other),
        };
        let mut joined: Option<BytesMut> = None;
        // What follows is at most what is buffered: one allocation per burst.
        let most = first.len() + buffer.len();
        while let Ok(Decoded::Data(next)) = self.decode(buffer) {
            joined
                .get_or_insert_with(|| {
                    let mut joined = BytesMut::with_capacity(most);
                    joined.extend_from_slice(&first);
                    joined
                })
                .extend_from_slice(&next);
        }
        Ok(Decoded::Data(joined.map_or(first, BytesMut::freeze)))
    }

    /// The connection ended (read returned 0): the end of a body framed by
    /// it, a truncated body otherwise.
    pub fn on_eof(&mut self) -> Result<(), ProtocolError> {
        match self.state {
            State::UntilClose | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(ProtocolError::Chunk(
                "connection closed before the body ended",
            )),
        }
    }
}

/// The first line of `buffer`: its length without its terminator (a bare
/// LF is accepted) and with it; `None` while it is incomplete. Nothing is
/// consumed, so a line found invalid fails again on the next call.
fn next_line(buffer: &[u8]) -> Result<Option<(usize, usize)>, ProtocolError> {
    match memchr::memchr(b'\n', buffer) {
        Some(end) => {
            let content = if end > 0 && buffer[end - 1] == b'\r' {
                end - 1
            } else {
                end
            };
            Ok(Some((content, end + 1)))
        }
        None if buffer.len() > MAX_CHUNK_LINE_BYTES => Err(ProtocolError::Chunk("line too long")),
        None => Ok(None),
    }
}

/// `1a3f` or `1a3f;name=value`: the size in hex, extensions ignored.
fn parse_chunk_size(line: &[u8]) -> Result<u64, ProtocolError> {
    let digits = line
        .split(|b| *b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return Err(ProtocolError::Chunk("invalid chunk size"));
    }
    digits.iter().try_fold(0u64, |size, digit| {
        let value = char::from(*digit)
            .to_digit(16)
            .ok_or(ProtocolError::Chunk("invalid chunk size"))?;
        Ok(size << 4 | u64::from(value))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<Head>, ProtocolError> {
        parse_response_head(&mut BytesMut::from(text), &mut Vec::new())
    }

    fn decode_all(framing: Framing, wire: &[u8], split: usize) -> Result<Vec<u8>, ProtocolError> {
        let mut decoder = BodyDecoder::new(framing);
        let mut buffer = BytesMut::new();
        let mut body = Vec::new();
        for piece in wire.chunks(split.max(1)) {
            buffer.extend_from_slice(piece);
            loop {
                match decoder.decode_available(&mut buffer)? {
                    Decoded::Data(data) => body.extend_from_slice(&data),
                    Decoded::NeedMore => break,
                    Decoded::End => return Ok(body),
                }
            }
        }
        decoder.on_eof()?;
        Ok(body)
    }

    #[test]
    fn the_request_head_names_host_length_and_every_header() {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_static("Bearer k"));
        headers.append("x-many", HeaderValue::from_static("1"));
        headers.append("x-many", HeaderValue::from_static("2"));
        let mut out = Vec::new();
        encode_request_head(
            &mut out,
            &Method::POST,
            "/v1/completions?x=1",
            "10.0.0.1:8000",
            &headers,
            42,
        );
        push_decimal(&mut out, 0);
        push_decimal(&mut out, 1_234_567);
        assert_eq!(
            String::from_utf8(out).expect("ASCII"),
            "POST /v1/completions?x=1 HTTP/1.1\r\nhost: 10.0.0.1:8000\r\ncontent-length: 42\r\n\
             authorization: Bearer k\r\nx-many: 1\r\nx-many: 2\r\n\r\n01234567"
        );
    }

    #[test]
    fn a_head_is_parsed_once_complete_and_leaves_the_body_in_the_buffer() {
        let mut buffer = BytesMut::from("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n");
        assert!(
            parse_response_head(&mut buffer, &mut Vec::new())
                .expect("valid")
                .is_none()
        );
        buffer.extend_from_slice(b"transfer-encoding: chunked\r\nx-engine: vllm\r\n\r\n5\r\nhello");
        let head = parse_response_head(&mut buffer, &mut Vec::new())
            .expect("valid")
            .expect("complete");
        assert_eq!(head.response.status(), StatusCode::OK);
        assert_eq!(head.response.headers()["x-engine"], "vllm");
        assert_eq!(head.framing, Framing::Chunked);
        assert!(head.keep_alive);
        assert_eq!(&buffer[..], b"5\r\nhello");
    }

    #[test]
    fn framing_and_keep_alive_follow_the_head() {
        let cases = [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n",
                Framing::Length(12),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 12\r\nconnection: close\r\n\r\n",
                Framing::Length(12),
                false,
            ),
            ("HTTP/1.1 204 No Content\r\n\r\n", Framing::Empty, true),
            ("HTTP/1.1 200 OK\r\n\r\n", Framing::UntilClose, false),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 3\r\n\r\n",
                Framing::Length(3),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 3\r\nconnection: keep-alive\r\n\r\n",
                Framing::Length(3),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 9\r\n\r\n",
                Framing::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
                Framing::UntilClose,
                false,
            ),
        ];
        for (text, framing, keep_alive) in cases {
            let head = head(text).expect(text).expect(text);
            assert_eq!(
                (head.framing, head.keep_alive),
                (framing, keep_alive),
                "{text}"
            );
        }
    }

    #[test]
    fn informational_heads_are_skipped() {
        let mut buffer = BytesMut::from(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n",
        );
        let head = parse_response_head(&mut buffer, &mut Vec::new())
            .expect("valid")
            .expect("complete");
        assert_eq!(head.response.status(), StatusCode::CREATED);
        assert!(buffer.is_empty());
    }

    #[test]
    fn malformed_heads_are_refused() {
        for text in [
            "HTTP/1.1 abc OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "garbage\r\n\r\n",
        ] {
            assert!(head(text).is_err(), "{text:?}");
        }
        let huge = format!(
            "HTTP/1.1 200 OK\r\nx: {}",
            "a".repeat(MAX_RESPONSE_HEAD_BYTES + 1)
        );
        assert_eq!(
            head(&huge).expect_err("too large"),
            ProtocolError::HeadTooLarge
        );
    }

    #[test]
    fn chunked_bodies_decode_in_any_framing() {
        let wire = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\ntrailer: x\r\n\r\n";
        for split in [1, 2, 3, 7, wire.len()] {
            assert_eq!(
                decode_all(Framing::Chunked, wire, split).expect("valid"),
                b"hello world",
                "split {split}"
            );
        }
        assert_eq!(
            decode_all(Framing::Chunked, b"3\nabc\n0\n\n", 1).expect("bare LF"),
            b"abc"
        );
    }

    #[test]
    fn chunks_already_read_come_out_one_after_another_without_a_read() {
        let mut decoder = BodyDecoder::new(Framing::Chunked);
        let mut buffer = BytesMut::from("2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n");
        assert_eq!(decoder.decode(&mut buffer), Ok(Decoded::Data("ab".into())));
        assert_eq!(decoder.decode(&mut buffer), Ok(Decoded::Data("cd".into())));
        assert_eq!(decoder.decode(&mut buffer), Ok(Decoded::End));
        assert!(decoder.is_done() && buffer.is_empty());
    }

    #[test]
    fn a_burst_of_chunks_already_read_is_one_piece() {
        let mut decoder = BodyDecoder::new(Framing::Chunked);
        let mut buffer = BytesMut::from("2\r\nab\r\n2\r\ncd\r\n3\r\nef");
        assert_eq!(
            decoder.decode_available(&mut buffer),
            Ok(Decoded::Data("abcdef".into()))
        );
        assert_eq!(decoder.decode_available(&mut buffer), Ok(Decoded::NeedMore));
        buffer.extend_from_slice(b"g\r\n0\r\n\r\n");
        assert_eq!(
            decoder.decode_available(&mut buffer),
            Ok(Decoded::Data("g".into()))
        );
        assert!(
            decoder.is_done() && buffer.is_empty(),
            "ended with the data"
        );
        assert_eq!(decoder.decode_available(&mut buffer), Ok(Decoded::End));

        // The data before a broken chunk arrives first; the error after it.
        let mut decoder = BodyDecoder::new(Framing::Chunked);
        let mut buffer = BytesMut::from("2\r\nab\r\nzz\r\n");
        assert_eq!(
            decoder.decode_available(&mut buffer),
            Ok(Decoded::Data("ab".into()))
        );
        assert!(decoder.decode_available(&mut buffer).is_err());
    }

    #[test]
    fn sized_and_close_delimited_bodies_and_their_truncation() {
        assert_eq!(
            decode_all(Framing::Length(5), b"hello", 2).expect("valid"),
            b"hello"
        );
        assert!(
            decode_all(Framing::Length(6), b"hello", 2).is_err(),
            "cut short"
        );
        assert_eq!(
            decode_all(Framing::UntilClose, b"until the end", 4).expect("valid"),
            b"until the end"
        );
        assert!(
            decode_all(Framing::Chunked, b"5\r\nhel", 2).is_err(),
            "cut short"
        );
        let mut decoder = BodyDecoder::new(Framing::Length(3));
        let mut buffer = BytesMut::from("abcNEXT");
        assert_eq!(decoder.decode(&mut buffer), Ok(Decoded::Data("abc".into())));
        assert!(decoder.is_done());
        assert_eq!(&buffer[..], b"NEXT", "what follows is not body");
    }

    #[test]
    fn bad_chunks_are_errors() {
        for wire in [
            &b"zz\r\nab\r\n0\r\n\r\n"[..],
            b"2\r\nabc\r\n0\r\n\r\n",
            b"ffffffffffffffffff\r\n",
        ] {
            assert!(
                decode_all(Framing::Chunked, wire, wire.len()).is_err(),
                "{wire:?}"
            );
        }
        let long = vec![b'1'; MAX_CHUNK_LINE_BYTES + 2];
        assert!(decode_all(Framing::Chunked, &long, long.len()).is_err());
    }
}
