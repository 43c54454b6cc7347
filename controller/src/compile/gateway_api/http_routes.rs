//! HTTPRoute validation, attachment to listeners and conversion to the
//! snapshot form. A rule Switchyard cannot honour as written (a filter it
//! does not apply, an invalid match) is dropped and named in the route's
//! status (`PartiallyInvalid`, or `Accepted=False` when no rule is left);
//! the other rules keep serving, as the Gateway API asks.

use std::collections::{BTreeMap, BTreeSet};

use http::HeaderName;
use serde::Serialize;
use switchyard_crd::gateway_api::{
    HTTPBackendRef, HTTPHeaderFilter, HTTPRouteFilter, HTTPRouteMatch, HTTPRouteRule,
    HTTPURLRewriteFilter,
};
use switchyard_crd::{HTTPRoute, INFERENCE_API_GROUP, ParentReference};
use switchyard_snapshot::{object_key, pb};

use super::super::report::{ConditionReport, Problem, Reason};
use super::super::{non_empty, start_validation};
use super::inference_pools::PoolReferences;
use super::{Attachment, ListenerIndex, ListenerKey, RouteKind, listener_refs, normalize_hostname};

/// The filters dataplanes apply.
const REQUEST_HEADER_MODIFIER: &str = "RequestHeaderModifier";
const URL_REWRITE: &str = "URLRewrite";
/// Methods an HTTPRoute match may name (the API's enum).
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];
/// The API's bound on a backend's weight.
const MAX_BACKEND_WEIGHT: i32 = 1_000_000;
/// A backendRef's weight when unset (the API's default).
const DEFAULT_BACKEND_WEIGHT: u32 = 1;

/// What the compile concluded about an HTTPRoute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteReport {
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    /// One per parentRef naming a Gateway of Switchyard's, in spec order.
    pub parents: Vec<RouteParentReport>,
    pub in_snapshot: bool,
}

/// The route's conditions with respect to one parentRef.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteParentReport {
    /// As written in `spec.parentRefs`.
    pub parent_ref: ParentReference,
    pub accepted: ConditionReport,
    pub resolved_refs: ConditionReport,
    /// Set when some rules were dropped and others kept (`PartiallyInvalid=True`).
    pub partially_invalid: Option<ConditionReport>,
}

/// Which InferencePools backends may name: `(namespace, name)` of every pool
/// in the input, and of those accepted.
pub(crate) struct KnownPools<'a> {
    /// `--enable-gateway-api-inference-extension`.
    pub enabled: bool,
    pub accepted: BTreeSet<(&'a str, &'a str)>,
    pub present: BTreeSet<(&'a str, &'a str)>,
}

/// One HTTPRoute compiled.
pub(crate) struct CompiledHttpRoute {
    /// In the snapshot when attached somewhere with a rule left.
    pub route: Option<pb::HttpRoute>,
    /// `None` when no parentRef names a Gateway of Switchyard's.
    pub report: Option<HttpRouteReport>,
    pub references: PoolReferences,
}

/// Validates one HTTPRoute, attaches it to Switchyard's listeners and
/// resolves its backends.
pub(crate) fn compile_http_route(
    route: &HTTPRoute,
    listeners: &ListenerIndex,
    pools: &KnownPools<'_>,
) -> CompiledHttpRoute {
    let (namespace, name, mut invalid) = start_validation(&route.metadata, Reason::InvalidName);
    let spec = &route.spec;
    let mut hostnames = Vec::new();
    for (index, hostname) in spec.hostnames.iter().enumerate() {
        match normalize_hostname(hostname) {
            Some(hostname) => hostnames.push(hostname),
            None => invalid.push(Problem::new(
                Reason::UnsupportedValue,
                format!("spec.hostnames[{index}]: {hostname:?} is not a DNS name"),
            )),
        }
    }
    hostnames.sort();
    hostnames.dedup();

    // Parents first: a route no Switchyard Gateway is a parent of is not ours to report on.
    let mut parents: Vec<(&ParentReference, Result<Vec<ListenerKey>, Problem>)> = Vec::new();
    for parent in &spec.parent_refs {
        match listeners.attach(namespace, RouteKind::HttpRoute, &hostnames, parent) {
            Attachment::NotOurs => {}
            Attachment::Attached(keys) => parents.push((parent, Ok(keys))),
            Attachment::Rejected(problem) => parents.push((parent, Err(problem))),
        }
    }

    let mut kept = Vec::new();
    let mut dropped = Vec::new();
    let mut unresolved = Vec::new();
    let mut notes = Vec::new();
    let mut references = PoolReferences {
        route: object_key(namespace, name),
        ..PoolReferences::default()
    };
    // The API's default when the route has no rules: one rule matching everything.
    let default_rules = [HTTPRouteRule::default()];
    let rules: &[HTTPRouteRule] = if spec.rules.is_empty() {
        &default_rules
    } else {
        &spec.rules
    };
    for (index, rule) in rules.iter().enumerate() {
        let path = format!("spec.rules[{index}]");
        for (field, set) in [
            ("timeouts", rule.timeouts.is_some()),
            ("retry", rule.retry.is_some()),
            ("sessionPersistence", rule.session_persistence.is_some()),
        ] {
            if set {
                notes.push(format!("{path}.{field} is not applied"));
            }
        }
        match compile_rule(&path, index, rule, namespace, pools) {
            Ok(compiled) => {
                unresolved.extend(compiled.unresolved);
                references.pools.extend(compiled.pools);
                kept.push(compiled.rule);
            }
            Err(problem) => dropped.push(problem),
        }
    }

    let report = |accepted: &ConditionReport, in_snapshot| {
        let resolved_refs = ConditionReport::from_problems(&unresolved, Reason::ResolvedRefs, "");
        let partially_invalid =
            (!dropped.is_empty() && !kept.is_empty()).then(|| ConditionReport {
                status: true,
                reason: Reason::UnsupportedValue,
                message: format!(
                    "Dropped Rule(s): {}",
                    dropped
                        .iter()
                        .map(|problem: &Problem| problem.message.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            });
        HttpRouteReport {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            generation: route.metadata.generation,
            parents: parents
                .iter()
                .map(|(parent, attached)| RouteParentReport {
                    parent_ref: (*parent).clone(),
                    accepted: match attached {
                        Ok(_) => accepted.clone(),
                        Err(problem) => ConditionReport {
                            status: false,
                            reason: problem.reason,
                            message: problem.message.clone(),
                        },
                    },
                    resolved_refs: resolved_refs.clone(),
                    partially_invalid: partially_invalid.clone(),
                })
                .collect(),
            in_snapshot,
        }
    };

    let route_accepted = if !invalid.is_empty() {
        ConditionReport::from_problems(&invalid, Reason::Accepted, "")
    } else if kept.is_empty() {
        ConditionReport {
            status: false,
            reason: Reason::UnsupportedValue,
            message: format!(
                "every rule was dropped: {}",
                dropped
                    .iter()
                    .map(|problem| problem.message.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        }
    } else {
        ConditionReport::ok(Reason::Accepted, notes.join("; "))
    };
    let attached: Vec<ListenerKey> = parents
        .iter()
        .filter_map(|(_, attached)| attached.as_ref().ok())
        .flatten()
        .cloned()
        .collect();
    let in_snapshot = route_accepted.status && !attached.is_empty();
    let report = (!parents.is_empty()).then(|| report(&route_accepted, in_snapshot));
    if !in_snapshot {
        references.pools.clear();
        return CompiledHttpRoute {
            route: None,
            report,
            references,
        };
    }
    let listener_refs = listener_refs(attached);
    references.gateways = listener_refs
        .iter()
        .map(|listener| listener.gateway.clone())
        .collect();
    CompiledHttpRoute {
        route: Some(pb::HttpRoute {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            creation_timestamp_unix_ms: route
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(0, |time| time.0.as_millisecond()),
            listeners: listener_refs,
            hostnames,
            rules: kept,
        }),
        report,
        references,
    }
}

/// A rule that is kept, with its backends' problems (the rule still serves).
struct CompiledRule {
    rule: pb::HttpRouteRule,
    unresolved: Vec<Problem>,
    pools: BTreeSet<String>,
}

/// Compiles one rule; `Err` drops it (the message says why).
fn compile_rule(
    path: &str,
    index: usize,
    rule: &HTTPRouteRule,
    namespace: &str,
    pools: &KnownPools<'_>,
) -> Result<CompiledRule, Problem> {
    let dropped = |message: String| Problem::new(Reason::UnsupportedValue, message);
    let default_match = [HTTPRouteMatch::default()];
    let matches: &[HTTPRouteMatch] = if rule.matches.is_empty() {
        &default_match
    } else {
        &rule.matches
    };
    let matches = matches
        .iter()
        .enumerate()
        .map(|(position, matcher)| compile_match(&format!("{path}.matches[{position}]"), matcher))
        .collect::<Result<Vec<_>, String>>()
        .map_err(dropped)?;
    let all_prefix = matches.iter().all(|matcher| {
        matches!(
            matcher.path.as_ref().and_then(|path| path.kind.as_ref()),
            Some(pb::path_match::Kind::Prefix(_))
        )
    });
    let mut filters = Vec::new();
    let mut seen_types = BTreeSet::new();
    for (position, filter) in rule.filters.iter().enumerate() {
        let filter_path = format!("{path}.filters[{position}]");
        if !seen_types.insert(filter.type_.as_str()) {
            return Err(dropped(format!(
                "{filter_path}: a second {} filter in one rule",
                filter.type_
            )));
        }
        filters.push(compile_filter(&filter_path, filter, all_prefix).map_err(dropped)?);
    }
    let mut backends = Vec::new();
    let mut unresolved = Vec::new();
    let mut referenced = BTreeSet::new();
    for (position, backend) in rule.backend_refs.iter().enumerate() {
        let backend_path = format!("{path}.backendRefs[{position}]");
        if !backend.filters.is_empty() {
            return Err(dropped(format!(
                "{backend_path}.filters: filters on a backendRef are not supported"
            )));
        }
        let weight = match backend.weight {
            None => DEFAULT_BACKEND_WEIGHT,
            Some(weight) if (0..=MAX_BACKEND_WEIGHT).contains(&weight) => weight.unsigned_abs(),
            Some(weight) => {
                return Err(dropped(format!(
                    "{backend_path}.weight: {weight} is outside 0..={MAX_BACKEND_WEIGHT}"
                )));
            }
        };
        match resolve_backend(&backend_path, backend, namespace, pools) {
            Ok(pool) => {
                referenced.insert(pool.clone());
                backends.push(pb::WeightedBackend {
                    inference_pool: pool,
                    weight,
                });
            }
            Err((problem, pool)) => {
                referenced.extend(pool);
                unresolved.push(problem);
            }
        }
    }
    Ok(CompiledRule {
        rule: pb::HttpRouteRule {
            index: u32::try_from(index).unwrap_or(u32::MAX),
            name: rule.name.clone().unwrap_or_default(),
            matches,
            filters,
            backends,
        },
        unresolved,
        pools: referenced,
    })
}

/// The pool key of a backend, or why it cannot be sent to (with the pool
/// key when it names a pool that is not usable).
fn resolve_backend(
    path: &str,
    backend: &HTTPBackendRef,
    namespace: &str,
    pools: &KnownPools<'_>,
) -> Result<String, (Problem, Option<String>)> {
    let group = backend.group.as_deref().unwrap_or_default();
    let kind = non_empty(backend.kind.as_deref()).unwrap_or("Service");
    if group != INFERENCE_API_GROUP || kind != "InferencePool" {
        return Err((
            Problem::new(
                Reason::InvalidKind,
                format!(
                    "{path}: backends of kind {group:?}/{kind} are not supported: Switchyard sends to {INFERENCE_API_GROUP}/InferencePool"
                ),
            ),
            None,
        ));
    }
    if !pools.enabled {
        return Err((
            Problem::new(
                Reason::InvalidKind,
                format!(
                    "{path}: InferencePool backends need --enable-gateway-api-inference-extension"
                ),
            ),
            None,
        ));
    }
    let backend_namespace = non_empty(backend.namespace.as_deref()).unwrap_or(namespace);
    if backend_namespace != namespace {
        return Err((
            Problem::new(
                Reason::RefNotPermitted,
                format!(
                    "{path}: InferencePool {backend_namespace}/{} is in another namespace (ReferenceGrants are not read)",
                    backend.name
                ),
            ),
            None,
        ));
    }
    let key = object_key(namespace, &backend.name);
    let name = backend.name.as_str();
    if pools.accepted.contains(&(namespace, name)) {
        return Ok(key);
    }
    let message = if pools.present.contains(&(namespace, name)) {
        format!("{path}: InferencePool {key} was not accepted (see its status); backend dropped")
    } else {
        format!("{path}: InferencePool {key} not found; backend dropped")
    };
    Err((Problem::new(Reason::BackendNotFound, message), Some(key)))
}

fn compile_match(path: &str, matcher: &HTTPRouteMatch) -> Result<pb::HttpRouteMatch, String> {
    use pb::path_match::Kind;
    let path_match = matcher.path.as_ref();
    let kind = path_match
        .and_then(|path| non_empty(path.type_.as_deref()))
        .unwrap_or("PathPrefix");
    let value = path_match
        .and_then(|path| path.value.clone())
        .unwrap_or_else(|| "/".to_owned());
    let path_kind = match kind {
        "Exact" | "PathPrefix" if !value.starts_with('/') => {
            return Err(format!(
                "{path}.path.value: {value:?} does not start with \"/\""
            ));
        }
        "Exact" => Kind::Exact(value),
        "PathPrefix" => Kind::Prefix(value),
        "RegularExpression" => {
            check_regex(&format!("{path}.path.value"), &value)?;
            Kind::Regex(value)
        }
        other => {
            return Err(format!(
                "{path}.path.type: {other:?} is not a path match type"
            ));
        }
    };
    let mut headers = Vec::new();
    let mut header_names = BTreeSet::new();
    for (index, header) in matcher.headers.iter().enumerate() {
        let header_path = format!("{path}.headers[{index}]");
        let name = HeaderName::from_bytes(header.name.as_bytes())
            .map_err(|_| format!("{header_path}.name: {:?} is not a header name", header.name))?;
        // The API: of several matches on one header name, only the first counts.
        if !header_names.insert(name.as_str().to_owned()) {
            continue;
        }
        headers.push(pb::HeaderMatch {
            name: name.as_str().to_owned(),
            value: Some(value_match(
                &header_path,
                header.type_.as_deref(),
                &header.value,
            )?),
        });
    }
    let mut query_params = Vec::new();
    let mut query_names = BTreeSet::new();
    for (index, param) in matcher.query_params.iter().enumerate() {
        let param_path = format!("{path}.queryParams[{index}]");
        if param.name.is_empty() {
            return Err(format!("{param_path}.name: must be set"));
        }
        if !query_names.insert(param.name.as_str()) {
            continue;
        }
        query_params.push(pb::QueryParamMatch {
            name: param.name.clone(),
            value: Some(value_match(
                &param_path,
                param.type_.as_deref(),
                &param.value,
            )?),
        });
    }
    let method = match non_empty(matcher.method.as_deref()) {
        None => String::new(),
        Some(method) if METHODS.contains(&method) => method.to_owned(),
        Some(method) => return Err(format!("{path}.method: {method:?} is not an HTTP method")),
    };
    Ok(pb::HttpRouteMatch {
        path: Some(pb::PathMatch {
            kind: Some(path_kind),
        }),
        headers,
        query_params,
        method,
    })
}

fn value_match(path: &str, kind: Option<&str>, value: &str) -> Result<pb::StringMatch, String> {
    use pb::string_match::Kind;
    let kind = match non_empty(kind).unwrap_or("Exact") {
        "Exact" => Kind::Exact(value.to_owned()),
        "RegularExpression" => {
            check_regex(&format!("{path}.value"), value)?;
            Kind::Regex(value.to_owned())
        }
        other => return Err(format!("{path}.type: {other:?} is not a match type")),
    };
    Ok(pb::StringMatch { kind: Some(kind) })
}

/// HTTPRoute regexes match the whole value (as Envoy-based gateways do).
fn check_regex(path: &str, pattern: &str) -> Result<(), String> {
    regex::Regex::new(&format!("^(?:{pattern})$"))
        .map(|_| ())
        .map_err(|error| {
            let text = error.to_string();
            let summary = text
                .lines()
                .rev()
                .find_map(|line| line.trim().strip_prefix("error: "))
                .unwrap_or("invalid regex");
            format!("{path}: invalid regex {pattern:?}: {summary}")
        })
}

fn compile_filter(
    path: &str,
    filter: &HTTPRouteFilter,
    all_prefix: bool,
) -> Result<pb::HttpFilter, String> {
    use pb::http_filter::Filter;
    let compiled = match filter.type_.as_str() {
        REQUEST_HEADER_MODIFIER => {
            let modifier = filter.request_header_modifier.as_ref().ok_or_else(|| {
                format!(
                    "{path}.requestHeaderModifier: must be set for type {REQUEST_HEADER_MODIFIER}"
                )
            })?;
            Filter::RequestHeaderModifier(compile_header_modifier(
                &format!("{path}.requestHeaderModifier"),
                modifier,
            )?)
        }
        URL_REWRITE => {
            let rewrite = filter
                .url_rewrite
                .as_ref()
                .ok_or_else(|| format!("{path}.urlRewrite: must be set for type {URL_REWRITE}"))?;
            Filter::UrlRewrite(compile_url_rewrite(
                &format!("{path}.urlRewrite"),
                rewrite,
                all_prefix,
            )?)
        }
        other => {
            return Err(format!(
                "{path}: filter type {other:?} is not supported (Switchyard applies {REQUEST_HEADER_MODIFIER} and {URL_REWRITE})"
            ));
        }
    };
    Ok(pb::HttpFilter {
        filter: Some(compiled),
    })
}

fn compile_header_modifier(
    path: &str,
    modifier: &HTTPHeaderFilter,
) -> Result<pb::HeaderModifier, String> {
    let header = |field: &str, index: usize, name: &str, value: &str| {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("{path}.{field}[{index}].name: {name:?} is not a header name"))?;
        http::HeaderValue::from_str(value)
            .map_err(|_| format!("{path}.{field}[{index}].value: not a valid header value"))?;
        Ok::<_, String>(pb::HttpHeader {
            name: name.as_str().to_owned(),
            value: value.to_owned(),
        })
    };
    let mut compiled = pb::HeaderModifier::default();
    // Of several edits of one header name, the first counts (as for matches).
    let mut set_names = BTreeMap::new();
    for (index, entry) in modifier.set.iter().enumerate() {
        let edit = header("set", index, &entry.name, &entry.value)?;
        set_names.entry(edit.name.clone()).or_insert(edit);
    }
    compiled.set = set_names.into_values().collect();
    for (index, entry) in modifier.add.iter().enumerate() {
        compiled
            .add
            .push(header("add", index, &entry.name, &entry.value)?);
    }
    for (index, name) in modifier.remove.iter().enumerate() {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("{path}.remove[{index}]: {name:?} is not a header name"))?;
        compiled.remove.push(name.as_str().to_owned());
    }
    compiled.remove.sort();
    compiled.remove.dedup();
    Ok(compiled)
}

/// The path of the field at `path`, which must be set for the modifier
/// `type_` and start with `/`.
fn absolute_path(value: Option<&str>, path: &str, type_: &str) -> Result<String, String> {
    let value = value.ok_or_else(|| format!("{path}: must be set for {type_}"))?;
    if !value.starts_with('/') {
        return Err(format!("{path}: {value:?} does not start with \"/\""));
    }
    Ok(value.to_owned())
}

fn compile_url_rewrite(
    path: &str,
    rewrite: &HTTPURLRewriteFilter,
    all_prefix: bool,
) -> Result<pb::UrlRewrite, String> {
    use pb::url_rewrite::Path;
    let hostname = match non_empty(rewrite.hostname.as_deref()) {
        None => String::new(),
        Some(hostname) => normalize_hostname(hostname)
            .filter(|hostname| !hostname.starts_with('*'))
            .ok_or_else(|| format!("{path}.hostname: {hostname:?} is not a DNS name"))?,
    };
    let path_rewrite = match &rewrite.path {
        None => None,
        Some(modifier) => Some(match modifier.type_.as_str() {
            "ReplaceFullPath" => Path::ReplaceFullPath(absolute_path(
                modifier.replace_full_path.as_deref(),
                &format!("{path}.path.replaceFullPath"),
                "ReplaceFullPath",
            )?),
            "ReplacePrefixMatch" => {
                if !all_prefix {
                    return Err(format!(
                        "{path}.path: ReplacePrefixMatch needs every match of the rule to be a PathPrefix match"
                    ));
                }
                Path::ReplacePrefixMatch(absolute_path(
                    modifier.replace_prefix_match.as_deref(),
                    &format!("{path}.path.replacePrefixMatch"),
                    "ReplacePrefixMatch",
                )?)
            }
            other => {
                return Err(format!(
                    "{path}.path.type: {other:?} is not a path modifier"
                ));
            }
        }),
    };
    Ok(pb::UrlRewrite {
        hostname,
        path: path_rewrite,
    })
}
