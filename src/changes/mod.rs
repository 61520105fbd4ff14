//! The change feed's reading side: the tailer that follows `change_log` in position order
//! with a gap-free algorithm and publishes to the hub, the doorbell that wakes it, the
//! retention pruner, and the log reads that subscriptions replay from. No GraphQL here.

mod listener;
pub(crate) mod log;
mod prune;
mod tailer;

use std::sync::Arc;

use sea_orm::DbErr;
use tokio::sync::Notify;

pub use listener::{PostgresDoorbell, Relay, announce_commits};
pub use log::{lag, pruned_through, read_scope};
pub use prune::{Pruner, Retention};
pub use tailer::{Sink, Tailer};

/// What reading or following the change log can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("database error while reading the change log")]
    Db(#[from] DbErr),
    #[error("cannot listen for change notifications")]
    Listen(#[source] sea_orm::sqlx::Error),
    #[error("the relay's lock connection failed: {0}")]
    Lock(#[source] sea_orm::sqlx::Error),
    #[error("a read of the change log took over {0:?}")]
    Timeout(std::time::Duration),
    #[error("the bus: {0}")]
    Bus(String),
    #[error("undecodable change_log row at position {position}: {reason}")]
    Decode { position: i64, reason: String },
}

/// A bell: `ring` wakes whoever `wait`s, now or at its next wait (a ring with nobody waiting
/// is kept, so a wake-up between a read and the wait is not lost; rings before the wait
/// make one wake-up). As the tailer's doorbell it is rung after our own commits (every
/// backend) and by Postgres NOTIFY; as the `Announcer`, after our own commits. A second
/// waiter gets a `tee` of its own (the bus's relay beside the follower).
#[derive(Clone, Debug, Default)]
pub struct Doorbell(Arc<Bell>);

#[derive(Debug, Default)]
struct Bell {
    notify: Notify,
    tees: std::sync::Mutex<Vec<Doorbell>>,
}

impl Doorbell {
    /// Wakes the waiter (now, or at its next wait), and every tee's.
    pub fn ring(&self) {
        self.0.notify.notify_one();
        for tee in self.0.tees.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            tee.ring();
        }
    }

    /// Another bell, rung whenever this one is, for another waiter.
    pub fn tee(&self) -> Doorbell {
        let tee = Doorbell::default();
        self.0
            .tees
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tee.clone());
        tee
    }

    /// Waits for a ring.
    pub async fn wait(&self) {
        self.0.notify.notified().await;
    }
}

/// Rung after each of this process's own commits: on PostgreSQL, `announce_commits` then
/// wakes the other processes with one NOTIFY, sent after the commit and outside it, at most
/// one per `ANNOUNCE_EVERY` (the trigger does not NOTIFY for the server's own connections).
/// A bell like the `Doorbell`: a ring during a NOTIFY makes one more after it.
pub type Announcer = Doorbell;
