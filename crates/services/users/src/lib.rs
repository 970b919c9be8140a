//! `users`: sign-up, login and the signing keys. Passwords are hashed with argon2id;
//! access tokens are ES256 JWTs with a `kid`, verifiable by anyone through
//! `GET /.well-known/jwks.json`.
#![forbid(unsafe_code)]

pub mod configuration;
pub mod domain;
pub mod keys;
pub mod password;
pub mod repository;
pub mod routes;
pub mod startup;

pub use configuration::{Config, Settings};
pub use startup::Application;

pub const NAME: &str = "users";
