//! Building and running the service.

use anyhow::Context;
use chassis::Chassis;
use chassis::http::{Readiness, Service};
use chassis::secrecy::ExposeSecret;
use utoipa::OpenApi;

use crate::Config;
use crate::routes::{self, ApiDoc, AppState};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Builds the service; the chassis's [`Service`] runs it.
pub struct Application;

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Service> {
        let db = chassis::db::Database::connect(config.database_url.expose_secret(), &MIGRATOR)
            .await
            .context("orders database")?;
        messaging::outbox::Outbox::install(db.pool())
            .await
            .context("orders outbox tables")?;
        let chassis = Chassis::bind(config.service)
            .await
            .context("binding the listener")?;
        let outbox = messaging::outbox::Outbox::new();
        let state = AppState {
            outbox: outbox.clone(),
            pool: db.pool().clone(),
            client: chassis.client.clone(),
            max_lines: config.settings.max_lines,
            max_quantity: config.settings.max_quantity,
        };
        let router = chassis.router(
            routes::router(state),
            Readiness {
                database: Some(db.clone()),
                dependencies: vec![crate::PRODUCTS.to_owned()],
            },
            Some(ApiDoc::openapi()),
        );
        let pool = db.pool().clone();
        Ok(Service::new(chassis, router, Some(db)).with_outbox_relay(pool, outbox))
    }
}
