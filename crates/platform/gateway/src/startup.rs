//! Building and running the gateway.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use chassis::client::HttpClient;
use chassis::http::{Readiness, Service};
use chassis::identity::IdentityIssuer;
use chassis::jwt::{JwksCache, JwtVerifier, KeySet, SigningKey, configured_key};
use chassis::secrecy::ExposeSecret;
use chassis::{Chassis, ServiceConfig};
use serde_json::json;

use crate::auth::{Authenticator, ClaimNames};
use crate::cache::Cache;
use crate::configuration::{AuthSettings, Settings};
use crate::forwarded::TrustedProxies;
use crate::proxy::Proxy;
use crate::ratelimit::RedisLimiter;
use crate::redis_store::SharedRedis;
use crate::runtime::{Config as RoutingConfig, Source};
use crate::server::Limits;
use crate::upstream::Upstreams;

pub struct Config {
    pub service: ServiceConfig,
    pub settings: Settings,
    /// Where the identity key lives unless `identity_key_file` says otherwise.
    pub data_dir: PathBuf,
    /// The admin API's listener, already bound; `None` binds
    /// `admin_address:admin_port`.
    pub admin_listener: Option<std::net::TcpListener>,
}

/// Builds the service; the chassis's [`Service`] runs it.
pub struct Application;

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Service> {
        let settings = config.settings;
        let source = match &settings.config_file {
            Some(path) => Source::File(path.clone()),
            None => Source::Settings(Box::new(settings.declarative())),
        };
        let routing = Arc::new(RoutingConfig::load(source.clone()).map_err(|errors| {
            anyhow::anyhow!(
                "invalid gateway configuration ({}):\n  - {}",
                source.describe(),
                errors.join("\n  - ")
            )
        })?);
        let trusted = TrustedProxies::parse(&settings.trusted_proxies)
            .map_err(|errors| anyhow::anyhow!("{}", errors.join("\n  - ")))?;
        let claims = ClaimNames::new(
            &settings.auth.subject_claim,
            &settings.auth.email_claim,
            &settings.auth.forward_claims,
        )
        .map_err(|errors| {
            anyhow::anyhow!("invalid claims to forward:\n  - {}", errors.join("\n  - "))
        })?;
        if settings.h2_idle_timeout.0.is_zero() {
            anyhow::bail!(
                "gateway.h2_idle_timeout must be longer than 0s (it closes HTTP/2 connections without a stream open that long); try \"60s\""
            );
        }
        let key_file = settings
            .identity_key_file
            .clone()
            .unwrap_or_else(|| config.data_dir.join("gateway").join("identity-key.pem"));
        let key = load_or_create_key(&key_file)?;
        let identity = config.service.identity.clone();
        let admin_addr = format!("{}:{}", settings.admin_address, settings.admin_port);
        let admin_listener = match config.admin_listener {
            Some(std) => {
                std.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(std)?
            }
            None => tokio::net::TcpListener::bind(&admin_addr)
                .await
                .with_context(|| {
                    format!("binding the admin API on {admin_addr} (set gateway.admin_port; 0 picks a free port)")
                })?,
        };
        let admin_url = format!("http://{}", admin_listener.local_addr()?);
        let chassis = Chassis::bind(config.service)
            .await
            .context("binding the listener")?;
        routing.register_metrics(&chassis.metrics);
        let verifier = verifier(&settings.auth, &chassis.client)?;
        let upstreams = Upstreams::new(
            chassis.client.resolver().clone(),
            chassis.http.client_connect_timeout.0,
        );
        upstreams.register_metrics(&chassis.metrics);
        // Redis for shared rate limits and caches: connected on first use, so the
        // gateway starts while Redis is down (the fallbacks decide meanwhile).
        let shared_redis = match &settings.redis_url {
            Some(url) => Some(Arc::new(
                SharedRedis::new(url.expose_secret(), &settings.redis_prefix)
                    .context("gateway.redis_url is not a Redis URL (redis://host:port/db)")?,
            )),
            None => None,
        };
        if let Some(redis) = &shared_redis
            && let Err(e) = redis.connect(std::time::Duration::from_secs(1)).await
        {
            tracing::warn!(error = %e, "Redis is unreachable at start; rate limits and caches stored there fall back until it returns");
        }
        let redis = shared_redis.clone().map(RedisLimiter::new);
        let cache = Cache::new(settings.cache_max_bytes, shared_redis);
        cache.register_metrics(&chassis.metrics);
        let redis_errors = prometheus_client::metrics::counter::Counter::default();
        chassis.metrics.register(
            "bazaar_gateway_ratelimit_store_errors",
            "Rate-limit checks that could not reach Redis (the fallback decided)",
            redis_errors.clone(),
        );
        let auth = Authenticator::new(verifier, claims, settings.auth.leeway.0);
        // Readiness follows the services routed at start; reloads may add others,
        // which the proxy reaches through discovery all the same.
        let dependencies = routing.current().table.services();
        let proxy = Arc::new(Proxy {
            config: routing.clone(),
            upstreams,
            client: chassis.client.clone(),
            auth,
            trusted,
            issuer: IdentityIssuer::new(
                key,
                &identity.issuer,
                &identity.audience,
                identity.token_ttl.0,
            ),
            upstream_timeout: settings.upstream_timeout.0,
            max_body: chassis.http.body_limit.0,
            redis,
            redis_fallback: settings.redis_fallback,
            redis_errors,
            cache,
        });
        // TLS certificates, and the listeners beyond the main one.
        let mut certificates = Vec::new();
        let mut tls_errors = Vec::new();
        let mut acceptor = |at: &str, tls: &Option<crate::tls::TlsConfig>| match tls {
            None => None,
            Some(config) => {
                match crate::tls::Certificate::load(config).and_then(|c| Ok((c.acceptor()?, c))) {
                    Ok((acceptor, certificate)) => {
                        certificates.push(certificate);
                        Some(acceptor)
                    }
                    Err(e) => {
                        tls_errors.push(format!("{at}.tls: {e}"));
                        None
                    }
                }
            }
        };
        let main_tls = acceptor("gateway", &settings.tls);
        let mut more = Vec::new();
        let mut listening = vec![json!({
            "address": chassis.local_addr().to_string(),
            "tls": settings.tls.is_some(),
        })];
        for (i, l) in settings.listeners.iter().enumerate() {
            let at = format!("gateway.listeners[{i}]");
            let tls = acceptor(&at, &l.tls);
            let address = format!("{}:{}", l.address, l.port);
            let socket = std::net::TcpListener::bind(&address).with_context(|| {
                format!(
                    "{at}: cannot listen on {address} (in use, or not an address of this machine)"
                )
            })?;
            let bound = socket.local_addr()?;
            tracing::info!(address = %bound, tls = l.tls.is_some(), "gateway listening");
            listening.push(json!({ "address": bound.to_string(), "tls": l.tls.is_some() }));
            more.push(crate::server::Listener { socket, tls });
        }
        if !tls_errors.is_empty() {
            anyhow::bail!("invalid TLS settings:\n  - {}", tls_errors.join("\n  - "));
        }
        let admin = crate::admin::router(crate::admin::Admin {
            config: routing.clone(),
            proxy: proxy.clone(),
            listeners: Arc::new(listening),
            metrics: chassis.metrics.clone(),
        });
        let own = Router::new()
            .route(&identity.jwks_path, get(identity_jwks))
            .route("/openapi.json", get(crate::openapi::merged))
            .with_state(proxy.clone());
        let router = chassis.router(
            own,
            Readiness {
                database: None,
                dependencies,
            },
            None,
        );
        tracing::info!(admin = %admin_url, source = %routing.source().describe(), "gateway admin API listening");
        let watcher = routing.clone();
        let limits = Limits {
            workers: settings.workers,
            max_header_bytes: settings.max_header_bytes,
            max_headers: settings.max_headers,
            max_uri_bytes: settings.max_uri_bytes,
            header_timeout: settings.header_timeout.0,
            h2_max_concurrent_streams: settings.h2_max_concurrent_streams,
            h2_max_pending_resets: settings.h2_max_pending_resets,
            h2_idle_timeout: settings.h2_idle_timeout.0,
        };
        // The chassis router serves these on the public port; the rest is proxied.
        let own_paths = [
            "/healthz",
            "/readyz",
            "/metrics",
            "/openapi.json",
            identity.jwks_path.as_str(),
        ]
        .map(str::to_owned)
        .to_vec();
        let server = crate::server::server(
            proxy,
            chassis.metrics.clone(),
            &chassis.http,
            limits,
            own_paths,
            main_tls,
            more,
        );
        let mut service = Service::new(chassis, router, None).with_server(server);
        for certificate in certificates {
            service = service.with_background(move |stop| certificate.watch(stop));
        }
        Ok(service
            .with_background(move |stop| watcher.watch(stop))
            .with_background(move |stop| async move {
                let served = axum::serve(admin_listener, admin)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "the admin API stopped");
                }
            }))
    }
}

/// The access-token verifier: configured keys (each pinned to its algorithm), then
/// the issuer's JWKS (a URL, or a service through discovery) for other `kid`s.
fn verifier(auth: &AuthSettings, client: &HttpClient) -> anyhow::Result<JwtVerifier> {
    let mut keys = KeySet::default();
    let mut errors = Vec::new();
    for (i, k) in auth.keys.iter().enumerate() {
        let pem = match &k.public_key_file {
            Some(path) => match std::fs::read(path) {
                Ok(pem) => Some(pem),
                Err(e) => {
                    errors.push(format!(
                        "gateway.auth.keys[{i}]: cannot read {}: {e}",
                        path.display()
                    ));
                    continue;
                }
            },
            None => None,
        };
        let secret = k.secret.as_ref().map(|s| s.expose_secret().to_owned());
        match configured_key(&k.alg, secret.as_deref(), pem.as_deref()) {
            Ok(key) => keys.insert(k.kid.as_deref(), key),
            Err(e) => errors.push(format!("gateway.auth.keys[{i}]: {e}")),
        }
    }
    if !errors.is_empty() {
        anyhow::bail!("invalid gateway token keys:\n  - {}", errors.join("\n  - "));
    }
    let remote = match (&auth.jwks_url, auth.jwks_service.trim()) {
        (Some(url), _) => Some(JwksCache::from_url(url)),
        (None, "") => None,
        (None, service) => Some(JwksCache::new(client.clone(), service, &auth.jwks_path)),
    };
    Ok(JwtVerifier::new(
        keys,
        remote,
        &auth.issuer,
        &auth.audience,
        auth.leeway.0,
    ))
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
