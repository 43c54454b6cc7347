//! Gateway API mode on the dataplane: which Gateway listener a request came
//! through (its port and `Host`), the ModelRoutes and HTTPRoutes that serve
//! on that listener, and the InferencePools HTTPRoutes send to. Built once
//! per snapshot with the routing table; the request path only reads it.
//!
//! The default Gateway's listeners are served on the dataplane's traffic
//! port, whatever port they name; every other Gateway's listeners on their
//! own ports, which `listener_ports` opens and closes as snapshots change.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use switchyard_snapshot::{object_key, pb};

pub use crate::routing::ListenerId;
use crate::routing::Server;

pub mod http_routes;

pub use http_routes::{HttpRouteDecision, HttpRoutes};

/// Why the Gateway API part of a snapshot was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("Gateway {gateway}: listener {listener}: invalid port {port}")]
    InvalidListenerPort {
        gateway: String,
        listener: String,
        port: u32,
    },
    #[error("HTTPRoute {route}: {problem}")]
    InvalidHttpRoute { route: String, problem: String },
}

/// The port a request arrived on, as the server that accepted it tells the
/// proxy (a request extension).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// The dataplane's traffic port: the listeners of the default Gateway
    /// and of any Gateway naming this port; ModelRoutes without parentRefs.
    TrafficPort(u16),
    /// A port opened for the listeners of a Gateway.
    ListenerPort(u16),
}

impl Default for Arrival {
    /// A request without an arrival (unit tests, the traffic server before
    /// it says its port): the traffic port.
    fn default() -> Self {
        Self::TrafficPort(0)
    }
}

/// Key in [`Gateways::by_port`] of the default Gateway's listeners.
const TRAFFIC_PORT: u16 = 0;

/// A listener's hostname condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hostname {
    /// No hostname: every host.
    Any,
    Exact(String),
    /// `*.example.com` as `.example.com`: one or more labels before it.
    Wildcard(String),
}

impl Hostname {
    /// `""` = any; `*.x` = wildcard; otherwise exact (already lower case).
    pub fn parse(hostname: &str) -> Self {
        match hostname {
            "" => Self::Any,
            wildcard if wildcard.starts_with("*.") => Self::Wildcard(wildcard[1..].to_owned()),
            exact => Self::Exact(exact.to_owned()),
        }
    }

    /// How specifically this matches `host` (lower case, no port): exact
    /// beats the longest wildcard, which beats none; `None` = no match.
    pub fn rank(&self, host: &str) -> Option<usize> {
        match self {
            Self::Any => Some(0),
            Self::Exact(exact) => (exact == host).then_some(usize::MAX),
            Self::Wildcard(suffix) => (host.len() > suffix.len()
                && host.ends_with(suffix.as_str()))
            .then_some(suffix.len()),
        }
    }
}

/// One listener of a Gateway in the snapshot.
#[derive(Debug)]
pub struct Listener {
    /// `namespace/gateway`.
    pub gateway: String,
    pub name: String,
    pub port: u16,
    pub hostname: Hostname,
}

/// The Gateways, listeners and InferencePools of one snapshot.
#[derive(Debug, Default)]
pub struct Gateways {
    /// Every listener, in snapshot order; a [`ListenerId`] indexes it.
    pub listeners: Vec<Listener>,
    /// Listener ids by the port they are served on ([`TRAFFIC_PORT`] for
    /// the default Gateway's).
    by_port: HashMap<u16, Vec<ListenerId>>,
    /// `namespace/name` of the default Gateway ("" = none).
    pub default_gateway: String,
    /// InferencePools as servers the scheduler picks endpoints of, by key.
    pub pools: HashMap<String, Arc<Server>>,
    pub http_routes: HttpRoutes,
}

impl Gateways {
    /// Builds the Gateway API part of `config` around its InferencePools,
    /// already built as servers (by `namespace/name`).
    pub fn build(
        config: &pb::RouteConfig,
        pools: HashMap<String, Arc<Server>>,
    ) -> Result<Self, GatewayError> {
        let mut gateways = Self {
            default_gateway: config.default_gateway.clone(),
            pools,
            ..Self::default()
        };
        for gateway in &config.gateways {
            let key = object_key(&gateway.namespace, &gateway.name);
            let is_default = key == config.default_gateway;
            for listener in &gateway.listeners {
                let port = u16::try_from(listener.port)
                    .ok()
                    .filter(|port| *port != 0)
                    .ok_or_else(|| GatewayError::InvalidListenerPort {
                        gateway: key.clone(),
                        listener: listener.name.clone(),
                        port: listener.port,
                    })?;
                let id = ListenerId::try_from(gateways.listeners.len()).unwrap_or(ListenerId::MAX);
                let served_on = if is_default { TRAFFIC_PORT } else { port };
                gateways.by_port.entry(served_on).or_default().push(id);
                gateways.listeners.push(Listener {
                    gateway: key.clone(),
                    name: listener.name.clone(),
                    port,
                    hostname: Hostname::parse(&listener.hostname),
                });
            }
        }
        gateways.http_routes = HttpRoutes::build(&config.http_routes, &gateways)?;
        Ok(gateways)
    }

    /// The id of `gateway`'s listener `name`.
    pub fn listener_id(&self, gateway: &str, name: &str) -> Option<ListenerId> {
        self.listeners
            .iter()
            .position(|listener| listener.gateway == gateway && listener.name == name)
            .and_then(|index| ListenerId::try_from(index).ok())
    }

    /// The listener a request arriving at `arrival` for `host` (lower case,
    /// no port; "" when the request names none) came through: of those
    /// served on its port, the one whose hostname matches exactly, else the
    /// longest matching wildcard, else one without a hostname.
    pub fn resolve(&self, arrival: Arrival, host: &str) -> Option<ListenerId> {
        let (port, default_listeners) = match arrival {
            Arrival::TrafficPort(port) => (port, self.by_port.get(&TRAFFIC_PORT)),
            Arrival::ListenerPort(port) => (port, None),
        };
        let on_port = self.by_port.get(&port).filter(|_| port != TRAFFIC_PORT);
        default_listeners
            .into_iter()
            .chain(on_port)
            .flatten()
            .filter_map(|id| {
                let listener = self.listeners.get(usize::try_from(*id).ok()?)?;
                Some((listener.hostname.rank(host)?, *id))
            })
            // The first of equal rank wins: the snapshot's order.
            .max_by_key(|(rank, id)| (*rank, std::cmp::Reverse(*id)))
            .map(|(_, id)| id)
    }

    /// The ports the dataplane must open: every listener port of a Gateway
    /// other than the default one.
    pub fn ports(&self) -> BTreeSet<u16> {
        self.by_port
            .keys()
            .copied()
            .filter(|port| *port != TRAFFIC_PORT)
            .collect()
    }
}

/// The host a request names (`Host`, or the authority of an HTTP/2 or
/// absolute URI), lower case and without its port; "" when none.
pub fn request_host(head: &http::request::Parts) -> String {
    let raw = head
        .uri
        .host()
        .or_else(|| {
            head.headers
                .get(http::header::HOST)
                .and_then(|value| value.to_str().ok())
        })
        .unwrap_or_default();
    let host = match raw.rsplit_once(':') {
        // Not an IPv6 literal's colon: a port.
        Some((host, port)) if !raw.ends_with(']') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => raw,
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests;
