//! `ceiling`: the leanest correct graphql-transport-ws fan-out, to put beside syncgraph's
//! figures. No GraphQL execution, no database: a POST to `/graphql` takes the mutation's
//! variables `c` (topic) and `b` (body), builds the event payload once, and sends each
//! subscriber of the topic one frame (`{"id":…,"type":"next","payload":<the payload>}`).
//! Each connection's writer sends what is queued in one batch per wake-up. It speaks the
//! protocol's handshake, ping/pong, subscribe and complete, so the same load generator
//! drives it; it checks no token and keeps nothing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;

#[derive(Parser)]
#[command(about = "The fan-out ceiling: graphql-transport-ws with nothing else")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8100")]
    listen: SocketAddr,
}

type Outbox = mpsc::UnboundedSender<Utf8Bytes>;

/// A subscriber: its connection's id and outbox, and the subscription's id.
type Subscriber = (u64, Outbox, String);

/// Subscribers by topic.
#[derive(Default)]
struct Hub {
    topics: RwLock<HashMap<String, Vec<Subscriber>>>,
    next_connection: AtomicU64,
    sequence: AtomicU64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let hub = Arc::new(Hub::default());
    let app = Router::new()
        .route("/graphql", get(upgrade).post(publish))
        .with_state(hub);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!(
        "ceiling serving on http://{}/graphql",
        listener.local_addr()?
    );
    axum::serve(listener, app).await?;
    Ok(())
}

async fn upgrade(State(hub): State<Arc<Hub>>, ws: WebSocketUpgrade) -> Response {
    // The same small read buffer as syncgraph's (tungstenite allocates 128 KiB per socket
    // by default), so idle connections are compared like for like.
    ws.protocols(["graphql-transport-ws"])
        .read_buffer_size(4 * 1024)
        .on_upgrade(move |socket| connection(hub, socket))
        .into_response()
}

async fn connection(hub: Arc<Hub>, socket: WebSocket) {
    let id = hub.next_connection.fetch_add(1, Ordering::Relaxed);
    let (mut sink, mut stream) = socket.split();
    let (outbox, mut queued) = mpsc::unbounded_channel::<Utf8Bytes>();
    let writer = tokio::spawn(async move {
        while let Some(first) = queued.recv().await {
            if sink.feed(Message::Text(first)).await.is_err() {
                return;
            }
            while let Ok(more) = queued.try_recv() {
                if sink.feed(Message::Text(more)).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    let mut subscribed: Vec<String> = Vec::new();
    while let Some(Ok(frame)) = stream.next().await {
        let Message::Text(text) = frame else {
            continue;
        };
        let Ok(message) = serde_json::from_str::<Value>(text.as_str()) else {
            break;
        };
        match message["type"].as_str() {
            Some("connection_init") => {
                let _ = outbox.send(Utf8Bytes::from_static(r#"{"type":"connection_ack"}"#));
            }
            Some("ping") => {
                let _ = outbox.send(Utf8Bytes::from_static(r#"{"type":"pong"}"#));
            }
            Some("subscribe") => {
                let (Some(sub), Some(topic)) = (
                    message["id"].as_str(),
                    message["payload"]["variables"]["c"].as_str(),
                ) else {
                    break;
                };
                let mut topics = hub.topics.write().unwrap_or_else(|e| e.into_inner());
                topics.entry(topic.to_owned()).or_default().push((
                    id,
                    outbox.clone(),
                    sub.to_owned(),
                ));
                subscribed.push(topic.to_owned());
            }
            Some("complete") => {
                if let Some(sub) = message["id"].as_str() {
                    let mut topics = hub.topics.write().unwrap_or_else(|e| e.into_inner());
                    for subs in topics.values_mut() {
                        subs.retain(|(conn, _, s)| !(*conn == id && s == sub));
                    }
                }
            }
            _ => {}
        }
    }
    let mut topics = hub.topics.write().unwrap_or_else(|e| e.into_inner());
    for topic in subscribed {
        if let Some(subs) = topics.get_mut(&topic) {
            subs.retain(|(conn, _, _)| *conn != id);
        }
    }
    drop(topics);
    writer.abort();
}

/// The mutation: one payload, one frame per subscriber of the topic.
async fn publish(State(hub): State<Arc<Hub>>, body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return (axum::http::StatusCode::BAD_REQUEST, "not JSON").into_response();
    };
    let (Some(topic), Some(text)) = (
        request["variables"]["c"].as_str(),
        request["variables"]["b"].as_str(),
    ) else {
        return (axum::http::StatusCode::BAD_REQUEST, "variables c and b").into_response();
    };
    let sequence = hub.sequence.fetch_add(1, Ordering::Relaxed) + 1;
    let payload = json!({ "data": { "messageEvents": {
        "cursor": sequence.to_string(),
        "message": { "body": text }
    } } })
    .to_string();
    {
        let topics = hub.topics.read().unwrap_or_else(|e| e.into_inner());
        if let Some(subs) = topics.get(topic) {
            for (_, outbox, sub) in subs {
                let frame = format!(r#"{{"id":"{sub}","type":"next","payload":{payload}}}"#);
                let _ = outbox.send(Utf8Bytes::from(frame));
            }
        }
    }
    axum::Json(json!({ "data": { "postMessage": { "id": sequence.to_string() } } })).into_response()
}
