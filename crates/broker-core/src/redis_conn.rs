//! Connections to Redis: a pool for ordinary commands, dedicated connections for blocking
//! commands and pub/sub.
//!
//! A command does not own its pooled connection: it takes a handle to a multiplexed
//! connection and gives the connection back to the pool at once, so the commands of every
//! task of a process (of an actix worker) share one connection, many in flight at a time.
//! Under load the commands written in one pass of the runtime go out in one write, and Redis
//! reads them in one read and answers them in one write: a syscall and a wake-up per batch,
//! not per command. (With a connection per command in flight, sync runs reached about a
//! quarter less throughput; see `docs/performance.md`.)
//!
//! The `redis` crate gives async connections a 500 ms response timeout by default. Pooled
//! connections get the configured timeout instead; a connection that runs `BLMOVE` gets none
//! (its caller bounds the wait itself), and so does pub/sub.
//!
//! A multiplexed connection's driver is a task on the runtime that opened it. [`pool`] opens
//! every connection on the runtime that built the pool, where it lives as long as that runtime;
//! [`local_pool`] opens each on the runtime of the task that asks, for a pool that only one
//! thread uses (an actix worker's own): its commands then never wake another thread.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool::managed::{self, Metrics, RecycleResult};
use deadpool::Runtime;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{
    AsyncConnectionConfig, Client, Cmd, IntoConnectionInfo, Pipeline, RedisError, RedisFuture,
    Value,
};
use secrecy::ExposeSecret;

use crate::config::RedisSettings;

/// Failure to set up Redis access (bad URL); connection failures surface per command.
#[derive(Debug, thiserror::Error)]
#[error("redis setup: {0}")]
pub struct SetupError(String);

/// Opens pooled connections on one runtime. A connection goes back into use without a round
/// trip while it is busy: it is checked with `PING` only after [`IDLE_CHECK`] unused, and it is
/// replaced once a command on it has failed in a way that may have broken it.
pub struct Manager {
    client: Client,
    config: AsyncConnectionConfig,
    runtime: Option<tokio::runtime::Handle>,
    ping: AtomicUsize,
    /// Bumped when a connection of this pool is found dropped: the connections opened before
    /// (after a Redis restart, every one of them) are then replaced, not tried one by one.
    generation: Arc<AtomicU64>,
}

/// How long a pooled connection may sit unused before it is checked with `PING` when reused
/// (a managed Redis or a proxy may have closed it in the meantime).
pub const IDLE_CHECK: Duration = Duration::from_secs(5);

/// A pooled connection and whether a failure may have broken it; every command's handle
/// shares the flag.
#[derive(Clone)]
pub struct Pooled {
    conn: MultiplexedConnection,
    broken: Arc<AtomicBool>,
    /// The pool's generation when this connection was opened.
    generation: u64,
    pool_generation: Arc<AtomicU64>,
}

impl Pooled {
    /// Marks the connection unusable after `e` (the pool opens a new one for the commands
    /// after; those in flight finish on this one), and the pool's older connections too when
    /// the connection itself was lost.
    fn failed(&self, e: &RedisError) {
        if !may_break(e) {
            return;
        }
        self.broken.store(true, Ordering::SeqCst);
        if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
            self.pool_generation
                .fetch_max(self.generation + 1, Ordering::SeqCst);
        }
    }
}

impl managed::Manager for Manager {
    type Type = Pooled;
    type Error = RedisError;

    async fn create(&self) -> Result<Pooled, RedisError> {
        let generation = self.generation.load(Ordering::SeqCst);
        let client = self.client.clone();
        let config = self.config.clone();
        let open = async move {
            client
                .get_multiplexed_async_connection_with_config(&config)
                .await
        };
        let conn = match &self.runtime {
            Some(runtime) => runtime
                .spawn(open)
                .await
                .map_err(|e| RedisError::from(std::io::Error::other(e)))?,
            // Boxed: opening a connection is a large future, and every caller waiting for a
            // pooled connection would otherwise carry one.
            None => Box::pin(open).await,
        }?;
        Ok(Pooled {
            conn,
            broken: Arc::new(AtomicBool::new(false)),
            generation,
            pool_generation: self.generation.clone(),
        })
    }

    async fn recycle(&self, pooled: &mut Pooled, metrics: &Metrics) -> RecycleResult<RedisError> {
        if pooled.broken.load(Ordering::SeqCst) {
            return Err(managed::RecycleError::message("a command on it failed"));
        }
        if pooled.generation < self.generation.load(Ordering::SeqCst) {
            return Err(managed::RecycleError::message(
                "opened before a connection of the pool was lost",
            ));
        }
        if metrics.last_used() < IDLE_CHECK {
            return Ok(());
        }
        let token = self.ping.fetch_add(1, Ordering::Relaxed).to_string();
        let answer: String =
            Box::pin(redis::cmd("PING").arg(&token).query_async(&mut pooled.conn)).await?;
        if answer == token {
            Ok(())
        } else {
            Err(managed::RecycleError::message("unexpected PING answer"))
        }
    }
}

/// Could this failure have left the connection unusable? (A server error reply could not.)
pub fn may_break(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_unrecoverable_error()
        || e.is_timeout()
        || e.is_connection_refusal()
}

/// The command pool, with the connection it handed out last kept at hand: while that one is
/// sound and was used within [`IDLE_CHECK`], [`Pool::ready`] hands it out again at once,
/// without a checkout from the pool. (A checkout is a future of kilobytes, allocated for
/// every command; see `docs/performance.md`.)
#[derive(Clone)]
pub struct Pool {
    pool: managed::Pool<Manager>,
    last: Arc<Mutex<Option<(Pooled, Instant)>>>,
}

impl Pool {
    fn new(pool: managed::Pool<Manager>) -> Self {
        Self {
            pool,
            last: Arc::new(Mutex::new(None)),
        }
    }

    /// The connection handed out last, when the pool would hand it out again unchecked: no
    /// command on it failed, no connection of the pool was lost since it was opened, and it
    /// was used within [`IDLE_CHECK`]. Otherwise `None`: then [`get`] goes through the pool.
    pub fn ready(&self) -> Option<Connection> {
        let mut last = self.last.lock().ok()?;
        let (pooled, used) = last.as_mut()?;
        let now = Instant::now();
        if pooled.broken.load(Ordering::SeqCst)
            || pooled.generation < pooled.pool_generation.load(Ordering::SeqCst)
            || now.duration_since(*used) >= IDLE_CHECK
        {
            *last = None;
            return None;
        }
        *used = now;
        Some(Connection(pooled.clone()))
    }

    fn keep(&self, pooled: &Pooled) {
        if let Ok(mut last) = self.last.lock() {
            *last = Some((pooled.clone(), Instant::now()));
        }
    }
}

/// Why the pool gave no connection.
pub type PoolError = managed::PoolError<RedisError>;

/// A handle to a pooled connection, which is already back in the pool for others to share.
pub struct Connection(Pooled);

/// The connection's own `send_packed_command(s)` are awaited in place: going through its
/// `ConnectionLike` would box each command's future a second time.
impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let result = self.0.conn.send_packed_command(cmd).await;
            if let Err(e) = &result {
                self.0.failed(e);
            }
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let result = self.0.conn.send_packed_commands(cmd, offset, count).await;
            if let Err(e) = &result {
                self.0.failed(e);
            }
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.0.conn.get_db()
    }
}

/// A handle to a connection from the pool, which goes straight back into the pool: the next
/// command shares it (it is checked or replaced as the pool reuses it). Callers try
/// [`Pool::ready`] first.
pub async fn get(pool: &Pool) -> Result<Connection, PoolError> {
    let pooled = pool.pool.get().await?;
    pool.keep(&pooled);
    Ok(Connection(Pooled::clone(&pooled)))
}

/// The command pool. Its connections are opened on the runtime this is called on.
pub fn pool(settings: &RedisSettings) -> Result<Pool, SetupError> {
    build_pool(settings, tokio::runtime::Handle::try_current().ok())
}

/// A command pool for one thread: each connection is opened on the runtime of the task that
/// needs it, so it must not outlive that runtime nor be used from another thread's.
pub fn local_pool(settings: &RedisSettings) -> Result<Pool, SetupError> {
    build_pool(settings, None)
}

fn build_pool(
    settings: &RedisSettings,
    runtime: Option<tokio::runtime::Handle>,
) -> Result<Pool, SetupError> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(settings.connect_timeout))
        .set_response_timeout(Some(settings.response_timeout));
    let manager = Manager {
        client: client(settings)?,
        config,
        runtime,
        ping: AtomicUsize::new(0),
        generation: Arc::new(AtomicU64::new(0)),
    };
    managed::Pool::builder(manager)
        .max_size(settings.pool_size)
        // The connection given back last is handed out next: commands gather on one.
        .queue_mode(managed::QueueMode::Lifo)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(settings.response_timeout))
        .create_timeout(Some(settings.connect_timeout))
        .recycle_timeout(Some(settings.connect_timeout))
        .build()
        .map(Pool::new)
        .map_err(|e| SetupError(e.to_string()))
}

/// A client for dedicated connections. Its sockets send at once (`TCP_NODELAY`): with Nagle's
/// algorithm a command written while an earlier one is unacknowledged waits for the peer's
/// delayed ACK, about 40 ms on Linux.
pub fn client(settings: &RedisSettings) -> Result<Client, SetupError> {
    let info = settings
        .url
        .expose_secret()
        .into_connection_info()
        .map_err(|e| SetupError(e.to_string()))?
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    Client::open(info).map_err(|e| SetupError(e.to_string()))
}

/// A connection with no response timeout, for `BLMOVE`.
pub async fn blocking_connection(
    client: &Client,
    settings: &RedisSettings,
) -> redis::RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(settings.connect_timeout))
        .set_response_timeout(None);
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}
