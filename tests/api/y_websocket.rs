//! The y-websocket endpoint `/yjs/{documentId}`, spoken to with y-protocols messages from yrs
//! over a real socket: refusals before any content, convergence, awareness (here and across
//! processes), removal, deletion, and a flooding peer that cannot starve the others. (The
//! unmodified `y-websocket` package's `WebsocketProvider` runs against it in
//! `clients::yjs_providers_*`.)

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use sea_orm::ConnectionTrait;
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use yrs::sync::awareness::{AwarenessUpdate, AwarenessUpdateEntry};
use yrs::sync::{Message, MessageReader, SyncMessage};
use yrs::updates::decoder::{Decode, DecoderV1};
use yrs::updates::encoder::Encode;
use yrs::{ClientID, Doc, GetString, ReadTxn, Text, Transact, Update};

use crate::both_backends;
use crate::helpers::{Backend, TestServer, data};
use crate::yjs::create_document;

/// How long a test waits for any one message.
const DEADLINE: Duration = Duration::from_secs(15);

/// What the server sent.
#[derive(Debug)]
enum Received {
    Messages(Vec<Message>),
    Close(u16),
}

/// A y-websocket peer: a yrs document synced over the socket.
struct YPeer {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    doc: Doc,
    /// Awareness states seen, by client id (`None`: removed).
    seen: HashMap<u64, Option<String>>,
    /// Binary messages received.
    received: usize,
}

impl YPeer {
    async fn open(addr: SocketAddr, document: &str, token: Option<&str>) -> YPeer {
        let url = match token {
            Some(token) => format!("ws://{addr}/yjs/{document}?access_token={token}"),
            None => format!("ws://{addr}/yjs/{document}"),
        };
        let (socket, _) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(url))
            .await
            .expect("handshake in time")
            .expect("the upgrade is accepted");
        YPeer {
            socket,
            doc: Doc::new(),
            seen: HashMap::new(),
            received: 0,
        }
    }

    /// Opens and syncs: answers the server's state vector, sends ours, and waits for the
    /// answer.
    async fn join(addr: SocketAddr, document: &str, token: &str) -> YPeer {
        let mut peer = Self::open(addr, document, Some(token)).await;
        let vector = peer.doc.transact().state_vector();
        peer.send(Message::Sync(SyncMessage::SyncStep1(vector)))
            .await;
        peer.until(|message| matches!(message, Message::Sync(SyncMessage::SyncStep2(_))))
            .await;
        peer
    }

    fn text(&self) -> String {
        self.doc
            .get_or_insert_text("body")
            .get_string(&self.doc.transact())
    }

    async fn send(&mut self, message: Message) {
        self.send_bytes(message.encode_v1()).await;
    }

    async fn send_bytes(&mut self, bytes: Vec<u8>) {
        self.socket
            .send(WsMessage::Binary(bytes.into()))
            .await
            .expect("sent");
    }

    /// Types `chunk` at byte `at` and sends the update.
    async fn type_at(&mut self, at: u32, chunk: &str) {
        let update = {
            let text = self.doc.get_or_insert_text("body");
            let mut t = self.doc.transact_mut();
            text.insert(&mut t, at, chunk);
            t.encode_update_v1()
        };
        self.send(Message::Sync(SyncMessage::Update(update))).await;
    }

    async fn say(&mut self, client: u64, clock: u32, state: &str) {
        let mut clients = HashMap::new();
        let entry = AwarenessUpdateEntry {
            clock,
            json: state.into(),
        };
        clients.insert(ClientID::new(client), entry);
        self.send(Message::Awareness(AwarenessUpdate { clients }))
            .await;
    }

    /// The next thing the server sends; a sync message is applied, the answer to a state
    /// vector sent, awareness recorded.
    async fn recv(&mut self) -> Received {
        loop {
            let frame = tokio::time::timeout(DEADLINE, self.socket.next())
                .await
                .expect("the server sends something in time");
            let bytes = match frame {
                Some(Ok(WsMessage::Binary(bytes))) => bytes,
                Some(Ok(WsMessage::Close(frame))) => {
                    return Received::Close(frame.map_or(1005, |f| u16::from(f.code)));
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Received::Close(1006),
            };
            self.received += 1;
            let mut decoder = DecoderV1::from(bytes.as_ref());
            let messages: Vec<Message> = MessageReader::new(&mut decoder)
                .collect::<Result<_, _>>()
                .expect("y-protocols messages");
            for message in &messages {
                match message {
                    Message::Sync(SyncMessage::SyncStep1(vector)) => {
                        let answer = self.doc.transact().encode_diff_v1(vector);
                        self.send(Message::Sync(SyncMessage::SyncStep2(answer)))
                            .await;
                    }
                    Message::Sync(SyncMessage::SyncStep2(update))
                    | Message::Sync(SyncMessage::Update(update)) => {
                        let update = Update::decode_v1(update).expect("an update");
                        self.doc
                            .transact_mut()
                            .apply_update(update)
                            .expect("applies");
                    }
                    Message::Awareness(update) => {
                        for (client, entry) in &update.clients {
                            let state = (&*entry.json != "null").then(|| entry.json.to_string());
                            self.seen.insert(client.get(), state);
                        }
                    }
                    _ => {}
                }
            }
            return Received::Messages(messages);
        }
    }

    /// Receives until a message matches.
    async fn until(&mut self, wanted: impl Fn(&Message) -> bool) {
        loop {
            match self.recv().await {
                Received::Messages(messages) if messages.iter().any(&wanted) => return,
                Received::Messages(_) => {}
                Received::Close(code) => panic!("closed with {code} while waiting"),
            }
        }
    }

    /// Receives until the text is `text`.
    async fn until_text(&mut self, text: &str) {
        while self.text() != text {
            if let Received::Close(code) = self.recv().await {
                panic!(
                    "closed with {code} before the text was {text:?} (it is {:?})",
                    self.text()
                );
            }
        }
    }

    /// Receives until the awareness state of `client` is `state` (`None`: removed).
    async fn until_awareness(&mut self, client: u64, state: Option<&str>) {
        while self.seen.get(&client).map(Option::as_deref) != Some(state) {
            if let Received::Close(code) = self.recv().await {
                panic!("closed with {code} before client {client}'s state was {state:?}");
            }
        }
    }

    /// Receives until the server closes; returns the code.
    async fn until_closed(&mut self) -> u16 {
        loop {
            if let Received::Close(code) = self.recv().await {
                return code;
            }
        }
    }
}

async fn stored_body(server: &TestServer, token: &str, id: &str) -> String {
    let read = server
        .graphql_as(
            token,
            "query($id: ID!) { document(id: $id) { body } }",
            json!({ "id": id }),
        )
        .await;
    data(&read, "document")["body"].as_str().unwrap().to_owned()
}

both_backends! {
    async fn no_token_gets_4401_and_a_non_member_4403_before_any_content(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let (bob, _) = server.sign_up("Bob").await;
        let channel = server.create_channel(&ada, "docs").await;
        let id = create_document(&server, &ada, &channel, "secret plans").await;
        let expired = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOjEsImV4cCI6MX0.invalid";
        let cases = [
            (id.as_str(), None, 4401),
            (id.as_str(), Some(expired), 4401),
            (id.as_str(), Some(bob.as_str()), 4403),
            ("999999", Some(ada.as_str()), 4403),
            ("not-a-number", Some(ada.as_str()), 4403),
        ];
        for (document, token, code) in cases {
            let mut peer = YPeer::open(server.addr, document, token).await;
            assert_eq!(peer.until_closed().await, code, "{document} {token:?}");
            assert_eq!(peer.received, 0, "no content before the close");
        }
    }

    async fn peers_converge_through_sql_and_awareness_comes_and_goes(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "docs").await;
        let id = create_document(&server, &ada, &channel, "hello").await;
        let mut a = YPeer::join(server.addr, &id, &ada).await;
        let mut b = YPeer::join(server.addr, &id, &ada).await;
        assert_eq!(a.text(), "hello");
        assert_eq!(b.text(), "hello");

        // Both type at the same position at once: both keystrokes are kept, in one order.
        a.type_at(0, "A").await;
        b.type_at(0, "B").await;
        a.until(|_| true).await;
        let merged = loop {
            let text = a.text();
            if text.len() == 7 { break text; }
            a.recv().await;
        };
        assert!(merged == "ABhello" || merged == "BAhello", "{merged}");
        b.until_text(&merged).await;
        assert_eq!(stored_body(&server, &ada, &id).await, merged, "stored in SQL");
        // What an operator sees: two peers, and the updates stored (one write may hold several).
        let metrics = server.metrics().await;
        let sample = |name| crate::observability::sample(&metrics, name).unwrap_or_else(|| panic!("{name}: {metrics}"));
        assert_eq!(sample("syncgraph_yjs_peers"), 2.0);
        assert_eq!(sample("syncgraph_yjs_updates_stored_total"), 2.0);
        let writes = sample("syncgraph_yjs_writes_total");
        assert!((1.0..=2.0).contains(&writes), "{writes}");

        // An API write and an SQL write reach the peers as edits.
        let apply = "mutation($id: ID!, $b: String!, $v: Int!) { updateDocument(input: { id: $id, body: $b, expectedVersion: $v }) { version } }";
        let version = 3; // created (1), then one per keystroke
        let written = server.graphql_as(&ada, apply, json!({ "id": id, "b": format!("{merged}!"), "v": version })).await;
        assert_eq!(data(&written, "updateDocument")["version"], 4);
        a.until_text(&format!("{merged}!")).await;
        server.sql().await.execute_unprepared(&format!("UPDATE documents SET body = 'rewritten by SQL' WHERE id = {id}")).await.unwrap();
        a.until_text("rewritten by SQL").await;
        b.until_text("rewritten by SQL").await;

        // Awareness: A's cursor reaches B, and A too (y-websocket closes a connection that
        // hears nothing for 30 s: a lone peer hears its own renewals); when A's socket closes
        // B is told at once.
        a.say(7, 1, r#"{"user":{"name":"Ada"},"cursor":3}"#).await;
        b.until_awareness(7, Some(r#"{"user":{"name":"Ada"},"cursor":3}"#)).await;
        a.until_awareness(7, Some(r#"{"user":{"name":"Ada"},"cursor":3}"#)).await;
        // A state that is not JSON is not passed on (it would throw in the others' clients).
        a.say(8, 1, "{not json").await;
        a.say(7, 2, r#"{"user":{"name":"Ada"},"cursor":4}"#).await;
        b.until_awareness(7, Some(r#"{"user":{"name":"Ada"},"cursor":4}"#)).await;
        assert!(!b.seen.contains_key(&8), "the state that is not JSON was dropped");
        // A later peer is told who is here when it joins.
        let mut c = YPeer::join(server.addr, &id, &ada).await;
        c.until_awareness(7, Some(r#"{"user":{"name":"Ada"},"cursor":4}"#)).await;
        assert_eq!(c.text(), "rewritten by SQL");
        drop(a);
        b.until_awareness(7, None).await;
        c.until_awareness(7, None).await;
        let stored = crate::yjs::count(&server, "SELECT COUNT(*) AS n FROM document_updates").await;
        assert!(stored >= 5, "every edit is a stored update ({stored})");
    }

    async fn a_removed_member_and_a_deleted_document_close_with_4403(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let (bob, bob_id) = server.sign_up("Bob").await;
        let channel = server.create_channel(&ada, "docs").await;
        server.add_member(&ada, &channel, &bob_id).await;
        let id = create_document(&server, &ada, &channel, "shared").await;
        let mut bobs = YPeer::join(server.addr, &id, &bob).await;
        let mut adas = YPeer::join(server.addr, &id, &ada).await;
        let sql = server.sql().await;
        sql.execute_unprepared(&format!("DELETE FROM channel_members WHERE channel_id = {channel} AND user_id = {bob_id}")).await.unwrap();
        assert_eq!(bobs.until_closed().await, 4403);
        sql.execute_unprepared(&format!("DELETE FROM documents WHERE id = {id}")).await.unwrap();
        assert_eq!(adas.until_closed().await, 4403);
    }

    async fn bad_messages_close_the_socket_and_store_nothing(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "docs").await;
        let id = create_document(&server, &ada, &channel, "text").await;
        let stored = || async {
            crate::yjs::count(&server, &format!("SELECT COUNT(*) AS n FROM document_updates WHERE document_id = {id}")).await
        };
        let before = stored().await;
        // Not y-protocols; an update that is not Yjs; a text message; an update that writes
        // another shared type.
        let other_type = {
            let doc = Doc::new();
            let map = doc.get_or_insert_map("other");
            let mut t = doc.transact_mut();
            yrs::Map::insert(&map, &mut t, "k", "v");
            t.encode_update_v1()
        };
        let many_in_one_frame: Vec<u8> = (0..17).flat_map(|_| Message::AwarenessQuery.encode_v1()).collect();
        let nul = {
            let doc = Doc::new();
            let text = doc.get_or_insert_text("body");
            let mut t = doc.transact_mut();
            text.insert(&mut t, 0, "\0");
            t.encode_update_v1()
        };
        let cases: Vec<(WsMessage, u16)> = vec![
            (WsMessage::Binary(many_in_one_frame.into()), 4400),
            (WsMessage::Binary(Message::Sync(SyncMessage::Update(nul)).encode_v1().into()), 4400),
            (WsMessage::Binary(Message::Sync(SyncMessage::Update(vec![0; 300 * 1024])).encode_v1().into()), 4413),
            (WsMessage::Binary(vec![0, 9, 9].into()), 4400),
            (WsMessage::Binary(Message::Sync(SyncMessage::Update(vec![1, 2, 3])).encode_v1().into()), 4400),
            (WsMessage::Text("hello".into()), 4400),
            (WsMessage::Binary(Message::Sync(SyncMessage::Update(other_type)).encode_v1().into()), 4400),
        ];
        for (message, code) in cases {
            let mut peer = YPeer::join(server.addr, &id, &ada).await;
            peer.socket.send(message).await.unwrap();
            assert_eq!(peer.until_closed().await, code);
        }
        assert_eq!(stored().await, before, "nothing was stored");
        assert_eq!(stored_body(&server, &ada, &id).await, "text");
    }

    async fn a_peer_that_stops_answering_is_dropped_and_the_others_are_told(server: TestServer) {
        // The test servers ping every second (`--ws-keep-alive-secs 1`); a peer that answers
        // nothing for three pings is gone.
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "docs").await;
        let id = create_document(&server, &ada, &channel, "").await;
        let mut silent = YPeer::join(server.addr, &id, &ada).await;
        let mut b = YPeer::join(server.addr, &id, &ada).await;
        silent.say(21, 1, r#"{"user":"silent"}"#).await;
        b.until_awareness(21, Some(r#"{"user":"silent"}"#)).await;
        // `silent` reads nothing from now on, so it answers no ping (its socket stays open
        // on its side: a half-open connection, as after a lost network). B reads, so it
        // answers every ping, and stays.
        let started = std::time::Instant::now();
        b.until_awareness(21, None).await;
        assert!(started.elapsed() >= std::time::Duration::from_secs(2), "not before three pings");
        b.type_at(0, "still here").await;
        b.until_text("still here").await;
        drop(silent);
    }

    async fn a_flooding_peer_is_slowed_and_cannot_starve_the_others(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "docs").await;
        let id = create_document(&server, &ada, &channel, "").await;
        let mut flood = YPeer::join(server.addr, &id, &ada).await;
        let mut a = YPeer::join(server.addr, &id, &ada).await;
        let mut b = YPeer::join(server.addr, &id, &ada).await;
        // 1,000 awareness updates sent as fast as the socket takes them.
        let started = std::time::Instant::now();
        let flooding = tokio::spawn(async move {
            for clock in 1..=1000u32 {
                flood.say(99, clock, &format!(r#"{{"cursor":{clock}}}"#)).await;
            }
            flood
        });
        // Meanwhile A's edits reach B.
        for n in 0..5 {
            a.type_at(n, "x").await;
        }
        b.until_text("xxxxx").await;
        let elapsed = started.elapsed().as_secs_f64();
        // What B heard of the flood so far is bounded by the socket's rate, not by the flood.
        let heard = b.received;
        assert!(
            (heard as f64) < 100.0 + 50.0 * (elapsed + 1.0) + 20.0,
            "B got {heard} messages in {elapsed:.2} s"
        );
        let flood = tokio::time::timeout(Duration::from_secs(60), flooding).await.expect("the flood is read eventually").unwrap();
        drop(flood);
    }
}

/// Awareness and edits reach a peer on another process of the same database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs SYNCGRAPH_TEST_POSTGRES (a PostgreSQL server URL)"
)]
async fn awareness_and_edits_cross_processes() {
    crate::helpers::run(Backend::Postgres, |server: TestServer| async move {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "docs").await;
        let id = create_document(&server, &ada, &channel, "shared").await;
        let other = server.start_peer().await;
        let mut here = YPeer::join(server.addr, &id, &ada).await;
        let mut there = YPeer::join(other.addr, &id, &ada).await;
        here.type_at(6, " notes").await;
        there.until_text("shared notes").await;
        there.type_at(0, ">").await;
        here.until_text(">shared notes").await;
        here.say(11, 1, r#"{"user":"here"}"#).await;
        there.until_awareness(11, Some(r#"{"user":"here"}"#)).await;
        there.say(12, 1, r#"{"user":"there"}"#).await;
        here.until_awareness(12, Some(r#"{"user":"there"}"#)).await;
        drop(here);
        there.until_awareness(11, None).await;
        other.stop().await;
    })
    .await;
}
