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

/// A document rebuilt from storage.
pub struct Loaded {
    pub doc: Doc,
    /// Updates stored after the snapshot (a write past `SNAPSHOT_EVERY` rolls it forward).
    pub since_snapshot: i64,
    /// The id of the last update stored (0 before the first).
    pub last_update_id: i64,
    /// The document version the last update produced (0 before the first, or when
    /// retention has pruned it).
    pub last_version: i64,
    /// The last update as stored (base64), which tells a cached copy's last update apart
    /// from another stored under the same id after a rollback (see `Cache`).
    last_update: Option<String>,
}

impl Loaded {
    /// Whether the document whose stored text is `body` needs `begin_history`: it has no
    /// history yet while its text is not empty, or its text was written outside the CRDT.
    pub fn needs_history(&self, body: &str) -> bool {
        if self.last_update_id == 0 {
            !body.is_empty()
        } else {
            self.text() != body
        }
    }

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
        STANDARD.encode(self.diff_v1(vector.unwrap_or(&empty)))
    }

    /// What `vector` lacks, as a Yjs v1 update.
    pub fn diff_v1(&self, vector: &StateVector) -> Vec<u8> {
        self.doc.transact().encode_diff_v1(vector)
    }

    /// The state vector.
    pub fn vector(&self) -> StateVector {
        self.doc.transact().state_vector()
    }
}

/// Rebuilds document `id` from its snapshot and the updates after it.
pub async fn load(db: &impl ConnectionTrait, id: i64) -> Result<Loaded, StoreError> {
    let backend = db.get_database_backend();
    let doc = Doc::new();
    let mut through = 0i64;
    let mut last_version = 0i64;
    let mut last_update = None;
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
                "SELECT id, version, update_data FROM document_updates WHERE document_id = ? AND id > ? ORDER BY id",
            ),
            [Value::from(id), Value::from(through)],
        ))
        .await?;
    let mut last = through;
    for row in &rows {
        last = row.try_get("", "id")?;
        last_version = row.try_get::<i32>("", "version")?.into();
        let update: String = row.try_get("", "update_data")?;
        apply_stored(&doc, &update)?;
        last_update = Some(update);
    }
    if rows.is_empty() && through > 0 {
        // The snapshot's last update (retention keeps it, see `prune`).
        let row = db
            .query_one_raw(Statement::from_sql_and_values(
                backend,
                placeholders(backend, "SELECT version FROM document_updates WHERE id = ?"),
                [Value::from(through)],
            ))
            .await?;
        if let Some(row) = row {
            last_version = row.try_get::<i32>("", "version")?.into();
        }
    }
    Ok(Loaded {
        doc,
        since_snapshot: rows.len() as i64,
        last_update_id: last,
        last_version,
        last_update,
    })
}

/// The documents this process wrote last, as `Loaded`, so that a write reads only the
/// updates stored after its copy instead of the whole history (a document edited by many
/// peers at once is written hundreds of times a second, each time under its row's lock).
///
/// A write takes the copy out (`take`), brings it up to date under the row's lock
/// (`catch_up`: the updates after its last one; a copy whose last update is no longer
/// stored as it was, after a rollback or pruning, is dropped for a full load), and puts
/// the result back once committed (`put`). A write that fails puts nothing back, so a copy
/// never holds what was not stored.
#[derive(Clone)]
pub struct Cache(std::sync::Arc<std::sync::Mutex<lru::LruCache<i64, Loaded>>>);

impl Default for Cache {
    fn default() -> Self {
        let capacity =
            std::num::NonZeroUsize::new(CACHED_DOCUMENTS).unwrap_or(std::num::NonZeroUsize::MIN);
        Self(std::sync::Arc::new(std::sync::Mutex::new(
            lru::LruCache::new(capacity),
        )))
    }
}

/// How many documents `Cache` keeps (the least recently written go first).
const CACHED_DOCUMENTS: usize = 256;

impl Cache {
    fn take(&self, id: i64) -> Option<Loaded> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).pop(&id)
    }

    /// Keeps `loaded` for document `id`, unless a newer copy is already there.
    fn put(&self, id: i64, loaded: Loaded) {
        let mut cache = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if cache
            .peek(&id)
            .is_some_and(|kept| kept.last_update_id >= loaded.last_update_id)
        {
            return;
        }
        cache.put(id, loaded);
    }
}

/// Document `id` as stored: `cached` brought up to date when it still matches what is
/// stored, else a full load.
async fn catch_up(
    db: &impl ConnectionTrait,
    id: i64,
    cached: Option<Loaded>,
) -> Result<Loaded, StoreError> {
    let Some(mut cached) = cached.filter(|cached| cached.last_update.is_some()) else {
        return load(db, id).await;
    };
    let backend = db.get_database_backend();
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            backend,
            placeholders(
                backend,
                "SELECT id, version, update_data FROM document_updates WHERE document_id = ? AND id >= ? ORDER BY id",
            ),
            [Value::from(id), Value::from(cached.last_update_id)],
        ))
        .await?;
    let mut rows = rows.iter();
    let same = match rows.next() {
        Some(first) => {
            first.try_get::<i64>("", "id")? == cached.last_update_id
                && first.try_get::<String>("", "update_data")?.as_str()
                    == cached.last_update.as_deref().unwrap_or_default()
        }
        None => false,
    };
    if !same {
        return load(db, id).await;
    }
    for row in rows {
        let update: String = row.try_get("", "update_data")?;
        apply_stored(&cached.doc, &update)?;
        cached.last_update_id = row.try_get("", "id")?;
        cached.last_version = row.try_get::<i32>("", "version")?.into();
        cached.since_snapshot += 1;
        cached.last_update = Some(update);
    }
    Ok(cached)
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
#[derive(Debug)]
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
    cache: &Cache,
) -> Result<Applied, StoreError> {
    match apply_all(db, id, vec![(viewer, update)], cache).await {
        Ok(mut applied) => applied.pop().unwrap_or(Err(StoreError::NotFound("update"))),
        Err(BatchError::Refused(_, err) | BatchError::Failed(err)) => Err(err),
    }
}

/// Why `apply_all` stored nothing.
#[derive(Debug)]
pub enum BatchError {
    /// The update at this index was refused (it stays out; the others may be tried again).
    Refused(usize, StoreError),
    /// The write failed for all of them.
    Failed(StoreError),
}

impl From<sea_orm::DbErr> for BatchError {
    fn from(err: sea_orm::DbErr) -> Self {
        BatchError::Failed(err.into())
    }
}

impl From<StoreError> for BatchError {
    fn from(err: StoreError) -> Self {
        BatchError::Failed(err)
    }
}

/// Applies several updates of document `id`, each on behalf of its viewer, in one
/// transaction under one lock of the row, in order: each that adds something is stored as
/// its own update with its own version (so its subscribers get one event per update), and
/// the row's `body` is set once, to the text after the last. An update of a viewer who is not
/// a member is answered with that error and the others go on. An update the document cannot
/// take (see `integrate`, or a text past `MAX_TEXT_CHARS`) stores nothing of any of them:
/// `BatchError::Refused` names it, so that the caller answers it and tries the others again.
pub async fn apply_all<C: ConnectionTrait + TransactionTrait>(
    db: &C,
    id: i64,
    updates: Vec<(i64, Update)>,
    cache: &Cache,
) -> Result<Vec<Result<Applied, StoreError>>, BatchError> {
    let txn = begin(db).await?;
    let current = lock(&txn, id).await?;
    let mut members = std::collections::HashMap::new();
    for (viewer, _) in &updates {
        if !members.contains_key(viewer) {
            let member = channel::require_member(&txn, current.channel_id, *viewer).await;
            members.insert(*viewer, member);
        }
    }
    let loaded = catch_up(&txn, id, cache.take(id)).await?;
    let loaded = ensure_started(&txn, &current, loaded).await?;
    let (current, mut loaded) = fold_outside_write(&txn, current, loaded).await?;
    let before_text = loaded.text();
    let mut stats = TextStats::of(&before_text);
    // Per update: refused (not a member), added nothing, or the update to store.
    let mut outcomes = Vec::with_capacity(updates.len());
    for (index, (viewer, update)) in updates.into_iter().enumerate() {
        if let Some(Err(err)) = members.get(&viewer) {
            outcomes.push(Err(copy_of(err)));
            continue;
        }
        match integrate(&loaded.doc, update, stats) {
            Err(err) => return Err(BatchError::Refused(index, err)),
            Ok((None, _)) => outcomes.push(Ok(None)),
            Ok((Some(encoded), after)) => {
                stats = after;
                outcomes.push(Ok(Some(encoded)));
            }
        }
    }
    let stored = outcomes
        .iter()
        .filter(|outcome| matches!(outcome, Ok(Some(_))))
        .count();
    if stored == 0 {
        txn.commit().await?;
        cache.put(id, loaded);
        return Ok(outcomes
            .into_iter()
            .map(|outcome| {
                outcome.map(|_| Applied {
                    document: current.clone(),
                    position: None,
                })
            })
            .collect());
    }
    let text = loaded.text();
    let mut document = current.clone();
    let mut versions = Vec::with_capacity(stored);
    let mut left = stored;
    for outcome in &outcomes {
        let Ok(Some(encoded)) = outcome else { continue };
        left -= 1;
        // The row's version rises by one per update (its triggers allow no other step); its
        // text is set with the last.
        let body = (left == 0 && text != before_text).then_some(text.as_str());
        document = store_update(&txn, &document, encoded, body, &mut loaded).await?;
        versions.push(document.version);
    }
    roll_snapshot(&txn, &current, &mut loaded).await?;
    // The rows the capture trigger just wrote: the newest of this document's updates (the
    // row's lock keeps others out until this commits), newest first.
    let mut positions = update_positions(&txn, &current, stored).await?;
    positions.reverse();
    if positions.len() != stored {
        return Err(BatchError::Failed(StoreError::NotFound("change")));
    }
    txn.commit().await?;
    cache.put(id, loaded);
    let mut stored = versions.into_iter().zip(positions);
    Ok(outcomes
        .into_iter()
        .map(|outcome| {
            outcome.map(|encoded| match encoded {
                None => Applied {
                    document: document.clone(),
                    position: None,
                },
                Some(_) => {
                    let (version, position) = stored.next().unwrap_or((document.version, 0));
                    Applied {
                        document: document::Model {
                            version,
                            ..document.clone()
                        },
                        position: Some(position),
                    }
                }
            })
        })
        .collect())
}

/// The same refusal again, for another update of a batch (a database error becomes an
/// internal one: it is logged once, with the first).
pub fn copy_of(err: &StoreError) -> StoreError {
    match err {
        StoreError::NotFound(what) => StoreError::NotFound(what),
        StoreError::Forbidden(why) => StoreError::Forbidden(why),
        _ => StoreError::Db(sea_orm::DbErr::Custom(
            "a write of this document failed".to_owned(),
        )),
    }
}

/// What `integrate` checks of a text: its characters, and its NUL characters.
#[derive(Clone, Copy, Debug, Default)]
struct TextStats {
    chars: usize,
    nuls: usize,
}

impl TextStats {
    fn of(text: &str) -> Self {
        Self {
            chars: text.chars().count(),
            nuls: text.bytes().filter(|&byte| byte == 0).count(),
        }
    }
}

/// Integrates `update` into `doc`: the update of what it added, `None` when it added
/// nothing. Refused (nothing kept, as the caller's transaction is not committed): an update
/// that does not integrate, depends on what `doc` lacks, writes a root other than `body`,
/// or puts anything but text into it. yrs runs inside `catch_unwind`, so a panic on some
/// input is a refusal, not a lost request.
/// Also refused: an update that makes the text longer than `MAX_TEXT_CHARS` characters and
/// longer than it was (`before`: a text already past it, written by SQL, can still be cut),
/// or adds a NUL character (PostgreSQL cannot store one; one already there, written to
/// SQLite by SQL, does not stop other edits). Returns the text's measures after it.
fn integrate(
    doc: &Doc,
    update: Update,
    before: TextStats,
) -> Result<(Option<Vec<u8>>, TextStats), StoreError> {
    let run = std::panic::AssertUnwindSafe(|| {
        let mut t = doc.transact_mut();
        t.apply_update(update).map_err(|_| BadUpdate::NotYjs)?;
        if t.store().pending_update().is_some() || t.store().pending_ds().is_some() {
            return Err(BadUpdate::MissingDependencies);
        }
        if t.before_state() == t.after_state() && t.delete_set().is_empty() {
            return Ok((None, before));
        }
        if t.root_refs().any(|(name, _)| name != TEXT) {
            return Err(BadUpdate::OtherTypes);
        }
        // Text counts its bytes (this document's offset kind), an embed or a nested type
        // counts one: any difference is something other than text.
        // (From the transaction: asking the document would wait for this transaction.)
        let after = match t.get_text(TEXT) {
            Some(text) => {
                let string = text.get_string(&t);
                if text.len(&t) as usize != string.len() {
                    return Err(BadUpdate::NotText);
                }
                TextStats::of(&string)
            }
            None => TextStats::default(),
        };
        if after.nuls > before.nuls {
            return Err(BadUpdate::Nul);
        }
        if after.chars > MAX_TEXT_CHARS && after.chars > before.chars {
            return Err(BadUpdate::TooLong);
        }
        Ok((Some(t.encode_update_v1()), after))
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
async fn fold_outside_write(
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

/// What a new subscriber of document `id` starts from, read in one snapshot: its Yjs
/// document, the version of the last update in it, and that update's feed position (0 when
/// it has none, or retention pruned its change).
pub struct ForSync {
    pub loaded: Loaded,
    pub document: document::Model,
    pub position: i64,
}

/// Reads document `id` for a new subscriber (see `ForSync`), in one read-only snapshot.
pub async fn load_for_sync<C: ConnectionTrait + TransactionTrait>(
    db: &C,
    id: i64,
) -> Result<ForSync, StoreError> {
    let txn = match db.get_database_backend() {
        DatabaseBackend::Postgres => {
            db.begin_with_config(
                Some(sea_orm::IsolationLevel::RepeatableRead),
                Some(sea_orm::AccessMode::ReadOnly),
            )
            .await?
        }
        _ => db.begin().await?,
    };
    let document = document::Entity::find_by_id(id)
        .one(&txn)
        .await?
        .ok_or(StoreError::NotFound("document"))?;
    let loaded = load(&txn, id).await?;
    let position = last_update_position(&txn, &document).await?.unwrap_or(0);
    txn.commit().await?;
    Ok(ForSync {
        loaded,
        document,
        position,
    })
}

/// The feed position of document `document`'s newest update, by the channel's index.
async fn last_update_position(
    db: &impl ConnectionTrait,
    document: &document::Model,
) -> Result<Option<i64>, StoreError> {
    Ok(update_positions(db, document, 1).await?.pop())
}

/// The feed positions of document `document`'s `count` newest updates, newest first.
async fn update_positions(
    db: &impl ConnectionTrait,
    document: &document::Model,
    count: usize,
) -> Result<Vec<i64>, StoreError> {
    let backend = db.get_database_backend();
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            backend,
            placeholders(
                backend,
                "SELECT position FROM change_log WHERE scope_key = ? AND table_name = 'document_updates' AND row_id = ? ORDER BY position DESC LIMIT ?",
            ),
            [
                Value::from(document.channel_id),
                Value::from(document.id),
                Value::from(count as i64),
            ],
        ))
        .await?;
    Ok(rows
        .iter()
        .map(|row| row.try_get("", "position"))
        .collect::<Result<_, _>>()?)
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

/// Stores an update (and the version it produced, and `body` when given).
async fn store_update(
    db: &impl ConnectionTrait,
    current: &document::Model,
    encoded: &[u8],
    body: Option<&str>,
    loaded: &mut Loaded,
) -> Result<document::Model, StoreError> {
    let mut update = super::document::next_version(db.get_database_backend());
    if let Some(body) = body {
        update = update.col_expr(document::Column::Body, Expr::value(body.to_owned()));
    }
    let updated = update
        .filter(document::Column::Id.eq(current.id))
        .exec_with_returning(db)
        .await?
        .into_iter()
        .next()
        .ok_or(StoreError::NotFound("document"))?;
    insert_update(db, &updated, updated.version, encoded, loaded).await?;
    Ok(updated)
}

/// Stores an update of `document` (already applied to `loaded`'s document) as `version`,
/// and records it in `loaded`.
async fn insert_update(
    db: &impl ConnectionTrait,
    document: &document::Model,
    version: i32,
    encoded: &[u8],
    loaded: &mut Loaded,
) -> Result<(), StoreError> {
    let backend = db.get_database_backend();
    let stored = STANDARD.encode(encoded);
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            placeholders(
                backend,
                "INSERT INTO document_updates (document_id, channel_id, version, update_data) VALUES (?, ?, ?, ?) RETURNING id",
            ),
            [
                Value::from(document.id),
                Value::from(document.channel_id),
                Value::from(version),
                Value::from(stored.clone()),
            ],
        ))
        .await?
        .ok_or(StoreError::NotFound("document update"))?;
    loaded.last_update_id = row.try_get("", "id")?;
    loaded.last_version = version.into();
    loaded.last_update = Some(stored);
    loaded.since_snapshot += 1;
    Ok(())
}

/// Past `SNAPSHOT_EVERY` updates after the snapshot, stores the merged state through the
/// last update (`loaded` holds everything through it; the updates themselves stay until
/// retention prunes them).
async fn roll_snapshot(
    db: &impl ConnectionTrait,
    document: &document::Model,
    loaded: &mut Loaded,
) -> Result<(), StoreError> {
    if loaded.since_snapshot < SNAPSHOT_EVERY {
        return Ok(());
    }
    let began = std::time::Instant::now();
    let state = STANDARD.encode(
        loaded
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
            Value::from(loaded.last_update_id),
            Value::from(state),
        ],
    ))
    .await?;
    loaded.since_snapshot = 0;
    tracing::debug!(
        document = document.id,
        micros = began.elapsed().as_micros() as u64,
        "rolled a snapshot"
    );
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
