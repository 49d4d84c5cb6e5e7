//! Chat posting and likes. Chat messages of one room are appended and published by one
//! sequencer task per room, so viewers receive them in `seq` order even when many viewers
//! post at once. Likes are counted locally and flushed to the store and the room once per
//! conflation tick: 10 000 taps cost one store write and one frame per tick, not 10 000.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, Event, EventKind};
use crate::error::{AppError, AppResult};
use crate::model::{ChatMessage, User, now_millis};
use crate::protocol::{ServerMessage, check_chat_text};
use crate::store::Store;

/// Posts waiting per room before posters are made to wait (backpressure, not growth).
const SEQUENCER_QUEUE: usize = 1024;

struct Post {
    user: User,
    text: String,
    reply: oneshot::Sender<AppResult<ChatMessage>>,
}

/// Appends chat to the store and publishes it in order.
pub struct ChatService {
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    history: usize,
    sequencers: DashMap<String, mpsc::Sender<Post>>,
}

impl ChatService {
    pub fn new(store: Arc<dyn Store>, bus: Arc<dyn Bus>, history: usize) -> Self {
        Self {
            store,
            bus,
            history,
            sequencers: DashMap::new(),
        }
    }

    /// Validates, stores and broadcasts one message; answers once it is stored.
    pub async fn post(&self, room: &str, user: &User, text: &str) -> AppResult<ChatMessage> {
        check_chat_text(text)?;
        let tx = self
            .sequencers
            .entry(room.to_string())
            .or_insert_with(|| self.spawn_sequencer(room))
            .clone();
        let (reply, answer) = oneshot::channel();
        let post = Post {
            user: user.clone(),
            text: text.to_string(),
            reply,
        };
        tx.send(post)
            .await
            .map_err(|_| AppError::internal("chat sequencer stopped"))?;
        answer
            .await
            .map_err(|_| AppError::internal("chat sequencer dropped the post"))?
    }

    fn spawn_sequencer(&self, room: &str) -> mpsc::Sender<Post> {
        let (tx, mut rx) = mpsc::channel::<Post>(SEQUENCER_QUEUE);
        let store = self.store.clone();
        let bus = self.bus.clone();
        let history = self.history;
        let room = room.to_string();
        tokio::spawn(async move {
            while let Some(post) = rx.recv().await {
                let id = uuid::Uuid::new_v4().simple().to_string();
                let result = store
                    .append_chat(&room, &id, &post.user, &post.text, now_millis(), history)
                    .await;
                if let Ok(msg) = &result {
                    let text = ServerMessage::Chat(msg.clone()).to_text();
                    bus.publish(
                        &room,
                        Event {
                            kind: EventKind::Discrete { seq: msg.seq },
                            text: text.into(),
                        },
                    );
                }
                let _ = post.reply.send(result);
            }
        });
        tx
    }
}

/// Counts likes and publishes the room total, conflated.
pub struct LikeService {
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    pending: DashMap<String, AtomicU64>,
}

impl LikeService {
    pub fn new(store: Arc<dyn Store>, bus: Arc<dyn Bus>) -> Self {
        Self {
            store,
            bus,
            pending: DashMap::new(),
        }
    }

    /// Counts `n` likes for the room; they reach the store and viewers on the next flush.
    pub fn add(&self, room: &str, n: u64) {
        if let Some(p) = self.pending.get(room) {
            p.fetch_add(n, Ordering::AcqRel);
            return;
        }
        self.pending
            .entry(room.to_string())
            .or_insert_with(|| AtomicU64::new(0))
            .fetch_add(n, Ordering::AcqRel);
    }

    /// The room's total including likes not yet flushed.
    pub async fn total(&self, room: &str) -> AppResult<u64> {
        let stored = self.store.likes(room).await?;
        let pending = self
            .pending
            .get(room)
            .map(|p| p.load(Ordering::Acquire))
            .unwrap_or(0);
        Ok(stored + pending)
    }

    /// Writes pending likes to the store and publishes each changed total.
    pub async fn flush(&self) {
        let rooms: Vec<(String, u64)> = self
            .pending
            .iter()
            .filter_map(|e| {
                let n = e.value().swap(0, Ordering::AcqRel);
                (n > 0).then(|| (e.key().clone(), n))
            })
            .collect();
        for (room, n) in rooms {
            match self.store.add_likes(&room, n).await {
                Ok(total) => {
                    let text = ServerMessage::Likes { total }.to_text();
                    self.bus.publish(
                        &room,
                        Event {
                            kind: EventKind::State {
                                key: "likes".into(),
                            },
                            text: text.into(),
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(room, error = %e, "could not store likes; retrying next tick");
                    self.add(&room, n);
                }
            }
        }
    }

    /// Flushes every `tick` until shutdown, then once more.
    pub async fn run(self: Arc<Self>, tick: Duration, shutdown: CancellationToken) {
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = interval.tick() => self.flush().await,
                _ = shutdown.cancelled() => {
                    self.flush().await;
                    return;
                }
            }
        }
    }
}
