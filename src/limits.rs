//! Rate limits and connection caps: who may do how much, how fast. Every limit is a keyed
//! governor (GCRA) limiter with its own setting; a refusal is `rate_limited` (HTTP 429 with
//! `Retry-After` and `RateLimit-Policy`/`RateLimit` headers, or a WebSocket `error` frame with
//! `retry_after`). Keyed state is forgotten once a key is idle (`retain_recent` on a timer),
//! so a flood of distinct IPs or users cannot grow memory without bound. The client IP is the
//! TCP peer, or the `X-Forwarded-For` hop a configured trusted proxy names.

use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dashmap::DashMap;
use governor::clock::{Clock, FakeRelativeClock};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use crate::config::Config;
use crate::error::{AppError, AppResult, RatePolicy};
use crate::state::AppState;

/// A limit setting: `N/PERIOD`, N events per PERIOD (`s`, `m`, `h`, or a count of them such as
/// `10s`), with bursts of up to N.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub n: NonZeroU32,
    pub period: Duration,
}

impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: expected N/PERIOD such as 5/10s, 20/s, 120/m or 1000/h");
        let (n, period) = s.trim().split_once('/').ok_or_else(bad)?;
        let n: u32 = n.trim().parse().map_err(|_| bad())?;
        let n = NonZeroU32::new(n).ok_or_else(bad)?;
        let period = period.trim();
        let digits = period.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let count: u64 = if digits.is_empty() {
            1
        } else {
            digits.parse().map_err(|_| bad())?
        };
        let unit = match &period[digits.len()..] {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => return Err(bad()),
        };
        if count == 0 || count > 86_400 {
            return Err(bad());
        }
        Ok(Rate {
            n,
            period: Duration::from_secs(count * unit),
        })
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}s", self.n, self.period.as_secs())
    }
}

/// The limiters' clock: real monotonic time, or a governor fake clock that tests advance.
#[derive(Clone, Debug)]
pub enum LimitClock {
    Real(Instant),
    Fake(FakeRelativeClock),
}

impl Clock for LimitClock {
    type Instant = Nanos;
    fn now(&self) -> Nanos {
        match self {
            LimitClock::Real(start) => Nanos::from(start.elapsed()),
            LimitClock::Fake(c) => c.now(),
        }
    }
}

/// One named keyed limit.
pub struct Limiter<K: Hash + Eq + Clone> {
    policy: RatePolicy,
    clock: LimitClock,
    inner: RateLimiter<K, DashMapStateStore<K>, LimitClock, NoOpMiddleware<Nanos>>,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    /// A limiter allowing `rate.n` per `rate.period`, bursts of `rate.n`.
    pub fn new(name: &'static str, rate: Rate, clock: LimitClock) -> Self {
        let per_cell = (rate.period / rate.n.get()).max(Duration::from_nanos(1));
        let quota = Quota::with_period(per_cell)
            .unwrap_or_else(|| Quota::per_second(rate.n))
            .allow_burst(rate.n);
        Self {
            policy: RatePolicy {
                name,
                quota: rate.n.get(),
                window_secs: rate.period.as_secs().max(1),
            },
            inner: RateLimiter::dashmap_with_clock(quota, clock.clone()),
            clock,
        }
    }

    /// Counts one event for `key`; `rate_limited` with the wait when over the limit.
    pub fn check(&self, key: &K) -> AppResult<()> {
        self.inner.check_key(key).map_err(|not_until| {
            AppError::rate_limited_by(self.policy, not_until.wait_time_from(self.clock.now()))
        })
    }

    /// Keys currently remembered (memory in use).
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    /// Forgets keys whose state is back to fresh: memory follows active keys only.
    pub fn forget_idle(&self) {
        self.inner.retain_recent();
        self.inner.shrink_to_fit();
    }
}

/// Where a request comes from, as far as limits are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr {
    pub ip: IpAddr,
    /// A direct local client (see `--limit-exempt`): no limits or caps apply.
    pub exempt: bool,
}

/// Every limit of this instance.
pub struct Limits {
    pub chat: Limiter<(String, String)>,
    pub likes: Limiter<String>,
    pub claims_per_user: Limiter<String>,
    pub claims_per_drop: Limiter<String>,
    pub ws_connects: Limiter<IpAddr>,
    pub http: Limiter<IpAddr>,
    conns_per_ip: DashMap<IpAddr, usize>,
    conns_per_user: DashMap<String, usize>,
    max_per_ip: usize,
    max_per_user: usize,
    trusted: Vec<IpAddr>,
    exempt: Vec<IpAddr>,
}

impl Limits {
    /// Builds every limiter from the settings (on the fake clock when a test gave one).
    pub fn new(config: &Config) -> Self {
        let clock = match &config.limit_clock {
            Some(c) => LimitClock::Fake(c.clone()),
            None => LimitClock::Real(Instant::now()),
        };
        Self {
            chat: Limiter::new("chat", config.chat_rate, clock.clone()),
            likes: Limiter::new("likes", config.like_rate, clock.clone()),
            claims_per_user: Limiter::new("claims", config.claim_rate, clock.clone()),
            claims_per_drop: Limiter::new("drop_claims", config.drop_claim_rate, clock.clone()),
            ws_connects: Limiter::new("ws_connects", config.ws_connect_rate, clock.clone()),
            http: Limiter::new("http", config.http_rate, clock),
            conns_per_ip: DashMap::new(),
            conns_per_user: DashMap::new(),
            max_per_ip: config.max_conns_per_ip,
            max_per_user: config.max_conns_per_user,
            trusted: config.trusted_proxies.clone(),
            exempt: config
                .limit_exempt
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect(),
        }
    }

    /// The client address of a request: the peer, or — only when the peer is a trusted
    /// proxy — the rightmost `X-Forwarded-For` hop that is not itself a trusted proxy.
    pub fn client_addr(&self, peer: IpAddr, headers: &HeaderMap) -> ClientAddr {
        let forwarded: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|hop| hop.trim().parse().ok())
            .collect();
        let mut ip = peer;
        if self.trusted.contains(&peer) {
            for hop in forwarded.iter().rev() {
                ip = *hop;
                if !self.trusted.contains(hop) {
                    break;
                }
            }
        }
        let proxied = headers.contains_key("x-forwarded-for") || headers.contains_key("forwarded");
        ClientAddr {
            ip,
            exempt: !proxied && self.exempt.contains(&peer),
        }
    }

    /// Counts a WebSocket in against the per-IP and per-user caps; the permit gives it back.
    pub fn connect(self: &Arc<Self>, addr: ClientAddr, user: &str) -> AppResult<ConnPermit> {
        if addr.exempt {
            return Ok(ConnPermit {
                limits: self.clone(),
                ip: None,
                user: None,
            });
        }
        let full = |what: &str, max: usize| {
            AppError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "too_many_connections",
                format!("at most {max} open connections per {what}"),
            )
        };
        if !increment(&self.conns_per_ip, addr.ip, self.max_per_ip) {
            return Err(full("IP address", self.max_per_ip));
        }
        if !increment(&self.conns_per_user, user.to_string(), self.max_per_user) {
            decrement(&self.conns_per_ip, &addr.ip);
            return Err(full("user", self.max_per_user));
        }
        Ok(ConnPermit {
            limits: self.clone(),
            ip: Some(addr.ip),
            user: Some(user.to_string()),
        })
    }

    /// Forgets idle keys of every limiter.
    pub fn forget_idle(&self) {
        self.chat.forget_idle();
        self.likes.forget_idle();
        self.claims_per_user.forget_idle();
        self.claims_per_drop.forget_idle();
        self.ws_connects.forget_idle();
        self.http.forget_idle();
    }
}

/// Adds one to `key`'s count unless it is at `max`; entries exist only while non-zero.
fn increment<K: Hash + Eq>(map: &DashMap<K, usize>, key: K, max: usize) -> bool {
    let mut n = map.entry(key).or_insert(0);
    if *n >= max {
        return false;
    }
    *n += 1;
    true
}

fn decrement<K: Hash + Eq>(map: &DashMap<K, usize>, key: &K) {
    if let Some(mut n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
    }
    map.remove_if(key, |_, n| *n == 0);
}

/// One open WebSocket counted against the caps; dropping it frees the slot.
pub struct ConnPermit {
    limits: Arc<Limits>,
    ip: Option<IpAddr>,
    user: Option<String>,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        if let Some(ip) = &self.ip {
            decrement(&self.limits.conns_per_ip, ip);
        }
        if let Some(user) = &self.user {
            decrement(&self.limits.conns_per_user, user);
        }
    }
}

/// Middleware: resolves the client address (kept in the request's extensions for handlers)
/// and applies the per-IP HTTP limit.
pub async fn http_limit(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let addr = state.limits.client_addr(peer, req.headers());
    if !addr.exempt
        && let Err(e) = state.limits.http.check(&addr.ip)
    {
        return e.into_response();
    }
    req.extensions_mut().insert(addr);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake() -> (FakeRelativeClock, LimitClock) {
        let c = FakeRelativeClock::default();
        (c.clone(), LimitClock::Fake(c))
    }

    #[test]
    fn rates_parse() {
        let r: Rate = "5/10s".parse().unwrap();
        assert_eq!((r.n.get(), r.period), (5, Duration::from_secs(10)));
        let r: Rate = "120/m".parse().unwrap();
        assert_eq!(r.period, Duration::from_secs(60));
        for bad in ["", "5", "0/s", "5/x", "5/0s", "-1/s", "a/s"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }

    #[test]
    fn burst_then_refill_on_the_fake_clock() {
        let (clock, lc) = fake();
        let l = Limiter::<String>::new("chat", "5/10s".parse().unwrap(), lc);
        let k = "alice".to_string();
        for _ in 0..5 {
            l.check(&k).unwrap();
        }
        let e = l.check(&k).unwrap_err();
        assert_eq!(e.code, "rate_limited");
        assert_eq!(e.retry_after, Some(2));
        assert_eq!(e.policy.unwrap().quota, 5);
        // Another key is not affected.
        l.check(&"bob".to_string()).unwrap();
        clock.advance(Duration::from_secs(2));
        l.check(&k).unwrap();
        assert!(l.check(&k).is_err());
    }

    #[test]
    fn idle_keys_are_forgotten() {
        let (clock, lc) = fake();
        let l = Limiter::<u32>::new("http", "10/s".parse().unwrap(), lc);
        for k in 0..10_000 {
            l.check(&k).unwrap();
        }
        assert_eq!(l.len(), 10_000);
        clock.advance(Duration::from_secs(2));
        l.forget_idle();
        assert_eq!(l.len(), 0);
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let config = Config {
            trusted_proxies: vec!["10.0.0.1".parse().unwrap()],
            ..Config::default()
        };
        let limits = Limits::new(&config);
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "6.6.6.6, 1.2.3.4".parse().unwrap());
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let stranger: IpAddr = "9.9.9.9".parse().unwrap();
        assert_eq!(limits.client_addr(proxy, &h).ip.to_string(), "1.2.3.4");
        assert_eq!(limits.client_addr(stranger, &h).ip, stranger);
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(limits.client_addr(local, &HeaderMap::new()).exempt);
        assert!(!limits.client_addr(local, &h).exempt);
    }

    #[test]
    fn connection_caps() {
        let config = Config {
            max_conns_per_ip: 2,
            max_conns_per_user: 1,
            ..Config::default()
        };
        let limits = Arc::new(Limits::new(&config));
        let addr = ClientAddr {
            ip: "1.2.3.4".parse().unwrap(),
            exempt: false,
        };
        let a = limits.connect(addr, "a").unwrap();
        assert_eq!(
            limits.connect(addr, "a").err().map(|e| e.code),
            Some("too_many_connections")
        );
        let _b = limits.connect(addr, "b").unwrap();
        assert!(limits.connect(addr, "c").is_err());
        drop(a);
        let _c = limits.connect(addr, "c").unwrap();
        drop(_b);
        drop(_c);
        assert!(limits.conns_per_ip.is_empty() && limits.conns_per_user.is_empty());
    }
}
