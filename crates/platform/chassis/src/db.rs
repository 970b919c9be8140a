//! Database per service: one URL picks the engine. The embedded default is a SQLite
//! file (WAL mode) under the data directory; `postgres://...` runs the same code and
//! the same migrations on PostgreSQL. Services write portable SQL (`$1` placeholders,
//! TEXT ids, BIGINT epoch milliseconds) through sqlx's `Any` driver.

use std::path::Path;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::{AnyPool, ConnectOptions, Connection, Executor};

/// Which engine a database runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    #[error("unsupported database URL scheme in `{0}`: use sqlite:// or postgres://")]
    UnsupportedUrl(String),
    #[error("cannot create the database: {0}")]
    Create(#[source] sqlx::Error),
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("migrations failed: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
}

/// A service's own database.
#[derive(Clone, Debug)]
pub struct Database {
    pool: AnyPool,
    backend: Backend,
    migrations: usize,
}

/// Pool size: SQLite has one writer anyway and PostgreSQL connections are costly;
/// 8 keeps a 2-core machine busy without queueing on the pool.
const MAX_CONNECTIONS: u32 = 8;
/// A PostgreSQL connection idle this long is pinged before it is handed out.
const PING_AFTER_IDLE: Duration = Duration::from_secs(1);
/// WAL pages between automatic checkpoints (default 1,000): a checkpoint writes
/// each changed page back once and syncs twice, so with 1 KiB pages
/// (crate::sqlite::PAGE_SIZE) a 4 MiB WAL keeps checkpoints as rare as the default
/// did with 4 KiB pages.
const SQLITE_CHECKPOINT_PAGES: u32 = 4000;
/// How long a query waits for a locked SQLite file before failing.
const SQLITE_BUSY_TIMEOUT_MS: u32 = 5_000;

static DRIVERS: OnceLock<bool> = OnceLock::new();

/// Installs sqlx's `Any` drivers: PostgreSQL, SQLite and the in-thread SQLite
/// ([`crate::sqlite`]). `false` when someone installed sqlx's defaults first (then
/// SQLite files are served by sqlx's own driver). Call it instead of
/// `sqlx::any::install_default_drivers` in a process that also uses [`Database`].
pub fn install_drivers() -> bool {
    *DRIVERS.get_or_init(|| {
        sqlx::any::install_drivers(&[
            sqlx::postgres::any::DRIVER,
            sqlx::sqlite::any::DRIVER,
            crate::sqlite::DRIVER,
        ])
        .is_ok()
    })
}

/// A pool on `url`, set up for its engine.
async fn open_pool(url: &str, backend: Backend) -> Result<AnyPool, DbError> {
    let options = AnyConnectOptions::from_str(url)
        .map_err(DbError::Connect)?
        .disable_statement_logging();
    AnyPoolOptions::new()
        // One SQLite connection: SQLite has one writer, and the in-thread driver must
        // never wait for a lock another task of its own thread holds.
        .max_connections(if backend == Backend::Sqlite {
            1
        } else {
            MAX_CONNECTIONS
        })
        .acquire_timeout(Duration::from_secs(5))
        // sqlx's own test pings every connection before handing it out: for SQLite a
        // query to test a local file that cannot have gone away, and for PostgreSQL a
        // round trip before every transaction. A PostgreSQL connection idle for a
        // while is still pinged (a server restart leaves dead connections in the
        // pool); one in steady use has just shown it works.
        .test_before_acquire(false)
        .before_acquire(move |conn, meta| {
            Box::pin(async move {
                if backend != Backend::Sqlite && meta.idle_for >= PING_AFTER_IDLE {
                    // An error drops it without a goodbye to a server that is gone;
                    // the pool opens another.
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if backend == Backend::Sqlite {
                    // WAL: readers never block the writer; NORMAL is durable in WAL
                    // mode except for the last commits on power loss (not on a
                    // process crash).
                    conn.execute(sqlx::raw_sql(&format!(
                        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                         PRAGMA foreign_keys = ON; PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}; \
                         PRAGMA wal_autocheckpoint = {SQLITE_CHECKPOINT_PAGES};"
                    )))
                    .await?;
                }
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .map_err(DbError::Connect)
}

impl Database {
    /// The default URL for `service` under `data_dir`: `sqlite://<dir>/<service>.db`.
    pub fn default_url(data_dir: &Path, service: &str) -> String {
        format!("sqlite://{}/{service}.db", data_dir.display())
    }

    /// Creates the database if missing, connects, and applies `migrator`.
    pub async fn connect(url: &str, migrator: &Migrator) -> Result<Self, DbError> {
        let inline_driver = install_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(DbError::UnsupportedUrl(redact(url)));
        };
        // The SQLite file the URL names (none for `sqlite::memory:`).
        let sqlite_file = if backend == Backend::Sqlite {
            sqlite_path(url)
        } else {
            None
        };
        match sqlite_file {
            Some(path) => {
                if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| DbError::Create(sqlx::Error::Io(e)))?;
                }
                // A new file is created with small pages (crate::sqlite::PAGE_SIZE);
                // sqlx would create it with 4 KiB ones.
                if !path.exists() {
                    crate::sqlite::create(path).map_err(DbError::Create)?;
                }
            }
            None => {
                if !sqlx::Any::database_exists(url)
                    .await
                    .map_err(DbError::Create)?
                {
                    sqlx::Any::create_database(url)
                        .await
                        .map_err(DbError::Create)?;
                }
            }
        }
        let pool = open_pool(url, backend).await?;
        // Several instances of a service may start at once on one SQLite file, and
        // sqlx locks migrations only on PostgreSQL: a loser of that race fails on
        // "already exists" while the winner is mid-migration, and succeeds once the
        // winner has recorded it.
        let mut attempt = 0;
        loop {
            match migrator.run(&pool).await {
                Ok(()) => break,
                Err(e) if backend == Backend::Sqlite && attempt < 10 => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "migration raced another instance; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(100 * attempt)).await;
                }
                Err(e) => return Err(DbError::Migrate(e)),
            }
        }
        // A SQLite file is then served by the in-thread driver (crate::sqlite); sqlx's
        // own driver stays for migrations, which the in-thread one does not run.
        let pool = match sqlite_file.filter(|_| inline_driver) {
            Some(path) => {
                let inline = crate::sqlite::url_of(path)
                    .map_err(|e| DbError::Connect(sqlx::Error::Io(e)))?;
                pool.close().await;
                open_pool(&inline, backend).await?
            }
            None => pool,
        };
        Ok(Self {
            pool,
            backend,
            migrations: migrator.iter().count(),
        })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Readiness: the database answers and every migration is applied.
    pub async fn check(&self) -> Result<(), String> {
        let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| format!("database unreachable: {e}"))?;
        if (applied as usize) < self.migrations {
            return Err(format!(
                "{applied} of {} migrations applied",
                self.migrations
            ));
        }
        Ok(())
    }

    /// Closes every connection (checkpointing SQLite's WAL).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Whether an error is a unique-constraint violation (a lost insert race).
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

fn sqlite_path(url: &str) -> Option<&Path> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next()?;
    (!path.is_empty() && path != ":memory:").then(|| Path::new(path))
}

/// A URL without its password, for error messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("postgres://bob:s3cret@db:5432/orders"),
            "postgres://bob:***@db:5432/orders"
        );
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
    }

    #[test]
    fn sqlite_paths() {
        assert_eq!(
            sqlite_path("sqlite:///tmp/a.db?mode=rwc"),
            Some(Path::new("/tmp/a.db"))
        );
        assert_eq!(sqlite_path("sqlite::memory:"), None);
    }
}
