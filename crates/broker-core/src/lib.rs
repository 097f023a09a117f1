//! The broker's shared machinery: settings, Redis keys and scripts, queue operations, the
//! worker client, and the process plumbing (logging, shutdown, a local Redis for development).
//!
//! It knows Redis and the worker, not actix: the API and the drainer are built on it.

pub mod batch;
pub mod callback;
pub mod clock;
pub mod config;
pub mod http_client;
pub mod keys;
pub mod limits;
pub mod local_redis;
pub mod metrics;
pub mod queue;
pub mod redis_conn;
pub mod replies;
pub mod scripts;
pub mod shutdown;
pub mod telemetry;
pub mod worker;

pub use config::Settings;
pub use keys::Keys;
pub use queue::Queue;
