//! Catalog types and the demo catalog.

use serde::Serialize;
use uuid::Uuid;

/// A product as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Product {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    /// Price in the currency's minor unit.
    pub price_cents: i64,
    /// ISO 4217 code.
    pub currency: String,
}

const ADJECTIVES: [&str; 10] = [
    "Classic", "Organic", "Handmade", "Vintage", "Minimal", "Rugged", "Cozy", "Smart", "Recycled",
    "Deluxe",
];
const NOUNS: [(&str, &str); 5] = [
    ("Coffee Mug", "holds 350 ml and keeps its heat"),
    ("Backpack", "with a padded laptop sleeve"),
    ("Desk Lamp", "with warm, dimmable light"),
    ("Notebook", "with 192 dotted pages"),
    ("Water Bottle", "leak-proof, 750 ml"),
];

/// The 50 products seeded into a new catalog, in a stable order with stable prices.
pub fn demo_catalog() -> Vec<(String, String, i64)> {
    let mut out = Vec::with_capacity(ADJECTIVES.len() * NOUNS.len());
    for (i, adjective) in ADJECTIVES.iter().enumerate() {
        for (j, (noun, blurb)) in NOUNS.iter().enumerate() {
            let n = (i * NOUNS.len() + j) as i64;
            let name = format!("{adjective} {noun}");
            let description = format!(
                "A {} {}, {blurb}.",
                adjective.to_lowercase(),
                noun.to_lowercase()
            );
            let price_cents = 499 + (n * 737) % 9_000;
            out.push((name, description, price_cents));
        }
    }
    out
}
