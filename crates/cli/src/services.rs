//! The shop's topology: which services exist, in which order they start, and how
//! each is built from the shop's configuration. This is the one place that knows the
//! whole system (eShop's AppHost).

use std::path::Path;

use anyhow::Context;
use chassis::db::Database;
use chassis::secrecy::SecretString;
use chassis::{CancellationToken, Listen, ServiceConfig};

use crate::config::ShopConfig;

/// A service of the shop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum ServiceName {
    ControlPlane,
    Users,
    Products,
    Orders,
    Inventory,
    Payments,
    Notifications,
    Recommendations,
    Gateway,
}

impl ServiceName {
    /// Start order: the gateway last, so that it only accepts traffic once the
    /// services behind it are starting; stop order is the reverse.
    pub const ALL: [ServiceName; 9] = [
        ServiceName::ControlPlane,
        ServiceName::Users,
        ServiceName::Products,
        ServiceName::Orders,
        ServiceName::Inventory,
        ServiceName::Payments,
        ServiceName::Notifications,
        ServiceName::Recommendations,
        ServiceName::Gateway,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ServiceName::ControlPlane => control_plane::NAME,
            ServiceName::Users => users::NAME,
            ServiceName::Products => products::NAME,
            ServiceName::Orders => orders::NAME,
            ServiceName::Inventory => inventory::NAME,
            ServiceName::Payments => payments::NAME,
            ServiceName::Notifications => notifications::NAME,
            ServiceName::Recommendations => recommendations::NAME,
            ServiceName::Gateway => gateway::NAME,
        }
    }

    /// The configured port.
    pub fn port(self, config: &ShopConfig) -> u16 {
        match self {
            ServiceName::ControlPlane => config.control_plane.port,
            ServiceName::Users => config.users.port,
            ServiceName::Products => config.products.port,
            ServiceName::Orders => config.orders.port,
            ServiceName::Inventory => config.inventory.port,
            ServiceName::Payments => config.payments.port,
            ServiceName::Notifications => config.notifications.port,
            ServiceName::Recommendations => config.recommendations.port,
            ServiceName::Gateway => config.gateway.port,
        }
    }
}

fn database_url(configured: &Option<SecretString>, data_dir: &Path, service: &str) -> SecretString {
    configured
        .clone()
        .unwrap_or_else(|| SecretString::from(Database::default_url(data_dir, service)))
}

/// Builds `service` and runs it until `shutdown`.
pub async fn run(
    service: ServiceName,
    config: &ShopConfig,
    listen: Listen,
    discovery: chassis::settings::Discovery,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let chassis = ServiceConfig {
        name: service.name(),
        version: env!("CARGO_PKG_VERSION"),
        listen,
        http: config.http.clone(),
        identity: config.identity.clone(),
        resilience: config.resilience(),
        resolver: discovery.resolver,
        registrar: discovery.registrar,
        events: if service == ServiceName::ControlPlane {
            None
        } else {
            config
                .events
                .connect()
                .await
                .context("connecting to the events broker")?
        },
    };
    let data_dir = config.data_dir.as_path();
    let built = match service {
        ServiceName::ControlPlane => {
            control_plane::Application::build(control_plane::Config {
                service: chassis,
                settings: config.control_plane.clone(),
                log_dir: data_dir.join("log"),
            })
            .await?
        }
        ServiceName::Users => {
            users::Application::build(users::Config {
                service: chassis,
                database_url: database_url(&config.users.database_url, data_dir, users::NAME),
                settings: config.users.clone(),
            })
            .await?
        }
        ServiceName::Products => {
            products::Application::build(products::Config {
                service: chassis,
                database_url: database_url(&config.products.database_url, data_dir, products::NAME),
                settings: config.products.clone(),
            })
            .await?
        }
        ServiceName::Orders => {
            orders::Application::build(orders::Config {
                service: chassis,
                database_url: database_url(&config.orders.database_url, data_dir, orders::NAME),
                settings: config.orders.clone(),
                saga_mode: config.saga.mode,
            })
            .await?
        }
        ServiceName::Inventory => {
            inventory::Application::build(inventory::Config {
                service: chassis,
                database_url: database_url(
                    &config.inventory.database_url,
                    data_dir,
                    inventory::NAME,
                ),
                settings: config.inventory.clone(),
                saga_mode: config.saga.mode,
            })
            .await?
        }
        ServiceName::Payments => {
            payments::Application::build(payments::Config {
                service: chassis,
                database_url: database_url(&config.payments.database_url, data_dir, payments::NAME),
                settings: config.payments.clone(),
                saga_mode: config.saga.mode,
            })
            .await?
        }
        ServiceName::Notifications => {
            notifications::Application::build(notifications::Config {
                service: chassis,
                database_url: database_url(
                    &config.notifications.database_url,
                    data_dir,
                    notifications::NAME,
                ),
                settings: config.notifications.clone(),
            })
            .await?
        }
        ServiceName::Recommendations => {
            recommendations::Application::build(recommendations::Config {
                service: chassis,
                database_url: database_url(
                    &config.recommendations.database_url,
                    data_dir,
                    recommendations::NAME,
                ),
                settings: config.recommendations.clone(),
            })
            .await?
        }
        ServiceName::Gateway => {
            gateway::Application::build(gateway::Config {
                service: chassis,
                settings: config.gateway.clone(),
                data_dir: config.data_dir.clone(),
                admin_listener: None,
            })
            .await?
        }
    };
    built
        .run_until_stopped(shutdown)
        .await
        .context("serving HTTP")
}
