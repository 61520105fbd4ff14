//! Writing Yjs updates: `apply_all` (several updates of one document in one transaction,
//! each its own row and version), `integrate` (what an update may do), and the rows it
//! stores: the update, the document's version and text, the snapshot past `SNAPSHOT_EVERY`.

use super::*;

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
pub(super) struct TextStats {
    pub(super) chars: usize,
    pub(super) nuls: usize,
}

impl TextStats {
    pub(super) fn of(text: &str) -> Self {
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
pub(super) fn integrate(
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
pub(super) async fn begin<C: ConnectionTrait + TransactionTrait>(
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

/// The feed position of document `document`'s newest update, by the channel's index.
pub(super) async fn last_update_position(
    db: &impl ConnectionTrait,
    document: &document::Model,
) -> Result<Option<i64>, StoreError> {
    Ok(update_positions(db, document, 1).await?.pop())
}

/// The feed positions of document `document`'s `count` newest updates, newest first.
pub(super) async fn update_positions(
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
pub(super) async fn lock(
    db: &impl ConnectionTrait,
    id: i64,
) -> Result<document::Model, StoreError> {
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

/// Stores an update (and the version it produced, and `body` when given).
pub(super) async fn store_update(
    db: &impl ConnectionTrait,
    current: &document::Model,
    encoded: &[u8],
    body: Option<&str>,
    loaded: &mut Loaded,
) -> Result<document::Model, StoreError> {
    let mut update = crate::store::document::next_version(db.get_database_backend());
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
pub(super) async fn insert_update(
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
pub(super) async fn roll_snapshot(
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
