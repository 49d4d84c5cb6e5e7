//! Room endpoints: a host creates a room; anyone reads its snapshot.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;

use super::{Authed, JsonBody};
use crate::auth::Role;
use crate::commerce::{drop_json, is_live};
use crate::error::{AppError, AppResult};
use crate::model::{Room, now_millis};
use crate::protocol::{check_id, is_valid_id};
use crate::state::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewRoom {
    id: Option<String>,
    title: String,
}

/// Looks a room up by a path id; a malformed id is simply not found.
pub async fn find_room(state: &AppState, id: &str) -> AppResult<Room> {
    if !is_valid_id(id) {
        return Err(AppError::not_found("room"));
    }
    state
        .store
        .get_room(id)
        .await?
        .ok_or_else(|| AppError::not_found("room"))
}

pub async fn create(
    State(state): State<AppState>,
    Authed(who): Authed,
    JsonBody(body): JsonBody<NewRoom>,
) -> AppResult<impl IntoResponse> {
    who.require(Role::Host)?;
    let title = body.title.trim();
    if title.is_empty() || title.chars().count() > 200 || title.chars().any(char::is_control) {
        return Err(AppError::unprocessable(
            "bad_room",
            "title must be 1 to 200 characters without control characters",
        ));
    }
    let id = match body.id {
        Some(id) => {
            check_id("room id", &id)?;
            id
        }
        None => format!("r{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
    };
    let room = Room {
        id,
        title: title.to_string(),
        owner: who.user.id.clone(),
        created_at: now_millis(),
    };
    state.store.create_room(&room).await?;
    Ok((StatusCode::CREATED, Json(room)))
}

pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> AppResult<impl IntoResponse> {
    let room = find_room(&state, &id).await?;
    let now = now_millis();
    let drops: Vec<_> = state
        .store
        .room_drops(&room.id)
        .await?
        .iter()
        .filter(|d| is_live(d, now))
        .map(drop_json)
        .collect();
    Ok(Json(json!({
        "id": room.id,
        "title": room.title,
        "owner": room.owner,
        "created_at": room.created_at,
        "viewers": state.hub.viewers(&room.id),
        "likes": state.likes.total(&room.id).await?,
        "seq": state.store.chat_seq(&room.id).await?,
        "drops": drops,
    })))
}
