//! The load generator's HTTP/1.1 client, lean so that the client's CPU (which shares the
//! machine with the server under test) stays small: one keep-alive `TcpStream` per
//! `HttpClient` with `TCP_NODELAY`, reconnected after an error, a timeout or a response that
//! closes the connection, and before reuse when the server closed it while it sat idle
//! (livedrop closes keep-alive connections idle for 30 s). A request is a [`RequestTemplate`] formatted once (request line,
//! Host, Content-Type, Content-Length and body) plus the parts that change from request to
//! request — the bearer token and the `Idempotency-Key` — spliced into one reused buffer and
//! written with one `write_all`; answers are read by `http_response` into a reused buffer
//! and borrowed by the caller. It also owns `Target`, the parsed server address, which
//! refuses anything but loopback.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

pub use crate::http_response::Answer;
use crate::http_response::ResponseReader;

/// A connection idle for longer is checked before reuse: a server may have closed it (the
/// check costs a syscall, which back-to-back requests skip).
const CHECK_IDLE_AFTER: Duration = Duration::from_secs(1);

/// Largest body a claiming client accepts: every livedrop answer is far smaller.
pub const MAX_BODY: usize = 16 * 1024 * 1024;

/// The server under test: a loopback socket address.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    /// `HOST:PORT` as given, for the `Host` header.
    host: String,
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
        Ok(Self {
            addr,
            host: authority.to_string(),
        })
    }

    /// `ws://HOST:PORT` + path.
    pub fn ws_url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.addr, path_and_query)
    }
}

/// The methods the scenarios send.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    Get,
    Post,
}

impl Method {
    fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
        }
    }
}

/// The constant part of a request, formatted once and sent any number of times: request
/// line, `Host`, and for a body (or a POST) `Content-Type` and `Content-Length`, then the
/// body itself.
pub struct RequestTemplate {
    /// Request line and fixed headers, each ending in CRLF (the blank line is not included).
    head: Vec<u8>,
    body: Vec<u8>,
}

impl RequestTemplate {
    /// `method path` on `target`, with a JSON `body` when given. The path must be a plain
    /// origin-form path (no spaces or control characters).
    pub fn new(
        target: &Target,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
    ) -> anyhow::Result<Self> {
        if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()) {
            bail!("request path {path:?} is not a plain /path");
        }
        let mut head = format!(
            "{} {path} HTTP/1.1\r\nHost: {}\r\n",
            method.as_str(),
            target.host
        );
        if body.is_some() {
            head.push_str("Content-Type: application/json\r\n");
        }
        if body.is_some() || method == Method::Post {
            let len = body.map_or(0, <[u8]>::len);
            head.push_str(&format!("Content-Length: {len}\r\n"));
        }
        Ok(Self {
            head: head.into_bytes(),
            body: body.map(<[u8]>::to_vec).unwrap_or_default(),
        })
    }

    /// A request from this template, with no token and no key yet.
    pub fn request(&self) -> Request<'_> {
        Request {
            template: self,
            auth: None,
            key: None,
        }
    }
}

/// An `Authorization: Bearer …` header line, checked and formatted once per user.
pub struct Authorization {
    line: Vec<u8>,
}

impl Authorization {
    /// The header line for bearer `token` (which must be printable ASCII, as JWTs are).
    pub fn bearer(token: &str) -> anyhow::Result<Self> {
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            bail!("a bearer token must be printable ASCII without spaces");
        }
        Ok(Self {
            line: format!("Authorization: Bearer {token}\r\n").into_bytes(),
        })
    }
}

/// A run's idempotency keys, `PREFIX0`, `PREFIX1`, …: the prefix is checked and formatted
/// into a header once, and each HTTP request appends its own number, so no key is formatted
/// into a `String` on the hot path.
pub struct IdempotencyKeys {
    prefix: String,
    /// `Idempotency-Key: PREFIX`, without the number and CRLF.
    header_start: Vec<u8>,
}

impl IdempotencyKeys {
    /// Keys starting with `prefix`, which must be printable ASCII without spaces.
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        if !prefix.bytes().all(|b| b.is_ascii_graphic()) {
            bail!("idempotency key prefix {prefix:?} must be printable ASCII without spaces");
        }
        Ok(Self {
            prefix: prefix.to_string(),
            header_start: format!("Idempotency-Key: {prefix}").into_bytes(),
        })
    }

    /// Key number `n` as a string (for the WebSocket `claim` frame, which carries it in JSON).
    pub fn key(&self, n: u64) -> String {
        format!("{}{n}", self.prefix)
    }

    /// The number of a key of this run, `None` for any other key.
    pub fn number_of(&self, key: &str) -> Option<u64> {
        key.strip_prefix(self.prefix.as_str())?.parse().ok()
    }
}

/// One request to send: a template plus the per-request token and key.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    template: &'a RequestTemplate,
    auth: Option<&'a Authorization>,
    key: Option<(&'a IdempotencyKeys, u64)>,
}

impl<'a> Request<'a> {
    /// Sends the request as this user (or anonymously for `None`).
    pub fn auth(mut self, auth: Option<&'a Authorization>) -> Self {
        self.auth = auth;
        self
    }

    /// Adds `Idempotency-Key` number `n` of `keys`.
    pub fn key(mut self, keys: &'a IdempotencyKeys, n: u64) -> Self {
        self.key = Some((keys, n));
        self
    }

    /// The request's bytes, replacing what `out` held (its capacity is kept).
    fn write_into(&self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.template.head);
        if let Some(auth) = self.auth {
            out.extend_from_slice(&auth.line);
        }
        if let Some((keys, n)) = self.key {
            out.extend_from_slice(&keys.header_start);
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.template.body);
    }
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// One keep-alive connection, opened on first use and again after a failure; requests go
/// one at a time.
pub struct HttpClient {
    target: Target,
    answer_timeout: Duration,
    stream: Option<TcpStream>,
    /// When the connection last finished an answer.
    idle_since: Instant,
    /// The request being sent, reused.
    request: Vec<u8>,
    responses: ResponseReader,
}

impl HttpClient {
    /// A client whose requests fail (as `timeout`) when the whole answer takes longer than
    /// `answer_timeout`, and which refuses bodies over [`MAX_BODY`].
    pub fn new(target: Target, answer_timeout: Duration) -> Self {
        Self::with_max_body(target, answer_timeout, MAX_BODY)
    }

    /// A client accepting bodies up to `max_body` bytes (for a whole ledger, say).
    pub fn with_max_body(target: Target, answer_timeout: Duration, max_body: usize) -> Self {
        Self {
            target,
            answer_timeout,
            stream: None,
            idle_since: Instant::now(),
            request: Vec::with_capacity(1024),
            responses: ResponseReader::new(max_body),
        }
    }

    /// Sends one request and reads the whole answer. After an error or a timeout the
    /// connection is dropped (an answer may still be on its way) and the next call opens a
    /// new one; so it is after an answer that closes the connection.
    pub async fn send(&mut self, req: Request<'_>) -> anyhow::Result<Answer<'_>> {
        req.write_into(&mut self.request);
        if self.idle_since.elapsed() > CHECK_IDLE_AFTER
            && self.stream.as_ref().is_some_and(|s| !still_open(s))
        {
            self.stream = None;
        }
        let exchange = exchange(
            &self.target,
            &mut self.stream,
            &self.request,
            &mut self.responses,
        );
        match tokio::time::timeout(self.answer_timeout, exchange).await {
            Ok(Ok(answer)) => {
                if !answer.keep_alive {
                    self.stream = None;
                }
                self.idle_since = Instant::now();
                Ok(answer)
            }
            Ok(Err(e)) => {
                self.stream = None;
                Err(e)
            }
            Err(_) => {
                self.stream = None;
                bail!("timeout")
            }
        }
    }
}

/// Whether an idle keep-alive connection can take a request: nothing arrived on it (an end
/// of stream, an error or stray bytes all mean it cannot).
fn still_open(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Writes `request` on the connection (opening one if there is none) and reads its answer.
async fn exchange<'r>(
    target: &Target,
    stream: &mut Option<TcpStream>,
    request: &[u8],
    responses: &'r mut ResponseReader,
) -> anyhow::Result<Answer<'r>> {
    let stream = match stream {
        Some(s) => s,
        None => {
            let s = TcpStream::connect(target.addr).await.context("connect")?;
            s.set_nodelay(true).context("connect")?;
            responses.clear();
            stream.insert(s)
        }
    };
    stream.write_all(request).await.context("send")?;
    responses.read(stream).await
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

    fn text(req: Request<'_>) -> String {
        let mut out = b"left over".to_vec();
        req.write_into(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn requests_are_the_template_plus_token_and_key() -> anyhow::Result<()> {
        let target = Target::parse("http://127.0.0.1:8080")?;
        let claim = RequestTemplate::new(
            &target,
            Method::Post,
            "/api/drops/d/claims",
            Some(b"{\"qty\":1}"),
        )?;
        let auth = Authorization::bearer("t.o.k")?;
        let keys = IdempotencyKeys::new("k1f-")?;
        assert_eq!(
            text(claim.request().auth(Some(&auth)).key(&keys, 0)),
            "POST /api/drops/d/claims HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\
             Content-Type: application/json\r\nContent-Length: 9\r\n\
             Authorization: Bearer t.o.k\r\nIdempotency-Key: k1f-0\r\n\r\n{\"qty\":1}"
        );
        assert!(
            text(claim.request().key(&keys, u64::MAX)).contains("k1f-18446744073709551615\r\n")
        );
        let health = RequestTemplate::new(&target, Method::Get, "/healthz", None)?;
        assert_eq!(
            text(health.request()),
            "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
        );
        let join = RequestTemplate::new(&target, Method::Post, "/api/groups/g/join", None)?;
        assert!(text(join.request()).ends_with("Content-Length: 0\r\n\r\n"));
        assert!(RequestTemplate::new(&target, Method::Get, "/a b", None).is_err());
        assert!(RequestTemplate::new(&target, Method::Get, "/a\r\nX: 1", None).is_err());
        assert!(Authorization::bearer("a\r\nb").is_err());
        assert_eq!(keys.key(42), "k1f-42");
        assert_eq!(keys.number_of("k1f-42"), Some(42));
        assert_eq!(keys.number_of("k2f-42"), None);
        assert!(IdempotencyKeys::new("k 1").is_err());
        Ok(())
    }

    const SILENCE: Duration = Duration::from_millis(900);

    /// A server answering each request on a connection with the next of `answers` (none
    /// left: silence until the client has given up); it returns how many connections it
    /// accepted.
    async fn serve(
        listener: tokio::net::TcpListener,
        answers: Vec<&'static str>,
    ) -> anyhow::Result<usize> {
        use tokio::io::AsyncReadExt;
        let mut answers = answers.into_iter();
        let mut connections = 0;
        'accept: while let Ok((mut socket, _)) = listener.accept().await {
            connections += 1;
            let mut request = Vec::new();
            loop {
                let mut buf = [0u8; 1024];
                let n = socket.read(&mut buf).await?;
                if n == 0 {
                    continue 'accept;
                }
                request.extend_from_slice(&buf[..n]);
                if !request.ends_with(b"\r\n\r\n") {
                    continue;
                }
                request.clear();
                let Some(answer) = answers.next() else {
                    tokio::time::sleep(SILENCE).await;
                    return Ok(connections);
                };
                socket.write_all(answer.as_bytes()).await?;
                if answer.contains("Connection: close") {
                    continue 'accept;
                }
            }
        }
        Ok(connections)
    }

    #[tokio::test]
    async fn the_client_keeps_its_connection_and_reopens_it_when_it_must() -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let target = Target::parse(&format!("http://{}", listener.local_addr()?))?;
        let server = tokio::spawn(serve(
            listener,
            vec![
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbye",
                "HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nagain",
            ],
        ));
        let health = RequestTemplate::new(&target, Method::Get, "/healthz", None)?;
        let mut client = HttpClient::new(target, SILENCE / 3);
        let mut seen = Vec::new();
        for _ in 0..3 {
            let a = client.send(health.request()).await?;
            seen.push((a.status, String::from_utf8_lossy(a.body).into_owned()));
        }
        let want = [(200, "ok"), (200, "bye"), (201, "again")].map(|(s, b)| (s, b.to_string()));
        assert_eq!(seen, want);
        // No answer left: the request times out and the connection is given up.
        let late = client
            .send(health.request())
            .await
            .err()
            .map(|e| e.to_string());
        assert_eq!(late.as_deref(), Some("timeout"));
        assert!(client.stream.is_none());
        assert_eq!(server.await??, 2);
        Ok(())
    }

    /// A server that closed a kept-alive connection while it sat idle (as livedrop does
    /// after 30 s) costs the next request nothing: the client sees the close and reconnects.
    #[tokio::test]
    async fn an_idle_connection_the_server_closed_is_replaced() -> anyhow::Result<()> {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let target = Target::parse(&format!("http://{}", listener.local_addr()?))?;
        let server = tokio::spawn(async move {
            for body in ["one", "two"] {
                let (mut socket, _) = listener.accept().await?;
                let mut buf = [0u8; 1024];
                let _ = socket.read(&mut buf).await?;
                let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n{body}");
                socket.write_all(answer.as_bytes()).await?;
                // Closed without `Connection: close`, as an idle timeout closes it.
            }
            anyhow::Ok(())
        });
        let health = RequestTemplate::new(&target, Method::Get, "/healthz", None)?;
        let mut client = HttpClient::new(target, SILENCE);
        assert_eq!(client.send(health.request()).await?.body, b"one");
        tokio::time::sleep(CHECK_IDLE_AFTER + Duration::from_millis(200)).await;
        assert_eq!(client.send(health.request()).await?.body, b"two");
        server.await??;
        Ok(())
    }
}
