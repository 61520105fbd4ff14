//! Validation of client input: ids, cursors, page sizes and text limits. Every failure is a
//! `BAD_USER_INPUT` that names the offending field.

use async_graphql::ID;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::error::{AppError, AppResult};
use crate::store::PageRequest;

/// Longest user name, in characters.
pub const USER_NAME_MAX: usize = 100;
/// Longest email address, in characters.
pub const EMAIL_MAX: usize = 254;
/// Shortest and longest password, in characters.
pub const PASSWORD_MIN: usize = 8;
pub const PASSWORD_MAX: usize = 128;
/// Longest channel name, in characters.
pub const CHANNEL_NAME_MAX: usize = 100;
/// Longest message body, in characters.
pub const MESSAGE_BODY_MAX: usize = 4_000;
/// Longest document title, in characters.
pub const DOCUMENT_TITLE_MAX: usize = 200;
/// Longest document body, in characters.
pub const DOCUMENT_BODY_MAX: usize = crate::store::yjs::MAX_TEXT_CHARS;
/// Page size when neither `first` nor `last` is given.
pub const PAGE_SIZE_DEFAULT: u64 = 20;
/// Largest `first` or `last`; `--max-page-size` may lower it, not raise it (the complexity
/// check counts a page as at most this many items).
pub const PAGE_SIZE_MAX: i32 = 100;

/// A database id from a GraphQL `ID`.
pub fn id(field: &str, value: &ID) -> AppResult<i64> {
    match value.as_str().parse::<i64>() {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(AppError::bad_input(
            field,
            format!("{field}: not a valid id"),
        )),
    }
}

/// Text that must not be blank and must fit `max` characters; returned trimmed.
pub fn required_text<'a>(field: &str, value: &'a str, max: usize) -> AppResult<&'a str> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(AppError::bad_input(
            field,
            format!("{field}: must not be empty"),
        ));
    }
    limited_text(field, trimmed, max)
}

/// Text that may be empty but must fit `max` characters.
pub fn limited_text<'a>(field: &str, value: &'a str, max: usize) -> AppResult<&'a str> {
    if value.chars().count() > max {
        return Err(AppError::bad_input(
            field,
            format!("{field}: must be at most {max} characters"),
        ));
    }
    Ok(value)
}

/// A document's text: at most `DOCUMENT_BODY_MAX` characters and no NUL character (a Yjs
/// edit cannot add one: PostgreSQL cannot store it).
pub fn document_body<'a>(field: &str, value: &'a str) -> AppResult<&'a str> {
    if value.contains('\0') {
        return Err(AppError::bad_input(
            field,
            format!("{field}: must not contain a NUL character"),
        ));
    }
    limited_text(field, value, DOCUMENT_BODY_MAX)
}

/// A plausible email address, lower-cased: one `@`, a non-empty local part, a dotted domain,
/// no whitespace.
pub fn email(field: &str, value: &str) -> AppResult<String> {
    let email = value.trim().to_lowercase();
    let invalid = || AppError::bad_input(field, format!("{field}: not a valid email address"));
    if email.chars().count() > EMAIL_MAX || email.chars().any(char::is_whitespace) {
        return Err(invalid());
    }
    let Some((local, domain)) = email.split_once('@') else {
        return Err(invalid());
    };
    let domain_ok = !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..");
    if local.is_empty() || !domain_ok {
        return Err(invalid());
    }
    Ok(email)
}

/// A password of acceptable length.
pub fn password(field: &str, value: &str) -> AppResult<()> {
    let length = value.chars().count();
    if length < PASSWORD_MIN {
        return Err(AppError::bad_input(
            field,
            format!("{field}: must be at least {PASSWORD_MIN} characters"),
        ));
    }
    if length > PASSWORD_MAX {
        return Err(AppError::bad_input(
            field,
            format!("{field}: must be at most {PASSWORD_MAX} characters"),
        ));
    }
    Ok(())
}

/// What a pagination cursor points into; a cursor of one kind is refused by another list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CursorKind {
    Message,
    Channel,
    /// A position in the change log (subscription events).
    Event,
}

impl CursorKind {
    fn prefix(self) -> &'static str {
        match self {
            CursorKind::Message => "message:",
            CursorKind::Channel => "channel:",
            CursorKind::Event => "event:",
        }
    }
}

/// The opaque cursor for row `id` of a list of `kind`.
pub fn encode_cursor(kind: CursorKind, id: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}{id}", kind.prefix()))
}

/// The row id inside a cursor of `kind`.
pub fn decode_cursor(field: &str, kind: CursorKind, cursor: &str) -> AppResult<i64> {
    let invalid = || AppError::bad_input(field, format!("{field}: not a valid cursor"));
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let id = text.strip_prefix(kind.prefix()).ok_or_else(invalid)?;
    match id.parse::<i64>() {
        Ok(id) if id > 0 => Ok(id),
        // Position 0 is the start of the change log: `feedCursor` before any change.
        Ok(0) if kind == CursorKind::Event => Ok(0),
        _ => Err(invalid()),
    }
}

/// Relay arguments checked and turned into a `PageRequest`: `first` or `last` (not both),
/// each between 0 and `PAGE_SIZE_MAX`; `after`/`before` cursors of `kind`.
pub fn page_request(
    kind: CursorKind,
    max: i32,
    first: Option<i32>,
    after: Option<&str>,
    last: Option<i32>,
    before: Option<&str>,
) -> AppResult<PageRequest> {
    let size = |field: &str, value: i32| -> AppResult<u64> {
        if !(0..=max).contains(&value) {
            return Err(AppError::bad_input(
                field,
                format!("{field}: must be between 0 and {max}"),
            ));
        }
        Ok(value as u64)
    };
    let (limit, from_end) = match (first, last) {
        (Some(_), Some(_)) => {
            return Err(AppError::bad_input(
                "last",
                "last: pass either first or last, not both",
            ));
        }
        (Some(first), None) => (size("first", first)?, false),
        (None, Some(last)) => (size("last", last)?, true),
        (None, None) => (PAGE_SIZE_DEFAULT.min(max.max(0) as u64), false),
    };
    Ok(PageRequest {
        limit,
        after: after.map(|c| decode_cursor("after", kind, c)).transpose()?,
        before: before
            .map(|c| decode_cursor("before", kind, c))
            .transpose()?,
        from_end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let cursor = encode_cursor(CursorKind::Message, 42);
        assert_eq!(
            decode_cursor("after", CursorKind::Message, &cursor).unwrap(),
            42
        );
        assert!(decode_cursor("after", CursorKind::Channel, &cursor).is_err());
        assert!(decode_cursor("after", CursorKind::Message, "%%%").is_err());
        assert!(decode_cursor("after", CursorKind::Message, "").is_err());
        let negative = URL_SAFE_NO_PAD.encode("message:-1");
        assert!(decode_cursor("after", CursorKind::Message, &negative).is_err());
    }

    proptest::proptest! {
        /// Any string is a cursor or a BAD_USER_INPUT naming the field, never a panic.
        #[test]
        fn any_string_decodes_or_is_refused(cursor in ".*") {
            for kind in [CursorKind::Message, CursorKind::Channel, CursorKind::Event] {
                match decode_cursor("after", kind, &cursor) {
                    Ok(id) => proptest::prop_assert!(id >= 0),
                    Err(AppError::BadInput { field, .. }) => proptest::prop_assert_eq!(field, "after"),
                    Err(other) => proptest::prop_assert!(false, "unexpected {:?}", other),
                }
            }
        }

        /// Base64 of arbitrary bytes (the shape of a real cursor) is handled the same way.
        #[test]
        fn any_encoded_bytes_decode_or_are_refused(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let cursor = URL_SAFE_NO_PAD.encode(&bytes);
            for kind in [CursorKind::Message, CursorKind::Channel, CursorKind::Event] {
                let _ = decode_cursor("after", kind, &cursor);
            }
        }

        /// Every cursor we hand out decodes to what it was made from, only for its own kind.
        #[test]
        fn issued_cursors_round_trip(id in 1..i64::MAX) {
            for kind in [CursorKind::Message, CursorKind::Channel, CursorKind::Event] {
                let cursor = encode_cursor(kind, id);
                proptest::prop_assert_eq!(decode_cursor("after", kind, &cursor).ok(), Some(id));
            }
            let cursor = encode_cursor(CursorKind::Message, id);
            proptest::prop_assert!(decode_cursor("after", CursorKind::Event, &cursor).is_err());
        }
    }

    #[test]
    fn the_start_of_the_log_is_a_valid_event_cursor_only() {
        let start = encode_cursor(CursorKind::Event, 0);
        assert_eq!(
            decode_cursor("after", CursorKind::Event, &start).unwrap(),
            0
        );
        let zero = encode_cursor(CursorKind::Message, 0);
        assert!(decode_cursor("after", CursorKind::Message, &zero).is_err());
    }

    #[test]
    fn emails_are_checked_and_normalised() {
        assert_eq!(
            email("email", " Ada@Example.COM ").unwrap(),
            "ada@example.com"
        );
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "a b@example.com",
            "a@b@c.d",
            "ada@.com",
            "ada@example..com",
        ] {
            assert!(email("email", bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn page_sizes_are_bounded() {
        let page =
            |max, first, last| page_request(CursorKind::Message, max, first, None, last, None);
        assert!(page(PAGE_SIZE_MAX, Some(101), None).is_err());
        assert!(page(PAGE_SIZE_MAX, Some(-1), None).is_err());
        assert!(page(PAGE_SIZE_MAX, Some(1), Some(1)).is_err());
        // A lower limit refuses above it, and the default page is cut to it.
        assert!(page(5, Some(6), None).is_err());
        assert_eq!(page(5, None, None).unwrap().limit, 5);
        assert_eq!(
            page(PAGE_SIZE_MAX, None, None).unwrap().limit,
            PAGE_SIZE_DEFAULT
        );
        let request = page(PAGE_SIZE_MAX, None, Some(5)).unwrap();
        assert_eq!((request.limit, request.from_end), (5, true));
    }

    #[test]
    fn ids_must_be_positive_integers() {
        assert_eq!(id("id", &ID::from("12")).unwrap(), 12);
        assert!(id("id", &ID::from("abc")).is_err());
        assert!(id("id", &ID::from("0")).is_err());
        assert!(id("id", &ID::from("99999999999999999999")).is_err());
    }
}
