//! JSON logs: one object per line with `timestamp`, `level`, `service`, `version`,
//! `target`, `message`, then the fields of every enclosing span (outermost first, so
//! a request's `correlation_id` and `trace_id` are on each of its lines) and the
//! event's own fields.
//!
//! A span field named `service` overrides the process-wide service name, so in
//! monolith mode (every service in one process) each line still names its service.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value};
use time::OffsetDateTime;
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
    init_to(service, version, level, format, Sink::Stdout, false);
}

/// Where log lines go.
pub enum Sink {
    Stdout,
    /// Appended to a file (monolith mode and the supervisor, whose terminal shows a
    /// progress display instead).
    File(std::fs::File),
}

/// [`init`] with an explicit destination; `buffered` JSON lines are written in
/// blocks ([`JsonLayer::buffered`]).
pub fn init_to(
    service: &str,
    version: &str,
    level: &str,
    format: LogFormat,
    sink: Sink,
    buffered: bool,
) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let result = match (format, sink) {
        (LogFormat::Json, sink) => tracing_subscriber::registry()
            .with(filter)
            .with({
                let layer = JsonLayer::new(service, version).with_sink(sink);
                match buffered {
                    true => layer.buffered(),
                    false => layer,
                }
            })
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
    /// `,"service":..,"version":..` as every line carries it, written once here.
    identity: Box<[u8]>,
    out: Arc<Out>,
    /// Gather lines per thread and write them in blocks (see [`JsonLayer::buffered`]).
    buffered: bool,
}

/// Where lines go; one `write` per call, so lines (or blocks of whole lines) from
/// several threads never interleave.
struct Out {
    /// A descriptor of our own (stdout's is duplicated), so writing it takes no
    /// lock of the standard library's.
    file: Option<std::fs::File>,
    /// Held while writing unless the destination is a regular file: the kernel
    /// writes a whole `write` to a file under the inode's lock, but a pipe splits
    /// writes longer than PIPE_BUF. Without it, worker threads writing one line per
    /// request met on stdout's lock (a futex call every other request).
    lock: Option<Mutex<()>>,
}

impl Out {
    fn new(file: Option<std::fs::File>) -> Self {
        let file = file.or_else(|| {
            use std::os::fd::AsFd;
            std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .ok()
                .map(std::fs::File::from)
        });
        let regular = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .is_some_and(|m| m.file_type().is_file());
        Self {
            file,
            lock: (!regular).then(|| Mutex::new(())),
        }
    }

    /// Writes a block of gathered lines and empties it; whether it held any.
    fn drain(&self, block: &mut Vec<u8>) -> bool {
        let held = !block.is_empty();
        self.write(block);
        block.clear();
        held
    }

    fn write(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        match &self.file {
            None => {
                let _ = std::io::stdout().lock().write_all(bytes);
            }
            Some(file) => {
                let _held = self
                    .lock
                    .as_ref()
                    .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()));
                let mut file: &std::fs::File = file;
                let _ = file.write_all(bytes);
            }
        }
    }
}

/// A block is written once it holds this much.
const BLOCK: usize = 32 * 1024;
/// ...or this long after its first line.
const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// One thread's lines not yet written.
type Block = Arc<Mutex<Vec<u8>>>;

/// Each thread's pending lines, and where they go, for the flusher and [`flush`].
static PENDING: Mutex<Vec<(Block, Arc<Out>)>> = Mutex::new(Vec::new());

/// A thread running out of work writes its block if it wrote none for this long:
/// an idle service's lines appear at once, a busy one's go out a block at a time.
const IDLE_WRITE_GAP: Duration = Duration::from_millis(1);

thread_local! {
    /// This thread's pending lines per destination (registered in [`PENDING`] on
    /// first use; one destination in a process, more in tests).
    static BLOCK_BUF: std::cell::RefCell<Vec<(Arc<Out>, Block)>> =
        const { std::cell::RefCell::new(Vec::new()) };
    /// When this thread last wrote a block.
    static LAST_WRITE: std::cell::Cell<Option<std::time::Instant>> =
        const { std::cell::Cell::new(None) };
}

/// Called by a thread about to wait for work (a tokio runtime's `on_thread_park`):
/// writes this thread's pending lines unless it wrote a block in the last
/// millisecond. So a line is written when its thread goes idle, and a worker under
/// load, which idles between every few requests, still writes about one block per
/// millisecond instead of one line per request; what the gap leaves pending goes
/// out at the next idle moment or with the 200 ms flusher.
pub fn idle() {
    let now = std::time::Instant::now();
    if LAST_WRITE
        .try_with(|last| {
            last.get()
                .is_some_and(|at| now.duration_since(at) < IDLE_WRITE_GAP)
        })
        .unwrap_or(true)
    {
        return;
    }
    let _ = BLOCK_BUF.try_with(|blocks| {
        let Ok(blocks) = blocks.try_borrow() else {
            return;
        };
        let mut wrote = false;
        for (out, block) in blocks.iter() {
            wrote |= out.drain(&mut block.lock().unwrap_or_else(|e| e.into_inner()));
        }
        if wrote {
            LAST_WRITE.set(Some(now));
        }
    });
}

/// Writes every thread's pending lines now: at exit, and by the flusher.
pub fn flush() {
    let pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    for (block, out) in pending.iter() {
        out.drain(&mut block.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

impl JsonLayer {
    pub fn new(service: &str, version: &str) -> Self {
        let mut identity = b",\"service\":".to_vec();
        json_str(&mut identity, service);
        identity.extend_from_slice(b",\"version\":");
        json_str(&mut identity, version);
        Self {
            identity: identity.into_boxed_slice(),
            out: Arc::new(Out::new(None)),
            buffered: false,
        }
    }

    pub fn with_sink(mut self, sink: Sink) -> Self {
        self.out = Arc::new(Out::new(match sink {
            Sink::Stdout => None,
            Sink::File(f) => Some(f),
        }));
        self
    }

    /// Lines are gathered per thread and written in blocks of up to 32 KiB: when
    /// the thread goes idle (threads whose runtime calls [`idle`] on park), and at
    /// the latest 200 ms after they were logged (nginx's `access_log ... buffer=`).
    /// One `write` per block instead of per line, which is a gateway's access log
    /// at tens of thousands of lines a second. Warnings and errors write their
    /// thread's block at once. Lines not yet written are lost if the process is
    /// killed (call [`flush`] before a clean exit).
    pub fn buffered(mut self) -> Self {
        self.buffered = true;
        static FLUSHER: std::sync::Once = std::sync::Once::new();
        FLUSHER.call_once(|| {
            let _ = std::thread::Builder::new()
                .name("log-flush".into())
                .spawn(|| {
                    loop {
                        std::thread::sleep(FLUSH_EVERY);
                        flush();
                    }
                });
        });
        self
    }

    /// Appends `line` to this thread's block; writes the block when it is full or
    /// the line is a warning or an error.
    fn gather(&self, line: &[u8], urgent: bool) {
        let Some(block) = BLOCK_BUF
            .try_with(|blocks| {
                let mut blocks = blocks.borrow_mut();
                if let Some((_, block)) = blocks.iter().find(|(o, _)| Arc::ptr_eq(o, &self.out)) {
                    return block.clone();
                }
                let block = Arc::new(Mutex::new(Vec::with_capacity(BLOCK)));
                PENDING
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((block.clone(), self.out.clone()));
                blocks.push((self.out.clone(), block.clone()));
                block
            })
            .ok()
        else {
            // The thread is ending: write through.
            self.out.write(line);
            return;
        };
        let mut block = block.lock().unwrap_or_else(|e| e.into_inner());
        block.extend_from_slice(line);
        if urgent || block.len() >= BLOCK {
            self.out.drain(&mut block);
            let _ = LAST_WRITE.try_with(|last| last.set(Some(std::time::Instant::now())));
        }
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
        self.0
            .insert(field.name().to_owned(), Value::from(cause_chain(value)));
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
        let urgent = *event.metadata().level() <= tracing::Level::WARN;
        with_line(|buf| {
            self.write_line(buf, event, &ctx);
            self.emit(buf, urgent);
        });
    }
}

thread_local! {
    /// The line being written, reused: a line per request is the gateway's access
    /// log, and building it must not cost an allocation per field.
    static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `write` on this thread's emptied line buffer (a new one if a line is
/// already being written on it: a value's `Debug` that logs).
fn with_line(write: impl FnOnce(&mut Vec<u8>)) {
    let mut write = Some(write);
    let _ = LINE.try_with(|line| {
        if let Ok(mut buf) = line.try_borrow_mut()
            && let Some(write) = write.take()
        {
            buf.clear();
            write(&mut buf);
            // A rare huge line does not stay allocated.
            buf.shrink_to(16 * 1024);
        }
    });
    if let Some(write) = write {
        write(&mut Vec::new());
    }
}

/// The fields of a line written by [`info_line`], in the order they are added. A
/// `None` value writes nothing, as `tracing` records an `Option` field.
pub struct Fields<'a>(&'a mut Vec<u8>);

/// A field's key as a line holds it, `,"name":`, rendered at compile time by
/// [`key!`](crate::key). Written in one copy, where `,"`, the name and `":` were
/// three (each a `memcpy` call), for each of an access line's 13 fields.
#[derive(Clone, Copy, Debug)]
pub struct Key(&'static str);

impl Key {
    /// Use [`key!`](crate::key), which renders the text.
    #[doc(hidden)]
    pub const fn rendered(text: &'static str) -> Self {
        Key(text)
    }
}

/// The [`Key`] of a field named `$name` (a Rust identifier, as `tracing`'s field
/// names are: it is written unescaped).
#[macro_export]
macro_rules! key {
    ($name:literal) => {
        $crate::logging::Key::rendered(concat!(",\"", $name, "\":"))
    };
}

impl Fields<'_> {
    fn key(&mut self, key: Key) {
        self.0.extend_from_slice(key.0.as_bytes());
    }

    pub fn str(&mut self, key: Key, value: Option<&str>) -> &mut Self {
        if let Some(value) = value {
            if needs_escape(value.as_bytes()) {
                self.key(key);
                json_str(self.0, value);
            } else {
                // The usual value needs no escaping: key and value go in after
                // one reservation, without `json_str`'s second look (about 40
                // instructions a field, nine fields an access line).
                self.0.reserve(key.0.len() + value.len() + 2);
                self.key(key);
                self.0.push(b'"');
                self.0.extend_from_slice(value.as_bytes());
                self.0.push(b'"');
            }
        }
        self
    }

    pub fn u64(&mut self, key: Key, value: Option<u64>) -> &mut Self {
        if let Some(value) = value {
            self.key(key);
            self.0
                .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
        }
        self
    }

    /// A duration in milliseconds to the microsecond, written as [`ms`]'s value is
    /// by `f64` (the shortest form, `1.5`, `12.0`) but with integer arithmetic: the
    /// float formatter cost about 200 instructions a field, two fields an access line.
    pub fn millis(&mut self, key: Key, value: Option<Duration>) -> &mut Self {
        if let Some(value) = value {
            // Beyond 31 years, doubles are too far apart for three decimals to be
            // the shortest form.
            if value.as_secs() >= 1_000_000_000 {
                return self.f64(key, Some(ms(value)));
            }
            self.key(key);
            // In u64 and u32 arithmetic: `as_micros` is a u128, whose division is a
            // call of its own.
            let micros = value.subsec_micros();
            let whole = value.as_secs() * 1000 + u64::from(micros / 1000);
            self.0
                .extend_from_slice(itoa::Buffer::new().format(whole).as_bytes());
            let frac = (micros % 1000) as u16;
            let digits = [
                b'.',
                b'0' + (frac / 100) as u8,
                b'0' + (frac / 10 % 10) as u8,
                b'0' + (frac % 10) as u8,
            ];
            // `12.0`, `1.5`, `1.25`, `1.125`: trailing zeros go, but one digit stays.
            let keep = match frac {
                0 => 2,
                f if f % 100 == 0 => 2,
                f if f % 10 == 0 => 3,
                _ => 4,
            };
            self.0.extend_from_slice(&digits[..keep]);
        }
        self
    }

    pub fn f64(&mut self, key: Key, value: Option<f64>) -> &mut Self {
        if let Some(value) = value {
            self.key(key);
            json_f64(self.0, value);
        }
        self
    }
}

/// Writes an `info` line of `target` with `message` and then `fields`, the line the
/// JSON layer writes for a `tracing` event with the same fields, without
/// `tracing`'s dispatch, field visitors and `fmt` machinery: the gateway's access
/// line cost about 7,600 instructions that way, a sixth of a proxied request. It
/// writes only where the line is the same: the current subscriber has a
/// [`JsonLayer`] and no span is entered (whose fields the line would carry).
/// Returns whether it wrote; the caller checks first that `info` is enabled for
/// `target` (`tracing::enabled!`), and logs through `tracing` when this returns
/// false. (A subscriber that gives the layer a filter of its own, or other layers
/// beside it, would see these lines pass that filter and miss those layers: the
/// binary's subscriber, `init_to`'s, has neither.)
pub fn info_line(target: &str, message: &str, fields: impl FnOnce(&mut Fields<'_>)) -> bool {
    // `get_default` takes an `FnMut`: the fields are taken out of an `Option`.
    let mut fields = Some(fields);
    tracing::dispatcher::get_default(|dispatch| {
        let Some(layer) = dispatch.downcast_ref::<JsonLayer>() else {
            return false;
        };
        let Some(fields) = fields.take() else {
            return false;
        };
        if dispatch.current_span().id().is_some() {
            return false;
        }
        with_line(|buf| {
            layer.write_head(buf, "info", target);
            buf.extend_from_slice(b",\"message\":");
            json_str(buf, message);
            fields(&mut Fields(&mut *buf));
            buf.extend_from_slice(b"}\n");
            layer.emit(buf, false);
        });
        true
    })
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
        self.write_head(buf, level, event.metadata().target());
        // The event's fields first, remembering which it recorded (a field declared
        // with `None` records nothing and must not hide a span's value).
        let mut visitor = LineVisitor {
            buf,
            written: Written::default(),
        };
        event.record(&mut visitor);
        let LineVisitor { buf, written } = visitor;
        if !written.contains("message") {
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
                    let hidden = written.contains(k.as_str())
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

    /// `{"timestamp":..,"level":..,"service":..,"version":..,"target":..`
    fn write_head(&self, buf: &mut Vec<u8>, level: &str, target: &str) {
        buf.extend_from_slice(b"{\"timestamp\":\"");
        write_now(buf);
        buf.extend_from_slice(b"\",\"level\":\"");
        buf.extend_from_slice(level.as_bytes());
        buf.push(b'"');
        buf.extend_from_slice(&self.identity);
        buf.extend_from_slice(b",\"target\":");
        json_str(buf, target);
    }

    /// Sends a finished line on its way: into the thread's block, or written.
    fn emit(&self, line: &[u8], urgent: bool) {
        match self.buffered {
            true => self.gather(line, urgent),
            false => self.out.write(line),
        }
    }
}

/// `d` in milliseconds, rounded to the microsecond: the value an access line's
/// durations carry, whichever way the line is written.
pub fn ms(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

/// `value` as a JSON number; JSON has no NaN or infinity.
fn json_f64(buf: &mut Vec<u8>, value: f64) {
    match value.is_finite() {
        true => {
            let _ = serde_json::to_writer(&mut *buf, &value);
        }
        false => buf.extend_from_slice(b"null"),
    }
}

/// The whole cause chain: the top error alone rarely says what went wrong.
fn cause_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// `s` as a JSON string.
fn json_str(buf: &mut Vec<u8>, s: &str) {
    // Nearly every string in a log line (names, paths, ids) needs no escaping: one
    // scan and one copy, where serde_json's writer cost about 20 instructions a
    // byte.
    if !needs_escape(s.as_bytes()) {
        buf.reserve(s.len() + 2);
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else {
        buf.push(b'"');
        let _ = std::fmt::Write::write_str(&mut JsonEscaped(buf), s);
        buf.push(b'"');
    }
}

/// Whether `s` holds a byte JSON escapes (a control character, a quote or a
/// backslash), eight bytes per step: most strings of a line are names and ids.
fn needs_escape(s: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Nonzero exactly when some byte of x is below n (n <= 0x80): the classic
    // "has less" bit trick.
    let below = |x: u64, n: u64| x.wrapping_sub(ONES * n) & !x & HIGH;
    let hit = |x: u64| {
        below(x, 0x20)
            | below(x ^ (ONES * u64::from(b'"')), 1)
            | below(x ^ (ONES * u64::from(b'\\')), 1)
            != 0
    };
    let word = |at: &[u8]| at.first_chunk::<8>().map_or(0, |w| u64::from_le_bytes(*w));
    if s.len() < 8 {
        // Short: the bytes one by one (at most seven, no padded copy).
        return s.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
    }
    let mut chunks = s.chunks_exact(8);
    if chunks.any(|chunk| hit(word(chunk))) {
        return true;
    }
    // The tail as the string's last eight bytes, overlapping what was checked: a
    // padded copy of it was a `memcpy` call of a length known only at run time.
    !chunks.remainder().is_empty() && hit(word(&s[s.len() - 8..]))
}

/// Writes an event's fields as `,"name":value`.
struct LineVisitor<'a> {
    buf: &'a mut Vec<u8>,
    /// The names written, so span fields of the same names are left out.
    written: Written,
}

/// The field names an event wrote: inline up to 24 (an access line has 14), so a
/// line costs no allocation for them.
#[derive(Default)]
struct Written {
    inline: [&'static str; 24],
    len: usize,
    more: Vec<&'static str>,
}

impl Written {
    fn push(&mut self, name: &'static str) {
        match self.inline.get_mut(self.len) {
            Some(slot) => {
                *slot = name;
                self.len += 1;
            }
            None => self.more.push(name),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.inline[..self.len].contains(&name) || self.more.contains(&name)
    }
}

/// A `fmt::Write` that appends what it is given as the inside of a JSON string, so
/// `Display` and `Debug` values are escaped as they are formatted, without an
/// intermediate `String`.
struct JsonEscaped<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for JsonEscaped<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let bytes = s.as_bytes();
        let mut start = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let escape: &[u8] = match b {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0..=0x1f => b"",
                _ => continue,
            };
            self.0.extend_from_slice(&bytes[start..i]);
            match escape.is_empty() {
                true => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    self.0.extend_from_slice(b"\\u00");
                    self.0.push(HEX[usize::from(b >> 4)]);
                    self.0.push(HEX[usize::from(b & 0xf)]);
                }
                false => self.0.extend_from_slice(escape),
            }
            start = i + 1;
        }
        self.0.extend_from_slice(&bytes[start..]);
        Ok(())
    }
}

/// Now, as [`write_rfc3339`] writes it. The date and time to the second are
/// formatted once a second per thread: the calendar arithmetic was most of the
/// cost of a line's fixed keys.
fn write_now(buf: &mut Vec<u8>) {
    thread_local! {
        /// The second last written, and its text up to the fraction's dot.
        static SECOND: std::cell::Cell<Option<(u64, [u8; 20])>> =
            const { std::cell::Cell::new(None) };
    }
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let second = since.as_secs();
    let prefix = match SECOND.try_with(std::cell::Cell::get) {
        Ok(Some((cached, prefix))) if cached == second => prefix,
        _ => {
            let mut text = Vec::with_capacity(27);
            let at = i64::try_from(second)
                .ok()
                .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
                .unwrap_or(OffsetDateTime::UNIX_EPOCH);
            write_rfc3339(&mut text, at);
            let mut prefix = [0u8; 20];
            prefix.copy_from_slice(&text[..20]);
            let _ = SECOND.try_with(|cell| cell.set(Some((second, prefix))));
            prefix
        }
    };
    buf.extend_from_slice(&prefix);
    digits(buf, since.subsec_micros(), 6);
    buf.push(b'Z');
}

/// `value`'s last `width` decimal digits, zero-padded.
fn digits(buf: &mut Vec<u8>, mut value: u32, width: usize) {
    let start = buf.len();
    buf.resize(start + width, b'0');
    for slot in buf[start..].iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// `2026-11-26T21:19:23.123456Z` (RFC 3339, UTC, microseconds), written digit by
/// digit: formatting through `time`'s format descriptions was a visible share of
/// the access log's cost.
fn write_rfc3339(buf: &mut Vec<u8>, t: OffsetDateTime) {
    digits(buf, u32::try_from(t.year()).unwrap_or(0), 4);
    buf.push(b'-');
    digits(buf, u32::from(u8::from(t.month())), 2);
    buf.push(b'-');
    digits(buf, u32::from(t.day()), 2);
    buf.push(b'T');
    digits(buf, u32::from(t.hour()), 2);
    buf.push(b':');
    digits(buf, u32::from(t.minute()), 2);
    buf.push(b':');
    digits(buf, u32::from(t.second()), 2);
    buf.push(b'.');
    digits(buf, t.microsecond(), 6);
    buf.push(b'Z');
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
        json_f64(self.buf, value);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        let _ = serde_json::to_writer(&mut *self.buf, &value);
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        let _ = serde_json::to_writer(&mut *self.buf, &value);
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
        self.key(field);
        json_str(self.buf, &cause_chain(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.key(field);
        self.buf.push(b'"');
        let _ = std::fmt::Write::write_fmt(&mut JsonEscaped(self.buf), format_args!("{value:?}"));
        self.buf.push(b'"');
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Strings are written as JSON that reads back as the same string, with or
    /// without characters to escape.
    #[test]
    fn strings_read_back_as_written() {
        for s in [
            "",
            "plain /orders/42",
            "quote \" and backslash \\",
            "line\nfeed\ttab\rreturn",
            "control \u{1} \u{1f} and del \u{7f}",
            "unicode é ✓ 😀",
            "a string of more than sixteen bytes, a \" quote after them",
            "more than sixteen plain bytes, then a control \u{2}",
            "eight by\\tes, then more",
            "byte 0x7f \u{7f}, 0x80 and up: \u{80}\u{ff} ÿÿÿÿÿÿÿÿ",
            "\u{1f}\u{1f}\u{1f}\u{1f}\u{1f}\u{1f}\u{1f}\u{1f}",
        ] {
            let mut buf = Vec::new();
            json_str(&mut buf, s);
            let back: String = serde_json::from_slice(&buf).unwrap();
            assert_eq!(back, s);
        }
    }

    /// The eight-bytes-a-step check agrees with the byte-by-byte definition for
    /// every byte value at every position, in strings short, whole words long and
    /// with tails (which the last word's check overlaps).
    #[test]
    fn escape_check_finds_every_special_byte() {
        assert!(!needs_escape(b""));
        for len in 1..=40 {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut s = vec![b'a'; len];
                    s[at] = b;
                    let expected = b < 0x20 || b == b'"' || b == b'\\';
                    assert_eq!(needs_escape(&s), expected, "byte {b:#x} at {at} of {len}");
                }
            }
        }
    }

    /// A subscriber with the JSON layer of service `svc` 1.2.3, writing to a new
    /// file: the file's path and the subscriber.
    fn json_to_file() -> (std::path::PathBuf, impl Subscriber + Send + Sync) {
        let path = std::env::temp_dir().join(format!("log-{}.jsonl", uuid::Uuid::new_v4()));
        let file = std::fs::File::create(&path).unwrap();
        let subscriber = tracing_subscriber::registry()
            .with(JsonLayer::new("svc", "1.2.3").with_sink(Sink::File(file)));
        (path, subscriber)
    }

    /// Every line is one JSON object with the fixed keys, the span's fields and the
    /// event's (which win on a clash), strings escaped.
    #[test]
    fn lines_are_json_objects_with_span_and_event_fields() {
        let (path, subscriber) = json_to_file();
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

    /// A line written by `info_line` is byte for byte the one the layer writes for
    /// a `tracing` event with the same fields (but its time); inside a span or
    /// under another subscriber it writes nothing and says so.
    #[test]
    fn direct_lines_match_the_lines_of_events() {
        let (path, subscriber) = json_to_file();
        let fields = |line: &mut Fields<'_>| {
            line.str(crate::key!("id"), Some("c-\"1\"\n"))
                .str(crate::key!("absent"), None)
                .u64(crate::key!("status"), Some(200))
                .u64(crate::key!("bytes"), None)
                .f64(crate::key!("duration_ms"), Some(1.25))
                .millis(
                    crate::key!("upstream_ms"),
                    Some(Duration::from_micros(12_340)),
                )
                .f64(crate::key!("nan"), Some(f64::NAN))
                .str(crate::key!("path"), Some("/orders/é"));
        };
        tracing::subscriber::with_default(subscriber, || {
            assert!(info_line("app::access", "request completed", fields));
            tracing::info!(
                target: "app::access",
                id = "c-\"1\"\n",
                absent = None::<&str>,
                status = 200u64,
                bytes = None::<u64>,
                duration_ms = 1.25,
                upstream_ms = ms(Duration::from_micros(12_340)),
                nan = f64::NAN,
                path = "/orders/é",
                "request completed"
            );
            let span = tracing::info_span!("request", correlation_id = "c-2");
            let _entered = span.enter();
            assert!(!info_line("app::access", "request completed", fields));
        });
        let plain = tracing_subscriber::registry().with(tracing_subscriber::fmt::layer());
        tracing::subscriber::with_default(plain, || {
            assert!(!info_line("app::access", "request completed", fields));
        });
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        // The timestamp is the first field: compare from the level on.
        let rest = |l: &str| l[l.find(",\"level\"").unwrap()..].to_owned();
        assert_eq!(rest(lines[0]), rest(lines[1]));
        let line: Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(line["id"], "c-\"1\"\n");
        assert_eq!(line["message"], "request completed");
        assert_eq!(line["nan"], Value::Null);
        assert!(line.get("absent").is_none() && line.get("bytes").is_none());
        let _ = std::fs::remove_file(path);
    }

    /// `millis` writes what `f64` writes for the same duration, without the float
    /// formatter.
    #[test]
    fn millis_are_written_as_the_float_would_be() {
        let samples = (0..20_000u64)
            .chain([
                999_999,
                1_000_000,
                1_234_567_890,
                86_400_000_000,
                999_999_999_999_999,
            ])
            .chain((0..64).map(|i| 1u64 << i));
        for micros in samples {
            let d = Duration::from_micros(micros);
            let (mut fast, mut float) = (Vec::new(), Vec::new());
            Fields(&mut fast).millis(crate::key!("t"), Some(d));
            Fields(&mut float).f64(crate::key!("t"), Some(ms(d)));
            assert_eq!(
                String::from_utf8_lossy(&fast),
                String::from_utf8_lossy(&float),
                "{micros} µs"
            );
        }
        let mut none = Vec::new();
        Fields(&mut none).millis(crate::key!("t"), None);
        assert!(none.is_empty());
    }

    /// Buffered lines wait for a full block, a warning, the flusher or [`flush`],
    /// and arrive whole and in order.
    #[test]
    fn lines_from_many_threads_never_interleave() {
        // A regular file is written without a lock; a pipe through one. Lines longer
        // than a pipe's atomic write are included.
        let path = std::env::temp_dir().join(format!("log-{}.jsonl", uuid::Uuid::new_v4()));
        let file = std::fs::File::create(&path).unwrap();
        let layer = JsonLayer::new("svc", "1").with_sink(Sink::File(file));
        assert!(layer.out.lock.is_none(), "a regular file needs no lock");
        let subscriber = Arc::new(tracing_subscriber::registry().with(layer));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let subscriber = subscriber.clone();
                std::thread::spawn(move || {
                    tracing::subscriber::with_default(subscriber, || {
                        for n in 0..500u64 {
                            let pad = "y".repeat(if n % 50 == 0 { 9000 } else { 80 });
                            tracing::info!(t, n, pad, "line");
                        }
                    });
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut seen = std::collections::HashSet::new();
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            seen.insert((v["t"].as_u64().unwrap(), v["n"].as_u64().unwrap()));
        }
        assert_eq!(seen.len(), 2000);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn buffered_lines_are_written_in_blocks_whole_and_in_order() {
        let path = std::env::temp_dir().join(format!("log-{}.jsonl", uuid::Uuid::new_v4()));
        let file = std::fs::File::create(&path).unwrap();
        let subscriber = tracing_subscriber::registry().with(
            JsonLayer::new("svc", "1")
                .with_sink(Sink::File(file))
                .buffered(),
        );
        let lines = |path: &std::path::Path| -> Vec<Value> {
            std::fs::read_to_string(path)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        };
        tracing::subscriber::with_default(subscriber, || {
            for n in 0..1000u64 {
                tracing::info!(n, pad = "x".repeat(100), "line");
            }
            // Blocks of 32 KiB went out without waiting for the flusher.
            assert!(lines(&path).len() >= 700, "{} lines", lines(&path).len());
            tracing::info!(n = 1000u64, "before the warning");
            tracing::warn!(n = 1001u64, "a warning is written at once");
            let written = lines(&path);
            assert_eq!(written.len(), 1002);
            for (i, line) in written.iter().enumerate() {
                assert_eq!(line["n"], i as u64, "out of order");
            }
            tracing::info!(n = 1002u64, "pending");
        });
        flush();
        assert_eq!(lines(&path).len(), 1003);
        let _ = std::fs::remove_file(path);
    }

    /// The hand-written timestamp parses back as RFC 3339 to the same instant (to
    /// the microsecond), and escaped `Debug` output is the JSON string of the text.
    #[test]
    fn timestamps_and_escaped_values_are_valid_json() {
        use time::format_description::well_known::Rfc3339;
        for t in [
            OffsetDateTime::UNIX_EPOCH,
            OffsetDateTime::from_unix_timestamp_nanos(1_795_036_763_123_456_789).unwrap(),
            OffsetDateTime::now_utc(),
        ] {
            let mut buf = Vec::new();
            write_rfc3339(&mut buf, t);
            let text = String::from_utf8(buf).unwrap();
            assert_eq!(text.len(), 27, "{text}");
            let parsed = OffsetDateTime::parse(&text, &Rfc3339).unwrap();
            assert_eq!(
                parsed.unix_timestamp_nanos() / 1000,
                t.unix_timestamp_nanos() / 1000
            );
        }
        // `write_now`'s second is cached per thread; each line still reads the clock.
        for _ in 0..3 {
            let before = OffsetDateTime::now_utc();
            let mut buf = Vec::new();
            write_now(&mut buf);
            let after = OffsetDateTime::now_utc();
            let text = String::from_utf8(buf).unwrap();
            assert_eq!(text.len(), 27, "{text}");
            let parsed = OffsetDateTime::parse(&text, &Rfc3339).unwrap();
            let micros = |t: OffsetDateTime| t.unix_timestamp_nanos() / 1000;
            assert!(
                micros(before) <= micros(parsed) && micros(parsed) <= micros(after),
                "{text}"
            );
            std::thread::sleep(std::time::Duration::from_millis(400));
        }
        for raw in [
            "plain",
            "quote \" back \\ slash",
            "line\nfeed\ttab\r",
            "\u{1}\u{1f} é ✓",
        ] {
            let mut buf = vec![b'"'];
            std::fmt::Write::write_str(&mut JsonEscaped(&mut buf), raw).unwrap();
            buf.push(b'"');
            let back: String = serde_json::from_slice(&buf).unwrap();
            assert_eq!(back, raw);
        }
    }
}
