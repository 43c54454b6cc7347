//! Observability end to end: after real traffic through live dataplanes, their
//! metrics (names, types, labels, buckets, values), access log lines, debug
//! endpoints and the controller's views are what Kthena's router observability
//! guides document (`testdata/kthena/router-observability-guide.txt`, "the
//! guide", and the older `router-observability-guide-older.md` beside it); the
//! guides' troubleshooting `grep`s find what they look for; the shipped alert
//! rules and dashboard only use metrics that exist.
//!
//! One stack and its traffic serve every test here but the last ([`observed`]);
//! each test checks one topic, so a failure hides nothing else. The stack lives
//! as long as the test binary: the harness's reaper kills its processes and
//! removes its directory when the binary ends.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use http::{Method, StatusCode};
use serde_json::{Value, json};
use switchyard_e2e::harness::{
    ENGINE_PORT, HttpClient, HttpResponse, LogsOnFailure, Stack, TestPod, model_server_yaml,
    route_per_server_files, simple_route_yaml, wait_for,
};
use tokio::sync::OnceCell;

const OUTPUT_TOKENS: u64 = 5;
/// A credential the clients send; it must never show up in logs or dumps.
const SECRET_TOKEN: &str = "Bearer sk-observability-secret-token";

const GUIDE: &str = include_str!("../../testdata/kthena/router-observability-guide.txt");
const OLDER_GUIDE: &str = include_str!("../../testdata/kthena/router-observability-guide-older.md");

const REQUESTS_TOTAL: &str = "kthena_router_requests_total";
const TOKENS_TOTAL: &str = "kthena_router_tokens_total";
const ACTIVE_DOWNSTREAM: &str = "kthena_router_active_downstream_requests";
const ACTIVE_UPSTREAM: &str = "kthena_router_active_upstream_requests";

/// The guide's metric tables: (family, type, label names without `le`, buckets).
const REQUEST_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
type DocumentedMetric = (
    &'static str,
    &'static str,
    &'static [&'static str],
    &'static [f64],
);
const DOCUMENTED_METRICS: &[DocumentedMetric] = &[
    (
        REQUESTS_TOTAL,
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
    (ACTIVE_DOWNSTREAM, "gauge", &["model"], &[]),
    (
        ACTIVE_UPSTREAM,
        "gauge",
        &["model_route", "model_server"],
        &[],
    ),
    (
        TOKENS_TOTAL,
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
/// The guide's families without series in this stack, declared (HELP and
/// TYPE) so dashboards and `grep`s find them: the fairness queue, which this
/// stack's router configuration does not turn on (`tests/fairness.rs` reads
/// its series), and rate limits, which no route here sets.
const DECLARED_ONLY: &[(&str, &str)] = &[
    ("kthena_router_fairness_queue_size", "gauge"),
    ("kthena_router_fairness_queue_duration_seconds", "histogram"),
    ("kthena_router_rate_limit_exceeded_total", "counter"),
];

/// Access log fields Switchyard adds to the guide's.
const EXTRA_ACCESS_LOG_FIELDS: &[&str] = &[
    "ttft_ms",
    "upstream_attempts",
    "failed_over_from",
    "user_id",
    "tier",
    "backend_type",
];
/// The access log's JSON fields: the guide's plus [`EXTRA_ACCESS_LOG_FIELDS`].
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
    "backend_type",
    "user_id",
    "tier",
    "input_tokens",
    "output_tokens",
    "duration_total_ms",
    "duration_queue_ms",
    "duration_request_processing_ms",
    "duration_upstream_ms",
    "duration_response_processing_ms",
    "ttft_ms",
    "upstream_attempts",
    "failed_over_from",
    "error",
];

/// Requests to dataplane 0 that run to their end: (request id, path, body, status).
const DATAPLANE_0_ENDING_REQUESTS: [(&str, &str, &str, StatusCode); 4] = [
    (
        "obs-req-1",
        "/v1/completions",
        r#"{"model":"obs-model","prompt":"San Francisco is a"}"#,
        StatusCode::OK,
    ),
    (
        "obs-req-stream",
        "/v1/chat/completions",
        r#"{"model":"obs-model","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        StatusCode::OK,
    ),
    (
        "obs-req-404",
        "/v1/completions",
        r#"{"model":"no-such-model","prompt":"hi"}"#,
        StatusCode::NOT_FOUND,
    ),
    (
        "obs-req-503",
        "/v1/completions",
        r#"{"model":"dead-model","prompt":"hi"}"#,
        StatusCode::SERVICE_UNAVAILABLE,
    ),
];
/// The request to dataplane 0 whose client leaves in the middle of the stream.
const ABANDONED_REQUEST: &str = "obs-req-gone";

/// Every route of the shared stack, each with a server of its own.
const ROUTES: [(&str, &str, &str); 3] = [
    ("obs-route", "obs-model", "obs-server"),
    ("dead-route", "dead-model", "dead"),
    ("slow-route", "slow-model", "slow-server"),
];

/// A sample's name, some of its labels, and the value it must have.
type ExpectedSample<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

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

    /// Asserts the value of each `(name, labels, value)`.
    fn assert_values(&self, expected: &[ExpectedSample<'_>]) {
        for (name, labels, value) in expected {
            assert_eq!(self.value(name, labels), *value, "{name} {labels:?}");
        }
    }

    /// The distinct values of the label `label` over all samples.
    fn label_values(&self, label: &str) -> BTreeSet<&str> {
        self.samples
            .iter()
            .filter_map(|sample| sample.labels.get(label).map(String::as_str))
            .collect()
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

/// Runs `command` with `input` on stdin (as `curl -s ... |` would feed a
/// pipeline); returns its output.
fn run_with_input(command: &mut Command, input: &str) -> std::process::Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the command");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("command output")
}

/// Runs a shell pipeline with `input` on stdin; returns its standard output.
fn shell(pipeline: &str, input: &str) -> String {
    let output = run_with_input(Command::new("sh").args(["-c", pipeline]), input);
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

/// Asserts that `promtool` accepts a command's output; `what` names the check.
fn assert_promtool_ok(what: &str, output: &std::process::Output) {
    assert!(
        output.status.success(),
        "promtool {what}:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn promtool_check_metrics(what: &str, text: &str) {
    if let Some(promtool) = promtool() {
        let output = run_with_input(Command::new(promtool).args(["check", "metrics"]), text);
        assert_promtool_ok(
            &format!("check metrics rejected the {what} exposition"),
            &output,
        );
    }
}

async fn get(http: &HttpClient, url: &str) -> HttpResponse {
    http.get(url).await.expect("GET answers")
}

/// The element of the JSON array `list` whose `name` is `name`.
fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    let mut elements = list.as_array().into_iter().flatten();
    elements
        .find(|element| element["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {list}"))
}

/// The `name`s of the elements of the JSON array `list`.
fn names(list: &Value) -> BTreeSet<&str> {
    let elements = list.as_array().into_iter().flatten();
    elements
        .filter_map(|element| element["name"].as_str())
        .collect()
}

/// Asserts that `line` has each field of `expected`, with its value.
fn assert_fields(line: &Value, expected: Value) {
    for (field, value) in expected.as_object().expect("fields") {
        assert_eq!(&line[field], value, "{field} of {line}");
    }
}

/// Parsed access log JSON lines found by the guide's `grep -E '^{.*}$'`.
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

/// The stack the tests observe, and what its traffic left behind.
struct Observed {
    stack: Stack,
    /// The pod that answered `obs-req-1`.
    completion_pod: String,
    /// Dataplane 0's `/metrics` once all the traffic was counted.
    metrics_text: String,
    /// Dataplane 1's access log file (text format).
    text_log: PathBuf,
}

/// What a test observes: the shared stack, started and sent its traffic by the
/// first test that asks; an HTTP client of the test's own; and the stack's
/// logs, printed if the test fails.
async fn observed() -> Observing {
    static OBSERVED: OnceCell<Observed> = OnceCell::const_new();
    let observed = OBSERVED.get_or_init(Observed::start).await;
    Observing {
        observed,
        http: HttpClient::default(),
        _logs: observed.stack.logs_on_failure(),
    }
}

struct Observing {
    observed: &'static Observed,
    http: HttpClient,
    _logs: LogsOnFailure<'static>,
}

impl std::ops::Deref for Observing {
    type Target = Observed;

    fn deref(&self) -> &Observed {
        self.observed
    }
}

impl Observed {
    /// Engines `obs-0`/`obs-1` (fast), `slow-0` (streams for a minute, so a
    /// client can leave in the middle) and a pod `dead-0` without one (its
    /// connections are refused); the controller; dataplane 0 with the default
    /// logs (JSON access log on stdout, text app logs on stderr, both in one log
    /// as `kubectl logs` shows them) and /metrics on the traffic port; dataplane
    /// 1 with a text access log to a file, configured by the file's
    /// accessLogger block, and JSON application logs. Then the traffic.
    async fn start() -> Self {
        let mut stack = Stack::new(&route_per_server_files(&ROUTES));
        stack.remove_at_exit();
        let output_tokens = OUTPUT_TOKENS.to_string();
        let fast: &[&str] = &["--output-tokens", &output_tokens, "--itl-ms", "5"];
        let slow: &[&str] = &["--output-tokens", "300", "--itl-ms", "200"];
        let pods = [
            TestPod::serving("obs-0", 11, "obs-server", "obs-model", fast),
            TestPod::serving("obs-1", 12, "obs-server", "obs-model", fast),
            TestPod::serving("slow-0", 14, "slow-server", "slow-model", slow),
            TestPod::without_engine("dead-0", 13, "dead"),
        ];
        stack.start_pods(&pods).await;
        stack.start_controller().await;
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
        let completion_pod = send_traffic(&stack).await;

        // A request is counted when its response body ends, which the dataplane
        // may see just after the client has read the last byte: wait for all.
        let metrics_url = format!("http://{}/metrics", stack.dataplanes[0].metrics);
        let metrics_text = wait_for("the traffic to be counted", || async {
            let text = get(&stack.http, &metrics_url).await.text();
            let exposition = Exposition::parse(&text);
            let successes = exposition.find(
                REQUESTS_TOTAL,
                &[("model", "obs-model"), ("status_code", "200")],
            );
            let counted =
                text.contains("error_type=\"client_disconnected\"") && successes.len() >= 2;
            counted.then_some(text)
        })
        .await;
        Self {
            stack,
            completion_pod,
            metrics_text,
            text_log,
        }
    }

    fn metrics(&self) -> Exposition {
        Exposition::parse(&self.metrics_text)
    }

    fn debug_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.stack.dataplanes[0].debug)
    }

    fn controller_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.stack.controller_admin)
    }

    fn controller_debug_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.stack.controller_debug)
    }

    /// The controller's `/metrics` once a RouteConfig push was measured.
    async fn controller_metrics_text(&self, http: &HttpClient) -> String {
        let url = self.controller_url("/metrics");
        wait_for("the controller's push latency", || async {
            let text = get(http, &url).await.text();
            text.contains("switchyard_controller_push_latency_seconds_count{type=\"route_config\"}")
                .then_some(text)
        })
        .await
    }

    /// Dataplane 0's JSON access log lines, once the lines of all its traffic are in.
    async fn access_log_lines(&self) -> Vec<Value> {
        let log_process = &self.stack.dataplanes[0].process;
        wait_for("the access log lines of dataplane 0", || async {
            let lines = json_lines(&log_process.log_text());
            let ids: BTreeSet<&str> = lines
                .iter()
                .filter_map(|line| line["request_id"].as_str())
                .collect();
            let ending = DATAPLANE_0_ENDING_REQUESTS.iter().map(|request| request.0);
            let all_in = ending.chain([ABANDONED_REQUEST]).all(|id| ids.contains(id));
            all_in.then(|| lines.clone())
        })
        .await
    }
}

/// The traffic: a completion, a stream, an unknown model, a model whose only
/// pod refuses connections, an unknown path, a completion through dataplane 1
/// and a client that leaves in the middle of a stream. Returns the pod that
/// answered the completion.
async fn send_traffic(stack: &Stack) -> String {
    let mut completion_pod = None;
    for (id, path, body, status) in DATAPLANE_0_ENDING_REQUESTS {
        // Every request carries a client credential, which must never show up in logs or dumps.
        let headers = [("x-request-id", id), ("authorization", SECRET_TOKEN)];
        let response = stack.post(path, &headers, body).await;
        assert_eq!(response.status, status, "{id}: {}", response.text());
        if path == "/v1/chat/completions" {
            assert!(response.text().contains("data: [DONE]"), "{id}");
        } else if id == "obs-req-1" {
            completion_pod = response.header("x-mock-pod").map(str::to_owned);
        }
    }
    let bad_path = get(&stack.http, &stack.dataplanes[0].url("/v1/not-an-api")).await;
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
    let abandoned = stack
        .post_streaming(
            "/v1/chat/completions",
            &[("x-request-id", ABANDONED_REQUEST)],
            r#"{"model":"slow-model","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .await;
    assert_eq!(abandoned.status(), StatusCode::OK);
    drop(abandoned);
    completion_pod.expect("x-mock-pod names the pod")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guides_metric_families_have_their_types_labels_and_buckets() {
    let observed = observed().await;
    let metrics = observed.metrics();
    for (family, kind, labels, buckets) in DOCUMENTED_METRICS {
        assert!(GUIDE.contains(family), "{family} is in the guide");
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
        assert!(GUIDE.contains(family), "{family} is in the guide");
        assert_eq!(
            metrics.types.get(*family).map(String::as_str),
            Some(*kind),
            "{family} declared"
        );
        assert!(
            observed.metrics_text.contains(&format!("# HELP {family} ")),
            "{family} help"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_token_and_phase_metrics_count_the_traffic() {
    let observed = observed().await;
    let metrics = observed.metrics();
    let (requests, tokens) = (REQUESTS_TOTAL, TOKENS_TOTAL);
    let completions = ("path", "/v1/completions");
    let chat = ("path", "/v1/chat/completions");
    let obs = ("model", "obs-model");
    let ok = [("status_code", "200"), ("error_type", "successful_request")];
    metrics.assert_values(&[
        (requests, &[obs, completions, ok[0], ok[1]], 1.0),
        (requests, &[obs, chat, ok[0], ok[1]], 1.0),
        (
            requests,
            &[
                ("model", "unknown"),
                ("status_code", "404"),
                ("error_type", "route_not_found"),
            ],
            1.0,
        ),
        (
            requests,
            &[
                ("model", "unknown"),
                ("path", "other"),
                ("error_type", "unknown_path"),
            ],
            1.0,
        ),
        (
            requests,
            &[
                ("model", "dead-model"),
                ("status_code", "503"),
                ("error_type", "upstream_unavailable"),
            ],
            1.0,
        ),
        (
            requests,
            &[
                ("model", "slow-model"),
                ("status_code", "200"),
                ("error_type", "client_disconnected"),
            ],
            1.0,
        ),
        (
            tokens,
            &[obs, completions, ("token_type", "output")],
            OUTPUT_TOKENS as f64,
        ),
        (
            tokens,
            &[obs, chat, ("token_type", "output")],
            OUTPUT_TOKENS as f64,
        ),
    ]);
    assert!(
        metrics.value(
            "kthena_router_upstream_connect_errors_total",
            &[("model_server", "default/dead")]
        ) >= 1.0
    );
    assert!(metrics.value(tokens, &[obs, completions, ("token_type", "input")]) > 0.0);
    // Only the stream has a prefill/decode split, TTFT and TPOT.
    for family in [
        "kthena_router_request_prefill_duration_seconds_count",
        "kthena_router_request_decode_duration_seconds_count",
    ] {
        metrics.assert_values(&[(family, &[obs, chat], 1.0)]);
        assert!(
            metrics.find(family, &[obs, completions]).is_empty(),
            "a path that never streamed has no {family} series (created on first use)"
        );
    }
    metrics.assert_values(&[
        (
            "kthena_router_time_to_first_token_seconds_count",
            &[obs],
            1.0,
        ),
        (
            "kthena_router_time_per_output_token_seconds_count",
            &[obs],
            1.0,
        ),
    ]);
    promtool_check_metrics("dataplane", &observed.metrics_text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gauges_return_to_zero_and_label_values_stay_bounded() {
    let observed = observed().await;
    let metrics = observed.metrics();
    let pod_active = "kthena_router_pod_active_requests";
    let (downstream, upstream) = (ACTIVE_DOWNSTREAM, ACTIVE_UPSTREAM);
    metrics.assert_values(&[
        (downstream, &[("model", "obs-model")], 0.0),
        (downstream, &[("model", "slow-model")], 0.0),
        (upstream, &[("model_route", "default/slow-route")], 0.0),
        (
            upstream,
            &[
                ("model_route", "default/obs-route"),
                ("model_server", "default/obs-server"),
            ],
            0.0,
        ),
        ("kthena_router_controller_connected", &[], 1.0),
        (pod_active, &[("pod", "default/obs-0")], 0.0),
        (pod_active, &[("pod", "default/obs-1")], 0.0),
        (pod_active, &[("pod", "default/slow-0")], 0.0),
        (pod_active, &[("pod", "default/dead-0")], 0.0),
    ]);
    assert_eq!(
        metrics.find("kthena_router_snapshot_info", &[]).len(),
        1,
        "one snapshot version in use"
    );
    // Bounded cardinality: models of the snapshot or `unknown`, fixed paths.
    assert_eq!(
        metrics.label_values("model"),
        BTreeSet::from(["dead-model", "obs-model", "slow-model", "unknown"])
    );
    let paths = metrics.label_values("path");
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
        !observed.metrics_text.contains("obs-req-"),
        "no request ids in metrics"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_on_the_traffic_port_only_with_the_flag() {
    let observed = observed().await;
    let http = &observed.http;
    let dataplanes = &observed.stack.dataplanes;
    let router_port_metrics = get(http, &dataplanes[0].url("/metrics")).await;
    assert_eq!(router_port_metrics.status, StatusCode::OK);
    assert!(
        router_port_metrics
            .text()
            .contains("# TYPE kthena_router_requests_total counter")
    );
    let without_flag = get(http, &dataplanes[1].url("/metrics")).await;
    assert_eq!(without_flag.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guides_troubleshooting_greps_find_what_they_look_for() {
    let observed = observed().await;
    let metrics_text = &observed.metrics_text;
    let grep_finds = |pipeline: &str, expected: &str| {
        let found = shell(pipeline, metrics_text);
        assert!(
            found.contains(expected),
            "`curl -s .../metrics | {pipeline}` should find {expected:?}, found:\n{found}"
        );
    };
    grep_finds(
        "grep kthena_router_requests_total | sort",
        "kthena_router_requests_total{",
    );
    // The guide greps `status_code=5`, which no Prometheus exposition can match
    // (label values are quoted): the README gives the corrected form.
    assert!(GUIDE.contains("grep 'status_code=5'"));
    assert!(shell("grep 'status_code=5'", metrics_text).is_empty());
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_log_lines_carry_every_field_of_each_request() {
    let observed = observed().await;
    for field in ACCESS_LOG_FIELDS {
        let in_guide = GUIDE.contains(&format!("\"{field}\":"));
        assert_eq!(
            in_guide,
            !EXTRA_ACCESS_LOG_FIELDS.contains(field),
            "{field} in the guide's access log"
        );
    }
    let lines = observed.access_log_lines().await;
    let log_text = observed.stack.dataplanes[0].process.log_text();
    // Application logs are on the same stream but never match `^{.*}$`.
    assert!(
        log_text.lines().count() > lines.len(),
        "application logs are in the same log"
    );
    let expected: BTreeSet<&str> = ACCESS_LOG_FIELDS.iter().copied().collect();
    for line in &lines {
        let object = line.as_object().expect("access log line is an object");
        let keys: BTreeSet<&str> = object.keys().map(String::as_str).collect();
        assert_eq!(keys, expected, "every field, nothing else: {line}");
    }
    let by_id = |id: &str| -> &Value {
        lines
            .iter()
            .find(|l| l["request_id"] == id)
            .unwrap_or_else(|| panic!("access log line of {id}"))
    };
    let line = by_id("obs-req-1");
    assert_fields(
        line,
        json!({
            "method": "POST",
            "path": "/v1/completions",
            "protocol": "HTTP/1.1",
            "status_code": 200,
            "model_name": "obs-model",
            "model_route": "default/obs-route",
            "model_server": "default/obs-server",
            "selected_pod": observed.completion_pod,
            "backend_type": "model_server",
            "output_tokens": OUTPUT_TOKENS,
            "upstream_attempts": 1,
            "duration_queue_ms": 0,
            "ttft_ms": null, // not a stream
            "error": null,
        }),
    );
    assert!(line["input_tokens"].as_u64().expect("input tokens") > 0);
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
    let stream_fields = json!({"output_tokens": OUTPUT_TOKENS, "path": "/v1/chat/completions"});
    assert_fields(stream_line, stream_fields);
    let not_found = by_id("obs-req-404");
    assert_fields(
        not_found,
        json!({"status_code": 404, "model_name": "no-such-model", "model_route": null}),
    );
    assert_eq!(not_found["error"]["type"], "route_not_found");
    assert!(
        not_found["error"]["message"]
            .as_str()
            .expect("message")
            .contains("route not found")
    );
    let gone = by_id(ABANDONED_REQUEST);
    assert_fields(gone, json!({"status_code": 200, "selected_pod": "slow-0"}));
    assert_eq!(gone["error"]["type"], "client_disconnected");
    let failed = by_id("obs-req-503");
    assert_fields(failed, json!({"selected_pod": "dead-0"}));
    assert_eq!(failed["error"]["type"], "upstream_unavailable");
    assert!(failed["upstream_attempts"].as_u64().expect("attempts") >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guides_log_queries_find_the_requests_and_no_credentials() {
    let observed = observed().await;
    let lines = observed.access_log_lines().await;
    // The guide's `jq 'select(.status_code >= 500) | {...}'`.
    let server_errors: Vec<&Value> = lines
        .iter()
        .filter(|l| l["status_code"].as_u64().is_some_and(|s| s >= 500))
        .collect();
    assert_eq!(server_errors.len(), 1);
    assert_eq!(server_errors[0]["model_name"], "dead-model");
    // The guide's `grep -E "model_name|request_id|duration_total"` finds lines.
    let log_text = observed.stack.dataplanes[0].process.log_text();
    assert!(
        shell(
            "grep -E \"model_name|request_id|duration_total\"",
            &log_text
        )
        .contains("\"request_id\":\"obs-req-1\"")
    );
    assert!(!log_text.contains(SECRET_TOKEN), "no credentials in logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_access_log_goes_to_its_file_and_application_logs_can_be_json() {
    let observed = observed().await;
    let text = wait_for("the text access log line", || async {
        std::fs::read_to_string(&observed.text_log)
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
            && text_line.contains(" request_id=obs-req-text backend_type=model_server tokens=")
            && text_line.contains(&format!("/{OUTPUT_TOKENS} timings=")),
        "{text_line}"
    );
    let second_log = observed.stack.dataplanes[1].process.log_text();
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_endpoints_dump_routes_servers_pods_and_router_state() {
    let observed = observed().await;
    let http = &observed.http;
    let debug = |path: &str| observed.debug_url(path);
    let routes = get(http, &debug("/debug/config_dump/modelroutes")).await;
    assert_eq!(routes.status, StatusCode::OK);
    let routes = routes.json();
    let obs_route = named(&routes["modelroutes"], "obs-route");
    assert_eq!(obs_route["namespace"], "default");
    assert_eq!(obs_route["spec"]["modelName"], "obs-model");
    assert_eq!(
        obs_route["spec"]["rules"][0]["targetModels"][0]["modelServer"],
        serde_json::json!({"name": "obs-server", "namespace": "default"})
    );
    let servers = get(http, &debug("/debug/config_dump/modelservers"))
        .await
        .json();
    assert_eq!(
        names(&servers["modelservers"]),
        BTreeSet::from(["dead", "obs-server", "slow-server"])
    );
    let obs_pod = obs_pod_with_metrics(&observed, http).await;
    for field in [
        "gpuCacheUsage",
        "requestWaitingNum",
        "requestRunningNum",
        "tpot",
        "ttft",
    ] {
        assert!(obs_pod["metrics"][field].is_number(), "{field}: {obs_pod}");
    }
    let obs_0_ip = observed.stack.ip(11).to_string();
    assert_eq!(obs_pod["podInfo"]["podIP"], obs_0_ip.as_str());
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
        http,
        &debug("/debug/config_dump/namespaces/default/modelroutes/obs-route"),
    )
    .await;
    assert_eq!(single_route.status, StatusCode::OK);
    assert_eq!(&single_route.json(), obs_route);
    let single_server = get(
        http,
        &debug("/debug/config_dump/namespaces/default/modelservers/obs-server"),
    )
    .await
    .json();
    assert_eq!(single_server["spec"]["inferenceEngine"], "vLLM");
    assert_eq!(single_server["spec"]["workloadPort"]["port"], ENGINE_PORT);
    let single_pod = get(
        http,
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
        let response = get(http, &debug(missing)).await;
        assert_eq!(response.status, StatusCode::NOT_FOUND, "{missing}");
        assert_eq!(response.json()["error"]["code"], "not_found", "{missing}");
    }
    let post_debug = http
        .call(
            Method::POST,
            &debug("/debug/config_dump/modelroutes"),
            &[],
            "",
        )
        .await
        .expect("debug port answers");
    assert_eq!(post_debug.status, StatusCode::METHOD_NOT_ALLOWED);
    let table = get(http, &debug("/debug/routing/table")).await.json();
    assert!(table["version"].is_string());
    assert!(
        table["routes"]
            .as_array()
            .expect("routes")
            .iter()
            .any(|r| r["route"] == "default/obs-route" && r["modelName"] == "obs-model")
    );
    let state = get(http, &debug("/debug/router/state")).await.json();
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
            !get(http, &debug(dump))
                .await
                .text()
                .contains("sk-observability"),
            "nothing secret in {dump}"
        );
    }
}

/// `obs-0` in dataplane 0's pods dump, once the controller's scrape brought
/// the loads of both `obs-` pods.
async fn obs_pod_with_metrics(observed: &Observed, http: &HttpClient) -> Value {
    let pods_dump = wait_for("pod metrics in the pods dump", || async {
        let dump = get(http, &observed.debug_url("/debug/config_dump/pods"))
            .await
            .json();
        let obs_pods_have_metrics = dump["pods"].as_array().is_some_and(|pods| {
            pods.iter()
                .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("obs-")))
                .all(|p| p["metrics"].is_object())
        });
        obs_pods_have_metrics.then_some(dump)
    })
    .await;
    named(&pods_dump["pods"], "obs-0").clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_dumps_what_the_dataplanes_hold_and_counts_their_acks() {
    let observed = observed().await;
    let http = &observed.http;
    let controller = |path: &str| observed.controller_debug_url(path);
    let dataplane = |path: &str| observed.debug_url(path);
    for dump in [
        "/debug/config_dump/modelroutes",
        "/debug/config_dump/modelservers",
    ] {
        assert_eq!(
            get(http, &controller(dump)).await.json(),
            get(http, &dataplane(dump)).await.json(),
            "controller and dataplane dump the same {dump}"
        );
    }
    let obs_pod = obs_pod_with_metrics(&observed, http).await;
    let controller_pod = get(
        http,
        &controller("/debug/config_dump/namespaces/default/pods/obs-0"),
    )
    .await
    .json();
    assert_eq!(controller_pod["podInfo"], obs_pod["podInfo"]);
    assert_eq!(
        get(
            http,
            &controller("/debug/config_dump/namespaces/default/modelroutes/nope")
        )
        .await
        .status,
        StatusCode::NOT_FOUND
    );
    let table = get(http, &dataplane("/debug/routing/table")).await.json();
    let dataplanes = get(http, &controller("/debug/dataplanes")).await.json();
    let dataplanes = dataplanes["dataplanes"].as_array().expect("dataplanes");
    assert_eq!(dataplanes.len(), 2);
    for dataplane in dataplanes {
        assert_eq!(
            dataplane["route_config"]["acked_version"], table["version"],
            "{dataplane}"
        );
        assert_eq!(dataplane["route_config"]["nacked_version"], Value::Null);
    }
    let controller_text = observed.controller_metrics_text(http).await;
    let controller_metrics = Exposition::parse(&controller_text);
    controller_metrics.assert_values(&[
        ("switchyard_controller_connected_dataplanes", &[], 2.0),
        ("switchyard_controller_leader", &[], 1.0),
    ]);
    let route_config = [("type", "route_config")];
    assert!(
        controller_metrics.value(
            "switchyard_controller_push_latency_seconds_count",
            &route_config
        ) >= 1.0
    );
    assert!(
        controller_metrics.value("switchyard_controller_snapshot_acks_total", &route_config) >= 2.0
    );
    promtool_check_metrics("controller", &controller_text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_alert_rules_only_use_metrics_that_exist() {
    let observed = observed().await;
    let controller_text = observed.controller_metrics_text(&observed.http).await;
    let mut existing = observed.metrics().families();
    existing.extend(Exposition::parse(&controller_text).families());
    // Families without series yet (declared, or vectors without samples).
    for line in observed.metrics_text.lines().chain(controller_text.lines()) {
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
    // The older guide's "Key Dashboard Sections".
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
    assert!(used.contains(REQUESTS_TOTAL));
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
    // The older guide's alerts.
    for guide_alert in [
        "HighRouterErrorRate",
        "HighRequestLatency",
        "HighTokenProcessingRate",
        "RateLimitExceeded",
    ] {
        assert!(OLDER_GUIDE.contains(&format!("alert: {guide_alert}")));
        assert!(alerts.contains(guide_alert), "{guide_alert}");
    }
    if let Some(promtool) = promtool() {
        let output = Command::new(promtool)
            .args(["check", "rules"])
            .arg(&rules_path)
            .output()
            .expect("run promtool");
        assert_promtool_ok("check rules", &output);
        // The rules' unit tests: the alerts fire (and stay quiet) as meant.
        let output = Command::new(promtool)
            .args(["test", "rules", "switchyard-rules.test.yaml"])
            .current_dir(dir.join("alerts"))
            .output()
            .expect("run promtool");
        assert_promtool_ok("test rules", &output);
    }
}

/// On a stack of its own, as it changes the configuration the others observe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_of_a_route_and_server_that_leave_the_snapshot_are_removed() {
    let mut stack = Stack::new(&route_per_server_files(&[
        ("obs-route", "obs-model", "obs-server"),
        ("dead-route", "dead-model", "dead"),
    ]));
    let pods = [
        TestPod::serving("obs-0", 11, "obs-server", "obs-model", &[]),
        TestPod::without_engine("dead-0", 13, "dead"),
    ];
    stack.start_pods(&pods).await;
    stack.start_controller().await;
    stack.start_dataplane().await;
    let dataplane = &stack.dataplanes[0];
    for (model, status) in [
        ("obs-model", StatusCode::OK),
        ("dead-model", StatusCode::SERVICE_UNAVAILABLE),
    ] {
        let body = format!(r#"{{"model":"{model}","prompt":"hi"}}"#);
        let response = stack
            .http
            .post_json(&dataplane.url("/v1/completions"), &[], &body)
            .await
            .expect("dataplane answers");
        assert_eq!(response.status, status, "{}", response.text());
    }
    let metrics_url = format!("http://{}/metrics", dataplane.metrics);
    let requests = REQUESTS_TOTAL;
    let obs_success = [
        ("model", "obs-model"),
        ("path", "/v1/completions"),
        ("status_code", "200"),
    ];
    let dead_failure = [("model", "dead-model"), ("status_code", "503")];
    wait_for("the traffic to be counted", || async {
        let metrics = Exposition::parse(&get(&stack.http, &metrics_url).await.text());
        let succeeded = metrics.find(requests, &obs_success);
        let counted = succeeded.len() == 1 && succeeded[0].value == 1.0;
        (counted && metrics.find(requests, &dead_failure).len() == 1).then_some(())
    })
    .await;

    stack.write_config(
        "routes.yaml",
        &simple_route_yaml("obs-route", "obs-model", "obs-server"),
    );
    stack.write_config("servers.yaml", &model_server_yaml("obs-server", ""));
    wait_for("the dead route's series to disappear", || async {
        let text = get(&stack.http, &metrics_url).await.text();
        (!text.contains("dead-model") && !text.contains("default/dead")).then_some(())
    })
    .await;
    let after = Exposition::parse(&get(&stack.http, &metrics_url).await.text());
    assert_eq!(
        after.value(requests, &obs_success),
        1.0,
        "series of remaining models stay"
    );
}
