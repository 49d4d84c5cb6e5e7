//! The hub: the rooms that have viewers on this instance and their fan-out. It is the bus's
//! event sink, so an event reaches a room's viewers whichever instance produced it. A room
//! channel exists only while it has local viewers; events for other rooms are dropped here
//! (chat stays recoverable from the store).

pub mod room;
pub mod session;

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;

use crate::bus::{Event, EventSink};
pub use room::{FanoutSettings, RoomChannel};

/// Rooms with local viewers.
pub struct Hub {
    rooms: DashMap<String, Arc<RoomChannel>>,
    fanout: FanoutSettings,
    tick: Duration,
}

/// Keeps a viewer counted in its room; leaving (drop) removes an empty room.
pub struct ViewerGuard {
    hub: Arc<Hub>,
    room: Arc<RoomChannel>,
}

impl Drop for ViewerGuard {
    fn drop(&mut self) {
        if self.room.remove_viewer() == 0 {
            let removed = self
                .hub
                .rooms
                .remove_if(&self.room.id, |_, r| r.viewers() == 0);
            if let Some((_, room)) = removed {
                room.close();
            }
        }
    }
}

impl Hub {
    pub fn new(fanout: FanoutSettings, tick: Duration) -> Self {
        Self {
            rooms: DashMap::new(),
            fanout,
            tick,
        }
    }

    /// Counts a viewer in, creating the room channel (and its ticker) on first join.
    pub fn join(self: &Arc<Self>, room: &str) -> (Arc<RoomChannel>, ViewerGuard) {
        let channel = {
            let entry = self.rooms.entry(room.to_string()).or_insert_with(|| {
                let ch = Arc::new(RoomChannel::new(room, &self.fanout));
                tokio::spawn(ch.clone().run_ticker(self.tick));
                ch
            });
            // Counted while the shard lock is held, so a concurrent last-viewer leave
            // cannot remove the channel between lookup and count.
            entry.add_viewer();
            entry.clone()
        };
        let guard = ViewerGuard {
            hub: self.clone(),
            room: channel.clone(),
        };
        (channel, guard)
    }

    /// Viewers of a room on this instance.
    pub fn viewers(&self, room: &str) -> u64 {
        self.rooms.get(room).map(|r| r.viewers()).unwrap_or(0)
    }

    /// Rooms with viewers here, for metrics and shutdown.
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }
}

impl EventSink for Hub {
    fn deliver(&self, room: &str, event: Event) {
        let channel = self.rooms.get(room).map(|r| r.clone());
        if let Some(ch) = channel {
            ch.deliver(event);
        }
    }
}
