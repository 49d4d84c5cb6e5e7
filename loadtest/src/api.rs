//! The host side of livedrop's HTTP API as the scenarios need it: create a room and a drop,
//! read a drop's counters and its ledger. Every call checks the status and says what the
//! server answered when it is not the expected one.

use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::json;

use crate::http::{Authorization, HttpClient, Method, RequestTemplate, Target};

/// How many times a host call is sent while the server answers `429`.
const RATE_LIMITED_TRIES: u32 = 10;
/// Longest wait for one host answer (a whole ledger of a long run can take a while).
const HOST_ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest host answer accepted: a ledger holds one entry per claim of the run.
const HOST_MAX_BODY: usize = 1 << 30;

/// A drop's stock counters, as `GET /api/drops/{drop}` shows them.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize)]
pub struct Levels {
    pub total: u64,
    pub remaining: u64,
    pub reserved: u64,
    pub sold: u64,
}

/// One ledger entry (only the fields the invariant check reads).
#[derive(Debug, Clone, Deserialize)]
pub struct LedgerEntry {
    pub op: String,
    pub claim_id: Option<String>,
    pub user: Option<String>,
    pub qty: u64,
}

#[derive(Deserialize)]
struct Ledger {
    entries: Vec<LedgerEntry>,
}

/// What the run's drop looks like.
pub struct DropSpec {
    /// The drop's id, chosen by the run (so clients can know it before the drop exists);
    /// `None` lets the server pick.
    pub id: Option<String>,
    pub stock: u64,
    pub per_user_limit: u64,
    pub hold_secs: u64,
    /// `Some` makes a group-buy drop (`kind: group`), `None` a flash drop.
    pub group: Option<GroupSpec>,
}

/// The group-buy fields of a `kind: group` drop.
pub struct GroupSpec {
    /// Members a group needs to complete (`group_size`).
    pub size: u64,
    /// Price per unit in a completed group, in minor units (`group_price`).
    pub price: u64,
    /// Seconds a group has to fill before it fails (`group_window_secs`).
    pub window_secs: u64,
}

/// Host calls, with one keep-alive connection.
pub struct HostApi {
    target: Target,
    client: HttpClient,
    auth: Authorization,
}

/// A host call's answer, owned: host calls are few, and a retried call outlives its reads.
struct Reply {
    status: u16,
    body: Vec<u8>,
}

fn excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned()
}

impl HostApi {
    pub fn new(target: Target, host_token: &str) -> anyhow::Result<Self> {
        Ok(Self {
            client: HttpClient::with_max_body(target.clone(), HOST_ANSWER_TIMEOUT, HOST_MAX_BODY),
            target,
            auth: Authorization::bearer(host_token)?,
        })
    }

    /// One call; a `429 rate_limited` answer is retried after a second, a few times, so a
    /// rate-limited server still gets its invariant check read.
    async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<Reply> {
        let body = body.map(|b| b.to_string());
        let template = RequestTemplate::new(
            &self.target,
            method,
            path,
            body.as_deref().map(str::as_bytes),
        )?;
        let mut tries = 0;
        loop {
            let a = self
                .client
                .send(template.request().auth(Some(&self.auth)))
                .await
                .with_context(|| format!("{path}: no answer from the server"))?;
            tries += 1;
            if a.status != 429 || tries >= RATE_LIMITED_TRIES {
                return Ok(Reply {
                    status: a.status,
                    body: a.body.to_vec(),
                });
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Creates the room; one that already exists is fine (`room_exists`).
    pub async fn ensure_room(&mut self, room: &str) -> anyhow::Result<()> {
        let a = self
            .call(
                Method::Post,
                "/api/rooms",
                Some(json!({"id": room, "title": "loadtest"})),
            )
            .await?;
        match a.status {
            201 => Ok(()),
            409 if a.body.windows(11).any(|w| w == b"room_exists") => Ok(()),
            s => bail!("POST /api/rooms answered {s}: {}", excerpt(&a.body)),
        }
    }

    /// Creates a drop (flash, or group with `spec.group`) in the room and returns its id.
    pub async fn create_drop(&mut self, room: &str, spec: &DropSpec) -> anyhow::Result<String> {
        let mut body = json!({
            "sku": "LOADTEST", "title": "loadtest drop", "price": 100, "currency": "USD",
            "stock": spec.stock, "per_user_limit": spec.per_user_limit,
            "hold_secs": spec.hold_secs, "kind": "flash",
        });
        if let Some(id) = &spec.id {
            body["id"] = json!(id);
        }
        if let Some(g) = &spec.group {
            body["kind"] = json!("group");
            body["group_size"] = json!(g.size);
            body["group_price"] = json!(g.price);
            body["group_window_secs"] = json!(g.window_secs);
        }
        let path = format!("/api/rooms/{room}/drops");
        let a = self.call(Method::Post, &path, Some(body)).await?;
        if a.status != 201 {
            bail!("POST {path} answered {}: {}", a.status, excerpt(&a.body));
        }
        #[derive(Deserialize)]
        struct Created {
            id: String,
        }
        let c: Created = serde_json::from_slice(&a.body).context("drop answer")?;
        Ok(c.id)
    }

    /// The drop's counters.
    pub async fn levels(&mut self, drop: &str) -> anyhow::Result<Levels> {
        let path = format!("/api/drops/{drop}");
        let a = self.call(Method::Get, &path, None).await?;
        if a.status != 200 {
            bail!("GET {path} answered {}: {}", a.status, excerpt(&a.body));
        }
        serde_json::from_slice(&a.body).context("drop counters")
    }

    /// The drop's whole ledger.
    pub async fn ledger(&mut self, drop: &str) -> anyhow::Result<Vec<LedgerEntry>> {
        let path = format!("/api/drops/{drop}/ledger");
        let a = self.call(Method::Get, &path, None).await?;
        if a.status != 200 {
            bail!("GET {path} answered {}: {}", a.status, excerpt(&a.body));
        }
        let l: Ledger = serde_json::from_slice(&a.body).context("ledger")?;
        Ok(l.entries)
    }
}
