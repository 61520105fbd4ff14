//! Apollo automatic persisted queries: a client sends a query's SHA-256 instead of its text;
//! an unknown hash gets PERSISTED_QUERY_NOT_FOUND, the client then sends the text with its
//! hash, and later requests (GET ones too, so they can be cached) need the hash alone.
//!
//! Why not async-graphql's `ApolloPersistedQueries`: its refusal carries no
//! `extensions.code` (our contract names PERSISTED_QUERY_NOT_FOUND), and it empties the
//! request's query text, which a subscription's shape and GET's "no mutations" check read.
//! So this resolves the hash to the text before anything else looks at the request, and the
//! rest of the server sees an ordinary request.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use async_graphql::ServerError;
use sha2::{Digest, Sha256};

use super::error::{code, coded};

/// Most queries kept.
const MAX_QUERIES: usize = 4096;

/// Most bytes of query text kept (a query may be as large as a request body).
const MAX_BYTES: usize = 32 * 1024 * 1024;

/// The query texts registered by hash, least recently used first out.
pub struct PersistedQueries(Mutex<Cache>);

struct Cache {
    queries: lru::LruCache<String, Arc<str>>,
    bytes: usize,
}

impl Default for PersistedQueries {
    fn default() -> Self {
        Self(Mutex::new(Cache {
            queries: lru::LruCache::new(NonZeroUsize::MIN.saturating_add(MAX_QUERIES - 1)),
            bytes: 0,
        }))
    }
}

/// The `persistedQuery` extension of a request.
#[derive(serde::Deserialize)]
struct PersistedQuery {
    version: i64,
    #[serde(rename = "sha256Hash")]
    sha256_hash: String,
}

impl PersistedQueries {
    /// Resolves `request`'s `persistedQuery` extension, if it has one: the hash alone is
    /// replaced by the text registered under it (PERSISTED_QUERY_NOT_FOUND when there is
    /// none), and a text with its hash is registered (BAD_USER_INPUT when the hash is not
    /// the text's).
    pub fn resolve(&self, request: &mut async_graphql::Request) -> Result<(), ServerError> {
        let Some(extension) = request.extensions.remove("persistedQuery") else {
            return Ok(());
        };
        let persisted: PersistedQuery = extension
            .into_json()
            .ok()
            .and_then(|json| serde_json::from_value(json).ok())
            .ok_or_else(|| {
                coded(
                    code::BAD_USER_INPUT,
                    "the persistedQuery extension needs `version` and `sha256Hash`",
                    None,
                )
            })?;
        if persisted.version != 1 {
            return Err(coded(
                code::BAD_USER_INPUT,
                "only version 1 of the persistedQuery extension is supported",
                None,
            ));
        }
        let hash = persisted.sha256_hash.to_ascii_lowercase();
        if request.query.is_empty() {
            return match self.lock().queries.get(&hash) {
                Some(query) => {
                    request.query = query.to_string();
                    Ok(())
                }
                // Apollo's link recognises the message as well as the code.
                None => Err(coded(
                    code::PERSISTED_QUERY_NOT_FOUND,
                    "PersistedQueryNotFound",
                    None,
                )),
            };
        }
        if format!("{:x}", Sha256::digest(request.query.as_bytes())) != hash {
            return Err(coded(
                code::BAD_USER_INPUT,
                "provided sha does not match query",
                None,
            ));
        }
        self.lock().insert(hash, request.query.as_str().into());
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Cache {
    fn insert(&mut self, hash: String, query: Arc<str>) {
        self.bytes += query.len();
        if let Some((_, replaced)) = self.queries.push(hash, query) {
            self.bytes -= replaced.len();
        }
        while self.bytes > MAX_BYTES {
            match self.queries.pop_lru() {
                Some((_, dropped)) => self.bytes -= dropped.len(),
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(query: &str, hash: &str) -> async_graphql::Request {
        let mut request = async_graphql::Request::new(query);
        let extension = serde_json::json!({ "version": 1, "sha256Hash": hash });
        request.extensions.insert(
            "persistedQuery".into(),
            async_graphql::Value::from_json(extension).expect("JSON"),
        );
        request
    }

    fn code_of(err: &ServerError) -> Option<async_graphql::Value> {
        err.extensions.as_ref()?.get("code").cloned()
    }

    #[test]
    fn a_hash_is_unknown_until_its_text_registers_it() {
        let queries = PersistedQueries::default();
        let text = "{ me { id } }";
        let hash = format!("{:x}", Sha256::digest(text.as_bytes()));
        let err = queries
            .resolve(&mut request("", &hash))
            .expect_err("unknown");
        assert_eq!(code_of(&err), Some("PERSISTED_QUERY_NOT_FOUND".into()));
        assert_eq!(err.message, "PersistedQueryNotFound");
        let mut with_text = request(text, &hash);
        queries.resolve(&mut with_text).expect("registers");
        assert!(with_text.extensions.get("persistedQuery").is_none());
        let mut hash_only = request("", &hash.to_uppercase());
        queries.resolve(&mut hash_only).expect("known");
        assert_eq!(hash_only.query, text);
        let err = queries
            .resolve(&mut request("{ me { name } }", &hash))
            .expect_err("the hash is another text's");
        assert_eq!(code_of(&err), Some("BAD_USER_INPUT".into()));
        let mut plain = async_graphql::Request::new(text);
        queries
            .resolve(&mut plain)
            .expect("no extension, nothing to do");
    }

    #[test]
    fn the_cache_is_bounded_in_bytes() {
        let mut cache = Cache {
            queries: lru::LruCache::new(NonZeroUsize::MIN.saturating_add(10)),
            bytes: 0,
        };
        let big: Arc<str> = "x".repeat(MAX_BYTES / 2 + 1).into();
        cache.insert("a".into(), big.clone());
        cache.insert("b".into(), big.clone());
        assert_eq!(cache.queries.len(), 1, "the older one is dropped");
        assert_eq!(cache.bytes, big.len());
        cache.insert("b".into(), "small".into());
        assert_eq!(
            cache.bytes,
            "small".len(),
            "a replaced text no longer counts"
        );
    }
}
