//! Bad input gets a clear error and changes nothing (invariant 7), table-driven over the
//! WebSocket and HTTP: malformed JSON, 10 000-deep nesting, unknown types, wrong field types,
//! huge and negative numbers, ids that must never reach a Redis key, invalid UTF-8, a frame
//! header claiming 2^60 bytes, a fragmented 2 MiB message, an oversized body. Each gets its
//! documented error or close code, the server stays up, memory stays flat, and the store
//! fingerprint (on redis: every key name too) is unchanged.

mod common;

use common::probe::{fingerprint, request, room_with_drop};
use common::raw_ws::{RawWs, frame};
use common::server::{Engine, TestServer};
use livedrop::auth::Role;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

/// What a WebSocket case must produce.
#[derive(Debug)]
enum Want {
    /// An `error` frame with this code; the socket stays open.
    Error(&'static str),
    /// A `claim_result` refusal with this code; the socket stays open.
    Refused(&'static str),
    /// The server closes with this code.
    Close(u16),
}

/// A frame to send: text (valid UTF-8) or raw wire bytes after the handshake.
enum Input {
    Text(String),
    Raw(Vec<u8>),
}

fn deep(n: usize) -> String {
    format!("{}{}", "[".repeat(n), "]".repeat(n))
}

fn ws_cases() -> Vec<(&'static str, Input, Want)> {
    use Input::*;
    use Want::*;
    let t = |s: &str| Text(s.to_string());
    let mut two_mib = frame(false, 0x1, &[b'x'; 8192]);
    for i in 1..256 {
        two_mib.extend(frame(i == 255, 0x0, &[b'x'; 8192]));
    }
    let mut huge_header = vec![0x81, 0x80 | 127];
    huge_header.extend_from_slice(&(1u64 << 60).to_be_bytes());
    huge_header.extend_from_slice(&[1, 2, 3, 4, b'x']);
    vec![
        ("malformed json", t("{\"type\":"), Error("bad_message")),
        ("not an object", t("42"), Error("bad_message")),
        ("10 000-deep nesting", Text(deep(10_000)), Close(1009)),
        (
            "5 000-deep nesting in a field",
            Text(format!("{{\"type\":\"chat\",\"text\":{}}}", deep(5_000))),
            Error("bad_message"),
        ),
        (
            "unknown type",
            t(r#"{"type":"drop_everything"}"#),
            Error("bad_message"),
        ),
        ("missing type", t(r#"{"text":"hi"}"#), Error("bad_message")),
        (
            "wrong field type",
            t(r#"{"type":"claim","drop":5,"qty":1,"key":"k"}"#),
            Error("bad_message"),
        ),
        (
            "huge like count",
            t(r#"{"type":"like","count":99999999999999999999}"#),
            Error("bad_message"),
        ),
        (
            "negative like count",
            t(r#"{"type":"like","count":-1}"#),
            Error("bad_message"),
        ),
        (
            "huge qty",
            t(r#"{"type":"claim","drop":"d","qty":1e308,"key":"k"}"#),
            Refused("bad_quantity"),
        ),
        (
            "qty past u64",
            t(r#"{"type":"claim","drop":"d","qty":18446744073709551616,"key":"k"}"#),
            Refused("bad_quantity"),
        ),
        (
            "negative qty",
            t(r#"{"type":"claim","drop":"d","qty":-1,"key":"k"}"#),
            Refused("bad_quantity"),
        ),
        (
            "fractional qty",
            t(r#"{"type":"claim","drop":"d","qty":1.5,"key":"k"}"#),
            Refused("bad_quantity"),
        ),
        (
            "drop id with colon",
            t(r#"{"type":"claim","drop":"d:x","qty":1,"key":"k"}"#),
            Refused("not_found"),
        ),
        (
            "drop id with hash tag",
            t(r#"{"type":"claim","drop":"{drop:d}","qty":1,"key":"k"}"#),
            Refused("not_found"),
        ),
        (
            "drop id with space",
            t(r#"{"type":"claim","drop":"d x","qty":1,"key":"k"}"#),
            Refused("not_found"),
        ),
        (
            "very long drop id",
            Text(json!({"type":"claim","drop":"d".repeat(5000),"qty":1,"key":"k"}).to_string()),
            Refused("not_found"),
        ),
        (
            "key with colon",
            t(r#"{"type":"claim","drop":"d","qty":1,"key":"a:b"}"#),
            Refused("bad_idempotency_key"),
        ),
        (
            "claim id with colon",
            t(r#"{"type":"confirm","claim":"d:x.1"}"#),
            Refused("not_found"),
        ),
        (
            "claim id with brace",
            t(r#"{"type":"release","claim":"{d}.1"}"#),
            Refused("not_found"),
        ),
        (
            "invalid UTF-8",
            Raw(frame(true, 0x1, &[b'{', 0xff, 0xfe, b'}'])),
            Close(1007),
        ),
        (
            "frame header claiming 2^60 bytes",
            Raw(huge_header),
            Close(1009),
        ),
        ("fragmented 2 MiB message", Raw(two_mib), Close(1009)),
        (
            "one 1 MiB frame",
            Raw(frame(true, 0x1, &vec![b'x'; 1 << 20])),
            Close(1009),
        ),
        (
            "unmasked frame",
            Raw(vec![0x81, 2, b'h', b'i']),
            Close(1002),
        ),
        (
            "reserved bit set",
            Raw(vec![0xc1, 0x80, 1, 2, 3, 4]),
            Close(1002),
        ),
        ("unknown opcode", Raw(frame(true, 0x3, b"x")), Close(1002)),
        (
            "ping over 125 bytes",
            Raw(frame(true, 0x9, &[0; 126])),
            Close(1002),
        ),
        ("fragmented ping", Raw(frame(false, 0x9, b"p")), Close(1002)),
        (
            "continuation with nothing to continue",
            Raw(frame(true, 0x0, b"x")),
            Close(1002),
        ),
    ]
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

async fn setup(engine: Engine) -> TestServer {
    let srv = TestServer::start(engine).await;
    room_with_drop(&srv, "host", 10).await;
    srv
}

/// Sends every WebSocket case on a fresh socket and checks its outcome.
async fn run_ws_cases(srv: &TestServer, token: &str) {
    for (name, input, want) in ws_cases() {
        let mut ws = RawWs::connect(srv, "r", token).await;
        let bytes = match input {
            Input::Text(t) => frame(true, 0x1, t.as_bytes()),
            Input::Raw(b) => b,
        };
        // The server may close mid-write (that is the point of some cases).
        let _ = ws.tcp.write_all(&bytes).await;
        let got = ws.outcome().await;
        match (&want, &got) {
            (Want::Error(code), Ok(v)) if v["type"] == "error" && v["code"] == *code => {}
            (Want::Refused(code), Ok(v))
                if v["type"] == "claim_result" && v["ok"] == false && v["code"] == *code => {}
            (Want::Close(code), Err(Some(c))) if c == code => {}
            _ => panic!("{name}: wanted {want:?}, got {got:?}"),
        }
        if !matches!(want, Want::Close(_)) {
            // Still open and usable (room frames such as presence may come first).
            let _ = ws
                .tcp
                .write_all(&frame(true, 0x1, br#"{"type":"ping"}"#))
                .await;
            loop {
                let (op, p) = ws.read_frame().await.expect(name);
                assert_eq!(op, 1, "{name}");
                if String::from_utf8_lossy(&p).contains("\"pong\"") {
                    break;
                }
            }
        }
    }
}

both_engines!(websocket_bad_input_table, |engine| async move {
    let srv = setup(engine).await;
    let users = ["eve", "witness"];
    let before = fingerprint(&srv, &["r"], &["d"], &users).await;
    let (mut witness, _) = srv.viewer("r", "witness").await;
    let token = srv.token("eve", Role::Viewer);
    // One round warms the allocator up; three more must not grow memory.
    run_ws_cases(&srv, &token).await;
    let rss_before = rss_kib();
    for _ in 0..3 {
        run_ws_cases(&srv, &token).await;
    }
    // The server is up, the other viewer unaffected, memory flat, the store unchanged.
    witness.send(json!({"type":"ping"})).await;
    witness.recv_type("pong").await;
    let grown = rss_kib().saturating_sub(rss_before);
    assert!(
        grown < 32 * 1024,
        "RSS grew by {grown} KiB over three rounds"
    );
    assert_eq!(before, fingerprint(&srv, &["r"], &["d"], &users).await);
});

both_engines!(http_bad_input_table, |engine| async move {
    let srv = setup(engine).await;
    let users = ["eve", "host"];
    let before = fingerprint(&srv, &["r", "a-b"], &["d"], &users).await;
    let viewer = srv.token("eve", Role::Viewer);
    let host = srv.token("host", Role::Host);
    let drop = |extra: Value| {
        let mut b = json!({"sku":"S","title":"T","price":1,"stock":5,"kind":"flash"});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let long = "d".repeat(5000);
    // (name, method, path, token, raw body, status, code)
    let cases: Vec<(&str, &str, String, &str, String, u16, &str)> = vec![
        (
            "malformed json",
            "POST",
            "/api/drops/d/claims".into(),
            &viewer,
            "{\"qty\":".into(),
            400,
            "bad_json",
        ),
        (
            "10 000-deep nesting",
            "POST",
            "/api/drops/d/claims".into(),
            &viewer,
            format!("{{\"qty\":{}}}", deep(10_000)),
            400,
            "bad_json",
        ),
        (
            "unknown field",
            "POST",
            "/api/drops/d/claims".into(),
            &viewer,
            r#"{"qty":1,"price":0}"#.into(),
            400,
            "bad_json",
        ),
        (
            "wrong field type",
            "POST",
            "/api/rooms/r/drops".into(),
            &host,
            drop(json!({"stock":"many"})).to_string(),
            400,
            "bad_json",
        ),
        (
            "huge stock",
            "POST",
            "/api/rooms/r/drops".into(),
            &host,
            drop(json!({"stock":1e30})).to_string(),
            400,
            "bad_json",
        ),
        (
            "stock past u64",
            "POST",
            "/api/rooms/r/drops".into(),
            &host,
            r#"{"sku":"S","title":"T","price":1,"stock":18446744073709551616}"#.into(),
            400,
            "bad_json",
        ),
        (
            "absurd stock",
            "POST",
            "/api/rooms/r/drops".into(),
            &host,
            drop(json!({"stock":99_999_999_999u64})).to_string(),
            422,
            "bad_drop",
        ),
        (
            "negative stock",
            "POST",
            "/api/rooms/r/drops".into(),
            &host,
            drop(json!({"stock":-5})).to_string(),
            400,
            "bad_json",
        ),
        (
            "negative price",
            "POST",
            "/api/rooms/r/drops".into(),
            &host,
            drop(json!({"price":-1})).to_string(),
            422,
            "bad_drop",
        ),
        (
            "drop id with colon",
            "POST",
            "/api/rooms/r/drops".into(),
            &host,
            drop(json!({"id":"x:y"})).to_string(),
            400,
            "bad_id",
        ),
        (
            "huge qty",
            "POST",
            "/api/drops/d/claims".into(),
            &viewer,
            r#"{"qty":1e308}"#.into(),
            422,
            "bad_quantity",
        ),
        (
            "negative qty",
            "POST",
            "/api/drops/d/claims".into(),
            &viewer,
            r#"{"qty":-1}"#.into(),
            422,
            "bad_quantity",
        ),
        (
            "room id with colon",
            "POST",
            "/api/rooms".into(),
            &host,
            r#"{"id":"a:b","title":"t"}"#.into(),
            400,
            "bad_id",
        ),
        (
            "room id with brace",
            "POST",
            "/api/rooms".into(),
            &host,
            r#"{"id":"{room:r}","title":"t"}"#.into(),
            400,
            "bad_id",
        ),
        (
            "room id with space",
            "POST",
            "/api/rooms".into(),
            &host,
            r#"{"id":"a b","title":"t"}"#.into(),
            400,
            "bad_id",
        ),
        (
            "path id with colon",
            "POST",
            "/api/drops/d:x/claims".into(),
            &viewer,
            r#"{"qty":1}"#.into(),
            404,
            "not_found",
        ),
        (
            "path id with hash tag",
            "POST",
            "/api/drops/%7Bdrop:d%7D/claims".into(),
            &viewer,
            r#"{"qty":1}"#.into(),
            404,
            "not_found",
        ),
        (
            "path id with space",
            "POST",
            "/api/drops/a%20b/claims".into(),
            &viewer,
            r#"{"qty":1}"#.into(),
            404,
            "not_found",
        ),
        (
            "very long path id",
            "POST",
            format!("/api/drops/{long}/claims"),
            &viewer,
            r#"{"qty":1}"#.into(),
            404,
            "not_found",
        ),
        (
            "claim id with colon",
            "POST",
            "/api/claims/d:x.1/confirm".into(),
            &viewer,
            String::new(),
            404,
            "not_found",
        ),
        (
            "mute id with colon",
            "POST",
            "/api/rooms/r/mutes".into(),
            &host,
            r#"{"user":"a:b","secs":5}"#.into(),
            400,
            "bad_id",
        ),
        (
            "body over 64 KiB",
            "POST",
            "/api/drops/d/claims".into(),
            &viewer,
            format!("{{\"qty\":1,\"pad\":\"{}\"}}", "x".repeat(70_000)),
            413,
            "body_too_large",
        ),
    ];
    for (name, method, path, token, body, status, code) in cases {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let res = srv
            .http
            .request(method, srv.url(&path))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .header("Idempotency-Key", "bad-input")
            .body(body)
            .send()
            .await
            .unwrap();
        let got = res.status().as_u16();
        let v: Value = res.json().await.unwrap_or(Value::Null);
        assert_eq!(
            (got, v["code"].as_str()),
            (status, Some(code)),
            "{name}: {v}"
        );
    }
    // A bad Idempotency-Key and a missing content type.
    let res = srv
        .http
        .post(srv.url("/api/drops/d/claims"))
        .bearer_auth(&viewer)
        .header("Idempotency-Key", "a:b {c}")
        .json(&json!({"qty":1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let (status, v, _) = request(&srv, "GET", "/api/rooms/r", None, None).await;
    assert_eq!(status, 200, "still up: {v}");
    assert_eq!(
        before,
        fingerprint(&srv, &["r", "a-b"], &["d"], &users).await
    );
});

/// A raw `GET /ws/rooms/r` with these extra header lines: the status and the answer head.
async fn upgrade_answer(srv: &TestServer, token: &str, headers: &str) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    let mut tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let req = format!(
        "GET /ws/rooms/r?token={token} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tcp.read_to_end(&mut answer),
    )
    .await
    .expect("an answer")
    .unwrap();
    let text = String::from_utf8_lossy(&answer).to_string();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

both_engines!(
    bad_upgrades_are_refused_and_change_nothing,
    |engine| async move {
        let srv = setup(engine).await;
        let before = fingerprint(&srv, &["r"], &["d"], &["eve"]).await;
        let token = srv.token("eve", Role::Viewer);
        let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
        let cases = [
            ("no upgrade headers", String::new(), 400),
            (
                "no Upgrade: websocket",
                format!("Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n{key}"),
                400,
            ),
            (
                "version 8",
                format!(
                    "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\n{key}"
                ),
                426,
            ),
            (
                "no key",
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n".into(),
                400,
            ),
            (
                "short key",
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: c2hvcnQ=\r\n"
                    .into(),
                400,
            ),
        ];
        for (name, headers, want) in cases {
            let (status, head) = upgrade_answer(&srv, &token, &headers).await;
            assert_eq!(status, want, "{name}: {head}");
            assert!(head.contains("\"code\":\"bad_upgrade\""), "{name}: {head}");
            if want == 426 {
                assert!(
                    head.to_ascii_lowercase()
                        .contains("sec-websocket-version: 13"),
                    "{name}: {head}"
                );
            }
        }
        assert_eq!(before, fingerprint(&srv, &["r"], &["d"], &["eve"]).await);
    }
);
