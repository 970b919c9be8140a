//! `bazaar load`: drives the shop through its gateway as customers would: sign up,
//! log in, browse a product, order it.
//!
//! Open loop (`--rate`): an order journey starts every 1/R s whatever the shop's
//! latency, and each request's latency counts from when it was due, not from when it
//! was sent, so a slow shop cannot hide its queueing (no coordinated omission).
//! Closed loop (`--users`): N customers each start the next journey when the last
//! ended. Latencies go into HdrHistograms; the saga's completion latency (placed ->
//! CONFIRMED or CANCELLED) comes from the orders service's own timestamps.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;

/// How the load is shaped.
#[derive(Clone, Copy, Debug)]
pub enum Shape {
    /// Journeys started per second.
    Rate(u32),
    /// Customers looping.
    Users(u32),
}

pub struct Target {
    pub gateway: String,
    /// The orders service, for the saga's latencies (`None`: measured by reading
    /// each order back through the gateway).
    pub orders: Option<String>,
    /// Where the ids of the orders the shop accepted are added, one a line, for
    /// `bazaar verify` to find each of them again (a shop in a data directory).
    pub accepted: Option<std::path::PathBuf>,
}

/// The file under a data directory where `load` notes the orders it placed.
pub fn accepted_file(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("load").join("accepted-orders")
}

/// Adds `ids` to the accepted orders' file, one a line.
fn note_accepted(path: &std::path::Path, ids: &[(String, String)]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut text = String::with_capacity(ids.len() * 37);
    for (id, _) in ids {
        text.push_str(id);
        text.push('\n');
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("noting the accepted orders in {}", path.display()))
}

/// Customers signed up before the clock starts, shared by the journeys.
const CUSTOMERS: usize = 20;
/// Journeys in flight at most; past it a due journey counts as an error
/// (`client saturated`) rather than waiting.
const MAX_IN_FLIGHT: usize = 20_000;

struct Tally {
    requests: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    placed: Vec<(String, String)>,
}

impl Tally {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            requests: Histogram::new_with_bounds(1, 60_000_000, 3)?,
            errors: BTreeMap::new(),
            placed: Vec::new(),
        })
    }
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

fn latency(h: &Histogram<u64>) -> Latency {
    let ms = |us: u64| us as f64 / 1000.0;
    Latency {
        count: h.len(),
        p50_ms: ms(h.value_at_quantile(0.5)),
        p90_ms: ms(h.value_at_quantile(0.9)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub shape: Value,
    pub seconds: f64,
    pub journeys: u64,
    pub requests: Latency,
    pub requests_per_second: f64,
    pub errors: BTreeMap<String, u64>,
    pub orders_placed: usize,
    pub orders_per_second: f64,
    pub confirmed: u64,
    pub cancelled: BTreeMap<String, u64>,
    pub pending: u64,
    /// Orders the shop accepted that the orders service does not list (read
    /// through the orders service only): lost.
    pub missing: u64,
    /// Placed -> CONFIRMED or CANCELLED.
    pub saga: Latency,
    /// Where a saga's time goes, from up to 200 sampled orders' step histories: each
    /// step from sent to answered (`reserve`, `charge`; in choreography, where nothing
    /// is sent, from the step before). Timed from a step's first attempt.
    pub steps: BTreeMap<String, Latency>,
    /// Attempts sent again because no reply came in time, per sampled order, by
    /// step (orchestration): under a backlog, the orchestrator's retries are load.
    pub step_retries: BTreeMap<String, f64>,
}

struct Customer {
    token: String,
}

/// How long a request outside the measured journeys (setting up customers, reading
/// the orders back) keeps being retried: `bazaar chaos` may have just killed the
/// service it needs, and the supervisor brings it back within seconds.
const PATIENCE: Duration = Duration::from_secs(30);

/// Sends the request `make` builds until it gets an answer that is not a server
/// error nor a 429, for up to [`PATIENCE`]; the last failure otherwise.
async fn patiently(
    make: impl Fn() -> reqwest::RequestBuilder,
) -> anyhow::Result<reqwest::Response> {
    let deadline = Instant::now() + PATIENCE;
    let mut pause = Duration::from_millis(100);
    loop {
        let failure = match make().send().await {
            Ok(r)
                if !(r.status().is_server_error()
                    || r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS) =>
            {
                return Ok(r);
            }
            Ok(r) => {
                let status = r.status();
                anyhow::anyhow!("{status}: {}", r.text().await.unwrap_or_default())
            }
            Err(e) => anyhow::Error::new(e),
        };
        if Instant::now() + pause > deadline {
            return Err(failure);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

async fn setup(
    http: &reqwest::Client,
    gateway: &str,
) -> anyhow::Result<(Vec<Customer>, Vec<String>)> {
    let mut customers = Vec::new();
    let run = uuid::Uuid::new_v4().simple().to_string();
    for n in 0..CUSTOMERS {
        let email = format!("load-{}-{n}@example.com", &run[..8]);
        let password = "load-test-password";
        let signed = patiently(|| {
            http.post(format!("{gateway}/users"))
                .json(&json!({"email": email, "name": format!("Load {n}"), "password": password}))
        })
        .await
        .with_context(|| format!("cannot reach the gateway at {gateway}"))?;
        // A conflict after a retry: the first try created the customer and its
        // answer was lost (the addresses are this run's own).
        if !signed.status().is_success() && signed.status() != reqwest::StatusCode::CONFLICT {
            bail!(
                "signing up a customer failed: {}",
                signed.text().await.unwrap_or_default()
            );
        }
        let login: Value = patiently(|| {
            http.post(format!("{gateway}/auth/login"))
                .json(&json!({"email": email, "password": password}))
        })
        .await
        .context("logging a customer in")?
        .error_for_status()
        .context("logging a customer in")?
        .json()
        .await?;
        let token = login["access_token"]
            .as_str()
            .context("login answered without an access_token")?
            .to_owned();
        customers.push(Customer { token });
    }
    let page: Value = patiently(|| http.get(format!("{gateway}/products?limit=50")))
        .await
        .context("listing products")?
        .error_for_status()
        .context("listing products")?
        .json()
        .await?;
    let products: Vec<String> = page["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|p| p["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if products.is_empty() {
        bail!("the catalog is empty: nothing to order");
    }
    Ok((customers, products))
}

/// What every journey shares.
struct Driver {
    http: reqwest::Client,
    gateway: String,
    customers: Vec<Customer>,
    products: Vec<String>,
    tally: Mutex<Tally>,
    journeys: AtomicU64,
}

impl Driver {
    /// Journey `n` of customer `customer`: look at a product, order one or two of it.
    /// Latencies count from `due`.
    async fn journey(&self, customer: usize, n: usize, due: Instant) {
        let customer = &self.customers[customer % self.customers.len()];
        let product = &self.products[n % self.products.len()];
        let quantity = 1 + n % 2;
        let (http, gateway, tally) = (&self.http, &self.gateway, &self.tally);
        let record = |tally: &mut Tally, started: Instant, outcome: Result<(), String>| {
            let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            let _ = tally.requests.record(us.max(1));
            if let Err(kind) = outcome {
                *tally.errors.entry(kind).or_default() += 1;
            }
        };
        let outcome = match http
            .get(format!("{gateway}/products/{product}"))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("GET /products/{{id}} {}", r.status().as_u16())),
            Err(e) => Err(format!("GET /products/{{id}}: {}", kind_of(&e))),
        };
        record(&mut *tally.lock().await, due, outcome);
        let sent = Instant::now();
        let placed = http
            .post(format!("{gateway}/orders"))
            .bearer_auth(&customer.token)
            .json(&json!({"items": [{"product_id": product, "quantity": quantity}]}))
            .send()
            .await;
        let mut t = tally.lock().await;
        match placed {
            Ok(r) if r.status().as_u16() == 201 => {
                record(&mut t, sent, Ok(()));
                drop(t);
                if let Ok(order) = r.json::<Value>().await
                    && let Some(id) = order["id"].as_str()
                {
                    tally
                        .lock()
                        .await
                        .placed
                        .push((id.to_owned(), customer.token.clone()));
                }
            }
            Ok(r) => record(
                &mut t,
                sent,
                Err(format!("POST /orders {}", r.status().as_u16())),
            ),
            Err(e) => record(&mut t, sent, Err(format!("POST /orders: {}", kind_of(&e)))),
        }
        self.journeys.fetch_add(1, Ordering::Relaxed);
    }
}

fn kind_of(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connection refused"
    } else {
        "transport error"
    }
}

/// Runs the load for `duration` and reports.
pub async fn run(
    target: Target,
    shape: Shape,
    duration: Duration,
    json_out: bool,
) -> anyhow::Result<Report> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(1024)
        // Dropped well before the gateway closes an idle connection (its
        // `header_timeout`, 10 s by default): reqwest keeps them 90 s, and a request
        // sent on one the gateway was closing failed as a transport error (one
        // request of 40,000 in a run at 1,000 orders/s): the tool's error, not the
        // shop's.
        .pool_idle_timeout(Duration::from_secs(4))
        .build()?;
    let gateway = target.gateway.trim_end_matches('/').to_owned();
    let (customers, products) = setup(&http, &gateway).await?;
    let driver = Arc::new(Driver {
        http: http.clone(),
        gateway: gateway.clone(),
        customers,
        products,
        tally: Mutex::new(Tally::new()?),
        journeys: AtomicU64::new(0),
    });
    let started = Instant::now();
    let end = started + duration;
    let progress = {
        let driver = driver.clone();
        tokio::spawn(async move {
            if json_out {
                return;
            }
            let mut last = 0u64;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let t = driver.tally.lock().await;
                let n = t.requests.len();
                let errors: u64 = t.errors.values().sum();
                eprint!(
                    "\r{:>5.0}s  {:>7} req/s  errors {:<6} p50 {:>7.2} ms  p99 {:>7.2} ms  orders {:<8}",
                    started.elapsed().as_secs_f64(),
                    n - last,
                    errors,
                    t.requests.value_at_quantile(0.5) as f64 / 1000.0,
                    t.requests.value_at_quantile(0.99) as f64 / 1000.0,
                    t.placed.len()
                );
                let _ = std::io::stderr().flush();
                last = n;
            }
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    match shape {
        Shape::Rate(rate) => {
            let every = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
            let mut due = started;
            let mut n: usize = 0;
            while due < end {
                tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
                // Finished journeys are collected as we go, so the set stays small.
                while tasks.try_join_next().is_some() {}
                if tasks.len() >= MAX_IN_FLIGHT {
                    *driver
                        .tally
                        .lock()
                        .await
                        .errors
                        .entry("client saturated".to_owned())
                        .or_default() += 1;
                } else {
                    let (driver, this) = (driver.clone(), n);
                    tasks.spawn(async move { driver.journey(this, this, due).await });
                }
                n += 1;
                due += every;
            }
        }
        Shape::Users(users) => {
            for u in 0..users as usize {
                let driver = driver.clone();
                tasks.spawn(async move {
                    let mut n = u;
                    while Instant::now() < end {
                        driver.journey(u, n, Instant::now()).await;
                        n += users as usize;
                    }
                });
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    let seconds = started.elapsed().as_secs_f64();
    progress.abort();
    let _ = progress.await;
    if !json_out {
        eprintln!();
    }
    let driver = Arc::try_unwrap(driver).map_err(|_| anyhow::anyhow!("journeys still running"))?;
    let journeys = driver.journeys.load(Ordering::Relaxed);
    let tally = driver.tally.into_inner();
    if let Some(path) = &target.accepted {
        note_accepted(path, &tally.placed)?;
    }
    let sagas = saga_latencies(&http, &gateway, target.orders.as_deref(), &tally.placed).await?;
    let steps = step_latencies(&http, &gateway, &tally.placed).await?;
    let sampled = steps.sampled.max(1) as f64;
    let requests = latency(&tally.requests);
    Ok(Report {
        shape: match shape {
            Shape::Rate(r) => json!({"rate": r}),
            Shape::Users(u) => json!({"users": u}),
        },
        seconds,
        journeys,
        requests_per_second: requests.count as f64 / seconds,
        requests,
        errors: tally.errors,
        orders_placed: tally.placed.len(),
        orders_per_second: tally.placed.len() as f64 / seconds,
        confirmed: sagas.confirmed,
        cancelled: sagas.cancelled,
        pending: sagas.pending,
        missing: sagas.missing,
        saga: latency(&sagas.latency),
        steps: steps
            .latency
            .iter()
            .map(|(k, h)| (k.clone(), latency(h)))
            .collect(),
        step_retries: steps
            .retries
            .iter()
            .map(|(k, n)| (k.clone(), *n as f64 / sampled))
            .collect(),
    })
}

/// What the step histories of the sampled orders show.
struct Steps {
    latency: BTreeMap<String, Histogram<u64>>,
    /// Attempts the orchestrator sent again, by step.
    retries: BTreeMap<String, u64>,
    /// Orders whose history was read.
    sampled: u64,
}

/// Per-step latencies and retries of up to 200 orders spread over the run.
async fn step_latencies(
    http: &reqwest::Client,
    gateway: &str,
    placed: &[(String, String)],
) -> anyhow::Result<Steps> {
    let mut steps: BTreeMap<String, Histogram<u64>> = BTreeMap::new();
    let mut retries: BTreeMap<String, u64> = BTreeMap::new();
    let mut sampled = 0;
    let every = (placed.len() / 200).max(1);
    let parse = |v: &Value| {
        time::OffsetDateTime::parse(v.as_str()?, &time::format_description::well_known::Rfc3339)
            .ok()
    };
    for (id, token) in placed.iter().step_by(every) {
        // A sample that cannot be read back is left out of the step latencies.
        let read = patiently(|| {
            http.get(format!("{gateway}/orders/{id}"))
                .bearer_auth(token)
        });
        let Ok(order) = async { anyhow::Ok(read.await?.json::<Value>().await?) }.await else {
            continue;
        };
        let Some(created) = parse(&order["created_at"]) else {
            continue;
        };
        sampled += 1;
        let mut since: BTreeMap<String, time::OffsetDateTime> = BTreeMap::new();
        let mut last = created;
        for step in order["steps"].as_array().into_iter().flatten() {
            let (Some(name), Some(what), Some(at)) = (
                step["step"].as_str(),
                step["what"].as_str(),
                parse(&step["at"]),
            ) else {
                continue;
            };
            match what {
                // From the first attempt: a step sent again is timed from its start.
                "sent" | "requested" => {
                    since.entry(name.to_owned()).or_insert(at);
                }
                _ if what.starts_with("no reply to attempt") => {
                    *retries.entry(name.to_owned()).or_default() += 1;
                }
                "done" => {
                    // In choreography nothing is "sent": count from the step before.
                    let from = since.get(name).copied().unwrap_or(last);
                    let us = u64::try_from((at - from).whole_microseconds()).unwrap_or(0);
                    let h = match steps.entry(name.to_owned()) {
                        std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::btree_map::Entry::Vacant(e) => {
                            e.insert(Histogram::new_with_bounds(1, 3_600_000_000, 3)?)
                        }
                    };
                    let _ = h.record(us.max(1));
                }
                _ => {}
            }
            last = at;
        }
    }
    Ok(Steps {
        latency: steps,
        retries,
        sampled,
    })
}

struct Sagas {
    latency: Histogram<u64>,
    confirmed: u64,
    cancelled: BTreeMap<String, u64>,
    pending: u64,
    /// Accepted orders the orders service does not list: lost.
    missing: u64,
}

/// Waits (up to 30 s) for the placed orders to end and collects how long each took.
async fn saga_latencies(
    http: &reqwest::Client,
    gateway: &str,
    orders: Option<&str>,
    placed: &[(String, String)],
) -> anyhow::Result<Sagas> {
    let mut sagas = Sagas {
        latency: Histogram::new_with_bounds(1, 3_600_000_000, 3)?,
        confirmed: 0,
        cancelled: BTreeMap::new(),
        pending: 0,
        missing: 0,
    };
    let wanted: std::collections::HashSet<&str> =
        placed.iter().map(|(id, _)| id.as_str()).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let ended: BTreeMap<String, (String, Option<String>, Option<i64>)> = loop {
        let mut seen = BTreeMap::new();
        match orders {
            Some(base) => {
                let mut after = String::new();
                loop {
                    let page: Value = patiently(|| {
                        http.get(format!("{base}/admin/orders"))
                            .query(&[("limit", "1000"), ("after", after.as_str())])
                    })
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                    for o in page["items"].as_array().into_iter().flatten() {
                        if let Some(id) = o["id"].as_str().filter(|id| wanted.contains(id)) {
                            seen.insert(
                                id.to_owned(),
                                (
                                    o["status"].as_str().unwrap_or_default().to_owned(),
                                    o["reason"].as_str().map(str::to_owned),
                                    o["saga_ms"].as_i64(),
                                ),
                            );
                        }
                    }
                    match page["next"].as_str() {
                        Some(next) => after = next.to_owned(),
                        None => break,
                    }
                }
            }
            None => {
                for (id, token) in placed {
                    let o: Value = patiently(|| {
                        http.get(format!("{gateway}/orders/{id}"))
                            .bearer_auth(token)
                    })
                    .await?
                    .json()
                    .await?;
                    let saga_ms = ended_ms(&o);
                    seen.insert(
                        id.clone(),
                        (
                            o["status"].as_str().unwrap_or_default().to_owned(),
                            o["reason"].as_str().map(str::to_owned),
                            saga_ms,
                        ),
                    );
                }
            }
        }
        let open = seen.values().filter(|(s, _, _)| s == "PENDING").count();
        if open == 0 || Instant::now() >= deadline {
            break seen;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    sagas.missing = (wanted.len() - ended.len()) as u64;
    for (status, reason, ms) in ended.values() {
        match status.as_str() {
            "CONFIRMED" => sagas.confirmed += 1,
            "CANCELLED" => {
                *sagas
                    .cancelled
                    .entry(reason.clone().unwrap_or_else(|| "unknown".into()))
                    .or_default() += 1
            }
            _ => sagas.pending += 1,
        }
        if status != "PENDING"
            && let Some(ms) = ms
        {
            let us = u64::try_from(*ms).unwrap_or(0).saturating_mul(1000).max(1);
            let _ = sagas.latency.record(us);
        }
    }
    Ok(sagas)
}

/// Milliseconds from an order's creation to its saga's last step.
fn ended_ms(order: &Value) -> Option<i64> {
    let parse = |v: &Value| {
        time::OffsetDateTime::parse(v.as_str()?, &time::format_description::well_known::Rfc3339)
            .ok()
    };
    let created = parse(&order["created_at"])?;
    let last = order["steps"].as_array()?.last()?;
    let ended = parse(&last["at"])?;
    i64::try_from((ended - created).whole_milliseconds()).ok()
}

pub fn print(report: &Report, json_out: bool) -> anyhow::Result<()> {
    if json_out {
        println!("{}", serde_json::to_string(report)?);
        return Ok(());
    }
    let r = &report.requests;
    let s = &report.saga;
    println!(
        "{} journeys in {:.1}s: {} requests ({:.0}/s), {} orders placed ({:.0}/s)",
        report.journeys,
        report.seconds,
        r.count,
        report.requests_per_second,
        report.orders_placed,
        report.orders_per_second
    );
    println!(
        "requests  p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms",
        r.p50_ms, r.p90_ms, r.p99_ms, r.p999_ms, r.max_ms
    );
    println!(
        "sagas     p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms",
        s.p50_ms, s.p90_ms, s.p99_ms, s.p999_ms, s.max_ms
    );
    let cancelled: Vec<String> = report
        .cancelled
        .iter()
        .map(|(reason, n)| format!("{n} {reason}"))
        .collect();
    println!(
        "outcomes  {} confirmed, cancelled: {}, {} still pending",
        report.confirmed,
        if cancelled.is_empty() {
            "none".to_owned()
        } else {
            cancelled.join(", ")
        },
        report.pending
    );
    if report.missing > 0 {
        println!(
            "lost      {} accepted orders are not listed by the orders service",
            report.missing
        );
    }
    for (step, l) in &report.steps {
        println!(
            "  {step:<8} p50 {:.2} ms  p99 {:.2} ms  (sent -> answered, {} sampled){}",
            l.p50_ms,
            l.p99_ms,
            l.count,
            match report.step_retries.get(step) {
                Some(n) => format!(", {n:.2} retries an order"),
                None => String::new(),
            }
        );
    }
    if report.errors.is_empty() {
        println!("errors    none");
    } else {
        for (kind, n) in &report.errors {
            println!("errors    {n} {kind}");
        }
    }
    Ok(())
}
