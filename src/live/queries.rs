//! Live queries: a cohort whose render is a re-execution.
//!
//! Members with the same key (document, variables, viewer: whatever makes two executions
//! give the same result) share one `Cohort`. The cohort executes once (through the caller's
//! `Execute`, which also says what the execution read) and again only when a change of the
//! feed touches its read set (`store::reads`); each execution is diffed against the last
//! result into an RFC 6902 patch made once and shared by every member. Changes that arrive
//! while an execution runs fold into the next one, and a cohort's `throttle` spaces its
//! executions (the last state wins).
//!
//! Nothing is missed: the engine matches every published event (in order) against the
//! index of read sets. An execution reflects every change up to its cursor (taken before its
//! reads); events after that cursor that the engine had already matched before the new read
//! set was indexed are matched again, from the broker's memory (or, when it no longer holds
//! them, the cohort simply runs again). A lagging engine runs every cohort again.
//!
//! The engine knows no transport and no GraphQL: the key, the execution and the final
//! payload (`F`, what ends a member's stream) are the caller's.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio::sync::{Semaphore, broadcast, watch};
use tokio::time::Instant;

use crate::pubsub::{Broker, ChangeEvent};
use crate::store::reads::{ReadKey, touched_by};

/// How many recent patches a cohort keeps, so that a member that missed a few (its client
/// read slowly) gets them joined into one; further behind, it gets the whole result.
const PATCH_HISTORY: usize = 8;

/// What one execution gave.
pub enum Outcome<F> {
    /// A result: `data` (the JSON of the response's `data`), `errors` (the JSON text of its
    /// `errors`, when there are any), what it read, and the feed position it reflects
    /// (every change up to it is in the result).
    Result {
        data: Value,
        errors: Option<String>,
        reads: HashSet<ReadKey>,
        cursor: i64,
    },
    /// The cohort ends with this (a request that cannot run, a result over the size cap):
    /// each member gets it, then its stream ends.
    Final(F),
    /// The execution failed for what may be a passing reason (the database): nothing is
    /// published, and the cohort runs again after `RETRY_AFTER`, twice as long each time.
    /// After `RETRIES` failures in a row it ends with this.
    Retry(F),
}

/// How long a cohort waits before running again after its first `Outcome::Retry`.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Failed executions in a row after which a cohort ends (1 + 2 + 4 + 8 s of waiting).
pub const RETRIES: u32 = 4;

/// Bytes of recent patches a cohort keeps at most (besides the newest).
const PATCH_HISTORY_BYTES: usize = 64 * 1024;

/// Executes a cohort's key (see `Outcome`).
pub type Execute<K, F> = Box<dyn Fn(K) -> BoxFuture<'static, Outcome<F>> + Send + Sync>;

/// What a member sends next.
pub enum Payload<F> {
    /// A payload's JSON text: `{"data", "revision": 1}` first, then `{"patch", "revision"}`,
    /// with `errors` when the result has any and `extensions.cursor`.
    Json { text: Arc<str>, cursor: i64 },
    /// The last payload.
    Final(F),
}

/// The live queries of this process, and the task that matches the feed against them.
pub struct LiveQueries<K, F> {
    inner: Arc<Inner<K, F>>,
}

impl<K, F> Clone for LiveQueries<K, F> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<K, F> {
    registry: Mutex<Registry<K, F>>,
    broker: Arc<Broker>,
    execute: Execute<K, F>,
    /// Executions that may run at once (each holds a pooled connection while it reads).
    runs: Arc<Semaphore>,
    encode_cursor: fn(i64) -> String,
    executions: AtomicU64,
    /// Cohort runners alive (executing, or waiting to).
    runners: AtomicUsize,
    /// `RETRY_AFTER` (tests shorten it).
    retry_after_ms: AtomicU64,
    /// Raised when the feed ends (shutdown): every member's stream ends.
    closed: watch::Sender<bool>,
}

struct Registry<K, F> {
    cohorts: HashMap<K, Arc<Cohort<K, F>>>,
    by_id: HashMap<u64, Arc<Cohort<K, F>>>,
    /// Each cohort's last read set, and the inverted index over them.
    reads: HashMap<u64, HashSet<ReadKey>>,
    index: HashMap<ReadKey, HashSet<u64>>,
    /// The last position matched against the index.
    processed: i64,
    next_id: u64,
}

struct Cohort<K, F> {
    id: u64,
    key: K,
    throttle: Duration,
    state: Mutex<CohortState>,
    snapshots: watch::Sender<Option<Arc<Snapshot<F>>>>,
    /// Wakes a runner that waits (throttle, retry) when the cohort ends.
    ended: tokio::sync::Notify,
}

#[derive(Default)]
struct CohortState {
    members: usize,
    running: bool,
    dirty: bool,
    ended: bool,
    last_start: Option<Instant>,
}

/// A cohort's latest state, shared by its members.
struct Snapshot<F> {
    /// One per published state (1 for the first result).
    seq: u64,
    body: Body<F>,
    /// Payloads made for this state, by (the state a member sent last, its revision): the
    /// members that joined together share them (in a cohort of 10,000 that joined at once,
    /// one text per change instead of 10,000).
    made: Mutex<Vec<Made>>,
}

/// A payload made for a state: (the state its member sent last, its revision, its text).
type Made = (Option<u64>, u64, Arc<str>);

/// How many distinct payloads a state keeps for sharing.
const MADE_PAYLOADS: usize = 8;

enum Body<F> {
    Result {
        data: Arc<Value>,
        /// `data` as JSON text, made once for every member that needs the whole result.
        text: Arc<str>,
        errors: Option<Arc<str>>,
        cursor: i64,
        /// The payloads' ending, the same for every member: `,"extensions":{"cursor":...}}`
        /// (after `errors`, when there are any).
        tail: Arc<str>,
        /// The operations (a JSON array's inside) of the last patches, each with the `seq`
        /// it leads to, the newest last.
        patches: VecDeque<(u64, Arc<str>)>,
    },
    Final(F),
}

impl<K, F> LiveQueries<K, F>
where
    K: Clone + Hash + Eq + Send + Sync + 'static,
    F: Clone + Send + Sync + 'static,
{
    /// An engine over `broker`'s feed, executing with `execute`, at most `concurrency`
    /// executions at once; `encode_cursor` writes a position as `extensions.cursor`.
    pub fn new(
        broker: Arc<Broker>,
        execute: Execute<K, F>,
        concurrency: usize,
        encode_cursor: fn(i64) -> String,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                registry: Mutex::new(Registry {
                    cohorts: HashMap::new(),
                    by_id: HashMap::new(),
                    reads: HashMap::new(),
                    index: HashMap::new(),
                    processed: broker.published(),
                    next_id: 0,
                }),
                broker,
                execute,
                runs: Arc::new(Semaphore::new(concurrency.max(1))),
                encode_cursor,
                executions: AtomicU64::new(0),
                runners: AtomicUsize::new(0),
                retry_after_ms: AtomicU64::new(RETRY_AFTER.as_millis() as u64),
                closed: watch::Sender::new(false),
            }),
        }
    }

    /// Matches the feed against the live queries until the feed ends (`Broker::close`).
    /// `events` must have been subscribed (`Broker::subscribe_all`) before any member joins.
    pub async fn run(self, mut events: broadcast::Receiver<Arc<ChangeEvent>>) {
        loop {
            match events.recv().await {
                Ok(event) => self.inner.touch(&event),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(
                        missed,
                        "live queries fell behind the feed; every live query runs again"
                    );
                    self.inner.touch_all();
                }
                Err(broadcast::error::RecvError::Closed) => {
                    self.inner.closed.send_replace(true);
                    return;
                }
            }
        }
    }

    /// Joins the cohort of `key` (making it, and its first execution, when it is new).
    pub fn join(&self, key: K, throttle: Duration) -> Member<K, F> {
        let mut registry = self.inner.lock();
        if let Some(cohort) = registry.cohorts.get(&key).cloned() {
            let mut state = cohort.state();
            if !state.ended {
                state.members += 1;
                drop(state);
                let updates = cohort.snapshots.subscribe();
                return Member::new(&self.inner, cohort, updates);
            }
        }
        let id = registry.next_id;
        registry.next_id += 1;
        let cohort = Arc::new(Cohort {
            id,
            key: key.clone(),
            throttle,
            state: Mutex::new(CohortState {
                members: 1,
                ..CohortState::default()
            }),
            snapshots: watch::Sender::new(None),
            ended: tokio::sync::Notify::new(),
        });
        registry.cohorts.insert(key, cohort.clone());
        registry.by_id.insert(id, cohort.clone());
        self.inner.schedule(&cohort);
        let updates = cohort.snapshots.subscribe();
        Member::new(&self.inner, cohort, updates)
    }

    /// Executions run so far (first ones included).
    pub fn executions(&self) -> u64 {
        self.inner.executions.load(Ordering::Relaxed)
    }

    /// Cohorts alive.
    pub fn cohorts(&self) -> usize {
        self.inner.lock().cohorts.len()
    }

    /// Cohort runners alive (executing or waiting to: throttle, retry).
    pub fn runners(&self) -> usize {
        self.inner.runners.load(Ordering::Relaxed)
    }
}

impl<K, F> Inner<K, F>
where
    K: Clone + Hash + Eq + Send + Sync + 'static,
    F: Clone + Send + Sync + 'static,
{
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry<K, F>> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks every cohort whose read set `event` touches for another execution.
    fn touch(self: &Arc<Self>, event: &ChangeEvent) {
        let keys = touched_by(&event.table, event.row_id, event.scope);
        let mut registry = self.lock();
        registry.processed = registry.processed.max(event.position);
        let hit: HashSet<u64> = keys
            .iter()
            .filter_map(|key| registry.index.get(key))
            .flatten()
            .copied()
            .collect();
        for id in hit {
            if let Some(cohort) = registry.by_id.get(&id) {
                self.schedule(cohort);
            }
        }
    }

    /// Marks every cohort for another execution (the engine missed events).
    fn touch_all(self: &Arc<Self>) {
        let mut registry = self.lock();
        registry.processed = registry.processed.max(self.broker.published());
        for cohort in registry.by_id.values() {
            self.schedule(cohort);
        }
    }

    /// Asks `cohort` to execute again; starts its runner unless one runs (which then runs
    /// once more: what arrived meanwhile folds into that one execution).
    fn schedule(self: &Arc<Self>, cohort: &Arc<Cohort<K, F>>) {
        let mut state = cohort.state();
        state.dirty = true;
        if !state.running && !state.ended {
            state.running = true;
            self.runners.fetch_add(1, Ordering::Relaxed);
            let guard = RunnerGuard {
                engine: self.clone(),
                cohort: cohort.clone(),
            };
            tokio::spawn(async move {
                guard
                    .engine
                    .clone()
                    .execute_while_dirty(guard.cohort.clone())
                    .await;
            });
        }
    }

    /// A cohort's runner: executes while something asked for it, one at a time.
    async fn execute_while_dirty(self: Arc<Self>, cohort: Arc<Cohort<K, F>>) {
        let mut retry_at: Option<Instant> = None;
        let mut failures = 0u32;
        loop {
            let throttled = cohort.state().last_start.map(|at| at + cohort.throttle);
            let not_before = match (throttled, retry_at.take()) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            if let Some(at) = not_before {
                // A cohort that ends meanwhile (its last member left) stops the wait.
                let ended = cohort.ended.notified();
                if !cohort.state().ended {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = ended => {}
                    }
                }
            }
            {
                let mut state = cohort.state();
                if state.members == 0 || state.ended {
                    state.running = false;
                    return;
                }
            }
            let permit = self.runs.clone().acquire_owned().await;
            {
                let mut state = cohort.state();
                if state.members == 0 || state.ended {
                    state.running = false;
                    return;
                }
                state.dirty = false;
                state.last_start = Some(Instant::now());
            }
            let outcome = (self.execute)(cohort.key.clone()).await;
            drop(permit);
            self.executions.fetch_add(1, Ordering::Relaxed);
            match outcome {
                Outcome::Final(last) => {
                    self.end(&cohort);
                    cohort.state().running = false;
                    cohort.publish_final(last);
                    return;
                }
                Outcome::Retry(last) => {
                    failures += 1;
                    if failures >= RETRIES {
                        self.end(&cohort);
                        cohort.state().running = false;
                        cohort.publish_final(last);
                        return;
                    }
                    cohort.state().dirty = true;
                    let first = Duration::from_millis(self.retry_after_ms.load(Ordering::Relaxed));
                    retry_at = Some(Instant::now() + first * 2u32.pow(failures - 1));
                }
                Outcome::Result {
                    data,
                    errors,
                    reads,
                    cursor,
                } => {
                    failures = 0;
                    let missed = self.index(&cohort, &reads, cursor);
                    cohort.publish(data, errors, cursor, self.encode_cursor);
                    let mut state = cohort.state();
                    state.dirty |= missed;
                    if !state.dirty || state.members == 0 {
                        state.running = false;
                        return;
                    }
                }
            }
        }
    }

    /// Indexes `cohort`'s new read set; true when an event after `cursor` that was matched
    /// before this (against the old set) touches the new one, or cannot be checked.
    fn index(&self, cohort: &Cohort<K, F>, reads: &HashSet<ReadKey>, cursor: i64) -> bool {
        let processed = {
            let mut registry = self.lock();
            if !registry.by_id.contains_key(&cohort.id) {
                return false;
            }
            let old = registry.reads.remove(&cohort.id).unwrap_or_default();
            for key in old.difference(reads) {
                if let Some(ids) = registry.index.get_mut(key) {
                    ids.remove(&cohort.id);
                    if ids.is_empty() {
                        registry.index.remove(key);
                    }
                }
            }
            for key in reads.difference(&old) {
                registry.index.entry(*key).or_default().insert(cohort.id);
            }
            registry.reads.insert(cohort.id, reads.clone());
            registry.processed
        };
        if processed <= cursor {
            return false;
        }
        match self.broker.recent_all(cursor, processed) {
            Some(events) => events.iter().any(|event| {
                touched_by(&event.table, event.row_id, event.scope)
                    .iter()
                    .any(|key| reads.contains(key))
            }),
            None => true,
        }
    }

    /// Forgets `cohort` (it ended).
    fn end(&self, cohort: &Cohort<K, F>) {
        let mut registry = self.lock();
        cohort.state().ended = true;
        Self::forget(&mut registry, cohort);
    }

    /// Removes `cohort` from the registry and the index (under the registry's lock, which
    /// `join` holds too: a joiner either finds the cohort alive or not at all).
    fn forget(registry: &mut Registry<K, F>, cohort: &Cohort<K, F>) {
        if registry
            .cohorts
            .get(&cohort.key)
            .is_some_and(|c| c.id == cohort.id)
        {
            registry.cohorts.remove(&cohort.key);
        }
        registry.by_id.remove(&cohort.id);
        for key in registry.reads.remove(&cohort.id).unwrap_or_default() {
            if let Some(ids) = registry.index.get_mut(&key) {
                ids.remove(&cohort.id);
                if ids.is_empty() {
                    registry.index.remove(&key);
                }
            }
        }
        cohort.ended.notify_waiters();
    }
}

/// Counts a runner while it lives, and (should its execution panic) marks its cohort as
/// not running, so the next change starts a runner again.
struct RunnerGuard<K, F>
where
    K: Clone + Hash + Eq + Send + Sync + 'static,
    F: Clone + Send + Sync + 'static,
{
    engine: Arc<Inner<K, F>>,
    cohort: Arc<Cohort<K, F>>,
}

impl<K, F> Drop for RunnerGuard<K, F>
where
    K: Clone + Hash + Eq + Send + Sync + 'static,
    F: Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        // A runner that returns has already said so under the state's lock (another may
        // have started since); only an unwinding one has not.
        if std::thread::panicking() {
            self.cohort.state().running = false;
        }
        self.engine.runners.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<K, F> Cohort<K, F> {
    fn state(&self) -> std::sync::MutexGuard<'_, CohortState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes a result: the first as is, later ones as a patch from the last one, and
    /// nothing when neither the data nor the errors changed.
    fn publish(
        &self,
        data: Value,
        errors: Option<String>,
        cursor: i64,
        encode_cursor: fn(i64) -> String,
    ) {
        let errors: Option<Arc<str>> = errors.map(Into::into);
        let text: Arc<str> = serde_json::to_string(&data)
            .unwrap_or_else(|_| "null".to_owned())
            .into();
        let previous = self.snapshots.borrow().clone();
        let (seq, patches) = match previous.as_deref() {
            Some(Snapshot {
                seq,
                body:
                    Body::Result {
                        data: old,
                        errors: old_errors,
                        patches,
                        ..
                    },
                ..
            }) => {
                let patch = json_patch::diff(old, &data);
                if patch.0.is_empty() && *old_errors == errors {
                    return;
                }
                let text = serde_json::to_string(&patch).unwrap_or_else(|_| "[]".to_owned());
                let operations = text
                    .strip_prefix('[')
                    .and_then(|t| t.strip_suffix(']'))
                    .unwrap_or_default();
                let mut patches = patches.clone();
                patches.push_back((seq + 1, operations.into()));
                // At most PATCH_HISTORY patches, and past the newest at most
                // PATCH_HISTORY_BYTES of them: one further behind gets the whole result.
                let mut bytes: usize = patches.iter().map(|(_, p)| p.len()).sum();
                while patches.len() > PATCH_HISTORY
                    || (patches.len() > 1 && bytes > PATCH_HISTORY_BYTES + operations.len())
                {
                    if let Some((_, oldest)) = patches.pop_front() {
                        bytes -= oldest.len();
                    }
                }
                (seq + 1, patches)
            }
            _ => (1, VecDeque::new()),
        };
        self.snapshots.send_replace(Some(Arc::new(Snapshot {
            seq,
            made: Mutex::default(),
            body: Body::Result {
                data: Arc::new(data),
                text,
                tail: tail(errors.as_deref(), &encode_cursor(cursor)).into(),
                errors,
                cursor,
                patches,
            },
        })));
    }

    fn publish_final(&self, last: F) {
        let seq = self.snapshots.borrow().as_ref().map_or(1, |s| s.seq + 1);
        self.snapshots.send_replace(Some(Arc::new(Snapshot {
            seq,
            made: Mutex::default(),
            body: Body::Final(last),
        })));
    }
}

/// A payload's ending after its revision: `errors` when there are any, and the cursor.
fn tail(errors: Option<&str>, cursor: &str) -> String {
    let mut tail = String::new();
    if let Some(errors) = errors {
        tail.push_str(",\"errors\":");
        tail.push_str(errors);
    }
    tail.push_str(",\"extensions\":{\"cursor\":");
    tail.push_str(&serde_json::to_string(cursor).unwrap_or_else(|_| "null".to_owned()));
    tail.push_str("}}");
    tail
}

/// One live query's stream: a member of its cohort. Leaving (drop) frees the cohort with
/// its last member.
pub struct Member<K, F>
where
    K: Clone + Hash + Eq + Send + Sync + 'static,
    F: Clone + Send + Sync + 'static,
{
    engine: Arc<Inner<K, F>>,
    cohort: Arc<Cohort<K, F>>,
    updates: watch::Receiver<Option<Arc<Snapshot<F>>>>,
    /// The engine's end (shutdown), which ends this stream.
    closed: watch::Receiver<bool>,
    /// The cohort's `seq` this member sent last.
    sent: Option<u64>,
    /// This stream's own counter, one per payload.
    revision: u64,
    done: bool,
}

impl<K, F> Member<K, F>
where
    K: Clone + Hash + Eq + Send + Sync + 'static,
    F: Clone + Send + Sync + 'static,
{
    fn new(
        engine: &Arc<Inner<K, F>>,
        cohort: Arc<Cohort<K, F>>,
        updates: watch::Receiver<Option<Arc<Snapshot<F>>>>,
    ) -> Self {
        Self {
            closed: engine.closed.subscribe(),
            engine: engine.clone(),
            cohort,
            updates,
            sent: None,
            revision: 0,
            done: false,
        }
    }

    /// The next payload, once the cohort has something this member has not sent; `None`
    /// after the final one.
    pub async fn next(&mut self) -> Option<Payload<F>> {
        if self.done {
            return None;
        }
        loop {
            if *self.closed.borrow() {
                self.done = true;
                return None;
            }
            let snapshot = self.updates.borrow_and_update().clone();
            if let Some(snapshot) = snapshot
                && Some(snapshot.seq) != self.sent
            {
                return Some(self.payload(&snapshot));
            }
            tokio::select! {
                changed = self.updates.changed() => if changed.is_err() {
                    return None;
                },
                _ = self.closed.changed() => {}
            }
        }
    }

    fn payload(&mut self, snapshot: &Snapshot<F>) -> Payload<F> {
        let behind = self.sent;
        self.sent = Some(snapshot.seq);
        match &snapshot.body {
            Body::Final(last) => {
                self.done = true;
                Payload::Final(last.clone())
            }
            Body::Result {
                text: whole,
                tail,
                cursor,
                patches,
                ..
            } => {
                self.revision += 1;
                let shared = |made: &[Made]| {
                    made.iter()
                        .find(|(sent, revision, _)| *sent == behind && *revision == self.revision)
                        .map(|(_, _, text)| text.clone())
                };
                let made = snapshot.made.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(text) = shared(&made) {
                    return Payload::Json {
                        text,
                        cursor: *cursor,
                    };
                }
                drop(made);
                let mut text = String::with_capacity(128);
                match behind {
                    None => {
                        text.push_str("{\"data\":");
                        text.push_str(whole);
                    }
                    Some(sent) => {
                        text.push_str("{\"patch\":[");
                        let missed = snapshot.seq - sent;
                        let covered = patches.iter().filter(|(seq, _)| *seq > sent).count();
                        if covered as u64 == missed {
                            let mut first = true;
                            for (_, operations) in patches.iter().filter(|(seq, _)| *seq > sent) {
                                if operations.is_empty() {
                                    continue;
                                }
                                if !first {
                                    text.push(',');
                                }
                                first = false;
                                text.push_str(operations);
                            }
                        } else {
                            // Too far behind for the kept patches: replace the whole result.
                            text.push_str("{\"op\":\"replace\",\"path\":\"\",\"value\":");
                            text.push_str(whole);
                            text.push('}');
                        }
                        text.push(']');
                    }
                }
                text.push_str(",\"revision\":");
                let _ = write!(text, "{}", self.revision);
                text.push_str(tail);
                let mut text: Arc<str> = text.into();
                let mut made = snapshot.made.lock().unwrap_or_else(|e| e.into_inner());
                // Another member in step may have made it meanwhile: share that one.
                if let Some(theirs) = shared(&made) {
                    text = theirs;
                } else if made.len() < MADE_PAYLOADS {
                    made.push((behind, self.revision, text.clone()));
                }
                Payload::Json {
                    text,
                    cursor: *cursor,
                }
            }
        }
    }
}

impl<K, F> Drop for Member<K, F>
where
    K: Clone + Hash + Eq + Send + Sync + 'static,
    F: Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        // Under the registry's lock, as `join`: a joiner cannot find the cohort between its
        // last member leaving and its removal.
        let mut registry = self.engine.lock();
        let last = {
            let mut state = self.cohort.state();
            state.members = state.members.saturating_sub(1);
            if state.members == 0 {
                state.ended = true;
            }
            state.members == 0
        };
        if last {
            Inner::forget(&mut registry, &self.cohort);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pubsub::{Memo, Op};
    use crate::store::reads::Table;
    use serde_json::json;

    /// A table of channel names in memory, standing in for the database: the engine is
    /// tested alone here; `tests/api/live_queries.rs` runs it against SQLite and PostgreSQL.
    #[derive(Default)]
    struct Names {
        rows: Mutex<HashMap<i64, String>>,
        runs: AtomicU64,
        /// Held by a test to keep executions waiting.
        gate: tokio::sync::RwLock<()>,
    }

    fn engine(broker: &Arc<Broker>, names: &Arc<Names>) -> LiveQueries<i64, &'static str> {
        let names = names.clone();
        let broker_for_cursor = broker.clone();
        LiveQueries::new(
            broker.clone(),
            Box::new(move |channel: i64| {
                let names = names.clone();
                let broker = broker_for_cursor.clone();
                Box::pin(async move {
                    let cursor = broker.published();
                    let _open = names.gate.read().await;
                    names.runs.fetch_add(1, Ordering::SeqCst);
                    if channel == -1 {
                        return Outcome::Final("refused");
                    }
                    if channel == 0 && names.runs.load(Ordering::SeqCst) == 1 {
                        return Outcome::Retry("failed");
                    }
                    if channel == -2 {
                        return Outcome::Retry("failing");
                    }
                    let name = names.rows.lock().unwrap().get(&channel).cloned();
                    Outcome::Result {
                        data: json!({ "channel": name.map(|n| json!({ "name": n })) }),
                        errors: None,
                        reads: [ReadKey::Row(Table::Channels, channel)].into(),
                        cursor,
                    }
                })
            }),
            4,
            |position| format!("c{position}"),
        )
    }

    fn rename(broker: &Broker, names: &Names, channel: i64, name: &str) {
        names.rows.lock().unwrap().insert(channel, name.to_owned());
        let position = broker.published() + 1;
        broker.publish(
            vec![Arc::new(ChangeEvent {
                position,
                table: "channels".into(),
                op: Op::Update,
                row_id: channel,
                scope: Some(channel),
                row: Value::Null,
                memo: Memo::default(),
            })],
            position,
        );
    }

    async fn next_json(member: &mut Member<i64, &'static str>) -> Value {
        match tokio::time::timeout(Duration::from_secs(5), member.next()).await {
            Ok(Some(Payload::Json { text, .. })) => serde_json::from_str(&text).unwrap(),
            Ok(Some(Payload::Final(f))) => panic!("final {f}"),
            Ok(None) => panic!("ended"),
            Err(_) => panic!("no payload within 5 s"),
        }
    }

    async fn quiet(member: &mut Member<i64, &'static str>) {
        assert!(
            tokio::time::timeout(Duration::from_millis(200), member.next())
                .await
                .is_err(),
            "expected nothing"
        );
    }

    fn start(broker: &Arc<Broker>, names: &Arc<Names>) -> (LiveQueries<i64, &'static str>, ()) {
        let live = engine(broker, names);
        tokio::spawn(live.clone().run(broker.subscribe_all()));
        (live, ())
    }

    #[tokio::test]
    async fn a_touching_change_patches_and_others_do_nothing() {
        let broker = Arc::new(Broker::new(0));
        let names = Arc::new(Names::default());
        names.rows.lock().unwrap().insert(1, "one".into());
        let (live, _stop) = start(&broker, &names);
        let mut member = live.join(1, Duration::ZERO);
        let first = next_json(&mut member).await;
        assert_eq!(first["data"], json!({ "channel": { "name": "one" } }));
        assert_eq!(first["revision"], 1);
        assert_eq!(first["extensions"]["cursor"], "c0");

        rename(&broker, &names, 2, "other");
        quiet(&mut member).await;
        assert_eq!(
            names.runs.load(Ordering::SeqCst),
            1,
            "channel 2 was not read"
        );

        rename(&broker, &names, 1, "uno");
        let patch = next_json(&mut member).await;
        assert_eq!(patch["revision"], 2);
        assert_eq!(
            patch["patch"],
            json!([{ "op": "replace", "path": "/channel/name", "value": "uno" }])
        );
        assert_eq!(patch["extensions"]["cursor"], "c2");

        // The same state again changes nothing: it runs, and sends nothing.
        rename(&broker, &names, 1, "uno");
        quiet(&mut member).await;
        assert_eq!(names.runs.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_cohort_runs_once_for_its_members_and_changes_fold() {
        let broker = Arc::new(Broker::new(0));
        let names = Arc::new(Names::default());
        names.rows.lock().unwrap().insert(1, "one".into());
        let (live, _stop) = start(&broker, &names);
        let mut a = live.join(1, Duration::ZERO);
        next_json(&mut a).await;
        let mut b = live.join(1, Duration::ZERO);
        assert_eq!(
            next_json(&mut b).await["revision"],
            1,
            "a late member starts at 1"
        );
        assert_eq!(live.cohorts(), 1);
        assert_eq!(names.runs.load(Ordering::SeqCst), 1);

        // Three changes while an execution waits: they fold into at most one more.
        let gate = names.gate.write().await;
        rename(&broker, &names, 1, "a");
        tokio::time::sleep(Duration::from_millis(50)).await;
        rename(&broker, &names, 1, "b");
        rename(&broker, &names, 1, "c");
        drop(gate);
        let mut last = Value::Null;
        while last.is_null() || last["patch"][0]["value"] != "c" {
            last = next_json(&mut a).await;
        }
        let b_last = next_json(&mut b).await;
        assert!(names.runs.load(Ordering::SeqCst) <= 3, "folded");
        // A member that was behind gets the missed patches in one payload.
        assert_eq!(b_last["revision"], 2);
        assert_eq!(
            b_last["patch"].as_array().unwrap().last().unwrap()["value"],
            "c"
        );
        drop(a);
        drop(b);
        assert_eq!(live.cohorts(), 0, "the last member frees the cohort");
    }

    #[tokio::test]
    async fn throttle_spaces_executions_and_the_last_state_wins() {
        let broker = Arc::new(Broker::new(0));
        let names = Arc::new(Names::default());
        names.rows.lock().unwrap().insert(1, "one".into());
        let (live, _stop) = start(&broker, &names);
        let mut member = live.join(1, Duration::from_millis(300));
        next_json(&mut member).await;
        let started = std::time::Instant::now();
        for name in ["a", "b", "c", "d"] {
            rename(&broker, &names, 1, name);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let patch = next_json(&mut member).await;
        assert!(started.elapsed() >= Duration::from_millis(250));
        assert_eq!(patch["patch"][0]["value"], "d");
        assert_eq!(names.runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_member_far_behind_gets_the_patches_joined_or_the_whole_result() {
        let broker = Arc::new(Broker::new(0));
        let names = Arc::new(Names::default());
        names.rows.lock().unwrap().insert(1, "v0".into());
        let (live, _) = start(&broker, &names);
        let mut fast = live.join(1, Duration::ZERO);
        let mut slow = live.join(1, Duration::ZERO);
        let mut slow_result = next_json(&mut slow).await["data"].clone();
        let mut fast_result = next_json(&mut fast).await["data"].clone();
        for round in [3, PATCH_HISTORY + 2] {
            for n in 0..round {
                rename(&broker, &names, 1, &format!("r{round}-{n}"));
                // The fast member reads each state, so every one is published.
                let patch = next_json(&mut fast).await;
                let patch: json_patch::Patch =
                    serde_json::from_value(patch["patch"].clone()).unwrap();
                json_patch::patch(&mut fast_result, &patch).unwrap();
            }
            let caught_up = next_json(&mut slow).await;
            let operations = caught_up["patch"].as_array().unwrap().clone();
            if round <= PATCH_HISTORY {
                assert_eq!(operations.len(), round, "{caught_up}");
            } else {
                assert_eq!(operations.len(), 1, "{caught_up}");
                assert_eq!(operations[0]["path"], "", "the whole result: {caught_up}");
            }
            let patch: json_patch::Patch =
                serde_json::from_value(caught_up["patch"].clone()).unwrap();
            json_patch::patch(&mut slow_result, &patch).unwrap();
            assert_eq!(slow_result, fast_result);
        }
    }

    #[tokio::test]
    async fn members_in_step_share_one_payload_text() {
        let broker = Arc::new(Broker::new(0));
        let names = Arc::new(Names::default());
        names.rows.lock().unwrap().insert(1, "one".into());
        let (live, _) = start(&broker, &names);
        let mut members: Vec<_> = (0..3).map(|_| live.join(1, Duration::ZERO)).collect();
        let mut texts = Vec::new();
        for member in &mut members {
            match tokio::time::timeout(Duration::from_secs(5), member.next()).await {
                Ok(Some(Payload::Json { text, .. })) => texts.push(text),
                _ => panic!("a first payload"),
            }
        }
        assert!(
            texts.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])),
            "one text for all"
        );
        rename(&broker, &names, 1, "two");
        texts.clear();
        for member in &mut members {
            match tokio::time::timeout(Duration::from_secs(5), member.next()).await {
                Ok(Some(Payload::Json { text, .. })) => texts.push(text),
                _ => panic!("a patch"),
            }
        }
        assert!(
            texts.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])),
            "one patch text for all"
        );
        assert!(texts[0].contains("\"revision\":2"));
    }

    #[tokio::test]
    async fn a_throttled_runner_ends_with_its_cohort() {
        let broker = Arc::new(Broker::new(0));
        let names = Arc::new(Names::default());
        names.rows.lock().unwrap().insert(1, "one".into());
        let (live, _) = start(&broker, &names);
        let mut member = live.join(1, Duration::from_secs(60));
        next_json(&mut member).await;
        rename(&broker, &names, 1, "two");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while live.runners() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "a runner waits out the throttle"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(member);
        while live.runners() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the runner ends with its cohort"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(live.cohorts(), 0);
        // A new member of the same key gets a new cohort, and it runs.
        let mut again = live.join(1, Duration::ZERO);
        assert_eq!(
            next_json(&mut again).await["data"]["channel"]["name"],
            "two"
        );
    }

    #[tokio::test]
    async fn a_failed_execution_is_retried_not_published() {
        let broker = Arc::new(Broker::new(0));
        let names = Arc::new(Names::default());
        names.rows.lock().unwrap().insert(0, "zero".into());
        let (live, _) = start(&broker, &names);
        let started = std::time::Instant::now();
        let mut member = live.join(0, Duration::ZERO);
        let first = next_json(&mut member).await;
        assert_eq!(first["revision"], 1);
        assert_eq!(first["data"]["channel"]["name"], "zero");
        assert!(
            started.elapsed() >= RETRY_AFTER / 2,
            "it waited before trying again"
        );
        assert_eq!(names.runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_cohort_that_keeps_failing_ends_with_the_last_errors() {
        let broker = Arc::new(Broker::new(0));
        let names = Arc::new(Names::default());
        let (live, _) = start(&broker, &names);
        live.inner.retry_after_ms.store(10, Ordering::Relaxed);
        let mut member = live.join(-2, Duration::ZERO);
        match tokio::time::timeout(Duration::from_secs(60), member.next()).await {
            Ok(Some(Payload::Final(last))) => assert_eq!(last, "failing"),
            _ => panic!("expected the final payload"),
        }
        assert_eq!(names.runs.load(Ordering::SeqCst), RETRIES as u64);
        assert_eq!(live.cohorts(), 0);
    }

    #[tokio::test]
    async fn members_end_when_the_feed_closes() {
        let broker = Arc::new(Broker::new(0));
        let names = Arc::new(Names::default());
        names.rows.lock().unwrap().insert(1, "one".into());
        let (live, _) = start(&broker, &names);
        let mut member = live.join(1, Duration::ZERO);
        next_json(&mut member).await;
        broker.close();
        let ended = tokio::time::timeout(Duration::from_secs(5), member.next()).await;
        assert!(matches!(ended, Ok(None)), "the stream ends at shutdown");
    }

    #[tokio::test]
    async fn a_final_outcome_ends_every_member() {
        let broker = Arc::new(Broker::new(0));
        let names = Arc::new(Names::default());
        let (live, _stop) = start(&broker, &names);
        let mut member = live.join(-1, Duration::ZERO);
        match tokio::time::timeout(Duration::from_secs(5), member.next()).await {
            Ok(Some(Payload::Final(last))) => assert_eq!(last, "refused"),
            _ => panic!("expected the final payload"),
        }
        assert!(member.next().await.is_none());
        assert_eq!(live.cohorts(), 0);
    }

    #[tokio::test]
    async fn a_change_during_the_first_execution_is_not_missed() {
        let broker = Arc::new(Broker::new(0));
        let names = Arc::new(Names::default());
        names.rows.lock().unwrap().insert(1, "one".into());
        let (live, _stop) = start(&broker, &names);
        // The execution takes its cursor, then waits; meanwhile the change is published
        // and matched before the cohort's read set is indexed.
        let gate = names.gate.write().await;
        let mut member = live.join(1, Duration::ZERO);
        tokio::time::sleep(Duration::from_millis(50)).await;
        names.rows.lock().unwrap().insert(1, "late".into());
        rename(&broker, &names, 1, "late");
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(gate);
        let mut seen = next_json(&mut member).await;
        // Either the first result already holds it (and a second run changes nothing), or a
        // patch brings it.
        if seen["data"]["channel"]["name"] != "late" {
            seen = next_json(&mut member).await;
            assert_eq!(seen["patch"][0]["value"], "late");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while names.runs.load(Ordering::SeqCst) < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "it runs again in time"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
