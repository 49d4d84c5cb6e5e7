//! One conformance suite, two engines: every test body below runs against `MemoryStore` and
//! against `RedisStore` on a fresh `redis-server`. Counts are exact; nothing depends on
//! timing except the redis crash tests, which only wait for things to happen.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::redis_server::RedisServer;
use livedrop::error::AppResult;
use livedrop::model::{
    ClaimStatus, Drop, DropKind, GroupStatus, GroupTerms, LedgerEntry, Millis, Room, User,
};
use livedrop::store::memory::MemoryStore;
use livedrop::store::redis::RedisStore;
use livedrop::store::{ClaimRequest, GroupRequest, Reservation, Store, USER_CLAIMS_MAX};

const T0: Millis = 1_700_000_000_000;
const KEY_TTL: u64 = 600;

type S = Arc<dyn Store>;

fn user(id: &str) -> User {
    User {
        id: id.to_string(),
        name: format!("name of {id}"),
    }
}

fn room(id: &str) -> Room {
    Room {
        id: id.to_string(),
        title: format!("room {id}"),
        owner: "host1".to_string(),
        created_at: T0,
    }
}

fn drop_(id: &str, stock: u64, limit: u64) -> Drop {
    Drop {
        id: id.to_string(),
        room: "r1".to_string(),
        sku: "SKU-1".to_string(),
        title: "A thing".to_string(),
        price: 1999,
        currency: "EUR".to_string(),
        stock,
        per_user_limit: limit,
        starts_at: T0,
        ends_at: None,
        hold_secs: 60,
        kind: DropKind::Flash,
        created_at: T0 - 1000,
        group: None,
    }
}

fn req(drop: &str, user_id: &str, key: &str, qty: u64, now: Millis) -> ClaimRequest {
    ClaimRequest {
        drop: drop.to_string(),
        user: user(user_id),
        qty,
        key: key.to_string(),
        now,
        key_ttl_secs: KEY_TTL,
    }
}

fn code<T: std::fmt::Debug>(r: AppResult<T>) -> &'static str {
    match r {
        Ok(v) => panic!("expected a refusal, got {v:?}"),
        Err(e) => e.code,
    }
}

async fn assert_conserved(s: &S, drop: &str) {
    let st = s.get_drop(drop).await.unwrap().unwrap();
    assert!(st.levels.conserved(), "not conserved: {:?}", st.levels);
}

fn ledger_ops(l: &[LedgerEntry], op: &str) -> usize {
    l.iter().filter(|e| e.op == op).count()
}

// ---------------------------------------------------------------------------------------
// Test bodies.

async fn rooms(s: S) {
    s.create_room(&room("r1")).await.unwrap();
    assert_eq!(code(s.create_room(&room("r1")).await), "room_exists");
    assert_eq!(s.get_room("r1").await.unwrap(), Some(room("r1")));
    assert_eq!(s.get_room("nope").await.unwrap(), None);
    s.ping().await.unwrap();
}

async fn chat(s: S) {
    s.create_room(&room("r1")).await.unwrap();
    assert_eq!(s.chat_seq("r1").await.unwrap(), 0);
    assert_eq!(s.chat_since("r1", 0).await.unwrap(), Some(vec![]));
    assert_eq!(s.recent_chat("r1", 10).await.unwrap(), vec![]);
    let u = user("u1");
    let mut sent = Vec::new();
    for i in 1..=3u64 {
        let m = s
            .append_chat(
                "r1",
                &format!("m{i}"),
                &u,
                &format!("hello {i} | ok"),
                T0 + i as i64,
                100,
            )
            .await
            .unwrap();
        assert_eq!(m.seq, i);
        assert_eq!(m.user, u);
        sent.push(m);
    }
    assert_eq!(s.chat_seq("r1").await.unwrap(), 3);
    assert_eq!(s.recent_chat("r1", 2).await.unwrap(), sent[1..].to_vec());
    assert_eq!(s.recent_chat("r1", 10).await.unwrap(), sent);
    assert_eq!(s.recent_chat("r1", 0).await.unwrap(), vec![]);
    assert_eq!(s.chat_since("r1", 0).await.unwrap(), Some(sent.clone()));
    assert_eq!(
        s.chat_since("r1", 2).await.unwrap(),
        Some(sent[2..].to_vec())
    );
    assert_eq!(s.chat_since("r1", 3).await.unwrap(), Some(vec![]));
    assert_eq!(s.chat_since("r1", 99).await.unwrap(), Some(vec![]));

    // A small history: only the last 3 of 5 are kept (seq 3, 4, 5).
    s.create_room(&room("r2")).await.unwrap();
    let mut kept = Vec::new();
    for i in 1..=5u64 {
        let m = s
            .append_chat("r2", &format!("m{i}"), &u, "x", T0, 3)
            .await
            .unwrap();
        if i >= 3 {
            kept.push(m);
        }
    }
    assert_eq!(s.recent_chat("r2", 10).await.unwrap(), kept);
    assert_eq!(s.chat_since("r2", 0).await.unwrap(), None);
    assert_eq!(s.chat_since("r2", 1).await.unwrap(), None);
    assert_eq!(s.chat_since("r2", 2).await.unwrap(), Some(kept.clone()));
    assert_eq!(
        s.chat_since("r2", 4).await.unwrap(),
        Some(kept[2..].to_vec())
    );
    assert_eq!(s.chat_seq("r2").await.unwrap(), 5);

    // Unknown room.
    assert_eq!(
        code(s.append_chat("zz", "m", &u, "x", T0, 3).await),
        "not_found"
    );
    assert_eq!(code(s.recent_chat("zz", 3).await), "not_found");
    assert_eq!(code(s.chat_since("zz", 0).await), "not_found");
    assert_eq!(code(s.chat_seq("zz").await), "not_found");
}

async fn likes(s: S) {
    s.create_room(&room("r1")).await.unwrap();
    assert_eq!(s.likes("r1").await.unwrap(), 0);
    assert_eq!(s.add_likes("r1", 5).await.unwrap(), 5);
    assert_eq!(s.add_likes("r1", 3).await.unwrap(), 8);
    assert_eq!(s.likes("r1").await.unwrap(), 8);
    assert_eq!(code(s.add_likes("zz", 1).await), "not_found");
    assert_eq!(code(s.likes("zz").await), "not_found");
}

async fn drops(s: S) {
    let d = drop_("d1", 10, 2);
    let st = s.create_drop(&d).await.unwrap();
    assert_eq!(st.drop, d);
    assert_eq!(
        (
            st.levels.total,
            st.levels.remaining,
            st.levels.reserved,
            st.levels.sold
        ),
        (10, 10, 0, 0)
    );
    assert!(!st.ended);
    assert_eq!(code(s.create_drop(&d).await), "drop_exists");
    assert_eq!(s.get_drop("d1").await.unwrap(), Some(st.clone()));
    assert_eq!(s.get_drop("nope").await.unwrap(), None);
    let mut d2 = drop_("d2", 5, 1);
    d2.ends_at = Some(T0 + 5000);
    d2.kind = DropKind::Group;
    let st2 = s.create_drop(&d2).await.unwrap();
    assert_eq!(s.room_drops("r1").await.unwrap(), vec![st, st2]);
    assert_eq!(s.room_drops("other").await.unwrap(), vec![]);
    // A refused duplicate in another room does not show up there.
    let mut elsewhere = drop_("d1", 3, 1);
    elsewhere.room = "other".to_string();
    assert_eq!(code(s.create_drop(&elsewhere).await), "drop_exists");
    assert_eq!(s.room_drops("other").await.unwrap(), vec![]);
    assert_eq!(s.get_drop("d1").await.unwrap().unwrap().drop, d);
    // Nothing is held yet: nothing to sweep.
    assert!(s.sweepable_drops().await.unwrap().is_empty());
    s.claim(&req("d2", "u1", "k1", 1, T0)).await.unwrap();
    assert_eq!(s.sweepable_drops().await.unwrap(), vec!["d2".to_string()]);
}

async fn claim_success(s: S) {
    s.create_drop(&drop_("d1", 10, 3)).await.unwrap();
    let r = s.claim(&req("d1", "u1", "k1", 2, T0 + 5)).await.unwrap();
    assert!(!r.replay);
    assert_eq!(r.claim.claim_id, "d1.1");
    assert_eq!(r.claim.drop, "d1");
    assert_eq!(r.claim.user, "u1");
    assert_eq!(r.claim.qty, 2);
    assert_eq!(r.claim.status, ClaimStatus::Reserved);
    assert_eq!(r.claim.created_at, T0 + 5);
    assert_eq!(r.claim.expires_at, T0 + 5 + 60_000);
    assert_eq!(
        (
            r.levels.total,
            r.levels.remaining,
            r.levels.reserved,
            r.levels.sold
        ),
        (10, 8, 2, 0)
    );
    let r2 = s.claim(&req("d1", "u2", "k1", 1, T0 + 6)).await.unwrap();
    assert_eq!(r2.claim.claim_id, "d1.2");
    assert_eq!(s.get_claim("d1.1").await.unwrap(), Some(r.claim.clone()));
    assert_eq!(s.get_claim("d1.3").await.unwrap(), None);
    assert_eq!(s.get_claim("bogus").await.unwrap(), None);
    assert_eq!(s.get_claim("nodrop.1").await.unwrap(), None);
    assert_conserved(&s, "d1").await;
}

async fn refusals(s: S) {
    s.create_drop(&drop_("d1", 3, 2)).await.unwrap();
    // not_found
    assert_eq!(
        code(s.claim(&req("zz", "u1", "k", 1, T0)).await),
        "not_found"
    );
    // not_started
    assert_eq!(
        code(s.claim(&req("d1", "u1", "k", 1, T0 - 1)).await),
        "not_started"
    );
    // limit_reached (2 per person)
    s.claim(&req("d1", "u1", "k1", 2, T0)).await.unwrap();
    assert_eq!(
        code(s.claim(&req("d1", "u1", "k2", 1, T0)).await),
        "limit_reached"
    );
    assert_eq!(
        code(s.claim(&req("d1", "u2", "k1", 3, T0)).await),
        "limit_reached"
    );
    // sold_out (1 left)
    assert_eq!(
        code(s.claim(&req("d1", "u2", "k1", 2, T0)).await),
        "sold_out"
    );
    s.claim(&req("d1", "u2", "k2", 1, T0)).await.unwrap();
    assert_eq!(
        code(s.claim(&req("d1", "u3", "k1", 1, T0)).await),
        "sold_out"
    );
    // Limit is checked before stock.
    assert_eq!(
        code(s.claim(&req("d1", "u1", "k3", 1, T0)).await),
        "limit_reached"
    );
    assert_conserved(&s, "d1").await;

    // ended by end_drop; ending twice logs once; ended is checked before not_started.
    s.create_drop(&drop_("d2", 3, 2)).await.unwrap();
    let st = s.end_drop("d2", T0 + 1).await.unwrap();
    assert!(st.ended);
    let st = s.end_drop("d2", T0 + 2).await.unwrap();
    assert!(st.ended);
    assert_eq!(ledger_ops(&s.ledger("d2").await.unwrap(), "end"), 1);
    assert_eq!(code(s.claim(&req("d2", "u1", "k", 1, T0)).await), "ended");
    assert_eq!(
        code(s.claim(&req("d2", "u1", "k", 1, T0 - 10)).await),
        "ended"
    );
    assert!(s.get_drop("d2").await.unwrap().unwrap().ended);
    assert_eq!(code(s.end_drop("zz", T0).await), "not_found");

    // ended by ends_at
    let mut d3 = drop_("d3", 3, 2);
    d3.ends_at = Some(T0 + 1000);
    s.create_drop(&d3).await.unwrap();
    s.claim(&req("d3", "u1", "k", 1, T0 + 999)).await.unwrap();
    assert_eq!(
        code(s.claim(&req("d3", "u2", "k", 1, T0 + 1000)).await),
        "ended"
    );
    assert!(!s.get_drop("d3").await.unwrap().unwrap().ended);
}

async fn idempotency(s: S) {
    s.create_drop(&drop_("d1", 10, 5)).await.unwrap();
    let first = s.claim(&req("d1", "u1", "k1", 2, T0)).await.unwrap();
    let again = s.claim(&req("d1", "u1", "k1", 2, T0 + 10)).await.unwrap();
    assert!(again.replay);
    assert_eq!(again.claim, first.claim);
    assert_eq!(again.levels, first.levels);
    assert_eq!(
        code(s.claim(&req("d1", "u1", "k1", 1, T0 + 10)).await),
        "idempotency_mismatch"
    );
    // The same key of another user, or on another drop, is another request.
    let other = s.claim(&req("d1", "u2", "k1", 2, T0)).await.unwrap();
    assert!(!other.replay);
    assert_ne!(other.claim.claim_id, first.claim.claim_id);
    // A replay answers the claim as it is now, even after it changed.
    s.confirm(&first.claim.claim_id, "u1", T0 + 20)
        .await
        .unwrap();
    let after = s.claim(&req("d1", "u1", "k1", 2, T0 + 30)).await.unwrap();
    assert!(after.replay);
    assert_eq!(after.claim.status, ClaimStatus::Sold);
    // Once the key expired it is a new request.
    let later = T0 + KEY_TTL as i64 * 1000;
    let fresh = s.claim(&req("d1", "u1", "k1", 1, later)).await.unwrap();
    assert!(!fresh.replay);
    assert_eq!(fresh.claim.claim_id, "d1.3");
    let l = s.ledger("d1").await.unwrap();
    assert_eq!(ledger_ops(&l, "claim"), 3);
    let st = s.get_drop("d1").await.unwrap().unwrap();
    assert_eq!((st.levels.reserved, st.levels.sold), (3, 2));
}

async fn transitions(s: S) {
    s.create_drop(&drop_("d1", 10, 10)).await.unwrap();
    let a = s.claim(&req("d1", "u1", "a", 2, T0)).await.unwrap().claim;
    let b = s.claim(&req("d1", "u1", "b", 1, T0)).await.unwrap().claim;
    let c = s.claim(&req("d1", "u1", "c", 3, T0)).await.unwrap().claim;

    // confirm
    assert_eq!(
        code(s.confirm(&a.claim_id, "u2", T0 + 1).await),
        "forbidden"
    );
    let t = s.confirm(&a.claim_id, "u1", T0 + 1).await.unwrap();
    assert_eq!(t.claim.status, ClaimStatus::Sold);
    assert_eq!(t.claim.expires_at, a.expires_at);
    assert_eq!(
        (t.levels.remaining, t.levels.reserved, t.levels.sold),
        (4, 4, 2)
    );
    let t2 = s.confirm(&a.claim_id, "u1", T0 + 2).await.unwrap();
    assert_eq!(t2, t);
    assert_eq!(
        code(s.release(&a.claim_id, "u1", T0 + 2).await),
        "claim_closed"
    );

    // release
    assert_eq!(
        code(s.release(&b.claim_id, "u2", T0 + 3).await),
        "forbidden"
    );
    let r = s.release(&b.claim_id, "u1", T0 + 3).await.unwrap();
    assert_eq!(r.claim.status, ClaimStatus::Released);
    assert_eq!(
        (r.levels.remaining, r.levels.reserved, r.levels.sold),
        (5, 3, 2)
    );
    assert_eq!(s.release(&b.claim_id, "u1", T0 + 4).await.unwrap(), r);
    assert_eq!(
        code(s.confirm(&b.claim_id, "u1", T0 + 4).await),
        "claim_closed"
    );

    // claim_expired: the hold passed but no sweep ran yet
    assert_eq!(
        code(s.confirm(&c.claim_id, "u1", c.expires_at).await),
        "claim_expired"
    );
    // after the sweep: closed
    let sw = s.sweep("d1", c.expires_at).await.unwrap();
    assert_eq!(sw.expired.len(), 1);
    assert_eq!(
        code(s.confirm(&c.claim_id, "u1", c.expires_at).await),
        "claim_closed"
    );
    assert_eq!(
        code(s.release(&c.claim_id, "u1", c.expires_at).await),
        "claim_closed"
    );

    // not_found
    for bogus in ["d1.99", "zz.1", "garbage", "d1.", "d1.x"] {
        assert_eq!(
            code(s.confirm(bogus, "u1", T0).await),
            "not_found",
            "{bogus}"
        );
        assert_eq!(
            code(s.release(bogus, "u1", T0).await),
            "not_found",
            "{bogus}"
        );
    }
    assert_conserved(&s, "d1").await;
    let st = s.get_drop("d1").await.unwrap().unwrap();
    assert_eq!(
        (st.levels.remaining, st.levels.reserved, st.levels.sold),
        (8, 0, 2)
    );
}

async fn sweep_once(s: S) {
    let mut d = drop_("d1", 10, 2);
    d.hold_secs = 10;
    s.create_drop(&d).await.unwrap();
    let a = s.claim(&req("d1", "u1", "a", 2, T0)).await.unwrap().claim;
    let b = s
        .claim(&req("d1", "u2", "a", 1, T0 + 500))
        .await
        .unwrap()
        .claim;
    let c = s
        .claim(&req("d1", "u3", "a", 1, T0 + 5000))
        .await
        .unwrap()
        .claim;
    s.confirm(&c.claim_id, "u3", T0 + 5001).await.unwrap();
    assert_eq!(code(s.sweep("zz", T0).await), "not_found");
    // Nothing due yet.
    assert!(s.sweep("d1", T0 + 9_999).await.unwrap().expired.is_empty());
    // Only a is due.
    let sw = s.sweep("d1", T0 + 10_000).await.unwrap();
    assert_eq!(sw.expired.len(), 1);
    assert_eq!(sw.expired[0].claim_id, a.claim_id);
    assert_eq!(sw.expired[0].status, ClaimStatus::Expired);
    assert_eq!(
        (sw.levels.remaining, sw.levels.reserved, sw.levels.sold),
        (8, 1, 1)
    );
    let sw = s.sweep("d1", T0 + 20_000).await.unwrap();
    assert_eq!(
        sw.expired.iter().map(|c| &c.claim_id).collect::<Vec<_>>(),
        vec![&b.claim_id]
    );
    assert!(s.sweep("d1", T0 + 30_000).await.unwrap().expired.is_empty());
    // The units came back to u1: two more fit in the limit again.
    s.claim(&req("d1", "u1", "b", 2, T0 + 30_000))
        .await
        .unwrap();
    let l = s.ledger("d1").await.unwrap();
    assert_eq!(ledger_ops(&l, "expire"), 2);
    assert_conserved(&s, "d1").await;
}

async fn ledger_contents(s: S) {
    s.create_drop(&drop_("d1", 5, 5)).await.unwrap();
    let a = s
        .claim(&req("d1", "u1", "a", 2, T0 + 1))
        .await
        .unwrap()
        .claim;
    let b = s
        .claim(&req("d1", "u2", "a", 1, T0 + 2))
        .await
        .unwrap()
        .claim;
    let c = s
        .claim(&req("d1", "u2", "b", 1, T0 + 3))
        .await
        .unwrap()
        .claim;
    s.claim(&req("d1", "u1", "a", 2, T0 + 4)).await.unwrap(); // replay: no entry
    s.confirm(&a.claim_id, "u1", T0 + 5).await.unwrap();
    s.confirm(&a.claim_id, "u1", T0 + 6).await.unwrap(); // again: no entry
    s.release(&b.claim_id, "u2", T0 + 7).await.unwrap();
    s.sweep("d1", c.expires_at).await.unwrap();
    s.end_drop("d1", T0 + 70_000).await.unwrap();
    let e = |op: &str, claim: Option<&str>, user: Option<&str>, qty: u64, ts: Millis| LedgerEntry {
        op: op.to_string(),
        claim_id: claim.map(str::to_string),
        user: user.map(str::to_string),
        qty,
        ts,
        group: None,
    };
    let expected = vec![
        e("create", None, None, 5, T0 - 1000),
        e("claim", Some("d1.1"), Some("u1"), 2, T0 + 1),
        e("claim", Some("d1.2"), Some("u2"), 1, T0 + 2),
        e("claim", Some("d1.3"), Some("u2"), 1, T0 + 3),
        e("confirm", Some("d1.1"), Some("u1"), 2, T0 + 5),
        e("release", Some("d1.2"), Some("u2"), 1, T0 + 7),
        e("expire", Some("d1.3"), Some("u2"), 1, c.expires_at),
        e("end", None, None, 0, T0 + 70_000),
    ];
    assert_eq!(s.ledger("d1").await.unwrap(), expected);
    assert_eq!(code(s.ledger("zz").await), "not_found");
}

async fn user_claims(s: S) {
    s.create_drop(&drop_("d1", 10, 5)).await.unwrap();
    s.create_drop(&drop_("d2", 10, 5)).await.unwrap();
    // Distinct times: the list is newest first, and claims of one millisecond have no order.
    let a = s.claim(&req("d1", "u1", "a", 1, T0)).await.unwrap().claim;
    let b = s
        .claim(&req("d2", "u1", "a", 1, T0 + 1))
        .await
        .unwrap()
        .claim;
    s.claim(&req("d2", "u1", "a", 1, T0 + 2)).await.unwrap(); // replay: not listed twice
    s.claim(&req("d1", "u2", "a", 1, T0 + 3)).await.unwrap();
    let c = s
        .claim(&req("d1", "u1", "b", 1, T0 + 4))
        .await
        .unwrap()
        .claim;
    let c = s.confirm(&c.claim_id, "u1", T0).await.unwrap().claim;
    assert_eq!(s.user_claims("u1").await.unwrap(), vec![c, b, a]);
    assert_eq!(s.user_claims("nobody").await.unwrap(), vec![]);
}

/// A user with more claims in one drop than a listing shows (released ones included):
/// exactly the newest `USER_CLAIMS_MAX`, newest first, after the store trimmed its index.
async fn user_claims_newest_only(s: S) {
    const FIRST: usize = 1000;
    const MORE: usize = 600;
    s.create_drop(&drop_("d1", 5000, FIRST as u64))
        .await
        .unwrap();
    let mut ids: Vec<String> = Vec::new();
    for i in 0..FIRST + MORE {
        if i == FIRST {
            for id in &ids[..MORE] {
                s.release(id, "u1", T0 + 5000).await.unwrap();
            }
        }
        let now = T0 + 10_000 + i as Millis;
        let r = req("d1", "u1", &format!("k{i}"), 1, now);
        ids.push(s.claim(&r).await.unwrap().claim.claim_id);
    }
    let listed: Vec<String> = s
        .user_claims("u1")
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.claim_id)
        .collect();
    let newest: Vec<String> = ids.iter().rev().take(USER_CLAIMS_MAX).cloned().collect();
    assert_eq!(listed, newest);
}

/// 2 000 concurrent claimers, stock 137: exactly 137 win; conservation holds in samples
/// taken during the run and at the end.
async fn concurrent_claims(s: S) {
    const N: usize = 2000;
    const STOCK: u64 = 137;
    s.create_drop(&drop_("d1", STOCK, 1)).await.unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (s, done) = (s.clone(), done.clone());
        tokio::spawn(async move {
            let mut samples = 0usize;
            loop {
                let finished = done.load(Ordering::SeqCst);
                let st = s.get_drop("d1").await.unwrap().unwrap();
                assert!(
                    st.levels.conserved(),
                    "sample not conserved: {:?}",
                    st.levels
                );
                samples += 1;
                if finished {
                    return samples;
                }
                tokio::task::yield_now().await;
            }
        })
    };
    let mut tasks = Vec::with_capacity(N);
    for i in 0..N {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.claim(&req("d1", &format!("user{i}"), "k", 1, T0)).await
        }));
    }
    let mut ok = HashSet::new();
    let mut sold_out = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => assert!(ok.insert(r.claim.claim_id)),
            Err(e) => {
                assert_eq!(e.code, "sold_out");
                sold_out += 1;
            }
        }
    }
    done.store(true, Ordering::SeqCst);
    assert!(sampler.await.unwrap() >= 1);
    assert_eq!(ok.len() as u64, STOCK);
    assert_eq!(sold_out, N - STOCK as usize);
    let st = s.get_drop("d1").await.unwrap().unwrap();
    assert!(st.levels.conserved());
    assert_eq!((st.levels.remaining, st.levels.reserved), (0, STOCK));
    let l = s.ledger("d1").await.unwrap();
    assert_eq!(ledger_ops(&l, "claim"), STOCK as usize);
    let ledger_ids: HashSet<_> = l.iter().filter_map(|e| e.claim_id.clone()).collect();
    assert_eq!(ledger_ids, ok);
}

/// One user, limit 2, 50 concurrent requests with distinct keys: exactly 2 units.
async fn concurrent_limit(s: S) {
    s.create_drop(&drop_("d1", 100, 2)).await.unwrap();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.claim(&req("d1", "u1", &format!("k{i}"), 1, T0)).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.code, "limit_reached"),
        }
    }
    assert_eq!(ok, 2);
    let st = s.get_drop("d1").await.unwrap().unwrap();
    assert_eq!(st.levels.reserved, 2);
    assert!(st.levels.conserved());
}

/// The same key three times, two of them concurrently: one unit, identical answers.
async fn concurrent_same_key(s: S) {
    s.create_drop(&drop_("d1", 100, 5)).await.unwrap();
    let a = {
        let s = s.clone();
        tokio::spawn(async move { s.claim(&req("d1", "u1", "same", 1, T0)).await })
    };
    let b = {
        let s = s.clone();
        tokio::spawn(async move { s.claim(&req("d1", "u1", "same", 1, T0)).await })
    };
    let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
    let c = s.claim(&req("d1", "u1", "same", 1, T0)).await.unwrap();
    let all: [&Reservation; 3] = [&a, &b, &c];
    assert_eq!(all.iter().filter(|r| !r.replay).count(), 1);
    for r in all {
        assert_eq!(r.claim, a.claim);
        assert_eq!(r.levels, a.levels);
    }
    let st = s.get_drop("d1").await.unwrap().unwrap();
    assert_eq!(st.levels.reserved, 1);
    assert_eq!(ledger_ops(&s.ledger("d1").await.unwrap(), "claim"), 1);
}

/// 100 users each send the same key three times at once on stock 60 (limit 1): on redis
/// these land in shared claim batches, where a key's replay and the claims around it must
/// still answer exactly as if each ran alone. 60 users get one unit, each user's three
/// answers are identical, and every claim is in its user's claim index.
async fn concurrent_mixed_batch(s: S) {
    const USERS: usize = 100;
    const STOCK: u64 = 60;
    s.create_drop(&drop_("d1", STOCK, 1)).await.unwrap();
    let tasks: Vec<_> = (0..USERS * 3)
        .map(|i| {
            let s = s.clone();
            let u = format!("u{}", i % USERS);
            tokio::spawn(async move { (u.clone(), s.claim(&req("d1", &u, "k", 1, T0)).await) })
        })
        .collect();
    let mut answers: std::collections::HashMap<String, Vec<AppResult<Reservation>>> =
        Default::default();
    for t in tasks {
        let (u, r) = t.await.unwrap();
        answers.entry(u).or_default().push(r);
    }
    let mut winners = 0;
    for (u, rs) in &answers {
        assert_eq!(rs.len(), 3);
        match &rs[0] {
            Ok(first) => {
                winners += 1;
                assert_eq!(
                    rs.iter()
                        .filter(|r| matches!(r, Ok(r) if !r.replay))
                        .count(),
                    1
                );
                for r in rs {
                    assert_eq!(r.as_ref().unwrap().claim, first.claim, "user {u}");
                }
                let listed = s.user_claims(u).await.unwrap();
                assert_eq!(listed.len(), 1, "user {u}");
                assert_eq!(listed[0].claim_id, first.claim.claim_id);
            }
            Err(e) => {
                assert_eq!(e.code, "sold_out");
                assert!(
                    rs.iter()
                        .all(|r| matches!(r, Err(e) if e.code == "sold_out"))
                );
            }
        }
    }
    assert_eq!(winners, STOCK as usize);
    let st = s.get_drop("d1").await.unwrap().unwrap();
    assert_eq!((st.levels.remaining, st.levels.reserved), (0, STOCK));
    assert_eq!(
        ledger_ops(&s.ledger("d1").await.unwrap(), "claim"),
        STOCK as usize
    );
}

/// Three sweepers at once after the holds (1 s) passed: every unit back exactly once.
async fn concurrent_sweepers(s: S) {
    const N: usize = 300; // more than one SWEEP_BATCH
    let mut d = drop_("d1", N as u64, 1);
    d.hold_secs = 1;
    s.create_drop(&d).await.unwrap();
    for i in 0..N {
        s.claim(&req("d1", &format!("u{i}"), "k", 1, T0))
            .await
            .unwrap();
    }
    let later = T0 + 1000;
    let sweepers: Vec<_> = (0..3)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let sw = s.sweep("d1", later).await.unwrap();
                    assert!(sw.levels.conserved());
                    let n = sw.expired.len();
                    mine.extend(sw.expired.into_iter().map(|c| c.claim_id));
                    if n < livedrop::store::SWEEP_BATCH {
                        return mine;
                    }
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in sweepers {
        all.extend(t.await.unwrap());
    }
    let unique: HashSet<_> = all.iter().cloned().collect();
    assert_eq!(all.len(), N);
    assert_eq!(unique.len(), N);
    let st = s.get_drop("d1").await.unwrap().unwrap();
    assert_eq!((st.levels.remaining, st.levels.reserved), (N as u64, 0));
    let l = s.ledger("d1").await.unwrap();
    assert_eq!(ledger_ops(&l, "expire"), N);
    let expired_ids: HashSet<_> = l
        .iter()
        .filter(|e| e.op == "expire")
        .filter_map(|e| e.claim_id.clone())
        .collect();
    assert_eq!(expired_ids, unique);
    assert!(s.sweepable_drops().await.unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------
// Group buys.

/// A group drop: groups of `size`, 60 s to fill, group price 999, no solo claims.
fn group_drop_(id: &str, stock: u64, limit: u64, size: u64) -> Drop {
    Drop {
        kind: DropKind::Group,
        group: Some(GroupTerms {
            size,
            price: 999,
            window_secs: 60,
            allow_solo: false,
        }),
        ..drop_(id, stock, limit)
    }
}

fn greq(target: &str, user_id: &str, key: Option<&str>, now: Millis) -> GroupRequest {
    GroupRequest {
        target: target.to_string(),
        user: user(user_id),
        key: key.map(str::to_string),
        now,
        key_ttl_secs: KEY_TTL,
    }
}

fn counts(s: &livedrop::model::StockLevels) -> (u64, u64, u64, u64) {
    (s.total, s.remaining, s.reserved, s.sold)
}

async fn groups_open_join_complete(s: S) {
    s.create_drop(&group_drop_("d1", 10, 2, 3)).await.unwrap();
    let a = s.open_group(&greq("d1", "u1", None, T0)).await.unwrap();
    assert!(!a.replay);
    let g = &a.group;
    assert_eq!(g.group_id, "d1.g1");
    assert_eq!((g.drop.as_str(), g.size, g.price), ("d1", 3, 999));
    assert_eq!(g.members, vec!["u1".to_string()]);
    assert_eq!(g.status, GroupStatus::Open);
    assert_eq!((g.created_at, g.expires_at), (T0, T0 + 60_000));
    assert_eq!(counts(&a.levels), (10, 9, 1, 0));
    let b = s
        .join_group(&greq("d1.g1", "u2", Some("k"), T0 + 1))
        .await
        .unwrap();
    assert_eq!(b.group.members, vec!["u1".to_string(), "u2".to_string()]);
    assert_eq!(counts(&b.levels), (10, 8, 2, 0));
    assert_eq!(s.drop_groups("d1").await.unwrap(), vec![b.group.clone()]);
    assert_eq!(s.get_group("d1.g1").await.unwrap(), Some(b.group.clone()));
    // The last place completes the group in the same step: all three units sold.
    let c = s
        .join_group(&greq("d1.g1", "u3", Some("k"), T0 + 2))
        .await
        .unwrap();
    assert_eq!(c.group.status, GroupStatus::Completed);
    assert_eq!(c.group.members.len(), 3);
    assert_eq!(counts(&c.levels), (10, 7, 0, 3));
    assert_eq!(s.get_group("d1.g1").await.unwrap(), Some(c.group.clone()));
    assert_eq!(s.drop_groups("d1").await.unwrap(), vec![]);
    assert_eq!(
        code(s.join_group(&greq("d1.g1", "u4", Some("k"), T0 + 3)).await),
        "group_full"
    );
    // Group units count toward the per-user limit (2): u1 holds one sold unit.
    s.open_group(&greq("d1", "u1", None, T0 + 4)).await.unwrap();
    assert_eq!(
        code(s.open_group(&greq("d1", "u1", None, T0 + 5)).await),
        "limit_reached"
    );
    // A group-only drop refuses solo claims.
    assert_eq!(
        code(s.claim(&req("d1", "u5", "a", 1, T0)).await),
        "solo_not_allowed"
    );
    let e = |op: &str, user: Option<&str>, qty: u64, ts: Millis, g: &str| LedgerEntry {
        op: op.to_string(),
        claim_id: None,
        user: user.map(str::to_string),
        qty,
        ts,
        group: Some(g.to_string()),
    };
    let l = s.ledger("d1").await.unwrap();
    assert_eq!(
        l[1..].to_vec(),
        vec![
            e("group_open", Some("u1"), 1, T0, "d1.g1"),
            e("group_join", Some("u2"), 1, T0 + 1, "d1.g1"),
            e("group_join", Some("u3"), 1, T0 + 2, "d1.g1"),
            e("group_complete", None, 3, T0 + 2, "d1.g1"),
            e("group_open", Some("u1"), 1, T0 + 4, "d1.g2"),
        ]
    );
    assert_conserved(&s, "d1").await;
    // Solo claims where allowed share the stock and the limit.
    let mut solo = group_drop_("d2", 3, 2, 2);
    solo.group = solo.group.map(|t| GroupTerms {
        allow_solo: true,
        ..t
    });
    s.create_drop(&solo).await.unwrap();
    s.claim(&req("d2", "u1", "a", 1, T0)).await.unwrap();
    s.open_group(&greq("d2", "u1", None, T0)).await.unwrap();
    assert_eq!(
        code(s.claim(&req("d2", "u1", "b", 1, T0)).await),
        "limit_reached"
    );
    s.join_group(&greq("d2.g1", "u2", Some("k"), T0))
        .await
        .unwrap();
    let st = s.get_drop("d2").await.unwrap().unwrap();
    assert_eq!(counts(&st.levels), (3, 0, 1, 2));
}

async fn groups_refusals(s: S) {
    s.create_drop(&drop_("flash", 10, 2)).await.unwrap();
    s.create_drop(&group_drop_("d1", 2, 1, 3)).await.unwrap();
    assert_eq!(
        code(s.open_group(&greq("nope", "u1", None, T0)).await),
        "not_found"
    );
    assert_eq!(
        code(s.open_group(&greq("flash", "u1", None, T0)).await),
        "not_group"
    );
    for bad in ["d1.g9", "nope.g1", "d1.1", "garbage", "d1.g"] {
        assert_eq!(
            code(s.join_group(&greq(bad, "u1", Some("k"), T0)).await),
            "not_found",
            "{bad}"
        );
        assert_eq!(s.get_group(bad).await.unwrap(), None);
    }
    assert_eq!(code(s.drop_groups("nope").await), "not_found");
    let mut later = group_drop_("later", 5, 1, 2);
    later.starts_at = T0 + 10_000;
    s.create_drop(&later).await.unwrap();
    assert_eq!(
        code(s.open_group(&greq("later", "u1", None, T0)).await),
        "not_started"
    );
    s.open_group(&greq("d1", "u1", None, T0)).await.unwrap();
    assert_eq!(
        code(s.join_group(&greq("d1.g1", "u1", Some("k"), T0)).await),
        "already_member"
    );
    s.join_group(&greq("d1.g1", "u2", Some("k"), T0))
        .await
        .unwrap();
    // Stock 2 is all reserved by the group: the third place cannot be had.
    assert_eq!(
        code(s.join_group(&greq("d1.g1", "u3", Some("k"), T0)).await),
        "sold_out"
    );
    assert_eq!(
        code(s.open_group(&greq("d1", "u3", None, T0)).await),
        "sold_out"
    );
    // Limit 1: u1 holds a unit already.
    s.create_drop(&group_drop_("d2", 10, 1, 2)).await.unwrap();
    s.open_group(&greq("d2", "u1", None, T0)).await.unwrap();
    s.open_group(&greq("d2", "u2", None, T0)).await.unwrap();
    assert_eq!(
        code(s.join_group(&greq("d2.g2", "u1", Some("k"), T0)).await),
        "limit_reached"
    );
    // Past the deadline (not swept yet): closed; after the drop ends: ended.
    assert_eq!(
        code(
            s.join_group(&greq("d2.g1", "u3", Some("k"), T0 + 60_000))
                .await
        ),
        "group_closed"
    );
    s.end_drop("d2", T0 + 1).await.unwrap();
    assert_eq!(
        code(s.join_group(&greq("d2.g1", "u3", Some("k"), T0 + 2)).await),
        "ended"
    );
    assert_eq!(
        code(s.open_group(&greq("d2", "u3", None, T0 + 2)).await),
        "ended"
    );
    // A drop window shorter than the group window caps the deadline.
    let mut short = group_drop_("short", 5, 1, 2);
    short.ends_at = Some(T0 + 5_000);
    s.create_drop(&short).await.unwrap();
    let g = s.open_group(&greq("short", "u1", None, T0)).await.unwrap();
    assert_eq!(g.group.expires_at, T0 + 5_000);
    for d in ["d1", "d2", "short"] {
        assert_conserved(&s, d).await;
    }
}

async fn groups_idempotency(s: S) {
    s.create_drop(&group_drop_("d1", 10, 3, 2)).await.unwrap();
    let a = s
        .open_group(&greq("d1", "u1", Some("o"), T0))
        .await
        .unwrap();
    let again = s
        .open_group(&greq("d1", "u1", Some("o"), T0 + 1))
        .await
        .unwrap();
    assert!(again.replay);
    assert_eq!(again.group, a.group);
    assert_eq!(again.levels.reserved, 1);
    // Without a key, a second open is a second group.
    let b = s.open_group(&greq("d1", "u1", None, T0 + 2)).await.unwrap();
    assert_eq!(b.group.group_id, "d1.g2");
    // A join retried with the same key gets the same answer, even after it completed.
    let j = s
        .join_group(&greq("d1.g1", "u2", Some("j"), T0 + 3))
        .await
        .unwrap();
    assert!(!j.replay);
    assert_eq!(j.group.status, GroupStatus::Completed);
    let j2 = s
        .join_group(&greq("d1.g1", "u2", Some("j"), T0 + 4))
        .await
        .unwrap();
    assert!(j2.replay);
    assert_eq!(j2.group, j.group);
    // A different key from a member is already_member (before the group filled) or
    // group_full (after).
    assert_eq!(
        code(s.join_group(&greq("d1.g1", "u2", Some("j2"), T0 + 5)).await),
        "group_full"
    );
    s.join_group(&greq("d1.g2", "u3", Some("j"), T0 + 5))
        .await
        .unwrap();
    let st = s.get_drop("d1").await.unwrap().unwrap();
    assert_eq!(counts(&st.levels), (10, 6, 0, 4));
    let l = s.ledger("d1").await.unwrap();
    assert_eq!(ledger_ops(&l, "group_open"), 2);
    assert_eq!(ledger_ops(&l, "group_join"), 2);
    assert_eq!(ledger_ops(&l, "group_complete"), 2);
    // A key expires with its TTL: then it is a new attempt.
    let later = T0 + (KEY_TTL as Millis) * 1000 + 10;
    s.create_drop(&group_drop_("d2", 10, 3, 3)).await.unwrap();
    s.open_group(&greq("d2", "u1", Some("o"), T0))
        .await
        .unwrap();
    let fresh = s
        .open_group(&greq("d2", "u1", Some("o"), later))
        .await
        .unwrap();
    assert!(!fresh.replay);
    assert_eq!(fresh.group.group_id, "d2.g2");
}

/// 3 of 5 members at the deadline, three sweepers at once: the group fails exactly once,
/// its 3 units go back, the ledger records one `group_fail`.
async fn groups_fail_once(s: S) {
    s.create_drop(&group_drop_("d1", 10, 1, 5)).await.unwrap();
    s.open_group(&greq("d1", "u1", None, T0)).await.unwrap();
    for u in ["u2", "u3"] {
        s.join_group(&greq("d1.g1", u, Some("k"), T0 + 1))
            .await
            .unwrap();
    }
    s.open_group(&greq("d1", "u4", None, T0 + 30_000))
        .await
        .unwrap();
    assert!(
        s.sweepable_drops()
            .await
            .unwrap()
            .contains(&"d1".to_string())
    );
    assert!(
        s.fail_groups("d1", T0 + 59_999)
            .await
            .unwrap()
            .failed
            .is_empty()
    );
    assert_eq!(code(s.fail_groups("nope", T0).await), "not_found");
    let at = T0 + 60_000;
    let sweepers: Vec<_> = (0..3)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.fail_groups("d1", at).await.unwrap() })
        })
        .collect();
    let mut failed = Vec::new();
    for t in sweepers {
        let sw = t.await.unwrap();
        assert!(sw.levels.conserved());
        failed.extend(sw.failed);
    }
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].group_id, "d1.g1");
    assert_eq!(failed[0].status, GroupStatus::Failed);
    assert_eq!(failed[0].members.len(), 3);
    let st = s.get_drop("d1").await.unwrap().unwrap();
    assert_eq!(counts(&st.levels), (10, 9, 1, 0));
    let l = s.ledger("d1").await.unwrap();
    assert_eq!(ledger_ops(&l, "group_fail"), 1);
    let fail = l.iter().find(|e| e.op == "group_fail").unwrap();
    assert_eq!((fail.qty, fail.group.as_deref()), (3, Some("d1.g1")));
    assert_eq!(s.get_group("d1.g1").await.unwrap(), Some(failed[0].clone()));
    assert_eq!(
        code(s.join_group(&greq("d1.g1", "u5", Some("k"), at)).await),
        "group_closed"
    );
    // The members' units were freed: u1 (limit 1) can open again.
    s.open_group(&greq("d1", "u1", None, at)).await.unwrap();
    // The other group fails at its own deadline.
    let sw = s.fail_groups("d1", T0 + 90_000).await.unwrap();
    assert_eq!(sw.failed.len(), 1);
    assert_eq!(sw.failed[0].group_id, "d1.g2");
    assert_conserved(&s, "d1").await;
}

/// 500 concurrent joiners on a group of 5: exactly 4 get in, the group completes once.
async fn groups_concurrent_joiners(s: S) {
    s.create_drop(&group_drop_("d1", 100, 1, 5)).await.unwrap();
    s.open_group(&greq("d1", "leader", None, T0)).await.unwrap();
    let tasks: Vec<_> = (0..500)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.join_group(&greq("d1.g1", &format!("u{i}"), Some("k"), T0 + 1))
                    .await
            })
        })
        .collect();
    let (mut ok, mut completed) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(a) => {
                ok += 1;
                if a.group.status == GroupStatus::Completed {
                    completed += 1;
                }
            }
            Err(e) => assert_eq!(e.code, "group_full"),
        }
    }
    assert_eq!((ok, completed), (4, 1));
    let st = s.get_drop("d1").await.unwrap().unwrap();
    assert_eq!(counts(&st.levels), (100, 95, 0, 5));
    let l = s.ledger("d1").await.unwrap();
    assert_eq!(ledger_ops(&l, "group_join"), 4);
    assert_eq!(ledger_ops(&l, "group_complete"), 1);
}

async fn groups_list_order(s: S) {
    s.create_drop(&group_drop_("d1", 50, 1, 5)).await.unwrap();
    for (i, joiners) in [1usize, 3, 2, 3].into_iter().enumerate() {
        let leader = format!("l{i}");
        let g = s
            .open_group(&greq("d1", &leader, None, T0 + i as Millis))
            .await
            .unwrap()
            .group;
        for j in 1..joiners {
            s.join_group(&greq(&g.group_id, &format!("m{i}-{j}"), Some("k"), T0 + 10))
                .await
                .unwrap();
        }
    }
    let ids: Vec<String> = s
        .drop_groups("d1")
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.group_id)
        .collect();
    // Fullest first; equal fill: the nearer deadline (opened earlier) first.
    assert_eq!(ids, vec!["d1.g2", "d1.g4", "d1.g3", "d1.g1"]);
}

// ---------------------------------------------------------------------------------------
// Both engines.

async fn redis_store(server: &RedisServer) -> S {
    Arc::new(
        RedisStore::connect(&server.url(), Duration::from_secs(5))
            .await
            .unwrap(),
    )
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory_engine {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(std::sync::Arc::new(super::MemoryStore::new())).await;
                }
            )*
        }
        mod redis_engine {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let server = super::RedisServer::start();
                    super::$name(super::redis_store(&server).await).await;
                }
            )*
        }
    };
}

conformance!(
    rooms,
    chat,
    likes,
    drops,
    claim_success,
    refusals,
    idempotency,
    transitions,
    sweep_once,
    ledger_contents,
    user_claims,
    user_claims_newest_only,
    concurrent_claims,
    concurrent_limit,
    concurrent_same_key,
    concurrent_mixed_batch,
    concurrent_sweepers,
    groups_open_join_complete,
    groups_refusals,
    groups_idempotency,
    groups_fail_once,
    groups_concurrent_joiners,
    groups_list_order,
);

// ---------------------------------------------------------------------------------------
// Redis only.

/// Scripts are re-loaded transparently after `SCRIPT FLUSH` (EVALSHA -> NOSCRIPT -> LOAD).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_recovers_from_script_flush() {
    let server = RedisServer::start();
    let s = redis_store(&server).await;
    s.create_drop(&drop_("d1", 10, 5)).await.unwrap();
    s.claim(&req("d1", "u1", "a", 1, T0)).await.unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let r = s.claim(&req("d1", "u1", "b", 1, T0)).await.unwrap();
    assert_eq!(r.claim.claim_id, "d1.2");
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    s.confirm("d1.2", "u1", T0).await.unwrap();
    s.create_room(&room("r1")).await.unwrap();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        s.append_chat("r1", "m", &user("u1"), "hi", T0, 5)
            .await
            .unwrap()
            .seq,
        1
    );
    assert_eq!(s.add_likes("r1", 2).await.unwrap(), 2);
}

/// A store that cannot reach Redis answers `store_unavailable`, and works again once Redis
/// is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_store_unavailable() {
    let mut server = RedisServer::start_aof();
    let s: S = Arc::new(
        RedisStore::connect(&server.url(), Duration::from_millis(300))
            .await
            .unwrap(),
    );
    s.create_drop(&drop_("d1", 10, 5)).await.unwrap();
    server.kill9();
    for _ in 0..3 {
        assert_eq!(
            code(s.claim(&req("d1", "u1", "a", 1, T0)).await),
            "store_unavailable"
        );
        assert_eq!(code(s.ping().await), "store_unavailable");
        assert_eq!(code(s.get_drop("d1").await), "store_unavailable");
    }
    server.restart();
    let again = req("d1", "u1", "a", 1, T0);
    let r = retry_until_ok(|| s.claim(&again)).await;
    assert_eq!(r.claim.claim_id, "d1.1");
    // Connecting to nothing fails fast too.
    let port = server.port();
    drop(server);
    let err = RedisStore::connect(
        &format!("redis://127.0.0.1:{port}/"),
        Duration::from_millis(300),
    )
    .await
    .err()
    .map(|e| e.code);
    assert_eq!(err, Some("store_unavailable"));
}

/// A redis store with a 300 ms call budget, for the frozen-Redis tests.
async fn slow_redis_store(server: &RedisServer) -> S {
    Arc::new(
        RedisStore::connect(&server.url(), Duration::from_millis(300))
            .await
            .unwrap(),
    )
}

/// `n` users claim drop `d1` at once while Redis is frozen: every one is refused
/// `store_unavailable` (none waits for the thaw).
async fn claims_fail_while_frozen(s: &S, n: usize) {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.claim(&req("d1", &format!("u{i}"), "a", 1, T0)).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(code(t.await.unwrap()), "store_unavailable");
    }
}

/// A Redis that stops answering (frozen with SIGSTOP) makes calls fail with
/// `store_unavailable` after the response timeout instead of hanging; once it answers
/// again the same store works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_slow_is_store_unavailable() {
    let server = RedisServer::start();
    let s = slow_redis_store(&server).await;
    s.create_drop(&drop_("d1", 10, 5)).await.unwrap();
    server.pause();
    claims_fail_while_frozen(&s, 5).await;
    assert_eq!(code(s.ping().await), "store_unavailable");
    server.resume();
    // The frozen claims may or may not have run once Redis thawed; retrying with the same
    // keys is safe: each user ends up with exactly one unit.
    for i in 0..5 {
        let again = req("d1", &format!("u{i}"), "a", 1, T0);
        retry_until_ok(|| s.claim(&again)).await;
    }
    let st = s.get_drop("d1").await.unwrap().unwrap();
    assert_eq!((st.levels.remaining, st.levels.reserved), (5, 5));
}

/// A frozen Redis with more claims waiting than two batches in flight hold: the queued
/// ones are answered `store_unavailable` too (the lane keeps each claim's deadline), none
/// is left waiting, and after the thaw the store answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_slow_fails_queued_claims_too() {
    let server = RedisServer::start();
    let s = slow_redis_store(&server).await;
    s.create_drop(&drop_("d1", 1000, 5)).await.unwrap();
    server.pause();
    claims_fail_while_frozen(&s, 300).await;
    server.resume();
    let late = req("d1", "late", "a", 1, T0);
    retry_until_ok(|| s.claim(&late)).await;
    let st = s.get_drop("d1").await.unwrap().unwrap();
    assert!(st.levels.conserved());
    assert!(st.levels.reserved >= 1);
}

/// Two server instances (two stores, two connections) selling the same drop: stock and
/// per-user limits hold across them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_two_instances_share_stock_and_limits() {
    let server = RedisServer::start();
    let a = redis_store(&server).await;
    let b = redis_store(&server).await;
    a.create_drop(&drop_("d1", 50, 2)).await.unwrap();
    let tasks: Vec<_> = (0..400)
        .map(|i| {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            // 100 users, 4 requests each (distinct keys), half on each instance.
            tokio::spawn(async move {
                s.claim(&req(
                    "d1",
                    &format!("u{}", i % 100),
                    &format!("k{i}"),
                    1,
                    T0,
                ))
                .await
            })
        })
        .collect();
    let mut per_user = std::collections::HashMap::<String, u64>::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => *per_user.entry(r.claim.user).or_default() += 1,
            Err(e) => assert!(["sold_out", "limit_reached"].contains(&e.code), "{e}"),
        }
    }
    assert_eq!(per_user.values().sum::<u64>(), 50);
    assert!(per_user.values().all(|n| *n <= 2));
    let st = b.get_drop("d1").await.unwrap().unwrap();
    assert_eq!((st.levels.remaining, st.levels.reserved), (0, 50));
}

/// Two server instances on one Redis: 200 joiners split between them fill a group of 5
/// with exactly 4 joins; then both sweep a 3-of-5 group at its deadline and it fails once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_two_instances_fill_and_fail_groups_once() {
    let server = RedisServer::start();
    let a = redis_store(&server).await;
    let b = redis_store(&server).await;
    a.create_drop(&group_drop_("d1", 20, 1, 5)).await.unwrap();
    a.open_group(&greq("d1", "leader", None, T0)).await.unwrap();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                s.join_group(&greq("d1.g1", &format!("u{i}"), Some("k"), T0 + 1))
                    .await
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.code, "group_full"),
        }
    }
    assert_eq!(ok, 4);
    b.open_group(&greq("d1", "x1", None, T0 + 2)).await.unwrap();
    for u in ["x2", "x3"] {
        a.join_group(&greq("d1.g2", u, Some("k"), T0 + 3))
            .await
            .unwrap();
    }
    let at = T0 + 60_002;
    let (fa, fb) = tokio::join!(a.fail_groups("d1", at), b.fail_groups("d1", at));
    let failed = fa.unwrap().failed.len() + fb.unwrap().failed.len();
    assert_eq!(failed, 1);
    let st = b.get_drop("d1").await.unwrap().unwrap();
    assert_eq!(counts(&st.levels), (20, 15, 0, 5));
    let l = a.ledger("d1").await.unwrap();
    assert_eq!(ledger_ops(&l, "group_complete"), 1);
    assert_eq!(ledger_ops(&l, "group_fail"), 1);
}

/// Retries an operation while the store reconnects (the first calls after a restart may
/// still see the dead connection).
async fn retry_until_ok<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = AppResult<T>>,
{
    let mut last = None;
    for _ in 0..200 {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                assert_eq!(e.code, "store_unavailable");
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    panic!("store never came back: {last:?}");
}

/// `appendfsync always`, kill -9 mid-sale, restart from the AOF: every acknowledged claim is
/// there exactly once, conservation holds, and claims work again (scripts re-loaded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_kill9_mid_sale_loses_nothing_acknowledged() {
    const STOCK: u64 = 100_000;
    let mut server = RedisServer::start_aof();
    let s: S = Arc::new(
        RedisStore::connect(&server.url(), Duration::from_millis(500))
            .await
            .unwrap(),
    );
    s.create_drop(&drop_("d1", STOCK, 1)).await.unwrap();
    let acked = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..16)
        .map(|w| {
            let (s, acked, stop) = (s.clone(), acked.clone(), stop.clone());
            tokio::spawn(async move {
                let mut mine = Vec::new();
                let mut failures = 0usize;
                let mut i = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    match s.claim(&req("d1", &format!("w{w}-{i}"), "k", 1, T0)).await {
                        Ok(r) => {
                            mine.push(r.claim);
                            acked.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => {
                            assert_eq!(e.code, "store_unavailable");
                            failures += 1;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
                (mine, failures)
            })
        })
        .collect();
    while acked.load(Ordering::SeqCst) < 500 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    server.kill9();
    // Let every worker see the failure, then stop them before Redis comes back.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    let mut acknowledged = Vec::new();
    let mut failures = 0;
    for w in workers {
        let (mine, f) = w.await.unwrap();
        acknowledged.extend(mine);
        failures += f;
    }
    assert!(failures > 0, "no claim failed: the kill came too late");
    server.restart();

    let st = retry_until_ok(|| s.get_drop("d1")).await.unwrap();
    eprintln!(
        "kill -9: {} claims acknowledged, {} failed, {} reserved after restart",
        acknowledged.len(),
        failures,
        st.levels.reserved
    );
    assert!(st.levels.conserved(), "{:?}", st.levels);
    let l = s.ledger("d1").await.unwrap();
    let claim_entries: Vec<_> = l.iter().filter(|e| e.op == "claim").collect();
    let ids: HashSet<_> = claim_entries
        .iter()
        .filter_map(|e| e.claim_id.clone())
        .collect();
    assert_eq!(
        ids.len(),
        claim_entries.len(),
        "a claim is in the ledger twice"
    );
    assert_eq!(claim_entries.len() as u64, st.levels.reserved);
    assert!(acknowledged.len() as u64 <= st.levels.reserved);
    for c in &acknowledged {
        assert_eq!(s.get_claim(&c.claim_id).await.unwrap().as_ref(), Some(c));
        assert!(
            ids.contains(&c.claim_id),
            "{} acknowledged but not in the ledger",
            c.claim_id
        );
    }
    // Claims work again (the restarted Redis has no scripts loaded: NOSCRIPT path).
    let after = req("d1", "after", "k", 1, T0);
    let r = retry_until_ok(|| s.claim(&after)).await;
    assert!(!r.replay);
    assert!(r.levels.conserved());
    assert_eq!(r.levels.reserved, st.levels.reserved + 1);
}
