//! The RFC 6455 opening handshake as an axum extractor. A request that is not a proper
//! WebSocket upgrade is refused with a problem+json `bad_upgrade` (426 for a wrong
//! version) before the handler runs; a good one is answered 101 and, once hyper has flushed
//! that answer, the raw TCP socket (and any bytes the client sent right behind its request)
//! is handed to the caller. No extension is ever negotiated: no permessage-deflate, so no
//! compression bombs and no per-socket zlib state.

use std::future::Future;
use std::task::{Context, Waker};

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::error::AppError;
use crate::http_server::SlotHandle;

/// A valid WebSocket upgrade request, waiting for the handler's verdict.
pub struct WsUpgrade {
    accept: HeaderValue,
    on_upgrade: OnUpgrade,
    /// The connection's `--max-connections` slot: the session keeps it once upgraded.
    slot: Option<SlotHandle>,
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

fn bad(message: &'static str) -> AppError {
    AppError::bad_request("bad_upgrade", message)
}

impl<S: Send + Sync> FromRequestParts<S> for WsUpgrade {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
        let headers = &parts.headers;
        if parts.method != Method::GET {
            return Err(bad("a WebSocket upgrade is a GET").into_response());
        }
        if !has_token(headers, header::CONNECTION, "upgrade")
            || !has_token(headers, header::UPGRADE, "websocket")
        {
            return Err(bad("expected Connection: upgrade and Upgrade: websocket").into_response());
        }
        if headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v != "13")
        {
            let mut res = AppError::new(
                StatusCode::UPGRADE_REQUIRED,
                "bad_upgrade",
                "only WebSocket version 13 is supported",
            )
            .into_response();
            res.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
            return Err(res);
        }
        // The key is 16 random bytes in base64: 24 characters.
        let Some(key) = headers
            .get(header::SEC_WEBSOCKET_KEY)
            .filter(|k| k.len() == 24)
        else {
            return Err(bad("missing or malformed Sec-WebSocket-Key").into_response());
        };
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let Ok(accept) = HeaderValue::from_str(&accept) else {
            return Err(bad("malformed Sec-WebSocket-Key").into_response());
        };
        let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
            return Err(bad("this connection cannot be upgraded").into_response());
        };
        let slot = parts.extensions.get::<SlotHandle>().cloned();
        Ok(Self {
            accept,
            on_upgrade,
            slot,
        })
    }
}

/// The socket's reactor entry still holds the waker of hyper's connection task, which
/// would keep that finished task's memory (~1.6 KiB) alive for as long as the socket stays
/// quiet. Registering a no-op waker in its place lets it go.
fn forget_wakers(stream: &TcpStream) {
    let mut cx = Context::from_waker(Waker::noop());
    let _ = stream.poll_read_ready(&mut cx);
    let _ = stream.poll_write_ready(&mut cx);
}

impl WsUpgrade {
    /// Answers 101 and runs `session` on the socket once the upgrade completes: `session`
    /// gets the TCP stream and the bytes the client already sent past its handshake.
    pub fn on_upgrade<F, Fut>(self, session: F) -> Response
    where
        F: FnOnce(TcpStream, Bytes) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let on_upgrade = self.on_upgrade;
        // Counted for as long as the socket lives, not just the HTTP part of it.
        let slot = self.slot.and_then(|s| s.take());
        tokio::spawn(async move {
            let _slot = slot;
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(error = %e, "upgrade failed");
                    return;
                }
            };
            // The listener serves every connection as `TokioIo<TcpStream>` (see `http_server`).
            match upgraded.downcast::<TokioIo<TcpStream>>() {
                Ok(parts) => {
                    let stream = parts.io.into_inner();
                    forget_wakers(&stream);
                    session(stream, parts.read_buf).await
                }
                Err(_) => tracing::error!("upgraded connection is not a TCP stream"),
            }
        });
        let mut res = Response::new(Body::empty());
        *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = res.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::SEC_WEBSOCKET_ACCEPT, self.accept);
        res
    }
}
