//! Reads of `change_log`: rows in position order, decoded into `ChangeEvent`s.

use sea_orm::{ConnectionTrait, DatabaseBackend, QueryResult, Statement, Value};

use super::ChangeError;
use crate::pubsub::{ChangeEvent, Memo, Op};

const COLUMNS: &str =
    "position, table_name, op, row_id, scope_key, CAST(row_data AS TEXT) AS row_data";

fn placeholders(backend: DatabaseBackend, n: usize) -> Vec<String> {
    (1..=n)
        .map(|i| match backend {
            DatabaseBackend::Postgres => format!("${i}"),
            _ => "?".to_owned(),
        })
        .collect()
}

/// Rows with `after < position <= through` (no upper bound when `through` is None), in
/// position order, at most `limit`.
pub(crate) async fn read_range(
    db: &impl ConnectionTrait,
    after: i64,
    through: Option<i64>,
    limit: u64,
) -> Result<Vec<ChangeEvent>, ChangeError> {
    let backend = db.get_database_backend();
    let p = placeholders(backend, 3);
    let (sql, values): (String, Vec<Value>) = match through {
        Some(through) => (
            format!(
                "SELECT {COLUMNS} FROM change_log WHERE position > {} AND position <= {} \
                 ORDER BY position LIMIT {}",
                p[0], p[1], p[2]
            ),
            vec![after.into(), through.into(), (limit as i64).into()],
        ),
        None => (
            format!(
                "SELECT {COLUMNS} FROM change_log WHERE position > {} ORDER BY position LIMIT {}",
                p[0], p[1]
            ),
            vec![after.into(), (limit as i64).into()],
        ),
    };
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(backend, sql, values))
        .await?;
    rows.iter().map(decode).collect()
}

/// One topic's rows with `after < position <= through`, in order, at most `limit`: what a
/// subscription replays.
pub async fn read_scope(
    db: &impl ConnectionTrait,
    scope: i64,
    after: i64,
    through: i64,
    limit: u64,
) -> Result<Vec<ChangeEvent>, ChangeError> {
    let backend = db.get_database_backend();
    let p = placeholders(backend, 4);
    let sql = format!(
        "SELECT {COLUMNS} FROM change_log WHERE scope_key = {} AND position > {} \
         AND position <= {} ORDER BY position LIMIT {}",
        p[0], p[1], p[2], p[3]
    );
    let values: Vec<Value> = vec![
        scope.into(),
        after.into(),
        through.into(),
        (limit as i64).into(),
    ];
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(backend, sql, values))
        .await?;
    rows.iter().map(decode).collect()
}

/// The position through which retention has pruned: a cursor below it cannot be resumed.
pub async fn pruned_through(db: &impl ConnectionTrait) -> Result<i64, ChangeError> {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT pruned_through FROM change_log_state WHERE id = 1",
        ))
        .await?;
    Ok(match row {
        Some(row) => row.try_get::<i64>("", "pruned_through")?,
        None => 0,
    })
}

/// The highest position in the log (0 when empty).
pub(crate) async fn max_position(db: &impl ConnectionTrait) -> Result<i64, ChangeError> {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT COALESCE(MAX(position), 0) AS position FROM change_log",
        ))
        .await?;
    Ok(match row {
        Some(row) => row.try_get::<i64>("", "position")?,
        None => 0,
    })
}

fn decode(row: &QueryResult) -> Result<ChangeEvent, ChangeError> {
    let position: i64 = row.try_get("", "position")?;
    let op: String = row.try_get("", "op")?;
    let op = Op::parse(&op).ok_or_else(|| ChangeError::Decode {
        position,
        reason: format!("unknown op {op:?}"),
    })?;
    let data: String = row.try_get("", "row_data")?;
    let image = serde_json::from_str(&data).map_err(|e| ChangeError::Decode {
        position,
        reason: e.to_string(),
    })?;
    Ok(ChangeEvent {
        position,
        table: row.try_get("", "table_name")?,
        op,
        row_id: row.try_get("", "row_id")?,
        scope: row.try_get("", "scope_key")?,
        row: image,
        memo: Memo::default(),
    })
}

/// How far the feed is behind the log: positions past `published`, and the age in seconds
/// of the oldest of them (0 when none waits).
pub async fn lag(db: &impl ConnectionTrait, published: i64) -> Result<(i64, f64), ChangeError> {
    let head = max_position(db).await?;
    let backend = db.get_database_backend();
    let sql = match backend {
        DatabaseBackend::Postgres => {
            "SELECT EXTRACT(EPOCH FROM clock_timestamp() - changed_at)::float8 AS behind \
             FROM change_log WHERE position > $1 ORDER BY position LIMIT 1"
        }
        _ => {
            "SELECT (julianday('now') - julianday(changed_at)) * 86400.0 AS behind \
             FROM change_log WHERE position > ? ORDER BY position LIMIT 1"
        }
    };
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            sql,
            [published.into()],
        ))
        .await?;
    let behind = match row {
        Some(row) => row.try_get::<f64>("", "behind")?.max(0.0),
        None => 0.0,
    };
    Ok(((head - published).max(0), behind))
}
