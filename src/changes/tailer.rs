//! The tailer: follows `change_log` in position order and publishes a gap-free sequence.
//!
//! Postgres positions come from a sequence, and transactions commit in any order: position
//! 10 may become visible after 11. So the tailer publishes only the contiguous prefix of
//! what it reads. At a gap it takes a fresh transaction id X in its own short transaction,
//! waits until `pg_snapshot_xmin(pg_current_snapshot())` has passed X, and reads again:
//! every transaction that held a position up to the highest one seen had taken its xid
//! before its position (the trigger calls `pg_current_xact_id()` first), so before X; once
//! the horizon passed X they have all committed or rolled back, and a position still missing
//! is a rollback, skipped for good. ARCHITECTURE.md has the whole argument.
//!
//! SQLite has one writer at a time and positions are assigned inside it, so position order
//! is commit order and a missing position can only be a rollback: no wait is needed.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseBackend, DatabaseConnection, Statement};
use tokio::sync::watch;

use super::log::{max_position, read_range};
use super::{ChangeError, Doorbell};
use crate::pubsub::{Broker, ChangeEvent};

/// Rows read per step: within a topic's buffer, so one step alone never makes a subscriber
/// that keeps up lag.
const BATCH: u64 = crate::pubsub::TOPIC_CAPACITY as u64;

/// Where a tailer hands what it decided: the broker (this process's subscribers), or the
/// bus's relay (the stream every process follows).
pub trait Sink: Send {
    /// Takes a gap-free, ordered batch that ends at `through` (`rows` may be empty: a gap
    /// decided for good). On an error the batch may be partly taken.
    fn take(
        &mut self,
        rows: Vec<ChangeEvent>,
        through: i64,
    ) -> impl std::future::Future<Output = Result<(), ChangeError>> + Send;
}

impl Sink for Arc<Broker> {
    async fn take(&mut self, rows: Vec<ChangeEvent>, through: i64) -> Result<(), ChangeError> {
        let events = rows.into_iter().map(Arc::new).collect();
        self.publish(events, through);
        Ok(())
    }
}

/// Follows the log and hands what it decided to its sink (by default, the broker).
pub struct Tailer<S = Arc<Broker>> {
    db: DatabaseConnection,
    sink: S,
    doorbell: Doorbell,
    /// Every position up to here is decided and published.
    last: i64,
    /// How often to look without a ring (writes by other processes on SQLite; a safety net
    /// on Postgres).
    poll: Duration,
    /// How long one statement may take (none: as long as it takes).
    io_timeout: Option<Duration>,
}

impl Tailer {
    /// The position through which the log is decided right now: the highest position, once
    /// every transaction that might still hold a lower one has ended. The broker starts
    /// there; older changes are history, served by replay.
    pub async fn start_position(db: &DatabaseConnection) -> Result<i64, ChangeError> {
        let max = max_position(db).await?;
        if db.get_database_backend() == DatabaseBackend::Postgres {
            let wait = wait_for_horizon(db, None);
            tokio::pin!(wait);
            if let Ok(done) = tokio::time::timeout(Duration::from_secs(5), &mut wait).await {
                done?;
            } else {
                tracing::warn!(
                    "waiting for transactions older than this start to end before serving \
                     changes (a long transaction in the cluster delays the feed)"
                );
                wait.await?;
            }
        }
        Ok(max)
    }
}

impl<S: Sink> Tailer<S> {
    /// A tailer that continues after `last` (from `start_position`).
    pub fn new(
        db: DatabaseConnection,
        sink: S,
        doorbell: Doorbell,
        last: i64,
        poll: Duration,
    ) -> Self {
        Self {
            db,
            sink,
            doorbell,
            last,
            poll,
            io_timeout: None,
        }
    }

    /// Fails a step whose statement takes longer than `timeout` (a connection that hangs
    /// without failing), instead of waiting on it: the bus's relay, whose heartbeat says it is
    /// alive, must not hang. Waiting at a gap is many short statements, so it may last.
    pub fn with_io_timeout(mut self, timeout: Duration) -> Self {
        self.io_timeout = Some(timeout);
        self
    }

    /// Every position up to here is decided and taken by the sink.
    pub fn last(&self) -> i64 {
        self.last
    }

    /// The sink.
    pub fn sink(&mut self) -> &mut S {
        &mut self.sink
    }

    /// Waits for a ring of the doorbell, or `poll` at most.
    pub async fn idle(&self) {
        tokio::select! {
            _ = self.doorbell.wait() => {}
            _ = tokio::time::sleep(self.poll) => {}
        }
    }
}

impl Tailer<Arc<Broker>> {
    /// Runs until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            if *shutdown.borrow() {
                return;
            }
            let step = self.step().await;
            if step.is_ok() {
                self.sink.stats.beat();
            }
            match step {
                Ok(true) => continue,
                Ok(false) => {
                    backoff = Duration::from_millis(50);
                    tokio::select! {
                        _ = self.doorbell.wait() => {}
                        _ = tokio::time::sleep(self.poll) => {}
                        _ = shutdown.changed() => return,
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, last = self.last, "change log read failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

impl<S: Sink> Tailer<S> {
    /// Reads once and hands on what is decided; true when there may be more to read now.
    pub async fn step(&mut self) -> Result<bool, ChangeError> {
        let io = self.io_timeout;
        let rows = bounded(io, read_range(&self.db, self.last, None, BATCH)).await?;
        let Some(highest) = rows.last().map(|row| row.position) else {
            return Ok(false);
        };
        let full = rows.len() as u64 == BATCH;
        let contiguous = rows
            .iter()
            .zip(self.last + 1..)
            .take_while(|(row, expected)| row.position == *expected)
            .count();
        if contiguous == rows.len() {
            self.publish(rows, highest).await?;
            return Ok(full);
        }
        let mut rows = rows;
        rows.truncate(contiguous);
        if let Some(through) = rows.last().map(|row| row.position) {
            self.publish(rows, through).await?;
        }
        // A gap below `highest`: wait until whoever held it has ended, then everything up
        // to `highest` is decided; what is still missing was rolled back (or pruned: with
        // several processes, retention must exceed how far any of them falls behind).
        let pruned = bounded(io, super::log::pruned_through(&self.db)).await?;
        if pruned > self.last {
            tracing::error!(
                last = self.last,
                pruned_through = pruned,
                "the change log was pruned past this process's position; subscribers here \
                 miss those changes (raise retention)"
            );
        }
        if self.db.get_database_backend() == DatabaseBackend::Postgres {
            wait_for_horizon(&self.db, io).await?;
        }
        loop {
            let rows = bounded(io, read_range(&self.db, self.last, Some(highest), BATCH)).await?;
            let done = (rows.len() as u64) < BATCH;
            match rows.last().map(|row| row.position) {
                Some(through) => self.publish(rows, through).await?,
                None => break,
            }
            if done {
                break;
            }
        }
        // Positions up to `highest` that never appeared are permanent gaps.
        self.publish(Vec::new(), highest).await?;
        Ok(true)
    }

    async fn publish(&mut self, rows: Vec<ChangeEvent>, through: i64) -> Result<(), ChangeError> {
        self.sink.take(rows, through).await?;
        self.last = self.last.max(through);
        Ok(())
    }
}

/// `statement`, failed with `ChangeError::Timeout` past `timeout` (when there is one).
async fn bounded<T>(
    timeout: Option<Duration>,
    statement: impl std::future::Future<Output = Result<T, ChangeError>>,
) -> Result<T, ChangeError> {
    match timeout {
        Some(timeout) => tokio::time::timeout(timeout, statement)
            .await
            .map_err(|_| ChangeError::Timeout(timeout))?,
        None => statement.await,
    }
}

/// Waits until every transaction that had an xid when this was called has ended: takes a
/// fresh xid X in its own transaction, then polls the snapshot horizon until it passes X
/// (each statement within `io`, when given).
pub(crate) async fn wait_for_horizon(
    db: &DatabaseConnection,
    io: Option<Duration>,
) -> Result<(), ChangeError> {
    let row = bounded(io, async {
        Ok(db
            .query_one_raw(Statement::from_string(
                DatabaseBackend::Postgres,
                "SELECT pg_current_xact_id()::text AS xid",
            ))
            .await?)
    })
    .await?;
    let xid: String = match row {
        Some(row) => row.try_get("", "xid")?,
        None => return Ok(()),
    };
    let xid: u64 = xid.parse().map_err(|_| ChangeError::Decode {
        position: 0,
        reason: format!("transaction id {xid:?}"),
    })?;
    let check = format!("SELECT pg_snapshot_xmin(pg_current_snapshot()) > '{xid}'::xid8 AS passed");
    let mut pause = Duration::from_millis(1);
    loop {
        let row = bounded(io, async {
            Ok(db
                .query_one_raw(Statement::from_string(
                    DatabaseBackend::Postgres,
                    check.clone(),
                ))
                .await?)
        })
        .await?;
        let passed = match row {
            Some(row) => row.try_get::<bool>("", "passed")?,
            None => false,
        };
        if passed {
            return Ok(());
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}
