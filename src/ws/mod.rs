//! The WebSocket transport, below the room logic: the RFC 6455 handshake on an HTTP/1.1
//! upgrade (`upgrade`), the frame codec (`codec`), and the connection that both its session
//! and the room fan-out write to (`conn`). The socket is taken over from hyper after the
//! handshake, so a room frame is encoded once and the same bytes are written to every
//! viewer's socket directly.

pub mod codec;
pub mod conn;
pub mod upgrade;
