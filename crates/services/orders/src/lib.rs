//! `orders`: `POST /orders` prices the lines with one batch call to `products`,
//! stores the order (PENDING) idempotently per `Idempotency-Key`, and serves the
//! caller's own orders. The saga (stock, payment, confirmation) builds on this.
#![forbid(unsafe_code)]

pub mod configuration;
pub mod domain;
pub mod repository;
pub mod routes;
pub mod startup;

pub use configuration::{Config, Settings};
pub use startup::Application;

pub const NAME: &str = "orders";
/// The service orders prices come from.
pub const PRODUCTS: &str = "products";
