//! Catalog persistence, portable SQL over the chassis database.

use sqlx::{AnyPool, Row};
use uuid::Uuid;

use crate::domain::{Product, demo_catalog};

/// Default currency of the demo catalog.
const CURRENCY: &str = "USD";

fn row_to_product(row: &sqlx::any::AnyRow) -> Result<Product, sqlx::Error> {
    let id: String = row.try_get("id")?;
    Ok(Product {
        id: Uuid::parse_str(&id).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        price_cents: row.try_get("price_cents")?,
        currency: row.try_get("currency")?,
    })
}

/// The topic catalog events go to.
pub const TOPIC: &str = "products";

/// Seeds the demo catalog once per database, each product with its
/// `product.created` event. Returns how many products were added.
pub async fn seed(
    pool: &AnyPool,
    outbox: &messaging::outbox::Outbox,
) -> Result<usize, messaging::outbox::OutboxError> {
    let mut tx = pool.begin().await?;
    let claimed = sqlx::query("INSERT INTO catalog_tasks (name, done_at) VALUES ($1, $2)")
        .bind("seed-demo-catalog")
        .bind(chassis::clock::now_millis())
        .execute(&mut *tx)
        .await;
    match claimed {
        Ok(_) => {}
        // Already seeded (or another instance is seeding right now).
        Err(e) if chassis::db::is_unique_violation(&e) => return Ok(0),
        Err(e) => return Err(e.into()),
    }
    let catalog = demo_catalog();
    let mut sent = Vec::with_capacity(catalog.len());
    for (name, description, price_cents) in &catalog {
        let id = Uuid::now_v7().to_string();
        let event = messaging::CloudEvent::new(
            "/bazaar/products",
            "product.created",
            Some(&id),
            serde_json::json!({
                "product_id": id, "name": name, "description": description,
                "price_cents": price_cents, "currency": CURRENCY,
            }),
        );
        sent.push(outbox.enqueue(&mut tx, TOPIC, &id, &event).await?);
        sqlx::query(
            "INSERT INTO products (id, name, description, price_cents, currency, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&id)
        .bind(name)
        .bind(description)
        .bind(*price_cents)
        .bind(CURRENCY)
        .bind(chassis::clock::now_millis())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    outbox.committed(sent);
    Ok(catalog.len())
}

pub async fn get(pool: &AnyPool, id: Uuid) -> Result<Option<Product>, sqlx::Error> {
    sqlx::query("SELECT id, name, description, price_cents, currency FROM products WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(pool)
        .await?
        .map(|r| row_to_product(&r))
        .transpose()
}

/// The products with these ids, in the order asked; unknown ids are left out.
pub async fn get_many(pool: &AnyPool, ids: &[Uuid]) -> Result<Vec<Product>, sqlx::Error> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT id, name, description, price_cents, currency FROM products WHERE id IN ({})",
        messaging::sql::placeholders(ids.len())
    );
    let mut query = sqlx::query(&sql);
    for id in ids {
        query = query.bind(id.to_string());
    }
    let rows = query.fetch_all(pool).await?;
    let mut found: Vec<Product> = rows.iter().map(row_to_product).collect::<Result<_, _>>()?;
    found.sort_by_key(|p| ids.iter().position(|id| *id == p.id));
    Ok(found)
}

/// One page of the catalog after `after` (keyset pagination on the time-ordered id),
/// optionally filtered by a case-insensitive search in name and description.
pub async fn list(
    pool: &AnyPool,
    after: Option<Uuid>,
    search: Option<&str>,
    limit: u32,
) -> Result<Vec<Product>, sqlx::Error> {
    // Placeholders are numbered in order of appearance: SQLite assigns `$N` indexes
    // by first use.
    let mut sql = String::from(
        "SELECT id, name, description, price_cents, currency FROM products WHERE id > $1",
    );
    if search.is_some() {
        sql.push_str(
            " AND (LOWER(name) LIKE $2 ESCAPE '\\' OR LOWER(description) LIKE $2 ESCAPE '\\') \
             ORDER BY id LIMIT $3",
        );
    } else {
        sql.push_str(" ORDER BY id LIMIT $2");
    }
    let mut query = sqlx::query(&sql).bind(after.map(|a| a.to_string()).unwrap_or_default());
    if let Some(q) = search {
        query = query.bind(format!("%{}%", escape_like(&q.to_lowercase())));
    }
    query = query.bind(i64::from(limit));
    let rows = query.fetch_all(pool).await?;
    rows.iter().map(row_to_product).collect()
}

fn escape_like(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}
