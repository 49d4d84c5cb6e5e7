//! Drop and claim endpoints: hosts drop and end products in rooms they own; viewers claim,
//! confirm and release.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;

use super::extract::IdempotencyKey;
use super::rooms::find_room;
use super::{Authed, Client, JsonBody};
use crate::auth::Role;
use crate::commerce::{NewDrop, claim_json, claim_value, drop_json};
use crate::error::AppResult;
use crate::state::AppState;

pub async fn create_drop(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(room): Path<String>,
    JsonBody(body): JsonBody<NewDrop>,
) -> AppResult<impl IntoResponse> {
    who.require(Role::Host)?;
    let room = find_room(&state, &room).await?;
    who.require_owner(&room.owner)?;
    let drop = state.commerce.create_drop(&room.id, body).await?;
    Ok((StatusCode::CREATED, Json(drop_json(&drop))))
}

pub async fn show_drop(
    State(state): State<AppState>,
    Path(drop): Path<String>,
) -> AppResult<impl IntoResponse> {
    let d = state.commerce.get_drop(&drop).await?;
    Ok(Json(drop_json(&d)))
}

/// Checks that the caller owns the room of a drop.
async fn owned_drop(state: &AppState, who: &crate::auth::Identity, drop: &str) -> AppResult<()> {
    who.require(Role::Host)?;
    let d = state.commerce.get_drop(drop).await?;
    let room = find_room(state, &d.drop.room).await?;
    who.require_owner(&room.owner)
}

pub async fn end_drop(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(drop): Path<String>,
) -> AppResult<impl IntoResponse> {
    owned_drop(&state, &who, &drop).await?;
    let d = state.commerce.end_drop(&drop).await?;
    Ok(Json(drop_json(&d)))
}

pub async fn ledger(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(drop): Path<String>,
) -> AppResult<impl IntoResponse> {
    owned_drop(&state, &who, &drop).await?;
    let entries = state.store.ledger(&drop).await?;
    Ok(Json(json!({ "drop": drop, "entries": entries })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimBody {
    qty: serde_json::Value,
}

pub async fn claim(
    State(state): State<AppState>,
    Authed(who): Authed,
    Client(addr): Client,
    Path(drop): Path<String>,
    key: IdempotencyKey,
    JsonBody(body): JsonBody<ClaimBody>,
) -> AppResult<impl IntoResponse> {
    crate::moderation::admit_claim(&state, &who, addr, &drop).await?;
    let key = key.required("claims")?;
    let res = state
        .commerce
        .claim(&who.user, &drop, &body.qty, key)
        .await?;
    Ok((StatusCode::CREATED, Json(claim_json(&res.claim))).into_response())
}

pub async fn confirm(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(claim): Path<String>,
) -> AppResult<impl IntoResponse> {
    let t = state.commerce.confirm(&who.user, &claim).await?;
    Ok(Json(claim_json(&t.claim)).into_response())
}

pub async fn release(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(claim): Path<String>,
) -> AppResult<impl IntoResponse> {
    let t = state.commerce.release(&who.user, &claim).await?;
    Ok(Json(claim_json(&t.claim)).into_response())
}

pub async fn my_claims(
    State(state): State<AppState>,
    Authed(who): Authed,
) -> AppResult<impl IntoResponse> {
    let claims: Vec<_> = state
        .commerce
        .my_claims(&who.user)
        .await?
        .iter()
        .map(claim_value)
        .collect();
    Ok(Json(json!({ "claims": claims })))
}
