//! Starts a real livedrop server in-process on port 0, on the memory engine or on a real
//! `redis-server` started for the test, and gives tests real HTTP and WebSocket clients.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use livedrop::auth::{Authenticator, Role};
use livedrop::config::Config;
use livedrop::state::AppState;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::redis_server::RedisServer;

pub const SECRET: &str = "test-secret-0123456789abcdef";

/// Which store engine a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Memory,
    Redis,
}

/// A running server and what the test needs to talk to it.
pub struct TestServer {
    pub addr: SocketAddr,
    pub state: AppState,
    pub http: reqwest::Client,
    auth: Authenticator,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    pub redis: Option<RedisServer>,
}

impl TestServer {
    pub async fn start(engine: Engine) -> Self {
        Self::start_with(engine, |_| {}).await
    }

    /// Starts a server after letting the test adjust the configuration.
    pub async fn start_with(engine: Engine, adjust: impl FnOnce(&mut Config)) -> Self {
        let redis = match engine {
            Engine::Memory => None,
            Engine::Redis => Some(RedisServer::start()),
        };
        let mut config = Config {
            jwt_secret: Some(SECRET.into()),
            redis_url: redis.as_ref().map(|r| r.url()),
            no_demo: true,
            conflate_ms: 50,
            sweep_ms: 100,
            shutdown_grace_secs: 5,
            // The test machine is shared with builds; outage tests lower this themselves.
            redis_timeout_ms: 10_000,
            // Thousands of test clients share one loopback address; the trust tests turn
            // this off to exercise the limits.
            limit_exempt: vec!["127.0.0.1".into()],
            ..Config::default()
        };
        adjust(&mut config);
        // The server's own bind (listen backlog and all), on a free port.
        let listener = livedrop::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = livedrop::build_state(config).await.unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(livedrop::serve_state(state.clone(), listener, async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            state,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .build()
                .unwrap(),
            auth: Authenticator::new(SECRET.as_bytes()),
            stop: Some(stop),
            handle: Some(handle),
            redis,
        }
    }

    /// Triggers shutdown and waits for `serve` to return.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(h) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(20), h)
                .await
                .expect("server did not stop in time")
                .unwrap()
                .unwrap();
        }
    }

    pub fn token(&self, sub: &str, role: Role) -> String {
        self.auth
            .issue(sub, &format!("{sub} name"), role, 3600)
            .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self, room: &str, token: &str) -> String {
        format!("ws://{}/ws/rooms/{room}?token={token}", self.addr)
    }

    /// Creates a room owned by `host`.
    pub async fn create_room(&self, id: &str, host: &str) {
        let res = self
            .http
            .post(self.url("/api/rooms"))
            .bearer_auth(self.token(host, Role::Host))
            .json(&json!({"id": id, "title": format!("room {id}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
    }

    /// Creates a drop in `room` (owned by `host`) from a JSON body; returns the drop JSON.
    pub async fn create_drop(&self, room: &str, host: &str, body: Value) -> Value {
        let res = self
            .http
            .post(self.url(&format!("/api/rooms/{room}/drops")))
            .bearer_auth(self.token(host, Role::Host))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
        res.json().await.unwrap()
    }

    /// An HTTP call without a body as `sub` with `role`: the status and the JSON body
    /// (`Null` when there is none).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: impl AsRef<str>,
        sub: &str,
        role: Role,
    ) -> (u16, Value) {
        self.call_with(method, path, sub, role, None).await
    }

    /// [`Self::call`] with an optional JSON body.
    pub async fn call_with(
        &self,
        method: reqwest::Method,
        path: impl AsRef<str>,
        sub: &str,
        role: Role,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, self.url(path.as_ref()))
            .bearer_auth(self.token(sub, role));
        if let Some(body) = body {
            req = req.json(body);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let res = self.http.get(self.url(path)).send().await.unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// A drop's counters `(total, remaining, reserved, sold)` from `GET /api/drops/{drop}`.
    pub async fn levels(&self, drop: &str) -> (u64, u64, u64, u64) {
        let (status, d) = self.get_json(&format!("/api/drops/{drop}")).await;
        assert_eq!(status, 200, "{d}");
        let n = |k: &str| d[k].as_u64().unwrap();
        (n("total"), n("remaining"), n("reserved"), n("sold"))
    }

    /// How many entries of `op` the drop's ledger holds, read as its owner `host`.
    pub async fn ledger_ops(&self, drop: &str, host: &str, op: &str) -> usize {
        let (status, body) = self
            .call(
                reqwest::Method::GET,
                format!("/api/drops/{drop}/ledger"),
                host,
                Role::Host,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["op"] == op)
            .count()
    }

    /// Connects a viewer and reads its welcome frame.
    pub async fn viewer(&self, room: &str, sub: &str) -> (Viewer, Value) {
        self.viewer_url(&self.ws_url(room, &self.token(sub, Role::Viewer)))
            .await
    }

    pub async fn viewer_url(&self, url: &str) -> (Viewer, Value) {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let mut v = Viewer { ws };
        let welcome = v.recv().await.expect("welcome");
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        (v, welcome)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A WebSocket viewer.
pub struct Viewer {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What a viewer read: a JSON frame, a close (with code), or the end of the stream.
#[derive(Debug)]
pub enum Received {
    Frame(Value),
    Close(Option<u16>),
    End,
}

impl Viewer {
    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_raw(&mut self, m: Message) -> bool {
        self.ws.send(m).await.is_ok()
    }

    /// The next frame, close, or end, within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Received> {
        loop {
            let m = match tokio::time::timeout(wait, self.ws.next()).await {
                Err(_) => return None,
                Ok(m) => m,
            };
            return Some(match m {
                None | Some(Err(_)) => Received::End,
                Some(Ok(Message::Text(t))) => Received::Frame(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Close(f))) => {
                    Received::Close(f.map(|f: CloseFrame| u16::from(f.code)))
                }
                Some(Ok(_)) => continue,
            });
        }
    }

    /// The next JSON frame within 10 s.
    pub async fn recv(&mut self) -> Option<Value> {
        match self.next_within(Duration::from_secs(10)).await {
            Some(Received::Frame(v)) => Some(v),
            _ => None,
        }
    }

    /// Reads until a frame of `ty` arrives (within 10 s), skipping others.
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_within(left).await {
                Some(Received::Frame(v)) if v["type"] == ty => return v,
                Some(Received::Frame(_)) => continue,
                other => panic!("waiting for {ty}: got {other:?}"),
            }
        }
    }

    /// Reads until the stream closes; returns the close code.
    pub async fn recv_close(&mut self) -> Option<u16> {
        loop {
            match self.next_within(Duration::from_secs(10)).await {
                Some(Received::Frame(_)) => continue,
                Some(Received::Close(code)) => return code,
                Some(Received::End) => return None,
                None => panic!("no close within 10 s"),
            }
        }
    }
}

/// Runs a test body once per engine.
#[macro_export]
macro_rules! both_engines {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn memory() {
                ($body)(Engine::Memory).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn redis() {
                ($body)(Engine::Redis).await
            }
        }
    };
}

/// Reads a drop's counters every 5 ms while a test runs, asserting conservation (and so
/// that no more than the stock is ever reserved or sold) in every sample.
pub struct ConservationSampler {
    running: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: JoinHandle<usize>,
}

impl ConservationSampler {
    pub fn start(srv: std::sync::Arc<TestServer>, drop: &str) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let running = std::sync::Arc::new(AtomicBool::new(true));
        let (flag, drop) = (running.clone(), drop.to_string());
        let handle = tokio::spawn(async move {
            let mut samples = 0;
            while flag.load(Ordering::Acquire) {
                let (t, r, res, s) = srv.levels(&drop).await;
                assert_eq!(r + res + s, t, "conservation broke mid-run");
                samples += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            samples
        });
        Self { running, handle }
    }

    /// Stops sampling; returns how many samples were taken.
    pub async fn stop(self) -> usize {
        self.running
            .store(false, std::sync::atomic::Ordering::Release);
        self.handle.await.unwrap()
    }
}
