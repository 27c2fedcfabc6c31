//! What a stranger or one caller may cost the server, enforced: password
//! checks through a bounded pool, login throttles per client address and
//! per username, a request rate per token and per session, open SSE
//! streams per user, and which `Host` names requests may carry. Every
//! refusal is the contract's envelope; a 429 says when to try again.
//!
//! The throttles are `governor`'s keyed GCRA limiters over a bounded number
//! of hashed slots ([`MAX_KEYS`]), pruned every minute.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::serve::client_key;
use crate::budget::{Budget, Taken};
use crate::config::{Config, Limits, Rate};
use crate::http::error::ApiError;
use crate::state::AppState;
use crate::store::CheckMemory;

/// Slots of one throttle (see [`Throttle`]).
pub const MAX_KEYS: usize = 1 << 17;

/// The throttles and pools of one server.
pub struct Guards {
    limits: Limits,
    password_checks: Arc<Semaphore>,
    /// The working memory of the checks, one block per place in the pool.
    check_memory: Arc<Mutex<Vec<CheckMemory>>>,
    login_per_client: Throttle<IpAddr>,
    /// Per username *and* client address: a stranger spending a username's
    /// attempts locks only themselves out, never its owner logging in from
    /// elsewhere.
    login_per_user: Throttle<(String, IpAddr)>,
    /// Keyed by the token or session secret itself: only a hashed slot of
    /// it is kept, never the secret.
    per_caller: Throttle<str>,
    streams: Arc<Budget<String>>,
    /// On a shared database: the login throttles every node counts in
    /// (checked after this node's own), salted with the cluster's secret.
    shared: Option<(Arc<crate::store::Pg>, String)>,
}

/// A keyed GCRA throttle over a bounded map: a key counts in one of
/// [`MAX_KEYS`] slots, chosen by a hash with a random per-process seed. The
/// map can never hold more than that, a flood of new keys refuses no known
/// one, and a client cannot aim at another's slot; two keys share a slot
/// only by chance.
struct Throttle<K: std::hash::Hash + ?Sized> {
    limiter: DefaultKeyedRateLimiter<u32>,
    seed: std::collections::hash_map::RandomState,
    _key: std::marker::PhantomData<fn(&K)>,
}

impl<K: std::hash::Hash + ?Sized> Throttle<K> {
    fn new(rate: Rate) -> Self {
        let quota = Quota::with_period(rate.period)
            .expect("a period above zero")
            .allow_burst(NonZeroU32::new(rate.burst).expect("a burst above zero"));
        Self {
            limiter: RateLimiter::keyed(quota),
            seed: std::collections::hash_map::RandomState::new(),
            _key: std::marker::PhantomData,
        }
    }

    /// Takes one cell for `key`; `Err(wait)` when there is none yet.
    fn check(&self, key: &K) -> Result<(), Duration> {
        use std::hash::BuildHasher;
        let slot = (self.seed.hash_one(key) % MAX_KEYS as u64) as u32;
        self.limiter
            .check_key(&slot)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    fn prune(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// A place in the password-check pool with its working memory; dropping it
/// gives both back.
pub struct PasswordSlot {
    _permit: OwnedSemaphorePermit,
    memory: Option<CheckMemory>,
    pool: Arc<Mutex<Vec<CheckMemory>>>,
}

impl std::fmt::Debug for PasswordSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordSlot")
    }
}

impl PasswordSlot {
    pub fn memory(&mut self) -> &mut CheckMemory {
        self.memory.as_mut().expect("held until drop")
    }
}

impl Drop for PasswordSlot {
    fn drop(&mut self) {
        if let Some(memory) = self.memory.take() {
            self.pool
                .lock()
                .expect("check memory poisoned")
                .push(memory);
        }
    }
}

/// One open SSE stream of a user; dropping it frees its place.
pub type StreamSlot = Taken<String>;

impl Guards {
    pub fn new(limits: &Limits) -> Self {
        Self {
            password_checks: Arc::new(Semaphore::new(limits.password_checks)),
            check_memory: Arc::new(Mutex::new(
                (0..limits.password_checks)
                    .map(|_| CheckMemory::default())
                    .collect(),
            )),
            login_per_client: Throttle::new(limits.login_per_client),
            login_per_user: Throttle::new(limits.login_per_user),
            per_caller: Throttle::new(limits.requests_per_caller),
            streams: Budget::new(limits.streams_per_user),
            limits: limits.clone(),
            shared: None,
        }
    }

    /// Login attempts are also counted across every node of `pg`.
    pub fn shared_with(mut self, pg: Arc<crate::store::Pg>, salt: String) -> Self {
        self.shared = Some((pg, salt));
        self
    }

    /// Drops shared throttle keys that aged out (every minute).
    pub async fn prune_shared(&self) {
        if let Some((pg, _)) = &self.shared
            && let Err(err) = crate::store::throttles::prune(pg).await
        {
            tracing::warn!(error = %err, "could not prune the shared login throttles");
        }
    }

    /// Forgets keys that have nothing left to wait for (call periodically).
    pub fn prune(&self) {
        self.login_per_client.prune();
        self.login_per_user.prune();
        self.per_caller.prune();
    }

    /// A login attempt from `client` for `username`: throttled per address
    /// and per username, then a place in the password-check pool (waiting
    /// at most `password_wait`). Holding the permit is holding the place.
    pub async fn login(&self, client: IpAddr, username: &str) -> Result<PasswordSlot, ApiError> {
        let too_many = |wait| {
            rate_limited(
                "too_many_login_attempts",
                "too many login attempts; wait before trying again",
                wait,
            )
        };
        let client = client_key(client);
        self.login_per_client.check(&client).map_err(too_many)?;
        let user = shown_username(username).to_lowercase();
        if let Some((pg, salt)) = &self.shared {
            let limits = &self.limits;
            let per_client = format!("login/client/{client}");
            let per_user = format!("login/user/{user}/{client}");
            for (key, rate) in [
                (per_client, limits.login_per_client),
                (per_user, limits.login_per_user),
            ] {
                crate::store::throttles::check(pg, salt, &key, rate.burst, rate.period)
                    .await
                    .map_err(ApiError::internal)?
                    .map_err(too_many)?;
            }
        }
        self.login_per_user
            .check(&(user, client))
            .map_err(too_many)?;
        let acquire = self.password_checks.clone().acquire_owned();
        match tokio::time::timeout(self.limits.password_wait, acquire).await {
            Ok(Ok(permit)) => {
                let memory = self
                    .check_memory
                    .lock()
                    .expect("check memory poisoned")
                    .pop();
                Ok(PasswordSlot {
                    _permit: permit,
                    memory: Some(memory.expect("one block per permit")),
                    pool: self.check_memory.clone(),
                })
            }
            _ => Err(rate_limited(
                "login_busy",
                "the server is checking as many passwords as it can; try again shortly",
                Duration::from_secs(1),
            )),
        }
    }

    /// One request of an authenticated caller (`key`: its token or session).
    pub fn request(&self, key: &str) -> Result<(), ApiError> {
        self.per_caller.check(key).map_err(|wait| {
            let rate = self.limits.requests_per_caller;
            rate_limited(
                "too_many_requests",
                format!(
                    "this token or session sends requests faster than the server takes them \
                     ({} at once, then one every {} ms)",
                    rate.burst,
                    rate.period.as_millis()
                ),
                wait,
            )
        })
    }

    /// SSE streams open now, of every user.
    pub fn open_streams(&self) -> usize {
        self.streams.total()
    }

    /// A place for one more SSE stream of `user`.
    pub fn stream(&self, user: &str) -> Result<StreamSlot, ApiError> {
        self.streams.take(user.to_owned(), 1).ok_or_else(|| {
            rate_limited(
                "too_many_streams",
                format!(
                    "you have {} event streams open, as many as one user may (--max-streams-per-user); close one",
                    self.streams.cap()
                ),
                Duration::from_secs(1),
            )
        })
    }
}

fn rate_limited(code: &'static str, message: impl Into<String>, wait: Duration) -> ApiError {
    ApiError::RateLimited(code, message.into(), wait)
}

/// The client's address: the peer's, or (with `--trust-forwarded-for`) the
/// last `X-Forwarded-For` entry, which the reverse proxy in front appended.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub IpAddr);

impl FromRequestParts<AppState> for ClientAddr {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if state.config.trust_forwarded_for
            && let Some(ip) = parts
                .headers
                .get_all("x-forwarded-for")
                .iter()
                .next_back()
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit(',').next())
                .and_then(|v| v.trim().parse().ok())
        {
            return Ok(Self(ip));
        }
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
        Ok(Self(peer))
    }
}

/// Ends a request whose response has not started within
/// `--request-timeout`: a body that never arrives holds nothing for long.
pub async fn deadline(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let limit = state.config.connections.request_timeout;
    tokio::time::timeout(limit, next.run(req))
        .await
        .map_err(|_| {
            ApiError::Timeout(
                "request_timeout",
                format!(
                    "the request took longer than {} s (--request-timeout)",
                    limit.as_secs()
                ),
            )
        })
}

/// Refuses, before routing, a request whose `Host` is not one of ours: a
/// page on another name that resolves to this server (DNS rebinding) gets
/// nothing, not even a login.
pub async fn check_host(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    match host {
        Some(host) if host_allowed(&state.config, host) => Ok(next.run(req).await),
        _ => Err(ApiError::bad_request(
            "host_not_allowed",
            "this server does not answer to that Host name (see --allowed-hosts)",
        )),
    }
}

/// Whether `host` (a `Host` header: name, optional port) names this server.
/// A username as far as throttles and the log take it: its first 64 characters.
pub fn shown_username(username: &str) -> String {
    username.chars().take(64).collect()
}

/// Names are compared ignoring ASCII case, without copying any of them.
pub fn host_allowed(config: &Config, host: &str) -> bool {
    let name = host_name(host);
    if name.is_empty() {
        return false;
    }
    let same = |other: &str| host_name(other).eq_ignore_ascii_case(name);
    let ip = name.parse::<IpAddr>().ok();
    let loopback = name.eq_ignore_ascii_case("localhost")
        || ends_with_ignore_case(name, ".localhost")
        || ip.is_some_and(|ip| ip.is_loopback());
    let bound = ip.is_some_and(|ip| ip == config.bind.ip());
    let public = config
        .public_origin
        .as_deref()
        .and_then(|o| o.split_once("://"))
        .is_some_and(|(_, authority)| same(authority));
    loopback || bound || public || config.allowed_hosts.iter().any(|h| same(h))
}

fn ends_with_ignore_case(s: &str, suffix: &str) -> bool {
    s.len() >= suffix.len()
        && s.is_char_boundary(s.len() - suffix.len())
        && s[s.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
}

/// The name of a `host[:port]`, IPv6 brackets removed.
fn host_name(host: &str) -> &str {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_ours_loopback_or_listed() {
        let mut config = Config::for_data_dir("/tmp/x");
        config.bind = "10.1.2.3:8787".parse().unwrap();
        config.public_origin = Some("https://loopd.example.com".into());
        config.allowed_hosts = vec!["Internal.Example:80".into()];
        for ok in [
            "127.0.0.1:8787",
            "localhost",
            "LOCALHOST:1",
            "app.localhost:8787",
            "[::1]:8787",
            "10.1.2.3:8787",
            "loopd.example.com",
            "loopd.example.com:443",
            "internal.example",
        ] {
            assert!(host_allowed(&config, ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8787",
            "10.1.2.4:8787",
            "",
            "localhost.evil.example",
            "[::2]",
        ] {
            assert!(!host_allowed(&config, bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn logins_are_throttled_per_client_and_per_user_and_let_through_after_the_wait() {
        let limits = Limits {
            login_per_client: Rate {
                burst: 3,
                period: Duration::from_millis(200),
            },
            login_per_user: Rate {
                burst: 2,
                period: Duration::from_millis(200),
            },
            ..Limits::default()
        };
        let guards = Guards::new(&limits);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        drop(guards.login(a, "alice").await.unwrap());
        drop(guards.login(a, "Alice").await.unwrap());
        // Alice from `a` is spent (usernames are case-blind)...
        let err = guards.login(a, "alice").await.unwrap_err();
        let ApiError::RateLimited(code, _, wait) = err else {
            panic!("{err:?}")
        };
        assert_eq!(code, "too_many_login_attempts");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(200),
            "{wait:?}"
        );
        // ...but her owner, from elsewhere, is not locked out.
        drop(guards.login(b, "alice").await.unwrap());
        // And `a` has spent its own burst (three tries) on anyone.
        assert!(
            guards.login(a, "carol").await.is_err(),
            "the address's burst is spent"
        );
        tokio::time::sleep(wait.max(Duration::from_millis(200))).await;
        drop(guards.login(a, "alice").await.unwrap());
    }

    #[tokio::test]
    async fn a_full_password_pool_answers_busy_within_the_wait() {
        let limits = Limits {
            password_checks: 1,
            password_wait: Duration::from_millis(50),
            ..Limits::default()
        };
        let guards = Guards::new(&limits);
        let held = guards
            .login("10.0.0.1".parse().unwrap(), "a")
            .await
            .unwrap();
        let err = guards
            .login("10.0.0.2".parse().unwrap(), "b")
            .await
            .unwrap_err();
        assert!(
            matches!(err, ApiError::RateLimited("login_busy", ..)),
            "{err:?}"
        );
        drop(held);
        drop(
            guards
                .login("10.0.0.3".parse().unwrap(), "c")
                .await
                .unwrap(),
        );
    }

    #[test]
    fn a_flood_of_new_keys_keeps_the_map_bounded_and_spares_known_keys() {
        let throttle = Throttle::new(Rate {
            burst: 1,
            period: Duration::from_secs(3600),
        });
        throttle.check(&"alice".to_owned()).unwrap();
        let mut spared = 0;
        for i in 0..2 * MAX_KEYS {
            let _ = throttle.check(&format!("flood{i}"));
        }
        assert!(
            throttle.limiter.len() <= MAX_KEYS,
            "{}",
            throttle.limiter.len()
        );
        // A known key is refused only for its own use, and new honest keys
        // mostly find slots of their own even after the flood.
        assert!(throttle.check(&"alice".to_owned()).is_err());
        let fresh = Throttle::new(Rate {
            burst: 1,
            period: Duration::from_secs(3600),
        });
        for i in 0..1000 {
            fresh.check(&format!("flood{i}")).unwrap_or(());
            if fresh.check(&format!("honest{i}")).is_ok() {
                spared += 1;
            }
        }
        assert!(
            spared > 980,
            "{spared} of 1000 honest keys had a slot of their own"
        );
    }

    #[test]
    fn streams_are_counted_per_user_and_freed_on_drop() {
        let limits = Limits {
            streams_per_user: 2,
            ..Limits::default()
        };
        let guards = Guards::new(&limits);
        let one = guards.stream("alice").unwrap();
        let _two = guards.stream("alice").unwrap();
        assert!(guards.stream("alice").is_err());
        let _bob = guards.stream("bob").unwrap();
        drop(one);
        let _three = guards.stream("alice").unwrap();
    }
}
