//! A whole-text write as a Yjs edit: the character diff from the document's text to the new
//! one, as insertions and removals of its `Y.Text`.

use yrs::{Doc, Text, Transact};

use super::TEXT;

/// The Yjs update that edits `doc`'s text from `old` to `new` by a character diff
/// (`similar`, its time bounded): one removal and one insertion per changed run, applied
/// from the end so that earlier offsets stay put.
pub fn edit(doc: &Doc, old: &str, new: &str) -> Vec<u8> {
    let text = doc.get_or_insert_text(TEXT);
    let mut t = doc.transact_mut();
    // yrs indexes text by UTF-8 byte (the document's default offset kind); the diff counts
    // characters.
    let old_at = byte_offsets(old);
    let new_at = byte_offsets(new);
    let diff = similar::TextDiff::configure()
        .timeout(std::time::Duration::from_millis(500))
        .diff_chars(old, new);
    for op in diff.ops().iter().rev() {
        let (tag, old_range, new_range) = op.as_tag_tuple();
        if tag == similar::DiffTag::Equal {
            continue;
        }
        let start = old_at[old_range.start];
        let removed = old_at[old_range.end] - start;
        let inserted = &new[new_at[new_range.start]..new_at[new_range.end]];
        if removed > 0 {
            text.remove_range(&mut t, start as u32, removed as u32);
        }
        if !inserted.is_empty() {
            text.insert(&mut t, start as u32, inserted);
        }
    }
    t.encode_update_v1()
}

/// The byte offset of each character of `text`, and of its end.
fn byte_offsets(text: &str) -> Vec<usize> {
    text.char_indices()
        .map(|(at, _)| at)
        .chain(std::iter::once(text.len()))
        .collect()
}
