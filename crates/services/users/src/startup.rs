//! Building and running the service.

use std::sync::Arc;

use anyhow::Context;
use chassis::Chassis;
use chassis::http::{Readiness, Service};
use chassis::secrecy::ExposeSecret;
use utoipa::OpenApi;

use crate::Config;
use crate::password::Passwords;
use crate::routes::{self, ApiDoc, AppState};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Builds the service; the chassis's [`Service`] runs it.
pub struct Application;

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Service> {
        let db = chassis::db::Database::connect(config.database_url.expose_secret(), &MIGRATOR)
            .await
            .context("users database")?;
        let keys = crate::keys::load_or_create(db.pool())
            .await
            .context("signing keys")?;
        let signer = keys.first().cloned().context("no signing key")?;
        let jwks = chassis::jwt::jwks(keys.iter());
        messaging::outbox::Outbox::install(db.pool())
            .await
            .context("users outbox tables")?;
        let chassis = Chassis::bind(config.service)
            .await
            .context("binding the listener")?;
        let outbox = messaging::outbox::Outbox::new();
        let state = AppState {
            pool: db.pool().clone(),
            outbox: outbox.clone(),
            passwords: Passwords::new()?,
            signer: Arc::new(signer),
            jwks: Arc::new(jwks),
            token_ttl: config.settings.token_ttl.0,
            issuer: Arc::from(config.settings.issuer.as_str()),
            audience: Arc::from(config.settings.audience.as_str()),
        };
        let router = chassis.router(
            routes::router(state),
            Readiness {
                database: Some(db.clone()),
                dependencies: Vec::new(),
            },
            Some(ApiDoc::openapi()),
        );
        let pool = db.pool().clone();
        Ok(Service::new(chassis, router, Some(db)).with_outbox_relay(pool, outbox))
    }
}
