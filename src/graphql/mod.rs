//! The GraphQL schema: `AppSchema`, `build_schema`, and per-request execution. Runs without a
//! socket: tests call `execute` directly.

pub mod error;
pub mod input;
pub mod loaders;
pub mod mutation;
pub mod query;
pub mod types;

use std::sync::Arc;

use async_graphql::{Context, EmptySubscription, Schema};
use sea_orm::DatabaseConnection;

use crate::auth::{JwtKeys, Viewer};
use error::{AppError, AppResult};
use loaders::Loaders;
pub use mutation::MutationRoot;
pub use query::QueryRoot;

/// The executable schema.
pub type AppSchema = Schema<QueryRoot, MutationRoot, EmptySubscription>;

/// Builds the schema over a database connection and this process's token keys.
pub fn build_schema(db: DatabaseConnection, keys: JwtKeys) -> AppSchema {
    Schema::build(QueryRoot, MutationRoot, EmptySubscription)
        .data(db)
        .data(keys)
        .finish()
}

/// The schema's SDL, as committed in `schema.graphql`.
pub fn sdl() -> String {
    Schema::build(QueryRoot, MutationRoot, EmptySubscription)
        .finish()
        .sdl()
}

/// The schema plus what each request needs attached: cheap to clone, shared by transports.
#[derive(Clone)]
pub struct Api {
    schema: AppSchema,
    db: DatabaseConnection,
}

impl Api {
    /// The API over `db`, signing tokens with `keys`.
    pub fn new(db: DatabaseConnection, keys: JwtKeys) -> Self {
        Self {
            schema: build_schema(db.clone(), keys),
            db,
        }
    }

    /// The executable schema.
    pub fn schema(&self) -> &AppSchema {
        &self.schema
    }

    /// Runs one request as `viewer` with fresh loaders, and makes sure every error carries
    /// a code.
    pub async fn execute(
        &self,
        request: async_graphql::Request,
        viewer: Viewer,
    ) -> async_graphql::Response {
        let request = request.data(viewer).data(loaders::loaders(self.db.clone()));
        let mut response = self.schema.execute(request).await;
        error::ensure_codes(&mut response);
        response
    }
}

fn missing(what: &'static str) -> AppError {
    AppError::Internal(Arc::new(std::io::Error::other(format!(
        "schema data missing: {what}"
    ))))
}

/// The database connection.
pub(crate) fn db<'a>(ctx: &Context<'a>) -> AppResult<&'a DatabaseConnection> {
    ctx.data::<DatabaseConnection>()
        .map_err(|_| missing("DatabaseConnection"))
}

/// This process's token keys.
pub(crate) fn jwt_keys<'a>(ctx: &Context<'a>) -> AppResult<&'a JwtKeys> {
    ctx.data::<JwtKeys>().map_err(|_| missing("JwtKeys"))
}

/// The per-request loaders.
pub(crate) fn loaders<'a>(ctx: &Context<'a>) -> AppResult<&'a Loaders> {
    ctx.data::<Loaders>().map_err(|_| missing("Loaders"))
}

/// Who the request acts as (anonymous when none was attached).
pub(crate) fn viewer(ctx: &Context<'_>) -> AppResult<Viewer> {
    Ok(ctx
        .data_opt::<Viewer>()
        .copied()
        .unwrap_or(Viewer::Anonymous))
}

/// The signed-in user's id, or UNAUTHENTICATED.
pub(crate) fn viewer_id(ctx: &Context<'_>) -> AppResult<i64> {
    match viewer(ctx)? {
        Viewer::User(id) => Ok(id),
        Viewer::Anonymous => Err(AppError::Unauthenticated("sign in to do this")),
        Viewer::InvalidToken => Err(AppError::Unauthenticated("the token is invalid or expired")),
    }
}
