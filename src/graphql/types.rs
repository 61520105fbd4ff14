//! The GraphQL object types: thin wrappers over entity models whose relations resolve
//! through the per-request loaders.

use std::collections::HashSet;
use std::sync::Arc;

use async_graphql::{Context, ID, Object, SimpleObject};
use chrono::{DateTime, Utc};
use entities::{channel, document, message, user};

use super::error::{AppError, AppResult};
use super::input::{self, CursorKind};
use super::limits::page_limit;
use super::loaders::{DocumentsOf, MembersOf, UserId};
use super::{db, loaders, reading};
use crate::pubsub::ChangeEvent;
use crate::store;

/// A person with an account.
pub struct User(pub user::Model);

/// A person with an account.
#[Object]
impl User {
    /// Opaque identifier.
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }

    /// Display name.
    async fn name(&self) -> &str {
        &self.0.name
    }

    /// Email address, lower-cased.
    async fn email(&self) -> &str {
        &self.0.email
    }
}

/// A shared space; only its members see it, its messages and its documents.
pub struct Channel(pub channel::Model);

/// A shared space; only its members see it, its messages and its documents.
#[Object]
impl Channel {
    /// Opaque identifier.
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }

    /// Display name.
    async fn name(&self) -> &str {
        &self.0.name
    }

    /// When the channel was created.
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }

    /// The members, in the order they joined.
    async fn members(&self, ctx: &Context<'_>) -> AppResult<Vec<User>> {
        let members = loaders(ctx)?.load_one(MembersOf(self.0.id)).await?;
        Ok(members.unwrap_or_default().into_iter().map(User).collect())
    }

    /// The messages, oldest first, as a Relay connection. Page forward with `first`/`after`
    /// or backward with `last`/`before` (the newest messages: `last: 20`). At most `--max-page-size` (100 by default) per
    /// page; when neither `first` nor `last` is given, 20 (or the limit if lower).
    #[graphql(complexity = "page_complexity(first.or(last), child_complexity)")]
    async fn messages(
        &self,
        ctx: &Context<'_>,
        #[graphql(
            desc = "Page size from the start (after `after`), 0 to the server's `--max-page-size` (100 by default)."
        )]
        first: Option<i32>,
        #[graphql(desc = "Cursor of the edge to start after.")] after: Option<String>,
        #[graphql(
            desc = "Page size from the end (before `before`), 0 to the server's `--max-page-size` (100 by default)."
        )]
        last: Option<i32>,
        #[graphql(desc = "Cursor of the edge to end before.")] before: Option<String>,
    ) -> AppResult<MessageConnection> {
        let request = input::page_request(
            CursorKind::Message,
            page_limit(ctx),
            first,
            after.as_deref(),
            last,
            before.as_deref(),
        )?;
        let reading = reading(ctx)?;
        let page =
            store::message::page(&reading.reader, self.0.id, request, &reading.reads).await?;
        // Load the page's authors as one batch when they are selected; `Message.author` then
        // reads them from the request's loader cache.
        if ctx
            .look_ahead()
            .field("edges")
            .field("node")
            .field("author")
            .exists()
        {
            let authors: HashSet<UserId> = page.items.iter().map(|m| UserId(m.author_id)).collect();
            loaders(ctx)?.load_many(authors).await?;
        }
        let edges: Vec<MessageEdge> = page
            .items
            .into_iter()
            .map(|m| MessageEdge {
                cursor: input::encode_cursor(CursorKind::Message, m.id),
                node: Message::new(m),
            })
            .collect();
        let cursors = edges.iter().map(|e| e.cursor.as_str());
        Ok(MessageConnection {
            page_info: PageInfo::new(page.has_next_page, page.has_previous_page, cursors),
            edges,
        })
    }

    /// The shared documents, oldest first.
    async fn documents(&self, ctx: &Context<'_>) -> AppResult<Vec<Document>> {
        let documents = loaders(ctx)?.load_one(DocumentsOf(self.0.id)).await?;
        Ok(documents
            .unwrap_or_default()
            .into_iter()
            .map(Document)
            .collect())
    }
}

/// A chat message in a channel.
pub struct Message {
    model: message::Model,
    /// The change this message comes from, when it is rendered for a subscription: its memo
    /// shares the author lookup among every subscriber of that change.
    event: Option<Arc<ChangeEvent>>,
}

impl Message {
    /// A message read from the database.
    pub fn new(model: message::Model) -> Self {
        Self { model, event: None }
    }

    /// A message decoded from a change event's row image.
    pub fn from_event(model: message::Model, event: Arc<ChangeEvent>) -> Self {
        Self {
            model,
            event: Some(event),
        }
    }
}

/// A chat message in a channel.
#[Object]
impl Message {
    /// Opaque identifier.
    async fn id(&self) -> ID {
        ID(self.model.id.to_string())
    }

    /// The channel it was posted in.
    async fn channel_id(&self) -> ID {
        ID(self.model.channel_id.to_string())
    }

    /// Who posted it.
    async fn author(&self, ctx: &Context<'_>) -> AppResult<User> {
        let author_id = self.model.author_id;
        let author = match &self.event {
            Some(event) => {
                let db = db(ctx)?.clone();
                let author = event
                    .memo
                    .get_or_try_init("author", author_id, || async move {
                        store::user::find_by_id(&db, author_id)
                            .await
                            .map_err(AppError::from)
                    })
                    .await?;
                author.as_ref().clone()
            }
            None => loaders(ctx)?.load_one(UserId(author_id)).await?,
        };
        author
            .map(User)
            .ok_or_else(|| AppError::NotFound("the message's author no longer exists".into()))
    }

    /// The text, 1 to 4,000 characters.
    async fn body(&self) -> &str {
        &self.model.body
    }

    /// Starts at 1 and rises by one with every change; pass it as `expectedVersion`.
    async fn version(&self) -> i32 {
        self.model.version
    }

    /// When it was posted.
    async fn created_at(&self) -> DateTime<Utc> {
        self.model.created_at
    }

    /// When it last changed.
    async fn updated_at(&self) -> DateTime<Utc> {
        self.model.updated_at
    }
}

/// A document that a channel's members edit together.
pub struct Document(pub document::Model);

/// A document that a channel's members edit together.
#[Object]
impl Document {
    /// Opaque identifier.
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }

    /// The channel it belongs to.
    async fn channel_id(&self) -> ID {
        ID(self.0.channel_id.to_string())
    }

    /// The title, 1 to 200 characters.
    async fn title(&self) -> &str {
        &self.0.title
    }

    /// The content, up to 100,000 characters (may be empty).
    async fn body(&self) -> &str {
        &self.0.body
    }

    /// Starts at 1 and rises by one with every change; pass it as `expectedVersion`.
    async fn version(&self) -> i32 {
        self.0.version
    }

    /// When it last changed.
    async fn updated_at(&self) -> DateTime<Utc> {
        self.0.updated_at
    }

    /// The text as a Yjs document: a Yjs v1 update (standard base64) holding what the given
    /// state vector (base64) lacks; the whole state without one. A Yjs client applies it to
    /// its `Y.Doc`, whose root `Y.Text` `body` is the text.
    async fn yjs_state(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The client's state vector (Yjs v1, standard base64).")]
        state_vector: Option<String>,
    ) -> AppResult<String> {
        let vector = state_vector_argument(state_vector.as_deref())?;
        Ok(yjs_document(ctx, &self.0).await?.diff(vector.as_ref()))
    }

    /// The Yjs document's state vector (v1, standard base64).
    async fn yjs_state_vector(&self, ctx: &Context<'_>) -> AppResult<String> {
        Ok(yjs_document(ctx, &self.0).await?.state_vector())
    }
}

/// `document`'s Yjs document, read where the request reads. One without a Yjs history yet
/// (made by a SQL INSERT, or before documents were Yjs documents) gets it first, once; a
/// text written by SQL is folded into it first.
async fn yjs_document(
    ctx: &Context<'_>,
    document: &document::Model,
) -> AppResult<store::yjs::Loaded> {
    let reading = super::reading(ctx)?;
    let loaded = store::yjs::load(&reading.reader, document.id).await?;
    if !loaded.needs_history(&document.body) {
        return Ok(loaded);
    }
    begin_history(ctx, document.id).await?;
    Ok(store::yjs::load(super::db(ctx)?, document.id).await?)
}

/// Gives document `id` its Yjs history, and folds a text written by SQL into it
/// (`store::yjs::begin_history`), as a write that rings the feed.
pub(super) async fn begin_history(ctx: &Context<'_>, id: i64) -> AppResult<()> {
    super::Committed::new(ctx)?
        .write(move |db| Box::pin(async move { store::yjs::begin_history(&db, id).await }))
        .await?;
    Ok(())
}

/// A `stateVector` argument (Yjs v1, standard base64), decoded.
pub(super) fn state_vector_argument(vector: Option<&str>) -> AppResult<Option<yrs::StateVector>> {
    vector
        .map(store::yjs::decode_state_vector)
        .transpose()
        .map_err(|err| AppError::bad_input("stateVector", format!("stateVector: {err}")))
}

/// A signed-in session: send `token` as `Authorization: Bearer <token>`.
#[derive(SimpleObject)]
pub struct AuthPayload {
    /// A JWT (HS256) that expires; sign in again for a new one.
    pub token: String,
    /// The signed-in user.
    pub user: User,
}

/// Where a page sits in its list (Relay).
#[derive(SimpleObject)]
pub struct PageInfo {
    /// More items follow the last one of this page.
    pub has_next_page: bool,
    /// More items precede the first one of this page.
    pub has_previous_page: bool,
    /// Cursor of the first item of this page.
    pub start_cursor: Option<String>,
    /// Cursor of the last item of this page.
    pub end_cursor: Option<String>,
}

impl PageInfo {
    /// The page info of a page whose edges have `cursors`, in order.
    pub fn new<'a>(
        has_next_page: bool,
        has_previous_page: bool,
        mut cursors: impl DoubleEndedIterator<Item = &'a str>,
    ) -> Self {
        let start_cursor = cursors.next().map(str::to_owned);
        let end_cursor = cursors
            .next_back()
            .map(str::to_owned)
            .or(start_cursor.clone());
        Self {
            has_next_page,
            has_previous_page,
            start_cursor,
            end_cursor,
        }
    }
}

/// A message and its cursor.
#[derive(SimpleObject)]
pub struct MessageEdge {
    /// Opaque position of this message in the list.
    pub cursor: String,
    /// The message.
    pub node: Message,
}

/// A page of messages (Relay connection).
#[derive(SimpleObject)]
pub struct MessageConnection {
    /// The messages of this page, oldest first.
    pub edges: Vec<MessageEdge>,
    /// Where this page sits in the list.
    pub page_info: PageInfo,
}

/// A channel and its cursor.
#[derive(SimpleObject)]
pub struct ChannelEdge {
    /// Opaque position of this channel in the list.
    pub cursor: String,
    /// The channel.
    pub node: Channel,
}

/// A page of channels (Relay connection).
#[derive(SimpleObject)]
pub struct ChannelConnection {
    /// The channels of this page, oldest first.
    pub edges: Vec<ChannelEdge>,
    /// Where this page sits in the list.
    pub page_info: PageInfo,
}

/// A page's cost against `--max-query-complexity`: what each item selects, times the items
/// it may hold, so nested pages multiply as their reads do.
pub(crate) fn page_complexity(size: Option<i32>, child_complexity: usize) -> usize {
    page_items(size)
        .saturating_mul(child_complexity)
        .saturating_add(1)
}

/// The items a page of `size` (`first`/`last`) may hold, as the complexity check counts them.
pub(crate) fn page_items(size: Option<i32>) -> usize {
    // Sizes past the page limit are refused when the field runs, with the field named; the
    // complexity check (which cannot see `--max-page-size`, at most PAGE_SIZE_MAX) counts
    // them at the most any setting allows, so it does not refuse them first.
    size.map_or(input::PAGE_SIZE_DEFAULT as i32, |size| {
        size.clamp(1, input::PAGE_SIZE_MAX)
    }) as usize
}
