//! Portable SQL shared by the outbox, the inbox and the stores built on them: what
//! they must know of the database under a transaction, and `IN` lists.

use sqlx::AnyConnection;

/// Whether `RETURNING` (and an `INSERT ... SELECT` reading its own table) costs a
/// temporary table per statement: on SQLite it does (the rows are buffered in an
/// ephemeral b-tree with a page cache of its own, built and torn down each time,
/// about 9 per order in `orders`), so there a second, indexed statement is cheaper;
/// on PostgreSQL a statement is a round trip, and `RETURNING` saves one.
pub fn buffers_returning(conn: &AnyConnection) -> bool {
    conn.backend_name().eq_ignore_ascii_case("SQLite")
}

/// An `UPDATE`'s arguments, bound by the caller.
pub type Query<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// Runs an `UPDATE` and returns the row it changed (`None` if none matched):
/// `update.1` (the same statement with `RETURNING`) on PostgreSQL, in one round
/// trip; on SQLite `update.0`, then `read`, the row by its key (see
/// [`buffers_returning`]). `bind` binds the update's arguments to either text.
pub async fn updated_row<'q>(
    tx: &mut AnyConnection,
    update: (&'q str, &'q str),
    bind: impl Fn(Query<'q>) -> Query<'q>,
    read: Query<'q>,
) -> Result<Option<sqlx::any::AnyRow>, sqlx::Error> {
    match buffers_returning(tx) {
        false => bind(sqlx::query(update.1)).fetch_optional(&mut *tx).await,
        true => match bind(sqlx::query(update.0))
            .execute(&mut *tx)
            .await?
            .rows_affected()
        {
            0 => Ok(None),
            _ => read.fetch_optional(&mut *tx).await,
        },
    }
}

/// `$1, $2, ..., $count`: the placeholders of an `IN (...)` list whose values are
/// bound in order (the spelling both engines take through `Any`).
pub fn placeholders(count: usize) -> String {
    use std::fmt::Write;
    let mut list = String::with_capacity(count * 4);
    for i in 1..=count {
        let separator = if i > 1 { ", " } else { "" };
        let _ = write!(list, "{separator}${i}");
    }
    list
}

#[cfg(test)]
mod tests {
    #[test]
    fn placeholders_number_from_one() {
        assert_eq!(super::placeholders(0), "");
        assert_eq!(super::placeholders(1), "$1");
        assert_eq!(super::placeholders(3), "$1, $2, $3");
    }
}
