//! `bazaar verify`: checks the shop's invariants through its services' APIs only
//! (never their databases), the way an auditor outside the system would:
//! - every accepted order reaches a terminal status, and none is lost (each order
//!   `bazaar load` saw the shop accept, noted in the data directory, is known);
//! - stock is conserved (initial = available + reserved + sold) and no product is
//!   oversold; what was sold is what confirmed orders bought, and nothing stays
//!   reserved once every order ended; a confirmed order's reservation was sold, a
//!   cancelled one's holds nothing;
//! - each confirmed order has exactly one charge and no refund; each cancelled order
//!   that was charged has exactly one refund; no order is charged twice;
//! - exactly one closing notification (confirmed or cancelled, as the order) per
//!   terminal order.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::ps::Shop;

/// One broken invariant, with the ids to look at.
#[derive(Debug, Serialize)]
pub struct Violation {
    pub invariant: &'static str,
    pub ids: Vec<String>,
    pub detail: String,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub orders: usize,
    pub confirmed: usize,
    pub cancelled: usize,
    pub pending: usize,
    pub products: usize,
    pub charges: usize,
    pub refunds: usize,
    pub notifications: usize,
    pub violations: Vec<Violation>,
}

/// The services' base URLs, found as `bazaar ps` finds them.
async fn urls(shop: &Shop) -> anyhow::Result<HashMap<String, String>> {
    let rows = shop.rows().await?;
    if rows.is_empty() {
        return Err(shop.nothing_runs());
    }
    let mut urls = HashMap::new();
    for row in &rows {
        // `orders-2` and the like are more instances of the same service.
        urls.entry(crate::ps::service_of(&row.name).to_owned())
            .or_insert_with(|| shop.base_url(row));
    }
    Ok(urls)
}

/// Every item of a keyset-paged listing (`items`, `next` passed back as `after`).
async fn all<T: DeserializeOwned>(
    http: &reqwest::Client,
    base: &str,
    path: &str,
) -> anyhow::Result<Vec<T>> {
    let mut items = Vec::new();
    let mut after = String::new();
    loop {
        let page: Value = http
            .get(format!("{base}{path}"))
            .query(&[("after", after.as_str())])
            .send()
            .await
            .with_context(|| format!("GET {base}{path}"))?
            .error_for_status()
            .with_context(|| format!("GET {base}{path}"))?
            .json()
            .await
            .with_context(|| format!("GET {base}{path}: not JSON"))?;
        let batch: Vec<T> = serde_json::from_value(page["items"].clone())
            .with_context(|| format!("GET {base}{path}: unexpected items"))?;
        items.extend(batch);
        match page["next"].as_str() {
            Some(next) if !next.is_empty() => after = next.to_owned(),
            _ => return Ok(items),
        }
    }
}

#[derive(Debug, serde::Deserialize)]
struct Order {
    id: String,
    status: String,
    reason: Option<String>,
    items: Vec<Line>,
}

#[derive(Debug, serde::Deserialize)]
struct Line {
    product_id: String,
    quantity: i64,
}

#[derive(Debug, serde::Deserialize)]
struct Stock {
    product_id: String,
    initial: i64,
    available: i64,
    reserved: i64,
    sold: i64,
}

#[derive(Debug, serde::Deserialize)]
struct Payment {
    order_id: String,
    charges: Vec<Charge>,
    refunds: Vec<Refund>,
}

#[derive(Debug, serde::Deserialize)]
struct Charge {
    status: String,
}

#[derive(Debug, serde::Deserialize)]
struct Refund {
    amount_cents: i64,
}

#[derive(Debug, serde::Deserialize)]
struct Reservation {
    order_id: String,
    status: String,
}

#[derive(Debug, serde::Deserialize)]
struct Notification {
    kind: String,
    order_id: String,
}

fn service<'a>(urls: &'a HashMap<String, String>, name: &str) -> anyhow::Result<&'a str> {
    urls.get(name)
        .map(String::as_str)
        .with_context(|| format!("the running shop has no `{name}` service"))
}

/// Checks the invariants. The shop is eventually consistent (an order's end reaches
/// inventory and payments as events), so a check that finds a violation is made again
/// until `settle` has passed: what verify reports is what stayed broken.
pub async fn check(shop: &Shop, settle: Duration) -> anyhow::Result<Report> {
    let urls = urls(shop).await?;
    let http = shop.client(Duration::from_secs(30))?;
    let accepted = accepted(shop)?;
    let deadline = Instant::now() + settle;
    loop {
        let report = check_once(&http, &urls, &accepted).await?;
        if report.violations.is_empty() || Instant::now() >= deadline {
            return Ok(report);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The orders `bazaar load` saw the shop accept, where it noted them (a shop in a
/// data directory); none when it never ran there.
fn accepted(shop: &Shop) -> anyhow::Result<Vec<String>> {
    let Shop::Local(dir) = shop else {
        return Ok(Vec::new());
    };
    let path = crate::load::accepted_file(dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

async fn check_once(
    http: &reqwest::Client,
    urls: &HashMap<String, String>,
    accepted: &[String],
) -> anyhow::Result<Report> {
    let orders: Vec<Order> =
        all(http, service(urls, "orders")?, "/admin/orders?limit=1000").await?;
    let stock: Vec<Stock> = all(http, service(urls, "inventory")?, "/inventory?limit=500").await?;
    let reservations: Vec<Reservation> =
        all(http, service(urls, "inventory")?, "/reservations?limit=500").await?;
    let payments: Vec<Payment> =
        all(http, service(urls, "payments")?, "/payments?limit=500").await?;
    let notifications: Vec<Notification> = all(
        http,
        service(urls, "notifications")?,
        "/admin/notifications?limit=1000",
    )
    .await?;
    let mut report = judge(&orders, &stock, &reservations, &payments, &notifications);
    lost(&orders, accepted, &mut report);
    Ok(report)
}

/// Every order the shop accepted must be one it knows: one missing was lost.
fn lost(orders: &[Order], accepted: &[String], report: &mut Report) {
    let known: std::collections::HashSet<&str> = orders.iter().map(|o| o.id.as_str()).collect();
    let missing: Vec<String> = accepted
        .iter()
        .filter(|id| !known.contains(id.as_str()))
        .cloned()
        .collect();
    if !missing.is_empty() {
        report.violations.push(Violation {
            invariant: "order_lost",
            detail: format!(
                "{} orders the shop accepted (noted by `bazaar load`) are unknown to the orders service",
                missing.len()
            ),
            ids: missing,
        });
    }
}

fn judge(
    orders: &[Order],
    stock: &[Stock],
    reservations: &[Reservation],
    payments: &[Payment],
    notifications: &[Notification],
) -> Report {
    let mut report = Report {
        orders: orders.len(),
        products: stock.len(),
        notifications: notifications.len(),
        ..Report::default()
    };
    let mut violate = |invariant: &'static str, ids: Vec<String>, detail: String| {
        report.violations.push(Violation {
            invariant,
            ids,
            detail,
        });
    };
    let mut bought: BTreeMap<&str, i64> = BTreeMap::new();
    let (mut confirmed, mut cancelled, mut pending) = (0, 0, 0);
    for o in orders {
        match o.status.as_str() {
            "CONFIRMED" => {
                confirmed += 1;
                for l in &o.items {
                    *bought.entry(l.product_id.as_str()).or_default() += l.quantity;
                }
            }
            "CANCELLED" => cancelled += 1,
            _ => {
                pending += 1;
                violate(
                    "order_not_terminal",
                    vec![o.id.clone()],
                    format!("order {} is still {}", o.id, o.status),
                );
            }
        }
    }
    for s in stock {
        if s.available + s.reserved + s.sold != s.initial {
            violate(
                "stock_not_conserved",
                vec![s.product_id.clone()],
                format!(
                    "initial {} != available {} + reserved {} + sold {}",
                    s.initial, s.available, s.reserved, s.sold
                ),
            );
        }
        if s.available < 0 || s.reserved < 0 || s.sold > s.initial {
            violate(
                "oversold",
                vec![s.product_id.clone()],
                format!(
                    "sold {} of {} (available {})",
                    s.sold, s.initial, s.available
                ),
            );
        }
        let wanted = bought.remove(s.product_id.as_str()).unwrap_or(0);
        if wanted != s.sold {
            violate(
                "sold_differs_from_confirmed",
                vec![s.product_id.clone()],
                format!(
                    "inventory sold {}, confirmed orders bought {wanted}",
                    s.sold
                ),
            );
        }
        if pending == 0 && s.reserved != 0 {
            violate(
                "stock_left_reserved",
                vec![s.product_id.clone()],
                format!("{} still reserved though every order ended", s.reserved),
            );
        }
    }
    for (product, quantity) in bought {
        violate(
            "sold_unknown_product",
            vec![product.to_owned()],
            format!("confirmed orders bought {quantity} of a product inventory does not know"),
        );
    }
    let reserved: HashMap<&str, &str> = reservations
        .iter()
        .map(|r| (r.order_id.as_str(), r.status.as_str()))
        .collect();
    let by_order: HashMap<&str, &Payment> =
        payments.iter().map(|p| (p.order_id.as_str(), p)).collect();
    let mut closing: HashMap<&str, Vec<&str>> = HashMap::new();
    for n in notifications {
        if n.kind == "order_confirmed" || n.kind == "order_cancelled" {
            closing
                .entry(n.order_id.as_str())
                .or_default()
                .push(&n.kind);
        }
    }
    for o in orders {
        let payment = by_order.get(o.id.as_str());
        let charged = payment.map_or(0, |p| {
            p.charges.iter().filter(|c| c.status == "charged").count()
        });
        let refunded = payment.map_or(0, |p| {
            p.refunds.iter().filter(|r| r.amount_cents > 0).count()
        });
        report.charges += charged;
        report.refunds += refunded;
        let ids = vec![o.id.clone()];
        match o.status.as_str() {
            "CONFIRMED" if charged != 1 || refunded != 0 => violate(
                "confirmed_not_charged_once",
                ids.clone(),
                format!("confirmed with {charged} charge(s) and {refunded} refund(s)"),
            ),
            "CANCELLED" if charged > 1 || refunded != charged => violate(
                "cancelled_charge_not_refunded_once",
                ids.clone(),
                format!(
                    "cancelled ({}) with {charged} charge(s) and {refunded} refund(s)",
                    o.reason.as_deref().unwrap_or("no reason")
                ),
            ),
            _ => {}
        }
        // A confirmed order's stock was sold; a cancelled one's holds nothing.
        let reservation = reserved.get(o.id.as_str()).copied();
        let stock_ok = match o.status.as_str() {
            "CONFIRMED" => reservation == Some("committed"),
            "CANCELLED" => reservation != Some("held") && reservation != Some("committed"),
            _ => true,
        };
        if !stock_ok {
            violate(
                "reservation_disagrees_with_order",
                ids.clone(),
                format!(
                    "{} order whose reservation is {}",
                    o.status,
                    reservation.unwrap_or("missing")
                ),
            );
        }
        if o.status == "CONFIRMED" || o.status == "CANCELLED" {
            let want = if o.status == "CONFIRMED" {
                "order_confirmed"
            } else {
                "order_cancelled"
            };
            let got = closing.remove(o.id.as_str()).unwrap_or_default();
            if got != [want] {
                violate(
                    "notification_not_once",
                    ids,
                    format!("{} order has closing notifications {got:?}", o.status),
                );
            }
        }
    }
    for (order, kinds) in closing {
        violate(
            "notification_for_open_or_unknown_order",
            vec![order.to_owned()],
            format!("closing notifications {kinds:?} for an order that has not ended"),
        );
    }
    let known: std::collections::HashSet<&str> = orders.iter().map(|o| o.id.as_str()).collect();
    for p in payments {
        let charged = p.charges.iter().any(|c| c.status == "charged");
        if charged && !known.contains(p.order_id.as_str()) {
            violate(
                "charge_for_unknown_order",
                vec![p.order_id.clone()],
                "a charge for an order the orders service does not have".to_owned(),
            );
        }
    }
    report.confirmed = confirmed;
    report.cancelled = cancelled;
    report.pending = pending;
    report
}

/// Prints the report; `Ok(false)` when an invariant is broken.
pub async fn run(shop: &Shop, settle: Duration, json: bool) -> anyhow::Result<bool> {
    let report = check(shop, settle).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} orders ({} confirmed, {} cancelled, {} pending), {} products, {} charges, {} refunds, {} notifications",
            report.orders,
            report.confirmed,
            report.cancelled,
            report.pending,
            report.products,
            report.charges,
            report.refunds,
            report.notifications
        );
        for v in &report.violations {
            println!("✗ {}: {} [{}]", v.invariant, v.detail, v.ids.join(", "));
        }
        if report.violations.is_empty() {
            println!("✓ every invariant holds");
        }
    }
    Ok(report.violations.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(id: &str, status: &str, lines: &[(&str, i64)]) -> Order {
        Order {
            id: id.into(),
            status: status.into(),
            reason: None,
            items: lines
                .iter()
                .map(|(p, q)| Line {
                    product_id: (*p).into(),
                    quantity: *q,
                })
                .collect(),
        }
    }

    fn paid(id: &str, charges: &[&str], refunds: &[i64]) -> Payment {
        Payment {
            order_id: id.into(),
            charges: charges
                .iter()
                .map(|s| Charge {
                    status: (*s).into(),
                })
                .collect(),
            refunds: refunds
                .iter()
                .map(|a| Refund { amount_cents: *a })
                .collect(),
        }
    }

    fn held(order: &str, status: &str) -> Reservation {
        Reservation {
            order_id: order.into(),
            status: status.into(),
        }
    }

    fn note(order: &str, kind: &str) -> Notification {
        Notification {
            kind: kind.into(),
            order_id: order.into(),
        }
    }

    fn invariants(r: &Report) -> Vec<&'static str> {
        r.violations.iter().map(|v| v.invariant).collect()
    }

    #[test]
    fn an_accepted_order_the_shop_does_not_know_is_lost() {
        let orders = [order("a", "CONFIRMED", &[("p", 1)])];
        let mut report = Report::default();
        lost(&orders, &["a".to_owned()], &mut report);
        assert!(report.violations.is_empty());
        lost(&orders, &["a".to_owned(), "gone".to_owned()], &mut report);
        assert_eq!(invariants(&report), ["order_lost"]);
        assert_eq!(report.violations[0].ids, ["gone"]);
    }

    #[test]
    fn a_consistent_shop_passes() {
        let orders = [
            order("a", "CONFIRMED", &[("p", 2)]),
            order("b", "CANCELLED", &[("p", 1)]),
        ];
        let stock = [Stock {
            product_id: "p".into(),
            initial: 10,
            available: 8,
            reserved: 0,
            sold: 2,
        }];
        let payments = [
            paid("a", &["charged"], &[]),
            paid("b", &["charged"], &[500]),
        ];
        let notes = [
            note("a", "order_received"),
            note("a", "order_confirmed"),
            note("b", "order_cancelled"),
        ];
        let held = [held("a", "committed"), held("b", "released")];
        let r = judge(&orders, &stock, &held, &payments, &notes);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(
            (r.confirmed, r.cancelled, r.charges, r.refunds),
            (1, 1, 2, 1)
        );
    }

    #[test]
    fn each_broken_invariant_is_named_with_its_ids() {
        let orders = [
            order("a", "CONFIRMED", &[("p", 2)]),
            order("b", "CANCELLED", &[("p", 1)]),
            order("c", "PENDING", &[("p", 1)]),
            order("d", "CONFIRMED", &[("p", 1)]),
        ];
        let stock = [
            Stock {
                product_id: "p".into(),
                initial: 10,
                available: 5,
                reserved: 1,
                sold: 5,
            },
            Stock {
                product_id: "q".into(),
                initial: 10,
                available: -1,
                reserved: 0,
                sold: 11,
            },
        ];
        let payments = [
            paid("a", &["charged"], &[]),
            paid("b", &["charged"], &[]),
            paid("d", &["charged", "charged"], &[]),
            paid("z", &["charged"], &[]),
        ];
        let notes = [
            note("a", "order_confirmed"),
            note("a", "order_confirmed"),
            note("b", "order_cancelled"),
        ];
        // b was cancelled but its stock is still held; d's sale was recorded.
        let held = [
            held("a", "committed"),
            held("b", "held"),
            held("d", "committed"),
        ];
        let r = judge(&orders, &stock, &held, &payments, &notes);
        let mut got = invariants(&r);
        got.sort_unstable();
        assert_eq!(
            got,
            [
                "cancelled_charge_not_refunded_once",
                "charge_for_unknown_order",
                "confirmed_not_charged_once",
                "notification_not_once",
                "notification_not_once",
                "order_not_terminal",
                "oversold",
                "reservation_disagrees_with_order",
                "sold_differs_from_confirmed",
                "sold_differs_from_confirmed",
                "stock_not_conserved",
            ]
        );
        let unrefunded = r
            .violations
            .iter()
            .find(|v| v.invariant == "cancelled_charge_not_refunded_once")
            .map(|v| v.ids.clone());
        assert_eq!(unrefunded, Some(vec!["b".to_owned()]));
    }
}
