//! HTTP routes: thin handlers that parse, authorize, call a service and reply. Errors are
//! `AppError`s rendered as problem+json; bodies and paths are validated before anything
//! reaches the store.

mod commerce;
mod extract;
mod groups;
mod moderation;
mod rooms;
mod ws;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post, put};

use crate::error::AppError;
use crate::state::AppState;

pub use extract::{Authed, Client, JsonBody};

/// Largest HTTP request body; larger is 413 `body_too_large`.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// All routes of the server.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/rooms", post(rooms::create))
        .route("/api/rooms/{room}", get(rooms::show))
        .route("/api/rooms/{room}/drops", post(commerce::create_drop))
        .route("/api/drops/{drop}", get(commerce::show_drop))
        .route("/api/drops/{drop}/end", post(commerce::end_drop))
        .route("/api/drops/{drop}/ledger", get(commerce::ledger))
        .route("/api/drops/{drop}/claims", post(commerce::claim))
        .route("/api/claims/{claim}/confirm", post(commerce::confirm))
        .route("/api/claims/{claim}", delete(commerce::release))
        .route("/api/me/claims", get(commerce::my_claims))
        .route(
            "/api/drops/{drop}/groups",
            post(groups::open).get(groups::list),
        )
        .route("/api/groups/{group}", get(groups::show))
        .route("/api/groups/{group}/join", post(groups::join))
        .route("/api/rooms/{room}/stats", get(moderation::stats))
        .route("/api/rooms/{room}/moderation", get(moderation::report))
        .route("/api/rooms/{room}/rules", put(moderation::set_rules))
        .route("/api/rooms/{room}/mutes", post(moderation::mute))
        .route("/api/rooms/{room}/bans", post(moderation::ban))
        .route("/api/rooms/{room}/bans/{user}", delete(moderation::unban))
        .route(
            "/api/rooms/{room}/chat/{id}",
            delete(moderation::delete_message),
        )
        .route("/ws/rooms/{room}", get(ws::upgrade))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::limits::http_limit,
        ))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, format!("ready ({})", state.store.engine())).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn not_found() -> AppError {
    AppError::not_found("route")
}
