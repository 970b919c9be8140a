//! `products`: the catalog. Public reads (`GET /products`, `GET /products/{id}`,
//! batch `GET /products?ids=a,b,c`), seeded with 50 products at first start.
#![forbid(unsafe_code)]

pub mod configuration;
pub mod domain;
pub mod repository;
pub mod routes;
pub mod startup;

pub use configuration::{Config, Settings};
pub use startup::Application;

/// This service's name in discovery, logs and metrics.
pub const NAME: &str = "products";
