//! A bounded cache of parsed documents, by query text.
//!
//! async-graphql parses a request's text on every execution (a pest grammar: for the
//! small `postMessage` mutation, the parse was ~9 % of the server's CPU, see BENCHMARKS.md). Clients send the same few documents over and over, so each text is
//! parsed once and its document cloned for every later request (async-graphql takes it
//! by value and edits it: `@skip`/`@include` are removed per request). The same goes for
//! a subscription's renders, which run its document once per (shape, event).
//!
//! Validation is not cached: async-graphql's validation reads the request's variable values
//! (argument types and complexity depend on them), so its outcome belongs to one request,
//! not to a text. A text that does not parse is not cached either: async-graphql parses it
//! again and reports the error as it always has.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use async_graphql::parser::types::ExecutableDocument;

/// Most documents kept.
const MAX_DOCUMENTS: usize = 1024;

/// Longest text cached; longer ones are parsed every time (rare, and what a flood of
/// distinct large documents would fill the cache with).
const MAX_TEXT_BYTES: usize = 8 * 1024;

/// Most text kept, all documents together. A parsed document takes up to ~100 times its
/// text (`{ a a a ... }`: each two-byte field is a ~200-byte node), so this bounds the
/// cache near 50 MiB whatever clients send.
const MAX_TOTAL_TEXT_BYTES: usize = 512 * 1024;

/// Parsed documents by text, least recently used first out. At most `MAX_DOCUMENTS` texts
/// of at most `MAX_TEXT_BYTES` each, `MAX_TOTAL_TEXT_BYTES` in all.
pub struct ParsedDocuments(Mutex<Cache>);

struct Cache {
    documents: lru::LruCache<Arc<str>, Arc<ExecutableDocument>>,
    text_bytes: usize,
}

impl Default for ParsedDocuments {
    fn default() -> Self {
        Self(Mutex::new(Cache {
            documents: lru::LruCache::new(NonZeroUsize::MIN.saturating_add(MAX_DOCUMENTS - 1)),
            text_bytes: 0,
        }))
    }
}

impl Cache {
    fn insert(&mut self, query: &str, document: Arc<ExecutableDocument>) {
        self.text_bytes += query.len();
        if let Some((replaced, _)) = self.documents.push(Arc::from(query), document) {
            self.text_bytes -= replaced.len();
        }
        while self.text_bytes > MAX_TOTAL_TEXT_BYTES {
            match self.documents.pop_lru() {
                Some((dropped, _)) => self.text_bytes -= dropped.len(),
                None => break,
            }
        }
    }
}

impl ParsedDocuments {
    /// Gives `request` its parsed document from the cache, parsing and keeping it on a
    /// miss. Leaves the request as it was when the text does not parse, or is too long to
    /// keep (async-graphql parses it then).
    pub fn attach(&self, request: &mut async_graphql::Request) {
        if let Some(document) = self.get(&request.query) {
            request.set_parsed_query(document);
        }
    }

    /// The document of `query`: a copy of the cached one, or a fresh parse kept for next
    /// time. `None` when it does not parse or is too long to keep.
    fn get(&self, query: &str) -> Option<ExecutableDocument> {
        if query.len() > MAX_TEXT_BYTES {
            return None;
        }
        // Cloned outside the lock: the lock is held for the lookup only.
        let cached = self.lock().documents.get(query).cloned();
        if let Some(document) = cached {
            return Some(ExecutableDocument::clone(&document));
        }
        let document = async_graphql::parser::parse_query(query).ok()?;
        self.lock().insert(query, Arc::new(document.clone()));
        Some(document)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().documents.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_is_parsed_once_and_its_document_reused() {
        let cache = ParsedDocuments::default();
        let query = "query Q($n: Int) { a b(n: $n) @skip(if: true) }";
        let first = cache.get(query).expect("parses");
        let second = cache.get(query).expect("cached");
        assert_eq!(cache.len(), 1);
        assert_eq!(format!("{first:?}"), format!("{second:?}"));
        assert_eq!(
            format!("{second:?}"),
            format!(
                "{:?}",
                async_graphql::parser::parse_query(query).expect("parses")
            )
        );
    }

    #[test]
    fn what_does_not_parse_or_is_too_long_is_not_kept() {
        let cache = ParsedDocuments::default();
        assert!(cache.get("{ a ").is_none());
        let long = format!("{{ {} }}", "a ".repeat(MAX_TEXT_BYTES));
        assert!(cache.get(&long).is_none());
        assert_eq!(cache.len(), 0);
        let mut request = async_graphql::Request::new("{ a ");
        cache.attach(&mut request);
        // Left for async-graphql to parse (and report) itself.
        assert!(request.parsed_query().is_err());
    }

    #[test]
    fn the_cache_is_bounded() {
        let cache = ParsedDocuments::default();
        for i in 0..MAX_DOCUMENTS + 10 {
            assert!(cache.get(&format!("{{ a{i} }}")).is_some());
        }
        assert_eq!(cache.len(), MAX_DOCUMENTS);
        // The oldest went first.
        assert!(!cache.lock().documents.contains("{ a0 }"));
        assert!(
            cache
                .lock()
                .documents
                .contains(&*format!("{{ a{} }}", MAX_DOCUMENTS + 9))
        );
    }

    #[test]
    fn the_cache_is_bounded_in_text_too() {
        let cache = ParsedDocuments::default();
        let large = |i: usize| format!("{{ a{i} {} }}", "b ".repeat(MAX_TEXT_BYTES / 2 - 16));
        for i in 0..200 {
            assert!(cache.get(&large(i)).is_some());
        }
        let kept = cache.lock().text_bytes;
        assert!(kept <= MAX_TOTAL_TEXT_BYTES, "{kept}");
        assert!(cache.len() < 200 && cache.len() >= MAX_TOTAL_TEXT_BYTES / MAX_TEXT_BYTES);
        assert!(cache.lock().documents.contains(&*large(199)));
    }
}
