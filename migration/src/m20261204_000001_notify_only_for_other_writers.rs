//! PostgreSQL: `log_change()` NOTIFYs only for writers other than syncgraph.
//!
//! A NOTIFY makes its transaction take a lock at commit that every notifying transaction in
//! the cluster queues on: pgbench ran the `postMessage` statement at 4,349 tps with it and
//! 8,433 without, 8 clients (issue 15's figures; the server's own end-to-end rate did not
//! move, see BENCHMARKS.md). syncgraph's own
//! connections set `syncgraph.writer = 'on'` when they open (`db::connect`); for them the
//! trigger no longer notifies, and the writing process announces its commits itself, after
//! they commit, at most one NOTIFY every few milliseconds (`changes::Announcer`). Every other
//! writer (psql, another application) still NOTIFYs from the trigger, so it wakes every
//! process at once as before. ARCHITECTURE.md, "The doorbell", argues why no change waits for
//! the poll.
//!
//! The function is edited in place (its one NOTIFY statement is replaced), so the capture
//! itself, written once in `m20261127_000002_create_change_log`, stays in one place.

use sea_orm_migration::prelude::*;

use sea_orm_migration::sea_orm::DatabaseBackend;

use crate::run_script;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261204_000001_notify_only_for_other_writers"
    }
}

/// Replaces `from` with `to` in `log_change()`'s definition, failing when `from` is not
/// there. Up also fails when its result is there already: `ALWAYS` is part of
/// `OTHER_WRITERS`, so finding `from` alone would not tell that up has run.
fn edit(from: &str, to: &str) -> String {
    let already = if to == OTHER_WRITERS {
        format!(
            "IF position($to${to}$to$ in definition) > 0 THEN
        RAISE EXCEPTION 'log_change() has been edited so already';
    END IF;"
        )
    } else {
        String::new()
    };
    format!(
        r#"DO $migration$
DECLARE
    definition text := pg_get_functiondef('log_change()'::regprocedure);
    edited text;
BEGIN
    {already}
    edited := replace(definition, $from${from}$from$, $to${to}$to$);
    IF edited = definition THEN
        RAISE EXCEPTION 'log_change() does not hold the statement this migration edits';
    END IF;
    EXECUTE edited;
END
$migration$"#
    )
}

const ALWAYS: &str = "PERFORM pg_notify('change_log', '');";

const OTHER_WRITERS: &str =
    "IF current_setting('syncgraph.writer', true) IS DISTINCT FROM 'on' THEN
        PERFORM pg_notify('change_log', '');
    END IF;";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        match manager.get_database_backend() {
            DatabaseBackend::Postgres => run_script(manager, &edit(ALWAYS, OTHER_WRITERS)).await,
            // SQLite has no NOTIFY: other processes poll.
            _ => Ok(()),
        }
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        match manager.get_database_backend() {
            DatabaseBackend::Postgres => run_script(manager, &edit(OTHER_WRITERS, ALWAYS)).await,
            _ => Ok(()),
        }
    }
}
