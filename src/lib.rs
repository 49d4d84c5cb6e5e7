//! livedrop: the real-time layer of a live-shopping room.

pub mod auth;
pub mod config;
pub mod error;
pub mod model;
pub mod protocol;
pub mod store;
