//! The GraphQL schema and per-request execution (`Api`: here, its parts and the request
//! path of a query or mutation). Runs without a socket: tests call `execute` directly. Its
//! rooms: `schema` (`AppSchema`, its limits, `sdl`), `operations` (`Api::execute_stream`:
//! any operation's run for a streaming transport, renders, start permits), `replies` (an operation's
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
mod operations;
mod persisted;
pub mod query;
mod replies;
mod schema;
mod shared;
pub mod subscription;
pub mod types;
mod yjs_writes;

use std::sync::Arc;

use sea_orm::DatabaseConnection;

use crate::auth::{JwtKeys, Viewer};
use crate::changes::{Announcer, Doorbell};
use crate::live::SubscriptionQuota;
use crate::pubsub::Broker;
pub(crate) use committed::Committed;
pub(crate) use context::{
    Reading, db, jwt_keys, live, loaders, missing, reading, viewer, viewer_id,
};
use error::ErrorCounts;
pub(crate) use live_query::LiveKey;
pub use mutation::MutationRoot;
pub use operations::StartPermit;
use operations::operation_span;
pub use query::QueryRoot;
pub use replies::{Keep, Replies, Target};
use schema::build_schema;
pub use schema::{AppSchema, SchemaLimits, is_live_query, sdl};
pub use subscription::SubscriptionRoot;
use tracing::Instrument as _;
pub use yjs_writes::YjsWrites;

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
    /// Live subscriptions that have caught up, as members of their topics' cohorts.
    cohorts: Arc<crate::live::cohorts::Cohorts>,
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
    /// The subscription has joined its topic's cohorts, which deliver into the
    /// transport's inbox (`Target::Shared`) from here on; its replies end here. The
    /// transport keeps `keep` while the subscription runs, and tells the cohorts of
    /// `topic` when it stops it.
    Joined {
        topic: i64,
        keep: Keep,
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
        let cohorts = crate::live::cohorts::Cohorts::new(live.broker.clone(), db.clone());
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
            cohorts,
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
