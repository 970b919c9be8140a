//! The API gateway: the single public entry of a set of services.
//!
//! Per request: path normalization done once (dot segments resolved, unreserved
//! escapes decoded; encoded separators, NUL and invalid UTF-8 refused), routing on
//! host, path (exact, template or prefix) and method, the route's GCRA rate limit,
//! the route's auth policy (JWT
//! verified against the issuer's JWKS, algorithm pinned by key), removal of
//! hop-by-hop headers and of any identity a client tries to assert, a freshly
//! minted forwarded identity, `X-Forwarded-*`, and a streaming forward through the
//! chassis's HTTP client (discovery, context propagation, deadline). An upstream that
//! is down answers 502, one that is too slow 504, both as problem+json.
//!
//! The gateway knows nothing of any shop: routes, services and issuers come from
//! [`Settings`] or from a declarative file it watches and reloads without dropping a
//! request ([`runtime`]); its admin API ([`admin`]) listens on its own port.
#![forbid(unsafe_code)]

pub mod admin;
pub mod aggregate;
pub mod auth;
pub mod cache;
pub mod configuration;
pub mod cors;
pub mod forwarded;
pub mod h1;
pub mod message;
pub mod normalize;
pub mod openapi;
pub mod proxy;
pub mod ratelimit;
pub mod redis_store;
pub mod routes;
pub mod runtime;
pub mod server;
pub mod startup;
pub mod tls;
pub mod upstream;
pub mod wire;

pub use configuration::{AuthPolicy, RouteConfig, Settings};
pub use startup::{Application, Config};

pub const NAME: &str = "gateway";
