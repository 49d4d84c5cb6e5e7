//! Host tools for a room they own (admins: any room): moderation and live stats. Viewers get
//! 403, other hosts 403, no token 401 — checked before anything is read or written.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;

use super::rooms::find_room;
use super::{Authed, JsonBody};
use crate::auth::Identity;
use crate::commerce::drop_json;
use crate::error::AppResult;
use crate::model::Room;
use crate::moderation::RoomRules;
use crate::state::AppState;

/// Log entries returned by `GET /api/rooms/{room}/moderation`.
const REPORT_LOG: usize = 200;

/// The room, once the caller is known to manage it.
async fn managed_room(state: &AppState, who: &Identity, room: &str) -> AppResult<Room> {
    who.require(crate::auth::Role::Host)?;
    let room = find_room(state, room).await?;
    who.require_owner(&room.owner)?;
    Ok(room)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MuteBody {
    user: String,
    secs: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BanBody {
    user: String,
}

pub async fn delete_message(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path((room, id)): Path<(String, String)>,
) -> AppResult<impl IntoResponse> {
    let room = managed_room(&state, &who, &room).await?;
    state.moderation.delete_message(&room.id, &who, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn mute(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(room): Path<String>,
    JsonBody(body): JsonBody<MuteBody>,
) -> AppResult<impl IntoResponse> {
    let room = managed_room(&state, &who, &room).await?;
    state
        .moderation
        .mute(&room.id, &who, &body.user, body.secs)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn ban(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(room): Path<String>,
    JsonBody(body): JsonBody<BanBody>,
) -> AppResult<impl IntoResponse> {
    let room = managed_room(&state, &who, &room).await?;
    state
        .moderation
        .ban(&room.id, &who, &body.user, true)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn unban(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path((room, user)): Path<(String, String)>,
) -> AppResult<impl IntoResponse> {
    let room = managed_room(&state, &who, &room).await?;
    state.moderation.ban(&room.id, &who, &user, false).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn set_rules(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(room): Path<String>,
    JsonBody(rules): JsonBody<RoomRules>,
) -> AppResult<impl IntoResponse> {
    let room = managed_room(&state, &who, &room).await?;
    state.moderation.set_rules(&room.id, &who, rules).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn report(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(room): Path<String>,
) -> AppResult<impl IntoResponse> {
    let room = managed_room(&state, &who, &room).await?;
    Ok(Json(state.moderation.report(&room.id, REPORT_LOG).await?))
}

/// Live numbers for the host: viewers here, likes, chat seq, every drop's counters and the
/// room's moderation counts.
pub async fn stats(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(room): Path<String>,
) -> AppResult<impl IntoResponse> {
    let room = managed_room(&state, &who, &room).await?;
    let drops: Vec<_> = state
        .store
        .room_drops(&room.id)
        .await?
        .iter()
        .map(drop_json)
        .collect();
    let m = state.moderation.room(&room.id).await?;
    Ok(Json(json!({
        "room": room.id,
        "viewers": state.hub.viewers(&room.id),
        "likes": state.likes.total(&room.id).await?,
        "chat_messages": state.store.chat_seq(&room.id).await?,
        "drops": drops,
        "moderation": {
            "bans": m.bans.len(),
            "mutes": m.mutes.len(),
            "deleted_messages": m.deleted.len(),
            "slow_mode_secs": m.rules.slow_mode_secs,
            "banned_words": m.rules.banned_words.len(),
        },
    })))
}
