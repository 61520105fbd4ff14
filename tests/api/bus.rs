//! Scale-out over NATS JetStream (`--bus`): three real server processes share one
//! PostgreSQL database and one stream, with subscribers on each, while writers go through
//! every process's API and through raw SQL whose commits come out of position order. Through
//! each fault an operator meets (the relay killed with -9, NATS stopped, NATS restarted with
//! its store wiped, PostgreSQL restarted) every subscriber gets every change exactly once, in
//! the log's order. Tests that stop NATS run a `nats-server -js` of their own on a free port.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sea_orm::{ConnectionTrait, Database, DatabaseConnection, TransactionTrait};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::faults::OwnPostgres;
use crate::helpers::{Backend, TIMEOUT, fresh_database};
use crate::process::spawn_binary_with;
use crate::subscriptions::cursor_at;
use crate::ws_client::{Frame, WsClient};

/// A test that needs PostgreSQL and NATS (ignored, and counted so, without them).
macro_rules! bus_test {
    ($(#[$meta:meta])* async fn $name:ident() $body:block) => {
        $(#[$meta])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        #[cfg_attr(
            not(all(postgres_tests, nats_tests)),
            ignore = "needs SYNCGRAPH_TEST_POSTGRES and SYNCGRAPH_TEST_NATS"
        )]
        async fn $name() $body
    };
}

const BODIES: &str = "subscription($c: ID!, $after: String) { messageEvents(channelId: $c, after: $after) { cursor message { body } } }";

/// The last write of every scenario: a subscriber that has it has everything.
const END: &str = "end";

/// The shared NATS server (`SYNCGRAPH_TEST_NATS`).
fn shared_nats() -> String {
    std::env::var("SYNCGRAPH_TEST_NATS").expect("SYNCGRAPH_TEST_NATS names a NATS server")
}

/// A stream name of this test's own.
fn unique_stream(test: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "TEST_{test}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A NATS server with JetStream of the test's own, on a free port, its store in a temporary
/// directory, so the test can stop it and wipe it.
struct OwnNats {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    args: Vec<String>,
}

impl OwnNats {
    async fn start_new() -> Self {
        Self::start_new_with(&[]).await
    }

    /// A server with more arguments (`--user`, `--pass`).
    async fn start_new_with(args: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut nats = OwnNats {
            dir: tempfile::tempdir().unwrap(),
            port,
            child: None,
            args: args.iter().map(|arg| arg.to_string()).collect(),
        };
        nats.start().await;
        nats
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// Starts the server and waits until it accepts connections.
    async fn start(&mut self) {
        let child = Command::new(nats_server())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.store())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + TIMEOUT;
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "nats-server accepts connections in time"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the server (-9).
    async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill nats-server");
        }
    }
}

/// `nats-server` on PATH, else Debian's.
fn nats_server() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join("nats-server"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/nats-server"))
}

/// A server process with `--bus`.
struct Node {
    child: Child,
    addr: SocketAddr,
}

async fn start_node(database_url: &str, nats: &str, stream: &str) -> Node {
    // Small retention: a stream a failed test leaves on the shared server empties soon (and
    // the next run deletes it: `sweep_streams`).
    let (child, addr) = spawn_binary_with(
        database_url,
        &[
            "--bus",
            nats,
            "--bus-stream",
            stream,
            "--bus-max-age-secs",
            "600",
            "--bus-max-bytes",
            "67108864",
            "--ws-keep-alive-secs",
            "2",
        ],
    )
    .await;
    Node { child, addr }
}

/// Deletes the test streams on `nats` left by test runs whose process has gone (a test that
/// failed before deleting its own).
async fn sweep_streams(nats: &str) {
    use futures_util::StreamExt as _;
    let client = async_nats::connect(nats).await.expect("connect to NATS");
    let jetstream = async_nats::jetstream::new(client);
    let names: Vec<String> = jetstream
        .stream_names()
        .filter_map(|name| async move { name.ok() })
        .collect()
        .await;
    for name in names {
        let pid = name
            .strip_prefix("TEST_")
            .and_then(|rest| rest.rsplit('_').nth(1))
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = jetstream.delete_stream(&name).await;
        }
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(TIMEOUT).build().unwrap()
}

/// A metric's value on the process at `addr` (`None`: unreachable or not there).
async fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let text = http()
        .get(format!("http://{addr}/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// The `bus` part of `/readyz`.
async fn bus_report(addr: SocketAddr) -> Value {
    let report: Value = http()
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .expect("/readyz")
        .json()
        .await
        .expect("JSON");
    report["bus"].clone()
}

/// Waits until `check` holds, or fails with `what`.
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + TIMEOUT;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn graphql(addr: SocketAddr, token: Option<&str>, query: &str, variables: Value) -> Value {
    let mut request = http()
        .post(format!("http://{addr}/graphql"))
        .json(&json!({ "query": query, "variables": variables }));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request
        .send()
        .await
        .expect("GraphQL")
        .json()
        .await
        .expect("JSON")
}

/// Signs Ada up and creates a channel at `addr`: (token, user id, channel id).
async fn ada_and_channel(addr: SocketAddr) -> (String, String, String) {
    let signed = graphql(
        addr,
        None,
        "mutation($input: SignUpInput!) { signUp(input: $input) { token user { id } } }",
        json!({ "input": { "name": "Ada", "email": "ada@example.com", "password": "correct horse battery" } }),
    )
    .await;
    let token = signed["data"]["signUp"]["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let user = signed["data"]["signUp"]["user"]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let created = graphql(
        addr,
        Some(&token),
        "mutation { createChannel(input: { name: \"bus\" }) { id } }",
        json!({}),
    )
    .await;
    let channel = created["data"]["createChannel"]["id"]
        .as_str()
        .expect("channel")
        .to_owned();
    (token, user, channel)
}

/// What one subscriber received: (cursor, body), in order.
type Received = Arc<Mutex<Vec<(String, String)>>>;

/// Subscribes at `addr` from `after` and records every event until `END` or until the socket
/// closes (its process died).
fn subscriber(
    addr: SocketAddr,
    token: String,
    channel: String,
    after: String,
) -> (Received, tokio::task::JoinHandle<()>) {
    let received: Received = Arc::default();
    let into = received.clone();
    let task = tokio::spawn(async move {
        let mut ws = WsClient::connect_to(addr, Some(&token)).await;
        ws.subscribe("s", BODIES, json!({ "c": channel, "after": after }))
            .await;
        loop {
            match ws.recv_frame().await {
                Frame::Json(message) => match message["type"].as_str() {
                    Some("ping") => ws.send(json!({ "type": "pong" })).await,
                    Some("next") => {
                        let event = &message["payload"]["data"]["messageEvents"];
                        assert!(event.is_object(), "an event: {message}");
                        let body = event["message"]["body"].as_str().unwrap().to_owned();
                        let cursor = event["cursor"].as_str().unwrap().to_owned();
                        let end = body == END;
                        into.lock().unwrap().push((cursor, body));
                        if end {
                            return;
                        }
                    }
                    _ => panic!("the subscription ended: {message}"),
                },
                Frame::Close(_) | Frame::Error(_) => return,
            }
        }
    });
    (received, task)
}

fn bodies(received: &Received) -> Vec<String> {
    received
        .lock()
        .unwrap()
        .iter()
        .map(|(_, body)| body.clone())
        .collect()
}

/// Writes until stopped: a message through the API of each process in turn, and every third
/// round two by SQL whose commits come out of position order (the first-inserted commits
/// last). Failures (a dead process, a database restarting) are retried by the next round;
/// what counts is what the log holds.
fn writer(
    addrs: Arc<Mutex<Vec<SocketAddr>>>,
    sql: DatabaseConnection,
    token: String,
    channel: String,
    author: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u32> {
    tokio::spawn(async move {
        let mut round = 0u32;
        while !stop.load(Ordering::Relaxed) {
            round += 1;
            let addr = {
                let addrs = addrs.lock().unwrap();
                addrs[round as usize % addrs.len()]
            };
            let post = http()
                .post(format!("http://{addr}/graphql"))
                .bearer_auth(&token)
                .timeout(Duration::from_secs(2))
                .json(&json!({
                    "query": "mutation($c: ID!, $b: String!) { postMessage(input: { channelId: $c, body: $b }) { id } }",
                    "variables": { "c": channel, "b": format!("api-{round}") },
                }))
                .send();
            let _ = post.await;
            if round.is_multiple_of(3) {
                let insert = |body: String| {
                    format!(
                        "INSERT INTO messages (channel_id, author_id, body) VALUES ({channel}, {author}, '{body}')"
                    )
                };
                let out_of_order = async {
                    let early = sql.begin().await?;
                    early
                        .execute_unprepared(&insert(format!("sql-{round}-early")))
                        .await?;
                    let late = sql.begin().await?;
                    late.execute_unprepared(&insert(format!("sql-{round}-late")))
                        .await?;
                    late.commit().await?;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    early.commit().await?;
                    Ok::<_, sea_orm::DbErr>(())
                };
                let _ = tokio::time::timeout(Duration::from_secs(2), out_of_order).await;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        round
    })
}

/// The bodies of the channel's messages created after `from`, in the log's order.
async fn logged(sql: &DatabaseConnection, channel: &str, from: i64) -> Vec<String> {
    let rows = sql
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Postgres,
            format!(
                "SELECT row_data->>'body' AS body FROM change_log WHERE table_name = 'messages' \
                 AND op = 'INSERT' AND scope_key = {channel} AND position > {from} ORDER BY position"
            ),
        ))
        .await
        .expect("read the log");
    rows.iter()
        .map(|row| row.try_get("", "body").unwrap())
        .collect()
}

async fn max_position(sql: &DatabaseConnection) -> i64 {
    let row = sql
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Postgres,
            "SELECT COALESCE(MAX(position), 0) AS p FROM change_log",
        ))
        .await
        .expect("max position")
        .expect("a row");
    row.try_get("", "p").unwrap()
}

/// Deletes a stream of the shared server.
async fn delete_stream(nats: &str, stream: &str) {
    let client = async_nats::connect(nats).await.expect("connect to NATS");
    let _ = async_nats::jetstream::new(client)
        .delete_stream(stream)
        .await;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    KillRelay,
    StopNats,
    WipeNats,
    RestartPostgres,
    PurgedWhileAway,
}

/// Three processes, a subscriber on each, writers, `fault` in the middle; then every
/// subscriber (the killed process's resumed on a survivor) has had every change once, in
/// order.
async fn three_processes_through(fault: Fault) {
    let own_pg = match fault {
        Fault::RestartPostgres => Some(OwnPostgres::start_new().await),
        _ => None,
    };
    let (database_url, fresh) = match &own_pg {
        Some(pg) => (pg.url(), None),
        None => {
            let (url, fresh) = fresh_database(Backend::Postgres).await;
            (url, Some(fresh))
        }
    };
    let mut own_nats = match fault {
        Fault::StopNats | Fault::WipeNats => Some(OwnNats::start_new().await),
        _ => None,
    };
    let nats = own_nats.as_ref().map_or_else(shared_nats, OwnNats::url);
    sweep_streams(&nats).await;
    let stream = unique_stream(&format!("{fault:?}"));

    // The first process becomes the relay before the others start.
    let mut nodes = vec![start_node(&database_url, &nats, &stream).await];
    let first = nodes[0].addr;
    until("the first process becomes the relay", || async {
        metric(first, "syncgraph_bus_relay").await == Some(1.0)
    })
    .await;
    nodes.push(start_node(&database_url, &nats, &stream).await);
    nodes.push(start_node(&database_url, &nats, &stream).await);

    let sql = Database::connect(&database_url)
        .await
        .expect("SQL connection");
    let (token, author, channel) = ada_and_channel(first).await;
    let from = max_position(&sql).await;
    let mut subscribers: Vec<_> = nodes
        .iter()
        .map(|node| subscriber(node.addr, token.clone(), channel.clone(), cursor_at(from)))
        .collect();
    let addrs = Arc::new(Mutex::new(
        nodes.iter().map(|node| node.addr).collect::<Vec<_>>(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let writing = writer(
        addrs.clone(),
        sql.clone(),
        token.clone(),
        channel.clone(),
        author.clone(),
        stop.clone(),
    );

    // Changes flow to every process through the bus.
    for (received, _) in &subscribers {
        until("changes reach every process", || async {
            received.lock().unwrap().len() >= 6
        })
        .await;
    }
    for node in &nodes {
        assert_eq!(bus_report(node.addr).await["state"], "stream");
    }

    let mut killed = None;
    let mut resumed = None;
    match fault {
        Fault::KillRelay => {
            let victim = 0;
            nodes[victim].child.start_kill().expect("kill -9 the relay");
            let killed_at = Instant::now();
            nodes[victim].child.wait().await.expect("the relay is dead");
            addrs.lock().unwrap().remove(victim);
            let survivors: Vec<SocketAddr> = nodes[1..].iter().map(|node| node.addr).collect();
            until("a survivor takes the relay's role", || async {
                for addr in &survivors {
                    if metric(*addr, "syncgraph_bus_relay").await == Some(1.0) {
                        return true;
                    }
                }
                false
            })
            .await;
            let takeover = killed_at.elapsed();
            // A change written now reaches the survivors through the new relay.
            let marker_at = Instant::now();
            sql.execute_unprepared(&format!(
                "INSERT INTO messages (channel_id, author_id, body) VALUES ({channel}, {author}, 'after-takeover')"
            ))
            .await
            .unwrap();
            for (received, _) in &subscribers[1..] {
                until("a change after the takeover arrives", || async {
                    bodies(received).iter().any(|body| body == "after-takeover")
                })
                .await;
            }
            eprintln!(
                "relay takeover after kill -9: {} ms to a new relay; a change written then reached every survivor in {} ms",
                takeover.as_millis(),
                marker_at.elapsed().as_millis()
            );
            killed = Some(victim);
            // Its client finds its socket closed and resumes on a survivor from the last
            // cursor it had, while the writes go on.
            let (received, task) = &mut subscribers[victim];
            tokio::time::timeout(TIMEOUT, task)
                .await
                .expect("the killed process's socket closes in time")
                .expect("subscriber");
            let last = received
                .lock()
                .unwrap()
                .last()
                .map(|(cursor, _)| cursor.clone());
            resumed = Some(subscriber(
                nodes[1].addr,
                token.clone(),
                channel.clone(),
                last.unwrap_or_else(|| cursor_at(from)),
            ));
        }
        Fault::StopNats => {
            let nats = own_nats.as_mut().unwrap();
            nats.stop().await;
            // During the outage, changes still arrive, through PostgreSQL.
            sql.execute_unprepared(&format!(
                "INSERT INTO messages (channel_id, author_id, body) VALUES ({channel}, {author}, 'during-outage')"
            ))
            .await
            .unwrap();
            for (received, _) in &subscribers {
                until("a change during the outage arrives", || async {
                    bodies(received).iter().any(|body| body == "during-outage")
                })
                .await;
            }
            for node in &nodes {
                assert_eq!(bus_report(node.addr).await["state"], "postgres");
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            nats.start().await;
        }
        Fault::WipeNats => {
            let nats = own_nats.as_mut().unwrap();
            nats.stop().await;
            std::fs::remove_dir_all(nats.store()).expect("wipe the store");
            nats.start().await;
        }
        Fault::PurgedWhileAway => {
            // A process stops (SIGSTOP) while the stream moves on, then the stream is purged:
            // when it resumes, the stream no longer holds what it needs.
            let away = nodes[2].child.id().expect("pid");
            addrs.lock().unwrap().retain(|addr| *addr != nodes[2].addr);
            signal(away, "STOP").await;
            // More than the consumer's pull batches hold (those reach the stopped process's
            // socket at once).
            sql.execute_unprepared(&format!(
                "INSERT INTO messages (channel_id, author_id, body) \
                 SELECT {channel}, {author}, 'bulk-' || n FROM generate_series(1, 3000) AS n"
            ))
            .await
            .unwrap();
            until("changes go on while a process is away", || async {
                bodies(&subscribers[0].0)
                    .iter()
                    .any(|body| body == "bulk-3000")
            })
            .await;
            let client = async_nats::connect(nats.as_str())
                .await
                .expect("connect to NATS");
            async_nats::jetstream::new(client)
                .get_stream(&stream)
                .await
                .expect("the stream")
                .purge()
                .await
                .expect("purge the stream");
            let before = bodies(&subscribers[0].0).len();
            until("changes go on after the purge", || async {
                bodies(&subscribers[0].0).len() >= before + 6
            })
            .await;
            signal(away, "CONT").await;
            addrs.lock().unwrap().push(nodes[2].addr);
        }
        Fault::RestartPostgres => {
            let pg = own_pg.as_ref().unwrap();
            pg.stop().await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            pg.start().await;
        }
    }

    // Writes go on; every live process comes back to the stream.
    let live: Vec<SocketAddr> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != killed)
        .map(|(_, node)| node.addr)
        .collect();
    // Each takes changes from the stream again (the restarted, re-seeded or surviving one).
    for addr in &live {
        let deadline = Instant::now() + TIMEOUT;
        let received = loop {
            if let Some(received) = metric(*addr, "syncgraph_bus_received_total").await {
                break received;
            }
            assert!(Instant::now() < deadline, "the process answers in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        until("the process follows the stream again", || async {
            bus_report(*addr).await["state"] == "stream"
                && metric(*addr, "syncgraph_bus_received_total")
                    .await
                    .is_some_and(|now| now >= received + 20.0)
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let rounds = writing.await.expect("writer");
    let sql = match fault {
        // The pool may hold connections from before the restart.
        Fault::RestartPostgres => Database::connect(&database_url)
            .await
            .expect("SQL connection"),
        _ => sql,
    };
    sql.execute_unprepared(&format!(
        "INSERT INTO messages (channel_id, author_id, body) VALUES ({channel}, {author}, '{END}')"
    ))
    .await
    .expect("the last write");

    let expected = logged(&sql, &channel, from).await;
    assert_eq!(expected.last().map(String::as_str), Some(END));
    for (i, (received, task)) in subscribers.into_iter().enumerate() {
        if Some(i) != killed {
            tokio::time::timeout(TIMEOUT, task)
                .await
                .expect("every subscriber finishes in time")
                .expect("subscriber");
        }
        let mut got = bodies(&received);
        if Some(i) == killed {
            let (resumed, task) = resumed.take().expect("the killed process's client resumed");
            tokio::time::timeout(TIMEOUT, task)
                .await
                .expect("the resumed subscriber finishes in time")
                .expect("resumed subscriber");
            got.extend(bodies(&resumed));
        }
        assert_eq!(
            got.len(),
            expected.len(),
            "subscriber {i}: every change once ({fault:?})"
        );
        assert!(
            got == expected,
            "subscriber {i}: the log's order ({fault:?})"
        );
    }
    eprintln!(
        "{fault:?}: {} changes ({rounds} writer rounds) reached 3 subscribers exactly once, in order",
        expected.len()
    );
    match fault {
        Fault::StopNats => {
            for addr in &live {
                assert!(
                    metric(*addr, "syncgraph_bus_fallbacks_total")
                        .await
                        .unwrap()
                        >= 1.0
                );
                assert!(
                    metric(*addr, "syncgraph_bus_log_reads_total")
                        .await
                        .unwrap()
                        >= 1.0
                );
            }
        }
        Fault::PurgedWhileAway => {
            // The process that was away saw from a message's `after` that the stream lacked
            // what came before it, and read that from the log.
            let fills = metric(nodes[2].addr, "syncgraph_bus_gap_fills_total").await;
            assert!(
                fills.is_some_and(|fills| fills >= 1.0),
                "gap fills: {fills:?}"
            );
        }
        Fault::WipeNats => {
            // The stream was wiped and seeded anew: it holds fewer changes than were appended.
            let mut appended = 0.0;
            for addr in &live {
                appended += metric(*addr, "syncgraph_bus_appended_total").await.unwrap();
            }
            let client = async_nats::connect(nats.as_str())
                .await
                .expect("connect to NATS");
            let info = async_nats::jetstream::new(client)
                .get_stream(&stream)
                .await
                .expect("the stream exists again")
                .get_info()
                .await
                .expect("stream info");
            assert!(
                (info.state.messages as f64) < appended && info.state.messages > 0,
                "wiped and seeded anew: {} messages, {appended} appended",
                info.state.messages
            );
        }
        _ => {}
    }

    for mut node in nodes {
        let _ = node.child.kill().await;
    }
    if own_nats.is_none() {
        delete_stream(&nats, &stream).await;
    }
    if let Some(mut nats) = own_nats.take() {
        nats.stop().await;
    }
    if let Some(fresh) = fresh {
        fresh.drop_database().await;
    }
    drop(own_pg);
}

/// For each `name => fault`, a test of three processes through that fault (ignored, and
/// counted so, without PostgreSQL and NATS).
macro_rules! through_faults {
    ($($name:ident => $fault:expr),* $(,)?) => {
        $(
            bus_test! {
                async fn $name() {
                    three_processes_through($fault).await;
                }
            }
        )*
    };
}

through_faults! {
    the_relay_killed_mid_stream_loses_and_repeats_nothing => Fault::KillRelay,
    nats_stopped_for_seconds_delivery_goes_on_through_postgres => Fault::StopNats,
    nats_restarted_with_its_store_wiped_loses_nothing => Fault::WipeNats,
    postgres_restarted_while_the_bus_is_up_loses_nothing => Fault::RestartPostgres,
    a_process_back_after_the_stream_was_purged_reads_the_gap_from_the_log => Fault::PurgedWhileAway,
}

bus_test! {
    /// A transaction that wrote to a live table and stays open holds the feed back on every
    /// process (its position is a gap not yet decided: ARCHITECTURE.md, "The tailer"); that is
    /// the log's order, not a failing bus, so no process falls back to reading the log, and once
    /// it commits everything arrives in position order.
    async fn a_long_transaction_holds_the_feed_back_without_a_fallback() {
        let (database_url, fresh) = fresh_database(Backend::Postgres).await;
        let nats = shared_nats();
        let stream = unique_stream("long_transaction");
        let nodes = [
            start_node(&database_url, &nats, &stream).await,
            start_node(&database_url, &nats, &stream).await,
        ];
        let sql = Database::connect(&database_url)
            .await
            .expect("SQL connection");
        let (token, author, channel) = ada_and_channel(nodes[0].addr).await;
        let from = max_position(&sql).await;
        let subscribers: Vec<_> = nodes
            .iter()
            .map(|node| subscriber(node.addr, token.clone(), channel.clone(), cursor_at(from)))
            .collect();
        let insert = |body: &str| {
            format!(
                "INSERT INTO messages (channel_id, author_id, body) VALUES ({channel}, {author}, '{body}')"
            )
        };
        sql.execute_unprepared(&insert("before")).await.unwrap();
        for (received, _) in &subscribers {
            until("the first change arrives", || async {
                bodies(received) == ["before"]
            })
            .await;
        }
        let held = sql.begin().await.unwrap();
        held.execute_unprepared(&insert("held")).await.unwrap();
        for n in 0..10 {
            sql.execute_unprepared(&insert(&format!("behind-{n}")))
                .await
                .unwrap();
        }
        // Longer than a follower waits for the stream before it reads the log itself.
        tokio::time::sleep(Duration::from_secs(4)).await;
        for (received, _) in &subscribers {
            assert_eq!(
                bodies(received),
                ["before"],
                "nothing passes the open transaction"
            );
        }
        // Held back, but following the stream: the relay is heard, and nothing it appended is
        // missing here.
        for node in &nodes {
            let report = bus_report(node.addr).await;
            assert_eq!(report["state"], "stream", "{report}");
            assert_eq!(report["behind_positions"], 0, "{report}");
            assert!(
                report["relay_heard_ms_ago"]
                    .as_u64()
                    .is_some_and(|ms| ms < 3_000),
                "{report}"
            );
        }
        held.commit().await.unwrap();
        sql.execute_unprepared(&insert(END)).await.unwrap();
        let expected = logged(&sql, &channel, from).await;
        assert_eq!(expected[1], "held");
        for (received, task) in subscribers {
            tokio::time::timeout(TIMEOUT, task)
                .await
                .expect("in time")
                .expect("subscriber");
            assert_eq!(bodies(&received), expected);
        }
        for node in &nodes {
            assert_eq!(
                metric(node.addr, "syncgraph_bus_fallbacks_total").await,
                Some(0.0)
            );
            assert_eq!(bus_report(node.addr).await["state"], "stream");
        }
        for mut node in nodes {
            let _ = node.child.kill().await;
        }
        delete_stream(&nats, &stream).await;
        fresh.drop_database().await;
    }
}

bus_test! {
    /// Two databases given the same stream by mistake: the second refuses it (it carries the
    /// first one's changes) and reads its own log, so neither database's rows reach the other's
    /// subscribers.
    async fn a_stream_of_another_database_is_refused() {
        let nats = shared_nats();
        let stream = unique_stream("shared");
        let (url_a, fresh_a) = fresh_database(Backend::Postgres).await;
        let (url_b, fresh_b) = fresh_database(Backend::Postgres).await;
        let a = start_node(&url_a, &nats, &stream).await;
        until("the first database's relay runs", || async {
            metric(a.addr, "syncgraph_bus_relay").await == Some(1.0)
        })
        .await;
        let b = start_node(&url_b, &nats, &stream).await;
        let (token_a, author_a, channel_a) = ada_and_channel(a.addr).await;
        let (token_b, author_b, channel_b) = ada_and_channel(b.addr).await;
        let sql_a = Database::connect(&url_a).await.unwrap();
        let sql_b = Database::connect(&url_b).await.unwrap();
        let (from_a, from_b) = (max_position(&sql_a).await, max_position(&sql_b).await);
        let (got_a, task_a) = subscriber(a.addr, token_a, channel_a.clone(), cursor_at(from_a));
        let (got_b, task_b) = subscriber(b.addr, token_b, channel_b.clone(), cursor_at(from_b));
        for (sql, channel, author, body) in [
            (&sql_a, &channel_a, &author_a, "in a"),
            (&sql_b, &channel_b, &author_b, "in b"),
            (&sql_a, &channel_a, &author_a, END),
            (&sql_b, &channel_b, &author_b, END),
        ] {
            sql.execute_unprepared(&format!(
                "INSERT INTO messages (channel_id, author_id, body) VALUES ({channel}, {author}, '{body}')"
            ))
            .await
            .unwrap();
        }
        for task in [task_a, task_b] {
            tokio::time::timeout(TIMEOUT, task)
                .await
                .expect("in time")
                .expect("subscriber");
        }
        assert_eq!(bodies(&got_a), ["in a", END]);
        assert_eq!(bodies(&got_b), ["in b", END]);
        assert_eq!(bus_report(a.addr).await["state"], "stream");
        assert_eq!(bus_report(b.addr).await["state"], "postgres");
        // The stream holds the first database's changes only.
        let client = async_nats::connect(nats.as_str()).await.unwrap();
        let info = async_nats::jetstream::new(client)
            .get_stream(&stream)
            .await
            .unwrap()
            .get_info()
            .await
            .unwrap();
        let appended = metric(a.addr, "syncgraph_bus_appended_total")
            .await
            .unwrap();
        assert_eq!(info.state.messages as f64, appended);
        assert_eq!(
            metric(b.addr, "syncgraph_bus_appended_total").await,
            Some(0.0)
        );
        for mut node in [a, b] {
            let _ = node.child.kill().await;
        }
        delete_stream(&nats, &stream).await;
        fresh_a.drop_database().await;
        fresh_b.drop_database().await;
    }
}

bus_test! {
    /// A database restored from a backup (its log's sequence below what the stream holds) does
    /// not take the stream's changes, which belong to its old timeline: it refuses the stream
    /// and serves its own log.
    async fn a_restored_database_refuses_the_stream_of_its_old_timeline() {
        let nats = shared_nats();
        let stream = unique_stream("restored");
        let (database_url, fresh) = fresh_database(Backend::Postgres).await;
        let mut before = start_node(&database_url, &nats, &stream).await;
        let (token, author, channel) = ada_and_channel(before.addr).await;
        let sql = Database::connect(&database_url).await.unwrap();
        let insert = |body: &str| {
            format!(
                "INSERT INTO messages (channel_id, author_id, body) VALUES ({channel}, {author}, '{body}')"
            )
        };
        for n in 0..5 {
            sql.execute_unprepared(&insert(&format!("old-{n}")))
                .await
                .unwrap();
        }
        let head = max_position(&sql).await;
        until("the stream has the old timeline", || async {
            metric(before.addr, "syncgraph_bus_appended_total")
                .await
                .is_some_and(|appended| appended >= 5.0)
        })
        .await;
        let _ = before.child.kill().await;
        // The restore: the log is back to an earlier point.
        sql.execute_unprepared(&format!(
            "DELETE FROM messages WHERE body LIKE 'old-%'; DELETE FROM change_log WHERE position > {}; \
             ALTER TABLE change_log ALTER COLUMN position RESTART WITH {}",
            head - 5,
            head - 4
        ))
        .await
        .unwrap();
        let after = start_node(&database_url, &nats, &stream).await;
        let (got, task) = subscriber(after.addr, token, channel.clone(), cursor_at(head - 5));
        sql.execute_unprepared(&insert("new")).await.unwrap();
        sql.execute_unprepared(&insert(END)).await.unwrap();
        tokio::time::timeout(TIMEOUT, task)
            .await
            .expect("in time")
            .expect("subscriber");
        assert_eq!(
            bodies(&got),
            ["new", END],
            "the new timeline, not the stream's old one"
        );
        assert_eq!(bus_report(after.addr).await["state"], "postgres");
        assert_eq!(
            metric(after.addr, "syncgraph_bus_appended_total").await,
            Some(0.0)
        );
        let mut after = after;
        let _ = after.child.kill().await;
        delete_stream(&nats, &stream).await;
        fresh.drop_database().await;
    }
}

bus_test! {
    /// A NATS server that wants a user and password: they go in the URL.
    async fn credentials_in_the_bus_url_are_used() {
        let mut nats = OwnNats::start_new_with(&["--user", "alice", "--pass", "p@ss word"]).await;
        let (database_url, fresh) = fresh_database(Backend::Postgres).await;
        let url = format!("nats://alice:p%40ss%20word@127.0.0.1:{}", nats.port);
        let node = start_node(&database_url, &url, "CREDENTIALS").await;
        until("the process relays and follows the stream", || async {
            metric(node.addr, "syncgraph_bus_relay").await == Some(1.0)
                && bus_report(node.addr).await["state"] == "stream"
        })
        .await;
        let (token, author, channel) = ada_and_channel(node.addr).await;
        let (got, task) = subscriber(node.addr, token, channel.clone(), cursor_at(0));
        let sql = Database::connect(&database_url).await.unwrap();
        sql.execute_unprepared(&format!(
            "INSERT INTO messages (channel_id, author_id, body) VALUES ({channel}, {author}, '{END}')"
        ))
        .await
        .unwrap();
        tokio::time::timeout(TIMEOUT, task)
            .await
            .expect("in time")
            .expect("subscriber");
        assert_eq!(bodies(&got), [END]);
        assert!(
            metric(node.addr, "syncgraph_bus_received_total")
                .await
                .unwrap()
                >= 1.0
        );
        let mut node = node;
        let _ = node.child.kill().await;
        nats.stop().await;
        fresh.drop_database().await;
    }
}

/// Sends `signal` (`STOP`, `CONT`) to process `pid`.
async fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .await
        .expect("kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// `--bus` with SQLite: the process refuses to start and says why.
#[tokio::test]
async fn a_bus_with_sqlite_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("bus.db").display());
    let output = tokio::time::timeout(
        TIMEOUT,
        Command::new(env!("CARGO_BIN_EXE_syncgraph"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                &url,
                "--bus",
                "nats://127.0.0.1:4222",
            ])
            .env("NO_COLOR", "1")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the process exits in time")
    .expect("run the binary");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--bus needs PostgreSQL"), "{stderr}");
}
