use prometheus::Registry;
use serde_json::json;
use switchyard_runtime::clock;
use switchyard_snapshot::pb;
use switchyard_snapshot::test_builders::{pod, route, route_config, route_in, server, server_in};

use super::debug::{self, LookupError};
use super::*;

fn config() -> pb::RouteConfig {
    let mut config = route_config(
        vec![route("chat", "m", "a"), route("other", "n", "b")],
        vec![
            server("a", &[("a-0", "127.0.0.1"), ("a-1", "127.0.0.2")]),
            server("b", &[("b-0", "127.0.0.3")]),
        ],
    );
    config.servers[0].model = Some("org/m-7b".into());
    config
}

struct Fixture {
    store: SnapshotStore,
    registry: Registry,
    metrics: HealthMetrics,
}

/// `a-0` healthy with 3 requests waiting, `a-1` ejected with 2 waiting, `b-0`
/// never scraped.
fn fixture() -> Fixture {
    let store = SnapshotStore::new();
    store.apply_route_config("v1", config()).expect("valid");
    let load = |pod: &str, waiting: f64| pb::EndpointLoad {
        namespace: "default".into(),
        pod: pod.into(),
        requests_waiting: waiting,
        requests_running: 1.0,
        kv_cache_usage: 0.5,
        ..Default::default()
    };
    store
        .apply_endpoint_loads(
            "l1",
            pb::EndpointLoads {
                loads: vec![load("a-0", 3.0), load("a-1", 2.0)],
                observed_at_unix_ms: clock::unix_ms_now(),
                ..Default::default()
            },
        )
        .expect("loads");
    let table = store.table().expect("table");
    table.pods["default/a-1"]
        .health
        .eject_until(clock::now() + std::time::Duration::from_secs(60));
    let registry = Registry::new();
    let metrics = HealthMetrics::register(&registry).expect("register");
    metrics.resolve(&table);
    Fixture {
        store,
        registry,
        metrics,
    }
}

/// `name{labels...} value` lines of the registry.
fn exposition(registry: &Registry) -> String {
    prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .expect("encode")
}

fn value(registry: &Registry, series: &str) -> Option<f64> {
    exposition(registry)
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

#[test]
fn pods_are_healthy_only_when_ready_not_ejected_and_freshly_scraped() {
    let fixture = fixture();
    let table = fixture.store.table().expect("table");
    let judge = HealthJudge::new(&fixture.store, &table);
    let condition = |pod: &str| judge.pod(&table.pods[pod]).condition;
    assert_eq!(condition("default/a-0"), PodCondition::Healthy);
    assert_eq!(condition("default/a-1"), PodCondition::Ejected);
    assert_eq!(condition("default/b-0"), PodCondition::NoLoad);
    // A load older than maxLoadAge (5 s by default) is stale.
    fixture.store.scheduling().set_loads_observed_at(1);
    assert_eq!(condition("default/a-0"), PodCondition::StaleLoad);
}

#[test]
fn gauges_follow_the_table_and_the_pods() {
    let fixture = fixture();
    fixture.metrics.refresh(&fixture.store);
    let registry = &fixture.registry;
    let expected = [
        ("kthena_router_routes", 2.0),
        (
            r#"kthena_model_server_health_status{model_server="default/a",namespace="default"}"#,
            1.0,
        ),
        (
            r#"kthena_model_server_health_status{model_server="default/b",namespace="default"}"#,
            0.0,
        ),
        // spec.model when set, else the model of the route that targets it.
        (
            r#"kthena_model_server_queue_depth{model="org/m-7b",model_server="default/a"}"#,
            5.0,
        ),
        (
            r#"kthena_model_server_queue_depth{model="n",model_server="default/b"}"#,
            0.0,
        ),
        (
            r#"kthena_lb_target_health{model="org/m-7b",target="default/a-0"}"#,
            1.0,
        ),
        (
            r#"kthena_lb_target_health{model="org/m-7b",target="default/a-1"}"#,
            0.0,
        ),
        (
            r#"kthena_lb_target_health{model="n",target="default/b-0"}"#,
            0.0,
        ),
        (
            r#"kthena_lb_connection_pool_size{target="default/a-0"}"#,
            0.0,
        ),
    ];
    for (series, wanted) in expected {
        assert_eq!(value(registry, series), Some(wanted), "{series}");
    }

    // A server that leaves the snapshot leaves the gauges.
    let only_a = route_config(
        vec![route("chat", "m", "a")],
        vec![config().servers[0].clone()],
    );
    fixture
        .store
        .apply_route_config("v2", only_a)
        .expect("valid");
    fixture.metrics.refresh(&fixture.store);
    let text = exposition(registry);
    assert!(!text.contains("default/b"), "{text}");
    assert_eq!(value(registry, "kthena_router_routes"), Some(1.0));
}

#[test]
fn decisions_are_counted_per_model_and_target_and_follow_the_snapshot() {
    let fixture = fixture();
    let table = fixture.store.table().expect("table");
    let a0 = &table.pods["default/a-0"];
    for _ in 0..3 {
        fixture.metrics.count_decision("m", a0);
    }
    fixture.metrics.count_decision("not-routed", a0);
    let series = r#"kthena_lb_decisions_total{algorithm="least-request+gpu-usage+least-latency+prefix-cache",model="m",target="default/a-0"}"#;
    let text = exposition(&fixture.registry);
    assert_eq!(value(&fixture.registry, series), Some(3.0), "{text}");
    assert_eq!(
        text.matches("kthena_lb_decisions_total{").count(),
        1,
        "one series, created on first use: {text}"
    );
    assert_eq!(fixture.metrics.decisions_for(a0), 3);

    // Re-applied: the count carries over.
    fixture.metrics.resolve(&table);
    fixture.metrics.count_decision("m", a0);
    assert_eq!(value(&fixture.registry, series), Some(4.0));

    // The route leaves the snapshot: its series goes.
    fixture
        .store
        .apply_route_config(
            "v2",
            route_config(
                vec![route("other", "n", "b")],
                vec![config().servers[1].clone()],
            ),
        )
        .expect("valid");
    fixture
        .metrics
        .resolve(&fixture.store.table().expect("table"));
    assert!(!exposition(&fixture.registry).contains("kthena_lb_decisions_total{"));
}

#[test]
fn the_algorithm_label_names_the_weighted_score_plugins() {
    let mut config = config();
    config.scheduler = Some(pb::SchedulerConfig {
        scores: vec![
            pb::ScorePlugin {
                name: "least-request".into(),
                weight: 1,
            },
            pb::ScorePlugin {
                name: "prefix-cache".into(),
                weight: 0,
            },
        ],
        ..Default::default()
    });
    let store = SnapshotStore::new();
    store
        .apply_route_config("v", config.clone())
        .expect("valid");
    assert_eq!(algorithm(&store.table().expect("table")), "least-request");
    if let Some(scheduler) = config.scheduler.as_mut() {
        scheduler.scores[0].weight = 0;
    }
    store.apply_route_config("v2", config).expect("valid");
    assert_eq!(
        algorithm(&store.table().expect("table")),
        ROUND_ROBIN_ALGORITHM
    );
}

#[test]
fn debug_views_show_each_servers_health_and_pods() {
    let fixture = fixture();
    let store = &fixture.store;
    let servers = debug::model_servers(store).expect("view");
    assert_eq!(servers["version"], "v1");
    let a = &servers["modelServers"][0];
    assert_eq!(a["modelServer"], "default/a");
    assert_eq!(a["engine"], "vLLM");
    assert_eq!(a["model"], "org/m-7b");
    assert_eq!(a["healthy"], true);
    assert_eq!(
        a["pods"],
        json!({"total": 2, "healthy": 1, "ejected": 1, "staleLoad": 0, "noLoad": 0})
    );
    assert_eq!(a["queueDepth"], 5.0);
    assert_eq!(servers["modelServers"][1]["healthy"], false);

    let status = debug::status(store, &fixture.metrics, "a", None).expect("view");
    assert_eq!(status["healthStatus"], 1);
    assert_eq!(status["pods"][1]["condition"], "ejected");
    assert_eq!(status["pods"][1]["ejected"], true);
    assert!(status["pods"][0]["loadAgeMs"].is_number());
    let b = debug::status(store, &fixture.metrics, "b", Some("default")).expect("view");
    assert_eq!(b["pods"][0]["condition"], "no_load");
    assert!(
        b["reason"]
            .as_str()
            .is_some_and(|reason| reason.starts_with("0 of 1 pods healthy")),
        "{b}"
    );

    let metrics = debug::engine_metrics(store, "a", None).expect("view");
    assert_eq!(metrics["pods"][0]["requestsWaiting"], 3.0);
    assert_eq!(metrics["pods"][0]["kvCacheUsage"], 0.5);
    assert!(metrics["notAvailable"]["gpuUtilization"].is_string());
    assert!(metrics["notAvailable"]["gpuMemoryBytes"].is_string());
    let unscraped = debug::engine_metrics(store, "b", None).expect("view");
    assert_eq!(
        unscraped["pods"][0],
        json!({"pod": "b-0", "scraped": false})
    );

    let backends = debug::backends(store, &fixture.metrics).expect("view");
    let a = &backends["backends"][0];
    assert_eq!(
        a["routes"],
        json!([{"route": "default/chat", "rule": "default", "weight": 100}])
    );
    assert_eq!(a["targets"][0]["target"], "default/a-0");
    assert_eq!(a["targets"][0]["healthy"], true);
    assert_eq!(a["targets"][1]["condition"], "ejected");
}

#[test]
fn debug_views_name_what_they_cannot_find() {
    let store = SnapshotStore::new();
    assert_eq!(debug::model_servers(&store), Err(LookupError::NotReady));
    let twice = route_config(
        vec![route_in("x", "r", "m", "s"), route_in("y", "r", "m", "s")],
        vec![
            server_in("x", "s", vec![pod("p", "127.0.0.1")]),
            server_in("y", "s", vec![pod("q", "127.0.0.2")]),
        ],
    );
    store.apply_route_config("v", twice).expect("valid");
    assert_eq!(
        debug::engine_metrics(&store, "s", None),
        Err(LookupError::Ambiguous(
            "several ModelServers are named \"s\" (x/s, y/s): add ?namespace=NS".into()
        ))
    );
    let y = debug::engine_metrics(&store, "s", Some("y")).expect("view");
    assert_eq!(y["modelServer"], "y/s");
    assert_eq!(
        debug::engine_metrics(&store, "nope", None),
        Err(LookupError::NotFound(
            "no ModelServer named \"nope\" in the routing snapshot".into()
        ))
    );
}
