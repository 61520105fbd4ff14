//! A document's Yjs updates as a subscription (`documentUpdates`, and the y-websocket
//! endpoint's feed): the document's topic is its channel, its events are the rows of
//! `document_updates` (row id: the document), and the document's deletion ends it.
//!
//! A subscriber without a cursor first gets what its state vector lacks, read after the
//! opening (`first_event`); the follower then passes over the updates that state already
//! holds, by version (one document's versions commit in order, under its row's lock), and
//! delivers every later one once, in feed order.

use std::sync::Arc;

use serde_json::json;

use super::Filter;
use crate::pubsub::{ChangeEvent, Memo, Op};

/// The table of a document's Yjs updates.
pub const UPDATES: &str = "document_updates";

/// The table whose row's deletion ends a document's updates.
const DOCUMENTS: &str = "documents";

/// Selects document `id`'s updates, ended by its deletion.
pub const fn filter(id: i64) -> Filter {
    Filter {
        table: UPDATES,
        row_id: Some(id),
        ended_by: Some(DOCUMENTS),
    }
}

/// An update event's parts: its version and the update (base64 of the Yjs v1 encoding), or
/// `None` for an event that is not a document update or whose row image lacks them.
pub fn update_of(event: &ChangeEvent) -> Option<(i64, &str)> {
    if event.table != UPDATES {
        return None;
    }
    let version = event.row.get("version")?.as_i64()?;
    let update = event.row.get("update_data")?.as_str()?;
    Some((version, update))
}

/// A subscriber's first event: `update` (what its state vector lacks of the document as read
/// at `version`), at `position`, the feed position of the newest update that read holds, or
/// the subscription's opening when later (so resuming after it skips nothing the read
/// lacks). Made for one subscriber: its memo is its own, so nothing else renders from it.
pub fn first_event(
    document_id: i64,
    channel_id: i64,
    version: i64,
    update: String,
    position: i64,
) -> Arc<ChangeEvent> {
    Arc::new(ChangeEvent {
        position,
        table: UPDATES.to_owned(),
        op: Op::Insert,
        row_id: document_id,
        scope: Some(channel_id),
        row: json!({
            "document_id": document_id,
            "channel_id": channel_id,
            "version": version,
            "update_data": update,
        }),
        memo: Memo::default(),
    })
}
