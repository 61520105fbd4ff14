//! syncgraph's integration tests: one binary, a module per feature. Every test runs on SQLite,
//! and on PostgreSQL when `SYNCGRAPH_TEST_POSTGRES` holds a server URL.

mod helpers;
mod ws_client;

mod accounts;
mod bad_input;
mod channels;
mod cli;
mod clients;
mod concurrency;
mod documents;
mod errors;
mod faults;
mod feed;
mod http;
mod limits;
mod messages;
mod observability;
mod process;
mod protocol;
mod schema;
mod subscriptions;
