//! Subscriptions over HTTP: graphql-sse (distinct connections and single connection mode) and
//! Apollo's multipart subscriptions, read here byte by byte off real sockets: event ids and
//! `Last-Event-ID` resume, keep-alives, revocation, token expiry, limits, disconnects, gzip and
//! shutdown. The real clients (`graphql-sse`, Apollo Client, a browser's `EventSource`) are in
//! the JavaScript suites (`clients.rs`).

use std::io::Write as _;
use std::time::Duration;

use sea_orm::ConnectionTrait;
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{Backend, TIMEOUT, TestServer, data, error_code, run_with};
use crate::subscriptions::{MESSAGE_EVENTS, sql_insert};
use crate::ws_client::{caught_up, wait_for_subscribers, wait_for_subscribers_at_most};

pub const APOLLO_ACCEPT: &str =
    "multipart/mixed;boundary=\"graphql\";subscriptionSpec=1.0,application/json";

/// One server-sent event as the stream carried it (a comment is `comment: true`).
#[derive(Debug, Default)]
pub struct SseEvent {
    pub event: Option<String>,
    pub id: Option<String>,
    pub data: Option<String>,
    pub comment: bool,
}

impl SseEvent {
    /// The event's data as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.data.as_deref().unwrap_or("null")).expect("JSON data")
    }
}

/// An open streaming response, read as it arrives; every read has a deadline.
pub struct Stream {
    response: reqwest::Response,
    text: Vec<u8>,
    /// Decodes a gzip-encoded body as it arrives.
    gzip: Option<flate2::write::GzDecoder<Vec<u8>>>,
    pub ended: bool,
}

impl Stream {
    pub fn new(response: reqwest::Response) -> Self {
        let gzip = response
            .headers()
            .get("content-encoding")
            .is_some_and(|value| value == "gzip")
            .then(|| flate2::write::GzDecoder::new(Vec::new()));
        Self {
            response,
            text: Vec::new(),
            gzip,
            ended: false,
        }
    }

    /// Reads one more chunk of the body (false at its end).
    async fn read(&mut self) -> bool {
        let chunk = tokio::time::timeout(TIMEOUT, self.response.chunk())
            .await
            .expect("the stream sends something in time")
            .expect("the stream reads");
        let Some(chunk) = chunk else {
            self.ended = true;
            return false;
        };
        match &mut self.gzip {
            Some(decoder) => {
                decoder.write_all(&chunk).unwrap();
                decoder.flush().unwrap();
                self.text.append(decoder.get_mut());
            }
            None => self.text.extend_from_slice(&chunk),
        }
        true
    }

    /// The next server-sent event or comment; `None` at the end of the stream.
    pub async fn next_raw(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.text.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.text.drain(..end + 2).collect();
                let block = String::from_utf8(block).unwrap();
                let mut event = SseEvent::default();
                for line in block.lines() {
                    if line.starts_with(':') {
                        event.comment = true;
                    } else if let Some((field, value)) = line.split_once(':') {
                        let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
                        match field {
                            "event" => event.event = Some(value),
                            "id" => event.id = Some(value),
                            "data" => event.data = Some(value),
                            other => panic!("unexpected field {other}: {block:?}"),
                        }
                    } else if !line.is_empty() {
                        panic!("unexpected line {line:?}");
                    }
                }
                return Some(event);
            }
            if !self.read().await {
                assert!(
                    self.text.is_empty(),
                    "the stream ended in an event: {:?}",
                    self.text
                );
                return None;
            }
        }
    }

    /// The next `next` or `complete` event, passing over comments and ids alone, within
    /// `TIMEOUT` (keep-alives do not count as arriving).
    pub async fn next_event(&mut self) -> SseEvent {
        tokio::time::timeout(TIMEOUT, async {
            loop {
                let event = self.next_raw().await.expect("the stream goes on");
                if event.event.is_some() {
                    return event;
                }
            }
        })
        .await
        .expect("an event arrives in time")
    }

    /// The next multipart part's JSON, passing over heartbeats; `None` after the closing
    /// delimiter.
    pub async fn next_part(&mut self) -> Option<Value> {
        tokio::time::timeout(TIMEOUT, async {
            loop {
                let part = self.next_raw_part().await?;
                if part != json!({}) {
                    return Some(part);
                }
            }
        })
        .await
        .expect("a part arrives in time")
    }

    /// The next multipart part's JSON (heartbeats too); `None` after the closing delimiter,
    /// which must end the body.
    pub async fn next_raw_part(&mut self) -> Option<Value> {
        const DELIMITER: &[u8] = b"\r\n--graphql";
        loop {
            // A part: a delimiter, its headers and body, up to the next delimiter.
            if self.text.starts_with(DELIMITER) {
                let rest = &self.text[DELIMITER.len()..];
                if rest.starts_with(b"--\r\n") {
                    while self.read().await {}
                    assert_eq!(
                        &self.text[DELIMITER.len()..],
                        b"--\r\n",
                        "nothing after the end"
                    );
                    return None;
                }
                if let Some(end) = rest.windows(DELIMITER.len()).position(|w| w == DELIMITER) {
                    let part = String::from_utf8(rest[..end].to_vec()).unwrap();
                    self.text.drain(..DELIMITER.len() + end);
                    let (headers, body) = part
                        .strip_prefix("\r\n")
                        .and_then(|part| part.split_once("\r\n\r\n"))
                        .unwrap_or_else(|| panic!("a part with headers: {part:?}"));
                    assert_eq!(
                        headers.to_ascii_lowercase(),
                        "content-type: application/json"
                    );
                    return Some(serde_json::from_str(body).expect("a JSON part"));
                }
            } else {
                assert!(
                    DELIMITER.starts_with(&self.text[..self.text.len().min(DELIMITER.len())]),
                    "the body goes on with a delimiter: {:?}",
                    String::from_utf8_lossy(&self.text)
                );
            }
            assert!(
                self.read().await,
                "the multipart body ended without its closing delimiter"
            );
        }
    }
}

/// A client for streams: no overall timeout (each read has its own).
pub fn streaming_client() -> reqwest::Client {
    reqwest::Client::builder().no_gzip().build().unwrap()
}

/// Opens a graphql-sse stream (distinct connections) of `query` as `token`.
pub async fn sse(
    server: &TestServer,
    token: &str,
    query: &str,
    variables: Value,
    last_event_id: Option<&str>,
) -> Stream {
    let mut request = streaming_client()
        .post(server.url("/graphql/stream"))
        .header("accept", "text/event-stream")
        .bearer_auth(token)
        .json(&json!({ "query": query, "variables": variables }));
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    Stream::new(response)
}

/// The body of a `messageEvents` event's message.
fn body_of(payload: &Value) -> &str {
    payload["data"]["messageEvents"]["message"]["body"]
        .as_str()
        .unwrap_or_else(|| panic!("a message event: {payload}"))
}

/// `n` `next` events' payloads.
async fn bodies(stream: &mut Stream, n: usize) -> Vec<(Option<String>, Value)> {
    let mut out = Vec::new();
    while out.len() < n {
        let event = stream.next_event().await;
        assert_eq!(event.event.as_deref(), Some("next"), "{event:?}");
        out.push((event.id.clone(), event.json()));
    }
    out
}

/// A sample of `/metrics`.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|value| value.trim().parse().ok())
}

both_backends! {
    async fn sse_events_carry_their_cursor_as_id_and_last_event_id_resumes_exactly(server: TestServer) {
        let (ada, ada_id) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "general").await;
        let mut stream = sse(&server, &ada, MESSAGE_EVENTS, json!({ "c": channel }), None).await;
        wait_for_subscribers(&server.broker, &channel, 1).await;
        server.post_message(&ada, &channel, "one").await;
        sql_insert(&server.sql().await, &channel, &ada_id, "two").await;
        server.post_message(&ada, &channel, "three").await;
        let seen = bodies(&mut stream, 3).await;
        let texts: Vec<&str> = seen.iter().map(|(_, p)| body_of(p)).collect();
        assert_eq!(texts, ["one", "two", "three"]);
        for (id, payload) in &seen {
            assert_eq!(
                id.as_deref(),
                payload["data"]["messageEvents"]["cursor"].as_str(),
                "each event's id is its cursor"
            );
        }
        // The client goes away after "two"; what follows is sent while it is gone.
        drop(stream);
        wait_for_subscribers_at_most(&server, &channel, 0).await;
        server.post_message(&ada, &channel, "four").await;
        server.post_message(&ada, &channel, "five").await;
        let mut resumed = sse(
            &server,
            &ada,
            MESSAGE_EVENTS,
            json!({ "c": channel }),
            seen[1].0.as_deref(),
        )
        .await;
        let again = bodies(&mut resumed, 3).await;
        let texts: Vec<&str> = again.iter().map(|(_, p)| body_of(p)).collect();
        assert_eq!(texts, ["three", "four", "five"], "nothing lost, nothing twice");
        assert_eq!(again[0].0, seen[2].0);
        server.post_message(&ada, &channel, "six").await;
        let live = bodies(&mut resumed, 1).await;
        assert_eq!(body_of(&live[0].1), "six");

        // A Last-Event-ID that is not a cursor is the client's error, coded.
        let mut bad = sse(&server, &ada, MESSAGE_EVENTS, json!({ "c": channel }), Some("nope")).await;
        let event = bad.next_event().await;
        assert_eq!(error_code(&event.json()), "BAD_USER_INPUT", "{event:?}");
        assert_eq!(bad.next_event().await.event.as_deref(), Some("complete"));
        assert!(bad.next_raw().await.is_none(), "the stream ends after complete");
    }

    async fn an_event_source_get_is_marked_at_its_start_so_a_reconnect_before_any_event_loses_nothing(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "general").await;
        // Published before the subscription opens, so it is behind its start.
        server.post_message(&ada, &channel, "before").await;
        caught_up(&server).await;
        let query = "subscription($c: ID!) { messageEvents(channelId: $c) { cursor message { body } } }";
        let url = |token: &str| {
            let mut url = reqwest::Url::parse(&server.url("/graphql/stream")).unwrap();
            url.query_pairs_mut()
                .append_pair("query", query)
                .append_pair("variables", &json!({ "c": channel }).to_string())
                .append_pair("access_token", token);
            url
        };
        let response = streaming_client()
            .get(url(&ada))
            .header("accept", "text/event-stream")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut stream = Stream::new(response);
        assert!(stream.next_raw().await.unwrap().comment, "a comment first");
        let mark = stream.next_raw().await.unwrap();
        assert!(mark.event.is_none() && mark.data.is_none(), "an id alone: {mark:?}");
        let mark = mark.id.expect("the start's position");
        drop(stream);
        wait_for_subscribers_at_most(&server, &channel, 0).await;
        server.post_message(&ada, &channel, "while away").await;
        let response = streaming_client()
            .get(url(&ada))
            .header("accept", "text/event-stream")
            .header("last-event-id", &mark)
            .send()
            .await
            .unwrap();
        let mut stream = Stream::new(response);
        let event = stream.next_event().await;
        assert_eq!(body_of(&event.json()), "while away", "not `before`, not lost: {event:?}");

        // An access_token that is not valid: the subscription is refused, coded.
        let response = streaming_client()
            .get(url("not-a-token"))
            .send()
            .await
            .unwrap();
        let mut refused = Stream::new(response);
        let event = refused.next_event().await;
        assert_eq!(error_code(&event.json()), "UNAUTHENTICATED", "{event:?}");
        assert_eq!(refused.next_event().await.event.as_deref(), Some("complete"));

        // A mutation is not run from a URL.
        let mut url = reqwest::Url::parse(&server.url("/graphql/stream")).unwrap();
        url.query_pairs_mut()
            .append_pair("query", "mutation { createChannel(input: { name: \"x\" }) { id } }")
            .append_pair("access_token", &ada);
        let response = streaming_client().get(url).send().await.unwrap();
        assert_eq!(response.status(), 405);
    }

    async fn single_connection_mode_runs_and_stops_operations_on_one_stream(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "general").await;
        let client = streaming_client();
        let stream_url = server.url("/graphql/stream");
        let (bob, _) = server.sign_up("Bob").await;
        // Reserving needs a token; the reservation is then its user's alone.
        assert_eq!(client.put(&stream_url).send().await.unwrap().status(), 401);
        let reserved = client.put(&stream_url).bearer_auth(&ada).send().await.unwrap();
        assert_eq!(reserved.status(), 201);
        assert!(reserved.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
        let token = reserved.text().await.unwrap();
        let open = |as_whom: &str| {
            client
                .get(&stream_url)
                .header("accept", "text/event-stream")
                .header("x-graphql-event-stream-token", &token)
                .bearer_auth(as_whom)
                .send()
        };
        assert_eq!(open(&bob).await.unwrap().status(), 404, "not Bob's to open");
        let response = open(&ada).await.unwrap();
        assert_eq!(response.status(), 200);
        let mut stream = Stream::new(response);
        assert_eq!(open(&ada).await.unwrap().status(), 409, "one stream per reservation");
        let post = |id: &str, query: &str, variables: Value| {
            let mut body = json!({ "query": query, "variables": variables });
            if !id.is_empty() {
                body["extensions"] = json!({ "operationId": id });
            }
            client
                .post(&stream_url)
                .header("x-graphql-event-stream-token", &token)
                .bearer_auth(&ada)
                .json(&body)
                .send()
        };
        let subscription = "subscription($c: ID!) { messageEvents(channelId: $c) { message { body } } }";
        assert_eq!(post("a", subscription, json!({ "c": channel })).await.unwrap().status(), 202);
        assert_eq!(post("b", subscription, json!({ "c": channel })).await.unwrap().status(), 202);
        assert_eq!(post("a", subscription, json!({ "c": channel })).await.unwrap().status(), 409);
        assert_eq!(post("", subscription, json!({ "c": channel })).await.unwrap().status(), 400);
        wait_for_subscribers(&server.broker, &channel, 2).await;
        server.post_message(&ada, &channel, "both").await;
        let mut ids = Vec::new();
        for _ in 0..2 {
            let event = stream.next_event().await;
            assert_eq!(event.event.as_deref(), Some("next"));
            let data = event.json();
            assert_eq!(data["payload"]["data"]["messageEvents"]["message"]["body"], "both");
            ids.push(data["id"].as_str().unwrap().to_owned());
        }
        ids.sort();
        assert_eq!(ids, ["a", "b"]);
        let stop = |as_whom: &str| {
            client
                .delete(format!("{stream_url}?operationId=a"))
                .header("x-graphql-event-stream-token", &token)
                .bearer_auth(as_whom)
                .send()
        };
        assert_eq!(stop(&bob).await.unwrap().status(), 404, "not Bob's to stop");
        assert_eq!(stop(&ada).await.unwrap().status(), 200);
        let event = stream.next_event().await;
        assert_eq!((event.event.as_deref(), event.json()), (Some("complete"), json!({ "id": "a" })));
        wait_for_subscribers_at_most(&server, &channel, 1).await;
        server.post_message(&ada, &channel, "b only").await;
        let event = stream.next_event().await;
        assert_eq!(event.json()["id"], "b", "a was stopped: {event:?}");
        // Nor may Bob post to it.
        let bobs = client
            .post(&stream_url)
            .header("x-graphql-event-stream-token", &token)
            .bearer_auth(&bob)
            .json(&json!({ "query": "{ me { name } }", "extensions": { "operationId": "x" } }))
            .send()
            .await
            .unwrap();
        assert_eq!(bobs.status(), 404);
        // A query: its result, then its `complete`, on the same stream.
        assert_eq!(post("q", "{ me { name } }", json!({})).await.unwrap().status(), 202);
        let event = stream.next_event().await;
        assert_eq!(event.json(), json!({ "id": "q", "payload": { "data": { "me": { "name": "Ada" } } } }));
        let event = stream.next_event().await;
        assert_eq!((event.event.as_deref(), event.json()), (Some("complete"), json!({ "id": "q" })));
        // An operation that does not validate: its errors, then its end.
        assert_eq!(post("bad", "{ nope }", json!({})).await.unwrap().status(), 202);
        let event = stream.next_event().await;
        assert_eq!(event.json()["id"], "bad");
        assert_eq!(error_code(&event.json()["payload"]), "BAD_USER_INPUT");
        assert_eq!(stream.next_event().await.json(), json!({ "id": "bad" }));

        // Closing the stream ends its operations and its reservation.
        drop(stream);
        wait_for_subscribers_at_most(&server, &channel, 0).await;
        assert_eq!(post("c", subscription, json!({ "c": channel })).await.unwrap().status(), 404);
        let unknown = client
            .get(&stream_url)
            .header("x-graphql-event-stream-token", "made-up")
            .bearer_auth(&ada)
            .send()
            .await
            .unwrap();
        assert_eq!(unknown.status(), 404);
    }

    async fn apollo_multipart_subscriptions_send_parts_heartbeats_and_end_on_revocation(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let (bob, bob_id) = server.sign_up("Bob").await;
        let channel = server.create_channel(&ada, "general").await;
        server.add_member(&ada, &channel, &bob_id).await;
        let subscribe = |accept: &'static str, token: String| {
            streaming_client()
                .post(server.url("/graphql"))
                .header("accept", accept)
                .bearer_auth(token)
                .json(&json!({ "query": MESSAGE_EVENTS, "variables": { "c": channel } }))
                .send()
        };
        let response = subscribe(APOLLO_ACCEPT, bob.clone()).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"],
            "multipart/mixed;boundary=\"graphql\";subscriptionSpec=\"1.0\""
        );
        let mut stream = Stream::new(response);
        // Without a boundary in Accept, as Apollo Kotlin sends it.
        let response = subscribe("multipart/mixed;subscriptionSpec=\"1.0\", application/json", ada.clone())
            .await
            .unwrap();
        let mut other = Stream::new(response);
        wait_for_subscribers(&server.broker, &channel, 2).await;
        // The test servers send a keep-alive every second.
        assert_eq!(stream.next_raw_part().await, Some(json!({})), "a heartbeat while idle");
        server.post_message(&ada, &channel, "hello").await;
        let part = stream.next_part().await.unwrap();
        assert_eq!(body_of(&part["payload"]), "hello", "{part}");
        assert_eq!(body_of(&other.next_part().await.unwrap()["payload"]), "hello");

        let remove = "mutation($c: ID!, $u: ID!) { removeChannelMember(input: { channelId: $c, userId: $u }) { id } }";
        server.graphql_as(&ada, remove, json!({ "c": channel, "u": bob_id })).await;
        server.post_message(&ada, &channel, "after bob left").await;
        let part = stream.next_part().await.unwrap();
        assert_eq!(error_code(&part["payload"]), "FORBIDDEN", "{part}");
        assert_eq!(stream.next_part().await, None, "then the closing delimiter");
        assert_eq!(body_of(&other.next_part().await.unwrap()["payload"]), "after bob left");

        // A request that never runs is answered as JSON, which Apollo Client reads too.
        let invalid = streaming_client()
            .post(server.url("/graphql"))
            .header("accept", APOLLO_ACCEPT)
            .bearer_auth(&ada)
            .json(&json!({ "query": "subscription { nope }" }))
            .send()
            .await
            .unwrap();
        assert_eq!(invalid.headers()["content-type"], "application/json");
        let body: Value = invalid.json().await.unwrap();
        assert_eq!(error_code(&body), "BAD_USER_INPUT");
        // A query with that Accept is one JSON response.
        let query = streaming_client()
            .post(server.url("/graphql"))
            .header("accept", APOLLO_ACCEPT)
            .bearer_auth(&ada)
            .json(&json!({ "query": "{ me { name } }" }))
            .send()
            .await
            .unwrap();
        let body: Value = query.json().await.unwrap();
        assert_eq!(data(&body, "me")["name"], "Ada");
    }

    async fn sse_keeps_alive_ends_revoked_streams_with_forbidden_and_frees_closed_ones(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let (bob, bob_id) = server.sign_up("Bob").await;
        let channel = server.create_channel(&ada, "general").await;
        server.add_member(&ada, &channel, &bob_id).await;
        // Also through POST /graphql, as a client that accepts only event streams sends it.
        let response = streaming_client()
            .post(server.url("/graphql"))
            .header("accept", "text/event-stream")
            .bearer_auth(&bob)
            .json(&json!({ "query": MESSAGE_EVENTS, "variables": { "c": channel } }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["content-type"], "text/event-stream; charset=utf-8");
        let mut stream = Stream::new(response);
        let mut ada_stream = sse(&server, &ada, MESSAGE_EVENTS, json!({ "c": channel }), None).await;
        wait_for_subscribers(&server.broker, &channel, 2).await;
        let metrics = server.metrics().await;
        assert_eq!(sample(&metrics, "syncgraph_subscriptions"), Some(2.0), "{metrics}");
        // Idle: a comment line every second (the test servers' keep-alive).
        let first = stream.next_raw().await.unwrap();
        assert!(first.comment);
        let keep_alive = stream.next_raw().await.unwrap();
        assert!(keep_alive.comment && keep_alive.event.is_none(), "{keep_alive:?}");

        let remove = "mutation($c: ID!, $u: ID!) { removeChannelMember(input: { channelId: $c, userId: $u }) { id } }";
        server.graphql_as(&ada, remove, json!({ "c": channel, "u": bob_id })).await;
        server.post_message(&ada, &channel, "secret").await;
        let event = stream.next_event().await;
        assert_eq!(error_code(&event.json()), "FORBIDDEN", "{event:?}");
        assert!(event.id.is_none(), "an error carries no cursor");
        assert_eq!(stream.next_event().await.event.as_deref(), Some("complete"));
        assert!(stream.next_raw().await.is_none());
        let event = ada_stream.next_event().await;
        assert_eq!(body_of(&event.json()), "secret");

        // A client that goes away frees its subscription at once.
        drop(ada_stream);
        wait_for_subscribers_at_most(&server, &channel, 0).await;
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let metrics = server.metrics().await;
            if sample(&metrics, "syncgraph_subscriptions") == Some(0.0) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the gauge comes back down: {metrics}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn gzip_streams_flush_each_event_as_it_happens(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "general").await;
        let open = |accept: &'static str| {
            streaming_client()
                .post(server.url("/graphql/stream"))
                .header("accept", accept)
                .header("accept-encoding", "gzip, br")
                .bearer_auth(&ada)
                .json(&json!({ "query": MESSAGE_EVENTS, "variables": { "c": channel } }))
                .send()
        };
        let sse_response = open("text/event-stream").await.unwrap();
        assert_eq!(sse_response.headers()["content-encoding"], "gzip");
        let mut sse_stream = Stream::new(sse_response);
        let multipart = streaming_client()
            .post(server.url("/graphql"))
            .header("accept", APOLLO_ACCEPT)
            .header("accept-encoding", "gzip")
            .bearer_auth(&ada)
            .json(&json!({ "query": MESSAGE_EVENTS, "variables": { "c": channel } }))
            .send()
            .await
            .unwrap();
        assert_eq!(multipart.headers()["content-encoding"], "gzip");
        let mut multipart = Stream::new(multipart);
        wait_for_subscribers(&server.broker, &channel, 2).await;
        // Each event decodes in full before the next one is even written.
        for body in ["one", "two", "three"] {
            server.post_message(&ada, &channel, body).await;
            assert_eq!(body_of(&sse_stream.next_event().await.json()), body);
            assert_eq!(body_of(&multipart.next_part().await.unwrap()["payload"]), body);
        }
    }
}

/// A test server whose tokens live 2 s and that holds at most 2 streams, each user at most 2
/// subscriptions.
fn short_tokens_and_few_streams(config: &mut syncgraph::config::Config) {
    config.token_ttl_secs = 2;
    config.limits.max_connections = 2;
    config.limits.max_subscriptions_per_user = 2;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_capped_per_user_and_in_all_and_end_when_their_token_expires() {
    run_with(
        Backend::Sqlite,
        short_tokens_and_few_streams,
        |server: TestServer| async move {
            let (ada, _) = server.sign_up("Ada").await;
            let channel = server.create_channel(&ada, "general").await;
            let variables = json!({ "c": channel });
            let mut one = sse(&server, &ada, MESSAGE_EVENTS, variables.clone(), None).await;
            let multipart = streaming_client()
                .post(server.url("/graphql"))
                .header("accept", APOLLO_ACCEPT)
                .bearer_auth(&ada)
                .json(&json!({ "query": MESSAGE_EVENTS, "variables": variables }))
                .send()
                .await
                .unwrap();
            let mut two = Stream::new(multipart);
            // A third stream is past --max-connections.
            let third = streaming_client()
                .post(server.url("/graphql/stream"))
                .header("accept", "text/event-stream")
                .bearer_auth(&ada)
                .json(&json!({ "query": MESSAGE_EVENTS, "variables": variables }))
                .send()
                .await
                .unwrap();
            assert_eq!(third.status(), 503);
            assert_eq!(third.headers()["retry-after"], "5");
            let body: Value = third.json().await.unwrap();
            assert_eq!(error_code(&body), "LIMIT_EXCEEDED");

            // At the token's expiry: UNAUTHENTICATED, then the end.
            let event = one.next_event().await;
            assert_eq!(error_code(&event.json()), "UNAUTHENTICATED", "{event:?}");
            assert_eq!(one.next_event().await.event.as_deref(), Some("complete"));
            assert!(one.next_raw().await.is_none());
            let fatal = two.next_part().await.unwrap();
            assert_eq!(fatal["payload"], Value::Null, "a fatal error: {fatal}");
            assert_eq!(error_code(&fatal), "UNAUTHENTICATED");
            assert_eq!(two.next_part().await, None);
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_user_subscription_cap_counts_event_streams() {
    fn two_per_user(config: &mut syncgraph::config::Config) {
        config.limits.max_subscriptions_per_user = 2;
    }
    run_with(
        Backend::Sqlite,
        two_per_user,
        |server: TestServer| async move {
            let (ada, _) = server.sign_up("Ada").await;
            let channel = server.create_channel(&ada, "general").await;
            // One reserved stream holds three subscriptions of one user capped at two.
            let client = streaming_client();
            let stream_url = server.url("/graphql/stream");
            let token = client
                .put(&stream_url)
                .bearer_auth(&ada)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let response = client
                .get(format!("{stream_url}?token={token}"))
                .bearer_auth(&ada)
                .send()
                .await
                .unwrap();
            let mut stream = Stream::new(response);
            for id in ["a", "b", "c"] {
                let started = client
                    .post(format!("{stream_url}?token={token}"))
                    .bearer_auth(&ada)
                    .json(&json!({
                        "query": MESSAGE_EVENTS,
                        "variables": { "c": channel },
                        "extensions": { "operationId": id },
                    }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(started.status(), 202);
            }
            let event = stream.next_event().await;
            assert_eq!(event.json()["id"], "c", "{event:?}");
            assert_eq!(error_code(&event.json()["payload"]), "LIMIT_EXCEEDED");
            assert_eq!(stream.next_event().await.json(), json!({ "id": "c" }));
        },
    )
    .await;
}

both_backends! {
    async fn a_stream_that_is_not_read_catches_up_from_the_log_with_every_change_once(server: TestServer) {
        let (ada, ada_id) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "flood").await;
        caught_up(&server).await;
        let query = "subscription($c: ID!) { messageEvents(channelId: $c) { message { body } } }";
        let mut stream = sse(&server, &ada, query, json!({ "c": channel }), None).await;
        wait_for_subscribers(&server.broker, &channel, 1).await;
        use std::sync::atomic::Ordering::Relaxed;
        let stats = &server.broker.stats;
        let (lagged, delivered) = (stats.lagged.load(Relaxed), stats.delivered.load(Relaxed));
        // Nothing is read while 20,000 changes of 2 KB each are written: 40 MB, far more than
        // the sockets' buffers and the topic's. The server must stop pulling the stream's
        // replies (the count of replies made stalls well short) and catch up from the log.
        let bulk = match server.backend {
            Backend::Postgres => format!(
                "INSERT INTO messages (channel_id, author_id, body) \
                 SELECT {channel}, {ada_id}, 'bulk ' || i || ' ' || repeat('0', 2000) \
                 FROM generate_series(1, 20000) AS i"
            ),
            Backend::Sqlite => format!(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000) \
                 INSERT INTO messages (channel_id, author_id, body) \
                 SELECT {channel}, {ada_id}, 'bulk ' || i || ' ' || hex(zeroblob(1000)) FROM n"
            ),
        };
        server.sql().await.execute_unprepared(&bulk).await.unwrap();
        caught_up(&server).await;
        // Stalled: no more replies made over a quiet half second.
        let mut made = stats.delivered.load(Relaxed) - delivered;
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = stats.delivered.load(Relaxed) - delivered;
            if now == made {
                break;
            }
            made = now;
            assert!(tokio::time::Instant::now() < deadline, "the replies stall");
        }
        assert!(made < 10_000, "the server stopped pulling at {made} of 20,000 replies");
        for i in 1..=20_000 {
            let event = stream.next_event().await;
            let payload = event.json();
            let body = body_of(&payload);
            assert_eq!(body.split(' ').next(), Some("bulk"), "{body:.20}");
            assert_eq!(body.split(' ').nth(1), Some(i.to_string().as_str()), "every change, in order, once");
        }
        assert!(
            stats.lagged.load(Relaxed) > lagged,
            "it fell behind the topic's buffer and caught up from the log"
        );
    }
}

/// Starts the binary on a fresh SQLite file with every log line at TRACE, collected.
async fn traced_binary(
    dir: &std::path::Path,
) -> (
    tokio::process::Child,
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<String>>,
    tokio::task::JoinHandle<()>,
) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let database_url = format!("sqlite://{}", dir.join("traced.db").display());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_syncgraph"))
        .args(["--listen", "127.0.0.1:0", "--database-url", &database_url])
        .args(["--stream-keep-alive-secs", "1"])
        .env(
            "SYNCGRAPH_JWT_SECRET",
            "a-secret-for-the-traced-binary-test",
        )
        .env("RUST_LOG", "trace")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the binary");
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(TIMEOUT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.split("serving GraphQL on http://").nth(1) {
                return rest.split('/').next().unwrap().parse().unwrap();
            }
        }
        panic!("the binary exited before serving");
    })
    .await
    .expect("the binary starts in time");
    let collected = log.clone();
    let collector = tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let mut log = collected.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    (child, addr, log, collector)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_in_urls_are_never_logged_and_shutdown_ends_streams_so_clients_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr, log, collector) = traced_binary(dir.path()).await;
    let url = |path: &str| format!("http://{addr}{path}");
    let client = streaming_client();
    let graphql = |token: Option<&str>, query: &str, variables: Value| {
        let mut request = client
            .post(url("/graphql"))
            .json(&json!({ "query": query, "variables": variables }));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let signed_up = graphql(
        None,
        "mutation($i: SignUpInput!) { signUp(input: $i) { token } }",
        json!({ "i": { "name": "Ada", "email": "ada@example.com", "password": "correct horse battery" } }),
    )
    .await;
    let token = data(&signed_up, "signUp")["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let created = graphql(
        Some(&token),
        "mutation { createChannel(input: { name: \"general\" }) { id } }",
        json!({}),
    )
    .await;
    let channel = data(&created, "createChannel")["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // An EventSource-style GET with the token in its URL, and the other streams.
    let mut get_url = reqwest::Url::parse(&url("/graphql/stream")).unwrap();
    get_url
        .query_pairs_mut()
        .append_pair("query", MESSAGE_EVENTS)
        .append_pair("variables", &json!({ "c": channel }).to_string())
        .append_pair("access_token", &token);
    let mut by_url = Stream::new(client.get(get_url).send().await.unwrap());
    let multipart = client
        .post(url("/graphql"))
        .header("accept", APOLLO_ACCEPT)
        .bearer_auth(&token)
        .json(&json!({ "query": MESSAGE_EVENTS, "variables": { "c": channel } }))
        .send()
        .await
        .unwrap();
    let mut multipart = Stream::new(multipart);
    let reservation = client
        .put(url("/graphql/stream"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let single = client
        .get(url(&format!(
            "/graphql/stream?token={reservation}&access_token={token}"
        )))
        .send()
        .await
        .unwrap();
    let mut single = Stream::new(single);
    let started = client
        .post(url("/graphql/stream"))
        .header("x-graphql-event-stream-token", &reservation)
        .bearer_auth(&token)
        .json(&json!({
            "query": MESSAGE_EVENTS,
            "variables": { "c": channel },
            "extensions": { "operationId": "op" },
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202);
    // A live query over graphql-sse: its first payload is the result.
    let live = client
        .post(url("/graphql/stream"))
        .header("accept", "text/event-stream")
        .bearer_auth(&token)
        .json(&json!({ "query": "query($c: ID!) @live { channel(id: $c) { name } }", "variables": { "c": channel } }))
        .send()
        .await
        .unwrap();
    let mut live = Stream::new(live);
    assert_eq!(live.next_event().await.json()["revision"], 1);
    // Subscribed once each has heard a first event.
    let post = "mutation($c: ID!) { postMessage(input: { channelId: $c, body: \"hi\" }) { id } }";
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut heard = [false; 3];
    while heard != [true; 3] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "every stream hears a post: {heard:?}"
        );
        graphql(Some(&token), post, json!({ "c": channel })).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        if !heard[0] {
            heard[0] = by_url.next_event().await.event.as_deref() == Some("next");
        }
        if !heard[1] {
            heard[1] = multipart.next_part().await.is_some();
        }
        if !heard[2] {
            heard[2] = single.next_event().await.json()["id"] == "op";
        }
    }

    // SIGTERM: the streams end, with no `complete` for graphql-sse (its clients and
    // `EventSource` come back), the closing delimiter for multipart; the process exits.
    let pid = child.id().unwrap().to_string();
    tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    let mut rest = Vec::new();
    while let Some(event) = by_url.next_raw().await {
        rest.push(event);
    }
    assert!(
        rest.iter()
            .all(|event| event.event.as_deref() != Some("complete")),
        "no complete at shutdown: {rest:?}"
    );
    while let Some(event) = live.next_raw().await {
        assert_ne!(
            event.event.as_deref(),
            Some("complete"),
            "a live query is resumed too: {event:?}"
        );
    }
    while multipart.next_part().await.is_some() {}
    while let Some(event) = single.next_raw().await {
        assert_ne!(event.event.as_deref(), Some("complete"), "{event:?}");
    }
    let status = tokio::time::timeout(TIMEOUT, child.wait())
        .await
        .expect("it exits")
        .unwrap();
    assert!(status.success(), "{status}");
    // Every line, up to the pipe's end.
    tokio::time::timeout(TIMEOUT, collector)
        .await
        .expect("the log ends")
        .unwrap();

    let log = log.lock().unwrap().clone();
    assert!(log.contains("shutting down"), "the log was collected");
    let signature = token.rsplit('.').next().unwrap();
    assert!(!log.contains(signature), "a token reached the log");
    assert!(
        !log.contains(&reservation),
        "a stream token reached the log"
    );
}
