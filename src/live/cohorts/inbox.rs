//! Where a transport receives its subscriptions' deliveries: one queue per socket (or HTTP
//! event stream), shared by its subscriptions and told apart by key.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::{Member, Rendered};

/// What a driver (or a follower's consumer) hands a transport for one subscription.
pub enum Delivery {
    /// Send this rendering to subscription `key`. `position`: the event's place in the feed
    /// (`None` for an error, which the subscription's end follows).
    Render {
        key: u64,
        rendered: Arc<Rendered>,
        position: Option<i64>,
    },
    /// Subscription `key` has ended (after its last rendering).
    End { key: u64 },
    /// The member fell behind its inbox: it left its cohort, with everything before this
    /// delivered. Catch it up (`Follower::resume`) and join again.
    Behind(Box<Member>),
}

/// Where a transport's subscriptions receive their deliveries: one per socket (or per HTTP
/// event stream), shared by all its subscriptions, told apart by key.
#[derive(Default)]
pub struct Inbox {
    queue: Mutex<VecDeque<Delivery>>,
    /// Deliveries queued (read without the lock by drivers deciding whether to detach).
    len: AtomicUsize,
    ready: Notify,
    /// Set when the consumer is gone: its members are dropped instead of served.
    closed: AtomicBool,
}

impl Inbox {
    pub fn new() -> Arc<Inbox> {
        Arc::default()
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Delivery>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `deliveries`, waking the consumer. Once the inbox is closed they are dropped
    /// instead (a member sent behind into a closed inbox would otherwise hold the inbox that
    /// holds it, and never be freed).
    pub fn push(&self, deliveries: impl IntoIterator<Item = Delivery>) {
        let mut dropped = Vec::new();
        let woke = {
            let mut queue = self.queue();
            if self.is_closed() {
                dropped.extend(deliveries);
                false
            } else {
                let before = queue.len();
                queue.extend(deliveries);
                self.len.store(queue.len(), Ordering::Relaxed);
                before == 0 && !queue.is_empty()
            }
        };
        // Dropped outside the lock (a member's state has guards of its own).
        drop(dropped);
        if woke {
            self.ready.notify_one();
        }
    }

    /// Moves up to `max` deliveries into `into`, in order.
    pub fn take(&self, max: usize, into: &mut Vec<Delivery>) {
        let mut queue = self.queue();
        let n = max.min(queue.len());
        into.extend(queue.drain(..n));
        self.len.store(queue.len(), Ordering::Relaxed);
        if !queue.is_empty() {
            // What is left must not wait for the next push to wake the consumer.
            self.ready.notify_one();
        }
    }

    /// How many deliveries wait.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves when deliveries may be waiting (possibly spuriously: check with `take`).
    pub async fn ready(&self) {
        self.ready.notified().await
    }

    /// The consumer is gone: drivers drop its members when they next meet them, and what
    /// is pushed from now on is dropped.
    pub fn close(&self) {
        let dropped = {
            let mut queue = self.queue();
            // Under the lock, so no push lands after the queue is emptied.
            self.closed.store(true, Ordering::Release);
            self.len.store(0, Ordering::Relaxed);
            std::mem::take(&mut *queue)
        };
        drop(dropped);
    }

    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(super) fn id(self: &Arc<Self>) -> usize {
        Arc::as_ptr(self) as usize
    }
}
