//! The redis engine: livedrop's state in Redis (or Redis Cluster), shared by any number of
//! server instances. This module owns the key layout, the Lua scripts (in `lua/`) and the
//! decoding of their replies.
//!
//! Every state transition of a drop (create, claim, confirm, release, expire, end, group
//! open, join (and complete), fail) is ONE
//! Lua script: atomic, checking every precondition before its first write, touching only
//! keys that share the drop's hash tag `{drop:ID}`, and appending the transition to the
//! drop's ledger stream in the same script. The rules, refusal codes and order of checks are
//! exactly those of [`super::memory::MemoryStore`]; the conformance and differential tests
//! hold the two engines to it.
//!
//! Key layout (`ID` is a drop or room id):
//! - `ld:{drop:ID}:meta`   hash: `drop` (JSON record), `total`, `remaining`, `reserved`,
//!   `sold`, `ended`, `next_claim`, `next_group`, and the fields the scripts check
//!   (`starts_at`, `ends_at`, `limit`, `hold_ms`, `gsize`, `gprice`, `gwindow_ms`, `solo`)
//! - `ld:{drop:ID}:claims` hash: claim id -> `status|qty|created_at|expires_at|user`
//! - `ld:{drop:ID}:holds`  zset: zero-padded claim number scored by `expires_at`
//! - `ld:{drop:ID}:users`  hash: user -> units held (reserved + sold)
//! - `ld:{drop:ID}:idem`   hash: claim idempotency records, `LEN:USER:KEY` ->
//!   `qty|expires_at|claim_id` (a dead one counts as absent; written only with a claim)
//! - `ld:{drop:ID}:uclaims` hash: user -> their claim numbers in this drop, comma-separated,
//!   oldest first (the newest `USER_CLAIMS_MAX` are kept)
//! - `ld:{drop:ID}:ledger` stream of records `op`, `claim_id`, `user`, `qty`, `ts`, `group`;
//!   a claim batch writes all its records into one entry, each record starting at `op`
//! - `ld:{drop:ID}:groups` hash: group id -> `status|size|price|created|expires|count`
//! - `ld:{drop:ID}:gmembers` hash: `GID:N` -> N-th member, `GID|USER` -> N
//! - `ld:{drop:ID}:gdue`   zset: open groups' zero-padded numbers scored by deadline
//! - `ld:{drop:ID}:idem:LEN:USER:open:KEY` / `…:GID:KEY` group idempotency records
//!   `expires_at|group id` with a TTL (strings: one per open or join)
//! - `ld:{room:ID}:meta`   hash: `room` (JSON record), `seq`, `likes`
//! - `ld:{room:ID}:chat`   stream, entry id `SEQ-0`, capped at exactly `history` entries
//! - `ld:{room:ID}:mod`    hash: moderation record (`ban:USER`, `mute:USER`, `rules`, `del:MSG`)
//! - `ld:{room:ID}:modlog` list: moderation log, newest first, capped
//! - `ld:{room:ID}:drops`  list of the room's drop ids (cross-slot index)
//! - `ld:{user:ID}:drops`  zset of the drops a user claimed in, by first claim time
//!   (cross-slot index)
//! - `ld:drops`            set of drop ids the sweeper visits (cross-slot index)
//!
//! The cross-slot indexes cannot be written by the drop's script (other slots), so they
//! are written by separate idempotent commands. A drop is indexed *before* its create
//! script runs: a failure in between leaves a dangling id (skipped by readers, pruned by
//! `sweepable_drops`) rather than a drop the sweeper never visits, whose expired holds
//! would lock stock forever. A claim is indexed after its script (its id is only known
//! then); a failed index write is healed by the client's retry with the same key, since
//! replays index the claim again (append-once).
//!
//! Claims on one drop are batched: concurrent claims ride one call of `claim.lua`, which runs
//! each as if alone (see [`claim_batch`]).
//!
//! Time is always passed in by the caller (never read inside Lua), and numbers travel as
//! decimal strings so no counter ever becomes a float.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Script, Value};

mod claim_batch;

use self::claim_batch::{ClaimBatcher, ClaimRunner};
use super::{
    ClaimRequest, GroupAnswer, GroupRequest, GroupSweep, Reservation, SWEEP_BATCH, Store, Sweep,
    Transition, claim_drop, group_drop,
};
use crate::error::{AppError, AppResult};
use crate::model::{
    ChatMessage, Claim, ClaimStatus, Drop, DropState, Group, GroupStatus, LedgerEntry, Millis,
    Room, StockLevels, User,
};
use crate::protocol::is_valid_id;

/// Builds a script from the shared helpers and one script body. The `#!lua` shebang makes
/// Redis 7 check `deny-oom` before the script runs, not at its first write.
macro_rules! lua_script {
    ($file:literal) => {
        Script::new(concat!(
            "#!lua\n",
            include_str!("lua/common.lua"),
            include_str!(concat!("lua/", $file))
        ))
    };
    (group $file:literal) => {
        Script::new(concat!(
            "#!lua\n",
            include_str!("lua/common.lua"),
            include_str!("lua/groups.lua"),
            include_str!(concat!("lua/", $file))
        ))
    };
}

/// The compiled scripts; `Script` keeps the SHA1 so calls are EVALSHA, with an automatic
/// SCRIPT LOAD and retry on NOSCRIPT (after a Redis restart or `SCRIPT FLUSH`).
struct Scripts {
    create_drop: Script,
    claim: Script,
    confirm: Script,
    release: Script,
    sweep: Script,
    end_drop: Script,
    append_chat: Script,
    add_likes: Script,
    append_once: Script,
    open_group: Script,
    join_group: Script,
    fail_groups: Script,
    read_groups: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            create_drop: lua_script!("create_drop.lua"),
            claim: lua_script!("claim.lua"),
            confirm: lua_script!("confirm.lua"),
            release: lua_script!("release.lua"),
            sweep: lua_script!("sweep.lua"),
            end_drop: lua_script!("end_drop.lua"),
            append_chat: lua_script!("append_chat.lua"),
            add_likes: lua_script!("add_likes.lua"),
            append_once: lua_script!("append_once.lua"),
            open_group: lua_script!(group "open_group.lua"),
            join_group: lua_script!(group "join_group.lua"),
            fail_groups: lua_script!(group "fail_groups.lua"),
            read_groups: lua_script!(group "read_groups.lua"),
        }
    }

    fn all(&self) -> [&Script; 13] {
        [
            &self.create_drop,
            &self.claim,
            &self.confirm,
            &self.release,
            &self.sweep,
            &self.end_drop,
            &self.append_chat,
            &self.add_likes,
            &self.append_once,
            &self.open_group,
            &self.join_group,
            &self.fail_groups,
            &self.read_groups,
        ]
    }
}

/// The redis engine. Cheap to share: one multiplexed [`ConnectionManager`] (cloned per call)
/// carries every request, so concurrent claims are pipelined on one socket and a lost
/// connection is re-established in the background.
pub struct RedisStore {
    conn: ConnectionManager,
    /// Upper bound for one store call (a script call may take three round trips: EVALSHA,
    /// SCRIPT LOAD, EVALSHA).
    budget: Duration,
    scripts: Scripts,
    /// Claims go through per-drop lanes that batch concurrent claims into one script call.
    claims: ClaimBatcher,
}

/// Keys of one drop, all in the slot of `{drop:ID}`.
struct DropKeys {
    meta: String,
    claims: String,
    holds: String,
    users: String,
    idem: String,
    uclaims: String,
    ledger: String,
    groups: String,
    gmembers: String,
    gdue: String,
}

impl DropKeys {
    fn new(drop: &str) -> Self {
        let p = format!("ld:{{drop:{drop}}}");
        Self {
            meta: format!("{p}:meta"),
            claims: format!("{p}:claims"),
            holds: format!("{p}:holds"),
            users: format!("{p}:users"),
            idem: format!("{p}:idem"),
            uclaims: format!("{p}:uclaims"),
            ledger: format!("{p}:ledger"),
            groups: format!("{p}:groups"),
            gmembers: format!("{p}:gmembers"),
            gdue: format!("{p}:gdue"),
        }
    }

    /// The keys every group transition touches, in the scripts' order.
    fn group_keys<'a>(&'a self, idem: &'a str) -> [&'a str; 7] {
        [
            &self.meta,
            &self.users,
            &self.groups,
            &self.gmembers,
            &self.gdue,
            idem,
            &self.ledger,
        ]
    }

    /// The group idempotency record of (user, drop, key): a string key with a TTL.
    fn idem(drop: &str, user: &str, key: &str) -> String {
        format!("ld:{{drop:{drop}}}:idem:{}", idem_field(user, key))
    }
}

/// A claim's field in its drop's `idem` hash (and the tail of a group record's key): the
/// user id length-prefixed, so that no (user, key) pair can collide with another one
/// containing `:`.
fn idem_field(user: &str, key: &str) -> String {
    format!("{}:{user}:{key}", user.len())
}

fn room_meta(room: &str) -> String {
    format!("ld:{{room:{room}}}:meta")
}

fn room_chat(room: &str) -> String {
    format!("ld:{{room:{room}}}:chat")
}

fn room_mod(room: &str) -> String {
    format!("ld:{{room:{room}}}:mod")
}

fn room_mod_log(room: &str) -> String {
    format!("ld:{{room:{room}}}:modlog")
}

fn room_drops_key(room: &str) -> String {
    format!("ld:{{room:{room}}}:drops")
}

/// The drops a user has claimed in, scored by their first claim there (the user's slot:
/// written once per user and drop, when `claim.lua` reports a first claim).
fn user_drops_key(user: &str) -> String {
    format!("ld:{{user:{user}}}:drops")
}

/// Every drop id, for the sweeper.
const ALL_DROPS: &str = "ld:drops";

/// Most drops a user's claim listing looks into (most recently entered first).
const USER_DROPS_READ: usize = 10_000;

/// The zset member of a claim's hold, as `hold_member` in `common.lua`.
fn hold_member(claim_id: &str) -> Option<String> {
    let (_, n) = claim_id.rsplit_once('.')?;
    let n: u64 = n.parse().ok()?;
    Some(format!("{n:020}"))
}

// ---- reply decoding ----

fn bad_reply(what: &str) -> AppError {
    AppError::internal(format!("unexpected reply from redis: {what}"))
}

fn text(v: &Value) -> AppResult<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).map_err(|_| bad_reply("not utf-8")),
        Value::SimpleString(s) => Ok(s.clone()),
        Value::Int(i) => Ok(i.to_string()),
        Value::Okay => Ok("OK".to_string()),
        _ => Err(bad_reply("expected a string")),
    }
}

fn opt_text(v: &Value) -> AppResult<Option<String>> {
    match v {
        Value::Nil => Ok(None),
        other => text(other).map(Some),
    }
}

fn int<T: std::str::FromStr>(v: &Value) -> AppResult<T> {
    text(v)?
        .parse()
        .map_err(|_| bad_reply("expected an integer"))
}

fn at(items: &[Value], i: usize) -> AppResult<&Value> {
    items.get(i).ok_or_else(|| bad_reply("reply too short"))
}

fn array(v: Value) -> AppResult<Vec<Value>> {
    match v {
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        _ => Err(bad_reply("expected an array")),
    }
}

/// Four counters in the scripts' order: total, remaining, reserved, sold.
fn levels_at(items: &[Value], i: usize) -> AppResult<StockLevels> {
    Ok(StockLevels {
        total: int(at(items, i)?)?,
        remaining: int(at(items, i + 1)?)?,
        reserved: int(at(items, i + 2)?)?,
        sold: int(at(items, i + 3)?)?,
    })
}

/// Decodes `status|qty|created_at|expires_at|user`.
fn decode_claim(claim_id: &str, enc: &str) -> AppResult<Claim> {
    let mut parts = enc.splitn(5, '|');
    let mut next = || parts.next().ok_or_else(|| bad_reply("claim record"));
    let status = ClaimStatus::parse(next()?).ok_or_else(|| bad_reply("claim status"))?;
    let qty = next()?.parse().map_err(|_| bad_reply("claim qty"))?;
    let created_at = next()?.parse().map_err(|_| bad_reply("claim created_at"))?;
    let expires_at = next()?.parse().map_err(|_| bad_reply("claim expires_at"))?;
    let user = next()?.to_string();
    Ok(Claim {
        claim_id: claim_id.to_string(),
        drop: claim_drop(claim_id).unwrap_or_default().to_string(),
        user,
        qty,
        status,
        created_at,
        expires_at,
    })
}

/// Decodes `drop json, total, remaining, reserved, sold, ended` starting at `i`.
fn drop_state_at(items: &[Value], i: usize) -> AppResult<Option<DropState>> {
    let Some(json) = opt_text(at(items, i)?)? else {
        return Ok(None);
    };
    let drop: Drop = serde_json::from_str(&json).map_err(|_| bad_reply("drop record"))?;
    Ok(Some(DropState {
        drop,
        levels: levels_at(items, i + 1)?,
        ended: text(at(items, i + 5)?)? == "1",
    }))
}

/// Field/value pairs of one stream entry: `[id, [k, v, k, v, ...]]`.
fn stream_entry(v: Value) -> AppResult<(String, Vec<(String, String)>)> {
    let items = array(v)?;
    let id = text(at(&items, 0)?)?;
    let fields = match items.into_iter().nth(1) {
        Some(f) => array(f)?,
        None => return Err(bad_reply("stream entry")),
    };
    let mut out = Vec::with_capacity(fields.len() / 2);
    for pair in fields.chunks(2) {
        if let [k, v] = pair {
            out.push((text(k)?, text(v)?));
        }
    }
    Ok((id, out))
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn chat_message(v: Value) -> AppResult<ChatMessage> {
    let (id, f) = stream_entry(v)?;
    let seq = id
        .split_once('-')
        .and_then(|(s, _)| s.parse().ok())
        .ok_or_else(|| bad_reply("chat entry id"))?;
    let get = |name: &str| {
        field(&f, name)
            .map(str::to_string)
            .ok_or_else(|| bad_reply("chat entry"))
    };
    Ok(ChatMessage {
        seq,
        id: get("id")?,
        user: User {
            id: get("uid")?,
            name: get("uname")?,
        },
        text: get("text")?,
        ts: get("ts")?.parse().map_err(|_| bad_reply("chat ts"))?,
    })
}

/// The records of one ledger stream entry: a claim batch writes all its claims into one
/// entry, each record a run of fields starting with `op`.
fn ledger_records(fields: &[(String, String)]) -> impl Iterator<Item = &[(String, String)]> {
    fields.chunk_by(|_, (k, _)| k != "op")
}

fn ledger_entry(f: &[(String, String)]) -> AppResult<LedgerEntry> {
    Ok(LedgerEntry {
        op: field(f, "op")
            .ok_or_else(|| bad_reply("ledger op"))?
            .to_string(),
        claim_id: field(f, "claim_id").map(str::to_string),
        user: field(f, "user").map(str::to_string),
        qty: field(f, "qty")
            .and_then(|q| q.parse().ok())
            .ok_or_else(|| bad_reply("ledger qty"))?,
        ts: field(f, "ts")
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| bad_reply("ledger ts"))?,
        group: field(f, "group").map(str::to_string),
    })
}

/// Decodes one group of a script reply starting at `i` (`gid, status, size, price, created,
/// expires, count, members…`); returns it and the index after it.
fn group_at(items: &[Value], i: usize) -> AppResult<(Group, usize)> {
    let group_id = text(at(items, i)?)?;
    let status = GroupStatus::parse(&text(at(items, i + 1)?)?).ok_or_else(|| bad_reply("group"))?;
    let count: usize = int(at(items, i + 6)?)?;
    let members = (0..count)
        .map(|k| text(at(items, i + 7 + k)?))
        .collect::<AppResult<Vec<_>>>()?;
    let group = Group {
        drop: group_drop(&group_id).unwrap_or_default().to_string(),
        group_id,
        size: int(at(items, i + 2)?)?,
        price: int(at(items, i + 3)?)?,
        members,
        status,
        created_at: int(at(items, i + 4)?)?,
        expires_at: int(at(items, i + 5)?)?,
    };
    Ok((group, i + 7 + count))
}

/// Every group of a reply from index `i` on.
fn groups_from(items: &[Value], mut i: usize) -> AppResult<Vec<Group>> {
    let mut out = Vec::new();
    while i < items.len() {
        let (g, next) = group_at(items, i)?;
        out.push(g);
        i = next;
    }
    Ok(out)
}

/// Decodes an open/join reply: `replay, total, remaining, reserved, sold, group…`.
fn group_answer(items: &[Value]) -> AppResult<GroupAnswer> {
    Ok(GroupAnswer {
        replay: text(at(items, 0)?)? == "1",
        levels: levels_at(items, 1)?,
        group: group_at(items, 5)?.0,
    })
}

/// Turns a script refusal `{'err', code, detail}` into the memory engine's exact error.
fn refusal(code: &str, detail: &str) -> AppError {
    match code {
        "not_found" => AppError::not_found(detail),
        "drop_exists" => AppError::conflict("drop_exists", format!("drop {detail} already exists")),
        "idempotency_mismatch" => AppError::unprocessable(
            "idempotency_mismatch",
            "this Idempotency-Key was used with a different request",
        ),
        "ended" => AppError::conflict("ended", "this drop has ended"),
        "not_started" => AppError::conflict("not_started", "this drop has not started"),
        "limit_reached" => {
            AppError::conflict("limit_reached", format!("at most {detail} per person"))
        }
        "sold_out" => AppError::conflict("sold_out", "not enough stock left"),
        "forbidden" => AppError::forbidden("this claim belongs to someone else"),
        "claim_closed" => AppError::conflict("claim_closed", format!("this claim was {detail}")),
        "claim_expired" => {
            AppError::conflict("claim_expired", "the hold on this claim has expired")
        }
        "solo_not_allowed" => AppError::conflict(
            "solo_not_allowed",
            "this drop is sold only in groups: open or join one",
        ),
        "not_group" => AppError::conflict("not_group", "this drop is not sold in groups"),
        "group_full" => AppError::conflict("group_full", "this group is full: it has completed"),
        "group_closed" => {
            AppError::conflict("group_closed", "this group failed: its deadline passed")
        }
        "already_member" => AppError::conflict("already_member", "you are already in this group"),
        other => AppError::internal(format!("{other}: {detail}")),
    }
}

/// Runs one redis call under `budget`, mapping every failure to `store_unavailable` (503).
async fn guarded<T>(budget: Duration, fut: impl Future<Output = RedisResult<T>>) -> AppResult<T> {
    guarded_until(tokio::time::Instant::now() + budget, fut).await
}

/// [`guarded`] with the end of the budget given as an instant.
async fn guarded_until<T>(
    deadline: tokio::time::Instant,
    fut: impl Future<Output = RedisResult<T>>,
) -> AppResult<T> {
    match tokio::time::timeout_at(deadline, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(AppError::store_unavailable(e)),
        Err(_) => Err(AppError::store_unavailable("redis call timed out")),
    }
}

/// Splits a script's answer: `{'ok', ...}` gives the rest, `{'err', code, detail}` the
/// refusal.
fn split_status(mut items: Vec<Value>) -> AppResult<Vec<Value>> {
    if items.is_empty() {
        return Err(bad_reply("empty script reply"));
    }
    match text(&items[0])?.as_str() {
        "ok" => {
            items.remove(0);
            Ok(items)
        }
        "err" => {
            let code = text(at(&items, 1)?)?;
            let detail = text(at(&items, 2)?)?;
            Err(refusal(&code, &detail))
        }
        _ => Err(bad_reply("script status")),
    }
}

impl RedisStore {
    /// Connects to `url` with one shared, auto-reconnecting connection. `timeout` bounds
    /// connecting and every response, so a Redis that is down or slow makes calls fail fast
    /// with `store_unavailable` instead of piling requests up.
    pub async fn connect(url: &str, timeout: Duration) -> AppResult<RedisStore> {
        let client = redis::Client::open(url).map_err(AppError::store_unavailable)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(timeout);
        let budget = timeout.saturating_mul(3);
        let conn =
            match tokio::time::timeout(budget, ConnectionManager::new_with_config(client, config))
                .await
            {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => return Err(AppError::store_unavailable(e)),
                Err(_) => return Err(AppError::store_unavailable("connect timed out")),
            };
        let scripts = Scripts::new();
        let claims = ClaimBatcher::new(ClaimRunner {
            conn: conn.clone(),
            script: scripts.claim.clone(),
            budget,
        });
        let store = RedisStore {
            conn,
            budget,
            scripts,
            claims,
        };
        // Load the scripts up front so the first calls need no NOSCRIPT round trip.
        for script in store.scripts.all() {
            let mut conn = store.conn.clone();
            store
                .guard(script.prepare_invoke().load_async(&mut conn))
                .await?;
        }
        Ok(store)
    }

    /// Runs one redis call under the call budget, mapping every failure to
    /// `store_unavailable` (503).
    async fn guard<T>(&self, fut: impl Future<Output = RedisResult<T>>) -> AppResult<T> {
        guarded(self.budget, fut).await
    }

    /// Runs a script and splits its reply: `{'ok', ...}` gives the rest, `{'err', code,
    /// detail}` gives the refusal.
    async fn eval(&self, script: &Script, keys: &[&str], args: &[&str]) -> AppResult<Vec<Value>> {
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(*k);
        }
        for a in args {
            inv.arg(*a);
        }
        let mut conn = self.conn.clone();
        let reply: Value = self.guard(inv.invoke_async(&mut conn)).await?;
        split_status(array(reply)?)
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> AppResult<T> {
        let mut conn = self.conn.clone();
        self.guard(cmd.query_async(&mut conn)).await
    }

    async fn query_pipe(&self, pipe: &redis::Pipeline) -> AppResult<Vec<Value>> {
        let mut conn = self.conn.clone();
        self.guard(pipe.query_async(&mut conn)).await
    }

    /// Reads the meta of several drops in one round trip, keeping the given order.
    async fn drop_states(&self, ids: &[String]) -> AppResult<Vec<DropState>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HMGET").arg(DropKeys::new(id).meta).arg(&[
                "drop",
                "total",
                "remaining",
                "reserved",
                "sold",
                "ended",
            ]);
        }
        let replies = self.query_pipe(&pipe).await?;
        let mut out = Vec::with_capacity(ids.len());
        for reply in replies {
            if let Some(state) = drop_state_at(&array(reply)?, 0)? {
                out.push(state);
            }
        }
        Ok(out)
    }

    /// Runs the open or join script: `scope` is what the idempotency key is scoped to
    /// besides the user (`open` or the group id), `extra` the script's trailing arguments.
    async fn group_transition(
        &self,
        script: &Script,
        drop: &str,
        scope: &str,
        req: &GroupRequest,
        extra: &[&str],
    ) -> AppResult<GroupAnswer> {
        let k = DropKeys::new(drop);
        let key = req.key.as_deref().unwrap_or_default();
        let idem = DropKeys::idem(drop, &req.user.id, &format!("{scope}:{key}"));
        let ttl_ms = (req.key_ttl_secs as Millis).saturating_mul(1000);
        let now = req.now.to_string();
        let idem_expires = req.now.saturating_add(ttl_ms).to_string();
        let ttl_ms = ttl_ms.max(1).to_string();
        let use_key = if req.key.is_some() { "1" } else { "0" };
        let mut args = vec![
            req.target.as_str(),
            req.user.id.as_str(),
            &now,
            &idem_expires,
            &ttl_ms,
            use_key,
        ];
        args.extend_from_slice(extra);
        let items = self.eval(script, &k.group_keys(&idem), &args).await?;
        group_answer(&items)
    }

    /// Transition scripts for an existing claim id: confirm and release.
    async fn transition(
        &self,
        script: &Script,
        with_users: bool,
        claim_id: &str,
        user: &str,
        now: Millis,
    ) -> AppResult<Transition> {
        let (Some(drop), Some(member)) = (claim_drop(claim_id), hold_member(claim_id)) else {
            return Err(AppError::not_found("claim"));
        };
        let k = DropKeys::new(drop);
        let mut keys = vec![k.meta.as_str(), k.claims.as_str(), k.holds.as_str()];
        if with_users {
            keys.push(k.users.as_str());
        }
        keys.push(k.ledger.as_str());
        let now = now.to_string();
        let items = self
            .eval(script, &keys, &[claim_id, user, &now, &member])
            .await?;
        Ok(Transition {
            claim: decode_claim(claim_id, &text(at(&items, 0)?)?)?,
            levels: levels_at(&items, 1)?,
        })
    }
}

#[async_trait]
impl Store for RedisStore {
    fn engine(&self) -> &'static str {
        "redis"
    }

    async fn ping(&self) -> AppResult<()> {
        let _: String = self.query(&redis::cmd("PING")).await?;
        Ok(())
    }

    async fn create_room(&self, room: &Room) -> AppResult<()> {
        let json = serde_json::to_string(room).map_err(AppError::internal)?;
        let created: i64 = self
            .query(
                redis::cmd("HSETNX")
                    .arg(room_meta(&room.id))
                    .arg("room")
                    .arg(json),
            )
            .await?;
        if created == 1 {
            Ok(())
        } else {
            Err(AppError::conflict(
                "room_exists",
                format!("room {} already exists", room.id),
            ))
        }
    }

    async fn get_room(&self, id: &str) -> AppResult<Option<Room>> {
        let json: Option<String> = self
            .query(redis::cmd("HGET").arg(room_meta(id)).arg("room"))
            .await?;
        json.map(|j| serde_json::from_str(&j).map_err(|_| bad_reply("room record")))
            .transpose()
    }

    async fn append_chat(
        &self,
        room: &str,
        id: &str,
        user: &User,
        body: &str,
        ts: Millis,
        history: usize,
    ) -> AppResult<ChatMessage> {
        let (meta, chat) = (room_meta(room), room_chat(room));
        let (ts_s, history_s) = (ts.to_string(), history.to_string());
        let items = self
            .eval(
                &self.scripts.append_chat,
                &[&meta, &chat],
                &[id, &user.id, &user.name, body, &ts_s, &history_s],
            )
            .await?;
        Ok(ChatMessage {
            seq: int(at(&items, 0)?)?,
            id: id.to_string(),
            user: user.clone(),
            text: body.to_string(),
            ts,
        })
    }

    async fn recent_chat(&self, room: &str, n: usize) -> AppResult<Vec<ChatMessage>> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HEXISTS")
            .arg(room_meta(room))
            .arg("room")
            .cmd("XREVRANGE")
            .arg(room_chat(room))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(n.max(1));
        let mut replies = self.query_pipe(&pipe).await?.into_iter();
        let exists: i64 = int(&replies.next().ok_or_else(|| bad_reply("pipeline"))?)?;
        if exists == 0 {
            return Err(AppError::not_found("room"));
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        let entries = array(replies.next().ok_or_else(|| bad_reply("pipeline"))?)?;
        let mut out = entries
            .into_iter()
            .map(chat_message)
            .collect::<AppResult<Vec<_>>>()?;
        out.reverse();
        Ok(out)
    }

    async fn chat_since(&self, room: &str, since: u64) -> AppResult<Option<Vec<ChatMessage>>> {
        let chat = room_chat(room);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HMGET")
            .arg(room_meta(room))
            .arg("room")
            .arg("seq")
            .cmd("XRANGE")
            .arg(&chat)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .cmd("XRANGE")
            .arg(&chat)
            .arg(format!("{}-0", since.saturating_add(1)))
            .arg("+");
        let mut replies = self.query_pipe(&pipe).await?.into_iter();
        let mut next = || replies.next().ok_or_else(|| bad_reply("pipeline"));
        let meta = array(next()?)?;
        if opt_text(at(&meta, 0)?)?.is_none() {
            return Err(AppError::not_found("room"));
        }
        let seq: u64 = opt_text(at(&meta, 1)?)?
            .map(|s| s.parse().map_err(|_| bad_reply("chat seq")))
            .transpose()?
            .unwrap_or(0);
        if since >= seq {
            return Ok(Some(Vec::new()));
        }
        let first = array(next()?)?;
        let Some(first) = first.into_iter().next() else {
            return Ok(None);
        };
        if chat_message(first)?.seq > since + 1 {
            return Ok(None);
        }
        let entries = array(next()?)?;
        entries
            .into_iter()
            .map(chat_message)
            .collect::<AppResult<Vec<_>>>()
            .map(Some)
    }

    async fn chat_seq(&self, room: &str) -> AppResult<u64> {
        let meta: Vec<Option<String>> = self
            .query(
                redis::cmd("HMGET")
                    .arg(room_meta(room))
                    .arg("room")
                    .arg("seq"),
            )
            .await?;
        match meta.as_slice() {
            [Some(_), seq] => seq
                .as_deref()
                .map(|s| s.parse().map_err(|_| bad_reply("chat seq")))
                .transpose()
                .map(|s| s.unwrap_or(0)),
            _ => Err(AppError::not_found("room")),
        }
    }

    async fn add_likes(&self, room: &str, n: u64) -> AppResult<u64> {
        let meta = room_meta(room);
        let n = n.to_string();
        let items = self.eval(&self.scripts.add_likes, &[&meta], &[&n]).await?;
        int(at(&items, 0)?)
    }

    async fn likes(&self, room: &str) -> AppResult<u64> {
        let meta: Vec<Option<String>> = self
            .query(
                redis::cmd("HMGET")
                    .arg(room_meta(room))
                    .arg("room")
                    .arg("likes"),
            )
            .await?;
        match meta.as_slice() {
            [Some(_), likes] => likes
                .as_deref()
                .map(|s| s.parse().map_err(|_| bad_reply("likes")))
                .transpose()
                .map(|s| s.unwrap_or(0)),
            _ => Err(AppError::not_found("room")),
        }
    }

    async fn create_drop(&self, drop: &Drop) -> AppResult<DropState> {
        let k = DropKeys::new(&drop.id);
        let json = serde_json::to_string(drop).map_err(AppError::internal)?;
        let stock = drop.stock.to_string();
        let starts_at = drop.starts_at.to_string();
        let ends_at = drop.ends_at.map(|e| e.to_string()).unwrap_or_default();
        let limit = drop.per_user_limit.to_string();
        let hold_ms = (drop.hold_secs as Millis).saturating_mul(1000).to_string();
        let created_at = drop.created_at.to_string();
        let terms = drop.group;
        let gsize = terms.map(|g| g.size.to_string()).unwrap_or_default();
        let gprice = terms.map(|g| g.price.to_string()).unwrap_or_default();
        let gwindow_ms = terms
            .map(|g| (g.window_secs as Millis).saturating_mul(1000).to_string())
            .unwrap_or_default();
        let solo = if terms.is_some_and(|g| !g.allow_solo) {
            "0"
        } else {
            "1"
        };
        // Index first (see the module doc): both writes are idempotent.
        let room_list = room_drops_key(&drop.room);
        let _: i64 = self
            .query(redis::cmd("SADD").arg(ALL_DROPS).arg(&drop.id))
            .await?;
        self.eval(&self.scripts.append_once, &[&room_list], &[&drop.id])
            .await?;
        self.eval(
            &self.scripts.create_drop,
            &[&k.meta, &k.ledger],
            &[
                &json,
                &stock,
                &starts_at,
                &ends_at,
                &limit,
                &hold_ms,
                &created_at,
                &gsize,
                &gprice,
                &gwindow_ms,
                solo,
            ],
        )
        .await
        .map_err(|e| {
            if e.code == "drop_exists" {
                refusal("drop_exists", &drop.id)
            } else {
                e
            }
        })?;
        Ok(DropState {
            drop: drop.clone(),
            levels: StockLevels {
                total: drop.stock,
                remaining: drop.stock,
                reserved: 0,
                sold: 0,
            },
            ended: false,
        })
    }

    async fn get_drop(&self, id: &str) -> AppResult<Option<DropState>> {
        Ok(self
            .drop_states(std::slice::from_ref(&id.to_string()))
            .await?
            .into_iter()
            .next())
    }

    async fn room_drops(&self, room: &str) -> AppResult<Vec<DropState>> {
        let ids: Vec<String> = self
            .query(
                redis::cmd("LRANGE")
                    .arg(room_drops_key(room))
                    .arg(0)
                    .arg(-1),
            )
            .await?;
        // A drop id listed under the wrong room (a refused duplicate create indexes
        // before it is refused) is not shown here.
        let mut states = self.drop_states(&ids).await?;
        states.retain(|s| s.drop.room == room);
        Ok(states)
    }

    async fn sweepable_drops(&self) -> AppResult<Vec<String>> {
        let ids: Vec<String> = self.query(redis::cmd("SMEMBERS").arg(ALL_DROPS)).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            let k = DropKeys::new(id);
            pipe.cmd("ZCARD")
                .arg(k.holds)
                .cmd("ZCARD")
                .arg(k.gdue)
                .cmd("HGET")
                .arg(k.meta)
                .arg("ended");
        }
        let replies = self.query_pipe(&pipe).await?;
        let mut out = Vec::new();
        let mut finished = Vec::new();
        for (id, triple) in ids.into_iter().zip(replies.chunks(3)) {
            let [holds, groups, ended] = triple else {
                return Err(bad_reply("pipeline"));
            };
            let holds: u64 = int(holds)?;
            let groups: u64 = int(groups)?;
            if holds > 0 || groups > 0 {
                out.push(id);
            } else if opt_text(ended)?.as_deref() != Some("0") {
                // Ended (or gone) with nothing held and no open group: it can never hold a
                // reservation again.
                finished.push(id);
            }
        }
        if !finished.is_empty() {
            let _: i64 = self
                .query(redis::cmd("SREM").arg(ALL_DROPS).arg(&finished))
                .await?;
        }
        Ok(out)
    }

    async fn end_drop(&self, id: &str, now: Millis) -> AppResult<DropState> {
        let k = DropKeys::new(id);
        let now = now.to_string();
        let items = self
            .eval(&self.scripts.end_drop, &[&k.meta, &k.ledger], &[&now])
            .await?;
        drop_state_at(&items, 0)?.ok_or_else(|| AppError::not_found("drop"))
    }

    async fn claim(&self, req: &ClaimRequest) -> AppResult<Reservation> {
        self.claims.claim(req).await
    }

    async fn confirm(&self, claim_id: &str, user: &str, now: Millis) -> AppResult<Transition> {
        self.transition(&self.scripts.confirm, false, claim_id, user, now)
            .await
    }

    async fn release(&self, claim_id: &str, user: &str, now: Millis) -> AppResult<Transition> {
        self.transition(&self.scripts.release, true, claim_id, user, now)
            .await
    }

    async fn sweep(&self, drop: &str, now: Millis) -> AppResult<Sweep> {
        let k = DropKeys::new(drop);
        let now = now.to_string();
        let batch = SWEEP_BATCH.to_string();
        let items = self
            .eval(
                &self.scripts.sweep,
                &[&k.meta, &k.claims, &k.holds, &k.users, &k.ledger],
                &[&now, drop, &batch],
            )
            .await?;
        let levels = levels_at(&items, 0)?;
        let mut expired = Vec::new();
        for pair in items.get(4..).unwrap_or_default().chunks(2) {
            let [cid, enc] = pair else {
                return Err(bad_reply("sweep reply"));
            };
            expired.push(decode_claim(&text(cid)?, &text(enc)?)?);
        }
        Ok(Sweep { expired, levels })
    }

    async fn get_claim(&self, claim_id: &str) -> AppResult<Option<Claim>> {
        let Some(drop) = claim_drop(claim_id) else {
            return Ok(None);
        };
        let enc: Option<String> = self
            .query(
                redis::cmd("HGET")
                    .arg(DropKeys::new(drop).claims)
                    .arg(claim_id),
            )
            .await?;
        enc.map(|e| decode_claim(claim_id, &e)).transpose()
    }

    async fn user_claims(&self, user: &str) -> AppResult<Vec<Claim>> {
        let max = super::USER_CLAIMS_MAX;
        // The user's drops, then the newest `max` claim numbers of each (each drop's list
        // is in claim order), then those claims: the newest `max` of them, newest first.
        let drops: Vec<String> = self
            .query(
                redis::cmd("ZREVRANGE")
                    .arg(user_drops_key(user))
                    .arg(0)
                    .arg(USER_DROPS_READ as i64 - 1),
            )
            .await?;
        let drops: Vec<String> = drops.into_iter().filter(|d| is_valid_id(d)).collect();
        if drops.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for drop in &drops {
            pipe.cmd("HGET").arg(DropKeys::new(drop).uclaims).arg(user);
        }
        let lists = self.query_pipe(&pipe).await?;
        let mut ids = Vec::new();
        for (drop, list) in drops.iter().zip(lists) {
            let list = opt_text(&list)?.unwrap_or_default();
            let numbers: Vec<&str> = list.split(',').filter(|n| !n.is_empty()).collect();
            for n in &numbers[numbers.len().saturating_sub(max)..] {
                let n: u64 = n.parse().map_err(|_| bad_reply("user claim list"))?;
                ids.push(super::claim_id(drop, n));
            }
        }
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            let drop = claim_drop(id).unwrap_or_default();
            pipe.cmd("HGET").arg(DropKeys::new(drop).claims).arg(id);
        }
        let replies = self.query_pipe(&pipe).await?;
        let mut out = Vec::with_capacity(ids.len());
        for (id, enc) in ids.iter().zip(replies.iter()) {
            if let Some(enc) = opt_text(enc)? {
                out.push(decode_claim(id, &enc)?);
            }
        }
        // Newest first; claims of one millisecond by their number in the drop (claim order).
        let number = |c: &Claim| {
            c.claim_id
                .rsplit_once('.')
                .and_then(|(_, n)| n.parse::<u64>().ok())
        };
        out.sort_by(|a, b| {
            (b.created_at, number(b), &b.claim_id).cmp(&(a.created_at, number(a), &a.claim_id))
        });
        out.truncate(max);
        Ok(out)
    }

    async fn ledger(&self, drop: &str) -> AppResult<Vec<LedgerEntry>> {
        const PAGE: usize = 1000;
        let k = DropKeys::new(drop);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("EXISTS")
            .arg(&k.meta)
            .cmd("XRANGE")
            .arg(&k.ledger)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(PAGE);
        let mut replies = self.query_pipe(&pipe).await?.into_iter();
        let exists: i64 = int(&replies.next().ok_or_else(|| bad_reply("pipeline"))?)?;
        if exists == 0 {
            return Err(AppError::not_found("drop"));
        }
        let mut page = array(replies.next().ok_or_else(|| bad_reply("pipeline"))?)?;
        let mut out = Vec::new();
        loop {
            let full = page.len() == PAGE;
            let mut last = None;
            for entry in page {
                let (id, fields) = stream_entry(entry)?;
                for record in ledger_records(&fields) {
                    out.push(ledger_entry(record)?);
                }
                last = Some(id);
            }
            let Some(last) = last.filter(|_| full) else {
                break;
            };
            page = self
                .query(
                    redis::cmd("XRANGE")
                        .arg(&k.ledger)
                        .arg(format!("({last}"))
                        .arg("+")
                        .arg("COUNT")
                        .arg(PAGE),
                )
                .await
                .and_then(array)?;
        }
        Ok(out)
    }

    async fn holders(&self, drop: &str) -> AppResult<Vec<String>> {
        let k = DropKeys::new(drop);
        let mut cmd = redis::cmd("HKEYS");
        cmd.arg(&k.users);
        self.query(&cmd).await
    }

    async fn open_group(&self, req: &GroupRequest) -> AppResult<GroupAnswer> {
        self.group_transition(&self.scripts.open_group, &req.target, "open", req, &[])
            .await
    }

    async fn join_group(&self, req: &GroupRequest) -> AppResult<GroupAnswer> {
        let gid = req.target.as_str();
        let Some(drop) = group_drop(gid) else {
            return Err(AppError::not_found("group"));
        };
        let member = format!("{:020}", super::group_number(gid));
        self.group_transition(&self.scripts.join_group, drop, gid, req, &[&member])
            .await
    }

    async fn get_group(&self, group_id: &str) -> AppResult<Option<Group>> {
        let Some(drop) = group_drop(group_id) else {
            return Ok(None);
        };
        let k = DropKeys::new(drop);
        let items = self
            .eval(
                &self.scripts.read_groups,
                &[&k.meta, &k.groups, &k.gmembers, &k.gdue],
                &[group_id],
            )
            .await?;
        Ok(groups_from(&items, 0)?.into_iter().next())
    }

    async fn drop_groups(&self, drop: &str) -> AppResult<Vec<Group>> {
        let k = DropKeys::new(drop);
        let list = format!("*{drop}");
        let items = self
            .eval(
                &self.scripts.read_groups,
                &[&k.meta, &k.groups, &k.gmembers, &k.gdue],
                &[&list],
            )
            .await?;
        let mut groups = groups_from(&items, 0)?;
        groups.retain(|g| g.status == GroupStatus::Open);
        super::sort_groups(&mut groups);
        Ok(groups)
    }

    async fn fail_groups(&self, drop: &str, now: Millis) -> AppResult<GroupSweep> {
        let k = DropKeys::new(drop);
        let now = now.to_string();
        let batch = SWEEP_BATCH.to_string();
        let items = self
            .eval(
                &self.scripts.fail_groups,
                &[
                    &k.meta,
                    &k.users,
                    &k.groups,
                    &k.gmembers,
                    &k.gdue,
                    &k.ledger,
                ],
                &[&now, drop, &batch],
            )
            .await?;
        Ok(GroupSweep {
            levels: levels_at(&items, 0)?,
            failed: groups_from(&items, 4)?,
        })
    }

    async fn moderation(&self, room: &str) -> AppResult<HashMap<String, String>> {
        self.query(redis::cmd("HGETALL").arg(room_mod(room))).await
    }

    async fn set_moderation(&self, room: &str, field: &str, value: Option<&str>) -> AppResult<()> {
        let mut cmd = match value {
            Some(_) => redis::cmd("HSET"),
            None => redis::cmd("HDEL"),
        };
        cmd.arg(room_mod(room)).arg(field);
        if let Some(v) = value {
            cmd.arg(v);
        }
        self.query::<i64>(&cmd).await.map(|_| ())
    }

    async fn append_mod_log(&self, room: &str, entry: &str, keep: usize) -> AppResult<()> {
        let key = room_mod_log(room);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("LPUSH")
            .arg(&key)
            .arg(entry)
            .ignore()
            .cmd("LTRIM")
            .arg(&key)
            .arg(0)
            .arg(keep.saturating_sub(1))
            .ignore();
        self.query_pipe(&pipe).await.map(|_| ())
    }

    async fn mod_log(&self, room: &str, n: usize) -> AppResult<Vec<String>> {
        self.query(
            redis::cmd("LRANGE")
                .arg(room_mod_log(room))
                .arg(0)
                .arg(n.saturating_sub(1)),
        )
        .await
    }
}
