//! The `syncgraph` binary: `schema`, `migrate`, serving with graceful shutdown on SIGTERM.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

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

#[tokio::test]
async fn migrate_subcommand_creates_the_tables() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("migrated.db");
    let url = format!("sqlite://{}", path.display());
    let status = tokio::time::timeout(
        TIMEOUT,
        Command::new(BIN)
            .args(["migrate", "--database-url", &url])
            .status(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(status.success());
    let (db, _) = syncgraph::db::connect(&url, 1).await.unwrap();
    for table in [
        "users",
        "channels",
        "channel_members",
        "messages",
        "documents",
    ] {
        sea_orm::ConnectionTrait::execute_unprepared(&db, &format!("SELECT count(*) FROM {table}"))
            .await
            .unwrap_or_else(|e| panic!("{table} exists: {e}"));
    }
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

#[tokio::test]
async fn serves_then_stops_gracefully_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("served.db").display());
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--database-url", &url])
        .env_remove("SYNCGRAPH_JWT_SECRET")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
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
