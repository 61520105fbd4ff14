//! Users: sign-up insert, lookups by id (batched) and by email.

use std::collections::HashMap;

use entities::user;
use sea_orm::{ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, Set};

use super::StoreError;

/// Inserts a user; a taken email gives `DuplicateEmail`.
pub async fn create(
    db: &impl ConnectionTrait,
    name: &str,
    email: &str,
    password_hash: &str,
) -> Result<user::Model, StoreError> {
    let model = user::ActiveModel {
        name: Set(name.to_owned()),
        email: Set(email.to_owned()),
        password_hash: Set(password_hash.to_owned()),
        ..Default::default()
    };
    model.insert(db).await.map_err(|err| {
        if StoreError::is_unique_violation(&err) {
            StoreError::DuplicateEmail
        } else {
            StoreError::Db(err)
        }
    })
}

/// The user with `email`, if any.
pub async fn find_by_email(
    db: &impl ConnectionTrait,
    email: &str,
) -> Result<Option<user::Model>, StoreError> {
    Ok(user::Entity::find()
        .filter(user::Column::Email.eq(email))
        .one(db)
        .await?)
}

/// The user with `id`, if any.
pub async fn find_by_id(
    db: &impl ConnectionTrait,
    id: i64,
) -> Result<Option<user::Model>, StoreError> {
    Ok(user::Entity::find_by_id(id).one(db).await?)
}

/// The users with the given ids, in one query.
pub async fn find_many(
    db: &impl ConnectionTrait,
    ids: &[i64],
) -> Result<HashMap<i64, user::Model>, StoreError> {
    let users = user::Entity::find()
        .filter(user::Column::Id.is_in(ids.iter().copied()))
        .all(db)
        .await?;
    Ok(users.into_iter().map(|u| (u.id, u)).collect())
}
