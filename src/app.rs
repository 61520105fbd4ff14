//! `App`: connects, migrates, starts the change feed, binds the listener and serves until
//! shutdown. Only `main` and tests use it; it is the only place that spawns long-lived tasks.

use std::future::{Future, IntoFuture as _};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::serve::ListenerExt as _;
use migration::{Migrator, MigratorTrait};
use sea_orm::{DatabaseBackend, DatabaseConnection};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::{self, JwtKeys};
use crate::bus::{Bus, BusStats};
use crate::changes::{self, Announcer, Doorbell, PostgresDoorbell, Pruner, Tailer};
use crate::collab::awareness::{self, Rooms};
use crate::config::Config;
use crate::db::{self, StatementCounter};
use crate::graphql::{Api, Live};
use crate::http::{self, HttpState};
use crate::metrics::Health;
use crate::pubsub::Broker;
use crate::store::Writes;

/// A built server whose change feed is already running (LISTEN active on Postgres).
pub struct App {
    listener: TcpListener,
    router: axum::Router,
    db: DatabaseConnection,
    statements: StatementCounter,
    feed_db: DatabaseConnection,
    feed_statements: StatementCounter,
    api: Api,
    broker: Arc<Broker>,
    doorbell: Doorbell,
    stop: watch::Sender<bool>,
    /// Stops announcing commits to the other processes, and the SQLite group writer: only
    /// once every request and socket has ended, since a mutation may still commit during the
    /// graceful shutdown.
    stop_announcing: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// One permit per open WebSocket: shutdown waits until every one is back.
    connections: Arc<tokio::sync::Semaphore>,
    max_connections: u32,
}

impl App {
    /// Connects to the database, applies migrations, starts the change feed and binds
    /// `config.listen`: the steps below, in this order.
    pub async fn build(config: &Config) -> anyhow::Result<App> {
        if config.bus().is_some() && !config.database_url.starts_with("postgres") {
            anyhow::bail!(
                "--bus needs PostgreSQL: the processes that share a bus share one PostgreSQL \
                 database (its advisory lock elects the relay); a SQLite file serves one \
                 process, which needs no bus"
            );
        }
        let databases = open_databases(config).await?;
        let keys = token_keys(config, &databases.db).await?;
        let (stop, stopped) = watch::channel(false);
        let (stop_announcing, announcing_stopped) = watch::channel(false);
        // Awareness of Yjs peers, relayed to the other processes through PostgreSQL.
        let (rooms, relay) = Rooms::new(&databases.db, stopped.clone());
        let mut feed = start_feed(
            config,
            &databases,
            &rooms,
            stopped.clone(),
            announcing_stopped.clone(),
        )
        .await?;
        // SQLite: one writer commits concurrent mutations together (`store::writer`);
        // PostgreSQL: posts that arrive together are inserted together (`store::posts`). It
        // too stops only once every request has ended.
        let (writes, group_writer) = Writes::new(&databases.db);
        feed.tasks
            .push(tokio::spawn(group_writer.run(announcing_stopped)));
        let api = Api::new(
            databases.db.clone(),
            writes,
            keys.clone(),
            feed.live(config),
            &config.limits.schema(),
        );
        feed.tasks.extend(relay.map(tokio::spawn));
        // Texts written outside the CRDT (SQL) become Yjs edits as they reach the feed.
        feed.tasks.push(tokio::spawn(crate::collab::fold::run(
            api.clone(),
            stopped.clone(),
        )));
        let connections = Arc::new(tokio::sync::Semaphore::new(
            config.limits.max_connections as usize,
        ));
        let health = Arc::new(Health::new(
            feed.broker.clone(),
            feed.bus.clone(),
            databases.feed_db.clone(),
            connections.clone(),
            config.limits.max_connections as usize,
            api.error_counts(),
            config.poll(),
            stopped.clone(),
        ));
        let router = http::router(HttpState {
            api: api.clone(),
            keys,
            ws: config.ws(),
            streams: config.streams(),
            reservations: Arc::new(crate::streams::Reservations::new(
                config.limits.max_connections as usize,
                config.limits.max_operations_per_connection as usize,
            )),
            max_ws_message_bytes: config.limits.max_ws_message_bytes as usize,
            max_body_bytes: config.limits.max_body_bytes as usize,
            connections: connections.clone(),
            health,
            rooms,
            max_document_update_bytes: config.limits.max_document_update_bytes as usize,
            shutdown: stopped,
        });
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        Ok(App {
            listener,
            router,
            db: databases.db,
            statements: databases.statements,
            feed_db: databases.feed_db,
            feed_statements: databases.feed_statements,
            api,
            broker: feed.broker,
            doorbell: feed.doorbell,
            stop,
            stop_announcing,
            tasks: feed.tasks,
            connections,
            max_connections: config.limits.max_connections,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The database connection (a pool handle).
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Counts every statement run through `db` (requests and subscriptions).
    pub fn statements(&self) -> StatementCounter {
        self.statements.clone()
    }

    /// Counts every statement the change feed (tailer, pruner) runs.
    pub fn feed_statements(&self) -> StatementCounter {
        self.feed_statements.clone()
    }

    /// The GraphQL API, for running operations without HTTP.
    pub fn api(&self) -> &Api {
        &self.api
    }

    /// The hub (tests wait for subscribers on it).
    pub fn broker(&self) -> Arc<Broker> {
        self.broker.clone()
    }

    /// The tailer's doorbell.
    pub fn doorbell(&self) -> Doorbell {
        self.doorbell.clone()
    }

    /// Serves until `shutdown` resolves; then stops accepting, ends every subscription
    /// (each gets `complete`, then its socket closes with 1012), lets in-flight requests
    /// finish and stops the feed.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let addr = self.local_addr()?;
        tracing::info!(%addr, "serving GraphQL on http://{addr}/graphql, GraphiQL on http://{addr}/, the demo on http://{addr}/demo");
        let stop = self.stop.clone();
        let broker = self.broker.clone();
        // When the shutdown began: requests, streams and sockets get 10 s from then, in all.
        let began = Arc::new(std::sync::OnceLock::new());
        let began_at = began.clone();
        // TCP_NODELAY on every connection: a live feed writes many small frames, and Nagle's
        // algorithm would hold each behind the peer's delayed ACK of the previous one (tens
        // of milliseconds: the co-editing benchmark's p99 on PostgreSQL was 100 ms with it).
        let listener = self.listener.tap_io(|stream| {
            if let Err(err) = stream.set_nodelay(true) {
                tracing::debug!(error = %err, "cannot set TCP_NODELAY on a connection");
            }
        });
        let serving = axum::serve(
            listener,
            self.router
                .into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = began_at.set(tokio::time::Instant::now());
            // The flag first: a stream that sees its subscription end then knows it ended
            // for the shutdown (graphql-sse sends no `complete`, so clients come back).
            let _ = stop.send(true);
            broker.close();
        });
        // Graceful, within bounds: a response that is never read (an event stream whose
        // client stopped reading is not even polled) must not keep the process alive.
        let mut stopping = self.stop.subscribe();
        tokio::select! {
            served = serving.into_future() => served.context("serving HTTP")?,
            _ = async {
                let _ = stopping.wait_for(|stopped| *stopped).await;
                tokio::time::sleep(Duration::from_secs(10)).await;
            } => tracing::warn!("some requests did not finish within 10 s of shutdown; stopping anyway"),
        }
        let _ = self.stop.send(true);
        // WebSockets live in tasks of their own that axum does not wait for: wait until each
        // has completed its subscriptions, finished its operations and sent its 1012.
        let deadline = began
            .get()
            .copied()
            .unwrap_or_else(tokio::time::Instant::now)
            + Duration::from_secs(10);
        let closed = tokio::time::timeout_at(
            deadline,
            self.connections.acquire_many(self.max_connections),
        )
        .await;
        if !matches!(closed, Ok(Ok(_))) {
            tracing::warn!(
                "some WebSockets or event streams did not close within 10 s of shutdown"
            );
        }
        // Every request and socket has ended: the group writer ends, and what committed is
        // announced one last time.
        let _ = self.stop_announcing.send(true);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        self.db.close_by_ref().await.ok();
        self.feed_db.close_by_ref().await.ok();
        tracing::info!("stopped");
        Ok(())
    }
}

/// The server's pools: one for requests, one for the change feed.
struct Databases {
    db: DatabaseConnection,
    statements: StatementCounter,
    feed_db: DatabaseConnection,
    feed_statements: StatementCounter,
}

/// Step 1: connects (waiting for a PostgreSQL server that is not up yet), migrates, and
/// opens the feed's own small pool: requests never wait behind the feed, and statement
/// counts of requests (tests) do not include its polling.
async fn open_databases(config: &Config) -> anyhow::Result<Databases> {
    let (db, statements) = db::connect_patiently(
        &config.database_url,
        config.db_max_connections,
        config.db_connect_patience(),
    )
    .await
    .context("opening the database")?;
    migrate(&db).await?;
    // The tailer (with a bus: the relay and the follower's fallback), the pruner, health.
    let feed_connections = if config.bus().is_some() { 5 } else { 3 };
    let (feed_db, feed_statements) = db::connect(&config.database_url, feed_connections)
        .await
        .context("opening the database for the change feed")?;
    Ok(Databases {
        db,
        statements,
        feed_db,
        feed_statements,
    })
}

/// Step 2: the keys tokens are signed with: the configured secret, else the one generated
/// once and kept in the database.
async fn token_keys(config: &Config, db: &DatabaseConnection) -> anyhow::Result<JwtKeys> {
    if let Some(secret) = config.jwt_secret.as_deref().filter(|s| !s.is_empty()) {
        return Ok(JwtKeys::new(secret.as_bytes(), config.token_ttl()));
    }
    let secret = db::stored_secret(db, "jwt", auth::random_secret)
        .await
        .context("reading the stored JWT secret")?;
    tracing::info!(
        "no JWT secret configured (--jwt-secret / SYNCGRAPH_JWT_SECRET): signing \
         tokens with the secret generated and kept in the database"
    );
    Ok(JwtKeys::new(secret.as_bytes(), config.token_ttl()))
}

/// The running change feed.
struct Feed {
    broker: Arc<Broker>,
    /// The bus's counters, when `--bus` is on.
    bus: Option<Arc<BusStats>>,
    doorbell: Doorbell,
    announcer: Announcer,
    tasks: Vec<JoinHandle<()>>,
}

impl Feed {
    /// The feed as resolvers see it, with as many start permits as the pool has connections.
    fn live(&self, config: &Config) -> Live {
        Live {
            broker: self.broker.clone(),
            doorbell: self.doorbell.clone(),
            announcer: self.announcer.clone(),
            subscription_starts: Arc::new(tokio::sync::Semaphore::new(
                config.db_max_connections.max(1) as usize,
            )),
        }
    }
}

/// Step 3: LISTEN and announce our commits to the others (PostgreSQL), find where the log
/// stands, and spawn the tailer (with `--bus`: the relay's election and the stream's
/// follower), the pruner and (SQLite) the WAL checkpoints, each until `stopped` turns true.
async fn start_feed(
    config: &Config,
    databases: &Databases,
    rooms: &Arc<Rooms>,
    stopped: watch::Receiver<bool>,
    announcing_stopped: watch::Receiver<bool>,
) -> anyhow::Result<Feed> {
    let feed_db = &databases.feed_db;
    let doorbell = Doorbell::default();
    // LISTEN before deciding where the feed starts: every commit after that point either
    // is at or below the start, or rings.
    let postgres_doorbell = if feed_db.get_database_backend() == DatabaseBackend::Postgres {
        Some(
            PostgresDoorbell::connect(
                &config.database_url,
                doorbell.clone(),
                Some(awareness::relay(rooms)),
            )
            .await
            .context("listening for change notifications")?,
        )
    } else {
        None
    };
    let start = Tailer::start_position(feed_db)
        .await
        .context("finding where the change log stands")?;
    let broker = Arc::new(Broker::new(start));
    let mut tasks = Vec::new();
    let announcer = Announcer::default();
    if let Some(postgres_doorbell) = postgres_doorbell {
        tasks.push(tokio::spawn(postgres_doorbell.run(stopped.clone())));
        // A connection of its own, so that announcements never wait behind the feed's reads.
        let (announcing_db, _) = db::connect(&config.database_url, 1)
            .await
            .context("opening the connection that announces commits")?;
        tasks.push(tokio::spawn(changes::announce_commits(
            announcing_db,
            announcer.clone(),
            announcing_stopped,
        )));
    }
    let bus = match config.bus() {
        // Scale-out: the stream feeds the hub, one elected process relays the log to it.
        Some(bus_config) => {
            // The database's identity, so that a stream is never shared by two databases.
            let database = db::stored_secret(feed_db, "database-id", auth::random_secret)
                .await
                .context("reading the database's identity")?;
            let bus = Bus::connect(bus_config, database)
                .await
                .context("connecting to the bus")?;
            let stats = bus.stats.clone();
            tasks.extend(crate::bus::start(
                bus,
                &config.database_url,
                feed_db.clone(),
                broker.clone(),
                &doorbell,
                config.poll(),
                stopped.clone(),
            ));
            Some(stats)
        }
        None => {
            let tailer = Tailer::new(
                feed_db.clone(),
                broker.clone(),
                doorbell.clone(),
                start,
                config.poll(),
            );
            tasks.push(tokio::spawn(tailer.run(stopped.clone())));
            None
        }
    };
    let pruner = Pruner::new(feed_db.clone(), broker.clone(), config.retention());
    tasks.push(tokio::spawn(pruner.run(stopped.clone())));
    if feed_db.get_database_backend() == DatabaseBackend::Sqlite {
        tasks.push(tokio::spawn(db::checkpoint_wal(
            feed_db.clone(),
            db::WAL_CHECKPOINT_EVERY,
            stopped,
        )));
    }
    Ok(Feed {
        broker,
        bus,
        doorbell,
        announcer,
        tasks,
    })
}

/// Applies pending migrations.
pub async fn migrate(db: &DatabaseConnection) -> anyhow::Result<()> {
    Migrator::up(db, None).await.context("applying migrations")
}
