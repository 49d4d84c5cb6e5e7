//! Request extractors that refuse bad input with livedrop's own error codes: the caller's
//! identity from the bearer token, and JSON bodies whose rejections become `bad_json`.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::auth::Identity;
use crate::error::AppError;
use crate::limits::ClientAddr;
use crate::state::AppState;

/// The authenticated caller (`Authorization: Bearer …`).
pub struct Authed(pub Identity);

impl FromRequestParts<AppState> for Authed {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        state.auth.from_request(&parts.headers, None).map(Authed)
    }
}

/// A JSON body; malformed JSON, a wrong content type or a wrong shape is `bad_json` (400).
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, AppError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(JsonBody(v)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(AppError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    rejection.body_text(),
                ))
            }
            Err(rejection) => Err(AppError::bad_request("bad_json", rejection.body_text())),
        }
    }
}

/// The `Idempotency-Key` header, if sent (claims and joins require it, opens may use it).
pub fn idempotency_key(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers.get("idempotency-key").and_then(|v| v.to_str().ok())
}

/// The `Idempotency-Key` of a request that must carry one (claims, joins): its absence is
/// 400 `missing_idempotency_key`, the same for every such endpoint.
pub fn required_idempotency_key<'h>(
    headers: &'h axum::http::HeaderMap,
    what: &str,
) -> Result<&'h str, AppError> {
    idempotency_key(headers).ok_or_else(|| {
        AppError::bad_request(
            "missing_idempotency_key",
            format!("{what} need an Idempotency-Key header"),
        )
    })
}

/// Where the request came from, as resolved by the `limits::http_limit` middleware.
pub struct Client(pub ClientAddr);

impl FromRequestParts<AppState> for Client {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, AppError> {
        Ok(Client(
            parts
                .extensions
                .get::<ClientAddr>()
                .copied()
                .unwrap_or(ClientAddr {
                    ip: std::net::IpAddr::from([0, 0, 0, 0]),
                    exempt: false,
                }),
        ))
    }
}
