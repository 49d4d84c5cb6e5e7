//! The WebSocket upgrade: authenticate and find the room BEFORE upgrading (so a bad token
//! is a plain 401 and an unknown room a 404), then hand the socket to a session with tight
//! frame and buffer limits.

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;

use super::rooms::find_room;
use crate::error::{AppError, AppResult};
use crate::hub::session;
use crate::state::AppState;

/// Bytes the socket reads at a time: chat frames are small, so idle viewers stay light.
const READ_BUFFER: usize = 4 * 1024;
/// Bytes written before a flush is forced.
const WRITE_BUFFER: usize = 8 * 1024;
/// Most bytes queued for one socket in the WebSocket layer before writes fail.
const MAX_WRITE_BUFFER: usize = 4 * 1024 * 1024;

#[derive(Deserialize)]
pub struct WsQuery {
    token: Option<String>,
    since: Option<String>,
}

pub async fn upgrade(
    State(state): State<AppState>,
    Path(room): Path<String>,
    Query(q): Query<WsQuery>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> AppResult<Response> {
    let identity = state.auth.from_request(&headers, q.token.as_deref())?;
    let room = find_room(&state, &room).await?;
    let since = match q.since.as_deref() {
        None | Some("") => None,
        Some(s) => Some(s.parse::<u64>().map_err(|_| {
            AppError::bad_request("bad_since", "since must be a non-negative integer")
        })?),
    };
    let max = state.config.max_frame_bytes;
    let sessions = state.sessions.clone();
    Ok(ws
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            sessions.track_future(session::run(socket, state, room, identity, since))
        }))
}
