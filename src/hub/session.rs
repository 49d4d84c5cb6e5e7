//! One viewer's WebSocket session: a reader that turns client frames into service calls and
//! a writer that forwards the room's shared frames (several per flush when the socket is
//! behind), the session's own replies, and the close frame. Nothing here can grow without
//! bound: the room ring is fixed, replies are a small bounded queue, a viewer that falls
//! behind the ring gets a `resync` snapshot, and one that keeps falling behind (or whose
//! writes stall) is disconnected.

use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{broadcast, mpsc};

use crate::auth::{Identity, Role};
use crate::bus::{Event, EventKind};
use crate::commerce::groups::group_json;
use crate::commerce::{claim_json, drop_json, is_live};
use crate::error::{AppError, AppResult};
use crate::limits::ClientAddr;
use crate::model::{Room, User, now_millis};
use crate::moderation::{admit_claim, admit_join};
use crate::protocol::{ClientMessage, CommandResult, MAX_LIKES_PER_FRAME, ServerMessage, Snapshot};
use crate::state::AppState;
use crate::store::GroupAnswer;

/// Chat messages in a welcome without `since`.
pub const WELCOME_CHAT: usize = 50;
/// Replies (pong, errors, claim results) queued for one session before its reader waits.
const DIRECT_QUEUE: usize = 32;
/// Room frames written per flush when the socket is behind.
const BATCH: usize = 64;

/// Close codes livedrop uses (see docs/protocol.md).
pub mod close {
    pub const GOING_AWAY: u16 = 1001;
    pub const INVALID_DATA: u16 = 1007;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    /// The client did not answer pings.
    pub const IDLE: u16 = 4000;
    /// The client kept falling behind the room and was resynced too often.
    pub const LAGGING: u16 = 4008;
    /// The token expired while the socket was open: reconnect with a fresh one.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// The user was banned from the room.
    pub const BANNED: u16 = 4003;
}

/// Builds what a viewer sees on joining (or on resync): room, counts, chat and live drops.
pub async fn snapshot(
    state: &AppState,
    room: &Room,
    you: &User,
    since: Option<u64>,
) -> AppResult<Snapshot> {
    let store = &state.store;
    // Read the seq first: any message stored after this read has a higher seq and reaches
    // the viewer through the room channel, so nothing falls between snapshot and stream.
    let seq_before = store.chat_seq(&room.id).await?;
    let (chat, recovered) = match since {
        Some(s) => match store.chat_since(&room.id, s).await? {
            Some(list) => (list, Some(true)),
            None => (
                store.recent_chat(&room.id, WELCOME_CHAT).await?,
                Some(false),
            ),
        },
        None => (store.recent_chat(&room.id, WELCOME_CHAT).await?, None),
    };
    let seq = chat.last().map(|m| m.seq).unwrap_or(seq_before);
    let chat = state.moderation.visible(&room.id, chat).await?;
    let now = now_millis();
    let mut live = store.room_drops(&room.id).await?;
    live.retain(|d| is_live(d, now));
    let groups = state.commerce.open_groups_json(&live).await?;
    let drops = live.iter().map(drop_json).collect();
    Ok(Snapshot {
        room: room.clone(),
        viewers: state.hub.viewers(&room.id),
        likes: state.likes.total(&room.id).await?,
        chat,
        seq,
        recovered,
        drops,
        groups,
        you: you.clone(),
    })
}

fn text(msg: &ServerMessage) -> Message {
    Message::Text(msg.to_text().into())
}

fn close_msg(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}

/// Runs a session until the client leaves, misbehaves, lags out, or the server shuts down.
pub async fn run(
    socket: WebSocket,
    state: AppState,
    room: Room,
    identity: Identity,
    since: Option<u64>,
    addr: ClientAddr,
) {
    let (channel, _guard) = state.hub.join(&room.id);
    let rx = channel.subscribe();
    let (mut sink, stream) = socket.split();
    let write_timeout = Duration::from_secs(state.config.write_timeout_secs);

    // Boxed: the welcome (a snapshot and one large write) happens once; inline, its state
    // would stay in every idle session's task for the session's whole life.
    let welcomed = Box::pin(welcome(
        &state,
        &room,
        &identity.user,
        since,
        &mut sink,
        write_timeout,
    ));
    let Some(last_seq) = welcomed.await else {
        return;
    };

    let (direct_tx, direct_rx) = mpsc::channel(DIRECT_QUEUE);
    let writer = Writer {
        state: state.clone(),
        room: room.clone(),
        you: identity.user.clone(),
        last_seq,
        resyncs: Vec::new(),
        write_timeout,
    }
    .run(sink, rx, direct_rx);
    let reader = Reader {
        state,
        room,
        identity,
        addr,
        direct: direct_tx,
    }
    .run(stream);
    tokio::pin!(writer, reader);
    tokio::select! {
        _ = &mut writer => {}
        _ = &mut reader => {
            // The reader dropped its queue handle: the writer drains it and stops.
            (&mut writer).await;
        }
    }
}

/// Sends the welcome snapshot; the chat seq it covers, or None when the session must end.
async fn welcome(
    state: &AppState,
    room: &Room,
    you: &User,
    since: Option<u64>,
    sink: &mut Sink,
    write_timeout: Duration,
) -> Option<u64> {
    let welcome = match snapshot(state, room, you, since).await {
        Ok(s) => s,
        Err(e) => {
            let _ = sink.send(text(&ServerMessage::error(&e))).await;
            let _ = sink
                .send(close_msg(close::INTERNAL, "store unavailable"))
                .await;
            return None;
        }
    };
    let last_seq = welcome.seq;
    let sent = tokio::time::timeout(
        write_timeout,
        sink.send(text(&ServerMessage::Welcome(welcome))),
    )
    .await;
    matches!(sent, Ok(Ok(()))).then_some(last_seq)
}

struct Writer {
    state: AppState,
    room: Room,
    you: User,
    /// Highest chat seq this viewer has; chat frames at or below it are skipped.
    last_seq: u64,
    resyncs: Vec<Instant>,
    write_timeout: Duration,
}

type Sink = futures_util::stream::SplitSink<WebSocket, Message>;

impl Writer {
    fn wanted(&self, ev: &Event) -> bool {
        match &ev.kind {
            EventKind::Discrete { seq } => *seq == 0 || *seq > self.last_seq,
            EventKind::State { .. } => true,
            EventKind::Kick { user } => *user == self.you.id,
        }
    }

    fn note(&mut self, ev: &Event) {
        if let EventKind::Discrete { seq } = ev.kind
            && seq > self.last_seq
        {
            self.last_seq = seq;
        }
    }

    async fn send(&self, sink: &mut Sink, msg: Message) -> bool {
        matches!(
            tokio::time::timeout(self.write_timeout, sink.send(msg)).await,
            Ok(Ok(()))
        )
    }

    async fn run(
        mut self,
        mut sink: Sink,
        mut rx: broadcast::Receiver<Event>,
        mut direct: mpsc::Receiver<Message>,
    ) {
        let shutdown = self.state.shutdown.clone();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    let _ = self.send(&mut sink, close_msg(close::GOING_AWAY, "server shutting down")).await;
                    return;
                }
                m = direct.recv() => match m {
                    Some(msg) => {
                        let closing = matches!(msg, Message::Close(_));
                        if !self.send(&mut sink, msg).await || closing {
                            return;
                        }
                    }
                    None => {
                        let _ = tokio::time::timeout(self.write_timeout, sink.close()).await;
                        return;
                    }
                },
                r = rx.recv() => match r {
                    Ok(ev) => {
                        if !self.forward_batch(&mut sink, &mut rx, ev).await {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if !Box::pin(self.resync(&mut sink)).await {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }

    /// Writes `first` and whatever else is already queued (up to `BATCH`) with one flush.
    async fn forward_batch(
        &mut self,
        sink: &mut Sink,
        rx: &mut broadcast::Receiver<Event>,
        first: Event,
    ) -> bool {
        let mut batch = Vec::with_capacity(8);
        let mut lagged = false;
        if self.wanted(&first) {
            self.note(&first);
            batch.push(first);
        }
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(ev) => {
                    if self.wanted(&ev) {
                        self.note(&ev);
                        batch.push(ev);
                    }
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    lagged = true;
                    break;
                }
                Err(_) => break,
            }
        }
        // A kick ends the batch: the viewer gets its error frame, then the close.
        let kicked = batch
            .iter()
            .position(|ev| matches!(ev.kind, EventKind::Kick { .. }));
        if let Some(i) = kicked {
            batch.truncate(i + 1);
        }
        if !batch.is_empty() {
            let write = async {
                for ev in batch {
                    sink.feed(Message::Text(ev.text)).await?;
                }
                sink.flush().await
            };
            if !matches!(
                tokio::time::timeout(self.write_timeout, write).await,
                Ok(Ok(()))
            ) {
                return false;
            }
        }
        if kicked.is_some() {
            let _ = self
                .send(sink, close_msg(close::BANNED, "banned from this room"))
                .await;
            return false;
        }
        if lagged {
            return Box::pin(self.resync(sink)).await;
        }
        true
    }

    /// The viewer fell behind the room ring: send a fresh snapshot (with every chat message
    /// it missed, when history still holds them), or disconnect it if this keeps happening.
    async fn resync(&mut self, sink: &mut Sink) -> bool {
        let now = Instant::now();
        self.resyncs
            .retain(|t| now.duration_since(*t) < Duration::from_secs(60));
        self.resyncs.push(now);
        if self.resyncs.len() > self.state.config.max_resyncs as usize {
            tracing::info!(room = %self.room.id, user = %self.you.id, "viewer lagging; disconnecting");
            let _ = self
                .send(
                    sink,
                    close_msg(close::LAGGING, "too slow: fell behind the room"),
                )
                .await;
            return false;
        }
        match snapshot(&self.state, &self.room, &self.you, Some(self.last_seq)).await {
            Ok(snap) => {
                self.last_seq = snap.seq.max(self.last_seq);
                self.send(sink, text(&ServerMessage::Resync(snap))).await
            }
            Err(e) => self.send(sink, text(&ServerMessage::error(&e))).await,
        }
    }
}

struct Reader {
    state: AppState,
    room: Room,
    identity: Identity,
    addr: ClientAddr,
    direct: mpsc::Sender<Message>,
}

type Stream = futures_util::stream::SplitStream<WebSocket>;

impl Reader {
    /// Queues a frame for the writer. Boxed: the queue's send future is short-lived, and
    /// inline in `run` it would sit in every idle session.
    async fn queue(&self, msg: Message) -> bool {
        Box::pin(self.direct.send(msg)).await.is_ok()
    }

    async fn reply(&self, msg: ServerMessage) -> bool {
        self.queue(text(&msg)).await
    }

    async fn close(&self, code: u16, reason: &'static str) {
        let _ = self.queue(close_msg(code, reason)).await;
    }

    async fn run(self, mut stream: Stream) {
        let idle = Duration::from_secs(self.state.config.idle_secs);
        let mut pinged = false;
        loop {
            let next = match tokio::time::timeout(idle, stream.next()).await {
                Ok(n) => n,
                Err(_) if !pinged => {
                    pinged = true;
                    if !self
                        .queue(Message::Ping(bytes::Bytes::from_static(b"livedrop")))
                        .await
                    {
                        return;
                    }
                    continue;
                }
                Err(_) => {
                    self.close(close::IDLE, "idle: no answer to ping").await;
                    return;
                }
            };
            pinged = false;
            match next {
                None | Some(Ok(Message::Close(_))) => return,
                Some(Ok(Message::Text(t))) => {
                    // Boxed: a command's future is large and short-lived; inline it would
                    // sit in every idle session's state for its whole life.
                    if !Box::pin(self.handle(t.as_str())).await {
                        return;
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    let e = AppError::bad_request("bad_message", "binary frames are not supported");
                    if !self.reply(ServerMessage::error(&e)).await {
                        return;
                    }
                }
                Some(Ok(_)) => {} // ping/pong: answered by the WebSocket layer
                Some(Err(e)) => {
                    let what = e.to_string();
                    if what.contains("too long") || what.contains("Space limit") {
                        self.close(close::TOO_BIG, "message too big").await;
                    } else if what.to_ascii_lowercase().contains("utf-8") {
                        self.close(close::INVALID_DATA, "invalid UTF-8").await;
                    }
                    return;
                }
            }
        }
    }

    /// Handles one client frame; false when the session should end.
    async fn handle(&self, raw: &str) -> bool {
        let msg: ClientMessage = match serde_json::from_str(raw) {
            Ok(m) => m,
            Err(e) => {
                let err = AppError::bad_request("bad_message", format!("bad message: {e}"));
                return self.reply(ServerMessage::error(&err)).await;
            }
        };
        let user = &self.identity.user;
        let state = &self.state;
        // Authorization is checked on every command, not only at connect.
        if !matches!(msg, ClientMessage::Ping)
            && let Err(e) = self.identity.check_live()
        {
            let _ = self.reply(ServerMessage::error(&e)).await;
            self.close(close::TOKEN_EXPIRED, "token expired").await;
            return false;
        }
        match msg {
            ClientMessage::Ping => self.reply(ServerMessage::Pong).await,
            ClientMessage::Chat { text } => {
                let posted = async {
                    self.identity.require(Role::Viewer)?;
                    if !self.addr.exempt {
                        let key = (self.room.id.clone(), user.id.clone());
                        state.limits.chat.check(&key)?;
                    }
                    state
                        .moderation
                        .check_chat(&self.room.id, &user.id, &text)
                        .await?;
                    state.chat.post(&self.room.id, user, &text).await
                };
                match posted.await {
                    Ok(_) => true,
                    Err(e) => self.reply(ServerMessage::error(&e)).await,
                }
            }
            ClientMessage::Like { count } => {
                let liked = async {
                    self.identity.require(Role::Viewer)?;
                    if count == 0 || count > MAX_LIKES_PER_FRAME {
                        return Err(AppError::bad_request(
                            "bad_message",
                            format!("like count must be 1..={MAX_LIKES_PER_FRAME}"),
                        ));
                    }
                    if !self.addr.exempt {
                        state.limits.likes.check(&user.id)?;
                    }
                    state
                        .moderation
                        .check_not_banned(&self.room.id, &user.id)
                        .await
                };
                match liked.await {
                    Ok(()) => {
                        state.likes.add(&self.room.id, count as u64);
                        true
                    }
                    Err(e) => self.reply(ServerMessage::error(&e)).await,
                }
            }
            ClientMessage::Claim { drop, qty, key } => {
                let result = match admit_claim(state, &self.identity, self.addr, &drop).await {
                    Ok(()) => state.commerce.claim(user, &drop, &qty, &key).await,
                    Err(e) => Err(e),
                };
                self.reply(command_result(key, result.map(|r| claim_json(&r.claim))))
                    .await
            }
            ClientMessage::Confirm { claim } => {
                let result = match self.identity.require(Role::Viewer) {
                    Ok(()) => state.commerce.confirm(user, &claim).await,
                    Err(e) => Err(e),
                };
                self.reply(command_result(claim, result.map(|t| claim_json(&t.claim))))
                    .await
            }
            ClientMessage::Release { claim } => {
                let result = match self.identity.require(Role::Viewer) {
                    Ok(()) => state.commerce.release(user, &claim).await,
                    Err(e) => Err(e),
                };
                self.reply(command_result(claim, result.map(|t| claim_json(&t.claim))))
                    .await
            }
            ClientMessage::OpenGroup { drop, key } => {
                let result = match admit_claim(state, &self.identity, self.addr, &drop).await {
                    Ok(()) => state.commerce.open_group(user, &drop, Some(&key)).await,
                    Err(e) => Err(e),
                };
                self.reply(group_result(key, result)).await
            }
            ClientMessage::JoinGroup { group, key } => {
                let result = match admit_join(state, &self.identity, self.addr, &group).await {
                    Ok(()) => state.commerce.join_group(user, &group, &key).await,
                    Err(e) => Err(e),
                };
                self.reply(group_result(key, result)).await
            }
        }
    }
}

fn command_result(key: String, result: AppResult<serde_json::Value>) -> ServerMessage {
    ServerMessage::ClaimResult(CommandResult::new(key, result, false))
}

fn group_result(key: String, result: AppResult<GroupAnswer>) -> ServerMessage {
    let result = result.map(|a| group_json(&a.group));
    ServerMessage::GroupResult(CommandResult::new(key, result, true))
}
