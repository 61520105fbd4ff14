//! GraphQL over WebSocket, spec-exact, on `/graphql`: `graphql-transport-ws` (the graphql-ws
//! library's protocol) and the legacy `graphql-ws` (subscriptions-transport-ws).
//!
//! Why our own module: async-graphql's WebSocket handler (`async_graphql::http::WebSocket`)
//! differs from the graphql-ws protocol in ways clients notice (ARCHITECTURE.md, "The
//! WebSocket protocols"): it closes with 1002/1011 where the protocol says 4400/4401/4403
//! (and the graphql-ws client treats 1002/1011 as fatal and stops reconnecting), replaces a
//! running operation on a duplicate id instead of closing with 4409, has no connection_init
//! timeout (4408) and sends no server pings.
//! `Api::execute_stream` still executes every operation; this module is only the framing.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as Frame, Utf8Bytes, WebSocket};
use futures_util::stream::{AbortHandle, Abortable, BoxStream, FuturesUnordered, StreamFuture};
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use crate::auth::{JwtKeys, Viewer};
use crate::graphql::error::code;
use crate::graphql::limits::ClientAddr;
use crate::graphql::{Api, Reply, StartPermit};

/// `Sec-WebSocket-Protocol` of the graphql-ws library.
pub const GRAPHQL_TRANSPORT_WS: &str = "graphql-transport-ws";
/// `Sec-WebSocket-Protocol` of the legacy subscriptions-transport-ws library.
pub const GRAPHQL_WS: &str = "graphql-ws";

/// Close codes of the graphql-transport-ws protocol.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const SERVICE_RESTART: u16 = 1012;
    pub const BAD_REQUEST: u16 = 4400;
    pub const UNAUTHORIZED: u16 = 4401;
    pub const FORBIDDEN: u16 = 4403;
    pub const INIT_TIMEOUT: u16 = 4408;
    pub const SUBSCRIBER_EXISTS: u16 = 4409;
    pub const TOO_MANY_INITS: u16 = 4429;
    /// RFC 6455: a message over the configured size.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// RFC 6455: a text message that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// RFC 6455: a frame that breaks the protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
}

/// Which of the two protocols a socket speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    TransportWs,
    Legacy,
}

impl Protocol {
    /// The protocol to speak given the client's offered subprotocols (comma-separated
    /// header values), preferring graphql-transport-ws; `None` for anything else.
    pub fn negotiate<'a>(offered: impl IntoIterator<Item = &'a str>) -> Option<Protocol> {
        let offered: Vec<&str> = offered
            .into_iter()
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .collect();
        if offered.contains(&GRAPHQL_TRANSPORT_WS) {
            Some(Protocol::TransportWs)
        } else if offered.contains(&GRAPHQL_WS) {
            Some(Protocol::Legacy)
        } else {
            None
        }
    }

    /// The subprotocol name.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::TransportWs => GRAPHQL_TRANSPORT_WS,
            Protocol::Legacy => GRAPHQL_WS,
        }
    }
}

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

/// What the server sends: a text frame, or a close frame that ends the connection.
enum Outgoing {
    Text(String),
    Close(u16, String),
}

/// Messages of graphql-transport-ws from the client.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum TransportMessage {
    ConnectionInit {
        #[serde(default)]
        payload: Option<Value>,
    },
    Ping {
        #[serde(default)]
        payload: Option<Value>,
    },
    Pong {
        #[serde(default)]
        #[allow(dead_code)]
        payload: Option<Value>,
    },
    Subscribe {
        id: String,
        payload: Box<async_graphql::Request>,
    },
    Complete {
        id: String,
    },
}

/// Messages of the legacy protocol from the client.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum LegacyMessage {
    ConnectionInit {
        #[serde(default)]
        payload: Option<Value>,
    },
    Start {
        id: String,
        payload: Box<async_graphql::Request>,
    },
    Stop {
        id: String,
    },
    ConnectionTerminate,
}

/// The `authorization` value of a connection_init payload (the key in any letter case).
fn authorization(payload: Option<&Value>) -> Option<&str> {
    payload?
        .as_object()?
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case("authorization"))
        .and_then(|(_, value)| value.as_str())
}

/// How many frames of its operations a socket's task queues before it looks at the socket
/// again.
const MAX_FRAMES_PER_TURN: usize = 1024;

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

/// The monotonic instant of a time in seconds since the epoch (now, if it has passed).
fn instant_of(epoch_secs: u64) -> tokio::time::Instant {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // At most a year ahead: a far-future `exp` must not overflow the clock.
    let left = Duration::from_secs(epoch_secs)
        .saturating_sub(now)
        .min(Duration::from_secs(365 * 24 * 3600));
    tokio::time::Instant::now() + left
}

/// One connection's state.
struct Connection {
    protocol: Protocol,
    api: Api,
    keys: JwtKeys,
    /// Operation results; bounded, so a client that does not read slows its operations.
    out: mpsc::Sender<Outgoing>,
    /// Control messages, served before results.
    control: mpsc::Sender<Outgoing>,
    /// The peer's address, attached to every operation (signIn/signUp are limited by it).
    client: ClientAddr,
    max_operations: usize,
    /// Set when a required reply could not be queued: the connection then ends.
    overflowed: std::sync::atomic::AtomicBool,
    /// `Some` once connection_init was accepted.
    viewer: Option<Viewer>,
    /// When the accepted token expires: the connection is closed with 4403 then, and the
    /// client reconnects with a fresh token.
    expires_at: Option<tokio::time::Instant>,
    /// The running operations by id: which generation (distinguishing a finished operation
    /// from a newer one that reuses its id) and how to stop it.
    operations: HashMap<String, (u64, AbortHandle)>,
    generation: u64,
    /// The running operations' frame streams, driven by the connection's own task: one
    /// event wakes this one task, which queues the frames of every subscription of the
    /// socket before its writer runs (one write per socket and event, not one task and one
    /// write per subscription). Each is polled only when it was woken.
    streams: FuturesUnordered<StreamFuture<Operation>>,
    /// Operations whose next frame did not fit the outgoing queue, with that frame. Each is
    /// polled again only once its frame is queued, so a client that does not read slows
    /// its own operations (past the topic's buffer they re-read the log), while every
    /// operation still finishes the work it is in (a shared rendering others wait for, a
    /// query holding a pooled connection): it is only ever parked between frames.
    stalled: std::collections::VecDeque<(String, Operation)>,
    /// An operation read from the socket, waiting for its start permit.
    pending: Option<Box<(String, async_graphql::Request, Viewer)>>,
}

/// One frame of an operation, and whether it is its last (`complete`, or `error`).
struct OpFrame {
    text: String,
    last: bool,
}

/// A running operation: its frames, tagged with its id and generation, until stopped.
struct Operation {
    id: String,
    generation: u64,
    /// Aborting (on `complete`) wakes it, so it is polled, ends and is dropped. In a mutex
    /// only to be `Sync` (the connection is borrowed across awaits); it is only ever
    /// reached through `&mut`, so never locked.
    frames: std::sync::Mutex<Abortable<BoxStream<'static, OpFrame>>>,
}

impl Operation {
    fn frames(&mut self) -> &mut Abortable<BoxStream<'static, OpFrame>> {
        self.frames.get_mut().unwrap_or_else(|e| e.into_inner())
    }
}

impl futures_util::Stream for Operation {
    type Item = OpFrame;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<OpFrame>> {
        self.frames().poll_next_unpin(cx)
    }
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
    let (mut sink, mut stream) = socket.split();
    // Bounded: a client that does not read makes its operations wait (and, past the
    // topic's buffer, re-read the log) instead of growing this queue.
    let (out, mut outgoing) = mpsc::channel::<Outgoing>(256);
    let (control, mut controls) = mpsc::channel::<Outgoing>(32);
    let writer = tokio::spawn(async move {
        loop {
            let mut message = tokio::select! {
                biased;
                Some(message) = controls.recv() => message,
                Some(message) = outgoing.recv() => message,
                else => return,
            };
            // Everything already queued goes out in one write (one syscall for an event's
            // frames to all of this socket's subscriptions), control messages first.
            loop {
                match message {
                    Outgoing::Text(text) => {
                        if sink.feed(Frame::Text(Utf8Bytes::from(text))).await.is_err() {
                            return;
                        }
                    }
                    Outgoing::Close(code, reason) => {
                        let frame = CloseFrame {
                            code,
                            reason: Utf8Bytes::from(reason),
                        };
                        let _ = sink.send(Frame::Close(Some(frame))).await;
                        let _ = sink.close().await;
                        return;
                    }
                }
                message = match controls.try_recv() {
                    Ok(next) => next,
                    Err(_) => match outgoing.try_recv() {
                        Ok(next) => next,
                        Err(_) => break,
                    },
                };
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    let mut connection = Connection {
        protocol,
        api,
        keys,
        out,
        control,
        client,
        max_operations: config.max_operations,
        overflowed: std::sync::atomic::AtomicBool::new(false),
        viewer: None,
        expires_at: None,
        operations: HashMap::new(),
        generation: 0,
        streams: FuturesUnordered::new(),
        stalled: std::collections::VecDeque::new(),
        pending: None,
    };
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
    // A second handle on the outgoing queue, to wait for room while the connection is
    // borrowed by the other branches.
    let room_out = connection.out.clone();
    loop {
        if connection.pending.is_some() && permit_wait.is_none() {
            permit_wait = Some(Box::pin(connection.api.start_permit()));
        }
        tokio::select! {
            // Operations' frames. Not biased: a busy feed must not keep the socket unread.
            // An id is freed in the same step that queues its `complete` (`on_frame`), so
            // it is free before the client can reuse it.
            Some((frame, operation)) = connection.streams.next(), if !connection.streams.is_empty() => {
                // Then every other frame that is ready now, without going round the loop
                // for each (bounded, so the socket is still read).
                let mut next = Some((frame, operation));
                let mut drained = 0;
                while let Some((frame, operation)) = next.take() {
                    connection.on_frame(frame, operation);
                    drained += 1;
                    if drained == MAX_FRAMES_PER_TURN {
                        break;
                    }
                    // A pending poll here registers no waker that matters: the loop polls
                    // the operations again, with its own, before it waits.
                    next = connection.streams.next().now_or_never().flatten();
                }
            }
            // The queue has room again: the parked frames first, in order.
            room = room_out.reserve(), if !connection.stalled.is_empty() => {
                let Ok(room) = room else { break };
                if let Some((text, operation)) = connection.stalled.pop_front() {
                    room.send(Outgoing::Text(text));
                    connection.streams.push(operation.into_future());
                }
                while let Some((text, operation)) = connection.stalled.pop_front() {
                    match connection.out.try_send(Outgoing::Text(text)) {
                        Ok(()) => connection.streams.push(operation.into_future()),
                        Err(err) => {
                            if let mpsc::error::TrySendError::Full(Outgoing::Text(text)) = err {
                                connection.stalled.push_front((text, operation));
                            }
                            break;
                        }
                    }
                }
            }
            permit = async { Some(permit_wait.as_mut()?.await) }, if permit_wait.is_some() => {
                permit_wait = None;
                if let Some(permit) = permit {
                    connection.launch(permit);
                }
            }
            frame = stream.next(), if connection.pending.is_none() => {
                let frame = match frame {
                    Some(Ok(frame)) => frame,
                    Some(Err(err)) => {
                        // axum does not expose the WebSocket library's error kinds; a frame
                        // over the size limit is the one a client causes on purpose, so say
                        // so with 1009 (RFC 6455's "message too big"), else 1002.
                        let text = err.to_string().to_ascii_lowercase();
                        if text.contains("too long") || text.contains("too big") || text.contains("limit") {
                            connection.close(close::MESSAGE_TOO_BIG, "Message too big").await;
                        } else if text.contains("utf") {
                            connection.close(close::INVALID_DATA, "Invalid UTF-8").await;
                        } else {
                            connection.close(close::PROTOCOL_ERROR, "Invalid frame").await;
                        }
                        break;
                    }
                    None => break,
                };
                last_heard = tokio::time::Instant::now();
                let keep_going = match frame {
                    Frame::Text(text) => connection.on_text(text.as_str()).await,
                    Frame::Binary(_) => {
                        connection.close(close::BAD_REQUEST, "Binary frames are not supported").await;
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
                if connection.overflowed.load(std::sync::atomic::Ordering::Relaxed) {
                    tracing::debug!("closing a WebSocket whose client does not read its replies");
                    break;
                }
            }
            _ = until(connection.expires_at), if connection.expires_at.is_some() => {
                connection.close(close::FORBIDDEN, "Token expired").await;
                break;
            }
            _ = &mut init_deadline, if connection.viewer.is_none() => {
                connection.close(close::INIT_TIMEOUT, "Connection initialisation timeout").await;
                break;
            }
            _ = keep_alive.tick(), if connection.viewer.is_some() => {
                // Not while an operation waits for a start permit: the socket is not read
                // meanwhile, so the client's pongs are not seen.
                if connection.pending.is_some() {
                    last_heard = tokio::time::Instant::now();
                }
                if connection.protocol == Protocol::TransportWs
                    && last_heard.elapsed() > silence_limit
                {
                    tracing::debug!("closing a silent WebSocket");
                    break;
                }
                connection.ping();
            }
            _ = shutdown.changed() => {
                // The hub is closed: each operation sends `complete` as its stream ends.
                let drained = tokio::time::timeout(Duration::from_secs(1), async {
                    while let Some((text, operation)) = connection.stalled.pop_front() {
                        if connection.out.send(Outgoing::Text(text)).await.is_err() {
                            return;
                        }
                        connection.streams.push(operation.into_future());
                    }
                    while let Some((frame, mut operation)) = connection.streams.next().await {
                        let last = frame.as_ref().is_none_or(|frame| frame.last);
                        if let Some(frame) = frame
                            && !operation.frames().is_aborted()
                            && connection.out.send(Outgoing::Text(frame.text)).await.is_err()
                        {
                            return;
                        }
                        if !last {
                            connection.streams.push(operation.into_future());
                        }
                    }
                });
                let _ = drained.await;
                // After the operations' `complete` messages, in order; bounded in time.
                let close = Outgoing::Close(close::SERVICE_RESTART, "Server restarting".to_owned());
                let _ = tokio::time::timeout(Duration::from_secs(1), connection.out.send(close)).await;
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
    /// Queues a control message (ack, pong, ping, protocol errors) on the control queue,
    /// which the writer serves first. Never waits: a full control queue means the client
    /// reads nothing, and the message is dropped rather than stalling this loop.
    async fn send(&self, message: Value) {
        let queued = tokio::time::timeout(
            REPLY_PATIENCE,
            self.control.send(Outgoing::Text(message.to_string())),
        )
        .await;
        if !matches!(queued, Ok(Ok(()))) {
            // The client has not read our replies for this long while sending more (a
            // flood): a reply the protocol requires cannot be dropped silently, so the
            // connection ends instead.
            self.overflowed
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Queues a keep-alive ping; skipped when the client is not reading anyway.
    fn ping(&self) {
        let ping = match self.protocol {
            Protocol::TransportWs => json!({ "type": "ping" }),
            Protocol::Legacy => json!({ "type": "ka" }),
        };
        let _ = self.control.try_send(Outgoing::Text(ping.to_string()));
    }

    /// Queues a close frame (like `send`: never waits; the connection ends either way).
    async fn close(&self, code: u16, reason: &str) {
        // A close frame's reason must fit 123 bytes.
        let mut reason = reason.to_owned();
        while reason.len() > 120 {
            reason.pop();
        }
        let _ = self.control.try_send(Outgoing::Close(code, reason));
    }

    /// Handles one text frame; false when the connection is to end.
    async fn on_text(&mut self, text: &str) -> bool {
        match self.protocol {
            Protocol::TransportWs => match serde_json::from_str::<TransportMessage>(text) {
                Ok(message) => self.on_transport(message).await,
                Err(_) => {
                    self.close(close::BAD_REQUEST, "Invalid message received")
                        .await;
                    false
                }
            },
            Protocol::Legacy => match serde_json::from_str::<LegacyMessage>(text) {
                Ok(message) => self.on_legacy(message).await,
                Err(_) => {
                    // The legacy server answers an unreadable message with an error and
                    // keeps the connection.
                    self.send(json!({
                        "type": "error",
                        "payload": { "message": "Invalid message received" }
                    }))
                    .await;
                    true
                }
            },
        }
    }

    /// Accepts connection_init: the viewer from its payload (and when its token expires),
    /// or `None` for a bad token.
    fn authenticate(&mut self, payload: Option<&Value>) -> Option<Viewer> {
        let value = authorization(payload);
        match Viewer::from_authorization(value, &self.keys) {
            Viewer::InvalidToken => None,
            viewer => {
                self.expires_at = Viewer::expiry(value, &self.keys).map(instant_of);
                Some(viewer)
            }
        }
    }

    async fn on_transport(&mut self, message: TransportMessage) -> bool {
        match message {
            TransportMessage::ConnectionInit { payload } => {
                if self.viewer.is_some() {
                    self.close(close::TOO_MANY_INITS, "Too many initialisation requests")
                        .await;
                    return false;
                }
                if payload
                    .as_ref()
                    .is_some_and(|p| !p.is_object() && !p.is_null())
                {
                    self.close(close::BAD_REQUEST, "Invalid connection_init payload")
                        .await;
                    return false;
                }
                match self.authenticate(payload.as_ref()) {
                    Some(viewer) => {
                        self.viewer = Some(viewer);
                        self.send(json!({ "type": "connection_ack" })).await;
                        true
                    }
                    None => {
                        self.close(close::FORBIDDEN, "Forbidden").await;
                        false
                    }
                }
            }
            TransportMessage::Ping { payload } => {
                let pong = match payload {
                    Some(payload) => json!({ "type": "pong", "payload": payload }),
                    None => json!({ "type": "pong" }),
                };
                self.send(pong).await;
                true
            }
            TransportMessage::Pong { .. } => true,
            TransportMessage::Subscribe { id, payload } => {
                let Some(viewer) = self.viewer else {
                    self.close(close::UNAUTHORIZED, "Unauthorized").await;
                    return false;
                };
                if self.operations.contains_key(&id) {
                    self.close(
                        close::SUBSCRIBER_EXISTS,
                        &format!("Subscriber for {id} already exists"),
                    )
                    .await;
                    return false;
                }
                if self.refuse_past_limit(&id).await {
                    return true;
                }
                self.start(id, *payload, viewer);
                true
            }
            TransportMessage::Complete { id } => {
                self.stop(&id);
                true
            }
        }
    }

    async fn on_legacy(&mut self, message: LegacyMessage) -> bool {
        match message {
            LegacyMessage::ConnectionInit { payload } => {
                if self.viewer.is_some() {
                    // A second init could swap the token (and its expiry) under running
                    // operations; the legacy protocol has no code for it, so end the socket.
                    self.close(close::TOO_MANY_INITS, "Too many initialisation requests")
                        .await;
                    return false;
                }
                match self.authenticate(payload.as_ref()) {
                    Some(viewer) => {
                        self.viewer = Some(viewer);
                        self.send(json!({ "type": "connection_ack" })).await;
                        self.send(json!({ "type": "ka" })).await;
                        true
                    }
                    None => {
                        self.send(json!({
                            "type": "connection_error",
                            "payload": { "message": "Forbidden" }
                        }))
                        .await;
                        self.close(close::FORBIDDEN, "Forbidden").await;
                        false
                    }
                }
            }
            LegacyMessage::Start { id, payload } => {
                let Some(viewer) = self.viewer else {
                    self.send(json!({
                        "type": "error",
                        "id": id,
                        "payload": { "message": "Send connection_init first" }
                    }))
                    .await;
                    return true;
                };
                // The legacy protocol replaces an operation that reuses a running id.
                self.stop(&id);
                if self.refuse_past_limit(&id).await {
                    return true;
                }
                self.start(id, *payload, viewer);
                true
            }
            LegacyMessage::Stop { id } => {
                self.stop(&id);
                true
            }
            LegacyMessage::ConnectionTerminate => {
                self.close(close::NORMAL, "Normal closure").await;
                false
            }
        }
    }

    fn stop(&mut self, id: &str) {
        let Some((generation, abort)) = self.operations.remove(id) else {
            return;
        };
        // Woken by the abort, it ends and is dropped the next time the connection polls
        // its operations; a parked one is dropped here.
        abort.abort();
        self.stalled
            .retain(|(_, operation)| !(operation.id == id && operation.generation == generation));
    }

    /// Runs an operation: `next` (legacy `data`) per response, then `complete`. An operation
    /// that never runs (syntax or validation errors: errors without a path) gets one `error`
    /// message instead. As in the graphql-ws reference server, errors from resolvers,
    /// including a subscription refused at its start (FORBIDDEN, CURSOR_EXPIRED), arrive as
    /// `next` with `errors`, then `complete`.
    /// With the connection's maximum of operations running, answers `id` with an `error`
    /// (LIMIT_EXCEEDED) and keeps the connection: the client may complete one and retry.
    async fn refuse_past_limit(&self, id: &str) -> bool {
        if self.operations.len() < self.max_operations {
            return false;
        }
        self.api.count_error(code::LIMIT_EXCEEDED);
        self.send(json!({
            "type": "error",
            "id": id,
            "payload": [{
                "message": format!(
                    "at most {} operations may run at once on one connection",
                    self.max_operations
                ),
                "extensions": { "code": code::LIMIT_EXCEEDED }
            }]
        }))
        .await;
        true
    }

    /// Queues an operation to start once it has a start permit (`Api::start_permit`). The
    /// socket reads no further message meanwhile (a burst of subscriptions waits as unread
    /// bytes in the socket, not as queued operations in memory), but its running operations
    /// keep going: one of them may hold the permit it waits for.
    fn start(&mut self, id: String, request: async_graphql::Request, viewer: Viewer) {
        self.pending = Some(Box::new((id, request, viewer)));
    }

    /// Starts the pending operation with its permit.
    fn launch(&mut self, permit: StartPermit) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        let (id, request, viewer) = *pending;
        let request = request.data(self.client);
        self.generation += 1;
        let generation = self.generation;
        let protocol = self.protocol;
        let mut replies = self.api.execute_stream(request, viewer, permit);
        let frame_id = id.clone();
        let frames = async_stream::stream! {
            let id = frame_id;
            let data_type = match protocol {
                Protocol::TransportWs => "next",
                Protocol::Legacy => "data",
            };
            let mut first = true;
            // The id as a JSON string, once: shared payloads are framed around it as text.
            let quoted_id = serde_json::Value::from(id.as_str()).to_string();
            while let Some(reply) = replies.next().await {
                let response = match reply {
                    Reply::Shared(payload) => {
                        first = false;
                        yield OpFrame { text: raw_frame(data_type, &quoted_id, &payload), last: false };
                        continue;
                    }
                    Reply::Response(response) => response,
                };
                let failed =
                    response.data == async_graphql::Value::Null && !response.errors.is_empty();
                let never_ran = response.errors.iter().all(|e| e.path.is_empty());
                let failed_before_data = first && failed && never_ran;
                first = false;
                // Serialized straight into the frame's text, without a JSON tree in between.
                if failed_before_data {
                    // `error` ends the operation; no `complete` follows it.
                    yield OpFrame { text: frame("error", &id, &response.errors), last: true };
                    return;
                }
                yield OpFrame { text: frame(data_type, &id, &response), last: false };
            }
            let complete = json!({ "type": "complete", "id": id });
            yield OpFrame { text: complete.to_string(), last: true };
        };
        let (abort, registration) = AbortHandle::new_pair();
        let operation = Operation {
            id: id.clone(),
            generation,
            frames: std::sync::Mutex::new(Abortable::new(frames.boxed(), registration)),
        };
        self.streams.push(operation.into_future());
        self.operations.insert(id, (generation, abort));
    }

    /// Takes an operation's next frame (`None`: its stream ended): queues it and puts the
    /// operation back to be polled, or parks both when the queue is full. A last frame
    /// frees the id first, before the client can see `complete` and reuse it.
    fn on_frame(&mut self, frame: Option<OpFrame>, mut operation: Operation) {
        if operation.frames().is_aborted() {
            // Stopped by the client (or replaced); it was removed from `operations` then.
            return;
        }
        let last = frame.as_ref().is_none_or(|frame| frame.last);
        if last {
            let Operation { id, generation, .. } = &operation;
            if self
                .operations
                .get(id)
                .is_some_and(|(g, _)| g == generation)
            {
                self.operations.remove(id);
            }
        }
        let Some(frame) = frame else { return };
        if !self.stalled.is_empty() {
            // Behind parked frames: wait in line (a parked last frame's operation, put back
            // once its frame is queued, just ends).
            self.stalled.push_back((frame.text, operation));
            return;
        }
        match self.out.try_send(Outgoing::Text(frame.text)) {
            Ok(()) => {
                if !last {
                    self.streams.push(operation.into_future());
                }
            }
            Err(mpsc::error::TrySendError::Full(Outgoing::Text(text))) => {
                self.stalled.push_back((text, operation));
            }
            // The writer is gone: the connection is ending.
            Err(_) => {}
        }
    }
}

/// `{"type":…,"id":…,"payload":…}` around a payload that is JSON text already (a shared
/// rendering): this runs once per event and subscriber, so it is only copying.
fn raw_frame(kind: &str, quoted_id: &str, payload: &str) -> String {
    let mut text = String::with_capacity(30 + kind.len() + quoted_id.len() + payload.len());
    text.push_str(r#"{"type":""#);
    text.push_str(kind);
    text.push_str(r#"","id":"#);
    text.push_str(quoted_id);
    text.push_str(r#","payload":"#);
    text.push_str(payload);
    text.push('}');
    text
}

/// `{"type":…,"id":…,"payload":…}` as text.
fn frame<P: serde::Serialize>(kind: &str, id: &str, payload: &P) -> String {
    #[derive(serde::Serialize)]
    struct Envelope<'a, P> {
        #[serde(rename = "type")]
        kind: &'a str,
        id: &'a str,
        payload: &'a P,
    }
    match serde_json::to_string(&Envelope { kind, id, payload }) {
        Ok(text) => text,
        Err(err) => {
            // Only a map with non-string keys fails; a GraphQL response has none.
            tracing::error!(error = %err, "a response could not be serialized");
            json!({
                "type": "error",
                "id": id,
                "payload": [{ "message": "internal error", "extensions": { "code": "INTERNAL_SERVER_ERROR" } }]
            })
            .to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_prefers_the_current_protocol_and_refuses_others() {
        assert_eq!(
            Protocol::negotiate(["graphql-ws, graphql-transport-ws"]),
            Some(Protocol::TransportWs)
        );
        assert_eq!(Protocol::negotiate(["graphql-ws"]), Some(Protocol::Legacy));
        assert_eq!(Protocol::negotiate(["mqtt"]), None);
        assert_eq!(Protocol::negotiate([]), None);
    }

    /// Arbitrary JSON of the message shape: `type` from the protocol (or not), `id`,
    /// `payload` of any kind.
    fn message_like() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            ".{0,12}".prop_map(Value::from),
        ];
        let value = leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map("[a-z]{1,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        });
        let kind = prop_oneof![
            Just("connection_init"),
            Just("ping"),
            Just("pong"),
            Just("subscribe"),
            Just("complete"),
            Just("start"),
            Just("stop"),
            Just("connection_terminate"),
            Just("other"),
        ];
        (kind, ".{0,8}", value).prop_map(|(kind, id, payload)| {
            json!({ "type": kind, "id": id, "payload": payload }).to_string()
        })
    }

    proptest::proptest! {
        /// The decoders take any text (including any message-shaped JSON) without panicking,
        /// and `authorization` finds the token key of any payload or nothing.
        #[test]
        fn any_text_decodes_or_is_refused(text in ".*") {
            let _ = serde_json::from_str::<TransportMessage>(&text);
            let _ = serde_json::from_str::<LegacyMessage>(&text);
        }

        #[test]
        fn any_message_shaped_json_decodes_or_is_refused(text in message_like()) {
            let transport = serde_json::from_str::<TransportMessage>(&text);
            let _ = serde_json::from_str::<LegacyMessage>(&text);
            let value: Value = serde_json::from_str(&text).expect("generated JSON");
            let _ = authorization(value.get("payload"));
            // A subscribe decodes only with its id as sent (a payload without a query then
            // fails as an empty document and gets an `error`).
            if let Ok(TransportMessage::Subscribe { id, .. }) = transport {
                proptest::prop_assert_eq!(Some(id.as_str()), value["id"].as_str());
            }
        }
    }

    #[test]
    fn authorization_key_is_matched_in_any_case() {
        let payload = json!({ "Authorization": "Bearer x" });
        assert_eq!(authorization(Some(&payload)), Some("Bearer x"));
        let payload = json!({ "headers": { "authorization": "Bearer x" } });
        assert_eq!(authorization(Some(&payload)), None);
        assert_eq!(authorization(None), None);
    }

    #[test]
    fn client_messages_decode() {
        let message: TransportMessage = serde_json::from_str(
            r#"{"type":"subscribe","id":"1","payload":{"query":"subscription { x }"}}"#,
        )
        .unwrap();
        assert!(matches!(message, TransportMessage::Subscribe { id, .. } if id == "1"));
        assert!(serde_json::from_str::<TransportMessage>(r#"{"type":"nope"}"#).is_err());
        assert!(
            serde_json::from_str::<TransportMessage>(r#"{"type":"subscribe","id":"1"}"#).is_err()
        );
    }
}
