//! What the bus buys: `--processes` syncgraph processes on one fresh PostgreSQL database,
//! with `--bus` or without, a subscriber on each, and one SQL client inserting `--rate`
//! messages a second for `--duration` seconds. Counts the `change_log` rows (and scans) the
//! database served, from `pg_stat_user_tables` once every process has stopped (a backend
//! flushes its counts as it exits), per change written; and the time from each insert's
//! commit to each subscriber having it (p50, p99). Prints a summary and a `JSON {...}` line.
//!
//!   bus-load --server target/release/syncgraph --database-url postgres://.../syncgraph_bench \
//!       --processes 4 [--bus nats://127.0.0.1:4222] --rate 200 --duration 10

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use sea_orm::{ConnectionTrait, Database, DatabaseBackend, Statement};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[derive(Parser)]
struct Args {
    /// The syncgraph binary.
    #[arg(long)]
    server: PathBuf,
    /// A fresh PostgreSQL database.
    #[arg(long)]
    database_url: String,
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// NATS server for `--bus` (none: every process reads the log).
    #[arg(long)]
    bus: Option<String>,
    /// Inserts a second.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// The CPU the servers run on (the load generator runs where it was started).
    #[arg(long, default_value = "0")]
    server_cpus: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let stream = format!("BENCH_{}", std::process::id());
    let mut servers = Vec::new();
    for _ in 0..args.processes {
        servers.push(start(&args, &stream).await?);
    }
    let http = reqwest::Client::new();
    let first = format!("http://{}/graphql", servers[0].1);
    let (token, channel, author) = setup(&http, &first).await?;
    let sql = Database::connect(&args.database_url).await?;

    // A subscriber on every process; each records how long every insert took to reach it.
    let latencies = Arc::new(Mutex::new(hdrhistogram::Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let total = (args.rate * args.duration as f64).round() as u64;
    let mut subscribers = Vec::new();
    let (ready, mut readies) = tokio::sync::mpsc::channel(args.processes);
    for (_, addr) in &servers {
        subscribers.push(tokio::spawn(subscriber(
            *addr,
            token.clone(),
            channel.clone(),
            total,
            latencies.clone(),
            ready.clone(),
        )));
    }
    // Every subscriber has seen a warm-up insert (so it is subscribed) before timing starts.
    let mut warm = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while warm < args.processes {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "subscribers ready in time"
        );
        insert_body(&sql, &channel, &author, "warm-up").await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        while readies.try_recv().is_ok() {
            warm += 1;
        }
    }
    let warm_ups = warm_up_count(&sql, &channel).await?;

    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    for _ in 0..total {
        ticks.tick().await;
        insert(&sql, &channel, &author).await?;
    }
    for subscriber in subscribers {
        tokio::time::timeout(Duration::from_secs(60), subscriber)
            .await
            .context("every subscriber gets every insert")???;
    }
    for (mut child, _) in servers {
        if let Some(pid) = child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        tokio::time::timeout(Duration::from_secs(30), child.wait()).await??;
    }
    // The servers' backends flush their counts as they exit.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let row = sql
        .query_one_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            "SELECT COALESCE(seq_tup_read, 0) + COALESCE(idx_tup_fetch, 0) AS rows, \
             COALESCE(seq_scan, 0) + COALESCE(idx_scan, 0) AS scans \
             FROM pg_stat_user_tables WHERE relname = 'change_log'",
        ))
        .await?
        .context("change_log's counts")?;
    let rows: i64 = row.try_get("", "rows")?;
    let scans: i64 = row.try_get("", "scans")?;
    if let Some(url) = &args.bus {
        let client = async_nats::connect(url.as_str()).await?;
        let _ = async_nats::jetstream::new(client)
            .delete_stream(&stream)
            .await;
    }
    let latencies = latencies.lock().unwrap();
    let ms = |q: f64| latencies.value_at_quantile(q) as f64 / 1000.0;
    let changes = total + warm_ups;
    let mode = if args.bus.is_some() { "bus" } else { "log" };
    println!(
        "{} processes, {mode}: {changes} changes, {rows} change_log rows read ({:.2} per change, {:.2} per change and process), {scans} scans; commit to subscriber p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} deliveries",
        args.processes,
        rows as f64 / changes as f64,
        rows as f64 / changes as f64 / args.processes as f64,
        ms(0.5),
        ms(0.99),
        latencies.max() as f64 / 1000.0,
        latencies.len(),
    );
    println!(
        "JSON {}",
        json!({
            "label": format!("bus-load-{mode}-{}", args.processes),
            "processes": args.processes,
            "bus": args.bus.is_some(),
            "rate": args.rate,
            "changes": changes,
            "change_log_rows_read": rows,
            "rows_read_per_change": rows as f64 / changes as f64,
            "change_log_scans": scans,
            "latency": { "p50_ms": ms(0.5), "p99_ms": ms(0.99), "max_ms": latencies.max() as f64 / 1000.0 },
            "deliveries": latencies.len(),
        })
    );
    Ok(())
}

/// Starts one server (pinned to `--server-cpus`) and returns it with its address.
async fn start(args: &Args, stream: &str) -> anyhow::Result<(Child, std::net::SocketAddr)> {
    let mut command = Command::new("taskset");
    command
        .args(["-c", &args.server_cpus])
        .arg(&args.server)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &args.database_url,
        ])
        .args(["--jwt-secret", "bench-secret-bench-secret-bench-secret"])
        .args(["--auth-attempts-per-minute", "1000000"]);
    if let Some(bus) = &args.bus {
        command.args(["--bus", bus, "--bus-stream", stream]);
    }
    let mut child = command
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
    let addr = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.split("serving GraphQL on http://").nth(1) {
                return Ok(rest.split('/').next().context("address")?.parse()?);
            }
        }
        anyhow::bail!("the server exited before serving")
    })
    .await??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, addr))
}

async fn setup(http: &reqwest::Client, url: &str) -> anyhow::Result<(String, String, String)> {
    let response: Value = http
        .post(url)
        .json(&json!({
            "query": "mutation { signUp(input: { name: \"bus\", email: \"bus@example.com\", password: \"bus load password\" }) { token user { id } } }",
        }))
        .send()
        .await?
        .json()
        .await?;
    let token = response["data"]["signUp"]["token"]
        .as_str()
        .context("token")?
        .to_owned();
    let author = response["data"]["signUp"]["user"]["id"]
        .as_str()
        .context("user")?
        .to_owned();
    let response: Value = http
        .post(url)
        .bearer_auth(&token)
        .json(&json!({ "query": "mutation { createChannel(input: { name: \"bus\" }) { id } }" }))
        .send()
        .await?
        .json()
        .await?;
    let channel = response["data"]["createChannel"]["id"]
        .as_str()
        .context("channel")?
        .to_owned();
    Ok((token, channel, author))
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

/// Inserts a message whose body is the time of its commit's start, in µs.
async fn insert(sql: &impl ConnectionTrait, channel: &str, author: &str) -> anyhow::Result<()> {
    insert_body(sql, channel, author, &now_us().to_string()).await
}

async fn insert_body(
    sql: &impl ConnectionTrait,
    channel: &str,
    author: &str,
    body: &str,
) -> anyhow::Result<()> {
    sql.execute_unprepared(&format!(
        "INSERT INTO messages (channel_id, author_id, body) VALUES ({channel}, {author}, '{body}')"
    ))
    .await?;
    Ok(())
}

/// How many warm-up inserts there were (changes too).
async fn warm_up_count(sql: &impl ConnectionTrait, channel: &str) -> anyhow::Result<u64> {
    let row = sql
        .query_one_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            format!("SELECT count(*) AS n FROM messages WHERE channel_id = {channel} AND body = 'warm-up'"),
        ))
        .await?
        .context("a count")?;
    Ok(row.try_get::<i64>("", "n")? as u64)
}

/// Subscribes at `addr`, says when it has seen a warm-up insert, and records each timed
/// insert's latency until it has had `count`.
async fn subscriber(
    addr: std::net::SocketAddr,
    token: String,
    channel: String,
    count: u64,
    latencies: Arc<Mutex<hdrhistogram::Histogram<u64>>>,
    ready: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<()> {
    let mut request = format!("ws://{addr}/graphql").into_client_request()?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse()?);
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
    let send = |value: Value| Message::Text(value.to_string().into());
    socket
        .send(send(json!({ "type": "connection_init", "payload": { "authorization": format!("Bearer {token}") } })))
        .await?;
    socket
        .send(send(json!({ "type": "subscribe", "id": "1", "payload": {
            "query": "subscription($c: ID!) { messageEvents(channelId: $c) { cursor message { body } } }",
            "variables": { "c": channel },
        }})))
        .await?;
    let (mut seen, mut warmed) = (0, false);
    while seen < count {
        let Some(frame) = socket.next().await else {
            anyhow::bail!("the server closed the socket");
        };
        let Message::Text(text) = frame? else {
            continue;
        };
        let message: Value = serde_json::from_str(&text)?;
        match message["type"].as_str() {
            Some("ping") => socket.send(send(json!({ "type": "pong" }))).await?,
            Some("next") => {
                let body = message["payload"]["data"]["messageEvents"]["message"]["body"]
                    .as_str()
                    .context("a body")?;
                if body == "warm-up" {
                    if !warmed {
                        warmed = true;
                        ready.send(()).await.ok();
                    }
                    continue;
                }
                let sent: u64 = body.parse()?;
                seen += 1;
                latencies
                    .lock()
                    .unwrap()
                    .record(now_us().saturating_sub(sent).max(1))?;
            }
            Some("connection_ack") => {}
            _ => anyhow::bail!("unexpected message: {message}"),
        }
    }
    Ok(())
}
