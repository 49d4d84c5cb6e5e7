//! Shared test harness (each test binary includes it with `mod common;`): a real
//! redis-server per test, and the livedrop server in-process on port 0.
#![allow(dead_code)]

pub mod probe;
pub mod raw_ws;
pub mod redis_server;
pub mod server;
