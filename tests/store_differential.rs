//! Differential test: random operation sequences (claims, confirms, releases, sweeps, group
//! opens, joins and failures) go to a `MemoryStore` and a `RedisStore`
//! (one `redis-server` for the whole run, fresh drop and user ids per case); every answer
//! must be identical (Ok values, or Err codes) and conservation must hold after every step.
//! A difference is a bug in one of the engines.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::redis_server::RedisServer;
use livedrop::error::AppResult;
use livedrop::model::{Drop, DropKind, GroupTerms, Millis, User};
use livedrop::store::memory::MemoryStore;
use livedrop::store::redis::RedisStore;
use livedrop::store::{ClaimRequest, GroupRequest, Store};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

const T0: Millis = 1_700_000_000_000;

#[derive(Clone, Debug)]
enum ClaimRef {
    /// The n-th claim id seen so far (modulo how many there are).
    Known(usize),
    /// An id that names no claim.
    Bogus(u8),
}

#[derive(Clone, Debug)]
enum Op {
    Claim {
        user: u8,
        key: u8,
        qty: u64,
    },
    Retry(usize),
    Confirm {
        claim: ClaimRef,
        user: u8,
    },
    Release {
        claim: ClaimRef,
        user: u8,
    },
    Advance(i64),
    Sweep,
    End,
    OpenGroup {
        user: u8,
        key: Option<u8>,
    },
    /// Joins a group: the n-th group id seen so far, or a bogus one.
    JoinGroup {
        group: ClaimRef,
        user: u8,
        key: u8,
    },
    FailGroups,
}

#[derive(Clone, Debug)]
struct Case {
    stock: u64,
    limit: u64,
    hold_secs: u64,
    starts_in: i64,
    ends_in: Option<i64>,
    key_ttl_secs: u64,
    /// Group terms `(size, window_secs, allow_solo)`; `None` is a flash drop.
    group: Option<(u64, u64, bool)>,
    ops: Vec<Op>,
}

fn claim_ref() -> impl Strategy<Value = ClaimRef> {
    prop_oneof![
        4 => any::<usize>().prop_map(ClaimRef::Known),
        1 => (0u8..4).prop_map(ClaimRef::Bogus),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..3, 0u8..3, 1u64..=3).prop_map(|(user, key, qty)| Op::Claim { user, key, qty }),
        2 => any::<usize>().prop_map(Op::Retry),
        3 => (claim_ref(), 0u8..3).prop_map(|(claim, user)| Op::Confirm { claim, user }),
        2 => (claim_ref(), 0u8..3).prop_map(|(claim, user)| Op::Release { claim, user }),
        3 => (0i64..30_000).prop_map(Op::Advance),
        2 => Just(Op::Sweep),
        1 => Just(Op::End),
        3 => (0u8..4, proptest::option::of(0u8..2)).prop_map(|(user, key)| Op::OpenGroup { user, key }),
        5 => (claim_ref(), 0u8..4, 0u8..2).prop_map(|(group, user, key)| Op::JoinGroup { group, user, key }),
        2 => Just(Op::FailGroups),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        0u64..8,
        1u64..4,
        1u64..20,
        -5_000i64..5_000,
        proptest::option::of(10_000i64..120_000),
        5u64..60,
        proptest::option::weighted(0.75, (2u64..=3, 1u64..30, any::<bool>())),
        proptest::collection::vec(op(), 1..40),
    )
        .prop_map(
            |(stock, limit, hold_secs, starts_in, ends_in, key_ttl_secs, group, ops)| Case {
                stock,
                limit,
                hold_secs,
                starts_in,
                ends_in,
                key_ttl_secs,
                group,
                ops,
            },
        )
}

/// An answer reduced to what both engines must agree on.
fn norm<T>(r: AppResult<T>) -> Result<T, &'static str> {
    r.map_err(|e| e.code)
}

/// Like `same!` where only the agreement matters, not the value.
macro_rules! check {
    ($($t:tt)*) => {{
        let _ = same!($($t)*);
    }};
}

macro_rules! same {
    ($what:expr, $mem:expr, $red:expr) => {{
        let (m, r) = (norm($mem), norm($red));
        prop_assert_eq!(&m, &r, "{} differs", $what);
        m
    }};
}

async fn run_case(
    n: u64,
    case: &Case,
    mem: &MemoryStore,
    red: &RedisStore,
) -> Result<(), TestCaseError> {
    let drop_id = format!("case{n}");
    let users: Vec<String> = (0..4).map(|u| format!("c{n}u{u}")).collect();
    let mut now = T0;
    let drop = Drop {
        id: drop_id.clone(),
        room: format!("room{n}"),
        sku: "SKU".to_string(),
        title: "Thing".to_string(),
        price: 500,
        currency: "USD".to_string(),
        stock: case.stock,
        per_user_limit: case.limit,
        starts_at: T0 + case.starts_in,
        ends_at: case.ends_in.map(|e| T0 + e),
        hold_secs: case.hold_secs,
        kind: if case.group.is_some() {
            DropKind::Group
        } else {
            DropKind::Flash
        },
        created_at: T0 - 1,
        group: case
            .group
            .map(|(size, window_secs, allow_solo)| GroupTerms {
                size,
                price: 300,
                window_secs,
                allow_solo,
            }),
    };
    check!(
        "create_drop",
        mem.create_drop(&drop).await,
        red.create_drop(&drop).await
    );
    check!(
        "create_drop again",
        mem.create_drop(&drop).await,
        red.create_drop(&drop).await
    );

    let mut requests: Vec<ClaimRequest> = Vec::new();
    let mut claim_ids: Vec<String> = Vec::new();
    let mut group_ids: Vec<String> = Vec::new();
    let group_req = |target: String, user: u8, key: Option<String>, now: Millis| GroupRequest {
        target,
        user: User {
            id: users[user as usize].clone(),
            name: users[user as usize].clone(),
        },
        key,
        now,
        key_ttl_secs: case.key_ttl_secs,
    };
    let group_id = |r: &ClaimRef, ids: &[String]| match r {
        ClaimRef::Known(i) if !ids.is_empty() => ids[i % ids.len()].clone(),
        ClaimRef::Known(_) | ClaimRef::Bogus(0) => format!("{drop_id}.g999"),
        ClaimRef::Bogus(1) => format!("nodrop{n}.g1"),
        ClaimRef::Bogus(2) => format!("{drop_id}.1"),
        ClaimRef::Bogus(_) => "garbage".to_string(),
    };
    let claim_id = |r: &ClaimRef, ids: &[String]| match r {
        ClaimRef::Known(i) if !ids.is_empty() => ids[i % ids.len()].clone(),
        ClaimRef::Known(_) | ClaimRef::Bogus(0) => format!("{drop_id}.999"),
        ClaimRef::Bogus(1) => format!("nodrop{n}.1"),
        ClaimRef::Bogus(2) => format!("{drop_id}.0"),
        ClaimRef::Bogus(_) => "garbage".to_string(),
    };

    for (step, op) in case.ops.iter().enumerate() {
        let what = format!("step {step} {op:?}");
        match op {
            Op::Claim { user, key, qty } => {
                let uid = &users[*user as usize];
                let req = ClaimRequest {
                    drop: drop_id.clone(),
                    user: User {
                        id: uid.clone(),
                        name: uid.clone(),
                    },
                    qty: *qty,
                    key: format!("key{key}"),
                    now,
                    key_ttl_secs: case.key_ttl_secs,
                };
                let r = same!(&what, mem.claim(&req).await, red.claim(&req).await);
                if let Ok(res) = r {
                    claim_ids.push(res.claim.claim_id);
                }
                requests.push(req);
            }
            Op::Retry(i) => {
                if requests.is_empty() {
                    continue;
                }
                let mut req = requests[i % requests.len()].clone();
                req.now = now;
                let r = same!(&what, mem.claim(&req).await, red.claim(&req).await);
                if let Ok(res) = r {
                    claim_ids.push(res.claim.claim_id);
                }
            }
            Op::Confirm { claim, user } => {
                let id = claim_id(claim, &claim_ids);
                let uid = &users[*user as usize];
                check!(
                    &what,
                    mem.confirm(&id, uid, now).await,
                    red.confirm(&id, uid, now).await
                );
            }
            Op::Release { claim, user } => {
                let id = claim_id(claim, &claim_ids);
                let uid = &users[*user as usize];
                check!(
                    &what,
                    mem.release(&id, uid, now).await,
                    red.release(&id, uid, now).await
                );
            }
            Op::Advance(ms) => now += ms,
            Op::Sweep => {
                check!(
                    &what,
                    mem.sweep(&drop_id, now).await,
                    red.sweep(&drop_id, now).await
                );
            }
            Op::End => {
                check!(
                    &what,
                    mem.end_drop(&drop_id, now).await,
                    red.end_drop(&drop_id, now).await
                );
            }
            Op::OpenGroup { user, key } => {
                let req = group_req(drop_id.clone(), *user, key.map(|k| format!("o{k}")), now);
                let r = same!(
                    &what,
                    mem.open_group(&req).await,
                    red.open_group(&req).await
                );
                if let Ok(a) = r
                    && !group_ids.contains(&a.group.group_id)
                {
                    group_ids.push(a.group.group_id);
                }
            }
            Op::JoinGroup { group, user, key } => {
                let req = group_req(
                    group_id(group, &group_ids),
                    *user,
                    Some(format!("j{key}")),
                    now,
                );
                check!(
                    &what,
                    mem.join_group(&req).await,
                    red.join_group(&req).await
                );
            }
            Op::FailGroups => {
                check!(
                    &what,
                    mem.fail_groups(&drop_id, now).await,
                    red.fail_groups(&drop_id, now).await
                );
            }
        }
        let st = same!(
            format!("{what}: get_drop"),
            mem.get_drop(&drop_id).await,
            red.get_drop(&drop_id).await
        );
        let st = st.ok().flatten();
        prop_assert!(
            st.as_ref().is_some_and(|s| s.levels.conserved()),
            "{what}: {st:?}"
        );
    }

    check!(
        "ledger",
        mem.ledger(&drop_id).await,
        red.ledger(&drop_id).await
    );
    for uid in &users {
        check!(
            "user_claims",
            mem.user_claims(uid).await,
            red.user_claims(uid).await
        );
    }
    for id in &claim_ids {
        check!(
            "get_claim",
            mem.get_claim(id).await,
            red.get_claim(id).await
        );
    }
    check!(
        "drop_groups",
        mem.drop_groups(&drop_id).await,
        red.drop_groups(&drop_id).await
    );
    for id in &group_ids {
        check!(
            "get_group",
            mem.get_group(id).await,
            red.get_group(id).await
        );
    }
    check!(
        "sweepable_drops",
        mem.sweepable_drops().await.map(|d| d.contains(&drop_id)),
        red.sweepable_drops().await.map(|d| d.contains(&drop_id))
    );
    let room = format!("room{n}");
    check!(
        "room_drops",
        mem.room_drops(&room).await,
        red.room_drops(&room).await
    );
    Ok(())
}

#[test]
fn memory_and_redis_agree() {
    let server = RedisServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let red = Arc::new(
        rt.block_on(RedisStore::connect(&server.url(), Duration::from_secs(5)))
            .expect("connect to redis"),
    );
    let counter = AtomicU64::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&case(), |case| {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let mem = MemoryStore::new();
        rt.block_on(run_case(n, &case, &mem, &red))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
