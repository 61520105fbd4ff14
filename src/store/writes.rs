//! How the store's writes run (`Writes`), and the task that runs them (`GroupWriter`): on
//! SQLite, as jobs of the group-committing writer (`store::writer`); on PostgreSQL, on the
//! pool, with posts batched (`store::posts`).

use sea_orm::{DatabaseConnection, DatabaseExecutor};
use tokio::sync::{mpsc, oneshot, watch};

use super::StoreError;
use super::posts::{Batcher, Post};
use super::writer::{self, BoxFuture, SqliteWriter, Work, writer_gone};

/// Sends writes to the group-committing writer (SQLite), or runs them on the pool.
#[derive(Clone)]
pub struct Writes(pub(super) Route);

#[derive(Clone)]
pub(super) enum Route {
    /// PostgreSQL: each write runs on the pool, as it comes; posts go to the batcher
    /// (`store::posts`).
    Pool {
        db: DatabaseConnection,
        posts: mpsc::Sender<Post>,
    },
    /// SQLite: each write is a job of the writer.
    Grouped(mpsc::Sender<Work>),
}

/// The writer's side: runs until told to stop. On SQLite, the group-committing writer; on
/// PostgreSQL, the posts' batcher.
pub struct GroupWriter(Runner);

enum Runner {
    Sqlite {
        db: DatabaseConnection,
        jobs: mpsc::Receiver<Work>,
    },
    Posts(Batcher),
}

impl Writes {
    /// How `db`'s writes run: grouped on SQLite, on the pool otherwise (posts batched).
    /// Run the returned `GroupWriter`.
    pub fn new(db: &DatabaseConnection) -> (Writes, GroupWriter) {
        if db.get_database_backend() != sea_orm::DatabaseBackend::Sqlite {
            let (posts, batcher) = super::posts::queue(db);
            return (
                Writes(Route::Pool {
                    db: db.clone(),
                    posts,
                }),
                GroupWriter(Runner::Posts(batcher)),
            );
        }
        let (sender, jobs) = mpsc::channel(writer::QUEUE);
        (
            Writes(Route::Grouped(sender)),
            GroupWriter(Runner::Sqlite {
                db: db.clone(),
                jobs,
            }),
        )
    }

    /// Posts a message (`message::create`), inserted by one statement together with the
    /// posts that arrive with it (`store::posts`): on SQLite in the writer's group, on
    /// PostgreSQL by the batcher. Answered once committed.
    pub async fn post_message(
        &self,
        channel_id: i64,
        author_id: i64,
        body: String,
    ) -> Result<entities::message::Model, StoreError> {
        if body.contains('\0') {
            // JSON, which carries a batch's rows, cannot hold it faithfully (SQLite's JSON
            // functions cut the text there; PostgreSQL refuses it anyway): posted alone.
            return self
                .run(move |db| {
                    Box::pin(async move {
                        super::message::create(&db, channel_id, author_id, &body).await
                    })
                })
                .await;
        }
        let (reply, answer) = oneshot::channel();
        let post = Post {
            channel_id,
            author_id,
            body,
            reply,
        };
        let sent = match &self.0 {
            Route::Pool { posts, .. } => posts.send(post).await.is_ok(),
            Route::Grouped(sender) => sender.send(Work::Post(post)).await.is_ok(),
        };
        if !sent {
            return Err(writer_gone());
        }
        answer.await.map_err(|_| writer_gone())?
    }

    /// Runs `write` and answers with what it returned, once it has committed.
    pub async fn run<T, W>(&self, write: W) -> Result<T, StoreError>
    where
        T: Send + 'static,
        W: for<'a> FnOnce(DatabaseExecutor<'a>) -> BoxFuture<'a, Result<T, StoreError>>
            + Send
            + 'static,
    {
        let sender = match &self.0 {
            Route::Pool { db, .. } => return write(DatabaseExecutor::Connection(db)).await,
            Route::Grouped(sender) => sender,
        };
        let (job, answer) = writer::job(write);
        sender.send(job).await.map_err(|_| writer_gone())?;
        answer.await.map_err(|_| writer_gone())?
    }
}

impl GroupWriter {
    /// Runs until `stop` turns true, then the writes already queued, and ends.
    pub async fn run(self, stop: watch::Receiver<bool>) {
        match self.0 {
            Runner::Sqlite { db, jobs } => SqliteWriter { db, jobs }.run(stop).await,
            Runner::Posts(batcher) => batcher.run(stop).await,
        }
    }
}
