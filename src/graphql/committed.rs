//! How a mutation writes a live table: through `store::Writes`, then waking every process.

use async_graphql::Context;

use super::Live;
use super::context::missing;
use super::error::AppResult;
use crate::store;

/// How a resolver that writes a live table runs its write:
/// `Committed::new(ctx)?.write(move |db| Box::pin(async move { store::...(&db, ...).await }))`.
/// The write runs through `store::Writes` (on SQLite, grouped with concurrent ones into one
/// transaction; on PostgreSQL, on the pool). When it returns (committed or refused) this
/// rings this process's doorbell, so the tailer reads the change at once, and announces the
/// commit to the other processes (on PostgreSQL the trigger does not NOTIFY for the server's
/// own connections, so a commit not rung would wait for the poll). A write dropped while in
/// flight (its client went away) may still commit after the drop: it rings at once and
/// again after `LATE_COMMIT`; one that commits even later is found by the poll. A ring after
/// a write that did not commit only costs a read.
pub(crate) struct Committed<'a> {
    live: Option<&'a Live>,
    writes: &'a store::Writes,
    returned: bool,
    /// Whether the write waits for fan-out before it is answered (a client's request;
    /// not a render, which a topic's driver runs, nor a writer outside a request).
    held_back: bool,
}

/// The longest a write's answer waits for this process's delivery to catch up.
const FAN_OUT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

/// When a write dropped in flight is rung again.
const LATE_COMMIT: std::time::Duration = std::time::Duration::from_secs(1);

impl<'a> Committed<'a> {
    pub(crate) fn new(ctx: &Context<'a>) -> AppResult<Self> {
        let mut committed = Self::with(
            ctx.data::<Live>().ok(),
            ctx.data::<store::Writes>()
                .map_err(|_| missing("store::Writes"))?,
        );
        // A render (a driver's, through a field that writes, such as a document's first
        // `yjsState`) must not wait for the fan-out it is part of.
        committed.held_back = ctx.data_opt::<super::shared::RenderOne>().is_none();
        Ok(committed)
    }

    /// Writes through `writes`, ringing `live`'s doorbell and announcer (outside a request).
    pub(crate) fn with(live: Option<&'a Live>, writes: &'a store::Writes) -> Self {
        Self {
            live,
            writes,
            returned: false,
            held_back: false,
        }
    }

    /// Runs `write`, ringing when it returns or is dropped.
    pub(crate) async fn write<T, W>(mut self, write: W) -> Result<T, store::StoreError>
    where
        T: Send + 'static,
        W: for<'c> FnOnce(
                sea_orm::DatabaseExecutor<'c>,
            ) -> std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<T, store::StoreError>> + Send + 'c>,
            > + Send
            + 'static,
    {
        let out = self.writes.run(write).await;
        self.returned = true;
        self.rung().await;
        out
    }

    /// Rings (by dropping), then, for a client's request, waits while this process's
    /// delivery is behind (`Broker::wait_for_fan_out`, at most `FAN_OUT_PATIENCE`): clients
    /// that write faster than their changes can be delivered are slowed, rather than every
    /// subscriber's latency growing without bound.
    async fn rung(self) {
        let live = self.live.filter(|_| self.held_back);
        drop(self);
        if let Some(live) = live {
            live.broker.wait_for_fan_out(FAN_OUT_PATIENCE).await;
        }
    }

    /// Posts a message (`store::Writes::post_message`: on PostgreSQL, batched with the
    /// posts that arrive together).
    pub(crate) async fn post_message(
        mut self,
        channel_id: i64,
        author_id: i64,
        body: String,
    ) -> Result<entities::message::Model, store::StoreError> {
        let out = self.writes.post_message(channel_id, author_id, body).await;
        self.returned = true;
        self.rung().await;
        out
    }
}

impl Drop for Committed<'_> {
    fn drop(&mut self) {
        let Some(live) = self.live else { return };
        live.doorbell.ring();
        live.announcer.ring();
        if !self.returned
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let (doorbell, announcer) = (live.doorbell.clone(), live.announcer.clone());
            runtime.spawn(async move {
                tokio::time::sleep(LATE_COMMIT).await;
                doorbell.ring();
                announcer.ring();
            });
        }
    }
}
