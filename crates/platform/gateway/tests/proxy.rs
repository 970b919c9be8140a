//! The gateway in front of a recording upstream, on real ports.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use chassis::config::HumanDuration;
use chassis::jwt::now_secs;
use chassis::testing::IdentityFixture;
use common::*;
use gateway::{AuthPolicy, RouteConfig, Settings};
use serde_json::{Value, json};

#[tokio::test]
async fn forwards_with_forwarded_headers_and_without_client_identity() {
    let gw = spawn().await;
    let r = gw
        .http
        .get(format!("{}/open/a?b=c", gw.url))
        .header("x-bazaar-identity", "forged")
        .header("x-user-id", "admin")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil.test")
        .header("authorization", "Bearer whatever")
        .header("connection", "x-forwarded-for, x-custom")
        .header("x-custom", "hop")
        .header("x-correlation-id", "corr-42")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-correlation-id"], "corr-42");
    let (uri, headers) = gw.last_seen();
    assert_eq!(uri, "/open/a?b=c");
    for absent in [
        "x-bazaar-identity",
        "x-user-id",
        "authorization",
        "x-custom",
    ] {
        assert!(
            !headers.contains_key(absent),
            "{absent} reached the upstream"
        );
    }
    // The gateway's own, once each: what the client claimed is gone.
    for name in ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"] {
        assert_eq!(headers.get_all(name).iter().count(), 1, "{name} twice");
    }
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert!(
        headers["x-forwarded-host"]
            .to_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert_eq!(headers["x-correlation-id"], "corr-42");
    let tp = headers["traceparent"].to_str().unwrap();
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{tp}"
    );
    assert!(!tp.contains("00f067aa0ba902b7"), "a new span id per hop");
}

/// Claims named in `forward_claims` reach the service inside the signed identity,
/// under their configured names, nested ones included; a claim the token lacks is
/// left out, and a changed claim is not served from the minted-identity cache.
#[tokio::test]
async fn configured_claims_are_forwarded_in_the_signed_identity() {
    let gw = spawn_with(|s| {
        s.auth.forward_claims = [
            ("roles", "realm_access.roles"),
            ("tenant", "tenant_id"),
            ("plan", "plan"),
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .into_iter()
        .collect();
    })
    .await;
    let verifier = gw.identity_verifier().await;
    let forwarded_for = |tenant: u64| {
        let token = gw
            .users
            .key
            .sign(&json!({
                "iss": "bazaar-users", "aud": "bazaar", "sub": "user-9",
                "exp": now_secs() + 600,
                "tenant_id": tenant,
                "realm_access": {"roles": ["buyer", "admin"]},
            }))
            .unwrap();
        let (http, url) = (gw.http.clone(), format!("{}/private/claims", gw.url));
        async move {
            let r = http.get(url).bearer_auth(token).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    forwarded_for(7).await;
    let identity = gw.last_seen().1["x-bazaar-identity"]
        .to_str()
        .unwrap()
        .to_owned();
    let claims: Value = verifier.verify(&identity).await.unwrap();
    assert_eq!(claims["sub"], "user-9");
    assert_eq!(
        claims["claims"],
        json!({"roles": ["buyer", "admin"], "tenant": 7}),
        "{claims}"
    );
    // The same user with another tenant: a new identity, not the cached one.
    forwarded_for(8).await;
    let identity = gw.last_seen().1["x-bazaar-identity"]
        .to_str()
        .unwrap()
        .to_owned();
    let claims: Value = verifier.verify(&identity).await.unwrap();
    assert_eq!(claims["claims"]["tenant"], 8, "{claims}");
}

#[tokio::test]
async fn required_routes_forward_a_verifiable_identity_and_refuse_bad_tokens() {
    let gw = spawn().await;
    let good = gw.users.token("user-1");
    let r = gw
        .http
        .get(format!("{}/private/y", gw.url))
        .bearer_auth(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, headers) = gw.last_seen();
    let forwarded = headers["x-bazaar-identity"].to_str().unwrap().to_owned();
    let verifier = gw.identity_verifier().await;
    let claims: Value = verifier.verify(&forwarded).await.unwrap();
    assert_eq!(claims["sub"], "user-1");

    let before = gw.seen_count();
    let other = IdentityFixture::issuer("/x", "bazaar-users", "bazaar").await;
    let expired = gw
        .users
        .key
        .sign(
            &json!({"iss": "bazaar-users", "aud": "bazaar", "sub": "u", "exp": now_secs() - 3600}),
        )
        .unwrap();
    let wrong_aud = gw
        .users
        .key
        .sign(&json!({"iss": "bazaar-users", "aud": "other", "sub": "u", "exp": now_secs() + 60}))
        .unwrap();
    let future = gw.users.key.sign(&json!({"iss": "bazaar-users", "aud": "bazaar", "sub": "u", "exp": now_secs() + 600, "nbf": now_secs() + 300})).unwrap();
    let parts: Vec<&str> = good.split('.').collect();
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": gw.users.key.kid()})),
        parts[1]
    );
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(
            &json!({"iss": "bazaar-users", "aud": "bazaar", "sub": "admin", "exp": now_secs() + 60})
        ),
        parts[2]
    );
    for (name, auth) in [
        ("missing", None),
        ("not bearer", Some(format!("Basic {good}"))),
        ("garbage", Some("Bearer abc".to_owned())),
        ("other key", Some(format!("Bearer {}", other.token("u")))),
        ("expired", Some(format!("Bearer {expired}"))),
        ("wrong audience", Some(format!("Bearer {wrong_aud}"))),
        ("not yet valid", Some(format!("Bearer {future}"))),
        ("alg none", Some(format!("Bearer {none}"))),
        ("tampered", Some(format!("Bearer {tampered}"))),
    ] {
        let mut req = gw.http.get(format!("{}/private/y", gw.url));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401, "{name}");
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{name}"
        );
        assert_eq!(r.headers()["www-authenticate"], "Bearer", "{name}");
    }
    assert_eq!(
        gw.seen_count(),
        before,
        "a refused request reached the upstream"
    );

    // Optional: no token passes anonymously, a bad one is refused.
    let r = gw.get("/maybe").await;
    assert_eq!(r.status(), 200);
    assert!(!gw.last_seen().1.contains_key("x-bazaar-identity"));
    let r = gw
        .http
        .get(format!("{}/maybe", gw.url))
        .bearer_auth("junk")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

fn b64(v: &Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

/// The path security corpus: each raw request path with the status it must get
/// and, when it passes, the one normalized path the upstream must see. Refused
/// requests must not reach the upstream at all.
const PATH_CASES: &[(&str, u16, Option<&str>)] = &[
    // Dot segments are resolved before routing: a trick to reach a protected route
    // lands on that route and meets its auth.
    ("/open/../private/y", 401, None),
    ("/open/%2e%2e/private/y", 401, None),
    ("/open/.%2E/private/y", 401, None),
    ("/open/a/../../private/y", 401, None),
    ("/open/./x", 200, Some("/open/x")),
    ("/open//x", 200, Some("/open/x")),
    ("//open/x", 200, Some("/open/x")),
    ("/%6Fpen/x", 200, Some("/open/x")),
    ("/open/caf%c3%a9", 200, Some("/open/caf%C3%A9")),
    ("/open/x?q=%2F..", 200, Some("/open/x?q=%2F..")),
    // A target in absolute form reaches the upstream in origin form.
    ("http://shop.test/open/x?a=1", 200, Some("/open/x?a=1")),
    ("http://shop.test/open/./x?a=1", 200, Some("/open/x?a=1")),
    // What servers read differently is refused.
    ("/private%2fy", 400, None),
    ("/open%2F..%2Fprivate", 400, None),
    ("/open%5cx", 400, None),
    ("/open\\x", 400, None),
    ("/open/%00", 400, None),
    ("/open/%ff", 400, None),
    ("/open/%c3", 400, None),
    ("/open/%zz", 400, None),
];

#[tokio::test]
async fn path_tricks_never_reach_the_upstream() {
    let gw = spawn().await;
    for (path, status, upstream) in PATH_CASES {
        let before = gw.seen_count();
        let head = raw_get(&gw.url, path).await;
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status}")),
            "{path}: {head}"
        );
        match upstream {
            Some(seen) => {
                assert_eq!(gw.seen_count(), before + 1, "{path}");
                assert_eq!(gw.last_seen().0, *seen, "{path}");
            }
            None => {
                assert_eq!(gw.seen_count(), before, "{path} reached the upstream");
                assert!(
                    head.to_ascii_lowercase()
                        .contains("content-type: application/problem+json"),
                    "{head}"
                );
            }
        }
    }
    let r = gw.get("/nowhere").await;
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
}

#[tokio::test]
async fn methods_templates_rewrites_and_header_transforms() {
    let gw = spawn_with(|s| {
        s.routes = vec![
            RouteConfig {
                template: Some("/api/things/{id}".into()),
                methods: vec!["GET".into(), "PUT".into()],
                rewrite: Some("/open/thing/{id}".into()),
                service: "echo".into(),
                request_headers: gateway::configuration::HeaderTransform {
                    set: [("x-api-version".to_owned(), "2".to_owned())].into(),
                    remove: vec!["x-debug".into()],
                },
                response_headers: gateway::configuration::HeaderTransform {
                    set: [("cache-control".to_owned(), "no-store".to_owned())].into(),
                    remove: vec![],
                },
                ..RouteConfig::default()
            },
            RouteConfig::prefix("/open", "echo", AuthPolicy::Anonymous),
        ];
    })
    .await;
    let r = gw
        .http
        .get(format!("{}/api/things/42?full=1", gw.url))
        .header("x-debug", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let (uri, headers) = gw.last_seen();
    assert_eq!(uri, "/open/thing/42?full=1");
    assert_eq!(headers["x-api-version"], "2");
    assert!(headers.get("x-debug").is_none());

    let before = gw.seen_count();
    let r = gw
        .http
        .delete(format!("{}/api/things/42", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET, PUT");
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert_eq!(gw.seen_count(), before);
}

#[tokio::test]
async fn rate_limited_requests_get_429_with_headers_and_never_reach_the_upstream() {
    let gw = spawn_with(|s| {
        s.routes = vec![RouteConfig {
            rate_limit: Some("tight".into()),
            ..RouteConfig::prefix("/open", "echo", AuthPolicy::Anonymous)
        }];
        s.rate_limits = [("tight".to_owned(), per_minute_by_ip(3))].into();
    })
    .await;
    for left in [2, 1, 0] {
        let r = gw.get("/open/x").await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["ratelimit-policy"], "\"tight\";q=3;w=60");
        let state = r.headers()["ratelimit"].to_str().unwrap().to_owned();
        assert!(
            state.starts_with(&format!("\"tight\";r={left};t=")),
            "{state}"
        );
    }
    let before = gw.seen_count();
    let r = gw.get("/open/x").await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((19..=20).contains(&retry), "{retry}");
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert_eq!(gw.seen_count(), before);
}

#[tokio::test]
async fn the_config_file_reloads_on_change_and_admin_call_and_a_bad_one_is_refused() {
    let dir = std::env::temp_dir().join(format!("gw-file-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gateway.toml");
    let v1 = "[[routes]]\nprefix = \"/open\"\nservice = \"echo\"\n";
    std::fs::write(&file, v1).unwrap();
    let gw = spawn_with(|s| s.config_file = Some(file.clone())).await;
    let get = |path: &str| gw.http.get(format!("{}{path}", gw.url)).send();
    assert_eq!(get("/open/a").await.unwrap().status(), 200);
    assert_eq!(get("/moved/a").await.unwrap().status(), 404);
    let config: Value = gw.admin_json("/config").await;
    assert_eq!(config["version"], 1);
    assert_eq!(config["source"], file.display().to_string());

    // A change on disk is picked up by the watcher.
    let v2 =
        format!("{v1}[[routes]]\nprefix = \"/moved\"\nrewrite = \"/open\"\nservice = \"echo\"\n");
    std::fs::write(&file, &v2).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while get("/moved/a").await.unwrap().status() != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the change was never loaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(gw.last_seen().0, "/open/a");

    // A broken file: every error named, and the old routes keep serving.
    std::fs::write(
        &file,
        "[[routes]]\nprefix = \"moved\"\nservice = \"\"\nmethods = [\"NOT A METHOD\"]\n",
    )
    .unwrap();
    let r = gw
        .http
        .post(format!("{}/reload", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let problem: Value = r.json().await.unwrap();
    let errors = problem["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert_eq!(get("/moved/a").await.unwrap().status(), 200);
    let config: Value = gw.admin_json("/config").await;
    assert_eq!(config["last_reload"]["ok"], false);
    let version = config["version"].as_u64().unwrap();
    assert!(version >= 2);

    // Fixed, then reloaded through the admin API.
    std::fs::write(&file, v1).unwrap();
    let r = gw
        .http
        .post(format!("{}/reload", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert!(body["version"].as_u64().unwrap() > version);
    assert_eq!(get("/moved/a").await.unwrap().status(), 404);
    let routes: Value = gw.admin_json("/routes").await;
    assert_eq!(routes["routes"][0]["prefix"], "/open");
    let upstreams: Value = gw.admin_json("/upstreams").await;
    assert_eq!(upstreams["upstreams"][0]["service"], "echo");
    assert_eq!(
        upstreams["upstreams"][0]["instances"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn upstream_down_is_502_and_slow_is_504() {
    let gw = spawn().await;
    let r = gw.get("/down/x").await;
    assert_eq!(r.status(), 502);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], 502);
    assert_eq!(body["instance"], "/down/x");
    let r = gw.get("/slow").await;
    assert_eq!(r.status(), 504);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let metrics = gw.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("route=\"/slow\""), "{metrics}");
    assert!(metrics.contains("status=\"504\""));
}

#[tokio::test]
async fn openapi_merges_routed_operations_only() {
    let gw = spawn().await;
    let doc: Value = gw.get("/openapi.json").await.json().await.unwrap();
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.contains_key("/open/x"));
    assert!(paths.contains_key("/private/y"));
    assert!(
        !paths.contains_key("/elsewhere"),
        "unrouted paths are not exposed"
    );
    assert_eq!(
        doc["paths"]["/private/y"]["get"]["security"][0]["bearer"],
        json!([])
    );
    assert!(doc["components"]["schemas"]["Thing"].is_object());
    assert_eq!(doc["x-missing-services"], json!(["dead"]));
}

const HS_SECRET: &str = "a-shared-secret-of-at-least-32-bytes!";

fn key_file(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/keys")
        .join(name)
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(key_file(name)).unwrap()
}

/// Signs `claims` with `alg` and `key`, naming `kid` when given.
fn sign(
    alg: jsonwebtoken::Algorithm,
    key: &jsonwebtoken::EncodingKey,
    kid: Option<&str>,
    claims: &Value,
) -> String {
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

/// Every algorithm the gateway pins keys to, and the classic attacks on each: each
/// case with its status, and no refused request reaching the upstream.
#[tokio::test]
async fn jwt_attack_corpus_against_configured_keys() {
    use gateway::configuration::KeyConfig;
    use jsonwebtoken::{Algorithm, EncodingKey};
    let key = |kid: Option<&str>, alg: &str, file: Option<&str>, secret: Option<&str>| KeyConfig {
        kid: kid.map(str::to_owned),
        alg: alg.to_owned(),
        secret: secret.map(|s| s.to_owned().into()),
        public_key_file: file.map(key_file),
    };
    let gw = spawn_with(|s| {
        s.auth.keys = vec![
            key(Some("rs"), "RS256", Some("rsa.pub.pem"), None),
            key(Some("es"), "ES256", Some("ec.pub.pem"), None),
            key(Some("ed"), "EdDSA", Some("ed.pub.pem"), None),
            key(None, "HS256", None, Some(HS_SECRET)),
        ];
        s.api_keys = [(
            "mobile".to_owned(),
            gateway::configuration::ApiKeyConfig {
                // sha256sum of "mobile-app-key"
                sha256: "bdf195f3f0f41a8af4ce5beea6062d4c71468af89ff4f26af5542cf1762c93b8".into(),
            },
        )]
        .into();
    })
    .await;
    let now = now_secs();
    let claims =
        |sub: &str| json!({"iss": "bazaar-users", "aud": "bazaar", "sub": sub, "exp": now + 300});
    let rs = EncodingKey::from_rsa_pem(&pem("rsa.pem")).unwrap();
    let es = EncodingKey::from_ec_pem(&pem("ec.pem")).unwrap();
    let ed = EncodingKey::from_ed_pem(&pem("ed.pem")).unwrap();
    let hs = EncodingKey::from_secret(HS_SECRET.as_bytes());
    // The RSA public key used as an HMAC secret: the key-confusion attack.
    let confused = EncodingKey::from_secret(&pem("rsa.pub.pem"));
    let good_rs = sign(Algorithm::RS256, &rs, Some("rs"), &claims("u-rs"));
    let parts: Vec<&str> = good_rs.split('.').collect();
    let unsigned = |header: Value| format!("{}.{}.", b64(&header), parts[1]);
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        ("RS256", good_rs.clone(), 200, Some("u-rs")),
        (
            "ES256",
            sign(Algorithm::ES256, &es, Some("es"), &claims("u-es")),
            200,
            Some("u-es"),
        ),
        (
            "EdDSA",
            sign(Algorithm::EdDSA, &ed, Some("ed"), &claims("u-ed")),
            200,
            Some("u-ed"),
        ),
        (
            "HS256 without kid",
            sign(Algorithm::HS256, &hs, None, &claims("u-hs")),
            200,
            Some("u-hs"),
        ),
        (
            "alg none with kid",
            unsigned(json!({"alg": "none", "kid": "rs"})),
            401,
            None,
        ),
        (
            "alg none without kid",
            unsigned(json!({"alg": "none"})),
            401,
            None,
        ),
        (
            "HS256 with the RSA public key, kid rs",
            sign(Algorithm::HS256, &confused, Some("rs"), &claims("x")),
            401,
            None,
        ),
        (
            "HS256 with the RSA public key, no kid",
            sign(Algorithm::HS256, &confused, None, &claims("x")),
            401,
            None,
        ),
        (
            "RS256 key under the ES256 kid",
            sign(Algorithm::RS256, &rs, Some("es"), &claims("x")),
            401,
            None,
        ),
        (
            "expired",
            sign(
                Algorithm::RS256,
                &rs,
                Some("rs"),
                &json!({"iss": "bazaar-users", "aud": "bazaar", "sub": "x", "exp": now - 3600}),
            ),
            401,
            None,
        ),
        (
            "nbf in the future",
            sign(
                Algorithm::RS256,
                &rs,
                Some("rs"),
                &json!({"iss": "bazaar-users", "aud": "bazaar", "sub": "x", "exp": now + 600, "nbf": now + 300}),
            ),
            401,
            None,
        ),
        (
            "wrong iss",
            sign(
                Algorithm::RS256,
                &rs,
                Some("rs"),
                &json!({"iss": "evil", "aud": "bazaar", "sub": "x", "exp": now + 60}),
            ),
            401,
            None,
        ),
        (
            "wrong aud",
            sign(
                Algorithm::RS256,
                &rs,
                Some("rs"),
                &json!({"iss": "bazaar-users", "aud": "evil", "sub": "x", "exp": now + 60}),
            ),
            401,
            None,
        ),
        (
            "no sub",
            sign(
                Algorithm::RS256,
                &rs,
                Some("rs"),
                &json!({"iss": "bazaar-users", "aud": "bazaar", "exp": now + 60}),
            ),
            401,
            None,
        ),
        (
            "unknown kid",
            sign(Algorithm::RS256, &rs, Some("nobody"), &claims("x")),
            401,
            None,
        ),
        (
            "kid with path tricks",
            sign(
                Algorithm::RS256,
                &rs,
                Some("../../../../etc/passwd"),
                &claims("x"),
            ),
            401,
            None,
        ),
        (
            "tampered payload",
            format!("{}.{}.{}", parts[0], b64(&claims("admin")), parts[2]),
            401,
            None,
        ),
    ];
    for (name, token, status, sub) in cases {
        let before = gw.seen_count();
        let r = gw
            .http
            .get(format!("{}/private/y", gw.url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{name}");
        match sub {
            Some(sub) => {
                let forwarded = gw.last_seen().1["x-bazaar-identity"]
                    .to_str()
                    .unwrap()
                    .to_owned();
                let payload = forwarded.split('.').nth(1).unwrap();
                use base64::Engine;
                let claims: Value = serde_json::from_slice(
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .decode(payload)
                        .unwrap(),
                )
                .unwrap();
                assert_eq!(claims["sub"], sub, "{name}");
                // A second use is served from the verified-token cache, same answer.
                let again = gw
                    .http
                    .get(format!("{}/private/y", gw.url))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(again.status(), 200, "{name} (cached)");
            }
            None => assert_eq!(gw.seen_count(), before, "{name} reached the upstream"),
        }
    }

    // API keys: the consumer's identity goes upstream, the key itself does not.
    let r = gw
        .http
        .get(format!("{}/private/y", gw.url))
        .header("x-api-key", "mobile-app-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, headers) = gw.last_seen();
    assert!(headers.get("x-api-key").is_none());
    assert!(headers.contains_key("x-bazaar-identity"));
    let before = gw.seen_count();
    let r = gw
        .http
        .get(format!("{}/private/y", gw.url))
        .header("x-api-key", "mobile-app-kez")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(gw.seen_count(), before);
}

/// A route with `consumers` lets in only those API-key consumers: another consumer's
/// key and a signed-in user's token get a 403 that never reaches the upstream; and
/// a route naming an unknown consumer, or not requiring auth, is refused at load.
#[tokio::test]
async fn a_route_open_to_named_consumers_refuses_everyone_else() {
    use gateway::configuration::{ApiKeyConfig, KeyConfig};
    let key = |sha256: &str| ApiKeyConfig {
        sha256: sha256.to_owned(),
    };
    let gw = spawn_with(|s| {
        s.auth.keys = vec![KeyConfig {
            kid: None,
            alg: "HS256".into(),
            secret: Some(HS_SECRET.to_owned().into()),
            public_key_file: None,
        }];
        s.api_keys = [
            // sha256sum of "mobile-app-key" and of "ops-key"
            (
                "mobile".to_owned(),
                key("bdf195f3f0f41a8af4ce5beea6062d4c71468af89ff4f26af5542cf1762c93b8"),
            ),
            (
                "ops".to_owned(),
                key("2c69bc9111c27110a9b9a7974ba3f8ac0c053c16b23a0738115ee829fbc4d57b"),
            ),
        ]
        .into();
        s.routes = vec![RouteConfig {
            consumers: vec!["ops".into()],
            rewrite: Some("/".into()),
            ..RouteConfig::prefix("/operator/echo", "echo", AuthPolicy::Required)
        }];
    })
    .await;
    let token = sign(
        jsonwebtoken::Algorithm::HS256,
        &jsonwebtoken::EncodingKey::from_secret(HS_SECRET.as_bytes()),
        None,
        &json!({"iss": "bazaar-users", "aud": "bazaar", "sub": "u-1", "exp": now_secs() + 300}),
    );
    let url = format!("{}/operator/echo/admin/x", gw.url);
    let before = gw.seen_count();
    for (who, request) in [
        (
            "another consumer",
            gw.http.get(&url).header("x-api-key", "mobile-app-key"),
        ),
        ("a signed-in user", gw.http.get(&url).bearer_auth(&token)),
    ] {
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), 403, "{who}");
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{who}"
        );
    }
    let r = gw.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401, "no credentials");
    assert_eq!(
        gw.seen_count(),
        before,
        "a refused caller reached the upstream"
    );

    let r = gw
        .http
        .get(&url)
        .header("x-api-key", "ops-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(gw.last_seen().0, "/admin/x", "the prefix is rewritten away");

    let mut config = gateway::configuration::Declarative {
        routes: vec![
            RouteConfig {
                consumers: vec!["nobody".into()],
                ..RouteConfig::prefix("/a", "echo", AuthPolicy::Required)
            },
            RouteConfig {
                consumers: vec!["ops".into()],
                ..RouteConfig::prefix("/b", "echo", AuthPolicy::Optional)
            },
        ],
        ..Default::default()
    };
    config.api_keys = [(
        "ops".to_owned(),
        key("2c69bc9111c27110a9b9a7974ba3f8ac0c053c16b23a0738115ee829fbc4d57b"),
    )]
    .into();
    let errors = config.validate();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("routes[0].consumers: `nobody` is not a consumer")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("routes[1].consumers needs auth = \"required\"")),
        "{errors:?}"
    );
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_proxies_read_right_to_left() {
    let gw = spawn_with(|s| {
        s.trusted_proxies = vec!["127.0.0.1".into()];
        s.routes = vec![RouteConfig {
            rate_limit: Some("one".into()),
            ..RouteConfig::prefix("/open", "echo", AuthPolicy::Anonymous)
        }];
        s.rate_limits = [("one".to_owned(), per_minute_by_ip(1))].into();
    })
    .await;
    let get = |xff: &'static str| {
        gw.http
            .get(format!("{}/open/x", gw.url))
            .header("x-forwarded-for", xff)
            .header("x-forwarded-proto", "https")
            .send()
    };
    // The test client (127.0.0.1) is a trusted proxy: the client is the rightmost
    // untrusted address; the spoofed one on the left is dropped.
    let r = get("6.6.6.6, 198.51.100.4").await.unwrap();
    assert_eq!(r.status(), 200);
    let headers = gw.last_seen().1;
    assert_eq!(headers["x-forwarded-for"], "198.51.100.4, 127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "https");
    // Rate limits count that client, whatever it puts on the left.
    assert_eq!(get("7.7.7.7, 198.51.100.4").await.unwrap().status(), 429);
    assert_eq!(get("198.51.100.5").await.unwrap().status(), 200);
}

#[tokio::test]
async fn balancing_retries_and_outlier_ejection() {
    use gateway::configuration::{HashOn, LbPolicy, UpstreamConfig};
    let (a, b, bad) = (
        instance("a", 200).await,
        instance("b", 200).await,
        instance("bad", 503).await,
    );
    let gw = spawn_full(
        |s| {
            s.routes = vec![
                RouteConfig::prefix("/duo", "duo", AuthPolicy::Anonymous),
                RouteConfig::prefix("/trio", "trio", AuthPolicy::Anonymous),
                RouteConfig::prefix("/sticky", "sticky", AuthPolicy::Anonymous),
                RouteConfig::prefix("/fast", "fast", AuthPolicy::Anonymous),
            ];
            s.upstreams = [
                (
                    "trio".to_owned(),
                    UpstreamConfig {
                        outlier_consecutive_failures: 3,
                        outlier_base_ejection: HumanDuration::secs(60),
                        retry_budget_percent: 100,
                        ..UpstreamConfig::default()
                    },
                ),
                (
                    "sticky".to_owned(),
                    UpstreamConfig {
                        lb: LbPolicy::ConsistentHash,
                        hash_on: Some(HashOn::Header("x-user".into())),
                        ..UpstreamConfig::default()
                    },
                ),
                (
                    "fast".to_owned(),
                    UpstreamConfig {
                        lb: LbPolicy::P2c,
                        ..UpstreamConfig::default()
                    },
                ),
            ]
            .into();
        },
        vec![
            ("duo".into(), format!("{a},{b}")),
            ("trio".into(), format!("{a},{b},{bad}")),
            ("sticky".into(), format!("{a},{b}")),
            ("fast".into(), format!("{a},{b}")),
        ],
    )
    .await;
    let hit = |path: &'static str, user: Option<&str>| {
        let mut req = gw.http.get(format!("{}{path}", gw.url));
        if let Some(u) = user {
            req = req.header("x-user", u);
        }
        async move {
            let r = req.send().await.unwrap();
            (
                r.status().as_u16(),
                r.headers()
                    .get("x-instance")
                    .map(|v| v.to_str().unwrap().to_owned()),
            )
        }
    };
    // Round robin: an even split.
    let mut counts = std::collections::HashMap::new();
    for _ in 0..20 {
        let (status, who) = hit("/duo", None).await;
        assert_eq!(status, 200);
        *counts.entry(who.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(counts["a"], 10);
    assert_eq!(counts["b"], 10);

    // A failing instance: its 503s are retried on another instance (GET is
    // idempotent), so clients see none, and after 3 in a row it is ejected.
    for _ in 0..30 {
        let (status, who) = hit("/trio", None).await;
        assert_eq!(status, 200);
        assert_ne!(who.as_deref(), Some("bad"));
    }
    let upstreams: Value = gw.admin_json("/upstreams").await;
    let trio = upstreams["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["service"] == "trio")
        .unwrap()
        .clone();
    let bad_state = trio["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["url"].as_str().unwrap().starts_with(&bad))
        .unwrap()
        .clone();
    assert_eq!(bad_state["ejected"], true, "{trio}");
    assert_eq!(bad_state["ejections"], 1);
    // A POST is never replayed: the one that lands on the bad instance gets its 503.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(
            gw.http
                .post(format!("{}/trio", gw.url))
                .body("x")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert!(
        statuses.iter().all(|s| *s == 200),
        "the ejected instance got a POST: {statuses:?}"
    );

    // Consistent hashing: a user sticks to one instance; users spread over both. The
    // ring's points hang on the instances' (random) ports, so enough users that all
    // landing on one instance is out of the question (8 did, about once in 100 runs).
    let mut homes = std::collections::HashMap::new();
    for n in 1..=40 {
        let user = format!("u{n}");
        let (_, first) = hit("/sticky", Some(&user)).await;
        for _ in 0..3 {
            assert_eq!(hit("/sticky", Some(&user)).await.1, first, "{user} moved");
        }
        homes.insert(user, first.unwrap());
    }
    let used: std::collections::HashSet<_> = homes.values().collect();
    assert_eq!(used.len(), 2, "{homes:?}");

    // P2C answers from both instances.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..20 {
        seen.insert(hit("/fast", None).await.1.unwrap());
    }
    assert_eq!(seen.len(), 2);
}

/// A policy of `rate` requests a minute per client address.
fn per_minute_by_ip(rate: u32) -> gateway::configuration::RateLimitPolicy {
    gateway::configuration::RateLimitPolicy {
        rate,
        per: HumanDuration::secs(60),
        burst: None,
        key: gateway::configuration::LimitKey::Ip,
        store: Default::default(),
    }
}

/// Sends `bytes` as they are and returns everything the gateway answers.
async fn raw_send(base: &str, bytes: Vec<u8>) -> String {
    let addr = base.trim_start_matches("http://");
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    raw_exchange(stream, bytes).await
}

/// Writes `bytes` on `stream` and reads until the gateway closes it (or 5 s).
async fn raw_exchange(
    mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    bytes: Vec<u8>,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The gateway may answer and close before reading everything sent.
    let _ = stream.write_all(&bytes).await;
    let _ = stream.flush().await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response).into_owned()
}

/// How the raw cases reach the gateway.
enum Over {
    Plain,
    /// HTTP/1.1 (by ALPN) over TLS to this address.
    Tls(String),
}

async fn raw_over(gw: &Gw, over: &Over, bytes: Vec<u8>) -> String {
    match over {
        Over::Plain => raw_send(&gw.url, bytes).await,
        Over::Tls(addr) => raw_exchange(tls_connect(addr, &[b"http/1.1"]).await, bytes).await,
    }
}

/// Request smuggling and protocol abuse over a raw socket: each case with the status
/// it must get, and none of them may reach the upstream.
#[tokio::test]
async fn malformed_and_smuggling_requests_are_refused_before_the_upstream() {
    let gw = spawn().await;
    refuses_malformed_requests(&gw, &Over::Plain).await;
}

/// A TLS listener's HTTP/1.1 is the same strict parser as the plain port's: the
/// whole smuggling corpus, each refusal a problem document.
#[tokio::test]
async fn tls_connections_are_held_to_the_same_strict_http1() {
    let gw = spawn_with(|s| {
        s.listeners = vec![gateway::configuration::ListenerConfig {
            address: "127.0.0.1".into(),
            port: 0,
            tls: Some(gateway::tls::TlsConfig {
                cert_file: key_file("tls-cert.pem"),
                key_file: key_file("tls-key.pem"),
            }),
        }];
    })
    .await;
    let config: Value = gw.admin_json("/config").await;
    let addr = config["listeners"][1]["address"]
        .as_str()
        .unwrap()
        .to_owned();
    let over = Over::Tls(addr.clone());
    refuses_malformed_requests(&gw, &over).await;
    // A refusal is a problem document, as on the plain port.
    let answer = raw_over(
        &gw,
        &over,
        b"POST /open/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
            .to_vec(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(
        answer.contains("content-type: application/problem+json"),
        "{answer}"
    );
    // Keep-alive and pipelining over TLS: three answers on one connection, marked
    // as having come over https.
    let answer = raw_over(
        &gw,
        &over,
        b"GET /open/a HTTP/1.1\r\nHost: gw\r\n\r\n\
          GET /open/b HTTP/1.1\r\nHost: gw\r\n\r\n\
          GET /open/c HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
            .to_vec(),
    )
    .await;
    assert_eq!(answer.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{answer}");
    let (path, headers) = gw.last_seen();
    assert_eq!(path, "/open/c");
    assert_eq!(headers["x-forwarded-proto"], "https");
    // A client that negotiates h2 and then speaks HTTP/1.1 gets no HTTP/1.1 server
    // (which would be a way around the strict one).
    let before = gw.seen_count();
    let answer = raw_exchange(
        tls_connect(&addr, &[b"h2"]).await,
        b"POST /open/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            .to_vec(),
    )
    .await;
    assert!(!answer.contains("HTTP/1.1"), "{answer}");
    assert_eq!(
        gw.seen_count(),
        before,
        "an HTTP/1.1 request on h2 reached the upstream"
    );
}

async fn refuses_malformed_requests(gw: &Gw, over: &Over) {
    let h = "Host: gw\r\n";
    let chunked_over_limit = {
        let chunk = "x".repeat(64 * 1024);
        let mut body = String::new();
        for _ in 0..20 {
            body.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
        }
        body.push_str("0\r\n\r\n");
        format!(
            "POST /open/x HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{body}"
        )
    };
    // Content-Length with Transfer-Encoding, in either order: two framings are how
    // requests are smuggled (RFC 9112 §6.1), so the request is refused with 400 and
    // the connection closed: the request smuggled behind the body is never read.
    for (order, head) in [
        (
            "Content-Length first",
            "Content-Length: 4\r\nTransfer-Encoding: chunked",
        ),
        (
            "Transfer-Encoding first",
            "Transfer-Encoding: chunked\r\nContent-Length: 4",
        ),
    ] {
        let before = gw.seen_count();
        let answer = raw_over(
            gw,
            over,
            format!("POST /open/x HTTP/1.1\r\n{h}{head}\r\n\r\n0\r\n\r\nGET /open/smuggled HTTP/1.1\r\n{h}\r\n").into_bytes(),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{order}: {answer}");
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{order}: {answer}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{order}: {answer}"
        );
        assert_eq!(gw.seen_count(), before, "{order} reached the upstream");
    }
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "two different Content-Lengths",
            format!(
                "POST /open/x HTTP/1.1\r\n{h}Content-Length: 3\r\nContent-Length: 4\r\nConnection: close\r\n\r\nabcd"
            ),
            "400",
        ),
        (
            "invalid Content-Length",
            format!(
                "POST /open/x HTTP/1.1\r\n{h}Content-Length: 4x\r\nConnection: close\r\n\r\nabcd"
            ),
            "400",
        ),
        (
            "invalid chunk size",
            format!(
                "POST /open/x HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
            ),
            "400",
        ),
        (
            "obsolete line folding",
            format!("GET /open/x HTTP/1.1\r\n{h}X-A: a\r\n b\r\nConnection: close\r\n\r\n"),
            "400",
        ),
        (
            "a coding other than chunked last",
            format!(
                "POST /open/x HTTP/1.1\r\n{h}Transfer-Encoding: gzip\r\nConnection: close\r\n\r\nabc"
            ),
            "400",
        ),
        (
            "space before the colon",
            format!("GET /open/x HTTP/1.1\r\n{h}Content-Length : 0\r\nConnection: close\r\n\r\n"),
            "400",
        ),
        (
            "NUL in a header",
            format!("GET /open/x HTTP/1.1\r\n{h}X-A: a\0b\r\nConnection: close\r\n\r\n"),
            "400",
        ),
        (
            "bare CR line ending",
            format!("GET /open/x HTTP/1.1\r{h}Connection: close\r\n\r\n"),
            "400",
        ),
        (
            "URI over the limit",
            format!(
                "GET /open/{} HTTP/1.1\r\n{h}Connection: close\r\n\r\n",
                "a".repeat(9000)
            ),
            "414",
        ),
        (
            "too many headers",
            format!(
                "GET /open/x HTTP/1.1\r\n{h}{}Connection: close\r\n\r\n",
                (0..150)
                    .map(|i| format!("X-H{i}: v\r\n"))
                    .collect::<String>()
            ),
            "431",
        ),
        (
            "oversized header",
            format!(
                "GET /open/x HTTP/1.1\r\n{h}X-Big: {}\r\nConnection: close\r\n\r\n",
                "v".repeat(20_000)
            ),
            "431",
        ),
        (
            "declared body over the limit",
            format!(
                "POST /open/x HTTP/1.1\r\n{h}Content-Length: 2000000\r\nConnection: close\r\n\r\n"
            ),
            "413",
        ),
        ("chunked body over the limit", chunked_over_limit, "413"),
        (
            "two Hosts",
            format!("GET /open/x HTTP/1.1\r\n{h}Host: other\r\nConnection: close\r\n\r\n"),
            "400",
        ),
        (
            "no Host in HTTP/1.1",
            "GET /open/x HTTP/1.1\r\nConnection: close\r\n\r\n".to_owned(),
            "400",
        ),
        (
            "a chunk without its CRLF",
            format!(
                "POST /open/x HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabcX0\r\n\r\n"
            ),
            "400",
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            format!(
                "POST /open/x HTTP/1.0\r\n{h}Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            ),
            "400",
        ),
    ];
    for (name, request, status) in cases {
        let before = gw.seen_count();
        let answer = raw_over(gw, over, request.into_bytes()).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{name}: {answer}"
        );
        assert!(
            !answer.contains("HTTP/1.1 200"),
            "{name}: a smuggled request was answered"
        );
        assert_eq!(gw.seen_count(), before, "{name} reached the upstream");
    }
    // And a well-formed chunked request passes whole.
    let answer = raw_over(
        gw,
        over,
        format!("POST /open/x HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n").into_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// Two gateways sharing the machine's Redis admit together what the policy allows,
/// within 2%, while both are hammered at many times the rate.
#[tokio::test]
async fn two_gateways_sharing_redis_admit_the_configured_rate() {
    let prefix = test_prefix();
    let configure = |s: &mut Settings| {
        with_redis(s, &prefix);
        s.routes = vec![RouteConfig {
            rate_limit: Some("shared".into()),
            ..RouteConfig::prefix("/open", "echo", AuthPolicy::Anonymous)
        }];
        s.rate_limits = [(
            "shared".to_owned(),
            gateway::configuration::RateLimitPolicy {
                rate: 100,
                per: HumanDuration::secs(1),
                burst: Some(10),
                key: gateway::configuration::LimitKey::Route,
                store: gateway::configuration::LimitStore::Redis,
            },
        )]
        .into();
    };
    let (a, b) = (spawn_with(configure).await, spawn_with(configure).await);
    let started = std::time::Instant::now();
    let run_for = Duration::from_secs(3);
    let mut tasks = Vec::new();
    for gw in [&a.url, &b.url] {
        for _ in 0..6 {
            let (http, url) = (reqwest::Client::new(), format!("{gw}/open/x"));
            tasks.push(tokio::spawn(async move {
                let (mut admitted, mut refused) = (0u32, 0u32);
                while started.elapsed() < run_for {
                    match http.get(&url).send().await.unwrap().status().as_u16() {
                        200 => admitted += 1,
                        429 => refused += 1,
                        other => panic!("unexpected {other}"),
                    }
                }
                (admitted, refused)
            }));
        }
    }
    let (mut admitted, mut refused) = (0u32, 0u32);
    for t in tasks {
        let (a, r) = t.await.unwrap();
        admitted += a;
        refused += r;
    }
    let elapsed = started.elapsed().as_secs_f64();
    // The burst at the start, then the rate.
    let expected = 10.0 + 100.0 * elapsed;
    let error = (f64::from(admitted) - expected).abs() / expected;
    assert!(
        refused > admitted,
        "the load never exceeded the limit: {admitted} admitted, {refused} refused"
    );
    assert!(
        error <= 0.02,
        "{admitted} admitted in {elapsed:.2} s, expected {expected:.0} ({:.1}% off)",
        error * 100.0
    );
}

#[tokio::test]
async fn cors_preflights_are_answered_by_the_gateway_and_grants_added_for_allowed_origins() {
    // An upstream whose answers vary by encoding already.
    let varied =
        chassis::testing::serve(axum::Router::new().fallback(axum::routing::any(|| async {
            ([("vary", "accept-encoding")], "v")
        })))
        .await;
    let gw = spawn_full(
        |s| {
            s.routes = vec![
                RouteConfig {
                    cors: Some("shop".into()),
                    methods: vec!["GET".into(), "POST".into()],
                    ..RouteConfig::prefix("/private", "echo", AuthPolicy::Required)
                },
                RouteConfig {
                    cors: Some("shop".into()),
                    ..RouteConfig::prefix("/varied", "varied", AuthPolicy::Anonymous)
                },
                RouteConfig {
                    methods: vec!["GET".into()],
                    ..RouteConfig::prefix("/open", "echo", AuthPolicy::Anonymous)
                },
            ];
            s.cors = [(
                "shop".to_owned(),
                gateway::cors::CorsPolicy {
                    allow_origins: vec!["https://shop.example.com".into()],
                    allow_credentials: true,
                    ..Default::default()
                },
            )]
            .into();
        },
        vec![("varied".into(), varied)],
    )
    .await;
    let before = gw.seen_count();
    // A preflight-shaped request to a route without CORS is an OPTIONS like any
    // other: refused by the route's methods, not routed as the one it announces.
    let r = gw
        .http
        .request(reqwest::Method::OPTIONS, format!("{}/open/x", gw.url))
        .header("origin", "https://shop.example.com")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert!(r.headers()["allow"].to_str().unwrap().contains("GET"));
    assert_eq!(gw.seen_count(), before);
    // The grants' `Vary: origin` joins the upstream's own `Vary`.
    let r = gw
        .http
        .get(format!("{}/varied/x", gw.url))
        .header("origin", "https://shop.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let vary: Vec<String> = r
        .headers()
        .get_all("vary")
        .iter()
        .map(|v| v.to_str().unwrap().to_ascii_lowercase())
        .collect();
    assert!(
        vary.iter().any(|v| v.contains("accept-encoding")),
        "{vary:?}"
    );
    assert!(vary.iter().any(|v| v.contains("origin")), "{vary:?}");
    let preflight = |origin: &'static str, method: &'static str| {
        gw.http
            .request(reqwest::Method::OPTIONS, format!("{}/private/y", gw.url))
            .header("origin", origin)
            .header("access-control-request-method", method)
            .header("access-control-request-headers", "authorization")
            .send()
    };
    let r = preflight("https://shop.example.com", "POST").await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://shop.example.com"
    );
    assert_eq!(r.headers()["access-control-allow-credentials"], "true");
    assert!(
        r.headers()["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );
    assert_eq!(
        preflight("https://evil.example.com", "POST")
            .await
            .unwrap()
            .status(),
        403
    );
    // A method the route does not take gets the route's 405, preflight or not.
    assert_eq!(
        preflight("https://shop.example.com", "TRACE")
            .await
            .unwrap()
            .status(),
        405
    );
    // Preflights carry no credentials and never reach the upstream.
    assert_eq!(gw.seen_count(), before);

    // The actual request: grants for the allowed origin, on success and on a 401.
    let token = gw.users.token("user-1");
    let r = gw
        .http
        .get(format!("{}/private/y", gw.url))
        .bearer_auth(&token)
        .header("origin", "https://shop.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://shop.example.com"
    );
    assert!(
        r.headers()["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .contains("x-correlation-id")
    );
    let r = gw
        .http
        .get(format!("{}/private/y", gw.url))
        .header("origin", "https://shop.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://shop.example.com"
    );
    let r = gw
        .http
        .get(format!("{}/private/y", gw.url))
        .bearer_auth(&token)
        .header("origin", "https://evil.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

/// A gateway whose Redis is down starts, and its Redis-backed limits do what
/// `redis_fallback` says: count locally, admit all, or refuse with 503.
#[tokio::test]
async fn redis_limits_fall_back_as_configured_while_redis_is_down() {
    use gateway::configuration::{LimitKey, LimitStore, RateLimitPolicy, RedisFallback};
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gateway_with = |fallback: RedisFallback| {
        spawn_with(move |s| {
            s.redis_url = Some(format!("redis://{closed}").into());
            s.redis_fallback = fallback;
            s.routes = vec![RouteConfig {
                rate_limit: Some("shared".into()),
                ..RouteConfig::prefix("/open", "echo", AuthPolicy::Anonymous)
            }];
            s.rate_limits = [(
                "shared".to_owned(),
                RateLimitPolicy {
                    rate: 2,
                    per: HumanDuration::secs(60),
                    burst: Some(2),
                    key: LimitKey::Route,
                    store: LimitStore::Redis,
                },
            )]
            .into();
        })
    };
    let local = gateway_with(RedisFallback::Local).await;
    assert_eq!(local.statuses("/open/x", 4).await, [200, 200, 429, 429]);
    let allow = gateway_with(RedisFallback::Allow).await;
    assert_eq!(allow.statuses("/open/x", 4).await, [200, 200, 200, 200]);
    let deny = gateway_with(RedisFallback::Deny).await;
    assert_eq!(deny.statuses("/open/x", 4).await, [503, 503, 503, 503]);
    assert_eq!(
        deny.seen_count(),
        0,
        "a denied request reached the upstream"
    );
    let metrics = local
        .http
        .get(format!("{}/metrics", local.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("bazaar_gateway_ratelimit_store_errors_total{service=\"gateway\"} 4"),
        "{metrics}"
    );
}

/// A route's `retries` replaces its upstream's: with none, a request that met the
/// dead instance fails; with one, it is sent again to the live one.
#[tokio::test]
async fn a_routes_retries_override_its_upstreams() {
    let live = instance("live", 200).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = spawn_full(
        |s| {
            s.routes = vec![
                RouteConfig {
                    retries: Some(0),
                    ..RouteConfig::prefix("/once", "pair", AuthPolicy::Anonymous)
                },
                RouteConfig {
                    retries: Some(1),
                    ..RouteConfig::prefix("/twice", "pair", AuthPolicy::Anonymous)
                },
            ];
            s.upstreams = [(
                "pair".to_owned(),
                gateway::configuration::UpstreamConfig {
                    retries: 3,
                    retry_budget_percent: 100,
                    outlier_consecutive_failures: 1000,
                    ..Default::default()
                },
            )]
            .into();
        },
        vec![("pair".into(), format!("{live},http://{dead}"))],
    )
    .await;
    let once = gw.statuses("/once/x", 4).await;
    let twice = gw.statuses("/twice/x", 4).await;
    assert!(once.contains(&502), "{once:?}");
    assert!(twice.iter().all(|s| *s == 200), "{twice:?}");
    // A POST is not idempotent, but a connect that failed sent nothing, and the
    // buffered body goes to the live instance instead.
    for _ in 0..4 {
        let r = gw
            .http
            .post(format!("{}/twice/x", gw.url))
            .body("{\"n\":1}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
}

/// Sends GET `path` over `io` with HTTP/2 (`h2`) or HTTP/1.1; the status and the body.
async fn get_over<IO>(io: IO, h2: bool, path: &str) -> (u16, String)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::BodyExt;
    let io = hyper_util::rt::TokioIo::new(io);
    let request = http::Request::get(path)
        .header("host", "localhost")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = if h2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .unwrap();
        tokio::spawn(connection);
        sender.send_request(request).await.unwrap()
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(connection);
        sender.send_request(request).await.unwrap()
    };
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A TLS client trusting the test CA, offering `alpn`.
async fn tls_connect(
    addr: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls_pki_types::pem::PemObject;
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_file(key_file("tls-ca.pem")).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

/// A TLS listener negotiates HTTP/2 or HTTP/1.1 through ALPN, tells the upstream the
/// request came over https, and serves a renewed certificate without a restart; the
/// plain port speaks h2c.
#[tokio::test]
async fn tls_listeners_negotiate_h2_and_reload_renewed_certificates() {
    let dir = std::env::temp_dir().join(format!("gw-tls-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::copy(key_file("tls-cert.pem"), &cert).unwrap();
    std::fs::copy(key_file("tls-key.pem"), &key).unwrap();
    let tls = gateway::tls::TlsConfig {
        cert_file: cert.clone(),
        key_file: key,
    };
    let gw = spawn_with(|s| {
        s.listeners = vec![gateway::configuration::ListenerConfig {
            address: "127.0.0.1".into(),
            port: 0,
            tls: Some(tls),
        }];
    })
    .await;
    let config: Value = gw.admin_json("/config").await;
    assert_eq!(config["listeners"][1]["tls"], true, "{config}");
    let addr = config["listeners"][1]["address"]
        .as_str()
        .unwrap()
        .to_owned();

    let stream = tls_connect(&addr, &[b"h2", b"http/1.1"]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(get_over(stream, true, "/open/tls").await.0, 200);
    let (_, headers) = gw.last_seen();
    assert_eq!(headers["x-forwarded-proto"], "https");

    let stream = tls_connect(&addr, &[b"http/1.1"]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(get_over(stream, false, "/open/tls1").await.0, 200);

    // h2c with prior knowledge on the plain port.
    let plain = tokio::net::TcpStream::connect(gw.url.trim_start_matches("http://"))
        .await
        .unwrap();
    assert_eq!(get_over(plain, true, "/open/h2c").await.0, 200);
    let (_, headers) = gw.last_seen();
    assert_eq!(headers["x-forwarded-proto"], "http");

    // A renewed certificate is served within the watch interval.
    let renewed = std::fs::read(key_file("tls-cert-2.pem")).unwrap();
    let renewed_der = {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(&renewed)
            .unwrap()
            .to_vec()
    };
    std::fs::write(&cert, &renewed).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stream = tls_connect(&addr, &[b"h2"]).await;
        let served = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        if served == renewed_der {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the renewed certificate was not served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// An HTTP/2 connection with no stream open for `h2_idle_timeout` is closed (GOAWAY),
/// counted from its last stream's end; a stream running longer than the timeout
/// keeps it open.
#[tokio::test]
async fn idle_http2_connections_are_closed_and_busy_ones_kept() {
    let gw = spawn_with(|s| {
        s.h2_idle_timeout = HumanDuration::millis(400);
        s.upstream_timeout = HumanDuration::secs(10);
    })
    .await;
    let tcp = tokio::net::TcpStream::connect(gw.url.trim_start_matches("http://"))
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let ended = tokio::spawn(connection);
    // /slow answers after 3 s: far past the idle timeout, with its stream open.
    let request = http::Request::get("/slow")
        .header("host", "localhost")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], b"late");
    assert!(!ended.is_finished(), "closed while a stream was open");
    let answered = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), ended)
        .await
        .expect("an idle HTTP/2 connection stayed open")
        .unwrap()
        .unwrap();
    assert!(
        answered.elapsed() >= Duration::from_millis(300),
        "closed {:?} after its last stream, before the idle timeout",
        answered.elapsed()
    );
}

/// An aggregating route asks its parts in parallel, merges their JSON, and marks a
/// part that failed or ran over its deadline instead of failing the whole, unless the
/// part is required.
#[tokio::test]
async fn aggregation_merges_parts_and_marks_the_missing_ones() {
    use axum::extract::{Path, Query};
    use axum::routing::get;
    use gateway::configuration::AggregatePart;
    use std::collections::HashMap;
    let catalog = chassis::testing::serve(axum::Router::new().route(
        "/products/{id}",
        get(
            |Path(id): Path<String>,
             Query(q): Query<HashMap<String, String>>,
             headers: http::HeaderMap| async move {
                axum::Json(json!({
                    "id": id,
                    "lang": q.get("lang"),
                    "identified": headers.contains_key("x-bazaar-identity"),
                }))
            },
        ),
    ))
    .await;
    let stock = chassis::testing::serve(axum::Router::new().route(
        "/stock/{id}",
        get(|Path(id): Path<String>| async move { axum::Json(json!({ "sku": id, "qty": 3 })) }),
    ))
    .await;
    let slow = chassis::testing::serve(axum::Router::new().fallback(get(|| async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        axum::Json(json!({ "late": true }))
    })))
    .await;
    let broken = instance("broken", 500).await;
    let part = |service: &str, path: &str, key: Option<&str>| AggregatePart {
        service: service.into(),
        path: path.into(),
        key: key.map(str::to_owned),
        timeout: Some(HumanDuration::millis(300)),
        required: false,
    };
    let route = |template: &str, parts: Vec<AggregatePart>| RouteConfig {
        template: Some(template.into()),
        methods: vec!["GET".into()],
        aggregate: parts,
        auth: AuthPolicy::Optional,
        ..RouteConfig::default()
    };
    let gw = spawn_full(
        |s| {
            s.upstream_timeout = HumanDuration::secs(5);
            s.routes = vec![
                route(
                    "/storefront/{id}",
                    vec![
                        part("catalog", "/products/{id}", None),
                        part("stock", "/stock/{id}", Some("stock")),
                        part("slow", "/reviews/{id}", Some("reviews")),
                        part("broken", "/extra", Some("extra")),
                    ],
                ),
                route(
                    "/strict/{id}",
                    vec![
                        part("catalog", "/products/{id}", None),
                        AggregatePart {
                            required: true,
                            ..part("slow", "/reviews/{id}", Some("reviews"))
                        },
                    ],
                ),
                route(
                    "/hopeless/{id}",
                    vec![
                        part("slow", "/reviews/{id}", Some("reviews")),
                        part("broken", "/extra", Some("extra")),
                    ],
                ),
            ];
        },
        vec![
            ("catalog".into(), catalog),
            ("stock".into(), stock),
            ("slow".into(), slow),
            ("broken".into(), broken),
        ],
    )
    .await;
    let started = std::time::Instant::now();
    let r = gw
        .http
        .get(format!("{}/storefront/p-1?lang=fr", gw.url))
        .bearer_auth(gw.users.token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["bazaar-completed"], "false");
    let body: Value = r.json().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "the parts were not asked in parallel under their deadlines"
    );
    assert_eq!(
        body,
        json!({
            "id": "p-1", "lang": "fr", "identified": true,
            "stock": { "sku": "p-1", "qty": 3 },
            "reviews": null, "extra": null,
            "_missing": ["reviews", "extra"],
        })
    );

    let r = gw.get("/strict/p-1").await;
    assert_eq!(r.status(), 504);
    let r = gw.get("/hopeless/p-1").await;
    assert_eq!(r.status(), 502);

    // Aggregating routes are checked when the configuration loads.
    let errors = gateway::configuration::validate_routes(&[
        RouteConfig {
            methods: vec!["POST".into()],
            ..route(
                "/a/{id}",
                vec![part("catalog", "/p/{other}", Some("_missing"))],
            )
        },
        RouteConfig {
            service: "catalog".into(),
            ..route("/b", vec![part("catalog", "/p", None)])
        },
    ]);
    let all = errors.join("\n");
    for expected in [
        "takes GET",
        "does not capture",
        "`_missing` must be non-empty, unique and not `_missing`",
        "not both",
    ] {
        assert!(all.contains(expected), "{expected} in:\n{all}");
    }
}

/// wrk's totals: requests, and every failure it counts (non-2xx/3xx answers and
/// the socket errors of its `Socket errors: connect N, read N, write N, timeout N`
/// line, which it prints only when there are some).
fn wrk_totals(out: &str) -> (u64, u64) {
    let numbers = |line: &str| -> Vec<u64> {
        line.split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect()
    };
    // The part of the line after `marker` (so `2xx` in a label counts for nothing).
    let line = |marker: &str| {
        out.lines()
            .find_map(|l| l.split_once(marker).map(|(_, rest)| rest))
            .unwrap_or("")
    };
    let requests = out
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| numbers(l).first().copied())
        .unwrap_or(0);
    let failed = numbers(line("Socket errors:")).iter().sum::<u64>()
        + numbers(line("Non-2xx or 3xx responses:"))
            .iter()
            .sum::<u64>();
    (requests, failed)
}

#[test]
fn wrk_totals_count_every_failure() {
    let clean = "Running 4s test @ http://127.0.0.1:1/open/x\n  1 threads and 8 connections\n  Thread Stats   Avg\n  12345 requests in 4.00s, 1.20MB read\nRequests/sec:   3086.25\n";
    assert_eq!(wrk_totals(clean), (12345, 0));
    let failing = format!(
        "{clean}  Socket errors: connect 1, read 2, write 3, timeout 4\n  Non-2xx or 3xx responses: 5\n"
    );
    assert_eq!(wrk_totals(&failing), (12345, 15));
}

/// Ten configuration changes while clients keep sending: not one request fails, and
/// the last configuration is the one serving. The load is wrk (the tool;
/// CI installs it) beside 16 in-test clients that check every answer; without wrk on
/// the machine, the in-test clients alone.
#[tokio::test]
async fn ten_reloads_under_load_fail_no_request() {
    let dir = std::env::temp_dir().join(format!("gw-load-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gateway.toml");
    let version = |n: u32| {
        // Each version changes the route table (a route more) and the answers.
        let mut text = format!(
            "[[routes]]\nprefix = \"/open\"\nservice = \"echo\"\nresponse_headers = {{ set = {{ \"x-config\" = \"{n}\" }} }}\n"
        );
        for i in 0..n {
            text.push_str(&format!(
                "[[routes]]\nprefix = \"/extra{i}\"\nservice = \"echo\"\n"
            ));
        }
        text
    };
    // Written whole and renamed into place, as deployment tools do.
    let write = |n: u32| {
        let tmp = dir.join("gateway.toml.tmp");
        std::fs::write(&tmp, version(n)).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    write(0);
    // The harness's 300 ms upstream deadline is for tests of timeouts; here a
    // starved machine (other tests run beside this one) must not pass for a reload
    // that failed a request.
    let gw = spawn_with(|s| {
        s.config_file = Some(file.clone());
        s.upstream_timeout = HumanDuration::secs(5);
    })
    .await;
    let wrk = ["/usr/bin/wrk", "/usr/local/bin/wrk"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .map(|bin| {
            tokio::process::Command::new(bin)
                .args(["-t1", "-c8", "-d4s", "--timeout", "10s"])
                .arg(format!("{}/open/x", gw.url))
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap()
        });
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (http, url, stop) = (gw.http.clone(), format!("{}/open/x", gw.url), stop.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u32, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match http.get(&url).send().await {
                        Ok(r) if r.status() == 200 => ok += 1,
                        Ok(r) => failed.push(r.status().to_string()),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    for n in 1..=10 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        write(n);
        // Half the changes are picked up by the watcher, half by the admin call.
        if n % 2 == 0 {
            let r = gw
                .http
                .post(format!("{}/reload", gw.admin))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = gw.get("/open/x").await;
        if r.headers().get("x-config").is_some_and(|v| v == "10") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the last change never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for c in clients {
        let (o, f) = c.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 500, "too little load to mean anything: {ok} requests");
    if let Some(wrk) = wrk {
        let out = wrk.wait_with_output().await.unwrap();
        let out = String::from_utf8_lossy(&out.stdout);
        let (requests, failed) = wrk_totals(&out);
        assert_eq!(failed, 0, "wrk saw failures:\n{out}");
        assert!(
            requests > 500,
            "too little wrk load to mean anything:\n{out}"
        );
    }
    let config: Value = gw.admin_json("/config").await;
    assert!(config["version"].as_u64().unwrap() >= 6, "{config}");
    assert_eq!(config["routes"], 11);
    let _ = std::fs::remove_dir_all(dir);
}

/// `/metrics` on the public port answers scrapers on the gateway's host only; the
/// admin API serves it to the rest. Needs an address besides loopback (most
/// machines have one; without, the remote half cannot be observed and is skipped).
#[tokio::test]
async fn public_metrics_are_for_this_host_only() {
    let gw = spawn_with(|s| {
        s.listeners = vec![gateway::configuration::ListenerConfig {
            address: "0.0.0.0".into(),
            port: 0,
            tls: None,
        }];
    })
    .await;
    let local = gw.get("/metrics").await;
    assert_eq!(local.status(), 200);
    let admin = gw
        .http
        .get(format!("{}/metrics", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 200);
    assert!(
        admin
            .text()
            .await
            .unwrap()
            .contains("bazaar_gateway_config_version")
    );
    // This host's address on its outward interface (a UDP connect sends nothing).
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    let outward = probe
        .connect("192.0.2.1:9")
        .and_then(|()| probe.local_addr())
        .map(|a| a.ip())
        .ok()
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified());
    let Some(ip) = outward else {
        eprintln!("no address besides loopback: the remote half is skipped");
        return;
    };
    let port = gw.admin_json("/config").await["listeners"][1]["address"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    let base = format!("http://{ip}:{port}");
    let remote = gw.http.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(remote.status(), 404);
    let proxied = gw.http.get(format!("{base}/open/x")).send().await.unwrap();
    assert_eq!(proxied.status(), 200);
}

/// The request's deadline cuts an upstream call short: the client gets the 504 of
/// an upstream timeout (not the bare timeout of a request dropped midway), no time
/// is spent on another instance, and the cut attempt leaves the instance as it
/// found it: nothing outstanding, no failure counted towards its ejection (a
/// client's short deadline must not get instances ejected).
#[tokio::test]
async fn a_request_deadline_ends_the_upstream_call_as_a_504_and_leaves_no_trace() {
    use gateway::configuration::UpstreamConfig;
    let hang = || {
        chassis::testing::serve(axum::Router::new().fallback(axum::routing::any(|| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            "late"
        })))
    };
    let (first, second) = (hang().await, hang().await);
    let gw = spawn_full(
        |s| {
            s.upstream_timeout = HumanDuration::secs(5);
            s.routes = vec![RouteConfig::prefix("/hang", "hang", AuthPolicy::Anonymous)];
            s.upstreams = [(
                "hang".to_owned(),
                UpstreamConfig {
                    outlier_consecutive_failures: 1,
                    retry_budget_percent: 100,
                    ..UpstreamConfig::default()
                },
            )]
            .into();
        },
        vec![("hang".into(), format!("{first},{second}"))],
    )
    .await;
    // The admin API lists a service's instances before any request reached them.
    let before: Value = gw.admin_json("/upstreams").await;
    let listed = before["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["service"] == "hang")
        .map(|u| u["instances"].as_array().unwrap().len());
    assert_eq!(listed, Some(2), "{before}");
    for _ in 0..2 {
        let started = std::time::Instant::now();
        let r = gw
            .http
            .get(format!("{}/hang/x", gw.url))
            .header("x-bazaar-deadline", "300")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 504);
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "answered after {:?}",
            started.elapsed()
        );
    }
    let upstreams: Value = gw.admin_json("/upstreams").await;
    let hang = upstreams["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["service"] == "hang")
        .unwrap()
        .clone();
    let instances = hang["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 2, "{hang}");
    for i in instances {
        assert_eq!(i["outstanding"], 0, "{hang}");
        assert_eq!(i["ejected"], false, "{hang}");
        assert_eq!(i["consecutive_failures"], 0, "{hang}");
    }
}

/// A limit keyed by address counts requests before their credentials are checked:
/// a client spraying bad tokens is limited like any other, and the limit's answer
/// comes before any signature check.
#[tokio::test]
async fn an_address_limit_counts_requests_before_their_credentials() {
    let gw = spawn_with(|s| {
        s.routes = vec![RouteConfig {
            rate_limit: Some("two".into()),
            ..RouteConfig::prefix("/private", "echo", AuthPolicy::Required)
        }];
        s.rate_limits = [("two".to_owned(), per_minute_by_ip(2))].into();
    })
    .await;
    let bad = |token: &'static str| {
        gw.http
            .get(format!("{}/private/x", gw.url))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(bad("not-a-token").await.unwrap().status(), 401);
    assert_eq!(bad("still.not.one").await.unwrap().status(), 401);
    let r = bad("nor-this").await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    // A valid token from the same address is over the limit too.
    let r = gw
        .http
        .get(format!("{}/private/x", gw.url))
        .bearer_auth(gw.users.token("user-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(gw.seen_count(), 0);
}
