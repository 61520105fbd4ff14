//! Postgres doorbell: a dedicated LISTEN connection on channel `change_log`. NOTIFY only
//! wakes the tailer; notifications are lost while disconnected, so every (re)connect rings
//! once more, after LISTEN is active, and the tailer re-reads from its last position. And
//! the other side: `announce_commits` NOTIFYs the other processes of this one's commits.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::watch;

use sea_orm::{ConnectionTrait, DatabaseConnection};

use super::{Announcer, ChangeError, Doorbell};

/// The NOTIFY channel the `log_change()` trigger signals.
pub const CHANNEL: &str = "change_log";

/// The name the LISTEN connection shows in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "syncgraph-listener";

/// Another channel the LISTEN connection serves, and what takes its payloads (awareness
/// between processes: `collab::awareness`).
pub type Relay = (&'static str, Arc<dyn Fn(&str) + Send + Sync>);

/// A LISTEN connection that rings the doorbell.
pub struct PostgresDoorbell {
    options: PgConnectOptions,
    listener: PgListener,
    doorbell: Doorbell,
    relay: Option<Relay>,
}

async fn listen(
    options: &PgConnectOptions,
    relay: Option<&Relay>,
) -> Result<PgListener, ChangeError> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(options.clone());
    let mut listener = PgListener::connect_with(&pool)
        .await
        .map_err(ChangeError::Listen)?;
    let mut channels = vec![CHANNEL];
    channels.extend(relay.map(|(channel, _)| *channel));
    listener
        .listen_all(channels)
        .await
        .map_err(ChangeError::Listen)?;
    Ok(listener)
}

impl PostgresDoorbell {
    /// Connects and LISTENs (on `relay`'s channel too); returns once LISTEN is active.
    pub async fn connect(
        url: &str,
        doorbell: Doorbell,
        relay: Option<Relay>,
    ) -> Result<Self, ChangeError> {
        let options: PgConnectOptions = url
            .parse::<PgConnectOptions>()
            .map_err(ChangeError::Listen)?
            .application_name(APPLICATION_NAME);
        let listener = listen(&options, relay.as_ref()).await?;
        Ok(Self {
            options,
            listener,
            doorbell,
            relay,
        })
    }

    /// Rings on every notification until `shutdown` turns true; reconnects with backoff.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                received = self.listener.try_recv() => match received {
                    Ok(Some(notification)) => match &self.relay {
                        Some((channel, take)) if notification.channel() == *channel => {
                            take(notification.payload());
                        }
                        _ => self.doorbell.ring(),
                    },
                    Ok(None) | Err(_) => {
                        tracing::warn!("lost the LISTEN connection; reconnecting");
                        let mut pause = Duration::from_millis(100);
                        loop {
                            match listen(&self.options, self.relay.as_ref()).await {
                                Ok(listener) => {
                                    self.listener = listener;
                                    break;
                                }
                                Err(err) => {
                                    tracing::warn!(error = %err, "cannot LISTEN yet");
                                    tokio::select! {
                                        _ = tokio::time::sleep(pause) => {}
                                        _ = shutdown.changed() => return,
                                    }
                                    pause = (pause * 2).min(Duration::from_secs(5));
                                }
                            }
                        }
                        // Whatever was notified while we were away is read now.
                        self.doorbell.ring();
                    }
                },
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// At most one NOTIFY per this long for this process's own commits.
pub const ANNOUNCE_EVERY: Duration = Duration::from_millis(5);

/// The payload of a process's announcement (the trigger's NOTIFY has none), so that what
/// woke a listener can be told apart.
pub const ANNOUNCEMENT: &str = "syncgraph";

/// After a NOTIFY that failed, how long until the next try.
const ANNOUNCE_RETRY: Duration = Duration::from_millis(500);

/// NOTIFYs the other processes after this process's commits until `stop` turns true: each
/// wait for an `Announcer` ring is followed by one NOTIFY, sent on `db` after the rung
/// commit (so the change is visible to whoever it wakes), then a pause of `ANNOUNCE_EVERY`
/// during which further rings make one more NOTIFY. A NOTIFY that fails is logged and tried
/// again after `ANNOUNCE_RETRY`. At `stop` (once every request has ended) it sends one last
/// NOTIFY, for whatever committed since the previous one.
pub async fn announce_commits(
    db: DatabaseConnection,
    announcer: Announcer,
    mut stop: watch::Receiver<bool>,
) {
    let notify = format!("SELECT pg_notify('{CHANNEL}', '{ANNOUNCEMENT}')");
    loop {
        let stopping = tokio::select! {
            _ = announcer.wait() => false,
            _ = stop.changed() => true,
        };
        let mut pause = ANNOUNCE_EVERY;
        if let Err(err) = db.execute_unprepared(&notify).await {
            tracing::warn!(error = %err, "cannot announce a commit to the other processes");
            announcer.ring();
            pause = ANNOUNCE_RETRY;
        }
        if stopping {
            db.close().await.ok();
            return;
        }
        tokio::time::sleep(pause).await;
    }
}
