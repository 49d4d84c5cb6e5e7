//! A small HTTP/1.1 client on hyper's connection API: one keep-alive connection per
//! `HttpClient`, reconnected after an error, with `TCP_NODELAY`. It also owns `Target`, the
//! parsed server address, which refuses anything but loopback.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The server under test: a loopback socket address.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    host: HeaderValue,
}

impl Target {
    /// Parses `http://HOST:PORT` (a trailing `/` is allowed). Only loopback hosts pass.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("http://")
            .context("--target must start with http://")?;
        let authority = rest.trim_end_matches('/');
        if authority.contains('/') {
            bail!("--target must be http://HOST:PORT without a path");
        }
        let addr: SocketAddr = match authority.strip_prefix("localhost:") {
            Some(port) => SocketAddr::new(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                port.parse().context("bad port in --target")?,
            ),
            None => authority
                .parse()
                .with_context(|| format!("--target {url:?}: expected http://IP:PORT"))?,
        };
        if !addr.ip().is_loopback() {
            bail!(
                "--target {url:?} is not a loopback address: the loadtest only targets 127.0.0.0/8 or ::1"
            );
        }
        let host = HeaderValue::from_str(authority).context("bad --target host")?;
        Ok(Self { addr, host })
    }

    /// `ws://HOST:PORT` + path.
    pub fn ws_url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.addr, path_and_query)
    }
}

/// An answer: status and whole body.
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

/// One keep-alive connection, opened on first use and again after a failure.
pub struct HttpClient {
    target: Target,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl HttpClient {
    pub fn new(target: Target) -> Self {
        Self {
            target,
            sender: None,
        }
    }

    async fn connect(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let stream = TcpStream::connect(self.target.addr)
            .await
            .context("connect")?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .context("http handshake")?;
        tokio::spawn(async move {
            // Ends when the server closes or the sender is dropped; errors show up there.
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Builds a request for this target: Host, optional bearer token and JSON body.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        auth: Option<&HeaderValue>,
        body: Option<Bytes>,
    ) -> anyhow::Result<Request<Full<Bytes>>> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.target.host.clone());
        if let Some(a) = auth {
            b = b.header(AUTHORIZATION, a.clone());
        }
        let body = match body {
            Some(bytes) => {
                b = b.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                bytes
            }
            None => Bytes::new(),
        };
        Ok(b.body(Full::new(body))?)
    }

    /// Sends one request and reads the whole answer. After an error the connection is
    /// dropped and the next call opens a new one.
    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> anyhow::Result<Answer> {
        let result = self.send_inner(req).await;
        if result.is_err() {
            self.sender = None;
        }
        result
    }

    async fn send_inner(&mut self, req: Request<Full<Bytes>>) -> anyhow::Result<Answer> {
        let sender = match &mut self.sender {
            Some(s) => s,
            None => self.sender.insert(self.connect().await?),
        };
        sender.ready().await.context("connection not ready")?;
        let resp = sender.send_request(req).await.context("request")?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .context("reading body")?
            .to_bytes();
        Ok(Answer { status, body })
    }
}

/// `Bearer TOKEN` as a header value.
pub fn bearer(token: &str) -> anyhow::Result<HeaderValue> {
    Ok(HeaderValue::from_str(&format!("Bearer {token}"))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets() {
        assert!(Target::parse("http://127.0.0.1:8080").is_ok());
        assert!(Target::parse("http://127.0.0.9:8080/").is_ok());
        assert!(Target::parse("http://localhost:1").is_ok());
        assert!(Target::parse("http://[::1]:8080").is_ok());
        assert!(Target::parse("http://10.0.0.1:8080").is_err());
        assert!(Target::parse("http://192.168.1.1:80").is_err());
        assert!(Target::parse("https://127.0.0.1:80").is_err());
        assert!(Target::parse("http://127.0.0.1:80/x").is_err());
    }
}
