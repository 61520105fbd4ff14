//! A socket's writer: its own task, so that a client that reads slowly holds up only its own
//! socket. Control messages (ack, pong, keep-alives, protocol errors) go before results;
//! everything already queued goes out in one write.

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message as Frame, Utf8Bytes, WebSocket};
use futures_util::SinkExt;
use futures_util::stream::SplitSink;
use tokio::sync::mpsc;

/// What the server sends: a text frame, or a close frame that ends the connection.
pub(super) enum Outgoing {
    Text(String),
    /// Text frames written one after another into one buffer; each ends at its `ends`.
    Frames {
        bytes: Bytes,
        ends: Vec<usize>,
    },
    Close(u16, String),
}

/// Writes what `controls` (first) and `outgoing` bring until both close, the socket fails, or
/// a close frame has been sent.
pub(super) async fn write(
    mut sink: SplitSink<WebSocket, Frame>,
    mut controls: mpsc::Receiver<Outgoing>,
    mut outgoing: mpsc::Receiver<Outgoing>,
) {
    loop {
        let mut message = tokio::select! {
            biased;
            Some(message) = controls.recv() => message,
            Some(message) = outgoing.recv() => message,
            else => return,
        };
        // Everything already queued goes out in one write (one syscall for an event's
        // frames to all of this socket's subscriptions), control messages first.
        loop {
            match message {
                Outgoing::Text(text) => {
                    if sink.feed(Frame::Text(Utf8Bytes::from(text))).await.is_err() {
                        return;
                    }
                }
                Outgoing::Frames { bytes, ends } => {
                    let mut start = 0;
                    for end in ends {
                        // Slices of the one buffer: no copy until the socket's own.
                        let text = match Utf8Bytes::try_from(bytes.slice(start..end)) {
                            Ok(text) => text,
                            Err(err) => {
                                // Every frame is JSON text made of whole strings.
                                tracing::error!(error = %err, "a framed delivery is not UTF-8");
                                return;
                            }
                        };
                        start = end;
                        if sink.feed(Frame::Text(text)).await.is_err() {
                            return;
                        }
                    }
                }
                Outgoing::Close(code, reason) => {
                    let frame = CloseFrame {
                        code,
                        reason: Utf8Bytes::from(reason),
                    };
                    let _ = sink.send(Frame::Close(Some(frame))).await;
                    let _ = sink.close().await;
                    return;
                }
            }
            message = match controls.try_recv() {
                Ok(next) => next,
                Err(_) => match outgoing.try_recv() {
                    Ok(next) => next,
                    Err(_) => break,
                },
            };
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
}
