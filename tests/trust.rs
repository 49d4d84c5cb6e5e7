//! Trust and abuse over real sockets: rate limits on governor's fake clock (no sleeps),
//! connection caps, the Origin allowlist, and moderation (rules, deletes, mutes, slow mode,
//! bans that close sockets and refuse claims) on both engines.

mod common;

use std::time::Duration;

use common::probe::{request, ws_refusal};
use common::raw_ws::RawWs;
use common::server::{Engine, TestServer};
use governor::clock::FakeRelativeClock;
use livedrop::auth::Role;
use serde_json::{Value, json};

fn flash(id: &str, stock: u64) -> Value {
    json!({"id": id, "sku":"S","title":"T","price":1,"stock":stock,"per_user_limit":100,"kind":"flash"})
}

async fn claim(
    srv: &TestServer,
    user: &str,
    drop: &str,
    key: &str,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let token = srv.token(user, Role::Viewer);
    let path = format!("/api/drops/{drop}/claims");
    let res = srv
        .http
        .post(srv.url(&path))
        .bearer_auth(token)
        .header("Idempotency-Key", key)
        .json(&json!({"qty": 1}))
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    (status, res.json().await.unwrap_or(Value::Null), headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limits_refuse_clearly_and_refill_on_the_clock() {
    let clock = FakeRelativeClock::default();
    let fake = clock.clone();
    let srv = TestServer::start_with(Engine::Memory, move |c| {
        c.limit_exempt = vec!["none".into()];
        c.limit_clock = Some(fake);
        c.chat_rate = "2/10s".parse().unwrap();
        c.like_rate = "1/s".parse().unwrap();
        c.claim_rate = "2/s".parse().unwrap();
        c.drop_claim_rate = "3/s".parse().unwrap();
    })
    .await;
    srv.create_room("r", "host").await;
    srv.create_drop("r", "host", flash("d", 100)).await;

    // Chat: two per 10 s, then `rate_limited` with the wait; the clock refills it.
    let (mut v, _) = srv.viewer("r", "alice").await;
    for i in 0..2 {
        v.send(json!({"type":"chat","text": format!("m{i}")})).await;
        v.recv_type("chat").await;
    }
    v.send(json!({"type":"chat","text":"m2"})).await;
    let e = v.recv_type("error").await;
    assert_eq!(
        (e["code"].as_str(), e["retry_after"].as_u64()),
        (Some("rate_limited"), Some(5))
    );
    // Likes are limited separately.
    v.send(json!({"type":"like"})).await;
    v.send(json!({"type":"like"})).await;
    assert_eq!(v.recv_type("error").await["code"], "rate_limited");
    clock.advance(Duration::from_secs(5));
    v.send(json!({"type":"chat","text":"m3"})).await;
    assert_eq!(v.recv_type("chat").await["text"], "m3");

    // Claims per user over HTTP: 429 with Retry-After and the RateLimit headers.
    assert_eq!(claim(&srv, "u1", "d", "k1").await.0, 201);
    assert_eq!(claim(&srv, "u1", "d", "k2").await.0, 201);
    let (status, body, h) = claim(&srv, "u1", "d", "k3").await;
    assert_eq!((status, body["code"].as_str()), (429, Some("rate_limited")));
    assert_eq!(h["retry-after"], "1");
    assert_eq!(h["ratelimit-policy"], "\"claims\";q=2;w=1");
    assert_eq!(h["ratelimit"], "\"claims\";r=0;t=1");
    // Per drop: three admitted per second whoever asks (u1's refusal did not count).
    assert_eq!(claim(&srv, "u2", "d", "k1").await.0, 201);
    let (status, _, h) = claim(&srv, "u3", "d", "k1").await;
    assert_eq!(status, 429);
    assert_eq!(h["ratelimit-policy"], "\"drop_claims\";q=3;w=1");
    // Over the WebSocket the same refusal is a claim_result.
    v.send(json!({"type":"claim","drop":"d","qty":1,"key":"w1"}))
        .await;
    let r = v.recv_type("claim_result").await;
    assert_eq!(r["code"], "rate_limited");
    clock.advance(Duration::from_secs(1));
    assert_eq!(claim(&srv, "u3", "d", "k1").await.0, 201);
    let (_, d) = srv.get_json("/api/drops/d").await;
    assert_eq!(d["reserved"], 4, "refused claims reserved nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_ip_limits_and_connection_caps() {
    let clock = FakeRelativeClock::default();
    let fake = clock.clone();
    let srv = TestServer::start_with(Engine::Memory, move |c| {
        c.limit_exempt = vec!["none".into()];
        c.limit_clock = Some(fake);
        c.http_rate = "40/m".parse().unwrap();
        c.ws_connect_rate = "4/m".parse().unwrap();
        c.max_conns_per_ip = 3;
        c.max_conns_per_user = 1;
    })
    .await;
    srv.create_room("r", "host").await;
    // Per-user cap: a second socket of the same user is refused (429), a different user is not.
    let (_a, _) = srv.viewer("r", "a").await;
    let url_a2 = srv.ws_url("r", &srv.token("a", Role::Viewer));
    assert_eq!(ws_refusal(&url_a2, None).await, Some(429));
    let (_b, _) = srv.viewer("r", "b").await;
    let (c, _) = srv.viewer("r", "c").await;
    // Per-IP cap: three open, the fourth refused; closing one frees a slot.
    let url_d = srv.ws_url("r", &srv.token("d", Role::Viewer));
    clock.advance(Duration::from_secs(60));
    assert_eq!(ws_refusal(&url_d, None).await, Some(429));
    drop(c);
    let mut freed = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await; // the server notices the close
        if ws_refusal(&url_d, None).await.is_none() {
            freed = true;
            break;
        }
        clock.advance(Duration::from_secs(60));
    }
    assert!(freed, "closing a socket did not free its slot");
    // Connects per IP: four a minute, counted before the token is even read.
    clock.advance(Duration::from_secs(60));
    let bad = format!("ws://{}/ws/rooms/r?token=garbage", srv.addr);
    for _ in 0..4 {
        assert_eq!(ws_refusal(&bad, None).await, Some(401));
    }
    assert_eq!(ws_refusal(&bad, None).await, Some(429));

    // HTTP per IP: 40 a minute, then 429 with headers; the clock refills it.
    clock.advance(Duration::from_secs(600));
    let mut refused = None;
    for _ in 0..41 {
        let res = srv.http.get(srv.url("/healthz")).send().await.unwrap();
        if res.status() == 429 {
            refused = Some(res);
            break;
        }
    }
    let res = refused.expect("the 41st request within a minute is refused");
    assert_eq!(res.headers()["ratelimit-policy"], "\"http\";q=40;w=60");
    assert!(res.headers().contains_key("retry-after"));
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], "rate_limited");
    clock.advance(Duration::from_secs(2));
    assert_eq!(srv.get_json("/healthz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn origin_allowlist_and_no_compression() {
    let srv = TestServer::start_with(Engine::Memory, |c| {
        c.allowed_origins = vec!["https://shop.example".into()];
    })
    .await;
    srv.create_room("r", "host").await;
    let url = srv.ws_url("r", &srv.token("v", Role::Viewer));
    assert_eq!(
        ws_refusal(&url, Some("https://evil.example")).await,
        Some(403)
    );
    assert_eq!(ws_refusal(&url, Some("null")).await, Some(403));
    assert_eq!(ws_refusal(&url, Some("https://shop.example")).await, None);
    let own = format!("http://{}", srv.addr);
    assert_eq!(ws_refusal(&url, Some(&own)).await, None);
    assert_eq!(
        ws_refusal(&url, None).await,
        None,
        "no Origin: judged by token"
    );
    // permessage-deflate is never negotiated.
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert(
        "sec-websocket-extensions",
        "permessage-deflate".parse().unwrap(),
    );
    let (_ws, res) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert!(!res.headers().contains_key("sec-websocket-extensions"));
}

async fn host_call(
    srv: &TestServer,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let token = srv.token("host", Role::Host);
    let (s, b, _) = request(srv, method, path, Some(&token), body).await;
    (s, b)
}

both_engines!(moderation_end_to_end, |engine| async move {
    let srv = TestServer::start_with(engine, |c| c.block_links = true).await;
    srv.create_room("r", "host").await;
    srv.create_drop("r", "host", flash("d", 10)).await;
    let (mut alice, _) = srv.viewer("r", "alice").await;
    let (mut bob, _) = srv.viewer("r", "bob").await;

    let (s, _) = host_call(
        &srv,
        "PUT",
        "/api/rooms/r/rules",
        Some(json!({"banned_words":["scam"]})),
    )
    .await;
    assert_eq!(s, 204);
    let (s, b) = host_call(
        &srv,
        "PUT",
        "/api/rooms/r/rules",
        Some(json!({"slow_mode_secs": 999_999})),
    )
    .await;
    assert_eq!((s, b["code"].as_str()), (422, Some("bad_rules")));

    // Banned words and links: blocked_content; nothing is posted.
    for text in [
        "great SCAM deal",
        "buy at https://x.example",
        "visit cheap-kicks.shop now",
    ] {
        alice.send(json!({"type":"chat","text":text})).await;
        assert_eq!(
            alice.recv_type("error").await["code"],
            "blocked_content",
            "{text}"
        );
    }
    alice.send(json!({"type":"chat","text":"hello"})).await;
    let msg = bob.recv_type("chat").await;
    assert_eq!(
        (msg["text"].as_str(), msg["seq"].as_u64()),
        (Some("hello"), Some(1))
    );

    // Delete: the room is told, and later welcomes no longer show it.
    let id = msg["id"].as_str().unwrap().to_string();
    assert_eq!(
        host_call(&srv, "DELETE", &format!("/api/rooms/r/chat/{id}"), None)
            .await
            .0,
        204
    );
    assert_eq!(bob.recv_type("chat_deleted").await["id"], id);
    let (_, welcome) = srv.viewer("r", "carol").await;
    assert!(welcome["chat"].as_array().unwrap().is_empty(), "{welcome}");

    // Mute: refused with the time left.
    let mute = json!({"user":"bob","secs":60});
    assert_eq!(
        host_call(&srv, "POST", "/api/rooms/r/mutes", Some(mute))
            .await
            .0,
        204
    );
    bob.send(json!({"type":"chat","text":"let me talk"})).await;
    let e = bob.recv_type("error").await;
    assert_eq!(e["code"], "muted");
    assert!(e["retry_after"].as_u64().unwrap() > 50);

    // Slow mode: one message per 30 s.
    let rules = json!({"slow_mode_secs":30,"banned_words":["scam"]});
    assert_eq!(
        host_call(&srv, "PUT", "/api/rooms/r/rules", Some(rules))
            .await
            .0,
        204
    );
    alice.send(json!({"type":"chat","text":"one"})).await;
    alice.recv_type("chat").await;
    alice.send(json!({"type":"chat","text":"two"})).await;
    let e = alice.recv_type("error").await;
    assert_eq!(e["code"], "slow_mode");

    // Ban: alice's socket gets `banned` and close 4003; reconnects and claims are refused.
    assert_eq!(
        host_call(
            &srv,
            "POST",
            "/api/rooms/r/bans",
            Some(json!({"user":"alice"}))
        )
        .await
        .0,
        204
    );
    assert_eq!(alice.recv_type("error").await["code"], "banned");
    assert_eq!(alice.recv_close().await, Some(4003));
    let url = srv.ws_url("r", &srv.token("alice", Role::Viewer));
    assert_eq!(ws_refusal(&url, None).await, Some(403));
    let (status, body, _) = claim(&srv, "alice", "d", "k").await;
    assert_eq!((status, body["code"].as_str()), (403, Some("banned")));
    // Bob is still connected.
    bob.send(json!({"type":"ping"})).await;
    bob.recv_type("pong").await;
    // Unban lets her back.
    assert_eq!(
        host_call(&srv, "DELETE", "/api/rooms/r/bans/alice", None)
            .await
            .0,
        204
    );
    assert_eq!(ws_refusal(&url, None).await, None);

    // The host reviews it all; stats show the counts.
    let (s, report) = host_call(&srv, "GET", "/api/rooms/r/moderation", None).await;
    assert_eq!(s, 200);
    let actions: Vec<&str> = report["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["unban", "ban", "rules", "mute", "delete", "rules"]
    );
    assert_eq!(report["mutes"].as_object().unwrap().len(), 1);
    let (s, stats) = host_call(&srv, "GET", "/api/rooms/r/stats", None).await;
    assert_eq!(s, 200);
    assert_eq!(stats["moderation"]["deleted_messages"], 1);
    assert_eq!(stats["moderation"]["slow_mode_secs"], 30);
    assert_eq!(stats["drops"][0]["total"], 10);
    assert_eq!(stats["drops"][0]["reserved"], 0);
});

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_peer_is_pinged_then_closed() {
    let srv = TestServer::start_with(Engine::Memory, |c| c.idle_secs = 1).await;
    srv.create_room("r", "host").await;
    let token = srv.token("quiet", Role::Viewer);
    let mut ws = RawWs::connect(&srv, "r", &token).await;
    let started = std::time::Instant::now();
    let mut pinged = false;
    loop {
        match ws.read_frame().await {
            Some((9, _)) => pinged = true,
            Some((8, p)) => {
                assert_eq!(u16::from_be_bytes([p[0], p[1]]), 4000);
                break;
            }
            Some(_) => {}
            None => panic!("stream ended without a close frame"),
        }
    }
    assert!(pinged, "closed without a ping first");
    assert!(started.elapsed() >= Duration::from_millis(1500));
}

async fn healthz_from(srv: &TestServer, forwarded_for: &str) -> u16 {
    let res = srv
        .http
        .get(srv.url("/healthz"))
        .header("x-forwarded-for", forwarded_for)
        .send()
        .await
        .unwrap();
    res.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forwarded_for_counts_only_behind_a_trusted_proxy() {
    let clock = FakeRelativeClock::default();
    let limited = |trusted: bool| {
        let fake = clock.clone();
        move |c: &mut livedrop::config::Config| {
            c.limit_exempt = vec!["none".into()];
            c.limit_clock = Some(fake);
            c.http_rate = "2/m".parse().unwrap();
            if trusted {
                c.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
            }
        }
    };
    // Behind a trusted proxy (the test client on loopback), each forwarded client has its own
    // budget.
    let srv = TestServer::start_with(Engine::Memory, limited(true)).await;
    assert_eq!(healthz_from(&srv, "1.1.1.1").await, 200);
    assert_eq!(healthz_from(&srv, "1.1.1.1").await, 200);
    assert_eq!(healthz_from(&srv, "1.1.1.1").await, 429);
    assert_eq!(healthz_from(&srv, "2.2.2.2").await, 200);
    // From an untrusted peer the header is ignored: spoofing it buys nothing.
    let srv = TestServer::start_with(Engine::Memory, limited(false)).await;
    assert_eq!(healthz_from(&srv, "1.1.1.1").await, 200);
    assert_eq!(healthz_from(&srv, "2.2.2.2").await, 200);
    assert_eq!(healthz_from(&srv, "3.3.3.3").await, 429);
}

/// Sends `GET /healthz` on a fresh connection: the status, or None when the server closed
/// the connection without answering.
async fn healthz_raw(srv: &TestServer) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(srv.addr).await.ok()?;
    let _ = tcp
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
    match read {
        Ok(_) if answer.starts_with(b"HTTP/1.1 ") => {
            std::str::from_utf8(&answer[9..12]).ok()?.parse().ok()
        }
        _ => None,
    }
}

both_engines!(
    the_connection_cap_covers_websockets_for_their_whole_life,
    |engine| async move {
        let srv = TestServer::start_with(engine, |c| c.max_connections = 3).await;
        srv.create_room("r", "host").await;
        // The test's HTTP client may keep its connection pooled: make room for exactly two
        // viewers whatever it does.
        let mut viewers = Vec::new();
        for i in 0.. {
            match healthz_raw(&srv).await {
                Some(200) if viewers.len() < 3 => {
                    viewers.push(srv.viewer("r", &format!("v{i}")).await.0);
                }
                Some(200) => panic!("more connections than the cap"),
                _ => break,
            }
        }
        assert!(!viewers.is_empty(), "no viewer fitted under the cap");
        // Full: a new connection is closed without an answer, and stays refused while the
        // upgraded sockets (no longer HTTP connections) are open.
        assert_eq!(healthz_raw(&srv).await, None);
        // A viewer leaves: its slot comes back.
        drop(viewers.pop());
        let mut answered = None;
        for _ in 0..50 {
            answered = healthz_raw(&srv).await;
            if answered.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(answered, Some(200));
    }
);
