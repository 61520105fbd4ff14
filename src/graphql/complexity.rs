//! Two gaps of async-graphql's complexity check (`--max-query-complexity`), closed before
//! anything runs:
//!
//! - It skips `__typename` (its validator never visits it), so `{ a0: __typename a1:
//!   __typename ... }` with thousands of aliases, or the same inside a page of 100 items, ran
//!   and was answered whatever the limit. Here every `__typename` a document would resolve is
//!   counted, multiplied by the pages around it as other fields are
//!   (`types::page_complexity`), and added to the complexity async-graphql computed.
//! - It, and the nesting check of async-graphql's parse step, expand every fragment spread
//!   where it stands, so a document of a few hundred bytes whose fragments each spread the
//!   next twice costs two to the power of its length to check (18 levels took 0.1 s, 20 a
//!   second, 30 would take a quarter of an hour). Here each fragment is counted once; a
//!   document that selects more fields than the limit once its fragments are expanded is
//!   refused before either runs (its complexity is at least that count, so the complexity
//!   check would refuse it too).
//!
//! Either way the answer is async-graphql's own "Query is too complex." (`BAD_USER_INPUT`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextPrepareRequest, NextValidation,
};
use async_graphql::parser::types::{
    ExecutableDocument, Field, OperationType, Selection, SelectionSet,
};
use async_graphql::registry::Registry;
use async_graphql::{Request, ServerError, ServerResult, ValidationResult, Value, Variables};

use super::types::page_items;

/// Installs the counts; `max` is `--max-query-complexity`.
pub struct FullComplexity {
    pub max: usize,
}

impl ExtensionFactory for FullComplexity {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(TypenameCount {
            max: self.max,
            typenames: AtomicUsize::new(0),
        })
    }
}

/// One request's count, taken before its document is parsed and checked after validation.
struct TypenameCount {
    max: usize,
    typenames: AtomicUsize,
}

#[async_trait::async_trait]
impl Extension for TypenameCount {
    /// Parses the document here, before async-graphql does: its parse step also checks the
    /// nesting depth by expanding every fragment spread where it stands, which is the
    /// exponential walk; a document refused here never reaches it. The parsed document stays
    /// in the request, so it is parsed once.
    async fn prepare_request(
        &self,
        ctx: &ExtensionContext<'_>,
        mut request: Request,
        next: NextPrepareRequest<'_>,
    ) -> ServerResult<Request> {
        // `parsed_query` keeps the document in the request (a subscription's start parsed it
        // already, in `shared::plan`); it borrows the request, hence the copy of the
        // variables.
        let variables = request.variables.clone();
        let document = request.parsed_query()?;
        // Nested too deep to count: async-graphql's parse step refuses it.
        if let Some(count) = count(&ctx.schema_env.registry, document, &variables) {
            if count.fields > self.max {
                return Err(too_complex());
            }
            self.typenames.store(count.typenames, Ordering::Relaxed);
        }
        next.run(ctx, request).await
    }

    async fn validation(
        &self,
        ctx: &ExtensionContext<'_>,
        next: NextValidation<'_>,
    ) -> Result<ValidationResult, Vec<ServerError>> {
        let result = next.run(ctx).await?;
        let total = result
            .complexity
            .saturating_add(self.typenames.load(Ordering::Relaxed));
        if total > self.max {
            return Err(vec![too_complex()]);
        }
        Ok(result)
    }
}

/// The same words as async-graphql's own refusal, so clients see one error.
fn too_complex() -> ServerError {
    ServerError::new("Query is too complex.", None)
}

/// What a document selects, over all its operations, fragments expanded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Count {
    /// Every field selected (aliases and `__typename` included), pages not multiplied.
    fields: usize,
    /// The `__typename` fields it resolves at most: a page's selections times its size.
    typenames: usize,
}

impl Count {
    fn add(self, other: Count) -> Count {
        Count {
            fields: self.fields.saturating_add(other.fields),
            typenames: self.typenames.saturating_add(other.typenames),
        }
    }
}

/// How deep the walk follows selections and fragment spreads. async-graphql's parse step
/// refuses documents nested deeper than 32 on its own (it stops at the first such path, so
/// that check is not the exponential one); the walk stops here so that a chain of thousands
/// of fragments cannot exhaust the stack.
const MAX_DEPTH: usize = 64;

/// Counts `document` as the complexity check would walk it: every operation, fragments
/// inlined. `None` when it nests deeper than `MAX_DEPTH` (async-graphql refuses it).
fn count(
    registry: &Registry,
    document: &ExecutableDocument,
    variables: &Variables,
) -> Option<Count> {
    let mut total = Count::default();
    for (_, operation) in document.operations.iter() {
        let root = match operation.node.ty {
            OperationType::Query => Some(registry.query_type.as_str()),
            OperationType::Mutation => registry.mutation_type.as_deref(),
            OperationType::Subscription => registry.subscription_type.as_deref(),
        };
        // A variable the request leaves out takes the default its operation declares, as
        // when the operation runs.
        let defaults = operation
            .node
            .variable_definitions
            .iter()
            .filter_map(|definition| {
                let default = definition.node.default_value.as_ref()?;
                Some((definition.node.name.node.as_str(), default.node.clone()))
            })
            .collect();
        // Fragment counts are per operation: a fragment may read the operation's variables.
        let mut walk = Walk {
            registry,
            document,
            variables,
            defaults,
            fragments: HashMap::new(),
            too_deep: false,
        };
        let count = walk.selections(&operation.node.selection_set.node, root, 0);
        if walk.too_deep {
            return None;
        }
        total = total.add(count);
    }
    Some(total)
}

struct Walk<'a> {
    registry: &'a Registry,
    document: &'a ExecutableDocument,
    variables: &'a Variables,
    /// The operation's declared variable defaults.
    defaults: HashMap<&'a str, Value>,
    /// Each fragment's count, once: a fragment's type is fixed by its condition, so its count
    /// does not depend on where it is spread (and a chain of fragments each spreading the next
    /// twice costs one visit per fragment, not two to the power of its length). `None` while
    /// it is being counted, so a cycle (which validation refuses) counts nothing.
    fragments: HashMap<&'a str, Option<Count>>,
    /// The walk went past `MAX_DEPTH` and stopped.
    too_deep: bool,
}

impl<'a> Walk<'a> {
    fn selections(
        &mut self,
        set: &'a SelectionSet,
        parent: Option<&'a str>,
        depth: usize,
    ) -> Count {
        if depth > MAX_DEPTH {
            self.too_deep = true;
            return Count::default();
        }
        set.items
            .iter()
            .map(|selection| match &selection.node {
                Selection::Field(field) => self.field(&field.node, parent, depth),
                Selection::InlineFragment(fragment) => {
                    let parent = match &fragment.node.type_condition {
                        Some(condition) => Some(condition.node.on.node.as_str()),
                        None => parent,
                    };
                    self.selections(&fragment.node.selection_set.node, parent, depth + 1)
                }
                Selection::FragmentSpread(spread) => {
                    self.fragment(spread.node.fragment_name.node.as_str(), depth)
                }
            })
            .fold(Count::default(), Count::add)
    }

    fn fragment(&mut self, name: &'a str, depth: usize) -> Count {
        if let Some(known) = self.fragments.get(name) {
            return known.unwrap_or_default();
        }
        let Some(fragment) = self.document.fragments.get(name) else {
            return Count::default();
        };
        self.fragments.insert(name, None);
        let parent = Some(fragment.node.type_condition.node.on.node.as_str());
        let count = self.selections(&fragment.node.selection_set.node, parent, depth + 1);
        self.fragments.insert(name, Some(count));
        count
    }

    fn field(&mut self, field: &'a Field, parent: Option<&'a str>, depth: usize) -> Count {
        let name = field.name.node.as_str();
        if name == "__typename" {
            return Count {
                fields: 1,
                typenames: 1,
            };
        }
        // An unknown type or field has no selections here; validation refuses it.
        let meta = parent
            .and_then(|parent| self.registry.types.get(parent))
            .and_then(|parent| parent.field_by_name(name));
        let child = meta
            .and_then(|meta| self.registry.concrete_type_by_name(&meta.ty))
            .map(|ty| ty.name());
        let inner = self.selections(&field.selection_set.node, child, depth + 1);
        // The fields with a complexity of their own are the pages (`page_complexity`).
        let typenames = if meta.is_some_and(|meta| meta.compute_complexity.is_some()) {
            page_items(self.size(field)).saturating_mul(inner.typenames)
        } else {
            inner.typenames
        };
        Count {
            fields: inner.fields.saturating_add(1),
            typenames,
        }
    }

    /// A page's `first` (or else `last`) as an integer, from the document, its variables or
    /// their declared defaults.
    fn size(&self, field: &Field) -> Option<i32> {
        ["first", "last"].into_iter().find_map(|argument| {
            let value = field.get_argument(argument)?;
            let value = value
                .node
                .clone()
                .into_const_with(|name| {
                    self.variables
                        .get(&name)
                        .or_else(|| self.defaults.get(name.as_str()))
                        .cloned()
                        .ok_or(())
                })
                .ok()?;
            match value {
                Value::Number(number) => number
                    .as_i64()
                    .map(|n| n.clamp(i32::MIN.into(), i32::MAX.into()) as i32),
                _ => None,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schema's types, as `Schema::build` registers them.
    fn registry() -> Registry {
        use async_graphql::OutputType;
        let mut registry = Registry {
            query_type: "QueryRoot".into(),
            mutation_type: Some("MutationRoot".into()),
            subscription_type: Some("SubscriptionRoot".into()),
            ..Registry::default()
        };
        crate::graphql::QueryRoot::create_type_info(&mut registry);
        crate::graphql::MutationRoot::create_type_info(&mut registry);
        <crate::graphql::SubscriptionRoot as async_graphql::SubscriptionType>::create_type_info(
            &mut registry,
        );
        registry
    }

    fn count_of(query: &str, variables: serde_json::Value) -> Count {
        let document = async_graphql::parser::parse_query(query).expect("parses");
        let variables = Variables::from_json(variables);
        count(&registry(), &document, &variables).expect("within the depth")
    }

    fn typenames(query: &str, variables: serde_json::Value) -> usize {
        count_of(query, variables).typenames
    }

    #[test]
    fn every_typename_counts_and_pages_multiply() {
        assert_eq!(typenames("{ __typename }", serde_json::json!({})), 1);
        let aliases: String = (0..500).map(|i| format!("a{i}: __typename ")).collect();
        assert_eq!(
            typenames(&format!("{{ {aliases} }}"), serde_json::json!({})),
            500
        );
        // A page of channels with no size holds up to the default 20; `first` sets it.
        assert_eq!(
            typenames(
                "{ channels { edges { node { __typename } } } }",
                serde_json::json!({})
            ),
            20
        );
        assert_eq!(
            typenames(
                "query($n: Int) { channels(first: $n) { edges { node { a: __typename b: __typename } } } }",
                serde_json::json!({ "n": 50 })
            ),
            100
        );
        // Nested pages multiply, through fragments too.
        assert_eq!(
            typenames(
                "{ channels(first: 10) { edges { node { ...M } } } } fragment M on Channel { messages(last: 30) { edges { node { __typename } } } }",
                serde_json::json!({})
            ),
            300
        );
    }

    #[test]
    fn every_field_counts_once_per_place_it_is_selected() {
        assert_eq!(
            count_of("{ me { id name } a: me { id } }", serde_json::json!({})),
            Count {
                fields: 5,
                typenames: 0
            }
        );
        // Spread twice, a fragment's fields count twice (they are selected twice).
        assert_eq!(
            count_of(
                "{ ...F ...F } fragment F on QueryRoot { me { id } __typename }",
                serde_json::json!({})
            )
            .fields,
            6
        );
    }

    #[test]
    fn a_variables_declared_default_sizes_its_page() {
        let query =
            "query($n: Int = 100) { channels(first: $n) { edges { node { __typename } } } }";
        assert_eq!(typenames(query, serde_json::json!({})), 100);
        assert_eq!(typenames(query, serde_json::json!({ "n": 5 })), 5);
    }

    #[test]
    fn a_chain_of_thousands_of_fragments_stops_the_walk_instead_of_the_stack() {
        let mut query = String::from("{ ...F0 }");
        for i in 0..20_000 {
            query.push_str(&format!(" fragment F{i} on QueryRoot {{ ...F{} }}", i + 1));
        }
        query.push_str(" fragment F20000 on QueryRoot { __typename }");
        let document = async_graphql::parser::parse_query(&query).expect("parses");
        assert_eq!(count(&registry(), &document, &Variables::default()), None);
    }

    #[test]
    fn fragments_are_counted_once_each_and_cycles_end() {
        // Each fragment spreads the next twice: 2^30 if expanded as it stands; counted in
        // one visit per fragment.
        let mut query = String::from("{ ...F0 }");
        for i in 0..30 {
            query.push_str(&format!(
                " fragment F{i} on QueryRoot {{ ...F{} ...F{} }}",
                i + 1,
                i + 1
            ));
        }
        query.push_str(" fragment F30 on QueryRoot { __typename }");
        assert_eq!(
            count_of(&query, serde_json::json!({})),
            Count {
                fields: 1 << 30,
                typenames: 1 << 30
            }
        );
        assert_eq!(
            typenames(
                "{ ...A } fragment A on QueryRoot { __typename ...A }",
                serde_json::json!({})
            ),
            1
        );
    }
}
