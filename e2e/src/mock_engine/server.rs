//! Accept loop and connection lifecycle, including graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::MockEngineError;
use super::config::MockEngineConfig;
use super::http::EngineState;

/// How long shutdown waits for in-flight responses before cutting them: enough for the short
/// requests of a test or demo to finish, short enough that a stream paced for minutes cannot
/// hold up test teardown or a `kill`.
pub const SHUTDOWN_GRACE_PERIOD: Duration = Duration::from_secs(5);

/// Pause after a failed `accept` (typically out of file descriptors) so the loop does not spin
/// while the condition lasts.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Serves the engine on `listener` until `shutdown` completes, then stops accepting, lets
/// in-flight responses finish for up to [`SHUTDOWN_GRACE_PERIOD`] and returns.
pub async fn serve(
    config: MockEngineConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), MockEngineError> {
    config.validate()?;
    // A prefill engine's SGLang bootstrap server, on the main address's IP.
    let bootstrap = match config.pd.as_ref().and_then(|pd| pd.bootstrap_port) {
        Some(port) => {
            let ip = listener.local_addr().map_err(MockEngineError::Bind)?.ip();
            Some(
                TcpListener::bind((ip, port))
                    .await
                    .map_err(MockEngineError::Bind)?,
            )
        }
        None => None,
    };
    let state = Arc::new(EngineState::new(config));
    let (drain_sender, drain) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accept_bootstrap = async {
            match &bootstrap {
                Some(bootstrap) => bootstrap.accept().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(serve_connection(stream, peer, Arc::clone(&state), drain.clone()));
                }
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
            accepted = accept_bootstrap => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(serve_connection(stream, peer, Arc::clone(&state), drain.clone()));
                }
                Err(error) => {
                    tracing::warn!(%error, "accepting a bootstrap connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
            // Reap finished connection tasks so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    drop(bootstrap);
    let _ = drain_sender.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE_PERIOD, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            remaining = connections.len(),
            "in-flight responses did not finish within the shutdown grace period; closing them"
        );
        connections.shutdown().await;
    }
    Ok(())
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<EngineState>,
    mut drain: watch::Receiver<bool>,
) {
    // Token events are tiny; without this Nagle's algorithm would hold them back and blur the
    // configured inter-token latency.
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%peer, %error, "could not disable Nagle's algorithm");
    }
    let service = service_fn(move |request| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(state.handle(request).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
            return;
        }
        _ = drain.wait_for(|draining| *draining) => {}
    }
    connection.as_mut().graceful_shutdown();
    if let Err(error) = connection.await {
        tracing::debug!(%peer, %error, "connection ended with an error while draining");
    }
}

/// An engine served in-process on its own task, for tests and harnesses.
pub struct RunningMockEngine {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), MockEngineError>>,
}

impl RunningMockEngine {
    /// Binds `addr` (port 0 picks a free port) and starts serving. Dropping the handle also
    /// shuts the engine down, in the background.
    pub async fn start(
        config: MockEngineConfig,
        addr: impl ToSocketAddrs,
    ) -> Result<Self, MockEngineError> {
        config.validate()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(MockEngineError::Bind)?;
        let addr = listener.local_addr().map_err(MockEngineError::Bind)?;
        let (shutdown, shutdown_requested) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(config, listener, async move {
            // A dropped sender means the handle is gone: shut down as well.
            let _ = shutdown_requested.await;
        }));
        Ok(Self {
            addr,
            shutdown: Some(shutdown),
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ip:port`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, waits for in-flight responses (up to [`SHUTDOWN_GRACE_PERIOD`]) and
    /// returns how serving ended.
    pub async fn stop(mut self) -> Result<(), MockEngineError> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        (&mut self.task).await?
    }
}
