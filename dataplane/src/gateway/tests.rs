use std::collections::HashMap;

use http::{HeaderMap, Method};
use switchyard_snapshot::pb;
use switchyard_snapshot::test_builders::{inference_pool as pool, route, route_config, server};

use super::http_routes::HttpRequestFacts;
use super::*;
use crate::rewrite::{PathRewrite, Rewrite};
use crate::snapshot::{RoutingTable, SnapshotError, SnapshotStore};

fn listener(name: &str, port: u32, hostname: &str) -> pb::GatewayListener {
    pb::GatewayListener {
        name: name.into(),
        port,
        hostname: hostname.into(),
    }
}

fn gateway(name: &str, listeners: Vec<pb::GatewayListener>) -> pb::Gateway {
    pb::Gateway {
        namespace: "gw".into(),
        name: name.into(),
        listeners,
    }
}

fn listener_ref(gateway: &str, listener: &str) -> pb::ListenerRef {
    pb::ListenerRef {
        gateway: format!("gw/{gateway}"),
        listener: listener.into(),
    }
}

fn prefix(value: &str) -> pb::HttpRouteMatch {
    pb::HttpRouteMatch {
        path: Some(pb::PathMatch {
            kind: Some(pb::path_match::Kind::Prefix(value.into())),
        }),
        ..pb::HttpRouteMatch::default()
    }
}

fn exact(value: &str) -> pb::HttpRouteMatch {
    pb::HttpRouteMatch {
        path: Some(pb::PathMatch {
            kind: Some(pb::path_match::Kind::Exact(value.into())),
        }),
        ..pb::HttpRouteMatch::default()
    }
}

fn to(pools: &[(&str, u32)]) -> Vec<pb::WeightedBackend> {
    pools
        .iter()
        .map(|(pool, weight)| pb::WeightedBackend {
            inference_pool: format!("default/{pool}"),
            weight: *weight,
        })
        .collect()
}

fn rule(matches: Vec<pb::HttpRouteMatch>, backends: Vec<pb::WeightedBackend>) -> pb::HttpRouteRule {
    pb::HttpRouteRule {
        matches,
        backends,
        ..pb::HttpRouteRule::default()
    }
}

fn http_route(
    name: &str,
    created: i64,
    hostnames: &[&str],
    rules: Vec<pb::HttpRouteRule>,
) -> pb::HttpRoute {
    pb::HttpRoute {
        namespace: "default".into(),
        name: name.into(),
        creation_timestamp_unix_ms: created,
        listeners: vec![listener_ref("public", "http")],
        hostnames: hostnames.iter().map(|h| (*h).to_owned()).collect(),
        rules,
    }
}

/// A default Gateway (served on the traffic port) and `public` on 9001
/// and 9002, three pools.
fn config(http_routes: Vec<pb::HttpRoute>) -> pb::RouteConfig {
    let mut config = route_config(
        vec![route("r", "m", "s")],
        vec![server("s", &[("p", "127.0.0.2")])],
    );
    config.gateways = vec![
        gateway("default", vec![listener("default", 8080, "")]),
        gateway(
            "public",
            vec![
                listener("exact", 9001, "api.example.com"),
                listener("http", 9001, ""),
                listener("wild", 9001, "*.example.com"),
                listener("other", 9002, ""),
            ],
        ),
    ];
    config.default_gateway = "gw/default".into();
    config.inference_pools = vec![
        pool("a", &[("a-0", "127.0.0.10", 8000)]),
        pool("b", &[("b-0", "127.0.0.11", 8000)]),
        pool(
            "two-ports",
            &[("t-0", "127.0.0.12", 8000), ("t-0", "127.0.0.12", 8001)],
        ),
    ];
    config.http_routes = http_routes;
    config
}

fn table(config: pb::RouteConfig) -> Arc<RoutingTable> {
    let store = SnapshotStore::new();
    store
        .apply_route_config("v1", config)
        .expect("valid snapshot");
    store.table().expect("table")
}

fn resolved(gateways: &Gateways, arrival: Arrival, host: &str) -> Option<String> {
    gateways.resolve(arrival, host).map(|id| {
        let listener = &gateways.listeners[id as usize];
        format!("{}/{}", listener.gateway, listener.name)
    })
}

#[test]
fn a_request_takes_the_listener_of_its_port_with_the_most_specific_hostname() {
    let table = table(config(Vec::new()));
    let gateways = &table.gateways;
    let on_9001 = |host| resolved(gateways, Arrival::ListenerPort(9001), host);
    assert_eq!(
        on_9001("api.example.com").as_deref(),
        Some("gw/public/exact")
    );
    assert_eq!(on_9001("x.example.com").as_deref(), Some("gw/public/wild"));
    assert_eq!(
        on_9001("a.b.example.com").as_deref(),
        Some("gw/public/wild")
    );
    assert_eq!(
        on_9001("example.com").as_deref(),
        Some("gw/public/http"),
        "a wildcard needs a label"
    );
    assert_eq!(on_9001("").as_deref(), Some("gw/public/http"));
    assert_eq!(
        resolved(gateways, Arrival::ListenerPort(9002), "api.example.com").as_deref(),
        Some("gw/public/other")
    );
    assert_eq!(resolved(gateways, Arrival::ListenerPort(9003), ""), None);
    // The default Gateway's listener is the traffic port's, whatever port it names.
    assert_eq!(
        resolved(gateways, Arrival::TrafficPort(7000), "api.example.com").as_deref(),
        Some("gw/default/default")
    );
    assert_eq!(gateways.ports(), [9001, 9002].into());
}

#[test]
fn the_request_host_is_lower_case_without_port() {
    let head = |host: &str| {
        let (parts, ()) = http::Request::builder()
            .uri("/v1/completions")
            .header(http::header::HOST, host)
            .body(())
            .expect("request")
            .into_parts();
        parts
    };
    assert_eq!(
        request_host(&head("API.Example.com:9001")),
        "api.example.com"
    );
    assert_eq!(request_host(&head("api.example.com.")), "api.example.com");
    assert_eq!(request_host(&head("[::1]")), "[::1]");
    let (absolute, ()) = http::Request::builder()
        .uri("http://Other.example.com:80/v1/completions")
        .body(())
        .expect("request")
        .into_parts();
    assert_eq!(request_host(&absolute), "other.example.com");
}

#[test]
fn model_routes_serve_only_the_listeners_they_are_bound_to() {
    let mut config = config(Vec::new());
    config.servers.push(server("s2", &[("p2", "127.0.0.3")]));
    let mut bound = route("bound", "m", "s2");
    bound.listeners = vec![listener_ref("public", "other")];
    config.routes.push(bound);
    let table = table(config);
    let headers = HeaderMap::new();
    let serve = |arrival: Arrival| {
        let facts = crate::routing::ArrivalFacts {
            on_traffic_port: matches!(arrival, Arrival::TrafficPort(_)),
            listener: table.gateways.resolve(arrival, ""),
        };
        table
            .index
            .lookup(&crate::routing::RequestFacts {
                model: "m",
                path: "/v1/completions",
                headers: &headers,
                arrival: facts,
            })
            .map(|decision| decision.server.key.clone())
    };
    assert_eq!(
        serve(Arrival::TrafficPort(8080)).as_deref(),
        Some("default/s")
    );
    assert_eq!(
        serve(Arrival::ListenerPort(9002)).as_deref(),
        Some("default/s2")
    );
    assert_eq!(
        serve(Arrival::ListenerPort(9001)),
        None,
        "no route of model m on that listener"
    );
}

fn pick(
    table: &RoutingTable,
    path: &str,
    host: &str,
    headers: &HeaderMap,
) -> Option<(String, usize, Option<String>)> {
    let listener = table.gateways.resolve(Arrival::ListenerPort(9001), "")?;
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    table
        .gateways
        .http_routes
        .lookup(&HttpRequestFacts {
            listener: Some(listener),
            host,
            method: &Method::POST,
            path,
            query,
            headers,
        })
        .map(|decision| {
            (
                decision.route.key.clone(),
                decision.rule_index,
                decision.pool.map(|pool| pool.key.clone()),
            )
        })
}

#[test]
fn http_route_precedence_follows_the_gateway_api() {
    let mut with_header = prefix("/v1");
    with_header.headers = vec![pb::HeaderMatch {
        name: "x-tier".into(),
        value: Some(pb::StringMatch {
            kind: Some(pb::string_match::Kind::Exact("gold".into())),
        }),
    }];
    let mut with_query = prefix("/v1");
    with_query.query_params = vec![pb::QueryParamMatch {
        name: "canary".into(),
        value: Some(pb::StringMatch {
            kind: Some(pb::string_match::Kind::Regex("yes|1".into())),
        }),
    }];
    let routes = vec![
        // Oldest: wins ties.
        http_route(
            "catch-all",
            1,
            &[],
            vec![rule(vec![prefix("/")], to(&[("a", 1)]))],
        ),
        http_route(
            "specific",
            2,
            &[],
            vec![
                rule(vec![prefix("/v1/chat")], to(&[("b", 1)])),
                rule(vec![exact("/v1/chat/completions")], to(&[("two-ports", 1)])),
                rule(vec![with_header], to(&[("b", 1)])),
                rule(vec![with_query], to(&[("b", 1)])),
            ],
        ),
        http_route(
            "by-host",
            3,
            &["*.example.com"],
            vec![rule(vec![prefix("/")], to(&[("b", 1)]))],
        ),
        http_route(
            "same-as-catch-all",
            4,
            &[],
            vec![rule(vec![prefix("/")], to(&[("b", 1)]))],
        ),
    ];
    let table = table(config(routes));
    let none = HeaderMap::new();
    let at = |path: &str, host: &str, headers: &HeaderMap| {
        pick(&table, path, host, headers).map(|(route, rule, _)| format!("{route}#{rule}"))
    };
    assert_eq!(
        at("/v1/chat/completions", "", &none).as_deref(),
        Some("default/specific#1"),
        "Exact first"
    );
    assert_eq!(
        at("/v1/chat/other", "", &none).as_deref(),
        Some("default/specific#0"),
        "then the longest prefix"
    );
    assert_eq!(
        at("/v1/chatter", "", &none).as_deref(),
        Some("default/catch-all#0"),
        "prefixes are whole path elements"
    );
    let mut gold = HeaderMap::new();
    gold.insert("x-tier", "gold".parse().expect("value"));
    assert_eq!(
        at("/v1/completions", "", &gold).as_deref(),
        Some("default/specific#2"),
        "more header matches"
    );
    assert_eq!(
        at("/v1/completions?canary=1", "", &none).as_deref(),
        Some("default/specific#3")
    );
    assert_eq!(
        at("/v1/completions?canary=10", "", &none).as_deref(),
        Some("default/catch-all#0"),
        "regexes match the whole value"
    );
    assert_eq!(
        at("/v1/completions", "", &none).as_deref(),
        Some("default/catch-all#0"),
        "the oldest of equals"
    );
    // A matching route hostname outranks every path precedence.
    assert_eq!(
        at("/v1/chat/completions", "x.example.com", &none).as_deref(),
        Some("default/by-host#0")
    );
}

#[test]
fn weighted_pools_skip_zero_and_a_rule_without_backends_has_no_pool() {
    let routes = vec![http_route(
        "weighted",
        1,
        &[],
        vec![
            rule(
                vec![prefix("/v1/chat")],
                to(&[("a", 3), ("b", 1), ("two-ports", 0)]),
            ),
            rule(vec![prefix("/v1/completions")], to(&[("a", 0)])),
        ],
    )];
    let table = table(config(routes));
    let headers = HeaderMap::new();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..400 {
        let (_, _, pool) = pick(&table, "/v1/chat/completions", "", &headers).expect("matched");
        *counts.entry(pool.expect("a pool")).or_default() += 1;
    }
    assert_eq!(counts.get("default/a"), Some(&300));
    assert_eq!(counts.get("default/b"), Some(&100));
    assert_eq!(counts.get("default/two-ports"), None);
    let (_, rule, pool) = pick(&table, "/v1/completions", "", &headers).expect("matched");
    assert_eq!((rule, pool), (1, None), "the proxy answers 500");
}

#[test]
fn a_pool_endpoint_per_target_port_shares_its_pods_load() {
    let store = SnapshotStore::new();
    store
        .apply_route_config("v1", config(Vec::new()))
        .expect("valid");
    store
        .apply_endpoint_loads(
            "l1",
            pb::EndpointLoads {
                loads: vec![pb::EndpointLoad {
                    namespace: "default".into(),
                    pod: "t-0".into(),
                    requests_waiting: 4.0,
                    ..pb::EndpointLoad::default()
                }],
                ..pb::EndpointLoads::default()
            },
        )
        .expect("loads");
    let table = store.table().expect("table");
    let pool = &table.gateways.pools["default/two-ports"];
    let endpoints: Vec<(String, String)> = pool
        .pods
        .iter()
        .map(|pod| (pod.key.clone(), pod.addr.to_string()))
        .collect();
    assert_eq!(
        endpoints,
        [
            ("default/t-0:8000".to_owned(), "127.0.0.12:8000".to_owned()),
            ("default/t-0:8001".to_owned(), "127.0.0.12:8001".to_owned())
        ]
    );
    for endpoint in &pool.pods {
        assert_eq!(endpoint.load().map(|load| load.requests_waiting), Some(4.0));
    }
}

#[test]
fn filters_rewrite_the_path_and_edit_headers() {
    let mut rewrite = Rewrite {
        path: Some(PathRewrite::Prefix {
            matched: "/api".into(),
            replacement: "/v1".into(),
        }),
        hostname: Some("engine.internal".parse().expect("value")),
        set: vec![(
            "x-set".parse().expect("name"),
            "new".parse().expect("value"),
        )],
        add: vec![("x-add".parse().expect("name"), "2".parse().expect("value"))],
        remove: vec!["x-secret".parse().expect("name")],
    };
    let mut headers = HeaderMap::new();
    headers.insert("x-set", "old".parse().expect("value"));
    headers.insert("x-add", "1".parse().expect("value"));
    headers.insert("x-secret", "s".parse().expect("value"));
    let mut path = http::uri::PathAndQuery::from_static("/api/chat/completions?x=1");
    rewrite.apply(&mut path, &mut headers);
    assert_eq!(path.as_str(), "/v1/chat/completions?x=1");
    assert_eq!(headers["x-set"], "new");
    assert_eq!(headers.get_all("x-add").iter().count(), 2);
    assert!(headers.get("x-secret").is_none());
    assert_eq!(headers[http::header::HOST], "engine.internal");

    rewrite.path = Some(PathRewrite::Full("/v1/completions".into()));
    let mut path = http::uri::PathAndQuery::from_static("/anything");
    rewrite.apply(&mut path, &mut headers);
    assert_eq!(path.as_str(), "/v1/completions");
    rewrite.path = Some(PathRewrite::Prefix {
        matched: "/v1/chat".into(),
        replacement: "/".into(),
    });
    let mut path = http::uri::PathAndQuery::from_static("/v1/chat/completions");
    rewrite.apply(&mut path, &mut headers);
    assert_eq!(path.as_str(), "/completions");
}

#[test]
fn a_snapshot_naming_a_missing_listener_or_pool_is_rejected() {
    let mut config = config(vec![http_route(
        "r",
        1,
        &[],
        vec![rule(vec![prefix("/")], to(&[("gone", 1)]))],
    )]);
    let store = SnapshotStore::new();
    let error = store
        .apply_route_config("v1", config.clone())
        .expect_err("dangling pool");
    assert!(
        error.to_string().contains("InferencePool default/gone"),
        "{error}"
    );
    config.http_routes.clear();
    config.routes[0].listeners = vec![listener_ref("public", "nope")];
    let error = store
        .apply_route_config("v1", config)
        .expect_err("dangling listener");
    assert!(
        matches!(error, SnapshotError::DanglingListener { .. }),
        "{error}"
    );
}
