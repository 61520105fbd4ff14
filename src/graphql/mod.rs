//! The GraphQL schema: `AppSchema`, `sdl`, and per-request execution (`Api`). Runs
//! without a socket: tests call `execute` directly. Its rooms: `replies` (an operation's
//! replies, the live phase of a subscription), `context` (what resolvers take from a
//! request), `committed` (how a mutation writes), `shared` (subscription shapes, render
//! mode), the roots and types, and the request checks (`complexity`, `introspection`,
//! `persisted`, `documents`, `limits`, `input`, `error`).

mod committed;
mod complexity;
mod context;
mod documents;
pub mod error;
pub mod input;
mod introspection;
pub mod limits;
mod live_query;
pub mod loaders;
pub mod mutation;
mod persisted;
pub mod query;
mod replies;
mod shared;
pub mod subscription;
pub mod types;
mod yjs_writes;

use std::sync::Arc;

use async_graphql::Schema;
use futures_util::StreamExt;
use sea_orm::DatabaseConnection;
use tokio::sync::mpsc;

use crate::auth::{JwtKeys, Viewer};
use crate::changes::{Announcer, Doorbell};
use crate::live::SubscriptionQuota;
use crate::pubsub::{Broker, FeedStats};
pub(crate) use committed::Committed;
pub(crate) use context::{
    Reading, db, jwt_keys, live, loaders, missing, reading, viewer, viewer_id,
};
use error::ErrorCounts;
use limits::{AuthLimiter, PageLimit};
pub(crate) use live_query::LiveKey;
pub use mutation::MutationRoot;
pub use query::QueryRoot;
pub use replies::Replies;
use replies::{AbortOnDrop, Finished};
pub use subscription::SubscriptionRoot;
use tracing::Instrument as _;
pub use yjs_writes::YjsWrites;

/// The executable schema.
pub type AppSchema = Schema<QueryRoot, MutationRoot, SubscriptionRoot>;

/// The change feed as resolvers see it: the hub to subscribe to, the doorbell and the
/// announcer that mutations ring after they commit, and the permits subscriptions take to
/// start.
#[derive(Clone)]
pub struct Live {
    pub broker: Arc<Broker>,
    pub doorbell: Doorbell,
    /// Tells the other processes (PostgreSQL) of this one's commits.
    pub announcer: Announcer,
    /// How many WebSocket operations may start at once (parse, validate, and for a
    /// subscription check membership and the cursor and hand over; a query or mutation
    /// holds it for its whole run): as many as the pool has connections. A start holds ~15 KiB that
    /// a handed-over subscription no longer needs (async-graphql's execution, the parsed
    /// document, the start-up queries' futures); 10,000 subscriptions starting together
    /// would otherwise hold it all at once while waiting for a connection, memory the
    /// allocator then keeps. Taken by the transport before it starts an operation
    /// (`Api::start_permit`), so the WebSocket reads no further message of its socket while
    /// it waits; released when the start ends.
    pub subscription_starts: Arc<tokio::sync::Semaphore>,
}

/// What the schema limits (from `config::Limits::schema`).
#[derive(Clone, Copy, Debug)]
pub struct SchemaLimits {
    /// Deepest selection nesting of one operation.
    pub max_depth: usize,
    /// Most fields one document selects (see `complexity`).
    pub max_complexity: usize,
    /// Whether introspection is answered.
    pub introspection: bool,
    /// Open subscriptions of one user in this process.
    pub max_subscriptions_per_user: u32,
    /// signIn/signUp attempts per client address per minute.
    pub auth_attempts_per_minute: u32,
    /// Largest `first`/`last` of a page, 1 to `input::PAGE_SIZE_MAX`.
    pub max_page_size: i32,
    /// Largest result of a live query, in bytes of JSON.
    pub live_max_result_bytes: usize,
    /// Largest Yjs update of `applyDocumentUpdate`, in bytes of base64.
    pub max_document_update_bytes: usize,
}

/// Builds the schema over a database connection (and how writes run on it), this process's
/// token keys, the feed and the subscription quota it shares with live queries.
fn build_schema(
    db: DatabaseConnection,
    writes: crate::store::Writes,
    keys: JwtKeys,
    live: Live,
    limits: &SchemaLimits,
    quota: Arc<SubscriptionQuota>,
    yjs: YjsWrites,
) -> AppSchema {
    let builder = Schema::build(QueryRoot, MutationRoot, SubscriptionRoot)
        .data(yjs)
        .data(Reading::pool(db.clone()))
        .data(db)
        .data(writes)
        .data(keys)
        .data(live)
        .data(quota)
        .data(AuthLimiter::new(limits.auth_attempts_per_minute))
        .data(mutation::DocumentUpdateLimit(
            limits.max_document_update_bytes,
        ))
        .data(PageLimit(
            limits.max_page_size.clamp(1, input::PAGE_SIZE_MAX),
        ))
        .directive(live_query::LiveDirective)
        .limit_depth(limits.max_depth)
        .limit_complexity(limits.max_complexity)
        .extension(complexity::FullComplexity {
            max: limits.max_complexity,
        });
    if limits.introspection {
        builder.finish()
    } else {
        builder
            .disable_introspection()
            .extension(introspection::RefuseIntrospection)
            .finish()
    }
}

/// True when `request` is a `@live` query (one that can run: a refused `@live` is not), which
/// a streaming transport streams and plain HTTP answers once.
pub fn is_live_query(request: &mut async_graphql::Request) -> bool {
    matches!(live_query::options(request), Ok(Some(_)))
}

/// The schema's SDL, as committed in `schema.graphql`.
pub fn sdl() -> String {
    Schema::build(QueryRoot, MutationRoot, SubscriptionRoot)
        .directive(live_query::LiveDirective)
        .finish()
        .sdl()
}

/// The schema plus what each request needs attached: cheap to clone (one pointer; every
/// running operation holds one), shared by transports.
#[derive(Clone)]
pub struct Api(Arc<ApiParts>);

/// What an `Api` shares.
pub struct ApiParts {
    schema: AppSchema,
    db: DatabaseConnection,
    broker: Arc<Broker>,
    errors: Arc<ErrorCounts>,
    persisted: persisted::PersistedQueries,
    documents: documents::ParsedDocuments,
    shapes: Arc<shared::Shapes>,
    subscription_starts: Arc<tokio::sync::Semaphore>,
    /// The live queries' engine, started with the first live query.
    live_queries: std::sync::OnceLock<live_query::LiveQueries>,
    live_max_result_bytes: usize,
    quota: Arc<SubscriptionQuota>,
    /// Writes outside a request (the y-websocket endpoint's), ringing the feed.
    writes: crate::store::Writes,
    /// Yjs updates, written together per document (`yjs_writes`).
    yjs: YjsWrites,
    live: Live,
    /// The pool's connections (the start permits' number, read before any is taken).
    pool_connections: usize,
}

impl std::ops::Deref for Api {
    type Target = ApiParts;

    fn deref(&self) -> &ApiParts {
        &self.0
    }
}

/// One reply of an operation: a response, or a subscription event's payload rendered once
/// for every subscription of its shape (the JSON text of a response).
pub enum Reply {
    Response(Box<async_graphql::Response>),
    /// `position`: the event's place in the feed (its cursor), when the payload is an event
    /// (not an error that ended the subscription).
    Shared {
        json: Arc<str>,
        position: Option<i64>,
    },
    /// The subscription has started following its topic: every change up to `position`
    /// is behind it (replayed or before its start), so resuming after `position` misses
    /// nothing. Sent once, before its first event; transports that cannot use it skip it.
    Following {
        position: i64,
    },
}

impl Reply {
    /// A feed position as the opaque cursor clients resume from (`after`).
    pub fn cursor(position: i64) -> String {
        input::encode_cursor(input::CursorKind::Event, position)
    }
}

/// The feed position published when a request began, before any of its fields was read:
/// every change up to it had committed by then, so the request's reads include it.
#[derive(Clone, Copy)]
pub(crate) struct FeedMark(pub i64);

impl Api {
    /// The API over `db`, signing tokens with `keys`, streaming from `live`.
    pub fn new(
        db: DatabaseConnection,
        writes: crate::store::Writes,
        keys: JwtKeys,
        live: Live,
        limits: &SchemaLimits,
    ) -> Self {
        let quota = SubscriptionQuota::new(limits.max_subscriptions_per_user);
        let yjs = YjsWrites::new(
            writes.clone(),
            live.clone(),
            crate::store::yjs::Cache::default(),
        );
        Self(Arc::new(ApiParts {
            errors: Arc::default(),
            persisted: persisted::PersistedQueries::default(),
            documents: documents::ParsedDocuments::default(),
            broker: live.broker.clone(),
            pool_connections: live.subscription_starts.available_permits(),
            subscription_starts: live.subscription_starts.clone(),
            schema: build_schema(
                db.clone(),
                writes.clone(),
                keys,
                live.clone(),
                limits,
                quota.clone(),
                yjs.clone(),
            ),
            quota,
            writes,
            yjs,
            live,
            db,
            shapes: Arc::default(),
            live_queries: std::sync::OnceLock::new(),
            live_max_result_bytes: limits.live_max_result_bytes,
        }))
    }

    /// A write outside a request, through the same path as a mutation's (see `Committed`).
    pub(crate) fn committed(&self) -> Committed<'_> {
        Committed::with(Some(&self.live), &self.writes)
    }

    /// Yjs updates, written together per document.
    pub fn yjs_writes(&self) -> &YjsWrites {
        &self.yjs
    }

    /// The database connection (a pool handle).
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// The hub of published changes.
    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// Each user's open subscriptions in this process.
    pub fn quota(&self) -> &Arc<SubscriptionQuota> {
        &self.quota
    }

    /// The executable schema.
    pub fn schema(&self) -> &AppSchema {
        &self.schema
    }

    /// Gives `request` its parsed document from the cache of parsed documents (see
    /// `documents`), so that nothing parses its text again.
    pub fn parse(&self, request: &mut async_graphql::Request) {
        self.documents.attach(request);
    }

    /// Attaches the parsed document, the viewer, fresh loaders and the feed mark (taken
    /// first, see `FeedMark`).
    fn prepare(
        &self,
        mut request: async_graphql::Request,
        viewer: Viewer,
    ) -> async_graphql::Request {
        let mark = FeedMark(self.broker.published());
        self.documents.attach(&mut request);
        request
            .data(mark)
            .data(viewer)
            .data(loaders::loaders(Reading::pool(self.db.clone())))
    }

    /// Runs one request as `viewer` with fresh loaders, and makes sure every error carries
    /// a code.
    pub async fn execute(
        &self,
        request: async_graphql::Request,
        viewer: Viewer,
    ) -> async_graphql::Response {
        let span = operation_span(&request, viewer);
        let started = std::time::Instant::now();
        let mut request = self.prepare(request, viewer);
        // A `@live` query sent as a plain request is answered once, like any query.
        let mut response = match live_query::options(&mut request) {
            Err(err) => async_graphql::Response::from_errors(vec![err]),
            Ok(_) => self.schema.execute(request).instrument(span.clone()).await,
        };
        self.finish(&mut response);
        tracing::debug!(
            parent: &span,
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            errors = response.errors.len(),
            "operation finished"
        );
        response
    }

    /// Resolves an Apollo persisted query (`extensions.persistedQuery`): a known hash
    /// becomes its text, a text with its hash is registered. Transports call it before
    /// anything reads the request; the error (PERSISTED_QUERY_NOT_FOUND, or BAD_USER_INPUT
    /// for a hash that is not its text's) is counted.
    pub fn resolve_persisted(
        &self,
        request: &mut async_graphql::Request,
    ) -> Result<(), async_graphql::ServerError> {
        self.persisted.resolve(request).inspect_err(|err| {
            let code = err.extensions.as_ref().and_then(|e| e.get("code"));
            if let Some(async_graphql::Value::String(code)) = code {
                self.count_error(code);
            }
        })
    }

    /// An error a transport answers on its own (a request it could not read, an operation
    /// past a limit), made by `error::coded` and counted, so `/metrics` sees every coded
    /// error.
    pub fn refuse(
        &self,
        code: &'static str,
        message: impl Into<String>,
    ) -> async_graphql::ServerError {
        self.count_error(code);
        error::coded(code, message, None)
    }

    fn count_error(&self, code: &str) {
        self.errors.add(code);
    }

    /// GraphQL errors sent so far, by code (for `/metrics`).
    pub fn error_counts(&self) -> Arc<ErrorCounts> {
        self.errors.clone()
    }

    /// Gives every error a code, and counts it.
    fn finish(&self, response: &mut async_graphql::Response) {
        for code in codes(response) {
            self.errors.add(&code);
        }
    }

    /// Runs one operation of any kind as `viewer`; its replies come from `Replies::next`
    /// (one for a query or mutation, one per event for a subscription), every error with a
    /// code. The operation's work runs in its span; when the replies end or are dropped
    /// (the client completed it), its duration and reply count are logged.
    ///
    /// Two phases. The start runs through async-graphql under `permit`: a query or
    /// mutation runs whole; a subscription's
    /// resolver checks it and hands it over (`shared::Handover`). Then, for a subscription,
    /// the live phase follows the topic and sends each event's rendering, made once per
    /// shape and shared (`Reply::Shared`). The start's state (async-graphql's stream, the
    /// parsed document, the request) is freed before the live phase begins.
    pub fn execute_stream(
        &self,
        request: async_graphql::Request,
        viewer: Viewer,
        permit: StartPermit,
    ) -> Replies {
        let span = operation_span(&request, viewer);
        // Made before the replies are first asked for, so an operation completed at once is
        // logged too, and its duration counts from here.
        let finished = Finished {
            span: span.clone(),
            started: std::time::Instant::now(),
            responses: 0,
            errors: 0,
        };
        let mut request = self.prepare(request, viewer);
        match live_query::options(&mut request) {
            Ok(None) => {}
            Ok(Some(options)) => {
                return self.live_replies(&request, viewer, options, permit, finished);
            }
            Err(err) => return self.refused(err, finished),
        }
        let handover = Arc::new(shared::Handover::default());
        let request = request.data(handover.clone());
        let api = self.clone();
        // The start runs in a task of its own, so that it makes progress (and gives its
        // permit back) however the transport drives the replies: a WebSocket whose client
        // does not read stops polling its operations, and must not hold a permit meanwhile.
        let (responses, start) = mpsc::channel(4);
        let task = {
            let handover = handover.clone();
            tokio::spawn(async move {
                let mut permit = Some(permit);
                let mut request = request;
                match shared::plan(&mut request) {
                    Ok(parts) => handover.set_shape(parts),
                    Err(err) => {
                        let _ = responses
                            .send(async_graphql::Response::from_errors(vec![err]))
                            .await;
                        return;
                    }
                }
                let mut inner = api.schema.execute_stream(request);
                while let Some(response) = inner.next().instrument(span.clone()).await {
                    // Started (or refused): the next operation may start.
                    permit = None;
                    if responses.send(response).await.is_err() {
                        return;
                    }
                }
                drop(permit);
            })
        };
        Replies {
            api: self.clone(),
            start: Some(start),
            start_task: Some(AbortOnDrop(task)),
            handover: Some(handover),
            live: None,
            live_query: None,
            finished,
        }
    }

    /// Replies that are one response with `err`, refused before anything ran.
    fn refused(&self, err: async_graphql::ServerError, finished: Finished) -> Replies {
        let (responses, start) = mpsc::channel(1);
        let _ = responses.try_send(async_graphql::Response::from_errors(vec![err]));
        Replies {
            api: self.clone(),
            start: Some(start),
            start_task: None,
            handover: None,
            live: None,
            live_query: None,
            finished,
        }
    }

    /// A live query's replies: a member of its cohort (see `live::queries`), holding one of
    /// the viewer's subscription slots.
    fn live_replies(
        &self,
        request: &async_graphql::Request,
        viewer: Viewer,
        options: live_query::LiveOptions,
        permit: StartPermit,
        finished: Finished,
    ) -> Replies {
        let slot = match viewer {
            Viewer::User(id) => match self.quota.acquire(id) {
                Some(slot) => Some(slot),
                None => {
                    // Counted when the replies hand it out, like every refusal.
                    let err = error::coded(
                        error::code::LIMIT_EXCEEDED,
                        format!(
                            "at most {} open subscriptions and live queries per user",
                            self.quota.max()
                        ),
                        None,
                    );
                    return self.refused(err, finished);
                }
            },
            _ => None,
        };
        let member = self
            .live_queries()
            .join(live_query::LiveKey::new(request, viewer), options.throttle);
        // Joining is the whole start: executions wait for the engine's own permits, so the
        // transport may start its next operation at once (and a first execution that is
        // retried holds nothing of the socket's).
        drop(permit);
        Replies {
            api: self.clone(),
            start: None,
            start_task: None,
            handover: None,
            live: None,
            live_query: Some(Box::new(replies::LiveReplies {
                member,
                _slot: slot,
            })),
            finished,
        }
    }

    /// The live queries' engine, made (and its matching of the feed started) by the first
    /// live query. Its executions hold a pooled connection each; at most half the pool's
    /// connections run them at once, so requests keep the other half.
    fn live_queries(&self) -> &live_query::LiveQueries {
        self.live_queries.get_or_init(|| {
            // Subscribed before any execution takes its cursor (see `live::queries`).
            let events = self.broker.subscribe_all();
            let parts = Arc::downgrade(&self.0);
            let engine = live_query::LiveQueries::new(
                self.broker.clone(),
                Box::new(move |key| {
                    let parts = parts.upgrade();
                    Box::pin(async move {
                        match parts {
                            Some(parts) => Api(parts).execute_live(key).await,
                            // The server is gone; nobody reads the stream.
                            None => crate::live::queries::Outcome::Final(Arc::default()),
                        }
                    })
                }),
                self.pool_connections.div_ceil(2),
                Reply::cursor,
            );
            tokio::spawn(engine.clone().run(events));
            engine
        })
    }

    /// A permit to start an operation (see `Live::subscription_starts`). Transports take it
    /// before they hand the operation over, so that what waits for it is as small as can
    /// be; it is released when the start ends.
    pub fn start_permit(&self) -> impl std::future::Future<Output = StartPermit> + Send + 'static {
        let starts = self.subscription_starts.clone();
        async move {
            StartPermit {
                _permit: starts.acquire_owned().await.ok(),
            }
        }
    }

    /// Renders one event (or error) under `shape`: the subscription's document run in
    /// render mode, as no viewer (see `shared`). `Err` holds a rendering with an internal
    /// error (a failed author lookup, say): delivered, but not kept for others to share,
    /// so the next subscriber tries again.
    async fn render(
        &self,
        shape: &shared::Shape,
        one: shared::RenderOne,
    ) -> Result<shared::Rendered, shared::Rendered> {
        FeedStats::add(&self.broker.stats.renders, 1);
        let mut request = async_graphql::Request::new(shape.query.clone())
            .variables(shape.variables.clone())
            .data(one)
            .data(loaders::loaders(Reading::pool(self.db.clone())));
        request.operation_name = shape.operation_name.clone();
        self.documents.attach(&mut request);
        let Some(mut response) = self.schema.execute_stream(request).next().await else {
            return Ok(shared::Rendered {
                json: None,
                codes: Vec::new(),
            });
        };
        let codes = codes(&mut response);
        let json = match serde_json::to_string(&response) {
            Ok(json) => json,
            Err(err) => {
                // Only a map with non-string keys fails; a GraphQL response has none.
                tracing::error!(error = %err, "a response could not be serialized");
                return Ok(shared::Rendered {
                    json: None,
                    codes: Vec::new(),
                });
            }
        };
        let internal = codes
            .iter()
            .any(|code| code == error::code::INTERNAL_SERVER_ERROR);
        let rendered = shared::Rendered {
            json: Some(json.into()),
            codes,
        };
        if internal {
            Err(rendered)
        } else {
            Ok(rendered)
        }
    }
}

/// A permit to start one operation (`Api::start_permit`).
pub struct StartPermit {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Gives every error of `response` a code, and returns the codes.
fn codes(response: &mut async_graphql::Response) -> Vec<String> {
    error::ensure_codes(response);
    response
        .errors
        .iter()
        .map(|err| {
            err.extensions
                .as_ref()
                .and_then(|extensions| extensions.get("code"))
                .and_then(|code| match code {
                    async_graphql::Value::String(code) => Some(code.clone()),
                    _ => None,
                })
                .unwrap_or_default()
        })
        .collect()
}

/// The span an operation runs in: its name (when the request names one) and the viewer.
fn operation_span(request: &async_graphql::Request, viewer: Viewer) -> tracing::Span {
    let viewer = match viewer {
        Viewer::User(id) => Some(id),
        _ => None,
    };
    tracing::info_span!(
        "graphql",
        operation = request.operation_name.as_deref().unwrap_or(""),
        viewer,
    )
}
