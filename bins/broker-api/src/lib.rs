//! `broker-api`: the stateless HTTP gateway. It validates and authenticates requests,
//! enqueues them with one script, and waits for sync results on this process's pub/sub
//! channel. Any API process can serve any request.

mod auth;
mod error;
mod routes;
mod stream;
mod waiters;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{web, App, HttpServer};
use anyhow::Context;
use broker_core::config::{ApiSettings, Settings};
use broker_core::queue::Queue;
use broker_core::{redis_conn, Keys};
use broker_proto::ValidationLimits;
use tokio::sync::watch;

pub use error::ApiError;

/// What every handler shares.
pub struct AppState {
    pub api: ApiSettings,
    pub queue: Queue,
    pub limits: ValidationLimits,
    pub dead_after: Duration,
    /// The callback guard; `None` when callbacks are off (no signing secret).
    callbacks: Option<broker_core::callback::Policy>,
    auth: auth::Auth,
    waiters: Arc<waiters::Waiters>,
    /// Set at shutdown: sync waiters answer 202 at once instead of holding the connection.
    shutdown: watch::Receiver<bool>,
}

/// A built API, bound to its port, not yet serving.
pub struct Application {
    port: u16,
    server: Server,
    stop_tx: watch::Sender<bool>,
    waiters_task: tokio::task::JoinHandle<()>,
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
        let pool = redis_conn::pool(&settings.redis)?;
        let client = redis_conn::client(&settings.redis)?;
        let keys = Keys::new(&settings.redis.key_prefix, &settings.redis.shard);
        let waiters = waiters::Waiters::new(
            keys.reply_channel(&settings.api.instance_id),
            keys.events(""),
        );
        let (stop_tx, stop_rx) = watch::channel(false);
        let waiters_task = tokio::spawn(waiters.clone().run(client, stop_rx.clone()));

        let state =
            web::Data::new(AppState {
                api: settings.api.clone(),
                queue: Queue::new(pool, keys),
                limits: ValidationLimits::default(),
                dead_after: settings.drainer.dead_after,
                callbacks: settings.callbacks.secret.is_some().then(|| {
                    broker_core::callback::Policy::new(settings.callbacks.allowlist.clone())
                }),
                auth: auth::Auth::new(settings.api.keys.clone(), settings.api.insecure_no_auth),
                waiters,
                shutdown: stop_rx,
            });
        let addr = format!("{}:{}", settings.host, settings.port_or(8000));
        let listener =
            TcpListener::bind(&addr).with_context(|| format!("bind the API on {addr}"))?;
        let port = listener.local_addr()?.port();
        tracing::info!(
            addr = %listener.local_addr()?,
            redis = %settings.redis.redacted_url(),
            instance = %settings.api.instance_id,
            "broker-api listening"
        );
        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
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
                .service(
                    web::scope("/api/v1")
                        .route("/message", web::post().to(routes::post_message))
                        .route("/message/{id}", web::get().to(routes::get_message))
                        .route("/message/{id}", web::delete().to(routes::delete_message))
                        .route("/queue/{user_id}", web::get().to(routes::get_queue))
                        .route("/stream", web::get().to(stream::get_stream)),
                )
                .default_service(web::to(routes::not_found))
        })
        .disable_signals()
        .shutdown_timeout(30)
        // Answers go out at once: with Nagle's algorithm a response written while the client
        // has not yet acknowledged the previous one waits for its delayed ACK (~40 ms).
        .tcp_nodelay(true)
        .listen(listener)?
        .run();
        Ok(Self {
            port,
            server,
            stop_tx,
            waiters_task,
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
            server,
            stop_tx,
            waiters_task,
            ..
        } = self;
        let handle = server.handle();
        let stopper = tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
            handle.stop(true).await;
        });
        server.await?;
        stopper.abort();
        waiters_task.abort();
        tracing::info!("broker-api stopped");
        Ok(())
    }
}

/// One span per request, and a log line with status and duration.
async fn log_request(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody>,
) -> Result<actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>, actix_web::Error> {
    use tracing::Instrument;
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        path = %req.path(),
        conversation = tracing::field::Empty,
    );
    let started = std::time::Instant::now();
    let response = next.call(req).instrument(span.clone()).await?;
    let status = response.status().as_u16();
    span.in_scope(|| {
        tracing::debug!(
            status,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "request done"
        );
    });
    Ok(response)
}
