//! The users service on a real port, on fresh SQLite and PostgreSQL databases.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use chassis::jwt::{JwtVerifier, KeySet};
use chassis::testing::{Engine, IdentityFixture, TestDb, service_config};
use serde_json::{Value, json};
use users::{Application, Config, Settings};

struct App {
    url: String,
    http: reqwest::Client,
    identity: IdentityFixture,
    stop: chassis::CancellationToken,
    done: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn spawn_on(db: &TestDb) -> App {
    let identity = IdentityFixture::start().await;
    let app = Application::build(Config {
        service: service_config(users::NAME, &identity, &[]),
        database_url: db.url.clone().into(),
        settings: Settings::default(),
    })
    .await
    .unwrap();
    let url = format!("http://127.0.0.1:{}", app.port());
    let stop = chassis::CancellationToken::new();
    let done = tokio::spawn(app.run_until_stopped(stop.clone()));
    App {
        url,
        http: reqwest::Client::new(),
        identity,
        stop,
        done,
    }
}

impl App {
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }
    async fn get_as(&self, path: &str, identity: Option<&str>) -> (u16, Value) {
        let mut req = self.http.get(format!("{}{path}", self.url));
        if let Some(token) = identity {
            req = req.header("x-bazaar-identity", token);
        }
        let r = req.send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }
    async fn stop(self) {
        self.stop.cancel();
        self.done.await.unwrap().unwrap();
    }
}

async fn accounts(engine: Engine) {
    let db = TestDb::new(engine);
    let app = spawn_on(&db).await;
    let (status, user) = app
        .post(
            "/users",
            json!({"email": "Ada@Example.com", "name": "Ada", "password": "correct horse"}),
        )
        .await;
    assert_eq!(status, 201, "{user}");
    assert_eq!(user["email"], "ada@example.com");
    let id = user["id"].as_str().unwrap().to_owned();
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 7);

    let (status, dup) = app
        .post(
            "/users",
            json!({"email": "ada@example.com", "name": "Other", "password": "another one"}),
        )
        .await;
    assert_eq!(status, 409, "{dup}");

    let (status, token) = app
        .post(
            "/auth/login",
            json!({"email": "ada@example.com", "password": "correct horse"}),
        )
        .await;
    assert_eq!(status, 200, "{token}");
    assert_eq!(token["token_type"], "Bearer");
    assert_eq!(token["expires_in"], 900);

    // The token verifies against the published JWKS, names the user, and is ES256.
    let (_, jwks) = app.get_as("/.well-known/jwks.json", None).await;
    let header = jsonwebtoken::decode_header(token["access_token"].as_str().unwrap()).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    assert!(header.kid.is_some());
    let verifier = JwtVerifier::with_keys(
        KeySet::from_jwks(&jwks).unwrap(),
        "bazaar-users",
        "bazaar",
        Duration::ZERO,
    );
    let claims: Value = verifier
        .verify(token["access_token"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(claims["sub"], id.as_str());

    // /users/me needs the gateway-signed identity.
    let (status, me) = app
        .get_as("/users/me", Some(&app.identity.token(&id)))
        .await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["name"], "Ada");
    let kid = header.kid.unwrap();

    // Keys persist: a restarted service publishes the same key.
    app.stop().await;
    let again = spawn_on(&db).await;
    let (_, jwks_again) = again.get_as("/.well-known/jwks.json", None).await;
    assert_eq!(jwks_again["keys"][0]["kid"], kid.as_str());
    let (status, _) = again
        .post(
            "/auth/login",
            json!({"email": "ada@example.com", "password": "correct horse"}),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn accounts_on_sqlite() {
    accounts(Engine::Sqlite).await;
}

#[tokio::test]
async fn accounts_on_postgres() {
    accounts(Engine::Postgres).await;
}

#[tokio::test]
async fn wrong_password_and_unknown_user_look_the_same() {
    let db = TestDb::new(Engine::Sqlite);
    let app = spawn_on(&db).await;
    app.post(
        "/users",
        json!({"email": "bo@example.com", "name": "Bo", "password": "password1"}),
    )
    .await;
    // Interleaved rounds, compared by median, so one scheduling hiccup on a busy
    // machine cannot decide the outcome.
    let mut wrong = Vec::new();
    let mut unknown = Vec::new();
    let mut bodies = Vec::new();
    for _ in 0..5 {
        for (email, password, timings) in [
            ("bo@example.com", "wrong-password", &mut wrong),
            ("nobody@example.com", "password1", &mut unknown),
        ] {
            let started = Instant::now();
            let (status, mut body) = app
                .post("/auth/login", json!({"email": email, "password": password}))
                .await;
            timings.push(started.elapsed().as_secs_f64());
            assert_eq!(status, 401);
            body.as_object_mut().unwrap().remove("correlation_id");
            bodies.push(body);
        }
    }
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "the two failures must be indistinguishable"
    );
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (a, b) = (median(&mut wrong), median(&mut unknown));
    // Both run one argon2 verification; skipping it would be ~100x faster.
    assert!(
        a.min(b) / a.max(b) > 0.5,
        "median timings differ: {a:.4}s vs {b:.4}s"
    );
}

#[tokio::test]
async fn bad_sign_ups_name_every_field_and_write_nothing() {
    let db = TestDb::new(Engine::Sqlite);
    let app = spawn_on(&db).await;
    let (status, body) = app
        .post(
            "/users",
            json!({"email": "nope", "name": " ", "password": "short"}),
        )
        .await;
    assert_eq!(status, 422);
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["email", "name", "password"]);
    let (status, body) = app.post("/users", json!({"email": "x@example.com"})).await;
    assert_eq!(status, 422);
    assert_eq!(body["errors"][0]["field"], "name");
    // Nothing was written: the address is still free.
    let (status, _) = app
        .post(
            "/users",
            json!({"email": "x@example.com", "name": "X", "password": "password1"}),
        )
        .await;
    assert_eq!(status, 201);
}

#[tokio::test]
async fn me_refuses_missing_forged_and_foreign_identities() {
    let db = TestDb::new(Engine::Sqlite);
    let app = spawn_on(&db).await;
    let (_, user) = app
        .post(
            "/users",
            json!({"email": "c@example.com", "name": "C", "password": "password1"}),
        )
        .await;
    let id = user["id"].as_str().unwrap();
    let (status, body) = app.get_as("/users/me", None).await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = app.get_as("/users/me", Some(id)).await;
    assert_eq!(status, 401, "a bare user id is not an identity");
    let other = IdentityFixture::start().await;
    let (status, _) = app.get_as("/users/me", Some(&other.token(id))).await;
    assert_eq!(status, 401, "an identity signed by another key");
    let r = app
        .http
        .get(format!("{}/users/me", app.url))
        .header("x-user-id", id)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
}
