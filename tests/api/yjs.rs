//! Documents as Yjs documents, through the GraphQL API, with yrs (the Rust port of Yjs) as
//! the client: concurrent edits merge, whole-text writes become edits, bad updates store
//! nothing. (The y-websocket endpoint and its Node client come with the rest of issue 18.)

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sea_orm::ConnectionTrait;
use serde_json::{Value, json};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, GetString, Map, ReadTxn, StateVector, Text, Transact, Update};

use crate::both_backends;
use crate::helpers::{TestServer, data, error_code};
use crate::ws_client::{WsClient, caught_up};

const STATE: &str = "query($id: ID!, $sv: String) { document(id: $id) { body version yjsState(stateVector: $sv) yjsStateVector } }";
const APPLY: &str = "mutation($id: ID!, $u: String!) { applyDocumentUpdate(input: { documentId: $id, update: $u }) { cursor version } }";

/// A Yjs client of one document.
struct Client {
    doc: Doc,
}

impl Client {
    fn new() -> Self {
        Self { doc: Doc::new() }
    }

    fn text(&self) -> String {
        self.doc
            .get_or_insert_text("body")
            .get_string(&self.doc.transact())
    }

    fn vector(&self) -> String {
        STANDARD.encode(self.doc.transact().state_vector().encode_v1())
    }

    fn apply(&self, update: &str) {
        let bytes = STANDARD.decode(update).unwrap();
        self.doc
            .transact_mut()
            .apply_update(Update::decode_v1(&bytes).unwrap())
            .unwrap();
    }

    /// Inserts `chunk` at byte `at`; returns the update, base64.
    fn insert(&self, at: u32, chunk: &str) -> String {
        let text = self.doc.get_or_insert_text("body");
        let mut t = self.doc.transact_mut();
        text.insert(&mut t, at, chunk);
        STANDARD.encode(t.encode_update_v1())
    }

    /// Pulls what it lacks from the server.
    async fn sync(&self, server: &TestServer, token: &str, id: &str) -> Value {
        let state = server
            .graphql_as(token, STATE, json!({ "id": id, "sv": self.vector() }))
            .await;
        let document = data(&state, "document").clone();
        self.apply(document["yjsState"].as_str().unwrap());
        document
    }
}

pub(crate) async fn create_document(
    server: &TestServer,
    token: &str,
    channel: &str,
    body: &str,
) -> String {
    let create = "mutation($c: ID!, $b: String!) { createDocument(input: { channelId: $c, title: \"notes\", body: $b }) { id } }";
    let created = server
        .graphql_as(token, create, json!({ "c": channel, "b": body }))
        .await;
    data(&created, "createDocument")["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

both_backends! {
    async fn concurrent_yjs_edits_merge_and_set_the_body(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "docs").await;
        let id = create_document(&server, &ada, &channel, "hello").await;
        let (a, b) = (Client::new(), Client::new());
        let first = a.sync(&server, &ada, &id).await;
        assert_eq!(first["version"], 1);
        b.sync(&server, &ada, &id).await;
        assert_eq!(a.text(), "hello");

        // Two edits made at once, each on the same state: both are kept.
        let from_a = a.insert(5, " world");
        let from_b = b.insert(0, "Say: ");
        let applied = server.graphql_as(&ada, APPLY, json!({ "id": id, "u": from_a })).await;
        assert_eq!(data(&applied, "applyDocumentUpdate")["version"], 2);
        let applied = server.graphql_as(&ada, APPLY, json!({ "id": id, "u": from_b })).await;
        let result = data(&applied, "applyDocumentUpdate");
        assert_eq!(result["version"], 3);
        assert!(result["cursor"].as_str().is_some_and(|c| !c.is_empty()));

        let document = a.sync(&server, &ada, &id).await;
        assert_eq!(document["body"], "Say: hello world");
        assert_eq!(a.text(), "Say: hello world");
        b.sync(&server, &ada, &id).await;
        assert_eq!(b.text(), a.text());

        // The same update again adds nothing: accepted, nothing changes.
        let again = server.graphql_as(&ada, APPLY, json!({ "id": id, "u": from_a })).await;
        assert_eq!(data(&again, "applyDocumentUpdate")["version"], 3);
        // A client with the server's whole state lacks nothing: an empty diff.
        let state = server.graphql_as(&ada, STATE, json!({ "id": id, "sv": a.vector() })).await;
        let empty = Client::new();
        empty.apply(data(&state, "document")["yjsState"].as_str().unwrap());
        assert_eq!(empty.text(), "");
    }

    async fn update_document_and_yjs_editors_converge(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "docs").await;
        let id = create_document(&server, &ada, &channel, "hello world").await;
        let editor = Client::new();
        editor.sync(&server, &ada, &id).await;
        // The editor types; meanwhile a whole-text write (optimistic, version 1) lands first.
        let typed = editor.insert(11, "!");
        let update = "mutation($id: ID!) { updateDocument(input: { id: $id, body: \"hello brave world\", expectedVersion: 1 }) { version body } }";
        let updated = server.graphql_as(&ada, update, json!({ "id": id })).await;
        assert_eq!(data(&updated, "updateDocument")["version"], 2);
        let applied = server.graphql_as(&ada, APPLY, json!({ "id": id, "u": typed })).await;
        assert_eq!(data(&applied, "applyDocumentUpdate")["version"], 3);
        let document = editor.sync(&server, &ada, &id).await;
        // The whole-text write was an edit of the middle, so the typed "!" is kept.
        assert_eq!(document["body"], "hello brave world!");
        assert_eq!(editor.text(), "hello brave world!");
    }

    async fn bad_updates_store_nothing(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let (bob, _) = server.sign_up("Bob").await;
        let channel = server.create_channel(&ada, "docs").await;
        let id = create_document(&server, &ada, &channel, "text").await;
        let client = Client::new();
        client.sync(&server, &ada, &id).await;

        // An update that depends on another client's update the server never got.
        let other = Client::new();
        other.apply(&client_state(&client));
        let unsent = other.insert(0, "a");
        let follower = Client::new();
        follower.apply(&client_state(&client));
        follower.apply(&unsent);
        let dependent = follower.insert(1, "b");
        // One that writes another shared type than the text.
        let map_update = {
            let doc = Doc::new();
            let map = doc.get_or_insert_map("other");
            let mut t = doc.transact_mut();
            map.insert(&mut t, "k", "v");
            STANDARD.encode(t.encode_update_v1())
        };
        // A NUL character, which PostgreSQL cannot store in the text.
        let nul = {
            let typist = Client::new();
            typist.apply(&client_state(&client));
            typist.insert(0, "\0")
        };
        for (update, what) in [
            ("not base64!".to_owned(), "not base64"),
            (STANDARD.encode([0u8, 1, 2, 255]), "not an update"),
            (dependent, "missing dependencies"),
            (map_update, "another type"),
            (nul, "a NUL character"),
        ] {
            let response = server.graphql_as(&ada, APPLY, json!({ "id": id, "u": update })).await;
            assert_eq!(error_code(&response), "BAD_USER_INPUT", "{what}: {response}");
        }
        // Nor can a whole-text write bring one in.
        let create = "mutation($c: ID!) { createDocument(input: { channelId: $c, title: \"t\", body: \"a\\u0000b\" }) { id } }";
        let response = server.graphql_as(&ada, create, json!({ "c": channel })).await;
        assert_eq!(error_code(&response), "BAD_USER_INPUT", "{response}");
        assert_eq!(response["errors"][0]["extensions"]["field"], "input.body");
        // A non-member, and a document that does not exist.
        let typed = client.insert(0, "x");
        let response = server.graphql_as(&bob, APPLY, json!({ "id": id, "u": typed })).await;
        assert_eq!(error_code(&response), "FORBIDDEN", "{response}");
        let response = server.graphql_as(&ada, APPLY, json!({ "id": "999999", "u": typed })).await;
        assert_eq!(error_code(&response), "NOT_FOUND", "{response}");
        let document = Client::new().sync(&server, &ada, &id).await;
        assert_eq!(document["version"], 1, "nothing was stored");
        assert_eq!(document["body"], "text");
        let stored = count(&server, &format!("SELECT COUNT(*) AS n FROM document_updates WHERE document_id = {id}")).await;
        assert_eq!(stored, 1, "only the first update (the text it was created with)");
    }

    async fn a_document_made_with_sql_gets_its_history_once(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "docs").await;
        let sql = server.sql().await;
        sql.execute_unprepared(&format!(
            "INSERT INTO documents (channel_id, title, body) VALUES ({channel}, 'from sql', 'written by SQL')"
        ))
        .await
        .unwrap();
        let id = sql
            .query_one_raw(sea_orm::Statement::from_string(
                sql.get_database_backend(),
                "SELECT MAX(id) AS id FROM documents".to_owned(),
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get::<i64>("", "id")
            .unwrap()
            .to_string();
        let (a, b) = (Client::new(), Client::new());
        a.sync(&server, &ada, &id).await;
        b.sync(&server, &ada, &id).await;
        assert_eq!(a.text(), "written by SQL");
        // Both started from the one stored history: their edits merge without duplicating.
        let from_a = a.insert(0, "A ");
        let from_b = b.insert(14, " B");
        server.graphql_as(&ada, APPLY, json!({ "id": id, "u": from_a })).await;
        server.graphql_as(&ada, APPLY, json!({ "id": id, "u": from_b })).await;
        let document = a.sync(&server, &ada, &id).await;
        assert_eq!(document["body"], "A written by SQL B");
        let stored = count(&server, &format!("SELECT COUNT(*) AS n FROM document_updates WHERE document_id = {id}")).await;
        assert_eq!(stored, 3, "one history: its start, then the two edits");
    }

    async fn many_updates_roll_a_snapshot_and_load_the_same_text(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "docs").await;
        let id = create_document(&server, &ada, &channel, "").await;
        let client = Client::new();
        client.sync(&server, &ada, &id).await;
        let mut at = 0;
        let total = syncgraph::store::yjs::SNAPSHOT_EVERY + 20;
        // A reader that stopped after the 10th update, and that update's cursor.
        let (early, mut early_cursor) = (Client::new(), String::new());
        for n in 0..total {
            let chunk = format!("{} ", n % 10);
            let update = client.insert(at, &chunk);
            at += chunk.len() as u32;
            let applied = server.graphql_as(&ada, APPLY, json!({ "id": id, "u": update })).await;
            assert_eq!(data(&applied, "applyDocumentUpdate")["version"], n + 2);
            if n < 10 {
                early.apply(&update);
                early_cursor = data(&applied, "applyDocumentUpdate")["cursor"].as_str().unwrap().to_owned();
            }
        }
        let snapshots = count(&server, &format!("SELECT COUNT(*) AS n FROM document_snapshots WHERE document_id = {id}")).await;
        assert_eq!(snapshots, 1);
        let fresh = Client::new();
        let document = fresh.sync(&server, &ada, &id).await;
        assert_eq!(fresh.text(), client.text());
        assert_eq!(document["body"], client.text());

        // Compaction keeps cursors valid: resuming after the 10th update's cursor brings every
        // later update once, in order, though the snapshot now holds most of them.
        caught_up(&server).await;
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        ws.subscribe("r", UPDATES, json!({ "id": id, "after": early_cursor })).await;
        for version in 12..=(total + 1) {
            let event = next_update(&mut ws, "r").await;
            assert_eq!(event["version"], version);
            early.apply(event["update"].as_str().unwrap());
        }
        assert_eq!(early.text(), client.text());
        ws.close().await;
    }
}

both_backends! {
    async fn retention_prunes_the_updates_a_snapshot_holds_and_loading_still_agrees(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "docs").await;
        let id = create_document(&server, &ada, &channel, "").await;
        let client = Client::new();
        client.sync(&server, &ada, &id).await;
        let total = syncgraph::store::yjs::SNAPSHOT_EVERY + 20;
        for n in 0..total {
            let update = client.insert(n as u32, "x");
            server.graphql_as(&ada, APPLY, json!({ "id": id, "u": update })).await;
        }
        caught_up(&server).await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let pruner = syncgraph::changes::Pruner::new(
            server.db.clone(),
            server.broker.clone(),
            syncgraph::changes::Retention {
                max_age: std::time::Duration::ZERO,
                max_rows: 1_000_000,
                interval: std::time::Duration::from_secs(3600),
            },
        );
        pruner.prune_once().await.unwrap();
        let kept = count(&server, &format!("SELECT COUNT(*) AS n FROM document_updates WHERE document_id = {id}")).await;
        // The snapshot holds the first 100 updates; its last one and the 20 after it stay.
        assert_eq!(kept, 21, "{kept} of {total} updates kept");
        let fresh = Client::new();
        let document = fresh.sync(&server, &ada, &id).await;
        assert_eq!(fresh.text(), client.text());
        assert_eq!(document["body"], client.text());
        // Writing and subscribing still work on the pruned history.
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        ws.subscribe("u", UPDATES, json!({ "id": id, "sv": fresh.vector() })).await;
        let first = next_update(&mut ws, "u").await;
        assert_eq!(first["version"], total + 1);
        let applied = server.graphql_as(&ada, APPLY, json!({ "id": id, "u": client.insert(0, "y") })).await;
        assert_eq!(data(&applied, "applyDocumentUpdate")["version"], total + 2);
        let next = next_update(&mut ws, "u").await;
        fresh.apply(next["update"].as_str().unwrap());
        assert_eq!(fresh.text(), client.text());
        ws.close().await;
    }
}

both_backends! {
    async fn concurrent_updates_of_one_document_each_get_their_own_version_and_cursor(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "docs").await;
        let id = create_document(&server, &ada, &channel, "").await;
        // Twenty editors type at once (one character each, from the same empty state), and
        // one sends an update of another type among them: it alone is refused.
        let mut updates: Vec<String> = (0..20u8)
            .map(|n| Client::new().insert(0, &char::from(b'a' + n).to_string()))
            .collect();
        let bad = {
            let doc = Doc::new();
            let map = doc.get_or_insert_map("other");
            let mut t = doc.transact_mut();
            map.insert(&mut t, "k", "v");
            STANDARD.encode(t.encode_update_v1())
        };
        updates.insert(10, bad);
        let answers = futures_util::future::join_all(updates.iter().map(|update| {
            server.graphql_as(&ada, APPLY, json!({ "id": id, "u": update }))
        }))
        .await;
        let mut versions = Vec::new();
        let mut cursors = std::collections::HashSet::new();
        for (n, answer) in answers.iter().enumerate() {
            if n == 10 {
                assert_eq!(error_code(answer), "BAD_USER_INPUT", "{answer}");
                continue;
            }
            let applied = data(answer, "applyDocumentUpdate");
            versions.push(applied["version"].as_i64().unwrap());
            assert!(cursors.insert(applied["cursor"].as_str().unwrap().to_owned()), "one cursor each");
        }
        versions.sort();
        assert_eq!(versions, (2..=21).collect::<Vec<i64>>());
        let document = Client::new().sync(&server, &ada, &id).await;
        let mut body: Vec<char> = document["body"].as_str().unwrap().chars().collect();
        body.sort();
        assert_eq!(body.into_iter().collect::<String>(), "abcdefghijklmnopqrst");
        assert_eq!(document["version"], 21);
        let stored = count(&server, &format!("SELECT COUNT(*) AS n FROM document_updates WHERE document_id = {id}")).await;
        assert_eq!(stored, 20);
    }
}

const UPDATES: &str = "subscription($id: ID!, $sv: String, $after: String) { documentUpdates(documentId: $id, stateVector: $sv, after: $after) { cursor update version } }";

/// The next `documentUpdates` event of operation `op`.
async fn next_update(ws: &mut WsClient, op: &str) -> Value {
    let payload = ws.next_payload(op).await;
    assert!(payload.get("errors").is_none(), "{payload}");
    payload["data"]["documentUpdates"].clone()
}

both_backends! {
    async fn document_updates_bring_what_the_state_vector_lacks_then_each_update_once(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let (bob, bob_id) = server.sign_up("Bob").await;
        let channel = server.create_channel(&ada, "docs").await;
        let id = create_document(&server, &ada, &channel, "hello").await;
        let editor = Client::new();
        editor.sync(&server, &ada, &id).await;
        caught_up(&server).await;

        // One subscriber holds everything already, one holds nothing.
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        ws.subscribe("synced", UPDATES, json!({ "id": id, "sv": editor.vector() })).await;
        ws.subscribe("fresh", UPDATES, json!({ "id": id })).await;
        let (synced, fresh) = (Client::new(), Client::new());
        synced.apply(&client_state(&editor));
        let first = next_update(&mut ws, "synced").await;
        assert_eq!(first["version"], 1);
        synced.apply(first["update"].as_str().unwrap());
        assert_eq!(synced.text(), "hello", "it lacked nothing");
        let whole = next_update(&mut ws, "fresh").await;
        fresh.apply(whole["update"].as_str().unwrap());
        assert_eq!(fresh.text(), "hello");
        let resume_from = whole["cursor"].as_str().unwrap().to_owned();

        // Updates from the API and from an optimistic whole-text write, once each, in order.
        let applied = server.graphql_as(&ada, APPLY, json!({ "id": id, "u": editor.insert(5, " world") })).await;
        assert_eq!(data(&applied, "applyDocumentUpdate")["version"], 2);
        let optimistic = "mutation($id: ID!, $b: String!, $v: Int!) { updateDocument(input: { id: $id, body: $b, expectedVersion: $v }) { version } }";
        let written = server.graphql_as(&ada, optimistic, json!({ "id": id, "b": "Hello world!", "v": 2 })).await;
        assert_eq!(data(&written, "updateDocument")["version"], 3);
        // (The two subscriptions' events interleave on the socket.)
        let mut versions: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
        for _ in 0..4 {
            let message = ws.recv().await;
            assert_eq!(message["type"], "next", "{message}");
            let op = message["id"].as_str().unwrap();
            let event = &message["payload"]["data"]["documentUpdates"];
            versions.entry(op.to_owned()).or_default().push(event["version"].as_i64().unwrap());
            let client = if op == "synced" { &synced } else { &fresh };
            client.apply(event["update"].as_str().unwrap());
        }
        assert_eq!(versions["synced"], [2, 3]);
        assert_eq!(versions["fresh"], [2, 3]);
        assert_eq!(synced.text(), "Hello world!");
        assert_eq!(fresh.text(), "Hello world!");

        // Resuming after the first event replays exactly what came after it.
        ws.subscribe("resumed", UPDATES, json!({ "id": id, "after": resume_from })).await;
        let resumed = Client::new();
        resumed.apply(whole["update"].as_str().unwrap());
        for version in [2, 3] {
            let event = next_update(&mut ws, "resumed").await;
            assert_eq!(event["version"], version);
            resumed.apply(event["update"].as_str().unwrap());
        }
        assert_eq!(resumed.text(), "Hello world!");

        // Someone outside the channel gets FORBIDDEN, like for a document that does not exist.
        let mut outsider = WsClient::connect_as(&server, Some(&bob)).await;
        let refusals = [(id.as_str(), None, "FORBIDDEN"), ("999999", None, "FORBIDDEN"), (id.as_str(), Some("not a vector!"), "BAD_USER_INPUT")];
        for (document, vector, code) in refusals {
            outsider.subscribe("x", UPDATES, json!({ "id": document, "sv": vector })).await;
            let refused = outsider.next_payload("x").await;
            assert_eq!(refused["errors"][0]["extensions"]["code"], code, "{refused}");
            assert_eq!(outsider.recv().await, json!({ "type": "complete", "id": "x" }));
        }
        outsider.close().await;
        let _ = bob_id;

        // The document's deletion ends every subscription to it.
        server.sql().await.execute_unprepared(&format!("DELETE FROM documents WHERE id = {id}")).await.unwrap();
        let mut ended = Vec::new();
        for _ in 0..3 {
            let message = ws.recv().await;
            assert_eq!(message["type"], "complete", "{message}");
            ended.push(message["id"].as_str().unwrap().to_owned());
        }
        ended.sort();
        assert_eq!(ended, ["fresh", "resumed", "synced"]);
        ws.close().await;
    }

    async fn an_sql_update_of_the_body_is_folded_into_the_crdt(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "docs").await;
        let id = create_document(&server, &ada, &channel, "hello world").await;
        let (editor, stale) = (Client::new(), Client::new());
        editor.sync(&server, &ada, &id).await;
        stale.sync(&server, &ada, &id).await;
        caught_up(&server).await;
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        ws.subscribe("u", UPDATES, json!({ "id": id, "sv": editor.vector() })).await;
        next_update(&mut ws, "u").await;

        // Another SQL client rewrites the body; the editor, subscribed, gets it as an edit.
        server.sql().await.execute_unprepared(&format!("UPDATE documents SET body = 'hello brave world' WHERE id = {id}")).await.unwrap();
        let folded = next_update(&mut ws, "u").await;
        editor.apply(folded["update"].as_str().unwrap());
        assert_eq!(editor.text(), "hello brave world");
        assert_eq!(folded["version"], 2, "the version the SQL write made");

        // An edit made by a client that had not seen it, and one by the editor who had, both
        // merge with it.
        let unseen = stale.insert(0, "X");
        let seen = editor.insert(17, "!");
        for update in [unseen, seen] {
            server.graphql_as(&ada, APPLY, json!({ "id": id, "u": update })).await;
        }
        let document = Client::new().sync(&server, &ada, &id).await;
        assert_eq!(document["body"], "Xhello brave world!");
        for version in [3, 4] {
            let event = next_update(&mut ws, "u").await;
            assert_eq!(event["version"], version);
            editor.apply(event["update"].as_str().unwrap());
        }
        assert_eq!(editor.text(), "Xhello brave world!");
        ws.close().await;

        // A SQL write while nobody watches is folded too: the next editor starts from it.
        server.sql().await.execute_unprepared(&format!("UPDATE documents SET body = 'rewritten' WHERE id = {id}")).await.unwrap();
        let late = Client::new();
        let document = late.sync(&server, &ada, &id).await;
        assert_eq!(late.text(), "rewritten");
        assert_eq!(document["body"], "rewritten");
        let typed = late.insert(9, ".");
        server.graphql_as(&ada, APPLY, json!({ "id": id, "u": typed })).await;
        let document = Client::new().sync(&server, &ada, &id).await;
        assert_eq!(document["body"], "rewritten.");
    }
}

/// `client`'s whole state as an update, base64.
fn client_state(client: &Client) -> String {
    STANDARD.encode(
        client
            .doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default()),
    )
}

#[tokio::test]
async fn an_update_over_the_flag_is_refused() {
    crate::helpers::run_with(
        crate::helpers::Backend::Sqlite,
        |config| config.limits.max_document_update_bytes = 64,
        |server| async move {
            let (ada, _) = server.sign_up("Ada").await;
            let channel = server.create_channel(&ada, "docs").await;
            let id = create_document(&server, &ada, &channel, "").await;
            let client = Client::new();
            client.sync(&server, &ada, &id).await;
            let big = client.insert(0, &"x".repeat(200));
            let response = server
                .graphql_as(&ada, APPLY, json!({ "id": id, "u": big }))
                .await;
            assert_eq!(error_code(&response), "BAD_USER_INPUT", "{response}");
            assert_eq!(response["errors"][0]["extensions"]["field"], "input.update");
            let small = Client::new();
            small.sync(&server, &ada, &id).await;
            let ok = server
                .graphql_as(&ada, APPLY, json!({ "id": id, "u": small.insert(0, "hi") }))
                .await;
            assert_eq!(data(&ok, "applyDocumentUpdate")["version"], 2);
        },
    )
    .await;
}

/// The `n` a `SELECT COUNT(*) AS n ...` answers.
pub(crate) async fn count(server: &TestServer, sql: &str) -> i64 {
    server
        .sql()
        .await
        .query_one_raw(sea_orm::Statement::from_string(
            server.db.get_database_backend(),
            sql.to_owned(),
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get::<i64>("", "n")
        .unwrap()
}
