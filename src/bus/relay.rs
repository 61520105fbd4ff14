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
use crate::pubsub::{Broker, ChangeEvent};

/// The advisory lock whose holder relays (advisory locks are per database).
const RELAY_LOCK: i64 = 0x5359_4e43_4752_4150; // "SYNCGRAP"

/// The name the lock's connection shows in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "syncgraph-relay";

/// How often the relay makes sure its lock's connection is still there, and how long that
/// check may take.
const LOCK_CHECK: Duration = Duration::from_secs(1);
const LOCK_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// A statement of the relay's tailer that takes longer fails its run (the stream's guards
/// hold whatever it appended), so that a connection that hangs without failing cannot hold
/// the relay while its heartbeat says all is well. Waiting at a gap for a long transaction
/// is many short statements: it may last.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// How long connecting the lock's connection, and sending a heartbeat, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(200);

/// Appends sent before their acknowledgements are awaited.
const PIPELINE: usize = 256;

/// A relay that has failed to append for this long lets another process relay (one cut off
/// from NATS, say): it closes its lock's connection and stands again after `STAND_DOWN`.
const GIVE_UP_AFTER: Duration = Duration::from_secs(5);
const STAND_DOWN: Duration = Duration::from_secs(1);

/// What a relay works with.
pub(super) struct Relay {
    pub bus: Arc<Bus>,
    pub database_url: String,
    pub db: DatabaseConnection,
    /// This process's hub: where the feed stands here (decided), to seed an empty stream.
    pub broker: Arc<Broker>,
    pub doorbell: Doorbell,
    pub poll: Duration,
}

/// Takes part in the election until `shutdown`; relays while elected.
pub(super) async fn run(relay: Relay, mut shutdown: watch::Receiver<bool>) {
    let mut pause = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            return;
        }
        match elect(&relay.database_url, &mut shutdown).await {
            Ok(None) => return,
            Ok(Some(lock)) => {
                relay.bus.stats.relay.store(true, Ordering::Relaxed);
                BusStats::add(&relay.bus.stats.relay_terms, 1);
                tracing::info!("this process is the relay: it appends the change log to the bus");
                let outcome = relay.lead(lock, &mut shutdown).await;
                relay.bus.stats.relay.store(false, Ordering::Relaxed);
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
        // The server drops a connection whose peer vanished (a host that died or was cut
        // off) within about 20 s, and with it the lock, so another process can relay; and
        // no statement or lock timeout set for the database cuts the wait for the lock.
        .options([
            ("tcp_keepalives_idle", "10"),
            ("tcp_keepalives_interval", "3"),
            ("tcp_keepalives_count", "3"),
            ("statement_timeout", "0"),
            ("lock_timeout", "0"),
        ])
        // Waiting for the lock is the point: not a slow statement to warn about.
        .disable_statement_logging();
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options));
    let mut lock = tokio::select! {
        connected = connect => match connected {
            Ok(connected) => connected.map_err(ChangeError::Lock)?,
            Err(_) => return Err(ChangeError::Bus("connecting for the relay's lock timed out".into())),
        },
        _ = shutdown.changed() => return Ok(None),
    };
    tokio::select! {
        locked = sqlx::query("SELECT pg_advisory_lock($1)").bind(RELAY_LOCK).execute(&mut lock) => {
            locked.map_err(ChangeError::Lock)?;
            Ok(Some(lock))
        }
        _ = shutdown.changed() => Ok(None),
    }
}

enum Stop {
    /// Shutdown.
    Shutdown,
    /// The lock is gone: another process may lead.
    Lost(ChangeError),
    /// Something failed; start again from the stream's tail.
    Retry(ChangeError),
}
use Stop::{Lost, Retry, Shutdown};

impl Relay {
    /// Relays while the lock's connection lives; `Ok` at shutdown. Every failure of the bus
    /// or the log starts over from the stream's tail; failing for `GIVE_UP_AFTER` without a
    /// step that succeeded gives the lock up.
    async fn lead(
        &self,
        mut lock: PgConnection,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), ChangeError> {
        let mut pause = Duration::from_millis(50);
        // When the current run of failures began (no step has succeeded since).
        let mut failing_since: Option<Instant> = None;
        loop {
            let run_began = Instant::now();
            let (stop, progressed) = self
                .relay_from_tail(&mut lock, shutdown, failing_since.is_some())
                .await;
            if progressed {
                failing_since = None;
                pause = Duration::from_millis(50);
            }
            match stop {
                Shutdown => {
                    close(lock).await;
                    return Ok(());
                }
                Lost(err) => return Err(err),
                Retry(err) => {
                    tracing::warn!(error = %err, "relaying failed; starting again from the stream's tail");
                    let since = *failing_since.get_or_insert(if progressed {
                        Instant::now()
                    } else {
                        run_began
                    });
                    if since.elapsed() >= GIVE_UP_AFTER {
                        close(lock).await;
                        return Err(ChangeError::Bus(format!(
                            "could not relay for {} s",
                            GIVE_UP_AFTER.as_secs()
                        )));
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                close(lock).await;
                return Ok(());
            }
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// One run: reads the stream's tail and appends what the log decides after it, beating
    /// the heartbeat and checking the lock all the while. Also says whether a step
    /// succeeded. While `failing` (the runs before failed), it beats only once a step has
    /// succeeded: a relay that cannot append must fall silent, so that followers read the
    /// log.
    async fn relay_from_tail(
        &self,
        lock: &mut PgConnection,
        shutdown: &mut watch::Receiver<bool>,
        failing: bool,
    ) -> (Stop, bool) {
        if *shutdown.borrow() {
            return (Shutdown, false);
        }
        let bus = &self.bus;
        let tail = async {
            let stream = bus.stream().await?;
            let (sequence, position) = bus.tail(&stream).await?;
            if let Some(position) = position {
                super::not_ahead_of(&self.db, position).await?;
            }
            Ok::<_, ChangeError>((sequence, position))
        };
        let (sequence, position) = match tail.await {
            Ok(tail) => tail,
            Err(err) => return (Retry(err), false),
        };
        // An empty stream (new, wiped, or aged out) starts where this process's feed stands:
        // decided, and not behind what any relay appended before (this process has published
        // that too, or reads it from the log first). Followers behind it read the rest from
        // the log.
        let after = position.unwrap_or_else(|| self.broker.published());
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
        let mut tailer = Tailer::new(
            self.db.clone(),
            appender,
            self.doorbell.clone(),
            after,
            self.poll,
        )
        .with_io_timeout(IO_TIMEOUT);
        let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut check = tokio::time::interval(LOCK_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut progressed = false;
        loop {
            let step = {
                let step = tailer.step();
                tokio::pin!(step);
                loop {
                    tokio::select! {
                        result = &mut step => break result,
                        _ = heartbeat.tick() => if progressed || !failing {
                            beat(bus, &through).await;
                        },
                        _ = check.tick() => if let Err(stop) = self.check(lock).await {
                            return (stop, progressed);
                        },
                        _ = shutdown.changed() => return (Shutdown, progressed),
                    }
                }
            };
            match step {
                Ok(more) => {
                    progressed = true;
                    if !more {
                        tokio::select! {
                            _ = tailer.idle() => {}
                            _ = heartbeat.tick() => beat(bus, &through).await,
                            _ = check.tick() => if let Err(stop) = self.check(lock).await {
                                return (stop, progressed);
                            },
                            _ = shutdown.changed() => return (Shutdown, progressed),
                        }
                    }
                }
                Err(err) => return (Retry(err), progressed),
            }
        }
    }

    /// The lock's connection answers, and NATS is connected (a relay cut off from it is
    /// failing, even when there is nothing to append).
    async fn check(&self, lock: &mut PgConnection) -> Result<(), Stop> {
        check_lock(lock).await.map_err(Lost)?;
        if !self.bus.connected() {
            return Err(Retry(ChangeError::Bus("cut off from NATS".into())));
        }
        Ok(())
    }
}

/// Closes the lock's connection (releasing the lock), within bounds.
async fn close(lock: PgConnection) {
    let _ = tokio::time::timeout(LOCK_CHECK_TIMEOUT, lock.close()).await;
}

/// Whether the lock's connection still answers.
async fn check_lock(lock: &mut PgConnection) -> Result<(), ChangeError> {
    match tokio::time::timeout(LOCK_CHECK_TIMEOUT, sqlx::query("SELECT 1").execute(lock)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(ChangeError::Lock(err)),
        Err(_) => Err(ChangeError::Bus(
            "the lock's connection does not answer".into(),
        )),
    }
}

/// Tells the followers how far the stream goes: one that has not got that far from the
/// stream within a while reads the log instead; one that hears no relay does too. (The
/// last appended position, not the tailer's: positions decided after it with no change are
/// in no message, so followers never see past it.) Never waits long: a client cut off from
/// NATS queues what it is given.
async fn beat(bus: &Bus, through: &AtomicI64) {
    let heartbeat = Heartbeat {
        appended_through: through.load(Ordering::Relaxed),
    };
    if let Ok(payload) = serde_json::to_vec(&heartbeat) {
        let publish = bus
            .client
            .publish(bus.heartbeat_subject.clone(), payload.into());
        let _ = tokio::time::timeout(HEARTBEAT_TIMEOUT, publish).await;
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
        let bus = Bus::connect(
            BusConfig {
                url,
                stream,
                max_age: Duration::from_secs(600),
                max_bytes: 1 << 26,
                replicas: 1,
            },
            "unit-test-database".into(),
        )
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
