//! The `/debug/config_dump/...` JSON views of a snapshot, shaped like the
//! Kthena router's (camelCase CRD field names, `{"modelroutes": [...]}`
//! lists), shared by the dataplane and the controller so both show the same.
//!
//! Only what the snapshot carries is shown, less the one secret it may
//! hold: a provider's credential is never part of a view (its scheme is),
//! and no request data is. Pods carry their node name, start time and
//! labels; one the controller did not know (a local file without
//! `spec.nodeName`) is left out rather than invented.

use serde_json::{Map, Value, json};

use crate::pb;

/// `phase` of every pod in a snapshot: the controller only puts ready,
/// running pods in it.
const SNAPSHOT_POD_PHASE: &str = "Running";

/// `GET /debug/config_dump/modelroutes`.
pub fn modelroutes(config: &pb::RouteConfig) -> Value {
    json!({"modelroutes": config.routes.iter().map(modelroute).collect::<Vec<_>>()})
}

/// `GET /debug/config_dump/modelservers`.
pub fn modelservers(config: &pb::RouteConfig) -> Value {
    json!({"modelservers": config.servers.iter().map(modelserver).collect::<Vec<_>>()})
}

/// `GET /debug/config_dump/pods`: every pod of the snapshot with its latest load.
pub fn pods<'a>(
    config: &pb::RouteConfig,
    load_of: impl Fn(&str, &str) -> Option<&'a pb::EndpointLoad>,
) -> Value {
    let mut keys: Vec<(&str, &str)> = config
        .servers
        .iter()
        .flat_map(|server| {
            server
                .endpoints
                .iter()
                .map(|endpoint| (server.namespace.as_str(), endpoint.name.as_str()))
        })
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let pods: Vec<Value> = keys
        .into_iter()
        .filter_map(|(namespace, name)| pod(config, namespace, name, load_of(namespace, name)))
        .collect();
    json!({"pods": pods})
}

/// `GET /debug/config_dump/namespaces/{ns}/modelroutes/{name}`.
pub fn find_modelroute(config: &pb::RouteConfig, namespace: &str, name: &str) -> Option<Value> {
    config
        .routes
        .iter()
        .find(|route| route.namespace == namespace && route.name == name)
        .map(modelroute)
}

/// `GET /debug/config_dump/namespaces/{ns}/modelservers/{name}`.
pub fn find_modelserver(config: &pb::RouteConfig, namespace: &str, name: &str) -> Option<Value> {
    config
        .servers
        .iter()
        .find(|server| server.namespace == namespace && server.name == name)
        .map(modelserver)
}

/// One pod of the snapshot, or None when no ModelServer has it.
pub fn pod(
    config: &pb::RouteConfig,
    namespace: &str,
    name: &str,
    load: Option<&pb::EndpointLoad>,
) -> Option<Value> {
    let mut servers = config
        .servers
        .iter()
        .filter(|server| server.namespace == namespace)
        .filter_map(|server| {
            server
                .endpoints
                .iter()
                .find(|endpoint| endpoint.name == name)
                .map(|endpoint| (server, endpoint))
        })
        .peekable();
    let (first_server, endpoint) = *servers.peek()?;
    let model_servers: Vec<String> = servers
        .map(|(server, _)| crate::object_key(&server.namespace, &server.name))
        .collect();
    let metrics = load.map_or(Value::Null, |load| {
        json!({
            "gpuCacheUsage": load.kv_cache_usage,
            "requestWaitingNum": load.requests_waiting,
            "requestRunningNum": load.requests_running,
            "tpot": load.tpot_seconds,
            "ttft": load.ttft_seconds,
        })
    });
    let models: Vec<&str> = load.map_or_else(Vec::new, |load| {
        load.models.iter().map(String::as_str).collect()
    });
    Some(json!({
        "name": name,
        "namespace": namespace,
        "podInfo": pod_info(endpoint, first_server.port),
        "engine": first_server.inference_engine,
        "metrics": metrics,
        "models": models,
        "modelServers": model_servers,
    }))
}

/// `podInfo`: what the snapshot carries about the pod; a node name or start
/// time the controller did not know is left out rather than invented.
fn pod_info(endpoint: &pb::Endpoint, port: u32) -> Value {
    let mut info = Map::new();
    info.insert("podIP".into(), json!(endpoint.ip));
    info.insert("port".into(), json!(port));
    if !endpoint.node_name.is_empty() {
        info.insert("nodeName".into(), json!(endpoint.node_name));
    }
    info.insert("phase".into(), json!(SNAPSHOT_POD_PHASE));
    if let Some(start) = rfc3339_ms(endpoint.start_time_unix_ms) {
        info.insert("startTime".into(), json!(start));
    }
    info.insert("labels".into(), json!(endpoint.labels));
    info.into()
}

/// RFC 3339 in UTC, whole seconds, as Kubernetes writes `startTime`.
fn rfc3339_ms(unix_ms: i64) -> Option<String> {
    let millis = u64::try_from(unix_ms).ok().filter(|ms| *ms > 0)?;
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(millis);
    Some(humantime::format_rfc3339_seconds(time).to_string())
}

fn modelroute(route: &pb::ModelRoute) -> Value {
    let mut spec = Map::new();
    if !route.model_name.is_empty() {
        spec.insert("modelName".into(), json!(route.model_name));
    }
    if !route.lora_adapters.is_empty() {
        spec.insert("loraAdapters".into(), json!(route.lora_adapters));
    }
    spec.insert(
        "rules".into(),
        route.rules.iter().map(rule).collect::<Vec<_>>().into(),
    );
    if let Some(limit) = &route.rate_limit {
        spec.insert("rateLimit".into(), rate_limit(limit));
    }
    json!({
        "name": route.name,
        "namespace": route.namespace,
        "spec": spec,
    })
}

/// The admission queue's settings, with the router configuration's field names.
pub fn fairness(config: &pb::FairnessConfig) -> Value {
    let policy = match config.policy() {
        pb::FairnessPolicy::Vtc => "vtc",
        pb::FairnessPolicy::SessionBoost => "sessionBoost",
    };
    json!({
        "policy": policy,
        "windowSizeMs": config.window_ms,
        "inputTokenWeight": config.input_token_weight,
        "outputTokenWeight": config.output_token_weight,
        "maxConcurrent": config.max_concurrent_per_pod,
        "queueTimeoutMs": config.queue_timeout_ms,
        "maxQueueLength": config.max_queue_length,
        "maxUserQueueLength": config.max_user_queue_length,
        "userHeader": config.user_header,
        "maxMetricUsers": config.max_metric_users,
        "tierWeights": config.tier_weights.iter().map(|tier| (tier.tier.clone(), json!(tier.weight))).collect::<Map<String, Value>>(),
        "sessionHeader": config.session_header,
        "maxSessions": config.max_sessions,
    })
}

/// `GET /debug/config_dump/externalmodelproviders`.
pub fn externalmodelproviders(config: &pb::RouteConfig) -> Value {
    json!({"externalmodelproviders": config.external_providers.iter().map(external_provider).collect::<Vec<_>>()})
}

/// An ExternalModelProvider in the CRD's shape; of its credential only the
/// scheme is shown.
pub fn external_provider(provider: &pb::ExternalProvider) -> Value {
    let provider_type = match provider.provider_type() {
        pb::ProviderType::Openai => "OpenAI",
        pb::ProviderType::Anthropic => "Anthropic",
    };
    let headers: Map<String, Value> = provider
        .headers
        .iter()
        .map(|header| (header.name.clone(), json!(header.value)))
        .collect();
    json!({
        "name": provider.name,
        "namespace": provider.namespace,
        "providerType": provider_type,
        "model": provider.model,
        "baseURL": provider.base_url,
        "insecureSkipVerify": provider.insecure_skip_verify,
        "auth": provider.credential.as_ref().map(|credential| json!({
            "scheme": match credential.scheme() {
                pb::CredentialScheme::Bearer => "Bearer",
                pb::CredentialScheme::ApiKey => "APIKey",
            },
            "credential": "<redacted>",
        })),
        "headers": headers,
    })
}

/// A `rateLimit` in the CRD's shape (a budget of 0 is one the route does not set).
pub fn rate_limit(limit: &pb::RateLimit) -> Value {
    let mut value = Map::new();
    if limit.input_tokens_per_unit > 0 {
        value.insert(
            "inputTokensPerUnit".into(),
            json!(limit.input_tokens_per_unit),
        );
    }
    if limit.output_tokens_per_unit > 0 {
        value.insert(
            "outputTokensPerUnit".into(),
            json!(limit.output_tokens_per_unit),
        );
    }
    value.insert("unit".into(), json!(limit.unit));
    if !limit.global_redis_address.is_empty() {
        let failure_mode = if limit.redis_failure_policy == pb::RedisFailurePolicy::FailClose as i32
        {
            "FailClose"
        } else {
            "FailOpen"
        };
        value.insert(
            "global".into(),
            json!({"redis": {"address": limit.global_redis_address}, "failureMode": failure_mode}),
        );
    }
    Value::Object(value)
}

fn rule(rule: &pb::Rule) -> Value {
    let mut value = Map::new();
    value.insert("name".into(), json!(rule.name));
    if let Some(model_match) = &rule.r#match {
        let mut matched = Map::new();
        if !model_match.headers.is_empty() {
            let headers: Map<String, Value> = model_match
                .headers
                .iter()
                .map(|header| (header.name.clone(), string_match(header.value.as_ref())))
                .collect();
            matched.insert("headers".into(), headers.into());
        }
        if let Some(uri) = &model_match.uri {
            matched.insert("uri".into(), string_match(Some(uri)));
        }
        if let Some(model) = &model_match.body_model {
            // The CRD's `body.model` is a plain string: an exact match.
            let model = match &model.kind {
                Some(pb::string_match::Kind::Exact(exact)) => json!(exact),
                _ => string_match(Some(model)),
            };
            matched.insert("body".into(), json!({"model": model}));
        }
        value.insert("modelMatch".into(), matched.into());
    }
    value.insert(
        "targetModels".into(),
        rule.targets
            .iter()
            .map(|target| {
                let (field, key) = if target.external_provider.is_empty() {
                    ("modelServer", &target.model_server)
                } else {
                    ("externalModelProvider", &target.external_provider)
                };
                let (namespace, name) = key.split_once('/').unwrap_or(("", key.as_str()));
                json!({
                    field: {"name": name, "namespace": namespace},
                    "weight": target.weight,
                })
            })
            .collect::<Vec<_>>()
            .into(),
    );
    value.into()
}

/// A header, URI or model match: `{"exact"|"prefix"|"regex": value}`, or null.
pub fn string_match(value: Option<&pb::StringMatch>) -> Value {
    use pb::string_match::Kind;
    match value.and_then(|value| value.kind.as_ref()) {
        None => Value::Null,
        Some(Kind::Exact(value)) => json!({"exact": value}),
        Some(Kind::Prefix(value)) => json!({"prefix": value}),
        Some(Kind::Regex(value)) => json!({"regex": value}),
    }
}

fn modelserver(server: &pb::ModelServer) -> Value {
    let mut spec = Map::new();
    if let Some(model) = &server.model {
        spec.insert("model".into(), json!(model));
    }
    spec.insert("inferenceEngine".into(), json!(server.inference_engine));
    spec.insert("workloadPort".into(), json!({"port": server.port}));
    if let Some(policy) = &server.traffic_policy {
        let mut traffic = Map::new();
        if policy.timeout_ms > 0 {
            traffic.insert("timeout".into(), json!(format!("{}ms", policy.timeout_ms)));
        }
        traffic.insert(
            "retry".into(),
            json!({
                "attempts": policy.retry_attempts,
                "retryInterval": format!("{}ms", policy.retry_interval_ms),
            }),
        );
        spec.insert("trafficPolicy".into(), traffic.into());
    }
    let mut value = json!({
        "name": server.name,
        "namespace": server.namespace,
        "spec": spec,
        "pods": server.endpoints.iter().map(|endpoint| json!({
            "name": endpoint.name,
            "podIP": endpoint.ip,
        })).collect::<Vec<_>>(),
    });
    if let Some(pd) = &server.prefill_decode {
        // As Kthena lists them: `namespace/name` of each role's pods.
        let role = |pods: fn(&pb::PdGroup) -> &Vec<String>| {
            pd.groups
                .iter()
                .flat_map(|group| pods(group).iter())
                .map(|pod| crate::object_key(&server.namespace, pod))
                .collect::<Vec<_>>()
        };
        let connector = pd.kv_connector().as_str_name();
        let connector = connector.strip_prefix("KV_CONNECTOR_").unwrap_or(connector);
        value["spec"]["kvConnector"] = json!({"type": connector.to_ascii_lowercase()});
        value["spec"]["workloadSelector"] = json!({"pdGroup": {"groupKey": pd.group_label}});
        value["prefillPods"] = role(|group| &group.prefill).into();
        value["decodePods"] = role(|group| &group.decode).into();
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_builders::{header_exact, pd_group, route, route_config, rule, server};

    fn config() -> pb::RouteConfig {
        let premium_llama = pb::ModelMatch {
            body_model: Some(pb::StringMatch {
                kind: Some(pb::string_match::Kind::Exact("llama2-7b".into())),
            }),
            ..header_exact("user-type", "premium")
        };
        route_config(
            vec![pb::ModelRoute {
                lora_adapters: vec!["lora-adapter-1".into()],
                rules: vec![rule(
                    "default-rule",
                    Some(premium_llama),
                    &[("default/llama2-server", 100)],
                )],
                rate_limit: Some(pb::RateLimit {
                    input_tokens_per_unit: 1000,
                    output_tokens_per_unit: 500,
                    unit: "second".into(),
                    ..Default::default()
                }),
                ..route("llama2-route", "llama2-7b", "llama2-server")
            }],
            vec![pb::ModelServer {
                model: Some("meta/llama2".into()),
                ..server("llama2-server", &[("llama2-0", "10.244.2.20")])
            }],
        )
    }

    #[test]
    fn modelroutes_have_the_kthena_shape() {
        let dump = modelroutes(&config());
        let route = &dump["modelroutes"][0];
        assert_eq!(route["name"], "llama2-route");
        assert_eq!(route["namespace"], "default");
        assert_eq!(route["spec"]["modelName"], "llama2-7b");
        assert_eq!(route["spec"]["loraAdapters"], json!(["lora-adapter-1"]));
        let rule = &route["spec"]["rules"][0];
        assert_eq!(rule["modelMatch"]["body"]["model"], "llama2-7b");
        assert_eq!(
            rule["modelMatch"]["headers"]["user-type"],
            json!({"exact": "premium"})
        );
        assert_eq!(
            rule["targetModels"][0],
            json!({"modelServer": {"name": "llama2-server", "namespace": "default"}, "weight": 100})
        );
        assert_eq!(route["spec"]["rateLimit"]["inputTokensPerUnit"], 1000);
    }

    #[test]
    fn pods_carry_metrics_models_and_servers() {
        let load = pb::EndpointLoad {
            namespace: "default".into(),
            pod: "llama2-0".into(),
            requests_waiting: 3.0,
            requests_running: 2.0,
            kv_cache_usage: 0.75,
            ttft_seconds: 1.2,
            tpot_seconds: 0.045,
            models: vec!["llama2-7b".into(), "lora-adapter-1".into()],
            observed_at_unix_ms: 1,
            ..Default::default()
        };
        let mut config = config();
        let endpoint = &mut config.servers[0].endpoints[0];
        endpoint.node_name = "worker-node-1".into();
        endpoint.start_time_unix_ms = 1_705_312_800_000;
        endpoint.labels = [("app", "llama2"), ("version", "v1")]
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .into();
        let dump = pods(&config, |_, _| Some(&load));
        let pod = &dump["pods"][0];
        assert_eq!(pod["name"], "llama2-0");
        assert_eq!(
            pod["podInfo"],
            json!({
                "podIP": "10.244.2.20",
                "port": 8000,
                "nodeName": "worker-node-1",
                "phase": "Running",
                "startTime": "2024-01-15T10:00:00Z",
                "labels": {"app": "llama2", "version": "v1"},
            })
        );
        assert_eq!(pod["engine"], "vLLM");
        assert_eq!(
            pod["metrics"],
            json!({"gpuCacheUsage": 0.75, "requestWaitingNum": 3.0, "requestRunningNum": 2.0, "tpot": 0.045, "ttft": 1.2})
        );
        assert_eq!(pod["models"], json!(["llama2-7b", "lora-adapter-1"]));
        assert_eq!(pod["modelServers"], json!(["default/llama2-server"]));
        assert!(self::pod(&config, "default", "missing", None).is_none());
        assert!(find_modelserver(&config, "default", "llama2-server").is_some());
        assert!(find_modelroute(&config, "other", "llama2-route").is_none());
    }

    #[test]
    fn prefill_decode_servers_list_their_pods_by_role() {
        let mut config = config();
        config.servers[0].prefill_decode = Some(pb::PrefillDecode {
            kv_connector: pb::KvConnector::Nixl.into(),
            group_label: "modelserving.volcano.sh/group-name".into(),
            groups: vec![pd_group("group-0", &["p-0"], &["d-0", "d-1"])],
        });
        let dump = modelservers(&config);
        let server = &dump["modelservers"][0];
        assert_eq!(server["prefillPods"], json!(["default/p-0"]));
        assert_eq!(server["decodePods"], json!(["default/d-0", "default/d-1"]));
        assert_eq!(server["spec"]["kvConnector"], json!({"type": "nixl"}));
        assert_eq!(
            server["spec"]["workloadSelector"]["pdGroup"]["groupKey"],
            "modelserving.volcano.sh/group-name"
        );
        let plain = modelservers(&self::config());
        assert!(plain["modelservers"][0].get("prefillPods").is_none());
    }
}
