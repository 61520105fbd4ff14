//! `App`: connects, migrates, binds the listener and serves until shutdown. Only `main` and
//! tests use it; it is the only place that spawns long-lived tasks.

use std::future::Future;
use std::net::SocketAddr;

use anyhow::Context as _;
use migration::{Migrator, MigratorTrait};
use sea_orm::DatabaseConnection;
use tokio::net::TcpListener;

use crate::auth::JwtKeys;
use crate::config::Config;
use crate::db::{self, StatementCounter};
use crate::graphql::Api;
use crate::http::{self, HttpState};

/// A built, not yet running server.
pub struct App {
    listener: TcpListener,
    router: axum::Router,
    db: DatabaseConnection,
    statements: StatementCounter,
    api: Api,
}

impl App {
    /// Connects to the database, applies migrations and binds `config.listen`.
    pub async fn build(config: &Config) -> anyhow::Result<App> {
        let (db, statements) = db::connect(&config.database_url, config.db_max_connections)
            .await
            .context("opening the database")?;
        migrate(&db).await?;
        let keys = match &config.jwt_secret {
            Some(secret) if !secret.is_empty() => {
                JwtKeys::new(secret.as_bytes(), config.token_ttl())
            }
            _ => {
                tracing::warn!(
                    "no JWT secret configured (--jwt-secret / SYNCGRAPH_JWT_SECRET): using a \
                     random one; tokens will not survive a restart nor work on other processes"
                );
                JwtKeys::random(config.token_ttl())
            }
        };
        let api = Api::new(db.clone(), keys.clone());
        let router = http::router(HttpState {
            api: api.clone(),
            keys,
        });
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        Ok(App {
            listener,
            router,
            db,
            statements,
            api,
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

    /// Counts every statement run through `db`.
    pub fn statements(&self) -> StatementCounter {
        self.statements.clone()
    }

    /// The GraphQL API, for running operations without HTTP.
    pub fn api(&self) -> &Api {
        &self.api
    }

    /// Serves until `shutdown` resolves, then stops accepting and lets in-flight requests
    /// finish.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let addr = self.local_addr()?;
        tracing::info!(%addr, "serving GraphQL on http://{addr}/graphql, GraphiQL on http://{addr}/");
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await
            .context("serving HTTP")?;
        self.db.close_by_ref().await.ok();
        tracing::info!("stopped");
        Ok(())
    }
}

/// Applies pending migrations.
pub async fn migrate(db: &DatabaseConnection) -> anyhow::Result<()> {
    Migrator::up(db, None).await.context("applying migrations")
}
