//! Installs the log subscriber of a binary: tracing-subscriber's JSON lines in production
//! (`LOG_FORMAT=json`), its text format for people (`pretty`), written to standard output by
//! tracing-appender's non-blocking writer. Requests and turns are tracing spans (`request`,
//! `turn`), named on every line logged inside them.

use std::io::Write;

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber writing to standard output; `level` is `LOG_LEVEL` (a level
/// or a filter directive). A second call (tests building several apps in one process) is a
/// no-op. Keep the returned guard until `main` ends: dropping it writes the last lines.
pub fn init(level: &str, format: LogFormat) -> Logs {
    // Colours only for a person at a terminal.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    install(level, format, std::io::stdout(), ansi)
}

/// [`init`] with another sink (tests read the lines back), without colours.
pub fn init_with<W: Write + Send + 'static>(level: &str, format: LogFormat, sink: W) -> Logs {
    install(level, format, sink, false)
}

fn install<W: Write + Send + 'static>(level: &str, format: LogFormat, sink: W, ansi: bool) -> Logs {
    // Lossless: a burst of lines waits for the writer rather than being dropped.
    let (writer, guard) = NonBlockingBuilder::default().lossy(false).finish(sink);
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(writer);
    let installed = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
    Logs {
        _guard: installed.is_ok().then_some(guard),
    }
}

/// Writes the log lines still queued when dropped (see [`init`]).
#[must_use = "dropped at once, it writes nothing at the end of `main`"]
pub struct Logs {
    _guard: Option<WorkerGuard>,
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::ErrorKind::Other)?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_carry_the_event_and_its_span() {
        let sink = Sink::default();
        let logs = init_with("info", LogFormat::Json, sink.clone());
        let span = tracing::info_span!(
            "turn",
            message_id = "m-1",
            conversation = tracing::field::Empty
        );
        span.in_scope(|| {
            tracing::Span::current().record("conversation", "user:org:alice");
            tracing::info!(position = 3, "message accepted");
        });
        drop(logs);
        let text = String::from_utf8(sink.0.lock().map(|b| b.clone()).unwrap_or_default())
            .unwrap_or_default();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_default();
        assert_eq!(line["message"], "message accepted", "{text}");
        assert_eq!(line["level"], "INFO", "{text}");
        assert_eq!(line["position"], 3, "{text}");
        assert_eq!(line["span"]["name"], "turn", "{text}");
        assert_eq!(line["span"]["message_id"], "m-1", "{text}");
        assert_eq!(line["span"]["conversation"], "user:org:alice", "{text}");
    }
}
