//! Local mode: ModelRoute, ModelServer and Pod objects (and the Gateway API
//! kinds: GatewayClass, Gateway, HTTPRoute, InferencePool) read from the YAML
//! files of one directory, reloaded when the files change.
//!
//! The directory is polled rather than watched with inotify: no extra
//! dependency, and it works on every filesystem, including the symlink swap a
//! Kubernetes ConfigMap volume does on update (which inotify watches on the
//! files themselves miss).

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use switchyard_runtime::{Debounce, TaskSet, clock};
use tokio::sync::watch;

use crate::compile::gateway_api::GatewayDefaults;
use crate::compile::{LoadProblem, ObjectSet};
use crate::core::{OBJECT_CHANGE_DEBOUNCE, ObjectSource, Serving, SourceStarted};
use crate::error::{ControllerError, LocalError};

/// How often the directory is re-read: a change reaches the dataplanes within
/// this plus the debounce, well inside the 2 s end-to-end budget, while
/// re-reading a few small files 5 times a second costs nothing.
pub const CONFIG_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Files above this size are refused: routing config is kilobytes, and a
/// stray multi-gigabyte file in the directory must not exhaust memory.
pub const MAX_CONFIG_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// `apiVersion` of ModelRoute and ModelServer documents.
const CRD_API_VERSION: &str = "networking.serving.volcano.sh/v1alpha1";
/// `apiVersion` of Pod documents.
const POD_API_VERSION: &str = "v1";
/// `apiVersion` of GatewayClass, Gateway and HTTPRoute documents.
const GATEWAY_API_VERSION: &str = "gateway.networking.k8s.io/v1";
/// `apiVersion` of InferencePool documents.
const INFERENCE_API_VERSION: &str = "inference.networking.k8s.io/v1";

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
    /// load of the directory that does not define objects of their names.
    pub fn with_gateway_defaults(mut self, defaults: Option<GatewayDefaults>) -> Self {
        self.gateway_defaults = defaults;
        self
    }
}

impl ObjectSource for LocalSource {
    async fn start(self, tasks: &mut TaskSet) -> Result<SourceStarted, ControllerError> {
        let (objects, watcher) =
            watch_dir(self.dir.clone(), self.settings, self.gateway_defaults).await?;
        tasks.spawn("config directory watcher", watcher);
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

/// Polling and debounce periods of [`watch_dir`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchSettings {
    pub poll_interval: Duration,
    pub debounce: Debounce,
}

impl Default for WatchSettings {
    fn default() -> Self {
        Self {
            poll_interval: CONFIG_POLL_INTERVAL,
            debounce: OBJECT_CHANGE_DEBOUNCE,
        }
    }
}

/// One read of the directory: the content of every config file, sorted by name.
#[derive(Clone, Debug, Default)]
pub struct DirScan {
    files: Vec<ScannedFile>,
    /// Files that could not be read at all.
    problems: Vec<LoadProblem>,
}

#[derive(Clone, Debug)]
struct ScannedFile {
    name: String,
    len: u64,
    modified: Option<SystemTime>,
    content_hash: u64,
    text: String,
}

/// What decides whether the directory changed: names, sizes, mtimes and
/// content hashes (mtimes alone miss same-second edits on coarse filesystems
/// and symlink swaps that keep timestamps).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fingerprint(Vec<(String, u64, Option<SystemTime>, u64)>);

impl DirScan {
    fn fingerprint(&self) -> Fingerprint {
        let mut entries: Vec<_> = self
            .files
            .iter()
            .map(|file| {
                (
                    file.name.clone(),
                    file.len,
                    file.modified,
                    file.content_hash,
                )
            })
            .collect();
        // An unreadable file counts too: fixing its permissions is a change.
        entries.extend(
            self.problems
                .iter()
                .map(|problem| (problem.file.clone(), 0, None, 0)),
        );
        Fingerprint(entries)
    }

    /// Parses every document of every file.
    pub fn parse(&self) -> LocalObjects {
        let mut objects = LocalObjects {
            problems: self.problems.clone(),
            ..LocalObjects::default()
        };
        for file in &self.files {
            parse_documents(&file.name, &file.text, &mut objects);
        }
        objects
            .problems
            .sort_by(|a, b| (&a.file, a.document_index).cmp(&(&b.file, b.document_index)));
        objects
    }
}

/// Reads every `*.yaml` / `*.yml` file directly in `dir` (not in subdirectories).
pub async fn scan_dir(dir: &Path) -> Result<DirScan, LocalError> {
    let read_dir_error = |source| LocalError::ReadDir {
        path: dir.to_owned(),
        source,
    };
    let metadata = tokio::fs::metadata(dir).await.map_err(read_dir_error)?;
    if !metadata.is_dir() {
        return Err(LocalError::NotADirectory(dir.to_owned()));
    }
    let mut entries = tokio::fs::read_dir(dir).await.map_err(read_dir_error)?;
    let mut names = Vec::new();
    while let Some(entry) = entries.next_entry().await.map_err(read_dir_error)? {
        let Ok(name) = entry.file_name().into_string() else {
            tracing::debug!(dir = %dir.display(), "skipping a file whose name is not UTF-8");
            continue;
        };
        // Hidden entries include a ConfigMap volume's `..data` bookkeeping.
        if name.starts_with('.') || !is_config_file_name(&name) {
            continue;
        }
        names.push(name);
    }
    names.sort();

    let mut scan = DirScan::default();
    for name in names {
        let path = dir.join(&name);
        let file_problem = |error: String| LoadProblem {
            file: name.clone(),
            document_index: None,
            kind: None,
            name: None,
            error,
        };
        // `metadata` follows symlinks, as ConfigMap volumes need.
        let metadata = match tokio::fs::metadata(&path).await {
            Ok(metadata) => metadata,
            // Deleted between listing and reading: the next poll sees it gone.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => {
                scan.problems
                    .push(file_problem(format!("cannot read file: {error}")));
                continue;
            }
        };
        if !metadata.is_file() {
            continue;
        }
        if metadata.len() > MAX_CONFIG_FILE_BYTES {
            scan.problems.push(file_problem(format!(
                "file is {} bytes, above the {MAX_CONFIG_FILE_BYTES} byte limit",
                metadata.len()
            )));
            continue;
        }
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => {
                scan.problems
                    .push(file_problem(format!("cannot read file: {error}")));
                continue;
            }
        };
        let mut hasher = std::hash::DefaultHasher::new();
        bytes.hash(&mut hasher);
        let content_hash = hasher.finish();
        let text = match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(error) => {
                scan.problems
                    .push(file_problem(format!("file is not UTF-8: {error}")));
                continue;
            }
        };
        scan.files.push(ScannedFile {
            name,
            len: metadata.len(),
            modified: metadata.modified().ok(),
            content_hash,
            text,
        });
    }
    Ok(scan)
}

fn is_config_file_name(name: &str) -> bool {
    Path::new(name)
        .extension()
        .and_then(|extension| extension.to_str())
        .is_some_and(|extension| extension == "yaml" || extension == "yml")
}

/// Reads and parses the directory once.
pub async fn load_dir(dir: &Path) -> Result<LocalObjects, LocalError> {
    Ok(scan_dir(dir).await?.parse())
}

/// Parses the YAML documents of one file into `objects`; bad documents become problems.
pub fn parse_documents(file: &str, text: &str, objects: &mut LocalObjects) {
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let problem = |kind: Option<&str>, name: Option<&str>, error: String| LoadProblem {
            file: file.to_owned(),
            document_index: Some(index),
            kind: kind.map(str::to_owned),
            name: name.map(str::to_owned),
            error,
        };
        let value = match serde_yaml::Value::deserialize(document) {
            Ok(value) => value,
            Err(error) => {
                // Not a typed-field error (those come from `from_value` below) but
                // YAML syntax: the parser cannot find where the next document
                // starts, and serde_yaml would yield this same error forever.
                objects.problems.push(problem(
                    None,
                    None,
                    format!("{error}; the rest of the file was not read"),
                ));
                break;
            }
        };
        if value.is_null() {
            // An empty document, e.g. after a trailing `---`.
            continue;
        }
        let kind = value.get("kind").and_then(serde_yaml::Value::as_str);
        let api_version = value.get("apiVersion").and_then(serde_yaml::Value::as_str);
        let name = value
            .get("metadata")
            .and_then(|metadata| metadata.get("name"))
            .and_then(serde_yaml::Value::as_str);
        let expected_api_version = match kind {
            Some("ModelRoute" | "ModelServer") => CRD_API_VERSION,
            Some("Pod") => POD_API_VERSION,
            Some("GatewayClass" | "Gateway" | "HTTPRoute") => GATEWAY_API_VERSION,
            Some("InferencePool") => INFERENCE_API_VERSION,
            Some(other) => {
                tracing::debug!(
                    file,
                    document_index = index,
                    kind = other,
                    "ignoring a document of a kind local mode does not use"
                );
                continue;
            }
            None => {
                objects
                    .problems
                    .push(problem(None, name, "document has no `kind`".to_owned()));
                continue;
            }
        };
        if api_version != Some(expected_api_version) {
            objects.problems.push(problem(
                kind,
                name,
                format!(
                    "apiVersion {:?} is not {expected_api_version:?}",
                    api_version.unwrap_or_default()
                ),
            ));
            continue;
        }
        let parsed =
            match kind {
                Some("ModelRoute") => {
                    serde_yaml::from_value(value.clone()).map(|route| objects.routes.push(route))
                }
                Some("ModelServer") => {
                    serde_yaml::from_value(value.clone()).map(|server| objects.servers.push(server))
                }
                Some("GatewayClass") => serde_yaml::from_value(value.clone())
                    .map(|class| objects.gateway_classes.push(class)),
                Some("Gateway") => serde_yaml::from_value(value.clone())
                    .map(|gateway| objects.gateways.push(gateway)),
                Some("HTTPRoute") => serde_yaml::from_value(value.clone())
                    .map(|route| objects.http_routes.push(route)),
                Some("InferencePool") => serde_yaml::from_value(value.clone())
                    .map(|pool| objects.inference_pools.push(pool)),
                _ => serde_yaml::from_value(value.clone()).map(|pod| objects.pods.push(pod)),
            };
        if let Err(error) = parsed {
            objects
                .problems
                .push(problem(kind, name, error.to_string()));
        }
    }
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
            "skipping an unloadable config document"
        );
    }
}

/// Loads `dir` once (an unreadable directory is an error) and returns the
/// objects and the watcher to run: it keeps re-reading the directory and
/// publishes every changed load.
///
/// The watcher ends when every receiver is dropped. A directory that becomes
/// unreadable later keeps the last objects (serving stale routes beats serving none).
pub async fn watch_dir(
    dir: PathBuf,
    settings: WatchSettings,
    gateway_defaults: Option<GatewayDefaults>,
) -> Result<
    (
        watch::Receiver<Arc<LocalObjects>>,
        impl Future<Output = ()> + Send + 'static,
    ),
    LocalError,
> {
    let scan = scan_dir(&dir).await?;
    let objects = with_defaults(scan.parse(), gateway_defaults.as_ref());
    log_problems(&dir, &objects.problems);
    let (sender, receiver) = watch::channel(Arc::new(objects));
    Ok((
        receiver,
        poll_dir(dir, settings, gateway_defaults, scan.fingerprint(), sender),
    ))
}

fn with_defaults(mut objects: LocalObjects, defaults: Option<&GatewayDefaults>) -> LocalObjects {
    if let Some(defaults) = defaults {
        defaults.add_missing(&mut objects);
    }
    objects
}

async fn poll_dir(
    dir: PathBuf,
    settings: WatchSettings,
    gateway_defaults: Option<GatewayDefaults>,
    mut applied: Fingerprint,
    sender: watch::Sender<Arc<LocalObjects>>,
) {
    let mut last_scan_error: Option<String> = None;
    loop {
        tokio::select! {
            () = clock::sleep(settings.poll_interval) => {}
            () = sender.closed() => return,
        }
        let scan = match scan_dir(&dir).await {
            Ok(scan) => {
                if last_scan_error.take().is_some() {
                    tracing::info!(dir = %dir.display(), "config directory readable again");
                }
                scan
            }
            Err(error) => {
                let text = error.to_string();
                if last_scan_error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(dir = %dir.display(), %error, "cannot read config directory; keeping the last loaded objects");
                    last_scan_error = Some(text);
                }
                continue;
            }
        };
        if scan.fingerprint() == applied {
            continue;
        }
        let scan = debounce(&dir, scan, &settings).await;
        applied = scan.fingerprint();
        let objects = with_defaults(scan.parse(), gateway_defaults.as_ref());
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

/// Waits until the directory has been quiet for the debounce's quiet period
/// (or its max delay passed since `changed` was seen) and returns the newest scan.
async fn debounce(dir: &Path, changed: DirScan, settings: &WatchSettings) -> DirScan {
    let mut burst = settings.debounce.begin();
    let mut latest = changed;
    loop {
        burst.settled().await;
        let Ok(rescan) = scan_dir(dir).await else {
            return latest;
        };
        let still_changing = rescan.fingerprint() != latest.fingerprint();
        latest = rescan;
        if !still_changing || burst.is_overdue() {
            return latest;
        }
        burst.changed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTE: &str = r#"
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelRoute
metadata:
  name: deepseek-simple
spec:
  modelName: deepseek-simple
  rules:
  - name: default
    targetModels:
    - modelServerName: deepseek-r1-1-5b
"#;

    const SERVER: &str = r#"
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelServer
metadata:
  name: deepseek-r1-1-5b
  namespace: default
spec:
  workloadSelector:
    matchLabels:
      app: deepseek-r1-1-5b
  workloadPort:
    port: 8000
  model: deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
  inferenceEngine: vLLM
"#;

    const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: ds-0
  labels:
    app: deepseek-r1-1-5b
status:
  phase: Running
  podIP: 127.0.0.1
  conditions:
  - type: Ready
    status: "True"
"#;

    fn parse(text: &str) -> LocalObjects {
        let mut objects = LocalObjects::default();
        parse_documents("test.yaml", text, &mut objects);
        objects
    }

    #[test]
    fn dispatches_documents_on_kind() {
        let text = format!("{ROUTE}---\n{SERVER}---\n{POD}---\n");
        let objects = parse(&text);
        assert_eq!(objects.problems, vec![]);
        assert_eq!(objects.routes.len(), 1);
        assert_eq!(
            objects.routes[0].metadata.name.as_deref(),
            Some("deepseek-simple")
        );
        assert_eq!(
            objects.routes[0].spec.model_name.as_deref(),
            Some("deepseek-simple")
        );
        assert_eq!(objects.servers.len(), 1);
        assert_eq!(objects.servers[0].spec.workload_port.port, 8000);
        assert_eq!(objects.pods.len(), 1);
        assert_eq!(
            objects.pods[0]
                .status
                .as_ref()
                .and_then(|status| status.pod_ip.as_deref()),
            Some("127.0.0.1")
        );
    }

    #[test]
    fn ignores_other_kinds() {
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: y\n";
        let objects = parse(text);
        assert_eq!(objects, LocalObjects::default());
    }

    #[test]
    fn a_bad_document_is_reported_and_the_rest_still_loads() {
        let bad_server = SERVER.replace("port: 8000", "port: eight-thousand");
        let text = format!("{ROUTE}---\n{bad_server}---\n{POD}");
        let objects = parse(&text);
        assert_eq!(objects.routes.len(), 1);
        assert_eq!(objects.servers.len(), 0);
        assert_eq!(objects.pods.len(), 1);
        assert_eq!(objects.problems.len(), 1, "{:?}", objects.problems);
        let problem = &objects.problems[0];
        assert_eq!(problem.file, "test.yaml");
        assert_eq!(problem.document_index, Some(1));
        assert_eq!(problem.kind.as_deref(), Some("ModelServer"));
        assert_eq!(problem.name.as_deref(), Some("deepseek-r1-1-5b"));
        assert!(problem.error.contains("invalid type"), "{}", problem.error);
    }

    #[test]
    fn wrong_api_version_is_reported() {
        let text = ROUTE.replace(
            "networking.serving.volcano.sh/v1alpha1",
            "networking.serving.volcano.sh/v1",
        );
        let objects = parse(&text);
        assert!(objects.routes.is_empty());
        assert_eq!(objects.problems.len(), 1);
        assert!(
            objects.problems[0]
                .error
                .contains("networking.serving.volcano.sh/v1alpha1"),
            "{}",
            objects.problems[0].error
        );
    }

    #[test]
    fn a_document_without_kind_is_reported() {
        let objects = parse("metadata:\n  name: orphan\n");
        assert_eq!(objects.problems.len(), 1);
        assert_eq!(objects.problems[0].name.as_deref(), Some("orphan"));
        assert_eq!(objects.problems[0].error, "document has no `kind`");
    }

    #[tokio::test]
    async fn scan_reads_yaml_files_sorted_and_skips_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("b-server.yml"), SERVER).expect("write");
        std::fs::write(dir.path().join("a-route.yaml"), ROUTE).expect("write");
        std::fs::write(dir.path().join("c-pod.yaml"), POD).expect("write");
        std::fs::write(dir.path().join("notes.txt"), "kind: ModelRoute").expect("write");
        std::fs::write(dir.path().join(".hidden.yaml"), ROUTE).expect("write");
        std::fs::create_dir(dir.path().join("nested.yaml")).expect("mkdir");
        std::fs::write(dir.path().join("z-broken.yaml"), "kind: [unclosed").expect("write");

        let scan = scan_dir(dir.path()).await.expect("scan");
        let names: Vec<&str> = scan.files.iter().map(|file| file.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "a-route.yaml",
                "b-server.yml",
                "c-pod.yaml",
                "z-broken.yaml"
            ]
        );
        let objects = scan.parse();
        assert_eq!(
            (
                objects.routes.len(),
                objects.servers.len(),
                objects.pods.len()
            ),
            (1, 1, 1)
        );
        assert_eq!(objects.problems.len(), 1);
        assert_eq!(objects.problems[0].file, "z-broken.yaml");
    }

    #[test]
    fn a_syntax_error_keeps_the_documents_before_it() {
        let text = format!("{ROUTE}---\nkind: [unclosed\n---\n{POD}");
        let objects = parse(&text);
        assert_eq!(objects.routes.len(), 1);
        assert_eq!(objects.problems.len(), 1, "{:?}", objects.problems);
        assert_eq!(objects.problems[0].document_index, Some(1));
        assert!(
            objects.problems[0]
                .error
                .ends_with("the rest of the file was not read"),
            "{}",
            objects.problems[0].error
        );
    }

    #[tokio::test]
    async fn a_missing_directory_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope");
        assert!(matches!(
            load_dir(&missing).await,
            Err(LocalError::ReadDir { .. })
        ));
        let file = dir.path().join("file.yaml");
        std::fs::write(&file, ROUTE).expect("write");
        assert!(matches!(
            load_dir(&file).await,
            Err(LocalError::NotADirectory(_))
        ));
    }

    #[tokio::test]
    async fn watcher_publishes_edits() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("route.yaml"), ROUTE).expect("write");
        let settings = WatchSettings {
            poll_interval: Duration::from_millis(20),
            debounce: Debounce {
                quiet: Duration::from_millis(20),
                max_delay: Duration::from_millis(200),
            },
        };
        let (mut receiver, watcher) = watch_dir(dir.path().to_owned(), settings, None)
            .await
            .expect("watch");
        let task = tokio::spawn(watcher);
        assert_eq!(receiver.borrow_and_update().routes.len(), 1);

        // Same length as the original: a size comparison alone would miss it.
        let edited = ROUTE.replace("deepseek-simple", "deepseek-simplX");
        assert_eq!(edited.len(), ROUTE.len());
        std::fs::write(dir.path().join("route.yaml"), &edited).expect("write");
        // `wait_for`, not one `changed()`: the watcher may catch the file half
        // written and publish that first; what matters is the final state.
        tokio::time::timeout(
            Duration::from_secs(10),
            receiver.wait_for(|objects| {
                objects
                    .routes
                    .first()
                    .and_then(|route| route.metadata.name.as_deref())
                    == Some("deepseek-simplX")
            }),
        )
        .await
        .expect("reload within the deadline")
        .expect("watcher alive");

        std::fs::write(dir.path().join("server.yaml"), SERVER).expect("write");
        tokio::time::timeout(
            Duration::from_secs(10),
            receiver.wait_for(|objects| objects.servers.len() == 1 && objects.routes.len() == 1),
        )
        .await
        .expect("reload within the deadline")
        .expect("watcher alive");

        drop(receiver);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("watcher stops once nobody listens")
            .expect("watcher task did not panic");
    }
}
