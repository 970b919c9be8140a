//! Access-token checks per route policy, and the identity forwarded downstream.

use chassis::Problem;
use chassis::jwt::{JwtError, JwtVerifier};
use http::HeaderMap;
use serde::Deserialize;

use crate::configuration::AuthPolicy;

/// The claims the gateway reads from an access token.
#[derive(Debug, Deserialize)]
pub struct AccessClaims {
    pub sub: String,
    #[serde(default)]
    pub email: Option<String>,
}

/// The caller, once the route's policy is satisfied: `None` is anonymous.
pub async fn authenticate(
    verifier: &JwtVerifier,
    policy: AuthPolicy,
    headers: &HeaderMap,
) -> Result<Option<AccessClaims>, Problem> {
    if policy == AuthPolicy::Anonymous {
        return Ok(None);
    }
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return match policy {
            AuthPolicy::Required => Err(Problem::unauthorized(
                "this route needs a Bearer access token: log in at POST /auth/login",
            )),
            _ => Ok(None),
        };
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            Problem::unauthorized("the Authorization header must be `Bearer <token>`")
        })?;
    match verifier.verify::<AccessClaims>(token).await {
        Ok(claims) => Ok(Some(claims)),
        Err(JwtError::KeysUnavailable(e)) => {
            tracing::warn!(error = %e, "cannot fetch the token issuer's keys");
            Err(Problem::unavailable(
                "tokens cannot be verified right now; try again shortly",
            ))
        }
        Err(e) => {
            // The reason is logged, not told: it would help an attacker tune a forgery.
            tracing::info!(reason = %e, "access token refused");
            Err(Problem::unauthorized(
                "the access token is invalid or expired; log in again",
            ))
        }
    }
}
