//! The load scenarios, one module each: `claims` (the claim path over HTTP or WebSocket,
//! ending with the invariant check), `viewers` (chat fan-out to many WebSocket viewers, or
//! to a plain reference peer), `sale` (the whole live sale: viewers, a drop, a rush of
//! claims over both transports, chat during it) and `groups` (group buys filling at once).

pub mod claims;
pub mod sale;
pub mod viewers;
