//! Observability end to end: after real traffic through a live dataplane, its
//! metrics (names, types, labels, buckets, values), access log lines, debug
//! endpoints and the controller's views are what the Kthena router guides
//! document; the seed guides' troubleshooting `grep`s find what they look
//! for; the shipped alert rules and dashboard only use metrics that exist.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use http::{Method, StatusCode};
use serde_json::Value;
use switchyard_e2e::harness::{
    EngineSpec, HttpResponse, Stack, ip_in, ready_pod_yaml, test_subnet, wait_for,
};

const PORT: u16 = 8000;
const OUTPUT_TOKENS: u64 = 5;
/// A credential a client sends; it must never show up in logs or dumps.
const SECRET_TOKEN: &str = "Bearer sk-observability-secret-token";

const SERVERS: &str = r#"
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelServer
metadata: {name: obs-server, namespace: default}
spec:
  workloadSelector: {matchLabels: {app: obs}}
  workloadPort: {port: 8000}
  inferenceEngine: vLLM
---
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelServer
metadata: {name: dead, namespace: default}
spec:
  workloadSelector: {matchLabels: {app: dead}}
  workloadPort: {port: 8000}
  inferenceEngine: vLLM
---
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelServer
metadata: {name: slow-server, namespace: default}
spec:
  workloadSelector: {matchLabels: {app: slow}}
  workloadPort: {port: 8000}
  inferenceEngine: vLLM
"#;

const ROUTE_SLOW: &str = r#"
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelRoute
metadata: {name: slow-route, namespace: default}
spec:
  modelName: slow-model
  rules:
  - targetModels: [{modelServerName: slow-server}]
"#;

const ROUTE_OBS: &str = r#"
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelRoute
metadata: {name: obs-route, namespace: default}
spec:
  modelName: obs-model
  rules:
  - name: default
    targetModels: [{modelServerName: obs-server}]
"#;

const ROUTE_DEAD: &str = r#"
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelRoute
metadata: {name: dead-route, namespace: default}
spec:
  modelName: dead-model
  rules:
  - targetModels: [{modelServerName: dead}]
"#;

/// The seed tables: (family, type, label names without `le`, buckets).
const REQUEST_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
type SeedMetric = (
    &'static str,
    &'static str,
    &'static [&'static str],
    &'static [f64],
);
const SEED_METRICS: &[SeedMetric] = &[
    (
        "kthena_router_requests_total",
        "counter",
        &["model", "path", "status_code", "error_type"],
        &[],
    ),
    (
        "kthena_router_request_duration_seconds",
        "histogram",
        &["model", "path", "status_code"],
        REQUEST_BUCKETS,
    ),
    (
        "kthena_router_request_prefill_duration_seconds",
        "histogram",
        &["model", "path", "status_code"],
        REQUEST_BUCKETS,
    ),
    (
        "kthena_router_request_decode_duration_seconds",
        "histogram",
        &["model", "path", "status_code"],
        REQUEST_BUCKETS,
    ),
    (
        "kthena_router_active_downstream_requests",
        "gauge",
        &["model"],
        &[],
    ),
    (
        "kthena_router_active_upstream_requests",
        "gauge",
        &["model_route", "model_server"],
        &[],
    ),
    (
        "kthena_router_tokens_total",
        "counter",
        &["model", "path", "token_type"],
        &[],
    ),
    (
        "kthena_router_scheduler_plugin_duration_seconds",
        "histogram",
        &["model", "plugin", "type"],
        &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5],
    ),
];
/// Seed families of features Switchyard does not have yet: declared (HELP and
/// TYPE) so dashboards and `grep`s find them, without series.
const DECLARED_ONLY: &[(&str, &str)] = &[
    ("kthena_router_fairness_queue_size", "gauge"),
    ("kthena_router_fairness_queue_duration_seconds", "histogram"),
    ("kthena_router_rate_limit_exceeded_total", "counter"),
];

/// The access log's JSON fields: seed 000's plus `ttft_ms` and `upstream_attempts`.
const ACCESS_LOG_FIELDS: &[&str] = &[
    "timestamp",
    "method",
    "path",
    "protocol",
    "status_code",
    "model_name",
    "model_route",
    "model_server",
    "selected_pod",
    "request_id",
    "input_tokens",
    "output_tokens",
    "duration_total_ms",
    "duration_queue_ms",
    "duration_request_processing_ms",
    "duration_upstream_ms",
    "duration_response_processing_ms",
    "ttft_ms",
    "upstream_attempts",
    "error",
];

/// One sample line of a text exposition.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug, Default)]
struct Exposition {
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    fn parse(text: &str) -> Self {
        let mut exposition = Self::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE line");
                exposition.types.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = split_labels(labels);
            exposition.samples.push(Sample {
                name: name.to_owned(),
                labels,
                value: value.parse().expect("sample value"),
            });
        }
        exposition
    }

    /// The samples named `name` whose labels include `labels`.
    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|sample| {
                sample.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| sample.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found = self.find(name, labels);
        assert_eq!(found.len(), 1, "exactly one {name} {labels:?}: {found:?}");
        found[0].value
    }

    /// Family names, histogram suffixes folded.
    fn families(&self) -> BTreeSet<String> {
        self.types.keys().cloned().collect()
    }
}

/// `a="x",b="y"` (label values here never contain `",`).
fn split_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while let Some((name, after)) = rest.split_once("=\"") {
        let end = after.find('"').expect("closing quote");
        labels.insert(
            name.trim_start_matches(',').to_owned(),
            after[..end].to_owned(),
        );
        rest = &after[end + 1..];
    }
    labels
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// Runs a shell pipeline with `input` on stdin (as `curl -s ... |` would feed it).
fn shell(pipeline: &str, input: &str) -> String {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(pipeline)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sh");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let output = child.wait_with_output().expect("pipeline output");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `promtool` from Debian's `prometheus` package; `.ci/run` installs it and
/// sets `SWITCHYARD_REQUIRE_PROMTOOL=1`, so CI never skips these checks.
fn promtool() -> Option<&'static str> {
    let found = Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if found {
        return Some("promtool");
    }
    assert!(
        std::env::var_os("SWITCHYARD_REQUIRE_PROMTOOL").is_none(),
        "promtool is required (SWITCHYARD_REQUIRE_PROMTOOL is set) but not installed: apt-get install prometheus"
    );
    eprintln!("promtool not installed: skipping the promtool checks (apt-get install prometheus)");
    None
}

fn promtool_check_metrics(what: &str, text: &str) {
    let Some(promtool) = promtool() else {
        return;
    };
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write exposition");
    let output = child.wait_with_output().expect("promtool output");
    assert!(
        output.status.success(),
        "promtool check metrics rejected the {what} exposition:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

async fn get(stack: &Stack, url: &str) -> HttpResponse {
    stack.http.get(url).await.expect("GET answers")
}

async fn post(stack: &Stack, path: &str, headers: &[(&str, &str)], body: &str) -> HttpResponse {
    stack
        .http
        .post_json(&stack.dataplanes[0].url(path), headers, body)
        .await
        .expect("dataplane answers")
}

/// Parsed access log JSON lines found by the seed's `grep -E '^{.*}$'`.
fn json_lines(log: &str) -> Vec<Value> {
    shell("grep -E '^{.*}$'", log)
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| {
                panic!("grep -E '^{{.*}}$' found a non-JSON line ({e}): {line}")
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_access_logs_and_debug_endpoints_after_real_traffic() {
    let subnet = test_subnet();
    let pods = [
        ("obs-0", 11, "obs"),
        ("obs-1", 12, "obs"),
        ("slow-0", 14, "slow"),
        ("dead-0", 13, "dead"),
    ];
    let pod_yaml: Vec<String> = pods
        .iter()
        .map(|(name, host, app)| ready_pod_yaml(name, ip_in(subnet, *host), &[("app", app)]))
        .collect();
    let mut stack = Stack::new(&[
        ("servers.yaml", SERVERS.to_owned()),
        (
            "routes.yaml",
            format!("{ROUTE_OBS}---{ROUTE_DEAD}---{ROUTE_SLOW}"),
        ),
        ("pods.yaml", pod_yaml.join("---\n")),
    ]);
    // dead-0 has no engine: connections to it are refused. slow-0 streams
    // for a minute, so a client can leave in the middle.
    let engines: Vec<EngineSpec> = pods[..3]
        .iter()
        .map(|(name, host, app)| EngineSpec {
            name: (*name).to_owned(),
            ip: ip_in(subnet, *host),
            port: PORT,
            model: format!("{app}-model"),
            extra_args: if *app == "slow" {
                vec![
                    "--output-tokens".into(),
                    "300".into(),
                    "--itl-ms".into(),
                    "200".into(),
                ]
            } else {
                vec![
                    "--output-tokens".into(),
                    OUTPUT_TOKENS.to_string(),
                    "--itl-ms".into(),
                    "5".into(),
                ]
            },
        })
        .collect();
    stack.start_engines(&engines).await;
    stack.start_controller().await;
    // Dataplane 0: defaults (JSON access log on stdout, text app logs on
    // stderr, both in one log as `kubectl logs` shows them) plus /metrics on
    // the traffic port. Dataplane 1: text access log to a file, configured
    // by the file's accessLogger block, and JSON application logs.
    let text_log = stack.dir.path().join("access-text.log");
    let config_file = stack.dir.path().join("dataplane.yaml");
    std::fs::write(
        &config_file,
        format!(
            "accessLogger:\n  enabled: true\n  format: text\n  output: {}\n",
            text_log.display()
        ),
    )
    .expect("write dataplane config");
    let first = stack.spawn_dataplane_with(&["--expose-metrics-on-router-port"]);
    let config_arg = config_file.display().to_string();
    let second = stack.spawn_dataplane_with(&["--config", &config_arg, "--log-format", "json"]);
    stack.wait_dataplane_ready(first).await;
    stack.wait_dataplane_ready(second).await;

    // --- Real traffic ------------------------------------------------------
    let completion = post(
        &stack,
        "/v1/completions",
        &[
            ("x-request-id", "obs-req-1"),
            ("authorization", SECRET_TOKEN),
        ],
        r#"{"model":"obs-model","prompt":"San Francisco is a"}"#,
    )
    .await;
    assert_eq!(completion.status, StatusCode::OK, "{}", completion.text());
    let completion_pod = completion.header("x-mock-pod").expect("pod").to_owned();
    let stream = post(
        &stack,
        "/v1/chat/completions",
        &[("x-request-id", "obs-req-stream")],
        r#"{"model":"obs-model","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(stream.status, StatusCode::OK, "{}", stream.text());
    assert!(stream.text().contains("data: [DONE]"), "{}", stream.text());
    let unknown = post(
        &stack,
        "/v1/completions",
        &[("x-request-id", "obs-req-404")],
        r#"{"model":"no-such-model","prompt":"hi"}"#,
    )
    .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let dead = post(
        &stack,
        "/v1/completions",
        &[("x-request-id", "obs-req-503")],
        r#"{"model":"dead-model","prompt":"hi"}"#,
    )
    .await;
    assert_eq!(
        dead.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        dead.text()
    );
    let bad_path = get(&stack, &stack.dataplanes[0].url("/v1/not-an-api")).await;
    assert_eq!(bad_path.status, StatusCode::NOT_FOUND);
    let second_dataplane = stack
        .http
        .post_json(
            &stack.dataplanes[1].url("/v1/completions"),
            &[("x-request-id", "obs-req-text")],
            r#"{"model":"obs-model","prompt":"hi"}"#,
        )
        .await
        .expect("second dataplane answers");
    assert_eq!(second_dataplane.status, StatusCode::OK);
    // A client that leaves in the middle of a stream.
    let abandoned = stack
        .http
        .send(
            Method::POST,
            &stack.dataplanes[0].url("/v1/chat/completions"),
            &[
                ("content-type", "application/json"),
                ("x-request-id", "obs-req-gone"),
            ],
            r#"{"model":"slow-model","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .await
        .expect("stream starts");
    assert_eq!(abandoned.status(), StatusCode::OK);
    drop(abandoned);
    let metrics_url = format!("http://{}/metrics", stack.dataplanes[0].metrics);
    // A request is counted when its response body ends, which the dataplane
    // may see just after the client has read the last byte: wait for all.
    wait_for("the traffic to be counted", || async {
        let text = get(&stack, &metrics_url).await.text();
        let exposition = Exposition::parse(&text);
        let successes = exposition.find(
            "kthena_router_requests_total",
            &[("model", "obs-model"), ("status_code", "200")],
        );
        (text.contains("error_type=\"client_disconnected\"") && successes.len() >= 2).then_some(())
    })
    .await;

    // --- Metrics: the seed tables -------------------------------------------
    let metrics_text = get(&stack, &metrics_url).await.text();
    let metrics = Exposition::parse(&metrics_text);
    for (family, kind, labels, buckets) in SEED_METRICS {
        assert_eq!(
            metrics.types.get(*family).map(String::as_str),
            Some(*kind),
            "{family} type"
        );
        let series_name = if *kind == "histogram" {
            format!("{family}_bucket")
        } else {
            (*family).to_owned()
        };
        let series = metrics.find(&series_name, &[]);
        assert!(!series.is_empty(), "{family} has series after traffic");
        for sample in &series {
            let mut names: Vec<&str> = sample
                .labels
                .keys()
                .map(String::as_str)
                .filter(|l| *l != "le")
                .collect();
            names.sort_unstable();
            let mut expected = labels.to_vec();
            expected.sort_unstable();
            assert_eq!(names, expected, "{family} label names");
        }
        if !buckets.is_empty() {
            let first_series = &series[0].labels;
            let mut les: Vec<String> = series
                .iter()
                .filter(|s| {
                    s.labels
                        .iter()
                        .all(|(k, v)| k == "le" || first_series.get(k) == Some(v))
                })
                .map(|s| s.labels["le"].clone())
                .collect();
            les.dedup();
            let mut expected: Vec<String> = buckets.iter().map(|b| format!("{b}")).collect();
            expected.push("+Inf".to_owned());
            assert_eq!(les, expected, "{family} buckets");
        }
    }
    for (family, kind) in DECLARED_ONLY {
        assert_eq!(
            metrics.types.get(*family).map(String::as_str),
            Some(*kind),
            "{family} declared"
        );
        assert!(
            metrics_text.contains(&format!("# HELP {family} ")),
            "{family} help"
        );
    }

    // --- Metrics: values of the traffic -------------------------------------
    let ok = |path: &str| {
        metrics.value(
            "kthena_router_requests_total",
            &[
                ("model", "obs-model"),
                ("path", path),
                ("status_code", "200"),
                ("error_type", "successful_request"),
            ],
        )
    };
    assert_eq!(ok("/v1/completions"), 1.0);
    assert_eq!(ok("/v1/chat/completions"), 1.0);
    assert_eq!(
        metrics.value(
            "kthena_router_requests_total",
            &[
                ("model", "unknown"),
                ("status_code", "404"),
                ("error_type", "route_not_found"),
            ],
        ),
        1.0
    );
    assert_eq!(
        metrics.value(
            "kthena_router_requests_total",
            &[
                ("model", "unknown"),
                ("path", "other"),
                ("error_type", "unknown_path"),
            ],
        ),
        1.0
    );
    assert_eq!(
        metrics.value(
            "kthena_router_requests_total",
            &[
                ("model", "dead-model"),
                ("status_code", "503"),
                ("error_type", "upstream_unavailable"),
            ],
        ),
        1.0
    );
    assert!(
        metrics.value(
            "kthena_router_upstream_connect_errors_total",
            &[("model_server", "default/dead")]
        ) >= 1.0
    );
    assert_eq!(
        metrics.value(
            "kthena_router_tokens_total",
            &[
                ("model", "obs-model"),
                ("path", "/v1/completions"),
                ("token_type", "output")
            ],
        ),
        OUTPUT_TOKENS as f64
    );
    assert!(
        metrics.value(
            "kthena_router_tokens_total",
            &[
                ("model", "obs-model"),
                ("path", "/v1/completions"),
                ("token_type", "input")
            ],
        ) > 0.0
    );
    assert_eq!(
        metrics.value(
            "kthena_router_tokens_total",
            &[
                ("model", "obs-model"),
                ("path", "/v1/chat/completions"),
                ("token_type", "output")
            ],
        ),
        OUTPUT_TOKENS as f64
    );
    // Only the stream has a prefill/decode split, TTFT and TPOT.
    for family in [
        "kthena_router_request_prefill_duration_seconds_count",
        "kthena_router_request_decode_duration_seconds_count",
    ] {
        assert_eq!(
            metrics.value(
                family,
                &[("model", "obs-model"), ("path", "/v1/chat/completions")]
            ),
            1.0,
            "{family}"
        );
        assert_eq!(
            metrics.value(
                family,
                &[("model", "obs-model"), ("path", "/v1/completions")]
            ),
            0.0,
            "{family}"
        );
    }
    for family in [
        "kthena_router_time_to_first_token_seconds_count",
        "kthena_router_time_per_output_token_seconds_count",
    ] {
        assert_eq!(
            metrics.value(family, &[("model", "obs-model")]),
            1.0,
            "{family}"
        );
    }
    assert_eq!(
        metrics.value(
            "kthena_router_requests_total",
            &[
                ("model", "slow-model"),
                ("status_code", "200"),
                ("error_type", "client_disconnected"),
            ],
        ),
        1.0
    );
    for model in ["obs-model", "slow-model"] {
        assert_eq!(
            metrics.value(
                "kthena_router_active_downstream_requests",
                &[("model", model)]
            ),
            0.0,
            "{model}"
        );
    }
    assert_eq!(
        metrics.value(
            "kthena_router_active_upstream_requests",
            &[("model_route", "default/slow-route")],
        ),
        0.0
    );
    assert_eq!(
        metrics.value(
            "kthena_router_active_upstream_requests",
            &[
                ("model_route", "default/obs-route"),
                ("model_server", "default/obs-server")
            ],
        ),
        0.0
    );
    assert_eq!(
        metrics.value("kthena_router_controller_connected", &[]),
        1.0
    );
    assert_eq!(
        metrics.find("kthena_router_snapshot_info", &[]).len(),
        1,
        "one snapshot version in use"
    );
    for pod in [
        "default/obs-0",
        "default/obs-1",
        "default/slow-0",
        "default/dead-0",
    ] {
        assert_eq!(
            metrics.value("kthena_router_pod_active_requests", &[("pod", pod)]),
            0.0
        );
    }
    // Bounded cardinality: models of the snapshot or `unknown`, fixed paths.
    let models: BTreeSet<&str> = metrics
        .samples
        .iter()
        .filter_map(|s| s.labels.get("model").map(String::as_str))
        .collect();
    assert_eq!(
        models,
        BTreeSet::from(["dead-model", "obs-model", "slow-model", "unknown"])
    );
    let paths: BTreeSet<&str> = metrics
        .samples
        .iter()
        .filter_map(|s| s.labels.get("path").map(String::as_str))
        .collect();
    assert!(
        paths.is_subset(&BTreeSet::from([
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/responses",
            "/v1/models",
            "other",
        ])),
        "{paths:?}"
    );
    assert!(
        !metrics_text.contains("obs-req-"),
        "no request ids in metrics"
    );
    promtool_check_metrics("dataplane", &metrics_text);

    // The same families on the traffic port with --expose-metrics-on-router-port.
    let router_port_metrics = get(&stack, &stack.dataplanes[0].url("/metrics")).await;
    assert_eq!(router_port_metrics.status, StatusCode::OK);
    assert!(
        router_port_metrics
            .text()
            .contains("# TYPE kthena_router_requests_total counter")
    );
    let without_flag = get(&stack, &stack.dataplanes[1].url("/metrics")).await;
    assert_eq!(without_flag.status, StatusCode::NOT_FOUND);

    // --- The seed guides' troubleshooting greps --------------------------------
    let grep_finds = |pipeline: &str, expected: &str| {
        let found = shell(pipeline, &metrics_text);
        assert!(
            found.contains(expected),
            "`curl -s .../metrics | {pipeline}` should find {expected:?}, found:\n{found}"
        );
    };
    grep_finds(
        "grep kthena_router_requests_total | sort",
        "kthena_router_requests_total{",
    );
    // Seed 000 greps `status_code=5`, which no Prometheus exposition can
    // match (label values are quoted): the README gives the corrected form.
    assert!(shell("grep 'status_code=5'", &metrics_text).is_empty());
    grep_finds(
        "grep 'status_code=\"5' | sort -nr",
        "error_type=\"upstream_unavailable\"",
    );
    grep_finds(
        "grep 'status_code=\"5' | grep -o 'model=\"[^\"]*\"' | sort | uniq -c | sort -nr",
        "model=\"dead-model\"",
    );
    grep_finds(
        "grep -E 'kthena_router_request_duration_seconds_(bucket|sum|count)'",
        "kthena_router_request_duration_seconds_bucket{",
    );
    grep_finds(
        "grep -E \"(active_downstream|fairness_queue_size)\"",
        "kthena_router_active_downstream_requests{model=\"obs-model\"} 0",
    );
    grep_finds(
        "grep fairness_queue_size",
        "# TYPE kthena_router_fairness_queue_size gauge",
    );
    grep_finds(
        "grep fairness_queue_duration_seconds",
        "# TYPE kthena_router_fairness_queue_duration_seconds histogram",
    );
    grep_finds("grep kthena_router_tokens_total", "token_type=\"output\"");
    grep_finds(
        "grep kthena_router_rate_limit_exceeded_total",
        "# TYPE kthena_router_rate_limit_exceeded_total counter",
    );
    grep_finds(
        "grep kthena_router_fairness_queue",
        "kthena_router_fairness_queue_size",
    );

    // --- Access log (JSON, stdout, mixed with app logs as `kubectl logs` shows) ---
    let log_process = &stack.dataplanes[0].process;
    let lines = wait_for("the access log lines of dataplane 0", || async {
        let lines = json_lines(&log_process.log_text());
        let ids: BTreeSet<String> = lines
            .iter()
            .filter_map(|l| l["request_id"].as_str().map(str::to_owned))
            .collect();
        [
            "obs-req-1",
            "obs-req-stream",
            "obs-req-404",
            "obs-req-503",
            "obs-req-gone",
        ]
        .iter()
        .all(|id| ids.contains(*id))
        .then_some(lines)
    })
    .await;
    // Application logs are on the same stream but never match `^{.*}$`.
    assert!(
        log_process.log_text().lines().count() > lines.len(),
        "application logs are in the same log"
    );
    for line in &lines {
        let object = line.as_object().expect("access log line is an object");
        let keys: BTreeSet<&str> = object.keys().map(String::as_str).collect();
        let expected: BTreeSet<&str> = ACCESS_LOG_FIELDS.iter().copied().collect();
        assert_eq!(keys, expected, "every field, nothing else: {line}");
    }
    let by_id = |id: &str| -> &Value {
        lines
            .iter()
            .find(|l| l["request_id"] == id)
            .unwrap_or_else(|| panic!("access log line of {id}"))
    };
    let line = by_id("obs-req-1");
    assert_eq!(line["method"], "POST");
    assert_eq!(line["path"], "/v1/completions");
    assert_eq!(line["protocol"], "HTTP/1.1");
    assert_eq!(line["status_code"], 200);
    assert_eq!(line["model_name"], "obs-model");
    assert_eq!(line["model_route"], "default/obs-route");
    assert_eq!(line["model_server"], "default/obs-server");
    assert_eq!(line["selected_pod"], completion_pod.as_str());
    assert_eq!(line["output_tokens"], OUTPUT_TOKENS);
    assert!(line["input_tokens"].as_u64().expect("input tokens") > 0);
    assert_eq!(line["upstream_attempts"], 1);
    assert_eq!(line["duration_queue_ms"], 0);
    assert_eq!(line["ttft_ms"], Value::Null, "not a stream");
    assert_eq!(line["error"], Value::Null);
    let timestamp = line["timestamp"].as_str().expect("timestamp");
    assert!(
        timestamp.len() == 24 && timestamp.ends_with('Z') && timestamp.as_bytes()[10] == b'T',
        "RFC 3339 UTC with milliseconds: {timestamp}"
    );
    let total = line["duration_total_ms"].as_u64().expect("total");
    let parts: u64 = [
        "duration_queue_ms",
        "duration_request_processing_ms",
        "duration_upstream_ms",
        "duration_response_processing_ms",
    ]
    .iter()
    .map(|field| line[*field].as_u64().expect("duration"))
    .sum();
    assert!(parts <= total + 3, "parts {parts} add up to total {total}");
    let stream_line = by_id("obs-req-stream");
    assert!(stream_line["ttft_ms"].is_u64(), "{stream_line}");
    assert_eq!(stream_line["output_tokens"], OUTPUT_TOKENS);
    assert_eq!(stream_line["path"], "/v1/chat/completions");
    let not_found = by_id("obs-req-404");
    assert_eq!(not_found["status_code"], 404);
    assert_eq!(not_found["model_name"], "no-such-model");
    assert_eq!(not_found["model_route"], Value::Null);
    assert_eq!(not_found["error"]["type"], "route_not_found");
    assert!(
        not_found["error"]["message"]
            .as_str()
            .expect("message")
            .contains("route not found")
    );
    let gone = by_id("obs-req-gone");
    assert_eq!(gone["status_code"], 200);
    assert_eq!(gone["error"]["type"], "client_disconnected");
    assert_eq!(gone["selected_pod"], "slow-0");
    let failed = by_id("obs-req-503");
    assert_eq!(failed["error"]["type"], "upstream_unavailable");
    assert_eq!(failed["selected_pod"], "dead-0");
    assert!(failed["upstream_attempts"].as_u64().expect("attempts") >= 1);
    // The seed's `jq 'select(.status_code >= 500) | {...}'`.
    let server_errors: Vec<&Value> = lines
        .iter()
        .filter(|l| l["status_code"].as_u64().is_some_and(|s| s >= 500))
        .collect();
    assert_eq!(server_errors.len(), 1);
    assert_eq!(server_errors[0]["model_name"], "dead-model");
    // The seed's `grep -E "model_name|request_id|duration_total"` finds lines.
    assert!(
        shell(
            "grep -E \"model_name|request_id|duration_total\"",
            &log_process.log_text()
        )
        .contains("\"request_id\":\"obs-req-1\"")
    );
    assert!(
        !log_process.log_text().contains(SECRET_TOKEN),
        "no credentials in logs"
    );

    // --- Access log (text, file from the config file) -----------------------
    let text = wait_for("the text access log line", || async {
        std::fs::read_to_string(&text_log)
            .ok()
            .filter(|text| text.contains("obs-req-text"))
    })
    .await;
    let text_line = text
        .lines()
        .find(|l| l.contains("obs-req-text"))
        .expect("text line");
    assert!(
        text_line.starts_with('[')
            && text_line.contains(
                "] \"POST /v1/completions HTTP/1.1\" 200 model_name=obs-model model_route=default/obs-route model_server=default/obs-server selected_pod=obs-"
            )
            && text_line.contains(" request_id=obs-req-text tokens=")
            && text_line.contains(&format!("/{OUTPUT_TOKENS} timings=")),
        "{text_line}"
    );
    let second_log = stack.dataplanes[1].process.log_text();
    assert!(
        !second_log.contains("obs-req-text"),
        "the file gets the line, stdout does not"
    );
    // With --log-format json, application logs are JSON too: `jq` can read
    // the whole stream.
    assert!(second_log.lines().count() > 0);
    for line in second_log.lines() {
        assert!(
            serde_json::from_str::<Value>(line).is_ok_and(|v| v.is_object()),
            "not a JSON log line: {line}"
        );
    }

    // --- Debug endpoints -------------------------------------------------------
    let debug = |path: &str| format!("http://{}{path}", stack.dataplanes[0].debug);
    let routes = get(&stack, &debug("/debug/config_dump/modelroutes")).await;
    assert_eq!(routes.status, StatusCode::OK);
    let routes = routes.json();
    let obs_route = routes["modelroutes"]
        .as_array()
        .expect("modelroutes list")
        .iter()
        .find(|r| r["name"] == "obs-route")
        .expect("obs-route");
    assert_eq!(obs_route["namespace"], "default");
    assert_eq!(obs_route["spec"]["modelName"], "obs-model");
    assert_eq!(
        obs_route["spec"]["rules"][0]["targetModels"][0]["modelServer"],
        serde_json::json!({"name": "obs-server", "namespace": "default"})
    );
    let servers = get(&stack, &debug("/debug/config_dump/modelservers"))
        .await
        .json();
    let names: BTreeSet<&str> = servers["modelservers"]
        .as_array()
        .expect("modelservers list")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, BTreeSet::from(["dead", "obs-server", "slow-server"]));
    // Engine loads arrive with the controller's next scrape.
    let pods_dump = wait_for("pod metrics in the pods dump", || async {
        let dump = get(&stack, &debug("/debug/config_dump/pods")).await.json();
        let obs_pods_have_metrics = dump["pods"].as_array().is_some_and(|pods| {
            pods.iter()
                .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("obs-")))
                .all(|p| p["metrics"].is_object())
        });
        obs_pods_have_metrics.then_some(dump)
    })
    .await;
    let obs_pod = pods_dump["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .find(|p| p["name"] == "obs-0")
        .expect("obs-0");
    for field in [
        "gpuCacheUsage",
        "requestWaitingNum",
        "requestRunningNum",
        "tpot",
        "ttft",
    ] {
        assert!(obs_pod["metrics"][field].is_number(), "{field}: {obs_pod}");
    }
    assert_eq!(obs_pod["podInfo"]["podIP"], ip_in(subnet, 11).to_string());
    assert_eq!(obs_pod["engine"], "vLLM");
    assert_eq!(
        obs_pod["modelServers"],
        serde_json::json!(["default/obs-server"])
    );
    assert!(
        obs_pod["models"]
            .as_array()
            .expect("models")
            .contains(&Value::from("obs-model"))
    );
    let single_route = get(
        &stack,
        &debug("/debug/config_dump/namespaces/default/modelroutes/obs-route"),
    )
    .await;
    assert_eq!(single_route.status, StatusCode::OK);
    assert_eq!(&single_route.json(), obs_route);
    let single_server = get(
        &stack,
        &debug("/debug/config_dump/namespaces/default/modelservers/obs-server"),
    )
    .await
    .json();
    assert_eq!(single_server["spec"]["inferenceEngine"], "vLLM");
    assert_eq!(single_server["spec"]["workloadPort"]["port"], PORT);
    let single_pod = get(
        &stack,
        &debug("/debug/config_dump/namespaces/default/pods/obs-1"),
    )
    .await
    .json();
    assert_eq!(single_pod["name"], "obs-1");
    for missing in [
        "/debug/config_dump/namespaces/default/modelroutes/nope",
        "/debug/config_dump/namespaces/other/modelservers/obs-server",
        "/debug/config_dump/namespaces/default/pods/nope",
        "/debug/config_dump/namespaces/default/secrets/x",
        "/debug/config_dump/whatever",
    ] {
        let response = get(&stack, &debug(missing)).await;
        assert_eq!(response.status, StatusCode::NOT_FOUND, "{missing}");
        assert_eq!(response.json()["error"]["code"], "not_found", "{missing}");
    }
    let post_debug = stack
        .http
        .call(
            Method::POST,
            &debug("/debug/config_dump/modelroutes"),
            &[],
            "",
        )
        .await
        .expect("debug port answers");
    assert_eq!(post_debug.status, StatusCode::METHOD_NOT_ALLOWED);
    let table = get(&stack, &debug("/debug/routing/table")).await.json();
    assert!(table["version"].is_string());
    assert!(
        table["routes"]
            .as_array()
            .expect("routes")
            .iter()
            .any(|r| r["route"] == "default/obs-route" && r["modelName"] == "obs-model")
    );
    let state = get(&stack, &debug("/debug/router/state")).await.json();
    assert_eq!(state["controller"]["connected"], true);
    assert_eq!(state["snapshot"]["routeConfigVersion"], table["version"]);
    assert!(state["snapshot"]["ageSeconds"].is_number());
    let state_pods = state["pods"].as_array().expect("pods");
    assert_eq!(state_pods.len(), 4);
    assert!(state_pods.iter().all(|p| p["inFlight"] == 0));
    for dump in [
        "/debug/config_dump/modelroutes",
        "/debug/config_dump/pods",
        "/debug/router/state",
        "/debug/routing/table",
    ] {
        assert!(
            !get(&stack, &debug(dump))
                .await
                .text()
                .contains("sk-observability"),
            "nothing secret in {dump}"
        );
    }

    // --- Controller: same dumps, sync state, metrics --------------------------
    let controller = |path: &str| format!("http://{}{path}", stack.controller_admin);
    assert_eq!(
        get(&stack, &controller("/debug/config_dump/modelroutes"))
            .await
            .json(),
        routes,
        "controller and dataplane dump the same routes"
    );
    assert_eq!(
        get(&stack, &controller("/debug/config_dump/modelservers"))
            .await
            .json(),
        servers
    );
    let controller_pod = get(
        &stack,
        &controller("/debug/config_dump/namespaces/default/pods/obs-0"),
    )
    .await
    .json();
    assert_eq!(controller_pod["podInfo"], obs_pod["podInfo"]);
    assert_eq!(
        get(
            &stack,
            &controller("/debug/config_dump/namespaces/default/modelroutes/nope")
        )
        .await
        .status,
        StatusCode::NOT_FOUND
    );
    let dataplanes = get(&stack, &controller("/debug/dataplanes")).await.json();
    let dataplanes = dataplanes["dataplanes"].as_array().expect("dataplanes");
    assert_eq!(dataplanes.len(), 2);
    for dataplane in dataplanes {
        assert_eq!(
            dataplane["route_config"]["acked_version"], table["version"],
            "{dataplane}"
        );
        assert_eq!(dataplane["route_config"]["nacked_version"], Value::Null);
    }
    let controller_text = wait_for("the controller's push latency", || async {
        let text = get(&stack, &controller("/metrics")).await.text();
        text.contains("switchyard_controller_push_latency_seconds_count{type=\"route_config\"}")
            .then_some(text)
    })
    .await;
    let controller_metrics = Exposition::parse(&controller_text);
    assert_eq!(
        controller_metrics.value("switchyard_controller_connected_dataplanes", &[]),
        2.0
    );
    assert_eq!(
        controller_metrics.value("switchyard_controller_leader", &[]),
        1.0
    );
    assert!(
        controller_metrics.value(
            "switchyard_controller_push_latency_seconds_count",
            &[("type", "route_config")]
        ) >= 1.0
    );
    assert!(
        controller_metrics.value(
            "switchyard_controller_snapshot_acks_total",
            &[("type", "route_config")]
        ) >= 2.0
    );
    promtool_check_metrics("controller", &controller_text);

    // --- Dashboard and alert rules only use metrics that exist ---------------
    let mut existing = metrics.families();
    existing.extend(controller_metrics.families());
    // Families without series yet (declared, or vectors without samples).
    for line in metrics_text.lines().chain(controller_text.lines()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            existing.insert(rest.split(' ').next().unwrap_or_default().to_owned());
        }
    }
    // Controller vectors registered in code that have no series until their
    // first event (a status write, a NACK, a failed scrape).
    existing.extend(
        [
            "switchyard_controller_status_writes_total",
            "switchyard_controller_snapshot_nacks_total",
            "switchyard_controller_scrape_errors_total",
        ]
        .map(str::to_owned),
    );
    check_dashboard(&existing);
    check_rules(&existing);

    // --- Series of a route and server that leave the snapshot are removed ----
    stack.write_config("routes.yaml", ROUTE_OBS);
    stack.write_config(
        "servers.yaml",
        &SERVERS[..SERVERS.find("---").expect("two servers")],
    );
    wait_for("the dead route's series to disappear", || async {
        let text = get(&stack, &metrics_url).await.text();
        (!text.contains("dead-model") && !text.contains("default/dead")).then_some(())
    })
    .await;
    let after = Exposition::parse(&get(&stack, &metrics_url).await.text());
    assert_eq!(ok_after(&after), 1.0, "series of remaining models stay");
}

fn ok_after(metrics: &Exposition) -> f64 {
    metrics.value(
        "kthena_router_requests_total",
        &[
            ("model", "obs-model"),
            ("path", "/v1/completions"),
            ("status_code", "200"),
        ],
    )
}

/// Metric names an expression uses (`_bucket` & co. folded to the family).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &expr[i..];
        let starts = rest.starts_with("kthena_") || rest.starts_with("switchyard_");
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts && boundary {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let name = &rest[..len];
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            names.insert(family.to_owned());
            i += len;
        } else {
            i += 1;
        }
    }
    names
}

fn check_dashboard(existing: &BTreeSet<String>) {
    let path = workspace_root().join("manifests/observability/dashboards/switchyard-router.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read dashboard"))
            .expect("dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    // The seed's panels.
    for wanted in [
        "Request rate by model",
        "Error rate by type",
        "Request latency percentiles",
        "Time to first token",
        "Time per output token",
        "Token processing rate",
        "Fairness queue",
        "Rate limit violations",
        "Scheduler plugin time",
        "Per-pod load",
    ] {
        assert!(
            titles.iter().any(|t| t.starts_with(wanted)),
            "dashboard has a {wanted:?} panel: {titles:?}"
        );
    }
    let mut used = BTreeSet::new();
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{expr} names a metric");
            for name in &names {
                assert!(
                    existing.contains(name),
                    "dashboard panel {:?} uses {name}, which no binary exposes",
                    panel["title"]
                );
            }
            used.extend(names);
        }
    }
    assert!(used.contains("kthena_router_requests_total"));
}

fn check_rules(existing: &BTreeSet<String>) {
    let dir = workspace_root().join("manifests/observability");
    let rules_path = dir.join("alerts/switchyard-rules.yaml");
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&rules_path).expect("read rules"))
            .expect("rules YAML");
    let custom_resource: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(dir.join("prometheusrule.yaml")).expect("read PrometheusRule"),
    )
    .expect("PrometheusRule YAML");
    assert_eq!(
        custom_resource["spec"]["groups"], rules["groups"],
        "prometheusrule.yaml carries alerts/switchyard-rules.yaml"
    );
    let mut alerts = BTreeSet::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let expr = rule["expr"].as_str().expect("expr");
            for name in metric_names(expr) {
                assert!(
                    existing.contains(&name),
                    "alert rule uses {name}, which no binary exposes"
                );
            }
            alerts.insert(rule["alert"].as_str().expect("alert").to_owned());
        }
    }
    for seed_alert in [
        "HighRouterErrorRate",
        "HighRequestLatency",
        "HighTokenProcessingRate",
        "RateLimitExceeded",
    ] {
        assert!(alerts.contains(seed_alert), "{seed_alert}");
    }
    if let Some(promtool) = promtool() {
        let output = Command::new(promtool)
            .args(["check", "rules"])
            .arg(&rules_path)
            .output()
            .expect("run promtool");
        assert!(
            output.status.success(),
            "promtool check rules:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        // The rules' unit tests: the alerts fire (and stay quiet) as meant.
        let output = Command::new(promtool)
            .args(["test", "rules", "switchyard-rules.test.yaml"])
            .current_dir(dir.join("alerts"))
            .output()
            .expect("run promtool");
        assert!(
            output.status.success(),
            "promtool test rules:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
