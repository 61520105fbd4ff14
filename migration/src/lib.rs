//! Schema migrations for SQLite and PostgreSQL, written as SQL per backend.
//!
//! Migrations use string identifiers and never import `entities`, so an old migration keeps
//! meaning what it meant when it ran, whatever the entities become.

pub use sea_orm_migration::prelude::*;

mod m20261127_000001_create_tables;
mod m20261127_000002_create_change_log;
mod m20261127_000003_create_server_secrets;
mod m20261204_000001_notify_only_for_other_writers;
mod m20261205_000001_document_updates;

use sea_orm_migration::sea_orm::{DatabaseBackend, Statement};

pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261127_000001_create_tables::Migration),
            Box::new(m20261127_000002_create_change_log::Migration),
            Box::new(m20261127_000003_create_server_secrets::Migration),
            Box::new(m20261204_000001_notify_only_for_other_writers::Migration),
            Box::new(m20261205_000001_document_updates::Migration),
        ]
    }
}

/// Runs each statement of `sql` (separated by a line holding only `--;`) in order.
///
/// A separator of our own is used because trigger bodies contain `;`.
pub async fn run_script(manager: &SchemaManager<'_>, sql: &str) -> Result<(), DbErr> {
    let db = manager.get_connection();
    for statement in sql.split("\n--;\n") {
        let statement = statement.trim();
        if !statement.is_empty() {
            db.execute_unprepared(statement).await?;
        }
    }
    Ok(())
}

/// A table whose committed changes are captured into `change_log`.
#[derive(Clone, Copy, Debug)]
pub struct LiveTable {
    /// The table's name.
    pub table: &'static str,
    /// The column that identifies a row (`row_id` in the log).
    pub id_column: &'static str,
    /// The column that scopes a row to its topic, the channel (`scope_key` in the log).
    pub scope_column: &'static str,
}

/// Makes a table live: AFTER ROW triggers write each INSERT, UPDATE and DELETE into
/// `change_log` in the writer's own transaction, with the row image as JSON (the old image
/// on DELETE). Call it from a migration after creating the table; on SQLite call it again
/// after adding columns (the image lists the columns present when it runs).
///
/// On a table with a `version` column, SQLite logs only the UPDATE that moves `version` from
/// `v` to `v + 1`: the version-repair trigger's intermediate UPDATE is not a change of its own.
/// An UPDATE that changes the row's id or scope is logged as a DELETE of the old row (in the
/// old topic) and an INSERT of the new one, so the old topic sees the row leave.
pub async fn make_live(manager: &SchemaManager<'_>, live: LiveTable) -> Result<(), DbErr> {
    let db = manager.get_connection();
    let LiveTable {
        table,
        id_column,
        scope_column,
    } = live;
    match manager.get_database_backend() {
        DatabaseBackend::Postgres => {
            db.execute_unprepared(&format!(
                "CREATE TRIGGER {table}_log_change AFTER INSERT OR UPDATE OR DELETE ON {table} \
                 FOR EACH ROW EXECUTE FUNCTION log_change('{id_column}', '{scope_column}')"
            ))
            .await?;
        }
        DatabaseBackend::Sqlite => {
            make_dead(manager, table).await?;
            let rows = db
                .query_all_raw(Statement::from_string(
                    DatabaseBackend::Sqlite,
                    format!("SELECT name FROM pragma_table_info('{table}') ORDER BY cid"),
                ))
                .await?;
            let mut columns = Vec::new();
            for row in rows {
                columns.push(row.try_get::<String>("", "name")?);
            }
            if columns.is_empty() {
                return Err(DbErr::Migration(format!("make_live: no table {table}")));
            }
            let image = |row: &str| {
                let pairs: Vec<String> = columns
                    .iter()
                    .map(|c| format!("'{c}', {row}.\"{c}\""))
                    .collect();
                format!("json_object({})", pairs.join(", "))
            };
            let versioned = columns.iter().any(|c| c == "version");
            let same_place = format!(
                "NEW.\"{id_column}\" IS OLD.\"{id_column}\" AND NEW.\"{scope_column}\" IS OLD.\"{scope_column}\""
            );
            let update_when = if versioned {
                format!("WHEN NEW.version = OLD.version + 1 AND {same_place} ")
            } else {
                format!("WHEN {same_place} ")
            };
            let insert = |op: &str, row: &str| {
                format!(
                    "INSERT INTO change_log (table_name, op, row_id, scope_key, row_data) \
                     VALUES ('{table}', '{op}', {row}.\"{id_column}\", {row}.\"{scope_column}\", {});",
                    image(row)
                )
            };
            db.execute_unprepared(&format!(
                "CREATE TRIGGER {table}_log_insert AFTER INSERT ON {table} FOR EACH ROW \
                 BEGIN {} END",
                insert("INSERT", "NEW")
            ))
            .await?;
            db.execute_unprepared(&format!(
                "CREATE TRIGGER {table}_log_update AFTER UPDATE ON {table} FOR EACH ROW \
                 {update_when}BEGIN {} END",
                insert("UPDATE", "NEW")
            ))
            .await?;
            db.execute_unprepared(&format!(
                "CREATE TRIGGER {table}_log_delete AFTER DELETE ON {table} FOR EACH ROW \
                 BEGIN {} END",
                insert("DELETE", "OLD")
            ))
            .await?;
            // A row that changes its id or its topic leaves one and enters the other.
            db.execute_unprepared(&format!(
                "CREATE TRIGGER {table}_log_move AFTER UPDATE ON {table} FOR EACH ROW \
                 WHEN NOT ({same_place}) BEGIN {} {} END",
                insert("DELETE", "OLD"),
                insert("INSERT", "NEW")
            ))
            .await?;
        }
        other => return Err(DbErr::Migration(format!("unsupported backend {other:?}"))),
    }
    Ok(())
}

/// Stops capturing a table's changes (drops the triggers `make_live` created).
pub async fn make_dead(manager: &SchemaManager<'_>, table: &str) -> Result<(), DbErr> {
    let db = manager.get_connection();
    match manager.get_database_backend() {
        DatabaseBackend::Postgres => {
            db.execute_unprepared(&format!(
                "DROP TRIGGER IF EXISTS {table}_log_change ON {table}"
            ))
            .await?;
        }
        _ => {
            for op in ["insert", "update", "delete", "move"] {
                db.execute_unprepared(&format!("DROP TRIGGER IF EXISTS {table}_log_{op}"))
                    .await?;
            }
        }
    }
    Ok(())
}
