//! A shop started with the real `bazaar` binary on free ports, in a fresh data dir.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_bazaar");

/// The first line of the log at `path` that contains `needle`, waiting up to 5 s
/// for it: a line reaches the file a moment after the request that caused it (and up
/// to 200 ms later with `log.buffer`).
pub async fn eventually_logged(path: &std::path::Path, needle: &str) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(needle)) {
            return Some(line.to_owned());
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub struct Shop {
    pub child: Child,
    pub gateway: String,
    pub urls: Vec<(String, String)>,
    pub data_dir: PathBuf,
    pub http: reqwest::Client,
}

impl Shop {
    /// `bazaar up --port 0` in `mode`, with extra environment.
    pub fn up(mode: &str, env: &[(&str, &str)]) -> Shop {
        Self::up_with_args(mode, &[], env)
    }

    /// [`Shop::up`] with extra `bazaar up` arguments.
    pub fn up_with_args(mode: &str, args: &[&str], env: &[(&str, &str)]) -> Shop {
        let data_dir =
            std::env::temp_dir().join(format!("bazaar-it-{}", uuid::Uuid::new_v4().simple()));
        let mut command = Command::new(BIN);
        command
            .args(["up", "--port", "0", "--mode", mode, "--data-dir"])
            .arg(&data_dir)
            .args(args)
            .env("BAZAAR_LOG__LEVEL", "info")
            // Shops run in parallel here: none may take the registry's fixed port.
            .env("BAZAAR_CONTROL_PLANE__PORT", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut urls = Vec::new();
        let mut lines = BufReader::new(stdout).lines();
        let deadline = Instant::now() + Duration::from_secs(90);
        for line in lines.by_ref() {
            let line = line.unwrap();
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.len() >= 2 && words[1].starts_with("http://") {
                urls.push((words[0].to_owned(), words[1].to_owned()));
            }
            if line.starts_with("Press Ctrl-C") {
                break;
            }
            assert!(Instant::now() < deadline, "bazaar up did not come up");
        }
        // Keep draining stdout so the supervisor never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let gateway = urls
            .iter()
            .find(|(n, _)| n == "gateway")
            .expect("no gateway URL printed")
            .1
            .clone();
        Shop {
            child,
            gateway,
            urls,
            data_dir,
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, service: &str) -> String {
        self.urls
            .iter()
            .find(|(n, _)| n == service)
            .unwrap()
            .1
            .clone()
    }

    /// `bazaar ps --json` for this shop.
    pub fn ps(&self) -> Vec<Value> {
        let out = Command::new(BIN)
            .args(["ps", "--json", "--data-dir"])
            .arg(&self.data_dir)
            .output()
            .unwrap();
        assert!(out.status.success());
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn pid_of(&self, name: &str) -> i32 {
        self.ps().iter().find(|p| p["name"] == name).unwrap()["pid"]
            .as_i64()
            .unwrap() as i32
    }

    /// Sends SIGINT (Ctrl-C) and waits for `up` to exit.
    pub fn interrupt(&mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "bazaar up did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut req = self
            .http
            .post(format!("{}{path}", self.gateway))
            .json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut req = self.http.get(format!("{}{path}", self.gateway));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// Signs up a fresh user and returns (user id, access token).
    pub async fn user(&self) -> (String, String) {
        let email = format!("{}@example.com", uuid::Uuid::new_v4().simple());
        let (status, user) = self
            .post(
                "/users",
                None,
                json!({"email": email, "name": "Test", "password": "password123"}),
            )
            .await;
        assert_eq!(status, 201, "{user}");
        (
            user["id"].as_str().unwrap().to_owned(),
            self.login(&email).await,
        )
    }

    pub async fn login(&self, email: &str) -> String {
        self.login_with(email, "password123").await
    }

    pub async fn login_with(&self, email: &str, password: &str) -> String {
        let (status, token) = self
            .post(
                "/auth/login",
                None,
                json!({"email": email, "password": password}),
            )
            .await;
        assert_eq!(status, 200, "{token}");
        token["access_token"].as_str().unwrap().to_owned()
    }

    /// Waits until inventory has heard of `products` (their product.created may
    /// still be on its way in a fresh shop).
    pub async fn stocked(&self, products: &[String]) {
        for p in products {
            let url = self.stock_url(p);
            let deadline = Instant::now() + Duration::from_secs(15);
            while self.http.get(&url).send().await.unwrap().status() != 200 {
                assert!(Instant::now() < deadline, "inventory never heard of {p}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Waits (up to a minute) until each of `products` has `units` available.
    pub async fn available_again(&self, products: &[String], units: i64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        for p in products {
            let url = self.stock_url(p);
            loop {
                let response = self.http.get(&url).send().await.unwrap();
                let stock: Value = response.json().await.unwrap();
                if stock["available"] == units {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{p} never had {units} units available again: {stock}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Inventory's stock of product `p`, asked of the service itself.
    fn stock_url(&self, p: &str) -> String {
        format!("{}/inventory/{p}", self.url("inventory"))
    }

    pub async fn product_ids(&self, n: usize) -> Vec<String> {
        let (_, page) = self.get(&format!("/products?limit={n}"), None).await;
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap().to_owned())
            .collect()
    }
}

impl Drop for Shop {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}
