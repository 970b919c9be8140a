//! `payments`: a simulated payment provider in the place-order saga. It charges an
//! order (after a random latency, declining a configured share, silent during outage
//! windows) and refunds it, records both in its own database, and answers on the
//! `payments` topic (`payment.charged`, `payment.declined`, `payment.refunded`).
//!
//! An order is never charged twice: one charge and one refund per order (database
//! constraints), each message handled in one transaction with its inbox claim and its
//! answer (outbox), and a repeated request answered from what was recorded. A refund
//! that comes before the charge leaves a tombstone, so the late charge is declined
//! (`cancelled`).
//!
//! Orchestration mode consumes `payments.commands` (`payments.charge`,
//! `payments.refund`); choreography mode charges on `inventory.reserved` and refunds
//! on `order.cancelled`. `GET /payments/{order_id}` and `GET /payments` read it back.
#![forbid(unsafe_code)]

pub mod configuration;
pub mod handler;
mod metrics;
pub mod provider;
pub mod routes;
pub mod startup;

pub use configuration::{Config, Outage, Settings};
pub use handler::{ChargeRequest, Payments};
pub use provider::Provider;
pub use startup::Application;

pub const NAME: &str = "payments";

/// The schema (public for the CLI and for tests that drive the handlers directly).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
