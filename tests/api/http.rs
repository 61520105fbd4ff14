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
        let body: serde_json::Value = huge.json().await.unwrap();
        assert_eq!(body["errors"][0]["extensions"]["code"], "LIMIT_EXCEEDED", "{body}");
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

    async fn pages_load_every_file_from_the_server_itself(server: TestServer) {
        // Follow each page's scripts, stylesheets and module imports: all are served here,
        // none from another host (the pages must work with no internet access).
        let mut pending = vec!["/".to_owned(), "/demo".to_owned()];
        let mut seen = std::collections::HashSet::new();
        while let Some(path) = pending.pop() {
            if !seen.insert(path.clone()) {
                continue;
            }
            let response = server.client().get(server.url(&path)).send().await.unwrap();
            assert_eq!(response.status(), 200, "{path}");
            let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
            let text = response.text().await.unwrap();
            let expected = match path.rsplit('.').next() {
                Some("js" | "mjs") => "text/javascript",
                Some("css") => "text/css",
                _ => "text/html",
            };
            assert!(content_type.starts_with(expected), "{path} is {content_type}");
            assert!(!text.contains("//unpkg.com") && !text.contains("cdn.jsdelivr"), "{path} names a CDN");
            if content_type.starts_with("text/css") {
                continue;
            }
            for reference in references(&text) {
                if reference.starts_with("data:") {
                    continue;
                }
                let reference = match reference.strip_prefix("./") {
                    Some(sibling) => format!("{}/{sibling}", path.rsplit_once('/').unwrap().0),
                    None => reference,
                };
                assert!(reference.starts_with("/assets/"), "{path} loads {reference} from elsewhere");
                pending.push(reference);
            }
        }
        for file in [
            "/assets/vendor/graphiql-3.9.0/graphiql.min.js",
            "/assets/vendor/react-18.3.1/react.production.min.js",
            "/assets/vendor/graphql-ws-6.4.2/client.js",
            "/assets/demo/app.js",
        ] {
            assert!(seen.contains(file), "{file} is loaded by a page; loaded: {seen:?}");
        }
    }

    async fn assets_are_cached_by_version_or_revalidated(server: TestServer) {
        let vendor = server.client().get(server.url("/assets/vendor/graphiql-3.9.0/graphiql.min.css")).send().await.unwrap();
        assert_eq!(vendor.status(), 200);
        assert!(vendor.headers()["cache-control"].to_str().unwrap().contains("immutable"));

        let page = server.client().get(server.url("/demo")).send().await.unwrap();
        assert_eq!(page.headers()["cache-control"], "no-cache");
        let etag = page.headers()["etag"].clone();
        let again = server.client().get(server.url("/demo")).header("if-none-match", etag).send().await.unwrap();
        assert_eq!(again.status(), 304);
        let stale = server.client().get(server.url("/demo")).header("if-none-match", "\"old\"").send().await.unwrap();
        assert_eq!(stale.status(), 200);

        for missing in ["/assets/nope.js", "/assets/../Cargo.toml", "/assets/vendor/"] {
            let response = server.client().get(server.url(missing)).send().await.unwrap();
            assert_eq!(response.status(), 404, "{missing}");
        }
    }
}

/// The files a page or module loads: `src="..."`, `href="..."` of stylesheets, and the
/// modules of `import`/`export ... from '...'` statements.
fn references(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for start in ["src=\"", "rel=\"stylesheet\" href=\""] {
        for piece in text.split(start).skip(1) {
            found.extend(piece.split('"').next().map(str::to_owned));
        }
    }
    for line in text.lines().map(str::trim_start) {
        if (line.starts_with("import ") || line.starts_with("export "))
            && let Some((_, module)) = line.split_once(" from '")
        {
            found.extend(module.split('\'').next().map(str::to_owned));
        }
    }
    found
}

/// Apollo automatic persisted queries: an unknown hash gets PERSISTED_QUERY_NOT_FOUND, the
/// hash with its text registers it, then the hash alone works, over GET too; a hash that is
/// not its text's gets BAD_USER_INPUT; a persisted mutation is still refused over GET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persisted_queries_register_by_hash_and_run_by_hash() {
    use sha2::Digest;
    crate::helpers::run(
        crate::helpers::Backend::Sqlite,
        |server: crate::helpers::TestServer| async move {
            let (token, id) = server.sign_up("Ada").await;
            let query = "query Me { me { id } }";
            let hash = format!("{:x}", sha2::Sha256::digest(query.as_bytes()));
            let persisted = json!({ "persistedQuery": { "version": 1, "sha256Hash": hash } });
            let post = |body: Value| {
                server
                    .client()
                    .post(server.url("/graphql"))
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
            };
            let get = |extensions: &Value| {
                server
                    .client()
                    .get(server.url("/graphql"))
                    .query(&[("extensions", extensions.to_string())])
                    .bearer_auth(&token)
                    .send()
            };

            let unknown: Value = get(&persisted).await.unwrap().json().await.unwrap();
            assert_eq!(
                error_code(&unknown),
                "PERSISTED_QUERY_NOT_FOUND",
                "{unknown}"
            );
            assert_eq!(unknown["errors"][0]["message"], "PersistedQueryNotFound");

            let registered: Value = post(json!({ "query": query, "extensions": persisted }))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(data(&registered, "me")["id"], id.as_str());

            let by_hash = get(&persisted).await.unwrap();
            assert_eq!(by_hash.status(), 200);
            let by_hash: Value = by_hash.json().await.unwrap();
            assert_eq!(data(&by_hash, "me")["id"], id.as_str());
            let by_hash: Value = post(json!({ "extensions": persisted }))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(data(&by_hash, "me")["id"], id.as_str());

            let wrong =
                json!({ "persistedQuery": { "version": 1, "sha256Hash": "00".repeat(32) } });
            let mismatch: Value = post(json!({ "query": query, "extensions": wrong }))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(error_code(&mismatch), "BAD_USER_INPUT", "{mismatch}");
            assert!(
                mismatch.get("data").is_none_or(Value::is_null),
                "nothing ran: {mismatch}"
            );

            let mutation = "mutation { createChannel(input: { name: \"by hash\" }) { id } }";
            let mutation_hash = format!("{:x}", sha2::Sha256::digest(mutation.as_bytes()));
            let persisted_mutation =
                json!({ "persistedQuery": { "version": 1, "sha256Hash": mutation_hash } });
            let created: Value =
                post(json!({ "query": mutation, "extensions": persisted_mutation }))
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
            assert!(created.get("errors").is_none(), "{created}");
            let refused = get(&persisted_mutation).await.unwrap();
            assert_eq!(
                refused.status(),
                405,
                "mutations are POST only, by hash too"
            );

            let metrics = server.metrics().await;
            assert!(
                metrics.contains("syncgraph_errors_total{code=\"PERSISTED_QUERY_NOT_FOUND\"} 1"),
                "{metrics}"
            );
        },
    )
    .await;
}
