//! Request extractors that refuse bad input with livedrop's own error codes: the caller's
//! identity from the bearer token, and JSON bodies whose rejections become `bad_json`.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use bytes::Bytes;
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

/// `application/json`, or any `application/*+json`.
fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase())
        .is_some_and(|m| {
            m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
        })
}

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, AppError> {
        if !is_json(req.headers()) {
            return Err(AppError::bad_request(
                "bad_json",
                "expected a request with Content-Type: application/json",
            ));
        }
        // The body limit (`DefaultBodyLimit`) applies here; serde_json parses the bytes in
        // place (no path tracking: the error names line and column).
        let bytes = match Bytes::from_request(req, state).await {
            Ok(b) => b,
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(AppError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    rejection.body_text(),
                ));
            }
            Err(rejection) => return Err(AppError::bad_request("bad_json", rejection.body_text())),
        };
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| AppError::bad_request("bad_json", format!("bad JSON body: {e}")))
    }
}

/// The `Idempotency-Key` header, if sent (claims and joins require it, opens may use it),
/// taken without cloning the request's headers. Its absence is judged by the handler, after
/// the caller is admitted, so refusals keep their order.
pub struct IdempotencyKey(Option<String>);

impl FromRequestParts<AppState> for IdempotencyKey {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, AppError> {
        Ok(IdempotencyKey(
            parts
                .headers
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        ))
    }
}

impl IdempotencyKey {
    /// The key, when the request carries one.
    pub fn optional(&self) -> Option<&str> {
        self.0.as_deref()
    }

    /// The key of a request that must carry one (claims, joins): its absence is 400
    /// `missing_idempotency_key`, the same for every such endpoint.
    pub fn required(&self, what: &str) -> Result<&str, AppError> {
        self.optional().ok_or_else(|| {
            AppError::bad_request(
                "missing_idempotency_key",
                format!("{what} need an Idempotency-Key header"),
            )
        })
    }
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
