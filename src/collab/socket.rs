//! One y-websocket peer: a socket at `/yjs/{documentId}?access_token=...`.
//!
//! The upgrade is accepted first (a browser cannot read an HTTP refusal), then:
//! no valid token closes with 4401, a non-member or a document that does not exist with
//! 4403, before any content is sent. A member's socket then follows the document's updates
//! on the feed (`live::documents`: ordered, once each, ended by the document's deletion or the
//! member's removal, which closes with 4403), answers the peer's state vector with what it
//! lacks, stores every update it sends (`graphql::YjsWrites`, so every writer, process and
//! transport sees it in the feed), and relays awareness (`awareness`). Each socket reads at
//! most `RATE` messages a second: a flooding peer only slows itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;
use tokio::time::Instant;

use yrs::updates::encoder::Encode as _;

use super::awareness::{self, Rooms};
use super::protocol::{self, Incoming};
use crate::auth::{JwtKeys, Viewer};
use crate::graphql::Api;
use crate::live::{Follower, LiveError, Next, Opening, documents};
use crate::store::{self, StoreError, yjs::BadUpdate};

/// Messages a socket may send per second, sustained; `BURST` at once.
const RATE: f64 = 50.0;
const BURST: f64 = 100.0;

/// Messages one WebSocket frame may hold.
const MAX_MESSAGES_PER_FRAME: usize = 16;

/// Tells sockets apart in a room (whose awareness states are whose).
static NEXT_SOCKET: AtomicU64 = AtomicU64::new(1);

/// What every y-websocket socket shares.
#[derive(Clone)]
pub struct Endpoint {
    pub api: Api,
    pub keys: JwtKeys,
    pub rooms: Arc<Rooms>,
    /// The largest Yjs update taken, in bytes of base64 (`--max-document-update-bytes`).
    pub max_update_base64: usize,
    /// How often the server pings (`--ws-keep-alive-secs`); a peer that sends nothing,
    /// not even a pong, for three of these is gone (a half-open connection), and its socket
    /// ends, giving back its subscription slot and its awareness.
    pub keep_alive: Duration,
    pub shutdown: watch::Receiver<bool>,
}

impl Endpoint {
    /// The largest WebSocket message a peer may send: an update at the limit, or an
    /// awareness update, with room to see one past it.
    pub fn max_message_bytes(&self) -> usize {
        // Room to read one over the limit and refuse it with 4413 (a message past this
        // is cut off by the WebSocket layer, which y-websocket retries).
        2 * self.max_update_base64.max(awareness::MAX_UPDATE_BYTES) + 64
    }
}

type Sink = SplitSink<WebSocket, Message>;

/// Why a socket ends: a close code and reason for the peer (none when it is already gone).
struct Close(u16, &'static str);

/// Serves one socket for document `document` (the path's id, unchecked) with `token` (the
/// `access_token` parameter, or an `Authorization` header's bearer token).
pub async fn serve(socket: WebSocket, endpoint: Endpoint, document: String, token: Option<String>) {
    let (mut sink, mut stream) = socket.split();
    let close = match Peer::open(&endpoint, &document, token).await {
        Ok((peer, first)) => {
            let rooms = endpoint.rooms.clone();
            let (id, socket) = (peer.document, peer.socket);
            let close = peer.run(&endpoint, &mut sink, &mut stream, first).await;
            rooms.leave(id, socket);
            close
        }
        Err(close) => Some(close),
    };
    if let Some(Close(code, reason)) = close {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        if sink.send(Message::Close(Some(frame))).await.is_ok() {
            // The closing handshake: read (and drop) what the peer still sends until its
            // close, so the connection is not reset under unread data, which a client would
            // see as 1006 instead of our code.
            let _ = tokio::time::timeout(CLOSING, async {
                while let Some(Ok(message)) = stream.next().await {
                    if matches!(message, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
        }
    }
    let _ = sink.close().await;
}

/// How long a closing socket waits for the peer's close.
const CLOSING: Duration = Duration::from_secs(2);

/// A checked peer of a document.
struct Peer {
    document: i64,
    /// The document's channel.
    channel: i64,
    viewer: i64,
    socket: u64,
    follower: Follower,
    room: awareness::Membership,
    /// When the token expires.
    expires: Option<Instant>,
    /// The document as read when the socket opened: it answers the peer's first state vector
    /// (the follower passes over what it holds), then is dropped.
    opened_with: Option<store::yjs::Loaded>,
    bucket: Bucket,
    /// Counts the peer in `/metrics` while it lives.
    _counted: Counted,
}

/// One y-websocket peer in the broker's `yjs_peers`, until dropped.
struct Counted(Arc<crate::pubsub::Broker>);

impl Counted {
    fn new(broker: &Arc<crate::pubsub::Broker>) -> Self {
        broker.stats.yjs_peers.fetch_add(1, Ordering::Relaxed);
        Self(broker.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.stats.yjs_peers.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Peer {
    /// Checks the token, the document and membership (in that order, answering nothing
    /// else before), opens the document's feed and joins its room; returns the peer and its
    /// first messages (our state vector, then who is here).
    async fn open(
        endpoint: &Endpoint,
        document: &str,
        token: Option<String>,
    ) -> Result<(Peer, Vec<Vec<u8>>), Close> {
        let authorization = token.map(|token| format!("Bearer {token}"));
        let viewer = match Viewer::from_authorization(authorization.as_deref(), &endpoint.keys) {
            Viewer::User(viewer) => viewer,
            Viewer::Anonymous | Viewer::InvalidToken => {
                return Err(Close(
                    protocol::UNAUTHORIZED,
                    "a valid token is required: params { access_token }",
                ));
            }
        };
        let expires = Viewer::deadline(authorization.as_deref(), &endpoint.keys);
        // A document that does not exist is refused like someone else's: ids cannot be probed.
        let forbidden = Close(
            protocol::FORBIDDEN,
            "only members of the document's channel may open it",
        );
        let Ok(id) = document.parse::<i64>() else {
            return Err(forbidden);
        };
        let api = &endpoint.api;
        let slot = api.quota().acquire(viewer).ok_or(Close(
            protocol::TOO_MANY,
            "too many open subscriptions for this user",
        ))?;
        let internal = |err: &dyn std::fmt::Display| {
            tracing::error!(document = id, error = %err, "cannot open a y-websocket peer");
            Close(protocol::INTERNAL, "internal server error")
        };
        let db = api.db();
        let found = store::document::find(db, id)
            .await
            .map_err(|err| internal(&err))?
            .ok_or(Close(forbidden.0, forbidden.1))?;
        // Subscribed before membership is checked: a removal after the check is an event.
        let opening = Opening::new(api.broker(), found.channel_id);
        if !store::channel::is_member(db, found.channel_id, viewer)
            .await
            .map_err(|err| internal(&err))?
        {
            return Err(forbidden);
        }
        if store::yjs::needs_history(db, id)
            .await
            .map_err(|err| internal(&err))?
        {
            api.committed()
                .write(move |db| Box::pin(async move { store::yjs::begin_history(&db, id).await }))
                .await
                .map_err(|err| internal(&err))?;
        }
        let sync = match store::yjs::load_for_sync(db, id).await {
            Ok(sync) => sync,
            Err(StoreError::NotFound(_)) => return Err(forbidden),
            Err(err) => return Err(internal(&err)),
        };
        let mut follower = opening.follow(db.clone(), viewer, None, documents::filter(id), slot);
        follower.skip_versions_through(sync.loaded.last_version);
        let room = endpoint.rooms.join(id);
        let mut first = vec![protocol::sync_step1(sync.loaded.vector())];
        first.extend(room.known.clone());
        Ok((
            Peer {
                document: id,
                channel: found.channel_id,
                viewer,
                socket: NEXT_SOCKET.fetch_add(1, Ordering::Relaxed),
                follower,
                room,
                expires,
                opened_with: Some(sync.loaded),
                bucket: Bucket::new(),
                _counted: Counted::new(api.broker()),
            },
            first,
        ))
    }

    /// Runs until either side ends; returns how to close.
    async fn run(
        mut self,
        endpoint: &Endpoint,
        sink: &mut Sink,
        stream: &mut SplitStream<WebSocket>,
        first: Vec<Vec<u8>>,
    ) -> Option<Close> {
        for message in first {
            send(sink, message).await.ok()?;
        }
        let mut shutdown = endpoint.shutdown.clone();
        if *shutdown.borrow_and_update() {
            return Some(Close(protocol::RESTARTING, "the server is restarting"));
        }
        let expiry = tokio::time::sleep_until(
            self.expires
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 24 * 3600)),
        );
        tokio::pin!(expiry);
        let mut ping =
            tokio::time::interval_at(Instant::now() + endpoint.keep_alive, endpoint.keep_alive);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    return Some(Close(protocol::RESTARTING, "the server is restarting"));
                }
                _ = ping.tick() => {
                    if heard.elapsed() >= endpoint.keep_alive * 3 {
                        tracing::debug!(document = self.document, "a y-websocket peer stopped answering; its socket ends");
                        return None;
                    }
                    let ping = sink.send(Message::Ping(Default::default()));
                    tokio::time::timeout(SEND_PATIENCE, ping).await.ok()?.ok()?;
                }
                _ = &mut expiry => {
                    return Some(Close(protocol::UNAUTHORIZED, "the token expired"));
                }
                next = self.follower.next() => match next {
                    Some(Next::Event(event)) => {
                        let Some(update) = documents::update_of(&event)
                            .and_then(|(_, update)| STANDARD.decode(update).ok())
                        else {
                            continue;
                        };
                        send(sink, protocol::update(update)).await.ok()?;
                    }
                    // This follower never hands off (`hand_off_when_live`).
                    Some(Next::Live) => {}
                    Some(Next::Error(LiveError::Revoked)) => {
                        return Some(Close(protocol::FORBIDDEN, "you are no longer a member of this channel"));
                    }
                    Some(Next::Error(err)) => {
                        tracing::error!(document = self.document, error = %err, "a y-websocket peer's feed failed");
                        return Some(Close(protocol::INTERNAL, "internal server error"));
                    }
                    None if *shutdown.borrow() => {
                        return Some(Close(protocol::RESTARTING, "the server is restarting"));
                    }
                    None => return Some(Close(protocol::FORBIDDEN, "the document was deleted")),
                },
                relayed = self.room.receiver.recv() => match relayed {
                    // The sender's own states come back too: y-websocket closes a connection
                    // that hears nothing for 30 s, and a lone peer's renewals (every 15 s)
                    // are all it would hear. y-websocket's own server does the same.
                    Ok(relayed) => {
                        send(sink, relayed.message.to_vec()).await.ok()?;
                    }
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return None,
                },
                received = stream.next() => {
                    heard = Instant::now();
                    let bytes = match received {
                        Some(Ok(Message::Binary(bytes))) => bytes,
                        Some(Ok(Message::Text(_))) => {
                            return Some(Close(protocol::BAD_MESSAGE, "y-websocket messages are binary"));
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
                    };
                    let Some(messages) = protocol::decode(&bytes) else {
                        return Some(Close(protocol::BAD_MESSAGE, "not a y-protocols message"));
                    };
                    // y-websocket sends one message per frame; a few more are tolerated.
                    if messages.len() > MAX_MESSAGES_PER_FRAME {
                        return Some(Close(protocol::BAD_MESSAGE, "too many messages in one frame"));
                    }
                    for message in messages {
                        self.bucket.take().await;
                        if let Err(close) = self.handle(endpoint, sink, message).await {
                            return close;
                        }
                    }
                    // Nothing was read while this frame was handled (a write can wait on the
                    // document's lock): the silence counts from here.
                    heard = Instant::now();
                }
            }
        }
    }

    /// Handles one message of the peer; `Err` ends the socket (closing with the code given,
    /// none when the socket is already gone).
    async fn handle(
        &mut self,
        endpoint: &Endpoint,
        sink: &mut Sink,
        message: Incoming,
    ) -> Result<(), Option<Close>> {
        match message {
            Incoming::SyncStep1(vector) => {
                let loaded = match self.opened_with.take() {
                    Some(loaded) => loaded,
                    None => self.read(endpoint).await?,
                };
                let answer = protocol::sync_step2(loaded.diff_v1(&vector));
                send(sink, answer).await
            }
            Incoming::Update(bytes) => {
                // The flag counts base64, as `applyDocumentUpdate` takes it.
                if bytes.len().div_ceil(3) * 4 > endpoint.max_update_base64 {
                    return Err(Some(Close(
                        protocol::TOO_BIG,
                        "the update is over the server's limit",
                    )));
                }
                let not_yjs = || {
                    Some(Close(
                        protocol::BAD_MESSAGE,
                        "the update is not a Yjs v1 update",
                    ))
                };
                // Decoded here first, so that garbage never reaches a write.
                let decoded = store::yjs::decode_v1(&bytes).map_err(|_| not_yjs())?;
                if decoded.is_empty() {
                    return Ok(());
                }
                self.apply(endpoint, sink, bytes).await
            }
            Incoming::Awareness(update) => {
                if update.encode_v1().len() > awareness::MAX_UPDATE_BYTES {
                    return Err(Some(Close(
                        protocol::TOO_BIG,
                        "the awareness update is over 4096 bytes",
                    )));
                }
                endpoint.rooms.publish(self.document, self.socket, update);
                Ok(())
            }
            Incoming::AwarenessQuery => match endpoint.rooms.known(self.document) {
                Some(known) => send(sink, known).await,
                None => Ok(()),
            },
            Incoming::Other => Ok(()),
        }
    }

    /// Stores the peer's update; the feed brings it back to every peer, this one included.
    async fn apply(
        &mut self,
        endpoint: &Endpoint,
        sink: &mut Sink,
        update: Vec<u8>,
    ) -> Result<(), Option<Close>> {
        let (viewer, id) = (self.viewer, self.document);
        let applied = endpoint.api.yjs_writes().apply(viewer, id, update).await;
        match applied {
            Ok(_) => Ok(()),
            // It builds on something the server lacks (an edit made offline, sent before the
            // peer answered our state vector): ask again; its answer brings everything.
            Err(StoreError::BadUpdate(BadUpdate::MissingDependencies)) => {
                let loaded = self.read(endpoint).await?;
                send(sink, protocol::sync_step1(loaded.vector())).await
            }
            Err(StoreError::BadUpdate(BadUpdate::TooLong)) => Err(Some(Close(
                protocol::BAD_MESSAGE,
                "the text would be longer than 100000 characters",
            ))),
            Err(StoreError::BadUpdate(BadUpdate::Nul)) => Err(Some(Close(
                protocol::BAD_MESSAGE,
                "the text would contain a NUL character",
            ))),
            Err(StoreError::BadUpdate(_)) => Err(Some(Close(
                protocol::BAD_MESSAGE,
                "the update changes something other than the text `body`, or is not a Yjs update",
            ))),
            Err(StoreError::NotFound(_) | StoreError::Forbidden(_)) => Err(Some(Close(
                protocol::FORBIDDEN,
                "only members of the document's channel may edit it",
            ))),
            Err(err) => Err(self.failed(err)),
        }
    }

    /// The document as stored now.
    /// The document as stored now, for a member still (a removal not yet seen on the feed
    /// must not be answered with what was written after it).
    async fn read(&self, endpoint: &Endpoint) -> Result<store::yjs::Loaded, Option<Close>> {
        let db = endpoint.api.db();
        match store::channel::is_member(db, self.channel, self.viewer).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(Some(Close(
                    protocol::FORBIDDEN,
                    "you are no longer a member of this channel",
                )));
            }
            Err(err) => return Err(self.failed(err)),
        }
        match store::yjs::load_for_sync(db, self.document).await {
            Ok(sync) => Ok(sync.loaded),
            Err(StoreError::NotFound(_)) => {
                Err(Some(Close(protocol::FORBIDDEN, "the document was deleted")))
            }
            Err(err) => Err(self.failed(err)),
        }
    }

    fn failed(&self, err: StoreError) -> Option<Close> {
        tracing::error!(document = self.document, error = %err, "a y-websocket peer failed");
        Some(Close(protocol::INTERNAL, "internal server error"))
    }
}

/// Sends a binary message; `Err(None)` when the peer is gone, or has taken nothing for
/// `SEND_PATIENCE` (a half-open connection in a busy room fills its buffer and would hold
/// the socket's loop, pings included, until TCP gave up).
async fn send(sink: &mut Sink, message: Vec<u8>) -> Result<(), Option<Close>> {
    match tokio::time::timeout(SEND_PATIENCE, sink.send(Message::Binary(message.into()))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) | Err(_) => Err(None),
    }
}

/// How long a send may wait for the peer to take it.
const SEND_PATIENCE: Duration = Duration::from_secs(30);
/// A token bucket: `RATE` messages a second, `BURST` at once. Taking from an empty bucket
/// waits, so the socket reads no further until it refills.
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new() -> Self {
        Self {
            tokens: BURST,
            at: Instant::now(),
        }
    }

    async fn take(&mut self) {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * RATE).min(BURST);
        self.at = now;
        if self.tokens < 1.0 {
            let wait = Duration::from_secs_f64((1.0 - self.tokens) / RATE);
            tokio::time::sleep(wait).await;
            self.tokens = 1.0;
            self.at = Instant::now();
        }
        self.tokens -= 1.0;
    }
}
