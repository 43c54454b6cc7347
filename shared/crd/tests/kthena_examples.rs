//! The Kthena example manifests must load into Switchyard's types unchanged, and the routes of
//! Kthena's routing guide must be among them (both in `testdata/kthena/`).
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::collections::BTreeMap;

use serde::Serialize;
use serde::de::DeserializeOwned;

use common::{ExampleDocument, kthena_example_documents, kthena_testdata};
use switchyard_crd::{
    InferenceEngine, ModelMatch, ModelRoute, ModelRouteSpec, ModelServer, RateLimitUnit, Rule,
    StringMatch, TargetModel,
};

/// The documents of `kind` in `documents`, by name, as `T`.
fn objects<T: DeserializeOwned>(documents: &[ExampleDocument], kind: &str) -> BTreeMap<String, T> {
    documents
        .iter()
        .filter(|doc| doc.kind == kind)
        .map(|doc| {
            let object = serde_json::from_value(doc.value.clone())
                .unwrap_or_else(|err| panic!("{} {kind} {}: {err}", doc.file, doc.name));
            (doc.name.clone(), object)
        })
        .collect()
}

fn routes(documents: &[ExampleDocument]) -> BTreeMap<String, ModelRoute> {
    objects(documents, "ModelRoute")
}

fn servers(documents: &[ExampleDocument]) -> BTreeMap<String, ModelServer> {
    objects(documents, "ModelServer")
}

/// Every `kind` document loads as `T` under a name no other one has, there
/// are at least `expected` of them, and each survives a serialise/deserialise
/// round trip unchanged.
fn assert_all_load_and_round_trip<T>(documents: &[ExampleDocument], kind: &str, expected: usize)
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    let loaded: BTreeMap<String, T> = objects(documents, kind);
    let count = documents.iter().filter(|doc| doc.kind == kind).count();
    assert_eq!(
        loaded.len(),
        count,
        "{kind} names must be unique across the examples"
    );
    assert!(
        count >= expected,
        "expected the {expected} Kthena example {kind}s, found {count}"
    );
    for (name, object) in &loaded {
        let again: T = serde_json::from_value(serde_json::to_value(object).unwrap()).unwrap();
        assert_eq!(
            &again, object,
            "{kind} {name} changed on a serialise/deserialise round trip"
        );
    }
}

#[test]
fn every_example_model_route_and_model_server_deserialises_and_round_trips() {
    let documents = kthena_example_documents();
    assert_all_load_and_round_trip::<ModelRoute>(&documents, "ModelRoute", 10);
    assert_all_load_and_round_trip::<ModelServer>(&documents, "ModelServer", 8);
}

#[test]
fn example_fields_land_in_the_right_rust_fields() {
    let documents = kthena_example_documents();
    let routes = routes(&documents);
    let servers = servers(&documents);

    let subset = &routes["deepseek-subset"].spec;
    assert_eq!(subset.model_name.as_deref(), Some("deepseek-subset"));
    let weights: Vec<(Option<&str>, u32)> = subset.rules[0]
        .target_models
        .iter()
        .map(|target| (target.model_server_name.as_deref(), target.weight))
        .collect();
    assert_eq!(
        weights,
        [
            (Some("deepseek-r1-1-5b-v1"), 70),
            (Some("deepseek-r1-1-5b-v2"), 30)
        ]
    );

    let lora = &routes["deepseek-lora"].spec;
    assert_eq!(lora.model_name, None);
    assert_eq!(lora.lora_adapters, ["lora-A", "lora-B"]);

    let premium = &routes["deepseek-multi-models"].spec.rules[0];
    assert_eq!(premium.name.as_deref(), Some("premium"));
    let header = &premium
        .model_match
        .as_ref()
        .unwrap()
        .headers
        .as_ref()
        .unwrap()["user-type"];
    assert_eq!(header.exact.as_deref(), Some("premium"));

    let limited = routes["deepseek-rate-limit"]
        .spec
        .rate_limit
        .as_ref()
        .unwrap();
    assert_eq!(limited.input_tokens_per_unit, Some(30));
    assert_eq!(limited.output_tokens_per_unit, Some(100));
    assert_eq!(limited.unit, RateLimitUnit::Minute);
    assert_eq!(limited.global, None);
    let global = routes["deepseek-global-rate-limit"]
        .spec
        .rate_limit
        .as_ref()
        .unwrap();
    assert_eq!(
        global
            .global
            .as_ref()
            .unwrap()
            .redis
            .as_ref()
            .unwrap()
            .address,
        "redis-server.kthena-system.svc.cluster.local:6379"
    );

    let parent = &routes["deepseek-binding-gateway"].spec.parent_refs[0];
    assert_eq!(parent.name, "default");
    assert_eq!(parent.namespace.as_deref(), Some("kthena-system"));
    assert_eq!(parent.kind.as_deref(), Some("Gateway"));

    let sglang = &servers["sglang-mock"].spec;
    assert_eq!(sglang.inference_engine, InferenceEngine::Sglang);
    assert_eq!(sglang.workload_port.port, 30000);
    assert_eq!(sglang.model.as_deref(), Some("Qwen/Qwen3-8B"));
    assert_eq!(
        sglang.traffic_policy.as_ref().unwrap().timeout.as_deref(),
        Some("10s")
    );

    let pd = &servers["deepseek-v2"].spec;
    assert_eq!(
        pd.kv_connector.as_ref().unwrap().connector_type.as_deref(),
        Some("nixl")
    );
    let group = pd.workload_selector.pd_group.as_ref().unwrap();
    assert_eq!(group.group_key, "modelserving.volcano.sh/group-name");
    assert_eq!(
        group.prefill_labels["modelserving.volcano.sh/role"],
        "prefill"
    );
    assert_eq!(
        group.decode_labels["modelserving.volcano.sh/role"],
        "decode"
    );
    assert_eq!(
        pd.workload_selector.match_labels["modelserving.volcano.sh/name"],
        "deepseek-v2-lite"
    );
}

#[test]
fn omitted_fields_take_the_api_defaults_on_deserialisation() {
    let documents = kthena_example_documents();

    // The examples omit weight and protocol almost everywhere; they must read as the defaults.
    let simple = &routes(&documents)["deepseek-simple"].spec;
    assert_eq!(simple.rules[0].target_models[0].weight, 100);
    let server = &servers(&documents)["deepseek-r1-1-5b"].spec;
    assert_eq!(server.workload_port.protocol, "http");
}

#[test]
fn defaults_apply_to_minimal_objects() {
    let route: ModelRouteSpec = serde_yaml::from_str(
        "modelName: m\nrules:\n- targetModels:\n  - modelServerName: s\nrateLimit:\n  inputTokensPerUnit: 5\n",
    )
    .unwrap();
    assert_eq!(
        route.rules[0].target_models[0].weight,
        switchyard_crd::model_route::DEFAULT_TARGET_WEIGHT
    );
    assert_eq!(route.rules[0].target_models[0].weight, 100);
    let rate_limit = route.rate_limit.unwrap();
    assert_eq!(rate_limit.unit, RateLimitUnit::Second);
    assert_eq!(rate_limit.unit.as_str(), "second");

    let server: switchyard_crd::ModelServerSpec = serde_yaml::from_str(
        "inferenceEngine: vLLM\nworkloadSelector:\n  matchLabels: {app: a}\nworkloadPort:\n  port: 8000\n\
         trafficPolicy:\n  retry:\n    attempts: 2\nkvConnector: {}\n",
    )
    .unwrap();
    assert_eq!(server.workload_port.protocol, "http");
    let retry = server.traffic_policy.unwrap().retry.unwrap();
    assert_eq!(retry.attempts, 2);
    assert_eq!(retry.retry_interval.as_deref(), Some("100ms"));
    assert_eq!(
        server.kv_connector.unwrap().connector_type.as_deref(),
        Some("http")
    );
}

#[test]
fn explicit_values_override_the_defaults() {
    let route: ModelRouteSpec = serde_yaml::from_str(
        "modelName: m\nrules:\n- targetModels:\n  - modelServerName: s\n    weight: 0\nrateLimit:\n  unit: month\n",
    )
    .unwrap();
    assert_eq!(route.rules[0].target_models[0].weight, 0);
    assert_eq!(route.rate_limit.unwrap().unit, RateLimitUnit::Month);

    let server: switchyard_crd::ModelServerSpec = serde_yaml::from_str(
        "inferenceEngine: SGLang\nworkloadSelector:\n  matchLabels: {app: a}\nworkloadPort:\n  port: 443\n  protocol: https\n",
    )
    .unwrap();
    assert_eq!(server.workload_port.protocol, "https");
    assert_eq!(server.inference_engine, InferenceEngine::Sglang);
}

#[test]
fn unknown_enum_values_are_rejected() {
    let engine = serde_yaml::from_str::<switchyard_crd::ModelServerSpec>(
        "inferenceEngine: vllm\nworkloadSelector: {}\nworkloadPort:\n  port: 8000\n",
    );
    // Engine names are case-sensitive, as in Kthena's API.
    let engine_error = engine.unwrap_err().to_string();
    assert!(
        engine_error.contains("unknown variant `vllm`"),
        "{engine_error}"
    );
    let unit = serde_yaml::from_str::<ModelRouteSpec>(
        "modelName: m\nrules:\n- targetModels:\n  - modelServerName: s\nrateLimit:\n  unit: week\n",
    );
    let unit_error = unit.unwrap_err().to_string();
    assert!(
        unit_error.contains("unknown variant `week`"),
        "{unit_error}"
    );
}

/// A ModelRoute of the routing guide (`testdata/kthena/router-routing-guide.txt`), read back
/// from its flattened YAML.
#[derive(Debug, Default)]
struct GuideRoute {
    name: String,
    spec: ModelRouteSpec,
}

/// The guide's YAML lost its indentation when the page was saved, so it cannot be parsed as
/// YAML; the key names are unambiguous enough to rebuild each route from its lines.
fn guide_routes(text: &str) -> Vec<GuideRoute> {
    let unquote = |value: &str| value.trim().trim_matches('"').to_owned();
    let mut routes = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim() != "kind: ModelRoute" {
            continue;
        }
        let mut route = GuideRoute::default();
        let mut header_name: Option<String> = None;
        // A route block ends at the first blank line after it.
        for line in lines.by_ref().take_while(|line| !line.trim().is_empty()) {
            let line = line.trim();
            let rule = route.spec.rules.last_mut();
            if let Some(value) = line.strip_prefix("- name:") {
                route.spec.rules.push(Rule {
                    name: Some(unquote(value)),
                    ..Rule::default()
                });
            } else if let Some(value) = line.strip_prefix("name:") {
                route.name = unquote(value);
            } else if let Some(value) = line.strip_prefix("modelName:") {
                route.spec.model_name = Some(unquote(value));
            } else if let Some(value) = line.strip_prefix("- modelServerName:") {
                let target = TargetModel {
                    model_server_name: Some(unquote(value)),
                    ..TargetModel::default()
                };
                rule.expect("target outside a rule")
                    .target_models
                    .push(TargetModel {
                        weight: 100,
                        ..target
                    });
            } else if let Some(value) = line.strip_prefix("weight:") {
                let target = rule
                    .and_then(|rule| rule.target_models.last_mut())
                    .expect("weight outside a target");
                target.weight = value.trim().parse().unwrap();
            } else if let Some(value) = line.strip_prefix("exact:") {
                let header = header_name.take().expect("exact outside a header");
                let headers = rule
                    .expect("match outside a rule")
                    .model_match
                    .get_or_insert_with(ModelMatch::default)
                    .headers
                    .get_or_insert_with(BTreeMap::new);
                headers.insert(
                    header,
                    StringMatch {
                        exact: Some(unquote(value)),
                        ..StringMatch::default()
                    },
                );
            } else if let Some(value) = line.strip_prefix("- ") {
                route.spec.lora_adapters.push(unquote(value));
            } else if let Some(key) = line.strip_suffix(':') {
                if !matches!(
                    key,
                    "metadata"
                        | "spec"
                        | "rules"
                        | "targetModels"
                        | "modelMatch"
                        | "headers"
                        | "loraAdapters"
                ) {
                    header_name = Some(key.to_owned());
                }
            } else if !line.starts_with("namespace:") {
                panic!("unexpected line in a guide route: {line:?}");
            }
        }
        routes.push(route);
    }
    routes
}

#[test]
fn the_routing_guide_routes_are_among_the_examples() {
    let guide_path = kthena_testdata().join("router-routing-guide.txt");
    let guide_text = std::fs::read_to_string(&guide_path)
        .unwrap_or_else(|err| panic!("{}: {err}", guide_path.display()));
    let guide = guide_routes(&guide_text);
    let names: Vec<&str> = guide.iter().map(|route| route.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "deepseek-simple",
            "deepseek-lora",
            "deepseek-subset",
            "deepseek-multi-models"
        ]
    );

    let examples = routes(&kthena_example_documents());
    for route in guide {
        let example = examples.get(&route.name).unwrap_or_else(|| {
            panic!(
                "guide route {} is not among the Kthena examples",
                route.name
            )
        });
        let mut expected = route.spec;
        if route.name == "deepseek-lora" {
            // The only divergence: the guide page sends the LoRA adapters to the 1.5B server,
            // the repository's ModelRouteLora.yaml to the 7B one. Pin both so a change shows up.
            let target = &mut expected.rules[0].target_models[0];
            assert_eq!(
                target.model_server_name.as_deref(),
                Some("deepseek-r1-1-5b")
            );
            target.model_server_name = Some("deepseek-r1-7b".to_owned());
        }
        assert_eq!(
            example.spec, expected,
            "guide route {} differs from the example",
            route.name
        );
    }
}
