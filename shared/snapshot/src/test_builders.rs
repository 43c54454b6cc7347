//! Snapshot objects in one line each, for tests and benchmarks: a route, a rule, a
//! ModelServer, a pod. Behind the `test-support` feature, which only tests (as a
//! dev-dependency) and the benchmarks enable: the binaries' own builds do not carry it.
//!
//! Objects live in [`NAMESPACE`] unless an `_in` variant names another; a ModelServer is a vLLM
//! server on [`PORT`]. Set a field of the result for anything else:
//! `pb::ModelRoute { lora_adapters: vec!["a".into()], ..route("r", "m", "s") }`.

use crate::{object_key, pb};

/// Namespace of every object built here, unless an `_in` variant names another.
pub const NAMESPACE: &str = "default";
/// Port of every ModelServer built here: vLLM's default.
pub const PORT: u32 = 8000;
/// Weight of a route's only target: the API default.
pub const WEIGHT: u32 = 100;

/// A route for `model` whose one rule, `default`, sends everything to the ModelServer `server`.
pub fn route(name: &str, model: &str, server: &str) -> pb::ModelRoute {
    route_in(NAMESPACE, name, model, server)
}

/// [`route`] in `namespace` (the route and its ModelServer).
pub fn route_in(namespace: &str, name: &str, model: &str, server: &str) -> pb::ModelRoute {
    let only_rule = rule("default", None, &[(&object_key(namespace, server), WEIGHT)]);
    pb::ModelRoute {
        namespace: namespace.into(),
        ..route_with_rules(name, model, vec![only_rule])
    }
}

/// A route for `model` with these `rules`, in order.
pub fn route_with_rules(name: &str, model: &str, rules: Vec<pb::Rule>) -> pb::ModelRoute {
    pb::ModelRoute {
        namespace: NAMESPACE.into(),
        name: name.into(),
        model_name: model.into(),
        rules,
        ..Default::default()
    }
}

/// A rule `name` matching `matcher` (every request when `None`), splitting traffic over
/// `targets`: (`namespace/name` of a ModelServer, weight).
pub fn rule(name: &str, matcher: Option<pb::ModelMatch>, targets: &[(&str, u32)]) -> pb::Rule {
    let target = |&(server, weight): &(&str, u32)| pb::WeightedTarget {
        model_server: server.into(),
        weight,
        ..Default::default()
    };
    pb::Rule {
        name: name.into(),
        r#match: matcher,
        targets: targets.iter().map(target).collect(),
    }
}

/// A match on the header `name` equal to `value`.
pub fn header_exact(name: &str, value: &str) -> pb::ModelMatch {
    pb::ModelMatch {
        headers: vec![pb::HeaderMatch {
            name: name.into(),
            value: Some(pb::StringMatch {
                kind: Some(pb::string_match::Kind::Exact(value.into())),
            }),
        }],
        ..Default::default()
    }
}

/// A vLLM ModelServer on [`PORT`] with one pod per `(name, ip)`.
pub fn server(name: &str, pods: &[(&str, &str)]) -> pb::ModelServer {
    server_in(
        NAMESPACE,
        name,
        pods.iter()
            .map(|(pod_name, ip)| pod(pod_name, ip))
            .collect(),
    )
}

/// [`server`] in `namespace`, with `pods` built by the caller (e.g. a thousand of them).
pub fn server_in(namespace: &str, name: &str, pods: Vec<pb::Endpoint>) -> pb::ModelServer {
    pb::ModelServer {
        namespace: namespace.into(),
        name: name.into(),
        inference_engine: "vLLM".into(),
        port: PORT,
        endpoints: pods,
        ..Default::default()
    }
}

/// A pod of a ModelServer: its name and IP.
pub fn pod(name: &str, ip: &str) -> pb::Endpoint {
    pb::Endpoint {
        name: name.into(),
        ip: ip.into(),
        ..Default::default()
    }
}

/// InferencePool `default/<name>` of the endpoints (pod name, IP, target port).
pub fn inference_pool(name: &str, endpoints: &[(&str, &str, u32)]) -> pb::InferencePool {
    pb::InferencePool {
        namespace: "default".into(),
        name: name.into(),
        endpoints: endpoints
            .iter()
            .map(|(pod_name, ip, port)| pb::Endpoint {
                port: *port,
                ..pod(pod_name, ip)
            })
            .collect(),
        generation: 1,
    }
}

/// An ejection of the pod `default/<pod>` for 5xx answers, to be given its
/// `until_unix_ms` (the controller's) or `remaining_ms` (a dataplane's report).
pub fn ejection(pod: &str) -> pb::PodEjection {
    pb::PodEjection {
        namespace: "default".into(),
        pod: pod.into(),
        reason: "5xx".into(),
        ..Default::default()
    }
}

/// A prefill/decode group `name` of the pods named in `prefill` and `decode`.
pub fn pd_group(name: &str, prefill: &[&str], decode: &[&str]) -> pb::PdGroup {
    let names = |pods: &[&str]| pods.iter().map(|pod| (*pod).to_owned()).collect();
    pb::PdGroup {
        name: name.into(),
        prefill: names(prefill),
        decode: names(decode),
    }
}

/// A RouteConfig of `routes` and `servers`, with the default scheduler.
pub fn route_config(routes: Vec<pb::ModelRoute>, servers: Vec<pb::ModelServer>) -> pb::RouteConfig {
    pb::RouteConfig {
        routes,
        servers,
        ..Default::default()
    }
}

/// The smallest useful snapshot: the route `model` to the ModelServer `model` with the one pod
/// `model-0` at `ip`.
pub fn one_route(model: &str, ip: &str) -> pb::RouteConfig {
    let pod_name = format!("{model}-0");
    route_config(
        vec![route(model, model, model)],
        vec![server(model, &[(&pod_name, ip)])],
    )
}
