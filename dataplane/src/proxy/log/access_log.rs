//! The access log: one line per request, JSON (default) or text, in the
//! Kthena router's format, formatted and written off the request path.
//!
//! A finished request hands its [`AccessLogEntry`] (mostly `Arc`s of the
//! snapshot objects, nothing formatted) to its traffic worker's own
//! [`AccessLog`]: a push onto a list only that worker (and, once per batch,
//! the writer) touches. A dedicated writer thread takes every worker's list
//! a few milliseconds after the first entry of a batch arrived, formats the
//! lines and writes them at once. A worker wakes the writer once per batch,
//! not per request, and no lock, counter or channel is shared by every
//! request. When a worker's list is full (the sink is stalled) the line is
//! dropped and counted in `kthena_router_access_log_dropped_total`: a slow
//! log sink never slows a request.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method, Version};
use parking_lot::Mutex;
use prometheus::IntCounter;

use crate::auth::User;
use crate::config_file::AccessLoggerSection;
use crate::pod::PodState;
use crate::routing::{Route, Server};

/// Lines a worker holds for the writer at most: a few seconds of a busy
/// worker's traffic, so a brief stall of the log sink loses nothing, while
/// the memory held stays bounded (a few MB at worst).
pub const ACCESS_LOG_PENDING_PER_WORKER: usize = 8192;

/// How long the writer lets a batch grow after its first line arrived:
/// requests do not wake it one by one, and a line still reaches the log
/// within milliseconds.
pub const ACCESS_LOG_BATCH_DELAY: Duration = Duration::from_millis(5);

/// The writer writes what it has once this much is formatted, so a burst
/// becomes a few large writes instead of one per line.
const WRITE_BATCH_BYTES: usize = 64 * 1024;

/// Environment variables, as the Kthena router reads them.
pub const ENV_ENABLED: &str = "ACCESS_LOG_ENABLED";
pub const ENV_FORMAT: &str = "ACCESS_LOG_FORMAT";
pub const ENV_OUTPUT: &str = "ACCESS_LOG_OUTPUT";

/// Line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    Json,
    Text,
}

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogOutput {
    Stdout,
    Stderr,
    File(PathBuf),
}

/// Why the access log settings are unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessLogConfigError {
    #[error("access log {source_name}: invalid enabled value {value:?}: use true or false")]
    Enabled { source_name: String, value: String },
    #[error("access log {source_name}: invalid format {value:?}: use json or text")]
    Format { source_name: String, value: String },
    #[error(
        "access log {source_name}: output must not be empty: use stdout, stderr or a file path"
    )]
    EmptyOutput { source_name: String },
}

/// The effective settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogConfig {
    pub enabled: bool,
    pub format: AccessLogFormat,
    pub output: AccessLogOutput,
}

impl Default for AccessLogConfig {
    /// On, JSON, stdout: the Kthena router's defaults, and stdout keeps the
    /// lines apart from application logs (stderr).
    fn default() -> Self {
        Self {
            enabled: true,
            format: AccessLogFormat::Json,
            output: AccessLogOutput::Stdout,
        }
    }
}

impl AccessLogConfig {
    /// Defaults, overridden by the file's `accessLogger:` block, overridden
    /// by the `ACCESS_LOG_*` environment variables (as a Deployment's `env:`
    /// is meant to win over a shared ConfigMap).
    pub fn resolve(
        file: Option<&AccessLoggerSection>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, AccessLogConfigError> {
        let mut config = Self::default();
        if let Some(section) = file {
            let source = "accessLogger";
            if let Some(enabled) = section.enabled {
                config.enabled = enabled;
            }
            if let Some(format) = &section.format {
                config.format = parse_format(&format!("{source}.format"), format)?;
            }
            if let Some(output) = &section.output {
                config.output = parse_output(&format!("{source}.output"), output)?;
            }
        }
        if let Some(enabled) = env(ENV_ENABLED) {
            config.enabled = match enabled.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => {
                    return Err(AccessLogConfigError::Enabled {
                        source_name: ENV_ENABLED.into(),
                        value: enabled,
                    });
                }
            };
        }
        if let Some(format) = env(ENV_FORMAT) {
            config.format = parse_format(ENV_FORMAT, &format)?;
        }
        if let Some(output) = env(ENV_OUTPUT) {
            config.output = parse_output(ENV_OUTPUT, &output)?;
        }
        Ok(config)
    }
}

fn parse_format(source: &str, value: &str) -> Result<AccessLogFormat, AccessLogConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "json" => Ok(AccessLogFormat::Json),
        "text" => Ok(AccessLogFormat::Text),
        _ => Err(AccessLogConfigError::Format {
            source_name: source.into(),
            value: value.into(),
        }),
    }
}

fn parse_output(source: &str, value: &str) -> Result<AccessLogOutput, AccessLogConfigError> {
    match value.trim() {
        "" => Err(AccessLogConfigError::EmptyOutput {
            source_name: source.into(),
        }),
        "stdout" => Ok(AccessLogOutput::Stdout),
        "stderr" => Ok(AccessLogOutput::Stderr),
        path => Ok(AccessLogOutput::File(PathBuf::from(path))),
    }
}

/// One finished request. Built only when the access log is on.
#[derive(Debug)]
pub struct AccessLogEntry {
    pub started_at: SystemTime,
    pub method: Method,
    /// A served path, or a bounded prefix of another.
    pub path: std::borrow::Cow<'static, str>,
    pub version: Version,
    pub status: u16,
    pub model_name: Option<String>,
    pub route: Option<Arc<Route>>,
    pub server: Option<Arc<Server>>,
    /// The target the rule's weights picked, when `server` took over from it
    /// because it had no usable pod.
    pub failed_over_from: Option<Arc<Server>>,
    pub pod: Option<Arc<PodState>>,
    pub request_id: Option<HeaderValue>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total: Duration,
    pub queue: Duration,
    pub request_processing: Duration,
    pub upstream: Duration,
    pub response_processing: Duration,
    /// Streams only: request received to the first response chunk.
    pub ttft: Option<Duration>,
    pub upstream_attempts: u32,
    /// (`type`, `message`) of a failed request.
    pub error: Option<(&'static str, String)>,
    /// The authenticated caller (`user_id`, `tier`).
    pub user: Option<Arc<User>>,
    /// Prefill/decode requests: the prefill pod (`pod` is the decode pod).
    pub prefill_pod: Option<Arc<PodState>>,
    /// Prefill leg: sent to its answer read whole.
    pub prefill_leg: Option<Duration>,
    /// Decode leg: sent to the end of its body.
    pub decode_leg: Option<Duration>,
}

/// One traffic worker's side of the access log, held by its requests.
#[derive(Debug)]
pub struct AccessLog {
    /// None when the access log is off.
    batch: Option<Batch>,
    dropped: IntCounter,
}

/// One worker's entries the writer has not taken yet.
type PendingList = Arc<Mutex<Vec<AccessLogEntry>>>;

#[derive(Debug)]
struct Batch {
    /// Entries the writer has not taken yet.
    pending: PendingList,
    writer: SyncSender<Signal>,
}

/// What the writer is woken for.
#[derive(Debug)]
enum Signal {
    /// A worker's list went from empty to not empty.
    Batch,
    /// Write what is left and stop.
    Close,
}

/// The writer thread and what it reads; makes one [`AccessLog`] per worker.
#[derive(Debug)]
pub struct AccessLogWriter {
    running: Option<Running>,
    dropped: IntCounter,
}

#[derive(Debug)]
struct Running {
    /// Every worker's list, in the order they were made.
    lists: Arc<Mutex<Vec<PendingList>>>,
    signals: SyncSender<Signal>,
    thread: std::thread::JoinHandle<()>,
}

impl AccessLog {
    /// An access log that is off.
    pub fn disabled(dropped: IntCounter) -> Self {
        Self {
            batch: None,
            dropped,
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.batch.is_some()
    }

    /// Queues a line for the writer; never blocks.
    pub fn log(&self, entry: AccessLogEntry) {
        let Some(batch) = &self.batch else {
            return;
        };
        let mut pending = batch.pending.lock();
        if pending.len() >= ACCESS_LOG_PENDING_PER_WORKER {
            drop(pending);
            self.dropped.inc();
            return;
        }
        pending.push(entry);
        if pending.len() == 1 {
            // Full means a wake-up is already queued; disconnected means the
            // writer has stopped and the line is lost with the process.
            let _ = batch.writer.try_send(Signal::Batch);
        }
    }
}

impl AccessLogWriter {
    /// Opens the output and starts the writer thread (or nothing when disabled).
    pub fn start(config: &AccessLogConfig, dropped: IntCounter) -> std::io::Result<Self> {
        if !config.enabled {
            return Ok(Self {
                running: None,
                dropped,
            });
        }
        let output: Box<dyn Write + Send> = match &config.output {
            AccessLogOutput::Stdout => Box::new(std::io::stdout()),
            AccessLogOutput::Stderr => Box::new(std::io::stderr()),
            AccessLogOutput::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        // Room for every worker's wake-up and the close signal: a log's
        // signal is only ever dropped when one of its own is already queued.
        let (signals, receiver) = sync_channel(crate::per_worker::count() + 1);
        let lists = Arc::new(Mutex::new(Vec::new()));
        let format = config.format;
        let writer_lists = lists.clone();
        let thread = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                crate::per_worker::run_below_traffic_workers();
                write_lines(&receiver, &writer_lists, output, format);
            })?;
        Ok(Self {
            running: Some(Running {
                lists,
                signals,
                thread,
            }),
            dropped,
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.running.is_some()
    }

    /// A worker's own side of the log.
    pub fn worker_log(&self) -> AccessLog {
        let Some(running) = &self.running else {
            return AccessLog::disabled(self.dropped.clone());
        };
        let pending = Arc::new(Mutex::new(Vec::new()));
        running.lists.lock().push(pending.clone());
        AccessLog {
            batch: Some(Batch {
                pending,
                writer: running.signals.clone(),
            }),
            dropped: self.dropped.clone(),
        }
    }

    /// Writes every line the workers handed over and stops the writer. Call it
    /// once the workers have stopped (a line logged later is lost).
    pub fn close(self) {
        if let Some(running) = self.running {
            let _ = running.signals.send(Signal::Close);
            let _ = running.thread.join();
        }
    }
}

fn write_lines(
    signals: &Receiver<Signal>,
    lists: &Mutex<Vec<PendingList>>,
    mut output: Box<dyn Write + Send>,
    format: AccessLogFormat,
) {
    let mut buffer = Vec::with_capacity(WRITE_BATCH_BYTES);
    let mut taken = Vec::new();
    let mut failing = false;
    let mut closing = false;
    while !closing {
        closing = !matches!(signals.recv(), Ok(Signal::Batch));
        if !closing {
            // Lines pushed meanwhile join this batch without waking anyone.
            #[allow(clippy::disallowed_methods)] // its own thread, never a runtime's
            std::thread::sleep(ACCESS_LOG_BATCH_DELAY);
        }
        loop {
            match signals.try_recv() {
                Ok(Signal::Batch) => {}
                Ok(Signal::Close) | Err(TryRecvError::Disconnected) => closing = true,
                Err(TryRecvError::Empty) => break,
            }
        }
        let lists: Vec<_> = lists.lock().clone();
        for list in &lists {
            std::mem::swap(&mut *list.lock(), &mut taken);
            for entry in taken.drain(..) {
                format_line(&entry, format, &mut buffer);
                if buffer.len() >= WRITE_BATCH_BYTES {
                    write_out(&mut output, &mut buffer, &mut failing);
                }
            }
        }
        write_out(&mut output, &mut buffer, &mut failing);
    }
}

/// Whole lines in one write, so lines never interleave with other writers
/// of the same stream.
fn write_out(output: &mut Box<dyn Write + Send>, buffer: &mut Vec<u8>, failing: &mut bool) {
    if buffer.is_empty() {
        return;
    }
    let written = output.write_all(buffer).and_then(|()| output.flush());
    buffer.clear();
    match (written, *failing) {
        (Err(error), false) => {
            *failing = true;
            tracing::warn!(%error, "cannot write the access log; lines are lost until it recovers");
        }
        (Ok(()), true) => *failing = false,
        _ => {}
    }
}

/// `,"name":`, the start of a member of a [`JsonObject`], made at compile
/// time.
macro_rules! member {
    ($name:literal) => {
        concat!(",\"", $name, "\":")
    };
}

/// Writes the members of one JSON object: keys are this module's own
/// (plain ASCII), string values are escaped as JSON requires. Written by
/// hand rather than derived: a line per request is the writer thread's
/// whole work, and serde's writer costs several times more per field.
struct JsonObject<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
}

impl<'a> JsonObject<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        Self { out, empty: true }
    }

    /// Starts the member `key` names (a [`member!`] fragment: separator,
    /// quoted name, colon, written in one copy).
    fn key(&mut self, key: &'static str) -> &mut Vec<u8> {
        if self.empty {
            self.empty = false;
            self.out.push(b'{');
            self.out.extend_from_slice(&key.as_bytes()[1..]);
        } else {
            self.out.extend_from_slice(key.as_bytes());
        }
        self.out
    }

    fn string(&mut self, key: &'static str, value: Option<&str>) {
        let out = self.key(key);
        match value {
            Some(value) => json_string(out, value),
            None => out.extend_from_slice(b"null"),
        }
    }

    fn number(&mut self, key: &'static str, value: Option<u64>) {
        let out = self.key(key);
        match value {
            Some(value) => out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
    }

    fn end(self) {
        self.out
            .extend_from_slice(if self.empty { b"{}" } else { b"}" });
    }
}

/// `value` as a JSON string: copied as is when nothing in it needs escaping
/// (the common case: names, ids, paths), else escaped by serde_json.
fn json_string(out: &mut Vec<u8>, value: &str) {
    // A reduction without an early exit, so that it vectorises: the line's
    // strings are short and almost never need escaping.
    let needs_escaping = value.bytes().fold(false, |found, byte| {
        found | (byte < 0x20) | (byte == b'"') | (byte == b'\\')
    });
    if !needs_escaping {
        out.push(b'"');
        out.extend_from_slice(value.as_bytes());
        out.push(b'"');
    } else {
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, value);
    }
}

fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A text-format value: as is when it is one plain token, else quoted and
/// escaped, so a client-chosen value (the body's `model`, a request id)
/// cannot break a line or forge fields.
fn text_value(value: &str) -> std::borrow::Cow<'_, str> {
    let plain = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '=');
    if plain {
        value.into()
    } else {
        format!("{value:?}").into()
    }
}

/// A UTC time as RFC 3339 with milliseconds (`2024-01-15T10:30:45.123Z`),
/// formatted on the stack: a line per request is the writer's whole work, and
/// going through `Display` and a `String` cost several times more.
struct Rfc3339Millis([u8; 24]);

impl Rfc3339Millis {
    fn of(at: SystemTime) -> Self {
        // Before 1970 only with a broken clock: shown as the epoch.
        let since_epoch = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let seconds = since_epoch.as_secs();
        let (year, month, day) = civil_date(seconds / 86_400);
        let of_day = seconds % 86_400;
        let mut text = *b"0000-00-00T00:00:00.000Z";
        let mut put = |at: usize, width: usize, mut value: u64| {
            for slot in text[at..at + width].iter_mut().rev() {
                *slot = b'0' + (value % 10) as u8;
                value /= 10;
            }
        };
        put(0, 4, year);
        put(5, 2, month);
        put(8, 2, day);
        put(11, 2, of_day / 3600);
        put(14, 2, of_day / 60 % 60);
        put(17, 2, of_day % 60);
        put(20, 3, u64::from(since_epoch.subsec_millis()));
        Self(text)
    }

    fn as_str(&self) -> &str {
        // Only ASCII digits and separators are ever written.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// (year, month, day) of the `days`-th day after 1970-01-01, in the
/// proleptic Gregorian calendar (Howard Hinnant's `civil_from_days`).
fn civil_date(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Appends one line (with its newline) to `out`.
pub fn format_line(entry: &AccessLogEntry, format: AccessLogFormat, out: &mut Vec<u8>) {
    let timestamp = Rfc3339Millis::of(entry.started_at);
    let timestamp = timestamp.as_str();
    let request_id = entry.request_id.as_ref().and_then(|id| id.to_str().ok());
    let route = entry.route.as_ref().map(|route| route.key.as_str());
    let server = entry.server.as_ref().map(|server| server.key.as_str());
    let failed_over_from = entry
        .failed_over_from
        .as_ref()
        .map(|server| server.key.as_str());
    let pod = entry.pod.as_ref().map(|pod| pod.name.as_str());
    // As Kthena's access log names them.
    let backend_type = entry.server.as_ref().map(|server| {
        if server.provider.is_some() {
            "external_provider"
        } else {
            "model_server"
        }
    });
    let user_id = entry.user.as_ref().map(|user| user.user_id.as_str());
    let tier = entry.user.as_ref().and_then(|user| user.tier.as_deref());
    let prefill_pod = entry.prefill_pod.as_ref().map(|pod| pod.name.as_str());
    match format {
        AccessLogFormat::Json => {
            // Fields in the documented order.
            let mut line = JsonObject::new(&mut *out);
            line.string(member!("timestamp"), Some(timestamp));
            line.string(member!("method"), Some(entry.method.as_str()));
            line.string(member!("path"), Some(&entry.path));
            line.string(member!("protocol"), Some(protocol(entry.version)));
            line.number(member!("status_code"), Some(u64::from(entry.status)));
            line.string(member!("model_name"), entry.model_name.as_deref());
            line.string(member!("model_route"), route);
            line.string(member!("model_server"), server);
            line.string(member!("selected_pod"), pod);
            line.string(member!("request_id"), request_id);
            line.string(member!("backend_type"), backend_type);
            line.string(member!("user_id"), user_id);
            line.string(member!("tier"), tier);
            line.number(member!("input_tokens"), Some(entry.input_tokens));
            line.number(member!("output_tokens"), Some(entry.output_tokens));
            line.number(member!("duration_total_ms"), Some(millis(entry.total)));
            line.number(member!("duration_queue_ms"), Some(millis(entry.queue)));
            line.number(
                member!("duration_request_processing_ms"),
                Some(millis(entry.request_processing)),
            );
            line.number(
                member!("duration_upstream_ms"),
                Some(millis(entry.upstream)),
            );
            line.number(
                member!("duration_response_processing_ms"),
                Some(millis(entry.response_processing)),
            );
            line.number(member!("ttft_ms"), entry.ttft.map(millis));
            line.number(
                member!("upstream_attempts"),
                Some(u64::from(entry.upstream_attempts)),
            );
            line.string(member!("failed_over_from"), failed_over_from);
            match &entry.error {
                Some((kind, message)) => {
                    let mut error = JsonObject::new(line.key(member!("error")));
                    error.string(member!("type"), Some(kind));
                    error.string(member!("message"), Some(message));
                    error.end();
                }
                None => line.key(member!("error")).extend_from_slice(b"null"),
            }
            // Prefill/decode requests only.
            if prefill_pod.is_some() {
                line.string(member!("prefill_pod"), prefill_pod);
            }
            if let Some(prefill) = entry.prefill_leg {
                line.number(member!("duration_prefill_ms"), Some(millis(prefill)));
            }
            if let Some(decode) = entry.decode_leg {
                line.number(member!("duration_decode_ms"), Some(millis(decode)));
            }
            line.end();
            out.push(b'\n');
        }
        AccessLogFormat::Text => {
            use std::fmt::Write as _;
            let mut line = format!(
                "[{timestamp}] \"{} {} {}\" {}",
                entry.method,
                text_value(&entry.path),
                protocol(entry.version),
                entry.status
            );
            if let Some((kind, message)) = &entry.error {
                let _ = write!(line, " error={kind}:{message:?}");
            }
            let fields = [
                ("model_name", entry.model_name.as_deref()),
                ("model_route", route),
                ("model_server", server),
                ("selected_pod", pod),
                ("prefill_pod", prefill_pod),
                ("request_id", request_id),
                ("backend_type", backend_type),
                ("user_id", user_id),
                ("tier", tier),
            ];
            for (name, value) in fields {
                if let Some(value) = value {
                    let _ = write!(line, " {name}={}", text_value(value));
                }
            }
            if entry.error.is_none() {
                let _ = write!(
                    line,
                    " tokens={}/{}",
                    entry.input_tokens, entry.output_tokens
                );
            }
            let _ = write!(
                line,
                " timings={}ms({}+{}+{})",
                millis(entry.total),
                millis(entry.request_processing),
                millis(entry.upstream),
                millis(entry.response_processing)
            );
            if !entry.queue.is_zero() {
                let _ = write!(line, " queue={}ms", millis(entry.queue));
            }
            if let Some(ttft) = entry.ttft {
                let _ = write!(line, " ttft={}ms", millis(ttft));
            }
            if let Some(prefill) = entry.prefill_leg {
                let _ = write!(line, " prefill={}ms", millis(prefill));
            }
            if let Some(decode) = entry.decode_leg {
                let _ = write!(line, " decode={}ms", millis(decode));
            }
            let _ = write!(line, " upstream_attempts={}", entry.upstream_attempts);
            if let Some(from) = failed_over_from {
                let _ = write!(line, " failed_over_from={}", text_value(from));
            }
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn entry(error: Option<(&'static str, String)>) -> AccessLogEntry {
        AccessLogEntry {
            started_at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_705_314_645_123),
            method: Method::POST,
            path: "/v1/chat/completions".into(),
            version: Version::HTTP_11,
            status: if error.is_some() { 504 } else { 200 },
            model_name: Some("llama2-7b".into()),
            route: None,
            server: None,
            failed_over_from: None,
            pod: None,
            request_id: Some(HeaderValue::from_static("550e8400")),
            input_tokens: 150,
            output_tokens: 75,
            total: Duration::from_millis(2350),
            queue: Duration::ZERO,
            request_processing: Duration::from_millis(45),
            upstream: Duration::from_millis(2300),
            response_processing: Duration::from_millis(5),
            ttft: Some(Duration::from_millis(120)),
            upstream_attempts: 1,
            error,
            user: None,
            prefill_pod: None,
            prefill_leg: None,
            decode_leg: None,
        }
    }

    #[test]
    fn timestamps_match_rfc3339_with_milliseconds() {
        let mut at = 0u64;
        // Leap years, century ends, month ends, every millisecond digit.
        while at < 4_102_444_800_000 {
            let time = SystemTime::UNIX_EPOCH + Duration::from_millis(at);
            assert_eq!(
                Rfc3339Millis::of(time).as_str(),
                humantime::format_rfc3339_millis(time).to_string(),
                "{at} ms"
            );
            at += 86_399_997;
        }
        let leap_day = SystemTime::UNIX_EPOCH + Duration::from_millis(951_782_400_001);
        assert_eq!(
            Rfc3339Millis::of(leap_day).as_str(),
            "2000-02-29T00:00:00.001Z"
        );
    }

    #[test]
    fn json_line_has_every_documented_field() {
        let mut out = Vec::new();
        format_line(&entry(None), AccessLogFormat::Json, &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        let line: serde_json::Value = serde_json::from_slice(&out).expect("one JSON line");
        assert_eq!(line["timestamp"], "2024-01-15T10:30:45.123Z");
        assert_eq!(line["method"], "POST");
        assert_eq!(line["path"], "/v1/chat/completions");
        assert_eq!(line["protocol"], "HTTP/1.1");
        assert_eq!(line["status_code"], 200);
        assert_eq!(line["model_name"], "llama2-7b");
        assert_eq!(line["request_id"], "550e8400");
        assert_eq!(line["duration_total_ms"], 2350);
        assert_eq!(line["duration_upstream_ms"], 2300);
        assert_eq!(line["ttft_ms"], 120);
        assert_eq!(line["upstream_attempts"], 1);
        assert_eq!(line["failed_over_from"], serde_json::Value::Null);
        assert_eq!(line["error"], serde_json::Value::Null);
        assert_eq!(line["user_id"], serde_json::Value::Null);
        assert!(line["backend_type"].is_null() || line["backend_type"] == "model_server");
        let keys: Vec<&str> = line
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), 24, "{keys:?}");
    }

    #[test]
    fn json_values_a_client_chose_are_escaped() {
        let mut forged = entry(Some(("bad_request", "quote \" and \\ and \u{1}".into())));
        forged.model_name = Some("m\n\"x\":1,é\u{7f}".into());
        let mut out = Vec::new();
        format_line(&forged, AccessLogFormat::Json, &mut out);
        assert_eq!(out.iter().filter(|byte| **byte == b'\n').count(), 1);
        let line: serde_json::Value = serde_json::from_slice(&out).expect("one JSON line");
        assert_eq!(line["model_name"], "m\n\"x\":1,é\u{7f}");
        assert_eq!(line.get("x"), None, "no forged field");
        assert_eq!(
            line["error"],
            serde_json::json!({"type": "bad_request", "message": "quote \" and \\ and \u{1}"})
        );
    }

    #[test]
    fn the_caller_is_named_by_user_id_and_tier() {
        let mut authenticated = entry(None);
        authenticated.user = Some(Arc::new(User {
            user_id: "alice".into(),
            tier: Some("gold".into()),
        }));
        let mut out = Vec::new();
        format_line(&authenticated, AccessLogFormat::Json, &mut out);
        let line: serde_json::Value = serde_json::from_slice(&out).expect("one JSON line");
        assert_eq!(
            (&line["user_id"], &line["tier"]),
            (&"alice".into(), &"gold".into())
        );
        let mut out = Vec::new();
        format_line(&authenticated, AccessLogFormat::Text, &mut out);
        let line = String::from_utf8(out).expect("UTF-8");
        assert!(
            line.contains(" request_id=550e8400 user_id=alice tier=gold "),
            "{line}"
        );
    }

    #[test]
    fn text_line_matches_the_documented_shape() {
        let mut out = Vec::new();
        format_line(&entry(None), AccessLogFormat::Text, &mut out);
        let line = String::from_utf8(out).expect("UTF-8");
        assert!(
            line.starts_with("[2024-01-15T10:30:45.123Z] \"POST /v1/chat/completions HTTP/1.1\" 200 model_name=llama2-7b request_id=550e8400 tokens=150/75 timings=2350ms(45+2300+5)"),
            "{line}"
        );
        let mut out = Vec::new();
        format_line(
            &entry(Some(("upstream_timeout", "no headers within 30s".into()))),
            AccessLogFormat::Text,
            &mut out,
        );
        let line = String::from_utf8(out).expect("UTF-8");
        assert!(
            line.contains(
                "\" 504 error=upstream_timeout:\"no headers within 30s\" model_name=llama2-7b"
            ),
            "{line}"
        );
        let mut forged = entry(None);
        forged.model_name = Some("m\n[forged] x=y".into());
        let mut out = Vec::new();
        format_line(&forged, AccessLogFormat::Text, &mut out);
        let line = String::from_utf8(out).expect("UTF-8");
        assert_eq!(line.lines().count(), 1, "{line}");
        assert!(line.contains(r#" model_name="m\n[forged] x=y" "#), "{line}");
    }

    #[test]
    fn prefill_decode_lines_name_both_pods_and_time_both_legs() {
        let pod = |name: &str| {
            Some(PodState::for_tests(
                name,
                std::net::SocketAddr::from(([127, 0, 0, 1], 8000)),
            ))
        };
        let mut pd = entry(None);
        pd.pod = pod("decode-0");
        pd.prefill_pod = pod("prefill-0");
        pd.prefill_leg = Some(Duration::from_millis(80));
        pd.decode_leg = Some(Duration::from_millis(2200));
        let mut out = Vec::new();
        format_line(&pd, AccessLogFormat::Json, &mut out);
        let line: serde_json::Value = serde_json::from_slice(&out).expect("one JSON line");
        assert_eq!(line["selected_pod"], "decode-0");
        assert_eq!(line["prefill_pod"], "prefill-0");
        assert_eq!(line["duration_prefill_ms"], 80);
        assert_eq!(line["duration_decode_ms"], 2200);
        let mut out = Vec::new();
        format_line(&pd, AccessLogFormat::Text, &mut out);
        let line = String::from_utf8(out).expect("UTF-8");
        assert!(
            line.contains(" selected_pod=decode-0 prefill_pod=prefill-0 ")
                && line.contains(" prefill=80ms decode=2200ms "),
            "{line}"
        );
        let mut out = Vec::new();
        format_line(&entry(None), AccessLogFormat::Json, &mut out);
        let line: serde_json::Value = serde_json::from_slice(&out).expect("one JSON line");
        assert!(
            line.get("prefill_pod").is_none(),
            "other requests keep their fields"
        );
    }

    #[test]
    fn settings_resolve_defaults_then_file_then_env() {
        let none = |_: &str| None;
        assert_eq!(
            AccessLogConfig::resolve(None, none).expect("defaults"),
            AccessLogConfig::default()
        );
        let file = AccessLoggerSection {
            enabled: Some(true),
            format: Some("text".into()),
            output: Some("/var/log/router.log".into()),
        };
        let from_file = AccessLogConfig::resolve(Some(&file), none).expect("file");
        assert_eq!(from_file.format, AccessLogFormat::Text);
        assert_eq!(
            from_file.output,
            AccessLogOutput::File("/var/log/router.log".into())
        );
        let env: HashMap<&str, &str> = HashMap::from([
            (ENV_ENABLED, "false"),
            (ENV_FORMAT, "json"),
            (ENV_OUTPUT, "stderr"),
        ]);
        let from_env =
            AccessLogConfig::resolve(Some(&file), |name| env.get(name).map(|v| (*v).to_owned()))
                .expect("env");
        assert_eq!(
            from_env,
            AccessLogConfig {
                enabled: false,
                format: AccessLogFormat::Json,
                output: AccessLogOutput::Stderr,
            }
        );
        let bad =
            AccessLogConfig::resolve(None, |name| (name == ENV_FORMAT).then(|| "xml".to_owned()))
                .expect_err("bad format");
        assert_eq!(
            bad.to_string(),
            "access log ACCESS_LOG_FORMAT: invalid format \"xml\": use json or text"
        );
    }

    #[test]
    fn a_full_worker_list_drops_and_counts_instead_of_blocking() {
        let dropped = IntCounter::new("dropped", "test").expect("counter");
        let (writer, _signals) = sync_channel(1);
        let log = AccessLog {
            batch: Some(Batch {
                pending: Arc::new(Mutex::new(Vec::new())),
                writer,
            }),
            dropped: dropped.clone(),
        };
        for _ in 0..ACCESS_LOG_PENDING_PER_WORKER + 2 {
            log.log(entry(None));
        }
        assert_eq!(dropped.get(), 2);
    }

    #[test]
    fn every_workers_lines_are_written_in_batches_and_on_close() {
        let path = std::env::temp_dir().join(format!(
            "switchyard-access-log-{}-{:?}.log",
            std::process::id(),
            std::thread::current().id()
        ));
        let config = AccessLogConfig {
            enabled: true,
            format: AccessLogFormat::Json,
            output: AccessLogOutput::File(path.clone()),
        };
        let dropped = IntCounter::new("dropped", "test").expect("counter");
        let writer = AccessLogWriter::start(&config, dropped.clone()).expect("started");
        let workers = [writer.worker_log(), writer.worker_log()];
        for round in 0..3 {
            for log in &workers {
                log.log(entry(None));
            }
            if round == 0 {
                // The first batch is written while the workers keep going.
                let deadline = switchyard_runtime::clock::now() + Duration::from_secs(10);
                while std::fs::read_to_string(&path).map_or(0, |text| text.lines().count()) < 2 {
                    assert!(
                        switchyard_runtime::clock::now() < deadline,
                        "first batch written"
                    );
                    std::thread::yield_now();
                }
            }
        }
        writer.close();
        let text = std::fs::read_to_string(&path).expect("log file");
        let _ = std::fs::remove_file(&path);
        assert_eq!(text.lines().count(), 6, "{text}");
        assert!(text.lines().all(|line| line.starts_with("{\"timestamp\"")));
        assert_eq!(dropped.get(), 0);
    }
}
