//! Building and running the service.

use anyhow::Context;
use chassis::Chassis;
use chassis::http::{Readiness, Service};
use chassis::secrecy::ExposeSecret;
use chassis::settings::SagaMode;
use std::time::Duration;
use utoipa::OpenApi;

use crate::Config;
use crate::routes::{self, ApiDoc, AppState};

/// The service's schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

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
        messaging::inbox::Inbox::install(db.pool())
            .await
            .context("orders inbox table")?;
        let settings = &config.settings;
        let orchestrator = match config.saga_mode {
            SagaMode::Orchestration => {
                saga::store::Orchestrator::install(db.pool())
                    .await
                    .context("saga tables")?;
                Some(crate::saga::orchestrator(
                    crate::saga::definition(
                        settings.saga_step_timeout.0,
                        settings.saga_step_attempts,
                    ),
                    outbox.clone(),
                ))
            }
            SagaMode::Choreography => None,
        };
        let place_order = crate::saga::Saga::new(db.pool().clone(), outbox.clone(), orchestrator);
        let catalog = crate::catalog::Catalog::default();
        let state = AppState {
            outbox: outbox.clone(),
            pool: db.pool().clone(),
            client: chassis.client.clone(),
            max_lines: settings.max_lines,
            max_quantity: settings.max_quantity,
            saga: place_order.clone(),
            catalog: catalog.clone(),
        };
        let router = chassis.router(
            routes::router(state),
            Readiness {
                database: Some(db.clone()),
                // Products prices only what the replica has not heard of yet: orders
                // keeps taking orders without it, so its absence is no reason to be
                // taken out of rotation.
                dependencies: Vec::new(),
            },
            Some(ApiDoc::openapi()),
        );
        let pool = db.pool().clone();
        let (inventory, payments, timer) = (place_order.clone(), place_order.clone(), place_order);
        let saga_timeout = settings.saga_timeout.0;
        Ok(Service::new(chassis, router, Some(db))
            .with_outbox_relay(pool.clone(), outbox)
            .with_transactional_consumer(
                crate::saga::INVENTORY,
                crate::NAME,
                pool.clone(),
                inventory,
            )
            .with_transactional_consumer(crate::saga::PAYMENTS, crate::NAME, pool.clone(), payments)
            .with_transactional_consumer(crate::catalog::TOPIC, crate::NAME, pool.clone(), catalog)
            .with_background(move |stop| async move {
                match timer.orchestrator.clone() {
                    // Retries unanswered steps; after a crash, resumes every saga.
                    Some(o) => o.run_timer(pool, Duration::from_millis(200), stop).await,
                    None => loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        }
                        let cutoff = chassis::clock::now_millis()
                            - i64::try_from(saga_timeout.as_millis()).unwrap_or(i64::MAX);
                        if let Err(e) = timer.cancel_stale(cutoff).await {
                            tracing::warn!(error = %e, "cancelling stale orders failed; retrying");
                        }
                    },
                }
            }))
    }
}
