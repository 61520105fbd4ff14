//! Scale-out over NATS JetStream (`--bus`, PostgreSQL only). Without it every process reads
//! every change from `change_log`; with it one process per database (the relay, elected by
//! a PostgreSQL advisory lock: `relay`) tails the log with the gap-free algorithm and
//! appends each change to a stream, and every process feeds its hub from the stream
//! (`follow`), reading the log only when the stream is unreachable or lacks what it needs.
//!
//! Each message carries its change's position and `after`, the position of the message
//! before it in the stream (or where the relay started an empty one): every position
//! between the two is decided and has no change. The relay appends with `Nats-Msg-Id` set
//! to the position and guarded by the expected last sequence (and, within one run, the
//! expected last message id), so a failed-over relay, or two that briefly both lead, can
//! neither skip nor repeat a change in the stream. A follower takes a message only when its
//! `after` is at or below what it has already published (else it first reads the positions
//! between from the log) and drops one at or below it: its hub sees every position once, in
//! order, whatever the stream holds. ARCHITECTURE.md has the whole argument.

mod follow;
mod relay;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use sea_orm::DatabaseConnection;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::changes::{ChangeError, Doorbell};
use crate::pubsub::{Broker, ChangeEvent, Memo, Op};

/// What `--bus` and its flags configure.
#[derive(Clone)]
pub struct BusConfig {
    /// `nats://HOST:PORT`.
    pub url: String,
    /// The stream's name; its subject is `<stream>.changes`.
    pub stream: String,
    /// The stream's retention.
    pub max_age: Duration,
    pub max_bytes: i64,
    /// Copies of the stream in a NATS cluster.
    pub replicas: usize,
}

impl std::fmt::Debug for BusConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry credentials.
        f.debug_struct("BusConfig")
            .field("stream", &self.stream)
            .field("max_age", &self.max_age)
            .field("max_bytes", &self.max_bytes)
            .field("replicas", &self.replicas)
            .finish_non_exhaustive()
    }
}

impl BusConfig {
    fn subject(&self) -> String {
        format!("{}.changes", self.stream)
    }

    /// Where the relay says how far it has appended (plain NATS, not kept by the stream).
    fn heartbeat_subject(&self) -> String {
        format!("{}.relay", self.stream)
    }

    fn stream_config(&self, database: &str) -> stream::Config {
        stream::Config {
            name: self.stream.clone(),
            description: Some(description(database)),
            subjects: vec![self.subject()],
            max_age: self.max_age,
            max_bytes: self.max_bytes,
            num_replicas: self.replicas,
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::Old,
            retention: stream::RetentionPolicy::Limits,
            // Deduplication by position within this window, never longer than the stream
            // keeps messages (NATS refuses that).
            duplicate_window: DUPLICATE_WINDOW.min(self.max_age),
            ..Default::default()
        }
    }
}

/// The stream's description, which names the database whose changes it carries: a process
/// of another database refuses the stream instead of serving that database's rows.
fn description(database: &str) -> String {
    format!("syncgraph change feed of database {database}")
}

/// The servers without their credentials (kept out of every log line), and the options
/// that carry them: `nats://user:password@host:port` or `nats://token@host:port`, several
/// separated by commas (a cluster's seeds; the same credentials on each), `nats://`
/// assumed where no scheme is given.
fn connect_options(
    urls: &str,
) -> Result<(Vec<async_nats::ServerAddr>, async_nats::ConnectOptions), ChangeError> {
    let invalid = || ChangeError::Bus("--bus is not a list of URLs (nats://HOST:PORT,...)".into());
    let decode = |part: &str| {
        percent_encoding::percent_decode_str(part)
            .decode_utf8_lossy()
            .into_owned()
    };
    let mut servers = Vec::new();
    let mut credentials = None;
    for url in urls.split(',').map(str::trim).filter(|url| !url.is_empty()) {
        let url = if url.contains("://") {
            url.to_owned()
        } else {
            format!("nats://{url}")
        };
        let mut parsed = url::Url::parse(&url).map_err(|_| invalid())?;
        let user = decode(parsed.username());
        let password = parsed.password().map(decode);
        if !user.is_empty() || password.is_some() {
            if credentials
                .as_ref()
                .is_some_and(|seen| *seen != (user.clone(), password.clone()))
            {
                return Err(ChangeError::Bus(
                    "--bus gives different credentials for different servers".into(),
                ));
            }
            credentials = Some((user, password));
        }
        let _ = parsed.set_username("");
        let _ = parsed.set_password(None);
        servers.push(parsed.as_str().parse().map_err(|_| invalid())?);
    }
    if servers.is_empty() {
        return Err(invalid());
    }
    let options = match credentials {
        None => async_nats::ConnectOptions::new(),
        Some((user, None)) => async_nats::ConnectOptions::with_token(user),
        Some((user, Some(password))) => {
            async_nats::ConnectOptions::with_user_and_password(user, password)
        }
    };
    Ok((servers, options))
}

/// Refuses a stream that holds a position this database never handed out (its log's
/// sequence is below it): the database was restored from a backup, or cloned, and the
/// stream belongs to its old timeline; its changes are not this database's.
async fn not_ahead_of(db: &DatabaseConnection, position: i64) -> Result<(), ChangeError> {
    use sea_orm::{ConnectionTrait as _, DatabaseBackend, Statement};
    let row = db
        .query_one_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            "SELECT COALESCE(pg_sequence_last_value(pg_get_serial_sequence('change_log', \
             'position')::regclass), 0) AS last",
        ))
        .await?;
    let last: i64 = match row {
        Some(row) => row.try_get("", "last")?,
        None => 0,
    };
    if position > last {
        return Err(ChangeError::Bus(format!(
            "the stream holds position {position}, but this database's log has handed out only \
             {last}: was the database restored or cloned? Delete the stream (nats stream rm) or \
             give this database its own --bus-stream"
        )));
    }
    Ok(())
}

/// How long NATS remembers a message id for deduplication.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// How long a request to NATS (publish acknowledgement, stream info) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a process's feed comes from right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BusState {
    /// Not yet following anything.
    Starting = 0,
    /// The stream.
    Stream = 1,
    /// The log, because the stream is unreachable, behind, or lacks what this process needs.
    Postgres = 2,
}

impl BusState {
    pub fn as_str(self) -> &'static str {
        match self {
            BusState::Starting => "starting",
            BusState::Stream => "stream",
            BusState::Postgres => "postgres",
        }
    }
}

/// What the bus has done in this process (read by `/metrics` and `/readyz`).
#[derive(Debug, Default)]
pub struct BusStats {
    state: AtomicU8,
    /// This process is the relay.
    pub relay: AtomicBool,
    /// Times this process became the relay.
    pub relay_terms: AtomicU64,
    /// Changes this process appended to the stream (as the relay).
    pub appended: AtomicU64,
    /// Changes this process took from the stream.
    pub received: AtomicU64,
    /// Messages the stream held past the last one taken, at the last one taken.
    pub behind: AtomicU64,
    /// Times this process fell back to reading the log.
    pub fallbacks: AtomicU64,
    /// When it last fell back (ms since the Unix epoch; 0: never).
    pub fell_back_at_ms: AtomicU64,
    /// Changes read from the log instead of the stream (while falling back, or filling what
    /// the stream did not hold).
    pub log_reads: AtomicU64,
    /// Times a message said the stream lacked positions before it, read from the log.
    pub gap_fills: AtomicU64,
    /// The relay's last heartbeat: the position the stream reaches, and when it was heard
    /// (ms since the Unix epoch; 0: never).
    pub relay_through: std::sync::atomic::AtomicI64,
    pub relay_heard_at_ms: AtomicU64,
}

impl BusStats {
    pub fn state(&self) -> BusState {
        match self.state.load(Ordering::Relaxed) {
            1 => BusState::Stream,
            2 => BusState::Postgres,
            _ => BusState::Starting,
        }
    }

    fn set_state(&self, state: BusState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A connection to NATS and the stream's settings.
pub struct Bus {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    config: BusConfig,
    /// This database's identity (`server_secrets`), in the stream's description.
    database: String,
    /// Whether the stream's settings differing from the flags has been logged.
    told_settings: AtomicBool,
    subject: String,
    heartbeat_subject: String,
    pub stats: Arc<BusStats>,
}

/// The relay's last heartbeat as this process heard it: the position of the last change it
/// appended (or of the stream's last message, or where it seeded an empty stream), and when.
#[derive(Debug, Default)]
struct Heard(std::sync::Mutex<Option<(i64, tokio::time::Instant)>>);

impl Heard {
    fn last(&self) -> Option<(i64, tokio::time::Instant)> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, through: i64, stats: &BusStats) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((through, tokio::time::Instant::now()));
        stats.relay_through.store(through, Ordering::Relaxed);
        stats
            .relay_heard_at_ms
            .store(crate::pubsub::now_ms(), Ordering::Relaxed);
    }
}

/// A relay's heartbeat.
#[derive(Serialize, Deserialize)]
struct Heartbeat {
    /// The position of the stream's last message, as the relay knows it.
    appended_through: i64,
}

/// How often the relay says how far it has appended.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);

/// Hears the relay's heartbeats until `shutdown` (the subscription is renewed by the client
/// after a reconnect).
async fn hear_relay(bus: Arc<Bus>, heard: Arc<Heard>, mut shutdown: watch::Receiver<bool>) {
    use futures_util::StreamExt as _;
    loop {
        let mut heartbeats = match bus.client.subscribe(bus.heartbeat_subject.clone()).await {
            Ok(subscriber) => subscriber,
            Err(err) => {
                tracing::debug!(error = %err, "cannot subscribe to the relay's heartbeat yet");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = shutdown.changed() => return,
                }
            }
        };
        loop {
            tokio::select! {
                next = heartbeats.next() => match next {
                    Some(message) => {
                        if let Ok(beat) = serde_json::from_slice::<Heartbeat>(&message.payload) {
                            heard.set(beat.appended_through, &bus.stats);
                        }
                    }
                    None => break,
                },
                _ = shutdown.changed() => return,
            }
        }
    }
}

impl Bus {
    /// Connects to `config.url`. A server that is not up yet is retried in the background
    /// (this process reads the log meanwhile); a malformed URL is an error.
    pub async fn connect(config: BusConfig, database: String) -> Result<Bus, ChangeError> {
        let (servers, options) = connect_options(&config.url)?;
        let client = options
            .name("syncgraph")
            .connection_timeout(REQUEST_TIMEOUT)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connect(servers)
            .await
            .map_err(|err| ChangeError::Bus(format!("cannot connect to NATS: {err}")))?;
        // Give a server that is up a moment to answer, so a process does not start on the log.
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        while client.connection_state() != async_nats::connection::State::Connected
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .build(client.clone());
        Ok(Bus {
            client,
            jetstream,
            subject: config.subject(),
            heartbeat_subject: config.heartbeat_subject(),
            config,
            database,
            told_settings: AtomicBool::new(false),
            stats: Arc::new(BusStats::default()),
        })
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// The stream, created with the configured settings if it does not exist; refused when
    /// it carries another database's changes.
    async fn stream(&self) -> Result<stream::Stream, ChangeError> {
        let wanted = self.config.stream_config(&self.database);
        let stream = self
            .jetstream
            .get_or_create_stream(wanted.clone())
            .await
            .map_err(|err| {
                ChangeError::Bus(format!("cannot open stream {}: {err}", self.config.stream))
            })?;
        let found = &stream.cached_info().config;
        if found.description != wanted.description {
            return Err(ChangeError::Bus(match &found.description {
                Some(description) => format!(
                    "stream {} carries another database's changes ({description:?}); give \
                     each database its own --bus-stream",
                    self.config.stream
                ),
                None => format!(
                    "stream {} was not made by syncgraph for this database (it has no \
                     description); delete it (nats stream rm) so that it is made anew, or \
                     choose another --bus-stream",
                    self.config.stream
                ),
            }));
        }
        if (found.max_age, found.max_bytes, found.num_replicas)
            != (wanted.max_age, wanted.max_bytes, wanted.num_replicas)
            && !self.told_settings.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                stream = %self.config.stream,
                max_age_secs = found.max_age.as_secs(),
                max_bytes = found.max_bytes,
                replicas = found.num_replicas,
                "the stream exists with other settings than --bus-max-age-secs, \
                 --bus-max-bytes and --bus-replicas; it keeps its own (change them with \
                 the nats CLI: nats stream edit)"
            );
        }
        Ok(stream)
    }

    /// The stream's last sequence and the position of its last message (`None`: it holds
    /// no message).
    async fn tail(&self, stream: &stream::Stream) -> Result<(u64, Option<i64>), ChangeError> {
        let info = stream
            .get_info()
            .await
            .map_err(|err| ChangeError::Bus(format!("cannot read the stream's state: {err}")))?;
        let last = info.state.last_sequence;
        if info.state.messages == 0 {
            return Ok((last, None));
        }
        Ok((last, Some(position_at(stream, last).await?)))
    }

    /// The largest message the server takes.
    fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }
}

/// The position of the message at stream sequence `sequence`.
async fn position_at(stream: &stream::Stream, sequence: u64) -> Result<i64, ChangeError> {
    let message = stream
        .get_raw_message(sequence)
        .await
        .map_err(|err| ChangeError::Bus(format!("cannot read stream message {sequence}: {err}")))?;
    Ok(Incoming::decode(&message.payload)?.position)
}

/// A change as the relay appends it.
#[derive(Serialize)]
struct Outgoing<'a> {
    position: i64,
    after: i64,
    table: &'a str,
    op: &'static str,
    row_id: i64,
    scope: Option<i64>,
    /// `None` when the row image does not fit in a message: followers read it from the log.
    row: Option<&'a serde_json::Value>,
}

impl<'a> Outgoing<'a> {
    fn new(event: &'a ChangeEvent, after: i64) -> Self {
        Outgoing {
            position: event.position,
            after,
            table: &event.table,
            op: event.op.as_str(),
            row_id: event.row_id,
            scope: event.scope,
            row: Some(&event.row),
        }
    }

    /// The message's bytes, within `max` (without the row image when it does not fit).
    fn encode(mut self, max: usize) -> Result<Vec<u8>, ChangeError> {
        let bytes = serde_json::to_vec(&self).map_err(|err| ChangeError::Bus(err.to_string()))?;
        if bytes.len() <= max {
            return Ok(bytes);
        }
        self.row = None;
        serde_json::to_vec(&self).map_err(|err| ChangeError::Bus(err.to_string()))
    }
}

/// A change as a follower takes it.
#[derive(Deserialize)]
struct Incoming {
    position: i64,
    after: i64,
    table: String,
    op: String,
    row_id: i64,
    scope: Option<i64>,
    row: Option<serde_json::Value>,
}

impl Incoming {
    fn decode(payload: &[u8]) -> Result<Incoming, ChangeError> {
        serde_json::from_slice(payload)
            .map_err(|err| ChangeError::Bus(format!("undecodable stream message: {err}")))
    }

    /// The event, when the message holds its row image.
    fn into_event(self) -> Result<Option<ChangeEvent>, ChangeError> {
        let position = self.position;
        let op = Op::parse(&self.op).ok_or_else(|| ChangeError::Decode {
            position,
            reason: format!("unknown op {:?}", self.op),
        })?;
        Ok(self.row.map(|row| ChangeEvent {
            position,
            table: self.table,
            op,
            row_id: self.row_id,
            scope: self.scope,
            row,
            memo: Memo::default(),
        }))
    }
}

/// Starts the relay's election, the follower and the ear for the relay's heartbeat, each
/// until `shutdown` turns true: the follower feeds `broker` from where it has published,
/// waking on `doorbell` while it reads the log; the relay, once elected, wakes on a tee of
/// it.
pub fn start(
    bus: Bus,
    database_url: &str,
    db: DatabaseConnection,
    broker: Arc<Broker>,
    doorbell: &Doorbell,
    poll: Duration,
    shutdown: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let bus = Arc::new(bus);
    let heard = Arc::new(Heard::default());
    vec![
        tokio::spawn(hear_relay(bus.clone(), heard.clone(), shutdown.clone())),
        tokio::spawn(relay::run(
            relay::Relay {
                bus: bus.clone(),
                database_url: database_url.to_owned(),
                db: db.clone(),
                broker: broker.clone(),
                doorbell: doorbell.tee(),
                poll,
            },
            shutdown.clone(),
        )),
        tokio::spawn(follow::run(
            bus,
            heard,
            db,
            broker,
            doorbell.clone(),
            poll,
            shutdown,
        )),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_taken_out_of_the_url() {
        let hosts = |urls: &str| {
            let (servers, _) = connect_options(urls).unwrap();
            servers
                .iter()
                .map(|server| format!("{}:{}", server.host(), server.port()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            hosts("nats://alice:p%40ss@nats.internal:4222"),
            ["nats.internal:4222"]
        );
        assert_eq!(
            hosts("nats://s3cr3t-token@127.0.0.1:4222"),
            ["127.0.0.1:4222"]
        );
        assert_eq!(hosts("127.0.0.1:4222"), ["127.0.0.1:4222"]);
        assert_eq!(
            hosts("nats://a:b@n1:4222, nats://a:b@n2:4223,n3:4224"),
            ["n1:4222", "n2:4223", "n3:4224"]
        );
        for (urls, _) in [
            ("nats://a:b@n1:4222,nats://a:c@n2:4222", ()),
            ("not a url", ()),
            ("", ()),
        ] {
            assert!(connect_options(urls).is_err(), "{urls}");
        }
        let config = BusConfig {
            url: "nats://alice:secret@h:4222".into(),
            stream: "S".into(),
            max_age: Duration::from_secs(60),
            max_bytes: 1,
            replicas: 1,
        };
        assert!(!format!("{config:?}").contains("secret"));
    }
}
