//! The change feed under load and faults: fan-out cost, concurrent writers, a lost LISTEN
//! connection, several processes, restarts, and a subscriber that stops reading.

use std::collections::HashSet;
use std::time::Duration;

use sea_orm::{ConnectionTrait, Statement, TransactionTrait};
use serde_json::json;

use crate::both_backends;
use crate::helpers::{Backend, TestServer, run_with};
use crate::subscriptions::{MESSAGE_EVENTS, event, sql_insert};
use crate::ws_client::{
    WsClient, caught_up, wait_for_streams, wait_for_subscribers, wait_for_subscribers_at_most,
};

const BODIES: &str = "subscription($c: ID!, $after: String) { messageEvents(channelId: $c, after: $after) { cursor kind message { id body } } }";

/// Reads `n` events of operation `id`; returns (cursor, body) pairs.
async fn collect(ws: &mut WsClient, id: &str, n: usize) -> Vec<(String, String)> {
    let mut events = Vec::with_capacity(n);
    for _ in 0..n {
        let payload = ws.next_payload(id).await;
        let e = event(&payload);
        events.push((
            e["cursor"].as_str().unwrap().to_owned(),
            e["message"]["body"].as_str().unwrap().to_owned(),
        ));
    }
    events
}

both_backends! {
    async fn one_change_reaches_a_thousand_subscribers_with_constant_queries(server: TestServer) {
        let (ada, ada_id) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "busy").await;
        caught_up(&server).await;
        let sql = server.sql().await;

        // One subscriber: how many statements does one change cost the server?
        let mut single = WsClient::connect_as(&server, Some(&ada)).await;
        single.subscribe("s", MESSAGE_EVENTS, json!({ "c": channel })).await;
        wait_for_streams(&server.broker, 1).await;
        let before = server.statements.get();
        sql_insert(&sql, &channel, &ada_id, "to one").await;
        let payload = single.next_payload("s").await;
        assert_eq!(event(&payload)["message"]["author"]["name"], "Ada");
        let for_one = server.statements.get() - before;

        // A thousand more, over ten connections.
        let mut sockets = Vec::new();
        for _ in 0..10 {
            let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
            for i in 0..100 {
                ws.subscribe(&format!("s{i}"), MESSAGE_EVENTS, json!({ "c": channel })).await;
            }
            sockets.push(ws);
        }
        wait_for_streams(&server.broker, 1_001).await;
        let before = server.statements.get();
        sql_insert(&sql, &channel, &ada_id, "to all").await;
        for ws in &mut sockets {
            let mut ids = HashSet::new();
            for _ in 0..100 {
                let message = ws.recv().await;
                assert_eq!(message["type"], "next", "{message}");
                let e = event(&message["payload"]);
                assert_eq!(e["message"]["body"], "to all");
                assert_eq!(e["message"]["author"]["name"], "Ada");
                assert!(ids.insert(message["id"].as_str().unwrap().to_owned()), "one event per subscription");
            }
        }
        assert_eq!(event(&single.next_payload("s").await)["message"]["body"], "to all");
        let for_thousand = server.statements.get() - before;
        assert_eq!(for_one, for_thousand, "statements per change do not grow with subscribers");
        assert!(for_thousand <= 2, "{for_thousand} statements for one change");
    }

    async fn eight_concurrent_writers_give_every_subscriber_and_a_replay_one_sequence(server: TestServer) {
        let (ada, ada_id) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "race").await;
        caught_up(&server).await;
        let mut live = Vec::new();
        for _ in 0..3 {
            let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
            ws.subscribe("live", BODIES, json!({ "c": channel })).await;
            live.push(ws);
        }
        wait_for_subscribers(&server.broker, &channel, 3).await;
        sql_insert(&server.sql().await, &channel, &ada_id, "marker").await;
        let mut marker = String::new();
        for ws in &mut live {
            let events = collect(ws, "live", 1).await;
            assert_eq!(events[0].1, "marker");
            marker = events[0].0.clone();
        }

        // Eight writers, each on its own connection, each holding its transaction open for
        // a pseudo-random moment before COMMIT, so commits interleave out of position order.
        let mut writers = Vec::new();
        for writer in 0..8u64 {
            let sql = server.sql().await;
            let channel = channel.clone();
            let author = ada_id.clone();
            writers.push(tokio::spawn(async move {
                let mut seed = writer * 2_654_435_761 + 1;
                for i in 0..10 {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let txn = sql.begin().await.unwrap();
                    sql_insert(&txn, &channel, &author, &format!("w{writer}-{i}")).await;
                    tokio::time::sleep(Duration::from_millis(seed % 15)).await;
                    txn.commit().await.unwrap();
                }
            }));
        }
        for writer in writers {
            tokio::time::timeout(crate::helpers::TIMEOUT, writer).await.unwrap().unwrap();
        }
        let mut sequences = Vec::new();
        for ws in &mut live {
            sequences.push(collect(ws, "live", 80).await);
        }
        let mut replay = WsClient::connect_as(&server, Some(&ada)).await;
        replay.subscribe("replay", BODIES, json!({ "c": channel, "after": marker })).await;
        sequences.push(collect(&mut replay, "replay", 80).await);

        for sequence in &sequences[1..] {
            assert_eq!(sequence, &sequences[0], "every subscriber and the replay agree");
        }
        let bodies: HashSet<&str> = sequences[0].iter().map(|(_, b)| b.as_str()).collect();
        assert_eq!(bodies.len(), 80, "no duplicate, none missing");
        let positions: Vec<i64> = sequences[0].iter().map(|(c, _)| crate::subscriptions::position_of(c)).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "one increasing order");
        for writer in 0..8 {
            let mine: Vec<&str> = sequences[0]
                .iter()
                .map(|(_, b)| b.as_str())
                .filter(|b| b.starts_with(&format!("w{writer}-")))
                .collect();
            let expected: Vec<String> = (0..10).map(|i| format!("w{writer}-{i}")).collect();
            assert_eq!(mine, expected, "each writer's changes in its commit order");
        }
    }

    async fn another_process_on_the_same_database_delivers_exactly_once(server: TestServer) {
        let (ada, ada_id) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "shared").await;
        let peer = server.start_peer().await;
        let mut ws = WsClient::connect_to(peer.addr, Some(&ada)).await;
        ws.subscribe("1", BODIES, json!({ "c": channel })).await;
        wait_for_subscribers(&peer.broker, &channel, 1).await;
        // Through the other process's API, and through plain SQL.
        server.post_message(&ada, &channel, "via api").await;
        sql_insert(&server.sql().await, &channel, &ada_id, "via sql").await;
        let events = collect(&mut ws, "1", 2).await;
        assert_eq!(events.iter().map(|(_, b)| b.as_str()).collect::<Vec<_>>(), ["via api", "via sql"]);
        // Nothing more: the next message is the answer to a ping.
        ws.send(json!({ "type": "ping", "payload": "last" })).await;
        assert_eq!(ws.recv().await, json!({ "type": "pong", "payload": "last" }));
        ws.close().await;
        peer.stop().await;
    }

    async fn after_a_restart_the_last_cursor_resumes_without_loss(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "restart").await;
        let first = server.start_peer().await;
        let mut ws = WsClient::connect_to(first.addr, Some(&ada)).await;
        ws.subscribe("1", BODIES, json!({ "c": channel })).await;
        wait_for_subscribers(&first.broker, &channel, 1).await;
        server.post_message(&ada, &channel, "before").await;
        let last = collect(&mut ws, "1", 1).await.remove(0);
        assert_eq!(last.1, "before");

        // Shutdown completes the subscription, then closes with 1012 (clients reconnect).
        let stopping = tokio::spawn(first.stop());
        assert_eq!(ws.recv().await, json!({ "type": "complete", "id": "1" }));
        assert_eq!(ws.expect_close().await.0, 1012);
        tokio::time::timeout(crate::helpers::TIMEOUT, stopping).await.unwrap().unwrap();

        for body in ["while down 1", "while down 2"] {
            server.post_message(&ada, &channel, body).await;
        }
        let second = server.start_peer().await;
        let mut ws = WsClient::connect_to(second.addr, Some(&ada)).await;
        ws.subscribe("again", BODIES, json!({ "c": channel, "after": last.0 })).await;
        let replayed = collect(&mut ws, "again", 2).await;
        assert_eq!(replayed.iter().map(|(_, b)| b.as_str()).collect::<Vec<_>>(), ["while down 1", "while down 2"]);
        server.post_message(&ada, &channel, "after").await;
        assert_eq!(collect(&mut ws, "again", 1).await[0].1, "after");
        ws.close().await;
        second.stop().await;
    }

    async fn a_subscriber_that_stops_reading_gets_every_change_when_it_reads_again(server: TestServer) {
        let (ada, ada_id) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "flood").await;
        caught_up(&server).await;
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        ws.subscribe("slow", BODIES, json!({ "c": channel })).await;
        wait_for_subscribers(&server.broker, &channel, 1).await;
        // The client reads nothing while 20,000 changes are written: far more than the
        // topic buffers, so the server must fall back to the log, not buffer them.
        let bulk = match server.backend {
            Backend::Postgres => format!(
                "INSERT INTO messages (channel_id, author_id, body) \
                 SELECT {channel}, {ada_id}, 'bulk ' || i FROM generate_series(1, 20000) AS i"
            ),
            Backend::Sqlite => format!(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000) \
                 INSERT INTO messages (channel_id, author_id, body) \
                 SELECT {channel}, {ada_id}, 'bulk ' || i FROM n"
            ),
        };
        server.sql().await.execute_unprepared(&bulk).await.unwrap();
        caught_up(&server).await;
        let events = collect(&mut ws, "slow", 20_000).await;
        for (i, (_, body)) in events.iter().enumerate() {
            assert_eq!(body, &format!("bulk {}", i + 1), "every change, in order, once");
        }
        ws.send(json!({ "type": "ping" })).await;
        assert_eq!(ws.recv().await["type"], "pong", "and nothing more");
    }

    async fn rolled_back_writes_never_reach_anyone(server: TestServer) {
        let (ada, ada_id) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "atomic").await;
        caught_up(&server).await;
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        ws.subscribe("live", BODIES, json!({ "c": channel })).await;
        wait_for_subscribers(&server.broker, &channel, 1).await;
        let sql = server.sql().await;
        sql_insert(&sql, &channel, &ada_id, "first").await;
        let first = collect(&mut ws, "live", 1).await.remove(0);
        // A transaction that writes and rolls back leaves nothing in the log.
        let txn = sql.begin().await.unwrap();
        sql_insert(&txn, &channel, &ada_id, "rolled back").await;
        txn.rollback().await.unwrap();
        sql_insert(&sql, &channel, &ada_id, "committed").await;
        assert_eq!(collect(&mut ws, "live", 1).await[0].1, "committed");
        // A replay agrees.
        let mut replay = WsClient::connect_as(&server, Some(&ada)).await;
        replay.subscribe("r", BODIES, json!({ "c": channel, "after": first.0 })).await;
        assert_eq!(collect(&mut replay, "r", 1).await[0].1, "committed");
        replay.send(json!({ "type": "ping" })).await;
        assert_eq!(replay.recv().await["type"], "pong", "nothing else was logged");
        let logged = sql
            .query_one_raw(Statement::from_string(
                server.db.get_database_backend(),
                "SELECT count(*) AS n FROM change_log WHERE CAST(row_data AS TEXT) LIKE '%rolled back%'",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get::<i64>("", "n")
            .unwrap();
        assert_eq!(logged, 0);
    }

    async fn retention_by_age_prunes_what_was_published(server: TestServer) {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "old").await;
        server.post_message(&ada, &channel, "a").await;
        caught_up(&server).await;
        // "Older than now" at millisecond precision: a change stamped in the same
        // millisecond as the prune is not older (this raced once the write path got faster).
        tokio::time::sleep(Duration::from_millis(5)).await;
        let published = server.broker.published();
        let pruner = syncgraph::changes::Pruner::new(
            server.db.clone(),
            server.broker.clone(),
            syncgraph::changes::Retention {
                max_age: Duration::ZERO,
                max_rows: 1_000_000,
                interval: Duration::from_secs(3600),
            },
        );
        assert_eq!(pruner.prune_once().await.unwrap(), published);
        assert_eq!(syncgraph::changes::pruned_through(&server.db).await.unwrap(), published);
        let left = server
            .db
            .query_one_raw(Statement::from_string(
                server.db.get_database_backend(),
                "SELECT count(*) AS n FROM change_log",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get::<i64>("", "n")
            .unwrap();
        assert_eq!(left, 0);
        // The feed goes on after pruning.
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        ws.subscribe("1", BODIES, json!({ "c": channel })).await;
        wait_for_subscribers(&server.broker, &channel, 1).await;
        server.post_message(&ada, &channel, "b").await;
        assert_eq!(collect(&mut ws, "1", 1).await[0].1, "b");
    }

    async fn a_burst_larger_than_the_topic_buffer_costs_the_same_with_many_subscribers(server: TestServer) {
        let (ada, ada_id) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "burst").await;
        let burst = |n: usize, tag: &str| match server.backend {
            Backend::Postgres => format!(
                "INSERT INTO messages (channel_id, author_id, body) \
                 SELECT {channel}, {ada_id}, '{tag} ' || i FROM generate_series(1, {n}) AS i"
            ),
            Backend::Sqlite => format!(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {n}) \
                 INSERT INTO messages (channel_id, author_id, body) SELECT {channel}, {ada_id}, '{tag} ' || i FROM n"
            ),
        };
        let n = syncgraph::pubsub::TOPIC_CAPACITY + 500;
        let sql = server.sql().await;
        let mut costs = Vec::new();
        for (round, subscribers) in [(0, 1usize), (1, 20)] {
            caught_up(&server).await;
            let mut sockets = Vec::new();
            for _ in 0..subscribers {
                let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
                ws.subscribe("s", MESSAGE_EVENTS, json!({ "c": channel })).await;
                sockets.push(ws);
            }
            wait_for_streams(&server.broker, subscribers).await;
            let before = server.statements.get();
            sql.execute_unprepared(&burst(n, &format!("r{round}"))).await.unwrap();
            for ws in &mut sockets {
                for i in 1..=n {
                    let payload = ws.next_payload("s").await;
                    assert_eq!(event(&payload)["message"]["body"], format!("r{round} {i}"));
                    assert_eq!(event(&payload)["message"]["author"]["name"], "Ada");
                }
            }
            costs.push(server.statements.get() - before);
            for ws in sockets {
                ws.close().await;
            }
            let deadline = tokio::time::Instant::now() + crate::helpers::TIMEOUT;
            while server.broker.streaming_count() > 0 {
                assert!(tokio::time::Instant::now() < deadline, "subscriptions end");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        // Lagging subscribers catch up from the broker's memory, sharing each event's author
        // lookup: twenty cost what one costs (one lookup per change).
        assert_eq!(costs[0], costs[1], "statements for 1 and 20 subscribers");
        assert!(costs[1] <= n as u64, "{} statements for {n} changes", costs[1]);
    }

    async fn a_client_that_stops_reading_cannot_freeze_its_connection(server: TestServer) {
        let (ada, ada_id) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "stalled").await;
        caught_up(&server).await;
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        ws.subscribe("1", BODIES, json!({ "c": channel })).await;
        wait_for_subscribers(&server.broker, &channel, 1).await;
        // About 6 MB the client does not read: more than the socket buffers and the server's
        // queue hold, so the server's writes back up.
        let bulk = match server.backend {
            Backend::Postgres => format!(
                "INSERT INTO messages (channel_id, author_id, body) \
                 SELECT {channel}, {ada_id}, repeat('x', 2000) FROM generate_series(1, 3000)"
            ),
            Backend::Sqlite => format!(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000) \
                 INSERT INTO messages (channel_id, author_id, body) \
                 SELECT {channel}, {ada_id}, printf('%.2000c', 'x') FROM n"
            ),
        };
        server.sql().await.execute_unprepared(&bulk).await.unwrap();
        caught_up(&server).await;
        // Let keep-alive pings fall due (every second on test servers) while nothing is read.
        // Correctness does not depend on this pause; it only gives the old failure a chance.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        // The connection still reads the client's frames: `complete` ends the operation.
        ws.complete("1").await;
        wait_for_subscribers_at_most(&server, &channel, 0).await;
    }
}

/// Postgres only: the LISTEN connection is killed while writes go on; the tailer re-reads
/// after reconnecting and nothing is lost. The fallback poll is set to a minute, so only the
/// doorbell (NOTIFY, and the ring after reconnecting) can deliver in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs SYNCGRAPH_TEST_POSTGRES (a PostgreSQL server URL)"
)]
async fn killing_the_listen_connection_loses_nothing_postgres() {
    let slow_poll: fn(&mut syncgraph::Config) = |config| config.poll_ms = 60_000;
    run_with(Backend::Postgres, slow_poll, |server: TestServer| async move {
        let (ada, ada_id) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "killed").await;
        caught_up(&server).await;
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        ws.subscribe("1", BODIES, json!({ "c": channel })).await;
        wait_for_subscribers(&server.broker, &channel, 1).await;
        let sql = server.sql().await;
        let listener_pids = "SELECT pid FROM pg_stat_activity WHERE application_name = 'syncgraph-listener' AND datname = current_database()";
        let pids = |rows: Vec<sea_orm::QueryResult>| -> Vec<i32> {
            rows.iter().map(|r| r.try_get::<i32>("", "pid").unwrap()).collect()
        };
        let before = pids(sql.query_all_raw(Statement::from_string(sea_orm::DatabaseBackend::Postgres, listener_pids)).await.unwrap());
        assert_eq!(before.len(), 1, "one LISTEN connection");
        for i in 0..30 {
            if i == 10 {
                sql.execute_unprepared(&format!("SELECT pg_terminate_backend({})", before[0])).await.unwrap();
            }
            sql_insert(&sql, &channel, &ada_id, &format!("n{i}")).await;
        }
        let events = collect(&mut ws, "1", 30).await;
        let expected: Vec<String> = (0..30).map(|i| format!("n{i}")).collect();
        assert_eq!(events.iter().map(|(_, b)| b.clone()).collect::<Vec<_>>(), expected);
        // A new LISTEN connection took over.
        let deadline = tokio::time::Instant::now() + crate::helpers::TIMEOUT;
        loop {
            let now = pids(sql.query_all_raw(Statement::from_string(sea_orm::DatabaseBackend::Postgres, listener_pids)).await.unwrap());
            if now.len() == 1 && now != before {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the listener reconnects");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// PostgreSQL: the server's own commits do not NOTIFY inside their transactions (the trigger
/// skips connections marked `syncgraph.writer`); the writing process announces them after
/// they commit, with the payload `syncgraph`. Any other writer's trigger still NOTIFYs. With
/// a one-minute fallback poll on both processes only a wake-up can deliver within the
/// receive deadline (15 s): an API write on one process and a SQL write each reach a
/// subscriber on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs SYNCGRAPH_TEST_POSTGRES (a PostgreSQL server URL)"
)]
async fn other_processes_are_woken_by_api_and_sql_writes_postgres() {
    use sea_orm::sqlx::postgres::PgListener;
    let slow_poll: fn(&mut syncgraph::Config) = |config| config.poll_ms = 60_000;
    run_with(
        Backend::Postgres,
        slow_poll,
        move |server: TestServer| async move {
            let (ada, ada_id) = server.sign_up("Ada").await;
            let channel = server.create_channel(&ada, "woken").await;
            let peer = server.start_peer_with(Some("test-secret"), slow_poll).await;
            let mut ws = WsClient::connect_to(peer.addr, Some(&ada)).await;
            ws.subscribe("1", BODIES, json!({ "c": channel })).await;
            wait_for_subscribers(&peer.broker, &channel, 1).await;
            // Who notifies: a LISTEN of the test's own.
            let mut listener = PgListener::connect(&server.database_url).await.unwrap();
            listener.listen("change_log").await.unwrap();
            // What it heard until it has been quiet for a while.
            async fn heard(listener: &mut PgListener) -> Vec<String> {
                let mut payloads = Vec::new();
                while let Ok(notification) =
                    tokio::time::timeout(Duration::from_millis(500), listener.recv()).await
                {
                    payloads.push(notification.unwrap().payload().to_owned());
                }
                payloads
            }

            let started = std::time::Instant::now();
            server.post_message(&ada, &channel, "via api").await;
            assert_eq!(collect(&mut ws, "1", 1).await[0].1, "via api");
            println!(
                "an API write reached the other process in {:?}",
                started.elapsed()
            );
            let payloads = heard(&mut listener).await;
            assert!(
                !payloads.is_empty(),
                "the writing process announced its commit"
            );
            assert!(
                payloads.iter().all(|payload| payload == "syncgraph"),
                "no NOTIFY from the trigger in the server's own transaction: {payloads:?}"
            );

            let started = std::time::Instant::now();
            sql_insert(&server.sql().await, &channel, &ada_id, "via sql").await;
            assert_eq!(collect(&mut ws, "1", 1).await[0].1, "via sql");
            println!("a SQL write reached the server in {:?}", started.elapsed());
            let payloads = heard(&mut listener).await;
            assert!(
                payloads.iter().any(String::is_empty),
                "the trigger NOTIFYs for other writers: {payloads:?}"
            );
            ws.close().await;
            peer.stop().await;
        },
    )
    .await;
}

/// PostgreSQL: a write that commits while its process shuts down gracefully (a request in
/// flight is let finish) is still announced to the other processes: announcing stops only
/// once every request has ended. The writer's post waits on a lock until its process is
/// stopping; the subscriber's process polls once a minute, so only the announcement can
/// deliver it within the receive deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs SYNCGRAPH_TEST_POSTGRES (a PostgreSQL server URL)"
)]
async fn a_write_committed_during_a_graceful_shutdown_is_announced_postgres() {
    fn slow_poll(config: &mut syncgraph::Config) {
        config.poll_ms = 60_000;
    }
    run_with(Backend::Postgres, slow_poll, |server: TestServer| async move {
        let (ada, _) = server.sign_up("Ada").await;
        let channel = server.create_channel(&ada, "last words").await;
        let mut ws = WsClient::connect_as(&server, Some(&ada)).await;
        ws.subscribe("1", BODIES, json!({ "c": channel })).await;
        wait_for_subscribers(&server.broker, &channel, 1).await;
        let writer = server.start_peer_with(Some("test-secret"), slow_poll).await;
        // The post's foreign-key check waits for this lock on the channel's row.
        let sql = server.sql().await;
        let lock = sql.begin().await.unwrap();
        lock.execute_unprepared(&format!("SELECT id FROM channels WHERE id = {channel} FOR UPDATE"))
            .await
            .unwrap();
        let post = {
            let url = format!("http://{}/graphql", writer.addr);
            let (token, channel) = (ada.clone(), channel.clone());
            tokio::spawn(async move {
                reqwest::Client::new()
                    .post(url)
                    .bearer_auth(token)
                    .json(&json!({
                        "query": "mutation($c: ID!) { postMessage(input: { channelId: $c, body: \"during shutdown\" }) { id } }",
                        "variables": { "c": channel },
                    }))
                    .timeout(crate::helpers::TIMEOUT)
                    .send()
                    .await
                    .unwrap()
                    .json::<serde_json::Value>()
                    .await
                    .unwrap()
            })
        };
        crate::concurrency::wait_for_lock_waiters(&sql, 1, "the post").await;
        // The writer starts its graceful shutdown, then the post commits.
        let stopping = tokio::spawn(writer.stop());
        tokio::time::sleep(Duration::from_millis(200)).await;
        lock.commit().await.unwrap();
        let answered = tokio::time::timeout(crate::helpers::TIMEOUT, post).await.unwrap().unwrap();
        assert!(answered.get("errors").is_none(), "{answered}");
        assert_eq!(collect(&mut ws, "1", 1).await[0].1, "during shutdown");
        tokio::time::timeout(crate::helpers::TIMEOUT, stopping).await.unwrap().unwrap();
    })
    .await;
}
