//! The whole shop, started as `bazaar up` would be by a user, exercised through the
//! gateway exactly as README.md's walkthrough does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::Shop;

/// README's walkthrough: sign up, log in, browse, order, read it back.
/// Every service but the control plane (which hosts the registry).
const SERVICES: [&str; 8] = [
    "users",
    "products",
    "orders",
    "inventory",
    "payments",
    "notifications",
    "recommendations",
    "gateway",
];

async fn walkthrough(shop: &Shop) {
    let (status, user) = shop
        .post("/users", None, json!({"email": "ada@example.com", "name": "Ada Lovelace", "password": "correct horse battery"}))
        .await;
    assert_eq!(status, 201, "{user}");
    let (status, login) = shop
        .post(
            "/auth/login",
            None,
            json!({"email": "ada@example.com", "password": "correct horse battery"}),
        )
        .await;
    assert_eq!(status, 200, "{login}");
    assert_eq!(login["token_type"], "Bearer");
    let token = login["access_token"].as_str().unwrap();

    let (status, me) = shop.get("/users/me", Some(token)).await;
    assert_eq!((status, &me["id"]), (200, &user["id"]));

    let (status, page) = shop.get("/products?limit=3", None).await;
    assert_eq!(status, 200);
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert!(page["next_cursor"].is_string());
    let (first, second) = (&items[0], &items[1]);
    let (status, one) = shop
        .get(
            &format!("/products/{}", first["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!((status, &one), (200, first));

    // Stock reaches inventory through product.created: on a fresh shop it may still
    // be on its way.
    let ids: Vec<String> = [first, second]
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect();
    shop.stocked(&ids).await;
    let order_body = json!({"items": [
        {"product_id": first["id"], "quantity": 2},
        {"product_id": second["id"], "quantity": 1},
    ]});
    let placed = shop
        .http
        .post(format!("{}/orders", shop.gateway))
        .bearer_auth(token)
        .header("idempotency-key", "walkthrough-1")
        .json(&order_body)
        .send()
        .await
        .unwrap();
    assert_eq!(placed.status().as_u16(), 201);
    let order: Value = placed.json().await.unwrap();
    assert_eq!(order["status"], "PENDING");
    let expected =
        first["price_cents"].as_i64().unwrap() * 2 + second["price_cents"].as_i64().unwrap();
    assert_eq!(order["total_cents"], expected);

    // The place-order saga reserves, charges and confirms it.
    let path = format!("/orders/{}", order["id"].as_str().unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let read = loop {
        let (status, read) = shop.get(&path, Some(token)).await;
        assert_eq!(status, 200, "{read}");
        if read["status"] != "PENDING" {
            break read;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still pending: {read}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(read["status"], "CONFIRMED", "{read}");
    assert_eq!(
        (&read["id"], &read["items"]),
        (&order["id"], &order["items"])
    );
    let steps: Vec<String> = read["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{} {}",
                s["step"].as_str().unwrap(),
                s["what"].as_str().unwrap()
            )
        })
        .collect();
    assert!(steps.iter().any(|s| s == "charge done"), "{steps:?}");
    let (status, mine) = shop.get("/orders", Some(token)).await;
    assert_eq!(status, 200);
    assert_eq!(mine["items"][0]["id"], order["id"]);

    // order.created and order.confirmed left through the outbox, and consumers acted.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let kinds = loop {
        let (status, page) = shop.get("/notifications", Some(token)).await;
        assert_eq!(status, 200, "{page}");
        let items = page["items"].as_array().cloned().unwrap_or_default();
        if items.len() >= 2 {
            assert!(items.iter().all(|n| n["order_id"] == order["id"]), "{page}");
            let received = items
                .iter()
                .find(|n| n["kind"] == "order_received")
                .unwrap();
            assert!(
                received["text"].as_str().unwrap().contains("3 items"),
                "{received}"
            );
            break items
                .iter()
                .map(|n| n["kind"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no notifications for the order: {page}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(kinds, ["order_confirmed", "order_received"]);
    let path = format!("/recommendations/{}", first["id"].as_str().unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, recs) = shop.get(&path, None).await;
        assert_eq!(status, 200, "{recs}");
        if let Some(r) = recs["items"].as_array().and_then(|i| i.first()) {
            assert_eq!(r["product_id"], second["id"]);
            assert_eq!(r["name"], second["name"]);
            assert_eq!(r["orders"], 1);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no recommendation from the order"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn processes_mode_walkthrough_supervision_and_clean_stop() {
    let mut shop = Shop::up("processes", &[]);
    walkthrough(&shop).await;

    // Every process is listed, each its own pid, all ready.
    let ps = shop.ps();
    let names: Vec<&str> = ps.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "control-plane",
            "users",
            "products",
            "orders",
            "inventory",
            "payments",
            "notifications",
            "recommendations",
            "gateway"
        ]
    );
    assert!(ps.iter().all(|p| p["health"] == "ready"), "{ps:?}");
    let mut pids: Vec<i64> = ps.iter().map(|p| p["pid"].as_i64().unwrap()).collect();
    pids.dedup();
    assert_eq!(pids.len(), 9);

    // Every service registered itself with the control plane's registry, with a
    // passing health check.
    let registry = shop.url("control-plane");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut healthy = Vec::new();
        for name in SERVICES {
            let list: Vec<Value> = shop
                .http
                .get(format!("{registry}/v1/health/service/{name}?passing"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if list.len() == 1 {
                healthy.push(name);
            }
        }
        if healthy.len() == SERVICES.len() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "registered and passing: {healthy:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Through the gateway alone, `ps` sees the same shop with the operator key
    // `up` wrote; without it, or with another, it says what to do.
    let key = std::fs::read_to_string(shop.data_dir.join("operator.key")).unwrap();
    let ps_through = |args: &[&str]| {
        std::process::Command::new(support::BIN)
            .args(["ps", "--json", "--gateway", &shop.gateway])
            .args(args)
            // Not the shop's: the key must come from the flag, or not at all.
            .args(["--data-dir", "/nonexistent"])
            .env_remove("BAZAAR_OPERATOR_KEY")
            .output()
            .unwrap()
    };
    let out = ps_through(&["--operator-key", key.trim()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let remote: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut remote_names: Vec<&str> = remote.iter().map(|p| p["name"].as_str().unwrap()).collect();
    remote_names.sort_unstable();
    let mut local_names = names.clone();
    local_names.sort_unstable();
    assert_eq!(remote_names, local_names, "{remote:?}");
    assert!(
        remote
            .iter()
            .all(|p| p["health"] == "ready" && p["pid"].is_null()),
        "{remote:?}"
    );
    let out = ps_through(&[]);
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("--operator-key") && said.lines().count() == 1,
        "{said}"
    );
    let out = ps_through(&["--operator-key", "bzr_not-the-key"]);
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("refused the operator key"), "{said}");
    // A signed-in customer cannot use the operator routes.
    let (_, token) = shop.user().await;
    let (status, _) = shop
        .get("/operator/orders/admin/orders", Some(&token))
        .await;
    assert_eq!(status, 403);

    // `bazaar services` lists them from the registry.
    let out = std::process::Command::new(support::BIN)
        .args(["services", "--json", "--data-dir"])
        .arg(&shop.data_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    for name in SERVICES {
        let row = listed
            .iter()
            .find(|r| r["service"] == name)
            .unwrap_or_else(|| panic!("{name} not listed: {listed:?}"));
        assert_eq!(row["health"], "passing");
    }

    // One correlation id follows an order from the gateway to orders, on a JSON log
    // line of each, and on to the services after them in the order's event.
    let (_, token) = shop.user().await;
    let product = shop.product_ids(1).await.remove(0);
    let correlation = format!("e2e-{}", uuid::Uuid::new_v4().simple());
    let placed_after = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let r = shop
        .http
        .post(format!("{}/orders", shop.gateway))
        .bearer_auth(&token)
        .header("x-correlation-id", &correlation)
        .json(&json!({"items": [{"product_id": product, "quantity": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-correlation-id"], correlation.as_str());
    let mut traces = Vec::new();
    for service in ["gateway", "orders"] {
        // Read until the line is there: logging is not synchronous with answering.
        let line = support::eventually_logged(
            &shop.data_dir.join(format!("logs/{service}.log")),
            &correlation,
        )
        .await
        .unwrap_or_else(|| panic!("{service} never logged {correlation}"));
        let line: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(line["correlation_id"], correlation.as_str());
        assert_eq!(line["service"], service);
        for field in ["timestamp", "level", "version", "message", "trace_id"] {
            assert!(line[field].is_string(), "{field} missing in {line}");
        }
        traces.push(line["trace_id"].clone());
    }
    assert!(
        traces.windows(2).all(|w| w[0] == w[1]),
        "one trace across services: {traces:?}"
    );
    // Two events are sure to follow: the order's own two (placed, then ended);
    // the walkthrough's earlier order may still have its end on the way.
    let tailed = events(
        &shop,
        &[
            "tail",
            "--topic",
            "orders",
            "--from",
            &placed_after,
            "--json",
            "--count",
            "2",
        ],
    );
    let created: Value = tailed
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .find(|e| e["type"] == "order.created")
        .unwrap_or_else(|| panic!("no order.created in {tailed}"));
    assert_eq!(created["correlationid"], correlation.as_str());
    let trace = traces[0].as_str().unwrap();
    assert!(
        created["traceparent"].as_str().unwrap().contains(trace),
        "{created} is not of trace {trace}"
    );

    // A crashed service is restarted on the same port; its data survives.
    let orders_pid = shop.pid_of("orders");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(orders_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ps = shop.ps();
        let orders = ps.iter().find(|p| p["name"] == "orders").unwrap();
        if orders["pid"].as_i64().unwrap() as i32 != orders_pid && orders["health"] == "ready" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "orders was not restarted: {ps:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let token = shop
        .login_with("ada@example.com", "correct horse battery")
        .await;
    let (status, mine) = shop.get("/orders", Some(&token)).await;
    assert_eq!(status, 200);
    assert_eq!(mine["items"].as_array().unwrap().len(), 1);

    // Ctrl-C stops everything and leaves no process behind.
    let pids: Vec<i32> = shop
        .ps()
        .iter()
        .map(|p| p["pid"].as_i64().unwrap() as i32)
        .collect();
    let status = shop.interrupt();
    assert!(status.success(), "{status:?}");
    for pid in pids {
        assert!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err(),
            "process {pid} survived Ctrl-C"
        );
    }
    assert!(!shop.data_dir.join("run/state.json").exists());
}

#[tokio::test]
async fn monolith_mode_serves_the_same_contracts() {
    let mut shop = Shop::up("monolith", &[]);
    walkthrough(&shop).await;
    let ps = shop.ps();
    assert_eq!(ps.len(), 9);
    let up_pid = shop.child.id() as i64;
    assert!(ps.iter().all(|p| p["pid"] == up_pid), "one process: {ps:?}");
    assert!(shop.interrupt().success());
}

#[tokio::test]
async fn services_refuse_identities_that_did_not_come_from_the_gateway() {
    let shop = Shop::up("processes", &[]);
    let (user_id, token) = shop.user().await;
    let orders = shop.url("orders");
    let forged_key = chassis::jwt::SigningKey::generate().unwrap();
    let forged = chassis::identity::IdentityIssuer::new(
        forged_key,
        "bazaar-gateway",
        "bazaar-services",
        Duration::from_secs(60),
    )
    .mint(&user_id, None)
    .unwrap();
    for (name, header, value) in [
        ("no identity", None, String::new()),
        ("bare user id", Some("x-user-id"), user_id.clone()),
        (
            "user id as identity",
            Some("x-bazaar-identity"),
            user_id.clone(),
        ),
        (
            "identity signed by another key",
            Some("x-bazaar-identity"),
            forged,
        ),
        (
            "the user's own access token as identity",
            Some("x-bazaar-identity"),
            token.clone(),
        ),
    ] {
        let mut req = shop.http.get(format!("{orders}/orders"));
        if let Some(h) = header {
            req = req.header(h, value);
        }
        let r = req.bearer_auth(&token).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401, "{name}");
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{name}"
        );
    }
}

#[tokio::test]
async fn runs_on_postgresql_with_a_database_per_service() {
    let base = std::env::var("POSTGRES_TEST_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let run = uuid::Uuid::new_v4().simple().to_string();
    let urls: Vec<(String, String)> = ["users", "products", "orders"]
        .iter()
        .map(|s| {
            (
                format!("BAZAAR_{}__DATABASE_URL", s.to_uppercase()),
                format!("{base}/bazaar_it_{run}_{s}"),
            )
        })
        .collect();
    let env: Vec<(&str, &str)> = urls.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut shop = Shop::up("processes", &env);
    walkthrough(&shop).await;
    assert!(shop.interrupt().success());
    chassis::db::install_drivers();
    for (_, url) in &urls {
        let _ = <sqlx::Any as sqlx::migrate::MigrateDatabase>::force_drop_database(url).await;
    }
}

/// The shop's events on brokers users run: NATS JetStream (the machine's server)
/// and Kafka (a tansu broker of the test's own). order.created still reaches
/// notifications and recommendations.
#[tokio::test]
async fn events_travel_through_nats_jetstream() {
    let prefix = format!(
        "bazaar_it_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let mut shop = Shop::up(
        "processes",
        &[
            ("BAZAAR_EVENTS__BACKEND", "nats"),
            ("BAZAAR_EVENTS__PREFIX", &prefix),
        ],
    );
    walkthrough(&shop).await;
    assert!(shop.interrupt().success());
    let nats = messaging::nats::NatsBus::connect(messaging::nats::NatsConfig {
        prefix,
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        nats.delete_namespace().await.unwrap() >= 2,
        "orders' and users' streams were on NATS"
    );
}

#[tokio::test]
async fn events_travel_through_kafka() {
    let tansu = messaging::testing::Tansu::start();
    let mut shop = Shop::up(
        "processes",
        &[
            ("BAZAAR_EVENTS__BACKEND", "kafka"),
            ("BAZAAR_EVENTS__KAFKA_BROKERS", &tansu.brokers()),
        ],
    );
    walkthrough(&shop).await;
    assert!(shop.interrupt().success());
}

#[tokio::test]
async fn events_travel_through_rabbitmq_streams() {
    let prefix = format!(
        "bazaar_it_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let url = std::env::var("RABBITMQ_TEST_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let mut shop = Shop::up(
        "processes",
        &[
            ("BAZAAR_EVENTS__BACKEND", "rabbitmq"),
            ("BAZAAR_EVENTS__RABBITMQ_URL", &url),
            ("BAZAAR_EVENTS__PREFIX", &prefix),
            ("BAZAAR_EVENTS__PARTITIONS", "2"),
        ],
    );
    walkthrough(&shop).await;
    assert!(shop.interrupt().success());
    // The shop's streams and queues go with it.
    let bus = messaging::rabbitmq::RabbitBus::connect(messaging::rabbitmq::RabbitConfig {
        url,
        prefix,
        partitions: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let topics = messaging::EventBus::topics(&bus).await.unwrap();
    assert!(topics.iter().any(|t| t == "orders"), "{topics:?}");
    for topic in &topics {
        bus.delete_topic(topic, &["notifications", "recommendations"])
            .await
            .unwrap();
    }
    bus.delete_namespace().await.unwrap();
}

#[test]
fn a_config_with_three_mistakes_reports_all_three_and_exits_2() {
    let dir = std::env::temp_dir().join(format!("bazaar-cfg-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bazaar.toml");
    std::fs::write(
        &file,
        "[http]\nrequest_timeout = \"soon\"\nbody_limt = 10\n\n[gateway]\nport = \"eighty\"\n",
    )
    .unwrap();
    for args in [vec!["up"], vec!["run", "orders"]] {
        let mut command = std::process::Command::new(support::BIN);
        // Run in `dir`, so the default data directory would be `dir/.bazaar`.
        command
            .current_dir(&dir)
            .args(&args)
            .arg("--config")
            .arg(&file);
        let out = command.output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with("3 configuration errors"), "{stderr}");
        for key in [
            "`http.request_timeout`",
            "`http.body_limt`",
            "`gateway.port`",
        ] {
            assert!(stderr.contains(key), "{key} not reported: {stderr}");
        }
        assert!(
            stderr.contains("did you mean `http.body_limit`?"),
            "{stderr}"
        );
    }
    assert!(
        !dir.join(".bazaar").exists(),
        "nothing was started or written"
    );
}

#[test]
fn up_fails_fast_naming_a_service_that_cannot_start_and_leaves_nothing_running() {
    let dir = std::env::temp_dir().join(format!("bazaar-fail-{}", uuid::Uuid::new_v4().simple()));
    let started = std::time::Instant::now();
    let out = std::process::Command::new(support::BIN)
        .args(["up", "--port", "0", "--data-dir"])
        .arg(&dir)
        .env("BAZAAR_ORDERS__DATABASE_URL", "mysql://nowhere/orders")
        .env("BAZAAR_CONTROL_PLANE__PORT", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("orders exited 3 times while starting"),
        "{stderr}"
    );
    assert!(
        stderr.contains("unsupported database URL scheme"),
        "the cause is shown: {stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "not the readiness timeout"
    );
    let ps = std::process::Command::new(support::BIN)
        .args(["ps", "--json", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&ps.stdout).trim(), "[]");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_frozen_catalog_leaves_orders_flowing_and_trips_the_breaker_for_what_it_alone_knows() {
    let shop = Shop::up(
        "processes",
        &[
            ("BAZAAR_BREAKER__WINDOW_SIZE", "3"),
            ("BAZAAR_BREAKER__MINIMUM_CALLS", "3"),
            ("BAZAAR_BREAKER__PERMITTED_IN_HALF_OPEN", "1"),
            ("BAZAAR_BREAKER__WAIT_IN_OPEN", "1s"),
            ("BAZAAR_HTTP__CLIENT_TIMEOUT", "300ms"),
        ],
    );
    let (_, token) = shop.user().await;
    let product = shop.product_ids(1).await.remove(0);
    let order = json!({"items": [{"product_id": product, "quantity": 1}]});
    // A product orders has not heard of: only products can price it (or say it
    // does not exist).
    let unheard = json!({"items": [{"product_id": uuid::Uuid::now_v7(), "quantity": 1}]});
    // A catalog read goes into the gateway's `catalog` cache on the way.
    let page = format!("{}/products/{product}", shop.gateway);
    let first = shop.http.get(&page).send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["cache-control"], "public, max-age=10");
    let first = first.text().await.unwrap();
    let products = nix::unistd::Pid::from_raw(shop.pid_of("products"));
    nix::sys::signal::kill(products, nix::sys::signal::Signal::SIGSTOP).unwrap();

    // Browsing goes on with the catalog frozen: the gateway answers from its cache.
    let again = shop.http.get(&page).send().await.unwrap();
    assert_eq!(again.status(), 200);
    assert!(again.headers().contains_key("age"), "{:?}", again.headers());
    assert_eq!(again.text().await.unwrap(), first);

    // Ordering goes on too: orders prices from its replica of the catalog's
    // events (once it has taken them in, which a fresh shop does within moments).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = shop.post("/orders", Some(&token), order.clone()).await;
        if status == 201 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no order while the catalog was frozen: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // What only products can answer waits out the client deadline (or, if the
    // loop above already opened the breaker, fails fast): a 503 either way.
    for _ in 0..3 {
        let (status, body) = shop.post("/orders", Some(&token), unheard.clone()).await;
        assert_eq!(status, 503, "{body}");
    }
    let orders = shop.url("orders");
    let breakers: Value = shop
        .http
        .get(format!("{orders}/admin/breakers"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let catalog = breakers["breakers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "products")
        .unwrap()
        .clone();
    assert_eq!(catalog["state"], "OPEN", "{breakers}");

    // Open: the next such order fails fast, with a clear problem and Retry-After.
    let started = std::time::Instant::now();
    let r = shop
        .http
        .post(format!("{}/orders", shop.gateway))
        .bearer_auth(&token)
        .json(&unheard)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "took {:?}",
        started.elapsed()
    );
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    // The breaker stands between orders and products only: known products still sell.
    let (status, body) = shop.post("/orders", Some(&token), order.clone()).await;
    assert_eq!(status, 201, "{body}");

    // Thawed: after the wait, a trial call goes through, and products' answer
    // comes back (the product does not exist: 422).
    nix::sys::signal::kill(products, nix::sys::signal::Signal::SIGCONT).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = shop.post("/orders", Some(&token), unheard.clone()).await;
        if status == 422 {
            assert!(body.to_string().contains("no such product"), "{body}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the breaker never let a call through: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn scaled_orders_share_the_load_behind_the_gateway() {
    let mut shop = Shop::up_with_args("processes", &["--scale", "orders=2"], &[]);
    let ps = shop.ps();
    let orders: Vec<&Value> = ps.iter().filter(|p| p["name"] == "orders").collect();
    assert_eq!(orders.len(), 2, "{ps:?}");
    assert_ne!(orders[0]["pid"], orders[1]["pid"]);
    let (_, token) = shop.user().await;
    let product = shop.product_ids(1).await.remove(0);
    for _ in 0..10 {
        let (status, body) = shop
            .post(
                "/orders",
                Some(&token),
                json!({"items": [{"product_id": product, "quantity": 1}]}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    // Both instances took orders, and both see all of them (one database).
    for log in ["orders.log", "orders-2.log"] {
        let path = shop.data_dir.join("logs").join(log);
        let placed = support::eventually_logged(&path, "order placed").await;
        assert!(placed.is_some(), "{log} placed no order");
    }
    let (_, mine) = shop.get("/orders?limit=100", Some(&token)).await;
    assert_eq!(mine["items"].as_array().unwrap().len(), 10);
    assert!(shop.interrupt().success());
}

#[test]
fn a_bad_scale_is_a_usage_error() {
    for bad in ["orders", "nobody=2", "orders=0", "orders=99"] {
        let out = std::process::Command::new(support::BIN)
            .args(["up", "--scale", bad])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--scale"),
            "{bad}"
        );
    }
}

/// Places `n` orders through the gateway; returns how many failed.
async fn place_orders(shop: &Shop, token: &str, product: &str, n: usize) -> usize {
    let mut failed = 0;
    for _ in 0..n {
        let (status, _) = shop
            .post(
                "/orders",
                Some(token),
                json!({"items": [{"product_id": product, "quantity": 1}]}),
            )
            .await;
        if status != 201 {
            failed += 1;
        }
    }
    failed
}

#[tokio::test]
async fn an_instance_killed_or_the_registry_frozen_costs_no_orders() {
    let shop = Shop::up_with_args("processes", &["--scale", "orders=3"], &[]);
    let (_, token) = shop.user().await;
    let product = shop.product_ids(1).await.remove(0);
    assert_eq!(place_orders(&shop, &token, &product, 6).await, 0);

    // kill -9 one of three orders instances while orders flow.
    let victim = shop
        .ps()
        .into_iter()
        .filter(|p| p["name"] == "orders")
        .nth(1)
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(victim["pid"].as_i64().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let during = place_orders(&shop, &token, &product, 30).await;
    println!("orders failed while one of three instances was down: {during} of 30");
    assert!(
        during <= 3,
        "{during} of 30 orders failed while an instance restarted"
    );
    // The restarted instance rejoins: three passing orders instances again.
    let registry = shop.url("control-plane");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let list: Vec<Value> = shop
            .http
            .get(format!("{registry}/v1/health/service/orders?passing"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if list.len() == 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the restarted instance did not rejoin: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        place_orders(&shop, &token, &product, 10).await,
        0,
        "no failure after the restart"
    );

    // The registry frozen for 10 s: services keep calling each other on the last
    // known instances.
    let control_plane = nix::unistd::Pid::from_raw(shop.pid_of("control-plane"));
    nix::sys::signal::kill(control_plane, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let started = std::time::Instant::now();
    let mut failed = 0;
    while started.elapsed() < Duration::from_secs(10) {
        failed += place_orders(&shop, &token, &product, 5).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    nix::sys::signal::kill(control_plane, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(failed, 0, "orders failed while the registry was down");
}

#[tokio::test]
async fn runs_on_etcd_discovery_with_every_instance_under_a_lease() {
    let etcd = discovery::testing::Etcd::start();
    let env = [
        ("BAZAAR_DISCOVERY__BACKEND", "etcd"),
        ("BAZAAR_DISCOVERY__ETCD_URL", etcd.url.as_str()),
    ];
    let mut shop = Shop::up_with_args("processes", &["--scale", "orders=2"], &env);
    let etcd_client = discovery::etcd::EtcdClient::new(&etcd.url, discovery::etcd::DEFAULT_PREFIX);
    // Every process announced itself in etcd (registration runs right after bind).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for (service, count) in [("users", 1), ("products", 1), ("orders", 2), ("gateway", 1)] {
        loop {
            let found = etcd_client.instances(service).await.unwrap();
            if found.len() == count {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{service}: {found:?} in etcd, expected {count}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    walkthrough(&shop).await;
    // `bazaar services` lists from etcd when that is the backend.
    let out = std::process::Command::new(support::BIN)
        .args(["services", "--json", "--data-dir"])
        .arg(&shop.data_dir)
        .envs(env)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        listed.iter().filter(|r| r["service"] == "orders").count(),
        2,
        "{listed:?}"
    );
    assert!(listed.iter().all(|r| r["health"] == "passing"));
    // The gateway balances over what etcd lists, and says so in its metrics.
    let metrics = shop
        .http
        .get(format!("{}/metrics", shop.gateway))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("bazaar_discovery_instances") && l.contains("upstream=\"orders\""))
        .unwrap_or_else(|| panic!("no discovery gauge for orders in:\n{metrics}"));
    assert!(line.ends_with(" 2"), "{line}");
    assert!(metrics.contains("bazaar_discovery_stale{"), "{metrics}");
    // A graceful stop revokes every lease at once, without waiting for the TTL.
    assert!(shop.interrupt().success());
    for service in ["users", "products", "orders", "gateway"] {
        assert_eq!(
            etcd_client.instances(service).await.unwrap(),
            vec![],
            "{service}"
        );
    }
}

/// Runs `bazaar events ...` against the shop; returns stdout.
fn events(shop: &Shop, args: &[&str]) -> String {
    let out = std::process::Command::new(support::BIN)
        .arg("events")
        .args(args)
        .arg("--data-dir")
        .arg(&shop.data_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bazaar events {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn events_can_be_tailed_replayed_and_dead_letters_inspected() {
    let mut shop = Shop::up("processes", &[]);
    let (_, token) = shop.user().await;
    let product = shop.product_ids(1).await.remove(0);
    assert_eq!(place_orders(&shop, &token, &product, 1).await, 0);

    let tailed = events(
        &shop,
        &[
            "tail", "--topic", "orders", "--from", "earliest", "--json", "--count", "1",
        ],
    );
    let event: Value = serde_json::from_str(tailed.lines().next().unwrap()).unwrap();
    assert_eq!(event["type"], "order.created");
    assert_eq!(event["specversion"], "1.0");
    assert_eq!(event["data"]["items"][0]["product_id"], product.as_str());
    assert!(event["traceparent"].is_string() && event["correlationid"].is_string());

    // users and products announce themselves too.
    for (topic, ty) in [
        ("users", "user.registered"),
        ("products", "product.created"),
    ] {
        let tailed = events(
            &shop,
            &[
                "tail", "--topic", topic, "--from", "earliest", "--json", "--count", "1",
            ],
        );
        let event: Value = serde_json::from_str(tailed.lines().next().unwrap()).unwrap();
        assert_eq!(event["type"], ty, "{event}");
    }

    // A producer outside Bazaar writes garbage: every consumer sets it aside and goes on.
    let bus = messaging::embedded::client::EmbeddedBus::new(&shop.url("control-plane"));
    messaging::EventBus::publish_raw(&bus, "orders", "x", bytes_of("{oops"))
        .await
        .unwrap();
    assert_eq!(place_orders(&shop, &token, &product, 1).await, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let letters: Vec<Value> = loop {
        let listed = events(&shop, &["dlq", "list", "--topic", "orders", "--json"]);
        let letters: Vec<Value> = listed
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if letters.len() == 3 {
            break letters;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "dead letters: {letters:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut groups: Vec<&str> = letters
        .iter()
        .map(|l| l["data"]["group"].as_str().unwrap())
        .collect();
    groups.sort_unstable();
    assert_eq!(groups, ["inventory", "notifications", "recommendations"]);
    assert!(
        letters[0]["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("invalid CloudEvent")
    );
    assert_eq!(letters[0]["data"]["payload"], "{oops");
    // The order after the garbage was still handled.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, page) = shop.get("/notifications", Some(&token)).await;
        let received = page["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["kind"] == "order_received")
            .count();
        if received == 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{page}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let replayed = events(
        &shop,
        &[
            "replay",
            "--topic",
            "orders",
            "--group",
            "notifications",
            "--from",
            "earliest",
        ],
    );
    assert!(replayed.contains("restarts from"), "{replayed}");
    assert!(shop.interrupt().success());
}

fn bytes_of(s: &'static str) -> bytes::Bytes {
    bytes::Bytes::from_static(s.as_bytes())
}

#[test]
fn events_commands_name_a_bad_position_or_a_missing_shop_in_one_line() {
    let run = |args: &[&str]| {
        std::process::Command::new(support::BIN)
            .arg("events")
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["tail", "--from", "yesterday"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("use earliest, latest, an offset"),
        "{stderr}"
    );
    let nowhere =
        std::env::temp_dir().join(format!("bazaar-none-{}", uuid::Uuid::new_v4().simple()));
    let out = run(&["dlq", "list", "--data-dir", nowhere.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("start one with `bazaar up`"), "{stderr}");
}
