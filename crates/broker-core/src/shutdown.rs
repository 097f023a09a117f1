//! The shutdown signal. SIGTERM (what Fly sends) and SIGINT (Ctrl-C) both mean a graceful
//! stop: claim or accept nothing new, finish what runs within the grace period, exit 0.
//! actix-web's own signal handling is turned off so that it cannot turn SIGINT into a
//! forced stop.

/// Waits for SIGTERM or SIGINT and returns its name.
pub async fn signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            std::future::pending::<()>().await;
            return "none";
        };
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "ctrl-c"
    }
}
