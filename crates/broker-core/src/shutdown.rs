//! The shutdown signal. SIGTERM (what Fly sends) and SIGINT (Ctrl-C) both mean a graceful
//! stop: claim or accept nothing new, finish what runs within the grace period, exit 0.
//! actix-web's own signal handling is turned off so that it cannot turn SIGINT into a
//! forced stop.

use std::future::Future;

/// Installs the handlers now (call it first thing in `main`, so that a signal that comes
/// while the process starts is not a forced stop) and returns a future that resolves to the
/// first signal's name.
pub fn signal() -> impl Future<Output = &'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let handlers = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        );
        async move {
            let (Ok(mut term), Ok(mut int)) = handlers else {
                std::future::pending::<()>().await;
                return "none";
            };
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
            "ctrl-c"
        }
    }
}
