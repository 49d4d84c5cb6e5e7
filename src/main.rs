//! The `livedrop` command: `serve` (the default) runs the server; `token` issues a JWT for
//! local use. Everything else lives in the library.

use clap::{Parser, Subcommand};
use livedrop::auth::{Authenticator, Role};
use livedrop::config::Config;

#[derive(Parser)]
#[command(
    name = "livedrop",
    version,
    about = "Real-time server for live shopping"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default when no command is given).
    Serve(Box<Config>),
    /// Print an HS256 token signed with the configured secret.
    Token {
        #[arg(long)]
        sub: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value = "viewer")]
        role: Role,
        /// Lifetime: a number with s, m, h or d (e.g. 90s, 1h, 7d).
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: u64,
        #[arg(long, env = "LIVEDROP_JWT_SECRET", hide_env_values = true)]
        jwt_secret: String,
    },
}

fn parse_ttl(s: &str) -> Result<u64, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?}: use e.g. 90s, 1h, 7d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("bad duration unit in {s:?}: use s, m, h or d")),
    };
    n.checked_mul(mult)
        .filter(|v| *v > 0 && *v <= 365 * 86_400)
        .ok_or_else(|| format!("duration {s:?} must be between 1s and 365d"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "livedrop=info".into()),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Token {
            sub,
            name,
            role,
            ttl,
            jwt_secret,
        }) => {
            if !livedrop::protocol::is_valid_id(&sub) {
                anyhow::bail!("--sub must match [A-Za-z0-9_-]{{1,64}}");
            }
            let auth = Authenticator::new(jwt_secret.as_bytes());
            let name = name.unwrap_or_else(|| sub.clone());
            println!("{}", auth.issue(&sub, &name, role, ttl)?);
            Ok(())
        }
        Some(Command::Serve(config)) => serve(*config).await,
        None => serve(Config::default()).await,
    }
}

async fn serve(mut config: Config) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let secret = config
        .jwt_secret
        .get_or_insert_with(|| {
            format!(
                "{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            )
        })
        .clone();
    let listener = livedrop::bind(config.listen)
        .map_err(|e| anyhow::anyhow!("--listen {}: {e}", config.listen))?;
    let addr = listener.local_addr()?;
    let engine = if config.redis_url.is_some() {
        "redis"
    } else {
        "memory"
    };
    println!("livedrop listening on http://{addr} ({engine} engine)");
    if config.seed_demo() {
        let auth = Authenticator::new(secret.as_bytes());
        let day = 86_400;
        let host = auth.issue(livedrop::DEMO_HOST, "Demo Host", Role::Host, day)?;
        let viewer = auth.issue("viewer1", "Viewer One", Role::Viewer, day)?;
        println!("demo room: {}", livedrop::DEMO_ROOM);
        println!("host token:   {host}");
        println!("viewer token: {viewer}");
        println!(
            "connect:      websocat 'ws://{addr}/ws/rooms/{}?token={viewer}'",
            livedrop::DEMO_ROOM
        );
    }
    livedrop::serve(config, listener, shutdown_signal()).await
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}
