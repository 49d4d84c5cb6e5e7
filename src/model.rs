//! The records livedrop keeps in its store: rooms, chat messages, drops, claims and the
//! ledger. Both engines read and write exactly these shapes, and the wire protocol reuses
//! them so a record is never translated twice.

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch. Every timestamp in the store uses this unit so the
/// engines and the Lua scripts can compare them as plain integers.
pub type Millis = i64;

/// The current wall-clock time in milliseconds.
pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// A person as shown to other viewers; the id is the JWT `sub`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: String,
    pub name: String,
}

/// A live room. `owner` is the host who created it and the only host who may manage it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Room {
    pub id: String,
    pub title: String,
    pub owner: String,
    pub created_at: Millis,
}

/// One chat line. `seq` is assigned by the store, strictly increasing per room, and is what
/// clients hand back in `?since=` to recover what they missed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub seq: u64,
    pub id: String,
    pub user: User,
    pub text: String,
    pub ts: Millis,
}

/// How a drop is sold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropKind {
    Flash,
    Group,
}

impl DropKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DropKind::Flash => "flash",
            DropKind::Group => "group",
        }
    }
}

/// A product dropped into a room with a fixed amount of stock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drop {
    pub id: String,
    pub room: String,
    pub sku: String,
    pub title: String,
    /// Price in minor units (cents, fen).
    pub price: i64,
    pub currency: String,
    pub stock: u64,
    pub per_user_limit: u64,
    pub starts_at: Millis,
    pub ends_at: Option<Millis>,
    pub hold_secs: u64,
    pub kind: DropKind,
    pub created_at: Millis,
    /// How a `group` drop is sold in groups; `None` for flash drops. Optional so records
    /// written before group buys existed still read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupTerms>,
}

/// The terms of a group-buy drop: a group of `size` members, opened by a leader, gets
/// `price` each when it fills within `window_secs`; otherwise every unit goes back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupTerms {
    pub size: u64,
    /// Group price per unit, in minor units.
    pub price: i64,
    pub window_secs: u64,
    /// Whether the drop may also be claimed alone (a flash claim at the normal price).
    pub allow_solo: bool,
}

/// Where a group buy is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupStatus {
    /// Filling: every member's unit is reserved.
    Open,
    /// Full before the deadline: every member's unit is sold at the group price.
    Completed,
    /// The deadline passed first: every member's unit went back to stock.
    Failed,
}

impl GroupStatus {
    /// The wire and store spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupStatus::Open => "open",
            GroupStatus::Completed => "completed",
            GroupStatus::Failed => "failed",
        }
    }

    /// Reads a stored status; `None` for anything else (a corrupt record).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "open" => GroupStatus::Open,
            "completed" => GroupStatus::Completed,
            "failed" => GroupStatus::Failed,
            _ => return None,
        })
    }
}

/// One group buy of a drop. Each member holds one unit; `members[0]` is the leader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub group_id: String,
    pub drop: String,
    pub size: u64,
    /// Group price per unit, copied from the drop when the group opened.
    pub price: i64,
    /// User ids in join order, leader first.
    pub members: Vec<String>,
    pub status: GroupStatus,
    pub created_at: Millis,
    pub expires_at: Millis,
}

/// The four counters of a drop. Invariant: `remaining + reserved + sold == total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StockLevels {
    pub total: u64,
    pub remaining: u64,
    pub reserved: u64,
    pub sold: u64,
}

impl StockLevels {
    /// True when the conservation invariant holds.
    pub fn conserved(&self) -> bool {
        self.remaining + self.reserved + self.sold == self.total
    }
}

/// A drop together with its live counters and whether the host ended it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropState {
    #[serde(flatten)]
    pub drop: Drop,
    #[serde(flatten)]
    pub levels: StockLevels,
    pub ended: bool,
}

/// Where a claim is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimStatus {
    Reserved,
    Sold,
    Released,
    Expired,
}

impl ClaimStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ClaimStatus::Reserved => "reserved",
            ClaimStatus::Sold => "sold",
            ClaimStatus::Released => "released",
            ClaimStatus::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "reserved" => ClaimStatus::Reserved,
            "sold" => ClaimStatus::Sold,
            "released" => ClaimStatus::Released,
            "expired" => ClaimStatus::Expired,
            _ => return None,
        })
    }
}

/// A reservation of `qty` units of one drop by one user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub claim_id: String,
    pub drop: String,
    pub user: String,
    pub qty: u64,
    pub status: ClaimStatus,
    pub created_at: Millis,
    pub expires_at: Millis,
}

/// One state transition of a drop, appended by the same atomic step that made it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// `create`, `claim`, `confirm`, `release`, `expire`, `end`, `group_open`,
    /// `group_join`, `group_complete`, `group_fail`.
    pub op: String,
    pub claim_id: Option<String>,
    pub user: Option<String>,
    pub qty: u64,
    pub ts: Millis,
    /// The group of a `group_*` entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}
