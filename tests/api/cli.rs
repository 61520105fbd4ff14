//! The `syncgraph` binary: `schema`, `migrate`, serving with graceful shutdown on SIGTERM.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::helpers::{Backend, fresh_database};

const BIN: &str = env!("CARGO_BIN_EXE_syncgraph");
const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn schema_subcommand_prints_the_committed_sdl() {
    let output = tokio::time::timeout(TIMEOUT, Command::new(BIN).arg("schema").output())
        .await
        .unwrap()
        .unwrap();
    assert!(output.status.success());
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/schema.graphql")).unwrap();
    assert_eq!(String::from_utf8(output.stdout).unwrap(), committed);
}

/// `syncgraph migrate` on a fresh database of `backend` creates every table.
async fn migrate_creates_the_tables(backend: Backend) {
    let Some((url, database)) = fresh_database(backend).await else {
        return;
    };
    let status = tokio::time::timeout(
        TIMEOUT,
        Command::new(BIN)
            .args(["migrate", "--database-url", &url])
            .status(),
    )
    .await
    .unwrap()
    .unwrap();
    let (db, _) = syncgraph::db::connect(&url, 1).await.unwrap();
    let mut missing = Vec::new();
    for table in [
        "users",
        "channels",
        "channel_members",
        "messages",
        "documents",
    ] {
        let query = format!("SELECT count(*) FROM {table}");
        if sea_orm::ConnectionTrait::execute_unprepared(&db, &query)
            .await
            .is_err()
        {
            missing.push(table);
        }
    }
    db.close().await.ok();
    database.drop_database().await;
    assert!(status.success());
    assert!(
        missing.is_empty(),
        "tables missing after migrate: {missing:?}"
    );
}

#[tokio::test]
async fn migrate_subcommand_creates_the_tables_sqlite() {
    migrate_creates_the_tables(Backend::Sqlite).await;
}

#[tokio::test]
async fn migrate_subcommand_creates_the_tables_postgres() {
    migrate_creates_the_tables(Backend::Postgres).await;
}

#[tokio::test]
async fn unsupported_database_url_is_a_clear_error() {
    let output = tokio::time::timeout(
        TIMEOUT,
        Command::new(BIN)
            .args([
                "--database-url",
                "mysql://localhost/x",
                "--listen",
                "127.0.0.1:0",
            ])
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unsupported database URL"), "{stderr}");
}

/// The binary serves on `backend`, answers, and exits 0 on SIGTERM.
async fn serves_then_stops_gracefully_on_sigterm(backend: Backend) {
    let Some((url, database)) = fresh_database(backend).await else {
        return;
    };
    let outcome = tokio::spawn(serve_then_sigterm(url)).await;
    database.drop_database().await;
    if let Err(err) = outcome {
        std::panic::resume_unwind(err.into_panic());
    }
}

async fn serve_then_sigterm(url: String) {
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--database-url", &url])
        .env_remove("SYNCGRAPH_JWT_SECRET")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut warned = false;
    let addr = tokio::time::timeout(TIMEOUT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            warned |= line.contains("no JWT secret configured");
            if let Some(rest) = line.split("serving GraphQL on http://").nth(1) {
                return rest.split('/').next().unwrap().to_owned();
            }
        }
        panic!("the server exited before serving");
    })
    .await
    .expect("the server starts in time");
    assert!(warned, "a missing JWT secret is warned about");

    let health = reqwest::Client::new()
        .get(format!("http://{addr}/healthz"))
        .timeout(TIMEOUT)
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    let pid = child.id().unwrap().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(TIMEOUT, child.wait())
        .await
        .expect("the server stops in time")
        .unwrap();
    assert!(status.success(), "graceful exit: {status}");
}

#[tokio::test]
async fn serves_then_stops_gracefully_on_sigterm_sqlite() {
    serves_then_stops_gracefully_on_sigterm(Backend::Sqlite).await;
}

#[tokio::test]
async fn serves_then_stops_gracefully_on_sigterm_postgres() {
    serves_then_stops_gracefully_on_sigterm(Backend::Postgres).await;
}
