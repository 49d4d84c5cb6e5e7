//! The claims scenario: a host sets up a room and a drop, then many viewers claim it over
//! keep-alive HTTP connections or pipelined WebSockets, at full speed or at a constant
//! open-loop rate (latency measured from each request's intended send time, so a stalled
//! server cannot hide its stall by slowing the client down). The run ends with the
//! invariant check (`crate::invariant`); `--endpoint healthz` measures the HTTP stack alone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use crate::api::{DropSpec, HostApi};
use crate::audience;
use crate::cli::{ClaimsArgs, Endpoint, Transport};
use crate::http::{Authorization, HttpClient, IdempotencyKeys, Method, RequestTemplate, Target};
use crate::invariant::{self, Seen, Verdict};
use crate::progress::Progress;
use crate::report::{Counts, LatencySummary, bump, format_counts, merge_counts};
use crate::series::Series;
use crate::tally::{
    CLAIM_BODY, ClaimResult, Outcome, Tally, claim_frame, http_claim_outcome, short_error,
};
use crate::tokens::Minter;
use crate::ws;

/// Longest wait for one answer before it counts as lost.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Claims in flight per socket in rate mode (open loop, but still bounded).
const RATE_MODE_DEPTH: usize = 1024;
/// Longest run a count-bounded run may take.
const MAX_RUN: Duration = Duration::from_secs(600);
/// WebSocket handshakes at once while connecting.
const CONNECT_CONCURRENCY: usize = 64;

/// The whole run's summary, printed and written as JSON.
#[derive(Serialize)]
pub struct ClaimsSummary {
    pub scenario: &'static str,
    pub transport: &'static str,
    pub endpoint: &'static str,
    pub target: String,
    pub drop: Option<String>,
    pub users: u32,
    pub stock: u64,
    pub per_user_limit: u64,
    pub concurrency: u32,
    pub pipeline: Option<u32>,
    pub rate: Option<f64>,
    pub elapsed_s: f64,
    pub sent: u64,
    pub answered: u64,
    pub answers_per_s: f64,
    pub successes: u64,
    pub answers_by_code: Counts,
    pub errors: Counts,
    pub unanswered: u64,
    pub latency_from: &'static str,
    pub latency: LatencySummary,
    pub invariant: Option<Verdict>,
    pub passed: bool,
    /// Per-second answers and latency, for `--report`.
    #[serde(skip)]
    pub series: Vec<Series>,
}

/// What every worker shares: the schedule, the users, and the counters.
struct Plan {
    target: Target,
    endpoint: Endpoint,
    /// The HTTP request every worker sends: a claim, or `GET /healthz`.
    request: RequestTemplate,
    drop: String,
    /// Every claim's idempotency key is `k{run}-` and the claim's index.
    keys: IdempotencyKeys,
    users: u32,
    start: Instant,
    deadline: Instant,
    limit: u64,
    rate: Option<f64>,
    next: AtomicU64,
    answered: Arc<AtomicU64>,
    per_user: Vec<AtomicU32>,
}

impl Plan {
    /// The next request's index and intended send time (rate mode), or `None` when the run
    /// is over by count or by time.
    fn next(&self) -> Option<(u64, Option<Instant>)> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        if i >= self.limit {
            return None;
        }
        match self.rate {
            Some(r) => {
                let at = self.start + Duration::from_secs_f64(i as f64 / r);
                (at < self.deadline).then_some((i, Some(at)))
            }
            None => (Instant::now() < self.deadline).then_some((i, None)),
        }
    }

    fn user_of(&self, i: u64) -> usize {
        (i % u64::from(self.users)) as usize
    }
}

/// Counts an answer in the worker's tally, and a success in the plan's per-user counts.
fn counted(t: &mut Tally, plan: &Plan, user: usize, outcome: Outcome) {
    if t.outcome(outcome)
        && let Some(n) = plan.per_user.get(user)
    {
        n.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs the scenario; `passed` is false when an invariant broke.
pub async fn run(args: ClaimsArgs) -> anyhow::Result<ClaimsSummary> {
    let target = Target::parse(&args.common.target)?;
    if args.users == 0 || args.concurrency == 0 || args.pipeline == 0 {
        bail!("--users, --concurrency and --pipeline must be at least 1");
    }
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        bail!("--rate must be a positive number");
    }
    if args.endpoint == Endpoint::Healthz && args.transport != Transport::Http {
        bail!("--endpoint healthz is an HTTP route: use --transport http");
    }
    let duration = match (args.duration, args.requests) {
        (Some(d), _) if !(d > 0.0 && d <= MAX_RUN.as_secs_f64()) => {
            bail!("--duration must be in (0, 600] seconds")
        }
        (Some(d), _) => Some(Duration::from_secs_f64(d)),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(10)),
    };
    let minter = Minter::new(&args.common.jwt_secret)?;
    let run_id = audience::run_id();

    // Set-up as the host: a room and a drop that outlives the run.
    let mut host = HostApi::new(target.clone(), &minter.mint("lt-host", "host")?)?;
    let (drop, request) = match args.endpoint {
        Endpoint::Claim => {
            let room = args.room.clone().unwrap_or_else(|| format!("lt-{run_id}"));
            host.ensure_room(&room).await?;
            let hold = duration.unwrap_or(MAX_RUN).as_secs() + 300;
            let spec = DropSpec {
                id: None,
                stock: args.stock,
                per_user_limit: args.per_user_limit,
                hold_secs: hold.min(86_400),
                group: None,
            };
            let drop = host.create_drop(&room, &spec).await?;
            let path = format!("/api/drops/{drop}/claims");
            let claim = RequestTemplate::new(&target, Method::Post, &path, Some(CLAIM_BODY))?;
            (drop, claim)
        }
        Endpoint::Healthz => (
            String::new(),
            RequestTemplate::new(&target, Method::Get, "/healthz", None)?,
        ),
    };

    let users = match args.transport {
        Transport::Ws if args.users > args.concurrency => {
            eprintln!(
                "note: over WebSocket each socket is one user: {} of {} users take part",
                args.concurrency, args.users
            );
            args.concurrency
        }
        _ => args.users,
    };
    let tokens: Vec<String> = (0..users)
        .map(|u| minter.mint(&format!("lt-u{u}"), "viewer"))
        .collect::<anyhow::Result<_>>()?;

    // WebSockets connect before the clock starts: the run measures claims, not handshakes.
    let sockets = match args.transport {
        Transport::Ws => Some(connect_all(&target, &args, &drop, &tokens).await?),
        Transport::Http => None,
    };

    let start = Instant::now();
    let answered = Arc::new(AtomicU64::new(0));
    let plan = Arc::new(Plan {
        target: target.clone(),
        endpoint: args.endpoint,
        request,
        drop: drop.clone(),
        keys: IdempotencyKeys::new(&format!("k{run_id}-"))?,
        users,
        start,
        deadline: start + duration.unwrap_or(MAX_RUN),
        limit: args.requests.unwrap_or(u64::MAX),
        rate: args.rate,
        next: AtomicU64::new(0),
        answered: answered.clone(),
        per_user: (0..users).map(|_| AtomicU32::new(0)).collect(),
    });
    let label = match args.transport {
        Transport::Http => "claims/http",
        Transport::Ws => "claims/ws",
    };
    let progress = Progress::start(label, duration, answered.clone(), args.common.quiet);

    let mut handles = Vec::new();
    match sockets {
        None => {
            let auths: Arc<Vec<Authorization>> = Arc::new(
                tokens
                    .iter()
                    .map(|t| Authorization::bearer(t))
                    .collect::<anyhow::Result<_>>()?,
            );
            for _ in 0..args.concurrency {
                handles.push(tokio::spawn(http_worker(plan.clone(), auths.clone())));
            }
        }
        Some(sockets) => {
            let depth = match args.rate {
                Some(_) => RATE_MODE_DEPTH,
                None => args.pipeline as usize,
            };
            for (s, socket) in sockets.into_iter().enumerate() {
                handles.push(tokio::spawn(ws_worker(plan.clone(), s, socket, depth)));
            }
        }
    }
    let mut tally = Tally::new("claim answers");
    for h in handles {
        match h.await {
            Ok(t) => tally.merge(t),
            Err(e) => bump(&mut tally.errors, &format!("worker panicked: {e}")),
        }
    }
    let elapsed = start.elapsed();
    progress.finish();

    let verdict = match args.endpoint {
        Endpoint::Healthz => None,
        Endpoint::Claim => {
            if tally.unknown > 0 {
                // Let claims whose answers were lost finish on the server before reading.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let levels = host.levels(&drop).await?;
            let ledger = host.ledger(&drop).await?;
            let per_user: Vec<u32> = plan
                .per_user
                .iter()
                .map(|n| n.load(Ordering::Relaxed))
                .collect();
            let seen = Seen {
                successes: tally.ok,
                unknown: tally.unknown,
                claim_ids: &tally.claim_ids,
                per_user: &per_user,
                per_user_limit: args.per_user_limit,
            };
            Some(invariant::check(&seen, levels, &ledger))
        }
    };
    let answered_n = tally.latency.count();
    let passed = verdict.as_ref().is_none_or(|v| v.violations.is_empty());
    Ok(ClaimsSummary {
        scenario: "claims",
        transport: match args.transport {
            Transport::Http => "http",
            Transport::Ws => "ws",
        },
        endpoint: match args.endpoint {
            Endpoint::Claim => "claim",
            Endpoint::Healthz => "healthz",
        },
        target: args.common.target.clone(),
        drop: (!drop.is_empty()).then_some(drop),
        users,
        stock: args.stock,
        per_user_limit: args.per_user_limit,
        concurrency: args.concurrency,
        pipeline: (args.transport == Transport::Ws && args.rate.is_none()).then_some(args.pipeline),
        rate: args.rate,
        elapsed_s: elapsed.as_secs_f64(),
        sent: tally.sent,
        answered: answered_n,
        answers_per_s: answered_n as f64 / elapsed.as_secs_f64().max(1e-9),
        successes: tally.ok,
        answers_by_code: tally.codes,
        errors: tally.errors,
        unanswered: tally.unknown,
        latency_from: if args.rate.is_some() {
            "intended send time (open loop)"
        } else {
            "actual send time (closed loop)"
        },
        latency: tally.latency.summary(),
        invariant: verdict,
        passed,
        series: vec![tally.series],
    })
}

/// Prints the summary for people.
pub fn print(s: &ClaimsSummary) {
    println!(
        "claims over {} ({}) against {}{}",
        s.transport,
        s.endpoint,
        s.target,
        s.drop
            .as_deref()
            .map(|d| format!(", drop {d}"))
            .unwrap_or_default()
    );
    println!(
        "  users {}  stock {}  per-user limit {}  concurrency {}{}{}",
        s.users,
        s.stock,
        s.per_user_limit,
        s.concurrency,
        s.pipeline
            .map(|p| format!("  pipeline {p}"))
            .unwrap_or_default(),
        s.rate.map(|r| format!("  rate {r}/s")).unwrap_or_default()
    );
    println!(
        "  {} sent, {} answered in {:.2} s: {:.0} answers/s, {} successes",
        s.sent, s.answered, s.elapsed_s, s.answers_per_s, s.successes
    );
    println!("  answers: {}", format_counts(&s.answers_by_code));
    println!(
        "  errors:  {} (unanswered {})",
        format_counts(&s.errors),
        s.unanswered
    );
    println!("  latency from {}: {}", s.latency_from, s.latency);
    if let Some(v) = &s.invariant {
        invariant::print(v);
    }
}

/// One keep-alive HTTP connection sending requests one after another.
async fn http_worker(plan: Arc<Plan>, auths: Arc<Vec<Authorization>>) -> Tally {
    let mut t = Tally::new("claim answers");
    let mut client = HttpClient::new(plan.target.clone(), ANSWER_TIMEOUT);
    while let Some((i, intended)) = plan.next() {
        if let Some(at) = intended {
            tokio::time::sleep_until(at.into()).await;
        }
        let user = plan.user_of(i);
        let req = match plan.endpoint {
            Endpoint::Healthz => plan.request.request(),
            Endpoint::Claim => plan
                .request
                .request()
                .auth(auths.get(user))
                .key(&plan.keys, i),
        };
        let from = intended.unwrap_or_else(Instant::now);
        t.sent += 1;
        let answer = client.send(req).await;
        plan.answered.fetch_add(1, Ordering::Relaxed);
        match answer {
            Ok(a) => {
                t.answered(plan.start, from);
                match (plan.endpoint, a.status) {
                    (Endpoint::Healthz, 200) => t.ok(),
                    (Endpoint::Healthz, status) => t.refused(&format!("http_{status}")),
                    (Endpoint::Claim, _) => counted(&mut t, &plan, user, http_claim_outcome(&a)),
                }
            }
            Err(e) => t.lost(&short_error(&e)),
        }
    }
    t
}

/// Opens every socket (each as its own user) before the run starts.
async fn connect_all(
    target: &Target,
    args: &ClaimsArgs,
    drop: &str,
    tokens: &[String],
) -> anyhow::Result<Vec<ws::Socket>> {
    // The drop's room: sockets join the room the drop was created in.
    let room = args.room.clone();
    let room = match room {
        Some(r) => r,
        None => room_of_drop(target, drop).await?,
    };
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = Vec::new();
    for s in 0..args.concurrency as usize {
        let token = tokens[s % tokens.len()].clone();
        let (target, room, gate) = (target.clone(), room.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            ws::connect(&target, &room, &token, None).await
        }));
    }
    let mut sockets = Vec::new();
    for (s, t) in tasks.into_iter().enumerate() {
        let socket = t
            .await
            .context("connect task")?
            .with_context(|| format!("socket {s}"))?;
        sockets.push(socket);
    }
    Ok(sockets)
}

async fn room_of_drop(target: &Target, drop: &str) -> anyhow::Result<String> {
    #[derive(Deserialize)]
    struct DropRoom {
        room: String,
    }
    let mut c = HttpClient::new(target.clone(), ANSWER_TIMEOUT);
    let req = RequestTemplate::new(target, Method::Get, &format!("/api/drops/{drop}"), None)?;
    let a = c.send(req.request()).await?;
    let d: DropRoom = serde_json::from_slice(a.body).context("drop answer")?;
    Ok(d.room)
}

/// One socket: a writer sending claims while permits allow, a reader matching answers to
/// requests by key.
async fn ws_worker(plan: Arc<Plan>, s: usize, socket: ws::Socket, depth: usize) -> Tally {
    let user = s % plan.users as usize;
    let (mut sink, mut stream) = socket.split();
    let inflight: Mutex<HashMap<u64, Instant>> = Mutex::new(HashMap::new());
    let permits = Semaphore::new(depth);
    let writing_done = AtomicBool::new(false);

    let writer = async {
        let mut sent = 0u64;
        let mut errors = Counts::new();
        while let Some((i, intended)) = plan.next() {
            match permits.acquire().await {
                Ok(p) => p.forget(),
                Err(_) => break, // the reader stopped: the socket is gone
            }
            if let Some(at) = intended {
                tokio::time::sleep_until(at.into()).await;
            }
            let frame = claim_frame(&plan.drop, &plan.keys.key(i));
            let from = intended.unwrap_or_else(Instant::now);
            if let Ok(mut m) = inflight.lock() {
                m.insert(i, from);
            }
            if let Err(e) = sink.send(Message::text(frame)).await {
                bump(&mut errors, &format!("ws send: {e}"));
                break;
            }
            sent += 1;
        }
        writing_done.store(true, Ordering::Release);
        (sent, errors, sink)
    };

    let reader = async {
        let mut t = Tally::new("claim answers");
        let mut drain_until: Option<Instant> = None;
        loop {
            let pending = inflight.lock().map(|m| m.len()).unwrap_or(0);
            let wait = if writing_done.load(Ordering::Acquire) {
                if pending == 0 {
                    break;
                }
                let until = *drain_until.get_or_insert_with(|| Instant::now() + ANSWER_TIMEOUT);
                match until.checked_duration_since(Instant::now()) {
                    Some(d) => d,
                    None => break,
                }
            } else {
                Duration::from_millis(50)
            };
            let frame = match tokio::time::timeout(wait, stream.next()).await {
                Err(_) => continue,
                Ok(None) => {
                    bump(&mut t.errors, "ws closed");
                    break;
                }
                Ok(Some(Err(e))) => {
                    bump(&mut t.errors, &format!("ws: {e}"));
                    break;
                }
                Ok(Some(Ok(Message::Text(text)))) => text,
                Ok(Some(Ok(Message::Close(c)))) => {
                    bump(&mut t.errors, &format!("ws closed by server: {c:?}"));
                    break;
                }
                Ok(Some(Ok(_))) => continue,
            };
            let r = match ClaimResult::parse(frame.as_str()) {
                None => continue, // stock, purchase, sold_out, presence…: not ours to count
                Some(Ok(r)) => r,
                Some(Err(_)) => {
                    bump(&mut t.errors, "unparsable frame");
                    continue;
                }
            };
            if r.kind == "error" {
                bump(
                    &mut t.codes,
                    &format!("error_frame:{}", r.code.unwrap_or_default()),
                );
                continue;
            }
            let index = r.key.as_deref().and_then(|k| plan.keys.number_of(k));
            let from = index.and_then(|i| inflight.lock().ok().and_then(|mut m| m.remove(&i)));
            let Some(from) = from else {
                bump(&mut t.errors, "answer with unknown key");
                continue;
            };
            permits.add_permits(1);
            plan.answered.fetch_add(1, Ordering::Relaxed);
            t.answered(plan.start, from);
            counted(&mut t, &plan, user, r.outcome());
        }
        permits.close();
        t
    };

    let ((sent, write_errors, mut sink), mut t) = tokio::join!(writer, reader);
    t.sent = sent;
    merge_counts(&mut t.errors, &write_errors);
    let lost = inflight.lock().map(|m| m.len()).unwrap_or(0) as u64;
    if lost > 0 {
        t.unknown += lost;
        *t.errors.entry("no answer".into()).or_insert(0) += lost;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
    t
}
