//! Compiling the Gateway API kinds: Kthena's examples, listeners and their
//! conflicts, route attachment, HTTPRoute rules and filters, InferencePools.

use switchyard_crd::test_builders::{kthena_example, ready_pod};
use switchyard_crd::{Gateway, HTTPRoute, InferencePool, ModelRoute, ModelServer};
use switchyard_snapshot::pb;

use super::super::providers::CompiledProviders;
use super::super::{CompiledRoutes, ObjectKind, ObjectSet, compile_objects};
use super::*;

fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
    serde_yaml::from_str(text).unwrap_or_else(|e| panic!("test YAML: {e}\n{text}"))
}

fn config() -> GatewayApiConfig {
    GatewayApiConfig {
        enabled: true,
        inference_extension: true,
        controller_name: DEFAULT_CONTROLLER_NAME.to_owned(),
        default_gateway: Some(("kthena-system".to_owned(), "default".to_owned())),
    }
}

/// `objects` with Switchyard's class `kthena-router` and the default Gateway added.
fn with_defaults(mut objects: ObjectSet) -> ObjectSet {
    GatewayDefaults::new(
        "kthena-router",
        DEFAULT_CONTROLLER_NAME,
        ("kthena-system", "default"),
        8080,
    )
    .add_missing(&mut objects);
    objects
}

fn compile(objects: &ObjectSet) -> CompiledRoutes {
    compile_objects(objects.view(), &config(), &CompiledProviders::default())
}

fn listener(gateway: &str, listener: &str) -> pb::ListenerRef {
    pb::ListenerRef {
        gateway: gateway.to_owned(),
        listener: listener.to_owned(),
    }
}

/// The report in `reports` that `is_it`; panics naming `what` when none is.
fn find_report<'a, R>(reports: &'a [R], what: &str, is_it: impl Fn(&R) -> bool) -> &'a R {
    reports
        .iter()
        .find(|report| is_it(report))
        .unwrap_or_else(|| panic!("no report for {what}"))
}

fn gateway_report<'a>(compiled: &'a CompiledRoutes, name: &str) -> &'a GatewayReport {
    let reports = &compiled.gateway_api.gateways;
    find_report(reports, &format!("Gateway {name}"), |r| r.name == name)
}

fn route_report<'a>(compiled: &'a CompiledRoutes, name: &str) -> &'a HttpRouteReport {
    let reports = &compiled.gateway_api.http_routes;
    find_report(reports, &format!("HTTPRoute {name}"), |r| r.name == name)
}

fn model_route_report<'a>(
    compiled: &'a CompiledRoutes,
    name: &str,
) -> &'a super::super::ObjectReport {
    find_report(&compiled.reports, &format!("ModelRoute {name}"), |r| {
        r.kind == ObjectKind::ModelRoute && r.name == name
    })
}

fn ds_pods() -> Vec<k8s_openapi::api::core::v1::Pod> {
    vec![
        ready_pod(
            "default",
            "ds-0",
            "10.0.0.1",
            &[("app", "deepseek-r1-1-5b")],
        ),
        ready_pod(
            "default",
            "ds-1",
            "10.0.0.2",
            &[("app", "deepseek-r1-1-5b")],
        ),
    ]
}

#[test]
fn kthena_gateway_examples_compile_as_published() {
    let objects = with_defaults(ObjectSet {
        routes: vec![
            kthena_example::<ModelRoute>("ModelRoute-binding-gateway.yaml"),
            kthena_example::<ModelRoute>("ModelRouteSimple.yaml"),
        ],
        servers: vec![kthena_example::<ModelServer>("ModelServer-ds1.5b.yaml")],
        pods: ds_pods(),
        gateways: vec![kthena_example::<Gateway>("Gateway.yaml")],
        http_routes: vec![kthena_example::<HTTPRoute>("HTTPRoute.yaml")],
        inference_pools: vec![kthena_example::<InferencePool>("InferencePool.yaml")],
        ..ObjectSet::default()
    });
    let compiled = compile(&objects);
    let config = &compiled.route_config;

    assert_eq!(config.default_gateway, "kthena-system/default");
    type Listeners = Vec<(String, u32, String)>;
    let gateways: Vec<(String, Listeners)> = config
        .gateways
        .iter()
        .map(|gateway| {
            (
                object_key(&gateway.namespace, &gateway.name),
                gateway
                    .listeners
                    .iter()
                    .map(|l| (l.name.clone(), l.port, l.hostname.clone()))
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        gateways,
        [
            (
                "kthena-system/default".to_owned(),
                vec![("default".to_owned(), 8080, String::new())]
            ),
            (
                "kthena-system/kthena-gateway".to_owned(),
                vec![("http".to_owned(), 8081, String::new())]
            ),
        ]
    );

    // The bound route serves on the default Gateway only; the simple route (no
    // parentRefs) on the default listener.
    let in_snapshot = |name: &str| find_report(&config.routes, name, |route| route.name == name);
    let bound = in_snapshot("deepseek-binding-gateway");
    assert_eq!(
        bound.listeners,
        [listener("kthena-system/default", "default")]
    );
    let simple = in_snapshot("deepseek-simple");
    assert!(simple.listeners.is_empty());
    assert!(model_route_report(&compiled, "deepseek-binding-gateway").is_healthy());

    // HTTPRoute.yaml: PathPrefix "/" to the pool, on the default Gateway.
    assert_eq!(config.http_routes.len(), 1);
    let route = &config.http_routes[0];
    assert_eq!(
        (route.namespace.as_str(), route.name.as_str()),
        ("default", "llm-route")
    );
    assert_eq!(
        route.listeners,
        [listener("kthena-system/default", "default")]
    );
    assert_eq!(route.rules.len(), 1);
    assert_eq!(
        route.rules[0].matches[0].path,
        Some(pb::PathMatch {
            kind: Some(pb::path_match::Kind::Prefix("/".to_owned()))
        })
    );
    assert_eq!(
        route.rules[0].backends,
        [pb::WeightedBackend {
            inference_pool: "default/deepseek-r1-1-5b".to_owned(),
            weight: 1
        }]
    );

    // InferencePool.yaml: each ready pod on port 8000.
    assert_eq!(config.inference_pools.len(), 1);
    let endpoints: Vec<(&str, &str, u32)> = config.inference_pools[0]
        .endpoints
        .iter()
        .map(|e| (e.name.as_str(), e.ip.as_str(), e.port))
        .collect();
    assert_eq!(
        endpoints,
        [("ds-0", "10.0.0.1", 8000), ("ds-1", "10.0.0.2", 8000)]
    );
    // The pods the ModelServer scrapes are not scraped twice for the pool.
    assert_eq!(compiled.scrape_targets.len(), 2);

    let reports = &compiled.gateway_api;
    assert_eq!(reports.gateway_classes.len(), 1);
    assert!(reports.gateway_classes[0].accepted.status);
    let default = gateway_report(&compiled, "default");
    assert!(default.accepted.status && default.in_snapshot);
    // The bound route, the simple route and the HTTPRoute.
    assert_eq!(default.listeners[0].attached_routes, 3);
    assert_eq!(
        gateway_report(&compiled, "kthena-gateway").listeners[0].attached_routes,
        0
    );
    let parents = &route_report(&compiled, "llm-route").parents;
    assert_eq!(parents.len(), 1);
    assert!(parents[0].accepted.status && parents[0].resolved_refs.status);
    assert_eq!(parents[0].partially_invalid, None);
    let pool = &reports.inference_pools[0];
    assert!(pool.accepted.status);
    assert!(
        pool.accepted
            .message
            .contains("endpointPickerRef is not called"),
        "{}",
        pool.accepted.message
    );
    assert_eq!(
        pool.parents,
        [PoolParentReport {
            gateway_namespace: "kthena-system".to_owned(),
            gateway_name: "default".to_owned(),
            routes: vec!["default/llm-route".to_owned()],
        }]
    );
}

const TWO_LISTENER_GATEWAY: &str = r#"
metadata: { name: edge, namespace: infra }
spec:
  gatewayClassName: kthena-router
  listeners:
  - name: same-only
    port: 9000
    protocol: HTTP
    hostname: "*.example.com"
  - name: everyone
    port: 9001
    protocol: HTTP
    allowedRoutes: { namespaces: { from: All } }
"#;

fn attach(route_namespace: &str, hostnames: &[&str], parent: &str) -> Attachment {
    let objects = with_defaults(ObjectSet {
        gateways: vec![yaml(TWO_LISTENER_GATEWAY)],
        ..ObjectSet::default()
    });
    let compiled = compile_gateways(&objects.gateway_classes, &objects.gateways, &config());
    let hostnames: Vec<String> = hostnames.iter().map(|h| (*h).to_owned()).collect();
    compiled.index.attach(
        route_namespace,
        RouteKind::HttpRoute,
        &hostnames,
        &yaml(parent),
    )
}

#[test]
fn parent_refs_attach_by_section_port_namespace_and_hostname() {
    let key = |listener: &str| ("infra/edge".to_owned(), listener.to_owned());
    // Same namespace: both listeners; the wildcard takes a subdomain.
    assert_eq!(
        attach("infra", &["a.example.com"], "{name: edge}"),
        Attachment::Attached(vec![key("same-only"), key("everyone")])
    );
    // Another namespace: only the listener that allows every namespace.
    assert_eq!(
        attach("team", &[], "{name: edge, namespace: infra}"),
        Attachment::Attached(vec![key("everyone")])
    );
    let rejected = |attachment: Attachment| match attachment {
        Attachment::Rejected(problem) => problem.reason,
        other => panic!("expected a rejection, got {other:?}"),
    };
    assert_eq!(
        rejected(attach(
            "team",
            &[],
            "{name: edge, namespace: infra, sectionName: same-only}"
        )),
        Reason::NotAllowedByListeners
    );
    assert_eq!(
        rejected(attach("infra", &[], "{name: edge, sectionName: missing}")),
        Reason::NoMatchingParent
    );
    assert_eq!(
        attach("infra", &[], "{name: edge, port: 9001}"),
        Attachment::Attached(vec![key("everyone")])
    );
    // A hostname the wildcard does not cover: only the hostname-less listener.
    assert_eq!(
        attach("infra", &["example.org"], "{name: edge}"),
        Attachment::Attached(vec![key("everyone")])
    );
    assert_eq!(
        rejected(attach(
            "infra",
            &["example.com"],
            "{name: edge, sectionName: same-only}"
        )),
        Reason::NoMatchingListenerHostname
    );
    // Not Switchyard's: a Gateway of no known class, or not a Gateway at all.
    assert_eq!(attach("infra", &[], "{name: other}"), Attachment::NotOurs);
    assert_eq!(
        attach("infra", &[], "{name: edge, kind: Service, group: \"\"}"),
        Attachment::NotOurs
    );
}

/// Gateway `infra/<name>` of `class`, created at `created`, with `listeners`
/// (YAML list items indented by two spaces).
fn infra_gateway(name: &str, class: &str, created: &str, listeners: &str) -> Gateway {
    yaml(&format!(
        "metadata: {{ name: {name}, namespace: infra, creationTimestamp: \"{created}\" }}\n\
         spec:\n  gatewayClassName: {class}\n  listeners:\n{listeners}\n"
    ))
}

#[test]
fn listeners_that_cannot_be_served_say_why_and_conflicts_go_to_the_younger() {
    let older = infra_gateway(
        "older",
        "kthena-router",
        "2026-01-01T00:00:00Z",
        "  - { name: web, port: 9000, protocol: HTTP, hostname: api.example.com }",
    );
    let younger = infra_gateway(
        "younger",
        "kthena-router",
        "2026-02-01T00:00:00Z",
        r#"
  - { name: web, port: 9000, protocol: HTTP, hostname: API.example.com }
  - { name: other-host, port: 9000, protocol: HTTP, hostname: "*.example.com" }
  - { name: tls, port: 9443, protocol: HTTPS }
  - { name: zero, port: 0, protocol: HTTP }
  - name: selector
    port: 9002
    protocol: HTTP
    allowedRoutes: { namespaces: { from: Selector } }
  - name: kinds
    port: 9003
    protocol: HTTP
    allowedRoutes: { kinds: [{ kind: GRPCRoute }, { kind: HTTPRoute }] }
"#,
    );
    let foreign = infra_gateway(
        "foreign",
        "envoy",
        "2026-01-01T00:00:00Z",
        "  - { name: web, port: 9000, protocol: HTTP }",
    );
    let objects = with_defaults(ObjectSet {
        gateways: vec![younger, older, foreign],
        ..ObjectSet::default()
    });
    let compiled = compile(&objects);
    assert!(
        compiled
            .gateway_api
            .gateways
            .iter()
            .all(|g| g.name != "foreign"),
        "another controller's Gateway is not reported"
    );
    let younger = gateway_report(&compiled, "younger");
    let by_name = |name: &str| {
        younger
            .listeners
            .iter()
            .find(|l| l.name == name)
            .unwrap_or_else(|| panic!("listener {name}"))
    };
    assert!(by_name("web").conflicted.status);
    assert_eq!(by_name("web").conflicted.reason, Reason::HostnameConflict);
    assert!(!by_name("web").in_snapshot);
    assert!(
        by_name("other-host").in_snapshot,
        "another hostname on the port is fine"
    );
    assert_eq!(by_name("tls").accepted.reason, Reason::UnsupportedProtocol);
    assert_eq!(by_name("zero").accepted.reason, Reason::PortUnavailable);
    assert_eq!(
        by_name("selector").accepted.reason,
        Reason::UnsupportedValue
    );
    let kinds = by_name("kinds");
    assert!(kinds.in_snapshot);
    assert_eq!(kinds.resolved_refs.reason, Reason::InvalidRouteKinds);
    assert_eq!(kinds.supported_kinds.len(), 1);
    assert_eq!(kinds.supported_kinds[0].kind, "HTTPRoute");
    // Some listeners serve: Accepted, with the reason saying not all do.
    assert!(younger.accepted.status);
    assert_eq!(younger.accepted.reason, Reason::ListenersNotValid);
    let served: Vec<&str> = compiled
        .route_config
        .gateways
        .iter()
        .find(|g| g.name == "younger")
        .expect("younger in the snapshot")
        .listeners
        .iter()
        .map(|l| l.name.as_str())
        .collect();
    assert_eq!(served, ["kinds", "other-host"]);
    assert!(gateway_report(&compiled, "older").listeners[0].in_snapshot);
}

const POOL: &str = r#"
metadata: { name: pool, namespace: default }
spec:
  selector: { matchLabels: { app: deepseek-r1-1-5b } }
  targetPorts: [{ number: 8001 }, { number: 8000 }]
"#;

fn route_objects(route: &str) -> ObjectSet {
    with_defaults(ObjectSet {
        pods: ds_pods(),
        http_routes: vec![yaml(route)],
        inference_pools: vec![yaml(POOL)],
        ..ObjectSet::default()
    })
}

#[test]
fn http_route_rules_keep_what_dataplanes_apply_and_drop_the_rest() {
    let compiled = compile(&route_objects(
        r#"
metadata: { name: mixed, namespace: default }
spec:
  parentRefs: [{ name: default, namespace: kthena-system }]
  hostnames: [LLM.example.com]
  rules:
  - name: chat
    matches:
    - path: { type: Exact, value: /v1/chat/completions }
      headers: [{ name: X-Tier, value: gold }, { name: x-tier, value: ignored }, { type: RegularExpression, name: x-team, value: "a|b" }]
      queryParams: [{ name: v, value: "2" }]
      method: POST
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{ name: X-Set, value: one }]
        add: [{ name: x-add, value: two }]
        remove: [X-Drop]
    - type: URLRewrite
      urlRewrite: { hostname: upstream.local, path: { type: ReplaceFullPath, replaceFullPath: /v1/completions } }
    backendRefs:
    - { group: inference.networking.k8s.io, kind: InferencePool, name: pool, weight: 3 }
    - { group: inference.networking.k8s.io, kind: InferencePool, name: missing }
    - { name: a-service, port: 80 }
  - name: redirect
    filters: [{ type: RequestRedirect }]
    backendRefs: [{ group: inference.networking.k8s.io, kind: InferencePool, name: pool }]
  - name: bad-rewrite
    matches: [{ path: { type: Exact, value: /exact } }]
    filters: [{ type: URLRewrite, urlRewrite: { path: { type: ReplacePrefixMatch, replacePrefixMatch: /v1 } } }]
  - name: prefix-rewrite
    matches: [{ path: { type: PathPrefix, value: /llm } }]
    filters: [{ type: URLRewrite, urlRewrite: { path: { type: ReplacePrefixMatch, replacePrefixMatch: /v1 } } }]
    timeouts: { request: 10s }
    backendRefs: [{ group: inference.networking.k8s.io, kind: InferencePool, name: pool, weight: 0 }]
"#,
    ));
    let route = &compiled.route_config.http_routes[0];
    assert_eq!(route.hostnames, ["llm.example.com"]);
    let kept: Vec<(u32, &str)> = route
        .rules
        .iter()
        .map(|r| (r.index, r.name.as_str()))
        .collect();
    assert_eq!(kept, [(0, "chat"), (3, "prefix-rewrite")]);

    let chat = &route.rules[0];
    let matcher = &chat.matches[0];
    assert_eq!(matcher.method, "POST");
    let headers: Vec<(&str, Option<&pb::string_match::Kind>)> = matcher
        .headers
        .iter()
        .map(|h| {
            (
                h.name.as_str(),
                h.value.as_ref().and_then(|v| v.kind.as_ref()),
            )
        })
        .collect();
    assert_eq!(
        headers,
        [
            (
                "x-tier",
                Some(&pb::string_match::Kind::Exact("gold".to_owned()))
            ),
            (
                "x-team",
                Some(&pb::string_match::Kind::Regex("a|b".to_owned()))
            ),
        ],
        "names lower case; of two matches on one name only the first counts"
    );
    assert_eq!(matcher.query_params[0].name, "v");
    let modifier = match &chat.filters[0].filter {
        Some(pb::http_filter::Filter::RequestHeaderModifier(modifier)) => modifier,
        other => panic!("{other:?}"),
    };
    assert_eq!(modifier.set[0].name, "x-set");
    assert_eq!(modifier.remove, ["x-drop"]);
    assert_eq!(
        chat.filters[1].filter,
        Some(pb::http_filter::Filter::UrlRewrite(pb::UrlRewrite {
            hostname: "upstream.local".to_owned(),
            path: Some(pb::url_rewrite::Path::ReplaceFullPath(
                "/v1/completions".to_owned()
            )),
        }))
    );
    assert_eq!(
        chat.backends,
        [pb::WeightedBackend {
            inference_pool: "default/pool".to_owned(),
            weight: 3
        }],
        "the missing pool and the Service are left out"
    );
    assert_eq!(
        route.rules[1].backends[0].weight, 0,
        "weight 0 stays: no traffic"
    );

    let parent = &route_report(&compiled, "mixed").parents[0];
    assert!(parent.accepted.status);
    assert!(
        parent
            .accepted
            .message
            .contains("spec.rules[3].timeouts is not applied"),
        "{}",
        parent.accepted.message
    );
    assert!(!parent.resolved_refs.status);
    assert_eq!(parent.resolved_refs.reason, Reason::BackendNotFound);
    assert!(
        parent
            .resolved_refs
            .message
            .contains("spec.rules[0].backendRefs[2]")
            && parent.resolved_refs.message.contains("not supported"),
        "{}",
        parent.resolved_refs.message
    );
    let partially = parent
        .partially_invalid
        .as_ref()
        .expect("rules were dropped");
    assert!(partially.status);
    assert!(
        partially.message.starts_with("Dropped Rule(s): ")
            && partially.message.contains(
                "spec.rules[1].filters[0]: filter type \"RequestRedirect\" is not supported"
            )
            && partially
                .message
                .contains("spec.rules[2].filters[0].urlRewrite.path: ReplacePrefixMatch"),
        "{}",
        partially.message
    );
    // The pool counts the route's Gateway as its parent.
    assert_eq!(compiled.gateway_api.inference_pools[0].parents.len(), 1);
}

#[test]
fn a_route_without_a_usable_rule_is_not_accepted_and_not_served() {
    let compiled = compile(&route_objects(
        r#"
metadata: { name: mirror-only, namespace: default }
spec:
  parentRefs: [{ name: default, namespace: kthena-system }]
  rules:
  - filters: [{ type: RequestMirror }]
"#,
    ));
    assert!(compiled.route_config.http_routes.is_empty());
    let parent = &route_report(&compiled, "mirror-only").parents[0];
    assert!(!parent.accepted.status);
    assert_eq!(parent.accepted.reason, Reason::UnsupportedValue);
    assert!(compiled.gateway_api.inference_pools[0].parents.is_empty());
}

#[test]
fn a_route_of_another_controller_is_not_reported() {
    let compiled = compile(&route_objects(
        "metadata: { name: theirs, namespace: default }\nspec:\n  parentRefs: [{ name: envoy-gw }]\n",
    ));
    assert!(compiled.route_config.http_routes.is_empty());
    assert!(compiled.gateway_api.http_routes.is_empty());
}

#[test]
fn a_pool_is_one_endpoint_per_ready_pod_and_target_port() {
    let compiled = compile(&route_objects(
        "metadata: { name: r, namespace: default }\nspec:\n  parentRefs: [{ name: default, namespace: kthena-system }]\n",
    ));
    let endpoints: Vec<(&str, u32)> = compiled.route_config.inference_pools[0]
        .endpoints
        .iter()
        .map(|e| (e.name.as_str(), e.port))
        .collect();
    assert_eq!(
        endpoints,
        [
            ("ds-0", 8000),
            ("ds-0", 8001),
            ("ds-1", 8000),
            ("ds-1", 8001)
        ]
    );
    // Scraped once per pod, on the first target port.
    let scraped: Vec<String> = compiled
        .scrape_targets
        .iter()
        .map(|t| format!("{} {}", t.key, t.addr))
        .collect();
    assert_eq!(
        scraped,
        ["default/ds-0 10.0.0.1:8001", "default/ds-1 10.0.0.2:8001"]
    );
    // A route without rules gets the API's default rule: every path, no backend.
    let route = &compiled.route_config.http_routes[0];
    assert_eq!(route.rules.len(), 1);
    assert!(route.rules[0].backends.is_empty());

    let invalid = |spec: &str| {
        let pool: InferencePool = yaml(&format!(
            "metadata: {{ name: bad, namespace: default }}\nspec:\n{spec}"
        ));
        let objects = ObjectSet {
            inference_pools: vec![pool],
            ..ObjectSet::default()
        };
        let compiled = compile(&objects);
        assert!(compiled.route_config.inference_pools.is_empty(), "{spec}");
        compiled.gateway_api.inference_pools[0].accepted.reason
    };
    assert_eq!(
        invalid("  selector: { matchLabels: { app: x } }\n  targetPorts: []\n"),
        Reason::InvalidPort
    );
    assert_eq!(
        invalid(
            "  selector: { matchLabels: { app: x } }\n  targetPorts: [{ number: 8000 }, { number: 8000 }]\n"
        ),
        Reason::InvalidPort
    );
    assert_eq!(
        invalid("  selector: { matchLabels: {} }\n  targetPorts: [{ number: 8000 }]\n"),
        Reason::InvalidSelector
    );
    assert_eq!(
        invalid(
            "  selector: { matchLabels: { app: x } }\n  targetPorts: [{ number: 8000 }]\n  appProtocol: kubernetes.io/h2c\n"
        ),
        Reason::UnsupportedProtocol
    );
}

#[test]
fn model_route_parent_refs_bind_it_to_listeners() {
    let gateway: Gateway = yaml(TWO_LISTENER_GATEWAY);
    let route = |name: &str, parents: &str| -> ModelRoute {
        yaml(&format!(
            "metadata: {{ name: {name}, namespace: infra }}\nspec:\n  modelName: m\n  parentRefs: {parents}\n  rules: [{{ targetModels: [{{ modelServerName: s }}] }}]\n"
        ))
    };
    let server: ModelServer = yaml(
        "metadata: { name: s, namespace: infra }\nspec:\n  workloadSelector: { matchLabels: { app: s } }\n  workloadPort: { port: 8000 }\n  inferenceEngine: vLLM\n",
    );
    let objects = with_defaults(ObjectSet {
        routes: vec![
            route("one-listener", "[{ name: edge, sectionName: everyone }]"),
            route("whole-gateway", "[{ name: edge }]"),
            route(
                "nowhere",
                "[{ name: edge, sectionName: nope }, { name: unknown }]",
            ),
        ],
        servers: vec![server],
        gateways: vec![gateway],
        ..ObjectSet::default()
    });
    let compiled = compile(&objects);
    let listeners = |name: &str| {
        compiled
            .route_config
            .routes
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.listeners.clone())
    };
    assert_eq!(
        listeners("one-listener"),
        Some(vec![listener("infra/edge", "everyone")])
    );
    assert_eq!(
        listeners("whole-gateway"),
        Some(vec![
            listener("infra/edge", "everyone"),
            listener("infra/edge", "same-only")
        ])
    );
    assert_eq!(listeners("nowhere"), None, "bound to no listener: left out");
    let report = model_route_report(&compiled, "nowhere");
    assert!(report.accepted.status && !report.in_snapshot);
    assert_eq!(report.resolved_refs.reason, Reason::NoMatchingParent);
    assert!(
        report.resolved_refs.message.contains(
            "spec.parentRefs[0]: Gateway infra/edge has no usable listener named \"nope\""
        ) && report.resolved_refs.message.contains(
            "spec.parentRefs[1]: gateway.networking.k8s.io/Gateway infra/unknown is not a Gateway"
        ),
        "{}",
        report.resolved_refs.message
    );
    assert_eq!(
        gateway_report(&compiled, "edge")
            .listeners
            .iter()
            .map(|l| (l.name.as_str(), l.attached_routes))
            .collect::<Vec<_>>(),
        [("same-only", 1), ("everyone", 2)]
    );

    // Gateway API mode off: a route with parentRefs serves on no listener.
    let off = compile_objects(
        objects.view(),
        &GatewayApiConfig::disabled(),
        &CompiledProviders::default(),
    );
    assert!(off.route_config.routes.is_empty());
    let report = model_route_report(&off, "one-listener");
    assert!(
        report
            .resolved_refs
            .message
            .contains("Gateway API mode is off"),
        "{}",
        report.resolved_refs.message
    );
    assert!(off.route_config.gateways.is_empty());
    let ignored: Vec<(&str, &str)> = off
        .gateway_api
        .ignored
        .iter()
        .map(|o| (o.kind, o.name.as_str()))
        .collect();
    assert_eq!(
        ignored,
        [
            ("GatewayClass", "kthena-router"),
            ("Gateway", "edge"),
            ("Gateway", "default")
        ]
    );
}
