//! `[users]` settings.

use chassis::ServiceConfig;
use chassis::config::HumanDuration;
use chassis::config_section;
use chassis::secrecy::SecretString;

config_section! {
    /// `[users]`
    pub struct Settings {
        /// Listening port; 0 picks a free one.
        pub port: u16 = 0,
        /// `sqlite://...` or `postgres://...`; unset means `<data_dir>/users.db`.
        pub database_url: Option<SecretString> = None,
        /// Access token lifetime: 15 minutes bounds the use of a stolen token while
        /// sparing users frequent logins (refresh tokens are not offered yet).
        pub token_ttl: HumanDuration = HumanDuration::secs(15 * 60),
        /// `iss` of access tokens; the gateway checks it.
        pub issuer: String = "bazaar-users".to_owned(),
        /// `aud` of access tokens; the gateway checks it.
        pub audience: String = "bazaar".to_owned(),
    }
}

pub struct Config {
    pub service: ServiceConfig,
    pub database_url: SecretString,
    pub settings: Settings,
}
