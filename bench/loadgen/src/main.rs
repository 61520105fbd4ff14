//! `loadgen`: drives any graphql-transport-ws server the way a busy app would, and reports
//! what arrived and how fast.
//!
//! C connections hold S subscriptions spread over K topics (subscription i on connection
//! i mod C and topic i mod K). Publishers send a mutation over HTTP, each owning a share of
//! the topics with one request in flight, so a topic's changes commit in the order they were
//! numbered. Every published body carries `~lg~<topic>~<seq>~<send time ns>~`; each
//! subscription checks it gets every number of its topic once and in order, and the time from
//! send to arrival goes into an HDR histogram. Before publishing, a probe (seq 0) per topic
//! proves every subscription is live. Loopback only; it stops by itself.
//!
//! Output: human-readable lines, then one JSON line (prefix `JSON `).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const DEFAULT_SUBSCRIPTION: &str =
    "subscription($c: ID!) { messageEvents(channelId: $c) { cursor message { body } } }";
const DEFAULT_MUTATION: &str =
    "mutation($c: ID!, $b: String!) { postMessage(input: { channelId: $c, body: $b }) { id } }";

#[derive(Parser, Clone, Debug)]
#[command(about = "Load generator for graphql-transport-ws servers (loopback only)")]
struct Args {
    /// The GraphQL endpoint; its WebSocket is the same path with ws://.
    #[arg(long, default_value = "http://127.0.0.1:8000/graphql")]
    url: String,
    /// WebSocket connections.
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Subscriptions in all, spread round-robin over connections and topics.
    #[arg(long, default_value_t = 10_000)]
    subscriptions: usize,
    /// Topic ids, comma-separated (substituted for `{topic}` in the templates).
    #[arg(long, value_delimiter = ',')]
    topics: Vec<String>,
    /// On a syncgraph server: sign up a user and create this many channels as the topics
    /// (the token is then the user's).
    #[arg(long)]
    setup_channels: Option<usize>,
    /// Bearer token for HTTP and for connection_init (`{"Authorization": "Bearer …"}`).
    #[arg(long)]
    token: Option<String>,
    /// connection_init payload (JSON); overrides the one made from --token.
    #[arg(long)]
    init_payload: Option<String>,
    /// Subscription document. `{shape}` is replaced by the subscription's number modulo
    /// `--shapes`, so that (in an alias, say) subscriptions differ in shape.
    #[arg(long, default_value = DEFAULT_SUBSCRIPTION)]
    subscription: String,
    /// How many distinct values `{shape}` takes.
    #[arg(long, default_value_t = 1)]
    shapes: usize,
    /// Subscription variables template: `{topic}` is replaced.
    #[arg(long, default_value = r#"{"c":"{topic}"}"#)]
    sub_vars: String,
    /// Mutation document.
    #[arg(long, default_value = DEFAULT_MUTATION)]
    mutation: String,
    /// Mutation variables template: `{topic}` and `{body}` are replaced.
    #[arg(long, default_value = r#"{"c":"{topic}","b":"{body}"}"#)]
    mut_vars: String,
    /// Changes per second over all publishers; 0 publishes back to back.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Publishers: each owns topics p, p+P, …, with one request in flight.
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds to wait, after the last publish, for outstanding deliveries.
    #[arg(long, default_value_t = 15.0)]
    drain: f64,
    /// The server's pid, for its RSS and CPU time.
    #[arg(long)]
    pid: Option<u32>,
    /// Connect and subscribe, report memory, publish nothing.
    #[arg(long)]
    idle: bool,
    /// Connections opened at once while connecting.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// A name for this run in the report.
    #[arg(long, default_value = "run")]
    label: String,
    /// How subscriptions travel: `ws` (graphql-transport-ws), or `sse` (graphql-sse's single
    /// connection mode: per connection one reserved event stream, its subscriptions posted
    /// to it).
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    transport: Transport,
    /// Ask for gzip-encoded event streams (`--transport sse`).
    #[arg(long)]
    gzip: bool,
    /// The subscriptions are `@live` queries (of the topic's newest message, say): a payload
    /// reflects its topic's newest change, and changes that land while the query re-runs
    /// fold into one payload. So a number never seen is `folded`, not lost; what must arrive
    /// is each topic's last number (`lost` counts subscriptions that end without it), with
    /// no duplicate and nothing out of order. The drain ends after 1 s without a delivery.
    #[arg(long)]
    live: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Transport {
    Ws,
    Sse,
}

/// What one subscription saw.
struct SubState {
    topic: usize,
    probed: bool,
    seen: Vec<u64>,
    unique: u64,
    max_seq: u64,
    duplicates: u64,
    out_of_order: u64,
}

impl SubState {
    fn new(topic: usize) -> Self {
        SubState {
            topic,
            probed: false,
            seen: Vec::new(),
            unique: 0,
            max_seq: 0,
            duplicates: 0,
            out_of_order: 0,
        }
    }

    /// Records `seq`; true when it is the first time.
    fn record(&mut self, seq: u64) -> bool {
        if !set_bit(&mut self.seen, seq) {
            self.duplicates += 1;
            return false;
        }
        self.unique += 1;
        if seq < self.max_seq {
            self.out_of_order += 1;
        }
        self.max_seq = self.max_seq.max(seq);
        true
    }
}

/// Sets bit `n`; false when it was set already.
fn set_bit(bits: &mut Vec<u64>, n: u64) -> bool {
    let (word, bit) = ((n / 64) as usize, n % 64);
    if bits.len() <= word {
        bits.resize(word + 1, 0);
    }
    let was = bits[word] & (1 << bit) != 0;
    bits[word] |= 1 << bit;
    !was
}

/// The highest bit set, if any.
fn highest_bit(bits: &[u64]) -> Option<u64> {
    let (word, value) = bits.iter().enumerate().rev().find(|(_, w)| **w != 0)?;
    Some(word as u64 * 64 + 63 - u64::from(value.leading_zeros()))
}

/// Whether bit `n` is set.
fn has_bit(bits: &[u64], n: u64) -> bool {
    bits.get((n / 64) as usize)
        .is_some_and(|word| word & (1 << (n % 64)) != 0)
}

/// Bits set in `a` and not in `b`.
fn count_missing(a: &[u64], b: &[u64]) -> u64 {
    a.iter()
        .enumerate()
        .map(|(i, word)| (word & !b.get(i).copied().unwrap_or(0)).count_ones() as u64)
        .sum()
}

/// Counters every reader shares with the controller.
#[derive(Default)]
struct Shared {
    probes_seen: AtomicUsize,
    delivered: AtomicU64,
    /// First arrivals only (duplicates excluded).
    unique: AtomicU64,
    /// Events whose marker names another topic than the subscription's.
    misrouted: AtomicU64,
    /// When the latest delivery arrived, in ns since the run's start.
    last_delivery_ns: AtomicU64,
    errors: AtomicU64,
    /// Bytes the subscriptions' connections received (as on the wire: compressed when
    /// gzip; a WebSocket frame's header counted) once the run is live.
    wire_bytes: AtomicU64,
    /// Count `wire_bytes` only from the first publish on (not the probes).
    counting: std::sync::atomic::AtomicBool,
    /// `--live`: a payload's newest marker is its last one (patches apply in order).
    live: bool,
}

impl Shared {
    fn received(&self, bytes: usize) {
        if self.counting.load(Ordering::Relaxed) {
            self.wire_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }
}

/// What a reader hands back when it stops.
struct ReaderResult {
    latency: Histogram<u64>,
    subs: Vec<SubState>,
    closed_early: bool,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds are valid")
}

/// `"key":"value"` → value, without parsing the whole frame.
fn string_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!("\"{key}\":\"");
    let start = text.find(&pattern)? + pattern.len();
    let len = text[start..].find('"')?;
    Some(&text[start..start + len])
}

/// The `(topic, seq, sent ns)` marker of a published body.
fn marker(text: &str) -> Option<(usize, u64, u64)> {
    marker_at(text, text.find("~lg~")?)
}

/// The last marker of `text` (a live query's joined patches hold the newest last).
fn last_marker(text: &str) -> Option<(usize, u64, u64)> {
    marker_at(text, text.rfind("~lg~")?)
}

fn marker_at(text: &str, at: usize) -> Option<(usize, u64, u64)> {
    let start = at + 4;
    let mut parts = text[start..].splitn(4, '~');
    let topic = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    let sent = parts.next()?.parse().ok()?;
    Some((topic, seq, sent))
}

/// Reads one connection until `stop`: answers pings, records every event.
async fn reader(
    mut ws: Ws,
    mut subs: Vec<SubState>,
    connections: usize,
    shared: Arc<Shared>,
    started: Instant,
    mut stop: watch::Receiver<bool>,
) -> ReaderResult {
    let mut latency = histogram();
    let mut closed_early = false;
    loop {
        let frame = tokio::select! {
            frame = ws.next() => frame,
            _ = stop.changed() => break,
        };
        let text = match frame {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                closed_early = !*stop.borrow();
                break;
            }
            Some(Ok(_)) => continue,
        };
        let text = text.as_str();
        // A server frame's header: 2 bytes, 4 from 126 bytes of payload, 10 from 64 KiB.
        let header = match text.len() {
            0..126 => 2,
            126..65_536 => 4,
            _ => 10,
        };
        shared.received(text.len() + header);
        match string_field(text, "type") {
            Some("next") => {
                on_next(text, &mut subs, connections, &shared, started, &mut latency);
            }
            Some("ping") => {
                let _ = ws.send(Message::text(r#"{"type":"pong"}"#)).await;
            }
            Some("error") | Some("complete")
                if shared.errors.fetch_add(1, Ordering::Relaxed) < 3 =>
            {
                eprintln!("loadgen: subscription ended by the server: {text}");
            }
            _ => {}
        }
    }
    let _ = ws.close(None).await;
    ReaderResult {
        latency,
        subs,
        closed_early,
    }
}

/// Records one `next` (a frame, or an event's data): its subscription by its id
/// (`s<index>`), its marker's topic, number and send time.
fn on_next(
    text: &str,
    subs: &mut [SubState],
    connections: usize,
    shared: &Shared,
    started: Instant,
    latency: &mut Histogram<u64>,
) {
    let Some(index) = string_field(text, "id")
        .and_then(|id| id.strip_prefix('s'))
        .and_then(|n| n.parse::<usize>().ok())
    else {
        return;
    };
    let found = if shared.live {
        last_marker(text)
    } else {
        marker(text)
    };
    let Some((topic, seq, sent)) = found else {
        return;
    };
    let Some(sub) = subs.get_mut(index / connections) else {
        return;
    };
    if topic != sub.topic {
        shared.misrouted.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if seq == 0 {
        if !sub.probed {
            sub.probed = true;
            shared.probes_seen.fetch_add(1, Ordering::Relaxed);
        }
        return;
    }
    let arrived = now_ns();
    let _ = latency.record((arrived.saturating_sub(sent) / 1_000).max(1));
    if sub.record(seq) {
        shared.unique.fetch_add(1, Ordering::Relaxed);
    }
    shared.delivered.fetch_add(1, Ordering::Relaxed);
    shared
        .last_delivery_ns
        .fetch_max(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

/// Reads one reserved event stream (graphql-sse, single connection mode) until `stop`:
/// records every event, as `reader` does for a WebSocket.
async fn sse_reader(
    mut response: reqwest::Response,
    subs: Vec<SubState>,
    connections: usize,
    shared: Arc<Shared>,
    started: Instant,
    mut stop: watch::Receiver<bool>,
) -> ReaderResult {
    let mut subs = subs;
    let mut latency = histogram();
    let mut closed_early = false;
    let mut gzip = response
        .headers()
        .get("content-encoding")
        .is_some_and(|value| value == "gzip")
        .then(|| flate2::write::GzDecoder::new(Vec::new()));
    let mut text: Vec<u8> = Vec::new();
    loop {
        let chunk = tokio::select! {
            chunk = response.chunk() => chunk,
            _ = stop.changed() => break,
        };
        let chunk = match chunk {
            Ok(Some(chunk)) => chunk,
            Ok(None) | Err(_) => {
                closed_early = !*stop.borrow();
                break;
            }
        };
        // As on the wire: a chunk of a chunked body is framed by its size in hex and two
        // CRLFs (reqwest hands the body over chunk by chunk, at most one chunk at a time).
        shared.received(chunk.len() + format!("{:x}", chunk.len()).len() + 4);
        match &mut gzip {
            Some(decoder) => {
                use std::io::Write as _;
                if decoder
                    .write_all(&chunk)
                    .and_then(|()| decoder.flush())
                    .is_err()
                {
                    closed_early = true;
                    break;
                }
                text.append(decoder.get_mut());
            }
            None => text.extend_from_slice(&chunk),
        }
        // Every whole event in the buffer.
        let mut start = 0;
        while let Some(end) = text[start..].windows(2).position(|w| w == b"\n\n") {
            let event = &text[start..start + end];
            start += end + 2;
            let Ok(event) = std::str::from_utf8(event) else {
                continue;
            };
            let mut name = "";
            let mut data = "";
            for line in event.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    name = value;
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data = value;
                }
            }
            match name {
                "next" => on_next(data, &mut subs, connections, &shared, started, &mut latency),
                "complete" if shared.errors.fetch_add(1, Ordering::Relaxed) < 3 => {
                    eprintln!("loadgen: subscription ended by the server: {data}");
                }
                _ => {}
            }
        }
        text.drain(..start);
    }
    ReaderResult {
        latency,
        subs,
        closed_early,
    }
}

/// Reserves and opens an event stream (graphql-sse's single connection mode): its token
/// and the open response.
async fn open_stream(
    client: &reqwest::Client,
    stream_url: &str,
    bearer: Option<&str>,
    gzip: bool,
) -> anyhow::Result<(String, reqwest::Response)> {
    let authorize = |request: reqwest::RequestBuilder| match bearer {
        Some(token) => request.bearer_auth(token),
        None => request,
    };
    let reserved = authorize(client.put(stream_url)).send().await?;
    if reserved.status() != reqwest::StatusCode::CREATED {
        bail!("PUT {stream_url}: {}", reserved.status());
    }
    let token = reserved.text().await?;
    let mut request = authorize(client.get(stream_url))
        .header("accept", "text/event-stream")
        .header("x-graphql-event-stream-token", &token);
    if gzip {
        request = request.header("accept-encoding", "gzip");
    }
    let response = request.send().await?;
    if !response.status().is_success() {
        bail!("GET {stream_url}: {}", response.status());
    }
    Ok((token, response))
}

/// Opens a graphql-transport-ws connection and waits for its ack.
async fn connect(ws_url: &str, init: &Value) -> anyhow::Result<Ws> {
    let mut request = ws_url.into_client_request()?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "graphql-transport-ws"
            .parse()
            .expect("a valid header value"),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await?;
    ws.send(Message::text(
        json!({ "type": "connection_init", "payload": init }).to_string(),
    ))
    .await?;
    let acked = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(frame) = ws.next().await {
            if let Message::Text(text) = frame? {
                match string_field(text.as_str(), "type") {
                    Some("connection_ack") => return Ok(()),
                    Some("ping") => ws.send(Message::text(r#"{"type":"pong"}"#)).await?,
                    _ => bail!("unexpected before the ack: {}", text.as_str()),
                }
            }
        }
        bail!("closed before the ack")
    })
    .await;
    match acked {
        Ok(result) => result.map(|()| ws),
        Err(_) => bail!("no connection_ack within 30 s"),
    }
}

/// `template` with `{topic}` and `{body}` replaced (as JSON strings' contents).
fn variables(template: &str, topic: &str, body: &str) -> anyhow::Result<Value> {
    let text = template.replace("{topic}", topic).replace("{body}", body);
    serde_json::from_str(&text).with_context(|| format!("variables template is not JSON: {text}"))
}

/// Resident set of `pid` in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// CPU time (user + system) of `pid` in seconds.
fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

struct Publisher {
    client: reqwest::Client,
    url: String,
    token: Option<String>,
    mutation: String,
    template: String,
}

impl Publisher {
    /// Sends one change; true when the server took it.
    async fn publish(&self, topic_id: &str, body: &str) -> bool {
        let Ok(vars) = variables(&self.template, topic_id, body) else {
            return false;
        };
        let mut request = self
            .client
            .post(&self.url)
            .json(&json!({ "query": self.mutation, "variables": vars }));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => {
                match response.json::<Value>().await {
                    Ok(value) if value.get("errors").is_none() => true,
                    Ok(value) => {
                        eprintln!("loadgen: the mutation failed: {value}");
                        false
                    }
                    Err(_) => false,
                }
            }
            Ok(response) => {
                eprintln!("loadgen: the mutation got HTTP {}", response.status());
                false
            }
            Err(err) => {
                eprintln!("loadgen: the mutation could not be sent: {err}");
                false
            }
        }
    }
}

/// Signs up a user and creates `count` channels; returns the token and the channel ids.
async fn setup_channels(
    client: &reqwest::Client,
    url: &str,
    count: usize,
) -> anyhow::Result<(String, Vec<String>)> {
    let email = format!("loadgen-{}@example.com", now_ns());
    let signed: Value = client
        .post(url)
        .json(&json!({
            "query": "mutation($e: String!) { signUp(input: { name: \"loadgen\", email: $e, password: \"loadgen password\" }) { token } }",
            "variables": { "e": email }
        }))
        .send()
        .await?
        .json()
        .await?;
    let token = signed["data"]["signUp"]["token"]
        .as_str()
        .with_context(|| format!("signUp failed: {signed}"))?
        .to_owned();
    let mut topics = Vec::with_capacity(count);
    for i in 0..count {
        let created: Value = client
            .post(url)
            .bearer_auth(&token)
            .json(&json!({
                "query": "mutation($n: String!) { createChannel(input: { name: $n }) { id } }",
                "variables": { "n": format!("loadgen {i}") }
            }))
            .send()
            .await?
            .json()
            .await?;
        topics.push(
            created["data"]["createChannel"]["id"]
                .as_str()
                .with_context(|| format!("createChannel failed: {created}"))?
                .to_owned(),
        );
    }
    Ok((token, topics))
}

fn percentiles(h: &Histogram<u64>) -> Value {
    let ms = |us: u64| us as f64 / 1000.0;
    if h.is_empty() {
        return Value::Null;
    }
    json!({
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p90_ms": ms(h.value_at_quantile(0.90)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if !args.url.starts_with("http://127.0.0.1") && !args.url.starts_with("http://localhost") {
        bail!("loadgen drives loopback servers only (http://127.0.0.1:…)");
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(args.publishers.max(1) + 4)
        .build()?;
    if let Some(count) = args.setup_channels {
        let (token, topics) = setup_channels(&client, &args.url, count).await?;
        args.token = Some(token);
        args.topics = topics;
    }
    if args.topics.is_empty() {
        bail!("no topics: pass --topics or --setup-channels");
    }
    if args.subscriptions > 0 && args.connections == 0 {
        bail!("subscriptions need at least one connection");
    }
    let topics = args.topics.clone();
    let init: Value = match (&args.init_payload, &args.token) {
        (Some(payload), _) => {
            serde_json::from_str(payload).context("--init-payload is not JSON")?
        }
        (None, Some(token)) => json!({ "Authorization": format!("Bearer {token}") }),
        (None, None) => json!({}),
    };
    let ws_url = args.url.replacen("http://", "ws://", 1);
    let pid = args.pid;
    let rss = || pid.and_then(rss_kib);
    let started = Instant::now();
    let shared = Arc::new(Shared {
        live: args.live,
        ..Shared::default()
    });
    let (stop_tx, stop_rx) = watch::channel(false);

    // Connect, then subscribe: subscription i on connection i mod C, topic i mod K.
    let rss_before = rss();
    let connect_started = Instant::now();
    let mut subs_per_topic = vec![0u64; topics.len()];
    let mut readers = Vec::with_capacity(args.connections);
    let connect_secs;
    let rss_connected;
    let query_of = |index: usize| {
        args.subscription
            .replace("{shape}", &(index % args.shapes.max(1)).to_string())
    };
    match args.transport {
        Transport::Ws => {
            let mut sockets: Vec<Ws> = Vec::with_capacity(args.connections);
            let mut pending = futures_util::stream::iter(0..args.connections)
                .map(|_| connect(&ws_url, &init))
                .buffered(args.connect_concurrency.max(1));
            while let Some(ws) = pending.next().await {
                sockets.push(ws.context("connecting")?);
            }
            drop(pending);
            connect_secs = connect_started.elapsed().as_secs_f64();
            rss_connected = rss();
            for (conn, mut ws) in sockets.into_iter().enumerate() {
                let mut subs = Vec::new();
                let mut index = conn;
                while index < args.subscriptions {
                    let topic = index % topics.len();
                    subs_per_topic[topic] += 1;
                    let vars = variables(&args.sub_vars, &topics[topic], "")?;
                    ws.feed(Message::text(
                        json!({
                            "type": "subscribe",
                            "id": format!("s{index}"),
                            "payload": { "query": query_of(index), "variables": vars }
                        })
                        .to_string(),
                    ))
                    .await?;
                    subs.push(SubState::new(topic));
                    index += args.connections;
                }
                ws.flush().await?;
                readers.push(tokio::spawn(reader(
                    ws,
                    subs,
                    args.connections,
                    shared.clone(),
                    started,
                    stop_rx.clone(),
                )));
            }
        }
        Transport::Sse => {
            // No overall timeout: the streams live as long as the run.
            let streaming = reqwest::Client::builder()
                .no_gzip()
                .pool_max_idle_per_host(args.connect_concurrency.max(1))
                .build()?;
            let stream_url = format!("{}/stream", args.url);
            let mut streams = Vec::with_capacity(args.connections);
            let mut pending = futures_util::stream::iter(0..args.connections)
                .map(|_| open_stream(&streaming, &stream_url, args.token.as_deref(), args.gzip))
                // A user may hold 16 reservations not yet opened (the server's limit).
                .buffered(args.connect_concurrency.clamp(1, 8));
            while let Some(stream) = pending.next().await {
                streams.push(stream.context("opening an event stream")?);
            }
            drop(pending);
            connect_secs = connect_started.elapsed().as_secs_f64();
            rss_connected = rss();
            let mut posts = Vec::new();
            for (conn, (token, response)) in streams.into_iter().enumerate() {
                let mut subs = Vec::new();
                let mut index = conn;
                while index < args.subscriptions {
                    let topic = index % topics.len();
                    subs_per_topic[topic] += 1;
                    let vars = variables(&args.sub_vars, &topics[topic], "")?;
                    let body = json!({
                        "query": query_of(index),
                        "variables": vars,
                        "extensions": { "operationId": format!("s{index}") },
                    });
                    posts.push((token.clone(), body));
                    subs.push(SubState::new(topic));
                    index += args.connections;
                }
                readers.push(tokio::spawn(sse_reader(
                    response,
                    subs,
                    args.connections,
                    shared.clone(),
                    started,
                    stop_rx.clone(),
                )));
            }
            let mut started_ops = futures_util::stream::iter(posts)
                .map(|(token, body)| {
                    let mut request = client
                        .post(&stream_url)
                        .header("x-graphql-event-stream-token", token)
                        .json(&body);
                    if let Some(token) = &args.token {
                        request = request.bearer_auth(token);
                    }
                    async move {
                        let response = request.send().await?;
                        if response.status() != reqwest::StatusCode::ACCEPTED {
                            bail!("starting a subscription: {}", response.status());
                        }
                        Ok(())
                    }
                })
                .buffer_unordered(64);
            while let Some(started) = started_ops.next().await {
                started?;
            }
        }
    }

    let publisher = Arc::new(Publisher {
        client: client.clone(),
        url: args.url.clone(),
        token: args.token.clone(),
        mutation: args.mutation.clone(),
        template: args.mut_vars.clone(),
    });

    // Probe every topic (seq 0) until every subscription has seen its probe: all are live.
    let subscribe_started = Instant::now();
    if args.subscriptions > 0 {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            for (t, topic) in topics.iter().enumerate() {
                if subs_per_topic[t] > 0 {
                    publisher
                        .publish(topic, &format!("~lg~{t}~0~{}~", now_ns()))
                        .await;
                }
            }
            let until = Instant::now() + Duration::from_secs(3);
            while Instant::now() < until
                && shared.probes_seen.load(Ordering::Relaxed) < args.subscriptions
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if shared.probes_seen.load(Ordering::Relaxed) >= args.subscriptions {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "only {} of {} subscriptions became live within 120 s",
                    shared.probes_seen.load(Ordering::Relaxed),
                    args.subscriptions
                );
            }
        }
    }
    let subscribe_secs = subscribe_started.elapsed().as_secs_f64();
    let rss_subscribed = rss();

    let mut report = json!({
        "label": args.label,
        "connections": args.connections,
        "subscriptions": args.subscriptions,
        "topics": topics.len(),
        "connect_secs": connect_secs,
        "subscribe_secs": subscribe_secs,
        "rss_before_kib": rss_before,
        "rss_connected_kib": rss_connected,
        "rss_subscribed_kib": rss_subscribed,
    });
    if let (Some(before), Some(connected), Some(subscribed)) =
        (rss_before, rss_connected, rss_subscribed)
    {
        if args.connections > 0 {
            report["rss_per_connection_kib"] =
                json!((connected as f64 - before as f64) / args.connections as f64);
        }
        if args.subscriptions > 0 {
            report["rss_per_subscription_kib"] =
                json!((subscribed as f64 - connected as f64) / args.subscriptions as f64);
        }
    }

    let mut mutation_latency = histogram();
    let mut published_ok = vec![0u64; topics.len()];
    // Per topic, the numbers whose publish the server acknowledged.
    let mut acked: Vec<Vec<u64>> = vec![Vec::new(); topics.len()];
    let mut publish_failed = 0u64;
    let mut publish_secs = 0.0;
    let pid_text = pid.map(|p| p.to_string());
    let server_cpu_before = pid_text.as_deref().and_then(cpu_secs);
    let self_cpu_before = cpu_secs("self");
    shared.counting.store(true, Ordering::Relaxed);
    let publish_started = Instant::now();
    let publish_started_ns = started.elapsed().as_nanos() as u64;
    if !args.idle {
        let publishers = args.publishers.clamp(1, topics.len());
        let per_publisher_rate = args.rate / publishers as f64;
        let until = Instant::now() + Duration::from_secs_f64(args.duration);
        let mut tasks = Vec::new();
        for p in 0..publishers {
            let publisher = publisher.clone();
            let owned: Vec<(usize, String)> = topics
                .iter()
                .enumerate()
                .filter(|(t, _)| t % publishers == p)
                .map(|(t, id)| (t, id.clone()))
                .collect();
            tasks.push(tokio::spawn(async move {
                let mut ticker = (per_publisher_rate > 0.0).then(|| {
                    // Publishers are spread evenly over the period, so the load is a steady
                    // rate rather than a burst of every publisher at once.
                    let period = Duration::from_secs_f64(1.0 / per_publisher_rate);
                    let offset = period.mul_f64(p as f64 / publishers as f64);
                    let mut ticker =
                        tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
                    // A slow server does not lower the offered rate: missed ticks are sent
                    // at once, and latency counts from when each change was due, so the
                    // queueing shows (no coordinated omission).
                    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                    ticker
                });
                let mut seqs = vec![0u64; owned.len()];
                let mut ok = vec![0u64; owned.len()];
                let mut acked: Vec<Vec<u64>> = vec![Vec::new(); owned.len()];
                let mut failed = 0u64;
                let mut latency = histogram();
                let mut turn = 0usize;
                while Instant::now() < until {
                    let due = match ticker.as_mut() {
                        Some(ticker) => ticker.tick().await.into_std(),
                        None => Instant::now(),
                    };
                    if due >= until {
                        break;
                    }
                    let slot = turn % owned.len();
                    turn += 1;
                    let (t, id) = &owned[slot];
                    seqs[slot] += 1;
                    let due_ns = now_ns().saturating_sub(due.elapsed().as_nanos() as u64);
                    let body = format!("~lg~{t}~{}~{due_ns}~", seqs[slot]);
                    if publisher.publish(id, &body).await {
                        ok[slot] += 1;
                        set_bit(&mut acked[slot], seqs[slot]);
                        let _ = latency.record((due.elapsed().as_micros() as u64).max(1));
                    } else {
                        failed += 1;
                        // The number is spent; the next change gets a new one, and a gap is
                        // expected here (reported as a failed publish, not a loss).
                    }
                }
                (owned, ok, acked, failed, latency)
            }));
        }
        for task in tasks {
            let (owned, ok, topic_acked, failed, latency) = task.await?;
            for (((t, _), n), bits) in owned.iter().zip(ok).zip(topic_acked) {
                published_ok[*t] += n;
                acked[*t] = bits;
            }
            publish_failed += failed;
            mutation_latency.add(&latency)?;
        }
        publish_secs = publish_started.elapsed().as_secs_f64();
    }

    // Drain: wait for every expected delivery, or the drain time.
    let expected: u64 = published_ok
        .iter()
        .zip(&subs_per_topic)
        .map(|(published, subs)| published * subs)
        .sum();
    let drain_until = Instant::now() + Duration::from_secs_f64(args.drain);
    while shared.unique.load(Ordering::Relaxed) < expected && Instant::now() < drain_until {
        if args.live {
            let last = shared.last_delivery_ns.load(Ordering::Relaxed);
            let quiet_ns = (started.elapsed().as_nanos() as u64).saturating_sub(last);
            if quiet_ns > 1_000_000_000
                && started.elapsed().as_nanos() as u64 > publish_started_ns + 1_000_000_000
            {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let server_cpu = match (server_cpu_before, pid_text.as_deref().and_then(cpu_secs)) {
        (Some(before), Some(after)) => Some(after - before),
        _ => None,
    };
    let self_cpu = match (self_cpu_before, cpu_secs("self")) {
        (Some(before), Some(after)) => Some(after - before),
        _ => None,
    };
    let measured_secs = publish_started.elapsed().as_secs_f64();
    let rss_end = rss();
    stop_tx.send(true).ok();

    let mut latency = histogram();
    let (mut unique, mut lost, mut duplicates, mut out_of_order, mut closed_early) =
        (0u64, 0u64, 0u64, 0u64, 0usize);
    let mut unacknowledged = 0u64;
    let mut folded = 0u64;
    for reader in readers {
        let result = reader.await?;
        latency.add(&result.latency)?;
        closed_early += usize::from(result.closed_early);
        for sub in &result.subs {
            unique += sub.unique;
            // Lost: acknowledged numbers never seen. Numbers seen whose publish was not
            // acknowledged (a timeout after the commit) are counted apart, not as credit.
            if args.live {
                // Only the topic's last acknowledged number must arrive.
                let missing = count_missing(&acked[sub.topic], &sub.seen);
                let last = highest_bit(&acked[sub.topic]);
                if last.is_some_and(|last| !has_bit(&sub.seen, last)) {
                    lost += 1;
                }
                folded += missing;
            } else {
                lost += count_missing(&acked[sub.topic], &sub.seen);
            }
            let mut seen = sub.seen.clone();
            if let Some(first) = seen.first_mut() {
                *first &= !1; // the probe, seq 0
            }
            unacknowledged += count_missing(&seen, &acked[sub.topic]);
            duplicates += sub.duplicates;
            out_of_order += sub.out_of_order;
        }
    }
    let delivered = shared.delivered.load(Ordering::Relaxed);
    let last_delivery_ns = shared.last_delivery_ns.load(Ordering::Relaxed);
    let delivery_secs = (last_delivery_ns.saturating_sub(publish_started_ns)) as f64 / 1e9;
    let published: u64 = published_ok.iter().sum();

    report["published"] = json!(published);
    report["publish_failed"] = json!(publish_failed);
    report["publish_secs"] = json!(publish_secs);
    report["mutations_per_sec"] = json!(if publish_secs > 0.0 {
        published as f64 / publish_secs
    } else {
        0.0
    });
    report["mutation_latency"] = percentiles(&mutation_latency);
    report["expected"] = json!(expected);
    report["delivered"] = json!(delivered);
    report["unique"] = json!(unique);
    report["lost"] = json!(lost);
    report["live"] = json!(args.live);
    report["folded"] = json!(folded);
    report["misrouted"] = json!(shared.misrouted.load(Ordering::Relaxed));
    report["arrived_unacknowledged"] = json!(unacknowledged);
    report["requested_rate"] = json!(args.rate);
    report["duplicates"] = json!(duplicates);
    report["out_of_order"] = json!(out_of_order);
    report["subscription_errors"] = json!(shared.errors.load(Ordering::Relaxed));
    report["closed_early"] = json!(closed_early);
    report["latency"] = percentiles(&latency);
    report["deliveries_per_sec"] = json!(if delivery_secs > 0.0 {
        delivered as f64 / delivery_secs
    } else {
        0.0
    });
    report["measured_secs"] = json!(measured_secs);
    report["server_cpu_percent"] = json!(server_cpu.map(|s| 100.0 * s / measured_secs));
    report["loadgen_cpu_percent"] = json!(self_cpu.map(|s| 100.0 * s / measured_secs));
    report["rss_end_kib"] = json!(rss_end);
    report["transport"] = json!(format!("{:?}", args.transport).to_lowercase());
    report["gzip"] = json!(args.gzip);
    let wire_bytes = shared.wire_bytes.load(Ordering::Relaxed);
    report["wire_bytes"] = json!(wire_bytes);
    report["wire_bytes_per_delivery"] = json!(if delivered > 0 {
        wire_bytes as f64 / delivered as f64
    } else {
        0.0
    });

    println!("== {}", args.label);
    println!(
        "connections {} subscriptions {} topics {} (connected in {:.1} s, live in {:.1} s)",
        args.connections,
        args.subscriptions,
        topics.len(),
        connect_secs,
        subscribe_secs
    );
    if let (Some(before), Some(connected), Some(subscribed)) =
        (rss_before, rss_connected, rss_subscribed)
    {
        println!(
            "server RSS: {:.1} MiB before, {:.1} MiB connected, {:.1} MiB subscribed",
            before as f64 / 1024.0,
            connected as f64 / 1024.0,
            subscribed as f64 / 1024.0
        );
    }
    if !args.idle {
        println!(
            "published {published} ({publish_failed} failed) in {publish_secs:.1} s: {:.0} mutations/s, mutation latency {}",
            report["mutations_per_sec"].as_f64().unwrap_or(0.0),
            report["mutation_latency"]
        );
        println!(
            "delivered {delivered} / expected {expected}{}: lost {lost}, duplicates {duplicates}, out of order {out_of_order}, misrouted {}, arrived unacknowledged {unacknowledged}, subscription errors {}, closed early {closed_early}",
            if args.live {
                format!(
                    " ({folded} folded into later payloads; lost = subscriptions without their topic's last change)"
                )
            } else {
                String::new()
            },
            report["misrouted"],
            report["subscription_errors"]
        );
        println!(
            "end-to-end latency {}; {:.0} deliveries/s",
            report["latency"],
            report["deliveries_per_sec"].as_f64().unwrap_or(0.0)
        );
        println!(
            "on the wire: {:.1} bytes per delivery ({}{})",
            report["wire_bytes_per_delivery"].as_f64().unwrap_or(0.0),
            report["transport"].as_str().unwrap_or_default(),
            if args.gzip { ", gzip" } else { "" }
        );
        println!(
            "CPU: server {:?} %, loadgen {:?} %",
            report["server_cpu_percent"].as_f64().map(|v| v.round()),
            report["loadgen_cpu_percent"].as_f64().map(|v| v.round())
        );
    }
    println!("JSON {report}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_and_fields_are_read_from_raw_frames() {
        let frame = r#"{"id":"s42","type":"next","payload":{"data":{"messageEvents":{"cursor":"ZXY","message":{"body":"~lg~3~17~1234567~"}}}}}"#;
        assert_eq!(string_field(frame, "type"), Some("next"));
        assert_eq!(string_field(frame, "id"), Some("s42"));
        assert_eq!(marker(frame), Some((3, 17, 1_234_567)));
        assert_eq!(marker(r#"{"body":"hello"}"#), None);
    }

    #[test]
    fn a_subscription_counts_duplicates_and_out_of_order() {
        let mut sub = SubState::new(0);
        for seq in [1, 2, 4, 3, 3, 200] {
            sub.record(seq);
        }
        assert_eq!(sub.unique, 5);
        assert_eq!(sub.duplicates, 1);
        assert_eq!(sub.out_of_order, 1);
        assert_eq!(sub.max_seq, 200);
        // Acknowledged 1..=5: 5 never arrived; 200 arrived unacknowledged.
        let mut acked = Vec::new();
        for seq in 1..=5 {
            set_bit(&mut acked, seq);
        }
        assert_eq!(count_missing(&acked, &sub.seen), 1);
        assert_eq!(count_missing(&sub.seen, &acked), 1);
    }
}
