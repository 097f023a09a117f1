//! The broker's components for a test: its settings, and the mock worker, the API and
//! drainers in-process, alone or as whole stacks.

#[allow(unused_imports)]
use super::*;

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
