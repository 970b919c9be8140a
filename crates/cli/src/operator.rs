//! The operator's way in through the gateway. `bazaar up` makes an API key per data
//! directory (`<data-dir>/operator.key`, readable by its owner only), and with the
//! shop's default routes the gateway opens `/operator/<service>/...` to that key
//! alone, forwarding the rest of the path to the service. `ps`, `verify` and `chaos`
//! use it when given `--gateway URL` instead of a data directory.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::config::ShopConfig;
use crate::services::ServiceName;

/// The API-key consumer the operator routes admit.
pub const CONSUMER: &str = "operator";
/// Where the key lives in the data directory.
pub const KEY_FILE: &str = "operator.key";
/// The environment variable `--operator-key` reads.
pub const KEY_ENV: &str = "BAZAAR_OPERATOR_KEY";

pub fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join(KEY_FILE)
}

/// The data directory's key, made on first use (two processes racing both end up
/// with the one that was written first).
pub fn ensure_key(data_dir: &Path) -> anyhow::Result<String> {
    let path = key_path(data_dir);
    if let Some(key) = read_key(data_dir)? {
        return Ok(key);
    }
    let key = format!("bzr_{}", hex::encode(rand::random::<[u8; 32]>()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(&path) {
        Ok(mut file) => {
            file.write_all(key.as_bytes())
                .and_then(|()| file.sync_all())
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_key(data_dir)?
            .with_context(|| format!("{} is empty; delete it to make a new key", path.display())),
        Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
    }
}

/// The data directory's key, if one was made.
pub fn read_key(data_dir: &Path) -> anyhow::Result<Option<String>> {
    let path = key_path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text.trim().to_owned()).filter(|k| !k.is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Opens the operator routes on `config`'s gateway when it runs the shop's default
/// routes: to the `operator` consumer of `gateway.api_keys` if the configuration
/// names one, else to the data directory's key if it has one. Without either, the
/// gateway has no operator routes. Attaching twice changes nothing.
pub fn attach(config: &mut ShopConfig) -> anyhow::Result<()> {
    let shop = crate::config::shop_routes();
    // A gateway reading its own route file has the routes it names, and no others.
    let default_routes = config.gateway.config_file.is_none()
        && config.gateway.routes.len() >= shop.len()
        && config.gateway.routes[..shop.len()] == shop[..];
    let attached = config
        .gateway
        .routes
        .iter()
        .any(|r| r.consumers.iter().any(|c| c == CONSUMER));
    if !default_routes || attached {
        return Ok(());
    }
    if !config.gateway.api_keys.contains_key(CONSUMER) {
        let Some(key) = read_key(&config.data_dir)? else {
            return Ok(());
        };
        config.gateway.api_keys.insert(
            CONSUMER.to_owned(),
            gateway::configuration::ApiKeyConfig::of_key(&key),
        );
    }
    config.gateway.routes.extend(routes());
    Ok(())
}

/// `/operator/<service>` for every service behind the gateway, to the operator only.
pub fn routes() -> Vec<gateway::RouteConfig> {
    ServiceName::ALL
        .iter()
        .filter(|s| **s != ServiceName::Gateway)
        .map(|s| gateway::RouteConfig {
            name: Some(format!("operator-{}", s.name())),
            rewrite: Some("/".to_owned()),
            consumers: vec![CONSUMER.to_owned()],
            ..gateway::RouteConfig::prefix(
                &format!("/operator/{}", s.name()),
                s.name(),
                gateway::AuthPolicy::Required,
            )
        })
        .collect()
}

/// The base URL of `service` through the gateway at `gateway`.
pub fn service_url(gateway: &str, service: &str) -> String {
    format!("{}/operator/{service}", gateway.trim_end_matches('/'))
}

/// The key for `--gateway`: `--operator-key` (or its environment variable), else the
/// data directory's file.
pub fn key_for(given: Option<String>, data_dir: &Path) -> anyhow::Result<String> {
    if let Some(key) = given.filter(|k| !k.trim().is_empty()) {
        return Ok(key.trim().to_owned());
    }
    read_key(data_dir)?.with_context(|| {
        format!(
            "--gateway needs the shop's operator key: pass --operator-key or set {KEY_ENV} \
             (`bazaar up` writes it to {})",
            key_path(data_dir).display()
        )
    })
}

/// An HTTP client that presents `key` on every request.
pub fn client(key: &str, timeout: std::time::Duration) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    let mut value = reqwest::header::HeaderValue::from_str(key)
        .context("the operator key has characters a header cannot carry")?;
    value.set_sensitive(true);
    headers.insert("x-api-key", value);
    Ok(reqwest::Client::builder()
        .default_headers(headers)
        .timeout(timeout)
        .build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("bazaar-operator-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_key_is_made_once_private_and_opens_valid_routes() {
        let dir = scratch();
        let key = ensure_key(dir.as_path()).unwrap();
        assert!(key.starts_with("bzr_") && key.len() == 68, "{key}");
        assert_eq!(ensure_key(dir.as_path()).unwrap(), key, "made once");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(key_path(dir.as_path()))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let mut config = crate::config::ShopConfig {
            data_dir: dir.clone(),
            ..Default::default()
        };
        config.gateway.routes = crate::config::shop_routes();
        config.gateway.caches = crate::config::shop_caches();
        let before = config.gateway.routes.len();
        attach(&mut config).unwrap();
        assert_eq!(config.gateway.routes.len(), before + 8);
        assert_eq!(
            config.gateway.api_keys[CONSUMER],
            gateway::configuration::ApiKeyConfig::of_key(&key)
        );
        assert!(config.gateway.declarative().validate().is_empty());
        attach(&mut config).unwrap();
        assert_eq!(config.gateway.routes.len(), before + 8, "attached once");
        // A gateway on routes of its own gets none.
        let mut own = crate::config::ShopConfig {
            data_dir: dir.clone(),
            ..Default::default()
        };
        own.gateway.routes = crate::config::shop_routes()[..2].to_vec();
        attach(&mut own).unwrap();
        assert_eq!(own.gateway.routes.len(), 2);
        assert!(own.gateway.api_keys.is_empty());
    }

    #[test]
    fn without_a_key_the_gateway_flag_says_how_to_get_one() {
        let dir = scratch();
        let e = key_for(None, dir.as_path()).unwrap_err().to_string();
        assert!(e.contains("--operator-key") && e.contains(KEY_ENV), "{e}");
        assert_eq!(key_for(Some(" k ".into()), dir.as_path()).unwrap(), "k");
    }
}
