use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, PodCondition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use prost::Message;
use switchyard_crd::test_builders::ready_pod as pod;
use switchyard_crd::{InferenceEngine, ModelRoute, ModelServer};
use switchyard_snapshot::test_builders as builders;
use switchyard_snapshot::{ResourceType, content_version, pb};

use super::*;
use crate::outlier::ReportedEjection;
use crate::router_config::OutlierConfig;

fn route(yaml: &str) -> ModelRoute {
    serde_yaml::from_str(yaml).expect("test ModelRoute YAML parses")
}

fn server(yaml: &str) -> ModelServer {
    serde_yaml::from_str(yaml).expect("test ModelServer YAML parses")
}

/// A ModelServer `name` selecting `app: <app>` on port 8000.
fn simple_server(name: &str, app: &str) -> ModelServer {
    server(&format!(
        r#"
metadata: {{ name: {name}, namespace: default }}
spec:
  workloadSelector: {{ matchLabels: {{ app: {app} }} }}
  workloadPort: {{ port: 8000 }}
  inferenceEngine: vLLM
"#
    ))
}

/// A route `name` for model `name` with one rule to `server`.
fn simple_route(name: &str, server: &str) -> ModelRoute {
    route(&format!(
        r#"
metadata: {{ name: {name}, namespace: default }}
spec:
  modelName: {name}
  rules:
  - name: default
    targetModels:
    - modelServerName: {server}
"#
    ))
}

/// Route `r` for model `m` with `rules` (YAML list items indented by two
/// spaces).
fn route_to_m(rules: &str) -> ModelRoute {
    route(&format!(
        "metadata: {{ name: r }}\nspec:\n  modelName: m\n  rules:\n{rules}"
    ))
}

/// The names of the routes in the snapshot.
fn route_names(compiled: &CompiledRoutes) -> Vec<&str> {
    let routes = &compiled.route_config.routes;
    routes.iter().map(|route| route.name.as_str()).collect()
}

/// The names of the rules of the first route in the snapshot.
fn rule_names(compiled: &CompiledRoutes) -> Vec<&str> {
    let rules = &compiled.route_config.routes[0].rules;
    rules.iter().map(|rule| rule.name.as_str()).collect()
}

/// Asserts that a condition's `message` contains `fragment`.
#[track_caller]
fn assert_mentions(message: &str, fragment: &str) {
    assert!(
        message.contains(fragment),
        "{message:?} does not contain {fragment:?}"
    );
}

/// Asserts that `report` (of the case `description`) is a rejection for
/// `reason` whose message contains `fragment`.
#[track_caller]
fn assert_rejected(report: &ObjectReport, reason: Reason, fragment: &str, description: &str) {
    let accepted = &report.accepted;
    assert!(!accepted.status, "{description}");
    assert_eq!(
        accepted.reason, reason,
        "{description}: {}",
        accepted.message
    );
    assert!(
        accepted.message.contains(fragment),
        "{description}: {:?} does not contain {fragment:?}",
        accepted.message
    );
}

fn created_at(mut route: ModelRoute, unix_seconds: i64) -> ModelRoute {
    let timestamp = Timestamp::from_second(unix_seconds).expect("valid timestamp");
    route.metadata.creation_timestamp = Some(Time(timestamp));
    route
}

fn report<'a>(reports: &'a [ObjectReport], kind: ObjectKind, name: &str) -> &'a ObjectReport {
    reports
        .iter()
        .find(|report| report.kind == kind && report.name == name)
        .unwrap_or_else(|| panic!("no report for {kind:?} {name}: {reports:#?}"))
}

fn exact(value: &str) -> Option<pb::StringMatch> {
    Some(pb::StringMatch {
        kind: Some(pb::string_match::Kind::Exact(value.to_owned())),
    })
}

fn target(server: &str, weight: u32) -> pb::WeightedTarget {
    pb::WeightedTarget {
        model_server: server.to_owned(),
        weight,
        ..Default::default()
    }
}

fn compile_objects(routes: &[ModelRoute], servers: &[ModelServer], pods: &[Pod]) -> CompiledRoutes {
    compile_route_config(routes, servers, pods)
}

/// `config` without the pod facts only debug dumps use (labels), so it
/// compares with snapshots built from [`builders`].
fn routing_only(mut config: pb::RouteConfig) -> pb::RouteConfig {
    for server in &mut config.servers {
        for endpoint in &mut server.endpoints {
            endpoint.labels.clear();
        }
    }
    config
}

// --- the Kthena routing guide's scenarios (testdata/kthena/router-routing-guide.txt)

/// The guide's ModelServers: (name, workload labels, model after
/// `deepseek-ai/DeepSeek-R1-Distill-`, engine); port 8000, timeout 10s.
const GUIDE_SERVERS: [(&str, &str, &str, &str); 4] = [
    (
        "deepseek-r1-1-5b",
        "app: deepseek-r1-1-5b",
        "Qwen-1.5B",
        "vLLM",
    ),
    ("deepseek-r1-7b", "app: deepseek-r1-7b", "Qwen-7B", "SGLang"),
    (
        "deepseek-r1-1-5b-v1",
        "app: deepseek-r1-1-5b, version: v1",
        "Qwen-1.5B-v1",
        "vLLM",
    ),
    (
        "deepseek-r1-1-5b-v2",
        "app: deepseek-r1-1-5b, version: v2",
        "Qwen-1.5B-v2",
        "vLLM",
    ),
];

const GUIDE_ROUTES: &str = r#"
metadata: { name: deepseek-simple, namespace: default }
spec:
  modelName: "deepseek-simple"
  rules:
  - name: "default"
    targetModels:
    - modelServerName: "deepseek-r1-1-5b"
---
metadata: { name: deepseek-lora, namespace: default }
spec:
  loraAdapters: ["lora-A", "lora-B"]
  rules:
  - name: "lora-route"
    targetModels:
    - modelServerName: "deepseek-r1-1-5b"
---
metadata: { name: deepseek-subset, namespace: default }
spec:
  modelName: "deepseek-subset"
  rules:
  - name: "deepseek-r1-route"
    targetModels:
    - modelServerName: "deepseek-r1-1-5b-v1"
      weight: 70
    - modelServerName: "deepseek-r1-1-5b-v2"
      weight: 30
---
metadata: { name: deepseek-multi-models, namespace: default }
spec:
  modelName: "deepseek-multi-models"
  rules:
  - name: "premium"
    modelMatch:
      headers:
        user-type:
          exact: premium
    targetModels:
    - modelServerName: "deepseek-r1-7b"
  - name: "default"
    targetModels:
    - modelServerName: "deepseek-r1-1-5b"
"#;

fn guide_inputs() -> (Vec<ModelRoute>, Vec<ModelServer>, Vec<Pod>) {
    use serde::Deserialize;
    let servers: Vec<ModelServer> = GUIDE_SERVERS
        .iter()
        .map(|(name, labels, model, engine)| {
            server(&format!(
                "metadata: {{ name: {name}, namespace: default }}\n\
                 spec:\n  workloadSelector: {{ matchLabels: {{ {labels} }} }}\n  \
                 workloadPort: {{ port: 8000 }}\n  model: deepseek-ai/DeepSeek-R1-Distill-{model}\n  \
                 inferenceEngine: {engine}\n  trafficPolicy: {{ timeout: 10s }}\n"
            ))
        })
        .collect();
    // Created one second apart in document order: simple, lora, subset, multi-models.
    let routes: Vec<ModelRoute> = serde_yaml::Deserializer::from_str(GUIDE_ROUTES)
        .enumerate()
        .map(|(index, document)| {
            let route = ModelRoute::deserialize(document).expect("guide route parses");
            created_at(route, 1_700_000_000 + index as i64)
        })
        .collect();
    let pods = vec![
        pod(
            "default",
            "ds15-v1-0",
            "10.0.0.11",
            &[("app", "deepseek-r1-1-5b"), ("version", "v1")],
        ),
        pod(
            "default",
            "ds15-v2-0",
            "10.0.0.21",
            &[("app", "deepseek-r1-1-5b"), ("version", "v2")],
        ),
        pod(
            "default",
            "ds15-v1-1",
            "10.0.0.12",
            &[("app", "deepseek-r1-1-5b"), ("version", "v1")],
        ),
        pod("default", "ds7-0", "10.0.1.1", &[("app", "deepseek-r1-7b")]),
    ];
    (routes, servers, pods)
}

fn guide_expected_route_config() -> pb::RouteConfig {
    let created = |route: pb::ModelRoute, seconds: i64| pb::ModelRoute {
        creation_timestamp_unix_ms: seconds * 1000,
        ..route
    };
    let deepseek = |name: &str, model: &str, engine: &str, pods: &[(&str, &str)]| pb::ModelServer {
        model: Some(format!("deepseek-ai/DeepSeek-R1-Distill-Qwen-{model}")),
        inference_engine: engine.into(),
        traffic_policy: Some(pb::TrafficPolicy {
            timeout_ms: 10_000,
            retry_attempts: 0,
            retry_interval_ms: 0,
        }),
        ..builders::server(name, pods)
    };
    builders::route_config(
        vec![
            created(
                builders::route("deepseek-simple", "deepseek-simple", "deepseek-r1-1-5b"),
                1_700_000_000,
            ),
            created(
                pb::ModelRoute {
                    lora_adapters: vec!["lora-A".into(), "lora-B".into()],
                    ..builders::route_with_rules(
                        "deepseek-lora",
                        "",
                        vec![builders::rule(
                            "lora-route",
                            None,
                            &[("default/deepseek-r1-1-5b", 100)],
                        )],
                    )
                },
                1_700_000_001,
            ),
            created(
                builders::route_with_rules(
                    "deepseek-subset",
                    "deepseek-subset",
                    vec![builders::rule(
                        "deepseek-r1-route",
                        None,
                        &[
                            ("default/deepseek-r1-1-5b-v1", 70),
                            ("default/deepseek-r1-1-5b-v2", 30),
                        ],
                    )],
                ),
                1_700_000_002,
            ),
            created(
                builders::route_with_rules(
                    "deepseek-multi-models",
                    "deepseek-multi-models",
                    vec![
                        builders::rule(
                            "premium",
                            Some(builders::header_exact("user-type", "premium")),
                            &[("default/deepseek-r1-7b", 100)],
                        ),
                        builders::rule("default", None, &[("default/deepseek-r1-1-5b", 100)]),
                    ],
                ),
                1_700_000_003,
            ),
        ],
        vec![
            deepseek(
                "deepseek-r1-1-5b",
                "1.5B",
                "vLLM",
                &[
                    ("ds15-v1-0", "10.0.0.11"),
                    ("ds15-v1-1", "10.0.0.12"),
                    ("ds15-v2-0", "10.0.0.21"),
                ],
            ),
            deepseek(
                "deepseek-r1-1-5b-v1",
                "1.5B-v1",
                "vLLM",
                &[("ds15-v1-0", "10.0.0.11"), ("ds15-v1-1", "10.0.0.12")],
            ),
            deepseek(
                "deepseek-r1-1-5b-v2",
                "1.5B-v2",
                "vLLM",
                &[("ds15-v2-0", "10.0.0.21")],
            ),
            deepseek("deepseek-r1-7b", "7B", "SGLang", &[("ds7-0", "10.0.1.1")]),
        ],
    )
}

#[test]
fn guide_scenarios_compile_to_the_expected_snapshot() {
    let (routes, servers, pods) = guide_inputs();
    let compiled = compile_objects(&routes, &servers, &pods);
    assert_eq!(
        routing_only(compiled.route_config.clone()),
        guide_expected_route_config()
    );
    assert_eq!(compiled.reports.len(), 8);
    for report in &compiled.reports {
        assert!(report.is_healthy(), "{report:#?}");
        assert!(report.in_snapshot, "{report:#?}");
    }
    let ds15 = report(
        &compiled.reports,
        ObjectKind::ModelServer,
        "deepseek-r1-1-5b",
    );
    assert_eq!((ds15.ready_pods, ds15.total_pods), (Some(3), Some(3)));
    assert_eq!(ds15.resolved_refs.message, "3 of 3 selected pods ready");
}

#[test]
fn guide_scrape_targets_are_one_per_pod_sorted() {
    let (routes, servers, pods) = guide_inputs();
    let compiled = compile_objects(&routes, &servers, &pods);
    let targets: Vec<(String, String, InferenceEngine)> = compiled
        .scrape_targets
        .iter()
        .map(|target| (target.key.clone(), target.addr.to_string(), target.engine))
        .collect();
    assert_eq!(
        targets,
        vec![
            (
                "default/ds15-v1-0".into(),
                "10.0.0.11:8000".into(),
                InferenceEngine::Vllm
            ),
            (
                "default/ds15-v1-1".into(),
                "10.0.0.12:8000".into(),
                InferenceEngine::Vllm
            ),
            (
                "default/ds15-v2-0".into(),
                "10.0.0.21:8000".into(),
                InferenceEngine::Vllm
            ),
            (
                "default/ds7-0".into(),
                "10.0.1.1:8000".into(),
                InferenceEngine::Sglang
            ),
        ]
    );
}

#[test]
fn equal_inputs_in_any_order_give_identical_bytes() {
    let (routes, servers, pods) = guide_inputs();
    let first = compile_objects(&routes, &servers, &pods);
    let mut shuffled_routes = routes.clone();
    shuffled_routes.reverse();
    let mut shuffled_servers = servers.clone();
    shuffled_servers.rotate_left(1);
    let mut shuffled_pods = pods.clone();
    shuffled_pods.reverse();
    let second = compile_objects(&shuffled_routes, &shuffled_servers, &shuffled_pods);

    assert_eq!(
        first.route_config.encode_to_vec(),
        second.route_config.encode_to_vec()
    );
    assert_eq!(
        content_version(ResourceType::RouteConfig, &first.route_config),
        content_version(ResourceType::RouteConfig, &second.route_config)
    );
    assert_eq!(first.scrape_targets, second.scrape_targets);
    assert_eq!(first.reports, second.reports);
}

#[test]
fn header_names_are_lower_cased_and_sorted() {
    let routes = [route_to_m(
        r#"
  - modelMatch:
      headers:
        X-Tier: { prefix: gold }
        User-Type: { exact: premium }
        a-first: { regex: "^x" }
    targetModels: [{ modelServerName: s }]
"#,
    )];
    let compiled = compile_objects(&routes, &[simple_server("s", "s")], &[]);
    let headers: Vec<&str> = compiled.route_config.routes[0].rules[0]
        .r#match
        .as_ref()
        .expect("match kept")
        .headers
        .iter()
        .map(|header| header.name.as_str())
        .collect();
    assert_eq!(headers, ["a-first", "user-type", "x-tier"]);
}

// --- validation ---------------------------------------------------------------

#[test]
fn an_invalid_regex_rejects_only_its_route() {
    let routes = [
        simple_route("good", "s"),
        route(
            r#"
metadata: { name: bad }
spec:
  modelName: bad
  rules:
  - name: first
    targetModels: [{ modelServerName: s }]
  - name: second
    modelMatch:
      uri: { regex: "(" }
    targetModels: [{ modelServerName: s }]
"#,
        ),
    ];
    let compiled = compile_objects(&routes, &[simple_server("s", "s")], &[]);
    assert_eq!(route_names(&compiled), ["good"]);

    let bad = report(&compiled.reports, ObjectKind::ModelRoute, "bad");
    assert!(!bad.accepted.status);
    assert_eq!(bad.accepted.reason, Reason::InvalidRegex);
    assert!(
        bad.accepted
            .message
            .starts_with(r#"spec.rules[1].modelMatch.uri.regex: invalid regex "(": "#),
        "{}",
        bad.accepted.message
    );
    assert!(
        !bad.accepted.message.contains('\n'),
        "{}",
        bad.accepted.message
    );
    assert!(!bad.in_snapshot);
    assert!(report(&compiled.reports, ObjectKind::ModelRoute, "good").is_healthy());
}

/// Each case: a route spec (YAML, under `spec:`), the expected reason and a
/// fragment of the message.
#[test]
fn invalid_routes_are_rejected_with_a_reason_naming_the_field() {
    let cases: &[(&str, &str, Reason, &str)] = &[
        (
            "no model name and no LoRA adapters",
            "{ rules: [{ targetModels: [{ modelServerName: s }] }] }",
            Reason::InvalidModelName,
            "spec.modelName: must be set when spec.loraAdapters is empty",
        ),
        (
            "empty LoRA adapter name",
            r#"{ loraAdapters: [a, ""], rules: [{ targetModels: [{ modelServerName: s }] }] }"#,
            Reason::InvalidModelName,
            "spec.loraAdapters[1]: a LoRA adapter name cannot be an empty string",
        ),
        (
            "no rules",
            "{ modelName: m, rules: [] }",
            Reason::InvalidRules,
            "spec.rules: at least one rule",
        ),
        (
            "rule without targets",
            "{ modelName: m, rules: [{ targetModels: [] }] }",
            Reason::InvalidRules,
            "spec.rules[0].targetModels: at least one target",
        ),
        (
            "target naming no backend",
            "{ modelName: m, rules: [{ targetModels: [{ weight: 10 }] }] }",
            Reason::InvalidRules,
            "spec.rules[0].targetModels[0]: exactly one of modelServerName or externalModelProviderName",
        ),
        (
            "target naming two backends",
            "{ modelName: m, rules: [{ targetModels: [{ modelServerName: s, externalModelProviderName: p }] }] }",
            Reason::InvalidRules,
            "spec.rules[0].targetModels[0]: exactly one of",
        ),
        (
            "weight above 100",
            "{ modelName: m, rules: [{ targetModels: [{ modelServerName: s, weight: 150 }] }] }",
            Reason::InvalidWeights,
            "spec.rules[0].targetModels[0].weight: 150 is above the maximum 100",
        ),
        (
            "all weights 0",
            "{ modelName: m, rules: [{ targetModels: [{ modelServerName: s, weight: 0 }, { modelServerName: s, weight: 0 }] }] }",
            Reason::InvalidWeights,
            "spec.rules[0].targetModels: weights sum to 0",
        ),
        (
            "invalid header regex",
            r#"{ modelName: m, rules: [{ modelMatch: { headers: { x-a: { regex: "a[" } } }, targetModels: [{ modelServerName: s }] }] }"#,
            Reason::InvalidRegex,
            r#"spec.rules[0].modelMatch.headers["x-a"].regex: invalid regex "a[""#,
        ),
        (
            "string match with two kinds",
            "{ modelName: m, rules: [{ modelMatch: { uri: { exact: /a, prefix: /b } }, targetModels: [{ modelServerName: s }] }] }",
            Reason::InvalidMatch,
            "spec.rules[0].modelMatch.uri: only one of exact, prefix or regex may be set",
        ),
        (
            "one header spelled twice",
            "{ modelName: m, rules: [{ modelMatch: { headers: { X-A: { exact: a }, x-a: { exact: b } } }, targetModels: [{ modelServerName: s }] }] }",
            Reason::InvalidMatch,
            "header names are case-insensitive",
        ),
        (
            "header name that is not a header name",
            r#"{ modelName: m, rules: [{ modelMatch: { headers: { "bad header": { exact: a } } }, targetModels: [{ modelServerName: s }] }] }"#,
            Reason::InvalidMatch,
            "is not a valid HTTP header name",
        ),
    ];
    for (description, spec, reason, fragment) in cases {
        let bad = route(&format!("metadata: {{ name: bad }}\nspec: {spec}\n"));
        let routes = [simple_route("good", "s"), bad];
        let compiled = compile_objects(&routes, &[simple_server("s", "s")], &[]);
        assert_eq!(
            route_names(&compiled),
            ["good"],
            "{description}: the valid route must survive"
        );
        let bad = report(&compiled.reports, ObjectKind::ModelRoute, "bad");
        assert_rejected(bad, *reason, fragment, description);
        assert!(!bad.in_snapshot, "{description}");
    }
}

#[test]
fn invalid_servers_are_rejected_with_a_reason_naming_the_field() {
    let cases: &[(&str, &str, Reason, &str)] = &[
        (
            "port 0",
            "workloadPort: { port: 0 }",
            Reason::InvalidPort,
            "spec.workloadPort.port: 0 is outside 1..=65535",
        ),
        (
            "port too large",
            "workloadPort: { port: 70000 }",
            Reason::InvalidPort,
            "spec.workloadPort.port: 70000 is outside",
        ),
        (
            "https",
            "workloadPort: { port: 8443, protocol: https }",
            Reason::UnsupportedProtocol,
            "spec.workloadPort.protocol: https to model pods is not supported yet",
        ),
        (
            "unknown protocol",
            "workloadPort: { port: 8000, protocol: grpc }",
            Reason::UnsupportedProtocol,
            r#"unknown protocol "grpc""#,
        ),
        (
            "bad timeout",
            "workloadPort: { port: 8000 }\n  trafficPolicy: { timeout: ten }",
            Reason::InvalidDuration,
            "spec.trafficPolicy.timeout: invalid duration",
        ),
        (
            "bad retry interval",
            "workloadPort: { port: 8000 }\n  trafficPolicy: { retry: { attempts: 2, retryInterval: 5 } }",
            Reason::InvalidDuration,
            "spec.trafficPolicy.retry.retryInterval: invalid duration",
        ),
        (
            "negative attempts",
            "workloadPort: { port: 8000 }\n  trafficPolicy: { retry: { attempts: -1 } }",
            Reason::InvalidRetry,
            "spec.trafficPolicy.retry.attempts: -1 is negative",
        ),
    ];
    for (description, fields, reason, fragment) in cases {
        let bad = server(&format!(
            "metadata: {{ name: bad }}\nspec:\n  inferenceEngine: vLLM\n  workloadSelector: {{ matchLabels: {{ app: bad }} }}\n  {fields}\n"
        ));
        let compiled = compile_objects(&[], &[simple_server("good", "good"), bad], &[]);
        let names: Vec<&str> = compiled
            .route_config
            .servers
            .iter()
            .map(|server| server.name.as_str())
            .collect();
        assert_eq!(names, ["good"], "{description}");
        let bad = report(&compiled.reports, ObjectKind::ModelServer, "bad");
        assert_rejected(bad, *reason, fragment, description);
        assert_eq!(
            (bad.ready_pods, bad.total_pods),
            (None, None),
            "{description}"
        );
    }
}

#[test]
fn an_empty_selector_is_rejected_rather_than_selecting_everything() {
    let bad = server(
        "metadata: { name: bad }\nspec:\n  inferenceEngine: vLLM\n  workloadSelector: { matchLabels: {} }\n  workloadPort: { port: 8000 }\n",
    );
    let pods = [pod("default", "p", "10.0.0.1", &[("app", "x")])];
    let compiled = compile_objects(&[], &[bad], &pods);
    assert!(compiled.route_config.servers.is_empty());
    assert!(compiled.scrape_targets.is_empty());
    let bad = report(&compiled.reports, ObjectKind::ModelServer, "bad");
    assert_eq!(bad.accepted.reason, Reason::InvalidSelector);
}

#[test]
fn several_problems_are_all_reported() {
    let bad = route(
        r#"
metadata: { name: bad }
spec:
  rules:
  - targetModels: [{ modelServerName: s, weight: 101 }]
  - targetModels: []
"#,
    );
    let compiled = compile_objects(&[bad], &[simple_server("s", "s")], &[]);
    let bad = report(&compiled.reports, ObjectKind::ModelRoute, "bad");
    assert_eq!(
        bad.accepted.reason,
        Reason::InvalidModelName,
        "the first problem names the reason"
    );
    assert_eq!(
        bad.accepted.message,
        "spec.modelName: must be set when spec.loraAdapters is empty; \
         spec.rules[0].targetModels[0].weight: 101 is above the maximum 100; \
         spec.rules[1].targetModels: at least one target is required"
    );
}

// --- references -----------------------------------------------------------------

#[test]
fn a_missing_server_drops_its_target_and_keeps_the_rest() {
    let routes = [route_to_m(
        r#"
  - targetModels:
    - { modelServerName: present, weight: 60 }
    - { modelServerName: missing, weight: 40 }
"#,
    )];
    let compiled = compile_objects(&routes, &[simple_server("present", "p")], &[]);
    assert_eq!(
        compiled.route_config.routes[0].rules[0].targets,
        vec![target("default/present", 60)]
    );
    let report = report(&compiled.reports, ObjectKind::ModelRoute, "r");
    assert!(report.accepted.status);
    assert!(report.in_snapshot);
    assert!(!report.resolved_refs.status);
    assert_eq!(report.resolved_refs.reason, Reason::BackendNotFound);
    assert_eq!(
        report.resolved_refs.message,
        "spec.rules[0].targetModels[1].modelServerName: ModelServer default/missing not found; target dropped"
    );
}

#[test]
fn a_rule_left_without_targets_is_dropped_so_requests_fall_through() {
    let routes = [route_to_m(
        r#"
  - name: canary
    modelMatch: { headers: { x-canary: { exact: "1" } } }
    targetModels: [{ modelServerName: missing }]
  - name: stable
    targetModels: [{ modelServerName: present }]
"#,
    )];
    let compiled = compile_objects(&routes, &[simple_server("present", "p")], &[]);
    assert_eq!(rule_names(&compiled), ["stable"]);
    let report = report(&compiled.reports, ObjectKind::ModelRoute, "r");
    assert_eq!(report.resolved_refs.reason, Reason::BackendNotFound);
    assert_mentions(
        &report.resolved_refs.message,
        "spec.rules[0]: no target with a weight above 0 is left; rule dropped",
    );
}

#[test]
fn a_rule_whose_weighted_targets_all_dropped_is_dropped() {
    let routes = [route_to_m(
        r#"
  - targetModels:
    - { modelServerName: missing, weight: 100 }
    - { modelServerName: present, weight: 0 }
  - name: fallback
    targetModels: [{ modelServerName: present }]
"#,
    )];
    let compiled = compile_objects(&routes, &[simple_server("present", "p")], &[]);
    assert_eq!(rule_names(&compiled), ["fallback"]);
}

#[test]
fn a_route_without_any_resolvable_rule_is_left_out() {
    let routes = [
        simple_route("orphan", "missing"),
        simple_route("fine", "present"),
    ];
    let compiled = compile_objects(&routes, &[simple_server("present", "p")], &[]);
    assert_eq!(route_names(&compiled), ["fine"]);
    let orphan = report(&compiled.reports, ObjectKind::ModelRoute, "orphan");
    assert!(orphan.accepted.status, "the route itself is valid");
    assert!(!orphan.resolved_refs.status);
    assert!(!orphan.in_snapshot);
    assert!(
        orphan
            .resolved_refs
            .message
            .ends_with("no rule has a resolvable target; the route is left out of the snapshot"),
        "{}",
        orphan.resolved_refs.message
    );
}

#[test]
fn a_target_on_a_rejected_server_is_dropped_and_says_so() {
    let bad_server = server(
        "metadata: { name: broken }\nspec:\n  inferenceEngine: vLLM\n  workloadSelector: { matchLabels: { app: b } }\n  workloadPort: { port: 0 }\n",
    );
    let compiled = compile_objects(&[simple_route("r", "broken")], &[bad_server], &[]);
    assert!(compiled.route_config.routes.is_empty());
    let report = report(&compiled.reports, ObjectKind::ModelRoute, "r");
    assert_mentions(
        &report.resolved_refs.message,
        "ModelServer default/broken was not accepted",
    );
}

#[test]
fn targets_resolve_in_the_routes_namespace_only() {
    let mut other = simple_server("s", "s");
    other.metadata.namespace = Some("other".into());
    let compiled = compile_objects(&[simple_route("r", "s")], &[other], &[]);
    assert!(compiled.route_config.routes.is_empty());
    let report = report(&compiled.reports, ObjectKind::ModelRoute, "r");
    assert_mentions(
        &report.resolved_refs.message,
        "ModelServer default/s not found",
    );
}

#[test]
fn provider_targets_resolve_to_ready_providers_only() {
    let routes = [route_to_m(
        r#"
  - targetModels:
    - { externalModelProviderName: openai, weight: 30 }
    - { externalModelProviderName: keyless }
    - { externalModelProviderName: gone }
    - { modelServerName: s }
"#,
    )];
    let providers: Vec<switchyard_crd::ExternalModelProvider> = [
        "metadata: { name: openai }\nspec: { baseURL: 'https://api.openai.com', auth: { secretRef: { name: k, key: v } } }\n",
        "metadata: { name: keyless }\nspec: { baseURL: 'https://llm.internal' }\n",
    ]
    .iter()
    .map(|yaml| serde_yaml::from_str(yaml).expect("provider"))
    .collect();
    let secrets = [CredentialSecret {
        namespace: "default".into(),
        name: "k".into(),
        data: [("v".to_owned(), b"sk-1".to_vec())].into(),
    }];
    let compiled_providers = compile_providers(&providers, &secrets, false);
    let compiled = compile_with_providers(
        &routes,
        &[simple_server("s", "s")],
        &[],
        &compiled_providers,
    );
    let provider_target = |key: &str, weight| pb::WeightedTarget {
        external_provider: key.to_owned(),
        weight,
        ..Default::default()
    };
    assert_eq!(
        compiled.route_config.routes[0].rules[0].targets,
        vec![
            provider_target("default/keyless", 100),
            target("default/s", 100)
        ],
        "openai is not Ready without TLS on the stream; gone does not exist"
    );
    let report = report(&compiled.reports, ObjectKind::ModelRoute, "r");
    assert!(report.accepted.status);
    assert_eq!(report.resolved_refs.reason, Reason::BackendNotFound);
    assert_mentions(
        &report.resolved_refs.message,
        "ExternalModelProvider default/openai is not Ready (InsecureSnapshotStream)",
    );
    assert_mentions(
        &report.resolved_refs.message,
        "ExternalModelProvider default/gone not found",
    );
    let compiled_providers = compile_providers(&providers, &secrets, true);
    let compiled = compile_with_providers(&routes, &[], &[], &compiled_providers);
    assert_eq!(
        compiled.route_config.routes[0].rules[0].targets[0],
        provider_target("default/openai", 30)
    );
}

#[test]
fn a_lora_route_cannot_target_a_provider() {
    let routes = [route(
        r#"
metadata: { name: r }
spec:
  loraAdapters: [sql-lora]
  rules:
  - targetModels:
    - { externalModelProviderName: openai }
"#,
    )];
    let compiled = compile_objects(&routes, &[], &[]);
    let report = report(&compiled.reports, ObjectKind::ModelRoute, "r");
    assert_eq!(report.accepted.reason, Reason::InvalidRules);
    assert_mentions(
        &report.accepted.message,
        "a route with loraAdapters cannot target an ExternalModelProvider",
    );
}

#[test]
fn duplicates_keep_the_first_object_read() {
    let first = simple_route("r", "s");
    let mut second = simple_route("r", "s");
    second.spec.model_name = Some("other-model".into());
    let server_copy = simple_server("s", "different-app");
    let compiled = compile_objects(
        &[first, second],
        &[simple_server("s", "s"), server_copy],
        &[],
    );
    assert_eq!(compiled.route_config.routes.len(), 1);
    assert_eq!(compiled.route_config.routes[0].model_name, "r");
    assert_eq!(compiled.route_config.servers.len(), 1);

    let route_reports: Vec<&ObjectReport> = compiled
        .reports
        .iter()
        .filter(|report| report.kind == ObjectKind::ModelRoute)
        .collect();
    assert_eq!(route_reports.len(), 2);
    assert!(route_reports[0].accepted.status);
    assert_eq!(route_reports[1].accepted.reason, Reason::Duplicate);
    assert_mentions(
        &route_reports[1].accepted.message,
        "another ModelRoute default/r came earlier",
    );
    let server_reports: Vec<&ObjectReport> = compiled
        .reports
        .iter()
        .filter(|report| report.kind == ObjectKind::ModelServer)
        .collect();
    assert_eq!(server_reports[1].accepted.reason, Reason::Duplicate);
}

// --- servers and pods --------------------------------------------------------------

#[test]
fn only_ready_selected_pods_in_the_namespace_become_endpoints() {
    let labels = [("app", "s")];
    let mut not_running = pod("default", "not-running", "10.0.0.2", &labels);
    if let Some(status) = not_running.status.as_mut() {
        status.phase = Some("Pending".into());
    }
    let mut not_ready = pod("default", "not-ready", "10.0.0.3", &labels);
    if let Some(status) = not_ready.status.as_mut() {
        status.conditions = Some(vec![PodCondition {
            type_: "Ready".into(),
            status: "False".into(),
            ..PodCondition::default()
        }]);
    }
    let mut no_ip = pod("default", "no-ip", "", &labels);
    if let Some(status) = no_ip.status.as_mut() {
        status.pod_ip = None;
    }
    let mut deleting = pod("default", "deleting", "10.0.0.4", &labels);
    deleting.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
    let mut no_status = pod("default", "no-status", "10.0.0.5", &labels);
    no_status.status = None;
    let pods = [
        pod("default", "zeta", "10.0.0.9", &labels),
        pod(
            "default",
            "alpha",
            "fd00::1",
            &[("app", "s"), ("extra", "label")],
        ),
        not_running,
        not_ready,
        no_ip,
        deleting,
        no_status,
        pod("other", "elsewhere", "10.0.0.6", &labels),
        pod("default", "unlabelled", "10.0.0.7", &[("app", "t")]),
    ];
    let compiled = compile_objects(&[], &[simple_server("s", "s")], &pods);
    assert_eq!(
        routing_only(compiled.route_config.clone()).servers[0].endpoints,
        vec![
            builders::pod("alpha", "fd00::1"),
            builders::pod("zeta", "10.0.0.9")
        ]
    );
    let report = report(&compiled.reports, ObjectKind::ModelServer, "s");
    assert_eq!((report.ready_pods, report.total_pods), (Some(2), Some(7)));
    assert!(report.resolved_refs.status);
    let addrs: Vec<String> = compiled
        .scrape_targets
        .iter()
        .map(|target| target.addr.to_string())
        .collect();
    assert_eq!(addrs, ["[fd00::1]:8000", "10.0.0.9:8000"]);
}

#[test]
fn a_server_without_pods_stays_in_the_snapshot_with_no_endpoints() {
    let compiled = compile_objects(&[simple_route("r", "s")], &[simple_server("s", "s")], &[]);
    assert_eq!(compiled.route_config.servers.len(), 1);
    assert!(compiled.route_config.servers[0].endpoints.is_empty());
    assert_eq!(
        compiled.route_config.routes.len(),
        1,
        "requests get a 503, not a 404"
    );
    let report = report(&compiled.reports, ObjectKind::ModelServer, "s");
    assert!(report.accepted.status);
    assert!(!report.resolved_refs.status);
    assert_eq!(report.resolved_refs.reason, Reason::NoMatchingPods);
    assert_mentions(
        &report.resolved_refs.message,
        "{app=s} selects no pod in namespace default",
    );
    assert_eq!((report.ready_pods, report.total_pods), (Some(0), Some(0)));
}

#[test]
fn traffic_policy_is_converted_to_milliseconds() {
    let cases: &[(&str, pb::TrafficPolicy)] = &[
        ("", pb::TrafficPolicy::default()),
        (
            "trafficPolicy: { timeout: 1m30s }",
            pb::TrafficPolicy {
                timeout_ms: 90_000,
                ..Default::default()
            },
        ),
        (
            "trafficPolicy: { retry: { attempts: 3 } }",
            pb::TrafficPolicy {
                timeout_ms: 0,
                retry_attempts: 3,
                retry_interval_ms: 100,
            },
        ),
        (
            "trafficPolicy: { timeout: 2s, retry: { attempts: 1, retryInterval: 250ms } }",
            pb::TrafficPolicy {
                timeout_ms: 2_000,
                retry_attempts: 1,
                retry_interval_ms: 250,
            },
        ),
    ];
    for (policy, expected) in cases {
        let server = server(&format!(
            "metadata: {{ name: s }}\nspec:\n  inferenceEngine: vLLM\n  workloadSelector: {{ matchLabels: {{ app: s }} }}\n  workloadPort: {{ port: 8000 }}\n  {policy}\n"
        ));
        let compiled = compile_objects(&[], &[server], &[]);
        assert_eq!(
            compiled.route_config.servers[0].traffic_policy.as_ref(),
            Some(expected),
            "{policy}"
        );
    }
}

#[test]
fn objects_without_namespace_are_in_default() {
    let mut route = simple_route("r", "s");
    route.metadata.namespace = None;
    let mut server = simple_server("s", "s");
    server.metadata.namespace = None;
    let mut pod = pod("default", "p", "10.0.0.1", &[("app", "s")]);
    pod.metadata.namespace = None;
    let compiled = compile_objects(&[route], &[server], &[pod]);
    assert_eq!(compiled.route_config.routes[0].namespace, "default");
    assert_eq!(
        compiled.route_config.routes[0].rules[0].targets[0].model_server,
        "default/s"
    );
    assert_eq!(compiled.route_config.servers[0].namespace, "default");
    assert_eq!(compiled.route_config.servers[0].endpoints.len(), 1);
    assert_eq!(compiled.scrape_targets[0].key, "default/p");
}

#[test]
fn routes_are_ordered_oldest_first_then_by_namespace_and_name() {
    let mut routes = vec![
        created_at(simple_route("newest", "s"), 300),
        simple_route("no-timestamp", "s"),
        created_at(simple_route("b-same-time", "s"), 200),
        created_at(simple_route("a-same-time", "s"), 200),
    ];
    routes[0].metadata.generation = Some(7);
    let compiled = compile_objects(&routes, &[simple_server("s", "s")], &[]);
    let order: Vec<(&str, i64, i64)> = compiled
        .route_config
        .routes
        .iter()
        .map(|route| {
            (
                route.name.as_str(),
                route.creation_timestamp_unix_ms,
                route.generation,
            )
        })
        .collect();
    assert_eq!(
        order,
        [
            ("no-timestamp", 0, 0),
            ("a-same-time", 200_000, 0),
            ("b-same-time", 200_000, 0),
            ("newest", 300_000, 7),
        ]
    );
    assert_eq!(
        report(&compiled.reports, ObjectKind::ModelRoute, "newest").generation,
        Some(7)
    );
}

#[test]
fn matches_and_rate_limits_are_carried_over() {
    let routes = [route(
        r#"
metadata: { name: r }
spec:
  modelName: m
  rateLimit: { inputTokensPerUnit: 10, outputTokensPerUnit: 20, unit: minute }
  rules:
  - modelMatch:
      uri: { prefix: /v1/chat }
      body: { model: m }
      headers: { x-any: {} }
    targetModels: [{ modelServerName: s }]
  - modelMatch: { headers: { x-any: {} } }
    targetModels: [{ modelServerName: s }]
"#,
    )];
    let compiled = compile_objects(&routes, &[simple_server("s", "s")], &[]);
    let route = &compiled.route_config.routes[0];
    assert_eq!(
        route.rate_limit,
        Some(pb::RateLimit {
            input_tokens_per_unit: 10,
            output_tokens_per_unit: 20,
            unit: "minute".into(),
            ..Default::default()
        })
    );
    assert_eq!(
        route.rules[0].r#match,
        Some(pb::ModelMatch {
            // A header condition that sets nothing holds for any value: dropped.
            headers: vec![],
            uri: Some(pb::StringMatch {
                kind: Some(pb::string_match::Kind::Prefix("/v1/chat".into())),
            }),
            body_model: exact("m"),
        })
    );
    assert_eq!(
        route.rules[1].r#match, None,
        "a match without conditions matches everything"
    );
}

// --- endpoint loads ----------------------------------------------------------------

fn load(waiting: f64, observed_at_unix_ms: i64) -> PodLoad {
    PodLoad {
        requests_waiting: waiting,
        requests_running: 2.0,
        kv_cache_usage: 0.5,
        ttft_seconds: 0.1,
        tpot_seconds: 0.01,
        models: vec!["lora-B".into(), "base".into(), "lora-B".into()],
        observed_at_unix_ms,
        kv_cache_capacity_tokens: 4096,
    }
}

#[test]
fn endpoint_loads_cover_snapshot_endpoints_with_a_load() {
    let (routes, servers, pods) = guide_inputs();
    let pod_loads: BTreeMap<PodKey, PodLoad> = [
        ("default/ds7-0".to_owned(), load(1.0, 1_000)),
        ("default/ds15-v1-0".to_owned(), load(f64::NAN, 2_000)),
        // Not an endpoint of any server in the snapshot: ignored.
        ("default/gone".to_owned(), load(9.0, 3_000)),
    ]
    .into_iter()
    .collect();
    let objects = ObjectSet {
        routes: routes.clone(),
        servers: servers.clone(),
        pods: pods.clone(),
        ..ObjectSet::default()
    };
    let scheduler = pb::SchedulerConfig {
        top_n: 3,
        ..Default::default()
    };
    let defaults = pb::OutlierDetection {
        consecutive_failures: Some(3),
        ..Default::default()
    };
    let for_7b = pb::OutlierDetection {
        max_ejection_percent: Some(100),
        ..Default::default()
    };
    let router = RouterConfig {
        scheduler: Some(scheduler.clone()),
        outlier_detection: OutlierConfig {
            defaults: Some(defaults),
            model_servers: [("default/deepseek-r1-7b".to_owned(), for_7b)].into(),
        },
        ..RouterConfig::default()
    };
    let reported = |until_unix_ms| ReportedEjection {
        until_unix_ms,
        reason: "5xx",
    };
    let ejections: ReportedEjections = [
        ("default/ds7-0".to_owned(), reported(100)),
        // Ended before the compile: left out.
        ("default/ds15-v1-0".to_owned(), reported(42)),
        // Not an endpoint of any server in the snapshot: left out.
        ("default/gone".to_owned(), reported(100)),
    ]
    .into();
    let compiled = compile(&CompileInput {
        objects: &objects,
        gateway_api: &GatewayApiConfig::disabled(),
        router: &router,
        jwks_keys: &[],
        pod_loads: &pod_loads,
        ejections: &ejections,
        now_unix_ms: 42,
        ship_credentials: false,
    });
    assert_eq!(compiled.generated_at_unix_ms, 42);
    // The router configuration's scheduler section and outlier detection
    // are shipped as they are, and the rest of the RouteConfig is what the
    // objects alone compile to.
    let objects_only = compile_route_config(&routes, &servers, &pods);
    assert_eq!(compiled.route_config.scheduler, Some(scheduler));
    assert_eq!(compiled.route_config.outlier_detection, Some(defaults));
    assert_eq!(
        compiled.route_config.routes,
        objects_only.route_config.routes
    );
    let mut servers_shipped = compiled.route_config.servers.clone();
    for server in &mut servers_shipped {
        let own = server.outlier_detection.take();
        assert_eq!(
            own,
            (server.name == "deepseek-r1-7b").then_some(for_7b),
            "{}",
            server.name
        );
    }
    assert_eq!(servers_shipped, objects_only.route_config.servers);
    assert_eq!(compiled.reports, objects_only.reports);
    assert_eq!(compiled.scrape_targets, objects_only.scrape_targets);
    let expected = |pod: &str, waiting: f64, observed_at_unix_ms: i64| pb::EndpointLoad {
        namespace: "default".into(),
        pod: pod.into(),
        requests_waiting: waiting,
        requests_running: 2.0,
        kv_cache_usage: 0.5,
        ttft_seconds: 0.1,
        tpot_seconds: 0.01,
        models: vec!["base".into(), "lora-B".into()],
        observed_at_unix_ms,
        kv_cache_capacity_tokens: 4096,
    };
    // ds15-v1-0 is an endpoint of two servers: listed once. It was scraped in
    // the latest pass (2000): its time is the set's; ds7-0's last success is older.
    assert_eq!(
        compiled.endpoint_loads,
        pb::EndpointLoads {
            loads: vec![expected("ds15-v1-0", 0.0, 0), expected("ds7-0", 1.0, 1_000)],
            observed_at_unix_ms: 2_000,
            ejections: vec![pb::PodEjection {
                until_unix_ms: 100,
                ..builders::ejection("ds7-0")
            }],
            ..Default::default()
        }
    );
}

#[test]
fn a_pass_is_dated_by_its_oldest_scrape_and_unchanged_pods_keep_their_entry() {
    let (routes, servers, pods) = guide_inputs();
    let compiled = compile_objects(&routes, &servers, &pods);
    let pass = |first: i64, second: i64| -> BTreeMap<PodKey, PodLoad> {
        [
            ("default/ds7-0".to_owned(), load(1.0, first)),
            ("default/ds15-v1-0".to_owned(), load(3.0, second)),
        ]
        .into_iter()
        .collect()
    };
    let earlier = compile_endpoint_loads(&compiled.route_config, &pass(10_000, 10_040));
    let later = compile_endpoint_loads(&compiled.route_config, &pass(11_010, 11_000));
    assert_eq!(earlier.observed_at_unix_ms, 10_000);
    assert_eq!(later.observed_at_unix_ms, 11_000);
    // Same values, new pass: only the set's time moved.
    assert_eq!(earlier.loads, later.loads);
    assert!(later.loads.iter().all(|load| load.observed_at_unix_ms == 0));
}

#[test]
fn endpoint_loads_are_empty_without_scrapes() {
    let (routes, servers, pods) = guide_inputs();
    let compiled = compile_objects(&routes, &servers, &pods);
    assert_eq!(
        compile_endpoint_loads(&compiled.route_config, &BTreeMap::new()),
        pb::EndpointLoads::default()
    );
}

#[test]
fn a_pod_selected_by_two_servers_is_scraped_once() {
    let servers = [simple_server("a", "shared"), simple_server("b", "shared")];
    let pods = [pod("default", "p", "10.0.0.1", &[("app", "shared")])];
    let compiled = compile_objects(&[], &servers, &pods);
    assert_eq!(compiled.route_config.servers.len(), 2);
    assert_eq!(compiled.scrape_targets.len(), 1);
    assert_eq!(compiled.scrape_targets[0].key, "default/p");
}

/// The router configuration's JWT settings and tiers, the fetched keys and
/// the API keys of the objects reach the snapshot; without any of them
/// authentication stays off.
#[test]
fn auth_and_tiers_are_compiled_into_the_route_config() {
    use crate::auth::ApiKeySecret;
    use crate::router_config::JwtSettings;
    let objects = ObjectSet {
        api_keys: vec![ApiKeySecret {
            namespace: "switchyard-system".into(),
            name: "alice".into(),
            key_sha256: [7; 32],
            user_id: "alice".into(),
            tier: Some("gold".into()),
        }],
        ..Default::default()
    };
    let tiers = vec![pb::TierRateLimit {
        tier: "gold".into(),
        limit: Some(pb::RateLimit {
            input_tokens_per_unit: 100,
            unit: "minute".into(),
            ..Default::default()
        }),
    }];
    let router = RouterConfig {
        auth: Some(JwtSettings {
            issuer: "https://issuer".into(),
            audiences: vec!["switchyard".into()],
            jwks_uri: None,
            tier_claim: "tier".into(),
        }),
        tiers: tiers.clone(),
        ..Default::default()
    };
    let keys = vec![r#"{"kid":"k1","kty":"RSA","n":"AQAB","e":"AQAB"}"#.to_owned()];
    let loads = BTreeMap::new();
    let compiled = compile(&CompileInput {
        objects: &objects,
        gateway_api: &GatewayApiConfig::disabled(),
        router: &router,
        jwks_keys: &keys,
        pod_loads: &loads,
        ejections: &ReportedEjections::new(),
        now_unix_ms: 1,
        ship_credentials: false,
    });
    let auth = compiled.route_config.auth.expect("auth on");
    assert_eq!(auth.api_keys.len(), 1);
    assert_eq!(auth.api_keys[0].key_sha256, vec![7; 32]);
    let jwt = auth.jwt.expect("JWT settings");
    assert_eq!(
        (jwt.issuer.as_str(), jwt.tier_claim.as_str(), jwt.jwks_keys),
        ("https://issuer", "tier", keys)
    );
    assert_eq!(compiled.route_config.tier_rate_limits, tiers);
    let off = compile(&CompileInput {
        objects: &ObjectSet::default(),
        gateway_api: &GatewayApiConfig::disabled(),
        router: &RouterConfig::default(),
        jwks_keys: &[],
        pod_loads: &loads,
        ejections: &ReportedEjections::new(),
        now_unix_ms: 1,
        ship_credentials: false,
    });
    assert_eq!(off.route_config.auth, None);
}

// --- addresses no request can go to, and settings that mean nothing

#[test]
fn ready_pods_with_unusable_ips_are_left_out_and_named() {
    let pods = [
        pod("default", "good", "10.0.0.1", &[("app", "a")]),
        pod("default", "zeros", "0.0.0.0", &[("app", "a")]),
        pod("default", "v6-zeros", "::", &[("app", "a")]),
        pod("default", "words", "not-an-ip", &[("app", "a")]),
        pod("default", "multicast", "224.0.0.1", &[("app", "a")]),
    ];
    let compiled = compile_objects(&[simple_route("m", "a")], &[simple_server("a", "a")], &pods);
    let endpoints: Vec<&str> = compiled.route_config.servers[0]
        .endpoints
        .iter()
        .map(|endpoint| endpoint.name.as_str())
        .collect();
    assert_eq!(endpoints, ["good"]);
    let report = report(&compiled.reports, ObjectKind::ModelServer, "a");
    assert!(report.in_snapshot, "the usable pods still serve");
    assert!(!report.resolved_refs.status);
    assert_eq!(report.resolved_refs.reason, Reason::InvalidPodIP);
    assert_eq!(
        report.resolved_refs.message,
        "1 of 5 selected pods ready; left out, Running and Ready but with no usable address: \
         multicast: status.podIP \"224.0.0.1\" is a multicast address; \
         v6-zeros: status.podIP \"::\" is the unspecified address; \
         words: status.podIP \"not-an-ip\" is not an IP address; \
         zeros: status.podIP \"0.0.0.0\" is the unspecified address"
    );
    assert_eq!(compiled.scrape_targets.len(), 1);
}

#[test]
fn matches_that_set_nothing_are_reported_as_ignored() {
    let empty_matches = route(
        r#"
metadata: { name: r, namespace: default }
spec:
  modelName: m
  rules:
  - name: default
    modelMatch:
      headers: { x-tier: {} }
      uri: {}
      body: {}
    targetModels:
    - modelServerName: a
"#,
    );
    let compiled = compile_objects(
        &[empty_matches],
        &[simple_server("a", "a")],
        &[pod("default", "p", "10.0.0.1", &[("app", "a")])],
    );
    let report = report(&compiled.reports, ObjectKind::ModelRoute, "r");
    assert!(report.is_healthy());
    let paths: Vec<&str> = report
        .ignored_fields
        .iter()
        .map(|field| field.path.as_str())
        .collect();
    assert_eq!(
        paths,
        [
            "spec.rules[0].modelMatch.headers[\"x-tier\"]",
            "spec.rules[0].modelMatch.uri",
            "spec.rules[0].modelMatch.body"
        ]
    );
    assert!(compiled.route_config.routes[0].rules[0].r#match.is_none());
}

#[test]
fn endpoints_carry_the_pods_node_start_time_and_labels_for_debug_dumps() {
    let mut scheduled = pod(
        "default",
        "p",
        "10.0.0.1",
        &[("app", "a"), ("version", "v1")],
    );
    scheduled.spec = Some(k8s_openapi::api::core::v1::PodSpec {
        node_name: Some("worker-node-1".into()),
        ..Default::default()
    });
    if let Some(status) = scheduled.status.as_mut() {
        status.start_time = Some(Time(
            Timestamp::from_second(1_705_312_800).expect("timestamp"),
        ));
    }
    let compiled = compile_objects(&[], &[simple_server("a", "a")], &[scheduled]);
    let endpoint = &compiled.route_config.servers[0].endpoints[0];
    assert_eq!(endpoint.node_name, "worker-node-1");
    assert_eq!(endpoint.start_time_unix_ms, 1_705_312_800_000);
    assert_eq!(
        endpoint.labels,
        [("app", "a"), ("version", "v1")]
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .into()
    );
}
