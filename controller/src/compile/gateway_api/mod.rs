//! Gateway API mode: the GatewayClasses and Gateways Switchyard implements,
//! their listeners, how routes (HTTPRoutes, and ModelRoutes through their
//! `parentRefs`) attach to those listeners, HTTPRoutes and InferencePools,
//! all compiled into the snapshot with the facts their status is made of.
//!
//! A Gateway is Switchyard's when its GatewayClass's `controllerName` is
//! [`GatewayApiConfig::controller_name`]; every other Gateway, and every
//! parentRef to one, is left to its own controller (no status written).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use switchyard_crd::gateway_api::{GatewayStatusAddress, Listener, RouteGroupKind};
use switchyard_crd::{GATEWAY_API_GROUP, Gateway, GatewayClass, ParentReference};
use switchyard_snapshot::{object_key, pb};

use super::report::{ConditionReport, Problem, Reason};
use super::{first_of_its_name, key_of, namespace_of, non_empty};

pub mod defaults;
pub(crate) mod http_routes;
pub(crate) mod inference_pools;
#[cfg(test)]
mod tests;

pub use defaults::{GatewayDefaults, default_gateway, default_gateway_class};
pub use http_routes::{HttpRouteReport, RouteParentReport};
pub use inference_pools::{InferencePoolReport, PoolParentReport};

/// Switchyard's `controllerName` when `--gateway-controller-name` is not given.
pub const DEFAULT_CONTROLLER_NAME: &str = "switchyard.dev/gateway-controller";
/// The only listener protocol dataplanes serve (TLS is terminated in front of them).
const HTTP_PROTOCOL: &str = "HTTP";
/// API group of ModelRoute, a route kind Switchyard's listeners take too.
const MODEL_ROUTE_GROUP: &str = switchyard_crd::GROUP;

/// How the Gateway API kinds are compiled (`--enable-gateway-api` and friends).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GatewayApiConfig {
    /// GatewayClasses, Gateways and HTTPRoutes are compiled.
    pub enabled: bool,
    /// InferencePools are compiled (HTTPRoutes can send to them; the
    /// endpoint picker serves them).
    pub inference_extension: bool,
    /// The `controllerName` of the GatewayClasses Switchyard implements.
    pub controller_name: String,
    /// `(namespace, name)` of the Gateway whose listeners also serve the
    /// ModelRoutes without parentRefs, on the dataplanes' traffic port.
    pub default_gateway: Option<(String, String)>,
}

impl GatewayApiConfig {
    /// Gateway API mode off (the default), as every compile before it existed.
    pub fn disabled() -> Self {
        Self::default()
    }
}

/// The Gateway API half of a compile's reports (status facts per object).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayApiReports {
    /// Switchyard's GatewayClasses only.
    pub gateway_classes: Vec<GatewayClassReport>,
    /// Gateways of Switchyard's GatewayClasses only.
    pub gateways: Vec<GatewayReport>,
    /// HTTPRoutes with at least one parentRef to a Switchyard Gateway.
    pub http_routes: Vec<HttpRouteReport>,
    pub inference_pools: Vec<InferencePoolReport>,
    /// Objects of Gateway API kinds read while their mode is off (local
    /// files): not compiled, and said so here.
    pub ignored: Vec<IgnoredObject>,
}

impl GatewayApiReports {
    /// Lists the `kind` object of `metadata` as ignored for `reason`.
    fn ignore(&mut self, kind: &'static str, metadata: &ObjectMeta, reason: &str) {
        self.ignored.push(IgnoredObject {
            kind,
            namespace: metadata.namespace.clone(),
            name: metadata.name.clone().unwrap_or_default(),
            reason: reason.to_owned(),
        });
    }

    /// Lists a `kind` object whose namespace and name came earlier as ignored.
    fn ignore_duplicate(&mut self, kind: &'static str, metadata: &ObjectMeta) {
        let reason = format!("another {kind} of this namespace and name came earlier in the input");
        self.ignore(kind, metadata, &reason);
    }
}

/// An object read but not compiled, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IgnoredObject {
    pub kind: &'static str,
    pub namespace: Option<String>,
    pub name: String,
    pub reason: String,
}

/// What the compile concluded about a GatewayClass of Switchyard's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GatewayClassReport {
    pub name: String,
    pub generation: Option<i64>,
    pub accepted: ConditionReport,
}

/// What the compile concluded about a Gateway of Switchyard's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GatewayReport {
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    pub accepted: ConditionReport,
    /// In `spec.listeners` order.
    pub listeners: Vec<ListenerReport>,
    /// Some listener of it is in the snapshot.
    pub in_snapshot: bool,
}

/// One listener's conditions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerReport {
    pub name: String,
    pub supported_kinds: Vec<RouteGroupKind>,
    /// Routes (HTTPRoutes and ModelRoutes) in the snapshot that serve on it.
    pub attached_routes: u32,
    pub accepted: ConditionReport,
    pub resolved_refs: ConditionReport,
    pub conflicted: ConditionReport,
    /// Dataplanes serve it.
    pub in_snapshot: bool,
}

/// A listener a route serves on: `(gateway key, listener name)`.
pub(crate) type ListenerKey = (String, String);

/// Which namespaces a listener takes routes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AllowedNamespaces {
    Same,
    All,
}

/// The route kinds a listener may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum RouteKind {
    HttpRoute,
    ModelRoute,
}

impl RouteKind {
    fn group_kind(self) -> RouteGroupKind {
        match self {
            Self::HttpRoute => RouteGroupKind {
                group: Some(GATEWAY_API_GROUP.to_owned()),
                kind: "HTTPRoute".to_owned(),
            },
            Self::ModelRoute => RouteGroupKind {
                group: Some(MODEL_ROUTE_GROUP.to_owned()),
                kind: "ModelRoute".to_owned(),
            },
        }
    }

    fn of(kind: &RouteGroupKind) -> Option<Self> {
        let group = kind.group.as_deref().unwrap_or(GATEWAY_API_GROUP);
        match (group, kind.kind.as_str()) {
            (GATEWAY_API_GROUP, "HTTPRoute") => Some(Self::HttpRoute),
            (MODEL_ROUTE_GROUP, "ModelRoute") => Some(Self::ModelRoute),
            _ => None,
        }
    }
}

/// A listener as routes attach to it.
#[derive(Debug)]
struct ListenerEntry {
    name: String,
    port: u16,
    /// Lower case; `None` = every host.
    hostname: Option<String>,
    allowed: AllowedNamespaces,
    kinds: Vec<RouteKind>,
    /// Accepted, not conflicted: dataplanes serve it.
    usable: bool,
}

/// A Gateway of Switchyard's, as routes attach to it.
#[derive(Debug)]
struct GatewayEntry {
    namespace: String,
    listeners: Vec<ListenerEntry>,
}

/// Switchyard's Gateways and their listeners, built once per compile; routes
/// resolve their parentRefs against it.
#[derive(Debug, Default)]
pub(crate) struct ListenerIndex {
    /// By gateway key (`namespace/name`).
    gateways: BTreeMap<String, GatewayEntry>,
}

/// Where a parentRef leads.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Attachment {
    /// Not a Gateway of Switchyard's: another controller's business.
    NotOurs,
    /// The listeners the route serves on (never empty).
    Attached(Vec<ListenerKey>),
    /// A Gateway of Switchyard's that takes the route on none of its listeners.
    Rejected(Problem),
}

impl ListenerIndex {
    /// Resolves one parentRef of a route of `kind` in `route_namespace` with
    /// `hostnames` (lower case; empty = every host).
    pub(crate) fn attach(
        &self,
        route_namespace: &str,
        kind: RouteKind,
        hostnames: &[String],
        parent: &ParentReference,
    ) -> Attachment {
        let group = non_empty(parent.group.as_deref()).unwrap_or(GATEWAY_API_GROUP);
        let parent_kind = non_empty(parent.kind.as_deref()).unwrap_or("Gateway");
        if group != GATEWAY_API_GROUP || parent_kind != "Gateway" {
            return Attachment::NotOurs;
        }
        let namespace = non_empty(parent.namespace.as_deref()).unwrap_or(route_namespace);
        let key = object_key(namespace, &parent.name);
        let Some(gateway) = self.gateways.get(&key) else {
            return Attachment::NotOurs;
        };
        let named: Vec<&ListenerEntry> = gateway
            .listeners
            .iter()
            .filter(|listener| {
                parent
                    .section_name
                    .as_deref()
                    .is_none_or(|section| section == listener.name)
                    && parent
                        .port
                        .is_none_or(|port| i32::from(listener.port) == port)
            })
            .collect();
        let usable: Vec<&ListenerEntry> = named
            .iter()
            .copied()
            .filter(|listener| listener.usable)
            .collect();
        if usable.is_empty() {
            let what = match (&parent.section_name, parent.port) {
                (Some(section), _) => format!("no usable listener named {section:?}"),
                (None, Some(port)) => format!("no usable listener on port {port}"),
                (None, None) => "no usable listener".to_owned(),
            };
            return Attachment::Rejected(Problem::new(
                Reason::NoMatchingParent,
                format!("Gateway {key} has {what}"),
            ));
        }
        let allowed: Vec<&ListenerEntry> = usable
            .into_iter()
            .filter(|listener| {
                listener.kinds.contains(&kind)
                    && (listener.allowed == AllowedNamespaces::All
                        || gateway.namespace == route_namespace)
            })
            .collect();
        if allowed.is_empty() {
            return Attachment::Rejected(Problem::new(
                Reason::NotAllowedByListeners,
                format!(
                    "the listeners of Gateway {key} do not allow {} routes from namespace {route_namespace} (allowedRoutes)",
                    kind.group_kind().kind
                ),
            ));
        }
        let keys: Vec<ListenerKey> = allowed
            .into_iter()
            .filter(|listener| hostnames_intersect(listener.hostname.as_deref(), hostnames))
            .map(|listener| (key.clone(), listener.name.clone()))
            .collect();
        if keys.is_empty() {
            return Attachment::Rejected(Problem::new(
                Reason::NoMatchingListenerHostname,
                format!(
                    "no listener of Gateway {key} takes any of the route's hostnames {hostnames:?}"
                ),
            ));
        }
        Attachment::Attached(keys)
    }
}

/// Whether a route with `hostnames` may serve on a listener with `listener`:
/// they share a host (a wildcard takes one or more labels before its suffix).
fn hostnames_intersect(listener: Option<&str>, hostnames: &[String]) -> bool {
    let Some(listener) = listener else {
        return true;
    };
    hostnames.is_empty()
        || hostnames.iter().any(|route| {
            route == listener
                || wildcard_covers(listener, route)
                || wildcard_covers(route, listener)
        })
}

/// `*.example.com` covers `a.example.com` and `a.b.example.com`, not `example.com`.
pub(crate) fn wildcard_covers(pattern: &str, host: &str) -> bool {
    let Some(suffix) = pattern.strip_prefix('*') else {
        return false;
    };
    host.len() > suffix.len() && host.ends_with(suffix)
}

/// A Gateway API hostname: lower-cased; `None` when it is not a DNS name
/// (optionally `*.`-prefixed), as the API's validation requires.
pub(crate) fn normalize_hostname(hostname: &str) -> Option<String> {
    let lower = hostname.to_ascii_lowercase();
    let name = lower.strip_prefix("*.").unwrap_or(&lower);
    let valid = !name.is_empty()
        && lower.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    valid.then_some(lower)
}

/// The Gateway API objects compiled into the snapshot, before routes attach.
pub(crate) struct CompiledGateways {
    pub index: ListenerIndex,
    pub gateways: Vec<pb::Gateway>,
    pub default_gateway: String,
    pub classes: Vec<GatewayClassReport>,
    pub reports: Vec<GatewayReport>,
}

/// Compiles Switchyard's GatewayClasses and their Gateways.
pub(crate) fn compile_gateways(
    classes: &[GatewayClass],
    gateways: &[Gateway],
    config: &GatewayApiConfig,
) -> CompiledGateways {
    let mut ours: BTreeSet<&str> = BTreeSet::new();
    let mut class_reports = Vec::new();
    for class in classes {
        if class.spec.controller_name != config.controller_name {
            continue;
        }
        let name = class.metadata.name.as_deref().unwrap_or_default();
        if name.is_empty() || !ours.insert(name) {
            continue;
        }
        let accepted = match &class.spec.parameters_ref {
            Some(_) => ConditionReport::ok(
                Reason::Accepted,
                "spec.parametersRef is not read: Switchyard's GatewayClasses take no parameters",
            ),
            None => ConditionReport::ok(Reason::Accepted, "Switchyard implements this class"),
        };
        class_reports.push(GatewayClassReport {
            name: name.to_owned(),
            generation: class.metadata.generation,
            accepted,
        });
    }

    // Oldest first, so on a conflict the listener that was there first keeps its port.
    let mut ordered: Vec<&Gateway> = gateways
        .iter()
        .filter(|gateway| ours.contains(gateway.spec.gateway_class_name.as_str()))
        .collect();
    ordered.sort_by_key(|gateway| {
        (
            gateway
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(0, |time| time.0.as_millisecond()),
            namespace_of(&gateway.metadata).to_owned(),
            gateway.metadata.name.clone().unwrap_or_default(),
        )
    });

    let mut index = ListenerIndex::default();
    let mut reports = Vec::new();
    let mut compiled = Vec::new();
    // (port, hostname) of every listener already taken, and by whom.
    let mut taken: BTreeMap<(u16, String), String> = BTreeMap::new();
    for gateway in ordered {
        let namespace = namespace_of(&gateway.metadata);
        let Some(name) = non_empty(gateway.metadata.name.as_deref()) else {
            continue;
        };
        let key = object_key(namespace, name);
        if index.gateways.contains_key(&key) {
            // A second local document of the same Gateway: the first one wins.
            continue;
        }
        let mut entries = Vec::new();
        let mut listener_reports = Vec::new();
        let mut names = BTreeSet::new();
        for listener in &gateway.spec.listeners {
            let (entry, report) = compile_listener(
                listener,
                &key,
                names.insert(listener.name.as_str()),
                &mut taken,
            );
            listener_reports.push(report);
            entries.extend(entry);
        }
        let usable = entries.iter().filter(|entry| entry.usable).count();
        let total = gateway.spec.listeners.len();
        let mut notes = Vec::new();
        if !gateway.spec.addresses.is_empty() {
            notes.push(
                "spec.addresses is not used: the Gateway's addresses are the dataplanes' (--gateway-addresses)",
            );
        }
        let accepted = if usable == total && total > 0 {
            ConditionReport::ok(Reason::Accepted, notes.join("; "))
        } else if usable > 0 {
            ConditionReport::ok(
                Reason::ListenersNotValid,
                format!("{usable} of {total} listeners are served; see the listeners' conditions"),
            )
        } else {
            ConditionReport {
                status: false,
                reason: Reason::ListenersNotValid,
                message: if total == 0 {
                    "spec.listeners: the Gateway has no listener".to_owned()
                } else {
                    "no listener can be served; see the listeners' conditions".to_owned()
                },
            }
        };
        let mut listeners: Vec<pb::GatewayListener> = entries
            .iter()
            .filter(|entry| entry.usable)
            .map(|entry| pb::GatewayListener {
                name: entry.name.clone(),
                port: u32::from(entry.port),
                hostname: entry.hostname.clone().unwrap_or_default(),
            })
            .collect();
        listeners.sort_by(|a, b| a.name.cmp(&b.name));
        if !listeners.is_empty() {
            compiled.push(pb::Gateway {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                listeners,
            });
        }
        reports.push(GatewayReport {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            generation: gateway.metadata.generation,
            accepted,
            listeners: listener_reports,
            in_snapshot: usable > 0,
        });
        index.gateways.insert(
            key,
            GatewayEntry {
                namespace: namespace.to_owned(),
                listeners: entries,
            },
        );
    }
    compiled.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    reports.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let default_gateway = config
        .default_gateway
        .as_ref()
        .map(|(namespace, name)| object_key(namespace, name))
        .filter(|key| {
            compiled
                .iter()
                .any(|g| object_key(&g.namespace, &g.name) == *key)
        })
        .unwrap_or_default();
    CompiledGateways {
        index,
        gateways: compiled,
        default_gateway,
        classes: class_reports,
        reports,
    }
}

/// One listener: its entry (when its port is valid) and its conditions.
fn compile_listener(
    listener: &Listener,
    gateway: &str,
    unique_name: bool,
    taken: &mut BTreeMap<(u16, String), String>,
) -> (Option<ListenerEntry>, ListenerReport) {
    let mut problems = Vec::new();
    if !unique_name {
        problems.push(Problem::new(
            Reason::UnsupportedValue,
            format!(
                "another listener of the Gateway is named {:?}",
                listener.name
            ),
        ));
    }
    if listener.protocol != HTTP_PROTOCOL {
        problems.push(Problem::new(
            Reason::UnsupportedProtocol,
            format!(
                "protocol {:?} is not supported: dataplanes serve HTTP listeners (terminate TLS in front of them)",
                listener.protocol
            ),
        ));
    }
    let port = u16::try_from(listener.port).ok().filter(|port| *port != 0);
    if port.is_none() {
        problems.push(Problem::new(
            Reason::PortUnavailable,
            format!("port {} is outside 1..=65535", listener.port),
        ));
    }
    let hostname = match non_empty(listener.hostname.as_deref()) {
        None => Some(None),
        Some(hostname) => normalize_hostname(hostname).map(Some),
    };
    if hostname.is_none() {
        problems.push(Problem::new(
            Reason::UnsupportedValue,
            format!(
                "hostname {:?} is not a DNS name (optionally prefixed by \"*.\")",
                listener.hostname.as_deref().unwrap_or_default()
            ),
        ));
    }
    let allowed_routes = listener.allowed_routes.as_ref();
    let allowed = match allowed_routes
        .and_then(|routes| routes.namespaces.as_ref())
        .and_then(|namespaces| non_empty(namespaces.from.as_deref()))
    {
        None | Some("Same") => AllowedNamespaces::Same,
        Some("All") => AllowedNamespaces::All,
        Some(other) => {
            problems.push(Problem::new(
                Reason::UnsupportedValue,
                format!(
                    "allowedRoutes.namespaces.from {other:?} is not supported (Switchyard does not read Namespaces): use Same or All"
                ),
            ));
            AllowedNamespaces::Same
        }
    };
    let requested: &[RouteGroupKind] = allowed_routes.map_or(&[], |routes| &routes.kinds);
    let mut kinds: Vec<RouteKind> = if requested.is_empty() {
        vec![RouteKind::HttpRoute, RouteKind::ModelRoute]
    } else {
        requested.iter().filter_map(RouteKind::of).collect()
    };
    kinds.sort();
    kinds.dedup();
    let invalid_kinds: Vec<String> = requested
        .iter()
        .filter(|kind| RouteKind::of(kind).is_none())
        .map(|kind| {
            format!(
                "{}/{}",
                kind.group.as_deref().unwrap_or(GATEWAY_API_GROUP),
                kind.kind
            )
        })
        .collect();
    let resolved_refs = if invalid_kinds.is_empty() {
        ConditionReport::ok(Reason::ResolvedRefs, "")
    } else {
        ConditionReport {
            status: false,
            reason: Reason::InvalidRouteKinds,
            message: format!(
                "allowedRoutes.kinds {invalid_kinds:?} are not route kinds Switchyard serves (HTTPRoute, ModelRoute)"
            ),
        }
    };
    let accepted = ConditionReport::from_problems(&problems, Reason::Accepted, "");
    let mut conflicted = ConditionReport {
        status: false,
        reason: Reason::NoConflicts,
        message: String::new(),
    };
    let (entry, in_snapshot) = match (port, hostname) {
        (Some(port), Some(hostname)) if accepted.status => {
            let slot = (port, hostname.clone().unwrap_or_default());
            let usable = match taken.get(&slot) {
                Some(owner) => {
                    conflicted = ConditionReport {
                        status: true,
                        reason: Reason::HostnameConflict,
                        message: format!(
                            "listener {owner} already serves port {port} with hostname {:?}",
                            slot.1
                        ),
                    };
                    false
                }
                None => {
                    taken.insert(slot, format!("{gateway}/{}", listener.name));
                    true
                }
            };
            let entry = ListenerEntry {
                name: listener.name.clone(),
                port,
                hostname,
                allowed,
                kinds: kinds.clone(),
                usable,
            };
            (Some(entry), usable)
        }
        _ => (None, false),
    };
    let report = ListenerReport {
        name: listener.name.clone(),
        supported_kinds: kinds.iter().map(|kind| kind.group_kind()).collect(),
        attached_routes: 0,
        accepted,
        resolved_refs,
        conflicted,
        in_snapshot,
    };
    (entry, report)
}

/// Counts, per listener of `reports`, the distinct routes whose listener
/// keys name it.
pub(crate) fn count_attached_routes<'a>(
    reports: &mut [GatewayReport],
    routes: impl Iterator<Item = &'a [pb::ListenerRef]>,
) {
    let mut counts: BTreeMap<(String, String), u32> = BTreeMap::new();
    for listeners in routes {
        let unique: BTreeSet<(&str, &str)> = listeners
            .iter()
            .map(|listener| (listener.gateway.as_str(), listener.listener.as_str()))
            .collect();
        for (gateway, listener) in unique {
            *counts
                .entry((gateway.to_owned(), listener.to_owned()))
                .or_default() += 1;
        }
    }
    for gateway in reports {
        let key = object_key(&gateway.namespace, &gateway.name);
        for listener in &mut gateway.listeners {
            listener.attached_routes = counts
                .get(&(key.clone(), listener.name.clone()))
                .copied()
                .unwrap_or(0);
        }
    }
}

/// Listener keys as the snapshot lists them: sorted, unique.
pub(crate) fn listener_refs(keys: impl IntoIterator<Item = ListenerKey>) -> Vec<pb::ListenerRef> {
    let unique: BTreeSet<ListenerKey> = keys.into_iter().collect();
    unique
        .into_iter()
        .map(|(gateway, listener)| pb::ListenerRef { gateway, listener })
        .collect()
}

/// Addresses for Gateway status from `--gateway-addresses`: IPs as
/// `IPAddress`, anything else as `Hostname`.
pub fn status_addresses(addresses: &[String]) -> Vec<GatewayStatusAddress> {
    addresses
        .iter()
        .map(|address| address.trim())
        .filter(|address| !address.is_empty())
        .map(|address| GatewayStatusAddress {
            type_: Some(
                if address.parse::<std::net::IpAddr>().is_ok() {
                    "IPAddress"
                } else {
                    "Hostname"
                }
                .to_owned(),
            ),
            value: address.to_owned(),
        })
        .collect()
}

/// The Gateway API part of one compile, before ModelRoutes are compiled
/// (they attach to its listeners) and finished after.
pub(crate) struct Stage {
    index: Option<ListenerIndex>,
    gateways: Vec<pb::Gateway>,
    default_gateway: String,
    http_routes: Vec<pb::HttpRoute>,
    inference_pools: Vec<pb::InferencePool>,
    pool_references: Vec<inference_pools::PoolReferences>,
    reports: GatewayApiReports,
}

/// What the Gateway API part adds to the snapshot and the reports.
pub(crate) struct Output {
    pub gateways: Vec<pb::Gateway>,
    pub default_gateway: String,
    pub http_routes: Vec<pb::HttpRoute>,
    pub inference_pools: Vec<pb::InferencePool>,
    pub reports: GatewayApiReports,
}

/// Compiles the InferencePools (adding their pods to `scrape_targets` when
/// no ModelServer already has them scraped), Switchyard's Gateways and the
/// HTTPRoutes; objects of a mode that is off are listed as ignored.
pub(crate) fn compile(
    objects: &super::Objects<'_>,
    config: &GatewayApiConfig,
    pods: &super::pod_index::PodIndex<'_>,
    scrape_targets: &mut Vec<crate::scrape::ScrapeTarget>,
) -> Stage {
    let mut reports = GatewayApiReports::default();

    let mut inference_pools = Vec::new();
    let mut present: BTreeSet<(&str, &str)> = BTreeSet::new();
    let mut accepted: BTreeSet<(&str, &str)> = BTreeSet::new();
    for pool in objects.inference_pools {
        if !config.inference_extension {
            reports.ignore(
                "InferencePool",
                &pool.metadata,
                "Gateway API Inference Extension mode is off: start the controller with --enable-gateway-api-inference-extension",
            );
            continue;
        }
        let key = key_of(&pool.metadata);
        if !first_of_its_name(&mut present, key) {
            reports.ignore_duplicate("InferencePool", &pool.metadata);
            continue;
        }
        let (compiled, report) = inference_pools::compile_pool(pool, pods);
        reports.inference_pools.push(report);
        if let Some(compiled) = compiled {
            accepted.insert(key);
            let scraped: BTreeSet<String> = scrape_targets
                .iter()
                .map(|target| target.key.clone())
                .collect();
            scrape_targets.extend(
                compiled
                    .scrape_targets
                    .into_iter()
                    .filter(|target| !scraped.contains(&target.key)),
            );
            inference_pools.push(compiled.pool);
        }
    }
    inference_pools.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

    if !config.enabled {
        let off = "Gateway API mode is off: start the controller with --enable-gateway-api";
        for class in objects.gateway_classes {
            reports.ignore("GatewayClass", &class.metadata, off);
        }
        for gateway in objects.gateways {
            reports.ignore("Gateway", &gateway.metadata, off);
        }
        for route in objects.http_routes {
            reports.ignore("HTTPRoute", &route.metadata, off);
        }
        return Stage {
            index: None,
            gateways: Vec::new(),
            default_gateway: String::new(),
            http_routes: Vec::new(),
            inference_pools,
            pool_references: Vec::new(),
            reports,
        };
    }

    let gateways = compile_gateways(objects.gateway_classes, objects.gateways, config);
    reports.gateway_classes = gateways.classes;
    reports.gateways = gateways.reports;
    let known_pools = http_routes::KnownPools {
        enabled: config.inference_extension,
        accepted,
        present,
    };
    let mut http_routes = Vec::new();
    let mut pool_references = Vec::new();
    let mut seen = BTreeSet::new();
    for route in objects.http_routes {
        let key = key_of(&route.metadata);
        if !first_of_its_name(&mut seen, key) {
            reports.ignore_duplicate("HTTPRoute", &route.metadata);
            continue;
        }
        let compiled = http_routes::compile_http_route(route, &gateways.index, &known_pools);
        reports.http_routes.extend(compiled.report);
        http_routes.extend(compiled.route);
        pool_references.push(compiled.references);
    }
    http_routes.sort_by(|a, b| {
        (a.creation_timestamp_unix_ms, &a.namespace, &a.name).cmp(&(
            b.creation_timestamp_unix_ms,
            &b.namespace,
            &b.name,
        ))
    });
    reports
        .http_routes
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Stage {
        index: Some(gateways.index),
        gateways: gateways.gateways,
        default_gateway: gateways.default_gateway,
        http_routes,
        inference_pools,
        pool_references,
        reports,
    }
}

impl Stage {
    /// What ModelRoutes attach to; `None` when Gateway API mode is off.
    pub(crate) fn listener_index(&self) -> Option<&ListenerIndex> {
        self.index.as_ref()
    }

    /// Counts the routes on every listener and the pools' parents.
    pub(crate) fn finish(mut self, model_routes: &[pb::ModelRoute]) -> Output {
        // Routes without parentRefs serve on the default Gateway's listeners.
        let default_listeners: Vec<pb::ListenerRef> = self
            .gateways
            .iter()
            .filter(|gateway| object_key(&gateway.namespace, &gateway.name) == self.default_gateway)
            .flat_map(|gateway| {
                gateway.listeners.iter().map(|listener| pb::ListenerRef {
                    gateway: self.default_gateway.clone(),
                    listener: listener.name.clone(),
                })
            })
            .collect();
        count_attached_routes(
            &mut self.reports.gateways,
            model_routes
                .iter()
                .map(|route| {
                    if route.listeners.is_empty() {
                        default_listeners.as_slice()
                    } else {
                        route.listeners.as_slice()
                    }
                })
                .chain(
                    self.http_routes
                        .iter()
                        .map(|route| route.listeners.as_slice()),
                ),
        );
        inference_pools::fill_parents(&mut self.reports.inference_pools, &self.pool_references);
        self.reports
            .inference_pools
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        Output {
            gateways: self.gateways,
            default_gateway: self.default_gateway,
            http_routes: self.http_routes,
            inference_pools: self.inference_pools,
            reports: self.reports,
        }
    }
}
