//! Helpers shared by the integration tests (each test binary includes this with `mod common;`).
#![allow(dead_code)]

pub mod redis_server;
