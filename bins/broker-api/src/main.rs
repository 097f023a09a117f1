//! `broker-api`: reads settings, installs logging, serves until SIGTERM/SIGINT.

use broker_core::config::{Settings, EXIT_BAD_CONFIG};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let stop = broker_core::shutdown::signal();
    let settings = Settings::load_or_exit("broker-api");
    let logs = broker_core::telemetry::init(&settings.log_level, settings.log_format);
    let open_files = broker_core::limits::raise_open_files();
    let wanted = settings.api.max_connections as u64 * settings.api.workers as u64;
    if open_files < wanted {
        tracing::warn!(
            open_files,
            wanted,
            "the open-files limit is below BROKER_MAX_CONNECTIONS x the API's workers: \
             connections beyond it wait in the listen backlog"
        );
    }
    let app = match broker_api::Application::build(settings).await {
        Ok(app) => app,
        Err(e) if e.is::<broker_api::NoKeys>() => {
            eprintln!("broker-api: {e}");
            drop(logs);
            std::process::exit(EXIT_BAD_CONFIG);
        }
        Err(e) => return Err(e),
    };
    let result = app
        .run_until_stopped(async {
            let signal = stop.await;
            tracing::info!(signal, "stop requested");
        })
        .await;
    drop(logs);
    result
}
