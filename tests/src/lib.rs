//! Test harness: a real `redis-server` per test (or a container with the `testcontainers`
//! feature), the API, drainers and the mock worker in-process or as the real binaries, and a
//! small HTTP client.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use broker_core::config::Settings;
use broker_core::local_redis::LocalRedis;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

pub const API_KEY: &str = "test-key";

mod components;
mod faulty;
pub mod fuzz;
mod http;
mod netns;
mod process;
mod receiver;
mod redis_server;
mod sse;
mod tls;

pub use components::*;
pub use faulty::*;
pub use http::*;
pub use netns::*;
pub use process::*;
pub use receiver::*;
pub use redis_server::*;
pub use sse::*;
pub use tls::*;
