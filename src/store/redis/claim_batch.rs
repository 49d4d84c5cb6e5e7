//! Claim batching for the redis engine (group commit). In a rush thousands of claims on one
//! drop arrive within milliseconds, and Redis runs them one after the other anyway (they
//! share the drop's hash slot). Sending each as its own EVALSHA spends most of Redis's time
//! on per-command overhead (parsing, dispatch, a Lua call frame, a reply write) and most of
//! the server's on syscalls. Instead each drop has a *lane*: claims queue on it, and the
//! lane's worker sends whatever has queued as ONE call of `claim.lua`, which runs every claim
//! of the batch exactly as if it ran alone (each atomic, each with its own answer). Nothing
//! waits for a batch to fill: a batch is what queued while the previous call was in flight,
//! so a lone claim goes out at once and a rush packs itself.
//!
//! Bounds: a lane holds at most [`LANE_CAPACITY`] queued claims (senders wait beyond that,
//! within the caller's time budget), a batch at most [`MAX_BATCH`], and at most
//! [`IN_FLIGHT`] batches of one drop are in flight. An idle lane closes itself after
//! [`IDLE`], so lanes of finished drops do not pile up.
//!
//! A claim is acknowledged only after its batch's script call returned. Each claim carries
//! its deadline (arrival + the store's time budget); the lane answers `store_unavailable`
//! to a claim whose deadline passed before its batch went out, and a batch's call is bounded
//! by the earliest deadline in it, so the whole wait stays within the budget with one timer
//! per batch rather than one per claim (a timer per claim was ~3 % of the server's CPU). A
//! caller whose budget ran out while its claim was in flight gets `store_unavailable` and
//! the claim may still be made, exactly as when a lone call times out on the wire: the
//! client's retry with the same Idempotency-Key then answers with that claim, never a second
//! one.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use redis::aio::ConnectionManager;
use redis::{Script, Value};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::{
    DropKeys, array, bad_reply, decode_claim, guarded_until, idem_field, refusal, user_drops_key,
};
use crate::error::{AppError, AppResult};
use crate::model::{Millis, StockLevels};
use crate::store::{ClaimRequest, Reservation};

/// Most claims in one script call: keeps one call's time in Redis short (other drops and
/// chat wait behind it) while still amortising the per-call overhead.
const MAX_BATCH: usize = 64;
/// Claims queued on one drop's lane before senders wait.
const LANE_CAPACITY: usize = 4096;
/// Batches of one drop in flight at once: while one runs in Redis the next is on the wire.
const IN_FLIGHT: usize = 2;
/// A lane with no claim for this long closes.
const IDLE: Duration = Duration::from_secs(5);
/// Attempts to hand a claim to a lane that closed in between (it then reopens).
const SEND_ATTEMPTS: usize = 3;

/// One claim waiting on a lane, with the place to send its answer.
struct Pending {
    req: ClaimRequest,
    /// When the caller's time budget runs out.
    deadline: Instant,
    reply: oneshot::Sender<AppResult<Reservation>>,
}

impl Pending {
    fn answer(self, answer: AppResult<Reservation>) {
        let _ = self.reply.send(answer);
    }
}

fn timed_out() -> AppError {
    AppError::store_unavailable("redis claim timed out")
}

/// What a lane worker needs to run a batch: cheap to clone into each batch's task.
#[derive(Clone)]
pub(super) struct ClaimRunner {
    pub(super) conn: ConnectionManager,
    pub(super) script: Script,
    pub(super) budget: Duration,
}

/// The lanes of every drop this instance claims on.
pub(super) struct ClaimBatcher {
    lanes: Arc<DashMap<String, mpsc::Sender<Pending>>>,
    runner: ClaimRunner,
}

impl ClaimBatcher {
    pub(super) fn new(runner: ClaimRunner) -> Self {
        Self {
            lanes: Arc::new(DashMap::new()),
            runner,
        }
    }

    /// Claims through the drop's lane; the whole wait (queue and call) is bounded by the
    /// store's time budget, so a slow Redis fails claims fast with `store_unavailable`.
    pub(super) async fn claim(&self, req: &ClaimRequest) -> AppResult<Reservation> {
        let deadline = Instant::now() + self.runner.budget;
        let (reply, answer) = oneshot::channel();
        let mut pending = Pending {
            req: req.clone(),
            deadline,
            reply,
        };
        for _ in 0..SEND_ATTEMPTS {
            let lane = self.lane(&req.drop);
            // A full lane is the only wait before the lane takes over the deadline.
            let sent = match lane.try_send(pending) {
                Ok(()) => Ok(()),
                Err(mpsc::error::TrySendError::Full(p)) => {
                    match tokio::time::timeout_at(deadline, lane.send(p)).await {
                        Ok(sent) => sent.map_err(|mpsc::error::SendError(p)| p),
                        Err(_) => return Err(timed_out()),
                    }
                }
                Err(mpsc::error::TrySendError::Closed(p)) => Err(p),
            };
            match sent {
                // The lane answers within the deadline (or drops the claim: abandoned).
                Ok(()) => {
                    return answer.await.unwrap_or_else(|_| {
                        Err(AppError::store_unavailable("claim batch abandoned"))
                    });
                }
                // The lane closed for idleness between lookup and send: take a fresh one.
                Err(back) => pending = back,
            }
        }
        Err(AppError::store_unavailable("claim lane unavailable"))
    }

    /// The drop's open lane, opening one (and its worker) when there is none.
    fn lane(&self, drop: &str) -> mpsc::Sender<Pending> {
        if let Some(tx) = self.lanes.get(drop)
            && !tx.is_closed()
        {
            return tx.clone();
        }
        match self.lanes.entry(drop.to_owned()) {
            Entry::Occupied(mut e) if e.get().is_closed() => {
                let tx = self.open_lane(drop);
                e.insert(tx.clone());
                tx
            }
            Entry::Occupied(e) => e.get().clone(),
            Entry::Vacant(e) => e.insert(self.open_lane(drop)).clone(),
        }
    }

    fn open_lane(&self, drop: &str) -> mpsc::Sender<Pending> {
        let (tx, rx) = mpsc::channel(LANE_CAPACITY);
        tokio::spawn(run_lane(
            self.runner.clone(),
            rx,
            drop.to_owned(),
            self.lanes.clone(),
        ));
        tx
    }
}

/// A lane's worker: takes what has queued (up to [`MAX_BATCH`]) whenever a slot of
/// [`IN_FLIGHT`] is free, and runs it as one script call in its own task.
async fn run_lane(
    runner: ClaimRunner,
    mut rx: mpsc::Receiver<Pending>,
    drop_id: String,
    lanes: Arc<DashMap<String, mpsc::Sender<Pending>>>,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        let first = match tokio::time::timeout(IDLE, rx.recv()).await {
            Ok(Some(p)) => p,
            Ok(None) => break,
            // Idle: refuse new sends (they reopen a lane) and finish what is queued.
            Err(_) => {
                rx.close();
                continue;
            }
        };
        // Waiting for a slot is what lets the next batch grow.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let now = Instant::now();
        let mut batch = Vec::with_capacity(MAX_BATCH.min(rx.len() + 1));
        let mut next = Some(first);
        while let Some(p) = next {
            if p.deadline <= now {
                p.answer(Err(timed_out()));
            } else {
                batch.push(p);
            }
            next = if batch.len() < MAX_BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if batch.is_empty() {
            continue;
        }
        let runner = runner.clone();
        tokio::spawn(async move {
            runner.run(batch).await;
            drop(slot);
        });
    }
    lanes.remove_if(&drop_id, |_, tx| tx.is_closed());
}

impl ClaimRunner {
    /// Runs one batch and answers every claim in it.
    async fn run(&self, batch: Vec<Pending>) {
        // Bounded by the earliest deadline in the batch, so no claim waits past its own.
        let deadline = batch.iter().map(|p| p.deadline).min();
        let Some(deadline) = deadline else { return };
        match self.call(&batch, deadline).await {
            Ok(answers) => {
                self.index(&answers, deadline).await;
                for (p, (answer, _)) in batch.into_iter().zip(answers) {
                    p.answer(answer);
                }
            }
            Err(e) => {
                for p in batch {
                    p.answer(Err(e.clone()));
                }
            }
        }
    }

    /// One `claim.lua` call for the whole batch (all claims are on the same drop): each
    /// claim's answer, and whether it was the user's first claim in the drop.
    async fn call(
        &self,
        batch: &[Pending],
        deadline: Instant,
    ) -> AppResult<Vec<(AppResult<Reservation>, bool)>> {
        let drop = batch
            .first()
            .map(|p| p.req.drop.as_str())
            .ok_or_else(|| AppError::internal("empty claim batch"))?;
        let k = DropKeys::new(drop);
        let mut inv = self.script.prepare_invoke();
        inv.key(&k.meta)
            .key(&k.claims)
            .key(&k.holds)
            .key(&k.users)
            .key(&k.idem)
            .key(&k.uclaims)
            .key(&k.ledger)
            .arg(drop)
            .arg(crate::store::USER_CLAIMS_MAX);
        for p in batch {
            let r = &p.req;
            let ttl_ms = (r.key_ttl_secs as Millis).saturating_mul(1000);
            inv.arg(&r.user.id)
                .arg(idem_field(&r.user.id, &r.key))
                .arg(r.qty)
                .arg(r.now)
                .arg(r.now.saturating_add(ttl_ms));
        }
        let mut conn = self.conn.clone();
        let reply: Value = guarded_until(deadline, inv.invoke_async(&mut conn)).await?;
        let answers = array(reply)?;
        if answers.len() != batch.len() {
            return Err(AppError::internal(
                "claim batch: one answer per claim expected",
            ));
        }
        Ok(answers
            .into_iter()
            .map(|a| match reservation(a) {
                Ok((r, first)) => (Ok(r), first),
                Err(e) => (Err(e), false),
            })
            .collect())
    }

    /// Adds the drop to the list of drops of each user whose first claim in it this batch
    /// made, in one pipelined round trip (the script keeps each user's claims of the drop;
    /// the user's list of drops is in the user's slot, which the script cannot write). Most
    /// batches have nothing to add. The claims stand even if this fails (logged, not
    /// refused).
    async fn index(&self, answers: &[(AppResult<Reservation>, bool)], deadline: Instant) {
        let mut pipe = redis::pipe();
        for (r, _) in answers.iter().filter(|(_, first)| *first) {
            let Ok(r) = r else { continue };
            pipe.cmd("ZADD")
                .arg(user_drops_key(&r.claim.user))
                .arg("NX")
                .arg(r.claim.created_at)
                .arg(&r.claim.drop)
                .ignore();
        }
        if pipe.is_empty() {
            return;
        }
        let mut conn = self.conn.clone();
        if let Err(e) = guarded_until(deadline, pipe.query_async::<()>(&mut conn)).await {
            tracing::warn!(error = %e, "user claim index not updated");
        }
    }
}

/// One claim's answer, one string:
/// `ok|REPLAY|FIRST|CLAIM_ID|TOTAL|REMAINING|RESERVED|SOLD|CLAIM` (the encoded claim last:
/// it ends with the user) or `err|CODE|DETAIL`; with whether it was the user's first claim
/// in the drop.
fn reservation(answer: Value) -> AppResult<(Reservation, bool)> {
    let Value::BulkString(bytes) = answer else {
        return Err(bad_reply("claim answer: expected a string"));
    };
    let s = std::str::from_utf8(&bytes).map_err(|_| bad_reply("claim answer: not utf-8"))?;
    let mut parts = s.splitn(9, '|');
    let mut next = || {
        parts
            .next()
            .ok_or_else(|| bad_reply("claim answer too short"))
    };
    match next()? {
        "ok" => {}
        "err" => {
            let code = next()?;
            return Err(refusal(code, next().unwrap_or("")));
        }
        _ => return Err(bad_reply("claim answer status")),
    }
    let replay = next()? == "1";
    let first = next()? == "1";
    let claim_id = next()?;
    let mut number = || -> AppResult<u64> {
        next()?
            .parse()
            .map_err(|_| bad_reply("claim answer: expected an integer"))
    };
    let levels = StockLevels {
        total: number()?,
        remaining: number()?,
        reserved: number()?,
        sold: number()?,
    };
    let reservation = Reservation {
        replay,
        claim: decode_claim(claim_id, next()?)?,
        levels,
    };
    Ok((reservation, first))
}
