//! The one error type of livedrop. Every refusal carries a stable machine `code` that clients
//! can branch on; HTTP renders it as `application/problem+json` (RFC 9457) and the WebSocket
//! renders it as an `error` frame, so both transports speak the same vocabulary.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// A refusal with its HTTP status, stable code and a human message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds to wait before retrying, for `rate_limited`.
    pub retry_after: Option<u64>,
    /// The limit that refused, rendered as `RateLimit-Policy`/`RateLimit` headers.
    pub policy: Option<RatePolicy>,
}

/// A named quota (`q` units per `w` seconds), as the IETF RateLimit headers describe it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RatePolicy {
    pub name: &'static str,
    pub quota: u32,
    pub window_secs: u64,
}

impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for AppError {}

/// Result alias used by services and handlers.
pub type AppResult<T> = Result<T, AppError>;

impl AppError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            policy: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    pub fn store_unavailable(detail: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!("the store did not answer: {detail}"),
        )
    }

    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Self {
            retry_after: Some(retry_after_secs.max(1)),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests; slow down",
            )
        }
    }

    /// A refusal by a named limit: 429 with `Retry-After` and the RateLimit headers.
    pub fn rate_limited_by(policy: RatePolicy, wait: std::time::Duration) -> Self {
        let secs = wait.as_millis().div_ceil(1000) as u64;
        Self {
            policy: Some(policy),
            message: format!(
                "{} limit: at most {} per {} s; retry in {} s",
                policy.name,
                policy.quota,
                policy.window_secs,
                secs.max(1)
            ),
            ..Self::rate_limited(secs)
        }
    }

    pub fn internal(detail: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("internal error: {detail}"),
        )
    }

    /// The JSON body of a problem document, serialized straight from the error: refusals
    /// are the hot path of a sold-out rush (a `serde_json::Value` tree per answer was ~7 %
    /// of the server's CPU there).
    pub fn problem_json(&self) -> String {
        let problem = Problem {
            code: self.code,
            detail: &self.message,
            status: self.status.as_u16(),
            title: self.code,
            kind: ProblemType(self.code),
        };
        // Serializing plain strings and a number cannot fail.
        serde_json::to_string(&problem).unwrap_or_default()
    }
}

/// An RFC 9457 problem document (fields in the order clients have always seen).
#[derive(Serialize)]
struct Problem<'a> {
    code: &'static str,
    detail: &'a str,
    status: u16,
    title: &'static str,
    #[serde(rename = "type")]
    kind: ProblemType,
}

/// The problem's `type` URI, written without building the string first.
struct ProblemType(&'static str);

impl Serialize for ProblemType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("https://livedrop.dev/errors/{}", self.0))
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let body = self.problem_json();
        let mut res = (self.status, body).into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            if let Some(p) = self.policy {
                let policy = format!("\"{}\";q={};w={}", p.name, p.quota, p.window_secs);
                let now = format!("\"{}\";r=0;t={secs}", p.name);
                for (name, value) in [("ratelimit-policy", policy), ("ratelimit", now)] {
                    if let Ok(v) = HeaderValue::from_str(&value) {
                        res.headers_mut().insert(name, v);
                    }
                }
            }
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_json_is_the_rfc_9457_document() {
        let e = AppError::conflict("sold_out", "not \"enough\" stock\nleft");
        let v: serde_json::Value = serde_json::from_str(&e.problem_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "type": "https://livedrop.dev/errors/sold_out",
                "title": "sold_out",
                "status": 409,
                "code": "sold_out",
                "detail": "not \"enough\" stock\nleft",
            })
        );
    }
}
