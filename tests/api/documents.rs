//! Shared documents: create, read, optimistic updates.

use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{data, error_code};

const CREATE: &str = "mutation($c: ID!, $t: String!, $b: String!) { createDocument(input: { channelId: $c, title: $t, body: $b }) { id channelId title body version updatedAt } }";
const UPDATE: &str = "mutation($id: ID!, $t: String, $b: String, $v: Int!) { updateDocument(input: { id: $id, title: $t, body: $b, expectedVersion: $v }) { id title body version } }";

both_backends! {
    async fn members_create_read_and_update_documents(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let (bob, bob_id) = server.sign_up("Bob").await;
        let (eve, _) = server.sign_up("Eve").await;
        let channel = server.create_channel(&ada, "docs").await;
        server.add_member(&ada, &channel, &bob_id).await;

        let created = server.graphql_as(&ada, CREATE, json!({ "c": channel, "t": "Plan", "b": "" })).await;
        let document = data(&created, "createDocument");
        assert_eq!(document["version"], 1);
        assert_eq!(document["channelId"], channel.as_str());
        let id = document["id"].as_str().unwrap().to_owned();

        let updated = server.graphql_as(&bob, UPDATE, json!({ "id": id, "b": "step 1", "v": 1 })).await;
        assert_eq!(data(&updated, "updateDocument")["body"], "step 1");
        assert_eq!(data(&updated, "updateDocument")["title"], "Plan");
        assert_eq!(data(&updated, "updateDocument")["version"], 2);

        // Ada saves on top of version 1: Bob saved first.
        let conflict = server.graphql_as(&ada, UPDATE, json!({ "id": id, "t": "Plan B", "v": 1 })).await;
        assert_eq!(error_code(&conflict), "CONFLICT");
        assert_eq!(conflict["errors"][0]["extensions"]["currentVersion"], 2);

        let read = server.graphql_as(&ada, "query($id: ID!) { document(id: $id) { title body version } }", json!({ "id": id })).await;
        assert_eq!(data(&read, "document"), &json!({ "title": "Plan", "body": "step 1", "version": 2 }));

        let listed = server.graphql_as(&ada, "query($c: ID!) { channel(id: $c) { documents { id } } }", json!({ "c": channel })).await;
        assert_eq!(data(&listed, "channel")["documents"], json!([{ "id": id }]));

        // Eve is no member: the document does not exist for her and she cannot write.
        let read = server.graphql_as(&eve, "query($id: ID!) { document(id: $id) { id } }", json!({ "id": id })).await;
        assert_eq!(read["data"]["document"], Value::Null);
        let write = server.graphql_as(&eve, UPDATE, json!({ "id": id, "b": "mine", "v": 2 })).await;
        assert_eq!(error_code(&write), "FORBIDDEN");
        let create = server.graphql_as(&eve, CREATE, json!({ "c": channel, "t": "Spam", "b": "" })).await;
        assert_eq!(error_code(&create), "FORBIDDEN");
    }

    async fn document_input_is_validated(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "docs").await;
        for (title, body, field) in [
            ("".to_owned(), "".to_owned(), "input.title"),
            ("t".repeat(201), "".to_owned(), "input.title"),
            ("ok".to_owned(), "b".repeat(100_001), "input.body"),
        ] {
            let response = server.graphql_as(&ada, CREATE, json!({ "c": channel, "t": title, "b": body })).await;
            assert_eq!(error_code(&response), "BAD_USER_INPUT");
            assert_eq!(response["errors"][0]["extensions"]["field"], field);
        }
        let created = server.graphql_as(&ada, CREATE, json!({ "c": channel, "t": "ok", "b": "" })).await;
        let id = data(&created, "createDocument")["id"].clone();
        let response = server.graphql_as(&ada, UPDATE, json!({ "id": id, "v": 1 })).await;
        assert_eq!(error_code(&response), "BAD_USER_INPUT");
        let response = server.graphql_as(&ada, UPDATE, json!({ "id": "x", "b": "y", "v": 1 })).await;
        assert_eq!(response["errors"][0]["extensions"]["field"], "input.id");
    }
}
