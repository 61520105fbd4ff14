//! Introspection switched off (`--introspection false`) is refused with a code.
//!
//! async-graphql's own `disable_introspection` answers `{"__schema": null}` with no error,
//! which a client cannot tell from a broken server. This extension looks at the parsed
//! document first and refuses any operation that selects `__schema` or `__type` on the root
//! (directly, or through fragments) with `FORBIDDEN`; nothing runs. `__typename` stays
//! allowed: Apollo Client adds it everywhere.

use std::collections::HashSet;
use std::sync::Arc;

use async_graphql::extensions::{Extension, ExtensionContext, ExtensionFactory, NextParseQuery};
use async_graphql::parser::types::{ExecutableDocument, Selection, SelectionSet};
use async_graphql::{Pos, ServerResult, Variables};

use super::error::{self, code};

/// Refuses introspection; installed only when introspection is switched off.
pub struct RefuseIntrospection;

impl ExtensionFactory for RefuseIntrospection {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(RefuseIntrospection)
    }
}

#[async_trait::async_trait]
impl Extension for RefuseIntrospection {
    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        let document = next.run(ctx, query, variables).await?;
        match introspection_at(&document) {
            Some(pos) => Err(error::coded(
                code::FORBIDDEN,
                "introspection is switched off on this server",
                Some(pos),
            )),
            None => Ok(document),
        }
    }
}

/// Where the first `__schema` or `__type` field on an operation's root is, if any.
fn introspection_at(document: &ExecutableDocument) -> Option<Pos> {
    document.operations.iter().find_map(|(_, operation)| {
        let mut seen = HashSet::new();
        root_introspection(document, &operation.node.selection_set.node, &mut seen)
    })
}

fn root_introspection<'a>(
    document: &'a ExecutableDocument,
    set: &'a SelectionSet,
    seen: &mut HashSet<&'a str>,
) -> Option<Pos> {
    set.items
        .iter()
        .find_map(|selection| match &selection.node {
            Selection::Field(field) => {
                matches!(field.node.name.node.as_str(), "__schema" | "__type").then_some(field.pos)
            }
            Selection::InlineFragment(fragment) => {
                root_introspection(document, &fragment.node.selection_set.node, seen)
            }
            Selection::FragmentSpread(spread) => {
                let name = spread.node.fragment_name.node.as_str();
                // A fragment is looked into once; cycles are the validator's to refuse.
                if !seen.insert(name) {
                    return None;
                }
                let fragment = document.fragments.get(name)?;
                root_introspection(document, &fragment.node.selection_set.node, seen)
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(query: &str) -> bool {
        let document = async_graphql::parser::parse_query(query).expect("parses");
        introspection_at(&document).is_some()
    }

    #[test]
    fn finds_introspection_directly_in_fragments_and_in_any_operation() {
        assert!(refused("{ __schema { types { name } } }"));
        assert!(refused("{ me { id } t: __type(name: \"User\") { name } }"));
        assert!(refused(
            "{ ... on Query { __schema { queryType { name } } } }"
        ));
        assert!(refused(
            "query A { me { id } } query B { ...F } fragment F on Query { ...G } fragment G on Query { __type(name: \"X\") { name } }"
        ));
        assert!(!refused("{ __typename me { __typename id } }"));
        assert!(!refused("query { ...F } fragment F on Query { ...F }"));
        // Only the root has the introspection fields; a nested one is an unknown field,
        // which validation refuses on its own.
        assert!(!refused("{ me { id } }"));
    }
}
