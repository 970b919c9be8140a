//! `[products]` settings.

use chassis::ServiceConfig;
use chassis::config::HumanDuration;
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
        /// How long a catalog read may be reused (`Cache-Control: public,
        /// max-age`): the gateway's `catalog` cache and browsers serve it without
        /// asking again. `0s` sends `no-cache`.
        pub cache_max_age: HumanDuration = HumanDuration::secs(10),
    }
}

/// Everything [`crate::Application::build`] needs.
pub struct Config {
    pub service: ServiceConfig,
    pub database_url: SecretString,
    pub settings: Settings,
}
