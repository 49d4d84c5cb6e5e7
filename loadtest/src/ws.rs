//! WebSocket client side on tokio-tungstenite, for the sockets that send (the publisher, the
//! chatter, the `claims` scenario's sockets): connect to a livedrop room and wait for the
//! `welcome` frame, or connect to a plain broadcast peer (`/`, no token, no welcome); small
//! buffers so many client sockets stay cheap. It also owns what every client socket shares
//! with the viewers' lean socket (`viewer_socket`): the TCP connect (optionally from a chosen
//! loopback source address, so many sockets do not exhaust one address's ephemeral ports,
//! with `TCP_NODELAY`), the room's path and the `welcome` check.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

use crate::http::Target;

pub type Socket = WebSocketStream<TcpStream>;

/// The path of a plain broadcast peer's WebSocket.
pub const PLAIN_PATH: &str = "/";

fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
}

/// The path of `room`'s WebSocket, as the token's user.
pub fn room_path(room: &str, token: &str) -> String {
    format!("/ws/rooms/{room}?token={token}")
}

/// Checks that a livedrop room's first text frame is its `welcome`; the error shows what
/// came instead.
pub fn check_welcome(text: &str) -> anyhow::Result<()> {
    if text.starts_with("{\"type\":\"welcome\"") {
        return Ok(());
    }
    bail!(
        "expected a welcome frame, got {}",
        text.get(..200).unwrap_or(text)
    )
}

/// Opens `/ws/rooms/{room}` as the token's user and reads up to the `welcome` frame.
/// `source` binds the client end to that loopback address first.
pub async fn connect(
    target: &Target,
    room: &str,
    token: &str,
    source: Option<IpAddr>,
) -> anyhow::Result<Socket> {
    let mut ws = open(target, &room_path(room, token), source).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return check_welcome(t.as_str()).map(|()| ws),
            Some(Ok(Message::Close(c))) => bail!("closed before welcome: {c:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e).context("reading welcome"),
            None => bail!("closed before welcome"),
        }
    }
}

/// Opens `ws://TARGET/` on a plain broadcast peer: no token, no welcome frame.
pub async fn connect_plain(target: &Target, source: Option<IpAddr>) -> anyhow::Result<Socket> {
    open(target, PLAIN_PATH, source).await
}

/// TCP connect to the target (from `source` when given), with `TCP_NODELAY`.
pub async fn tcp_connect(target: &Target, source: Option<IpAddr>) -> anyhow::Result<TcpStream> {
    let stream = match source {
        Some(ip) => {
            let socket = if ip.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            socket
                .bind(SocketAddr::new(ip, 0))
                .with_context(|| format!("bind {ip}"))?;
            socket.connect(target.addr).await.context("connect")?
        }
        None => TcpStream::connect(target.addr).await.context("connect")?,
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// TCP connect (from `source` when given) and the WebSocket handshake on `path_and_query`.
async fn open(
    target: &Target,
    path_and_query: &str,
    source: Option<IpAddr>,
) -> anyhow::Result<Socket> {
    let stream = tcp_connect(target, source).await?;
    let url = target.ws_url(path_and_query);
    let (ws, _) = client_async_with_config(url, stream, Some(config()))
        .await
        .context("websocket handshake")?;
    Ok(ws)
}
