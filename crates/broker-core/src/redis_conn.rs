//! Connections to Redis: a pool for ordinary commands, dedicated connections for blocking
//! commands and pub/sub.
//!
//! The `redis` crate gives async connections a 500 ms response timeout by default. Pooled
//! connections get the configured timeout instead; a connection that runs `BLMOVE` gets none
//! (its caller bounds the wait itself), and so does pub/sub.
//!
//! A multiplexed connection's driver is a task on the runtime that opened it. actix-web runs
//! each worker thread on a runtime of its own, and a worker that stops (at shutdown) takes its
//! runtime's tasks with it; so the pool opens every connection on the runtime that built the
//! pool (the process's main runtime), where it lives as long as the process.

use std::sync::atomic::{AtomicUsize, Ordering};

use deadpool::managed::{self, Metrics, RecycleResult};
use deadpool::Runtime;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, Cmd, Pipeline, RedisError, RedisFuture, Value};
use secrecy::ExposeSecret;

use crate::config::RedisSettings;

/// Failure to set up Redis access (bad URL); connection failures surface per command.
#[derive(Debug, thiserror::Error)]
#[error("redis setup: {0}")]
pub struct SetupError(String);

/// Opens pooled connections on one runtime and checks them with `PING` when reused.
pub struct Manager {
    client: Client,
    config: AsyncConnectionConfig,
    runtime: Option<tokio::runtime::Handle>,
    ping: AtomicUsize,
}

impl managed::Manager for Manager {
    type Type = MultiplexedConnection;
    type Error = RedisError;

    async fn create(&self) -> Result<MultiplexedConnection, RedisError> {
        let client = self.client.clone();
        let config = self.config.clone();
        let open = async move {
            client
                .get_multiplexed_async_connection_with_config(&config)
                .await
        };
        match &self.runtime {
            Some(runtime) => runtime
                .spawn(open)
                .await
                .map_err(|e| RedisError::from(std::io::Error::other(e)))?,
            None => open.await,
        }
    }

    async fn recycle(
        &self,
        conn: &mut MultiplexedConnection,
        _: &Metrics,
    ) -> RecycleResult<RedisError> {
        let token = self.ping.fetch_add(1, Ordering::Relaxed).to_string();
        let answer: String = redis::cmd("PING").arg(&token).query_async(conn).await?;
        if answer == token {
            Ok(())
        } else {
            Err(managed::RecycleError::message("unexpected PING answer"))
        }
    }
}

/// The command pool.
pub type Pool = managed::Pool<Manager>;

/// Why the pool gave no connection.
pub type PoolError = managed::PoolError<RedisError>;

/// A pooled connection, returned to the pool when dropped.
pub struct Connection(managed::Object<Manager>);

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.0.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.0.req_packed_commands(cmd, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}

/// A connection from the pool.
pub async fn get(pool: &Pool) -> Result<Connection, PoolError> {
    Ok(Connection(pool.get().await?))
}

/// The command pool. Its connections are opened on the runtime this is called on.
pub fn pool(settings: &RedisSettings) -> Result<Pool, SetupError> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(settings.connect_timeout))
        .set_response_timeout(Some(settings.response_timeout));
    let manager = Manager {
        client: client(settings)?,
        config,
        runtime: tokio::runtime::Handle::try_current().ok(),
        ping: AtomicUsize::new(0),
    };
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
