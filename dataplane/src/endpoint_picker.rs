//! The endpoint picker: Switchyard's scheduling for gateways that implement
//! the Gateway API Inference Extension (Envoy Gateway, kgateway,
//! agentgateway, NGINX Gateway Fabric, Istio). Such a gateway streams each
//! request to its InferencePool's endpoint picker over Envoy's `ext_proc`
//! gRPC protocol and sends the request where the answer says.
//!
//! Per stream (one HTTP request): the request headers and body are read
//! (the body in the gateway's `FULL_DUPLEX_STREAMED` mode, as the Inference
//! Extension's reference configuration sets it, so it is buffered here and
//! handed back whole), the pool's endpoints are ranked by the same
//! scheduler the proxy uses, and the best one is answered in the header
//! `x-gateway-destination-endpoint` and, identically, in the dynamic
//! metadata `envoy.lb`. The gateway's subset hint (filter metadata
//! `envoy.lb.subset_hint`) narrows the candidates. No endpoint that fits:
//! an immediate 503; every endpoint saturated (by its fresh engine load):
//! the request is dropped with 429. The endpoint counts the request as in flight until the stream ends,
//! so this dataplane's later choices see it. Responses pass through.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction,
};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, HttpHeaders,
    ImmediateResponse, ProcessingRequest, ProcessingResponse, StreamedBodyResponse,
    TrailersResponse, body_mutation, processing_request, processing_response,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value};
use http::header::{HeaderName, HeaderValue as HttpHeaderValue};
use http::{HeaderMap, StatusCode};
use switchyard_runtime::CancellationToken;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::{ApiError, ErrorKind};
use crate::pod::{InFlightGuard, PodState};
use crate::request::parse_body;
use crate::request_id::ClientRequestId;
use crate::scheduling::ScheduleRequest;
use crate::snapshot::SnapshotStore;

/// The header (and `envoy.lb` metadata key) the chosen endpoint goes in.
pub const DESTINATION_ENDPOINT: &str = "x-gateway-destination-endpoint";
/// The metadata namespace of the chosen endpoint.
pub const DESTINATION_NAMESPACE: &str = "envoy.lb";
/// The filter metadata namespace of the gateway's subset hint.
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
/// The subset hint's key: `ip:port,...` or a list of them.
pub const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";
/// An endpoint with this many requests waiting in its engine is saturated:
/// the Inference Extension's reference picker's queue-depth threshold.
pub const SATURATED_QUEUE_DEPTH: f64 = 5.0;
/// An endpoint whose KV cache is this full is saturated (the reference
/// picker's threshold): new prompts would evict what running ones need.
pub const SATURATED_KV_CACHE_USAGE: f64 = 0.8;
/// Responses a stream may have queued for the gateway: it reads them as it
/// goes, so a handful keeps the stream moving without buffering much.
const STREAM_BUFFER: usize = 4;

/// What the picker decided for one request.
#[derive(Debug)]
pub enum Pick {
    /// Send it to `endpoint` (`ip:port`); the request is in flight there
    /// until `guard` drops.
    Endpoint {
        endpoint: String,
        guard: InFlightGuard,
    },
    /// No endpoint fits (503) or every one is saturated (429).
    Refused(ApiError),
}

/// Picks endpoints of one InferencePool with the current snapshot.
#[derive(Debug, Clone)]
pub struct EndpointPicker {
    store: Arc<SnapshotStore>,
    /// `namespace/name` of the InferencePool this picker serves.
    pool: String,
    max_body_bytes: usize,
}

impl EndpointPicker {
    pub fn new(store: Arc<SnapshotStore>, pool: String, max_body_bytes: usize) -> Self {
        Self {
            store,
            pool,
            max_body_bytes,
        }
    }

    /// The gRPC service of the picker.
    pub fn into_server(self) -> ExternalProcessorServer<Self> {
        ExternalProcessorServer::new(self)
    }

    /// Ranks the pool's endpoints (those of `subset`, when given) for a
    /// request with `headers` and `body` and takes the best.
    pub fn pick(&self, headers: &HeaderMap, body: &[u8], subset: Option<&[String]>) -> Pick {
        let unavailable =
            |message: String| Pick::Refused(ApiError::new(ErrorKind::NoReadyPod, message));
        let Some(table) = self.store.table() else {
            return unavailable("no routing snapshot received from the controller yet".to_owned());
        };
        let Some(pool) = table.gateways.pools.get(&self.pool) else {
            return unavailable(format!(
                "InferencePool {} is not in the routing snapshot",
                self.pool
            ));
        };
        // The candidates: every endpoint, or those of the gateway's subset.
        let candidates: Vec<usize> = match subset {
            None => (0..pool.pods.len()).collect(),
            Some(subset) => {
                let wanted: Vec<SocketAddr> = subset
                    .iter()
                    .filter_map(|endpoint| endpoint.parse().ok())
                    .collect();
                (0..pool.pods.len())
                    .filter(|index| wanted.contains(&pool.pods[*index].addr))
                    .collect()
            }
        };
        if candidates.is_empty() {
            return unavailable(match subset {
                None => format!("InferencePool {} has no ready endpoint", self.pool),
                Some(subset) => format!(
                    "no endpoint of InferencePool {} is in the gateway's subset {subset:?}",
                    self.pool
                ),
            });
        }
        let saturated = |pod: &Arc<PodState>| {
            table.scheduler.fresh_load(pod).is_some_and(|load| {
                load.requests_waiting >= SATURATED_QUEUE_DEPTH
                    || load.kv_cache_usage >= SATURATED_KV_CACHE_USAGE
            })
        };
        if candidates.iter().all(|index| saturated(&pool.pods[*index])) {
            return Pick::Refused(ApiError::new(
                ErrorKind::Dropped,
                format!(
                    "every endpoint of InferencePool {} is saturated (waiting >= {SATURATED_QUEUE_DEPTH} or KV cache >= {SATURATED_KV_CACHE_USAGE}): request dropped",
                    self.pool
                ),
            ));
        }
        // A body the router cannot read still gets an endpoint: load alone decides.
        let parsed = parse_body(body).ok();
        let model = parsed.as_ref().map_or("", |parsed| parsed.model.as_str());
        let prompt_hashes = parsed.as_ref().map_or_else(Vec::new, |parsed| {
            table
                .scheduler
                .prompt_hashes(model, body, parsed.prompt_span.as_ref())
        });
        let request_id = ClientRequestId::of(headers).or_generate();
        let ranked = table.scheduler.schedule_among(
            pool,
            &candidates,
            &ScheduleRequest {
                model,
                served_model: model,
                headers,
                prompt_hashes: &prompt_hashes,
                request_id: request_id.to_str().unwrap_or_default(),
            },
        );
        let ranking = match ranked {
            Ok(ranking) => ranking,
            Err(error) => return unavailable(error.to_string()),
        };
        let Some(pod) = ranking.get(0).and_then(|index| pool.pods.get(index)) else {
            return unavailable(format!("InferencePool {}: no endpoint ranked", self.pool));
        };
        table.scheduler.on_dispatched(pod.id, &prompt_hashes);
        Pick::Endpoint {
            endpoint: pod.addr.to_string(),
            guard: pod.begin_request(),
        }
    }

    /// One ext_proc stream: one HTTP request and its response.
    async fn run(
        self,
        mut inbound: Streaming<ProcessingRequest>,
        outbound: mpsc::Sender<Result<ProcessingResponse, Status>>,
    ) {
        let mut headers = HeaderMap::new();
        let mut body = Vec::new();
        let mut subset: Option<Vec<String>> = None;
        // Held until the stream ends: the request is in flight on its endpoint.
        let mut in_flight = None;
        while let Ok(Some(message)) = inbound.message().await {
            if subset.is_none() {
                subset = subset_hint(&message);
            }
            let responses = match message.request {
                Some(processing_request::Request::RequestHeaders(request)) => {
                    headers = header_map(&request);
                    if request.end_of_stream {
                        self.answer(&headers, &[], subset.as_deref(), &mut in_flight, None)
                    } else {
                        Vec::new()
                    }
                }
                Some(processing_request::Request::RequestBody(chunk)) => {
                    body.extend_from_slice(&chunk.body);
                    if body.len() > self.max_body_bytes {
                        vec![immediate(&ApiError::new(
                            ErrorKind::BodyTooLarge,
                            format!("request body exceeds {} bytes", self.max_body_bytes),
                        ))]
                    } else if chunk.end_of_stream {
                        let whole = std::mem::take(&mut body);
                        self.answer(
                            &headers,
                            &whole,
                            subset.as_deref(),
                            &mut in_flight,
                            Some(whole.clone()),
                        )
                    } else {
                        Vec::new()
                    }
                }
                Some(processing_request::Request::RequestTrailers(_)) => vec![respond(
                    processing_response::Response::RequestTrailers(TrailersResponse::default()),
                )],
                Some(processing_request::Request::ResponseHeaders(_)) => vec![respond(
                    processing_response::Response::ResponseHeaders(HeadersResponse::default()),
                )],
                Some(processing_request::Request::ResponseBody(chunk)) => {
                    vec![respond(processing_response::Response::ResponseBody(
                        streamed_body(chunk.body, chunk.end_of_stream),
                    ))]
                }
                Some(processing_request::Request::ResponseTrailers(_)) => vec![respond(
                    processing_response::Response::ResponseTrailers(TrailersResponse::default()),
                )],
                None => Vec::new(),
            };
            let done = responses.iter().any(|response| {
                matches!(
                    response.response,
                    Some(processing_response::Response::ImmediateResponse(_))
                )
            });
            for response in responses {
                if outbound.send(Ok(response)).await.is_err() {
                    return;
                }
            }
            if done {
                return;
            }
        }
        drop(in_flight);
    }

    /// The answers once the request is complete: the headers response with
    /// the endpoint (and, with a body, the body handed back), or an
    /// immediate refusal.
    fn answer(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        subset: Option<&[String]>,
        in_flight: &mut Option<InFlightGuard>,
        hand_back: Option<Vec<u8>>,
    ) -> Vec<ProcessingResponse> {
        let (endpoint, guard) = match self.pick(headers, body, subset) {
            Pick::Endpoint { endpoint, guard } => (endpoint, guard),
            Pick::Refused(error) => return vec![immediate(&error)],
        };
        *in_flight = Some(guard);
        let mut responses = vec![ProcessingResponse {
            response: Some(processing_response::Response::RequestHeaders(
                HeadersResponse {
                    response: Some(CommonResponse {
                        header_mutation: Some(HeaderMutation {
                            set_headers: vec![HeaderValueOption {
                                header: Some(HeaderValue {
                                    key: DESTINATION_ENDPOINT.to_owned(),
                                    value: String::new(),
                                    raw_value: endpoint.clone().into_bytes(),
                                }),
                                append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                                ..HeaderValueOption::default()
                            }],
                            ..HeaderMutation::default()
                        }),
                        // The destination changes where the gateway routes.
                        clear_route_cache: true,
                        ..CommonResponse::default()
                    }),
                },
            )),
            dynamic_metadata: Some(destination_metadata(&endpoint)),
            ..ProcessingResponse::default()
        }];
        if let Some(body) = hand_back {
            responses.push(respond(processing_response::Response::RequestBody(
                streamed_body(body, true),
            )));
        }
        responses
    }
}

#[tonic::async_trait]
impl ExternalProcessor for EndpointPicker {
    type ProcessStream = ReceiverStream<Result<ProcessingResponse, Status>>;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(self.clone().run(request.into_inner(), sender));
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

/// Serves the endpoint picker and gRPC health on `listener` until `stop`;
/// open streams end with it.
pub async fn serve_endpoint_picker(
    listener: tokio::net::TcpListener,
    picker: EndpointPicker,
    stop: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ExternalProcessorServer<EndpointPicker>>()
        .await;
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(picker.into_server())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            stop.cancelled_owned(),
        )
        .await
}

/// The gateway's subset hint, if the request carries one.
fn subset_hint(message: &ProcessingRequest) -> Option<Vec<String>> {
    let hint = message
        .metadata_context
        .as_ref()?
        .filter_metadata
        .get(SUBSET_NAMESPACE)?
        .fields
        .get(SUBSET_KEY)?;
    let split = |text: &str| -> Vec<String> {
        text.split(',')
            .map(str::trim)
            .filter(|endpoint| !endpoint.is_empty())
            .map(str::to_owned)
            .collect()
    };
    match hint.kind.as_ref()? {
        value::Kind::StringValue(text) => Some(split(text)),
        value::Kind::ListValue(ListValue { values }) => Some(
            values
                .iter()
                .filter_map(|value| match &value.kind {
                    Some(value::Kind::StringValue(text)) => Some(split(text)),
                    _ => None,
                })
                .flatten()
                .collect(),
        ),
        _ => None,
    }
}

/// The request headers as the scheduler reads them (pseudo-headers and
/// names or values HTTP does not allow are left out).
fn header_map(headers: &HttpHeaders) -> HeaderMap {
    let mut map = HeaderMap::new();
    for header in headers.headers.iter().flat_map(|headers| &headers.headers) {
        let value = if header.raw_value.is_empty() {
            header.value.as_bytes()
        } else {
            &header.raw_value
        };
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(header.key.as_bytes()),
            HttpHeaderValue::from_bytes(value),
        ) {
            map.append(name, value);
        }
    }
    map
}

fn respond(response: processing_response::Response) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(response),
        ..ProcessingResponse::default()
    }
}

fn streamed_body(body: Vec<u8>, end_of_stream: bool) -> BodyResponse {
    BodyResponse {
        response: Some(CommonResponse {
            body_mutation: Some(BodyMutation {
                mutation: Some(body_mutation::Mutation::StreamedResponse(
                    StreamedBodyResponse {
                        body,
                        end_of_stream,
                        ..StreamedBodyResponse::default()
                    },
                )),
            }),
            ..CommonResponse::default()
        }),
    }
}

/// `envoy.lb: {x-gateway-destination-endpoint: <endpoint>}`.
fn destination_metadata(endpoint: &str) -> Struct {
    let string = |text: &str| Value {
        kind: Some(value::Kind::StringValue(text.to_owned())),
    };
    let inner = Struct {
        fields: HashMap::from([(DESTINATION_ENDPOINT.to_owned(), string(endpoint))])
            .into_iter()
            .collect(),
    };
    Struct {
        fields: HashMap::from([(
            DESTINATION_NAMESPACE.to_owned(),
            Value {
                kind: Some(value::Kind::StructValue(inner)),
            },
        )])
        .into_iter()
        .collect(),
    }
}

/// The gateway answers the client itself: status and the OpenAI-style body.
fn immediate(error: &ApiError) -> ProcessingResponse {
    let status: StatusCode = error.kind.status();
    respond(processing_response::Response::ImmediateResponse(
        ImmediateResponse {
            status: Some(HttpStatus {
                code: i32::from(status.as_u16()),
            }),
            headers: Some(HeaderMutation {
                set_headers: vec![HeaderValueOption {
                    header: Some(HeaderValue {
                        key: "content-type".to_owned(),
                        value: String::new(),
                        raw_value: b"application/json".to_vec(),
                    }),
                    ..HeaderValueOption::default()
                }],
                ..HeaderMutation::default()
            }),
            body: error.body().to_vec(),
            details: error.message.clone(),
            ..ImmediateResponse::default()
        },
    ))
}

#[cfg(test)]
mod tests;
