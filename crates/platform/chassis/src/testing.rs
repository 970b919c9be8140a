//! Test helpers (feature `testing`): fresh databases on both engines, a service
//! config on port 0, and an identity issuer served like the gateway serves it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use discovery::StaticResolver;
use sqlx::migrate::MigrateDatabase;

use crate::identity::IdentityIssuer;
use crate::jwt::{SigningKey, jwks};
use crate::settings::{HttpSettings, IdentitySettings};
use crate::{Listen, ServiceConfig};

/// Base URL of the PostgreSQL used by tests; override with `POSTGRES_TEST_URL`.
pub fn postgres_base_url() -> String {
    std::env::var("POSTGRES_TEST_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// Which engine a test database runs on.
#[derive(Clone, Copy, Debug)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// A fresh, uniquely named database; dropped (PostgreSQL) or deleted (SQLite) on drop.
pub struct TestDb {
    pub url: String,
    engine: Engine,
    dir: Option<std::path::PathBuf>,
}

impl TestDb {
    pub fn new(engine: Engine) -> Self {
        let name = format!("bazaar_test_{}", uuid::Uuid::new_v4().simple());
        match engine {
            Engine::Sqlite => {
                let dir = std::env::temp_dir().join(&name);
                std::fs::create_dir_all(&dir).unwrap();
                Self {
                    url: format!("sqlite://{}/service.db", dir.display()),
                    engine,
                    dir: Some(dir),
                }
            }
            Engine::Postgres => Self {
                url: format!("{}/{name}", postgres_base_url()),
                engine,
                dir: None,
            },
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        match self.engine {
            Engine::Sqlite => {
                if let Some(dir) = &self.dir {
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
            Engine::Postgres => {
                let url = self.url.clone();
                // Drop on a separate runtime: Drop may run inside or outside one.
                let _ = std::thread::spawn(move || {
                    if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        rt.block_on(async {
                            let _ = sqlx::Any::force_drop_database(&url).await;
                        });
                    }
                })
                .join();
            }
        }
    }
}

/// A token issuer serving its JWKS over HTTP on port 0: the gateway's identity
/// issuer by default ([`IdentityFixture::start`]), or any issuer ([`IdentityFixture::issuer`]).
pub struct IdentityFixture {
    pub key: SigningKey,
    pub issuer: IdentityIssuer,
    pub url: String,
}

impl IdentityFixture {
    /// The gateway's identity issuer, as services expect it.
    pub async fn start() -> Self {
        let s = IdentitySettings::default();
        Self::issuer(&s.jwks_path, &s.issuer, &s.audience).await
    }

    /// An issuer of tokens with `iss` and `aud`, serving its JWKS at `path`.
    pub async fn issuer(path: &str, iss: &str, aud: &str) -> Self {
        let key = SigningKey::generate().unwrap();
        let doc = jwks([&key]);
        let issuer = IdentityIssuer::new(key.clone(), iss, aud, Duration::from_secs(60));
        let app = Router::new().route(
            path,
            get(move || {
                let doc = doc.clone();
                async move { axum::Json(doc) }
            }),
        );
        Self {
            key,
            issuer,
            url: serve(app).await,
        }
    }

    /// A valid token for `user`.
    pub fn token(&self, user: &str) -> String {
        self.issuer.mint(user, None).unwrap()
    }
}

/// Serves `app` on 127.0.0.1:0 in the background; returns its base URL.
pub async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

/// A service config on 127.0.0.1:0 resolving `services` (name, url) plus the gateway.
pub fn service_config(
    name: &'static str,
    identity: &IdentityFixture,
    services: &[(&str, &str)],
) -> ServiceConfig {
    let mut entries: Vec<(&str, &str)> = services.to_vec();
    entries.push(("gateway", identity.url.as_str()));
    let http = HttpSettings {
        client_timeout: crate::config::HumanDuration(Duration::from_secs(2)),
        ..HttpSettings::default()
    };
    ServiceConfig {
        name,
        version: "test",
        listen: Listen::Addr("127.0.0.1:0".parse().unwrap()),
        http,
        identity: IdentitySettings::default(),
        resilience: crate::settings::ResilienceSettings::default(),
        resolver: Arc::new(StaticResolver::parse(entries).unwrap()),
        registrar: None,
        events: None,
    }
}
