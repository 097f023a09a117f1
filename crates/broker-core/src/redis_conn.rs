//! Connections to Redis: one shared connection for ordinary commands, dedicated connections
//! for blocking commands and pub/sub.
//!
//! Commands go through the `redis` crate's [`ConnectionManager`]: one multiplexed connection
//! that every task of a process (of an API worker thread) shares, many commands in flight at
//! once, reopened after a failure. Commands written together leave in one write and Redis
//! answers them in one.
//!
//! The `redis` crate gives async connections a 500 ms response timeout by default. The shared
//! connection gets the configured timeout instead; a connection that runs `BLMOVE` gets none
//! (its caller bounds the wait itself), and so does pub/sub.
//!
//! A command that times out leaves the shared connection suspect: on a half-open connection
//! (packets dropped silently, no reset) the replies of the lost commands never come, and the
//! multiplexed connection would wait for them before every later reply. `ConnectionManager`
//! reopens only on errors that say the connection is gone, so after a timeout the shared
//! connection is replaced with a fresh one.

use std::sync::{Arc, RwLock};

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, IntoConnectionInfo, RedisError};
use secrecy::ExposeSecret;

use crate::config::RedisSettings;

/// Failure to set up Redis access (bad URL); connection failures surface per command.
#[derive(Debug, thiserror::Error)]
#[error("redis setup: {0}")]
pub struct SetupError(String);

/// The shared command connection: a `ConnectionManager`, replaced after a command timed out.
/// Cheap to clone: clones share it.
#[derive(Clone)]
pub struct Shared {
    /// The connection, and how many times it was replaced.
    current: Arc<RwLock<(u64, ConnectionManager)>>,
    client: Client,
    config: ConnectionManagerConfig,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shared")
    }
}

impl Shared {
    fn manager(&self) -> (u64, ConnectionManager) {
        match self.current.read() {
            Ok(m) => m.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// After a timeout on connection `generation`: a fresh one for the commands from now on,
    /// unless another caller replaced it already.
    fn replace(&self, generation: u64) {
        let Ok(mut current) = self.current.write() else {
            return;
        };
        if current.0 != generation {
            return;
        }
        if let Ok(fresh) =
            ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone())
        {
            tracing::warn!("a redis command timed out: the shared connection is replaced");
            *current = (generation + 1, fresh);
        }
    }
}

impl redis::aio::ConnectionLike for Shared {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            let (generation, mut used) = self.manager();
            let result = used.req_packed_command(cmd).await;
            if matches!(&result, Err(e) if e.is_timeout()) {
                self.replace(generation);
            }
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        Box::pin(async move {
            let (generation, mut used) = self.manager();
            let result = used.req_packed_commands(pipeline, offset, count).await;
            if matches!(&result, Err(e) if e.is_timeout()) {
                self.replace(generation);
            }
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.manager().1.get_db()
    }
}

/// The shared command connection, opened on first use (Redis may be down at start) on the
/// runtime this is called on, which it must not outlive.
pub fn shared(settings: &RedisSettings) -> Result<Shared, SetupError> {
    shared_with(client(settings)?, settings)
}

/// [`shared`] through a client made already.
pub fn shared_with(client: Client, settings: &RedisSettings) -> Result<Shared, SetupError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(settings.connect_timeout))
        .set_response_timeout(Some(settings.response_timeout))
        // One try per command: the caller decides what a failure means (retry a read, answer
        // 503), and the next command opens a new connection.
        .set_number_of_retries(0);
    let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
        .map_err(|e| SetupError(e.to_string()))?;
    Ok(Shared {
        current: Arc::new(RwLock::new((0, manager))),
        client,
        config,
    })
}

/// Could this failure have left the connection unusable? (A server error reply could not.)
pub fn may_break(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_unrecoverable_error()
        || e.is_timeout()
        || e.is_connection_refusal()
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
