//! Settings of every broker process: defaults < optional TOML file < environment.
//!
//! The environment keeps the names operators already use (`REDIS_URL`, `WORKER_BASE_URL`,
//! `WORKER_API_KEY`, `BROKER_API_KEY`, `HOST`, `PORT`, `LOG_LEVEL`); every other setting has a
//! default and a `BROKER_*`, `DRAINER_*` or `WORKER_*` name. Raw values are read first and
//! then checked together, so a bad configuration is reported all at once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::http_client::Trust;

/// Exit code for bad configuration (`EX_USAGE`).
pub const EXIT_BAD_CONFIG: i32 = 64;

/// Names of the environment variables the settings are read from, one per setting.
pub const ENV_NAMES: &[&str] = &[
    "REDIS_URL",
    "REDIS_TIMEOUT_MS",
    "REDIS_CONNECT_TIMEOUT_MS",
    "BROKER_REDIS_WAIT_REPLICAS",
    "BROKER_REDIS_WAIT_TIMEOUT_MS",
    "BROKER_KEY_PREFIX",
    "BROKER_SHARD",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "HOST",
    "PORT",
    "BROKER_API_KEY",
    "BROKER_API_KEYS",
    "BROKER_ADMIN_KEYS",
    "BROKER_INSECURE_NO_AUTH",
    "BROKER_DEFAULT_ORG",
    "BROKER_SYNC_TIMEOUT_SECS",
    "BROKER_WAITER_RECHECK_SECS",
    "BROKER_MAX_QUEUE_DEPTH",
    "BROKER_QUEUE_FULL_RETRY_AFTER_SECS",
    "BROKER_DEDUP_TTL_SECS",
    "BROKER_RESULT_TTL_SECS",
    "BROKER_MAX_BODY_BYTES",
    "BROKER_BODY_TIMEOUT_SECS",
    "BROKER_MAX_CONNECTIONS",
    "BROKER_INSTANCE_ID",
    "BROKER_MAX_CLAIMS",
    "BROKER_DEAD_LIST_MAX",
    "BROKER_EVENTS_MAX",
    "BROKER_SSE_KEEPALIVE_MS",
    "BROKER_API_WORKERS",
    "BROKER_CALLBACK_SECRET",
    "BROKER_CALLBACK_ALLOWLIST",
    "BROKER_CALLBACK_BUDGET_MS",
    "BROKER_CALLBACK_TIMEOUT_MS",
    "BROKER_EXTRA_CA_FILE",
    "BROKER_PUBLIC_URL",
    "WORKER_BASE_URL",
    "WORKER_API_KEY",
    "WORKER_CONNECT_TIMEOUT_MS",
    "WORKER_IDLE_TIMEOUT_SECS",
    "WORKER_MAX_TURN_SECS",
    "WORKER_MAX_FRAME_BYTES",
    "WORKER_MAX_ATTEMPTS",
    "WORKER_RETRY_BASE_MS",
    "WORKER_RETRY_MAX_MS",
    "WORKER_BUSY_MAX_WAIT_SECS",
    "DRAINER_ID",
    "DRAINER_CONCURRENCY",
    "DRAINER_HEARTBEAT_MS",
    "DRAINER_DEAD_AFTER_MS",
    "DRAINER_REAP_INTERVAL_MS",
    "DRAINER_RECONCILE_INTERVAL_MS",
    "DRAINER_BLOCK_MS",
    "DRAINER_SHUTDOWN_GRACE_SECS",
];

/// The settings as read, before they are checked. Field names are the lower-cased
/// environment names.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default)]
struct Raw {
    redis_url: String,
    redis_timeout_ms: u64,
    redis_connect_timeout_ms: u64,
    broker_redis_wait_replicas: u64,
    broker_redis_wait_timeout_ms: u64,
    broker_key_prefix: String,
    broker_shard: String,
    log_level: String,
    log_format: String,
    host: String,
    port: Option<u64>,
    broker_api_key: String,
    broker_api_keys: String,
    broker_admin_keys: String,
    broker_insecure_no_auth: bool,
    broker_default_org: String,
    broker_sync_timeout_secs: u64,
    broker_waiter_recheck_secs: u64,
    broker_max_queue_depth: u64,
    broker_queue_full_retry_after_secs: u64,
    broker_dedup_ttl_secs: u64,
    broker_result_ttl_secs: u64,
    broker_max_body_bytes: u64,
    broker_body_timeout_secs: u64,
    broker_max_connections: u64,
    broker_instance_id: String,
    broker_max_claims: u64,
    broker_dead_list_max: u64,
    broker_events_max: u64,
    broker_sse_keepalive_ms: u64,
    broker_api_workers: Option<u64>,
    broker_callback_secret: String,
    broker_public_url: String,
    broker_callback_allowlist: String,
    broker_callback_budget_ms: u64,
    broker_callback_timeout_ms: u64,
    broker_extra_ca_file: String,
    worker_base_url: String,
    worker_api_key: String,
    worker_connect_timeout_ms: u64,
    worker_idle_timeout_secs: u64,
    worker_max_turn_secs: u64,
    worker_max_frame_bytes: u64,
    worker_max_attempts: u64,
    worker_retry_base_ms: u64,
    worker_retry_max_ms: u64,
    worker_busy_max_wait_secs: u64,
    drainer_id: String,
    drainer_concurrency: u64,
    drainer_heartbeat_ms: u64,
    drainer_dead_after_ms: u64,
    drainer_reap_interval_ms: u64,
    drainer_reconcile_interval_ms: u64,
    drainer_block_ms: u64,
    drainer_shutdown_grace_secs: u64,
}

impl Default for Raw {
    fn default() -> Self {
        Self {
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_timeout_ms: 5_000,
            redis_connect_timeout_ms: 2_000,
            broker_redis_wait_replicas: 0,
            broker_redis_wait_timeout_ms: 1_000,
            broker_key_prefix: "bt".into(),
            broker_shard: "0".into(),
            log_level: "info".into(),
            log_format: "json".into(),
            host: "0.0.0.0".into(),
            port: None,
            broker_api_key: String::new(),
            broker_api_keys: String::new(),
            broker_admin_keys: String::new(),
            broker_insecure_no_auth: false,
            broker_default_org: "unfoldingWord".into(),
            broker_sync_timeout_secs: 300,
            broker_waiter_recheck_secs: 10,
            broker_max_queue_depth: 50,
            broker_queue_full_retry_after_secs: 5,
            broker_dedup_ttl_secs: 86_400,
            broker_result_ttl_secs: 86_400,
            broker_max_body_bytes: 36 * 1024 * 1024,
            broker_body_timeout_secs: 60,
            broker_max_connections: 25_000,
            broker_instance_id: String::new(),
            broker_public_url: String::new(),
            broker_max_claims: 5,
            broker_dead_list_max: 10_000,
            broker_events_max: 1_000,
            broker_sse_keepalive_ms: 15_000,
            broker_api_workers: None,
            broker_callback_secret: String::new(),
            broker_callback_allowlist: String::new(),
            broker_callback_budget_ms: 60_000,
            broker_callback_timeout_ms: 10_000,
            broker_extra_ca_file: String::new(),
            worker_base_url: "http://127.0.0.1:8787".into(),
            worker_api_key: String::new(),
            worker_connect_timeout_ms: 5_000,
            worker_idle_timeout_secs: 120,
            worker_max_turn_secs: 1_800,
            worker_max_frame_bytes: 32 * 1024 * 1024,
            worker_max_attempts: 3,
            worker_retry_base_ms: 500,
            worker_retry_max_ms: 10_000,
            worker_busy_max_wait_secs: 60,
            drainer_id: String::new(),
            drainer_concurrency: 256,
            drainer_heartbeat_ms: 2_000,
            drainer_dead_after_ms: 15_000,
            drainer_reap_interval_ms: 5_000,
            drainer_reconcile_interval_ms: 30_000,
            drainer_block_ms: 2_000,
            drainer_shutdown_grace_secs: 90,
        }
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// One named client API key.
#[derive(Clone)]
pub struct ApiKey {
    pub name: String,
    pub key: SecretString,
}

/// Redis connection and key layout.
#[derive(Clone)]
pub struct RedisSettings {
    /// May carry a password: never log it, use [`RedisSettings::redacted_url`].
    pub url: SecretString,
    pub response_timeout: Duration,
    pub connect_timeout: Duration,
    /// `BROKER_REDIS_WAIT_REPLICAS`: the API acknowledges a message only once this many
    /// replicas have it (`WAIT`); 0 does not wait.
    pub wait_replicas: u32,
    /// `BROKER_REDIS_WAIT_TIMEOUT_MS`: how long `WAIT` may take before the message counts as
    /// not acknowledged.
    pub wait_timeout: Duration,
    pub key_prefix: String,
    pub shard: String,
}

/// What the API needs beyond Redis.
#[derive(Clone)]
pub struct ApiSettings {
    pub keys: Vec<ApiKey>,
    /// `BROKER_ADMIN_KEYS`: the keys of `/admin/v1/` and the console; none turns them off.
    pub admin_keys: Vec<ApiKey>,
    pub insecure_no_auth: bool,
    pub default_org: String,
    pub sync_timeout: Duration,
    pub waiter_recheck: Duration,
    pub max_queue_depth: u64,
    pub queue_full_retry_after: Duration,
    pub dedup_ttl: Duration,
    pub result_ttl: Duration,
    pub max_body_bytes: usize,
    /// A request's whole body must arrive within this (`BROKER_BODY_TIMEOUT_SECS`).
    pub body_timeout: Duration,
    /// Open client connections per API worker thread (`BROKER_MAX_CONNECTIONS`); more wait
    /// in the listen backlog.
    pub max_connections: usize,
    pub instance_id: String,
    /// Silence after which an SSE client gets a keepalive frame.
    pub sse_keepalive: Duration,
    /// Threads serving requests, each with its own Redis connections and reply subscription:
    /// `BROKER_API_WORKERS`, else one per core.
    pub workers: usize,
}

/// Callback delivery: who may be called, how deliveries are signed, how long to keep trying.
#[derive(Clone)]
pub struct CallbackSettings {
    /// The Standard-Webhooks signing secret; callbacks are refused while it is unset.
    pub secret: Option<SecretString>,
    /// Hosts exempt from the https-only and public-address rules.
    pub allowlist: Allowlist,
    /// Total time one delivery may take, retries included.
    pub budget: Duration,
    /// Time one attempt may take.
    pub attempt_timeout: Duration,
    /// The certificate authorities trusted for `https` callback URLs.
    pub trust: Trust,
}

/// Hosts (optionally `host:port`) that callbacks may reach over plain http or on private
/// addresses: `BROKER_CALLBACK_ALLOWLIST`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    entries: Vec<(String, Option<u16>)>,
}

impl Allowlist {
    /// Parses `host[:port]` entries separated by commas; IPv6 literals in brackets.
    pub fn parse(text: &str) -> Result<Self, Vec<String>> {
        let mut entries = Vec::new();
        let mut problems = Vec::new();
        for (i, entry) in comma_entries(text) {
            match parse_host_port(entry) {
                Some((host, port)) => entries.push((host, port)),
                None => problems.push(format!(
                    "BROKER_CALLBACK_ALLOWLIST: entry {} ({entry:?}) must be host or host:port",
                    i + 1
                )),
            }
        }
        if problems.is_empty() {
            Ok(Self { entries })
        } else {
            Err(problems)
        }
    }

    /// Whether `host` (lower-case, IPv6 without brackets) on `port` is listed.
    pub fn permits(&self, host: &str, port: u16) -> bool {
        self.entries
            .iter()
            .any(|(h, p)| h.eq_ignore_ascii_case(host) && p.is_none_or(|p| p == port))
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The non-empty, trimmed entries of a comma-separated setting, numbered from 0.
fn comma_entries(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .enumerate()
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`, lower-cased, brackets removed.
fn parse_host_port(entry: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        v6.parse::<std::net::Ipv6Addr>().ok()?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?.parse::<u16>().ok()?),
        };
        (v6.to_owned(), port)
    } else {
        let (host, port) = match entry.rsplit_once(':') {
            Some((h, p)) => (h, Some(p.parse::<u16>().ok()?)),
            None => (entry, None),
        };
        let ok = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        if !ok {
            return None;
        }
        (host.to_owned(), port)
    };
    Some((host.to_ascii_lowercase(), port))
}

/// How the drainer calls the worker.
#[derive(Clone)]
pub struct WorkerSettings {
    pub base_url: String,
    pub api_key: SecretString,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// `WORKER_MAX_TURN_SECS`: the longest a turn's stream may last, keepalives or not.
    pub max_turn: Duration,
    /// `WORKER_MAX_FRAME_BYTES`: the largest frame the worker may send.
    pub max_frame_bytes: usize,
    pub max_attempts: u32,
    pub retry_base: Duration,
    pub retry_max: Duration,
    pub busy_max_wait: Duration,
    /// The certificate authorities trusted for an `https` worker.
    pub trust: Trust,
}

/// The drainer's own behaviour.
#[derive(Clone)]
pub struct DrainerSettings {
    pub id: String,
    pub concurrency: usize,
    pub heartbeat: Duration,
    pub dead_after: Duration,
    pub reap_interval: Duration,
    pub reconcile_interval: Duration,
    pub block: Duration,
    pub shutdown_grace: Duration,
    pub max_claims: u64,
    pub dead_list_max: u64,
    pub result_ttl: Duration,
    /// Frames kept per message stream (approximate trim).
    pub events_max: u64,
}

/// Every setting of every process, checked.
#[derive(Clone)]
pub struct Settings {
    /// `BROKER_PUBLIC_URL`: the origin clients reach the broker on. Audio and file URLs the
    /// worker builds on its own origin are rewritten to it, so that they are fetched through
    /// the broker's proxy.
    pub public_url: Option<String>,
    pub redis: RedisSettings,
    pub log_level: String,
    pub log_format: LogFormat,
    pub host: String,
    /// `PORT` when given; each binary has its own default.
    pub port: Option<u16>,
    pub api: ApiSettings,
    pub worker: WorkerSettings,
    pub drainer: DrainerSettings,
    pub callbacks: CallbackSettings,
}

/// A configuration that cannot run, with every problem found.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .problems.join("\n  - "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl Settings {
    /// Reads defaults, then the TOML file named by `BROKER_CONFIG_FILE` if set, then the
    /// environment.
    pub fn load() -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Raw::default()));
        if let Some(path) = std::env::var_os("BROKER_CONFIG_FILE") {
            let path = PathBuf::from(path);
            if !path.is_file() {
                return Err(ConfigError {
                    problems: vec![format!("BROKER_CONFIG_FILE: no file at {}", path.display())],
                });
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment.merge(Env::raw().only(ENV_NAMES));
        Self::from_figment(figment)
    }

    /// [`Settings::load`] for a binary's `main`: on a bad configuration, prints every problem
    /// prefixed with `binary` and exits with code 64.
    pub fn load_or_exit(binary: &str) -> Self {
        Self::load().unwrap_or_else(|e| {
            eprintln!("{binary}: {e}");
            std::process::exit(EXIT_BAD_CONFIG);
        })
    }

    /// Builds settings from name/value pairs as the environment would give them, without
    /// touching the process environment (for tests and the local runner).
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Raw::default()));
        let mut unknown = Vec::new();
        for (name, value) in pairs {
            if !ENV_NAMES.contains(&name) {
                unknown.push(format!("{name}: not a setting"));
                continue;
            }
            let parsed = figment::value::Value::from_str(value).unwrap_or_else(|e| match e {});
            figment = figment.merge(Serialized::default(&name.to_ascii_lowercase(), parsed));
        }
        if !unknown.is_empty() {
            return Err(ConfigError { problems: unknown });
        }
        Self::from_figment(figment)
    }

    fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let raw: Raw = figment.extract().map_err(|e| ConfigError {
            problems: e.into_iter().map(|e| describe_figment_error(&e)).collect(),
        })?;
        raw.check()
    }

    /// The port to listen on: `PORT`, else the binary's default.
    pub fn port_or(&self, default: u16) -> u16 {
        self.port.unwrap_or(default)
    }
}

fn describe_figment_error(e: &figment::Error) -> String {
    let name = e
        .path
        .last()
        .map(|p| p.to_ascii_uppercase())
        .unwrap_or_else(|| "config".into());
    format!("{name}: {}", e.kind)
}

impl Raw {
    fn check(self) -> Result<Settings, ConfigError> {
        let mut p = Vec::new();
        let mut positive = |name: &str, value: u64| {
            if value == 0 {
                p.push(format!("{name}: must be greater than 0"));
            }
        };
        positive("REDIS_TIMEOUT_MS", self.redis_timeout_ms);
        positive("REDIS_CONNECT_TIMEOUT_MS", self.redis_connect_timeout_ms);
        positive(
            "BROKER_REDIS_WAIT_TIMEOUT_MS",
            self.broker_redis_wait_timeout_ms,
        );
        positive("BROKER_SYNC_TIMEOUT_SECS", self.broker_sync_timeout_secs);
        positive(
            "BROKER_WAITER_RECHECK_SECS",
            self.broker_waiter_recheck_secs,
        );
        positive("BROKER_MAX_QUEUE_DEPTH", self.broker_max_queue_depth);
        positive("BROKER_DEDUP_TTL_SECS", self.broker_dedup_ttl_secs);
        positive("BROKER_RESULT_TTL_SECS", self.broker_result_ttl_secs);
        positive("BROKER_MAX_BODY_BYTES", self.broker_max_body_bytes);
        positive("BROKER_BODY_TIMEOUT_SECS", self.broker_body_timeout_secs);
        positive("BROKER_MAX_CONNECTIONS", self.broker_max_connections);
        positive("BROKER_MAX_CLAIMS", self.broker_max_claims);
        positive("BROKER_DEAD_LIST_MAX", self.broker_dead_list_max);
        positive("BROKER_EVENTS_MAX", self.broker_events_max);
        positive("BROKER_SSE_KEEPALIVE_MS", self.broker_sse_keepalive_ms);
        if let Some(workers) = self.broker_api_workers {
            positive("BROKER_API_WORKERS", workers);
        }
        positive("BROKER_CALLBACK_BUDGET_MS", self.broker_callback_budget_ms);
        positive(
            "BROKER_CALLBACK_TIMEOUT_MS",
            self.broker_callback_timeout_ms,
        );
        positive("WORKER_CONNECT_TIMEOUT_MS", self.worker_connect_timeout_ms);
        positive("WORKER_IDLE_TIMEOUT_SECS", self.worker_idle_timeout_secs);
        positive("WORKER_MAX_TURN_SECS", self.worker_max_turn_secs);
        positive("WORKER_MAX_FRAME_BYTES", self.worker_max_frame_bytes);
        positive("WORKER_MAX_ATTEMPTS", self.worker_max_attempts);
        positive("DRAINER_CONCURRENCY", self.drainer_concurrency);
        positive("DRAINER_HEARTBEAT_MS", self.drainer_heartbeat_ms);
        positive("DRAINER_REAP_INTERVAL_MS", self.drainer_reap_interval_ms);
        positive(
            "DRAINER_RECONCILE_INTERVAL_MS",
            self.drainer_reconcile_interval_ms,
        );
        positive("DRAINER_BLOCK_MS", self.drainer_block_ms);

        if !(self.redis_url.starts_with("redis://") || self.redis_url.starts_with("rediss://")) {
            p.push("REDIS_URL: must start with redis:// or rediss://".into());
        }
        if !(self.worker_base_url.starts_with("http://")
            || self.worker_base_url.starts_with("https://"))
        {
            p.push("WORKER_BASE_URL: must start with http:// or https://".into());
        }
        let is_key_part = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        };
        if !is_key_part(&self.broker_key_prefix) {
            p.push("BROKER_KEY_PREFIX: must be non-empty letters, digits, '_', '-' or '.'".into());
        }
        if !is_key_part(&self.broker_shard) {
            p.push("BROKER_SHARD: must be non-empty letters, digits, '_', '-' or '.'".into());
        }
        let public_url = self.broker_public_url.trim_end_matches('/');
        let scheme = public_url.starts_with("http://") || public_url.starts_with("https://");
        if !(public_url.is_empty() || scheme) {
            p.push("BROKER_PUBLIC_URL: must start with http:// or https://".into());
        }
        for (name, id) in [
            ("BROKER_INSTANCE_ID", &self.broker_instance_id),
            ("DRAINER_ID", &self.drainer_id),
        ] {
            if !id.is_empty() && !is_key_part(id) {
                p.push(format!("{name}: must be letters, digits, '_', '-' or '.'"));
            }
        }
        let log_format = match self.log_format.as_str() {
            "json" => LogFormat::Json,
            "pretty" | "text" => LogFormat::Pretty,
            _ => {
                p.push("LOG_FORMAT: must be json or pretty".into());
                LogFormat::Json
            }
        };
        let port = match self.port {
            None => None,
            Some(n) => match u16::try_from(n) {
                Ok(port) => Some(port),
                Err(_) => {
                    p.push("PORT: must be at most 65535".into());
                    None
                }
            },
        };
        if self.drainer_dead_after_ms < 2 * self.drainer_heartbeat_ms {
            p.push("DRAINER_DEAD_AFTER_MS: must be at least twice DRAINER_HEARTBEAT_MS".into());
        }
        if self.broker_result_ttl_secs < self.broker_dedup_ttl_secs {
            p.push(
                "BROKER_RESULT_TTL_SECS: must be at least BROKER_DEDUP_TTL_SECS, so a duplicate can \
                 always be answered from the original message"
                    .into(),
            );
        }

        let allowlist = Allowlist::parse(&self.broker_callback_allowlist).unwrap_or_else(|e| {
            p.extend(e);
            Allowlist::default()
        });
        let trust = if self.broker_extra_ca_file.is_empty() {
            Trust::default()
        } else {
            let path = &self.broker_extra_ca_file;
            std::fs::read(path)
                .map_err(|e| format!("cannot read {path}: {e}"))
                .and_then(|pem| Trust::with_extra_pem(&pem).map_err(|e| format!("{path}: {e}")))
                .unwrap_or_else(|e| {
                    p.push(format!("BROKER_EXTRA_CA_FILE: {e}"));
                    Trust::default()
                })
        };
        let callback_secret = self.broker_callback_secret.trim().to_owned();
        if let Some(encoded) = callback_secret.strip_prefix("whsec_") {
            use base64::Engine;
            if base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_or(true, |k| k.is_empty())
            {
                p.push("BROKER_CALLBACK_SECRET: a whsec_ secret must be followed by base64".into());
            }
        }

        let mut keys = Vec::new();
        if !self.broker_api_key.is_empty() {
            keys.push(ApiKey {
                name: "default".into(),
                key: self.broker_api_key.clone().into(),
            });
        }
        let mut admin_keys = Vec::new();
        for (setting, value, into) in [
            ("BROKER_API_KEYS", &self.broker_api_keys, &mut keys),
            (
                "BROKER_ADMIN_KEYS",
                &self.broker_admin_keys,
                &mut admin_keys,
            ),
        ] {
            for (i, entry) in comma_entries(value) {
                match entry.split_once('=') {
                    Some((name, key)) if !name.trim().is_empty() && !key.trim().is_empty() => into
                        .push(ApiKey {
                            name: name.trim().to_owned(),
                            key: key.trim().to_owned().into(),
                        }),
                    _ => p.push(format!(
                        "{setting}: entry {} must look like name=key",
                        i + 1
                    )),
                }
            }
        }
        {
            use secrecy::ExposeSecret;
            if admin_keys.iter().any(|a| {
                keys.iter()
                    .any(|k| k.key.expose_secret() == a.key.expose_secret())
            }) {
                p.push("BROKER_ADMIN_KEYS: an admin key must not also be a client key".into());
            }
        }

        if !p.is_empty() {
            return Err(ConfigError { problems: p });
        }
        let ms = Duration::from_millis;
        let secs = Duration::from_secs;
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let host_part = hostname();
        let instance_id = if self.broker_instance_id.is_empty() {
            format!("api-{host_part}-{}", &suffix[..8])
        } else {
            self.broker_instance_id
        };
        let drainer_id = if self.drainer_id.is_empty() {
            format!("drainer-{host_part}-{}", &suffix[8..16])
        } else {
            self.drainer_id
        };
        let to_usize = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        let to_u32 = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        let public_url = (!self.broker_public_url.is_empty())
            .then(|| self.broker_public_url.trim_end_matches('/').to_owned());
        Ok(Settings {
            public_url,
            redis: RedisSettings {
                url: self.redis_url.into(),
                response_timeout: ms(self.redis_timeout_ms),
                connect_timeout: ms(self.redis_connect_timeout_ms),
                wait_replicas: u32::try_from(self.broker_redis_wait_replicas).unwrap_or(u32::MAX),
                wait_timeout: ms(self.broker_redis_wait_timeout_ms),
                key_prefix: self.broker_key_prefix,
                shard: self.broker_shard,
            },
            log_level: self.log_level,
            log_format,
            host: self.host,
            port,
            api: ApiSettings {
                keys,
                admin_keys,
                insecure_no_auth: self.broker_insecure_no_auth,
                default_org: self.broker_default_org,
                sync_timeout: secs(self.broker_sync_timeout_secs),
                waiter_recheck: secs(self.broker_waiter_recheck_secs),
                max_queue_depth: self.broker_max_queue_depth,
                queue_full_retry_after: secs(self.broker_queue_full_retry_after_secs),
                dedup_ttl: secs(self.broker_dedup_ttl_secs),
                result_ttl: secs(self.broker_result_ttl_secs),
                max_body_bytes: to_usize(self.broker_max_body_bytes),
                body_timeout: secs(self.broker_body_timeout_secs),
                max_connections: to_usize(self.broker_max_connections),
                instance_id,
                sse_keepalive: ms(self.broker_sse_keepalive_ms),
                workers: self.broker_api_workers.map_or_else(
                    || std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
                    to_usize,
                ),
            },
            worker: WorkerSettings {
                base_url: self.worker_base_url.trim_end_matches('/').to_owned(),
                api_key: self.worker_api_key.into(),
                connect_timeout: ms(self.worker_connect_timeout_ms),
                idle_timeout: secs(self.worker_idle_timeout_secs),
                max_turn: secs(self.worker_max_turn_secs),
                max_frame_bytes: to_usize(self.worker_max_frame_bytes),
                max_attempts: to_u32(self.worker_max_attempts),
                retry_base: ms(self.worker_retry_base_ms),
                retry_max: ms(self.worker_retry_max_ms),
                busy_max_wait: secs(self.worker_busy_max_wait_secs),
                trust: trust.clone(),
            },
            drainer: DrainerSettings {
                id: drainer_id,
                concurrency: to_usize(self.drainer_concurrency),
                heartbeat: ms(self.drainer_heartbeat_ms),
                dead_after: ms(self.drainer_dead_after_ms),
                reap_interval: ms(self.drainer_reap_interval_ms),
                reconcile_interval: ms(self.drainer_reconcile_interval_ms),
                block: ms(self.drainer_block_ms),
                shutdown_grace: secs(self.drainer_shutdown_grace_secs),
                max_claims: self.broker_max_claims,
                dead_list_max: self.broker_dead_list_max,
                result_ttl: secs(self.broker_result_ttl_secs),
                events_max: self.broker_events_max,
            },
            callbacks: CallbackSettings {
                secret: (!callback_secret.is_empty()).then(|| callback_secret.into()),
                allowlist,
                budget: ms(self.broker_callback_budget_ms),
                attempt_timeout: ms(self.broker_callback_timeout_ms),
                trust,
            },
        })
    }
}

impl RedisSettings {
    /// The URL with any password replaced, for logs.
    pub fn redacted_url(&self) -> String {
        use secrecy::ExposeSecret;
        redact_url(self.url.expose_secret())
    }
}

/// Replaces the user-info part of a URL (`user:password@`) with `***@`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}***{}", &url[..scheme_end + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

fn hostname() -> String {
    let raw = std::env::var("FLY_MACHINE_ID")
        .or_else(|_| std::env::var("HOSTNAME"))
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let clean: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(32)
        .collect();
    if clean.is_empty() {
        "local".into()
    } else {
        clean
    }
}

/// The defaults as a table (name, value), for documentation and `--help`-like output.
pub fn defaults_table() -> BTreeMap<String, String> {
    let value = serde_json::to_value(Raw::default()).unwrap_or_default();
    let mut out = BTreeMap::new();
    if let serde_json::Value::Object(map) = value {
        for (k, v) in map {
            let shown = match v {
                serde_json::Value::String(s) => s,
                serde_json::Value::Null => String::new(),
                other => other.to_string(),
            };
            out.insert(k.to_ascii_uppercase(), shown);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn the_seven_names_are_enough() {
        let s = Settings::from_pairs([
            ("REDIS_URL", "redis://:pw@10.0.0.1:6379"),
            ("WORKER_BASE_URL", "https://worker.example/"),
            ("WORKER_API_KEY", "wk"),
            ("BROKER_API_KEY", "bk"),
            ("HOST", "127.0.0.1"),
            ("PORT", "8080"),
            ("LOG_LEVEL", "debug"),
        ])
        .unwrap();
        assert_eq!(s.port_or(1), 8080);
        assert_eq!(s.worker.base_url, "https://worker.example");
        assert_eq!(s.api.keys.len(), 1);
        assert_eq!(s.api.keys[0].key.expose_secret(), "bk");
        assert_eq!(s.redis.redacted_url(), "redis://***@10.0.0.1:6379");
        assert_eq!(s.drainer.concurrency, 256);
        assert_eq!(s.api.sync_timeout, Duration::from_secs(300));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = Settings::from_pairs([
            ("REDIS_URL", "http://x"),
            ("DRAINER_CONCURRENCY", "0"),
            ("PORT", "70000"),
            ("BROKER_API_KEYS", "a=1,oops"),
        ])
        .err()
        .unwrap();
        assert_eq!(err.problems.len(), 4, "{err}");
        let text = err.to_string();
        for name in [
            "REDIS_URL",
            "DRAINER_CONCURRENCY",
            "PORT",
            "BROKER_API_KEYS",
        ] {
            assert!(text.contains(name), "{text}");
        }
    }

    #[test]
    fn an_extra_ca_file_is_read_at_start_and_a_bad_one_is_named() {
        let ca = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/tls/ca.pem"
        );
        let s = Settings::from_pairs([("BROKER_EXTRA_CA_FILE", ca)]).unwrap();
        assert_eq!(
            format!("{:?}", s.worker.trust),
            "Trust { extra certificates: 1 }"
        );
        assert_eq!(
            format!("{:?}", s.callbacks.trust),
            "Trust { extra certificates: 1 }"
        );
        assert_eq!(
            format!("{:?}", Settings::from_pairs([]).unwrap().worker.trust),
            "Trust { extra certificates: 0 }"
        );
        let not_pem = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        for (path, says) in [
            ("/nonexistent/ca.pem", "cannot read /nonexistent/ca.pem"),
            (not_pem, "no PEM certificate"),
        ] {
            let err = Settings::from_pairs([("BROKER_EXTRA_CA_FILE", path)])
                .err()
                .unwrap()
                .to_string();
            assert!(
                err.contains("BROKER_EXTRA_CA_FILE: ") && err.contains(says),
                "{err}"
            );
        }
    }

    #[test]
    fn type_errors_name_the_setting() {
        let err = Settings::from_pairs([("DRAINER_CONCURRENCY", "many")])
            .err()
            .unwrap();
        assert!(err.to_string().contains("DRAINER_CONCURRENCY"), "{err}");
        let err = Settings::from_pairs([("NOT_A_SETTING", "1")])
            .err()
            .unwrap();
        assert!(err.to_string().contains("NOT_A_SETTING: not a setting"));
    }

    #[test]
    fn api_workers_default_to_one_per_core() {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        assert_eq!(Settings::from_pairs([]).unwrap().api.workers, cores);
        let s = Settings::from_pairs([("BROKER_API_WORKERS", "3")]).unwrap();
        assert_eq!(s.api.workers, 3);
        for bad in ["0", "-1", "two"] {
            let err = Settings::from_pairs([("BROKER_API_WORKERS", bad)])
                .err()
                .unwrap_or_else(|| panic!("{bad:?} was taken"));
            assert!(err.to_string().contains("BROKER_API_WORKERS"), "{err}");
        }
    }

    #[test]
    fn named_keys_add_to_the_single_key() {
        let s = Settings::from_pairs([
            ("BROKER_API_KEY", "k0"),
            ("BROKER_API_KEYS", "web=k1, gw = k2"),
        ])
        .unwrap();
        let names: Vec<_> = s.api.keys.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["default", "web", "gw"]);
    }

    #[test]
    fn allowlist_entries() {
        let list = Allowlist::parse("hooks.local, 127.0.0.1:9000,[::1]:8080,Receiver").unwrap();
        assert!(list.permits("hooks.local", 443));
        assert!(list.permits("hooks.local", 80));
        assert!(list.permits("127.0.0.1", 9000));
        assert!(!list.permits("127.0.0.1", 9001));
        assert!(list.permits("::1", 8080));
        assert!(list.permits("receiver", 1));
        assert!(!list.permits("other", 443));
        let err = Settings::from_pairs([("BROKER_CALLBACK_ALLOWLIST", "ok,bad host,h:99999,[x]")])
            .err()
            .unwrap();
        assert_eq!(err.problems.len(), 3, "{err}");
        assert!(Settings::from_pairs([("BROKER_CALLBACK_SECRET", "whsec_!!")]).is_err());
        let s = Settings::from_pairs([("BROKER_CALLBACK_SECRET", "whsec_c2VjcmV0")]).unwrap();
        assert!(s.callbacks.secret.is_some());
    }

    #[test]
    fn every_setting_has_an_env_name_and_a_default() {
        let table = defaults_table();
        assert_eq!(table.len(), ENV_NAMES.len());
        for name in ENV_NAMES {
            assert!(table.contains_key(*name), "{name}");
        }
    }
}
