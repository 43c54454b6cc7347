//! The map type of lookups every request makes (route by model name, metric
//! and decision handles by route, server and pod, idle upstream connections
//! by pod address).
//!
//! Their keys come from the snapshot; a request's own bytes (its model name)
//! only look up. Flooding such a map with colliding keys is not open to a
//! client, so SipHash's resistance to it buys nothing there, while it costs
//! about 190 instructions per short key under callgrind; foldhash (randomly
//! seeded per process) costs a fraction of that.

/// A `HashMap` with foldhash's fast hasher.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
