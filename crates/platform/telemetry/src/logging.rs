//! JSON logs: one object per line with `timestamp`, `level`, `service`, `version`,
//! `target`, `message`, then the fields of every enclosing span (outermost first, so
//! a request's `correlation_id` and `trace_id` are on each of its lines) and the
//! event's own fields.
//!
//! A span field named `service` overrides the process-wide service name, so in
//! monolith mode (every service in one process) each line still names its service.

use std::io::Write;
use std::sync::OnceLock;

use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Record};
use tracing::{Event, Id, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line: for machines, and the default.
    #[default]
    Json,
    /// Human-readable lines: for a developer's terminal.
    Pretty,
}

/// Installs the global subscriber. `level` is an `EnvFilter` directive such as
/// `info` or `info,sqlx=warn`; `RUST_LOG`, when set, wins. Calling it twice is harmless
/// (the first call wins), which keeps tests that build several services simple.
pub fn init(service: &str, version: &str, level: &str, format: LogFormat) {
    init_to(service, version, level, format, Sink::Stdout);
}

/// Where log lines go.
pub enum Sink {
    Stdout,
    /// Appended to a file (monolith mode and the supervisor, whose terminal shows a
    /// progress display instead).
    File(std::fs::File),
}

/// [`init`] with an explicit destination.
pub fn init_to(service: &str, version: &str, level: &str, format: LogFormat, sink: Sink) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let result = match (format, sink) {
        (LogFormat::Json, sink) => tracing_subscriber::registry()
            .with(filter)
            .with(JsonLayer::new(service, version).with_sink(sink))
            .try_init(),
        (LogFormat::Pretty, Sink::Stdout) => tracing_subscriber::registry()
            .with(filter)
            .with(tracing_subscriber::fmt::layer().compact())
            .try_init(),
        (LogFormat::Pretty, Sink::File(file)) => tracing_subscriber::registry()
            .with(filter)
            .with(
                tracing_subscriber::fmt::layer()
                    .compact()
                    .with_ansi(false)
                    .with_writer(std::sync::Mutex::new(file)),
            )
            .try_init(),
    };
    // Already initialised (tests, monolith): keep the first subscriber.
    let _ = result;
}

/// The JSON layer. Public so that tests and embedders can compose it themselves.
pub struct JsonLayer {
    service: String,
    version: String,
    file: Option<std::sync::Mutex<std::fs::File>>,
}

impl JsonLayer {
    pub fn new(service: &str, version: &str) -> Self {
        Self {
            service: service.to_owned(),
            version: version.to_owned(),
            file: None,
        }
    }

    pub fn with_sink(mut self, sink: Sink) -> Self {
        self.file = match sink {
            Sink::Stdout => None,
            Sink::File(f) => Some(std::sync::Mutex::new(f)),
        };
        self
    }
}

/// Fields recorded on a span, kept in the span's extensions.
struct SpanFields(Map<String, Value>);

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // The whole cause chain: the top error alone rarely says what went wrong.
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        self.0.insert(field.name().to_owned(), Value::from(text));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), Value::from(format!("{value:?}")));
    }
}

impl<S> Layer<S> for JsonLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Map::new();
        attrs.record(&mut JsonVisitor(&mut fields));
        span.extensions_mut().insert(SpanFields(fields));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        if let Some(SpanFields(fields)) = ext.get_mut::<SpanFields>() {
            values.record(&mut JsonVisitor(fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        thread_local! {
            /// The line being written, reused: a line per request is the gateway's
            /// access log, and building it must not cost an allocation per field.
            static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let write = |buf: &mut Vec<u8>| {
            buf.clear();
            self.write_line(buf, event, &ctx);
            // One write per line keeps lines whole when several threads log at once.
            match &self.file {
                None => {
                    let _ = std::io::stdout().lock().write_all(buf);
                }
                Some(file) => {
                    let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = file.write_all(buf);
                }
            }
        };
        let reused = LINE.with(|line| match line.try_borrow_mut() {
            Ok(mut buf) => {
                write(&mut buf);
                // A rare huge line does not stay allocated.
                buf.shrink_to(16 * 1024);
                true
            }
            Err(_) => false,
        });
        if !reused {
            write(&mut Vec::new());
        }
    }
}

impl JsonLayer {
    /// `{"timestamp":..,"level":..,"service":..,"version":..,"target":..,<event
    /// fields (with "message")>,<span fields>}` and a newline, written straight
    /// into `buf`. An event field that recorded a value hides a span field of the
    /// same name, an inner span's an outer one's.
    fn write_line<S>(&self, buf: &mut Vec<u8>, event: &Event<'_>, ctx: &Context<'_, S>)
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let level = match *event.metadata().level() {
            tracing::Level::ERROR => "error",
            tracing::Level::WARN => "warn",
            tracing::Level::INFO => "info",
            tracing::Level::DEBUG => "debug",
            tracing::Level::TRACE => "trace",
        };
        buf.extend_from_slice(b"{\"timestamp\":");
        json_str(buf, &now_rfc3339());
        buf.extend_from_slice(b",\"level\":\"");
        buf.extend_from_slice(level.as_bytes());
        buf.extend_from_slice(b"\",\"service\":");
        json_str(buf, &self.service);
        buf.extend_from_slice(b",\"version\":");
        json_str(buf, &self.version);
        buf.extend_from_slice(b",\"target\":");
        json_str(buf, event.metadata().target());
        // The event's fields first, remembering which it recorded (a field declared
        // with `None` records nothing and must not hide a span's value).
        let mut visitor = LineVisitor {
            buf,
            written: Vec::new(),
        };
        event.record(&mut visitor);
        let LineVisitor { buf, written } = visitor;
        if !written.contains(&"message") {
            buf.extend_from_slice(b",\"message\":\"\"");
        }
        if let Some(scope) = ctx.event_scope(event) {
            let spans: Vec<_> = scope.from_root().collect();
            for (i, span) in spans.iter().enumerate() {
                let extensions = span.extensions();
                let Some(SpanFields(fields)) = extensions.get::<SpanFields>() else {
                    continue;
                };
                for (k, v) in fields {
                    let hidden = written.contains(&k.as_str())
                        || spans[i + 1..].iter().any(|inner| {
                            inner
                                .extensions()
                                .get::<SpanFields>()
                                .is_some_and(|f| f.0.contains_key(k))
                        });
                    if !hidden {
                        buf.push(b',');
                        json_str(buf, k);
                        buf.push(b':');
                        let _ = serde_json::to_writer(&mut *buf, v);
                    }
                }
            }
        }
        buf.extend_from_slice(b"}\n");
    }
}

/// `s` as a JSON string.
fn json_str(buf: &mut Vec<u8>, s: &str) {
    let _ = serde_json::to_writer(&mut *buf, s);
}

/// Writes an event's fields as `,"name":value`.
struct LineVisitor<'a> {
    buf: &'a mut Vec<u8>,
    /// The names written, so span fields of the same names are left out.
    written: Vec<&'static str>,
}

impl LineVisitor<'_> {
    fn key(&mut self, field: &Field) {
        self.written.push(field.name());
        self.buf.push(b',');
        json_str(self.buf, field.name());
        self.buf.push(b':');
    }
}

impl Visit for LineVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field);
        // JSON has no NaN or infinity.
        match value.is_finite() {
            true => {
                let _ = serde_json::to_writer(&mut *self.buf, &value);
            }
            false => self.buf.extend_from_slice(b"null"),
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        let _ = write!(self.buf, "{value}");
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        let _ = write!(self.buf, "{value}");
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        self.buf
            .extend_from_slice(if value { b"true" } else { b"false" });
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.key(field);
        json_str(self.buf, value);
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut fields = Map::new();
        JsonVisitor(&mut fields).record_error(field, value);
        self.key(field);
        let _ = serde_json::to_writer(&mut *self.buf, &fields.remove(field.name()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.key(field);
        json_str(self.buf, &format!("{value:?}"));
    }
}

fn now_rfc3339() -> String {
    static FALLBACK: OnceLock<String> = OnceLock::new();
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| {
            FALLBACK
                .get_or_init(|| "1970-01-01T00:00:00Z".to_owned())
                .clone()
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Every line is one JSON object with the fixed keys, the span's fields and the
    /// event's (which win on a clash), strings escaped.
    #[test]
    fn lines_are_json_objects_with_span_and_event_fields() {
        let path = std::env::temp_dir().join(format!("log-{}.jsonl", uuid::Uuid::new_v4()));
        let file = std::fs::File::create(&path).unwrap();
        let subscriber = tracing_subscriber::registry()
            .with(JsonLayer::new("svc", "1.2.3").with_sink(Sink::File(file)));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "request",
                correlation_id = "c-1",
                shadowed = "span",
                absent = "span"
            );
            let _entered = span.enter();
            tracing::info!(
                status = 200u64,
                ratio = 0.5,
                delta = -3i64,
                ok = true,
                shadowed = "event",
                quote = "a \"b\"\n",
                absent = None::<&str>,
                "request {} done",
                7
            );
            tracing::warn!(nan = f64::NAN);
        });
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        let first = &lines[0];
        assert_eq!(first["level"], "info");
        assert_eq!(first["service"], "svc");
        assert_eq!(first["version"], "1.2.3");
        assert_eq!(first["message"], "request 7 done");
        assert_eq!(first["correlation_id"], "c-1");
        assert_eq!(first["shadowed"], "event");
        // An event field that recorded nothing does not hide the span's.
        assert_eq!(first["absent"], "span");
        assert_eq!(first["status"], 200);
        assert_eq!(first["ratio"], 0.5);
        assert_eq!(first["delta"], -3);
        assert_eq!(first["ok"], true);
        assert_eq!(first["quote"], "a \"b\"\n");
        assert!(first["timestamp"].as_str().unwrap().ends_with('Z'));
        assert!(
            !text
                .lines()
                .next()
                .unwrap()
                .contains("\"shadowed\":\"span\"")
        );
        assert_eq!(lines[1]["message"], "");
        assert_eq!(lines[1]["nan"], Value::Null);
        let _ = std::fs::remove_file(path);
    }
}
