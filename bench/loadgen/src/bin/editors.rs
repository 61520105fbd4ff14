//! Co-editing load: `--editors` y-websocket peers (yrs) on one document, each typing
//! `--rate` updates a second at random places for `--duration` seconds. Measures, for every
//! update and every other peer, the time from sending it to that peer having it (the peer's
//! state vector covering it), and the server's CPU; then checks that every peer ends with the
//! same text. Prints a summary and a `JSON {...}` line (bench/run.sh keeps it).
//!
//!   editors --url http://127.0.0.1:8000 --pid <server pid> --editors 100 --rate 5 --duration 10

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use yrs::sync::{Message, MessageReader, SyncMessage};
use yrs::updates::decoder::{Decode, DecoderV1};
use yrs::updates::encoder::Encode;
use yrs::{Doc, GetString, ReadTxn, StateVector, Text, Transact, Update};

#[derive(Parser)]
struct Args {
    /// The server's base URL (http://HOST:PORT).
    #[arg(long)]
    url: String,
    /// The server's pid, for its CPU time.
    #[arg(long)]
    pid: Option<u32>,
    #[arg(long, default_value_t = 100)]
    editors: usize,
    /// Updates a second per editor.
    #[arg(long, default_value_t = 5.0)]
    rate: f64,
    #[arg(long, default_value_t = 10)]
    duration: u64,
    #[arg(long, default_value = "editors")]
    label: String,
}

/// When each update was sent: (client, its clock once applied) -> instant.
type Sent = Arc<Mutex<HashMap<(u64, u32), Instant>>>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let http = reqwest::Client::new();
    let graphql = format!("{}/graphql", args.url);
    let (token, document) = setup(&http, &graphql).await?;
    let ws = args.url.replacen("http", "ws", 1);
    let url = format!("{ws}/yjs/{document}?access_token={token}");
    let sent: Sent = Arc::default();
    let latencies = Arc::new(Mutex::new(hdrhistogram::Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let start_typing = Arc::new(tokio::sync::Barrier::new(args.editors + 1));
    let stop_typing = Instant::now() + Duration::from_secs(args.duration) + Duration::from_secs(30);
    let mut peers = Vec::new();
    for n in 0..args.editors {
        let (url, sent, latencies, barrier) = (
            url.clone(),
            sent.clone(),
            latencies.clone(),
            start_typing.clone(),
        );
        let (rate, duration) = (args.rate, Duration::from_secs(args.duration));
        peers.push(tokio::spawn(async move {
            editor(
                n,
                &url,
                rate,
                duration,
                sent,
                latencies,
                barrier,
                stop_typing,
            )
            .await
        }));
    }
    start_typing.wait().await;
    let cpu_before = args.pid.and_then(cpu_secs);
    let began = Instant::now();
    let mut texts = Vec::new();
    let mut updates = 0usize;
    for peer in peers {
        let (text, typed) = peer.await??;
        texts.push(text);
        updates += typed;
    }
    let elapsed = began.elapsed().as_secs_f64();
    let cpu = match (cpu_before, args.pid.and_then(cpu_secs)) {
        (Some(before), Some(after)) => Some(after - before),
        _ => None,
    };
    let converged = texts.windows(2).all(|pair| pair[0] == pair[1]);
    let latencies = latencies.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let expected = updates * (args.editors - 1);
    let ms = |q: f64| latencies.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{} editors x {}/s for {} s: {updates} updates, {} deliveries (expected {expected}), p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, server CPU {}, converged: {converged} ({} chars)",
        args.editors,
        args.rate,
        args.duration,
        latencies.len(),
        ms(0.5),
        ms(0.99),
        latencies.max() as f64 / 1000.0,
        cpu.map_or("n/a".into(), |cpu| format!(
            "{:.0}% of a core",
            100.0 * cpu / elapsed
        )),
        texts.first().map_or(0, |text| text.chars().count()),
    );
    println!(
        "JSON {}",
        json!({
            "label": args.label,
            "editors": args.editors,
            "rate_per_editor": args.rate,
            "duration_s": args.duration,
            "updates": updates,
            "deliveries": latencies.len(),
            "expected_deliveries": expected,
            "p50_ms": ms(0.5),
            "p99_ms": ms(0.99),
            "max_ms": latencies.max() as f64 / 1000.0,
            "server_cpu_pct": cpu.map(|cpu| 100.0 * cpu / elapsed),
            "converged": converged,
        })
    );
    anyhow::ensure!(converged, "the peers' texts differ");
    anyhow::ensure!(
        latencies.len() as usize == expected,
        "some deliveries are missing"
    );
    Ok(())
}

/// One editor: joins, waits for the others, types for `duration`, then waits until it has
/// every other editor's updates (their count is known once all are done: it waits until its
/// text stops changing for 2 s, within 30 s) and returns its text and how many it sent.
#[allow(clippy::too_many_arguments)]
async fn editor(
    n: usize,
    url: &str,
    rate: f64,
    duration: Duration,
    sent: Sent,
    latencies: Arc<Mutex<hdrhistogram::Histogram<u64>>>,
    barrier: Arc<tokio::sync::Barrier>,
    deadline: Instant,
) -> anyhow::Result<(String, usize)> {
    // TCP_NODELAY, as a browser's WebSocket has it.
    let (socket, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
        .await
        .with_context(|| format!("editor {n} connects"))?;
    let (mut sink, mut stream) = socket.split();
    let doc = Doc::new();
    let text = doc.get_or_insert_text("body");
    let step1 = Message::Sync(SyncMessage::SyncStep1(doc.transact().state_vector()));
    sink.send(WsMessage::Binary(step1.encode_v1().into()))
        .await?;
    // Synced once the server's answer arrives.
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .context("sync in time")?
            .context("socket open")??;
        if let WsMessage::Binary(bytes) = frame
            && receive(&doc, &bytes, &mut sink, None, &latencies).await?
        {
            break;
        }
    }
    barrier.wait().await;
    let me = doc.client_id().get();
    let every = Duration::from_secs_f64(1.0 / rate);
    // Editors start spread over one period, as people do.
    let mut next = tokio::time::Instant::now() + every.mul_f64(n as f64 / 100.0 % 1.0);
    let stop = tokio::time::Instant::now() + duration;
    let mut typed = 0usize;
    let mut quiet_since = tokio::time::Instant::now();
    loop {
        let typing = next < stop;
        let wake = if typing {
            next
        } else {
            quiet_since + Duration::from_secs(2)
        };
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {
                if !typing {
                    break;
                }
                let update = {
                    let mut t = doc.transact_mut();
                    let len = text.len(&t);
                    let at = if len == 0 { 0 } else { fastrand::u32(0..=len) };
                    text.insert(&mut t, at, "x");
                    t.encode_update_v1()
                };
                let clock = doc.transact().state_vector().get(&doc.client_id());
                sent.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.insert((me, clock), Instant::now());
                let message = Message::Sync(SyncMessage::Update(update));
                sink.send(WsMessage::Binary(message.encode_v1().into())).await?;
                typed += 1;
                next += every;
            }
            frame = stream.next() => {
                let frame = frame.context("the server closed")??;
                if let WsMessage::Binary(bytes) = frame {
                    receive(&doc, &bytes, &mut sink, Some(&sent), &latencies).await?;
                    quiet_since = tokio::time::Instant::now();
                }
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "editor {n} did not settle");
    }
    let _ = sink.close().await;
    let text = text.get_string(&doc.transact());
    Ok((text, typed))
}

/// Applies what the server sent; records the latency of every other editor's update it
/// brings (from its state vector's advance); answers a state vector. True for a sync step 2.
async fn receive<S>(
    doc: &Doc,
    bytes: &[u8],
    sink: &mut S,
    sent: Option<&Sent>,
    latencies: &Mutex<hdrhistogram::Histogram<u64>>,
) -> anyhow::Result<bool>
where
    S: futures_util::Sink<WsMessage> + Unpin,
    S::Error: std::error::Error + Send + Sync + 'static,
{
    let mut synced = false;
    let mut decoder = DecoderV1::from(bytes);
    for message in MessageReader::new(&mut decoder) {
        match message? {
            Message::Sync(SyncMessage::SyncStep1(vector)) => {
                let answer = doc.transact().encode_diff_v1(&vector);
                let message = Message::Sync(SyncMessage::SyncStep2(answer));
                sink.send(WsMessage::Binary(message.encode_v1().into()))
                    .await?;
            }
            Message::Sync(SyncMessage::SyncStep2(update) | SyncMessage::Update(update)) => {
                synced |= true;
                let before = doc.transact().state_vector();
                doc.transact_mut()
                    .apply_update(Update::decode_v1(&update)?)?;
                let after = doc.transact().state_vector();
                if let Some(sent) = sent {
                    record(doc, &before, &after, sent, latencies)?;
                }
            }
            _ => {}
        }
    }
    Ok(synced)
}

/// The latency of each update of another editor that `after` covers and `before` did not.
fn record(
    doc: &Doc,
    before: &StateVector,
    after: &StateVector,
    sent: &Sent,
    latencies: &Mutex<hdrhistogram::Histogram<u64>>,
) -> anyhow::Result<()> {
    let now = Instant::now();
    let me = doc.client_id();
    let sent = sent.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let mut latencies = latencies.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    for (client, &clock) in after.iter() {
        if *client == me {
            continue;
        }
        for c in before.get(client) + 1..=clock {
            if let Some(at) = sent.get(&(client.get(), c)) {
                latencies.record(now.duration_since(*at).as_micros().max(1) as u64)?;
            }
        }
    }
    Ok(())
}

/// Signs up a user, creates a channel and an empty document; returns the token and its id.
async fn setup(http: &reqwest::Client, url: &str) -> anyhow::Result<(String, String)> {
    let email = format!("editors-{}@example.com", fastrand::u64(..));
    let signed = call(
        http,
        url,
        None,
        "mutation($e: String!) { signUp(input: { name: \"editors\", email: $e, password: \"editors password\" }) { token } }",
        json!({ "e": email }),
    )
    .await?;
    let token = signed["signUp"]["token"]
        .as_str()
        .context("a token")?
        .to_owned();
    let channel = call(
        http,
        url,
        Some(&token),
        "mutation { createChannel(input: { name: \"editors\" }) { id } }",
        json!({}),
    )
    .await?;
    let channel = channel["createChannel"]["id"]
        .as_str()
        .context("a channel")?;
    let document = call(
        http,
        url,
        Some(&token),
        "mutation($c: ID!) { createDocument(input: { channelId: $c, title: \"shared\", body: \"\" }) { id } }",
        json!({ "c": channel }),
    )
    .await?;
    let id = document["createDocument"]["id"]
        .as_str()
        .context("a document")?
        .to_owned();
    Ok((token, id))
}

async fn call(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    query: &str,
    variables: Value,
) -> anyhow::Result<Value> {
    let mut request = http
        .post(url)
        .json(&json!({ "query": query, "variables": variables }));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response: Value = request.send().await?.json().await?;
    anyhow::ensure!(
        response.get("errors").is_none(),
        "GraphQL errors: {response}"
    );
    Ok(response["data"].clone())
}

/// CPU time (user + system) of `pid` in seconds.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}
