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

/// A Redis server for one test.
pub struct TestRedis {
    local: Option<LocalRedis>,
    url: String,
    _dir: TempDir,
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
                _dir: TempDir::new("redis"),
                _container: Some(container),
            };
        }
        #[allow(unreachable_code)]
        Self::start_local()
    }

    /// Starts a local `redis-server` whatever the features: for tests that kill and restart it.
    pub fn start_local() -> Self {
        let dir = TempDir::new("redis");
        let local = LocalRedis::start(&dir.0).unwrap_or_else(|e| panic!("{e}"));
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

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "broker-test-{label}-{}-{}",
            std::process::id(),
            fastrand_suffix()
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fastrand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish()
}

/// The settings of a test as environment pairs: the given Redis and worker, short timers,
/// then `extra` (which replaces a default of the same name).
pub fn test_env(
    redis_url: &str,
    worker_url: &str,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let defaults = [
        ("REDIS_URL", redis_url),
        ("WORKER_BASE_URL", worker_url),
        ("BROKER_API_KEY", API_KEY),
        ("HOST", "127.0.0.1"),
        ("PORT", "0"),
        ("LOG_LEVEL", "warn"),
        ("DRAINER_HEARTBEAT_MS", "200"),
        ("DRAINER_DEAD_AFTER_MS", "1500"),
        ("DRAINER_REAP_INTERVAL_MS", "300"),
        ("DRAINER_RECONCILE_INTERVAL_MS", "1000"),
        ("DRAINER_BLOCK_MS", "1000"),
        ("WORKER_RETRY_BASE_MS", "20"),
        ("WORKER_RETRY_MAX_MS", "100"),
        ("BROKER_WAITER_RECHECK_SECS", "1"),
        ("BROKER_CALLBACK_SECRET", CALLBACK_SECRET),
    ];
    defaults
        .iter()
        .filter(|(name, _)| !extra.iter().any(|(n, _)| n == name))
        .chain(extra.iter())
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// [`test_env`] as checked settings, for components run in-process.
pub fn settings(redis_url: &str, worker_url: &str, extra: &[(&str, &str)]) -> Settings {
    let env = test_env(redis_url, worker_url, extra);
    Settings::from_pairs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The mock worker, in-process.
pub struct TestMock {
    pub url: String,
    pub state: mock_worker::MockState,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl TestMock {
    pub fn start(latency: Duration) -> Self {
        Self::start_with(mock_worker::MockSettings {
            port: 0,
            latency,
            ..Default::default()
        })
    }

    pub fn start_with(settings: mock_worker::MockSettings) -> Self {
        let mock = mock_worker::MockWorker::build(settings).expect("build mock worker");
        let url = format!("http://127.0.0.1:{}", mock.port());
        let state = mock.state();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(mock.run_until_stopped(async move {
            let _ = rx.await;
        }));
        Self {
            url,
            state,
            _stop: tx,
        }
    }

    /// Panics unless every conversation had at most one turn at a time.
    pub fn assert_one_in_flight(&self) {
        let stats = self.state.stats();
        assert!(
            stats.violations.is_empty(),
            "two turns at once in {:?}",
            stats.violations
        );
        assert!(
            stats.max_in_flight <= 1,
            "max in flight {}",
            stats.max_in_flight
        );
    }
}

/// A component running in-process until stopped.
pub struct InProcess {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl InProcess {
    /// Spawns `run(stop)`, where `stop` resolves when [`InProcess::stop`] is called.
    pub fn spawn<F, Fut>(run: F) -> Self
    where
        F: FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let stop = Box::pin(async move {
            let _ = rx.await;
        });
        Self {
            stop: Some(tx),
            task: Some(tokio::spawn(run(stop))),
        }
    }

    /// Asks the component to stop and waits for it; panics if it ended with an error.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("component task").expect("component run");
        }
    }
}

/// The API, in-process.
pub struct TestApi {
    pub base: String,
    pub running: InProcess,
}

impl TestApi {
    pub async fn start(settings: Settings) -> Self {
        let app = broker_api::Application::build(settings)
            .await
            .expect("build api");
        let base = format!("http://127.0.0.1:{}", app.port());
        Self {
            base,
            running: InProcess::spawn(|stop| app.run_until_stopped(stop)),
        }
    }
}

/// A drainer, in-process.
pub struct TestDrainer {
    pub id: String,
    /// URL of its `GET /health`.
    pub health: String,
    pub running: InProcess,
}

impl TestDrainer {
    pub async fn start(settings: Settings) -> Self {
        let drainer = broker_drainer::Drainer::build(settings)
            .await
            .expect("build drainer");
        let id = drainer.id().to_owned();
        let health = format!("http://{}/health", drainer.health_addr());
        Self {
            id,
            health,
            running: InProcess::spawn(|stop| drainer.run(stop)),
        }
    }
}

/// A real binary of this workspace, started with `env`; killed on drop.
pub struct Process {
    pub child: Child,
    pub name: &'static str,
}

impl Process {
    pub fn start(name: &'static str, env: &[(&str, &str)]) -> Self {
        let path = binary(name);
        let mut cmd = Command::new(&path);
        cmd.env_clear()
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", path.display()));
        Self { child, name }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit status (up to `limit`).
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: sending a signal to our own child process.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(self.pid(), libc::SIGTERM);
        }
        self.wait(limit)
    }

    /// Waits for the process to exit (up to `limit`).
    pub fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where cargo put a workspace binary (next to the test executable's `deps/`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|p| p.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run the suite with `cargo test --workspace` (it builds the binaries), or `cargo build --bins` first",
        path.display()
    );
    path
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Value,
    pub text: String,
}

/// A small HTTP/1 client.
#[derive(Clone)]
pub struct Http {
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

impl Http {
    pub fn new() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub async fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> Result<Answer, String> {
        let mut req = hyper::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| e.to_string())?;
        let res = self.client.request(req).await.map_err(|e| e.to_string())?;
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let bytes = res
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Answer {
            status,
            headers,
            body,
            text,
        })
    }

    /// `POST /api/v1/message` with the test key and JSON.
    pub async fn post_message(
        &self,
        base: &str,
        body: &Value,
        extra: &[(&str, &str)],
    ) -> Result<Answer, String> {
        let mut headers = vec![("x-api-key", API_KEY), ("content-type", "application/json")];
        headers.extend_from_slice(extra);
        self.send(
            "POST",
            &format!("{base}/api/v1/message"),
            &headers,
            Some(body.to_string()),
        )
        .await
    }

    pub async fn get(&self, url: &str) -> Result<Answer, String> {
        self.send("GET", url, &[("x-api-key", API_KEY)], None).await
    }
}

/// Polls `check` until it returns `Some`, or panics after `limit` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Polls `GET /api/v1/message/{id}` until the message is completed or failed.
pub async fn wait_finished(http: &Http, base: &str, message_id: &str, limit: Duration) -> Value {
    let url = format!("{base}/api/v1/message/{message_id}");
    eventually(&format!("message {message_id} to finish"), limit, || {
        let http = http.clone();
        let url = url.clone();
        async move {
            let answer = http.get(&url).await.ok()?;
            let status = answer.body.get("status")?.as_str()?.to_owned();
            (status == "completed" || status == "failed").then_some(answer.body)
        }
    })
    .await
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

/// Starts a real `broker-drainer` process.
pub fn start_drainer_process(env: &[(String, String)]) -> Process {
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Process::start("broker-drainer", &pairs)
}

/// Checks a conversation's turn-start log against the order its messages were sent:
/// every turn starts after its predecessor, a cut turn may run again right away, nothing is
/// skipped or reordered, and every message ran.
pub fn assert_fifo(conversation: &str, started: &[String], sent: &[String]) {
    let mut expected = 0usize;
    let mut last: Option<&String> = None;
    for text in started {
        if Some(text) == last {
            continue; // the same turn again (at-least-once after a crash)
        }
        assert_eq!(
            sent.get(expected),
            Some(text),
            "{conversation}: turn {text:?} started out of order; started {started:?}"
        );
        expected += 1;
        last = Some(text);
    }
    assert_eq!(
        expected,
        sent.len(),
        "{conversation}: not every message ran; started {started:?}"
    );
}

/// The callback signing secret of the tests, in Standard-Webhooks form
/// (`whsec_` + base64 of `test-callback-secret`).
pub const CALLBACK_SECRET: &str = "whsec_dGVzdC1jYWxsYmFjay1zZWNyZXQ=";

/// Checks a Standard-Webhooks signature: base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`
/// with the base64-decoded part of a `whsec_` secret; any `v1,` entry may match.
pub fn verify_signature(
    secret: &str,
    id: &str,
    timestamp: &str,
    body: &[u8],
    header: &str,
) -> bool {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64
        .decode(secret.trim_start_matches("whsec_"))
        .expect("a whsec_ secret");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let mut signed = format!("{id}.{timestamp}.").into_bytes();
    signed.extend_from_slice(body);
    header.split(' ').any(|entry| {
        entry
            .strip_prefix("v1,")
            .and_then(|sig| b64.decode(sig).ok())
            .is_some_and(|sig| ring::hmac::verify(&key, &signed, &sig).is_ok())
    })
}

/// What a test receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// 200 to everything.
    Accept,
    /// This status to the first `n` attempts of every webhook id, then 200.
    FailFirst(u16, u32),
    /// This status, always.
    Always(u16),
}

/// One request a receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub webhook_id: String,
    pub timestamp: String,
    pub signature: String,
    pub body: Bytes,
    pub answered: u16,
    pub at: Instant,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn verifies(&self) -> bool {
        verify_signature(
            CALLBACK_SECRET,
            &self.webhook_id,
            &self.timestamp,
            &self.body,
            &self.signature,
        )
    }
}

/// A real HTTP server that receives callbacks on 127.0.0.1 and records them.
pub struct Receiver {
    pub url: String,
    pub port: u16,
    log: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start(behaviour: Behaviour) -> Self {
        use hyper::service::service_fn;
        use std::sync::{Arc, Mutex};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let port = listener.local_addr().expect("receiver addr").port();
        let log: Arc<Mutex<Vec<Received>>> = Arc::default();
        let shared = log.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let log = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        async move {
                            let header = |name: &str| {
                                req.headers()
                                    .get(name)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_owned()
                            };
                            let (webhook_id, timestamp, signature) = (
                                header("webhook-id"),
                                header("webhook-timestamp"),
                                header("webhook-signature"),
                            );
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let mut log = log.lock().expect("receiver log");
                            let tries = log.iter().filter(|r| r.webhook_id == webhook_id).count();
                            let answered = match behaviour {
                                Behaviour::Accept => 200,
                                Behaviour::FailFirst(status, n) if (tries as u32) < n => status,
                                Behaviour::FailFirst(..) => 200,
                                Behaviour::Always(status) => status,
                            };
                            log.push(Received {
                                webhook_id,
                                timestamp,
                                signature,
                                body,
                                answered,
                                at: Instant::now(),
                            });
                            let mut response = hyper::Response::new(Full::new(Bytes::from("{}")));
                            *response.status_mut() =
                                hyper::StatusCode::from_u16(answered).expect("status");
                            if answered == 429 {
                                response.headers_mut().insert(
                                    hyper::header::RETRY_AFTER,
                                    hyper::header::HeaderValue::from_static("0"),
                                );
                            }
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            url: format!("http://127.0.0.1:{port}/hooks"),
            port,
            log,
            task,
        }
    }

    /// Every request so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.log.lock().expect("receiver log").clone()
    }

    /// The requests answered 2xx, in arrival order.
    pub fn accepted(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| (200..300).contains(&r.answered))
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One SSE frame as the client received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseFrame {
    /// The whole block, without the blank line that ends it.
    pub raw: String,
    pub id: Option<String>,
    /// The first `data: ` line's payload.
    pub data: String,
}

impl SseFrame {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or(Value::Null)
    }

    pub fn kind(&self) -> String {
        self.json()["type"].as_str().unwrap_or("").to_owned()
    }

    /// The web client's parser rules (worker-contract §2.2): LF framing, and a first
    /// `data: ` line holding a JSON object whose `type` the client knows.
    pub fn assert_web_client_readable(&self) {
        assert!(!self.raw.contains('\r'), "CR in frame {:?}", self.raw);
        let first = self
            .raw
            .lines()
            .find_map(|l| l.strip_prefix("data: "))
            .unwrap_or_else(|| panic!("no `data: ` line in {:?}", self.raw));
        let value: Value = serde_json::from_str(first)
            .unwrap_or_else(|e| panic!("data is not JSON ({e}): {:?}", self.raw));
        let kind = value["type"].as_str().unwrap_or("");
        assert!(
            [
                "queued",
                "status",
                "progress",
                "tool_use",
                "tool_result",
                "keepalive",
                "complete",
                "error"
            ]
            .contains(&kind),
            "unknown type in {:?}",
            self.raw
        );
    }
}

/// A client's SSE connection, read frame by frame.
pub struct Sse {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    body: hyper::body::Incoming,
    buffer: Vec<u8>,
    pub error_body: String,
}

impl Sse {
    /// Sends a request and keeps its body open for reading.
    pub async fn open(
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> Self {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(url)
            .header("x-api-key", API_KEY);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("request");
        let res = client.request(req).await.expect("SSE request");
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let mut sse = Self {
            status,
            headers,
            body: res.into_body(),
            buffer: Vec::new(),
            error_body: String::new(),
        };
        if status != 200 {
            let bytes = (&mut sse.body).collect().await.map(|b| b.to_bytes());
            sse.error_body = String::from_utf8_lossy(&bytes.unwrap_or_default()).into_owned();
        }
        sse
    }

    /// `GET /api/v1/stream?message_id=…`, optionally resuming after `last_event_id`.
    pub async fn attach(base: &str, message_id: &str, last_event_id: Option<&str>) -> Self {
        let url = format!("{base}/api/v1/stream?message_id={message_id}");
        match last_event_id {
            Some(id) => Self::open("GET", &url, &[("last-event-id", id)], None).await,
            None => Self::open("GET", &url, &[], None).await,
        }
    }

    /// The next frame, or `None` when the server ended the stream. Panics after `limit`.
    pub async fn next(&mut self, limit: Duration) -> Option<SseFrame> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).take(end).collect();
                let raw = String::from_utf8(block).expect("utf-8 frame");
                let id = raw
                    .lines()
                    .find_map(|l| l.strip_prefix("id: "))
                    .map(str::to_owned);
                let data = raw
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .unwrap_or("")
                    .to_owned();
                return Some(SseFrame { raw, id, data });
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no SSE frame within {limit:?}; pending {:?}",
                        String::from_utf8_lossy(&self.buffer)
                    )
                });
            match frame {
                None => {
                    assert!(
                        self.buffer.is_empty(),
                        "stream ended inside a frame: {:?}",
                        String::from_utf8_lossy(&self.buffer)
                    );
                    return None;
                }
                Some(Err(e)) => panic!("SSE stream broke: {e}"),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// Every frame until the server ends the stream.
    pub async fn read_to_end(&mut self, limit: Duration) -> Vec<SseFrame> {
        let mut frames = Vec::new();
        while let Some(frame) = self.next(limit).await {
            frame.assert_web_client_readable();
            frames.push(frame);
        }
        frames
    }
}

/// Frames without the keepalives (which carry no id and may come at any quiet moment).
pub fn without_keepalives(frames: &[SseFrame]) -> Vec<SseFrame> {
    frames
        .iter()
        .filter(|f| f.kind() != "keepalive")
        .cloned()
        .collect()
}

/// Redis, the mock worker, the API and a drainer, in-process, with [`test_env`] settings.
pub struct Stack {
    pub redis: TestRedis,
    pub mock: TestMock,
    pub api: TestApi,
    pub drainer: TestDrainer,
    pub http: Http,
}

impl Stack {
    /// A fresh Redis and a mock worker whose turns take `latency`.
    pub async fn start(latency: Duration, extra: &[(&str, &str)]) -> Self {
        Self::with(
            TestRedis::start().await,
            TestMock::start(latency),
            None,
            extra,
        )
        .await
    }

    /// The given Redis and mock; the drainer calls `worker_url` instead when one is given.
    pub async fn with(
        redis: TestRedis,
        mock: TestMock,
        worker_url: Option<&str>,
        extra: &[(&str, &str)],
    ) -> Self {
        let s = settings(redis.url(), worker_url.unwrap_or(&mock.url), extra);
        let api = TestApi::start(s.clone()).await;
        let drainer = TestDrainer::start(s).await;
        Self {
            redis,
            mock,
            api,
            drainer,
            http: Http::new(),
        }
    }

    /// The dead list, newest first.
    pub async fn dead_list(&self) -> Vec<Value> {
        let mut conn = self.redis.conn().await;
        let raw: Vec<String> = redis::AsyncCommands::lrange(&mut conn, "bt:{0}:dead", 0, -1)
            .await
            .expect("LRANGE dead");
        raw.iter()
            .map(|r| serde_json::from_str(r).expect("dead-list JSON"))
            .collect()
    }
}

/// Redis, the mock worker and the API in-process, and real `broker-drainer` processes.
pub struct ProcessStack {
    pub redis: TestRedis,
    pub mock: TestMock,
    pub api: TestApi,
    /// The environment the drainers were started with, to start more.
    pub env: Vec<(String, String)>,
    pub drainers: Vec<Process>,
    pub http: Http,
}

impl ProcessStack {
    pub async fn start(mock: TestMock, drainers: usize, extra: &[(&str, &str)]) -> Self {
        let redis = TestRedis::start().await;
        let api = TestApi::start(settings(redis.url(), &mock.url, extra)).await;
        let env = test_env(redis.url(), &mock.url, extra);
        let drainers = (0..drainers).map(|_| start_drainer_process(&env)).collect();
        Self {
            redis,
            mock,
            api,
            env,
            drainers,
            http: Http::new(),
        }
    }
}

impl TestMock {
    /// Turns of 2 to 10 ms: many turns, interleaved.
    pub fn quick() -> Self {
        Self::start_with(mock_worker::MockSettings {
            port: 0,
            latency: Duration::from_millis(2),
            jitter: Duration::from_millis(8),
            ..Default::default()
        })
    }
}

/// A file of the test TLS authority (`tests/fixtures/tls`): `ca.pem`, and `server.pem` and
/// `server.key`, the certificate it signed for 127.0.0.1 and localhost.
pub fn tls_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/tls")
        .join(name)
}

/// Serves TLS on a free loopback port with the fixture's server certificate and passes each
/// connection's bytes to and from the plain TCP port `to`: an `https` front for the mock
/// worker or a callback receiver. Runs as long as the test's runtime.
pub async fn tls_proxy(to: u16) -> u16 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(tls_fixture("server.pem"))
        .expect("server.pem")
        .collect::<Result<Vec<_>, _>>()
        .expect("server.pem certificates");
    let key = PrivateKeyDer::from_pem_file(tls_fixture("server.key")).expect("server.key");
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server certificate");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the TLS front");
    let port = listener.local_addr().expect("TLS front address").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that refuses the certificate ends its handshake here.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    port
}
