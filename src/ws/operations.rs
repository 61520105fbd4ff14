//! A socket's operations: which ids run, their frame streams (driven by the socket's own
//! task), the frames parked while the client does not read, and the operation waiting for
//! its start permit.

use std::collections::{HashMap, VecDeque};

use futures_util::stream::{AbortHandle, Abortable, BoxStream, FuturesUnordered, StreamFuture};
use futures_util::{FutureExt, StreamExt};
use serde_json::json;
use tokio::sync::mpsc;

use super::protocol::{Dialect, frame, raw_frame};
use super::writer::Outgoing;
use crate::auth::Viewer;
use crate::graphql::error;
use crate::graphql::limits::ClientAddr;
use crate::graphql::{Api, Reply, StartPermit};

/// How many frames of its operations a socket's task queues before it looks at the socket
/// again.
const MAX_FRAMES_PER_TURN: usize = 1024;

/// One frame of an operation, and whether it is its last (`complete`, or `error`).
pub(super) struct OpFrame {
    text: String,
    last: bool,
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

/// The operations of one socket.
pub(super) struct Operations {
    dialect: &'static Dialect,
    /// Operation results; bounded, so a client that does not read slows its operations.
    out: mpsc::Sender<Outgoing>,
    /// The running operations by id: which generation (distinguishing a finished operation
    /// from a newer one that reuses its id) and how to stop it.
    running: HashMap<String, (u64, AbortHandle)>,
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
    stalled: VecDeque<(String, Operation)>,
    /// An operation read from the socket, waiting for its start permit.
    pending: Option<Box<(String, async_graphql::Request, Viewer)>>,
}

impl Operations {
    pub fn new(dialect: &'static Dialect, out: mpsc::Sender<Outgoing>) -> Self {
        Self {
            dialect,
            out,
            running: HashMap::new(),
            generation: 0,
            streams: FuturesUnordered::new(),
            stalled: VecDeque::new(),
            pending: None,
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

    /// Whether any operation has frames to come.
    pub fn has_streams(&self) -> bool {
        !self.streams.is_empty()
    }

    /// Whether frames wait for room in the outgoing queue.
    pub fn has_stalled(&self) -> bool {
        !self.stalled.is_empty()
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

    /// With room for one frame in the outgoing queue: the parked frames go first, in order,
    /// as far as the queue takes them.
    pub fn unpark(&mut self, room: mpsc::Permit<'_, Outgoing>) {
        if let Some((text, operation)) = self.stalled.pop_front() {
            room.send(Outgoing::Text(text));
            self.streams.push(operation.into_future());
        }
        while let Some((text, operation)) = self.stalled.pop_front() {
            match self.out.try_send(Outgoing::Text(text)) {
                Ok(()) => self.streams.push(operation.into_future()),
                Err(err) => {
                    if let mpsc::error::TrySendError::Full(Outgoing::Text(text)) = err {
                        self.stalled.push_front((text, operation));
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
    pub fn start(&mut self, api: &Api, client: ClientAddr, permit: StartPermit) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        let (id, request, viewer) = *pending;
        let request = request.data(client);
        self.generation += 1;
        let generation = self.generation;
        let data_type = self.dialect.data;
        let mut replies = api.execute_stream(request, viewer, permit);
        let frame_id = id.clone();
        let frames = async_stream::stream! {
            let id = frame_id;
            let mut first = true;
            // The id as a JSON string, once: shared payloads are framed around it as text.
            let quoted_id = serde_json::Value::from(id.as_str()).to_string();
            while let Some(reply) = replies.next().await {
                let response = match reply {
                    // A socket's clients resume with `after` from an event's cursor.
                    Reply::Following { .. } => continue,
                    Reply::Shared { json: payload, .. } => {
                        first = false;
                        yield OpFrame { text: raw_frame(data_type, &quoted_id, &payload), last: false };
                        continue;
                    }
                    Reply::Response(response) => response,
                };
                let failed_before_data = first && error::is_request_error(&response);
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
        self.running.insert(id, (generation, abort));
    }

    /// Stops `id` (the client completed it, or the legacy protocol replaces it).
    pub fn stop(&mut self, id: &str) {
        let Some((generation, abort)) = self.running.remove(id) else {
            return;
        };
        // Woken by the abort, it ends and is dropped the next time the connection polls
        // its operations; a parked one is dropped here.
        abort.abort();
        self.stalled
            .retain(|(_, operation)| !(operation.id == id && operation.generation == generation));
    }

    /// Takes an operation's next frame (`None`: its stream ended): queues it and puts the
    /// operation back to be polled, or parks both when the queue is full. A last frame
    /// frees the id first, before the client can see `complete` and reuse it.
    fn on_frame(&mut self, frame: Option<OpFrame>, mut operation: Operation) {
        if operation.frames().is_aborted() {
            // Stopped by the client (or replaced); it was removed from `running` then.
            return;
        }
        let last = frame.as_ref().is_none_or(|frame| frame.last);
        if last {
            let Operation { id, generation, .. } = &operation;
            if self.running.get(id).is_some_and(|(g, _)| g == generation) {
                self.running.remove(id);
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

    /// At shutdown (the hub is closed, so each subscription ends): sends the parked frames
    /// and every operation's remaining frames, its `complete` included, waiting for room.
    pub async fn drain(&mut self) {
        while let Some((text, operation)) = self.stalled.pop_front() {
            if self.out.send(Outgoing::Text(text)).await.is_err() {
                return;
            }
            self.streams.push(operation.into_future());
        }
        while let Some((frame, mut operation)) = self.streams.next().await {
            let last = frame.as_ref().is_none_or(|frame| frame.last);
            if let Some(frame) = frame
                && !operation.frames().is_aborted()
                && self.out.send(Outgoing::Text(frame.text)).await.is_err()
            {
                return;
            }
            if !last {
                self.streams.push(operation.into_future());
            }
        }
    }
}
