//! Signing keys persisted in the service's database, so restarts keep issued tokens
//! valid and several instances on one database publish the same JWKS.

use chassis::jwt::SigningKey;
use chassis::secrecy::ExposeSecret;
use sqlx::{AnyPool, Row};

/// Every unretired key, oldest first; creates the first one on a new database.
pub async fn load_or_create(pool: &AnyPool) -> anyhow::Result<Vec<SigningKey>> {
    let mut keys = load(pool).await?;
    if keys.is_empty() {
        let key = SigningKey::generate()?;
        sqlx::query("INSERT INTO signing_keys (kid, private_pem, created_at) VALUES ($1, $2, $3)")
            .bind(key.kid())
            .bind(key.to_pkcs8_pem()?.expose_secret().to_owned())
            .bind(chassis::clock::now_millis())
            .execute(pool)
            .await?;
        tracing::info!(kid = key.kid(), "created a signing key");
        // Re-read: another instance may have created one at the same moment, and all
        // instances must sign with the same (oldest) key.
        keys = load(pool).await?;
    }
    Ok(keys)
}

async fn load(pool: &AnyPool) -> anyhow::Result<Vec<SigningKey>> {
    let rows = sqlx::query(
        "SELECT private_pem FROM signing_keys WHERE retired_at IS NULL ORDER BY created_at, kid",
    )
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            let pem: String = r.try_get("private_pem")?;
            Ok(SigningKey::from_pkcs8_pem(&pem)?)
        })
        .collect()
}
