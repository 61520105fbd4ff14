//! Subscription events rendered once per shape, shared by every subscription of that shape.
//!
//! A subscription's response to an event depends on the event, the document, the operation
//! name and the variables its selection reads below the root field, and on nothing about the
//! viewer beyond being a member of the channel: every subscriber is one, or its subscription
//! has already ended with FORBIDDEN. The event types (`MessageEvent`, `DocumentEvent` and
//! everything they reach) have no field that depends on who asks, and renders run with no
//! viewer at all, so a field that ever did would fail as UNAUTHENTICATED rather than leak.
//!
//! So a subscription, once its start-up checks pass, is handed over from async-graphql's
//! per-subscriber stream (`Handover`) to the `Api`, which follows the topic itself and, for
//! each event, takes the rendered payload from the event's memo under its `Shape`. The first
//! subscriber of a shape to reach an event runs the document once on it (`RenderOne`); every
//! other one reuses that text. Fanning one change out to 10,000 subscribers of one shape is
//! then one GraphQL execution and one serialization, not 10,000.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use async_graphql::parser::types::{
    Directive, ExecutableDocument, OperationType, Selection, SelectionSet,
};
use async_graphql::{Name, Pos, Positioned, ServerError, Variables};
use async_graphql_value::Value;

use futures_util::future::BoxFuture;

use super::error::{self, AppError, code};
use super::{Api, ApiParts};
use crate::live::cohorts::{Render, Rendered};
use crate::live::{Follower, LiveError};
use crate::pubsub::ChangeEvent;

/// How deep fragments may nest before the walk gives up on a document (it is then refused by
/// the validator's own limits, or rendered per subscriber).
const MAX_DEPTH: usize = 64;

/// The next shape's id.
static NEXT_SHAPE_ID: AtomicU64 = AtomicU64::new(0);

/// What a subscription renders events with: the request minus what only picks the events.
pub(crate) struct Shape {
    /// Distinguishes shapes in an event's memo; never reused.
    pub id: u64,
    pub query: String,
    pub operation_name: Option<String>,
    /// The variables of the first subscription of this shape. Those only in the root
    /// field's arguments (`channelId`, `after`) may differ among its subscriptions: they
    /// choose the events, not how they look, and render mode does not read them (they are
    /// still sent, because async-graphql checks the arguments of every field it runs).
    pub variables: Variables,
    /// Renders with this `Api` (weak: the shapes are the `Api`'s own).
    api: Weak<ApiParts>,
}

impl Render for Shape {
    /// The rendering in the event's memo, made by the first to ask (a driver, or a
    /// follower catching up) and shared by the rest. One with an internal error is
    /// delivered but not kept, so the next one to ask tries again.
    fn render(self: Arc<Self>, event: Arc<ChangeEvent>) -> BoxFuture<'static, Arc<Rendered>> {
        Box::pin(async move {
            let key = self.id as i64;
            if let Some(rendered) = event.memo.get("render", key) {
                return rendered;
            }
            let Some(api) = self.api.upgrade().map(Api) else {
                return Arc::default();
            };
            let one = RenderOne::Event(event.clone());
            event
                .memo
                .get_or_try_init("render", key, || api.render(&self, one))
                .await
                .unwrap_or_else(Arc::new)
        })
    }

    fn render_error(self: Arc<Self>, error: LiveError) -> BoxFuture<'static, Arc<Rendered>> {
        Box::pin(async move {
            let Some(api) = self.api.upgrade().map(Api) else {
                return Arc::default();
            };
            let rendered = api.render(&self, RenderOne::Error(error.into())).await;
            Arc::new(rendered.unwrap_or_else(|rendered| rendered))
        })
    }
}

/// The live shapes, so that subscriptions of one shape share one `Shape` (and its renders).
#[derive(Default)]
pub(crate) struct Shapes {
    by_key: Mutex<HashMap<String, Weak<Shape>>>,
    /// Entries in the map after the last sweep of dead ones.
    swept_at: AtomicU64,
}

impl Shapes {
    /// The shape of these parts, shared with any live subscription of the same.
    pub fn intern(&self, parts: ShapeParts, api: Weak<ApiParts>) -> Arc<Shape> {
        let key =
            serde_json::json!([parts.query, parts.operation_name, parts.key_variables]).to_string();
        let mut by_key = self.by_key.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(shape) = by_key.get(&key).and_then(Weak::upgrade) {
            return shape;
        }
        // Dead entries are swept when the map has doubled since the last sweep, so it stays
        // within twice the live shapes at amortised O(1) per intern.
        if by_key.len() as u64 >= 2 * self.swept_at.load(Ordering::Relaxed).max(32) {
            by_key.retain(|_, shape| shape.strong_count() > 0);
            self.swept_at.store(by_key.len() as u64, Ordering::Relaxed);
        }
        let shape = Arc::new(Shape {
            // Process-wide: memos live on events, which any `Api` of the broker may reach.
            id: NEXT_SHAPE_ID.fetch_add(1, Ordering::Relaxed),
            query: parts.query,
            operation_name: parts.operation_name,
            variables: parts.variables,
            api,
        });
        by_key.insert(key, Arc::downgrade(&shape));
        shape
    }

    /// How many shapes are in the map (live or not yet swept).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_key.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// A subscription request's shape, before it is interned.
pub(crate) struct ShapeParts {
    query: String,
    operation_name: Option<String>,
    variables: Variables,
    /// The variables read below the root field: those that tell shapes apart.
    key_variables: Variables,
}

/// For a subscription operation: checks that it selects exactly one root field (GraphQL's
/// "single root field" rule, which async-graphql does not enforce; each root field would
/// hand over a stream of its own), and returns its shape. `Ok(None)` for queries, mutations
/// and documents the parser or the validator will refuse with their own errors.
pub(crate) fn plan(
    request: &mut async_graphql::Request,
) -> Result<Option<ShapeParts>, ServerError> {
    let operation_name = request.operation_name.clone();
    let query = request.query.clone();
    let variables = request.variables.clone();
    // Parsed once here and kept in the request: async-graphql does not parse it again.
    let Ok(document) = request.parsed_query() else {
        return Ok(None);
    };
    let operation = match &operation_name {
        Some(name) => document
            .operations
            .iter()
            .find(|(n, _)| n.is_some_and(|n| n == name.as_str())),
        None => {
            let mut all = document.operations.iter();
            match (all.next(), all.next()) {
                (Some(only), None) => Some(only),
                _ => None,
            }
        }
    };
    let Some((_, operation)) = operation else {
        return Ok(None);
    };
    if operation.node.ty != OperationType::Subscription {
        return Ok(None);
    }
    let mut walk = Walk {
        document,
        read: HashSet::new(),
        roots: Vec::new(),
        seen: HashSet::new(),
        too_deep: false,
    };
    walk.directives(&operation.node.directives);
    walk.selection_set(&operation.node.selection_set.node, true, 0);
    if walk.roots.len() != 1 {
        let pos = walk.roots.get(1).copied().unwrap_or(operation.pos);
        return Err(error::coded(
            code::BAD_USER_INPUT,
            "a subscription selects exactly one root field",
            Some(pos),
        ));
    }
    let mut key_variables = Variables::default();
    for (name, value) in variables.iter() {
        if walk.too_deep || walk.read.contains(name.as_str()) {
            key_variables.insert(name.clone(), value.clone());
        }
    }
    Ok(Some(ShapeParts {
        query,
        operation_name,
        variables,
        key_variables,
    }))
}

/// Collects the root fields of an operation and the variables read anywhere but in the
/// root fields' arguments.
struct Walk<'a> {
    document: &'a ExecutableDocument,
    read: HashSet<&'a str>,
    roots: Vec<Pos>,
    /// Fragments already walked, with whether at the root.
    seen: HashSet<(&'a str, bool)>,
    /// The walk stopped early: every variable is then kept.
    too_deep: bool,
}

impl<'a> Walk<'a> {
    fn selection_set(&mut self, set: &'a SelectionSet, root: bool, depth: usize) {
        if depth > MAX_DEPTH {
            self.too_deep = true;
            return;
        }
        for selection in &set.items {
            match &selection.node {
                Selection::Field(field) => {
                    if root {
                        self.roots.push(field.pos);
                    } else {
                        self.arguments(&field.node.arguments);
                    }
                    self.directives(&field.node.directives);
                    self.selection_set(&field.node.selection_set.node, false, depth + 1);
                }
                Selection::InlineFragment(fragment) => {
                    self.directives(&fragment.node.directives);
                    self.selection_set(&fragment.node.selection_set.node, root, depth + 1);
                }
                Selection::FragmentSpread(spread) => {
                    self.directives(&spread.node.directives);
                    let name = spread.node.fragment_name.node.as_str();
                    // Each fragment is walked once per position; cycles are the validator's.
                    if !self.seen.insert((name, root)) {
                        continue;
                    }
                    if let Some(fragment) = self.document.fragments.get(name) {
                        self.directives(&fragment.node.directives);
                        self.selection_set(&fragment.node.selection_set.node, root, depth + 1);
                    }
                }
            }
        }
    }

    fn directives(&mut self, directives: &'a [Positioned<Directive>]) {
        for directive in directives {
            self.arguments(&directive.node.arguments);
        }
    }

    fn arguments(&mut self, arguments: &'a [(Positioned<Name>, Positioned<Value>)]) {
        for (_, value) in arguments {
            self.value(&value.node);
        }
    }

    fn value(&mut self, value: &'a Value) {
        match value {
            Value::Variable(name) => {
                self.read.insert(name.as_str());
            }
            Value::List(items) => items.iter().for_each(|item| self.value(item)),
            Value::Object(fields) => fields.values().for_each(|field| self.value(field)),
            _ => {}
        }
    }
}

/// Request data that puts the subscription resolvers in render mode: they yield this one
/// event (or this error) as their item and end, with no checks and no database work of their
/// own (the start-up checks ran when the subscription started).
pub(crate) enum RenderOne {
    Event(Arc<ChangeEvent>),
    Error(AppError),
}

/// Request data through which a subscription resolver hands its checked `Follower` to the
/// `Api` instead of streaming through async-graphql, with the subscription's shape.
#[derive(Default)]
pub(crate) struct Handover(Mutex<HandedOver>);

#[derive(Default)]
struct HandedOver {
    follower: Option<Follower>,
    shape: Option<ShapeParts>,
}

impl Handover {
    fn lock(&self) -> std::sync::MutexGuard<'_, HandedOver> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `follower`; false when one was handed over already (two root fields, which
    /// `plan` refuses first).
    pub fn put(&self, follower: Follower) -> bool {
        let mut slot = self.lock();
        if slot.follower.is_some() {
            return false;
        }
        slot.follower = Some(follower);
        true
    }

    /// Keeps the subscription's shape (from `plan`) for the live phase.
    pub fn set_shape(&self, shape: Option<ShapeParts>) {
        self.lock().shape = shape;
    }

    /// The follower handed over and the subscription's shape, if both are there.
    pub fn take(&self) -> Option<(Follower, ShapeParts)> {
        let mut slot = self.lock();
        match (slot.follower.take(), slot.shape.take()) {
            (Some(follower), Some(shape)) => Some((follower, shape)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape_of(
        query: &str,
        variables: serde_json::Value,
    ) -> Result<Option<ShapeParts>, ServerError> {
        let mut request =
            async_graphql::Request::new(query).variables(Variables::from_json(variables));
        plan(&mut request)
    }

    fn kept(parts: &ShapeParts) -> Vec<String> {
        parts
            .key_variables
            .keys()
            .map(|name| name.to_string())
            .collect()
    }

    #[test]
    fn only_variables_read_below_the_root_field_are_part_of_the_shape() {
        let parts = shape_of(
            "subscription S($c: ID!, $a: String, $x: Boolean!) {
               messageEvents(channelId: $c, after: $a) {
                 cursor ...M
               }
             }
             fragment M on MessageEvent { message @include(if: $x) { id } }",
            serde_json::json!({ "c": "1", "a": "abc", "x": true }),
        )
        .unwrap()
        .unwrap();
        assert_eq!(kept(&parts), ["x"]);
    }

    #[test]
    fn subscriptions_select_exactly_one_root_field() {
        let err = shape_of(
            "subscription { a: messageEvents(channelId: 1) { cursor } ...F }
             fragment F on SubscriptionRoot { documentEvents(documentId: 1) { cursor } }",
            serde_json::json!({}),
        )
        .err()
        .unwrap();
        assert!(err.message.contains("exactly one root field"));
        assert!(
            shape_of("subscription { __typename }", serde_json::json!({}))
                .unwrap()
                .is_some()
        );
        // Not subscriptions, or not for this check to refuse.
        assert!(
            shape_of("{ me { id } feedCursor }", serde_json::json!({}))
                .unwrap()
                .is_none()
        );
        assert!(
            shape_of("subscription {", serde_json::json!({}))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn equal_parts_share_one_shape_until_it_is_dropped() {
        let shapes = Shapes::default();
        let query =
            "subscription($a: String) { messageEvents(channelId: 1, after: $a) { cursor } }";
        let parts = |after: &str| {
            shape_of(query, serde_json::json!({ "a": after }))
                .unwrap()
                .unwrap()
        };
        let first = shapes.intern(parts("x"), Weak::new());
        // `after` only picks events: another value is the same shape.
        let second = shapes.intern(parts("y"), Weak::new());
        assert!(Arc::ptr_eq(&first, &second));
        let other = "subscription($a: String) { messageEvents(channelId: 1, after: $a) { kind } }";
        let third = shapes.intern(
            shape_of(other, serde_json::json!({ "a": "x" }))
                .unwrap()
                .unwrap(),
            Weak::new(),
        );
        assert!(!Arc::ptr_eq(&first, &third));
        let id = first.id;
        drop((first, second));
        assert_ne!(shapes.intern(parts("x"), Weak::new()).id, id);
        // Dead shapes are swept as new ones come.
        for n in 0..1000 {
            let query = format!("subscription {{ messageEvents(channelId: {n}) {{ cursor }} }}");
            drop(shapes.intern(
                shape_of(&query, serde_json::json!({})).unwrap().unwrap(),
                Weak::new(),
            ));
        }
        assert!(shapes.len() <= 64, "{} shapes kept", shapes.len());
    }
}
