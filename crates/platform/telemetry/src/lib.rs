//! Observability primitives shared by every Bazaar process, independent of any web
//! framework and of the shop:
//!
//! - [`context`]: the request context (correlation id + W3C trace context) carried in a
//!   task-local and injected into every outgoing call;
//! - [`logging`]: one JSON object per line (timestamp, level, service, version, message,
//!   fields, and the fields of every enclosing span, so a request's correlation id is on
//!   each of its lines);
//! - [`metrics`]: a Prometheus registry with the HTTP server histogram.
//!
//! ```
//! let ctx = telemetry::context::RequestContext::from_headers(&http::HeaderMap::new());
//! assert_eq!(ctx.trace.trace_id_hex().len(), 32);
//! ```
#![forbid(unsafe_code)]

pub mod context;
pub mod logging;
pub mod metrics;
