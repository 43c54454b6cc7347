#![forbid(unsafe_code)]

use clap::Parser;
use switchyard_dataplane::{app, cli::Args};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit code for a configuration error (sysexits EX_USAGE).
const EXIT_USAGE: i32 = 64;

fn main() {
    let args = Args::parse();
    switchyard_runtime::init_tracing(args.log_format);
    if let Err(error) = app::main(args) {
        tracing::error!(error = %error, "switchyard-dataplane failed");
        std::process::exit(match error {
            app::AppError::Config(_) => EXIT_USAGE,
            _ => 1,
        });
    }
}
