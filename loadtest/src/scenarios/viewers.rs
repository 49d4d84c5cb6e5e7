//! The viewers scenario: N WebSocket viewers join one room (spread over several loopback
//! source addresses), then one publisher chats at a fixed rate with its send time embedded
//! in each message. Every viewer measures end-to-end latency (arrival − embedded send time)
//! into one shared histogram. Reports connect times, deliveries/s, latency percentiles,
//! frames lost, and — given the server's pid — its RSS before the viewers, with all of them
//! connected and idle (so RSS per idle viewer), and after the run.
//!
//! `--peer plain` drives a plain broadcast room instead (the Node.js `ws` reference in
//! `loadtest/peers/node-ws-room`): viewers open `ws://TARGET/` with no token and no welcome,
//! the publisher is one more socket whose chat frames the peer relays verbatim, and latency,
//! loss and RSS are measured exactly as for livedrop.
//!
//! Viewers read through `viewer_socket`'s lean reader, so the load generator, which shares
//! the CPU with the server, spends as little as it can per delivery it times.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::sync::watch;

use crate::api::HostApi;
use crate::audience::{self, ChatProbe, ConnectSummary, Fleet};
use crate::cli::{Peer, ViewersArgs};
use crate::http::Target;
use crate::progress::Progress;
use crate::report::{Counts, LatencySummary, format_counts};
use crate::rss::rss_kib;
use crate::series::Series;
use crate::tokens::Minter;
use crate::viewer_socket::{self, ViewerSocket};
use crate::ws;

/// Time given to the server to settle before the idle RSS is read.
const SETTLE: Duration = Duration::from_secs(1);

/// The run's summary, printed and written as JSON.
#[derive(Serialize)]
pub struct ViewersSummary {
    pub scenario: &'static str,
    pub target: String,
    /// `livedrop`, or `plain` for a plain broadcast peer (no livedrop protocol).
    pub peer: &'static str,
    pub room: String,
    #[serde(flatten)]
    pub connect: ConnectSummary,
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
    /// Per-second deliveries and latency, for `--report`.
    #[serde(skip)]
    pub series: Vec<Series>,
}

/// Runs the scenario.
pub async fn run(args: ViewersArgs) -> anyhow::Result<ViewersSummary> {
    let target = Target::parse(&args.common.target)?;
    if !(args.rate > 0.0 && args.rate <= 10_000.0) {
        bail!("--rate must be in (0, 10000] messages per second");
    }
    if !(args.duration > 0.0 && args.duration <= 600.0) {
        bail!("--duration must be in (0, 600] seconds");
    }
    if args.viewers == 0 || args.viewers > 250_000 {
        bail!("--viewers must be in 1..=250000");
    }
    let source_ips = audience::source_ip_count(args.viewers, args.source_ips);
    let run_id = audience::run_id();
    let plain = args.peer == Peer::Plain;
    let minter = match plain {
        true => None,
        false => Some(Arc::new(Minter::new(&args.common.jwt_secret)?)),
    };
    let room = args
        .room
        .clone()
        .unwrap_or_else(|| format!("lt-v-{run_id}"));
    if let Some(m) = &minter {
        let mut host = HostApi::new(target.clone(), &m.mint("lt-host", "host")?)?;
        host.ensure_room(&room).await?;
    }

    let rss_before = args.pid.and_then(rss_kib);
    let probe = Arc::new(ChatProbe::new(&run_id, Instant::now(), "chat deliveries"));

    // Connect phase.
    let (stop_tx, stop_rx) = watch::channel(false);
    let connect = {
        let (target, room, minter) = (target.clone(), room.clone(), minter.clone());
        move |i: u32| {
            let (target, room, minter) = (target.clone(), room.clone(), minter.clone());
            async move {
                let ip = Some(audience::source_ip(i, source_ips));
                match minter {
                    None => viewer_socket::connect_plain(&target, ip).await,
                    Some(m) => {
                        let token = m.mint(&format!("lt-v{i}"), "viewer")?;
                        viewer_socket::connect(&target, &room, &token, ip).await
                    }
                }
            }
        }
    };
    let body = {
        let (probe, stop) = (probe.clone(), stop_rx.clone());
        move |_i: u32, socket: ViewerSocket| viewer(socket, probe.clone(), stop.clone())
    };
    let fleet = Fleet::connect(args.viewers, args.connect_concurrency, connect, body).await;
    let connected = fleet.connected;
    println!(
        "{connected} of {} viewers connected in {:.2} s",
        args.viewers,
        fleet.wall.as_secs_f64()
    );
    tokio::time::sleep(SETTLE).await;
    let rss_idle = args.pid.and_then(rss_kib);

    // Publish phase.
    let publisher = match &minter {
        None => ws::connect_plain(&target, None).await,
        Some(m) => ws::connect(&target, &room, &m.mint("lt-pub", "viewer")?, None).await,
    }
    .context("publisher")?;
    let duration = Duration::from_secs_f64(args.duration);
    let progress = Progress::start(
        "viewers",
        Some(duration),
        probe.received_counter(),
        args.common.quiet,
    );
    let publish_start_us = probe.now_us();
    let (published, publish_errors) =
        audience::publish(publisher, &probe, args.rate, duration, stop_rx.clone()).await;
    let expected = published * connected;
    let drain_end = Instant::now() + Duration::from_secs_f64(args.drain.max(0.0));
    while probe.received() < expected && Instant::now() < drain_end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    progress.finish();
    let rss_after = args.pid.and_then(rss_kib);

    let _ = stop_tx.send(true);
    let connect_summary = fleet.summary(args.viewers, source_ips);
    fleet.join().await;

    let received = probe.received();
    let span_us = probe
        .last_arrival_us()
        .saturating_sub(publish_start_us)
        .max(1);
    let rss_per = match (rss_before, rss_idle) {
        (Some(b), Some(i)) if connected > 0 => {
            Some((i as f64 - b as f64) * 1024.0 / connected as f64)
        }
        _ => None,
    };
    Ok(ViewersSummary {
        scenario: "viewers",
        target: args.common.target.clone(),
        peer: if plain { "plain" } else { "livedrop" },
        room: if plain { "/".into() } else { room },
        connect: connect_summary,
        rate: args.rate,
        duration_s: args.duration,
        published,
        publish_errors,
        expected_deliveries: expected,
        received,
        lost: expected as i64 - received as i64,
        deliveries_per_s: received as f64 / (span_us as f64 / 1e6),
        resyncs: probe.resyncs(),
        closed_by_server: probe.closed(),
        latency: probe.latency(),
        rss_before_kib: rss_before,
        rss_idle_kib: rss_idle,
        rss_after_kib: rss_after,
        rss_per_idle_viewer_bytes: rss_per,
        series: vec![probe.series()],
    })
}

/// One viewer: counts this run's chat frames (also those recovered through a `resync`)
/// and records their latency, until told to stop or closed by the server.
async fn viewer(mut socket: ViewerSocket, probe: Arc<ChatProbe>, mut stop: watch::Receiver<bool>) {
    let mut batch = Vec::with_capacity(audience::BATCH);
    while socket
        .read_batch(&mut stop, &probe, |t| {
            probe.on_text(t, &mut batch);
        })
        .await
    {}
    probe.flush(&mut batch);
    socket.close().await;
}

/// Prints the summary for people.
pub fn print(s: &ViewersSummary) {
    println!("viewers in room {} at {} ({})", s.room, s.target, s.peer);
    println!("  {}", s.connect);
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
            s.connect.connected,
            i as f64 / 1024.0,
            s.rss_after_kib
                .map(|a| format!("{:.1} MiB", a as f64 / 1024.0))
                .unwrap_or_else(|| "?".into()),
            s.rss_per_idle_viewer_bytes.unwrap_or(0.0)
        );
    }
}
