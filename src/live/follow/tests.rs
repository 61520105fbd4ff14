//! The follower alone: live events, revocation, ends, catching up, replay, a first event.

use super::*;
use crate::live::SubscriptionQuota;
use crate::pubsub::{Memo, TOPIC_CAPACITY};
use sea_orm::ConnectionTrait;

const MESSAGES: Filter = Filter::table("messages");

/// A migrated SQLite database with user 1 in channel 7.
pub(crate) async fn database() -> (tempfile::TempDir, DatabaseConnection) {
    let (dir, db, _) = crate::db::test_database().await;
    (dir, db)
}

pub(crate) fn event(
    position: i64,
    table: &str,
    op: Op,
    row_id: i64,
    row: serde_json::Value,
) -> Arc<ChangeEvent> {
    Arc::new(ChangeEvent {
        position,
        table: table.to_owned(),
        op,
        row_id,
        scope: Some(7),
        row,
        memo: Memo::default(),
    })
}

pub(crate) fn message(position: i64, id: i64) -> Arc<ChangeEvent> {
    event(
        position,
        "messages",
        Op::Insert,
        id,
        serde_json::json!({ "id": id }),
    )
}

pub(crate) fn removal(position: i64, user_id: i64) -> Arc<ChangeEvent> {
    let row = serde_json::json!({ "channel_id": 7, "user_id": user_id, "created_at": "2026-12-04T00:00:00Z" });
    event(position, "channel_members", Op::Delete, user_id, row)
}

/// The next item within a second (a missing event fails instead of hanging).
async fn next(follower: &mut Follower) -> Option<Next> {
    tokio::time::timeout(std::time::Duration::from_secs(1), follower.next())
        .await
        .expect("an item in time")
}

fn position(next: Option<Next>) -> i64 {
    match next {
        Some(Next::Event(event)) => event.position,
        Some(Next::Error(err)) => panic!("an error: {err}"),
        Some(Next::Live) => panic!("handed off"),
        None => panic!("the end"),
    }
}

fn follower(
    broker: &Arc<Broker>,
    db: &DatabaseConnection,
    after: Option<i64>,
    filter: Filter,
) -> Follower {
    let slot = SubscriptionQuota::new(10).acquire(1).expect("a slot");
    Opening::new(broker, 7).follow(db.clone(), 1, after, filter, slot)
}

#[tokio::test]
async fn live_events_pass_the_filter_in_order_and_a_removal_of_the_viewer_revokes() {
    let (_dir, db) = database().await;
    let broker = Arc::new(Broker::new(0));
    let mut all = follower(&broker, &db, None, MESSAGES);
    let mut one = follower(&broker, &db, None, Filter::row("messages", 2));
    let other = event(3, "documents", Op::Insert, 1, serde_json::json!({}));
    broker.publish(vec![message(1, 1), message(2, 2), other, removal(4, 99)], 4);
    assert_eq!(position(next(&mut all).await), 1);
    assert_eq!(position(next(&mut all).await), 2);
    assert_eq!(position(next(&mut one).await), 2, "only its row");
    // Someone else's removal is no revocation; the viewer's is, before any later event.
    broker.publish(vec![removal(5, 1), message(6, 3)], 6);
    assert!(matches!(
        next(&mut all).await,
        Some(Next::Error(LiveError::Revoked))
    ));
    assert!(next(&mut all).await.is_none(), "it ended");
    assert_eq!(broker.streaming_count(), 2);
    drop(all);
    assert_eq!(broker.streaming_count(), 1, "the other still streams");
}

#[tokio::test]
async fn a_followed_rows_deletion_is_delivered_then_ends_and_the_channels_deletion_ends() {
    let (_dir, db) = database().await;
    let broker = Arc::new(Broker::new(0));
    let mut document = follower(&broker, &db, None, Filter::row("documents", 5));
    let mut messages = follower(&broker, &db, None, MESSAGES);
    broker.publish(
        vec![
            event(1, "documents", Op::Delete, 5, serde_json::json!({})),
            event(2, "channels", Op::Delete, 7, serde_json::json!({})),
            message(3, 1),
        ],
        3,
    );
    assert_eq!(position(next(&mut document).await), 1);
    assert!(next(&mut document).await.is_none());
    assert!(next(&mut messages).await.is_none(), "the channel is gone");
}

#[tokio::test]
async fn a_first_event_comes_first_then_only_later_versions_until_the_document_is_deleted() {
    let (_dir, db) = database().await;
    let broker = Arc::new(Broker::new(0));
    let update = |position: i64, document: i64, version: i64| {
        let row = serde_json::json!({ "version": version, "update_data": "AAA=" });
        let table = crate::live::documents::UPDATES;
        event(position, table, Op::Insert, document, row)
    };
    let first = crate::live::documents::first_event(5, 7, 2, "AAA=".into(), 2);
    let mut feed =
        follower(&broker, &db, None, crate::live::documents::filter(5)).starting_with(first, 2);
    broker.publish(
        vec![
            update(1, 5, 1),
            update(2, 5, 2),
            update(3, 5, 3),
            update(4, 6, 1),
            event(5, "documents", Op::Update, 5, serde_json::json!({})),
            update(6, 5, 4),
            event(7, "documents", Op::Delete, 5, serde_json::json!({})),
            update(8, 5, 5),
        ],
        8,
    );
    assert_eq!(position(next(&mut feed).await), 2, "the first event");
    assert_eq!(
        position(next(&mut feed).await),
        3,
        "versions 1 and 2 are in it"
    );
    assert_eq!(position(next(&mut feed).await), 6, "not another document's");
    assert!(
        next(&mut feed).await.is_none(),
        "the deletion ends it, undelivered"
    );
}

#[tokio::test]
async fn a_follower_behind_the_topics_buffer_catches_up_from_memory_without_gap_or_duplicate() {
    let (_dir, db) = database().await;
    let broker = Arc::new(Broker::new(0));
    let mut slow = follower(&broker, &db, None, MESSAGES);
    let burst = (TOPIC_CAPACITY + 100) as i64;
    for position in 1..=burst {
        broker.publish(vec![message(position, position)], position);
    }
    for expected in 1..=burst {
        assert_eq!(position(next(&mut slow).await), expected);
    }
    assert_eq!(
        broker
            .stats
            .lagged
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        broker
            .stats
            .log_replays
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test]
async fn a_cursor_replays_the_log_then_continues_live() {
    let (_dir, db) = database().await;
    for body in ["one", "two", "three"] {
        db.execute_unprepared(&format!(
            "INSERT INTO messages (channel_id, author_id, body) VALUES (7, 1, '{body}')"
        ))
        .await
        .expect("insert");
    }
    let published = changes::read_scope(&db, 7, 0, i64::MAX, 100)
        .await
        .expect("log");
    let last = published.last().expect("logged").position;
    // A broker that starts after the writes: its memory does not cover them.
    let broker = Arc::new(Broker::new(last));
    let first_message = published
        .iter()
        .find(|event| event.table == "messages")
        .expect("a message")
        .position;
    Opening::check_cursor(&db, first_message)
        .await
        .expect("within retention");
    let mut resumed = follower(&broker, &db, Some(first_message), MESSAGES);
    let replayed: Vec<i64> = published
        .iter()
        .filter(|event| event.table == "messages" && event.position > first_message)
        .map(|event| event.position)
        .collect();
    assert_eq!(replayed.len(), 2);
    for expected in replayed {
        assert_eq!(position(next(&mut resumed).await), expected);
    }
    assert_eq!(
        broker
            .stats
            .log_replays
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    broker.publish(vec![message(last + 1, 9)], last + 1);
    assert_eq!(position(next(&mut resumed).await), last + 1);
}

#[tokio::test]
async fn a_pruned_cursor_is_expired() {
    let (_dir, db) = database().await;
    db.execute_unprepared("UPDATE change_log_state SET pruned_through = 10")
        .await
        .expect("prune mark");
    assert!(matches!(
        Opening::check_cursor(&db, 9).await,
        Err(LiveError::CursorExpired)
    ));
    Opening::check_cursor(&db, 10)
        .await
        .expect("at the mark is fine");
}
