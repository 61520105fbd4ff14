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

/// Whether `group`'s connection is still inside a transaction: SQLite refuses `BEGIN` inside
/// one; a `BEGIN` that succeeds (there was none) is rolled back at once.
async fn still_in_transaction(group: &DatabaseTransaction) -> bool {
    use sea_orm::ConnectionTrait;
    match group.execute_unprepared("BEGIN").await {
        Err(_) => true,
        Ok(_) => {
            if let Err(err) = group.execute_unprepared("ROLLBACK").await {
                tracing::error!(error = %err, "cannot end the transaction that probed the group's");
            }
            false
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
            // A database error may have rolled the whole transaction back (SQLITE_FULL,
            // IOERR) while the work itself saw Ok (sqlx 0.9.1 then answers savepoint
            // rollbacks and releases, and the group's COMMIT, with Ok without running
            // them): ask SQLite after every work.
            if sound && !still_in_transaction(&transaction).await {
                tracing::error!("the database rolled the group's transaction back");
                sound = false;
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
mod tests;
