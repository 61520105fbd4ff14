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
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

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
    /// Caught up, with nothing pending: only returned by a follower that hands off
    /// (`hand_off_when_live`); its state (`into_state`) can join its topic's cohorts.
    Live,
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
            state: FollowState {
                _streaming: self.broker.streaming(self.topic),
                topic: self.topic,
                viewer,
                // A cursor past what is published (forged, or taken from a commit the feed
                // has not published yet) starts at the published end instead: skipping up
                // to it would skip a revocation committed below it. What it holds may come
                // again.
                seen: after.map_or(self.published, |after| after.min(self.published)),
                history_through: self.published,
                filter,
                versions_through: 0,
                slot: Some(slot),
            },
            db,
            broker: self.broker,
            receiver: self.receiver,
            target: self.published,
            first: None,
            pending: VecDeque::new(),
            caught_up: false,
            ended: false,
            hand_off: false,
        }
    }
}

/// A checked subscription: replays the log from its cursor, then follows the topic.
pub struct Follower {
    state: FollowState,
    db: DatabaseConnection,
    broker: Arc<Broker>,
    receiver: TopicReceiver,
    /// Sent before anything else (see `starting_with`).
    first: Option<Arc<ChangeEvent>>,
    /// Catch up (replay) to here before taking live events.
    target: i64,
    /// Events read but not yet considered.
    pending: VecDeque<Arc<ChangeEvent>>,
    /// Once `pending` is drained, everything up to `target` has been considered.
    caught_up: bool,
    ended: bool,
    /// Return `Next::Live` instead of waiting for the topic's next event.
    hand_off: bool,
}

/// What a subscription is, apart from how it reads its topic: whose it is, which events it
/// takes, and how far it has got. A `Follower` holds one while it reads the topic itself; a
/// member of its topic's cohorts (`live::cohorts`) while the topic's driver delivers to it.
pub struct FollowState {
    pub(crate) topic: i64,
    viewer: i64,
    filter: Filter,
    /// Changes of the filter's table whose row `version` is at most this were already sent
    /// another way (a document's state, read after the opening): they are passed over.
    versions_through: i64,
    /// Every position up to here has been considered.
    pub(crate) seen: i64,
    /// Changes up to here happened before access was checked: membership changes among them
    /// are history, not revocations.
    history_through: i64,
    /// Counts against the viewer's open subscriptions until it ends (or until the caller
    /// takes it to hold itself: `take_slot`).
    slot: Option<QuotaSlot>,
    /// Counts the subscription as streaming while it lives.
    _streaming: Streaming,
}

/// What a subscription does with one event of its topic.
pub(crate) enum Step {
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
        self.state.seen
    }

    /// Makes `next` return `Next::Live` once caught up with nothing pending, instead of
    /// waiting for the topic's next event: the caller then hands the subscription to its
    /// topic's cohorts (`into_state`).
    pub fn hand_off_when_live(mut self) -> Self {
        self.hand_off = true;
        self
    }

    /// The subscription's state, to join its topic's cohorts (after `Next::Live`).
    pub fn into_state(self) -> FollowState {
        self.state
    }

    /// A follower that goes on from `state` (a cohort member that fell behind): it catches
    /// up from `state`'s position to what is published now, then follows the topic.
    pub fn resume(state: FollowState, broker: &Arc<Broker>, db: DatabaseConnection) -> Follower {
        // Subscribed before reading the published position, as an opening does.
        let receiver = broker.subscribe(state.topic);
        let target = broker.published();
        Follower {
            state,
            db,
            broker: broker.clone(),
            receiver,
            first: None,
            target,
            pending: VecDeque::new(),
            caught_up: false,
            ended: false,
            hand_off: true,
        }
    }

    /// Passes over the changes of the filter's table whose row `version` is at most
    /// `version`: the subscriber already has them, from a state read after the opening
    /// (every such change committed before that read, since one row's versions commit in
    /// order). Changes the read did not include have higher versions and are delivered.
    pub fn skip_versions_through(&mut self, version: i64) {
        self.state.versions_through = self.state.versions_through.max(version);
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
                if event.position <= self.state.seen {
                    continue;
                }
                self.state.seen = event.position;
                match self.state.step(&event) {
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
                self.state.seen = self.state.seen.max(self.target);
                self.caught_up = false;
            }
            // The next batch: catching up (from the broker's memory, else a page of the
            // log) while behind the target, else the next live event.
            if self.state.seen < self.target {
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
            } else if self.hand_off {
                // Whatever the topic has already sent is taken first, so the hand-off
                // rarely needs the broker's memory.
                match self.receiver.try_recv() {
                    Ok(event) => self.pending.push_back(event),
                    Err(TryRecvError::Lagged(_)) => {
                        FeedStats::add(&self.broker.stats.lagged, 1);
                        self.target = self.broker.published();
                    }
                    Err(TryRecvError::Empty) => return Some(Next::Live),
                    Err(TryRecvError::Closed) => {
                        self.ended = true;
                        return None;
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
        catch_up(
            &self.broker,
            &self.db,
            self.state.topic,
            self.state.seen,
            self.target,
        )
        .await
    }
}

/// `topic`'s events after `seen` up to `target`, and whether they are all of them: from
/// the broker's memory of recent events when it still covers them (shared, memo included, at
/// no database cost), else a page of the log.
pub(crate) async fn catch_up(
    broker: &Broker,
    db: &DatabaseConnection,
    topic: i64,
    seen: i64,
    target: i64,
) -> Result<(Vec<Arc<ChangeEvent>>, bool), LiveError> {
    if let Some(events) = broker.recent(topic, seen, target) {
        return Ok((events, true));
    }
    FeedStats::add(&broker.stats.log_replays, 1);
    let page = changes::read_scope(db, topic, seen, target, REPLAY_PAGE).await?;
    // Retention may have pruned part of the range since the cursor was checked: then the
    // page may silently miss rows, so stop instead.
    if changes::pruned_through(db).await? > seen {
        return Err(LiveError::CursorExpired);
    }
    let complete = (page.len() as u64) < REPLAY_PAGE;
    Ok((page.into_iter().map(Arc::new).collect(), complete))
}

impl FollowState {
    /// The viewer's subscription slot, for the caller to hold while the subscription lives
    /// (so a stopped subscription frees it at once, wherever its state is).
    pub fn take_slot(&mut self) -> Option<QuotaSlot> {
        self.slot.take()
    }

    /// What this subscription does with `event` (one it has not considered yet).
    pub(crate) fn step(&self, event: &ChangeEvent) -> Step {
        let history = event.position <= self.history_through;
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
pub(crate) mod tests;
