//! The cohorts alone: a broker, a SQLite file for catching up, a render that counts, and
//! inboxes read directly. No socket, no server, no GraphQL.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::*;
use crate::live::follow::tests::{database, message, removal};
use crate::live::{Filter, Follower, Next, Opening, SubscriptionQuota};

const MESSAGES: Filter = Filter::table("messages");

/// Renders an event as `{"p":<position>,"shape":<name>}` and counts its renders.
struct Counting {
    name: &'static str,
    renders: AtomicU64,
}

impl Counting {
    fn shape(name: &'static str) -> Arc<Counting> {
        Arc::new(Counting {
            name,
            renders: AtomicU64::new(0),
        })
    }

    fn renders(&self) -> u64 {
        self.renders.load(Ordering::Relaxed)
    }
}

impl Render for Counting {
    fn render(self: Arc<Self>, event: Arc<ChangeEvent>) -> BoxFuture<'static, Arc<Rendered>> {
        self.renders.fetch_add(1, Ordering::Relaxed);
        let json = format!(r#"{{"p":{},"shape":"{}"}}"#, event.position, self.name);
        Box::pin(async move {
            Arc::new(Rendered {
                json: Some(json.into()),
                codes: Vec::new(),
            })
        })
    }

    fn render_error(self: Arc<Self>, error: LiveError) -> BoxFuture<'static, Arc<Rendered>> {
        let json = format!(r#"{{"error":"{error}"}}"#);
        Box::pin(async move {
            Arc::new(Rendered {
                json: Some(json.into()),
                codes: vec!["FORBIDDEN".into()],
            })
        })
    }
}

/// What an inbox received, simplified: `(key, position)` for an event, `(key, -1)` for an
/// error, `(key, -2)` for an end, `(key, -3)` for a member sent behind.
type Seen = (u64, i64);

fn simplify(delivery: &Delivery) -> Seen {
    match delivery {
        Delivery::Render { key, position, .. } => (*key, position.unwrap_or(-1)),
        Delivery::End { key } => (*key, -2),
        Delivery::Behind(member) => (member.key, -3),
    }
}

/// A migrated SQLite database (user 1 in channel 7), a broker and the cohorts over them.
async fn setup() -> (
    tempfile::TempDir,
    DatabaseConnection,
    Arc<Broker>,
    Arc<Cohorts>,
) {
    let (dir, db) = database().await;
    let broker = Arc::new(Broker::new(0));
    let cohorts = Cohorts::new(broker.clone(), db.clone());
    (dir, db, broker, cohorts)
}

/// The positions `key` received (-1 an error, -2 its end), in order.
fn positions_of(got: &[Seen], key: u64) -> Vec<i64> {
    got.iter()
        .filter(|(k, _)| *k == key)
        .map(|(_, p)| *p)
        .collect()
}

/// Takes deliveries from `inbox` until `n` have come, within two seconds.
async fn take(inbox: &Inbox, n: usize) -> Vec<Delivery> {
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), async {
        while all.len() < n {
            inbox.take(n - all.len(), &mut all);
            if all.len() < n {
                inbox.ready().await;
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        let got: Vec<Seen> = all.iter().map(simplify).collect();
        panic!("{n} deliveries expected in time, got {got:?}")
    });
    all
}

/// Gives the driver time to act, then checks that nothing more came.
async fn nothing_more(inbox: &Inbox) {
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut rest = Vec::new();
    inbox.take(usize::MAX, &mut rest);
    let rest: Vec<Seen> = rest.iter().map(simplify).collect();
    assert!(rest.is_empty(), "unexpected deliveries: {rest:?}");
}

/// Waits until `check` holds (two seconds at most).
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `viewer`'s caught-up subscription to channel 7 (after `after`), as a member.
async fn member(
    broker: &Arc<Broker>,
    db: &DatabaseConnection,
    viewer: i64,
    after: Option<i64>,
    key: u64,
    inbox: &Arc<Inbox>,
    shape: Shape,
) -> Member {
    let slot = SubscriptionQuota::new(100).acquire(viewer).expect("a slot");
    let mut follower = Opening::new(broker, 7)
        .follow(db.clone(), viewer, after, MESSAGES, slot)
        .hand_off_when_live();
    let next = tokio::time::timeout(Duration::from_secs(1), follower.next()).await;
    assert!(matches!(next, Ok(Some(Next::Live))), "caught up at once");
    Member::new(key, inbox.clone(), shape, follower.into_state())
}

#[tokio::test]
async fn each_event_is_rendered_once_per_shape_and_reaches_every_member_in_order() {
    let (_dir, db, broker, cohorts) = setup().await;
    let (a, b) = (Counting::shape("a"), Counting::shape("b"));
    let (first, second) = (Inbox::new(), Inbox::new());
    for (key, inbox, shape) in [
        (1, &first, a.clone() as Shape),
        (2, &first, b.clone()),
        (3, &second, a.clone()),
        (4, &first, a.clone()),
    ] {
        cohorts.join(member(&broker, &db, 1, None, key, inbox, shape).await);
    }
    assert_eq!(cohorts.topic_count(), 1, "one driver");
    broker.publish(vec![message(1, 1), message(2, 2)], 2);
    broker.publish(vec![message(3, 3)], 3);
    let got: Vec<Seen> = take(&first, 9).await.iter().map(simplify).collect();
    for key in [1, 2, 4] {
        let positions = positions_of(&got, key);
        assert_eq!(positions, [1, 2, 3], "member {key}");
    }
    let got: Vec<Seen> = take(&second, 3).await.iter().map(simplify).collect();
    assert_eq!(got, [(3, 1), (3, 2), (3, 3)]);
    // One render per event and shape, however many members.
    assert_eq!((a.renders(), b.renders()), (3, 3));
    // The members of shape a share one text per event.
    let mut texts = take_texts(&broker, &first, &second, 4).await;
    texts.dedup();
    assert_eq!(texts.len(), 1, "one shared rendering");
    nothing_more(&first).await;
}

/// Publishes one more event and returns the rendering pointers shape a's three members got.
async fn take_texts(
    broker: &Arc<Broker>,
    first: &Inbox,
    second: &Inbox,
    position: i64,
) -> Vec<usize> {
    broker.publish(vec![message(position, position)], position);
    let mut all = take(first, 3).await;
    all.extend(take(second, 1).await);
    all.iter()
        .filter_map(|delivery| match delivery {
            Delivery::Render { key, rendered, .. } if *key != 2 => {
                Some(Arc::as_ptr(rendered) as *const () as usize)
            }
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_member_behind_the_driver_gets_what_it_missed_and_one_ahead_skips_what_it_has() {
    let (_dir, db, broker, cohorts) = setup().await;
    let shape = Counting::shape("a");
    let inbox = Inbox::new();
    // The driver starts with the first member, at position 0.
    cohorts.join(member(&broker, &db, 1, None, 1, &inbox, shape.clone()).await);
    assert_eq!(cohorts.topic_count(), 1, "one driver");
    // A second member caught up at 0, joining after the driver has passed 1 and 2.
    let behind = member(&broker, &db, 1, None, 2, &inbox, shape.clone()).await;
    broker.publish(vec![message(1, 1), message(2, 2)], 2);
    let got: Vec<Seen> = take(&inbox, 2).await.iter().map(simplify).collect();
    assert_eq!(got, [(1, 1), (1, 2)]);
    cohorts.join(behind);
    // A third member that has considered everything through 3 before the driver has.
    broker.publish(vec![message(3, 3)], 3);
    let ahead = member(&broker, &db, 1, Some(3), 3, &inbox, shape.clone()).await;
    cohorts.join(ahead);
    broker.publish(vec![message(4, 4)], 4);
    let got: Vec<Seen> = take(&inbox, 7).await.iter().map(simplify).collect();
    let of = |key: u64| positions_of(&got, key);
    assert_eq!(of(1), [3, 4]);
    assert_eq!(of(2), [1, 2, 3, 4], "missed events first, none twice");
    assert_eq!(of(3), [4], "nothing it had");
    nothing_more(&inbox).await;
}

#[tokio::test]
async fn a_removal_ends_only_the_removed_viewers_members_with_their_error() {
    let (_dir, db, broker, cohorts) = setup().await;
    let shape = Counting::shape("a");
    let inbox = Inbox::new();
    cohorts.join(member(&broker, &db, 1, None, 1, &inbox, shape.clone()).await);
    cohorts.join(member(&broker, &db, 2, None, 2, &inbox, shape.clone()).await);
    assert_eq!(cohorts.topic_count(), 1, "one driver");
    broker.publish(vec![message(1, 1), removal(2, 2), message(3, 3)], 3);
    let got: Vec<Seen> = take(&inbox, 5).await.iter().map(simplify).collect();
    let of = |key: u64| positions_of(&got, key);
    assert_eq!(of(1), [1, 3]);
    assert_eq!(of(2), [1, -1, -2], "its error, then its end, nothing after");
    nothing_more(&inbox).await;
}

#[tokio::test]
async fn a_full_inbox_sends_its_members_behind_and_they_go_on_without_gap_or_duplicate() {
    let (_dir, db, broker, cohorts) = setup().await;
    let shape = Counting::shape("a");
    let (slow, fast) = (Inbox::new(), Inbox::new());
    cohorts.join(member(&broker, &db, 1, None, 1, &slow, shape.clone()).await);
    cohorts.join(member(&broker, &db, 1, None, 2, &fast, shape.clone()).await);
    assert_eq!(cohorts.topic_count(), 1, "one driver");
    let total = (INBOX_LIMIT + 500) as i64;
    let mut fast_got = Vec::new();
    for position in 1..=total {
        broker.publish(vec![message(position, position)], position);
        if position % 100 == 0 {
            // The fast inbox is read as it goes; the slow one is not read at all.
            fast_got.extend(take(&fast, 100).await.iter().map(simplify));
        }
    }
    fast_got.extend(
        take(&fast, (total % 100) as usize)
            .await
            .iter()
            .map(simplify),
    );
    let expected: Vec<Seen> = (1..=total).map(|p| (2, p)).collect();
    let differs = fast_got
        .iter()
        .zip(&expected)
        .position(|(got, want)| got != want);
    assert_eq!(
        (fast_got.len(), differs),
        (expected.len(), None),
        "the fast member is not held back (first difference at index {differs:?}: {:?})",
        differs.map(|at| fast_got[at])
    );
    // The slow inbox: the limit's worth, then the member, sent behind.
    let mut got = take(&slow, INBOX_LIMIT + 1).await;
    let Some(Delivery::Behind(behind)) = got.pop() else {
        panic!("the member is sent behind last");
    };
    let positions: Vec<i64> = got.iter().map(|d| simplify(d).1).collect();
    let delivered = positions.len() as i64;
    assert_eq!(positions, (1..=delivered).collect::<Vec<_>>());
    nothing_more(&slow).await;
    assert_eq!(broker.stats.lagged.load(Ordering::Relaxed), 1, "counted");
    // It catches up on its own from where it was, then joins again.
    let behind = *behind;
    let mut follower = Follower::resume(behind.state, &broker, db.clone());
    let mut next_position = delivered + 1;
    loop {
        match tokio::time::timeout(Duration::from_secs(1), follower.next()).await {
            Ok(Some(Next::Event(event))) => {
                assert_eq!(event.position, next_position);
                next_position += 1;
            }
            Ok(Some(Next::Live)) => break,
            _ => panic!("the follower catches up and hands off"),
        }
    }
    assert_eq!(next_position, total + 1, "caught up to the end");
    cohorts.join(Member::new(
        1,
        slow.clone(),
        behind.shape,
        follower.into_state(),
    ));
    broker.publish(vec![message(total + 1, 1)], total + 1);
    let got: Vec<Seen> = take(&slow, 1).await.iter().map(simplify).collect();
    assert_eq!(got, [(1, total + 1)]);
}

#[tokio::test]
async fn leaving_and_a_closed_inbox_remove_members_and_the_last_one_ends_the_driver() {
    let (_dir, db, broker, cohorts) = setup().await;
    let shape = Counting::shape("a");
    let (kept, closed) = (Inbox::new(), Inbox::new());
    cohorts.join(member(&broker, &db, 1, None, 1, &kept, shape.clone()).await);
    cohorts.join(member(&broker, &db, 1, None, 2, &kept, shape.clone()).await);
    cohorts.join(member(&broker, &db, 1, None, 3, &closed, shape.clone()).await);
    assert_eq!(cohorts.topic_count(), 1, "one driver");
    assert_eq!(broker.streaming_count(), 3);
    cohorts.leave(7, &kept, Some(1));
    closed.close();
    broker.publish(vec![message(1, 1)], 1);
    let got: Vec<Seen> = take(&kept, 1).await.iter().map(simplify).collect();
    assert_eq!(got, [(2, 1)], "only the member still there");
    eventually("two members gone", || broker.streaming_count() == 1).await;
    cohorts.leave(7, &kept, None);
    eventually("the driver ends", || cohorts.topic_count() == 0).await;
    assert_eq!(broker.streaming_count(), 0);
    // A later member starts a driver again.
    cohorts.join(member(&broker, &db, 1, None, 4, &kept, shape.clone()).await);
    broker.publish(vec![message(2, 2)], 2);
    let got: Vec<Seen> = take(&kept, 1).await.iter().map(simplify).collect();
    assert_eq!(got, [(4, 2)]);
}

#[tokio::test]
async fn the_channels_deletion_and_shutdown_end_every_member() {
    let (_dir, db, broker, cohorts) = setup().await;
    let shape = Counting::shape("a");
    let inbox = Inbox::new();
    cohorts.join(member(&broker, &db, 1, None, 1, &inbox, shape.clone()).await);
    assert_eq!(cohorts.topic_count(), 1, "one driver");
    let deleted = crate::live::follow::tests::event(
        1,
        "channels",
        crate::pubsub::Op::Delete,
        7,
        serde_json::json!({}),
    );
    broker.publish(vec![deleted], 1);
    let got: Vec<Seen> = take(&inbox, 1).await.iter().map(simplify).collect();
    assert_eq!(got, [(1, -2)]);
    cohorts.join(member(&broker, &db, 1, None, 2, &inbox, shape.clone()).await);
    cohorts.join(member(&broker, &db, 1, None, 3, &inbox, shape.clone()).await);
    assert_eq!(cohorts.topic_count(), 1, "a driver");
    broker.close();
    let mut got: Vec<Seen> = take(&inbox, 2).await.iter().map(simplify).collect();
    got.sort_unstable();
    assert_eq!(got, [(2, -2), (3, -2)]);
    eventually("the driver ends", || cohorts.topic_count() == 0).await;
}

#[tokio::test]
async fn a_driver_behind_its_topics_buffer_catches_up_once_for_all_its_members() {
    let (_dir, db, broker, cohorts) = setup().await;
    let shape = Counting::shape("a");
    let inbox = Inbox::new();
    cohorts.join(member(&broker, &db, 1, None, 1, &inbox, shape.clone()).await);
    cohorts.join(member(&broker, &db, 1, None, 2, &inbox, shape.clone()).await);
    assert_eq!(cohorts.topic_count(), 1, "one driver");
    // Published without giving the driver a turn: more than the topic's buffer.
    let total = (crate::pubsub::TOPIC_CAPACITY + 100) as i64;
    for position in 1..=total {
        broker.publish(vec![message(position, position)], position);
    }
    let got: Vec<Seen> = take(&inbox, 2 * total as usize)
        .await
        .iter()
        .map(simplify)
        .collect();
    for key in [1, 2] {
        let positions = positions_of(&got, key);
        assert_eq!(positions, (1..=total).collect::<Vec<_>>(), "member {key}");
    }
    assert_eq!(broker.stats.lagged.load(Ordering::Relaxed), 1, "the driver");
    assert_eq!(shape.renders(), total as u64, "each event rendered once");
    nothing_more(&inbox).await;
}

#[tokio::test]
async fn what_is_pushed_into_a_closed_inbox_is_dropped_with_its_members() {
    let (_dir, db) = database().await;
    let broker = Arc::new(Broker::new(0));
    let inbox = Inbox::new();
    let behind = member(&broker, &db, 1, None, 1, &inbox, Counting::shape("a")).await;
    assert_eq!(broker.subscriber_count(7), 1);
    inbox.close();
    inbox.push([Delivery::Behind(Box::new(behind))]);
    assert!(inbox.is_empty());
    assert_eq!(broker.subscriber_count(7), 0, "the member is freed");
}

#[tokio::test]
async fn a_driver_with_a_backlog_holds_writers_back_until_it_has_caught_up() {
    let (_dir, db, broker, cohorts) = setup().await;
    let inbox = Inbox::new();
    cohorts.join(member(&broker, &db, 1, None, 1, &inbox, Counting::shape("a")).await);
    let total = (DRIVER_BACKLOG * 3) as i64;
    for position in 1..=total {
        broker.publish(vec![message(position, position)], position);
    }
    // The driver's first turn (one event per turn) leaves more than its backlog waiting:
    // writers are held.
    for _ in 0..10 {
        if broker.lagging_topics() == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(broker.lagging_topics(), 1, "the topic reported behind");
    tokio::time::timeout(
        Duration::from_secs(2),
        broker.wait_for_fan_out(Duration::from_secs(60)),
    )
    .await
    .expect("released once the driver caught up, not at its patience's end");
    assert_eq!(broker.lagging_topics(), 0);
    let got = take(&inbox, total as usize).await;
    assert_eq!(got.len(), total as usize);
    // Without a backlog, nobody waits.
    tokio::time::timeout(
        Duration::from_secs(1),
        broker.wait_for_fan_out(Duration::from_secs(60)),
    )
    .await
    .expect("no wait");
}
