//! `[products]` settings.

use chassis::ServiceConfig;
use chassis::config_section;
use chassis::secrecy::SecretString;

config_section! {
    /// `[products]`
    pub struct Settings {
        /// Listening port; 0 picks a free one.
        pub port: u16 = 0,
        /// `sqlite://...` or `postgres://...`; unset means `<data_dir>/products.db`.
        pub database_url: Option<SecretString> = None,
        /// Seed the demo catalog when the database is new.
        pub seed: bool = true,
    }
}

/// Everything [`crate::Application::build`] needs.
pub struct Config {
    pub service: ServiceConfig,
    pub database_url: SecretString,
    pub settings: Settings,
}
