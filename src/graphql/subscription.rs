//! The Subscription root: `messageEvents`, `documentEvents` and `documentUpdates`.
//!
//! The resolvers check and hand over: they validate the arguments, open the subscription
//! (`live::Opening`, which subscribes before anything is read), check membership and the
//! cursor, and hand the checked `live::Follower` to `Api::execute_stream`, which renders
//! each event once per subscription shape (see `shared`). To render, the same resolvers run
//! in render mode on one event.

use std::sync::Arc;

use async_graphql::{Context, Enum, ID, SimpleObject, Subscription};
use entities::live::LiveModel;
use entities::{document, message};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;

use super::error::{AppError, AppResult};
use super::input::{self, CursorKind};
use super::shared::{Handover, RenderOne};
use super::types::{Document, Message, begin_history, state_vector_argument};
use super::{db, live, viewer_id};
use crate::live::{Filter, Follower, Opening, SubscriptionQuota, documents};
use crate::pubsub::{ChangeEvent, Op};
use crate::store;

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

/// A Yjs update of a shared document's text.
#[derive(SimpleObject)]
pub struct DocumentUpdateEvent {
    /// Resume after this event with `documentUpdates(after: cursor)`.
    pub cursor: String,
    /// A Yjs v1 update (standard base64) of the document's root `Y.Text` `body`: apply it
    /// to the client's `Y.Doc`.
    pub update: String,
    /// The document's version with this update.
    pub version: i32,
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
        let after = parse_after(ctx, after.as_deref())?;
        let filter = Filter::table(message::Model::TABLE);
        let follower = start(ctx, channel_id, viewer, after, filter).await?;
        Ok(hand_over(ctx, follower)?)
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
        let after = parse_after(ctx, after.as_deref())?;
        // A missing document is refused like someone else's, so ids cannot be probed.
        let document = store::document::find(db(ctx)?, document_id)
            .await
            .map_err(AppError::from)?
            .ok_or_else(not_a_member)?;
        let filter = Filter::row(document::Model::TABLE, document_id);
        let follower = start(ctx, document.channel_id, viewer, after, filter).await?;
        Ok(hand_over(ctx, follower)?)
    }

    /// A document's text as Yjs updates. Without `after`, the first event holds what
    /// `stateVector` lacks (everything without one; an empty update when it lacks nothing)
    /// with the document's version; then every later update once, in order. With `after`,
    /// every update after that cursor, one event per update, then live (`stateVector` is not
    /// used). Ends after the document's deletion. Access and errors as for `messageEvents`.
    async fn document_updates(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The document to follow.")] document_id: ID,
        #[graphql(desc = "The client's Yjs state vector (v1, standard base64).")]
        state_vector: Option<String>,
        #[graphql(desc = "Resume after this event's cursor.")] after: Option<String>,
    ) -> async_graphql::Result<BoxStream<'static, AppResult<DocumentUpdateEvent>>> {
        if let Some(one) = ctx.data_opt::<RenderOne>() {
            return Ok(render_one(one, |event| {
                let (version, update) = documents::update_of(event)?;
                Some(DocumentUpdateEvent {
                    cursor: input::encode_cursor(CursorKind::Event, event.position),
                    update: update.to_owned(),
                    version: i32::try_from(version).ok()?,
                })
            }));
        }
        let viewer = viewer_id(ctx)?;
        let document_id = input::id("documentId", &document_id)?;
        let vector = state_vector_argument(state_vector.as_deref())?;
        let after = parse_after(ctx, after.as_deref())?;
        // A missing document is refused like someone else's, so ids cannot be probed.
        let document = store::document::find(db(ctx)?, document_id)
            .await
            .map_err(AppError::from)?
            .ok_or_else(not_a_member)?;
        let filter = documents::filter(document_id);
        let mut follower = start(ctx, document.channel_id, viewer, after, filter).await?;
        if after.is_none() {
            // Read after the opening: whatever it lacks arrives as an event.
            if store::yjs::needs_history(db(ctx)?, document_id).await? {
                begin_history(ctx, document_id).await?;
            }
            let sync = match store::yjs::load_for_sync(db(ctx)?, document_id).await {
                Err(store::StoreError::NotFound(_)) => return Err(not_a_member().into()),
                read => read?,
            };
            let first = documents::first_event(
                document_id,
                document.channel_id,
                sync.document.version.into(),
                sync.loaded.diff(vector.as_ref()),
                sync.position.max(follower.position()),
            );
            follower = follower.starting_with(first, sync.loaded.last_version);
        }
        Ok(hand_over(ctx, follower)?)
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

/// Opens `viewer`'s subscription to `channel_id`'s topic and checks it: the per-user quota
/// first (a refused subscription costs no database work), then membership and the cursor,
/// after the opening has subscribed (so a removal after it arrives as an event).
async fn start(
    ctx: &Context<'_>,
    channel_id: i64,
    viewer: i64,
    after: Option<i64>,
    filter: Filter,
) -> AppResult<Follower> {
    let quota = ctx
        .data::<Arc<SubscriptionQuota>>()
        .map_err(|_| super::missing("SubscriptionQuota"))?;
    let slot = quota.acquire(viewer).ok_or_else(|| {
        AppError::LimitExceeded(format!(
            "at most {} open subscriptions per user",
            quota.max()
        ))
    })?;
    let db = db(ctx)?;
    let opening = Opening::new(&live(ctx)?.broker, channel_id);
    // A missing channel is refused like someone else's, so ids cannot be probed.
    if !store::channel::is_member(db, channel_id, viewer).await? {
        return Err(not_a_member());
    }
    if let Some(after) = after {
        Opening::check_cursor(db, after).await?;
    }
    Ok(opening.follow(db.clone(), viewer, after, filter, slot))
}

/// Start mode: the checked subscription goes to the `Api` (see `shared`), which follows the
/// topic and renders its events; async-graphql's stream for it ends at once, empty.
fn hand_over<T: Send + 'static>(
    ctx: &Context<'_>,
    follower: Follower,
) -> AppResult<BoxStream<'static, AppResult<T>>> {
    let handover = ctx.data_opt::<Arc<Handover>>().ok_or_else(|| {
        super::missing("Handover (subscriptions run through Api::execute_stream)")
    })?;
    if !handover.put(follower) {
        return Err(AppError::bad_input(
            "subscription",
            "a subscription selects exactly one root field",
        ));
    }
    Ok(futures_util::stream::empty().boxed())
}

/// A cursor a transport resumes from in place of the `after` argument: an event stream's
/// `Last-Event-ID`, which a browser's `EventSource` sends when it reconnects.
#[derive(Clone, Debug)]
pub struct ResumeAfter(pub String);

/// The cursor to resume after: the transport's (`ResumeAfter`), else the `after` argument.
fn parse_after(ctx: &Context<'_>, after: Option<&str>) -> AppResult<Option<i64>> {
    if let Some(ResumeAfter(cursor)) = ctx.data_opt::<ResumeAfter>() {
        return input::decode_cursor("Last-Event-ID", CursorKind::Event, cursor).map(Some);
    }
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

fn not_a_member() -> AppError {
    AppError::Forbidden("only members of the channel may subscribe to it".into())
}
