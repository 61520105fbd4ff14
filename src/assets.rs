//! The browser pages and their assets, embedded in the binary from `assets/` so that
//! GraphiQL and the demo work with no network access: GraphiQL, React and graphql-ws are
//! vendored at pinned versions (`assets/vendor/README.md` says where each file comes from).
//!
//! Vendored files live under a versioned path and are cached for good; our own pages and
//! scripts are revalidated with an ETag on every load.

use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rust_embed::RustEmbed;

#[derive(RustEmbed)]
#[folder = "assets/"]
struct Assets;

/// GraphiQL's page.
pub const GRAPHIQL_PAGE: &str = "graphiql/index.html";
/// The demo's page.
pub const DEMO_PAGE: &str = "demo/index.html";

/// `GET /assets/{*path}`.
pub async fn asset(Path(path): Path<String>, headers: HeaderMap) -> Response {
    serve(&path, &headers)
}

/// One embedded file, or 404. Answers 304 when the client's `If-None-Match` is current.
pub fn serve(path: &str, headers: &HeaderMap) -> Response {
    let Some(file) = Assets::get(path) else {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    };
    let etag = format!("\"{}\"", hex(&file.metadata.sha256_hash()));
    let cache_control = if path.starts_with("vendor/") {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let fresh = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|tag| tag.trim() == etag);
    let etag = HeaderValue::from_str(&etag).unwrap_or_else(|_| HeaderValue::from_static("\"\""));
    let cache_control = HeaderValue::from_static(cache_control);
    if fresh {
        return (
            StatusCode::NOT_MODIFIED,
            [(header::ETAG, etag), (header::CACHE_CONTROL, cache_control)],
        )
            .into_response();
    }
    // An ES module file (`.mjs`) is JavaScript like `.js` (RFC 9239's type for both);
    // the guess from its extension says application/javascript.
    let mimetype = if path.ends_with(".mjs") {
        "text/javascript"
    } else {
        file.metadata.mimetype()
    };
    let content_type = HeaderValue::from_str(mimetype)
        .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::ETAG, etag),
            (header::CACHE_CONTROL, cache_control),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        file.data,
    )
        .into_response()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_and_its_scripts_are_embedded() {
        for path in [
            GRAPHIQL_PAGE,
            DEMO_PAGE,
            "graphiql/graphiql.js",
            "vendor/graphiql-3.9.0/graphiql.min.js",
            "vendor/graphql-ws-6.4.2/client.js",
            "vendor/yjs-editor-13.6.33-2b2ebeef/yjs-editor.mjs",
        ] {
            assert!(Assets::get(path).is_some(), "{path} is not embedded");
        }
    }

    #[test]
    fn scripts_are_served_as_javascript() {
        let file = Assets::get("graphiql/graphiql.js").expect("embedded");
        assert_eq!(file.metadata.mimetype(), "text/javascript");
    }
}
