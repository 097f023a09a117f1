//! `broker-api`: the stateless HTTP gateway. It validates and authenticates requests,
//! enqueues them with one script, and waits for sync results on pub/sub. Any API process can
//! serve any request.
//!
//! Each actix worker thread has its own Redis pool and its own reply subscription (channel
//! `<instance id>-<n>`), both driven on that thread: a sync request's enqueue, its result and
//! its answer never wake another thread.

mod admin;
mod auth;
mod console;
mod error;
mod guard;
mod metrics;
mod proxy;
mod routes;
mod stream;
mod waiters;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::http::KeepAlive;
use actix_web::{web, App, HttpServer};
use anyhow::Context;
use broker_core::batch::{Batcher, Limits};
use broker_core::config::{ApiSettings, Settings};
use broker_core::queue::{Enqueued, NewMessage, Queue, QueueError};
use broker_core::{redis_conn, Keys};
use broker_proto::{Route, ValidationLimits};
use tokio::sync::watch;

pub use error::ApiError;

/// The most one enqueue call writes: under load the messages accepted in one pass of a
/// worker's runtime share a call; its cost in Redis grows with what it writes, so a call
/// stays short, and a large message (audio) goes alone.
const MAX_ENQUEUE: Limits = Limits {
    items: 32,
    bytes: 1 << 20,
};

/// Connections the kernel holds before they are accepted: a burst of clients waits there
/// instead of having its handshakes dropped (each dropped client retries a second later).
const LISTEN_BACKLOG: u32 = 2048;
/// An idle kept-alive connection is closed after this.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// A request's head must arrive within this of the connection opening.
const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closing connection may take to be shut down.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);

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
    /// The worker, for the routes passed through to it.
    worker: broker_core::worker::WorkerClient,
    /// Moves the worker's audio and file URLs onto `BROKER_PUBLIC_URL`, when it is set.
    rewrite: Option<broker_proto::front::Rewrite>,
    auth: auth::Auth,
    /// The keys of `/admin/v1/`.
    admin_auth: auth::Auth,
    /// Delivers dead callbacks again when an operator redrives them.
    redriver: broker_core::callback::Sender,
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
        // Built here so that bad Redis settings stop the start; each worker then opens its
        // own connection with the same settings.
        drop(redis_conn::shared(&settings.redis)?);
        let client = redis_conn::client(&settings.redis)?;
        let keys = Keys::new(&settings.redis.key_prefix, &settings.redis.shard);
        let (stop_tx, stop_rx) = watch::channel(false);
        let all_waiters = Arc::new(Mutex::new(Vec::new()));
        let workers_built = Arc::new(AtomicUsize::new(0));
        let callbacks = settings
            .callbacks
            .secret
            .is_some()
            .then(|| broker_core::callback::Policy::new(settings.callbacks.allowlist.clone()));
        let auth = auth::Auth::new(settings.api.keys.clone(), settings.api.insecure_no_auth);
        let admin_auth = auth::Auth::new(
            settings.api.admin_keys.clone(),
            settings.api.insecure_no_auth && settings.api.admin_keys.is_empty(),
        );
        let redriver = broker_core::callback::Sender::new(&settings.callbacks);
        let worker = broker_core::worker::WorkerClient::new(&settings.worker, 32)
            .map_err(anyhow::Error::msg)?;
        let rewrite = settings
            .public_url
            .as_deref()
            .map(|public| broker_proto::front::Rewrite::new(&settings.worker.base_url, public));
        // BROKER_API_WORKERS actix workers (one per core unless set), each with its own
        // Redis connection, opened on the worker's runtime.
        let workers = settings.api.workers;
        let worker_settings = settings.clone();
        let worker_state = move || {
            let settings = &worker_settings;
            let n = workers_built.fetch_add(1, Ordering::Relaxed);
            #[allow(clippy::expect_used)]
            let redis = redis_conn::shared_with(client.clone(), &settings.redis)
                .expect("the same Redis settings were accepted at build");
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
            let queue = Queue::new(redis, keys.clone())
                .waiting_for(settings.redis.wait_replicas, settings.redis.wait_timeout);
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
                worker: worker.clone(),
                rewrite: rewrite.clone(),
                auth: auth.clone(),
                admin_auth: admin_auth.clone(),
                redriver: redriver.clone(),
                waiters,
                all_waiters: all_waiters.clone(),
                shutdown: stop_rx.clone(),
            })
        };
        let addr = format!("{}:{}", settings.host, settings.port_or(8000));
        let api = settings.api.clone();
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
                // Outermost last: the request is logged, then checked, then routed.
                .wrap(actix_web::middleware::from_fn(guard::authenticate))
                .wrap(actix_web::middleware::from_fn(log_request))
                .route("/health", web::get().to(routes::health))
                .route("/metrics", web::get().to(metrics::metrics))
                .service(
                    web::scope("/api/v1")
                        .route("/message", web::post().to(routes::post_message))
                        .route("/message/{id}", web::get().to(routes::get_message))
                        .route("/message/{id}", web::delete().to(routes::delete_message))
                        .route("/queue/{user_id}", web::get().to(routes::get_queue))
                        .route("/stream", web::get().to(stream::get_stream))
                        .route("/chat", chat(Route::Chat))
                        .route("/chat/stream", chat(Route::ChatStream))
                        .route("/chat/callback", chat(Route::ChatCallback)),
                )
                .service(
                    web::scope("/admin/v1")
                        .route("/overview", web::get().to(admin::overview))
                        .route("/conversations", web::get().to(admin::conversations))
                        .route(
                            "/conversations/{conversation:.+}/hold",
                            web::post().to(admin::hold),
                        )
                        .route(
                            "/conversations/{conversation:.+}/resume",
                            web::post().to(admin::resume),
                        )
                        .route(
                            "/conversations/{conversation:.+}",
                            web::get().to(admin::conversation_detail),
                        )
                        .route("/drainers", web::get().to(admin::drainers))
                        .route("/drainers/pause", web::post().to(admin::pause_drainers))
                        .route("/drainers/resume", web::post().to(admin::resume_drainers))
                        .route("/messages", web::get().to(admin::find_messages))
                        .route("/messages/{id}", web::get().to(admin::message))
                        .route("/dead", web::get().to(admin::dead))
                        .route("/dead/redrive", web::post().to(admin::redrive_all))
                        .route("/dead/{entry}/redrive", web::post().to(admin::redrive_one)),
                )
                .route("/console", web::get().to(console::page))
                .route("/console/{file}", web::get().to(console::file))
                // The worker's other routes pass through to it; anything else is a 404.
                .default_service(web::to(proxy::forward))
        };
        // actix-web's own server: its HTTP/1.1 dispatcher, timeouts and connection limits.
        // Signals are ours (`run_until_stopped`): SIGINT and SIGTERM both stop gracefully.
        let server = HttpServer::new(make_app)
            .workers(workers)
            .backlog(LISTEN_BACKLOG)
            .max_connections(api.max_connections)
            .keep_alive(KeepAlive::Timeout(KEEP_ALIVE))
            .client_request_timeout(REQUEST_HEAD_TIMEOUT)
            .client_disconnect_timeout(DISCONNECT_TIMEOUT)
            .disable_signals()
            .shutdown_timeout(30)
            .bind(addr.as_str())
            .with_context(|| format!("bind the API on {addr}"))?;
        let bound = server.addrs();
        let port = bound.first().map_or(0, std::net::SocketAddr::port);
        tracing::info!(
            addr = ?bound,
            redis = %settings.redis.redacted_url(),
            instance = %settings.api.instance_id,
            "broker-api listening"
        );
        let server = server.run();
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

/// The handler of one of the worker's chat routes.
fn chat(route: Route) -> actix_web::Route {
    web::post().to(
        move |req: actix_web::HttpRequest, payload: web::Payload, state: web::Data<AppState>| {
            routes::chat_route(req, payload, state, route)
        },
    )
}

/// One span per request (method, path, the key's name, and the conversation once known),
/// and a debug line with status and duration.
async fn log_request(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody>,
) -> Result<actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>, actix_web::Error> {
    use tracing::Instrument;
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        path = req.path(),
        key = tracing::field::Empty,
        conversation = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    async move {
        let started = std::time::Instant::now();
        let response = next.call(req).await?;
        tracing::debug!(
            status = response.status().as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "request done"
        );
        Ok(response)
    }
    .instrument(span)
    .await
}
