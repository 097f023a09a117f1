//! `broker-api`: the stateless HTTP gateway. It validates and authenticates requests,
//! enqueues them with one script, and waits for sync results on pub/sub. Any API process can
//! serve any request.
//!
//! Each actix worker thread has its own Redis pool and its own reply subscription (channel
//! `<instance id>-<n>`), both driven on that thread: a sync request's enqueue, its result and
//! its answer never wake another thread.

mod auth;
mod error;
mod http;
mod routes;
mod stream;
mod waiters;

use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use actix_service::{fn_factory, fn_service, IntoServiceFactory, ServiceFactory};
use actix_web::dev::{AppConfig, Server};
use actix_web::rt::net::TcpStream;
use actix_web::{web, App};
use anyhow::Context;
use broker_core::batch::{Batcher, Limits};
use broker_core::config::{ApiSettings, Settings};
use broker_core::queue::{Enqueued, NewMessage, Queue, QueueError};
use broker_core::{redis_conn, Keys};
use broker_proto::ValidationLimits;
use futures_util::FutureExt;
use tokio::sync::watch;

pub use error::ApiError;

/// The most one enqueue call writes: under load the messages accepted in one pass of a
/// worker's runtime share a call; its cost in Redis grows with what it writes, so a call
/// stays short, and a large message (audio) goes alone.
const MAX_ENQUEUE: Limits = Limits {
    items: 32,
    bytes: 1 << 20,
};

/// Gathers new messages into enqueue calls (see `broker_core::batch`).
pub type Enqueuer = Batcher<Arc<NewMessage>, Result<Enqueued, QueueError>>;

/// What the handlers of one worker thread share.
pub struct AppState {
    pub api: ApiSettings,
    /// On this worker's own pool.
    pub queue: Queue,
    /// Gathers the messages this worker accepts in one pass into one enqueue call.
    pub enqueuer: Enqueuer,
    pub limits: ValidationLimits,
    pub dead_after: Duration,
    /// The callback guard; `None` when callbacks are off (no signing secret).
    callbacks: Option<broker_core::callback::Policy>,
    auth: auth::Auth,
    /// This worker's subscription.
    waiters: Arc<waiters::Waiters>,
    /// Every worker's, for the process-wide figures of `/health` and `/metrics`.
    all_waiters: Arc<Mutex<Vec<Weak<waiters::Waiters>>>>,
    /// Set at shutdown: sync waiters answer 202 at once instead of holding the connection.
    shutdown: watch::Receiver<bool>,
}

impl AppState {
    fn each_waiters(&self) -> Vec<Arc<waiters::Waiters>> {
        self.all_waiters
            .lock()
            .map(|all| all.iter().filter_map(Weak::upgrade).collect())
            .unwrap_or_default()
    }

    /// Sync requests waiting on this process.
    pub(crate) fn sync_waiters(&self) -> usize {
        self.each_waiters().iter().map(|w| w.waiting()).sum()
    }

    /// SSE readers on this process.
    pub(crate) fn sse_readers(&self) -> usize {
        self.each_waiters().iter().map(|w| w.readers()).sum()
    }

    /// Is every worker's reply subscription in place?
    pub(crate) fn subscribed(&self) -> bool {
        self.each_waiters().iter().all(|w| w.is_connected())
    }
}

/// A built API, bound to its port, not yet serving.
pub struct Application {
    port: u16,
    server: Server,
    stop_tx: watch::Sender<bool>,
}

/// The refusal to start without keys.
#[derive(Debug, thiserror::Error)]
#[error(
    "no API key configured: set BROKER_API_KEY or BROKER_API_KEYS (name=key,...), or \
     BROKER_INSECURE_NO_AUTH=true for local development only"
)]
pub struct NoKeys;

impl Application {
    /// Builds the server on `HOST:PORT` (port 0 picks a free one).
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        if settings.api.keys.is_empty() && !settings.api.insecure_no_auth {
            return Err(NoKeys.into());
        }
        if settings.api.insecure_no_auth {
            tracing::warn!(
                "BROKER_INSECURE_NO_AUTH is set: the API accepts requests without a key"
            );
        }
        // Built here so that a bad URL stops the start; each worker then builds its own pool
        // (the same settings, so that cannot fail) and falls back to this one if it did.
        let shared_pool = redis_conn::pool(&settings.redis)?;
        let client = redis_conn::client(&settings.redis)?;
        let keys = Keys::new(&settings.redis.key_prefix, &settings.redis.shard);
        let (stop_tx, stop_rx) = watch::channel(false);
        let all_waiters = Arc::new(Mutex::new(Vec::new()));
        let workers_built = Arc::new(AtomicUsize::new(0));
        // Idle connections close when the API stops.
        let idle_stop = stop_rx.clone();
        let callbacks = settings
            .callbacks
            .secret
            .is_some()
            .then(|| broker_core::callback::Policy::new(settings.callbacks.allowlist.clone()));
        let auth = auth::Auth::new(settings.api.keys.clone(), settings.api.insecure_no_auth);
        // BROKER_API_WORKERS actix workers (one per core unless set), each with its share of
        // REDIS_POOL_SIZE.
        let workers = settings.api.workers;
        let mut worker_settings = settings.clone();
        worker_settings.redis.pool_size = settings.redis.pool_size.div_ceil(workers).max(1);
        let worker_state = move || {
            let settings = &worker_settings;
            let n = workers_built.fetch_add(1, Ordering::Relaxed);
            let pool = redis_conn::local_pool(&settings.redis).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "worker pool: using the process's shared pool");
                shared_pool.clone()
            });
            let waiters = waiters::Waiters::new(
                keys.reply_channel(&format!("{}-{n}", settings.api.instance_id)),
                keys.events(""),
            );
            if let Ok(mut all) = all_waiters.lock() {
                all.retain(|w: &Weak<waiters::Waiters>| w.strong_count() > 0);
                all.push(Arc::downgrade(&waiters));
            }
            // On this worker's runtime: it ends with the worker.
            tokio::spawn(waiters.clone().run(client.clone(), stop_rx.clone()));
            let queue = Queue::new(pool, keys.clone());
            let body = |m: &Arc<NewMessage>| m.request.worker_body.len();
            let (enqueuer, gathering) = Batcher::new(MAX_ENQUEUE, body, {
                let queue = queue.clone();
                let (max_depth, dedup_ttl) = (settings.api.max_queue_depth, settings.api.dedup_ttl);
                move |messages: Vec<Arc<NewMessage>>| {
                    let queue = queue.clone();
                    async move {
                        let enqueued = queue.enqueue_many(&messages, max_depth, dedup_ttl).await;
                        QueueError::fan_out(enqueued, messages.len())
                    }
                }
            });
            // Also on this worker's runtime; it ends when the worker's state is dropped.
            tokio::spawn(gathering);
            web::Data::new(AppState {
                api: settings.api.clone(),
                queue,
                enqueuer,
                limits: ValidationLimits::default(),
                dead_after: settings.drainer.dead_after,
                callbacks: callbacks.clone(),
                auth: auth.clone(),
                waiters,
                all_waiters: all_waiters.clone(),
                shutdown: stop_rx.clone(),
            })
        };
        let addr = format!("{}:{}", settings.host, settings.port_or(8000));
        // A backlog for bursts of connections (`broker_core::listener`), not std's 128.
        let listener = broker_core::listener::bind(addr.as_str())
            .with_context(|| format!("bind the API on {addr}"))?;
        let port = listener.local_addr()?.port();
        tracing::info!(
            addr = %listener.local_addr()?,
            redis = %settings.redis.redacted_url(),
            instance = %settings.api.instance_id,
            "broker-api listening"
        );
        let make_app = move || {
            App::new()
                .app_data(worker_state())
                .app_data(
                    web::QueryConfig::default()
                        .error_handler(|e, _| ApiError::Invalid(format!("query: {e}")).into()),
                )
                .app_data(
                    web::PathConfig::default()
                        .error_handler(|e, _| ApiError::Invalid(format!("path: {e}")).into()),
                )
                .wrap(actix_web::middleware::from_fn(log_request))
                .route("/health", web::get().to(routes::health))
                .route("/metrics", web::get().to(routes::metrics))
                // Whole paths rather than a `/api/v1` scope: a scope routes every request twice
                // (the scope's prefix, then its resources) through one more boxed service.
                .route("/api/v1/message", web::post().to(routes::post_message))
                .route("/api/v1/message/{id}", web::get().to(routes::get_message))
                .route(
                    "/api/v1/message/{id}",
                    web::delete().to(routes::delete_message),
                )
                .route("/api/v1/queue/{user_id}", web::get().to(routes::get_queue))
                .route("/api/v1/stream", web::get().to(stream::get_stream))
                .default_service(web::to(routes::not_found))
        };
        // actix-server runs the workers; each builds its App and serves its connections with
        // the broker's own HTTP/1.1 transport (`http.rs`, which says why).
        let limits = http::Limits::new(settings.api.max_body_bytes);
        let server = Server::build()
            .workers(workers)
            .disable_signals()
            .shutdown_timeout(30)
            .listen("broker-api", listener, move || {
                let make_app = make_app.clone();
                let idle_stop = idle_stop.clone();
                fn_factory(move || {
                    let app = make_app();
                    let idle_stop = idle_stop.clone();
                    async move {
                        let app = app
                            .into_factory()
                            .new_service(AppConfig::default())
                            .await
                            .map_err(|()| tracing::error!("the API's routes could not be built"))?;
                        let app = Rc::new(app);
                        Ok::<_, ()>(fn_service(move |io: TcpStream| {
                            // Boxed, and not wrapped in an async block: actix-server runs it
                            // inside an async block of its own, and each such layer keeps a
                            // future twice (once moved in, once running): 2.4 KB per
                            // connection inline against 0.6 KB boxed.
                            Box::pin(http::serve(io, app.clone(), limits, idle_stop.clone()))
                                .map(Ok::<(), ()>)
                        }))
                    }
                })
            })?
            .run();
        Ok(Self {
            port,
            server,
            stop_tx,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until `shutdown` resolves, then stops gracefully: sync waiters answer 202 with
    /// where to get their result, in-flight requests finish, the subscription closes.
    pub async fn run_until_stopped(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            server, stop_tx, ..
        } = self;
        let handle = server.handle();
        let stopper = tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
            handle.stop(true).await;
        });
        server.await?;
        stopper.abort();
        tracing::info!("broker-api stopped");
        Ok(())
    }
}

/// One log context per request (method, path, and the conversation once known), and a debug
/// line with status and duration.
async fn log_request(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody>,
) -> Result<actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>, actix_web::Error> {
    let context = broker_core::telemetry::Context::new("request")
        .with("method", req.method().as_str())
        .with("path", req.path());
    context
        .scope(async move {
            let started = std::time::Instant::now();
            let response = next.call(req).await?;
            tracing::debug!(
                status = response.status().as_u16(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "request done"
            );
            Ok(response)
        })
        .await
}
