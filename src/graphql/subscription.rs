//! The Subscription root: `messageEvents` and `documentEvents`.
//!
//! Each subscription subscribes to its channel's topic first, then reads how far the log has
//! been published (`P`), then checks access (so a removal after `P` arrives as an event) and
//! the cursor. The stream replays the log from the cursor up to `P`, then follows the topic,
//! dropping what it already covered by position. When the topic's buffer overflows (a slow
//! reader), it re-reads the log from its last position instead of failing or buffering.
//! Losing membership ends the stream with FORBIDDEN before any later event is delivered:
//! the channel's topic carries membership changes in the same order as everything else.

use std::sync::Arc;

use async_graphql::{Context, Enum, ID, SimpleObject, Subscription};
use entities::live::LiveModel;
use entities::{channel, channel_member, document, message};
use futures_util::Stream;
use sea_orm::DatabaseConnection;
use tokio::sync::broadcast::error::RecvError;

use super::error::{AppError, AppResult};
use super::input::{self, CursorKind};
use super::limits::{QuotaSlot, SubscriptionQuota};
use super::types::{Document, Message};
use super::{db, live, viewer_id};
use crate::changes;
use crate::pubsub::FeedStats;
use crate::pubsub::{Broker, ChangeEvent, Op};
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
    ) -> async_graphql::Result<impl Stream<Item = AppResult<MessageEvent>> + use<>> {
        let viewer = viewer_id(ctx)?;
        let channel_id = input::id("channelId", &channel_id)?;
        let after = parse_after(after.as_deref())?;
        let follow = Follow::start(ctx, channel_id, viewer, after).await?;
        Ok(follow.into_stream(move |event| {
            let Some(Ok(model)) = decode::<message::Model>(event) else {
                return Ok(Render::Skip);
            };
            Ok(Render::Deliver(MessageEvent {
                cursor: input::encode_cursor(CursorKind::Event, event.position),
                kind: event.op.into(),
                message: Message::from_event(model, event.clone()),
            }))
        }))
    }

    /// Every change to one document, as it commits, whoever wrote it; ends after its
    /// deletion. `after`, access and errors as for `messageEvents`.
    async fn document_events(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The document to follow.")] document_id: ID,
        #[graphql(desc = "Resume after this event's cursor.")] after: Option<String>,
    ) -> async_graphql::Result<impl Stream<Item = AppResult<DocumentEvent>> + use<>> {
        let viewer = viewer_id(ctx)?;
        let document_id = input::id("documentId", &document_id)?;
        let after = parse_after(after.as_deref())?;
        // A missing document is refused like someone else's, so ids cannot be probed.
        let document = store::document::find(db(ctx)?, document_id)
            .await
            .map_err(AppError::from)?
            .ok_or_else(not_a_member)?;
        let follow = Follow::start(ctx, document.channel_id, viewer, after).await?;
        Ok(follow.into_stream(move |event| {
            if event.row_id != document_id {
                return Ok(Render::Skip);
            }
            let Some(Ok(model)) = decode::<document::Model>(event) else {
                return Ok(Render::Skip);
            };
            let rendered = DocumentEvent {
                cursor: input::encode_cursor(CursorKind::Event, event.position),
                kind: event.op.into(),
                document: Document(model),
            };
            Ok(if event.op == Op::Delete {
                Render::DeliverThenEnd(rendered)
            } else {
                Render::Deliver(rendered)
            })
        }))
    }
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

/// What a subscription makes of one event of its topic.
enum Render<T> {
    Skip,
    Deliver(T),
    DeliverThenEnd(T),
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
        // The start-up queries take a permit (see `Live::subscription_starts`).
        let _permit = live
            .subscription_starts
            .acquire()
            .await
            .map_err(|_| super::missing("subscription start permits"))?;
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

    /// Replays, then follows, rendering each event with `render`.
    fn into_stream<T, F>(mut self, render: F) -> impl Stream<Item = AppResult<T>> + use<T, F>
    where
        T: Send + 'static,
        F: Fn(&Arc<ChangeEvent>) -> AppResult<Render<T>> + Send + 'static,
    {
        async_stream::stream! {
            let _streaming = self.broker.streaming();
            // Changes up to the first target happened before access was checked: membership
            // changes among them are history, not revocations.
            let history_through = self.target;
            loop {
                // The next batch: catching up (from the broker's memory, else a page of the
                // log) while behind the target, else the next live event.
                let (batch, caught_up) = if self.seen < self.target {
                    match self.catch_up().await {
                        Ok(next) => next,
                        Err(err) => {
                            yield Err(err);
                            return;
                        }
                    }
                } else {
                    match self.receiver.recv().await {
                        Ok(event) => (vec![event], false),
                        Err(RecvError::Lagged(_)) => {
                            // Too slow for the topic's buffer: catch up instead.
                            FeedStats::add(&self.broker.stats.lagged, 1);
                            self.target = self.broker.published();
                            continue;
                        }
                        // The server is shutting down.
                        Err(RecvError::Closed) => return,
                    }
                };
                for event in batch {
                    if event.position <= self.seen {
                        continue;
                    }
                    self.seen = event.position;
                    let history = event.position <= history_through;
                    match self.handle(&event, history, &render) {
                        Step::Skip => {}
                        Step::Yield(item) => {
                            FeedStats::add(&self.broker.stats.delivered, 1);
                            yield item
                        }
                        Step::End(item) => {
                            if let Some(item) = item {
                                FeedStats::add(&self.broker.stats.delivered, u64::from(item.is_ok()));
                                yield item;
                            }
                            return;
                        }
                    }
                }
                if caught_up {
                    self.seen = self.seen.max(self.target);
                }
            }
        }
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

    fn handle<T, F>(&self, event: &Arc<ChangeEvent>, history: bool, render: &F) -> Step<T>
    where
        F: Fn(&Arc<ChangeEvent>) -> AppResult<Render<T>>,
    {
        if !history && self.revokes(event) {
            return Step::End(Some(Err(AppError::Forbidden(
                "you are no longer a member of this channel".into(),
            ))));
        }
        if event.table == channel::Model::TABLE
            && event.op == Op::Delete
            && event.row_id == self.channel_id
        {
            return Step::End(None);
        }
        match render(event) {
            Ok(Render::Skip) => Step::Skip,
            Ok(Render::Deliver(item)) => Step::Yield(Ok(item)),
            Ok(Render::DeliverThenEnd(item)) => Step::End(Some(Ok(item))),
            Err(err) => Step::End(Some(Err(err))),
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

enum Step<T> {
    Skip,
    Yield(AppResult<T>),
    End(Option<AppResult<T>>),
}

fn not_a_member() -> AppError {
    AppError::Forbidden("only members of the channel may subscribe to it".into())
}

fn internal(err: changes::ChangeError) -> AppError {
    AppError::Internal(Arc::new(err))
}
