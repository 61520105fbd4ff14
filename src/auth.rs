//! Identity: JWT issue and verify (HS256 with expiry), argon2 password hashing, and the
//! `Viewer` a request acts as. No database access here.

use std::sync::OnceLock;
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Why a token or a password could not be handled.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot sign token")]
    Sign(#[source] jsonwebtoken::errors::Error),
    #[error("cannot hash password: {0}")]
    Hash(String),
    #[error("password hashing task failed")]
    Join(#[from] tokio::task::JoinError),
}

/// Who a request acts as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Viewer {
    /// No credentials were presented.
    Anonymous,
    /// A valid token for this user id.
    User(i64),
    /// Credentials were presented but are malformed, expired or not ours.
    InvalidToken,
}

impl Viewer {
    /// The viewer for an `Authorization` header value (or a `connection_init` payload's
    /// `authorization` value): `Bearer <JWT>`.
    pub fn from_authorization(value: Option<&str>, keys: &JwtKeys) -> Viewer {
        let Some(value) = value else {
            return Viewer::Anonymous;
        };
        match bearer_token(value).and_then(|token| keys.verify(token)) {
            Some(user_id) => Viewer::User(user_id),
            None => Viewer::InvalidToken,
        }
    }

    /// When the token of a valid `Authorization` value expires, in seconds since the epoch.
    pub fn expiry(value: Option<&str>, keys: &JwtKeys) -> Option<u64> {
        let token = bearer_token(value?)?;
        keys.verify_claims(token).map(|(_, expires)| expires)
    }

    /// When the token of a valid `Authorization` value expires, on the monotonic clock: a
    /// connection or stream opened with it ends then.
    pub fn deadline(value: Option<&str>, keys: &JwtKeys) -> Option<tokio::time::Instant> {
        Self::expiry(value, keys).map(instant_of)
    }
}

/// The monotonic instant of a time in seconds since the epoch (now, if it has passed).
fn instant_of(epoch_secs: u64) -> tokio::time::Instant {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // At most a year ahead: a far-future `exp` must not overflow the clock.
    let left = std::time::Duration::from_secs(epoch_secs)
        .saturating_sub(now)
        .min(std::time::Duration::from_secs(365 * 24 * 3600));
    tokio::time::Instant::now() + left
}

/// The token of a `Bearer <token>` value.
fn bearer_token(value: &str) -> Option<&str> {
    let mut parts = value.trim().splitn(2, ' ');
    let scheme = parts.next().unwrap_or_default();
    let token = parts.next().unwrap_or_default().trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A new secret: 32 random bytes, hex-encoded.
pub fn random_secret() -> String {
    let mut secret = [0u8; 32];
    OsRng.fill_bytes(&mut secret);
    secret.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    iat: u64,
    exp: u64,
}

/// The HS256 keys and token lifetime of this process.
#[derive(Clone)]
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("JwtKeys")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl JwtKeys {
    /// Keys from a shared secret.
    pub fn new(secret: &[u8], ttl: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 5;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl,
        }
    }

    /// Keys from 32 random bytes: tokens die with the process.
    pub fn random(ttl: Duration) -> Self {
        Self::new(random_secret().as_bytes(), ttl)
    }

    /// A signed token for `user_id`, valid for the configured lifetime.
    pub fn issue(&self, user_id: i64) -> Result<String, AuthError> {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: user_id.to_string(),
            iat: now,
            exp: now + self.ttl.as_secs(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(AuthError::Sign)
    }

    /// The user id of a valid, unexpired token signed with our secret and HS256.
    pub fn verify(&self, token: &str) -> Option<i64> {
        self.verify_claims(token).map(|(user_id, _)| user_id)
    }

    /// The user id and expiry (seconds since the epoch) of a valid token.
    fn verify_claims(&self, token: &str) -> Option<(i64, u64)> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).ok()?;
        Some((data.claims.sub.parse().ok()?, data.claims.exp))
    }
}

/// Hashes a password with argon2id (PHC string), off the async runtime.
pub async fn hash_password(password: String) -> Result<String, AuthError> {
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .map_err(|e| AuthError::Hash(e.to_string()))
    })
    .await?
}

/// Checks a password against a stored hash, off the async runtime. With no stored hash
/// (unknown email) it still spends the same work, so timing does not reveal which emails exist.
pub async fn verify_password(password: String, hash: Option<String>) -> Result<bool, AuthError> {
    tokio::task::spawn_blocking(move || {
        let known = hash.is_some();
        let hash = match hash {
            Some(hash) => hash,
            None => dummy_hash()?.to_owned(),
        };
        let Ok(parsed) = PasswordHash::new(&hash) else {
            return Ok(false);
        };
        let ok = Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
        Ok(known && ok)
    })
    .await?
}

fn dummy_hash() -> Result<&'static str, AuthError> {
    static DUMMY: OnceLock<String> = OnceLock::new();
    if let Some(hash) = DUMMY.get() {
        return Ok(hash);
    }
    let salt = SaltString::generate(&mut OsRng);
    let hash = Argon2::default()
        .hash_password(b"not a real password", &salt)
        .map_err(|e| AuthError::Hash(e.to_string()))?
        .to_string();
    Ok(DUMMY.get_or_init(|| hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips_and_foreign_tokens_fail() {
        let keys = JwtKeys::new(b"secret-one", Duration::from_secs(60));
        let token = keys.issue(42).unwrap();
        assert_eq!(keys.verify(&token), Some(42));
        let other = JwtKeys::new(b"secret-two", Duration::from_secs(60));
        assert_eq!(other.verify(&token), None);
        assert_eq!(keys.verify("not.a.token"), None);
    }

    #[test]
    fn expired_token_is_refused() {
        let keys = JwtKeys::new(b"secret", Duration::from_secs(0));
        let claims = Claims {
            sub: "1".into(),
            iat: 0,
            exp: 1,
        };
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &keys.encoding).unwrap();
        assert_eq!(keys.verify(&token), None);
    }

    #[test]
    fn authorization_header_is_parsed() {
        let keys = JwtKeys::new(b"secret", Duration::from_secs(60));
        let token = keys.issue(7).unwrap();
        assert_eq!(Viewer::from_authorization(None, &keys), Viewer::Anonymous);
        assert_eq!(
            Viewer::from_authorization(Some(&format!("Bearer {token}")), &keys),
            Viewer::User(7)
        );
        assert_eq!(
            Viewer::from_authorization(Some(&format!("bearer {token}")), &keys),
            Viewer::User(7)
        );
        assert_eq!(
            Viewer::from_authorization(Some(&token), &keys),
            Viewer::InvalidToken
        );
        assert_eq!(
            Viewer::from_authorization(Some("Bearer x"), &keys),
            Viewer::InvalidToken
        );
    }
}
