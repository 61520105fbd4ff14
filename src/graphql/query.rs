//! The Query root.

use async_graphql::{Context, ID, Object};

use super::error::{AppError, AppResult};
use super::input::{self, CursorKind};
use super::limits::page_limit;
use super::loaders::{DocumentsOf, MembersOf};
use super::types::{
    Channel, ChannelConnection, ChannelEdge, Document, PageInfo, User, page_complexity,
};
use super::{FeedMark, loaders, missing, reading, viewer, viewer_id};
use crate::auth::Viewer;
use crate::store;

/// Reads.
#[derive(Default)]
pub struct QueryRoot;

/// Reads.
#[Object]
impl QueryRoot {
    /// The signed-in user; null without a token.
    async fn me(&self, ctx: &Context<'_>) -> AppResult<Option<User>> {
        match viewer(ctx)? {
            Viewer::Anonymous => Ok(None),
            _ => {
                let id = viewer_id(ctx)?;
                Ok(store::user::find_by_id(&reading(ctx)?.reader, id)
                    .await?
                    .map(User))
            }
        }
    }

    /// The end of the change feed when this request began, before any other field was read:
    /// read a snapshot (say `channel { messages(last: 50) }`) in the same request, then
    /// subscribe with `after: feedCursor`. Every change committed after the snapshot is
    /// delivered; a change already in it may be delivered too (apply events by `version`).
    async fn feed_cursor(&self, ctx: &Context<'_>) -> AppResult<String> {
        viewer_id(ctx)?;
        if reading(ctx)?.reads.is_recording() {
            // It would change with every run; a live query's payloads carry the cursor.
            return Err(AppError::bad_input(
                "feedCursor",
                "a @live query has its cursor in each payload's extensions.cursor; select feedCursor without @live",
            ));
        }
        // Only `Api` attaches the mark; reading the position here instead would be unsound,
        // as sibling fields may already have read.
        let mark = ctx.data::<FeedMark>().map_err(|_| missing("FeedMark"))?;
        Ok(input::encode_cursor(CursorKind::Event, mark.0))
    }

    /// The channels the viewer is a member of, oldest first (Relay connection; `first` at
    /// most `--max-page-size`, 100 by default; when not given, 20 or the limit if lower).
    #[graphql(complexity = "page_complexity(first, child_complexity)")]
    async fn channels(
        &self,
        ctx: &Context<'_>,
        #[graphql(
            desc = "Page size, 0 to the server's `--max-page-size` (100 by default); when not given, 20 or the limit if lower."
        )]
        first: Option<i32>,
        #[graphql(desc = "Cursor of the edge to start after.")] after: Option<String>,
    ) -> AppResult<ChannelConnection> {
        let viewer = viewer_id(ctx)?;
        let request = input::page_request(
            CursorKind::Channel,
            page_limit(ctx),
            first,
            after.as_deref(),
            None,
            None,
        )?;
        let reading = reading(ctx)?;
        let page =
            store::channel::page_for_member(&reading.reader, viewer, request, &reading.reads)
                .await?;
        // Load the page's members and documents as one batch each when they are selected.
        let node = ctx.look_ahead().field("edges").field("node");
        let ids = || page.items.iter().map(|c| c.id);
        if node.field("members").exists() {
            loaders(ctx)?.load_many(ids().map(MembersOf)).await?;
        }
        if node.field("documents").exists() {
            loaders(ctx)?.load_many(ids().map(DocumentsOf)).await?;
        }
        let edges: Vec<ChannelEdge> = page
            .items
            .into_iter()
            .map(|c| ChannelEdge {
                cursor: input::encode_cursor(CursorKind::Channel, c.id),
                node: Channel(c),
            })
            .collect();
        let cursors = edges.iter().map(|e| e.cursor.as_str());
        Ok(ChannelConnection {
            page_info: PageInfo::new(page.has_next_page, page.has_previous_page, cursors),
            edges,
        })
    }

    /// A channel by id; null when it does not exist or the viewer is not a member.
    async fn channel(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The channel's id.")] id: ID,
    ) -> AppResult<Option<Channel>> {
        let viewer = viewer_id(ctx)?;
        let id = input::id("id", &id)?;
        let reading = reading(ctx)?;
        Ok(
            store::channel::find_for_member(&reading.reader, id, viewer, &reading.reads)
                .await?
                .map(Channel),
        )
    }

    /// A document by id; null when it does not exist or the viewer is not a member of its
    /// channel.
    async fn document(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The document's id.")] id: ID,
    ) -> AppResult<Option<Document>> {
        let viewer = viewer_id(ctx)?;
        let id = input::id("id", &id)?;
        let reading = reading(ctx)?;
        Ok(
            store::document::find_for_member(&reading.reader, viewer, id, &reading.reads)
                .await?
                .map(Document),
        )
    }
}
