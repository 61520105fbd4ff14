//! Internal errors reach clients as INTERNAL_SERVER_ERROR with nothing internal in them.

use sea_orm::ConnectionTrait;
use serde_json::json;

use crate::both_backends;
use crate::helpers::error_code;

both_backends! {
    async fn database_errors_hide_sql_and_say_internal(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "general").await;
        // Break the database behind the server's back.
        let drop = match server.backend {
            crate::helpers::Backend::Postgres => "DROP TABLE documents CASCADE",
            crate::helpers::Backend::Sqlite => "DROP TABLE documents",
        };
        server.sql().await.execute_unprepared(drop).await.unwrap();

        let response = server
            .graphql_as(&ada, "query($c: ID!) { channel(id: $c) { documents { id } } }", json!({ "c": channel }))
            .await;
        assert_eq!(error_code(&response), "INTERNAL_SERVER_ERROR");
        assert_eq!(response["errors"][0]["message"], "internal server error");
        let text = response.to_string().to_lowercase();
        for leak in ["select", "from", "no such table", "relation", "sqlx", "database error", "test-secret"] {
            assert!(!text.contains(leak), "response leaks {leak:?}: {text}");
        }
    }

    async fn client_mistakes_always_carry_a_code(server: TestServer) {
        for (query, variables) in [
            ("{ nope }", json!({})),
            ("{ channel(id: 1 { id } }", json!({})),
            ("query($id: ID!) { channel(id: $id) { id } }", json!({})),
            ("query($n: Int) { channels(first: $n) { edges { cursor } } }", json!({ "n": "ten" })),
        ] {
            let response = server.graphql(query, variables).await;
            assert_eq!(error_code(&response), "BAD_USER_INPUT", "{query}: {response}");
        }
    }
}
