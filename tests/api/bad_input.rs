//! Bad input tried on purpose, one test per class: each gets its documented answer, the
//! server never crashes, and it keeps serving the next client.

use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};

use crate::helpers::{Backend, TestServer, run_with};
use crate::subscriptions::MESSAGE_EVENTS;
use crate::ws_client::WsClient;

/// The server still answers a normal request.
async fn still_serving(server: &TestServer) {
    let (ada, _) = server.sign_up(&format!("Check{}", rand_suffix())).await;
    let mut ws = WsClient::connect_as(server, Some(&ada)).await;
    ws.subscribe("me", "{ me { id } }", json!({})).await;
    assert!(ws.next_payload("me").await["data"]["me"]["id"].is_string());
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn defaults(_: &mut syncgraph::Config) {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_in_a_text_frame_closes_with_1007() {
    run_with(Backend::Sqlite, defaults, |server: TestServer| async move {
        let mut ws = WsClient::connect(&server).await;
        let header = FrameHeader {
            opcode: OpCode::Data(Data::Text),
            ..FrameHeader::default()
        };
        let bytes: &[u8] = &[b'{', 0xff, 0xfe, b'}'];
        ws.send_raw(Message::Frame(Frame::from_payload(
            header,
            bytes.to_vec().into(),
        )))
        .await;
        assert_eq!(ws.expect_close().await.0, 1007);
        still_serving(&server).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10_mb_frame_closes_with_1009() {
    run_with(Backend::Sqlite, defaults, |server: TestServer| async move {
        let mut ws = WsClient::connect(&server).await;
        let huge = format!(
            r#"{{"type":"connection_init","payload":{{"x":"{}"}}}}"#,
            "x".repeat(10 * 1024 * 1024)
        );
        // The server stops reading at the first frame over the limit: the client sees 1009,
        // or, still sending, a reset.
        match ws.try_send(Message::Text(huge.into())).await {
            Ok(()) => assert_eq!(
                ws.expect_close().await,
                (1009, "Message too big".to_owned())
            ),
            Err(err) => assert!(
                err.contains("reset") || err.contains("Broken pipe") || err.contains("closed"),
                "{err}"
            ),
        }
        still_serving(&server).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_messages_close_with_4400() {
    run_with(Backend::Sqlite, defaults, |server: TestServer| async move {
        for garbage in [
            "",
            "not json",
            "{",
            "[]",
            "null",
            "42",
            r#"{"type":"launch_missiles"}"#,
            r#"{"type":"subscribe"}"#,
            r#"{"type":"subscribe","id":1,"payload":{"query":"{ me { id } }"}}"#,
            r#"{"type":"connection_init","payload":"a string"}"#,
            r#"{"type":"complete"}"#,
        ] {
            let mut ws = WsClient::connect(&server).await;
            ws.send_raw(Message::Text(garbage.into())).await;
            let (code, _) = ws.expect_close().await;
            assert_eq!(code, 4400, "{garbage:?}");
        }
        still_serving(&server).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_operations_on_one_socket_are_capped() {
    fn hundred(config: &mut syncgraph::Config) {
        config.limits.max_operations_per_connection = 100;
    }
    run_with(Backend::Sqlite, hundred, |server: TestServer| async move {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "flood").await;
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        for i in 0..100 {
            ws.subscribe(&i.to_string(), MESSAGE_EVENTS, json!({ "c": channel }))
                .await;
        }
        // 100 run; each of the next 2,900 gets an `error` with LIMIT_EXCEEDED, and the
        // socket stays open. Sent in bursts of 25, read as a client reads its replies.
        for burst in 0..116 {
            for i in 0..25 {
                let id = 100 + burst * 25 + i;
                ws.subscribe(&id.to_string(), MESSAGE_EVENTS, json!({ "c": channel }))
                    .await;
            }
            for _ in 0..25 {
                let message = ws.recv().await;
                assert_eq!(message["type"], "error", "{message}");
                assert_eq!(
                    message["payload"][0]["extensions"]["code"],
                    "LIMIT_EXCEEDED"
                );
            }
        }
        crate::ws_client::wait_for_subscribers(&server.broker, &channel, 100).await;
        assert_eq!(
            server.broker.subscriber_count(channel.parse().unwrap()),
            100
        );
        server.post_message(&ada, &channel, "still live").await;
        let first = ws.recv().await;
        assert_eq!(first["type"], "next", "{first}");
        still_serving(&server).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_floods_without_reading_is_disconnected() {
    fn one(config: &mut syncgraph::Config) {
        config.limits.max_operations_per_connection = 1;
    }
    run_with(Backend::Sqlite, one, |server: TestServer| async move {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "flood").await;
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        // Thousands of refused operations whose replies are never read: the server cannot
        // drop a required reply, so it ends the connection rather than buffer without bound.
        let mut ended = false;
        for i in 0..100_000 {
            let frame = json!({ "type": "subscribe", "id": i.to_string(), "payload": { "query": MESSAGE_EVENTS, "variables": { "c": channel } } });
            if ws.try_send(Message::Text(frame.to_string().into())).await.is_err() {
                ended = true;
                break;
            }
        }
        assert!(ended, "the server ended the connection of a client that never reads");
        still_serving(&server).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http_bodies_get_400_with_a_code() {
    run_with(Backend::Sqlite, defaults, |server: TestServer| async move {
        for body in [
            "",
            "{",
            "[]",
            "null",
            r#"{"query": 42}"#,
            "\u{0}\u{1}",
            r#"{"query":"{ me { id } }","variables":"x"}"#,
        ] {
            let response = server
                .client()
                .post(server.url("/graphql"))
                .header("content-type", "application/json")
                .header("accept", "application/graphql-response+json")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 400, "{body:?}");
            let json: serde_json::Value = response.json().await.unwrap();
            assert_eq!(
                json["errors"][0]["extensions"]["code"], "BAD_USER_INPUT",
                "{body:?}: {json}"
            );
            assert!(
                !json.to_string().to_lowercase().contains("select"),
                "no SQL: {json}"
            );
        }
        still_serving(&server).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_nested_a_hundred_thousand_deep_is_refused_not_a_crash() {
    run_with(Backend::Sqlite, defaults, |server: TestServer| async move {
        // About 400 KB, under the body limit: the parser's recursion limit refuses it before
        // any stack could overflow.
        let query = format!("{{{}b{}}}", "a{".repeat(100_000), "}".repeat(100_000));
        let response = server.graphql(&query, json!({})).await;
        assert_eq!(crate::helpers::error_code(&response), "BAD_USER_INPUT");
        let query = format!("query {{{}id{}}}", "me {".repeat(5_000), "}".repeat(5_000));
        let response = server.graphql(&query, json!({})).await;
        assert_eq!(crate::helpers::error_code(&response), "BAD_USER_INPUT");
        still_serving(&server).await;
    })
    .await;
}
