//! The axum router: GraphQL over HTTP on `/graphql` (POST, and GET for queries), the
//! WebSocket upgrade on the same path (protocols in `ws`), subscriptions over HTTP (graphql-sse
//! on `/graphql/stream`, and on `/graphql` for a client that accepts an event stream; Apollo's
//! multipart subscriptions on `/graphql`; framing in `streams`), GraphiQL on `/` and
//! `/graphiql`, the demo on `/demo` with their embedded files under `/assets/` (see `assets`),
//! and `/healthz`.
//!
//! Responses follow GraphQL over HTTP: a client that accepts
//! `application/graphql-response+json` gets that media type, with status 400 when the request
//! itself was invalid (unparsable, failed validation); otherwise `application/json` with 200.

use async_graphql::parser::types::OperationType;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use axum::extract::{FromRequestParts, Request, WebSocketUpgrade};
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ConnectInfo;
use tokio::sync::{Semaphore, watch};

use crate::assets;
use crate::auth::{JwtKeys, Viewer};
use crate::graphql::Api;
use crate::graphql::error::{self, code};
use crate::graphql::limits::ClientAddr;
use crate::metrics::Health;
use crate::streams::{self, Refusal, Reservations, StreamConfig, multipart, sse};
use crate::ws::{self, Protocol, WsConfig};
use futures_util::StreamExt;

/// Read buffer of each WebSocket (see `websocket`).
const WS_READ_BUFFER_BYTES: usize = 4 * 1024;

const GRAPHQL_RESPONSE_JSON: &str = "application/graphql-response+json";
const APPLICATION_JSON: &str = "application/json";

/// What every handler shares.
#[derive(Clone)]
pub struct HttpState {
    pub api: Api,
    pub keys: JwtKeys,
    pub ws: WsConfig,
    /// Event streams' timing (graphql-sse, multipart).
    pub streams: StreamConfig,
    /// graphql-sse's reserved streams (single connection mode).
    pub reservations: Arc<Reservations>,
    /// Largest accepted WebSocket message.
    pub max_ws_message_bytes: usize,
    /// Largest accepted HTTP request body.
    pub max_body_bytes: usize,
    /// One permit per open WebSocket or event stream; none left means new ones get 503.
    pub connections: Arc<Semaphore>,
    /// Metrics and readiness.
    pub health: Arc<Health>,
    /// Turns true when the server shuts down; WebSockets close then.
    pub shutdown: watch::Receiver<bool>,
}

/// The application's routes.
pub fn router(state: HttpState) -> Router {
    let max_body_bytes = state.max_body_bytes;
    Router::new()
        .route("/", get(graphiql))
        .route("/graphiql", get(graphiql))
        .route("/demo", get(demo))
        .route("/assets/{*path}", get(assets::asset))
        .route("/graphql", get(graphql_get).post(graphql_post))
        .route(
            "/graphql/stream",
            get(stream_get)
                .post(stream_post)
                .put(stream_put)
                .delete(stream_delete),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// Alive: the process serves HTTP.
async fn healthz() -> &'static str {
    "ok"
}

/// Ready: the database answers and the change feed is caught up; 503 otherwise, with the
/// checks' results as JSON.
async fn readyz(State(state): State<HttpState>) -> Response {
    let (ready, report) = state.health.ready().await;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(APPLICATION_JSON),
        )],
        report.to_string(),
    )
        .into_response()
}

/// Prometheus metrics (OpenMetrics text).
async fn metrics(State(state): State<HttpState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        state.health.render().await,
    )
        .into_response()
}

async fn graphiql(headers: HeaderMap) -> Response {
    assets::serve(assets::GRAPHIQL_PAGE, &headers)
}

async fn demo(headers: HeaderMap) -> Response {
    assets::serve(assets::DEMO_PAGE, &headers)
}

/// The media type to answer with, from the request's `Accept`.
fn wants_graphql_response(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| value.contains(GRAPHQL_RESPONSE_JSON))
}

fn viewer(state: &HttpState, headers: &HeaderMap) -> Viewer {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .map(|value| value.to_str().unwrap_or("invalid"));
    Viewer::from_authorization(authorization, &state.keys)
}

/// A request the server could not even read as GraphQL: 400 with a coded error.
fn bad_request(state: &HttpState, message: &str, graphql_response: bool) -> Response {
    refused(
        state,
        StatusCode::BAD_REQUEST,
        code::BAD_USER_INPUT,
        message,
        graphql_response,
    )
}

/// `status` with a GraphQL error body carrying `code`, counted (`Api::refuse`).
fn refused(
    state: &HttpState,
    status: StatusCode,
    code: &'static str,
    message: &str,
    graphql_response: bool,
) -> Response {
    let body = serde_json::json!({ "errors": [state.api.refuse(code, message)] });
    let content_type = if graphql_response {
        GRAPHQL_RESPONSE_JSON
    } else {
        APPLICATION_JSON
    };
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body.to_string(),
    )
        .into_response()
}

async fn graphql_post(
    State(state): State<HttpState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let graphql_response = wants_graphql_response(&headers);
    let request = match read_json_request(&state, &headers, body, graphql_response) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    let request = request.data(ClientAddr(client.ip()));
    dispatch(&state, request, &headers, graphql_response, None).await
}

/// A POST's GraphQL request from its JSON body; a response refusing it otherwise.
fn read_json_request(
    state: &HttpState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    graphql_response: bool,
) -> Result<async_graphql::Request, Box<Response>> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    if !content_type
        .trim_start()
        .to_ascii_lowercase()
        .starts_with(APPLICATION_JSON)
    {
        // Answered as application/json whatever the client accepts: it did not speak
        // GraphQL over HTTP at all.
        return Err(Box::new(refused(
            state,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code::BAD_USER_INPUT,
            "send the request as application/json",
            false,
        )));
    }
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let message = format!(
                "the request body is larger than this server accepts ({} bytes)",
                state.max_body_bytes
            );
            return Err(Box::new(refused(
                state,
                StatusCode::PAYLOAD_TOO_LARGE,
                code::LIMIT_EXCEEDED,
                &message,
                graphql_response,
            )));
        }
        Err(_) => {
            return Err(Box::new(bad_request(
                state,
                "the request body could not be read",
                graphql_response,
            )));
        }
    };
    serde_json::from_slice(&body).map_err(|_| {
        Box::new(bad_request(
            state,
            "the body is not a GraphQL request: expected JSON with a `query` string",
            graphql_response,
        ))
    })
}

/// Runs a request of `/graphql` (or a distinct graphql-sse request): resolves a persisted
/// query, refuses a mutation sent with GET, then runs it as an event stream for a client that
/// accepts one (a subscription, or any operation when it accepts no JSON), as Apollo's
/// multipart for a subscription whose client asks for it, else as one JSON response. `url`: a
/// GET's parameters besides the operation.
async fn dispatch(
    state: &HttpState,
    mut request: async_graphql::Request,
    headers: &HeaderMap,
    graphql_response: bool,
    url: Option<&UrlParams>,
) -> Response {
    let event_stream_only = sse::accepted(headers) && !accepts_json(headers);
    if let Err(err) = state.api.resolve_persisted(&mut request) {
        let response = async_graphql::Response::from_errors(vec![err]);
        if event_stream_only {
            // As events: the `graphql-sse` client reads nothing else.
            return refused_stream(state, response);
        }
        return respond(&response, graphql_response);
    }
    state.api.parse(&mut request);
    if url.is_some() && is_mutation(&mut request) {
        let mut response = bad_request(state, "mutations must be sent with POST", graphql_response);
        *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    let subscription = operation_type(&mut request) == Some(OperationType::Subscription);
    if event_stream_only || (subscription && sse::accepted(headers)) {
        let access_token = url.and_then(|url| url.access_token.as_deref());
        return event_stream(state, request, headers, access_token, url.is_some()).await;
    }
    if subscription && multipart::accepted(headers) {
        return multipart_stream(state, request, headers, graphql_response).await;
    }
    run(state, request, headers, graphql_response).await
}

/// An event stream of one response (an operation that never started), then `complete`.
fn refused_stream(state: &HttpState, response: async_graphql::Response) -> Response {
    let Ok(permit) = state.connections.clone().try_acquire_owned() else {
        return too_many_connections(state);
    };
    let items = sse::refused(Box::new(response));
    sse::stream(state.api.clone(), items, false, false, permit)
}

/// True when the client takes a JSON answer (or says nothing about what it takes).
fn accepts_json(headers: &HeaderMap) -> bool {
    let mut accept = streams::header_entries(headers, header::ACCEPT)
        .map(|media| media.split(';').next().unwrap_or_default().trim())
        .peekable();
    if accept.peek().is_none() {
        return true;
    }
    accept.any(|media| {
        [
            APPLICATION_JSON,
            GRAPHQL_RESPONSE_JSON,
            "application/*",
            "*/*",
        ]
        .iter()
        .any(|json| media.eq_ignore_ascii_case(json))
    })
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
async fn event_stream(
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
async fn multipart_stream(
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

/// GET /graphql: a WebSocket upgrade (graphql-transport-ws or legacy graphql-ws), or a
/// query in the URL.
async fn graphql_get(
    State(state): State<HttpState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let is_upgrade = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.eq_ignore_ascii_case("websocket"));
    let client = ClientAddr(client.ip());
    if is_upgrade {
        return websocket(state, request, client).await;
    }
    let headers = request.headers().clone();
    let query = request.uri().query().map(str::to_owned);
    graphql_query_string(state, headers, query, client).await
}

async fn websocket(state: HttpState, request: Request, client: ClientAddr) -> Response {
    // Taken before the upgrade, released when the connection ends.
    let Ok(permit) = state.connections.clone().try_acquire_owned() else {
        return too_many_connections(&state);
    };
    let (mut parts, _) = request.into_parts();
    let offered = parts
        .headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect::<Vec<_>>();
    let Some(protocol) = Protocol::negotiate(offered) else {
        return (
            StatusCode::BAD_REQUEST,
            "unsupported WebSocket subprotocol: use graphql-transport-ws or graphql-ws",
        )
            .into_response();
    };
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &state).await {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    upgrade
        .protocols([protocol.name()])
        .max_message_size(state.max_ws_message_bytes)
        .max_frame_size(state.max_ws_message_bytes)
        // tungstenite allocates its whole read buffer per socket up front (128 KiB by
        // default), which made an idle connection cost ~136 KiB. Clients send small messages;
        // a larger one is read in several chunks.
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .on_upgrade(move |socket| async move {
            ws::serve(
                socket,
                protocol,
                state.api,
                state.keys,
                state.ws,
                client,
                state.shutdown,
            )
            .await;
            drop(permit);
        })
}

/// 503 for a WebSocket or event stream past `--max-connections`.
fn too_many_connections(state: &HttpState) -> Response {
    let mut response = refused(
        state,
        StatusCode::SERVICE_UNAVAILABLE,
        code::LIMIT_EXCEEDED,
        "too many connections; try again later",
        false,
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    response
}

async fn graphql_query_string(
    state: HttpState,
    headers: HeaderMap,
    query: Option<String>,
    client: ClientAddr,
) -> Response {
    let graphql_response = wants_graphql_response(&headers);
    let (request, url) = match url_request(query.as_deref().unwrap_or_default()) {
        Ok(parsed) => parsed,
        Err(()) => {
            return bad_request(
                &state,
                "the query string is not a GraphQL request: expected `query`, and JSON `variables`",
                graphql_response,
            );
        }
    };
    let request = request.data(client);
    dispatch(&state, request, &headers, graphql_response, Some(&url)).await
}

/// What a URL may carry besides the operation.
#[derive(Default)]
struct UrlParams {
    /// A JWT, for `EventSource`, which cannot set `Authorization`. Taken out of the request
    /// here, so it reaches nothing that could log it.
    access_token: Option<String>,
    /// graphql-sse's stream token (single connection mode).
    token: Option<String>,
    /// graphql-sse's operation to stop (single connection mode).
    operation_id: Option<String>,
}

/// A GraphQL request from a URL's query string: `query`, `operationName`, and `variables`
/// and `extensions` as JSON, as GraphQL over HTTP spells them (async-graphql's own parser
/// reads `operation_name` instead), with the other parameters apart.
fn url_request(query: &str) -> Result<(async_graphql::Request, UrlParams), ()> {
    let mut text = String::new();
    let mut operation_name = None;
    let mut variables = None;
    let mut extensions = None;
    let mut url = UrlParams::default();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let value = value.into_owned();
        match key.as_ref() {
            "query" => text = value,
            "operationName" | "operation_name" => operation_name = Some(value),
            "variables" => variables = Some(value),
            "extensions" => extensions = Some(value),
            "access_token" => url.access_token = Some(value),
            "token" => url.token = Some(value),
            "operationId" => url.operation_id = Some(value),
            _ => {}
        }
    }
    fn json<T: serde::de::DeserializeOwned + Default>(text: Option<String>) -> Result<T, ()> {
        match text.filter(|text| !text.trim().is_empty()) {
            Some(text) => serde_json::from_str(&text).map_err(|_| ()),
            None => Ok(T::default()),
        }
    }
    let mut request = async_graphql::Request::new(text).variables(json(variables)?);
    request.extensions = json(extensions)?;
    request.operation_name = operation_name.filter(|name| !name.is_empty());
    Ok((request, url))
}

/// A URL's parameters besides the operation (none when its query string is unreadable: the
/// request is refused then by what reads the operation).
fn url_params(uri: &axum::http::Uri) -> UrlParams {
    url_request(uri.query().unwrap_or_default())
        .map(|(_, url)| url)
        .unwrap_or_default()
}

/// The type of the operation the request would run (`None` when its document has errors
/// or does not say which).
fn operation_type(request: &mut async_graphql::Request) -> Option<OperationType> {
    let name = request.operation_name.clone();
    let document = request.parsed_query().ok()?;
    match name {
        Some(name) => document
            .operations
            .iter()
            .find(|(op_name, _)| op_name.map(|n| n.as_str()) == Some(name.as_str()))
            .map(|(_, op)| op.node.ty),
        None => {
            let mut operations = document.operations.iter();
            let (_, op) = operations.next()?;
            operations.next().is_none().then_some(op.node.ty)
        }
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
async fn stream_put(State(state): State<HttpState>, headers: HeaderMap) -> Response {
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
async fn stream_get(
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
async fn stream_post(
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
async fn stream_delete(
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

/// True when the operation the request would run is a mutation.
fn is_mutation(request: &mut async_graphql::Request) -> bool {
    let name = request.operation_name.clone();
    let name = name.as_deref();
    let Ok(document) = request.parsed_query() else {
        return false;
    };
    document.operations.iter().any(|(op_name, op)| {
        let selected = match name {
            Some(name) => op_name.map(|n| n.as_str()) == Some(name),
            None => true,
        };
        selected && op.node.ty == OperationType::Mutation
    })
}

async fn run(
    state: &HttpState,
    request: async_graphql::Request,
    headers: &HeaderMap,
    graphql_response: bool,
) -> Response {
    let response = state.api.execute(request, viewer(state, headers)).await;
    respond(&response, graphql_response)
}

/// A GraphQL response as GraphQL over HTTP sends it: a request that never ran gets 400 when
/// the client accepts `application/graphql-response+json`, and no `data` entry.
fn respond(response: &async_graphql::Response, graphql_response: bool) -> Response {
    let request_error = error::is_request_error(response);
    let status = if graphql_response && request_error {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    let content_type = if graphql_response {
        GRAPHQL_RESPONSE_JSON
    } else {
        APPLICATION_JSON
    };
    let body = serde_json::to_value(response).map(|mut body| {
        if request_error && let Some(object) = body.as_object_mut() {
            // GraphQL over HTTP: a request that never executed has no `data` entry at all.
            object.remove("data");
        }
        body.to_string()
    });
    match body {
        Ok(body) => (
            status,
            [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
            body,
        )
            .into_response(),
        Err(err) => {
            tracing::error!(error = %err, "cannot serialize a GraphQL response");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}
