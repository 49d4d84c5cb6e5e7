//! One room's fan-out on this instance. An event is encoded once into WebSocket frame
//! bytes; the room's viewers are split over a few shards (one per worker thread), and each
//! shard's task writes those same bytes to every socket it holds with a non-blocking write —
//! no task wake-up, copy or timer per viewer. When a shard is behind it takes every frame
//! waiting and writes them to each socket with one syscall. State frames (likes, presence,
//! stock) are conflated per key and flushed by the room's ticker: latest value wins, so a
//! burst of 50 000 stock changes costs viewers ~10 frames a second. Each shard also pings
//! silent sockets and closes the ones that stay silent.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::bus::{Event, EventKind};
use crate::protocol::ServerMessage;
use crate::ws::codec;
use crate::ws::conn::{Conn, Delivered, clock_ms};

use super::session::close::{BANNED, GOING_AWAY, IDLE};

/// How every shard of every room behaves.
#[derive(Clone)]
pub struct FanoutSettings {
    /// Frames a shard may have waiting before its viewers are all resynced instead.
    pub capacity: usize,
    /// Shards per room (viewers are spread over them round robin).
    pub shards: usize,
    /// Silence after which a socket is pinged, and closed after as much again.
    pub idle: Duration,
    pub shutdown: CancellationToken,
}

/// Who gets a frame.
enum Audience {
    Everyone,
    /// A chat message: skipped by a viewer whose snapshot already holds it.
    Chat(u64),
    /// One user's sockets, which then close with 4003 (a ban).
    Kicked(Box<str>),
}

/// One event as every viewer's socket gets it.
struct RoomFrame {
    bytes: Bytes,
    audience: Audience,
}

impl RoomFrame {
    fn from_event(event: &Event) -> Self {
        let audience = match &event.kind {
            EventKind::Discrete { seq } if *seq > 0 => Audience::Chat(*seq),
            EventKind::Discrete { .. } | EventKind::State { .. } => Audience::Everyone,
            EventKind::Kick { user } => Audience::Kicked(user.as_str().into()),
        };
        Self {
            bytes: codec::text(&event.text),
            audience,
        }
    }
}

enum Item {
    Frame(Arc<RoomFrame>),
    Join(Arc<Conn>),
}

#[derive(Default)]
struct Inbox {
    items: VecDeque<Item>,
    frames: usize,
    /// Frames were dropped because the shard fell `capacity` behind: resync everyone.
    overflowed: bool,
}

/// A share of a room's viewers and the task that writes to them.
struct Shard {
    inbox: Mutex<Inbox>,
    wake: Notify,
    capacity: usize,
    closed: AtomicBool,
}

impl Shard {
    fn push(&self, item: Item) {
        if let Ok(mut inbox) = self.inbox.lock() {
            match item {
                Item::Frame(f) => {
                    if inbox.frames >= self.capacity {
                        inbox.items.retain(|i| matches!(i, Item::Join(_)));
                        inbox.frames = 0;
                        inbox.overflowed = true;
                    } else {
                        inbox.frames += 1;
                        inbox.items.push_back(Item::Frame(f));
                    }
                }
                join => inbox.items.push_back(join),
            }
        }
        self.wake.notify_one();
    }

    fn take(&self) -> (VecDeque<Item>, bool) {
        match self.inbox.lock() {
            Ok(mut inbox) => {
                inbox.frames = 0;
                let overflowed = std::mem::take(&mut inbox.overflowed);
                (std::mem::take(&mut inbox.items), overflowed)
            }
            Err(_) => (VecDeque::new(), false),
        }
    }

    async fn run(self: Arc<Self>, settings: FanoutSettings) {
        let mut conns: Vec<Arc<Conn>> = Vec::new();
        let check_every =
            (settings.idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
        let mut idle_check = tokio::time::interval(check_every);
        idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let ping = codec::ping(b"livedrop");
        let mut shutting_down = false;
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = idle_check.tick() => {
                    let now = clock_ms();
                    conns.retain(|c| !c.is_closed());
                    for c in &conns {
                        c.check_idle(now, settings.idle, &ping, IDLE);
                    }
                }
                _ = settings.shutdown.cancelled(), if !shutting_down => {
                    shutting_down = true;
                    for c in &conns {
                        c.close(GOING_AWAY, "server shutting down");
                    }
                }
            }
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            let (items, overflowed) = self.take();
            let mut batch: Vec<Arc<RoomFrame>> = Vec::new();
            for item in items {
                match item {
                    Item::Frame(f) => batch.push(f),
                    Item::Join(conn) => {
                        // Frames published before the join are not the newcomer's.
                        fan_out(&mut conns, &batch).await;
                        batch.clear();
                        if shutting_down {
                            conn.close(GOING_AWAY, "server shutting down");
                        }
                        conns.push(conn);
                    }
                }
            }
            fan_out(&mut conns, &batch).await;
            if overflowed {
                for c in &conns {
                    c.lag();
                }
            }
        }
    }
}

/// Writes a batch of frames to every connection, each connection's share in one write.
/// Yields to the scheduler regularly so that a big room does not hold a worker thread.
async fn fan_out(conns: &mut Vec<Arc<Conn>>, batch: &[Arc<RoomFrame>]) {
    if batch.is_empty() {
        return;
    }
    let targeted = batch
        .iter()
        .any(|f| matches!(f.audience, Audience::Kicked(_)));
    let common: Vec<(&Bytes, u64)> = batch
        .iter()
        .filter_map(|f| match f.audience {
            Audience::Everyone => Some((&f.bytes, 0)),
            Audience::Chat(seq) => Some((&f.bytes, seq)),
            Audience::Kicked(_) => None,
        })
        .collect();
    let mut i = 0;
    while i < conns.len() {
        let conn = &conns[i];
        let delivered = if targeted {
            deliver_targeted(conn, batch)
        } else {
            conn.deliver(&common)
        };
        if delivered == Delivered::Gone {
            conns.swap_remove(i);
        } else {
            i += 1;
        }
        tokio::task::consume_budget().await;
    }
}

/// A batch holding a kick: the kicked user's sockets get frames up to and including the
/// kick's error frame, then close with 4003; everyone else skips the kick.
fn deliver_targeted(conn: &Conn, batch: &[Arc<RoomFrame>]) -> Delivered {
    let mut frames: Vec<(&Bytes, u64)> = Vec::with_capacity(batch.len());
    for f in batch {
        match &f.audience {
            Audience::Everyone => frames.push((&f.bytes, 0)),
            Audience::Chat(seq) => frames.push((&f.bytes, *seq)),
            Audience::Kicked(user) if **user == *conn.user => {
                frames.push((&f.bytes, 0));
                conn.deliver(&frames);
                conn.close(BANNED, "banned from this room");
                return Delivered::Gone;
            }
            Audience::Kicked(_) => {}
        }
    }
    conn.deliver(&frames)
}

/// The fan-out point of one room.
pub struct RoomChannel {
    pub id: String,
    shards: Box<[Arc<Shard>]>,
    next_shard: AtomicUsize,
    viewers: AtomicU64,
    /// Latest state frame per key, waiting for the next tick; bounded by the number of
    /// distinct keys (likes, presence, one per drop).
    pending: Mutex<HashMap<String, Event>>,
    closed: AtomicBool,
}

impl RoomChannel {
    /// A room and its shard tasks (spawned here).
    pub fn new(id: &str, settings: &FanoutSettings) -> Self {
        let shards: Box<[Arc<Shard>]> = (0..settings.shards.max(1))
            .map(|_| {
                Arc::new(Shard {
                    inbox: Mutex::new(Inbox::default()),
                    wake: Notify::new(),
                    capacity: settings.capacity.max(1),
                    closed: AtomicBool::new(false),
                })
            })
            .collect();
        for shard in shards.iter() {
            tokio::spawn(shard.clone().run(settings.clone()));
        }
        Self {
            id: id.to_string(),
            shards,
            next_shard: AtomicUsize::new(0),
            viewers: AtomicU64::new(0),
            pending: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        }
    }

    /// Hands a new viewer's connection to a shard: from now on it gets every room frame
    /// (queued while it is holding for its welcome).
    pub fn attach(&self, conn: Arc<Conn>) {
        let i = self.next_shard.fetch_add(1, Ordering::Relaxed) % self.shards.len();
        self.shards[i].push(Item::Join(conn));
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
        for shard in self.shards.iter() {
            shard.closed.store(true, Ordering::Release);
            shard.wake.notify_one();
        }
    }

    fn broadcast(&self, event: &Event) {
        let frame = Arc::new(RoomFrame::from_event(event));
        for shard in self.shards.iter() {
            shard.push(Item::Frame(frame.clone()));
        }
    }

    /// Sends discrete events now; parks state events for the next tick.
    pub fn deliver(&self, event: Event) {
        match &event.kind {
            EventKind::Discrete { .. } | EventKind::Kick { .. } => self.broadcast(&event),
            EventKind::State { key } => {
                if let Ok(mut pending) = self.pending.lock() {
                    pending.insert(key.clone(), event);
                }
            }
        }
    }

    /// Flushes conflated state every `tick`, and presence every fifth tick when it changed,
    /// until the room has no viewers left on this instance.
    pub(super) async fn run_ticker(self: Arc<Self>, tick: Duration) {
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
            for event in &due {
                self.broadcast(event);
            }
            n += 1;
            if n.is_multiple_of(5) {
                let viewers = self.viewers();
                if viewers != last_viewers {
                    last_viewers = viewers;
                    let text = ServerMessage::Presence { viewers }.to_text();
                    self.broadcast(&Event {
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
