//! The HTTP/1.1 listener: one task per connection (hyper, keep-alive, a deadline for the
//! request head against slow clients), the client's address in every request's extensions,
//! and WebSocket upgrades handed over as the raw TCP stream (`ws::upgrade` takes it back
//! from hyper). At most `--max-connections` sockets are open at once: each holds a
//! [`ConnSlot`] from accept to close, and a WebSocket session takes its connection's slot
//! over at the upgrade. On shutdown it stops accepting and every connection finishes the
//! request it is serving, then closes; one that has not finished within the grace period (a
//! client trickling a body) is dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

/// How long a client may take to send a request head (slowloris); hyper counts from the
/// end of the previous answer, so a keep-alive connection idle this long is closed too.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head hyper buffers; bigger is refused (431).
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// One open socket counted against `--max-connections`; the count drops with it.
pub struct ConnSlot {
    open: Arc<AtomicUsize>,
}

impl ConnSlot {
    fn take(open: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Self { open: open.clone() })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The connection's slot, in every request's extensions: a WebSocket upgrade takes it, so
/// the count follows the socket into its session.
#[derive(Clone)]
pub struct SlotHandle(Arc<Mutex<Option<ConnSlot>>>);

impl SlotHandle {
    /// The slot, for the one request that keeps the socket (an upgrade).
    pub fn take(&self) -> Option<ConnSlot> {
        self.0.lock().ok().and_then(|mut s| s.take())
    }
}

/// Serves `app` on `listener` until `shutdown` is cancelled and every connection is done
/// (or `grace` has passed since); at most `max_connections` sockets at once.
pub async fn run(
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
    grace: Duration,
    max_connections: usize,
) {
    let open = Arc::new(AtomicUsize::new(0));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES);
    let connections = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let Some(slot) = ConnSlot::take(&open, max_connections) else {
            // Full: closed at once (the client sees the connection end) rather than left
            // waiting in the backlog.
            tracing::debug!(%peer, "connection refused: --max-connections reached");
            drop(tcp);
            continue;
        };
        let slot = SlotHandle(Arc::new(Mutex::new(Some(slot))));
        // Small frames (claim results, chat) must leave at once: without TCP_NODELAY,
        // Nagle's algorithm holds a write while an earlier one is unacknowledged, and with
        // the peer's delayed ACKs that costs up to ~40 ms per pipelined answer.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            req.extensions_mut().insert(slot.clone());
            let mut app = app.clone();
            async move { app.call(req).await }
        });
        let conn = http
            .serve_connection(TokioIo::new(tcp), service)
            .with_upgrades();
        let stop = shutdown.clone();
        connections.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    // Dropped (and so closed) if it takes longer than the grace period.
                    let _ = tokio::time::timeout(grace, conn).await;
                }
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}
