//! graphql-sse's single connection mode: a client reserves a stream (`PUT`, answered with a
//! token), opens it (`GET` with the token), then posts operations with an `operationId` and
//! may stop one (`DELETE ?operationId=`). Every operation's events go down the one stream.
//!
//! The token is the stream's capability: long and random, never logged. Each operation acts
//! as the viewer of its own request. A reservation not opened within `UNOPENED_LIFETIME` is
//! dropped; an opened one lives as long as its response, and its operations with it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use futures_util::future::{AbortHandle, AbortRegistration, Abortable};
use futures_util::stream::{BoxStream, SelectAll};
use futures_util::{Stream, StreamExt};
use password_hash::rand_core::{OsRng, RngCore};
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};
use tokio::time::Instant;

use super::{Item, StreamConfig, sse};
use crate::graphql::Api;

/// How long a reserved stream may wait to be opened.
const UNOPENED_LIFETIME: Duration = Duration::from_secs(60);

/// One operation on its way to the stream: its id, its claim's generation, its items.
type Incoming = (Arc<str>, u64, Abortable<BoxStream<'static, Item>>);

/// The reserved and open streams of this process.
pub struct Reservations {
    streams: Mutex<HashMap<String, Reservation>>,
    /// Most reservations (opened or not) at once.
    max_streams: usize,
    /// Most operations running on one stream.
    max_operations: usize,
}

struct Reservation {
    created: Instant,
    /// Taken by the `GET` that opens it.
    receiver: Option<mpsc::UnboundedReceiver<Incoming>>,
    sender: mpsc::UnboundedSender<Incoming>,
    /// Claimed operations, until they end or are stopped: their generation and stop handle.
    /// At most twice `max_operations` (those past the limit are refusals on their way), so
    /// the channel holds no more than that either.
    operations: HashMap<Arc<str>, (u64, AbortHandle)>,
    generation: u64,
}

/// Why a request about a reservation was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No such reservation (never made, expired, or its stream ended).
    NotFound,
    /// Its stream is open already.
    AlreadyOpen,
    /// An operation with this id runs on it already.
    Duplicate,
    /// Too many reservations, or operations on this one.
    Full,
}

/// A claimed operation id: start the operation, then `send` it.
pub struct Claim {
    id: Arc<str>,
    generation: u64,
    registration: AbortRegistration,
    sender: mpsc::UnboundedSender<Incoming>,
    /// Past the stream's operation limit: send a refusal (LIMIT_EXCEEDED) as its items.
    pub over_limit: bool,
}

impl Claim {
    /// Hands the operation's items to its stream.
    pub(crate) fn send(self, items: BoxStream<'static, Item>) {
        let items = Abortable::new(items, self.registration);
        // The stream ended meanwhile: the operation is dropped with its items.
        let _ = self.sender.send((self.id, self.generation, items));
    }
}

impl Reservations {
    pub fn new(max_streams: usize, max_operations: usize) -> Self {
        Self {
            streams: Mutex::default(),
            max_streams,
            max_operations,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Reservation>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves a stream: its token.
    pub fn reserve(&self) -> Result<String, Refusal> {
        let mut streams = self.lock();
        streams.retain(|_, reservation| {
            reservation.receiver.is_none() || reservation.created.elapsed() < UNOPENED_LIFETIME
        });
        if streams.len() >= self.max_streams {
            return Err(Refusal::Full);
        }
        let mut bytes = [0u8; 32];
        OsRng.fill_bytes(&mut bytes);
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let (sender, receiver) = mpsc::unbounded_channel();
        streams.insert(
            token.clone(),
            Reservation {
                created: Instant::now(),
                receiver: Some(receiver),
                sender,
                operations: HashMap::new(),
                generation: 0,
            },
        );
        Ok(token)
    }

    /// Claims `id` on the stream `token` for an operation about to start.
    pub fn claim(&self, token: &str, id: &str) -> Result<Claim, Refusal> {
        let mut streams = self.lock();
        let reservation = streams.get_mut(token).ok_or(Refusal::NotFound)?;
        if reservation.operations.contains_key(id) {
            return Err(Refusal::Duplicate);
        }
        let running = reservation.operations.len();
        if running >= 2 * self.max_operations {
            return Err(Refusal::Full);
        }
        reservation.generation += 1;
        let id: Arc<str> = Arc::from(id);
        let (abort, registration) = AbortHandle::new_pair();
        reservation
            .operations
            .insert(id.clone(), (reservation.generation, abort));
        Ok(Claim {
            id,
            generation: reservation.generation,
            registration,
            sender: reservation.sender.clone(),
            over_limit: running >= self.max_operations,
        })
    }

    /// Stops the operation `id` of the stream `token` (nothing if it is not running).
    pub fn stop(&self, token: &str, id: &str) -> Result<(), Refusal> {
        let mut streams = self.lock();
        let reservation = streams.get_mut(token).ok_or(Refusal::NotFound)?;
        if let Some((_, abort)) = reservation.operations.remove(id) {
            abort.abort();
        }
        Ok(())
    }

    /// The operation `id` of `generation` ended: its id is free again.
    fn finished(&self, token: &str, id: &str, generation: u64) {
        let mut streams = self.lock();
        if let Some(reservation) = streams.get_mut(token)
            && reservation
                .operations
                .get(id)
                .is_some_and(|(g, _)| *g == generation)
        {
            reservation.operations.remove(id);
        }
    }

    /// Opens the stream `token`: the events of every operation posted to it, until the
    /// client goes away (the reservation and its operations end then) or the server shuts
    /// down.
    pub(crate) fn open(
        self: &Arc<Self>,
        token: &str,
        api: Api,
        config: &StreamConfig,
        mut shutdown: watch::Receiver<bool>,
        permit: OwnedSemaphorePermit,
    ) -> Result<impl Stream<Item = Vec<u8>> + Send + 'static, Refusal> {
        let mut receiver = {
            let mut streams = self.lock();
            let reservation = streams.get_mut(token).ok_or(Refusal::NotFound)?;
            reservation.receiver.take().ok_or(Refusal::AlreadyOpen)?
        };
        let opened = Opened {
            reservations: self.clone(),
            token: token.to_owned(),
        };
        let keep_alive = config.keep_alive;
        Ok(async_stream::stream! {
            let _permit = permit;
            let opened = opened;
            yield sse::COMMENT.to_vec();
            let mut operations: SelectAll<BoxStream<'static, (Arc<str>, u64, Item)>> =
                SelectAll::new();
            let mut ticks = tokio::time::interval_at(Instant::now() + keep_alive, keep_alive);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                if *shutdown.borrow() && operations.is_empty() {
                    break;
                }
                tokio::select! {
                    Some((id, generation, items)) = receiver.recv() => {
                        operations.push(
                            items
                                .map(move |item| (id.clone(), generation, item))
                                .boxed(),
                        );
                    }
                    Some((id, generation, item)) = operations.next(), if !operations.is_empty() => {
                        let mut out = Vec::new();
                        if sse::frame(&api, &mut out, Some(&id), item, false) {
                            opened.reservations.finished(&opened.token, &id, generation);
                        }
                        ticks.reset();
                        if !out.is_empty() {
                            yield out;
                        }
                    }
                    _ = ticks.tick() => yield sse::COMMENT.to_vec(),
                    // Woken to look at the flag again (above); a closed sender means the
                    // server is going away too.
                    changed = shutdown.changed() => {
                        if changed.is_err() {
                            break;
                        }
                    }
                }
            }
        })
    }
}

/// Removes an opened reservation when its response ends.
struct Opened {
    reservations: Arc<Reservations>,
    token: String,
}

impl Drop for Opened {
    fn drop(&mut self) {
        let removed = self.reservations.lock().remove(&self.token);
        // Stop its operations now, not when their streams are next polled.
        if let Some(reservation) = removed {
            for (_, abort) in reservation.operations.values() {
                abort.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_holds_each_operation_id_once_and_counts_them() {
        let reservations = Reservations::new(2, 1);
        let token = reservations.reserve().unwrap();
        assert_eq!(token.len(), 43, "32 random bytes");
        assert_eq!(
            reservations.claim("nope", "a").err(),
            Some(Refusal::NotFound)
        );
        let first = reservations.claim(&token, "a").unwrap();
        assert!(!first.over_limit);
        assert_eq!(
            reservations.claim(&token, "a").err(),
            Some(Refusal::Duplicate)
        );
        // Past the limit: a refusal to send; past twice the limit: refused outright.
        assert!(reservations.claim(&token, "b").unwrap().over_limit);
        assert_eq!(reservations.claim(&token, "c").err(), Some(Refusal::Full));
        // Stopped, or ended, an id is free again; a stale generation frees nothing.
        reservations.stop(&token, "a").unwrap();
        let again = reservations.claim(&token, "a").unwrap();
        reservations.finished(&token, "a", again.generation - 1);
        assert_eq!(
            reservations.claim(&token, "a").err(),
            Some(Refusal::Duplicate)
        );
        reservations.finished(&token, "a", again.generation);
        assert!(reservations.claim(&token, "a").is_ok());
        reservations.reserve().unwrap();
        assert_eq!(reservations.reserve().err(), Some(Refusal::Full));
    }
}
