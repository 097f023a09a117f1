//! `mock-worker`: serves the mock worker until SIGTERM/SIGINT. Settings: see `MockSettings::from_env`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_target(false)
        .compact()
        .init();
    let settings = match mock_worker::MockSettings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mock-worker: {e}");
            std::process::exit(64);
        }
    };
    let mock = mock_worker::MockWorker::build(settings)?;
    tracing::info!(port = mock.port(), "mock worker listening");
    mock.run_until_stopped(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
