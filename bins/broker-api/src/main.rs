//! `broker-api`: reads settings, installs logging, serves until SIGTERM/SIGINT.

use broker_core::config::{Settings, EXIT_BAD_CONFIG};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load_or_exit("broker-api");
    let _logs = broker_core::telemetry::init(&settings.log_level, settings.log_format);
    let app = match broker_api::Application::build(settings).await {
        Ok(app) => app,
        Err(e) if e.is::<broker_api::NoKeys>() => {
            eprintln!("broker-api: {e}");
            broker_core::log_writer::flush();
            std::process::exit(EXIT_BAD_CONFIG);
        }
        Err(e) => return Err(e),
    };
    app.run_until_stopped(async {
        let signal = broker_core::shutdown::signal().await;
        tracing::info!(signal, "stop requested");
    })
    .await
}
