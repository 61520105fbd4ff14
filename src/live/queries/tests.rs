//! The engine alone: no database, no socket (an in-memory table stands in; the API's
//! tests in `tests/api/live_queries.rs` run it on SQLite and PostgreSQL).

use super::*;
use crate::pubsub::{Memo, Op};
use crate::store::reads::Table;
use serde_json::json;

/// A table of channel names in memory, standing in for the database: the engine is
/// tested alone here; `tests/api/live_queries.rs` runs it against SQLite and PostgreSQL.
#[derive(Default)]
struct Names {
    rows: Mutex<HashMap<i64, String>>,
    runs: AtomicU64,
    /// Held by a test to keep executions waiting.
    gate: tokio::sync::RwLock<()>,
}

fn engine(broker: &Arc<Broker>, names: &Arc<Names>) -> LiveQueries<i64, &'static str> {
    let names = names.clone();
    let broker_for_cursor = broker.clone();
    LiveQueries::new(
        broker.clone(),
        Box::new(move |channel: i64| {
            let names = names.clone();
            let broker = broker_for_cursor.clone();
            Box::pin(async move {
                let cursor = broker.published();
                let _open = names.gate.read().await;
                names.runs.fetch_add(1, Ordering::SeqCst);
                if channel == -1 {
                    return Outcome::Final("refused");
                }
                if channel == 0 && names.runs.load(Ordering::SeqCst) == 1 {
                    return Outcome::Retry("failed");
                }
                if channel == -2 {
                    return Outcome::Retry("failing");
                }
                let name = names.rows.lock().unwrap().get(&channel).cloned();
                Outcome::Result {
                    data: json!({ "channel": name.map(|n| json!({ "name": n })) }),
                    errors: None,
                    reads: [ReadKey::Row(Table::Channels, channel)].into(),
                    cursor,
                }
            })
        }),
        4,
        |position| format!("c{position}"),
    )
}

fn rename(broker: &Broker, names: &Names, channel: i64, name: &str) {
    names.rows.lock().unwrap().insert(channel, name.to_owned());
    let position = broker.published() + 1;
    broker.publish(
        vec![Arc::new(ChangeEvent {
            position,
            table: "channels".into(),
            op: Op::Update,
            row_id: channel,
            scope: Some(channel),
            row: Value::Null,
            memo: Memo::default(),
        })],
        position,
    );
}

async fn next_json(member: &mut Member<i64, &'static str>) -> Value {
    match tokio::time::timeout(Duration::from_secs(5), member.next()).await {
        Ok(Some(Payload::Json { text, .. })) => serde_json::from_str(&text).unwrap(),
        Ok(Some(Payload::Final(f))) => panic!("final {f}"),
        Ok(None) => panic!("ended"),
        Err(_) => panic!("no payload within 5 s"),
    }
}

async fn quiet(member: &mut Member<i64, &'static str>) {
    assert!(
        tokio::time::timeout(Duration::from_millis(200), member.next())
            .await
            .is_err(),
        "expected nothing"
    );
}

fn start(broker: &Arc<Broker>, names: &Arc<Names>) -> (LiveQueries<i64, &'static str>, ()) {
    let live = engine(broker, names);
    tokio::spawn(live.clone().run(broker.subscribe_all()));
    (live, ())
}

#[tokio::test]
async fn a_touching_change_patches_and_others_do_nothing() {
    let broker = Arc::new(Broker::new(0));
    let names = Arc::new(Names::default());
    names.rows.lock().unwrap().insert(1, "one".into());
    let (live, _stop) = start(&broker, &names);
    let mut member = live.join(1, Duration::ZERO);
    let first = next_json(&mut member).await;
    assert_eq!(first["data"], json!({ "channel": { "name": "one" } }));
    assert_eq!(first["revision"], 1);
    assert_eq!(first["extensions"]["cursor"], "c0");

    rename(&broker, &names, 2, "other");
    quiet(&mut member).await;
    assert_eq!(
        names.runs.load(Ordering::SeqCst),
        1,
        "channel 2 was not read"
    );

    rename(&broker, &names, 1, "uno");
    let patch = next_json(&mut member).await;
    assert_eq!(patch["revision"], 2);
    assert_eq!(
        patch["patch"],
        json!([{ "op": "replace", "path": "/channel/name", "value": "uno" }])
    );
    assert_eq!(patch["extensions"]["cursor"], "c2");

    // The same state again changes nothing: it runs, and sends nothing.
    rename(&broker, &names, 1, "uno");
    quiet(&mut member).await;
    assert_eq!(names.runs.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_cohort_runs_once_for_its_members_and_changes_fold() {
    let broker = Arc::new(Broker::new(0));
    let names = Arc::new(Names::default());
    names.rows.lock().unwrap().insert(1, "one".into());
    let (live, _stop) = start(&broker, &names);
    let mut a = live.join(1, Duration::ZERO);
    next_json(&mut a).await;
    let mut b = live.join(1, Duration::ZERO);
    assert_eq!(
        next_json(&mut b).await["revision"],
        1,
        "a late member starts at 1"
    );
    assert_eq!(live.cohorts(), 1);
    assert_eq!(names.runs.load(Ordering::SeqCst), 1);

    // Three changes while an execution waits: they fold into at most one more.
    let gate = names.gate.write().await;
    rename(&broker, &names, 1, "a");
    tokio::time::sleep(Duration::from_millis(50)).await;
    rename(&broker, &names, 1, "b");
    rename(&broker, &names, 1, "c");
    drop(gate);
    let mut last = Value::Null;
    while last.is_null() || last["patch"][0]["value"] != "c" {
        last = next_json(&mut a).await;
    }
    let b_last = next_json(&mut b).await;
    assert!(names.runs.load(Ordering::SeqCst) <= 3, "folded");
    // A member that was behind gets the missed patches in one payload.
    assert_eq!(b_last["revision"], 2);
    assert_eq!(
        b_last["patch"].as_array().unwrap().last().unwrap()["value"],
        "c"
    );
    drop(a);
    drop(b);
    assert_eq!(live.cohorts(), 0, "the last member frees the cohort");
}

#[tokio::test]
async fn throttle_spaces_executions_and_the_last_state_wins() {
    let broker = Arc::new(Broker::new(0));
    let names = Arc::new(Names::default());
    names.rows.lock().unwrap().insert(1, "one".into());
    let (live, _stop) = start(&broker, &names);
    let mut member = live.join(1, Duration::from_millis(300));
    next_json(&mut member).await;
    let started = std::time::Instant::now();
    for name in ["a", "b", "c", "d"] {
        rename(&broker, &names, 1, name);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let patch = next_json(&mut member).await;
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(patch["patch"][0]["value"], "d");
    assert_eq!(names.runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_member_far_behind_gets_the_patches_joined_or_the_whole_result() {
    let broker = Arc::new(Broker::new(0));
    let names = Arc::new(Names::default());
    names.rows.lock().unwrap().insert(1, "v0".into());
    let (live, _) = start(&broker, &names);
    let mut fast = live.join(1, Duration::ZERO);
    let mut slow = live.join(1, Duration::ZERO);
    let mut slow_result = next_json(&mut slow).await["data"].clone();
    let mut fast_result = next_json(&mut fast).await["data"].clone();
    for round in [3, PATCH_HISTORY + 2] {
        for n in 0..round {
            rename(&broker, &names, 1, &format!("r{round}-{n}"));
            // The fast member reads each state, so every one is published.
            let patch = next_json(&mut fast).await;
            let patch: json_patch::Patch = serde_json::from_value(patch["patch"].clone()).unwrap();
            json_patch::patch(&mut fast_result, &patch).unwrap();
        }
        let caught_up = next_json(&mut slow).await;
        let operations = caught_up["patch"].as_array().unwrap().clone();
        if round <= PATCH_HISTORY {
            assert_eq!(operations.len(), round, "{caught_up}");
        } else {
            assert_eq!(operations.len(), 1, "{caught_up}");
            assert_eq!(operations[0]["path"], "", "the whole result: {caught_up}");
        }
        let patch: json_patch::Patch = serde_json::from_value(caught_up["patch"].clone()).unwrap();
        json_patch::patch(&mut slow_result, &patch).unwrap();
        assert_eq!(slow_result, fast_result);
    }
}

#[tokio::test]
async fn members_in_step_share_one_payload_text() {
    let broker = Arc::new(Broker::new(0));
    let names = Arc::new(Names::default());
    names.rows.lock().unwrap().insert(1, "one".into());
    let (live, _) = start(&broker, &names);
    let mut members: Vec<_> = (0..3).map(|_| live.join(1, Duration::ZERO)).collect();
    let mut texts = Vec::new();
    for member in &mut members {
        match tokio::time::timeout(Duration::from_secs(5), member.next()).await {
            Ok(Some(Payload::Json { text, .. })) => texts.push(text),
            _ => panic!("a first payload"),
        }
    }
    assert!(
        texts.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])),
        "one text for all"
    );
    rename(&broker, &names, 1, "two");
    texts.clear();
    for member in &mut members {
        match tokio::time::timeout(Duration::from_secs(5), member.next()).await {
            Ok(Some(Payload::Json { text, .. })) => texts.push(text),
            _ => panic!("a patch"),
        }
    }
    assert!(
        texts.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])),
        "one patch text for all"
    );
    assert!(texts[0].contains("\"revision\":2"));
}

#[tokio::test]
async fn a_throttled_runner_ends_with_its_cohort() {
    let broker = Arc::new(Broker::new(0));
    let names = Arc::new(Names::default());
    names.rows.lock().unwrap().insert(1, "one".into());
    let (live, _) = start(&broker, &names);
    let mut member = live.join(1, Duration::from_secs(60));
    next_json(&mut member).await;
    rename(&broker, &names, 1, "two");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while live.runners() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "a runner waits out the throttle"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(member);
    while live.runners() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the runner ends with its cohort"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(live.cohorts(), 0);
    // A new member of the same key gets a new cohort, and it runs.
    let mut again = live.join(1, Duration::ZERO);
    assert_eq!(
        next_json(&mut again).await["data"]["channel"]["name"],
        "two"
    );
}

#[tokio::test]
async fn a_failed_execution_is_retried_not_published() {
    let broker = Arc::new(Broker::new(0));
    let names = Arc::new(Names::default());
    names.rows.lock().unwrap().insert(0, "zero".into());
    let (live, _) = start(&broker, &names);
    let started = std::time::Instant::now();
    let mut member = live.join(0, Duration::ZERO);
    let first = next_json(&mut member).await;
    assert_eq!(first["revision"], 1);
    assert_eq!(first["data"]["channel"]["name"], "zero");
    assert!(
        started.elapsed() >= RETRY_AFTER / 2,
        "it waited before trying again"
    );
    assert_eq!(names.runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_cohort_that_keeps_failing_ends_with_the_last_errors() {
    let broker = Arc::new(Broker::new(0));
    let names = Arc::new(Names::default());
    let (live, _) = start(&broker, &names);
    live.inner.retry_after_ms.store(10, Ordering::Relaxed);
    let mut member = live.join(-2, Duration::ZERO);
    match tokio::time::timeout(Duration::from_secs(60), member.next()).await {
        Ok(Some(Payload::Final(last))) => assert_eq!(last, "failing"),
        _ => panic!("expected the final payload"),
    }
    assert_eq!(names.runs.load(Ordering::SeqCst), RETRIES as u64);
    assert_eq!(live.cohorts(), 0);
}

#[tokio::test]
async fn members_end_when_the_feed_closes() {
    let broker = Arc::new(Broker::new(0));
    let names = Arc::new(Names::default());
    names.rows.lock().unwrap().insert(1, "one".into());
    let (live, _) = start(&broker, &names);
    let mut member = live.join(1, Duration::ZERO);
    next_json(&mut member).await;
    broker.close();
    let ended = tokio::time::timeout(Duration::from_secs(5), member.next()).await;
    assert!(matches!(ended, Ok(None)), "the stream ends at shutdown");
}

#[tokio::test]
async fn a_final_outcome_ends_every_member() {
    let broker = Arc::new(Broker::new(0));
    let names = Arc::new(Names::default());
    let (live, _stop) = start(&broker, &names);
    let mut member = live.join(-1, Duration::ZERO);
    match tokio::time::timeout(Duration::from_secs(5), member.next()).await {
        Ok(Some(Payload::Final(last))) => assert_eq!(last, "refused"),
        _ => panic!("expected the final payload"),
    }
    assert!(member.next().await.is_none());
    assert_eq!(live.cohorts(), 0);
}

#[tokio::test]
async fn a_change_during_the_first_execution_is_not_missed() {
    let broker = Arc::new(Broker::new(0));
    let names = Arc::new(Names::default());
    names.rows.lock().unwrap().insert(1, "one".into());
    let (live, _stop) = start(&broker, &names);
    // The execution takes its cursor, then waits; meanwhile the change is published
    // and matched before the cohort's read set is indexed.
    let gate = names.gate.write().await;
    let mut member = live.join(1, Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(50)).await;
    names.rows.lock().unwrap().insert(1, "late".into());
    rename(&broker, &names, 1, "late");
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(gate);
    let mut seen = next_json(&mut member).await;
    // Either the first result already holds it (and a second run changes nothing), or a
    // patch brings it.
    if seen["data"]["channel"]["name"] != "late" {
        seen = next_json(&mut member).await;
        assert_eq!(seen["patch"][0]["value"], "late");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while names.runs.load(Ordering::SeqCst) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "it runs again in time"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
