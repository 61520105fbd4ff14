//! A real graphql-ws client for tests (tokio-tungstenite): every receive has a deadline, so a
//! missing message fails the test instead of hanging it.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::helpers::TestServer;

/// How long a test waits for any one message.
pub const RECEIVE_TIMEOUT: Duration = Duration::from_secs(15);

pub struct WsClient {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsClient {
    /// Connects to `addr`'s `/graphql` offering `protocol`.
    pub async fn try_connect(
        addr: std::net::SocketAddr,
        protocol: &str,
    ) -> Result<WsClient, tungstenite::Error> {
        let mut request = format!("ws://{addr}/graphql").into_client_request()?;
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
        let (socket, response) =
            tokio::time::timeout(RECEIVE_TIMEOUT, tokio_tungstenite::connect_async(request))
                .await
                .expect("WebSocket handshake in time")?;
        assert_eq!(
            response.headers()["sec-websocket-protocol"],
            protocol,
            "the server picks the offered subprotocol"
        );
        Ok(WsClient { socket })
    }

    /// Connects with graphql-transport-ws.
    pub async fn connect(server: &TestServer) -> WsClient {
        Self::try_connect(server.addr, "graphql-transport-ws")
            .await
            .expect("WebSocket connects")
    }

    /// Connects to another server (a peer) and completes connection_init.
    pub async fn connect_to(addr: std::net::SocketAddr, token: Option<&str>) -> WsClient {
        let mut client = Self::try_connect(addr, "graphql-transport-ws")
            .await
            .expect("WebSocket connects");
        client.init(token).await;
        client
    }

    /// Connects with graphql-transport-ws and completes connection_init (with a token).
    pub async fn connect_as(server: &TestServer, token: Option<&str>) -> WsClient {
        let mut client = Self::connect(server).await;
        client.init(token).await;
        client
    }

    pub async fn send(&mut self, message: Value) {
        self.socket
            .send(Message::Text(message.to_string().into()))
            .await
            .expect("send");
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.socket.send(message).await.expect("send");
    }

    /// Sends `message`, reporting (rather than panicking on) a connection the server ended;
    /// fails after `RECEIVE_TIMEOUT` if the server stops reading.
    pub async fn try_send(&mut self, message: Message) -> Result<(), String> {
        match tokio::time::timeout(RECEIVE_TIMEOUT, self.socket.send(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => panic!("the server neither reads nor closes"),
        }
    }

    /// The next frame (text as JSON, or a close), failing after `RECEIVE_TIMEOUT`.
    pub async fn recv_frame(&mut self) -> Frame {
        self.recv_frame_by(tokio::time::Instant::now() + RECEIVE_TIMEOUT)
            .await
    }

    /// The next frame, failing at `deadline`.
    async fn recv_frame_by(&mut self, deadline: tokio::time::Instant) -> Frame {
        loop {
            let frame = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .expect("a message arrives in time");
            match frame {
                Some(Ok(Message::Text(text))) => {
                    return Frame::Json(serde_json::from_str(&text).expect("JSON message"));
                }
                Some(Ok(Message::Close(frame))) => {
                    return Frame::Close(
                        frame
                            .map(|f| (u16::from(f.code), f.reason.to_string()))
                            .unwrap_or((1005, String::new())),
                    );
                }
                Some(Ok(_)) => continue,
                Some(Err(err)) => return Frame::Error(err.to_string()),
                None => return Frame::Error("stream ended".into()),
            }
        }
    }

    /// The next JSON message, including server pings.
    pub async fn recv_raw(&mut self) -> Value {
        match self.recv_frame().await {
            Frame::Json(value) => value,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// The next JSON message other than keep-alives (answering pings with pongs), failing
    /// after `RECEIVE_TIMEOUT` however many keep-alives arrive meanwhile.
    pub async fn recv(&mut self) -> Value {
        let deadline = tokio::time::Instant::now() + RECEIVE_TIMEOUT;
        loop {
            let message = match self.recv_frame_by(deadline).await {
                Frame::Json(value) => value,
                other => panic!("expected a message, got {other:?}"),
            };
            match message["type"].as_str() {
                Some("ping") => self.send(json!({ "type": "pong" })).await,
                Some("ka") => {}
                _ => return message,
            }
        }
    }

    /// Waits for the server to close; returns (code, reason).
    pub async fn expect_close(&mut self) -> (u16, String) {
        let deadline = tokio::time::Instant::now() + RECEIVE_TIMEOUT;
        loop {
            match self.recv_frame_by(deadline).await {
                Frame::Close(close) => return close,
                Frame::Json(message)
                    if matches!(message["type"].as_str(), Some("ping") | Some("ka")) => {}
                other => panic!("expected a close, got {other:?}"),
            }
        }
    }

    /// connection_init (with `{"authorization": "Bearer <token>"}`), expecting the ack.
    pub async fn init(&mut self, token: Option<&str>) {
        let payload = match token {
            Some(token) => json!({ "authorization": format!("Bearer {token}") }),
            None => json!({}),
        };
        self.send(json!({ "type": "connection_init", "payload": payload }))
            .await;
        let ack = self.recv().await;
        assert_eq!(ack["type"], "connection_ack", "{ack}");
    }

    /// Starts operation `id`.
    pub async fn subscribe(&mut self, id: &str, query: &str, variables: Value) {
        self.send(json!({
            "type": "subscribe",
            "id": id,
            "payload": { "query": query, "variables": variables },
        }))
        .await;
    }

    /// The next message, which must be `next` for `id`; returns its payload.
    pub async fn next_payload(&mut self, id: &str) -> Value {
        let message = self.recv().await;
        assert_eq!(message["type"], "next", "expected next for {id}: {message}");
        assert_eq!(message["id"], id, "{message}");
        message["payload"].clone()
    }

    /// Sends `complete` for `id`.
    pub async fn complete(&mut self, id: &str) {
        self.send(json!({ "type": "complete", "id": id })).await;
    }

    /// Starts the closing handshake with `code` and `reason`; returns what the server
    /// answers (a `Frame::Close` when it answers the handshake), then whether the socket then
    /// ended cleanly (no reset).
    pub async fn close_with(mut self, code: u16, reason: &str) -> (Frame, bool) {
        self.send_raw(Message::Close(Some(tungstenite::protocol::CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_owned().into(),
        })))
        .await;
        let answer = loop {
            match self.recv_frame().await {
                Frame::Json(_) => continue,
                other => break other,
            }
        };
        let end = tokio::time::timeout(RECEIVE_TIMEOUT, self.socket.next())
            .await
            .expect("the socket ends in time");
        (answer, end.is_none())
    }

    /// Closes politely.
    pub async fn close(mut self) {
        let _ = self
            .socket
            .close(Some(tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
    }
}

/// One thing received from the server.
#[derive(Debug)]
pub enum Frame {
    Json(Value),
    Close((u16, String)),
    /// A transport error (read through `Debug` in failure messages).
    #[allow(dead_code)]
    Error(String),
}

/// Waits (with a deadline) until `topic` has `count` receivers on `server`'s hub.
pub async fn wait_for_subscribers(broker: &syncgraph::pubsub::Broker, topic: &str, count: usize) {
    let topic: i64 = topic.parse().expect("numeric id");
    let deadline = tokio::time::Instant::now() + RECEIVE_TIMEOUT;
    while broker.subscriber_count(topic) < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{count} subscribers on topic {topic} in time (have {})",
            broker.subscriber_count(topic)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits (with a deadline) until `server`'s feed has published everything in the log, so a
/// subscription without `after` starts after every change made so far.
pub async fn caught_up(server: &TestServer) {
    use sea_orm::ConnectionTrait;
    let row = server
        .db
        .query_one_raw(sea_orm::Statement::from_string(
            server.db.get_database_backend(),
            "SELECT COALESCE(MAX(position), 0) AS position FROM change_log",
        ))
        .await
        .unwrap()
        .unwrap();
    let position: i64 = row.try_get("", "position").unwrap();
    let deadline = tokio::time::Instant::now() + RECEIVE_TIMEOUT;
    while server.broker.published() < position {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the feed publishes position {position} in time"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits (with a deadline) until `count` subscriptions have passed their checks and stream.
pub async fn wait_for_streams(broker: &syncgraph::pubsub::Broker, count: usize) {
    let deadline = tokio::time::Instant::now() + RECEIVE_TIMEOUT;
    while broker.streaming_count() < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{count} subscriptions streaming in time (have {})",
            broker.streaming_count()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits (with a deadline) until `topic` has at most `count` receivers.
pub async fn wait_for_subscribers_at_most(server: &TestServer, topic: &str, count: usize) {
    let topic_id: i64 = topic.parse().unwrap();
    let deadline = tokio::time::Instant::now() + RECEIVE_TIMEOUT;
    while server.broker.subscriber_count(topic_id) > count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "subscriptions end in time"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
