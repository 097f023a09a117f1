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

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, IntoConnectionInfo, RedisError};
use secrecy::ExposeSecret;

use crate::config::RedisSettings;

/// Failure to set up Redis access (bad URL); connection failures surface per command.
#[derive(Debug, thiserror::Error)]
#[error("redis setup: {0}")]
pub struct SetupError(String);

/// The shared command connection. Cheap to clone: clones share it.
pub type Shared = ConnectionManager;

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
    ConnectionManager::new_lazy_with_config(client, config).map_err(|e| SetupError(e.to_string()))
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
