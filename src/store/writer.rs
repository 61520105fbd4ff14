//! SQLite group commit: one writer runs the mutations that arrive together in one
//! transaction, each in a savepoint of its own, and commits them at once.
//!
//! SQLite has one writer at a time, so concurrent mutations queued on its lock and each paid
//! for a transaction of its own (lock, WAL frames for the same index pages, a commit). Here a
//! mutation's write is a job sent to the writer; the writer takes every job waiting (up to
//! `MAX_GROUP`), runs each in a savepoint (`SAVEPOINT`/`RELEASE`, or `ROLLBACK TO` when the
//! job fails: a CONFLICT or a constraint rolls back that job alone and its client alone gets
//! the error), then commits the group. Each job's answer is sent only after the group has
//! committed: a client never hears of a write that a crash could still lose. Jobs run one
//! after another in arrival order, so positions and per-row versions are assigned as if each
//! had its own transaction.
//!
//! PostgreSQL has no such writer: its writes run on the pool, concurrently.

use std::future::Future;
use std::pin::Pin;

use sea_orm::{DatabaseConnection, DatabaseExecutor, DatabaseTransaction, DbErr, TransactionTrait};
use tokio::sync::{mpsc, oneshot, watch};

use super::StoreError;

/// Most jobs committed together.
pub const MAX_GROUP: usize = 256;

/// Jobs waiting for the writer.
const QUEUE: usize = 1024;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a job leaves once it has run: how to answer its client once the group's commit has
/// succeeded (`true`) or failed.
type Answer = Box<dyn FnOnce(bool) + Send>;

/// A job: runs in the group's transaction.
type Job = Box<dyn for<'a> FnOnce(&'a DatabaseTransaction) -> BoxFuture<'a, Answer> + Send>;

/// Sends writes to the group-committing writer (SQLite), or runs them on the pool.
#[derive(Clone)]
pub enum Writes {
    /// PostgreSQL: each write runs on the pool, as it comes.
    Pool(DatabaseConnection),
    /// SQLite: each write is a job of the writer.
    Grouped(mpsc::Sender<Job>),
}

/// The writer's side: runs groups until told to stop.
pub struct GroupWriter {
    db: DatabaseConnection,
    jobs: mpsc::Receiver<Job>,
}

impl Writes {
    /// How `db`'s writes run: grouped on SQLite (run the returned `GroupWriter`), on the pool
    /// otherwise.
    pub fn new(db: &DatabaseConnection) -> (Writes, Option<GroupWriter>) {
        if db.get_database_backend() != sea_orm::DatabaseBackend::Sqlite {
            return (Writes::Pool(db.clone()), None);
        }
        let (sender, jobs) = mpsc::channel(QUEUE);
        (
            Writes::Grouped(sender),
            Some(GroupWriter {
                db: db.clone(),
                jobs,
            }),
        )
    }

    /// Runs `write` and answers with what it returned, once it has committed.
    pub async fn run<T, W>(&self, write: W) -> Result<T, StoreError>
    where
        T: Send + 'static,
        W: for<'a> FnOnce(DatabaseExecutor<'a>) -> BoxFuture<'a, Result<T, StoreError>>
            + Send
            + 'static,
    {
        let sender = match self {
            Writes::Pool(db) => return write(DatabaseExecutor::Connection(db)).await,
            Writes::Grouped(sender) => sender,
        };
        let (reply, answer) = oneshot::channel::<Result<T, StoreError>>();
        let job: Job = Box::new(move |group: &DatabaseTransaction| {
            Box::pin(async move {
                let result = in_savepoint(group, write).await;
                Box::new(move |committed: bool| {
                    let _ = reply.send(if committed {
                        result
                    } else {
                        Err(group_failed())
                    });
                }) as Answer
            })
        });
        sender.send(job).await.map_err(|_| writer_gone())?;
        answer.await.map_err(|_| writer_gone())?
    }
}

/// Runs `write` in a savepoint of `group`: released when it succeeds, rolled back when it
/// fails.
async fn in_savepoint<T, W>(group: &DatabaseTransaction, write: W) -> Result<T, StoreError>
where
    W: for<'a> FnOnce(DatabaseExecutor<'a>) -> BoxFuture<'a, Result<T, StoreError>>,
{
    let savepoint = group.begin().await?;
    let result = write(DatabaseExecutor::Transaction(&savepoint)).await;
    match &result {
        Ok(_) => savepoint.commit().await?,
        Err(_) => savepoint.rollback().await?,
    }
    result
}

impl GroupWriter {
    /// Runs groups until `stop` turns true, then the jobs already queued, and ends.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        loop {
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
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match self.jobs.try_recv() {
                    Ok(job) => group.push(job),
                    Err(_) => break,
                }
            }
            self.commit(group).await;
        }
    }

    /// Runs `group` in one transaction and answers each job once it has committed.
    async fn commit(&self, group: Vec<Job>) {
        let answers = match self.db.begin().await {
            Ok(transaction) => {
                let mut answers = Vec::with_capacity(group.len());
                for job in group {
                    answers.push(job(&transaction).await);
                }
                let committed = match transaction.commit().await {
                    Ok(()) => true,
                    Err(err) => {
                        tracing::error!(error = %err, jobs = answers.len(), "a group of writes could not commit");
                        false
                    }
                };
                answers.into_iter().for_each(|answer| answer(committed));
                return;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot begin a group of writes");
                group
            }
        };
        // Not begun: every job of the group fails, unrun (dropping a job drops its reply,
        // which its client reads as the writer gone).
        drop(answers);
    }
}

fn group_failed() -> StoreError {
    StoreError::Db(DbErr::Custom("the group of writes could not commit".into()))
}

fn writer_gone() -> StoreError {
    StoreError::Db(DbErr::Custom("the writer has stopped".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::ConnectionTrait;

    async fn sqlite() -> (tempfile::TempDir, DatabaseConnection) {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("writes.db").display());
        let (db, _) = crate::db::connect(&url, 2).await.expect("database");
        crate::app::migrate(&db).await.expect("migrations");
        for sql in [
            "INSERT INTO users (id, name, email, password_hash) VALUES (1, 'Ada', 'ada@example.com', 'x')",
            "INSERT INTO channels (id, name) VALUES (7, 'general')",
            "INSERT INTO channel_members (channel_id, user_id) VALUES (7, 1)",
        ] {
            db.execute_unprepared(sql).await.expect("fixture");
        }
        (dir, db)
    }

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
        let (_dir, db) = sqlite().await;
        let (writes, writer) = Writes::new(&db);
        let writer = writer.expect("SQLite writes are grouped");
        let Writes::Grouped(queue) = &writes else {
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
}
