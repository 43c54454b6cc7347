//! One traffic worker's idle engine connections, by pod address, most
//! recently used first (so a few connections stay warm and the rest expire).
//!
//! Taken from and given back to on the worker's thread only; its lock is
//! never contended. A reaper task, running while the pool holds anything,
//! closes connections that idled past [`UPSTREAM_POOL_IDLE_TIMEOUT`] or that
//! the engine closed.

use crate::fast_map::FastMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use switchyard_runtime::clock::{self, Instant};

use super::super::upstream::UPSTREAM_POOL_IDLE_TIMEOUT;
use super::{Connection, is_idle_and_open, looks_readable};

/// Idle connections kept per pod: enough for the concurrency one worker
/// sends a pod; beyond it a finished connection is closed.
pub const MAX_IDLE_PER_POD: usize = 256;
/// How often the reaper looks for expired and closed connections.
const REAP_INTERVAL: Duration = Duration::from_secs(10);
/// A read buffer that grew past this is not kept for the next request.
const MAX_KEPT_READ_BUFFER: usize = 64 * 1024;

#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<Idle>,
}

#[derive(Debug, Default)]
struct Idle {
    by_pod: FastMap<SocketAddr, Vec<IdleConnection>>,
    reaper_running: bool,
}

#[derive(Debug)]
struct IdleConnection {
    connection: Connection,
    since: Instant,
}

impl Pool {
    /// An open idle connection to `addr`, if there is one.
    pub(super) async fn checkout(&self, addr: SocketAddr) -> Option<Connection> {
        loop {
            let candidate = {
                let mut idle = self.idle.lock();
                let connections = idle.by_pod.get_mut(&addr)?;
                let candidate = connections.pop();
                if connections.is_empty() {
                    idle.by_pod.remove(&addr);
                }
                candidate?
            };
            if candidate.since.elapsed() >= UPSTREAM_POOL_IDLE_TIMEOUT {
                continue;
            }
            // Readable while idle means closed (or junk): confirm with a read.
            let stream = &candidate.connection.stream;
            if looks_readable(stream).await && !is_idle_and_open(stream) {
                continue;
            }
            return Some(candidate.connection);
        }
    }

    /// Keeps `connection` for the next request to `addr`.
    pub(super) fn checkin(self: &Arc<Self>, addr: SocketAddr, mut connection: Connection) {
        if connection.read.capacity() > MAX_KEPT_READ_BUFFER {
            connection.read = bytes::BytesMut::new();
        }
        let mut idle = self.idle.lock();
        let connections = idle.by_pod.entry(addr).or_default();
        if connections.len() >= MAX_IDLE_PER_POD {
            return;
        }
        connections.push(IdleConnection {
            connection,
            since: clock::now(),
        });
        if !idle.reaper_running
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            idle.reaper_running = true;
            runtime.spawn(reap(Arc::downgrade(self)));
        }
    }

    /// Closes expired and closed connections; returns how many are left.
    fn reap(&self) -> usize {
        let mut idle = self.idle.lock();
        idle.by_pod.retain(|_, connections| {
            connections.retain(|idle| {
                idle.since.elapsed() < UPSTREAM_POOL_IDLE_TIMEOUT
                    && is_idle_and_open(&idle.connection.stream)
            });
            !connections.is_empty()
        });
        let left = idle.by_pod.values().map(Vec::len).sum();
        if left == 0 {
            idle.reaper_running = false;
        }
        left
    }

    /// Idle connections held (all pods).
    #[cfg(test)]
    pub(super) fn idle_count(&self) -> usize {
        self.idle.lock().by_pod.values().map(Vec::len).sum()
    }
}

/// Runs while the pool holds connections (and exists).
async fn reap(pool: Weak<Pool>) {
    loop {
        clock::sleep(REAP_INTERVAL).await;
        match pool.upgrade() {
            Some(pool) if pool.reap() > 0 => {}
            _ => return,
        }
    }
}
