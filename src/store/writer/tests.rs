//! The group writer on real SQLite files: savepoints, failures alone, panics, posts.

use super::*;
use crate::store::Writes;
use crate::store::writes::Route;
use sea_orm::ConnectionTrait;

/// Inserts a message with `body`, then fails when `fail` (after the insert ran).
fn post(
    body: &'static str,
    fail: bool,
) -> impl for<'a> FnOnce(DatabaseExecutor<'a>) -> BoxFuture<'a, Result<i64, StoreError>> + Send + 'static
{
    move |db| {
        Box::pin(async move {
            let message = crate::store::message::create(&db, 7, 1, body).await?;
            if fail {
                return Err(StoreError::Conflict { current_version: 1 });
            }
            Ok(message.id)
        })
    }
}

async fn bodies(db: &DatabaseConnection) -> Vec<String> {
    let rows = db
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Sqlite,
            "SELECT body FROM messages ORDER BY id",
        ))
        .await
        .expect("read");
    rows.iter()
        .map(|row| row.try_get("", "body").expect("body"))
        .collect()
}

#[tokio::test]
async fn jobs_that_arrive_together_commit_together_and_a_failing_one_rolls_back_alone() {
    let (_dir, db, _) = crate::db::test_database().await;
    let (writes, writer) = Writes::new(&db);
    let Route::Grouped(queue) = &writes.0 else {
        panic!("grouped")
    };
    // Queued before the writer runs, so it takes the three as one group.
    let runs: Vec<_> = [("one", false), ("two", true), ("three", false)]
        .into_iter()
        .map(|(body, fail)| {
            let writes = writes.clone();
            tokio::spawn(async move { writes.run(post(body, fail)).await })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while queue.max_capacity() - queue.capacity() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the jobs are queued in time"
        );
        tokio::task::yield_now().await;
    }
    let (stop, stopped) = watch::channel(false);
    let running = tokio::spawn(writer.run(stopped));
    let mut results = Vec::new();
    for run in runs {
        results.push(
            tokio::time::timeout(std::time::Duration::from_secs(5), run)
                .await
                .expect("answered in time")
                .expect("task"),
        );
    }
    assert!(results[0].is_ok(), "{:?}", results[0].as_ref().err());
    assert!(matches!(results[1], Err(StoreError::Conflict { .. })));
    assert!(results[2].is_ok());
    assert_eq!(bodies(&db).await, ["one", "three"]);
    // The rolled-back job left nothing in the change log either.
    let logged = crate::changes::read_scope(&db, 7, 0, i64::MAX, 100)
        .await
        .expect("log")
        .into_iter()
        .filter(|event| event.table == "messages")
        .count();
    assert_eq!(logged, 2);
    // Stopped, it ends once the queue is empty; later writes are refused.
    stop.send(true).expect("stop");
    tokio::time::timeout(std::time::Duration::from_secs(5), running)
        .await
        .expect("the writer ends in time")
        .expect("task");
    assert!(writes.run(post("late", false)).await.is_err());
}

/// A group begins IMMEDIATE: a job that reads first, while another connection commits,
/// does not leave the group with a stale read snapshot that makes the next job's write
/// fail at once (with a deferred BEGIN, the second job here got SQLITE_BUSY_SNAPSHOT).
#[tokio::test]
async fn a_group_holds_the_write_lock_from_its_start() {
    let (_dir, db, url) = crate::db::test_database().await;
    let (other, _) = crate::db::connect(&url, 1)
        .await
        .expect("another connection");
    let (writes, writer) = Writes::new(&db);
    let Route::Grouped(queue) = &writes.0 else {
        panic!("grouped")
    };
    let reader = {
        let writes = writes.clone();
        tokio::spawn(async move {
            writes
                .run(move |db| {
                    Box::pin(async move {
                        db.execute_unprepared("SELECT count(*) FROM messages").await?;
                        // Another writer commits now, if it can.
                        let insert = other.execute_unprepared(
                            "INSERT INTO messages (channel_id, author_id, body) VALUES (7, 1, 'elsewhere')",
                        );
                        let _ = tokio::time::timeout(std::time::Duration::from_millis(300), insert).await;
                        Ok(0)
                    })
                })
                .await
        })
    };
    let poster = {
        let writes = writes.clone();
        tokio::spawn(async move { writes.run(post("after the read", false)).await })
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while queue.max_capacity() - queue.capacity() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the jobs are queued in time"
        );
        tokio::task::yield_now().await;
    }
    let (_stop, stopped) = watch::channel(false);
    tokio::spawn(writer.run(stopped));
    let wait = std::time::Duration::from_secs(10);
    let read = tokio::time::timeout(wait, reader)
        .await
        .expect("in time")
        .expect("task");
    assert!(read.is_ok(), "{:?}", read.err());
    let posted = tokio::time::timeout(wait, poster)
        .await
        .expect("in time")
        .expect("task");
    assert!(
        posted.is_ok(),
        "the write after the read: {:?}",
        posted.err()
    );
}

/// Inserts a message, then panics.
fn panics()
-> impl for<'a> FnOnce(DatabaseExecutor<'a>) -> BoxFuture<'a, Result<i64, StoreError>> + Send + 'static
{
    move |db| {
        Box::pin(async move {
            crate::store::message::create(&db, 7, 1, "panicked").await?;
            panic!("a bug in a write");
        })
    }
}

/// Rolls the whole transaction back, as SQLite does on SQLITE_FULL or IOERR, then fails;
/// or, `quietly`, does so inside a transaction of its own that it then rolls back, and
/// answers Ok (as `YjsWrites` does with a failure it reports as a value). sqlx 0.9.1 then
/// takes that rollback, and the group's savepoint release and COMMIT after it, as done
/// without running them: only asking SQLite tells.
fn rolls_back_all(
    quietly: bool,
) -> impl for<'a> FnOnce(DatabaseExecutor<'a>) -> BoxFuture<'a, Result<i64, StoreError>> + Send + 'static
{
    move |db| {
        Box::pin(async move {
            if !quietly {
                db.execute_unprepared("ROLLBACK").await?;
                return Err(StoreError::Db(DbErr::Custom("disk full".into())));
            }
            let own = db.begin().await?;
            own.execute_unprepared("ROLLBACK").await?;
            own.rollback().await?;
            Ok(7)
        })
    }
}

/// A job of `run_group`.
enum Kind {
    /// `rolls_back_all(true)`.
    RollsBackAllQuietly,
    /// `post(body, fail)`.
    Post(&'static str, bool),
    /// `panics()`.
    Panics,
    /// `rolls_back_all(false)`.
    RollsBackAll,
    /// `Writes::post_message` by user 1 to (channel, body); answers the message's id.
    Message(i64, &'static str),
}

/// Queues `jobs` in order before the writer starts (so it takes them as one group),
/// runs the writer, and returns each job's result and the bodies committed.
async fn run_group(jobs: Vec<Kind>) -> (Vec<Result<i64, StoreError>>, Vec<String>) {
    let (_dir, db, _) = crate::db::test_database().await;
    let (writes, writer) = Writes::new(&db);
    let Route::Grouped(queue) = &writes.0 else {
        panic!("grouped")
    };
    let mut runs = Vec::new();
    for kind in jobs {
        let writes = writes.clone();
        runs.push(tokio::spawn(async move {
            match kind {
                Kind::Post(body, fail) => writes.run(post(body, fail)).await,
                Kind::Panics => writes.run(panics()).await,
                Kind::RollsBackAll => writes.run(rolls_back_all(false)).await,
                Kind::RollsBackAllQuietly => writes.run(rolls_back_all(true)).await,
                Kind::Message(channel, body) => writes
                    .post_message(channel, 1, body.to_owned())
                    .await
                    .map(|message| message.id),
            }
        }));
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while queue.max_capacity() - queue.capacity() < runs.len() {
            assert!(tokio::time::Instant::now() < deadline, "queued in time");
            tokio::task::yield_now().await;
        }
    }
    let (_stop, stopped) = watch::channel(false);
    tokio::spawn(writer.run(stopped));
    let mut results = Vec::new();
    for run in runs {
        results.push(
            tokio::time::timeout(std::time::Duration::from_secs(5), run)
                .await
                .expect("answered in time")
                .expect("task"),
        );
    }
    (results, bodies(&db).await)
}

#[tokio::test]
async fn a_panicking_write_is_rolled_back_alone_and_the_writer_goes_on() {
    let (results, committed) = run_group(vec![
        Kind::Post("one", false),
        Kind::Panics,
        Kind::Post("two", false),
    ])
    .await;
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    assert!(results[1].is_err());
    assert_eq!(committed, ["one", "two"]);
}

/// The database rolled the group's transaction back (SQLITE_FULL, IOERR): the jobs run
/// before are answered as failed, never as committed, and the rest run in the next group.
#[tokio::test]
async fn a_transaction_the_database_rolled_back_cuts_the_group_short() {
    let (results, committed) = run_group(vec![
        Kind::Post("rolled back by the database", false),
        Kind::RollsBackAll,
        Kind::Post("next group", false),
        Kind::Post("next group too", false),
    ])
    .await;
    assert!(results[0].is_err() && results[1].is_err(), "{results:?}");
    assert!(results[2].is_ok() && results[3].is_ok(), "{results:?}");
    assert_eq!(committed, ["next group", "next group too"]);
}

/// Posts next to each other in a group are inserted by one statement; each is answered
/// with its own row (in arrival order) or its own refusal, and jobs between them keep
/// their place.
#[tokio::test]
async fn posts_in_a_group_are_inserted_together_each_answered_for_itself() {
    let (results, committed) = run_group(vec![
        Kind::Message(7, "a"),
        Kind::Message(7, "a"),
        Kind::Message(8, "no such channel"),
        Kind::Post("a failing job", true),
        Kind::Message(7, "b"),
        Kind::Message(7, "with \0 NUL"),
        Kind::Message(7, "c"),
    ])
    .await;
    let ids: Vec<i64> = [0, 1, 4, 5, 6]
        .iter()
        .map(|&i| *results[i].as_ref().expect("posted"))
        .collect();
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "{ids:?}");
    assert!(
        matches!(results[2], Err(StoreError::NotFound(_))),
        "{:?}",
        results[2]
    );
    assert!(matches!(results[3], Err(StoreError::Conflict { .. })));
    assert_eq!(committed, ["a", "a", "b", "with \0 NUL", "c"]);
}

/// The same when the write that lost the transaction answers Ok: SQLite is asked after
/// every write, so nothing before it is answered as committed.
#[tokio::test]
async fn a_transaction_lost_under_a_write_that_answers_ok_cuts_the_group_short() {
    let (results, committed) = run_group(vec![
        Kind::Post("rolled back by the database", false),
        Kind::RollsBackAllQuietly,
        Kind::Post("next group", false),
    ])
    .await;
    assert!(results[0].is_err() && results[1].is_err(), "{results:?}");
    assert!(results[2].is_ok(), "{results:?}");
    assert_eq!(committed, ["next group"]);
}
