//! The ports of Gateway listeners: opened when a snapshot brings a Gateway
//! listener on a new port, closed (after draining, as on shutdown) when no
//! listener of the snapshot names the port any more.
//!
//! The control thread decides and binds; the traffic workers serve. For a
//! new port, [`open_listener_ports`] binds one listener per worker (with
//! `SO_REUSEPORT`, as the traffic port's: [`bind_worker_listeners`]) and
//! hands each worker its own, with the token that closes it. Each worker
//! serves it ([`serve_listener_ports`]) on its own runtime with its own
//! proxy, as it serves the traffic port: a request on a Gateway port never
//! crosses threads either, and that traffic scales with `--workers`.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use parking_lot::Mutex;
use switchyard_runtime::{CancellationToken, clock};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::gateway::Arrival;
use crate::proxy::ProxyBody;
use crate::server::{ConnectionSettings, bind_worker_listeners, serve};

/// How soon a port that could not be opened (in use, not permitted) is
/// tried again: a closed port's sockets may still be held for a moment by
/// the workers that drain them, and an operator may free the port.
pub const LISTENER_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// The state of every Gateway listener port, for the debug endpoints.
#[derive(Debug, Default)]
pub struct PortStates {
    /// `Ok(workers serving it)` or why it could not be opened.
    states: Mutex<BTreeMap<u16, Result<usize, String>>>,
}

impl PortStates {
    /// `port → Ok(workers serving it)` when open, `Err(error)` when it could
    /// not be opened.
    pub fn snapshot(&self) -> BTreeMap<u16, Result<usize, String>> {
        self.states.lock().clone()
    }

    fn set(&self, port: u16, state: Result<usize, String>) {
        self.states.lock().insert(port, state);
    }

    fn remove(&self, port: u16) {
        self.states.lock().remove(&port);
    }
}

/// Where listener ports are opened.
#[derive(Debug, Clone)]
pub struct PortSettings {
    pub host: IpAddr,
    /// Ports the dataplane serves otherwise (traffic, metrics, debug): never
    /// opened for a Gateway (a listener on the traffic port is served there).
    pub reserved: BTreeSet<u16>,
}

/// One worker's listener on a Gateway port, served until `close` is cancelled.
#[derive(Debug)]
pub struct PortListener {
    pub port: u16,
    pub listener: std::net::TcpListener,
    pub close: CancellationToken,
}

/// The control thread's side: keeps every wanted port open on every worker
/// (`workers`, one sender each) until `stop`, then closes them all (each
/// worker drains its own).
pub async fn open_listener_ports(
    mut wanted: watch::Receiver<BTreeSet<u16>>,
    settings: PortSettings,
    states: Arc<PortStates>,
    workers: Vec<mpsc::UnboundedSender<PortListener>>,
    stop: CancellationToken,
) {
    let mut open: BTreeMap<u16, CancellationToken> = BTreeMap::new();
    loop {
        let ports: BTreeSet<u16> = wanted
            .borrow_and_update()
            .difference(&settings.reserved)
            .copied()
            .collect();
        open.retain(|port, close| {
            let keep = ports.contains(port);
            if !keep {
                tracing::info!(
                    port,
                    "closing a Gateway listener port: no listener names it"
                );
                close.cancel();
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
            match bind_worker_listeners("gateway listener", addr, workers.len()) {
                Ok(listeners) => {
                    tracing::info!(%addr, workers = workers.len(), "Gateway listener port open");
                    let close = CancellationToken::new();
                    for (worker, listener) in workers.iter().zip(listeners) {
                        // A worker that has stopped drops its listener: the
                        // others still serve the port.
                        let _ = worker.send(PortListener {
                            port,
                            listener,
                            close: close.clone(),
                        });
                    }
                    open.insert(port, close);
                    states.set(port, Ok(workers.len()));
                }
                Err(error) => {
                    tracing::warn!(%addr, error = %error.source, "cannot open a Gateway listener port; retrying");
                    states.set(port, Err(error.source.to_string()));
                    failed = true;
                }
            }
        }
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
    for close in open.values() {
        close.cancel();
    }
}

/// A traffic worker's side: serves every port listener the control thread
/// hands it, each until its token is cancelled, all until `stop`; returns
/// once they have drained. `handler` serves a request, told by the request's
/// [`Arrival`] which port it came through.
pub async fn serve_listener_ports<H, F>(
    mut opened: mpsc::UnboundedReceiver<PortListener>,
    settings: ConnectionSettings,
    stop: CancellationToken,
    handler: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let mut servers = JoinSet::new();
    let mut serving: Vec<CancellationToken> = Vec::new();
    loop {
        let PortListener {
            port,
            listener,
            close,
        } = tokio::select! {
            received = opened.recv() => match received {
                Some(opened) => opened,
                None => break,
            },
            () = stop.cancelled() => break,
        };
        while servers.try_join_next().is_some() {}
        serving.retain(|close| !close.is_cancelled());
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(port, %error, "cannot serve a Gateway listener port on this worker");
                continue;
            }
        };
        serving.push(close.clone());
        let handler = handler.clone();
        servers.spawn(serve(
            listener,
            settings.clone(),
            close,
            move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(Arrival::ListenerPort(port));
                handler(request)
            },
        ));
    }
    for close in &serving {
        close.cancel();
    }
    while servers.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// A free loopback port (bound, read, released).
    fn free_port() -> u16 {
        std::net::TcpListener::bind(loopback(0))
            .and_then(|listener| listener.local_addr())
            .map(|addr| addr.port())
            .expect("a free port")
    }

    /// The control side, opening the `wanted` ports but the `reserved` ones
    /// for the workers behind `senders`; stops with `stop`.
    fn start_control(
        wanted: watch::Receiver<BTreeSet<u16>>,
        reserved: BTreeSet<u16>,
        senders: Vec<mpsc::UnboundedSender<PortListener>>,
        stop: &CancellationToken,
    ) -> (Arc<PortStates>, tokio::task::JoinHandle<()>) {
        let states = Arc::new(PortStates::default());
        let settings = PortSettings {
            host: [127, 0, 0, 1].into(),
            reserved,
        };
        let control = open_listener_ports(wanted, settings, states.clone(), senders, stop.clone());
        (states, tokio::spawn(control))
    }

    #[tokio::test]
    async fn every_worker_gets_its_own_listener_and_a_removed_port_closes() {
        let port = free_port();
        let (want, wanted) = watch::channel(BTreeSet::new());
        let (senders, mut receivers): (Vec<_>, Vec<_>) =
            (0..2).map(|_| mpsc::unbounded_channel()).unzip();
        let stop = CancellationToken::new();
        let (states, control) = start_control(wanted, BTreeSet::from([1]), senders, &stop);

        // A reserved port is never opened; a Gateway's port is, once per worker.
        want.send_replace(BTreeSet::from([1, port]));
        let mut handed = Vec::new();
        for receiver in &mut receivers {
            handed.push(receiver.recv().await.expect("a listener for each worker"));
        }
        assert!(handed.iter().all(|opened| opened.port == port
            && opened.listener.local_addr().expect("bound") == loopback(port)));
        assert_eq!(states.snapshot(), BTreeMap::from([(port, Ok(2))]));
        // Connections land on the workers' listeners.
        std::net::TcpStream::connect(loopback(port)).expect("the port accepts");

        // Gone from the snapshot: the workers are told to close it.
        want.send_replace(BTreeSet::new());
        for opened in &handed {
            clock::timeout(Duration::from_secs(10), opened.close.cancelled())
                .await
                .expect("closed");
        }
        assert!(states.snapshot().is_empty());
        stop.cancel();
        control.await.expect("control side ends");
    }

    #[tokio::test]
    async fn a_port_in_use_is_reported_and_tried_again() {
        let taken = std::net::TcpListener::bind(loopback(0)).expect("bound");
        let port = taken.local_addr().expect("addr").port();
        let (want, wanted) = watch::channel(BTreeSet::from([port]));
        let (sender, mut receiver) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let (states, control) = start_control(wanted, BTreeSet::new(), vec![sender], &stop);
        let deadline = clock::now() + Duration::from_secs(10);
        while !states.snapshot().get(&port).is_some_and(Result::is_err) {
            assert!(clock::now() < deadline, "the failure is reported");
            tokio::task::yield_now().await;
        }
        drop(taken);
        let opened = clock::timeout(Duration::from_secs(10), receiver.recv())
            .await
            .expect("retried")
            .expect("a listener");
        assert_eq!(opened.port, port);
        assert_eq!(states.snapshot().get(&port), Some(&Ok(1)));
        drop(want);
        control.await.expect("ends when the snapshot store goes");
        assert!(opened.close.is_cancelled());
        stop.cancel();
    }
}
