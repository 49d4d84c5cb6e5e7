//! Every setting of `livedrop serve`, from flags and `LIVEDROP_*` environment variables, in
//! one struct that is validated before anything starts. A bad setting stops start-up with a
//! message that names it.

use std::net::{IpAddr, SocketAddr};

use clap::Args;

use crate::limits::Rate;

/// Settings of one server process.
#[derive(Args, Clone, Debug)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "LIVEDROP_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Redis URL (redis://host:port/db). Absent: the embedded memory engine.
    #[arg(long, env = "LIVEDROP_REDIS_URL")]
    pub redis_url: Option<String>,

    /// Secret that signs and verifies HS256 tokens. Absent: a random one is generated and
    /// the demo tokens are printed at start-up.
    #[arg(long, env = "LIVEDROP_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Seed the demo room `demo` (default: on for the memory engine, off for redis).
    #[arg(long, overrides_with = "no_demo")]
    pub demo: bool,

    /// Do not seed the demo room.
    #[arg(long = "no-demo", overrides_with = "demo")]
    pub no_demo: bool,

    /// Largest WebSocket message a client may send, in bytes; larger closes with 1009.
    #[arg(long, env = "LIVEDROP_MAX_FRAME_BYTES", default_value_t = 16 * 1024)]
    pub max_frame_bytes: usize,

    /// Frames buffered per room for viewers that are momentarily behind.
    #[arg(long, env = "LIVEDROP_ROOM_BUFFER", default_value_t = 1024)]
    pub room_buffer: usize,

    /// Chat messages kept per room for `?since=` recovery.
    #[arg(long, env = "LIVEDROP_CHAT_HISTORY", default_value_t = 1000)]
    pub chat_history: usize,

    /// Resyncs a viewer may need within a minute before it is disconnected (close 4008).
    #[arg(long, env = "LIVEDROP_MAX_RESYNCS", default_value_t = 3)]
    pub max_resyncs: u32,

    /// Seconds a single write to a viewer may take before the viewer is dropped.
    #[arg(long, env = "LIVEDROP_WRITE_TIMEOUT_SECS", default_value_t = 10)]
    pub write_timeout_secs: u64,

    /// Kernel send buffer per connection, in bytes (0: kernel autotuning, up to MiBs per
    /// socket). Bounded so a viewer that stops reading is noticed instead of absorbed.
    #[arg(long, env = "LIVEDROP_SOCKET_SEND_BUFFER", default_value_t = 128 * 1024)]
    pub socket_send_buffer: usize,

    /// Seconds without any frame from a client before the server pings; twice this and it closes.
    #[arg(long, env = "LIVEDROP_IDLE_SECS", default_value_t = 30)]
    pub idle_secs: u64,

    /// Seconds in-flight work may take to finish after SIGTERM/Ctrl-C.
    #[arg(long, env = "LIVEDROP_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,

    /// Milliseconds a Redis command may take before the call fails with `store_unavailable`.
    #[arg(long, env = "LIVEDROP_REDIS_TIMEOUT_MS", default_value_t = 1000)]
    pub redis_timeout_ms: u64,

    /// Fan-out tasks per room, each writing to its share of the room's sockets; 0 means one
    /// per core but one (at least one).
    #[arg(long, env = "LIVEDROP_FANOUT_SHARDS", default_value_t = 0)]
    pub fanout_shards: usize,

    /// Milliseconds between conflated `likes`/`stock` frames (presence uses 5×).
    #[arg(long, env = "LIVEDROP_CONFLATE_MS", default_value_t = 100)]
    pub conflate_ms: u64,

    /// Milliseconds between sweeps that return expired reservations to stock.
    #[arg(long, env = "LIVEDROP_SWEEP_MS", default_value_t = 500)]
    pub sweep_ms: u64,

    /// Seconds an idempotency key is remembered.
    #[arg(long, env = "LIVEDROP_IDEMPOTENCY_TTL_SECS", default_value_t = 86_400)]
    pub idempotency_ttl_secs: u64,

    // ---- trust and abuse (docs/security.md lists each with its refusal) ----
    /// Let anonymous guests watch rooms (no token): they cannot chat, like or claim.
    #[arg(long, env = "LIVEDROP_ALLOW_GUESTS")]
    pub allow_guests: bool,

    /// Origins allowed to open a WebSocket from a browser, comma-separated
    /// (e.g. `https://shop.example`). Empty: only the server's own origin (its Host header).
    #[arg(long, env = "LIVEDROP_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Proxy addresses whose `X-Forwarded-For` is believed, comma-separated IPs.
    #[arg(long, env = "LIVEDROP_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<IpAddr>,

    /// Peers exempt from rate limits and connection caps when they connect directly (no
    /// `X-Forwarded-For`): a load generator on this machine (e.g. `127.0.0.1`). Off by
    /// default (`none`), so no deployment is unlimited by accident.
    #[arg(
        long,
        env = "LIVEDROP_LIMIT_EXEMPT",
        value_delimiter = ',',
        default_value = "none"
    )]
    pub limit_exempt: Vec<String>,

    /// Chat messages per user per room (`N/PERIOD`, PERIOD s, m, h or e.g. 10s; burst N).
    #[arg(long, env = "LIVEDROP_CHAT_RATE", default_value = "5/10s")]
    pub chat_rate: Rate,

    /// `like` frames per user (each carries up to 100 taps).
    #[arg(long, env = "LIVEDROP_LIKE_RATE", default_value = "20/s")]
    pub like_rate: Rate,

    /// Claims per user (HTTP and WebSocket together).
    #[arg(long, env = "LIVEDROP_CLAIM_RATE", default_value = "10/s")]
    pub claim_rate: Rate,

    /// Claims admitted per drop per instance: shields the store in a thundering herd.
    #[arg(long, env = "LIVEDROP_DROP_CLAIM_RATE", default_value = "20000/s")]
    pub drop_claim_rate: Rate,

    /// WebSocket connects per client IP.
    #[arg(long, env = "LIVEDROP_WS_CONNECT_RATE", default_value = "120/m")]
    pub ws_connect_rate: Rate,

    /// HTTP requests per client IP.
    #[arg(long, env = "LIVEDROP_HTTP_RATE", default_value = "1200/m")]
    pub http_rate: Rate,

    /// Open TCP connections (HTTP and WebSocket together) the server holds; past it a new
    /// connection is closed at once, before it costs anything.
    #[arg(long, env = "LIVEDROP_MAX_CONNECTIONS", default_value_t = 200_000)]
    pub max_connections: usize,

    /// Open WebSockets per client IP (a NAT or proxy carries many viewers).
    #[arg(long, env = "LIVEDROP_MAX_CONNS_PER_IP", default_value_t = 1000)]
    pub max_conns_per_ip: usize,

    /// Open WebSockets per user (tabs and devices).
    #[arg(long, env = "LIVEDROP_MAX_CONNS_PER_USER", default_value_t = 8)]
    pub max_conns_per_user: usize,

    /// Refuse chat messages that contain links (`blocked_content`).
    #[arg(long, env = "LIVEDROP_BLOCK_LINKS")]
    pub block_links: bool,

    /// Seconds between sweeps that forget idle rate-limit keys (bounds their memory).
    #[arg(long, env = "LIVEDROP_LIMIT_SWEEP_SECS", default_value_t = 60)]
    pub limit_sweep_secs: u64,

    /// Tests only: drive every rate limiter from this fake clock instead of real time.
    #[arg(skip)]
    pub limit_clock: Option<governor::clock::FakeRelativeClock>,
}

impl Default for Config {
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            config: Config,
        }
        <Defaults as clap::Parser>::parse_from(["livedrop"]).config
    }
}

impl Config {
    /// Whether the demo room is seeded.
    pub fn seed_demo(&self) -> bool {
        if self.demo {
            true
        } else if self.no_demo {
            false
        } else {
            self.redis_url.is_none()
        }
    }

    /// Refuses settings that cannot work, naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        fn range(name: &str, v: u64, lo: u64, hi: u64) -> Result<(), String> {
            if v < lo || v > hi {
                Err(format!("{name} must be between {lo} and {hi} (got {v})"))
            } else {
                Ok(())
            }
        }
        range(
            "--max-frame-bytes",
            self.max_frame_bytes as u64,
            256,
            16 << 20,
        )?;
        range("--room-buffer", self.room_buffer as u64, 16, 1 << 20)?;
        range("--chat-history", self.chat_history as u64, 50, 1_000_000)?;
        range("--max-resyncs", self.max_resyncs as u64, 1, 1000)?;
        range("--write-timeout-secs", self.write_timeout_secs, 1, 3600)?;
        if self.socket_send_buffer != 0 {
            range(
                "--socket-send-buffer",
                self.socket_send_buffer as u64,
                4096,
                64 << 20,
            )?;
        }
        range("--idle-secs", self.idle_secs, 1, 3600)?;
        range("--shutdown-grace-secs", self.shutdown_grace_secs, 0, 3600)?;
        range("--redis-timeout-ms", self.redis_timeout_ms, 10, 60_000)?;
        range("--conflate-ms", self.conflate_ms, 10, 10_000)?;
        range("--fanout-shards", self.fanout_shards as u64, 0, 64)?;
        range("--sweep-ms", self.sweep_ms, 10, 60_000)?;
        range(
            "--idempotency-ttl-secs",
            self.idempotency_ttl_secs,
            60,
            30 * 86_400,
        )?;
        range("--max-connections", self.max_connections as u64, 1, 1 << 24)?;
        range(
            "--max-conns-per-ip",
            self.max_conns_per_ip as u64,
            1,
            1 << 24,
        )?;
        range(
            "--max-conns-per-user",
            self.max_conns_per_user as u64,
            1,
            1 << 20,
        )?;
        range("--limit-sweep-secs", self.limit_sweep_secs, 1, 86_400)?;
        for ip in &self.limit_exempt {
            if ip != "none" && ip.parse::<IpAddr>().is_err() {
                return Err(format!("--limit-exempt takes IPs or none (got {ip:?})"));
            }
        }
        for o in &self.allowed_origins {
            if !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
                return Err(format!(
                    "--allowed-origins entries look like https://host[:port] (got {o:?})"
                ));
            }
        }
        if let Some(url) = &self.redis_url
            && !(url.starts_with("redis://") || url.starts_with("rediss://"))
        {
            return Err(format!(
                "--redis-url must start with redis:// or rediss:// (got {url:?})"
            ));
        }
        if let Some(s) = &self.jwt_secret
            && s.len() < 16
        {
            return Err("--jwt-secret must be at least 16 bytes".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = Config::default();
        assert!(c.validate().is_ok());
        assert!(c.seed_demo());
    }

    #[test]
    fn bad_settings_are_named() {
        let c = Config {
            max_frame_bytes: 10,
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().contains("--max-frame-bytes"));
        let c = Config {
            redis_url: Some("http://x".into()),
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().contains("--redis-url"));
        let c = Config {
            allowed_origins: vec!["shop.example".into()],
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().contains("--allowed-origins"));
        let c = Config {
            limit_exempt: vec!["localhost".into()],
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().contains("--limit-exempt"));
        let c = Config {
            max_conns_per_ip: 0,
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().contains("--max-conns-per-ip"));
    }
}
