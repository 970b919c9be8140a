//! HTTP routes: sign-up, login, JWKS, and the caller's own account.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chassis::extract::Json;
use chassis::identity::Identity;
use chassis::jwt::{SigningKey, now_secs};
use chassis::{FieldError, Problem};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::AnyPool;
use utoipa::OpenApi;
use uuid::Uuid;

use crate::domain::{Email, Password, UserName};
use crate::password::Passwords;
use crate::repository::{self, InsertError, UserRecord};

#[derive(Clone)]
pub struct AppState {
    pub pool: AnyPool,
    pub outbox: messaging::outbox::Outbox,
    pub passwords: Passwords,
    /// The key that signs new tokens (the oldest unretired one).
    pub signer: Arc<SigningKey>,
    /// The published JWKS: every unretired key.
    pub jwks: Arc<Value>,
    pub token_ttl: Duration,
    pub issuer: Arc<str>,
    pub audience: Arc<str>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Bazaar users", description = "Accounts and access tokens."),
    paths(sign_up, login, jwks, me),
    components(schemas(SignUp, Login, TokenResponse, UserView, Problem, FieldError))
)]
pub struct ApiDoc;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/users", post(sign_up))
        .route("/users/me", get(me))
        .route("/auth/login", post(login))
        .route("/.well-known/jwks.json", get(jwks))
        .with_state(state)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct SignUp {
    email: String,
    name: String,
    /// At least 8 characters.
    password: String,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UserView {
    pub id: Uuid,
    pub email: String,
    pub name: String,
    /// RFC 3339.
    pub created_at: String,
}

impl From<UserRecord> for UserView {
    fn from(r: UserRecord) -> Self {
        Self {
            id: r.id,
            email: r.email,
            name: r.name,
            created_at: chassis::clock::rfc3339(r.created_at),
        }
    }
}

/// Create an account.
#[utoipa::path(post, path = "/users", request_body = SignUp,
    responses((status = 201, body = UserView), (status = 409, body = Problem), (status = 422, body = Problem)))]
async fn sign_up(
    State(state): State<AppState>,
    Json(body): Json<SignUp>,
) -> Result<Response, Problem> {
    let email = Email::parse(&body.email);
    let name = UserName::parse(&body.name);
    let password = Password::parse(body.password);
    let (email, name, password) = match (email, name, password) {
        (Ok(e), Ok(n), Ok(p)) => (e, n, p),
        (e, n, p) => {
            let errors = [e.err(), n.err(), p.err()].into_iter().flatten().collect();
            return Err(Problem::validation(errors));
        }
    };
    let hash = state
        .passwords
        .hash(password.expose().to_owned())
        .await
        .map_err(Problem::internal)?;
    let record = match repository::insert(&state.pool, &state.outbox, &email, &name, &hash).await {
        Ok(r) => r,
        Err(InsertError::DuplicateEmail) => {
            return Err(Problem::conflict(
                "an account with this e-mail address already exists",
            ));
        }
        Err(InsertError::Db(e)) => return Err(e.into()),
        Err(InsertError::Outbox(e)) => return Err(Problem::internal(e)),
    };
    tracing::info!(user_id = %record.id, "account created");
    let location = HeaderValue::from_str(&format!("/users/{}", record.id)).ok();
    let mut response = (StatusCode::CREATED, Json(UserView::from(record))).into_response();
    if let Some(l) = location {
        response.headers_mut().insert(header::LOCATION, l);
    }
    Ok(response)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct Login {
    email: String,
    password: String,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenResponse {
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until the token expires.
    pub expires_in: u64,
}

#[derive(Serialize)]
struct AccessClaims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: String,
    email: &'a str,
    iat: u64,
    nbf: u64,
    exp: u64,
    jti: String,
}

/// Exchange e-mail and password for an access token.
#[utoipa::path(post, path = "/auth/login", request_body = Login,
    responses((status = 200, body = TokenResponse), (status = 401, body = Problem)))]
async fn login(
    State(state): State<AppState>,
    Json(body): Json<Login>,
) -> Result<Response, Problem> {
    // An unparseable e-mail is treated as unknown: same answer, same work.
    let record = match Email::parse(&body.email) {
        Ok(email) => repository::by_email(&state.pool, &email).await?,
        Err(_) => None,
    };
    let ok = state
        .passwords
        .verify(
            body.password,
            record.as_ref().map(|r| r.password_hash.clone()),
        )
        .await;
    let Some(user) = record.filter(|_| ok) else {
        return Err(Problem::unauthorized(
            "the e-mail address or the password is wrong",
        ));
    };
    let now = now_secs();
    let ttl = state.token_ttl.as_secs();
    let token = state
        .signer
        .sign(&AccessClaims {
            iss: &state.issuer,
            aud: &state.audience,
            sub: user.id.to_string(),
            email: &user.email,
            iat: now,
            nbf: now,
            exp: now + ttl,
            jti: Uuid::now_v7().to_string(),
        })
        .map_err(Problem::internal)?;
    let mut response = Json(TokenResponse {
        access_token: token,
        token_type: "Bearer".into(),
        expires_in: ttl,
    })
    .into_response();
    // RFC 6749 §5.1: token responses must not be cached.
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// The public keys that verify access tokens.
#[utoipa::path(get, path = "/.well-known/jwks.json", responses((status = 200, description = "A JWK Set")))]
async fn jwks(State(state): State<AppState>) -> Response {
    let mut response = axum::Json((*state.jwks).clone()).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    response
}

/// The signed-in user's account.
#[utoipa::path(get, path = "/users/me",
    responses((status = 200, body = UserView), (status = 401, body = Problem)))]
async fn me(State(state): State<AppState>, identity: Identity) -> Result<Json<UserView>, Problem> {
    let id = Uuid::parse_str(&identity.subject)
        .map_err(|_| Problem::unauthorized("the forwarded identity does not name a user"))?;
    repository::by_id(&state.pool, id)
        .await?
        .map(|r| Json(r.into()))
        .ok_or_else(|| Problem::not_found("your account"))
}
