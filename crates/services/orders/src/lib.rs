//! `orders`: `POST /orders` prices the lines from this service's replica of the
//! catalog's prices (fed by `products`' events, [`catalog`]), stores the order
//! (PENDING) idempotently per `Idempotency-Key` and starts the place-order saga
//! (stock, payment, confirmation: [`saga`]) in the same transaction, and serves the
//! caller's own orders with their saga history.
#![forbid(unsafe_code)]

pub mod catalog;
pub mod configuration;
pub mod domain;
pub mod repository;
pub mod routes;
pub mod saga;
pub mod startup;

pub use configuration::{Config, Settings};
pub use startup::{Application, MIGRATOR};

pub const NAME: &str = "orders";
/// The catalog's service: it prices the products the replica has not heard of yet.
pub const PRODUCTS: &str = "products";
