//! Faults: PostgreSQL restarted, or every connection dropped, while subscribers are
//! connected; the server keeps serving and nothing is lost. The database unreachable, or not
//! yet created, at start. An SQLite WAL that would grow without bound.

use sea_orm::{ConnectionTrait, Statement};
use serde_json::json;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::helpers::{Backend, TIMEOUT, TestServer, run_on, run_with};
use crate::subscriptions::{MESSAGE_EVENTS, event, sql_insert};
use crate::ws_client::{WsClient, caught_up, wait_for_subscribers};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs SYNCGRAPH_TEST_POSTGRES (a PostgreSQL server URL)"
)]
async fn every_connection_dropped_by_postgres_loses_nothing_postgres() {
    // A slow fallback poll: only a working LISTEN (re-established) delivers in time.
    let slow_poll: fn(&mut syncgraph::Config) = |config| config.poll_ms = 60_000;
    run_with(Backend::Postgres, slow_poll, |server: TestServer| async move {
        let (ada, ada_id) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "faults").await;
        caught_up(&server).await;
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        ws.subscribe("1", MESSAGE_EVENTS, json!({ "c": channel })).await;
        wait_for_subscribers(&server.broker, &channel, 1).await;
        server.post_message(&ada, &channel, "before").await;
        let before = ws.next_payload("1").await;
        assert_eq!(event(&before)["message"]["body"], "before");
        let cursor = event(&before)["cursor"].as_str().unwrap().to_owned();

        // Every server connection to this database is killed: request pool, feed pool and
        // the LISTEN connection alike.
        let sql = server.sql().await;
        let killed = sql
            .query_all_raw(Statement::from_string(
                sea_orm::DatabaseBackend::Postgres,
                "SELECT pg_terminate_backend(pid) AS killed FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
            ))
            .await
            .unwrap();
        assert!(killed.len() >= 3, "the server's connections were killed ({})", killed.len());

        // Writes by SQL and through the API (on a fresh connection of the pool) both reach
        // the subscriber that stayed connected, in order.
        sql_insert(&sql, &channel, &ada_id, "by sql").await;
        // Only the re-established LISTEN can deliver this one in time (the poll is slow and
        // no write of this process rings the doorbell before it arrives).
        let first = ws.next_payload("1").await;
        assert_eq!(event(&first)["message"]["body"], "by sql");
        let deadline = tokio::time::Instant::now() + crate::helpers::TIMEOUT;
        let posted = loop {
            let response = server
                .graphql_as(&ada, "mutation($c: ID!) { postMessage(input: { channelId: $c, body: \"by api\" }) { id } }", json!({ "c": channel }))
                .await;
            if response.get("errors").is_none() {
                break response;
            }
            // A request that met a dead connection answers INTERNAL_SERVER_ERROR (no SQL in
            // it) and the next one gets a new connection.
            assert_eq!(crate::helpers::error_code(&response), "INTERNAL_SERVER_ERROR", "{response}");
            assert!(tokio::time::Instant::now() < deadline, "the API recovers in time");
        };
        assert!(posted["data"]["postMessage"]["id"].is_string());
        let second = ws.next_payload("1").await;
        assert_eq!(event(&second)["message"]["body"], "by api");

        // A client that reconnects and resumes from its cursor gets both, once.
        let mut again = WsClient::connect_as(&server, Some(&ada)).await;
        again.subscribe("2", MESSAGE_EVENTS, json!({ "c": channel, "after": cursor })).await;
        let replayed: Vec<String> = [again.next_payload("2").await, again.next_payload("2").await]
            .iter()
            .map(|p| event(p)["message"]["body"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(replayed, ["by sql", "by api"]);
        // And the server says it is ready again.
        caught_up(&server).await;
        server.readyz_until(200).await;
        let _ = sql.execute_unprepared("SELECT 1").await;
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_database_at_start_is_retried_then_a_clear_error() {
    let started = std::time::Instant::now();
    let output = tokio::time::timeout(
        crate::helpers::TIMEOUT,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_syncgraph"))
            .args([
                "--database-url",
                "postgres://postgres:hunter2@127.0.0.1:1/nowhere",
                "--db-connect-timeout-secs",
                "4",
                "--listen",
                "127.0.0.1:0",
            ])
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "0")
            .output(),
    )
    .await
    .expect("the binary gives up in time")
    .expect("run the binary");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("the database cannot be reached; retrying"),
        "{stderr}"
    );
    assert!(
        stderr.contains("could not be reached in 4 s of retrying"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        !stderr.contains("hunter2"),
        "the password stays out of the log: {stderr}"
    );
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(1),
        "it retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs SYNCGRAPH_TEST_POSTGRES (a PostgreSQL server URL)"
)]
async fn a_server_started_before_its_database_exists_waits_for_it_postgres() {
    let (url, fresh) = crate::helpers::fresh_database(Backend::Postgres).await;
    // Take the database away, start the server, then create it: the server waits for it.
    fresh.drop_database().await;
    let name = url.rsplit('/').next().unwrap().to_owned();
    let admin_url = std::env::var("SYNCGRAPH_TEST_POSTGRES").unwrap();
    let mut config = syncgraph::Config::for_database(url.clone());
    config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.db_connect_timeout_secs = 30;
    crate::helpers::test_settings(&mut config);
    let starting = tokio::spawn(async move { syncgraph::app::App::build(&config).await });
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    assert!(!starting.is_finished(), "the server waits for its database");
    let (admin, _) = syncgraph::db::connect(&admin_url, 1).await.unwrap();
    admin
        .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
        .await
        .unwrap();
    let app = tokio::time::timeout(crate::helpers::TIMEOUT, starting)
        .await
        .expect("the server starts once the database exists")
        .unwrap()
        .expect("the server builds");
    let addr = app.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(app.run(async {
        stopped.await.ok();
    }));
    // Ready once the tailer has finished its first read.
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + crate::helpers::TIMEOUT;
    loop {
        let health = client
            .get(format!("http://{addr}/readyz"))
            .timeout(crate::helpers::TIMEOUT)
            .send()
            .await
            .unwrap();
        if health.status() == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "ready in time");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stop.send(()).ok();
    tokio::time::timeout(crate::helpers::TIMEOUT, serving)
        .await
        .expect("stops in time")
        .unwrap()
        .unwrap();
    admin
        .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await
        .unwrap();
}

/// A PostgreSQL server of the test's own: `initdb` into a temporary directory, served on a
/// free port, so the test can stop and start it the way an operator restarts the database
/// without disturbing the shared server the other tests use.
pub struct OwnPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// PostgreSQL refuses to run as root; as root, its tools run as the `postgres` user.
    as_postgres: bool,
}

impl OwnPostgres {
    /// A new server, started (its test runs only where the PostgreSQL runs are on).
    pub async fn start_new() -> Self {
        let bin = postgres_bin_dir().expect(
            "SYNCGRAPH_TEST_POSTGRES is set, but PostgreSQL's server programs (initdb, pg_ctl) \
             were found neither on PATH nor in /usr/lib/postgresql/*/bin",
        );
        let as_postgres = std::fs::metadata("/proc/self").unwrap().uid() == 0;
        let dir = tempfile::tempdir().unwrap();
        if as_postgres {
            let chown = std::process::Command::new("chown")
                .arg("postgres:")
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(chown.success(), "chown the data directory to postgres");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = OwnPostgres {
            dir,
            bin,
            port,
            as_postgres,
        };
        let data = pg.data();
        pg.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )
        .await;
        pg.start().await;
        pg
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn command(&self, program: &str) -> std::process::Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            std::process::Command::new(path)
        }
    }

    async fn run(&self, program: &str, args: &[&str]) {
        let mut command = tokio::process::Command::from(self.command(program));
        command.args(args).kill_on_drop(true);
        // Longer than pg_ctl's own `-t 30`, so its error is the one reported.
        let output = tokio::time::timeout(
            TIMEOUT + std::time::Duration::from_secs(15),
            command.output(),
        )
        .await
        .unwrap_or_else(|_| panic!("{program} finishes in time"))
        .unwrap();
        assert!(
            output.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Starts the server and waits until it accepts connections.
    pub async fn start(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log").display().to_string();
        let data = self.data();
        self.run(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-o", &options, "-w", "-t", "30", "start",
            ],
        )
        .await;
    }

    /// Stops the server the way `systemctl restart` does (fast: open sessions are ended).
    pub async fn stop(&self) {
        let data = self.data();
        self.run(
            "pg_ctl",
            &["-D", &data, "-m", "fast", "-w", "-t", "30", "stop"],
        )
        .await;
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["-D", &self.data(), "-m", "immediate", "-w", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// The directory holding `initdb` and `pg_ctl`: on PATH, or Debian's newest
/// `/usr/lib/postgresql/<version>/bin`.
fn postgres_bin_dir() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file());
    on_path.or_else(|| {
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let version = entry.file_name().to_str()?.parse().ok()?;
                let bin = entry.path().join("bin");
                Path::new(&bin)
                    .join("pg_ctl")
                    .is_file()
                    .then_some((version, bin))
            })
            .collect();
        versions.sort();
        versions.pop().map(|(_, bin)| bin)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs SYNCGRAPH_TEST_POSTGRES (a PostgreSQL server URL)"
)]
async fn postgres_restarted_while_subscribers_are_connected_loses_nothing_postgres() {
    let pg = OwnPostgres::start_new().await;
    let url = pg.url();
    let pg = std::sync::Arc::new(pg);
    let restartable = pg.clone();
    // A slow fallback poll: only a re-established LISTEN delivers in time.
    let slow_poll: fn(&mut syncgraph::Config) = |config| config.poll_ms = 60_000;
    run_on(Backend::Postgres, url, slow_poll, move |server: TestServer| async move {
        let pg = restartable;
        let (ada, ada_id) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "restart").await;
        caught_up(&server).await;
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        ws.subscribe("1", MESSAGE_EVENTS, json!({ "c": channel })).await;
        wait_for_subscribers(&server.broker, &channel, 1).await;
        server.post_message(&ada, &channel, "before").await;
        let before = ws.next_payload("1").await;
        assert_eq!(event(&before)["message"]["body"], "before");
        let cursor = event(&before)["cursor"].as_str().unwrap().to_owned();

        pg.stop().await;
        // While the database is down: alive, not ready, and a write is refused with a code
        // (no SQL, no connection details) instead of hanging or crashing.
        let alive = server.client().get(server.url("/healthz")).send().await.unwrap();
        assert_eq!(alive.status(), 200);
        let ready = server.client().get(server.url("/readyz")).send().await.unwrap();
        assert_eq!(ready.status(), 503);
        let refused = server
            .graphql_as(&ada, "mutation($c: ID!) { postMessage(input: { channelId: $c, body: \"lost?\" }) { id } }", json!({ "c": channel }))
            .await;
        assert_eq!(crate::helpers::error_code(&refused), "INTERNAL_SERVER_ERROR", "{refused}");
        let text = refused.to_string();
        assert!(!text.contains("127.0.0.1") && !text.contains("INSERT"), "{text}");

        pg.start().await;
        // After the restart: a write by SQL and one through the API (retried until the pool
        // has a working connection) both reach the subscriber that stayed connected, in order.
        let sql = server.sql().await;
        sql_insert(&sql, &channel, &ada_id, "by sql").await;
        // Only the re-established LISTEN can deliver this one in time (the poll is slow and
        // no write of this process rings the doorbell before it arrives).
        let first = ws.next_payload("1").await;
        assert_eq!(event(&first)["message"]["body"], "by sql");
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let response = server
                .graphql_as(&ada, "mutation($c: ID!) { postMessage(input: { channelId: $c, body: \"by api\" }) { id } }", json!({ "c": channel }))
                .await;
            if response.get("errors").is_none() {
                break;
            }
            assert_eq!(crate::helpers::error_code(&response), "INTERNAL_SERVER_ERROR", "{response}");
            assert!(tokio::time::Instant::now() < deadline, "the API recovers in time");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let second = ws.next_payload("1").await;
        assert_eq!(event(&second)["message"]["body"], "by api");

        // A client resuming from the cursor it had before the restart gets both, once, and
        // the refused write is nowhere.
        let mut again = WsClient::connect_as(&server, Some(&ada)).await;
        again.subscribe("2", MESSAGE_EVENTS, json!({ "c": channel, "after": cursor })).await;
        let replayed: Vec<String> = [again.next_payload("2").await, again.next_payload("2").await]
            .iter()
            .map(|p| event(p)["message"]["body"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(replayed, ["by sql", "by api"]);
        let page = server
            .graphql_as(&ada, "query($c: ID!) { channel(id: $c) { messages(last: 10) { edges { node { body } } } } }", json!({ "c": channel }))
            .await;
        let bodies: Vec<&str> = page["data"]["channel"]["messages"]["edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["node"]["body"].as_str().unwrap())
            .collect();
        assert_eq!(bodies, ["before", "by sql", "by api"], "{page}");
        server.readyz_until(200).await;
    })
    .await;
    drop(pg);
}

/// SQLite's own automatic checkpoint never runs for the server's writes (they are
/// `... RETURNING` statements, committed when sqlx resets them), so the server checkpoints
/// the WAL itself: the database file takes in what was written, instead of everything
/// piling up in an ever-growing WAL file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_wal_is_checkpointed_while_the_server_writes() {
    run_with(
        Backend::Sqlite,
        |_| {},
        |server: TestServer| async move {
            let path =
                std::path::PathBuf::from(server.database_url.trim_start_matches("sqlite://"));
            let size =
                |path: &std::path::Path| std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            let (ada, _) = server.sign_up("Ada").await;
            let channel = server.create_channel(&ada, "wal").await;
            for i in 0..50 {
                server.post_message(&ada, &channel, &format!("m{i}")).await;
            }
            let wal = path.with_extension("db-wal");
            assert!(size(&wal) > 0, "the writes are in the WAL");
            let written = size(&path);
            let deadline = tokio::time::Instant::now() + TIMEOUT;
            while size(&path) <= written {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the database file takes in the WAL in time ({} bytes, WAL {} bytes)",
                    size(&path),
                    size(&wal)
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        },
    )
    .await;
}
