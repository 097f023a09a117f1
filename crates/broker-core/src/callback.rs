//! Callback delivery (docs/design.md §8): the SSRF guard, Standard-Webhooks signing, and a sender that
//! retries within a budget.
//!
//! The guard runs twice: when the API accepts a `callback_url` ([`Policy::check`]) and inside
//! the sender's connector, which resolves the host once, refuses any address that is not
//! public, and connects to the address it checked. TLS still verifies the host name. Hosts on
//! `BROKER_CALLBACK_ALLOWLIST` are exempt from both rules (plain `http` and private addresses).

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE, USER_AGENT};
use hyper::{Request as HttpRequest, Uri};
use secrecy::ExposeSecret;

use crate::config::{Allowlist, CallbackSettings};
use crate::http_client::{self, HttpClient};
use crate::worker::backoff;

/// The longest a host name may take to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A callback URL that passed the shape checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub https: bool,
    pub allow_listed: bool,
}

/// Finds the addresses of a host. The system resolver in production; tests may inject one.
pub trait Resolve: Send + Sync {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>;
}

/// The system resolver (`getaddrinfo` through tokio).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

/// Who may be called back.
#[derive(Clone)]
pub struct Policy {
    allowlist: Allowlist,
    resolver: Arc<dyn Resolve>,
}

impl Policy {
    pub fn new(allowlist: Allowlist) -> Self {
        Self::with_resolver(allowlist, Arc::new(SystemResolver))
    }

    pub fn with_resolver(allowlist: Allowlist, resolver: Arc<dyn Resolve>) -> Self {
        Self {
            allowlist,
            resolver,
        }
    }

    /// The checks that need no network: scheme, host, no credentials.
    pub fn target(&self, url: &str) -> Result<Target, String> {
        let uri: Uri = url
            .parse()
            .map_err(|_| "callback_url: not a valid absolute URL".to_owned())?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err("callback_url: must be an https:// URL".into()),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| "callback_url: must name a host".to_owned())?;
        if authority.as_str().contains('@') {
            return Err("callback_url: must not carry credentials (user:password@)".into());
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        if host.is_empty() {
            return Err("callback_url: must name a host".into());
        }
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let allow_listed = self.allowlist.permits(&host, port);
        if !https && !allow_listed {
            return Err(format!(
                "callback_url: must use https (plain http only for hosts on BROKER_CALLBACK_ALLOWLIST; {host} is not)"
            ));
        }
        Ok(Target {
            host,
            port,
            https,
            allow_listed,
        })
    }

    /// Resolves a target once and returns the addresses it may be reached on: all of them
    /// public, unless the host is allow-listed.
    pub async fn addresses(&self, target: &Target) -> Result<Vec<SocketAddr>, String> {
        let addresses = match target.host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, target.port)],
            Err(_) => tokio::time::timeout(
                RESOLVE_TIMEOUT,
                self.resolver.resolve(&target.host, target.port),
            )
            .await
            .map_err(|_| format!("callback_url: host {} did not resolve in time", target.host))?
            .map_err(|_| format!("callback_url: host {} does not resolve", target.host))?,
        };
        if addresses.is_empty() {
            return Err(format!(
                "callback_url: host {} does not resolve",
                target.host
            ));
        }
        if !target.allow_listed {
            if let Some(bad) = addresses.iter().find(|a| !is_public(a.ip())) {
                return Err(format!(
                    "callback_url: host {} resolves to {}, which is not a public address \
                     (private, loopback, link-local, reserved and unspecified addresses are \
                     refused unless the host is on BROKER_CALLBACK_ALLOWLIST)",
                    target.host,
                    bad.ip()
                ));
            }
        }
        Ok(addresses)
    }

    /// Both checks, as the API runs them when a `callback_url` arrives.
    pub async fn check(&self, url: &str) -> Result<Target, String> {
        let target = self.target(url)?;
        self.addresses(&target).await?;
        Ok(target)
    }
}

/// Whether an address is on the public internet: not private, loopback, link-local,
/// shared (CGNAT), documentation, benchmarking, multicast, reserved or unspecified.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0                                   // "this network"
        || (a == 100 && (64..128).contains(&b))     // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0)           // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19))       // benchmarking
        || a >= 240) // reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = embedded_v4(ip) {
        return is_public_v4(v4);
    }
    let s = ip.segments();
    // Only global unicast (2000::/3) can be public, minus its special blocks.
    (s[0] & 0xe000) == 0x2000
        && !(s[0] == 0x2001 && s[1] == 0x0db8)   // documentation
        && !(s[0] == 0x2001 && s[1] < 0x0200)    // IETF protocol assignments, Teredo
        && s[0] != 0x2002 // 6to4: refused outright
}

/// The IPv4 address inside an IPv4-mapped, IPv4-compatible or NAT64 IPv6 address.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if s[..5] == [0; 5] && s[5] == 0xffff {
        return Some(tail); // ::ffff:a.b.c.d
    }
    if s[0] == 0x0064 && s[1] == 0xff9b && s[2..6] == [0; 4] {
        return Some(tail); // 64:ff9b::a.b.c.d (NAT64)
    }
    if s[..6] == [0; 6] && !ip.is_loopback() && !ip.is_unspecified() {
        return Some(tail); // ::a.b.c.d (deprecated IPv4-compatible)
    }
    None
}

/// Refused by the policy: not worth retrying.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Opens callback connections: each new connection's URL goes through the policy again (so a
/// name that later resolves elsewhere is checked again), and only the addresses it checked are
/// connected to. A refusal is a [`Refused`] in the error's chain of causes.
fn checked_dial(policy: Policy, connect_timeout: Duration) -> http_client::Dial {
    Arc::new(move |uri: Uri| {
        let policy = policy.clone();
        Box::pin(async move {
            let target = policy
                .target(&uri.to_string())
                .map_err(|e| Box::new(Refused(e)) as http_client::BoxError)?;
            let addresses = policy
                .addresses(&target)
                .await
                .map_err(|e| Box::new(Refused(e)) as http_client::BoxError)?;
            http_client::connect_any(&addresses, connect_timeout).await
        })
    })
}

/// Standard-Webhooks signing: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
#[derive(Clone)]
pub struct Signer {
    key: ring::hmac::Key,
}

impl Signer {
    /// A `whsec_<base64>` secret signs with the decoded bytes; any other text with its bytes.
    pub fn new(secret: &str) -> Self {
        let bytes = secret
            .strip_prefix("whsec_")
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .unwrap_or_else(|| secret.as_bytes().to_vec());
        Self {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes),
        }
    }

    pub fn signature(&self, webhook_id: &str, timestamp: u64, body: &[u8]) -> String {
        let mut ctx = ring::hmac::Context::with_key(&self.key);
        ctx.update(webhook_id.as_bytes());
        ctx.update(b".");
        ctx.update(itoa::Buffer::new().format(timestamp).as_bytes());
        ctx.update(b".");
        ctx.update(body);
        let tag = ctx.sign();
        let mut signature = String::with_capacity(48);
        signature.push_str("v1,");
        base64::engine::general_purpose::STANDARD.encode_string(tag.as_ref(), &mut signature);
        signature
    }
}

/// How a delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub delivered: bool,
    pub attempts: u32,
    /// Why the last attempt failed (never includes the URL, which may carry tokens).
    pub last_error: Option<String>,
}

impl Delivery {
    fn failed(attempts: u32, error: impl Into<String>) -> Self {
        Self {
            delivered: false,
            attempts,
            last_error: Some(error.into()),
        }
    }
}

/// What one attempt came to.
enum Attempt {
    Delivered,
    Retry(String, Option<Duration>),
    /// The receiver may have acted on it (no answer in time, a connection lost after the
    /// request went out): retried under [`Retries::Broker`], or when repeating is harmless.
    Unsure(String, Option<Duration>),
    /// A `5xx` other than `503`: retried only under [`Retries::Broker`].
    Failed(String, Option<Duration>),
    GiveUp(String),
}

/// Which failed attempts are tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retries {
    /// The broker's own callbacks (`callback_url`): connection errors, timeouts, 408, 429
    /// and 5xx.
    Broker,
    /// The worker-shaped callbacks of `/api/v1/chat/callback`: what the receiver surely did
    /// not act on (no connection, 408, 425, 429, 503); with `unsure`, also timeouts and lost
    /// connections (a repeated `complete` is dropped by the gateways). Other `5xx` are final:
    /// a gateway answers `502` after delivering part of an answer, and would send that part
    /// again.
    Worker { unsure: bool },
}

/// Extra headers of a worker-shaped callback.
#[derive(Debug, Clone, Copy, Default)]
pub struct Extra<'a> {
    /// `X-Engine-Token`: the key the submitting client authenticated with.
    pub engine_token: Option<&'a str>,
    /// The client's W3C `traceparent`, passed on.
    pub traceparent: Option<&'a str>,
}

/// The most of a receiver's answer body read (and dropped) so its connection can be reused.
const MAX_ANSWER_BODY: usize = 64 * 1024;
/// Idle connections kept per receiving origin unless [`Sender::keep_idle`] says otherwise.
const MAX_IDLE: usize = 64;

/// Sends signed callbacks, retrying connection errors, 408, 429 and 5xx within the budget.
#[derive(Clone)]
pub struct Sender {
    policy: Policy,
    /// Keep-alive connections per receiving origin; each new one dialled through the policy.
    client: Result<HttpClient, String>,
    signer: Option<Signer>,
    budget: Duration,
    attempt_timeout: Duration,
    connect_timeout: Duration,
    retry_base: Duration,
    trust: http_client::Trust,
}

impl Sender {
    pub fn new(settings: &CallbackSettings) -> Self {
        Self::with_policy(settings, Policy::new(settings.allowlist.clone()))
    }

    pub fn with_policy(settings: &CallbackSettings, policy: Policy) -> Self {
        let connect_timeout = settings.attempt_timeout.min(Duration::from_secs(10));
        let mut sender = Self {
            client: Err(String::new()),
            policy,
            signer: settings
                .secret
                .as_ref()
                .map(|s| Signer::new(s.expose_secret())),
            budget: settings.budget,
            attempt_timeout: settings.attempt_timeout,
            connect_timeout,
            retry_base: Duration::from_millis(200),
            trust: settings.trust.clone(),
        };
        sender.client = sender.build_client(MAX_IDLE);
        sender
    }

    fn build_client(&self, max_idle: usize) -> Result<HttpClient, String> {
        let dial = checked_dial(self.policy.clone(), self.connect_timeout);
        HttpClient::new(dial, &self.trust, max_idle).map_err(|e| format!("callback client: {e}"))
    }

    /// The same sender keeping up to `max` idle connections per origin: as many as callbacks
    /// can be under way at once, so a burst to one receiver does not close and reopen them.
    pub fn keep_idle(mut self, max: usize) -> Self {
        self.client = self.build_client(max);
        self
    }

    /// Whether deliveries can be signed (a secret is configured).
    pub fn can_sign(&self) -> bool {
        self.signer.is_some()
    }

    /// Delivers `body` to `url` until it is accepted (2xx), refused for good (another status,
    /// or the policy), the budget is spent, or `stop` resolves.
    pub async fn deliver(
        &self,
        url: &str,
        webhook_id: &str,
        body: &[u8],
        stop: impl Future<Output = ()>,
    ) -> Delivery {
        self.deliver_with(
            url,
            webhook_id,
            body,
            Extra::default(),
            Retries::Broker,
            stop,
        )
        .await
    }

    /// [`Sender::deliver`] with `extra` headers, retrying what `retries` says.
    pub async fn deliver_with(
        &self,
        url: &str,
        webhook_id: &str,
        body: &[u8],
        extra: Extra<'_>,
        retries: Retries,
        stop: impl Future<Output = ()>,
    ) -> Delivery {
        tokio::pin!(stop);
        let Some(signer) = &self.signer else {
            return Delivery::failed(
                0,
                "BROKER_CALLBACK_SECRET is not set: nothing can be signed",
            );
        };
        let Ok(uri) = url.parse::<Uri>() else {
            return Delivery::failed(0, "callback_url is not a valid URL");
        };
        if !webhook_id.bytes().all(|b| b.is_ascii_graphic()) {
            return Delivery::failed(0, "the webhook id is not a valid header value");
        }
        // The shape checks, as the API ran them; the address is checked for every connection.
        if let Err(refused) = self.policy.target(url) {
            return Delivery::failed(1, refused);
        }
        let client = match &self.client {
            Ok(client) => client,
            Err(e) => return Delivery::failed(1, e.clone()),
        };
        let engine_token = match extra.engine_token.map(HeaderValue::from_str) {
            None => None,
            Some(Ok(mut value)) => {
                value.set_sensitive(true);
                Some(value)
            }
            Some(Err(_)) => {
                return Delivery::failed(0, "the engine token is not a valid header value")
            }
        };
        let traceparent = extra
            .traceparent
            .and_then(|t| HeaderValue::from_str(t).ok());
        let request = Request {
            client,
            uri,
            webhook_id,
            body: Bytes::copy_from_slice(body),
            signer,
            engine_token,
            traceparent,
        };
        let deadline = Instant::now() + self.budget;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = tokio::select! {
                a = request.attempt(left.min(self.attempt_timeout)) => a,
                () = &mut stop => Attempt::GiveUp("the drainer stopped before the callback was delivered".into()),
            };
            let (error, hint) = match attempt {
                Attempt::Delivered => {
                    return Delivery {
                        delivered: true,
                        attempts,
                        last_error: None,
                    }
                }
                Attempt::GiveUp(error) => return Delivery::failed(attempts, error),
                Attempt::Retry(error, hint) => (error, hint),
                Attempt::Unsure(error, hint) => match retries {
                    Retries::Broker | Retries::Worker { unsure: true } => (error, hint),
                    Retries::Worker { unsure: false } => {
                        return Delivery::failed(
                            attempts,
                            format!("{error}; not repeated, as the receiver may have acted on it"),
                        )
                    }
                },
                Attempt::Failed(error, hint) => match retries {
                    Retries::Broker => (error, hint),
                    Retries::Worker { .. } => return Delivery::failed(attempts, error),
                },
            };
            let delay =
                hint.unwrap_or_else(|| backoff(self.retry_base, Duration::from_secs(10), attempts));
            if Instant::now() + delay >= deadline {
                let spent = format!(
                    "{error}; retry budget of {} ms spent",
                    self.budget.as_millis()
                );
                return Delivery::failed(attempts, spent);
            }
            tracing::info!(attempt = attempts, %error, delay_ms = delay.as_millis() as u64, "callback not delivered yet; retrying");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = &mut stop => {
                    let stopped = format!("{error}; the drainer stopped before the callback was delivered");
                    return Delivery::failed(attempts, stopped);
                }
            }
        }
    }
}

/// One callback's request, sent once per attempt.
struct Request<'a> {
    client: &'a HttpClient,
    uri: Uri,
    webhook_id: &'a str,
    body: Bytes,
    signer: &'a Signer,
    engine_token: Option<HeaderValue>,
    traceparent: Option<HeaderValue>,
}

/// Every callback's `User-Agent`.
const AGENT: &str = concat!("bt-servant-broker/", env!("CARGO_PKG_VERSION"));

impl Request<'_> {
    async fn attempt(&self, timeout: Duration) -> Attempt {
        let timestamp = crate::clock::now_ms() / 1000;
        let signature = self
            .signer
            .signature(self.webhook_id, timestamp, &self.body);
        let request = HttpRequest::post(self.uri.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, AGENT)
            .header("webhook-id", self.webhook_id)
            .header("webhook-timestamp", HeaderValue::from(timestamp))
            .header("webhook-signature", signature);
        let request = match &self.engine_token {
            Some(token) => request.header("x-engine-token", token.clone()),
            None => request,
        };
        let request = match &self.traceparent {
            Some(traceparent) => request.header("traceparent", traceparent.clone()),
            None => request,
        }
        .body(Full::new(self.body.clone()));
        let Ok(request) = request else {
            return Attempt::GiveUp("the callback request could not be built".into());
        };
        let response = match tokio::time::timeout(timeout, self.client.send(request)).await {
            Err(_) => {
                return Attempt::Unsure(
                    format!("no answer within {} ms", timeout.as_millis()),
                    None,
                )
            }
            Ok(Err(e)) => {
                if let Some(refused) = http_client::find_cause::<Refused>(e.as_ref()) {
                    return Attempt::GiveUp(refused.0.clone());
                }
                let error = format!("connection failed: {}", chain(e.as_ref()));
                let unsent =
                    http_client::find_cause::<hyper_util::client::legacy::Error>(e.as_ref())
                        .is_some_and(hyper_util::client::legacy::Error::is_connect);
                return if unsent {
                    Attempt::Retry(error, None)
                } else {
                    Attempt::Unsure(error, None)
                };
            }
            Ok(Ok(response)) => response,
        };
        let status = response.status().as_u16();
        let retry_after = http_client::retry_after(&response).map(Duration::from_secs);
        // Read (and drop) a bounded part of the body: read to its end, the connection goes
        // back to the pool; otherwise it is closed.
        let mut body = response.into_body();
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            http_client::collect(&mut body, MAX_ANSWER_BODY),
        )
        .await;
        if (200..300).contains(&status) {
            Attempt::Delivered
        } else if matches!(status, 408 | 425 | 429 | 503) {
            Attempt::Retry(format!("the receiver answered {status}"), retry_after)
        } else if (500..600).contains(&status) {
            Attempt::Failed(format!("the receiver answered {status}"), retry_after)
        } else {
            Attempt::GiveUp(format!("the receiver answered {status}"))
        }
    }
}

/// An error and its causes, `: `-joined (hyper's top-level errors say little alone).
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    struct Fixed(Vec<IpAddr>);

    impl Resolve for Fixed {
        fn resolve<'a>(
            &'a self,
            _: &'a str,
            port: u16,
        ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
            let out = self.0.iter().map(|ip| SocketAddr::new(*ip, port)).collect();
            Box::pin(async move { Ok(out) })
        }
    }

    fn policy(allow: &str, ips: &[&str]) -> Policy {
        Policy::with_resolver(
            Allowlist::parse(allow).unwrap(),
            Arc::new(Fixed(ips.iter().map(|i| i.parse().unwrap()).collect())),
        )
    }

    #[test]
    fn address_classes() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fe80::1",
            "fc00::1",
            "fd12::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2001::1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["1.1.1.1", "8.8.8.8", "2606:4700::1111", "::ffff:1.1.1.1"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[tokio::test]
    async fn the_guard_refuses_what_it_must() {
        let p = policy("", &["93.184.215.14"]);
        assert!(p.check("https://hooks.example/cb?x=1").await.is_ok());
        let refused = |url: &'static str, p: Policy| async move { p.check(url).await.unwrap_err() };
        assert!(refused("http://hooks.example/cb", p.clone())
            .await
            .contains("https"));
        assert!(refused("ftp://hooks.example/cb", p.clone())
            .await
            .contains("https"));
        assert!(refused("https://u:pw@hooks.example/", p.clone())
            .await
            .contains("credentials"));
        assert!(refused("https://127.0.0.1/cb", p.clone())
            .await
            .contains("127.0.0.1"));
        assert!(refused("https://[::1]:8443/cb", p.clone())
            .await
            .contains("::1"));
        assert!(refused("/relative", p.clone())
            .await
            .contains("callback_url"));
        // A name that resolves to a private address, even among public ones.
        let p = policy("", &["93.184.215.14", "10.0.0.5"]);
        let e = refused("https://internal.example/cb", p).await;
        assert!(e.contains("10.0.0.5"), "{e}");
        // The allow-list lifts both rules for the hosts (and ports) it names.
        let p = policy("internal.example,127.0.0.1:9000", &["10.0.0.5"]);
        assert!(p.check("http://internal.example/cb").await.is_ok());
        assert!(p.check("http://127.0.0.1:9000/cb").await.is_ok());
        assert!(p.check("http://127.0.0.1:9001/cb").await.is_err());
        assert!(p.check("https://127.0.0.1:9001/cb").await.is_err());
    }

    #[tokio::test]
    async fn the_dial_checks_again_at_delivery() {
        // The name passed the API's check, and now resolves to loopback.
        let p = policy("", &["127.0.0.1"]);
        let uri: Uri = "https://rebound.example/cb".parse().unwrap();
        let e = checked_dial(p, Duration::from_secs(1))(uri)
            .await
            .expect_err("refused");
        let refused = http_client::find_cause::<Refused>(e.as_ref());
        assert!(refused.is_some_and(|r| r.0.contains("127.0.0.1")), "{e}");
    }

    /// A receiver on loopback answering each request with the next of `answers` on one
    /// keep-alive connection; returns its port and the requests it read.
    async fn receiver(
        answers: Vec<&'static str>,
    ) -> (u16, Arc<Mutex<Vec<String>>>, Arc<Mutex<usize>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (seen, accepted) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(0)));
        let (requests, count) = (seen.clone(), accepted.clone());
        tokio::spawn(async move {
            let mut answers = answers.into_iter();
            while let Ok((mut socket, _)) = listener.accept().await {
                *count.lock().expect("lock") += 1;
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                for answer in answers.by_ref() {
                    // One request: its head, then Content-Length bytes of body.
                    let request = loop {
                        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&got[..end]).to_string();
                            let length: usize = head
                                .lines()
                                .find_map(|l| {
                                    let (name, value) = l.split_once(':')?;
                                    name.eq_ignore_ascii_case("content-length")
                                        .then(|| value.trim().parse().ok())?
                                })
                                .unwrap_or(0);
                            if got.len() >= end + 4 + length {
                                let all: Vec<u8> = got.drain(..end + 4 + length).collect();
                                break String::from_utf8_lossy(&all).to_string();
                            }
                        }
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    };
                    requests.lock().expect("lock").push(request);
                    if socket.write_all(answer.as_bytes()).await.is_err() {
                        break;
                    }
                }
            }
        });
        (port, seen, accepted)
    }

    #[tokio::test]
    async fn callbacks_are_signed_retried_and_sent_on_one_kept_connection() {
        let (port, seen, accepted) = receiver(vec![
            "HTTP/1.1 503 Busy\r\nRetry-After: 0\r\nContent-Length: 4\r\n\r\nbusy",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        ])
        .await;
        let settings = CallbackSettings {
            secret: Some("whsec_c2VjcmV0".to_owned().into()),
            allowlist: Allowlist::parse(&format!("127.0.0.1:{port}")).expect("allowlist"),
            budget: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(5),
            trust: crate::http_client::Trust::default(),
        };
        let sender = Sender::new(&settings);
        let url = format!("http://127.0.0.1:{port}/hooks/in?token=t");
        let never = std::future::pending::<()>;
        let delivery = sender.deliver(&url, "msg_1", b"{\"a\":1}", never()).await;
        assert_eq!(
            (delivery.delivered, delivery.attempts),
            (true, 2),
            "{delivery:?}"
        );
        let refused = sender.deliver(&url, "msg_2", b"{}", never()).await;
        assert_eq!(
            (
                refused.delivered,
                refused.attempts,
                refused.last_error.as_deref()
            ),
            (false, 1, Some("the receiver answered 404"))
        );
        assert_eq!(
            *accepted.lock().expect("lock"),
            1,
            "one connection for all three"
        );

        let seen = seen.lock().expect("lock").clone();
        assert_eq!(seen.len(), 3);
        let header = |request: &str, name: &str| {
            request
                .lines()
                .find_map(|l| {
                    let (n, value) = l.split_once(": ")?;
                    n.eq_ignore_ascii_case(name).then(|| value.to_owned())
                })
                .unwrap_or_else(|| panic!("no {name} in {request}"))
        };
        let first = &seen[0];
        assert!(
            first.starts_with("POST /hooks/in?token=t HTTP/1.1\r\n"),
            "{first}"
        );
        assert_eq!(header(first, "Host"), format!("127.0.0.1:{port}"));
        assert_eq!(header(first, "webhook-id"), "msg_1");
        assert_eq!(header(first, "Content-Type"), "application/json");
        assert_eq!(
            header(first, "User-Agent"),
            concat!("bt-servant-broker/", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(header(first, "Content-Length"), "7");
        assert!(first.ends_with("\r\n\r\n{\"a\":1}"), "{first}");
        let timestamp: u64 = header(first, "webhook-timestamp")
            .parse()
            .expect("timestamp");
        let expected = Signer::new("secret").signature("msg_1", timestamp, b"{\"a\":1}");
        assert_eq!(header(first, "webhook-signature"), expected);
        assert_eq!(header(&seen[2], "webhook-id"), "msg_2");
    }

    #[test]
    fn signatures_follow_standard_webhooks() {
        // Key "secret" as whsec_ base64, and as raw text, sign the same way.
        let a = Signer::new("whsec_c2VjcmV0").signature("msg_1", 1_700_000_000, b"{}");
        let b = Signer::new("secret").signature("msg_1", 1_700_000_000, b"{}");
        assert_eq!(a, b);
        // Computed independently: base64(HMAC-SHA256("secret", "msg_1.1700000000.{}")).
        assert_eq!(a, "v1,A5oIrJxXPB/PkULSoVu0e4khvPiqpF9vljmhkSKg0FI=");
        let c = Signer::new("secret").signature("msg_1", 1_700_000_000, b"{ }");
        assert_ne!(a, c);
    }
}
