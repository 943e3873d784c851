//! The CSV export streams (issue 4: "a million rows without holding them
//! in memory"): in-process, the memory store with 200,000 synthetic
//! verifications, the body read chunk by chunk. And when the client goes
//! away, the scan stops instead of running to the end. Nothing is timed:
//! the only wait is a bounded poll for the producer to finish.

use axum::body::Body;
use futures_util::StreamExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flashcall::http::{csv_export, CSV_CHUNK};
use flashcall::sip::Outcome;
use flashcall::store::memory::MemoryStore;
use flashcall::store::{DeliveryAttempt, Idempotent, OutboxEvent, Store, StoreError, StoreFuture};
use flashcall::verification::{CallRecord, Status, Verification};

const ROWS: usize = 200_000;
const T0: i64 = 1_795_564_800_000; // 2026-11-25T00:00:00Z

/// The memory store, counting the rows its scan hands out and whether the
/// scan has returned.
struct Counting {
    inner: MemoryStore,
    visited: AtomicUsize,
    done: AtomicBool,
    /// Scans fail at once, as a store whose disk went away.
    fail: AtomicBool,
}

impl Store for Counting {
    fn insert(
        &self,
        v: Verification,
        idem: Option<(String, Idempotent)>,
    ) -> StoreFuture<'static, ()> {
        self.inner.insert(v, idem)
    }
    fn get(&self, id: &str) -> Result<Option<Verification>, StoreError> {
        self.inner.get(id)
    }
    fn update(
        &self,
        id: &str,
        f: &mut dyn FnMut(&mut Verification),
    ) -> Result<Option<Verification>, StoreError> {
        self.inner.update(id, f)
    }
    fn idempotent(&self, project: &str, key: &str) -> Result<Option<Idempotent>, StoreError> {
        self.inner.idempotent(project, key)
    }
    fn expire_due(&self, now_ms: i64) -> Result<Vec<Verification>, StoreError> {
        self.inner.expire_due(now_ms)
    }
    fn scan(
        &self,
        project: &str,
        from_ms: i64,
        to_ms: i64,
        sink: &mut dyn FnMut(&Verification) -> bool,
    ) -> Result<(), StoreError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("disk I/O error".into()));
        }
        let r = self.inner.scan(project, from_ms, to_ms, &mut |v| {
            self.visited.fetch_add(1, Ordering::SeqCst);
            sink(v)
        });
        self.done.store(true, Ordering::SeqCst);
        r
    }
    fn outbox_due(&self, now_ms: i64, limit: usize) -> Result<Vec<OutboxEvent>, StoreError> {
        self.inner.outbox_due(now_ms, limit)
    }
    fn outbox_record(&self, id: &str, attempt: DeliveryAttempt) -> Result<(), StoreError> {
        self.inner.outbox_record(id, attempt)
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
}

fn synthetic(i: usize) -> Verification {
    let created = T0 + i as i64;
    Verification {
        id: format!("{i:032x}"),
        project: "p".into(),
        phone: format!("+4477009{:05}", i % 100_000),
        sender: "SHOP".into(),
        code: "1234".into(),
        client_code: false,
        caller: "+447700901234".into(),
        // Every tenth has a reference that needs quoting.
        reference: (i % 10 == 0).then(|| format!("ref {i}, \"x\"")),
        created_at_ms: created,
        expires_at_ms: created + 300_000,
        attempts_left: 3,
        status: Status::Delivered,
        call: CallRecord {
            trunk: "main".into(),
            outcome: Some(Outcome::Delivered),
            sip_code: Some(487),
            invited_at_ms: Some(created + 5),
            ringing_at_ms: Some(created + 105),
            cancel_at_ms: Some(created + 150),
            ended_at_ms: Some(created + 160),
        },
    }
}

async fn store_with_rows() -> Arc<Counting> {
    let s = Arc::new(Counting {
        inner: MemoryStore::new(3_600_000, Default::default()),
        visited: AtomicUsize::new(0),
        done: AtomicBool::new(false),
        fail: AtomicBool::new(false),
    });
    for i in 0..ROWS {
        s.insert(synthetic(i), None).await.expect("insert");
    }
    s
}

async fn export(s: &Arc<Counting>) -> Body {
    let store: Arc<dyn Store> = s.clone();
    // `now` before every TTL: the statuses stay as stored.
    csv_export(store, "p".into(), T0, T0 + 86_400_000, None, T0)
        .await
        .expect("export")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_export_arrives_in_many_chunks() {
    let s = store_with_rows().await;
    let mut body = export(&s).await.into_data_stream();
    let mut chunks = 0usize;
    let mut bytes = 0usize;
    let mut largest = 0usize;
    // Rows are counted by a real CSV parser fed chunk by chunk: fields
    // with quotes and commas, records split across chunks.
    let mut parser = csv_core::Reader::new();
    let mut records = 0usize;
    let mut field = [0u8; 4096];
    let mut ends = [0usize; 32];
    // Where the record being read has got to in `field`/`ends`: a record
    // split across chunks continues there.
    let (mut out, mut end) = (0usize, 0usize);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.expect("chunk");
        chunks += 1;
        bytes += chunk.len();
        largest = largest.max(chunk.len());
        let mut input = &chunk[..];
        loop {
            let (res, n_in, n_out, n_end) =
                parser.read_record(input, &mut field[out..], &mut ends[end..]);
            input = &input[n_in..];
            out += n_out;
            end += n_end;
            match res {
                csv_core::ReadRecordResult::InputEmpty => break,
                csv_core::ReadRecordResult::Record => {
                    assert_eq!(end, 17, "fields in record {records}");
                    records += 1;
                    (out, end) = (0, 0);
                }
                csv_core::ReadRecordResult::OutputFull
                | csv_core::ReadRecordResult::OutputEndsFull => panic!("a record over 4 KiB"),
                csv_core::ReadRecordResult::End => break,
            }
        }
    }
    // The input ended: a last record without a line break would come now.
    let (res, ..) = parser.read_record(&[], &mut field[out..], &mut ends[end..]);
    assert!(
        matches!(res, csv_core::ReadRecordResult::End),
        "the body ends with a complete record"
    );
    assert_eq!(records, ROWS + 1, "header + one record per verification");
    assert!(
        chunks >= bytes / (2 * CSV_CHUNK),
        "{chunks} chunks for {bytes} bytes"
    );
    assert!(chunks > 10, "{chunks} chunks");
    // Chunks are bounded: the chunk size plus one flush of the csv
    // writer's 8 KiB buffer at most.
    assert!(largest <= CSV_CHUNK + 8192, "a chunk of {largest} bytes");
    assert_eq!(s.visited.load(Ordering::SeqCst), ROWS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_stops_the_scan() {
    let s = store_with_rows().await;
    let mut body = export(&s).await.into_data_stream();
    let first = body.next().await.expect("a chunk").expect("chunk");
    assert!(!first.is_empty());
    drop(body);
    // The producer notices at its next send and the scan returns.
    let end = Instant::now() + Duration::from_secs(30);
    while !s.done.load(Ordering::SeqCst) {
        assert!(Instant::now() < end, "the scan did not stop");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let visited = s.visited.load(Ordering::SeqCst);
    assert!(visited < ROWS, "the scan went on to row {visited}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_fails_at_once_is_a_503_not_a_200() {
    let s = Arc::new(Counting {
        inner: MemoryStore::new(3_600_000, Default::default()),
        visited: AtomicUsize::new(0),
        done: AtomicBool::new(false),
        fail: AtomicBool::new(true),
    });
    let store: Arc<dyn Store> = s.clone();
    match csv_export(store, "p".into(), T0, T0 + 1, None, T0).await {
        Ok(_) => panic!("a failed scan answered with a body"),
        Err(e) => {
            assert_eq!(e.status.as_u16(), 503);
            assert_eq!(e.slug, "overloaded");
        }
    }
}
