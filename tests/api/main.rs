//! syncgraph's integration tests: one binary, a module per feature. Every test runs on SQLite,
//! and on PostgreSQL when `SYNCGRAPH_TEST_POSTGRES` holds a server URL; the bus's (NATS
//! JetStream) when `SYNCGRAPH_TEST_NATS` does too; the JavaScript
//! clients' tests when `SYNCGRAPH_TEST_CLIENTS=1`. What is not configured is ignored (build.rs
//! decides when the tests are built), so the runner counts it as ignored, never as passed.

mod helpers;
mod ws_client;

mod accounts;
mod bad_input;
mod bus;
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
mod live_queries;
mod messages;
mod observability;
mod process;
mod protocol;
mod schema;
mod streams;
mod subscriptions;
mod y_websocket;
mod yjs;

/// CI runs everything: a CI build that would ignore the PostgreSQL or the client tests fails
/// here instead of passing with fewer tests.
#[test]
fn ci_ignores_nothing() {
    if std::env::var("CI").is_ok_and(|value| value == "true") {
        let configured = [
            ("SYNCGRAPH_TEST_POSTGRES", cfg!(postgres_tests)),
            ("SYNCGRAPH_TEST_CLIENTS", cfg!(client_tests)),
            ("SYNCGRAPH_TEST_NATS", cfg!(nats_tests)),
        ];
        let missing: Vec<&str> = configured
            .iter()
            .filter(|(_, set)| !set)
            .map(|(name, _)| *name)
            .collect();
        assert!(
            missing.is_empty(),
            "CI=true but {missing:?} not set when the tests were built: their tests would be ignored"
        );
    }
}
