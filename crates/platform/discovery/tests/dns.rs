//! The DNS backend against a real DNS server (hickory's) on a free UDP port, serving
//! a zone shaped like Kubernetes': SRV records of headless services, A records.
#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use discovery::dns::{DnsConfig, DnsResolver, DnsSource};
use discovery::{ResolveError, Resolver, StaticResolver};
use hickory_proto::rr::rdata::{A, SOA, SRV};
use hickory_proto::rr::{LowerName, Name, RData, Record};
use hickory_server::ServerFuture;
use hickory_server::authority::{Catalog, ZoneType};
use hickory_server::store::in_memory::InMemoryAuthority;

const ZONE: &str = "default.svc.cluster.local.";

fn name(s: &str) -> Name {
    Name::from_str(s).unwrap()
}

fn srv(service: &str, pod: &str, port: u16) -> Record {
    Record::from_rdata(
        name(&format!("_http._tcp.{service}.{ZONE}")),
        1,
        RData::SRV(SRV::new(
            0,
            50,
            port,
            name(&format!("{pod}.{service}.{ZONE}")),
        )),
    )
}

fn a(host: &str, ip: [u8; 4]) -> Record {
    Record::from_rdata(
        name(&format!("{host}.{ZONE}")),
        1,
        RData::A(A(Ipv4Addr::from(ip))),
    )
}

struct Dns {
    zone: Arc<InMemoryAuthority>,
    server: ServerFuture<Catalog>,
    addr: std::net::SocketAddr,
}

async fn start() -> Dns {
    let zone = Arc::new(InMemoryAuthority::empty(
        name(ZONE),
        ZoneType::Primary,
        false,
    ));
    let soa = SOA::new(
        name(&format!("ns.{ZONE}")),
        name(&format!("admin.{ZONE}")),
        1,
        60,
        60,
        60,
        1,
    );
    zone.upsert(Record::from_rdata(name(ZONE), 1, RData::SOA(soa)), 1)
        .await;
    for record in [
        srv("orders", "pod-a", 9001),
        srv("orders", "pod-b", 9002),
        a("pod-a.orders", [127, 0, 0, 10]),
        a("pod-b.orders", [127, 0, 0, 11]),
        a("pod-c.orders", [127, 0, 0, 12]),
        // A service without a named port: A records only.
        a("users", [127, 0, 0, 20]),
        a("users", [127, 0, 0, 21]),
    ] {
        zone.upsert(record, 1).await;
    }
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::new(&name(ZONE)), vec![zone.clone()]);
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let mut server = ServerFuture::new(catalog);
    server.register_socket(socket);
    Dns { zone, server, addr }
}

fn resolver(dns: &Dns) -> DnsResolver {
    let source = DnsSource::new(DnsConfig {
        server: Some(dns.addr),
        port: 8081,
        min_refresh: Duration::from_millis(200),
        max_refresh: Duration::from_secs(1),
        ..DnsConfig::default()
    })
    .unwrap();
    DnsResolver::new(source, StaticResolver::default())
}

fn urls(resolver: &DnsResolver, service: &str) -> Vec<String> {
    resolver
        .resolve(service)
        .map(|i| i.iter().map(|i| i.base_url.to_string()).collect())
        .unwrap_or_default()
}

async fn until(resolver: &DnsResolver, what: impl Fn(&DnsResolver) -> bool, within: Duration) {
    let deadline = Instant::now() + within;
    let mut changes = resolver.changes();
    while !what(resolver) {
        assert!(
            Instant::now() < deadline,
            "condition not reached in {within:?}"
        );
        let _ = tokio::time::timeout(Duration::from_millis(500), changes.changed()).await;
    }
}

#[tokio::test]
async fn srv_records_become_instances_and_new_pods_show_up_on_refresh() {
    let dns = start().await;
    let resolver = resolver(&dns);
    resolver
        .ready("orders", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        urls(&resolver, "orders"),
        ["http://127.0.0.10:9001/", "http://127.0.0.11:9002/"]
    );
    assert_eq!(
        resolver.resolve("orders").unwrap()[0].id,
        "orders-127.0.0.10-9001"
    );

    // A third pod becomes ready: its SRV record appears, the resolver follows.
    dns.zone.upsert(srv("orders", "pod-c", 9003), 2).await;
    until(
        &resolver,
        |r| urls(r, "orders").len() == 3,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(urls(&resolver, "orders")[2], "http://127.0.0.12:9003/");
}

#[tokio::test]
async fn a_records_with_the_configured_port_serve_services_without_srv() {
    let dns = start().await;
    let resolver = resolver(&dns);
    resolver
        .ready("users", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        urls(&resolver, "users"),
        ["http://127.0.0.20:8081/", "http://127.0.0.21:8081/"]
    );
    // A name with no records at all is known, but has no instances.
    resolver
        .ready("ghost", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        resolver.resolve("ghost").unwrap_err(),
        ResolveError::NoInstances("ghost".into())
    );
}

#[tokio::test]
async fn a_dead_dns_server_leaves_the_last_answer_in_place_marked_stale() {
    let mut dns = start().await;
    let resolver = resolver(&dns);
    resolver
        .ready("orders", Duration::from_secs(5))
        .await
        .unwrap();
    dns.server.shutdown_gracefully().await.unwrap();
    until(&resolver, |r| r.stale("orders"), Duration::from_secs(15)).await;
    assert_eq!(urls(&resolver, "orders").len(), 2);
}
