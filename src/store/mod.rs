//! Reads and writes through SeaORM, one module per aggregate. Everything here returns
//! `StoreError`; turning it into a GraphQL error is `graphql::error`'s job alone.

pub mod channel;
pub mod document;
pub mod message;
mod posts;
pub mod reads;
pub mod user;
pub mod writer;
pub mod writes;
pub mod yjs;

pub use reads::{ReadKey, Reader, Reads};
pub use writes::{GroupWriter, Writes};

use sea_orm::sea_query::{Expr, SimpleExpr};
use sea_orm::{DatabaseBackend, DbErr, SqlErr};

/// What a store operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed; the cause is logged, never shown to clients.
    #[error("database error")]
    Db(#[from] DbErr),
    /// A user with this email already exists.
    #[error("email is already registered")]
    DuplicateEmail,
    /// The row does not exist (or is not visible to the viewer).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The viewer may not do this.
    #[error("{0}")]
    Forbidden(&'static str),
    /// `expectedVersion` was stale; nothing was written.
    #[error("version conflict: current version is {current_version}")]
    Conflict { current_version: i32 },
    /// A Yjs update that cannot be taken (nothing was stored).
    #[error("{0}")]
    BadUpdate(#[from] yjs::BadUpdate),
    /// The acting user (from a still-valid token) no longer exists.
    #[error("the signed-in user no longer exists")]
    UnknownViewer,
}

impl StoreError {
    /// True when `err` is a unique-constraint violation.
    pub(crate) fn is_unique_violation(err: &DbErr) -> bool {
        matches!(err.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
    }

    /// True when `err` is a foreign-key violation.
    pub(crate) fn is_foreign_key_violation(err: &DbErr) -> bool {
        matches!(
            err.sql_err(),
            Some(SqlErr::ForeignKeyConstraintViolation(_))
        )
    }
}

/// The database's current time, in the column format of each backend: SQLite stores the
/// same text as its column defaults (`2026-01-02T03:04:05.678Z`), so every timestamp in a
/// table has one format whoever wrote it.
pub(crate) fn now(backend: DatabaseBackend) -> SimpleExpr {
    match backend {
        DatabaseBackend::Sqlite => Expr::cust("strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"),
        _ => Expr::cust("now()"),
    }
}

/// One page of a keyset-paginated list ordered by id.
#[derive(Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub has_next_page: bool,
    pub has_previous_page: bool,
}

/// Which slice of an id-ordered list to read: ids strictly between `after` and `before`,
/// the first `limit` of them, or the last `limit` when `from_end`.
#[derive(Clone, Copy, Debug, Default)]
pub struct PageRequest {
    pub limit: u64,
    pub after: Option<i64>,
    pub before: Option<i64>,
    pub from_end: bool,
}

use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Select,
};

/// Reads one page of `select` by keyset on `id`, plus (only when a bound is given) one
/// cheap query to tell whether rows exist beyond that bound.
pub(crate) async fn paginate<E>(
    db: &impl ConnectionTrait,
    select: Select<E>,
    id: E::Column,
    request: PageRequest,
) -> Result<Page<E::Model>, StoreError>
where
    E: EntityTrait,
    E::Column: ColumnTrait,
{
    let mut window = select.clone();
    if let Some(after) = request.after {
        window = window.filter(id.gt(after));
    }
    if let Some(before) = request.before {
        window = window.filter(id.lt(before));
    }
    let window = if request.from_end {
        window.order_by_desc(id)
    } else {
        window.order_by_asc(id)
    };
    let mut items = window.limit(request.limit + 1).all(db).await?;
    let more = items.len() as u64 > request.limit;
    items.truncate(request.limit as usize);
    if request.from_end {
        items.reverse();
    }
    // Rows on the far side of the bound the client paginated from.
    let beyond = match (request.from_end, request.after, request.before) {
        (false, Some(after), _) => Some(select.filter(id.lte(after))),
        (true, _, Some(before)) => Some(select.filter(id.gte(before))),
        _ => None,
    };
    let beyond = match beyond {
        Some(query) => query.limit(1).one(db).await?.is_some(),
        None => false,
    };
    Ok(if request.from_end {
        Page {
            items,
            has_previous_page: more,
            has_next_page: beyond,
        }
    } else {
        Page {
            items,
            has_next_page: more,
            has_previous_page: beyond,
        }
    })
}
