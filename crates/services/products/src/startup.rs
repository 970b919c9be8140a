//! Building and running the service.

use anyhow::Context;
use chassis::Chassis;
use chassis::http::{Readiness, Service};
use chassis::secrecy::ExposeSecret;
use utoipa::OpenApi;

use crate::Config;
use crate::routes::{self, ApiDoc, AppState};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Builds the service; the chassis's [`Service`] runs it.
pub struct Application;

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Service> {
        let db = chassis::db::Database::connect(config.database_url.expose_secret(), &MIGRATOR)
            .await
            .context("products database")?;
        messaging::outbox::Outbox::install(db.pool())
            .await
            .context("products outbox tables")?;
        let outbox = messaging::outbox::Outbox::new();
        if config.settings.seed {
            let added = crate::repository::seed(db.pool(), &outbox)
                .await
                .context("seeding the catalog")?;
            if added > 0 {
                tracing::info!(products = added, "seeded the demo catalog");
            }
        }
        let chassis = Chassis::bind(config.service)
            .await
            .context("binding the listener")?;
        let routes = routes::router(AppState {
            pool: db.pool().clone(),
            cache_control: routes::cache_control(config.settings.cache_max_age.0),
        });
        let router = chassis.router(
            routes,
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
