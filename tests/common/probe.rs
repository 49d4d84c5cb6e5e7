//! Helpers for the trust tests: hostile tokens, raw HTTP requests, and a fingerprint of
//! everything the store holds, so a test can prove that a refusal changed nothing.

use std::time::Duration;

use livedrop::auth::{Claims, Role};
use serde_json::{Value, json};

use super::server::{SECRET, TestServer};

fn now_secs() -> u64 {
    (livedrop::model::now_millis() / 1000) as u64
}

fn sign(secret: &str, sub: &str, role: Role, exp: u64) -> String {
    let claims = Claims {
        sub: sub.into(),
        name: sub.into(),
        role,
        exp,
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A host token signed with the wrong secret.
pub fn forged(sub: &str) -> String {
    sign(
        "not-the-secret-0123456789",
        sub,
        Role::Admin,
        now_secs() + 3600,
    )
}

/// An admin token with `alg: none` and no signature.
pub fn alg_none(sub: &str) -> String {
    let b64 = |v: Value| base64url(v.to_string().as_bytes());
    format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(json!({"sub": sub, "name": sub, "role": "admin", "exp": now_secs() + 3600}))
    )
}

/// Unpadded base64url, enough to hand-craft a token.
fn base64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// A correctly signed token that expired `ago` seconds ago.
pub fn expired(sub: &str, role: Role, ago: u64) -> String {
    sign(SECRET, sub, role, now_secs().saturating_sub(ago))
}

/// Everything the store knows about these rooms, drops and users (plus, on redis, every key
/// name): equal fingerprints before and after mean nothing changed.
pub async fn fingerprint(
    srv: &TestServer,
    rooms: &[&str],
    drops: &[&str],
    users: &[&str],
) -> Value {
    let store = &srv.state.store;
    let mut out = serde_json::Map::new();
    for r in rooms {
        let room = store.get_room(r).await.unwrap();
        let chat = store.recent_chat(r, 1000).await.unwrap_or_default();
        let likes = store.likes(r).await.unwrap_or(0);
        let mut moderation: Vec<_> = store.moderation(r).await.unwrap().into_iter().collect();
        moderation.sort();
        let log = store.mod_log(r, 1000).await.unwrap();
        let drops: Vec<_> = store
            .room_drops(r)
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|d| d.drop.id)
            .collect();
        out.insert(
            format!("room:{r}"),
            json!({"room": room, "chat": chat, "likes": likes, "moderation": moderation,
                   "log": log, "drops": drops}),
        );
    }
    for d in drops {
        let state = store.get_drop(d).await.unwrap();
        let ledger = store.ledger(d).await.unwrap_or_default();
        out.insert(
            format!("drop:{d}"),
            json!({"state": state, "ledger": ledger}),
        );
    }
    for u in users {
        let claims = store.user_claims(u).await.unwrap();
        out.insert(format!("user:{u}"), json!(claims));
    }
    if let Some(redis) = &srv.redis {
        let client = redis::Client::open(redis.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut conn)
            .await
            .unwrap();
        keys.sort();
        out.insert("redis_keys".into(), json!(keys));
    }
    Value::Object(out)
}

/// Sends a request with an optional bearer token and JSON body; returns status and body.
pub async fn request(
    srv: &TestServer,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = srv
        .http
        .request(method, srv.url(path))
        .timeout(Duration::from_secs(30))
        .header("Idempotency-Key", "authz-key");
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    (status, res.json().await.unwrap_or(Value::Null), headers)
}

/// The HTTP status of a refused WebSocket upgrade (None when the upgrade succeeded).
pub async fn ws_refusal(url: &str, origin: Option<&str>) -> Option<u16> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("origin", o.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => None,
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => Some(res.status().as_u16()),
        Err(e) => panic!("upgrade failed oddly: {e}"),
    }
}

/// Creates room `r` owned by `owner` with a flash drop `d` of `stock` units.
pub async fn room_with_drop(srv: &TestServer, owner: &str, stock: u64) {
    srv.create_room("r", owner).await;
    let body = json!({"id":"d","sku":"S","title":"T","price":1,"stock":stock,"kind":"flash"});
    srv.create_drop("r", owner, body).await;
}

/// A claim of one unit of drop `d` by `user` over HTTP; returns the claim id.
pub async fn claim_one(srv: &TestServer, user: &str) -> String {
    let token = srv.token(user, Role::Viewer);
    let body = Some(json!({"qty": 1}));
    let (status, c, _) = request(srv, "POST", "/api/drops/d/claims", Some(&token), body).await;
    assert_eq!(status, 201, "{c}");
    c["claim_id"].as_str().unwrap().to_string()
}
