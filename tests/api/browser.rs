//! The browser tests: GraphiQL and `/demo` in Debian's Chromium, driven by playwright-core
//! (`tests/browser/browser.test.mjs`, run with Node's test runner) against the real binary.
//! They run when `SYNCGRAPH_TEST_BROWSER=1` (with `CI=true` they must); they need
//! `/usr/bin/chromium` (or `CHROMIUM`) and `npm ci --prefix tests/browser`. A failure names
//! the folder holding a screenshot of every page of the failed test.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::helpers::{Backend, fresh_database};

/// How many tests `browser.test.mjs` holds.
const BROWSER_TESTS: usize = 4;

/// The whole browser suite's deadline (it takes about 15 s here).
const SUITE_TIMEOUT: Duration = Duration::from_secs(300);

fn enabled() -> bool {
    match std::env::var("SYNCGRAPH_TEST_BROWSER") {
        Ok(value) if !value.is_empty() && value != "0" => true,
        _ => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!(
                    "CI=true but SYNCGRAPH_TEST_BROWSER is not set: the browser tests cannot be skipped in CI"
                );
            }
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "note: browser tests skipped: set SYNCGRAPH_TEST_BROWSER=1 to run them"
            );
            false
        }
    }
}

async fn browser_suite(backend: Backend) {
    if !enabled() {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run `npm ci --prefix tests/browser`"
    );
    let Some((database_url, database)) = fresh_database(backend).await else {
        return;
    };
    let screenshots = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("browser-screenshots")
        .join(format!("{backend:?}").to_lowercase());
    let run = Command::new("node")
        .args(["--test", "--test-concurrency=1", "browser.test.mjs"])
        .current_dir(&dir)
        .env("SYNCGRAPH_BIN", env!("CARGO_BIN_EXE_syncgraph"))
        .env("SYNCGRAPH_DATABASE_URL", &database_url)
        .env("SCREENSHOT_DIR", &screenshots)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let outcome = tokio::time::timeout(SUITE_TIMEOUT, run).await;
    database.drop_database().await;
    let output = outcome
        .unwrap_or_else(|_| panic!("the browser tests did not finish in {SUITE_TIMEOUT:?}"))
        .expect("run node (is Node.js installed?)");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "browser tests failed; screenshots in {}:\n{report}",
        screenshots.display()
    );
    // A test that was skipped or never registered would not fail the runner.
    let passed = report
        .lines()
        .filter(|line| line.starts_with("ok "))
        .count();
    assert_eq!(
        passed, BROWSER_TESTS,
        "expected {BROWSER_TESTS} passing browser tests:\n{report}"
    );
    println!("{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphiql_and_the_demo_work_in_chromium_sqlite() {
    browser_suite(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphiql_and_the_demo_work_in_chromium_postgres() {
    browser_suite(Backend::Postgres).await;
}
