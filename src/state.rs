//! The shared application state handed to every handler and WebSocket session: the
//! configuration, the store, the bus, the hub and the services built on them, plus the one
//! shutdown signal everything listens to.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::bus::Bus;
use crate::chat::{ChatService, LikeService};
use crate::commerce::Commerce;
use crate::config::Config;
use crate::hub::Hub;
use crate::limits::Limits;
use crate::moderation::Moderation;
use crate::store::Store;

/// Cheap to clone: one reference count, however many services there are (axum clones the
/// state for every extractor and middleware of every request).
#[derive(Clone)]
pub struct AppState(Arc<Services>);

impl AppState {
    pub fn new(services: Services) -> Self {
        Self(Arc::new(services))
    }
}

impl std::ops::Deref for AppState {
    type Target = Services;

    fn deref(&self) -> &Services {
        &self.0
    }
}

/// Everything [`AppState`] shares.
pub struct Services {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub bus: Arc<dyn Bus>,
    pub hub: Arc<Hub>,
    pub auth: Arc<Authenticator>,
    pub chat: Arc<ChatService>,
    pub likes: Arc<LikeService>,
    pub commerce: Arc<Commerce>,
    /// Rate limits and connection caps.
    pub limits: Arc<Limits>,
    /// Room rules, bans, mutes and the moderation log.
    pub moderation: Arc<Moderation>,
    /// Cancelled once on SIGTERM/Ctrl-C (or by a test): sessions close with 1001.
    pub shutdown: CancellationToken,
    /// Live WebSocket sessions, awaited (with a deadline) during shutdown.
    pub sessions: TaskTracker,
}
