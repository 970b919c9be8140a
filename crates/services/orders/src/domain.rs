//! Orders and their validated inputs.

use chassis::FieldError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// An order line as the client sends it.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct LineInput {
    pub product_id: String,
    pub quantity: i64,
}

/// A validated order line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub product_id: Uuid,
    pub quantity: i64,
}

/// Validated lines: 1..=max_lines, each product once, quantities in 1..=max_quantity.
#[derive(Clone, Debug)]
pub struct Lines(Vec<Line>);

impl Lines {
    pub fn parse(
        input: &[LineInput],
        max_lines: usize,
        max_quantity: i64,
    ) -> Result<Self, Vec<FieldError>> {
        if input.is_empty() || input.len() > max_lines {
            return Err(vec![FieldError::new(
                "items",
                format!("must have between 1 and {max_lines} lines"),
            )]);
        }
        let mut errors = Vec::new();
        let mut lines: Vec<Line> = Vec::with_capacity(input.len());
        for (i, raw) in input.iter().enumerate() {
            let product_id = match Uuid::parse_str(raw.product_id.trim()) {
                Ok(id) if lines.iter().any(|l| l.product_id == id) => {
                    errors.push(FieldError::new(
                        format!("items[{i}].product_id"),
                        "appears twice; put the total quantity on one line",
                    ));
                    None
                }
                Ok(id) => Some(id),
                Err(_) => {
                    errors.push(FieldError::new(
                        format!("items[{i}].product_id"),
                        "is not a UUID",
                    ));
                    None
                }
            };
            if !(1..=max_quantity).contains(&raw.quantity) {
                errors.push(FieldError::new(
                    format!("items[{i}].quantity"),
                    format!("must be between 1 and {max_quantity}"),
                ));
            }
            if let Some(product_id) = product_id {
                lines.push(Line {
                    product_id,
                    quantity: raw.quantity,
                });
            }
        }
        if errors.is_empty() {
            Ok(Self(lines))
        } else {
            Err(errors)
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Line> {
        self.0.iter()
    }

    pub fn product_ids(&self) -> Vec<Uuid> {
        self.0.iter().map(|l| l.product_id).collect()
    }

    /// A fingerprint of the request, to tell an idempotent replay from a key reused
    /// for a different order. Order-sensitive: the lines are the client's order.
    pub fn fingerprint(&self) -> String {
        let mut hasher = Sha256::new();
        for line in &self.0 {
            hasher.update(line.product_id.as_bytes());
            hasher.update(line.quantity.to_be_bytes());
        }
        hex::encode(hasher.finalize())
    }
}

/// The status of an order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Pending,
    Confirmed,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "PENDING",
            Status::Confirmed => "CONFIRMED",
            Status::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "PENDING" => Some(Status::Pending),
            "CONFIRMED" => Some(Status::Confirmed),
            "CANCELLED" => Some(Status::Cancelled),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OrderItem {
    pub product_id: Uuid,
    /// The product's name when the order was placed.
    pub name: String,
    pub quantity: i64,
    /// The price when the order was placed, in minor units.
    pub unit_price_cents: i64,
    pub line_total_cents: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Order {
    pub id: Uuid,
    pub status: Status,
    /// Why a CANCELLED order was cancelled: `out_of_stock`, `payment_declined` or
    /// `timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub items: Vec<OrderItem>,
    pub total_cents: i64,
    pub currency: String,
    /// RFC 3339.
    pub created_at: String,
    /// The place-order saga's history, oldest first (in `GET /orders/{id}`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<SagaStep>,
}

/// A line of an order's saga history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SagaStep {
    /// `reserve`, `charge`, or `-` for the saga as a whole.
    pub step: String,
    /// What happened: `sent`, `done`, `failed: out_of_stock`, `compensated`, ...
    pub what: String,
    /// RFC 3339.
    pub at: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(id: &str, q: i64) -> LineInput {
        LineInput {
            product_id: id.into(),
            quantity: q,
        }
    }

    #[test]
    fn lines_are_validated_together() {
        let a = Uuid::now_v7().to_string();
        let errs = Lines::parse(
            &[
                input(&a, 0),
                input("x", 2),
                input(&a, 1),
                input(&Uuid::now_v7().to_string(), 1001),
            ],
            100,
            1000,
        )
        .unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "items[0].quantity",
                "items[1].product_id",
                "items[2].product_id",
                "items[3].quantity"
            ]
        );
        assert!(Lines::parse(&[], 100, 1000).is_err());
        let many: Vec<LineInput> = (0..101)
            .map(|_| input(&Uuid::now_v7().to_string(), 1))
            .collect();
        assert_eq!(
            Lines::parse(&many, 100, 1000).unwrap_err()[0].field,
            "items"
        );
    }

    #[test]
    fn fingerprint_depends_on_content() {
        let a = Uuid::now_v7().to_string();
        let one = Lines::parse(&[input(&a, 1)], 10, 10).unwrap();
        let same = Lines::parse(&[input(&a.to_uppercase(), 1)], 10, 10).unwrap();
        let two = Lines::parse(&[input(&a, 2)], 10, 10).unwrap();
        assert_eq!(one.fingerprint(), same.fingerprint());
        assert_ne!(one.fingerprint(), two.fingerprint());
    }
}
