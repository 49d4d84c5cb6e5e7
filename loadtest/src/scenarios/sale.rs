//! The sale scenario: the real event. V viewers sit in a room over WebSocket while a
//! chatter chats; the host drops a product with stock S (`POST /api/rooms/{room}/drops`);
//! every viewer that is a buyer (`--claim-fraction`) sends one `claim` frame the moment it
//! sees `drop_live`, and U extra HTTP claimers (one claim each, over `--http-concurrency`
//! pre-opened keep-alive connections) rush `POST /api/drops/{drop}/claims` as soon as the
//! drop exists. Measures: time from the drop to sold out (the server's first `sold_out`
//! frame, and the last successful claim), claim latency and answers by transport, how fast
//! every viewer saw `sold_out` (from the drop: percentiles, and the last viewer), and chat
//! latency during the rush. Ends with the same invariant check as `claims`.
//!
//! The drop's id is chosen by the run, so viewers recognise its `drop_live` even when it
//! arrives before the host's `201`. Time 0 of every "from the drop" figure is the instant the
//! host's request was sent.
//!
//! Viewers read through `viewer_socket`'s lean reader; a buyer's `claim` goes out on that
//! same socket right after the read that brought `drop_live`.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::api::{DropSpec, HostApi};
use crate::audience::{self, ChatProbe, ConnectSummary, Fleet};
use crate::cli::SaleArgs;
use crate::http::{Authorization, HttpClient, IdempotencyKeys, Method, RequestTemplate, Target};
use crate::invariant::{self, Seen, Verdict};
use crate::progress::Progress;
use crate::report::{Counts, Latency, LatencySummary, format_counts};
use crate::series::Series;
use crate::tally::{
    CLAIM_BODY, ClaimResult, Tally, TallyStats, claim_frame, http_claim_outcome, short_error,
};
use crate::tokens::Minter;
use crate::viewer_socket::{self, ViewerSocket};
use crate::ws;

/// Longest wait for one HTTP answer before it counts as lost.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// After every claim is answered and the drop did not sell out, how long to wait anyway.
const NOT_SOLD_OUT_GRACE: Duration = Duration::from_secs(2);
/// Longest wait, after the chatter stops, for its last messages to reach every viewer.
const CHAT_DRAIN: Duration = Duration::from_secs(3);
/// Not yet set.
const UNSET: u64 = u64::MAX;

/// The run's summary, printed and written as JSON.
#[derive(Serialize)]
pub struct SaleSummary {
    pub scenario: &'static str,
    pub target: String,
    pub room: String,
    pub drop: String,
    #[serde(flatten)]
    pub connect: ConnectSummary,
    pub stock: u64,
    pub per_user_limit: u64,
    pub claim_fraction: f64,
    /// Connected viewers that were buyers.
    pub ws_buyers: u64,
    pub http_claimers: u32,
    pub http_concurrency: u32,
    /// The host's `POST …/drops` round trip.
    pub drop_request_ms: f64,
    /// Whether the drop ended with nothing remaining (from `GET /api/drops/{drop}`).
    pub sold_out: bool,
    /// From the drop to the first `sold_out` frame any viewer received.
    pub first_sold_out_seen_s: Option<f64>,
    /// From the drop to the last successful claim answer (either transport).
    pub last_success_s: Option<f64>,
    /// From the drop to the moment the last viewer saw `sold_out`.
    pub last_viewer_saw_sold_out_s: Option<f64>,
    /// Viewers that saw `sold_out`, of `connected`.
    pub viewers_saw_sold_out: u64,
    /// From the drop to each viewer's `sold_out`.
    pub sold_out_seen: LatencySummary,
    pub ws_claims: TallyStats,
    pub http_claims: TallyStats,
    pub chat_rate: f64,
    pub chat_published: u64,
    pub chat_errors: Counts,
    pub chat_received: u64,
    /// Chat deliveries expected (published × connected viewers) that never arrived.
    pub chat_lost: i64,
    /// Every chat message's latency, the lead-in included.
    pub chat_latency: LatencySummary,
    /// Latency of the chat messages sent from the drop on.
    pub chat_latency_rush: LatencySummary,
    pub resyncs: u64,
    pub closed_by_server: Counts,
    pub elapsed_s: f64,
    pub invariant: Verdict,
    pub passed: bool,
    /// Per-second charts, for `--report`.
    #[serde(skip)]
    pub series: Vec<Series>,
}

/// What the viewer tasks and the HTTP claimers share.
struct Sale {
    probe: ChatProbe,
    drop: String,
    /// Idempotency keys are `s{run}-` and the user's index.
    keys: IdempotencyKeys,
    /// The HTTP claimers' request, and the one that warms their connections.
    http_claim: RequestTemplate,
    http_warm_up: RequestTemplate,
    /// Viewers with an index below this are buyers.
    buyers_below: u32,
    /// µs (probe clock) when the host's drop request was sent.
    drop_at_us: AtomicU64,
    buyers_connected: AtomicU64,
    ws_sent: AtomicU64,
    ws_done: AtomicU64,
    http_done: AtomicU64,
    answered: Arc<AtomicU64>,
    ws: Mutex<Tally>,
    http: Mutex<Tally>,
    sold_seen: Mutex<Latency>,
    sold_series: Mutex<Series>,
    sold_count: AtomicU64,
    first_sold_us: AtomicU64,
    last_sold_us: AtomicU64,
    last_success_us: AtomicU64,
    /// Successes per user: viewers first, then HTTP claimers.
    per_user: Vec<AtomicU32>,
}

impl Sale {
    /// µs since the drop request was sent (0 before it).
    fn since_drop_us(&self) -> u64 {
        let at = self.drop_at_us.load(Ordering::Acquire);
        if at == UNSET {
            0
        } else {
            self.probe.now_us().saturating_sub(at)
        }
    }

    /// Counts one answer for `user` in `t`.
    fn counted(&self, t: &mut Tally, user: usize, outcome: crate::tally::Outcome) {
        self.answered.fetch_add(1, Ordering::Relaxed);
        if t.outcome(outcome) {
            if let Some(n) = self.per_user.get(user) {
                n.fetch_add(1, Ordering::Relaxed);
            }
            self.last_success_us
                .fetch_max(self.since_drop_us(), Ordering::Relaxed);
        }
    }

    fn saw_sold_out(&self) {
        let us = self.since_drop_us();
        let now = self.probe.now_us();
        if let Ok(mut h) = self.sold_seen.lock() {
            h.record_micros(us);
        }
        if let Ok(mut s) = self.sold_series.lock() {
            s.record(now, us);
        }
        self.first_sold_us.fetch_min(us, Ordering::Relaxed);
        self.last_sold_us.fetch_max(us, Ordering::Relaxed);
        self.sold_count.fetch_add(1, Ordering::Relaxed);
    }

    fn claims_done(&self, http_claimers: u32) -> bool {
        self.http_done.load(Ordering::Acquire) >= u64::from(http_claimers)
            && self.ws_done.load(Ordering::Acquire) >= self.buyers_connected.load(Ordering::Acquire)
    }
}

/// A drop's id (and remaining stock, where the frame has it).
#[derive(Deserialize)]
struct DropState {
    id: String,
    #[serde(default)]
    remaining: Option<u64>,
}

/// The drops of a `resync` snapshot.
#[derive(Deserialize)]
struct SnapshotDrops {
    #[serde(default)]
    drops: Vec<DropState>,
}

/// Runs the scenario; `passed` is false when an invariant broke.
pub async fn run(args: SaleArgs) -> anyhow::Result<SaleSummary> {
    let target = Target::parse(&args.common.target)?;
    if args.viewers > 60_000 || args.claimers > 1_000_000 {
        bail!("--viewers must be at most 60000 and --claimers at most 1000000");
    }
    if !(0.0..=1.0).contains(&args.claim_fraction) {
        bail!("--claim-fraction must be in [0, 1]");
    }
    if !(args.chat_rate > 0.0 && args.chat_rate <= 1000.0) {
        bail!("--chat-rate must be in (0, 1000] messages per second");
    }
    if !(args.timeout > 0.0 && args.timeout <= 600.0) {
        bail!("--timeout must be in (0, 600] seconds");
    }
    if args.http_concurrency == 0 {
        bail!("--http-concurrency must be at least 1");
    }
    let minter = Arc::new(Minter::new(&args.common.jwt_secret)?);
    let run_id = audience::run_id();
    let room = args
        .room
        .clone()
        .unwrap_or_else(|| format!("lt-s-{run_id}"));
    let drop_id = format!("lt-sale-{run_id}");
    let mut host = HostApi::new(target.clone(), &minter.mint("lt-host", "host")?)?;
    host.ensure_room(&room).await?;
    let source_ips = audience::source_ip_count(args.viewers, args.source_ips);
    let users = args.viewers as usize + args.claimers as usize;
    let claim_path = format!("/api/drops/{drop_id}/claims");
    let sale = Arc::new(Sale {
        probe: ChatProbe::new(&run_id, Instant::now(), "chat deliveries"),
        drop: drop_id.clone(),
        keys: IdempotencyKeys::new(&format!("s{run_id}-"))?,
        http_claim: RequestTemplate::new(&target, Method::Post, &claim_path, Some(CLAIM_BODY))?,
        http_warm_up: RequestTemplate::new(&target, Method::Get, "/healthz", None)?,
        buyers_below: (f64::from(args.viewers) * args.claim_fraction).round() as u32,
        drop_at_us: AtomicU64::new(UNSET),
        buyers_connected: AtomicU64::new(0),
        ws_sent: AtomicU64::new(0),
        ws_done: AtomicU64::new(0),
        http_done: AtomicU64::new(0),
        answered: Arc::new(AtomicU64::new(0)),
        ws: Mutex::new(Tally::new("WebSocket claim answers")),
        http: Mutex::new(Tally::new("HTTP claim answers")),
        sold_seen: Mutex::new(Latency::new()),
        sold_series: Mutex::new(Series::new(
            "viewers seeing sold_out (latency = time since the drop)",
            "viewers",
        )),
        sold_count: AtomicU64::new(0),
        first_sold_us: AtomicU64::new(UNSET),
        last_sold_us: AtomicU64::new(0),
        last_success_us: AtomicU64::new(0),
        per_user: (0..users).map(|_| AtomicU32::new(0)).collect(),
    });

    // The viewers.
    let (stop_tx, stop_rx) = watch::channel(false);
    let connect = {
        let (target, room, minter) = (target.clone(), room.clone(), minter.clone());
        move |i: u32| {
            let (target, room, minter) = (target.clone(), room.clone(), minter.clone());
            async move {
                let token = minter.mint(&format!("lt-s{i}"), "viewer")?;
                viewer_socket::connect(
                    &target,
                    &room,
                    &token,
                    Some(audience::source_ip(i, source_ips)),
                )
                .await
            }
        }
    };
    let body = {
        let (sale, stop) = (sale.clone(), stop_rx.clone());
        move |i: u32, socket: ViewerSocket| viewer(i, socket, sale.clone(), stop.clone())
    };
    let fleet = Fleet::connect(args.viewers, args.connect_concurrency, connect, body).await;
    println!(
        "{} of {} viewers connected in {:.2} s",
        fleet.connected,
        args.viewers,
        fleet.wall.as_secs_f64()
    );

    // The HTTP claimers: connections open and tokens minted before the drop.
    let (go_tx, go_rx) = watch::channel(false);
    let auths: Arc<Vec<Authorization>> = Arc::new(
        (0..args.claimers)
            .map(|j| Authorization::bearer(&minter.mint(&format!("lt-c{j}"), "viewer")?))
            .collect::<anyhow::Result<_>>()?,
    );
    let next_claimer = Arc::new(AtomicU32::new(0));
    let deadline_cell = Arc::new(Mutex::new(Instant::now() + Duration::from_secs(3600)));
    let mut http_workers = Vec::new();
    for _ in 0..args.http_concurrency.min(args.claimers.max(1)) {
        if args.claimers == 0 {
            break;
        }
        http_workers.push(tokio::spawn(http_claimer(
            target.clone(),
            sale.clone(),
            auths.clone(),
            next_claimer.clone(),
            args.viewers as usize,
            go_rx.clone(),
            deadline_cell.clone(),
        )));
    }

    // The chatter, from a little before the drop until the rush is over.
    let chatter_socket = ws::connect(&target, &room, &minter.mint("lt-chat", "viewer")?, None)
        .await
        .context("chatter")?;
    let (chat_stop_tx, chat_stop_rx) = watch::channel(false);
    let chatter = {
        let (sale, stop, rate) = (sale.clone(), chat_stop_rx, args.chat_rate);
        let limit = Duration::from_secs_f64(args.lead_in.max(0.0) + args.timeout + 5.0);
        tokio::spawn(async move {
            audience::publish(chatter_socket, &sale.probe, rate, limit, stop).await
        })
    };
    tokio::time::sleep(Duration::from_secs_f64(args.lead_in.max(0.0))).await;

    // The drop.
    let timeout = Duration::from_secs_f64(args.timeout);
    let progress = Progress::start(
        "sale",
        Some(timeout),
        sale.answered.clone(),
        args.common.quiet,
    );
    let hold = (args.timeout as u64 + 300).min(86_400);
    let spec = DropSpec {
        id: Some(drop_id.clone()),
        stock: args.stock,
        per_user_limit: args.per_user_limit,
        hold_secs: hold,
        group: None,
    };
    let drop_start = Instant::now();
    sale.drop_at_us
        .store(sale.probe.now_us(), Ordering::Release);
    sale.probe.mark();
    let created = host.create_drop(&room, &spec).await;
    let drop_request = drop_start.elapsed();
    let deadline = drop_start + timeout;
    if let Ok(mut d) = deadline_cell.lock() {
        *d = deadline;
    }
    let _ = go_tx.send(true);
    if let Err(e) = created {
        let _ = chat_stop_tx.send(true);
        let _ = stop_tx.send(true);
        return Err(e.context("creating the drop"));
    }

    // The rush: until every claim is answered and every viewer saw sold_out, or the timeout.
    let mut done_since: Option<Instant> = None;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if !sale.claims_done(args.claimers) {
            continue;
        }
        if sale.sold_count.load(Ordering::Relaxed) >= fleet.connected {
            break;
        }
        let since = *done_since.get_or_insert_with(Instant::now);
        if sale.sold_count.load(Ordering::Relaxed) == 0 && since.elapsed() > NOT_SOLD_OUT_GRACE {
            break; // stock left over: no sold_out is coming
        }
    }
    let elapsed = drop_start.elapsed();
    progress.finish();
    let _ = chat_stop_tx.send(true);
    let (chat_published, chat_errors) = match chatter.await {
        Ok(r) => r,
        Err(e) => (0, Counts::from([(format!("chatter task: {e}"), 1)])),
    };
    // Let the last chat messages reach every viewer before they stop.
    let chat_expected = chat_published * fleet.connected;
    let drain_end = Instant::now() + CHAT_DRAIN;
    while sale.probe.received() < chat_expected && Instant::now() < drain_end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    for w in http_workers {
        let _ = tokio::time::timeout(ANSWER_TIMEOUT, w).await;
    }
    let connect = fleet.summary(args.viewers, source_ips);
    fleet.join().await;

    // The invariant check.
    let mut all = Tally::new("all claim answers");
    let ws_tally = take(&sale.ws, "WebSocket claim answers");
    let http_tally = take(&sale.http, "HTTP claim answers");
    let (ws_stats, http_stats) = (ws_tally.stats(), http_tally.stats());
    let series = vec![
        ws_tally.series.clone(),
        http_tally.series.clone(),
        sale.probe.series(),
        sale.sold_series
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|_| Series::new("sold_out", "viewers")),
    ];
    all.merge(ws_tally);
    all.merge(http_tally);
    if all.unknown > 0 {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let levels = host.levels(&drop_id).await?;
    let ledger = host.ledger(&drop_id).await?;
    let per_user: Vec<u32> = sale
        .per_user
        .iter()
        .map(|n| n.load(Ordering::Relaxed))
        .collect();
    let verdict = invariant::check(
        &Seen {
            successes: all.ok,
            unknown: all.unknown,
            claim_ids: &all.claim_ids,
            per_user: &per_user,
            per_user_limit: args.per_user_limit,
        },
        levels,
        &ledger,
    );
    let passed = verdict.violations.is_empty();
    let secs = |us: u64| us as f64 / 1e6;
    let first_sold = sale.first_sold_us.load(Ordering::Relaxed);
    let sold_count = sale.sold_count.load(Ordering::Relaxed);
    let last_success = sale.last_success_us.load(Ordering::Relaxed);
    Ok(SaleSummary {
        scenario: "sale",
        target: args.common.target.clone(),
        room,
        drop: drop_id,
        connect,
        stock: args.stock,
        per_user_limit: args.per_user_limit,
        claim_fraction: args.claim_fraction,
        ws_buyers: sale.buyers_connected.load(Ordering::Relaxed),
        http_claimers: args.claimers,
        http_concurrency: args.http_concurrency,
        drop_request_ms: drop_request.as_secs_f64() * 1000.0,
        sold_out: levels.remaining == 0,
        first_sold_out_seen_s: (first_sold != UNSET).then(|| secs(first_sold)),
        last_success_s: (all.ok > 0).then(|| secs(last_success)),
        last_viewer_saw_sold_out_s: (sold_count > 0)
            .then(|| secs(sale.last_sold_us.load(Ordering::Relaxed))),
        viewers_saw_sold_out: sold_count,
        sold_out_seen: sale
            .sold_seen
            .lock()
            .map(|h| h.summary())
            .unwrap_or_default(),
        ws_claims: ws_stats,
        http_claims: http_stats,
        chat_rate: args.chat_rate,
        chat_published,
        chat_errors,
        chat_received: sale.probe.received(),
        chat_lost: chat_expected as i64 - sale.probe.received() as i64,
        chat_latency: sale.probe.latency(),
        chat_latency_rush: sale.probe.latency_since_mark(),
        resyncs: sale.probe.resyncs(),
        closed_by_server: sale.probe.closed(),
        elapsed_s: elapsed.as_secs_f64(),
        invariant: verdict,
        passed,
        series,
    })
}

fn take(t: &Mutex<Tally>, name: &str) -> Tally {
    t.lock()
        .map(|mut t| std::mem::replace(&mut *t, Tally::new(name)))
        .unwrap_or_else(|_| Tally::new(name))
}

/// What a frame says about `drop`: (live, sold out). A `resync` (the viewer fell behind)
/// carries the drops' state instead of the events it replaces.
fn drop_news(drop: &str, t: &str) -> (bool, bool) {
    if t.starts_with("{\"type\":\"drop_live\"") {
        let ours = serde_json::from_str::<DropState>(t).is_ok_and(|d| d.id == drop);
        (ours, false)
    } else if t.starts_with("{\"type\":\"sold_out\"") {
        (false, t.contains(&format!("\"drop\":\"{drop}\"")))
    } else if t.starts_with("{\"type\":\"resync\"") {
        serde_json::from_str::<SnapshotDrops>(t)
            .ok()
            .and_then(|s| s.drops.into_iter().find(|d| d.id == drop))
            .map_or((false, false), |d| (true, d.remaining == Some(0)))
    } else {
        (false, false)
    }
}

/// One viewer: a buyer claims once on `drop_live` (or a `resync` showing the drop), sent
/// right after the read that brought it; every viewer times its `sold_out` (or a `resync`
/// showing none left) and measures chat latency, until told to stop or closed by the server.
async fn viewer(
    i: u32,
    mut socket: ViewerSocket,
    sale: Arc<Sale>,
    mut stop: watch::Receiver<bool>,
) {
    let buyer = i < sale.buyers_below;
    if buyer {
        sale.buyers_connected.fetch_add(1, Ordering::AcqRel);
    }
    let mut batch = Vec::with_capacity(audience::BATCH);
    let mut tally = Tally::new("WebSocket claim answers");
    let key = sale.keys.key(u64::from(i));
    let mut claimed = false;
    let mut pending: Option<Instant> = None;
    let mut saw_sold = false;
    let answered = |tally: &mut Tally, from: Instant, outcome| {
        tally.answered(sale.probe.epoch(), from);
        sale.counted(tally, i as usize, outcome);
        sale.ws_done.fetch_add(1, Ordering::AcqRel);
    };
    loop {
        let mut saw_live = false;
        let open = socket
            .read_batch(&mut stop, &sale.probe, |t| {
                let (live, sold) = drop_news(&sale.drop, t);
                saw_live |= live;
                if sold && !saw_sold {
                    saw_sold = true;
                    sale.saw_sold_out();
                }
                if sale.probe.on_text(t, &mut batch) || live || sold {
                    return;
                }
                let (Some(r), Some(from)) = (ClaimResult::parse(t), pending) else {
                    return;
                };
                match r {
                    // An `error` frame while the claim is pending answers it (e.g. rate_limited).
                    Ok(r) if r.kind == "error" || r.key.as_deref() == Some(key.as_str()) => {
                        pending = None;
                        answered(&mut tally, from, r.outcome());
                    }
                    Ok(_) => {}
                    Err(_) => crate::report::bump(&mut tally.errors, "unparsable frame"),
                }
            })
            .await;
        if saw_live && buyer && !claimed {
            claimed = true;
            let from = Instant::now();
            sale.ws_sent.fetch_add(1, Ordering::Relaxed);
            tally.sent += 1;
            match socket.send_text(&claim_frame(&sale.drop, &key)).await {
                Ok(()) => pending = Some(from),
                Err(e) => {
                    tally.lost(&format!("ws send: {e}"));
                    sale.ws_done.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
        if !open {
            break;
        }
    }
    if pending.is_some() {
        tally.lost("no answer");
        sale.ws_done.fetch_add(1, Ordering::AcqRel);
    } else if buyer && !claimed {
        // Never saw drop_live: nothing to wait for.
        sale.ws_done.fetch_add(1, Ordering::AcqRel);
        crate::report::bump(&mut tally.errors, "drop_live not seen");
    }
    sale.probe.flush(&mut batch);
    if let Ok(mut shared) = sale.ws.lock() {
        shared.merge(tally);
    }
    socket.close().await;
}

/// One HTTP connection: opened before the drop, then one claim per claimer index taken from
/// `next`, until every claimer has claimed or the deadline passes.
async fn http_claimer(
    target: Target,
    sale: Arc<Sale>,
    auths: Arc<Vec<Authorization>>,
    next: Arc<AtomicU32>,
    first_user: usize,
    mut go: watch::Receiver<bool>,
    deadline: Arc<Mutex<Instant>>,
) {
    let mut client = HttpClient::new(target, ANSWER_TIMEOUT);
    // Warm the connection so the rush measures claims, not TCP handshakes.
    let _ = client.send(sale.http_warm_up.request()).await;
    while !*go.borrow() {
        if go.changed().await.is_err() {
            return;
        }
    }
    let deadline = deadline
        .lock()
        .map(|d| *d)
        .unwrap_or_else(|_| Instant::now());
    let mut t = Tally::new("HTTP claim answers");
    loop {
        let j = next.fetch_add(1, Ordering::Relaxed) as usize;
        let Some(auth) = auths.get(j) else { break };
        let user = first_user + j;
        if Instant::now() >= deadline {
            sale.http_done.fetch_add(1, Ordering::AcqRel);
            crate::report::bump(&mut t.errors, "not sent: timeout");
            continue;
        }
        let req = sale
            .http_claim
            .request()
            .auth(Some(auth))
            .key(&sale.keys, user as u64);
        let from = Instant::now();
        t.sent += 1;
        match client.send(req).await {
            Ok(a) => {
                t.answered(sale.probe.epoch(), from);
                sale.counted(&mut t, user, http_claim_outcome(&a));
            }
            Err(e) => t.lost(&short_error(&e)),
        }
        sale.http_done.fetch_add(1, Ordering::AcqRel);
    }
    if let Ok(mut shared) = sale.http.lock() {
        shared.merge(t);
    }
}

/// Prints the summary for people.
pub fn print(s: &SaleSummary) {
    let opt = |v: Option<f64>| {
        v.map(|x| format!("{:.3} s", x))
            .unwrap_or_else(|| "never".into())
    };
    println!("sale of drop {} in room {} at {}", s.drop, s.room, s.target);
    println!("  viewers {}", s.connect);
    println!(
        "  stock {}  per-user limit {}  WS buyers {} (fraction {})  HTTP claimers {} over {} connections",
        s.stock,
        s.per_user_limit,
        s.ws_buyers,
        s.claim_fraction,
        s.http_claimers,
        s.http_concurrency
    );
    println!(
        "  drop request {:.2} ms; sold out: {}; first sold_out seen {}; last success {}",
        s.drop_request_ms,
        if s.sold_out { "yes" } else { "NO" },
        opt(s.first_sold_out_seen_s),
        opt(s.last_success_s)
    );
    println!(
        "  sold_out seen by {}/{} viewers; last viewer {}; from the drop: {}",
        s.viewers_saw_sold_out,
        s.connect.connected,
        opt(s.last_viewer_saw_sold_out_s),
        s.sold_out_seen
    );
    println!("  WS claims:   {}", s.ws_claims);
    println!("  HTTP claims: {}", s.http_claims);
    println!(
        "  chat at {}/s: {} published (errors: {}), {} delivered (lost {}), latency {}",
        s.chat_rate,
        s.chat_published,
        format_counts(&s.chat_errors),
        s.chat_received,
        s.chat_lost,
        s.chat_latency
    );
    println!("      sent during the rush: {}", s.chat_latency_rush);
    println!(
        "  resyncs {}, closed by server: {}; rush took {:.2} s",
        s.resyncs,
        format_counts(&s.closed_by_server),
        s.elapsed_s
    );
    invariant::print(&s.invariant);
}
