//! Who may call, and how often: per-client rate limits and API keys, enforced inside
//! [`super::observe`] (so a refusal is logged, counted and carries the usual headers) for
//! every service whose [`super::Server`] was given [`Guards`].
//!
//! - **Client address.** The connecting peer, unless the peer is a trusted proxy
//!   (`MSGHASH_TRUSTED_PROXIES`, the edge): then the last address of its
//!   `X-Forwarded-For`, which the edge sets to the address it saw. A client elsewhere cannot
//!   pick its own key by sending the header.
//! - **Rate limits** (`MSGHASH_RATE_LIMIT_PER_SEC`, `MSGHASH_RATE_LIMIT_BURST`): a GCRA
//!   bucket per client address (governor). Over it: 429 with `Retry-After`. Health checks,
//!   `/metrics` and `/openapi.json` are never limited.
//! - **API keys** (`MSGHASH_API_KEYS_FILE`): a file of SHA-256 hashes of the keys, one
//!   `sha256:<hex>` per line, reloaded on SIGHUP. With it, a POST needs
//!   `Authorization: Bearer <key>` (every request but health, metrics and the OpenAPI
//!   document, with `MSGHASH_API_KEYS_SCOPE=all`), else 401. The key's hash is compared
//!   with every stored hash in constant time; the key itself is never logged or kept.

use super::ApiError;
use axum::extract::{ConnectInfo, Request};
use axum::http::{header, HeaderMap, Method};
use axum::response::{IntoResponse, Response};
use governor::{DefaultKeyedRateLimiter, Quota};
use ipnet::IpNet;
use sha2::{Digest as _, Sha256};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use subtle::ConstantTimeEq;

/// The guards of one server; the default guards nothing.
#[derive(Default)]
pub struct Guards {
    /// Peers whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<IpNet>,
    pub rate_limit: Option<RateLimit>,
    pub api_keys: Option<ApiKeys>,
}

/// Which requests need an API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyScope {
    /// POST only; reads stay open.
    Writes,
    /// Every request but `/health/*`, `/metrics` and `/openapi.json`.
    All,
}

/// Paths that are never limited nor need a key: orchestrators, scrapers, API clients
/// discovering the API.
fn is_exempt(path: &str) -> bool {
    // `/openapi/edge.json` is what the edge serves as its `/openapi.json`.
    path.starts_with("/health/")
        || path == "/metrics"
        || path == "/openapi.json"
        || path.starts_with("/openapi/")
}

impl Guards {
    /// The client's address as these guards see it (module doc).
    pub fn client_ip(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        let peer = peer?.ip();
        if !self.trusted_proxies.iter().any(|net| net.contains(&peer)) {
            return Some(peer);
        }
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|v| v.trim().parse().ok());
        Some(forwarded.unwrap_or(peer))
    }
}

/// Enforces the request's [`Guards`] (an extension the server sets; none: nothing to do):
/// the answer that refuses `request` (429, 401), or `None` when the guards let it through.
/// [`super::observe`] asks it for every request.
pub fn refusal(request: &Request) -> Option<Response> {
    let guards = request.extensions().get::<Arc<Guards>>()?;
    if is_exempt(request.uri().path()) {
        return None;
    }
    // The rate limit first: a flood of requests without a key, or guessing keys, is
    // limited too.
    if let Some(limit) = &guards.rate_limit {
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0);
        if let Some(ip) = guards.client_ip(peer, request.headers()) {
            if let Err(wait) = limit.check(ip) {
                ::metrics::counter!(crate::metrics::names::HTTP_RATE_LIMITED_TOTAL).increment(1);
                let retry_after_secs = u32::try_from(wait.as_secs() + 1).unwrap_or(u32::MAX);
                return Some(ApiError::TooManyRequests { retry_after_secs }.into_response());
            }
        }
    }
    if let Some(keys) = &guards.api_keys {
        let needed = keys.scope == KeyScope::All || request.method() == Method::POST;
        if needed && !keys.admits(request.headers()) {
            return Some(ApiError::Unauthorized.into_response());
        }
    }
    None
}

/// A request-rate limit per client address.
pub struct RateLimit {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
}

impl RateLimit {
    /// `per_sec` requests a second on average, up to `burst` at once.
    pub fn new(per_sec: NonZeroU32, burst: NonZeroU32) -> RateLimit {
        RateLimit {
            limiter: DefaultKeyedRateLimiter::keyed(Quota::per_second(per_sec).allow_burst(burst)),
        }
    }

    /// One request every `every` on average, up to `burst` at once; `None` if `every` is
    /// zero. Slower than one a second: a test's burst stays spent however slow its machine.
    pub fn one_every(every: Duration, burst: NonZeroU32) -> Option<RateLimit> {
        let quota = Quota::with_period(every)?.allow_burst(burst);
        Some(RateLimit {
            limiter: DefaultKeyedRateLimiter::keyed(quota),
        })
    }

    /// Ok, or how long until `ip` may send again. An IPv6 client is its /64: one host
    /// usually holds a whole /64 and could otherwise take a new bucket with each address.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        use governor::clock::Clock;
        self.limiter
            .check_key(&client_key(ip))
            .map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()))
    }

    /// Forgets clients whose bucket is full again, so the table does not grow without end.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// The rate limit's key of a client address: an IPv4 address (IPv4-mapped IPv6 ones too)
/// as it is, an IPv6 one as its /64 network.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

/// The API keys a request may present, as SHA-256 hashes, from a file reloaded on demand.
pub struct ApiKeys {
    path: PathBuf,
    scope: KeyScope,
    hashes: RwLock<Arc<Vec<[u8; 32]>>>,
}

/// A key file that cannot be used (the message names the file and the line).
#[derive(Debug, thiserror::Error)]
#[error("MSGHASH_API_KEYS_FILE {path}: {reason}")]
pub struct KeyFileError {
    path: String,
    reason: String,
}

impl ApiKeys {
    /// Loads the hashes in `path`; refuses a file that cannot be read, has a malformed line
    /// or holds no key.
    pub fn load(path: &Path, scope: KeyScope) -> Result<ApiKeys, KeyFileError> {
        let hashes = read_hashes(path)?;
        Ok(ApiKeys {
            path: path.to_owned(),
            scope,
            hashes: RwLock::new(Arc::new(hashes)),
        })
    }

    /// Reads the file again; on error the keys in use stay as they were.
    pub fn reload(&self) -> Result<usize, KeyFileError> {
        let hashes = read_hashes(&self.path)?;
        let count = hashes.len();
        match self.hashes.write() {
            Ok(mut current) => *current = Arc::new(hashes),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(hashes),
        }
        Ok(count)
    }

    /// Whether `headers` carry `Authorization: Bearer <key>` of a stored hash.
    fn admits(&self, headers: &HeaderMap) -> bool {
        let Some(key) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, key) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
            })
            .filter(|k| !k.is_empty())
        else {
            return false;
        };
        let presented: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let hashes = match self.hashes.read() {
            Ok(h) => h.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        // Every stored hash is compared, whatever matched before.
        let mut found = subtle::Choice::from(0);
        for stored in hashes.iter() {
            found |= stored.ct_eq(&presented);
        }
        found.into()
    }
}

/// The hash line of `key`, as a key file holds it.
pub fn key_file_line(key: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
}

fn read_hashes(path: &Path) -> Result<Vec<[u8; 32]>, KeyFileError> {
    let error = |reason: String| KeyFileError {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    let mut hashes = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let hash = line
            .strip_prefix("sha256:")
            .and_then(|h| hex::decode(h).ok())
            .and_then(|h| <[u8; 32]>::try_from(h).ok())
            .ok_or_else(|| {
                error(format!(
                    "line {}: not sha256:<64 hex digits> (the SHA-256 of a key, not the key)",
                    n + 1
                ))
            })?;
        hashes.push(hash);
    }
    if hashes.is_empty() {
        return Err(error("no key hash in the file".into()));
    }
    Ok(hashes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn the_forwarded_address_counts_only_from_a_trusted_proxy() {
        let guards = Guards {
            trusted_proxies: vec!["10.0.0.0/8".parse().expect("net")],
            ..Guards::default()
        };
        let spoofed = headers(&[("x-forwarded-for", "1.2.3.4")]);
        let outsider: SocketAddr = "192.0.2.7:5555".parse().expect("addr");
        assert_eq!(
            guards.client_ip(Some(outsider), &spoofed),
            Some(outsider.ip())
        );
        let edge: SocketAddr = "10.1.2.3:443".parse().expect("addr");
        // The edge's own value is the last one, whatever the client put before it.
        let forwarded = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "7.7.7.7, 198.51.100.9"),
        ]);
        assert_eq!(
            guards.client_ip(Some(edge), &forwarded),
            Some("198.51.100.9".parse().expect("ip"))
        );
        assert_eq!(guards.client_ip(Some(edge), &headers(&[])), Some(edge.ip()));
    }

    #[test]
    fn a_key_file_holds_hashes_and_a_bad_line_is_named() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("keys");
        std::fs::write(&path, format!("# ops\n{}\n\n", key_file_line("k1"))).expect("write");
        let keys = ApiKeys::load(&path, KeyScope::Writes).expect("loads");
        assert!(keys.admits(&headers(&[("authorization", "Bearer k1")])));
        assert!(keys.admits(&headers(&[("authorization", "bearer k1")])));
        for refused in ["Bearer k2", "Bearer ", "Basic k1", "k1"] {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(refused));
            assert!(!keys.admits(&h), "{refused}");
        }
        assert!(!keys.admits(&HeaderMap::new()));

        std::fs::write(&path, "k1\n").expect("write");
        let err = keys
            .reload()
            .expect_err("a plain key is refused")
            .to_string();
        assert!(err.contains("line 1"), "{err}");
        // The keys in use are kept.
        assert!(keys.admits(&headers(&[("authorization", "Bearer k1")])));
        std::fs::write(&path, "").expect("write");
        assert!(ApiKeys::load(&path, KeyScope::Writes).is_err());
        assert!(ApiKeys::load(&dir.path().join("missing"), KeyScope::Writes).is_err());
    }

    #[test]
    fn a_client_over_its_burst_waits_and_others_are_not_affected() {
        let limit = RateLimit::new(
            NonZeroU32::new(1).expect("n"),
            NonZeroU32::new(2).expect("n"),
        );
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let b: IpAddr = "192.0.2.2".parse().expect("ip");
        assert!(limit.check(a).is_ok());
        assert!(limit.check(a).is_ok());
        let wait = limit.check(a).expect_err("over the burst");
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        assert!(limit.check(b).is_ok());

        let slow = RateLimit::one_every(Duration::from_secs(60), NonZeroU32::MIN).expect("quota");
        assert!(slow.check(a).is_ok());
        let wait = slow.check(a).expect_err("over the burst");
        assert!(wait > Duration::from_secs(50), "{wait:?}");
        assert!(RateLimit::one_every(Duration::ZERO, NonZeroU32::MIN).is_none());
    }

    #[test]
    fn an_ipv6_client_is_its_64_and_an_ipv4_mapped_one_its_ipv4_address() {
        let limit = RateLimit::one_every(Duration::from_secs(60), NonZeroU32::MIN).expect("quota");
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(limit.check(ip("2001:db8:1:2::1")).is_ok());
        assert!(
            limit.check(ip("2001:db8:1:2:ffff::7")).is_err(),
            "another address of the same /64"
        );
        assert!(limit.check(ip("2001:db8:1:3::1")).is_ok(), "another /64");
        assert!(limit.check(ip("192.0.2.9")).is_ok());
        assert!(
            limit.check(ip("::ffff:192.0.2.9")).is_err(),
            "the same IPv4 client"
        );
    }
}
