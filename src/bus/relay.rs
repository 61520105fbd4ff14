//! The relay: one process per database, elected by a PostgreSQL advisory lock held on a
//! connection of its own, tails `change_log` with the gap-free tailer and appends each
//! change to the stream. The lock only keeps the work to one process; correctness rests on
//! the stream's guards: every append names the sequence it must follow (and, after the
//! first of a run, the position before it), so an append by a relay whose view is stale
//! fails, and that relay reads the stream's tail again and continues from there.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use sea_orm::DatabaseConnection;
use sea_orm::sqlx::postgres::{PgConnectOptions, PgConnection};
use sea_orm::sqlx::{self, ConnectOptions as _, Connection as _};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Bus, BusStats, Outgoing};
use crate::changes::{ChangeError, Doorbell, Sink, Tailer};
use crate::pubsub::ChangeEvent;

/// The advisory lock whose holder relays (advisory locks are per database).
const RELAY_LOCK: i64 = 0x5359_4e43_4752_4150; // "SYNCGRAP"

/// The name the lock's connection shows in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "syncgraph-relay";

/// How often the relay makes sure its lock's connection is still there.
const LOCK_CHECK: Duration = Duration::from_secs(1);

/// Appends sent before their acknowledgements are awaited.
const PIPELINE: usize = 256;

/// Takes part in the election until `shutdown`; relays while elected.
pub(super) async fn run(
    bus: Arc<Bus>,
    database_url: String,
    db: DatabaseConnection,
    doorbell: Doorbell,
    poll: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    // The last position this process appended: where it seeds a stream found empty.
    let mut appended: Option<i64> = None;
    let mut pause = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            return;
        }
        match elect(&database_url, &mut shutdown).await {
            Ok(None) => return,
            Ok(Some(lock)) => {
                bus.stats
                    .relay
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                BusStats::add(&bus.stats.relay_terms, 1);
                tracing::info!("this process is the relay: it appends the change log to the bus");
                let outcome = lead(
                    &bus,
                    lock,
                    &db,
                    &doorbell,
                    poll,
                    &mut appended,
                    &mut shutdown,
                )
                .await;
                bus.stats
                    .relay
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                match outcome {
                    Ok(()) => return,
                    Err(err) => {
                        tracing::warn!(error = %err, "the relay lost its lock; standing for election again")
                    }
                }
                pause = Duration::from_millis(100);
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot stand for the relay's election yet");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => return,
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// Waits for the lock on a connection of its own; `None` at shutdown.
async fn elect(
    database_url: &str,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<PgConnection>, ChangeError> {
    let options = database_url
        .parse::<PgConnectOptions>()
        .map_err(ChangeError::Lock)?
        .application_name(APPLICATION_NAME)
        // Waiting for the lock is the point: not a slow statement to warn about.
        .disable_statement_logging();
    let mut lock = PgConnection::connect_with(&options)
        .await
        .map_err(ChangeError::Lock)?;
    tokio::select! {
        locked = sqlx::query("SELECT pg_advisory_lock($1)").bind(RELAY_LOCK).execute(&mut lock) => {
            locked.map_err(ChangeError::Lock)?;
            Ok(Some(lock))
        }
        _ = shutdown.changed() => Ok(None),
    }
}

/// Relays while the lock's connection lives; `Ok` at shutdown. Every failure of the bus or
/// the log starts over from the stream's tail.
async fn lead(
    bus: &Arc<Bus>,
    mut lock: PgConnection,
    db: &DatabaseConnection,
    doorbell: &Doorbell,
    poll: Duration,
    appended: &mut Option<i64>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), ChangeError> {
    let mut checked = Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        if *shutdown.borrow() {
            lock.close().await.ok();
            return Ok(());
        }
        match relay_from_tail(
            bus,
            db,
            doorbell,
            poll,
            appended,
            shutdown,
            &mut lock,
            &mut checked,
        )
        .await
        {
            Ok(()) => {
                lock.close().await.ok();
                return Ok(());
            }
            Err(Lost(err)) => return Err(err),
            Err(Retry(err)) => {
                tracing::warn!(error = %err, "relaying failed; starting again from the stream's tail");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => {}
        }
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

enum Stop {
    /// The lock is gone: another process may lead.
    Lost(ChangeError),
    /// Something failed; start again from the stream's tail.
    Retry(ChangeError),
}
use Stop::{Lost, Retry};

/// One run: reads the stream's tail and appends what the log decides after it.
#[allow(clippy::too_many_arguments)]
async fn relay_from_tail(
    bus: &Arc<Bus>,
    db: &DatabaseConnection,
    doorbell: &Doorbell,
    poll: Duration,
    appended: &mut Option<i64>,
    shutdown: &mut watch::Receiver<bool>,
    lock: &mut PgConnection,
    checked: &mut Instant,
) -> Result<(), Stop> {
    let stream = bus.stream().await.map_err(Retry)?;
    let (sequence, position) = bus.tail(&stream).await.map_err(Retry)?;
    let after = match (position, *appended) {
        (Some(position), _) => position,
        // An empty stream (new, wiped, or aged out): start where this process stopped, or
        // where the log is decided now; followers read what lies before from the log.
        (None, Some(appended)) => appended,
        (None, None) => Tailer::start_position(db).await.map_err(Retry)?,
    };
    tracing::debug!(sequence, after, "relaying from the stream's tail");
    let appender = Appender {
        bus: bus.clone(),
        sequence,
        after,
        fresh: true,
    };
    let mut tailer = Tailer::new(db.clone(), appender, doorbell.clone(), after, poll);
    loop {
        if checked.elapsed() >= LOCK_CHECK {
            sqlx::query("SELECT 1")
                .execute(&mut *lock)
                .await
                .map_err(|err| Lost(ChangeError::Lock(err)))?;
            *checked = Instant::now();
        }
        let step = tailer.step().await;
        if !tailer.sink().fresh {
            *appended = Some(tailer.sink().after);
        }
        match step {
            Ok(true) => {}
            Ok(false) => tokio::select! {
                _ = tailer.idle() => {}
                _ = tokio::time::sleep(LOCK_CHECK) => {}
                _ = shutdown.changed() => return Ok(()),
            },
            Err(err) => return Err(Retry(err)),
        }
    }
}

/// The relay's sink: appends to the stream, each append guarded.
struct Appender {
    bus: Arc<Bus>,
    /// The stream's last sequence, as this relay knows it.
    sequence: u64,
    /// The position of the stream's last message (or where an empty stream starts).
    after: i64,
    /// Nothing appended yet in this run: the stream's last message id is not checked (a
    /// restarted NATS server may not know it; the sequence alone guards the first append).
    fresh: bool,
}

impl Sink for Appender {
    async fn take(&mut self, rows: Vec<ChangeEvent>, _through: i64) -> Result<(), ChangeError> {
        let max = self.bus.max_payload().saturating_sub(1024).max(1024);
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            let mut acks = Vec::with_capacity(PIPELINE);
            let (mut sequence, mut after, mut fresh) = (self.sequence, self.after, self.fresh);
            for event in rows.by_ref().take(PIPELINE) {
                let payload = Outgoing::new(&event, after).encode(max)?;
                let mut message = PublishMessage::build()
                    .payload(payload.into())
                    .message_id(event.position.to_string())
                    .expected_last_sequence(sequence);
                if !fresh {
                    message = message.expected_last_message_id(after.to_string());
                }
                let ack = self
                    .bus
                    .jetstream
                    .send_publish(self.bus.subject.clone(), message)
                    .await
                    .map_err(|err| ChangeError::Bus(format!("cannot append: {err}")))?;
                acks.push((event.position, ack));
                sequence += 1;
                after = event.position;
                fresh = false;
            }
            for (position, ack) in acks {
                let ack = ack.await.map_err(|err| {
                    ChangeError::Bus(format!("append of position {position} refused: {err}"))
                })?;
                if ack.duplicate || ack.sequence != self.sequence + 1 {
                    return Err(ChangeError::Bus(format!(
                        "position {position} is already in the stream (sequence {}); another relay ran",
                        ack.sequence
                    )));
                }
                self.sequence = ack.sequence;
                self.after = position;
                self.fresh = false;
                BusStats::add(&self.bus.stats.appended, 1);
            }
        }
        Ok(())
    }
}
