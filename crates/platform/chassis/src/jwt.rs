//! JSON Web Tokens: ES256 signing keys with RFC 7638 `kid`s, JWKS documents, and a
//! verifier whose algorithm is pinned by the key (never by the token's header), with
//! a JWKS cache that refreshes on an unknown `kid` at most once per interval.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use secrecy::SecretString;
use serde::Deserialize;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::client::HttpClient;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token names no key (`kid`)")]
    MissingKid,
    #[error("the token's key `{0}` is not known")]
    UnknownKid(String),
    #[error("the token's algorithm does not match its key")]
    AlgorithmMismatch,
    #[error("the token is not valid: {0}")]
    Invalid(#[source] jsonwebtoken::errors::Error),
    #[error("the signing keys cannot be fetched: {0}")]
    KeysUnavailable(String),
    #[error("key error: {0}")]
    Key(String),
}

/// An ES256 (P-256) signing key.
#[derive(Clone)]
pub struct SigningKey {
    kid: String,
    secret: p256::SecretKey,
    encoding: EncodingKey,
    public_jwk: Value,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    pub fn generate() -> Result<Self, JwtError> {
        Self::from_secret(p256::SecretKey::random(&mut rand_core::OsRng))
    }

    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, JwtError> {
        let secret =
            p256::SecretKey::from_pkcs8_pem(pem).map_err(|e| JwtError::Key(e.to_string()))?;
        Self::from_secret(secret)
    }

    /// The private key as PKCS#8 PEM, for persisting.
    pub fn to_pkcs8_pem(&self) -> Result<SecretString, JwtError> {
        let pem = self
            .secret
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| JwtError::Key(e.to_string()))?;
        Ok(SecretString::from(pem.as_str()))
    }

    fn from_secret(secret: p256::SecretKey) -> Result<Self, JwtError> {
        let der = secret
            .to_pkcs8_der()
            .map_err(|e| JwtError::Key(e.to_string()))?;
        let encoding = EncodingKey::from_ec_der(der.as_bytes());
        let point = secret.public_key().to_encoded_point(false);
        let (Some(x), Some(y)) = (point.x(), point.y()) else {
            return Err(JwtError::Key("public key is the identity point".into()));
        };
        let x = URL_SAFE_NO_PAD.encode(x);
        let y = URL_SAFE_NO_PAD.encode(y);
        // RFC 7638: the thumbprint of the required members in lexicographic order.
        let thumbprint_input = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let kid = URL_SAFE_NO_PAD.encode(Sha256::digest(thumbprint_input.as_bytes()));
        let public_jwk = json!({
            "kty": "EC", "crv": "P-256", "x": x, "y": y,
            "kid": kid, "alg": "ES256", "use": "sig",
        });
        Ok(Self {
            kid,
            secret,
            encoding,
            public_jwk,
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn public_jwk(&self) -> &Value {
        &self.public_jwk
    }

    /// Signs `claims` as a compact JWS with this key's `kid`.
    pub fn sign<C: Serialize>(&self, claims: &C) -> Result<String, JwtError> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).map_err(JwtError::Invalid)
    }
}

/// A JWKS document for the given keys.
pub fn jwks<'a>(keys: impl IntoIterator<Item = &'a SigningKey>) -> Value {
    json!({ "keys": keys.into_iter().map(|k| k.public_jwk.clone()).collect::<Vec<_>>() })
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    kid: Option<String>,
    alg: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
    n: Option<String>,
    e: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
}

/// Verification keys by `kid`, each with the one algorithm it may be used with.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, (Algorithm, DecodingKey)>,
    /// Keys configured without a `kid`, for tokens that carry none: the token's
    /// `alg` picks among them, and only a key of exactly that algorithm is used.
    unnamed: Vec<(Algorithm, DecodingKey)>,
}

/// The algorithms a configured key may be pinned to.
const CONFIGURABLE: &[Algorithm] = &[
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Shortest HMAC secret accepted: RFC 7518 §3.2 asks for a key at least as long
/// as the hash (32 bytes for HS256).
pub const MIN_HMAC_SECRET: usize = 32;

/// A verification key from configuration: `alg` pins what it verifies; HMAC
/// algorithms take `secret`, the others a PEM public key (SPKI, or PKCS#1 for RSA).
pub fn configured_key(
    alg: &str,
    secret: Option<&str>,
    pem: Option<&[u8]>,
) -> Result<(Algorithm, DecodingKey), String> {
    let algorithm: Algorithm = alg
        .parse()
        .ok()
        .filter(|a| CONFIGURABLE.contains(a))
        .ok_or_else(|| {
            format!(
                "`{alg}` is not an algorithm a key can be pinned to (HS256, RS256, ES256, EdDSA...)"
            )
        })?;
    let key = match (algorithm, secret, pem) {
        (Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512, Some(secret), None) => {
            if secret.len() < MIN_HMAC_SECRET {
                return Err(format!(
                    "an {alg} secret must be at least {MIN_HMAC_SECRET} bytes"
                ));
            }
            DecodingKey::from_secret(secret.as_bytes())
        }
        (Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512, _, _) => {
            return Err(format!("an {alg} key takes `secret` (and no public key)"));
        }
        (_, None, Some(pem)) => match algorithm {
            Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(pem),
            Algorithm::EdDSA => DecodingKey::from_ed_pem(pem),
            _ => DecodingKey::from_rsa_pem(pem),
        }
        .map_err(|e| format!("the {alg} public key is not a usable PEM: {e}"))?,
        (_, _, _) => {
            return Err(format!(
                "an {alg} key takes a PEM public key (and no secret)"
            ));
        }
    };
    Ok((algorithm, key))
}

impl KeySet {
    /// Parses a JWKS document. Keys without a `kid`, for encryption, or of a type or
    /// algorithm we do not pin are skipped rather than guessed at.
    pub fn from_jwks(doc: &Value) -> Result<Self, JwtError> {
        let list = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| JwtError::Key("JWKS has no `keys` array".into()))?;
        let mut keys = HashMap::new();
        for raw in list {
            let Ok(jwk) = RawJwk::deserialize(raw) else {
                continue;
            };
            let Some(kid) = jwk.kid.clone() else { continue };
            if jwk.use_.as_deref().is_some_and(|u| u != "sig") {
                continue;
            }
            if let Some(entry) = decoding_key(&jwk) {
                keys.insert(kid, entry);
            }
        }
        Ok(Self {
            keys,
            unnamed: Vec::new(),
        })
    }

    /// Adds a key; without `kid` it serves tokens that name none.
    pub fn insert(&mut self, kid: Option<&str>, key: (Algorithm, DecodingKey)) {
        match kid {
            Some(kid) => {
                self.keys.insert(kid.to_owned(), key);
            }
            None => self.unnamed.push(key),
        }
    }

    /// The key for a token without `kid` signed with `alg`.
    fn unnamed(&self, alg: Algorithm) -> Option<&(Algorithm, DecodingKey)> {
        self.unnamed.iter().find(|(a, _)| *a == alg)
    }

    pub fn from_signing_keys<'a>(keys: impl IntoIterator<Item = &'a SigningKey>) -> Self {
        let doc = jwks(keys);
        Self::from_jwks(&doc).unwrap_or_default()
    }

    pub fn get(&self, kid: &str) -> Option<&(Algorithm, DecodingKey)> {
        self.keys.get(kid)
    }

    pub fn len(&self) -> usize {
        self.keys.len() + self.unnamed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.unnamed.is_empty()
    }
}

fn decoding_key(jwk: &RawJwk) -> Option<(Algorithm, DecodingKey)> {
    let (default_alg, key) = match (jwk.kty.as_str(), jwk.crv.as_deref()) {
        ("EC", Some("P-256")) => (
            Algorithm::ES256,
            DecodingKey::from_ec_components(jwk.x.as_deref()?, jwk.y.as_deref()?).ok()?,
        ),
        ("EC", Some("P-384")) => (
            Algorithm::ES384,
            DecodingKey::from_ec_components(jwk.x.as_deref()?, jwk.y.as_deref()?).ok()?,
        ),
        ("OKP", Some("Ed25519")) => (
            Algorithm::EdDSA,
            DecodingKey::from_ed_components(jwk.x.as_deref()?).ok()?,
        ),
        ("RSA", _) => (
            Algorithm::RS256,
            DecodingKey::from_rsa_components(jwk.n.as_deref()?, jwk.e.as_deref()?).ok()?,
        ),
        _ => return None,
    };
    let alg = match jwk.alg.as_deref() {
        None => default_alg,
        Some(name) => {
            let alg: Algorithm = name.parse().ok()?;
            // A key may only be used with an algorithm of its own type: an RSA key
            // declared HS256 is the classic key-confusion attack.
            let same_family = matches!(
                (default_alg, alg),
                (
                    Algorithm::RS256,
                    Algorithm::RS256
                        | Algorithm::RS384
                        | Algorithm::RS512
                        | Algorithm::PS256
                        | Algorithm::PS384
                        | Algorithm::PS512
                )
            ) || alg == default_alg;
            if !same_family {
                return None;
            }
            alg
        }
    };
    Some((alg, key))
}

/// Where a JWKS comes from.
enum JwksSource {
    /// A service found through discovery, and the path it serves the JWKS on.
    Service {
        client: Box<HttpClient>,
        service: String,
        path: String,
    },
    /// An absolute URL (an identity provider outside the mesh).
    Url { http: reqwest::Client, url: String },
}

/// A JWKS fetched from a service through the client, cached, refreshed on an unknown
/// `kid` no more than once per `min_interval` (so forged `kid`s cannot make us hammer
/// the issuer).
pub struct JwksCache {
    source: JwksSource,
    /// The keys last fetched, and when: past `max_age`, they are fetched again
    /// before a key of theirs is used, so a key the issuer withdrew stops being
    /// trusted.
    keys: RwLock<(Arc<KeySet>, Option<Instant>)>,
    last_fetch: tokio::sync::Mutex<Option<(Instant, Option<String>)>>,
    min_interval: Duration,
    max_age: Duration,
}

/// Fewest seconds between two JWKS fetches triggered by unknown `kid`s.
const JWKS_MIN_REFRESH: Duration = Duration::from_secs(10);
/// How long a fetched JWKS is used before it is fetched again (the issuer may have
/// withdrawn a key).
const JWKS_MAX_AGE: Duration = Duration::from_secs(300);

impl JwksCache {
    pub fn new(client: HttpClient, service: &str, path: &str) -> Self {
        Self::from_source(JwksSource::Service {
            client: Box::new(client),
            service: service.to_owned(),
            path: path.to_owned(),
        })
    }

    /// A JWKS served at an absolute `url`.
    pub fn from_url(url: &str) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        Self::from_source(JwksSource::Url {
            http,
            url: url.to_owned(),
        })
    }

    fn from_source(source: JwksSource) -> Self {
        Self {
            source,
            keys: RwLock::new((Arc::new(KeySet::default()), None)),
            last_fetch: tokio::sync::Mutex::new(None),
            min_interval: JWKS_MIN_REFRESH,
            max_age: JWKS_MAX_AGE,
        }
    }

    /// The spacing of fetches and the age at which the keys are fetched again
    /// (defaults: 10 s and 5 minutes).
    pub fn with_intervals(mut self, min_interval: Duration, max_age: Duration) -> Self {
        self.min_interval = min_interval;
        self.max_age = max_age;
        self
    }

    fn describe(&self) -> &str {
        match &self.source {
            JwksSource::Service { service, .. } => service,
            JwksSource::Url { url, .. } => url,
        }
    }

    async fn fetch(&self) -> Result<Value, String> {
        match &self.source {
            JwksSource::Service {
                client,
                service,
                path,
            } => client
                .get_json(service, path)
                .await
                .map_err(|e| e.to_string()),
            JwksSource::Url { http, url } => {
                let response = http
                    .get(url)
                    .send()
                    .await
                    .and_then(reqwest::Response::error_for_status)
                    .map_err(|e| e.to_string())?;
                response.json().await.map_err(|e| e.to_string())
            }
        }
    }

    /// `kid`'s key among those last fetched, and whether they are past `max_age`.
    fn cached(&self, kid: &str) -> (Option<(Algorithm, DecodingKey)>, bool) {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let stale = keys.1.is_some_and(|at| at.elapsed() >= self.max_age);
        (keys.0.get(kid).cloned(), stale)
    }

    async fn key(&self, kid: &str) -> Result<(Algorithm, DecodingKey), JwtError> {
        if let (Some(k), false) = self.cached(kid) {
            return Ok(k);
        }
        let mut last = self.last_fetch.lock().await;
        // Another request may have refreshed while this one waited for the lock.
        if let (Some(k), false) = self.cached(kid) {
            return Ok(k);
        }
        // Fetches are spaced (unknown `kid`s are cheap to send); within the space,
        // a known key keeps serving, and a failed fetch keeps its answer: the
        // issuer unreachable is a 503 to retry, not a token to throw away.
        if let Some((at, failure)) = &*last
            && at.elapsed() < self.min_interval
        {
            if let (Some(k), _) = self.cached(kid) {
                return Ok(k);
            }
            return Err(match failure {
                Some(e) => JwtError::KeysUnavailable(e.clone()),
                None => JwtError::UnknownKid(kid.to_owned()),
            });
        }
        let fetched = self.fetch().await;
        *last = Some((Instant::now(), fetched.as_ref().err().cloned()));
        let doc = match fetched {
            Ok(doc) => doc,
            // Keys known from before keep serving while the issuer is away.
            Err(e) => {
                return self.cached(kid).0.ok_or(JwtError::KeysUnavailable(e));
            }
        };
        let set = KeySet::from_jwks(&doc)?;
        tracing::info!(issuer = %self.describe(), keys = set.len(), "fetched JWKS");
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) =
            (Arc::new(set), Some(Instant::now()));
        self.cached(kid)
            .0
            .ok_or_else(|| JwtError::UnknownKid(kid.to_owned()))
    }
}

/// Verifies tokens of one issuer and audience.
pub struct JwtVerifier {
    /// Keys from configuration, tried first.
    keys: KeySet,
    /// The issuer's JWKS, for `kid`s not configured.
    remote: Option<Box<JwksCache>>,
    issuer: String,
    audience: String,
    leeway: Duration,
}

impl JwtVerifier {
    pub fn with_keys(keys: KeySet, issuer: &str, audience: &str, leeway: Duration) -> Self {
        Self::new(keys, None, issuer, audience, leeway)
    }

    pub fn with_jwks(cache: JwksCache, issuer: &str, audience: &str, leeway: Duration) -> Self {
        Self::new(KeySet::default(), Some(cache), issuer, audience, leeway)
    }

    /// Configured keys first, then the JWKS (if any) for other `kid`s.
    pub fn new(
        keys: KeySet,
        remote: Option<JwksCache>,
        issuer: &str,
        audience: &str,
        leeway: Duration,
    ) -> Self {
        Self {
            keys,
            remote: remote.map(Box::new),
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            leeway,
        }
    }

    /// Verifies signature, `iss`, `aud`, `exp`, `nbf` (with leeway) and decodes claims.
    pub async fn verify<C: DeserializeOwned>(&self, token: &str) -> Result<C, JwtError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)?;
        let (alg, key) = match (&header.kid, &self.remote) {
            (Some(kid), remote) => match (self.keys.get(kid), remote) {
                (Some(found), _) => found.clone(),
                (None, Some(cache)) => cache.key(kid).await?,
                (None, None) => return Err(JwtError::UnknownKid(kid.clone())),
            },
            (None, _) => self
                .keys
                .unnamed(header.alg)
                .cloned()
                .ok_or(JwtError::MissingKid)?,
        };
        if header.alg != alg {
            return Err(JwtError::AlgorithmMismatch);
        }
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.leeway = self.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        jsonwebtoken::decode::<C>(token, &key, &validation)
            .map(|data| data.claims)
            .map_err(JwtError::Invalid)
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Claims {
        iss: String,
        aud: String,
        sub: String,
        exp: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        nbf: Option<u64>,
    }

    fn claims(exp_offset: i64) -> Claims {
        Claims {
            iss: "me".into(),
            aud: "you".into(),
            sub: "42".into(),
            exp: (now_secs() as i64 + exp_offset) as u64,
            nbf: None,
        }
    }

    fn verifier(key: &SigningKey) -> JwtVerifier {
        JwtVerifier::with_keys(
            KeySet::from_signing_keys([key]),
            "me",
            "you",
            Duration::from_secs(1),
        )
    }

    #[tokio::test]
    async fn sign_and_verify_round_trip_and_pem_persists_the_key() {
        let key = SigningKey::generate().unwrap();
        let token = key.sign(&claims(60)).unwrap();
        let got: Claims = verifier(&key).verify(&token).await.unwrap();
        assert_eq!(got.sub, "42");
        use secrecy::ExposeSecret;
        let again =
            SigningKey::from_pkcs8_pem(key.to_pkcs8_pem().unwrap().expose_secret()).unwrap();
        assert_eq!(again.kid(), key.kid());
        assert_eq!(key.kid().len(), 43);
    }

    #[tokio::test]
    async fn rejects_expired_foreign_tampered_none_and_future_tokens() {
        let key = SigningKey::generate().unwrap();
        let v = verifier(&key);
        let expired = key.sign(&claims(-120)).unwrap();
        assert!(v.verify::<Claims>(&expired).await.is_err());

        let other = SigningKey::generate().unwrap();
        let mut foreign_header = Header::new(Algorithm::ES256);
        foreign_header.kid = Some(key.kid().to_owned());
        let foreign = jsonwebtoken::encode(&foreign_header, &claims(60), &other.encoding).unwrap();
        assert!(matches!(
            v.verify::<Claims>(&foreign).await,
            Err(JwtError::Invalid(_))
        ));

        let good = key.sign(&claims(60)).unwrap();
        let mut parts: Vec<&str> = good.split('.').collect();
        let forged_payload = URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&Claims {
                sub: "1".into(),
                ..claims(60)
            })
            .unwrap(),
        );
        parts[1] = &forged_payload;
        assert!(v.verify::<Claims>(&parts.join(".")).await.is_err());

        let none_header =
            URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"none","kid":"{}"}}"#, key.kid()));
        let none = format!(
            "{none_header}.{}.",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(60)).unwrap())
        );
        assert!(v.verify::<Claims>(&none).await.is_err());

        let hs_header =
            URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"HS256","kid":"{}"}}"#, key.kid()));
        let hs = format!(
            "{hs_header}.{}.c2ln",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(60)).unwrap())
        );
        assert!(v.verify::<Claims>(&hs).await.is_err());

        let mut future = claims(600);
        future.nbf = Some(now_secs() + 300);
        let future = key.sign(&future).unwrap();
        assert!(v.verify::<Claims>(&future).await.is_err());

        let wrong_aud = key
            .sign(&Claims {
                aud: "them".into(),
                ..claims(60)
            })
            .unwrap();
        assert!(v.verify::<Claims>(&wrong_aud).await.is_err());
    }

    /// While the issuer is unreachable, tokens of keys not yet known are refused as
    /// "keys unavailable" (a 503 to retry), the failed fetch's answer kept for the
    /// fetch interval: not "unknown key" (a 401 that sends the user to log in again).
    #[tokio::test]
    async fn an_unreachable_issuer_stays_unavailable_between_fetches() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/jwks.json", dead.local_addr().unwrap());
        drop(dead);
        let v = JwtVerifier::with_jwks(JwksCache::from_url(&url), "me", "you", Duration::ZERO);
        let token = SigningKey::generate().unwrap().sign(&claims(60)).unwrap();
        for _ in 0..2 {
            assert!(matches!(
                v.verify::<Claims>(&token).await,
                Err(JwtError::KeysUnavailable(_))
            ));
        }
    }

    /// A key the issuer withdraws stops being trusted once the fetched set is older
    /// than its age limit; a key it adds is fetched when first seen.
    #[tokio::test]
    async fn a_withdrawn_key_is_refused_after_the_set_ages() {
        let (old, new) = (
            SigningKey::generate().unwrap(),
            SigningKey::generate().unwrap(),
        );
        let served = Arc::new(std::sync::Mutex::new(jwks([&old])));
        let state = served.clone();
        let app = axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || {
                let doc = state.lock().unwrap().clone();
                async move { axum::Json(doc) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let cache =
            JwksCache::from_url(&url).with_intervals(Duration::ZERO, Duration::from_millis(200));
        let v = JwtVerifier::with_jwks(cache, "me", "you", Duration::ZERO);
        let by_old = old.sign(&claims(60)).unwrap();
        assert!(v.verify::<Claims>(&by_old).await.is_ok());
        // The issuer withdraws the old key: it serves until the set ages, then the
        // set is fetched again and the old key is refused; the new one is known.
        *served.lock().unwrap() = jwks([&new]);
        assert!(v.verify::<Claims>(&by_old).await.is_ok());
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(matches!(
            v.verify::<Claims>(&by_old).await,
            Err(JwtError::UnknownKid(_))
        ));
        assert!(
            v.verify::<Claims>(&new.sign(&claims(60)).unwrap())
                .await
                .is_ok()
        );
    }

    #[test]
    fn jwks_pins_algorithms_to_key_types() {
        let key = SigningKey::generate().unwrap();
        let mut jwk = key.public_jwk().clone();
        jwk["alg"] = json!("HS256");
        let set = KeySet::from_jwks(&json!({ "keys": [jwk] })).unwrap();
        assert!(set.is_empty(), "an EC key declared HS256 must be refused");
        let set = KeySet::from_jwks(&jwks([&key])).unwrap();
        assert_eq!(set.get(key.kid()).unwrap().0, Algorithm::ES256);
    }
}
