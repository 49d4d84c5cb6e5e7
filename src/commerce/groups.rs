//! Group buys (拼团): a leader opens a group on a `group` drop, others join until it has
//! `group_size` members — then every member's unit is sold at the group price, in the same
//! atomic step as the last join — or the deadline passes and every unit goes back to
//! stock. The store does each transition atomically; this module validates requests, tells
//! the room (`group_progress` conflated per group, `group_completed`, `group_failed`) and
//! fails due groups from the sweeper.

use serde_json::json;

use super::{Commerce, NewDrop, check_key, format_time};
use crate::bus::EventKind;
use crate::error::{AppError, AppResult};
use crate::model::{DropKind, DropState, Group, GroupStatus, GroupTerms, Millis, User, now_millis};
use crate::protocol::{ServerMessage, check_id};
use crate::store::{GroupAnswer, GroupRequest, group_drop};

/// Smallest and largest group.
pub const GROUP_SIZES: std::ops::RangeInclusive<u64> = 2..=100;
/// Longest group window: a week.
pub const MAX_GROUP_WINDOW_SECS: u64 = 7 * 86_400;
const DEFAULT_GROUP_WINDOW_SECS: u64 = 3600;

/// Checks the group fields of a new drop: required and in range for `kind: group`,
/// absent for `kind: flash`.
pub(super) fn group_terms(d: &NewDrop) -> AppResult<Option<GroupTerms>> {
    let bad = |m: &str| AppError::unprocessable("bad_drop", m.to_string());
    if d.kind == DropKind::Flash {
        let any = d.group_size.is_some()
            || d.group_price.is_some()
            || d.group_window_secs.is_some()
            || d.allow_solo.is_some();
        return if any {
            Err(bad(
                "group_* fields and allow_solo are for kind \"group\" only",
            ))
        } else {
            Ok(None)
        };
    }
    let size = d
        .group_size
        .filter(|s| GROUP_SIZES.contains(s))
        .ok_or_else(|| bad("group_size must be 2..=100"))?;
    let price = d
        .group_price
        .filter(|p| (0..=1_000_000_000_000).contains(p))
        .ok_or_else(|| bad("group_price must be 0..=10^12 minor units"))?;
    let window_secs = d.group_window_secs.unwrap_or(DEFAULT_GROUP_WINDOW_SECS);
    if !(1..=MAX_GROUP_WINDOW_SECS).contains(&window_secs) {
        return Err(bad("group_window_secs must be 1..=604800"));
    }
    Ok(Some(GroupTerms {
        size,
        price,
        window_secs,
        allow_solo: d.allow_solo.unwrap_or(false),
    }))
}

/// A group as clients see it: `members` is a count (who joined is not shown to others).
pub fn group_json(g: &Group) -> serde_json::Value {
    json!({
        "group_id": g.group_id,
        "drop": g.drop,
        "size": g.size,
        "members": g.members.len(),
        "status": g.status.as_str(),
        "price": g.price,
        "created_at": format_time(g.created_at),
        "expires_at": format_time(g.expires_at),
    })
}

impl Commerce {
    fn group_request(&self, target: &str, user: &User, key: Option<&str>) -> GroupRequest {
        GroupRequest {
            target: target.to_string(),
            user: user.clone(),
            key: key.map(str::to_string),
            now: now_millis(),
            key_ttl_secs: self.key_ttl_secs,
        }
    }

    /// Opens a group with the caller as leader; `key` (optional) makes retries safe.
    pub async fn open_group(
        &self,
        user: &User,
        drop: &str,
        key: Option<&str>,
    ) -> AppResult<GroupAnswer> {
        check_id("drop id", drop).map_err(|_| AppError::not_found("drop"))?;
        key.map(check_key).transpose()?;
        let ans = self
            .store
            .open_group(&self.group_request(drop, user, key))
            .await?;
        self.after_group(&ans).await;
        Ok(ans)
    }

    /// Joins a group; the join that fills it completes it for every member.
    pub async fn join_group(&self, user: &User, group: &str, key: &str) -> AppResult<GroupAnswer> {
        group_drop(group).ok_or_else(|| AppError::not_found("group"))?;
        check_key(key)?;
        let ans = self
            .store
            .join_group(&self.group_request(group, user, Some(key)))
            .await?;
        self.after_group(&ans).await;
        Ok(ans)
    }

    /// A group anyone may read.
    pub async fn get_group(&self, group: &str) -> AppResult<Group> {
        if group_drop(group).is_none() {
            return Err(AppError::not_found("group"));
        }
        self.store
            .get_group(group)
            .await?
            .ok_or_else(|| AppError::not_found("group"))
    }

    /// A drop's open groups, fullest first: what a room shows to get people joining.
    pub async fn drop_groups(&self, drop: &str) -> AppResult<Vec<Group>> {
        check_id("drop id", drop).map_err(|_| AppError::not_found("drop"))?;
        let mut groups = self.store.drop_groups(drop).await?;
        // A group past its deadline that the sweeper has not reached yet cannot be joined.
        let now = now_millis();
        groups.retain(|g| g.expires_at > now);
        Ok(groups)
    }

    /// The open groups of the given drops' group drops, as clients see them (for the
    /// welcome snapshot).
    pub async fn open_groups_json(&self, drops: &[DropState]) -> AppResult<Vec<serde_json::Value>> {
        let mut out = Vec::new();
        for d in drops.iter().filter(|d| d.drop.group.is_some()) {
            out.extend(self.drop_groups(&d.drop.id).await?.iter().map(group_json));
        }
        Ok(out)
    }

    /// Tells the room about a new open or join (replays changed nothing and say nothing).
    async fn after_group(&self, ans: &GroupAnswer) {
        if ans.replay {
            return;
        }
        let g = &ans.group;
        let Ok(room) = self.room_of(&g.drop).await else {
            return;
        };
        self.after_transition(&room, &g.drop, ans.levels).await;
        self.publish_group(&room, g);
    }

    /// `group_progress` (conflated per group: latest wins, so a completed or failed group's
    /// final state replaces any progress still waiting), then `group_completed` or
    /// `group_failed` in order with the room's other events.
    fn publish_group(&self, room: &str, g: &Group) {
        let body = group_json(g);
        self.publish(
            room,
            EventKind::State {
                key: format!("group:{}", g.group_id),
            },
            ServerMessage::GroupProgress(body.clone()),
        );
        let done = match g.status {
            GroupStatus::Open => return,
            GroupStatus::Completed => ServerMessage::GroupCompleted(body),
            GroupStatus::Failed => ServerMessage::GroupFailed(body),
        };
        self.publish(room, EventKind::Discrete { seq: 0 }, done);
    }

    /// Fails a drop's groups whose deadline passed (in batches) and tells the room; the
    /// store fails each group once however many sweepers race.
    pub(super) async fn fail_due_groups(&self, drop: &str) {
        loop {
            let now: Millis = now_millis();
            match self.store.fail_groups(drop, now).await {
                Ok(sweep) => {
                    if !sweep.failed.is_empty() {
                        self.dirty.insert(drop.to_string());
                        if let Ok(room) = self.room_of(drop).await {
                            for g in &sweep.failed {
                                self.publish_group(&room, g);
                            }
                        }
                    }
                    if sweep.failed.len() < crate::store::SWEEP_BATCH {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(drop, error = %e, "group sweep failed");
                    return;
                }
            }
        }
    }
}
