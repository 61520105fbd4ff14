//! A document's text as a Yjs document (yrs): its root `Y.Text` named `body`.
//!
//! Stored as the updates that made it (`document_updates`, base64 of the v1 encoding, each
//! with the document version it produced), after an optional merged snapshot
//! (`document_snapshots`). Every write runs in one transaction that locks the document's row
//! (PostgreSQL; SQLite has one writer), rebuilds the Yjs document, applies the update, and
//! stores it with `documents.body` and `version`, so the text, the version and the update
//! stream always agree.

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
pub use edit::edit;

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
}

/// Decodes a base64 Yjs v1 update, checking that it decodes.
pub fn decode(update: &str) -> Result<Update, BadUpdate> {
    let bytes = STANDARD
        .decode(update.trim())
        .map_err(|_| BadUpdate::NotBase64)?;
    // Inside `catch_unwind`: a decoder panic on some input is a refusal, not a lost request.
    std::panic::catch_unwind(|| Update::decode_v1(&bytes))
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

/// A document rebuilt from storage.
pub struct Loaded {
    pub doc: Doc,
    /// Updates stored after the snapshot (a write past `SNAPSHOT_EVERY` rolls it forward).
    pub since_snapshot: i64,
    /// The id of the last update stored (0 before the first).
    pub last_update_id: i64,
}

impl Loaded {
    /// The text.
    pub fn text(&self) -> String {
        let text = self.doc.get_or_insert_text(TEXT);
        text.get_string(&self.doc.transact())
    }

    /// The state vector, base64.
    pub fn state_vector(&self) -> String {
        STANDARD.encode(self.doc.transact().state_vector().encode_v1())
    }

    /// What `vector` lacks (everything without one), as a base64 update.
    pub fn diff(&self, vector: Option<&StateVector>) -> String {
        let empty = StateVector::default();
        let update = self.doc.transact().encode_diff_v1(vector.unwrap_or(&empty));
        STANDARD.encode(update)
    }
}

/// Rebuilds document `id` from its snapshot and the updates after it.
pub async fn load(db: &impl ConnectionTrait, id: i64) -> Result<Loaded, StoreError> {
    let backend = db.get_database_backend();
    let doc = Doc::new();
    let mut through = 0i64;
    let snapshot = db
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            placeholders(
                backend,
                "SELECT through_update_id, state FROM document_snapshots WHERE document_id = ?",
            ),
            [Value::from(id)],
        ))
        .await?;
    if let Some(row) = snapshot {
        through = row.try_get("", "through_update_id")?;
        let state: String = row.try_get("", "state")?;
        apply_stored(&doc, &state)?;
    }
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            backend,
            placeholders(
                backend,
                "SELECT id, update_data FROM document_updates WHERE document_id = ? AND id > ? ORDER BY id",
            ),
            [Value::from(id), Value::from(through)],
        ))
        .await?;
    let mut last = through;
    for row in &rows {
        last = row.try_get("", "id")?;
        let update: String = row.try_get("", "update_data")?;
        apply_stored(&doc, &update)?;
    }
    Ok(Loaded {
        doc,
        since_snapshot: rows.len() as i64,
        last_update_id: last,
    })
}

/// Applies a stored update; one that does not decode is a corrupt row, an internal error.
fn apply_stored(doc: &Doc, update: &str) -> Result<(), StoreError> {
    let corrupt = || {
        StoreError::Db(sea_orm::DbErr::Custom(
            "a stored Yjs update does not decode".to_owned(),
        ))
    };
    let update = decode(update).map_err(|_| corrupt())?;
    doc.transact_mut()
        .apply_update(update)
        .map_err(|_| corrupt())
}

/// What applying an update did.
pub struct Applied {
    pub document: document::Model,
    /// The stored update's place in the change feed; `None` when the update added nothing
    /// (it changed nothing, and nothing was stored).
    pub position: Option<i64>,
}

/// Applies `update` to document `id` on behalf of `viewer` (a member of its channel): in one
/// transaction, rebuilds the document, applies the update, and when it adds something stores
/// it with the new text and version.
pub async fn apply<C: ConnectionTrait + TransactionTrait>(
    db: &C,
    viewer: i64,
    id: i64,
    update: Update,
) -> Result<Applied, StoreError> {
    let txn = begin(db).await?;
    let current = lock(&txn, id).await?;
    channel::require_member(&txn, current.channel_id, viewer).await?;
    let loaded = ensure_started(&txn, &current, load(&txn, id).await?).await?;
    let before_text = loaded.text();
    let Some(encoded) = integrate(&loaded.doc, update)? else {
        txn.commit().await?;
        return Ok(Applied {
            document: current,
            position: None,
        });
    };
    let text = loaded.text();
    if text.chars().count() > MAX_TEXT_CHARS {
        return Err(StoreError::BadUpdate(BadUpdate::TooLong));
    }
    let document = store_update(&txn, &current, &encoded, &text, text != before_text).await?;
    roll_snapshot(&txn, &current, &loaded).await?;
    // The row the capture trigger just wrote: the newest of this document's updates (the
    // row's lock keeps others out until this commits); by the channel's index.
    let backend = txn.get_database_backend();
    let position: i64 = txn
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            placeholders(
                backend,
                "SELECT position FROM change_log WHERE scope_key = ? AND table_name = 'document_updates' AND row_id = ? ORDER BY position DESC LIMIT 1",
            ),
            [Value::from(current.channel_id), Value::from(id)],
        ))
        .await?
        .ok_or(StoreError::NotFound("change"))?
        .try_get("", "position")?;
    txn.commit().await?;
    Ok(Applied {
        document,
        position: Some(position),
    })
}

/// Integrates `update` into `doc`: the update of what it added, `None` when it added
/// nothing. Refused (nothing kept, as the caller's transaction is not committed): an update
/// that does not integrate, depends on what `doc` lacks, writes a root other than `body`,
/// or puts anything but text into it. yrs runs inside `catch_unwind`, so a panic on some
/// input is a refusal, not a lost request.
fn integrate(doc: &Doc, update: Update) -> Result<Option<Vec<u8>>, StoreError> {
    let run = std::panic::AssertUnwindSafe(|| {
        let mut t = doc.transact_mut();
        t.apply_update(update).map_err(|_| BadUpdate::NotYjs)?;
        if t.store().pending_update().is_some() || t.store().pending_ds().is_some() {
            return Err(BadUpdate::MissingDependencies);
        }
        if t.before_state() == t.after_state() && t.delete_set().is_empty() {
            return Ok(None);
        }
        if t.root_refs().any(|(name, _)| name != TEXT) {
            return Err(BadUpdate::OtherTypes);
        }
        // Text counts its bytes (this document's offset kind), an embed or a nested type
        // counts one: any difference is something other than text.
        // (From the transaction: asking the document would wait for this transaction.)
        if let Some(text) = t.get_text(TEXT)
            && text.len(&t) as usize != text.get_string(&t).len()
        {
            return Err(BadUpdate::NotText);
        }
        Ok(Some(t.encode_update_v1()))
    });
    match std::panic::catch_unwind(run) {
        Ok(result) => result.map_err(StoreError::BadUpdate),
        Err(_) => {
            tracing::warn!("yrs panicked on an update; it was refused");
            Err(StoreError::BadUpdate(BadUpdate::NotYjs))
        }
    }
}

/// A write transaction that sees what committed before its row lock was granted
/// (READ COMMITTED on PostgreSQL, whatever the database's default): the history's checks
/// read after the lock.
async fn begin<C: ConnectionTrait + TransactionTrait>(
    db: &C,
) -> Result<C::Transaction, sea_orm::DbErr> {
    match db.get_database_backend() {
        DatabaseBackend::Postgres => {
            db.begin_with_config(Some(sea_orm::IsolationLevel::ReadCommitted), None)
                .await
        }
        _ => db.begin().await,
    }
}

/// Gives document `id` its Yjs history if it has none yet (see `ensure_started`).
pub async fn begin_history<C: ConnectionTrait + TransactionTrait>(
    db: &C,
    id: i64,
) -> Result<(), StoreError> {
    let txn = begin(db).await?;
    let current = lock(&txn, id).await?;
    ensure_started(&txn, &current, load(&txn, id).await?).await?;
    txn.commit().await?;
    Ok(())
}

/// Locks document `id`'s row for this transaction (PostgreSQL; SQLite writes one at a time).
async fn lock(db: &impl ConnectionTrait, id: i64) -> Result<document::Model, StoreError> {
    let backend = db.get_database_backend();
    let query = document::Entity::find_by_id(id);
    let found = match backend {
        DatabaseBackend::Postgres => {
            use sea_orm::QuerySelect;
            query.lock_exclusive().one(db).await?
        }
        _ => query.one(db).await?,
    };
    found.ok_or(StoreError::NotFound("document"))
}

/// A document with no stored update yet (made before documents were Yjs documents, or by a
/// SQL INSERT) gets its text as its first update, stored once under the row's lock, so every
/// process and client builds on the same history.
async fn ensure_started(
    db: &impl ConnectionTrait,
    current: &document::Model,
    loaded: Loaded,
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
    insert_update(db, current, current.version, &encoded).await?;
    load(db, current.id).await
}

/// Starts document `document`'s Yjs history with its text (at creation).
pub async fn start(
    db: &impl ConnectionTrait,
    document: &document::Model,
) -> Result<(), StoreError> {
    if document.body.is_empty() {
        return Ok(());
    }
    let doc = Doc::new();
    let encoded = {
        let text = doc.get_or_insert_text(TEXT);
        let mut t = doc.transact_mut();
        text.insert(&mut t, 0, &document.body);
        t.encode_update_v1()
    };
    insert_update(db, document, document.version, &encoded).await
}

/// Turns a whole-text write into a Yjs edit of the stored document: the smallest
/// insertions and deletions (a character diff) that make `old` into `new`, stored as an
/// update of version `version`. Runs inside the writer's transaction, after its UPDATE.
pub async fn record_text_edit(
    db: &impl ConnectionTrait,
    document: &document::Model,
    new_text: &str,
) -> Result<(), StoreError> {
    let loaded = load(db, document.id).await?;
    let loaded = if loaded.last_update_id == 0 {
        // Not started: its history begins with the new text.
        return start(db, document).await;
    } else {
        loaded
    };
    let old = loaded.text();
    if old == new_text {
        return Ok(());
    }
    let encoded = edit(&loaded.doc, &old, new_text);
    insert_update(db, document, document.version, &encoded).await?;
    roll_snapshot(db, document, &loaded).await
}

/// Stores an update (and the text and version it produced).
async fn store_update(
    db: &impl ConnectionTrait,
    current: &document::Model,
    encoded: &[u8],
    text: &str,
    text_changed: bool,
) -> Result<document::Model, StoreError> {
    let mut update = super::document::next_version(db.get_database_backend());
    if text_changed {
        update = update.col_expr(document::Column::Body, Expr::value(text.to_owned()));
    }
    let updated = update
        .filter(document::Column::Id.eq(current.id))
        .exec_with_returning(db)
        .await?
        .into_iter()
        .next()
        .ok_or(StoreError::NotFound("document"))?;
    insert_update(db, &updated, updated.version, encoded).await?;
    Ok(updated)
}

async fn insert_update(
    db: &impl ConnectionTrait,
    document: &document::Model,
    version: i32,
    encoded: &[u8],
) -> Result<(), StoreError> {
    let backend = db.get_database_backend();
    db.execute_raw(Statement::from_sql_and_values(
        backend,
        placeholders(
            backend,
            "INSERT INTO document_updates (document_id, channel_id, version, update_data) VALUES (?, ?, ?, ?)",
        ),
        [
            Value::from(document.id),
            Value::from(document.channel_id),
            Value::from(version),
            Value::from(STANDARD.encode(encoded)),
        ],
    ))
    .await?;
    Ok(())
}

/// Past `SNAPSHOT_EVERY` updates after the snapshot, stores the merged state through the
/// last update (the updates themselves stay, for replay, until retention prunes them).
async fn roll_snapshot(
    db: &impl ConnectionTrait,
    document: &document::Model,
    loaded: &Loaded,
) -> Result<(), StoreError> {
    if loaded.since_snapshot + 1 < SNAPSHOT_EVERY {
        return Ok(());
    }
    let reloaded = load(db, document.id).await?;
    let state = STANDARD.encode(
        reloaded
            .doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default()),
    );
    let backend = db.get_database_backend();
    db.execute_raw(Statement::from_sql_and_values(
        backend,
        placeholders(
            backend,
            "INSERT INTO document_snapshots (document_id, through_update_id, state) VALUES (?, ?, ?) \
             ON CONFLICT (document_id) DO UPDATE SET through_update_id = excluded.through_update_id, state = excluded.state",
        ),
        [
            Value::from(document.id),
            Value::from(reloaded.last_update_id),
            Value::from(state),
        ],
    ))
    .await?;
    Ok(())
}

/// `?` placeholders as the backend writes them.
fn placeholders(backend: DatabaseBackend, sql: &str) -> String {
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
