//! The follower: feeds this process's hub from the stream with an ordered consumer, started
//! at the first message past what the hub has published (found by a binary search over the
//! stream's sequences: positions rise with them). It falls back to tailing the log itself
//! when NATS is unreachable, the consumer fails, no relay is heard from, or the stream does
//! not bring what the relay says it appended, and returns once the stream has caught up
//! with what it read there. (A transaction that holds the log back holds the relay back
//! too: that is no reason to fall back, and the relay's heartbeat tells it apart.)

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::stream;
use futures_util::{FutureExt as _, StreamExt as _};
use sea_orm::DatabaseConnection;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Bus, BusState, BusStats, Heard, Incoming, position_at};
use crate::changes::log::read_range;
use crate::changes::{ChangeError, Doorbell, Sink, Tailer};
use crate::pubsub::{Broker, ChangeEvent, TOPIC_CAPACITY, now_ms};

/// How often the follower checks the connection, the stream and the log's head.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// A position the relay says it appended this long ago that the stream has not brought
/// makes the follower read the log instead.
const STALE_AFTER: Duration = Duration::from_secs(2);

/// No relay heard from for this long (none elected, or cut off from NATS): read the log.
const RELAY_SILENT_AFTER: Duration = Duration::from_secs(3);

/// Messages taken from the consumer at once, and rows read per page from the log.
const BATCH: usize = TOPIC_CAPACITY;

/// Why following the stream stopped.
enum Outcome {
    /// Shutdown.
    Stop,
    /// Follow the stream again from where the hub is (it was created anew).
    Restart(String),
    /// Read the log until the stream is healthy again.
    Fallback(String),
}

/// Feeds `broker` until `shutdown`.
pub(super) async fn run(
    bus: Arc<Bus>,
    heard: Arc<Heard>,
    db: DatabaseConnection,
    broker: Arc<Broker>,
    doorbell: Doorbell,
    poll: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    // The position of the last change this process published (0: none yet).
    let mut last_event = 0;
    loop {
        match follow_stream(&bus, &heard, &db, &broker, &mut last_event, &mut shutdown).await {
            Outcome::Stop => return,
            Outcome::Restart(reason) => {
                tracing::info!(%reason, "following the bus again from this process's position");
                // Never a busy loop, whatever keeps restarting it.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = shutdown.changed() => return,
                }
            }
            Outcome::Fallback(reason) => {
                tracing::warn!(%reason, "reading the change log instead of the bus");
                bus.stats.set_state(BusState::Postgres);
                bus.stats
                    .behind
                    .store(0, std::sync::atomic::Ordering::Relaxed);
                BusStats::add(&bus.stats.fallbacks, 1);
                bus.stats
                    .fell_back_at_ms
                    .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
                if !follow_log(
                    &bus,
                    &heard,
                    &db,
                    &broker,
                    &doorbell,
                    poll,
                    &mut last_event,
                    &mut shutdown,
                )
                .await
                {
                    return;
                }
                tracing::info!("the bus has caught up; following it again");
            }
        }
    }
}

/// Follows the stream until it fails, falls behind, or `shutdown`.
async fn follow_stream(
    bus: &Bus,
    heard: &Heard,
    db: &DatabaseConnection,
    broker: &Arc<Broker>,
    last_event: &mut i64,
    shutdown: &mut watch::Receiver<bool>,
) -> Outcome {
    if *shutdown.borrow() {
        return Outcome::Stop;
    }
    if !bus.connected() {
        return Outcome::Fallback("NATS is unreachable".into());
    }
    let opened = async {
        let stream = bus.stream().await?;
        let info = stream
            .get_info()
            .await
            .map_err(|err| ChangeError::Bus(format!("cannot read the stream's state: {err}")))?;
        if info.state.messages > 0 {
            let last = position_at(&stream, info.state.last_sequence).await?;
            super::not_ahead_of(db, last).await?;
        }
        let start = find_start(&stream, &info.state, broker.published()).await?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: bus.subject.clone(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await
            .map_err(|err| ChangeError::Bus(format!("cannot create a consumer: {err}")))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|err| ChangeError::Bus(format!("cannot consume: {err}")))?;
        Ok::<_, ChangeError>((stream, info.created, start, messages))
    };
    let (stream, created, start, mut messages) = match opened.await {
        Ok(opened) => opened,
        Err(err) => return Outcome::Fallback(err.to_string()),
    };
    bus.stats.set_state(BusState::Stream);
    let mut staleness = Staleness::new(broker.published());
    let mut check = tokio::time::interval(CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    check.tick().await;
    loop {
        tokio::select! {
            next = messages.next() => match next {
                Some(Ok(message)) => {
                    let mut batch = vec![message];
                    let mut failed = None;
                    while batch.len() < BATCH {
                        match messages.next().now_or_never() {
                            Some(Some(Ok(message))) => batch.push(message),
                            Some(Some(Err(err))) => {
                                failed = Some(err);
                                break;
                            }
                            _ => break,
                        }
                    }
                    // async-nats recreates an ordered consumer that failed before delivering
                    // anything from the stream's first message: start over from the position.
                    if batch
                        .iter()
                        .any(|message| message.info().is_ok_and(|info| info.stream_sequence < start))
                    {
                        return Outcome::Restart("the consumer started over below its start".into());
                    }
                    if let Err(err) = take(bus, db, broker, batch, last_event).await {
                        return Outcome::Fallback(err.to_string());
                    }
                    broker.stats.beat();
                    if let Some(err) = failed {
                        return Outcome::Fallback(format!("the stream's consumer failed: {err}"));
                    }
                }
                Some(Err(err)) => return Outcome::Fallback(format!("the stream's consumer failed: {err}")),
                None => return Outcome::Fallback("the stream's consumer ended".into()),
            },
            _ = check.tick() => {
                if !bus.connected() {
                    return Outcome::Fallback("lost the connection to NATS".into());
                }
                match stream.get_info().await {
                    Ok(info) if info.created != created => {
                        return Outcome::Restart("the stream was created anew".into());
                    }
                    Ok(_) => {}
                    Err(err) => return Outcome::Fallback(format!("cannot read the stream's state: {err}")),
                }
                if let Some(reason) = staleness.check(heard, broker.published()) {
                    return Outcome::Fallback(reason);
                }
                broker.stats.beat();
            }
            _ = shutdown.changed() => return Outcome::Stop,
        }
    }
}

/// The first sequence whose message lies past `published` (the sequence after the last when
/// none does).
async fn find_start(
    stream: &stream::Stream,
    state: &stream::State,
    published: i64,
) -> Result<u64, ChangeError> {
    if state.messages == 0 {
        return Ok(state.last_sequence + 1);
    }
    let (mut low, mut high) = (state.first_sequence, state.last_sequence);
    if position_at(stream, high).await? <= published {
        return Ok(high + 1);
    }
    while low < high {
        let middle = low + (high - low) / 2;
        if position_at(stream, middle).await? > published {
            high = middle;
        } else {
            low = middle + 1;
        }
    }
    Ok(low)
}

/// Publishes what a batch of messages brings: each change past what the hub has, once, in
/// order; what lies between a message's `after` and the hub's position is read from the log
/// first.
async fn take(
    bus: &Bus,
    db: &DatabaseConnection,
    broker: &Arc<Broker>,
    batch: Vec<async_nats::jetstream::Message>,
    last_event: &mut i64,
) -> Result<(), ChangeError> {
    let mut through = broker.published();
    let mut events: Vec<Arc<ChangeEvent>> = Vec::with_capacity(batch.len());
    for message in batch {
        if let Ok(info) = message.info() {
            bus.stats
                .behind
                .store(info.pending, std::sync::atomic::Ordering::Relaxed);
        }
        let incoming = Incoming::decode(&message.payload)?;
        BusStats::add(&bus.stats.received, 1);
        if incoming.position <= through {
            continue;
        }
        if incoming.after > through {
            // The stream does not hold what lies between: the log does (it is decided).
            if let Some(last) = events.last() {
                *last_event = last.position;
            }
            broker.publish(std::mem::take(&mut events), through);
            let read = fill(db, broker, through, incoming.after).await?;
            BusStats::add(&bus.stats.log_reads, read.count);
            BusStats::add(&bus.stats.gap_fills, 1);
            *last_event = (*last_event).max(read.last_event);
        }
        let position = incoming.position;
        let event = match incoming.into_event()? {
            Some(event) => event,
            None => {
                BusStats::add(&bus.stats.log_reads, 1);
                read_one(db, position).await?
            }
        };
        events.push(Arc::new(event));
        through = position;
    }
    if let Some(last) = events.last() {
        *last_event = last.position;
    }
    broker.publish(events, through);
    Ok(())
}

/// What `fill` read.
struct Filled {
    count: u64,
    last_event: i64,
}

/// Publishes the log's changes with `after < position <= through` (all decided).
async fn fill(
    db: &DatabaseConnection,
    broker: &Arc<Broker>,
    mut after: i64,
    through: i64,
) -> Result<Filled, ChangeError> {
    let mut filled = Filled {
        count: 0,
        last_event: 0,
    };
    let pruned = crate::changes::pruned_through(db).await?;
    if pruned > after {
        tracing::error!(
            last = after,
            pruned_through = pruned,
            "the change log was pruned past this process's position, and the stream does not \
             hold it either; subscribers here miss those changes (raise retention)"
        );
    }
    loop {
        let rows = read_range(db, after, Some(through), BATCH as u64).await?;
        let Some(last) = rows.last().map(|row| row.position) else {
            break;
        };
        let full = rows.len() == BATCH;
        filled.count += rows.len() as u64;
        filled.last_event = last;
        broker.publish(rows.into_iter().map(Arc::new).collect(), last);
        after = last;
        if !full {
            break;
        }
    }
    broker.publish(Vec::new(), through);
    Ok(filled)
}

/// The change at `position`, from the log (its row image did not fit in a message).
async fn read_one(db: &DatabaseConnection, position: i64) -> Result<ChangeEvent, ChangeError> {
    read_range(db, position - 1, Some(position), 1)
        .await?
        .pop()
        .ok_or_else(|| ChangeError::Decode {
            position,
            reason: "not in the log any more".into(),
        })
}

/// Tells when the stream fails this process: no relay heard from for `RELAY_SILENT_AFTER`,
/// or the hub behind what the relay says it appended and not moving for `STALE_AFTER` (a
/// follower that is behind but moving keeps reading the stream at its own pace).
struct Staleness {
    since: Instant,
    /// The hub's position, and since when it has not moved.
    progress: (i64, Instant),
}

impl Staleness {
    fn new(published: i64) -> Self {
        Staleness {
            since: Instant::now(),
            progress: (published, Instant::now()),
        }
    }

    fn check(&mut self, heard: &Heard, published: i64) -> Option<String> {
        let last = heard.last();
        let heard_at = last.map_or(self.since, |(_, at)| at.max(self.since));
        if heard_at.elapsed() >= RELAY_SILENT_AFTER {
            return Some(format!(
                "no relay heard from for {} s",
                RELAY_SILENT_AFTER.as_secs()
            ));
        }
        if published != self.progress.0 {
            self.progress = (published, Instant::now());
        }
        match last {
            Some((through, _))
                if through > published && self.progress.1.elapsed() >= STALE_AFTER =>
            {
                Some(format!(
                    "the stream has brought nothing for {} s, while the relay has appended \
                     up to position {through}",
                    STALE_AFTER.as_secs()
                ))
            }
            _ => None,
        }
    }
}

/// The fallback's sink: the hub, counting what it reads and the last change's position.
struct FromLog {
    broker: Arc<Broker>,
    stats: Arc<BusStats>,
    last_event: i64,
}

impl Sink for FromLog {
    async fn take(&mut self, rows: Vec<ChangeEvent>, through: i64) -> Result<(), ChangeError> {
        if let Some(last) = rows.last() {
            self.last_event = last.position;
        }
        BusStats::add(&self.stats.log_reads, rows.len() as u64);
        self.broker.take(rows, through).await
    }
}

/// Tails the log into the hub until the stream has caught up with it (true) or `shutdown`
/// (false).
#[allow(clippy::too_many_arguments)]
async fn follow_log(
    bus: &Bus,
    heard: &Heard,
    db: &DatabaseConnection,
    broker: &Arc<Broker>,
    doorbell: &Doorbell,
    poll: Duration,
    last_event: &mut i64,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let sink = FromLog {
        broker: broker.clone(),
        stats: bus.stats.clone(),
        last_event: *last_event,
    };
    let mut tailer = Tailer::new(db.clone(), sink, doorbell.clone(), broker.published(), poll);
    let mut tried = Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        if *shutdown.borrow() {
            return false;
        }
        match tailer.step().await {
            Ok(more) => {
                broker.stats.beat();
                pause = Duration::from_millis(50);
                if !more {
                    tokio::select! {
                        _ = tailer.idle() => {}
                        _ = shutdown.changed() => return false,
                    }
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "change log read failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.changed() => return false,
                }
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
        *last_event = tailer.sink().last_event;
        if tried.elapsed() >= CHECK_EVERY {
            tried = Instant::now();
            let relay_heard = heard
                .last()
                .is_some_and(|(_, at)| at.elapsed() < RELAY_SILENT_AFTER);
            if relay_heard && stream_caught_up(bus, heard, *last_event).await {
                return true;
            }
        }
    }
}

/// Whether NATS answers and the stream holds every change this process has read (that a
/// relay is heard from, the caller checks).
async fn stream_caught_up(bus: &Bus, heard: &Heard, last_event: i64) -> bool {
    if !bus.connected() {
        return false;
    }
    let Ok(stream) = bus.stream().await else {
        return false;
    };
    match bus.tail(&stream).await {
        // A stream seeded anew holds nothing yet: the relay's heartbeat says where it starts
        // (messages' `after` fill anything between, from the log).
        Ok((_, position)) => {
            position
                .unwrap_or(0)
                .max(heard.last().map_or(0, |(through, _)| through))
                >= last_event
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heard(through: i64, ago: Duration) -> Heard {
        Heard(std::sync::Mutex::new(Some((through, Instant::now() - ago))))
    }

    fn staleness(started_ago: Duration, published: i64, still_for: Duration) -> Staleness {
        Staleness {
            since: Instant::now() - started_ago,
            progress: (published, Instant::now() - still_for),
        }
    }

    #[test]
    fn a_silent_relay_is_stale_a_new_follower_gives_it_time() {
        let never = Heard::default();
        assert!(
            staleness(Duration::ZERO, 5, Duration::ZERO)
                .check(&never, 5)
                .is_none()
        );
        let reason = staleness(Duration::from_secs(4), 5, Duration::ZERO).check(&never, 5);
        assert!(reason.is_some_and(|r| r.contains("no relay")));
        let long_ago = heard(5, Duration::from_secs(4));
        let reason = staleness(Duration::from_secs(9), 5, Duration::ZERO).check(&long_ago, 5);
        assert!(reason.is_some_and(|r| r.contains("no relay")));
    }

    #[test]
    fn behind_and_still_is_stale_behind_and_moving_is_not() {
        let relay = heard(100, Duration::ZERO);
        // Caught up: never stale, however long nothing moved.
        let mut caught_up = staleness(Duration::from_secs(60), 100, Duration::from_secs(60));
        assert!(caught_up.check(&heard(100, Duration::ZERO), 100).is_none());
        // Behind, but the hub moved a moment ago: reading at its own pace.
        let mut moving = staleness(Duration::from_secs(60), 40, Duration::from_secs(1));
        assert!(moving.check(&relay, 40).is_none());
        // Behind and still for longer than STALE_AFTER.
        let mut still = staleness(Duration::from_secs(60), 40, Duration::from_secs(3));
        assert!(still.check(&relay, 40).is_some_and(|r| r.contains("100")));
        // It moves again: no longer stale.
        assert!(still.check(&relay, 41).is_none());
    }
}
