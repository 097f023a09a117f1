//! `broker-drainer`: reads settings, installs logging, runs the drainer until SIGTERM/SIGINT.

use broker_core::config::Settings;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let stop = broker_core::shutdown::signal();
    let settings = Settings::load_or_exit("broker-drainer");
    let _logs = broker_core::telemetry::init(&settings.log_level, settings.log_format);
    broker_core::limits::raise_open_files();
    let drainer = broker_drainer::Drainer::build(settings).await?;
    drainer
        .run(async {
            let signal = stop.await;
            tracing::info!(signal, "stop requested");
        })
        .await
}
