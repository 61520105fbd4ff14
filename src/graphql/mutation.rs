//! The Mutation root.

use async_graphql::{Context, ID, InputObject, Object};

use super::error::{AppError, AppResult};
use super::input::{self, *};
use super::limits::{AuthLimiter, ClientAddr};
use super::types::{AuthPayload, Channel, Document, Message, User};
use super::{Committed, db, jwt_keys, missing, viewer_id};
use crate::{auth, store};

/// Input of `signUp`.
#[derive(InputObject)]
pub struct SignUpInput {
    /// Display name, 1 to 100 characters.
    pub name: String,
    /// Email address; must be unique (compared case-insensitively).
    pub email: String,
    /// Password, 8 to 128 characters.
    pub password: String,
}

/// Input of `signIn`.
#[derive(InputObject)]
pub struct SignInInput {
    /// Email address given at sign-up.
    pub email: String,
    /// Password given at sign-up.
    pub password: String,
}

/// Input of `createChannel`.
#[derive(InputObject)]
pub struct CreateChannelInput {
    /// Display name, 1 to 100 characters.
    pub name: String,
}

/// Input of `addChannelMember`.
#[derive(InputObject)]
pub struct AddChannelMemberInput {
    /// The channel; the caller must be a member.
    pub channel_id: ID,
    /// The user to add.
    pub user_id: ID,
}

/// Input of `removeChannelMember`.
#[derive(InputObject)]
pub struct RemoveChannelMemberInput {
    /// The channel; the caller must be a member.
    pub channel_id: ID,
    /// The member to remove (the caller may remove themselves).
    pub user_id: ID,
}

/// Input of `postMessage`.
#[derive(InputObject)]
pub struct PostMessageInput {
    /// The channel; the caller must be a member.
    pub channel_id: ID,
    /// The text, 1 to 4,000 characters (surrounding whitespace is trimmed).
    pub body: String,
}

/// Input of `editMessage`.
#[derive(InputObject)]
pub struct EditMessageInput {
    /// The message; only its author may edit it.
    pub id: ID,
    /// The new text, 1 to 4,000 characters (surrounding whitespace is trimmed).
    pub body: String,
    /// The version the edit is based on; a stale one gives CONFLICT and writes nothing.
    pub expected_version: i32,
}

/// Input of `deleteMessage`.
#[derive(InputObject)]
pub struct DeleteMessageInput {
    /// The message; only its author may delete it.
    pub id: ID,
    /// When given, delete only if the message is still at this version (else CONFLICT).
    pub expected_version: Option<i32>,
}

/// Input of `createDocument`.
#[derive(InputObject)]
pub struct CreateDocumentInput {
    /// The channel; the caller must be a member.
    pub channel_id: ID,
    /// The title, 1 to 200 characters (surrounding whitespace is trimmed).
    pub title: String,
    /// The content, up to 100,000 characters; may be empty.
    pub body: String,
}

/// Input of `updateDocument`.
#[derive(InputObject)]
pub struct UpdateDocumentInput {
    /// The document; the caller must be a member of its channel.
    pub id: ID,
    /// A new title, 1 to 200 characters; unchanged when omitted.
    pub title: Option<String>,
    /// A new content, up to 100,000 characters; unchanged when omitted.
    pub body: Option<String>,
    /// The version the update is based on; a stale one gives CONFLICT and writes nothing.
    pub expected_version: i32,
}

/// Input of `applyDocumentUpdate`.
#[derive(InputObject)]
pub struct ApplyDocumentUpdateInput {
    /// The document; the caller must be a member of its channel.
    pub document_id: ID,
    /// A Yjs update (v1 encoding, standard base64) of the document's root `Y.Text` `body`,
    /// at most `--max-document-update-bytes` (256 KiB by default) of base64.
    pub update: String,
}

/// What `applyDocumentUpdate` did.
#[derive(async_graphql::SimpleObject)]
pub struct DocumentUpdateResult {
    /// The update's place in the change feed (`documentEvents`'s `after`); when the update
    /// added nothing, the feed's end when the request began.
    pub cursor: String,
    /// The document's version after the update (unchanged when it added nothing).
    pub version: i32,
}

/// The largest `applyDocumentUpdate` update, in bytes of base64
/// (`--max-document-update-bytes`).
#[derive(Clone, Copy)]
pub struct DocumentUpdateLimit(pub usize);

/// Writes. Each one commits before it returns.
#[derive(Default)]
pub struct MutationRoot;

/// Writes. Each one commits before it returns.
#[Object]
impl MutationRoot {
    /// Creates an account and signs it in.
    async fn sign_up(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "What to do; see the input type.")] input: SignUpInput,
    ) -> AppResult<AuthPayload> {
        auth_attempt(ctx)?;
        let name = required_text("input.name", &input.name, USER_NAME_MAX)?;
        let email = input::email("input.email", &input.email)?;
        input::password("input.password", &input.password)?;
        let hash = auth::hash_password(input.password).await?;
        let user = store::user::create(db(ctx)?, name, &email, &hash)
            .await
            .map_err(|err| match err {
                store::StoreError::DuplicateEmail => AppError::bad_input(
                    "input.email",
                    "input.email: this email is already registered",
                ),
                other => other.into(),
            })?;
        let token = jwt_keys(ctx)?.issue(user.id)?;
        Ok(AuthPayload {
            token,
            user: User(user),
        })
    }

    /// Signs in with email and password; a wrong pair gives UNAUTHENTICATED.
    async fn sign_in(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "What to do; see the input type.")] input: SignInInput,
    ) -> AppResult<AuthPayload> {
        auth_attempt(ctx)?;
        let email = input.email.trim().to_lowercase();
        let user = store::user::find_by_email(db(ctx)?, &email).await?;
        let hash = user.as_ref().map(|u| u.password_hash.clone());
        let valid = auth::verify_password(input.password, hash).await?;
        match user {
            Some(user) if valid => {
                let token = jwt_keys(ctx)?.issue(user.id)?;
                Ok(AuthPayload {
                    token,
                    user: User(user),
                })
            }
            _ => Err(AppError::Unauthenticated("invalid email or password")),
        }
    }

    /// Creates a channel; the caller becomes its first member.
    async fn create_channel(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "What to do; see the input type.")] input: CreateChannelInput,
    ) -> AppResult<Channel> {
        let viewer = viewer_id(ctx)?;
        let name = required_text("input.name", &input.name, CHANNEL_NAME_MAX)?.to_owned();
        let written = Channel(
            Committed::new(ctx)?
                .write(move |db| {
                    Box::pin(async move { store::channel::create(&db, &name, viewer).await })
                })
                .await?,
        );
        Ok(written)
    }

    /// Adds a user to a channel the caller belongs to; adding a member again changes nothing.
    async fn add_channel_member(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "What to do; see the input type.")] input: AddChannelMemberInput,
    ) -> AppResult<Channel> {
        let viewer = viewer_id(ctx)?;
        let channel_id = input::id("input.channelId", &input.channel_id)?;
        let user_id = input::id("input.userId", &input.user_id)?;
        let written = Channel(
            Committed::new(ctx)?
                .write(move |db| {
                    Box::pin(async move {
                        store::channel::add_member(&db, viewer, channel_id, user_id).await
                    })
                })
                .await?,
        );
        Ok(written)
    }

    /// Removes a member from a channel the caller belongs to and returns the removed user.
    /// Their subscriptions to the channel end with FORBIDDEN.
    async fn remove_channel_member(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "What to do; see the input type.")] input: RemoveChannelMemberInput,
    ) -> AppResult<User> {
        let viewer = viewer_id(ctx)?;
        let channel_id = input::id("input.channelId", &input.channel_id)?;
        let user_id = input::id("input.userId", &input.user_id)?;
        let removed = Committed::new(ctx)?
            .write(move |db| {
                Box::pin(async move {
                    store::channel::remove_member(&db, viewer, channel_id, user_id).await
                })
            })
            .await?;
        Ok(User(removed))
    }

    /// Posts a message to a channel the caller belongs to.
    async fn post_message(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "What to do; see the input type.")] input: PostMessageInput,
    ) -> AppResult<Message> {
        let viewer = viewer_id(ctx)?;
        let channel_id = input::id("input.channelId", &input.channel_id)?;
        let body = required_text("input.body", &input.body, MESSAGE_BODY_MAX)?.to_owned();
        let written = Message::new(
            Committed::new(ctx)?
                .post_message(channel_id, viewer, body)
                .await?,
        );
        Ok(written)
    }

    /// Replaces the text of the caller's own message, if it is still at `expectedVersion`.
    async fn edit_message(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "What to do; see the input type.")] input: EditMessageInput,
    ) -> AppResult<Message> {
        let viewer = viewer_id(ctx)?;
        let id = input::id("input.id", &input.id)?;
        let body = required_text("input.body", &input.body, MESSAGE_BODY_MAX)?.to_owned();
        let expected_version = input.expected_version;
        let written = Message::new(
            Committed::new(ctx)?
                .write(move |db| {
                    Box::pin(async move {
                        store::message::edit(&db, viewer, id, &body, expected_version).await
                    })
                })
                .await?,
        );
        Ok(written)
    }

    /// Deletes the caller's own message and returns its last state.
    async fn delete_message(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "What to do; see the input type.")] input: DeleteMessageInput,
    ) -> AppResult<Message> {
        let viewer = viewer_id(ctx)?;
        let id = input::id("input.id", &input.id)?;
        let expected_version = input.expected_version;
        let written = Message::new(
            Committed::new(ctx)?
                .write(move |db| {
                    Box::pin(async move {
                        store::message::delete(&db, viewer, id, expected_version).await
                    })
                })
                .await?,
        );
        Ok(written)
    }

    /// Creates a shared document in a channel the caller belongs to.
    async fn create_document(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "What to do; see the input type.")] input: CreateDocumentInput,
    ) -> AppResult<Document> {
        let viewer = viewer_id(ctx)?;
        let channel_id = input::id("input.channelId", &input.channel_id)?;
        let title = required_text("input.title", &input.title, DOCUMENT_TITLE_MAX)?.to_owned();
        let body = input::document_body("input.body", &input.body)?.to_owned();
        let written = Document(
            Committed::new(ctx)?
                .write(move |db| {
                    Box::pin(async move {
                        store::document::create(&db, viewer, channel_id, &title, &body).await
                    })
                })
                .await?,
        );
        Ok(written)
    }

    /// Applies a Yjs update to a document's text (its root `Y.Text` `body`), merged with
    /// everyone else's edits. An update that adds something raises `version` by one and
    /// sets `body`; one that adds nothing changes nothing. An update that does not decode,
    /// depends on changes the server does not have, or touches another shared type is
    /// BAD_USER_INPUT, and nothing is stored.
    async fn apply_document_update(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "What to do; see the input type.")] input: ApplyDocumentUpdateInput,
    ) -> AppResult<DocumentUpdateResult> {
        let viewer = viewer_id(ctx)?;
        let id = input::id("input.documentId", &input.document_id)?;
        let limit = ctx
            .data::<DocumentUpdateLimit>()
            .map_err(|_| missing("DocumentUpdateLimit"))?
            .0;
        if input.update.len() > limit {
            return Err(AppError::bad_input(
                "input.update",
                format!("input.update: at most {limit} bytes of base64"),
            ));
        }
        // Decoded here first, so that garbage never reaches a write.
        store::yjs::decode(&input.update).map_err(store::StoreError::from)?;
        let update = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            input.update.trim(),
        )
        .map_err(|_| store::StoreError::from(store::yjs::BadUpdate::NotBase64))?;
        let applied = ctx
            .data::<super::YjsWrites>()
            .map_err(|_| missing("YjsWrites"))?
            .apply(viewer, id, update)
            .await?;
        let position = match applied.position {
            Some(position) => position,
            None => ctx.data::<super::FeedMark>().map(|m| m.0).unwrap_or(0),
        };
        Ok(DocumentUpdateResult {
            cursor: input::encode_cursor(CursorKind::Event, position),
            version: applied.document.version,
        })
    }

    /// Changes a document's title and/or body, if it is still at `expectedVersion`.
    async fn update_document(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "What to do; see the input type.")] input: UpdateDocumentInput,
    ) -> AppResult<Document> {
        let viewer = viewer_id(ctx)?;
        let id = input::id("input.id", &input.id)?;
        let title = input
            .title
            .as_deref()
            .map(|t| required_text("input.title", t, DOCUMENT_TITLE_MAX))
            .transpose()?;
        let body = input
            .body
            .as_deref()
            .map(|b| input::document_body("input.body", b))
            .transpose()?;
        if title.is_none() && body.is_none() {
            return Err(AppError::bad_input(
                "input",
                "input: give a title, a body or both",
            ));
        }
        let (title, body) = (title.map(str::to_owned), body.map(str::to_owned));
        let expected_version = input.expected_version;
        let written = Document(
            Committed::new(ctx)?
                .write(move |db| {
                    Box::pin(async move {
                        let (title, body) = (title.as_deref(), body.as_deref());
                        store::document::update(&db, viewer, id, title, body, expected_version)
                            .await
                    })
                })
                .await?,
        );
        Ok(written)
    }
}

/// Counts a signIn/signUp attempt against the client address's allowance (password
/// guessing and account spraying); RATE_LIMITED with `retryAfter` when it is used up. A
/// request without an address (run in-process, not over a socket) is not limited.
fn auth_attempt(ctx: &Context<'_>) -> AppResult<()> {
    let Some(ClientAddr(addr)) = ctx.data_opt::<ClientAddr>() else {
        return Ok(());
    };
    let limiter = ctx
        .data::<AuthLimiter>()
        .map_err(|_| missing("AuthLimiter"))?;
    limiter.check(*addr).map_err(|wait| AppError::RateLimited {
        retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
    })
}
