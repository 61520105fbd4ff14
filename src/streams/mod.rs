//! Subscriptions over HTTP: graphql-sse (`sse`, both of its modes) and Apollo's multipart
//! subscriptions (`multipart`). Each is a framing of one operation's replies
//! (`Api::execute_stream`, the same engine the WebSocket uses, so the same order, cursors,
//! limits and codes); this module holds what they share: starting an operation, the items a
//! response body is made of (replies, keep-alives, the token's expiry, the end), and the
//! response headers.
//!
//! A response body is pulled by the server only as fast as the client reads it, so an
//! operation is polled for its next reply only when there is room for it: a slow reader
//! leaves its subscription behind, to catch up from the log later, and nothing is buffered
//! for it beyond the socket's own buffer.

pub mod multipart;
mod reservations;
pub mod sse;

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, header};
use futures_util::{Stream, StreamExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::auth::Viewer;
use crate::graphql::error;
use crate::graphql::{Api, Replies, Reply};

pub use reservations::{Refusal, Reservations};

/// A chunk of a response body takes what is ready, up to about this many bytes: one write
/// (and one compressor flush) for a burst, as a WebSocket writes a socket's frames.
pub(crate) const BATCH_BYTES: usize = 64 * 1024;

/// Timing of the streaming transports.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    /// How often an idle event stream gets a comment line (graphql-sse) or a `{}` part
    /// (multipart), so that proxies keep it open and a vanished client is noticed.
    pub keep_alive: Duration,
}

/// What an operation's response body is made of, in order.
pub(crate) enum Item {
    Reply(Reply),
    /// Nothing was sent for `keep_alive`.
    KeepAlive,
    /// The token the stream was opened with expired: it ends here.
    Expired,
    /// The operation is over. `shutdown`: a subscription that the server's shutdown ended
    /// (every subscription ends then), so the client should come back, not stop. A query or
    /// mutation that finished during the shutdown is over for good: its client must not
    /// send it again.
    End {
        shutdown: bool,
    },
}

/// An operation once started (`start`).
// Made once per request and taken apart at once: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Started {
    /// It never ran (a syntax or validation error, a persisted query not found): answered as
    /// a plain GraphQL response, before any stream begins.
    Refused(Box<async_graphql::Response>),
    /// It runs: `first` is its first reply (none when it ended without one).
    Running {
        first: Option<Reply>,
        replies: Replies,
    },
}

/// Starts `request` as `viewer` under a start permit, and waits for its first reply: a
/// subscription's is `Reply::Following` once its checks passed (or its error), a query's is
/// its response. So a request that never runs is answered with an HTTP status of its own.
pub(crate) async fn start(api: &Api, request: async_graphql::Request, viewer: Viewer) -> Started {
    let permit = api.start_permit().await;
    let mut replies = api.execute_stream(request, viewer, permit, crate::graphql::Target::Own);
    match replies.next().await {
        Some(Reply::Response(response)) if error::is_request_error(&response) => {
            Started::Refused(response)
        }
        first => Started::Running { first, replies },
    }
}

/// The items of a started operation's body: `first`, then each reply, a `KeepAlive` after
/// every `keep_alive` without one (if given: a stream of several operations has its own),
/// and `Expired` at `expires_at`; always ends with `Expired` or `End`.
pub(crate) fn items(
    first: Option<Reply>,
    replies: Replies,
    keep_alive: Option<Duration>,
    expires_at: Option<Instant>,
    shutdown: watch::Receiver<bool>,
) -> impl Stream<Item = Item> + Send + 'static {
    // As a stream, so that a keep-alive tick never drops a reply half made: the stream
    // keeps the pending `next` between polls.
    let replies = futures_util::stream::unfold(replies, |mut replies| async move {
        let reply = replies.next().await?;
        Some((reply, replies))
    });
    async_stream::stream! {
        let mut replies = std::pin::pin!(replies);
        // A subscription that reached its live phase, or a live query that sent a result:
        // only those end with the shutdown (and are resumed by their clients).
        let mut following = matches!(first, Some(Reply::Following { .. } | Reply::Shared { .. }));
        if let Some(first) = first {
            yield Item::Reply(first);
        }
        let mut ticks = KeepAlive::new(keep_alive);
        let expiry = tokio::time::sleep_until(expires_at.unwrap_or_else(Instant::now));
        let mut expiry = std::pin::pin!(expiry);
        loop {
            tokio::select! {
                reply = replies.next() => match reply {
                    Some(reply) => {
                        following |= matches!(reply, Reply::Following { .. } | Reply::Shared { .. });
                        ticks.sent();
                        yield Item::Reply(reply);
                    }
                    None => {
                        let shutdown = following && *shutdown.borrow();
                        yield Item::End { shutdown };
                        break;
                    }
                },
                due = ticks.tick(), if keep_alive.is_some() => if due {
                    yield Item::KeepAlive;
                },
                _ = &mut expiry, if expires_at.is_some() => {
                    yield Item::Expired;
                    break;
                }
            }
        }
    }
}

/// When an idle stream needs a keep-alive, without touching a timer per event (resetting
/// one takes the timer driver's lock, per subscription and event): it ticks every half
/// period, and a tick with nothing sent since the one before is due. So an idle stream
/// never goes a whole period without a byte.
pub(crate) struct KeepAlive {
    ticks: tokio::time::Interval,
    sent: bool,
}

impl KeepAlive {
    /// Every `period` (if given; else never).
    pub(crate) fn new(period: Option<Duration>) -> Self {
        // Without keep-alives, a period that never comes.
        let half = period.map_or(Duration::from_secs(365 * 24 * 3600), |period| period / 2);
        let mut ticks = tokio::time::interval_at(Instant::now() + half, half);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self { ticks, sent: false }
    }

    /// Something was sent.
    pub(crate) fn sent(&mut self) {
        self.sent = true;
    }

    /// Waits for the next tick; true when a keep-alive is due (and counts it as sent, so
    /// an idle stream gets one every period, not every half).
    pub(crate) async fn tick(&mut self) -> bool {
        self.ticks.tick().await;
        self.on_tick()
    }

    fn on_tick(&mut self) -> bool {
        let due = !std::mem::take(&mut self.sent);
        self.sent = due;
        due
    }
}

/// A 200 streaming `chunks` as `content_type` (gzip-encoded when `gzip`; see `body`).
pub(crate) fn respond(
    chunks: impl Stream<Item = Vec<u8>> + Send + 'static,
    content_type: &'static str,
    gzip: bool,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let mut response = (axum::http::StatusCode::OK, body(chunks, gzip)).into_response();
    stream_headers(response.headers_mut(), content_type);
    if gzip {
        response
            .headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    response
}

/// The response headers every event stream carries: no caching or transformation by a
/// proxy, and no buffering by nginx, so that events are flushed as they happen.
fn stream_headers(headers: &mut HeaderMap, content_type: &'static str) {
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store, no-transform"),
    );
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
}

/// The authorization a streaming request acts with: its `Authorization` header, else (for a
/// GET, which `EventSource` makes without headers) an `access_token` in its URL.
pub(crate) fn authorization(headers: &HeaderMap, access_token: Option<&str>) -> Option<String> {
    match headers.get(header::AUTHORIZATION) {
        Some(value) => Some(value.to_str().unwrap_or("invalid").to_owned()),
        None => access_token.map(|token| format!("Bearer {token}")),
    }
}

/// The comma-separated entries of every `name` header (`Accept`, `Accept-Encoding`), each
/// with its parameters: `text/event-stream;q=0.9`.
pub(crate) fn header_entries<'a>(
    headers: &'a HeaderMap,
    name: header::HeaderName,
) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(name)
        .into_iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
}

/// True when the client accepts a gzip-encoded response (`Accept-Encoding`, q above 0).
pub(crate) fn accepts_gzip(headers: &HeaderMap) -> bool {
    header_entries(headers, header::ACCEPT_ENCODING).any(|coding| {
        let mut parts = coding.split(';');
        let name = parts.next().unwrap_or_default().trim();
        let refused = parts.any(|param| {
            param
                .trim()
                .strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
    })
}

/// A response body of `chunks`, gzip-encoded when `gzip` (the caller then sets
/// `Content-Encoding`). Each chunk is flushed on its own (a sync flush: a few bytes each),
/// so an event reaches the client as it happens, while the compressor keeps its window
/// across events, which repeat most of their text.
pub(crate) fn body(
    chunks: impl Stream<Item = Vec<u8>> + Send + 'static,
    gzip: bool,
) -> axum::body::Body {
    use std::io::Write as _;
    if !gzip {
        return axum::body::Body::from_stream(chunks.map(Ok::<_, std::convert::Infallible>));
    }
    let encoded = async_stream::stream! {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut chunks = std::pin::pin!(chunks);
        while let Some(chunk) = chunks.next().await {
            // Writing into memory fails only when out of memory.
            if encoder.write_all(&chunk).and_then(|()| encoder.flush()).is_err() {
                return;
            }
            yield Ok::<_, std::io::Error>(std::mem::take(encoder.get_mut()));
        }
        if let Ok(tail) = encoder.finish() {
            yield Ok(tail);
        }
    };
    axum::body::Body::from_stream(encoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_idle_stream_gets_a_keep_alive_every_other_half_period_and_a_busy_one_none() {
        let mut keep_alive = KeepAlive::new(Some(Duration::from_secs(10)));
        // Idle: ticks every 5 s, a keep-alive every 10 s.
        let idle: Vec<bool> = (0..4).map(|_| keep_alive.on_tick()).collect();
        assert_eq!(idle, [true, false, true, false]);
        // An event between two ticks: the next tick passes, the one after is due (at most a
        // period after the event).
        keep_alive.sent();
        assert!(!keep_alive.on_tick());
        assert!(keep_alive.on_tick());
        // Events all along: none due.
        for _ in 0..3 {
            keep_alive.sent();
            assert!(!keep_alive.on_tick());
        }
    }
}
