//! The WebSocket protocols, message by message: graphql-transport-ws as the graphql-ws
//! library's own server behaves (close codes, ping/pong, errors, complete), and the legacy
//! subscriptions-transport-ws.

use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::both_backends;
use crate::helpers::TestServer;
use crate::subscriptions::{MESSAGE_EVENTS, event};
use crate::ws_client::{
    Frame, WsClient, caught_up, wait_for_subscribers, wait_for_subscribers_at_most,
};

/// RFC 6455 section 5.5.1: the server answers a client's close with a close carrying the
/// client's code (graphql-ws's `dispose()` and a closing browser tab then see `wasClean`, not
/// 1006), on both protocols, before and after connection_init and with an operation running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_close_is_answered_with_its_own_code() {
    crate::helpers::run(crate::helpers::Backend::Sqlite, |server: TestServer| async move {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "closing").await;
        for protocol in ["graphql-transport-ws", "graphql-ws"] {
            let ws = WsClient::try_connect(server.addr, protocol).await.unwrap();
            let (answer, clean) = ws.close_with(4321, "bye").await;
            assert!(matches!(&answer, Frame::Close((4321, reason)) if reason == "bye"), "{protocol}: {answer:?}");
            assert!(clean, "{protocol}: the socket ends without a reset");

            let mut ws = WsClient::try_connect(server.addr, protocol).await.unwrap();
            let init = json!({ "type": "connection_init", "payload": { "authorization": format!("Bearer {ada}") } });
            ws.send(init).await;
            assert_eq!(ws.recv().await["type"], "connection_ack");
            let start = if protocol == "graphql-ws" { "start" } else { "subscribe" };
            ws.send(json!({ "type": start, "id": "1", "payload": { "query": MESSAGE_EVENTS, "variables": { "c": channel } } })).await;
            wait_for_subscribers(&server.broker, &channel, 1).await;
            let (answer, clean) = ws.close_with(1000, "").await;
            assert!(matches!(&answer, Frame::Close((1000, _))), "{protocol}: {answer:?}");
            assert!(clean, "{protocol}: the socket ends without a reset");
            wait_for_subscribers_at_most(&server, &channel, 0).await;
        }
    })
    .await;
}

both_backends! {
    async fn invalid_messages_close_with_4400(server: TestServer) {
        for bad in [
            Message::Text("not json".into()),
            Message::Text(r#"{"type":"unknown"}"#.into()),
            Message::Text(r#"{"type":"subscribe","payload":{"query":"{ me { id } }"}}"#.into()),
            Message::Binary(vec![1, 2, 3].into()),
        ] {
            let mut ws = WsClient::connect(&server).await;
            ws.init(None).await;
            ws.send_raw(bad).await;
            assert_eq!(ws.expect_close().await.0, 4400);
        }
    }

    async fn subscribe_before_ack_closes_with_4401(server: TestServer) {
        let mut ws = WsClient::connect(&server).await;
        ws.subscribe("1", "{ me { id } }", json!({})).await;
        assert_eq!(ws.expect_close().await, (4401, "Unauthorized".to_owned()));
    }

    async fn no_connection_init_in_time_closes_with_4408(server: TestServer) {
        // Test servers wait 500 ms for connection_init.
        let mut ws = WsClient::connect(&server).await;
        assert_eq!(
            ws.expect_close().await,
            (4408, "Connection initialisation timeout".to_owned())
        );
    }

    async fn a_duplicate_operation_id_closes_with_4409(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "dup").await;
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        ws.subscribe("same", MESSAGE_EVENTS, json!({ "c": channel })).await;
        ws.subscribe("same", MESSAGE_EVENTS, json!({ "c": channel })).await;
        assert_eq!(
            ws.expect_close().await,
            (4409, "Subscriber for same already exists".to_owned())
        );
    }

    async fn a_second_connection_init_closes_with_4429(server: TestServer) {
        let mut ws = WsClient::connect_as(&server, None).await;
        ws.send(json!({ "type": "connection_init" })).await;
        assert_eq!(
            ws.expect_close().await,
            (4429, "Too many initialisation requests".to_owned())
        );
    }

    async fn a_bad_token_closes_with_4403(server: TestServer) {
        let mut ws = WsClient::connect(&server).await;
        ws.send(json!({ "type": "connection_init", "payload": { "authorization": "Bearer nope" } })).await;
        assert_eq!(ws.expect_close().await, (4403, "Forbidden".to_owned()));
    }

    async fn an_expiring_token_closes_its_socket_with_4403(server: TestServer) {
        let (ada, ada_id) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "expiring").await;
        // A token of the server's own secret that expires two seconds from now.
        let short = syncgraph::auth::JwtKeys::new(b"test-secret", std::time::Duration::from_secs(2))
            .issue(ada_id.parse().unwrap())
            .unwrap();
        let mut ws = WsClient::connect(&server).await;
        ws.init(Some(&short)).await;
        ws.subscribe("1", MESSAGE_EVENTS, json!({ "c": channel })).await;
        wait_for_subscribers(&server.broker, &channel, 1).await;
        assert_eq!(ws.expect_close().await, (4403, "Token expired".to_owned()));
        // A token a minute past its expiry (beyond the 5 s leeway) is refused at
        // connection_init.
        let now = jsonwebtoken::get_current_timestamp();
        let expired = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &json!({ "sub": ada_id, "iat": now - 120, "exp": now - 60 }),
            &jsonwebtoken::EncodingKey::from_secret(b"test-secret"),
        )
        .unwrap();
        let mut ws = WsClient::connect(&server).await;
        ws.send(json!({ "type": "connection_init", "payload": { "authorization": format!("Bearer {expired}") } })).await;
        assert_eq!(ws.expect_close().await, (4403, "Forbidden".to_owned()));
    }

    async fn forged_tokens_are_refused_on_the_socket(server: TestServer) {
        use base64::Engine as _;
        let (_, ada_id) = server.sign_up("Ada").await;
        let b64 = |value: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
        };
        let exp = jsonwebtoken::get_current_timestamp() + 3600;
        let claims = json!({ "sub": ada_id, "iat": exp - 3600, "exp": exp });
        let unsigned = format!("{}.{}.", b64(json!({ "alg": "none", "typ": "JWT" })), b64(claims.clone()));
        let other_algorithm = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"test-secret"),
        )
        .unwrap();
        let other_secret = syncgraph::auth::JwtKeys::new(b"another secret", std::time::Duration::from_secs(60))
            .issue(ada_id.parse().unwrap())
            .unwrap();
        for token in [unsigned, other_algorithm, other_secret] {
            let mut ws = WsClient::connect(&server).await;
            ws.send(json!({ "type": "connection_init", "payload": { "authorization": format!("Bearer {token}") } })).await;
            assert_eq!(ws.expect_close().await, (4403, "Forbidden".to_owned()), "{token}");
            let http = server.graphql_as(&token, "{ me { id } }", json!({})).await;
            assert_eq!(crate::helpers::error_code(&http), "UNAUTHENTICATED", "{token}");
        }
    }

    async fn the_token_key_may_have_any_letter_case(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let mut ws = WsClient::connect(&server).await;
        ws.send(json!({ "type": "connection_init", "payload": { "Authorization": format!("Bearer {ada}") } })).await;
        assert_eq!(ws.recv().await["type"], "connection_ack");
        ws.subscribe("me", "{ me { name } }", json!({})).await;
        assert_eq!(ws.next_payload("me").await["data"]["me"]["name"], "Ada");
        assert_eq!(ws.recv().await, json!({ "type": "complete", "id": "me" }));
    }

    async fn ping_gets_pong_and_the_server_pings(server: TestServer) {
        let mut ws = WsClient::connect(&server).await;
        // Ping works before the ack too.
        ws.send(json!({ "type": "ping", "payload": { "at": 1 } })).await;
        assert_eq!(ws.recv_raw().await, json!({ "type": "pong", "payload": { "at": 1 } }));
        ws.init(None).await;
        // Test servers ping every second.
        assert_eq!(ws.recv_raw().await, json!({ "type": "ping" }));
        ws.send(json!({ "type": "pong" })).await;
    }

    async fn an_invalid_operation_gets_error_and_the_socket_stays_open(server: TestServer) {
        let mut ws = WsClient::connect_as(&server, None).await;
        ws.subscribe("bad", "subscription { nope }", json!({})).await;
        let message = ws.recv().await;
        assert_eq!(message["type"], "error", "{message}");
        assert_eq!(message["id"], "bad");
        assert_eq!(message["payload"][0]["extensions"]["code"], "BAD_USER_INPUT");
        ws.subscribe("syntax", "subscription {", json!({})).await;
        assert_eq!(ws.recv().await["type"], "error");
        // The id of a failed operation may be used again; queries work over the socket.
        ws.subscribe("bad", "{ me { id } }", json!({})).await;
        let payload = ws.next_payload("bad").await;
        assert_eq!(payload, json!({ "data": { "me": null } }));
        assert_eq!(ws.recv().await, json!({ "type": "complete", "id": "bad" }));
    }

    async fn complete_from_the_client_stops_the_operation(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "stop").await;
        caught_up(&server).await;
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        ws.subscribe("a", MESSAGE_EVENTS, json!({ "c": channel })).await;
        ws.subscribe("b", MESSAGE_EVENTS, json!({ "c": channel })).await;
        wait_for_subscribers(&server.broker, &channel, 2).await;
        ws.complete("a").await;
        wait_for_subscribers_at_most(&server, &channel, 1).await;
        server.post_message(&ada, &channel, "only b").await;
        // Only `b` receives it; nothing arrives for `a`.
        let message = ws.recv().await;
        assert_eq!(message["id"], "b", "{message}");
        assert_eq!(event(&message["payload"])["message"]["body"], "only b");
        ws.send(json!({ "type": "ping" })).await;
        assert_eq!(ws.recv().await["type"], "pong");
        // The completed id may be reused.
        ws.subscribe("a", MESSAGE_EVENTS, json!({ "c": channel })).await;
        wait_for_subscribers(&server.broker, &channel, 2).await;
    }

    async fn a_second_legacy_connection_init_closes_the_socket(server: TestServer) {
        // Re-initialising would swap the token (and its expiry) under running operations.
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "reinit").await;
        let mut ws = WsClient::try_connect(server.addr, "graphql-ws").await.unwrap();
        ws.send(json!({ "type": "connection_init", "payload": { "authorization": format!("Bearer {ada}") } })).await;
        assert_eq!(ws.recv_raw().await, json!({ "type": "connection_ack" }));
        ws.send(json!({ "type": "start", "id": "1", "payload": { "query": MESSAGE_EVENTS, "variables": { "c": channel } } })).await;
        wait_for_subscribers(&server.broker, &channel, 1).await;
        ws.send(json!({ "type": "connection_init" })).await;
        assert_eq!(ws.expect_close().await, (4429, "Too many initialisation requests".to_owned()));
        wait_for_subscribers_at_most(&server, &channel, 0).await;
    }

    async fn the_legacy_protocol_works_with_keep_alives(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "legacy").await;
        caught_up(&server).await;
        let mut ws = WsClient::try_connect(server.addr, "graphql-ws").await.unwrap();
        ws.send(json!({ "type": "connection_init", "payload": { "authorization": format!("Bearer {ada}") } })).await;
        assert_eq!(ws.recv_raw().await, json!({ "type": "connection_ack" }));
        assert_eq!(ws.recv_raw().await, json!({ "type": "ka" }));
        ws.send(json!({ "type": "start", "id": "1", "payload": { "query": MESSAGE_EVENTS, "variables": { "c": channel } } })).await;
        wait_for_subscribers(&server.broker, &channel, 1).await;
        server.post_message(&ada, &channel, "old school").await;
        let message = ws.recv().await;
        assert_eq!(message["type"], "data", "{message}");
        assert_eq!(message["id"], "1");
        assert_eq!(event(&message["payload"])["message"]["body"], "old school");
        // Keep-alives keep coming.
        loop {
            if ws.recv_raw().await["type"] == "ka" {
                break;
            }
        }
        ws.send(json!({ "type": "stop", "id": "1" })).await;
        wait_for_subscribers_at_most(&server, &channel, 0).await;
        ws.send(json!({ "type": "connection_terminate" })).await;
        assert_eq!(ws.expect_close().await.0, 1000);
    }

    async fn other_subprotocols_are_refused(server: TestServer) {
        for protocol in ["mqtt", "graphql-transport-ws-v2"] {
            let refused = WsClient::try_connect(server.addr, protocol).await;
            match refused {
                Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                    assert_eq!(response.status(), 400)
                }
                Err(other) => panic!("expected an HTTP refusal, got {other}"),
                Ok(_) => panic!("{protocol} was accepted"),
            }
        }
    }
}
