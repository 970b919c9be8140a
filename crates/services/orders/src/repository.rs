//! Order persistence: an order, its lines and its `order.created` event (in the
//! outbox) are written in one transaction, so an order is never without its event
//! nor an event without its order.

use std::collections::HashMap;

use sqlx::{AnyPool, Row};
use uuid::Uuid;

use crate::domain::{Order, OrderItem, Status};

#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    /// Another request with the same idempotency key won the race.
    #[error("idempotency key already used")]
    DuplicateKey,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Outbox(#[from] messaging::outbox::OutboxError),
    #[error("starting the saga: {0}")]
    Saga(String),
}

/// The topic order events go to.
pub const TOPIC: &str = "orders";
/// `source` of the events this service emits.
pub const SOURCE: &str = "/bazaar/orders";

/// A new order, priced.
pub struct NewOrder<'a> {
    pub user_id: &'a str,
    pub idempotency_key: Option<&'a str>,
    pub request_hash: &'a str,
    pub items: Vec<OrderItem>,
    pub currency: String,
    pub total_cents: i64,
}

/// Writes the order, its `order.created` and the start of its saga (the
/// orchestrator's first command, or in choreography the first history line) in one
/// transaction.
pub async fn insert(
    pool: &AnyPool,
    outbox: &messaging::outbox::Outbox,
    orchestrator: Option<&saga::store::Orchestrator>,
    new: NewOrder<'_>,
) -> Result<Order, InsertError> {
    let id = Uuid::now_v7();
    let created_at = chassis::clock::now_millis();
    let mut tx = pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO orders (id, user_id, status, total_cents, currency, idempotency_key, request_hash, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(id.to_string())
    .bind(new.user_id)
    .bind(Status::Pending.as_str())
    .bind(new.total_cents)
    .bind(&new.currency)
    .bind(new.idempotency_key)
    .bind(new.request_hash)
    .bind(created_at)
    .execute(&mut *tx)
    .await;
    match inserted {
        Ok(_) => {}
        Err(e) if chassis::db::is_unique_violation(&e) => return Err(InsertError::DuplicateKey),
        Err(e) => return Err(e.into()),
    }
    // Every line in one statement (one round trip, however many lines).
    if !new.items.is_empty() {
        let values: Vec<String> = (0..new.items.len())
            .map(|n| {
                let p = 2 + n * 5;
                format!(
                    "($1, ${}, ${}, ${}, ${}, ${})",
                    p,
                    p + 1,
                    p + 2,
                    p + 3,
                    p + 4
                )
            })
            .collect();
        let sql = format!(
            "INSERT INTO order_items (order_id, line, product_id, product_name, quantity, unit_price_cents) VALUES {}",
            values.join(", ")
        );
        let mut query = sqlx::query(&sql).bind(id.to_string());
        for (line, item) in new.items.iter().enumerate() {
            query = query
                .bind(line as i32)
                .bind(item.product_id.to_string())
                .bind(&item.name)
                .bind(item.quantity)
                .bind(item.unit_price_cents);
        }
        query.execute(&mut *tx).await?;
    }
    let event = messaging::CloudEvent::new(
        SOURCE,
        "order.created",
        Some(&id.to_string()),
        serde_json::json!({
            "order_id": id.to_string(),
            "user_id": new.user_id,
            "status": Status::Pending.as_str(),
            "total_cents": new.total_cents,
            "currency": new.currency,
            "items": new.items.iter().map(|i| serde_json::json!({
                "product_id": i.product_id.to_string(),
                "product_name": i.name,
                "quantity": i.quantity,
                "unit_price_cents": i.unit_price_cents,
            })).collect::<Vec<_>>(),
            "created_at": chassis::clock::rfc3339(created_at),
        }),
    );
    let mut sent = vec![
        outbox
            .enqueue(&mut tx, TOPIC, &id.to_string(), &event)
            .await?,
    ];
    match orchestrator {
        Some(orchestrator) => {
            orchestrator
                .start(
                    &mut tx,
                    &id.to_string(),
                    event.data.clone(),
                    time::OffsetDateTime::now_utc(),
                    &mut sent,
                )
                .await
                .map_err(|e| InsertError::Saga(e.to_string()))?;
        }
        None => {
            sqlx::query(
                "INSERT INTO order_steps (order_id, seq, step, what, at_ms) VALUES ($1, 1, 'reserve', 'requested', $2)",
            )
            .bind(id.to_string())
            .bind(created_at)
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    outbox.committed(sent);
    Ok(Order {
        id,
        status: Status::Pending,
        reason: None,
        items: new.items,
        total_cents: new.total_cents,
        currency: new.currency,
        created_at: chassis::clock::rfc3339(created_at),
        steps: Vec::new(),
    })
}

const ORDER_COLUMNS: &str = "id, status, reason, total_cents, currency, created_at, request_hash";

struct Head {
    order: Order,
    request_hash: String,
}

fn head_from_row(row: &sqlx::any::AnyRow) -> Result<Head, sqlx::Error> {
    let id: String = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    let decode = |e: String| sqlx::Error::Decode(e.into());
    Ok(Head {
        order: Order {
            id: Uuid::parse_str(&id).map_err(|e| decode(e.to_string()))?,
            status: Status::parse(&status)
                .ok_or_else(|| decode(format!("unknown status {status}")))?,
            reason: row.try_get("reason")?,
            items: Vec::new(),
            total_cents: row.try_get("total_cents")?,
            currency: row.try_get("currency")?,
            created_at: chassis::clock::rfc3339(row.try_get("created_at")?),
            steps: Vec::new(),
        },
        request_hash: row.try_get("request_hash")?,
    })
}

/// Fills in the lines of `orders` with one query.
async fn with_items(pool: &AnyPool, mut orders: Vec<Order>) -> Result<Vec<Order>, sqlx::Error> {
    if orders.is_empty() {
        return Ok(orders);
    }
    let sql = format!(
        "SELECT order_id, product_id, product_name, quantity, unit_price_cents FROM order_items \
         WHERE order_id IN ({}) ORDER BY order_id, line",
        messaging::sql::placeholders(orders.len())
    );
    let mut query = sqlx::query(&sql);
    for o in &orders {
        query = query.bind(o.id.to_string());
    }
    let mut by_order: HashMap<String, Vec<OrderItem>> = HashMap::new();
    for row in query.fetch_all(pool).await? {
        let product_id: String = row.try_get("product_id")?;
        let quantity: i64 = row.try_get("quantity")?;
        let unit_price_cents: i64 = row.try_get("unit_price_cents")?;
        by_order
            .entry(row.try_get("order_id")?)
            .or_default()
            .push(OrderItem {
                product_id: Uuid::parse_str(&product_id)
                    .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
                name: row.try_get("product_name")?,
                quantity,
                unit_price_cents,
                line_total_cents: quantity.saturating_mul(unit_price_cents),
            });
    }
    for o in &mut orders {
        o.items = by_order.remove(&o.id.to_string()).unwrap_or_default();
    }
    Ok(orders)
}

/// The user's order placed with `key`, and the fingerprint of the request that made it.
pub async fn by_idempotency_key(
    pool: &AnyPool,
    user_id: &str,
    key: &str,
) -> Result<Option<(Order, String)>, sqlx::Error> {
    let row = sqlx::query(&format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE user_id = $1 AND idempotency_key = $2"
    ))
    .bind(user_id)
    .bind(key)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let head = head_from_row(&row)?;
    let mut orders = with_items(pool, vec![head.order]).await?;
    Ok(orders.pop().map(|o| (o, head.request_hash)))
}

/// The user's order `id`; another user's order is `None`, like a missing one.
pub async fn get(pool: &AnyPool, user_id: &str, id: Uuid) -> Result<Option<Order>, sqlx::Error> {
    let row = sqlx::query(&format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1 AND user_id = $2"
    ))
    .bind(id.to_string())
    .bind(user_id)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let order = head_from_row(&row)?.order;
    Ok(with_items(pool, vec![order]).await?.pop())
}

/// The user's orders, newest first, before `before` (keyset pagination).
pub async fn list(
    pool: &AnyPool,
    user_id: &str,
    before: Option<Uuid>,
    limit: u32,
) -> Result<Vec<Order>, sqlx::Error> {
    // UUIDv7 text sorts by creation time; "g" sorts after every hex digit.
    let before = before
        .map(|b| b.to_string())
        .unwrap_or_else(|| "g".to_owned());
    let rows = sqlx::query(&format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE user_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3"
    ))
    .bind(user_id)
    .bind(before)
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await?;
    let orders = rows
        .iter()
        .map(|r| head_from_row(r).map(|h| h.order))
        .collect::<Result<Vec<_>, _>>()?;
    with_items(pool, orders).await
}

/// Every order after `after` (ids sort by creation), with its lines: a page and the
/// cursor of the next.
pub async fn all(
    pool: &AnyPool,
    after: &str,
    limit: u32,
) -> Result<(Vec<crate::routes::AdminOrder>, Option<String>), sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, user_id, status, reason, total_cents, created_at, updated_at FROM orders \
         WHERE id > $1 ORDER BY id LIMIT $2",
    )
    .bind(after)
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await?;
    let mut orders = Vec::with_capacity(rows.len());
    for r in &rows {
        let status: String = r.try_get(2)?;
        let created: i64 = r.try_get(5)?;
        let ended: Option<i64> = r.try_get(6)?;
        orders.push(crate::routes::AdminOrder {
            id: r.try_get(0)?,
            user_id: r.try_get(1)?,
            status: Status::parse(&status)
                .ok_or_else(|| sqlx::Error::Decode(format!("unknown status {status}").into()))?,
            reason: r.try_get(3)?,
            total_cents: r.try_get(4)?,
            items: Vec::new(),
            created_at: chassis::clock::rfc3339(created),
            ended_at: ended.map(chassis::clock::rfc3339),
            saga_ms: ended.map(|e| e - created),
        });
    }
    if let (Some(first), Some(last)) = (orders.first(), orders.last()) {
        let lines = sqlx::query(
            "SELECT order_id, product_id, quantity FROM order_items \
             WHERE order_id >= $1 AND order_id <= $2 ORDER BY order_id, line",
        )
        .bind(&first.id)
        .bind(&last.id)
        .fetch_all(pool)
        .await?;
        let mut by_order: HashMap<String, Vec<crate::routes::AdminLine>> = HashMap::new();
        for l in &lines {
            by_order
                .entry(l.try_get(0)?)
                .or_default()
                .push(crate::routes::AdminLine {
                    product_id: l.try_get(1)?,
                    quantity: l.try_get(2)?,
                });
        }
        for o in &mut orders {
            o.items = by_order.remove(&o.id).unwrap_or_default();
        }
    }
    let next = chassis::extract::next_after(&orders, limit, |o| o.id.clone());
    Ok((orders, next))
}
