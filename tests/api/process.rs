//! The real `syncgraph` binary as a second server process on the test's database: writes
//! through the in-process server and plain SQL reach its subscribers exactly once, and a
//! subscriber of it that stops reading does not make it buffer (its RSS is measured).

use std::process::Stdio;

use sea_orm::ConnectionTrait;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::both_backends;
use crate::helpers::{Backend, TIMEOUT};
use crate::subscriptions::{cursor_at, event, sql_insert};
use crate::ws_client::{WsClient, caught_up};

const BODIES: &str = "subscription($c: ID!, $after: String) { messageEvents(channelId: $c, after: $after) { cursor message { body } } }";

/// Starts the binary on `database_url` with the test servers' JWT secret; returns it and the
/// address it serves on.
async fn spawn_binary(database_url: &str) -> (Child, std::net::SocketAddr) {
    // A long keep-alive: the stalled test client sends no pongs while it does not read.
    spawn_binary_with(database_url, &["--ws-keep-alive-secs", "600"]).await
}

/// `spawn_binary` with more arguments.
pub async fn spawn_binary_with(database_url: &str, args: &[&str]) -> (Child, std::net::SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_syncgraph"))
        .args(["--listen", "127.0.0.1:0", "--database-url", database_url])
        .args(args)
        .env("SYNCGRAPH_JWT_SECRET", "test-secret")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the binary");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(TIMEOUT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.split("serving GraphQL on http://").nth(1) {
                return rest.split('/').next().unwrap().parse().unwrap();
            }
        }
        panic!("the binary exited before serving");
    })
    .await
    .expect("the binary starts in time");
    // Keep draining its log so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

both_backends! {
    async fn a_second_server_process_delivers_exactly_once_and_does_not_buffer(server: TestServer) {
        let (ada, ada_id) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "two processes").await;
        caught_up(&server).await;
        // Resume from the current end of the log: every later change is replayed or live,
        // so there is no need to see the other process register the subscription.
        let from = cursor_at(server.broker.published());
        let (mut child, addr) = spawn_binary(&server.database_url).await;
        let pid = child.id().expect("pid");

        let mut fast = WsClient::connect_to(addr, Some(&ada)).await;
        fast.subscribe("fast", BODIES, json!({ "c": channel, "after": from })).await;
        let mut slow = WsClient::connect_to(addr, Some(&ada)).await;
        slow.subscribe("slow", BODIES, json!({ "c": channel, "after": from })).await;

        server.post_message(&ada, &channel, "via the other process").await;
        sql_insert(&server.sql().await, &channel, &ada_id, "via sql").await;
        for expected in ["via the other process", "via sql"] {
            assert_eq!(event(&fast.next_payload("fast").await)["message"]["body"], expected);
        }
        fast.send(json!({ "type": "ping", "payload": "end" })).await;
        assert_eq!(fast.recv().await, json!({ "type": "pong", "payload": "end" }), "exactly once");

        // `slow` reads nothing while 20,000 changes of about 2 KB each are written.
        let before = rss_kib(pid);
        let bulk = match server.backend {
            Backend::Postgres => format!(
                "INSERT INTO messages (channel_id, author_id, body) \
                 SELECT {channel}, {ada_id}, 'bulk ' || i || ' ' || repeat('x', 2000) \
                 FROM generate_series(1, 20000) AS i"
            ),
            Backend::Sqlite => format!(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000) \
                 INSERT INTO messages (channel_id, author_id, body) \
                 SELECT {channel}, {ada_id}, 'bulk ' || i || ' ' || printf('%.2000c', 'x') FROM n"
            ),
        };
        server.sql().await.execute_unprepared(&bulk).await.unwrap();
        for i in 1..=20_000 {
            let payload = fast.next_payload("fast").await;
            let body = event(&payload)["message"]["body"].as_str().unwrap().to_owned();
            assert!(body.starts_with(&format!("bulk {i} ")), "in order: {i}");
        }
        let after = rss_kib(pid);
        let growth = after.saturating_sub(before);
        {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "server RSS with a stalled subscriber and 20,000 x 2 KB changes ({:?}): {before} KiB -> {after} KiB", server.backend);
        }
        // Bounded (topic buffer, recent-event memory, socket queue, SQLite page caches) this
        // grew by 28-40 MiB; with an unbounded socket queue it grew by 83-111 MiB.
        assert!(growth < 64 * 1024, "RSS grew by {growth} KiB");

        // The stalled subscriber still gets everything, in order, once it reads.
        for expected in ["via the other process", "via sql"] {
            assert_eq!(event(&slow.next_payload("slow").await)["message"]["body"], expected);
        }
        for i in 1..=20_000 {
            let payload = slow.next_payload("slow").await;
            let body = event(&payload)["message"]["body"].as_str().unwrap().to_owned();
            assert!(body.starts_with(&format!("bulk {i} ")), "in order: {i}");
        }

        let pid = pid.to_string();
        Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
        let status = tokio::time::timeout(TIMEOUT, child.wait()).await.expect("stops").unwrap();
        assert!(status.success());
    }
}
