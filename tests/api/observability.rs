//! `/metrics` (Prometheus), `/readyz` and `/healthz`.

use serde_json::json;

use crate::both_backends;
use crate::subscriptions::MESSAGE_EVENTS;
use crate::ws_client::{WsClient, caught_up, wait_for_subscribers};

/// The value of the sample `name` (with its labels, if any) in an OpenMetrics text.
pub(crate) fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

both_backends! {
    async fn metrics_count_connections_subscriptions_changes_deliveries_and_errors(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "metrics").await;
        let refused = server.graphql_as("not a token", "{ me { id } }", json!({})).await;
        assert_eq!(crate::helpers::error_code(&refused), "UNAUTHENTICATED");
        // A body the transport cannot read is counted too.
        let unreadable = server.client().post(server.url("/graphql")).header("content-type", "application/json").body("{").send().await.unwrap();
        assert_eq!(unreadable.status(), 400);

        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        ws.subscribe("1", MESSAGE_EVENTS, json!({ "c": channel })).await;
        wait_for_subscribers(&server.broker, &channel, 1).await;
        server.post_message(&ada, &channel, "counted").await;
        ws.next_payload("1").await;
        caught_up(&server).await;

        let response = server.client().get(server.url("/metrics")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
        let text = response.text().await.unwrap();
        let value = |name: &str| sample(&text, name).unwrap_or_else(|| panic!("no {name} in\n{text}"));
        assert_eq!(value("syncgraph_ws_connections"), 1.0);
        assert_eq!(value("syncgraph_subscriptions"), 1.0);
        assert!(value("syncgraph_changes_published_total") >= 1.0);
        assert_eq!(value("syncgraph_events_delivered_total"), 1.0);
        assert!(value("syncgraph_errors_total{code=\"UNAUTHENTICATED\"}") >= 1.0);
        assert!(value("syncgraph_errors_total{code=\"BAD_USER_INPUT\"}") >= 1.0);
        assert_eq!(value("syncgraph_feed_lag_positions"), 0.0);
        assert!(value("syncgraph_feed_published_position") >= 1.0);
        for name in ["syncgraph_log_replays_total", "syncgraph_lagging_subscribers_total", "syncgraph_feed_lag_seconds"] {
            value(name);
        }

        // Closing the socket ends its subscription and connection in the gauges.
        ws.close().await;
        let deadline = tokio::time::Instant::now() + crate::helpers::TIMEOUT;
        loop {
            let text = server.metrics().await;
            if sample(&text, "syncgraph_ws_connections") == Some(0.0) && sample(&text, "syncgraph_subscriptions") == Some(0.0) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "gauges fall back to 0 in time:\n{text}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    async fn readyz_reports_the_database_and_the_feed(server: TestServer) {
        let health = server.client().get(server.url("/healthz")).send().await.unwrap();
        assert_eq!(health.status(), 200);
        // Ready once the tailer has finished its first read (a moment after start).
        let deadline = tokio::time::Instant::now() + crate::helpers::TIMEOUT;
        let report: serde_json::Value = loop {
            let ready = server.client().get(server.url("/readyz")).send().await.unwrap();
            let status = ready.status();
            let report: serde_json::Value = ready.json().await.unwrap();
            if status == 200 {
                break report;
            }
            assert_eq!(report["database"], true, "{report}");
            assert!(tokio::time::Instant::now() < deadline, "ready in time: {report}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert_eq!(report["ready"], true, "{report}");
        assert_eq!(report["database"], true);
        assert_eq!(report["feed_caught_up"], true);
        assert_eq!(report["tailer_running"], true);
        assert_eq!(report["shutting_down"], false);
    }
}

/// The feed's lag as `/metrics` reports it: (positions, seconds).
async fn lag(server: &crate::helpers::TestServer) -> (f64, f64) {
    let text = server.metrics().await;
    (
        sample(&text, "syncgraph_feed_lag_positions").expect("lag positions"),
        sample(&text, "syncgraph_feed_lag_seconds").expect("lag seconds"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs SYNCGRAPH_TEST_POSTGRES (a PostgreSQL server URL)"
)]
async fn a_change_held_behind_an_open_transaction_shows_as_lag_postgres() {
    use sea_orm::TransactionTrait;
    crate::helpers::run(crate::helpers::Backend::Postgres, |server| async move {
        let (ada, ada_id) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "lag").await;
        caught_up(&server).await;
        // A takes a position and stays open; B commits after it. The feed may not publish
        // B before A is decided, so B waits: that is lag.
        let first = server.sql().await;
        let a = first.begin().await.unwrap();
        crate::subscriptions::sql_insert(&a, &channel, &ada_id, "A").await;
        crate::subscriptions::sql_insert(&server.sql().await, &channel, &ada_id, "B").await;
        let deadline = tokio::time::Instant::now() + crate::helpers::TIMEOUT;
        loop {
            let (positions, _) = lag(&server).await;
            if positions >= 1.0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "B shows as lag in time"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // The tailer waits for A to be decided; after 5 s without a finished read, this
        // process reports that it is not ready.
        let not_ready = server.readyz_until(503).await;
        assert_eq!(not_ready["ready"], false, "{not_ready}");
        assert_eq!(not_ready["tailer_running"], false, "{not_ready}");
        assert_eq!(not_ready["database"], true, "{not_ready}");

        a.commit().await.unwrap();
        caught_up(&server).await;
        assert_eq!(lag(&server).await, (0.0, 0.0));
        server.readyz_until(200).await;
    })
    .await;
}

/// Every operation runs in a `graphql` span with its name and viewer, and its end is logged
/// there with its duration: queries over HTTP, and subscriptions when the client completes
/// them. Read from the real binary's JSON log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_operation_is_logged_in_a_span_with_name_viewer_and_duration() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("spans.db").display());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_syncgraph"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &url,
            "--log-format",
            "json",
        ])
        .env("SYNCGRAPH_JWT_SECRET", "test-secret")
        .env("RUST_LOG", "syncgraph=debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_line().await {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    // The next log line (JSON) for which `wanted` holds.
    async fn next_matching(
        lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        tokio::time::timeout(crate::helpers::TIMEOUT, async {
            while let Some(line) = lines.recv().await {
                let entry: serde_json::Value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| panic!("a JSON log line: {line}"));
                if wanted(&entry) {
                    return entry;
                }
            }
            panic!("the server's log ended");
        })
        .await
        .expect("the log line comes in time")
    }
    let serving = next_matching(&mut lines, |entry| {
        entry["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("serving GraphQL on http://"))
    })
    .await;
    let message = serving["fields"]["message"].as_str().unwrap();
    let addr: std::net::SocketAddr = message
        .split("http://")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();

    let client = reqwest::Client::new();
    let post = |body: serde_json::Value, token: Option<String>| {
        let mut request = client.post(format!("http://{addr}/graphql")).json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            request
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    let joined = post(
        json!({ "query": "mutation Join { signUp(input: { name: \"Spanner\", email: \"span@example.com\", password: \"correct horse\" }) { token user { id } } }", "operationName": "Join" }),
        None,
    )
    .await;
    let token = joined["data"]["signUp"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let user_id: i64 = joined["data"]["signUp"]["user"]["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let me = post(
        json!({ "query": "query Me { me { id } }", "operationName": "Me" }),
        Some(token.clone()),
    )
    .await;
    assert!(me.get("errors").is_none(), "{me}");
    let finished = |operation: &'static str| {
        move |entry: &serde_json::Value| {
            entry["fields"]["message"] == "operation finished"
                && entry["span"]["name"] == "graphql"
                && entry["span"]["operation"] == operation
        }
    };
    let me_done = next_matching(&mut lines, finished("Me")).await;
    assert_eq!(me_done["span"]["viewer"], user_id, "{me_done}");
    assert!(
        me_done["fields"]["duration_ms"].as_f64().is_some(),
        "{me_done}"
    );
    assert_eq!(me_done["fields"]["errors"], 0, "{me_done}");

    let created = post(
        json!({ "query": "mutation { createChannel(input: { name: \"spans\" }) { id } }" }),
        Some(token.clone()),
    )
    .await;
    let channel = created["data"]["createChannel"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut ws = WsClient::connect_to(addr, Some(&token)).await;
    ws.send(json!({
        "type": "subscribe",
        "id": "1",
        "payload": {
            "query": "subscription Live($c: ID!) { messageEvents(channelId: $c) { cursor } }",
            "variables": { "c": channel },
            "operationName": "Live"
        }
    }))
    .await;
    post(
        json!({ "query": "mutation($c: ID!) { postMessage(input: { channelId: $c, body: \"hi\" }) { id } }", "variables": { "c": channel } }),
        Some(token.clone()),
    )
    .await;
    ws.next_payload("1").await;
    ws.complete("1").await;
    let live_done = next_matching(&mut lines, finished("Live")).await;
    assert_eq!(live_done["span"]["viewer"], user_id, "{live_done}");
    assert!(
        live_done["fields"]["duration_ms"].as_f64().is_some(),
        "{live_done}"
    );
    assert_eq!(live_done["fields"]["responses"], 1, "{live_done}");
    ws.close().await;
    child.start_kill().ok();
}
