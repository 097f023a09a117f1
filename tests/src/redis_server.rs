//! A real Redis per test: a local `redis-server` on a free port in a temporary directory, or
//! a container with the `testcontainers` feature.

#[allow(unused_imports)]
use super::*;

/// A Redis server for one test.
pub struct TestRedis {
    local: Option<LocalRedis>,
    url: String,
    _dir: tempfile::TempDir,
    #[cfg(feature = "testcontainers")]
    _container: Option<testcontainers::ContainerAsync<testcontainers::GenericImage>>,
}

impl TestRedis {
    /// Starts `redis-server` on a free port in a temporary directory, AOF on.
    pub async fn start() -> Self {
        #[cfg(feature = "testcontainers")]
        {
            use testcontainers::runners::AsyncRunner;
            let container = testcontainers::GenericImage::new("redis", "7")
                .with_exposed_port(testcontainers::core::ContainerPort::Tcp(6379))
                .with_wait_for(testcontainers::core::WaitFor::message_on_stdout(
                    "Ready to accept connections",
                ))
                .start()
                .await
                .expect(
                    "start a redis container (the testcontainers feature needs a Docker engine)",
                );
            let port = container
                .get_host_port_ipv4(6379)
                .await
                .expect("redis container port");
            return Self {
                local: None,
                url: format!("redis://127.0.0.1:{port}"),
                _dir: temp_dir(),
                _container: Some(container),
            };
        }
        #[allow(unreachable_code)]
        Self::start_local()
    }

    /// Starts a local `redis-server` whatever the features: for tests that kill and restart it.
    pub fn start_local() -> Self {
        let dir = temp_dir();
        let local = LocalRedis::start(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        Self {
            url: local.url(),
            local: Some(local),
            _dir: dir,
            #[cfg(feature = "testcontainers")]
            _container: None,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Kills Redis (SIGKILL; AOF with fsync always keeps what it acknowledged).
    pub fn kill(&mut self) {
        self.local
            .as_mut()
            .expect("restart needs a local redis-server")
            .kill();
    }

    /// Starts Redis again on the same port and data.
    pub fn restart(&mut self) {
        self.local
            .as_mut()
            .expect("restart needs a local redis-server")
            .restart()
            .expect("restart redis");
    }

    /// A plain connection for assertions.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test redis")
    }
}

/// Every key under the test prefix.
pub async fn all_keys(conn: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(conn)
        .await
        .expect("KEYS");
    keys.sort();
    keys
}

/// A directory for one Redis' data, removed on drop.
fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("broker-test-redis-")
        .tempdir()
        .expect("create a temporary directory")
}
