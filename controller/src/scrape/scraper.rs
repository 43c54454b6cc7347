//! The scrape loop: polls every target's `/metrics` (and now and then
//! `/v1/models`) and publishes the pods' loads on a watch channel.
//!
//! Behaviour:
//! - Every [`ScrapeConfig::interval`] all current targets are scraped
//!   concurrently (at most [`ScrapeConfig::max_concurrency`] at once), each
//!   request bounded by [`ScrapeConfig::timeout`], so a dead pod costs one
//!   timeout and never holds up the others. A pass that runs late delays the
//!   next tick instead of bunching passes up.
//! - A target that appears is scraped at once instead of at the next tick; a
//!   target that disappears is dropped from the published map and its metric
//!   series are removed right away. A target whose address or engine changed
//!   starts over (histogram deltas across two processes would be meaningless).
//! - A pod enters the map after its first successful `/metrics` scrape. When a
//!   later scrape fails the pod keeps its last [`PodLoad`] unchanged; its
//!   `observed_at_unix_ms` is not refreshed, so consumers see how old it is.
//! - `/v1/models` is fetched with the first scrape of a pod, then every
//!   [`ScrapeConfig::models_interval`] (retried every pass while it fails).
//! - A new map is published only when it differs from the previous one.
//! - The task ends when the target sender or every load receiver is dropped.
//!
//! Metrics (on the registry given to [`Scraper::spawn`]):
//! - `switchyard_controller_scrape_duration_seconds{engine}`: histogram of
//!   `/metrics` scrapes, failed ones included;
//! - `switchyard_controller_scrape_errors_total{pod,reason}`: failed `/metrics`
//!   and `/v1/models` requests, `reason` one of [`ScrapeErrorReason`];
//! - `switchyard_controller_scrape_last_duration_seconds{pod}`: duration of
//!   the pod's latest `/metrics` scrape;
//! - `switchyard_controller_scrape_age_seconds{pod}`: time since the pod's last
//!   successful `/metrics` scrape, updated after every pass; the series exists
//!   from the first success on.
//!
//! The per-pod series are removed when the pod leaves the target list, which
//! keeps their cardinality bounded by the live pods.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use prometheus::{Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use serde::Deserialize;
use switchyard_runtime::clock::{self, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tracing::{debug, info, warn};

use crate::metrics::registered;

use super::{
    EngineSample, HistogramTotals, PodKey, PodLoad, ScrapeTarget, interval_mean, parse_engine_page,
};

/// Kthena's `METRICS_SCRAPE_INTERVAL` default; fast enough for load-aware
/// routing, cheap enough for hundreds of pods.
pub const DEFAULT_SCRAPE_INTERVAL: Duration = Duration::from_secs(1);
/// Below the interval so a pass with a dead pod still ends before the next tick,
/// yet long enough for a busy Python engine to render its page.
pub const DEFAULT_SCRAPE_TIMEOUT: Duration = Duration::from_millis(750);
/// The loaded models (LoRA adapters) change rarely; 10 s keeps `/v1/models`
/// traffic at a tenth of `/metrics` while adapters show up quickly.
pub const DEFAULT_MODELS_INTERVAL: Duration = Duration::from_secs(10);
/// Enough parallel scrapes that even a few hundred pods finish well inside one
/// interval, without opening a socket per pod at once on big clusters.
pub const DEFAULT_MAX_CONCURRENCY: usize = 64;
/// Real vLLM pages are ~60 KiB; 8 MiB leaves room for many models and LoRA
/// label sets while bounding the memory a misbehaving pod can make us hold.
pub const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;
/// Below the 5 s keep-alive of uvicorn (which serves vLLM and SGLang), so we
/// drop an idle connection before the server does and never reuse one it is
/// closing; with 1 s scrapes a pod's connection is reused long before this.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// One connection for `/metrics` and one for a concurrent `/v1/models`.
const POOL_MAX_IDLE_PER_HOST: usize = 2;
/// Ask for the classic text format, which is what [`super::prometheus_text`]
/// parses, rather than OpenMetrics.
const METRICS_ACCEPT: &str = "text/plain;version=0.0.4;q=1,*/*;q=0.1";

/// Published map of pod loads; shared, never mutated in place.
pub type PodLoads = Arc<BTreeMap<PodKey, PodLoad>>;

/// Tuning of the scrape loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScrapeConfig {
    /// Time between the starts of two scrape passes.
    pub interval: Duration,
    /// Bound on one request (connect, response and body).
    pub timeout: Duration,
    /// Time between two `/v1/models` fetches of one pod.
    pub models_interval: Duration,
    /// Most scrapes in flight at once.
    pub max_concurrency: usize,
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        Self {
            interval: DEFAULT_SCRAPE_INTERVAL,
            timeout: DEFAULT_SCRAPE_TIMEOUT,
            models_interval: DEFAULT_MODELS_INTERVAL,
            max_concurrency: DEFAULT_MAX_CONCURRENCY,
        }
    }
}

impl ScrapeConfig {
    /// Rejects values the loop cannot run with.
    pub fn validate(&self) -> Result<(), ScrapeConfigError> {
        if self.interval.is_zero() {
            return Err(ScrapeConfigError::ZeroInterval);
        }
        if self.timeout.is_zero() {
            return Err(ScrapeConfigError::ZeroTimeout);
        }
        if self.max_concurrency == 0 {
            return Err(ScrapeConfigError::ZeroConcurrency);
        }
        Ok(())
    }
}

/// An unusable [`ScrapeConfig`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScrapeConfigError {
    #[error("the scrape interval must be greater than zero")]
    ZeroInterval,
    #[error("the scrape timeout must be greater than zero")]
    ZeroTimeout,
    #[error("the scrape concurrency must be at least 1")]
    ZeroConcurrency,
}

/// Why [`Scraper::spawn`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ScraperError {
    #[error("invalid scrape configuration: {0}")]
    InvalidConfig(#[from] ScrapeConfigError),
    /// E.g. the scrape metrics are already registered on this registry.
    #[error("registering the scrape metrics failed: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// The `reason` label of `switchyard_controller_scrape_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ScrapeErrorReason {
    /// No TCP connection could be made.
    Connect,
    /// No complete response within the scrape timeout.
    Timeout,
    /// The pod answered with a non-2xx status.
    HttpStatus,
    /// The exchange broke after connecting (reset, malformed HTTP, body read error).
    Transport,
    /// The answer was unusable: too large, not UTF-8, malformed exposition
    /// text or JSON, or no engine metrics on the page.
    Parse,
}

impl ScrapeErrorReason {
    /// Every reason, for removing a pod's series.
    pub const ALL: [Self; 5] = [
        Self::Connect,
        Self::Timeout,
        Self::HttpStatus,
        Self::Transport,
        Self::Parse,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::HttpStatus => "http_status",
            Self::Transport => "transport",
            Self::Parse => "parse",
        }
    }
}

/// A running scrape loop.
#[derive(Debug)]
pub struct Scraper {
    /// Latest loads of the scraped pods, keyed by pod.
    pub loads: watch::Receiver<PodLoads>,
    /// The loop; abort it to stop scraping.
    pub task: JoinHandle<()>,
}

impl Scraper {
    /// [`Scraper::prepare`], then runs the loop on the current Tokio runtime.
    pub fn spawn(
        config: ScrapeConfig,
        targets: watch::Receiver<Vec<ScrapeTarget>>,
        registry: &Registry,
    ) -> Result<Self, ScraperError> {
        let (loads, scrape_loop) = Self::prepare(config, targets, registry)?;
        let task = tokio::spawn(scrape_loop.run());
        Ok(Self { loads, task })
    }

    /// Registers the scrape metrics on `registry` and returns the loads the
    /// loop will publish and the loop, to run where the caller supervises it.
    /// The target list is read at every pass, and a change to it is acted on at once.
    pub fn prepare(
        config: ScrapeConfig,
        targets: watch::Receiver<Vec<ScrapeTarget>>,
        registry: &Registry,
    ) -> Result<(watch::Receiver<PodLoads>, ScrapeLoop), ScraperError> {
        config.validate()?;
        if config.timeout >= config.interval {
            warn!(
                timeout = ?config.timeout,
                interval = ?config.interval,
                "scrape timeout is not below the interval: a dead pod will stretch scrape passes"
            );
        }
        let metrics = ScrapeMetrics::register(registry)?;
        let (loads_sender, loads) = watch::channel(PodLoads::default());
        let worker = Worker {
            client: http_client(),
            config,
            metrics,
            pods: BTreeMap::new(),
            loads: loads_sender,
        };
        Ok((loads, ScrapeLoop { worker, targets }))
    }
}

/// A scrape loop not yet running; see [`Scraper::prepare`].
pub struct ScrapeLoop {
    worker: Worker,
    targets: watch::Receiver<Vec<ScrapeTarget>>,
}

impl ScrapeLoop {
    /// Scrapes until the target sender or every load receiver is gone.
    pub async fn run(self) {
        self.worker.run(self.targets).await;
    }
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
        .pool_timer(TokioTimer::new())
        .build(connector)
}

struct ScrapeMetrics {
    duration: HistogramVec,
    last_duration: GaugeVec,
    errors: IntCounterVec,
    age: GaugeVec,
}

impl ScrapeMetrics {
    fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let duration = registered(
            registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "switchyard_controller_scrape_duration_seconds",
                    "Duration of engine /metrics scrapes, failed ones included.",
                ),
                &["engine"],
            )?,
        )?;
        let errors = registered(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "switchyard_controller_scrape_errors_total",
                    "Failed engine /metrics and /v1/models requests, by pod and reason.",
                ),
                &["pod", "reason"],
            )?,
        )?;
        // Per pod a gauge, not a histogram: one series per pod stays cheap
        // with thousands of pods; the histogram above has the distribution.
        let last_duration = registered(
            registry,
            GaugeVec::new(
                Opts::new(
                    "switchyard_controller_scrape_last_duration_seconds",
                    "Duration of the pod's latest /metrics scrape, failed ones included.",
                ),
                &["pod"],
            )?,
        )?;
        let age = registered(
            registry,
            GaugeVec::new(
                Opts::new(
                    "switchyard_controller_scrape_age_seconds",
                    "Seconds since the pod's last successful /metrics scrape.",
                ),
                &["pod"],
            )?,
        )?;
        Ok(Self {
            duration,
            last_duration,
            errors,
            age,
        })
    }

    fn count_error(&self, pod: &str, reason: ScrapeErrorReason) {
        self.errors.with_label_values(&[pod, reason.as_str()]).inc();
    }

    /// A failed scrape of `endpoint`: counted every time, a warning (ending
    /// with `consequence`) when it starts failing, debug while it keeps failing.
    fn note_failure(
        &self,
        failing: &mut bool,
        pod: &str,
        endpoint: &str,
        error: &FetchError,
        consequence: &str,
    ) {
        self.count_error(pod, error.reason());
        if std::mem::replace(failing, true) {
            debug!(pod, %error, "{endpoint} scrape failed");
        } else {
            warn!(pod, %error, "{endpoint} scrape failed{consequence}");
        }
    }

    fn remove_pod(&self, pod: &str) {
        // Absent series are fine: a pod may never have failed or succeeded.
        let _ = self.age.remove_label_values(&[pod]);
        let _ = self.last_duration.remove_label_values(&[pod]);
        for reason in ScrapeErrorReason::ALL {
            let _ = self.errors.remove_label_values(&[pod, reason.as_str()]);
        }
    }
}

/// What the loop remembers about one target.
struct PodState {
    target: ScrapeTarget,
    /// `None` until the first successful `/metrics` scrape.
    load: Option<PodLoad>,
    previous_ttft: Option<HistogramTotals>,
    previous_tpot: Option<HistogramTotals>,
    models: Vec<String>,
    models_refreshed_at: Option<Instant>,
    last_success: Option<Instant>,
    age_gauge: Option<Gauge>,
    metrics_failing: bool,
    models_failing: bool,
}

impl PodState {
    fn new(target: ScrapeTarget) -> Self {
        Self {
            target,
            load: None,
            previous_ttft: None,
            previous_tpot: None,
            models: Vec::new(),
            models_refreshed_at: None,
            last_success: None,
            age_gauge: None,
            metrics_failing: false,
            models_failing: false,
        }
    }

    fn models_due(&self, now: Instant, models_interval: Duration) -> bool {
        self.models_refreshed_at
            .is_none_or(|refreshed| now.saturating_duration_since(refreshed) >= models_interval)
    }
}

struct Worker {
    config: ScrapeConfig,
    client: HttpClient,
    metrics: ScrapeMetrics,
    pods: BTreeMap<PodKey, PodState>,
    loads: watch::Sender<PodLoads>,
}

impl Worker {
    async fn run(mut self, mut targets: watch::Receiver<Vec<ScrapeTarget>>) {
        let mut ticker = tokio::time::interval(self.config.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    let current = targets.borrow_and_update().clone();
                    self.reconcile(&current);
                    let all: Vec<ScrapeTarget> =
                        self.pods.values().map(|pod| pod.target.clone()).collect();
                    self.scrape(all).await;
                }
                changed = targets.changed() => {
                    if changed.is_err() {
                        debug!("scrape target sender dropped, stopping the scrape loop");
                        return;
                    }
                    let current = targets.borrow_and_update().clone();
                    let added = self.reconcile(&current);
                    self.scrape(added).await;
                }
                () = self.loads.closed() => {
                    debug!("every pod load receiver dropped, stopping the scrape loop");
                    return;
                }
            }
        }
    }

    /// Aligns the pod states with `targets` and returns the targets that need a
    /// first scrape. With duplicate keys the last target wins.
    fn reconcile(&mut self, targets: &[ScrapeTarget]) -> Vec<ScrapeTarget> {
        let desired: BTreeMap<&PodKey, &ScrapeTarget> =
            targets.iter().map(|target| (&target.key, target)).collect();

        let departed: Vec<PodKey> = self
            .pods
            .iter()
            .filter(|(key, pod)| desired.get(key).is_none_or(|target| **target != pod.target))
            .map(|(key, _)| key.clone())
            .collect();
        for key in departed {
            self.pods.remove(&key);
            self.metrics.remove_pod(&key);
        }

        let mut added = Vec::new();
        for (key, target) in desired {
            if !self.pods.contains_key(key) {
                self.pods.insert(key.clone(), PodState::new(target.clone()));
                added.push(target.clone());
            }
        }
        added
    }

    async fn scrape(&mut self, targets: Vec<ScrapeTarget>) {
        let started = clock::now();
        let jobs: Vec<(ScrapeTarget, bool)> = targets
            .into_iter()
            .map(|target| {
                let models_due = self
                    .pods
                    .get(&target.key)
                    .is_some_and(|pod| pod.models_due(started, self.config.models_interval));
                (target, models_due)
            })
            .collect();
        let client = &self.client;
        let timeout = self.config.timeout;
        let results: Vec<PodScrape> = futures::stream::iter(jobs)
            .map(|(target, fetch_models)| scrape_pod(client, target, timeout, fetch_models))
            .buffer_unordered(self.config.max_concurrency)
            .collect()
            .await;
        for result in results {
            self.apply(result);
        }
        self.update_ages();
        self.publish();
    }

    fn apply(&mut self, scrape: PodScrape) {
        let metrics = &self.metrics;
        let Some(pod) = self.pods.get_mut(&scrape.target.key) else {
            return;
        };
        if pod.target != scrape.target {
            return;
        }
        let key = scrape.target.key.as_str();
        metrics
            .duration
            .with_label_values(&[scrape.target.engine.as_str()])
            .observe(scrape.metrics_duration.as_secs_f64());
        metrics
            .last_duration
            .with_label_values(&[key])
            .set(scrape.metrics_duration.as_secs_f64());

        if let Some(models) = scrape.models {
            match models {
                Ok(models) => {
                    note_success(&mut pod.models_failing, key, "/v1/models");
                    pod.models_refreshed_at = Some(scrape.finished_at);
                    if let Some(load) = &mut pod.load {
                        load.models.clone_from(&models);
                    }
                    pod.models = models;
                }
                Err(error) => {
                    metrics.note_failure(&mut pod.models_failing, key, "/v1/models", &error, "");
                }
            }
        }

        match scrape.metrics {
            Ok(sample) => {
                note_success(&mut pod.metrics_failing, key, "/metrics");
                pod.load = Some(PodLoad {
                    requests_waiting: sample.requests_waiting,
                    requests_running: sample.requests_running,
                    kv_cache_usage: sample.kv_cache_usage,
                    ttft_seconds: interval_mean(pod.previous_ttft, sample.ttft),
                    tpot_seconds: interval_mean(pod.previous_tpot, sample.tpot),
                    models: pod.models.clone(),
                    observed_at_unix_ms: scrape.observed_at_unix_ms,
                    kv_cache_capacity_tokens: sample.kv_cache_capacity_tokens,
                });
                pod.previous_ttft = Some(sample.ttft);
                pod.previous_tpot = Some(sample.tpot);
                pod.last_success = Some(scrape.finished_at);
                if pod.age_gauge.is_none() {
                    pod.age_gauge = Some(metrics.age.with_label_values(&[key]));
                }
            }
            Err(error) => {
                let keeping = ", keeping the last values";
                metrics.note_failure(&mut pod.metrics_failing, key, "/metrics", &error, keeping);
            }
        }
    }

    fn update_ages(&self) {
        let now = clock::now();
        for pod in self.pods.values() {
            if let (Some(gauge), Some(last_success)) = (&pod.age_gauge, pod.last_success) {
                gauge.set(now.saturating_duration_since(last_success).as_secs_f64());
            }
        }
    }

    fn publish(&self) {
        let loads: BTreeMap<PodKey, PodLoad> = self
            .pods
            .iter()
            .filter_map(|(key, pod)| pod.load.clone().map(|load| (key.clone(), load)))
            .collect();
        self.loads.send_if_modified(|current| {
            if **current == loads {
                false
            } else {
                *current = Arc::new(loads);
                true
            }
        });
    }
}

/// Outcome of scraping one pod in one pass.
struct PodScrape {
    target: ScrapeTarget,
    metrics: Result<EngineSample, FetchError>,
    metrics_duration: Duration,
    observed_at_unix_ms: i64,
    /// `None` when `/v1/models` was not due.
    models: Option<Result<Vec<String>, FetchError>>,
    finished_at: Instant,
}

async fn scrape_pod(
    client: &HttpClient,
    target: ScrapeTarget,
    timeout: Duration,
    fetch_models: bool,
) -> PodScrape {
    let metrics = async {
        let started = clock::now();
        let result = fetch(client, target.addr, "/metrics", METRICS_ACCEPT, timeout)
            .await
            .and_then(|body| {
                let text = std::str::from_utf8(&body).map_err(|_| FetchError::NotUtf8)?;
                Ok(parse_engine_page(target.engine, text)?)
            });
        (result, started.elapsed(), clock::unix_ms_now())
    };
    let models = async {
        if fetch_models {
            Some(fetch_models_list(client, target.addr, timeout).await)
        } else {
            None
        }
    };
    let ((metrics, metrics_duration, observed_at_unix_ms), models) = tokio::join!(metrics, models);
    PodScrape {
        target,
        metrics,
        metrics_duration,
        observed_at_unix_ms,
        models,
        finished_at: clock::now(),
    }
}

/// OpenAI-compatible `GET /v1/models` answer; only the ids matter.
#[derive(Deserialize)]
struct ModelList {
    data: Vec<ModelCard>,
}

#[derive(Deserialize)]
struct ModelCard {
    id: String,
}

/// The ids of the served models, sorted and without duplicates so that equal
/// sets compare equal whatever order the engine lists them in.
async fn fetch_models_list(
    client: &HttpClient,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Vec<String>, FetchError> {
    let body = fetch(client, addr, "/v1/models", "application/json", timeout).await?;
    let list: ModelList = serde_json::from_slice(&body)?;
    let ids: BTreeSet<String> = list.data.into_iter().map(|card| card.id).collect();
    Ok(ids.into_iter().collect())
}

/// One failed request, internal; its [`ScrapeErrorReason`] is what gets counted.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("connect failed: {0}")]
    Connect(#[source] hyper_util::client::legacy::Error),
    #[error("no complete response within the scrape timeout")]
    Timeout,
    #[error("unexpected HTTP status {0}")]
    HttpStatus(StatusCode),
    #[error("request failed: {0}")]
    Request(#[source] hyper_util::client::legacy::Error),
    #[error("building the request failed: {0}")]
    BuildRequest(#[source] http::Error),
    #[error("reading the body failed: {0}")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the body is larger than {MAX_RESPONSE_BYTES} bytes")]
    BodyTooLarge,
    #[error("the body is not UTF-8")]
    NotUtf8,
    #[error("{0}")]
    EnginePage(#[from] super::EnginePageError),
    #[error("invalid /v1/models JSON: {0}")]
    ModelsJson(#[from] serde_json::Error),
}

/// A successful scrape of `endpoint`: says so when it had been failing.
fn note_success(failing: &mut bool, pod: &str, endpoint: &str) {
    if std::mem::take(failing) {
        info!(pod, "{endpoint} scrape recovered");
    }
}

impl FetchError {
    fn reason(&self) -> ScrapeErrorReason {
        match self {
            Self::Connect(_) => ScrapeErrorReason::Connect,
            Self::Timeout => ScrapeErrorReason::Timeout,
            Self::HttpStatus(_) => ScrapeErrorReason::HttpStatus,
            Self::Request(_) | Self::BuildRequest(_) | Self::Body(_) => {
                ScrapeErrorReason::Transport
            }
            Self::BodyTooLarge | Self::NotUtf8 | Self::EnginePage(_) | Self::ModelsJson(_) => {
                ScrapeErrorReason::Parse
            }
        }
    }
}

/// `GET http://addr{path}`, whole exchange (body included) under `timeout`,
/// body capped at [`MAX_RESPONSE_BYTES`].
async fn fetch(
    client: &HttpClient,
    addr: SocketAddr,
    path: &str,
    accept: &'static str,
    timeout: Duration,
) -> Result<Bytes, FetchError> {
    let request = Request::get(format!("http://{addr}{path}"))
        .header(header::ACCEPT, accept)
        .body(Empty::<Bytes>::new())
        .map_err(FetchError::BuildRequest)?;
    let exchange = async {
        let response = client.request(request).await.map_err(|error| {
            if error.is_connect() {
                FetchError::Connect(error)
            } else {
                FetchError::Request(error)
            }
        })?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::HttpStatus(status));
        }
        let collected = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|error| {
                if error.is::<LengthLimitError>() {
                    FetchError::BodyTooLarge
                } else {
                    FetchError::Body(error)
                }
            })?;
        Ok(collected.to_bytes())
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| FetchError::Timeout)?
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use std::convert::Infallible;
    use std::sync::Mutex;

    use http::Response;
    use http_body_util::Full;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use switchyard_crd::InferenceEngine;
    use tokio::net::TcpListener;
    use tokio::task::JoinSet;

    use super::super::prometheus_text;
    use super::*;

    /// Generous: the machine running the tests may be busy.
    const WAIT_DEADLINE: Duration = Duration::from_secs(10);
    const MODELS_JSON: &str = r#"{"object":"list","data":[
        {"id":"tiny-lora","object":"model","parent":"tiny-llama"},
        {"id":"tiny-llama","object":"model","parent":null}]}"#;
    /// A `/metrics` page recorded from a real vLLM engine under load (`testdata/README.md`).
    fn engine_page() -> String {
        include_str!("../../../testdata/vllm/metrics_during_load.txt").to_owned()
    }

    /// What a test server does with requests.
    #[derive(Clone)]
    enum Behaviour {
        /// Serves `/metrics` and `/v1/models`.
        Engine { metrics: String },
        /// Accepts connections and never answers.
        Hang,
        /// Answers every request with this status.
        Status(StatusCode),
        /// Answers `/metrics` with text that is not exposition format.
        Garbage,
    }

    /// A loopback HTTP server, stopped (with its connections) on drop.
    struct TestServer {
        addr: SocketAddr,
        behaviour: Arc<Mutex<Behaviour>>,
        task: JoinHandle<()>,
    }

    impl TestServer {
        async fn start(behaviour: Behaviour) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let behaviour = Arc::new(Mutex::new(behaviour));
            let shared = behaviour.clone();
            let task = tokio::spawn(async move {
                let mut connections = JoinSet::new();
                let mut held_open = Vec::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    while connections.try_join_next().is_some() {}
                    if matches!(*shared.lock().unwrap(), Behaviour::Hang) {
                        held_open.push(stream);
                        continue;
                    }
                    let shared = shared.clone();
                    connections.spawn(async move {
                        let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                            let behaviour = shared.lock().unwrap().clone();
                            let response = respond(&behaviour, request.uri().path());
                            async move { Ok::<_, Infallible>(response) }
                        });
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            Self {
                addr,
                behaviour,
                task,
            }
        }

        fn set_behaviour(&self, behaviour: Behaviour) {
            *self.behaviour.lock().unwrap() = behaviour;
        }

        fn target(&self, key: &str) -> ScrapeTarget {
            ScrapeTarget {
                key: key.to_owned(),
                addr: self.addr,
                engine: InferenceEngine::Vllm,
            }
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn respond(behaviour: &Behaviour, path: &str) -> Response<Full<Bytes>> {
        let (status, body) = match (behaviour, path) {
            (Behaviour::Engine { metrics }, "/metrics") => (StatusCode::OK, metrics.clone()),
            (Behaviour::Engine { .. } | Behaviour::Garbage, "/v1/models") => {
                (StatusCode::OK, MODELS_JSON.to_owned())
            }
            (Behaviour::Garbage, "/metrics") => (StatusCode::OK, "<html>hello</html>".to_owned()),
            (Behaviour::Status(status), _) => (*status, "unavailable".to_owned()),
            _ => (StatusCode::NOT_FOUND, "not found".to_owned()),
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
    }

    /// Value of the sample `name` whose labels include `labels`.
    fn metric_value(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        let samples = prometheus_text::parse(&text).unwrap();
        samples
            .iter()
            .find(|sample| {
                sample.name == name
                    && labels
                        .iter()
                        .all(|(label, value)| sample.label(label).as_deref() == Some(*value))
            })
            .map(|sample| sample.value)
    }

    fn error_count(registry: &Registry, pod: &str, reason: ScrapeErrorReason) -> f64 {
        metric_value(
            registry,
            "switchyard_controller_scrape_errors_total",
            &[("pod", pod), ("reason", reason.as_str())],
        )
        .unwrap_or(0.0)
    }

    fn age_series(registry: &Registry, pod: &str) -> Option<f64> {
        metric_value(
            registry,
            "switchyard_controller_scrape_age_seconds",
            &[("pod", pod)],
        )
    }

    /// Waits on the published loads until `condition` holds; panics after
    /// [`WAIT_DEADLINE`].
    async fn wait_for(
        loads: &mut watch::Receiver<PodLoads>,
        mut condition: impl FnMut(&BTreeMap<PodKey, PodLoad>) -> bool,
    ) -> PodLoads {
        let deadline = clock::now() + WAIT_DEADLINE;
        loop {
            let current = loads.borrow_and_update().clone();
            if condition(&current) {
                return current;
            }
            tokio::time::timeout_at(deadline, loads.changed())
                .await
                .expect("condition not met before the deadline")
                .expect("scraper stopped");
        }
    }

    impl TestServer {
        /// A server answering like a vLLM engine under load.
        async fn engine() -> Self {
            Self::start(Behaviour::Engine {
                metrics: engine_page(),
            })
            .await
        }
    }

    /// A scraper with [`fast_config`] over `targets`, with its registry and the
    /// sender that changes its targets.
    struct Running {
        targets: watch::Sender<Vec<ScrapeTarget>>,
        registry: Registry,
        loads: watch::Receiver<PodLoads>,
        task: JoinHandle<()>,
    }

    fn scrape(targets: Vec<ScrapeTarget>) -> Running {
        let (sender, receiver) = watch::channel(targets);
        let registry = Registry::new();
        let Scraper { loads, task } = Scraper::spawn(fast_config(), receiver, &registry).unwrap();
        Running {
            targets: sender,
            registry,
            loads,
            task,
        }
    }

    fn fast_config() -> ScrapeConfig {
        ScrapeConfig {
            interval: Duration::from_millis(100),
            timeout: Duration::from_secs(1),
            ..ScrapeConfig::default()
        }
    }

    fn assert_during_load_values(load: &PodLoad) {
        assert_eq!(load.requests_waiting, 16.0);
        assert_eq!(load.requests_running, 8.0);
        assert_eq!(load.kv_cache_usage, 0.17322834645669294);
        assert!(load.observed_at_unix_ms > 0);
    }

    #[tokio::test]
    async fn fast_pod_is_published_while_a_hanging_pod_times_out() {
        let fast = TestServer::engine().await;
        let hanging = TestServer::start(Behaviour::Hang).await;
        let mut scraper = scrape(vec![fast.target("ns/fast"), hanging.target("ns/hanging")]);

        let published = wait_for(&mut scraper.loads, |loads| {
            loads.contains_key("ns/fast")
                && error_count(&scraper.registry, "ns/hanging", ScrapeErrorReason::Timeout) >= 1.0
        })
        .await;

        assert_during_load_values(&published["ns/fast"]);
        // The first scrape has no previous totals to diff against.
        assert_eq!(published["ns/fast"].ttft_seconds, 0.0);
        assert!(!published.contains_key("ns/hanging"));
        assert_eq!(
            error_count(&scraper.registry, "ns/fast", ScrapeErrorReason::Timeout),
            0.0
        );
        assert!(age_series(&scraper.registry, "ns/fast").is_some());
        assert_eq!(age_series(&scraper.registry, "ns/hanging"), None);
        let scrapes = metric_value(
            &scraper.registry,
            "switchyard_controller_scrape_duration_seconds_count",
            &[("engine", "vLLM")],
        );
        assert!(scrapes.is_some_and(|count| count >= 2.0), "{scrapes:?}");
        scraper.task.abort();
    }

    #[tokio::test]
    async fn models_ids_land_in_the_pod_load() {
        let fast = TestServer::engine().await;
        let mut scraper = scrape(vec![fast.target("ns/fast")]);

        let published = wait_for(&mut scraper.loads, |loads| {
            loads
                .get("ns/fast")
                .is_some_and(|load| !load.models.is_empty())
        })
        .await;

        assert_eq!(published["ns/fast"].models, vec!["tiny-llama", "tiny-lora"]);
        assert_during_load_values(&published["ns/fast"]);
        scraper.task.abort();
    }

    #[tokio::test]
    async fn a_removed_pod_leaves_the_map_and_its_age_series_is_removed() {
        let first = TestServer::engine().await;
        let second = TestServer::engine().await;
        let mut scraper = scrape(vec![first.target("ns/first"), second.target("ns/second")]);
        wait_for(&mut scraper.loads, |loads| {
            loads.contains_key("ns/first") && loads.contains_key("ns/second")
        })
        .await;
        assert!(age_series(&scraper.registry, "ns/second").is_some());

        scraper
            .targets
            .send(vec![first.target("ns/first")])
            .unwrap();
        let published =
            wait_for(&mut scraper.loads, |loads| !loads.contains_key("ns/second")).await;

        assert!(published.contains_key("ns/first"));
        assert_eq!(age_series(&scraper.registry, "ns/second"), None);
        assert!(age_series(&scraper.registry, "ns/first").is_some());
        let last_duration = |pod: &str| {
            metric_value(
                &scraper.registry,
                "switchyard_controller_scrape_last_duration_seconds",
                &[("pod", pod)],
            )
        };
        assert_eq!(last_duration("ns/second"), None);
        assert!(last_duration("ns/first").is_some());
        scraper.task.abort();
    }

    #[tokio::test]
    async fn a_failing_pod_keeps_its_last_load_without_refreshing_it() {
        let flaky = TestServer::engine().await;
        // Keeps passes publishing while the flaky pod fails.
        let steady = TestServer::engine().await;
        let mut scraper = scrape(vec![flaky.target("ns/flaky"), steady.target("ns/steady")]);
        wait_for(&mut scraper.loads, |loads| loads.contains_key("ns/flaky")).await;

        flaky.set_behaviour(Behaviour::Status(StatusCode::SERVICE_UNAVAILABLE));
        let failed_once = wait_for(&mut scraper.loads, |_| {
            error_count(&scraper.registry, "ns/flaky", ScrapeErrorReason::HttpStatus) >= 1.0
        })
        .await;
        let kept = failed_once["ns/flaky"].clone();
        let later = wait_for(&mut scraper.loads, |_| {
            error_count(&scraper.registry, "ns/flaky", ScrapeErrorReason::HttpStatus) >= 3.0
        })
        .await;

        assert_eq!(later["ns/flaky"], kept);
        assert_during_load_values(&kept);
        scraper.task.abort();
    }

    #[tokio::test]
    async fn failures_are_counted_by_reason() {
        let steady = TestServer::engine().await;
        let erroring =
            TestServer::start(Behaviour::Status(StatusCode::INTERNAL_SERVER_ERROR)).await;
        let garbage = TestServer::start(Behaviour::Garbage).await;
        let closed_addr = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap()
        };
        let closed = ScrapeTarget {
            key: "ns/closed".to_owned(),
            addr: closed_addr,
            engine: InferenceEngine::Vllm,
        };
        let mut scraper = scrape(vec![
            steady.target("ns/steady"),
            erroring.target("ns/erroring"),
            garbage.target("ns/garbage"),
            closed,
        ]);

        let published = wait_for(&mut scraper.loads, |_| {
            error_count(
                &scraper.registry,
                "ns/erroring",
                ScrapeErrorReason::HttpStatus,
            ) >= 1.0
                && error_count(&scraper.registry, "ns/garbage", ScrapeErrorReason::Parse) >= 1.0
                && error_count(&scraper.registry, "ns/closed", ScrapeErrorReason::Connect) >= 1.0
        })
        .await;

        let keys: Vec<&str> = published.keys().map(String::as_str).collect();
        assert_eq!(keys, vec!["ns/steady"]);
        scraper.task.abort();
    }

    #[tokio::test]
    async fn a_new_target_is_scraped_without_waiting_for_the_next_tick() {
        let fast = TestServer::engine().await;
        let (targets_sender, targets) = watch::channel(Vec::new());
        let registry = Registry::new();
        let config = ScrapeConfig {
            // The only tick in the test's lifetime is the immediate first one.
            interval: Duration::from_secs(3600),
            ..ScrapeConfig::default()
        };
        let Scraper { mut loads, task } = Scraper::spawn(config, targets, &registry).unwrap();

        targets_sender.send(vec![fast.target("ns/fast")]).unwrap();
        let published = wait_for(&mut loads, |loads| loads.contains_key("ns/fast")).await;

        assert_during_load_values(&published["ns/fast"]);
        task.abort();
    }

    #[tokio::test]
    async fn the_loop_ends_when_the_target_sender_is_dropped() {
        let (targets_sender, targets) = watch::channel(Vec::new());
        let registry = Registry::new();
        let scraper = Scraper::spawn(ScrapeConfig::default(), targets, &registry).unwrap();
        drop(targets_sender);
        tokio::time::timeout(WAIT_DEADLINE, scraper.task)
            .await
            .expect("scrape loop still running")
            .unwrap();
    }

    #[tokio::test]
    async fn spawn_rejects_bad_configs_and_double_registration() {
        let registry = Registry::new();
        let (_targets_sender, targets) = watch::channel(Vec::new());
        let zero_interval = ScrapeConfig {
            interval: Duration::ZERO,
            ..ScrapeConfig::default()
        };
        assert!(matches!(
            Scraper::spawn(zero_interval, targets.clone(), &registry),
            Err(ScraperError::InvalidConfig(ScrapeConfigError::ZeroInterval))
        ));
        let zero_concurrency = ScrapeConfig {
            max_concurrency: 0,
            ..ScrapeConfig::default()
        };
        assert_eq!(
            zero_concurrency.validate(),
            Err(ScrapeConfigError::ZeroConcurrency)
        );

        let first = Scraper::spawn(ScrapeConfig::default(), targets.clone(), &registry).unwrap();
        assert!(matches!(
            Scraper::spawn(ScrapeConfig::default(), targets, &registry),
            Err(ScraperError::Metrics(_))
        ));
        first.task.abort();
    }

    #[test]
    fn default_timeout_is_below_the_interval() {
        let config = ScrapeConfig::default();
        assert!(config.timeout < config.interval);
        assert_eq!(config.validate(), Ok(()));
    }
}
