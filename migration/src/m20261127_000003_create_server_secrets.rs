//! Creates `server_secrets`: secrets the server generates for itself when none is
//! configured (the JWT signing secret), kept in the database so that tokens survive a
//! restart and every process on the same database accepts them.

use sea_orm_migration::prelude::*;

use crate::run_script;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261127_000003_create_server_secrets"
    }
}

const UP: &str = "CREATE TABLE server_secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL)";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run_script(manager, UP).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run_script(manager, "DROP TABLE server_secrets").await
    }
}
