//! The CRDs' CEL rules (`x-kubernetes-validations`) evaluated locally with kube-cel, the way
//! the API server evaluates them on create and update (schema defaults applied first).
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use common::{kthena_example_documents, open_api_schema};
use kube::core::cel::{
    ErrorKind, ScopeContext, Validator, WarningKind, analyze_rule, compile_schema,
};
use serde_json::{Value, json};
use switchyard_crd::{ExternalModelProvider, ModelRoute, ModelServer};

fn object(kind: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "networking.serving.volcano.sh/v1alpha1",
        "kind": kind,
        "metadata": {"name": "test", "namespace": "default"},
        "spec": spec,
    })
}

/// The failure messages of validating `spec` (as an update of `old_spec` when given).
fn failures(kind: &str, spec: Value, old_spec: Option<Value>) -> Vec<String> {
    let schema = match kind {
        "ModelRoute" => open_api_schema::<ModelRoute>(),
        "ModelServer" => open_api_schema::<ModelServer>(),
        "ExternalModelProvider" => open_api_schema::<ExternalModelProvider>(),
        other => panic!("no schema for {other}"),
    };
    let old = old_spec.map(|spec| object(kind, spec));
    match Validator::new().validate(&schema, &object(kind, spec), old.as_ref()) {
        Ok(()) => Vec::new(),
        Err(errors) => errors
            .into_vec()
            .into_iter()
            .map(|error| {
                assert_eq!(
                    error.kind,
                    ErrorKind::ValidationFailure,
                    "rule did not evaluate cleanly: {error}"
                );
                error.message
            })
            .collect(),
    }
}

fn route_failures(spec: Value) -> Vec<String> {
    failures("ModelRoute", spec, None)
}

fn server_failures(spec: Value) -> Vec<String> {
    failures("ModelServer", spec, None)
}

fn to(target: &str) -> Value {
    json!([{"targetModels": [{"modelServerName": target}]}])
}

const BOTH_EMPTY: &str = "ModelName and LoraAdapters cannot both be empty";
const EXACTLY_ONE_TARGET: &str =
    "exactly one of modelServerName and externalModelProviderName must be set";

#[test]
fn every_rule_compiles_and_fits_the_cost_budget() {
    for (kind, schema) in [
        ("ModelRoute", open_api_schema::<ModelRoute>()),
        ("ModelServer", open_api_schema::<ModelServer>()),
        (
            "ExternalModelProvider",
            open_api_schema::<ExternalModelProvider>(),
        ),
    ] {
        let compiled = compile_schema(&schema);
        let mut rule_count = 0;
        let mut pending = vec![&compiled];
        while let Some(node) = pending.pop() {
            for validation in &node.validations {
                let compiled_rule = validation
                    .as_ref()
                    .unwrap_or_else(|err| panic!("{kind}: {err:?}"));
                rule_count += 1;
                // Only the cost estimate is checked: the analyser's scope check does not know
                // comprehension variables (`r`, `t`) and flags them.
                let warnings =
                    analyze_rule(&compiled_rule.rule.rule, node, ScopeContext::CrdValidation);
                let costly: Vec<_> = warnings
                    .iter()
                    .filter(|warning| warning.kind == WarningKind::CostExceeded)
                    .collect();
                assert!(
                    costly.is_empty(),
                    "{kind} rule {:?}: {costly:?}",
                    compiled_rule.rule.rule
                );
            }
            pending.extend(node.properties.values());
            pending.extend(node.items.as_deref());
            pending.extend(node.additional_properties.as_deref());
        }
        let expected = match kind {
            "ModelRoute" => 5,
            "ModelServer" => 2,
            _ => 1,
        };
        assert_eq!(rule_count, expected, "{kind} rule count");
    }
}

#[test]
fn route_needs_a_model_name_or_lora_adapters() {
    assert_eq!(
        route_failures(json!({"modelName": "m", "rules": to("s")})),
        Vec::<String>::new()
    );
    assert_eq!(
        route_failures(json!({"loraAdapters": ["lora-A"], "rules": to("s")})),
        Vec::<String>::new()
    );
    assert_eq!(route_failures(json!({"rules": to("s")})), [BOTH_EMPTY]);
    assert_eq!(
        route_failures(json!({"modelName": "", "loraAdapters": [], "rules": to("s")})),
        [BOTH_EMPTY]
    );
}

#[test]
fn model_name_is_immutable() {
    let old = json!({"modelName": "a", "rules": to("s")});
    let renamed = failures(
        "ModelRoute",
        json!({"modelName": "b", "rules": to("s")}),
        Some(old.clone()),
    );
    assert_eq!(renamed, ["modelName is immutable"]);
    let retargeted = failures(
        "ModelRoute",
        json!({"modelName": "a", "rules": to("other")}),
        Some(old),
    );
    assert_eq!(
        retargeted,
        Vec::<String>::new(),
        "other fields stay mutable"
    );
}

#[test]
fn target_names_exactly_one_backend() {
    let with_target =
        |target: Value| json!({"modelName": "m", "rules": [{"targetModels": [target]}]});
    assert_eq!(
        route_failures(with_target(json!({"modelServerName": "s"}))),
        Vec::<String>::new()
    );
    assert_eq!(
        route_failures(with_target(json!({"externalModelProviderName": "p"}))),
        Vec::<String>::new()
    );
    assert_eq!(
        route_failures(with_target(
            json!({"modelServerName": "s", "externalModelProviderName": "p"})
        )),
        [EXACTLY_ONE_TARGET]
    );
    assert_eq!(
        route_failures(with_target(json!({"weight": 10}))),
        [EXACTLY_ONE_TARGET]
    );
    assert_eq!(
        route_failures(with_target(json!({"modelServerName": ""}))),
        [EXACTLY_ONE_TARGET]
    );
}

#[test]
fn lora_routes_cannot_target_external_providers() {
    let spec = json!({"loraAdapters": ["lora-A"], "rules": [{"targetModels": [{"externalModelProviderName": "p"}]}]});
    assert_eq!(
        route_failures(spec),
        ["a route with loraAdapters cannot target an ExternalModelProvider"]
    );
}

#[test]
fn a_rule_needs_a_positive_weight_but_defaults_count() {
    let rule = |targets: Value| json!({"modelName": "m", "rules": [{"targetModels": targets}]});
    assert_eq!(
        route_failures(rule(
            json!([{"modelServerName": "a", "weight": 0}, {"modelServerName": "b", "weight": 0}])
        )),
        ["the weights of a rule's targetModels must not all be 0"]
    );
    assert_eq!(
        route_failures(rule(
            json!([{"modelServerName": "a", "weight": 0}, {"modelServerName": "b", "weight": 1}])
        )),
        Vec::<String>::new()
    );
    // An omitted weight is defaulted to 100 before the rule runs.
    assert_eq!(
        route_failures(rule(
            json!([{"modelServerName": "a", "weight": 0}, {"modelServerName": "b"}])
        )),
        Vec::<String>::new()
    );
}

fn server_with_policy(policy: Value) -> Value {
    json!({
        "inferenceEngine": "vLLM",
        "workloadSelector": {"matchLabels": {"app": "a"}},
        "workloadPort": {"port": 8000},
        "trafficPolicy": policy,
    })
}

#[test]
fn traffic_policy_durations_must_parse() {
    for good in [
        "10s", "1m30s", "500ms", "0s", "0", "1.5s", ".5s", "250us", "1h",
    ] {
        assert_eq!(
            server_failures(server_with_policy(json!({"timeout": good}))),
            Vec::<String>::new(),
            "{good}"
        );
        assert!(
            switchyard_crd::parse_go_duration(good).is_ok(),
            "the rule and the parser disagree on {good}"
        );
    }
    for bad in ["10", "ten seconds", "-1s", "10 s", "1d", ""] {
        let messages = server_failures(server_with_policy(json!({"timeout": bad})));
        assert_eq!(messages.len(), 1, "{bad}: {messages:?}");
        assert!(
            messages[0].starts_with("timeout must be a non-negative Go duration"),
            "{bad}: {messages:?}"
        );
        assert!(
            switchyard_crd::parse_go_duration(bad).is_err(),
            "the rule and the parser disagree on {bad}"
        );
    }
    assert_eq!(
        server_failures(server_with_policy(json!({"retry": {"attempts": 3}}))),
        Vec::<String>::new()
    );
    let messages = server_failures(server_with_policy(
        json!({"retry": {"attempts": 3, "retryInterval": "soon"}}),
    ));
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert!(
        messages[0].starts_with("retryInterval must be a non-negative Go duration"),
        "{messages:?}"
    );
}

#[test]
fn every_kthena_example_passes_the_rules() {
    let mut checked = 0;
    for document in kthena_example_documents() {
        if document.kind != "ModelRoute" && document.kind != "ModelServer" {
            continue;
        }
        let spec = document.value["spec"].clone();
        assert_eq!(
            failures(&document.kind, spec, None),
            Vec::<String>::new(),
            "{} {}",
            document.file,
            document.name
        );
        checked += 1;
    }
    assert!(checked >= 18, "only {checked} examples checked");
}

#[test]
fn a_provider_credential_reference_cannot_be_optional() {
    let provider = |optional: Value| {
        failures(
            "ExternalModelProvider",
            json!({
                "baseURL": "https://api.openai.com/v1",
                "auth": {"secretRef": {"name": "s", "key": "k", "optional": optional}},
            }),
            None,
        )
    };
    assert_eq!(provider(json!(false)), Vec::<String>::new());
    assert_eq!(
        provider(json!(true)),
        ["auth.secretRef.optional must be false: a provider needs its credential"]
    );
}
