//! A socket's operations: which ids run, their frame streams while they start or catch up
//! (driven by the socket's own task), the inbox through which the subscriptions that have
//! caught up receive their events (framed here around each id), the frames parked while
//! the client does not read, and the operation waiting for its start permit.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use futures_util::stream::{AbortHandle, Abortable, BoxStream, FuturesUnordered, StreamFuture};
use futures_util::{FutureExt, StreamExt};
use serde_json::json;
use tokio::sync::mpsc;

use super::protocol::{Dialect, frame, raw_frame};
use super::writer::Outgoing;
use crate::auth::Viewer;
use crate::graphql::error;
use crate::graphql::limits::ClientAddr;
use crate::graphql::{Api, Keep, Replies, Reply, StartPermit, Target};
use crate::live::cohorts::{Delivery, Inbox};

/// How many frames of its operations a socket's task queues before it looks at the socket
/// again.
const MAX_FRAMES_PER_TURN: usize = 1024;

/// How many deliveries of the socket's inbox one turn of its task frames.
const MAX_DELIVERIES_PER_TURN: usize = 1024;

/// A batch of framed deliveries is sent to the writer once it holds this many bytes: the
/// outgoing queue (256 frames or batches) then holds about 4 MiB at most for a client that
/// stops reading, before its subscriptions' deliveries wait in the inbox and then fall
/// behind to the log. (4 KiB batches sent busy but reading clients behind too often:
/// saturation fell to 0.52-0.75x the ceiling.) A larger inbox instead (16,384) broke the
/// bound on a stalled client's memory.
const BATCH_BYTES: usize = 16 * 1024;

/// What an operation's stream gives the socket.
pub(super) enum OpFrame {
    /// A frame, and whether it is its operation's last (`complete`, or `error`).
    Text { text: String, last: bool },
    /// The subscription joined its topic's cohorts: its events arrive in the socket's
    /// inbox from here on, and its stream ends.
    Joined { topic: i64, keep: Keep },
}

/// A running operation: its frames, tagged with its id and generation, until stopped.
pub(super) struct Operation {
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

/// An operation's next frame (`None`: its stream ended), with the operation.
pub(super) type Ready = (Option<OpFrame>, Operation);

/// A subscription whose events come through the socket's inbox. Small: there may be
/// 10,000 per process, idle most of the time.
struct JoinedOp {
    /// The operation's id as a JSON string: deliveries are framed around it.
    quoted: Box<str>,
    topic: i64,
    keep: Keep,
}

impl JoinedOp {
    /// The operation's id.
    fn id(&self) -> String {
        serde_json::from_str(&self.quoted).unwrap_or_default()
    }
}

/// The operations of one socket.
pub(super) struct Operations {
    dialect: &'static Dialect,
    api: Api,
    /// Operation results; bounded, so a client that does not read slows its operations.
    out: mpsc::Sender<Outgoing>,
    /// The running operations by id: which generation (distinguishing a finished operation
    /// from a newer one that reuses its id) and how to stop it.
    /// (A joined subscription has no stream to abort.)
    running: HashMap<String, (u64, Option<AbortHandle>)>,
    generation: u64,
    /// The operations' frame streams while they start or catch up, driven by the
    /// connection's own task: one wake-up of this task queues the frames of every ready
    /// operation before its writer runs. Each is polled only when it was woken.
    streams: FuturesUnordered<StreamFuture<Operation>>,
    /// The socket's inbox: the events of its subscriptions that have caught up (members of
    /// their topics' cohorts), each a shared rendering with its operation's key
    /// (generation). Framed here into one buffer, with no text made per subscription.
    inbox: Arc<Inbox>,
    /// Subscriptions delivering through the inbox, by key.
    joined: HashMap<u64, JoinedOp>,
    /// Frames (or batches) that did not fit the outgoing queue, with the operation whose
    /// frame it was. Each such operation is polled again only once its frame is queued, so
    /// a client that does not read slows its own operations, while every operation still
    /// finishes the work it is in (a shared rendering others wait for, a query holding a
    /// pooled connection): it is only ever parked between frames. The inbox is not read
    /// while anything is parked (its subscribers then fall behind it and catch up from the
    /// log).
    stalled: VecDeque<(Outgoing, Option<Operation>)>,
    /// An operation read from the socket, waiting for its start permit.
    pending: Option<Box<(String, async_graphql::Request, Viewer)>>,
    /// Deliveries taken from the inbox, reused between turns.
    taken: Vec<Delivery>,
}

impl Operations {
    pub fn new(dialect: &'static Dialect, api: Api, out: mpsc::Sender<Outgoing>) -> Self {
        Self {
            dialect,
            api,
            out,
            running: HashMap::new(),
            generation: 0,
            streams: FuturesUnordered::new(),
            inbox: Inbox::new(),
            joined: HashMap::new(),
            stalled: VecDeque::new(),
            pending: None,
            taken: Vec::new(),
        }
    }

    /// How many run.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    /// Whether `id` runs.
    pub fn runs(&self, id: &str) -> bool {
        self.running.contains_key(id)
    }

    /// Whether an operation waits for its start permit.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Whether any operation has frames to come from its own stream.
    pub fn has_streams(&self) -> bool {
        !self.streams.is_empty()
    }

    /// Whether frames wait for room in the outgoing queue.
    pub fn has_stalled(&self) -> bool {
        !self.stalled.is_empty()
    }

    /// Whether the inbox may be read now (nothing parked before it); also when no
    /// subscription is joined any more, so that what is left for stopped ones is freed.
    pub fn reads_inbox(&self) -> bool {
        self.stalled.is_empty() && (!self.joined.is_empty() || !self.inbox.is_empty())
    }

    /// Resolves when the inbox may hold deliveries.
    pub fn inbox(&self) -> Arc<Inbox> {
        self.inbox.clone()
    }

    /// The next operation with a frame ready.
    pub async fn next_ready(&mut self) -> Option<Ready> {
        self.streams.next().await
    }

    /// Queues `ready`'s frame, then every other frame that is ready now, without going
    /// round the connection's loop for each (bounded, so the socket is still read).
    pub fn take_ready(&mut self, ready: Ready) {
        let mut next = Some(ready);
        let mut taken = 0;
        while let Some((frame, operation)) = next.take() {
            self.on_frame(frame, operation);
            taken += 1;
            if taken == MAX_FRAMES_PER_TURN {
                break;
            }
            // A pending poll here registers no waker that matters: the loop polls the
            // operations again, with its own, before it waits.
            next = self.streams.next().now_or_never().flatten();
        }
    }

    /// Frames what the inbox holds (up to a turn's worth) into batches for the writer, in
    /// order: each delivery is the shared rendering written into the batch's buffer around
    /// its operation's id.
    pub fn deliver(&mut self) {
        let mut taken = std::mem::take(&mut self.taken);
        self.inbox.take(MAX_DELIVERIES_PER_TURN, &mut taken);
        let mut batch = Batch::default();
        for delivery in taken.drain(..) {
            match delivery {
                Delivery::Render { key, rendered, .. } => {
                    let (Some(op), Some(json)) = (self.joined.get_mut(&key), &rendered.json) else {
                        continue;
                    };
                    op.keep.count(&self.api, &rendered.codes);
                    batch.frame(self.dialect.data, &op.quoted, json);
                }
                Delivery::End { key } => {
                    let Some(op) = self.joined.remove(&key) else {
                        continue;
                    };
                    let id = op.id();
                    if self.running.get(&id).is_some_and(|(g, _)| *g == key) {
                        self.running.remove(&id);
                    }
                    batch.complete(&op.quoted);
                }
                Delivery::Behind(member) => {
                    let key = member.key;
                    let Some(op) = self.joined.remove(&key) else {
                        continue;
                    };
                    // Catches up with its own follower; its frames follow what is framed
                    // so far (this batch is queued before the stream is first polled).
                    let target = Target::Shared {
                        inbox: self.inbox.clone(),
                        key,
                    };
                    let id = op.id();
                    let replies = self.api.resume(*member, target, op.keep);
                    self.run(id, key, replies, false);
                }
            }
            if batch.bytes.len() >= BATCH_BYTES {
                self.send(std::mem::take(&mut batch).into_outgoing(), None);
            }
        }
        self.taken = taken;
        if !batch.ends.is_empty() {
            self.send(batch.into_outgoing(), None);
        }
    }

    /// Queues `outgoing` (with the operation whose frame it is, put back to be polled once
    /// it is queued), or parks both when the queue is full or something is parked already.
    fn send(&mut self, outgoing: Outgoing, operation: Option<Operation>) {
        if !self.stalled.is_empty() {
            self.stalled.push_back((outgoing, operation));
            return;
        }
        match self.out.try_send(outgoing) {
            Ok(()) => {
                if let Some(operation) = operation {
                    self.streams.push(operation.into_future());
                }
            }
            Err(mpsc::error::TrySendError::Full(outgoing)) => {
                self.stalled.push_back((outgoing, operation));
            }
            // The writer is gone: the connection is ending.
            Err(_) => {}
        }
    }

    /// With room for one frame in the outgoing queue: the parked frames go first, in order,
    /// as far as the queue takes them.
    pub fn unpark(&mut self, room: mpsc::Permit<'_, Outgoing>) {
        if let Some((outgoing, operation)) = self.stalled.pop_front() {
            room.send(outgoing);
            if let Some(operation) = operation {
                self.streams.push(operation.into_future());
            }
        }
        while let Some((outgoing, operation)) = self.stalled.pop_front() {
            match self.out.try_send(outgoing) {
                Ok(()) => {
                    if let Some(operation) = operation {
                        self.streams.push(operation.into_future());
                    }
                }
                Err(err) => {
                    if let mpsc::error::TrySendError::Full(outgoing) = err {
                        self.stalled.push_front((outgoing, operation));
                    }
                    break;
                }
            }
        }
    }

    /// Queues an operation to start once it has a start permit (`Api::start_permit`). The
    /// socket reads no further message meanwhile (a burst of subscriptions waits as unread
    /// bytes in the socket, not as queued operations in memory), but its running operations
    /// keep going: one of them may hold the permit it waits for.
    pub fn queue(&mut self, id: String, request: async_graphql::Request, viewer: Viewer) {
        self.pending = Some(Box::new((id, request, viewer)));
    }

    /// Starts the queued operation with its permit. It runs the operation: `next` (legacy
    /// `data`) per response, then `complete`. An operation that never runs (syntax or
    /// validation errors: errors without a path) gets one `error` message instead. As in the
    /// graphql-ws reference server, errors from resolvers, including a subscription refused
    /// at its start (FORBIDDEN, CURSOR_EXPIRED), arrive as `next` with `errors`, then
    /// `complete`.
    pub fn start(&mut self, client: ClientAddr, permit: StartPermit) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        let (id, request, viewer) = *pending;
        let request = request.data(client);
        self.generation += 1;
        let generation = self.generation;
        let target = Target::Shared {
            inbox: self.inbox.clone(),
            key: generation,
        };
        let replies = self.api.execute_stream(request, viewer, permit, target);
        self.run(id, generation, replies, true);
    }

    /// Drives `replies` as operation `id` (`generation`): a new operation (`fresh`: its
    /// first reply may be a request error), or a subscription catching up again.
    fn run(&mut self, id: String, generation: u64, mut replies: Replies, fresh: bool) {
        let data_type = self.dialect.data;
        let frame_id = id.clone();
        let frames = async_stream::stream! {
            let id = frame_id;
            let mut first = fresh;
            // The id as a JSON string, once: shared payloads are framed around it as text.
            let quoted_id = serde_json::Value::from(id.as_str()).to_string();
            while let Some(reply) = replies.next().await {
                let response = match reply {
                    // A socket's clients resume with `after` from an event's cursor.
                    Reply::Following { .. } => continue,
                    Reply::Joined { topic, keep } => {
                        yield OpFrame::Joined { topic, keep };
                        return;
                    }
                    Reply::Shared { json: payload, .. } => {
                        first = false;
                        yield OpFrame::Text { text: raw_frame(data_type, &quoted_id, &payload), last: false };
                        continue;
                    }
                    Reply::Response(response) => response,
                };
                let failed_before_data = first && error::is_request_error(&response);
                first = false;
                // Serialized straight into the frame's text, without a JSON tree in between.
                if failed_before_data {
                    // `error` ends the operation; no `complete` follows it.
                    yield OpFrame::Text { text: frame("error", &id, &response.errors), last: true };
                    return;
                }
                yield OpFrame::Text { text: frame(data_type, &id, &response), last: false };
            }
            let complete = json!({ "type": "complete", "id": id });
            yield OpFrame::Text { text: complete.to_string(), last: true };
        };
        let (abort, registration) = AbortHandle::new_pair();
        let operation = Operation {
            id: id.clone(),
            generation,
            frames: std::sync::Mutex::new(Abortable::new(frames.boxed(), registration)),
        };
        self.streams.push(operation.into_future());
        self.running.insert(id, (generation, Some(abort)));
    }

    /// Stops `id` (the client completed it, or the legacy protocol replaces it).
    pub fn stop(&mut self, id: &str) {
        let Some((generation, abort)) = self.running.remove(id) else {
            return;
        };
        // Woken by the abort, it ends and is dropped the next time the connection polls
        // its operations; a parked one is dropped here.
        if let Some(abort) = abort {
            abort.abort();
        }
        self.stalled.retain(|(_, operation)| {
            !operation
                .as_ref()
                .is_some_and(|op| op.id == id && op.generation == generation)
        });
        // A member of its topic's cohorts leaves them (its deliveries already in the inbox
        // find no operation and are dropped).
        if let Some(op) = self.joined.remove(&generation) {
            self.api
                .cohorts()
                .leave(op.topic, &self.inbox, Some(generation));
        }
    }

    /// Takes an operation's next frame (`None`: its stream ended): queues it and puts the
    /// operation back to be polled, or parks both when the queue is full. A last frame
    /// frees the id first, before the client can see `complete` and reuse it.
    fn on_frame(&mut self, frame: Option<OpFrame>, mut operation: Operation) {
        let (text, last) = match frame {
            Some(OpFrame::Joined { topic, keep }) => {
                let generation = operation.generation;
                if operation.frames().is_aborted() {
                    // Stopped while it joined.
                    self.api
                        .cohorts()
                        .leave(topic, &self.inbox, Some(generation));
                    return;
                }
                let quoted = serde_json::Value::from(operation.id.as_str()).to_string();
                // Its stream has ended: nothing to abort any more.
                if let Some((_, abort)) = self.running.get_mut(&operation.id) {
                    *abort = None;
                }
                let op = JoinedOp {
                    quoted: quoted.into(),
                    topic,
                    keep,
                };
                self.joined.insert(generation, op);
                return;
            }
            Some(OpFrame::Text { text, last }) => (Some(text), last),
            None => (None, true),
        };
        if operation.frames().is_aborted() {
            // Stopped by the client (or replaced); it was removed from `running` then.
            return;
        }
        if last {
            let Operation { id, generation, .. } = &operation;
            if self.running.get(id).is_some_and(|(g, _)| g == generation) {
                self.running.remove(id);
            }
        }
        let Some(text) = text else { return };
        let operation = (!last).then_some(operation);
        self.send(Outgoing::Text(text), operation);
    }

    /// At shutdown (the hub is closed, so each subscription ends): sends the parked frames
    /// and every operation's remaining frames and deliveries, each `complete` included,
    /// waiting for room.
    pub async fn drain(&mut self) {
        loop {
            while let Some((outgoing, operation)) = self.stalled.pop_front() {
                if self.out.send(outgoing).await.is_err() {
                    return;
                }
                if let Some(operation) = operation {
                    self.streams.push(operation.into_future());
                }
            }
            self.deliver();
            if !self.stalled.is_empty() {
                continue;
            }
            if self.streams.is_empty() && self.joined.is_empty() {
                return;
            }
            let inbox = self.inbox.clone();
            tokio::select! {
                Some((frame, operation)) = self.streams.next(), if !self.streams.is_empty() => {
                    self.on_frame(frame, operation);
                }
                _ = inbox.ready(), if !self.joined.is_empty() => {}
            }
        }
    }
}

impl Drop for Operations {
    /// The socket is gone: its subscriptions leave their cohorts.
    fn drop(&mut self) {
        self.inbox.close();
        let mut topics: Vec<i64> = self.joined.values().map(|op| op.topic).collect();
        topics.sort_unstable();
        topics.dedup();
        for topic in topics {
            self.api.cohorts().leave(topic, &self.inbox, None);
        }
    }
}

/// Deliveries framed into one buffer, sent to the writer as one queue item.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    /// Where each frame ends in `bytes`.
    ends: Vec<usize>,
}

impl Batch {
    /// `{"type":<kind>,"id":<quoted_id>,"payload":<payload>}`.
    fn frame(&mut self, kind: &str, quoted_id: &str, payload: &str) {
        for part in [
            r#"{"type":""#,
            kind,
            r#"","id":"#,
            quoted_id,
            r#","payload":"#,
            payload,
            "}",
        ] {
            self.bytes.extend_from_slice(part.as_bytes());
        }
        self.ends.push(self.bytes.len());
    }

    fn complete(&mut self, quoted_id: &str) {
        for part in [r#"{"type":"complete","id":"#, quoted_id, "}"] {
            self.bytes.extend_from_slice(part.as_bytes());
        }
        self.ends.push(self.bytes.len());
    }

    fn into_outgoing(self) -> Outgoing {
        Outgoing::Frames {
            bytes: self.bytes.into(),
            ends: self.ends,
        }
    }
}
