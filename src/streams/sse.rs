//! graphql-sse (the `graphql-sse` package's protocol) at `/graphql/stream`, and on
//! `POST /graphql` for a client that accepts only `text/event-stream`.
//!
//! Distinct connections: one request per operation, its results as `next` events and a
//! `complete` event at its end. Single connection: the client reserves a stream (`PUT`), opens
//! it (`GET` with the token), and posts operations with an `operationId`; their events carry
//! `{id, payload}` (see `reservations`).
//!
//! Beyond the protocol: an event that carries a feed cursor has it as its SSE `id:`, and a
//! request with `Last-Event-ID` resumes after that cursor (in place of `after`), so a browser's
//! `EventSource`, which reconnects with the last id it saw, loses nothing and gets nothing
//! twice. A GET in distinct mode (`EventSource` makes only GETs) also gets an `id:` alone as
//! soon as its subscription follows its topic (a position it has considered everything up
//! to), so that a reconnect before its first event resumes too; the `graphql-sse` client
//! makes POSTs there, and some of its versions refuse an event without `event:`.
//!
//! What ends a stream: the operation's end (`complete`); the token's expiry (a `next` with
//! UNAUTHENTICATED, then `complete`); shutdown, which ends the response with no `complete`,
//! so that clients come back (the `graphql-sse` client retries, `EventSource` reconnects with
//! its last id).

use std::sync::Arc;

use axum::http::{HeaderMap, header};
use axum::response::Response;
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, watch};

use super::{Item, Started, StreamConfig};
use crate::auth::Viewer;
use crate::graphql::error::code;
use crate::graphql::subscription::ResumeAfter;
use crate::graphql::{Api, Reply};

/// The response's media type.
pub const CONTENT_TYPE: &str = "text/event-stream; charset=utf-8";

/// A comment line: the first bytes of every stream (so that its headers and a first chunk
/// reach the client at once), and the keep-alive.
pub(crate) const COMMENT: &[u8] = b":\n\n";

/// True when the client accepts an event stream.
pub fn accepted(headers: &HeaderMap) -> bool {
    super::header_entries(headers, header::ACCEPT).any(|media| {
        media
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .eq_ignore_ascii_case("text/event-stream")
    })
}

/// What a streaming request brings besides its operation.
pub(crate) struct Caller {
    /// From `Authorization`, or a GET's `access_token`.
    pub viewer: Viewer,
    /// When that token expires.
    pub expires_at: Option<tokio::time::Instant>,
    /// `Last-Event-ID`: resume after this cursor.
    pub last_event_id: Option<String>,
    /// Send the subscription's starting position as an `id:` alone (see the module's doc).
    pub mark_start: bool,
    pub gzip: bool,
}

/// One operation in distinct connections mode, holding `permit` (one of the open-connection
/// permits) while its stream lives.
pub(crate) async fn distinct(
    api: Api,
    mut request: async_graphql::Request,
    caller: Caller,
    config: &StreamConfig,
    shutdown: watch::Receiver<bool>,
    permit: OwnedSemaphorePermit,
) -> Response {
    if let Some(cursor) = caller.last_event_id {
        request = request.data(ResumeAfter(cursor));
    }
    let items = match super::start(&api, request, caller.viewer).await {
        // Sent as events too: the `graphql-sse` client takes a non-2xx answer for a network
        // error and retries it.
        Started::Refused(response) => refused(response),
        Started::Running { first, replies } => super::items(
            first,
            replies,
            Some(config.keep_alive),
            caller.expires_at,
            shutdown,
        )
        .boxed(),
    };
    stream(api, items, caller.mark_start, caller.gzip, permit)
}

/// The event stream of one operation's `items`, holding `permit` while it lives.
pub(crate) fn stream(
    api: Api,
    items: futures_util::stream::BoxStream<'static, Item>,
    mark_start: bool,
    gzip: bool,
    permit: OwnedSemaphorePermit,
) -> Response {
    let frames = async_stream::stream! {
        let _permit = permit;
        yield COMMENT.to_vec();
        let mut items = items;
        let mut end = false;
        while !end {
            let Some(item) = items.next().await else { break };
            let mut out = Vec::new();
            end = frame(&api, &mut out, None, item, mark_start);
            // What is ready already (a burst, a catch-up) goes out as one chunk.
            while !end && out.len() < super::BATCH_BYTES {
                let Some(Some(item)) = items.next().now_or_never() else { break };
                end = frame(&api, &mut out, None, item, mark_start);
            }
            if !out.is_empty() {
                yield out;
            }
        }
    };
    respond(frames, gzip)
}

/// The items of an operation that never ran: its response, then its end.
pub(crate) fn refused(
    response: Box<async_graphql::Response>,
) -> futures_util::stream::BoxStream<'static, Item> {
    futures_util::stream::iter([
        Item::Reply(Reply::Response(response)),
        Item::End { shutdown: false },
    ])
    .boxed()
}

/// A `text/event-stream` response of `frames`.
pub(crate) fn respond(
    frames: impl Stream<Item = Vec<u8>> + Send + 'static,
    gzip: bool,
) -> Response {
    super::respond(frames, CONTENT_TYPE, gzip)
}

/// Writes `item` as events into `out`: of the operation `id` in single connection mode
/// (`{id, payload}`), else of the stream's one operation. True when the operation is over.
pub(crate) fn frame(
    api: &Api,
    out: &mut Vec<u8>,
    id: Option<&Arc<str>>,
    item: Item,
    mark_start: bool,
) -> bool {
    match item {
        Item::Reply(Reply::Following { position }) => {
            if mark_start {
                out.extend_from_slice(b"id: ");
                out.extend_from_slice(Reply::cursor(position).as_bytes());
                out.extend_from_slice(b"\n\n");
            }
            false
        }
        // Event streams read their replies with `Target::Own`: never `Joined`.
        Item::Reply(Reply::Joined { .. }) => false,
        Item::Reply(Reply::Shared { json, position }) => {
            let cursor = position.map(Reply::cursor);
            next(out, id, cursor.as_deref(), json.as_bytes());
            false
        }
        Item::Reply(Reply::Response(response)) => {
            match serde_json::to_string(&response) {
                Ok(json) => next(out, id, None, json.as_bytes()),
                Err(err) => tracing::error!(error = %err, "cannot serialize a GraphQL response"),
            }
            false
        }
        Item::KeepAlive => {
            out.extend_from_slice(COMMENT);
            false
        }
        Item::Expired => {
            let error = api.refuse(
                code::UNAUTHENTICATED,
                "the token has expired; subscribe again with a fresh one",
            );
            let body = serde_json::json!({ "errors": [error] }).to_string();
            next(out, id, None, body.as_bytes());
            complete(out, id);
            true
        }
        Item::End { shutdown } => {
            // At shutdown the client is to come back: no `complete`.
            if !shutdown {
                complete(out, id);
            }
            true
        }
    }
}

/// A `next` event with `payload` (JSON text, which has no line break), and its cursor.
fn next(out: &mut Vec<u8>, id: Option<&Arc<str>>, cursor: Option<&str>, payload: &[u8]) {
    out.extend_from_slice(b"event: next\n");
    if let Some(cursor) = cursor {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(cursor.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(b"data: ");
    match id {
        Some(id) => {
            out.extend_from_slice(b"{\"id\":");
            out.extend_from_slice(quoted(id).as_bytes());
            out.extend_from_slice(b",\"payload\":");
            out.extend_from_slice(payload);
            out.push(b'}');
        }
        None => out.extend_from_slice(payload),
    }
    out.extend_from_slice(b"\n\n");
}

/// A `complete` event: no data in distinct connections mode, `{id}` in single.
fn complete(out: &mut Vec<u8>, id: Option<&Arc<str>>) {
    match id {
        Some(id) => {
            out.extend_from_slice(b"event: complete\ndata: {\"id\":");
            out.extend_from_slice(quoted(id).as_bytes());
            out.extend_from_slice(b"}\n\n");
        }
        None => out.extend_from_slice(b"event: complete\ndata:\n\n"),
    }
}

/// `text` as a JSON string.
fn quoted(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn events_are_framed_as_graphql_sse_writes_them() {
        let mut out = Vec::new();
        next(&mut out, None, Some("Y3Vy"), br#"{"data":{}}"#);
        complete(&mut out, None);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "event: next\nid: Y3Vy\ndata: {\"data\":{}}\n\nevent: complete\ndata:\n\n"
        );
        let id: Arc<str> = Arc::from("op \"1\"");
        let mut out = Vec::new();
        next(&mut out, Some(&id), None, br#"{"data":{}}"#);
        complete(&mut out, Some(&id));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "event: next\ndata: {\"id\":\"op \\\"1\\\"\",\"payload\":{\"data\":{}}}\n\n\
             event: complete\ndata: {\"id\":\"op \\\"1\\\"\"}\n\n"
        );
    }

    #[test]
    fn the_accept_header_is_read() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, text/event-stream;q=0.9"),
        );
        assert!(accepted(&headers));
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        assert!(!accepted(&headers));
    }
}
