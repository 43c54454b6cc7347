//! The routing table: a validated, immutable view of one RouteConfig, swapped
//! atomically as a whole. Per-pod state is carried from table to table.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::header::HeaderName;
use parking_lot::Mutex;
use prost::Message as _;
use regex::Regex;
use switchyard_runtime::clock;
use switchyard_snapshot::{Nack, pb, wire};
use tokio::sync::watch;

use crate::auth::{Authenticator, UnknownKeyIds};
use crate::fairness::{FairQueues, Fairness, FairnessSettings};
use crate::gateway::{GatewayError, Gateways};
use crate::pod::PodState;
use crate::pod::outlier::{EjectionNotifier, OutlierDetector, OutlierSettings};
use crate::providers::Provider;
use crate::rate_limit::{RateLimitPlan, RateLimiting, RateLimits};
use crate::retired::Retired;
use crate::routing::{
    DEFAULT_RESPONSE_HEADER_TIMEOUT, KvConnector, Matcher, PdGroup, PrefillDecode, Route,
    RouteIndex, Rule, Server, StringMatcher, WeightedTargets,
};
use crate::scheduling::{Scheduler, SchedulingShared};
use crate::xds_client::SnapshotSink;

/// Why a RouteConfig was rejected (the dataplane NACKs it and keeps its table).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("duplicate ModelServer {0}")]
    DuplicateServer(String),
    #[error("duplicate ModelRoute {0}")]
    DuplicateRoute(String),
    #[error("ModelServer {server}: invalid port {port}")]
    InvalidPort { server: String, port: u32 },
    #[error("ModelServer {server}: pod {pod} has invalid IP {ip:?}")]
    InvalidPodIp {
        server: String,
        pod: String,
        ip: String,
    },
    #[error("ModelServer {server}: model {model:?} cannot be used as a JSON string")]
    InvalidModelRewrite { server: String, model: String },
    #[error("ModelRoute {route} rule {rule}: target {server} is not in the snapshot")]
    DanglingTarget {
        route: String,
        rule: usize,
        server: String,
    },
    #[error("ModelRoute {route} rule {rule}: no target with a positive weight")]
    NoWeightedTarget { route: String, rule: usize },
    #[error("ModelRoute {route} rule {rule}: invalid header name {name:?}")]
    InvalidHeaderName {
        route: String,
        rule: usize,
        name: String,
    },
    #[error("ModelRoute {route} rule {rule}: invalid regex {pattern:?}: {reason}")]
    InvalidRegex {
        route: String,
        rule: usize,
        pattern: String,
        reason: String,
    },
    #[error("ModelServer {server}: prefill/decode {problem}")]
    InvalidPrefillDecode { server: String, problem: String },
    #[error("ModelRoute {route}: serves no model name and no LoRA adapter")]
    NoModelName { route: String },
    #[error(
        "ModelRoute {route} rule {rule}: a target must name exactly one of a ModelServer and an external provider"
    )]
    AmbiguousTarget { route: String, rule: usize },
    #[error("duplicate external provider {0}")]
    DuplicateProvider(String),
    #[error("{0}")]
    InvalidProvider(String),
    #[error("scheduler configuration: {0}")]
    InvalidScheduler(String),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("duplicate InferencePool {0}")]
    DuplicatePool(String),
    #[error("ModelRoute {route}: listener {listener} is not in the snapshot")]
    DanglingListener { route: String, listener: String },
    #[error("authentication: {0}")]
    InvalidAuth(String),
    #[error("rate limits: {0}")]
    InvalidRateLimit(String),
    #[error("fairness: {0}")]
    InvalidFairness(String),
    /// The resource is not well-formed protobuf (its envelope was).
    #[error("does not decode: {0}")]
    Malformed(#[from] prost::DecodeError),
    #[error(
        "EndpointLoads update applies to version {base:?}, but this dataplane holds {}",
        .applied.as_deref().map_or("none".to_owned(), |held| format!("{held:?}"))
    )]
    LoadsBaseMismatch {
        base: String,
        applied: Option<String>,
    },
}

impl SnapshotError {
    /// The NACK that answers this rejection: the controller sends the whole
    /// EndpointLoads set after a base mismatch, and nothing more of a version
    /// that is invalid.
    pub fn into_nack(self) -> Nack {
        let reason = match self {
            Self::LoadsBaseMismatch { .. } => pb::NackReason::UnknownBaseVersion,
            Self::Malformed(_) => pb::NackReason::MalformedResponse,
            _ => pb::NackReason::InvalidResource,
        };
        Nack::new(reason, self.to_string())
    }
}

/// One applied RouteConfig, ready for the request path.
#[derive(Debug)]
pub struct RoutingTable {
    pub version: String,
    pub applied_at: SystemTime,
    pub routes: Vec<Arc<Route>>,
    pub servers: Vec<Arc<Server>>,
    /// External providers, in snapshot order.
    pub providers: Vec<Arc<Server>>,
    pub index: RouteIndex,
    /// Pods by `namespace/name`.
    pub pods: HashMap<String, Arc<PodState>>,
    /// The `GET /v1/models` response body, rendered once.
    pub models_body: Bytes,
    /// The RouteConfig this table was built from, for debug dumps.
    pub source: SourceConfig,
    /// Picks pods, configured by the snapshot's scheduler section.
    pub scheduler: Scheduler,
    /// Gateway API mode: listeners, HTTPRoutes, InferencePools.
    pub gateways: Gateways,
    /// Checks credentials; None = authentication is off (no API key, no JWT settings).
    pub authenticator: Option<Authenticator>,
    /// The token budgets of the routes' models and of the tiers.
    pub rate_limits: Arc<RateLimits>,
    /// The fairness queues of the served models; None = fairness is off.
    pub fairness: Option<Arc<FairQueues>>,
}

/// The RouteConfig a table was built from, kept encoded as it came: debug
/// dumps decode it when asked. Decoded, it was the largest part of a big
/// snapshot's memory (about 1.1 KiB per pod, against 50 bytes encoded).
#[derive(Debug)]
pub struct SourceConfig(Bytes);

impl SourceConfig {
    /// The RouteConfig, decoded again.
    pub fn decode(&self) -> pb::RouteConfig {
        // The table was built from it: it decodes.
        pb::RouteConfig::decode(self.0.as_ref()).unwrap_or_default()
    }
}

/// `RouteConfig.servers` and `RouteConfig.inference_pools`: the parts of a
/// RouteConfig that grow with the pods, decoded one ModelServer or pool at a
/// time while the table is built. A big snapshot's decoded servers are about
/// twelve times their encoded size (a label map per pod); decoded whole,
/// they and the table being built were in memory at once.
const SERVERS_FIELD: u32 = 2;
const INFERENCE_POOLS_FIELD: u32 = 13;
/// `EndpointLoads.loads`: one per pod, decoded one at a time.
const LOADS_FIELD: u32 = 1;

impl RoutingTable {
    /// [`RoutingTable::build`] of a first snapshot with state of its own
    /// (scheduling, rate limits, ejections, fairness): for tests and benches.
    pub fn standalone(version: &str, config: pb::RouteConfig) -> Result<Self, SnapshotError> {
        Self::build(
            version,
            config.encode_to_vec().into(),
            &HashMap::new(),
            &Arc::default(),
            &RateLimiting::default(),
            &Arc::default(),
            &Fairness::default(),
        )
    }

    /// Validates `config` and builds the table, reusing `previous_pods` so
    /// in-flight counts, loads and ejections survive the swap; its
    /// ModelServers wake `ejections` when they eject a pod.
    /// `encoded` is the RouteConfig as it came off the wire; its ModelServers
    /// and InferencePools are decoded one at a time, so that the decoded
    /// config and the table being built are never in memory whole at once.
    pub fn build(
        version: &str,
        encoded: Bytes,
        previous_pods: &HashMap<String, Arc<PodState>>,
        scheduling: &Arc<SchedulingShared>,
        rate_limiting: &RateLimiting,
        ejections: &Arc<EjectionNotifier>,
        fairness: &Fairness,
    ) -> Result<Self, SnapshotError> {
        let split = wire::split_fields(&encoded, &[SERVERS_FIELD, INFERENCE_POOLS_FIELD])?;
        let config = pb::RouteConfig::decode(split.rest)?;
        let encoded_parts = |field| {
            split
                .taken
                .iter()
                .filter(move |(tag, _)| *tag == field)
                .map(|(_, part)| part.clone())
        };
        let mut pods: HashMap<String, Arc<PodState>> = HashMap::new();
        let mut servers_by_key: HashMap<String, Arc<Server>> = HashMap::new();
        let mut servers = Vec::with_capacity(encoded_parts(SERVERS_FIELD).count());
        for encoded_server in encoded_parts(SERVERS_FIELD) {
            let server = pb::ModelServer::decode(encoded_server)?;
            let outlier = OutlierDetector::new(
                OutlierSettings::resolve(
                    server.outlier_detection.as_ref(),
                    config.outlier_detection.as_ref(),
                ),
                ejections.clone(),
            );
            let built = build_server(&server, previous_pods, &mut pods, outlier)?;
            drop(server);
            if servers_by_key
                .insert(built.key.clone(), built.clone())
                .is_some()
            {
                return Err(SnapshotError::DuplicateServer(built.key.clone()));
            }
            servers.push(built);
        }
        let mut providers_by_key: HashMap<String, Arc<Server>> = HashMap::new();
        let mut providers = Vec::with_capacity(config.external_providers.len());
        for provider in &config.external_providers {
            let outlier = OutlierDetector::new(
                OutlierSettings::resolve(None, config.outlier_detection.as_ref()),
                ejections.clone(),
            );
            let built = build_provider(provider, outlier)?;
            if providers_by_key
                .insert(built.key.clone(), built.clone())
                .is_some()
            {
                return Err(SnapshotError::DuplicateProvider(built.key.clone()));
            }
            providers.push(built);
        }
        let mut pools = HashMap::new();
        for encoded_pool in encoded_parts(INFERENCE_POOLS_FIELD) {
            let pool = pb::InferencePool::decode(encoded_pool)?;
            // The router configuration's outlier detection covers pools too.
            let outlier = OutlierDetector::new(
                OutlierSettings::resolve(None, config.outlier_detection.as_ref()),
                ejections.clone(),
            );
            let built = build_pool(&pool, previous_pods, &mut pods, outlier)?;
            if pools.insert(built.key.clone(), built.clone()).is_some() {
                return Err(SnapshotError::DuplicatePool(built.key.clone()));
            }
        }
        let gateways = Gateways::build(&config, pools)?;
        let mut routes = Vec::with_capacity(config.routes.len());
        let mut route_keys = std::collections::HashSet::new();
        for route in &config.routes {
            let built = build_route(route, &servers_by_key, &providers_by_key, &gateways)?;
            if !route_keys.insert(built.key.clone()) {
                return Err(SnapshotError::DuplicateRoute(built.key.clone()));
            }
            routes.push(Arc::new(built));
        }
        let index = RouteIndex::new(&routes);
        let model_names = index.model_names();
        let models_body = render_models(&model_names);
        let scheduler = Scheduler::build(config.scheduler.as_ref(), &model_names, scheduling)
            .map_err(|error| SnapshotError::InvalidScheduler(error.to_string()))?;
        let authenticator = Authenticator::build(config.auth.as_ref())
            .map_err(|error| SnapshotError::InvalidAuth(error.to_string()))?;
        let plan = RateLimitPlan::parse(&config)
            .map_err(|error| SnapshotError::InvalidRateLimit(error.to_string()))?;
        let fairness_settings = config
            .fairness
            .as_ref()
            .map(FairnessSettings::from_config)
            .transpose()
            .map_err(SnapshotError::InvalidFairness)?;
        // Last: they change the budgets and queues in use, so nothing may
        // fail after them.
        let rate_limits = rate_limiting.apply(plan);
        // Only fair queues read the pods by model.
        let models = if fairness_settings.is_some() {
            pods_by_model(&config.routes, &servers_by_key)
        } else {
            HashMap::new()
        };
        let fairness = fairness.apply(fairness_settings, models);
        Ok(Self {
            version: version.to_owned(),
            applied_at: clock::wall_now(),
            routes,
            servers,
            providers,
            index,
            pods,
            models_body,
            source: SourceConfig(encoded),
            scheduler,
            gateways,
            authenticator,
            rate_limits,
            fairness,
        })
    }
}

/// The pods that may serve each model name (and LoRA adapter) of `routes`:
/// those of every target with a weight of every rule.
fn pods_by_model(
    routes: &[pb::ModelRoute],
    servers: &HashMap<String, Arc<Server>>,
) -> HashMap<String, Vec<Arc<PodState>>> {
    let mut models: HashMap<String, Vec<Arc<PodState>>> = HashMap::new();
    for route in routes {
        let names = std::iter::once(&route.model_name)
            .filter(|name| !name.is_empty())
            .chain(&route.lora_adapters);
        let pods: Vec<&Arc<PodState>> = route
            .rules
            .iter()
            .flat_map(|rule| &rule.targets)
            .filter(|target| target.weight > 0)
            .filter_map(|target| servers.get(&target.model_server))
            .flat_map(|server| &server.pods)
            .collect();
        for name in names {
            let model = models.entry(name.clone()).or_default();
            for pod in &pods {
                if !model.iter().any(|known| Arc::ptr_eq(known, pod)) {
                    model.push((*pod).clone());
                }
            }
        }
    }
    models
}

fn build_server(
    server: &pb::ModelServer,
    previous_pods: &HashMap<String, Arc<PodState>>,
    pods: &mut HashMap<String, Arc<PodState>>,
    outlier: OutlierDetector,
) -> Result<Arc<Server>, SnapshotError> {
    let key = switchyard_snapshot::object_key(&server.namespace, &server.name);
    let port = u16::try_from(server.port)
        .ok()
        .filter(|port| *port != 0)
        .ok_or(SnapshotError::InvalidPort {
            server: key.clone(),
            port: server.port,
        })?;
    let server_pods = build_endpoints(
        &key,
        &server.namespace,
        &server.endpoints,
        port,
        previous_pods,
        pods,
    )?;
    let model_rewrite_literal = model_rewrite_literal(&key, server.model.as_ref())?;
    let prefill_decode = server
        .prefill_decode
        .as_ref()
        .map(|pd| build_prefill_decode(pd, server))
        .transpose()
        .map_err(|problem| SnapshotError::InvalidPrefillDecode {
            server: key.clone(),
            problem,
        })?;
    let policy = server.traffic_policy.unwrap_or_default();
    Ok(Arc::new(Server {
        key,
        model_rewrite_literal,
        model_rewrite: server.model.clone(),
        timeout: match policy.timeout_ms {
            0 => DEFAULT_RESPONSE_HEADER_TIMEOUT,
            ms => Duration::from_millis(ms),
        },
        retry_attempts: policy.retry_attempts,
        retry_interval: Duration::from_millis(policy.retry_interval_ms),
        pods: server_pods,
        pod_ids: Default::default(),
        rotation: Default::default(),
        outlier,
        prefill_decode,
        provider: None,
    }))
}

/// The JSON string literal a model rewrite splices into request bodies,
/// encoded once when the snapshot is applied.
fn model_rewrite_literal(
    server: &str,
    model: Option<&String>,
) -> Result<Option<bytes::Bytes>, SnapshotError> {
    model
        .map(|model| {
            serde_json::to_string(model)
                .map(bytes::Bytes::from)
                .map_err(|_| SnapshotError::InvalidModelRewrite {
                    server: server.to_owned(),
                    model: model.clone(),
                })
        })
        .transpose()
}

/// An external provider, as a target routes pick like a ModelServer.
fn build_provider(
    provider: &pb::ExternalProvider,
    outlier: OutlierDetector,
) -> Result<Arc<Server>, SnapshotError> {
    let built = Provider::from_snapshot(provider).map_err(SnapshotError::InvalidProvider)?;
    let model_rewrite_literal = model_rewrite_literal(&built.key, provider.model.as_ref())?;
    Ok(Arc::new(Server {
        key: built.key.clone(),
        model_rewrite_literal,
        model_rewrite: provider.model.clone(),
        timeout: DEFAULT_RESPONSE_HEADER_TIMEOUT,
        retry_attempts: 0,
        retry_interval: Duration::ZERO,
        pods: Vec::new(),
        pod_ids: Default::default(),
        rotation: Default::default(),
        // Never consulted: a provider has no pods to eject.
        outlier,
        prefill_decode: None,
        provider: Some(Arc::new(built)),
    }))
}

/// An InferencePool as a server the scheduler picks among: its endpoints,
/// no model rewrite, no retries (the gateway or client retries).
fn build_pool(
    pool: &pb::InferencePool,
    previous_pods: &HashMap<String, Arc<PodState>>,
    pods: &mut HashMap<String, Arc<PodState>>,
    outlier: OutlierDetector,
) -> Result<Arc<Server>, SnapshotError> {
    let key = switchyard_snapshot::object_key(&pool.namespace, &pool.name);
    let endpoints = build_endpoints(
        &key,
        &pool.namespace,
        &pool.endpoints,
        0,
        previous_pods,
        pods,
    )?;
    Ok(Arc::new(Server {
        key,
        model_rewrite_literal: None,
        model_rewrite: None,
        timeout: DEFAULT_RESPONSE_HEADER_TIMEOUT,
        retry_attempts: 0,
        retry_interval: Duration::ZERO,
        pods: endpoints,
        pod_ids: Default::default(),
        rotation: Default::default(),
        outlier,
        prefill_decode: None,
        provider: None,
    }))
}

/// The pod states of `endpoints` (of the ModelServer or InferencePool
/// `owner`), reused from this table or the previous one when their address
/// is unchanged. An endpoint with its own port is `namespace/pod:port`.
fn build_endpoints(
    owner: &str,
    namespace: &str,
    endpoints: &[pb::Endpoint],
    default_port: u16,
    previous_pods: &HashMap<String, Arc<PodState>>,
    pods: &mut HashMap<String, Arc<PodState>>,
) -> Result<Vec<Arc<PodState>>, SnapshotError> {
    let mut states = Vec::with_capacity(endpoints.len());
    for endpoint in endpoints {
        let invalid_ip = || SnapshotError::InvalidPodIp {
            server: owner.to_owned(),
            pod: endpoint.name.clone(),
            ip: endpoint.ip.clone(),
        };
        let ip: IpAddr = endpoint.ip.parse().map_err(|_| invalid_ip())?;
        let load_key = switchyard_snapshot::object_key(namespace, &endpoint.name);
        let (port, pod_key) = match endpoint.port {
            0 => (default_port, load_key.clone()),
            own => (
                u16::try_from(own).ok().ok_or(SnapshotError::InvalidPort {
                    server: owner.to_owned(),
                    port: own,
                })?,
                format!("{load_key}:{own}"),
            ),
        };
        let addr = SocketAddr::new(ip, port);
        let pod = match pods.get(&pod_key).or_else(|| previous_pods.get(&pod_key)) {
            Some(existing) if existing.addr == addr => existing.clone(),
            _ => Arc::new(
                PodState::endpoint(pod_key.clone(), load_key, endpoint.name.clone(), addr)
                    .map_err(|_| invalid_ip())?,
            ),
        };
        pods.insert(pod_key, pod.clone());
        states.push(pod);
    }
    Ok(states)
}

/// The groups of `server` by pod index; every pod named must be an endpoint
/// of the server, in one group and one role.
fn build_prefill_decode(
    pd: &pb::PrefillDecode,
    server: &pb::ModelServer,
) -> Result<PrefillDecode, String> {
    let connector = match pd.kv_connector() {
        pb::KvConnector::Http => KvConnector::Http,
        pb::KvConnector::Lmcache => KvConnector::Lmcache,
        pb::KvConnector::Nixl => KvConnector::Nixl,
        pb::KvConnector::Mooncake => KvConnector::Mooncake,
        pb::KvConnector::Sglang => KvConnector::Sglang,
        pb::KvConnector::Unspecified => {
            return Err(format!("unknown KV connector {}", pd.kv_connector));
        }
    };
    let index_of: HashMap<&str, usize> = server
        .endpoints
        .iter()
        .enumerate()
        .map(|(index, endpoint)| (endpoint.name.as_str(), index))
        .collect();
    let mut group_of = vec![usize::MAX; server.endpoints.len()];
    let mut groups = Vec::with_capacity(pd.groups.len());
    let mut decode_candidates = Vec::new();
    for (group_index, group) in pd.groups.iter().enumerate() {
        if group_index > 0 && pd.groups[group_index - 1].name >= group.name {
            return Err(format!(
                "groups are not sorted by name or repeat one ({:?})",
                group.name
            ));
        }
        let mut members = |names: &[String]| -> Result<Vec<usize>, String> {
            names
                .iter()
                .map(|name| {
                    let index = *index_of.get(name.as_str()).ok_or_else(|| {
                        format!("group {:?}: pod {name} is not an endpoint", group.name)
                    })?;
                    if group_of[index] != usize::MAX {
                        return Err(format!("pod {name} is in more than one group or role"));
                    }
                    group_of[index] = group_index;
                    Ok(index)
                })
                .collect()
        };
        let built = PdGroup {
            name: group.name.clone(),
            prefill: members(&group.prefill)?,
            decode: members(&group.decode)?,
        };
        if built.is_complete() {
            decode_candidates.extend(built.decode.iter().copied());
        }
        groups.push(built);
    }
    let bootstrap_ports = server
        .endpoints
        .iter()
        .map(|endpoint| {
            u16::try_from(endpoint.bootstrap_port).map_err(|_| {
                format!(
                    "pod {}: invalid bootstrap port {}",
                    endpoint.name, endpoint.bootstrap_port
                )
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(PrefillDecode {
        connector,
        group_label: pd.group_label.clone(),
        groups,
        decode_candidates,
        group_of,
        bootstrap_ports,
    })
}

fn build_route(
    route: &pb::ModelRoute,
    servers: &HashMap<String, Arc<Server>>,
    providers: &HashMap<String, Arc<Server>>,
    gateways: &Gateways,
) -> Result<Route, SnapshotError> {
    let key = switchyard_snapshot::object_key(&route.namespace, &route.name);
    if route.model_name.is_empty() && route.lora_adapters.is_empty() {
        return Err(SnapshotError::NoModelName { route: key });
    }
    let mut rules = Vec::with_capacity(route.rules.len());
    for (rule_index, rule) in route.rules.iter().enumerate() {
        let mut targets = Vec::with_capacity(rule.targets.len());
        for target in &rule.targets {
            let (backends, name) = match (
                target.model_server.is_empty(),
                target.external_provider.is_empty(),
            ) {
                (false, true) => (servers, &target.model_server),
                (true, false) => (providers, &target.external_provider),
                _ => {
                    return Err(SnapshotError::AmbiguousTarget {
                        route: key.clone(),
                        rule: rule_index,
                    });
                }
            };
            let server = backends
                .get(name)
                .ok_or_else(|| SnapshotError::DanglingTarget {
                    route: key.clone(),
                    rule: rule_index,
                    server: name.clone(),
                })?;
            targets.push((server.clone(), target.weight));
        }
        let targets =
            WeightedTargets::new(targets).ok_or_else(|| SnapshotError::NoWeightedTarget {
                route: key.clone(),
                rule: rule_index,
            })?;
        let matcher = rule
            .r#match
            .as_ref()
            .map(|m| build_matcher(m, &key, rule_index))
            .transpose()?;
        rules.push(Rule {
            name: rule.name.clone(),
            matcher,
            targets,
        });
    }
    let listeners = route
        .listeners
        .iter()
        .map(|listener| {
            gateways
                .listener_id(&listener.gateway, &listener.listener)
                .ok_or_else(|| SnapshotError::DanglingListener {
                    route: key.clone(),
                    listener: format!("{}/{}", listener.gateway, listener.listener),
                })
        })
        .collect::<Result<_, _>>()?;
    Ok(Route {
        key,
        model_name: route.model_name.clone(),
        lora_adapters: route.lora_adapters.clone(),
        rules,
        listeners,
    })
}

fn build_matcher(m: &pb::ModelMatch, route: &str, rule: usize) -> Result<Matcher, SnapshotError> {
    let string_matcher = |s: &pb::StringMatch| -> Result<StringMatcher, SnapshotError> {
        Ok(match &s.kind {
            Some(pb::string_match::Kind::Exact(value)) => StringMatcher::Exact(value.clone()),
            Some(pb::string_match::Kind::Prefix(value)) => StringMatcher::Prefix(value.clone()),
            Some(pb::string_match::Kind::Regex(pattern)) => {
                StringMatcher::Regex(Regex::new(pattern).map_err(|error| {
                    SnapshotError::InvalidRegex {
                        route: route.to_owned(),
                        rule,
                        pattern: pattern.clone(),
                        reason: error.to_string(),
                    }
                })?)
            }
            None => StringMatcher::Any,
        })
    };
    let mut headers = Vec::with_capacity(m.headers.len());
    for header in &m.headers {
        let name = HeaderName::try_from(header.name.as_str()).map_err(|_| {
            SnapshotError::InvalidHeaderName {
                route: route.to_owned(),
                rule,
                name: header.name.clone(),
            }
        })?;
        let matcher = match &header.value {
            Some(value) => string_matcher(value)?,
            None => StringMatcher::Any,
        };
        headers.push((name, matcher));
    }
    Ok(Matcher {
        headers,
        uri: m.uri.as_ref().map(string_matcher).transpose()?,
        body_model: m.body_model.as_ref().map(string_matcher).transpose()?,
    })
}

/// OpenAI's model list, as the Kthena router renders it.
fn render_models(names: &[&str]) -> Bytes {
    let data: Vec<_> = names
        .iter()
        .map(|id| {
            serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "switchyard"})
        })
        .collect();
    Bytes::from(serde_json::json!({"object": "list", "data": data}).to_string())
}

/// What is kept per table outside the store (the request path's metric
/// handles), told of every table the store swaps in. The store calls it
/// itself, so no caller that applies a snapshot can forget it; a trait
/// because its owner (`metrics`) depends on this module, not the reverse.
pub trait TableObserver: std::fmt::Debug + Send + Sync {
    /// Called with a new table before any request can see it: what
    /// requests look up by the table's names must exist when they arrive.
    fn before_visible(&self, table: &RoutingTable);
    /// Frees what replaced tables left behind once no request reads it;
    /// called by [`SnapshotStore::reclaim`], on the thread applying snapshots.
    fn reclaim(&self);
}

/// The dataplane's current routing state: one atomically swapped table, plus
/// the latest engine loads (applied onto the table's pods).
#[derive(Debug, Default)]
pub struct SnapshotStore {
    table: ArcSwapOption<RoutingTable>,
    /// The latest EndpointLoads; its lock also serialises writers (the
    /// controller stream) and is never taken by requests.
    loads: Mutex<Option<AppliedLoads>>,
    /// Scheduling state that outlives tables (prefix index, recent decisions, metrics).
    scheduling: Arc<SchedulingShared>,
    /// The ports of the current table's Gateway listeners (see `listener_ports`).
    listener_ports: watch::Sender<BTreeSet<u16>>,
    /// Token budgets that outlive tables, and their Redis connections.
    rate_limiting: Arc<RateLimiting>,
    /// Key ids of JWTs no table's keys could verify, for the controller.
    unknown_keys: Arc<UnknownKeyIds>,
    /// Woken when a ModelServer of any table ejects a pod, for the report
    /// to the controller.
    ejections: Arc<EjectionNotifier>,
    /// Replaced tables some request still held when they were replaced;
    /// freed by [`SnapshotStore::reclaim`], so the cost of dropping a big
    /// table falls on the thread that applies snapshots, not on a request.
    retired: Retired<RoutingTable>,
    /// Fairness queues and counters that outlive tables.
    fairness: Arc<Fairness>,
    /// Told of every table before requests see it (see [`TableObserver`]).
    observer: Option<Arc<dyn TableObserver>>,
}

/// The latest EndpointLoads, kept so a later table gets them too and an
/// incremental update has something to apply to.
#[derive(Debug)]
struct AppliedLoads {
    version: String,
    loads: HashMap<String, Arc<pb::EndpointLoad>>,
    /// Pods the fleet ejects: when each ejection ends (Unix milliseconds).
    ejections: HashMap<String, i64>,
}

/// Ejects `table`'s pods the fleet ejects (other dataplanes, through the
/// controller), within each ModelServer's cap.
fn apply_fleet_ejections(table: &RoutingTable, ejections: &HashMap<String, i64>) {
    if ejections.is_empty() {
        return;
    }
    let (now, now_unix_ms) = (clock::now(), clock::unix_ms_now());
    for server in &table.servers {
        for pod in &server.pods {
            let Some(left) = ejections
                .get(&pod.key)
                .and_then(|until| u64::try_from(until.saturating_sub(now_unix_ms)).ok())
                .filter(|left| *left > 0)
            else {
                continue;
            };
            let until = now + Duration::from_millis(left);
            if !server
                .outlier
                .eject_for_fleet(&server.pods, pod, until, now)
            {
                tracing::info!(pod = %pod.key, server = %server.key, "not ejecting a pod the fleet ejects: the ModelServer's cap is reached");
            }
        }
    }
}

impl SnapshotStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store whose schedulers report plugin timings to `scheduling`'s metrics.
    pub fn with_scheduling(scheduling: Arc<SchedulingShared>) -> Self {
        Self {
            scheduling,
            ..Self::default()
        }
    }

    /// The ports the current snapshot's Gateway listeners are served on,
    /// updated with every snapshot that changes them.
    pub fn listener_ports(&self) -> watch::Receiver<BTreeSet<u16>> {
        self.listener_ports.subscribe()
    }

    /// The same store with budgets reporting to `rate_limiting`'s metrics.
    pub fn with_rate_limiting(self, rate_limiting: Arc<RateLimiting>) -> Self {
        Self {
            rate_limiting,
            ..self
        }
    }

    /// The same store with fairness queues reporting to `fairness`'s metrics.
    pub fn with_fairness(self, fairness: Arc<Fairness>) -> Self {
        Self { fairness, ..self }
    }

    /// The same store telling `observer` of every table it swaps in.
    pub fn with_table_observer(self, observer: Arc<dyn TableObserver>) -> Self {
        Self {
            observer: Some(observer),
            ..self
        }
    }

    pub fn fairness(&self) -> &Arc<Fairness> {
        &self.fairness
    }

    pub fn scheduling(&self) -> &Arc<SchedulingShared> {
        &self.scheduling
    }

    pub fn rate_limiting(&self) -> &Arc<RateLimiting> {
        &self.rate_limiting
    }

    /// Where the request path notes JWT key ids the snapshot lacks; the
    /// controller stream reports them.
    pub fn unknown_keys(&self) -> &Arc<UnknownKeyIds> {
        &self.unknown_keys
    }

    /// The current table, if a RouteConfig was ever applied.
    pub fn table(&self) -> Option<Arc<RoutingTable>> {
        self.table.load_full()
    }

    pub fn loads_version(&self) -> Option<String> {
        self.loads
            .lock()
            .as_ref()
            .map(|loads| loads.version.clone())
    }

    pub fn apply_route_config(
        &self,
        version: &str,
        config: pb::RouteConfig,
    ) -> Result<(), SnapshotError> {
        self.apply_encoded_route_config(version, Bytes::from(config.encode_to_vec()))
    }

    /// Applies a RouteConfig as it came off the wire (see [`RoutingTable::build`]),
    /// telling the [`TableObserver`] of the new table before the swap.
    pub fn apply_encoded_route_config(
        &self,
        version: &str,
        encoded: Bytes,
    ) -> Result<(), SnapshotError> {
        let loads = self.loads.lock();
        let previous = self.table.load_full();
        let empty = HashMap::new();
        let previous_pods = previous.as_ref().map_or(&empty, |table| &table.pods);
        let table = RoutingTable::build(
            version,
            encoded,
            previous_pods,
            &self.scheduling,
            &self.rate_limiting,
            &self.ejections,
            &self.fairness,
        )?;
        if let Some(loads) = loads.as_ref() {
            for pod in table.pods.values() {
                pod.set_load(loads.loads.get(&pod.load_key).cloned());
            }
            apply_fleet_ejections(&table, &loads.ejections);
        }
        let ports = table.gateways.ports();
        // Before the swap: a request routed by the new table in the moment
        // after it would otherwise find no metric handles and go uncounted
        // (the stream thread runs below the traffic workers, so that moment
        // can be long on a busy machine).
        if let Some(observer) = &self.observer {
            observer.before_visible(&table);
        }
        let replaced = self.table.swap(Some(Arc::new(table)));
        drop(loads);
        self.listener_ports.send_if_modified(|current| {
            let changed = *current != ports;
            *current = ports;
            changed
        });
        drop(previous);
        if let Some(replaced) = replaced {
            self.retired.retire(replaced);
        }
        // Tables only: the handles the observer just retired were kept
        // because a request still reads them; the periodic reclaim
        // (`SnapshotStore::reclaim`) frees them.
        self.retired.reclaim();
        // The new pods' loads are known only now.
        self.fairness.wake_all();
        Ok(())
    }

    /// Changes whenever a ModelServer ejects a pod on this dataplane's own evidence.
    pub fn ejections(&self) -> watch::Receiver<u64> {
        self.ejections.subscribe()
    }

    /// The pods this dataplane ejects on its own evidence right now.
    pub fn outlier_report(&self) -> pb::OutlierReport {
        let Some(table) = self.table() else {
            return pb::OutlierReport::default();
        };
        let now = clock::now();
        let mut ejections: Vec<pb::PodEjection> = table
            .pods
            .values()
            .filter_map(|pod| {
                let (until, cause) = pod.health.local_ejection(now)?;
                let (namespace, name) = pod.key.split_once('/')?;
                Some(pb::PodEjection {
                    namespace: namespace.to_owned(),
                    pod: name.to_owned(),
                    remaining_ms: u64::try_from((until - now).as_millis()).unwrap_or(u64::MAX),
                    reason: cause.as_str().to_owned(),
                    ..Default::default()
                })
            })
            .collect();
        ejections.sort_by(|a, b| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)));
        pb::OutlierReport { ejections }
    }

    /// Frees the replaced tables, and what the observer kept of them, that
    /// no request uses any more (on the calling thread: the one that
    /// applies snapshots).
    pub fn reclaim(&self) {
        self.retired.reclaim();
        if let Some(observer) = &self.observer {
            observer.reclaim();
        }
    }

    /// Applies a whole EndpointLoads set, or an update of the one held
    /// (`base_version` set), touching only the pods the update names.
    pub fn apply_endpoint_loads(
        &self,
        version: &str,
        update: pb::EndpointLoads,
    ) -> Result<(), SnapshotError> {
        self.apply_encoded_endpoint_loads(version, Bytes::from(update.encode_to_vec()))
    }

    /// Applies an EndpointLoads as it came off the wire: each pod's load is
    /// decoded on its own into the `Arc` pods share, not into one list of
    /// every load first.
    pub fn apply_encoded_endpoint_loads(
        &self,
        version: &str,
        encoded: Bytes,
    ) -> Result<(), SnapshotError> {
        let split = wire::split_fields(&encoded, &[LOADS_FIELD])?;
        let update = pb::EndpointLoads::decode(split.rest)?;
        let keyed = |(_, encoded_load): &(u32, Bytes)| {
            let mut load = pb::EndpointLoad::decode(encoded_load.clone())?;
            let key = switchyard_snapshot::object_key(&load.namespace, &load.pod);
            // The key names the pod from now on: one copy of the name per
            // pod instead of three (a tenth of a big snapshot's loads).
            load.namespace = String::new();
            load.pod = String::new();
            Ok::<_, prost::DecodeError>((key, Arc::new(load)))
        };
        // Decoded whole before anything changes: a load that does not decode
        // rejects the update.
        let loads: HashMap<String, Arc<pb::EndpointLoad>> =
            split.taken.iter().map(keyed).collect::<Result<_, _>>()?;
        drop((split.taken, encoded));
        let mut held = self.loads.lock();
        let table = self.table.load_full();
        // Whole in every response, update or not: they replace what is held.
        self.fairness
            .apply_counters(update.fairness_counters.as_ref());
        let ejections: HashMap<String, i64> = update
            .ejections
            .iter()
            .map(|ejection| {
                let key = switchyard_snapshot::object_key(&ejection.namespace, &ejection.pod);
                (key, ejection.until_unix_ms)
            })
            .collect();
        if update.base_version.is_empty() {
            if let Some(table) = &table {
                for pod in table.pods.values() {
                    pod.set_load(loads.get(&pod.load_key).cloned());
                }
            }
            *held = Some(AppliedLoads {
                version: version.to_owned(),
                loads,
                ejections,
            });
        } else {
            let current = match held.as_mut() {
                Some(current) if current.version == update.base_version => current,
                other => {
                    return Err(SnapshotError::LoadsBaseMismatch {
                        base: update.base_version,
                        applied: other.map(|current| current.version.clone()),
                    });
                }
            };
            let removed: HashSet<String> = update
                .removed
                .iter()
                .map(|gone| switchyard_snapshot::object_key(&gone.namespace, &gone.pod))
                .collect();
            // One pass over the endpoints: a pod may be several (one per target port).
            if let Some(table) = &table {
                for pod in table.pods.values() {
                    if let Some(load) = loads.get(&pod.load_key) {
                        pod.set_load(Some(load.clone()));
                    } else if removed.contains(&pod.load_key) {
                        pod.set_load(None);
                    }
                }
            }
            for key in &removed {
                current.loads.remove(key);
            }
            current.loads.extend(loads);
            version.clone_into(&mut current.version);
            current.ejections = ejections;
        }
        if let (Some(table), Some(held)) = (&table, held.as_ref()) {
            apply_fleet_ejections(table, &held.ejections);
        }
        self.scheduling
            .set_loads_observed_at(update.observed_at_unix_ms);
        self.fairness.wake_all();
        Ok(())
    }
}

impl SnapshotSink for SnapshotStore {
    fn apply_route_config(&self, version: &str, config: Bytes) -> Result<(), Nack> {
        SnapshotStore::apply_encoded_route_config(self, version, config)
            .map_err(SnapshotError::into_nack)
    }

    fn apply_endpoint_loads(&self, version: &str, loads: Bytes) -> Result<(), Nack> {
        SnapshotStore::apply_encoded_endpoint_loads(self, version, loads)
            .map_err(SnapshotError::into_nack)
    }

    fn reclaim(&self) {
        SnapshotStore::reclaim(self);
    }

    fn ejections(&self) -> Option<watch::Receiver<u64>> {
        Some(SnapshotStore::ejections(self))
    }

    fn outlier_report(&self) -> pb::OutlierReport {
        SnapshotStore::outlier_report(self)
    }

    fn fairness_report_interval(&self) -> Option<Duration> {
        self.fairness.report_interval()
    }

    fn fairness_usage_report(&self, everything: bool) -> Option<pb::FairnessUsageReport> {
        self.fairness.usage_report(everything)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_snapshot::test_builders::{pd_group, route, route_config, server};

    fn config() -> pb::RouteConfig {
        route_config(
            vec![route("r", "m", "s")],
            vec![server("s", &[("p1", "127.0.0.11"), ("p2", "127.0.0.12")])],
        )
    }

    /// Notes, for every table it is told of, the version the store was
    /// serving at that moment, and counts reclaims.
    #[derive(Debug, Default)]
    struct Watcher {
        store: std::sync::OnceLock<std::sync::Weak<SnapshotStore>>,
        seen: Mutex<Vec<(String, Option<String>)>>,
        reclaims: std::sync::atomic::AtomicUsize,
    }

    impl TableObserver for Watcher {
        fn before_visible(&self, table: &RoutingTable) {
            let serving = self
                .store
                .get()
                .and_then(std::sync::Weak::upgrade)
                .and_then(|store| store.table())
                .map(|table| table.version.clone());
            self.seen.lock().push((table.version.clone(), serving));
        }

        fn reclaim(&self) {
            self.reclaims
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[test]
    fn what_must_exist_for_a_table_is_made_before_requests_see_it() {
        let watcher = Arc::new(Watcher::default());
        let store = Arc::new(SnapshotStore::new().with_table_observer(watcher.clone()));
        watcher.store.set(Arc::downgrade(&store)).expect("set once");
        store.apply_route_config("v1", config()).expect("valid");
        store.apply_route_config("v2", config()).expect("valid");
        assert_eq!(
            *watcher.seen.lock(),
            [
                ("v1".to_owned(), None),
                ("v2".to_owned(), Some("v1".to_owned()))
            ],
            "told of each table before the swap, the old table still served"
        );
        assert_eq!(store.table().expect("table").version, "v2");
        let reclaims = || watcher.reclaims.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(reclaims(), 0, "applying reclaims only tables");
        SnapshotSink::reclaim(&*store);
        assert_eq!(reclaims(), 1, "the periodic reclaim reaches the observer");
    }

    #[test]
    fn pod_state_survives_swaps() {
        let store = SnapshotStore::new();
        store.apply_route_config("v1", config()).expect("valid");
        let table = store.table().expect("table");
        let pod = table.pods["default/p1"].clone();
        let _guard = pod.begin_request();
        let mut next = config();
        next.routes[0].model_name = "renamed".into();
        store.apply_route_config("v2", next).expect("valid");
        let table = store.table().expect("table");
        assert_eq!(table.version, "v2");
        assert_eq!(table.pods["default/p1"].in_flight(), 1);
        assert!(Arc::ptr_eq(&table.pods["default/p1"], &pod));
    }

    #[test]
    fn a_replaced_table_is_freed_by_the_applying_thread_once_unused() {
        let store = SnapshotStore::new();
        store.apply_route_config("v1", config()).expect("valid");
        let held_by_a_request = store.table().expect("table");
        let v1 = Arc::downgrade(&held_by_a_request);
        store.apply_route_config("v2", config()).expect("valid");
        assert!(v1.upgrade().is_some(), "still in use");
        drop(held_by_a_request);
        assert!(
            v1.upgrade().is_some(),
            "the request's release does not free it"
        );
        store.reclaim();
        assert!(v1.upgrade().is_none(), "freed by reclaim");
        let v2 = Arc::downgrade(&store.table().expect("table"));
        store.apply_route_config("v3", config()).expect("valid");
        assert!(v2.upgrade().is_none(), "unused: freed by the apply itself");
    }

    #[test]
    fn invalid_config_keeps_previous_table() {
        let store = SnapshotStore::new();
        store.apply_route_config("v1", config()).expect("valid");
        let cases: Vec<(pb::RouteConfig, &str)> = vec![
            (
                {
                    let mut c = config();
                    c.routes[0].rules[0].targets[0].model_server = "default/missing".into();
                    c
                },
                "not in the snapshot",
            ),
            (
                {
                    let mut c = config();
                    c.routes[0].rules[0].targets[0].weight = 0;
                    c
                },
                "positive weight",
            ),
            (
                {
                    let mut c = config();
                    c.servers[0].endpoints[0].ip = "not-an-ip".into();
                    c
                },
                "invalid IP",
            ),
            (
                {
                    let mut c = config();
                    c.routes[0].rules[0].r#match = Some(pb::ModelMatch {
                        uri: Some(pb::StringMatch {
                            kind: Some(pb::string_match::Kind::Regex("(".into())),
                        }),
                        ..Default::default()
                    });
                    c
                },
                "invalid regex",
            ),
            (
                {
                    let mut c = config();
                    c.servers.push(c.servers[0].clone());
                    c
                },
                "duplicate ModelServer",
            ),
            (
                {
                    let mut c = config();
                    c.servers[0].port = 70000;
                    c
                },
                "invalid port",
            ),
            (
                {
                    let mut c = config();
                    c.scheduler = Some(pb::SchedulerConfig {
                        scores: vec![pb::ScorePlugin {
                            name: "kvcache-aware".into(),
                            weight: 1,
                        }],
                        ..Default::default()
                    });
                    c
                },
                "scheduler configuration: unknown score plugin \"kvcache-aware\"",
            ),
            (
                {
                    let mut c = config();
                    c.auth = Some(pb::AuthConfig {
                        api_keys: vec![pb::ApiKey {
                            key_sha256: vec![0; 4],
                            user_id: "u".into(),
                            tier: String::new(),
                        }],
                        jwt: None,
                    });
                    c
                },
                "authentication: API key 0: digest is 4 bytes, not 32",
            ),
            (
                {
                    let mut c = config();
                    c.routes[0].rate_limit = Some(pb::RateLimit {
                        input_tokens_per_unit: 10,
                        unit: "week".into(),
                        ..Default::default()
                    });
                    c
                },
                "rate limits: ModelRoute default/r: unknown rate limit unit \"week\"",
            ),
        ];
        for (bad, expected) in cases {
            let error = store.apply_route_config("bad", bad).expect_err(expected);
            assert!(
                error.to_string().contains(expected),
                "{error} vs {expected}"
            );
            assert_eq!(store.table().expect("table").version, "v1");
            assert_eq!(error.into_nack().reason, pb::NackReason::InvalidResource);
        }
    }

    fn waiting(pod: &str, requests_waiting: f64) -> pb::EndpointLoad {
        pb::EndpointLoad {
            namespace: "default".into(),
            pod: pod.into(),
            requests_waiting,
            ..Default::default()
        }
    }

    fn waiting_of(table: &RoutingTable, pod: &str) -> Option<f64> {
        table.pods[pod].load().map(|load| load.requests_waiting)
    }

    #[test]
    fn loads_reach_pods_even_when_sent_before_their_route_config() {
        let store = SnapshotStore::new();
        store
            .apply_endpoint_loads(
                "l1",
                pb::EndpointLoads {
                    loads: vec![waiting("p2", 3.0)],
                    ..Default::default()
                },
            )
            .expect("whole set");
        store.apply_route_config("v1", config()).expect("valid");
        let table = store.table().expect("table");
        assert_eq!(
            table.pods["default/p2"]
                .load()
                .expect("load")
                .requests_waiting,
            3.0
        );
        assert!(table.pods["default/p1"].load().is_none());
        assert_eq!(store.loads_version().as_deref(), Some("l1"));
    }

    #[test]
    fn an_update_changes_only_the_pods_it_names_and_the_pass_time() {
        let store = SnapshotStore::new();
        store.apply_route_config("v1", config()).expect("valid");
        let whole = pb::EndpointLoads {
            loads: vec![waiting("p1", 1.0), waiting("p2", 2.0)],
            observed_at_unix_ms: 5_000,
            ..Default::default()
        };
        store.apply_endpoint_loads("l1", whole).expect("whole set");
        let table = store.table().expect("table");
        let untouched = table.pods["default/p1"].load().expect("load");

        let update = pb::EndpointLoads {
            loads: vec![waiting("p2", 7.0)],
            base_version: "l1".into(),
            observed_at_unix_ms: 6_000,
            ..Default::default()
        };
        store
            .apply_endpoint_loads("l2", update)
            .expect("update of l1");
        assert_eq!(store.loads_version().as_deref(), Some("l2"));
        assert_eq!(waiting_of(&table, "default/p2"), Some(7.0));
        let p1 = table.pods["default/p1"].load().expect("load");
        assert!(Arc::ptr_eq(&p1, &untouched), "p1 is not in the update");
        assert_eq!(store.scheduling().observed_at(&p1), 6_000);

        let removal = pb::EndpointLoads {
            base_version: "l2".into(),
            removed: vec![pb::EndpointRef {
                namespace: "default".into(),
                pod: "p1".into(),
            }],
            ..Default::default()
        };
        store
            .apply_endpoint_loads("l3", removal)
            .expect("update of l2");
        assert_eq!(waiting_of(&table, "default/p1"), None);
        // A later table gets the updated set.
        store.apply_route_config("v2", config()).expect("valid");
        let table = store.table().expect("table");
        assert_eq!(waiting_of(&table, "default/p1"), None);
        assert_eq!(waiting_of(&table, "default/p2"), Some(7.0));
    }

    #[test]
    fn an_update_of_another_version_is_rejected_and_changes_nothing() {
        let store = SnapshotStore::new();
        store.apply_route_config("v1", config()).expect("valid");
        let update = |base: &str| pb::EndpointLoads {
            loads: vec![waiting("p1", 9.0)],
            base_version: base.into(),
            ..Default::default()
        };
        let error = store
            .apply_endpoint_loads("l2", update("l1"))
            .expect_err("nothing to update");
        assert!(matches!(
            error,
            SnapshotError::LoadsBaseMismatch { applied: None, .. }
        ));
        let whole = pb::EndpointLoads {
            loads: vec![waiting("p1", 1.0)],
            ..Default::default()
        };
        store.apply_endpoint_loads("l1", whole).expect("whole set");
        let error = store
            .apply_endpoint_loads("l3", update("l2"))
            .expect_err("l2 was never applied");
        assert_eq!(
            error.to_string(),
            "EndpointLoads update applies to version \"l2\", but this dataplane holds \"l1\""
        );
        assert_eq!(
            error.into_nack().reason,
            pb::NackReason::UnknownBaseVersion,
            "the controller answers with the whole set"
        );
        assert_eq!(store.loads_version().as_deref(), Some("l1"));
        assert_eq!(
            waiting_of(&store.table().expect("table"), "default/p1"),
            Some(1.0)
        );
    }

    fn ejection(pod: &str, until_unix_ms: i64) -> pb::PodEjection {
        pb::PodEjection {
            until_unix_ms,
            ..switchyard_snapshot::test_builders::ejection(pod)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_fleets_ejections_apply_to_every_table_within_the_cap() {
        let store = SnapshotStore::new();
        let soon = clock::unix_ms_now() + 60_000;
        store
            .apply_endpoint_loads(
                "l1",
                pb::EndpointLoads {
                    ejections: vec![ejection("p1", soon), ejection("p2", soon)],
                    ..Default::default()
                },
            )
            .expect("whole set");
        store.apply_route_config("v1", config()).expect("valid");
        let table = store.table().expect("table");
        let ejected = |table: &RoutingTable| {
            let now = clock::now();
            let mut pods: Vec<_> = table
                .pods
                .values()
                .filter(|pod| pod.is_ejected(now))
                .map(|pod| pod.name.clone())
                .collect();
            pods.sort();
            pods
        };
        assert_eq!(
            ejected(&table),
            ["p1"],
            "one of the two pods at most: p2 stays"
        );
        assert!(
            store.outlier_report().ejections.is_empty(),
            "the fleet's ejections are not reported back"
        );
        // An update carries the whole list: p1's ejection is over.
        store
            .apply_endpoint_loads(
                "l2",
                pb::EndpointLoads {
                    base_version: "l1".into(),
                    ejections: vec![],
                    ..Default::default()
                },
            )
            .expect("update");
        assert_eq!(
            ejected(&table),
            ["p1"],
            "an ejection in force is never shortened"
        );
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(ejected(&table).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn this_dataplanes_own_ejections_are_reported() {
        let store = SnapshotStore::new();
        let mut woken = store.ejections();
        store.apply_route_config("v1", config()).expect("valid");
        let table = store.table().expect("table");
        let server = &table.servers[0];
        let pod = &server.pods[1];
        server.outlier.record_failure(
            &server.pods,
            pod,
            crate::pod::outlier::Failure::ConnectFailure,
            clock::now(),
        );
        assert!(woken.has_changed().expect("open"));
        woken.borrow_and_update();
        let report = store.outlier_report();
        assert_eq!(report.ejections.len(), 1);
        let reported = &report.ejections[0];
        assert_eq!(
            (
                reported.namespace.as_str(),
                reported.pod.as_str(),
                reported.reason.as_str()
            ),
            ("default", "p2", "connect_failure")
        );
        assert_eq!(
            reported.remaining_ms,
            u64::try_from(crate::pod::outlier::DEFAULT_BASE_EJECTION_TIME.as_millis())
                .expect("fits")
        );
    }

    #[test]
    fn models_body_lists_names_and_adapters() {
        let mut c = config();
        c.routes.push(pb::ModelRoute {
            name: "lora".into(),
            lora_adapters: vec!["lora-B".into(), "lora-A".into()],
            ..route("lora", "", "s")
        });
        let table = RoutingTable::standalone("v", c).expect("valid");
        let body: serde_json::Value = serde_json::from_slice(&table.models_body).expect("json");
        let ids: Vec<&str> = body["data"]
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|m| m["id"].as_str())
            .collect();
        assert_eq!(ids, vec!["lora-A", "lora-B", "m"]);
        assert_eq!(body["object"], "list");
    }

    fn pd_config(groups: Vec<pb::PdGroup>, connector: pb::KvConnector) -> pb::RouteConfig {
        let mut config = config();
        let server = &mut config.servers[0];
        server.endpoints.push(pb::Endpoint {
            name: "p3".into(),
            ip: "127.0.0.13".into(),
            bootstrap_port: 9001,
            ..Default::default()
        });
        server.prefill_decode = Some(pb::PrefillDecode {
            kv_connector: connector.into(),
            group_label: "group".into(),
            groups,
        });
        config
    }

    #[test]
    fn prefill_decode_groups_are_indexed_by_pod() {
        let store = SnapshotStore::new();
        let groups = vec![pd_group("a", &["p3"], &["p1"]), pd_group("b", &[], &["p2"])];
        store
            .apply_route_config("v1", pd_config(groups, pb::KvConnector::Sglang))
            .expect("valid");
        let table = store.table().expect("table");
        let pd = table.servers[0].prefill_decode.as_ref().expect("PD");
        assert_eq!(pd.connector, KvConnector::Sglang);
        assert_eq!(pd.group_of, [0, 1, 0], "p1, p2, p3");
        assert_eq!(pd.decode_candidates, [0], "group b has no prefill pod");
        assert_eq!(pd.bootstrap_ports, [0, 0, 9001]);
        assert_eq!(
            (
                pd.groups[0].prefill.as_slice(),
                pd.groups[0].decode.as_slice()
            ),
            (&[2][..], &[0][..])
        );
    }

    #[test]
    fn inconsistent_prefill_decode_groups_are_rejected() {
        let cases = [
            (
                vec![pd_group("a", &["p3"], &["gone"])],
                pb::KvConnector::Http,
                "group \"a\": pod gone is not an endpoint",
            ),
            (
                vec![pd_group("a", &["p3"], &["p3"])],
                pb::KvConnector::Http,
                "pod p3 is in more than one group or role",
            ),
            (
                vec![pd_group("b", &["p3"], &["p1"]), pd_group("a", &[], &["p2"])],
                pb::KvConnector::Http,
                "not sorted by name",
            ),
            (
                vec![pd_group("a", &["p3"], &["p1"])],
                pb::KvConnector::Unspecified,
                "unknown KV connector 0",
            ),
        ];
        let store = SnapshotStore::new();
        store.apply_route_config("v1", config()).expect("valid");
        for (groups, connector, expected) in cases {
            let error = store
                .apply_route_config("bad", pd_config(groups, connector))
                .expect_err(expected);
            assert!(error.to_string().contains(expected), "{error}");
            assert!(
                error
                    .to_string()
                    .starts_with("ModelServer default/s: prefill/decode "),
                "{error}"
            );
            assert_eq!(store.table().expect("table").version, "v1");
        }
    }
}
