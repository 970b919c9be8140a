//! Building and running the service.

use anyhow::Context;
use chassis::http::{Readiness, Service};
use chassis::secrecy::ExposeSecret;
use chassis::{CancellationToken, Chassis};
use utoipa::OpenApi;

use crate::Config;
use crate::routes::{self, ApiDoc, AppState};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub struct Application(Service);

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let db = chassis::db::Database::connect(config.database_url.expose_secret(), &MIGRATOR)
            .await
            .context("products database")?;
        if config.settings.seed {
            let added = crate::repository::seed(db.pool())
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
        });
        let router = chassis.router(
            routes,
            Readiness {
                database: Some(db.clone()),
                dependencies: Vec::new(),
            },
            Some(ApiDoc::openapi()),
        );
        Ok(Self(Service::new(chassis, router, Some(db))))
    }

    pub fn port(&self) -> u16 {
        self.0.port()
    }

    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        self.0
            .run_until_stopped(shutdown)
            .await
            .context("serving HTTP")
    }
}
