//! The gateway's HTTP cache (RFC 9111) in front of a programmable origin, on real
//! ports: what is stored, for how long, for whom, and how many calls reach the origin.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use chassis::config::HumanDuration;
use common::*;
use gateway::configuration::{AuthenticatedCaching, CachePolicy, CacheStore};
use gateway::{AuthPolicy, RouteConfig, Settings};
use serde_json::{Value, json};

/// An origin whose answers the query string shapes: `cc` (Cache-Control), `etag`,
/// `vary`, `status`, `delay` (ms), `size` (body padding), `cookie`. It counts calls
/// per URI and answers 503 to everything while `down`.
#[derive(Default)]
struct Origin {
    calls: Mutex<HashMap<String, usize>>,
    conditional: Mutex<Vec<String>>,
    down: AtomicBool,
}

impl Origin {
    fn calls(&self, uri: &str) -> usize {
        self.calls.lock().unwrap().get(uri).copied().unwrap_or(0)
    }
}

async fn origin(state: Arc<Origin>) -> String {
    let app = Router::new().fallback(any(move |req: Request| {
        let state = state.clone();
        async move { answer(&state, req).await }
    }));
    chassis::testing::serve(app).await
}

async fn answer(state: &Origin, req: Request) -> Response {
    let uri = req.uri().to_string();
    let n = {
        let mut calls = state.calls.lock().unwrap();
        let n = calls.entry(uri.clone()).or_default();
        *n += 1;
        *n
    };
    if state.down.load(Ordering::SeqCst) {
        return (http::StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
    }
    let q: HashMap<&str, &str> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|p| p.split_once('='))
        .collect();
    if let Some(ms) = q.get("delay") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
    }
    let mut response = http::Response::builder();
    if let Some(cc) = q.get("cc") {
        response = response.header("cache-control", *cc);
    }
    if let Some(v) = q.get("vary") {
        response = response.header("vary", *v);
    }
    if q.contains_key("cookie") {
        response = response.header("set-cookie", "session=1");
    }
    if let Some(tag) = q.get("etag") {
        let etag = format!("\"{tag}\"");
        response = response.header("etag", &etag);
        if let Some(inm) = req.headers().get("if-none-match") {
            state.conditional.lock().unwrap().push(uri.clone());
            if inm.to_str().unwrap() == etag {
                return response
                    .status(304)
                    .body(axum::body::Body::empty())
                    .unwrap();
            }
        }
    }
    let status: u16 = q.get("status").map_or(200, |s| s.parse().unwrap());
    let lang = req
        .headers()
        .get("accept-language")
        .map(|v| v.to_str().unwrap().to_owned());
    let size: usize = q.get("size").map_or(0, |s| s.parse().unwrap());
    let body = json!({ "n": n, "uri": uri, "lang": lang, "pad": "x".repeat(size) });
    response
        .status(status)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body.to_string()))
        .unwrap()
}

struct Shop {
    gw: Gw,
    origin: Arc<Origin>,
}

/// A gateway caching `/c` (anonymous), `/never`, `/shared` and `/mine` (tokens
/// required, with each `authenticated` setting) and `/small` (1 KB objects at most).
async fn shop(adjust: impl FnOnce(&mut Settings)) -> Shop {
    let state = Arc::new(Origin::default());
    let url = origin(state.clone()).await;
    let cached = |prefix: &str, auth: AuthPolicy, policy: &str| RouteConfig {
        cache: Some(policy.to_owned()),
        ..RouteConfig::prefix(prefix, "origin", auth)
    };
    let policy = |authenticated, max_object_bytes| CachePolicy {
        stale_if_error: HumanDuration::secs(30),
        authenticated,
        max_object_bytes,
        ..CachePolicy::default()
    };
    let gw = spawn_full(
        |s| {
            s.upstream_timeout = HumanDuration::secs(5);
            s.routes = vec![
                cached("/c", AuthPolicy::Anonymous, "anonymous"),
                cached("/never", AuthPolicy::Required, "anonymous"),
                cached("/shared", AuthPolicy::Required, "shared"),
                cached("/mine", AuthPolicy::Required, "mine"),
                cached("/small", AuthPolicy::Anonymous, "small"),
            ];
            s.caches = [
                ("anonymous", policy(AuthenticatedCaching::Never, 1 << 20)),
                ("shared", policy(AuthenticatedCaching::Shared, 1 << 20)),
                ("mine", policy(AuthenticatedCaching::PerUser, 1 << 20)),
                ("small", policy(AuthenticatedCaching::Never, 1024)),
            ]
            .into_iter()
            .map(|(n, p)| (n.to_owned(), p))
            .collect();
            adjust(s);
        },
        vec![("origin".to_owned(), url)],
    )
    .await;
    Shop { gw, origin: state }
}

impl Shop {
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut r = self.gw.http.get(format!("{}{path}", self.gw.url));
        for (n, v) in headers {
            r = r.header(*n, *v);
        }
        r.send().await.unwrap()
    }

    async fn body(&self, path: &str, headers: &[(&str, &str)]) -> Value {
        let r = self.get(path, headers).await;
        assert_eq!(r.status(), 200, "{path}");
        r.json().await.unwrap()
    }
}

fn cache_status(r: &reqwest::Response) -> String {
    r.headers()["cache-status"].to_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_hundred_concurrent_misses_make_one_upstream_call() {
    let shop = Arc::new(shop(|_| {}).await);
    let path = "/c/hot?cc=max-age=60&delay=300";
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let shop = shop.clone();
            tokio::spawn(async move {
                let r = shop.get(path, &[]).await;
                (
                    r.status().as_u16(),
                    r.json::<Value>().await.unwrap()["n"].clone(),
                )
            })
        })
        .collect();
    for t in tasks {
        let (status, n) = t.await.unwrap();
        assert_eq!((status, n), (200, json!(1)));
    }
    assert_eq!(shop.origin.calls(path), 1, "the misses were not coalesced");
    // Later requests are hits, with their age.
    let r = shop.get(path, &[]).await;
    assert!(
        cache_status(&r).starts_with("bazaar; hit"),
        "{}",
        cache_status(&r)
    );
    assert!(r.headers().contains_key("age"));
    assert_eq!(shop.origin.calls(path), 1);
    // HEAD is answered from the stored GET.
    let head = shop
        .gw
        .http
        .head(format!("{}{path}", shop.gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert!(cache_status(&head).starts_with("bazaar; hit"));
    assert_eq!(shop.origin.calls(path), 1);
}

/// What the origin says decides what is stored: each case is fetched twice and the
/// origin's calls counted.
#[tokio::test]
async fn what_is_stored_follows_the_origins_cache_control() {
    let shop = shop(|_| {}).await;
    let cases = [
        ("cc=max-age=60", 1),
        ("cc=s-maxage=60,max-age=0", 1),
        ("status=404&cc=max-age=60", 1),
        ("status=410&cc=max-age=60", 1),
        ("cc=no-store", 2),
        ("cc=private,max-age=60", 2),
        ("cc=max-age=60&cookie=1", 2),
        ("cc=max-age=60&vary=*", 2),
        ("status=500&cc=max-age=60", 2),
        ("status=201&cc=max-age=60", 2),
        // No freshness and no validator: nothing to keep.
        ("plain=1", 2),
        ("cc=max-age=0", 2),
    ];
    for (i, (query, calls)) in cases.iter().enumerate() {
        let path = format!("/c/case{i}?{query}");
        for _ in 0..2 {
            let r = shop.get(&path, &[]).await;
            assert!(r.status().as_u16() < 600);
        }
        assert_eq!(shop.origin.calls(&path), *calls, "{query}");
    }
    // `no-cache` with a validator is stored but revalidated on every use: the
    // origin answers 304 and the stored body is served.
    let path = "/c/nc?cc=no-cache&etag=v1";
    assert_eq!(shop.body(path, &[]).await["n"], 1);
    let r = shop.get(path, &[]).await;
    assert!(
        cache_status(&r).contains("fwd-status=304"),
        "{}",
        cache_status(&r)
    );
    assert_eq!(r.json::<Value>().await.unwrap()["n"], 1);
    assert_eq!(shop.origin.calls(path), 2);
    assert_eq!(shop.origin.conditional.lock().unwrap().as_slice(), [path]);
    // A client's `no-cache` goes to the origin (conditionally) and refreshes.
    let path = "/c/forced?cc=max-age=60&etag=f";
    shop.get(path, &[]).await;
    let r = shop.get(path, &[("cache-control", "no-cache")]).await;
    assert!(cache_status(&r).contains("fwd-status=304"));
    assert_eq!(shop.origin.calls(path), 2);
}

#[tokio::test]
async fn variants_etags_and_revalidation() {
    let shop = shop(|_| {}).await;
    // One variant per Accept-Language.
    let path = "/c/v?cc=max-age=60&vary=accept-language";
    for lang in ["fr", "en", "fr", "en", "fr"] {
        let body = shop.body(path, &[("accept-language", lang)]).await;
        assert_eq!(body["lang"], lang);
    }
    assert_eq!(shop.origin.calls(path), 2);

    // The origin's ETag: a matching If-None-Match is a 304 from the cache.
    let path = "/c/e?cc=max-age=60&etag=t1";
    let r = shop.get(path, &[]).await;
    assert_eq!(r.headers()["etag"], "\"t1\"");
    for inm in ["\"t1\"", "W/\"t1\"", "\"x\", \"t1\"", "*"] {
        let r = shop.get(path, &[("if-none-match", inm)]).await;
        assert_eq!(r.status(), 304, "{inm}");
        assert_eq!(r.headers()["etag"], "\"t1\"");
        assert!(r.bytes().await.unwrap().is_empty());
    }
    assert_eq!(
        shop.get(path, &[("if-none-match", "\"t0\"")])
            .await
            .status(),
        200
    );
    assert_eq!(shop.origin.calls(path), 1);
    // Without one from the origin, the gateway makes one from the body.
    let path = "/c/g?cc=max-age=60";
    let etag = shop.get(path, &[]).await.headers()["etag"].clone();
    let r = shop
        .get(path, &[("if-none-match", etag.to_str().unwrap())])
        .await;
    assert_eq!(r.status(), 304);

    // Stale with a validator: revalidated with the origin, the 304 refreshes it.
    // Two seconds of freshness: an answer's age counts whole seconds of its `Date`,
    // so one second could be spent before the refreshed copy is asked for again.
    let path = "/c/r?cc=max-age=2&etag=r";
    assert_eq!(shop.body(path, &[]).await["n"], 1);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let r = shop.get(path, &[]).await;
    assert!(
        cache_status(&r).starts_with("bazaar; fwd=stale; fwd-status=304"),
        "{}",
        cache_status(&r)
    );
    assert_eq!(r.json::<Value>().await.unwrap()["n"], 1);
    assert_eq!(shop.origin.calls(path), 2);
    assert!(cache_status(&shop.get(path, &[]).await).starts_with("bazaar; hit"));
    assert_eq!(shop.origin.calls(path), 2);
}

#[tokio::test]
async fn stale_answers_are_served_while_the_origin_fails_unless_they_must_revalidate() {
    let shop = shop(|_| {}).await;
    let kept = "/c/s?cc=max-age=1";
    let strict = "/c/m?cc=max-age=1,must-revalidate";
    let own = "/c/o?cc=max-age=1,stale-if-error=0";
    for path in [kept, strict, own] {
        assert_eq!(shop.body(path, &[]).await["n"], 1);
    }
    shop.origin.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = shop.get(kept, &[]).await;
    assert_eq!(r.status(), 200);
    assert!(
        cache_status(&r).contains("stale-if-error"),
        "{}",
        cache_status(&r)
    );
    assert_eq!(r.json::<Value>().await.unwrap()["n"], 1);
    // The answer's own `stale-if-error=0` wins over the policy's 30 s.
    assert_eq!(shop.get(own, &[]).await.status(), 503);
    assert_eq!(shop.get(strict, &[]).await.status(), 503);
    // Back up: fresh answers again.
    shop.origin.down.store(false, Ordering::SeqCst);
    let r = shop.get(kept, &[]).await;
    assert!(cache_status(&r).contains("stored"), "{}", cache_status(&r));
    assert_eq!(r.json::<Value>().await.unwrap()["n"], 3);
}

#[tokio::test]
async fn unsafe_requests_invalidate_and_big_answers_pass_unstored() {
    let shop = shop(|_| {}).await;
    let path = "/c/item?cc=max-age=60";
    shop.get(path, &[]).await;
    shop.get(path, &[]).await;
    assert_eq!(shop.origin.calls(path), 1);
    let url = format!("{}{path}", shop.gw.url);
    assert_eq!(shop.gw.http.patch(&url).send().await.unwrap().status(), 200);
    assert_eq!(shop.body(path, &[]).await["n"], 3);

    // Over the policy's 1 KB: forwarded whole, not stored.
    let path = "/small/big?cc=max-age=60&size=5000";
    for _ in 0..2 {
        let body = shop.body(path, &[]).await;
        assert_eq!(body["pad"].as_str().unwrap().len(), 5000);
    }
    assert_eq!(shop.origin.calls(path), 2);
    let path = "/small/tiny?cc=max-age=60&size=10";
    shop.get(path, &[]).await;
    shop.get(path, &[]).await;
    assert_eq!(shop.origin.calls(path), 1);
}

#[tokio::test]
async fn authenticated_answers_are_cached_only_where_the_route_says() {
    let shop = shop(|_| {}).await;
    let (alice, bob) = (shop.gw.users.token("alice"), shop.gw.users.token("bob"));
    let get = async |path: &str, token: &str| {
        shop.body(path, &[("authorization", &format!("Bearer {token}"))])
            .await["n"]
            .clone()
    };
    for path in [
        "/never/x?cc=max-age=60",
        "/shared/x?cc=max-age=60",
        "/mine/x?cc=max-age=60",
    ] {
        get(path, &alice).await;
        get(path, &bob).await;
        get(path, &alice).await;
    }
    assert_eq!(shop.origin.calls("/never/x?cc=max-age=60"), 3);
    assert_eq!(shop.origin.calls("/shared/x?cc=max-age=60"), 1);
    assert_eq!(shop.origin.calls("/mine/x?cc=max-age=60"), 2);
    assert_eq!(get("/mine/x?cc=max-age=60", &bob).await, 2);
}

#[tokio::test]
async fn memory_stays_within_its_bound_and_the_admin_api_purges() {
    let shop = shop(|s| s.cache_max_bytes = 64 * 1024).await;
    for i in 0..100 {
        shop.get(&format!("/c/fill{i}?cc=max-age=60&size=4000"), &[])
            .await;
    }
    let usage: Value = shop.gw.admin_json("/cache").await;
    let bytes = usage["bytes"].as_u64().unwrap();
    assert!(bytes <= 64 * 1024, "{usage}");
    assert!(
        bytes > 0 && usage["entries"].as_u64().unwrap() >= 5,
        "{usage}"
    );

    let path = "/c/p?cc=max-age=60";
    shop.get(path, &[]).await;
    let purged = shop
        .gw
        .http
        .delete(format!("{}/cache", shop.gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(purged.status(), 200);
    shop.get(path, &[]).await;
    assert_eq!(shop.origin.calls(path), 2);
}

/// Two gateways sharing the machine's Redis share what they cache.
#[tokio::test]
async fn a_redis_cache_is_shared_by_gateways() {
    let prefix = test_prefix();
    let state = Arc::new(Origin::default());
    let url = origin(state.clone()).await;
    let configure = |s: &mut Settings| {
        with_redis(s, &prefix);
        s.routes = vec![RouteConfig {
            cache: Some("shared".into()),
            ..RouteConfig::prefix("/c", "origin", AuthPolicy::Anonymous)
        }];
        s.caches = [(
            "shared".to_owned(),
            CachePolicy {
                store: CacheStore::Redis,
                ..CachePolicy::default()
            },
        )]
        .into();
    };
    let more = || vec![("origin".to_owned(), url.clone())];
    let a = spawn_full(configure, more()).await;
    let b = spawn_full(configure, more()).await;
    let path = "/c/r?cc=max-age=60&vary=accept-language";
    let get = async |gw: &Gw, lang: &str| {
        let r = gw
            .http
            .get(format!("{}{path}", gw.url))
            .header("accept-language", lang)
            .send()
            .await
            .unwrap();
        let status = cache_status(&r);
        (status, r.json::<Value>().await.unwrap())
    };
    let (first, body) = get(&a, "fr").await;
    assert!(first.contains("stored"), "{first}");
    let (second, again) = get(&b, "fr").await;
    assert!(second.starts_with("bazaar; hit"), "{second}");
    assert_eq!(body, again);
    let (_, en) = get(&b, "en").await;
    assert_eq!(en["lang"], "en");
    assert_eq!(state.calls(path), 2);
    // The admin purge clears Redis too.
    let purged: Value = a
        .http
        .delete(format!("{}/cache", a.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(purged["redis_keys"], 1);
    get(&b, "fr").await;
    assert_eq!(state.calls(path), 3);
}
