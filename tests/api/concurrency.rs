//! Optimistic concurrency under truly concurrent writers: exactly one of several edits with
//! the same `expectedVersion` wins; the others get CONFLICT and write nothing.

use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, Statement, TransactionTrait};
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{Backend, TestServer, data, error_code};

const EDIT: &str = "mutation($id: ID!, $b: String!, $v: Int!) { editMessage(input: { id: $id, body: $b, expectedVersion: $v }) { body version } }";
const UPDATE_DOC: &str = "mutation($id: ID!, $b: String!, $v: Int!) { updateDocument(input: { id: $id, body: $b, expectedVersion: $v }) { body version } }";

/// Sends `n` copies of `query` at once (each with its own body text); returns the responses.
async fn race(
    server: &TestServer,
    token: &str,
    query: &str,
    id: &str,
    version: i64,
    n: usize,
) -> Vec<Value> {
    let requests = (0..n).map(|i| {
        server.graphql_as(
            token,
            query,
            json!({ "id": id, "b": format!("writer {i}"), "v": version }),
        )
    });
    futures_util::future::join_all(requests).await
}

/// Waits (with a deadline) until `count` sessions of this test's PostgreSQL database wait
/// on a lock: `what` has reached the lock another transaction holds.
pub async fn wait_for_lock_waiters(sql: &sea_orm::DatabaseConnection, count: i64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let row = sql
            .query_one_raw(Statement::from_string(
                sea_orm::DatabaseBackend::Postgres,
                "SELECT count(*) AS waiting FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
            ))
            .await
            .unwrap()
            .unwrap();
        if row.try_get::<i64>("", "waiting").unwrap() >= count {
            return;
        }
        assert!(Instant::now() < deadline, "{what} never waited on the lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Checks that exactly one response won (with `field` at `version + 1`) and the rest conflicted.
fn exactly_one_winner(responses: &[Value], field: &str, version: i64) -> String {
    let mut winners = Vec::new();
    for response in responses {
        if response.get("errors").is_none() {
            assert_eq!(response["data"][field]["version"], version + 1);
            winners.push(response["data"][field]["body"].as_str().unwrap().to_owned());
        } else {
            assert_eq!(error_code(response), "CONFLICT", "{response}");
            assert_eq!(
                response["errors"][0]["extensions"]["currentVersion"],
                version + 1
            );
        }
    }
    assert_eq!(winners.len(), 1, "exactly one writer wins: {responses:#?}");
    winners.remove(0)
}

both_backends! {
    async fn concurrent_edits_with_one_expected_version_have_one_winner(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "race").await;
        let message = server.post_message(&ada, &channel, "start").await;
        let id = message["id"].as_str().unwrap().to_owned();
        for round in 0..10 {
            let version = 1 + round;
            let responses = race(&server, &ada, EDIT, &id, version, 4).await;
            let winner = exactly_one_winner(&responses, "editMessage", version);
            let page = server
                .graphql_as(&ada, "query($c: ID!) { channel(id: $c) { messages { edges { node { body version } } } } }", json!({ "c": channel }))
                .await;
            let node = &data(&page, "channel")["messages"]["edges"][0]["node"];
            assert_eq!(node["body"], winner.as_str(), "the stored body is the winner's");
            assert_eq!(node["version"], version + 1);
        }
    }

    async fn edits_queued_behind_a_lock_still_have_one_winner(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "race").await;
        let created = server
            .graphql_as(&ada, "mutation($c: ID!) { createDocument(input: { channelId: $c, title: \"T\", body: \"\" }) { id } }", json!({ "c": channel }))
            .await;
        let id = data(&created, "createDocument")["id"].as_str().unwrap().to_owned();

        // Another SQL client holds the row (Postgres: FOR UPDATE) or the database's write lock
        // (SQLite, whose no-op UPDATE raises the version to 2 when it commits), so both
        // updates are in flight together and queue; when it lets go they run back to back.
        let sql = server.sql().await;
        let txn = sql.begin().await.unwrap();
        let expected = match server.backend {
            Backend::Postgres => {
                txn.execute_unprepared(&format!("SELECT id FROM documents WHERE id = {id} FOR UPDATE")).await.unwrap();
                1
            }
            Backend::Sqlite => {
                txn.execute_unprepared(&format!("UPDATE documents SET title = title WHERE id = {id}")).await.unwrap();
                2
            }
        };
        let racing = {
            let server_url = server.url("/graphql");
            let token = ada.clone();
            let id = id.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::builder().timeout(crate::helpers::TIMEOUT).build().unwrap();
                let requests = (0..2).map(|i| {
                    client
                        .post(&server_url)
                        .bearer_auth(&token)
                        .json(&json!({ "query": UPDATE_DOC, "variables": { "id": id, "b": format!("writer {i}"), "v": expected } }))
                        .send()
                });
                let mut out = Vec::new();
                for response in futures_util::future::join_all(requests).await {
                    out.push(response.unwrap().json::<Value>().await.unwrap());
                }
                out
            })
        };
        if server.backend == Backend::Postgres {
            // Both updates are blocked on the row lock.
            wait_for_lock_waiters(&sql, 2, "the two updates").await;
        }
        // SQLite cannot show who waits on its lock, so there the updates may still be on
        // their way when the lock is released; either way they are serialised and exactly one
        // may win, which is what this checks.
        txn.commit().await.unwrap();
        let responses = tokio::time::timeout(crate::helpers::TIMEOUT, racing).await.unwrap().unwrap();
        exactly_one_winner(&responses, "updateDocument", expected);
    }
}

/// PostgreSQL: a channel deleted while a write into it runs answers NOT_FOUND, not an
/// internal error. Each write reads the membership from its snapshot, then blocks on the
/// channel's row lock in its foreign-key check until the deleting transaction commits; the
/// check then fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs SYNCGRAPH_TEST_POSTGRES (a PostgreSQL server URL)"
)]
async fn a_channel_deleted_while_a_write_runs_answers_not_found() {
    crate::helpers::run(Backend::Postgres, |server: TestServer| async move {
        let (ada, _) = server.sign_up("Ada").await;
        let (_, grace_id) = server.sign_up("Grace").await;
        let writes = [
            ("postMessage", "mutation($c: ID!) { postMessage(input: { channelId: $c, body: \"late\" }) { id } }"),
            ("createDocument", "mutation($c: ID!) { createDocument(input: { channelId: $c, title: \"late\", body: \"\" }) { id } }"),
            ("addChannelMember", "mutation($c: ID!, $u: ID!) { addChannelMember(input: { channelId: $c, userId: $u }) { id } }"),
        ];
        let sql = server.sql().await;
        for (field, mutation) in writes {
            let channel = server.create_channel(&ada, field).await;
            let txn = sql.begin().await.unwrap();
            txn.execute_unprepared(&format!("DELETE FROM channels WHERE id = {channel}"))
                .await
                .unwrap();
            let write = {
                let url = server.url("/graphql");
                let token = ada.clone();
                let variables = json!({ "c": channel, "u": grace_id });
                tokio::spawn(async move {
                    reqwest::Client::new()
                        .post(url)
                        .bearer_auth(token)
                        .json(&json!({ "query": mutation, "variables": variables }))
                        .timeout(crate::helpers::TIMEOUT)
                        .send()
                        .await
                        .unwrap()
                        .json::<Value>()
                        .await
                        .unwrap()
                })
            };
            // The write is blocked on the deleted channel's lock.
            wait_for_lock_waiters(&sql, 1, field).await;
            txn.commit().await.unwrap();
            let response = tokio::time::timeout(crate::helpers::TIMEOUT, write)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(error_code(&response), "NOT_FOUND", "{field}: {response}");
            assert_eq!(response["errors"][0]["message"], "channel not found", "{field}: {response}");
        }
    })
    .await;
}
