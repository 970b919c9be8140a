//! The catalog's prices, replicated from products' events: a read model of this
//! service's own, so placing an order does not wait on products.
//!
//! Products publishes each product with its price in `product.created`; this service
//! keeps `(id, name, price, currency)` in `catalog_prices` and prices orders from
//! it. A product it has not heard of yet (a shop just started, its events still on
//! their way) is priced by asking products, as before, so the answer never depends
//! on how far the replica has got: only where the question is asked.
//!
//! Prices are read from memory: each product is read from the table once, and again
//! after [`FRESH`] (another instance of this service may have applied a change the
//! table holds); a change this instance applies replaces its copy at once.
//!
//! The catalog's prices do not change once published (products has no way to
//! change one). Were that to change, products would publish the change and
//! [`apply`] would take it as it takes a new product (an upsert), and orders would be
//! priced as of the last change applied here, as every replicated read is.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use messaging::consumer::{AfterCommit, HandlerError, Meta, Prepared, Store, Transactional};
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
/// How long a product read from the table is used before it is read again.
pub const FRESH: Duration = Duration::from_secs(5);

/// A product as an order is priced: what products answers, what `product.created`
/// carries (which names the id `product_id`), or its replica here.
#[derive(Clone, Debug, Deserialize)]
pub struct Product {
    #[serde(alias = "product_id")]
    pub id: Uuid,
    pub name: String,
    pub price_cents: i64,
    pub currency: String,
}

/// The replica: `catalog_prices` and this instance's copy of what it read of it.
/// Cheap to clone; the consumer of [`TOPIC`] (as a [`Transactional`] handler).
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    read: Arc<RwLock<HashMap<Uuid, (Product, Instant)>>>,
}

impl Catalog {
    /// The replicated products among `ids`, by id (those not replicated yet are
    /// missing).
    pub async fn known(
        &self,
        pool: &AnyPool,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, Product>, sqlx::Error> {
        let now = Instant::now();
        let mut found = HashMap::with_capacity(ids.len());
        let mut unread = Vec::new();
        {
            let read = self.read.read().unwrap_or_else(|e| e.into_inner());
            for id in ids {
                match read.get(id) {
                    Some((product, at)) if now.duration_since(*at) < FRESH => {
                        found.insert(*id, product.clone());
                    }
                    _ => unread.push(*id),
                }
            }
        }
        if unread.is_empty() {
            return Ok(found);
        }
        let rows = select(pool, &unread).await?;
        let mut read = self.read.write().unwrap_or_else(|e| e.into_inner());
        for product in rows {
            // A change applied while the rows were read is newer than they are.
            let applied = read.get(&product.id).is_some_and(|(_, at)| *at > now);
            if !applied {
                read.insert(product.id, (product.clone(), now));
            }
            found.insert(product.id, product);
        }
        Ok(found)
    }

    /// Handles one event of [`TOPIC`] in its own transaction, claimed in `inbox`
    /// (as the consumer would): for tests and tools.
    pub async fn handle(
        &self,
        pool: &AnyPool,
        inbox: &Inbox,
        event: &CloudEvent,
        meta: &Meta,
    ) -> Result<(), HandlerError> {
        let store = Store {
            pool: pool.clone(),
            inbox: inbox.clone(),
        };
        messaging::consumer::handle_one(&store, self, event, meta).await
    }
}

impl Transactional for Catalog {
    fn accepts(&self, event: &CloudEvent, _meta: &Meta) -> Result<bool, HandlerError> {
        messaging::consumer::triage(event, PRODUCT_EVENTS, PRODUCT_EVENTS)
    }

    fn handle<'a>(
        &'a self,
        tx: &'a mut AnyConnection,
        event: &'a CloudEvent,
        _meta: &'a Meta,
        _prepared: Prepared,
        after: &'a mut AfterCommit,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let product = apply(tx, event).await?;
            let read = self.read.clone();
            after.then(move || {
                let mut read = read.write().unwrap_or_else(|e| e.into_inner());
                read.insert(product.id, (product, Instant::now()));
            });
            Ok(())
        })
    }
}

/// What one `product.created` changes, in `tx` where it is claimed.
async fn apply(tx: &mut AnyConnection, event: &CloudEvent) -> Result<Product, HandlerError> {
    let created: Product = serde_json::from_value(event.data.clone()).map_err(|e| {
        HandlerError::Reject(format!("{} does not describe a product: {e}", event.ty))
    })?;
    if created.price_cents < 0 || created.currency.is_empty() {
        return Err(HandlerError::Reject(format!(
            "{} of {}: a price needs a currency and cannot be negative",
            event.ty, created.id
        )));
    }
    sqlx::query(
        "INSERT INTO catalog_prices (product_id, name, price_cents, currency) \
         VALUES ($1, $2, $3, $4) \
         ON CONFLICT (product_id) DO UPDATE SET name = excluded.name, \
         price_cents = excluded.price_cents, currency = excluded.currency",
    )
    .bind(created.id.to_string())
    .bind(&created.name)
    .bind(created.price_cents)
    .bind(&created.currency)
    .execute(&mut *tx)
    .await?;
    Ok(created)
}

/// The rows of `ids` in `catalog_prices`.
async fn select(pool: &AnyPool, ids: &[Uuid]) -> Result<Vec<Product>, sqlx::Error> {
    const COLUMNS: &str = "SELECT product_id, name, price_cents, currency FROM catalog_prices";
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    // (SQLite's parser turns a one-value `IN` into an equality itself.)
    let sql = format!(
        "{COLUMNS} WHERE product_id IN ({})",
        messaging::sql::placeholders(ids.len())
    );
    let mut query = sqlx::query(&sql);
    for id in ids {
        query = query.bind(id.to_string());
    }
    query.fetch_all(pool).await?.iter().map(product).collect()
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
