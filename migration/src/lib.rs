//! Schema migrations for SQLite and PostgreSQL, written as SQL per backend.
//!
//! Migrations use string identifiers and never import `entities`, so an old migration keeps
//! meaning what it meant when it ran, whatever the entities become.

pub use sea_orm_migration::prelude::*;

mod m20261127_000001_create_tables;

pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(m20261127_000001_create_tables::Migration)]
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
