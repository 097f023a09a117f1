//! `broker-drainer`: reads settings, installs logging, runs the drainer until SIGTERM/SIGINT.

use broker_core::config::{Settings, EXIT_BAD_CONFIG};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("broker-drainer: {e}");
            std::process::exit(EXIT_BAD_CONFIG);
        }
    };
    broker_core::telemetry::init(&settings.log_level, settings.log_format);
    let drainer = broker_drainer::Drainer::build(settings).await?;
    drainer
        .run(async {
            let signal = broker_core::shutdown::signal().await;
            tracing::info!(signal, "stop requested");
        })
        .await
}
