//! Shared test harness: a real redis-server per test, and the server in-process on port 0.
#![allow(dead_code)]

pub mod redis_server;
pub mod server;
