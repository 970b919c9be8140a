//! The bad-input table: through the gateway of a running shop, each case gets its
//! 4xx problem document, and nothing is written.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use support::Shop;

#[derive(Clone, Copy)]
enum Auth {
    None,
    Fresh,
    Expired,
    ForeignKey,
    AlgNone,
}

enum Body {
    Json(Value),
    Raw(&'static str, String),
    Empty,
}

struct Case {
    name: &'static str,
    method: &'static str,
    path: String,
    auth: Auth,
    body: Body,
    idempotency_key: Option<&'static str>,
    status: u16,
}

fn case(
    name: &'static str,
    method: &'static str,
    path: &str,
    auth: Auth,
    body: Body,
    status: u16,
) -> Case {
    Case {
        name,
        method,
        path: path.to_owned(),
        auth,
        body,
        idempotency_key: None,
        status,
    }
}

#[tokio::test]
async fn every_bad_input_is_a_clear_4xx_and_writes_nothing() {
    // Short-lived tokens and no leeway, so an expired token can be had in seconds.
    let shop = Shop::up(
        "processes",
        &[
            ("BAZAAR_USERS__TOKEN_TTL", "2s"),
            ("BAZAAR_GATEWAY__AUTH__LEEWAY", "0s"),
        ],
    );
    let products = shop.product_ids(2).await;
    let email = format!("{}@example.com", uuid::Uuid::new_v4().simple());
    let (status, _) = shop
        .post(
            "/users",
            None,
            json!({"email": email, "name": "Bad", "password": "password123"}),
        )
        .await;
    assert_eq!(status, 201);
    let expired = shop.login(&email).await;
    // Someone else's order, and one order of ours placed with an idempotency key.
    let (_, other_token) = shop.user().await;
    let line = |q: Value| json!({"items": [{"product_id": products[0], "quantity": q}]});
    let (status, others) = shop
        .post("/orders", Some(&other_token), line(json!(1)))
        .await;
    assert_eq!(status, 201);
    let token = shop.login(&email).await;
    let first = shop
        .http
        .post(format!("{}/orders", shop.gateway))
        .bearer_auth(&token)
        .header("idempotency-key", "key-1")
        .json(&line(json!(1)))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 201);
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let foreign = {
        let key = chassis::jwt::SigningKey::generate().unwrap();
        let now = chassis::jwt::now_secs();
        key.sign(&json!({"iss": "bazaar-users", "aud": "bazaar", "sub": "x", "exp": now + 600}))
            .unwrap()
    };
    let alg_none = {
        let parts: Vec<&str> = token.split('.').collect();
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        format!("{header}.{}.", parts[1])
    };
    let unused_email = format!("{}@example.com", uuid::Uuid::new_v4().simple());
    let many: Vec<Value> = (0..10_000)
        .map(|_| json!({"product_id": products[0], "quantity": 1}))
        .collect();
    let big = "x".repeat(2 * 1024 * 1024);

    let mut cases = vec![
        case(
            "malformed JSON",
            "POST",
            "/orders",
            Auth::Fresh,
            Body::Raw("application/json", "{\"items\": [".into()),
            400,
        ),
        case(
            "wrong content type",
            "POST",
            "/orders",
            Auth::Fresh,
            Body::Raw("text/plain", "items".into()),
            415,
        ),
        case(
            "no content type",
            "POST",
            "/orders",
            Auth::Fresh,
            Body::Empty,
            415,
        ),
        case(
            "oversized body",
            "POST",
            "/orders",
            Auth::Fresh,
            Body::Raw("application/json", format!("{{\"items\": \"{big}\"}}")),
            413,
        ),
        case(
            "missing fields",
            "POST",
            "/orders",
            Auth::Fresh,
            Body::Json(json!({})),
            422,
        ),
        case(
            "items not a list",
            "POST",
            "/orders",
            Auth::Fresh,
            Body::Json(json!({"items": 3})),
            422,
        ),
        case(
            "empty order",
            "POST",
            "/orders",
            Auth::Fresh,
            Body::Json(json!({"items": []})),
            422,
        ),
        case(
            "unknown product",
            "POST",
            "/orders",
            Auth::Fresh,
            Body::Json(json!({"items": [{"product_id": uuid::Uuid::now_v7(), "quantity": 1}]})),
            422,
        ),
        case(
            "product id not a UUID",
            "POST",
            "/orders",
            Auth::Fresh,
            Body::Json(json!({"items": [{"product_id": "abc", "quantity": 1}]})),
            422,
        ),
        case(
            "quantity 0",
            "POST",
            "/orders",
            Auth::Fresh,
            Body::Json(line(json!(0))),
            422,
        ),
        case(
            "negative quantity",
            "POST",
            "/orders",
            Auth::Fresh,
            Body::Json(line(json!(-3))),
            422,
        ),
        case(
            "huge quantity",
            "POST",
            "/orders",
            Auth::Fresh,
            Body::Json(line(json!(1_000_000_000))),
            422,
        ),
        case(
            "quantity beyond i64",
            "POST",
            "/orders",
            Auth::Fresh,
            Body::Raw(
                "application/json",
                format!(
                    "{{\"items\": [{{\"product_id\": \"{}\", \"quantity\": 99999999999999999999999}}]}}",
                    products[0]
                ),
            ),
            422,
        ),
        case(
            "fractional quantity",
            "POST",
            "/orders",
            Auth::Fresh,
            Body::Json(line(json!(1.5))),
            422,
        ),
        case(
            "10,000 line items",
            "POST",
            "/orders",
            Auth::Fresh,
            Body::Json(json!({"items": many})),
            422,
        ),
        case(
            "invalid UUID in a path",
            "GET",
            "/orders/not-a-uuid",
            Auth::Fresh,
            Body::Empty,
            400,
        ),
        case(
            "missing token",
            "POST",
            "/orders",
            Auth::None,
            Body::Json(line(json!(1))),
            401,
        ),
        case(
            "expired token",
            "POST",
            "/orders",
            Auth::Expired,
            Body::Json(line(json!(1))),
            401,
        ),
        case(
            "token signed by another key",
            "POST",
            "/orders",
            Auth::ForeignKey,
            Body::Json(line(json!(1))),
            401,
        ),
        case(
            "alg none",
            "POST",
            "/orders",
            Auth::AlgNone,
            Body::Json(line(json!(1))),
            401,
        ),
        case(
            "another user's order",
            "GET",
            &format!("/orders/{}", others["id"].as_str().unwrap()),
            Auth::Fresh,
            Body::Empty,
            404,
        ),
        case(
            "invalid e-mail and short password",
            "POST",
            "/users",
            Auth::None,
            Body::Json(json!({"email": "not-an-email", "name": "X", "password": "short"})),
            422,
        ),
        case(
            "valid e-mail, short password",
            "POST",
            "/users",
            Auth::None,
            Body::Json(json!({"email": unused_email, "name": "Short", "password": "short"})),
            422,
        ),
        case(
            "duplicate e-mail",
            "POST",
            "/users",
            Auth::None,
            Body::Json(json!({"email": email, "name": "Again", "password": "password123"})),
            409,
        ),
        case(
            "unknown user login",
            "POST",
            "/auth/login",
            Auth::None,
            Body::Json(json!({"email": "nobody@example.com", "password": "password123"})),
            401,
        ),
        case(
            "products limit out of range",
            "GET",
            "/products?limit=1000",
            Auth::None,
            Body::Empty,
            422,
        ),
        case(
            "product id not a UUID",
            "GET",
            "/products/123",
            Auth::None,
            Body::Empty,
            400,
        ),
    ];
    let mut reused = case(
        "idempotency key reused with another body",
        "POST",
        "/orders",
        Auth::Fresh,
        Body::Json(line(json!(2))),
        422,
    );
    reused.idempotency_key = Some("key-1");
    cases.push(reused);

    for case in cases {
        let fresh = shop.login(&email).await;
        // Not pooled: a server answers an oversized body early and closes the
        // connection, which must not be reused for the next request.
        let mut req = shop
            .http
            .request(
                case.method.parse().unwrap(),
                format!("{}{}", shop.gateway, case.path),
            )
            .header("connection", "close");
        let bearer = match case.auth {
            Auth::None => None,
            Auth::Fresh => Some(fresh.clone()),
            Auth::Expired => Some(expired.clone()),
            Auth::ForeignKey => Some(foreign.clone()),
            Auth::AlgNone => Some(alg_none.clone()),
        };
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        if let Some(k) = case.idempotency_key {
            req = req.header("idempotency-key", k);
        }
        req = match case.body {
            Body::Json(v) => req.json(&v),
            Body::Raw(ct, text) => req.header("content-type", ct).body(text),
            Body::Empty => req,
        };
        let response = req.send().await.unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned());
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(status, case.status, "{}: {body}", case.name);
        assert_eq!(
            content_type.as_deref(),
            Some("application/problem+json"),
            "{}",
            case.name
        );
        assert_eq!(body["status"], case.status, "{}", case.name);
        assert!(
            body["title"].is_string() && body["type"].is_string(),
            "{}: {body}",
            case.name
        );

        // Nothing was written: still exactly the one order placed before the table.
        let (_, mine) = shop.get("/orders?limit=100", Some(&fresh)).await;
        assert_eq!(
            mine["items"].as_array().unwrap().len(),
            1,
            "{} wrote an order",
            case.name
        );
    }
    // The refused sign-up wrote nothing: its address is still free.
    let (status, _) = shop
        .post(
            "/users",
            None,
            json!({"email": unused_email, "name": "Later", "password": "password123"}),
        )
        .await;
    assert_eq!(status, 201);
}
