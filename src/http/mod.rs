//! The axum router: GraphQL over HTTP on `/graphql` (POST, and GET for queries), the
//! WebSocket upgrade on the same path (protocols in `ws`), subscriptions over HTTP (graphql-sse
//! on `/graphql/stream`, and on `/graphql` for a client that accepts an event stream; Apollo's
//! multipart subscriptions on `/graphql`; their routes in `event_streams`, their framing in
//! `crate::streams`), y-websocket on `/yjs/{documentId}` (its upgrade in `yjs`, the socket in
//! `crate::collab`), GraphiQL on `/` and
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
use crate::streams::{Reservations, StreamConfig, multipart, sse};
use crate::ws::{self, Protocol, WsConfig};

mod event_streams;
mod yjs;
use event_streams::{
    event_stream, multipart_stream, refused_stream, stream_delete, stream_get, stream_post,
    stream_put,
};

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
    /// Yjs peers' awareness, by document (y-websocket on `/yjs/{documentId}`).
    pub rooms: Arc<crate::collab::awareness::Rooms>,
    /// The largest Yjs update taken, in bytes of base64.
    pub max_document_update_bytes: usize,
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
        .route("/yjs/{document}", get(yjs::upgrade))
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
    // A subscription, or a live query: what a streaming client gets as a stream.
    let subscription = operation_type(&mut request) == Some(OperationType::Subscription)
        || ((sse::accepted(headers) || multipart::accepted(headers))
            && crate::graphql::is_live_query(&mut request));
    if event_stream_only || (subscription && sse::accepted(headers)) {
        let access_token = url.and_then(|url| url.access_token.as_deref());
        return event_stream(state, request, headers, access_token, url.is_some()).await;
    }
    if subscription && multipart::accepted(headers) {
        return multipart_stream(state, request, headers, graphql_response).await;
    }
    run(state, request, headers, graphql_response).await
}

/// True when the client takes a JSON answer (or says nothing about what it takes).
fn accepts_json(headers: &HeaderMap) -> bool {
    let mut accept = crate::streams::header_entries(headers, header::ACCEPT)
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
