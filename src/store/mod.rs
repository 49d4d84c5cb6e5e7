//! The `Store` interface: everything livedrop must remember, behind one trait with two
//! engines. `memory` is embedded (one process, lost on restart); `redis` runs every drop
//! transition as one atomic Lua script on the drop's hash slot. Both implement exactly the
//! same rules, and the conformance tests and the differential property test hold them to it.
//!
//! Domain refusals (`sold_out`, `limit_reached`, …) come back as `AppError`s with their
//! stable codes, so an engine's answer can be handed to a client as it is.

pub mod memory;
pub mod redis;

use std::collections::HashMap;

use async_trait::async_trait;

use crate::error::AppResult;
use crate::model::{
    ChatMessage, Claim, Drop, DropState, Group, LedgerEntry, Millis, Room, StockLevels, User,
};

/// A request to reserve units of a drop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimRequest {
    pub drop: String,
    pub user: User,
    pub qty: u64,
    /// Idempotency key, scoped to (user, drop).
    pub key: String,
    pub now: Millis,
    /// How long the key is remembered, in seconds.
    pub key_ttl_secs: u64,
}

/// A successful claim: the reservation, the drop's counters right after it, and whether
/// this answer is the replay of an earlier request with the same key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub claim: Claim,
    pub levels: StockLevels,
    pub replay: bool,
}

/// A claim after a transition (confirm, release), with the drop's counters right after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub claim: Claim,
    pub levels: StockLevels,
}

/// What a sweep returned to stock.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Sweep {
    pub expired: Vec<Claim>,
    pub levels: StockLevels,
}

/// A request to open a group (`target` is the drop) or join one (`target` is the group).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupRequest {
    pub target: String,
    pub user: User,
    /// Idempotency key, scoped to (user, drop) for an open and (user, group) for a join;
    /// `None` makes the request a plain attempt.
    pub key: Option<String>,
    pub now: Millis,
    /// How long the key is remembered, in seconds.
    pub key_ttl_secs: u64,
}

/// A successful open or join: the group right after it (completed when this join filled
/// it), the drop's counters, and whether this is the replay of an earlier request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupAnswer {
    pub group: Group,
    pub levels: StockLevels,
    pub replay: bool,
}

/// What a group sweep failed and returned to stock.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct GroupSweep {
    pub failed: Vec<Group>,
    pub levels: StockLevels,
}

/// Most groups `drop_groups` lists.
pub const GROUPS_LIST_MAX: usize = 100;

/// Most claims `user_claims` returns (the newest): a load-test user may hold millions.
pub const USER_CLAIMS_MAX: usize = 200;

/// Most claims one sweep call expires; the sweeper calls again while it gets a full batch.
pub const SWEEP_BATCH: usize = 256;

/// Everything livedrop keeps. Implementations must be safe to call from many tasks at once
/// and, for the redis engine, from many server instances at once.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Which engine this is (`memory` or `redis`), for logs and `/readyz`.
    fn engine(&self) -> &'static str;

    /// Answers when the engine is reachable.
    async fn ping(&self) -> AppResult<()>;

    // ---- rooms and chat ----

    /// Creates a room; `room_exists` (409) if the id is taken.
    async fn create_room(&self, room: &Room) -> AppResult<()>;
    async fn get_room(&self, id: &str) -> AppResult<Option<Room>>;
    /// Appends a chat message, assigning the room's next `seq`; keeps at most `history`
    /// messages per room.
    async fn append_chat(
        &self,
        room: &str,
        id: &str,
        user: &User,
        text: &str,
        ts: Millis,
        history: usize,
    ) -> AppResult<ChatMessage>;
    /// The newest `n` messages, oldest first.
    async fn recent_chat(&self, room: &str, n: usize) -> AppResult<Vec<ChatMessage>>;
    /// Every message after `since`, oldest first; `None` when history no longer holds all.
    async fn chat_since(&self, room: &str, since: u64) -> AppResult<Option<Vec<ChatMessage>>>;
    /// The room's latest seq (0 before the first message).
    async fn chat_seq(&self, room: &str) -> AppResult<u64>;
    /// Adds likes and returns the room's new total.
    async fn add_likes(&self, room: &str, n: u64) -> AppResult<u64>;
    async fn likes(&self, room: &str) -> AppResult<u64>;

    // ---- drops and claims ----

    /// Creates a drop with all its stock remaining; `drop_exists` (409) if the id is taken.
    async fn create_drop(&self, drop: &Drop) -> AppResult<DropState>;
    async fn get_drop(&self, id: &str) -> AppResult<Option<DropState>>;
    /// Every drop of a room, oldest first.
    async fn room_drops(&self, room: &str) -> AppResult<Vec<DropState>>;
    /// Every drop id that may hold reservations (what the expiry sweeper visits).
    async fn sweepable_drops(&self) -> AppResult<Vec<String>>;
    /// Ends a drop: no claim succeeds afterwards; reservations may still be confirmed.
    async fn end_drop(&self, id: &str, now: Millis) -> AppResult<DropState>;
    /// Reserves units: refusals are `sold_out`, `limit_reached`, `not_started`, `ended`,
    /// `idempotency_mismatch`, `not_found`.
    async fn claim(&self, req: &ClaimRequest) -> AppResult<Reservation>;
    /// Payment done: the reservation becomes sold. Refusals: `not_found`, `forbidden`,
    /// `claim_expired`, `claim_closed`. Confirming a sold claim answers it again.
    async fn confirm(&self, claim_id: &str, user: &str, now: Millis) -> AppResult<Transition>;
    /// Gives a reservation back. Releasing a released claim answers it again.
    async fn release(&self, claim_id: &str, user: &str, now: Millis) -> AppResult<Transition>;
    /// Expires at most `SWEEP_BATCH` reservations of a drop whose hold passed `now`.
    async fn sweep(&self, drop: &str, now: Millis) -> AppResult<Sweep>;
    async fn get_claim(&self, claim_id: &str) -> AppResult<Option<Claim>>;
    /// A user's newest claims (at most `USER_CLAIMS_MAX`), newest first.
    async fn user_claims(&self, user: &str) -> AppResult<Vec<Claim>>;
    /// The drop's ledger, oldest first.
    async fn ledger(&self, drop: &str) -> AppResult<Vec<LedgerEntry>>;
    /// Users holding units (reserved or sold) of a drop: once a drop is sold out with
    /// nothing reserved, only these can have a retry that deserves more than `sold_out`.
    async fn holders(&self, drop: &str) -> AppResult<Vec<String>>;

    // ---- moderation (typed by `crate::moderation`; shared by every instance) ----

    /// A room's moderation record as field → value (`ban:USER`, `mute:USER`, `rules`, …).
    async fn moderation(&self, room: &str) -> AppResult<HashMap<String, String>>;
    /// Sets (`Some`) or removes (`None`) one field of a room's moderation record.
    async fn set_moderation(&self, room: &str, field: &str, value: Option<&str>) -> AppResult<()>;
    /// Appends to a room's moderation log, keeping the newest `keep` entries.
    async fn append_mod_log(&self, room: &str, entry: &str, keep: usize) -> AppResult<()>;
    /// The newest `n` entries of a room's moderation log, newest first.
    async fn mod_log(&self, room: &str, n: usize) -> AppResult<Vec<String>>;

    // ---- group buys ----

    /// Opens a group on a `group` drop with the caller as leader, reserving their unit at
    /// once. Refusals: `not_found`, `not_group`, `ended`, `not_started`, `limit_reached`,
    /// `sold_out`.
    async fn open_group(&self, req: &GroupRequest) -> AppResult<GroupAnswer>;
    /// Joins a group, reserving one unit; the join that fills the last place completes the
    /// group in the same atomic step (every member's unit sold). Refusals: `not_found`,
    /// `group_full` (completed), `group_closed` (failed or past its deadline),
    /// `already_member`, `ended`, `limit_reached`, `sold_out`.
    async fn join_group(&self, req: &GroupRequest) -> AppResult<GroupAnswer>;
    /// A group in any status (`None` for an unknown or malformed id): what a shared link
    /// shows.
    async fn get_group(&self, group_id: &str) -> AppResult<Option<Group>>;
    /// A drop's open groups, fullest first (then nearest deadline, then oldest), at most
    /// `GROUPS_LIST_MAX`.
    async fn drop_groups(&self, drop: &str) -> AppResult<Vec<Group>>;
    /// Fails at most `SWEEP_BATCH` open groups whose deadline passed `now`, returning every
    /// member's unit to stock, once per group however many sweepers run.
    async fn fail_groups(&self, drop: &str, now: Millis) -> AppResult<GroupSweep>;
}

/// Splits a group id `DROP.gN` into its drop id; `None` for anything else.
pub fn group_drop(group_id: &str) -> Option<&str> {
    let (drop, n) = group_id.rsplit_once(".g")?;
    (crate::protocol::is_valid_id(drop)
        && !n.is_empty()
        && n.len() <= 20
        && n.bytes().all(|b| b.is_ascii_digit()))
    .then_some(drop)
}

/// Builds the group id of the `n`th group of a drop.
pub fn group_id(drop: &str, n: u64) -> String {
    format!("{drop}.g{n}")
}

/// The number `N` of a group id `DROP.gN` (0 for anything else).
pub fn group_number(group_id: &str) -> u64 {
    group_id
        .rsplit_once(".g")
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(0)
}

/// Sorts groups for listing: fullest first, then nearest deadline, then oldest; both
/// engines list through this so their orders agree.
pub fn sort_groups(groups: &mut Vec<Group>) {
    let n = |g: &Group| group_number(&g.group_id);
    groups.sort_by(|a, b| {
        (b.members.len(), a.expires_at, n(a)).cmp(&(a.members.len(), b.expires_at, n(b)))
    });
    groups.truncate(GROUPS_LIST_MAX);
}

/// Splits a claim id `DROP.N` into its drop id; `None` for anything else.
pub fn claim_drop(claim_id: &str) -> Option<&str> {
    let (drop, n) = claim_id.rsplit_once('.')?;
    if crate::protocol::is_valid_id(drop)
        && !n.is_empty()
        && n.len() <= 20
        && n.bytes().all(|b| b.is_ascii_digit())
    {
        Some(drop)
    } else {
        None
    }
}

/// Builds the claim id of the `n`th claim of a drop.
pub fn claim_id(drop: &str, n: u64) -> String {
    format!("{drop}.{n}")
}

/// Opens the engine the configuration names: redis when a URL is given, else memory.
pub async fn open(config: &crate::config::Config) -> anyhow::Result<std::sync::Arc<dyn Store>> {
    match &config.redis_url {
        None => Ok(std::sync::Arc::new(memory::MemoryStore::new())),
        Some(url) => {
            let timeout = std::time::Duration::from_millis(config.redis_timeout_ms);
            let store = redis::RedisStore::connect(url, timeout)
                .await
                .map_err(|e| anyhow::anyhow!("--redis-url {url}: {e}"))?;
            Ok(std::sync::Arc::new(store))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_ids() {
        assert_eq!(claim_drop(&claim_id("d1", 7)), Some("d1"));
        assert_eq!(claim_drop("d1"), None);
        assert_eq!(claim_drop("d:1.5"), None);
        assert_eq!(claim_drop("d1.x"), None);
        assert_eq!(claim_drop("d1."), None);
        assert_eq!(group_drop(&group_id("d-g1", 3)), Some("d-g1"));
        assert_eq!(group_drop("d1.1"), None);
        assert_eq!(group_drop("d1.g"), None);
        assert_eq!(claim_drop(&group_id("d1", 3)), None);
    }
}
