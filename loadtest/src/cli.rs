//! The command line: one subcommand per scenario, each bounded by a duration and/or a count
//! so that every run stops by itself. Targets must be loopback addresses (checked when the
//! target is parsed, in `http::Target`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "livedrop-loadtest",
    version,
    about = "Load generator and invariant checker for livedrop (loopback targets only)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Subcommand, Debug)]
pub enum Scenario {
    /// Claims against one drop (or `/healthz` for reference), then the invariant check.
    Claims(ClaimsArgs),
    /// WebSocket viewers receiving chat: fan-out latency, deliveries/s, RSS per viewer.
    Viewers(ViewersArgs),
    /// A live sale: viewers in a room, a drop, a rush of claims (WS and HTTP), chat during
    /// it; time to sell out, claim latency, how fast viewers saw `sold_out`, invariant check.
    Sale(SaleArgs),
    /// Group buys filling at once: leaders open groups, members join; groups completed/s,
    /// join latency, answers by code, invariant check.
    Groups(GroupsArgs),
}

/// Settings every scenario shares.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Server base URL; only loopback hosts (127.0.0.0/8, ::1, localhost) are accepted.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub target: String,

    /// The server's --jwt-secret: the loadtest mints its own host and viewer tokens.
    /// Not needed with `viewers --peer plain`.
    #[arg(
        long,
        env = "LIVEDROP_JWT_SECRET",
        hide_env_values = true,
        default_value = ""
    )]
    pub jwt_secret: String,

    /// Write the summary as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Write a self-contained HTML report (per-second charts and the summary) to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,

    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// The kind of server the viewers scenario drives.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// livedrop: `/ws/rooms/{room}` with a token, `welcome` first, chat through the protocol.
    Livedrop,
    /// A plain broadcast room at `ws://TARGET/` (e.g. `loadtest/peers/node-ws-room`): no
    /// token, no welcome; every frame sent is relayed to every socket.
    Plain,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `POST /api/drops/{drop}/claims` over keep-alive HTTP/1.1 connections.
    Http,
    /// `claim` frames over WebSockets, several in flight per socket.
    Ws,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// The claim path (with the invariant check at the end).
    Claim,
    /// `GET /healthz`: the cost of the HTTP stack alone, for reference (HTTP only).
    Healthz,
}

#[derive(Args, Debug, Clone)]
pub struct ClaimsArgs {
    #[command(flatten)]
    pub common: Common,

    #[arg(long, value_enum, default_value_t = Transport::Http)]
    pub transport: Transport,

    #[arg(long, value_enum, default_value_t = Endpoint::Claim)]
    pub endpoint: Endpoint,

    /// Distinct viewer identities; request i is made by user i % users. Over WebSocket each
    /// socket is one user, so at most --concurrency users take part.
    #[arg(long, default_value_t = 1000)]
    pub users: u32,

    /// Stock of the drop the run creates (1..=10 000 000).
    #[arg(long, default_value_t = 1000)]
    pub stock: u64,

    /// Per-user limit of the drop (1..=1000); raise it to keep answers successes.
    #[arg(long, default_value_t = 1)]
    pub per_user_limit: u64,

    /// HTTP connections, or WebSocket sockets.
    #[arg(long, default_value_t = 32)]
    pub concurrency: u32,

    /// Claims in flight per WebSocket (max-speed mode).
    #[arg(long, default_value_t = 16)]
    pub pipeline: u32,

    /// Constant request rate (per second, all connections together), open loop: latency is
    /// measured from each request's intended send time. Absent: as fast as answers come.
    #[arg(long)]
    pub rate: Option<f64>,

    /// Seconds to keep sending (default 10 when --requests is absent too).
    #[arg(long)]
    pub duration: Option<f64>,

    /// Requests to send in all; the run ends at whichever of --duration and --requests
    /// comes first.
    #[arg(long)]
    pub requests: Option<u64>,

    /// Room to create the drop in (default: a fresh one per run).
    #[arg(long)]
    pub room: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct ViewersArgs {
    #[command(flatten)]
    pub common: Common,

    /// Room to join (created if missing; default: a fresh one per run).
    #[arg(long)]
    pub room: Option<String>,

    /// What `--target` is: livedrop, or a plain broadcast peer for reference.
    #[arg(long, value_enum, default_value_t = Peer::Livedrop)]
    pub peer: Peer,

    /// WebSocket viewers to connect.
    #[arg(long, default_value_t = 100)]
    pub viewers: u32,

    /// Chat messages per second from the one publisher.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,

    /// Seconds of publishing.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,

    /// Source addresses to spread viewers over (127.0.0.1 ..= 127.0.0.N); 0 picks one per
    /// 10 000 viewers. Each address has its own ephemeral port range.
    #[arg(long, default_value_t = 0)]
    pub source_ips: u32,

    /// WebSocket handshakes in progress at once while connecting.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: u32,

    /// The server's process id: report its RSS before and after the viewers connect.
    #[arg(long)]
    pub pid: Option<u32>,

    /// Seconds to wait after publishing for the last frames to arrive.
    #[arg(long, default_value_t = 3.0)]
    pub drain: f64,
}

#[derive(Args, Debug, Clone)]
pub struct SaleArgs {
    #[command(flatten)]
    pub common: Common,

    /// Room of the sale (created if missing; default: a fresh one per run).
    #[arg(long)]
    pub room: Option<String>,

    /// WebSocket viewers in the room.
    #[arg(long, default_value_t = 1000)]
    pub viewers: u32,

    /// Share of the viewers that claim (one `claim` frame each, on `drop_live`).
    #[arg(long, default_value_t = 1.0)]
    pub claim_fraction: f64,

    /// Extra HTTP claimers (distinct users, one claim each), started when the drop exists.
    #[arg(long, default_value_t = 0)]
    pub claimers: u32,

    /// Keep-alive HTTP connections the extra claimers share.
    #[arg(long, default_value_t = 64)]
    pub http_concurrency: u32,

    /// Stock of the drop.
    #[arg(long, default_value_t = 100)]
    pub stock: u64,

    /// Per-user limit of the drop.
    #[arg(long, default_value_t = 1)]
    pub per_user_limit: u64,

    /// Chat messages per second from one chatter, from --lead-in before the drop to the end.
    #[arg(long, default_value_t = 10.0)]
    pub chat_rate: f64,

    /// Seconds of chat before the drop.
    #[arg(long, default_value_t = 1.0)]
    pub lead_in: f64,

    /// Longest the rush may take (seconds from the drop). The run ends earlier once every
    /// claim is answered and every viewer saw `sold_out` (or the drop did not sell out).
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,

    /// Source addresses to spread viewers over (127.0.0.1 ..= 127.0.0.N); 0 picks one per
    /// 10 000 viewers.
    #[arg(long, default_value_t = 0)]
    pub source_ips: u32,

    /// WebSocket handshakes in progress at once while connecting.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: u32,
}

#[derive(Args, Debug, Clone)]
pub struct GroupsArgs {
    #[command(flatten)]
    pub common: Common,

    /// Room of the group drop (created if missing; default: a fresh one per run).
    #[arg(long)]
    pub room: Option<String>,

    /// Groups to open (one leader each).
    #[arg(long, default_value_t = 100)]
    pub groups: u32,

    /// Members a group needs (`group_size`, leader included).
    #[arg(long, default_value_t = 3)]
    pub group_size: u64,

    /// Price per unit in a completed group (`group_price`, minor units).
    #[arg(long, default_value_t = 80)]
    pub group_price: u64,

    /// Seconds a group has to fill (`group_window_secs`).
    #[arg(long, default_value_t = 60)]
    pub window_secs: u64,

    /// Joiners per group beyond the size − 1 that fill it: they race for full groups.
    #[arg(long, default_value_t = 0)]
    pub extra_joiners: u32,

    /// Stock of the drop (default: groups × size).
    #[arg(long)]
    pub stock: Option<u64>,

    /// Keep-alive HTTP connections.
    #[arg(long, default_value_t = 32)]
    pub concurrency: u32,

    /// Longest the run may take, in seconds.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
}
