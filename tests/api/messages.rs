//! Messages: posting, paging both ways, optimistic edits and deletes, SQL writers, batching.

use sea_orm::ConnectionTrait;
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{Backend, data, error_code};

const EDIT: &str = "mutation($id: ID!, $b: String!, $v: Int!) { editMessage(input: { id: $id, body: $b, expectedVersion: $v }) { id body version updatedAt } }";
const DELETE: &str = "mutation($id: ID!, $v: Int) { deleteMessage(input: { id: $id, expectedVersion: $v }) { id body version } }";
const PAGE: &str = "query($c: ID!, $first: Int, $after: String, $last: Int, $before: String) { channel(id: $c) { messages(first: $first, after: $after, last: $last, before: $before) { edges { cursor node { id body } } pageInfo { hasNextPage hasPreviousPage startCursor endCursor } } } }";

fn bodies(response: &Value) -> Vec<String> {
    data(response, "channel")["messages"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["node"]["body"].as_str().unwrap().to_owned())
        .collect()
}

fn page_info(response: &Value) -> &Value {
    &data(response, "channel")["messages"]["pageInfo"]
}

both_backends! {
    async fn messages_page_forward_and_backward(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "general").await;
        for i in 1..=7 {
            server.post_message(&ada, &channel, &format!("m{i}")).await;
        }
        let first = server.graphql_as(&ada, PAGE, json!({ "c": channel, "first": 3 })).await;
        assert_eq!(bodies(&first), ["m1", "m2", "m3"]);
        assert_eq!(page_info(&first)["hasNextPage"], true);
        assert_eq!(page_info(&first)["hasPreviousPage"], false);

        let after = page_info(&first)["endCursor"].clone();
        let second = server.graphql_as(&ada, PAGE, json!({ "c": channel, "first": 3, "after": after })).await;
        assert_eq!(bodies(&second), ["m4", "m5", "m6"]);
        assert_eq!(page_info(&second)["hasPreviousPage"], true);

        let last = server.graphql_as(&ada, PAGE, json!({ "c": channel, "last": 2 })).await;
        assert_eq!(bodies(&last), ["m6", "m7"]);
        assert_eq!(page_info(&last)["hasPreviousPage"], true);
        assert_eq!(page_info(&last)["hasNextPage"], false);

        let before = page_info(&last)["startCursor"].clone();
        let earlier = server.graphql_as(&ada, PAGE, json!({ "c": channel, "last": 10, "before": before })).await;
        assert_eq!(bodies(&earlier), ["m1", "m2", "m3", "m4", "m5"]);
        assert_eq!(page_info(&earlier)["hasPreviousPage"], false);
        assert_eq!(page_info(&earlier)["hasNextPage"], true);

        for (vars, field) in [
            (json!({ "c": channel, "after": "not-a-cursor" }), "after"),
            (json!({ "c": channel, "before": "bWVzc2FnZTp4" }), "before"),
            (json!({ "c": channel, "first": 1, "last": 1 }), "last"),
            (json!({ "c": channel, "last": 500 }), "last"),
        ] {
            let response = server.graphql_as(&ada, PAGE, vars).await;
            assert_eq!(error_code(&response), "BAD_USER_INPUT", "{response}");
            assert_eq!(response["errors"][0]["extensions"]["field"], field);
        }
    }

    async fn edit_with_stale_version_conflicts_and_writes_nothing(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "general").await;
        let message = server.post_message(&ada, &channel, "hello").await;
        let id = message["id"].as_str().unwrap();
        assert_eq!(message["version"], 1);

        let edited = server.graphql_as(&ada, EDIT, json!({ "id": id, "b": "hello, world", "v": 1 })).await;
        assert_eq!(data(&edited, "editMessage")["version"], 2);
        assert_eq!(data(&edited, "editMessage")["body"], "hello, world");

        let stale = server.graphql_as(&ada, EDIT, json!({ "id": id, "b": "lost update", "v": 1 })).await;
        assert_eq!(error_code(&stale), "CONFLICT");
        assert_eq!(stale["errors"][0]["extensions"]["currentVersion"], 2);

        let page = server.graphql_as(&ada, PAGE, json!({ "c": channel })).await;
        assert_eq!(bodies(&page), ["hello, world"]);
    }

    async fn only_the_author_and_members_change_messages(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let (bob, bob_id) = server.sign_up("Bob").await;
        let (eve, _) = server.sign_up("Eve").await;
        let channel = server.create_channel(&ada, "general").await;
        server.add_member(&ada, &channel, &bob_id).await;
        let message = server.post_message(&ada, &channel, "mine").await;
        let id = message["id"].as_str().unwrap();

        // Bob is a member but not the author; Eve is not even a member.
        for token in [&bob, &eve] {
            let response = server.graphql_as(token, EDIT, json!({ "id": id, "b": "theirs", "v": 1 })).await;
            assert_eq!(error_code(&response), "FORBIDDEN");
            let response = server.graphql_as(token, DELETE, json!({ "id": id })).await;
            assert_eq!(error_code(&response), "FORBIDDEN");
        }
        let response = server
            .graphql_as(&eve, "mutation($c: ID!) { postMessage(input: { channelId: $c, body: \"hi\" }) { id } }", json!({ "c": channel }))
            .await;
        assert_eq!(error_code(&response), "FORBIDDEN");
        let response = server
            .graphql_as(&ada, "mutation($c: ID!) { postMessage(input: { channelId: $c, body: \"hi\" }) { id } }", json!({ "c": "424242" }))
            .await;
        assert_eq!(error_code(&response), "NOT_FOUND");
        // Neither refused post was written.
        let response = server.graphql_as(&ada, PAGE, json!({ "c": channel })).await;
        assert_eq!(response["data"]["channel"]["messages"]["edges"].as_array().map(Vec::len), Some(1), "{response}");
        let response = server.graphql_as(&eve, PAGE, json!({ "c": channel })).await;
        assert_eq!(response["data"]["channel"], Value::Null);

        let response = server.graphql_as(&ada, EDIT, json!({ "id": "424242", "b": "x", "v": 1 })).await;
        assert_eq!(error_code(&response), "NOT_FOUND");
    }

    async fn delete_returns_last_state_and_respects_expected_version(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "general").await;
        let message = server.post_message(&ada, &channel, "bye").await;
        let id = message["id"].as_str().unwrap();

        let stale = server.graphql_as(&ada, DELETE, json!({ "id": id, "v": 7 })).await;
        assert_eq!(error_code(&stale), "CONFLICT");
        assert_eq!(stale["errors"][0]["extensions"]["currentVersion"], 1);

        let deleted = server.graphql_as(&ada, DELETE, json!({ "id": id, "v": 1 })).await;
        assert_eq!(data(&deleted, "deleteMessage")["body"], "bye");
        let again = server.graphql_as(&ada, DELETE, json!({ "id": id })).await;
        assert_eq!(error_code(&again), "NOT_FOUND");
        let page = server.graphql_as(&ada, PAGE, json!({ "c": channel })).await;
        assert!(bodies(&page).is_empty());
    }

    async fn message_bodies_are_validated(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "general").await;
        let post = "mutation($c: ID!, $b: String!) { postMessage(input: { channelId: $c, body: $b }) { id } }";
        for body in ["".to_owned(), " \n ".to_owned(), "x".repeat(4_001)] {
            let response = server.graphql_as(&ada, post, json!({ "c": channel, "b": body })).await;
            assert_eq!(error_code(&response), "BAD_USER_INPUT");
            assert_eq!(response["errors"][0]["extensions"]["field"], "input.body");
        }
        // The limit itself is accepted.
        let response = server.graphql_as(&ada, post, json!({ "c": channel, "b": "x".repeat(4_000) })).await;
        data(&response, "postMessage");
    }

    async fn sql_writers_get_defaults_and_version_bumps(server: TestServer) {
        let (ada, ada_id) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "general").await;
        let sql = server.sql().await;
        sql.execute_unprepared(&format!(
            "INSERT INTO messages (channel_id, author_id, body) VALUES ({channel}, {ada_id}, 'from psql')"
        ))
        .await
        .unwrap();
        let query = "query($c: ID!) { channel(id: $c) { messages { edges { node { id body version author { name } createdAt updatedAt } } } } }";
        let response = server.graphql_as(&ada, query, json!({ "c": channel })).await;
        let node = &data(&response, "channel")["messages"]["edges"][0]["node"];
        assert_eq!(node["body"], "from psql");
        assert_eq!(node["version"], 1);
        assert_eq!(node["author"]["name"], "Ada");
        let id = node["id"].as_str().unwrap().to_owned();

        // Any UPDATE raises the version by one, even one that does not mention it.
        sql.execute_unprepared(&format!("UPDATE messages SET body = 'edited by sql' WHERE id = {id}"))
            .await
            .unwrap();
        sql.execute_unprepared(&format!("UPDATE messages SET body = 'again' WHERE id = {id}"))
            .await
            .unwrap();
        let response = server.graphql_as(&ada, query, json!({ "c": channel })).await;
        let node = &data(&response, "channel")["messages"]["edges"][0]["node"];
        assert_eq!(node["body"], "again");
        assert_eq!(node["version"], 3);

        // And the API's optimistic check sees the SQL writer's versions.
        let stale = server.graphql_as(&ada, EDIT, json!({ "id": id, "b": "x", "v": 1 })).await;
        assert_eq!(error_code(&stale), "CONFLICT");
        assert_eq!(stale["errors"][0]["extensions"]["currentVersion"], 3);
        let fresh = server.graphql_as(&ada, EDIT, json!({ "id": id, "b": "x", "v": 3 })).await;
        assert_eq!(data(&fresh, "editMessage")["version"], 4);

        if server.backend == Backend::Sqlite {
            // Timestamps keep one text format whoever wrote them (defaults, triggers, API).
            let rows = sql
                .query_all_raw(sea_orm::Statement::from_string(
                    sea_orm::DatabaseBackend::Sqlite,
                    "SELECT created_at, updated_at FROM messages UNION ALL SELECT created_at, created_at FROM users",
                ))
                .await
                .unwrap();
            for row in rows {
                for column in ["created_at", "updated_at"] {
                    let value: String = row.try_get("", column).unwrap();
                    assert_eq!(value.len(), "2026-01-02T03:04:05.678Z".len(), "{value}");
                    assert!(value.ends_with('Z'), "{value}");
                }
            }
        }
    }

    async fn authors_of_a_page_load_in_one_batch(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "busy").await;
        let mut tokens = vec![ada.clone()];
        for name in ["Bob", "Cy", "Dee", "Eve"] {
            let (token, id) = server.sign_up(name).await;
            server.add_member(&ada, &channel, &id).await;
            tokens.push(token);
        }
        for i in 0..50 {
            server.post_message(&tokens[i % tokens.len()], &channel, &format!("m{i}")).await;
        }
        // Posting checks membership inside its insert: one statement.
        let before = server.statements.get();
        server.post_message(&ada, &channel, "m50").await;
        assert_eq!(server.statements.get() - before, 1, "statements for one postMessage");
        let query = "query($c: ID!, $n: Int) { channel(id: $c) { messages(first: $n) { edges { node { body author { id name } } } } members { id } } }";
        let mut counts = Vec::new();
        for n in [5, 50] {
            let before = server.statements.get();
            let response = server.graphql_as(&ada, query, json!({ "c": channel, "n": n })).await;
            let edges = data(&response, "channel")["messages"]["edges"].as_array().unwrap().clone();
            assert_eq!(edges.len(), n);
            assert!(edges.iter().all(|e| e["node"]["author"]["name"].is_string()));
            counts.push(server.statements.get() - before);
        }
        // channel lookup + message page + one author batch + one members batch.
        assert_eq!(counts, vec![4, 4], "statements for 5 and 50 messages");
    }
}
