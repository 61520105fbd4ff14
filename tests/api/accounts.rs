//! Sign-up, sign-in, tokens and `me`.

use serde_json::json;

use crate::both_backends;
use crate::helpers::{data, error_code};

const SIGN_UP: &str =
    "mutation($input: SignUpInput!) { signUp(input: $input) { token user { id name email } } }";
const SIGN_IN: &str =
    "mutation($input: SignInInput!) { signIn(input: $input) { token user { id email } } }";

both_backends! {
    async fn sign_up_then_sign_in_returns_working_tokens(server: TestServer) {
        let response = server
            .graphql(SIGN_UP, json!({ "input": {
                "name": "Ada", "email": "Ada@Example.com", "password": "long enough password"
            }}))
            .await;
        let payload = data(&response, "signUp");
        assert_eq!(payload["user"]["email"], "ada@example.com");
        assert_eq!(payload["user"]["name"], "Ada");
        let id = payload["user"]["id"].as_str().unwrap().to_owned();

        let response = server
            .graphql(SIGN_IN, json!({ "input": {
                "email": "ADA@example.com", "password": "long enough password"
            }}))
            .await;
        let payload = data(&response, "signIn");
        assert_eq!(payload["user"]["id"], id.as_str());
        let token = payload["token"].as_str().unwrap();

        let me = server.graphql_as(token, "{ me { id name } }", json!({})).await;
        assert_eq!(data(&me, "me")["id"], id.as_str());

        // The password is stored as an argon2 hash, never in clear.
        let hash: String = sea_orm::ConnectionTrait::query_one_raw(
            &server.sql().await,
            sea_orm::Statement::from_string(
                server.db.get_database_backend(),
                "SELECT password_hash FROM users".to_owned(),
            ),
        )
        .await
        .unwrap()
        .unwrap()
        .try_get("", "password_hash")
        .unwrap();
        assert!(hash.starts_with("$argon2"), "{hash}");
    }

    async fn wrong_password_and_unknown_email_are_unauthenticated(server: TestServer) {
        server.sign_up("Bob").await;
        for (email, password) in [("bob@example.com", "wrong password"), ("nobody@example.com", "whatever123")] {
            let response = server
                .graphql(SIGN_IN, json!({ "input": { "email": email, "password": password }}))
                .await;
            assert_eq!(error_code(&response), "UNAUTHENTICATED");
            assert_eq!(response["errors"][0]["message"], "invalid email or password");
        }
    }

    async fn without_a_configured_secret_tokens_survive_a_restart(server: TestServer) {
        // Two servers with no JWT secret configured, one after the other, as a restart of
        // `cargo run` would be: both sign with the secret stored in the database.
        let me = |addr: std::net::SocketAddr, token: String| {
            let client = server.client().clone();
            async move {
                let response: serde_json::Value = client
                    .post(format!("http://{addr}/graphql"))
                    .bearer_auth(token)
                    .json(&json!({ "query": "{ me { name } }" }))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                response
            }
        };
        let first = server.start_peer_with_secret(None).await;
        let signed_up: serde_json::Value = server
            .client()
            .post(format!("http://{}/graphql", first.addr))
            .json(&json!({
                "query": "mutation { signUp(input: { name: \"Ada\", email: \"ada@example.com\", password: \"correct horse\" }) { token } }"
            }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let token = data(&signed_up, "signUp")["token"].as_str().unwrap().to_owned();
        first.stop().await;

        let restarted = server.start_peer_with_secret(None).await;
        let response = me(restarted.addr, token.clone()).await;
        assert_eq!(response["data"]["me"]["name"], "Ada", "{response}");
        restarted.stop().await;
        // A server configured with its own secret does not accept it.
        let response = me(server.addr, token).await;
        assert_eq!(error_code(&response), "UNAUTHENTICATED");
    }

    async fn me_is_null_without_token_and_bad_tokens_are_unauthenticated(server: TestServer) {
        let response = server.graphql("{ me { id } }", json!({})).await;
        assert_eq!(response["data"]["me"], serde_json::Value::Null);
        assert!(response.get("errors").is_none());

        for token in ["garbage", "eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0."] {
            let response = server.graphql_as(token, "{ me { id } }", json!({})).await;
            assert_eq!(error_code(&response), "UNAUTHENTICATED");
        }
        // A token signed with another secret.
        let foreign = syncgraph::auth::JwtKeys::new(b"another secret", std::time::Duration::from_secs(60))
            .issue(1)
            .unwrap();
        let response = server.graphql_as(&foreign, "{ me { id } }", json!({})).await;
        assert_eq!(error_code(&response), "UNAUTHENTICATED");
    }

    async fn protected_fields_need_a_token(server: TestServer) {
        for query in [
            "{ channels { edges { cursor } } }",
            "{ channel(id: \"1\") { id } }",
            "{ document(id: \"1\") { id } }",
            "mutation { createChannel(input: { name: \"x\" }) { id } }",
            "mutation { postMessage(input: { channelId: \"1\", body: \"x\" }) { id } }",
        ] {
            let response = server.graphql(query, json!({})).await;
            assert_eq!(error_code(&response), "UNAUTHENTICATED", "{query}");
        }
    }

    async fn sign_up_input_is_validated(server: TestServer) {
        server.sign_up("Taken").await;
        let cases = [
            (json!({ "name": "", "email": "a@example.com", "password": "long enough" }), "input.name"),
            (json!({ "name": "x".repeat(101), "email": "a@example.com", "password": "long enough" }), "input.name"),
            (json!({ "name": "A", "email": "not-an-email", "password": "long enough" }), "input.email"),
            (json!({ "name": "A", "email": "a@example.com", "password": "short" }), "input.password"),
            (json!({ "name": "A", "email": "TAKEN@example.com", "password": "long enough" }), "input.email"),
        ];
        for (input, field) in cases {
            let response = server.graphql(SIGN_UP, json!({ "input": input })).await;
            assert_eq!(error_code(&response), "BAD_USER_INPUT", "{input}");
            assert_eq!(response["errors"][0]["extensions"]["field"], field, "{response}");
            let message = response["errors"][0]["message"].as_str().unwrap();
            assert!(message.starts_with(field), "the message names the field: {message}");
        }
    }

    async fn token_of_a_deleted_user_is_unauthenticated(server: TestServer) {
        let (token, id) = server.sign_up("Gone").await;
        sea_orm::ConnectionTrait::execute_unprepared(
            &server.sql().await,
            &format!("DELETE FROM users WHERE id = {id}"),
        )
        .await
        .unwrap();
        let response = server
            .graphql_as(&token, "mutation { createChannel(input: { name: \"x\" }) { id } }", json!({}))
            .await;
        assert_eq!(error_code(&response), "UNAUTHENTICATED");
        let me = server.graphql_as(&token, "{ me { id } }", json!({})).await;
        assert_eq!(data(&me, "me"), &serde_json::Value::Null);
    }
}
