//! The HTTP side of the event streams (`crate::streams` frames them): an operation of
//! `/graphql` answered as a graphql-sse stream or as Apollo's multipart, and graphql-sse's
//! `/graphql/stream` routes (distinct connections by GET and POST; single connection mode's
//! PUT, GET, POST and DELETE of a reserved stream).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use std::net::SocketAddr;

use super::{
    HttpState, UrlParams, bad_request, dispatch, graphql_query_string, read_json_request, refused,
    respond, too_many_connections, url_params,
};
use crate::auth::Viewer;
use crate::graphql::error::code;
use crate::graphql::limits::ClientAddr;
use crate::streams::{self, Refusal, multipart, sse};

/// An event stream of one response (an operation that never started), then `complete`.
pub(super) fn refused_stream(state: &HttpState, response: async_graphql::Response) -> Response {
    let Ok(permit) = state.connections.clone().try_acquire_owned() else {
        return too_many_connections(state);
    };
    let items = sse::refused(Box::new(response));
    sse::stream(state.api.clone(), items, false, false, permit)
}

/// The viewer of a streaming request and when its token expires: its `Authorization`, else
/// a GET's `access_token`.
fn stream_viewer(
    state: &HttpState,
    headers: &HeaderMap,
    access_token: Option<&str>,
) -> (Viewer, Option<tokio::time::Instant>) {
    let authorization = streams::authorization(headers, access_token);
    (
        Viewer::from_authorization(authorization.as_deref(), &state.keys),
        Viewer::deadline(authorization.as_deref(), &state.keys),
    )
}

/// One operation as a graphql-sse stream (distinct connections mode).
pub(super) async fn event_stream(
    state: &HttpState,
    request: async_graphql::Request,
    headers: &HeaderMap,
    access_token: Option<&str>,
    mark_start: bool,
) -> Response {
    let Ok(permit) = state.connections.clone().try_acquire_owned() else {
        return too_many_connections(state);
    };
    let (viewer, expires_at) = stream_viewer(state, headers, access_token);
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|value| value.to_str().ok())
        .map(|value| value.trim().to_owned())
        .filter(|value| !value.is_empty());
    let caller = sse::Caller {
        viewer,
        expires_at,
        last_event_id,
        mark_start,
        gzip: streams::accepts_gzip(headers),
    };
    sse::distinct(
        state.api.clone(),
        request,
        caller,
        &state.streams,
        state.shutdown.clone(),
        permit,
    )
    .await
}

/// A subscription as Apollo's multipart response; a request that never runs is answered as
/// JSON, which Apollo Client reads as well.
pub(super) async fn multipart_stream(
    state: &HttpState,
    request: async_graphql::Request,
    headers: &HeaderMap,
    graphql_response: bool,
) -> Response {
    let Ok(permit) = state.connections.clone().try_acquire_owned() else {
        return too_many_connections(state);
    };
    let (viewer, expires_at) = stream_viewer(state, headers, None);
    match streams::start(&state.api, request, viewer).await {
        streams::Started::Refused(response) => respond(&response, graphql_response),
        streams::Started::Running { first, replies } => multipart::respond(
            state.api.clone(),
            first,
            replies,
            multipart::Options {
                config: &state.streams,
                expires_at,
                shutdown: state.shutdown.clone(),
                gzip: streams::accepts_gzip(headers),
                permit,
            },
        ),
    }
}

/// graphql-sse's stream token: its header, else the URL's `token`.
fn stream_token(headers: &HeaderMap, url: &UrlParams) -> Option<String> {
    headers
        .get("x-graphql-event-stream-token")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
        .or_else(|| url.token.clone())
        .filter(|token| !token.is_empty())
}

/// A graphql-sse refusal: `status` with a coded error as JSON.
fn stream_refused(state: &HttpState, refusal: Refusal) -> Response {
    let (status, code, message) = match refusal {
        Refusal::NotFound => (StatusCode::NOT_FOUND, code::NOT_FOUND, "Stream not found"),
        Refusal::AlreadyOpen => (
            StatusCode::CONFLICT,
            code::BAD_USER_INPUT,
            "Stream already open",
        ),
        Refusal::Duplicate => (
            StatusCode::CONFLICT,
            code::BAD_USER_INPUT,
            "an operation with this operationId is running on the stream",
        ),
        Refusal::Full => return too_many_connections(state),
        Refusal::TooManyReservations => (
            StatusCode::TOO_MANY_REQUESTS,
            code::LIMIT_EXCEEDED,
            "too many streams reserved and not opened; open or let them expire first",
        ),
        Refusal::TooManyOperations => (
            StatusCode::TOO_MANY_REQUESTS,
            code::LIMIT_EXCEEDED,
            "too many operations on this stream",
        ),
    };
    refused(state, status, code, message, false)
}

/// The user a reserved stream's request acts as; a 401 with a coded error without one.
fn stream_owner(
    state: &HttpState,
    headers: &HeaderMap,
    access_token: Option<&str>,
) -> Result<i64, Box<Response>> {
    match stream_viewer(state, headers, access_token).0 {
        Viewer::User(id) => Ok(id),
        _ => Err(Box::new(refused(
            state,
            StatusCode::UNAUTHORIZED,
            code::UNAUTHENTICATED,
            "a reserved stream needs a valid token (Authorization: Bearer <token>)",
            false,
        ))),
    }
}

/// PUT /graphql/stream: reserves a stream (graphql-sse's single connection mode) for the
/// signed-in user; 201 with its token as text.
pub(super) async fn stream_put(State(state): State<HttpState>, headers: HeaderMap) -> Response {
    let owner = match stream_owner(&state, &headers, None) {
        Ok(owner) => owner,
        Err(response) => return *response,
    };
    match state.reservations.reserve(owner) {
        Ok(token) => (
            StatusCode::CREATED,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            )],
            token,
        )
            .into_response(),
        Err(refusal) => stream_refused(&state, refusal),
    }
}

/// GET /graphql/stream: with a stream token, opens that reserved stream; else one operation
/// from the URL as an event stream (distinct connections mode; `EventSource`).
pub(super) async fn stream_get(
    State(state): State<HttpState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let url = url_params(&uri);
    let Some(token) = stream_token(&headers, &url) else {
        let mut headers = headers;
        // An event stream whatever the client says it accepts: that is this path's answer.
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/event-stream"),
        );
        return graphql_query_string(
            state,
            headers,
            uri.query().map(str::to_owned),
            ClientAddr(client.ip()),
        )
        .await;
    };
    let owner = match stream_owner(&state, &headers, url.access_token.as_deref()) {
        Ok(owner) => owner,
        Err(response) => return *response,
    };
    let Ok(permit) = state.connections.clone().try_acquire_owned() else {
        return too_many_connections(&state);
    };
    match state.reservations.open(
        &token,
        owner,
        state.api.clone(),
        &state.streams,
        state.shutdown.clone(),
        permit,
    ) {
        Ok(frames) => sse::respond(frames, streams::accepts_gzip(&headers)),
        Err(refusal) => stream_refused(&state, refusal),
    }
}

/// POST /graphql/stream: with a stream token, starts an operation on that stream (202; its
/// events go down the stream); else one operation as an event stream.
pub(super) async fn stream_post(
    State(state): State<HttpState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let url = url_params(&uri);
    let request = match read_json_request(&state, &headers, body, false) {
        Ok(request) => request.data(ClientAddr(client.ip())),
        Err(response) => return *response,
    };
    let Some(token) = stream_token(&headers, &url) else {
        let mut headers = headers;
        // An event stream whatever the client says it accepts: that is this path's answer.
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/event-stream"),
        );
        return dispatch(&state, request, &headers, false, None).await;
    };
    start_on_stream(&state, &token, request, &headers).await
}

/// Starts `request` on the reserved stream `token` (single connection mode): 202 once it
/// started (its results, errors included, go down the stream).
async fn start_on_stream(
    state: &HttpState,
    token: &str,
    mut request: async_graphql::Request,
    headers: &HeaderMap,
) -> Response {
    let operation_id = match request.extensions.get("operationId") {
        Some(async_graphql::Value::String(id)) if !id.is_empty() => id.clone(),
        _ => {
            return bad_request(
                state,
                "an operation on a reserved stream needs `extensions.operationId`",
                false,
            );
        }
    };
    let owner = match stream_owner(state, headers, None) {
        Ok(owner) => owner,
        Err(response) => return *response,
    };
    let claim = match state.reservations.claim(token, owner, &operation_id) {
        Ok(claim) => claim,
        Err(refusal) => return stream_refused(state, refusal),
    };
    if claim.over_limit {
        let error = state.api.refuse(
            code::LIMIT_EXCEEDED,
            format!(
                "at most {} operations may run on one stream",
                state.ws.max_operations
            ),
        );
        return sent(
            state,
            claim.send(sse::refused(Box::new(
                async_graphql::Response::from_errors(vec![error]),
            ))),
        );
    }
    if let Err(err) = state.api.resolve_persisted(&mut request) {
        return sent(
            state,
            claim.send(sse::refused(Box::new(
                async_graphql::Response::from_errors(vec![err]),
            ))),
        );
    }
    let (viewer, expires_at) = stream_viewer(state, headers, None);
    let items = match streams::start(&state.api, request, viewer).await {
        streams::Started::Refused(response) => sse::refused(response),
        streams::Started::Running { first, replies } => {
            streams::items(first, replies, None, expires_at, state.shutdown.clone()).boxed()
        }
    };
    sent(state, claim.send(items))
}

/// 202 for an operation its stream took; 404 when the stream has gone (it ended, or the
/// server is shutting down).
fn sent(state: &HttpState, accepted: bool) -> Response {
    if accepted {
        return StatusCode::ACCEPTED.into_response();
    }
    refused(
        state,
        StatusCode::NOT_FOUND,
        code::NOT_FOUND,
        "the stream has ended; reserve a new one",
        false,
    )
}

/// DELETE /graphql/stream?operationId=: stops an operation of a reserved stream.
pub(super) async fn stream_delete(
    State(state): State<HttpState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let url = url_params(&uri);
    let Some(token) = stream_token(&headers, &url) else {
        return stream_refused(&state, Refusal::NotFound);
    };
    let owner = match stream_owner(&state, &headers, None) {
        Ok(owner) => owner,
        Err(response) => return *response,
    };
    let Some(operation_id) = url.operation_id.filter(|id| !id.is_empty()) else {
        return bad_request(&state, "say which operation to stop: `operationId`", false);
    };
    match state.reservations.stop(&token, owner, &operation_id) {
        Ok(()) => StatusCode::OK.into_response(),
        Err(refusal) => stream_refused(&state, refusal),
    }
}
