//! The embedded engine: all state in this process, one short `std::sync::Mutex` per room and
//! per drop (never held across an `.await`). It implements exactly the rules of the redis
//! engine's Lua scripts, step for step, so the two can be tested against each other.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;

use async_trait::async_trait;
use dashmap::DashMap;

use crate::hashing::{FastDashMap, FastMap};

use super::{
    ClaimRequest, GroupAnswer, GroupRequest, GroupSweep, Reservation, SWEEP_BATCH, Store, Sweep,
    Transition, claim_drop, group_drop,
};
use crate::error::{AppError, AppResult};
use crate::model::{
    ChatMessage, Claim, ClaimStatus, Drop, DropState, Group, GroupStatus, LedgerEntry, Millis,
    Room, StockLevels, User,
};

struct RoomData {
    room: Room,
    seq: u64,
    history: VecDeque<ChatMessage>,
    likes: u64,
}

struct IdemRecord {
    qty: u64,
    claim_id: String,
    expires_at: Millis,
}

struct DropData {
    drop: Drop,
    levels: StockLevels,
    ended: bool,
    next_claim: u64,
    claims: FastMap<String, Claim>,
    /// Reserved claims by hold deadline: (expires_at, claim number, claim id).
    holds: BTreeSet<(Millis, u64, String)>,
    per_user: FastMap<String, u64>,
    idem: FastMap<(String, String), IdemRecord>,
    ledger: Vec<LedgerEntry>,
    next_group: u64,
    groups: FastMap<String, Group>,
    /// Open groups by deadline: (expires_at, group number, group id).
    group_due: BTreeSet<(Millis, u64, String)>,
    /// Group idempotency records: (user, `open:KEY` or `GROUP:KEY`) -> (group id, expiry).
    group_idem: FastMap<(String, String), (String, Millis)>,
}

impl DropData {
    fn state(&self) -> DropState {
        DropState {
            drop: self.drop.clone(),
            levels: self.levels,
            ended: self.ended,
        }
    }

    fn log(&mut self, op: &str, claim: Option<&Claim>, qty: u64, ts: Millis) {
        self.ledger.push(LedgerEntry {
            op: op.to_string(),
            claim_id: claim.map(|c| c.claim_id.clone()),
            user: claim.map(|c| c.user.clone()),
            qty,
            ts,
            group: None,
        });
    }

    fn log_group(&mut self, op: &str, group: &str, user: Option<&str>, qty: u64, ts: Millis) {
        self.ledger.push(LedgerEntry {
            op: op.to_string(),
            claim_id: None,
            user: user.map(str::to_string),
            qty,
            ts,
            group: Some(group.to_string()),
        });
    }

    /// `ended` or `not_started` when the sale window does not include `now`.
    fn check_window(&self, now: Millis) -> AppResult<()> {
        if self.ended || self.drop.ends_at.is_some_and(|e| now >= e) {
            return Err(AppError::conflict("ended", "this drop has ended"));
        }
        if now < self.drop.starts_at {
            return Err(AppError::conflict(
                "not_started",
                "this drop has not started",
            ));
        }
        Ok(())
    }

    /// `limit_reached` or `sold_out` when `user` cannot take `qty` more units.
    fn check_units(&self, user: &str, qty: u64) -> AppResult<()> {
        let held = self.per_user.get(user).copied().unwrap_or(0);
        if held + qty > self.drop.per_user_limit {
            return Err(AppError::conflict(
                "limit_reached",
                format!("at most {} per person", self.drop.per_user_limit),
            ));
        }
        if self.levels.remaining < qty {
            return Err(AppError::conflict("sold_out", "not enough stock left"));
        }
        Ok(())
    }

    /// Moves units from remaining to reserved and counts them for the user.
    fn reserve_units(&mut self, user: &str, qty: u64) {
        self.levels.remaining -= qty;
        self.levels.reserved += qty;
        // Only a user's first units allocate their key.
        match self.per_user.get_mut(user) {
            Some(n) => *n += qty,
            None => {
                self.per_user.insert(user.to_string(), qty);
            }
        }
    }

    /// Moves reserved units back to remaining and stops counting them for the user.
    fn return_units(&mut self, user: &str, qty: u64) {
        self.levels.reserved -= qty;
        self.levels.remaining += qty;
        if let Some(n) = self.per_user.get_mut(user) {
            *n = n.saturating_sub(qty);
            if *n == 0 {
                self.per_user.remove(user);
            }
        }
    }

    /// The live group idempotency record for `scope`, forgetting a dead one.
    fn group_replay(&mut self, scope: &Option<(String, String)>, now: Millis) -> Option<String> {
        let scope = scope.as_ref()?;
        match self.group_idem.get(scope) {
            Some((gid, exp)) if *exp > now => Some(gid.clone()),
            Some(_) => {
                self.group_idem.remove(scope);
                None
            }
            None => None,
        }
    }

    fn remember_group(&mut self, scope: Option<(String, String)>, req: &GroupRequest, gid: &str) {
        if let Some(scope) = scope {
            let exp = req.now + (req.key_ttl_secs as Millis) * 1000;
            self.group_idem.insert(scope, (gid.to_string(), exp));
        }
    }

    fn group_answer(&self, gid: &str, replay: bool) -> AppResult<GroupAnswer> {
        let group = self
            .groups
            .get(gid)
            .cloned()
            .ok_or_else(|| AppError::internal("idempotency record without group"))?;
        Ok(GroupAnswer {
            group,
            levels: self.levels,
            replay,
        })
    }

    /// Returns a reserved claim's units to stock with the given final status.
    fn unreserve(&mut self, claim_id: &str, status: ClaimStatus, op: &str, now: Millis) -> Claim {
        let mut out = None;
        if let Some(c) = self.claims.get_mut(claim_id) {
            c.status = status;
            out = Some(c.clone());
        }
        let claim = out.unwrap_or_else(|| unreachable_claim(claim_id));
        self.holds.remove(&hold_key(&claim));
        self.return_units(&claim.user, claim.qty);
        self.log(op, Some(&claim), claim.qty, now);
        claim
    }
}

fn unreachable_claim(claim_id: &str) -> Claim {
    // Callers look the claim up before unreserving; this keeps the path panic-free anyway.
    Claim {
        claim_id: claim_id.to_string(),
        drop: String::new(),
        user: String::new(),
        qty: 0,
        status: ClaimStatus::Released,
        created_at: 0,
        expires_at: 0,
    }
}

fn solo_not_allowed() -> AppError {
    AppError::conflict(
        "solo_not_allowed",
        "this drop is sold only in groups: open or join one",
    )
}

/// A `not_found` from `with_drop` names the group, not its drop.
fn group_not_found(e: AppError) -> AppError {
    if e.code == "not_found" {
        AppError::not_found("group")
    } else {
        e
    }
}

fn hold_key(c: &Claim) -> (Millis, u64, String) {
    let n = c
        .claim_id
        .rsplit_once('.')
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(0);
    (c.expires_at, n, c.claim_id.clone())
}

/// The embedded engine.
#[derive(Default)]
pub struct MemoryStore {
    rooms: DashMap<String, Mutex<RoomData>>,
    drops: FastDashMap<String, Mutex<DropData>>,
    room_drops: DashMap<String, Vec<String>>,
    user_claims: FastDashMap<String, Vec<String>>,
    /// Moderation record and log per room.
    moderation: DashMap<String, (HashMap<String, String>, VecDeque<String>)>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn with_room<T>(&self, id: &str, f: impl FnOnce(&mut RoomData) -> T) -> AppResult<T> {
        let entry = self
            .rooms
            .get(id)
            .ok_or_else(|| AppError::not_found("room"))?;
        let mut guard = entry
            .lock()
            .map_err(|_| AppError::internal("room lock poisoned"))?;
        Ok(f(&mut guard))
    }

    fn with_drop<T>(&self, id: &str, f: impl FnOnce(&mut DropData) -> T) -> AppResult<T> {
        let entry = self
            .drops
            .get(id)
            .ok_or_else(|| AppError::not_found("drop"))?;
        let mut guard = entry
            .lock()
            .map_err(|_| AppError::internal("drop lock poisoned"))?;
        Ok(f(&mut guard))
    }

    /// What a user's transition of a claim shares (as `claim_for_transition` in
    /// `common.lua`): the claim exists and is the caller's; one already at `target` is
    /// answered as it is (a retry); a closed one is refused; a reserved one goes to `apply`.
    fn transition(
        &self,
        claim_id: &str,
        user: &str,
        target: ClaimStatus,
        apply: impl FnOnce(&mut DropData, Claim) -> AppResult<Claim>,
    ) -> AppResult<Transition> {
        let drop = claim_drop(claim_id).ok_or_else(|| AppError::not_found("claim"))?;
        self.with_drop(drop, |d| {
            let claim = d
                .claims
                .get(claim_id)
                .cloned()
                .ok_or_else(|| AppError::not_found("claim"))?;
            Self::claim_owner_check(&claim, user)?;
            let claim = if claim.status == target {
                claim
            } else if claim.status == ClaimStatus::Reserved {
                apply(d, claim)?
            } else {
                return Err(AppError::conflict(
                    "claim_closed",
                    format!("this claim was {}", claim.status.as_str()),
                ));
            };
            Ok(Transition {
                claim,
                levels: d.levels,
            })
        })
        .map_err(|e| {
            if e.code == "not_found" {
                AppError::not_found("claim")
            } else {
                e
            }
        })?
    }

    fn claim_owner_check(claim: &Claim, user: &str) -> AppResult<()> {
        if claim.user == user {
            Ok(())
        } else {
            Err(AppError::forbidden("this claim belongs to someone else"))
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn engine(&self) -> &'static str {
        "memory"
    }

    async fn ping(&self) -> AppResult<()> {
        Ok(())
    }

    async fn create_room(&self, room: &Room) -> AppResult<()> {
        use dashmap::mapref::entry::Entry;
        match self.rooms.entry(room.id.clone()) {
            Entry::Occupied(_) => Err(AppError::conflict(
                "room_exists",
                format!("room {} already exists", room.id),
            )),
            Entry::Vacant(v) => {
                v.insert(Mutex::new(RoomData {
                    room: room.clone(),
                    seq: 0,
                    history: VecDeque::new(),
                    likes: 0,
                }));
                Ok(())
            }
        }
    }

    async fn get_room(&self, id: &str) -> AppResult<Option<Room>> {
        match self.with_room(id, |r| r.room.clone()) {
            Ok(r) => Ok(Some(r)),
            Err(e) if e.code == "not_found" => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn append_chat(
        &self,
        room: &str,
        id: &str,
        user: &User,
        text: &str,
        ts: Millis,
        history: usize,
    ) -> AppResult<ChatMessage> {
        self.with_room(room, |r| {
            r.seq += 1;
            let msg = ChatMessage {
                seq: r.seq,
                id: id.to_string(),
                user: user.clone(),
                text: text.to_string(),
                ts,
            };
            r.history.push_back(msg.clone());
            while r.history.len() > history {
                r.history.pop_front();
            }
            msg
        })
    }

    async fn recent_chat(&self, room: &str, n: usize) -> AppResult<Vec<ChatMessage>> {
        self.with_room(room, |r| {
            let skip = r.history.len().saturating_sub(n);
            r.history.iter().skip(skip).cloned().collect()
        })
    }

    async fn chat_since(&self, room: &str, since: u64) -> AppResult<Option<Vec<ChatMessage>>> {
        self.with_room(room, |r| {
            if since >= r.seq {
                return Some(Vec::new());
            }
            match r.history.front() {
                Some(first) if first.seq <= since + 1 => Some(
                    r.history
                        .iter()
                        .filter(|m| m.seq > since)
                        .cloned()
                        .collect(),
                ),
                _ => None,
            }
        })
    }

    async fn chat_seq(&self, room: &str) -> AppResult<u64> {
        self.with_room(room, |r| r.seq)
    }

    async fn add_likes(&self, room: &str, n: u64) -> AppResult<u64> {
        self.with_room(room, |r| {
            r.likes = r.likes.saturating_add(n);
            r.likes
        })
    }

    async fn likes(&self, room: &str) -> AppResult<u64> {
        self.with_room(room, |r| r.likes)
    }

    async fn create_drop(&self, drop: &Drop) -> AppResult<DropState> {
        use dashmap::mapref::entry::Entry;
        let levels = StockLevels {
            total: drop.stock,
            remaining: drop.stock,
            reserved: 0,
            sold: 0,
        };
        let mut data = DropData {
            drop: drop.clone(),
            levels,
            ended: false,
            next_claim: 0,
            claims: FastMap::default(),
            holds: BTreeSet::new(),
            per_user: FastMap::default(),
            idem: FastMap::default(),
            ledger: Vec::new(),
            next_group: 0,
            groups: FastMap::default(),
            group_due: BTreeSet::new(),
            group_idem: FastMap::default(),
        };
        data.log("create", None, drop.stock, drop.created_at);
        let state = data.state();
        match self.drops.entry(drop.id.clone()) {
            Entry::Occupied(_) => {
                return Err(AppError::conflict(
                    "drop_exists",
                    format!("drop {} already exists", drop.id),
                ));
            }
            Entry::Vacant(v) => {
                v.insert(Mutex::new(data));
            }
        }
        self.room_drops
            .entry(drop.room.clone())
            .or_default()
            .push(drop.id.clone());
        Ok(state)
    }

    async fn get_drop(&self, id: &str) -> AppResult<Option<DropState>> {
        match self.with_drop(id, |d| d.state()) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.code == "not_found" => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn room_drops(&self, room: &str) -> AppResult<Vec<DropState>> {
        let ids = self
            .room_drops
            .get(room)
            .map(|v| v.clone())
            .unwrap_or_default();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(s) = self.get_drop(&id).await? {
                out.push(s);
            }
        }
        Ok(out)
    }

    async fn sweepable_drops(&self) -> AppResult<Vec<String>> {
        let mut out = Vec::new();
        for entry in self.drops.iter() {
            if let Ok(d) = entry.value().lock()
                && (!d.holds.is_empty() || !d.group_due.is_empty())
            {
                out.push(entry.key().clone());
            }
        }
        Ok(out)
    }

    async fn end_drop(&self, id: &str, now: Millis) -> AppResult<DropState> {
        self.with_drop(id, |d| {
            if !d.ended {
                d.ended = true;
                d.log("end", None, 0, now);
            }
            d.state()
        })
    }

    async fn claim(&self, req: &ClaimRequest) -> AppResult<Reservation> {
        let result = self.with_drop(&req.drop, |d| -> AppResult<Reservation> {
            let idem_key = (req.user.id.clone(), req.key.clone());
            if let Some(rec) = d.idem.get(&idem_key) {
                if rec.expires_at > req.now {
                    if rec.qty != req.qty {
                        return Err(AppError::unprocessable(
                            "idempotency_mismatch",
                            "this Idempotency-Key was used with a different request",
                        ));
                    }
                    let claim =
                        d.claims.get(&rec.claim_id).cloned().ok_or_else(|| {
                            AppError::internal("idempotency record without claim")
                        })?;
                    return Ok(Reservation {
                        claim,
                        levels: d.levels,
                        replay: true,
                    });
                }
                d.idem.remove(&idem_key);
            }
            if d.drop.group.is_some_and(|g| !g.allow_solo) {
                return Err(solo_not_allowed());
            }
            d.check_window(req.now)?;
            d.check_units(&req.user.id, req.qty)?;
            d.next_claim += 1;
            let claim = Claim {
                claim_id: super::claim_id(&d.drop.id, d.next_claim),
                drop: d.drop.id.clone(),
                user: req.user.id.clone(),
                qty: req.qty,
                status: ClaimStatus::Reserved,
                created_at: req.now,
                expires_at: req.now + (d.drop.hold_secs as Millis) * 1000,
            };
            d.reserve_units(&req.user.id, req.qty);
            d.holds.insert(hold_key(&claim));
            d.claims.insert(claim.claim_id.clone(), claim.clone());
            d.idem.insert(
                idem_key,
                IdemRecord {
                    qty: req.qty,
                    claim_id: claim.claim_id.clone(),
                    expires_at: req.now + (req.key_ttl_secs as Millis) * 1000,
                },
            );
            d.log("claim", Some(&claim), req.qty, req.now);
            Ok(Reservation {
                claim,
                levels: d.levels,
                replay: false,
            })
        })??;
        if !result.replay {
            let id = result.claim.claim_id.clone();
            match self.user_claims.get_mut(&req.user.id) {
                Some(mut ids) => ids.push(id),
                None => self
                    .user_claims
                    .entry(req.user.id.clone())
                    .or_default()
                    .push(id),
            }
        }
        Ok(result)
    }

    async fn confirm(&self, claim_id: &str, user: &str, now: Millis) -> AppResult<Transition> {
        self.transition(claim_id, user, ClaimStatus::Sold, |d, claim| {
            if now >= claim.expires_at {
                return Err(AppError::conflict(
                    "claim_expired",
                    "the hold on this claim has expired",
                ));
            }
            d.holds.remove(&hold_key(&claim));
            d.levels.reserved -= claim.qty;
            d.levels.sold += claim.qty;
            let mut sold = claim;
            sold.status = ClaimStatus::Sold;
            d.claims.insert(sold.claim_id.clone(), sold.clone());
            d.log("confirm", Some(&sold), sold.qty, now);
            Ok(sold)
        })
    }

    async fn release(&self, claim_id: &str, user: &str, now: Millis) -> AppResult<Transition> {
        self.transition(claim_id, user, ClaimStatus::Released, |d, claim| {
            Ok(d.unreserve(&claim.claim_id, ClaimStatus::Released, "release", now))
        })
    }

    async fn sweep(&self, drop: &str, now: Millis) -> AppResult<Sweep> {
        self.with_drop(drop, |d| {
            let due: Vec<String> = d
                .holds
                .iter()
                .take_while(|(exp, _, _)| *exp <= now)
                .take(SWEEP_BATCH)
                .map(|(_, _, id)| id.clone())
                .collect();
            let expired = due
                .iter()
                .map(|id| d.unreserve(id, ClaimStatus::Expired, "expire", now))
                .collect();
            Sweep {
                expired,
                levels: d.levels,
            }
        })
    }

    async fn get_claim(&self, claim_id: &str) -> AppResult<Option<Claim>> {
        let Some(drop) = claim_drop(claim_id) else {
            return Ok(None);
        };
        match self.with_drop(drop, |d| d.claims.get(claim_id).cloned()) {
            Ok(c) => Ok(c),
            Err(e) if e.code == "not_found" => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn user_claims(&self, user: &str) -> AppResult<Vec<Claim>> {
        let ids = self
            .user_claims
            .get(user)
            .map(|v| v.clone())
            .unwrap_or_default();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids.iter().rev().take(super::USER_CLAIMS_MAX) {
            if let Some(c) = self.get_claim(id).await? {
                out.push(c);
            }
        }
        Ok(out)
    }

    async fn ledger(&self, drop: &str) -> AppResult<Vec<LedgerEntry>> {
        self.with_drop(drop, |d| d.ledger.clone())
    }

    async fn holders(&self, drop: &str) -> AppResult<Vec<String>> {
        self.with_drop(drop, |d| d.per_user.keys().cloned().collect())
    }

    async fn moderation(&self, room: &str) -> AppResult<HashMap<String, String>> {
        Ok(self
            .moderation
            .get(room)
            .map(|m| m.0.clone())
            .unwrap_or_default())
    }

    async fn set_moderation(&self, room: &str, field: &str, value: Option<&str>) -> AppResult<()> {
        let mut m = self.moderation.entry(room.to_string()).or_default();
        match value {
            Some(v) => m.0.insert(field.to_string(), v.to_string()),
            None => m.0.remove(field),
        };
        Ok(())
    }

    async fn append_mod_log(&self, room: &str, entry: &str, keep: usize) -> AppResult<()> {
        let mut m = self.moderation.entry(room.to_string()).or_default();
        m.1.push_front(entry.to_string());
        m.1.truncate(keep);
        Ok(())
    }

    async fn mod_log(&self, room: &str, n: usize) -> AppResult<Vec<String>> {
        Ok(self
            .moderation
            .get(room)
            .map(|m| m.1.iter().take(n).cloned().collect())
            .unwrap_or_default())
    }

    async fn open_group(&self, req: &GroupRequest) -> AppResult<GroupAnswer> {
        self.with_drop(&req.target, |d| {
            let scope = req
                .key
                .as_ref()
                .map(|k| (req.user.id.clone(), format!("open:{k}")));
            if let Some(gid) = d.group_replay(&scope, req.now) {
                return d.group_answer(&gid, true);
            }
            let Some(terms) = d.drop.group else {
                return Err(AppError::conflict(
                    "not_group",
                    "this drop is not sold in groups",
                ));
            };
            d.check_window(req.now)?;
            d.check_units(&req.user.id, 1)?;
            d.next_group += 1;
            let n = d.next_group;
            let gid = super::group_id(&d.drop.id, n);
            let deadline = req.now + (terms.window_secs as Millis) * 1000;
            let group = Group {
                group_id: gid.clone(),
                drop: d.drop.id.clone(),
                size: terms.size,
                price: terms.price,
                members: vec![req.user.id.clone()],
                status: GroupStatus::Open,
                created_at: req.now,
                expires_at: d.drop.ends_at.map_or(deadline, |e| e.min(deadline)),
            };
            d.reserve_units(&req.user.id, 1);
            d.group_due.insert((group.expires_at, n, gid.clone()));
            d.groups.insert(gid.clone(), group);
            d.remember_group(scope, req, &gid);
            d.log_group("group_open", &gid, Some(&req.user.id), 1, req.now);
            d.group_answer(&gid, false)
        })?
    }

    async fn join_group(&self, req: &GroupRequest) -> AppResult<GroupAnswer> {
        let gid = req.target.as_str();
        let drop = group_drop(gid).ok_or_else(|| AppError::not_found("group"))?;
        self.with_drop(drop, |d| {
            let Some(group) = d.groups.get(gid).cloned() else {
                return Err(AppError::not_found("group"));
            };
            let scope = req
                .key
                .as_ref()
                .map(|k| (req.user.id.clone(), format!("{gid}:{k}")));
            if let Some(gid) = d.group_replay(&scope, req.now) {
                return d.group_answer(&gid, true);
            }
            match group.status {
                GroupStatus::Completed => return Err(group_full()),
                GroupStatus::Failed => return Err(group_closed()),
                GroupStatus::Open if req.now >= group.expires_at => return Err(group_closed()),
                GroupStatus::Open => {}
            }
            if group.members.contains(&req.user.id) {
                return Err(AppError::conflict(
                    "already_member",
                    "you are already in this group",
                ));
            }
            if d.ended || d.drop.ends_at.is_some_and(|e| req.now >= e) {
                return Err(AppError::conflict("ended", "this drop has ended"));
            }
            d.check_units(&req.user.id, 1)?;
            d.reserve_units(&req.user.id, 1);
            let mut group = group;
            group.members.push(req.user.id.clone());
            d.log_group("group_join", gid, Some(&req.user.id), 1, req.now);
            if group.members.len() as u64 >= group.size {
                // The last place: every member's unit is sold in this same step.
                group.status = GroupStatus::Completed;
                d.levels.reserved -= group.size;
                d.levels.sold += group.size;
                let n = super::group_number(gid);
                d.group_due.remove(&(group.expires_at, n, gid.to_string()));
                d.log_group("group_complete", gid, None, group.size, req.now);
            }
            d.groups.insert(gid.to_string(), group);
            d.remember_group(scope, req, gid);
            d.group_answer(gid, false)
        })
        .map_err(group_not_found)?
    }

    async fn get_group(&self, group_id: &str) -> AppResult<Option<Group>> {
        let Some(drop) = group_drop(group_id) else {
            return Ok(None);
        };
        match self.with_drop(drop, |d| d.groups.get(group_id).cloned()) {
            Ok(g) => Ok(g),
            Err(e) if e.code == "not_found" => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn drop_groups(&self, drop: &str) -> AppResult<Vec<Group>> {
        let mut groups = self.with_drop(drop, |d| {
            d.group_due
                .iter()
                .filter_map(|(_, _, gid)| d.groups.get(gid).cloned())
                .collect::<Vec<_>>()
        })?;
        super::sort_groups(&mut groups);
        Ok(groups)
    }

    async fn fail_groups(&self, drop: &str, now: Millis) -> AppResult<GroupSweep> {
        self.with_drop(drop, |d| {
            let due: Vec<(Millis, u64, String)> = d
                .group_due
                .iter()
                .take_while(|(exp, _, _)| *exp <= now)
                .take(SWEEP_BATCH)
                .cloned()
                .collect();
            let mut failed = Vec::with_capacity(due.len());
            for key in due {
                d.group_due.remove(&key);
                let Some(mut group) = d.groups.get(&key.2).cloned() else {
                    continue;
                };
                if group.status != GroupStatus::Open {
                    continue;
                }
                group.status = GroupStatus::Failed;
                for member in &group.members {
                    d.return_units(member, 1);
                }
                let qty = group.members.len() as u64;
                d.log_group("group_fail", &group.group_id, None, qty, now);
                d.groups.insert(group.group_id.clone(), group.clone());
                failed.push(group);
            }
            GroupSweep {
                failed,
                levels: d.levels,
            }
        })
    }
}

fn group_full() -> AppError {
    AppError::conflict("group_full", "this group is full: it has completed")
}

fn group_closed() -> AppError {
    AppError::conflict("group_closed", "this group failed: its deadline passed")
}
