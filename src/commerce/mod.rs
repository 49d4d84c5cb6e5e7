//! The domain rules around the store's atomic transitions: validating a new drop, claims,
//! confirms and releases; telling the room (`drop_live`, conflated `stock`, `sold_out`,
//! sampled `purchase`, `drop_ended`); sweeping expired holds; and the sold-out
//! short-circuit that answers claims for a finished drop without a store round-trip.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

pub mod groups;

use crate::bus::{Bus, Event, EventKind};
use crate::error::{AppError, AppResult};
use crate::hashing::{FastDashMap, FastDashSet};
use crate::model::{Claim, Drop, DropKind, DropState, Millis, StockLevels, User, now_millis};
use crate::protocol::{ServerMessage, check_id};
use crate::store::{ClaimRequest, Reservation, Store, Transition, claim_drop};

/// Largest quantity one claim may ask for.
pub const MAX_CLAIM_QTY: u64 = 1000;
/// Largest stock of one drop.
pub const MAX_STOCK: u64 = 10_000_000;
/// Minimum milliseconds between two `purchase` frames of one drop.
const PURCHASE_SAMPLE_MS: Millis = 500;

/// The body of `POST /api/rooms/{room}/drops`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewDrop {
    pub id: Option<String>,
    pub sku: String,
    pub title: String,
    pub price: i64,
    #[serde(default = "default_currency")]
    pub currency: String,
    pub stock: u64,
    #[serde(default = "one")]
    pub per_user_limit: u64,
    pub starts_at: Option<String>,
    pub ends_at: Option<String>,
    #[serde(default = "default_hold")]
    pub hold_secs: u64,
    #[serde(default = "default_kind")]
    pub kind: DropKind,
    /// Group drops only: members per group (2..=100).
    pub group_size: Option<u64>,
    /// Group drops only: price per unit when the group fills (minor units).
    pub group_price: Option<i64>,
    /// Group drops only: seconds a group has to fill after it opens (default 3600).
    pub group_window_secs: Option<u64>,
    /// Group drops only: whether a viewer may also claim alone at `price` (default false).
    pub allow_solo: Option<bool>,
}

fn default_currency() -> String {
    "USD".into()
}
fn one() -> u64 {
    1
}
fn default_hold() -> u64 {
    300
}
fn default_kind() -> DropKind {
    DropKind::Flash
}

fn parse_time(field: &'static str, s: &str) -> AppResult<Millis> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|_| {
            AppError::unprocessable("bad_drop", format!("{field} must be an RFC 3339 time"))
        })?;
    Ok((t.unix_timestamp_nanos() / 1_000_000) as Millis)
}

/// Formats milliseconds as RFC 3339 (UTC).
pub fn format_time(ms: Millis) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn text_field(field: &'static str, s: &str, max: usize) -> AppResult<()> {
    if s.trim().is_empty() || s.chars().count() > max || s.chars().any(char::is_control) {
        Err(AppError::unprocessable(
            "bad_drop",
            format!("{field} must be 1 to {max} characters without control characters"),
        ))
    } else {
        Ok(())
    }
}

impl NewDrop {
    /// Checks every field and builds the drop record.
    pub fn into_drop(self, room: &str, now: Millis) -> AppResult<Drop> {
        let bad = |m: &str| AppError::unprocessable("bad_drop", m.to_string());
        let group = groups::group_terms(&self)?;
        let id = match self.id {
            Some(id) => {
                check_id("drop id", &id)?;
                id
            }
            None => format!("d{}", &uuid::Uuid::new_v4().simple().to_string()[..16]),
        };
        text_field("sku", &self.sku, 64)?;
        text_field("title", &self.title, 200)?;
        if !(0..=1_000_000_000_000).contains(&self.price) {
            return Err(bad("price must be 0..=10^12 minor units"));
        }
        if self.currency.len() != 3 || !self.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(bad("currency must be a 3-letter ISO 4217 code"));
        }
        if !(1..=MAX_STOCK).contains(&self.stock) {
            return Err(bad("stock must be 1..=10000000"));
        }
        if !(1..=MAX_CLAIM_QTY).contains(&self.per_user_limit) {
            return Err(bad("per_user_limit must be 1..=1000"));
        }
        if !(1..=86_400).contains(&self.hold_secs) {
            return Err(bad("hold_secs must be 1..=86400"));
        }
        let starts_at = match &self.starts_at {
            Some(s) => parse_time("starts_at", s)?,
            None => now,
        };
        let ends_at = match &self.ends_at {
            Some(s) => Some(parse_time("ends_at", s)?),
            None => None,
        };
        if ends_at.is_some_and(|e| e <= starts_at) {
            return Err(bad("ends_at must be after starts_at"));
        }
        Ok(Drop {
            id,
            room: room.to_string(),
            sku: self.sku,
            title: self.title,
            price: self.price,
            currency: self.currency,
            stock: self.stock,
            per_user_limit: self.per_user_limit,
            starts_at,
            ends_at,
            hold_secs: self.hold_secs,
            kind: self.kind,
            created_at: now,
            group,
        })
    }
}

/// Refuses an `Idempotency-Key` that could not be part of a store key.
pub fn check_key(key: &str) -> AppResult<()> {
    check_id("Idempotency-Key", key).map_err(|_| {
        AppError::bad_request(
            "bad_idempotency_key",
            "Idempotency-Key must match [A-Za-z0-9_-]{1,64}",
        )
    })
}

/// Validates a claim quantity given as raw JSON: an integer in 1..=1000.
pub fn parse_qty(v: &serde_json::Value) -> AppResult<u64> {
    v.as_u64()
        .filter(|q| (1..=MAX_CLAIM_QTY).contains(q))
        .ok_or_else(|| {
            AppError::unprocessable("bad_quantity", "qty must be an integer from 1 to 1000")
        })
}

/// A claim as clients see it. Serialized straight from the record (no intermediate JSON
/// value): it is the answer to every claim, the hottest response there is.
#[derive(Serialize)]
pub struct ClaimJson<'a> {
    claim_id: &'a str,
    drop: &'a str,
    qty: u64,
    status: &'static str,
    expires_at: Rfc3339,
}

/// The JSON of a claim as clients see it.
pub fn claim_json(c: &Claim) -> ClaimJson<'_> {
    ClaimJson {
        claim_id: &c.claim_id,
        drop: &c.drop,
        qty: c.qty,
        status: c.status.as_str(),
        expires_at: Rfc3339(c.expires_at),
    }
}

/// [`claim_json`] as a JSON value, for frames and lists that embed claims.
pub fn claim_value(c: &Claim) -> serde_json::Value {
    serde_json::to_value(claim_json(c)).unwrap_or_default()
}

/// Milliseconds serialized as an RFC 3339 string, formatted on a stack buffer.
pub struct Rfc3339(pub Millis);

impl Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; 64];
        let mut cursor = std::io::Cursor::new(&mut buf[..]);
        let written = time::OffsetDateTime::from_unix_timestamp_nanos(self.0 as i128 * 1_000_000)
            .ok()
            .and_then(|t| {
                t.format_into(&mut cursor, &time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or(0);
        serializer.serialize_str(std::str::from_utf8(&buf[..written]).unwrap_or_default())
    }
}

/// A drop as clients see it: the record, its counters, and times in RFC 3339.
pub fn drop_json(s: &DropState) -> serde_json::Value {
    let d = &s.drop;
    json!({
        "id": d.id, "room": d.room, "sku": d.sku, "title": d.title,
        "price": d.price, "currency": d.currency, "kind": d.kind,
        "per_user_limit": d.per_user_limit, "hold_secs": d.hold_secs,
        "starts_at": format_time(d.starts_at),
        "ends_at": d.ends_at.map(format_time),
        "total": s.levels.total, "remaining": s.levels.remaining,
        "reserved": s.levels.reserved, "sold": s.levels.sold,
        "ended": s.ended, "group": d.group,
    })
}

/// Whether viewers should still see the drop as live.
pub fn is_live(s: &DropState, now: Millis) -> bool {
    !s.ended && s.drop.ends_at.is_none_or(|e| now < e)
}

/// Drops, claims and their room events.
pub struct Commerce {
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    key_ttl_secs: u64,
    /// Drops whose counters changed since the last stock frame.
    dirty: FastDashSet<String>,
    /// Sold out with nothing reserved (permanent): the users holding units, the only ones
    /// whose retries still need the store.
    finished: FastDashMap<String, Arc<HashSet<String>>>,
    last_purchase: FastDashMap<String, Millis>,
    rooms: FastDashMap<String, String>,
}

impl Commerce {
    pub fn new(store: Arc<dyn Store>, bus: Arc<dyn Bus>, key_ttl_secs: u64) -> Self {
        Self {
            store,
            bus,
            key_ttl_secs,
            dirty: FastDashSet::default(),
            finished: FastDashMap::default(),
            last_purchase: FastDashMap::default(),
            rooms: FastDashMap::default(),
        }
    }

    fn publish(&self, room: &str, kind: EventKind, msg: ServerMessage) {
        self.bus.publish(
            room,
            Event {
                kind,
                text: msg.to_text().into(),
            },
        );
    }

    /// Creates a drop in a room (the caller checked ownership) and announces it.
    pub async fn create_drop(&self, room: &str, req: NewDrop) -> AppResult<DropState> {
        let drop = req.into_drop(room, now_millis())?;
        let state = self.store.create_drop(&drop).await?;
        self.rooms.insert(state.drop.id.clone(), room.to_string());
        self.publish(
            room,
            EventKind::Discrete { seq: 0 },
            ServerMessage::DropLive(drop_json(&state)),
        );
        Ok(state)
    }

    /// Ends a drop early and tells the room.
    pub async fn end_drop(&self, drop: &str) -> AppResult<DropState> {
        let state = self.store.end_drop(drop, now_millis()).await?;
        self.publish(
            &state.drop.room,
            EventKind::Discrete { seq: 0 },
            ServerMessage::DropEnded {
                drop: drop.to_string(),
            },
        );
        Ok(state)
    }

    /// A drop the caller may read.
    pub async fn get_drop(&self, drop: &str) -> AppResult<DropState> {
        check_id("drop id", drop).map_err(|_| AppError::not_found("drop"))?;
        self.store
            .get_drop(drop)
            .await?
            .ok_or_else(|| AppError::not_found("drop"))
    }

    /// The room a drop belongs to (cached: a drop never moves).
    pub async fn room_of(&self, drop: &str) -> AppResult<String> {
        if let Some(r) = self.rooms.get(drop) {
            return Ok(r.clone());
        }
        let state = self.get_drop(drop).await?;
        self.rooms.insert(drop.to_string(), state.drop.room.clone());
        Ok(state.drop.room)
    }

    /// Reserves units for a viewer. `qty` is raw JSON so every bad form gets `bad_quantity`.
    pub async fn claim(
        &self,
        user: &User,
        drop: &str,
        qty: &serde_json::Value,
        key: &str,
    ) -> AppResult<Reservation> {
        check_id("drop id", drop).map_err(|_| AppError::not_found("drop"))?;
        check_key(key)?;
        let qty = parse_qty(qty)?;
        if let Some(holders) = self.finished.get(drop)
            && !holders.contains(&user.id)
        {
            return Err(AppError::conflict("sold_out", "not enough stock left"));
        }
        let req = ClaimRequest {
            drop: drop.to_string(),
            user: user.clone(),
            qty,
            key: key.to_string(),
            now: now_millis(),
            key_ttl_secs: self.key_ttl_secs,
        };
        let res = self.store.claim(&req).await?;
        if !res.replay {
            let room = self.room_of(drop).await?;
            self.after_transition(&room, drop, res.levels).await;
            self.sample_purchase(&room, drop, user, qty);
        }
        Ok(res)
    }

    /// Payment done: the reservation becomes a sale.
    pub async fn confirm(&self, user: &User, claim_id: &str) -> AppResult<Transition> {
        let drop = claim_drop(claim_id).ok_or_else(|| AppError::not_found("claim"))?;
        let t = self.store.confirm(claim_id, &user.id, now_millis()).await?;
        let room = self.room_of(drop).await?;
        self.after_transition(&room, drop, t.levels).await;
        Ok(t)
    }

    /// Gives a reservation back to stock.
    pub async fn release(&self, user: &User, claim_id: &str) -> AppResult<Transition> {
        let drop = claim_drop(claim_id).ok_or_else(|| AppError::not_found("claim"))?;
        let t = self.store.release(claim_id, &user.id, now_millis()).await?;
        let room = self.room_of(drop).await?;
        self.after_transition(&room, drop, t.levels).await;
        Ok(t)
    }

    /// A viewer's claims, newest first.
    pub async fn my_claims(&self, user: &User) -> AppResult<Vec<Claim>> {
        self.store.user_claims(&user.id).await
    }

    async fn after_transition(&self, room: &str, drop: &str, levels: StockLevels) {
        if !self.dirty.contains(drop) {
            self.dirty.insert(drop.to_string());
        }
        if levels.remaining == 0 {
            self.publish(
                room,
                EventKind::Discrete { seq: 0 },
                ServerMessage::SoldOut {
                    drop: drop.to_string(),
                },
            );
            if levels.reserved == 0 && !self.finished.contains_key(drop) {
                // Nothing can come back to stock any more: remember who may still retry.
                if let Ok(holders) = self.store.holders(drop).await {
                    self.finished
                        .insert(drop.to_string(), Arc::new(holders.into_iter().collect()));
                }
            }
        }
    }

    fn sample_purchase(&self, room: &str, drop: &str, user: &User, qty: u64) {
        let now = now_millis();
        let due = match self.last_purchase.get_mut(drop) {
            Some(mut last) if now - *last >= PURCHASE_SAMPLE_MS => {
                *last = now;
                true
            }
            Some(_) => false,
            None => {
                self.last_purchase.insert(drop.to_string(), now);
                true
            }
        };
        if due {
            self.publish(
                room,
                EventKind::Discrete { seq: 0 },
                ServerMessage::Purchase {
                    drop: drop.to_string(),
                    user: user.name.clone(),
                    qty,
                },
            );
        }
    }

    /// Publishes one `stock` frame per changed drop, read fresh from the store so the last
    /// frame always carries the final counters whatever order transitions finished in.
    pub async fn flush_stock(&self) {
        let drops: Vec<String> = self.dirty.iter().map(|d| d.clone()).collect();
        for drop in drops {
            self.dirty.remove(&drop);
            match self.store.get_drop(&drop).await {
                Ok(Some(s)) => {
                    let l = s.levels;
                    self.publish(
                        &s.drop.room,
                        EventKind::State {
                            key: format!("stock:{drop}"),
                        },
                        ServerMessage::Stock {
                            drop: drop.clone(),
                            remaining: l.remaining,
                            reserved: l.reserved,
                            sold: l.sold,
                            total: l.total,
                        },
                    );
                }
                Ok(None) => {}
                Err(_) => {
                    self.dirty.insert(drop);
                }
            }
        }
    }

    /// Expires every hold that has passed, in batches, and marks the drops for a stock frame.
    pub async fn sweep_once(&self) {
        let drops = match self.store.sweepable_drops().await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "sweep: store unavailable");
                return;
            }
        };
        for drop in drops {
            loop {
                match self.store.sweep(&drop, now_millis()).await {
                    Ok(s) => {
                        if !s.expired.is_empty() {
                            self.dirty.insert(drop.clone());
                        }
                        if s.expired.len() < crate::store::SWEEP_BATCH {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(drop, error = %e, "sweep failed");
                        break;
                    }
                }
            }
            self.fail_due_groups(&drop).await;
        }
    }

    /// Background work: stock frames every `tick`, sweeps every `sweep`, until shutdown.
    pub async fn run(
        self: Arc<Self>,
        tick: Duration,
        sweep: Duration,
        shutdown: CancellationToken,
    ) {
        let mut stock = tokio::time::interval(tick);
        stock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut sweeper = tokio::time::interval(sweep);
        sweeper.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = stock.tick() => self.flush_stock().await,
                _ = sweeper.tick() => self.sweep_once().await,
                _ = shutdown.cancelled() => return,
            }
        }
    }
}
