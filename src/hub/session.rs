//! One viewer's WebSocket session: the task that owns the connection. It sends the welcome
//! snapshot, reads client frames and turns them into service calls (several replies per
//! write when frames arrive together), flushes the socket when the room fan-out could not
//! write everything at once, resyncs a viewer that fell behind, and closes the socket with
//! the right code. Room frames themselves are written by the fan-out (`hub::room`), straight
//! from the shared bytes; an idle session holds only its connection and identity.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpStream;

use crate::auth::{Identity, Role};
use crate::commerce::groups::group_json;
use crate::commerce::{claim_value, drop_json, is_live};
use crate::error::{AppError, AppResult};
use crate::hub::ViewerGuard;
use crate::limits::{ClientAddr, ConnPermit};
use crate::model::{Room, User, now_millis};
use crate::moderation::{admit_claim, admit_join};
use crate::protocol::{ClientMessage, CommandResult, MAX_LIKES_PER_FRAME, ServerMessage, Snapshot};
use crate::state::AppState;
use crate::store::GroupAnswer;
use crate::ws::codec::{self, Decoder, Incoming};
use crate::ws::conn::{self, Conn, Phase};

/// Chat messages in a welcome without `since`.
pub const WELCOME_CHAT: usize = 50;
/// Bytes of a session's own replies queued before it stops reading to let the socket drain.
const OWN_BACKLOG: usize = 64 * 1024;
/// Bytes read from the socket at a time (on the stack: an idle session keeps no buffer).
const READ_CHUNK: usize = 4096;
/// After the server's close frame: how long, and how much, the peer may still send before
/// the socket is dropped (so the close frame is read rather than reset away).
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 256 * 1024;

/// Close codes livedrop uses (see docs/protocol.md).
pub mod close {
    /// RFC 6455's own codes (those the decoder's violations earn are there too).
    pub use crate::ws::codec::close_code::{INVALID_DATA, NORMAL, PROTOCOL, TOO_BIG};
    pub const GOING_AWAY: u16 = 1001;
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

fn frame(msg: &ServerMessage) -> Bytes {
    // Serializing these plain structs cannot fail (no maps with non-string keys).
    codec::json(msg).unwrap_or_else(|_| codec::text("{\"type\":\"error\"}"))
}

/// Everything a session is started with (from the upgrade request).
pub struct Start {
    pub state: AppState,
    pub room: Room,
    pub identity: Identity,
    pub since: Option<u64>,
    pub addr: ClientAddr,
    /// Held for the session's life: the per-IP/per-user socket caps count it.
    pub permit: ConnPermit,
}

/// Starts a session on an upgraded socket (`early`: bytes the client sent right behind its
/// handshake); the future runs it until the client leaves, misbehaves, lags out, or the
/// server shuts down. The session lives in one box and the future holds little more than
/// that box and its wait, so an idle viewer's task is small.
pub fn run(stream: TcpStream, early: Bytes, start: Start) -> impl Future<Output = ()> + Send {
    let state = start.state;
    let (channel, guard) = state.hub.join(&start.room.id);
    let limits = conn::Limits {
        room_frames: state.config.room_buffer,
        own_bytes: OWN_BACKLOG,
    };
    let conn = Arc::new(Conn::new(stream, &start.identity.user.id, limits));
    // Attached before the snapshot is read: what happens meanwhile is held, then follows it.
    channel.attach(conn.clone());
    let mut decoder = Decoder::new(state.config.max_frame_bytes);
    // `early` may be a view of hyper's whole read buffer: it is copied, not kept.
    decoder.feed(&early);
    let session = Box::new(Session {
        write_timeout: Duration::from_secs(state.config.write_timeout_secs),
        state,
        room: start.room,
        identity: start.identity,
        addr: start.addr,
        conn,
        decoder,
        resyncs: Vec::new(),
        _viewer: guard,
        _permit: start.permit,
    });
    session.live(start.since)
}

/// How a session ends: with a close frame of ours, or without one (the peer left, the
/// socket failed, or the close was already answered).
type End = Option<(u16, &'static str)>;

struct Session {
    state: AppState,
    room: Room,
    identity: Identity,
    addr: ClientAddr,
    conn: Arc<Conn>,
    decoder: Decoder,
    resyncs: Vec<Instant>,
    write_timeout: Duration,
    /// Counts the viewer in the room while the session lives.
    _viewer: ViewerGuard,
    _permit: ConnPermit,
}

enum Next {
    Wake,
    Readable(std::io::Result<()>),
}

enum Read {
    Data,
    Nothing,
    Eof,
}

impl Session {
    async fn live(mut self: Box<Self>, since: Option<u64>) {
        // Boxed: the welcome happens once; inline, its state would stay in every idle session.
        let close = match Box::pin(self.welcome(since)).await {
            Ok(()) => self.serve().await,
            Err(end) => end,
        };
        Box::pin(self.finish(close)).await;
    }

    /// Sends the welcome snapshot ahead of whatever the room produced meanwhile.
    async fn welcome(&mut self, since: Option<u64>) -> Result<(), End> {
        let snap = match snapshot(&self.state, &self.room, &self.identity.user, since).await {
            Ok(s) => s,
            Err(e) => {
                let _ = self.conn.open(frame(&ServerMessage::error(&e)), 0);
                return Err(Some((close::INTERNAL, "store unavailable")));
            }
        };
        let seq = snap.seq;
        match self.conn.open(frame(&ServerMessage::Welcome(snap)), seq) {
            Ok(true) => self.flush().await.map_err(|_| None),
            Ok(false) => Ok(()),
            Err(_) => Err(None),
        }
    }

    async fn flush(&self) -> Result<(), conn::Closed> {
        self.conn.flush(self.write_timeout).await
    }

    /// The session's life after the welcome: reads, wake-ups from the fan-out, until an end.
    async fn serve(&mut self) -> End {
        // Frames the client sent right behind its handshake are already in the decoder.
        if self.decoder.has_pending()
            && let Err(end) = Box::pin(self.on_decoded()).await
        {
            return end;
        }
        loop {
            let next = tokio::select! {
                biased;
                _ = self.conn.woken() => Next::Wake,
                r = self.conn.stream().readable() => Next::Readable(r),
            };
            // Boxed: only the wait above stays in an idle session's state; the work of a
            // wake-up or a read lives on the heap just while it runs.
            let step = match next {
                Next::Wake => Box::pin(self.on_wake()).await,
                Next::Readable(Ok(())) => Box::pin(self.on_readable()).await,
                Next::Readable(Err(_)) => Err(None),
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// The fan-out or a control path changed something: flush, resync or close.
    async fn on_wake(&mut self) -> Result<(), End> {
        match self.conn.phase() {
            Phase::Closed => Err(None),
            Phase::Closing { code, reason } => Err(Some((code, reason))),
            Phase::Lagged => self.resync().await,
            Phase::Holding | Phase::Open => self.flush().await.map_err(|_| None),
        }
    }

    /// Reads what the socket has (into a stack buffer, so nothing stays allocated between
    /// frames).
    fn read_some(&mut self) -> Read {
        let mut chunk = [0u8; READ_CHUNK];
        match self.conn.stream().try_read(&mut chunk) {
            Ok(0) => Read::Eof,
            Ok(n) => {
                self.decoder.feed(&chunk[..n]);
                self.conn.heard();
                Read::Data
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Read::Nothing,
            Err(_) => Read::Eof,
        }
    }

    async fn on_readable(&mut self) -> Result<(), End> {
        match self.read_some() {
            Read::Nothing => Ok(()),
            Read::Eof => Err(None),
            Read::Data => self.on_decoded().await,
        }
    }

    /// Handles every complete message the decoder holds.
    async fn on_decoded(&mut self) -> Result<(), End> {
        let mut messages = Vec::new();
        let violation = loop {
            match self.decoder.next_message() {
                Ok(Some(m)) => messages.push(m),
                Ok(None) => break None,
                Err(v) => break Some(v),
            }
        };
        // The replies to what one read brought go in one write (a pipelining client sends
        // many), and each command's answer goes ahead of the room events it caused.
        self.conn.cork();
        let mut outcome = Ok(());
        for message in messages {
            outcome = self.on_message(message).await;
            if outcome.is_err() {
                break;
            }
        }
        if self.conn.uncork() && outcome.is_ok() {
            outcome = self.flush().await.map_err(|_| None);
        }
        outcome?;
        match violation {
            Some(v) => Err(Some((v.code(), v.reason()))),
            None => Ok(()),
        }
    }

    async fn on_message(&mut self, message: Incoming) -> Result<(), End> {
        match message {
            Incoming::Text(t) => {
                // Boxed: a command's future is large and short-lived; inline it would sit
                // in every idle session's state for its whole life.
                if Box::pin(self.handle(&t)).await {
                    Ok(())
                } else {
                    Err(None)
                }
            }
            Incoming::Binary => {
                let e = AppError::bad_request("bad_message", "binary frames are not supported");
                self.ok_or_end(self.reply(ServerMessage::error(&e)).await)
            }
            Incoming::Ping(payload) => {
                let sent = self.send(codec::pong(&payload)).await;
                self.ok_or_end(sent)
            }
            Incoming::Pong => Ok(()),
            Incoming::Close(code) => {
                // Answer the client's close with its own code; then the session is over.
                let echo = code.unwrap_or(close::NORMAL);
                let _ = self.conn.send(codec::close(echo, ""));
                Err(None)
            }
        }
    }

    fn ok_or_end(&self, sent: bool) -> Result<(), End> {
        if sent { Ok(()) } else { Err(None) }
    }

    /// Sends one of the session's own frames; false when the connection is gone.
    async fn send(&self, bytes: Bytes) -> bool {
        match self.conn.send(bytes) {
            Ok(false) => true,
            Ok(true) => self.flush().await.is_ok(),
            Err(_) => false,
        }
    }

    async fn reply(&self, msg: ServerMessage) -> bool {
        self.send(frame(&msg)).await
    }

    /// A session-ending refusal: the close code is sent by `finish`.
    fn closing(&self, code: u16, reason: &'static str) -> bool {
        self.conn.close(code, reason);
        false
    }

    /// The viewer fell behind the room: send a fresh snapshot (with every chat message it
    /// missed, when history still holds them), or disconnect it if this keeps happening.
    async fn resync(&mut self) -> Result<(), End> {
        let now = Instant::now();
        self.resyncs
            .retain(|t| now.duration_since(*t) < Duration::from_secs(60));
        self.resyncs.push(now);
        if self.resyncs.len() > self.state.config.max_resyncs as usize {
            tracing::info!(room = %self.room.id, user = %self.identity.user.id, "viewer lagging; disconnecting");
            return Err(Some((close::LAGGING, "too slow: fell behind the room")));
        }
        let last_seq = self.conn.hold();
        let snap = snapshot(&self.state, &self.room, &self.identity.user, Some(last_seq)).await;
        let (bytes, seq) = match snap {
            Ok(snap) => {
                let seq = snap.seq.max(last_seq);
                (frame(&ServerMessage::Resync(snap)), seq)
            }
            Err(e) => (frame(&ServerMessage::error(&e)), last_seq),
        };
        match self.conn.open(bytes, seq) {
            Ok(true) => self.flush().await.map_err(|_| None),
            Ok(false) => Ok(()),
            Err(_) => Err(None),
        }
    }

    /// Ends the connection: our close frame (if any) after what is queued, a half-close, and
    /// a short, bounded wait for the peer to read it and hang up.
    async fn finish(&mut self, end: End) {
        let end = match (end, self.conn.phase()) {
            (None, Phase::Closing { code, reason }) => Some((code, reason)),
            (end, _) => end,
        };
        if let Some((code, reason)) = end
            && self.conn.send(codec::close(code, reason)).is_ok()
        {
            let _ = self.conn.flush(self.write_timeout.min(LINGER * 5)).await;
        } else {
            let _ = self.conn.flush(LINGER).await;
        }
        self.conn.set_closed();
        let stream = self.conn.stream();
        let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write);
        let _ = tokio::time::timeout(LINGER, async {
            let mut discarded = 0;
            while discarded < LINGER_BYTES {
                if stream.readable().await.is_err() {
                    return;
                }
                let mut sink = [0u8; READ_CHUNK];
                match stream.try_read(&mut sink) {
                    Ok(0) => return,
                    Ok(n) => discarded += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        })
        .await;
        let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Both);
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
            return self.closing(close::TOKEN_EXPIRED, "token expired");
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
                self.reply(command_result(key, result.map(|r| claim_value(&r.claim))))
                    .await
            }
            ClientMessage::Confirm { claim } => {
                let result = match self.identity.require(Role::Viewer) {
                    Ok(()) => state.commerce.confirm(user, &claim).await,
                    Err(e) => Err(e),
                };
                self.reply(command_result(claim, result.map(|t| claim_value(&t.claim))))
                    .await
            }
            ClientMessage::Release { claim } => {
                let result = match self.identity.require(Role::Viewer) {
                    Ok(()) => state.commerce.release(user, &claim).await,
                    Err(e) => Err(e),
                };
                self.reply(command_result(claim, result.map(|t| claim_value(&t.claim))))
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
