//! The hub: one bounded broadcast per topic (a channel id), carrying `ChangeEvent`s decoded
//! from `change_log`. A change reaches only its topic's subscribers. No database, no GraphQL.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OnceCell, broadcast};

/// How many events a topic buffers for a slow subscriber before it lags (and then re-reads
/// the log instead).
pub const TOPIC_CAPACITY: usize = 1024;

/// How many recent events (of all topics) the broker keeps, so that subscribers that lag
/// behind a burst, or resume from a recent cursor, catch up from memory, sharing each event
/// (and its memo) instead of each re-reading the log.
pub const RECENT_CAPACITY: usize = 2048;

/// How many events the feed of every topic (`Broker::subscribe_all`, the live queries'
/// engine) buffers before its receiver lags.
pub const ALL_CAPACITY: usize = 4096;

/// What happened to a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
}

impl Op {
    /// The operation as `change_log.op` spells it.
    pub fn parse(op: &str) -> Option<Op> {
        match op {
            "INSERT" => Some(Op::Insert),
            "UPDATE" => Some(Op::Update),
            "DELETE" => Some(Op::Delete),
            _ => None,
        }
    }

    /// The operation as `change_log.op` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "INSERT",
            Op::Update => "UPDATE",
            Op::Delete => "DELETE",
        }
    }
}

/// One committed change, as captured in `change_log`.
#[derive(Debug)]
pub struct ChangeEvent {
    /// Its place in the one global order.
    pub position: i64,
    /// The live table it happened in.
    pub table: String,
    pub op: Op,
    /// The row's id column (for `channel_members`, the user id).
    pub row_id: i64,
    /// The topic: the channel the row belongs to.
    pub scope: Option<i64>,
    /// The row image (the last state on DELETE).
    pub row: serde_json::Value,
    /// Values derived from this event once and shared by every subscriber that renders it.
    pub memo: Memo,
}

/// One memoised value: an `Arc<OnceCell<Arc<T>>>` behind `Any`, keyed by `T`'s type.
type Slot = Arc<dyn Any + Send + Sync>;

/// A per-event store of derived values (for example the message's author), so that fanning
/// one change out to many subscribers costs one lookup, not one per subscriber.
#[derive(Default)]
pub struct Memo {
    slots: Mutex<HashMap<(TypeId, &'static str, i64), Slot>>,
}

impl std::fmt::Debug for Memo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Memo")
    }
}

impl Memo {
    /// The value under (`T`, `key`, `id`) if it has been computed.
    pub fn get<T: Any + Send + Sync>(&self, key: &'static str, id: i64) -> Option<Arc<T>> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = slots.get(&(TypeId::of::<T>(), key, id))?;
        slot.downcast_ref::<OnceCell<Arc<T>>>()?.get().cloned()
    }

    /// The value under (`T`, `key`, `id`), computed by `init` by the first caller; concurrent
    /// callers wait for that one computation. A failed `init` is not remembered.
    pub async fn get_or_try_init<T, E, F, Fut>(
        &self,
        key: &'static str,
        id: i64,
        init: F,
    ) -> Result<Arc<T>, E>
    where
        T: Any + Send + Sync,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots
                .entry((TypeId::of::<T>(), key, id))
                .or_insert_with(|| Arc::new(OnceCell::<Arc<T>>::new()))
                .clone()
        };
        match slot.downcast::<OnceCell<Arc<T>>>() {
            Ok(cell) => cell
                .get_or_try_init(|| async { init().await.map(Arc::new) })
                .await
                .cloned(),
            // Slots are keyed by type, so this does not happen; compute without caching.
            Err(_) => init().await.map(Arc::new),
        }
    }
}

/// Topics, each a bounded broadcast, plus how far the log has been published.
pub struct Broker {
    topics: Mutex<HashMap<i64, broadcast::Sender<Arc<ChangeEvent>>>>,
    published: AtomicI64,
    closed: std::sync::atomic::AtomicBool,
    streaming: std::sync::atomic::AtomicUsize,
    /// The streaming subscriptions per topic.
    streaming_topics: Mutex<HashMap<i64, usize>>,
    /// Topics whose delivery has fallen behind (see `wait_for_fan_out`), and the wake-up
    /// when none is.
    lagging_topics: std::sync::atomic::AtomicUsize,
    fanned_out: tokio::sync::Notify,
    recent: Mutex<Recent>,
    /// Every published event, whatever its topic, for the one receiver that needs them all
    /// (live queries; see `subscribe_all`).
    /// Taken by `close`, which ends the receivers.
    all: Mutex<Option<broadcast::Sender<Arc<ChangeEvent>>>>,
    /// Counters for `/metrics`.
    pub stats: FeedStats,
}

/// What the feed has done since the process started (read by `/metrics`).
#[derive(Debug, Default)]
pub struct FeedStats {
    /// Changes the tailer published.
    pub published: std::sync::atomic::AtomicU64,
    /// Events sent to subscribers (one per subscriber and event).
    pub delivered: std::sync::atomic::AtomicU64,
    /// Subscription events rendered (once per event and subscription shape, shared by
    /// every subscription of that shape).
    pub renders: std::sync::atomic::AtomicU64,
    /// Live query executions (first ones included), once per cohort and change that
    /// touched what it read.
    pub live_executions: std::sync::atomic::AtomicU64,
    /// Pages of the log read to replay or catch up (the broker's memory did not cover).
    pub log_replays: std::sync::atomic::AtomicU64,
    /// Times a subscriber fell behind its topic's buffer or its transport's inbox (or a
    /// topic's driver behind its buffer) and had to catch up.
    pub lagged: std::sync::atomic::AtomicU64,
    /// When the tailer last finished a read of the log (ms since the Unix epoch).
    pub tailer_heartbeat_ms: std::sync::atomic::AtomicU64,
    /// Yjs updates stored (each its own row and version), and the transactions that stored
    /// them (updates of one document that arrive together share one).
    pub yjs_updates: std::sync::atomic::AtomicU64,
    pub yjs_writes: std::sync::atomic::AtomicU64,
    /// y-websocket peers connected (past their checks).
    pub yjs_peers: std::sync::atomic::AtomicI64,
}

impl FeedStats {
    /// Records that the tailer has just finished a read.
    pub fn beat(&self) {
        self.tailer_heartbeat_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// How long ago the tailer last finished a read (`None` before its first).
    pub fn since_heartbeat(&self) -> Option<std::time::Duration> {
        match self.tailer_heartbeat_ms.load(Ordering::Relaxed) {
            0 => None,
            at => Some(std::time::Duration::from_millis(
                now_ms().saturating_sub(at),
            )),
        }
    }

    pub fn add(counter: &std::sync::atomic::AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// The most recent published events: complete for every position after `after`.
struct Recent {
    after: i64,
    events: std::collections::VecDeque<Arc<ChangeEvent>>,
}

/// A subscription to one topic; dropping the last one removes the topic.
pub struct TopicReceiver {
    receiver: broadcast::Receiver<Arc<ChangeEvent>>,
    broker: Arc<Broker>,
    topic: i64,
}

impl TopicReceiver {
    /// The next event (or `Lagged` / `Closed`).
    pub async fn recv(&mut self) -> Result<Arc<ChangeEvent>, broadcast::error::RecvError> {
        self.receiver.recv().await
    }

    /// How many events wait in this receiver.
    pub fn len(&self) -> usize {
        self.receiver.len()
    }

    pub fn is_empty(&self) -> bool {
        self.receiver.is_empty()
    }

    /// The next event if one is already there (or `Empty`, `Lagged`, `Closed`).
    pub fn try_recv(&mut self) -> Result<Arc<ChangeEvent>, broadcast::error::TryRecvError> {
        self.receiver.try_recv()
    }
}

impl Drop for TopicReceiver {
    fn drop(&mut self) {
        let mut topics = self.broker.topics();
        // Under the lock no one can subscribe meanwhile; ours is still counted.
        if topics
            .get(&self.topic)
            .is_some_and(|sender| sender.receiver_count() <= 1)
        {
            topics.remove(&self.topic);
        }
    }
}

/// Counts a subscription as streaming (checks passed, events flowing) while it lives.
pub struct Streaming(Arc<Broker>, i64);

impl Drop for Streaming {
    fn drop(&mut self) {
        self.0.streaming.fetch_sub(1, Ordering::AcqRel);
        let mut by_topic = self.0.streaming_by_topic();
        if let Some(count) = by_topic.get_mut(&self.1) {
            *count -= 1;
            if *count == 0 {
                by_topic.remove(&self.1);
            }
        }
    }
}

impl Broker {
    /// A hub whose log position starts at `published` (every change up to it is history).
    pub fn new(published: i64) -> Self {
        Self {
            topics: Mutex::new(HashMap::new()),
            published: AtomicI64::new(published),
            closed: std::sync::atomic::AtomicBool::new(false),
            streaming: std::sync::atomic::AtomicUsize::new(0),
            streaming_topics: Mutex::new(HashMap::new()),
            lagging_topics: std::sync::atomic::AtomicUsize::new(0),
            fanned_out: tokio::sync::Notify::new(),
            recent: Mutex::new(Recent {
                after: published,
                events: std::collections::VecDeque::with_capacity(RECENT_CAPACITY),
            }),
            all: Mutex::new(Some(broadcast::channel(ALL_CAPACITY).0)),
            stats: FeedStats::default(),
        }
    }

    fn topics(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<i64, broadcast::Sender<Arc<ChangeEvent>>>> {
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A receiver for `topic`'s future events. Subscribe first, then read `published()`:
    /// every event after that position reaches the receiver. The topic is removed when its
    /// last receiver is dropped.
    pub fn subscribe(self: &Arc<Self>, topic: i64) -> TopicReceiver {
        let mut topics = self.topics();
        let receiver = if self.closed.load(Ordering::Acquire) {
            // After shutdown: a receiver whose sender is already gone, so it ends at once.
            broadcast::channel(1).1
        } else {
            topics
                .entry(topic)
                .or_insert_with(|| broadcast::channel(TOPIC_CAPACITY).0)
                .subscribe()
        };
        TopicReceiver {
            receiver,
            broker: self.clone(),
            topic,
        }
    }

    /// A receiver of every topic's future events, in the feed's order (the same promise as
    /// `subscribe`: subscribe first, then read `published()`). Lags past `ALL_CAPACITY`.
    pub fn subscribe_all(&self) -> broadcast::Receiver<Arc<ChangeEvent>> {
        match &*self.all.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(all) => all.subscribe(),
            // After shutdown: a receiver whose sender is already gone, so it ends at once.
            None => broadcast::channel(1).1,
        }
    }

    /// The position through which every change has been decided and handed to the topics:
    /// the log up to here can be read without gaps.
    pub fn published(&self) -> i64 {
        self.published.load(Ordering::Acquire)
    }

    /// Publishes a gap-free, ordered batch that ends at `through`. The position advances
    /// before the events are sent, so a subscriber that reads `published()` after
    /// subscribing either replays an event from the log or receives it live (or both, and
    /// drops the duplicate by position), never neither.
    pub fn publish(&self, events: Vec<Arc<ChangeEvent>>, through: i64) {
        {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            for event in events.iter().filter(|event| event.scope.is_some()) {
                if recent.events.len() == RECENT_CAPACITY
                    && let Some(oldest) = recent.events.pop_front()
                {
                    recent.after = oldest.position;
                }
                recent.events.push_back(event.clone());
            }
        }
        self.published.fetch_max(through, Ordering::AcqRel);
        FeedStats::add(&self.stats.published, events.len() as u64);
        if let Some(all) = &*self.all.lock().unwrap_or_else(|e| e.into_inner())
            && all.receiver_count() > 0
        {
            for event in &events {
                // Only fails without a receiver, and then the event is nobody's to miss.
                let _ = all.send(event.clone());
            }
        }
        let mut topics = self.topics();
        for event in events {
            let Some(topic) = event.scope else { continue };
            if let Some(sender) = topics.get(&topic)
                && sender.send(event).is_err()
            {
                // Nobody listens any more.
                topics.remove(&topic);
            }
        }
    }

    /// `topic`'s events with `after < position <= through`, from memory, when the broker
    /// still holds every event after `after`; `None` when the log must be read instead.
    pub fn recent(&self, topic: i64, after: i64, through: i64) -> Option<Vec<Arc<ChangeEvent>>> {
        self.remembered(after, through, |e| e.scope == Some(topic))
    }

    /// Every topic's events with `after < position <= through`, from memory, when the
    /// broker still holds every event after `after`; `None` when it does not.
    pub fn recent_all(&self, after: i64, through: i64) -> Option<Vec<Arc<ChangeEvent>>> {
        self.remembered(after, through, |_| true)
    }

    /// The remembered events with `after < position <= through` that `keep` selects, when
    /// memory holds every event after `after`.
    fn remembered(
        &self,
        after: i64,
        through: i64,
        keep: impl Fn(&ChangeEvent) -> bool,
    ) -> Option<Vec<Arc<ChangeEvent>>> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if after < recent.after {
            return None;
        }
        Some(
            recent
                .events
                .iter()
                .filter(|e| e.position > after && e.position <= through && keep(e))
                .cloned()
                .collect(),
        )
    }

    /// How many subscriptions of `topic` are streaming: past their checks, so that every
    /// event published from now on reaches them (tests wait on it before writing). Whether
    /// each reads the topic itself or is served by its topic's driver.
    pub fn subscriber_count(&self, topic: i64) -> usize {
        self.streaming_by_topic().get(&topic).copied().unwrap_or(0)
    }

    fn streaming_by_topic(&self) -> std::sync::MutexGuard<'_, HashMap<i64, usize>> {
        self.streaming_topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// How many receivers `topic` has.
    pub fn receiver_count(&self, topic: i64) -> usize {
        self.topics()
            .get(&topic)
            .map_or(0, broadcast::Sender::receiver_count)
    }

    /// Marks a subscription of `topic` as streaming until the guard drops.
    pub fn streaming(self: &Arc<Self>, topic: i64) -> Streaming {
        self.streaming.fetch_add(1, Ordering::AcqRel);
        *self.streaming_by_topic().entry(topic).or_insert(0) += 1;
        Streaming(self.clone(), topic)
    }

    /// A topic's delivery fell behind (`true`: more events wait for it than it should let
    /// pile up) or caught up again (`false`); each `true` is followed by one `false`.
    pub fn topic_lagging(&self, lagging: bool) {
        if lagging {
            self.lagging_topics.fetch_add(1, Ordering::AcqRel);
        } else if self.lagging_topics.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.fanned_out.notify_waiters();
        }
    }

    /// How many topics' delivery is behind.
    pub fn lagging_topics(&self) -> usize {
        self.lagging_topics.load(Ordering::Acquire)
    }

    /// Back-pressure for this process's writers: waits (at most `patience`) while a topic's
    /// delivery is behind, so that writes that come faster than they can be delivered slow
    /// down instead of piling up latency for every subscriber.
    pub async fn wait_for_fan_out(&self, patience: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            // Made before the check: a wake-up between the two is not missed.
            let caught_up = self.fanned_out.notified();
            if self.lagging_topics() == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, caught_up).await.is_err() {
                return;
            }
        }
    }

    /// How many subscriptions are streaming (past their access checks).
    pub fn streaming_count(&self) -> usize {
        self.streaming.load(Ordering::Acquire)
    }

    /// Ends every topic: receivers see `Closed` once they drained their buffer.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.topics().clear();
        self.all.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(position: i64, scope: i64) -> Arc<ChangeEvent> {
        Arc::new(ChangeEvent {
            position,
            table: "messages".into(),
            op: Op::Insert,
            row_id: position,
            scope: Some(scope),
            row: serde_json::Value::Null,
            memo: Memo::default(),
        })
    }

    #[tokio::test]
    async fn events_reach_only_their_topic() {
        let broker = Arc::new(Broker::new(0));
        let mut one = broker.subscribe(1);
        let mut two = broker.subscribe(2);
        broker.publish(vec![event(1, 1), event(2, 2), event(3, 1)], 3);
        assert_eq!(broker.published(), 3);
        assert_eq!(one.recv().await.unwrap().position, 1);
        assert_eq!(one.recv().await.unwrap().position, 3);
        assert_eq!(two.recv().await.unwrap().position, 2);
        assert!(two.receiver.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_slow_receiver_lags_instead_of_growing() {
        let broker = Arc::new(Broker::new(0));
        let mut slow = broker.subscribe(1);
        let events: Vec<_> = (1..=(TOPIC_CAPACITY as i64 + 10))
            .map(|p| event(p, 1))
            .collect();
        broker.publish(events, TOPIC_CAPACITY as i64 + 10);
        assert!(matches!(
            slow.recv().await,
            Err(broadcast::error::RecvError::Lagged(10))
        ));
    }

    #[tokio::test]
    async fn memo_computes_once_for_concurrent_callers() {
        let memo = Memo::default();
        let calls = std::sync::atomic::AtomicUsize::new(0);
        assert!(
            memo.get::<String>("author", 7).is_none(),
            "nothing computed yet"
        );
        let get = || {
            memo.get_or_try_init::<String, (), _, _>("author", 7, || async {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
                Ok("Ada".to_owned())
            })
        };
        let (a, b) = tokio::join!(get(), get());
        assert_eq!(*a.unwrap(), "Ada");
        assert_eq!(*b.unwrap(), "Ada");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(
            memo.get::<String>("author", 7)
                .as_deref()
                .map(String::as_str),
            Some("Ada")
        );
        assert!(memo.get::<String>("author", 8).is_none(), "another id");
        assert!(memo.get::<u32>("author", 7).is_none(), "another type");
        // A failed computation is not remembered.
        let failed = memo
            .get_or_try_init::<String, (), _, _>("author", 9, || async { Err(()) })
            .await;
        assert!(failed.is_err());
        assert!(memo.get::<String>("author", 9).is_none());
    }

    #[tokio::test]
    async fn recent_events_are_served_from_memory_while_complete() {
        let broker = Arc::new(Broker::new(0));
        let events: Vec<_> = (1..=(RECENT_CAPACITY as i64 + 2))
            .map(|p| event(p, p % 2))
            .collect();
        broker.publish(events, RECENT_CAPACITY as i64 + 2);
        // The two oldest were evicted: from position 2 on, memory is complete.
        assert!(broker.recent(1, 1, 10).is_none());
        let odd = broker.recent(1, 2, 10).unwrap();
        assert_eq!(
            odd.iter().map(|e| e.position).collect::<Vec<_>>(),
            [3, 5, 7, 9]
        );
    }

    #[tokio::test]
    async fn the_last_receiver_removes_its_topic() {
        let broker = Arc::new(Broker::new(0));
        let first = broker.subscribe(1);
        let second = broker.subscribe(1);
        drop(first);
        assert_eq!(broker.receiver_count(1), 1);
        drop(second);
        assert!(broker.topics().is_empty());
    }

    #[tokio::test]
    async fn close_ends_receivers() {
        let broker = Arc::new(Broker::new(0));
        let mut receiver = broker.subscribe(1);
        broker.close();
        assert!(matches!(
            receiver.recv().await,
            Err(broadcast::error::RecvError::Closed)
        ));
        let mut late = broker.subscribe(1);
        assert!(late.recv().await.is_err());
    }
}
