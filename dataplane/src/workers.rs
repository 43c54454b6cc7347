//! Traffic workers: the traffic port and the Gateway listener ports are
//! served by a fixed number of threads, each running its own current-thread
//! Tokio runtime with its own listener per port
//! ([`bind_worker_listeners`](crate::server::bind_worker_listeners)) and its
//! own [`Proxy`], so its own upstream connection pool. A connection is
//! accepted, and every request on it admitted, forwarded and streamed back,
//! on one thread: nothing is handed to another thread, so no request wakes
//! another thread, and what a worker keeps for itself
//! ([`PerWorker`](crate::per_worker::PerWorker) slots) is written by it alone.
//!
//! The controller stream, the metrics and debug listeners and the access-log
//! writer run on other threads: they are idle almost all the time and wake
//! only for a snapshot, a scrape or a batch of log lines. The control thread
//! opens and closes the Gateway listener ports as snapshots change and hands
//! each worker its listeners (`listener_ports.rs`). Those threads run below
//! the workers' priority
//! ([`per_worker::run_below_traffic_workers`]), so waking up never
//! lets them pause a busy worker.

use std::future::Future;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use switchyard_runtime::CancellationToken;
use tokio::sync::{mpsc, oneshot};

use crate::admin::Admin;
use crate::listener_ports::{PortListener, serve_listener_ports};
use crate::per_worker;
use crate::proxy::{Proxy, ProxyBody};
use crate::server::{ConnectionSettings, serve};

/// One traffic worker's own parts.
#[derive(Debug)]
pub struct TrafficWorker {
    pub index: usize,
    /// Its listener on the traffic port.
    pub listener: std::net::TcpListener,
    /// Its listeners on Gateway listener ports, as they open.
    pub listener_ports: mpsc::UnboundedReceiver<PortListener>,
    pub proxy: Proxy,
    /// Serves `/metrics` on the traffic port too (`--expose-metrics-on-router-port`).
    pub metrics_on_traffic_port: Option<Arc<Admin>>,
    /// Idle timeout and the connection limit (shared by every worker).
    pub settings: ConnectionSettings,
}

/// Why a traffic worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start traffic worker {index}: {source}")]
    Start {
        index: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("traffic worker {index} panicked")]
    Panicked { index: usize },
}

/// Starts `worker` on its own thread; the returned future completes when the
/// worker has stopped, after `stop` was cancelled and its connections drained.
pub fn run(
    worker: TrafficWorker,
    stop: CancellationToken,
) -> impl Future<Output = Result<(), WorkerError>> {
    let index = worker.index;
    let (done, stopped) = oneshot::channel();
    let started = std::thread::Builder::new()
        .name(format!("traffic-{index}"))
        .spawn(move || {
            // Dropped without a value when the thread panics.
            let _ = done.send(serve_on_this_thread(worker, stop));
        });
    async move {
        started.map_err(|source| WorkerError::Start { index, source })?;
        stopped
            .await
            .unwrap_or(Err(WorkerError::Panicked { index }))
    }
}

fn serve_on_this_thread(worker: TrafficWorker, stop: CancellationToken) -> Result<(), WorkerError> {
    let TrafficWorker {
        index,
        listener,
        listener_ports,
        proxy,
        metrics_on_traffic_port,
        settings,
    } = worker;
    per_worker::enter(index);
    let start_error = |source| WorkerError::Start { index, source };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(start_error)?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).map_err(start_error)?;
        // One per-worker allocation the handler's clones (one per request) count on.
        let traffic = Arc::new(Traffic {
            proxy,
            metrics_on_traffic_port,
        });
        let gateway = traffic.clone();
        tokio::join!(
            serve(listener, settings.clone(), stop.clone(), move |request| {
                let traffic = traffic.clone();
                async move { traffic.handle(request).await }
            }),
            serve_listener_ports(listener_ports, settings, stop, move |request| {
                let traffic = gateway.clone();
                async move { traffic.proxy.handle(request).await }
            }),
        );
        Ok(())
    })
}

/// What a worker's handler holds.
#[derive(Debug)]
struct Traffic {
    proxy: Proxy,
    metrics_on_traffic_port: Option<Arc<Admin>>,
}

impl Traffic {
    async fn handle(&self, request: Request<Incoming>) -> Response<ProxyBody> {
        if let Some(admin) = &self.metrics_on_traffic_port
            && request.uri().path() == "/metrics"
        {
            return admin.handle_metrics_port(&request);
        }
        self.proxy.handle(request).await
    }
}
