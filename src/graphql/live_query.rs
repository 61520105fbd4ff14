//! `@live` queries, the GraphQL side: the directive in the schema, reading it off a request,
//! and executing a cohort's key as its viewer on one snapshot while recording what the
//! execution read. The cohorts, the feed matching and the patches are `live::queries`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use async_graphql::parser::types::{ExecutableDocument, OperationDefinition, OperationType};
use async_graphql::registry::{MetaDirective, MetaInputValue, Registry};
use async_graphql::{
    CustomDirective, CustomDirectiveFactory, Positioned, ServerError, ServerResult,
};

use super::context::Reading;
use super::error::{self, code};
use super::{Api, FeedMark, loaders};
use crate::auth::Viewer;
use crate::live::queries::Outcome;
use crate::store::{Reader, Reads};

/// The directive's name, as clients write it.
const LIVE: &str = "live";

/// The longest `throttle` (a minute): a live query updates at least that often when its
/// data changes.
pub const MAX_THROTTLE_MS: i64 = 60_000;

/// What ends a live query's stream before or instead of a result: its errors.
pub type Refusal = Arc<Vec<ServerError>>;

/// The engine as the API runs it.
pub type LiveQueries = crate::live::queries::LiveQueries<LiveKey, Refusal>;

/// What makes two live queries one cohort: the same operation of the same document with
/// the same variables, as the same viewer (every read is the viewer's).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct LiveKey {
    query: Arc<str>,
    operation_name: Option<Arc<str>>,
    /// The variables as JSON text (a sorted map, so equal variables are equal text).
    variables: Arc<str>,
    viewer: Option<i64>,
    invalid_token: bool,
}

impl LiveKey {
    pub(super) fn new(request: &async_graphql::Request, viewer: Viewer) -> Self {
        Self {
            query: request.query.as_str().into(),
            operation_name: request.operation_name.as_deref().map(Into::into),
            variables: serde_json::to_string(&request.variables)
                .unwrap_or_default()
                .into(),
            viewer: match viewer {
                Viewer::User(id) => Some(id),
                _ => None,
            },
            invalid_token: matches!(viewer, Viewer::InvalidToken),
        }
    }

    fn viewer(&self) -> Viewer {
        match (self.viewer, self.invalid_token) {
            (Some(id), _) => Viewer::User(id),
            (None, true) => Viewer::InvalidToken,
            (None, false) => Viewer::Anonymous,
        }
    }
}

/// How a live query asked to be run.
#[derive(Clone, Copy, Debug)]
pub struct LiveOptions {
    /// At least this long between two executions.
    pub throttle: Duration,
}

/// Declares `directive @live(throttle: Int) on QUERY` in the schema, so validation accepts
/// it on queries (and refuses it elsewhere; `options` answers those first with
/// BAD_USER_INPUT). async-graphql runs custom directives on fields only; this one is read
/// off the operation by `options` and has no effect on execution.
pub struct LiveDirective;

impl CustomDirectiveFactory for LiveDirective {
    fn name(&self) -> Cow<'static, str> {
        Cow::Borrowed(LIVE)
    }

    fn register(&self, registry: &mut Registry) {
        let mut args = async_graphql::indexmap::IndexMap::new();
        args.insert(
            "throttle".to_owned(),
            MetaInputValue {
                name: "throttle".to_owned(),
                description: Some(
                    "At least this many milliseconds between two updates (0 to 60000); the last state wins."
                        .to_owned(),
                ),
                ty: "Int".to_owned(),
                deprecation: async_graphql::registry::Deprecation::NoDeprecated,
                default_value: None,
                visible: None,
                inaccessible: false,
                tags: Vec::new(),
                is_secret: false,
                directive_invocations: Vec::new(),
            },
        );
        registry.add_directive(MetaDirective {
            name: LIVE.to_owned(),
            description: Some(
                "Keeps the query's result current: on a streaming transport the first payload \
                 is `{data, revision: 1}`, then each committed change that alters the result \
                 sends `{patch, revision}` (RFC 6902). Answered once over plain HTTP."
                    .to_owned(),
            ),
            locations: vec![async_graphql::registry::__DirectiveLocation::QUERY],
            args,
            is_repeatable: false,
            visible: None,
            composable: None,
        });
    }

    fn create(
        &self,
        _ctx: &async_graphql::ContextDirective<'_>,
        _directive: &async_graphql::parser::types::Directive,
    ) -> ServerResult<Box<dyn CustomDirective>> {
        // Only reached for a field, where validation has already refused it.
        Err(ServerError::new("@live applies to a query operation", None))
    }
}

/// The operation `request` runs (by name, or the only one), once parsed.
fn operation<'a>(
    document: &'a ExecutableDocument,
    name: Option<&str>,
) -> Option<&'a Positioned<OperationDefinition>> {
    match name {
        Some(name) => document
            .operations
            .iter()
            .find(|(n, _)| n.is_some_and(|n| n == name))
            .map(|(_, op)| op),
        None => {
            let mut all = document.operations.iter();
            match (all.next(), all.next()) {
                (Some((_, only)), None) => Some(only),
                _ => None,
            }
        }
    }
}

/// Whether `request`'s operation is a live query, and how. `@live` on a mutation or a
/// subscription, or a `throttle` out of 0 to `MAX_THROTTLE_MS`, is BAD_USER_INPUT. Documents the parser or the
/// validator will refuse are left to them (`Ok(None)`).
pub(super) fn options(
    request: &mut async_graphql::Request,
) -> Result<Option<LiveOptions>, ServerError> {
    let name = request.operation_name.clone();
    let variables = std::mem::take(&mut request.variables);
    let found = live_in(request, name.as_deref(), &variables);
    request.variables = variables;
    found
}

/// `options` once the variables are out of the request (so that reading the document does
/// not have to copy them).
fn live_in(
    request: &mut async_graphql::Request,
    name: Option<&str>,
    variables: &async_graphql::Variables,
) -> Result<Option<LiveOptions>, ServerError> {
    let Ok(document) = request.parsed_query() else {
        return Ok(None);
    };
    let Some(operation) = operation(document, name) else {
        return Ok(None);
    };
    let Some(live) = operation
        .node
        .directives
        .iter()
        .find(|d| d.node.name.node == LIVE)
    else {
        return Ok(None);
    };
    if operation.node.ty != OperationType::Query {
        return Err(error::coded(
            code::BAD_USER_INPUT,
            "@live applies to queries only",
            Some(live.pos),
        ));
    }
    let mut throttle = Duration::ZERO;
    if let Some(value) = live.node.get_argument("throttle") {
        // A variable the request leaves out takes its definition's default.
        let default = |name: &async_graphql::Name| {
            operation
                .node
                .variable_definitions
                .iter()
                .find(|d| d.node.name.node == *name)
                .and_then(|d| d.node.default_value.as_ref())
                .map(|v| v.node.clone())
        };
        let value = value
            .node
            .clone()
            .into_const_with(|name| {
                variables
                    .get(&name)
                    .cloned()
                    .or_else(|| default(&name))
                    .ok_or(())
            })
            .unwrap_or(async_graphql::Value::Null);
        match value {
            async_graphql::Value::Null => {}
            async_graphql::Value::Number(n) => match n.as_i64() {
                Some(ms) if (0..=MAX_THROTTLE_MS).contains(&ms) => {
                    throttle = Duration::from_millis(ms as u64)
                }
                _ => {
                    return Err(error::coded(
                        code::BAD_USER_INPUT,
                        format!(
                            "@live(throttle:) is a number of milliseconds, 0 to {MAX_THROTTLE_MS}"
                        ),
                        Some(value_pos(live)),
                    ));
                }
            },
            // The validator refuses other types with its own message.
            _ => {}
        }
    }
    Ok(Some(LiveOptions { throttle }))
}

fn value_pos(live: &Positioned<async_graphql::parser::types::Directive>) -> async_graphql::Pos {
    live.node
        .arguments
        .first()
        .map_or(live.pos, |(_, value)| value.pos)
}

impl Api {
    /// Executes a live query's key once: as its viewer, on one snapshot of the database,
    /// recording what it read, with the feed position published before the snapshot began
    /// as the cursor it reflects. A request that cannot run, or a result over
    /// `--live-max-result-bytes`, ends the cohort.
    pub(super) async fn execute_live(&self, key: LiveKey) -> Outcome<Refusal> {
        let cursor = self.broker.published();
        let reader = match Reader::snapshot(&self.db).await {
            Ok(reader) => reader,
            Err(err) => {
                tracing::warn!(error = %err, "a live query could not open its read transaction; it runs again shortly");
                return Outcome::Retry(Arc::new(vec![error::coded(
                    code::INTERNAL_SERVER_ERROR,
                    "internal server error",
                    None,
                )]));
            }
        };
        let reads = Reads::recording();
        let reading = Reading {
            reader: reader.clone(),
            reads: reads.clone(),
        };
        let variables = serde_json::from_str(&key.variables).unwrap_or_default();
        let mut request = async_graphql::Request::new(key.query.as_ref())
            .variables(async_graphql::Variables::from_json(variables));
        request.operation_name = key.operation_name.as_deref().map(str::to_owned);
        self.documents.attach(&mut request);
        let request = request
            .data(FeedMark(cursor))
            .data(key.viewer())
            .data(loaders::loaders(reading.clone()))
            .data(reading);
        crate::pubsub::FeedStats::add(&self.broker.stats.live_executions, 1);
        let mut response = self.schema.execute(request).await;
        reader.finish().await;
        self.finish(&mut response);
        if error::is_request_error(&response) {
            return Outcome::Final(Arc::new(response.errors));
        }
        let internal = |err: &ServerError| {
            err.extensions
                .as_ref()
                .and_then(|e| e.get("code"))
                .is_some_and(|c| *c == async_graphql::Value::from(code::INTERNAL_SERVER_ERROR))
        };
        if response.errors.iter().any(internal) {
            // A failed read (the database) is not the result: keep the last one, try again
            // (the engine gives up after a few tries, ending with these errors).
            tracing::warn!("a live query's execution failed; it runs again shortly");
            return Outcome::Retry(Arc::new(response.errors));
        }
        if response.data == async_graphql::Value::Null {
            // Nothing to keep current (a non-null root failed, as for a viewer without a
            // token): the errors end it.
            return Outcome::Final(Arc::new(response.errors));
        }
        let data = serde_json::to_value(&response.data).unwrap_or_default();
        let size = serde_json::to_vec(&data).map_or(0, |bytes| bytes.len());
        if size > self.live_max_result_bytes {
            return Outcome::Final(Arc::new(vec![self.refuse(
                code::LIMIT_EXCEEDED,
                format!(
                    "the live query's result ({size} bytes) is over the limit of {} bytes; select less",
                    self.live_max_result_bytes
                ),
            )]));
        }
        let errors = (!response.errors.is_empty())
            .then(|| serde_json::to_string(&response.errors).ok())
            .flatten();
        Outcome::Result {
            data,
            errors,
            reads: reads.keys(),
            cursor,
        }
    }
}
