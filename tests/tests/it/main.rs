//! The black-box tests, one binary: real redis-server, the real binaries, real HTTP. Each
//! module covers one concern; the harness is the `broker_tests` library (`tests/src`).

// Test code panics on purpose: a failed step fails the test.
#![allow(clippy::unwrap_used)]

mod admin;
mod api;
mod callbacks;
mod console;
mod delivery_load;
mod delivery_recovery;
mod docs;
mod e2e;
mod failover;
mod front;
mod fuzz;
mod hostile;
mod mock;
mod model;
mod network;
mod queue;
mod recovery;
mod stream;
mod tls;
mod worker_failures;
