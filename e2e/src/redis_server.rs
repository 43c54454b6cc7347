//! A real Redis (Debian's `redis-server`, found on `PATH`) on a free loopback
//! port, for the tests of global token budgets. Nothing is persisted; the
//! server is killed when the handle drops.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use switchyard_runtime::clock;

use crate::harness::free_port;

/// Starts tried when the port picked was taken before Redis bound it.
const START_ATTEMPTS: u32 = 3;
/// How long a start may take before the attempt is abandoned.
const START_DEADLINE: Duration = Duration::from_secs(15);

/// A running `redis-server`.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts a server on `127.0.0.1` and waits until it answers PING.
    ///
    /// Panics with how to install it when `redis-server` is not on `PATH`
    /// (`make test` installs it).
    pub async fn start() -> Self {
        let mut dir = tempfile::tempdir().expect("tempdir");
        for attempt in 1..=START_ATTEMPTS {
            let port = free_port(Ipv4Addr::LOCALHOST);
            let mut server = Self {
                child: None,
                port,
                dir,
            };
            server.spawn();
            if server.wait_ready().await {
                return server;
            }
            let log = server.log();
            assert!(
                attempt < START_ATTEMPTS,
                "redis-server did not start on port {port}:\n{log}"
            );
            server.kill();
            dir = std::mem::replace(&mut server.dir, tempfile::tempdir().expect("tempdir"));
        }
        unreachable!("the last attempt either returns or panics")
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("redis.log")).expect("log file");
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &self.dir.path().display().to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log file")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot run redis-server ({error}): install it (`apt-get install -y redis-server`; `make test` does)"
                )
            });
        self.child = Some(child);
    }

    async fn wait_ready(&mut self) -> bool {
        let deadline = clock::now() + START_DEADLINE;
        while clock::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && !matches!(child.try_wait(), Ok(None))
            {
                return false;
            }
            if self.command("PING").as_deref() == Some("+PONG") {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// `host:port`, as a route's `global.redis.address` names it.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sends one inline command and returns the first line of the reply
    /// (`+PONG`, `:3`, `$5`...), or None when the server does not answer.
    pub fn command(&self, command: &str) -> Option<String> {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream.write_all(format!("{command}\r\n").as_bytes()).ok()?;
        let mut reply = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            let read = stream.read(&mut buffer).ok()?;
            if read == 0 {
                break;
            }
            reply.extend_from_slice(&buffer[..read]);
            if reply.ends_with(b"\r\n") {
                break;
            }
        }
        let text = String::from_utf8_lossy(&reply);
        text.lines().next().map(str::to_owned)
    }

    /// The whole reply of `INFO commandstats` etc.
    pub fn info(&self, section: &str) -> String {
        let mut stream = match TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)) {
            Ok(stream) => stream,
            Err(_) => return String::new(),
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = stream.write_all(format!("INFO {section}\r\n").as_bytes());
        let mut reply = Vec::new();
        let mut buffer = [0u8; 4096];
        // `$<len>\r\n<payload>\r\n`: read until the announced payload is in.
        while let Ok(read) = stream.read(&mut buffer) {
            if read == 0 {
                break;
            }
            reply.extend_from_slice(&buffer[..read]);
            let text = String::from_utf8_lossy(&reply);
            if let Some((head, rest)) = text.split_once("\r\n")
                && let Ok(len) = head.trim_start_matches('$').parse::<usize>()
                && rest.len() >= len
            {
                return rest[..len].to_owned();
            }
        }
        String::from_utf8_lossy(&reply).into_owned()
    }

    /// Calls of one command so far (`INFO commandstats`), e.g. `evalsha`.
    pub fn command_calls(&self, command: &str) -> u64 {
        let prefix = format!("cmdstat_{command}:calls=");
        self.info("commandstats")
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|calls| calls.parse().ok())
            .unwrap_or(0)
    }

    /// Kills the server (a crash, as far as clients can tell).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        assert!(
            self.wait_ready().await,
            "redis-server did not restart:\n{}",
            self.log()
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
