//! SQLite group commit: one writer runs the mutations that arrive together in one
//! transaction, each in a savepoint of its own, and commits them at once.
//!
//! SQLite has one writer at a time, so concurrent mutations queued on its lock and each paid
//! for a transaction of its own (lock, WAL frames for the same index pages, a commit). Here a
//! mutation's write is a job sent to the writer; the writer takes every job waiting (up to
//! `MAX_GROUP`), runs each in a savepoint (`SAVEPOINT`/`RELEASE`, or `ROLLBACK TO` when the
//! job fails: a CONFLICT or a constraint rolls back that job alone and its client alone gets
//! the error), then commits the group. Each job's answer is sent only after the group has
//! committed: a client never hears of a write that was not committed. (With
//! `synchronous=NORMAL` in WAL mode, an operating system crash or power loss can still undo
//! the last commits; a crash of the process cannot.) A job whose savepoint cannot be closed
//! (the database rolled the whole transaction back) cuts the group short: the jobs run so far
//! are answered as failed and the rest go to the next group. Jobs run one
//! after another in arrival order, so positions and per-row versions are assigned as if each
//! had its own transaction.
//!
//! PostgreSQL has no such writer: its writes run on the pool, concurrently, and its posts go
//! to a batcher (`store::posts`). Which way a write goes is `store::writes`.

use std::future::Future;
use std::pin::Pin;

use sea_orm::{
    DatabaseConnection, DatabaseExecutor, DatabaseTransaction, DbErr, SqliteTransactionMode,
    TransactionOptions, TransactionTrait,
};
use tokio::sync::{mpsc, oneshot, watch};

use super::StoreError;
use super::posts::Post;

/// Most jobs committed together.
pub const MAX_GROUP: usize = 256;

/// Jobs waiting for the writer.
pub(super) const QUEUE: usize = 1024;

pub(super) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a job leaves once it has run: how to answer its client once the group's commit has
/// succeeded (`true`) or failed.
type Answer = Box<dyn FnOnce(bool) + Send>;

/// A job that has run: its answer, and whether the group's transaction is still sound (its
/// savepoint was released or rolled back). A job that could not close its savepoint (the
/// database rolled the whole transaction back: SQLITE_FULL, IOERR, NOMEM) leaves it unsound.
pub(super) struct Ran {
    answer: Answer,
    sound: bool,
}

/// A job: runs in the group's transaction.
type Job = Box<dyn for<'a> FnOnce(&'a DatabaseTransaction) -> BoxFuture<'a, Ran> + Send>;

/// What the SQLite writer is sent: a job, or a post (`Writes::post_message`), which it
/// inserts together with the posts next to it in its group (`posts::insert_rows`).
pub(super) enum Work {
    Job(Job),
    Post(Post),
}

/// A job for the writer that runs `write` in a savepoint of its group, and the receiver of
/// its answer (sent once the group has committed).
pub(super) fn job<T, W>(write: W) -> (Work, oneshot::Receiver<Result<T, StoreError>>)
where
    T: Send + 'static,
    W: for<'a> FnOnce(DatabaseExecutor<'a>) -> BoxFuture<'a, Result<T, StoreError>>
        + Send
        + 'static,
{
    let (reply, answer) = oneshot::channel::<Result<T, StoreError>>();
    let job: Job = Box::new(move |group: &DatabaseTransaction| {
        Box::pin(async move {
            let (result, sound) = in_savepoint(group, write).await;
            Ran {
                answer: answer_with(reply, result),
                sound,
            }
        })
    });
    (Work::Job(job), answer)
}

/// Answers with `result` once the group has committed, or with an error if it did not.
fn answer_with<T: Send + 'static>(
    reply: oneshot::Sender<Result<T, StoreError>>,
    result: Result<T, StoreError>,
) -> Answer {
    Box::new(move |committed: bool| {
        let _ = reply.send(if committed {
            result
        } else {
            Err(group_failed())
        });
    })
}

/// Runs consecutive `posts` of a group: one statement for all of them in a savepoint
/// (`posts::insert_rows`); when it fails, each alone in a savepoint of its own, so that only
/// the posts that fail alone get an error. Says whether the transaction is still sound.
async fn posts_in_group(group: &DatabaseTransaction, posts: Vec<Post>) -> (Vec<Answer>, bool) {
    let mut answers = Vec::with_capacity(posts.len());
    if posts.len() > 1 {
        let savepoint = match group.begin().await {
            Ok(savepoint) => savepoint,
            Err(err) => {
                tracing::error!(error = %err, "cannot open a savepoint for a batch of posts");
                for post in posts {
                    answers.push(answer_with(post.reply, Err(StoreError::Db(err.clone()))));
                }
                return (answers, false);
            }
        };
        let rows: Vec<(i64, i64, &str)> = posts
            .iter()
            .map(|post| (post.channel_id, post.author_id, post.body.as_str()))
            .collect();
        let inserted = super::posts::insert_rows(&savepoint, &rows).await;
        drop(rows);
        let closed = match &inserted {
            Ok(_) => savepoint.commit().await,
            Err(_) => savepoint.rollback().await,
        };
        if let Err(err) = closed {
            tracing::error!(error = %err, "a batch of posts' savepoint could not be closed");
            for post in posts {
                answers.push(answer_with(post.reply, Err(StoreError::Db(err.clone()))));
            }
            return (answers, false);
        }
        match inserted {
            Ok(inserted) => {
                for (post, row) in posts.into_iter().zip(inserted) {
                    let result = match row {
                        Some(row) => Ok(row),
                        None => {
                            Err(
                                super::message::not_posted(group, post.channel_id, post.author_id)
                                    .await,
                            )
                        }
                    };
                    answers.push(answer_with(post.reply, result));
                }
                return (answers, true);
            }
            Err(err) => {
                tracing::warn!(error = %err, posts = posts.len(), "a batch of posts failed; each runs alone");
            }
        }
    }
    for post in posts {
        let Post {
            channel_id,
            author_id,
            body,
            reply,
        } = post;
        let (result, sound) = in_savepoint(group, move |db| {
            Box::pin(async move { super::message::create(&db, channel_id, author_id, &body).await })
        })
        .await;
        answers.push(answer_with(reply, result));
        if !sound {
            return (answers, false);
        }
    }
    (answers, true)
}

/// Runs `write` in a savepoint of `group`: released when it succeeds, rolled back when it
/// fails (or panics). Also says whether the savepoint could be closed.
async fn in_savepoint<T, W>(group: &DatabaseTransaction, write: W) -> (Result<T, StoreError>, bool)
where
    W: for<'a> FnOnce(DatabaseExecutor<'a>) -> BoxFuture<'a, Result<T, StoreError>>,
{
    let savepoint = match group.begin().await {
        Ok(savepoint) => savepoint,
        Err(err) => return (Err(err.into()), false),
    };
    let ran = std::panic::AssertUnwindSafe(write(DatabaseExecutor::Transaction(&savepoint)));
    let result = match futures_util::FutureExt::catch_unwind(ran).await {
        Ok(result) => result,
        Err(_) => {
            tracing::error!("a write panicked; it is rolled back");
            Err(StoreError::Db(DbErr::Custom("the write failed".into())))
        }
    };
    let closed = match &result {
        Ok(_) => savepoint.commit().await,
        Err(_) => savepoint.rollback().await,
    };
    match closed {
        Ok(()) => (result, true),
        Err(err) => {
            tracing::error!(error = %err, "a write's savepoint could not be closed");
            (Err(err.into()), false)
        }
    }
}

/// SQLite's group-committing writer.
pub(super) struct SqliteWriter {
    pub(super) db: DatabaseConnection,
    pub(super) jobs: mpsc::Receiver<Work>,
}

impl SqliteWriter {
    /// Runs groups until `stop` turns true, then the jobs already queued, and ends.
    pub(super) async fn run(mut self, mut stop: watch::Receiver<bool>) {
        // Jobs of a group that was cut short, to run first in the next.
        let mut carried: Vec<Work> = Vec::new();
        loop {
            if carried.is_empty() {
                let first = tokio::select! {
                    job = self.jobs.recv() => match job {
                        Some(job) => job,
                        None => return,
                    },
                    _ = stop.changed() => {
                        self.jobs.close();
                        match self.jobs.recv().await {
                            Some(job) => job,
                            None => return,
                        }
                    }
                };
                carried.push(first);
            }
            let mut group = std::mem::take(&mut carried);
            while group.len() < MAX_GROUP {
                match self.jobs.try_recv() {
                    Ok(job) => group.push(job),
                    Err(_) => break,
                }
            }
            carried = self.commit(group).await;
        }
    }

    /// Runs `group` in one transaction and answers each job once it has committed. Returns
    /// the jobs not run: after a job that left the transaction unsound, the group stops
    /// there, the jobs it ran are answered as failed (the database rolled them back), and
    /// the rest go to the next group.
    async fn commit(&self, group: Vec<Work>) -> Vec<Work> {
        // IMMEDIATE: the group takes the write lock at once (waiting up to the busy timeout).
        // A deferred transaction whose first statement reads would hold a read snapshot, and
        // a commit by another connection meanwhile would make every later write of the group
        // fail at once (SQLITE_BUSY_SNAPSHOT), without waiting.
        let options = TransactionOptions {
            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
            ..TransactionOptions::default()
        };
        let transaction = match self.db.begin_with_options(options).await {
            Ok(transaction) => transaction,
            Err(err) => {
                // Dropped unrun: each client hears that its write was not run.
                tracing::error!(error = %err, jobs = group.len(), "cannot begin a group of writes");
                return Vec::new();
            }
        };
        let mut answers = Vec::with_capacity(group.len());
        let mut works = group.into_iter().peekable();
        let mut sound = true;
        while let Some(work) = works.next() {
            match work {
                Work::Job(job) => {
                    let ran = job(&transaction).await;
                    answers.push(ran.answer);
                    sound = ran.sound;
                }
                Work::Post(post) => {
                    // With the posts right after it.
                    let mut posts = vec![post];
                    while let Some(Work::Post(_)) = works.peek() {
                        if let Some(Work::Post(post)) = works.next() {
                            posts.push(post);
                        }
                    }
                    let (ran, still_sound) = posts_in_group(&transaction, posts).await;
                    answers.extend(ran);
                    sound = still_sound;
                }
            }
            if !sound {
                break;
            }
        }
        // An unsound transaction is dropped unfinished: sea-orm rolls it back.
        let committed = sound
            && match transaction.commit().await {
                Ok(()) => true,
                Err(err) => {
                    tracing::error!(error = %err, jobs = answers.len(), "a group of writes could not commit");
                    false
                }
            };
        answers.into_iter().for_each(|answer| answer(committed));
        works.collect()
    }
}

fn group_failed() -> StoreError {
    StoreError::Db(DbErr::Custom("the group of writes could not commit".into()))
}

pub(super) fn writer_gone() -> StoreError {
    StoreError::Db(DbErr::Custom(
        "the write was not run (the writer stopped, or could not begin)".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Writes;
    use crate::store::writes::Route;
    use sea_orm::ConnectionTrait;

    /// Inserts a message with `body`, then fails when `fail` (after the insert ran).
    fn post(
        body: &'static str,
        fail: bool,
    ) -> impl for<'a> FnOnce(DatabaseExecutor<'a>) -> BoxFuture<'a, Result<i64, StoreError>>
    + Send
    + 'static {
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
    -> impl for<'a> FnOnce(DatabaseExecutor<'a>) -> BoxFuture<'a, Result<i64, StoreError>>
    + Send
    + 'static {
        move |db| {
            Box::pin(async move {
                crate::store::message::create(&db, 7, 1, "panicked").await?;
                panic!("a bug in a write");
            })
        }
    }

    /// Rolls the whole transaction back, as SQLite does on SQLITE_FULL or IOERR, then
    /// fails.
    fn rolls_back_all()
    -> impl for<'a> FnOnce(DatabaseExecutor<'a>) -> BoxFuture<'a, Result<i64, StoreError>>
    + Send
    + 'static {
        move |db| {
            Box::pin(async move {
                db.execute_unprepared("ROLLBACK").await?;
                Err(StoreError::Db(DbErr::Custom("disk full".into())))
            })
        }
    }

    /// A job of `run_group`.
    enum Kind {
        /// `post(body, fail)`.
        Post(&'static str, bool),
        /// `panics()`.
        Panics,
        /// `rolls_back_all()`.
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
                    Kind::RollsBackAll => writes.run(rolls_back_all()).await,
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
}
