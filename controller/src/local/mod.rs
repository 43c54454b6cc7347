//! Local mode: ModelRoute, ModelServer and Pod objects (and the Gateway API
//! kinds: GatewayClass, Gateway, HTTPRoute, InferencePool) read from the YAML
//! files of one directory, reloaded when the files change.
//!
//! The directory is polled rather than watched with inotify: no extra
//! dependency, and it works on every filesystem, including the symlink swap a
//! Kubernetes ConfigMap volume does on update (which inotify watches on the
//! files themselves miss). How a change is taken up (stable before read, the
//! last good version of a broken file kept) is in [`files`].

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use switchyard_runtime::{TaskSet, clock};
use tokio::sync::watch;

use crate::compile::gateway_api::GatewayDefaults;
use crate::compile::{LoadProblem, ObjectSet};
use crate::core::{OBJECT_CHANGE_DEBOUNCE, ObjectSource, Serving, SourceStarted};
use crate::error::{ControllerError, LocalError};

pub mod files;
mod parse;
mod scan;

pub use self::files::DirFiles;
pub use parse::parse_documents;
pub use scan::{DirScan, FileRead, MAX_CONFIG_FILE_BYTES, scan_dir};

/// How often the directory is re-read. With [`FILE_STABLE_POLLS`], a change
/// reaches the dataplanes within about 3 polls (0.6 s), well inside the 2 s
/// end-to-end budget, while re-reading a few small files 5 times a second
/// costs nothing.
pub const CONFIG_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// A changed file is used once it read the same on this many polls after the
/// one that saw the change: unchanged for 2 × 200 ms, so a writer that pauses
/// for less than 400 ms in the middle of a non-atomic rewrite is never read
/// half-way.
pub const FILE_STABLE_POLLS: u32 = 2;

/// The objects of one directory read: the same set the Kubernetes caches
/// produce, so both feed the one compile loop.
pub type LocalObjects = ObjectSet;

/// Local mode's object source: the YAML files of one directory, watched.
#[derive(Clone, Debug)]
pub struct LocalSource {
    dir: PathBuf,
    settings: WatchSettings,
    gateway_defaults: Option<GatewayDefaults>,
}

impl LocalSource {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            settings: WatchSettings::default(),
            gateway_defaults: None,
        }
    }

    /// Gateway API mode: adds this GatewayClass and default Gateway to every
    /// load of the directory that does not define objects of their names
    /// (as the controller creates them in a cluster).
    pub fn with_gateway_defaults(mut self, defaults: Option<GatewayDefaults>) -> Self {
        self.gateway_defaults = defaults;
        self
    }
}

impl ObjectSource for LocalSource {
    async fn start(self, tasks: &mut TaskSet) -> Result<SourceStarted, ControllerError> {
        let (mut objects, watcher) = watch_dir(self.dir.clone(), self.settings).await?;
        tasks.spawn("config directory watcher", watcher);
        if let Some(defaults) = self.gateway_defaults {
            let (with_defaults, adder) = add_gateway_defaults(objects, defaults);
            tasks.spawn("gateway defaults", adder);
            objects = with_defaults;
        }
        let dir = self.dir;
        Ok(SourceStarted {
            objects,
            on_serving: Box::new(move |core: &Serving, _: &mut TaskSet| {
                // Local mode runs one controller: it is the leader.
                core.metrics.leader.set(1);
                tracing::info!(controller_id = %core.controller_id, config_dir = %dir.display(), "controller started in local mode");
            }),
        })
    }
}

/// Every object set of `source` with the default GatewayClass and Gateway
/// added where the directory has none of their names; the task ends when
/// the watcher or every receiver is gone.
fn add_gateway_defaults(
    mut source: watch::Receiver<Arc<LocalObjects>>,
    defaults: GatewayDefaults,
) -> (
    watch::Receiver<Arc<LocalObjects>>,
    impl Future<Output = ()> + Send + 'static,
) {
    let complete = move |objects: &LocalObjects| {
        let mut objects = objects.clone();
        defaults.add_missing(&mut objects);
        Arc::new(objects)
    };
    let (sender, receiver) = watch::channel(complete(&source.borrow_and_update()));
    let adder = async move {
        loop {
            tokio::select! {
                changed = source.changed() => if changed.is_err() { return },
                () = sender.closed() => return,
            }
            let objects = complete(&source.borrow_and_update());
            if sender.send(objects).is_err() {
                return;
            }
        }
    };
    (receiver, adder)
}

/// How the directory is polled and when a change is taken up (see [`files`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchSettings {
    pub poll_interval: Duration,
    /// Polls a changed file must read the same on before it is used.
    pub stable_polls: u32,
    /// How long changed files wait for one that keeps changing before the
    /// stable ones are used without it.
    pub max_delay: Duration,
}

impl Default for WatchSettings {
    fn default() -> Self {
        Self {
            poll_interval: CONFIG_POLL_INTERVAL,
            stable_polls: FILE_STABLE_POLLS,
            max_delay: OBJECT_CHANGE_DEBOUNCE.max_delay,
        }
    }
}

/// Reads and parses the directory once, without waiting for its files to be
/// stable (tools and tests that read a directory nobody is writing).
pub async fn load_dir(dir: &Path) -> Result<LocalObjects, LocalError> {
    let mut files = DirFiles::new(WatchSettings {
        stable_polls: 0,
        ..WatchSettings::default()
    });
    let scan = scan_dir(dir).await?;
    Ok(files
        .observe(scan, clock::now())
        .unwrap_or_else(|| files.objects()))
}

/// Logs every problem of a load (each once per load).
pub fn log_problems(dir: &Path, problems: &[LoadProblem]) {
    for problem in problems {
        tracing::warn!(
            dir = %dir.display(),
            file = %problem.file,
            document_index = ?problem.document_index,
            kind = ?problem.kind,
            name = ?problem.name,
            error = %problem.error,
            "config file problem"
        );
    }
}

/// Reads `dir` until its files are stable and returns those objects and the
/// watcher to run: it keeps polling the directory and publishes every change
/// once it is taken up.
///
/// A directory that does not exist (or is not one) is an error: a wrong
/// `--config-dir`. One that exists but cannot be listed starts with no
/// objects and its error in [`ObjectSet::source_error`], and is polled until
/// it can be read; one that becomes unreadable later keeps the last objects
/// (serving stale routes beats serving none). The watcher ends when every
/// receiver is dropped.
pub async fn watch_dir(
    dir: PathBuf,
    settings: WatchSettings,
) -> Result<
    (
        watch::Receiver<Arc<LocalObjects>>,
        impl Future<Output = ()> + Send + 'static,
    ),
    LocalError,
> {
    let mut files = DirFiles::new(settings);
    let first = match scan_dir(&dir).await {
        Err(error @ LocalError::NotADirectory(_)) => return Err(error),
        Err(LocalError::ReadDir { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            return Err(LocalError::ReadDir { path: dir, source });
        }
        Err(error) => {
            tracing::warn!(dir = %dir.display(), %error, "cannot read config directory; polling until it can be read");
            LocalObjects {
                source_error: Some(error.to_string()),
                ..LocalObjects::default()
            }
        }
        Ok(scan) => first_stable_objects(&dir, &mut files, scan, &settings).await,
    };
    log_problems(&dir, &first.problems);
    let (sender, receiver) = watch::channel(Arc::new(first));
    Ok((receiver, poll_dir(dir, settings, files, sender)))
}

/// Polls from the first read until its files are stable (or the max delay
/// passed), so the first snapshot is not built from a file caught mid-write.
async fn first_stable_objects(
    dir: &Path,
    files: &mut DirFiles,
    mut scan: DirScan,
    settings: &WatchSettings,
) -> LocalObjects {
    loop {
        if let Some(objects) = files.observe(scan, clock::now()) {
            return objects;
        }
        if !files.has_pending() {
            return files.objects();
        }
        clock::sleep(settings.poll_interval).await;
        scan = match scan_dir(dir).await {
            Ok(scan) => scan,
            // Gone unreadable while settling: what was read so far.
            Err(_) => return files.objects(),
        };
    }
}

async fn poll_dir(
    dir: PathBuf,
    settings: WatchSettings,
    mut files: DirFiles,
    sender: watch::Sender<Arc<LocalObjects>>,
) {
    loop {
        tokio::select! {
            () = clock::sleep(settings.poll_interval) => {}
            () = sender.closed() => return,
        }
        let scan = match scan_dir(&dir).await {
            Ok(scan) => scan,
            Err(error) => {
                let error = error.to_string();
                // The last objects stay; the error shows in /debug/objects.
                sender.send_if_modified(|objects| {
                    if objects.source_error.as_deref() == Some(error.as_str()) {
                        return false;
                    }
                    tracing::warn!(dir = %dir.display(), %error, "cannot read config directory; keeping the last loaded objects");
                    *objects = Arc::new(LocalObjects {
                        source_error: Some(error.clone()),
                        ..(**objects).clone()
                    });
                    true
                });
                continue;
            }
        };
        let readable_again = sender.borrow().source_error.is_some();
        let objects = match files.observe(scan, clock::now()) {
            Some(objects) => objects,
            None if readable_again => files.objects(),
            None => continue,
        };
        if readable_again {
            tracing::info!(dir = %dir.display(), "config directory readable again");
        }
        tracing::info!(
            dir = %dir.display(),
            routes = objects.routes.len(),
            servers = objects.servers.len(),
            pods = objects.pods.len(),
            problems = objects.problems.len(),
            "config directory changed; reloaded"
        );
        log_problems(&dir, &objects.problems);
        if sender.send(Arc::new(objects)).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse::tests::{ROUTE, SERVER};
    use super::*;

    fn fast_settings() -> WatchSettings {
        WatchSettings {
            poll_interval: Duration::from_millis(20),
            stable_polls: FILE_STABLE_POLLS,
            max_delay: Duration::from_millis(200),
        }
    }

    #[tokio::test]
    async fn a_missing_directory_or_a_file_is_a_startup_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = watch_dir(dir.path().join("nope"), fast_settings()).await;
        assert!(matches!(missing, Err(LocalError::ReadDir { .. })));
        let file = dir.path().join("file.yaml");
        std::fs::write(&file, ROUTE).expect("write");
        assert!(matches!(
            watch_dir(file, fast_settings()).await,
            Err(LocalError::NotADirectory(_))
        ));
        assert!(matches!(
            load_dir(&dir.path().join("nope")).await,
            Err(LocalError::ReadDir { .. })
        ));
    }

    #[tokio::test]
    async fn load_dir_reads_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.yaml"), ROUTE).expect("write");
        let objects = load_dir(dir.path()).await.expect("load");
        assert_eq!(objects.routes.len(), 1);
    }

    /// The whole watcher on tokio's paused clock: real files, polls counted
    /// by the clock, not slept through.
    #[tokio::test(start_paused = true)]
    async fn watcher_waits_for_stable_files_and_publishes_edits() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("route.yaml"), ROUTE).expect("write");
        let settings = fast_settings();
        let started = clock::now();
        let (mut receiver, watcher) = watch_dir(dir.path().to_owned(), settings)
            .await
            .expect("watch");
        assert_eq!(
            clock::now() - started,
            settings.poll_interval * FILE_STABLE_POLLS,
            "the first read waited for the file to be stable"
        );
        let task = tokio::spawn(watcher);
        assert_eq!(receiver.borrow_and_update().routes.len(), 1);

        // Same length as the original: a size comparison alone would miss it.
        let edited = ROUTE.replace("deepseek-simple", "deepseek-simplX");
        assert_eq!(edited.len(), ROUTE.len());
        std::fs::write(dir.path().join("route.yaml"), &edited).expect("write");
        std::fs::write(dir.path().join("server.yaml"), SERVER).expect("write");
        let edited_at = clock::now();
        receiver.changed().await.expect("watcher alive");
        let objects = receiver.borrow_and_update().clone();
        assert_eq!(
            objects.routes[0].metadata.name.as_deref(),
            Some("deepseek-simplX")
        );
        assert_eq!(objects.servers.len(), 1, "both files in one publish");
        let waited = clock::now() - edited_at;
        assert!(
            waited >= settings.poll_interval * FILE_STABLE_POLLS
                && waited <= settings.poll_interval * (FILE_STABLE_POLLS + 1),
            "{waited:?}"
        );

        drop(receiver);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("watcher stops once nobody listens")
            .expect("watcher task did not panic");
    }
}
