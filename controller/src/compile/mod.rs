//! The pure core: ModelRoutes, ModelServers, ExternalModelProviders, Pods,
//! Secrets (and in Gateway API mode GatewayClasses, Gateways, HTTPRoutes and
//! InferencePools), the router configuration and scraped engine load in, a
//! routing snapshot and one report per object out.
//! The controller publishes exactly what [`compile`] returns; on a scrape or
//! a dataplane's outlier report it reruns only [`compile_endpoint_loads`]
//! and [`compile_ejections`], the parts that depend on them.
//!
//! No I/O and no clock reads (the time is an input), and every list in the
//! output is built in a canonical order, so equal inputs give byte-identical
//! protobuf encodings and therefore the same `content_version` on every
//! controller replica.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use switchyard_crd::{ModelRoute, ModelServer};
use switchyard_snapshot::{object_key, pb};

use crate::auth::compile_auth;
use crate::outlier::ReportedEjections;
use crate::router_config::RouterConfig;
use crate::scrape::{PodKey, PodLoad, ScrapeTarget};

pub mod gateway_api;
mod ignored;
mod objects;
mod pod_index;
mod prefill_decode;
#[cfg(test)]
mod prefill_decode_tests;
pub mod providers;
mod report;
mod routes;
mod servers;
#[cfg(test)]
mod tests;

pub use gateway_api::{GatewayApiConfig, GatewayApiReports};
pub use objects::{LoadProblem, ObjectSet, Objects};
pub use prefill_decode::SGLANG_BOOTSTRAP_PORT_ANNOTATION;
pub use providers::{CompiledProviders, CredentialSecret, ProviderReport, compile_providers};
pub use report::{ConditionReport, IgnoredField, ObjectKind, ObjectReport, Reason};
pub use servers::DEFAULT_RETRY_INTERVAL;

/// Namespace of objects whose `metadata.namespace` is unset (local files), as in Kubernetes.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Everything a compile reads.
#[derive(Clone, Copy, Debug)]
pub struct CompileInput<'a> {
    pub objects: &'a ObjectSet,
    /// Gateway API mode (`--enable-gateway-api` and friends).
    pub gateway_api: &'a GatewayApiConfig,
    /// The router configuration (`--router-config`; the default without one):
    /// its scheduler section, tiers, outlier detection and fairness block
    /// are shipped as they are, its JWT settings with `jwks_keys`.
    pub router: &'a RouterConfig,
    /// The JWT issuer's keys as last fetched (see [`crate::auth::jwks`]).
    pub jwks_keys: &'a [String],
    pub pod_loads: &'a BTreeMap<PodKey, PodLoad>,
    /// Pods the dataplanes reported ejecting.
    pub ejections: &'a ReportedEjections,
    /// The compile time; becomes the snapshot's `generated_at_unix_ms`.
    pub now_unix_ms: i64,
    /// The snapshot stream is encrypted and its clients authenticated, so
    /// provider credentials may go into the snapshot.
    pub ship_credentials: bool,
}

/// Everything a compile produces.
#[derive(Clone, Debug, PartialEq)]
pub struct Compiled {
    pub route_config: pb::RouteConfig,
    /// The loads as of the compile; later scrapes recompile only these.
    pub endpoint_loads: pb::EndpointLoads,
    /// One per ready endpoint of every accepted ModelServer, sorted, one per pod.
    pub scrape_targets: Vec<ScrapeTarget>,
    /// One per input ModelRoute and ModelServer, sorted by (kind, namespace, name).
    pub reports: Vec<ObjectReport>,
    /// One per input ExternalModelProvider, sorted by (namespace, name).
    pub provider_reports: Vec<ProviderReport>,
    /// The Gateway API kinds' reports.
    pub gateway_api: GatewayApiReports,
    /// API keys left out (a key held by two Secrets), for the log.
    pub auth_problems: Vec<String>,
    pub generated_at_unix_ms: i64,
}

/// The slow-changing half of a compile: what only depends on the objects.
#[derive(Clone, Debug, PartialEq)]
pub struct CompiledRoutes {
    /// Without a scheduler section: [`compile`] adds the router configuration's.
    pub route_config: pb::RouteConfig,
    pub scrape_targets: Vec<ScrapeTarget>,
    pub reports: Vec<ObjectReport>,
    pub gateway_api: GatewayApiReports,
}

/// Compiles routes, servers and pods with the router configuration and the
/// API keys, then the endpoint loads of the result: the whole snapshot and
/// every report.
pub fn compile(input: &CompileInput<'_>) -> Compiled {
    let objects = input.objects;
    let providers = compile_providers(
        &objects.providers,
        &objects.provider_secrets,
        input.ship_credentials,
    );
    let mut routes = compile_objects(objects.view(), input.gateway_api, &providers);
    let router = input.router;
    routes.route_config.scheduler = router.scheduler.clone();
    routes.route_config.tier_rate_limits = router.tiers.clone();
    routes.route_config.fairness = router.fairness.clone();
    let (auth, auth_problems) = compile_auth(
        &input.objects.api_keys,
        router.auth.as_ref(),
        input.jwks_keys,
    );
    routes.route_config.auth = auth;
    routes.route_config.outlier_detection = router.outlier_detection.defaults;
    for server in &mut routes.route_config.servers {
        server.outlier_detection = router
            .outlier_detection
            .model_servers
            .get(&object_key(&server.namespace, &server.name))
            .cloned();
    }
    let mut endpoint_loads = compile_endpoint_loads(&routes.route_config, input.pod_loads);
    endpoint_loads.ejections =
        compile_ejections(&routes.route_config, input.ejections, input.now_unix_ms);
    Compiled {
        route_config: routes.route_config,
        endpoint_loads,
        scrape_targets: routes.scrape_targets,
        reports: routes.reports,
        provider_reports: providers.reports,
        gateway_api: routes.gateway_api,
        auth_problems,
        generated_at_unix_ms: input.now_unix_ms,
    }
}

/// [`compile_objects`] of ModelRoutes, ModelServers and Pods alone, with
/// Gateway API mode off and no providers.
pub fn compile_route_config(
    routes: &[ModelRoute],
    servers: &[ModelServer],
    pods: &[Pod],
) -> CompiledRoutes {
    compile_with_providers(routes, servers, pods, &CompiledProviders::default())
}

/// [`compile_route_config`] with ExternalModelProviders routes may target.
pub(crate) fn compile_with_providers(
    routes: &[ModelRoute],
    servers: &[ModelServer],
    pods: &[Pod],
    providers: &CompiledProviders,
) -> CompiledRoutes {
    compile_objects(
        Objects {
            routes,
            servers,
            pods,
            ..Objects::default()
        },
        &GatewayApiConfig::disabled(),
        providers,
    )
}

/// Validates every object, resolves references and builds the RouteConfig.
///
/// An invalid object is left out and reported; it never takes the rest down.
/// When two objects of one kind share a namespace/name (possible with local
/// files), the first one in input order wins and the others are reported as
/// `Duplicate`.
pub fn compile_objects(
    objects: Objects<'_>,
    gateway_api: &GatewayApiConfig,
    providers: &CompiledProviders,
) -> CompiledRoutes {
    let Objects {
        routes,
        servers,
        pods,
        ..
    } = objects;
    let mut reports = Vec::with_capacity(routes.len() + servers.len());

    let pod_index = pod_index::PodIndex::new(pods);
    let mut compiled_servers: BTreeMap<(&str, &str), servers::CompiledServer> = BTreeMap::new();
    let mut present_servers: BTreeSet<(&str, &str)> = BTreeSet::new();
    for server in servers {
        let key = key_of(&server.metadata);
        if !first_of_its_name(&mut present_servers, key) {
            reports.push(duplicate_report(ObjectKind::ModelServer, &server.metadata));
            continue;
        }
        let (compiled, report) = servers::compile_server(server, &pod_index);
        reports.push(report);
        if let Some(compiled) = compiled {
            compiled_servers.insert(key, compiled);
        }
    }

    let mut scrape_targets: Vec<ScrapeTarget> = compiled_servers
        .values()
        .flat_map(|compiled| compiled.scrape_targets.iter().cloned())
        .collect();
    let gateways = gateway_api::compile(&objects, gateway_api, &pod_index, &mut scrape_targets);

    let known_servers = routes::KnownServers {
        accepted: compiled_servers.keys().copied().collect(),
        present: present_servers,
        providers,
    };
    let mut seen_routes: BTreeSet<(&str, &str)> = BTreeSet::new();
    let mut compiled_routes = Vec::with_capacity(routes.len());
    for route in routes {
        let key = key_of(&route.metadata);
        if !first_of_its_name(&mut seen_routes, key) {
            reports.push(duplicate_report(ObjectKind::ModelRoute, &route.metadata));
            continue;
        }
        let (compiled, report) =
            routes::compile_route(route, &known_servers, gateways.listener_index());
        reports.push(report);
        compiled_routes.extend(compiled);
    }
    // Oldest first: when several routes serve one model, the dataplane tries them in this order.
    compiled_routes.sort_by(|a, b| {
        (a.creation_timestamp_unix_ms, &a.namespace, &a.name).cmp(&(
            b.creation_timestamp_unix_ms,
            &b.namespace,
            &b.name,
        ))
    });
    // Stable: duplicates keep their input order behind the object they lost to.
    reports.sort_by(|a, b| (a.kind, &a.namespace, &a.name).cmp(&(b.kind, &b.namespace, &b.name)));
    let gateway_api = gateways.finish(&compiled_routes);

    scrape_targets.sort();
    // Two ModelServers may select the same pod; loads are keyed by pod, so scrape it once.
    scrape_targets.dedup_by(|later, earlier| later.key == earlier.key);

    CompiledRoutes {
        route_config: pb::RouteConfig {
            scheduler: None,
            routes: compiled_routes,
            // BTreeMap order: (namespace, name).
            servers: compiled_servers
                .into_values()
                .map(|compiled| compiled.server)
                .collect(),
            external_providers: providers.providers.clone(),
            gateways: gateway_api.gateways,
            default_gateway: gateway_api.default_gateway,
            http_routes: gateway_api.http_routes,
            inference_pools: gateway_api.inference_pools,
            ..Default::default()
        },
        scrape_targets,
        reports,
        gateway_api: gateway_api.reports,
    }
}

/// Scrapes that completed within this span of the newest one count as one
/// scrape pass. A pass over healthy pods finishes in well under this, and a
/// pass starts at most every `--scrape-interval` (1 s by default); if passes
/// are closer than this, two merge and their time is the older one's, which
/// only makes loads look older than they are, never fresher.
pub const SAME_PASS_WINDOW_MS: i64 = 500;

/// One load entry per endpoint of `route_config` that has a scraped load,
/// sorted by (namespace, pod). Cheap enough to run on every scrape.
///
/// Entries scraped in the latest pass carry `observed_at_unix_ms = 0` and the
/// set carries the pass's time (the oldest scrape of that pass, so no load
/// looks fresher than it is): a pod whose load did not change then has an
/// identical entry from pass to pass, and an incremental update leaves it out.
/// A pod whose latest scrapes failed keeps the time of its last success.
pub fn compile_endpoint_loads(
    route_config: &pb::RouteConfig,
    pod_loads: &BTreeMap<PodKey, PodLoad>,
) -> pb::EndpointLoads {
    let mut selected: BTreeMap<(&str, &str), &PodLoad> = BTreeMap::new();
    for server in &route_config.servers {
        for endpoint in &server.endpoints {
            let key = (server.namespace.as_str(), endpoint.name.as_str());
            if selected.contains_key(&key) {
                continue;
            }
            if let Some(load) = pod_loads.get(&object_key(key.0, key.1)) {
                selected.insert(key, load);
            }
        }
    }
    let newest = selected
        .values()
        .map(|load| load.observed_at_unix_ms)
        .max()
        .unwrap_or(0);
    let in_latest_pass =
        |load: &PodLoad| load.observed_at_unix_ms >= newest.saturating_sub(SAME_PASS_WINDOW_MS);
    let pass_observed_at = selected
        .values()
        .filter(|load| in_latest_pass(load))
        .map(|load| load.observed_at_unix_ms)
        .min()
        .unwrap_or(0);
    let loads = selected
        .into_iter()
        .map(|((namespace, pod), load)| {
            let mut models = load.models.clone();
            models.sort();
            models.dedup();
            pb::EndpointLoad {
                namespace: namespace.to_owned(),
                pod: pod.to_owned(),
                requests_waiting: finite_or_zero(load.requests_waiting),
                requests_running: finite_or_zero(load.requests_running),
                kv_cache_usage: finite_or_zero(load.kv_cache_usage),
                ttft_seconds: finite_or_zero(load.ttft_seconds),
                tpot_seconds: finite_or_zero(load.tpot_seconds),
                models,
                observed_at_unix_ms: if in_latest_pass(load) {
                    0
                } else {
                    load.observed_at_unix_ms
                },
                kv_cache_capacity_tokens: load.kv_cache_capacity_tokens,
            }
        })
        .collect();
    pb::EndpointLoads {
        loads,
        observed_at_unix_ms: pass_observed_at,
        ..Default::default()
    }
}

/// The reported ejections of `route_config`'s pods still in force at
/// `now_unix_ms`, sorted by (namespace, pod), for EndpointLoads.
pub fn compile_ejections(
    route_config: &pb::RouteConfig,
    ejections: &ReportedEjections,
    now_unix_ms: i64,
) -> Vec<pb::PodEjection> {
    if ejections.is_empty() {
        return Vec::new();
    }
    let mut selected: BTreeMap<(&str, &str), &crate::outlier::ReportedEjection> = BTreeMap::new();
    for server in &route_config.servers {
        for endpoint in &server.endpoints {
            let key = object_key(&server.namespace, &endpoint.name);
            if let Some(ejection) = ejections.get(&key)
                && ejection.until_unix_ms > now_unix_ms
            {
                selected.insert((&server.namespace, &endpoint.name), ejection);
            }
        }
    }
    selected
        .into_iter()
        .map(|((namespace, pod), ejection)| pb::PodEjection {
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            until_unix_ms: ejection.until_unix_ms,
            reason: ejection.reason.to_owned(),
            ..Default::default()
        })
        .collect()
}

/// Engines can export NaN (e.g. a mean over zero samples); a dataplane would
/// rightly reject such a snapshot, and "no data" is what 0 means on the wire.
fn finite_or_zero(value: f64) -> f64 {
    if value.is_finite() { value } else { 0.0 }
}

fn duplicate_report(kind: ObjectKind, metadata: &ObjectMeta) -> ObjectReport {
    let (namespace, name) = key_of(metadata);
    let generation = metadata.generation;
    let message = format!(
        "another {} {namespace}/{name} came earlier in the input (local files are read in file-name order); this one is ignored",
        kind.as_str()
    );
    ObjectReport {
        kind,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        generation,
        accepted: ConditionReport {
            status: false,
            reason: Reason::Duplicate,
            message: message.clone(),
        },
        resolved_refs: ConditionReport {
            status: false,
            reason: Reason::Duplicate,
            message: "not evaluated: the object was not accepted".to_owned(),
        },
        ready_pods: None,
        total_pods: None,
        pd_groups: None,
        complete_pd_groups: None,
        in_snapshot: false,
        ignored_fields: Vec::new(),
    }
}

/// `metadata.namespace`, or `default` when unset.
pub fn namespace_of(metadata: &ObjectMeta) -> &str {
    non_empty(metadata.namespace.as_deref()).unwrap_or(DEFAULT_NAMESPACE)
}

/// `(namespace, name)`: what identifies an object of one kind.
pub(crate) fn key_of(metadata: &ObjectMeta) -> (&str, &str) {
    (
        namespace_of(metadata),
        metadata.name.as_deref().unwrap_or_default(),
    )
}

/// Records `key` in `seen`; false when an object of that namespace and name
/// came earlier in the input, so this one is reported as a duplicate. An
/// unnamed object is never a duplicate: its own validation rejects it.
pub(crate) fn first_of_its_name<'a>(
    seen: &mut BTreeSet<(&'a str, &'a str)>,
    key: (&'a str, &'a str),
) -> bool {
    key.1.is_empty() || seen.insert(key)
}

/// The namespace and name of an object about to be validated, and the
/// problems its validation starts with: `unnamed` when it has no name.
pub(crate) fn start_validation(
    metadata: &ObjectMeta,
    unnamed: Reason,
) -> (&str, &str, Vec<report::Problem>) {
    let (namespace, name) = key_of(metadata);
    let mut problems = Vec::new();
    if name.is_empty() {
        problems.push(report::Problem::new(unnamed, "metadata.name: must be set"));
    }
    (namespace, name, problems)
}

pub(crate) fn non_empty(value: Option<&str>) -> Option<&str> {
    value.filter(|value| !value.is_empty())
}
