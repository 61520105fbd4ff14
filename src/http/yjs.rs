//! The HTTP side of the y-websocket endpoint (`crate::collab` serves the socket): the
//! upgrade of `/yjs/{documentId}`, its connection permit, the token, the message limits.

use axum::extract::{Path, Query, State, WebSocketUpgrade};
use axum::http::{HeaderMap, header};
use axum::response::Response;

use super::{HttpState, WS_READ_BUFFER_BYTES, too_many_connections};

/// y-websocket's `WebsocketProvider` on `/yjs/{documentId}?access_token=...` (see
/// `collab::socket`). The token may come as an `Authorization: Bearer` header instead.
pub(super) async fn upgrade(
    State(state): State<HttpState>,
    Path(document): Path<String>,
    Query(params): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    // Taken before the upgrade, released when the connection ends.
    let Ok(permit) = state.connections.clone().try_acquire_owned() else {
        return too_many_connections(&state);
    };
    let token = params.get("access_token").cloned().or_else(|| {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::to_owned)
    });
    let endpoint = crate::collab::Endpoint {
        api: state.api.clone(),
        keys: state.keys.clone(),
        rooms: state.rooms.clone(),
        max_update_base64: state.max_document_update_bytes,
        keep_alive: state.ws.keep_alive,
        shutdown: state.shutdown.clone(),
    };
    let max = endpoint.max_message_bytes();
    upgrade
        .max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .on_upgrade(move |socket| async move {
            crate::collab::serve(socket, endpoint, document, token).await;
            drop(permit);
        })
}
