//! `broker-local`: the whole broker on one machine, for trying it out.
//!
//! Starts a `redis-server` (AOF on, data in `target/local-redis`) unless `REDIS_URL` is set,
//! the mock worker unless `WORKER_BASE_URL` is set, then the API and one drainer, and prints
//! a `curl` that works. Every other setting is read from the environment as usual.
//! Ctrl-C (or SIGTERM) stops everything gracefully.

use std::path::PathBuf;

use anyhow::Context;
use broker_core::config::{Settings, ENV_NAMES, EXIT_BAD_CONFIG};
use broker_core::local_redis::{free_port, LocalRedis};
use tokio::sync::watch;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut pairs: Vec<(String, String)> = ENV_NAMES
        .iter()
        .filter_map(|name| std::env::var(name).ok().map(|v| ((*name).to_owned(), v)))
        .collect();
    let is_set = |pairs: &[(String, String)], name: &str| {
        pairs.iter().any(|(n, v)| n == name && !v.is_empty())
    };
    let set = |pairs: &mut Vec<(String, String)>, name: &str, value: String| {
        pairs.retain(|(n, _)| n != name);
        pairs.push((name.to_owned(), value));
    };
    if !is_set(&pairs, "LOG_FORMAT") {
        set(&mut pairs, "LOG_FORMAT", "pretty".into());
    }
    if !is_set(&pairs, "HOST") {
        set(&mut pairs, "HOST", "127.0.0.1".into());
    }
    // Callbacks to receivers on this machine, signed with a development secret.
    if !is_set(&pairs, "BROKER_CALLBACK_SECRET") {
        set(
            &mut pairs,
            "BROKER_CALLBACK_SECRET",
            "dev-callback-secret".into(),
        );
    }
    if !is_set(&pairs, "BROKER_CALLBACK_ALLOWLIST") {
        set(
            &mut pairs,
            "BROKER_CALLBACK_ALLOWLIST",
            "localhost,127.0.0.1,[::1]".into(),
        );
    }
    // An admin key for the console, unless one is configured.
    let admin_key = if is_set(&pairs, "BROKER_ADMIN_KEYS") {
        None
    } else {
        set(&mut pairs, "BROKER_ADMIN_KEYS", "dev=dev-admin-key".into());
        Some("dev-admin-key")
    };
    let api_key = if is_set(&pairs, "BROKER_API_KEY") || is_set(&pairs, "BROKER_API_KEYS") {
        None
    } else {
        set(&mut pairs, "BROKER_API_KEY", "dev-key".into());
        Some("dev-key")
    };

    let local_redis = if is_set(&pairs, "REDIS_URL") {
        None
    } else {
        let dir = PathBuf::from("target/local-redis");
        let redis = LocalRedis::start(&dir).context("start a local redis-server")?;
        set(&mut pairs, "REDIS_URL", redis.url());
        Some(redis)
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    // The mock worker stops last, once the drainer's running turns have finished.
    let (mock_stop_tx, mock_stop_rx) = watch::channel(false);
    let mut mock_task = None;
    if !is_set(&pairs, "WORKER_BASE_URL") {
        let mock = mock_worker::MockWorker::build(mock_worker::MockSettings {
            port: free_port()?,
            ..mock_worker::MockSettings::default()
        })?;
        set(
            &mut pairs,
            "WORKER_BASE_URL",
            format!("http://127.0.0.1:{}", mock.port()),
        );
        let stop = wait(mock_stop_rx);
        mock_task = Some(tokio::spawn(async move {
            mock.run_until_stopped(stop)
                .await
                .map_err(anyhow::Error::from)
        }));
    }

    let api_port = pairs
        .iter()
        .find(|(n, _)| n == "PORT")
        .and_then(|(_, v)| v.parse::<u16>().ok())
        .unwrap_or(8000);
    // Audio URLs of answers lead through this API, as in production.
    if !is_set(&pairs, "BROKER_PUBLIC_URL") {
        set(
            &mut pairs,
            "BROKER_PUBLIC_URL",
            format!("http://127.0.0.1:{api_port}"),
        );
    }
    let settings = match Settings::from_pairs(pairs.iter().map(|(n, v)| (n.as_str(), v.as_str()))) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("broker-local: {e}");
            std::process::exit(EXIT_BAD_CONFIG);
        }
    };
    let _logs = broker_core::telemetry::init(&settings.log_level, settings.log_format);

    let mut api_settings = settings.clone();
    api_settings.port = Some(api_port);
    let api = broker_api::Application::build(api_settings).await?;
    let mut drainer_settings = settings.clone();
    drainer_settings.port = Some(free_port()?);
    let drainer = broker_drainer::Drainer::build(drainer_settings).await?;

    let port = api.port();
    tasks.spawn(api.run_until_stopped(wait(stop_rx.clone())));
    tasks.spawn(drainer.run(wait(stop_rx.clone())));

    let key = api_key
        .map(str::to_owned)
        .unwrap_or_else(|| "<your BROKER_API_KEY>".into());
    println!();
    // The URL of a Redis given in REDIS_URL may hold a password: only the local one is shown.
    let redis = local_redis
        .as_ref()
        .map(|r| format!(", redis: {}", r.url()))
        .unwrap_or_default();
    println!(
        "broker running: API on http://127.0.0.1:{port}  (worker: {}{redis})",
        settings.worker.base_url
    );
    println!("try:");
    println!(
        "  curl -s http://127.0.0.1:{port}/api/v1/message -H 'X-API-Key: {key}' -H 'Content-Type: application/json' \\\n    -d '{{\"user_id\":\"alice\",\"client_id\":\"web\",\"message\":\"What is Genesis about?\"}}'"
    );
    println!(
        "  curl -sN http://127.0.0.1:{port}/api/v1/message -H 'X-API-Key: {key}' -H 'Content-Type: application/json' \\\n    -H 'Accept: text/event-stream' -d '{{\"user_id\":\"alice\",\"client_id\":\"web\",\"message\":\"Stream it\"}}'"
    );
    println!(
        "  curl -sN http://127.0.0.1:{port}/api/v1/chat/stream -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n    -d '{{\"user_id\":\"alice\",\"client_id\":\"web\",\"message\":\"As the worker streams it\"}}'"
    );
    println!("  curl -s http://127.0.0.1:{port}/health");
    println!(
        "console: http://127.0.0.1:{port}/console  (admin key: {})",
        admin_key.unwrap_or("<your BROKER_ADMIN_KEYS key>")
    );
    println!("stop with Ctrl-C (running turns finish first; a second Ctrl-C stops at once)");
    println!();

    let signal = broker_core::shutdown::signal().await;
    tracing::info!(signal, "stopping");
    // A second signal while the turns finish: stop at once (they run again after a restart).
    let again = broker_core::shutdown::signal();
    tokio::spawn(async move {
        let signal = again.await;
        eprintln!("broker-local: {signal} again: stopping at once");
        std::process::exit(130);
    });
    let _ = stop_tx.send(true);
    while let Some(done) = tasks.join_next().await {
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "a component stopped with an error");
        }
    }
    let _ = mock_stop_tx.send(true);
    if let Some(Ok(Err(e))) = match mock_task {
        Some(task) => Some(task.await),
        None => None,
    } {
        tracing::warn!(error = %e, "the mock worker stopped with an error");
    }
    Ok(())
}

async fn wait(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
