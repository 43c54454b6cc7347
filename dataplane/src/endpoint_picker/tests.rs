//! The endpoint picker driven over a real gRPC connection, as a gateway's
//! ext_proc filter drives it (no Envoy binary needed).

use std::net::SocketAddr;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap as EnvoyHeaders, Metadata};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::{HttpBody, HttpHeaders};
use switchyard_snapshot::pb;
use switchyard_snapshot::test_builders::{inference_pool, route_config};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::*;
use switchyard_runtime::clock;

const POOL: &str = "default/pool";
const BODY: &str = r#"{"model":"m","messages":[{"role":"user","content":"hello"}]}"#;

fn store(endpoints: &[(&str, &str, u32)]) -> Arc<SnapshotStore> {
    let mut config = route_config(Vec::new(), Vec::new());
    config.inference_pools = vec![inference_pool("pool", endpoints)];
    let store = Arc::new(SnapshotStore::new());
    store
        .apply_route_config("v1", config)
        .expect("valid snapshot");
    store
}

/// A picker for [`POOL`] on a loopback port (the test's runtime ends it).
async fn start(store: Arc<SnapshotStore>) -> (SocketAddr, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let picker = EndpointPicker::new(store, POOL.to_owned(), 1024);
    tokio::spawn(serve_endpoint_picker(listener, picker, stop.clone()));
    (addr, stop)
}

/// One ext_proc stream: what the test sends and what the picker answers.
struct Stream {
    requests: mpsc::Sender<ProcessingRequest>,
    responses: Streaming<ProcessingResponse>,
}

impl Stream {
    async fn open(addr: SocketAddr) -> Self {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        let (requests, receiver) = mpsc::channel(8);
        let responses = ExternalProcessorClient::new(channel)
            .process(ReceiverStream::new(receiver))
            .await
            .expect("stream opens")
            .into_inner();
        Self {
            requests,
            responses,
        }
    }

    async fn send(&self, request: processing_request::Request, metadata: Option<Metadata>) {
        self.requests
            .send(ProcessingRequest {
                request: Some(request),
                metadata_context: metadata,
                ..ProcessingRequest::default()
            })
            .await
            .expect("send");
    }

    async fn next(&mut self) -> processing_response::Response {
        let response =
            tokio::time::timeout(std::time::Duration::from_secs(10), self.responses.next())
                .await
                .expect("an answer in time")
                .expect("stream open")
                .expect("no error");
        if let Some(processing_response::Response::RequestHeaders(_)) = &response.response {
            let endpoint = destination(&response);
            assert_eq!(
                metadata_endpoint(&response).as_deref(),
                endpoint.as_deref(),
                "header and envoy.lb metadata agree"
            );
        }
        response.response.expect("a response")
    }
}

fn headers(end_of_stream: bool) -> processing_request::Request {
    processing_request::Request::RequestHeaders(HttpHeaders {
        headers: Some(EnvoyHeaders {
            headers: vec![
                HeaderValue {
                    key: ":path".into(),
                    raw_value: b"/v1/chat/completions".to_vec(),
                    ..HeaderValue::default()
                },
                HeaderValue {
                    key: "content-type".into(),
                    raw_value: b"application/json".to_vec(),
                    ..HeaderValue::default()
                },
            ],
        }),
        end_of_stream,
        ..HttpHeaders::default()
    })
}

fn body(chunk: &str, end_of_stream: bool) -> processing_request::Request {
    processing_request::Request::RequestBody(HttpBody {
        body: chunk.as_bytes().to_vec(),
        end_of_stream,
        ..HttpBody::default()
    })
}

fn subset(value: value::Kind) -> Metadata {
    let hint = Struct {
        fields: [(SUBSET_KEY.to_owned(), Value { kind: Some(value) })]
            .into_iter()
            .collect(),
    };
    Metadata {
        filter_metadata: [(SUBSET_NAMESPACE.to_owned(), hint)].into_iter().collect(),
        ..Metadata::default()
    }
}

/// The `x-gateway-destination-endpoint` a headers response sets.
fn destination(response: &ProcessingResponse) -> Option<String> {
    let Some(processing_response::Response::RequestHeaders(headers)) = &response.response else {
        return None;
    };
    let mutation = headers.response.as_ref()?.header_mutation.as_ref()?;
    mutation
        .set_headers
        .iter()
        .filter_map(|option| option.header.as_ref())
        .find(|header| header.key == DESTINATION_ENDPOINT)
        .map(|header| String::from_utf8_lossy(&header.raw_value).into_owned())
}

fn metadata_endpoint(response: &ProcessingResponse) -> Option<String> {
    let namespace = response
        .dynamic_metadata
        .as_ref()?
        .fields
        .get(DESTINATION_NAMESPACE)?;
    let Some(value::Kind::StructValue(inner)) = &namespace.kind else {
        return None;
    };
    match &inner.fields.get(DESTINATION_ENDPOINT)?.kind {
        Some(value::Kind::StringValue(endpoint)) => Some(endpoint.clone()),
        _ => None,
    }
}

fn endpoint_of(response: &processing_response::Response) -> String {
    let wrapped = ProcessingResponse {
        response: Some(response.clone()),
        ..ProcessingResponse::default()
    };
    destination(&wrapped).expect("a destination header")
}

fn immediate_status(response: &processing_response::Response) -> Option<i32> {
    match response {
        processing_response::Response::ImmediateResponse(immediate) => {
            immediate.status.as_ref().map(|status| status.code)
        }
        _ => None,
    }
}

#[tokio::test]
async fn a_streamed_request_gets_an_endpoint_its_body_back_and_counts_in_flight() {
    let store = store(&[("a", "127.0.0.10", 8000), ("b", "127.0.0.11", 8000)]);
    let (addr, _stop) = start(store.clone()).await;
    let mut stream = Stream::open(addr).await;
    stream.send(headers(false), None).await;
    stream.send(body(&BODY[..10], false), None).await;
    stream.send(body(&BODY[10..], true), None).await;
    let picked = endpoint_of(&stream.next().await);
    assert!(
        ["127.0.0.10:8000", "127.0.0.11:8000"].contains(&picked.as_str()),
        "{picked}"
    );
    // In FULL_DUPLEX_STREAMED mode the picker hands the body back whole.
    let processing_response::Response::RequestBody(handed_back) = stream.next().await else {
        panic!("the body response");
    };
    let mutation = handed_back
        .response
        .and_then(|common| common.body_mutation)
        .and_then(|m| m.mutation);
    let Some(body_mutation::Mutation::StreamedResponse(streamed)) = mutation else {
        panic!("a streamed body");
    };
    assert_eq!(streamed.body, BODY.as_bytes());
    assert!(streamed.end_of_stream);

    let table = store.table().expect("table");
    let pool = &table.gateways.pools[POOL];
    let in_flight = |endpoint: &str| {
        pool.pods
            .iter()
            .find(|pod| pod.addr.to_string() == endpoint)
            .map(|pod| pod.in_flight())
    };
    assert_eq!(
        in_flight(&picked),
        Some(1),
        "in flight while the request lives"
    );

    // The response passes through.
    stream
        .send(
            processing_request::Request::ResponseHeaders(HttpHeaders::default()),
            None,
        )
        .await;
    assert!(matches!(
        stream.next().await,
        processing_response::Response::ResponseHeaders(_)
    ));
    stream
        .send(
            processing_request::Request::ResponseBody(HttpBody {
                body: b"data: done".to_vec(),
                end_of_stream: true,
                ..HttpBody::default()
            }),
            None,
        )
        .await;
    assert!(matches!(
        stream.next().await,
        processing_response::Response::ResponseBody(_)
    ));
    drop(stream);
    let deadline = clock::now() + std::time::Duration::from_secs(10);
    while in_flight(&picked) != Some(0) {
        assert!(clock::now() < deadline, "the request ends with its stream");
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn the_subset_hint_narrows_the_choice_and_an_empty_one_is_503() {
    let store = store(&[
        ("a", "127.0.0.10", 8000),
        ("a", "127.0.0.10", 8001),
        ("b", "127.0.0.11", 8000),
    ]);
    let (addr, _stop) = start(store).await;
    for _ in 0..3 {
        let mut stream = Stream::open(addr).await;
        let hint = subset(value::Kind::StringValue(
            "127.0.0.10:8001, 10.0.0.1:80".into(),
        ));
        stream.send(headers(true), Some(hint)).await;
        assert_eq!(endpoint_of(&stream.next().await), "127.0.0.10:8001");
    }
    let mut stream = Stream::open(addr).await;
    let list = value::Kind::ListValue(ListValue {
        values: vec![Value {
            kind: Some(value::Kind::StringValue("127.0.0.11:8000".into())),
        }],
    });
    stream.send(headers(false), Some(subset(list))).await;
    stream.send(body(BODY, true), None).await;
    assert_eq!(endpoint_of(&stream.next().await), "127.0.0.11:8000");

    let mut stream = Stream::open(addr).await;
    let elsewhere = subset(value::Kind::StringValue("10.0.0.1:80".into()));
    stream.send(headers(true), Some(elsewhere)).await;
    assert_eq!(immediate_status(&stream.next().await), Some(503));
}

#[tokio::test]
async fn no_endpoint_is_503_and_every_endpoint_saturated_is_429() {
    let (addr, _stop) = start(store(&[])).await;
    let mut stream = Stream::open(addr).await;
    stream.send(headers(true), None).await;
    assert_eq!(immediate_status(&stream.next().await), Some(503));

    let store = store(&[("a", "127.0.0.10", 8000), ("b", "127.0.0.11", 8000)]);
    let load = |pod: &str, waiting: f64, kv: f64| pb::EndpointLoad {
        namespace: "default".into(),
        pod: pod.into(),
        requests_waiting: waiting,
        kv_cache_usage: kv,
        observed_at_unix_ms: clock::unix_ms_now(),
        ..pb::EndpointLoad::default()
    };
    let apply_loads = |version: &str, loads: Vec<pb::EndpointLoad>| {
        let loads = pb::EndpointLoads {
            loads,
            observed_at_unix_ms: clock::unix_ms_now(),
            ..pb::EndpointLoads::default()
        };
        store.apply_endpoint_loads(version, loads).expect("loads");
    };
    apply_loads("l1", vec![load("a", 9.0, 0.1), load("b", 0.0, 0.95)]);
    let (addr, _stop) = start(store.clone()).await;
    let mut stream = Stream::open(addr).await;
    stream.send(headers(false), None).await;
    stream.send(body(BODY, true), None).await;
    let answer = stream.next().await;
    assert_eq!(immediate_status(&answer), Some(429));
    let processing_response::Response::ImmediateResponse(immediate) = answer else {
        panic!("immediate");
    };
    let error: serde_json::Value = serde_json::from_slice(&immediate.body).expect("json body");
    assert_eq!(error["error"]["code"], "request_dropped");

    // One endpoint with room: it takes the request.
    apply_loads("l2", vec![load("a", 9.0, 0.1), load("b", 1.0, 0.2)]);
    let mut stream = Stream::open(addr).await;
    stream.send(headers(true), None).await;
    assert_eq!(endpoint_of(&stream.next().await), "127.0.0.11:8000");
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_and_health_says_serving() {
    let (addr, _stop) = start(store(&[("a", "127.0.0.10", 8000)])).await;
    let mut stream = Stream::open(addr).await;
    stream.send(headers(false), None).await;
    stream.send(body(&"x".repeat(2048), false), None).await;
    assert_eq!(immediate_status(&stream.next().await), Some(413));

    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel);
    for service in ["", "envoy.service.ext_proc.v3.ExternalProcessor"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health answers")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
}
