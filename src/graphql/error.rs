//! The one place where domain errors become GraphQL errors.
//!
//! Every error a client can see carries `extensions.code` from the contract's list (`code`,
//! listed in the README under "Using the API"). Internal errors are logged here with their cause chain and reach the client only
//! as `INTERNAL_SERVER_ERROR` with a generic message: no SQL text, stack or secret.
//!
//! `AppError` deliberately does not implement `Display`: async-graphql turns any `Display`
//! value into an error message, and a bare `?` on a database error would leak its SQL. With
//! no `Display`, the only way into a GraphQL error is the `From` impl below.

use std::sync::Arc;

use async_graphql::ErrorExtensions;

use crate::auth::AuthError;
use crate::store::StoreError;

/// The codes of the API contract, as sent in `extensions.code`.
pub mod code {
    pub const UNAUTHENTICATED: &str = "UNAUTHENTICATED";
    pub const FORBIDDEN: &str = "FORBIDDEN";
    pub const NOT_FOUND: &str = "NOT_FOUND";
    pub const CONFLICT: &str = "CONFLICT";
    pub const BAD_USER_INPUT: &str = "BAD_USER_INPUT";
    pub const CURSOR_EXPIRED: &str = "CURSOR_EXPIRED";
    pub const RATE_LIMITED: &str = "RATE_LIMITED";
    pub const LIMIT_EXCEEDED: &str = "LIMIT_EXCEEDED";
    pub const PERSISTED_QUERY_NOT_FOUND: &str = "PERSISTED_QUERY_NOT_FOUND";
    pub const INTERNAL_SERVER_ERROR: &str = "INTERNAL_SERVER_ERROR";

    /// Every code, in the order `ErrorCounts` keeps them.
    pub const ALL: [&str; 10] = [
        UNAUTHENTICATED,
        FORBIDDEN,
        NOT_FOUND,
        CONFLICT,
        BAD_USER_INPUT,
        CURSOR_EXPIRED,
        RATE_LIMITED,
        LIMIT_EXCEEDED,
        PERSISTED_QUERY_NOT_FOUND,
        INTERNAL_SERVER_ERROR,
    ];
}

/// Errors sent to clients so far, by code (read by `/metrics`).
#[derive(Debug, Default)]
pub struct ErrorCounts([std::sync::atomic::AtomicU64; code::ALL.len()]);

impl ErrorCounts {
    /// Counts one error with `code` (one of `code::ALL`; any other is a bug, logged).
    pub fn add(&self, code: &str) {
        match code::ALL.iter().position(|known| *known == code) {
            Some(i) => {
                self.0[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            None => {
                debug_assert!(false, "error code {code} is missing from code::ALL");
                tracing::error!(code, "an error code missing from code::ALL was not counted");
            }
        }
    }

    /// Each code with its count, leaving out those never sent.
    pub fn sent(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        code::ALL
            .iter()
            .zip(&self.0)
            .map(|(code, count)| (*code, count.load(std::sync::atomic::Ordering::Relaxed)))
            .filter(|(_, count)| *count > 0)
    }
}

/// What a resolver can fail with.
#[derive(Clone, Debug)]
pub enum AppError {
    /// No valid credentials.
    Unauthenticated(&'static str),
    /// Authenticated, but not allowed.
    Forbidden(String),
    /// The thing does not exist.
    NotFound(String),
    /// A stale `expectedVersion`; nothing was written.
    Conflict { current_version: i32 },
    /// The `after` cursor points before what the change log still holds.
    CursorExpired,
    /// The client sent something invalid; `field` names the argument or input field.
    BadInput { field: String, message: String },
    /// Too many attempts from this client address; try again after this many seconds.
    RateLimited { retry_after_secs: u64 },
    /// A configured limit (open subscriptions, operations on one socket) is reached.
    LimitExceeded(String),
    /// Something broke on our side; logged, shown generically.
    Internal(Arc<dyn std::error::Error + Send + Sync>),
}

/// What resolvers return.
pub type AppResult<T> = Result<T, AppError>;

impl AppError {
    /// A `BAD_USER_INPUT` error about `field`.
    pub fn bad_input(field: impl Into<String>, message: impl Into<String>) -> Self {
        AppError::BadInput {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The `extensions.code` this error is sent with.
    pub fn code(&self) -> &'static str {
        match self {
            AppError::Unauthenticated(_) => code::UNAUTHENTICATED,
            AppError::Forbidden(_) => code::FORBIDDEN,
            AppError::NotFound(_) => code::NOT_FOUND,
            AppError::Conflict { .. } => code::CONFLICT,
            AppError::BadInput { .. } => code::BAD_USER_INPUT,
            AppError::CursorExpired => code::CURSOR_EXPIRED,
            AppError::RateLimited { .. } => code::RATE_LIMITED,
            AppError::LimitExceeded(_) => code::LIMIT_EXCEEDED,
            AppError::Internal(_) => code::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<StoreError> for AppError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Db(_) => AppError::Internal(Arc::new(err)),
            StoreError::DuplicateEmail => {
                AppError::bad_input("email", "email: this email is already registered")
            }
            StoreError::NotFound(what) => AppError::NotFound(format!("{what} not found")),
            StoreError::Forbidden(why) => AppError::Forbidden(why.to_owned()),
            StoreError::Conflict { current_version } => AppError::Conflict { current_version },
            StoreError::UnknownViewer => {
                AppError::Unauthenticated("the signed-in user no longer exists")
            }
            StoreError::BadUpdate(why) => {
                AppError::bad_input("input.update", format!("input.update: {why}"))
            }
        }
    }
}

impl From<crate::live::LiveError> for AppError {
    fn from(err: crate::live::LiveError) -> Self {
        use crate::live::LiveError;
        match err {
            LiveError::Revoked => {
                AppError::Forbidden("you are no longer a member of this channel".into())
            }
            LiveError::CursorExpired => AppError::CursorExpired,
            LiveError::Log(_) => AppError::Internal(Arc::new(err)),
        }
    }
}

impl From<AuthError> for AppError {
    fn from(err: AuthError) -> Self {
        AppError::Internal(Arc::new(err))
    }
}

/// Logs `err` with every cause in its chain.
fn log_internal(err: &(dyn std::error::Error + 'static)) {
    let mut chain = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        chain.push_str(": ");
        chain.push_str(&cause.to_string());
        source = cause.source();
    }
    tracing::error!(error = %chain, "internal error");
}

impl From<AppError> for async_graphql::Error {
    fn from(err: AppError) -> Self {
        let code = err.code();
        match err {
            AppError::Unauthenticated(message) => {
                async_graphql::Error::new(message).extend_with(|_, e| e.set("code", code))
            }
            AppError::Forbidden(message)
            | AppError::NotFound(message)
            | AppError::LimitExceeded(message) => {
                async_graphql::Error::new(message).extend_with(|_, e| e.set("code", code))
            }
            AppError::Conflict { current_version } => async_graphql::Error::new(format!(
                "version conflict: the current version is {current_version}"
            ))
            .extend_with(|_, e| {
                e.set("code", code);
                e.set("currentVersion", current_version);
            }),
            AppError::RateLimited { retry_after_secs } => async_graphql::Error::new(format!(
                "too many attempts from this address; try again in {retry_after_secs} s"
            ))
            .extend_with(|_, e| {
                e.set("code", code);
                e.set("retryAfter", retry_after_secs);
            }),
            AppError::CursorExpired => async_graphql::Error::new(
                "the cursor is older than the change log's retention; \
                 reload the current state and subscribe without `after`",
            )
            .extend_with(|_, e| e.set("code", code)),
            AppError::BadInput { field, message } => async_graphql::Error::new(message)
                .extend_with(|_, e| {
                    e.set("code", code);
                    e.set("field", field.as_str());
                }),
            AppError::Internal(cause) => {
                log_internal(cause.as_ref());
                async_graphql::Error::new("internal server error")
                    .extend_with(|_, e| e.set("code", code))
            }
        }
    }
}

/// The one way to make a coded error outside a resolver: `message` with `extensions.code`
/// set to `code` (a constant of `code`), at `pos` when it points into the document. A
/// transport that answers on its own (a request it could not read, an operation past a
/// limit) makes it through `Api::refuse`, which also counts it; one returned in a response
/// is counted as the response leaves `Api`.
pub fn coded(
    code: &'static str,
    message: impl Into<String>,
    pos: Option<async_graphql::Pos>,
) -> async_graphql::ServerError {
    let mut err = async_graphql::ServerError::new(message, pos);
    let mut extensions = async_graphql::ErrorExtensionValues::default();
    extensions.set("code", code);
    err.extensions = Some(extensions);
    err
}

/// Whether `response` answers a request that never ran (its document did not parse or
/// validate, or was refused before execution): no data, and no error found while resolving
/// (those carry a path). GraphQL over HTTP answers it with 400, graphql-ws with `error`.
pub fn is_request_error(response: &async_graphql::Response) -> bool {
    response.data == async_graphql::Value::Null
        && !response.errors.is_empty()
        && response.errors.iter().all(|err| err.path.is_empty())
}

/// Gives every error that has no `extensions.code` yet one: BAD_USER_INPUT. Every error of
/// ours goes through `From<AppError>` and has a code, so an uncoded one comes from
/// async-graphql's own checks of the request: syntax, validation, or coercion of variables
/// and arguments (those carry a path, as they are found while resolving). Their messages
/// describe the client's document, never our data.
pub fn ensure_codes(response: &mut async_graphql::Response) {
    for error in &mut response.errors {
        let has_code = error
            .extensions
            .as_ref()
            .is_some_and(|extensions| extensions.get("code").is_some());
        if !has_code {
            error
                .extensions
                .get_or_insert_with(Default::default)
                .set("code", code::BAD_USER_INPUT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extension(err: &async_graphql::Error, key: &str) -> Option<async_graphql::Value> {
        err.extensions.as_ref().and_then(|e| e.get(key)).cloned()
    }

    #[test]
    fn database_errors_are_internal_and_hide_their_text() {
        let db = sea_orm::DbErr::Custom("SELECT secret FROM users".into());
        let err: async_graphql::Error = AppError::from(StoreError::Db(db)).into();
        assert_eq!(err.message, "internal server error");
        assert_eq!(
            extension(&err, "code"),
            Some(async_graphql::Value::from("INTERNAL_SERVER_ERROR"))
        );
    }

    #[test]
    fn conflict_carries_current_version() {
        let err: async_graphql::Error = AppError::Conflict { current_version: 3 }.into();
        assert_eq!(extension(&err, "code"), Some("CONFLICT".into()));
        assert_eq!(extension(&err, "currentVersion"), Some(3.into()));
    }

    #[test]
    fn coded_errors_carry_their_code_and_request_errors_are_told_apart() {
        let err = coded(code::LIMIT_EXCEEDED, "too many", None);
        let json = serde_json::to_value(&err).unwrap();
        assert_eq!(
            json,
            serde_json::json!({ "message": "too many", "extensions": { "code": "LIMIT_EXCEEDED" } })
        );
        let refused = async_graphql::Response::from_errors(vec![err.clone()]);
        assert!(is_request_error(&refused));
        let mut resolved = err;
        resolved.path = vec![async_graphql::PathSegment::Field("me".into())];
        assert!(!is_request_error(&async_graphql::Response::from_errors(
            vec![resolved]
        )));
        assert!(!is_request_error(&async_graphql::Response::new(
            async_graphql::Value::Null
        )));
    }

    #[test]
    fn bad_input_names_the_field() {
        let err: async_graphql::Error = AppError::bad_input("input.body", "body: too long").into();
        assert_eq!(extension(&err, "code"), Some("BAD_USER_INPUT".into()));
        assert_eq!(extension(&err, "field"), Some("input.body".into()));
    }
}
