//! The hasher for in-process maps on hot paths (claims, idempotency records, token cache,
//! per-drop bookkeeping). std's SipHash costs ~3 % of a claim's CPU on its own; foldhash is
//! several times faster and, seeded randomly per map, keeps client-chosen keys (idempotency
//! keys, user ids) from being aimed at one bucket.

/// A `HashMap` with the fast hasher.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// A `HashSet` with the fast hasher.
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
/// A `DashMap` with the fast hasher (`FastDashMap::default()` to make one).
pub type FastDashMap<K, V> = dashmap::DashMap<K, V, foldhash::fast::RandomState>;
/// A `DashSet` with the fast hasher.
pub type FastDashSet<K> = dashmap::DashSet<K, foldhash::fast::RandomState>;
