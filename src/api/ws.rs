//! The WebSocket upgrade: everything is judged BEFORE upgrading, so each refusal is a plain
//! HTTP answer — connect rate per IP (429), Origin allowlist against cross-site WebSocket
//! hijacking (403 `origin_forbidden`), the token (401) or, with `--allow-guests`, a guest, the
//! room (404), a ban (403 `banned`), and the per-IP/per-user connection caps (429
//! `too_many_connections`). The session then runs on the raw socket with the frame limit of
//! `--max-frame-bytes`; no extension (permessage-deflate) is ever negotiated.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use serde::Deserialize;

use super::Client;
use super::rooms::find_room;
use crate::auth::Identity;
use crate::error::{AppError, AppResult};
use crate::hub::session;
use crate::state::AppState;
use crate::ws::upgrade::WsUpgrade;

#[derive(Deserialize)]
pub struct WsQuery {
    token: Option<String>,
    since: Option<String>,
}

/// A browser's `Origin` must be the server's own (from `Host`) or in `--allowed-origins`;
/// clients without `Origin` (apps, scripts) are judged by their token alone.
pub fn check_origin(state: &AppState, headers: &HeaderMap) -> AppResult<()> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("");
    let own = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|host| {
            origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
                == Some(host)
        });
    if own || state.config.allowed_origins.iter().any(|o| o == origin) {
        Ok(())
    } else {
        Err(AppError::new(
            StatusCode::FORBIDDEN,
            "origin_forbidden",
            "this origin may not open a WebSocket here",
        ))
    }
}

pub async fn upgrade(
    State(state): State<AppState>,
    Client(addr): Client,
    Path(room): Path<String>,
    Query(q): Query<WsQuery>,
    headers: HeaderMap,
    ws: WsUpgrade,
) -> AppResult<Response> {
    if !addr.exempt {
        state.limits.ws_connects.check(&addr.ip)?;
    }
    check_origin(&state, &headers)?;
    let has_token = q.token.is_some() || headers.contains_key(header::AUTHORIZATION);
    let identity = if !has_token && state.config.allow_guests {
        Identity::guest()
    } else {
        state.auth.from_upgrade(&headers, q.token.as_deref())?
    };
    let room = find_room(&state, &room).await?;
    let since = match q.since.as_deref() {
        None | Some("") => None,
        Some(s) => Some(s.parse::<u64>().map_err(|_| {
            AppError::bad_request("bad_since", "since must be a non-negative integer")
        })?),
    };
    state
        .moderation
        .check_not_banned(&room.id, &identity.user.id)
        .await?;
    let permit = state.limits.connect(addr, &identity.user.id)?;
    let sessions = state.sessions.clone();
    let start = session::Start {
        state,
        room,
        identity,
        since,
        addr,
        permit,
    };
    Ok(ws
        .on_upgrade(move |stream, early| sessions.track_future(session::run(stream, early, start))))
}
