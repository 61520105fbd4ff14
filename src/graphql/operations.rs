//! An operation's run, whatever the transport: the start through async-graphql under a
//! permit, then for a subscription the live phase of shared renderings, or a live query's
//! cohort membership. `Replies` (replies.rs) hands out what these make.

use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tracing::Instrument as _;

use super::replies::{self, AbortOnDrop, Finished};
use super::{Api, Reading, Replies, Reply, codes, error, live_query, loaders, shared};
use crate::auth::Viewer;
use crate::live::cohorts::Rendered;
use crate::pubsub::FeedStats;

impl Api {
    /// Runs one operation of any kind as `viewer`; its replies come from `Replies::next`
    /// (one for a query or mutation, one per event for a subscription), every error with a
    /// code. The operation's work runs in its span; when the replies end or are dropped
    /// (the client completed it), its duration and reply count are logged.
    ///
    /// Two phases. The start runs through async-graphql under `permit`: a query or
    /// mutation runs whole; a subscription's
    /// resolver checks it and hands it over (`shared::Handover`). Then, for a subscription,
    /// the live phase follows the topic and sends each event's rendering, made once per
    /// shape and shared (`Reply::Shared`). The start's state (async-graphql's stream, the
    /// parsed document, the request) is freed before the live phase begins.
    pub fn execute_stream(
        &self,
        request: async_graphql::Request,
        viewer: Viewer,
        permit: StartPermit,
        target: replies::Target,
    ) -> Replies {
        let span = operation_span(&request, viewer);
        // Made before the replies are first asked for, so an operation completed at once is
        // logged too, and its duration counts from here.
        let finished = Finished {
            span: span.clone(),
            started: std::time::Instant::now(),
            responses: 0,
            errors: 0,
        };
        let mut request = self.prepare(request, viewer);
        match live_query::options(&mut request) {
            Ok(None) => {}
            Ok(Some(options)) => {
                return self.live_replies(&request, viewer, options, permit, finished);
            }
            Err(err) => return self.refused(err, finished),
        }
        let handover = Arc::new(shared::Handover::default());
        let request = request.data(handover.clone());
        let api = self.clone();
        // The start runs in a task of its own, so that it makes progress (and gives its
        // permit back) however the transport drives the replies: a WebSocket whose client
        // does not read stops polling its operations, and must not hold a permit meanwhile.
        let (responses, start) = mpsc::channel(4);
        let task = {
            let handover = handover.clone();
            tokio::spawn(async move {
                let mut permit = Some(permit);
                let mut request = request;
                match shared::plan(&mut request) {
                    Ok(parts) => handover.set_shape(parts),
                    Err(err) => {
                        let _ = responses
                            .send(async_graphql::Response::from_errors(vec![err]))
                            .await;
                        return;
                    }
                }
                let mut inner = api.schema.execute_stream(request);
                while let Some(response) = inner.next().instrument(span.clone()).await {
                    // Started (or refused): the next operation may start.
                    permit = None;
                    if responses.send(response).await.is_err() {
                        return;
                    }
                }
                drop(permit);
            })
        };
        Replies {
            api: self.clone(),
            start: Some(start),
            start_task: Some(AbortOnDrop(task)),
            handover: Some(handover),
            live: None,
            target,
            slot: None,
            live_query: None,
            finished: Some(finished),
        }
    }

    /// Replies that are one response with `err`, refused before anything ran.
    pub(super) fn refused(&self, err: async_graphql::ServerError, finished: Finished) -> Replies {
        let (responses, start) = mpsc::channel(1);
        let _ = responses.try_send(async_graphql::Response::from_errors(vec![err]));
        Replies {
            api: self.clone(),
            start: Some(start),
            start_task: None,
            handover: None,
            live: None,
            target: replies::Target::Own,
            slot: None,
            live_query: None,
            finished: Some(finished),
        }
    }

    /// A live query's replies: a member of its cohort (see `live::queries`), holding one of
    /// the viewer's subscription slots.
    fn live_replies(
        &self,
        request: &async_graphql::Request,
        viewer: Viewer,
        options: live_query::LiveOptions,
        permit: StartPermit,
        finished: Finished,
    ) -> Replies {
        let slot = match viewer {
            Viewer::User(id) => match self.quota.acquire(id) {
                Some(slot) => Some(slot),
                None => {
                    // Counted when the replies hand it out, like every refusal.
                    let err = error::coded(
                        error::code::LIMIT_EXCEEDED,
                        format!(
                            "at most {} open subscriptions and live queries per user",
                            self.quota.max()
                        ),
                        None,
                    );
                    return self.refused(err, finished);
                }
            },
            _ => None,
        };
        let member = self
            .live_queries()
            .join(live_query::LiveKey::new(request, viewer), options.throttle);
        // Joining is the whole start: executions wait for the engine's own permits, so the
        // transport may start its next operation at once (and a first execution that is
        // retried holds nothing of the socket's).
        drop(permit);
        Replies {
            api: self.clone(),
            start: None,
            start_task: None,
            handover: None,
            live: None,
            target: replies::Target::Own,
            slot: None,
            live_query: Some(Box::new(replies::LiveReplies {
                member,
                _slot: slot,
            })),
            finished: Some(finished),
        }
    }

    /// The live queries' engine, made (and its matching of the feed started) by the first
    /// live query. Its executions hold a pooled connection each; at most half the pool's
    /// connections run them at once, so requests keep the other half.
    fn live_queries(&self) -> &live_query::LiveQueries {
        self.live_queries.get_or_init(|| {
            // Subscribed before any execution takes its cursor (see `live::queries`).
            let events = self.broker.subscribe_all();
            let parts = Arc::downgrade(&self.0);
            let engine = live_query::LiveQueries::new(
                self.broker.clone(),
                Box::new(move |key| {
                    let parts = parts.upgrade();
                    Box::pin(async move {
                        match parts {
                            Some(parts) => Api(parts).execute_live(key).await,
                            // The server is gone; nobody reads the stream.
                            None => crate::live::queries::Outcome::Final(Arc::default()),
                        }
                    })
                }),
                self.pool_connections.div_ceil(2),
                Reply::cursor,
            );
            tokio::spawn(engine.clone().run(events));
            engine
        })
    }

    /// A permit to start an operation (see `Live::subscription_starts`). Transports take it
    /// before they hand the operation over, so that what waits for it is as small as can
    /// be; it is released when the start ends.
    pub fn start_permit(&self) -> impl std::future::Future<Output = StartPermit> + Send + 'static {
        let starts = self.subscription_starts.clone();
        async move {
            StartPermit {
                _permit: starts.acquire_owned().await.ok(),
            }
        }
    }

    /// Renders one event (or error) under `shape`: the subscription's document run in
    /// render mode, as no viewer (see `shared`). `Err` holds a rendering with an internal
    /// error (a failed author lookup, say): delivered, but not kept for others to share,
    /// so the next subscriber tries again.
    pub(super) async fn render(
        &self,
        shape: &shared::Shape,
        one: shared::RenderOne,
    ) -> Result<Rendered, Rendered> {
        FeedStats::add(&self.broker.stats.renders, 1);
        let mut request = async_graphql::Request::new(shape.query.clone())
            .variables(shape.variables.clone())
            .data(one)
            .data(loaders::loaders(Reading::pool(self.db.clone())));
        request.operation_name = shape.operation_name.clone();
        self.documents.attach(&mut request);
        let Some(mut response) = self.schema.execute_stream(request).next().await else {
            return Ok(Rendered::default());
        };
        let codes = codes(&mut response);
        let json = match serde_json::to_string(&response) {
            Ok(json) => json,
            Err(err) => {
                // Only a map with non-string keys fails; a GraphQL response has none.
                tracing::error!(error = %err, "a response could not be serialized");
                return Ok(Rendered::default());
            }
        };
        let internal = codes
            .iter()
            .any(|code| code == error::code::INTERNAL_SERVER_ERROR);
        let rendered = Rendered {
            json: Some(json.into()),
            codes,
        };
        if internal {
            Err(rendered)
        } else {
            Ok(rendered)
        }
    }
}

/// A permit to start one operation (`Api::start_permit`).
pub struct StartPermit {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// The span an operation runs in: its name (when the request names one) and the viewer.
pub(super) fn operation_span(request: &async_graphql::Request, viewer: Viewer) -> tracing::Span {
    let viewer = match viewer {
        Viewer::User(id) => Some(id),
        _ => None,
    };
    tracing::info_span!(
        "graphql",
        operation = request.operation_name.as_deref().unwrap_or(""),
        viewer,
    )
}
