//! Awareness (cursors, presence): relayed among a document's peers, never stored.
//!
//! Each process keeps, per document with peers connected here, the latest awareness state of
//! every client it heard of (its own sockets' clients and, through PostgreSQL, the other
//! processes'), so that a peer that joins is told who is there. A state passes on only when
//! its clock is newer than the one known (y-protocols' rule), so echoes and stale relays stop.
//! When a socket closes, its clients' states are removed and every peer is told at once
//! (a `null` state with the next clock), here and on the other processes. Removed states
//! are kept as tombstones (their clock) until they expire with the states not renewed for
//! 30 s.
//!
//! Across processes (PostgreSQL): `NOTIFY syncgraph_awareness` carries
//! `<process>:<document>:<base64 update>`, or `<process>:<document>:?` when a document's room
//! opens on a process (the others answer with their peers' states); every process LISTENs on the same connection as
//! the change feed's doorbell (`changes::listener`) and hands the payload to
//! `Rooms::receive_remote`. A NOTIFY lost while a listener reconnects only delays a cursor:
//! clients send their state again every 15 s (y-protocols), and forget a state not renewed
//! for 30 s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sea_orm::{ConnectionTrait, DatabaseBackend, DatabaseConnection, Statement, Value};
use tokio::sync::{broadcast, mpsc, watch};
use yrs::ClientID;
use yrs::sync::Message;
use yrs::sync::awareness::{AwarenessUpdate, AwarenessUpdateEntry};
use yrs::updates::encoder::Encode;

/// The NOTIFY channel of awareness between processes.
pub const CHANNEL: &str = "syncgraph_awareness";

/// The largest awareness update a socket may send, in bytes (a NOTIFY payload holds at most
/// 8,000 bytes; its base64 must fit). Cursors and names take a few hundred.
pub const MAX_UPDATE_BYTES: usize = 4 * 1024;

/// The Yjs clients one socket may speak for at once, removed ones included until they
/// expire (a page has one; a few reloads' worth is allowed).
const MAX_CLIENTS_PER_SOCKET: usize = 8;

/// The largest NOTIFY payload sent (PostgreSQL takes up to 8,000 bytes).
const MAX_NOTIFY_BYTES: usize = 7_900;

/// The payload part that asks the other processes for a document's states.
const QUERY: &str = "?";

/// A state not renewed for this long is no longer sent to joining peers (y-protocols' own
/// timeout; live clients renew every 15 s).
const OUTDATED: Duration = Duration::from_secs(30);

/// Relayed messages a peer may fall behind by before it misses some (it then only misses
/// intermediate cursor positions: the next state supersedes them).
const ROOM_CAPACITY: usize = 256;

/// NOTIFYs waiting to be sent; past this, awareness to other processes is dropped (and logged).
const RELAY_QUEUE: usize = 1024;

/// Who a client's state came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    /// A socket of this process.
    Socket(u64),
    /// Another process.
    Remote,
}

struct Entry {
    clock: u32,
    json: Arc<str>,
    owner: Owner,
    renewed: Instant,
}

/// An awareness message for every peer of a room (its sender too).
pub struct Relayed {
    pub message: Arc<Vec<u8>>,
}

struct Room {
    states: HashMap<u64, Entry>,
    peers: broadcast::Sender<Arc<Relayed>>,
    /// When states and tombstones not renewed for `OUTDATED` were last dropped.
    swept: Instant,
}

impl Room {
    fn new() -> Self {
        Room {
            states: HashMap::new(),
            peers: broadcast::channel(ROOM_CAPACITY).0,
            swept: Instant::now(),
        }
    }

    /// Drops states and tombstones not renewed for `OUTDATED` (peers forget them too), at
    /// most once per `OUTDATED`: the map holds what was said in the last minute, at most.
    fn sweep(&mut self, now: Instant) {
        if now.duration_since(self.swept) < OUTDATED {
            return;
        }
        self.states
            .retain(|_, entry| now.duration_since(entry.renewed) < OUTDATED);
        self.swept = now;
    }

    /// The clients whose states `socket` sent, its removals (tombstones) included, until
    /// they expire: what one socket may add to the room is bounded.
    fn clients_of(&self, socket: u64) -> usize {
        self.states
            .values()
            .filter(|entry| entry.owner == Owner::Socket(socket))
            .count()
    }
}

/// The rooms of this process, by document.
pub struct Rooms {
    rooms: Mutex<HashMap<i64, Room>>,
    /// Tells this process's identity apart in relayed payloads.
    process: u64,
    /// To the task that NOTIFYs the other processes (PostgreSQL).
    relay: Option<mpsc::Sender<String>>,
}

/// A peer's place in a room (left by `Rooms::leave`).
pub struct Membership {
    pub receiver: broadcast::Receiver<Arc<Relayed>>,
    /// The awareness message holding every state known now, to send the new peer first.
    pub known: Option<Vec<u8>>,
}

impl Rooms {
    /// Rooms relaying to other processes through `db` when it is PostgreSQL, by the
    /// returned task, which runs until `stop` turns true.
    pub fn new(
        db: &DatabaseConnection,
        stop: watch::Receiver<bool>,
    ) -> (Arc<Rooms>, Option<impl Future<Output = ()> + use<>>) {
        use argon2::password_hash::rand_core::{OsRng, RngCore};
        let process = OsRng.next_u64();
        let (relay, task) = if db.get_database_backend() == DatabaseBackend::Postgres {
            let (sender, receiver) = mpsc::channel(RELAY_QUEUE);
            (Some(sender), Some(notify(db.clone(), receiver, stop)))
        } else {
            (None, None)
        };
        let rooms = Arc::new(Rooms {
            rooms: Mutex::default(),
            process,
            relay,
        });
        (rooms, task)
    }

    fn rooms(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Room>> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Joins `document`'s room. A room new to this process asks the other processes for
    /// the states of their peers (they answer as they would relay them), so a peer that is
    /// the first here still hears at once of those already there.
    pub fn join(&self, document: i64) -> Membership {
        let mut rooms = self.rooms();
        let mut created = false;
        let room = rooms.entry(document).or_insert_with(|| {
            created = true;
            Room::new()
        });
        let membership = Membership {
            receiver: room.peers.subscribe(),
            known: known(room),
        };
        drop(rooms);
        if created {
            self.notify(format!("{}:{document}:{QUERY}", self.process));
        }
        membership
    }

    /// The awareness message holding every state known in `document`'s room, if any.
    pub fn known(&self, document: i64) -> Option<Vec<u8>> {
        known(self.rooms().get(&document)?)
    }

    /// A socket's awareness update: the states newer than those known are kept and passed
    /// on to the room's peers (the sender too), here and on the other processes.
    pub fn publish(&self, document: i64, socket: u64, update: AwarenessUpdate) {
        let Some(fresh) = self.merge(document, Owner::Socket(socket), update) else {
            return;
        };
        self.relay(document, &fresh);
        self.send(document, fresh);
    }

    /// Another process's awareness update (a NOTIFY payload).
    pub fn receive_remote(&self, payload: &str) {
        let mut parts = payload.splitn(3, ':');
        let (Some(process), Some(document), Some(update)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return;
        };
        if process.parse::<u64>().ok() == Some(self.process) {
            return;
        }
        let Ok(document) = document.parse::<i64>() else {
            return;
        };
        if update == QUERY {
            self.answer(document);
            return;
        }
        if !self.rooms().contains_key(&document) {
            return;
        }
        let Some(update) = STANDARD
            .decode(update)
            .ok()
            .and_then(|bytes| super::protocol::decode_awareness(&bytes))
        else {
            return;
        };
        if let Some(fresh) = self.merge(document, Owner::Remote, update) {
            self.send(document, fresh);
        }
    }

    /// A socket left: its clients' states are removed and the room's peers told so at once;
    /// the room ends with its last local peer.
    pub fn leave(&self, document: i64, socket: u64) {
        let removed = {
            let mut rooms = self.rooms();
            let Some(room) = rooms.get_mut(&document) else {
                return;
            };
            let mut removed = HashMap::new();
            for (&client, entry) in room.states.iter_mut() {
                if entry.owner != Owner::Socket(socket) || &*entry.json == "null" {
                    continue;
                }
                entry.clock = entry.clock.wrapping_add(1);
                entry.json = Arc::from("null");
                let gone = AwarenessUpdateEntry {
                    clock: entry.clock,
                    json: entry.json.clone(),
                };
                removed.insert(ClientID::new(client), gone);
            }
            // The leaving socket's receiver is already dropped.
            if room.peers.receiver_count() == 0 {
                rooms.remove(&document);
            }
            removed
        };
        if removed.is_empty() {
            return;
        }
        let update = AwarenessUpdate { clients: removed };
        self.relay(document, &update);
        self.send(document, update);
    }

    /// Keeps what is newer in `update` than the states known, by y-protocols' rule (a
    /// higher clock, or a removal at the same clock of a state still there); returns it, or
    /// `None` when nothing was. Removed states stay as tombstones with their clock, so a
    /// removal or a state echoed back by a peer (y-websocket sends every change it applies,
    /// whoever made it) is not taken again: no loop.
    fn merge(
        &self,
        document: i64,
        owner: Owner,
        update: AwarenessUpdate,
    ) -> Option<AwarenessUpdate> {
        let mut rooms = self.rooms();
        let room = rooms.get_mut(&document)?;
        let now = Instant::now();
        room.sweep(now);
        let mut fresh = HashMap::new();
        for (client, entry) in update.clients {
            let removal = &*entry.json == "null";
            // Relayed to other clients' JSON.parse: it must be JSON.
            if !removal && serde_json::from_str::<serde::de::IgnoredAny>(&entry.json).is_err() {
                continue;
            }
            let new_client = !room.states.contains_key(&client.get());
            // The removal of a client nobody knows changes nothing (y-protocols ignores it
            // too); keeping it as a tombstone would let a peer fill the room with them.
            if new_client && removal {
                continue;
            }
            if new_client
                && let Owner::Socket(socket) = owner
                && room.clients_of(socket) >= MAX_CLIENTS_PER_SOCKET
            {
                continue;
            }
            let known = room.states.get(&client.get());
            let current = known.map_or(0, |known| known.clock);
            let present = known.is_some_and(|known| &*known.json != "null");
            if !(current < entry.clock || (current == entry.clock && removal && present)) {
                continue;
            }
            room.states.insert(
                client.get(),
                Entry {
                    clock: entry.clock,
                    json: entry.json.clone(),
                    owner,
                    renewed: now,
                },
            );
            fresh.insert(client, entry);
        }
        (!fresh.is_empty()).then_some(AwarenessUpdate { clients: fresh })
    }

    fn send(&self, document: i64, update: AwarenessUpdate) {
        let rooms = self.rooms();
        if let Some(room) = rooms.get(&document) {
            let message = Arc::new(Message::Awareness(update).encode_v1());
            // No receiver is fine: nobody else is here.
            let _ = room.peers.send(Arc::new(Relayed { message }));
        }
    }

    /// Another process asked for `document`'s states: relays those of this process's peers.
    fn answer(&self, document: i64) {
        let ours: HashMap<ClientID, AwarenessUpdateEntry> = {
            let rooms = self.rooms();
            let Some(room) = rooms.get(&document) else {
                return;
            };
            room.states
                .iter()
                .filter(|(_, entry)| matches!(entry.owner, Owner::Socket(_)))
                .filter(|(_, entry)| &*entry.json != "null")
                .map(|(&client, entry)| {
                    let entry = AwarenessUpdateEntry {
                        clock: entry.clock,
                        json: entry.json.clone(),
                    };
                    (ClientID::new(client), entry)
                })
                .collect()
        };
        if !ours.is_empty() {
            self.relay(document, &AwarenessUpdate { clients: ours });
        }
    }

    /// Relays `update` to the other processes, in as many NOTIFYs as its size needs (one
    /// client's state is at most `MAX_UPDATE_BYTES`, so each fits).
    fn relay(&self, document: i64, update: &AwarenessUpdate) {
        if self.relay.is_none() {
            return;
        }
        let prefix = format!("{}:{document}:", self.process);
        let mut chunk = HashMap::new();
        let mut size = 0;
        for (client, entry) in &update.clients {
            // Base64 of the client's part: its id and clock (at most 15 bytes) and its JSON.
            let part = (entry.json.len() + 16).div_ceil(3) * 4;
            if !chunk.is_empty() && prefix.len() + size + part > MAX_NOTIFY_BYTES {
                self.notify_update(&prefix, std::mem::take(&mut chunk));
                size = 0;
            }
            chunk.insert(*client, entry.clone());
            size += part;
        }
        if !chunk.is_empty() {
            self.notify_update(&prefix, chunk);
        }
    }

    fn notify_update(&self, prefix: &str, clients: HashMap<ClientID, AwarenessUpdateEntry>) {
        let update = AwarenessUpdate { clients };
        self.notify(format!("{prefix}{}", STANDARD.encode(update.encode_v1())));
    }

    fn notify(&self, payload: String) {
        let Some(relay) = &self.relay else { return };
        if relay.try_send(payload).is_err() {
            tracing::warn!("awareness to other processes is falling behind; dropped one update");
        }
    }

    /// Peers connected here to `document` (tests and metrics).
    pub fn peers(&self, document: i64) -> usize {
        self.rooms()
            .get(&document)
            .map_or(0, |room| room.peers.receiver_count())
    }
}

/// The awareness message holding every state of `room` still renewed, if any.
fn known(room: &Room) -> Option<Vec<u8>> {
    let now = Instant::now();
    let clients: HashMap<ClientID, AwarenessUpdateEntry> = room
        .states
        .iter()
        .filter(|(_, entry)| &*entry.json != "null" && now.duration_since(entry.renewed) < OUTDATED)
        .map(|(&client, entry)| {
            (
                ClientID::new(client),
                AwarenessUpdateEntry {
                    clock: entry.clock,
                    json: entry.json.clone(),
                },
            )
        })
        .collect();

    (!clients.is_empty()).then(|| Message::Awareness(AwarenessUpdate { clients }).encode_v1())
}

/// What the LISTEN connection hands the awareness channel's payloads to.
pub fn relay(rooms: &Arc<Rooms>) -> crate::changes::Relay {
    let rooms = rooms.clone();
    (
        CHANNEL,
        Arc::new(move |payload: &str| rooms.receive_remote(payload)),
    )
}

/// Sends each queued payload as a NOTIFY, in order, until `stop` turns true.
async fn notify(
    db: DatabaseConnection,
    mut queue: mpsc::Receiver<String>,
    mut stop: watch::Receiver<bool>,
) {
    let sql = format!("SELECT pg_notify('{CHANNEL}', $1)");
    loop {
        let payload = tokio::select! {
            payload = queue.recv() => payload,
            _ = stop.changed() => None,
        };
        let Some(payload) = payload else { return };
        let statement =
            Statement::from_sql_and_values(DatabaseBackend::Postgres, &sql, [Value::from(payload)]);
        if let Err(err) = db.execute_raw(statement).await {
            tracing::warn!(error = %err, "cannot relay awareness to the other processes");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rooms_with_relay() -> (Rooms, mpsc::Receiver<String>) {
        let (sender, receiver) = mpsc::channel(RELAY_QUEUE);
        let rooms = Rooms {
            rooms: Mutex::default(),
            process: 1,
            relay: Some(sender),
        };
        (rooms, receiver)
    }

    fn update(clients: impl IntoIterator<Item = (u64, u32, String)>) -> AwarenessUpdate {
        AwarenessUpdate {
            clients: clients
                .into_iter()
                .map(|(client, clock, json)| {
                    let entry = AwarenessUpdateEntry {
                        clock,
                        json: json.into(),
                    };
                    (ClientID::new(client), entry)
                })
                .collect(),
        }
    }

    #[test]
    fn a_socket_speaks_for_a_few_clients_and_only_json_passes() {
        let (rooms, _relay) = rooms_with_relay();
        let _member = rooms.join(5);
        let many = (1..=20).map(|client| (client, 1, format!("{{\"n\":{client}}}")));
        rooms.publish(5, 1, update(many));
        rooms.publish(5, 1, update([(100, 1, "{oops".to_owned())]));
        let rooms = rooms.rooms();
        let room = rooms.get(&5).expect("the room");
        assert_eq!(room.clients_of(1), MAX_CLIENTS_PER_SOCKET);
        assert!(!room.states.contains_key(&100));
    }

    #[test]
    fn the_states_another_process_asks_for_come_in_notifies_that_fit() {
        let (rooms, mut relay) = rooms_with_relay();
        let _member = rooms.join(5);
        let state = format!("{{\"user\":\"{}\"}}", "x".repeat(240));
        for socket in 1..=6u64 {
            let clients = (0..8).map(|n| (socket * 100 + n, 1, state.clone()));
            rooms.publish(5, socket, update(clients));
        }
        while relay.try_recv().is_ok() {}
        rooms.receive_remote("2:5:?");
        let mut answered = 0;
        while let Ok(payload) = relay.try_recv() {
            assert!(payload.len() <= MAX_NOTIFY_BYTES, "{} bytes", payload.len());
            let encoded = payload.rsplit(':').next().expect("the update");
            let bytes = STANDARD.decode(encoded).expect("base64");
            answered += super::super::protocol::decode_awareness(&bytes)
                .expect("an update")
                .clients
                .len();
        }
        assert_eq!(answered, 48, "every state, over several NOTIFYs");
    }
}
