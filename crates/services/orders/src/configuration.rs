//! `[orders]` settings.

use chassis::ServiceConfig;
use chassis::config_section;
use chassis::secrecy::SecretString;

config_section! {
    /// `[orders]`
    pub struct Settings {
        /// Listening port; 0 picks a free one.
        pub port: u16 = 0,
        /// `sqlite://...` or `postgres://...`; unset means `<data_dir>/orders.db`.
        pub database_url: Option<SecretString> = None,
        /// Most lines in one order: a shop basket, not a bulk import; also bounds the
        /// size of the batch price lookup.
        pub max_lines: usize = 100,
        /// Most units of one product per line.
        pub max_quantity: i64 = 1_000,
    }
}

pub struct Config {
    pub service: ServiceConfig,
    pub database_url: SecretString,
    pub settings: Settings,
}
