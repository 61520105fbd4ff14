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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use sea_orm::DatabaseConnection;
use tokio::sync::mpsc;

mod driver;
mod inbox;

use driver::Driver;
pub use inbox::{Delivery, Inbox};

use super::follow::{FollowState, LiveError};
use crate::pubsub::{Broker, ChangeEvent};

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
        tokio::spawn(Driver::new(self.clone(), sender, commands, topic, receiver, through).run());
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

#[cfg(test)]
mod tests;
