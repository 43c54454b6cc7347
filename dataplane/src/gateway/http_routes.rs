//! HTTPRoutes to InferencePools: matching with the Gateway API's
//! precedence, weighted pools, and the filters that edit the request sent
//! upstream (`URLRewrite`, `RequestHeaderModifier`).
//!
//! Precedence, as the Gateway API specifies it: the route hostname that
//! matches the request's host most specifically, then an Exact path over
//! the longest PathPrefix (regexes after both, longest first), a method
//! match, more header matches, more query matches; then the oldest route,
//! then `namespace/name`, then rule and match order. Everything but the
//! hostname is known when the snapshot is applied, so the candidates are
//! sorted then and a request keeps the first match of its best hostname.

use std::cmp::Reverse;
use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method};
use regex::Regex;
use switchyard_snapshot::{object_key, pb};

use super::{GatewayError, Gateways, Hostname};
use crate::rewrite::{PathRewrite, Rewrite};
use crate::routing::{ListenerId, Route, Server, StringMatcher, WeightedTargets};

/// A path condition.
#[derive(Debug)]
enum PathMatcher {
    Exact(String),
    /// Without a trailing `/`: whole path elements.
    Prefix(String),
    Regex(Regex),
}

impl PathMatcher {
    fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(exact) => path == exact,
            Self::Prefix(prefix) => path
                .strip_prefix(prefix.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
            Self::Regex(regex) => regex.is_match(path),
        }
    }

    /// Sorts first when more specific.
    fn order(&self) -> (u8, Reverse<usize>) {
        match self {
            Self::Exact(exact) => (0, Reverse(exact.len())),
            Self::Prefix(prefix) => (1, Reverse(prefix.len())),
            Self::Regex(regex) => (2, Reverse(regex.as_str().len())),
        }
    }
}

/// One `matches[]` entry of one rule: every condition must hold.
#[derive(Debug)]
struct Candidate {
    /// Index into [`HttpRoutes::routes`].
    route: usize,
    rule: usize,
    path: PathMatcher,
    method: Option<Method>,
    headers: Vec<(HeaderName, StringMatcher)>,
    query: Vec<(String, StringMatcher)>,
    /// The filters of the rule, with the prefix this match strips.
    rewrite: Option<Arc<Rewrite>>,
}

impl Candidate {
    fn matches(&self, request: &HttpRequestFacts<'_>) -> bool {
        self.path.matches(request.path)
            && self
                .method
                .as_ref()
                .is_none_or(|method| method == request.method)
            && self.headers.iter().all(|(name, matcher)| {
                request
                    .headers
                    .get(name)
                    .and_then(|value| value.to_str().ok())
                    .is_some_and(|value| matcher.matches(value))
            })
            && self.query.iter().all(|(name, matcher)| {
                query_value(request.query, name).is_some_and(|value| matcher.matches(value))
            })
    }
}

/// The first value of query parameter `name` (compared as sent).
fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })
}

/// An HTTPRoute as the dataplane uses it.
#[derive(Debug)]
struct CompiledRoute {
    /// What the request record names it by.
    route: Arc<Route>,
    /// Per rule: its weighted pools; `None` = no backend with a positive weight.
    rule_targets: Vec<Option<WeightedTargets>>,
    listeners: Vec<ListenerId>,
    /// Empty = every host the listener takes.
    hostnames: Vec<Hostname>,
}

/// What a request offers HTTPRoute matches.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequestFacts<'a> {
    pub listener: Option<ListenerId>,
    /// Lower case, no port; "" = none.
    pub host: &'a str,
    pub method: &'a Method,
    pub path: &'a str,
    pub query: &'a str,
    pub headers: &'a HeaderMap,
}

/// Where an HTTPRoute sends a request.
#[derive(Debug, Clone)]
pub struct HttpRouteDecision {
    pub route: Arc<Route>,
    pub rule_index: usize,
    /// `None` when the rule has no backend with a positive weight (the
    /// Gateway API answers 500).
    pub pool: Option<Arc<Server>>,
    pub rewrite: Option<Arc<Rewrite>>,
}

/// Every HTTPRoute of a snapshot, ready to match.
#[derive(Debug, Default)]
pub struct HttpRoutes {
    routes: Vec<CompiledRoute>,
    /// Sorted by static precedence.
    candidates: Vec<Candidate>,
}

impl HttpRoutes {
    pub fn build(routes: &[pb::HttpRoute], gateways: &Gateways) -> Result<Self, GatewayError> {
        let mut built = Self::default();
        for (route_index, route) in routes.iter().enumerate() {
            let key = object_key(&route.namespace, &route.name);
            let invalid = |problem: String| GatewayError::InvalidHttpRoute {
                route: key.clone(),
                problem,
            };
            let mut listeners = Vec::with_capacity(route.listeners.len());
            for listener in &route.listeners {
                listeners.push(
                    gateways
                        .listener_id(&listener.gateway, &listener.listener)
                        .ok_or_else(|| {
                            invalid(format!(
                                "listener {}/{} is not in the snapshot",
                                listener.gateway, listener.listener
                            ))
                        })?,
                );
            }
            let mut rule_targets = Vec::with_capacity(route.rules.len());
            for (rule_index, rule) in route.rules.iter().enumerate() {
                let mut pools = Vec::with_capacity(rule.backends.len());
                for backend in &rule.backends {
                    let pool = gateways.pools.get(&backend.inference_pool).ok_or_else(|| {
                        invalid(format!(
                            "rule {rule_index}: InferencePool {} is not in the snapshot",
                            backend.inference_pool
                        ))
                    })?;
                    pools.push((pool.clone(), backend.weight));
                }
                rule_targets.push(WeightedTargets::new(pools));
                let filters = build_filters(&rule.filters)
                    .map_err(|problem| invalid(format!("rule {rule_index}: {problem}")))?;
                for matched in &rule.matches {
                    let candidate = build_candidate(route_index, rule_index, matched, &filters)
                        .map_err(|problem| invalid(format!("rule {rule_index}: {problem}")))?;
                    built.candidates.push(candidate);
                }
            }
            built.routes.push(CompiledRoute {
                // The request record names the route by it; rules stay here.
                route: Arc::new(Route {
                    key,
                    model_name: String::new(),
                    lora_adapters: Vec::new(),
                    rules: Vec::new(),
                    listeners: Vec::new(),
                }),
                rule_targets,
                listeners,
                hostnames: route.hostnames.iter().map(|h| Hostname::parse(h)).collect(),
            });
        }
        // Stable: the snapshot lists routes oldest first, then by name, and
        // rules and matches in order, which settle every tie.
        built.candidates.sort_by_key(|candidate| {
            (
                candidate.path.order(),
                candidate.method.is_none(),
                Reverse(candidate.headers.len()),
                Reverse(candidate.query.len()),
            )
        });
        Ok(built)
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The HTTPRoute rule that takes `request`, if any.
    pub fn lookup(&self, request: &HttpRequestFacts<'_>) -> Option<HttpRouteDecision> {
        let listener = request.listener?;
        let mut best: Option<(usize, &Candidate)> = None;
        for candidate in &self.candidates {
            let route = &self.routes[candidate.route];
            if !route.listeners.contains(&listener) {
                continue;
            }
            let host_rank = if route.hostnames.is_empty() {
                Some(0)
            } else {
                route
                    .hostnames
                    .iter()
                    .filter_map(|hostname| hostname.rank(request.host))
                    .max()
                    .map(|rank| rank.saturating_add(1))
            };
            let Some(host_rank) = host_rank else {
                continue;
            };
            if best.is_some_and(|(best_rank, _)| best_rank >= host_rank) {
                continue;
            }
            if candidate.matches(request) {
                best = Some((host_rank, candidate));
            }
        }
        let (_, candidate) = best?;
        let route = &self.routes[candidate.route];
        Some(HttpRouteDecision {
            route: route.route.clone(),
            rule_index: candidate.rule,
            pool: route
                .rule_targets
                .get(candidate.rule)
                .and_then(Option::as_ref)
                .map(|targets| targets.pick().server.clone()),
            rewrite: candidate.rewrite.clone(),
        })
    }
}

/// The filters of a rule, before the matched prefix is known.
#[derive(Debug, Default)]
struct Filters {
    hostname: Option<HeaderValue>,
    full_path: Option<String>,
    prefix_replacement: Option<String>,
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

fn build_filters(filters: &[pb::HttpFilter]) -> Result<Filters, String> {
    use pb::http_filter::Filter;
    use pb::url_rewrite::Path;
    let header = |header: &pb::HttpHeader| -> Result<(HeaderName, HeaderValue), String> {
        Ok((
            HeaderName::try_from(header.name.as_str())
                .map_err(|_| format!("invalid header name {:?}", header.name))?,
            HeaderValue::try_from(header.value.as_str())
                .map_err(|_| format!("invalid value of header {:?}", header.name))?,
        ))
    };
    let mut built = Filters::default();
    for filter in filters {
        match &filter.filter {
            Some(Filter::RequestHeaderModifier(modifier)) => {
                for set in &modifier.set {
                    built.set.push(header(set)?);
                }
                for add in &modifier.add {
                    built.add.push(header(add)?);
                }
                for name in &modifier.remove {
                    built.remove.push(
                        HeaderName::try_from(name.as_str())
                            .map_err(|_| format!("invalid header name {name:?}"))?,
                    );
                }
            }
            Some(Filter::UrlRewrite(rewrite)) => {
                if !rewrite.hostname.is_empty() {
                    built.hostname = Some(
                        HeaderValue::try_from(rewrite.hostname.as_str())
                            .map_err(|_| format!("invalid hostname {:?}", rewrite.hostname))?,
                    );
                }
                match &rewrite.path {
                    Some(Path::ReplaceFullPath(path)) => built.full_path = Some(path.clone()),
                    Some(Path::ReplacePrefixMatch(prefix)) => {
                        built.prefix_replacement = Some(prefix.clone());
                    }
                    None => {}
                }
            }
            None => return Err("a filter of an unknown type".to_owned()),
        }
    }
    Ok(built)
}

fn build_candidate(
    route: usize,
    rule: usize,
    matched: &pb::HttpRouteMatch,
    filters: &Filters,
) -> Result<Candidate, String> {
    use pb::path_match::Kind;
    let whole = |pattern: &str| {
        Regex::new(&format!("^(?:{pattern})$"))
            .map_err(|error| format!("invalid regex {pattern:?}: {error}"))
    };
    let path = match matched.path.as_ref().and_then(|path| path.kind.as_ref()) {
        Some(Kind::Exact(exact)) => PathMatcher::Exact(exact.clone()),
        Some(Kind::Prefix(prefix)) => PathMatcher::Prefix(prefix.trim_end_matches('/').to_owned()),
        Some(Kind::Regex(pattern)) => PathMatcher::Regex(whole(pattern)?),
        None => PathMatcher::Prefix(String::new()),
    };
    let string_matcher = |value: Option<&pb::StringMatch>| -> Result<StringMatcher, String> {
        use pb::string_match::Kind;
        Ok(match value.and_then(|value| value.kind.as_ref()) {
            Some(Kind::Exact(exact)) => StringMatcher::Exact(exact.clone()),
            Some(Kind::Prefix(prefix)) => StringMatcher::Prefix(prefix.clone()),
            Some(Kind::Regex(pattern)) => StringMatcher::Regex(whole(pattern)?),
            None => StringMatcher::Any,
        })
    };
    let mut headers = Vec::with_capacity(matched.headers.len());
    for header in &matched.headers {
        let name = HeaderName::try_from(header.name.as_str())
            .map_err(|_| format!("invalid header name {:?}", header.name))?;
        headers.push((name, string_matcher(header.value.as_ref())?));
    }
    let mut query = Vec::with_capacity(matched.query_params.len());
    for param in &matched.query_params {
        query.push((param.name.clone(), string_matcher(param.value.as_ref())?));
    }
    let method = match matched.method.as_str() {
        "" => None,
        method => Some(
            Method::from_bytes(method.as_bytes())
                .map_err(|_| format!("invalid method {method:?}"))?,
        ),
    };
    let path_rewrite = match (&filters.full_path, &filters.prefix_replacement, &path) {
        (Some(full), _, _) => Some(PathRewrite::Full(full.clone())),
        (None, Some(replacement), PathMatcher::Prefix(matched)) => Some(PathRewrite::Prefix {
            matched: matched.clone(),
            replacement: replacement.clone(),
        }),
        (None, Some(_), _) => {
            return Err("ReplacePrefixMatch needs a PathPrefix match".to_owned());
        }
        (None, None, _) => None,
    };
    let rewrite = Rewrite {
        hostname: filters.hostname.clone(),
        path: path_rewrite,
        set: filters.set.clone(),
        add: filters.add.clone(),
        remove: filters.remove.clone(),
    };
    Ok(Candidate {
        route,
        rule,
        path,
        method,
        headers,
        query,
        rewrite: (rewrite != Rewrite::default()).then(|| Arc::new(rewrite)),
    })
}
