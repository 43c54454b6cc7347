//! `switchyard-controller`: parses the command line, sets up logging and runs
//! [`switchyard_controller::app`]; every failure becomes a logged error and an exit code.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use switchyard_controller::app;
use switchyard_controller::cli::Args;
use switchyard_controller::error::EXIT_FAILURE;

fn main() -> ExitCode {
    let args = Args::parse();
    switchyard_runtime::init_tracing(args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return exit_code(EXIT_FAILURE);
        }
    };
    let outcome = runtime.block_on(async {
        let shutdown = switchyard_runtime::cancel_on_signal();
        app::run(args, shutdown).await
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "switchyard-controller failed");
            exit_code(error.exit_code())
        }
    }
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
