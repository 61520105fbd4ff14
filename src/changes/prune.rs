//! Retention: deletes `change_log` rows older than the configured age or beyond the
//! configured count, never past what this process has published, and records how far it
//! pruned (`change_log_state.pruned_through`) so a resume from an older cursor answers
//! CURSOR_EXPIRED instead of silently skipping changes.
//!
//! With them go the Yjs updates (`document_updates`) older than the age that a document's
//! snapshot already holds (all but the snapshot's last, which loading reads for its
//! version): loading needs only the snapshot and the updates after it, and a replay reads the
//! updates from the log's own rows.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::{
    ConnectionTrait, DatabaseBackend, DatabaseConnection, Statement, TransactionTrait, Value,
};
use tokio::sync::watch;

use super::ChangeError;
use super::log::pruned_through;
use crate::pubsub::Broker;

/// How much of the log to keep.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    /// Changes older than this may be pruned.
    pub max_age: Duration,
    /// At most this many changes are kept.
    pub max_rows: u64,
    /// How often to prune.
    pub interval: Duration,
}

/// Prunes the log in the background.
pub struct Pruner {
    db: DatabaseConnection,
    broker: Arc<Broker>,
    retention: Retention,
}

impl Pruner {
    pub fn new(db: DatabaseConnection, broker: Arc<Broker>, retention: Retention) -> Self {
        Self {
            db,
            broker,
            retention,
        }
    }

    /// Prunes every `interval` until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.retention.interval) => {}
                _ = shutdown.changed() => return,
            }
            if let Err(err) = self.prune_once().await {
                tracing::warn!(error = %err, "pruning the change log failed");
            }
        }
    }

    /// Prunes what retention allows now; returns the new `pruned_through`.
    pub async fn prune_once(&self) -> Result<i64, ChangeError> {
        let backend = self.db.get_database_backend();
        let placeholder = if backend == DatabaseBackend::Postgres {
            "$1"
        } else {
            "?"
        };
        // An age beyond what a timestamp can express means "keep by age forever".
        let cutoff = chrono::Duration::from_std(self.retention.max_age)
            .ok()
            .and_then(|age| chrono::Utc::now().checked_sub_signed(age))
            .unwrap_or(chrono::DateTime::<chrono::Utc>::UNIX_EPOCH);
        let cutoff: Value = match backend {
            // SQLite compares the text it stores, in the same format.
            DatabaseBackend::Sqlite => cutoff.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string().into(),
            _ => cutoff.into(),
        };
        let by_age = self
            .scalar(Statement::from_sql_and_values(
                backend,
                format!(
                    "SELECT COALESCE(MAX(position), 0) AS position FROM change_log WHERE changed_at < {placeholder}"
                ),
                [cutoff.clone()],
            ))
            .await?;
        let by_count = self
            .scalar(Statement::from_string(
                backend,
                format!(
                    "SELECT COALESCE((SELECT position FROM change_log ORDER BY position DESC \
                     LIMIT 1 OFFSET {}), 0) AS position",
                    self.retention.max_rows
                ),
            ))
            .await?;
        let cut = by_age.max(by_count).min(self.broker.published());
        let covered = self
            .db
            .execute_raw(Statement::from_sql_and_values(
                backend,
                format!(
                    "DELETE FROM document_updates WHERE created_at < {placeholder} AND id < \
                     (SELECT s.through_update_id FROM document_snapshots s \
                      WHERE s.document_id = document_updates.document_id)"
                ),
                [cutoff],
            ))
            .await?
            .rows_affected();
        if covered > 0 {
            tracing::debug!(
                updates = covered,
                "pruned Yjs updates their documents' snapshots hold"
            );
        }
        let current = pruned_through(&self.db).await?;
        if cut <= current {
            return Ok(current);
        }
        let txn = self.db.begin().await?;
        txn.execute_raw(Statement::from_sql_and_values(
            backend,
            match backend {
                DatabaseBackend::Postgres => {
                    "UPDATE change_log_state SET pruned_through = $1 WHERE id = 1 AND pruned_through < $2"
                }
                _ => "UPDATE change_log_state SET pruned_through = ? WHERE id = 1 AND pruned_through < ?",
            },
            [cut.into(), cut.into()],
        ))
        .await?;
        txn.execute_raw(Statement::from_sql_and_values(
            backend,
            format!("DELETE FROM change_log WHERE position <= {placeholder}"),
            [cut.into()],
        ))
        .await?;
        txn.commit().await?;
        tracing::debug!(pruned_through = cut, "pruned the change log");
        Ok(cut)
    }

    async fn scalar(&self, statement: Statement) -> Result<i64, ChangeError> {
        Ok(match self.db.query_one_raw(statement).await? {
            Some(row) => row.try_get::<i64>("", "position")?,
            None => 0,
        })
    }
}
