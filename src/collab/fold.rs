//! Folds texts written outside the CRDT into documents' Yjs histories as they appear in the
//! feed, so that editors converge on an SQL `UPDATE documents SET body = ...` (or a document
//! an SQL `INSERT` made) at once instead of at the document's next write.
//!
//! Every process watches every change of `documents`; a change the CRDT made itself has an
//! update of its version, so only the others cost more than that one lookup. The fold runs
//! under the document row's lock (`store::yjs::begin_history`), so when several processes
//! see the same write one folds it and the others find nothing to do. A change this process
//! missed (its buffer overflowed) is folded by the document's next write or read instead.

use std::sync::Arc;

use sea_orm::{ConnectionTrait, DatabaseConnection, Statement, Value};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;

use crate::graphql::Api;
use crate::pubsub::{ChangeEvent, Op};
use crate::store;

/// Watches the feed until `stop` turns true, folding outside writes of documents' text.
pub async fn run(api: Api, mut stop: watch::Receiver<bool>) {
    let mut events = api.broker().subscribe_all();
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = stop.changed() => return,
        };
        match event {
            Ok(event) => {
                if let Some(id) = written_outside(api.db(), &event).await
                    && let Err(err) = fold(&api, id).await
                {
                    tracing::warn!(document = id, error = %err, "cannot fold a text written outside the CRDT; its next write will");
                }
            }
            Err(RecvError::Lagged(missed)) => {
                tracing::debug!(
                    missed,
                    "the fold of outside writes skipped changes; their documents' next writes fold them"
                );
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// The document `event` may have written outside the CRDT: an INSERT or UPDATE of
/// `documents` with no Yjs update of its version.
async fn written_outside(db: &DatabaseConnection, event: &Arc<ChangeEvent>) -> Option<i64> {
    if event.table != "documents" || event.op == Op::Delete {
        return None;
    }
    let version = event.row.get("version")?.as_i64()?;
    let backend = db.get_database_backend();
    let sql = match backend {
        sea_orm::DatabaseBackend::Postgres => {
            "SELECT 1 AS found FROM document_updates WHERE document_id = $1 AND version = $2"
        }
        _ => "SELECT 1 AS found FROM document_updates WHERE document_id = ? AND version = ?",
    };
    let ours = db
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            sql,
            [Value::from(event.row_id), Value::from(version)],
        ))
        .await;
    match ours {
        Ok(Some(_)) => None,
        Ok(None) => Some(event.row_id),
        Err(err) => {
            tracing::warn!(error = %err, "cannot tell whether a document change was the CRDT's");
            None
        }
    }
}

async fn fold(api: &Api, id: i64) -> Result<(), store::StoreError> {
    if !store::yjs::needs_history(api.db(), id).await? {
        return Ok(());
    }
    api.committed()
        .write(move |db| Box::pin(async move { store::yjs::begin_history(&db, id).await }))
        .await?;
    Ok(())
}
