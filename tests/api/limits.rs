//! Limits: each configurable, each answered with a coded error (or close code), never a
//! crash, and the connection or server keeps working afterwards.

use serde_json::json;

use crate::helpers::{Backend, TestServer, data, error_code, run_with};
use crate::subscriptions::MESSAGE_EVENTS;
use crate::ws_client::{WsClient, wait_for_subscribers, wait_for_subscribers_at_most};

/// The introspection query GraphiQL and most tools send (graphql-js's
/// `getIntrospectionQuery()`).
const INTROSPECTION: &str = include_str!("introspection.graphql");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_limits_admit_the_standard_introspection_query() {
    run_with(
        Backend::Sqlite,
        |_| {},
        |server: TestServer| async move {
            let response = server.graphql(INTROSPECTION, json!({})).await;
            assert!(response.get("errors").is_none(), "{response}");
            assert!(response["data"]["__schema"]["types"].is_array());
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_or_complex_operations_are_refused() {
    fn small(config: &mut syncgraph::config::Config) {
        config.limits.max_query_depth = 5;
        config.limits.max_query_complexity = 50;
    }
    run_with(Backend::Sqlite, small, |server: TestServer| async move {
        let (ada, _) = server.sign_up("Ada").await;
        let deep =
            "{ channels(first: 1) { edges { node { messages(last: 1) { edges { node { author { name } } } } } } } }";
        let response = server.graphql_as(&ada, deep, json!({})).await;
        assert_eq!(error_code(&response), "BAD_USER_INPUT", "{response}");
        assert!(
            response["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("nested too deep")
        );
        assert!(
            response.get("data").is_none_or(|d| d.is_null()),
            "nothing ran: {response}"
        );

        // Aliases multiply work: each one counts.
        let aliases: String = (0..60).map(|i| format!("a{i}: me {{ id }} ")).collect();
        let response = server
            .graphql_as(&ada, &format!("{{ {aliases} }}"), json!({}))
            .await;
        assert_eq!(error_code(&response), "BAD_USER_INPUT", "{response}");
        assert!(
            response["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("too complex")
        );

        // Within the limits all is well.
        let response = server.graphql_as(&ada, "{ me { name } }", json!({})).await;
        assert_eq!(data(&response, "me")["name"], "Ada");
    })
    .await;
}

/// `__typename` counts like any field (async-graphql's own check skips it), pages multiply
/// it, and a document whose fragments spread each other exponentially is refused without
/// being expanded (20 such levels took async-graphql's check a second; these 30 would take
/// about 17 minutes, so this test would time out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typename_bombs_and_fragment_bombs_are_refused_at_the_default_limits() {
    run_with(Backend::Sqlite, |_| {}, |server: TestServer| async move {
        let (ada, _) = server.sign_up("Ada").await;
        let aliases: String = (0..5_000).map(|i| format!("a{i}: __typename ")).collect();
        let in_a_page: String = (0..100).map(|i| format!("t{i}: __typename ")).collect();
        let mut chain = String::from("{ ...F0 }");
        // (async-graphql's parser refuses more than 32 levels of nesting on its own.)
        for i in 0..30 {
            chain.push_str(&format!(" fragment F{i} on QueryRoot {{ ...F{} ...F{} }}", i + 1, i + 1));
        }
        chain.push_str(" fragment F30 on QueryRoot { __typename }");
        for bomb in [
            format!("{{ {aliases} }}"),
            format!("{{ channels(first: 50) {{ edges {{ node {{ {in_a_page} }} }} }} }}"),
            chain,
        ] {
            let response = server.graphql_as(&ada, &bomb, json!({})).await;
            assert_eq!(error_code(&response), "BAD_USER_INPUT", "{response}");
            assert_eq!(response["errors"][0]["message"], "Query is too complex.", "{response}");
            assert!(response.get("data").is_none_or(|d| d.is_null()), "nothing ran: {response}");
        }
        // A chain of 5,000 fragments, each spreading the next, is refused (nested too deep)
        // rather than followed to the end of the stack.
        let mut long = String::from("{ ...L0 }");
        for i in 0..5_000 {
            long.push_str(&format!(" fragment L{i} on QueryRoot {{ ...L{} }}", i + 1));
        }
        long.push_str(" fragment L5000 on QueryRoot { __typename }");
        let response = server.graphql_as(&ada, &long, json!({})).await;
        assert_eq!(error_code(&response), "BAD_USER_INPUT", "{response}");
        // Apollo Client's habit, a `__typename` in every selection, stays well within them.
        let response = server
            .graphql_as(&ada, "{ __typename me { __typename id } channels(first: 20) { __typename edges { __typename node { __typename id } } } }", json!({}))
            .await;
        assert!(response.get("errors").is_none(), "{response}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_pages_count_by_their_size_at_the_default_limits() {
    run_with(Backend::Sqlite, |_| {}, |server: TestServer| async move {
        let (ada, _) = server.sign_up("Ada").await;
        // Cheap to write, up to 100 x 100 messages to read: refused before it runs.
        let wide = "{ channels(first: 100) { edges { node { messages(last: 100) { edges { node { author { name } } } } } } } }";
        let response = server.graphql_as(&ada, wide, json!({})).await;
        assert_eq!(error_code(&response), "BAD_USER_INPUT", "{response}");
        assert!(response["errors"][0]["message"].as_str().unwrap().contains("too complex"));
        // What the demo asks for a channel stays well within them.
        let demo = "{ feedCursor channels(first: 100) { edges { node { id name } } } }";
        let response = server.graphql_as(&ada, demo, json!({})).await;
        assert!(response.get("errors").is_none(), "{response}");
        let page = "query($c: ID!) { channel(id: $c) { members { id name } messages(last: 50) { edges { node { id body version createdAt author { id name } } } } documents { id title body version updatedAt } } }";
        let response = server.graphql_as(&ada, page, json!({ "c": "1" })).await;
        assert!(response.get("errors").is_none(), "{response}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_can_be_switched_off() {
    fn off(config: &mut syncgraph::config::Config) {
        config.limits.introspection = false;
    }
    run_with(Backend::Sqlite, off, |server: TestServer| async move {
        let response = server
            .graphql("{ __schema { types { name } } }", json!({}))
            .await;
        // Refused with a code and nothing run, not a silent null.
        assert_eq!(
            crate::helpers::error_code(&response),
            "FORBIDDEN",
            "{response}"
        );
        assert!(response.get("data").is_none(), "{response}");
        let through_fragment = server
            .graphql(
                "query { ...F } fragment F on QueryRoot { __type(name: \"User\") { name } }",
                json!({}),
            )
            .await;
        assert_eq!(
            crate::helpers::error_code(&through_fragment),
            "FORBIDDEN",
            "{through_fragment}"
        );
        let typename = server.graphql("{ __typename }", json!({})).await;
        assert_eq!(typename["data"]["__typename"], "QueryRoot", "{typename}");
        let response = server.graphql("{ me { id } }", json!({})).await;
        assert!(response.get("errors").is_none(), "{response}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_message_over_the_limit_closes_with_1009() {
    fn small(config: &mut syncgraph::config::Config) {
        config.limits.max_ws_message_bytes = 2_048;
    }
    run_with(Backend::Sqlite, small, |server: TestServer| async move {
        let (ada, _) = server.sign_up("Ada").await;
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        let padding = "x".repeat(4_096);
        ws.send(json!({ "type": "ping", "payload": { "padding": padding } }))
            .await;
        assert_eq!(
            ws.expect_close().await,
            (1009, "Message too big".to_owned())
        );
        // The server goes on.
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        ws.subscribe("me", "{ me { name } }", json!({})).await;
        assert_eq!(ws.next_payload("me").await["data"]["me"]["name"], "Ada");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_per_connection_are_limited() {
    fn two(config: &mut syncgraph::config::Config) {
        config.limits.max_operations_per_connection = 2;
    }
    run_with(Backend::Sqlite, two, |server: TestServer| async move {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "ops").await;
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        ws.subscribe("1", MESSAGE_EVENTS, json!({ "c": channel }))
            .await;
        ws.subscribe("2", MESSAGE_EVENTS, json!({ "c": channel }))
            .await;
        wait_for_subscribers(&server.broker, &channel, 2).await;
        ws.subscribe("3", MESSAGE_EVENTS, json!({ "c": channel }))
            .await;
        let refused = ws.recv().await;
        assert_eq!(refused["type"], "error", "{refused}");
        assert_eq!(refused["id"], "3");
        assert_eq!(
            refused["payload"][0]["extensions"]["code"],
            "LIMIT_EXCEEDED"
        );
        // Completing one makes room on the same connection.
        ws.complete("1").await;
        wait_for_subscribers_at_most(&server, &channel, 1).await;
        ws.subscribe("3", MESSAGE_EVENTS, json!({ "c": channel }))
            .await;
        wait_for_subscribers(&server.broker, &channel, 2).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_size_and_body_size_follow_their_settings() {
    fn small(config: &mut syncgraph::config::Config) {
        config.limits.max_page_size = 5;
        config.limits.max_body_bytes = 4_096;
    }
    run_with(Backend::Sqlite, small, |server: TestServer| async move {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "pages").await;
        for i in 0..7 {
            server.post_message(&ada, &channel, &format!("m{i}")).await;
        }
        let page = "query($c: ID!, $n: Int) { channel(id: $c) { messages(first: $n) { edges { node { body } } } } }";
        let five = server.graphql_as(&ada, page, json!({ "c": channel, "n": 5 })).await;
        let edges = data(&five, "channel")["messages"]["edges"].as_array().unwrap().len();
        assert_eq!(edges, 5, "{five}");
        let six = server.graphql_as(&ada, page, json!({ "c": channel, "n": 6 })).await;
        assert_eq!(error_code(&six), "BAD_USER_INPUT", "{six}");
        assert!(six.to_string().contains("between 0 and 5"), "{six}");
        // With neither first nor last, the page is the default 20 cut to the limit.
        let default = server
            .graphql_as(&ada, "query($c: ID!) { channel(id: $c) { messages { edges { node { body } } } } channels { edges { node { id } } } }", json!({ "c": channel }))
            .await;
        assert_eq!(data(&default, "channel")["messages"]["edges"].as_array().unwrap().len(), 5, "{default}");
        let channels = server
            .graphql_as(&ada, "{ channels(first: 6) { edges { node { id } } } }", json!({}))
            .await;
        assert_eq!(error_code(&channels), "BAD_USER_INPUT", "{channels}");

        let post = |body: String| {
            server
                .client()
                .post(server.url("/graphql"))
                .header("content-type", "application/json")
                .body(body)
                .send()
        };
        let padded = |size: usize| format!(r#"{{"query":"{{ __typename }}{}"}}"#, " ".repeat(size));
        let fits = post(padded(3_000)).await.unwrap();
        assert_eq!(fits.status(), 200);
        let over = post(padded(5_000)).await.unwrap();
        assert_eq!(over.status(), 413);
        let over: serde_json::Value = over.json().await.unwrap();
        assert_eq!(over["errors"][0]["extensions"]["code"], "LIMIT_EXCEEDED", "{over}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_maximum_get_503() {
    fn two(config: &mut syncgraph::config::Config) {
        config.limits.max_connections = 2;
    }
    run_with(Backend::Sqlite, two, |server: TestServer| async move {
        let (ada, _) = server.sign_up("Ada").await;
        let first = WsClient::connect_as(&server, Some(&ada)).await;
        let _second = WsClient::connect_as(&server, Some(&ada)).await;
        match WsClient::try_connect(server.addr, "graphql-transport-ws").await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 503);
            }
            Err(other) => panic!("expected 503, got {other}"),
            Ok(_) => panic!("a third connection was accepted"),
        }
        let metrics = server.metrics().await;
        assert!(
            metrics.contains("syncgraph_errors_total{code=\"LIMIT_EXCEEDED\"} 1"),
            "the refusal is counted: {metrics}"
        );
        // A closed connection frees its place.
        first.close().await;
        let deadline = tokio::time::Instant::now() + crate::helpers::TIMEOUT;
        loop {
            if WsClient::try_connect(server.addr, "graphql-transport-ws")
                .await
                .is_ok()
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the place is freed in time"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_per_user_are_limited() {
    fn two(config: &mut syncgraph::config::Config) {
        config.limits.max_subscriptions_per_user = 2;
    }
    run_with(Backend::Sqlite, two, |server: TestServer| async move {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "subs").await;
        // Across connections: the limit is per user.
        let mut first = WsClient::connect_as(&server, Some(&ada)).await;
        first
            .subscribe("1", MESSAGE_EVENTS, json!({ "c": channel }))
            .await;
        let mut second = WsClient::connect_as(&server, Some(&ada)).await;
        second
            .subscribe("1", MESSAGE_EVENTS, json!({ "c": channel }))
            .await;
        wait_for_subscribers(&server.broker, &channel, 2).await;
        let mut third = WsClient::connect_as(&server, Some(&ada)).await;
        third
            .subscribe("1", MESSAGE_EVENTS, json!({ "c": channel }))
            .await;
        let refused = third.next_payload("1").await;
        assert_eq!(
            refused["errors"][0]["extensions"]["code"], "LIMIT_EXCEEDED",
            "{refused}"
        );
        assert_eq!(third.recv().await, json!({ "type": "complete", "id": "1" }));
        // Ending one frees a slot: a new subscription then starts (no LIMIT_EXCEEDED) and
        // receives what is posted.
        first.complete("1").await;
        wait_for_subscribers_at_most(&server, &channel, 1).await;
        let deadline = tokio::time::Instant::now() + crate::helpers::TIMEOUT;
        while server.broker.streaming_count() > 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the first stream ends in time"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        third
            .subscribe("2", MESSAGE_EVENTS, json!({ "c": channel }))
            .await;
        wait_for_subscribers(&server.broker, &channel, 2).await;
        while server.broker.streaming_count() < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the new stream starts in time"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        server
            .post_message(&ada, &channel, "after the slot was freed")
            .await;
        let delivered = third.next_payload("2").await;
        assert_eq!(
            delivered["data"]["messageEvents"]["message"]["body"], "after the slot was freed",
            "{delivered}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_attempts_per_address_are_rate_limited() {
    fn three(config: &mut syncgraph::config::Config) {
        config.limits.auth_attempts_per_minute = 3;
    }
    run_with(Backend::Sqlite, three, |server: TestServer| async move {
        let sign_in = "mutation { signIn(input: { email: \"nobody@example.com\", password: \"wrong password\" }) { token } }";
        for _ in 0..3 {
            let response = server.graphql(sign_in, json!({})).await;
            assert_eq!(error_code(&response), "UNAUTHENTICATED", "{response}");
        }
        let response = server.graphql(sign_in, json!({})).await;
        assert_eq!(error_code(&response), "RATE_LIMITED", "{response}");
        let retry_after = response["errors"][0]["extensions"]["retryAfter"].as_u64().unwrap();
        assert!((1..=20).contains(&retry_after), "{response}");
        // signUp draws on the same allowance; other operations do not.
        let sign_up = "mutation { signUp(input: { name: \"Eve\", email: \"eve@example.com\", password: \"correct horse\" }) { token } }";
        let response = server.graphql(sign_up, json!({})).await;
        assert_eq!(error_code(&response), "RATE_LIMITED", "{response}");
        let response = server.graphql("{ me { id } }", json!({})).await;
        assert!(response.get("errors").is_none(), "{response}");
    })
    .await;
}

/// At the default per-user limit, one user's many clients (tabs, devices, a dashboard's
/// service account) all subscribe: 150 graphql-ws connections of one user, one subscription
/// each, all receive the next message (the old default of 100 refused the 101st).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_per_user_limit_admits_a_user_with_many_clients() {
    fn default_quota(config: &mut syncgraph::config::Config) {
        config.limits.max_subscriptions_per_user =
            syncgraph::config::Limits::DEFAULT.max_subscriptions_per_user;
    }
    run_with(
        Backend::Sqlite,
        default_quota,
        |server: TestServer| async move {
            const CLIENTS: usize = 150;
            let (ada, _) = server.sign_up("Ada").await;
            let channel = server.create_channel(&ada, "everywhere").await;
            let mut clients = Vec::new();
            for _ in 0..CLIENTS {
                let mut client = WsClient::connect_as(&server, Some(&ada)).await;
                client
                    .subscribe("1", MESSAGE_EVENTS, json!({ "c": channel }))
                    .await;
                clients.push(client);
            }
            wait_for_subscribers(&server.broker, &channel, CLIENTS).await;
            crate::ws_client::wait_for_streams(&server.broker, CLIENTS).await;
            server.post_message(&ada, &channel, "to every tab").await;
            for client in &mut clients {
                let payload = client.next_payload("1").await;
                assert_eq!(
                    payload["data"]["messageEvents"]["message"]["body"], "to every tab",
                    "{payload}"
                );
            }
        },
    )
    .await;
}
