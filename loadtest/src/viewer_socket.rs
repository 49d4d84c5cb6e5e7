//! The viewers' lean WebSocket client, on the raw `TcpStream`: the HTTP/1.1 upgrade done by
//! hand (bytes read past the response head are kept: they are the first frames), the
//! `welcome` check for livedrop rooms, then a read loop that takes whatever the socket holds
//! in one `read` and hands every complete text frame in it to the viewer as a slice of the
//! read buffer (parsing is `frames`'). Per delivery the load generator pays one wake-up, one
//! `read` and a few comparisons — no lock, no allocation and no stop-signal poll per frame —
//! so its own CPU, shared with the server under test, inflates the fan-out latency it
//! measures as little as it can. The sockets that mostly send (the publisher, the chatter,
//! the `claims` scenario) stay on tokio-tungstenite (`ws`).

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::audience::ChatProbe;
use crate::frames::{self, Frame, FrameReader};
use crate::http::Target;
use crate::ws;

/// The longest response head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// The longest wait for the close frame to go out when a viewer leaves.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// One viewer's socket: the stream, its incoming frames and the frames it has to send.
pub struct ViewerSocket {
    stream: TcpStream,
    frames: FrameReader,
    /// Frames to send: the pongs queued while parsing, a `claim`, the final close.
    out: Vec<u8>,
    /// Frames may be buffered from the handshake: hand them out before the first read.
    drain_first: bool,
}

/// Opens `/ws/rooms/{room}` as the token's user and reads up to the `welcome` frame (what
/// follows it stays buffered for the viewer). `source` binds the client end to that
/// loopback address first.
pub async fn connect(
    target: &Target,
    room: &str,
    token: &str,
    source: Option<IpAddr>,
) -> anyhow::Result<ViewerSocket> {
    let mut socket = ViewerSocket::open(target, &ws::room_path(room, token), source).await?;
    socket.await_welcome().await?;
    Ok(socket)
}

/// Opens `ws://TARGET/` on a plain broadcast peer: no token, no welcome frame.
pub async fn connect_plain(
    target: &Target,
    source: Option<IpAddr>,
) -> anyhow::Result<ViewerSocket> {
    ViewerSocket::open(target, ws::PLAIN_PATH, source).await
}

/// How a socket's end is counted (`ChatProbe::note_close`), as it always was: `close CODE`
/// (an empty code when the close frame had none).
fn close_reason(code: Option<u16>) -> String {
    format!("close {}", code.map(|c| c.to_string()).unwrap_or_default())
}

impl ViewerSocket {
    /// TCP connect (from `source` when given) and the WebSocket handshake on `path_and_query`.
    async fn open(
        target: &Target,
        path_and_query: &str,
        source: Option<IpAddr>,
    ) -> anyhow::Result<Self> {
        let stream = ws::tcp_connect(target, source).await?;
        let mut socket = Self {
            stream,
            frames: FrameReader::new(),
            out: Vec::new(),
            drain_first: true,
        };
        socket
            .handshake(target, path_and_query)
            .await
            .context("websocket handshake")?;
        Ok(socket)
    }

    /// Sends the upgrade request and reads the response head, leaving what follows it in the
    /// read buffer.
    async fn handshake(&mut self, target: &Target, path_and_query: &str) -> anyhow::Result<()> {
        let key = generate_key();
        let request = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n",
            target.addr
        );
        self.stream
            .write_all(request.as_bytes())
            .await
            .map_err(WsError::Io)?;
        let head_len = loop {
            let buffered = self.frames.buffered();
            if let Some(at) = buffered.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            if buffered.len() > MAX_HEAD {
                bail!("response head longer than {MAX_HEAD} bytes");
            }
            self.fill(ProtocolError::HandshakeIncomplete).await?;
        };
        check_upgrade(&self.frames.buffered()[..head_len], &key)?;
        self.frames.consume(head_len);
        Ok(())
    }

    /// Reads up to the first text frame, which must be the room's `welcome`.
    async fn await_welcome(&mut self) -> anyhow::Result<()> {
        loop {
            match self
                .frames
                .next_frame(&mut self.out)
                .context("reading welcome")?
            {
                Some(Frame::Text(t)) => return ws::check_welcome(t),
                Some(Frame::Close(code)) => bail!("closed before welcome: {}", close_reason(code)),
                None => {
                    self.flush()
                        .await
                        .map_err(WsError::Io)
                        .context("reading welcome")?;
                    self.fill(ProtocolError::ResetWithoutClosingHandshake)
                        .await
                        .context("reading welcome")?;
                }
            }
        }
    }

    /// Waits for the socket's next bytes — one `read`, however many frames they hold — or
    /// for the run's `stop`, then hands every complete text frame to `on_text` in order and
    /// answers the pings among them. False once the run stopped or the socket ended; why it
    /// ended is counted in `probe` as `close CODE` or `error: …` (tungstenite's wording).
    pub async fn read_batch(
        &mut self,
        stop: &mut watch::Receiver<bool>,
        probe: &ChatProbe,
        mut on_text: impl FnMut(&str),
    ) -> bool {
        if !matches!(stop.has_changed(), Ok(false)) {
            return false;
        }
        if !std::mem::take(&mut self.drain_first) {
            let read = tokio::select! {
                biased;
                read = self.fill(ProtocolError::ResetWithoutClosingHandshake) => read,
                _ = stop.changed() => return false,
            };
            if let Err(e) = read {
                probe.note_close(&format!("error: {e}"));
                return false;
            }
        }
        let ended = loop {
            match self.frames.next_frame(&mut self.out) {
                Ok(Some(Frame::Text(t))) => on_text(t),
                Ok(Some(Frame::Close(code))) => break close_reason(code),
                Ok(None) => match self.flush().await {
                    Ok(()) => return true,
                    Err(e) => break format!("error: {}", WsError::Io(e)),
                },
                Err(e) => break format!("error: {e}"),
            }
        };
        probe.note_close(&ended);
        false
    }

    /// Sends one masked text frame now (a buyer's `claim`).
    pub async fn send_text(&mut self, text: &str) -> Result<(), WsError> {
        frames::encode_text(&mut self.out, text);
        self.flush().await.map_err(WsError::Io)
    }

    /// Leaves with a close frame without a status code (as tokio-tungstenite's `close` does),
    /// waiting at most `CLOSE_TIMEOUT` for it to go out, and drops the connection.
    pub async fn close(mut self) {
        frames::encode_close(&mut self.out);
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.flush()).await;
    }

    /// Writes out the frames waiting in `out`.
    async fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let written = self.stream.write_all(&self.out).await;
        self.out.clear();
        written
    }

    /// One `read` into the read buffer; the end of the stream is the error `at_eof`.
    async fn fill(&mut self, at_eof: ProtocolError) -> Result<(), WsError> {
        match self.stream.read(self.frames.spare()).await {
            Ok(0) => Err(WsError::Protocol(at_eof)),
            Ok(n) => {
                self.frames.filled(n);
                Ok(())
            }
            Err(e) => Err(WsError::Io(e)),
        }
    }
}

/// Checks a response head: `HTTP/1.1 101` with the `Sec-WebSocket-Accept` that `key` calls
/// for. Any other status is `HTTP error: CODE REASON`, as tungstenite words it.
fn check_upgrade(head: &[u8], key: &str) -> anyhow::Result<()> {
    let head = std::str::from_utf8(head).context("response head is not UTF-8")?;
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .with_context(|| format!("not an HTTP/1.1 response: {status_line:?}"))?;
    if status.split(' ').next() != Some("101") {
        bail!("HTTP error: {status}");
    }
    let accept = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|(_, value)| value.trim());
    if accept != Some(derive_accept_key(key.as_bytes()).as_str()) {
        bail!(WsError::Protocol(
            ProtocolError::SecWebSocketAcceptKeyMismatch
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use tokio::net::TcpListener;

    use super::*;

    /// A listener on a free loopback port, and the target naming it.
    async fn local_target() -> (TcpListener, Target) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let target = Target::parse(&format!("http://{addr}")).expect("target");
        (listener, target)
    }

    /// A server that answers the upgrade, then writes `wire` (unmasked server frames, raw)
    /// in one go together with the response head, and returns what the client sent after
    /// its request.
    async fn serve_once(listener: TcpListener, wire: Vec<u8>) -> Vec<u8> {
        let (mut conn, _) = listener.accept().await.expect("accept");
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\r\n\r\n") {
            match conn.read(&mut byte).await {
                Ok(1) => request.push(byte[0]),
                _ => return Vec::new(),
            }
        }
        let request = String::from_utf8_lossy(&request).to_string();
        let key = request
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .unwrap_or_default();
        let mut answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            derive_accept_key(key.as_bytes())
        )
        .into_bytes();
        answer.extend(wire);
        let _ = conn.write_all(&answer).await;
        let mut sent = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.read_to_end(&mut sent)).await;
        sent
    }

    #[tokio::test]
    async fn frames_right_after_the_head_are_read_pings_answered_and_the_close_counted() {
        let (listener, target) = local_target().await;
        let mut wire = vec![0x81, 5];
        wire.extend_from_slice(b"first");
        wire.extend_from_slice(&[0x89, 2, b'h', b'i']); // ping "hi"
        wire.extend_from_slice(&[0x81, 6]);
        wire.extend_from_slice(b"second");
        wire.extend_from_slice(&[0x88, 2, 0x0f, 0xa1]); // close 4001
        let server = tokio::spawn(serve_once(listener, wire));
        let mut socket = connect_plain(&target, None).await.expect("connect");
        let probe = Arc::new(ChatProbe::new("t", Instant::now(), "chat"));
        let (_stop_tx, mut stop) = watch::channel(false);
        let mut texts = Vec::new();
        while socket
            .read_batch(&mut stop, &probe, |t| texts.push(t.to_string()))
            .await
        {}
        socket.close().await;
        assert_eq!(texts, ["first", "second"]);
        assert_eq!(probe.closed().get("close 4001"), Some(&1));
        let sent = server.await.expect("server task");
        // The pong (masked, payload "hi"), then the close frame without a code.
        assert_eq!(&sent[..2], &[0x8a, 0x82]);
        let mask = &sent[2..6];
        assert_eq!([sent[6] ^ mask[0], sent[7] ^ mask[1]], *b"hi");
        assert_eq!(&sent[8..10], &[0x88, 0x80]);
        assert_eq!(sent.len(), 14);
    }

    #[tokio::test]
    async fn an_eof_without_close_reads_as_tungstenite_reported_it() {
        let (listener, target) = local_target().await;
        let server = tokio::spawn(async move {
            // Answers, then drops the connection without a close frame.
            let _ = tokio::time::timeout(
                Duration::from_millis(200),
                serve_once(listener, vec![0x81, 1, b'x']),
            )
            .await;
        });
        let mut socket = connect_plain(&target, None).await.expect("connect");
        let probe = ChatProbe::new("t", Instant::now(), "chat");
        let (_stop_tx, mut stop) = watch::channel(false);
        let mut n = 0;
        while socket.read_batch(&mut stop, &probe, |_| n += 1).await {}
        let _ = server.await;
        assert_eq!(n, 1);
        assert_eq!(
            probe
                .closed()
                .get("error: WebSocket protocol error: Connection reset without closing handshake"),
            Some(&1)
        );
    }

    #[tokio::test]
    async fn the_stop_signal_ends_a_waiting_read() {
        let (listener, target) = local_target().await;
        let server = tokio::spawn(serve_once(listener, Vec::new()));
        let mut socket = connect_plain(&target, None).await.expect("connect");
        let probe = ChatProbe::new("t", Instant::now(), "chat");
        let (stop_tx, mut stop) = watch::channel(false);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = stop_tx.send(true);
        });
        let started = Instant::now();
        while socket.read_batch(&mut stop, &probe, |_| {}).await {}
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(probe.closed().is_empty());
        socket.close().await;
        let _ = server.await;
    }

    #[test]
    fn the_upgrade_answer_is_checked() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\
                  sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        assert!(check_upgrade(ok.as_bytes(), key).is_ok());
        let refused = "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n";
        let e = check_upgrade(refused.as_bytes(), key)
            .err()
            .map(|e| e.to_string());
        assert_eq!(e.as_deref(), Some("HTTP error: 401 Unauthorized"));
        let wrong = "HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: nope\r\n\r\n";
        assert!(check_upgrade(wrong.as_bytes(), key).is_err());
    }
}
