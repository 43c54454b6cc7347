//! Process shutdown: the first SIGINT or SIGTERM cancels one token that every
//! part of the binary watches.

use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGINT or SIGTERM (logged with the signal's
/// name). Call it from within a Tokio runtime, before the process announces
/// that it is ready: the handlers are installed before this returns, so a
/// signal sent right after start-up ends in a graceful stop, never in the
/// default action (killed by the signal).
pub fn cancel_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    let signals = ShutdownSignals::install();
    tokio::spawn(async move {
        let signal = signals.recv().await;
        tracing::info!(signal, "shutting down");
        cancel.cancel();
    });
    token
}

/// SIGINT and SIGTERM handlers, installed when this is created (unlike
/// `tokio::signal::ctrl_c()`, which installs its handler on first poll).
struct ShutdownSignals {
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignals {
    /// A signal that cannot be listened for is logged and never arrives (the
    /// other still works).
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let listen = |kind: SignalKind, name: &str| match signal(kind) {
                Ok(signal) => Some(signal),
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for {name}");
                    None
                }
            };
            Self {
                interrupt: listen(SignalKind::interrupt(), "SIGINT"),
                terminate: listen(SignalKind::terminate(), "SIGTERM"),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Completes on the first signal, with its name.
    async fn recv(self) -> &'static str {
        #[cfg(unix)]
        {
            async fn next(signal: Option<tokio::signal::unix::Signal>) {
                match signal {
                    Some(mut signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                () = next(self.interrupt) => "SIGINT",
                () = next(self.terminate) => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
            "SIGINT"
        }
    }
}
