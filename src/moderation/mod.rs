//! Community rules of a room, enforced by livedrop and managed by its host (or an admin):
//! deleting a message (`chat_deleted` to the room), muting a user for a while, banning a user
//! (their sockets are closed with 4003, reconnects and claims refused), slow mode, a per-room
//! banned-words list and, by setting, no links in chat. Every action is logged for the host.
//!
//! The record lives in the store (both engines), so it holds across instances; each instance
//! caches a room's record for at most `CACHE_TTL` and drops its copy when it changes it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::auth::{Identity, Role};
use crate::bus::{Bus, Event, EventKind};
use crate::error::{AppError, AppResult};
use crate::limits::ClientAddr;
use crate::model::{ChatMessage, Millis, now_millis};
use crate::protocol::{ServerMessage, check_id};
use crate::state::AppState;
use crate::store::Store;

/// How long an instance trusts its cached copy of a room's record.
pub const CACHE_TTL: Duration = Duration::from_secs(1);
/// Moderation log entries kept per room.
pub const LOG_KEEP: usize = 1000;
/// Longest mute.
pub const MAX_MUTE_SECS: u64 = 7 * 86_400;
/// Longest slow-mode interval.
pub const MAX_SLOW_MODE_SECS: u64 = 3600;
/// Most banned words per room, and the longest word.
pub const MAX_BANNED_WORDS: usize = 200;
pub const MAX_WORD_CHARS: usize = 64;

/// Rules a host sets for a room's chat.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomRules {
    /// Minimum seconds between two messages of one user (0: off).
    #[serde(default)]
    pub slow_mode_secs: u64,
    /// Messages containing any of these (case-insensitive) are refused with `blocked_content`.
    #[serde(default)]
    pub banned_words: Vec<String>,
}

impl RoomRules {
    /// Refuses rules that cannot be right (`bad_rules`, 422).
    pub fn check(&self) -> AppResult<()> {
        let bad = |m: String| AppError::unprocessable("bad_rules", m);
        if self.slow_mode_secs > MAX_SLOW_MODE_SECS {
            return Err(bad(format!(
                "slow_mode_secs must be 0..={MAX_SLOW_MODE_SECS}"
            )));
        }
        if self.banned_words.len() > MAX_BANNED_WORDS {
            return Err(bad(format!("at most {MAX_BANNED_WORDS} banned words")));
        }
        for w in &self.banned_words {
            let n = w.trim().chars().count();
            if n == 0 || n > MAX_WORD_CHARS || w.chars().any(char::is_control) {
                return Err(bad(format!(
                    "banned words are 1 to {MAX_WORD_CHARS} characters without control characters"
                )));
            }
        }
        Ok(())
    }
}

/// A room's moderation record, decoded.
#[derive(Clone, Debug, Default)]
pub struct RoomModeration {
    pub rules: RoomRules,
    pub bans: HashSet<String>,
    /// User → muted until (ms).
    pub mutes: HashMap<String, Millis>,
    /// Deleted chat message ids (hidden from snapshots and recovery).
    pub deleted: HashSet<String>,
}

impl RoomModeration {
    fn decode(fields: HashMap<String, String>) -> Self {
        let mut m = RoomModeration::default();
        for (k, v) in fields {
            if k == "rules" {
                m.rules = serde_json::from_str(&v).unwrap_or_default();
            } else if let Some(u) = k.strip_prefix("ban:") {
                m.bans.insert(u.to_string());
            } else if let Some(u) = k.strip_prefix("mute:") {
                m.mutes.insert(u.to_string(), v.parse().unwrap_or(0));
            } else if let Some(id) = k.strip_prefix("del:") {
                m.deleted.insert(id.to_string());
            }
        }
        m
    }

    /// Milliseconds of mute left for `user` (0: not muted).
    pub fn muted_for(&self, user: &str, now: Millis) -> Millis {
        self.mutes
            .get(user)
            .map(|until| (until - now).max(0))
            .unwrap_or(0)
    }
}

/// Whether chat text carries a link: a scheme, `www.`, or a `name.tld` word.
pub fn has_link(text: &str) -> bool {
    let lower = text.to_lowercase();
    if lower.contains("://") || lower.contains("www.") {
        return true;
    }
    lower.split_whitespace().any(|word| {
        let w = word.trim_matches(|c: char| !c.is_alphanumeric());
        match w.rsplit_once('.') {
            Some((name, tld)) => {
                !name.is_empty()
                    && name.chars().next().is_some_and(char::is_alphanumeric)
                    && (2..=24).contains(&tld.len())
                    && tld.bytes().all(|b| b.is_ascii_alphabetic())
            }
            None => false,
        }
    })
}

fn refuse(status: StatusCode, code: &'static str, msg: impl Into<String>) -> AppError {
    AppError::new(status, code, msg)
}

fn wait_secs(ms: Millis) -> u64 {
    (ms.max(0) as u64).div_ceil(1000).max(1)
}

/// The moderation service of this instance.
pub struct Moderation {
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    block_links: bool,
    cache: DashMap<String, (Instant, Arc<RoomModeration>)>,
    /// Last accepted message per (room, user), for slow mode; pruned by `forget_idle`.
    last_post: DashMap<(String, String), Instant>,
}

impl Moderation {
    pub fn new(store: Arc<dyn Store>, bus: Arc<dyn Bus>, block_links: bool) -> Self {
        Self {
            store,
            bus,
            block_links,
            cache: DashMap::new(),
            last_post: DashMap::new(),
        }
    }

    /// A room's record, from the cache when fresh.
    pub async fn room(&self, room: &str) -> AppResult<Arc<RoomModeration>> {
        if let Some(hit) = self.cache.get(room)
            && hit.0.elapsed() < CACHE_TTL
        {
            return Ok(hit.1.clone());
        }
        let m = Arc::new(RoomModeration::decode(self.store.moderation(room).await?));
        self.cache
            .insert(room.to_string(), (Instant::now(), m.clone()));
        Ok(m)
    }

    /// Refuses a banned user (`banned`, 403): joining, chatting, liking and claiming.
    pub async fn check_not_banned(&self, room: &str, user: &str) -> AppResult<()> {
        if self.room(room).await?.bans.contains(user) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "banned",
                "you are banned from this room",
            ));
        }
        Ok(())
    }

    /// Applies the room's rules to a chat message about to be posted.
    pub async fn check_chat(&self, room: &str, user: &str, text: &str) -> AppResult<()> {
        let m = self.room(room).await?;
        if m.bans.contains(user) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "banned",
                "you are banned from this room",
            ));
        }
        let left = m.muted_for(user, now_millis());
        if left > 0 {
            let mut e = refuse(StatusCode::FORBIDDEN, "muted", "you are muted in this room");
            e.retry_after = Some(wait_secs(left));
            return Err(e);
        }
        let lower = text.to_lowercase();
        if m.rules
            .banned_words
            .iter()
            .any(|w| lower.contains(&w.trim().to_lowercase()))
        {
            return Err(AppError::unprocessable(
                "blocked_content",
                "the message contains a word this room does not allow",
            ));
        }
        if self.block_links && has_link(text) {
            return Err(AppError::unprocessable(
                "blocked_content",
                "links are not allowed in chat",
            ));
        }
        if m.rules.slow_mode_secs > 0 {
            let gap = Duration::from_secs(m.rules.slow_mode_secs);
            let key = (room.to_string(), user.to_string());
            let mut last = self
                .last_post
                .entry(key)
                .or_insert_with(|| Instant::now().checked_sub(gap).unwrap_or_else(Instant::now));
            let since = last.elapsed();
            if since < gap {
                let mut e = refuse(
                    StatusCode::TOO_MANY_REQUESTS,
                    "slow_mode",
                    format!("slow mode: one message per {} s", gap.as_secs()),
                );
                e.retry_after = Some((gap - since).as_secs().max(1));
                return Err(e);
            }
            *last = Instant::now();
        }
        Ok(())
    }

    /// Hides deleted messages from a chat list.
    pub async fn visible(&self, room: &str, chat: Vec<ChatMessage>) -> AppResult<Vec<ChatMessage>> {
        let m = self.room(room).await?;
        if m.deleted.is_empty() {
            return Ok(chat);
        }
        Ok(chat
            .into_iter()
            .filter(|c| !m.deleted.contains(&c.id))
            .collect())
    }

    async fn record(
        &self,
        room: &str,
        by: &Identity,
        action: &str,
        user: Option<&str>,
        detail: Value,
    ) -> AppResult<()> {
        self.cache.remove(room);
        let entry = json!({
            "ts": now_millis(), "by": by.user.id, "action": action,
            "user": user, "detail": detail,
        });
        self.store
            .append_mod_log(room, &entry.to_string(), LOG_KEEP)
            .await
    }

    /// Deletes a message: hidden from history, and `chat_deleted` tells the room.
    pub async fn delete_message(&self, room: &str, by: &Identity, id: &str) -> AppResult<()> {
        check_id("message id", id)?;
        self.store
            .set_moderation(room, &format!("del:{id}"), Some("1"))
            .await?;
        self.record(room, by, "delete", None, json!({ "message": id }))
            .await?;
        let deleted = ServerMessage::ChatDeleted { id: id.to_string() };
        self.bus.publish(
            room,
            Event {
                kind: EventKind::Discrete { seq: 0 },
                text: deleted.to_text().into(),
            },
        );
        Ok(())
    }

    /// Mutes a user for `secs` seconds (0 lifts the mute).
    pub async fn mute(&self, room: &str, by: &Identity, user: &str, secs: u64) -> AppResult<()> {
        check_id("user", user)?;
        if secs > MAX_MUTE_SECS {
            return Err(AppError::unprocessable(
                "bad_duration",
                format!("secs must be 0..={MAX_MUTE_SECS}"),
            ));
        }
        let field = format!("mute:{user}");
        let until = (now_millis() + secs as Millis * 1000).to_string();
        let value = (secs > 0).then_some(until.as_str());
        self.store.set_moderation(room, &field, value).await?;
        let action = if secs > 0 { "mute" } else { "unmute" };
        self.record(room, by, action, Some(user), json!({ "secs": secs }))
            .await
    }

    /// Bans (or lifts the ban of) a user; a ban closes their sockets in the room with 4003.
    pub async fn ban(&self, room: &str, by: &Identity, user: &str, banned: bool) -> AppResult<()> {
        check_id("user", user)?;
        let field = format!("ban:{user}");
        self.store
            .set_moderation(room, &field, banned.then_some("1"))
            .await?;
        let action = if banned { "ban" } else { "unban" };
        self.record(room, by, action, Some(user), Value::Null)
            .await?;
        if banned {
            let err = refuse(
                StatusCode::FORBIDDEN,
                "banned",
                "you are banned from this room",
            );
            self.bus.publish(
                room,
                Event {
                    kind: EventKind::Kick {
                        user: user.to_string(),
                    },
                    text: ServerMessage::error(&err).to_text().into(),
                },
            );
        }
        Ok(())
    }

    /// Replaces the room's rules.
    pub async fn set_rules(&self, room: &str, by: &Identity, rules: RoomRules) -> AppResult<()> {
        rules.check()?;
        let text = serde_json::to_string(&rules).map_err(AppError::internal)?;
        self.store
            .set_moderation(room, "rules", Some(&text))
            .await?;
        self.record(
            room,
            by,
            "rules",
            None,
            serde_json::to_value(&rules).unwrap_or_default(),
        )
        .await
    }

    /// The record and the newest log entries, for the host.
    pub async fn report(&self, room: &str, n: usize) -> AppResult<Value> {
        self.cache.remove(room);
        let m = self.room(room).await?;
        let now = now_millis();
        let log: Vec<Value> = self
            .store
            .mod_log(room, n)
            .await?
            .iter()
            .filter_map(|e| serde_json::from_str(e).ok())
            .collect();
        let mut bans: Vec<_> = m.bans.iter().cloned().collect();
        bans.sort();
        let mutes: HashMap<_, _> = m
            .mutes
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|(u, until)| (u.clone(), crate::commerce::format_time(*until)))
            .collect();
        Ok(json!({
            "rules": m.rules, "bans": bans, "mutes": mutes,
            "deleted_messages": m.deleted.len(), "block_links": self.block_links, "log": log,
        }))
    }

    /// Forgets slow-mode timestamps older than the longest slow mode.
    pub fn forget_idle(&self) {
        let max = Duration::from_secs(MAX_SLOW_MODE_SECS);
        self.last_post.retain(|_, t| t.elapsed() < max);
        self.cache.retain(|_, (t, _)| t.elapsed() < CACHE_TTL);
    }
}

/// Everything a claim must pass before it reaches the store, on HTTP and WebSocket alike:
/// the viewer role, a live token, the per-user and per-drop limits, and no ban in the room.
pub async fn admit_claim(
    state: &AppState,
    who: &Identity,
    addr: ClientAddr,
    drop: &str,
) -> AppResult<()> {
    who.require(Role::Viewer)?;
    check_id("drop id", drop).map_err(|_| AppError::not_found("drop"))?;
    if !addr.exempt {
        state.limits.claims_per_user.check(&who.user.id)?;
    }
    let room = state.commerce.room_of(drop).await?;
    state
        .moderation
        .check_not_banned(&room, &who.user.id)
        .await?;
    if !addr.exempt {
        state.limits.claims_per_drop.check(&drop.to_string())?;
    }
    Ok(())
}

/// Admits a group join like a claim on the group's drop (a join takes a unit too).
pub async fn admit_join(
    state: &AppState,
    who: &Identity,
    addr: ClientAddr,
    group: &str,
) -> AppResult<()> {
    let drop = crate::store::group_drop(group).ok_or_else(|| AppError::not_found("group"))?;
    admit_claim(state, who, addr, drop).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_recognised() {
        for yes in [
            "see https://x.io",
            "www.shop",
            "buy at cheap-kicks.shop now",
            "(scam.com)",
            "HTTP://LOUD.EXAMPLE",
        ] {
            assert!(has_link(yes), "{yes}");
        }
        for no in ["hello", "e.g. this", "size 10.5 please", "wow...", "a . b"] {
            assert!(!has_link(no), "{no}");
        }
    }

    #[test]
    fn rules_are_checked() {
        assert!(RoomRules::default().check().is_ok());
        let slow = RoomRules {
            slow_mode_secs: MAX_SLOW_MODE_SECS + 1,
            ..RoomRules::default()
        };
        assert_eq!(slow.check().unwrap_err().code, "bad_rules");
        let blank = RoomRules {
            banned_words: vec!["  ".into()],
            ..RoomRules::default()
        };
        assert!(blank.check().is_err());
        let many = RoomRules {
            banned_words: vec!["w".into(); MAX_BANNED_WORDS + 1],
            ..RoomRules::default()
        };
        assert!(many.check().is_err());
    }

    #[test]
    fn record_decodes() {
        let fields: HashMap<String, String> = [
            ("ban:eve", "1"),
            ("mute:bob", "5000"),
            ("del:m1", "1"),
            ("rules", r#"{"slow_mode_secs":3,"banned_words":["x"]}"#),
            ("unknown", "ignored"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let m = RoomModeration::decode(fields);
        assert!(m.bans.contains("eve") && m.deleted.contains("m1"));
        assert_eq!(m.muted_for("bob", 4000), 1000);
        assert_eq!(m.muted_for("bob", 6000), 0);
        assert_eq!(m.rules.slow_mode_secs, 3);
    }
}
