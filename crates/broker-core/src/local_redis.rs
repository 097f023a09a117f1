//! A `redis-server` started on a free loopback port in its own directory, with AOF on.
//!
//! Used by the local all-in-one runner and by the test harness; production points
//! `REDIS_URL` at a managed Redis instead.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Failure to start a local Redis.
#[derive(Debug, thiserror::Error)]
pub enum LocalRedisError {
    #[error(
        "redis-server was not found on PATH: install it (Debian/Ubuntu: `sudo apt-get install -y redis-server`) \
         or set REDIS_URL to a running Redis"
    )]
    NotInstalled,
    #[error("start redis-server: {0}")]
    Io(#[from] std::io::Error),
    #[error("redis-server on port {port} did not answer PING within {waited:?}")]
    NotReady { port: u16, waited: Duration },
}

/// A running `redis-server` child process; killed on drop.
#[derive(Debug)]
pub struct LocalRedis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl LocalRedis {
    /// Starts Redis on a free port with its data in `dir` (created if missing).
    pub fn start(dir: &Path) -> Result<Self, LocalRedisError> {
        Self::start_on(dir, free_port()?)
    }

    /// Starts Redis on `port` with its data in `dir`; used to restart on the same port.
    pub fn start_on(dir: &Path, port: u16) -> Result<Self, LocalRedisError> {
        std::fs::create_dir_all(dir)?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir)
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .args(["--protected-mode", "no", "--loglevel", "warning"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            // Its own process group: a Ctrl-C meant for the broker must not stop Redis first.
            .process_group(0)
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    LocalRedisError::NotInstalled
                } else {
                    LocalRedisError::Io(e)
                }
            })?;
        let mut redis = Self {
            child: Some(child),
            port,
            dir: dir.to_owned(),
        };
        redis.wait_ready(Duration::from_secs(10))?;
        Ok(redis)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills the server at once (SIGKILL); with `appendfsync always` nothing acknowledged is lost.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and directory, replaying its AOF.
    pub fn restart(&mut self) -> Result<(), LocalRedisError> {
        self.kill();
        let again = Self::start_on(&self.dir.clone(), self.port)?;
        *self = again;
        Ok(())
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<(), LocalRedisError> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    return Err(LocalRedisError::Io(std::io::Error::other(format!(
                        "redis-server exited with {status} (is port {} taken?)",
                        self.port
                    ))));
                }
            }
            if ping(self.port) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(LocalRedisError::NotReady {
            port: self.port,
            waited: limit,
        })
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(stream.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}
