//! Shared documents: creation, lookup for members, and optimistic-concurrency updates in one
//! conditional statement.

use entities::document;
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, Set,
    TransactionSession, TransactionTrait,
};

use super::message::channels_of;
use super::reads::{ReadKey, Reads, Table};
use super::{StoreError, channel};

/// Creates a document in a channel `viewer` belongs to, with its text as the first update
/// of its Yjs history, in one transaction.
pub async fn create<C: ConnectionTrait + TransactionTrait>(
    db: &C,
    viewer: i64,
    channel_id: i64,
    title: &str,
    body: &str,
) -> Result<document::Model, StoreError> {
    channel::require_member(db, channel_id, viewer).await?;
    let txn = db.begin().await?;
    let inserted = document::ActiveModel {
        channel_id: Set(channel_id),
        title: Set(title.to_owned()),
        body: Set(body.to_owned()),
        ..Default::default()
    }
    .insert(&txn)
    .await;
    match inserted {
        Ok(document) => {
            super::yjs::start(&txn, &document).await?;
            txn.commit().await?;
            Ok(document)
        }
        // The channel was deleted after the membership check.
        Err(err) if StoreError::is_foreign_key_violation(&err) => {
            // Ended before asking why, so no second connection is held meanwhile.
            drop(txn);
            Err(channel::vanished(db, channel_id, StoreError::Db(err)).await)
        }
        Err(err) => Err(err.into()),
    }
}

/// The document with `id`, if any (callers check access).
pub async fn find(
    db: &impl ConnectionTrait,
    id: i64,
) -> Result<Option<document::Model>, StoreError> {
    Ok(document::Entity::find_by_id(id).one(db).await?)
}

/// The document, when it exists and `viewer` is a member of its channel; one query.
pub async fn find_for_member(
    db: &impl ConnectionTrait,
    viewer: i64,
    id: i64,
    reads: &Reads,
) -> Result<Option<document::Model>, StoreError> {
    reads.record_all([
        ReadKey::Row(Table::Documents, id),
        ReadKey::MembershipsOf(viewer),
    ]);
    Ok(document::Entity::find_by_id(id)
        .filter(document::Column::ChannelId.in_subquery(channels_of(viewer)))
        .one(db)
        .await?)
}

/// Sets the given fields if the document is still at `expected_version`; a new body is
/// also recorded as a Yjs edit of the document's text (the smallest one), in the same
/// transaction, so collaborative editors converge on it.
pub async fn update<C: ConnectionTrait + TransactionTrait>(
    db: &C,
    viewer: i64,
    id: i64,
    title: Option<&str>,
    body: Option<&str>,
    expected_version: i32,
) -> Result<document::Model, StoreError> {
    let txn = db.begin().await?;
    let updated = update_fields(&txn, viewer, id, title, body, expected_version).await?;
    if let Some(body) = body {
        super::yjs::record_text_edit(&txn, &updated, body).await?;
    }
    txn.commit().await?;
    Ok(updated)
}

async fn update_fields(
    db: &impl ConnectionTrait,
    viewer: i64,
    id: i64,
    title: Option<&str>,
    body: Option<&str>,
    expected_version: i32,
) -> Result<document::Model, StoreError> {
    let mut update = next_version(db.get_database_backend());
    if let Some(title) = title {
        update = update.col_expr(document::Column::Title, Expr::value(title.to_owned()));
    }
    if let Some(body) = body {
        update = update.col_expr(document::Column::Body, Expr::value(body.to_owned()));
    }
    let updated = update
        .filter(document::Column::Id.eq(id))
        .filter(document::Column::Version.eq(expected_version))
        .filter(document::Column::ChannelId.in_subquery(channels_of(viewer)))
        .exec_with_returning(db)
        .await?;
    if let Some(document) = updated.into_iter().next() {
        return Ok(document);
    }
    let Some(current) = document::Entity::find_by_id(id).one(db).await? else {
        return Err(StoreError::NotFound("document"));
    };
    if !channel::is_member(db, current.channel_id, viewer).await? {
        return Err(StoreError::Forbidden(
            "only members of the channel may do this",
        ));
    }
    Err(StoreError::Conflict {
        current_version: current.version,
    })
}

/// An UPDATE of documents that raises `version` by one and stamps `updated_at` (the server
/// raises it itself, so RETURNING shows the new version; see the version triggers).
pub(super) fn next_version(
    backend: sea_orm::DatabaseBackend,
) -> sea_orm::UpdateMany<document::Entity> {
    document::Entity::update_many()
        .col_expr(
            document::Column::Version,
            Expr::col(document::Column::Version).add(1),
        )
        .col_expr(document::Column::UpdatedAt, super::now(backend))
}
