//! A live query's stream: one member of its cohort, and the payloads it sends (the
//! cohort's shared texts, or its own when it is out of step).

use std::fmt::Write as _;
use std::hash::Hash;
use std::sync::Arc;

use tokio::sync::watch;

use super::{Body, Cohort, Inner, MADE_PAYLOADS, Made, Payload, Snapshot};

/// A payload's ending after its revision: `errors` when there are any, and the cursor.
pub(super) fn tail(errors: Option<&str>, cursor: &str) -> String {
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
    pub(super) fn new(
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
