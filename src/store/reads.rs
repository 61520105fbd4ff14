//! What a read touched, and what a change touches: the two halves of a live query's
//! invalidation. A read records `ReadKey`s while a live query executes (`Reads`); a
//! committed change names the keys it touches (`touched_by`). A change re-runs a live query
//! only when the two share a key, so both halves must describe the schema the same way, and
//! so both live here, beside the queries they describe.
//!
//! Only live tables (those `change_log` captures) have keys: `users` is not one, so a read of
//! a user records nothing, and a user's row changing (outside the API, which never changes
//! one) does not re-run anything.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use sea_orm::{
    AccessMode, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr,
    ExecResult, IsolationLevel, QueryResult, Statement, TransactionTrait,
};

/// A live table.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Table {
    Channels,
    ChannelMembers,
    Messages,
    Documents,
}

impl Table {
    /// The table `change_log.table_name` names, if it is one of ours.
    pub fn parse(name: &str) -> Option<Table> {
        match name {
            "channels" => Some(Table::Channels),
            "channel_members" => Some(Table::ChannelMembers),
            "messages" => Some(Table::Messages),
            "documents" => Some(Table::Documents),
            _ => None,
        }
    }
}

/// Something a read depended on.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ReadKey {
    /// One row by id (a channel, a message, a document), whether it existed or not: its
    /// insertion touches it too.
    Row(Table, i64),
    /// Every row of a table in one channel (`scope_key`): a channel's messages, documents or
    /// members.
    Scope(Table, i64),
    /// Whether `user` is a member of `channel`.
    Membership { channel: i64, user: i64 },
    /// Which channels `user` is a member of.
    MembershipsOf(i64),
    /// The whole table: the fallback for a read no narrower key describes.
    Table(Table),
}

/// The keys a committed change to a row of `table` touches: the row itself, its channel's
/// list of that table, the whole table, and for a membership its user's list of channels.
/// `row_id` and `scope` are `change_log`'s (for `channel_members`, the user and the channel).
pub fn touched_by(table: &str, row_id: i64, scope: Option<i64>) -> Vec<ReadKey> {
    let Some(table) = Table::parse(table) else {
        return Vec::new();
    };
    let mut keys = vec![ReadKey::Table(table)];
    match (table, scope) {
        (Table::ChannelMembers, Some(channel)) => {
            keys.push(ReadKey::Membership {
                channel,
                user: row_id,
            });
            keys.push(ReadKey::MembershipsOf(row_id));
            keys.push(ReadKey::Scope(table, channel));
        }
        (Table::ChannelMembers, None) => keys.push(ReadKey::MembershipsOf(row_id)),
        (_, scope) => {
            keys.push(ReadKey::Row(table, row_id));
            if let Some(scope) = scope {
                keys.push(ReadKey::Scope(table, scope));
            }
        }
    }
    keys
}

/// A live query's read set while it executes; a no-op for every other request (the
/// default). Cheap to clone: clones record into the same set.
#[derive(Clone, Default)]
pub struct Reads(Option<Arc<Mutex<HashSet<ReadKey>>>>);

impl Reads {
    /// A recorder that keeps what is recorded.
    pub fn recording() -> Self {
        Self(Some(Arc::default()))
    }

    /// Records that the read depended on `key`.
    pub fn record(&self, key: ReadKey) {
        if let Some(set) = &self.0 {
            set.lock().unwrap_or_else(|e| e.into_inner()).insert(key);
        }
    }

    /// Records every key of `keys`.
    pub fn record_all(&self, keys: impl IntoIterator<Item = ReadKey>) {
        if let Some(set) = &self.0 {
            set.lock().unwrap_or_else(|e| e.into_inner()).extend(keys);
        }
    }

    /// Whether this records (a live query's execution).
    pub fn is_recording(&self) -> bool {
        self.0.is_some()
    }

    /// What was recorded so far.
    pub fn keys(&self) -> HashSet<ReadKey> {
        match &self.0 {
            Some(set) => set.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            None => HashSet::new(),
        }
    }
}

/// Where a request reads: the pool (every request), or one read-only transaction whose
/// snapshot every read of a live query's execution shares, so the result is one state of
/// the database (a membership removed between two of its reads cannot let the second read
/// what the first would have refused).
#[derive(Clone)]
pub enum Reader {
    Pool(DatabaseConnection),
    Snapshot(Arc<DatabaseTransaction>),
}

impl Reader {
    /// A snapshot of the database, read-only (REPEATABLE READ on PostgreSQL; on SQLite a
    /// transaction, which sees one state from its first read on).
    pub async fn snapshot(db: &DatabaseConnection) -> Result<Reader, DbErr> {
        let transaction = match db.get_database_backend() {
            DbBackend::Postgres => {
                db.begin_with_config(
                    Some(IsolationLevel::RepeatableRead),
                    Some(AccessMode::ReadOnly),
                )
                .await?
            }
            _ => db.begin().await?,
        };
        Ok(Reader::Snapshot(Arc::new(transaction)))
    }

    /// Ends a snapshot (a read-only transaction has nothing to keep: it rolls back). Clones
    /// still held elsewhere end it when the last one drops.
    pub async fn finish(self) {
        if let Reader::Snapshot(transaction) = self
            && let Ok(transaction) = Arc::try_unwrap(transaction)
            && let Err(err) = transaction.rollback().await
        {
            tracing::warn!(error = %err, "a live query's read transaction did not end cleanly");
        }
    }
}

#[async_trait::async_trait]
impl ConnectionTrait for Reader {
    fn get_database_backend(&self) -> DbBackend {
        match self {
            Reader::Pool(db) => db.get_database_backend(),
            Reader::Snapshot(tx) => tx.get_database_backend(),
        }
    }

    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        match self {
            Reader::Pool(db) => db.execute_raw(stmt).await,
            Reader::Snapshot(tx) => tx.execute_raw(stmt).await,
        }
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        match self {
            Reader::Pool(db) => db.execute_unprepared(sql).await,
            Reader::Snapshot(tx) => tx.execute_unprepared(sql).await,
        }
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        match self {
            Reader::Pool(db) => db.query_one_raw(stmt).await,
            Reader::Snapshot(tx) => tx.query_one_raw(stmt).await,
        }
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        match self {
            Reader::Pool(db) => db.query_all_raw(stmt).await,
            Reader::Snapshot(tx) => tx.query_all_raw(stmt).await,
        }
    }

    fn support_returning(&self) -> bool {
        match self {
            Reader::Pool(db) => db.support_returning(),
            Reader::Snapshot(tx) => tx.support_returning(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_membership_touches_the_channel_and_the_users_list() {
        let keys = touched_by("channel_members", 7, Some(3));
        assert!(keys.contains(&ReadKey::Membership {
            channel: 3,
            user: 7
        }));
        assert!(keys.contains(&ReadKey::MembershipsOf(7)));
        assert!(keys.contains(&ReadKey::Scope(Table::ChannelMembers, 3)));
        assert!(!keys.contains(&ReadKey::MembershipsOf(3)));
    }

    #[test]
    fn a_message_touches_its_row_and_its_channel() {
        let keys = touched_by("messages", 12, Some(3));
        assert!(keys.contains(&ReadKey::Row(Table::Messages, 12)));
        assert!(keys.contains(&ReadKey::Scope(Table::Messages, 3)));
        assert!(keys.contains(&ReadKey::Table(Table::Messages)));
        assert!(!keys.contains(&ReadKey::Scope(Table::Documents, 3)));
        assert!(touched_by("users", 1, None).is_empty());
    }

    #[test]
    fn only_a_recorder_keeps_keys() {
        let off = Reads::default();
        off.record(ReadKey::Table(Table::Channels));
        assert!(off.keys().is_empty());
        let on = Reads::recording();
        on.clone().record(ReadKey::Row(Table::Channels, 1));
        assert_eq!(on.keys().len(), 1);
    }
}
