//! Roles hold (invariant 6): a table walks every protected HTTP endpoint and every WebSocket
//! command with each kind of wrong caller — no token, a forged signature, `alg: none`, an
//! expired token, a viewer, another host, another viewer — and checks each gets 401/403 (or
//! an `error`/refused `claim_result` frame) and that nothing changed in the store.
//!
//! Adding an endpoint is adding one `Row`.

mod common;

use common::probe::{
    alg_none, claim_one, expired, fingerprint, forged, request, room_with_drop, ws_refusal,
};
use common::server::{Engine, TestServer};
use livedrop::auth::Role;
use serde_json::{Value, json};

/// Who may call a row.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Need {
    /// Any valid token.
    Token,
    /// A host (any host).
    Host,
    /// The room's owner (or an admin).
    Owner,
    /// The viewer who made the claim.
    ClaimOwner,
}

struct Row {
    method: &'static str,
    path: String,
    body: Option<Value>,
    need: Need,
}

fn row(method: &'static str, path: &str, body: Option<Value>, need: Need) -> Row {
    Row {
        method,
        path: path.to_string(),
        body,
        need,
    }
}

/// Every protected endpoint. (`GET /api/groups/{group}` and `GET /api/drops/{drop}/groups`
/// are public on purpose, like a drop's page: a group is shared by link.)
fn table(claim: &str) -> Vec<Row> {
    let drop = json!({"sku":"S","title":"T","price":1,"stock":5,"kind":"flash"});
    vec![
        row(
            "POST",
            "/api/rooms",
            Some(json!({"id":"x-new","title":"t"})),
            Need::Host,
        ),
        row("POST", "/api/rooms/r/drops", Some(drop), Need::Owner),
        row("POST", "/api/drops/d/end", None, Need::Owner),
        row("GET", "/api/drops/d/ledger", None, Need::Owner),
        row(
            "POST",
            "/api/drops/d/claims",
            Some(json!({"qty":1})),
            Need::Token,
        ),
        row(
            "POST",
            &format!("/api/claims/{claim}/confirm"),
            None,
            Need::ClaimOwner,
        ),
        row(
            "DELETE",
            &format!("/api/claims/{claim}"),
            None,
            Need::ClaimOwner,
        ),
        row("GET", "/api/me/claims", None, Need::Token),
        row("POST", "/api/drops/d/groups", None, Need::Token),
        row("POST", "/api/groups/d.g1/join", None, Need::Token),
        row("GET", "/api/rooms/r/stats", None, Need::Owner),
        row("GET", "/api/rooms/r/moderation", None, Need::Owner),
        row(
            "PUT",
            "/api/rooms/r/rules",
            Some(json!({"slow_mode_secs":5})),
            Need::Owner,
        ),
        row(
            "POST",
            "/api/rooms/r/mutes",
            Some(json!({"user":"alice","secs":60})),
            Need::Owner,
        ),
        row(
            "POST",
            "/api/rooms/r/bans",
            Some(json!({"user":"alice"})),
            Need::Owner,
        ),
        row("DELETE", "/api/rooms/r/bans/alice", None, Need::Owner),
        row("DELETE", "/api/rooms/r/chat/m1", None, Need::Owner),
    ]
}

both_engines!(every_endpoint_refuses_wrong_callers, |engine| async move {
    let srv = TestServer::start_with(engine, |c| c.allow_guests = true).await;
    room_with_drop(&srv, "owner", 10).await;
    let claim = claim_one(&srv, "alice").await;

    // Rows for "another viewer" must be refused before the idempotency key is read, so the
    // claim row is not in that set (any viewer may claim).
    let callers: Vec<(&str, String, Vec<Need>)> = vec![
        (
            "no token",
            String::new(),
            vec![Need::Token, Need::Host, Need::Owner, Need::ClaimOwner],
        ),
        (
            "forged",
            forged("owner"),
            vec![Need::Token, Need::Host, Need::Owner, Need::ClaimOwner],
        ),
        (
            "alg none",
            alg_none("owner"),
            vec![Need::Token, Need::Host, Need::Owner, Need::ClaimOwner],
        ),
        (
            "expired",
            expired("owner", Role::Host, 3600),
            vec![Need::Token, Need::Host, Need::Owner, Need::ClaimOwner],
        ),
        (
            "viewer",
            srv.token("bob", Role::Viewer),
            vec![Need::Host, Need::Owner, Need::ClaimOwner],
        ),
        (
            "other host",
            srv.token("mallory", Role::Host),
            vec![Need::Owner, Need::ClaimOwner],
        ),
    ];
    let rooms = ["r", "x-new"];
    let before = fingerprint(&srv, &rooms, &["d"], &["alice", "bob", "owner", "mallory"]).await;
    let mut checked = 0;
    for r in table(&claim) {
        for (who, token, refused) in &callers {
            if !refused.contains(&r.need) {
                continue;
            }
            let token = (!token.is_empty()).then_some(token.as_str());
            let (status, body, _) = request(&srv, r.method, &r.path, token, r.body.clone()).await;
            let want: &[u16] = match *who {
                "viewer" | "other host" => &[403, 404],
                _ => &[401],
            };
            assert!(
                want.contains(&status),
                "{} {} as {who}: got {status} {body}",
                r.method,
                r.path
            );
            if status == 403 || status == 401 {
                assert!(
                    ["forbidden", "unauthorized"].contains(&body["code"].as_str().unwrap()),
                    "{body}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 60, "only {checked} cases ran");
    let after = fingerprint(&srv, &rooms, &["d"], &["alice", "bob", "owner", "mallory"]).await;
    assert_eq!(before, after, "a refused request changed the store");

    // The owner and an admin pass the same gate (the table's paths are real).
    let owner = srv.token("owner", Role::Host);
    assert_eq!(
        request(&srv, "GET", "/api/rooms/r/stats", Some(&owner), None)
            .await
            .0,
        200
    );
    let admin = srv.token("root", Role::Admin);
    assert_eq!(
        request(&srv, "GET", "/api/drops/d/ledger", Some(&admin), None)
            .await
            .0,
        200
    );
});

both_engines!(every_ws_command_checks_the_caller, |engine| async move {
    let srv = TestServer::start_with(engine, |c| c.allow_guests = true).await;
    room_with_drop(&srv, "owner", 10).await;
    let claim = claim_one(&srv, "alice").await;
    let before = fingerprint(&srv, &["r"], &["d"], &["alice", "bob"]).await;

    // Bad tokens never get a socket.
    let base = format!("ws://{}/ws/rooms/r", srv.addr);
    for token in [
        forged("alice"),
        alg_none("alice"),
        expired("alice", Role::Viewer, 3600),
        "garbage".into(),
    ] {
        assert_eq!(
            ws_refusal(&format!("{base}?token={token}"), None).await,
            Some(401)
        );
    }
    // Without a token, a guest (allowed here) may watch but not act.
    let (mut guest, welcome) = srv.viewer_url(&base).await;
    assert!(welcome["you"]["id"].as_str().unwrap().starts_with("guest-"));
    for cmd in [json!({"type":"chat","text":"hi"}), json!({"type":"like"})] {
        guest.send(cmd.clone()).await;
        let e = guest.recv_type("error").await;
        assert_eq!(e["code"], "forbidden", "{cmd}: {e}");
    }
    for cmd in [
        json!({"type":"claim","drop":"d","qty":1,"key":"g1"}),
        json!({"type":"confirm","claim":claim}),
        json!({"type":"release","claim":claim}),
    ] {
        guest.send(cmd.clone()).await;
        let r = guest.recv_type("claim_result").await;
        assert_eq!(
            (r["ok"].clone(), r["code"].clone()),
            (json!(false), json!("forbidden")),
            "{cmd}: {r}"
        );
    }
    for cmd in [
        json!({"type":"open_group","drop":"d","key":"g1"}),
        json!({"type":"join_group","group":"d.g1","key":"g2"}),
    ] {
        guest.send(cmd.clone()).await;
        let r = guest.recv_type("group_result").await;
        assert_eq!(
            (r["ok"].clone(), r["code"].clone()),
            (json!(false), json!("forbidden")),
            "{cmd}: {r}"
        );
    }
    // Another viewer cannot confirm or release alice's claim.
    let (mut bob, _) = srv.viewer("r", "bob").await;
    for cmd in [
        json!({"type":"confirm","claim":claim}),
        json!({"type":"release","claim":claim}),
    ] {
        bob.send(cmd.clone()).await;
        let r = bob.recv_type("claim_result").await;
        assert_eq!(r["ok"], false, "{cmd}: {r}");
        assert!(
            ["forbidden", "not_found"].contains(&r["code"].as_str().unwrap()),
            "{r}"
        );
    }
    // A token that expires while connected is refused on its next command, then closed 4001.
    // (Connect accepts a 5 s leeway; commands do not.)
    let (mut late, _) = srv
        .viewer_url(&srv.ws_url("r", &expired("alice", Role::Viewer, 2)))
        .await;
    late.send(json!({"type":"claim","drop":"d","qty":1,"key":"late"}))
        .await;
    let e = late.recv_type("error").await;
    assert_eq!(e["code"], "token_expired");
    assert_eq!(late.recv_close().await, Some(4001));

    assert_eq!(
        before,
        fingerprint(&srv, &["r"], &["d"], &["alice", "bob"]).await
    );
});

#[tokio::test]
async fn guests_need_the_setting() {
    let srv = TestServer::start(Engine::Memory).await;
    srv.create_room("r", "owner").await;
    let url = format!("ws://{}/ws/rooms/r", srv.addr);
    assert_eq!(ws_refusal(&url, None).await, Some(401));
}
