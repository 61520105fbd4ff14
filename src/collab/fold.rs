//! Folds texts written outside the CRDT into documents' Yjs histories as they appear in the
//! feed, so that editors converge on an SQL `UPDATE documents SET body = ...` (or a document
//! an SQL `INSERT` made) at once instead of at the document's next write.
//!
//! Every process watches every change of `documents`. A change the CRDT made itself has an
//! update of its version, stored in the same transaction right after it, so that update is
//! the next event of the feed and nothing is read; any other change costs one lookup of such
//! an update (and a fold only when the text differs). The fold runs under the document row's
//! lock (`store::yjs::begin_history`), so when several processes see the same write one folds
//! it and the others find nothing to do. A change this process missed (its buffer
//! overflowed) is folded by the document's next write or read instead.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseConnection, Statement, Value};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;

use crate::graphql::Api;
use crate::pubsub::{ChangeEvent, Op};
use crate::store;

/// How long a change of `documents` waits for the update that would show the CRDT made it.
const NEXT_EVENT: Duration = Duration::from_millis(100);

/// Watches the feed until `stop` turns true, folding outside writes of documents' text.
pub async fn run(api: Api, mut stop: watch::Receiver<bool>) {
    let mut events = api.broker().subscribe_all();
    // A change of `documents` not yet known to be the CRDT's: (document, version).
    let mut pending: Option<(i64, i64)> = None;
    loop {
        let wait = async {
            match pending {
                Some(_) => tokio::time::timeout(NEXT_EVENT, events.recv()).await.ok(),
                None => Some(events.recv().await),
            }
        };
        let received = tokio::select! {
            received = wait => received,
            _ = stop.changed() => return,
        };
        let event = match received {
            Some(Ok(event)) => Some(event),
            // Nothing came in time: the pending change is checked below.
            None => None,
            Some(Err(RecvError::Lagged(missed))) => {
                tracing::debug!(
                    missed,
                    "the fold of outside writes skipped changes; their documents' next writes fold them"
                );
                None
            }
            Some(Err(RecvError::Closed)) => return,
        };
        if let Some((id, version)) = pending.take()
            && !event
                .as_ref()
                .is_some_and(|event| is_update_of(event, id, version))
        {
            check(&api, id, version).await;
        }
        pending = event.as_deref().and_then(document_change);
    }
}

/// A change of `documents` (not a deletion): its document and version.
fn document_change(event: &ChangeEvent) -> Option<(i64, i64)> {
    if event.table != "documents" || event.op == Op::Delete {
        return None;
    }
    Some((event.row_id, event.row.get("version")?.as_i64()?))
}

/// True when `event` is document `id`'s Yjs update of `version`.
fn is_update_of(event: &ChangeEvent, id: i64, version: i64) -> bool {
    event.row_id == id
        && crate::live::documents::update_of(event).is_some_and(|(v, _)| v == version)
}

/// Folds document `id`'s text if its change to `version` was made outside the CRDT.
async fn check(api: &Api, id: i64, version: i64) {
    if written_outside(api.db(), id, version).await
        && let Err(err) = fold(api, id).await
    {
        tracing::warn!(document = id, error = %err, "cannot fold a text written outside the CRDT; its next write will");
    }
}

/// True when document `id`'s change to `version` has no Yjs update of that version.
async fn written_outside(db: &DatabaseConnection, id: i64, version: i64) -> bool {
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
            [Value::from(id), Value::from(version)],
        ))
        .await;
    match ours {
        Ok(found) => found.is_none(),
        Err(err) => {
            tracing::warn!(error = %err, "cannot tell whether a document change was the CRDT's");
            false
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
