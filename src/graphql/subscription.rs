//! The Subscription root: `messageEvents` and `documentEvents`.
//!
//! Each subscription subscribes to its channel's topic first, then reads how far the log has
//! been published (`P`), then checks access (so a removal after `P` arrives as an event) and
//! the cursor. The stream replays the log from the cursor up to `P`, then follows the topic,
//! dropping what it already covered by position. When the topic's buffer overflows (a slow
//! reader), it re-reads the log from its last position instead of failing or buffering.
//! Losing membership ends the stream with FORBIDDEN before any later event is delivered:
//! the channel's topic carries membership changes in the same order as everything else.
//!
//! The resolvers only check and start: the checked subscription (`Follower`) is handed over
//! to `Api::execute_stream`, which renders each event once per subscription shape (see
//! `shared`). To render, the same resolvers run in render mode on one event.

use std::sync::Arc;

use async_graphql::{Context, Enum, ID, SimpleObject, Subscription};
use entities::live::LiveModel;
use entities::{channel, channel_member, document, message};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use sea_orm::DatabaseConnection;
use tokio::sync::broadcast::error::RecvError;

use super::error::{AppError, AppResult};
use super::input::{self, CursorKind};
use super::limits::{QuotaSlot, SubscriptionQuota};
use super::shared::{Handover, RenderOne};
use super::types::{Document, Message};
use super::{db, live, viewer_id};
use crate::changes;
use crate::pubsub::FeedStats;
use crate::pubsub::{Broker, ChangeEvent, Op, Streaming};
use crate::store;

/// Log rows read per page when replaying.
const REPLAY_PAGE: u64 = 500;

/// What happened to a row.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// The row was inserted.
    Created,
    /// The row was updated.
    Updated,
    /// The row was deleted (the event carries its last state).
    Deleted,
}

impl From<Op> for ChangeKind {
    fn from(op: Op) -> Self {
        match op {
            Op::Insert => ChangeKind::Created,
            Op::Update => ChangeKind::Updated,
            Op::Delete => ChangeKind::Deleted,
        }
    }
}

/// A change to a message of a channel.
#[derive(SimpleObject)]
pub struct MessageEvent {
    /// Resume after this event with `messageEvents(after: cursor)`.
    pub cursor: String,
    /// What happened.
    pub kind: ChangeKind,
    /// The message as of this change (its last state when deleted).
    pub message: Message,
}

/// A change to a shared document.
#[derive(SimpleObject)]
pub struct DocumentEvent {
    /// Resume after this event with `documentEvents(after: cursor)`.
    pub cursor: String,
    /// What happened.
    pub kind: ChangeKind,
    /// The document as of this change (its last state when deleted).
    pub document: Document,
}

/// Live changes.
#[derive(Default)]
pub struct SubscriptionRoot;

/// Live changes, in one order, resumable from any event's cursor.
#[Subscription]
impl SubscriptionRoot {
    /// Every change to the channel's messages, as it commits, whoever wrote it. With
    /// `after`, first replays every later change in order, then continues live, with no gap
    /// and no duplicate. Members only (FORBIDDEN otherwise); losing membership ends the
    /// stream with FORBIDDEN. A cursor older than the log's retention: CURSOR_EXPIRED.
    async fn message_events(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The channel to follow.")] channel_id: ID,
        #[graphql(desc = "Resume after this event's cursor.")] after: Option<String>,
    ) -> async_graphql::Result<BoxStream<'static, AppResult<MessageEvent>>> {
        if let Some(one) = ctx.data_opt::<RenderOne>() {
            return Ok(render_one(one, |event| {
                let model = decode::<message::Model>(event)?.ok()?;
                Some(MessageEvent {
                    cursor: input::encode_cursor(CursorKind::Event, event.position),
                    kind: event.op.into(),
                    message: Message::from_event(model, event.clone()),
                })
            }));
        }
        let viewer = viewer_id(ctx)?;
        let channel_id = input::id("channelId", &channel_id)?;
        let after = parse_after(after.as_deref())?;
        let follow = Follow::start(ctx, channel_id, viewer, after).await?;
        Ok(hand_over(ctx, follow, Kind::Messages)?)
    }

    /// Every change to one document, as it commits, whoever wrote it; ends after its
    /// deletion. `after`, access and errors as for `messageEvents`.
    async fn document_events(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The document to follow.")] document_id: ID,
        #[graphql(desc = "Resume after this event's cursor.")] after: Option<String>,
    ) -> async_graphql::Result<BoxStream<'static, AppResult<DocumentEvent>>> {
        if let Some(one) = ctx.data_opt::<RenderOne>() {
            return Ok(render_one(one, |event| {
                let model = decode::<document::Model>(event)?.ok()?;
                Some(DocumentEvent {
                    cursor: input::encode_cursor(CursorKind::Event, event.position),
                    kind: event.op.into(),
                    document: Document(model),
                })
            }));
        }
        let viewer = viewer_id(ctx)?;
        let document_id = input::id("documentId", &document_id)?;
        let after = parse_after(after.as_deref())?;
        // A missing document is refused like someone else's, so ids cannot be probed.
        let document = store::document::find(db(ctx)?, document_id)
            .await
            .map_err(AppError::from)?
            .ok_or_else(not_a_member)?;
        let follow = Follow::start(ctx, document.channel_id, viewer, after).await?;
        Ok(hand_over(ctx, follow, Kind::Document(document_id))?)
    }
}

/// Render mode: the one event (or error) of `one` as this subscription's only item.
fn render_one<T, F>(one: &RenderOne, render: F) -> BoxStream<'static, AppResult<T>>
where
    T: Send + 'static,
    F: FnOnce(&Arc<ChangeEvent>) -> Option<T>,
{
    let item = match one {
        RenderOne::Event(event) => render(event).map(Ok),
        RenderOne::Error(err) => Some(Err(err.clone())),
    };
    futures_util::stream::iter(item).boxed()
}

/// Start mode: the checked subscription goes to the `Api` (see `shared`), which follows the
/// topic and renders its events; async-graphql's stream for it ends at once, empty.
fn hand_over<T: Send + 'static>(
    ctx: &Context<'_>,
    follow: Follow,
    kind: Kind,
) -> AppResult<BoxStream<'static, AppResult<T>>> {
    let handover = ctx.data_opt::<Arc<Handover>>().ok_or_else(|| {
        super::missing("Handover (subscriptions run through Api::execute_stream)")
    })?;
    if !handover.put(Follower::new(follow, kind)) {
        return Err(AppError::bad_input(
            "subscription",
            "a subscription selects exactly one root field",
        ));
    }
    Ok(futures_util::stream::empty().boxed())
}

fn parse_after(after: Option<&str>) -> AppResult<Option<i64>> {
    after
        .map(|cursor| input::decode_cursor("after", CursorKind::Event, cursor))
        .transpose()
}

/// The event's row as `M`, when the event is a change of `M`'s table. A row image that does
/// not decode (a SQL writer stored something the model cannot read) is logged and skipped by
/// the callers: ending the stream would stop the channel's feed at that row for good.
fn decode<M: LiveModel>(event: &ChangeEvent) -> Option<Result<M, serde_json::Error>> {
    if event.table != M::TABLE {
        return None;
    }
    // Read from the shared image in place: no copy of the row per subscriber.
    let decoded = M::deserialize(&event.row);
    if let Err(err) = &decoded {
        tracing::error!(
            position = event.position,
            table = M::TABLE,
            error = %err,
            "skipping a change whose row image does not decode"
        );
    }
    Some(decoded)
}

/// A checked subscription to one channel's topic, ready to stream.
struct Follow {
    db: DatabaseConnection,
    broker: Arc<Broker>,
    receiver: crate::pubsub::TopicReceiver,
    channel_id: i64,
    viewer: i64,
    /// Every position up to here has been considered.
    seen: i64,
    /// Replay the log up to here before following the topic.
    target: i64,
    /// Counts against the viewer's open subscriptions until the stream ends.
    _slot: QuotaSlot,
}

impl Follow {
    /// Subscribes, then checks membership and the cursor.
    async fn start(
        ctx: &Context<'_>,
        channel_id: i64,
        viewer: i64,
        after: Option<i64>,
    ) -> AppResult<Follow> {
        // The quota first: a refused subscription costs no database work.
        let quota = ctx
            .data::<Arc<SubscriptionQuota>>()
            .map_err(|_| super::missing("SubscriptionQuota"))?;
        let slot = quota.acquire(viewer).ok_or_else(|| {
            AppError::LimitExceeded(format!(
                "at most {} open subscriptions per user",
                quota.max()
            ))
        })?;
        let db = db(ctx)?.clone();
        let live = live(ctx)?;
        let broker = live.broker.clone();
        let receiver = broker.subscribe(channel_id);
        let published = broker.published();
        // The whole start runs under a permit (see `Live::subscription_starts`).
        // A missing channel is refused like someone else's, so ids cannot be probed.
        if !store::channel::is_member(&db, channel_id, viewer).await? {
            return Err(not_a_member());
        }
        if let Some(after) = after {
            let pruned = changes::pruned_through(&db).await.map_err(internal)?;
            if after < pruned {
                return Err(AppError::CursorExpired);
            }
        }
        Ok(Follow {
            _slot: slot,
            db,
            broker,
            receiver,
            channel_id,
            viewer,
            seen: after.unwrap_or(published),
            target: published,
        })
    }

    /// The next events between `seen` and `target`, and whether they are all of them. Recent
    /// events come from the broker's memory, shared with every other subscriber catching up
    /// (memo included) at no database cost; older ones from a page of the log.
    async fn catch_up(&self) -> AppResult<(Vec<Arc<ChangeEvent>>, bool)> {
        if let Some(events) = self.broker.recent(self.channel_id, self.seen, self.target) {
            return Ok((events, true));
        }
        FeedStats::add(&self.broker.stats.log_replays, 1);
        let page = changes::read_scope(
            &self.db,
            self.channel_id,
            self.seen,
            self.target,
            REPLAY_PAGE,
        )
        .await
        .map_err(internal)?;
        // Retention may have pruned part of the range since the cursor was checked: then
        // the page may silently miss rows, so stop instead.
        let pruned = changes::pruned_through(&self.db).await.map_err(internal)?;
        if pruned > self.seen {
            return Err(AppError::CursorExpired);
        }
        let complete = (page.len() as u64) < REPLAY_PAGE;
        Ok((page.into_iter().map(Arc::new).collect(), complete))
    }

    fn handle(&self, event: &ChangeEvent, history: bool, kind: Kind) -> Step {
        if !history && self.revokes(event) {
            return Step::Revoked;
        }
        if event.table == channel::Model::TABLE
            && event.op == Op::Delete
            && event.row_id == self.channel_id
        {
            return Step::End;
        }
        match kind {
            Kind::Messages if event.table == message::Model::TABLE => Step::Deliver,
            Kind::Document(id) if event.table == document::Model::TABLE && event.row_id == id => {
                if event.op == Op::Delete {
                    Step::DeliverThenEnd
                } else {
                    Step::Deliver
                }
            }
            _ => Step::Skip,
        }
    }

    /// True when `event` removes the viewer from the channel. (An UPDATE that moves a
    /// membership row to another user or channel is logged as a DELETE and an INSERT.)
    fn revokes(&self, event: &ChangeEvent) -> bool {
        if event.op != Op::Delete {
            return false;
        }
        match decode::<channel_member::Model>(event) {
            Some(Ok(member)) => member.user_id == self.viewer,
            // An unreadable membership removal: end the stream rather than risk a leak.
            Some(Err(_)) => event.row_id == self.viewer,
            None => false,
        }
    }
}

/// What a subscription does with one event of its topic.
enum Step {
    Skip,
    Deliver,
    DeliverThenEnd,
    /// The viewer was removed from the channel: end with FORBIDDEN.
    Revoked,
    /// The channel was deleted: end.
    End,
}

/// Which events of its channel a subscription delivers.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Kind {
    Messages,
    Document(i64),
}

/// What a follower has next for its subscriber.
pub(crate) enum Next {
    /// Deliver this event (rendered under the subscription's shape).
    Event(Arc<ChangeEvent>),
    /// Deliver this error, then end.
    Error(AppError),
}

/// A checked subscription, handed over from its resolver: replays the log from its cursor,
/// then follows the topic, dropping what it already covered by position. When the topic's
/// buffer overflows (a slow reader), it re-reads from its last position instead of failing
/// or buffering. Losing membership ends it with FORBIDDEN before any later event: the
/// channel's topic carries membership changes in the same order as everything else.
pub(crate) struct Follower {
    follow: Follow,
    kind: Kind,
    /// Changes up to here happened before access was checked: membership changes among them
    /// are history, not revocations.
    history_through: i64,
    /// Events read but not yet considered.
    pending: std::collections::VecDeque<Arc<ChangeEvent>>,
    /// Once `pending` is drained, everything up to `target` has been considered.
    caught_up: bool,
    ended: bool,
    /// Counts the subscription as streaming while it lives.
    _streaming: Streaming,
}

impl Follower {
    fn new(follow: Follow, kind: Kind) -> Self {
        Self {
            history_through: follow.target,
            _streaming: follow.broker.streaming(),
            follow,
            kind,
            pending: std::collections::VecDeque::new(),
            caught_up: false,
            ended: false,
        }
    }

    /// The next thing to send, or `None` when the subscription has ended (the channel or
    /// document was deleted, or the server is shutting down).
    pub(crate) async fn next(&mut self) -> Option<Next> {
        if self.ended {
            return None;
        }
        let follow = &mut self.follow;
        loop {
            while let Some(event) = self.pending.pop_front() {
                if event.position <= follow.seen {
                    continue;
                }
                follow.seen = event.position;
                let history = event.position <= self.history_through;
                match follow.handle(&event, history, self.kind) {
                    Step::Skip => {}
                    Step::Deliver => return Some(Next::Event(event)),
                    Step::DeliverThenEnd => {
                        self.ended = true;
                        return Some(Next::Event(event));
                    }
                    Step::Revoked => {
                        self.ended = true;
                        return Some(Next::Error(AppError::Forbidden(
                            "you are no longer a member of this channel".into(),
                        )));
                    }
                    Step::End => {
                        self.ended = true;
                        return None;
                    }
                }
            }
            if self.caught_up {
                follow.seen = follow.seen.max(follow.target);
                self.caught_up = false;
            }
            // The next batch: catching up (from the broker's memory, else a page of the
            // log) while behind the target, else the next live event.
            if follow.seen < follow.target {
                // Boxed: its database futures are large, and a follower spends most of its
                // life waiting on the topic, not catching up.
                match Box::pin(follow.catch_up()).await {
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
                match follow.receiver.recv().await {
                    Ok(event) => self.pending.push_back(event),
                    Err(RecvError::Lagged(_)) => {
                        // Too slow for the topic's buffer: catch up instead.
                        FeedStats::add(&follow.broker.stats.lagged, 1);
                        follow.target = follow.broker.published();
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
}

fn not_a_member() -> AppError {
    AppError::Forbidden("only members of the channel may subscribe to it".into())
}

fn internal(err: changes::ChangeError) -> AppError {
    AppError::Internal(Arc::new(err))
}
