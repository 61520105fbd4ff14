//! Live subscriptions as small entries in their topic's cohorts, driven once per topic.
//!
//! A subscription that has caught up (its `Follower` returned `Next::Live`) joins its topic:
//! it becomes a `Member` (its `FollowState`, its shape, and where its deliveries go) in the
//! cohort of its shape. One task per topic with members, its `Driver`, takes each event of
//! the topic from the hub once, decides for each member what the event means to it (the
//! same `FollowState::step` a follower uses: filter, revocation, end), renders the event
//! once per cohort (the shape's `Render`), and pushes the shared rendering into each
//! member's `Inbox` together with the member's key. A transport drains its inbox and frames
//! each rendering with the key's operation id; nothing is built per subscriber here but a
//! pointer.
//!
//! Order and exactly once: the driver subscribes to the topic before it reads how far the
//! log is published (`through`), and considers every event after that once, in order. A
//! member carries the position it has considered (`seen`): a member that joins behind the
//! driver is first given the events it missed from the broker's memory, one that joins
//! ahead skips what it has. A member whose inbox holds `INBOX_LIMIT` deliveries (its
//! consumer does not keep up) leaves the cohort as `Delivery::Behind`, after everything
//! pushed before; its consumer catches it up with its own `Follower` (`Follower::resume`,
//! from the broker's memory or the log) and joins again once live. So a slow consumer costs
//! a bounded inbox and a log read, never the topic's other members.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use sea_orm::DatabaseConnection;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{Notify, mpsc};

use super::follow::{FollowState, LiveError, Step, catch_up};
use crate::pubsub::{Broker, ChangeEvent, FeedStats, TopicReceiver};

/// Deliveries an inbox holds before the subscriptions that push to it leave their cohorts
/// to catch up on their own (`Delivery::Behind`).
pub const INBOX_LIMIT: usize = 4096;

/// A driver with more of its topic's events waiting than this reports its topic as behind
/// (`Broker::topic_lagging`), which makes this process's writers wait for it.
pub const DRIVER_BACKLOG: usize = 8;

/// One event's (or error's) rendering under one shape: the response's JSON text (`None`
/// when the subscription yields nothing for it) and the codes of its errors, which the
/// transport counts per delivery.
#[derive(Debug, Default)]
pub struct Rendered {
    pub json: Option<Arc<str>>,
    pub codes: Vec<String>,
}

/// How the members of one cohort see events. The engine knows no GraphQL: the transport's
/// side implements this (a subscription document, run once per event).
pub trait Render: Send + Sync + 'static {
    /// `event` as this shape's members receive it.
    fn render(self: Arc<Self>, event: Arc<ChangeEvent>) -> BoxFuture<'static, Arc<Rendered>>;
    /// The error that ends a member's subscription, as it receives it.
    fn render_error(self: Arc<Self>, error: LiveError) -> BoxFuture<'static, Arc<Rendered>>;
}

/// A cohort's rendering: shared by every subscription of one shape (compared by pointer).
pub type Shape = Arc<dyn Render>;

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

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn id(self: &Arc<Self>) -> usize {
        Arc::as_ptr(self) as usize
    }
}

/// A subscription held by its topic's driver.
pub struct Member {
    /// Tells its deliveries apart from the inbox's other subscriptions'.
    pub key: u64,
    pub inbox: Arc<Inbox>,
    pub shape: Shape,
    pub state: FollowState,
    /// Set while the driver removes it.
    gone: Option<Gone>,
}

/// Why a member leaves its cohort.
enum Gone {
    /// Ended (its end is queued).
    Ended,
    /// Its inbox is full: it catches up on its own, from `seen`.
    Behind,
    /// Its consumer is gone.
    Dropped,
}

impl Member {
    pub fn new(key: u64, inbox: Arc<Inbox>, shape: Shape, state: FollowState) -> Member {
        Member {
            key,
            inbox,
            shape,
            state,
            gone: None,
        }
    }
}

enum Command {
    Join(Box<Member>),
    /// The inbox's member `key`, or all of its members.
    Leave {
        inbox: usize,
        key: Option<u64>,
    },
}

/// Every topic's driver, started by its first member and ended with its last.
pub struct Cohorts {
    broker: Arc<Broker>,
    db: DatabaseConnection,
    topics: Mutex<HashMap<i64, mpsc::UnboundedSender<Command>>>,
}

impl Cohorts {
    pub fn new(broker: Arc<Broker>, db: DatabaseConnection) -> Arc<Cohorts> {
        Arc::new(Cohorts {
            broker,
            db,
            topics: Mutex::new(HashMap::new()),
        })
    }

    fn topics(&self) -> std::sync::MutexGuard<'_, HashMap<i64, mpsc::UnboundedSender<Command>>> {
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands `member` to its topic's driver (starting one if the topic has none). From
    /// here on its deliveries arrive in its inbox, after any `Render` already there.
    pub fn join(self: &Arc<Self>, member: Member) {
        let topic = member.state.topic;
        let mut topics = self.topics();
        let mut command = Command::Join(Box::new(member));
        if let Some(driver) = topics.get(&topic) {
            match driver.send(command) {
                Ok(()) => return,
                Err(mpsc::error::SendError(back)) => command = back,
            }
        }
        let (sender, commands) = mpsc::unbounded_channel();
        let _ = sender.send(command);
        topics.insert(topic, sender.clone());
        // Subscribed before reading the published position (see `Driver::through`).
        let receiver = self.broker.subscribe(topic);
        let through = self.broker.published();
        let driver = Driver {
            cohorts: self.clone(),
            own: sender.clone(),
            topic,
            receiver,
            through,
            commands,
            shapes: Vec::new(),
            members: 0,
            lagging: false,
        };
        tokio::spawn(driver.run());
    }

    /// Removes the inbox's member `key` (or, with `None`, every member of the inbox) from
    /// `topic`'s cohorts: the subscription was stopped, or its consumer is gone.
    pub fn leave(&self, topic: i64, inbox: &Arc<Inbox>, key: Option<u64>) {
        if let Some(driver) = self.topics().get(&topic) {
            let _ = driver.send(Command::Leave {
                inbox: inbox.id(),
                key,
            });
        }
    }

    /// How many topics have a driver.
    pub fn topic_count(&self) -> usize {
        self.topics().len()
    }
}

/// The members of one shape in one topic.
struct Cohort {
    shape: Shape,
    /// Members of one inbox sit next to each other, so each event locks each inbox once.
    members: Vec<Member>,
}

/// One topic's task: takes each of its events once and serves every member.
struct Driver {
    cohorts: Arc<Cohorts>,
    /// Its own entry in the map, to tell it from a later driver's.
    own: mpsc::UnboundedSender<Command>,
    topic: i64,
    receiver: TopicReceiver,
    /// Every event of the topic up to here has been considered for every member (the
    /// receiver was in place when this was read, so every later event reaches it).
    through: i64,
    commands: mpsc::UnboundedReceiver<Command>,
    shapes: Vec<Cohort>,
    members: usize,
    /// Reported as behind (`Broker::topic_lagging`).
    lagging: bool,
}

impl Driver {
    /// Reports whether more events wait than it should let pile up.
    fn note_backlog(&mut self, lagging: bool) {
        if lagging != self.lagging {
            self.lagging = lagging;
            self.cohorts.broker.topic_lagging(lagging);
        }
    }

    async fn run(mut self) {
        loop {
            tokio::select! {
                biased;
                command = self.commands.recv() => match command {
                    Some(command) => self.command(command).await,
                    // Every sender is gone (it holds one itself: not while it runs).
                    None => return,
                },
                event = self.receiver.recv() => match event {
                    Ok(event) => {
                        self.event(event).await;
                        self.note_backlog(self.receiver.len() > DRIVER_BACKLOG);
                        // One event per turn: other tasks (the sockets draining what this
                        // pushed, the writes) run between events, so a topic that cannot
                        // keep up slows its writers instead of building up latency.
                        tokio::task::yield_now().await;
                    }
                    Err(RecvError::Lagged(_)) => {
                        FeedStats::add(&self.cohorts.broker.stats.lagged, 1);
                        self.note_backlog(true);
                        self.catch_up().await;
                        self.note_backlog(self.receiver.len() > DRIVER_BACKLOG);
                    }
                    Err(RecvError::Closed) => {
                        // The server is shutting down: every subscription ends, those
                        // still joining too.
                        self.retire(true);
                        self.commands.close();
                        while let Ok(command) = self.commands.try_recv() {
                            if let Command::Join(member) = command {
                                member.inbox.push([Delivery::End { key: member.key }]);
                            }
                        }
                        self.end_all();
                        return;
                    }
                },
            }
            if self.members == 0 && self.retire(false) {
                return;
            }
        }
    }

    /// Leaves the map when no member is left and no command waits (`force`: in any case).
    /// False when a command came meanwhile: it is handled first.
    fn retire(&mut self, force: bool) -> bool {
        let mut topics = self.cohorts.topics();
        if !force && !self.commands.is_empty() {
            return false;
        }
        // Under the lock nobody sends meanwhile.
        if topics
            .get(&self.topic)
            .is_some_and(|entry| entry.same_channel(&self.own))
        {
            topics.remove(&self.topic);
        }
        true
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::Join(member) => self.join(member).await,
            Command::Leave { inbox, key } => {
                for cohort in &mut self.shapes {
                    let before = cohort.members.len();
                    cohort.members.retain(|member| {
                        member.inbox.id() != inbox || key.is_some_and(|key| key != member.key)
                    });
                    self.members -= before - cohort.members.len();
                }
                self.shapes.retain(|cohort| !cohort.members.is_empty());
            }
        }
    }

    async fn join(&mut self, mut member: Box<Member>) {
        if member.inbox.is_closed() {
            return;
        }
        // Behind the driver: the events it missed first, from the broker's memory (else it
        // catches up on its own and comes back).
        if member.state.seen < self.through {
            let Some(missed) =
                self.cohorts
                    .broker
                    .recent(self.topic, member.state.seen, self.through)
            else {
                let inbox = member.inbox.clone();
                inbox.push([Delivery::Behind(member)]);
                return;
            };
            let mut out = Vec::new();
            for event in missed {
                let mut rendered = None;
                offer(&mut member, &event, &mut rendered, &mut out).await;
                if member.gone.is_some() {
                    member.inbox.push(out);
                    return;
                }
            }
            member.state.seen = self.through;
            member.inbox.push(out);
        }
        let cohort = match self
            .shapes
            .iter_mut()
            .position(|cohort| Arc::ptr_eq(&cohort.shape, &member.shape))
        {
            Some(at) => &mut self.shapes[at],
            None => {
                self.shapes.push(Cohort {
                    shape: member.shape.clone(),
                    members: Vec::new(),
                });
                let last = self.shapes.len() - 1;
                &mut self.shapes[last]
            }
        };
        let at = cohort
            .members
            .iter()
            .rposition(|other| Arc::ptr_eq(&other.inbox, &member.inbox))
            .map_or(cohort.members.len(), |at| at + 1);
        cohort.members.insert(at, *member);
        self.members += 1;
    }

    /// Serves `event` to every member.
    async fn event(&mut self, event: Arc<ChangeEvent>) {
        if event.position <= self.through {
            return;
        }
        let before = self.through;
        self.through = event.position;
        let mut delivered = 0;
        let mut out = Vec::new();
        let mut any_gone = false;
        let many_shapes = self.shapes.len() > 1;
        for cohort in &mut self.shapes {
            let Cohort { shape, members } = cohort;
            let mut rendered = None;
            let mut start = 0;
            while start < members.len() {
                let inbox = members[start].inbox.clone();
                let end = start
                    + members[start..]
                        .iter()
                        .position(|member| !Arc::ptr_eq(&member.inbox, &inbox))
                        .unwrap_or(members.len() - start);
                if inbox.is_closed() {
                    for member in &mut members[start..end] {
                        member.gone = Some(Gone::Dropped);
                    }
                    any_gone = true;
                } else if inbox.len() >= INBOX_LIMIT {
                    // Its consumer does not keep up: each of its members catches up on
                    // its own, from here.
                    for member in &mut members[start..end] {
                        member.state.seen = member.state.seen.max(before);
                        member.gone = Some(Gone::Behind);
                    }
                    any_gone = true;
                } else {
                    for member in &mut members[start..end] {
                        if event.position <= member.state.seen {
                            // Joined ahead of the driver.
                            continue;
                        }
                        delivered +=
                            offer_shared(member, shape, &event, &mut rendered, &mut out).await;
                        any_gone |= member.gone.is_some();
                    }
                    if !out.is_empty() {
                        inbox.push(out.drain(..));
                    }
                }
                start = end;
            }
            // Counted before others run: what was pushed may be read at once.
            FeedStats::add(&self.cohorts.broker.stats.delivered, delivered);
            delivered = 0;
            if rendered.is_some() && many_shapes {
                // A render per shape can take a while with many shapes: let others run.
                tokio::task::yield_now().await;
            }
        }
        if any_gone {
            self.remove_gone();
        }
    }

    /// Takes out the members that ended, fell behind or lost their consumer.
    fn remove_gone(&mut self) {
        for cohort in &mut self.shapes {
            for mut member in cohort
                .members
                .extract_if(.., |member| member.gone.is_some())
            {
                self.members -= 1;
                if let Some(Gone::Behind) = member.gone.take() {
                    FeedStats::add(&self.cohorts.broker.stats.lagged, 1);
                    let inbox = member.inbox.clone();
                    inbox.push([Delivery::Behind(Box::new(member))]);
                }
            }
        }
        self.shapes.retain(|cohort| !cohort.members.is_empty());
    }

    /// After the driver lagged behind its topic's buffer: the events it missed, from the
    /// broker's memory or the log, then live again. A failed read sends every member to
    /// catch up on its own (each then meets the failure and reports it).
    async fn catch_up(&mut self) {
        let target = self.cohorts.broker.published();
        while self.through < target {
            let read = catch_up(
                &self.cohorts.broker,
                &self.cohorts.db,
                self.topic,
                self.through,
                target,
            )
            .await;
            match read {
                Ok((events, complete)) => {
                    for event in events {
                        self.event(event).await;
                    }
                    if complete {
                        self.through = self.through.max(target);
                    }
                }
                Err(err) => {
                    tracing::warn!(topic = self.topic, error = %err, "a topic's driver could not catch up; its subscriptions catch up on their own");
                    for cohort in &mut self.shapes {
                        for member in &mut cohort.members {
                            member.state.seen = member.state.seen.max(self.through);
                            member.gone = Some(Gone::Behind);
                        }
                    }
                    self.remove_gone();
                    self.through = target;
                    return;
                }
            }
        }
    }

    /// At shutdown: every member's subscription ends.
    fn end_all(&mut self) {
        for cohort in self.shapes.drain(..) {
            for member in cohort.members {
                member.inbox.push([Delivery::End { key: member.key }]);
            }
        }
        self.members = 0;
    }
}

impl Drop for Driver {
    /// However it ends (a render that panicked included): its members' subscriptions end,
    /// and its entry leaves the map, so that no subscription waits for a driver that is gone.
    fn drop(&mut self) {
        self.note_backlog(false);
        self.end_all();
        self.retire(true);
    }
}

/// Offers `event` to one member (outside any cohort: a joiner's missed events), rendering
/// it with the member's shape.
async fn offer(
    member: &mut Member,
    event: &Arc<ChangeEvent>,
    rendered: &mut Option<Arc<Rendered>>,
    out: &mut Vec<Delivery>,
) {
    if event.position <= member.state.seen {
        return;
    }
    let shape = member.shape.clone();
    offer_shared(member, &shape, event, rendered, out).await;
    member.state.seen = event.position;
}

/// Offers `event` to `member`: pushes what it receives into `out`, marks it gone when its
/// subscription ends. `rendered` holds the cohort's rendering of the event once made. The
/// number of events delivered (0 or 1).
async fn offer_shared(
    member: &mut Member,
    shape: &Shape,
    event: &Arc<ChangeEvent>,
    rendered: &mut Option<Arc<Rendered>>,
    out: &mut Vec<Delivery>,
) -> u64 {
    let key = member.key;
    let (deliver, end) = match member.state.step(event) {
        Step::Skip => return 0,
        Step::Deliver => (true, false),
        Step::DeliverThenEnd => (true, true),
        Step::End => (false, true),
        Step::Revoked => {
            let error = shape.clone().render_error(LiveError::Revoked).await;
            out.push(Delivery::Render {
                key,
                rendered: error,
                position: None,
            });
            (false, true)
        }
    };
    let mut delivered = 0;
    if deliver {
        let rendering = match rendered {
            Some(rendering) => rendering.clone(),
            None => {
                let rendering = shape.clone().render(event.clone()).await;
                *rendered = Some(rendering.clone());
                rendering
            }
        };
        if rendering.json.is_some() {
            out.push(Delivery::Render {
                key,
                rendered: rendering,
                position: Some(event.position),
            });
            delivered = 1;
        }
    }
    if end {
        out.push(Delivery::End { key });
        member.gone = Some(Gone::Ended);
    }
    delivered
}

#[cfg(test)]
mod tests;
