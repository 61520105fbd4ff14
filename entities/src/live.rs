//! Live tables: those whose changes `change_log` captures (`migration::make_live`).

use serde::de::DeserializeOwned;

/// A model whose table is live. Its row image in `change_log` (JSON with the table's column
/// names) decodes into the model; `TABLE` is the name `change_log.table_name` records.
pub trait LiveModel: DeserializeOwned {
    /// The table's name.
    const TABLE: &'static str;
}

impl LiveModel for super::message::Model {
    const TABLE: &'static str = "messages";
}

impl LiveModel for super::document::Model {
    const TABLE: &'static str = "documents";
}

impl LiveModel for super::channel::Model {
    const TABLE: &'static str = "channels";
}

impl LiveModel for super::channel_member::Model {
    const TABLE: &'static str = "channel_members";
}
