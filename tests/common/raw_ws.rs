//! A bare-bones WebSocket client on a raw TCP stream: it sends any bytes (invalid UTF-8,
//! absurd length headers, fragments) and never answers pings unless told to.

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::server::TestServer;

/// A masked client frame.
pub fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n < 65536 {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    let mask = [7u8, 13, 42, 99];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// A bare-bones WebSocket client on a raw TCP stream, so any bytes can be sent.
pub struct RawWs {
    pub tcp: TcpStream,
}

impl RawWs {
    pub async fn connect(srv: &TestServer, room: &str, token: &str) -> RawWs {
        Self::connect_with(srv, room, token, &[]).await
    }

    /// Like `connect`, with `early` (e.g. frames) sent in the same write as the handshake,
    /// before the server's answer.
    pub async fn connect_with(srv: &TestServer, room: &str, token: &str, early: &[u8]) -> RawWs {
        let mut tcp = TcpStream::connect(srv.addr).await.unwrap();
        let req = format!(
            "GET /ws/rooms/{room}?token={token} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n",
            srv.addr
        );
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(early);
        tcp.write_all(&bytes).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(tcp.read_u8().await.unwrap());
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        let mut ws = RawWs { tcp };
        let (op, welcome) = ws.read_frame().await.unwrap();
        assert_eq!(op, 1);
        assert!(String::from_utf8_lossy(&welcome).contains("\"welcome\""));
        ws
    }

    /// The next server frame (opcode, payload); None when the stream ends.
    pub async fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        let wait = std::time::Duration::from_secs(10);
        tokio::time::timeout(wait, async {
            let b0 = self.tcp.read_u8().await.ok()?;
            let b1 = self.tcp.read_u8().await.ok()?;
            let len = match b1 & 0x7f {
                126 => self.tcp.read_u16().await.ok()? as usize,
                127 => self.tcp.read_u64().await.ok()? as usize,
                n => n as usize,
            };
            let mut payload = vec![0; len];
            self.tcp.read_exact(&mut payload).await.ok()?;
            Some((b0 & 0x0f, payload))
        })
        .await
        .expect("no frame within 10 s")
    }

    /// Reads until an `error`/`claim_result` frame or a close.
    pub async fn outcome(&mut self) -> Result<Value, Option<u16>> {
        loop {
            match self.read_frame().await {
                None => return Err(None),
                Some((8, p)) => return Err(p.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]))),
                Some((1, p)) => {
                    let v: Value = serde_json::from_slice(&p).unwrap();
                    if v["type"] == "error" || v["type"] == "claim_result" {
                        return Ok(v);
                    }
                }
                Some(_) => {}
            }
        }
    }
}
