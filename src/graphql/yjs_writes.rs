//! Yjs updates of one document written together: while one write of a document runs, the
//! updates that arrive for it wait and then go in one transaction (`store::yjs::apply_all`):
//! one lock of the row, one read of what changed, one commit for all of them, each still
//! stored as its own update with its own version and feed position. A document edited by
//! a hundred peers at once would otherwise take the row's lock, read and commit once per
//! keystroke, one after another, and fall behind (see BENCHMARKS.md, "Co-editing").
//!
//! Both the y-websocket endpoint and `applyDocumentUpdate` write through here. An update the
//! document refuses is answered alone; the others of its batch are written again without it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::{Committed, Live};
use crate::store::yjs::{self, Applied, BatchError};
use crate::store::{self, StoreError};

/// The document writers of one process.
#[derive(Clone)]
pub struct YjsWrites(Arc<Inner>);

struct Inner {
    /// Per document being written: the updates waiting for the next write. A document is
    /// here exactly while its writer task runs.
    waiting: Mutex<HashMap<i64, Vec<Job>>>,
    writes: store::Writes,
    live: Live,
    cache: yjs::Cache,
}

/// Removes a document's entry when its writer panics (it removes it itself otherwise).
struct Running<'a> {
    inner: &'a Inner,
    id: i64,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut waiting = self.inner.waiting.lock().unwrap_or_else(|e| e.into_inner());
            waiting.remove(&self.id);
        }
    }
}

struct Job {
    viewer: i64,
    /// The update, Yjs v1 (decoded again for each try: a yrs `Update` cannot be copied).
    update: Vec<u8>,
    answer: oneshot::Sender<Result<Applied, StoreError>>,
}

impl YjsWrites {
    pub fn new(writes: store::Writes, live: Live, cache: yjs::Cache) -> Self {
        Self(Arc::new(Inner {
            waiting: Mutex::default(),
            writes,
            live,
            cache,
        }))
    }

    /// Applies `update` (Yjs v1) to document `id` for `viewer`, with whatever else arrives
    /// for that document meanwhile; answers once it is committed (or refused).
    pub async fn apply(
        &self,
        viewer: i64,
        id: i64,
        update: Vec<u8>,
    ) -> Result<Applied, StoreError> {
        let (answer, answered) = oneshot::channel();
        let job = Job {
            viewer,
            update,
            answer,
        };
        let start = {
            let mut waiting = self.0.waiting.lock().unwrap_or_else(|e| e.into_inner());
            match waiting.get_mut(&id) {
                Some(jobs) => {
                    jobs.push(job);
                    false
                }
                None => {
                    waiting.insert(id, vec![job]);
                    true
                }
            }
        };
        if start {
            tokio::spawn(self.0.clone().run(id));
        }
        answered.await.map_err(|_| {
            StoreError::Db(sea_orm::DbErr::Custom(
                "the document's writer stopped".to_owned(),
            ))
        })?
    }
}

impl Inner {
    /// Writes document `id`'s waiting updates, batch after batch, until none are left.
    async fn run(self: Arc<Self>, id: i64) {
        // Should a write panic, the document is not left blocked: the guard removes its
        // entry, and the updates waiting there are answered with an error (their senders
        // are dropped).
        let _running = Running { inner: &self, id };
        loop {
            let jobs = {
                let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
                match waiting.get_mut(&id) {
                    Some(jobs) if !jobs.is_empty() => std::mem::take(jobs),
                    _ => {
                        waiting.remove(&id);
                        return;
                    }
                }
            };
            self.write(id, jobs).await;
        }
    }

    /// Writes `jobs` in one transaction; a refused one is answered and the rest tried again.
    async fn write(&self, id: i64, mut jobs: Vec<Job>) {
        while !jobs.is_empty() {
            let started = std::time::Instant::now();
            let updates: Vec<(i64, Vec<u8>)> = jobs
                .iter()
                .map(|job| (job.viewer, job.update.clone()))
                .collect();
            let cache = self.cache.clone();
            let written = Committed::with(Some(&self.live), &self.writes)
                .write(move |db| {
                    Box::pin(async move {
                        let mut decoded = Vec::with_capacity(updates.len());
                        for (index, (viewer, update)) in updates.into_iter().enumerate() {
                            match yjs::decode_v1(&update) {
                                Ok(update) => decoded.push((viewer, update)),
                                Err(err) => return Ok(Err(BatchError::Refused(index, err.into()))),
                            }
                        }
                        // Refusals come back as values: this write then stored nothing (the
                        // batch's own transaction was not committed).
                        Ok(yjs::apply_all(&db, id, decoded, &cache).await)
                    })
                })
                .await;
            tracing::debug!(
                document = id,
                updates = jobs.len(),
                micros = started.elapsed().as_micros() as u64,
                "wrote Yjs updates together"
            );
            match written {
                Ok(Ok(outcomes)) => {
                    let stats = &self.live.broker.stats;
                    let stored = outcomes
                        .iter()
                        .filter(
                            |outcome| matches!(outcome, Ok(applied) if applied.position.is_some()),
                        )
                        .count();
                    if stored > 0 {
                        crate::pubsub::FeedStats::add(&stats.yjs_writes, 1);
                        crate::pubsub::FeedStats::add(&stats.yjs_updates, stored as u64);
                    }
                    for (job, outcome) in jobs.drain(..).zip(outcomes) {
                        let _ = job.answer.send(outcome);
                    }
                }
                Ok(Err(BatchError::Refused(index, err))) => {
                    let refused = jobs.remove(index);
                    let _ = refused.answer.send(Err(err));
                }
                Ok(Err(BatchError::Failed(err))) | Err(err) => {
                    // The first gets the error itself (logged once where it is mapped), the
                    // others a copy.
                    let mut all = std::mem::take(&mut jobs).into_iter();
                    let first = all.next();
                    for job in all {
                        let _ = job.answer.send(Err(yjs::copy_of(&err)));
                    }
                    if let Some(first) = first {
                        let _ = first.answer.send(Err(err));
                    }
                }
            }
        }
    }
}
