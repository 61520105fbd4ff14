//! A document's text as a Yjs document (yrs): its root `Y.Text` named `body`.
//!
//! Stored as the updates that made it (`document_updates`, base64 of the v1 encoding, each
//! with the document version it produced), after an optional merged snapshot
//! (`document_snapshots`). Every write runs in one transaction that locks the document's row
//! (PostgreSQL; SQLite has one writer), rebuilds the Yjs document, applies the update, and
//! stores it with `documents.body` and `version`, so the text, the version and the update
//! stream always agree.
//!
//! - `load`: reading a history (`Loaded`, `load`, `load_for_sync`, the per-process `Cache`);
//! - `write`: storing updates (`apply_all`, `integrate`, the rows and the snapshot);
//! - `edit`: a whole-text write as a character diff;
//! - here: what starts a history and folds whole-text writers into it (`begin_history`,
//!   `record_text_edit`, the fold of an SQL write), decoding, and the limits.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use entities::document;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseBackend, EntityTrait, QueryFilter, Statement,
    TransactionSession, TransactionTrait, Value,
};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, GetString, ReadTxn, StateVector, Text, Transact, Update};

use super::{StoreError, channel};

mod edit;
mod load;
mod write;
pub use edit::edit;
#[cfg(test)]
use load::apply_stored;
use load::catch_up;
pub use load::{Cache, ForSync, Loaded, load, load_for_sync};
pub use write::{Applied, BatchError, apply, apply_all, copy_of};
#[cfg(test)]
use write::{TextStats, integrate};
use write::{begin, insert_update, last_update_position, lock, roll_snapshot};

/// The root text's name, as Yjs clients name it.
pub const TEXT: &str = "body";

/// After this many updates past the snapshot, a write rolls the snapshot forward.
pub const SNAPSHOT_EVERY: i64 = 100;

/// The longest text, in characters (a document's `body`).
pub const MAX_TEXT_CHARS: usize = 100_000;

/// Why an update was refused.
#[derive(Debug, thiserror::Error)]
pub enum BadUpdate {
    #[error("the update is not base64")]
    NotBase64,
    #[error("the update is not a Yjs v1 update")]
    NotYjs,
    #[error("the update depends on changes the server does not have (sync first)")]
    MissingDependencies,
    #[error("the update changes something other than the document's text `body`")]
    OtherTypes,
    #[error("the update puts something other than text into `body`")]
    NotText,
    #[error("the text would be longer than 100000 characters")]
    TooLong,
    #[error("the text would contain a NUL character")]
    Nul,
}

/// Decodes a base64 Yjs v1 update, checking that it decodes.
pub fn decode(update: &str) -> Result<Update, BadUpdate> {
    let bytes = STANDARD
        .decode(update.trim())
        .map_err(|_| BadUpdate::NotBase64)?;
    decode_v1(&bytes)
}

/// Decodes a Yjs v1 update (a refusal, never a panic, on any input).
pub fn decode_v1(bytes: &[u8]) -> Result<Update, BadUpdate> {
    std::panic::catch_unwind(|| Update::decode_v1(bytes))
        .map_err(|_| BadUpdate::NotYjs)?
        .map_err(|_| BadUpdate::NotYjs)
}

/// Decodes a base64 state vector.
pub fn decode_state_vector(vector: &str) -> Result<StateVector, BadUpdate> {
    let bytes = STANDARD
        .decode(vector.trim())
        .map_err(|_| BadUpdate::NotBase64)?;
    StateVector::decode_v1(&bytes).map_err(|_| BadUpdate::NotYjs)
}

/// Gives document `id` its Yjs history if it has none yet (see `ensure_started`), and folds
/// a text written outside the CRDT into it (see `fold_outside_write`). Returns whether it
/// stored anything.
pub async fn begin_history<C: ConnectionTrait + TransactionTrait>(
    db: &C,
    id: i64,
) -> Result<bool, StoreError> {
    let txn = begin(db).await?;
    let current = lock(&txn, id).await?;
    let loaded = load(&txn, id).await?;
    let before = loaded.last_update_id;
    let loaded = ensure_started(&txn, &current, loaded).await?;
    let (_, loaded) = fold_outside_write(&txn, current, loaded).await?;
    let stored = loaded.last_update_id != before;
    txn.commit().await?;
    Ok(stored)
}

/// Whether document `id`'s Yjs history needs `begin_history`: it has none yet while its
/// text is not empty, or its text was written outside the CRDT (an SQL `UPDATE documents
/// SET body`). Read-only; `begin_history` decides again under the row's lock.
pub async fn needs_history(db: &impl ConnectionTrait, id: i64) -> Result<bool, StoreError> {
    let Some(current) = document::Entity::find_by_id(id).one(db).await? else {
        return Ok(false);
    };
    Ok(load(db, id).await?.needs_history(&current.body))
}

/// A text written outside the CRDT (an SQL `UPDATE documents SET body = ...` by another
/// client) folded in as the smallest edit from the Yjs text to it, stored as an update of
/// the row's version (raised once more if an update already has that version), so editors
/// converge on it instead of overwriting it. Runs under the row's lock.
pub(super) async fn fold_outside_write(
    db: &impl ConnectionTrait,
    current: document::Model,
    mut loaded: Loaded,
) -> Result<(document::Model, Loaded), StoreError> {
    if loaded.last_update_id == 0 {
        return Ok((current, loaded));
    }
    let old = loaded.text();
    if old == current.body {
        return Ok((current, loaded));
    }
    let current = if loaded.last_version >= i64::from(current.version) {
        super::document::next_version(db.get_database_backend())
            .filter(document::Column::Id.eq(current.id))
            .exec_with_returning(db)
            .await?
            .into_iter()
            .next()
            .ok_or(StoreError::NotFound("document"))?
    } else {
        current
    };
    let encoded = edit(&loaded.doc, &old, &current.body);
    insert_update(db, &current, current.version, &encoded, &mut loaded).await?;
    tracing::debug!(
        document = current.id,
        version = current.version,
        "folded a text written outside the CRDT into the document's history"
    );
    Ok((current, loaded))
}

/// A document with no stored update yet (made before documents were Yjs documents, or by a
/// SQL INSERT) gets its text as its first update, stored once under the row's lock, so every
/// process and client builds on the same history.
pub(super) async fn ensure_started(
    db: &impl ConnectionTrait,
    current: &document::Model,
    mut loaded: Loaded,
) -> Result<Loaded, StoreError> {
    if loaded.last_update_id > 0 || current.body.is_empty() {
        return Ok(loaded);
    }
    let encoded = {
        let text = loaded.doc.get_or_insert_text(TEXT);
        let mut t = loaded.doc.transact_mut();
        text.insert(&mut t, 0, &current.body);
        t.encode_update_v1()
    };
    insert_update(db, current, current.version, &encoded, &mut loaded).await?;
    Ok(loaded)
}

/// Starts document `document`'s Yjs history with its text (at creation).
pub async fn start(
    db: &impl ConnectionTrait,
    document: &document::Model,
) -> Result<(), StoreError> {
    if document.body.is_empty() {
        return Ok(());
    }
    let mut started = Loaded {
        doc: Doc::new(),
        since_snapshot: 0,
        last_update_id: 0,
        last_version: 0,
        last_update: None,
    };
    let encoded = {
        let text = started.doc.get_or_insert_text(TEXT);
        let mut t = started.doc.transact_mut();
        text.insert(&mut t, 0, &document.body);
        t.encode_update_v1()
    };
    insert_update(db, document, document.version, &encoded, &mut started).await
}

/// Turns a whole-text write into a Yjs edit of the stored document: the smallest
/// insertions and deletions (a character diff) that make `old` into `new`, stored as an
/// update of version `version`. Runs inside the writer's transaction, after its UPDATE.
pub async fn record_text_edit(
    db: &impl ConnectionTrait,
    document: &document::Model,
    new_text: &str,
) -> Result<(), StoreError> {
    let mut loaded = load(db, document.id).await?;
    if loaded.last_update_id == 0 {
        // Not started: its history begins with the new text.
        return start(db, document).await;
    }
    let old = loaded.text();
    if old == new_text {
        return Ok(());
    }
    let encoded = edit(&loaded.doc, &old, new_text);
    insert_update(db, document, document.version, &encoded, &mut loaded).await?;
    roll_snapshot(db, document, &mut loaded).await
}

/// `?` placeholders as the backend writes them.
pub(super) fn placeholders(backend: DatabaseBackend, sql: &str) -> String {
    match backend {
        DatabaseBackend::Postgres => {
            let mut out = String::with_capacity(sql.len() + 8);
            let mut n = 0;
            for c in sql.chars() {
                if c == '?' {
                    n += 1;
                    out.push('$');
                    out.push_str(&n.to_string());
                } else {
                    out.push(c);
                }
            }
            out
        }
        _ => sql.to_owned(),
    }
}

#[cfg(test)]
mod tests;
