//! graphql-sse's single connection mode: a client reserves a stream (`PUT`, answered with a
//! token), opens it (`GET` with the token), then posts operations with an `operationId` and
//! may stop one (`DELETE ?operationId=`). Every operation's events go down the one stream.
//!
//! A reservation belongs to the user who made it (reserving needs a valid token): only that
//! user opens it, posts to it and stops its operations; to anyone else it does not exist. Its
//! token, long and random, is never logged. Each operation acts as the viewer of its own
//! request. A reservation not opened within `UNOPENED_LIFETIME` is dropped with the
//! operations posted to it; an opened one lives as long as its response, and its operations
//! with it. A user holds at most `UNOPENED_PER_USER` unopened reservations (open streams are
//! counted by `--max-connections`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use futures_util::future::{AbortHandle, AbortRegistration, Abortable};
use futures_util::stream::{BoxStream, SelectAll};
use futures_util::{FutureExt, Stream, StreamExt};
use password_hash::rand_core::{OsRng, RngCore};
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};
use tokio::time::Instant;

use super::{Item, StreamConfig, sse};
use crate::graphql::Api;

/// How long a reserved stream may wait to be opened.
const UNOPENED_LIFETIME: Duration = Duration::from_secs(30);

/// Most reservations one user may hold unopened.
pub const UNOPENED_PER_USER: usize = 16;

/// One operation on its way to the stream: its id, its claim's generation, its items.
type Incoming = (Arc<str>, u64, BoxStream<'static, Item>);

/// The reserved and open streams of this process.
pub struct Reservations {
    streams: Mutex<HashMap<String, Reservation>>,
    /// Most reservations (opened or not) at once.
    max_streams: usize,
    /// Most operations running on one stream.
    max_operations: usize,
}

struct Reservation {
    /// The user who reserved it.
    owner: i64,
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
    /// Too many reservations in all.
    Full,
    /// The user holds too many unopened reservations.
    TooManyReservations,
    /// Too many operations on this stream.
    TooManyOperations,
}

/// A claimed operation id: start the operation, then `send` it. Dropped unsent (its request
/// was cancelled while it started), it frees its id.
pub struct Claim {
    reservations: Arc<Reservations>,
    token: String,
    id: Arc<str>,
    generation: u64,
    registration: Option<AbortRegistration>,
    sender: mpsc::UnboundedSender<Incoming>,
    /// Past the stream's operation limit: send a refusal (LIMIT_EXCEEDED) as its items.
    pub over_limit: bool,
}

impl Claim {
    /// Hands the operation's items to its stream; false when the stream has gone (it ended,
    /// or takes no more operations because the server is shutting down).
    pub(crate) fn send(mut self, items: BoxStream<'static, Item>) -> bool {
        let Some(registration) = self.registration.take() else {
            return false;
        };
        let items = Abortable::new(items, registration);
        // Stopped (DELETE, or its stream went away): a `complete` all the same, which the
        // stream sends if it is still there.
        let items = async_stream::stream! {
            let mut items = items;
            let mut ended = false;
            while let Some(item) = items.next().await {
                ended = matches!(item, Item::End { .. } | Item::Expired);
                yield item;
            }
            if !ended {
                yield Item::End { shutdown: false };
            }
        };
        // The stream ended meanwhile: the operation is dropped with its items.
        self.sender
            .send((self.id.clone(), self.generation, items.boxed()))
            .is_ok()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.registration.is_some() {
            self.reservations
                .finished(&self.token, &self.id, self.generation);
        }
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

    /// Reserves a stream for `owner`: its token. It is dropped if not opened in time.
    pub fn reserve(self: &Arc<Self>, owner: i64) -> Result<String, Refusal> {
        let mut streams = self.lock();
        Self::sweep(&mut streams);
        if streams.len() >= self.max_streams {
            return Err(Refusal::Full);
        }
        let unopened = streams
            .values()
            .filter(|reservation| reservation.owner == owner && reservation.receiver.is_some())
            .count();
        if unopened >= UNOPENED_PER_USER {
            return Err(Refusal::TooManyReservations);
        }
        let mut bytes = [0u8; 32];
        OsRng.fill_bytes(&mut bytes);
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let (sender, receiver) = mpsc::unbounded_channel();
        streams.insert(
            token.clone(),
            Reservation {
                owner,
                created: Instant::now(),
                receiver: Some(receiver),
                sender,
                operations: HashMap::new(),
                generation: 0,
            },
        );
        drop(streams);
        // Dropped, with whatever was posted to it, if nobody opens it in time.
        let reservations = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(UNOPENED_LIFETIME).await;
            if let Some(reservations) = reservations.upgrade() {
                Self::sweep(&mut reservations.lock());
            }
        });
        Ok(token)
    }

    /// Drops the reservations not opened in time (their queued operations with them).
    fn sweep(streams: &mut HashMap<String, Reservation>) {
        streams.retain(|_, reservation| {
            reservation.receiver.is_none() || reservation.created.elapsed() < UNOPENED_LIFETIME
        });
    }

    /// `owner`'s reservation `token`, if it lives.
    fn find<'a>(
        streams: &'a mut HashMap<String, Reservation>,
        token: &str,
        owner: i64,
    ) -> Result<&'a mut Reservation, Refusal> {
        match streams.get_mut(token) {
            Some(reservation)
                if reservation.owner == owner
                    && (reservation.receiver.is_none()
                        || reservation.created.elapsed() < UNOPENED_LIFETIME) =>
            {
                Ok(reservation)
            }
            _ => Err(Refusal::NotFound),
        }
    }

    /// Claims `id` on `owner`'s stream `token` for an operation about to start.
    pub fn claim(self: &Arc<Self>, token: &str, owner: i64, id: &str) -> Result<Claim, Refusal> {
        let mut streams = self.lock();
        let reservation = Self::find(&mut streams, token, owner)?;
        if reservation.operations.contains_key(id) {
            return Err(Refusal::Duplicate);
        }
        let running = reservation.operations.len();
        if running >= 2 * self.max_operations {
            return Err(Refusal::TooManyOperations);
        }
        reservation.generation += 1;
        let id: Arc<str> = Arc::from(id);
        let (abort, registration) = AbortHandle::new_pair();
        reservation
            .operations
            .insert(id.clone(), (reservation.generation, abort));
        Ok(Claim {
            reservations: self.clone(),
            token: token.to_owned(),
            id,
            generation: reservation.generation,
            registration: Some(registration),
            sender: reservation.sender.clone(),
            over_limit: running >= self.max_operations,
        })
    }

    /// Stops the operation `id` of `owner`'s stream `token` (nothing if it is not running).
    pub fn stop(&self, token: &str, owner: i64, id: &str) -> Result<(), Refusal> {
        let mut streams = self.lock();
        let reservation = Self::find(&mut streams, token, owner)?;
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
        owner: i64,
        api: Api,
        config: &StreamConfig,
        mut shutdown: watch::Receiver<bool>,
        permit: OwnedSemaphorePermit,
    ) -> Result<impl Stream<Item = Vec<u8>> + Send + 'static, Refusal> {
        let mut receiver = {
            let mut streams = self.lock();
            let reservation = Self::find(&mut streams, token, owner)?;
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
            let mut ticks = super::KeepAlive::new(Some(keep_alive));
            loop {
                if *shutdown.borrow() {
                    // No more operations; those already posted (and answered 202) still
                    // run to their end, `complete` included.
                    receiver.close();
                    while let Ok((id, generation, items)) = receiver.try_recv() {
                        operations.push(
                            items
                                .map(move |item| (id.clone(), generation, item))
                                .boxed(),
                        );
                    }
                    if operations.is_empty() {
                        break;
                    }
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
                        let mut next = Some((id, generation, item));
                        // What every operation has ready goes out as one chunk (one write,
                        // one compressor flush), as a socket's frames do.
                        while let Some((id, generation, item)) = next.take() {
                            if sse::frame(&api, &mut out, Some(&id), item, false) {
                                opened.reservations.finished(&opened.token, &id, generation);
                            }
                            if out.len() < super::BATCH_BYTES {
                                next = operations.next().now_or_never().flatten();
                            }
                        }
                        if !out.is_empty() {
                            ticks.sent();
                            yield out;
                        }
                    }
                    due = ticks.tick() => if due {
                        yield sse::COMMENT.to_vec();
                    },
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

    #[tokio::test]
    async fn a_reservation_is_its_owners_and_holds_each_operation_id_once() {
        let reservations = Arc::new(Reservations::new(100, 1));
        let token = reservations.reserve(7).unwrap();
        assert_eq!(token.len(), 43, "32 random bytes");
        assert_eq!(
            reservations.claim("nope", 7, "a").err(),
            Some(Refusal::NotFound)
        );
        // Someone else's reservation does not exist for them.
        assert_eq!(
            reservations.claim(&token, 8, "a").err(),
            Some(Refusal::NotFound)
        );
        assert_eq!(reservations.stop(&token, 8, "a"), Err(Refusal::NotFound));
        let first = reservations.claim(&token, 7, "a").unwrap();
        assert!(!first.over_limit);
        assert_eq!(
            reservations.claim(&token, 7, "a").err(),
            Some(Refusal::Duplicate)
        );
        // Past the limit: a refusal to send; past twice the limit: refused outright.
        let second = reservations.claim(&token, 7, "b").unwrap();
        assert!(second.over_limit);
        assert_eq!(
            reservations.claim(&token, 7, "c").err(),
            Some(Refusal::TooManyOperations)
        );
        // Stopped, ended or dropped unsent, an id is free again; a stale generation frees
        // nothing.
        reservations.stop(&token, 7, "a").unwrap();
        drop(second);
        let again = reservations.claim(&token, 7, "a").unwrap();
        assert!(!again.over_limit, "b was freed when its claim was dropped");
        reservations.finished(&token, "a", again.generation - 1);
        assert_eq!(
            reservations.claim(&token, 7, "a").err(),
            Some(Refusal::Duplicate)
        );
        reservations.finished(&token, "a", again.generation);
        let sent = reservations.claim(&token, 7, "a").unwrap();
        sent.send(futures_util::stream::empty().boxed());
        assert_eq!(
            reservations.claim(&token, 7, "a").err(),
            Some(Refusal::Duplicate),
            "a sent claim keeps its id until its operation ends"
        );
        drop(first);
        drop(again);
    }

    #[tokio::test]
    async fn a_user_holds_a_few_unopened_reservations_and_they_expire() {
        let reservations = Arc::new(Reservations::new(1_000, 1));
        for _ in 0..UNOPENED_PER_USER {
            reservations.reserve(1).unwrap();
        }
        assert_eq!(
            reservations.reserve(1).err(),
            Some(Refusal::TooManyReservations)
        );
        let other = reservations.reserve(2).unwrap();
        let claim = reservations.claim(&other, 2, "a").unwrap();
        claim.send(futures_util::stream::pending().boxed());
        // Never opened in time: gone, with what was posted to it.
        for reservation in reservations.lock().values_mut() {
            reservation.created = Instant::now() - UNOPENED_LIFETIME;
        }
        assert_eq!(
            reservations.claim(&other, 2, "b").err(),
            Some(Refusal::NotFound)
        );
        assert!(reservations.reserve(1).is_ok());
        assert_eq!(reservations.lock().len(), 1, "the expired ones were swept");
    }
}
