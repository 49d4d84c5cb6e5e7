//! WebSocket client side: connect to a livedrop room (optionally from a chosen loopback
//! source address, so many sockets do not exhaust one address's ephemeral ports) and wait for
//! the `welcome` frame, or connect to a plain broadcast peer (`/`, no token, no welcome); small
//! buffers so thousands of client sockets stay cheap.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

use crate::http::Target;

pub type Socket = WebSocketStream<TcpStream>;

fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
}

/// Opens `/ws/rooms/{room}` as the token's user and reads up to the `welcome` frame.
/// `source` binds the client end to that loopback address first.
pub async fn connect(
    target: &Target,
    room: &str,
    token: &str,
    source: Option<IpAddr>,
) -> anyhow::Result<Socket> {
    let path = format!("/ws/rooms/{room}?token={token}");
    let mut ws = open(target, &path, source).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                if t.as_str().starts_with("{\"type\":\"welcome\"") {
                    return Ok(ws);
                }
                bail!(
                    "expected a welcome frame, got {}",
                    &t.as_str()[..t.len().min(200)]
                );
            }
            Some(Ok(Message::Close(c))) => bail!("closed before welcome: {c:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e).context("reading welcome"),
            None => bail!("closed before welcome"),
        }
    }
}

/// Opens `ws://TARGET/` on a plain broadcast peer: no token, no welcome frame.
pub async fn connect_plain(target: &Target, source: Option<IpAddr>) -> anyhow::Result<Socket> {
    open(target, "/", source).await
}

/// TCP connect (from `source` when given) and the WebSocket handshake on `path_and_query`.
async fn open(
    target: &Target,
    path_and_query: &str,
    source: Option<IpAddr>,
) -> anyhow::Result<Socket> {
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
    let url = target.ws_url(path_and_query);
    let (ws, _) = client_async_with_config(url, stream, Some(config()))
        .await
        .context("websocket handshake")?;
    Ok(ws)
}
