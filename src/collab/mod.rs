//! Collaborative documents beyond GraphQL: the fold of texts written outside the CRDT into
//! documents' Yjs histories.

pub mod fold;
