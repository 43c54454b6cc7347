//! Why the controller could not start or stopped on its own, and the process
//! exit code of each reason.

use std::path::PathBuf;

use switchyard_runtime::{BindError, TaskError};

use crate::cli::EXIT_USAGE;
use crate::router_config::RouterConfigError;
use crate::scrape::ScraperError;

/// Exit code when the config directory cannot be read (BSD `EX_NOINPUT`).
pub const EXIT_NO_INPUT: i32 = 66;
/// Exit code when Kubernetes mode finds no cluster credentials (BSD `EX_CONFIG`).
pub const EXIT_CONFIG: i32 = 78;
/// Exit code of every other failure.
pub const EXIT_FAILURE: i32 = 1;

/// Why the controller could not start or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("local mode needs --config-dir DIR (or SWITCHYARD_CONFIG_DIR)")]
    NoConfigDir,
    #[error("invalid flag: {0}")]
    InvalidFlag(String),
    #[error(transparent)]
    Kubernetes(#[from] KubernetesError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Config(#[from] LocalError),
    #[error("registering metrics failed: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("starting the engine scraper failed: {0}")]
    Scraper(#[from] ScraperError),
    #[error(transparent)]
    Task(#[from] TaskError),
    #[error(transparent)]
    RouterConfig(#[from] RouterConfigError),
    #[error("snapshot stream security: {0}")]
    StreamSecurity(#[from] crate::xds::StreamSecurityError),
}

impl ControllerError {
    /// Process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::NoConfigDir
            | Self::InvalidFlag(_)
            | Self::Scraper(ScraperError::InvalidConfig(_)) => EXIT_USAGE,
            Self::Config(_) | Self::RouterConfig(RouterConfigError::Read { .. }) => EXIT_NO_INPUT,
            Self::Kubernetes(_) => EXIT_CONFIG,
            Self::RouterConfig(_) | Self::StreamSecurity(_) => EXIT_USAGE,
            _ => EXIT_FAILURE,
        }
    }
}

/// Why local mode could not read its config directory (a bad file is a
/// [`crate::compile::LoadProblem`] instead).
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("cannot read config directory {path}: {source}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config directory {0} is not a directory")]
    NotADirectory(PathBuf),
}

/// Why Kubernetes mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error(
        "no Kubernetes credentials: not running in a cluster and no usable kubeconfig ({0}); pass --config-dir DIR to run in local mode"
    )]
    NoCredentials(#[source] kube::config::InferConfigError),
    #[error("cannot create the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}
