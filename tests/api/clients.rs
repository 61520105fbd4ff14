//! The JavaScript clients, for real:
//! - the browser tests: GraphiQL and `/demo` in Debian's Chromium, driven by playwright-core
//!   (`tests/browser/browser.test.mjs`, run with Node's test runner) against the real binary.
//!   A failure names the folder holding a screenshot of every page of the failed test;
//! - the typed TypeScript example (`examples/typescript-client`): GraphQL Code Generator over
//!   `schema.graphql`, `tsc --strict`, then its walk-through run against a server, so a
//!   schema change that breaks typed clients fails the tests.
//!
//! They run when `cargo test` is run with `SYNCGRAPH_TEST_CLIENTS=1` (else they are ignored,
//! and counted so; with `CI=true` they must run), and need Node.js, `/usr/bin/chromium` (or
//! `CHROMIUM`), and `npm ci` in both folders.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::helpers::{Backend, TestServer, data, fresh_database, run, run_with};

/// How many tests `browser.test.mjs` holds.
const BROWSER_TESTS: usize = 8;

/// How many tests `yjs-providers.test.mjs` holds.
const PROVIDER_TESTS: usize = 3;

/// The whole browser suite's deadline (it takes about 15 s here).
const SUITE_TIMEOUT: Duration = Duration::from_secs(300);

/// The folder `path` of the repository, once `npm ci` has installed its packages.
fn installed(path: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    assert!(
        dir.join("node_modules").is_dir(),
        "{path} has no node_modules: run `npm ci --prefix {path}`"
    );
    dir
}

/// Runs `command` in a process group of its own and collects its output; past `limit` the
/// whole group is killed (node, and the Chromium and syncgraph processes it started), so a
/// hung run leaves nothing behind.
async fn output_within(
    mut command: Command,
    limit: Duration,
) -> Result<std::process::Output, String> {
    let child = command
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|err| format!("cannot start {command:?}: {err}"))?;
    let group = child.id().map(|pid| format!("-{pid}"));
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(output) => output.map_err(|err| err.to_string()),
        Err(_) => {
            if let Some(group) = group {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &group])
                    .status()
                    .await;
            }
            Err(format!("{command:?} did not finish in {limit:?}"))
        }
    }
}

/// `output`'s standard output and error, for a failure message.
fn report(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

async fn browser_suite(backend: Backend) {
    let dir = installed("tests/browser");
    let (database_url, database) = fresh_database(backend).await;
    let screenshots = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("browser-screenshots")
        .join(format!("{backend:?}").to_lowercase());
    // One browser suite at a time: two Chromiums on two cores would make each slower.
    static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = ONE_BROWSER.lock().await;
    let mut command = Command::new("node");
    command
        .args(["--test", "--test-concurrency=1", "browser.test.mjs"])
        .current_dir(&dir)
        .env("SYNCGRAPH_BIN", env!("CARGO_BIN_EXE_syncgraph"))
        .env("SYNCGRAPH_DATABASE_URL", &database_url)
        .env("SCREENSHOT_DIR", &screenshots)
        .stdin(Stdio::null());
    let outcome = output_within(command, SUITE_TIMEOUT).await;
    database.drop_database().await;
    let output =
        outcome.unwrap_or_else(|err| panic!("the browser tests did not run to the end: {err}"));
    let report = report(&output);
    assert!(
        output.status.success(),
        "browser tests failed; screenshots in {}:\n{report}",
        screenshots.display()
    );
    // A test that was skipped or never registered would not fail the runner.
    assert_eq!(
        passed(&report),
        BROWSER_TESTS,
        "expected {BROWSER_TESTS} passing browser tests:\n{report}"
    );
    println!("{report}");
}

/// The lines of a node test run's report that are passing tests (not skipped, not todo).
fn passed(report: &str) -> usize {
    report
        .lines()
        .filter(|line| {
            line.starts_with("ok ") && !line.contains("# SKIP") && !line.contains("# TODO")
        })
        .count()
}

/// The unmodified `y-websocket` package's `WebsocketProvider` (with yjs, y-protocols and
/// ws in Node) against `/yjs/{documentId}`: concurrent typing converges and is stored in SQL,
/// a late joiner sees it, awareness comes and goes at once, refusals carry no content
/// (`tests/browser/yjs-providers.test.mjs`). With `two_processes`, the peers are spread over
/// two server processes of one PostgreSQL database, each set up by `peer` too.
async fn yjs_providers(server: &TestServer, two_processes: bool, peer: fn(&mut syncgraph::Config)) {
    let dir = installed("tests/browser");
    let (ada, _) = server.sign_up("Ada").await;
    let (outsider, _) = server.sign_up("Bob").await;
    let channel = server.create_channel(&ada, "co-editing").await;
    let initial = "shared notes";
    let create = "mutation($c: ID!, $b: String!) { createDocument(input: { channelId: $c, title: \"notes\", body: $b }) { id } }";
    let created = server
        .graphql_as(
            &ada,
            create,
            serde_json::json!({ "c": channel, "b": initial }),
        )
        .await;
    let document = data(&created, "createDocument")["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    let peer = match two_processes {
        true => Some(server.start_peer_with(Some("test-secret"), peer).await),
        false => None,
    };
    let mut servers = vec![format!("ws://{}/yjs", server.addr)];
    servers.extend(peer.as_ref().map(|peer| format!("ws://{}/yjs", peer.addr)));
    let mut command = Command::new("node");
    command
        .args(["--test", "--test-concurrency=1", "yjs-providers.test.mjs"])
        .current_dir(&dir)
        .env("YJS_SERVERS", servers.join(","))
        .env("YJS_DOCUMENT", &document)
        .env("YJS_TOKEN", &ada)
        .env("YJS_OUTSIDER_TOKEN", &outsider)
        .env("YJS_GRAPHQL", server.url("/graphql"))
        .env("YJS_INITIAL", initial)
        .env_remove("YJS_REFERENCE")
        .stdin(Stdio::null());
    let output = output_within(command, SUITE_TIMEOUT)
        .await
        .unwrap_or_else(|err| {
            panic!("the y-websocket provider tests did not run to the end: {err}")
        });
    if let Some(peer) = peer {
        peer.stop().await;
    }
    let report = report(&output);
    assert!(
        output.status.success(),
        "y-websocket provider tests failed:\n{report}"
    );
    assert_eq!(
        passed(&report),
        PROVIDER_TESTS,
        "expected {PROVIDER_TESTS} passing provider tests:\n{report}"
    );
    println!("{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(client_tests),
    ignore = "needs SYNCGRAPH_TEST_CLIENTS=1 (Node.js, npm ci)"
)]
async fn yjs_providers_converge_sqlite() {
    run(Backend::Sqlite, |server| async move {
        yjs_providers(&server, false, |_| {}).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(postgres_tests, client_tests)),
    ignore = "needs SYNCGRAPH_TEST_POSTGRES and SYNCGRAPH_TEST_CLIENTS=1"
)]
async fn yjs_providers_converge_postgres() {
    run(Backend::Postgres, |server| async move {
        yjs_providers(&server, false, |_| {}).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(postgres_tests, client_tests)),
    ignore = "needs SYNCGRAPH_TEST_POSTGRES and SYNCGRAPH_TEST_CLIENTS=1"
)]
async fn yjs_providers_converge_across_two_processes_postgres() {
    run(Backend::Postgres, |server| async move {
        yjs_providers(&server, true, |_| {}).await
    })
    .await;
}

/// Both processes on the bus (`--bus`, a stream of this test's own on the shared NATS
/// server, named after its database): what one process's peers type reaches the other's
/// through the stream.
fn on_the_bus(config: &mut syncgraph::Config) {
    config.bus = std::env::var("SYNCGRAPH_TEST_NATS").ok();
    let database = config.database_url.rsplit('/').next().unwrap_or_default();
    config.bus_stream = format!(
        "CLIENTS_{}",
        database
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect::<String>()
    );
    config.bus_max_age_secs = 600;
    config.bus_max_bytes = 64 << 20;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(postgres_tests, client_tests, nats_tests)),
    ignore = "needs SYNCGRAPH_TEST_POSTGRES, SYNCGRAPH_TEST_NATS and SYNCGRAPH_TEST_CLIENTS=1"
)]
async fn yjs_providers_converge_across_two_processes_on_the_bus_postgres() {
    run_with(Backend::Postgres, on_the_bus, |server| async move {
        let mut config = syncgraph::Config::for_database(server.database_url.clone());
        on_the_bus(&mut config);
        yjs_providers(&server, true, on_the_bus).await;
        // The updates came through the stream: this process took changes from it.
        let metrics = server.metrics().await;
        let received = metrics
            .lines()
            .find_map(|line| line.strip_prefix("syncgraph_bus_received_total "))
            .and_then(|value| value.trim().parse::<f64>().ok());
        assert!(received.is_some_and(|n| n > 0.0), "{metrics}");
        assert!(
            metrics.contains("syncgraph_bus_state{state=\"stream\"} 1"),
            "{metrics}"
        );
        // Never by falling back to the log.
        assert!(
            metrics.contains("syncgraph_bus_fallbacks_total 0\n"),
            "{metrics}"
        );
        let client = async_nats::connect(config.bus.as_deref().unwrap_or_default())
            .await
            .expect("connect to NATS");
        let _ = async_nats::jetstream::new(client)
            .delete_stream(&config.bus_stream)
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(client_tests),
    ignore = "needs SYNCGRAPH_TEST_CLIENTS=1 (Node.js, Chromium, npm ci)"
)]
async fn graphiql_and_the_demo_work_in_chromium_sqlite() {
    browser_suite(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(postgres_tests, client_tests)),
    ignore = "needs SYNCGRAPH_TEST_POSTGRES and SYNCGRAPH_TEST_CLIENTS=1"
)]
async fn graphiql_and_the_demo_work_in_chromium_postgres() {
    browser_suite(Backend::Postgres).await;
}

/// Generates the example's types from `schema.graphql` and compiles it with `tsc --strict`,
/// once per test run (both backends' tests share the output).
async fn build_typescript_example() -> PathBuf {
    static BUILT: tokio::sync::OnceCell<PathBuf> = tokio::sync::OnceCell::const_new();
    BUILT
        .get_or_init(|| async {
            let dir = installed("examples/typescript-client");
            let mut build = Command::new("npm");
            build
                .args(["run", "--silent", "build"])
                .current_dir(&dir)
                .stdin(Stdio::null());
            let output = output_within(build, SUITE_TIMEOUT)
                .await
                .unwrap_or_else(|err| panic!("codegen and tsc: {err}"));
            assert!(
                output.status.success(),
                "codegen or tsc failed on the TypeScript example:\n{}",
                report(&output)
            );
            dir
        })
        .await
        .clone()
}

async fn typescript_example(server: TestServer) {
    let dir = build_typescript_example().await;
    let mut example = Command::new("node");
    example
        .arg("dist/main.js")
        .current_dir(&dir)
        .env("SYNCGRAPH_URL", server.url(""))
        .stdin(Stdio::null());
    let output = output_within(example, SUITE_TIMEOUT)
        .await
        .unwrap_or_else(|err| panic!("the TypeScript example: {err}"));
    let report = report(&output);
    assert!(
        output.status.success(),
        "the TypeScript example failed:\n{report}"
    );
    assert!(
        report.contains("a CONFLICT handled")
            && report
                .contains("the same feed over multipart, graphql-sse distinct, graphql-sse single")
            && report.contains("persisted queries by hash")
            && report.contains("a live query rebuilt from"),
        "the example ran to its end:\n{report}"
    );
    println!("{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(client_tests),
    ignore = "needs SYNCGRAPH_TEST_CLIENTS=1 (Node.js, Chromium, npm ci)"
)]
async fn typed_typescript_example_compiles_and_runs_sqlite() {
    run(Backend::Sqlite, typescript_example).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(postgres_tests, client_tests)),
    ignore = "needs SYNCGRAPH_TEST_POSTGRES and SYNCGRAPH_TEST_CLIENTS=1"
)]
async fn typed_typescript_example_compiles_and_runs_postgres() {
    run(Backend::Postgres, typescript_example).await;
}
