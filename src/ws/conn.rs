//! One WebSocket's write side, shared by the session task that owns the connection and the
//! room fan-out that writes to it. A frame goes straight to the kernel with one non-blocking
//! write when nothing is queued; when the socket is behind it waits in the outbox, which the
//! session flushes several frames per syscall. The outbox is bounded (a viewer too far behind
//! is *lagged*: its room frames are dropped and it gets a fresh snapshot instead) and it holds
//! the viewer's phase: holding room frames while a snapshot is built, open, lagged, closing.
//! No lock here is held across an `.await`.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Frames handed to the kernel per write call when several are queued.
const SLICES_PER_WRITE: usize = 64;

/// Where a connection is in its life; the session acts on every change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Room frames are queued, not written: the session is building a snapshot, and what
    /// arrives meanwhile must follow it (chat already in the snapshot is skipped).
    Holding,
    /// Frames flow.
    Open,
    /// The viewer fell too far behind: its queued room frames were dropped and new ones are
    /// until the session has sent a fresh snapshot. The session's own replies still flow.
    Lagged,
    /// The server decided to close (ban, shutdown, idle): the session sends this close
    /// frame after what is queued and ends.
    Closing { code: u16, reason: &'static str },
    /// The socket failed or the session ended: nothing more is written.
    Closed,
}

/// Bounds of one connection's outbox.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Room frames queued before the viewer counts as lagged.
    pub room_frames: usize,
    /// Bytes of the session's own replies queued before the session stops reading and
    /// waits for the socket (a client that sends faster than it reads slows only itself).
    pub own_bytes: usize,
}

struct Queued {
    bytes: Bytes,
    /// Chat seq of a room chat frame (0 for anything else).
    seq: u64,
    /// A room frame (dropped on lag) rather than the session's own reply.
    room: bool,
}

struct Outbox {
    queue: VecDeque<Queued>,
    /// Bytes of the first queued frame already written.
    written: usize,
    room_frames: usize,
    own_bytes: usize,
    phase: Phase,
    /// Highest chat seq this viewer has been given (queued or written).
    last_seq: u64,
    /// The session is handling commands: replies wait for one write at the end, ahead of
    /// the room frames that arrived meanwhile (a command's answer comes before the room
    /// events it caused).
    corked: bool,
    /// While corked: where the next own reply goes in the queue.
    cork_slot: usize,
}

impl Outbox {
    fn push(&mut self, q: Queued) {
        if q.room {
            self.room_frames += 1;
        } else {
            self.own_bytes += q.bytes.len();
            if self.corked {
                self.queue.insert(self.cork_slot, q);
                self.cork_slot += 1;
                return;
            }
        }
        self.queue.push_back(q);
    }

    fn pop_front(&mut self) {
        if let Some(q) = self.queue.pop_front() {
            if q.room {
                self.room_frames -= 1;
            } else {
                self.own_bytes -= q.bytes.len();
            }
        }
        self.written = 0;
        self.cork_slot = self.cork_slot.saturating_sub(1);
        if self.queue.is_empty() {
            // A viewer that caught up keeps no queue memory.
            self.queue = VecDeque::new();
        }
    }

    fn writes_now(&self) -> bool {
        !self.corked && !matches!(self.phase, Phase::Holding | Phase::Closed)
    }

    /// Keeps the own replies and a partly written first frame (a frame on the wire must be
    /// finished); every other room frame goes.
    fn drop_room_frames(&mut self) {
        let keep_head = self.written > 0;
        let mut i = 0;
        self.queue.retain(|q| {
            let keep = !q.room || (keep_head && i == 0);
            i += 1;
            keep
        });
        self.room_frames = self.queue.iter().filter(|q| q.room).count();
        self.cork_slot = self.queue.len();
    }

    /// Where a snapshot goes: first, or right after a partly written frame.
    fn front_slot(&self) -> usize {
        usize::from(self.written > 0)
    }
}

/// What a connection's owner learns from a delivery.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivered {
    /// Written or queued within bounds.
    Ok,
    /// The connection is closed (or closing); the fan-out can forget it.
    Gone,
}

/// A WebSocket connection: the socket, its bounded outbox and who is on it.
pub struct Conn {
    stream: TcpStream,
    out: Mutex<Outbox>,
    /// Wakes the session: bytes to flush, a lag, or a close.
    wake: Notify,
    limits: Limits,
    /// The user on this socket (bans close every socket of a user).
    pub user: Box<str>,
    /// Milliseconds (on [`clock_ms`]) when the client last sent anything.
    heard: AtomicU64,
    pinged: AtomicBool,
}

/// A coarse monotonic clock in milliseconds, for idle detection.
pub fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl Conn {
    /// A connection that starts [`Phase::Holding`]: its welcome is not written yet.
    pub fn new(stream: TcpStream, user: &str, limits: Limits) -> Self {
        Self {
            stream,
            out: Mutex::new(Outbox {
                queue: VecDeque::new(),
                written: 0,
                room_frames: 0,
                own_bytes: 0,
                phase: Phase::Holding,
                last_seq: 0,
                corked: false,
                cork_slot: 0,
            }),
            wake: Notify::new(),
            limits,
            user: user.into(),
            heard: AtomicU64::new(clock_ms()),
            pinged: AtomicBool::new(false),
        }
    }

    fn outbox(&self) -> Option<MutexGuard<'_, Outbox>> {
        self.out.lock().ok()
    }

    /// The socket, for the session's reads.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Resolves when the session has something to do: flush, resync or close.
    pub async fn woken(&self) {
        self.wake.notified().await
    }

    pub fn phase(&self) -> Phase {
        self.outbox().map_or(Phase::Closed, |o| o.phase)
    }

    /// Highest chat seq given to this viewer.
    pub fn last_seq(&self) -> u64 {
        self.outbox().map_or(0, |o| o.last_seq)
    }

    /// Whether bytes are waiting for the socket.
    pub fn has_queued(&self) -> bool {
        self.outbox().is_some_and(|o| !o.queue.is_empty())
    }

    /// Writes as much of the queue as the socket takes now. A failed socket is `Closed`.
    fn write_queued(&self, out: &mut Outbox) {
        while !out.queue.is_empty() {
            // Nothing to write for an empty frame (and a zero-byte write would look like EOF).
            if out
                .queue
                .front()
                .is_some_and(|q| q.bytes.len() == out.written)
            {
                out.pop_front();
                continue;
            }
            let mut slices = [IoSlice::new(&[]); SLICES_PER_WRITE];
            let mut n = 0;
            for (i, q) in out.queue.iter().take(SLICES_PER_WRITE).enumerate() {
                let skip = if i == 0 { out.written } else { 0 };
                slices[i] = IoSlice::new(&q.bytes[skip..]);
                n += 1;
            }
            match self.stream.try_write_vectored(&slices[..n]) {
                Ok(0) => {
                    out.phase = Phase::Closed;
                    return;
                }
                Ok(mut wrote) => {
                    while wrote > 0 {
                        let Some(head) = out.queue.front() else { break };
                        let left = head.bytes.len() - out.written;
                        if wrote >= left {
                            wrote -= left;
                            out.pop_front();
                        } else {
                            out.written += wrote;
                            wrote = 0;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    out.phase = Phase::Closed;
                    return;
                }
            }
        }
    }

    /// Room frames from the fan-out, as `(bytes, chat seq or 0)`. Chat at or below what the
    /// viewer already has is skipped; the rest is written at once when nothing is queued
    /// (one syscall for the lot, and no allocation unless the socket is behind).
    pub fn deliver(&self, frames: &[(&Bytes, u64)]) -> Delivered {
        let Some(mut out) = self.outbox() else {
            return Delivered::Gone;
        };
        match out.phase {
            Phase::Closing { .. } | Phase::Closed => return Delivered::Gone,
            Phase::Lagged => return Delivered::Ok,
            Phase::Holding | Phase::Open => {}
        }
        let was_empty = out.queue.is_empty();
        let from_seq = out.last_seq;
        let mut last = from_seq;
        let picked = frames.iter().filter(|(_, seq)| {
            let take = *seq == 0 || *seq > last;
            if *seq != 0 && take {
                last = *seq;
            }
            take
        });
        let mut wrote = 0;
        if was_empty && out.writes_now() && frames.len() <= SLICES_PER_WRITE {
            let mut slices = [IoSlice::new(&[]); SLICES_PER_WRITE];
            let mut n = 0;
            for (bytes, _) in picked {
                slices[n] = IoSlice::new(bytes);
                n += 1;
            }
            out.last_seq = last;
            if n == 0 {
                return Delivered::Ok;
            }
            // One frame (the common case): write(2), which skips writev's iovec import.
            let written = if n == 1 {
                self.stream.try_write(&slices[0])
            } else {
                self.stream.try_write_vectored(&slices[..n])
            };
            match written {
                Ok(0) => out.phase = Phase::Closed,
                Ok(w) => wrote = w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => out.phase = Phase::Closed,
            }
            if out.phase == Phase::Closed {
                drop(out);
                self.wake.notify_one();
                return Delivered::Gone;
            }
        } else {
            for _ in picked {}
            out.last_seq = last;
        }
        // Whatever the socket did not take waits in the queue, in order.
        let mut seen = from_seq;
        for (bytes, seq) in frames {
            if *seq != 0 {
                if *seq <= seen {
                    continue;
                }
                seen = *seq;
            }
            if wrote >= bytes.len() {
                wrote -= bytes.len();
                continue;
            }
            let partial = std::mem::take(&mut wrote);
            out.push(Queued {
                bytes: (*bytes).clone(),
                seq: *seq,
                room: true,
            });
            if partial > 0 {
                out.written = partial;
            }
        }
        if out.room_frames > self.limits.room_frames {
            out.drop_room_frames();
            out.phase = Phase::Lagged;
            drop(out);
            self.wake.notify_one();
            return Delivered::Ok;
        }
        if was_empty && !out.queue.is_empty() && out.writes_now() {
            // Written as far as the socket took: the session flushes the rest when it can.
            self.write_queued(&mut out);
        }
        let gone = out.phase == Phase::Closed;
        let wake = gone || (was_empty && !out.queue.is_empty() && out.writes_now());
        drop(out);
        if wake {
            self.wake.notify_one();
        }
        if gone { Delivered::Gone } else { Delivered::Ok }
    }

    /// Queues (and writes, when it can) one of the session's own frames. `Err` when the
    /// connection is closed; `Ok(true)` when the session should flush before going on.
    pub fn send(&self, bytes: Bytes) -> Result<bool, Closed> {
        let Some(mut out) = self.outbox() else {
            return Err(Closed);
        };
        if out.phase == Phase::Closed {
            return Err(Closed);
        }
        if bytes.is_empty() {
            return Ok(false);
        }
        let mut wrote = 0;
        if out.queue.is_empty() && out.writes_now() {
            match self.stream.try_write(&bytes) {
                Ok(w) if w == bytes.len() => return Ok(false),
                Ok(0) => out.phase = Phase::Closed,
                Ok(w) => wrote = w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => out.phase = Phase::Closed,
            }
            if out.phase == Phase::Closed {
                return Err(Closed);
            }
        }
        let head = out.queue.is_empty();
        out.push(Queued {
            bytes,
            seq: 0,
            room: false,
        });
        if head {
            out.written = wrote;
        }
        Ok(out.own_bytes > self.limits.own_bytes)
    }

    /// A frame from outside the session (a ping from the idle check): like [`Self::send`],
    /// but the session is woken to flush whatever the socket did not take.
    pub fn send_from_outside(&self, bytes: Bytes) {
        let queued = self.send(bytes).is_ok() && self.has_queued();
        if queued {
            self.wake.notify_one();
        }
    }

    /// Holds replies until [`Self::uncork`]: one write for a batch of commands, the replies
    /// ahead of room frames that arrive meanwhile.
    pub fn cork(&self) {
        if let Some(mut out) = self.outbox() {
            out.corked = true;
            out.cork_slot = out.queue.len();
        }
    }

    /// Writes what the batch queued; true when bytes are still waiting for the socket.
    pub fn uncork(&self) -> bool {
        let Some(mut out) = self.outbox() else {
            return false;
        };
        out.corked = false;
        if out.writes_now() {
            self.write_queued(&mut out);
        }
        !out.queue.is_empty() && out.phase != Phase::Closed
    }

    /// Writes everything queued, waiting for the socket as needed; each wait may take at most
    /// `timeout` (a viewer whose socket does not move for that long is given up on).
    pub async fn flush(&self, timeout: Duration) -> Result<(), Closed> {
        loop {
            {
                let Some(mut out) = self.outbox() else {
                    return Err(Closed);
                };
                if out.phase == Phase::Closed {
                    return Err(Closed);
                }
                if out.phase == Phase::Holding {
                    return Ok(());
                }
                let corked = std::mem::replace(&mut out.corked, false);
                self.write_queued(&mut out);
                out.corked = corked;
                if out.phase == Phase::Closed {
                    return Err(Closed);
                }
                if out.queue.is_empty() {
                    return Ok(());
                }
            }
            match tokio::time::timeout(timeout, self.stream.writable()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    self.set_closed();
                    return Err(Closed);
                }
            }
        }
    }

    /// Lagged → Holding, before the session builds a resync snapshot; the chat seq the
    /// snapshot must start after.
    pub fn hold(&self) -> u64 {
        match self.outbox() {
            Some(mut out) => {
                if out.phase == Phase::Lagged {
                    out.phase = Phase::Holding;
                }
                out.last_seq
            }
            None => 0,
        }
    }

    /// Sends a snapshot (welcome or resync) covering chat up to `seq`, ahead of the room
    /// frames held meanwhile (minus the chat it already holds), and opens the flow. True
    /// when bytes are still waiting for the socket, so the session should flush.
    pub fn open(&self, snapshot: Bytes, seq: u64) -> Result<bool, Closed> {
        let Some(mut out) = self.outbox() else {
            return Err(Closed);
        };
        match out.phase {
            Phase::Closed => return Err(Closed),
            Phase::Holding => out.phase = Phase::Open,
            // Lagged while holding: the snapshot still goes, then another resync follows.
            Phase::Lagged | Phase::Open | Phase::Closing { .. } => {}
        }
        let head = out.front_slot();
        let mut i = 0;
        out.queue.retain(|q| {
            let keep = i < head || q.seq == 0 || q.seq > seq;
            i += 1;
            keep
        });
        out.room_frames = out.queue.iter().filter(|q| q.room).count();
        out.own_bytes = out
            .queue
            .iter()
            .filter(|q| !q.room)
            .map(|q| q.bytes.len())
            .sum::<usize>()
            + snapshot.len();
        out.queue.insert(
            head,
            Queued {
                bytes: snapshot,
                seq: 0,
                room: false,
            },
        );
        out.last_seq = out.last_seq.max(seq);
        if out.writes_now() {
            self.write_queued(&mut out);
        }
        if out.phase == Phase::Closed {
            return Err(Closed);
        }
        Ok(!out.queue.is_empty())
    }

    /// The fan-out lost frames this viewer needed (its shard fell behind): resync it.
    pub fn lag(&self) {
        if let Some(mut out) = self.outbox() {
            if !matches!(out.phase, Phase::Holding | Phase::Open) {
                return;
            }
            out.drop_room_frames();
            out.phase = Phase::Lagged;
        }
        self.wake.notify_one();
    }

    /// Asks the session to close with `code` (the first reason wins).
    pub fn close(&self, code: u16, reason: &'static str) {
        if let Some(mut out) = self.outbox() {
            if matches!(out.phase, Phase::Closing { .. } | Phase::Closed) {
                return;
            }
            out.phase = Phase::Closing { code, reason };
        }
        self.wake.notify_one();
    }

    /// Nothing more is written (the socket failed or the session is over).
    pub fn set_closed(&self) {
        if let Some(mut out) = self.outbox() {
            out.phase = Phase::Closed;
            out.queue.clear();
            out.room_frames = 0;
            out.own_bytes = 0;
        }
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.phase(), Phase::Closed | Phase::Closing { .. })
    }

    /// The client sent something: it is alive.
    pub fn heard(&self) {
        self.heard.store(clock_ms(), Ordering::Relaxed);
        self.pinged.store(false, Ordering::Relaxed);
    }

    /// Pings a connection silent for `idle`, and closes it (4000) when it stays silent for
    /// another `idle` after the ping. Called by the fan-out's periodic check.
    pub fn check_idle(&self, now_ms: u64, idle: Duration, ping: &Bytes, close_code: u16) {
        let silent = now_ms.saturating_sub(self.heard.load(Ordering::Relaxed));
        let idle = idle.as_millis() as u64;
        if silent < idle {
            return;
        }
        if !self.pinged.swap(true, Ordering::Relaxed) {
            self.send_from_outside(ping.clone());
        } else if silent >= 2 * idle {
            self.close(close_code, "idle: no answer to ping");
        }
    }
}

/// The connection is closed: nothing more can be sent on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A connection on a real loopback socket, and the client end that reads it.
    async fn pair(limits: Limits) -> (Conn, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Conn::new(server, "u1", limits), client)
    }

    fn limits() -> Limits {
        Limits {
            room_frames: 4,
            own_bytes: 1024,
        }
    }

    async fn read_exactly(client: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        buf
    }

    #[tokio::test]
    async fn holding_queues_then_the_snapshot_goes_first_without_chat_it_holds() {
        let (conn, mut client) = pair(limits()).await;
        let (chat1, chat2, other) = (
            Bytes::from_static(b"c1"),
            Bytes::from_static(b"c2"),
            Bytes::from_static(b"x"),
        );
        // While holding nothing is written.
        assert_eq!(conn.deliver(&[(&chat1, 1), (&other, 0)]), Delivered::Ok);
        assert_eq!(conn.deliver(&[(&chat2, 2)]), Delivered::Ok);
        assert!(conn.has_queued());
        // The snapshot covers chat up to seq 1: c1 is dropped, c2 and x follow it.
        assert_eq!(conn.open(Bytes::from_static(b"W"), 1), Ok(false));
        assert_eq!(read_exactly(&mut client, 4).await, b"Wxc2");
        assert_eq!(conn.last_seq(), 2);
        // Chat at or below what the viewer has is skipped from now on.
        conn.deliver(&[(&chat1, 1), (&other, 0)]);
        assert_eq!(read_exactly(&mut client, 1).await, b"x");
        assert!(!conn.has_queued(), "an open connection writes at once");
    }

    #[tokio::test]
    async fn corked_replies_go_ahead_of_room_frames() {
        let (conn, mut client) = pair(limits()).await;
        conn.open(Bytes::from_static(b"W"), 0).unwrap();
        conn.cork();
        conn.deliver(&[(&Bytes::from_static(b"r"), 0)]);
        assert_eq!(conn.send(Bytes::from_static(b"A")), Ok(false));
        assert_eq!(conn.send(Bytes::from_static(b"B")), Ok(false));
        assert!(!conn.uncork(), "everything fits in the socket");
        assert_eq!(read_exactly(&mut client, 4).await, b"WABr");
    }

    #[tokio::test]
    async fn too_far_behind_is_lagged_and_keeps_only_own_replies() {
        let (conn, _client) = pair(limits()).await;
        conn.cork();
        conn.send(Bytes::from_static(b"reply")).unwrap();
        let frame = Bytes::from_static(b"f");
        for _ in 0..4 {
            conn.deliver(&[(&frame, 0)]);
        }
        assert_eq!(conn.phase(), Phase::Holding);
        conn.deliver(&[(&frame, 0)]);
        assert_eq!(
            conn.phase(),
            Phase::Lagged,
            "the fifth frame is one too many"
        );
        // Lagged: room frames are dropped, the reply stays; a resync reopens the flow.
        conn.deliver(&[(&frame, 0)]);
        assert_eq!(conn.hold(), 0);
        assert_eq!(conn.phase(), Phase::Holding);
        assert_eq!(conn.open(Bytes::from_static(b"R"), 0), Ok(true));
    }

    #[tokio::test]
    async fn a_socket_that_does_not_drain_keeps_frames_queued_and_flush_gives_up() {
        let (conn, client) = pair(Limits {
            room_frames: 1 << 20,
            own_bytes: 1 << 30,
        })
        .await;
        conn.open(Bytes::new(), 0).unwrap();
        // The client never reads: kernel buffers fill, then the outbox holds the rest.
        let big = Bytes::from(vec![b'x'; 64 * 1024]);
        for _ in 0..200 {
            conn.deliver(&[(&big, 0)]);
        }
        assert!(conn.has_queued());
        assert_eq!(
            conn.flush(Duration::from_millis(200)).await,
            Err(Closed),
            "a socket that does not move within the timeout is given up"
        );
        assert_eq!(conn.phase(), Phase::Closed);
        assert_eq!(conn.deliver(&[(&big, 0)]), Delivered::Gone);
        drop(client);
    }

    #[tokio::test]
    async fn closing_is_sticky_and_the_first_reason_wins() {
        let (conn, _client) = pair(limits()).await;
        conn.open(Bytes::new(), 0).unwrap();
        conn.close(4003, "banned");
        conn.close(1001, "shutdown");
        assert_eq!(
            conn.phase(),
            Phase::Closing {
                code: 4003,
                reason: "banned"
            }
        );
        assert_eq!(
            conn.deliver(&[(&Bytes::from_static(b"f"), 0)]),
            Delivered::Gone
        );
        // The session's own close frame can still go out.
        assert_eq!(conn.send(Bytes::from_static(b"bye")), Ok(false));
    }
}
