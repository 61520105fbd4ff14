//! Subscriptions end to end: SQL and API writes reach subscribers in one order, resumable
//! from any cursor, only for members.

use sea_orm::{ConnectionTrait, TransactionTrait};
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{Backend, data};
use crate::ws_client::{WsClient, caught_up, wait_for_subscribers};

pub const MESSAGE_EVENTS: &str = "subscription($c: ID!, $after: String) { messageEvents(channelId: $c, after: $after) { cursor kind message { id body version author { name } } } }";
const DOCUMENT_EVENTS: &str = "subscription($d: ID!, $after: String) { documentEvents(documentId: $d, after: $after) { cursor kind document { id title body version } } }";

/// The `messageEvents` event inside a `next` payload.
pub fn event(payload: &Value) -> &Value {
    assert!(
        payload.get("errors").is_none(),
        "unexpected errors: {payload}"
    );
    &payload["data"]["messageEvents"]
}

/// Inserts a message with plain SQL over `sql`, as any SQL client would.
pub async fn sql_insert(sql: &impl ConnectionTrait, channel: &str, author: &str, body: &str) {
    sql.execute_unprepared(&format!(
        "INSERT INTO messages (channel_id, author_id, body) VALUES ({channel}, {author}, '{body}')"
    ))
    .await
    .expect("SQL insert");
}

both_backends! {
    async fn member_sees_sql_and_api_writes_live(server: TestServer) {
        let (ada, ada_id) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "live").await;
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        ws.subscribe("1", MESSAGE_EVENTS, json!({ "c": channel })).await;
        wait_for_subscribers(&server.broker, &channel, 1).await;

        let sql = server.sql().await;
        sql_insert(&sql, &channel, &ada_id, "from sql").await;
        let created = ws.next_payload("1").await;
        let created = event(&created);
        assert_eq!(created["kind"], "CREATED");
        assert_eq!(created["message"]["body"], "from sql");
        assert_eq!(created["message"]["version"], 1);
        assert_eq!(created["message"]["author"]["name"], "Ada");
        let id = created["message"]["id"].as_str().unwrap().to_owned();

        let edit = "mutation($id: ID!) { editMessage(input: { id: $id, body: \"edited\", expectedVersion: 1 }) { version } }";
        data(&server.graphql_as(&ada, edit, json!({ "id": id })).await, "editMessage");
        let updated = ws.next_payload("1").await;
        assert_eq!(event(&updated)["kind"], "UPDATED");
        assert_eq!(event(&updated)["message"]["body"], "edited");
        assert_eq!(event(&updated)["message"]["version"], 2);

        sql.execute_unprepared(&format!("UPDATE messages SET body = 'sql edit' WHERE id = {id}")).await.unwrap();
        let updated = ws.next_payload("1").await;
        assert_eq!(event(&updated)["message"]["body"], "sql edit");
        assert_eq!(event(&updated)["message"]["version"], 3);

        let delete = "mutation($id: ID!) { deleteMessage(input: { id: $id }) { id } }";
        data(&server.graphql_as(&ada, delete, json!({ "id": id })).await, "deleteMessage");
        let deleted = ws.next_payload("1").await;
        assert_eq!(event(&deleted)["kind"], "DELETED");
        assert_eq!(event(&deleted)["message"]["body"], "sql edit", "the last state");

        // Cursors increase with the log's order.
        let positions: Vec<i64> = [created, event(&updated), event(&deleted)]
            .iter()
            .map(|e| position_of(e["cursor"].as_str().unwrap()))
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
        ws.close().await;
    }

    async fn resume_after_a_cursor_replays_then_continues_without_gap_or_duplicate(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "resume").await;
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        ws.subscribe("live", MESSAGE_EVENTS, json!({ "c": channel })).await;
        wait_for_subscribers(&server.broker, &channel, 1).await;
        let mut cursors = Vec::new();
        for i in 1..=4 {
            server.post_message(&ada, &channel, &format!("m{i}")).await;
            let payload = ws.next_payload("live").await;
            assert_eq!(event(&payload)["message"]["body"], format!("m{i}"));
            cursors.push(event(&payload)["cursor"].as_str().unwrap().to_owned());
        }
        ws.close().await;
        // Written while nobody listens.
        for i in 5..=7 {
            server.post_message(&ada, &channel, &format!("m{i}")).await;
        }
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        ws.subscribe("again", MESSAGE_EVENTS, json!({ "c": channel, "after": cursors[1] })).await;
        let mut bodies = Vec::new();
        for _ in 3..=7 {
            let payload = ws.next_payload("again").await;
            bodies.push(event(&payload)["message"]["body"].as_str().unwrap().to_owned());
        }
        assert_eq!(bodies, ["m3", "m4", "m5", "m6", "m7"]);
        // Then live, with nothing repeated.
        server.post_message(&ada, &channel, "m8").await;
        let payload = ws.next_payload("again").await;
        assert_eq!(event(&payload)["message"]["body"], "m8");
        ws.close().await;
    }

    async fn subscriptions_check_access_and_cursors_first(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let (eve, _) = server.sign_up("Eve").await;
        let channel = server.create_channel(&ada, "private").await;
        let cases = [
            (Some(eve.as_str()), json!({ "c": channel }), "FORBIDDEN"),
            (None, json!({ "c": channel }), "UNAUTHENTICATED"),
            (Some(ada.as_str()), json!({ "c": channel, "after": "not a cursor" }), "BAD_USER_INPUT"),
            (Some(ada.as_str()), json!({ "c": "abc" }), "BAD_USER_INPUT"),
        ];
        for (token, variables, code) in cases {
            let mut ws = WsClient::connect_as(&server, token).await;
            ws.subscribe("1", MESSAGE_EVENTS, variables).await;
            // As in the graphql-ws reference server: a resolver's refusal is a `next` with
            // errors, then `complete` (only syntax and validation errors get `error`).
            let message = ws.recv().await;
            assert_eq!(message["type"], "next", "{message}");
            assert_eq!(message["id"], "1");
            assert_eq!(message["payload"]["errors"][0]["extensions"]["code"], code, "{message}");
            assert_eq!(ws.recv().await, json!({ "type": "complete", "id": "1" }));
            // The socket stays usable.
            ws.send(json!({ "type": "ping", "payload": { "n": 1 } })).await;
            assert_eq!(ws.recv().await, json!({ "type": "pong", "payload": { "n": 1 } }));
            ws.close().await;
        }

        // A cursor older than retention.
        let first = server.post_message(&ada, &channel, "old").await;
        let _ = first;
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        ws.subscribe("all", MESSAGE_EVENTS, json!({ "c": channel, "after": cursor_at(1) })).await;
        let payload = ws.next_payload("all").await;
        assert_eq!(event(&payload)["message"]["body"], "old");
        let pruner = syncgraph::changes::Pruner::new(
            server.db.clone(),
            server.broker.clone(),
            syncgraph::changes::Retention {
                max_age: std::time::Duration::from_secs(3600),
                max_rows: 0,
                interval: std::time::Duration::from_secs(3600),
            },
        );
        let pruned = pruner.prune_once().await.unwrap();
        assert!(pruned > 1);
        ws.subscribe("expired", MESSAGE_EVENTS, json!({ "c": channel, "after": cursor_at(1) })).await;
        let message = ws.recv().await;
        assert_eq!(message["type"], "next", "{message}");
        assert_eq!(message["id"], "expired", "{message}");
        assert_eq!(message["payload"]["errors"][0]["extensions"]["code"], "CURSOR_EXPIRED");
        assert_eq!(ws.recv().await, json!({ "type": "complete", "id": "expired" }));
        // The newest cursor still resumes.
        ws.subscribe("fresh", MESSAGE_EVENTS, json!({ "c": channel, "after": cursor_at(pruned) })).await;
        server.post_message(&ada, &channel, "new").await;
        loop {
            let message = ws.recv().await;
            if message["id"] == "fresh" {
                assert_eq!(event(&message["payload"])["message"]["body"], "new");
                break;
            }
            // Events of the first subscription.
            assert_eq!(message["id"], "all", "{message}");
        }
        ws.close().await;
    }

    async fn removing_a_member_with_sql_ends_their_subscription_with_forbidden(server: TestServer) {
        let (ada, ada_id) = server.sign_up("Ada").await;
        let (bob, bob_id) = server.sign_up("Bob").await;
        let channel = server.create_channel(&ada, "team").await;
        server.add_member(&ada, &channel, &bob_id).await;
        let mut ws = WsClient::connect_as(&server, Some(&bob)).await;
        ws.subscribe("1", MESSAGE_EVENTS, json!({ "c": channel })).await;
        wait_for_subscribers(&server.broker, &channel, 1).await;
        server.post_message(&ada, &channel, "before").await;
        assert_eq!(event(&ws.next_payload("1").await)["message"]["body"], "before");

        let sql = server.sql().await;
        let txn = sql.begin().await.unwrap();
        txn.execute_unprepared(&format!(
            "DELETE FROM channel_members WHERE channel_id = {channel} AND user_id = {bob_id}"
        ))
        .await
        .unwrap();
        // In the same transaction, after the removal: must never reach Bob.
        sql_insert(&txn, &channel, &ada_id, "after").await;
        txn.commit().await.unwrap();

        let message = ws.recv().await;
        assert_eq!(message["type"], "next", "{message}");
        assert_eq!(message["payload"]["errors"][0]["extensions"]["code"], "FORBIDDEN", "{message}");
        let message = ws.recv().await;
        assert_eq!(message, json!({ "type": "complete", "id": "1" }));
        ws.close().await;
    }

    async fn document_events_follow_one_document_until_it_is_deleted(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "docs").await;
        let create = "mutation($c: ID!, $t: String!) { createDocument(input: { channelId: $c, title: $t, body: \"\" }) { id } }";
        let doc = data(&server.graphql_as(&ada, create, json!({ "c": channel, "t": "Plan" })).await, "createDocument")["id"].as_str().unwrap().to_owned();
        let other = data(&server.graphql_as(&ada, create, json!({ "c": channel, "t": "Other" })).await, "createDocument")["id"].as_str().unwrap().to_owned();
        caught_up(&server).await;
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        ws.subscribe("d", DOCUMENT_EVENTS, json!({ "d": doc })).await;
        wait_for_subscribers(&server.broker, &channel, 1).await;
        let update = "mutation($id: ID!, $b: String!, $v: Int!) { updateDocument(input: { id: $id, body: $b, expectedVersion: $v }) { version } }";
        data(&server.graphql_as(&ada, update, json!({ "id": other, "b": "not this one", "v": 1 })).await, "updateDocument");
        data(&server.graphql_as(&ada, update, json!({ "id": doc, "b": "step 1", "v": 1 })).await, "updateDocument");
        let payload = ws.next_payload("d").await;
        let event = &payload["data"]["documentEvents"];
        assert_eq!(event["kind"], "UPDATED");
        assert_eq!(event["document"]["body"], "step 1");
        assert_eq!(event["document"]["version"], 2);

        server.sql().await.execute_unprepared(&format!("DELETE FROM documents WHERE id = {doc}")).await.unwrap();
        let payload = ws.next_payload("d").await;
        assert_eq!(payload["data"]["documentEvents"]["kind"], "DELETED");
        assert_eq!(payload["data"]["documentEvents"]["document"]["body"], "step 1");
        assert_eq!(ws.recv().await, json!({ "type": "complete", "id": "d" }));
        ws.close().await;
    }

    async fn a_transaction_that_commits_late_is_delivered_in_position_order(server: TestServer) {
        let (ada, ada_id) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "interleave").await;
        let message = server.post_message(&ada, &channel, "row").await;
        let row = message["id"].as_str().unwrap().to_owned();
        caught_up(&server).await;
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        ws.subscribe("1", MESSAGE_EVENTS, json!({ "c": channel })).await;
        wait_for_subscribers(&server.broker, &channel, 1).await;

        // Transaction A takes the earlier positions and holds them open: it inserts a message
        // and updates `row` (taking its row lock).
        let first = server.sql().await;
        let a = first.begin().await.unwrap();
        // (On SQLite, A now holds the one write lock until it commits.)
        sql_insert(&a, &channel, &ada_id, "A").await;
        a.execute_unprepared(&format!("UPDATE messages SET body = 'A edit' WHERE id = {row}")).await.unwrap();

        // B, on another connection, writes after A took its positions: a new message and
        // an update of the same row, which waits for A's row lock (Postgres) or for the
        // write lock (SQLite).
        let second = server.sql().await;
        let b_channel = channel.clone();
        let b_author = ada_id.clone();
        let b_row = row.clone();
        let b = tokio::spawn(async move {
            let b = second.begin().await.unwrap();
            sql_insert(&b, &b_channel, &b_author, "B").await;
            b.execute_unprepared(&format!("UPDATE messages SET body = 'B edit' WHERE id = {b_row}")).await.unwrap();
            b.commit().await.unwrap();
        });
        if server.backend == Backend::Postgres {
            // B blocks on the row, so commit an unrelated write C after A's positions: a
            // committed position above uncommitted ones, the gap a naive tailer skips.
            sql_insert(&server.sql().await, &channel, &ada_id, "C").await;
            // Let the tailer see C while A is still open: wait (with a deadline) until it has
            // run three more statements, so at least two began after C committed, one of
            // them a read of the log.
            let seen = server.feed_statements.get();
            let deadline = tokio::time::Instant::now() + crate::helpers::TIMEOUT;
            while server.feed_statements.get() < seen + 3 {
                assert!(tokio::time::Instant::now() < deadline, "the tailer reads the log");
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
        a.commit().await.unwrap();
        tokio::time::timeout(crate::helpers::TIMEOUT, b).await.unwrap().unwrap();

        let mut live = Vec::new();
        let expected = if server.backend == Backend::Postgres { 5 } else { 4 };
        for _ in 0..expected {
            let payload = ws.next_payload("1").await;
            let e = event(&payload);
            live.push((
                e["cursor"].as_str().unwrap().to_owned(),
                e["message"]["body"].as_str().unwrap().to_owned(),
                e["message"]["version"].as_i64().unwrap(),
            ));
        }
        // A's changes come before B's, in the order they were logged, and the row's versions
        // rise: 2 (A's edit) then 3 (B's edit).
        let bodies: Vec<&str> = live.iter().map(|(_, b, _)| b.as_str()).collect();
        let a_pos = bodies.iter().position(|b| *b == "A").unwrap_or_else(|| panic!("A missing: {live:?}"));
        let a_edit = bodies.iter().position(|b| *b == "A edit").unwrap_or_else(|| panic!("A edit missing: {live:?}"));
        let b_pos = bodies.iter().position(|b| *b == "B").unwrap_or_else(|| panic!("B missing: {live:?}"));
        let b_edit = bodies.iter().position(|b| *b == "B edit").unwrap_or_else(|| panic!("B edit missing: {live:?}"));
        assert!(a_pos < a_edit && a_edit < b_pos && b_pos < b_edit, "{bodies:?}");
        assert_eq!(live[a_edit].2, 2);
        assert_eq!(live[b_edit].2, 3);

        // A replay from before all of it sees the identical sequence.
        let mut replay = WsClient::connect_as(&server, Some(&ada)).await;
        replay.subscribe("r", MESSAGE_EVENTS, json!({ "c": channel, "after": cursor_before(&live[0].0) })).await;
        for (cursor, body, version) in &live {
            let payload = replay.next_payload("r").await;
            let e = event(&payload);
            assert_eq!((e["cursor"].as_str().unwrap(), e["message"]["body"].as_str().unwrap(), e["message"]["version"].as_i64().unwrap()), (cursor.as_str(), body.as_str(), *version));
        }
        replay.close().await;
        ws.close().await;
    }

    async fn removing_a_member_through_the_api_ends_their_subscription_with_forbidden(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let (bob, bob_id) = server.sign_up("Bob").await;
        let channel = server.create_channel(&ada, "team").await;
        server.add_member(&ada, &channel, &bob_id).await;
        caught_up(&server).await;
        let mut bob_ws = WsClient::connect_as(&server, Some(&bob)).await;
        bob_ws.subscribe("1", MESSAGE_EVENTS, json!({ "c": channel })).await;
        let mut ada_ws = WsClient::connect_as(&server, Some(&ada)).await;
        ada_ws.subscribe("1", MESSAGE_EVENTS, json!({ "c": channel })).await;
        wait_for_subscribers(&server.broker, &channel, 2).await;

        let remove = "mutation($c: ID!, $u: ID!) { removeChannelMember(input: { channelId: $c, userId: $u }) { id } }";
        let removed = server.graphql_as(&ada, remove, json!({ "c": channel, "u": bob_id })).await;
        assert_eq!(data(&removed, "removeChannelMember")["id"], bob_id.as_str());
        server.post_message(&ada, &channel, "after bob left").await;

        let message = bob_ws.recv().await;
        assert_eq!(message["payload"]["errors"][0]["extensions"]["code"], "FORBIDDEN", "{message}");
        assert_eq!(bob_ws.recv().await, json!({ "type": "complete", "id": "1" }));
        // Ada still gets it.
        assert_eq!(event(&ada_ws.next_payload("1").await)["message"]["body"], "after bob left");
        // Bob can neither subscribe again nor remove anyone.
        bob_ws.subscribe("2", MESSAGE_EVENTS, json!({ "c": channel })).await;
        assert_eq!(bob_ws.recv().await["payload"]["errors"][0]["extensions"]["code"], "FORBIDDEN");
        let again = server.graphql_as(&bob, remove, json!({ "c": channel, "u": bob_id })).await;
        assert_eq!(again["errors"][0]["extensions"]["code"], "FORBIDDEN");
    }

    async fn a_cursor_past_the_feed_skips_nothing_not_even_a_revocation(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let (bob, bob_id) = server.sign_up("Bob").await;
        let channel = server.create_channel(&ada, "team").await;
        server.add_member(&ada, &channel, &bob_id).await;
        caught_up(&server).await;
        // A cursor far past what is published (forged, or from a commit not yet published).
        let ahead = syncgraph::graphql::Reply::cursor(server.broker.published() + 1_000_000);
        let mut bob_ws = WsClient::connect_as(&server, Some(&bob)).await;
        bob_ws.subscribe("1", MESSAGE_EVENTS, json!({ "c": channel, "after": ahead })).await;
        wait_for_subscribers(&server.broker, &channel, 1).await;
        server.post_message(&ada, &channel, "seen").await;
        assert_eq!(event(&bob_ws.next_payload("1").await)["message"]["body"], "seen");
        let remove = "mutation($c: ID!, $u: ID!) { removeChannelMember(input: { channelId: $c, userId: $u }) { id } }";
        data(&server.graphql_as(&ada, remove, json!({ "c": channel, "u": bob_id })).await, "removeChannelMember");
        server.post_message(&ada, &channel, "after bob left").await;
        let message = bob_ws.recv().await;
        assert_eq!(message["payload"]["errors"][0]["extensions"]["code"], "FORBIDDEN", "{message}");
    }

    async fn subscriptions_of_one_shape_share_each_events_rendering(server: TestServer) {
        use std::sync::atomic::Ordering;
        let (ada, _) = server.sign_up("Ada").await;
        let (bob, bob_id) = server.sign_up("Bob").await;
        let (cy, cy_id) = server.sign_up("Cy").await;
        let channel = server.create_channel(&ada, "shared").await;
        server.add_member(&ada, &channel, &bob_id).await;
        server.add_member(&ada, &channel, &cy_id).await;
        caught_up(&server).await;
        let feed_cursor = data(&server.graphql_as(&bob, "{ feedCursor }", json!({})).await, "feedCursor").clone();

        // Ada twice on one socket, Bob from a cursor (another value of a variable that only
        // picks events): one shape. Cy selects other fields: a shape of her own.
        let mut ada_ws = WsClient::connect_as(&server, Some(&ada)).await;
        ada_ws.subscribe("1", MESSAGE_EVENTS, json!({ "c": channel })).await;
        ada_ws.subscribe("2", MESSAGE_EVENTS, json!({ "c": channel })).await;
        let mut bob_ws = WsClient::connect_as(&server, Some(&bob)).await;
        bob_ws.subscribe("b", MESSAGE_EVENTS, json!({ "c": channel, "after": feed_cursor })).await;
        let mut cy_ws = WsClient::connect_as(&server, Some(&cy)).await;
        let other = "subscription($c: ID!) { messageEvents(channelId: $c) { kind message { body } } }";
        cy_ws.subscribe("c", other, json!({ "c": channel })).await;
        wait_for_subscribers(&server.broker, &channel, 4).await;
        crate::ws_client::wait_for_streams(&server.broker, 4).await;

        let stats = &server.broker.stats;
        let renders = stats.renders.load(Ordering::SeqCst);
        let delivered = stats.delivered.load(Ordering::SeqCst);
        server.post_message(&ada, &channel, "once").await;
        // Ada's two operations get theirs in either order.
        let (one, two) = (ada_ws.recv().await, ada_ws.recv().await);
        let mut ids = [one["id"].as_str().unwrap(), two["id"].as_str().unwrap()];
        ids.sort();
        assert_eq!(ids, ["1", "2"], "{one} {two}");
        assert_eq!((one["type"].as_str(), two["type"].as_str()), (Some("next"), Some("next")));
        let first = one["payload"].clone();
        assert_eq!(event(&first)["message"]["body"], "once");
        assert_eq!(event(&first)["message"]["author"]["name"], "Ada");
        assert_eq!(two["payload"], first);
        assert_eq!(bob_ws.next_payload("b").await, first);
        assert_eq!(
            cy_ws.next_payload("c").await,
            json!({ "data": { "messageEvents": { "kind": "CREATED", "message": { "body": "once" } } } })
        );
        caught_up(&server).await;
        assert_eq!(stats.renders.load(Ordering::SeqCst) - renders, 2, "one rendering per shape");
        assert_eq!(stats.delivered.load(Ordering::SeqCst) - delivered, 4, "one delivery per subscription");

        // A subscription must select exactly one root field (GraphQL's rule); nothing runs.
        let two = "subscription($c: ID!) { a: messageEvents(channelId: $c) { cursor } b: messageEvents(channelId: $c) { cursor } }";
        ada_ws.subscribe("3", two, json!({ "c": channel })).await;
        let refused = ada_ws.recv().await;
        assert_eq!(refused["type"], "error", "{refused}");
        assert_eq!(refused["id"], "3");
        assert_eq!(refused["payload"][0]["extensions"]["code"], "BAD_USER_INPUT", "{refused}");
        assert!(refused["payload"][0]["message"].as_str().unwrap().contains("exactly one root field"));
        assert_eq!(server.broker.subscriber_count(channel.parse().unwrap()), 4);
    }

    async fn a_burst_of_subscriptions_on_many_sockets_all_start(server: TestServer) {
        // More sockets, each sending more subscriptions at once, than the server has start
        // permits (test servers: 5): each socket waits for a permit before it reads on, while
        // the starts that hold the permits must still finish.
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "burst").await;
        caught_up(&server).await;
        let mut sockets = Vec::new();
        for _ in 0..12 {
            let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
            for n in 0..10 {
                ws.subscribe(&n.to_string(), MESSAGE_EVENTS, json!({ "c": channel })).await;
            }
            sockets.push(ws);
        }
        crate::ws_client::wait_for_streams(&server.broker, 120).await;
        server.post_message(&ada, &channel, "to all").await;
        for ws in &mut sockets {
            let mut ids = Vec::new();
            for _ in 0..10 {
                let message = ws.recv().await;
                assert_eq!(message["type"], "next", "{message}");
                assert_eq!(event(&message["payload"])["message"]["body"], "to all");
                ids.push(message["id"].as_str().unwrap().parse::<u32>().unwrap());
            }
            ids.sort();
            assert_eq!(ids, (0..10).collect::<Vec<_>>());
        }
    }

    async fn moving_a_membership_row_away_with_sql_is_a_removal(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let (bob, bob_id) = server.sign_up("Bob").await;
        let (_, cy_id) = server.sign_up("Cy").await;
        let channel = server.create_channel(&ada, "team").await;
        server.add_member(&ada, &channel, &bob_id).await;
        caught_up(&server).await;
        let mut ws = WsClient::connect_as(&server, Some(&bob)).await;
        ws.subscribe("1", MESSAGE_EVENTS, json!({ "c": channel })).await;
        wait_for_subscribers(&server.broker, &channel, 1).await;
        // Bob's membership row is rewritten to belong to Cy: Bob is no longer a member.
        server
            .sql()
            .await
            .execute_unprepared(&format!(
                "UPDATE channel_members SET user_id = {cy_id} WHERE channel_id = {channel} AND user_id = {bob_id}"
            ))
            .await
            .unwrap();
        server.post_message(&ada, &channel, "not for bob").await;
        let message = ws.recv().await;
        assert_eq!(message["payload"]["errors"][0]["extensions"]["code"], "FORBIDDEN", "{message}");
        assert_eq!(ws.recv().await, json!({ "type": "complete", "id": "1" }));
    }

    async fn feed_cursor_starts_a_subscription_where_its_snapshot_ends(server: TestServer) {
        let (ada, ada_id) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "snapshot").await;
        server.post_message(&ada, &channel, "in the snapshot").await;
        caught_up(&server).await;
        let snapshot = server
            .graphql_as(
                &ada,
                "query($c: ID!) { feedCursor channel(id: $c) { messages(last: 10) { edges { node { body } } } } }",
                json!({ "c": channel }),
            )
            .await;
        assert_eq!(
            snapshot["data"]["channel"]["messages"]["edges"][0]["node"]["body"],
            "in the snapshot"
        );
        let cursor = snapshot["data"]["feedCursor"].as_str().expect("a cursor").to_owned();

        // Written after the snapshot, before anyone subscribes: the cursor must replay it,
        // and nothing the snapshot already held.
        sql_insert(&server.sql().await, &channel, &ada_id, "after the snapshot").await;
        caught_up(&server).await;
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        ws.subscribe("1", MESSAGE_EVENTS, json!({ "c": channel, "after": cursor })).await;
        let first = ws.next_payload("1").await;
        assert_eq!(event(&first)["message"]["body"], "after the snapshot");
        assert_eq!(event(&first)["kind"], "CREATED");
        server.post_message(&ada, &channel, "live").await;
        let live = ws.next_payload("1").await;
        assert_eq!(event(&live)["message"]["body"], "live");

        // The same over the WebSocket: a query there gets its own mark.
        ws.complete("1").await;
        crate::ws_client::wait_for_subscribers_at_most(&server, &channel, 0).await;
        caught_up(&server).await;
        ws.subscribe("q", "{ feedCursor }", json!({})).await;
        let mark = ws.next_payload("q").await;
        let cursor = mark["data"]["feedCursor"].as_str().expect("a cursor").to_owned();
        let done = ws.recv().await;
        assert_eq!((done["id"].as_str(), done["type"].as_str()), (Some("q"), Some("complete")));
        sql_insert(&server.sql().await, &channel, &ada_id, "after the WebSocket mark").await;
        ws.subscribe("2", MESSAGE_EVENTS, json!({ "c": channel, "after": cursor })).await;
        let first = ws.next_payload("2").await;
        assert_eq!(event(&first)["message"]["body"], "after the WebSocket mark");

        // Cursors are for members' subscriptions; without a token there is none.
        let anonymous = server.graphql("{ feedCursor }", json!({})).await;
        assert_eq!(crate::helpers::error_code(&anonymous), "UNAUTHENTICATED");
    }

    async fn a_row_with_sqlite_style_timestamps_still_arrives(server: TestServer) {
        let (ada, ada_id) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "times").await;
        caught_up(&server).await;
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        ws.subscribe("1", "subscription($c: ID!) { messageEvents(channelId: $c) { message { body createdAt } } }", json!({ "c": channel })).await;
        wait_for_subscribers(&server.broker, &channel, 1).await;
        let now = match server.backend {
            Backend::Sqlite => "datetime('now')",
            Backend::Postgres => "now()",
        };
        server
            .sql()
            .await
            .execute_unprepared(&format!(
                "INSERT INTO messages (channel_id, author_id, body, created_at, updated_at) VALUES ({channel}, {ada_id}, 'plain', {now}, {now})"
            ))
            .await
            .unwrap();
        let payload = ws.next_payload("1").await;
        assert_eq!(payload["data"]["messageEvents"]["message"]["body"], "plain");
        assert!(payload["data"]["messageEvents"]["message"]["createdAt"].is_string());
    }
}

/// The event cursor for log position `position` (cursors are opaque to clients; tests know
/// their shape to point before or at a given position).
pub fn cursor_at(position: i64) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("event:{position}"))
}

/// The log position inside an event cursor.
pub fn position_of(cursor: &str) -> i64 {
    use base64::Engine;
    let text = String::from_utf8(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(cursor)
            .unwrap(),
    )
    .unwrap();
    text.trim_start_matches("event:").parse().unwrap()
}

/// The cursor just before `cursor`.
pub fn cursor_before(cursor: &str) -> String {
    cursor_at(position_of(cursor) - 1)
}
