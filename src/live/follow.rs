//! One subscription to a topic (a channel), from a cursor, in the feed's one order.
//!
//! `Opening::new` subscribes to the topic first, then reads how far the log has been
//! published (`P`): every event after `P` reaches the receiver, every event up to `P` is in
//! the log. The caller then checks access (so a removal after `P` arrives as an event) and
//! the cursor (`check_cursor`), and makes a `Follower`. The follower replays `(after, P]`
//! (from the broker's memory of recent events when it still covers them, else the log, in
//! pages), then follows the topic, dropping what it already covered by position. When the
//! topic's buffer overflows (a slow reader) it catches up again from its last position
//! instead of failing or buffering. Losing membership ends it with `Revoked` before any
//! later event: the topic carries membership changes in the same order as everything else.

use std::collections::VecDeque;
use std::sync::Arc;

use entities::live::LiveModel;
use entities::{channel, channel_member};
use sea_orm::DatabaseConnection;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::quota::QuotaSlot;
use crate::changes::{self, ChangeError};
use crate::pubsub::{Broker, ChangeEvent, FeedStats, Op, Streaming, TopicReceiver};

/// Log rows read per page when replaying.
const REPLAY_PAGE: u64 = 500;

/// Why a subscription cannot start or go on.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// The viewer was removed from the channel while subscribed.
    #[error("you are no longer a member of this channel")]
    Revoked,
    /// The cursor is older than the log's retention (or became so while replaying).
    #[error("the cursor is older than the change log's retention")]
    CursorExpired,
    /// The log could not be read.
    #[error("reading the change log failed")]
    Log(#[from] ChangeError),
}

/// Which of its topic's events a subscription delivers: the changes of one table, or of one
/// row of it. A followed row's deletion is delivered, then ends the subscription; the
/// channel's deletion ends it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Filter {
    pub table: &'static str,
    pub row_id: Option<i64>,
    /// The deletion of this table's row `row_id` ends the subscription (not delivered): the
    /// row the followed rows belong to, as a document for its Yjs updates.
    pub ended_by: Option<&'static str>,
}

impl Filter {
    /// Every change of `table`.
    pub const fn table(table: &'static str) -> Self {
        Self {
            table,
            row_id: None,
            ended_by: None,
        }
    }

    /// The changes of row `row_id` of `table`.
    pub const fn row(table: &'static str, row_id: i64) -> Self {
        Self {
            table,
            row_id: Some(row_id),
            ended_by: None,
        }
    }
}

/// What a follower has next for its subscriber.
pub enum Next {
    /// Deliver this event.
    Event(Arc<ChangeEvent>),
    /// Deliver this error, then end.
    Error(LiveError),
}

/// A subscription to a topic whose access and cursor are being checked.
pub struct Opening {
    broker: Arc<Broker>,
    receiver: TopicReceiver,
    topic: i64,
    /// How far the log was published once the receiver was in place.
    published: i64,
}

impl Opening {
    /// Subscribes to `topic`, then reads how far the log is published.
    pub fn new(broker: &Arc<Broker>, topic: i64) -> Opening {
        let receiver = broker.subscribe(topic);
        let published = broker.published();
        Opening {
            broker: broker.clone(),
            receiver,
            topic,
            published,
        }
    }

    /// `CursorExpired` when retention has pruned changes after `after`.
    pub async fn check_cursor(db: &DatabaseConnection, after: i64) -> Result<(), LiveError> {
        if after < changes::pruned_through(db).await? {
            return Err(LiveError::CursorExpired);
        }
        Ok(())
    }

    /// The checked subscription of `viewer`: every change after `after` (or, without it,
    /// after the opening) that `filter` selects. `slot` counts against the viewer's open
    /// subscriptions while it lives.
    pub fn follow(
        self,
        db: DatabaseConnection,
        viewer: i64,
        after: Option<i64>,
        filter: Filter,
        slot: QuotaSlot,
    ) -> Follower {
        Follower {
            _streaming: self.broker.streaming(),
            db,
            broker: self.broker,
            receiver: self.receiver,
            topic: self.topic,
            viewer,
            // A cursor past what is published (forged, or taken from a commit the feed has
            // not published yet) starts at the published end instead: skipping up to it
            // would skip a revocation committed below it. What it holds may come again.
            seen: after.map_or(self.published, |after| after.min(self.published)),
            target: self.published,
            history_through: self.published,
            filter,
            versions_through: 0,
            first: None,
            pending: VecDeque::new(),
            caught_up: false,
            ended: false,
            _slot: slot,
        }
    }
}

/// A checked subscription: replays the log from its cursor, then follows the topic.
pub struct Follower {
    db: DatabaseConnection,
    broker: Arc<Broker>,
    receiver: TopicReceiver,
    topic: i64,
    viewer: i64,
    filter: Filter,
    /// Changes of the filter's table whose row `version` is at most this were already sent
    /// another way (a document's state, read after the opening): they are passed over.
    versions_through: i64,
    /// Sent before anything else (see `starting_with`).
    first: Option<Arc<ChangeEvent>>,
    /// Every position up to here has been considered.
    seen: i64,
    /// Catch up (replay) to here before taking live events.
    target: i64,
    /// Changes up to here happened before access was checked: membership changes among them
    /// are history, not revocations.
    history_through: i64,
    /// Events read but not yet considered.
    pending: VecDeque<Arc<ChangeEvent>>,
    /// Once `pending` is drained, everything up to `target` has been considered.
    caught_up: bool,
    ended: bool,
    /// Counts against the viewer's open subscriptions until it ends.
    _slot: QuotaSlot,
    /// Counts the subscription as streaming while it lives.
    _streaming: Streaming,
}

/// What a subscription does with one event of its topic.
enum Step {
    Skip,
    Deliver,
    DeliverThenEnd,
    /// The viewer was removed from the channel: end with `Revoked`.
    Revoked,
    /// The channel was deleted: end.
    End,
}

impl Follower {
    /// Every change up to here has been considered (delivered or passed over): resuming
    /// after it misses nothing this follower would deliver.
    pub fn position(&self) -> i64 {
        self.seen
    }

    /// Passes over the changes of the filter's table whose row `version` is at most
    /// `version`: the subscriber already has them, from a state read after the opening
    /// (every such change committed before that read, since one row's versions commit in
    /// order). Changes the read did not include have higher versions and are delivered.
    pub fn skip_versions_through(&mut self, version: i64) {
        self.versions_through = self.versions_through.max(version);
    }

    /// Sends `event` (a state made for this subscriber, such as what a client's Yjs state
    /// vector lacks, at `version`) before anything else, and passes over the changes it
    /// holds (`skip_versions_through(version)`).
    pub fn starting_with(mut self, event: Arc<ChangeEvent>, version: i64) -> Self {
        self.first = Some(event);
        self.skip_versions_through(version);
        self
    }

    /// The next thing to send, or `None` when the subscription has ended (the channel or
    /// the followed row was deleted, or the server is shutting down).
    pub async fn next(&mut self) -> Option<Next> {
        if self.ended {
            return None;
        }
        if let Some(first) = self.first.take() {
            return Some(Next::Event(first));
        }
        loop {
            while let Some(event) = self.pending.pop_front() {
                if event.position <= self.seen {
                    continue;
                }
                self.seen = event.position;
                let history = event.position <= self.history_through;
                match self.step(&event, history) {
                    Step::Skip => {}
                    Step::Deliver => return Some(Next::Event(event)),
                    Step::DeliverThenEnd => {
                        self.ended = true;
                        return Some(Next::Event(event));
                    }
                    Step::Revoked => {
                        self.ended = true;
                        return Some(Next::Error(LiveError::Revoked));
                    }
                    Step::End => {
                        self.ended = true;
                        return None;
                    }
                }
            }
            if self.caught_up {
                self.seen = self.seen.max(self.target);
                self.caught_up = false;
            }
            // The next batch: catching up (from the broker's memory, else a page of the
            // log) while behind the target, else the next live event.
            if self.seen < self.target {
                // Boxed: its database futures are large, and a follower spends most of its
                // life waiting on the topic, not catching up.
                match Box::pin(self.catch_up()).await {
                    Ok((batch, caught_up)) => {
                        self.pending.extend(batch);
                        self.caught_up = caught_up;
                    }
                    Err(err) => {
                        self.ended = true;
                        return Some(Next::Error(err));
                    }
                }
            } else {
                match self.receiver.recv().await {
                    Ok(event) => self.pending.push_back(event),
                    Err(RecvError::Lagged(_)) => {
                        // Too slow for the topic's buffer: catch up instead.
                        FeedStats::add(&self.broker.stats.lagged, 1);
                        self.target = self.broker.published();
                    }
                    // The server is shutting down.
                    Err(RecvError::Closed) => {
                        self.ended = true;
                        return None;
                    }
                }
            }
        }
    }

    /// The next events between `seen` and `target`, and whether they are all of them. Recent
    /// events come from the broker's memory, shared with every other subscriber catching up
    /// (memo included) at no database cost; older ones from a page of the log.
    async fn catch_up(&self) -> Result<(Vec<Arc<ChangeEvent>>, bool), LiveError> {
        if let Some(events) = self.broker.recent(self.topic, self.seen, self.target) {
            return Ok((events, true));
        }
        FeedStats::add(&self.broker.stats.log_replays, 1);
        let page =
            changes::read_scope(&self.db, self.topic, self.seen, self.target, REPLAY_PAGE).await?;
        // Retention may have pruned part of the range since the cursor was checked: then
        // the page may silently miss rows, so stop instead.
        if changes::pruned_through(&self.db).await? > self.seen {
            return Err(LiveError::CursorExpired);
        }
        let complete = (page.len() as u64) < REPLAY_PAGE;
        Ok((page.into_iter().map(Arc::new).collect(), complete))
    }

    fn step(&self, event: &ChangeEvent, history: bool) -> Step {
        if !history && self.revokes(event) {
            return Step::Revoked;
        }
        if event.table == channel::Model::TABLE
            && event.op == Op::Delete
            && event.row_id == self.topic
        {
            return Step::End;
        }
        if let (Some(parent), Some(id)) = (self.filter.ended_by, self.filter.row_id)
            && event.table == parent
            && event.op == Op::Delete
            && event.row_id == id
        {
            return Step::End;
        }
        if event.table != self.filter.table {
            return Step::Skip;
        }
        if self.versions_through > 0
            && event
                .row
                .get("version")
                .and_then(serde_json::Value::as_i64)
                .is_some_and(|version| version <= self.versions_through)
        {
            return Step::Skip;
        }
        match self.filter.row_id {
            None => Step::Deliver,
            Some(id) if id != event.row_id => Step::Skip,
            Some(_) if event.op == Op::Delete => Step::DeliverThenEnd,
            Some(_) => Step::Deliver,
        }
    }

    /// True when `event` removes the viewer from the channel. (An UPDATE that moves a
    /// membership row to another user or channel is logged as a DELETE and an INSERT.)
    fn revokes(&self, event: &ChangeEvent) -> bool {
        if event.op != Op::Delete || event.table != channel_member::Model::TABLE {
            return false;
        }
        match channel_member::Model::deserialize(&event.row) {
            Ok(member) => member.user_id == self.viewer,
            // An unreadable membership removal: end the stream rather than risk a leak.
            Err(err) => {
                tracing::error!(
                    position = event.position,
                    error = %err,
                    "a membership removal whose row image does not decode ends the subscriptions of its channel's row id"
                );
                event.row_id == self.viewer
            }
        }
    }
}

#[cfg(test)]
mod tests;
