//! Building and running the gateway.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use chassis::http::{Readiness, Service};
use chassis::identity::IdentityIssuer;
use chassis::jwt::{JwksCache, JwtVerifier, SigningKey};
use chassis::secrecy::ExposeSecret;
use chassis::{Chassis, ServiceConfig};

use crate::configuration::{Settings, validate_routes};
use crate::proxy::{self, Proxy};
use crate::routes::RouteTable;

pub struct Config {
    pub service: ServiceConfig,
    pub settings: Settings,
    /// Where the identity key lives unless `identity_key_file` says otherwise.
    pub data_dir: PathBuf,
}

/// Builds the service; the chassis's [`Service`] runs it.
pub struct Application;

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Service> {
        let settings = config.settings;
        let errors = validate_routes(&settings.routes);
        if !errors.is_empty() {
            anyhow::bail!("invalid gateway routes:\n  - {}", errors.join("\n  - "));
        }
        let key_file = settings
            .identity_key_file
            .clone()
            .unwrap_or_else(|| config.data_dir.join("gateway").join("identity-key.pem"));
        let key = load_or_create_key(&key_file)?;
        let identity = config.service.identity.clone();
        let chassis = Chassis::bind(config.service)
            .await
            .context("binding the listener")?;
        let auth = &settings.auth;
        let verifier = JwtVerifier::with_jwks(
            JwksCache::new(chassis.client.clone(), &auth.jwks_service, &auth.jwks_path),
            &auth.issuer,
            &auth.audience,
            auth.leeway.0,
        );
        let routes = RouteTable::new(&settings.routes);
        let dependencies = routes.services();
        let proxy = Arc::new(Proxy {
            routes,
            client: chassis.client.clone(),
            verifier,
            issuer: IdentityIssuer::new(
                key,
                &identity.issuer,
                &identity.audience,
                identity.token_ttl.0,
            ),
            upstream_timeout: settings.upstream_timeout.0,
        });
        let own = Router::new()
            .route(&identity.jwks_path, get(identity_jwks))
            .route("/openapi.json", get(crate::openapi::merged))
            .fallback(proxy::handle)
            .with_state(proxy);
        let router = chassis.router(
            own,
            Readiness {
                database: None,
                dependencies,
            },
            None,
        );
        Ok(Service::new(chassis, router, None))
    }
}

/// The public half of the identity key, for services to verify forwarded identities.
async fn identity_jwks(State(proxy): State<Arc<Proxy>>) -> axum::response::Response {
    axum::Json(chassis::jwt::jwks([proxy.issuer.key()])).into_response()
}

/// Reads the identity key, creating it (mode 0600) on first start.
fn load_or_create_key(path: &Path) -> anyhow::Result<SigningKey> {
    if path.exists() {
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("reading the identity key {}", path.display()))?;
        return SigningKey::from_pkcs8_pem(&pem)
            .with_context(|| format!("{} is not a PKCS#8 P-256 key", path.display()));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let key = SigningKey::generate()?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(path) {
        Ok(mut file) => {
            file.write_all(key.to_pkcs8_pem()?.expose_secret().as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            tracing::info!(path = %path.display(), kid = key.kid(), "created the identity key");
            Ok(key)
        }
        // Another instance created it first: use theirs, so all instances agree.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_or_create_key(path),
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}
