//! The durable store (issue 4): SQLite in WAL mode behind an in-memory
//! cache of the live records.
//!
//! - Reads (`get`, `idempotent`) and `update` work on the cache, at memory
//!   speed: the SIP driver calls `update` from its loop and must not wait
//!   for a disk. A miss (a record whose call is over) is a point read by
//!   primary key on the request path's reader connection, which nothing
//!   else holds for longer (the sweeps and the webhook outbox read through
//!   a connection of their own).
//! - Every write (insert, each update, expiry, check, delivery attempt) is
//!   also queued to ONE writer thread that owns the `Connection` and commits
//!   whatever is queued in one transaction (group commit: one fsync-free WAL
//!   append for many requests), then wakes every waiter of the batch. A
//!   commit's cost is mostly the pages it rewrites to the WAL, so under
//!   load the writer gathers: a create waits at most a commit window
//!   (`store.commit_window_us`, 4 ms) for company (only when commits are
//!   running back to back: see the writer loop), a status update nobody
//!   waits for at most 4 ms, and updates of one verification in a batch write
//!   its row once (see `writer`, `gather`, `defer_young`, `commit`).
//! - The checkpointer thread copies the WAL into the database beside the
//!   writer and makes it start over every 64 MiB (see `checkpointer`).
//! - `insert` resolves only after its batch is committed, so a 201 means
//!   durable; a failed commit resolves it with `StoreError::Unavailable`
//!   (the API answers 503). A record enters the cache only once committed:
//!   nothing is visible that was not stored.
//! - A status change and its webhook outbox row go in the same transaction.
//! - A record leaves the cache once its call is over (not `pending` or
//!   `calling`) and every write queued for it is committed: memory follows
//!   the calls in flight, not the TTL × the rate (4,000/s for a 300 s TTL
//!   would be 1.2 million live records). A read of an evicted record goes
//!   to the database; an update of one (a check, the expiry sweep) loads it
//!   back into the cache under a lock, so read-modify-writes of one id stay
//!   serial, and it leaves again once that write is committed.
//! - Nothing else is kept per verification either: the expiry sweep asks
//!   the database for what is due through the partial index of open
//!   records, and an idempotent replay reads the `idempotency` table.
//!   (In-memory expiry and eviction queues and an idempotency map held
//!   every verification for its TTL + 5 minutes: at 4,000/s RSS went from
//!   55 to 132 MiB in 100 s, ~0.75 MiB/s, on course for ~500 MiB with the
//!   default TTL; now it stays at ~70 MiB.)

use dashmap::DashMap;
use rand::RngCore;
use rusqlite::types::Type;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row};
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::oneshot;
use tokio::sync::Notify;

use queue::{JobQueue, Wake};

use super::{DeliveryAttempt, Idempotent, OutboxEvent, Store, StoreError, StoreFuture};
use crate::sip::Outcome;
use crate::verification::{event_payload, CallRecord, CheckResult, Status, Verification};

/// Maps of ids the writer builds per commit. Its keys are our own ids, not
/// an attacker's choice, and std's SipHash was a visible share of the
/// writer's CPU.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

/// Schema steps, applied in order; `PRAGMA user_version` is how many have
/// run. Append only: a released step is never edited.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    r#"
CREATE TABLE verifications (
    id TEXT PRIMARY KEY,
    project TEXT NOT NULL,
    phone TEXT NOT NULL,
    sender TEXT NOT NULL,
    code TEXT NOT NULL,
    client_code INTEGER NOT NULL,
    caller TEXT NOT NULL,
    reference TEXT,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    attempts_left INTEGER NOT NULL,
    status TEXT NOT NULL,
    call_trunk TEXT NOT NULL DEFAULT '',
    call_outcome TEXT,
    call_sip_code INTEGER,
    call_invited_at_ms INTEGER,
    call_ringing_at_ms INTEGER,
    call_cancel_at_ms INTEGER,
    call_ended_at_ms INTEGER
);
CREATE INDEX verifications_project_created ON verifications (project, created_at_ms);
CREATE INDEX verifications_created ON verifications (created_at_ms);
CREATE INDEX verifications_expires ON verifications (expires_at_ms);
CREATE INDEX verifications_status ON verifications (status);
CREATE TABLE call_attempts (
    id INTEGER PRIMARY KEY,
    verification_id TEXT NOT NULL UNIQUE,
    trunk TEXT NOT NULL,
    caller TEXT NOT NULL,
    destination TEXT NOT NULL,
    invited_at_ms INTEGER,
    ringing_at_ms INTEGER,
    cancel_at_ms INTEGER,
    final_at_ms INTEGER,
    sip_code INTEGER,
    outcome TEXT
);
CREATE TABLE checks (
    id INTEGER PRIMARY KEY,
    verification_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    result TEXT NOT NULL
);
CREATE INDEX checks_verification ON checks (verification_id);
CREATE TABLE idempotency (
    project TEXT NOT NULL,
    key TEXT NOT NULL,
    body_sha256 BLOB NOT NULL,
    verification_id TEXT NOT NULL,
    response TEXT NOT NULL,
    PRIMARY KEY (project, key)
);
CREATE INDEX idempotency_verification ON idempotency (verification_id);
CREATE TABLE webhook_outbox (
    id TEXT PRIMARY KEY,
    project TEXT NOT NULL,
    verification_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (done, next_attempt_ms);
CREATE INDEX webhook_outbox_verification ON webhook_outbox (verification_id);
CREATE TABLE webhook_deliveries (
    id INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    status INTEGER,
    error TEXT
);
CREATE INDEX webhook_deliveries_event ON webhook_deliveries (event_id);
"#,
    // 2: fewer b-tree pages written per verification. The writer's cost is
    // mostly the pages each commit rewrites to the WAL, and a verification
    // touched every index below at its insert and its status changes.
    // - A call attempt is the verification's own call columns (one per
    //   verification: `verification_id` was UNIQUE), written in the same
    //   UPDATE; the table kept a second copy behind a random-keyed index (a
    //   random page per call) and two more upserts per verification. It
    //   becomes a view with the same columns. The copy back is for safety
    //   only: both were always written in one transaction.
    // - Startup loads only open verifications (one small partial index,
    //   whose entry stays on the same page as the status changes); prune
    //   walks rowid order, which is creation order. `created`, `expires`
    //   and `status` had no other reader. ORs, not IN: SQLite evaluates
    //   an IN of more than two constants through a temporary b-tree, at
    //   every insert and twice at every update.
    // - Webhook events are pruned by their own age, not by verification
    //   id: that index put each event on a random page.
    r#"
UPDATE verifications SET call_trunk = a.trunk, call_outcome = a.outcome,
    call_sip_code = a.sip_code, call_invited_at_ms = a.invited_at_ms,
    call_ringing_at_ms = a.ringing_at_ms, call_cancel_at_ms = a.cancel_at_ms,
    call_ended_at_ms = a.final_at_ms
FROM call_attempts a
WHERE a.verification_id = verifications.id AND verifications.call_invited_at_ms IS NULL;
DROP TABLE call_attempts;
CREATE VIEW call_attempts (id, verification_id, trunk, caller, destination, invited_at_ms,
    ringing_at_ms, cancel_at_ms, final_at_ms, sip_code, outcome) AS
SELECT rowid, id, call_trunk, caller, phone, call_invited_at_ms, call_ringing_at_ms,
    call_cancel_at_ms, call_ended_at_ms, call_sip_code, call_outcome
FROM verifications WHERE call_invited_at_ms IS NOT NULL;
DROP INDEX verifications_created;
DROP INDEX verifications_expires;
DROP INDEX verifications_status;
CREATE INDEX verifications_open ON verifications (expires_at_ms)
    WHERE status = 'pending' OR status = 'calling' OR status = 'delivered' OR status = 'failed';
DROP INDEX webhook_outbox_verification;
"#,
    // 3: events held for an endpoint that answered 410 Gone (see
    // `DeliveryAttempt::held`): made due again at the next start. A column
    // with a constant default is added without rewriting the table.
    r#"
ALTER TABLE webhook_outbox ADD COLUMN held INTEGER NOT NULL DEFAULT 0;
"#,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// How long past its TTL a record stays in the cache (reads after that go
/// to the database; a late check only answers "expired").
const EVICT_AFTER_MS: i64 = 5 * 60_000;
/// Due records the expiry sweep takes per query, and how long one sweep
/// may keep working off a backlog.
const EXPIRE_BATCH: usize = 10_000;
const EXPIRE_BUDGET: Duration = Duration::from_millis(500);

/// Due and open, oldest first; `OPEN` word for word so SQLite reads it
/// through the partial index `verifications_open`.
static EXPIRE_DUE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT id FROM verifications WHERE {OPEN} AND expires_at_ms <= ?1 \
         ORDER BY expires_at_ms LIMIT ?2"
    )
});

/// Rows an export reads per query (see `scan`).
const SCAN_PAGE: usize = 1_000;

/// The most jobs one transaction takes: bounds how long the writer holds
/// its transaction and how much one failure affects.
const MAX_BATCH: usize = 8_192;
/// Queued updates kept for a retry while commits fail (read-only or full
/// disk); beyond this they are dropped with an error line.
const MAX_RETRY: usize = 100_000;
/// The longest a create (or flush) is held to share its commit with
/// others, when the writer is busy, unless the config says otherwise
/// (`store.commit_window_us`); see the tick in [`writer`]. Why 4 ms (1 ms until
/// session 11): a commit's fixed cost (BEGIN, a WAL frame per dirty page,
/// COMMIT, the wake-ups around it) was most of the writer's CPU, about
/// 80 µs a commit. Load bench, 20 s runs on the session-11 VM, store writer
/// CPU per verification at 1,000/s and 4,000/s: 1 ms 62 / 23 µs (748 / 703
/// commits/s), 2 ms 50 / 19, 4 ms 35 / 13 (236 / 228 commits/s); create
/// p99 at 4,000/s 4.7, 4.5, 6.1 ms (issue 5 asks for 10).
pub const COMMIT_WINDOW: Duration = Duration::from_millis(4);
/// The longest an update nobody waits for is held before its commit (or
/// the commit window, if that is longer).
const LAZY: Duration = Duration::from_millis(4);
/// An update younger than this is held back from a commit made for a
/// create, in case the next change of its verification follows; see
/// [`defer_young`]. Under `LAZY`, so that under load held updates ride
/// the next create's commit instead of forcing one of their own.
const COALESCE: Duration = Duration::from_millis(2);
/// How often the checkpointer copies the WAL into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);
/// WAL frames (pages) past which the checkpointer makes the WAL start
/// over (64 MiB at 4 KiB pages); see [`checkpointer`].
const RESTART_FRAMES: i64 = 16_384;

/// Not final yet: the WHERE of the partial index `verifications_open`,
/// word for word, so SQLite sees that a query with it can use the index.
const OPEN: &str =
    "(status = 'pending' OR status = 'calling' OR status = 'delivered' OR status = 'failed')";

const V_COLS: &str = "id, project, phone, sender, code, client_code, caller, reference, \
     created_at_ms, expires_at_ms, attempts_left, status, call_trunk, call_outcome, \
     call_sip_code, call_invited_at_ms, call_ringing_at_ms, call_cancel_at_ms, call_ended_at_ms";

/// Built once: `prepare_cached` looks statements up by their text, and
/// formatting it at every insert cost an allocation.
static INSERT_V: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "INSERT OR IGNORE INTO verifications ({V_COLS}) VALUES \
         (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)"
    )
});

/// Why the store cannot be opened; serve prints it and exits 2.
#[derive(Debug, Error)]
pub enum OpenError {
    #[error("store {path}: cannot create its directory: {err}")]
    Dir { path: PathBuf, err: std::io::Error },
    #[error("store {path}: cannot read: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("store {path}: not a SQLite database; refusing to start")]
    NotSqlite { path: PathBuf },
    #[error("store {path}: integrity check failed ({detail}); refusing to start")]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "store {path}: schema version {found} is newer than this build knows ({known}); \
         refusing to start (run the newer flashcall, or restore a backup)"
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("store {path}: {err}")]
    Sqlite {
        path: PathBuf,
        #[source]
        err: rusqlite::Error,
    },
    #[error("store {path}: cannot start the writer thread: {err}")]
    Thread { path: PathBuf, err: std::io::Error },
}

/// A failure to simulate in tests (the disk cannot be made read-only or
/// full for root in a test).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Every write fails as on a read-only database (`SQLITE_READONLY`).
    ReadOnly,
    /// The database cannot grow (`SQLITE_FULL`), as on a full disk.
    Full,
    /// Both lifted: the disk was freed or remounted.
    Healed,
}

type Done = Result<usize, StoreError>;

enum Waiter {
    Async(oneshot::Sender<Done>),
    Sync(mpsc::SyncSender<Done>),
}

impl Waiter {
    /// A waiter nobody listens to, for the queue's tests.
    #[cfg(test)]
    fn test() -> Waiter {
        Waiter::Async(oneshot::channel().0)
    }

    fn send(self, r: Done) {
        // A waiter that went away (request cancelled) needs no answer.
        match self {
            Waiter::Async(t) => {
                let _ = t.send(r);
            }
            Waiter::Sync(t) => {
                let _ = t.send(r);
            }
        }
    }
}

enum Op {
    Insert {
        /// Boxed: a job moves several times on its way (channel, batch),
        /// and the other variants are small.
        v: Box<Verification>,
        idem: Option<(String, Idempotent)>,
    },
    Update {
        /// The record as the change left it, shared with the cache: the
        /// next change of it copies it (`Arc::make_mut`) instead of every
        /// change cloning it twice more.
        v: Arc<Verification>,
        before: Status,
        at_ms: i64,
    },
    Check {
        id: String,
        at_ms: i64,
        result: &'static str,
    },
    Delivery {
        id: String,
        attempt: DeliveryAttempt,
    },
    Prune {
        before_ms: i64,
        limit: usize,
    },
    Flush,
    Fault(Fault),
}

struct Job {
    op: Op,
    waiter: Option<Waiter>,
    /// When it was queued: how long a job nobody waits for has waited.
    queued_at: Instant,
}

/// What the API threads, the SIP driver and the writer share.
/// A cached record and how many of its queued writes are not committed
/// yet: it may leave the cache only at 0, when the database holds all of it.
struct Entry {
    v: Arc<Verification>,
    pending: u32,
}

struct Inner {
    /// Live records only: those whose call is in flight, and for a moment
    /// those an update loaded back. Nothing here grows with the TTL: the
    /// expiry sweep finds due records through the database's partial index
    /// of open ones, and idempotency replays read the `idempotency` table
    /// (see the module docs for what keeping them in memory cost).
    cache: DashMap<String, Entry>,
    /// Transactions committed and jobs they carried: the batching the
    /// store bench reports (commits per second, jobs per commit).
    commits: AtomicU64,
    jobs: AtomicU64,
}

impl Inner {
    fn admit(&self, v: Verification) {
        self.cache.insert(
            v.id.clone(),
            Entry {
                v: Arc::new(v),
                pending: 0,
            },
        );
    }

    /// One queued write of `id` is committed: evicts the record when that
    /// was its last and its call is over. `remove_if` holds the shard lock,
    /// and writes are queued under it, so none can slip in between.
    fn settle(&self, id: &str) {
        if let Some(mut e) = self.cache.get_mut(id) {
            e.pending = e.pending.saturating_sub(1);
        }
        self.cache.remove_if(id, |_, e| e.evictable());
    }
}

impl Entry {
    /// Nothing of it waits for the writer, and its call is over.
    fn evictable(&self) -> bool {
        self.pending == 0 && !matches!(self.v.status, Status::Pending | Status::Calling)
    }
}

pub struct SqliteStore {
    /// Rung when a commit wrote webhook events (see [`Hooks`]).
    wake: Arc<Notify>,
    inner: Arc<Inner>,
    /// The writer's queue; closed when the store is dropped.
    queue: Arc<JobQueue>,
    writer: Option<JoinHandle<()>>,
    /// For the request path's reads the cache cannot answer (evicted
    /// records, idempotency keys): point reads by key. WAL readers never
    /// block the writer.
    reader: Mutex<Connection>,
    /// For the background's reads (the expiry sweep, the webhook outbox),
    /// which can take longer: on the request path's connection they made
    /// a check or GET wait for them behind its mutex, and with the SIP
    /// driver on the HTTP worker (`sip.thread`) so did the SIP loop.
    background: Mutex<Connection>,
    /// Serialises read-modify-write of records not in the cache.
    miss: Mutex<()>,
    path: PathBuf,
    /// Dropped to stop the checkpointer.
    stop_checkpoints: Option<mpsc::Sender<()>>,
    checkpointer: Option<JoinHandle<()>>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn poisoned() -> StoreError {
    StoreError::Unavailable("a lock was poisoned by a panic".into())
}

fn stopped() -> StoreError {
    StoreError::Unavailable("the store writer has stopped".into())
}

fn now_ms() -> i64 {
    crate::engine::now_ms()
}

/// Opens a connection with the settings every connection needs.
fn connect(path: &Path, flags: OpenFlags) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(path, flags)?;
    // Readers may meet a checkpoint in progress: wait instead of failing.
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// Refuses a file that is not a SQLite database before SQLite sees it:
/// SQLite would otherwise report "file is not a database" only at the
/// first query, or (for an empty file) silently make it one.
fn check_header(path: &Path) -> Result<(), OpenError> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => {
            return Err(OpenError::Read {
                path: path.into(),
                err,
            })
        }
    };
    let mut head = Vec::with_capacity(16);
    f.by_ref()
        .take(16)
        .read_to_end(&mut head)
        .map_err(|err| OpenError::Read {
            path: path.into(),
            err,
        })?;
    if head.is_empty() || head == b"SQLite format 3\0" {
        return Ok(());
    }
    Err(OpenError::NotSqlite { path: path.into() })
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), OpenError> {
    let sql = |err| OpenError::Sqlite {
        path: path.into(),
        err,
    };
    let found: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql)?;
    if found > SCHEMA_VERSION {
        return Err(OpenError::NewerSchema {
            path: path.into(),
            found,
            known: SCHEMA_VERSION,
        });
    }
    if found == SCHEMA_VERSION {
        return Ok(());
    }
    if found < 0 {
        return Err(OpenError::Corrupt {
            path: path.into(),
            detail: format!("negative schema version {found}"),
        });
    }
    // Every pending step and the new version in one transaction: a crash
    // mid-migration leaves the old schema, never half of the new one.
    let tx = conn.transaction().map_err(sql)?;
    for step in &MIGRATIONS[usize::try_from(found).unwrap_or(0)..] {
        tx.execute_batch(step).map_err(sql)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(sql)?;
    tx.commit().map_err(sql)?;
    tracing::info!(path = %path.display(), from = found, to = SCHEMA_VERSION, "store schema migrated");
    Ok(())
}

fn bad_column(i: usize, what: &str, value: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        i,
        Type::Text,
        Box::new(StoreError::Unavailable(format!("unknown {what} {value:?}"))),
    )
}

fn row_to_v(r: &Row<'_>) -> rusqlite::Result<Verification> {
    let status: String = r.get(11)?;
    let outcome: Option<String> = r.get(13)?;
    let outcome = match outcome {
        None => None,
        Some(o) => Some(Outcome::parse(&o).ok_or_else(|| bad_column(13, "outcome", &o))?),
    };
    Ok(Verification {
        id: r.get(0)?,
        project: r.get(1)?,
        phone: r.get(2)?,
        sender: r.get(3)?,
        code: r.get(4)?,
        client_code: r.get(5)?,
        caller: r.get(6)?,
        reference: r.get(7)?,
        created_at_ms: r.get(8)?,
        expires_at_ms: r.get(9)?,
        attempts_left: r.get(10)?,
        status: Status::parse(&status).ok_or_else(|| bad_column(11, "status", &status))?,
        call: CallRecord {
            trunk: r.get(12)?,
            outcome,
            sip_code: r.get(14)?,
            invited_at_ms: r.get(15)?,
            ringing_at_ms: r.get(16)?,
            cancel_at_ms: r.get(17)?,
            ended_at_ms: r.get(18)?,
        },
    })
}

fn load_one(conn: &Connection, id: &str) -> rusqlite::Result<Option<Verification>> {
    conn.prepare_cached(&format!("SELECT {V_COLS} FROM verifications WHERE id = ?1"))?
        .query_row([id], row_to_v)
        .optional()
}

/// `msg_` + 32 hex digits: 16 that grow with time (milliseconds and a
/// counter), 16 random. Growing ids append to the end of the outbox's
/// primary-key index; random ones wrote a random page of it per event.
fn event_id() -> String {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let t = u64::try_from(now_ms()).unwrap_or(0) << 16;
    let seq = match LAST.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
        Some(t.max(l.wrapping_add(1)))
    }) {
        Ok(l) | Err(l) => t.max(l.wrapping_add(1)),
    };
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&seq.to_be_bytes());
    rand::thread_rng().fill_bytes(&mut b[8..]);
    format!("msg_{}", hex::encode(b))
}

/// The writer's view of which projects get webhook events, and the
/// delivery worker's wake-up (rung after a commit that wrote events, so a
/// new event goes out without waiting for the worker's poll).
struct Hooks {
    projects: HashSet<String>,
    wake: Arc<Notify>,
    /// An event was written in the batch being committed.
    wrote: std::cell::Cell<bool>,
}

impl Hooks {
    /// An outbox row for `v`'s current status, when its project has a
    /// webhook: in the caller's transaction, beside the change itself.
    fn event(&self, tx: &Connection, v: &Verification, at_ms: i64) -> rusqlite::Result<()> {
        if !self.projects.contains(&v.project) {
            return Ok(());
        }
        self.wrote.set(true);
        tx.prepare_cached(
            "INSERT INTO webhook_outbox (id, project, verification_id, payload, created_at_ms, \
             attempts, next_attempt_ms, done) VALUES (?1, ?2, ?3, ?4, ?5, 0, ?5, 0)",
        )?
        .execute(params![
            event_id(),
            v.project,
            v.id,
            event_payload(v, at_ms),
            at_ms
        ])?;
        Ok(())
    }
}

/// The row of `v` rewritten to its current state; how many rows (0: the
/// insert failed, or it was pruned).
fn write_row(tx: &Connection, v: &Verification) -> rusqlite::Result<usize> {
    let c = &v.call;
    tx.prepare_cached(
        "UPDATE verifications SET status = ?2, attempts_left = ?3, call_trunk = ?4, \
         call_outcome = ?5, call_sip_code = ?6, call_invited_at_ms = ?7, \
         call_ringing_at_ms = ?8, call_cancel_at_ms = ?9, call_ended_at_ms = ?10 \
         WHERE id = ?1",
    )?
    .execute(params![
        v.id,
        v.status.as_str(),
        v.attempts_left,
        c.trunk,
        c.outcome.map(Outcome::as_str),
        c.sip_code,
        c.invited_at_ms,
        c.ringing_at_ms,
        c.cancel_at_ms,
        c.ended_at_ms,
    ])
}

fn write_update(
    tx: &Connection,
    hooks: &Hooks,
    v: &Verification,
    before: Status,
    at_ms: i64,
) -> rusqlite::Result<usize> {
    let n = write_row(tx, v)?;
    // n == 0: the insert failed or was pruned; nothing to hang rows on.
    if n > 0 && before != v.status {
        hooks.event(tx, v, at_ms)?;
    }
    Ok(n)
}

fn write_insert(
    tx: &Connection,
    hooks: &Hooks,
    v: &Verification,
    idem: Option<&(String, Idempotent)>,
) -> rusqlite::Result<Done> {
    let c = &v.call;
    // OR IGNORE: a duplicate id fails that one request, not the whole
    // group commit it shares a transaction with.
    let n = tx.prepare_cached(&INSERT_V)?.execute(params![
        v.id,
        v.project,
        v.phone,
        v.sender,
        v.code,
        v.client_code,
        v.caller,
        v.reference,
        v.created_at_ms,
        v.expires_at_ms,
        v.attempts_left,
        v.status.as_str(),
        c.trunk,
        c.outcome.map(Outcome::as_str),
        c.sip_code,
        c.invited_at_ms,
        c.ringing_at_ms,
        c.cancel_at_ms,
        c.ended_at_ms,
    ])?;
    if n == 0 {
        return Ok(Err(StoreError::Duplicate(v.id.clone())));
    }
    if let Some((key, rec)) = idem {
        let n = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO idempotency (project, key, body_sha256, verification_id, \
                 response) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                v.project,
                key,
                &rec.body_sha256[..],
                rec.verification_id,
                rec.response
            ])?;
        if n == 0 {
            // A retry of a stored create (the HTTP layer does not look the
            // key up first: see `http::create`): undo this verification
            // only, the rest of the batch commits.
            tx.execute("DELETE FROM verifications WHERE id = ?1", [&v.id])?;
            return Ok(Err(StoreError::KeyTaken(format!("{}/{key}", v.project))));
        }
    }
    hooks.event(tx, v, v.created_at_ms)?;
    Ok(Ok(1))
}

fn write_delivery(tx: &Connection, id: &str, a: &DeliveryAttempt) -> rusqlite::Result<usize> {
    tx.prepare_cached(
        "INSERT INTO webhook_deliveries (event_id, at_ms, status, error) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![id, a.at_ms, a.status, a.error])?;
    let n = tx
        .prepare_cached(
            "UPDATE webhook_outbox SET attempts = attempts + 1, \
             next_attempt_ms = COALESCE(?2, next_attempt_ms), done = ?3, held = ?4 WHERE id = ?1",
        )?
        .execute(params![
            id,
            a.next_attempt_ms,
            a.next_attempt_ms.is_none(),
            a.held && a.next_attempt_ms.is_some()
        ])?;
    Ok(n)
}

fn write_prune(tx: &Connection, before_ms: i64, limit: usize) -> rusqlite::Result<usize> {
    // The same ids for every table: one temp table, filled once.
    tx.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS prune_ids (id TEXT PRIMARY KEY); DELETE FROM prune_ids;",
    )?;
    // The oldest `limit` rows by rowid, which is creation order (a row is
    // committed within milliseconds of its created_at_ms), that are old
    // enough: no index on created_at_ms to keep up at every insert.
    tx.execute(
        "INSERT INTO prune_ids SELECT id FROM verifications WHERE rowid IN \
         (SELECT rowid FROM verifications ORDER BY rowid LIMIT ?2) AND created_at_ms < ?1",
        params![before_ms, i64::try_from(limit).unwrap_or(i64::MAX)],
    )?;
    tx.execute_batch(
        "DELETE FROM checks WHERE verification_id IN (SELECT id FROM prune_ids);
         DELETE FROM idempotency WHERE verification_id IN (SELECT id FROM prune_ids);
         CREATE TEMP TABLE IF NOT EXISTS prune_events (id TEXT PRIMARY KEY);
         DELETE FROM prune_events;",
    )?;
    // Finished webhook events go by their own age (the last attempt's
    // time, through the due index), not by their verification: an index
    // on the random verification id cost a random page per event. A
    // verification has a handful of events, so eight per pruned one keeps
    // up, and those of a verification pruned here are old enough too.
    tx.execute(
        "INSERT INTO prune_events SELECT id FROM webhook_outbox \
         WHERE done = 1 AND next_attempt_ms < ?1 LIMIT ?2",
        params![
            before_ms,
            i64::try_from(limit.saturating_mul(8)).unwrap_or(i64::MAX)
        ],
    )?;
    tx.execute_batch(
        "DELETE FROM webhook_deliveries WHERE event_id IN (SELECT id FROM prune_events);
         DELETE FROM webhook_outbox WHERE id IN (SELECT id FROM prune_events);
         DELETE FROM prune_events;",
    )?;
    let n = tx.execute(
        "DELETE FROM verifications WHERE id IN (SELECT id FROM prune_ids)",
        [],
    )?;
    tx.execute_batch("DELETE FROM prune_ids;")?;
    Ok(n)
}

/// One group commit: every job of the batch in one transaction. Returns
/// each job's own result; an `Err` means nothing of the batch was stored.
///
/// Several updates of one verification in the batch (the INVITE went out,
/// then the call ended a moment later) write its row once, in its last
/// state, at the first of them; each still writes its own webhook event.
/// Not across a prune, which could delete the row in between.
fn commit(conn: &Connection, hooks: &Hooks, batch: &[Job]) -> rusqlite::Result<Vec<Done>> {
    let mut last: FastMap<&str, &Verification> = FastMap::default();
    if !batch.iter().any(|j| matches!(j.op, Op::Prune { .. })) {
        for job in batch {
            if let Op::Update { v, .. } = &job.op {
                last.insert(&v.id, v);
            }
        }
    }
    // BEGIN and COMMIT as cached statements: `Connection::transaction`
    // parses both again at every commit.
    conn.prepare_cached("BEGIN")?.execute([])?;
    let r = write_batch(conn, hooks, batch, &last).and_then(|out| {
        conn.prepare_cached("COMMIT")?.execute([])?;
        Ok(out)
    });
    if r.is_err() && !conn.is_autocommit() {
        // Nothing of the batch is kept (COMMIT itself can fail: disk full).
        if let Err(e) = conn.execute_batch("ROLLBACK") {
            tracing::error!(error = %e, "store: rollback failed");
        }
    }
    r
}

/// The statements of one batch, inside its transaction.
fn write_batch(
    tx: &Connection,
    hooks: &Hooks,
    batch: &[Job],
    last: &FastMap<&str, &Verification>,
) -> rusqlite::Result<Vec<Done>> {
    // Rows already written in this batch, and what the UPDATE found.
    let mut written: FastMap<&str, usize> = FastMap::default();
    let mut out = Vec::with_capacity(batch.len());
    for job in batch {
        out.push(match &job.op {
            Op::Insert { v, idem } => write_insert(tx, hooks, v, idem.as_ref())?,
            Op::Update { v, before, at_ms } => {
                let n = match (last.get(v.id.as_str()), written.get(v.id.as_str())) {
                    (Some(_), Some(&n)) => n,
                    (Some(&final_state), None) => {
                        let n = write_row(tx, final_state)?;
                        written.insert(&v.id, n);
                        n
                    }
                    (None, _) => write_row(tx, v)?,
                };
                // n == 0: the insert failed or was pruned.
                if n > 0 && *before != v.status {
                    hooks.event(tx, v, *at_ms)?;
                }
                Ok(n)
            }
            Op::Check { id, at_ms, result } => Ok(tx
                .prepare_cached(
                    "INSERT INTO checks (verification_id, at_ms, result) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![id, at_ms, result])?),
            Op::Delivery { id, attempt } => Ok(write_delivery(tx, id, attempt)?),
            Op::Prune { before_ms, limit } => Ok(write_prune(tx, *before_ms, *limit)?),
            Op::Flush | Op::Fault(_) => Ok(0),
        });
    }
    Ok(out)
}

fn apply_fault(conn: &Connection, f: Fault) -> rusqlite::Result<()> {
    match f {
        Fault::ReadOnly => conn.pragma_update(None, "query_only", true),
        Fault::Full => {
            let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            conn.pragma_update(None, "max_page_count", pages)
        }
        Fault::Healed => {
            conn.pragma_update(None, "query_only", false)?;
            // SQLite's own default (and largest) limit.
            conn.pragma_update(None, "max_page_count", 4_294_967_294_i64)
        }
    }
}

/// Takes what is queued without blocking, up to `MAX_BATCH`.
fn drain(q: &JobQueue, batch: &mut Vec<Job>, closed: &mut bool) {
    *closed |= q.drain(batch, MAX_BATCH);
}

/// Holds a batch of jobs nobody waits for (the SIP driver's status
/// updates, checks) open until a job someone waits for arrives (a create,
/// a flush: committed at once with them) or the oldest is `LAZY` old:
/// they are in the cache already, and riding a create's commit is cheaper
/// than a commit of their own (see [`defer_young`]). A batch with a waited
/// job is left as it is. The hold for company a busy writer gives creates
/// is its tick in [`writer`], before this.
fn gather(q: &JobQueue, batch: &mut Vec<Job>, closed: &mut bool, window: Duration) {
    // A window past LAZY would be cut short by the lazy deadline of any
    // update in the batch.
    let lazy_for = LAZY.max(window);
    if batch.iter().any(|j| j.waiter.is_some()) {
        return;
    }
    let deadline = batch
        .iter()
        .map(|j| j.queued_at + lazy_for)
        .min()
        .unwrap_or_else(|| Instant::now() + lazy_for);
    while !*closed && batch.len() < MAX_BATCH && Instant::now() < deadline {
        // Woken only by a job someone waits for, or the deadline: the
        // updates that arrive meanwhile are taken then (see `queue`).
        let before = batch.len();
        *closed |= q.wait(batch, MAX_BATCH, Wake::Waited, Some(deadline));
        if batch[before..].iter().any(|j| j.waiter.is_some()) {
            break;
        }
    }
}

/// Whether a create is held for others to share its commit: only when
/// the last commit was recent (under `window` ago) and carried two or more
/// jobs someone waited for. The second condition is for a client that
/// sends creates one after another (each waits for the last one's 201):
/// nothing else can arrive while its create is held, so a hold would only
/// slow it down, to one create per window. PostgreSQL's `commit_delay`
/// asks for `commit_siblings` for the same reason. Under open-loop load
/// (many clients, or one with many connections) a commit with two waiters
/// comes soon and every hold after it gathers more. Flushes count as
/// waiters, like creates. Not covered: k clients in lock step, k >= 2
/// (each sends its next create only after its 201), are held a window
/// per round once they share a commit, so together they get at most
/// about k creates per window (k × 250/s at 4 ms); a closed-loop load
/// test needs many connections, or a smaller `store.commit_window_us`.
fn hold_for_siblings(last_waiters: usize, since_commit: Duration, window: Duration) -> bool {
    last_waiters >= 2 && since_commit < window
}

/// Moves to `carry`, for a later commit, the status updates queued less
/// than `COALESCE` ago when `batch` is committed for someone waiting (a
/// create): the next change of the same verification (the call ending a
/// moment after its INVITE went out: SIPp's callee, a busy or unknown
/// number) then often joins them, and [`commit`] writes the row once for
/// both. Not when the batch has a flush (it must cover every earlier
/// write) or a prune; never an update of a verification whose older,
/// due update is committed now, so its updates stay in order.
fn defer_young(batch: &mut Vec<Job>, carry: &mut Vec<Job>) {
    let deferrable = batch.iter().any(|j| j.waiter.is_some())
        && !batch
            .iter()
            .any(|j| matches!(j.op, Op::Flush | Op::Prune { .. } | Op::Fault(_)));
    if !deferrable {
        return;
    }
    let now = Instant::now();
    let young = |j: &Job| matches!(j.op, Op::Update { .. }) && j.queued_at + COALESCE > now;
    if !batch.iter().any(young) {
        return;
    }
    let due: FastSet<&str> = batch
        .iter()
        .filter(|j| !young(j))
        .filter_map(|j| match &j.op {
            Op::Update { v, .. } => Some(v.id.as_str()),
            _ => None,
        })
        .collect();
    let keep: Vec<bool> = batch
        .iter()
        .map(|j| match &j.op {
            Op::Update { v, .. } => !young(j) || due.contains(v.id.as_str()),
            _ => true,
        })
        .collect();
    drop(due);
    if keep.iter().all(|k| *k) {
        return;
    }
    let mut later = Vec::new();
    let mut flags = keep.into_iter();
    let jobs = std::mem::take(batch);
    for j in jobs {
        if flags.next().unwrap_or(true) {
            batch.push(j);
        } else {
            later.push(j);
        }
    }
    carry.extend(later);
}

/// The writer thread: take everything queued (holding the batch open a
/// moment when that pays: the busy tick below, [`gather`]), commit it in one transaction,
/// wake the waiters; repeat until every sender is gone.
fn writer(
    conn: Connection,
    q: Arc<JobQueue>,
    inner: Arc<Inner>,
    hooks: Hooks,
    gate: Arc<Mutex<()>>,
    window: Duration,
) {
    let mut retry: Vec<Job> = Vec::new();
    let mut closed = false;
    let mut failing_since: Option<Instant> = None;
    let mut last_log: Option<Instant> = None;
    // When the last commit ended: a job arriving sooner than `window`
    // after it means commits are running back to back.
    let mut committed_at: Option<Instant> = None;
    // Jobs someone waited for in the last commit (see `hold_for_siblings`).
    let mut last_waiters = 0usize;
    // Young updates held back from the last commit (see `defer_young`);
    // they go first in the next batch, before anything newer.
    let mut carry: Vec<Job> = Vec::new();
    // Kept across commits: a fresh Vec grew (and moved its jobs) several
    // times per commit.
    let mut batch: Vec<Job> = Vec::with_capacity(256);
    let metrics = crate::metrics::StoreMetrics::new();
    loop {
        let failing = !retry.is_empty();
        batch.append(&mut retry);
        batch.append(&mut carry);
        if !failing {
            let busy =
                committed_at.is_some_and(|t| hold_for_siblings(last_waiters, t.elapsed(), window));
            // Busy: the next commit is a window after the last one, and
            // the writer sleeps until then whatever arrives meanwhile.
            // Waiting for jobs instead cost 2.6 wake-ups a commit at
            // 4,000/s (perf sched_switch on this thread: an update woke
            // the idle writer, then a create woke it from holding the
            // updates, then its window ended), each ~15-30 µs of CPU on
            // the bench VM (`cargo bench --bench wake`); now one. A create
            // waits no longer than with a hold that starts at its arrival.
            // Not when a full batch is queued already: it goes at once.
            // A flush or the store's close that comes during the sleep
            // waits for its end: a window at most.
            if let Some(at) = committed_at.filter(|_| busy && !closed) {
                let wait = (at + window).saturating_duration_since(Instant::now());
                if !wait.is_zero() && q.len() < MAX_BATCH {
                    std::thread::sleep(wait);
                }
                drain(&q, &mut batch, &mut closed);
            }
            if batch.is_empty() {
                if closed {
                    break;
                }
                closed = q.wait(&mut batch, MAX_BATCH, Wake::Any, None);
                if batch.is_empty() {
                    break;
                }
            }
            drain(&q, &mut batch, &mut closed);
            // What a tick gathered is committed at once; updates alone wait
            // for a create or their LAZY deadline.
            gather(&q, &mut batch, &mut closed, window);
            if !closed {
                defer_young(&mut batch, &mut carry);
            }
        } else if !closed {
            // Updates failed last time: wait a little so a lasting failure
            // (full disk) does not spin, but take new work at once.
            // Room for new jobs however many are kept for the retry: with
            // MAX_BATCH as the bound, a retry list that reached it took no
            // new job (creates never got their 503) and, jobs being
            // queued, never paused either.
            let until = Instant::now() + Duration::from_millis(100);
            let room = batch.len() + MAX_BATCH;
            closed = q.wait(&mut batch, room, Wake::Any, Some(until));
        }
        for job in &batch {
            if let Op::Fault(f) = job.op {
                if let Err(e) = apply_fault(&conn, f) {
                    tracing::error!(error = %e, "store: fault injection failed");
                }
            }
        }
        hooks.wrote.set(false);
        let started = Instant::now();
        let result = {
            // Held off while the checkpointer finishes a WAL restart.
            let _gate = gate.lock().unwrap_or_else(|e| e.into_inner());
            commit(&conn, &hooks, &batch)
        };
        let now = Instant::now();
        committed_at = Some(now);
        last_waiters = batch.iter().filter(|j| j.waiter.is_some()).count();
        match result {
            Ok(results) => {
                inner.commits.fetch_add(1, Ordering::Relaxed);
                inner.jobs.fetch_add(batch.len() as u64, Ordering::Relaxed);
                // The gate's wait included: a create waits for that too.
                metrics.commit.record((now - started).as_secs_f64());
                if hooks.wrote.get() {
                    hooks.wake.notify_one();
                }
                if failing_since.take().is_some() {
                    tracing::info!("store: commits succeed again");
                }
                // A job can fail alone inside a commit that holds (a
                // duplicate id): only what was written counts.
                let mut writes = 0u64;
                for (job, r) in batch.drain(..).zip(results) {
                    if r.is_ok() && !matches!(job.op, Op::Flush | Op::Fault(_)) {
                        writes += 1;
                    }
                    if let (Op::Update { v, .. }, Ok(_)) = (&job.op, &r) {
                        inner.settle(&v.id);
                    }
                    if let (Op::Insert { v, .. }, Ok(_)) = (job.op, &r) {
                        // Into the cache before the waiter hears "stored":
                        // the 201 lets the SIP driver update it next.
                        inner.admit(*v);
                    }
                    if let Some(w) = job.waiter {
                        w.send(r);
                    }
                }
                metrics.writes.increment(writes);
            }
            Err(e) => {
                let n = batch.len();
                metrics.failures.increment(1);
                failing_since.get_or_insert_with(Instant::now);
                // One clear line per failure streak, then one every 10 s.
                if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    tracing::error!(
                        error = %e,
                        jobs = n,
                        "store: commit failed; creates answer 503 until writes succeed \
                         (disk full? database read-only?)"
                    );
                    last_log = Some(Instant::now());
                }
                let err = StoreError::Unavailable(format!("commit failed: {e}"));
                let mut dropped = 0usize;
                for job in batch.drain(..) {
                    match job.waiter {
                        Some(w) => w.send(Err(StoreError::Unavailable(err.to_string()))),
                        // Updates and checks nobody waits for: the cache
                        // already holds them; keep them for the next try.
                        None if matches!(job.op, Op::Update { .. } | Op::Check { .. })
                            && retry.len() < MAX_RETRY
                            && !closed =>
                        {
                            retry.push(job)
                        }
                        None => dropped += 1,
                    }
                }
                if dropped > 0 {
                    tracing::error!(dropped, "store: writes lost after failed commits");
                }
            }
        }
    }
    if let Err((_, e)) = conn.close() {
        tracing::warn!(error = %e, "store: close failed");
    }
}

impl SqliteStore {
    /// What the webhook delivery worker waits on besides its poll timer.
    pub fn outbox_wake(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Opens (creating if needed) the database at `path`: refuses a file
    /// that is not SQLite, fails its quick check, or has a newer schema;
    /// migrates; closes the verifications a crash left pending or calling
    /// (status `failed`, call outcome `interrupted`, with their webhook
    /// events); loads the live records into the cache; starts the writer.
    /// `webhook_projects`: the project logins with a webhook configured.
    pub fn open(path: &Path, webhook_projects: HashSet<String>) -> Result<SqliteStore, OpenError> {
        Self::open_with_window(path, webhook_projects, COMMIT_WINDOW)
    }

    /// [`open`](Self::open) with the writer's commit window
    /// (`store.commit_window_us`): how long, when it is busy, a create is
    /// held so that others share its commit.
    pub fn open_with_window(
        path: &Path,
        webhook_projects: HashSet<String>,
        commit_window: Duration,
    ) -> Result<SqliteStore, OpenError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|err| OpenError::Dir {
                path: path.into(),
                err,
            })?;
        }
        check_header(path)?;
        let sql = |err| OpenError::Sqlite {
            path: path.into(),
            err,
        };
        let mut conn = connect(path, OpenFlags::default()).map_err(|err| match err {
            rusqlite::Error::SqliteFailure(e, _) if e.code == rusqlite::ErrorCode::NotADatabase => {
                OpenError::NotSqlite { path: path.into() }
            }
            err => sql(err),
        })?;
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|err| match err {
                rusqlite::Error::SqliteFailure(e, _)
                    if e.code == rusqlite::ErrorCode::NotADatabase =>
                {
                    OpenError::NotSqlite { path: path.into() }
                }
                err => OpenError::Corrupt {
                    path: path.into(),
                    detail: err.to_string(),
                },
            })?;
        if check != "ok" {
            return Err(OpenError::Corrupt {
                path: path.into(),
                detail: check,
            });
        }
        // WAL: readers never block the writer and a commit is one append.
        // synchronous=NORMAL in WAL mode does not fsync at each commit, only
        // at checkpoints: a committed transaction is in the WAL file (the OS
        // page cache) when COMMIT returns, so it survives the PROCESS dying
        // (kill -9, panic, OOM kill), which is what issue 4 requires of an
        // acknowledged create; it may lose the last commits on power loss or
        // a kernel crash, never consistency. FULL would fsync every group
        // commit and cost milliseconds per batch.
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(sql)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %path.display(), mode, "store: WAL mode not available");
        }
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql)?;
        // No checkpoint inside the writer's COMMIT: it would copy pages and
        // fsync the database while every create of the batch waits (the
        // p99). The checkpointer thread does it beside the writer instead.
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(sql)?;
        // 2 MiB of page cache for the writer (SQLite's default). More does
        // not pay: while the database is under 1 GiB, every commit that
        // split a b-tree page (most of them) ends by scanning the whole
        // page cache (SQLite parks a page at the 1 GiB page number while it
        // reorders a split, and truncating the cache back to the database
        // size then visits every slot). With 32 MiB that scan was 14-20% of
        // the writer's CPU; with 2 MiB it is 2%, and the extra misses (read
        // from the OS page cache) cost about 5%.
        conn.pragma_update(None, "cache_size", -2_000)
            .map_err(sql)?;
        migrate(&mut conn, path)?;

        let wake = Arc::new(Notify::new());
        let hooks = Hooks {
            projects: webhook_projects,
            wake: wake.clone(),
            wrote: std::cell::Cell::new(false),
        };
        let now = now_ms();
        let interrupted = close_interrupted(&mut conn, &hooks, now).map_err(sql)?;
        if interrupted > 0 {
            tracing::warn!(
                count = interrupted,
                "store: verifications left pending or calling by the last run were closed \
                 as failed (call outcome interrupted)"
            );
        }
        let released = release_held(&conn, now).map_err(sql)?;
        if released > 0 {
            tracing::info!(
                count = released,
                "store: webhook events held by the last run for an endpoint that answered \
                 410 Gone are due again"
            );
        }

        let inner = Arc::new(Inner {
            cache: DashMap::new(),
            commits: AtomicU64::new(0),
            jobs: AtomicU64::new(0),
        });
        // What the expiry sweep must still close, for the log (no record
        // is cached: every call of the last run is over). `OPEN`: counted
        // through the partial index of open ones.
        let open_count: i64 = conn
            .query_row(
                &format!("SELECT count(*) FROM verifications WHERE {OPEN}"),
                [],
                |r| r.get(0),
            )
            .map_err(sql)?;
        tracing::info!(path = %path.display(), open = open_count, "store opened");

        let reader = connect(path, OpenFlags::default()).map_err(sql)?;
        reader
            .pragma_update(None, "query_only", true)
            .map_err(sql)?;
        let background = connect(path, OpenFlags::default()).map_err(sql)?;
        background
            .pragma_update(None, "query_only", true)
            .map_err(sql)?;
        let checkpoint_conn = connect(path, OpenFlags::default()).map_err(sql)?;
        let gate = Arc::new(Mutex::new(()));
        let (stop_checkpoints, checkpoint_rx) = mpsc::channel::<()>();
        let checkpointer = std::thread::Builder::new()
            .name("flashcall-checkpoint".into())
            .spawn({
                let gate = gate.clone();
                move || checkpointer(checkpoint_conn, gate, checkpoint_rx)
            })
            .map_err(|err| OpenError::Thread {
                path: path.into(),
                err,
            })?;
        let queue = Arc::new(JobQueue::new());
        let writer = {
            let inner = inner.clone();
            let q = queue.clone();
            std::thread::Builder::new()
                .name("flashcall-store".into())
                .spawn(move || {
                    // However the writer ends (a panic included), later
                    // sends fail instead of queueing for nobody.
                    struct Gone(Arc<JobQueue>);
                    impl Drop for Gone {
                        fn drop(&mut self) {
                            self.0.writer_gone();
                        }
                    }
                    let gone = Gone(q.clone());
                    writer(conn, q, inner, hooks, gate, commit_window);
                    drop(gone);
                })
                .map_err(|err| OpenError::Thread {
                    path: path.into(),
                    err,
                })?
        };
        Ok(SqliteStore {
            wake,
            inner,
            queue,
            writer: Some(writer),
            reader: Mutex::new(reader),
            background: Mutex::new(background),
            miss: Mutex::new(()),
            path: path.into(),
            stop_checkpoints: Some(stop_checkpoints),
            checkpointer: Some(checkpointer),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// (transactions committed, jobs they carried) since open.
    #[doc(hidden)]
    pub fn writer_stats(&self) -> (u64, u64) {
        (
            self.inner.commits.load(Ordering::Relaxed),
            self.inner.jobs.load(Ordering::Relaxed),
        )
    }

    fn send(&self, op: Op, waiter: Option<Waiter>) -> Result<(), StoreError> {
        self.queue
            .push(Job {
                op,
                waiter,
                queued_at: Instant::now(),
            })
            .map_err(|_| stopped())
    }

    /// Queues `op` and waits (blocking this thread) for its commit.
    fn send_wait(&self, op: Op) -> Done {
        let (t, r) = mpsc::sync_channel(1);
        self.send(op, Some(Waiter::Sync(t)))?;
        r.recv().map_err(|_| stopped())?
    }

    /// Queues `op` and resolves when its batch is committed.
    fn send_async(&self, op: Op) -> StoreFuture<'static, usize> {
        let (t, r) = oneshot::channel();
        let sent = self.send(op, Some(Waiter::Async(t)));
        Box::pin(async move {
            sent?;
            r.await.map_err(|_| stopped())?
        })
    }

    /// Makes every later commit fail as `f` does (tests of the 503 path).
    #[doc(hidden)]
    pub fn inject_fault(&self, f: Fault) -> Result<(), StoreError> {
        self.send_wait(Op::Fault(f)).map(|_| ())
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let conn = self.reader.lock().map_err(|_| poisoned())?;
        f(&conn).map_err(unavailable)
    }

    /// [`read`](Self::read) on the background's connection.
    fn read_background<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let conn = self.background.lock().map_err(|_| poisoned())?;
        f(&conn).map_err(unavailable)
    }

    /// Applies `f` to the entry's record, queues the write if anything
    /// changed (counted in `pending` until the writer commits it).
    fn change(
        &self,
        e: &mut Entry,
        f: &mut dyn FnMut(&mut Verification),
    ) -> Result<(), StoreError> {
        // The old version stays shared (with a queued write of it, or just
        // this snapshot); the change goes to a copy of it.
        let before = Arc::clone(&e.v);
        f(Arc::make_mut(&mut e.v));
        if *e.v == *before {
            // Unchanged: keep the one shared version.
            e.v = before;
        } else {
            self.send(
                Op::Update {
                    v: Arc::clone(&e.v),
                    before: before.status,
                    at_ms: now_ms(),
                },
                None,
            )?;
            // After the send: a write that was never queued must not keep
            // the record cached. The entry lock is held, so the writer
            // cannot settle this write before it is counted.
            e.pending += 1;
        }
        Ok(())
    }
}

/// Closes what a crash left open: `pending` and `calling` become `failed`
/// with call outcome `interrupted`, each with its webhook event, in one
/// transaction.
fn close_interrupted(conn: &mut Connection, hooks: &Hooks, now: i64) -> rusqlite::Result<usize> {
    let tx = conn.transaction()?;
    let stuck: Vec<Verification> = {
        // `OPEN` lets SQLite read only open verifications, by their index.
        let mut stmt = tx.prepare(&format!(
            "SELECT {V_COLS} FROM verifications WHERE {OPEN} \
             AND status IN ('pending', 'calling')"
        ))?;
        let rows = stmt.query_map([], row_to_v)?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    for mut v in stuck.iter().cloned() {
        let before = v.status;
        v.status = Status::Failed;
        v.call.outcome = Some(Outcome::Interrupted);
        if v.call.invited_at_ms.is_some() {
            v.call.ended_at_ms.get_or_insert(now);
        }
        write_update(&tx, hooks, &v, before, now)?;
    }
    tx.commit()?;
    Ok(stuck.len())
}

/// Makes due now the webhook events the last run held for an endpoint that
/// answered 410 Gone (`DeliveryAttempt::held`): this run may have the
/// endpoint mended, and it gets its own first answer from it.
fn release_held(conn: &Connection, now: i64) -> rusqlite::Result<usize> {
    conn.execute(
        "UPDATE webhook_outbox SET held = 0, next_attempt_ms = ?1 WHERE done = 0 AND held = 1",
        params![now],
    )
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Closing the queue lets the writer commit what is left and stop.
        self.queue.close();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        self.stop_checkpoints.take();
        if let Some(c) = self.checkpointer.take() {
            let _ = c.join();
        }
    }
}

/// Copies the WAL back into the database every `CHECKPOINT_EVERY`, beside
/// the writer (PASSIVE: never waits for, nor blocks, the writer or
/// readers), so no checkpoint ever runs inside a commit.
///
/// A PASSIVE checkpoint alone never lets the WAL start over under steady
/// writes: the writer appends while it copies, so it never catches up, and
/// SQLite rewinds the WAL only when a write begins with every frame copied.
/// The WAL then grows without bound (265 MB in 5 s at 1,000
/// verifications/s in the store bench), and every commit pays for it: the
/// kernel allocates and zeroes fresh file pages for each frame, and page
/// lookups search an ever longer WAL index. So once the WAL holds
/// `RESTART_FRAMES`, the checkpointer copies what the writer appended
/// meanwhile with the writer held off (`gate`, which the writer holds
/// around each commit): that pass is short (a few hundred frames and two
/// fsyncs: 3-15 ms on the bench machine, once per 64 MiB of WAL), it
/// completes, and the next commit rewrites the WAL from its start, over
/// pages already in memory.
fn checkpointer(conn: Connection, gate: Arc<Mutex<()>>, stop: mpsc::Receiver<()>) {
    let passive = |conn: &Connection| {
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        })
    };
    let mut failing = false;
    // Anything but a timeout (the store dropped its sender) ends it.
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
        let r = passive(&conn).and_then(|(log, _)| {
            // `log` is the WAL's length when the pass began; the writer
            // has appended since.
            if log >= RESTART_FRAMES {
                // Again beside the writer, each pass made durable (SQLite
                // syncs the database only in a pass that catches up), until
                // a pass finds only a few milliseconds' worth of new frames:
                // the pass under the gate then has little to copy and sync.
                let mut seen = log;
                for _ in 0..4 {
                    let (now, _) = passive(&conn)?;
                    sync_database(&conn)?;
                    let fresh = now - seen;
                    seen = now;
                    if fresh < 256 {
                        break;
                    }
                }
                // A panic elsewhere poisons nothing this guards.
                let _held = gate.lock().unwrap_or_else(|e| e.into_inner());
                passive(&conn)?;
            }
            Ok(())
        });
        match r {
            Ok(()) => failing = false,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "store: WAL checkpoint failed; will retry");
                }
                failing = true;
            }
        }
    }
}

/// fsync of `conn`'s database file, through SQLite's own handle (a second
/// descriptor of our own would, once closed, drop every POSIX lock this
/// process holds on the file).
fn sync_database(conn: &Connection) -> rusqlite::Result<()> {
    use rusqlite::ffi;
    let mut file: *mut ffi::sqlite3_file = std::ptr::null_mut();
    // SAFETY: FILE_POINTER stores the main database's `sqlite3_file *`
    // into `file`; the connection is open and used by this thread only.
    let rc = unsafe {
        ffi::sqlite3_file_control(
            conn.handle(),
            c"main".as_ptr(),
            ffi::SQLITE_FCNTL_FILE_POINTER,
            (&mut file as *mut *mut ffi::sqlite3_file).cast(),
        )
    };
    if rc != ffi::SQLITE_OK {
        return Err(rusqlite::Error::SqliteFailure(ffi::Error::new(rc), None));
    }
    // SAFETY: `file` is the connection's open database file (or null);
    // its methods outlive this call, and xSync is what SQLite itself calls.
    let rc = unsafe {
        match file
            .as_ref()
            .and_then(|f| f.pMethods.as_ref())
            .and_then(|m| m.xSync)
        {
            Some(sync) => sync(file, ffi::SQLITE_SYNC_NORMAL),
            None => ffi::SQLITE_OK,
        }
    };
    if rc != ffi::SQLITE_OK {
        return Err(rusqlite::Error::SqliteFailure(ffi::Error::new(rc), None));
    }
    Ok(())
}

impl SqliteStore {
    /// The expiry sweep, `batch` due records per query.
    fn expire_due_in_batches(
        &self,
        now_ms: i64,
        batch: usize,
    ) -> Result<Vec<Verification>, StoreError> {
        let mut expired = Vec::new();
        let started = Instant::now();
        loop {
            // Due and still open in the database, oldest first, through the
            // partial index of open ones. The cache may be ahead (a change
            // queued, not committed yet): `update` works on the cached
            // state, so a record already closed there is left alone.
            let due: Vec<String> = self.read_background(|c| {
                let mut stmt = c.prepare_cached(&EXPIRE_DUE)?;
                let rows = stmt.query_map(params![now_ms, batch as i64], |r| r.get(0))?;
                rows.collect()
            })?;
            for id in &due {
                let mut changed = false;
                if let Some(v) = self.update(id, &mut |v| changed = v.expire_if_due(now_ms))? {
                    if changed {
                        expired.push(v);
                    }
                }
            }
            // A backlog (the engine was down past many TTLs) is worked off
            // a batch at a time, half a second per sweep at most.
            if due.len() < batch || started.elapsed() >= EXPIRE_BUDGET {
                break;
            }
            // Commit what this batch closed before asking again: until then
            // the database still calls those records open and would hand
            // back the same ones.
            self.send_wait(Op::Flush)?;
        }
        // A record still cached well past its TTL (its call never ended)
        // goes too: reads of it go to the database.
        let cutoff = now_ms.saturating_sub(EVICT_AFTER_MS);
        self.inner.cache.retain(|_, e| e.v.expires_at_ms > cutoff);
        Ok(expired)
    }

    /// [`Store::update`] and [`Store::update_status`]: one read-modify-
    /// write, answering with what `answer` takes from the new state.
    fn update_with<T>(
        &self,
        id: &str,
        f: &mut dyn FnMut(&mut Verification),
        answer: impl Fn(&Verification) -> T,
    ) -> Result<Option<T>, StoreError> {
        if let Some(mut e) = self.inner.cache.get_mut(id) {
            // Queued while the entry is locked: the writer sees the
            // changes of one id in the order they were made.
            self.change(&mut e, f)?;
            return Ok(Some(answer(&e.v)));
        }
        // Not cached: its call is over (or the id is unknown). Loads of
        // evicted records are serialised by `miss`, and the cache is asked
        // again under it: another update may have brought it back.
        let _g = self.miss.lock().map_err(|_| poisoned())?;
        if let Some(mut e) = self.inner.cache.get_mut(id) {
            self.change(&mut e, f)?;
            return Ok(Some(answer(&e.v)));
        }
        let Some(v) = self.read(|c| load_one(c, id))? else {
            return Ok(None);
        };
        // Into the cache BEFORE its write is queued: the writer may commit
        // it at once, and its `settle` must find the entry to count down.
        // Cached until that write is committed, the next update of it reads
        // this state, not the database's older one.
        let v = {
            let mut e = self.inner.cache.entry(id.to_string()).or_insert(Entry {
                v: Arc::new(v),
                pending: 0,
            });
            self.change(&mut e, f)?;
            answer(&e.v)
        };
        // Unchanged: nothing queued, nothing to keep in memory.
        self.inner.cache.remove_if(id, |_, e| e.evictable());
        Ok(Some(v))
    }
}

impl Store for SqliteStore {
    fn insert(
        &self,
        v: Verification,
        idem: Option<(String, Idempotent)>,
    ) -> StoreFuture<'static, ()> {
        if self.inner.cache.contains_key(&v.id) {
            return Box::pin(std::future::ready(Err(StoreError::Duplicate(v.id))));
        }
        let f = self.send_async(Op::Insert {
            v: Box::new(v),
            idem,
        });
        Box::pin(async move { f.await.map(|_| ()) })
    }

    fn get(&self, id: &str) -> Result<Option<Verification>, StoreError> {
        if let Some(e) = self.inner.cache.get(id) {
            return Ok(Some(Verification::clone(&e.v)));
        }
        // Not cached: nothing of it is waiting to be committed.
        self.read(|c| load_one(c, id))
    }

    fn update(
        &self,
        id: &str,
        f: &mut dyn FnMut(&mut Verification),
    ) -> Result<Option<Verification>, StoreError> {
        self.update_with(id, f, Verification::clone)
    }

    fn update_status(
        &self,
        id: &str,
        f: &mut dyn FnMut(&mut Verification),
    ) -> Result<Option<Status>, StoreError> {
        // The SIP driver's case: only the status, no copy of the record.
        self.update_with(id, f, |v| v.status)
    }

    fn idempotent(&self, project: &str, key: &str) -> Result<Option<Idempotent>, StoreError> {
        // From the database: a replay is rare, and the row was committed
        // with its verification, before the first answer went out.
        self.read(|c| {
            c.prepare_cached(
                "SELECT body_sha256, verification_id, response FROM idempotency \
                 WHERE project = ?1 AND key = ?2",
            )?
            .query_row(params![project, key], |r| {
                let sha: Vec<u8> = r.get(0)?;
                let mut body_sha256 = [0u8; 32];
                if sha.len() == 32 {
                    body_sha256.copy_from_slice(&sha);
                }
                Ok(Idempotent {
                    body_sha256,
                    verification_id: r.get(1)?,
                    response: r.get(2)?,
                })
            })
            .optional()
        })
    }

    fn expire_due(&self, now_ms: i64) -> Result<Vec<Verification>, StoreError> {
        self.expire_due_in_batches(now_ms, EXPIRE_BATCH)
    }

    fn scan(
        &self,
        project: &str,
        from_ms: i64,
        to_ms: i64,
        sink: &mut dyn FnMut(&Verification) -> bool,
    ) -> Result<(), StoreError> {
        // Its own connection: a long export must not hold the reader that
        // `get` falls back on. In pages, each read in its own short
        // transaction, and the sink (which blocks while the client reads
        // slowly) runs between them: one cursor held across the whole
        // export kept a WAL read snapshot open as long as the client took,
        // and no checkpoint could restart the WAL past it, so it grew with
        // every commit meanwhile. Pages go on from the last row's (created
        // at, id), so the export is not one snapshot: a row committed
        // while it runs is included if it sorts after the page being read
        // and left out if before (its created_at is stamped before its
        // commit, which is up to a commit window later, more on a stalled
        // disk). Rows already committed are each read once.
        let conn = connect(&self.path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(unavailable)?;
        // One query for every page: the first starts from (from_ms, ""),
        // which every row of the range is past (ids are never empty).
        // SQLite seeks the index on the row value's first column.
        let query = format!(
            "SELECT {V_COLS} FROM verifications WHERE project = ?1 \
             AND (created_at_ms, id) > (?2, ?3) AND created_at_ms < ?4 \
             ORDER BY created_at_ms, id LIMIT ?5"
        );
        let mut after: (i64, String) = (from_ms, String::new());
        let mut page: Vec<Verification> = Vec::with_capacity(SCAN_PAGE);
        loop {
            page.clear();
            {
                let mut stmt = conn.prepare_cached(&query).map_err(unavailable)?;
                let mut rows = stmt
                    .query(params![project, after.0, after.1, to_ms, SCAN_PAGE as i64])
                    .map_err(unavailable)?;
                while let Some(r) = rows.next().map_err(unavailable)? {
                    page.push(row_to_v(r).map_err(unavailable)?);
                }
                // The statement is reset when `rows` drops: the read
                // transaction ends here, before the sink runs.
            }
            let full = page.len() == SCAN_PAGE;
            for v in &page {
                // The cache may be a few milliseconds ahead of the database.
                // Cloned: the sink may block, and must not hold the cache's
                // shard (the SIP driver writes through it) meanwhile.
                let cached = self
                    .inner
                    .cache
                    .get(&v.id)
                    .map(|c| Verification::clone(&c.v));
                let more = sink(cached.as_ref().unwrap_or(v));
                if !more {
                    return Ok(());
                }
            }
            match page.last() {
                Some(last) if full => after = (last.created_at_ms, last.id.clone()),
                _ => return Ok(()),
            }
        }
    }

    fn outbox_due(&self, now_ms: i64, limit: usize) -> Result<Vec<OutboxEvent>, StoreError> {
        self.read_background(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, project, payload, created_at_ms, attempts, next_attempt_ms \
                 FROM webhook_outbox WHERE done = 0 AND next_attempt_ms <= ?1 \
                 ORDER BY next_attempt_ms LIMIT ?2",
            )?;
            let rows = stmt.query_map(
                params![now_ms, i64::try_from(limit).unwrap_or(i64::MAX)],
                |r| {
                    Ok(OutboxEvent {
                        id: r.get(0)?,
                        project: r.get(1)?,
                        payload: r.get(2)?,
                        created_at_ms: r.get(3)?,
                        attempts: r.get(4)?,
                        next_attempt_ms: r.get(5)?,
                    })
                },
            )?;
            rows.collect()
        })
    }

    /// Blocks until the attempt is committed (a few milliseconds), so the
    /// next `outbox_due` never offers the event again too early.
    fn outbox_record(&self, id: &str, attempt: DeliveryAttempt) -> Result<(), StoreError> {
        self.send_wait(Op::Delivery {
            id: id.to_string(),
            attempt,
        })
        .map(|_| ())
    }

    fn outbox_record_async(&self, id: &str, attempt: DeliveryAttempt) -> StoreFuture<'static, ()> {
        let f = self.send_async(Op::Delivery {
            id: id.to_string(),
            attempt,
        });
        Box::pin(async move { f.await.map(|_| ()) })
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        let f = self.send_async(Op::Flush);
        Box::pin(async move { f.await.map(|_| ()) })
    }

    fn record_check(&self, id: &str, at_ms: i64, result: CheckResult) {
        if let Err(e) = self.send(
            Op::Check {
                id: id.to_string(),
                at_ms,
                result: result.as_str(),
            },
            None,
        ) {
            tracing::error!(error = %e, "store: check not recorded");
        }
    }

    /// Blocks until the batch is deleted: call it off the async workers.
    fn prune(&self, before_ms: i64, limit: usize) -> Result<usize, StoreError> {
        self.send_wait(Op::Prune { before_ms, limit })
    }

    fn durable(&self) -> bool {
        true
    }

    fn len(&self) -> usize {
        self.inner.cache.len()
    }
}

mod queue;
#[cfg(test)]
mod tests;
