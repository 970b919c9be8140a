//! SQLite run in the calling thread, as a driver of sqlx's `Any`.
//!
//! sqlx's own SQLite driver gives each connection a thread and sends it every
//! statement, `BEGIN` and `COMMIT` included, over a channel: two thread switches per
//! statement. At about a hundred statements per order that hand-off was a third of a
//! service's CPU, more than SQLite's own work. Here a statement runs where it is
//! awaited. SQLite in WAL mode with `synchronous = NORMAL` answers an indexed query or
//! a commit in microseconds (it syncs only at checkpoints), so the cost moved onto
//! the tokio worker is smaller than the hand-off it replaces. The price: a statement
//! holds its worker for as long as it runs, which is why the services' queries are
//! indexed and their listings paginated, and why the pool has one connection (a
//! second would wait for SQLite's write lock inside the thread, where the holder,
//! another task of the same thread, could not run to release it).
//!
//! Queries reach it only through `AnyPool` (URL scheme `bazaar-sqlite`). sqlx
//! registers an `Any` driver by a [`Database`] type, so [`InlineSqlite`] is one; its
//! row, value, column and statement types are uninhabited because the `Any` path
//! never builds them. Migrations run on sqlx's own driver (see `db.rs`).
//! Placeholders follow sqlx-sqlite: `$N` and `?N` bind argument N, a bare `?` the
//! next one.

use std::borrow::Cow;
use std::convert::Infallible;
use std::ffi::OsString;
use std::marker::PhantomData;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use rusqlite::types::{Null, ValueRef as SqliteValue};
use sqlx::Either;
use sqlx_core::any::{
    Any, AnyArguments, AnyColumn, AnyConnectOptions, AnyConnectionBackend, AnyQueryResult, AnyRow,
    AnyStatement, AnyTypeInfo, AnyTypeInfoKind, AnyValue, AnyValueKind,
};
use sqlx_core::arguments::Arguments;
use sqlx_core::column::{Column, ColumnIndex};
use sqlx_core::connection::{ConnectOptions, Connection};
use sqlx_core::database::Database;
use sqlx_core::describe::Describe;
use sqlx_core::encode::Encode;
use sqlx_core::error::{BoxDynError, DatabaseError, Error, ErrorKind};
use sqlx_core::ext::ustr::UStr;
use sqlx_core::row::Row;
use sqlx_core::statement::Statement;
use sqlx_core::transaction::{
    Transaction, TransactionManager, begin_ansi_transaction_sql, commit_ansi_transaction_sql,
    rollback_ansi_transaction_sql,
};
use sqlx_core::types::Type;
use sqlx_core::value::{Value, ValueRef};

/// The URL scheme the driver is registered under.
pub const SCHEME: &str = "bazaar-sqlite";

/// Prepared statements kept per connection (rusqlite's default is 16; a service
/// with its outbox, inbox and saga store runs more distinct statements than that).
const STATEMENT_CACHE: usize = 256;
/// Result shapes (column names and types) kept per connection, by SQL text.
const SHAPE_CACHE: usize = 512;

/// The `Any` driver entry.
pub const DRIVER: sqlx_core::any::driver::AnyDriver =
    sqlx_core::any::driver::AnyDriver::without_migrate::<InlineSqlite>();

/// Characters escaped in the path part of a driver URL.
const PATH: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'?')
    .add(b'<')
    .add(b'>')
    .add(b'\\');

/// The driver URL of the database file at `path` (made absolute).
pub fn url_of(path: &Path) -> std::io::Result<String> {
    let absolute = std::path::absolute(path)?;
    let text = absolute
        .to_str()
        .ok_or_else(|| std::io::Error::other(format!("{} is not UTF-8", absolute.display())))?;
    Ok(format!("{SCHEME}://{}", utf8_percent_encode(text, PATH)))
}

/// Page size of the databases this driver creates. A commit writes each page it
/// changed whole to the WAL, and a service's commit changes a few pages (a table's
/// last leaf and one leaf per index): with SQLite's default 4 KiB pages `orders`
/// wrote 171 KiB per order at 300 orders/s, with 1 KiB pages 70 KiB, and the saga
/// p99 at 1,000 orders/s went from 142 to 87 ms once the disk stopped throttling it.
/// Rows larger than about 1 KiB spill to overflow pages, which the services' rows
/// (ids, amounts, a JSON event or saga state of a few hundred bytes) rarely do.
pub const PAGE_SIZE: u32 = 1024;

/// Creates the database file at `path` in WAL mode with [`PAGE_SIZE`] pages (the
/// page size is fixed when the file is first written; an existing file keeps its).
pub fn create(path: &Path) -> Result<(), Error> {
    let conn = rusqlite::Connection::open(path).map_err(error)?;
    conn.execute_batch(&format!(
        "PRAGMA page_size = {PAGE_SIZE}; PRAGMA journal_mode = WAL;"
    ))
    .map_err(error)?;
    conn.close().map_err(|(_, e)| error(e))
}

/// The database type sqlx registers the driver by.
#[derive(Debug)]
pub struct InlineSqlite;

impl Database for InlineSqlite {
    type Connection = InlineConnection;
    type TransactionManager = InlineTransactions;
    type Row = Never;
    type QueryResult = AnyQueryResult;
    type Column = Never;
    type TypeInfo = AnyTypeInfo;
    type Value = Never;
    type ValueRef<'r> = NeverRef<'r>;
    type Arguments<'q> = NoArguments;
    type ArgumentBuffer<'q> = ();
    type Statement<'q> = NeverRef<'q>;

    const NAME: &'static str = "SQLite";
    const URL_SCHEMES: &'static [&'static str] = &[SCHEME];
}

/// Where the database file is.
#[derive(Clone, Debug)]
pub struct InlineOptions {
    path: PathBuf,
}

impl InlineOptions {
    fn open(&self) -> Result<InlineConnection, Error> {
        let conn = rusqlite::Connection::open(&self.path).map_err(error)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(InlineConnection {
            conn,
            depth: 0,
            shapes: std::collections::HashMap::new(),
        })
    }
}

impl FromStr for InlineOptions {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Self::from_url(&s.parse().map_err(Error::config)?)
    }
}

impl TryFrom<&AnyConnectOptions> for InlineOptions {
    type Error = Error;

    fn try_from(options: &AnyConnectOptions) -> Result<Self, Error> {
        Self::from_url(&options.database_url)
    }
}

impl ConnectOptions for InlineOptions {
    type Connection = InlineConnection;

    fn from_url(url: &url::Url) -> Result<Self, Error> {
        if url.scheme() != SCHEME {
            return Err(Error::Configuration(
                format!("`{url}` is not a {SCHEME}:// URL").into(),
            ));
        }
        let bytes: Vec<u8> = percent_decode_str(url.path()).collect();
        if bytes.is_empty() {
            return Err(Error::Configuration(
                format!("`{url}` names no database file").into(),
            ));
        }
        Ok(Self {
            path: PathBuf::from(OsString::from_vec(bytes)),
        })
    }

    fn connect(&self) -> BoxFuture<'_, Result<InlineConnection, Error>> {
        let opened = self.open();
        Box::pin(async move { opened })
    }

    /// Statements are not logged by this driver (the chassis turns logging off).
    fn log_statements(self, _level: log::LevelFilter) -> Self {
        self
    }

    fn log_slow_statements(self, _level: log::LevelFilter, _duration: std::time::Duration) -> Self {
        self
    }
}

/// Column names and types of one statement's result.
struct Shape {
    names: Arc<sqlx_core::HashMap<UStr, usize>>,
    columns: Vec<AnyColumn>,
}

/// One open database file.
pub struct InlineConnection {
    conn: rusqlite::Connection,
    /// Open transactions: 0 none, 1 a transaction, more its savepoints.
    depth: usize,
    shapes: std::collections::HashMap<Box<str>, Arc<Shape>>,
}

impl std::fmt::Debug for InlineConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InlineConnection")
            .field("path", &self.conn.path())
            .field("depth", &self.depth)
            .finish()
    }
}

impl InlineConnection {
    /// Runs `sql`: every result row, then the statement's result. `limit` stops a
    /// read-only statement after that many rows (a statement that writes always
    /// runs to its end, so what it changes does not depend on how it is read).
    fn run(
        &mut self,
        sql: &str,
        persistent: bool,
        arguments: Option<AnyArguments<'_>>,
        limit: Option<usize>,
    ) -> Result<Vec<Either<AnyQueryResult, AnyRow>>, Error> {
        // No arguments: raw SQL, possibly several statements (sqlx's `raw_sql`).
        let Some(arguments) = arguments else {
            return self.batch(sql);
        };
        let shape = self.shape(sql)?;
        let mut out = Vec::new();
        if persistent {
            let mut statement = self.conn.prepare_cached(sql).map_err(error)?;
            bind(&mut statement, &arguments.values.0)?;
            step(&self.conn, &mut statement, &shape, limit, &mut out)?;
        } else {
            let mut statement = self.conn.prepare(sql).map_err(error)?;
            bind(&mut statement, &arguments.values.0)?;
            step(&self.conn, &mut statement, &shape, limit, &mut out)?;
        }
        Ok(out)
    }

    /// Each statement of `sql` in turn, rows and result, none bound.
    fn batch(&mut self, sql: &str) -> Result<Vec<Either<AnyQueryResult, AnyRow>>, Error> {
        let mut out = Vec::new();
        let mut statements = rusqlite::Batch::new(&self.conn, sql);
        while let Some(mut statement) = statements.next().map_err(error)? {
            let shape = Arc::new(shape_of(&statement));
            step(&self.conn, &mut statement, &shape, None, &mut out)?;
        }
        Ok(out)
    }

    /// The result shape of `sql`, cached by its text.
    fn shape(&mut self, sql: &str) -> Result<Arc<Shape>, Error> {
        if let Some(shape) = self.shapes.get(sql) {
            return Ok(shape.clone());
        }
        let shape = Arc::new(shape_of(&*self.conn.prepare_cached(sql).map_err(error)?));
        if self.shapes.len() >= SHAPE_CACHE {
            // Statements built with a varying number of placeholders would grow the
            // cache without end; starting over is cheaper than tracking use.
            self.shapes.clear();
        }
        self.shapes.insert(sql.into(), shape.clone());
        Ok(shape)
    }

    /// Ends the innermost transaction level with `sql(depth)` (`COMMIT`/`ROLLBACK`
    /// or their savepoint forms); the level is left only if the statement succeeds.
    fn end(&mut self, sql: fn(usize) -> Cow<'static, str>) -> Result<(), Error> {
        if self.depth == 0 {
            return Ok(());
        }
        self.exec_cached(&sql(self.depth))?;
        self.depth -= 1;
        Ok(())
    }

    fn exec(&mut self, sql: &str) -> Result<(), Error> {
        self.conn.execute_batch(sql).map_err(error)
    }

    /// One statement without rows (`BEGIN`, `COMMIT`, a savepoint's), prepared
    /// once per connection: every transaction runs two of them.
    fn exec_cached(&mut self, sql: &str) -> Result<(), Error> {
        self.conn
            .prepare_cached(sql)
            .and_then(|mut statement| statement.raw_execute())
            .map(drop)
            .map_err(error)
    }
}

fn shape_of(statement: &rusqlite::Statement<'_>) -> Shape {
    let columns: Vec<AnyColumn> = statement
        .columns()
        .iter()
        .enumerate()
        .map(|(ordinal, column)| AnyColumn {
            ordinal,
            name: UStr::new(column.name()),
            type_info: AnyTypeInfo {
                kind: declared_kind(column.decl_type()),
            },
        })
        .collect();
    let names = columns
        .iter()
        .map(|c| (c.name.clone(), c.ordinal))
        .collect();
    Shape {
        names: Arc::new(names),
        columns,
    }
}

/// A column's kind from its declared type, by SQLite's affinity rules (sqlx's
/// names for the special cases). Values are typed by what they hold, as sqlx-sqlite
/// does; the declared kind only types a NULL and describes the column.
fn declared_kind(declared: Option<&str>) -> AnyTypeInfoKind {
    let Some(declared) = declared else {
        return AnyTypeInfoKind::Null;
    };
    let d = declared.to_ascii_lowercase();
    if d == "int4" {
        AnyTypeInfoKind::Integer
    } else if d == "boolean" || d == "bool" {
        AnyTypeInfoKind::Bool
    } else if d.contains("int") {
        AnyTypeInfoKind::BigInt
    } else if d.contains("char") || d.contains("clob") || d.contains("text") {
        AnyTypeInfoKind::Text
    } else if d.contains("blob") || d.is_empty() {
        AnyTypeInfoKind::Blob
    } else {
        AnyTypeInfoKind::Double
    }
}

/// Binds `values` to the statement's parameters.
fn bind(statement: &mut rusqlite::Statement<'_>, values: &[AnyValueKind<'_>]) -> Result<(), Error> {
    let mut next = 0;
    for index in 1..=statement.parameter_count() {
        let numbered = statement
            .parameter_name(index)
            .and_then(|name| name.strip_prefix('$').or_else(|| name.strip_prefix('?')))
            .and_then(|n| n.parse::<usize>().ok());
        let n = match numbered {
            Some(n) => n,
            None => {
                next += 1;
                next
            }
        };
        let value = n
            .checked_sub(1)
            .and_then(|i| values.get(i))
            .ok_or_else(|| {
                Error::Protocol(format!(
                    "the statement uses parameter {n} but {} were bound",
                    values.len()
                ))
            })?;
        let bound = match value {
            AnyValueKind::Null(_) => statement.raw_bind_parameter(index, Null),
            AnyValueKind::Bool(b) => statement.raw_bind_parameter(index, i64::from(*b)),
            AnyValueKind::SmallInt(i) => statement.raw_bind_parameter(index, i64::from(*i)),
            AnyValueKind::Integer(i) => statement.raw_bind_parameter(index, i64::from(*i)),
            AnyValueKind::BigInt(i) => statement.raw_bind_parameter(index, *i),
            AnyValueKind::Real(r) => statement.raw_bind_parameter(index, f64::from(*r)),
            AnyValueKind::Double(d) => statement.raw_bind_parameter(index, *d),
            AnyValueKind::Text(t) => statement.raw_bind_parameter(index, &**t),
            AnyValueKind::Blob(b) => statement.raw_bind_parameter(index, &**b),
            other => {
                return Err(Error::Protocol(format!(
                    "the SQLite driver cannot bind {other:?}"
                )));
            }
        };
        bound.map_err(error)?;
    }
    Ok(())
}

/// Steps a bound statement to its end (or `limit` rows of a read-only one).
fn step(
    conn: &rusqlite::Connection,
    statement: &mut rusqlite::Statement<'_>,
    shape: &Arc<Shape>,
    limit: Option<usize>,
    out: &mut Vec<Either<AnyQueryResult, AnyRow>>,
) -> Result<(), Error> {
    let writes = !statement.readonly();
    let mut taken = 0;
    let mut rows = statement.raw_query();
    while let Some(row) = rows.next().map_err(error)? {
        if limit.is_some_and(|l| taken >= l) {
            if writes {
                continue;
            }
            break;
        }
        taken += 1;
        let mut values = Vec::with_capacity(shape.columns.len());
        for column in &shape.columns {
            let value = row.get_ref(column.ordinal).map_err(error)?;
            values.push(AnyValue {
                kind: value_of(value, column)?,
            });
        }
        out.push(Either::Right(AnyRow {
            column_names: shape.names.clone(),
            columns: shape.columns.clone(),
            values,
        }));
    }
    drop(rows);
    out.push(Either::Left(AnyQueryResult {
        rows_affected: if writes { conn.changes() } else { 0 },
        // As sqlx's SQLite driver reports it: the connection's last inserted row id.
        last_insert_id: writes.then(|| conn.last_insert_rowid()),
    }));
    Ok(())
}

fn value_of(value: SqliteValue<'_>, column: &AnyColumn) -> Result<AnyValueKind<'static>, Error> {
    Ok(match value {
        SqliteValue::Null => AnyValueKind::Null(column.type_info.kind),
        SqliteValue::Integer(i) => AnyValueKind::BigInt(i),
        SqliteValue::Real(r) => AnyValueKind::Double(r),
        SqliteValue::Text(bytes) => AnyValueKind::Text(Cow::Owned(
            std::str::from_utf8(bytes)
                .map_err(|e| Error::ColumnDecode {
                    index: column.name.to_string(),
                    source: Box::new(e),
                })?
                .to_owned(),
        )),
        SqliteValue::Blob(bytes) => AnyValueKind::Blob(Cow::Owned(bytes.to_vec())),
    })
}

/// An SQLite error, with its extended result code.
#[derive(Debug)]
pub struct SqliteError {
    code: i32,
    message: String,
}

impl std::fmt::Display for SqliteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "(code: {}) {}", self.code, self.message)
    }
}

impl std::error::Error for SqliteError {}

impl DatabaseError for SqliteError {
    fn message(&self) -> &str {
        &self.message
    }

    fn code(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Owned(self.code.to_string()))
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn kind(&self) -> ErrorKind {
        match self.code {
            rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY => ErrorKind::UniqueViolation,
            rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY => ErrorKind::ForeignKeyViolation,
            rusqlite::ffi::SQLITE_CONSTRAINT_NOTNULL => ErrorKind::NotNullViolation,
            rusqlite::ffi::SQLITE_CONSTRAINT_CHECK => ErrorKind::CheckViolation,
            _ => ErrorKind::Other,
        }
    }
}

fn error(e: rusqlite::Error) -> Error {
    match e {
        rusqlite::Error::SqliteFailure(failure, message) => {
            Error::Database(Box::new(SqliteError {
                code: failure.extended_code,
                message: message.unwrap_or_else(|| failure.to_string()),
            }))
        }
        other => Error::AnyDriverError(Box::new(other)),
    }
}

impl AnyConnectionBackend for InlineConnection {
    fn name(&self) -> &str {
        InlineSqlite::NAME
    }

    fn close(self: Box<Self>) -> BoxFuture<'static, Result<(), Error>> {
        let closed = self.conn.close().map_err(|(_, e)| error(e));
        Box::pin(async move { closed })
    }

    fn close_hard(self: Box<Self>) -> BoxFuture<'static, Result<(), Error>> {
        self.close()
    }

    /// sqlx pings every connection it takes back into the pool. An in-process
    /// database has no link to lose, so this runs no statement (a `SELECT 1` was a
    /// parse and a step on every release); what it checks is the one thing that
    /// can spoil the connection for its next user: a transaction left open by raw
    /// SQL (`BEGIN` without sqlx's knowledge), which closes the connection instead.
    fn ping(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        let pinged = if self.depth == 0 && !self.conn.is_autocommit() {
            Err(Error::Protocol(
                "a transaction begun by raw SQL was left open".into(),
            ))
        } else {
            Ok(())
        };
        Box::pin(async move { pinged })
    }

    fn begin(&mut self, statement: Option<Cow<'static, str>>) -> BoxFuture<'_, Result<(), Error>> {
        let begun = match statement {
            Some(_) if self.depth > 0 => Err(Error::InvalidSavePointStatement),
            Some(statement) => self.exec(&statement),
            None => self.exec_cached(&begin_ansi_transaction_sql(self.depth)),
        }
        .map(|()| self.depth += 1);
        Box::pin(async move { begun })
    }

    fn commit(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        let committed = self.end(commit_ansi_transaction_sql);
        Box::pin(async move { committed })
    }

    fn rollback(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        let rolled = self.end(rollback_ansi_transaction_sql);
        Box::pin(async move { rolled })
    }

    /// A transaction dropped without commit: rolled back now (the statement runs
    /// here anyway, so nothing is left pending for the connection's next user).
    /// Its level is left even if the rollback fails, as sqlx's drivers do.
    fn start_rollback(&mut self) {
        if self.depth > 0
            && let Err(e) = self.end(rollback_ansi_transaction_sql)
        {
            tracing::warn!(error = %e, "rolling back a dropped transaction failed");
            self.depth -= 1;
        }
    }

    fn get_transaction_depth(&self) -> usize {
        self.depth
    }

    fn cached_statements_size(&self) -> usize {
        self.shapes.len()
    }

    fn clear_cached_statements(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        self.conn.flush_prepared_statement_cache();
        self.shapes.clear();
        Box::pin(async { Ok(()) })
    }

    fn shrink_buffers(&mut self) {}

    fn flush(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async { Ok(()) })
    }

    fn should_flush(&self) -> bool {
        false
    }

    fn fetch_many<'q>(
        &'q mut self,
        query: &'q str,
        persistent: bool,
        arguments: Option<AnyArguments<'q>>,
    ) -> BoxStream<'q, Result<Either<AnyQueryResult, AnyRow>, Error>> {
        let items = match self.run(query, persistent, arguments, None) {
            Ok(items) => items.into_iter().map(Ok).collect(),
            Err(e) => vec![Err(e)],
        };
        Box::pin(futures::stream::iter(items))
    }

    fn fetch_optional<'q>(
        &'q mut self,
        query: &'q str,
        persistent: bool,
        arguments: Option<AnyArguments<'q>>,
    ) -> BoxFuture<'q, Result<Option<AnyRow>, Error>> {
        let row = self
            .run(query, persistent, arguments, Some(1))
            .map(|items| {
                items.into_iter().find_map(|item| match item {
                    Either::Right(row) => Some(row),
                    Either::Left(_) => None,
                })
            });
        Box::pin(async move { row })
    }

    fn prepare_with<'c, 'q: 'c>(
        &'c mut self,
        sql: &'q str,
        _parameters: &[AnyTypeInfo],
    ) -> BoxFuture<'c, Result<AnyStatement<'q>, Error>> {
        let prepared = self.shape(sql).and_then(|shape| {
            let parameters = self
                .conn
                .prepare_cached(sql)
                .map_err(error)?
                .parameter_count();
            Ok(AnyStatement {
                sql: Cow::Borrowed(sql),
                parameters: Some(Either::Right(parameters)),
                column_names: shape.names.clone(),
                columns: shape.columns.clone(),
            })
        });
        Box::pin(async move { prepared })
    }

    /// Describing queries serves sqlx's compile-time macros, which connect with
    /// sqlx's own driver (`sqlite://`), never this one.
    fn describe<'q>(&'q mut self, _sql: &'q str) -> BoxFuture<'q, Result<Describe<Any>, Error>> {
        Box::pin(async {
            Err(Error::Configuration(
                "the in-thread SQLite driver does not describe queries; use a sqlite:// URL".into(),
            ))
        })
    }
}

impl Connection for InlineConnection {
    type Database = InlineSqlite;
    type Options = InlineOptions;

    fn close(self) -> BoxFuture<'static, Result<(), Error>> {
        AnyConnectionBackend::close(Box::new(self))
    }

    fn close_hard(self) -> BoxFuture<'static, Result<(), Error>> {
        AnyConnectionBackend::close(Box::new(self))
    }

    fn ping(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        AnyConnectionBackend::ping(self)
    }

    fn begin(&mut self) -> BoxFuture<'_, Result<Transaction<'_, InlineSqlite>, Error>> {
        Transaction::begin(self, None)
    }

    fn shrink_buffers(&mut self) {}

    fn flush(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async { Ok(()) })
    }

    fn should_flush(&self) -> bool {
        false
    }
}

/// Transactions as `BEGIN`/`SAVEPOINT`, run in the calling thread.
pub struct InlineTransactions;

impl TransactionManager for InlineTransactions {
    type Database = InlineSqlite;

    fn begin<'conn>(
        conn: &'conn mut InlineConnection,
        statement: Option<Cow<'static, str>>,
    ) -> BoxFuture<'conn, Result<(), Error>> {
        AnyConnectionBackend::begin(conn, statement)
    }

    fn commit(conn: &mut InlineConnection) -> BoxFuture<'_, Result<(), Error>> {
        AnyConnectionBackend::commit(conn)
    }

    fn rollback(conn: &mut InlineConnection) -> BoxFuture<'_, Result<(), Error>> {
        AnyConnectionBackend::rollback(conn)
    }

    fn start_rollback(conn: &mut InlineConnection) {
        AnyConnectionBackend::start_rollback(conn);
    }

    fn get_transaction_depth(conn: &InlineConnection) -> usize {
        conn.depth
    }
}

/// The row, value and column types of [`InlineSqlite`]: never built, since every
/// query goes through `Any`, which has its own.
#[derive(Debug)]
pub enum Never {}

/// A borrowed [`Never`] (value reference, statement).
#[derive(Debug)]
pub struct NeverRef<'a>(Infallible, PhantomData<&'a ()>);

/// [`InlineSqlite`]'s arguments: queries bind through `Any`, so nothing binds here.
#[derive(Debug, Default)]
pub struct NoArguments;

impl<'q> Arguments<'q> for NoArguments {
    type Database = InlineSqlite;

    fn reserve(&mut self, _additional: usize, _size: usize) {}

    fn add<T>(&mut self, _value: T) -> Result<(), BoxDynError>
    where
        T: 'q + Encode<'q, InlineSqlite> + Type<InlineSqlite>,
    {
        Err("bind arguments through sqlx's Any (AnyPool), not the in-thread driver".into())
    }

    fn len(&self) -> usize {
        0
    }
}

impl Row for Never {
    type Database = InlineSqlite;

    fn columns(&self) -> &[Never] {
        match *self {}
    }

    fn try_get_raw<I>(&self, _index: I) -> Result<NeverRef<'_>, Error>
    where
        I: ColumnIndex<Self>,
    {
        match *self {}
    }
}

impl Column for Never {
    type Database = InlineSqlite;

    fn ordinal(&self) -> usize {
        match *self {}
    }

    fn name(&self) -> &str {
        match *self {}
    }

    fn type_info(&self) -> &AnyTypeInfo {
        match *self {}
    }
}

impl Value for Never {
    type Database = InlineSqlite;

    fn as_ref(&self) -> NeverRef<'_> {
        match *self {}
    }

    fn type_info(&self) -> Cow<'_, AnyTypeInfo> {
        match *self {}
    }

    fn is_null(&self) -> bool {
        match *self {}
    }
}

impl<'r> ValueRef<'r> for NeverRef<'r> {
    type Database = InlineSqlite;

    fn to_owned(&self) -> Never {
        match self.0 {}
    }

    fn type_info(&self) -> Cow<'_, AnyTypeInfo> {
        match self.0 {}
    }

    fn is_null(&self) -> bool {
        match self.0 {}
    }
}

impl<'q> Statement<'q> for NeverRef<'q> {
    type Database = InlineSqlite;

    fn to_owned(&self) -> NeverRef<'static> {
        match self.0 {}
    }

    fn sql(&self) -> &str {
        match self.0 {}
    }

    fn parameters(&self) -> Option<Either<&[AnyTypeInfo], usize>> {
        match self.0 {}
    }

    fn columns(&self) -> &[Never] {
        match self.0 {}
    }

    sqlx_core::impl_statement_query!(NoArguments);
}

sqlx_core::impl_into_arguments_for_arguments!(NoArguments);

#[cfg(test)]
mod tests {
    use sqlx::{AnyPool, Row};

    use super::*;

    /// A pool on a fresh file whose path needs escaping.
    async fn pool() -> (AnyPool, PathBuf) {
        assert!(crate::db::install_drivers(), "the drivers are this crate's");
        let dir =
            std::env::temp_dir().join(format!("bazaar inline #{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = url_of(&dir.join("t?.db")).unwrap();
        assert!(url.starts_with("bazaar-sqlite:///"), "{url}");
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY, n BIGINT, x REAL, s TEXT, b BLOB)")
            .execute(&pool)
            .await
            .unwrap();
        (pool, dir)
    }

    #[tokio::test]
    async fn values_round_trip_and_placeholders_bind_by_number() {
        let (pool, dir) = pool().await;
        assert!(dir.join("t?.db").exists(), "the escaped path is the file's");
        // `$2` before `$1`: bound by number, not by order of appearance.
        sqlx::query("INSERT INTO t (id, s, n, x, b) VALUES ($1, $3, $2, $4, $5)")
            .bind(1_i64)
            .bind(-7_i64)
            .bind("héllo")
            .bind(2.5_f64)
            .bind(vec![0_u8, 255])
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO t (id, x, n) VALUES (?, ?, ?)")
            .bind(2_i32)
            .bind(Option::<f64>::None)
            .bind(true)
            .execute(&pool)
            .await
            .unwrap();
        let rows = sqlx::query("SELECT id, n, x, s, b FROM t ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].get::<i64, _>("n"), -7);
        assert_eq!(rows[0].get::<i32, _>("id"), 1);
        assert_eq!(rows[0].get::<f64, _>("x"), 2.5);
        assert_eq!(rows[0].get::<String, _>("s"), "héllo");
        assert_eq!(rows[0].get::<Vec<u8>, _>("b"), vec![0, 255]);
        assert_eq!(rows[1].get::<Option<f64>, _>(2), None);
        assert_eq!(rows[1].get::<Option<String>, _>("s"), None);
        // A bool is stored as SQLite stores it: an integer.
        assert_eq!(rows[1].get::<i64, _>("n"), 1);
        let missing: Option<(i64,)> = sqlx::query_as("SELECT n FROM t WHERE id = $1")
            .bind(99_i64)
            .fetch_optional(&pool)
            .await
            .unwrap();
        assert!(missing.is_none());
        let err = sqlx::query("SELECT $2").bind(1_i64).fetch_one(&pool).await;
        assert!(err.is_err(), "a parameter with no argument is an error");
        pool.close().await;
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn transactions_commit_roll_back_and_nest() {
        let (pool, dir) = pool().await;
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("INSERT INTO t (id) VALUES (1)")
            .execute(&mut *tx)
            .await
            .unwrap();
        {
            let mut inner = sqlx::Acquire::begin(&mut *tx).await.unwrap();
            sqlx::query("INSERT INTO t (id) VALUES (2)")
                .execute(&mut *inner)
                .await
                .unwrap();
            inner.rollback().await.unwrap();
        }
        tx.commit().await.unwrap();
        {
            let mut dropped = pool.begin().await.unwrap();
            sqlx::query("INSERT INTO t (id) VALUES (3)")
                .execute(&mut *dropped)
                .await
                .unwrap();
            // Dropped without a commit: rolled back.
        }
        let ids: Vec<(i64,)> = sqlx::query_as("SELECT id FROM t ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(ids, vec![(1,)]);
        // The connection is usable and outside any transaction afterwards.
        let mut conn = pool.acquire().await.unwrap();
        let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
        sqlx::query("INSERT INTO t (id) VALUES (4)")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        drop(conn);
        pool.close().await;
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_transaction_left_open_by_raw_sql_never_reaches_the_next_user() {
        let (pool, dir) = pool().await;
        {
            let mut conn = pool.acquire().await.unwrap();
            sqlx::raw_sql("BEGIN").execute(&mut *conn).await.unwrap();
            sqlx::query("INSERT INTO t (id) VALUES (1)")
                .execute(&mut *conn)
                .await
                .unwrap();
            sqlx::Connection::ping(&mut *conn)
                .await
                .expect_err("an open transaction sqlx does not know of");
            // Released with the transaction open: the pool must drop it.
        }
        // The pool's only connection was closed, its write never committed; the
        // next user gets a fresh connection outside any transaction.
        let mut next = pool.acquire().await.unwrap();
        sqlx::Connection::ping(&mut *next).await.unwrap();
        let count: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM t")
            .fetch_one(&mut *next)
            .await
            .unwrap();
        assert_eq!(count, (0,));
        drop(next);
        pool.close().await;
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_duplicate_key_is_a_unique_violation() {
        let (pool, dir) = pool().await;
        sqlx::query("INSERT INTO t (id) VALUES ($1)")
            .bind(1_i64)
            .execute(&pool)
            .await
            .unwrap();
        let err = sqlx::query("INSERT INTO t (id) VALUES ($1)")
            .bind(1_i64)
            .execute(&pool)
            .await
            .unwrap_err();
        assert!(crate::db::is_unique_violation(&err), "{err}");
        let err = sqlx::query("INSERT INTO nowhere VALUES (1)")
            .execute(&pool)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no such table"), "{err}");
        pool.close().await;
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn writes_run_to_their_end_and_count_what_they_changed() {
        let (pool, dir) = pool().await;
        for id in 1..=3_i64 {
            let inserted = sqlx::query("INSERT INTO t (id, n) VALUES ($1, 0)")
                .bind(id)
                .execute(&pool)
                .await
                .unwrap();
            // The row id, which the outbox takes for its sequence number.
            assert_eq!(inserted.last_insert_id(), Some(id));
        }
        // One row read of a statement that writes three: all three change.
        let first = sqlx::query("UPDATE t SET n = n + 1 RETURNING id")
            .fetch_optional(&pool)
            .await
            .unwrap();
        assert!(first.is_some());
        let done = sqlx::query("UPDATE t SET n = n + 1")
            .execute(&pool)
            .await
            .unwrap();
        assert_eq!(done.rows_affected(), 3);
        let total: (i64,) = sqlx::query_as("SELECT SUM(n) FROM t")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(total.0, 6);
        // Raw SQL runs every statement, rows included.
        let rows = sqlx::raw_sql("DELETE FROM t WHERE id = 1; SELECT COUNT(*) AS c FROM t")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].get::<i64, _>("c"), 2);
        pool.close().await;
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn created_files_have_small_pages_and_a_wal() {
        let dir =
            std::env::temp_dir().join(format!("bazaar-create-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.db");
        create(&path).unwrap();
        let conn = rusqlite::Connection::open(&path).unwrap();
        let page: u32 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!((page, mode.as_str()), (PAGE_SIZE, "wal"));
        drop(conn);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn urls_name_the_file_or_are_refused() {
        let url = url_of(Path::new("/tmp/a b/c%d.db")).unwrap();
        assert_eq!(url, "bazaar-sqlite:///tmp/a%20b/c%25d.db");
        let options: InlineOptions = url.parse().unwrap();
        assert_eq!(options.path, PathBuf::from("/tmp/a b/c%d.db"));
        assert!("sqlite:///tmp/x.db".parse::<InlineOptions>().is_err());
        assert!("bazaar-sqlite://".parse::<InlineOptions>().is_err());
    }
}
