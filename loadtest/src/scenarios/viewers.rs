//! The viewers scenario: N WebSocket viewers join one room (spread over several loopback
//! source addresses), then one publisher chats at a fixed rate with its send time embedded
//! in each message. Every viewer measures end-to-end latency (arrival − embedded send time)
//! into one shared histogram. Reports connect times, deliveries/s, latency percentiles,
//! frames lost, and — given the server's pid — its RSS before the viewers, with all of them
//! connected and idle (so RSS per idle viewer), and after the run.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::api::HostApi;
use crate::cli::ViewersArgs;
use crate::http::Target;
use crate::progress::Progress;
use crate::report::{Counts, Latency, LatencySummary, bump, format_counts, merge_counts};
use crate::rss::rss_kib;
use crate::tokens::Minter;
use crate::ws;

/// Longest the connect phase may take.
const CONNECT_PHASE_LIMIT: Duration = Duration::from_secs(180);
/// Time given to the server to settle before the idle RSS is read.
const SETTLE: Duration = Duration::from_secs(1);
/// Latencies a viewer batches before taking the shared histogram's lock.
const BATCH: usize = 256;

#[derive(Serialize)]
pub struct ViewersSummary {
    pub scenario: &'static str,
    pub target: String,
    pub room: String,
    pub viewers: u32,
    pub connected: u64,
    pub connect_failures: Counts,
    pub source_ips: u32,
    pub connect_wall_s: f64,
    pub connect_latency: LatencySummary,
    pub rate: f64,
    pub duration_s: f64,
    pub published: u64,
    pub publish_errors: Counts,
    pub expected_deliveries: u64,
    pub received: u64,
    pub lost: i64,
    pub deliveries_per_s: f64,
    pub resyncs: u64,
    pub closed_by_server: Counts,
    pub latency: LatencySummary,
    pub rss_before_kib: Option<u64>,
    pub rss_idle_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    pub rss_per_idle_viewer_bytes: Option<f64>,
}

/// What the viewer tasks share.
struct Shared {
    /// Every timestamp is microseconds since this instant.
    epoch: Instant,
    /// `lt RUN `: marks the run's messages.
    marker: String,
    received: AtomicU64,
    last_arrival_us: AtomicU64,
    resyncs: AtomicU64,
    latency: Mutex<Latency>,
    connect_latency: Mutex<Latency>,
    closed: Mutex<Counts>,
}

impl Shared {
    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// The embedded send time of one of this run's messages.
    fn sent_at(&self, text: &str) -> Option<u64> {
        let rest = text.strip_prefix(self.marker.as_str())?;
        let (_n, us) = rest.split_once(' ')?;
        us.parse().ok()
    }

    fn flush(&self, batch: &mut Vec<u64>) {
        if batch.is_empty() {
            return;
        }
        if let Ok(mut h) = self.latency.lock() {
            for us in batch.iter() {
                h.record_micros(*us);
            }
        }
        batch.clear();
    }
}

#[derive(Deserialize)]
struct ChatText {
    text: String,
}

#[derive(Deserialize)]
struct ResyncChat {
    chat: Vec<ChatText>,
}

#[derive(Deserialize)]
struct ErrorFrame {
    code: String,
}

fn source_ip(i: u32, count: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, (1 + i % count) as u8))
}

pub async fn run(args: ViewersArgs) -> anyhow::Result<ViewersSummary> {
    let target = Target::parse(&args.common.target)?;
    if !(args.rate > 0.0 && args.rate <= 10_000.0) {
        bail!("--rate must be in (0, 10000] messages per second");
    }
    if !(args.duration > 0.0 && args.duration <= 600.0) {
        bail!("--duration must be in (0, 600] seconds");
    }
    if args.viewers == 0 || args.viewers > 60_000 {
        bail!("--viewers must be in 1..=60000");
    }
    let source_ips = match args.source_ips {
        0 => args.viewers.div_ceil(10_000),
        n => n.min(254),
    };
    let minter = Minter::new(&args.common.jwt_secret)?;
    let run_id = format!("{:x}", std::process::id());
    let room = args.room.clone().unwrap_or_else(|| {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() % 0xffff_ffff)
            .unwrap_or(0);
        format!("lt-v-{ms:x}")
    });
    let mut host = HostApi::new(target.clone(), &minter.mint("lt-host", "host")?)?;
    host.ensure_room(&room).await?;

    let rss_before = args.pid.and_then(rss_kib);
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        marker: format!("lt {run_id} "),
        received: AtomicU64::new(0),
        last_arrival_us: AtomicU64::new(0),
        resyncs: AtomicU64::new(0),
        latency: Mutex::new(Latency::new()),
        connect_latency: Mutex::new(Latency::new()),
        closed: Mutex::new(Counts::new()),
    });

    // Connect phase.
    let (stop_tx, stop_rx) = watch::channel(false);
    let (conn_tx, mut conn_rx) = tokio::sync::mpsc::channel::<Result<(), String>>(1024);
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1) as usize));
    let connect_start = Instant::now();
    let mut tasks = Vec::with_capacity(args.viewers as usize);
    for i in 0..args.viewers {
        let token = minter.mint(&format!("lt-v{i}"), "viewer")?;
        let (target, room, gate, shared) =
            (target.clone(), room.clone(), gate.clone(), shared.clone());
        let (conn_tx, stop) = (conn_tx.clone(), stop_rx.clone());
        let ip = source_ip(i, source_ips);
        tasks.push(tokio::spawn(async move {
            let socket = {
                let Ok(_permit) = gate.acquire_owned().await else {
                    return;
                };
                let t0 = Instant::now();
                match ws::connect(&target, &room, &token, Some(ip)).await {
                    Ok(s) => {
                        if let Ok(mut h) = shared.connect_latency.lock() {
                            h.record(t0.elapsed());
                        }
                        s
                    }
                    Err(e) => {
                        let _ = conn_tx.send(Err(format!("{e:#}"))).await;
                        return;
                    }
                }
            };
            let _ = conn_tx.send(Ok(())).await;
            drop(conn_tx);
            viewer(socket, shared, stop).await;
        }));
    }
    drop(conn_tx);
    let mut connected = 0u64;
    let mut connect_failures = Counts::new();
    let phase_end = connect_start + CONNECT_PHASE_LIMIT;
    while connected + connect_failures.values().sum::<u64>() < u64::from(args.viewers) {
        match tokio::time::timeout_at(phase_end.into(), conn_rx.recv()).await {
            Ok(Some(Ok(()))) => connected += 1,
            Ok(Some(Err(e))) => {
                let short: String = e.chars().take(80).collect();
                bump(&mut connect_failures, &short);
            }
            Ok(None) => break,
            Err(_) => {
                bump(&mut connect_failures, "connect phase timed out");
                break;
            }
        }
    }
    let connect_wall = connect_start.elapsed();
    println!(
        "{connected} of {} viewers connected in {:.2} s",
        args.viewers,
        connect_wall.as_secs_f64()
    );
    tokio::time::sleep(SETTLE).await;
    let rss_idle = args.pid.and_then(rss_kib);

    // Publish phase.
    let pub_token = minter.mint("lt-pub", "viewer")?;
    let publisher = ws::connect(&target, &room, &pub_token, None)
        .await
        .context("publisher")?;
    let duration = Duration::from_secs_f64(args.duration);
    let progress = Progress::start(
        "viewers",
        Some(duration),
        Arc::new(AtomicU64::new(0)),
        args.common.quiet,
    );
    let publish_start_us = shared.now_us();
    let (published, publish_errors) = publish(publisher, &shared, args.rate, duration).await;
    let expected = published * connected;
    let drain_end = Instant::now() + Duration::from_secs_f64(args.drain.max(0.0));
    while shared.received.load(Ordering::Relaxed) < expected && Instant::now() < drain_end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    progress.finish();
    let rss_after = args.pid.and_then(rss_kib);

    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }

    let received = shared.received.load(Ordering::Relaxed);
    let span_us = shared
        .last_arrival_us
        .load(Ordering::Relaxed)
        .saturating_sub(publish_start_us)
        .max(1);
    let latency = shared
        .latency
        .lock()
        .map(|h| h.summary())
        .unwrap_or_default();
    let connect_latency = shared
        .connect_latency
        .lock()
        .map(|h| h.summary())
        .unwrap_or_default();
    let closed = shared.closed.lock().map(|c| c.clone()).unwrap_or_default();
    let rss_per = match (rss_before, rss_idle) {
        (Some(b), Some(i)) if connected > 0 => {
            Some((i as f64 - b as f64) * 1024.0 / connected as f64)
        }
        _ => None,
    };
    Ok(ViewersSummary {
        scenario: "viewers",
        target: args.common.target.clone(),
        room,
        viewers: args.viewers,
        connected,
        connect_failures,
        source_ips,
        connect_wall_s: connect_wall.as_secs_f64(),
        connect_latency,
        rate: args.rate,
        duration_s: args.duration,
        published,
        publish_errors,
        expected_deliveries: expected,
        received,
        lost: expected as i64 - received as i64,
        deliveries_per_s: received as f64 / (span_us as f64 / 1e6),
        resyncs: shared.resyncs.load(Ordering::Relaxed),
        closed_by_server: closed,
        latency,
        rss_before_kib: rss_before,
        rss_idle_kib: rss_idle,
        rss_after_kib: rss_after,
        rss_per_idle_viewer_bytes: rss_per,
    })
}

/// Sends `rate` chat messages a second for `duration`, each carrying its send time; reads
/// the publisher's own socket meanwhile so it never lags, counting refusals.
async fn publish(
    socket: ws::Socket,
    shared: &Shared,
    rate: f64,
    duration: Duration,
) -> (u64, Counts) {
    let (mut sink, mut stream) = socket.split();
    let start = Instant::now();
    let end = start + duration;
    let writer = async {
        let mut n = 0u64;
        let mut errors = Counts::new();
        loop {
            let at = start + Duration::from_secs_f64(n as f64 / rate);
            if at >= end {
                break;
            }
            tokio::time::sleep_until(at.into()).await;
            let frame = format!(
                "{{\"type\":\"chat\",\"text\":\"{}{n} {}\"}}",
                shared.marker,
                shared.now_us()
            );
            if let Err(e) = sink.send(Message::text(frame)).await {
                bump(&mut errors, &format!("send: {e}"));
                break;
            }
            n += 1;
        }
        (n, errors, sink)
    };
    let reader = async {
        let mut errors = Counts::new();
        // Until a little after the writer's end, so late refusals are counted too.
        let until = end + Duration::from_secs(1);
        while let Ok(Some(m)) = tokio::time::timeout_at(until.into(), stream.next()).await {
            match m {
                Ok(Message::Text(t)) if t.as_str().starts_with("{\"type\":\"error\"") => {
                    match serde_json::from_str::<ErrorFrame>(t.as_str()) {
                        Ok(e) => bump(&mut errors, &e.code),
                        Err(_) => bump(&mut errors, "error frame"),
                    }
                }
                Ok(Message::Close(_)) | Err(_) => {
                    bump(&mut errors, "publisher socket closed");
                    break;
                }
                _ => {}
            }
        }
        errors
    };
    let ((sent, mut errors, mut sink), refused) = tokio::join!(writer, reader);
    let refusals: u64 = refused
        .iter()
        .filter(|(k, _)| k.as_str() != "publisher socket closed")
        .map(|(_, v)| *v)
        .sum();
    merge_counts(&mut errors, &refused);
    let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
    (sent.saturating_sub(refusals), errors)
}

/// One viewer: counts this run's chat frames (also those recovered through a `resync`)
/// and records their latency, until told to stop or closed by the server.
async fn viewer(socket: ws::Socket, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let (mut sink, mut stream) = socket.split();
    let mut batch = Vec::with_capacity(BATCH);
    let arrived = |shared: &Shared, text: &str, batch: &mut Vec<u64>| {
        if let Some(sent) = shared.sent_at(text) {
            let now = shared.now_us();
            batch.push(now.saturating_sub(sent));
            shared.received.fetch_add(1, Ordering::Relaxed);
            shared.last_arrival_us.fetch_max(now, Ordering::Relaxed);
            if batch.len() >= BATCH {
                shared.flush(batch);
            }
        }
    };
    loop {
        let next = tokio::select! {
            _ = stop.changed() => break,
            m = stream.next() => m,
        };
        match next {
            Some(Ok(Message::Text(t))) => {
                let t = t.as_str();
                if t.starts_with("{\"type\":\"chat\"") {
                    if let Ok(c) = serde_json::from_str::<ChatText>(t) {
                        arrived(&shared, &c.text, &mut batch);
                    }
                } else if t.starts_with("{\"type\":\"resync\"") {
                    shared.resyncs.fetch_add(1, Ordering::Relaxed);
                    if let Ok(r) = serde_json::from_str::<ResyncChat>(t) {
                        for c in &r.chat {
                            arrived(&shared, &c.text, &mut batch);
                        }
                    }
                }
            }
            Some(Ok(Message::Close(c))) => {
                let code = c.map(|f| u16::from(f.code).to_string()).unwrap_or_default();
                if let Ok(mut m) = shared.closed.lock() {
                    bump(&mut m, &format!("close {code}"));
                }
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                if let Ok(mut m) = shared.closed.lock() {
                    bump(&mut m, &format!("error: {e}"));
                }
                break;
            }
            None => {
                if let Ok(mut m) = shared.closed.lock() {
                    bump(&mut m, "eof");
                }
                break;
            }
        }
    }
    shared.flush(&mut batch);
    let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
}

/// Prints the summary for people.
pub fn print(s: &ViewersSummary) {
    println!("viewers in room {} at {}", s.room, s.target);
    println!(
        "  connected {}/{} from {} source address(es) in {:.2} s; connect {}",
        s.connected, s.viewers, s.source_ips, s.connect_wall_s, s.connect_latency
    );
    if !s.connect_failures.is_empty() {
        println!("  connect failures: {}", format_counts(&s.connect_failures));
    }
    println!(
        "  published {} msgs at {}/s for {} s (publisher errors: {})",
        s.published,
        s.rate,
        s.duration_s,
        format_counts(&s.publish_errors)
    );
    println!(
        "  delivered {} of {} expected (lost {}), {:.0} deliveries/s, resyncs {}, closed by server: {}",
        s.received,
        s.expected_deliveries,
        s.lost,
        s.deliveries_per_s,
        s.resyncs,
        format_counts(&s.closed_by_server)
    );
    println!("  end-to-end latency: {}", s.latency);
    if let (Some(b), Some(i)) = (s.rss_before_kib, s.rss_idle_kib) {
        println!(
            "  server RSS: before {:.1} MiB, {} idle viewers {:.1} MiB, after run {}; per idle viewer {:.0} bytes",
            b as f64 / 1024.0,
            s.connected,
            i as f64 / 1024.0,
            s.rss_after_kib
                .map(|a| format!("{:.1} MiB", a as f64 / 1024.0))
                .unwrap_or_else(|| "?".into()),
            s.rss_per_idle_viewer_bytes.unwrap_or(0.0)
        );
    }
}
