//! The catalog's prices, replicated from products' events: a read model of this
//! service's own, so placing an order does not wait on products.
//!
//! Products publishes each product with its price in `product.created`; this service
//! keeps `(id, name, price, currency)` in `catalog_prices` and prices orders from
//! it. A product it has not heard of yet (a shop just started, its events still on
//! their way) is priced by asking products, as before, so the answer never depends
//! on how far the replica has got: only where the question is asked.
//!
//! The catalog's prices do not change once published (products has no way to
//! change one). Were that to change, products would publish the change and
//! [`apply`] would take it as it takes a new product (an upsert), and orders would be
//! priced as of the last change applied here, as every replicated read is.

use std::collections::HashMap;

use messaging::consumer::{HandlerError, Meta, ReadSide, Store};
use messaging::inbox::Inbox;
use messaging::{BoxFuture, CloudEvent};
use serde::Deserialize;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, AnyPool, Row};
use uuid::Uuid;

/// The topic products publishes on.
pub const TOPIC: &str = "products";
/// Every event type of [`TOPIC`].
pub const PRODUCT_EVENTS: &[&str] = &["product.created"];

/// The consumer of [`TOPIC`] that keeps `catalog_prices`.
pub const READ_SIDE: ReadSide = ReadSide {
    handles: PRODUCT_EVENTS,
    topic_types: PRODUCT_EVENTS,
    apply,
};

/// A product as an order is priced: what products answers, or its replica here.
#[derive(Clone, Debug, Deserialize)]
pub struct Product {
    pub id: Uuid,
    pub name: String,
    pub price_cents: i64,
    pub currency: String,
}

/// What `product.created` carries that prices an order.
#[derive(Deserialize)]
struct Created {
    product_id: Uuid,
    name: String,
    price_cents: i64,
    currency: String,
}

/// Handles one event of [`TOPIC`] in its own transaction, claimed in `inbox` (as the
/// consumer would): for tests and tools.
pub async fn handle(
    pool: &AnyPool,
    inbox: &Inbox,
    event: &CloudEvent,
    meta: &Meta,
) -> Result<(), HandlerError> {
    let store = Store {
        pool: pool.clone(),
        inbox: inbox.clone(),
    };
    messaging::consumer::handle_one(&store, &READ_SIDE, event, meta).await
}

/// What one `product.created` changes, in `tx` where it is claimed.
pub fn apply<'a>(
    tx: &'a mut AnyConnection,
    event: &'a CloudEvent,
) -> BoxFuture<'a, Result<(), HandlerError>> {
    Box::pin(async move {
        let created: Created = serde_json::from_value(event.data.clone()).map_err(|e| {
            HandlerError::Reject(format!("{} does not describe a product: {e}", event.ty))
        })?;
        if created.price_cents < 0 || created.currency.is_empty() {
            return Err(HandlerError::Reject(format!(
                "{} of {}: a price needs a currency and cannot be negative",
                event.ty, created.product_id
            )));
        }
        sqlx::query(
            "INSERT INTO catalog_prices (product_id, name, price_cents, currency) \
             VALUES ($1, $2, $3, $4) \
             ON CONFLICT (product_id) DO UPDATE SET name = excluded.name, \
             price_cents = excluded.price_cents, currency = excluded.currency",
        )
        .bind(created.product_id.to_string())
        .bind(&created.name)
        .bind(created.price_cents)
        .bind(&created.currency)
        .execute(&mut *tx)
        .await?;
        Ok(())
    })
}

/// The replicated products among `ids`, by id (those not replicated yet are
/// missing).
pub async fn known(pool: &AnyPool, ids: &[Uuid]) -> Result<HashMap<Uuid, Product>, sqlx::Error> {
    const COLUMNS: &str = "SELECT product_id, name, price_cents, currency FROM catalog_prices";
    let sql = match ids {
        [] => return Ok(HashMap::new()),
        // The usual order has one line: an equality is a plain index lookup, where
        // SQLite builds an ephemeral table for an `IN` list.
        [_] => format!("{COLUMNS} WHERE product_id = $1"),
        _ => format!(
            "{COLUMNS} WHERE product_id IN ({})",
            messaging::sql::placeholders(ids.len())
        ),
    };
    let mut query = sqlx::query(&sql);
    for id in ids {
        query = query.bind(id.to_string());
    }
    let rows = query.fetch_all(pool).await?;
    rows.iter()
        .map(product)
        .map(|p| p.map(|p| (p.id, p)))
        .collect()
}

fn product(row: &AnyRow) -> Result<Product, sqlx::Error> {
    let id: String = row.try_get("product_id")?;
    Ok(Product {
        id: Uuid::parse_str(&id).map_err(|e| sqlx::Error::Decode(e.into()))?,
        name: row.try_get("name")?,
        price_cents: row.try_get("price_cents")?,
        currency: row.try_get("currency")?,
    })
}
