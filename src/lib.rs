//! syncgraph: a real-time GraphQL server over SeaORM entities.
//!
//! Codemap (ARCHITECTURE.md has the whole picture):
//! - `config`: command line and environment into `Config`; the only reader of env.
//! - `auth`: JWT issue/verify, password hashing, the request's `Viewer`; no database.
//! - `db`: opening the SeaORM connection (SQLite file or PostgreSQL) with the pool settings
//!   each backend needs, and the statement counter.
//! - `store`: SeaORM reads and writes, one module per aggregate, returning `StoreError`.
//! - `graphql`: the schema (`AppSchema`, `sdl`), its resolvers, input validation and
//!   the single mapping from domain errors to GraphQL errors.
//! - `pubsub`: the hub: a bounded broadcast per topic (channel) of `ChangeEvent`s.
//! - `live`: the delivery engine: one subscription's stream from a cursor (replay, live,
//!   catching up through the log, revocation) and the per-user subscription quota; no
//!   transport, no GraphQL.
//! - `changes`: the tailer that follows `change_log` gap-free and publishes to the hub, its
//!   doorbell (Postgres LISTEN, in-process rings), retention pruning, log replay reads.
//! - `bus`: scale-out over NATS JetStream (`--bus`): the relay elected per database that
//!   appends the log to a stream, and the follower that feeds the hub from it (falling back
//!   to the log).
//! - `http`: the axum router: GraphQL over HTTP, WebSocket upgrade, GraphiQL, health.
//! - `ws`: the graphql-transport-ws and legacy graphql-ws protocols over one socket.
//! - `streams`: subscriptions over HTTP: graphql-sse (both modes) and Apollo multipart.
//! - `app`: `App::build` wires everything, binds the listener and runs until shutdown.

pub mod app;
pub mod assets;
pub mod auth;
pub mod bus;
pub mod changes;
pub mod collab;
pub mod config;
pub mod db;
pub mod graphql;
pub mod http;
pub mod live;
pub mod metrics;
pub mod pubsub;
pub mod store;
pub mod streams;
pub mod ws;

pub use app::App;
pub use config::Config;
