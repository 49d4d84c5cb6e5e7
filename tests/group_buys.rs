//! Group buys (拼团) through the real HTTP and WebSocket API, on both engines: exact counts
//! under concurrency (500 joiners on one group, 200 groups on scarce stock), the deadline
//! failing a group exactly once with several sweepers, idempotent joins, refusals, and the
//! room's `group_progress` / `group_completed` / `group_failed` frames.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::server::{ConservationSampler, Engine, Received, TestServer};
use livedrop::auth::Role;
use reqwest::Method;
use serde_json::{Value, json};

fn group_body(stock: u64, per_user: u64, size: u64, window: u64) -> Value {
    json!({"sku":"TEA-1","title":"Tea set","price":5000,"currency":"CNY","stock":stock,
           "per_user_limit":per_user,"kind":"group","group_size":size,"group_price":3900,
           "group_window_secs":window})
}

async fn post(srv: &TestServer, path: &str, user: &str, key: Option<&str>) -> (u16, Value) {
    let mut req = srv
        .http
        .post(srv.url(path))
        .bearer_auth(srv.token(user, Role::Viewer));
    if let Some(key) = key {
        req = req.header("Idempotency-Key", key);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn open(srv: &TestServer, drop: &str, user: &str) -> (u16, Value) {
    post(srv, &format!("/api/drops/{drop}/groups"), user, None).await
}

async fn join(srv: &TestServer, group: &str, user: &str, key: &str) -> (u16, Value) {
    post(srv, &format!("/api/groups/{group}/join"), user, Some(key)).await
}

fn code(v: &Value) -> &str {
    v["code"].as_str().unwrap_or("")
}

both_engines!(group_lifecycle_and_refusals, |engine| async move {
    let srv = TestServer::start(engine).await;
    srv.create_room("shop", "host1").await;
    let (mut viewer, _) = srv.viewer("shop", "watcher").await;

    // Bad group drops are refused with bad_drop and create nothing.
    for bad in [
        json!({"sku":"S","title":"T","price":1,"stock":5,"kind":"group","group_price":1}),
        json!({"sku":"S","title":"T","price":1,"stock":5,"kind":"group","group_size":1,"group_price":1}),
        json!({"sku":"S","title":"T","price":1,"stock":5,"kind":"group","group_size":101,"group_price":1}),
        json!({"sku":"S","title":"T","price":1,"stock":5,"kind":"group","group_size":2}),
        json!({"sku":"S","title":"T","price":1,"stock":5,"kind":"group","group_size":2,"group_price":-1}),
        json!({"sku":"S","title":"T","price":1,"stock":5,"kind":"group","group_size":2,"group_price":1,"group_window_secs":0}),
        json!({"sku":"S","title":"T","price":1,"stock":5,"kind":"flash","group_size":2}),
    ] {
        let (status, body) = srv
            .call_with(
                Method::POST,
                "/api/rooms/shop/drops",
                "host1",
                Role::Host,
                Some(&bad),
            )
            .await;
        assert_eq!(status, 422, "{bad}");
        assert_eq!(body["code"], "bad_drop", "{bad}");
    }
    let (_, room) = srv.get_json("/api/rooms/shop").await;
    assert!(room["drops"].as_array().unwrap().is_empty());

    let d = srv
        .create_drop("shop", "host1", group_body(10, 2, 3, 600))
        .await;
    let id = d["id"].as_str().unwrap().to_string();
    assert_eq!(d["kind"], "group");
    assert_eq!(d["group"]["size"], 3);
    assert_eq!(d["group"]["price"], 3900);
    assert_eq!(d["group"]["allow_solo"], false);

    // Open: 201 with the group; the leader's unit is reserved at once.
    let (status, g) = open(&srv, &id, "leader").await;
    assert_eq!(status, 201, "{g}");
    let gid = g["group_id"].as_str().unwrap().to_string();
    assert_eq!(
        (
            g["members"].as_u64(),
            g["size"].as_u64(),
            g["status"].as_str()
        ),
        (Some(1), Some(3), Some("open"))
    );
    assert_eq!(g["price"], 3900);
    assert!(g["expires_at"].as_str().is_some());
    assert_eq!(srv.levels(&id).await, (10, 9, 1, 0));
    let p = viewer.recv_type("group_progress").await;
    assert_eq!(
        (p["group_id"].as_str(), p["members"].as_u64()),
        (Some(gid.as_str()), Some(1))
    );

    // A newcomer's welcome lists the open group.
    let (_, welcome) = srv.viewer("shop", "newcomer").await;
    assert_eq!(welcome["groups"][0]["group_id"], gid.as_str());
    assert_eq!(welcome["groups"][0]["members"], 1);
    // Readable by anyone; listed as open.
    let (status, shown) = srv.get_json(&format!("/api/groups/{gid}")).await;
    assert_eq!((status, shown["members"].as_u64()), (200, Some(1)));
    let (status, list) = srv.get_json(&format!("/api/drops/{id}/groups")).await;
    assert_eq!(status, 200);
    assert_eq!(list["groups"][0]["group_id"], gid.as_str());

    // Refusals: the leader joining their own group, a solo claim on a group-only drop,
    // a join without a key, unknown groups and drops.
    let (status, body) = join(&srv, &gid, "leader", "k").await;
    assert_eq!((status, code(&body)), (409, "already_member"));
    let res = srv
        .http
        .post(srv.url(&format!("/api/drops/{id}/claims")))
        .bearer_auth(srv.token("solo", Role::Viewer))
        .header("Idempotency-Key", "k")
        .json(&json!({"qty":1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 409);
    let body: Value = res.json().await.unwrap();
    assert_eq!(code(&body), "solo_not_allowed");
    assert_eq!(
        res_code(post(&srv, &format!("/api/groups/{gid}/join"), "m1", None).await),
        (400, "missing_idempotency_key".into())
    );
    assert_eq!(
        res_code(join(&srv, &gid, "m1", "bad key!").await),
        (400, "bad_idempotency_key".into())
    );
    for bad in ["nope.g1", "garbage", "{drop:x}.g1"] {
        assert_eq!(join(&srv, bad, "m1", "k").await.0, 404, "{bad}");
        assert_eq!(srv.get_json(&format!("/api/groups/{bad}")).await.0, 404);
    }
    assert_eq!(open(&srv, "nope", "m1").await.0, 404);
    assert_eq!(srv.get_json("/api/drops/nope/groups").await.0, 404);
    let res = srv
        .http
        .post(srv.url(&format!("/api/drops/{id}/groups")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(srv.levels(&id).await, (10, 9, 1, 0));

    // A join, retried with the same key: the same answer, one unit.
    let first = join(&srv, &gid, "m1", "j1").await;
    assert_eq!(first.0, 201, "{}", first.1);
    assert_eq!(first.1["members"], 2);
    assert_eq!(join(&srv, &gid, "m1", "j1").await, first);
    let (status, body) = join(&srv, &gid, "m1", "j2").await;
    assert_eq!((status, code(&body)), (409, "already_member"));
    assert_eq!(srv.levels(&id).await, (10, 8, 2, 0));

    // The last place, over the WebSocket: completes the group for everyone.
    viewer
        .send(json!({"type":"join_group","group": gid,"key":"ws-1"}))
        .await;
    let r = viewer.recv_type("group_result").await;
    assert_eq!(
        (r["ok"].as_bool(), r["key"].as_str()),
        (Some(true), Some("ws-1")),
        "{r}"
    );
    assert_eq!(r["group"]["status"], "completed");
    let done = viewer.recv_type("group_completed").await;
    assert_eq!(
        (done["group_id"].as_str(), done["members"].as_u64()),
        (Some(gid.as_str()), Some(3))
    );
    assert_eq!(srv.levels(&id).await, (10, 7, 0, 3));
    let (status, body) = join(&srv, &gid, "late", "k").await;
    assert_eq!((status, code(&body)), (409, "group_full"));
    // The earlier join's retry still gets its own answer, now showing the completed group.
    let (status, again) = join(&srv, &gid, "m1", "j1").await;
    assert_eq!((status, again["status"].as_str()), (201, Some("completed")));
    let (_, list) = srv.get_json(&format!("/api/drops/{id}/groups")).await;
    assert!(list["groups"].as_array().unwrap().is_empty());
    assert_eq!(srv.ledger_ops(&id, "host1", "group_complete").await, 1);

    // Opening over the WebSocket (the watcher holds 1 of its 2); a refusal comes back as
    // group_result with the code.
    viewer
        .send(json!({"type":"open_group","drop": id,"key":"ws-2"}))
        .await;
    let r = viewer.recv_type("group_result").await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["group"]["members"], 1);
    viewer
        .send(json!({"type":"open_group","drop": id,"key":"ws-3"}))
        .await;
    let r = viewer.recv_type("group_result").await;
    assert_eq!(
        (r["ok"].as_bool(), r["code"].as_str()),
        (Some(false), Some("limit_reached"))
    );
    viewer
        .send(json!({"type":"join_group","group": 5,"key":"x"}))
        .await;
    let e = viewer.recv_type("error").await;
    assert_eq!(e["code"], "bad_message");
});

fn res_code((status, body): (u16, Value)) -> (u16, String) {
    (status, code(&body).to_string())
}

both_engines!(five_hundred_joiners_on_size_five, |engine| async move {
    let srv = Arc::new(TestServer::start(engine).await);
    srv.create_room("rush", "host1").await;
    let d = srv
        .create_drop("rush", "host1", group_body(100, 1, 5, 600))
        .await;
    let id = d["id"].as_str().unwrap().to_string();
    let (status, g) = open(&srv, &id, "leader").await;
    assert_eq!(status, 201);
    let gid = g["group_id"].as_str().unwrap().to_string();
    let tasks: Vec<_> = (0..500)
        .map(|i| {
            let (srv, gid) = (srv.clone(), gid.clone());
            tokio::spawn(async move { join(&srv, &gid, &format!("u{i}"), "k").await })
        })
        .collect();
    let (mut ok, mut completed) = (0, 0);
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            201 => {
                ok += 1;
                if body["status"] == "completed" {
                    completed += 1;
                }
            }
            409 => assert!(
                matches!(code(&body), "group_full" | "group_closed"),
                "{body}"
            ),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!((ok, completed), (4, 1));
    assert_eq!(srv.levels(&id).await, (100, 95, 0, 5));
    assert_eq!(srv.ledger_ops(&id, "host1", "group_join").await, 4);
    assert_eq!(srv.ledger_ops(&id, "host1", "group_complete").await, 1);
    let (_, shown) = srv.get_json(&format!("/api/groups/{gid}")).await;
    assert_eq!(
        (shown["members"].as_u64(), shown["status"].as_str()),
        (Some(5), Some("completed"))
    );
});

both_engines!(two_hundred_groups_on_stock_300, |engine| async move {
    const GROUPS: usize = 200;
    const STOCK: u64 = 300;
    let srv = Arc::new(TestServer::start(engine).await);
    srv.create_room("many", "host1").await;
    let d = srv
        .create_drop("many", "host1", group_body(STOCK, 1, 3, 600))
        .await;
    let id = d["id"].as_str().unwrap().to_string();

    // Sample conservation (and so the stock bound) while the groups fill.
    let sampler = ConservationSampler::start(srv.clone(), &id);
    // Each leader opens a group and two people join it at once: 600 asks for 300 units.
    let tasks: Vec<_> = (0..GROUPS)
        .map(|i| {
            let (srv, id) = (srv.clone(), id.clone());
            tokio::spawn(async move {
                let mut outcomes = vec![open(&srv, &id, &format!("l{i}")).await];
                if outcomes[0].0 == 201 {
                    let gid = outcomes[0].1["group_id"].as_str().unwrap().to_string();
                    let (ua, ub) = (format!("a{i}"), format!("b{i}"));
                    let (a, b) =
                        tokio::join!(join(&srv, &gid, &ua, "k"), join(&srv, &gid, &ub, "k"));
                    outcomes.extend([a, b]);
                }
                outcomes
            })
        })
        .collect();
    let (mut units, mut completed) = (0u64, 0u64);
    for t in tasks {
        for (status, body) in t.await.unwrap() {
            match status {
                201 => {
                    units += 1;
                    if body["status"] == "completed" {
                        completed += 1;
                    }
                }
                409 => assert_eq!(code(&body), "sold_out", "{body}"),
                other => panic!("unexpected {other}: {body}"),
            }
        }
    }
    assert!(sampler.stop().await > 0);
    // Nothing returns to stock during the run, so every unit went, and only once.
    assert_eq!(units, STOCK);
    let (total, remaining, reserved, sold) = srv.levels(&id).await;
    assert_eq!((total, remaining), (STOCK, 0));
    assert_eq!(sold, 3 * completed);
    assert_eq!(reserved + sold, STOCK);
    assert_eq!(
        srv.ledger_ops(&id, "host1", "group_complete").await as u64,
        completed
    );
});

both_engines!(deadline_fails_group_once, |engine| async move {
    let srv = TestServer::start_with(engine, |c| c.sweep_ms = 50).await;
    srv.create_room("late", "host1").await;
    let (mut viewer, _) = srv.viewer("late", "watcher").await;
    let d = srv
        .create_drop("late", "host1", group_body(10, 1, 5, 1))
        .await;
    let id = d["id"].as_str().unwrap().to_string();
    let (status, g) = open(&srv, &id, "leader").await;
    assert_eq!(status, 201);
    let gid = g["group_id"].as_str().unwrap().to_string();
    for u in ["m1", "m2"] {
        assert_eq!(join(&srv, &gid, u, "k").await.0, 201);
    }
    assert_eq!(srv.levels(&id).await, (10, 7, 3, 0));
    // Two more sweepers race the server's own.
    let state = srv.state.clone();
    let extra = tokio::spawn(async move {
        for _ in 0..40 {
            tokio::join!(state.commerce.sweep_once(), state.commerce.sweep_once());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let failed = viewer.recv_type("group_failed").await;
    assert_eq!(
        (
            failed["group_id"].as_str(),
            failed["members"].as_u64(),
            failed["status"].as_str()
        ),
        (Some(gid.as_str()), Some(3), Some("failed"))
    );
    extra.await.unwrap();
    assert_eq!(srv.levels(&id).await, (10, 10, 0, 0));
    assert_eq!(srv.ledger_ops(&id, "host1", "group_fail").await, 1);
    // No second group_failed frame for the same group.
    while let Some(Received::Frame(f)) = viewer.next_within(Duration::from_millis(300)).await {
        assert_ne!(f["type"], "group_failed", "{f}");
    }
    let (_, shown) = srv.get_json(&format!("/api/groups/{gid}")).await;
    assert_eq!(shown["status"], "failed");
    let (status, body) = join(&srv, &gid, "m3", "k").await;
    assert_eq!((status, code(&body)), (409, "group_closed"));
    // The members' units were freed (limit 1): the leader can open again.
    assert_eq!(open(&srv, &id, "leader").await.0, 201);
});

both_engines!(group_commands_pass_the_claim_gate, |engine| async move {
    let srv = TestServer::start(engine).await;
    srv.create_room("gate", "host1").await;
    let d = srv
        .create_drop("gate", "host1", group_body(10, 1, 3, 600))
        .await;
    let id = d["id"].as_str().unwrap().to_string();
    let (status, g) = open(&srv, &id, "leader").await;
    assert_eq!(status, 201);
    let gid = g["group_id"].as_str().unwrap().to_string();
    // Hosts ban like this; a banned viewer can neither open nor join a group in the room.
    let res = srv
        .http
        .post(srv.url("/api/rooms/gate/bans"))
        .bearer_auth(srv.token("host1", Role::Host))
        .json(&json!({"user":"pest"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let (status, body) = open(&srv, &id, "pest").await;
    assert_eq!((status, code(&body)), (403, "banned"));
    let (status, body) = join(&srv, &gid, "pest", "k").await;
    assert_eq!((status, code(&body)), (403, "banned"));
    assert_eq!(srv.levels(&id).await, (10, 9, 1, 0));
});
