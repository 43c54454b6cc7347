//! Helpers for end-to-end tests: start the real binaries on loopback, wait for
//! them, talk HTTP to them, and always stop them (processes are killed on drop,
//! and by a reaper process when the test binary ends without dropping them).

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use switchyard_runtime::clock;

/// How long tests wait for a process or a condition before failing: generous,
/// because a busy 2-core CI machine can be slow, and a passing test never
/// waits this long.
pub const WAIT_DEADLINE: Duration = Duration::from_secs(30);

/// Starts of the controller tried when it exits before it is ready (its port
/// was taken between picking and binding it).
const CONTROLLER_START_ATTEMPTS: u32 = 3;
/// Starts of a dataplane before a test gives up (see [`Stack::start_dataplane`]).
const DATAPLANE_START_ATTEMPTS: u32 = 3;

/// Path of a workspace binary, next to the test executable's directory: built
/// by `cargo test --workspace` (`make test`) or `cargo build --workspace --bins`.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps layout");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} not found: run the e2e tests with `cargo test --workspace` (make test), or `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// Reads `+PID`, `-PID` and `/DIR` lines on its standard input; when that
/// ends, kills every PID added and not removed since, then removes the DIRs.
const REAPER_SCRIPT: &str = r#"
pids=
dirs=
while read -r line; do
  case $line in
    +*) pids="$pids ${line#+}" ;;
    -*) kept=; for pid in $pids; do [ "$pid" = "${line#-}" ] || kept="$kept $pid"; done; pids=$kept ;;
    /*) dirs="$dirs $line" ;;
  esac
done
[ -z "$pids" ] || kill -9 $pids 2>/dev/null
[ -z "$dirs" ] || rm -rf $dirs
"#;

/// Kills the processes a test binary started when it ends without stopping
/// them: a stack shared through a `static` is never dropped, and a test binary
/// killed by a signal drops nothing. A shell reads [`REAPER_SCRIPT`] lines on a
/// pipe only this process holds; the kernel closes the pipe however this
/// process ends, and the shell then kills what is still registered.
fn reaper() -> &'static Mutex<Option<ChildStdin>> {
    static REAPER: OnceLock<Mutex<Option<ChildStdin>>> = OnceLock::new();
    REAPER.get_or_init(|| {
        let stdin = Command::new("sh")
            .args(["-c", REAPER_SCRIPT])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()
            .and_then(|mut reaper| reaper.stdin.take());
        Mutex::new(stdin)
    })
}

/// Sends the [`reaper`] one line of [`REAPER_SCRIPT`].
fn tell_reaper(line: impl std::fmt::Display) {
    if let Some(stdin) = reaper().lock().as_mut() {
        // A reaper that is gone can do nothing more; the test goes on without it.
        let _ = writeln!(stdin, "{line}");
    }
}

/// A child process that is killed when dropped; its output goes to a log file
/// printed when the test fails.
pub struct Process {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    /// Starts `binary(bin)` with `args`, logging to `log_dir/name.log`.
    pub fn start(bin: &str, name: &str, args: &[String], log_dir: &Path) -> Self {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("create log file");
        let err = file.try_clone().expect("clone log file");
        let child = Command::new(binary(bin))
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {bin}: {e}"));
        tell_reaper(format_args!("+{}", child.id()));
        Self {
            name: name.to_owned(),
            child: Some(child),
            log,
        }
    }

    /// Kills the process and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            tell_reaper(format_args!("-{}", child.id()));
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Prints the log, framed by the process name.
    pub fn print_log(&self) {
        eprintln!(
            "----- log of {} -----\n{}\n----- end of {} -----",
            self.name,
            self.log_text(),
            self.name
        );
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            self.print_log();
        }
    }
}

/// The `switchyard-mock-engine` binary on a port it picks itself, for the tests
/// of the binary: started with its own flags, stopped by SIGTERM as Kubernetes
/// stops a pod. Killed when dropped before [`MockEngineBinary::terminate`].
pub struct MockEngineBinary {
    child: tokio::process::Child,
    pid: u32,
    /// Where it listens, from the `listening on ADDR` line it prints first.
    pub addr: SocketAddr,
}

impl MockEngineBinary {
    /// Starts the binary with `args` and `--port 0`.
    pub async fn start(args: &[&str]) -> Self {
        use tokio::io::{AsyncBufReadExt, BufReader};

        let mut child = tokio::process::Command::new(binary("switchyard-mock-engine"))
            .args(args)
            .args(["--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("mock engine binary starts");
        let pid = child.id().expect("running child has a pid");
        tell_reaper(format_args!("+{pid}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        tokio::time::timeout(WAIT_DEADLINE, BufReader::new(stdout).read_line(&mut line))
            .await
            .expect("listening line in time")
            .expect("stdout readable");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("socket address");
        Self { child, pid, addr }
    }

    /// `GET path`, on a connection closed again before this returns.
    pub async fn get(&self, path: &str) -> HttpResponse {
        let url = format!("http://{}{path}", self.addr);
        HttpClient::default()
            .get(&url)
            .await
            .expect("the binary answers")
    }

    /// Sends SIGTERM and waits for the exit.
    pub async fn terminate(mut self) -> ExitStatus {
        let signalled = tokio::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await
            .expect("kill runs");
        assert!(signalled.success());
        tokio::time::timeout(WAIT_DEADLINE, self.child.wait())
            .await
            .expect("exits in time")
            .expect("exit status")
    }
}

impl Drop for MockEngineBinary {
    fn drop(&mut self) {
        // Stopped by now, or killed right after this (`kill_on_drop`).
        tell_reaper(format_args!("-{}", self.pid));
    }
}

/// Value of the first sample of `name` in a text exposition `page` whose labels
/// contain every fragment of `labels` (e.g. `finished_reason="stop"`).
pub fn sample_value(page: &str, name: &str, labels: &[&str]) -> f64 {
    page.lines()
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .find(|line| labels.iter().all(|label| line.contains(label)))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} {labels:?} in\n{page}"))
}

/// A loopback address of its own for each test, so parallel tests never share
/// a port: `127.<per-process>.<per-test>.<n>`.
pub fn test_subnet() -> [u8; 3] {
    static NEXT: AtomicU8 = AtomicU8::new(1);
    let process_octet = (std::process::id() % 200) as u8 + 20;
    [127, process_octet, NEXT.fetch_add(1, Ordering::Relaxed)]
}

/// An address in `subnet`.
pub fn ip_in(subnet: [u8; 3], host: u8) -> Ipv4Addr {
    Ipv4Addr::new(subnet[0], subnet[1], subnet[2], host)
}

/// A port free on `ip` right now.
pub fn free_port(ip: Ipv4Addr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|addr| addr.port())
        .expect("bind an ephemeral port")
}

/// A free loopback socket address on 127.0.0.1.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_port(Ipv4Addr::LOCALHOST)))
}

/// Waits until `url` answers 200 (true) or `process` exits (false).
async fn ready_or_exited(http: &HttpClient, process: &mut Process, url: &str) -> bool {
    wait_for(url, || {
        let running = process.is_running();
        async move {
            if !running {
                return Some(false);
            }
            match http.get(url).await {
                Ok(response) if response.status == StatusCode::OK => Some(true),
                _ => None,
            }
        }
    })
    .await
}

/// Polls `check` until it returns Some or [`WAIT_DEADLINE`] passes.
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = clock::now() + WAIT_DEADLINE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(clock::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A fully read HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the answer's `status` and that its body contains `fragment`.
    #[track_caller]
    pub fn assert_says(&self, status: u16, fragment: &str) {
        assert_eq!(self.status, status, "{}", self.text());
        assert!(self.text().contains(fragment), "{}", self.text());
    }

    /// The mock engine pod that answered (`x-mock-pod`); panics without one.
    pub fn mock_pod(&self) -> String {
        self.header("x-mock-pod").expect("x-mock-pod").to_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A small HTTP/1.1 client for tests.
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for HttpClient {
    fn default() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        }
    }
}

/// A request to send: method, URL, headers and body.
fn request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request
        .body(Full::new(body.into()))
        .expect("valid test request")
}

/// `headers` after a JSON content type.
fn json_headers<'a>(headers: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    all
}

impl HttpClient {
    /// A client keeping at most `max_idle` idle connections per host (the
    /// default keeps every connection it ever opened).
    pub fn with_max_idle(max_idle: usize) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(max_idle)
                .build(HttpConnector::new()),
        }
    }

    /// Sends a request and reads the whole response.
    pub async fn call(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<HttpResponse, String> {
        let response = self
            .client
            .request(request(method, url, headers, body))
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("{url}: reading body: {e}"))?
            .to_bytes();
        Ok(HttpResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    pub async fn get(&self, url: &str) -> Result<HttpResponse, String> {
        self.call(Method::GET, url, &[], Bytes::new()).await
    }

    /// POSTs a JSON body.
    pub async fn post_json(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<HttpResponse, String> {
        let headers = json_headers(headers);
        self.call(Method::POST, url, &headers, body.to_owned())
            .await
    }

    /// POSTs a JSON body and returns the response head with its body unread:
    /// a stream to follow, or to leave in the middle.
    pub async fn post_json_streaming(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<http::Response<Incoming>, hyper_util::client::legacy::Error> {
        let request = request(Method::POST, url, &json_headers(headers), body.to_owned());
        self.client.request(request).await
    }

    /// Waits until `url` answers 200.
    pub async fn wait_ok(&self, url: &str) {
        wait_for(url, || async {
            match self.get(url).await {
                Ok(response) if response.status == StatusCode::OK => Some(()),
                _ => None,
            }
        })
        .await
    }
}

/// YAML of a Pod in `default` that local mode treats as ready.
pub fn ready_pod_yaml(name: &str, ip: Ipv4Addr, labels: &[(&str, &str)]) -> String {
    pod_yaml("default", name, ip, labels, &[])
}

/// YAML of a ready Pod with labels and annotations (values quoted).
pub fn pod_yaml(
    namespace: &str,
    name: &str,
    ip: Ipv4Addr,
    labels: &[(&str, &str)],
    annotations: &[(&str, &str)],
) -> String {
    let map = |pairs: &[(&str, &str)]| -> String {
        pairs
            .iter()
            .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
            .collect()
    };
    let annotations = if annotations.is_empty() {
        String::new()
    } else {
        format!("  annotations:\n{}", map(annotations))
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n{}{annotations}status:\n  phase: Running\n  podIP: {ip}\n  conditions:\n  - type: Ready\n    status: \"True\"\n",
        map(labels)
    )
}

/// Port of every mock engine a [`TestPod`] starts, and of [`model_server_yaml`].
pub const ENGINE_PORT: u16 = 8000;

/// YAML of a vLLM ModelServer `name` in `default` for the pods labelled
/// `app: <name>` on [`ENGINE_PORT`]; `spec` adds fields in YAML flow style
/// (`"trafficPolicy: {timeout: 300ms}"`).
pub fn model_server_yaml(name: &str, spec: &str) -> String {
    let base = format!(
        "workloadSelector: {{matchLabels: {{app: {name}}}}}, workloadPort: {{port: {ENGINE_PORT}}}, inferenceEngine: vLLM"
    );
    object_yaml(
        "ModelServer",
        &format!("name: {name}"),
        &join_flow(&base, spec),
    )
}

/// YAML of a ModelRoute `name` sending model `model` to the ModelServer `server`.
pub fn simple_route_yaml(name: &str, model: &str, server: &str) -> String {
    object_yaml(
        "ModelRoute",
        &format!("name: {name}"),
        &format!("modelName: {model}, rules: [{{targetModels: [{{modelServerName: {server}}}]}}]"),
    )
}

fn object_yaml(kind: &str, metadata: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.serving.volcano.sh/v1alpha1\nkind: {kind}\nmetadata: {{{}}}\nspec: {{{spec}}}\n",
        join_flow(metadata, "namespace: default")
    )
}

fn join_flow(first: &str, more: &str) -> String {
    if more.is_empty() {
        first.to_owned()
    } else {
        format!("{first}, {more}")
    }
}

/// The text of `testdata/kthena/examples/{file}`, one of Kthena's example
/// manifests as Kthena publishes them.
pub fn kthena_example(file: &str) -> String {
    let path = format!(
        "{}/../testdata/kthena/examples/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The config files of routes that each send one model to a plain vLLM
/// ModelServer of their own: `(route, model, server)` for each.
pub fn route_per_server_files(routes: &[(&str, &str, &str)]) -> [(&'static str, String); 2] {
    let servers: Vec<String> = routes
        .iter()
        .map(|(_, _, server)| model_server_yaml(server, ""))
        .collect();
    let routes: Vec<String> = routes
        .iter()
        .map(|(route, model, server)| simple_route_yaml(route, model, server))
        .collect();
    [
        ("servers.yaml", yaml_documents(&servers)),
        ("routes.yaml", yaml_documents(&routes)),
    ]
}

/// A request's head and its whole body (empty when reading it failed): what a
/// test server records of each request.
pub async fn read_request(request: Request<Incoming>) -> (http::request::Parts, Bytes) {
    let (head, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .unwrap_or_default();
    (head, body)
}

/// YAML documents in one file.
pub fn yaml_documents(documents: &[String]) -> String {
    documents.join("---\n")
}

/// A ready pod of a test stack and the mock engine behind it, if any.
#[derive(Debug, Clone)]
pub struct TestPod {
    name: String,
    /// Last octet of its IP in the stack's subnet.
    host: u8,
    namespace: String,
    labels: Vec<(String, String)>,
    annotations: Vec<(String, String)>,
    /// The model its engine serves and the engine's extra flags.
    engine: Option<(String, Vec<String>)>,
}

impl TestPod {
    /// Pod `name` at `.host`, labelled `app: <app>`, served by a mock engine
    /// for `model` started with `engine_args`.
    pub fn serving(name: &str, host: u8, app: &str, model: &str, engine_args: &[&str]) -> Self {
        let args = engine_args.iter().map(|arg| (*arg).to_owned()).collect();
        Self {
            engine: Some((model.to_owned(), args)),
            ..Self::without_engine(name, host, app)
        }
    }

    /// Pod `name` at `.host`, labelled `app: <app>`, where nothing listens:
    /// connections to it are refused.
    pub fn without_engine(name: &str, host: u8, app: &str) -> Self {
        Self {
            name: name.to_owned(),
            host,
            namespace: "default".to_owned(),
            labels: vec![("app".to_owned(), app.to_owned())],
            annotations: Vec::new(),
            engine: None,
        }
    }

    /// The pod with one more label.
    pub fn labelled(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.to_owned(), value.to_owned()));
        self
    }

    /// The pod with an annotation.
    pub fn annotated(mut self, key: &str, value: &str) -> Self {
        self.annotations.push((key.to_owned(), value.to_owned()));
        self
    }

    /// The pod in `namespace` (default: `default`).
    pub fn in_namespace(mut self, namespace: &str) -> Self {
        namespace.clone_into(&mut self.namespace);
        self
    }
}

fn str_pairs(pairs: &[(String, String)]) -> Vec<(&str, &str)> {
    pairs
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect()
}

/// One mock engine to start.
#[derive(Debug, Clone)]
pub struct EngineSpec {
    /// Pod name, also reported by the engine in `x-mock-pod`.
    pub name: String,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub model: String,
    pub extra_args: Vec<String>,
}

/// Mock engines, a controller in local mode and dataplanes, all on loopback.
pub struct Stack {
    // Fields drop in order: processes first (printing their logs on failure),
    // the directory holding the logs last.
    pub dataplanes: Vec<Dataplane>,
    pub controller: Option<Process>,
    pub engines: Vec<Process>,
    pub config_dir: PathBuf,
    pub xds_addr: SocketAddr,
    /// `http`, or `https` for a controller serving its stream over TLS.
    pub xds_scheme: &'static str,
    pub controller_admin: SocketAddr,
    /// The controller's debug listener (`/debug/*`).
    pub controller_debug: SocketAddr,
    pub http: HttpClient,
    /// This stack's own loopback subnet ([`test_subnet`]).
    pub subnet: [u8; 3],
    pub dir: tempfile::TempDir,
}

/// See [`Stack::logs_on_failure`].
pub struct LogsOnFailure<'a>(&'a Stack);

impl Drop for LogsOnFailure<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let stack = self.0;
            let dataplanes = stack.dataplanes.iter().map(|dataplane| &dataplane.process);
            for process in stack
                .engines
                .iter()
                .chain(&stack.controller)
                .chain(dataplanes)
            {
                process.print_log();
            }
        }
    }
}

/// A running dataplane and its ports.
pub struct Dataplane {
    pub process: Process,
    pub traffic: SocketAddr,
    pub metrics: SocketAddr,
    pub debug: SocketAddr,
}

impl Dataplane {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.traffic)
    }
}

impl Stack {
    /// An empty stack with a config dir holding `files` (name, YAML).
    pub fn new(files: &[(&str, String)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_dir = dir.path().join("config");
        std::fs::create_dir(&config_dir).expect("config dir");
        for (name, yaml) in files {
            std::fs::write(config_dir.join(name), yaml).expect("write config");
        }
        Self {
            dir,
            config_dir,
            engines: Vec::new(),
            controller: None,
            xds_addr: free_addr(),
            xds_scheme: "http",
            controller_admin: free_addr(),
            controller_debug: free_addr(),
            dataplanes: Vec::new(),
            http: HttpClient::default(),
            subnet: test_subnet(),
        }
    }

    /// The address `.host` in this stack's subnet.
    pub fn ip(&self, host: u8) -> Ipv4Addr {
        ip_in(self.subnet, host)
    }

    /// Writes `pods.yaml` with the Pod objects of `pods`, starts their engines
    /// and returns what it started.
    pub async fn start_pods(&mut self, pods: &[TestPod]) -> Vec<EngineSpec> {
        let yaml: Vec<String> = pods
            .iter()
            .map(|pod| {
                pod_yaml(
                    &pod.namespace,
                    &pod.name,
                    self.ip(pod.host),
                    &str_pairs(&pod.labels),
                    &str_pairs(&pod.annotations),
                )
            })
            .collect();
        self.write_config("pods.yaml", &yaml_documents(&yaml));
        let engines: Vec<EngineSpec> = pods
            .iter()
            .filter_map(|pod| {
                let (model, extra_args) = pod.engine.clone()?;
                Some(EngineSpec {
                    name: pod.name.clone(),
                    ip: self.ip(pod.host),
                    port: ENGINE_PORT,
                    model,
                    extra_args,
                })
            })
            .collect();
        self.start_engines(&engines).await;
        engines
    }

    /// For a stack kept in a `static`, which is never dropped: its directory
    /// is removed when the test binary ends, after its processes are killed.
    pub fn remove_at_exit(&self) {
        tell_reaper(self.dir.path().display());
    }

    /// Prints the log of every process of the stack if the test fails while
    /// the guard is alive: for a stack shared by several tests, whose
    /// processes are not dropped when one test fails.
    pub fn logs_on_failure(&self) -> LogsOnFailure<'_> {
        LogsOnFailure(self)
    }

    /// Replaces a config file atomically (write + rename), as editors and ConfigMaps do.
    pub fn write_config(&self, name: &str, yaml: &str) {
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml).expect("write config");
        std::fs::rename(&tmp, self.config_dir.join(name)).expect("rename config");
    }

    /// Starts mock engines and waits until each answers.
    pub async fn start_engines(&mut self, engines: &[EngineSpec]) {
        for engine in engines {
            let mut args = vec![
                "--host".to_owned(),
                engine.ip.to_string(),
                "--port".to_owned(),
                engine.port.to_string(),
                "--model".to_owned(),
                engine.model.clone(),
                "--name".to_owned(),
                engine.name.clone(),
            ];
            args.extend(engine.extra_args.iter().cloned());
            self.engines.push(Process::start(
                "switchyard-mock-engine",
                &engine.name,
                &args,
                self.dir.path(),
            ));
        }
        for engine in engines {
            self.http
                .wait_ok(&format!("http://{}:{}/health", engine.ip, engine.port))
                .await;
        }
    }

    /// `GET path` on the controller's debug listener (`/debug/objects`, `/debug/snapshot`).
    pub async fn controller_debug_get(&self, path: &str) -> HttpResponse {
        self.get_from(self.controller_debug, path).await
    }

    /// `GET path` on the controller's admin listener (`/metrics`, `/readyz`).
    pub async fn controller_admin_get(&self, path: &str) -> HttpResponse {
        self.get_from(self.controller_admin, path).await
    }

    async fn get_from(&self, listener: SocketAddr, path: &str) -> HttpResponse {
        let url = format!("http://{listener}{path}");
        self.http
            .get(&url)
            .await
            .unwrap_or_else(|error| panic!("GET {url}: {error}"))
    }

    /// POSTs a JSON `body` to dataplane 0.
    pub async fn post(&self, path: &str, headers: &[(&str, &str)], body: &str) -> HttpResponse {
        let url = self.dataplanes[0].url(path);
        let response = self.http.post_json(&url, headers, body).await;
        response.expect("dataplane answers")
    }

    /// POSTs a JSON `body` to dataplane 0 and returns the response with its
    /// body unread: a stream to follow, or to leave in the middle.
    pub async fn post_streaming(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> http::Response<Incoming> {
        let url = self.dataplanes[0].url(path);
        let response = self.http.post_json_streaming(&url, headers, body).await;
        response.expect("dataplane answers")
    }

    /// Starts (or restarts) the controller and waits until it is ready.
    ///
    /// A port [`free_addr`] picked can be taken by another test's process
    /// before the controller binds it; a controller that exits before it is
    /// ready is started again on fresh ports, as long as no dataplane was
    /// given the old ones.
    pub async fn start_controller(&mut self) {
        self.start_controller_with(&[]).await;
    }

    /// [`Stack::start_controller`] with more flags.
    pub async fn start_controller_with(&mut self, extra_args: &[&str]) {
        if let Some(mut old) = self.controller.take() {
            old.stop();
        }
        for attempt in 1..=CONTROLLER_START_ATTEMPTS {
            let mut process = self.controller_process(extra_args);
            let url = format!("http://{}/readyz", self.controller_admin);
            let ready = ready_or_exited(&self.http, &mut process, &url).await;
            if ready {
                self.controller = Some(process);
                return;
            }
            assert!(
                attempt < CONTROLLER_START_ATTEMPTS && self.dataplanes.is_empty(),
                "controller exited before it was ready:\n{}",
                process.log_text()
            );
            self.xds_addr = free_addr();
            self.controller_admin = free_addr();
            self.controller_debug = free_addr();
        }
    }

    /// (Re)starts the controller on the stack's ports with more flags and
    /// returns at once: for a controller that is not meant to become ready
    /// yet (e.g. one holding an empty config directory).
    pub fn spawn_controller_with(&mut self, extra_args: &[&str]) {
        self.stop_controller();
        self.controller = Some(self.controller_process(extra_args));
    }

    /// A controller process on the stack's directory and ports.
    fn controller_process(&self, extra_args: &[&str]) -> Process {
        let mut args = vec![
            "--config-dir".to_owned(),
            self.config_dir.display().to_string(),
            "--xds-addr".to_owned(),
            self.xds_addr.to_string(),
            "--metrics-addr".to_owned(),
            self.controller_admin.to_string(),
            "--debug-addr".to_owned(),
            self.controller_debug.ip().to_string(),
            "--debug-port".to_owned(),
            self.controller_debug.port().to_string(),
        ];
        args.extend(extra_args.iter().map(|arg| (*arg).to_owned()));
        Process::start(
            "switchyard-controller",
            "controller",
            &args,
            self.dir.path(),
        )
    }

    /// Kills the mock engine whose pod name is `name`.
    pub fn kill_engine(&mut self, name: &str) {
        self.engines
            .iter_mut()
            .find(|engine| engine.name() == name)
            .unwrap_or_else(|| panic!("no engine {name}"))
            .stop();
    }

    pub fn stop_controller(&mut self) {
        if let Some(mut controller) = self.controller.take() {
            controller.stop();
        }
    }

    /// Starts a dataplane; does not wait for readiness.
    pub fn spawn_dataplane(&mut self) -> usize {
        self.spawn_dataplane_with(&[])
    }

    /// Starts a dataplane with extra flags; does not wait for readiness.
    pub fn spawn_dataplane_with(&mut self, extra_args: &[&str]) -> usize {
        let index = self.dataplanes.len();
        let (traffic, metrics, debug) = (free_addr(), free_addr(), free_addr());
        let mut args = vec![
            "--controller".to_owned(),
            format!("{}://{}", self.xds_scheme, self.xds_addr),
            "--host".to_owned(),
            "127.0.0.1".to_owned(),
            "--port".to_owned(),
            traffic.port().to_string(),
            "--metrics-port".to_owned(),
            metrics.port().to_string(),
            "--debug-port".to_owned(),
            debug.port().to_string(),
            "--node-id".to_owned(),
            format!("dataplane-{index}"),
        ];
        args.extend(extra_args.iter().map(|a| (*a).to_owned()));
        let process = Process::start(
            "switchyard-dataplane",
            &format!("dataplane-{index}"),
            &args,
            self.dir.path(),
        );
        self.dataplanes.push(Dataplane {
            process,
            traffic,
            metrics,
            debug,
        });
        index
    }

    /// Starts a dataplane and waits until it has applied a snapshot. A
    /// dataplane that exits first (a free port taken by another test between
    /// the pick and the bind) is started again on new ports.
    pub async fn start_dataplane(&mut self) -> usize {
        for attempt in 1..=DATAPLANE_START_ATTEMPTS {
            let index = self.spawn_dataplane();
            let url = self.dataplanes[index].url("/readyz");
            let ready =
                ready_or_exited(&self.http, &mut self.dataplanes[index].process, &url).await;
            if ready {
                return index;
            }
            let mut failed = self.dataplanes.pop().expect("the dataplane just started");
            assert!(
                attempt < DATAPLANE_START_ATTEMPTS,
                "dataplane exited before it was ready:\n{}",
                failed.process.log_text()
            );
            failed.process.stop();
        }
        unreachable!("the last attempt returns or panics")
    }

    pub async fn wait_dataplane_ready(&self, index: usize) {
        self.http
            .wait_ok(&self.dataplanes[index].url("/readyz"))
            .await;
    }
}
