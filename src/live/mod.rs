//! The delivery engine: what turns the hub's events into one subscription's stream, for any
//! transport. It knows no socket and no GraphQL.
//!
//! - `follow`: a subscription to a topic from a cursor: replay (from the broker's memory of
//!   recent events, else the log), then live events, catching up through the log when it
//!   falls behind the topic's buffer; revocation on membership loss; the end of the followed
//!   row or channel.
//! - `queries`: live queries: cohorts of identical queries, each executed again only when a
//!   change touches what it read, its results diffed into shared patches.
//! - `documents`: a document's Yjs updates: what a subscriber's state vector lacks, then
//!   every later update once.
//! - `quota`: each user's open subscriptions in this process, against a maximum.
//!
//! A resolver opens a subscription (`Opening::new`, which subscribes before reading how far
//! the log is published), checks access and the cursor, and turns the opening into a
//! `Follower` with a `Filter` saying which of the topic's events it delivers. Rendering an
//! event for a client is the caller's business.

pub mod cohorts;
pub mod documents;
pub mod follow;
pub mod queries;
pub mod quota;

pub use follow::{Filter, Follower, LiveError, Next, Opening};
pub use quota::{QuotaSlot, SubscriptionQuota};
