//! The two protocols' messages and close codes, and how they differ, as data (`Dialect`):
//! the connection loop has one handler for both.

use serde::Deserialize;
use serde_json::{Value, json};

/// `Sec-WebSocket-Protocol` of the graphql-ws library.
pub const GRAPHQL_TRANSPORT_WS: &str = "graphql-transport-ws";
/// `Sec-WebSocket-Protocol` of the legacy subscriptions-transport-ws library.
pub const GRAPHQL_WS: &str = "graphql-ws";

/// Close codes of the graphql-transport-ws protocol, and RFC 6455's that we use.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const SERVICE_RESTART: u16 = 1012;
    pub const BAD_REQUEST: u16 = 4400;
    pub const UNAUTHORIZED: u16 = 4401;
    pub const FORBIDDEN: u16 = 4403;
    pub const INIT_TIMEOUT: u16 = 4408;
    pub const SUBSCRIBER_EXISTS: u16 = 4409;
    pub const TOO_MANY_INITS: u16 = 4429;
    /// RFC 6455: a message over the configured size.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// RFC 6455: a text message that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// RFC 6455: a frame that breaks the protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
}

/// Which of the two protocols a socket speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    TransportWs,
    Legacy,
}

impl Protocol {
    /// The protocol to speak given the client's offered subprotocols (comma-separated
    /// header values), preferring graphql-transport-ws; `None` for anything else.
    pub fn negotiate<'a>(offered: impl IntoIterator<Item = &'a str>) -> Option<Protocol> {
        let offered: Vec<&str> = offered
            .into_iter()
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .collect();
        if offered.contains(&GRAPHQL_TRANSPORT_WS) {
            Some(Protocol::TransportWs)
        } else if offered.contains(&GRAPHQL_WS) {
            Some(Protocol::Legacy)
        } else {
            None
        }
    }

    /// The subprotocol name.
    pub fn name(self) -> &'static str {
        self.dialect().name
    }

    /// How this protocol says things.
    pub(super) fn dialect(self) -> &'static Dialect {
        match self {
            Protocol::TransportWs => &TRANSPORT_WS,
            Protocol::Legacy => &LEGACY,
        }
    }
}

/// What the server does about a client's mistake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Answer {
    /// Close the socket with this code and reason.
    Close(u16, &'static str),
    /// Send an `error` with this message (for the operation's id, when there is one) and
    /// keep the socket.
    Error(&'static str),
}

/// Everything in which the two protocols differ.
#[derive(Debug)]
pub(super) struct Dialect {
    pub name: &'static str,
    /// The message type of a result.
    pub data: &'static str,
    /// The server's keep-alive.
    pub keep_alive: &'static str,
    /// Sent after `connection_ack` (the legacy protocol's first keep-alive).
    pub after_ack: Option<&'static str>,
    /// Whether clients answer keep-alives (so a silent one can be detected).
    pub clients_pong: bool,
    /// Whether a `connection_init` payload must be an object (or absent).
    pub init_payload_is_object: bool,
    /// Sent before closing with 4403 on a refused token.
    pub refused_token_notice: Option<&'static str>,
    /// A message that does not decode.
    pub unreadable: Answer,
    /// An operation before `connection_init` was accepted.
    pub before_init: Answer,
    /// An operation whose id is in use: true closes with 4409 (`Subscriber for <id> already
    /// exists`), false replaces the running operation.
    pub duplicate_id_closes: bool,
}

static TRANSPORT_WS: Dialect = Dialect {
    name: GRAPHQL_TRANSPORT_WS,
    data: "next",
    keep_alive: r#"{"type":"ping"}"#,
    after_ack: None,
    clients_pong: true,
    init_payload_is_object: true,
    refused_token_notice: None,
    unreadable: Answer::Close(close::BAD_REQUEST, "Invalid message received"),
    before_init: Answer::Close(close::UNAUTHORIZED, "Unauthorized"),
    duplicate_id_closes: true,
};

static LEGACY: Dialect = Dialect {
    name: GRAPHQL_WS,
    data: "data",
    keep_alive: r#"{"type":"ka"}"#,
    after_ack: Some(r#"{"type":"ka"}"#),
    clients_pong: false,
    init_payload_is_object: false,
    refused_token_notice: Some(r#"{"type":"connection_error","payload":{"message":"Forbidden"}}"#),
    unreadable: Answer::Error("Invalid message received"),
    before_init: Answer::Error("Send connection_init first"),
    duplicate_id_closes: false,
};

/// A client's message, in either protocol.
#[derive(Debug)]
pub(super) enum ClientMessage {
    Init(Option<Value>),
    Ping(Option<Value>),
    Pong,
    Start {
        id: String,
        payload: Box<async_graphql::Request>,
    },
    Stop {
        id: String,
    },
    Terminate,
}

impl ClientMessage {
    /// Decodes `text` as `protocol` has it; `None` for anything else.
    pub fn decode(protocol: Protocol, text: &str) -> Option<ClientMessage> {
        Some(match protocol {
            Protocol::TransportWs => match serde_json::from_str(text).ok()? {
                TransportMessage::ConnectionInit { payload } => ClientMessage::Init(payload),
                TransportMessage::Ping { payload } => ClientMessage::Ping(payload),
                TransportMessage::Pong {} => ClientMessage::Pong,
                TransportMessage::Subscribe { id, payload } => ClientMessage::Start { id, payload },
                TransportMessage::Complete { id } => ClientMessage::Stop { id },
            },
            Protocol::Legacy => match serde_json::from_str(text).ok()? {
                LegacyMessage::ConnectionInit { payload } => ClientMessage::Init(payload),
                LegacyMessage::Start { id, payload } => ClientMessage::Start { id, payload },
                LegacyMessage::Stop { id } => ClientMessage::Stop { id },
                LegacyMessage::ConnectionTerminate => ClientMessage::Terminate,
            },
        })
    }
}

/// Messages of graphql-transport-ws from the client.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum TransportMessage {
    ConnectionInit {
        #[serde(default)]
        payload: Option<Value>,
    },
    Ping {
        #[serde(default)]
        payload: Option<Value>,
    },
    Pong {},
    Subscribe {
        id: String,
        payload: Box<async_graphql::Request>,
    },
    Complete {
        id: String,
    },
}

/// Messages of the legacy protocol from the client.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum LegacyMessage {
    ConnectionInit {
        #[serde(default)]
        payload: Option<Value>,
    },
    Start {
        id: String,
        payload: Box<async_graphql::Request>,
    },
    Stop {
        id: String,
    },
    ConnectionTerminate,
}

/// The `authorization` value of a connection_init payload (the key in any letter case).
pub(super) fn authorization(payload: Option<&Value>) -> Option<&str> {
    payload?
        .as_object()?
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case("authorization"))
        .and_then(|(_, value)| value.as_str())
}

/// An `error` message: for operation `id` with `payload` (a list of GraphQL errors in
/// graphql-transport-ws, an object in the legacy protocol), or for the connection.
pub(super) fn error_message(id: Option<&str>, payload: Value) -> String {
    match id {
        Some(id) => json!({ "type": "error", "id": id, "payload": payload }),
        None => json!({ "type": "error", "payload": payload }),
    }
    .to_string()
}

/// `{"type":…,"id":…,"payload":…}` around a payload that is JSON text already (a shared
/// rendering): this runs once per event and subscriber, so it is only copying.
pub(super) fn raw_frame(kind: &str, quoted_id: &str, payload: &str) -> String {
    let mut text = String::with_capacity(30 + kind.len() + quoted_id.len() + payload.len());
    text.push_str(r#"{"type":""#);
    text.push_str(kind);
    text.push_str(r#"","id":"#);
    text.push_str(quoted_id);
    text.push_str(r#","payload":"#);
    text.push_str(payload);
    text.push('}');
    text
}

/// `{"type":…,"id":…,"payload":…}` as text.
pub(super) fn frame<P: serde::Serialize>(kind: &str, id: &str, payload: &P) -> String {
    #[derive(serde::Serialize)]
    struct Envelope<'a, P> {
        #[serde(rename = "type")]
        kind: &'a str,
        id: &'a str,
        payload: &'a P,
    }
    match serde_json::to_string(&Envelope { kind, id, payload }) {
        Ok(text) => text,
        Err(err) => {
            // Only a map with non-string keys fails; a GraphQL response has none.
            tracing::error!(error = %err, "a response could not be serialized");
            let internal = crate::graphql::error::coded(
                crate::graphql::error::code::INTERNAL_SERVER_ERROR,
                "internal error",
                None,
            );
            error_message(Some(id), json!([internal]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_prefers_the_current_protocol_and_refuses_others() {
        assert_eq!(
            Protocol::negotiate(["graphql-ws, graphql-transport-ws"]),
            Some(Protocol::TransportWs)
        );
        assert_eq!(Protocol::negotiate(["graphql-ws"]), Some(Protocol::Legacy));
        assert_eq!(Protocol::negotiate(["mqtt"]), None);
        assert_eq!(Protocol::negotiate([]), None);
    }

    /// Arbitrary JSON of the message shape: `type` from the protocol (or not), `id`,
    /// `payload` of any kind.
    fn message_like() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            ".{0,12}".prop_map(Value::from),
        ];
        let value = leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map("[a-z]{1,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        });
        let kind = prop_oneof![
            Just("connection_init"),
            Just("ping"),
            Just("pong"),
            Just("subscribe"),
            Just("complete"),
            Just("start"),
            Just("stop"),
            Just("connection_terminate"),
            Just("other"),
        ];
        (kind, ".{0,8}", value).prop_map(|(kind, id, payload)| {
            json!({ "type": kind, "id": id, "payload": payload }).to_string()
        })
    }

    proptest::proptest! {
        /// The decoders take any text (including any message-shaped JSON) without panicking,
        /// and `authorization` finds the token key of any payload or nothing.
        #[test]
        fn any_text_decodes_or_is_refused(text in ".*") {
            let _ = ClientMessage::decode(Protocol::TransportWs, &text);
            let _ = ClientMessage::decode(Protocol::Legacy, &text);
        }

        #[test]
        fn any_message_shaped_json_decodes_or_is_refused(text in message_like()) {
            let transport = ClientMessage::decode(Protocol::TransportWs, &text);
            let _ = ClientMessage::decode(Protocol::Legacy, &text);
            let value: Value = serde_json::from_str(&text).expect("generated JSON");
            let _ = authorization(value.get("payload"));
            // A subscribe decodes only with its id as sent (a payload without a query then
            // fails as an empty document and gets an `error`).
            if let Some(ClientMessage::Start { id, .. }) = transport {
                proptest::prop_assert_eq!(Some(id.as_str()), value["id"].as_str());
            }
        }
    }

    #[test]
    fn authorization_key_is_matched_in_any_case() {
        let payload = json!({ "Authorization": "Bearer x" });
        assert_eq!(authorization(Some(&payload)), Some("Bearer x"));
        let payload = json!({ "headers": { "authorization": "Bearer x" } });
        assert_eq!(authorization(Some(&payload)), None);
        assert_eq!(authorization(None), None);
    }

    #[test]
    fn client_messages_decode_per_protocol() {
        let subscribe = r#"{"type":"subscribe","id":"1","payload":{"query":"subscription { x }"}}"#;
        assert!(matches!(
            ClientMessage::decode(Protocol::TransportWs, subscribe),
            Some(ClientMessage::Start { id, .. }) if id == "1"
        ));
        assert!(ClientMessage::decode(Protocol::Legacy, subscribe).is_none());
        let start = r#"{"type":"start","id":"1","payload":{"query":"subscription { x }"}}"#;
        assert!(matches!(
            ClientMessage::decode(Protocol::Legacy, start),
            Some(ClientMessage::Start { id, .. }) if id == "1"
        ));
        assert!(ClientMessage::decode(Protocol::TransportWs, r#"{"type":"nope"}"#).is_none());
        assert!(
            ClientMessage::decode(Protocol::TransportWs, r#"{"type":"subscribe","id":"1"}"#)
                .is_none()
        );
        assert!(matches!(
            ClientMessage::decode(
                Protocol::TransportWs,
                r#"{"type":"pong","payload":{"x":1}}"#
            ),
            Some(ClientMessage::Pong)
        ));
    }
}
