//! The live room over real sockets, on both engines: welcome, fan-out order, slow viewers,
//! recovery, conflated likes, bad input and graceful shutdown.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::raw_ws::{RawWs, frame};
use common::server::{Engine, Received, TestServer, Viewer};
use livedrop::auth::Role;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn chat_seq(v: &Value) -> u64 {
    v["seq"].as_u64().unwrap()
}

both_engines!(welcome_and_http_room, |engine| async move {
    let srv = TestServer::start(engine).await;
    assert_eq!(srv.get_json("/healthz").await.0, 200);
    let res = srv.http.get(srv.url("/readyz")).send().await.unwrap();
    assert_eq!(res.status(), 200);

    // Host creates a room; a viewer may not; no token is 401; a duplicate is 409.
    srv.create_room("r1", "host1").await;
    let viewer_try = srv
        .http
        .post(srv.url("/api/rooms"))
        .bearer_auth(srv.token("v1", Role::Viewer))
        .json(&json!({"title": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(viewer_try.status(), 403);
    assert_eq!(
        viewer_try.headers()["content-type"],
        "application/problem+json"
    );
    let anon = srv
        .http
        .post(srv.url("/api/rooms"))
        .json(&json!({"title": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), 401);
    let dup = srv
        .http
        .post(srv.url("/api/rooms"))
        .bearer_auth(srv.token("host1", Role::Host))
        .json(&json!({"id": "r1", "title": "again"}))
        .send()
        .await
        .unwrap();
    assert_eq!(dup.status(), 409);
    let body: Value = dup.json().await.unwrap();
    assert_eq!(body["code"], "room_exists");
    let bad_json = srv
        .http
        .post(srv.url("/api/rooms"))
        .bearer_auth(srv.token("host1", Role::Host))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_json.status(), 400);
    let body: Value = bad_json.json().await.unwrap();
    assert_eq!(body["code"], "bad_json");
    // A room without an id gets one.
    let generated = srv
        .http
        .post(srv.url("/api/rooms"))
        .bearer_auth(srv.token("host1", Role::Host))
        .json(&json!({"title": "gen room"}))
        .send()
        .await
        .unwrap();
    assert_eq!(generated.status(), 201);
    let generated: Value = generated.json().await.unwrap();
    assert!(livedrop::protocol::is_valid_id(
        generated["id"].as_str().unwrap()
    ));

    let (status, snap) = srv.get_json("/api/rooms/r1").await;
    assert_eq!(status, 200);
    assert_eq!(snap["id"], "r1");
    assert_eq!(snap["owner"], "host1");
    let (status, body) = srv.get_json("/api/rooms/nope").await;
    assert_eq!(status, 404);
    assert_eq!(body["code"], "not_found");

    let (mut v, welcome) = srv.viewer("r1", "alice").await;
    assert_eq!(welcome["room"]["id"], "r1");
    assert_eq!(welcome["seq"], 0);
    assert_eq!(welcome["likes"], 0);
    assert_eq!(welcome["you"]["id"], "alice");
    assert!(welcome["chat"].as_array().unwrap().is_empty());
    v.send(json!({"type": "ping"})).await;
    assert_eq!(v.recv_type("pong").await["type"], "pong");
    v.send(json!({"type": "chat", "text": "hello"})).await;
    let chat = v.recv_type("chat").await;
    assert_eq!(chat["text"], "hello");
    assert_eq!(chat["seq"], 1);
    assert_eq!(chat["user"]["id"], "alice");
    // Presence reaches the room.
    let p = v.recv_type("presence").await;
    assert_eq!(p["viewers"], 1);
});

both_engines!(fanout_300_viewers_in_order, |engine| async move {
    // Three fan-out shards whatever the machine: viewers spread over them all.
    let srv = TestServer::start_with(engine, |c| c.fanout_shards = 3).await;
    srv.create_room("big", "host1").await;
    let mut viewers = Vec::new();
    for i in 0..300 {
        viewers.push(srv.viewer("big", &format!("v{i}")).await.0);
    }
    // Five posters send ten messages each, concurrently.
    let mut posters = Vec::new();
    for p in 0..5 {
        let (mut poster, _) = srv.viewer("big", &format!("poster{p}")).await;
        posters.push(tokio::spawn(async move {
            for m in 0..10 {
                poster
                    .send(json!({"type":"chat","text": format!("p{p} m{m}")}))
                    .await;
            }
            poster
        }));
    }
    let mut readers = Vec::new();
    for mut v in viewers {
        readers.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            let mut texts = HashSet::new();
            while seqs.len() < 50 {
                match v.next_within(Duration::from_secs(20)).await {
                    Some(Received::Frame(f)) if f["type"] == "chat" => {
                        seqs.push(chat_seq(&f));
                        assert!(texts.insert(f["text"].as_str().unwrap().to_string()));
                    }
                    Some(Received::Frame(_)) => {}
                    other => panic!("viewer stopped early: {other:?}"),
                }
            }
            (seqs, texts)
        }));
    }
    let _posters: Vec<Viewer> = futures_util::future::join_all(posters)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    for r in readers {
        let (seqs, texts) = r.await.unwrap();
        assert_eq!(
            seqs,
            (1..=50).collect::<Vec<u64>>(),
            "exactly once, in seq order"
        );
        assert_eq!(texts.len(), 50);
    }
});

/// A TCP connection with a tiny receive buffer that never reads: the server's writes to it
/// stall almost at once.
async fn stalled_viewer(srv: &TestServer, room: &str) -> Viewer {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(srv.addr).await.unwrap();
    let url = srv.ws_url(room, &srv.token("stalled", Role::Viewer));
    let (ws, _) =
        tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
    Viewer { ws }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

both_engines!(
    stalled_viewer_does_not_hold_back_others,
    |engine| async move {
        let srv = TestServer::start_with(engine, |c| {
            // Readers on this busy 2-core box may fall behind a 5 000-message flood too: let
            // them resync (losslessly, from a deep history) instead of being cut off.
            c.max_resyncs = 1000;
            c.chat_history = 10_000;
            c.write_timeout_secs = 2;
        })
        .await;
        srv.create_room("slow", "host1").await;
        let mut stalled = stalled_viewer(&srv, "slow").await;
        let mut readers = Vec::new();
        for i in 0..5 {
            let (mut v, _) = srv.viewer("slow", &format!("r{i}")).await;
            readers.push(tokio::spawn(async move {
                let mut last = 0;
                let mut n = 0;
                while n < 5000 {
                    match v.next_within(Duration::from_secs(30)).await {
                        Some(Received::Frame(f)) if f["type"] == "chat" => {
                            let s = chat_seq(&f);
                            assert!(s > last, "in order");
                            last = s;
                            n += 1;
                        }
                        Some(Received::Frame(f)) if f["type"] == "resync" => {
                            // A busy test machine may resync a reader too; it must not lose chat.
                            assert_eq!(f["recovered"], true);
                            for m in f["chat"].as_array().unwrap() {
                                if chat_seq(m) > last {
                                    last = chat_seq(m);
                                    n += 1;
                                }
                            }
                        }
                        Some(Received::Frame(_)) => {}
                        other => panic!("reader stopped early: {other:?}"),
                    }
                }
                n
            }));
        }
        let rss_before = rss_kib();
        let (poster, _) = srv.viewer("slow", "poster").await;
        let text = "x".repeat(400);
        let post = tokio::spawn(async move {
            // The poster is a viewer too: it must keep reading, or it would be the stalled one.
            use futures_util::{SinkExt, StreamExt};
            let (mut tx, mut rx) = poster.ws.split();
            let drain = tokio::spawn(async move { while let Some(Ok(_)) = rx.next().await {} });
            let frame = json!({"type":"chat","text": text}).to_string();
            for _ in 0..5000 {
                tx.send(Message::Text(frame.clone().into())).await.unwrap();
            }
            (tx, drain)
        });
        for r in readers {
            assert_eq!(r.await.unwrap(), 5000);
        }
        let _poster = post.await.unwrap();
        let rss_after = rss_kib();
        // ~2.5 MB of chat went out to 6 sockets; a per-viewer queue would hold it all for the
        // stalled one. The bound is loose on purpose: it catches unbounded growth, not noise.
        assert!(
            rss_after.saturating_sub(rss_before) < 200 * 1024,
            "memory grew from {rss_before} KiB to {rss_after} KiB"
        );
        // The stalled viewer was resynced or disconnected: it never gets all 5000 in order.
        let mut chats = 0;
        let mut cut_off = false;
        loop {
            match stalled.next_within(Duration::from_secs(15)).await {
                Some(Received::Frame(f)) if f["type"] == "chat" => chats += 1,
                Some(Received::Frame(f)) if f["type"] == "resync" => {
                    cut_off = true;
                    break;
                }
                Some(Received::Frame(_)) => {}
                Some(Received::Close(_)) | Some(Received::End) => {
                    cut_off = true;
                    break;
                }
                None => break,
            }
        }
        assert!(
            cut_off,
            "stalled viewer read {chats} chats and was neither resynced nor closed"
        );
        assert!(chats < 5000);
    }
);

both_engines!(recovery_with_since, |engine| async move {
    let srv = TestServer::start_with(engine, |c| c.chat_history = 50).await;
    srv.create_room("rec", "host1").await;
    let (mut a, _) = srv.viewer("rec", "a").await;
    let (mut b, _) = srv.viewer("rec", "b").await;
    a.send(json!({"type":"chat","text":"first"})).await;
    let first = b.recv_type("chat").await;
    let seen = chat_seq(&first);
    drop(b);
    for i in 0..10 {
        a.send(json!({"type":"chat","text": format!("missed {i}")}))
            .await;
    }
    for _ in 0..10 {
        a.recv_type("chat").await;
    }
    let url = format!(
        "{}&since={seen}",
        srv.ws_url("rec", &srv.token("b", Role::Viewer))
    );
    let (_b2, welcome) = srv.viewer_url(&url).await;
    assert_eq!(welcome["recovered"], true);
    let chat = welcome["chat"].as_array().unwrap();
    let seqs: Vec<u64> = chat.iter().map(chat_seq).collect();
    assert_eq!(seqs, (seen + 1..=seen + 10).collect::<Vec<_>>());
    assert_eq!(chat[0]["text"], "missed 0");
    assert_eq!(welcome["seq"], seen + 10);

    // Push the first message out of the 50-message history: too old to recover.
    for i in 0..60 {
        a.send(json!({"type":"chat","text": format!("more {i}")}))
            .await;
    }
    for _ in 0..60 {
        a.recv_type("chat").await;
    }
    let (_b3, welcome) = srv.viewer_url(&url).await;
    assert_eq!(welcome["recovered"], false);
    assert_eq!(welcome["chat"].as_array().unwrap().len(), 50);
    // A bad since is refused before the upgrade.
    let bad = format!(
        "{}&since=abc",
        srv.ws_url("rec", &srv.token("b", Role::Viewer))
    );
    assert!(tokio_tungstenite::connect_async(bad).await.is_err());
});

both_engines!(likes_are_conflated_and_exact, |engine| async move {
    let srv = TestServer::start(engine).await;
    srv.create_room("likes", "host1").await;
    let (mut watcher, _) = srv.viewer("likes", "watcher").await;
    let watch = tokio::spawn(async move {
        let mut frames = 0u64;
        loop {
            match watcher.next_within(Duration::from_secs(20)).await {
                Some(Received::Frame(f)) if f["type"] == "likes" => {
                    frames += 1;
                    if f["total"] == 10_000 {
                        return frames;
                    }
                    assert!(f["total"].as_u64().unwrap() < 10_000);
                }
                Some(Received::Frame(_)) => {}
                other => panic!("watcher stopped: {other:?}"),
            }
        }
    });
    let mut likers = Vec::new();
    for i in 0..100 {
        let (mut v, _) = srv.viewer("likes", &format!("l{i}")).await;
        likers.push(tokio::spawn(async move {
            for _ in 0..100 {
                v.send(json!({"type":"like"})).await;
            }
            v
        }));
    }
    let _likers = futures_util::future::join_all(likers).await;
    let frames = watch.await.unwrap();
    assert!(frames < 1000, "{frames} likes frames for 10 000 likes");
    let (_, snap) = srv.get_json("/api/rooms/likes").await;
    assert_eq!(snap["likes"], 10_000);
});

async fn http_status_of_upgrade(url: &str) -> u16 {
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => res.status().as_u16(),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => 101,
    }
}

both_engines!(
    bad_input_is_refused_and_changes_nothing,
    |engine| async move {
        let srv = TestServer::start(engine).await;
        srv.create_room("bad", "host1").await;
        let base = format!("ws://{}/ws/rooms/bad", srv.addr);
        assert_eq!(http_status_of_upgrade(&base).await, 401);
        let forged = livedrop::auth::Authenticator::new(b"another-secret-entirely")
            .issue("mallory", "M", Role::Admin, 3600)
            .unwrap();
        assert_eq!(
            http_status_of_upgrade(&format!("{base}?token={forged}")).await,
            401
        );
        let expired = {
            use jsonwebtoken::{EncodingKey, Header, encode};
            let claims = json!({"sub":"old","name":"Old","role":"viewer","exp": 1_000_000});
            encode(
                &Header::default(),
                &claims,
                &EncodingKey::from_secret(common::server::SECRET.as_bytes()),
            )
            .unwrap()
        };
        assert_eq!(
            http_status_of_upgrade(&format!("{base}?token={expired}")).await,
            401
        );
        let none_alg = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ4IiwibmFtZSI6IngiLCJyb2xlIjoiYWRtaW4iLCJleHAiOjk5OTk5OTk5OTl9.";
        assert_eq!(
            http_status_of_upgrade(&format!("{base}?token={none_alg}")).await,
            401
        );
        let tok = srv.token("eve", Role::Viewer);
        assert_eq!(
            http_status_of_upgrade(&srv.ws_url("no-such-room", &tok)).await,
            404
        );
        assert_eq!(
            http_status_of_upgrade(&srv.ws_url("bad:room", &tok)).await,
            404
        );

        let (mut eve, _) = srv.viewer("bad", "eve").await;
        let (mut other, _) = srv.viewer("bad", "other").await;
        let bad_frames = [
            "{not json".to_string(),
            r#"{"type":"teleport"}"#.to_string(),
            r#"{"type":"chat"}"#.to_string(),
            r#"{"type":"chat","text":5}"#.to_string(),
            r#"{"type":"chat","text":""}"#.to_string(),
            r#"{"type":"chat","text":"   "}"#.to_string(),
            json!({"type":"chat","text":"a".repeat(501)}).to_string(),
            json!({"type":"chat","text":"bell\u{7}"}).to_string(),
            r#"{"type":"like","count":0}"#.to_string(),
            r#"{"type":"like","count":100000}"#.to_string(),
            r#"[1,2,3]"#.to_string(),
        ];
        for f in &bad_frames {
            eve.send_raw(Message::Text(f.clone().into())).await;
            let err = eve.recv_type("error").await;
            assert_eq!(err["code"], "bad_message", "for {f}: {err}");
        }
        // The connection is still open and nothing was broadcast: the next chat the other
        // viewer sees is this valid one, with seq 1.
        eve.send(json!({"type":"chat","text":"a valid one"})).await;
        let next = other.recv_type("chat").await;
        assert_eq!(next["text"], "a valid one");
        assert_eq!(next["seq"], 1);
        let (_, snap) = srv.get_json("/api/rooms/bad").await;
        assert_eq!(snap["likes"], 0);

        // A 1 MiB frame closes the socket with 1009.
        let big = "x".repeat(1 << 20);
        eve.send_raw(Message::Text(big.into())).await;
        assert_eq!(eve.recv_close().await, Some(1009));
        // The other viewer is unaffected.
        other.send(json!({"type":"ping"})).await;
        other.recv_type("pong").await;
    }
);

both_engines!(graceful_shutdown_closes_with_1001, |engine| async move {
    let mut srv = TestServer::start(engine).await;
    srv.create_room("bye", "host1").await;
    let mut viewers = Vec::new();
    for i in 0..3 {
        viewers.push(srv.viewer("bye", &format!("v{i}")).await.0);
    }
    let closes = tokio::spawn(async move {
        let mut codes = Vec::new();
        for mut v in viewers {
            codes.push(v.recv_close().await);
        }
        codes
    });
    srv.stop().await;
    assert_eq!(closes.await.unwrap(), vec![Some(1001); 3]);
    // No longer accepting.
    assert!(tokio::net::TcpStream::connect(srv.addr).await.is_err());
});

both_engines!(
    frames_behind_the_handshake_are_read_and_a_close_is_answered,
    |engine| async move {
        let srv = TestServer::start(engine).await;
        srv.create_room("raw", "host1").await;
        let token = srv.token("early", Role::Viewer);
        // A ping command sent in the same write as the upgrade request, before the 101.
        let early = frame(true, 0x1, br#"{"type":"ping"}"#);
        let mut ws = RawWs::connect_with(&srv, "raw", &token, &early).await;
        loop {
            let (op, p) = ws.read_frame().await.expect("pong");
            assert_eq!(op, 1);
            if String::from_utf8_lossy(&p).contains("\"pong\"") {
                break;
            }
        }
        // A WebSocket ping is answered with a pong carrying the same payload.
        use tokio::io::AsyncWriteExt;
        ws.tcp
            .write_all(&frame(true, 0x9, b"are you there"))
            .await
            .unwrap();
        loop {
            match ws.read_frame().await.expect("pong frame") {
                (10, p) => {
                    assert_eq!(p, b"are you there");
                    break;
                }
                (1, _) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        // The client closes with 4321: the server answers with the same code and hangs up.
        let mut close = 4321u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"bye");
        ws.tcp.write_all(&frame(true, 0x8, &close)).await.unwrap();
        loop {
            match ws.read_frame().await {
                Some((8, p)) => {
                    assert_eq!(u16::from_be_bytes([p[0], p[1]]), 4321);
                    break;
                }
                Some((1, _)) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
        assert_eq!(
            ws.read_frame().await,
            None,
            "the server hangs up after the close"
        );
    }
);

both_engines!(
    a_trickling_request_does_not_hold_shutdown,
    |engine| async move {
        let mut srv = TestServer::start_with(engine, |c| c.shutdown_grace_secs = 1).await;
        srv.create_room("slow", "host1").await;
        // Headers promise a 1 000-byte body; ten bytes come, the rest never does.
        use tokio::io::AsyncWriteExt;
        let mut tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
        let token = srv.token("host1", Role::Host);
        let head = format!(
            "POST /api/rooms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"id\":\"ab"
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // `stop` fails the test if serve has not returned within 20 s; the grace period is 1 s.
        srv.stop().await;
        drop(tcp);
    }
);
