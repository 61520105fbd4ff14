//! What resolvers take from a request's data: the database, the keys, the feed, the loaders,
//! the viewer. A piece that is missing is a server bug, answered as an internal error.

use std::sync::Arc;

use async_graphql::Context;
use sea_orm::DatabaseConnection;

use super::Live;
use super::error::{AppError, AppResult};
use super::loaders::Loaders;
use crate::auth::{JwtKeys, Viewer};

pub(crate) fn missing(what: &'static str) -> AppError {
    AppError::Internal(Arc::new(std::io::Error::other(format!(
        "schema data missing: {what}"
    ))))
}

/// The database connection.
pub(crate) fn db<'a>(ctx: &Context<'a>) -> AppResult<&'a DatabaseConnection> {
    ctx.data::<DatabaseConnection>()
        .map_err(|_| missing("DatabaseConnection"))
}

/// Where a request reads, and what it records of its reads: the pool and nothing for every
/// request (the schema's default), a snapshot and a recorder for a live query's execution.
#[derive(Clone)]
pub(crate) struct Reading {
    pub reader: crate::store::Reader,
    pub reads: crate::store::Reads,
}

impl Reading {
    /// The pool, recording nothing.
    pub(crate) fn pool(db: DatabaseConnection) -> Self {
        Self {
            reader: crate::store::Reader::Pool(db),
            reads: crate::store::Reads::default(),
        }
    }
}

/// Where this request reads (see `Reading`).
pub(crate) fn reading<'a>(ctx: &Context<'a>) -> AppResult<&'a Reading> {
    ctx.data::<Reading>().map_err(|_| missing("Reading"))
}

/// This process's token keys.
pub(crate) fn jwt_keys<'a>(ctx: &Context<'a>) -> AppResult<&'a JwtKeys> {
    ctx.data::<JwtKeys>().map_err(|_| missing("JwtKeys"))
}

/// The change feed.
pub(crate) fn live<'a>(ctx: &Context<'a>) -> AppResult<&'a Live> {
    ctx.data::<Live>().map_err(|_| missing("Live"))
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
