//! Flash-sale claims through the real HTTP and WebSocket API, on both engines: exact counts
//! under concurrency, idempotent retries, per-user limits, expiry, bad quantities, the
//! sale window, live stock frames, store outages and the sold-out short-circuit.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::server::{ConservationSampler, Engine, Received, TestServer};
use livedrop::auth::Role;
use reqwest::Method;
use serde_json::{Value, json};

fn drop_body(stock: u64, per_user: u64, hold: u64) -> Value {
    json!({"sku":"SKU-1","title":"Sneakers","price":12900,"currency":"USD",
           "stock":stock,"per_user_limit":per_user,"hold_secs":hold,"kind":"flash"})
}

async fn claim(srv: &TestServer, drop: &str, user: &str, key: &str, qty: Value) -> (u16, Value) {
    let res = srv
        .http
        .post(srv.url(&format!("/api/drops/{drop}/claims")))
        .bearer_auth(srv.token(user, Role::Viewer))
        .header("Idempotency-Key", key)
        .json(&json!({ "qty": qty }))
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

both_engines!(drop_lifecycle_and_access, |engine| async move {
    let srv = TestServer::start(engine).await;
    srv.create_room("shop", "host1").await;
    srv.create_room("other", "host2").await;
    let (mut viewer, welcome) = srv.viewer("shop", "v1").await;
    assert!(welcome["drops"].as_array().unwrap().is_empty());

    // Only the room's own host may drop products into it.
    for (token, status) in [
        (srv.token("v1", Role::Viewer), 403),
        (srv.token("host2", Role::Host), 403),
    ] {
        let res = srv
            .http
            .post(srv.url("/api/rooms/shop/drops"))
            .bearer_auth(token)
            .json(&drop_body(10, 1, 300))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), status);
    }
    // Bad drops are refused with bad_drop.
    for bad in [
        json!({"sku":"S","title":"T","price":1,"stock":0}),
        json!({"sku":"S","title":"T","price":-5,"stock":1}),
        json!({"sku":"S","title":"T","price":1,"stock":1,"currency":"usd"}),
        json!({"sku":"S","title":"T","price":1,"stock":1,"starts_at":"yesterday"}),
        json!({"sku":"S","title":"T","price":1,"stock":1,"hold_secs":0}),
        json!({"sku":"","title":"T","price":1,"stock":1}),
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

    let d = srv
        .create_drop("shop", "host1", drop_body(10, 2, 300))
        .await;
    let id = d["id"].as_str().unwrap().to_string();
    assert_eq!(d["total"], 10);
    assert_eq!(d["remaining"], 10);
    let live = viewer.recv_type("drop_live").await;
    assert_eq!(live["id"], id.as_str());
    assert_eq!(live["price"], 12900);
    let (_, welcome) = srv.viewer("shop", "v2").await;
    assert_eq!(welcome["drops"][0]["id"], id.as_str());
    let (_, room) = srv.get_json("/api/rooms/shop").await;
    assert_eq!(room["drops"][0]["id"], id.as_str());

    // Claim, confirm over the WebSocket, release over HTTP, list my claims.
    viewer
        .send(json!({"type":"claim","drop": id,"qty":1,"key":"k1"}))
        .await;
    let r = viewer.recv_type("claim_result").await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["key"], "k1");
    let claim_id = r["claim"]["claim_id"].as_str().unwrap().to_string();
    viewer
        .send(json!({"type":"confirm","claim": claim_id}))
        .await;
    let c = viewer.recv_type("claim_result").await;
    assert_eq!(c["claim"]["status"], "sold", "{c}");
    let (status, second) = claim(&srv, &id, "v1", "k2", json!(1)).await;
    assert_eq!(status, 201);
    let second_id = second["claim_id"].as_str().unwrap();
    // Someone else cannot release my claim.
    let (status, _) = srv
        .call(
            Method::DELETE,
            format!("/api/claims/{second_id}"),
            "v2",
            Role::Viewer,
        )
        .await;
    assert_eq!(status, 403);
    let (status, released) = srv
        .call(
            Method::DELETE,
            format!("/api/claims/{second_id}"),
            "v1",
            Role::Viewer,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(released["status"], "released");
    // Confirming a released claim is refused.
    let (status, body) = srv
        .call(
            Method::POST,
            format!("/api/claims/{second_id}/confirm"),
            "v1",
            Role::Viewer,
        )
        .await;
    assert_eq!(status, 409);
    assert_eq!(body["code"], "claim_closed");
    assert_eq!(srv.levels(&id).await, (10, 9, 0, 1));
    let (_, mine) = srv
        .call(Method::GET, "/api/me/claims", "v1", Role::Viewer)
        .await;
    assert_eq!(mine["claims"].as_array().unwrap().len(), 2);

    // Ending: drop_ended to the room, then claims are refused with `ended`.
    let (status, _) = srv
        .call(
            Method::POST,
            format!("/api/drops/{id}/end"),
            "host2",
            Role::Host,
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = srv
        .call(
            Method::POST,
            format!("/api/drops/{id}/end"),
            "host1",
            Role::Host,
        )
        .await;
    assert_eq!(status, 200);
    let ended = viewer.recv_type("drop_ended").await;
    assert_eq!(ended["drop"], id.as_str());
    let (status, body) = claim(&srv, &id, "v3", "k1", json!(1)).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("ended")));
    assert_eq!(srv.levels(&id).await, (10, 9, 0, 1));
    // A viewer cannot read the ledger.
    let (status, _) = srv
        .call(
            Method::GET,
            format!("/api/drops/{id}/ledger"),
            "v1",
            Role::Viewer,
        )
        .await;
    assert_eq!(status, 403);
});

both_engines!(two_thousand_claimers_on_137, |engine| async move {
    let srv = Arc::new(TestServer::start(engine).await);
    srv.create_room("rush", "host1").await;
    let (mut watcher, _) = srv.viewer("rush", "watcher").await;
    let d = srv
        .create_drop("rush", "host1", drop_body(137, 1, 300))
        .await;
    let id = d["id"].as_str().unwrap().to_string();

    // Sample conservation while the rush runs.
    let sampler = ConservationSampler::start(srv.clone(), &id);
    let mut tasks = Vec::new();
    for i in 0..2000 {
        let (srv, id) = (srv.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            claim(&srv, &id, &format!("u{i}"), "rush-key", json!(1)).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            201 => ok += 1,
            409 => assert_eq!(body["code"], "sold_out"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(sampler.stop().await > 0);
    assert_eq!(ok, 137);
    assert_eq!(srv.levels(&id).await, (137, 0, 137, 0));
    assert_eq!(srv.ledger_ops(&id, "host1", "claim").await, 137);

    // The room saw sold_out and a final stock frame of 0.
    let mut sold_out = false;
    let mut last_stock = None;
    while !(sold_out && last_stock == Some(0)) {
        match watcher.next_within(Duration::from_secs(10)).await {
            Some(Received::Frame(f)) if f["type"] == "sold_out" => sold_out = true,
            Some(Received::Frame(f)) if f["type"] == "stock" => {
                last_stock = f["remaining"].as_u64();
            }
            Some(Received::Frame(_)) => {}
            other => panic!("sold_out={sold_out} last_stock={last_stock:?}: {other:?}"),
        }
    }
});

both_engines!(idempotent_retries_and_limits, |engine| async move {
    let srv = Arc::new(TestServer::start(engine).await);
    srv.create_room("retry", "host1").await;
    let d = srv
        .create_drop("retry", "host1", drop_body(100, 2, 300))
        .await;
    let id = d["id"].as_str().unwrap().to_string();

    // Each key sent three times, two of them concurrently: one unit per key.
    for k in 0..10 {
        let key = format!("key-{k}");
        let user = format!("buyer{k}");
        let a = {
            let (srv, id, user, key) = (srv.clone(), id.clone(), user.clone(), key.clone());
            tokio::spawn(async move { claim(&srv, &id, &user, &key, json!(1)).await })
        };
        let b = {
            let (srv, id, user, key) = (srv.clone(), id.clone(), user.clone(), key.clone());
            tokio::spawn(async move { claim(&srv, &id, &user, &key, json!(1)).await })
        };
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        let c = claim(&srv, &id, &user, &key, json!(1)).await;
        assert_eq!(a.0, 201);
        assert_eq!(a, b);
        assert_eq!(a, c);
        // Same key, different body.
        let (status, body) = claim(&srv, &id, &user, &key, json!(2)).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (422, Some("idempotency_mismatch"))
        );
    }
    assert_eq!(srv.levels(&id).await, (100, 90, 10, 0));

    // Per-user limit 2, 50 concurrent requests from one user with distinct keys.
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (srv, id) = (srv.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            claim(&srv, &id, "greedy", &format!("g{i}"), json!(1)).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let (status, body) = t.await.unwrap();
        if status == 201 {
            ok += 1;
        } else {
            assert_eq!(
                (status, body["code"].as_str()),
                (409, Some("limit_reached"))
            );
        }
    }
    assert_eq!(ok, 2);
    assert_eq!(srv.levels(&id).await, (100, 88, 12, 0));
});

both_engines!(bad_quantities_and_window, |engine| async move {
    let srv = TestServer::start(engine).await;
    srv.create_room("q", "host1").await;
    let d = srv.create_drop("q", "host1", drop_body(5, 5, 300)).await;
    let id = d["id"].as_str().unwrap().to_string();
    for (i, qty) in [
        json!(0),
        json!(-1),
        json!(1.5),
        json!(1e30),
        json!("1"),
        json!(18446744073709551615u64),
        json!(null),
        json!(1001),
    ]
    .into_iter()
    .enumerate()
    {
        let (status, body) = claim(&srv, &id, "v", &format!("q{i}"), qty.clone()).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (422, Some("bad_quantity")),
            "{qty}"
        );
    }
    // Missing or malformed Idempotency-Key; unknown and malformed drops.
    let res = srv
        .http
        .post(srv.url(&format!("/api/drops/{id}/claims")))
        .bearer_auth(srv.token("v", Role::Viewer))
        .json(&json!({"qty":1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], "missing_idempotency_key");
    let (status, body) = claim(&srv, &id, "v", "bad key:{x}", json!(1)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("bad_idempotency_key"))
    );
    let (status, _) = claim(&srv, "nope", "v", "k", json!(1)).await;
    assert_eq!(status, 404);
    let (status, _) = claim(&srv, "{drop:x}:meta", "v", "k", json!(1)).await;
    assert_eq!(status, 404);
    let (status, body) = claim(&srv, &id, "v", "k", json!(6)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("limit_reached"))
    );
    assert_eq!(srv.levels(&id).await, (5, 5, 0, 0));

    // A drop that starts tomorrow.
    let mut later = drop_body(5, 1, 300);
    later["starts_at"] = json!("2099-01-01T00:00:00Z");
    let d = srv.create_drop("q", "host1", later).await;
    let later_id = d["id"].as_str().unwrap();
    let (status, body) = claim(&srv, later_id, "v", "k", json!(1)).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("not_started")));
    // A drop whose window closed.
    let mut past = drop_body(5, 1, 300);
    past["starts_at"] = json!("2020-01-01T00:00:00Z");
    past["ends_at"] = json!("2020-01-02T00:00:00Z");
    let d = srv.create_drop("q", "host1", past).await;
    let past_id = d["id"].as_str().unwrap();
    let (status, body) = claim(&srv, past_id, "v", "k", json!(1)).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("ended")));
    assert_eq!(srv.levels(later_id).await, (5, 5, 0, 0));
    assert_eq!(srv.levels(past_id).await, (5, 5, 0, 0));
});

both_engines!(
    unconfirmed_holds_expire_back_to_stock,
    |engine| async move {
        let srv = TestServer::start_with(engine, |c| c.sweep_ms = 50).await;
        srv.create_room("exp", "host1").await;
        let (mut watcher, _) = srv.viewer("exp", "watcher").await;
        let d = srv.create_drop("exp", "host1", drop_body(20, 1, 1)).await;
        let id = d["id"].as_str().unwrap().to_string();
        for i in 0..20 {
            assert_eq!(
                claim(&srv, &id, &format!("u{i}"), "k", json!(1)).await.0,
                201
            );
        }
        assert_eq!(srv.levels(&id).await, (20, 0, 20, 0));
        // Two more sweepers race the server's own.
        let state = srv.state.clone();
        let extra = tokio::spawn(async move {
            for _ in 0..40 {
                tokio::join!(state.commerce.sweep_once(), state.commerce.sweep_once());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        loop {
            match watcher.next_within(Duration::from_secs(10)).await {
                Some(Received::Frame(f)) if f["type"] == "stock" && f["remaining"] == 20 => break,
                Some(Received::Frame(_)) => {}
                other => panic!("stock never came back: {other:?}"),
            }
        }
        extra.await.unwrap();
        assert_eq!(srv.levels(&id).await, (20, 20, 0, 0));
        assert_eq!(srv.ledger_ops(&id, "host1", "expire").await, 20);
        // Per-user counts were freed: the same users can claim again.
        assert_eq!(claim(&srv, &id, "u0", "k2", json!(1)).await.0, 201);
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_outage_fails_fast_and_recovers() {
    let mut srv = TestServer::start_with(Engine::Redis, |c| c.redis_timeout_ms = 300).await;
    srv.create_room("out", "host1").await;
    let d = srv.create_drop("out", "host1", drop_body(10, 1, 300)).await;
    let id = d["id"].as_str().unwrap().to_string();
    let (mut viewer, _) = srv.viewer("out", "v").await;

    srv.redis.as_mut().unwrap().kill9();
    let (status, body) = claim(&srv, &id, "u1", "k", json!(1)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("store_unavailable"))
    );
    let res = srv.http.get(srv.url("/readyz")).send().await.unwrap();
    assert_eq!(res.status(), 503);
    // The room stays up: the socket answers pings and likes are kept for later.
    viewer.send(json!({"type":"ping"})).await;
    viewer.recv_type("pong").await;
    viewer.send(json!({"type":"like","count":3})).await;

    srv.redis.as_mut().unwrap().restart();
    let mut recovered = false;
    for _ in 0..50 {
        let (status, _) = claim(&srv, &id, "u1", "k", json!(1)).await;
        if status == 201 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Without persistence the restarted Redis is empty: the drop is gone (404), which is
    // still an answer from a live store. Either way the server reconnected by itself.
    if !recovered {
        let (status, _) = claim(&srv, &id, "u1", "k", json!(1)).await;
        assert_eq!(status, 404);
    }
    let res = srv.http.get(srv.url("/readyz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sold_out_short_circuit_skips_the_store() {
    let srv = TestServer::start(Engine::Redis).await;
    srv.create_room("so", "host1").await;
    let d = srv.create_drop("so", "host1", drop_body(2, 1, 300)).await;
    let id = d["id"].as_str().unwrap().to_string();
    let mut first = Value::Null;
    for u in ["a", "b"] {
        let (status, c) = claim(&srv, &id, u, "k", json!(1)).await;
        assert_eq!(status, 201);
        let cid = c["claim_id"].as_str().unwrap();
        let res = srv
            .http
            .post(srv.url(&format!("/api/claims/{cid}/confirm")))
            .bearer_auth(srv.token(u, Role::Viewer))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        if u == "a" {
            first = c;
        }
    }
    // Sold out with nothing reserved: freeze Redis; a newcomer is still answered at once.
    srv.redis.as_ref().unwrap().pause();
    let (status, body) = claim(&srv, &id, "newcomer", "k", json!(1)).await;
    srv.redis.as_ref().unwrap().resume();
    assert_eq!((status, body["code"].as_str()), (409, Some("sold_out")));
    // A holder's retry still reaches the store and gets its original answer.
    let (status, again) = claim(&srv, &id, "a", "k", json!(1)).await;
    assert_eq!(status, 201);
    assert_eq!(again["claim_id"], first["claim_id"]);
}
