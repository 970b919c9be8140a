//! What the SQL written by the outbox, the inbox and the stores built on them must
//! know of the database under a transaction.

use sqlx::AnyConnection;

/// Whether `RETURNING` (and an `INSERT ... SELECT` reading its own table) costs a
/// temporary table per statement: on SQLite it does (the rows are buffered in an
/// ephemeral b-tree with a page cache of its own, built and torn down each time,
/// about 9 per order in `orders`), so there a second, indexed statement is cheaper;
/// on PostgreSQL a statement is a round trip, and `RETURNING` saves one.
pub fn buffers_returning(conn: &AnyConnection) -> bool {
    conn.backend_name().eq_ignore_ascii_case("SQLite")
}
