//! The axum router: GraphQL over HTTP on `/graphql` (POST, and GET for queries), the
//! WebSocket upgrade on the same path (protocols in `ws`), GraphiQL on `/` and `/graphiql`,
//! the demo on `/demo` with their embedded files under `/assets/` (see `assets`), and
//! `/healthz`.
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
use crate::ws::{self, Protocol, WsConfig};

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
    /// Largest accepted WebSocket message.
    pub max_ws_message_bytes: usize,
    /// Largest accepted HTTP request body.
    pub max_body_bytes: usize,
    /// One permit per open WebSocket; none left means new ones get 503.
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
        return refused(
            &state,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code::BAD_USER_INPUT,
            "send the request as application/json",
            false,
        );
    }
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let message = format!(
                "the request body is larger than this server accepts ({} bytes)",
                state.max_body_bytes
            );
            return refused(
                &state,
                StatusCode::PAYLOAD_TOO_LARGE,
                code::LIMIT_EXCEEDED,
                &message,
                graphql_response,
            );
        }
        Err(_) => {
            return bad_request(
                &state,
                "the request body could not be read",
                graphql_response,
            );
        }
    };
    let request: async_graphql::Request = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(_) => {
            return bad_request(
                &state,
                "the body is not a GraphQL request: expected JSON with a `query` string",
                graphql_response,
            );
        }
    };
    let mut request = request.data(ClientAddr(client.ip()));
    if let Err(err) = state.api.resolve_persisted(&mut request) {
        return respond(
            &async_graphql::Response::from_errors(vec![err]),
            graphql_response,
        );
    }
    run(&state, request, &headers, graphql_response).await
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
        let mut response = refused(
            &state,
            StatusCode::SERVICE_UNAVAILABLE,
            code::LIMIT_EXCEEDED,
            "too many connections; try again later",
            false,
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return response;
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

async fn graphql_query_string(
    state: HttpState,
    headers: HeaderMap,
    query: Option<String>,
    client: ClientAddr,
) -> Response {
    let graphql_response = wants_graphql_response(&headers);
    let mut request = match async_graphql::http::parse_query_string(
        query.as_deref().unwrap_or_default(),
    ) {
        Ok(request) => request,
        Err(_) => {
            return bad_request(
                &state,
                "the query string is not a GraphQL request: expected `query`, and JSON `variables`",
                graphql_response,
            );
        }
    };
    // Before the mutation check: a persisted query's text is known only once resolved.
    if let Err(err) = state.api.resolve_persisted(&mut request) {
        return respond(
            &async_graphql::Response::from_errors(vec![err]),
            graphql_response,
        );
    }
    state.api.parse(&mut request);
    if is_mutation(&mut request) {
        let mut response =
            bad_request(&state, "mutations must be sent with POST", graphql_response);
        *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    let request = request.data(client);
    run(&state, request, &headers, graphql_response).await
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
