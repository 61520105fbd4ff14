//! An operation's replies as a transport reads them (`Api::execute_stream`): the start's
//! responses from async-graphql, then, for a subscription, the live phase: each event the
//! follower has next, rendered once per shape and shared.

use std::sync::Arc;

use futures_util::FutureExt;
use tokio::sync::mpsc;
use tracing::Instrument as _;

use super::{Api, Reply, shared};
use crate::live::queries::Payload;
use crate::pubsub::FeedStats;

/// Aborts a task when dropped.
pub(super) struct AbortOnDrop(pub(super) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One operation's replies (see `Api::execute_stream`). A subscription's whole live state
/// is in here, in the task that drives it, with nothing else allocated for it: there may be
/// 10,000 of them, each woken for every event of its topic.
pub struct Replies {
    pub(super) api: Api,
    /// The start phase's responses, until it ends.
    pub(super) start: Option<mpsc::Receiver<async_graphql::Response>>,
    /// The start phase's task, stopped if the replies are dropped first. Dropped once the
    /// start ends: a finished task's memory (~2 KiB) lives as long as its handle.
    pub(super) start_task: Option<AbortOnDrop>,
    /// Where a subscription's resolver leaves its follower, until the start ends.
    pub(super) handover: Option<Arc<shared::Handover>>,
    /// A handed-over subscription: what it follows and how it renders.
    pub(super) live: Option<(crate::live::Follower, Arc<shared::Shape>)>,
    /// A live query: its cohort membership.
    pub(super) live_query: Option<Box<LiveReplies>>,
    pub(super) finished: Finished,
}

/// A live query's part of its replies.
pub(super) struct LiveReplies {
    pub(super) member: crate::live::queries::Member<super::LiveKey, super::live_query::Refusal>,
    pub(super) _slot: Option<crate::live::QuotaSlot>,
}

impl Replies {
    /// The next reply, or `None` when the operation is over.
    pub async fn next(&mut self) -> Option<Reply> {
        if let Some(live) = &mut self.live_query {
            return match live.member.next().await? {
                Payload::Json { text, .. } => {
                    self.finished.count(0);
                    FeedStats::add(&self.api.broker.stats.delivered, 1);
                    Some(Reply::Shared {
                        json: text,
                        position: None,
                    })
                }
                Payload::Final(errors) => {
                    self.finished.count(errors.len());
                    Some(Reply::Response(Box::new(
                        async_graphql::Response::from_errors(errors.to_vec()),
                    )))
                }
            };
        }
        if let Some(start) = &mut self.start {
            if let Some(mut response) = start.recv().await {
                self.api.finish(&mut response);
                self.finished.count(response.errors.len());
                tracing::debug!(parent: &self.finished.span, errors = response.errors.len(), "response");
                return Some(Reply::Response(Box::new(response)));
            }
            // Free async-graphql's state (and its hold on the handover) first, and the
            // finished task.
            self.start = None;
            self.start_task = None;
            let handover = self.handover.take()?;
            let (follower, parts) = handover.take()?;
            let position = follower.position();
            self.live = Some((follower, self.api.shapes.intern(parts)));
            return Some(Reply::Following { position });
        }
        let (follower, shape) = self.live.as_mut()?;
        loop {
            let (rendered, position) = match follower.next().await? {
                crate::live::Next::Event(event) => {
                    let api = &self.api;
                    let span = &self.finished.span;
                    // Most subscribers find the rendering made; the first (or one racing
                    // it) makes it. That path is boxed, so the state a subscription keeps
                    // while it waits for events (most of its life) stays small.
                    let rendered = match event.memo.get("render", shape.id as i64) {
                        Some(rendered) => rendered,
                        None => event
                            .memo
                            .get_or_try_init("render", shape.id as i64, || {
                                api.render(shape, shared::RenderOne::Event(event.clone()))
                                    .instrument(span.clone())
                            })
                            .boxed()
                            .await
                            .unwrap_or_else(Arc::new),
                    };
                    (rendered, Some(event.position))
                }
                crate::live::Next::Error(err) => {
                    let rendered = self
                        .api
                        .render(shape, shared::RenderOne::Error(err.into()))
                        .boxed()
                        .await;
                    (Arc::new(rendered.unwrap_or_else(|rendered| rendered)), None)
                }
            };
            let Some(json) = &rendered.json else { continue };
            for code in &rendered.codes {
                self.api.count_error(code);
            }
            self.finished.count(rendered.codes.len());
            if position.is_some() {
                FeedStats::add(&self.api.broker.stats.delivered, 1);
            }
            return Some(Reply::Shared {
                json: json.clone(),
                position,
            });
        }
    }
}

/// Logs an operation's end (however it ends) in its span.
pub(super) struct Finished {
    pub(super) span: tracing::Span,
    pub(super) started: std::time::Instant,
    pub(super) responses: u64,
    pub(super) errors: u64,
}

impl Finished {
    /// Counts a reply with `errors` errors.
    fn count(&mut self, errors: usize) {
        self.responses += 1;
        self.errors += errors as u64;
    }
}

impl Drop for Finished {
    fn drop(&mut self) {
        tracing::debug!(
            parent: &self.span,
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            responses = self.responses,
            errors = self.errors,
            "operation finished"
        );
    }
}
