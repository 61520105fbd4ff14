//! Messages: posting, keyset pages per channel, and optimistic-concurrency edits and deletes.
//!
//! Edits and deletes are one conditional statement (`... WHERE id = ? AND version = ? AND
//! author_id = ? AND channel_id IN (viewer's channels)`), never read-then-write; only when it
//! touches no row does a second read explain why.

use entities::{channel_member, message};
use sea_orm::sea_query::{Expr, ExprTrait, Query, SelectStatement};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, FromQueryResult, QueryFilter};

use super::reads::{ReadKey, Reads, Table};
use super::{Page, PageRequest, StoreError, channel, paginate};

/// The ids of the channels `user_id` belongs to, as a subquery.
pub(crate) fn channels_of(user_id: i64) -> SelectStatement {
    Query::select()
        .column(channel_member::Column::ChannelId)
        .from(channel_member::Entity)
        .and_where(channel_member::Column::UserId.eq(user_id))
        .to_owned()
}

/// Posts a message as `author_id`, who must be a member of the channel.
///
/// One statement (`INSERT ... SELECT ... WHERE EXISTS (membership) RETURNING`): membership
/// is checked in the writing statement (on PostgreSQL against its snapshot, without a row
/// lock, so a removal committing at that instant may still let the post through, as a
/// separate check did). Only when it inserts nothing do further reads tell a missing channel
/// (NOT_FOUND) from one the author is not in (FORBIDDEN). Every
/// statement is a round trip to the database (on SQLite, to the connection's thread), and
/// this is the hottest write.
pub async fn create(
    db: &impl ConnectionTrait,
    channel_id: i64,
    author_id: i64,
    body: &str,
) -> Result<message::Model, StoreError> {
    let membership = Query::select()
        .expr(Expr::val(1))
        .from(channel_member::Entity)
        .and_where(channel_member::Column::ChannelId.eq(channel_id))
        .and_where(channel_member::Column::UserId.eq(author_id))
        .to_owned();
    let values = Query::select()
        .expr(Expr::val(channel_id))
        .expr(Expr::val(author_id))
        .expr(Expr::val(body))
        .and_where(Expr::exists(membership))
        .to_owned();
    let insert = Query::insert()
        .into_table(message::Entity)
        .columns([
            message::Column::ChannelId,
            message::Column::AuthorId,
            message::Column::Body,
        ])
        .select_from(values)
        .map_err(|err| sea_orm::DbErr::Custom(err.to_string()))?
        .returning_all()
        .to_owned();
    let statement = db.get_database_backend().build(&insert);
    match message::Model::find_by_statement(statement).one(db).await {
        Ok(Some(message)) => Ok(message),
        Ok(None) => Err(not_posted(db, channel_id, author_id).await),
        Err(err) => Err(post_failed(db, channel_id, err).await),
    }
}

/// Why a post to `channel_id` by `author_id` inserted nothing: the channel is missing, or
/// the author is not a member.
pub(crate) async fn not_posted(
    db: &impl ConnectionTrait,
    channel_id: i64,
    author_id: i64,
) -> StoreError {
    match channel::require_member(db, channel_id, author_id).await {
        // Joined since the insert read: a retry would succeed, but this one did not.
        Ok(()) => StoreError::Forbidden("only members of the channel may do this"),
        Err(err) => err,
    }
}

/// What a post's failed insert means for its client.
pub(crate) async fn post_failed(
    db: &impl ConnectionTrait,
    channel_id: i64,
    err: sea_orm::DbErr,
) -> StoreError {
    // PostgreSQL: the membership was read from the statement's snapshot, and the channel (or
    // the author) was deleted by a transaction that committed before the foreign-key check
    // could lock its row.
    if StoreError::is_foreign_key_violation(&err) {
        channel::vanished(db, channel_id, StoreError::UnknownViewer).await
    } else {
        err.into()
    }
}

/// A page of a channel's messages, oldest first.
pub async fn page(
    db: &impl ConnectionTrait,
    channel_id: i64,
    request: PageRequest,
    reads: &Reads,
) -> Result<Page<message::Model>, StoreError> {
    reads.record(ReadKey::Scope(Table::Messages, channel_id));
    let select = message::Entity::find().filter(message::Column::ChannelId.eq(channel_id));
    paginate(db, select, message::Column::Id, request).await
}

/// Replaces the body of the viewer's own message if its version is still `expected_version`.
pub async fn edit(
    db: &impl ConnectionTrait,
    viewer: i64,
    id: i64,
    body: &str,
    expected_version: i32,
) -> Result<message::Model, StoreError> {
    let updated = message::Entity::update_many()
        .col_expr(message::Column::Body, Expr::value(body.to_owned()))
        .col_expr(
            message::Column::Version,
            Expr::col(message::Column::Version).add(1),
        )
        .col_expr(
            message::Column::UpdatedAt,
            super::now(db.get_database_backend()),
        )
        .filter(message::Column::Id.eq(id))
        .filter(message::Column::Version.eq(expected_version))
        .filter(message::Column::AuthorId.eq(viewer))
        .filter(message::Column::ChannelId.in_subquery(channels_of(viewer)))
        .exec_with_returning(db)
        .await?;
    match updated.into_iter().next() {
        Some(message) => Ok(message),
        None => Err(explain_miss(db, viewer, id).await?),
    }
}

/// Deletes the viewer's own message (if `expected_version` is given, only at that version) and
/// returns its last state.
pub async fn delete(
    db: &impl ConnectionTrait,
    viewer: i64,
    id: i64,
    expected_version: Option<i32>,
) -> Result<message::Model, StoreError> {
    let mut delete = message::Entity::delete_many()
        .filter(message::Column::Id.eq(id))
        .filter(message::Column::AuthorId.eq(viewer))
        .filter(message::Column::ChannelId.in_subquery(channels_of(viewer)));
    if let Some(expected) = expected_version {
        delete = delete.filter(message::Column::Version.eq(expected));
    }
    let deleted = delete.exec_with_returning(db).await?;
    match deleted.into_iter().next() {
        Some(message) => Ok(message),
        None => Err(explain_miss(db, viewer, id).await?),
    }
}

/// Why a conditional write on message `id` touched nothing.
async fn explain_miss(
    db: &impl ConnectionTrait,
    viewer: i64,
    id: i64,
) -> Result<StoreError, StoreError> {
    let Some(current) = message::Entity::find_by_id(id).one(db).await? else {
        return Ok(StoreError::NotFound("message"));
    };
    if !channel::is_member(db, current.channel_id, viewer).await? {
        return Ok(StoreError::Forbidden(
            "only members of the channel may do this",
        ));
    }
    if current.author_id != viewer {
        return Ok(StoreError::Forbidden(
            "only the author may change a message",
        ));
    }
    // Everything else matched, so the version moved on (possibly a concurrent writer won
    // just now).
    Ok(StoreError::Conflict {
        current_version: current.version,
    })
}
