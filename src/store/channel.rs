//! Channels and their membership.

use std::collections::HashMap;

use entities::{channel, channel_member, document, user};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, JoinType, QueryFilter, QueryOrder,
    QuerySelect, RelationTrait, Set, TransactionSession, TransactionTrait,
};

use super::reads::{ReadKey, Reads, Table};
use super::{Page, PageRequest, StoreError, paginate};

/// Creates a channel and makes `creator` its first member, atomically.
pub async fn create<C>(db: &C, name: &str, creator: i64) -> Result<channel::Model, StoreError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let txn = db.begin().await?;
    let channel = channel::ActiveModel {
        name: Set(name.to_owned()),
        ..Default::default()
    }
    .insert(&txn)
    .await?;
    channel_member::ActiveModel {
        channel_id: Set(channel.id),
        user_id: Set(creator),
        ..Default::default()
    }
    .insert(&txn)
    .await
    .map_err(|err| {
        if StoreError::is_foreign_key_violation(&err) {
            StoreError::UnknownViewer
        } else {
            StoreError::Db(err)
        }
    })?;
    txn.commit().await?;
    Ok(channel)
}

/// True when `user_id` is a member of `channel_id`.
pub async fn is_member(
    db: &impl ConnectionTrait,
    channel_id: i64,
    user_id: i64,
) -> Result<bool, StoreError> {
    Ok(channel_member::Entity::find_by_id((channel_id, user_id))
        .one(db)
        .await?
        .is_some())
}

/// Succeeds when `user_id` is a member of `channel_id`; otherwise `NotFound` for a missing
/// channel and `Forbidden` for an existing one.
pub async fn require_member(
    db: &impl ConnectionTrait,
    channel_id: i64,
    user_id: i64,
) -> Result<(), StoreError> {
    if is_member(db, channel_id, user_id).await? {
        return Ok(());
    }
    match channel::Entity::find_by_id(channel_id).one(db).await? {
        Some(_) => Err(StoreError::Forbidden(
            "only members of the channel may do this",
        )),
        None => Err(StoreError::NotFound("channel")),
    }
}

/// Why a write into `channel_id` broke a foreign key: the channel was deleted while it ran
/// (`NotFound`), else `otherwise` (the other row it refers to, such as a user, was).
pub(crate) async fn vanished(
    db: &impl ConnectionTrait,
    channel_id: i64,
    otherwise: StoreError,
) -> StoreError {
    match channel::Entity::find_by_id(channel_id).one(db).await {
        Ok(None) => StoreError::NotFound("channel"),
        Ok(Some(_)) => otherwise,
        Err(err) => StoreError::Db(err),
    }
}

/// The channel, when it exists and `user_id` is a member; one query.
pub async fn find_for_member(
    db: &impl ConnectionTrait,
    channel_id: i64,
    user_id: i64,
    reads: &Reads,
) -> Result<Option<channel::Model>, StoreError> {
    reads.record_all([
        ReadKey::Row(Table::Channels, channel_id),
        ReadKey::Membership {
            channel: channel_id,
            user: user_id,
        },
    ]);
    Ok(channel::Entity::find_by_id(channel_id)
        .join(JoinType::InnerJoin, channel::Relation::ChannelMember.def())
        .filter(channel_member::Column::UserId.eq(user_id))
        .one(db)
        .await?)
}

/// A page of the channels `user_id` belongs to, ordered by id.
pub async fn page_for_member(
    db: &impl ConnectionTrait,
    user_id: i64,
    request: PageRequest,
    reads: &Reads,
) -> Result<Page<channel::Model>, StoreError> {
    let select = channel::Entity::find()
        .join(JoinType::InnerJoin, channel::Relation::ChannelMember.def())
        .filter(channel_member::Column::UserId.eq(user_id));
    let page = paginate(db, select, channel::Column::Id, request).await?;
    reads.record(ReadKey::MembershipsOf(user_id));
    reads.record_all(
        page.items
            .iter()
            .map(|c| ReadKey::Row(Table::Channels, c.id)),
    );
    Ok(page)
}

/// Adds `user_id` to `channel_id` on behalf of `caller`, who must be a member. Adding an
/// existing member changes nothing.
pub async fn add_member(
    db: &impl ConnectionTrait,
    caller: i64,
    channel_id: i64,
    user_id: i64,
) -> Result<channel::Model, StoreError> {
    require_member(db, channel_id, caller).await?;
    if super::user::find_by_id(db, user_id).await?.is_none() {
        return Err(StoreError::NotFound("user"));
    }
    let inserted = channel_member::ActiveModel {
        channel_id: Set(channel_id),
        user_id: Set(user_id),
        ..Default::default()
    }
    .insert(db)
    .await;
    match inserted {
        Ok(_) => {}
        Err(err) if StoreError::is_unique_violation(&err) => {}
        // The channel or the user was deleted after the checks above.
        Err(err) if StoreError::is_foreign_key_violation(&err) => {
            return Err(vanished(db, channel_id, StoreError::NotFound("user")).await);
        }
        Err(err) => return Err(err.into()),
    }
    channel::Entity::find_by_id(channel_id)
        .one(db)
        .await?
        .ok_or(StoreError::NotFound("channel"))
}

/// Removes `user_id` from `channel_id` on behalf of `caller`, who must be a member (members
/// may remove themselves or others). Returns the removed user.
pub async fn remove_member(
    db: &impl ConnectionTrait,
    caller: i64,
    channel_id: i64,
    user_id: i64,
) -> Result<user::Model, StoreError> {
    require_member(db, channel_id, caller).await?;
    let removed = channel_member::Entity::delete_by_id((channel_id, user_id))
        .exec(db)
        .await?;
    if removed.rows_affected == 0 {
        return Err(StoreError::NotFound("member"));
    }
    super::user::find_by_id(db, user_id)
        .await?
        .ok_or(StoreError::NotFound("user"))
}

/// The members of each channel, in one query, ordered by when they joined.
pub async fn members_of(
    db: &impl ConnectionTrait,
    channel_ids: &[i64],
    reads: &Reads,
) -> Result<HashMap<i64, Vec<user::Model>>, StoreError> {
    reads.record_all(
        channel_ids
            .iter()
            .map(|id| ReadKey::Scope(Table::ChannelMembers, *id)),
    );
    let rows = channel_member::Entity::find()
        .filter(channel_member::Column::ChannelId.is_in(channel_ids.iter().copied()))
        .order_by_asc(channel_member::Column::CreatedAt)
        .order_by_asc(channel_member::Column::UserId)
        .find_also_related(user::Entity)
        .all(db)
        .await?;
    let mut members: HashMap<i64, Vec<user::Model>> =
        channel_ids.iter().map(|id| (*id, Vec::new())).collect();
    for (member, user) in rows {
        if let Some(user) = user {
            members.entry(member.channel_id).or_default().push(user);
        }
    }
    Ok(members)
}

/// The documents of each channel, in one query, ordered by id.
pub async fn documents_of(
    db: &impl ConnectionTrait,
    channel_ids: &[i64],
    reads: &Reads,
) -> Result<HashMap<i64, Vec<document::Model>>, StoreError> {
    reads.record_all(
        channel_ids
            .iter()
            .map(|id| ReadKey::Scope(Table::Documents, *id)),
    );
    let rows = document::Entity::find()
        .filter(document::Column::ChannelId.is_in(channel_ids.iter().copied()))
        .order_by_asc(document::Column::Id)
        .all(db)
        .await?;
    let mut documents: HashMap<i64, Vec<document::Model>> =
        channel_ids.iter().map(|id| (*id, Vec::new())).collect();
    for row in rows {
        documents.entry(row.channel_id).or_default().push(row);
    }
    Ok(documents)
}
