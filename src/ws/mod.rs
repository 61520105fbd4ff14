//! GraphQL over WebSocket, spec-exact, on `/graphql`: `graphql-transport-ws` (the graphql-ws
//! library's protocol) and the legacy `graphql-ws` (subscriptions-transport-ws).
//!
//! Why our own module: async-graphql's WebSocket handler (`async_graphql::http::WebSocket`)
//! differs from the graphql-ws protocol in ways clients notice (ARCHITECTURE.md, "The
//! WebSocket protocols"): it closes with 1002/1011 where the protocol says 4400/4401/4403
//! (and the graphql-ws client treats 1002/1011 as fatal and stops reconnecting), replaces a
//! running operation on a duplicate id instead of closing with 4409, has no connection_init
//! timeout (4408) and sends no server pings. `Api::execute_stream` still executes every
//! operation; this module is only the framing.
//!
//! - `protocol`: the messages, close codes and how the two protocols differ (`Dialect`);
//! - this file: the connection loop and the handling of each client message;
//! - `operations`: which operations run, their frames, and what waits for room;
//! - `writer`: the socket's writer task.

mod operations;
mod protocol;
mod writer;

use std::time::Duration;

use axum::extract::ws::{Message as Frame, WebSocket};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use crate::auth::{JwtKeys, Viewer};
use crate::graphql::error::code;
use crate::graphql::limits::ClientAddr;
use crate::graphql::{Api, StartPermit};
use operations::Operations;
use protocol::{Answer, ClientMessage, Dialect, authorization, close, error_message};
pub use protocol::{GRAPHQL_TRANSPORT_WS, GRAPHQL_WS, Protocol};
use writer::Outgoing;

/// Timing of the protocol.
#[derive(Clone, Copy, Debug)]
pub struct WsConfig {
    /// Close with 4408 when no connection_init arrives within this.
    pub init_timeout: Duration,
    /// Server pings (`ka` on the legacy protocol) this often after the ack.
    pub keep_alive: Duration,
    /// Most operations running at once on one connection.
    pub max_operations: usize,
}

/// How long a required reply (ack, pong, error) may wait for the client to read earlier
/// ones before the connection is ended.
const REPLY_PATIENCE: Duration = Duration::from_secs(5);

/// Waits until `at` (forever when `None`).
async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One connection's state.
struct Connection {
    protocol: Protocol,
    dialect: &'static Dialect,
    api: Api,
    keys: JwtKeys,
    /// Control messages, served before results.
    control: mpsc::Sender<Outgoing>,
    /// The peer's address, attached to every operation (signIn/signUp are limited by it).
    client: ClientAddr,
    max_operations: usize,
    /// Set when a required reply could not be queued: the connection then ends.
    overflowed: bool,
    /// `Some` once connection_init was accepted.
    viewer: Option<Viewer>,
    /// When the accepted token expires: the connection is closed with 4403 then, and the
    /// client reconnects with a fresh token.
    expires_at: Option<tokio::time::Instant>,
    operations: Operations,
}

/// Serves one upgraded socket until either side closes or the server shuts down.
pub async fn serve(
    socket: WebSocket,
    protocol: Protocol,
    api: Api,
    keys: JwtKeys,
    config: WsConfig,
    client: ClientAddr,
    mut shutdown: watch::Receiver<bool>,
) {
    let (sink, mut stream) = socket.split();
    // Bounded: a client that does not read makes its operations wait (and, past the
    // topic's buffer, re-read the log) instead of growing this queue.
    let (out, outgoing) = mpsc::channel::<Outgoing>(256);
    let (control, controls) = mpsc::channel::<Outgoing>(32);
    let writer = tokio::spawn(writer::write(sink, controls, outgoing));
    // A second handle on the outgoing queue, to wait for room while the operations are
    // borrowed by the other branches.
    let room_out = out.clone();
    let dialect = protocol.dialect();
    let mut connection = Connection {
        protocol,
        dialect,
        api: api.clone(),
        keys,
        control,
        client,
        max_operations: config.max_operations,
        overflowed: false,
        viewer: None,
        expires_at: None,
        operations: Operations::new(dialect, api, out),
    };
    let inbox = connection.operations.inbox();
    // The pending operation's wait for a start permit, kept across loop turns so that it
    // keeps its place in the queue.
    let mut permit_wait: Option<futures_util::future::BoxFuture<'static, StartPermit>> = None;
    let init_deadline = tokio::time::sleep(config.init_timeout);
    tokio::pin!(init_deadline);
    let mut keep_alive = tokio::time::interval(config.keep_alive);
    keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    keep_alive.reset();
    // A client that sends nothing (not even a pong) for this long is gone.
    let silence_limit = (config.keep_alive * 3).max(Duration::from_secs(60));
    let mut last_heard = tokio::time::Instant::now();
    loop {
        if connection.operations.is_pending() && permit_wait.is_none() {
            permit_wait = Some(Box::pin(connection.api.start_permit()));
        }
        tokio::select! {
            // Operations' frames. Not biased: a busy feed must not keep the socket unread.
            // An id is freed in the same step that queues its `complete`, so it is free
            // before the client can reuse it.
            Some(ready) = connection.operations.next_ready(), if connection.operations.has_streams() => {
                connection.operations.take_ready(ready);
            }
            // Deliveries of the subscriptions that have caught up, framed into batches.
            _ = inbox.ready(), if connection.operations.reads_inbox() => {
                connection.operations.deliver();
            }
            // The queue has room again: the parked frames first, in order.
            room = room_out.reserve(), if connection.operations.has_stalled() => {
                let Ok(room) = room else { break };
                connection.operations.unpark(room);
            }
            permit = async { Some(permit_wait.as_mut()?.await) }, if permit_wait.is_some() => {
                permit_wait = None;
                if let Some(permit) = permit {
                    connection.operations.start(connection.client, permit);
                }
            }
            frame = stream.next(), if !connection.operations.is_pending() => {
                let frame = match frame {
                    Some(Ok(frame)) => frame,
                    Some(Err(err)) => {
                        // axum does not expose the WebSocket library's error kinds; a frame
                        // over the size limit is the one a client causes on purpose, so say
                        // so with 1009 (RFC 6455's "message too big"), else 1002.
                        let text = err.to_string().to_ascii_lowercase();
                        if text.contains("too long") || text.contains("too big") || text.contains("limit") {
                            connection.close(close::MESSAGE_TOO_BIG, "Message too big");
                        } else if text.contains("utf") {
                            connection.close(close::INVALID_DATA, "Invalid UTF-8");
                        } else {
                            connection.close(close::PROTOCOL_ERROR, "Invalid frame");
                        }
                        break;
                    }
                    None => break,
                };
                last_heard = tokio::time::Instant::now();
                let keep_going = match frame {
                    Frame::Text(text) => connection.on_text(text.as_str()).await,
                    Frame::Binary(_) => {
                        connection.close(close::BAD_REQUEST, "Binary frames are not supported");
                        false
                    }
                    Frame::Close(_) => {
                        // RFC 6455 section 5.5.1: a close is answered with a close. tungstenite
                        // queued the answer (echoing the client's code) when it read this
                        // frame and sends it on the next read or write: read once more so it
                        // goes out before the socket is dropped (else the client sees 1006,
                        // `wasClean: false`). Bounded: the writer may hold the socket while a
                        // client that does not read keeps its buffer full.
                        let _ = tokio::time::timeout(Duration::from_secs(1), stream.next()).await;
                        false
                    }
                    Frame::Ping(_) | Frame::Pong(_) => true,
                };
                if !keep_going {
                    break;
                }
                if connection.overflowed {
                    tracing::debug!("closing a WebSocket whose client does not read its replies");
                    break;
                }
            }
            _ = until(connection.expires_at), if connection.expires_at.is_some() => {
                connection.close(close::FORBIDDEN, "Token expired");
                break;
            }
            _ = &mut init_deadline, if connection.viewer.is_none() => {
                connection.close(close::INIT_TIMEOUT, "Connection initialisation timeout");
                break;
            }
            _ = keep_alive.tick(), if connection.viewer.is_some() => {
                // Not while an operation waits for a start permit: the socket is not read
                // meanwhile, so the client's pongs are not seen.
                if connection.operations.is_pending() {
                    last_heard = tokio::time::Instant::now();
                }
                if connection.dialect.clients_pong && last_heard.elapsed() > silence_limit {
                    tracing::debug!("closing a silent WebSocket");
                    break;
                }
                connection.ping();
            }
            _ = shutdown.changed() => {
                // The hub closes right after this flag is raised: each operation sends
                // `complete` as its stream ends.
                let _ = tokio::time::timeout(Duration::from_secs(1), connection.operations.drain()).await;
                // After the operations' `complete` messages, in order; bounded in time.
                let close = Outgoing::Close(close::SERVICE_RESTART, "Server restarting".to_owned());
                let _ = tokio::time::timeout(Duration::from_secs(1), room_out.send(close)).await;
                break;
            }
        }
    }
    // Dropping the connection drops its operations.
    drop(room_out);
    drop(connection);
    // The writer ends once the queue drains; a client that does not read cannot hold it.
    let mut writer = writer;
    if tokio::time::timeout(Duration::from_secs(1), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

impl Connection {
    /// Queues a control message (ack, pong, protocol errors) on the control queue, which the
    /// writer serves first, waiting at most `REPLY_PATIENCE` for room.
    async fn send(&mut self, text: String) {
        let queued =
            tokio::time::timeout(REPLY_PATIENCE, self.control.send(Outgoing::Text(text))).await;
        if !matches!(queued, Ok(Ok(()))) {
            // The client has not read our replies for this long while sending more (a
            // flood): a reply the protocol requires cannot be dropped silently, so the
            // connection ends instead.
            self.overflowed = true;
        }
    }

    /// Queues a keep-alive; skipped when the client is not reading anyway.
    fn ping(&self) {
        let _ = self
            .control
            .try_send(Outgoing::Text(self.dialect.keep_alive.to_owned()));
    }

    /// Queues a close frame. Never waits: the connection ends either way.
    fn close(&self, code: u16, reason: &str) {
        // A close frame's reason must fit 123 bytes.
        let mut reason = reason.to_owned();
        while reason.len() > 120 {
            reason.pop();
        }
        let _ = self.control.try_send(Outgoing::Close(code, reason));
    }

    /// Answers a client's mistake as the protocol says (for operation `id`, if any); false
    /// when the connection is to end.
    async fn refuse(&mut self, id: Option<&str>, answer: Answer) -> bool {
        match answer {
            Answer::Close(code, reason) => {
                self.close(code, reason);
                false
            }
            Answer::Error(message) => {
                self.send(error_message(id, json!({ "message": message })))
                    .await;
                true
            }
        }
    }

    /// Handles one text frame; false when the connection is to end.
    async fn on_text(&mut self, text: &str) -> bool {
        match ClientMessage::decode(self.protocol, text) {
            Some(message) => self.on_message(message).await,
            None => self.refuse(None, self.dialect.unreadable).await,
        }
    }

    /// Accepts connection_init: the viewer from its payload (and when its token expires),
    /// or `None` for a bad token.
    fn authenticate(&mut self, payload: Option<&Value>) -> Option<Viewer> {
        let value = authorization(payload);
        match Viewer::from_authorization(value, &self.keys) {
            Viewer::InvalidToken => None,
            viewer => {
                self.expires_at = Viewer::deadline(value, &self.keys);
                Some(viewer)
            }
        }
    }

    async fn on_message(&mut self, message: ClientMessage) -> bool {
        match message {
            ClientMessage::Init(payload) => {
                if self.viewer.is_some() {
                    // A second init could swap the token (and its expiry) under running
                    // operations.
                    self.close(close::TOO_MANY_INITS, "Too many initialisation requests");
                    return false;
                }
                if self.dialect.init_payload_is_object
                    && payload
                        .as_ref()
                        .is_some_and(|p| !p.is_object() && !p.is_null())
                {
                    self.close(close::BAD_REQUEST, "Invalid connection_init payload");
                    return false;
                }
                match self.authenticate(payload.as_ref()) {
                    Some(viewer) => {
                        self.viewer = Some(viewer);
                        self.send(json!({ "type": "connection_ack" }).to_string())
                            .await;
                        if let Some(after_ack) = self.dialect.after_ack {
                            self.send(after_ack.to_owned()).await;
                        }
                        true
                    }
                    None => {
                        if let Some(notice) = self.dialect.refused_token_notice {
                            self.send(notice.to_owned()).await;
                        }
                        self.close(close::FORBIDDEN, "Forbidden");
                        false
                    }
                }
            }
            ClientMessage::Ping(payload) => {
                let pong = match payload {
                    Some(payload) => json!({ "type": "pong", "payload": payload }),
                    None => json!({ "type": "pong" }),
                };
                self.send(pong.to_string()).await;
                true
            }
            ClientMessage::Pong => true,
            ClientMessage::Start { id, payload } => {
                let Some(viewer) = self.viewer else {
                    return self.refuse(Some(&id), self.dialect.before_init).await;
                };
                if self.operations.runs(&id) {
                    if self.dialect.duplicate_id_closes {
                        let reason = format!("Subscriber for {id} already exists");
                        self.close(close::SUBSCRIBER_EXISTS, &reason);
                        return false;
                    }
                    self.operations.stop(&id);
                }
                if self.refuse_past_limit(&id).await {
                    return true;
                }
                self.operations.queue(id, *payload, viewer);
                true
            }
            ClientMessage::Stop { id } => {
                self.operations.stop(&id);
                true
            }
            ClientMessage::Terminate => {
                self.close(close::NORMAL, "Normal closure");
                false
            }
        }
    }

    /// With the connection's maximum of operations running, answers `id` with an `error`
    /// (LIMIT_EXCEEDED) and keeps the connection: the client may complete one and retry.
    async fn refuse_past_limit(&mut self, id: &str) -> bool {
        if self.operations.len() < self.max_operations {
            return false;
        }
        let refused = self.api.refuse(
            code::LIMIT_EXCEEDED,
            format!(
                "at most {} operations may run at once on one connection",
                self.max_operations
            ),
        );
        self.send(error_message(Some(id), json!([refused]))).await;
        true
    }
}
