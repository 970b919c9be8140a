//! Building the service: its database, routes, outbox relay and the consumers the
//! saga mode calls for.

use anyhow::Context;
use chassis::Chassis;
use chassis::http::{Readiness, Service};
use chassis::secrecy::ExposeSecret;
use chassis::settings::SagaMode;
use messaging::inbox::Inbox;
use messaging::outbox::Outbox;
use utoipa::OpenApi;

use crate::handler::{COMMANDS_TOPIC, Consumer, INVENTORY_TOPIC, ORDERS_TOPIC, Payments, Topic};
use crate::provider::Provider;
use crate::routes::{self, ApiDoc};
use crate::{Config, MIGRATOR, NAME};

/// Builds the service; the chassis's [`Service`] runs it.
pub struct Application;

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Service> {
        // Outage windows count from the provider's first start on this database.
        let provider = Provider::new(&config.settings).context("payments settings")?;
        let db = chassis::db::Database::connect(config.database_url.expose_secret(), &MIGRATOR)
            .await
            .context("payments database")?;
        Outbox::install(db.pool())
            .await
            .context("payments outbox tables")?;
        Inbox::install(db.pool())
            .await
            .context("payments inbox table")?;
        let provider = provider.since(
            first_start(db.pool())
                .await
                .context("payments provider clock")?,
        );
        let chassis = Chassis::bind(config.service)
            .await
            .context("binding the listener")?;
        let pool = db.pool().clone();
        let outbox = Outbox::new();
        let payments =
            Payments::new(pool.clone(), outbox.clone(), provider).with_metrics(&chassis.metrics);
        let router = chassis.router(
            routes::router(pool.clone()),
            Readiness {
                database: Some(db.clone()),
                dependencies: Vec::new(),
            },
            Some(ApiDoc::openapi()),
        );
        let service =
            Service::new(chassis, router, Some(db)).with_outbox_relay(pool.clone(), outbox);
        let consumer = |topic| Consumer {
            payments: payments.clone(),
            topic,
        };
        Ok(match config.saga_mode {
            SagaMode::Orchestration => service.with_transactional_consumer(
                COMMANDS_TOPIC,
                NAME,
                pool,
                consumer(Topic::Commands),
            ),
            SagaMode::Choreography => service
                .with_transactional_consumer(
                    INVENTORY_TOPIC,
                    NAME,
                    pool.clone(),
                    consumer(Topic::Inventory),
                )
                .with_transactional_consumer(ORDERS_TOPIC, NAME, pool, consumer(Topic::Orders)),
        })
    }
}

/// The provider's first start on this database, in Unix milliseconds (now, the first
/// time).
async fn first_start(pool: &sqlx::AnyPool) -> Result<i64, sqlx::Error> {
    sqlx::query(
        "INSERT INTO provider_clock (id, started_ms) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
    )
    .bind(chassis::clock::now_millis())
    .execute(pool)
    .await?;
    sqlx::query_scalar("SELECT started_ms FROM provider_clock WHERE id = 1")
        .fetch_one(pool)
        .await
}
