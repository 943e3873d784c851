//! Where verifications live. A trait, so the durable SQLite store (issue 4)
//! slots in beside the in-memory one without touching the HTTP layer or
//! the SIP driver.
//!
//! `insert` returns a future because a durable store answers only once the
//! record is committed (group commit): the API must not say 201 before.
//! Reads and updates are synchronous: they are cheap in memory, and the SIP
//! driver calls them from its own thread.

use std::future::Future;
use std::pin::Pin;
use thiserror::Error;

use crate::verification::Verification;

pub mod memory;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("id {0} already exists")]
    Duplicate(String),
}

/// What an `Idempotency-Key` remembers: the request it came with and the
/// response it got, so a retry gets the same answer and no second call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotent {
    pub body_sha256: [u8; 32],
    pub verification_id: String,
    pub response: String,
}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

pub trait Store: Send + Sync + 'static {
    /// Stores a new verification (and its idempotency record, atomically).
    fn insert(&self, v: Verification, idem: Option<(String, Idempotent)>) -> StoreFuture<'_, ()>;
    fn get(&self, id: &str) -> Result<Option<Verification>, StoreError>;
    /// Read-modify-write of one verification, atomic with respect to every
    /// other update; returns the new state (None: no such id).
    fn update(
        &self,
        id: &str,
        f: &mut dyn FnMut(&mut Verification),
    ) -> Result<Option<Verification>, StoreError>;
    /// The idempotency record of `(project, key)`.
    fn idempotent(&self, project: &str, key: &str) -> Result<Option<Idempotent>, StoreError>;
    /// Marks every verification whose TTL has passed by `now_ms` as
    /// expired and returns them (for metrics and webhooks).
    fn expire_due(&self, now_ms: i64) -> Result<Vec<Verification>, StoreError>;
    /// How many verifications are held.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
