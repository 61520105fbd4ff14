//! Operations: Prometheus metrics for `/metrics` (prometheus-client, one registry per
//! server, so in-process test servers do not share counts) and the readiness check for
//! `/readyz`. Counters live where things happen (the broker's `FeedStats`, the API's
//! `ErrorCounts`, the connection semaphore) and are read at each scrape: nothing below
//! depends on this module.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use sea_orm::{ConnectionTrait, DatabaseConnection};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::bus::{BusState, BusStats};
use crate::changes;
use crate::graphql::error::ErrorCounts;
use crate::pubsub::{Broker, now_ms};

/// The `code` label of `syncgraph_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: &'static str,
}

/// A change older than this that the feed has not published makes the server not ready.
pub const READY_LAG: Duration = Duration::from_secs(10);

/// The tailer's lag as last measured (at a scrape or a readiness check).
#[derive(Debug, Default)]
struct Lag {
    positions: AtomicI64,
    millis: AtomicU64,
}

/// What `/metrics` and `/readyz` read.
pub struct Health {
    registry: Registry,
    lag: Arc<Lag>,
    broker: Arc<Broker>,
    bus: Option<Arc<BusStats>>,
    /// The change feed's pool, so a scrape never waits behind requests.
    db: DatabaseConnection,
    /// A tailer silent for longer than this is not running (stuck, or dead).
    tailer_stale_after: Duration,
    /// Turns true when the server shuts down: it is no longer ready.
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl Health {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        broker: Arc<Broker>,
        bus: Option<Arc<BusStats>>,
        db: DatabaseConnection,
        connections: Arc<Semaphore>,
        max_connections: usize,
        errors: Arc<ErrorCounts>,
        poll: Duration,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        let lag = Arc::new(Lag::default());
        let mut registry = Registry::with_prefix("syncgraph");
        registry.register_collector(Box::new(FeedCollector {
            errors,
            broker: broker.clone(),
            bus: bus.clone(),
            connections,
            max_connections,
            lag: lag.clone(),
        }));
        Self {
            registry,
            lag,
            broker,
            bus,
            db,
            // The tailer reads at least every `poll`; allow ten misses, and never less than
            // 5 s, so one slow read is not an outage.
            tailer_stale_after: (poll * 10).max(Duration::from_secs(5)),
            shutdown,
        }
    }

    /// Measures the feed's lag: positions not yet published, and the age of the oldest.
    async fn measure(&self) -> Result<(i64, f64), changes::ChangeError> {
        let (positions, seconds) = changes::lag(&self.db, self.broker.published()).await?;
        self.lag.positions.store(positions, Ordering::Relaxed);
        self.lag
            .millis
            .store((seconds * 1000.0) as u64, Ordering::Relaxed);
        Ok((positions, seconds))
    }

    /// The metrics in the OpenMetrics text format.
    pub async fn render(&self) -> String {
        if let Err(err) = self.measure().await {
            tracing::warn!(error = %err, "cannot measure the feed's lag for /metrics");
        }
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            tracing::error!("cannot encode metrics");
        }
        text
    }

    /// Whether this process should get traffic: it is not shutting down, the database
    /// answers, the tailer has read the log recently, and the feed is caught up (no change
    /// older than `READY_LAG` waits to be published). With the checks' results.
    pub async fn ready(&self) -> (bool, Value) {
        let ping = tokio::time::timeout(
            Duration::from_secs(2),
            self.db.execute_unprepared("SELECT 1"),
        )
        .await;
        let database = matches!(ping, Ok(Ok(_)));
        let lag = if database {
            tokio::time::timeout(Duration::from_secs(2), self.measure())
                .await
                .ok()
                .and_then(Result::ok)
        } else {
            None
        };
        let feed = lag.is_some_and(|(_, seconds)| seconds < READY_LAG.as_secs_f64());
        let (positions, seconds) = lag.unwrap_or((-1, -1.0));
        let since_beat = self.broker.stats.since_heartbeat();
        let tailer = since_beat.is_some_and(|age| age < self.tailer_stale_after);
        let stopping = *self.shutdown.borrow();
        let ready = database && feed && tailer && !stopping;
        let mut report = json!({
            "ready": ready,
            "database": database,
            "feed_caught_up": feed,
            "feed_lag_positions": positions,
            "feed_lag_seconds": seconds,
            "tailer_running": tailer,
            "tailer_last_read_ms_ago": since_beat.map(|age| age.as_millis() as u64),
            "shutting_down": stopping,
        });
        // With a bus: where the feed comes from (a process reading the log is still ready:
        // it delivers everything, at a cost to the database).
        if let Some(bus) = &self.bus {
            let fell_back = bus.fell_back_at_ms.load(Ordering::Relaxed);
            let heard = bus.relay_heard_at_ms.load(Ordering::Relaxed);
            report["bus"] = json!({
                "state": bus.state().as_str(),
                "relay": bus.relay.load(Ordering::Relaxed),
                "behind_messages": bus.behind.load(Ordering::Relaxed),
                "behind_positions": behind_positions(bus, self.broker.published()),
                "relay_heard_ms_ago": (heard > 0).then(|| now_ms().saturating_sub(heard)),
                "fallbacks": bus.fallbacks.load(Ordering::Relaxed),
                "last_fallback_ms_ago": (fell_back > 0).then(|| now_ms().saturating_sub(fell_back)),
            });
        }
        (ready, report)
    }
}

impl std::fmt::Debug for FeedCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeedCollector").finish_non_exhaustive()
    }
}

/// Reads the feed's counters and gauges at each scrape.
struct FeedCollector {
    errors: Arc<ErrorCounts>,
    broker: Arc<Broker>,
    bus: Option<Arc<BusStats>>,
    connections: Arc<Semaphore>,
    max_connections: usize,
    lag: Arc<Lag>,
}

impl FeedCollector {
    fn counter(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        value: u64,
    ) -> Result<(), std::fmt::Error> {
        let counter = ConstCounter::new(value);
        counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)
    }

    fn gauge(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        value: f64,
    ) -> Result<(), std::fmt::Error> {
        let gauge = ConstGauge::new(value);
        gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
    }
}

impl FeedCollector {
    /// The bus's gauges and counters (`--bus` only).
    fn bus(
        encoder: &mut DescriptorEncoder,
        bus: &BusStats,
        published: i64,
    ) -> Result<(), std::fmt::Error> {
        let mut states = encoder.encode_descriptor(
            "bus_state",
            "Where this process's feed comes from: 1 for the current state (stream, postgres, starting)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        let now = bus.state();
        for state in [BusState::Stream, BusState::Postgres, BusState::Starting] {
            ConstGauge::new(i64::from(state == now)).encode(states.encode_family(
                &StateLabel {
                    state: state.as_str(),
                },
            )?)?;
        }
        Self::gauge(
            encoder,
            "bus_relay",
            "1 while this process is the relay that appends the log to the stream",
            f64::from(u8::from(bus.relay.load(Ordering::Relaxed))),
        )?;
        Self::counter(
            encoder,
            "bus_relay_terms",
            "Times this process became the relay",
            bus.relay_terms.load(Ordering::Relaxed),
        )?;
        Self::counter(
            encoder,
            "bus_appended",
            "Changes this process appended to the stream as the relay",
            bus.appended.load(Ordering::Relaxed),
        )?;
        Self::counter(
            encoder,
            "bus_received",
            "Changes this process took from the stream",
            bus.received.load(Ordering::Relaxed),
        )?;
        Self::gauge(
            encoder,
            "bus_behind_messages",
            "Messages the stream held past the last one this process took",
            bus.behind.load(Ordering::Relaxed) as f64,
        )?;
        Self::gauge(
            encoder,
            "bus_behind_positions",
            "Log positions the relay has appended that this process has not yet published",
            behind_positions(bus, published) as f64,
        )?;
        let heard = bus.relay_heard_at_ms.load(Ordering::Relaxed);
        Self::gauge(
            encoder,
            "bus_relay_heartbeat_age_seconds",
            "How long ago this process last heard the relay's heartbeat (-1: never)",
            if heard == 0 {
                -1.0
            } else {
                now_ms().saturating_sub(heard) as f64 / 1000.0
            },
        )?;
        Self::counter(
            encoder,
            "bus_gap_fills",
            "Times a message showed the stream lacked positions before it, read from the log",
            bus.gap_fills.load(Ordering::Relaxed),
        )?;
        Self::counter(
            encoder,
            "bus_fallbacks",
            "Times this process fell back to reading the change log",
            bus.fallbacks.load(Ordering::Relaxed),
        )?;
        Self::gauge(
            encoder,
            "bus_last_fallback_timestamp_seconds",
            "When this process last fell back to reading the change log (0: never)",
            bus.fell_back_at_ms.load(Ordering::Relaxed) as f64 / 1000.0,
        )?;
        Self::counter(
            encoder,
            "bus_log_reads",
            "Changes read from the change log instead of the stream",
            bus.log_reads.load(Ordering::Relaxed),
        )
    }
}

/// The `state` label of `syncgraph_bus_state`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

impl Collector for FeedCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = &self.broker.stats;
        let open = self
            .max_connections
            .saturating_sub(self.connections.available_permits());
        Self::gauge(
            &mut encoder,
            "ws_connections",
            "Open WebSocket connections and event streams",
            open as f64,
        )?;
        Self::gauge(
            &mut encoder,
            "subscriptions",
            "Subscriptions streaming (past their access checks)",
            self.broker.streaming_count() as f64,
        )?;
        Self::gauge(
            &mut encoder,
            "fanout_lagging_topics",
            "Topics whose delivery is behind (writes on this process then wait for it, at most 1 s)",
            self.broker.lagging_topics() as f64,
        )?;
        Self::counter(
            &mut encoder,
            "changes_published",
            "Captured changes the tailer published to subscribers",
            stats.published.load(Ordering::Relaxed),
        )?;
        Self::counter(
            &mut encoder,
            "events_delivered",
            "Events sent to subscribers, one per subscriber and event",
            stats.delivered.load(Ordering::Relaxed),
        )?;
        Self::counter(
            &mut encoder,
            "event_renders",
            "Subscription events rendered, once per event and subscription shape",
            stats.renders.load(Ordering::Relaxed),
        )?;
        Self::counter(
            &mut encoder,
            "live_query_executions",
            "Live query executions, once per cohort and change that touched what it read",
            stats.live_executions.load(Ordering::Relaxed),
        )?;
        Self::counter(
            &mut encoder,
            "log_replays",
            "Pages of the change log read to replay or catch up a subscriber",
            stats.log_replays.load(Ordering::Relaxed),
        )?;
        Self::counter(
            &mut encoder,
            "lagging_subscribers",
            "Times a subscriber fell behind its topic's buffer or its transport's inbox (or a topic's driver behind its buffer) and caught up",
            stats.lagged.load(Ordering::Relaxed),
        )?;
        Self::gauge(
            &mut encoder,
            "yjs_peers",
            "y-websocket peers connected to documents (/yjs)",
            stats.yjs_peers.load(Ordering::Relaxed) as f64,
        )?;
        Self::counter(
            &mut encoder,
            "yjs_updates_stored",
            "Yjs updates stored, each with its own version",
            stats.yjs_updates.load(Ordering::Relaxed),
        )?;
        Self::counter(
            &mut encoder,
            "yjs_writes",
            "Transactions that stored Yjs updates (a document's updates that arrive together share one)",
            stats.yjs_writes.load(Ordering::Relaxed),
        )?;
        Self::gauge(
            &mut encoder,
            "feed_published_position",
            "Log position through which the feed has published every change",
            self.broker.published() as f64,
        )?;
        Self::gauge(
            &mut encoder,
            "feed_lag_positions",
            "Captured changes not yet published",
            self.lag.positions.load(Ordering::Relaxed) as f64,
        )?;
        Self::gauge(
            &mut encoder,
            "feed_lag_seconds",
            "Age of the oldest captured change not yet published",
            self.lag.millis.load(Ordering::Relaxed) as f64 / 1000.0,
        )?;
        if let Some(bus) = &self.bus {
            Self::bus(&mut encoder, bus, self.broker.published())?;
        }
        let mut errors = encoder.encode_descriptor(
            "errors",
            "GraphQL errors sent, by extensions.code",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (code, count) in self.errors.sent() {
            ConstCounter::new(count).encode(errors.encode_family(&CodeLabel { code })?)?;
        }
        Ok(())
    }
}

/// How far this process's feed is behind what the relay says it appended.
fn behind_positions(bus: &BusStats, published: i64) -> i64 {
    (bus.relay_through.load(Ordering::Relaxed) - published).max(0)
}
