//! The Redis side of global budgets: one Lua script, loaded once per server
//! and called by its SHA (reloaded when Redis answers NOSCRIPT), that does a
//! whole lease exchange atomically on Redis's own clock.

use std::sync::Arc;

use futures::future::BoxFuture;
use prometheus::IntCounter;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Script};

use super::lease::{EXCHANGE_TIMEOUT, LeaseBackend, LeaseReply, LeaseRequest};

/// Prefix of every key Switchyard writes: its buckets are its own (Kthena's
/// `kthena:ratelimit:` keys hold a different state).
pub const KEY_PREFIX: &str = "switchyard:ratelimit:";

/// The lease exchange. KEYS[1] is a hash {tokens, at}; ARGV: capacity, rate
/// (tokens per second), want, min_grant, delta. Refills by Redis `TIME`,
/// adds delta (capped at capacity), grants up to `want` when at least
/// `min_grant` is there, and lets the key expire when the bucket would be
/// full again (a missing key is a full bucket). Numbers go back as strings:
/// Lua numbers returned to Redis are truncated to integers.
const EXCHANGE_SCRIPT: &str = r"
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local min_grant = tonumber(ARGV[4])
local delta = tonumber(ARGV[5])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = capacity
  at = now
end
if now > at then
  tokens = math.min(capacity, tokens + (now - at) * rate)
end
tokens = math.min(capacity, tokens + delta)
local granted = 0
if want > 0 and tokens >= min_grant then
  granted = math.min(want, tokens)
  tokens = tokens - granted
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'at', string.format('%.17g', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) / rate * 1000) + 1000)
return {string.format('%.17g', granted), string.format('%.17g', tokens)}
";

/// One Redis server (`host:port`), shared by every budget that names it.
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    address: String,
    client: Result<redis::Client, String>,
    connection: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    script: Script,
    exchanges_ok: IntCounter,
    exchanges_failed: IntCounter,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("address", &self.inner.address)
            .finish()
    }
}

impl RedisBackend {
    /// A backend for `address`; nothing is connected until the first exchange.
    pub fn new(address: &str, exchanges_ok: IntCounter, exchanges_failed: IntCounter) -> Self {
        let client = redis::Client::open(format!("redis://{address}/"))
            .map_err(|error| format!("invalid Redis address {address:?}: {error}"));
        Self {
            inner: Arc::new(Inner {
                address: address.to_owned(),
                client,
                connection: tokio::sync::Mutex::new(None),
                script: Script::new(EXCHANGE_SCRIPT),
                exchanges_ok,
                exchanges_failed,
            }),
        }
    }
}

impl Inner {
    async fn connection(&self) -> Result<MultiplexedConnection, String> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let client = self.client.as_ref().map_err(Clone::clone)?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(EXCHANGE_TIMEOUT))
            .set_response_timeout(Some(EXCHANGE_TIMEOUT));
        let connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|error| format!("cannot connect to Redis at {}: {error}", self.address))?;
        // Loaded once per connection; later exchanges send only its SHA.
        let mut loading = connection.clone();
        self.script
            .load_async(&mut loading)
            .await
            .map_err(|error| {
                format!(
                    "cannot load the script into Redis at {}: {error}",
                    self.address
                )
            })?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    async fn exchange(&self, request: LeaseRequest) -> Result<LeaseReply, String> {
        let mut connection = self.connection().await?;
        let key = format!("{KEY_PREFIX}{}", request.key);
        let reply: Result<(String, String), _> = self
            .script
            .key(key)
            .arg(request.capacity)
            .arg(request.rate)
            .arg(request.want)
            .arg(request.min_grant)
            .arg(request.delta)
            .invoke_async(&mut connection)
            .await;
        match reply {
            Ok((granted, level)) => {
                let parse = |text: &str| {
                    text.parse::<f64>()
                        .map_err(|_| format!("Redis answered {text:?}, not a number"))
                };
                Ok(LeaseReply {
                    granted: parse(&granted)?,
                    level: parse(&level)?,
                })
            }
            Err(error) => {
                // A broken connection is replaced on the next exchange.
                if error.is_io_error() || error.is_timeout() || error.is_connection_dropped() {
                    *self.connection.lock().await = None;
                }
                Err(format!("Redis at {}: {error}", self.address))
            }
        }
    }
}

impl LeaseBackend for RedisBackend {
    fn exchange(&self, request: LeaseRequest) -> BoxFuture<'static, Result<LeaseReply, String>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let outcome = inner.exchange(request).await;
            match &outcome {
                Ok(_) => inner.exchanges_ok.inc(),
                Err(_) => inner.exchanges_failed.inc(),
            }
            outcome
        })
    }

    fn name(&self) -> &str {
        &self.inner.address
    }
}
