//! The y-protocols messages y-websocket speaks (sync and awareness), read and written with
//! yrs's `sync::protocol`, and the endpoint's close codes.
//!
//! Reading runs inside `catch_unwind`: yrs's decoders panic on some malformed input (a
//! client id past 53 bits trips an assertion), and a peer's bytes must never take the
//! server down.

use yrs::StateVector;
use yrs::sync::awareness::AwarenessUpdate;
use yrs::sync::{Message, MessageReader, SyncMessage};
use yrs::updates::decoder::{Decode, DecoderV1};
use yrs::updates::encoder::Encode;

/// The socket's token is missing, invalid or expired.
pub const UNAUTHORIZED: u16 = 4401;
/// Not a member of the document's channel, or no such document (or no longer).
pub const FORBIDDEN: u16 = 4403;
/// A message that is not y-protocols, or an update the document cannot take.
pub const BAD_MESSAGE: u16 = 4400;
/// The user has too many open subscriptions (a y-websocket socket counts as one).
pub const TOO_MANY: u16 = 4429;
/// A message over the size limit. In the 44xx range, which y-websocket does not retry: its
/// next connection would send the same state again (1009 would make it try for ever).
pub const TOO_BIG: u16 = 4413;
/// The server failed; try again.
pub const INTERNAL: u16 = 1011;
/// The server is restarting; reconnect.
pub const RESTARTING: u16 = 1012;

/// What a peer said.
#[derive(Debug)]
pub enum Incoming {
    /// Its state vector: answer with what it lacks.
    SyncStep1(StateVector),
    /// A Yjs update (an answer to our state vector, or an edit).
    Update(Vec<u8>),
    Awareness(AwarenessUpdate),
    /// Asks for every awareness state known.
    AwarenessQuery,
    /// Anything else (auth, custom messages): ignored, as y-websocket's server does.
    Other,
}

/// The messages of one WebSocket message, or `None` when it does not decode.
pub fn decode(bytes: &[u8]) -> Option<Vec<Incoming>> {
    let read = || {
        let mut decoder = DecoderV1::from(bytes);
        MessageReader::new(&mut decoder)
            .map(|message| {
                message.map(|message| match message {
                    Message::Sync(SyncMessage::SyncStep1(vector)) => Incoming::SyncStep1(vector),
                    Message::Sync(SyncMessage::SyncStep2(update))
                    | Message::Sync(SyncMessage::Update(update)) => Incoming::Update(update),
                    Message::Awareness(update) => Incoming::Awareness(update),
                    Message::AwarenessQuery => Incoming::AwarenessQuery,
                    Message::Auth(_) | Message::Custom(..) => Incoming::Other,
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .ok()
    };
    std::panic::catch_unwind(read).ok().flatten()
}

/// An awareness update's bytes (as relayed between processes), or `None`.
pub fn decode_awareness(bytes: &[u8]) -> Option<AwarenessUpdate> {
    std::panic::catch_unwind(|| AwarenessUpdate::decode_v1(bytes).ok())
        .ok()
        .flatten()
}

/// Our state vector: the peer answers with what we lack.
pub fn sync_step1(vector: StateVector) -> Vec<u8> {
    Message::Sync(SyncMessage::SyncStep1(vector)).encode_v1()
}

/// What the peer lacks, answering its state vector.
pub fn sync_step2(update: Vec<u8>) -> Vec<u8> {
    Message::Sync(SyncMessage::SyncStep2(update)).encode_v1()
}

/// An update of the document.
pub fn update(update: Vec<u8>) -> Vec<u8> {
    Message::Sync(SyncMessage::Update(update)).encode_v1()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn messages_read_back() {
        let vector = StateVector::default();
        let mut bytes = sync_step1(vector.clone());
        bytes.extend(update(vec![0, 0]));
        let read = decode(&bytes).expect("decodes");
        assert!(
            matches!(&read[..], [Incoming::SyncStep1(v), Incoming::Update(u)] if *v == vector && u == &[0, 0])
        );
        assert!(decode(&[0, 9]).is_none(), "an unknown sync message");
    }

    proptest! {
        // Whatever a peer sends, reading it returns (never panics).
        #[test]
        fn any_bytes_are_read_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
            let _ = decode_awareness(&bytes);
        }

        #[test]
        fn mutated_awareness_is_read_or_refused(
            clients in proptest::collection::vec((any::<u64>(), any::<u32>(), "[a-z{}\":]{0,20}"), 0..4),
            flip in any::<usize>(),
        ) {
            let mut bytes = Vec::new();
            let mut encoder = yrs::updates::encoder::EncoderV1::new();
            use yrs::encoding::write::Write;
            use yrs::updates::encoder::Encoder;
            encoder.write_var(1u8);
            let mut inner = yrs::updates::encoder::EncoderV1::new();
            inner.write_var(clients.len());
            for (client, clock, json) in &clients {
                inner.write_var(*client);
                inner.write_var(*clock);
                inner.write_string(json);
            }
            encoder.write_buf(inner.to_vec());
            bytes.extend(encoder.to_vec());
            if !bytes.is_empty() {
                let at = flip % bytes.len();
                bytes[at] ^= 0x55;
            }
            let _ = decode(&bytes);
        }
    }
}
