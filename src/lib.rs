//! syncgraph: a real-time GraphQL server over SeaORM entities.
//!
//! Codemap (ARCHITECTURE.md has the whole picture):
//! - `config`: command line and environment into `Config`; the only reader of env.
//! - `auth`: JWT issue/verify, password hashing, the request's `Viewer`; no database.
//! - `db`: opening the SeaORM connection (SQLite file or PostgreSQL) with the pool settings
//!   each backend needs, and the statement counter.
//! - `store`: SeaORM reads and writes, one module per aggregate, returning `StoreError`.
//! - `graphql`: the schema (`AppSchema`, `build_schema`), its resolvers, input validation and
//!   the single mapping from domain errors to GraphQL errors.
//! - `http`: the axum router: GraphQL over HTTP, GraphiQL, health.
//! - `app`: `App::build` wires everything, binds the listener and runs until shutdown.

pub mod app;
pub mod auth;
pub mod config;
pub mod db;
pub mod graphql;
pub mod http;
pub mod store;

pub use app::App;
pub use config::Config;
