//! Open upstream connections per pod: what `kthena_lb_connection_pool_size`
//! reports. Every connection the engine client opens holds an
//! [`OpenConnection`] until it is closed (idle in a worker's pool or
//! carrying a request); nothing is done per request, only per connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;

/// Open connections by pod address.
#[derive(Debug, Default)]
pub struct ConnectionCounts {
    open: Mutex<HashMap<SocketAddr, u64>>,
}

impl ConnectionCounts {
    /// Connections open to `addr` now.
    pub fn open_to(&self, addr: SocketAddr) -> u64 {
        self.open.lock().get(&addr).copied().unwrap_or(0)
    }

    /// Counts a connection just opened to `addr` until the returned value is dropped.
    pub fn opened(self: &Arc<Self>, addr: SocketAddr) -> OpenConnection {
        *self.open.lock().entry(addr).or_default() += 1;
        OpenConnection {
            counts: self.clone(),
            addr,
        }
    }
}

/// Counts one connection while alive.
#[derive(Debug)]
pub struct OpenConnection {
    counts: Arc<ConnectionCounts>,
    addr: SocketAddr,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock();
        if let Some(count) = open.get_mut(&self.addr) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_counted_while_open() {
        let counts = Arc::new(ConnectionCounts::default());
        let addr: SocketAddr = "127.0.0.1:8000".parse().expect("addr");
        let first = counts.opened(addr);
        let second = counts.opened(addr);
        assert_eq!(counts.open_to(addr), 2);
        drop(first);
        assert_eq!(counts.open_to(addr), 1);
        drop(second);
        assert_eq!(counts.open_to(addr), 0);
        assert!(
            counts.open.lock().is_empty(),
            "no entry left for a closed pod"
        );
    }
}
