//! The checked-in CRD YAML matches the Rust types, and the generated schemas carry every
//! field constraint, default and merge strategy of the API.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::path::Path;

use common::open_api_schema;
use kube::CustomResourceExt;
use serde_json::{Value, json};
use switchyard_crd::{ExternalModelProvider, ModelRoute, ModelServer, crd_yaml};

/// Set to rewrite `crds/` from the tests when the `crdgen` binary cannot be built.
const UPDATE_ENV: &str = "SWITCHYARD_UPDATE_CRDS";

#[test]
fn checked_in_crd_yaml_is_up_to_date() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crds");
    let update = std::env::var_os(UPDATE_ENV).is_some();
    let mut stale = Vec::new();
    for manifest in crd_yaml().unwrap() {
        let path = dir.join(&manifest.file_name);
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        if checked_in == manifest.yaml {
            continue;
        }
        if update {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &manifest.yaml).unwrap();
        } else {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "CRD YAML is out of date with the Rust types: {}\nrun `make crds` \
         (or `{UPDATE_ENV}=1 cargo test -p switchyard-crd --test crd_manifests`) and commit the result",
        stale.join(", ")
    );
}

#[test]
fn manifests_are_named_after_the_crds_and_parse_back() {
    let manifests = crd_yaml().unwrap();
    let names: Vec<&str> = manifests
        .iter()
        .map(|manifest| manifest.file_name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "modelroutes.networking.serving.volcano.sh.yaml",
            "modelservers.networking.serving.volcano.sh.yaml",
            "externalmodelproviders.networking.serving.volcano.sh.yaml"
        ]
    );
    let stream = switchyard_crd::crd_yaml_stream().unwrap();
    let kinds: Vec<String> = serde_yaml::Deserializer::from_str(&stream)
        .map(|document| {
            let crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
                serde::Deserialize::deserialize(document).unwrap();
            crd.spec.names.kind
        })
        .collect();
    assert_eq!(
        kinds,
        ["ModelRoute", "ModelServer", "ExternalModelProvider"]
    );
}

/// The schema node at a `/`-separated path of property names below `spec` or `status`.
fn node<'a>(schema: &'a Value, path: &str) -> &'a Value {
    let mut current = schema;
    for segment in path.split('/') {
        current = if segment == "[]" {
            &current["items"]
        } else if segment == "{}" {
            &current["additionalProperties"]
        } else {
            &current["properties"][segment]
        };
        assert!(
            !current.is_null(),
            "no schema node {path} (stopped at {segment})"
        );
    }
    current
}

fn required(schema: &Value) -> Vec<&str> {
    schema["required"]
        .as_array()
        .map(|names| names.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn rules(schema: &Value) -> Vec<(&str, &str)> {
    schema["x-kubernetes-validations"]
        .as_array()
        .map(|rules| {
            rules
                .iter()
                .map(|rule| {
                    (
                        rule["rule"].as_str().unwrap(),
                        rule["message"].as_str().unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn model_route_schema_carries_the_api_constraints() {
    let schema = open_api_schema::<ModelRoute>();
    let spec = node(&schema, "spec");
    assert_eq!(required(spec), ["rules"]);
    let spec_rules = rules(spec);
    assert_eq!(
        spec_rules[0].1,
        "ModelName and LoraAdapters cannot both be empty"
    );
    assert!(
        spec_rules[0].0.contains("has(self.modelName)")
            && spec_rules[0].0.contains("has(self.loraAdapters)")
    );

    assert_eq!(
        rules(node(&schema, "spec/modelName")),
        [("self == oldSelf", "modelName is immutable")]
    );
    let lora = node(&schema, "spec/loraAdapters");
    assert_eq!(lora["maxItems"], 10);
    assert_eq!(lora["items"]["minLength"], 1);

    let route_rules = node(&schema, "spec/rules");
    assert_eq!(route_rules["maxItems"], 16);
    assert_eq!(required(&route_rules["items"]), ["targetModels"]);
    let targets = node(&schema, "spec/rules/[]/targetModels");
    assert_eq!(
        (targets["minItems"].clone(), targets["maxItems"].clone()),
        (json!(1), json!(16))
    );
    let target_rules = rules(&targets["items"]);
    assert_eq!(target_rules.len(), 1);
    assert!(
        target_rules[0].0.contains("modelServerName")
            && target_rules[0].0.contains("externalModelProviderName")
    );

    let weight = node(&schema, "spec/rules/[]/targetModels/[]/weight");
    assert_eq!(weight["default"], 100);
    assert_eq!(weight["minimum"], 0.0);
    assert_eq!(weight["maximum"], 100.0);

    let header = node(&schema, "spec/rules/[]/modelMatch/headers/{}");
    assert_eq!(node(header, "exact")["type"], "string");
    assert_eq!(
        node(&schema, "spec/rules/[]/modelMatch/body/model")["type"],
        "string"
    );

    assert_eq!(
        node(&schema, "spec/rateLimit/inputTokensPerUnit")["minimum"],
        1.0
    );
    assert_eq!(
        node(&schema, "spec/rateLimit/outputTokensPerUnit")["minimum"],
        1.0
    );
    let unit = node(&schema, "spec/rateLimit/unit");
    assert_eq!(
        unit["enum"],
        json!(["second", "minute", "hour", "day", "month"])
    );
    assert_eq!(unit["default"], "second");
    assert_eq!(
        required(node(&schema, "spec/rateLimit/global/redis")),
        ["address"]
    );
    assert_eq!(
        required(&node(&schema, "spec/parentRefs")["items"]),
        ["name"]
    );
}

#[test]
fn model_server_schema_carries_the_api_constraints() {
    let schema = open_api_schema::<ModelServer>();
    let spec = node(&schema, "spec");
    assert_eq!(
        required(spec),
        ["inferenceEngine", "workloadPort", "workloadSelector"]
    );
    assert_eq!(node(&schema, "spec/model")["maxLength"], 256);
    assert_eq!(
        node(&schema, "spec/inferenceEngine")["enum"],
        json!(["vLLM", "SGLang"])
    );

    let selector = node(&schema, "spec/workloadSelector");
    assert_eq!(selector["properties"]["matchLabels"]["minProperties"], 1);
    assert!(
        selector["properties"]["matchLabels"]
            .get("default")
            .is_none()
    );
    let pd_group = node(&schema, "spec/workloadSelector/pdGroup");
    assert_eq!(
        required(pd_group),
        ["decodeLabels", "groupKey", "prefillLabels"]
    );
    assert_eq!(node(pd_group, "prefillLabels")["minProperties"], 1);
    assert_eq!(node(pd_group, "decodeLabels")["minProperties"], 1);

    let port = node(&schema, "spec/workloadPort");
    assert_eq!(required(port), ["port"]);
    assert_eq!(
        (
            node(port, "port")["minimum"].clone(),
            node(port, "port")["maximum"].clone()
        ),
        (json!(1.0), json!(65535.0))
    );
    assert_eq!(node(port, "protocol")["enum"], json!(["http", "https"]));
    assert_eq!(node(port, "protocol")["default"], "http");

    let policy = node(&schema, "spec/trafficPolicy");
    assert_eq!(node(policy, "timeout")["type"], "string");
    assert!(
        node(policy, "timeout").get("default").is_none(),
        "timeout has no default in the API"
    );
    assert_eq!(node(policy, "retry/attempts")["type"], "integer");
    assert!(
        node(policy, "retry/attempts").get("default").is_none(),
        "attempts has no default in the API"
    );
    assert_eq!(node(policy, "retry/retryInterval")["default"], "100ms");
    for duration in ["timeout", "retry/retryInterval"] {
        assert_eq!(
            rules(node(policy, duration)).len(),
            1,
            "{duration} is checked to be a duration"
        );
    }

    let connector = node(&schema, "spec/kvConnector/type");
    assert_eq!(
        connector["enum"],
        json!(["http", "lmcache", "nixl", "mooncake"])
    );
    assert_eq!(connector["default"], "http");
}

#[test]
fn status_is_a_subresource_with_a_conditions_list_map() {
    for (kind, schema, crd) in [
        (
            "ModelRoute",
            open_api_schema::<ModelRoute>(),
            ModelRoute::crd(),
        ),
        (
            "ModelServer",
            open_api_schema::<ModelServer>(),
            ModelServer::crd(),
        ),
    ] {
        let version = &crd.spec.versions[0];
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{kind}"
        );
        assert_eq!(crd.spec.scope, "Namespaced", "{kind}");
        assert_eq!(crd.spec.group, "networking.serving.volcano.sh", "{kind}");
        assert_eq!(version.name, "v1alpha1", "{kind}");
        assert!(version.served && version.storage, "{kind}");

        let conditions = node(&schema, "status/conditions");
        assert_eq!(conditions["x-kubernetes-list-type"], "map", "{kind}");
        assert_eq!(
            conditions["x-kubernetes-list-map-keys"],
            json!(["type"]),
            "{kind}"
        );
        assert!(required(&conditions["items"]).contains(&"type"), "{kind}");
        assert_eq!(
            node(&schema, "status/observedGeneration")["type"],
            "integer",
            "{kind}"
        );
    }
    let server = open_api_schema::<ModelServer>();
    for field in ["readyPods", "totalPods"] {
        assert_eq!(node(&server, &format!("status/{field}"))["type"], "integer");
    }
    assert_eq!(
        node(&server, "status/lastScrapeTime")["format"],
        "date-time"
    );
}

#[test]
fn printer_columns_show_the_key_fields() {
    let columns = |crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition| {
        crd.spec.versions[0]
            .additional_printer_columns
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|column| (column.name, column.json_path))
            .collect::<Vec<_>>()
    };
    let pairs = |list: &[(&str, &str)]| {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        columns(ModelRoute::crd()),
        pairs(&[
            ("MODEL", ".spec.modelName"),
            (
                "ACCEPTED",
                r#".status.conditions[?(@.type=="Accepted")].status"#
            ),
            (
                "PROGRAMMED",
                r#".status.conditions[?(@.type=="Programmed")].status"#
            ),
            ("AGE", ".metadata.creationTimestamp"),
        ])
    );
    assert_eq!(
        columns(ModelServer::crd()),
        pairs(&[
            ("ENGINE", ".spec.inferenceEngine"),
            ("PORT", ".spec.workloadPort.port"),
            ("READY-PODS", ".status.readyPods"),
            ("AGE", ".metadata.creationTimestamp"),
        ])
    );
}

#[test]
fn external_model_provider_schema_carries_the_api_constraints() {
    let schema = open_api_schema::<ExternalModelProvider>();
    let spec = node(&schema, "spec");
    assert_eq!(required(spec), ["baseURL"]);
    let base_url = node(&schema, "spec/baseURL");
    assert_eq!(base_url["pattern"], "^https://.+");
    assert_eq!(base_url["minLength"], 1);
    assert_eq!(node(&schema, "spec/model")["maxLength"], 256);
    assert_eq!(
        node(&schema, "spec/providerType")["enum"],
        json!(["OpenAI", "Anthropic"])
    );
    assert_eq!(
        node(&schema, "spec/auth/scheme")["enum"],
        json!(["Bearer", "APIKey"])
    );
    assert_eq!(required(node(&schema, "spec/auth")), ["secretRef"]);
    assert_eq!(
        required(node(&schema, "spec/auth/secretRef")),
        ["key", "name"]
    );
    assert_eq!(
        node(&schema, "spec/headers/{}")["type"],
        "string",
        "static headers are a string map"
    );
    let crd = ExternalModelProvider::crd();
    let columns: Vec<String> = crd.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|column| column.name.clone())
        .collect();
    assert_eq!(columns, ["TYPE", "BASE-URL", "READY", "REASON", "AGE"]);
}
