//! A TCP proxy that injects network faults between two of the broker's processes on this
//! machine (loopback only): pass, add latency, or drop everything silently in both directions
//! (a partition with half-open connections: no reset, no close).

#[allow(unused_imports)]
use super::*;

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PASS: u8 = 0;
const DROP: u8 = 1;

/// The proxy; stops with the test.
pub struct FaultyProxy {
    pub port: u16,
    mode: Arc<AtomicU8>,
    delay_ms: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultyProxy {
    /// Listens on a free loopback port and forwards to `target` (`host:port`).
    pub async fn start(target: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let mode = Arc::new(AtomicU8::new(PASS));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let target = target.to_owned();
        let (m, d) = (mode.clone(), delay_ms.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (m, d, target) = (m.clone(), d.clone(), target.clone());
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pipe(cr, sw, m.clone(), d.clone()), pipe(sr, cw, m, d));
                });
            }
        });
        Self {
            port,
            mode,
            delay_ms,
            task,
        }
    }

    /// `redis://127.0.0.1:<port>`: a Redis URL through the proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Drops every byte from now on, both ways, without closing anything.
    pub fn partition(&self) {
        self.mode.store(DROP, Ordering::SeqCst);
    }

    /// Forwards again (what was dropped stays lost).
    pub fn heal(&self) {
        self.mode.store(PASS, Ordering::SeqCst);
    }

    /// Delays every chunk by `ms` milliseconds.
    pub fn delay(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::SeqCst);
    }
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: Arc<AtomicU8>,
    delay_ms: Arc<AtomicU64>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if mode.load(Ordering::SeqCst) == DROP {
            continue;
        }
        let delay = delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}
