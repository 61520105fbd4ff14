//! A topic's driver: the one task that takes each of its topic's events once and serves
//! every member of its cohorts (see the parent module).

use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

use super::{
    Cohorts, Command, DRIVER_BACKLOG, Delivery, Gone, INBOX_LIMIT, Member, Rendered, Shape,
};
use crate::live::follow::{LiveError, Step, catch_up};
use crate::pubsub::{ChangeEvent, FeedStats, TopicReceiver};

/// The members of one shape in one topic.
struct Cohort {
    shape: Shape,
    /// Members of one inbox sit next to each other, so each event locks each inbox once.
    members: Vec<Member>,
}

/// One topic's task: takes each of its events once and serves every member.
pub(super) struct Driver {
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
    pub(super) fn new(
        cohorts: Arc<Cohorts>,
        own: mpsc::UnboundedSender<Command>,
        commands: mpsc::UnboundedReceiver<Command>,
        topic: i64,
        receiver: TopicReceiver,
        through: i64,
    ) -> Driver {
        Driver {
            cohorts,
            own,
            topic,
            receiver,
            through,
            commands,
            shapes: Vec::new(),
            members: 0,
            lagging: false,
        }
    }

    /// Reports whether more events wait than it should let pile up.
    fn note_backlog(&mut self, lagging: bool) {
        if lagging != self.lagging {
            self.lagging = lagging;
            self.cohorts.broker.topic_lagging(lagging);
        }
    }

    pub(super) async fn run(mut self) {
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
