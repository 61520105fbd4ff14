//! Reading a document's history: `Loaded` (the Yjs document rebuilt from its snapshot and
//! the updates after it), `load`, `load_for_sync` (one snapshot, for a new subscriber) and
//! `Cache` (the documents this process wrote last, brought up to date by `catch_up`).

use super::*;

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
    pub(super) last_update: Option<String>,
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
pub struct Cache(pub(super) std::sync::Arc<std::sync::Mutex<lru::LruCache<i64, Loaded>>>);

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
    pub(super) fn take(&self, id: i64) -> Option<Loaded> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).pop(&id)
    }

    /// Keeps `loaded` for document `id`, unless a newer copy is already there.
    pub(super) fn put(&self, id: i64, loaded: Loaded) {
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
pub(super) async fn catch_up(
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
pub(super) fn apply_stored(doc: &Doc, update: &str) -> Result<(), StoreError> {
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
