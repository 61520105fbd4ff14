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
    let (url, database) = fresh_database(backend).await;
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

/// `syncgraph migrate` on SQLite closes the database as `serve` does: no `-wal` or `-shm`
/// file is left beside it.
#[tokio::test]
async fn migrate_leaves_no_sqlite_journal_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("migrated.db");
    let status = tokio::time::timeout(
        TIMEOUT,
        Command::new(BIN)
            .args(["migrate", "--database-url"])
            .arg(format!("sqlite://{}", path.display()))
            .status(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(status.success());
    let mut files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["migrated.db"]);
}

#[tokio::test]
async fn migrate_subcommand_creates_the_tables_sqlite() {
    migrate_creates_the_tables(Backend::Sqlite).await;
}

#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs SYNCGRAPH_TEST_POSTGRES (a PostgreSQL server URL)"
)]
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
    let (url, database) = fresh_database(backend).await;
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
    let mut notices = Vec::new();
    let addr = tokio::time::timeout(TIMEOUT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            warned |= line.contains("no JWT secret configured");
            if line.contains("notice") {
                notices.push(line.clone());
            }
            if let Some(rest) = line.split("serving GraphQL on http://").nth(1) {
                return rest.split('/').next().unwrap().to_owned();
            }
        }
        panic!("the server exited before serving");
    })
    .await
    .expect("the server starts in time");
    assert!(warned, "a missing JWT secret is warned about");
    // PostgreSQL's notices (the migrator's "relation ... already exists, skipping") are not
    // logged.
    assert!(notices.is_empty(), "{notices:#?}");

    let health = reqwest::Client::new()
        .get(format!("http://{addr}/healthz"))
        .timeout(TIMEOUT)
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    // A subscriber connected when SIGTERM arrives: the process does not exit before its
    // subscription is completed and its socket closed with 1012.
    let client = reqwest::Client::new();
    let signed_up: serde_json::Value = client
        .post(format!("http://{addr}/graphql"))
        .json(&serde_json::json!({ "query": "mutation { signUp(input: { name: \"Sub\", email: \"sub@example.com\", password: \"correct horse\" }) { token } }" }))
        .timeout(TIMEOUT)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = signed_up["data"]["signUp"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let created: serde_json::Value = client
        .post(format!("http://{addr}/graphql"))
        .bearer_auth(&token)
        .json(&serde_json::json!({ "query": "mutation { createChannel(input: { name: \"bye\" }) { id } }" }))
        .timeout(TIMEOUT)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let channel = created["data"]["createChannel"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut subscriber =
        crate::ws_client::WsClient::connect_to(addr.parse().unwrap(), Some(&token)).await;
    subscriber
        .subscribe(
            "1",
            crate::subscriptions::MESSAGE_EVENTS,
            serde_json::json!({ "c": channel }),
        )
        .await;
    // The subscription is running once a post reaches it.
    client
        .post(format!("http://{addr}/graphql"))
        .bearer_auth(&token)
        .json(&serde_json::json!({ "query": "mutation($c: ID!) { postMessage(input: { channelId: $c, body: \"hi\" }) { id } }", "variables": { "c": channel } }))
        .timeout(TIMEOUT)
        .send()
        .await
        .unwrap();
    subscriber.next_payload("1").await;

    // A mutation in flight when SIGTERM arrives: its request is half sent.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = r#"{"query":"mutation { signUp(input: { name: \"Late\", email: \"late@example.com\", password: \"correct horse\" }) { token } }"}"#;
    let mut in_flight = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /graphql HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    in_flight.write_all(head.as_bytes()).await.unwrap();
    in_flight.write_all(&body.as_bytes()[..20]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let pid = child.id().unwrap().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    // Shutting down, the server still finishes the mutation it had begun to receive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    in_flight.write_all(&body.as_bytes()[20..]).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(TIMEOUT, in_flight.read_to_string(&mut answer))
        .await
        .expect("the in-flight mutation is answered in time")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"token\""), "{answer}");
    assert_eq!(
        subscriber.recv().await,
        serde_json::json!({ "type": "complete", "id": "1" })
    );
    assert_eq!(subscriber.expect_close().await.0, 1012);
    // It exits 0, and nothing listens any more.
    let status = tokio::time::timeout(TIMEOUT, child.wait())
        .await
        .expect("the server stops in time")
        .unwrap();
    assert!(status.success(), "graceful exit: {status}");
    assert!(
        tokio::net::TcpStream::connect(&addr).await.is_err(),
        "nothing listens after the exit"
    );
}

#[tokio::test]
async fn serves_then_stops_gracefully_on_sigterm_sqlite() {
    serves_then_stops_gracefully_on_sigterm(Backend::Sqlite).await;
}

#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs SYNCGRAPH_TEST_POSTGRES (a PostgreSQL server URL)"
)]
async fn serves_then_stops_gracefully_on_sigterm_postgres() {
    serves_then_stops_gracefully_on_sigterm(Backend::Postgres).await;
}
