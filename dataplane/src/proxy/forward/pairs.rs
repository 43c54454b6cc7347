//! Forwarding to a prefill/decode pair: each attempt is two legs, shaped by
//! the ModelServer's KV connector.
//!
//! - `http`, `lmcache`: the prefill request (a copy of the client's body
//!   made to generate one token, see [`prefill_body`]) is sent and its
//!   answer read whole and discarded; then the decode request, the client's
//!   body with the usual routing edits, whose answer goes to the client.
//! - `nixl`, `mooncake`: the same, with `kv_transfer_params`
//!   `{"do_remote_decode":true,"do_remote_prefill":false}` in the prefill
//!   request, and the `kv_transfer_params` object of the prefill answer put
//!   verbatim into the decode request (without it the decode engine silently
//!   recomputes the prompt; a prefill answer without one is logged and
//!   counted).
//! - `sglang`: both legs at once, both carrying the prefill pod's
//!   `bootstrap_host`, its `bootstrap_port` when configured, and one fresh
//!   random 63-bit `bootstrap_room`, through which the engines pair up. A
//!   failed decode cancels its prefill; a failed prefill cancels its decode.
//!   Once the decode answers, the prefill runs on to its end in the
//!   background, still counted in flight on its pod.
//!
//! Both legs carry the client's request id. The ModelServer's timeout bounds
//! each leg on its own: the prefill leg up to its whole answer, the decode
//! leg up to its response head (its body may stream for as long as it
//! takes). A leg that fails is judged by the [`policy`](super::policy) and
//! counts against its pod's outlier detection; a retry is a new pair.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderValue};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use switchyard_runtime::clock;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::policy::Pair;
use super::upstream::{Upstream, UpstreamError};
use super::{Answer, Attempts, Delivered, Outcome, upstream_head, upstream_request, within};
use crate::error::{ApiError, BodyError};
use crate::pod::{InFlightGuard, PodState};
use crate::proxy::log::RequestRecord;
use crate::request::{
    Bootstrap, Edit, PairFieldSpans, PrefillShape, apply_edits, kv_transfer_params_of,
    prefill_body, set_field_edit,
};
use crate::routing::{KvConnector, Server};
use crate::scheduling::PairRanking;

/// Largest prefill answer kept to read its `kv_transfer_params`: a one-token
/// completion is a few hundred bytes, but one that asked for prompt logprobs
/// carries an entry per prompt token.
pub const MAX_PREFILL_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// The requests of every attempt of one client request to a prefill/decode
/// ModelServer.
#[derive(Debug)]
pub struct PairOutbound {
    path_and_query: PathAndQuery,
    headers: HeaderMap,
    /// The body as the client sent it.
    body: Bytes,
    /// The routing edits of the decode body (model name, `include_usage`).
    decode_edits: Vec<Edit>,
    /// Where the fields a leg may set already are in `body`.
    spans: PairFieldSpans,
    /// The ModelServer's model name as a JSON string, when it rewrites it.
    model_literal: Option<Bytes>,
    /// The prefill body, when every attempt sends the same one.
    prefill_body: Option<Bytes>,
}

impl PairOutbound {
    pub fn new(
        head: Parts,
        body: Bytes,
        decode_edits: Vec<Edit>,
        model_literal: Option<Bytes>,
        request_id: &HeaderValue,
    ) -> Self {
        let (path_and_query, headers) = upstream_head(head, request_id);
        Self {
            spans: PairFieldSpans::of(&body),
            path_and_query,
            headers,
            body,
            decode_edits,
            model_literal,
            prefill_body: None,
        }
    }

    fn request(&self, pod: &PodState, body: Bytes) -> Result<Request<Full<Bytes>>, ApiError> {
        upstream_request(pod, &self.path_and_query, self.headers.clone(), body)
    }

    fn prefill_body(
        &mut self,
        connector: KvConnector,
        bootstrap: Option<Bootstrap>,
    ) -> Result<Bytes, ApiError> {
        if let Some(body) = &self.prefill_body {
            return Ok(body.clone());
        }
        let body = prefill_body(
            &self.body,
            &PrefillShape {
                model: self.model_literal.as_deref(),
                kv_transfer_params: connector.relays_kv_transfer_params(),
                bootstrap,
            },
        )?;
        // Bootstrap fields change with every attempt; nothing else does.
        if bootstrap.is_none() {
            self.prefill_body = Some(body.clone());
        }
        Ok(body)
    }

    /// The client's body with the routing edits and `edits`.
    fn decode_body(&self, edits: impl IntoIterator<Item = Edit>) -> Bytes {
        let mut all = self.decode_edits.clone();
        all.extend(edits);
        apply_edits(self.body.clone(), &mut all)
    }
}

/// A response head from one leg, its pod counted in flight.
struct PairAnswer<B> {
    response: Response<B>,
    guard: InFlightGuard,
    /// A prefill still running (SGLang) when the decode answered.
    prefill: Option<JoinHandle<PrefillDone<B>>>,
}

impl<B: Send + 'static> Answer for PairAnswer<B> {
    type Body = B;

    fn status(&self) -> StatusCode {
        self.response.status()
    }

    fn pod(&self) -> &Arc<PodState> {
        self.guard.pod()
    }

    /// The response goes to the client. A prefill still running goes on
    /// when the decode succeeded (the decode needs its KV; how it ends is
    /// logged), and is cancelled when the decode failed.
    fn deliver(self) -> Delivered<B> {
        if let Some(prefill) = self.prefill {
            if self.response.status().is_success() {
                tokio::spawn(async move {
                    let failure = match prefill.await {
                        Ok((Err(error), guard)) => Some((error.to_string(), guard)),
                        Ok((Ok(PrefillAnswer::Refused(response)), guard)) => {
                            Some((format!("engine answered {}", response.status()), guard))
                        }
                        Ok((Ok(PrefillAnswer::Done(_)), guard)) => {
                            guard.pod().health.record_success();
                            None
                        }
                        Err(_) => None,
                    };
                    if let Some((failure, guard)) = failure {
                        tracing::warn!(prefill = %guard.pod().key, %failure, "the prefill leg of a decode already answering failed");
                    }
                });
            } else {
                prefill.abort();
            }
        }
        Delivered {
            response: self.response,
            guard: self.guard,
        }
    }

    fn abandon(self) {
        if let Some(prefill) = self.prefill {
            prefill.abort();
        }
    }
}

/// Runs the attempts of one request to `server`'s `pairs`.
pub async fn forward<U: Upstream>(
    upstream: &Arc<U>,
    record: &mut RequestRecord,
    server: &Server,
    connector: KvConnector,
    pairs: PairRanking,
    mut outbound: PairOutbound,
) -> Result<Delivered<U::Body>, ApiError> {
    let mut attempts = Attempts::new(server, pairs);
    loop {
        let attempt = attempts.next().await?;
        let pair = attempt.target;
        record.begin_pair(pair.prefill, pair.decode, pair.group);
        let outcome = match connector {
            KvConnector::Sglang => {
                concurrent_legs(upstream, record, &mut outbound, pair, attempt.timeout).await?
            }
            _ => {
                sequential_legs(
                    upstream.as_ref(),
                    record,
                    connector,
                    &mut outbound,
                    pair,
                    attempt.timeout,
                )
                .await?
            }
        };
        if let Some(delivered) = attempts.judge(pair, outcome, record) {
            return Ok(delivered);
        }
    }
}

/// `http`, `lmcache`, `nixl`, `mooncake`: the prefill leg, then the decode leg.
async fn sequential_legs<'s, U: Upstream>(
    upstream: &U,
    record: &mut RequestRecord,
    connector: KvConnector,
    outbound: &mut PairOutbound,
    pair: Pair<'s>,
    timeout: Duration,
) -> Result<Outcome<'s, PairAnswer<U::Body>>, ApiError> {
    let relays = connector.relays_kv_transfer_params();
    let body = outbound.prefill_body(connector, None)?;
    let request = outbound.request(pair.prefill, body)?;
    let guard = pair.prefill.begin_request();
    record.prefill_sent();
    let started = clock::now();
    let answer = match within(timeout, prefill_leg(upstream, request, relays)).await {
        Err(error) => return Ok(Outcome::Failed(pair.prefill, error)),
        Ok(PrefillAnswer::Refused(response)) => {
            return Ok(Outcome::Answer(PairAnswer {
                response,
                guard,
                prefill: None,
            }));
        }
        Ok(PrefillAnswer::Done(answer)) => answer,
    };
    pair.prefill.health.record_success();
    record.prefill_finished(started.elapsed());
    drop(guard);
    let kv_edit = if relays {
        let params = kv_transfer_params_of(&answer);
        record.kv_transfer_params(params.is_some());
        if params.is_none() {
            tracing::warn!(
                prefill = %pair.prefill.key,
                connector = connector.as_str(),
                "the prefill answer has no kv_transfer_params: the decode recomputes the prompt"
            );
        }
        params.and_then(|params| {
            set_field_edit(
                &outbound.body,
                outbound.spans.kv_transfer_params.as_ref(),
                "kv_transfer_params",
                params,
            )
        })
    } else {
        None
    };
    let request = outbound.request(pair.decode, outbound.decode_body(kv_edit))?;
    let guard = pair.decode.begin_request();
    record.decode_sent();
    Ok(match within(timeout, upstream.send(request)).await {
        Ok(response) => Outcome::Answer(PairAnswer {
            response,
            guard,
            prefill: None,
        }),
        Err(error) => Outcome::Failed(pair.decode, error),
    })
}

/// What a finished prefill leg hands back: how it ended and its pod's
/// in-flight count (released when this is dropped).
type PrefillDone<B> = (Result<PrefillAnswer<B>, UpstreamError>, InFlightGuard);

/// `sglang`: both legs at once, paired by a bootstrap room.
async fn concurrent_legs<'s, U: Upstream>(
    upstream: &Arc<U>,
    record: &mut RequestRecord,
    outbound: &mut PairOutbound,
    pair: Pair<'s>,
    timeout: Duration,
) -> Result<Outcome<'s, PairAnswer<U::Body>>, ApiError> {
    let bootstrap = Bootstrap {
        host: pair.prefill.addr.ip(),
        port: pair.bootstrap_port,
        // Fresh per attempt: a room must never pair legs of two attempts.
        room: rand::random::<u64>() >> 1,
    };
    let prefill_body = outbound.prefill_body(KvConnector::Sglang, Some(bootstrap))?;
    let prefill_request = outbound.request(pair.prefill, prefill_body)?;
    let decode_body = outbound.decode_body(bootstrap.edits(&outbound.body, &outbound.spans));
    let decode_request = outbound.request(pair.decode, decode_body)?;

    let prefill_guard = pair.prefill.begin_request();
    record.prefill_sent();
    let (took_sender, took) = oneshot::channel();
    record.prefill_running(took);
    let task_upstream = Arc::clone(upstream);
    let started = clock::now();
    let mut prefill = tokio::spawn(async move {
        let answer = within(
            timeout,
            prefill_leg(task_upstream.as_ref(), prefill_request, false),
        )
        .await;
        let _ = took_sender.send(started.elapsed());
        (answer, prefill_guard)
    });
    let decode_guard = pair.decode.begin_request();
    record.decode_sent();
    let decode = within(timeout, upstream.send(decode_request));
    tokio::pin!(decode);
    let decoded = tokio::select! {
        decoded = &mut decode => decoded,
        joined = &mut prefill => {
            // The prefill ended first: a failure cancels the decode (dropped
            // on return), a success leaves the decode to finish.
            let (answer, prefill_guard) = match joined {
                Ok(done) => done,
                Err(error) => {
                    return Ok(Outcome::Failed(
                        pair.prefill,
                        UpstreamError::Incomplete(format!("the prefill leg ended abnormally: {error}")),
                    ));
                }
            };
            match answer {
                Err(error) => return Ok(Outcome::Failed(pair.prefill, error)),
                Ok(PrefillAnswer::Refused(response)) => {
                    return Ok(Outcome::Answer(PairAnswer {
                        response,
                        guard: prefill_guard,
                        prefill: None,
                    }));
                }
                Ok(PrefillAnswer::Done(_)) => {
                    prefill_guard.pod().health.record_success();
                    drop(prefill_guard);
                }
            }
            return Ok(match decode.await {
                Ok(response) => Outcome::Answer(PairAnswer {
                    response,
                    guard: decode_guard,
                    prefill: None,
                }),
                Err(error) => Outcome::Failed(pair.decode, error),
            });
        }
    };
    Ok(match decoded {
        Ok(response) => Outcome::Answer(PairAnswer {
            response,
            guard: decode_guard,
            prefill: Some(prefill),
        }),
        Err(error) => {
            prefill.abort();
            Outcome::Failed(pair.decode, error)
        }
    })
}

/// How a prefill leg ended when its pod answered.
enum PrefillAnswer<B> {
    /// A success, read whole: the body when it was asked for, else empty.
    Done(Bytes),
    /// Any other status: the pod's answer, for the policy to judge.
    Refused(Response<B>),
}

/// Sends a prefill request and reads its answer to the end (keeping the
/// body when `keep`).
async fn prefill_leg<U: Upstream>(
    upstream: &U,
    request: Request<Full<Bytes>>,
    keep: bool,
) -> Result<PrefillAnswer<U::Body>, UpstreamError> {
    let response = upstream.send(request).await?;
    if !response.status().is_success() {
        return Ok(PrefillAnswer::Refused(response));
    }
    let mut body = response.into_body();
    let mut kept = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| {
            let error: BodyError = error.into();
            UpstreamError::Incomplete(error.to_string())
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if keep {
            if kept.len() + data.len() > MAX_PREFILL_ANSWER_BYTES {
                return Err(UpstreamError::Incomplete(format!(
                    "the prefill answer exceeds {MAX_PREFILL_ANSWER_BYTES} bytes"
                )));
            }
            kept.extend_from_slice(&data);
        }
    }
    Ok(PrefillAnswer::Done(kept.freeze()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::{Request, StatusCode, header};
    use http_body_util::BodyExt;
    use serde_json::{Value, json};

    use super::*;
    use crate::error::ErrorKind;
    use crate::proxy::testing::{
        Script, ScriptedBody, ScriptedUpstream, pd_server, ranked_pairs, test_record,
    };

    const CLIENT_BODY: &str = r#"{"model":"m","prompt":"hi","max_tokens":50,"n":2,"min_tokens":3,"stream":true,"stream_options":{"include_usage":true}}"#;
    const ANSWER: &str = r#"{"choices":[{"text":"hi"}]}"#;

    fn outbound(body: &str) -> PairOutbound {
        let (head, ()) = Request::post("/v1/completions")
            .header(header::CONTENT_TYPE, "application/json")
            .header("authorization", "Bearer k")
            .body(())
            .expect("request")
            .into_parts();
        PairOutbound::new(
            head,
            Bytes::copy_from_slice(body.as_bytes()),
            Vec::new(),
            None,
            &HeaderValue::from_static("id-1"),
        )
    }

    async fn run(
        upstream: &Arc<ScriptedUpstream>,
        server: &Server,
        body: &str,
    ) -> (Result<Delivered<ScriptedBody>, ApiError>, RequestRecord) {
        let mut record = test_record();
        let connector = server
            .prefill_decode
            .as_ref()
            .expect("a PD server")
            .connector;
        let result = forward(
            upstream,
            &mut record,
            server,
            connector,
            ranked_pairs(server),
            outbound(body),
        )
        .await;
        (result, record)
    }

    fn json_of(bytes: &Bytes) -> Value {
        serde_json::from_slice(bytes).expect("a JSON body")
    }

    fn delivered_pod(result: &Result<Delivered<ScriptedBody>, ApiError>) -> String {
        result.as_ref().expect("delivered").guard.pod().name.clone()
    }

    #[tokio::test(start_paused = true)]
    async fn http_prefills_a_one_token_copy_then_decodes_the_clients_body() {
        let server = pd_server(&[("g0", 1, 1)], KvConnector::Http, 0, Duration::ZERO, None);
        let upstream = Arc::new(ScriptedUpstream::per_pod([
            ("p0", vec![Script::json(200, ANSWER)]),
            ("p1", vec![Script::sse(&["data: [DONE]\n\n"])]),
        ]));
        let (result, record) = run(&upstream, &server, CLIENT_BODY).await;
        assert_eq!(delivered_pod(&result), "p1", "the decode pod answers");
        assert_eq!(upstream.pods(), ["p0", "p1"], "prefill first, then decode");
        let prefill = &upstream.sent_to("p0")[0];
        assert_eq!(
            prefill.body, r#"{"model":"m","prompt":"hi","max_tokens":1,"n":1}"#,
            "no stream, stream_options or min_tokens; one token, one choice"
        );
        let decode = &upstream.sent_to("p1")[0];
        assert_eq!(decode.body, CLIENT_BODY, "the client's bytes, unchanged");
        for sent in [prefill, decode] {
            assert_eq!(sent.headers["x-request-id"], "id-1");
            assert_eq!(sent.headers["authorization"], "Bearer k");
        }
        assert_eq!(record.attempts(), 1);
        assert_eq!(
            record.prefill_pod().map(|pod| pod.name.as_str()),
            Some("p0")
        );
        assert_eq!(server.pods[0].in_flight(), 0, "the prefill leg is over");
        assert_eq!(server.pods[1].in_flight(), 1, "held until the body ends");
    }

    #[tokio::test(start_paused = true)]
    async fn the_prefill_sets_only_the_length_field_the_client_used() {
        let cases = [
            (
                r#"{"model":"m","messages":[],"max_completion_tokens":9}"#,
                r#"{"model":"m","messages":[],"max_completion_tokens":1}"#,
            ),
            (
                r#"{"model":"m","messages":[],"max_tokens":9,"max_completion_tokens":9}"#,
                r#"{"model":"m","messages":[],"max_completion_tokens":1}"#,
            ),
            (
                r#"{"model":"m","prompt":"x"}"#,
                r#"{"model":"m","prompt":"x","max_tokens":1}"#,
            ),
        ];
        for (client, prefill) in cases {
            let server = pd_server(
                &[("g0", 1, 1)],
                KvConnector::Lmcache,
                0,
                Duration::ZERO,
                None,
            );
            let upstream = Arc::new(ScriptedUpstream::per_pod([
                ("p0", vec![Script::json(200, ANSWER)]),
                ("p1", vec![Script::json(200, ANSWER)]),
            ]));
            let (result, _) = run(&upstream, &server, client).await;
            result.expect("delivered");
            assert_eq!(upstream.sent_to("p0")[0].body, prefill, "{client}");
            assert_eq!(upstream.sent_to("p1")[0].body, client);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn nixl_relays_the_prefill_answers_kv_transfer_params_verbatim() {
        let params = r#"{"do_remote_prefill":true,"do_remote_decode":false,"remote_block_ids":[1, 2],"remote_engine_id":"p0-engine","remote_request_id":"id-1","remote_host":"127.0.0.1","remote_port":5600,"tp_size":1}"#;
        let answer: &'static str = Box::leak(
            format!(r#"{{"id":"cmpl-1","kv_transfer_params":{params}}}"#).into_boxed_str(),
        );
        for connector in [KvConnector::Nixl, KvConnector::Mooncake] {
            let server = pd_server(&[("g0", 1, 1)], connector, 0, Duration::ZERO, None);
            let upstream = Arc::new(ScriptedUpstream::per_pod([
                ("p0", vec![Script::json(200, answer)]),
                ("p1", vec![Script::json(200, ANSWER)]),
            ]));
            let client = r#"{"model":"m","prompt":"hi","kv_transfer_params":{"forged":1}}"#;
            let (result, _) = run(&upstream, &server, client).await;
            result.expect("delivered");
            let prefill = json_of(&upstream.sent_to("p0")[0].body);
            assert_eq!(
                prefill["kv_transfer_params"],
                json!({"do_remote_decode": true, "do_remote_prefill": false}),
                "{connector:?}"
            );
            assert_eq!(
                upstream.sent_to("p1")[0].body,
                format!(r#"{{"model":"m","prompt":"hi","kv_transfer_params":{params}}}"#),
                "the answer's object, byte for byte, in place of the client's"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_prefill_answer_without_kv_transfer_params_still_decodes() {
        let server = pd_server(&[("g0", 1, 1)], KvConnector::Nixl, 0, Duration::ZERO, None);
        let upstream = Arc::new(ScriptedUpstream::per_pod([
            (
                "p0",
                vec![Script::json(200, r#"{"kv_transfer_params":null}"#)],
            ),
            ("p1", vec![Script::json(200, ANSWER)]),
        ]));
        let (result, _) = run(&upstream, &server, r#"{"model":"m","prompt":"hi"}"#).await;
        assert_eq!(delivered_pod(&result), "p1");
        assert_eq!(
            upstream.sent_to("p1")[0].body,
            r#"{"model":"m","prompt":"hi"}"#
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_prefill_moves_to_the_next_pair_and_skips_its_other_pairs() {
        // g0: prefill p0, decode p1 and p2; g1: prefill p3, decode p4.
        let server = pd_server(
            &[("g0", 1, 2), ("g1", 1, 1)],
            KvConnector::Http,
            0,
            Duration::from_secs(1),
            None,
        );
        let pairs = ranked_pairs(&server);
        assert_eq!(
            (0..pairs.len())
                .filter_map(|n| pairs.get(n))
                .collect::<Vec<_>>(),
            [(0, 1), (0, 2), (3, 4)]
        );
        let upstream = Arc::new(ScriptedUpstream::per_pod([
            ("p0", vec![Script::Refuse]),
            ("p3", vec![Script::json(200, ANSWER)]),
            ("p4", vec![Script::json(200, ANSWER)]),
        ]));
        let started = clock::now();
        let (result, record) = run(&upstream, &server, r#"{"model":"m"}"#).await;
        assert_eq!(delivered_pod(&result), "p4");
        assert_eq!(upstream.pods(), ["p0", "p3", "p4"], "(p0, p2) is skipped");
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "refusals are not waited on"
        );
        assert_eq!(record.attempts(), 2);
        assert!(server.pods[0].is_ejected(clock::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_decode_503_retries_a_whole_new_pair_after_the_interval() {
        let server = pd_server(
            &[("g0", 1, 1), ("g1", 1, 1)],
            KvConnector::Http,
            1,
            Duration::from_millis(100),
            None,
        );
        let upstream = Arc::new(ScriptedUpstream::per_pod([
            ("p0", vec![Script::json(200, ANSWER)]),
            ("p1", vec![Script::status(503)]),
            ("p2", vec![Script::json(200, ANSWER)]),
            ("p3", vec![Script::json(200, ANSWER)]),
        ]));
        let started = clock::now();
        let (result, record) = run(&upstream, &server, r#"{"model":"m"}"#).await;
        assert_eq!(delivered_pod(&result), "p3");
        assert_eq!(upstream.pods(), ["p0", "p1", "p2", "p3"]);
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        assert_eq!(record.attempts(), 2);
        assert_eq!(
            record.prefill_pod().map(|pod| pod.name.as_str()),
            Some("p2")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_retries_left_a_prefill_error_reaches_the_client() {
        let server = pd_server(
            &[("g0", 1, 1), ("g1", 1, 1)],
            KvConnector::Http,
            0,
            Duration::ZERO,
            None,
        );
        let upstream = Arc::new(ScriptedUpstream::per_pod([(
            "p0",
            vec![Script::json(400, r#"{"error":"prompt too long"}"#)],
        )]));
        let (result, _) = run(&upstream, &server, r#"{"model":"m"}"#).await;
        let delivered = result.expect("delivered");
        assert_eq!(delivered.response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(delivered.guard.pod().name, "p0");
        let body = delivered
            .response
            .into_body()
            .collect()
            .await
            .expect("body");
        assert_eq!(body.to_bytes(), r#"{"error":"prompt too long"}"#);
        assert_eq!(upstream.pods(), ["p0"], "no decode, no other pair");
    }

    #[tokio::test(start_paused = true)]
    async fn the_timeout_bounds_each_leg_not_the_pair() {
        let limit = Duration::from_millis(300);
        let server = pd_server(
            &[("g0", 1, 1)],
            KvConnector::Http,
            0,
            Duration::ZERO,
            Some(limit),
        );
        let upstream = Arc::new(ScriptedUpstream::per_pod([
            ("p0", vec![Script::SlowHeaders(Duration::from_millis(200))]),
            ("p1", vec![Script::SlowHeaders(Duration::from_millis(200))]),
        ]));
        let started = clock::now();
        let (result, _) = run(&upstream, &server, r#"{"model":"m"}"#).await;
        assert_eq!(delivered_pod(&result), "p1");
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(400),
            "longer than one timeout"
        );

        for (slow, pod) in [("p0", "default/p0"), ("p1", "default/p1")] {
            let server = pd_server(
                &[("g0", 1, 1)],
                KvConnector::Http,
                2,
                Duration::ZERO,
                Some(limit),
            );
            let fast = if slow == "p0" { "p1" } else { "p0" };
            let upstream = Arc::new(ScriptedUpstream::per_pod([
                (slow, vec![Script::SlowHeaders(Duration::from_secs(5))]),
                (fast, vec![Script::json(200, ANSWER)]),
            ]));
            let (result, _) = run(&upstream, &server, r#"{"model":"m"}"#).await;
            let error = result.expect_err("timed out");
            assert_eq!(error.kind, ErrorKind::UpstreamTimeout);
            assert_eq!(
                error.message,
                format!("pod {pod} of ModelServer default/s sent no response within 300ms")
            );
            assert_eq!(upstream.cancelled(), [slow]);
        }
    }

    fn sglang_server(groups: &[(&str, usize, usize)], retries: u32, port: u16) -> Server {
        let mut server = pd_server(groups, KvConnector::Sglang, retries, Duration::ZERO, None);
        if let Some(pd) = server.prefill_decode.as_mut() {
            for group in &pd.groups {
                for prefill in &group.prefill {
                    pd.bootstrap_ports[*prefill] = port;
                }
            }
        }
        server
    }

    #[tokio::test(start_paused = true)]
    async fn sglang_sends_both_legs_at_once_paired_by_one_fresh_room() {
        let server = sglang_server(&[("g0", 1, 1)], 0, 9001);
        let upstream = Arc::new(ScriptedUpstream::per_pod([
            ("p0", vec![Script::SlowHeaders(Duration::from_millis(50))]),
            (
                "p1",
                vec![Script::after(
                    Duration::from_millis(10),
                    Script::json(200, ANSWER),
                )],
            ),
        ]));
        let started = clock::now();
        let (result, record) = run(
            &upstream,
            &server,
            r#"{"model":"m","prompt":"hi","stream":false}"#,
        )
        .await;
        assert_eq!(delivered_pod(&result), "p1");
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(10),
            "the decode answered without waiting for the prefill"
        );
        assert_eq!(server.pods[0].in_flight(), 1, "the prefill still runs");
        let prefill = json_of(&upstream.sent_to("p0")[0].body);
        let decode = json_of(&upstream.sent_to("p1")[0].body);
        let room = decode["bootstrap_room"].as_u64().expect("a room");
        assert!(room < 1 << 63, "63 bits: {room}");
        for body in [&prefill, &decode] {
            assert_eq!(body["bootstrap_host"], "127.0.0.1");
            assert_eq!(body["bootstrap_port"], 9001);
            assert_eq!(body["bootstrap_room"], room);
        }
        assert_eq!(prefill["max_tokens"], 1);
        assert_eq!(prefill.get("stream"), None);
        assert_eq!(decode["stream"], false, "the client's fields, as sent");
        tokio::time::sleep(Duration::from_millis(40)).await;
        tokio::task::yield_now().await;
        assert_eq!(server.pods[0].in_flight(), 0, "the prefill ran to its end");
        assert!(upstream.cancelled().is_empty());
        drop(record);

        // Another request: another room; no port configured, none sent.
        let server = sglang_server(&[("g0", 1, 1)], 0, 0);
        let upstream = Arc::new(ScriptedUpstream::per_pod([
            ("p0", vec![Script::json(200, ANSWER)]),
            ("p1", vec![Script::json(200, ANSWER)]),
        ]));
        let (result, _) = run(&upstream, &server, r#"{"model":"m"}"#).await;
        result.expect("delivered");
        let decode = json_of(&upstream.sent_to("p1")[0].body);
        assert_ne!(decode["bootstrap_room"], room);
        assert_eq!(decode.get("bootstrap_port"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn sglang_a_failed_decode_cancels_its_prefill_and_the_next_pair_gets_a_new_room() {
        let server = sglang_server(&[("g0", 1, 1), ("g1", 1, 1)], 1, 0);
        let upstream = Arc::new(ScriptedUpstream::per_pod([
            ("p0", vec![Script::SlowHeaders(Duration::from_secs(10))]),
            (
                "p1",
                vec![Script::after(
                    Duration::from_millis(10),
                    Script::status(503),
                )],
            ),
            ("p2", vec![Script::json(200, ANSWER)]),
            (
                "p3",
                vec![Script::after(
                    Duration::from_millis(10),
                    Script::json(200, ANSWER),
                )],
            ),
        ]));
        let started = clock::now();
        let (result, _) = run(&upstream, &server, r#"{"model":"m"}"#).await;
        assert_eq!(delivered_pod(&result), "p3");
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(20),
            "the first prefill was not waited for"
        );
        tokio::task::yield_now().await;
        assert_eq!(upstream.cancelled(), ["p0"]);
        assert_eq!(server.pods[0].in_flight(), 0);
        let room = |pod: &str| json_of(&upstream.sent_to(pod)[0].body)["bootstrap_room"].clone();
        assert_eq!(room("p0"), room("p1"));
        assert_eq!(room("p2"), room("p3"));
        assert_ne!(room("p0"), room("p2"));
    }

    #[tokio::test(start_paused = true)]
    async fn sglang_a_refused_decode_cancels_its_prefill() {
        let server = sglang_server(&[("g0", 1, 1)], 0, 0);
        let upstream = Arc::new(ScriptedUpstream::per_pod([
            ("p0", vec![Script::SlowHeaders(Duration::from_secs(10))]),
            (
                "p1",
                vec![Script::after(Duration::from_millis(10), Script::Refuse)],
            ),
        ]));
        let (result, _) = run(&upstream, &server, r#"{"model":"m"}"#).await;
        let error = result.expect_err("no pair left");
        assert_eq!(error.kind, ErrorKind::UpstreamUnavailable);
        tokio::task::yield_now().await;
        assert_eq!(upstream.cancelled(), ["p0"]);
        assert_eq!(server.pods[0].in_flight(), 0);
        assert!(server.pods[1].is_ejected(clock::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn sglang_a_failed_prefill_cancels_its_decode() {
        let server = sglang_server(&[("g0", 1, 1), ("g1", 1, 1)], 0, 0);
        let upstream = Arc::new(ScriptedUpstream::per_pod([
            (
                "p0",
                vec![Script::after(Duration::from_millis(10), Script::Refuse)],
            ),
            ("p1", vec![Script::SlowHeaders(Duration::from_secs(10))]),
            ("p2", vec![Script::json(200, ANSWER)]),
            ("p3", vec![Script::json(200, ANSWER)]),
        ]));
        let started = clock::now();
        let (result, _) = run(&upstream, &server, r#"{"model":"m"}"#).await;
        assert_eq!(delivered_pod(&result), "p3");
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(10),
            "the decode was not waited for"
        );
        assert_eq!(upstream.cancelled(), ["p1"]);
        assert_eq!(server.pods[1].in_flight(), 0);
    }
}
