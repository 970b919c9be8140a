//! Account persistence.

use sqlx::{AnyPool, Row};
use uuid::Uuid;

use crate::domain::{Email, UserName};

#[derive(Clone, Debug)]
pub struct UserRecord {
    pub id: Uuid,
    pub email: String,
    pub name: String,
    pub password_hash: String,
    pub created_at: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    #[error("the e-mail address is taken")]
    DuplicateEmail,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Outbox(#[from] messaging::outbox::OutboxError),
}

/// The topic account events go to.
pub const TOPIC: &str = "users";

/// Creates the account and its `user.registered` event in one transaction.
pub async fn insert(
    pool: &AnyPool,
    outbox: &messaging::outbox::Outbox,
    email: &Email,
    name: &UserName,
    password_hash: &str,
) -> Result<UserRecord, InsertError> {
    let record = UserRecord {
        id: Uuid::now_v7(),
        email: email.as_str().to_owned(),
        name: name.as_str().to_owned(),
        password_hash: password_hash.to_owned(),
        created_at: chassis::clock::now_millis(),
    };
    let mut tx = pool.begin().await?;
    let result = sqlx::query(
        "INSERT INTO users (id, email, name, password_hash, created_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(record.id.to_string())
    .bind(&record.email)
    .bind(&record.name)
    .bind(&record.password_hash)
    .bind(record.created_at)
    .execute(&mut *tx)
    .await;
    match result {
        Ok(_) => {}
        Err(e) if chassis::db::is_unique_violation(&e) => return Err(InsertError::DuplicateEmail),
        Err(e) => return Err(e.into()),
    }
    let id = record.id.to_string();
    let event = messaging::CloudEvent::new(
        "/bazaar/users",
        "user.registered",
        Some(&id),
        serde_json::json!({
            "user_id": id, "email": record.email, "name": record.name,
            "created_at": chassis::clock::rfc3339(record.created_at),
        }),
    );
    let row = outbox.enqueue(&mut tx, TOPIC, &id, &event).await?;
    tx.commit().await?;
    outbox.committed([row]);
    Ok(record)
}

fn from_row(row: &sqlx::any::AnyRow) -> Result<UserRecord, sqlx::Error> {
    let id: String = row.try_get("id")?;
    Ok(UserRecord {
        id: Uuid::parse_str(&id).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        email: row.try_get("email")?,
        name: row.try_get("name")?,
        password_hash: row.try_get("password_hash")?,
        created_at: row.try_get("created_at")?,
    })
}

const COLUMNS: &str = "id, email, name, password_hash, created_at";

pub async fn by_email(pool: &AnyPool, email: &Email) -> Result<Option<UserRecord>, sqlx::Error> {
    sqlx::query(&format!("SELECT {COLUMNS} FROM users WHERE email = $1"))
        .bind(email.as_str())
        .fetch_optional(pool)
        .await?
        .map(|r| from_row(&r))
        .transpose()
}

pub async fn by_id(pool: &AnyPool, id: Uuid) -> Result<Option<UserRecord>, sqlx::Error> {
    sqlx::query(&format!("SELECT {COLUMNS} FROM users WHERE id = $1"))
        .bind(id.to_string())
        .fetch_optional(pool)
        .await?
        .map(|r| from_row(&r))
        .transpose()
}
