//! The harness the gateway's integration tests share: a recording upstream and a
//! gateway in front of it, on real ports.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::routing::{any, get};
use chassis::config::HumanDuration;
use chassis::settings::{HttpSettings, IdentitySettings};
use chassis::testing::IdentityFixture;
use chassis::{Listen, ServiceConfig};
use gateway::{AuthPolicy, RouteConfig, Settings};
use serde_json::json;

pub type Seen = Arc<Mutex<Vec<(String, http::HeaderMap)>>>;

/// An upstream that records what reached it.
pub async fn upstream(seen: Seen) -> String {
    let record = move |req: Request| {
        let seen = seen.clone();
        async move {
            seen.lock()
                .unwrap()
                .push((req.uri().to_string(), req.headers().clone()));
            axum::Json(json!({ "ok": true }))
        }
    };
    let app = Router::new()
        .route("/slow", get(|| async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            "late"
        }))
        // Longer than the proxy reads whole, with a length and without one.
        .route("/open/big", get(|| async { "b".repeat(200_000) }))
        .route("/open/stream", get(|| async {
            let parts = (0..5).map(|i| Ok::<_, std::io::Error>(format!("part {i};")));
            axum::body::Body::from_stream(futures::stream::iter(parts))
        }))
        .route("/openapi.json", get(|| async {
            axum::Json(json!({"paths": {"/open/x": {"get": {}}, "/private/y": {"get": {}}, "/elsewhere": {"get": {}}},
                "components": {"schemas": {"Thing": {"type": "object"}}}}))
        }))
        .fallback(any(record));
    chassis::testing::serve(app).await
}

pub struct Gw {
    /// Cancelling it shuts the gateway down.
    pub stop: chassis::CancellationToken,
    pub url: String,
    pub admin: String,
    pub users: IdentityFixture,
    pub identity_jwks: String,
    pub seen: Seen,
    pub http: reqwest::Client,
    pub _dir: std::path::PathBuf,
}

pub async fn spawn() -> Gw {
    spawn_with(|_| {}).await
}

/// The gateway with the standard routes, changed by `adjust`.
pub async fn spawn_with(adjust: impl FnOnce(&mut Settings)) -> Gw {
    spawn_full(adjust, Vec::new()).await
}

/// An instance that answers `status` with its `name` in `x-instance`.
pub async fn instance(name: &'static str, status: u16) -> String {
    let app = Router::new().fallback(any(move || async move {
        (
            http::StatusCode::from_u16(status).unwrap(),
            [("x-instance", name)],
            name,
        )
    }));
    chassis::testing::serve(app).await
}

/// [`spawn_with`], with more services known to discovery.
pub async fn spawn_full(adjust: impl FnOnce(&mut Settings), more: Vec<(String, String)>) -> Gw {
    let seen: Seen = Arc::default();
    let echo = upstream(seen.clone()).await;
    let users = IdentityFixture::issuer("/.well-known/jwks.json", "bazaar-users", "bazaar").await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let resolver = chassis::settings::DiscoverySettings {
        services: [
            ("echo".to_owned(), echo),
            ("users".to_owned(), users.url.clone()),
            ("dead".to_owned(), format!("http://{dead}")),
            ("gateway".to_owned(), url.clone()),
        ]
        .into_iter()
        .chain(more)
        .collect(),
        ..Default::default()
    }
    .resolver()
    .unwrap();
    let route = RouteConfig::prefix;
    let dir = std::env::temp_dir().join(format!("gw-{}", uuid::Uuid::new_v4()));
    let mut settings = Settings {
        upstream_timeout: HumanDuration::millis(300),
        routes: vec![
            route("/open", "echo", AuthPolicy::Anonymous),
            route("/private", "echo", AuthPolicy::Required),
            route("/maybe", "echo", AuthPolicy::Optional),
            route("/slow", "echo", AuthPolicy::Anonymous),
            route("/down", "dead", AuthPolicy::Anonymous),
        ],
        ..Settings::default()
    };
    adjust(&mut settings);
    let admin_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = format!("http://{}", admin_listener.local_addr().unwrap());
    let app = gateway::Application::build(gateway::Config {
        service: ServiceConfig {
            name: gateway::NAME,
            version: "test",
            listen: Listen::Inherited(listener),
            http: HttpSettings::default(),
            identity: IdentitySettings::default(),
            resilience: chassis::settings::ResilienceSettings::default(),
            resolver: Arc::new(resolver),
            registrar: None,
            events: None,
        },
        settings,
        data_dir: dir.clone(),
        admin_listener: Some(admin_listener),
    })
    .await
    .unwrap();
    let stop = chassis::CancellationToken::new();
    tokio::spawn(app.run_until_stopped(stop.clone()));
    Gw {
        stop,
        admin,
        identity_jwks: format!("{url}{}", IdentitySettings::default().jwks_path),
        url,
        users,
        seen,
        http: reqwest::Client::new(),
        _dir: dir,
    }
}

/// A GET sent byte for byte: HTTP clients normalize paths before sending.
pub async fn raw_get(base: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

impl Gw {
    pub fn seen_count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
    pub fn last_seen(&self) -> (String, http::HeaderMap) {
        self.seen.lock().unwrap().last().cloned().unwrap()
    }
    /// A verifier of the identities the gateway forwards, from its JWKS.
    pub async fn identity_verifier(&self) -> chassis::jwt::JwtVerifier {
        let jwks: serde_json::Value = self
            .http
            .get(&self.identity_jwks)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        chassis::jwt::JwtVerifier::with_keys(
            chassis::jwt::KeySet::from_jwks(&jwks).unwrap(),
            "bazaar-gateway",
            "bazaar-services",
            Duration::ZERO,
        )
    }

    /// The admin API's JSON answer to GET `path`.
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        self.http
            .get(format!("{}{path}", self.admin))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// GET `path` on the public port.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap()
    }

    /// The statuses of `n` GETs of `path`, one after the other.
    pub async fn statuses(&self, path: &str, n: usize) -> Vec<u16> {
        let mut statuses = Vec::new();
        for _ in 0..n {
            statuses.push(self.get(path).await.status().as_u16());
        }
        statuses
    }
}

/// Points the gateway at the machine's Redis under a prefix of its own, so tests
/// sharing that Redis never see each other's keys.
pub fn with_redis(s: &mut Settings, prefix: &str) {
    s.redis_url = Some("redis://127.0.0.1:6379".to_owned().into());
    s.redis_prefix = prefix.to_owned();
}

/// A Redis key prefix no other test uses.
pub fn test_prefix() -> String {
    format!("bazaar-test-{}", uuid::Uuid::new_v4().simple())
}
