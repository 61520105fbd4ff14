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
//! lone post's miss is (`message::not_posted`). When the statement fails (a channel deleted
//! under it, say), nothing of it was written, and each post of the batch runs alone, so that
//! only the posts that fail alone get an error. Each client is answered after the commit.

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
const INSERT: &str = "INSERT INTO messages (channel_id, author_id, body) \
     SELECT v.c, v.a, v.b \
     FROM ROWS FROM (jsonb_to_recordset($1::jsonb) AS (c bigint, a bigint, b text)) \
          WITH ORDINALITY AS v(c, a, b, i) \
     WHERE EXISTS (SELECT 1 FROM channel_members m WHERE m.channel_id = v.c AND m.user_id = v.a) \
     ORDER BY v.i \
     RETURNING *";

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
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match self.posts.try_recv() {
                    Ok(post) => batch.push(post),
                    Err(_) => break,
                }
            }
            let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
                break;
            };
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
    let rows = batch
        .iter()
        .map(
            |post| serde_json::json!({ "c": post.channel_id, "a": post.author_id, "b": post.body }),
        )
        .collect();
    let statement = Statement::from_sql_and_values(
        DatabaseBackend::Postgres,
        INSERT,
        [Value::Json(Some(Box::new(serde_json::Value::Array(rows))))],
    );
    let inserted = match message::Model::find_by_statement(statement).all(db).await {
        Ok(inserted) => inserted,
        Err(err) => {
            tracing::debug!(error = %err, posts = batch.len(), "a batch of posts failed; each runs alone");
            futures_util::future::join_all(batch.into_iter().map(|post| alone(db, post))).await;
            return;
        }
    };
    // Matched by content, in id order: the rows of equal content are interchangeable, and
    // the earliest post gets the earliest row.
    let mut by_content: HashMap<(i64, i64, String), VecDeque<message::Model>> = HashMap::new();
    let mut inserted = inserted;
    inserted.sort_by_key(|row| row.id);
    for row in inserted {
        by_content
            .entry((row.channel_id, row.author_id, row.body.clone()))
            .or_default()
            .push_back(row);
    }
    let mut missed = Vec::new();
    for post in batch {
        let key = (post.channel_id, post.author_id, post.body);
        match by_content.get_mut(&key).and_then(VecDeque::pop_front) {
            Some(row) => {
                let _ = post.reply.send(Ok(row));
            }
            None => missed.push((key.0, key.1, post.reply)),
        }
    }
    for (channel_id, author_id, reply) in missed {
        let _ = reply.send(Err(messages::not_posted(db, channel_id, author_id).await));
    }
}

/// One post inserted by its own statement.
async fn alone(db: &DatabaseConnection, post: Post) {
    let posted = messages::create(db, post.channel_id, post.author_id, &post.body).await;
    let _ = post.reply.send(posted);
}
