//! Apollo's multipart subscriptions (`POST /graphql` accepting
//! `multipart/mixed;subscriptionSpec="1.0"`), as Apollo Client's `HttpLink` and Apollo
//! Kotlin/iOS read them: `multipart/mixed;boundary="graphql";subscriptionSpec="1.0"`, each part
//! `Content-Type: application/json` holding `{"payload": <execution result>}`, a `{}` part as
//! a heartbeat, `{"payload": null, "errors": [...]}` for a fatal transport error (an expired
//! token), and the closing `--graphql--` at the end. Lines end with CRLF.

use axum::http::{HeaderMap, header};
use axum::response::Response;
use futures_util::{FutureExt, Stream, StreamExt};

use super::{Item, StreamConfig};
use crate::graphql::error::code;
use crate::graphql::{Api, Replies, Reply};

/// The response's media type.
pub const CONTENT_TYPE: &str = "multipart/mixed;boundary=\"graphql\";subscriptionSpec=\"1.0\"";

/// What opens the body and follows every part: a delimiter line.
const DELIMITER: &[u8] = b"\r\n--graphql";
/// What starts every part (after a delimiter).
const PART_HEADERS: &[u8] = b"\r\nContent-Type: application/json\r\n\r\n";
/// What turns the last delimiter into the closing one.
const CLOSE: &[u8] = b"--\r\n";

/// True when the client asked for multipart subscriptions (`Accept` names `multipart/mixed`
/// with `subscriptionSpec`; a `boundary` parameter, quoted or not, may be there too).
pub fn accepted(headers: &HeaderMap) -> bool {
    super::header_entries(headers, header::ACCEPT).any(|media| {
        let mut params = media.split(';');
        let name = params.next().unwrap_or_default().trim();
        name.eq_ignore_ascii_case("multipart/mixed")
            && params.any(|param| {
                param
                    .trim()
                    .to_ascii_lowercase()
                    .starts_with("subscriptionspec")
            })
    })
}

/// How a multipart response runs.
pub(crate) struct Options<'a> {
    pub config: &'a StreamConfig,
    /// When the token it was opened with expires.
    pub expires_at: Option<tokio::time::Instant>,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    pub gzip: bool,
    /// One of the open-connection permits, held while the response lives.
    pub permit: tokio::sync::OwnedSemaphorePermit,
}

/// The response of a started subscription: each item as a part.
pub(crate) fn respond(
    api: Api,
    first: Option<Reply>,
    replies: Replies,
    options: Options<'_>,
) -> Response {
    let Options {
        config,
        expires_at,
        shutdown,
        gzip,
        permit,
    } = options;
    let items = super::items(
        first,
        replies,
        Some(config.keep_alive),
        expires_at,
        shutdown,
    );
    super::respond(frames(api, items, permit), CONTENT_TYPE, gzip)
}

/// The body's bytes for `items`: the first delimiter, then one part per reply or heartbeat,
/// then the closing delimiter.
fn frames(
    api: Api,
    items: impl Stream<Item = Item> + Send + 'static,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> impl Stream<Item = Vec<u8>> + Send + 'static {
    async_stream::stream! {
        let _permit = permit;
        yield DELIMITER.to_vec();
        let mut items = std::pin::pin!(items);
        let mut end = false;
        while !end {
            let Some(item) = items.next().await else { break };
            let mut out = Vec::new();
            end = write(&api, &mut out, item);
            // What is ready already (a burst, a catch-up) goes out as one chunk.
            while !end && out.len() < super::BATCH_BYTES {
                let Some(Some(item)) = items.next().now_or_never() else { break };
                end = write(&api, &mut out, item);
            }
            if end {
                out.extend_from_slice(CLOSE);
            }
            if !out.is_empty() {
                yield out;
            }
        }
        if !end {
            yield CLOSE.to_vec();
        }
    }
}

/// Writes `item` into `out` as a part (or nothing); true when the body ends after it.
fn write(api: &Api, out: &mut Vec<u8>, item: Item) -> bool {
    match item {
        // Event streams read their replies with `Target::Own`: never `Joined`.
        Item::Reply(Reply::Following { .. } | Reply::Joined { .. }) => false,
        Item::Reply(Reply::Shared { json, .. }) => {
            part(out, &[b"{\"payload\":", json.as_bytes(), b"}"]);
            false
        }
        Item::Reply(Reply::Response(response)) => {
            match serde_json::to_string(&response) {
                Ok(json) => part(out, &[b"{\"payload\":", json.as_bytes(), b"}"]),
                Err(err) => tracing::error!(error = %err, "cannot serialize a GraphQL response"),
            }
            false
        }
        Item::KeepAlive => {
            part(out, &[b"{}"]);
            false
        }
        Item::Expired => {
            let error = api.refuse(
                code::UNAUTHENTICATED,
                "the token has expired; subscribe again with a fresh one",
            );
            let fatal = serde_json::json!({ "payload": null, "errors": [error] });
            part(out, &[fatal.to_string().as_bytes()]);
            true
        }
        Item::End { .. } => true,
    }
}

/// One part into `out`: its headers, `body`'s pieces, and the delimiter after it.
fn part(out: &mut Vec<u8>, body: &[&[u8]]) {
    out.extend_from_slice(PART_HEADERS);
    for piece in body {
        out.extend_from_slice(piece);
    }
    out.extend_from_slice(DELIMITER);
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn accept(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn the_accept_header_is_read_with_or_without_a_boundary() {
        assert!(accepted(&accept(
            "multipart/mixed;boundary=\"graphql\";subscriptionSpec=1.0,application/json"
        )));
        assert!(accepted(&accept(
            "multipart/mixed;subscriptionSpec=\"1.0\", application/json"
        )));
        assert!(accepted(&accept(
            "application/json, multipart/mixed; boundary=graphql; subscriptionSpec=1.0"
        )));
        // @defer's multipart (deferSpec) is not a subscription's.
        assert!(!accepted(&accept(
            "multipart/mixed;deferSpec=20220824,application/json"
        )));
        assert!(!accepted(&accept("application/json")));
    }

    #[test]
    fn a_part_is_headers_body_and_the_next_delimiter() {
        let mut out = Vec::new();
        part(&mut out, &[b"{}"]);
        assert_eq!(
            out,
            b"\r\nContent-Type: application/json\r\n\r\n{}\r\n--graphql".to_vec()
        );
    }
}
