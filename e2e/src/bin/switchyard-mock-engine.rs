//! `switchyard-mock-engine`: see [`switchyard_e2e::mock_engine`].
#![forbid(unsafe_code)]

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser;
use switchyard_e2e::mock_engine::{MockEngineArgs, serve};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> ExitCode {
    // Logs go to stderr: stdout carries only the `listening on` line that tests wait for.
    switchyard_runtime::init_tracing(switchyard_runtime::LogFormat::Text);

    let args = MockEngineArgs::parse();
    let listener = match TcpListener::bind((args.host.as_str(), args.port)).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("cannot listen on {}:{}: {error}", args.host, args.port);
            return ExitCode::FAILURE;
        }
    };
    let addr = match listener.local_addr() {
        Ok(addr) => addr,
        Err(error) => {
            eprintln!("cannot read the bound address: {error}");
            return ExitCode::FAILURE;
        }
    };
    let config = args.to_config(addr.port());
    if let Err(error) = config.validate() {
        eprintln!("invalid configuration: {error}");
        return ExitCode::from(2);
    }

    // Before announcing the port: whoever started us may stop us right away.
    let shutdown = switchyard_runtime::cancel_on_signal();
    let mut stdout = std::io::stdout().lock();
    if writeln!(stdout, "listening on {addr}")
        .and_then(|()| stdout.flush())
        .is_err()
    {
        // Whoever started us stopped reading; keep serving, the port is still usable.
        tracing::warn!("could not write the listening line to stdout");
    }
    drop(stdout);
    tracing::info!(%addr, model = %config.model, pod = %config.pod_name, engine = ?config.engine, "mock engine started");

    let shutdown = shutdown.cancelled_owned();
    match serve(config, listener, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}
