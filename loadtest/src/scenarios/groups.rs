//! The groups scenario: many group buys (拼团) filling at once. The host creates a
//! `kind: group` drop (`group_size` K, `group_price`, `group_window_secs`); G leaders open a
//! group each (`POST /api/drops/{drop}/groups` → 201 `{group_id, size, members, status,
//! expires_at}`); then members join (`POST /api/groups/{group}/join` with an
//! `Idempotency-Key`; 201, or 409 problem+json `group_full` / `group_closed` /
//! `already_member` / `sold_out` / `limit_reached`), interleaved across groups so that all of
//! them fill at the same time, K − 1 + `--extra-joiners` distinct members per group (the
//! extras race for full groups). Measures groups completed/s, open and join latency, answers
//! by code. Invariant check: `remaining + reserved + sold == total` and no oversell from
//! `GET /api/drops/{drop}`, completed groups × K ≤ sold, no answer showing a group with more
//! members than its size, and no group with more successful joins than K − 1.
//!
//! Opens and joins carry no body (as `docs/protocol.md` says); answers the tool does not
//! recognise are counted by status, not fatal.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde::{Deserialize, Serialize};

use crate::api::{DropSpec, GroupSpec, HostApi, Levels};
use crate::audience;
use crate::cli::GroupsArgs;
use crate::http::{
    Answer, Authorization, HttpClient, IdempotencyKeys, Method, RequestTemplate, Target,
};
use crate::invariant;
use crate::progress::Progress;
use crate::series::Series;
use crate::tally::{Tally, TallyStats, problem_code, short_error};
use crate::tokens::Minter;

/// Longest wait for one answer before it counts as lost.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The run's summary, printed and written as JSON.
#[derive(Serialize)]
pub struct GroupsSummary {
    pub scenario: &'static str,
    pub target: String,
    pub room: String,
    pub drop: String,
    pub groups: u32,
    pub group_size: u64,
    pub extra_joiners: u32,
    pub stock: u64,
    pub concurrency: u32,
    pub opened: u64,
    pub open: TallyStats,
    pub join: TallyStats,
    pub groups_completed: u64,
    /// Seconds from the first join sent to the last completing answer.
    pub join_phase_s: f64,
    pub groups_completed_per_s: f64,
    /// Most members any answer showed for one group.
    pub max_members_seen: u64,
    pub levels: Option<Levels>,
    pub violations: Vec<String>,
    pub passed: bool,
    /// Per-second charts, for `--report`.
    #[serde(skip)]
    pub series: Vec<Series>,
}

/// A group as the server shows it (fields the check reads; the rest is ignored).
#[derive(Deserialize)]
struct GroupAnswer {
    group_id: String,
    #[serde(default)]
    members: serde_json::Value,
    #[serde(default)]
    status: String,
}

impl GroupAnswer {
    /// `members` as a count, whether the server sends a number or a list.
    fn member_count(&self) -> u64 {
        match &self.members {
            serde_json::Value::Number(n) => n.as_u64().unwrap_or(0),
            serde_json::Value::Array(a) => a.len() as u64,
            _ => 0,
        }
    }
}

/// One request of a phase: who sends it where.
struct Job {
    /// `POST` to the open or join path, without a body.
    request: RequestTemplate,
    user: usize,
    /// The group's index.
    group: usize,
}

/// What the workers share during one phase.
struct Phase {
    jobs: Vec<Job>,
    next: AtomicUsize,
    start: Instant,
    deadline: Instant,
    answered: Arc<AtomicU64>,
    /// Group id per group index, filled by the open phase.
    group_ids: Mutex<Vec<Option<String>>>,
    /// Successful joins per group index.
    joins: Vec<AtomicU64>,
    completed: Mutex<HashSet<String>>,
    completions: Mutex<Series>,
    last_completion_us: AtomicU64,
    max_members: AtomicU64,
}

/// Runs the scenario; `passed` is false when an invariant broke.
pub async fn run(args: GroupsArgs) -> anyhow::Result<GroupsSummary> {
    let target = Target::parse(&args.common.target)?;
    if args.groups == 0 || args.groups > 100_000 {
        bail!("--groups must be in 1..=100000");
    }
    if !(2..=100).contains(&args.group_size) {
        bail!("--group-size must be in 2..=100");
    }
    if args.concurrency == 0 || args.extra_joiners > 100 {
        bail!("--concurrency must be at least 1 and --extra-joiners at most 100");
    }
    if !(args.timeout > 0.0 && args.timeout <= 600.0) {
        bail!("--timeout must be in (0, 600] seconds");
    }
    let k = args.group_size;
    let g = args.groups as usize;
    let stock = args.stock.unwrap_or(u64::from(args.groups) * k);
    let minter = Minter::new(&args.common.jwt_secret)?;
    let run_id = audience::run_id();
    let room = args
        .room
        .clone()
        .unwrap_or_else(|| format!("lt-g-{run_id}"));
    let mut host = HostApi::new(target.clone(), &minter.mint("lt-host", "host")?)?;
    host.ensure_room(&room).await?;
    let spec = DropSpec {
        id: Some(format!("lt-group-{run_id}")),
        stock,
        per_user_limit: 1,
        hold_secs: 300,
        group: Some(GroupSpec {
            size: k,
            price: args.group_price,
            window_secs: args.window_secs,
        }),
    };
    let drop = host.create_drop(&room, &spec).await?;

    // Users: leader of group i is user i; joiner m of group i is user g + m * g + i.
    let per_group = (k - 1) as usize + args.extra_joiners as usize;
    let users = g + per_group * g;
    let auths: Arc<Vec<Authorization>> = Arc::new(
        (0..users)
            .map(|u| Authorization::bearer(&minter.mint(&format!("lt-g{run_id}-{u}"), "viewer")?))
            .collect::<anyhow::Result<_>>()?,
    );
    // Every open and join is keyed `g{run}-{user}`.
    let keys = Arc::new(IdempotencyKeys::new(&format!("g{run_id}-"))?);
    let post = |path: &str| RequestTemplate::new(&target, Method::Post, path, None);
    let answered = Arc::new(AtomicU64::new(0));
    let timeout = Duration::from_secs_f64(args.timeout);
    let progress = Progress::start("groups", Some(timeout), answered.clone(), args.common.quiet);
    let start = Instant::now();
    let deadline = start + timeout;
    let new_phase = |jobs: Vec<Job>| Phase {
        jobs,
        next: AtomicUsize::new(0),
        start,
        deadline,
        answered: answered.clone(),
        group_ids: Mutex::new(vec![None; g]),
        joins: (0..g).map(|_| AtomicU64::new(0)).collect(),
        completed: Mutex::new(HashSet::new()),
        completions: Mutex::new(Series::new("groups completed", "groups")),
        last_completion_us: AtomicU64::new(0),
        max_members: AtomicU64::new(0),
    };

    // Phase 1: every leader opens a group.
    let open_path = format!("/api/drops/{drop}/groups");
    let opens = Arc::new(new_phase(
        (0..g)
            .map(|i| {
                Ok(Job {
                    request: post(&open_path)?,
                    user: i,
                    group: i,
                })
            })
            .collect::<anyhow::Result<_>>()?,
    ));
    let open = run_phase(
        &target,
        &opens,
        &auths,
        &keys,
        "group opens",
        args.concurrency,
    )
    .await;
    let group_ids: Vec<Option<String>> = opens
        .group_ids
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default();

    // Phase 2: members join, round robin over the groups so they all fill at once.
    let mut jobs = Vec::with_capacity(per_group * g);
    for m in 0..per_group {
        for (i, id) in group_ids.iter().enumerate() {
            if let Some(id) = id {
                jobs.push(Job {
                    request: post(&format!("/api/groups/{id}/join"))?,
                    user: g + m * g + i,
                    group: i,
                });
            }
        }
    }
    let joins = Arc::new(new_phase(jobs));
    let join_start = start.elapsed();
    let join = run_phase(
        &target,
        &joins,
        &auths,
        &keys,
        "group joins",
        args.concurrency,
    )
    .await;
    progress.finish();

    // The check.
    let completed = joins.completed.lock().map(|c| c.len() as u64).unwrap_or(0);
    let max_members = opens
        .max_members
        .load(Ordering::Relaxed)
        .max(joins.max_members.load(Ordering::Relaxed));
    let mut violations = Vec::new();
    let levels = match host.levels(&drop).await {
        Ok(l) => {
            violations.extend(invariant::check_levels(&l));
            if completed * k > l.sold {
                violations.push(format!(
                    "completed groups {completed} × size {k} = {} > sold {}",
                    completed * k,
                    l.sold
                ));
            }
            Some(l)
        }
        Err(e) => {
            violations.push(format!("could not read the drop's counters: {e:#}"));
            None
        }
    };
    if max_members > k {
        violations.push(format!(
            "an answer showed a group with {max_members} members > size {k}"
        ));
    }
    if let Some((i, n)) = joins
        .joins
        .iter()
        .map(|n| n.load(Ordering::Relaxed))
        .enumerate()
        .find(|(_, n)| *n > k - 1)
    {
        violations.push(format!(
            "group {i} accepted {n} joins, more than size {k} − 1 (the leader is the first member)"
        ));
    }
    let join_phase = joins
        .last_completion_us
        .load(Ordering::Relaxed)
        .saturating_sub(join_start.as_micros() as u64) as f64
        / 1e6;
    let passed = violations.is_empty();
    let completions = joins
        .completions
        .lock()
        .map(|s| s.clone())
        .unwrap_or_else(|_| Series::new("groups completed", "groups"));
    Ok(GroupsSummary {
        scenario: "groups",
        target: args.common.target.clone(),
        room,
        drop,
        groups: args.groups,
        group_size: k,
        extra_joiners: args.extra_joiners,
        stock,
        concurrency: args.concurrency,
        opened: open.ok,
        open: open.stats(),
        join: join.stats(),
        groups_completed: completed,
        join_phase_s: join_phase,
        groups_completed_per_s: if join_phase > 0.0 {
            completed as f64 / join_phase
        } else {
            0.0
        },
        max_members_seen: max_members,
        levels,
        violations,
        passed,
        series: vec![open.series, join.series, completions],
    })
}

/// Runs one phase's jobs over `concurrency` keep-alive connections; returns the tally.
async fn run_phase(
    target: &Target,
    phase: &Arc<Phase>,
    auths: &Arc<Vec<Authorization>>,
    keys: &Arc<IdempotencyKeys>,
    name: &str,
    concurrency: u32,
) -> Tally {
    let mut handles = Vec::new();
    for _ in 0..concurrency.min(phase.jobs.len().max(1) as u32) {
        let (target, phase) = (target.clone(), phase.clone());
        let (auths, keys, name) = (auths.clone(), keys.clone(), name.to_string());
        handles.push(tokio::spawn(async move {
            worker(target, phase, auths, keys, name).await
        }));
    }
    let mut tally = Tally::new(name);
    for h in handles {
        match h.await {
            Ok(t) => tally.merge(t),
            Err(e) => tally.lost(&format!("worker panicked: {e}")),
        }
    }
    tally
}

/// One connection working through the phase's jobs.
async fn worker(
    target: Target,
    phase: Arc<Phase>,
    auths: Arc<Vec<Authorization>>,
    keys: Arc<IdempotencyKeys>,
    name: String,
) -> Tally {
    let mut t = Tally::new(&name);
    let mut client = HttpClient::new(target, ANSWER_TIMEOUT);
    loop {
        let n = phase.next.fetch_add(1, Ordering::Relaxed);
        let Some(job) = phase.jobs.get(n) else { break };
        if Instant::now() >= phase.deadline {
            crate::report::bump(&mut t.errors, "not sent: timeout");
            continue;
        }
        let req = job
            .request
            .request()
            .auth(auths.get(job.user))
            .key(&keys, job.user as u64);
        let from = Instant::now();
        t.sent += 1;
        let answer = client.send(req).await;
        phase.answered.fetch_add(1, Ordering::Relaxed);
        match answer {
            Ok(a) => {
                t.answered(phase.start, from);
                on_answer(&phase, &mut t, job, &a);
            }
            Err(e) => t.lost(&short_error(&e)),
        }
    }
    t
}

/// Counts one answer: a 201 group (recording its id, size and completion) or a refusal.
fn on_answer(phase: &Phase, t: &mut Tally, job: &Job, a: &Answer<'_>) {
    if a.status != 201 {
        t.refused(&problem_code(a));
        return;
    }
    let Ok(group) = serde_json::from_slice::<GroupAnswer>(a.body) else {
        t.refused("201 without a group");
        return;
    };
    t.ok();
    phase
        .max_members
        .fetch_max(group.member_count(), Ordering::Relaxed);
    if let Ok(mut ids) = phase.group_ids.lock()
        && let Some(slot) = ids.get_mut(job.group)
        && slot.is_none()
    {
        *slot = Some(group.group_id.clone());
    }
    if let Some(n) = phase.joins.get(job.group) {
        n.fetch_add(1, Ordering::Relaxed);
    }
    if group.status == "completed" {
        let fresh = phase
            .completed
            .lock()
            .map(|mut c| c.insert(group.group_id.clone()))
            .unwrap_or(false);
        if fresh {
            let now = phase.start.elapsed().as_micros() as u64;
            phase.last_completion_us.fetch_max(now, Ordering::Relaxed);
            if let Ok(mut s) = phase.completions.lock() {
                s.count(now);
            }
        }
    }
}

/// Prints the summary for people.
pub fn print(s: &GroupsSummary) {
    println!(
        "groups on drop {} in room {} at {}",
        s.drop, s.room, s.target
    );
    println!(
        "  {} groups of {} (+{} extra joiners each), stock {}, {} connections",
        s.groups, s.group_size, s.extra_joiners, s.stock, s.concurrency
    );
    println!("  opens: {}", s.open);
    println!("  joins: {}", s.join);
    println!(
        "  {} groups completed in {:.3} s of joining: {:.1} groups/s; most members seen {}",
        s.groups_completed, s.join_phase_s, s.groups_completed_per_s, s.max_members_seen
    );
    if let Some(l) = &s.levels {
        println!(
            "  drop: total {} remaining {} reserved {} sold {}",
            l.total, l.remaining, l.reserved, l.sold
        );
    }
    invariant::print_violations(&s.violations);
}
