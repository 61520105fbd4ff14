//! An operation's replies as a transport reads them (`Api::execute_stream`): the start's
//! responses from async-graphql, then, for a subscription, the live phase: each event the
//! follower has next, rendered once per shape and shared.

use std::sync::Arc;

use tokio::sync::mpsc;

use std::collections::VecDeque;

use super::{Api, Reply, shared};
use crate::live::cohorts::{Cohorts, Delivery, Inbox, Member, Rendered, Shape};
use crate::live::queries::Payload;
use crate::live::{Follower, Next, QuotaSlot};
use crate::pubsub::FeedStats;

/// Aborts a task when dropped.
pub(super) struct AbortOnDrop(pub(super) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where a subscription's events go once it has caught up and joined its topic's cohorts.
pub enum Target {
    /// Into an inbox of its own, read by `Replies::next` (an HTTP event stream).
    Own,
    /// Into the transport's inbox under `key` (a socket's, shared by its operations):
    /// `Replies::next` then answers `Reply::Joined` and has nothing more to give.
    Shared { inbox: Arc<Inbox>, key: u64 },
}

/// One operation's replies (see `Api::execute_stream`). A subscription's state while it
/// catches up is in here; once live, it is a member of its topic's cohorts (`live::cohorts`).
pub struct Replies {
    pub(super) api: Api,
    /// The start phase's responses, until it ends.
    pub(super) start: Option<mpsc::Receiver<async_graphql::Response>>,
    /// The start phase's task, stopped if the replies are dropped first. Dropped once the
    /// start ends: a finished task's memory (~2 KiB) lives as long as its handle.
    pub(super) start_task: Option<AbortOnDrop>,
    /// Where a subscription's resolver leaves its follower, until the start ends.
    pub(super) handover: Option<Arc<shared::Handover>>,
    /// A handed-over subscription: catching up with its follower, or joined.
    pub(super) live: Option<Live>,
    pub(super) target: Target,
    /// The viewer's subscription slot, taken from the follower when it joins.
    pub(super) slot: Option<QuotaSlot>,
    /// A live query: its cohort membership.
    pub(super) live_query: Option<Box<LiveReplies>>,
    pub(super) finished: Option<Finished>,
}

/// A subscription's live phase.
pub(super) enum Live {
    /// Reading its topic itself: replaying, or catching up after falling behind.
    Following {
        follower: Box<Follower>,
        shape: Shape,
    },
    /// A member of its topic's cohorts, delivering into its own inbox.
    Joined {
        inbox: Arc<Inbox>,
        batch: VecDeque<Delivery>,
        _member: Membership,
    },
}

/// Leaves the cohorts when dropped (the stream ended or its client went away).
pub(super) struct Membership {
    cohorts: Arc<Cohorts>,
    topic: i64,
    inbox: Arc<Inbox>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.inbox.close();
        self.cohorts.leave(self.topic, &self.inbox, None);
    }
}

/// A live query's part of its replies.
pub(super) struct LiveReplies {
    pub(super) member: crate::live::queries::Member<super::LiveKey, super::live_query::Refusal>,
    pub(super) _slot: Option<crate::live::QuotaSlot>,
}

/// What a transport keeps of a subscription that joined its cohorts with a shared inbox:
/// its subscription slot and its log line, released when the transport drops it.
pub struct Keep {
    slot: Option<QuotaSlot>,
    finished: Option<Finished>,
}

impl Keep {
    /// Counts a delivery with `errors` errors (and the errors, by code) for the operation.
    pub fn count(&mut self, api: &Api, codes: &[String]) {
        for code in codes {
            api.count_error(code);
        }
        if let Some(finished) = &mut self.finished {
            finished.count(codes.len());
        }
    }
}

impl Api {
    /// The live subscriptions that have caught up, by topic.
    pub fn cohorts(&self) -> &Arc<Cohorts> {
        &self.cohorts
    }

    /// Replies for a cohort member that fell behind its inbox (`Delivery::Behind`): it
    /// catches up with its own follower, then joins again (`target`); `keep` is what the
    /// transport kept of it.
    pub fn resume(&self, member: Member, target: Target, keep: Keep) -> Replies {
        let follower = Follower::resume(member.state, &self.broker, self.db.clone());
        Replies {
            api: self.clone(),
            start: None,
            start_task: None,
            handover: None,
            live: Some(Live::Following {
                follower: Box::new(follower),
                shape: member.shape,
            }),
            target,
            slot: keep.slot,
            live_query: None,
            finished: keep.finished,
        }
    }
}

impl Replies {
    /// The next reply, or `None` when the operation is over.
    pub async fn next(&mut self) -> Option<Reply> {
        if let Some(live) = &mut self.live_query {
            return match live.member.next().await? {
                Payload::Json { text, .. } => {
                    self.count(0);
                    FeedStats::add(&self.api.broker.stats.delivered, 1);
                    Some(Reply::Shared {
                        json: text,
                        position: None,
                    })
                }
                Payload::Final(errors) => {
                    self.count(errors.len());
                    Some(Reply::Response(Box::new(
                        async_graphql::Response::from_errors(errors.to_vec()),
                    )))
                }
            };
        }
        if let Some(start) = &mut self.start {
            if let Some(mut response) = start.recv().await {
                self.api.finish(&mut response);
                self.count(response.errors.len());
                if let Some(finished) = &self.finished {
                    tracing::debug!(parent: &finished.span, errors = response.errors.len(), "response");
                }
                return Some(Reply::Response(Box::new(response)));
            }
            // Free async-graphql's state (and its hold on the handover) first, and the
            // finished task.
            self.start = None;
            self.start_task = None;
            let handover = self.handover.take()?;
            let (follower, parts) = handover.take()?;
            let position = follower.position();
            let shape: Shape = self.api.shapes.intern(parts, Arc::downgrade(&self.api.0));
            self.live = Some(Live::Following {
                follower: Box::new(follower.hand_off_when_live()),
                shape,
            });
            return Some(Reply::Following { position });
        }
        loop {
            match self.live.as_mut()? {
                Live::Following { follower, shape } => {
                    let (rendered, position) = match follower.next().await? {
                        Next::Event(event) => {
                            let position = event.position;
                            // Boxed by the shape: the state a subscription keeps while it
                            // waits stays small.
                            (shape.clone().render(event).await, Some(position))
                        }
                        Next::Error(err) => (shape.clone().render_error(err).await, None),
                        Next::Live => {
                            if let Some(keep) = self.join() {
                                return Some(keep);
                            }
                            continue;
                        }
                    };
                    if position.is_some() {
                        FeedStats::add(&self.api.broker.stats.delivered, 1);
                    }
                    if let Some(reply) = self.deliver(&rendered, position) {
                        return Some(reply);
                    }
                }
                Live::Joined { inbox, batch, .. } => {
                    let Some(delivery) = batch.pop_front() else {
                        let mut taken = Vec::new();
                        inbox.take(64, &mut taken);
                        if taken.is_empty() {
                            inbox.ready().await;
                        }
                        batch.extend(taken);
                        continue;
                    };
                    match delivery {
                        Delivery::Render {
                            rendered, position, ..
                        } => {
                            if let Some(reply) = self.deliver(&rendered, position) {
                                return Some(reply);
                            }
                        }
                        Delivery::End { .. } => {
                            self.live = None;
                            return None;
                        }
                        Delivery::Behind(member) => {
                            let member = *member;
                            let follower = Follower::resume(
                                member.state,
                                &self.api.broker,
                                self.api.db.clone(),
                            );
                            self.live = Some(Live::Following {
                                follower: Box::new(follower),
                                shape: member.shape,
                            });
                        }
                    }
                }
            }
        }
    }

    /// A caught-up follower joins its topic's cohorts. With a shared inbox the replies
    /// end here in `Reply::Joined`, which hands the transport what it keeps.
    fn join(&mut self) -> Option<Reply> {
        let Some(Live::Following { follower, shape }) = self.live.take() else {
            return None;
        };
        let mut state = (*follower).into_state();
        if self.slot.is_none() {
            self.slot = state.take_slot();
        }
        let topic = state.topic;
        let cohorts = self.api.cohorts.clone();
        match &self.target {
            Target::Shared { inbox, key } => {
                cohorts.join(Member::new(*key, inbox.clone(), shape, state));
                Some(Reply::Joined {
                    topic,
                    keep: Keep {
                        slot: self.slot.take(),
                        finished: self.finished.take(),
                    },
                })
            }
            Target::Own => {
                let inbox = Inbox::new();
                cohorts.join(Member::new(0, inbox.clone(), shape, state));
                self.live = Some(Live::Joined {
                    inbox: inbox.clone(),
                    batch: VecDeque::new(),
                    _member: Membership {
                        cohorts,
                        topic,
                        inbox,
                    },
                });
                None
            }
        }
    }

    /// A rendering as this operation's reply (`None` when it yields nothing), its errors
    /// counted.
    fn deliver(&mut self, rendered: &Rendered, position: Option<i64>) -> Option<Reply> {
        let json = rendered.json.as_ref()?;
        for code in &rendered.codes {
            self.api.count_error(code);
        }
        self.count(rendered.codes.len());
        Some(Reply::Shared {
            json: json.clone(),
            position,
        })
    }

    fn count(&mut self, errors: usize) {
        if let Some(finished) = &mut self.finished {
            finished.count(errors);
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
