//! `switchyard-controller`: parses the command line, sets up logging and runs
//! [`switchyard_controller::app`]; every failure becomes a logged error and an exit code.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use switchyard_controller::app;
use switchyard_controller::cli::Args;

fn main() -> ExitCode {
    let args = Args::parse();
    app::init_tracing(args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return exit_code(app::EXIT_FAILURE);
        }
    };
    match runtime.block_on(app::run(args, app::shutdown_signal())) {
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
