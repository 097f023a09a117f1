//! Installs the log subscriber of a binary: JSON lines in production, text for people.
//!
//! The JSON lines are written by [`JsonLines`], one object per event:
//! `{"timestamp":"…Z","level":"INFO","message":"…",<the event's fields>,"span":{<the
//! context's fields>,"name":"…"}}`. The context is the current task's [`Context`] (a request,
//! a turn), else the current tracing span. It writes the fields as they were recorded, where
//! tracing-subscriber's JSON formatter parses them again for every line it writes.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::future::Future;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use broker_proto::json::{push_string, Escaping};

use crate::config::LogFormat;
use crate::log_writer;

/// Installs the global subscriber; `level` is `LOG_LEVEL` (a level or a filter directive).
/// A second call (tests building several apps in one process) is a no-op.
///
/// Lines go to standard output a few at a time ([`log_writer`]): keep the returned guard
/// until `main` ends, so that the last lines are written, and call [`log_writer::flush`]
/// before `std::process::exit`. A panic writes what is held before its message.
pub fn init(level: &str, format: LogFormat) -> Flush {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(log_writer::Batched);
    let installed = match format {
        LogFormat::Json => builder
            .event_format(JsonLines)
            .fmt_fields(JsonFields)
            .try_init(),
        LogFormat::Pretty => builder.event_format(TextLines).try_init(),
    };
    if installed.is_ok() {
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |panic| {
            log_writer::STDOUT.try_flush();
            report(panic);
        }));
    }
    Flush(())
}

/// Writes the log lines still held when dropped (see [`init`]).
#[must_use = "dropped at once, it writes nothing at the end of `main`"]
pub struct Flush(());

impl Drop for Flush {
    fn drop(&mut self) {
        log_writer::flush();
    }
}

/// What a task is working on (a request, a turn), named on every line it logs: as the
/// `span` object of a JSON line, as `name{field=value …}:` in text.
///
/// It does for the broker's two per-message tasks what a tracing span does, without the
/// subscriber's span registry: a span there is created, formatted, entered and left at every
/// poll of its future, and closed, which cost about a tenth of the API's and of the drainer's
/// instructions at one span per message (docs/performance.md, item 28). A context is a name
/// and a short list of owned fields, moved into a task-local at each poll. Tasks spawned from the task do
/// not inherit it (nor did they a span).
pub struct Context {
    name: &'static str,
    fields: RefCell<Vec<(&'static str, String)>>,
}

tokio::task_local! {
    static CONTEXT: Context;
}

impl Context {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            fields: RefCell::new(Vec::with_capacity(3)),
        }
    }

    /// Adds a field (fields are written in the order added).
    pub fn with(self, field: &'static str, value: &str) -> Self {
        self.fields.borrow_mut().push((field, value.to_owned()));
        self
    }

    /// Runs `task` in this context: what it logs while it runs is named by it.
    pub fn scope<F: Future>(self, task: F) -> impl Future<Output = F::Output> {
        CONTEXT.scope(self, task)
    }
}

/// Adds a field to the context of the current task; nothing outside a context.
pub fn record(field: &'static str, value: &str) {
    let _ = CONTEXT.try_with(|c| c.fields.borrow_mut().push((field, value.to_owned())));
}

/// Calls `write` with the current task's context, if it has one; returns whether it had.
fn with_context(write: impl FnOnce(&Context) -> fmt::Result) -> Result<bool, fmt::Error> {
    match CONTEXT.try_with(|c| write(c)) {
        Ok(result) => result.map(|()| true),
        Err(_) => Ok(false),
    }
}

/// Formats an event as one JSON object on one line.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // The line is built in a `String` of this thread, then written at once: pushed onto a
        // `String`, each piece is a copy; through the subscriber's `Writer` (a `dyn
        // fmt::Write`) each was a call through a table, and a line has some fifty pieces.
        thread_local! {
            static LINE: RefCell<String> = RefCell::new(String::with_capacity(512));
        }
        LINE.with(|line| match line.try_borrow_mut() {
            Ok(mut line) => {
                line.clear();
                json_line(ctx, event, &mut line);
                writer.write_str(&line)
            }
            // A line formatted while another is (a field's `Debug` that logs)
            Err(_) => {
                let mut line = String::new();
                json_line(ctx, event, &mut line);
                writer.write_str(&line)
            }
        })
    }
}

/// Builds the JSON line of `event` into `out`.
fn json_line<S, N>(ctx: &FmtContext<'_, S, N>, event: &Event<'_>, out: &mut String)
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    out.push_str("{\"timestamp\":\"");
    let _ = write_timestamp(out, SystemTime::now());
    out.push_str("\",\"level\":\"");
    out.push_str(event.metadata().level().as_str());
    out.push('"');
    event.record(&mut JsonVisitor { out, first: false });
    let in_context = CONTEXT
        .try_with(|c| {
            out.push_str(",\"span\":{");
            // Never borrowed elsewhere while a line is written; `try_` all the same.
            if let Ok(fields) = c.fields.try_borrow() {
                for (field, value) in fields.iter() {
                    push_string(out, field);
                    out.push(':');
                    push_string(out, value);
                    out.push(',');
                }
            }
            out.push_str("\"name\":");
            push_string(out, c.name);
            out.push('}');
        })
        .is_ok();
    let span = if in_context {
        None
    } else {
        ctx.lookup_current()
    };
    if let Some(span) = span {
        out.push_str(",\"span\":{");
        if let Some(recorded) = span.extensions().get::<FormattedFields<N>>() {
            if !recorded.is_empty() {
                out.push_str(recorded);
                out.push(',');
            }
        }
        out.push_str("\"name\":");
        push_string(out, span.name());
        out.push('}');
    }
    out.push_str("}\n");
}

/// Formats an event as one line of text for people (`LOG_FORMAT=pretty`):
/// `<timestamp> <LEVEL> <context>{<field>=<value> …}: <message> <field>=<value> …`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TextLines;

impl<S, N> FormatEvent<S, N> for TextLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write_timestamp(&mut writer, SystemTime::now())?;
        write!(writer, " {:>5} ", event.metadata().level())?;
        let in_context = with_context(|c| {
            writer.write_str(c.name)?;
            if let Ok(fields) = c.fields.try_borrow() {
                writer.write_char('{')?;
                for (i, (field, value)) in fields.iter().enumerate() {
                    let space = if i == 0 { "" } else { " " };
                    write!(writer, "{space}{field}={value}")?;
                }
                writer.write_char('}')?;
            }
            writer.write_str(": ")
        })?;
        if !in_context {
            if let Some(span) = ctx.lookup_current() {
                writer.write_str(span.name())?;
                if let Some(recorded) = span.extensions().get::<FormattedFields<N>>() {
                    write!(writer, "{{{recorded}}}")?;
                }
                writer.write_str(": ")?;
            }
        }
        let mut text = TextVisitor::default();
        event.record(&mut text);
        writer.write_str(&text.message)?;
        writer.write_str(&text.fields)?;
        writer.write_char('\n')
    }
}

/// Collects an event's message and its other fields as ` field=value`.
#[derive(Default)]
struct TextVisitor {
    message: String,
    fields: String,
}

impl Visit for TextVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

/// Records a span's fields as `"name":value` pairs, comma-separated, for [`JsonLines`].
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonFields;

impl<'writer> FormatFields<'writer> for JsonFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut out = String::new();
        fields.record(&mut JsonVisitor {
            out: &mut out,
            first: true,
        });
        writer.write_str(&out)
    }

    fn add_fields(
        &self,
        current: &mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let first = current.fields.is_empty();
        fields.record(&mut JsonVisitor {
            out: &mut current.fields,
            first,
        });
        Ok(())
    }
}

/// Appends each field as `"name":value`, a comma before each but (when `first`) the first.
struct JsonVisitor<'a> {
    out: &'a mut String,
    first: bool,
}

impl JsonVisitor<'_> {
    fn field(&mut self, field: &Field) -> &mut String {
        if !std::mem::take(&mut self.first) {
            self.out.push(',');
        }
        push_string(self.out, field.name());
        self.out.push(':');
        self.out
    }
}

// Writing to a `String` cannot fail: the results of `write!` are dropped.
impl Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        push_string(self.field(field), value);
    }

    // Numbers through `itoa`: `write!` spent about 450 instructions on each.
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field)
            .push_str(itoa::Buffer::new().format(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field)
            .push_str(itoa::Buffer::new().format(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field)
            .push_str(if value { "true" } else { "false" });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        let out = self.field(field);
        if value.is_finite() {
            let _ = write!(out, "{value}");
        } else {
            push_string(out, &value.to_string());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `message`, `%display` and `?debug` fields all arrive here, as text.
        let out = self.field(field);
        out.push('"');
        let _ = write!(Escaping(&mut *out), "{value:?}");
        out.push('"');
    }
}

/// `2026-11-22T17:13:39.792673Z`: UTC, to the microsecond. Its digits are placed by hand:
/// through `write!` and its padded numbers the stamp cost the API a third of a log line.
fn write_timestamp<W: fmt::Write + ?Sized>(out: &mut W, now: SystemTime) -> fmt::Result {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, of_day) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    let mut stamp = *b"0000-00-00T00:00:00.000000Z";
    let fields = [
        (0..4, year),
        (5..7, month),
        (8..10, day),
        (11..13, of_day / 3600),
        (14..16, of_day / 60 % 60),
        (17..19, of_day % 60),
        (20..26, u64::from(since.subsec_micros())),
    ];
    for (range, mut value) in fields {
        for digit in stamp[range].iter_mut().rev() {
            *digit = b'0' + (value % 10) as u8;
            value /= 10;
        }
    }
    out.write_str(std::str::from_utf8(&stamp).map_err(|_| fmt::Error)?)
}

/// Year, month and day of a count of days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What the subscriber of `format` writes while `log` runs.
    fn output(format: LogFormat, log: impl FnOnce()) -> String {
        let sink = Sink::default();
        let writer = sink.clone();
        let builder = tracing_subscriber::fmt().with_writer(move || writer.clone());
        match format {
            LogFormat::Json => tracing::subscriber::with_default(
                builder
                    .event_format(JsonLines)
                    .fmt_fields(JsonFields)
                    .finish(),
                log,
            ),
            LogFormat::Pretty => {
                tracing::subscriber::with_default(builder.event_format(TextLines).finish(), log)
            }
        }
        let text = String::from_utf8(sink.0.lock().expect("lock").clone()).expect("utf8");
        text
    }

    fn lines(log: impl FnOnce()) -> Vec<serde_json::Value> {
        output(LogFormat::Json, log)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// Runs `task` to its end on a runtime of this thread.
    fn block_on<F: Future>(task: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(task)
    }

    /// What a request logs, in context or not, through a yield (a context must hold across
    /// polls) and with the conversation recorded on the way.
    async fn request() {
        tracing::info!("outside");
        Context::new("request")
            .with("method", "POST")
            .with("path", "/api/v1/message")
            .scope(async {
                tracing::info!(n = 1, "first");
                tokio::task::yield_now().await;
                record("conversation", "user:o:\"u\"");
                tracing::warn!("second");
            })
            .await;
        tracing::info!("after");
    }

    #[test]
    fn a_task_context_names_the_lines_it_logs_in_json() {
        let got = lines(|| block_on(request()));
        let spans: Vec<_> = got.iter().map(|l| l.get("span").cloned()).collect();
        assert_eq!(
            spans,
            [
                None,
                Some(
                    serde_json::json!({"method": "POST", "path": "/api/v1/message", "name": "request"})
                ),
                Some(
                    serde_json::json!({"method": "POST", "path": "/api/v1/message", "conversation": "user:o:\"u\"", "name": "request"})
                ),
                None,
            ]
        );
        assert_eq!(got[1]["n"], 1);
        // the fields in the order they were added, the name last
        let raw = output(LogFormat::Json, || block_on(request()));
        assert!(
            raw.contains(r#""span":{"method":"POST","path":"/api/v1/message","conversation":"user:o:\"u\"","name":"request"}"#),
            "{raw}"
        );
    }

    #[test]
    fn a_task_context_names_the_lines_it_logs_in_text() {
        let raw = output(LogFormat::Pretty, || block_on(request()));
        let lines: Vec<&str> = raw.lines().map(|l| &l[28..]).collect();
        assert_eq!(
            lines,
            [
                " INFO outside",
                " INFO request{method=POST path=/api/v1/message}: first n=1",
                " WARN request{method=POST path=/api/v1/message conversation=user:o:\"u\"}: second",
                " INFO after",
            ],
            "{raw}"
        );
    }

    #[test]
    fn events_are_json_lines_with_their_fields_and_span() {
        let tricky = "quote \" backslash \\ newline \n tab \t bell \u{7} é ✓";
        let got = lines(|| {
            tracing::warn!(text = tricky, n = -3, big = 7u64, ok = true, "plain");
            let span = tracing::info_span!("turn", conversation = %"user:o:u", message_id = tracing::field::Empty);
            let _in = span.enter();
            span.record("message_id", "m-1");
            let error = std::io::Error::other("it \"broke\"");
            tracing::info!(%error, ratio = 0.5, "turn {} finished", 7);
        });
        assert_eq!(got.len(), 2, "{got:?}");
        let first = &got[0];
        assert_eq!(first["level"], "WARN");
        assert_eq!(first["message"], "plain");
        assert_eq!(first["text"], tricky);
        assert_eq!(
            (first["n"].as_i64(), first["big"].as_u64()),
            (Some(-3), Some(7))
        );
        assert_eq!(first["ok"], true);
        assert!(first.get("span").is_none());
        let second = &got[1];
        assert_eq!(second["message"], "turn 7 finished");
        assert_eq!(second["error"], "it \"broke\"");
        assert_eq!(second["ratio"], 0.5);
        assert_eq!(
            second["span"],
            serde_json::json!({"conversation": "user:o:u", "message_id": "m-1", "name": "turn"})
        );
        let stamp = second["timestamp"].as_str().expect("timestamp");
        assert_eq!(
            (stamp.len(), &stamp[10..11], &stamp[26..]),
            (27, "T", "Z"),
            "{stamp}"
        );
    }

    #[test]
    fn timestamps_are_utc_to_the_microsecond() {
        let at = |secs: u64, micros: u64| {
            let mut out = String::new();
            let t = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros);
            write_timestamp(&mut out, t).expect("write");
            out
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.000005Z");
        assert_eq!(at(1_795_369_419, 792_673), "2026-11-22T17:43:39.792673Z");
        assert_eq!(at(4_102_444_799, 999_999), "2099-12-31T23:59:59.999999Z");
    }
}
