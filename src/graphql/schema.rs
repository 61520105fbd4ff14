//! The schema: its roots, the data every request can reach, the limits it enforces, and its
//! SDL.

use std::sync::Arc;

use async_graphql::Schema;
use sea_orm::DatabaseConnection;

use super::limits::{AuthLimiter, PageLimit};
use super::{
    Live, MutationRoot, QueryRoot, Reading, SubscriptionRoot, YjsWrites, complexity, input,
    introspection, live_query, mutation,
};
use crate::auth::JwtKeys;
use crate::live::SubscriptionQuota;

/// The executable schema.
pub type AppSchema = Schema<QueryRoot, MutationRoot, SubscriptionRoot>;

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
pub(super) fn build_schema(
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
