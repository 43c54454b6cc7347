//! Chooses the mode from the command line and starts the controller's core
//! with that mode's object source: `--config-dir` reads YAML files (local
//! mode), otherwise the Kubernetes API is watched.

use kube::Client;
use switchyard_runtime::CancellationToken;

use crate::cli::Args;
use crate::core::{self, Controller, ObjectSource};
use crate::error::ControllerError;
use crate::kubernetes::{self, KubernetesSource};
use crate::local::LocalSource;

/// Runs the controller in the mode `args` select until `shutdown` is
/// cancelled (then stops gracefully) or a part of it fails.
pub async fn run(args: Args, shutdown: CancellationToken) -> Result<(), ControllerError> {
    match &args.config_dir {
        Some(config_dir) => serve(&args, shutdown, local_source(&args, config_dir)?).await,
        None => {
            let client = kubernetes::client().await?;
            serve(&args, shutdown, KubernetesSource::new(&args, client)?).await
        }
    }
}

fn local_source(args: &Args, config_dir: &std::path::Path) -> Result<LocalSource, ControllerError> {
    let defaults = args
        .gateway_defaults()
        .map_err(ControllerError::InvalidFlag)?;
    Ok(LocalSource::new(config_dir.to_owned()).with_gateway_defaults(defaults))
}

async fn serve(
    args: &Args,
    shutdown: CancellationToken,
    source: impl ObjectSource,
) -> Result<(), ControllerError> {
    // Kubernetes mode may wait long for its caches; a shutdown meanwhile is no failure.
    let controller = tokio::select! {
        started = start(args, shutdown.clone(), source) => started?,
        () = shutdown.cancelled() => return Ok(()),
    };
    controller.wait().await
}

/// Starts local mode on `--config-dir`: returns once the first snapshot is published.
pub async fn start_local(args: &Args) -> Result<Controller, ControllerError> {
    let Some(config_dir) = &args.config_dir else {
        return Err(ControllerError::NoConfigDir);
    };
    start(
        args,
        CancellationToken::new(),
        local_source(args, config_dir)?,
    )
    .await
}

/// Starts Kubernetes mode on `client`: returns once the caches synced and the
/// first snapshot is published and served.
pub async fn start_kubernetes(args: &Args, client: Client) -> Result<Controller, ControllerError> {
    start(
        args,
        CancellationToken::new(),
        KubernetesSource::new(args, client)?,
    )
    .await
}

async fn start(
    args: &Args,
    shutdown: CancellationToken,
    source: impl ObjectSource,
) -> Result<Controller, ControllerError> {
    core::begin(args, shutdown).await?.start(source).await
}
