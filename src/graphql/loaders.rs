//! Batched loading of relations (message author, channel members, channel documents): every
//! key requested while one request resolves a level of the tree is fetched in one query.

use std::collections::HashMap;

use super::context::Reading;
use super::error::AppError;
use crate::store;
use async_graphql::dataloader::{DataLoader, HashMapCache, Loader};
use entities::{document, user};

/// Loads relations through `store` in batches; one per request (its cache lives as long).
pub struct StoreLoader {
    reading: Reading,
}

/// The per-request loader handed to resolvers. Its cache lives as long as the request, so a
/// list resolver can load a whole page's relations with one `load_many` (one batch, however
/// the scheduler interleaves the fields) and each item's `load_one` then hits the cache.
pub type Loaders = DataLoader<StoreLoader, HashMapCache>;

/// A fresh loader (and so a fresh cache) for one request, reading where it reads.
pub(crate) fn loaders(reading: Reading) -> Loaders {
    DataLoader::with_cache(
        StoreLoader { reading },
        tokio::spawn,
        HashMapCache::default(),
    )
}

/// Key: a user by id.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct UserId(pub i64);

/// Key: the members of a channel.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct MembersOf(pub i64);

/// Key: the documents of a channel.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct DocumentsOf(pub i64);

impl Loader<UserId> for StoreLoader {
    type Value = user::Model;
    type Error = AppError;

    async fn load(&self, keys: &[UserId]) -> Result<HashMap<UserId, user::Model>, AppError> {
        let ids: Vec<i64> = keys.iter().map(|k| k.0).collect();
        let users = store::user::find_many(&self.reading.reader, &ids).await?;
        Ok(users.into_iter().map(|(id, u)| (UserId(id), u)).collect())
    }
}

impl Loader<MembersOf> for StoreLoader {
    type Value = Vec<user::Model>;
    type Error = AppError;

    async fn load(
        &self,
        keys: &[MembersOf],
    ) -> Result<HashMap<MembersOf, Vec<user::Model>>, AppError> {
        let ids: Vec<i64> = keys.iter().map(|k| k.0).collect();
        let members =
            store::channel::members_of(&self.reading.reader, &ids, &self.reading.reads).await?;
        Ok(members
            .into_iter()
            .map(|(id, m)| (MembersOf(id), m))
            .collect())
    }
}

impl Loader<DocumentsOf> for StoreLoader {
    type Value = Vec<document::Model>;
    type Error = AppError;

    async fn load(
        &self,
        keys: &[DocumentsOf],
    ) -> Result<HashMap<DocumentsOf, Vec<document::Model>>, AppError> {
        let ids: Vec<i64> = keys.iter().map(|k| k.0).collect();
        let documents =
            store::channel::documents_of(&self.reading.reader, &ids, &self.reading.reads).await?;
        Ok(documents
            .into_iter()
            .map(|(id, d)| (DocumentsOf(id), d))
            .collect())
    }
}
