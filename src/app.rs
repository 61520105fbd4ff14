//! `App`: connects, migrates, starts the change feed, binds the listener and serves until
//! shutdown. Only `main` and tests use it; it is the only place that spawns long-lived tasks.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use migration::{Migrator, MigratorTrait};
use sea_orm::{DatabaseBackend, DatabaseConnection};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::{self, JwtKeys};
use crate::changes::{Doorbell, PostgresDoorbell, Pruner, Retention, Tailer};
use crate::config::Config;
use crate::db::{self, StatementCounter};
use crate::graphql::{Api, Live};
use crate::http::{self, HttpState};
use crate::metrics::Health;
use crate::pubsub::Broker;
use crate::ws::WsConfig;

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
    tasks: Vec<JoinHandle<()>>,
    /// One permit per open WebSocket: shutdown waits until every one is back.
    connections: Arc<tokio::sync::Semaphore>,
    max_connections: u32,
}

impl App {
    /// Connects to the database, applies migrations, starts the change feed and binds
    /// `config.listen`.
    pub async fn build(config: &Config) -> anyhow::Result<App> {
        let patience = Duration::from_secs(config.db_connect_timeout_secs);
        let (db, statements) =
            db::connect_patiently(&config.database_url, config.db_max_connections, patience)
                .await
                .context("opening the database")?;
        migrate(&db).await?;
        // The feed reads through its own small pool: requests never wait behind it, and
        // statement counts of requests (tests) do not include its polling.
        let (feed_db, feed_statements) = db::connect(&config.database_url, 3)
            .await
            .context("opening the database for the change feed")?;
        let keys = match &config.jwt_secret {
            Some(secret) if !secret.is_empty() => {
                JwtKeys::new(secret.as_bytes(), config.token_ttl())
            }
            _ => {
                let secret = db::stored_secret(&db, "jwt", auth::random_secret)
                    .await
                    .context("reading the stored JWT secret")?;
                tracing::info!(
                    "no JWT secret configured (--jwt-secret / SYNCGRAPH_JWT_SECRET): signing \
                     tokens with the secret generated and kept in the database"
                );
                JwtKeys::new(secret.as_bytes(), config.token_ttl())
            }
        };

        let (stop, stopped) = watch::channel(false);
        let doorbell = Doorbell::default();
        // LISTEN before deciding where the feed starts: every commit after that point
        // either is at or below the start, or rings.
        let postgres_doorbell = if db.get_database_backend() == DatabaseBackend::Postgres {
            Some(
                PostgresDoorbell::connect(&config.database_url, doorbell.clone())
                    .await
                    .context("listening for change notifications")?,
            )
        } else {
            None
        };
        let start = Tailer::start_position(&feed_db)
            .await
            .context("finding where the change log stands")?;
        let broker = Arc::new(Broker::new(start));
        let mut tasks = Vec::new();
        if let Some(postgres_doorbell) = postgres_doorbell {
            tasks.push(tokio::spawn(postgres_doorbell.run(stopped.clone())));
        }
        let tailer = Tailer::new(
            feed_db.clone(),
            broker.clone(),
            doorbell.clone(),
            start,
            Duration::from_millis(config.poll_ms.max(1)),
        );
        tasks.push(tokio::spawn(tailer.run(stopped.clone())));
        let pruner = Pruner::new(
            feed_db.clone(),
            broker.clone(),
            Retention {
                max_age: Duration::from_secs(config.retention_secs),
                max_rows: config.retention_rows,
                interval: Duration::from_secs(config.prune_interval_secs.max(1)),
            },
        );
        tasks.push(tokio::spawn(pruner.run(stopped.clone())));
        if feed_db.get_database_backend() == DatabaseBackend::Sqlite {
            tasks.push(tokio::spawn(db::checkpoint_wal(
                feed_db.clone(),
                db::WAL_CHECKPOINT_EVERY,
                stopped.clone(),
            )));
        }

        let live = Live {
            broker: broker.clone(),
            doorbell: doorbell.clone(),
            subscription_starts: Arc::new(tokio::sync::Semaphore::new(
                config.db_max_connections.max(1) as usize,
            )),
        };
        let api = Api::new(db.clone(), keys.clone(), live, &config.limits);
        let connections = Arc::new(tokio::sync::Semaphore::new(
            config.limits.max_connections as usize,
        ));
        let health = Arc::new(Health::new(
            broker.clone(),
            feed_db.clone(),
            connections.clone(),
            config.limits.max_connections as usize,
            api.error_counts(),
            Duration::from_millis(config.poll_ms.max(1)),
            stopped.clone(),
        ));
        let router = http::router(HttpState {
            api: api.clone(),
            keys,
            ws: WsConfig {
                init_timeout: Duration::from_millis(config.ws_init_timeout_ms),
                keep_alive: Duration::from_secs(config.ws_keep_alive_secs.max(1)),
                max_operations: config.limits.max_operations_per_connection as usize,
            },
            max_ws_message_bytes: config.limits.max_ws_message_bytes as usize,
            max_body_bytes: config.limits.max_body_bytes as usize,
            connections: connections.clone(),
            health,
            shutdown: stopped,
        });
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        Ok(App {
            listener,
            router,
            db,
            statements,
            feed_db,
            feed_statements,
            api,
            broker,
            doorbell,
            stop,
            tasks,
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
        axum::serve(
            self.listener,
            self.router
                .into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            shutdown.await;
            broker.close();
            let _ = stop.send(true);
        })
        .await
        .context("serving HTTP")?;
        let _ = self.stop.send(true);
        // WebSockets live in tasks of their own that axum does not wait for: wait until each
        // has completed its subscriptions, finished its operations and sent its 1012.
        let closed = tokio::time::timeout(
            Duration::from_secs(10),
            self.connections.acquire_many(self.max_connections),
        )
        .await;
        if !matches!(closed, Ok(Ok(_))) {
            tracing::warn!("some WebSockets did not close within 10 s of shutdown");
        }
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        self.db.close_by_ref().await.ok();
        self.feed_db.close_by_ref().await.ok();
        tracing::info!("stopped");
        Ok(())
    }
}

/// Applies pending migrations.
pub async fn migrate(db: &DatabaseConnection) -> anyhow::Result<()> {
    Migrator::up(db, None).await.context("applying migrations")
}
