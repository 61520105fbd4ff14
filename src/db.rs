//! Opening the database: the SQLite file or PostgreSQL behind one SeaORM connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{ConnectOptions, DatabaseBackend, DatabaseConnection, DbErr};

/// Run on each of the server's PostgreSQL connections as it opens: its writes are announced
/// by the process, not by the trigger's NOTIFY.
pub const WRITER_SETTING: &str = "SET syncgraph.writer = 'on'";

/// How long a SQLite writer waits for another's lock before giving up.
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("unsupported database URL: expected sqlite://PATH or postgres://...")]
    UnsupportedUrl,
    #[error("cannot connect to the database")]
    Connect(#[source] DbErr),
    #[error("the database could not be reached in {0} s of retrying (--db-connect-timeout-secs)")]
    Unreachable(u64, #[source] DbErr),
}

/// Counts every statement the connection runs; tests use it to prove batching.
#[derive(Clone, Debug, Default)]
pub struct StatementCounter(Arc<AtomicU64>);

impl StatementCounter {
    /// Statements run so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Opens `url` with the settings its backend needs.
///
/// SQLite: the file is created if missing, WAL journal, a busy timeout, foreign keys on, and a
/// pool of several connections (SeaORM would default to one). PostgreSQL: a pool of
/// `max_connections`.
pub async fn connect(
    url: &str,
    max_connections: u32,
) -> Result<(DatabaseConnection, StatementCounter), ConnectError> {
    let backend = backend_of(url).ok_or(ConnectError::UnsupportedUrl)?;
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .max_connections(max_connections.max(1))
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(10))
        .sqlx_logging(false);
    if backend == DatabaseBackend::Postgres {
        // Marks the connection as syncgraph's when it opens (not per write): `log_change()`
        // then does not NOTIFY in our transactions, and the process announces its commits
        // itself (`changes::Announcer`; migration m20261204_000001).
        options.map_sqlx_postgres_pool_opts(|pool| {
            pool.after_connect(|connection, _| {
                Box::pin(async move {
                    use sea_orm::sqlx::Executor;
                    connection.execute(WRITER_SETTING).await.map(|_| ())
                })
            })
        });
    }
    if backend == DatabaseBackend::Sqlite {
        options.map_sqlx_sqlite_opts(|opts| {
            opts.create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(SQLITE_BUSY_TIMEOUT)
                .foreign_keys(true)
        });
    }
    let mut db = sea_orm::Database::connect(options)
        .await
        .map_err(ConnectError::Connect)?;
    let counter = StatementCounter::default();
    let count = counter.0.clone();
    db.set_metric_callback(move |_info| {
        count.fetch_add(1, Ordering::Relaxed);
    });
    Ok((db, counter))
}

/// `connect`, retried with backoff (0.5 s doubling to 8 s) while the database cannot be
/// reached, for up to `patience`: a server started before its database comes up waits
/// for it. An unsupported URL fails at once.
pub async fn connect_patiently(
    url: &str,
    max_connections: u32,
    patience: Duration,
) -> Result<(DatabaseConnection, StatementCounter), ConnectError> {
    let backend = backend_of(url).ok_or(ConnectError::UnsupportedUrl)?;
    let deadline = tokio::time::Instant::now() + patience;
    let mut delay = Duration::from_millis(500);
    // Probe with one connection and a short timeout, so each attempt is quick and logged;
    // the real pool (with its longer acquire timeout) is opened once the database answers.
    if backend == DatabaseBackend::Sqlite {
        // A file: nothing to wait for.
        return connect(url, max_connections).await;
    }
    loop {
        let mut probe = ConnectOptions::new(url.to_owned());
        probe
            .max_connections(1)
            .min_connections(0)
            .connect_timeout(Duration::from_secs(2))
            .acquire_timeout(Duration::from_secs(2))
            .sqlx_logging(false);
        match sea_orm::Database::connect(probe).await {
            Ok(db) => {
                db.close().await.ok();
                break;
            }
            Err(err) if tokio::time::Instant::now() + delay < deadline => {
                tracing::warn!(
                    error = %err,
                    retry_in_ms = delay.as_millis() as u64,
                    "the database cannot be reached; retrying"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(8));
            }
            Err(err) => return Err(ConnectError::Unreachable(patience.as_secs(), err)),
        }
    }
    connect(url, max_connections).await
}

/// The backend a URL names, if it is one we serve.
pub fn backend_of(url: &str) -> Option<DatabaseBackend> {
    if url.starts_with("sqlite:") {
        Some(DatabaseBackend::Sqlite)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Some(DatabaseBackend::Postgres)
    } else {
        None
    }
}

/// The secret stored under `name` in `server_secrets`; the first caller stores `generate()`.
/// Concurrent first starts agree: the insert keeps whichever row landed first.
pub async fn stored_secret(
    db: &DatabaseConnection,
    name: &str,
    generate: impl FnOnce() -> String,
) -> Result<String, DbErr> {
    use sea_orm::{ConnectionTrait, Statement};
    let backend = db.get_database_backend();
    let (insert, select) = match backend {
        DatabaseBackend::Postgres => (
            "INSERT INTO server_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            "SELECT value FROM server_secrets WHERE name = $1",
        ),
        _ => (
            "INSERT INTO server_secrets (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
            "SELECT value FROM server_secrets WHERE name = ?",
        ),
    };
    db.execute_raw(Statement::from_sql_and_values(
        backend,
        insert,
        [name.into(), generate().into()],
    ))
    .await?;
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            select,
            [name.into()],
        ))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound(format!("server secret {name}")))?;
    row.try_get("", "value")
}

/// How often the server checkpoints an SQLite database's WAL (see `checkpoint_wal`).
pub const WAL_CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// WAL frames (pages) past which the checkpoint also truncates the file (64 MiB at 4 KiB).
pub const WAL_TRUNCATE_FRAMES: i64 = 16_384;

/// Checkpoints an SQLite WAL every `every` until `shutdown` turns true.
///
/// SQLite's automatic checkpoint never runs for this server's writes: it runs only when a
/// statement is stepped to its end, and the writes here are `INSERT/UPDATE/DELETE ...
/// RETURNING` statements that sqlx resets after their row (the commit happens in the
/// reset). Without a checkpoint the WAL file grew without bound (775 MB in 10 s at 2,400
/// writes/s) and every read slowed down searching it.
///
/// A passive checkpoint copies the WAL into the database without waiting for or blocking
/// anyone. Under a steady load some reader always holds a WAL snapshot, so the file is never
/// started over and keeps growing; past `WAL_TRUNCATE_FRAMES` a TRUNCATE checkpoint waits
/// (up to the busy timeout) for readers to move on and empties it. That wait holds writers
/// back briefly, so it is kept for when the file is large.
pub async fn checkpoint_wal(
    db: DatabaseConnection,
    every: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        if let Err(err) = checkpoint_wal_once(&db).await {
            tracing::warn!(error = %err, "checkpointing the SQLite WAL failed");
        }
    }
}

/// One passive checkpoint, then a truncating one if the WAL is past `WAL_TRUNCATE_FRAMES`.
pub async fn checkpoint_wal_once(db: &DatabaseConnection) -> Result<(), DbErr> {
    use sea_orm::{ConnectionTrait, Statement};
    let passive = Statement::from_string(DatabaseBackend::Sqlite, "PRAGMA wal_checkpoint(PASSIVE)");
    // The row is (busy, frames in the WAL, frames checkpointed).
    let frames: i64 = match db.query_one_raw(passive).await? {
        Some(row) => row.try_get_by_index(1)?,
        None => 0,
    };
    if frames >= WAL_TRUNCATE_FRAMES {
        db.execute_unprepared("PRAGMA wal_checkpoint(TRUNCATE)")
            .await?;
    }
    Ok(())
}

/// A migrated SQLite database in a temporary folder, with user 1 a member of channel 7, for
/// unit tests that need real tables; the folder goes when the returned handle is dropped.
#[cfg(test)]
pub(crate) async fn test_database() -> (tempfile::TempDir, DatabaseConnection, String) {
    use sea_orm::ConnectionTrait;
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("test.db").display());
    let (db, _) = connect(&url, 2).await.expect("database");
    crate::app::migrate(&db).await.expect("migrations");
    for sql in [
        "INSERT INTO users (id, name, email, password_hash) VALUES (1, 'Ada', 'ada@example.com', 'x')",
        "INSERT INTO channels (id, name) VALUES (7, 'general')",
        "INSERT INTO channel_members (channel_id, user_id) VALUES (7, 1)",
    ] {
        db.execute_unprepared(sql).await.expect("fixture");
    }
    (dir, db, url)
}

/// `test_database`'s fixture on a fresh PostgreSQL database of `SYNCGRAPH_TEST_POSTGRES`'s
/// server (only built where it names one: cfg `postgres_tests`, see build.rs). Returns the
/// database, and the admin connection and name to drop it with (`drop_test_postgres`).
#[cfg(all(test, postgres_tests))]
pub(crate) async fn test_postgres() -> (DatabaseConnection, DatabaseConnection, String) {
    use sea_orm::ConnectionTrait;
    let admin_url = std::env::var("SYNCGRAPH_TEST_POSTGRES").expect("SYNCGRAPH_TEST_POSTGRES");
    let admin = sea_orm::Database::connect(&admin_url).await.expect("admin");
    let name = format!(
        "syncgraph_unit_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos()
    );
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    let url = format!(
        "{}/{name}",
        admin_url.rsplit_once('/').expect("a database URL").0
    );
    let (db, _) = connect(&url, 4).await.expect("database");
    crate::app::migrate(&db).await.expect("migrations");
    for sql in [
        "INSERT INTO users (id, name, email, password_hash) VALUES (1, 'Ada', 'ada@example.com', 'x'), (2, 'Bob', 'bob@example.com', 'x')",
        "INSERT INTO channels (id, name) VALUES (7, 'general')",
        "INSERT INTO channel_members (channel_id, user_id) VALUES (7, 1)",
    ] {
        db.execute_unprepared(sql).await.expect("fixture");
    }
    (db, admin, name)
}

/// Drops a database made by `test_postgres`.
#[cfg(all(test, postgres_tests))]
pub(crate) async fn drop_test_postgres(
    db: DatabaseConnection,
    admin: DatabaseConnection,
    name: &str,
) {
    use sea_orm::ConnectionTrait;
    let _ = db.close().await;
    admin
        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .expect("drop database");
}
