//! External model providers end to end: the controller (local mode) reads
//! ExternalModelProviders and their credential Secrets, ships them over a
//! snapshot stream secured with TLS (mutual TLS and a token), and a
//! dataplane sends requests to fake OpenAI and Anthropic providers over real
//! HTTPS, trusting a CA made for the test.

use http_body_util::BodyExt;
use switchyard_e2e::fake_provider::{
    FAKE_CACHE_READ_TOKENS, FAKE_INPUT_TOKENS, FAKE_OUTPUT_TOKENS, FakeApi, FakeProvider, TestCa,
};
use switchyard_e2e::harness::{Stack, sample_value, wait_for};

const OPENAI_KEY: &str = "sk-openai-e2e-3f9a";
const ANTHROPIC_KEY: &str = "sk-ant-e2e-77c1";
const STREAM_TOKEN: &str = "stream-token-e2e-51d0";

/// Secrets, providers (two good, three broken) and the routes to them.
fn objects(openai: &FakeProvider, anthropic: &FakeProvider) -> String {
    format!(
        r#"
apiVersion: v1
kind: Secret
metadata:
  name: openai-credentials
  labels: {{ networking.serving.volcano.sh/external-model-provider-credential: "true" }}
stringData: {{ api-key: "{OPENAI_KEY}\n" }}
---
apiVersion: v1
kind: Secret
metadata:
  name: anthropic-credentials
  labels: {{ networking.serving.volcano.sh/external-model-provider-credential: "true" }}
stringData: {{ key: {ANTHROPIC_KEY} }}
---
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ExternalModelProvider
metadata: {{ name: openai }}
spec:
  baseURL: {openai}/v1
  model: gpt-4o-mini
  headers: {{ OpenAI-Organization: org-e2e }}
  auth: {{ secretRef: {{ name: openai-credentials, key: api-key }} }}
---
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ExternalModelProvider
metadata: {{ name: anthropic }}
spec:
  providerType: Anthropic
  baseURL: {anthropic}
  auth: {{ secretRef: {{ name: anthropic-credentials, key: key }} }}
---
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ExternalModelProvider
metadata: {{ name: no-secret }}
spec:
  baseURL: {openai}
  auth: {{ secretRef: {{ name: absent, key: api-key }} }}
---
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ExternalModelProvider
metadata: {{ name: no-key }}
spec:
  baseURL: {openai}
  auth: {{ secretRef: {{ name: openai-credentials, key: other }} }}
---
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ExternalModelProvider
metadata: {{ name: plain-http }}
spec:
  baseURL: http://127.0.0.1:1
---
{gpt}---
{claude}"#,
        openai = openai.base_url(),
        anthropic = anthropic.base_url(),
        gpt = provider_route("gpt", "openai"),
        claude = provider_route("claude", "anthropic"),
    )
}

/// A ModelRoute for `model` to the provider `provider`.
fn provider_route(model: &str, provider: &str) -> String {
    format!(
        "apiVersion: networking.serving.volcano.sh/v1alpha1\nkind: ModelRoute\nmetadata: {{ name: {model} }}\nspec:\n  modelName: {model}\n  rules:\n  - targetModels: [{{ externalModelProviderName: {provider} }}]\n"
    )
}

struct Providers {
    ca: TestCa,
    openai: FakeProvider,
    anthropic: FakeProvider,
}

async fn providers(dir: &std::path::Path) -> Providers {
    let ca = TestCa::new(dir);
    let certificate = ca.issue("provider", &["127.0.0.1", "localhost"]);
    let openai = FakeProvider::start(FakeApi::OpenAi, &certificate).await;
    let anthropic = FakeProvider::start(FakeApi::Anthropic, &certificate).await;
    Providers {
        ca,
        openai,
        anthropic,
    }
}

fn path_str(path: &std::path::Path) -> String {
    path.display().to_string()
}

/// Starts the controller serving its snapshot stream over TLS, with a
/// certificate of `ca`, to dataplanes presenting the token in `token`;
/// `extra` flags added.
async fn start_controller_over_tls(
    stack: &mut Stack,
    ca: &TestCa,
    token: &std::path::Path,
    extra: &[&str],
) {
    let server = ca.issue("controller", &["127.0.0.1"]);
    let (cert, key, token) = (
        path_str(&server.cert),
        path_str(&server.key),
        path_str(token),
    );
    let mut args = vec![
        "--stream-tls-cert",
        &cert,
        "--stream-tls-key",
        &key,
        "--stream-token-file",
        &token,
    ];
    args.extend_from_slice(extra);
    stack.xds_scheme = "https";
    stack.start_controller_with(&args).await;
}

/// The controller's view of one provider: (Ready reason, CredentialsResolved reason).
async fn provider_reasons(stack: &Stack, name: &str) -> (String, String) {
    let objects = stack.controller_debug_get("/debug/objects").await.json();
    let report = objects["providers"]
        .as_array()
        .expect("provider reports")
        .iter()
        .find(|report| report["name"] == name)
        .unwrap_or_else(|| panic!("no report of {name}: {objects}"))
        .clone();
    (
        report["ready"]["reason"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        report["credentials"]["reason"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_https_providers_with_their_credentials_and_nothing_leaks() {
    let mut stack = Stack::new(&[]);
    let providers = providers(stack.dir.path()).await;
    stack.write_config(
        "providers.yaml",
        &objects(&providers.openai, &providers.anthropic),
    );
    let ca = &providers.ca;
    let client = ca.issue("dataplane", &["dataplane-0"]);
    let token = stack.dir.path().join("stream-token");
    std::fs::write(&token, format!("{STREAM_TOKEN}\n")).expect("token file");
    start_controller_over_tls(
        &mut stack,
        ca,
        &token,
        &["--stream-client-ca", &path_str(&ca.ca_file())],
    )
    .await;
    stack.spawn_dataplane_with(&[
        "--controller-ca",
        &path_str(&ca.ca_file()),
        "--controller-cert",
        &path_str(&client.cert),
        "--controller-key",
        &path_str(&client.key),
        "--controller-token-file",
        &path_str(&token),
        "--provider-ca-bundle",
        &path_str(&ca.ca_file()),
    ]);
    stack.wait_dataplane_ready(0).await;
    let _logs = stack.logs_on_failure();

    // Conditions, as /debug/objects shows them: (Ready, CredentialsResolved) reasons.
    for (provider, ready, credentials) in [
        ("openai", "Ready", "CredentialResolved"),
        ("no-secret", "CredentialNotFound", "CredentialNotFound"),
        ("no-key", "CredentialKeyNotFound", "CredentialKeyNotFound"),
        (
            "plain-http",
            "ConfigurationInvalid",
            "CredentialNotRequired",
        ),
    ] {
        assert_eq!(
            provider_reasons(&stack, provider).await,
            (ready.into(), credentials.into()),
            "{provider}"
        );
    }

    // OpenAI, not streamed: the provider's credential, never the client's.
    let client_headers = [
        ("authorization", "Bearer client-own-secret"),
        ("cookie", "session=client"),
        ("x-request-id", "req-e2e-1"),
    ];
    let answer = stack
        .post(
            "/v1/chat/completions",
            &client_headers,
            r#"{"model":"gpt","messages":[{"role":"user","content":"hello"}]}"#,
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(
        answer.json()["usage"]["completion_tokens"],
        FAKE_OUTPUT_TOKENS
    );
    let received = providers.openai.received();
    let first = &received[0];
    assert_eq!(first.target, "/v1/chat/completions");
    assert_eq!(
        first.headers["authorization"],
        format!("Bearer {OPENAI_KEY}").as_str()
    );
    assert_eq!(first.headers["openai-organization"], "org-e2e");
    assert_eq!(first.headers["x-request-id"], "req-e2e-1");
    assert!(!first.headers.contains_key("cookie"));
    assert!(
        first.body.contains(r#""model":"gpt-4o-mini""#),
        "{}",
        first.body
    );
    assert_eq!(first.version, http::Version::HTTP_2, "HTTP/2 when offered");

    // OpenAI, streamed: include_usage asked for, its chunk hidden from the client.
    let response = stack
        .post_streaming(
            "/v1/chat/completions",
            &[],
            r#"{"model":"gpt","stream":true,"messages":[{"role":"user","content":"hello"}]}"#,
        )
        .await;
    assert_eq!(response.status(), 200);
    let text = String::from_utf8_lossy(
        &response
            .into_body()
            .collect()
            .await
            .expect("stream")
            .to_bytes(),
    )
    .into_owned();
    assert!(text.contains("[DONE]") && !text.contains("usage"), "{text}");
    let streamed = &providers.openai.received()[1];
    assert!(
        streamed.body.contains(r#""include_usage":true"#),
        "{}",
        streamed.body
    );

    // The Responses API, streamed: usage from response.completed.
    let responses = stack
        .post(
            "/v1/responses",
            &[],
            r#"{"model":"gpt","stream":true,"input":"hello"}"#,
        )
        .await;
    assert_eq!(responses.status, 200);
    assert!(
        !providers.openai.received()[2]
            .body
            .contains("stream_options")
    );

    // Anthropic, both ways: x-api-key, and its version header.
    for stream in [false, true] {
        let body = format!(
            r#"{{"model":"claude","max_tokens":16,"stream":{stream},"messages":[{{"role":"user","content":"hello"}}]}}"#
        );
        let answer = stack
            .post(
                "/v1/messages",
                &[
                    ("anthropic-version", "2023-06-01"),
                    ("x-api-key", "client-own-secret"),
                ],
                &body,
            )
            .await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let received = providers.anthropic.received();
    assert_eq!(received.len(), 2);
    for request in &received {
        assert_eq!(request.target, "/v1/messages");
        assert_eq!(request.headers["x-api-key"], ANTHROPIC_KEY);
        assert_eq!(request.headers["anthropic-version"], "2023-06-01");
        assert!(!request.headers.contains_key("authorization"));
    }

    // The providers' own errors reach the client as they are.
    for (marker, status) in [("fail-400", 400), ("fail-429", 429), ("fail-500", 500)] {
        let body =
            format!(r#"{{"model":"gpt","messages":[{{"role":"user","content":"{marker}"}}]}}"#);
        let answer = stack.post("/v1/chat/completions", &[], &body).await;
        assert_eq!(answer.status, status, "{marker}");
        assert!(answer.text().contains(marker), "{}", answer.text());
        if status == 429 {
            assert_eq!(answer.header("retry-after"), Some("7"));
        }
    }
    // A path the provider's type does not serve.
    let wrong = stack
        .post("/v1/chat/completions", &[], r#"{"model":"claude"}"#)
        .await;
    wrong.assert_says(
        400,
        "provider type Anthropic does not support path /v1/chat/completions",
    );

    // Usage of every format was counted; traffic is labelled by provider.
    let metrics_url = format!("http://{}/metrics", stack.dataplanes[0].metrics);
    let metrics = stack.http.get(&metrics_url).await.expect("metrics").text();
    let tokens = |model: &str, path: &str, kind: &str| {
        sample_value(
            &metrics,
            "kthena_router_tokens_total",
            &[
                &format!(r#"model="{model}""#),
                &format!(r#"path="{path}""#),
                &format!(r#"token_type="{kind}""#),
            ],
        )
    };
    let (input, output) = (FAKE_INPUT_TOKENS as f64, FAKE_OUTPUT_TOKENS as f64);
    assert_eq!(tokens("gpt", "/v1/chat/completions", "input"), 2.0 * input);
    assert_eq!(tokens("gpt", "/v1/responses", "output"), output);
    assert_eq!(
        tokens("claude", "/v1/messages", "input"),
        2.0 * (input + FAKE_CACHE_READ_TOKENS as f64),
        "cache tokens are input"
    );
    assert_eq!(tokens("claude", "/v1/messages", "output"), 2.0 * output);
    assert!(
        metrics.contains(r#"model_server="default/openai""#),
        "provider traffic is labelled by provider"
    );
    let log = stack.dataplanes[0].process.log_text();
    assert!(
        log.contains(r#""backend_type":"external_provider""#),
        "{log}"
    );

    // No credential in any dump, metric or log.
    let controller = stack.controller_debug;
    let admin = stack.controller_admin;
    let debug = stack.dataplanes[0].debug;
    let mut exposed = vec![metrics, log];
    for url in [
        format!("http://{controller}/debug/snapshot"),
        format!("http://{controller}/debug/objects"),
        format!("http://{controller}/debug/config_dump/externalmodelproviders"),
        format!("http://{admin}/metrics"),
        format!("http://{debug}/debug/routing/table"),
        format!("http://{debug}/debug/router/state"),
        format!("http://{debug}/debug/config_dump/externalmodelproviders"),
        format!("http://{debug}/debug/config_dump/modelroutes"),
    ] {
        let answer = stack.http.get(&url).await.expect("debug endpoint");
        assert_eq!(answer.status, 200, "{url}");
        exposed.push(answer.text());
    }
    let dump = stack
        .http
        .get(&format!(
            "http://{debug}/debug/config_dump/externalmodelproviders"
        ))
        .await
        .expect("dump")
        .json();
    assert_eq!(
        dump["externalmodelproviders"][0]["auth"]["credential"],
        "<redacted>"
    );
    exposed.push(stack.controller.as_ref().expect("controller").log_text());
    for text in exposed {
        for secret in [OPENAI_KEY, ANTHROPIC_KEY, STREAM_TOKEN] {
            assert!(!text.contains(secret), "{secret} leaked:\n{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tls_on_the_stream_no_credential_is_shipped() {
    let mut stack = Stack::new(&[]);
    let providers = providers(stack.dir.path()).await;
    stack.write_config(
        "providers.yaml",
        &objects(&providers.openai, &providers.anthropic),
    );
    stack.start_controller().await;
    stack.start_dataplane().await;
    let _logs = stack.logs_on_failure();
    assert_eq!(
        provider_reasons(&stack, "openai").await,
        ("InsecureSnapshotStream".into(), "CredentialResolved".into())
    );
    let snapshot = stack.controller_debug_get("/debug/snapshot").await.json();
    assert_eq!(
        snapshot["route_config"]["external_providers"],
        serde_json::json!([]),
        "no provider with a credential is in the snapshot"
    );
    let answer = stack
        .post("/v1/chat/completions", &[], r#"{"model":"gpt"}"#)
        .await;
    assert_eq!(answer.status, 404, "the route has no usable target");
    assert!(providers.openai.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataplane_without_the_stream_token_gets_no_snapshot() {
    let mut stack = Stack::new(&[]);
    let ca = TestCa::new(stack.dir.path());
    let token = stack.dir.path().join("stream-token");
    std::fs::write(&token, STREAM_TOKEN).expect("token file");
    let wrong = stack.dir.path().join("wrong-token");
    std::fs::write(&wrong, "not-the-token").expect("token file");
    // No ModelRoute here: publish the (empty) snapshot at once.
    start_controller_over_tls(
        &mut stack,
        &ca,
        &token,
        &["--empty-source-grace-period", "0s"],
    )
    .await;
    stack.spawn_dataplane_with(&[
        "--controller-ca",
        &path_str(&ca.ca_file()),
        "--controller-token-file",
        &path_str(&wrong),
    ]);
    let state_url = format!("http://{}/debug/router/state", stack.dataplanes[0].debug);
    let http = stack.http.clone();
    let error = wait_for("the refusal", || async {
        let state = http.get(&state_url).await.ok()?.json();
        state["controller"]["lastError"]
            .as_str()
            .filter(|error| error.contains("stream token"))
            .map(str::to_owned)
    })
    .await;
    assert!(error.contains("stream token"), "{error}");
    let readyz = stack
        .http
        .get(&stack.dataplanes[0].url("/readyz"))
        .await
        .expect("readyz");
    assert_eq!(readyz.status, 503);
    // The right token is let in.
    stack.spawn_dataplane_with(&[
        "--controller-ca",
        &path_str(&ca.ca_file()),
        "--controller-token-file",
        &path_str(&token),
    ]);
    stack.wait_dataplane_ready(1).await;
}
