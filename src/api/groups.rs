//! Group-buy endpoints: viewers open and join groups (201 with the group; admitted like
//! claims: role, rate limits, bans), anyone reads a group or a drop's open groups. Refusals are the store's 409s (`group_full`,
//! `group_closed`, `already_member`, `sold_out`, …) rendered as problem+json.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::json;

use super::extract::IdempotencyKey;
use super::{Authed, Client};
use crate::commerce::groups::group_json;
use crate::error::AppResult;
use crate::moderation::{admit_claim, admit_join};
use crate::state::AppState;

/// `POST /api/drops/{drop}/groups`: the caller opens a group and is its leader. The
/// `Idempotency-Key` header is optional here (a retry without one may open a second group,
/// within the per-user limit).
pub async fn open(
    State(state): State<AppState>,
    Authed(who): Authed,
    Client(addr): Client,
    Path(drop): Path<String>,
    key: IdempotencyKey,
) -> AppResult<impl IntoResponse> {
    admit_claim(&state, &who, addr, &drop).await?;
    let key = key.optional();
    let ans = state.commerce.open_group(&who.user, &drop, key).await?;
    Ok((StatusCode::CREATED, Json(group_json(&ans.group))))
}

/// `POST /api/groups/{group}/join` with `Idempotency-Key`, as for claims.
pub async fn join(
    State(state): State<AppState>,
    Authed(who): Authed,
    Client(addr): Client,
    Path(group): Path<String>,
    key: IdempotencyKey,
) -> AppResult<impl IntoResponse> {
    admit_join(&state, &who, addr, &group).await?;
    let key = key.required("joins")?;
    let ans = state.commerce.join_group(&who.user, &group, key).await?;
    Ok((StatusCode::CREATED, Json(group_json(&ans.group))))
}

/// `GET /api/groups/{group}`: the shareable view of one group.
pub async fn show(
    State(state): State<AppState>,
    Path(group): Path<String>,
) -> AppResult<impl IntoResponse> {
    let g = state.commerce.get_group(&group).await?;
    Ok(Json(group_json(&g)))
}

/// `GET /api/drops/{drop}/groups`: open groups, fullest first.
pub async fn list(
    State(state): State<AppState>,
    Path(drop): Path<String>,
) -> AppResult<impl IntoResponse> {
    let groups: Vec<_> = state
        .commerce
        .drop_groups(&drop)
        .await?
        .iter()
        .map(group_json)
        .collect();
    Ok(Json(json!({ "drop": drop, "groups": groups })))
}
