//! The test harness: a real server on 127.0.0.1:0 over a fresh database (a temp SQLite file,
//! or a new PostgreSQL database when `SYNCGRAPH_TEST_POSTGRES` names a server), driven over
//! real HTTP.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sea_orm::{ConnectionTrait, Database, DatabaseConnection};
use serde_json::{Value, json};
use syncgraph::db::StatementCounter;
use syncgraph::{App, Config};
use tokio::sync::oneshot;

/// Every HTTP call in a test gives up after this long, so a hang fails instead.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Which database a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Generates, for each `async fn name(server: TestServer) { ... }`, a module `name` with the
/// tests `sqlite` and `postgres`.
#[macro_export]
macro_rules! both_backends {
    ($(async fn $name:ident($server:ident: TestServer) $body:block)*) => {
        $(
            mod $name {
                #[allow(unused_imports)]
                use super::*;

                async fn body($server: $crate::helpers::TestServer) $body

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    $crate::helpers::run($crate::helpers::Backend::Sqlite, body).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[cfg_attr(not(postgres_tests), ignore = "needs SYNCGRAPH_TEST_POSTGRES (a PostgreSQL server URL)")]
                async fn postgres() {
                    $crate::helpers::run($crate::helpers::Backend::Postgres, body).await;
                }
            }
        )*
    };
}

/// A running server and what a test needs to drive and inspect it.
pub struct TestServer {
    pub addr: SocketAddr,
    pub backend: Backend,
    /// The URL of this test's own database.
    pub database_url: String,
    /// The server's own connection pool; its statements are counted by `statements`.
    pub db: DatabaseConnection,
    pub statements: StatementCounter,
    /// Statements of the change feed (tailer, pruner), counted apart.
    pub feed_statements: StatementCounter,
    /// The hub, to wait (with a deadline) until subscriptions are registered.
    pub broker: std::sync::Arc<syncgraph::pubsub::Broker>,
    client: reqwest::Client,
}

/// The PostgreSQL server URL for tests. The tests that need it are ignored when the build saw
/// no `SYNCGRAPH_TEST_POSTGRES` (build.rs), so one that runs without it was built with it
/// and run apart from cargo: that is an error, not a silent pass.
fn postgres_server_url() -> String {
    match std::env::var("SYNCGRAPH_TEST_POSTGRES") {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "this test needs SYNCGRAPH_TEST_POSTGRES (a PostgreSQL server URL); run it through `cargo test` with the variable set"
        ),
    }
}

/// `server_url` with its database name replaced by `name`.
fn with_database(server_url: &str, name: &str) -> String {
    let (base, params) = match server_url.split_once('?') {
        Some((base, params)) => (base, format!("?{params}")),
        None => (server_url, String::new()),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_part = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    format!("{host_part}/{name}{params}")
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh database for one test: its URL and how to drop it afterwards.
pub enum FreshDatabase {
    Sqlite {
        _dir: tempfile::TempDir,
    },
    Postgres {
        admin: DatabaseConnection,
        name: String,
    },
}

async fn create_database(backend: Backend) -> (String, FreshDatabase) {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("temp dir");
            let url = format!("sqlite://{}", dir.path().join("test.db").display());
            (url, FreshDatabase::Sqlite { _dir: dir })
        }
        Backend::Postgres => {
            let server = postgres_server_url();
            let admin = Database::connect(server.as_str())
                .await
                .unwrap_or_else(|e| panic!("SYNCGRAPH_TEST_POSTGRES is set but unreachable: {e}"));
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos();
            let name = format!(
                "syncgraph_test_{}_{}_{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed),
                nanos
            );
            admin
                .execute_unprepared(&format!("CREATE DATABASE {name}"))
                .await
                .expect("create test database");
            (
                with_database(&server, &name),
                FreshDatabase::Postgres { admin, name },
            )
        }
    }
}

impl FreshDatabase {
    /// Drops the database (Postgres) or removes its directory (SQLite).
    pub async fn drop_database(self) {
        if let FreshDatabase::Postgres { admin, name } = self {
            admin
                .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await
                .expect("drop test database");
        }
    }
}

/// Settings every test server shares: short protocol timers, so their tests are quick.
pub fn test_settings(config: &mut Config) {
    config.ws_init_timeout_ms = 500;
    config.ws_keep_alive_secs = 1;
    config.stream_keep_alive_secs = 1;
    // Tests sign up many users and hold many subscriptions from one address; the limits
    // themselves are tested with their own settings (`limits.rs`).
    config.limits.auth_attempts_per_minute = 1_000_000;
    config.limits.max_subscriptions_per_user = 1_000_000;
    config.limits.max_operations_per_connection = 1_000_000;
}

/// A fresh, empty database on `backend`. Call `drop_database` when done.
pub async fn fresh_database(backend: Backend) -> (String, FreshDatabase) {
    create_database(backend).await
}

/// Runs `test` against a fresh server on `backend`, then stops the server and drops the
/// database, whether the test (or starting the server) panicked or not.
pub async fn run<F, Fut>(backend: Backend, test: F)
where
    F: FnOnce(TestServer) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    run_with(backend, |_| {}, test).await;
}

/// `run`, with the server's settings adjusted by `configure` first.
pub async fn run_with<F, Fut>(backend: Backend, configure: fn(&mut Config), test: F)
where
    F: FnOnce(TestServer) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (database_url, database) = fresh_database(backend).await;
    let outcome = tokio::spawn(serve_and_test(backend, database_url, configure, test)).await;
    database.drop_database().await;
    if let Err(err) = outcome {
        std::panic::resume_unwind(err.into_panic());
    }
}

/// `run_with` on a database the test made itself (`database_url`), which the test also
/// removes.
pub async fn run_on<F, Fut>(
    backend: Backend,
    database_url: String,
    configure: fn(&mut Config),
    test: F,
) where
    F: FnOnce(TestServer) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let outcome = tokio::spawn(serve_and_test(backend, database_url, configure, test)).await;
    if let Err(err) = outcome {
        std::panic::resume_unwind(err.into_panic());
    }
}

async fn serve_and_test<F, Fut>(
    backend: Backend,
    database_url: String,
    configure: fn(&mut Config),
    test: F,
) where
    F: FnOnce(TestServer) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut config = Config::for_database(database_url.clone());
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.jwt_secret = Some("test-secret".into());
    config.db_max_connections = 5;
    test_settings(&mut config);
    configure(&mut config);
    let app = App::build(&config).await.expect("build app");
    let server = TestServer {
        addr: app.local_addr().expect("local addr"),
        backend,
        database_url,
        db: app.db().clone(),
        statements: app.statements(),
        feed_statements: app.feed_statements(),
        broker: app.broker(),
        client: reqwest::Client::builder()
            .timeout(TIMEOUT)
            .build()
            .expect("http client"),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = tokio::spawn(app.run(async {
        stopped.await.ok();
    }));
    let outcome = tokio::spawn(test(server)).await;
    stop.send(()).ok();
    let stopped = tokio::time::timeout(TIMEOUT, serving).await;
    if let Err(err) = outcome {
        std::panic::resume_unwind(err.into_panic());
    }
    stopped
        .expect("server stops in time")
        .expect("server task")
        .expect("server ran cleanly");
}

/// Another server process's worth of state (its own pool, tailer, hub, listener) on the
/// same database: stands in for a second process, or for the same server after a restart.
pub struct Peer {
    pub addr: SocketAddr,
    pub broker: std::sync::Arc<syncgraph::pubsub::Broker>,
    stop: Option<oneshot::Sender<()>>,
    serving: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Peer {
    /// Shuts the peer down gracefully and waits (with a deadline) until it has stopped.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).ok();
        }
        if let Some(serving) = self.serving.take() {
            tokio::time::timeout(TIMEOUT, serving)
                .await
                .expect("peer stops in time")
                .expect("peer task")
                .expect("peer ran cleanly");
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).ok();
        }
    }
}

impl TestServer {
    /// Starts another server on this test's database (same JWT secret).
    pub async fn start_peer(&self) -> Peer {
        self.start_peer_with_secret(Some("test-secret")).await
    }

    /// Starts another server on this test's database with `jwt_secret` (`None`: the one
    /// stored in the database).
    pub async fn start_peer_with_secret(&self, jwt_secret: Option<&str>) -> Peer {
        self.start_peer_with(jwt_secret, |_| {}).await
    }

    /// Starts another server on this test's database with `jwt_secret`, its settings
    /// adjusted by `configure`.
    pub async fn start_peer_with(
        &self,
        jwt_secret: Option<&str>,
        configure: fn(&mut Config),
    ) -> Peer {
        let mut config = Config::for_database(self.database_url.clone());
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.jwt_secret = jwt_secret.map(str::to_owned);
        config.db_max_connections = 5;
        test_settings(&mut config);
        configure(&mut config);
        let app = App::build(&config).await.expect("build peer");
        let addr = app.local_addr().expect("peer addr");
        let broker = app.broker();
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = tokio::spawn(app.run(async {
            stopped.await.ok();
        }));
        Peer {
            addr,
            broker,
            stop: Some(stop),
            serving: Some(serving),
        }
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.client()
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("/metrics answers")
            .text()
            .await
            .expect("/metrics text")
    }

    /// Polls `/readyz` until it answers `status` (failing after `TIMEOUT`); returns its report.
    pub async fn readyz_until(&self, status: u16) -> Value {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let response = self.client.get(self.url("/readyz")).send().await.unwrap();
            let answered = response.status();
            let report: Value = response.json().await.unwrap_or(Value::Null);
            if answered == status {
                return report;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "/readyz answers {status} in time (last {answered}: {report})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `http://addr` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The HTTP client (with a timeout).
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// POSTs a GraphQL request without a token; returns the JSON response.
    pub async fn graphql(&self, query: &str, variables: Value) -> Value {
        self.graphql_with(None, query, variables).await
    }

    /// POSTs a GraphQL request with `Authorization: Bearer <token>`.
    pub async fn graphql_as(&self, token: &str, query: &str, variables: Value) -> Value {
        self.graphql_with(Some(token), query, variables).await
    }

    async fn graphql_with(&self, token: Option<&str>, query: &str, variables: Value) -> Value {
        let mut request = self
            .client
            .post(self.url("/graphql"))
            .json(&json!({ "query": query, "variables": variables }));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("send GraphQL request");
        assert_eq!(
            response.status(),
            200,
            "GraphQL over application/json answers 200"
        );
        response.json().await.expect("JSON response")
    }

    /// Signs up a user named `name` (email `<name>@example.com`); returns (token, id).
    pub async fn sign_up(&self, name: &str) -> (String, String) {
        let response = self
            .graphql(
                "mutation($input: SignUpInput!) { signUp(input: $input) { token user { id } } }",
                json!({ "input": {
                    "name": name,
                    "email": format!("{}@example.com", name.to_lowercase()),
                    "password": "correct horse battery",
                }}),
            )
            .await;
        let payload = data(&response, "signUp");
        (
            payload["token"].as_str().expect("token").to_owned(),
            payload["user"]["id"].as_str().expect("id").to_owned(),
        )
    }

    /// Creates a channel as `token`; returns its id.
    pub async fn create_channel(&self, token: &str, name: &str) -> String {
        let response = self
            .graphql_as(
                token,
                "mutation($name: String!) { createChannel(input: { name: $name }) { id } }",
                json!({ "name": name }),
            )
            .await;
        data(&response, "createChannel")["id"]
            .as_str()
            .expect("channel id")
            .to_owned()
    }

    /// Adds `user_id` to `channel_id` as `token`.
    pub async fn add_member(&self, token: &str, channel_id: &str, user_id: &str) {
        let response = self
            .graphql_as(
                token,
                "mutation($c: ID!, $u: ID!) { addChannelMember(input: { channelId: $c, userId: $u }) { id } }",
                json!({ "c": channel_id, "u": user_id }),
            )
            .await;
        data(&response, "addChannelMember");
    }

    /// Posts a message as `token`; returns the message JSON (id, body, version).
    pub async fn post_message(&self, token: &str, channel_id: &str, body: &str) -> Value {
        let response = self
            .graphql_as(
                token,
                "mutation($c: ID!, $b: String!) { postMessage(input: { channelId: $c, body: $b }) { id body version } }",
                json!({ "c": channel_id, "b": body }),
            )
            .await;
        data(&response, "postMessage").clone()
    }

    /// A separate connection to this test's database, standing in for any other SQL client.
    pub async fn sql(&self) -> DatabaseConnection {
        Database::connect(self.database_url.as_str())
            .await
            .expect("separate SQL connection")
    }
}

/// `response.data.<field>`, failing with the whole response when there were errors.
pub fn data<'a>(response: &'a Value, field: &str) -> &'a Value {
    assert!(
        response.get("errors").is_none(),
        "unexpected errors: {response:#}"
    );
    &response["data"][field]
}

/// The `extensions.code` of the first error, failing when there is none.
pub fn error_code(response: &Value) -> &str {
    response["errors"][0]["extensions"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error with a code: {response:#}"))
}
