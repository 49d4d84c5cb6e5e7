//! The load scenarios, one module each: `claims` (the claim path over HTTP or WebSocket,
//! ending with the invariant check) and `viewers` (chat fan-out to many WebSocket viewers).

pub mod claims;
pub mod viewers;
