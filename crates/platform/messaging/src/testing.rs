//! Test support: a real Kafka-protocol broker, `tansu` (written in Rust), on a free
//! loopback port with in-memory storage, killed on drop.
//! `scripts/install-tansu.sh` installs it; `TANSU_BIN` points elsewhere.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running broker.
pub struct Tansu {
    child: Child,
    /// Where it listens.
    pub port: u16,
}

impl Tansu {
    /// A broker on a free port.
    pub fn start() -> Tansu {
        let port = free_port();
        Tansu::start_advertising(port, port)
    }

    /// Listens on `port` and tells clients to connect to `advertised` (a proxy in
    /// front of it, say).
    pub fn start_advertising(port: u16, advertised: u16) -> Tansu {
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
        Tansu { child, port }
    }

    /// `127.0.0.1:<port>`, for `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
