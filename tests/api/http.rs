//! GraphQL over HTTP conventions, GraphiQL and health.

use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{data, error_code};

both_backends! {
    async fn get_runs_queries_but_not_mutations(server: TestServer) {
        let (token, id) = server.sign_up("Ada").await;
        let response = server
            .client()
            .get(server.url("/graphql"))
            .query(&[("query", "{ me { id } }")])
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(data(&body, "me")["id"], id.as_str());

        let response = server
            .client()
            .get(server.url("/graphql"))
            .query(&[("query", "mutation { createChannel(input: { name: \"x\" }) { id } }")])
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 405);
        assert_eq!(response.headers()["allow"], "POST");
        // Nothing was created.
        let body = server.graphql_as(&token, "{ channels { edges { cursor } } }", json!({})).await;
        assert_eq!(data(&body, "channels")["edges"], json!([]));
    }

    async fn media_types_and_status_codes_follow_graphql_over_http(server: TestServer) {
        let post = |accept: &'static str, body: &'static str| {
            server
                .client()
                .post(server.url("/graphql"))
                .header("content-type", "application/json")
                .header("accept", accept)
                .body(body)
                .send()
        };
        let ok = post("application/graphql-response+json", r#"{"query":"{ me { id } }"}"#).await.unwrap();
        assert_eq!(ok.status(), 200);
        assert_eq!(ok.headers()["content-type"], "application/graphql-response+json");

        let invalid = post("application/graphql-response+json", r#"{"query":"{ me { "}"#).await.unwrap();
        assert_eq!(invalid.status(), 400);
        let body: Value = invalid.json().await.unwrap();
        assert!(body.get("data").is_none(), "a request error has no data: {body}");
        assert_eq!(error_code(&body), "BAD_USER_INPUT");

        let legacy = post("application/json", r#"{"query":"{ me { "}"#).await.unwrap();
        assert_eq!(legacy.status(), 200);
        assert_eq!(legacy.headers()["content-type"], "application/json");

        let malformed = post("application/json", r#"{"query": "#).await.unwrap();
        assert_eq!(malformed.status(), 400);
        let body: Value = malformed.json().await.unwrap();
        assert_eq!(error_code(&body), "BAD_USER_INPUT");

        let wrong_type = server
            .client()
            .post(server.url("/graphql"))
            .header("content-type", "text/plain")
            .body("{ me { id } }")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong_type.status(), 415);

        let huge = server
            .client()
            .post(server.url("/graphql"))
            .header("content-type", "application/json")
            .body(format!(r#"{{"query":"{}"}}"#, " ".repeat(1024 * 1024 + 1024)))
            .send()
            .await
            .unwrap();
        assert_eq!(huge.status(), 413);
    }

    async fn graphiql_and_health_are_served(server: TestServer) {
        for path in ["/", "/graphiql"] {
            let response = server.client().get(server.url(path)).send().await.unwrap();
            assert_eq!(response.status(), 200);
            let html = response.text().await.unwrap();
            assert!(html.to_lowercase().contains("graphiql"), "{path} serves GraphiQL");
        }
        let health = server.client().get(server.url("/healthz")).send().await.unwrap();
        assert_eq!(health.status(), 200);
    }
}
