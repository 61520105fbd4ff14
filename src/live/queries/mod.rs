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

mod member;
pub use member::Member;
use member::tail;

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

#[cfg(test)]
mod tests;
