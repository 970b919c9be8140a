//! The shop's configuration: every section of every process in one file, layered
//! defaults -> TOML file -> `BAZAAR_<SECTION>__<KEY>` environment variables. Processes
//! started by `bazaar up` inherit the environment and the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chassis::config::{Errors, Source};
use chassis::config_section;
use chassis::settings::{
    BreakerSettings, BulkheadSettings, DiscoverySettings, DownstreamSettings, EventsSettings,
    HttpSettings, IdentitySettings, LogSettings, RetrySettings, SagaSettings,
};
use serde::Deserialize;

config_section! {
    /// The whole shop.
    pub struct ShopConfig {
        /// Databases, keys, logs and run state live here.
        pub data_dir: PathBuf = PathBuf::from(".bazaar"),
        pub http: HttpSettings,
        pub log: LogSettings,
        pub identity: IdentitySettings,
        pub discovery: DiscoverySettings,
        pub events: EventsSettings,
        pub saga: SagaSettings,
        pub breaker: BreakerSettings,
        pub retry: RetrySettings,
        pub bulkhead: BulkheadSettings,
        /// Per downstream service overrides: `[downstream.products]`.
        pub downstream: BTreeMap<String, DownstreamSettings> = BTreeMap::new(),
        pub control_plane: control_plane::Settings,
        pub users: users::Settings,
        pub products: products::Settings,
        pub orders: orders::Settings,
        pub inventory: inventory::Settings,
        pub payments: payments::Settings,
        pub notifications: notifications::Settings,
        pub recommendations: recommendations::Settings,
        pub gateway: gateway::Settings,
    }
}

#[derive(Default, Deserialize)]
struct ShopRoutes {
    routes: Vec<gateway::RouteConfig>,
    caches: std::collections::BTreeMap<String, gateway::configuration::CachePolicy>,
}

/// Loads the configuration, collecting every error.
pub fn load(file: Option<&Path>) -> Result<ShopConfig, Errors> {
    let source = Source::from_process(file)?;
    let mut config: ShopConfig = source.parse()?;
    let mut invalid = Vec::new();
    if config.gateway.routes.is_empty() {
        // The embedded table, parsed once for its routes and their caches.
        let shop = shop_table().unwrap_or_default();
        config.gateway.routes = shop.routes;
        for (name, policy) in shop.caches {
            config.gateway.caches.entry(name).or_insert(policy);
        }
        if let Err(e) = crate::operator::attach(&mut config) {
            invalid.push(chassis::config::ConfigError {
                key: "data_dir".into(),
                origin: "configuration".into(),
                problem: format!("{e:#}"),
                fix: format!(
                    "make {} readable, or delete it for `bazaar up` to make a new one",
                    crate::operator::key_path(&config.data_dir).display()
                ),
            });
        }
    }
    invalid.extend(config.resilience().validate());
    invalid.extend(config.payments.validate());
    invalid.extend(config.discovery.build().err());
    // The gateway's declarative part: inline, or the file it will watch.
    let (key, gateway_errors) = match &config.gateway.config_file {
        Some(path) => (
            "gateway.config_file",
            std::fs::read_to_string(path)
                .map_err(|e| vec![format!("cannot read {}: {e}", path.display())])
                .and_then(|text| gateway::configuration::Declarative::from_toml(&text))
                .err()
                .unwrap_or_default(),
        ),
        None => ("gateway.routes", config.gateway.declarative().validate()),
    };
    invalid.extend(
        gateway_errors
            .into_iter()
            .map(|problem| chassis::config::ConfigError {
                key: key.into(),
                origin: "configuration".into(),
                problem,
                fix: "see docs/gateway.md for the route and policy fields".into(),
            }),
    );
    if !invalid.is_empty() {
        return Err(Errors(invalid));
    }
    Ok(config)
}

impl ShopConfig {
    /// The chassis client's resilience settings.
    pub fn resilience(&self) -> chassis::settings::ResilienceSettings {
        chassis::settings::ResilienceSettings {
            breaker: self.breaker.clone(),
            retry: self.retry.clone(),
            bulkhead: self.bulkhead.clone(),
            downstream: self.downstream.clone(),
        }
    }
}

fn shop_table() -> Option<ShopRoutes> {
    toml::from_str::<ShopRoutes>(include_str!("shop-routes.toml")).ok()
}

/// The shop's default route table.
pub fn shop_routes() -> Vec<gateway::RouteConfig> {
    shop_table().map(|r| r.routes).unwrap_or_default()
}

/// The cache policies the shop's routes name (`load` takes them with the routes,
/// from one parse of the table).
#[cfg(test)]
pub fn shop_caches() -> std::collections::BTreeMap<String, gateway::configuration::CachePolicy> {
    shop_table().map(|r| r.caches).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_example_configuration_is_complete_and_valid() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/bazaar.toml");
        let source = chassis::config::Source::load(Some(&path), Vec::new()).unwrap();
        let config: super::ShopConfig = source.parse().unwrap();
        assert_eq!(config.gateway.routes, super::shop_routes());
        assert_eq!(config.gateway.caches, super::shop_caches());
        assert_eq!(config.products.cache_max_age.0.as_secs(), 10);
        assert!(config.resilience().validate().is_empty());
        assert!(config.downstream.contains_key("products"));
    }

    #[test]
    fn the_embedded_routes_parse_and_validate() {
        let routes = super::shop_routes();
        assert_eq!(routes.len(), 8);
        let caches = super::shop_caches();
        assert!(caches.contains_key("catalog"), "{caches:?}");
        assert!(routes.iter().any(|r| r.cache.is_some()));
        // Validation also finds each policy a route names.
        let errors = gateway::configuration::Declarative {
            routes,
            caches,
            ..Default::default()
        }
        .validate();
        assert!(errors.is_empty(), "{errors:?}");
    }
}
