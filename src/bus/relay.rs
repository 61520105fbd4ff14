//! The relay: one process per database, elected by a PostgreSQL advisory lock held on a
//! connection of its own, tails `change_log` with the gap-free tailer and appends each
//! change to the stream. The lock only keeps the work to one process; correctness rests on
//! the stream's guards: every append names the sequence it must follow (and, after the
//! first of a run, the position before it), so an append by a relay whose view is stale
//! fails, and that relay reads the stream's tail again and continues from there.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use sea_orm::DatabaseConnection;
use sea_orm::sqlx::postgres::{PgConnectOptions, PgConnection};
use sea_orm::sqlx::{self, ConnectOptions as _, Connection as _};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Bus, BusStats, HEARTBEAT_EVERY, Heartbeat, Outgoing};
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

/// A relay that has failed to append for this long lets another process relay (one cut off
/// from NATS, say): it closes its lock's connection and stands again after `STAND_DOWN`.
const GIVE_UP_AFTER: Duration = Duration::from_secs(5);
const STAND_DOWN: Duration = Duration::from_secs(1);

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
                        tracing::warn!(error = %err, "no longer the relay; standing for election again")
                    }
                }
                pause = STAND_DOWN;
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
    let mut failing_since: Option<Instant> = None;
    loop {
        if *shutdown.borrow() {
            lock.close().await.ok();
            return Ok(());
        }
        let run_began = Instant::now();
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
                if run_began.elapsed() >= GIVE_UP_AFTER {
                    // It relayed for a while: a new failure.
                    failing_since = None;
                    pause = Duration::from_millis(50);
                }
                let since = *failing_since.get_or_insert(run_began);
                if since.elapsed() >= GIVE_UP_AFTER {
                    lock.close().await.ok();
                    return Err(ChangeError::Bus(format!(
                        "could not append for {} s",
                        GIVE_UP_AFTER.as_secs()
                    )));
                }
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
    // The last position appended, for the heartbeat while a step runs (it may wait long
    // for an open transaction at a gap).
    let through = Arc::new(AtomicI64::new(after));
    let appender = Appender {
        bus: bus.clone(),
        sequence,
        after,
        fresh: true,
        through: through.clone(),
    };
    let mut tailer = Tailer::new(db.clone(), appender, doorbell.clone(), after, poll);
    let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if checked.elapsed() >= LOCK_CHECK {
            sqlx::query("SELECT 1")
                .execute(&mut *lock)
                .await
                .map_err(|err| Lost(ChangeError::Lock(err)))?;
            *checked = Instant::now();
        }
        let step = {
            let step = tailer.step();
            tokio::pin!(step);
            loop {
                tokio::select! {
                    result = &mut step => break result,
                    _ = heartbeat.tick() => beat(bus, &through).await,
                }
            }
        };
        if !tailer.sink().fresh {
            *appended = Some(tailer.sink().after);
        }
        match step {
            Ok(true) => {}
            Ok(false) => tokio::select! {
                _ = tailer.idle() => {}
                _ = heartbeat.tick() => beat(bus, &through).await,
                _ = shutdown.changed() => return Ok(()),
            },
            Err(err) => return Err(Retry(err)),
        }
    }
}

/// Tells the followers how far the stream goes: one that has not got that far from the
/// stream within a while reads the log instead; one that hears no relay does too. (The
/// last appended position, not the tailer's: positions decided after it with no change are
/// in no message, so followers never see past it.)
async fn beat(bus: &Bus, through: &AtomicI64) {
    let heartbeat = Heartbeat {
        appended_through: through.load(Ordering::Relaxed),
    };
    if let Ok(payload) = serde_json::to_vec(&heartbeat) {
        let _ = bus
            .client
            .publish(bus.heartbeat_subject.clone(), payload.into())
            .await;
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
    /// `after`, for the heartbeat.
    through: Arc<AtomicI64>,
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
                self.through.store(position, Ordering::Relaxed);
                BusStats::add(&self.bus.stats.appended, 1);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{BusConfig, Incoming};
    use crate::pubsub::{Memo, Op};

    fn event(position: i64) -> ChangeEvent {
        ChangeEvent {
            position,
            table: "messages".into(),
            op: Op::Insert,
            row_id: position,
            scope: Some(1),
            row: serde_json::json!({ "id": position, "body": format!("change {position}") }),
            memo: Memo::default(),
        }
    }

    async fn bus() -> Arc<Bus> {
        let url = std::env::var("SYNCGRAPH_TEST_NATS").expect("SYNCGRAPH_TEST_NATS");
        let stream = format!(
            "UNIT_RELAY_{}_{}",
            std::process::id(),
            crate::pubsub::now_ms()
        );
        let bus = Bus::connect(BusConfig {
            url,
            stream,
            max_age: Duration::from_secs(600),
            max_bytes: 1 << 26,
            replicas: 1,
        })
        .await
        .expect("connect");
        Arc::new(bus)
    }

    /// (position, after) of every message in the stream, in sequence order.
    async fn contents(bus: &Bus) -> Vec<(i64, i64)> {
        let stream = bus.stream().await.unwrap();
        let info = stream.get_info().await.unwrap();
        let mut all = Vec::new();
        for sequence in info.state.first_sequence..=info.state.last_sequence {
            let message = stream.get_raw_message(sequence).await.unwrap();
            let incoming = Incoming::decode(&message.payload).unwrap();
            all.push((incoming.position, incoming.after));
        }
        all
    }

    /// Two relays that both believe they lead (the old one has not yet noticed it lost its
    /// lock) and both start from the same tail: whatever order their appends arrive in, the
    /// stream holds each position once, in order, each message's `after` naming the one
    /// before it; the loser's append fails, and from the tail it reads again it goes on
    /// without a gap.
    #[tokio::test]
    #[cfg_attr(
        not(nats_tests),
        ignore = "needs SYNCGRAPH_TEST_NATS (a NATS server with JetStream)"
    )]
    async fn two_relays_that_both_believe_they_lead_neither_skip_nor_repeat() {
        let bus = bus().await;
        let stream = bus.stream().await.unwrap();
        let (sequence, position) = bus.tail(&stream).await.unwrap();
        assert_eq!((sequence, position), (0, None), "a new stream");
        let appender = |sequence, after| Appender {
            bus: bus.clone(),
            sequence,
            after,
            fresh: true,
            through: Arc::default(),
        };
        let (mut old, mut new) = (appender(0, 0), appender(0, 0));
        // Position 3 was rolled back: a decided gap.
        new.take(vec![event(1), event(2), event(4)], 4)
            .await
            .unwrap();
        let refused = old.take(vec![event(1), event(2)], 2).await;
        assert!(refused.is_err(), "the stale relay's append is refused");
        // A stale relay whose sequence happens to match the stream's but whose position
        // does not: it would claim that 3 and 4 are gaps. The last message id guards it.
        let mut behind = Appender {
            bus: bus.clone(),
            sequence: 3,
            after: 2,
            fresh: false,
            through: Arc::default(),
        };
        let refused = behind.take(vec![event(5)], 5).await;
        assert!(
            refused.is_err(),
            "an append after the wrong position is refused"
        );
        // The loser reads the tail again and goes on from there.
        let (sequence, position) = bus.tail(&stream).await.unwrap();
        assert_eq!((sequence, position), (3, Some(4)));
        let mut old = appender(sequence, 4);
        old.take(vec![event(5), event(6)], 6).await.unwrap();
        // Both race for the next position from the same tail: one wins, once.
        let (sequence, position) = bus.tail(&stream).await.unwrap();
        let (mut a, mut b) = (appender(sequence, 6), appender(sequence, 6));
        let (ra, rb) = tokio::join!(a.take(vec![event(7)], 7), b.take(vec![event(7)], 7));
        assert!(
            ra.is_ok() != rb.is_ok(),
            "exactly one appends: {ra:?} {rb:?}"
        );
        assert_eq!(position, Some(6));
        assert_eq!(
            contents(&bus).await,
            [(1, 0), (2, 1), (4, 2), (5, 4), (6, 5), (7, 6)],
            "each position once, in order, each after the one before"
        );
        bus.jetstream
            .delete_stream(&bus.config.stream)
            .await
            .unwrap();
    }

    /// A row image too large for one message goes without it; the follower reads the log.
    #[test]
    fn a_row_too_large_for_a_message_is_sent_without_it() {
        let mut big = event(9);
        big.row = serde_json::json!({ "body": "x".repeat(5000) });
        let small = Outgoing::new(&big, 8).encode(100_000).unwrap();
        assert!(Incoming::decode(&small).unwrap().row.is_some());
        let cut = Outgoing::new(&big, 8).encode(1_000).unwrap();
        assert!(cut.len() < 1_000);
        let incoming = Incoming::decode(&cut).unwrap();
        assert_eq!((incoming.position, incoming.after), (9, 8));
        assert!(
            incoming.into_event().unwrap().is_none(),
            "read from the log"
        );
    }
}
