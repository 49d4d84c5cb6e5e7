//! The event bus: how a room event produced anywhere reaches the hubs that have viewers in
//! that room. Producers (chat, commerce, likes) publish serialized events; the bus hands them
//! to every subscribed hub. `LocalBus` delivers within this process; a cross-instance bus
//! (Redis pub/sub) implements the same trait, so no producer depends on there being one
//! instance.

use std::sync::{Arc, OnceLock};

/// How the hub treats an event on delivery.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// Delivered in order, every one (chat, drop live, sold out). `seq` is the chat seq
    /// for chat messages (used to skip what a welcome snapshot already holds), else 0.
    Discrete { seq: u64 },
    /// Latest value wins: the hub sends at most one frame per key per conflation tick
    /// (`likes`, `presence`, `stock:DROP`).
    State { key: String },
    /// Closes the sockets of one user in the room (a ban, close 4003) after sending them
    /// `text`; other viewers skip it.
    Kick { user: String },
}

/// One room event, already serialized: every viewer gets these same bytes.
#[derive(Clone, Debug)]
pub struct Event {
    pub kind: EventKind,
    pub text: Arc<str>,
}

/// Receives events for rooms (the hub).
pub trait EventSink: Send + Sync + 'static {
    fn deliver(&self, room: &str, event: Event);
}

/// Carries room events to every hub with viewers in the room.
pub trait Bus: Send + Sync + 'static {
    fn publish(&self, room: &str, event: Event);
}

/// The single-instance bus: delivers straight to this process's hub.
#[derive(Default)]
pub struct LocalBus {
    sink: OnceLock<Arc<dyn EventSink>>,
}

impl LocalBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Connects the hub; events published before that are dropped (no viewers yet).
    pub fn attach(&self, sink: Arc<dyn EventSink>) {
        let _ = self.sink.set(sink);
    }
}

impl Bus for LocalBus {
    fn publish(&self, room: &str, event: Event) {
        if let Some(sink) = self.sink.get() {
            sink.deliver(room, event);
        }
    }
}
