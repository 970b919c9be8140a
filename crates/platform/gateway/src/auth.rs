//! Who is calling: a bearer JWT (configured keys, algorithm pinned per key, or the
//! issuer's JWKS) or an API key, checked against the route's policy, and the
//! identity forwarded downstream.
//!
//! Verified tokens are remembered until they expire, so a client sending the same
//! token again costs a hash lookup instead of a signature check (ES256 verification
//! is ~100x the rest of a request's work).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chassis::Problem;
use chassis::jwt::{JwtError, JwtVerifier, now_secs};
use chassis::memo::Memo;
use http::header::HeaderName;
use http::{HeaderMap, HeaderValue};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::configuration::AuthPolicy;

/// The API key header.
pub const API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// An authenticated caller: one per verified token (kept while the token is
/// valid) or per API-key consumer (kept with the configuration).
#[derive(Debug)]
pub struct Caller {
    /// The user (the token's subject claim) or `consumer:<name>` for an API key.
    pub sub: Arc<str>,
    pub email: Option<String>,
    /// The token's claims named in [`ClaimNames::forwarded`], by their new names.
    pub claims: serde_json::Map<String, Value>,
    /// The API key's consumer.
    pub consumer: Option<String>,
    /// Unix seconds after which a cached verification is stale.
    pub exp: u64,
    /// The identity last minted for this caller, and when: the proxy forwards it
    /// again while it has half its lifetime left. Kept here, the caller being the
    /// cache's key already, rather than in a map by subject, where every request
    /// hashed the subject and compared the claims to tell it was the same caller.
    pub minted: Mutex<Option<(Instant, HeaderValue)>>,
}

impl Caller {
    pub fn new(
        sub: Arc<str>,
        email: Option<String>,
        claims: serde_json::Map<String, Value>,
        consumer: Option<String>,
        exp: u64,
    ) -> Self {
        Self {
            sub,
            email,
            claims,
            consumer,
            exp,
            minted: Mutex::new(None),
        }
    }
}

/// Claims read from an access token, by configurable names.
#[derive(Clone, Debug)]
pub struct ClaimNames {
    pub subject: String,
    pub email: String,
    /// Claims passed on: the name they are forwarded under, and their path in the
    /// token (object keys, outermost first).
    pub forwarded: Vec<(String, Vec<String>)>,
}

/// Names the forwarded identity gives claims of its own.
const RESERVED_CLAIMS: [&str; 7] = ["iss", "aud", "sub", "exp", "iat", "email", "claims"];

impl ClaimNames {
    /// With `forward` (`gateway.auth.forward_claims`: name -> dotted path);
    /// every malformed entry is named.
    pub fn new(
        subject: &str,
        email: &str,
        forward: &std::collections::BTreeMap<String, String>,
    ) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let mut forwarded = Vec::new();
        for (name, path) in forward {
            let at = format!("gateway.auth.forward_claims.{name}");
            if name.is_empty() {
                errors.push("gateway.auth.forward_claims: a claim needs a name".to_owned());
                continue;
            }
            if RESERVED_CLAIMS.contains(&name.as_str()) {
                errors.push(format!(
                    "{at}: `{name}` is the forwarded identity's own; forward it under another name"
                ));
                continue;
            }
            let segments: Vec<String> = path.split('.').map(str::to_owned).collect();
            if segments.iter().any(String::is_empty) {
                errors.push(format!(
                    "{at} = \"{path}\": a claim path is names joined by dots, none empty (\"roles\", \"realm_access.roles\")"
                ));
                continue;
            }
            forwarded.push((name.clone(), segments));
        }
        match errors.is_empty() {
            true => Ok(Self {
                subject: subject.to_owned(),
                email: email.to_owned(),
                forwarded,
            }),
            false => Err(errors),
        }
    }

    /// The forwarded claims found in `token`'s claims.
    fn pick(&self, token: &serde_json::Map<String, Value>) -> serde_json::Map<String, Value> {
        let mut picked = serde_json::Map::new();
        for (name, path) in &self.forwarded {
            let mut segments = path.iter();
            let found = segments
                .next()
                .and_then(|first| token.get(first))
                .and_then(|v| segments.try_fold(v, |v, key| v.get(key)));
            if let Some(value) = found {
                picked.insert(name.clone(), value.clone());
            }
        }
        picked
    }
}

/// API keys by the SHA-256 of the key (keys are never stored in clear).
#[derive(Clone, Debug, Default)]
pub struct ApiKeys {
    /// The consumer of each key, as the caller its requests are made by.
    by_hash: HashMap<[u8; 32], Arc<Caller>>,
}

impl ApiKeys {
    /// From `consumer -> hex SHA-256` pairs; every malformed hash is named.
    pub fn new<'a>(
        entries: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Result<Self, Vec<String>> {
        let mut by_hash = HashMap::new();
        let mut errors = Vec::new();
        for (consumer, hex) in entries {
            match decode_hex32(hex) {
                Some(hash) => {
                    let caller = Caller::new(
                        format!("consumer:{consumer}").into(),
                        None,
                        serde_json::Map::new(),
                        Some(consumer.clone()),
                        u64::MAX,
                    );
                    if let Some(other) = by_hash.insert(hash, Arc::new(caller)) {
                        let other = other.consumer.as_deref().unwrap_or_default();
                        errors.push(format!(
                            "api_keys.{consumer}: the same key as api_keys.{other}"
                        ));
                    }
                }
                None => errors.push(format!(
                    "api_keys.{consumer}.sha256 must be 64 hex digits (sha256sum of the key)"
                )),
            }
        }
        if errors.is_empty() {
            Ok(Self { by_hash })
        } else {
            Err(errors)
        }
    }

    /// The consumer whose key this is. The lookup is by hash, so how long it takes
    /// says nothing about how close a guess was.
    pub fn caller(&self, key: &str) -> Option<&Arc<Caller>> {
        let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        self.by_hash.get(&hash)
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

fn decode_hex32(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// Verifies credentials, remembering verified tokens.
pub struct Authenticator {
    pub verifier: JwtVerifier,
    pub claims: ClaimNames,
    pub leeway: Duration,
    verified: Memo<Box<str>, Arc<Caller>>,
}

/// Verified tokens remembered at most.
const VERIFIED_CAPACITY: usize = 65_536;

impl Authenticator {
    pub fn new(verifier: JwtVerifier, claims: ClaimNames, leeway: Duration) -> Self {
        Self {
            verifier,
            claims,
            leeway,
            verified: Memo::new(VERIFIED_CAPACITY),
        }
    }

    /// The caller, once `policy` is satisfied: `None` is anonymous.
    pub async fn authenticate(
        &self,
        policy: AuthPolicy,
        headers: &HeaderMap,
        api_keys: &ApiKeys,
    ) -> Result<Option<Arc<Caller>>, Problem> {
        if policy == AuthPolicy::Anonymous {
            return Ok(None);
        }
        if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            // ASCII is what `to_str` admits of a header value, checked a word at a
            // time rather than a byte at a time: a token is a few hundred bytes.
            let token = Some(value.as_bytes())
                .filter(|v| v.is_ascii())
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| {
                    let (scheme, token) = v.split_once(' ')?;
                    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
                })
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    Problem::unauthorized("the Authorization header must be `Bearer <token>`")
                })?;
            return self.bearer(token).await.map(Some);
        }
        if let Some(value) = headers.get(API_KEY) {
            let caller = value
                .to_str()
                .ok()
                .and_then(|key| api_keys.caller(key))
                .ok_or_else(|| Problem::unauthorized("the API key is not valid"))?;
            return Ok(Some(caller.clone()));
        }
        match policy {
            AuthPolicy::Required => Err(Problem::unauthorized(
                "this route needs a Bearer access token (log in at POST /auth/login) or an API key in X-Api-Key",
            )),
            _ => Ok(None),
        }
    }

    async fn bearer(&self, token: &str) -> Result<Arc<Caller>, Problem> {
        let now = now_secs();
        if let Some(caller) = self.verified.get(token)
            && now <= caller.exp.saturating_add(self.leeway.as_secs())
        {
            return Ok(caller);
        }
        // Boxed: a verification may fetch the JWKS, a large future the cached path
        // should not carry.
        match Box::pin(
            self.verifier
                .verify::<serde_json::Map<String, Value>>(token),
        )
        .await
        {
            Ok(claims) => {
                let sub = claims
                    .get(&self.claims.subject)
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| Problem::unauthorized("the access token names no subject"))?;
                let caller = Arc::new(Caller::new(
                    sub.into(),
                    claims
                        .get(&self.claims.email)
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    self.claims.pick(&claims),
                    None,
                    claims.get("exp").and_then(Value::as_u64).unwrap_or(now),
                ));
                self.verified.insert(token.into(), caller.clone());
                Ok(caller)
            }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_claims_are_found_by_path_and_bad_entries_named() {
        let forward = [
            ("roles", "realm_access.roles"),
            ("tenant", "tenant"),
            ("missing", "nope.deeper"),
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .into_iter()
        .collect();
        let names = ClaimNames::new("sub", "email", &forward).unwrap();
        let token = serde_json::json!({
            "sub": "u1",
            "tenant": 7,
            "realm_access": {"roles": ["admin", "buyer"]},
            "nope": "a string has no keys",
        });
        let picked = names.pick(token.as_object().unwrap());
        assert_eq!(
            Value::Object(picked),
            serde_json::json!({"roles": ["admin", "buyer"], "tenant": 7})
        );
        let bad = [("sub", "x"), ("roles", "a..b"), ("", "x")]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .into_iter()
            .collect();
        let errors = ClaimNames::new("sub", "email", &bad).unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(
            errors.iter().any(|e| e.contains("forward_claims.sub")),
            "{errors:?}"
        );
        assert!(errors.iter().any(|e| e.contains("a..b")), "{errors:?}");
    }

    #[test]
    fn api_keys_are_found_by_hash_and_bad_hashes_named() {
        let hash = crate::configuration::ApiKeyConfig::of_key("s3cret-key").sha256;
        let keys = ApiKeys::new([(&"mobile".to_owned(), &hash)]).unwrap();
        let mobile = keys.caller("s3cret-key").unwrap();
        assert_eq!(mobile.consumer.as_deref(), Some("mobile"));
        assert_eq!(&*mobile.sub, "consumer:mobile");
        assert!(keys.caller("s3cret-kez").is_none());
        let errors = ApiKeys::new([
            (&"a".to_owned(), &"zz".to_owned()),
            (&"b".to_owned(), &hash),
            (&"c".to_owned(), &hash),
        ])
        .unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
    }
}
