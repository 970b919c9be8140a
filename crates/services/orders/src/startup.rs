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
            .context("orders database")?;
        let chassis = Chassis::bind(config.service)
            .await
            .context("binding the listener")?;
        let state = AppState {
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
