//! Connections to Redis: a pool for ordinary commands, dedicated connections for blocking
//! commands and pub/sub.
//!
//! The `redis` crate gives async connections a 500 ms response timeout by default. Pooled
//! connections get the configured timeout instead; a connection that runs `BLMOVE` gets none
//! (its caller bounds the wait itself), and so does pub/sub.

use deadpool_redis::{Manager, Pool, Runtime};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client};
use secrecy::ExposeSecret;

use crate::config::RedisSettings;

/// Failure to set up Redis access (bad URL); connection failures surface per command.
#[derive(Debug, thiserror::Error)]
#[error("redis setup: {0}")]
pub struct SetupError(String);

/// The command pool.
pub fn pool(settings: &RedisSettings) -> Result<Pool, SetupError> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(settings.connect_timeout))
        .set_response_timeout(Some(settings.response_timeout));
    let manager = Manager::new_with_config(settings.url.expose_secret(), config)
        .map_err(|e| SetupError(e.to_string()))?;
    Pool::builder(manager)
        .max_size(settings.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(settings.response_timeout))
        .create_timeout(Some(settings.connect_timeout))
        .recycle_timeout(Some(settings.connect_timeout))
        .build()
        .map_err(|e| SetupError(e.to_string()))
}

/// A client for dedicated connections.
pub fn client(settings: &RedisSettings) -> Result<Client, SetupError> {
    Client::open(settings.url.expose_secret()).map_err(|e| SetupError(e.to_string()))
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
