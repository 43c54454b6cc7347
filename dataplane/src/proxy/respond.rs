//! Phase `respond`: the delivered engine response goes back to the client,
//! its body frame by frame: usage is read on the way, the usage-only chunk
//! the router asked for is hidden, and the pod stays counted in flight until
//! the body ends. The request's record rides along and is finished when the
//! body ends, fails, or the client goes away.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;

use super::forward::{Delivered, EngineBody, HOP_BY_HOP, count_failure};
use super::log::RequestRecord;
use crate::metrics::OutcomeLabel;
use crate::pod::InFlightGuard;
use crate::pod::outlier::Failure;
use crate::request_id::REQUEST_ID_HEADER;
use crate::response::ResponseObserver;

/// The response of a delivered attempt, as the client gets it.
pub fn respond<B: Body<Data = Bytes> + Unpin>(
    delivered: Delivered<B>,
    request_id: HeaderValue,
    hide_usage_chunk: bool,
    record: &mut RequestRecord,
) -> Response<ProxyBody<B>> {
    let Delivered { response, guard } = delivered;
    respond_holding(response, Some(guard), request_id, hide_usage_chunk, record)
}

/// The response of an upstream, holding `guard` until its body ends (none
/// for an external provider: nothing is held in flight).
pub fn respond_holding<B: Body<Data = Bytes> + Unpin>(
    response: Response<B>,
    guard: Option<InFlightGuard>,
    request_id: HeaderValue,
    hide_usage_chunk: bool,
    record: &mut RequestRecord,
) -> Response<ProxyBody<B>> {
    let (mut parts, body) = response.into_parts();
    // Most engine answers carry none of them: one pass over their few
    // headers costs less than a lookup per name.
    if parts.headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        for name in HOP_BY_HOP {
            parts.headers.remove(name);
        }
    }
    let is_event_stream = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if is_event_stream && hide_usage_chunk {
        // The body shrinks when the usage chunk is hidden.
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    parts.headers.insert(REQUEST_ID_HEADER, request_id);
    record.set_response(parts.status.as_u16(), is_event_stream);
    record.set_delivered();
    Response::from_parts(
        parts,
        ProxyBody::Upstream(UpstreamBody {
            body,
            observer: ResponseObserver::new(is_event_stream, hide_usage_chunk),
            guard,
            record: None,
            finished: false,
        }),
    )
}

/// Hands `record` to an engine's body (finished when the body ends), or
/// finishes it now for a response the router wrote itself.
pub fn hand_over<B>(
    mut response: Response<ProxyBody<B>>,
    mut record: RequestRecord,
) -> Response<ProxyBody<B>> {
    // Every response of a limited request says where its budget stands.
    if let Some(status) = record.rate_limit_status() {
        for (name, value) in status.headers() {
            response.headers_mut().insert(name, value);
        }
    }
    let status = response.status().as_u16();
    match response.body_mut() {
        ProxyBody::Upstream(upstream) => upstream.record = Some(record),
        ProxyBody::Full(_) => {
            // The router writes JSON only, never a stream.
            record.set_response(status, false);
            record.finish(None, None);
        }
    }
    response
}

/// A JSON response written by the router.
pub fn json_response<B>(status: StatusCode, body: Bytes) -> Response<ProxyBody<B>> {
    let mut response = Response::new(ProxyBody::Full(Full::new(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Response body: a buffer the router wrote, or an engine's body streamed
/// frame by frame.
///
/// Not boxed: hyper keeps the body in its per-connection state, so a large
/// variant costs nothing per response while a box would be an allocation each.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum ProxyBody<B = EngineBody> {
    Full(Full<Bytes>),
    Upstream(UpstreamBody<B>),
}

/// An engine's body on its way to the client: frames are observed for usage
/// (and the injected usage chunk hidden) and the pod's in-flight count is held
/// until the body ends or the client goes away.
#[derive(Debug)]
pub struct UpstreamBody<B> {
    body: B,
    observer: ResponseObserver,
    guard: Option<InFlightGuard>,
    record: Option<RequestRecord>,
    finished: bool,
}

impl<B> From<Bytes> for ProxyBody<B> {
    fn from(bytes: Bytes) -> Self {
        Self::Full(Full::new(bytes))
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for ProxyBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.get_mut() {
            Self::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map(|frame| frame.map(|result| result.map_err(|never| match never {}))),
            Self::Upstream(upstream) => upstream.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(full) => full.is_end_stream(),
            Self::Upstream(upstream) => upstream.finished,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(full) => full.size_hint(),
            // Hiding the usage chunk shrinks the body: its upstream length
            // (an SSE answer with a Content-Length) no longer holds.
            Self::Upstream(upstream) if upstream.observer.may_shrink() => SizeHint::default(),
            Self::Upstream(upstream) => upstream.body.size_hint(),
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> UpstreamBody<B> {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        loop {
            if self.finished {
                return Poll::Ready(None);
            }
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let forwarded = self.observer.on_data(data);
                        if forwarded.is_some()
                            && let Some(record) = &mut self.record
                        {
                            record.on_chunk();
                        }
                        if self.body.is_end_stream() {
                            // A sized body may be dropped right after its last
                            // byte is written, without another poll: end here.
                            let rest = self.observer.finish();
                            self.end(None);
                            let last = match (forwarded, rest) {
                                (Some(data), Some(rest)) => Some([data, rest].concat().into()),
                                (data, rest) => data.or(rest),
                            };
                            return Poll::Ready(last.map(|data| Ok(Frame::data(data))));
                        }
                        if let Some(data) = forwarded {
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                    }
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Poll::Ready(Some(Err(error))) => {
                    self.end(Some(OutcomeLabel::UpstreamStreamError));
                    return Poll::Ready(Some(Err(error)));
                }
                Poll::Ready(None) => {
                    let rest = self.observer.finish();
                    self.end(None);
                    return Poll::Ready(rest.map(|data| Ok(Frame::data(data))));
                }
            }
        }
    }

    fn end(&mut self, outcome: Option<OutcomeLabel>) {
        self.finished = true;
        // How the delivered attempt went, for the pod's outlier detection;
        // a client that went away says nothing about the pod.
        if let (Some(guard), Some(record)) = (&self.guard, &self.record) {
            match (outcome, record.server()) {
                (None, _) => record.attempt_succeeded(guard.pod()),
                (Some(OutcomeLabel::UpstreamStreamError), Some(server)) => {
                    count_failure(server, guard.pod(), Failure::StreamCut, record);
                }
                _ => {}
            }
        }
        // The pod's in-flight count drops before the request is counted, so
        // whoever sees it counted sees the pod released too.
        if let Some(guard) = self.guard.take() {
            tracing::debug!(
                pod = %guard.pod().key,
                usage = ?self.observer.usage(),
                "response finished"
            );
        }
        if let Some(mut record) = self.record.take() {
            record.set_produced_output(self.observer.events_forwarded());
            record.finish(self.observer.usage(), outcome);
        }
    }
}

impl<B> Drop for UpstreamBody<B> {
    /// The client went away mid-body: the record finishes with what the
    /// client received (a stream cut short is charged for its chunks).
    fn drop(&mut self) {
        // Released before the request is counted, as in `end`.
        drop(self.guard.take());
        if let Some(mut record) = self.record.take() {
            record.set_produced_output(self.observer.events_forwarded());
            record.finish(
                self.observer.usage(),
                Some(OutcomeLabel::ClientDisconnected),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::BodyExt;

    use super::*;
    use crate::proxy::forward::Upstream;
    use crate::proxy::testing::{
        Script, ScriptedBody, ScriptedUpstream, server_with_pods, test_record,
    };
    use crate::routing::Server;

    /// The engine's answer (with `headers` added) delivered from pod `p0`,
    /// through the respond phase, with its record handed over.
    async fn responded(
        script: Script,
        headers: &[(&'static str, &'static str)],
        hide_usage_chunk: bool,
    ) -> (Response<ProxyBody<ScriptedBody>>, Server) {
        let server = server_with_pods(1, 0, Duration::ZERO, None);
        let upstream = ScriptedUpstream::new([script]);
        let request = http::Request::post("http://127.0.0.1:8000/v1/completions")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let mut response = upstream.send(request).await.expect("a response");
        for (name, value) in headers {
            response
                .headers_mut()
                .insert(*name, HeaderValue::from_static(value));
        }
        let delivered = Delivered {
            response,
            guard: server.pods[0].begin_request(),
        };
        let mut record = test_record();
        let id = HeaderValue::from_static("id-9");
        let response = respond(delivered, id, hide_usage_chunk, &mut record);
        (hand_over(response, record), server)
    }

    async fn body_of(response: Response<ProxyBody<ScriptedBody>>) -> Bytes {
        let collected = response.into_body().collect().await.expect("body");
        collected.to_bytes()
    }

    const STREAM: [&str; 3] = [
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\n",
        "data: [DONE]\n\n",
    ];

    #[tokio::test]
    async fn hop_by_hop_headers_stay_behind_and_the_request_id_goes_back() {
        let engine_headers = [
            ("connection", "close"),
            ("transfer-encoding", "chunked"),
            ("x-engine", "vllm"),
        ];
        let (response, _server) = responded(Script::status(200), &engine_headers, false).await;
        let headers = response.headers();
        assert_eq!(headers["x-request-id"], "id-9");
        assert_eq!(headers["x-engine"], "vllm", "end-to-end headers pass");
        assert!(!headers.contains_key("connection"));
        assert!(!headers.contains_key("transfer-encoding"));
    }

    #[tokio::test]
    async fn the_injected_usage_chunk_is_hidden_and_the_length_dropped() {
        let length = [("content-length", "999")];
        let (response, server) = responded(Script::sse(&STREAM), &length, true).await;
        assert!(
            !response.headers().contains_key(header::CONTENT_LENGTH),
            "the body shrinks"
        );
        assert_eq!(server.pods[0].in_flight(), 1, "held while the body streams");
        assert_eq!(body_of(response).await, [STREAM[0], STREAM[2]].concat());
        assert_eq!(server.pods[0].in_flight(), 0, "released at the end");
    }

    #[tokio::test]
    async fn a_stream_the_client_asked_usage_for_passes_unchanged() {
        let length = [("content-length", "999")];
        let (response, _server) = responded(Script::sse(&STREAM), &length, false).await;
        assert_eq!(response.headers()[header::CONTENT_LENGTH], "999");
        assert_eq!(body_of(response).await, STREAM.concat());
    }

    #[tokio::test]
    async fn a_client_that_goes_away_releases_the_pod() {
        let (response, server) = responded(Script::sse(&STREAM), &[], true).await;
        let mut body = response.into_body();
        body.frame().await.expect("a frame").expect("data");
        assert_eq!(server.pods[0].in_flight(), 1);
        drop(body);
        assert_eq!(server.pods[0].in_flight(), 0);
    }
}
