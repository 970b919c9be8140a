//! The etcd backend against a real etcd server started on free ports.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use discovery::etcd::{EtcdClient, EtcdRegistrar, EtcdResolver};
use discovery::testing::Etcd;
use discovery::{Registrar, Registration, Resolver, StaticResolver};

fn ids(resolver: &EtcdResolver, service: &str) -> Vec<String> {
    resolver
        .resolve(service)
        .map(|i| i.iter().map(|i| i.id.clone()).collect())
        .unwrap_or_default()
}

/// Waits until `service` resolves to exactly `want` (ids), returning how long it took.
async fn until(
    resolver: &EtcdResolver,
    service: &str,
    want: &[&str],
    within: Duration,
) -> Duration {
    let started = Instant::now();
    let mut changes = resolver.changes();
    loop {
        if ids(resolver, service) == want {
            return started.elapsed();
        }
        let left = within.saturating_sub(started.elapsed());
        assert!(
            !left.is_zero(),
            "{service} resolved to {:?}, expected {want:?}",
            ids(resolver, service)
        );
        let _ = tokio::time::timeout(left, changes.changed()).await;
    }
}

fn instance(name: &str, port: u16) -> Registration {
    Registration::http(name, "127.0.0.1", port)
}

#[tokio::test]
async fn registrations_reach_a_watching_resolver_and_deregistrations_remove_them() {
    let etcd = Etcd::start();
    let prefix = format!("/t-{}/", std::process::id());
    let client = EtcdClient::new(&etcd.url, &prefix);
    let registrar = EtcdRegistrar::new(client.clone(), Duration::from_secs(10));
    let resolver = EtcdResolver::new(client, StaticResolver::default());

    registrar.register(&instance("orders", 9001)).await.unwrap();
    resolver
        .ready("orders", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(ids(&resolver, "orders"), ["orders-127.0.0.1-9001"]);

    // A second instance arrives through the watch, not a re-read.
    registrar.register(&instance("orders", 9002)).await.unwrap();
    let took = until(
        &resolver,
        "orders",
        &["orders-127.0.0.1-9001", "orders-127.0.0.1-9002"],
        Duration::from_secs(2),
    )
    .await;
    eprintln!("a registration reached the watcher in {took:?}");
    // Registering again is a keep-alive, not a second key.
    registrar.register(&instance("orders", 9002)).await.unwrap();
    assert_eq!(ids(&resolver, "orders").len(), 2);
    // Other services under the prefix are not mixed in.
    registrar
        .register(&instance("orders-v2", 9003))
        .await
        .unwrap();

    registrar.deregister("orders-127.0.0.1-9001").await.unwrap();
    until(
        &resolver,
        "orders",
        &["orders-127.0.0.1-9002"],
        Duration::from_secs(2),
    )
    .await;
    assert!(!resolver.stale("orders"));
}

#[tokio::test]
async fn an_instance_that_stops_refreshing_disappears_when_its_lease_ends() {
    let etcd = Etcd::start();
    let client = EtcdClient::new(&etcd.url, "/lease-test/");
    let resolver = EtcdResolver::new(client.clone(), StaticResolver::default());
    // The registrar of a process that then crashes: nobody keeps its lease alive.
    let crashed = EtcdRegistrar::new(client.clone(), Duration::from_secs(2));
    crashed.register(&instance("users", 9101)).await.unwrap();
    let alive = EtcdRegistrar::new(client, Duration::from_secs(2));
    alive.register(&instance("users", 9102)).await.unwrap();
    resolver
        .ready("users", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(ids(&resolver, "users").len(), 2);

    let keep_alive = tokio::spawn(async move {
        loop {
            tokio::time::sleep(alive.refresh_every()).await;
            alive.register(&instance("users", 9102)).await.unwrap();
        }
    });
    // etcd checks expiry with up to a second of slack beyond the TTL.
    let took = until(
        &resolver,
        "users",
        &["users-127.0.0.1-9102"],
        Duration::from_secs(6),
    )
    .await;
    eprintln!("the crashed instance left after {took:?}");
    assert!(
        took >= Duration::from_millis(1500),
        "left before its lease ended: {took:?}"
    );
    keep_alive.abort();
}

#[tokio::test]
async fn an_etcd_outage_serves_the_last_known_set_marked_stale_then_recovers() {
    let mut etcd = Etcd::start();
    let client = EtcdClient::new(&etcd.url, "/outage-test/");
    let registrar = EtcdRegistrar::new(client.clone(), Duration::from_secs(30));
    let resolver = EtcdResolver::new(client, StaticResolver::default());
    registrar
        .register(&instance("products", 9201))
        .await
        .unwrap();
    resolver
        .ready("products", Duration::from_secs(5))
        .await
        .unwrap();

    etcd.kill();
    let mut changes = resolver.changes();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !resolver.stale("products") {
        assert!(Instant::now() < deadline, "the outage was never noticed");
        let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
    }
    // Still answering, from the last known set.
    assert_eq!(ids(&resolver, "products"), ["products-127.0.0.1-9201"]);
    assert!(
        registrar
            .register(&instance("products", 9202))
            .await
            .is_err()
    );

    etcd.restart();
    // The lease outlived the outage: the instance is still there, and fresh.
    let deadline = Instant::now() + Duration::from_secs(10);
    while resolver.stale("products") {
        assert!(Instant::now() < deadline, "never recovered from the outage");
        let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
    }
    registrar
        .register(&instance("products", 9202))
        .await
        .unwrap();
    until(
        &resolver,
        "products",
        &["products-127.0.0.1-9201", "products-127.0.0.1-9202"],
        Duration::from_secs(3),
    )
    .await;
}
