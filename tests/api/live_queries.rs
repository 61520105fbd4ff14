//! `@live` queries end to end: the patch stream, applied in order, equals a fresh execution
//! after API writes, SQL writes, membership changes and concurrent writers; a change outside
//! what the query read runs nothing; access is re-checked on every run.

use std::sync::atomic::Ordering;

use sea_orm::ConnectionTrait;
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{TestServer, data, error_code};
use crate::streams::sse;
use crate::ws_client::{RECEIVE_TIMEOUT, WsClient, caught_up};

const INBOX: &str = "query Inbox @live { channels(first: 50) { edges { node { id name members { name } documents { title } } } } }";
const ROOM: &str = "query Room($id: ID!) @live { channel(id: $id) { id name messages(last: 100) { edges { node { body version } } } } }";

/// A live query's stream over graphql-transport-ws, and the result its payloads build.
struct LiveStream {
    ws: WsClient,
    id: String,
    result: Value,
    revision: u64,
    cursor: Option<String>,
    /// Every payload's text, to look for what must never arrive.
    seen: String,
}

impl LiveStream {
    async fn open(server: &TestServer, token: &str, query: &str, variables: Value) -> Self {
        let mut ws = WsClient::connect_as(server, Some(token)).await;
        ws.subscribe("live", query, variables).await;
        let mut stream = Self {
            ws,
            id: "live".into(),
            result: Value::Null,
            revision: 0,
            cursor: None,
            seen: String::new(),
        };
        let first = stream.ws.next_payload(&stream.id).await;
        assert_eq!(first["revision"], 1, "{first}");
        assert!(first.get("patch").is_none(), "{first}");
        stream.take(first);
        stream
    }

    /// Applies one payload: checks its revision and cursor, keeps its data or applies its
    /// patch.
    fn take(&mut self, payload: Value) {
        self.seen.push_str(&payload.to_string());
        assert!(
            payload.get("errors").is_none(),
            "unexpected errors: {payload}"
        );
        self.revision += 1;
        assert_eq!(
            payload["revision"], self.revision,
            "one revision per payload: {payload}"
        );
        let cursor = payload["extensions"]["cursor"]
            .as_str()
            .unwrap_or_else(|| panic!("every payload has a cursor: {payload}"))
            .to_owned();
        if let Some(previous) = &self.cursor {
            assert!(
                position(previous) <= position(&cursor),
                "cursors never go back"
            );
        }
        self.cursor = Some(cursor);
        if self.revision == 1 {
            self.result = payload["data"].clone();
        } else {
            let patch: json_patch::Patch = serde_json::from_value(payload["patch"].clone())
                .unwrap_or_else(|err| panic!("an RFC 6902 patch ({err}): {payload}"));
            json_patch::patch(&mut self.result, &patch)
                .unwrap_or_else(|err| panic!("the patch applies ({err}): {payload}"));
        }
    }

    /// Applies payloads until the result equals `fresh` (a fresh execution's data).
    async fn until(&mut self, fresh: &Value) {
        let deadline = tokio::time::Instant::now() + RECEIVE_TIMEOUT;
        while &self.result != fresh {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the live result reaches the fresh one in time:\n live: {}\nfresh: {fresh}",
                self.result
            );
            let payload = self.ws.next_payload(&self.id).await;
            self.take(payload);
        }
    }

    /// Asserts that nothing arrives for a while.
    async fn quiet(&mut self) {
        let got = tokio::time::timeout(std::time::Duration::from_millis(300), self.ws.recv()).await;
        assert!(got.is_err(), "expected nothing, got {got:?}");
    }
}

fn position(cursor: &str) -> i64 {
    crate::subscriptions::position_of(cursor)
}

/// The data of a fresh (not live) execution of `query`.
async fn fresh(server: &TestServer, token: &str, query: &str, variables: Value) -> Value {
    let plain = query.replacen(" @live", "", 1);
    let response = server.graphql_as(token, &plain, variables).await;
    assert!(response.get("errors").is_none(), "{response}");
    response["data"].clone()
}

fn executions(server: &TestServer) -> u64 {
    server.broker.stats.live_executions.load(Ordering::SeqCst)
}

both_backends! {
    async fn patches_rebuild_the_fresh_result_after_api_sql_and_membership_writes(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let (bob, bob_id) = server.sign_up("Bob").await;
        let general = server.create_channel(&ada, "general").await;
        let mut inbox = LiveStream::open(&server, &bob, INBOX, json!({})).await;
        assert_eq!(inbox.result, fresh(&server, &bob, INBOX, json!({})).await);
        assert_eq!(inbox.result["channels"]["edges"], json!([]));

        // Being added to a channel changes Bob's list, whose scope is Bob.
        server.add_member(&ada, &general, &bob_id).await;
        inbox.until(&fresh(&server, &bob, INBOX, json!({})).await).await;
        assert_eq!(inbox.result["channels"]["edges"][0]["node"]["name"], "general");

        // An API write: a document in the channel.
        let create = "mutation($c: ID!) { createDocument(input: { channelId: $c, title: \"notes\", body: \"\" }) { id } }";
        data(&server.graphql_as(&ada, create, json!({ "c": general })).await, "createDocument");
        inbox.until(&fresh(&server, &bob, INBOX, json!({})).await).await;

        // A SQL write by another client.
        let sql = server.sql().await;
        sql.execute_unprepared(&format!("UPDATE channels SET name = 'renamed' WHERE id = {general}"))
            .await
            .unwrap();
        inbox.until(&fresh(&server, &bob, INBOX, json!({})).await).await;
        assert_eq!(inbox.result["channels"]["edges"][0]["node"]["name"], "renamed");

        // Losing membership: the channel leaves the list.
        let remove = "mutation($c: ID!, $u: ID!) { removeChannelMember(input: { channelId: $c, userId: $u }) { id } }";
        data(&server.graphql_as(&ada, remove, json!({ "c": general, "u": bob_id })).await, "removeChannelMember");
        inbox.until(&fresh(&server, &bob, INBOX, json!({})).await).await;
        assert_eq!(inbox.result["channels"]["edges"], json!([]));
        inbox.ws.close().await;
    }

    async fn a_change_outside_the_read_set_runs_nothing(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let watched = server.create_channel(&ada, "watched").await;
        let other = server.create_channel(&ada, "other").await;
        let variables = json!({ "id": watched });
        // Every change so far is published (else one after the first run's cursor could
        // run it again), and that first run is over.
        caught_up(&server).await;
        let mut room = LiveStream::open(&server, &ada, ROOM, variables.clone()).await;
        room.quiet().await;
        let before = executions(&server);

        server.post_message(&ada, &other, "elsewhere").await;
        caught_up(&server).await;
        room.quiet().await;
        assert_eq!(executions(&server), before, "a change in another channel runs nothing");

        // The next touching change runs the query once, and the patch is just that change.
        server.post_message(&ada, &watched, "here").await;
        room.until(&fresh(&server, &ada, ROOM, variables.clone()).await).await;
        assert_eq!(room.revision, 2);
        assert_eq!(executions(&server), before + 1);
        room.ws.close().await;
    }

    async fn a_removed_member_never_sees_a_later_message(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let (bob, bob_id) = server.sign_up("Bob").await;
        let channel = server.create_channel(&ada, "private").await;
        server.add_member(&ada, &channel, &bob_id).await;
        server.post_message(&ada, &channel, "before").await;
        let variables = json!({ "id": channel });
        let mut room = LiveStream::open(&server, &bob, ROOM, variables.clone()).await;
        assert_eq!(room.result["channel"]["messages"]["edges"][0]["node"]["body"], "before");

        let remove = "mutation($c: ID!, $u: ID!) { removeChannelMember(input: { channelId: $c, userId: $u }) { id } }";
        data(&server.graphql_as(&ada, remove, json!({ "c": channel, "u": bob_id })).await, "removeChannelMember");
        for n in 0..20 {
            server.post_message(&ada, &channel, &format!("secret {n}")).await;
        }
        room.until(&json!({ "channel": null })).await;
        caught_up(&server).await;
        room.quiet().await;
        assert!(!room.seen.contains("secret"), "a later body reached a removed member: {}", room.seen);
        room.ws.close().await;
    }

    async fn concurrent_writers_converge(server: TestServer) {
        let (ada, ada_id) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "busy").await;
        let variables = json!({ "id": channel });
        let mut room = LiveStream::open(&server, &ada, ROOM, variables.clone()).await;
        // Four writers at once, half through the API and half through SQL; joined in this
        // task, their requests and transactions still interleave on the server.
        let sql = server.sql().await;
        let writers = (0..4).map(|writer| {
            let (server, ada, ada_id, channel, sql) = (&server, &ada, &ada_id, &channel, &sql);
            async move {
                for n in 0..10 {
                    if n % 2 == 0 {
                        server.post_message(ada, channel, &format!("api {writer}/{n}")).await;
                    } else {
                        crate::subscriptions::sql_insert(sql, channel, ada_id, &format!("sql {writer}/{n}")).await;
                    }
                }
            }
        });
        futures_util::future::join_all(writers).await;
        let expected = fresh(&server, &ada, ROOM, variables.clone()).await;
        assert_eq!(expected["channel"]["messages"]["edges"].as_array().unwrap().len(), 40);
        room.until(&expected).await;
        room.ws.close().await;
    }

    async fn live_on_anything_but_a_query_is_bad_user_input(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let refused = [
            "mutation @live { createChannel(input: { name: \"x\" }) { id } }",
            "subscription @live { messageEvents(channelId: \"1\") { cursor } }",
            "query @live(throttle: -1) { me { name } }",
        ];
        for query in refused {
            let response = server.graphql_as(&ada, query, json!({})).await;
            assert_eq!(error_code(&response), "BAD_USER_INPUT", "{query}: {response}");
            let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
            ws.subscribe("1", query, json!({})).await;
            let message = ws.recv().await;
            assert_eq!(message["type"], "error", "{query}: {message}");
            assert_eq!(message["payload"][0]["extensions"]["code"], "BAD_USER_INPUT", "{message}");
            ws.close().await;
        }
        // Nothing was created by the refused mutation.
        let inbox = fresh(&server, &ada, INBOX, json!({})).await;
        assert_eq!(inbox["channels"]["edges"], json!([]));
        // A throttle from a variable is checked too.
        let response = server
            .graphql_as(&ada, "query($t: Int) @live(throttle: $t) { me { name } }", json!({ "t": -5 }))
            .await;
        assert_eq!(error_code(&response), "BAD_USER_INPUT", "{response}");
        // A throttle past a minute, or a negative one from a variable's default.
        for (query, variables) in [
            ("query @live(throttle: 60001) { me { name } }", json!({})),
            ("query($t: Int = -5) @live(throttle: $t) { me { name } }", json!({})),
        ] {
            let response = server.graphql_as(&ada, query, variables).await;
            assert_eq!(error_code(&response), "BAD_USER_INPUT", "{query}: {response}");
        }
        // A plain HTTP request is answered once, like any query.
        let once = server.graphql_as(&ada, "query @live { me { name } }", json!({})).await;
        assert_eq!(once, json!({ "data": { "me": { "name": "Ada" } } }));
    }

    async fn live_queries_work_over_the_legacy_protocol_sse_and_multipart(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "both").await;
        let variables = json!({ "id": channel });

        let mut legacy = WsClient::try_connect(server.addr, "graphql-ws").await.unwrap();
        legacy
            .send(json!({ "type": "connection_init", "payload": { "authorization": format!("Bearer {ada}") } }))
            .await;
        assert_eq!(legacy.recv().await["type"], "connection_ack");
        legacy
            .send(json!({ "type": "start", "id": "1", "payload": { "query": ROOM, "variables": variables } }))
            .await;
        let first = legacy.recv().await;
        assert_eq!(first["type"], "data", "{first}");
        assert_eq!(first["payload"]["revision"], 1);

        // graphql-sse on /graphql/stream; /graphql streams a live query to an SSE client too.
        let mut stream = sse(&server, &ada, ROOM, variables.clone(), None).await;
        let on_graphql = crate::streams::streaming_client()
            .post(server.url("/graphql"))
            .header("accept", "text/event-stream")
            .bearer_auth(&ada)
            .json(&json!({ "query": ROOM, "variables": variables }))
            .send()
            .await
            .unwrap();
        assert_eq!(on_graphql.headers()["content-type"], "text/event-stream; charset=utf-8");
        let mut on_graphql = crate::streams::Stream::new(on_graphql);
        let event = on_graphql.next_event().await;
        assert_eq!(serde_json::from_str::<Value>(event.data.as_deref().unwrap()).unwrap()["revision"], 1);
        let event = stream.next_event().await;
        let first_sse: Value = serde_json::from_str(event.data.as_deref().unwrap()).unwrap();
        assert_eq!(first_sse["revision"], 1, "{first_sse}");
        assert_eq!(first_sse["data"], first["payload"]["data"]);

        let multipart = crate::streams::streaming_client()
            .post(server.url("/graphql"))
            .header("accept", crate::streams::APOLLO_ACCEPT)
            .bearer_auth(&ada)
            .json(&json!({ "query": ROOM, "variables": variables }))
            .send()
            .await
            .unwrap();
        let mut multipart = crate::streams::Stream::new(multipart);
        let first_part = multipart.next_part().await.unwrap();
        assert_eq!(first_part["payload"]["revision"], 1, "{first_part}");
        assert_eq!(first_part["payload"]["data"], first["payload"]["data"]);

        server.post_message(&ada, &channel, "to both").await;
        let part = multipart.next_part().await.unwrap();
        assert_eq!(part["payload"]["revision"], 2, "{part}");
        let patch = legacy.recv().await;
        assert_eq!(patch["payload"]["revision"], 2, "{patch}");
        let event = stream.next_event().await;
        let patch_sse: Value = serde_json::from_str(event.data.as_deref().unwrap()).unwrap();
        assert_eq!(patch_sse["revision"], 2, "{patch_sse}");
        assert_eq!(patch_sse["patch"], patch["payload"]["patch"], "one patch shared by the cohort");
        assert!(patch_sse["patch"].to_string().contains("to both"));
        legacy.close().await;
    }
}

both_backends! {
    async fn a_live_query_without_data_ends_with_its_errors(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        // No token: `channels` needs one, and a null root leaves nothing to keep current.
        // `feedCursor` under @live: its payloads carry the cursor instead.
        for (token, query, code) in [
            (None, "query @live { channels { edges { node { id } } } }", "UNAUTHENTICATED"),
            (Some(ada.as_str()), "query @live { feedCursor }", "BAD_USER_INPUT"),
        ] {
            let mut ws = WsClient::connect_as(&server, token).await;
            ws.subscribe("1", query, json!({})).await;
            let message = ws.recv().await;
            assert_eq!(message["type"], "next", "{query}: {message}");
            assert!(message["payload"].get("revision").is_none(), "{message}");
            assert_eq!(message["payload"]["errors"][0]["extensions"]["code"], code, "{message}");
            assert_eq!(ws.recv().await, json!({ "type": "complete", "id": "1" }));
            ws.close().await;
        }
    }
}

#[tokio::test]
async fn a_result_over_the_cap_ends_the_live_query_with_limit_exceeded() {
    crate::helpers::run_with(
        crate::helpers::Backend::Sqlite,
        |config| config.limits.live_max_result_bytes = 1024,
        |server| async move {
            let (ada, _) = server.sign_up("Ada").await;
            let channel = server.create_channel(&ada, "big").await;
            let variables = json!({ "id": channel });
            let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
            ws.subscribe("1", ROOM, variables.clone()).await;
            assert_eq!(ws.next_payload("1").await["revision"], 1);
            let body = "x".repeat(400);
            for _ in 0..3 {
                server.post_message(&ada, &channel, &body).await;
            }
            let mut last = Value::Null;
            for _ in 0..4 {
                let message = ws.recv().await;
                if message["type"] == "next" && message["payload"].get("errors").is_some() {
                    last = message;
                    break;
                }
            }
            assert_eq!(
                last["payload"]["errors"][0]["extensions"]["code"], "LIMIT_EXCEEDED",
                "{last}"
            );
            let complete = ws.recv().await;
            assert_eq!(complete, json!({ "type": "complete", "id": "1" }));
            ws.close().await;
        },
    )
    .await;
}
