//! The traffic listener: OpenAI API requests in, engine responses streamed
//! back. A request goes through named phases, each in its own module:
//!
//! 1. [`admit`]: method, path, content type; then, once the request is
//!    authenticated, body limit and body parse;
//! 2. [`authenticate`]: who sent it (an [`Identity`]), from its head alone;
//! 3. [`admission`]: may it go upstream now (token rate limits; its turn
//!    in the fairness queue);
//! 4. [`route`]: ModelRoute, rule and ModelServer (or external provider);
//!    the body edits;
//!    - [`provider`]: for an external provider, instead of 5 and 6: the
//!      request sent over HTTPS with its credential, the answer passed through;
//! 5. [`schedule`]: the ranked candidate pods (prefill/decode pairs for a
//!    ModelServer that disaggregates them), the request id;
//! 6. [`forward`]: the attempts over the candidates (retries, timeouts,
//!    ejection), a pure [`policy`](forward::policy) driving an
//!    [`Upstream`]; a pair's two legs in [`pairs`](forward::pairs);
//! 7. [`respond`]: the engine's response streamed back, usage observed;
//! 8. [`log`]: the request's record, finished into metrics and the access
//!    log when the response ends.
//!
//! What a phase learns travels as its typed output (an
//! [`InferenceRequest`], then [`Routed`],
//! [`Scheduled`](schedule::Scheduled), [`Delivered`](forward::Delivered)),
//! so no phase can read what an earlier one has not produced; the
//! [`RequestRecord`] travels alongside and every phase adds to it.

pub mod admission;
pub mod admit;
pub mod authenticate;
pub mod forward;
pub mod log;
pub mod provider;
pub mod respond;
pub mod route;
pub mod schedule;
#[cfg(test)]
pub(crate) mod testing;

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Body;

use self::admit::{Admitted, InferenceRequest};
pub use self::admit::{BodyLimits, DEFAULT_MAX_BODY_BYTES};
pub use self::authenticate::Identity;
use self::forward::pairs::PairOutbound;
use self::forward::{Http1Upstream, Outbound, Upstream};
use self::log::{Observer, RequestRecord};
pub use self::respond::ProxyBody;
use self::respond::json_response;
use self::route::Routed;
use crate::error::{ApiError, BodyError, ErrorKind};
use crate::limits::{BodyBudget, DEFAULT_BODY_BUDGET_BYTES};
use crate::snapshot::{RoutingTable, SnapshotStore};

/// The API paths a prefill/decode pair serves: those that generate tokens
/// from a prompt.
pub const PAIR_PATHS: [&str; 2] = ["/v1/chat/completions", "/v1/completions"];

/// The proxy's settings.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Size and pace of one request body.
    pub body: BodyLimits,
    /// Bytes of request bodies held at once, by all traffic workers
    /// together (each charges its own share).
    pub body_budget: Arc<BodyBudget>,
    /// The traffic port's number: Gateway listeners naming it are served
    /// there (0: only the default Gateway's).
    pub traffic_port: u16,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            body: BodyLimits::default(),
            body_budget: Arc::new(BodyBudget::new(
                DEFAULT_BODY_BUDGET_BYTES,
                1,
                DEFAULT_MAX_BODY_BYTES,
            )),
            traffic_port: 0,
        }
    }
}

/// Serves the traffic port.
#[derive(Debug)]
pub struct Proxy<U = Http1Upstream> {
    store: Arc<SnapshotStore>,
    /// Shared with the background prefill legs of SGLang pairs.
    upstream: Arc<U>,
    config: ProxyConfig,
    observer: Arc<Observer>,
}

impl Proxy {
    /// A proxy that sends to engines over HTTP/1.1, with its own connection pool.
    pub fn new(store: Arc<SnapshotStore>, config: ProxyConfig, observer: Arc<Observer>) -> Self {
        let upstream = Http1Upstream::new(observer.metrics.health.connections.clone());
        Self::with_upstream(store, config, observer, upstream)
    }
}

impl<U: Upstream> Proxy<U> {
    pub fn with_upstream(
        store: Arc<SnapshotStore>,
        config: ProxyConfig,
        observer: Arc<Observer>,
        upstream: U,
    ) -> Self {
        Self {
            store,
            upstream: Arc::new(upstream),
            config,
            observer,
        }
    }

    /// Handles one request on the traffic port; every request but probes is
    /// recorded (metrics, access log) until its response body ends.
    pub async fn handle<B>(&self, request: Request<B>) -> Response<ProxyBody<U::Body>>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BodyError>,
    {
        if request.method() == Method::GET {
            match request.uri().path() {
                "/healthz" => {
                    return json_response(
                        StatusCode::OK,
                        Bytes::from_static(br#"{"message":"ok"}"#),
                    );
                }
                "/readyz" => return readiness_response(&self.store),
                _ => {}
            }
        }
        let mut record = RequestRecord::start(&self.observer, &request);
        let response = match self.phases(request, &mut record).await {
            Ok(response) => response,
            Err(error) => record.failed(error),
        };
        respond::hand_over(response, record)
    }

    /// The phases of one request, in order.
    async fn phases<B>(
        &self,
        request: Request<B>,
        record: &mut RequestRecord,
    ) -> Result<Response<ProxyBody<U::Body>>, ApiError>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BodyError>,
    {
        let mut admitted = admit::admit(request)?;
        let table = self.store.table().ok_or_else(not_ready)?;
        let identity = authenticate::authenticate(
            table.authenticator.as_ref(),
            admitted.head_mut(),
            self.store.unknown_keys(),
        )?;
        record.set_identity(&identity);
        // Held until the request is forwarded: its body's bytes are in use till then.
        let mut reservation = self.config.body_budget.reservation();
        let request = match admitted {
            Admitted::Inference(request) => {
                request.read(&self.config.body, &mut reservation).await?
            }
            Admitted::ListModels(_) => {
                return Ok(json_response(StatusCode::OK, table.models_body.clone()));
            }
        };
        record.set_model(&request.parsed.model);
        // The less common paths are boxed: their state (a budget's Redis
        // round trip, a queue wait, a provider's TLS, two legs) would
        // otherwise enlarge every request's future, which is moved and
        // zeroed as the request goes.
        if admission::applies(
            &table.rate_limits,
            table.fairness.as_deref(),
            &identity,
            &request,
        ) {
            Box::pin(admission::admission(
                &table.rate_limits,
                self.store.rate_limiting(),
                table.fairness.as_deref(),
                &identity,
                &request,
                record,
            ))
            .await?;
        }
        let routed = route::route(&table, &request, self.config.traffic_port, record)?;
        if let Some(provider) = routed.decision.server.provider.clone() {
            return Box::pin(provider::forward_to_provider(
                self.upstream.as_ref(),
                &provider,
                request,
                routed,
                record,
            ))
            .await;
        }
        if routed.decision.server.prefill_decode.is_some() {
            return Box::pin(self.pairs(&table, request, routed, record)).await;
        }
        let mut routed = routed;
        let scheduled = schedule::schedule(&table.scheduler, &request, &routed, record)?;
        let InferenceRequest { head, body, .. } = request;
        let mut outbound = Outbound::new(head, routed.edited_body(body), &scheduled.request_id);
        if let Some(rewrite) = &routed.decision.rewrite {
            outbound.rewrite(rewrite);
        }
        let server = &routed.decision.server;
        let delivered = forward::forward(
            self.upstream.as_ref(),
            record,
            server,
            scheduled.ranking,
            outbound,
        )
        .await?;
        schedule::dispatched(&table.scheduler, &scheduled, delivered.guard.pod());
        (self.observer.metrics.health).count_decision(&request.parsed.model, delivered.guard.pod());
        Ok(respond::respond(
            delivered,
            scheduled.request_id,
            routed.hide_usage_chunk,
            record,
        ))
    }

    /// Schedule, forward and respond for a prefill/decode ModelServer: the
    /// candidates are pairs, each attempt two legs.
    async fn pairs(
        &self,
        table: &RoutingTable,
        request: InferenceRequest,
        mut routed: Routed,
        record: &mut RequestRecord,
    ) -> Result<Response<ProxyBody<U::Body>>, ApiError> {
        let edits = routed.take_edits();
        let model_literal = routed.model_literal().cloned();
        let server = &routed.decision.server;
        let Some(pd) = &server.prefill_decode else {
            return Err(ApiError::new(
                ErrorKind::NoReadyPod,
                format!("ModelServer {} has no prefill/decode pairs", server.key),
            ));
        };
        let path = request.head.uri.path();
        if !PAIR_PATHS.contains(&path) {
            return Err(ApiError::new(
                ErrorKind::UnsupportedPath,
                format!(
                    "ModelServer {} disaggregates prefill and decode, which serves {PAIR_PATHS:?} only, not {path}",
                    server.key
                ),
            ));
        }
        let scheduled = schedule::schedule_pairs(&table.scheduler, &request, &routed, pd, record)?;
        let outbound = PairOutbound::new(
            request.head,
            request.body,
            edits,
            model_literal,
            &scheduled.request_id,
        );
        let delivered = forward::pairs::forward(
            &self.upstream,
            record,
            server,
            pd.connector,
            scheduled.ranking,
            outbound,
        )
        .await?;
        // The prompt's KV lives on the prefill pod: that is where prefix affinity points.
        if let Some(pod) = record.prefill_pod() {
            schedule::dispatched(&table.scheduler, &scheduled, pod);
        }
        Ok(respond::respond(
            delivered,
            scheduled.request_id,
            routed.hide_usage_chunk,
            record,
        ))
    }
}

fn not_ready() -> ApiError {
    ApiError::new(
        ErrorKind::NotReady,
        "router is not ready: no routing snapshot received from the controller yet",
    )
}

/// Readiness: ready once the first snapshot is applied. Served on the
/// traffic port and the admin listener.
pub fn readiness_response<B>(store: &SnapshotStore) -> Response<ProxyBody<B>> {
    match store.table() {
        // Ready on any snapshot, even one without routes (the controller
        // published it deliberately): the route count says what it holds,
        // and an alert watches for 0 (`kthena_router_routes`).
        Some(table) => json_response(
            StatusCode::OK,
            Bytes::from(
                serde_json::json!({
                    "message": "router is ready",
                    "routes": table.routes.len(),
                    "routeConfigVersion": table.version,
                })
                .to_string(),
            ),
        ),
        None => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            Bytes::from_static(br#"{"message":"router is not ready"}"#),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::HeaderMap;
    use http_body_util::{BodyExt, Full};
    use switchyard_snapshot::pb;
    use switchyard_snapshot::test_builders::pd_group;

    use super::testing::{
        self, Script, ScriptedBody, ScriptedUpstream, one_route_config, test_observer,
    };
    use super::*;
    use crate::metrics::RouterMetrics;

    struct Harness {
        proxy: Proxy<ScriptedUpstream>,
        store: Arc<SnapshotStore>,
        metrics: Arc<RouterMetrics>,
    }

    /// Route `m` to `pods` pods whose ModelServer renames it `org/m`.
    fn harness(
        scripts: impl IntoIterator<Item = Script>,
        pods: usize,
        policy: pb::TrafficPolicy,
    ) -> Harness {
        let config = one_route_config("m", &[], Some("org/m"), pods, policy);
        harness_of(config, ScriptedUpstream::new(scripts))
    }

    /// A proxy serving `config` through `upstream`, its metrics resolved.
    fn harness_of(config: pb::RouteConfig, upstream: ScriptedUpstream) -> Harness {
        let observer = test_observer();
        let metrics = observer.metrics.clone();
        let fairness = crate::fairness::Fairness::new(crate::fairness::FairnessMetrics {
            queue_size: metrics.fairness_queue_size.clone(),
            queue_duration: metrics.fairness_queue_duration_seconds.clone(),
        });
        let store = Arc::new(SnapshotStore::new().with_fairness(Arc::new(fairness)));
        store
            .apply_route_config("v1", config)
            .expect("valid snapshot");
        if let Some(table) = store.table() {
            metrics.resolve(&table);
        }
        let proxy = Proxy::with_upstream(store.clone(), ProxyConfig::default(), observer, upstream);
        Harness {
            proxy,
            store,
            metrics,
        }
    }

    struct Answer {
        status: StatusCode,
        headers: HeaderMap,
        body: Result<Bytes, String>,
    }

    impl Answer {
        fn text(&self) -> String {
            String::from_utf8_lossy(self.body.as_deref().unwrap_or_default()).into_owned()
        }

        fn json(&self) -> serde_json::Value {
            serde_json::from_str(&self.text()).expect("a JSON body")
        }
    }

    impl Harness {
        async fn post(&self, path: &str, body: &'static str) -> Answer {
            self.call(Method::POST, path, body).await
        }

        async fn call(&self, method: Method, path: &str, body: &'static str) -> Answer {
            self.call_with(method, path, &[], body).await
        }

        async fn call_with(
            &self,
            method: Method,
            path: &str,
            headers: &[(&'static str, &'static str)],
            body: &'static str,
        ) -> Answer {
            let mut request = Request::builder()
                .method(method)
                .uri(path)
                .header(http::header::CONTENT_TYPE, "application/json");
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let request = request
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .expect("request");
            let response: Response<ProxyBody<ScriptedBody>> = self.proxy.handle(request).await;
            let (parts, body) = response.into_parts();
            Answer {
                status: parts.status,
                headers: parts.headers,
                body: body
                    .collect()
                    .await
                    .map(|collected| collected.to_bytes())
                    .map_err(|error| error.to_string()),
            }
        }

        fn metric(&self, series: &str) -> Option<f64> {
            testing::metric(&self.metrics, series)
        }
    }

    const USAGE_BODY: &str = r#"{"choices":[{"text":"hi"}],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#;

    #[tokio::test(start_paused = true)]
    async fn a_request_goes_through_every_phase() {
        let h = harness(
            [Script::json(200, USAGE_BODY)],
            2,
            pb::TrafficPolicy::default(),
        );
        let answer = h
            .post("/v1/completions", r#"{"model":"m","prompt":"hi"}"#)
            .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.text(), USAGE_BODY);
        let request_id = answer.headers["x-request-id"].clone();
        let sent = h.proxy.upstream.sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(
            sent[0].body, r#"{"model":"org/m","prompt":"hi"}"#,
            "model rewritten"
        );
        assert_eq!(
            sent[0].headers["x-request-id"], request_id,
            "one id end to end"
        );
        assert_eq!(
            h.metric(r#"kthena_router_requests_total{error_type="successful_request",model="m",path="/v1/completions",status_code="200"}"#),
            Some(1.0)
        );
        assert_eq!(
            h.metric(r#"kthena_router_tokens_total{model="m",path="/v1/completions",token_type="output"}"#),
            Some(5.0)
        );
        let table = h.store.table().expect("snapshot");
        assert!(
            table.pods.values().all(|pod| pod.in_flight() == 0),
            "released when the body ended"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_hides_the_usage_chunk_the_router_asked_for() {
        let h = harness(
            [Script::sse(&[
                "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n",
                "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\n",
                "data: [DONE]\n\n",
            ])],
            1,
            pb::TrafficPolicy::default(),
        );
        let answer = h
            .post("/v1/chat/completions", r#"{"model":"m","stream":true}"#)
            .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(
            answer.text(),
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: [DONE]\n\n"
        );
        assert!(!answer.headers.contains_key(http::header::CONTENT_LENGTH));
        let sent = &h.proxy.upstream.sent()[0];
        assert_eq!(
            sent.body,
            r#"{"stream_options":{"include_usage":true},"model":"org/m","stream":true}"#
        );
        assert_eq!(
            h.metric(r#"kthena_router_tokens_total{model="m",path="/v1/chat/completions",token_type="input"}"#),
            Some(7.0)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_retried_503_answers_from_the_next_pod() {
        let policy = pb::TrafficPolicy {
            retry_attempts: 1,
            retry_interval_ms: 100,
            ..Default::default()
        };
        let h = harness(
            [Script::status(503), Script::json(200, USAGE_BODY)],
            2,
            policy,
        );
        let answer = h.post("/v1/completions", r#"{"model":"m"}"#).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(h.proxy.upstream.pods().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn engine_errors_pass_through_with_the_request_id() {
        let h = harness(
            [Script::json(400, r#"{"error":"bad"}"#)],
            2,
            pb::TrafficPolicy::default(),
        );
        let answer = h.post("/v1/completions", r#"{"model":"m"}"#).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST);
        assert_eq!(answer.text(), r#"{"error":"bad"}"#);
        assert!(answer.headers.contains_key("x-request-id"));
        assert_eq!(
            h.metric(r#"kthena_router_requests_total{error_type="engine_error",model="m",path="/v1/completions",status_code="400"}"#),
            Some(1.0)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn router_errors_are_openai_json_and_counted() {
        let h = harness([], 1, pb::TrafficPolicy::default());
        let answer = h.post("/v1/completions", r#"{"model":"other"}"#).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND);
        assert_eq!(answer.json()["error"]["code"], "route_not_found");
        assert!(!answer.headers.contains_key("x-request-id"));
        let answer = h.call(Method::GET, "/v1/completions", "").await;
        assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(
            h.metric(r#"kthena_router_requests_total{error_type="route_not_found",model="unknown",path="/v1/completions",status_code="404"}"#),
            Some(1.0)
        );
        assert!(h.proxy.upstream.sent().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_stream_reaches_the_client_and_is_counted() {
        let h = harness(
            [Script::cut_stream(b"data: {}\n\n")],
            1,
            pb::TrafficPolicy::default(),
        );
        let answer = h
            .post("/v1/completions", r#"{"model":"m","stream":true}"#)
            .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(answer.body.is_err(), "the client sees the cut");
        assert_eq!(
            h.metric(r#"kthena_router_requests_total{error_type="upstream_stream_error",model="m",path="/v1/completions",status_code="200"}"#),
            Some(1.0)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn probes_and_the_model_list_follow_the_snapshot() {
        let empty = Proxy::with_upstream(
            Arc::new(SnapshotStore::new()),
            ProxyConfig::default(),
            test_observer(),
            ScriptedUpstream::default(),
        );
        let h = Harness {
            proxy: empty,
            store: Arc::new(SnapshotStore::new()),
            metrics: RouterMetrics::new().expect("metrics"),
        };
        assert_eq!(
            h.call(Method::GET, "/healthz", "").await.status,
            StatusCode::OK
        );
        assert_eq!(
            h.call(Method::GET, "/readyz", "").await.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        let answer = h.call(Method::GET, "/v1/models", "").await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.json()["error"]["code"], "router_not_ready");
        let answer = h.post("/v1/completions", r#"{"model":"m"}"#).await;
        assert_eq!(answer.json()["error"]["code"], "router_not_ready");

        let h = harness([], 1, pb::TrafficPolicy::default());
        let ready = h.call(Method::GET, "/readyz", "").await;
        assert_eq!(ready.status, StatusCode::OK);
        assert_eq!(
            ready.json(),
            serde_json::json!({"message": "router is ready", "routes": 1, "routeConfigVersion": "v1"})
        );
        let answer = h.call(Method::GET, "/v1/models", "").await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.json()["data"][0]["id"], "m");
    }

    const HELLO_WORLD: &str =
        r#"{"model":"m","messages":[{"role":"user","content":"hello world"}]}"#;

    #[tokio::test(start_paused = true)]
    async fn authentication_guards_every_api_path_and_keeps_credentials_from_engines() {
        use sha2::Digest;
        let mut config = one_route_config("m", &[], None, 1, pb::TrafficPolicy::default());
        config.auth = Some(pb::AuthConfig {
            api_keys: vec![pb::ApiKey {
                key_sha256: sha2::Sha256::digest(b"sk-alice").to_vec(),
                user_id: "alice".into(),
                tier: String::new(),
            }],
            jwt: None,
        });
        let h = harness_of(
            config,
            ScriptedUpstream::new([Script::json(200, USAGE_BODY)]),
        );
        let refused = h.post("/v1/completions", r#"{"model":"m"}"#).await;
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            refused.headers["www-authenticate"],
            "Bearer realm=\"switchyard\""
        );
        assert_eq!(refused.json()["error"]["code"], "invalid_authentication");
        let wrong = [("authorization", "Bearer sk-mallory")];
        let refused = h
            .call_with(Method::POST, "/v1/completions", &wrong, "{}")
            .await;
        assert_eq!(
            refused.json()["error"]["message"],
            "the API key is not valid"
        );
        assert_eq!(
            h.call(Method::GET, "/v1/models", "").await.status,
            StatusCode::UNAUTHORIZED
        );
        assert!(
            h.proxy.upstream.sent().is_empty(),
            "nothing reached an engine"
        );
        let key = [
            ("authorization", "Bearer sk-alice"),
            ("x-api-key", "sk-alice"),
        ];
        let listed = h.call_with(Method::GET, "/v1/models", &key, "").await;
        assert_eq!(listed.status, StatusCode::OK);
        let served = h
            .call_with(Method::POST, "/v1/completions", &key, r#"{"model":"m"}"#)
            .await;
        assert_eq!(served.status, StatusCode::OK);
        let sent = h.proxy.upstream.sent();
        assert!(
            !sent[0].headers.contains_key("authorization")
                && !sent[0].headers.contains_key("x-api-key"),
            "{:?}",
            sent[0].headers
        );
        assert_eq!(
            h.metric(r#"kthena_router_requests_total{error_type="invalid_authentication",model="unknown",path="/v1/completions",status_code="401"}"#),
            Some(2.0)
        );
    }

    /// The one route of model `m`, limited to `input` and `output` tokens per `unit`.
    fn rate_limited_config(input: u32, output: u32, unit: &str) -> pb::RouteConfig {
        let mut config = one_route_config("m", &[], None, 1, pb::TrafficPolicy::default());
        config.routes[0].rate_limit = Some(pb::RateLimit {
            input_tokens_per_unit: input,
            output_tokens_per_unit: output,
            unit: unit.into(),
            ..Default::default()
        });
        config
    }

    #[tokio::test(start_paused = true)]
    async fn a_limited_route_admits_its_budget_with_headers_then_refuses_with_429() {
        let config = rate_limited_config(30, 100, "minute");
        let h = harness_of(
            config,
            ScriptedUpstream::new((0..3).map(|_| Script::json(200, USAGE_BODY))),
        );
        for remaining in ["20", "10", "0"] {
            let answer = h.post("/v1/chat/completions", HELLO_WORLD).await;
            assert_eq!(answer.status, StatusCode::OK);
            assert_eq!(answer.headers["x-ratelimit-limit-tokens"], "30");
            assert_eq!(answer.headers["x-ratelimit-remaining-tokens"], remaining);
        }
        let refused = h.post("/v1/chat/completions", HELLO_WORLD).await;
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.headers["retry-after"], "20");
        assert_eq!(refused.headers["x-ratelimit-remaining-tokens"], "0");
        assert_eq!(refused.json()["error"]["code"], "rate_limit_exceeded");
        assert_eq!(h.proxy.upstream.sent().len(), 3);
        assert_eq!(
            h.metric(r#"kthena_router_rate_limit_exceeded_total{limit_type="input_tokens",model="m",path="/v1/chat/completions"}"#),
            Some(1.0)
        );
        assert_eq!(
            h.metric(r#"kthena_router_requests_total{error_type="rate_limit",model="unknown",path="/v1/chat/completions",status_code="429"}"#),
            Some(1.0)
        );
        // A model without a limit is not limited and carries no headers.
        let other = h.post("/v1/completions", r#"{"model":"other"}"#).await;
        assert!(!other.headers.contains_key("x-ratelimit-limit-tokens"));
    }

    #[tokio::test(start_paused = true)]
    async fn output_is_charged_in_full_when_the_response_ends() {
        let config = rate_limited_config(0, 100, "minute");
        const LONG: &str =
            r#"{"choices":[{"text":"..."}],"usage":{"prompt_tokens":3,"completion_tokens":250}}"#;
        let h = harness_of(
            config,
            ScriptedUpstream::new([Script::json(200, LONG), Script::json(200, LONG)]),
        );
        assert_eq!(
            h.post("/v1/completions", r#"{"model":"m","prompt":"x"}"#)
                .await
                .status,
            StatusCode::OK
        );
        let refused = h
            .post("/v1/completions", r#"{"model":"m","prompt":"x"}"#)
            .await;
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(
            refused.json()["error"]["message"]
                .as_str()
                .is_some_and(|message| message.starts_with("output token rate limit exceeded")),
            "{}",
            refused.text()
        );
        // 150 tokens of debt plus the one needed, at 100 per minute.
        assert_eq!(refused.headers["retry-after"], "91");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_cut_by_its_client_is_charged_for_the_chunks_it_received() {
        let config = rate_limited_config(0, 3, "hour");
        let frames = [
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"c\"}}]}\n\n",
        ];
        let h = harness_of(config, ScriptedUpstream::new([Script::sse(&frames)]));
        let request = Request::post("/v1/completions")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from_static(
                br#"{"model":"m","prompt":"x","stream":true}"#,
            )))
            .expect("request");
        let response: Response<ProxyBody<ScriptedBody>> = h.proxy.handle(request).await;
        let mut body = response.into_body();
        for _ in 0..3 {
            body.frame().await.expect("a frame").expect("data");
        }
        // The client goes away before the stream's end (and its usage).
        drop(body);
        let refused = h
            .post("/v1/completions", r#"{"model":"m","prompt":"x"}"#)
            .await;
        assert_eq!(
            refused.status,
            StatusCode::TOO_MANY_REQUESTS,
            "3 chunks charged"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_model_queues_then_refuses_with_429_or_504_and_serves_in_turn() {
        let mut config = one_route_config("m", &[], None, 1, pb::TrafficPolicy::default());
        config.fairness = Some(pb::FairnessConfig {
            max_concurrent_per_pod: 1,
            queue_timeout_ms: 2_000,
            max_queue_length: 1,
            max_user_queue_length: 1,
            user_header: "x-user-id".into(),
            max_metric_users: 8,
            session_header: "x-session-id".into(),
            max_sessions: 8,
            window_ms: 60_000,
            input_token_weight: 1.0,
            output_token_weight: 2.0,
            ..Default::default()
        });
        let frames = [
            "data: {\"choices\":[{\"text\":\"a\"}]}\n\n",
            "data: [DONE]\n\n",
        ];
        let h = harness_of(
            config,
            ScriptedUpstream::new([Script::sse(&frames), Script::json(200, USAGE_BODY)]),
        );
        let body = r#"{"model":"m","prompt":"hi","stream":true}"#;
        let request = |user: &'static str| {
            Request::post("/v1/completions")
                .header(http::header::CONTENT_TYPE, "application/json")
                .header("x-user-id", user)
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .expect("request")
        };
        // Alice's stream holds the pod's one slot until its body ends.
        let streaming: Response<ProxyBody<ScriptedBody>> = h.proxy.handle(request("alice")).await;
        assert_eq!(streaming.status(), StatusCode::OK);
        let started = tokio::time::Instant::now();
        let (waited, refused) = tokio::join!(
            h.call_with(
                Method::POST,
                "/v1/completions",
                &[("x-user-id", "bob")],
                body
            ),
            h.call_with(
                Method::POST,
                "/v1/completions",
                &[("x-user-id", "carol")],
                body
            ),
        );
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.json()["error"]["code"], "queue_full");
        assert!(refused.headers.contains_key("retry-after"));
        assert_eq!(waited.status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            waited.json()["error"]["message"],
            "Request processing timed out in queue"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(
            h.proxy.upstream.sent().len(),
            1,
            "only alice reached an engine"
        );
        // Alice's stream ends: the slot is free again.
        streaming.into_body().collect().await.expect("stream");
        let served = h
            .call_with(
                Method::POST,
                "/v1/completions",
                &[("x-user-id", "dave")],
                r#"{"model":"m"}"#,
            )
            .await;
        assert_eq!(served.status, StatusCode::OK);
        for (series, expected) in [
            (
                r#"kthena_router_requests_total{error_type="queue_full",model="unknown",path="/v1/completions",status_code="429"}"#,
                1.0,
            ),
            (
                r#"kthena_router_requests_total{error_type="queue_timeout",model="unknown",path="/v1/completions",status_code="504"}"#,
                1.0,
            ),
            (
                r#"kthena_router_fairness_queue_duration_seconds_count{model="m",user_id="alice"}"#,
                1.0,
            ),
            (
                r#"kthena_router_fairness_queue_duration_seconds_count{model="m",user_id="dave"}"#,
                1.0,
            ),
            (
                r#"kthena_router_fairness_queue_size{model="m",user_id="bob"}"#,
                0.0,
            ),
        ] {
            assert_eq!(h.metric(series), Some(expected), "{series}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_fairness_block_nothing_is_queued() {
        let h = harness(
            [Script::json(200, USAGE_BODY), Script::json(200, USAGE_BODY)],
            1,
            pb::TrafficPolicy::default(),
        );
        assert!(h.store.table().expect("table").fairness.is_none());
        assert!(h.store.fairness().views().is_empty());
        let (a, b) = tokio::join!(
            h.post("/v1/completions", r#"{"model":"m"}"#),
            h.post("/v1/completions", r#"{"model":"m"}"#),
        );
        assert_eq!((a.status, b.status), (StatusCode::OK, StatusCode::OK));
    }

    /// Route `m` to a NIXL ModelServer of groups g0 (prefill p0, decode p1)
    /// and g1 (prefill p2 only).
    fn pd_harness(scripts: impl IntoIterator<Item = (&'static str, Vec<Script>)>) -> Harness {
        let mut config = one_route_config("m", &[], None, 3, pb::TrafficPolicy::default());
        config.servers[0].prefill_decode = Some(pb::PrefillDecode {
            kv_connector: pb::KvConnector::Nixl.into(),
            group_label: "group".into(),
            groups: vec![
                pd_group("g0", &["p0"], &["p1"]),
                pd_group("g1", &["p2"], &[]),
            ],
        });
        harness_of(config, ScriptedUpstream::per_pod(scripts))
    }

    #[tokio::test(start_paused = true)]
    async fn a_prefill_decode_request_is_counted_per_group_role_and_leg() {
        let h = pd_harness([
            (
                "p0",
                vec![
                    Script::json(200, r#"{"kv_transfer_params":{"remote_engine_id":"e"}}"#),
                    Script::json(200, r#"{"id":"no-params"}"#),
                ],
            ),
            (
                "p1",
                vec![Script::json(200, USAGE_BODY), Script::json(200, USAGE_BODY)],
            ),
        ]);
        for _ in 0..2 {
            let answer = h
                .post("/v1/completions", r#"{"model":"m","prompt":"hi"}"#)
                .await;
            assert_eq!(answer.status, StatusCode::OK);
            assert_eq!(answer.text(), USAGE_BODY);
        }
        for (series, value) in [
            (
                r#"kthena_pd_group_requests_total{group_key="g0",model="m",role="prefill"}"#,
                2.0,
            ),
            (
                r#"kthena_pd_group_requests_total{group_key="g0",model="m",role="decode"}"#,
                2.0,
            ),
            (
                r#"kthena_pd_group_requests_total{group_key="g1",model="m",role="prefill"}"#,
                0.0,
            ),
            (
                r#"kthena_pd_group_routing_decisions{group_key="g0",source_role="decode",target_role="prefill"}"#,
                2.0,
            ),
            (
                r#"kthena_router_pd_kv_transfer_params_total{model_server="default/s",outcome="relayed"}"#,
                1.0,
            ),
            (
                r#"kthena_router_pd_kv_transfer_params_total{model_server="default/s",outcome="missing"}"#,
                1.0,
            ),
            (
                r#"kthena_router_request_prefill_duration_seconds_count{model="m",path="/v1/completions",status_code="200"}"#,
                2.0,
            ),
            (
                r#"kthena_router_request_decode_duration_seconds_count{model="m",path="/v1/completions",status_code="200"}"#,
                2.0,
            ),
            (
                r#"kthena_router_tokens_total{model="m",path="/v1/completions",token_type="output"}"#,
                10.0,
            ),
        ] {
            assert_eq!(h.metric(series), Some(value), "{series}");
        }
        let table = h.store.table().expect("snapshot");
        assert!(table.pods.values().all(|pod| pod.in_flight() == 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_prefill_decode_server_refuses_paths_it_cannot_split() {
        let h = pd_harness([]);
        let answer = h
            .post("/v1/embeddings", r#"{"model":"m","input":"hi"}"#)
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST);
        assert_eq!(answer.json()["error"]["code"], "unsupported_path");
        assert!(h.proxy.upstream.sent().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_prefill_decode_server_without_a_complete_group_is_503() {
        let h = pd_harness([]);
        let mut config = one_route_config("m", &[], None, 1, pb::TrafficPolicy::default());
        config.servers[0].prefill_decode = Some(pb::PrefillDecode {
            kv_connector: pb::KvConnector::Http.into(),
            group_label: "group".into(),
            groups: vec![pd_group("g0", &["p0"], &[])],
        });
        h.store.apply_route_config("v2", config).expect("valid");
        let answer = h.post("/v1/completions", r#"{"model":"m"}"#).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.json()["error"]["code"], "no_ready_pod");
        assert!(h.proxy.upstream.sent().is_empty());
    }
}
