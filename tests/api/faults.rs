//! Faults: the database drops every connection (what a PostgreSQL restart does to a
//! client) while subscribers are connected; the server keeps serving and nothing is lost.

use sea_orm::{ConnectionTrait, Statement};
use serde_json::json;

use crate::helpers::{Backend, TestServer, run_with};
use crate::subscriptions::{MESSAGE_EVENTS, event, sql_insert};
use crate::ws_client::{WsClient, caught_up, wait_for_subscribers};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_dropped_by_postgres_loses_nothing_postgres() {
    // A slow fallback poll: only a working LISTEN (re-established) delivers in time.
    let slow_poll: fn(&mut syncgraph::Config) = |config| config.poll_ms = 60_000;
    run_with(Backend::Postgres, slow_poll, |server: TestServer| async move {
        let (ada, ada_id) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "faults").await;
        caught_up(&server).await;
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        ws.subscribe("1", MESSAGE_EVENTS, json!({ "c": channel })).await;
        wait_for_subscribers(&server.broker, &channel, 1).await;
        server.post_message(&ada, &channel, "before").await;
        let before = ws.next_payload("1").await;
        assert_eq!(event(&before)["message"]["body"], "before");
        let cursor = event(&before)["cursor"].as_str().unwrap().to_owned();

        // Every server connection to this database is killed: request pool, feed pool and
        // the LISTEN connection alike.
        let sql = server.sql().await;
        let killed = sql
            .query_all_raw(Statement::from_string(
                sea_orm::DatabaseBackend::Postgres,
                "SELECT pg_terminate_backend(pid) AS killed FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
            ))
            .await
            .unwrap();
        assert!(killed.len() >= 3, "the server's connections were killed ({})", killed.len());

        // Writes by SQL and through the API (on a fresh connection of the pool) both reach
        // the subscriber that stayed connected, in order.
        sql_insert(&sql, &channel, &ada_id, "by sql").await;
        let deadline = tokio::time::Instant::now() + crate::helpers::TIMEOUT;
        let posted = loop {
            let response = server
                .graphql_as(&ada, "mutation($c: ID!) { postMessage(input: { channelId: $c, body: \"by api\" }) { id } }", json!({ "c": channel }))
                .await;
            if response.get("errors").is_none() {
                break response;
            }
            // A request that met a dead connection answers INTERNAL_SERVER_ERROR (no SQL in
            // it) and the next one gets a new connection.
            assert_eq!(crate::helpers::error_code(&response), "INTERNAL_SERVER_ERROR", "{response}");
            assert!(tokio::time::Instant::now() < deadline, "the API recovers in time");
        };
        assert!(posted["data"]["postMessage"]["id"].is_string());
        let first = ws.next_payload("1").await;
        assert_eq!(event(&first)["message"]["body"], "by sql");
        let second = ws.next_payload("1").await;
        assert_eq!(event(&second)["message"]["body"], "by api");

        // A client that reconnects and resumes from its cursor gets both, once.
        let mut again = WsClient::connect_as(&server, Some(&ada)).await;
        again.subscribe("2", MESSAGE_EVENTS, json!({ "c": channel, "after": cursor })).await;
        let replayed: Vec<String> = [again.next_payload("2").await, again.next_payload("2").await]
            .iter()
            .map(|p| event(p)["message"]["body"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(replayed, ["by sql", "by api"]);
        // And the server says it is ready again.
        caught_up(&server).await;
        let deadline = tokio::time::Instant::now() + crate::helpers::TIMEOUT;
        loop {
            let ready = server.client().get(server.url("/readyz")).send().await.unwrap();
            if ready.status() == 200 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "ready again in time");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let _ = sql.execute_unprepared("SELECT 1").await;
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_database_at_start_is_retried_then_a_clear_error() {
    let started = std::time::Instant::now();
    let output = tokio::time::timeout(
        crate::helpers::TIMEOUT,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_syncgraph"))
            .args([
                "--database-url",
                "postgres://postgres:hunter2@127.0.0.1:1/nowhere",
                "--db-connect-timeout-secs",
                "4",
                "--listen",
                "127.0.0.1:0",
            ])
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "0")
            .output(),
    )
    .await
    .expect("the binary gives up in time")
    .expect("run the binary");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("the database cannot be reached; retrying"),
        "{stderr}"
    );
    assert!(
        stderr.contains("could not be reached in 4 s of retrying"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        !stderr.contains("hunter2"),
        "the password stays out of the log: {stderr}"
    );
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(1),
        "it retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_started_before_its_database_exists_waits_for_it_postgres() {
    let Some((url, fresh)) = crate::helpers::fresh_database(Backend::Postgres).await else {
        return;
    };
    // Take the database away, start the server, then create it: the server waits for it.
    fresh.drop_database().await;
    let name = url.rsplit('/').next().unwrap().to_owned();
    let admin_url = std::env::var("SYNCGRAPH_TEST_POSTGRES").unwrap();
    let mut config = syncgraph::Config::for_database(url.clone());
    config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.db_connect_timeout_secs = 30;
    crate::helpers::test_settings(&mut config);
    let starting = tokio::spawn(async move { syncgraph::app::App::build(&config).await });
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    assert!(!starting.is_finished(), "the server waits for its database");
    let (admin, _) = syncgraph::db::connect(&admin_url, 1).await.unwrap();
    admin
        .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
        .await
        .unwrap();
    let app = tokio::time::timeout(crate::helpers::TIMEOUT, starting)
        .await
        .expect("the server starts once the database exists")
        .unwrap()
        .expect("the server builds");
    let addr = app.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(app.run(async {
        stopped.await.ok();
    }));
    // Ready once the tailer has finished its first read.
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + crate::helpers::TIMEOUT;
    loop {
        let health = client
            .get(format!("http://{addr}/readyz"))
            .timeout(crate::helpers::TIMEOUT)
            .send()
            .await
            .unwrap();
        if health.status() == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "ready in time");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stop.send(()).ok();
    tokio::time::timeout(crate::helpers::TIMEOUT, serving)
        .await
        .expect("stops in time")
        .unwrap()
        .unwrap();
    admin
        .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await
        .unwrap();
}
