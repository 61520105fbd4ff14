//! Collaborative documents beyond GraphQL:
//! - `socket`: the y-websocket endpoint `/yjs/{documentId}` (a thin transport over the
//!   delivery engine's document feed, `live::documents`, and the Yjs store,
//!   `store::yjs`), with `protocol` (y-protocols messages, close codes);
//! - `awareness`: cursors and presence, relayed among a document's peers here and on the
//!   other processes (PostgreSQL NOTIFY), never stored;
//! - `fold`: texts written outside the CRDT (SQL) folded into documents' Yjs histories.

pub mod awareness;
pub mod fold;
pub mod protocol;
mod socket;

pub use socket::{Endpoint, serve};
