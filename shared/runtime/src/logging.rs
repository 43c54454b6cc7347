//! Process logs: to stderr (stdout stays free for access logs and, in the
//! mock engine, the `listening on` line), filtered by `RUST_LOG`, as text or
//! one JSON object per line; colours only when stderr is a terminal, so log
//! files and `kubectl logs` carry no escape codes.

use std::io::IsTerminal as _;

/// Log filter when `RUST_LOG` is unset or invalid.
pub const DEFAULT_LOG_FILTER: &str = "info";

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Installs the global `tracing` subscriber. Returns false, and keeps the
/// existing one, when a subscriber is already installed (tests, embedding):
/// logging set-up must never be what stops a process.
pub fn init_tracing(format: LogFormat) -> bool {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.try_init().is_ok(),
        LogFormat::Json => builder.json().try_init().is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_init_keeps_the_first_subscriber_instead_of_panicking() {
        // Other tests of this binary may have installed one already; either
        // way the second call must return false, not panic.
        init_tracing(LogFormat::Text);
        assert!(!init_tracing(LogFormat::Json));
    }
}
