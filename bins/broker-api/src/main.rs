//! `broker-api`: reads settings, installs logging, serves until SIGTERM/SIGINT.

use broker_core::config::{Settings, EXIT_BAD_CONFIG};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let stop = broker_core::shutdown::signal();
    let settings = Settings::load_or_exit("broker-api");
    let logs = broker_core::telemetry::init(&settings.log_level, settings.log_format);
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
