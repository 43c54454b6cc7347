//! The ports of Gateway listeners: opened when a snapshot brings a Gateway
//! listener on a new port, closed (after draining, as on shutdown) when no
//! listener of the snapshot names the port any more.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use parking_lot::Mutex;
use switchyard_runtime::{CancellationToken, bind, clock};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::gateway::Arrival;
use crate::proxy::ProxyBody;
use crate::server::{ConnectionSettings, serve};

/// How soon a port that could not be opened (in use, not permitted) is
/// tried again: a closed port's socket may still be held for a moment by
/// the listener that drains it, and an operator may free the port.
pub const LISTENER_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// The state of every Gateway listener port, for the debug endpoints.
#[derive(Debug, Default)]
pub struct PortStates {
    states: Mutex<BTreeMap<u16, Result<(), String>>>,
}

impl PortStates {
    /// `port → None` when open, `Some(error)` when it could not be opened.
    pub fn snapshot(&self) -> BTreeMap<u16, Option<String>> {
        self.states
            .lock()
            .iter()
            .map(|(port, state)| (*port, state.as_ref().err().cloned()))
            .collect()
    }

    fn set(&self, port: u16, state: Result<(), String>) {
        self.states.lock().insert(port, state);
    }

    fn remove(&self, port: u16) {
        self.states.lock().remove(&port);
    }
}

/// Where and how listener ports are served.
#[derive(Debug, Clone)]
pub struct PortSettings {
    pub host: IpAddr,
    /// Ports the dataplane serves otherwise (traffic, metrics, debug): never
    /// opened for a Gateway (a listener on the traffic port is served there).
    pub reserved: BTreeSet<u16>,
    /// Shared with the traffic port: one connection budget for all of them.
    pub connections: ConnectionSettings,
}

/// Keeps one server per wanted port until `stop`, then drains them all.
/// `handler` serves a request and is told the port it arrived on.
pub async fn serve_listener_ports<H, F>(
    mut wanted: watch::Receiver<BTreeSet<u16>>,
    settings: PortSettings,
    states: Arc<PortStates>,
    stop: CancellationToken,
    handler: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let mut open: BTreeMap<u16, CancellationToken> = BTreeMap::new();
    let mut servers = JoinSet::new();
    loop {
        let ports: BTreeSet<u16> = wanted
            .borrow_and_update()
            .difference(&settings.reserved)
            .copied()
            .collect();
        open.retain(|port, token| {
            let keep = ports.contains(port);
            if !keep {
                tracing::info!(
                    port,
                    "closing a Gateway listener port: no listener names it"
                );
                token.cancel();
                states.remove(*port);
            }
            keep
        });
        let mut failed = false;
        let closed: Vec<u16> = ports
            .iter()
            .copied()
            .filter(|port| !open.contains_key(port))
            .collect();
        for port in closed {
            let addr = SocketAddr::new(settings.host, port);
            match bind("gateway listener", addr).await {
                Ok((listener, _)) => {
                    tracing::info!(%addr, "Gateway listener port open");
                    let token = stop.child_token();
                    open.insert(port, token.clone());
                    states.set(port, Ok(()));
                    let handler = handler.clone();
                    servers.spawn(serve(
                        listener,
                        settings.connections.clone(),
                        token,
                        move |mut request: Request<Incoming>| {
                            request.extensions_mut().insert(Arrival::ListenerPort(port));
                            handler(request)
                        },
                    ));
                }
                Err(error) => {
                    tracing::warn!(%addr, %error, "cannot open a Gateway listener port; retrying");
                    states.set(port, Err(error.to_string()));
                    failed = true;
                }
            }
        }
        while servers.try_join_next().is_some() {}
        let retry = async {
            if failed {
                clock::sleep(LISTENER_RETRY_INTERVAL).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            changed = wanted.changed() => if changed.is_err() { break },
            () = retry => {}
            () = stop.cancelled() => break,
        }
    }
    for token in open.values() {
        token.cancel();
    }
    while servers.join_next().await.is_some() {}
}
