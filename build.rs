//! Lets the integration tests mark what they need as ignored when it is not configured, so
//! `cargo test` counts a skipped test as ignored, never as passed: `postgres_tests` when
//! `SYNCGRAPH_TEST_POSTGRES` names a server, `nats_tests` when `SYNCGRAPH_TEST_NATS` names a
//! NATS server with JetStream, `client_tests` when `SYNCGRAPH_TEST_CLIENTS` is set (and not
//! `0`). Changing any of them rebuilds.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(postgres_tests)");
    println!("cargo::rustc-check-cfg=cfg(client_tests)");
    println!("cargo::rustc-check-cfg=cfg(nats_tests)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=SYNCGRAPH_TEST_POSTGRES");
    println!("cargo::rerun-if-env-changed=SYNCGRAPH_TEST_CLIENTS");
    println!("cargo::rerun-if-env-changed=SYNCGRAPH_TEST_NATS");
    if std::env::var("SYNCGRAPH_TEST_POSTGRES").is_ok_and(|url| !url.is_empty()) {
        println!("cargo::rustc-cfg=postgres_tests");
    }
    if std::env::var("SYNCGRAPH_TEST_NATS").is_ok_and(|url| !url.is_empty()) {
        println!("cargo::rustc-cfg=nats_tests");
    }
    if std::env::var("SYNCGRAPH_TEST_CLIENTS").is_ok_and(|value| !value.is_empty() && value != "0")
    {
        println!("cargo::rustc-cfg=client_tests");
    }
}
