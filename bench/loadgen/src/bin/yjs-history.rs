//! A document with a long Yjs history: stores `--updates` one-character edits (as
//! `store::yjs` stores them, with their capture into the change log), then measures what
//! loading it costs with the compacted snapshot (the snapshot and the updates after it) and
//! without (every update replayed), and the bytes each takes. Prints a summary and a
//! `JSON {...}` line.
//!
//!   yjs-history --database-url sqlite:///tmp/h.db --updates 100000
//!   yjs-history --database-url postgres://postgres@127.0.0.1:5432/syncgraph_bench

use std::time::Instant;

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use clap::Parser;
use sea_orm::{ConnectionTrait, DatabaseBackend, Statement, TransactionTrait, Value};
use serde_json::json;
use yrs::{Doc, ReadTxn, StateVector, Text, Transact};

#[derive(Parser)]
struct Args {
    /// A fresh database (migrated here).
    #[arg(long)]
    database_url: String,
    #[arg(long, default_value_t = 100_000)]
    updates: usize,
    /// Loads timed of each kind (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (db, _) = syncgraph::db::connect(&args.database_url, 2).await?;
    syncgraph::app::migrate(&db).await?;
    let backend = db.get_database_backend();
    let sql = |text: &str| Statement::from_string(backend, text.to_owned());
    db.execute_raw(sql(
        "INSERT INTO users (name, email, password_hash) VALUES ('h', 'history@example.com', 'x')",
    ))
    .await?;
    db.execute_raw(sql("INSERT INTO channels (name) VALUES ('history')"))
        .await?;
    let one = |name: &'static str| {
        let db = db.clone();
        async move {
            let row = db
                .query_one_raw(Statement::from_string(
                    backend,
                    format!("SELECT MAX(id) AS id FROM {name}"),
                ))
                .await?
                .context("a row")?;
            anyhow::Ok(row.try_get::<i64>("", "id")?)
        }
    };
    let (user, channel) = (one("users").await?, one("channels").await?);
    db.execute_raw(sql(&format!(
        "INSERT INTO channel_members (channel_id, user_id) VALUES ({channel}, {user})"
    )))
    .await?;
    let document = syncgraph::store::document::create(&db, user, channel, "history", "").await?;

    // One editor types `updates` characters, each its own update, stored in batches the
    // way `store::yjs::apply` stores one (base64 of the v1 encoding, its version).
    let editor = Doc::new();
    let text = editor.get_or_insert_text("body");
    let started = Instant::now();
    let placeholder = |n: usize| match backend {
        DatabaseBackend::Postgres => format!("${n}"),
        _ => "?".to_owned(),
    };
    let insert = format!(
        "INSERT INTO document_updates (document_id, channel_id, version, update_data) VALUES ({}, {}, {}, {})",
        placeholder(1),
        placeholder(2),
        placeholder(3),
        placeholder(4)
    );
    for batch in (0..args.updates).collect::<Vec<_>>().chunks(1000) {
        let txn = db.begin().await?;
        for &n in batch {
            let update = {
                let mut t = editor.transact_mut();
                let at = (n as u32 * 7919) % (text.len(&t) + 1);
                text.insert(&mut t, at, "x");
                t.encode_update_v1()
            };
            txn.execute_raw(Statement::from_sql_and_values(
                backend,
                &insert,
                [
                    Value::from(document.id),
                    Value::from(channel),
                    Value::from(n as i32 + 2),
                    Value::from(STANDARD.encode(update)),
                ],
            ))
            .await?;
        }
        txn.commit().await?;
    }
    let stored_in = started.elapsed();
    let updates_bytes = scalar(&db, &format!("SELECT COALESCE(SUM(LENGTH(update_data)), 0) AS n FROM document_updates WHERE document_id = {}", document.id)).await?;

    // Without a snapshot: every update replayed.
    let full = median_load(&db, document.id, args.runs).await?;
    // With the snapshot through the last update (as a write past 100 updates rolls it).
    let state = STANDARD.encode(
        editor
            .transact()
            .encode_state_as_update_v1(&StateVector::default()),
    );
    let last = scalar(
        &db,
        &format!(
            "SELECT MAX(id) AS n FROM document_updates WHERE document_id = {}",
            document.id
        ),
    )
    .await?;
    db.execute_raw(Statement::from_sql_and_values(
        backend,
        format!(
            "INSERT INTO document_snapshots (document_id, through_update_id, state) VALUES ({}, {}, {})",
            placeholder(1),
            placeholder(2),
            placeholder(3)
        ),
        [Value::from(document.id), Value::from(last), Value::from(state.clone())],
    ))
    .await?;
    let compacted = median_load(&db, document.id, args.runs).await?;
    let loaded = syncgraph::store::yjs::load(&db, document.id).await?;
    anyhow::ensure!(
        loaded.text().len() == args.updates,
        "the loaded text has every character"
    );

    println!(
        "{} updates ({:?} to store): without the snapshot {:.1} ms to load, {} KiB of updates; with it {:.2} ms, a {} KiB snapshot",
        args.updates,
        stored_in,
        full * 1000.0,
        updates_bytes / 1024,
        compacted * 1000.0,
        state.len() / 1024,
    );
    println!(
        "JSON {}",
        json!({
            "label": "yjs-history",
            "backend": format!("{backend:?}").to_lowercase(),
            "updates": args.updates,
            "load_without_snapshot_ms": full * 1000.0,
            "load_with_snapshot_ms": compacted * 1000.0,
            "updates_bytes": updates_bytes,
            "snapshot_bytes": state.len(),
        })
    );
    Ok(())
}

/// The median time of `runs` loads of document `id`, in seconds.
async fn median_load(
    db: &sea_orm::DatabaseConnection,
    id: i64,
    runs: usize,
) -> anyhow::Result<f64> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let started = Instant::now();
        let loaded = syncgraph::store::yjs::load(db, id).await?;
        std::hint::black_box(loaded.text());
        times.push(started.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

async fn scalar(db: &sea_orm::DatabaseConnection, sql: &str) -> anyhow::Result<i64> {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            sql.to_owned(),
        ))
        .await?
        .context("a row")?;
    Ok(row.try_get::<i64>("", "n")?)
}
