//! Where verifications live. A trait, so the durable SQLite store (issue 4)
//! slots in beside the in-memory one without touching the HTTP layer or
//! the SIP driver.
//!
//! `insert` returns a future because a durable store answers only once the
//! record is committed (group commit): the API must not say 201 before.
//! Reads and updates are synchronous: they are cheap in memory, and the SIP
//! driver calls them from its loop (its own thread, or the HTTP worker with
//! `sip.thread = "shared"`), which must not wait.

use std::future::Future;
use std::pin::Pin;
use thiserror::Error;

use crate::verification::{CheckResult, Status, Verification};

pub mod memory;
pub mod sqlite;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("id {0} already exists")]
    Duplicate(String),
    /// The insert's Idempotency-Key is already stored for its project
    /// (`project/key`): nothing was written. The create is a retry of an
    /// earlier one, and [`Store::idempotent`] has that one's answer.
    #[error("idempotency key {0} is already stored")]
    KeyTaken(String),
}

/// What an `Idempotency-Key` remembers: the request it came with and the
/// response it got, so a retry gets the same answer and no second call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotent {
    pub body_sha256: [u8; 32],
    pub verification_id: String,
    pub response: String,
}

/// A webhook event waiting in the outbox (SPEC §7). Written by the store
/// in the same transaction as the status change it reports, so an event is
/// never lost and never sent for a change that was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    /// `msg_` + random: the Standard Webhooks `webhook-id`, the same on
    /// every retry so receivers can de-duplicate.
    pub id: String,
    pub project: String,
    /// The JSON body, fixed when the event is written.
    pub payload: String,
    pub created_at_ms: i64,
    /// Delivery attempts made so far.
    pub attempts: u32,
    pub next_attempt_ms: i64,
}

/// The result of one delivery attempt, recorded against its event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryAttempt {
    pub at_ms: i64,
    /// The receiver's HTTP status, when it answered.
    pub status: Option<u16>,
    pub error: Option<String>,
    /// When to try again; `None` ends the event (delivered, or given up).
    pub next_attempt_ms: Option<i64>,
    pub delivered: bool,
    /// The endpoint answered 410 Gone: the event waits unsent until the
    /// engine starts again (with, presumably, a mended config), when the
    /// durable store makes it due at once; `next_attempt_ms` is then the
    /// end of its life (created + max age), when it is given up if the
    /// process has run on with the endpoint disabled all along. (A hold
    /// without a request counts in the event's `attempts` like any record:
    /// its back-off after the restart starts one step later.)
    pub held: bool,
}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

pub trait Store: Send + Sync + 'static {
    /// Stores a new verification (and its idempotency record, atomically;
    /// a key already stored for the project stores neither: `KeyTaken`).
    /// The future owns what it waits on (`'static`): a create whose request
    /// is dropped hands it to a task of its own, which then sends the call.
    fn insert(
        &self,
        v: Verification,
        idem: Option<(String, Idempotent)>,
    ) -> StoreFuture<'static, ()>;
    fn get(&self, id: &str) -> Result<Option<Verification>, StoreError>;
    /// Read-modify-write of one verification, atomic with respect to every
    /// other update; returns the new state (None: no such id).
    fn update(
        &self,
        id: &str,
        f: &mut dyn FnMut(&mut Verification),
    ) -> Result<Option<Verification>, StoreError>;
    /// [`Store::update`] answering only the status it left: the SIP driver
    /// needs no more, and a copy of the record is eight allocations.
    fn update_status(
        &self,
        id: &str,
        f: &mut dyn FnMut(&mut Verification),
    ) -> Result<Option<Status>, StoreError> {
        Ok(self.update(id, f)?.map(|v| v.status))
    }
    /// The idempotency record of `(project, key)`.
    fn idempotent(&self, project: &str, key: &str) -> Result<Option<Idempotent>, StoreError>;
    /// Marks every verification whose TTL has passed by `now_ms` as
    /// expired and returns them (for metrics and webhooks).
    fn expire_due(&self, now_ms: i64) -> Result<Vec<Verification>, StoreError>;
    /// Calls `sink` with every verification of `project` created in
    /// `[from_ms, to_ms)`, oldest first, until it returns false. Streams:
    /// a durable store must not hold the whole range in memory (CSV export
    /// of a million rows).
    fn scan(
        &self,
        project: &str,
        from_ms: i64,
        to_ms: i64,
        sink: &mut dyn FnMut(&Verification) -> bool,
    ) -> Result<(), StoreError>;
    /// Up to `limit` webhook events due for an attempt at `now_ms`.
    fn outbox_due(&self, now_ms: i64, limit: usize) -> Result<Vec<OutboxEvent>, StoreError>;
    /// Records an attempt of event `id` (and when to retry, if at all).
    fn outbox_record(&self, id: &str, attempt: DeliveryAttempt) -> Result<(), StoreError>;
    /// [`Store::outbox_record`] for async callers: a durable store resolves
    /// it once the record is committed, without holding the caller's thread
    /// for the commit (the webhook worker runs on the HTTP runtime).
    fn outbox_record_async(&self, id: &str, attempt: DeliveryAttempt) -> StoreFuture<'static, ()> {
        Box::pin(std::future::ready(self.outbox_record(id, attempt)))
    }
    /// Resolves once everything written before it is durable (a durable
    /// store: committed). `check` awaits it so a `verified` answer is never
    /// sent for a state a crash could lose.
    fn flush(&self) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
    /// Records one check of `id` (the audit trail of issue 4); durable by
    /// the next `flush`.
    fn record_check(&self, _id: &str, _at_ms: i64, _result: CheckResult) {}
    /// Deletes up to `limit` verifications created before `before_ms`
    /// (and what hangs off them); returns how many. Retention: the caller
    /// repeats while a full batch comes back, so no single transaction
    /// holds the writer long.
    fn prune(&self, _before_ms: i64, _limit: usize) -> Result<usize, StoreError> {
        Ok(0)
    }
    /// How many verifications are held in memory (the durable store keeps
    /// only those whose call is in progress or whose writes are queued).
    fn len(&self) -> usize;
    /// Whether what it holds outlives the process: only then are webhook
    /// events held for the next start after a 410 (`DeliveryAttempt::held`);
    /// a store that starts empty closes them unsent instead.
    fn durable(&self) -> bool {
        false
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Expiry deadlines, soonest first: `(expires_at_ms, id)`.
pub type ExpiryHeap =
    std::sync::Mutex<std::collections::BinaryHeap<std::cmp::Reverse<(i64, String)>>>;

/// Takes the ids whose deadline is at or before `now_ms` off `heap`; both
/// stores expire through it so the sweep touches only what is due.
pub fn pop_due(heap: &ExpiryHeap, now_ms: i64) -> Result<Vec<String>, StoreError> {
    let mut heap = heap
        .lock()
        .map_err(|_| StoreError::Unavailable("a lock was poisoned by a panic".into()))?;
    let mut due = Vec::new();
    while heap
        .peek()
        .is_some_and(|std::cmp::Reverse((at, _))| *at <= now_ms)
    {
        if let Some(std::cmp::Reverse((_, id))) = heap.pop() {
            due.push(id);
        }
    }
    Ok(due)
}
