//! Creates `change_log` (every committed change to a live table, written only by triggers),
//! `change_log_state` (how far retention has pruned) and makes messages, documents, channels
//! and channel_members live.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

use crate::{LiveTable, make_live, run_script};

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261127_000002_create_change_log"
    }
}

// `log_change()` takes the transaction id before the INSERT takes a position, so that any
// transaction holding a position had its xid assigned first: the tailer's gap resolution
// (ARCHITECTURE.md) relies on it. NOTIFY is only a doorbell; its payload is empty.
const POSTGRES_UP: &str = r#"
CREATE TABLE change_log (
    position BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    xid xid8 NOT NULL,
    table_name TEXT NOT NULL,
    op TEXT NOT NULL CHECK (op IN ('INSERT', 'UPDATE', 'DELETE')),
    row_id BIGINT NOT NULL,
    scope_key BIGINT,
    row_data JSONB NOT NULL,
    changed_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
)
--;
CREATE INDEX change_log_scope_key_position_idx ON change_log (scope_key, position)
--;
CREATE INDEX change_log_changed_at_idx ON change_log (changed_at)
--;
CREATE TABLE change_log_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    pruned_through BIGINT NOT NULL
)
--;
INSERT INTO change_log_state (id, pruned_through) VALUES (1, 0)
--;
CREATE FUNCTION log_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    txid xid8 := pg_current_xact_id();
    old_image jsonb;
    new_image jsonb;
BEGIN
    IF TG_OP <> 'INSERT' THEN
        old_image := to_jsonb(OLD);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        new_image := to_jsonb(NEW);
    END IF;
    IF TG_OP = 'UPDATE' AND (
        (old_image ->> TG_ARGV[0]) IS DISTINCT FROM (new_image ->> TG_ARGV[0])
        OR (old_image ->> TG_ARGV[1]) IS DISTINCT FROM (new_image ->> TG_ARGV[1])
    ) THEN
        -- A row that changes its id or its topic leaves one and enters the other: its old
        -- topic must see it go (a membership moved away is a removal).
        INSERT INTO change_log (xid, table_name, op, row_id, scope_key, row_data)
        VALUES (txid, TG_TABLE_NAME, 'DELETE', (old_image ->> TG_ARGV[0])::bigint,
                (old_image ->> TG_ARGV[1])::bigint, old_image);
        INSERT INTO change_log (xid, table_name, op, row_id, scope_key, row_data)
        VALUES (txid, TG_TABLE_NAME, 'INSERT', (new_image ->> TG_ARGV[0])::bigint,
                (new_image ->> TG_ARGV[1])::bigint, new_image);
    ELSE
        INSERT INTO change_log (xid, table_name, op, row_id, scope_key, row_data)
        VALUES (
            txid,
            TG_TABLE_NAME,
            TG_OP,
            (COALESCE(new_image, old_image) ->> TG_ARGV[0])::bigint,
            (COALESCE(new_image, old_image) ->> TG_ARGV[1])::bigint,
            COALESCE(new_image, old_image)
        );
    END IF;
    PERFORM pg_notify('change_log', '');
    RETURN NULL;
END
$$
"#;

const SQLITE_UP: &str = r#"
CREATE TABLE change_log (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    table_name TEXT NOT NULL,
    op TEXT NOT NULL CHECK (op IN ('INSERT', 'UPDATE', 'DELETE')),
    row_id INTEGER NOT NULL,
    scope_key INTEGER,
    row_data TEXT NOT NULL,
    changed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
)
--;
CREATE INDEX change_log_scope_key_position_idx ON change_log (scope_key, position)
--;
CREATE INDEX change_log_changed_at_idx ON change_log (changed_at)
--;
CREATE TABLE change_log_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    pruned_through INTEGER NOT NULL
)
--;
INSERT INTO change_log_state (id, pruned_through) VALUES (1, 0)
"#;

/// The tables this migration makes live: table, row id column, scope (channel) column.
const LIVE: [LiveTable; 4] = [
    LiveTable {
        table: "messages",
        id_column: "id",
        scope_column: "channel_id",
    },
    LiveTable {
        table: "documents",
        id_column: "id",
        scope_column: "channel_id",
    },
    LiveTable {
        table: "channels",
        id_column: "id",
        scope_column: "id",
    },
    LiveTable {
        table: "channel_members",
        id_column: "user_id",
        scope_column: "channel_id",
    },
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        match manager.get_database_backend() {
            DatabaseBackend::Postgres => run_script(manager, POSTGRES_UP).await?,
            DatabaseBackend::Sqlite => run_script(manager, SQLITE_UP).await?,
            other => return Err(DbErr::Migration(format!("unsupported backend {other:?}"))),
        }
        for live in LIVE {
            make_live(manager, live).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for live in LIVE {
            crate::make_dead(manager, live.table).await?;
        }
        let db = manager.get_connection();
        db.execute_unprepared("DROP TABLE change_log_state").await?;
        db.execute_unprepared("DROP TABLE change_log").await?;
        if manager.get_database_backend() == DatabaseBackend::Postgres {
            db.execute_unprepared("DROP FUNCTION log_change()").await?;
        }
        Ok(())
    }
}
