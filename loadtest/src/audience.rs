//! What the scenarios with many WebSocket viewers share (`viewers`, `sale`): connecting a
//! fleet of viewers spread over loopback source addresses with bounded handshakes in flight;
//! the chat probe — a publisher that embeds its send time in each message, and the viewers'
//! side that turns arrivals into end-to-end latency (also for messages recovered through a
//! `resync`), recognising the run's chat frames by their bytes, without a JSON parse; and the
//! bookkeeping of sockets the server closed.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::report::{Counts, Latency, LatencySummary, bump, format_counts, merge_counts};
use crate::series::Series;
use crate::ws::Socket;

/// Longest the connect phase may take.
const CONNECT_PHASE_LIMIT: Duration = Duration::from_secs(180);
/// Latencies a viewer batches before taking the shared histogram's lock.
pub const BATCH: usize = 256;

/// The `i`-th viewer's source address, round robin over 127.0.0.1 ..= 127.0.0.`count`.
pub fn source_ip(i: u32, count: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, (1 + i % count.max(1)) as u8))
}

/// Source addresses to use: `requested`, or one per 10 000 viewers when 0.
pub fn source_ip_count(viewers: u32, requested: u32) -> u32 {
    match requested {
        0 => viewers.div_ceil(10_000).max(1),
        n => n.min(254),
    }
}

/// A run-unique id for rooms and markers.
pub fn run_id() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{:x}{:x}", ms % 0xffff_ffff, std::process::id() % 0xfff)
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

/// How every chat frame starts, from livedrop and from a plain peer alike.
const CHAT_FRAME: &str = "{\"type\":\"chat\"";
/// How a `resync` frame starts.
const RESYNC_FRAME: &str = "{\"type\":\"resync\"";

/// The chat latency probe every viewer task shares.
pub struct ChatProbe {
    /// Every timestamp is microseconds since this instant.
    epoch: Instant,
    /// `lt RUN `: marks the run's messages.
    marker: String,
    /// `,"text":"lt RUN `: where one of the run's messages starts in a chat frame. Inside a
    /// JSON string every `"` is escaped, so these bytes only occur as the frame's `text` key
    /// (never the first key: that is `type`) followed by a text that starts with the marker.
    text_with_marker: String,
    received: Arc<AtomicU64>,
    last_arrival_us: AtomicU64,
    resyncs: AtomicU64,
    latency: Mutex<Latency>,
    /// Messages sent at or after `mark_us` are also recorded in `since_mark`.
    mark_us: AtomicU64,
    since_mark: Mutex<Latency>,
    series: Mutex<Series>,
    closed: Mutex<Counts>,
}

impl ChatProbe {
    /// A probe whose clock starts at `epoch`; `series` names the per-second chart.
    pub fn new(run_id: &str, epoch: Instant, series: &str) -> Self {
        Self {
            epoch,
            marker: format!("lt {run_id} "),
            text_with_marker: format!(",\"text\":\"lt {run_id} "),
            received: Arc::new(AtomicU64::new(0)),
            last_arrival_us: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            latency: Mutex::new(Latency::new()),
            mark_us: AtomicU64::new(u64::MAX),
            since_mark: Mutex::new(Latency::new()),
            series: Mutex::new(Series::new(series, "deliveries")),
            closed: Mutex::new(Counts::new()),
        }
    }

    /// The instant every timestamp counts from (second 0 of the series).
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    /// Microseconds since the probe's epoch.
    pub fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// The embedded send time of a chat text that is one of this run's messages.
    fn sent_at(&self, text: &str) -> Option<u64> {
        send_time(text.strip_prefix(self.marker.as_str())?)
    }

    /// The embedded send time of a chat frame (as the server sent it, not parsed) that
    /// carries one of this run's messages. The text ends at the first `"`: an escape before
    /// it (a `\`) makes it no message of this run, as it does for `sent_at`.
    fn frame_sent_at(&self, frame: &str) -> Option<u64> {
        let (_, text_from_index) = frame.split_once(self.text_with_marker.as_str())?;
        let (index_and_time, _) = text_from_index.split_once('"')?;
        send_time(index_and_time)
    }

    /// The `n`-th chat frame, stamped with the current time.
    pub fn frame(&self, n: u64) -> String {
        format!(
            "{{\"type\":\"chat\",\"text\":\"{}{n} {}\"}}",
            self.marker,
            self.now_us()
        )
    }

    /// Records the arrival, now, of a message sent at `sent` (µs).
    fn arrived(&self, sent: Option<u64>, batch: &mut Vec<(u64, u64)>) {
        if let Some(sent) = sent {
            let now = self.now_us();
            batch.push((now, now.saturating_sub(sent)));
            self.received.fetch_add(1, Ordering::Relaxed);
            if batch.len() >= BATCH {
                self.flush(batch);
            }
        }
    }

    /// Handles a `chat` or `resync` frame (true), or leaves the frame to the caller (false).
    /// A chat frame is read by its bytes; only the rare `resync` is parsed as JSON.
    pub fn on_text(&self, t: &str, batch: &mut Vec<(u64, u64)>) -> bool {
        if t.starts_with(CHAT_FRAME) {
            self.arrived(self.frame_sent_at(t), batch);
            true
        } else if t.starts_with(RESYNC_FRAME) {
            self.resyncs.fetch_add(1, Ordering::Relaxed);
            if let Ok(r) = serde_json::from_str::<ResyncChat>(t) {
                for c in &r.chat {
                    self.arrived(self.sent_at(&c.text), batch);
                }
            }
            true
        } else {
            false
        }
    }

    /// Moves a viewer's batch of `(arrival µs, latency µs)` into the shared histograms.
    pub fn flush(&self, batch: &mut Vec<(u64, u64)>) {
        let Some(last_arrival) = batch.iter().map(|(at, _)| *at).max() else {
            return;
        };
        // Here rather than per arrival: one contended write per batch, not per frame.
        self.last_arrival_us
            .fetch_max(last_arrival, Ordering::Relaxed);
        if let Ok(mut h) = self.latency.lock() {
            for (_, us) in batch.iter() {
                h.record_micros(*us);
            }
        }
        let mark = self.mark_us.load(Ordering::Relaxed);
        if batch.iter().any(|(at, us)| at - us >= mark)
            && let Ok(mut h) = self.since_mark.lock()
        {
            for (_, us) in batch.iter().filter(|(at, us)| at - us >= mark) {
                h.record_micros(*us);
            }
        }
        if let Ok(mut s) = self.series.lock() {
            for (at, us) in batch.iter() {
                s.record(*at, *us);
            }
        }
        batch.clear();
    }

    /// From now on, messages sent are also counted in `latency_since_mark` (e.g. the rush).
    pub fn mark(&self) {
        self.mark_us.store(self.now_us(), Ordering::Relaxed);
    }

    /// End-to-end latency of the messages sent since `mark`.
    pub fn latency_since_mark(&self) -> LatencySummary {
        self.since_mark
            .lock()
            .map(|h| h.summary())
            .unwrap_or_default()
    }

    /// Counts why a viewer's socket ended.
    pub fn note_close(&self, why: &str) {
        if let Ok(mut m) = self.closed.lock() {
            bump(&mut m, why);
        }
    }

    /// Chat frames of this run received so far, by all viewers.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// The shared arrival counter (for the progress bar).
    pub fn received_counter(&self) -> Arc<AtomicU64> {
        self.received.clone()
    }

    /// µs (since the epoch) of the last arrival flushed so far (all of them, once the
    /// viewers have stopped).
    pub fn last_arrival_us(&self) -> u64 {
        self.last_arrival_us.load(Ordering::Relaxed)
    }

    /// `resync` frames received.
    pub fn resyncs(&self) -> u64 {
        self.resyncs.load(Ordering::Relaxed)
    }

    /// End-to-end latency of every arrival.
    pub fn latency(&self) -> LatencySummary {
        self.latency.lock().map(|h| h.summary()).unwrap_or_default()
    }

    /// Deliveries and their latency per second.
    pub fn series(&self) -> Series {
        self.series
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|_| Series::new("chat", "deliveries"))
    }

    /// Why sockets ended, by count.
    pub fn closed(&self) -> Counts {
        self.closed.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

/// The send time in `N µs` — a message's index and send time, both decimal, as the
/// publisher writes them after the marker; `None` for anything else.
fn send_time(index_and_time: &str) -> Option<u64> {
    let (index, micros) = index_and_time.split_once(' ')?;
    let decimal = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if decimal(index) && decimal(micros) {
        micros.parse().ok()
    } else {
        None
    }
}

/// Sends `rate` chat messages a second until `duration` passes or `stop` fires, each
/// carrying its send time; reads the publisher's own socket meanwhile so it never lags,
/// counting refusals (`error` frames). Returns the messages accepted and the errors.
pub async fn publish(
    socket: Socket,
    probe: &ChatProbe,
    rate: f64,
    duration: Duration,
    mut stop: watch::Receiver<bool>,
) -> (u64, Counts) {
    let (mut sink, mut stream) = socket.split();
    let start = Instant::now();
    let end = start + duration;
    let (done_tx, done_rx) = watch::channel(false);
    let writer = async {
        let mut n = 0u64;
        let mut errors = Counts::new();
        loop {
            let at = start + Duration::from_secs_f64(n as f64 / rate);
            if at >= end || *stop.borrow() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(at.into()) => {}
                _ = stop.changed() => break,
            }
            if let Err(e) = sink.send(Message::text(probe.frame(n))).await {
                bump(&mut errors, &format!("send: {e}"));
                break;
            }
            n += 1;
        }
        let _ = done_tx.send(true);
        (n, errors, sink)
    };
    let reader = async {
        let mut errors = Counts::new();
        let mut done = done_rx;
        // Until a second after the writer's end, so late refusals are counted too. The
        // writer may end while a message is being handled here: its end is read at the top
        // of every turn, not only when the select happens to be waiting for it.
        let mut until = end + Duration::from_secs(1);
        let mut writer_done = false;
        loop {
            if !writer_done && *done.borrow_and_update() {
                writer_done = true;
                until = until.min(Instant::now() + Duration::from_secs(1));
            }
            let m = tokio::select! {
                r = tokio::time::timeout_at(until.into(), stream.next()) => match r {
                    Ok(Some(m)) => m,
                    _ => break,
                },
                c = done.changed(), if !writer_done => {
                    // A dropped sender: the writer is gone, and so is its deadline.
                    if c.is_err() {
                        writer_done = true;
                        until = until.min(Instant::now() + Duration::from_secs(1));
                    }
                    continue;
                }
            };
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

/// How the connect phase went, as summaries print and serialize it.
#[derive(Serialize, Debug, Clone)]
pub struct ConnectSummary {
    pub viewers: u32,
    pub connected: u64,
    pub connect_failures: Counts,
    pub source_ips: u32,
    pub connect_wall_s: f64,
    pub connect_latency: LatencySummary,
}

impl std::fmt::Display for ConnectSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "connected {}/{} from {} source address(es) in {:.2} s; connect {}",
            self.connected,
            self.viewers,
            self.source_ips,
            self.connect_wall_s,
            self.connect_latency
        )?;
        if !self.connect_failures.is_empty() {
            write!(
                f,
                "\n  connect failures: {}",
                format_counts(&self.connect_failures)
            )?;
        }
        Ok(())
    }
}

/// A connected fleet of viewers, each running its own task on its own socket.
pub struct Fleet {
    pub connected: u64,
    pub failures: Counts,
    pub wall: Duration,
    pub connect_latency: LatencySummary,
    tasks: Vec<JoinHandle<()>>,
}

impl Fleet {
    /// Connects `n` viewers, at most `concurrency` handshakes at once, within the connect
    /// phase limit. `connect(i)` opens viewer `i`'s socket (of any kind `S`); `body(i,
    /// socket)` then runs as that viewer until it returns.
    pub async fn connect<S, C, CF, B, BF>(n: u32, concurrency: u32, connect: C, body: B) -> Self
    where
        S: Send + 'static,
        C: Fn(u32) -> CF + Send + Sync + Clone + 'static,
        CF: Future<Output = anyhow::Result<S>> + Send,
        B: Fn(u32, S) -> BF + Send + Sync + Clone + 'static,
        BF: Future<Output = ()> + Send,
    {
        let (conn_tx, mut conn_rx) = mpsc::channel::<Result<Duration, String>>(1024);
        let gate = Arc::new(Semaphore::new(concurrency.max(1) as usize));
        let start = Instant::now();
        let mut tasks = Vec::with_capacity(n as usize);
        for i in 0..n {
            let (gate, conn_tx, connect, body) =
                (gate.clone(), conn_tx.clone(), connect.clone(), body.clone());
            tasks.push(tokio::spawn(async move {
                let socket = {
                    let Ok(_permit) = gate.acquire_owned().await else {
                        return;
                    };
                    let t0 = Instant::now();
                    match connect(i).await {
                        Ok(s) => {
                            let _ = conn_tx.send(Ok(t0.elapsed())).await;
                            s
                        }
                        Err(e) => {
                            let _ = conn_tx.send(Err(format!("{e:#}"))).await;
                            return;
                        }
                    }
                };
                drop(conn_tx);
                body(i, socket).await;
            }));
        }
        drop(conn_tx);
        let mut connected = 0u64;
        let mut failures = Counts::new();
        let mut latency = Latency::new();
        let phase_end = start + CONNECT_PHASE_LIMIT;
        while connected + failures.values().sum::<u64>() < u64::from(n) {
            match tokio::time::timeout_at(phase_end.into(), conn_rx.recv()).await {
                Ok(Some(Ok(d))) => {
                    connected += 1;
                    latency.record(d);
                }
                Ok(Some(Err(e))) => {
                    let short: String = e.chars().take(80).collect();
                    bump(&mut failures, &short);
                }
                Ok(None) => break,
                Err(_) => {
                    bump(&mut failures, "connect phase timed out");
                    break;
                }
            }
        }
        Self {
            connected,
            failures,
            wall: start.elapsed(),
            connect_latency: latency.summary(),
            tasks,
        }
    }

    /// The connect phase's figures, for `viewers` asked for from `source_ips` addresses.
    pub fn summary(&self, viewers: u32, source_ips: u32) -> ConnectSummary {
        ConnectSummary {
            viewers,
            connected: self.connected,
            connect_failures: self.failures.clone(),
            source_ips,
            connect_wall_s: self.wall.as_secs_f64(),
            connect_latency: self.connect_latency,
        }
    }

    /// Waits (bounded) for every viewer task after the viewers were told to stop.
    pub async fn join(self) {
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_times_its_own_messages_only() {
        let probe = ChatProbe::new("r1", Instant::now(), "chat");
        let frame = probe.frame(0);
        let text: serde_json::Value = serde_json::from_str(&frame).unwrap_or_default();
        let text = text["text"].as_str().unwrap_or_default().to_string();
        let chat = format!(r#"{{"type":"chat","seq":1,"text":"{text}"}}"#);
        let other = r#"{"type":"chat","seq":2,"text":"hello"}"#;
        let resync = format!(r#"{{"type":"resync","chat":[{{"text":"{text}"}}],"drops":[]}}"#);
        let mut batch = Vec::new();
        assert!(probe.on_text(&chat, &mut batch));
        assert!(probe.on_text(other, &mut batch));
        assert!(probe.on_text(&resync, &mut batch));
        assert!(!probe.on_text(r#"{"type":"stock"}"#, &mut batch));
        probe.flush(&mut batch);
        assert_eq!(probe.received(), 2);
        assert_eq!(probe.resyncs(), 1);
        assert_eq!(probe.latency().count, 2);
        // Sent before the mark: not in the rush figure.
        probe.mark();
        assert_eq!(probe.latency_since_mark().count, 0);
        let later: serde_json::Value = serde_json::from_str(&probe.frame(1)).unwrap_or_default();
        let later = later["text"].as_str().unwrap_or_default().to_string();
        probe.on_text(
            &format!(r#"{{"type":"chat","text":"{later}"}}"#),
            &mut batch,
        );
        probe.flush(&mut batch);
        assert_eq!(probe.latency_since_mark().count, 1);
        assert_eq!(probe.latency().count, 3);
    }

    #[test]
    fn chat_frames_are_recognised_by_their_bytes_exactly() {
        let probe = ChatProbe::new("1a2b", Instant::now(), "chat");
        let count = |frame: &str| {
            let before = probe.received();
            let mut batch = Vec::new();
            assert!(probe.on_text(frame, &mut batch), "{frame}");
            probe.flush(&mut batch);
            probe.received() - before
        };
        // As livedrop relays it, and as a plain peer relays the publisher's frame.
        assert_eq!(
            count(
                r#"{"type":"chat","seq":12,"id":"c12","user":{"id":"lt-pub","role":"viewer"},"name":"lt-pub","text":"lt 1a2b 17 1234567","ts":1700000000000}"#
            ),
            1
        );
        assert_eq!(count(r#"{"type":"chat","text":"lt 1a2b 17 1234567"}"#), 1);
        assert_eq!(count(&probe.frame(3)), 1);
        // The marker elsewhere than at the start of the text, or in another field.
        assert_eq!(
            count(r#"{"type":"chat","text":"hi lt 1a2b 17 1234567"}"#),
            0
        );
        assert_eq!(
            count(r#"{"type":"chat","name":"lt 1a2b 1 2","text":"lt 1a2b 17 1234567"}"#),
            1
        );
        assert_eq!(
            count(r#"{"type":"chat","name":"x\",\"text\":\"lt 1a2b 1 2","text":"hello"}"#),
            0
        );
        // A text quoting one of the run's messages is not one, nor counted twice.
        assert_eq!(
            count(r#"{"type":"chat","text":"lt 1a2b 1 2 said \"text\":\"lt 1a2b 3 4\""}"#),
            0
        );
        assert_eq!(
            count(r#"{"type":"chat","text":"see \"text\":\"lt 1a2b 3 4\""}"#),
            0
        );
        // Anything but `N µs` after the marker, another run's marker, an escape.
        for text in [
            "lt 1a2b 17",
            "lt 1a2b 17 ",
            "lt 1a2b  1234567",
            "lt 1a2b 17 +1234567",
            "lt 1a2b 17 1234567 more",
            "lt 1a2b 17 99999999999999999999999",
            "lt 1a2b0 17 1234567",
            "lt 1a2 17 1234567",
            r"lt 1a2b 17 1234567\u0020",
            r#"lt 1a2b 17 1234567\""#,
        ] {
            assert_eq!(
                count(&format!(r#"{{"type":"chat","text":"{text}"}}"#)),
                0,
                "{text}"
            );
            let resync = format!(r#"{{"type":"resync","chat":[{{"text":"{text}"}}]}}"#);
            assert_eq!(count(&resync), 0, "{text}");
        }
        assert_eq!(probe.received(), 4);
    }

    #[test]
    fn source_addresses_round_robin() {
        assert_eq!(source_ip_count(5_000, 0), 1);
        assert_eq!(source_ip_count(25_000, 0), 3);
        assert_eq!(source_ip_count(10, 400), 254);
        assert_eq!(source_ip(0, 3).to_string(), "127.0.0.1");
        assert_eq!(source_ip(4, 3).to_string(), "127.0.0.2");
    }

    /// A publisher stopped while its reader is busy (here: every message echoed back at
    /// once) ends within a second or so, never at its full duration: the writer's end was
    /// once missed when it came while the reader handled a message.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_publisher_ends_even_while_its_reader_is_busy() -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let target = crate::http::Target::parse(&format!("http://{}", listener.local_addr()?))?;
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                        return;
                    };
                    while let Some(Ok(m)) = ws.next().await {
                        if m.is_text() && ws.send(m).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let probe = ChatProbe::new("r1", Instant::now(), "chat");
        for _ in 0..5 {
            let socket = crate::ws::connect_plain(&target, None).await?;
            let (stop_tx, stop_rx) = watch::channel(false);
            let stopper = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = stop_tx.send(true);
                stop_tx
            });
            // Far shorter than the 60 s the publisher was given: it must not run to the end.
            let run = publish(socket, &probe, 2000.0, Duration::from_secs(60), stop_rx);
            let (sent, errors) = tokio::time::timeout(Duration::from_secs(20), run).await?;
            assert!(sent > 0, "{errors:?}");
            drop(stopper.await?);
        }
        Ok(())
    }
}
