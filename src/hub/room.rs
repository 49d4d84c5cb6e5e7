//! One room's fan-out on this instance: a bounded broadcast ring of shared frames, the
//! conflation buffer for state frames, and the local viewer count. A ticker task flushes
//! conflated state (latest value wins) and presence at a fixed rate, so a burst of 50 000
//! stock changes costs viewers ~10 frames a second.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::broadcast;

use crate::bus::{Event, EventKind};
use crate::protocol::ServerMessage;

/// The fan-out point of one room.
pub struct RoomChannel {
    pub id: String,
    tx: broadcast::Sender<Event>,
    viewers: AtomicU64,
    /// Latest state frame per key, waiting for the next tick; bounded by the number of
    /// distinct keys (likes, presence, one per drop).
    pending: Mutex<HashMap<String, Event>>,
    closed: AtomicBool,
}

impl RoomChannel {
    pub fn new(id: &str, capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity);
        Self {
            id: id.to_string(),
            tx,
            viewers: AtomicU64::new(0),
            pending: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    pub fn viewers(&self) -> u64 {
        self.viewers.load(Ordering::Acquire)
    }

    pub(super) fn add_viewer(&self) {
        self.viewers.fetch_add(1, Ordering::AcqRel);
    }

    /// Returns the count left.
    pub(super) fn remove_viewer(&self) -> u64 {
        self.viewers
            .fetch_sub(1, Ordering::AcqRel)
            .saturating_sub(1)
    }

    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Sends discrete events now; parks state events for the next tick.
    pub fn deliver(&self, event: Event) {
        match &event.kind {
            EventKind::Discrete { .. } | EventKind::Kick { .. } => {
                let _ = self.tx.send(event);
            }
            EventKind::State { key } => {
                if let Ok(mut pending) = self.pending.lock() {
                    pending.insert(key.clone(), event);
                }
            }
        }
    }

    /// Flushes conflated state every `tick`, and presence every fifth tick when it changed,
    /// until the room has no viewers left on this instance.
    pub(super) async fn run_ticker(self: std::sync::Arc<Self>, tick: Duration) {
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last_viewers = u64::MAX;
        let mut n: u64 = 0;
        loop {
            interval.tick().await;
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            let due: Vec<Event> = match self.pending.lock() {
                Ok(mut pending) => pending.drain().map(|(_, e)| e).collect(),
                Err(_) => Vec::new(),
            };
            for event in due {
                let _ = self.tx.send(event);
            }
            n += 1;
            if n.is_multiple_of(5) {
                let viewers = self.viewers();
                if viewers != last_viewers {
                    last_viewers = viewers;
                    let text = ServerMessage::Presence { viewers }.to_text();
                    let _ = self.tx.send(Event {
                        kind: EventKind::State {
                            key: "presence".into(),
                        },
                        text: text.into(),
                    });
                }
            }
        }
    }
}
