//! Channels, membership and the `channels` connection.

use serde_json::json;

use crate::both_backends;
use crate::helpers::{data, error_code};

both_backends! {
    async fn creator_is_member_and_can_add_others(server: TestServer) {
        let (ada, ada_id) = server.sign_up("Ada").await;
        let (bob, bob_id) = server.sign_up("Bob").await;
        let channel = server.create_channel(&ada, "general").await;

        // Bob is not a member yet: the channel is invisible to him.
        let response = server
            .graphql_as(&bob, "query($id: ID!) { channel(id: $id) { id } }", json!({ "id": channel }))
            .await;
        assert_eq!(data(&response, "channel"), &serde_json::Value::Null);

        server.add_member(&ada, &channel, &bob_id).await;
        // Adding again changes nothing.
        server.add_member(&ada, &channel, &bob_id).await;

        let response = server
            .graphql_as(
                &bob,
                "query($id: ID!) { channel(id: $id) { id name members { id name } } }",
                json!({ "id": channel }),
            )
            .await;
        let channel_json = data(&response, "channel");
        assert_eq!(channel_json["name"], "general");
        let members: Vec<&str> = channel_json["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(members, vec![ada_id.as_str(), bob_id.as_str()]);
    }

    async fn only_members_may_add_members(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let (mallory, mallory_id) = server.sign_up("Mallory").await;
        let channel = server.create_channel(&ada, "private").await;
        let query = "mutation($c: ID!, $u: ID!) { addChannelMember(input: { channelId: $c, userId: $u }) { id } }";

        let response = server
            .graphql_as(&mallory, query, json!({ "c": channel, "u": mallory_id }))
            .await;
        assert_eq!(error_code(&response), "FORBIDDEN");

        let response = server.graphql_as(&ada, query, json!({ "c": channel, "u": "999999" })).await;
        assert_eq!(error_code(&response), "NOT_FOUND");

        let response = server.graphql_as(&ada, query, json!({ "c": "999999", "u": mallory_id })).await;
        assert_eq!(error_code(&response), "NOT_FOUND");

        let response = server.graphql_as(&ada, query, json!({ "c": "abc", "u": mallory_id })).await;
        assert_eq!(error_code(&response), "BAD_USER_INPUT");
        assert_eq!(response["errors"][0]["extensions"]["field"], "input.channelId");
    }

    async fn channels_lists_only_the_viewers_channels_page_by_page(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let (bob, _) = server.sign_up("Bob").await;
        let mut mine = Vec::new();
        for i in 0..5 {
            mine.push(server.create_channel(&ada, &format!("ada-{i}")).await);
            server.create_channel(&bob, &format!("bob-{i}")).await;
        }
        let query = "query($after: String) { channels(first: 2, after: $after) { edges { cursor node { id name } } pageInfo { hasNextPage hasPreviousPage endCursor } } }";
        let mut seen = Vec::new();
        let mut after = serde_json::Value::Null;
        let mut pages = 0;
        loop {
            let response = server.graphql_as(&ada, query, json!({ "after": after })).await;
            let connection = data(&response, "channels");
            for edge in connection["edges"].as_array().unwrap() {
                assert!(edge["node"]["name"].as_str().unwrap().starts_with("ada-"));
                seen.push(edge["node"]["id"].as_str().unwrap().to_owned());
            }
            assert_eq!(connection["pageInfo"]["hasPreviousPage"], pages > 0);
            pages += 1;
            if connection["pageInfo"]["hasNextPage"] == false {
                break;
            }
            after = connection["pageInfo"]["endCursor"].clone();
            assert!(pages < 10, "pagination does not end");
        }
        assert_eq!(seen, mine);
        assert_eq!(pages, 3);

        let response = server
            .graphql_as(&ada, "{ channels(first: 101) { edges { cursor } } }", json!({}))
            .await;
        assert_eq!(error_code(&response), "BAD_USER_INPUT");
        assert_eq!(response["errors"][0]["extensions"]["field"], "first");
    }

    async fn channel_names_are_validated(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        for name in ["", "   ", &"x".repeat(101)] {
            let response = server
                .graphql_as(&ada, "mutation($n: String!) { createChannel(input: { name: $n }) { id } }", json!({ "n": name }))
                .await;
            assert_eq!(error_code(&response), "BAD_USER_INPUT");
            assert_eq!(response["errors"][0]["extensions"]["field"], "input.name");
        }
    }

    async fn members_and_documents_of_a_channel_page_load_in_one_batch_each(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let (_, bob_id) = server.sign_up("Bob").await;
        for i in 0..6 {
            let channel = server.create_channel(&ada, &format!("c{i}")).await;
            server.add_member(&ada, &channel, &bob_id).await;
        }
        let query = "query($n: Int) { channels(first: $n) { edges { node { members { name } documents { id } } } } }";
        let mut counts = Vec::new();
        for n in [2, 6] {
            let before = server.statements.get();
            let response = server.graphql_as(&ada, query, json!({ "n": n })).await;
            let edges = data(&response, "channels")["edges"].as_array().unwrap().clone();
            assert_eq!(edges.len(), n);
            assert!(edges.iter().all(|e| e["node"]["members"].as_array().unwrap().len() == 2));
            counts.push(server.statements.get() - before);
        }
        // channel page + one members batch + one documents batch.
        assert_eq!(counts, vec![3, 3], "statements for 2 and 6 channels");
    }
}
