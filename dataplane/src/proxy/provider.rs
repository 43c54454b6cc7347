//! Phase `provider` (instead of schedule and forward when the route's
//! target is an ExternalModelProvider): the request goes to the provider
//! over HTTPS as the client sent it (plus the model override and, for
//! OpenAI chat streams, `include_usage`), with only allowed headers, the
//! provider's static headers and its credential. The provider's answer,
//! errors included (a 429 with its `Retry-After`), passes through unchanged.
//! Only a connection that could not be made is retried: once anything was
//! sent, a provider may have acted on it (and billed for it).

use http::{Method, Request, Response};
use http_body_util::Full;

use super::admit::InferenceRequest;
use super::forward::{Upstream, UpstreamError};
use super::log::RequestRecord;
use super::respond::{self, ProxyBody};
use super::route::Routed;
use crate::error::{ApiError, ErrorKind};
use crate::providers::Provider;
use crate::request_id::REQUEST_ID_HEADER;

/// Attempts after a failed connection: a provider's load balancer may
/// refuse one connection during a deploy; a second refusal means it is down.
pub const PROVIDER_CONNECT_RETRIES: u32 = 1;

/// Sends `request`, routed to `provider`, and streams the answer back.
pub async fn forward_to_provider<U: Upstream>(
    upstream: &U,
    provider: &Provider,
    request: InferenceRequest,
    mut routed: Routed,
    record: &mut RequestRecord,
) -> Result<Response<ProxyBody<U::Body>>, ApiError> {
    let path = request.head.uri.path();
    if !provider.kind.serves(path) {
        return Err(ApiError::new(
            ErrorKind::UnsupportedProviderPath,
            format!(
                "provider type {} does not support path {path}",
                provider.kind.as_str()
            ),
        ));
    }
    let request_id = crate::request_id::ClientRequestId::of(&request.head.headers).or_generate();
    record.set_request_id(&request_id);
    let InferenceRequest { head, body, .. } = request;
    let uri = head
        .uri
        .path_and_query()
        .map(|path_and_query| provider.url_for(path_and_query))
        .transpose()
        .map_err(|error| {
            ApiError::new(
                ErrorKind::InvalidBody,
                format!("invalid request path: {error}"),
            )
        })?
        .ok_or_else(|| ApiError::new(ErrorKind::InvalidBody, "the request has no path"))?;
    let mut headers = provider.request_headers(&head.headers);
    headers.insert(REQUEST_ID_HEADER, request_id.clone());
    let body = routed.edited_body(body);
    let mut attempt = 0;
    loop {
        let mut outbound = Request::new(Full::new(body.clone()));
        *outbound.method_mut() = Method::POST;
        *outbound.uri_mut() = uri.clone();
        *outbound.headers_mut() = headers.clone();
        record.begin_upstream_attempt();
        match upstream.send_to_provider(provider, outbound).await {
            Ok(response) => {
                return Ok(respond::respond_holding(
                    response,
                    None,
                    request_id,
                    routed.hide_usage_chunk,
                    record,
                ));
            }
            Err(UpstreamError::Connect(error)) if attempt < PROVIDER_CONNECT_RETRIES => {
                record.connect_failed();
                tracing::warn!(provider = %provider.key, %error, "cannot connect to the provider; retrying");
                attempt += 1;
            }
            Err(error) => {
                if matches!(error, UpstreamError::Connect(_)) {
                    record.connect_failed();
                }
                tracing::warn!(provider = %provider.key, %error, "provider request failed");
                return Err(ApiError::new(
                    ErrorKind::UpstreamFailed,
                    format!("provider {} failed: {error}", provider.key),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use http::{Request, StatusCode};
    use http_body_util::{BodyExt, Full};
    use switchyard_snapshot::pb;
    use switchyard_snapshot::test_builders as builders;

    use super::super::testing::{self, Script, ScriptedUpstream, test_observer};
    use super::super::{Proxy, ProxyConfig};
    use crate::snapshot::SnapshotStore;

    /// `gpt` routed to an OpenAI provider (model override `gpt-4o-mini`,
    /// a Bearer credential, a static header), `claude` to an Anthropic one.
    fn config() -> pb::RouteConfig {
        let provider = |name: &str, kind: pb::ProviderType, scheme: pb::CredentialScheme| {
            pb::ExternalProvider {
                namespace: "default".into(),
                name: name.into(),
                provider_type: kind.into(),
                base_url: format!("https://{name}.example/v1"),
                credential: Some(pb::ProviderCredential {
                    scheme: scheme.into(),
                    value: format!("sk-{name}-secret"),
                }),
                headers: vec![pb::ProviderHeader {
                    name: "x-team".into(),
                    value: "ml".into(),
                }],
                ..Default::default()
            }
        };
        let to = |provider: &str| {
            vec![pb::Rule {
                targets: vec![pb::WeightedTarget {
                    external_provider: format!("default/{provider}"),
                    weight: 1,
                    ..Default::default()
                }],
                ..Default::default()
            }]
        };
        let mut config = builders::route_config(
            vec![
                builders::route_with_rules("gpt", "gpt", to("openai")),
                builders::route_with_rules("claude", "claude", to("anthropic")),
            ],
            vec![],
        );
        config.external_providers = vec![
            pb::ExternalProvider {
                model: Some("gpt-4o-mini".into()),
                ..provider(
                    "openai",
                    pb::ProviderType::Openai,
                    pb::CredentialScheme::Bearer,
                )
            },
            provider(
                "anthropic",
                pb::ProviderType::Anthropic,
                pb::CredentialScheme::ApiKey,
            ),
        ];
        config
    }

    struct Answer {
        status: StatusCode,
        headers: http::HeaderMap,
        text: String,
    }

    async fn post(
        proxy: &Proxy<ScriptedUpstream>,
        path: &str,
        headers: &[(&'static str, &'static str)],
        body: &'static str,
    ) -> Answer {
        let mut request = Request::post(path).header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("request");
        let (parts, body) = proxy.handle(request).await.into_parts();
        let bytes = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        Answer {
            status: parts.status,
            headers: parts.headers,
            text: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    fn proxy(scripts: impl IntoIterator<Item = Script>) -> Proxy<ScriptedUpstream> {
        let store = Arc::new(SnapshotStore::new());
        store
            .apply_route_config("v1", config())
            .expect("valid snapshot");
        let observer = test_observer();
        if let Some(table) = store.table() {
            observer.metrics.resolve(&table);
        }
        Proxy::with_upstream(
            store,
            ProxyConfig::default(),
            observer,
            ScriptedUpstream::new(scripts),
        )
    }

    #[tokio::test]
    async fn an_openai_stream_carries_the_credential_and_the_override_and_hides_the_usage_chunk() {
        let proxy = proxy([Script::sse(&[
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":2}}\n\n",
            "data: [DONE]\n\n",
        ])]);
        let client_headers = [
            ("authorization", "Bearer client-own-key"),
            ("cookie", "session=1"),
            ("traceparent", "00-1-2-01"),
        ];
        let answer = post(
            &proxy,
            "/v1/chat/completions",
            &client_headers,
            r#"{"model":"gpt","stream":true,"messages":[]}"#,
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(!answer.text.contains("usage"), "{}", answer.text);
        let sent = &proxy.upstream.sent()[0];
        assert_eq!(sent.pod, "default/openai");
        assert_eq!(sent.uri, "https://openai.example/v1/chat/completions");
        assert_eq!(sent.headers["authorization"], "Bearer sk-openai-secret");
        assert_eq!(sent.headers["x-team"], "ml");
        assert_eq!(sent.headers["traceparent"], "00-1-2-01");
        assert!(!sent.headers.contains_key("cookie"));
        assert_eq!(sent.headers["x-request-id"], answer.headers["x-request-id"]);
        assert_eq!(
            sent.body,
            r#"{"stream_options":{"include_usage":true},"model":"gpt-4o-mini","stream":true,"messages":[]}"#
        );
        let metrics = &proxy.observer.metrics;
        assert_eq!(
            testing::metric(
                metrics,
                r#"kthena_router_tokens_total{model="gpt",path="/v1/chat/completions",token_type="input"}"#
            ),
            Some(11.0)
        );
    }

    #[tokio::test]
    async fn anthropic_gets_its_key_and_version_headers_and_usage_is_counted() {
        let proxy = proxy([Script::sse(&[
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":5,\"cache_read_input_tokens\":3,\"output_tokens\":1}}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        ])]);
        let answer = post(
            &proxy,
            "/v1/messages",
            &[
                ("anthropic-version", "2023-06-01"),
                ("x-api-key", "client-key"),
            ],
            r#"{"model":"claude","stream":true,"max_tokens":8,"messages":[]}"#,
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(answer.text.contains("message_stop"));
        let sent = &proxy.upstream.sent()[0];
        assert_eq!(sent.uri, "https://anthropic.example/v1/messages");
        assert_eq!(sent.headers["x-api-key"], "sk-anthropic-secret");
        assert_eq!(sent.headers["anthropic-version"], "2023-06-01");
        assert!(!sent.headers.contains_key("authorization"));
        assert_eq!(
            sent.body, r#"{"model":"claude","stream":true,"max_tokens":8,"messages":[]}"#,
            "no override, no stream_options"
        );
        let metrics = &proxy.observer.metrics;
        assert_eq!(
            testing::metric(
                metrics,
                r#"kthena_router_tokens_total{model="claude",path="/v1/messages",token_type="input"}"#
            ),
            Some(8.0)
        );
        assert_eq!(
            testing::metric(
                metrics,
                r#"kthena_router_tokens_total{model="claude",path="/v1/messages",token_type="output"}"#
            ),
            Some(7.0)
        );
    }

    #[tokio::test]
    async fn an_unsupported_path_is_a_400_naming_the_type_and_path() {
        let proxy = proxy([]);
        let answer = post(&proxy, "/v1/chat/completions", &[], r#"{"model":"claude"}"#).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST);
        assert!(
            answer
                .text
                .contains("provider type Anthropic does not support path /v1/chat/completions"),
            "{}",
            answer.text
        );
        let answer = post(&proxy, "/v1/messages", &[], r#"{"model":"gpt"}"#).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST);
        assert!(proxy.upstream.sent().is_empty());
    }

    #[tokio::test]
    async fn provider_errors_pass_through_and_only_connect_failures_are_retried() {
        let proxy = proxy([
            Script::TooManyRequests { retry_after: "17" },
            Script::status(500),
            Script::Refuse,
            Script::status(200),
            Script::Reset,
            Script::Refuse,
            Script::Refuse,
        ]);
        let send = || post(&proxy, "/v1/completions", &[], r#"{"model":"gpt"}"#);
        let limited = send().await;
        assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(limited.headers["retry-after"], "17");
        assert!(limited.text.contains("rate_limit_error"));
        for (expected, why) in [
            (StatusCode::INTERNAL_SERVER_ERROR, "500: not retried"),
            (StatusCode::OK, "a refused connection is retried once"),
            (StatusCode::BAD_GATEWAY, "reset: sent, so never retried"),
            (
                StatusCode::BAD_GATEWAY,
                "refused twice: the one retry is spent",
            ),
        ] {
            assert_eq!(send().await.status, expected, "{why}");
        }
        assert_eq!(proxy.upstream.sent().len(), 7);
        let metrics = &proxy.observer.metrics;
        assert_eq!(
            testing::metric(
                metrics,
                r#"kthena_router_requests_total{error_type="upstream_failed",model="gpt",path="/v1/completions",status_code="502"}"#
            ),
            Some(2.0)
        );
    }

    #[tokio::test]
    async fn messages_reach_in_cluster_engines_too() {
        let mut config = testing::one_route_config("m", &[], None, 1, pb::TrafficPolicy::default());
        config.external_providers.clear();
        let store = Arc::new(SnapshotStore::new());
        store
            .apply_route_config("v1", config)
            .expect("valid snapshot");
        let proxy = Proxy::with_upstream(
            store,
            ProxyConfig::default(),
            test_observer(),
            ScriptedUpstream::new([Script::json(
                200,
                r#"{"type":"message","usage":{"input_tokens":4,"output_tokens":2}}"#,
            )]),
        );
        let answer = post(
            &proxy,
            "/v1/messages",
            &[],
            r#"{"model":"m","max_tokens":4,"messages":[]}"#,
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(
            proxy.upstream.sent()[0].uri,
            "http://127.0.0.1:8000/v1/messages"
        );
    }
}
