//! Prefill/decode roles (`--pd-role`): the engine side of each KV connector, so a router's two
//! legs can be checked at the engines.
//!
//! - A **prefill** engine asked for a remote decode (`kv_transfer_params.do_remote_decode: true`,
//!   the NIXL and Mooncake shape) answers with `kv_transfer_params` naming itself as the KV's
//!   source, as vLLM's `NixlConnector` does. Asked to pair through a `bootstrap_room` (SGLang), it
//!   registers the room and holds its answer until a decode engine joined that room, failing
//!   after the handshake timeout (SGLang's prefill waits for its decode before sending KV).
//! - A **decode** engine reports whether it got the prompt's KV from a prefill, in the
//!   `x-mock-kv-transfer` header (`received`: NIXL/Mooncake `kv_transfer_params` with
//!   `do_remote_prefill: true`; `bootstrap`: paired through a room; `none`: it recomputed the
//!   prompt), in `x-mock-kv-source` (the prefill engine the KV came from), and in its usage
//!   (`prompt_tokens_details.cached_tokens`: the whole prompt, or 0). To pair through a room it
//!   asks the prefill engine at `bootstrap_host:bootstrap_port` (SGLang's default port when none
//!   is given), `GET /bootstrap/{room}`, and fails with 500 when no prefill comes.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::watch;

/// SGLang's default KV bootstrap port, where a decode engine looks when the request names none.
pub const DEFAULT_BOOTSTRAP_PORT: u16 = 8998;

/// How long one side of a bootstrap pairing waits for the other when `--pd-handshake-timeout-ms`
/// is not given: long enough for any router to send both legs, short enough that a lost pairing
/// fails the request instead of hanging it.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Response header: how a decode engine got the prompt's KV (`received`, `bootstrap`, `none`).
pub const KV_TRANSFER_HEADER: &str = "x-mock-kv-transfer";
/// Response header: the prefill engine a decode engine got the KV from.
pub const KV_SOURCE_HEADER: &str = "x-mock-kv-source";
/// Request header asking decode engines (only) to fail with this status once paired.
pub const DECODE_STATUS_HEADER: &str = "x-mock-decode-status";

/// The part of a disaggregated request an engine plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PdRole {
    Prefill,
    Decode,
}

/// A prefill/decode engine's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PdConfig {
    pub role: PdRole,
    /// A prefill engine also serves `/bootstrap/{room}` on this port (as SGLang's separate
    /// bootstrap server does), besides its main port.
    pub bootstrap_port: Option<u16>,
    pub handshake_timeout: Duration,
}

/// The prefill/decode fields of a request body.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PdFields {
    pub kv_transfer_params: Option<Value>,
    pub bootstrap: Option<BootstrapFields>,
}

/// SGLang's pairing fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootstrapFields {
    pub host: String,
    pub port: Option<u16>,
    pub room: u64,
}

impl PdFields {
    /// Reads the fields of a request body.
    pub fn of(body: &Value) -> Self {
        let bootstrap = body
            .get("bootstrap_room")
            .and_then(Value::as_u64)
            .map(|room| BootstrapFields {
                host: body
                    .get("bootstrap_host")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                port: body
                    .get("bootstrap_port")
                    .and_then(Value::as_u64)
                    .and_then(|port| u16::try_from(port).ok()),
                room,
            });
        Self {
            kv_transfer_params: body
                .get("kv_transfer_params")
                .filter(|params| params.is_object())
                .cloned(),
            bootstrap,
        }
    }

    fn flag(&self, name: &str) -> bool {
        self.kv_transfer_params
            .as_ref()
            .and_then(|params| params.get(name))
            .and_then(Value::as_bool)
            == Some(true)
    }

    /// NIXL/Mooncake: the router asks this prefill to keep the KV for a remote decode.
    pub fn wants_remote_decode(&self) -> bool {
        self.flag("do_remote_decode")
    }

    /// NIXL/Mooncake: the prefill engine that holds this decode's KV, if the router relayed it.
    pub fn remote_prefill_engine(&self) -> Option<&str> {
        if !self.flag("do_remote_prefill") {
            return None;
        }
        self.kv_transfer_params
            .as_ref()?
            .get("remote_engine_id")?
            .as_str()
    }
}

/// The `kv_transfer_params` a prefill engine answers with, in vLLM `NixlConnector`'s shape.
pub fn prefill_answer_params(pod: &str, request_id: &str, host: &str, port: u16) -> Value {
    json!({
        "do_remote_prefill": true,
        "do_remote_decode": false,
        "remote_block_ids": [0, 1, 2],
        "remote_engine_id": pod,
        "remote_request_id": request_id,
        "remote_host": host,
        "remote_port": port,
        "tp_size": 1,
    })
}

/// How a decode engine got the prompt's KV.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvOrigin {
    /// From this prefill engine (by its `kv_transfer_params` or a bootstrap pairing).
    Transferred { how: &'static str, source: String },
    /// Recomputed: nothing told the engine where the KV was.
    Recomputed,
}

impl KvOrigin {
    pub fn header(&self) -> &'static str {
        match self {
            Self::Transferred { how, .. } => how,
            Self::Recomputed => "none",
        }
    }
}

/// Why a bootstrap pairing failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("no decode engine joined bootstrap room {room} within {waited:?}")]
    NoDecode { room: u64, waited: Duration },
    #[error("no prefill engine registered bootstrap room {room} within {waited:?}")]
    NoPrefill { room: u64, waited: Duration },
    #[error("cannot reach the prefill engine's bootstrap server at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
}

#[derive(Debug, Default)]
struct Room {
    prefill: bool,
    decode: bool,
    /// Sides that saw both present; the room is forgotten when both have.
    done: u8,
}

/// A prefill engine's bootstrap rooms: where its requests and the decode engines meet.
#[derive(Debug)]
pub struct BootstrapRooms {
    rooms: Mutex<HashMap<u64, Room>>,
    /// Bumped on every change, so waiters re-check.
    changed: watch::Sender<u64>,
}

impl Default for BootstrapRooms {
    fn default() -> Self {
        Self {
            rooms: Mutex::default(),
            changed: watch::channel(0).0,
        }
    }
}

/// Which side of a room a caller is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Prefill,
    Decode,
}

impl BootstrapRooms {
    /// A prefill request with `room` arrived: waits until a decode engine joined it.
    pub async fn prefill(&self, room: u64, timeout: Duration) -> Result<(), HandshakeError> {
        self.meet(room, Side::Prefill, timeout)
            .await
            .map_err(|waited| HandshakeError::NoDecode { room, waited })
    }

    /// A decode engine joins `room`: waits until a prefill request registered it.
    pub async fn decode(&self, room: u64, timeout: Duration) -> Result<(), HandshakeError> {
        self.meet(room, Side::Decode, timeout)
            .await
            .map_err(|waited| HandshakeError::NoPrefill { room, waited })
    }

    /// Rooms not yet forgotten (a test hook).
    pub fn open_rooms(&self) -> usize {
        self.rooms.lock().len()
    }

    async fn meet(&self, room: u64, side: Side, timeout: Duration) -> Result<(), Duration> {
        let mut changed = self.changed.subscribe();
        self.update(room, |state| match side {
            Side::Prefill => state.prefill = true,
            Side::Decode => state.decode = true,
        });
        // Leaves the room if this side gives up or is cancelled before the other came.
        let mut leave = LeaveOnDrop {
            rooms: self,
            room,
            side,
            armed: true,
        };
        let met = tokio::time::timeout(timeout, async {
            loop {
                let both = self
                    .rooms
                    .lock()
                    .get(&room)
                    .is_some_and(|state| state.prefill && state.decode);
                if both {
                    return;
                }
                if changed.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await;
        if met.is_err() {
            return Err(timeout);
        }
        leave.armed = false;
        let mut rooms = self.rooms.lock();
        if let Some(state) = rooms.get_mut(&room) {
            state.done += 1;
            if state.done >= 2 {
                rooms.remove(&room);
            }
        }
        Ok(())
    }

    fn update(&self, room: u64, change: impl FnOnce(&mut Room)) {
        change(self.rooms.lock().entry(room).or_default());
        self.changed.send_modify(|version| *version += 1);
    }
}

struct LeaveOnDrop<'a> {
    rooms: &'a BootstrapRooms,
    room: u64,
    side: Side,
    armed: bool,
}

impl Drop for LeaveOnDrop<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut rooms = self.rooms.rooms.lock();
        if let Some(state) = rooms.get_mut(&self.room) {
            match self.side {
                Side::Prefill => state.prefill = false,
                Side::Decode => state.decode = false,
            }
            if !state.prefill && !state.decode {
                rooms.remove(&self.room);
            }
        }
    }
}

/// A decode engine's way to its prefill engine's bootstrap server.
#[derive(Clone, Debug)]
pub struct BootstrapClient {
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Default for BootstrapClient {
    fn default() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        }
    }
}

impl BootstrapClient {
    /// Joins the room of `fields` at its prefill engine; returns the prefill engine's pod name.
    pub async fn join(
        &self,
        fields: &BootstrapFields,
        timeout: Duration,
    ) -> Result<String, HandshakeError> {
        let port = fields.port.unwrap_or(DEFAULT_BOOTSTRAP_PORT);
        let host = if fields.host.contains(':') {
            format!("[{}]", fields.host)
        } else {
            fields.host.clone()
        };
        let addr = format!("{host}:{port}");
        let unreachable = |reason: String| HandshakeError::Unreachable {
            addr: addr.clone(),
            reason,
        };
        let uri = format!("http://{addr}/bootstrap/{}", fields.room);
        let request = http::Request::get(uri)
            .body(Empty::new())
            .map_err(|error| unreachable(error.to_string()))?;
        // The prefill side answers within the handshake timeout; a little more covers the trip.
        let answer = tokio::time::timeout(timeout + Duration::from_secs(1), async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|error| unreachable(error.to_string()))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|error| unreachable(error.to_string()))?
                .to_bytes();
            Ok::<_, HandshakeError>((status, body))
        })
        .await
        .map_err(|_| unreachable("no answer".to_owned()))??;
        match answer {
            (StatusCode::OK, body) => Ok(serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|body| body.get("prefill_pod")?.as_str().map(str::to_owned))
                .unwrap_or_default()),
            (status, body) => {
                tracing::debug!(%status, body = %String::from_utf8_lossy(&body), "bootstrap refused");
                Err(HandshakeError::NoPrefill {
                    room: fields.room,
                    waited: timeout,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn prefill_and_decode_meet_in_a_room_whichever_comes_first() {
        let rooms = Arc::new(BootstrapRooms::default());
        let timeout = Duration::from_secs(1);
        for prefill_first in [true, false] {
            let (a, b) = (Arc::clone(&rooms), Arc::clone(&rooms));
            let prefill = tokio::spawn(async move { a.prefill(7, timeout).await });
            if prefill_first {
                tokio::task::yield_now().await;
            }
            let decode = tokio::spawn(async move { b.decode(7, timeout).await });
            assert_eq!(prefill.await.expect("task"), Ok(()));
            assert_eq!(decode.await.expect("task"), Ok(()));
            assert_eq!(rooms.open_rooms(), 0, "a met room is forgotten");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_side_alone_gives_up_after_the_timeout_and_leaves() {
        let rooms = BootstrapRooms::default();
        let timeout = Duration::from_millis(500);
        let started = tokio::time::Instant::now();
        assert_eq!(
            rooms.prefill(1, timeout).await,
            Err(HandshakeError::NoDecode {
                room: 1,
                waited: timeout
            })
        );
        assert_eq!(started.elapsed(), timeout);
        assert_eq!(
            rooms.decode(2, timeout).await,
            Err(HandshakeError::NoPrefill {
                room: 2,
                waited: timeout
            })
        );
        assert_eq!(rooms.open_rooms(), 0);
        // A prefill cancelled while it waits leaves its room too.
        let cancelled =
            tokio::time::timeout(Duration::from_millis(10), rooms.prefill(3, timeout)).await;
        assert!(cancelled.is_err());
        assert_eq!(rooms.open_rooms(), 0);
    }

    #[test]
    fn request_fields_are_read_from_the_body() {
        let fields = PdFields::of(&json!({
            "kv_transfer_params": {"do_remote_prefill": true, "remote_engine_id": "p-0"},
            "bootstrap_host": "10.0.0.1", "bootstrap_port": 9001, "bootstrap_room": 42,
        }));
        assert_eq!(fields.remote_prefill_engine(), Some("p-0"));
        assert!(!fields.wants_remote_decode());
        assert_eq!(
            fields.bootstrap,
            Some(BootstrapFields {
                host: "10.0.0.1".into(),
                port: Some(9001),
                room: 42
            })
        );
        let fields = PdFields::of(&json!({"kv_transfer_params": {"do_remote_decode": true}}));
        assert!(fields.wants_remote_decode());
        assert_eq!(fields.remote_prefill_engine(), None);
        assert_eq!(PdFields::of(&json!({"prompt": "x"})), PdFields::default());
    }
}
