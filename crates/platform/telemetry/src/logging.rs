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
        let mut line = Map::new();
        line.insert("timestamp".into(), Value::from(now_rfc3339()));
        line.insert(
            "level".into(),
            Value::from(event.metadata().level().as_str().to_ascii_lowercase()),
        );
        line.insert("service".into(), Value::from(self.service.as_str()));
        line.insert("version".into(), Value::from(self.version.as_str()));
        line.insert("target".into(), Value::from(event.metadata().target()));
        let mut fields = Map::new();
        event.record(&mut JsonVisitor(&mut fields));
        let message = fields.remove("message").unwrap_or(Value::from(""));
        line.insert("message".into(), message);
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(SpanFields(fields)) = span.extensions().get::<SpanFields>() {
                    for (k, v) in fields {
                        line.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        line.extend(fields);
        let mut buf = match serde_json::to_vec(&Value::Object(line)) {
            Ok(buf) => buf,
            Err(_) => return,
        };
        buf.push(b'\n');
        // One write per line keeps lines whole when several threads log at once.
        match &self.file {
            None => {
                let _ = std::io::stdout().lock().write_all(&buf);
            }
            Some(file) => {
                let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
                let _ = file.write_all(&buf);
            }
        }
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
