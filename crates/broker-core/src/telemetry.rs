//! Installs the log subscriber of a binary: JSON lines in production, text for people.
//!
//! The JSON lines are written by [`JsonLines`], one object per event:
//! `{"timestamp":"…Z","level":"INFO","message":"…",<the event's fields>,"span":{<the current
//! span's fields>,"name":"…"}}`. It writes the span's fields as they were recorded, where
//! tracing-subscriber's JSON formatter parses them again for every line it writes.

use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use broker_proto::json::{write_string as write_escaped, Escaping};

use crate::config::LogFormat;

/// Installs the global subscriber; `level` is `LOG_LEVEL` (a level or a filter directive).
/// A second call (tests building several apps in one process) is a no-op.
pub fn init(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = match format {
        LogFormat::Json => builder
            .event_format(JsonLines)
            .fmt_fields(JsonFields)
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
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
        writer.write_str("{\"timestamp\":\"")?;
        write_timestamp(&mut writer, SystemTime::now())?;
        write!(writer, "\",\"level\":\"{}\"", event.metadata().level())?;
        let mut fields = JsonVisitor {
            out: &mut writer,
            first: false,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        if let Some(span) = ctx.lookup_current() {
            writer.write_str(",\"span\":{")?;
            if let Some(recorded) = span.extensions().get::<FormattedFields<N>>() {
                if !recorded.is_empty() {
                    writer.write_str(recorded)?;
                    writer.write_char(',')?;
                }
            }
            writer.write_str("\"name\":")?;
            write_escaped(&mut writer, span.name())?;
            writer.write_char('}')?;
        }
        writer.write_str("}\n")
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
        let mut visitor = JsonVisitor {
            out: &mut writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }

    fn add_fields(
        &self,
        current: &mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let first = current.is_empty();
        let mut writer = current.as_writer();
        let mut visitor = JsonVisitor {
            out: &mut writer,
            first,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

/// Writes each field as `"name":value`, a comma before each but (when `first`) the first.
struct JsonVisitor<'a, 'w> {
    out: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl JsonVisitor<'_, '_> {
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            if !std::mem::take(&mut self.first) {
                self.out.write_char(',')?;
            }
            write_escaped(self.out, field.name())?;
            self.out.write_char(':')?;
            value(self.out)
        })();
    }
}

impl Visit for JsonVisitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, |out| write_escaped(out, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |out| write!(out, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |out| write!(out, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |out| write!(out, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.field(field, |out| write!(out, "{value}"));
        } else {
            self.field(field, |out| write_escaped(out, &value.to_string()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `message`, `%display` and `?debug` fields all arrive here, as text.
        self.field(field, |out| {
            out.write_char('"')?;
            write!(Escaping(out), "{value:?}")?;
            out.write_char('"')
        });
    }
}

/// `2026-11-22T17:13:39.792673Z`: UTC, to the microsecond. Its digits are placed by hand:
/// through `write!` and its padded numbers the stamp cost the API a third of a log line.
fn write_timestamp(out: &mut dyn fmt::Write, now: SystemTime) -> fmt::Result {
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

    fn lines(log: impl FnOnce()) -> Vec<serde_json::Value> {
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .event_format(JsonLines)
            .fmt_fields(JsonFields)
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        let text = String::from_utf8(sink.0.lock().expect("lock").clone()).expect("utf8");
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
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
