//! PostgreSQL: the `postMessage` inserts that arrive together are made by one statement.
//!
//! Each insert on its own costs a pool checkout (and sqlx's ping when the connection goes
//! back), a round trip, a statement execution and a commit; the work of the insert itself
//! (the row, its change_log entry) is the smaller part. Under load, the posts waiting here
//! are taken together (up to `MAX_BATCH`) and inserted by one `INSERT ... SELECT` over
//! their rows, each still checked for membership by the statement itself, in arrival order
//! (so their change_log positions follow it). Up to `IN_FLIGHT` batches run at once; a
//! post that arrives alone is inserted alone, as before, with no added wait.
//!
//! A post the statement did not insert (not a member, no such channel) is explained as a
//! lone post's miss is (`message::not_posted`). When the database refuses the statement (a
//! channel deleted under it, say), nothing of it was written, and each post of the batch runs
//! alone, so that only the posts that fail alone get an error; any other failure (the
//! connection dropped) may have come after the commit, so every post gets the error rather
//! than a second insert. Each client is answered after the commit.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use entities::message;
use sea_orm::{DatabaseBackend, DatabaseConnection, FromQueryResult, Statement, Value};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use super::{StoreError, message as messages};

/// Most posts inserted by one statement.
const MAX_BATCH: usize = 256;

/// Batches running at once (each on a pool connection).
const IN_FLIGHT: u32 = 4;

/// Posts waiting to be taken.
const QUEUE: usize = 1024;

/// The batch's statement: its rows come as one JSON array of `{c, a, b}` (channel, author,
/// body), inserted in array order where the author is a member of the channel.
const INSERT_POSTGRES: &str = "INSERT INTO messages (channel_id, author_id, body) \
     SELECT v.c, v.a, v.b \
     FROM ROWS FROM (jsonb_to_recordset($1::jsonb) AS (c bigint, a bigint, b text)) \
          WITH ORDINALITY AS v(c, a, b, i) \
     WHERE EXISTS (SELECT 1 FROM channel_members m WHERE m.channel_id = v.c AND m.user_id = v.a) \
     ORDER BY v.i \
     RETURNING *";

/// The same for SQLite (`store::writer` runs it in its group's transaction).
const INSERT_SQLITE: &str = "INSERT INTO messages (channel_id, author_id, body) \
     SELECT json_extract(v.value, '$.c'), json_extract(v.value, '$.a'), json_extract(v.value, '$.b') \
     FROM json_each(?) AS v \
     WHERE EXISTS (SELECT 1 FROM channel_members m \
                   WHERE m.channel_id = json_extract(v.value, '$.c') \
                     AND m.user_id = json_extract(v.value, '$.a')) \
     ORDER BY v.key \
     RETURNING *";

/// Inserts `posts` (channel, author, body) with one statement, each where its author is a
/// member of its channel, in order. Returns each post's row, or `None` where it inserted
/// nothing (`message::not_posted` says why). One statement: when it fails, it changed
/// nothing (on SQLite, inside a transaction too: a failing statement undoes itself).
pub(crate) async fn insert_rows<C: sea_orm::ConnectionTrait>(
    db: &C,
    posts: &[(i64, i64, &str)],
) -> Result<Vec<Option<message::Model>>, sea_orm::DbErr> {
    let rows = posts
        .iter()
        .map(|(c, a, b)| serde_json::json!({ "c": c, "a": a, "b": b }))
        .collect();
    let backend = db.get_database_backend();
    let sql = match backend {
        DatabaseBackend::Sqlite => INSERT_SQLITE,
        _ => INSERT_POSTGRES,
    };
    let statement = Statement::from_sql_and_values(
        backend,
        sql,
        [Value::Json(Some(Box::new(serde_json::Value::Array(rows))))],
    );
    let mut inserted = message::Model::find_by_statement(statement).all(db).await?;
    // Matched by content, in id order: the rows of equal content are interchangeable, and
    // the earliest post gets the earliest row.
    inserted.sort_by_key(|row| row.id);
    let mut by_content: HashMap<(i64, i64, String), VecDeque<message::Model>> = HashMap::new();
    for row in inserted {
        by_content
            .entry((row.channel_id, row.author_id, row.body.clone()))
            .or_default()
            .push_back(row);
    }
    Ok(posts
        .iter()
        .map(|&(c, a, b)| {
            by_content
                .get_mut(&(c, a, b.to_owned()))
                .and_then(VecDeque::pop_front)
        })
        .collect())
}

/// One post waiting for its batch.
pub(crate) struct Post {
    pub channel_id: i64,
    pub author_id: i64,
    pub body: String,
    pub reply: oneshot::Sender<Result<message::Model, StoreError>>,
}

/// Where posts are sent, and the batcher that takes them.
pub(crate) fn queue(db: &DatabaseConnection) -> (mpsc::Sender<Post>, Batcher) {
    let (sender, posts) = mpsc::channel(QUEUE);
    (
        sender,
        Batcher {
            db: db.clone(),
            posts,
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT as usize)),
        },
    )
}

/// Takes waiting posts in batches and inserts them.
pub struct Batcher {
    db: DatabaseConnection,
    posts: mpsc::Receiver<Post>,
    in_flight: Arc<Semaphore>,
}

impl Batcher {
    /// Runs until `stop` turns true, then inserts the posts already queued and waits for
    /// the batches in flight.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        loop {
            let first = tokio::select! {
                post = self.posts.recv() => post,
                _ = stop.changed() => {
                    self.posts.close();
                    self.posts.recv().await
                }
            };
            let Some(first) = first else { break };
            // A slot first, then the batch: what arrives while every slot is busy joins it.
            let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
                break;
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match self.posts.try_recv() {
                    Ok(post) => batch.push(post),
                    Err(_) => break,
                }
            }
            let db = self.db.clone();
            tokio::spawn(async move {
                insert(&db, batch).await;
                drop(permit);
            });
        }
        let _ = self.in_flight.acquire_many(IN_FLIGHT).await;
    }
}

/// Inserts `batch` and answers each post.
async fn insert(db: &DatabaseConnection, batch: Vec<Post>) {
    if batch.len() == 1 {
        for post in batch {
            alone(db, post).await;
        }
        return;
    }
    let rows: Vec<(i64, i64, &str)> = batch
        .iter()
        .map(|post| (post.channel_id, post.author_id, post.body.as_str()))
        .collect();
    let inserted = match insert_rows(db, &rows).await {
        Ok(inserted) => inserted,
        // Refused by the database: the statement wrote nothing, and each post runs alone,
        // in arrival order.
        Err(err) if raised_by_database(&err) => {
            tracing::warn!(error = %err, posts = batch.len(), "a batch of posts failed; each runs alone");
            for post in batch {
                alone(db, post).await;
            }
            return;
        }
        // Anything else (the connection dropped, a row that did not decode) may have come
        // after the commit: running the posts again could post them twice. Each gets the
        // error, as a lone post would.
        Err(err) => {
            tracing::error!(error = %err, posts = batch.len(), "a batch of posts failed");
            for post in batch {
                let _ = post.reply.send(Err(StoreError::Db(err.clone())));
            }
            return;
        }
    };
    for (post, row) in batch.into_iter().zip(inserted) {
        let answer = match row {
            Some(row) => Ok(row),
            None => Err(messages::not_posted(db, post.channel_id, post.author_id).await),
        };
        let _ = post.reply.send(answer);
    }
}

/// Whether `err` is an error the database raised for the statement (it has a SQLSTATE):
/// then the statement, run in autocommit, wrote nothing.
fn raised_by_database(err: &sea_orm::DbErr) -> bool {
    use sea_orm::{DbErr, RuntimeErr};
    match err {
        DbErr::Query(RuntimeErr::SqlxError(err)) | DbErr::Exec(RuntimeErr::SqlxError(err)) => {
            matches!(err.as_ref(), sea_orm::SqlxError::Database(_))
        }
        _ => false,
    }
}

/// One post inserted by its own statement.
async fn alone(db: &DatabaseConnection, post: Post) {
    let posted = messages::create(db, post.channel_id, post.author_id, &post.body).await;
    let _ = post.reply.send(posted);
}

#[cfg(all(test, postgres_tests))]
mod tests {
    use super::*;
    use sea_orm::ConnectionTrait;

    /// Runs `posts` (channel, author, body) as one batch and returns each answer.
    async fn batch(
        db: &DatabaseConnection,
        posts: &[(i64, i64, &str)],
    ) -> Vec<Result<message::Model, StoreError>> {
        let mut answers = Vec::new();
        let mut batch = Vec::new();
        for &(channel_id, author_id, body) in posts {
            let (reply, answer) = oneshot::channel();
            batch.push(Post {
                channel_id,
                author_id,
                body: body.to_owned(),
                reply,
            });
            answers.push(answer);
        }
        tokio::time::timeout(std::time::Duration::from_secs(10), insert(db, batch))
            .await
            .expect("the batch ends in time");
        let mut out = Vec::new();
        for answer in answers {
            out.push(answer.await.expect("every post is answered"));
        }
        out
    }

    async fn bodies(db: &DatabaseConnection) -> Vec<String> {
        db.query_all_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            "SELECT body FROM messages ORDER BY id",
        ))
        .await
        .expect("read")
        .iter()
        .map(|row| row.try_get("", "body").expect("body"))
        .collect()
    }

    #[tokio::test]
    async fn each_post_of_a_batch_gets_its_own_row_or_its_own_refusal() {
        let (db, admin, name) = crate::db::test_postgres().await;
        let answers = batch(
            &db,
            &[
                (7, 1, "first"),
                (7, 2, "not a member"),
                (7, 1, "same"),
                (8, 1, "no such channel"),
                (7, 1, "same"),
                (7, 1, "last"),
            ],
        )
        .await;
        let ok: Vec<(i64, String)> = answers
            .iter()
            .filter_map(|answer| answer.as_ref().ok())
            .map(|row| (row.id, row.body.clone()))
            .collect();
        assert_eq!(
            ok.iter().map(|(_, body)| body.as_str()).collect::<Vec<_>>(),
            ["first", "same", "same", "last"]
        );
        // In arrival order: ids (and so change-log positions) increase along the batch.
        assert!(ok.windows(2).all(|pair| pair[0].0 < pair[1].0), "{ok:?}");
        assert!(
            matches!(answers[1], Err(StoreError::Forbidden(_))),
            "{:?}",
            answers[1]
        );
        assert!(
            matches!(answers[3], Err(StoreError::NotFound(_))),
            "{:?}",
            answers[3]
        );
        assert_eq!(bodies(&db).await, ["first", "same", "same", "last"]);
        let logged = crate::changes::read_scope(&db, 7, 0, i64::MAX, 100)
            .await
            .expect("log")
            .into_iter()
            .filter(|event| event.table == "messages")
            .count();
        assert_eq!(logged, 4);
        crate::db::drop_test_postgres(db, admin, &name).await;
    }

    /// A post PostgreSQL cannot store (a NUL character in its text; `Writes::post_message`
    /// never batches one, but here it stands for any row that fails the statement, such as
    /// a channel deleted under it) fails the batch's statement; each post then runs alone,
    /// and only that one gets an error.
    #[tokio::test]
    async fn a_batch_whose_statement_fails_fails_only_the_posts_that_fail_alone() {
        let (db, admin, name) = crate::db::test_postgres().await;
        let answers = batch(
            &db,
            &[(7, 1, "before"), (7, 1, "a \0 NUL"), (7, 1, "after")],
        )
        .await;
        assert!(answers[0].is_ok() && answers[2].is_ok(), "{answers:?}");
        assert!(
            matches!(answers[1], Err(StoreError::Db(_))),
            "{:?}",
            answers[1]
        );
        assert_eq!(bodies(&db).await, ["before", "after"]);
        crate::db::drop_test_postgres(db, admin, &name).await;
    }
}

#[cfg(test)]
mod sqlite_tests {
    use super::*;

    /// The batch statement itself (not its fallback) inserts every row, unusual bodies
    /// included, and matches each to its post.
    #[tokio::test]
    async fn the_sqlite_batch_statement_inserts_and_matches_every_row() {
        let (_dir, db, _) = crate::db::test_database().await;
        let long = "x".repeat(4000);
        let bodies = [
            "123",
            "null",
            "{\"c\":1}",
            "\\",
            "\"",
            "émoji 🎉",
            long.as_str(),
            "123",
        ];
        let posts: Vec<(i64, i64, &str)> = bodies.iter().map(|b| (7, 1, *b)).collect();
        let rows = insert_rows(&db, &posts).await.expect("the statement runs");
        let got: Vec<&str> = rows
            .iter()
            .map(|row| row.as_ref().expect("inserted").body.as_str())
            .collect();
        assert_eq!(got, bodies);
        let ids: Vec<i64> = rows.iter().flatten().map(|row| row.id).collect();
        assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "{ids:?}");
        // Not a member (user 2 does not exist either): no row.
        let missed = insert_rows(&db, &[(7, 2, "no")]).await.expect("runs");
        assert!(missed[0].is_none());
    }
}
