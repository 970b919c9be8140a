//! The conformance suite against a real Kafka-protocol broker: `tansu` (a Kafka
//! broker written in Rust), started by each test on a free port with in-memory
//! storage. `scripts/install-tansu.sh` installs it; `TANSU_BIN` points elsewhere.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod conformance;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use messaging::kafka::{KafkaBus, KafkaConfig};

/// `TANSU_BIN`, else where `scripts/install-tansu.sh` puts it, else the PATH.
fn binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("TANSU_BIN") {
        return bin.into();
    }
    let cached = std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cache/bazaar/tansu/bin/tansu"));
    cached
        .filter(|p| p.is_file())
        .unwrap_or_else(|| "tansu".into())
}

/// A running broker, killed on drop.
struct Tansu {
    child: Child,
}

impl Tansu {
    /// Listens on `port` and tells clients to come back through `advertised`.
    fn start(port: u16, advertised: u16) -> Tansu {
        let bin = binary();
        let child = Command::new(&bin)
            .arg("broker")
            .arg(format!("--listener-url=tcp://127.0.0.1:{port}"))
            .arg(format!(
                "--advertised-listener-url=tcp://127.0.0.1:{advertised}"
            ))
            .arg("--storage-engine=memory://tansu/")
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start tansu ({}): {e}; install it with scripts/install-tansu.sh \
                     or point TANSU_BIN at a tansu binary",
                    bin.display()
                )
            });
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Tansu { child }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn connect(port: u16) -> conformance::Bus {
    let bus = KafkaBus::connect(KafkaConfig {
        brokers: format!("127.0.0.1:{port}"),
        partitions: 4,
        ..KafkaConfig::default()
    })
    .unwrap();
    Arc::new(bus)
}

async fn bus() -> (conformance::Bus, impl std::future::Future<Output = ()>) {
    let port = free_port();
    let tansu = Tansu::start(port, port);
    (connect(port), async move { drop(tansu) })
}

async fn behind_proxy() -> (
    conformance::Bus,
    conformance::Proxy,
    impl std::future::Future<Output = ()>,
) {
    let proxy = conformance::Proxy::bind().await;
    let port = free_port();
    let tansu = Tansu::start(port, proxy.addr.port());
    proxy.forward_to(SocketAddr::from(([127, 0, 0, 1], port)));
    (
        connect(proxy.addr.port()),
        proxy,
        async move { drop(tansu) },
    )
}

/// Kafka keeps no delivery count across owners.
const KAFKA: conformance::Traits = conformance::Traits {
    attempts_survive_handover: false,
};

conformance::suite!(bus, behind_proxy, KAFKA);
