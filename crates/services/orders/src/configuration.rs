//! `[orders]` settings.

use chassis::ServiceConfig;
use chassis::config::HumanDuration;
use chassis::config_section;
use chassis::secrecy::SecretString;
use chassis::settings::SagaMode;

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
        /// Orchestration: how long the orchestrator waits for a step's reply before
        /// sending it again.
        pub saga_step_timeout: HumanDuration = HumanDuration::secs(2),
        /// Orchestration: attempts of a step before the saga compensates (`timeout`).
        pub saga_step_attempts: u32 = 3,
        /// Choreography: an order still PENDING this long is cancelled (`timeout`).
        pub saga_timeout: HumanDuration = HumanDuration::secs(15),
    }
}

pub struct Config {
    pub service: ServiceConfig,
    pub database_url: SecretString,
    pub settings: Settings,
    pub saga_mode: SagaMode,
}
