//! The durable store's cost (issue 4), as a plain program (harness=false):
//!
//! 1. Create latency through the whole in-process `POST /v1/verifications`
//!    handler (as benches/serve.rs, but on the SQLite store: the 201 waits
//!    for the group commit), paced open-loop at 1,000 creates/s; p50/p99/max
//!    from an HDR histogram.
//! 2. Records written per second at saturation: many concurrent inserts
//!    straight into the store, every one awaited until committed.
//! 3. The engine's write pattern, open-loop at 1,000 and 4,000
//!    verifications/s: each is inserted (awaited, as before a 201), then a
//!    stand-in SIP driver thread updates it to `calling` at once and to
//!    `delivered` with its call record 1 ms later, into a database that
//!    already holds BENCH_PREFILL (default 1,000,000) old verifications, as
//!    a month of retention would. Reports the create p99, commits/s and
//!    jobs per commit, and the CPU of the store's threads (writer and
//!    checkpointer, from /proc schedstat) per verification: the figure the
//!    end-to-end load bench attributes to `flashcall-store`.
//!
//! `cargo bench --bench store` (env BENCH_SECS to change the run length;
//! `cargo test` runs it for 300 ms to prove it works).
//! The databases live in the system temp dir and are removed afterwards,
//! except the prefilled template, kept for the next run.

use axum::body::Body;
use axum::http::Request;
use flashcall::config::Config;
use flashcall::engine::{EngineShared, Trunk};
use flashcall::http::{router, AppState};
use flashcall::pool::Pool;
use flashcall::sip::Outcome;
use flashcall::store::sqlite::SqliteStore;
use flashcall::store::Store;
use flashcall::verification::{CallRecord, Status, Verification};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower::ServiceExt;

const CONFIG: &str = r#"
[sandbox]
enabled = true
[limits.per_phone]
max = 1000
per_secs = 1
[[projects]]
login = "bench"
secret = "bench-secret"
rate = 1000000000
burst = 1000000000
webhook_url = "http://127.0.0.1:9/hook"
webhook_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
senders = [{ code = "BENCH", status = "active" }]
"#;

fn pool() -> Pool {
    let text: String = (0..100).map(|i| format!("+4477{i:02}00XXXX\n")).collect();
    Pool::parse(&text, 4, "bench", &mut StdRng::seed_from_u64(1)).expect("pool")
}

fn db_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flashcall-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("bench dir");
    d
}

fn open(dir: &Path) -> SqliteStore {
    // The bench project has a webhook: every create also writes its
    // outbox row, as in production with webhooks on.
    SqliteStore::open(&dir.join("bench.db"), HashSet::from(["bench".to_string()])).expect("open")
}

/// How long each part runs, in milliseconds: BENCH_SECS (default 5) under
/// `cargo bench`, 300 ms under `cargo test` (which only proves it works).
fn run_ms() -> u64 {
    if !std::env::args().any(|a| a == "--bench") {
        return 300;
    }
    std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(5)
        * 1_000
}

fn paced_create_latency(rate: u64) {
    let cfg = Config::parse(CONFIG, Path::new("bench.toml"), |_| None).expect("config");
    let engine = Arc::new(EngineShared::new(vec![Trunk {
        name: "bench".into(),
        addr: "127.0.0.1:5070".parse().expect("literal"),
        host: "127.0.0.1:5070".into(),
        cps: 1_000_000,
        queue_cap: 10_000_000,
        weight: 1,
        credentials: None,
        caller_id: Default::default(),
    }]));
    let dir = db_dir("paced");
    let store: Arc<dyn Store> = Arc::new(open(&dir));
    let state = Arc::new(AppState::new(&cfg, pool(), store, engine.clone()));
    let app = router(state);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    // Stand in for the SIP driver: take the queued calls.
    let stop = Arc::new(AtomicBool::new(false));
    let drainer = {
        let engine = engine.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut drained = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                engine.take_submitted(&mut drained);
                for cmd in drained.drain(..) {
                    engine.dequeued(cmd.trunk);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };

    let total = rate * run_ms() / 1_000;
    // The first 10% warm up (the phone metadata, the page cache, the
    // allocator) and are not recorded.
    let warm = total / 10;
    let hist = rt.block_on(async move {
        let start = tokio::time::Instant::now();
        let mut tasks = Vec::with_capacity(total as usize);
        for n in 0..total {
            // Open loop: request n goes at n / rate, whatever the others do.
            tokio::time::sleep_until(start + Duration::from_micros(n * 1_000_000 / rate)).await;
            let app = app.clone();
            tasks.push(tokio::spawn(async move {
                let body = format!(
                    r#"{{"phone":"+4479111{:05}","sender":"BENCH"}}"#,
                    n % 100_000
                );
                let req = Request::post("/v1/verifications")
                    .header("content-type", "application/json")
                    // base64("bench:bench-secret")
                    .header("authorization", "Basic YmVuY2g6YmVuY2gtc2VjcmV0")
                    .body(Body::from(body))
                    .expect("request");
                let t0 = Instant::now();
                let resp = app.oneshot(req).await.expect("infallible");
                let us = t0.elapsed().as_micros() as u64;
                (n, resp.status().as_u16(), us)
            }));
        }
        let mut hist = Histogram::<u64>::new(3).expect("histogram");
        let mut non201 = 0u64;
        for t in tasks {
            let (n, status, us) = t.await.expect("task");
            if status == 201 {
                if n >= warm {
                    let _ = hist.record(us.max(1));
                }
            } else {
                non201 += 1;
            }
        }
        assert_eq!(non201, 0, "every create should be 201");
        hist
    });
    stop.store(true, Ordering::Relaxed);
    let _ = drainer.join();
    println!(
        "create_handler_sqlite_paced: {} creates at {rate}/s (after {warm} warm-up): p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        hist.len(),
        hist.value_at_quantile(0.50) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.value_at_quantile(0.999) as f64 / 1000.0,
        hist.max() as f64 / 1000.0,
    );
    drop(rt);
    let _ = std::fs::remove_dir_all(&dir);
}

fn saturation(concurrency: usize) {
    let dir = db_dir("saturation");
    let store = Arc::new(open(&dir));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let written = Arc::new(AtomicU64::new(0));
    let run_for = Duration::from_millis(run_ms());
    let now = flashcall::engine::now_ms();
    let t0 = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..concurrency {
            let store = store.clone();
            let written = written.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = 0u64;
                while t0.elapsed() < run_for {
                    let v = verification(format!("{w:04}-{i:012}"), now, i);
                    store.insert(v, None).await.expect("insert");
                    written.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
    });
    let elapsed = t0.elapsed().as_secs_f64();
    let n = written.load(Ordering::Relaxed);
    println!(
        "store_insert_saturation: {concurrency} concurrent inserters: {n} records committed in {elapsed:.1} s = {:.0} records/s",
        n as f64 / elapsed
    );
    drop(rt);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

/// CPU time, in nanoseconds, that this process's thread named `name` has
/// run (the first field of its schedstat; 0 if there is no such thread).
fn thread_cpu_ns(name: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            return std::fs::read_to_string(t.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
        }
    }
    0
}

/// The whole process's user + system CPU, in nanoseconds.
fn process_cpu_ns() -> u64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
    ns(ru.ru_utime) + ns(ru.ru_stime)
}

fn verification(id: String, now: i64, n: u64) -> Verification {
    Verification {
        id,
        project: "bench".into(),
        phone: format!("+4479111{:05}", n % 100_000),
        sender: "BENCH".into(),
        code: "1234".into(),
        client_code: false,
        caller: "+447700901234".into(),
        reference: None,
        created_at_ms: now,
        expires_at_ms: now + 300_000,
        attempts_left: 3,
        status: Status::Pending,
        call: CallRecord::default(),
    }
}

/// A database holding `rows` old, finished verifications (each with its
/// call attempt), in the schema this build writes: what the engine's
/// store looks like after weeks of traffic. Built once and kept in the
/// temp dir for the next run (it takes tens of seconds; the name carries
/// the schema version and row count).
fn prefilled(rows: u64) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "flashcall-bench-template-v{}-{rows}.db",
        flashcall::store::sqlite::SCHEMA_VERSION
    ));
    if path.exists() {
        return path;
    }
    let dir = db_dir("template");
    let building = dir.join("bench.db");
    drop(open(&dir));
    let t0 = Instant::now();
    let mut c = rusqlite::Connection::open(&building).expect("open template");
    let tx = c.transaction().expect("tx");
    {
        let mut v = tx
            .prepare(
                "INSERT INTO verifications (id, project, phone, sender, code, client_code, \
                 caller, created_at_ms, expires_at_ms, attempts_left, status, call_trunk, \
                 call_outcome, call_sip_code, call_invited_at_ms, call_ringing_at_ms, \
                 call_cancel_at_ms, call_ended_at_ms) VALUES (?1, 'bench', ?2, 'BENCH', '1234', \
                 0, '+447700901234', ?3, ?4, 3, 'expired', 'bench', 'delivered', 487, ?3, ?3, \
                 ?3, ?3)",
            )
            .expect("prepare");
        // Schema 1 kept a second copy of each call in its own table.
        let table: Option<String> = tx
            .query_row(
                "SELECT type FROM sqlite_master WHERE name = 'call_attempts'",
                [],
                |r| r.get(0),
            )
            .ok();
        let mut a = (table.as_deref() == Some("table")).then(|| {
            tx.prepare(
                "INSERT INTO call_attempts (verification_id, trunk, caller, destination, \
                 invited_at_ms, ringing_at_ms, cancel_at_ms, final_at_ms, sip_code, outcome) \
                 VALUES (?1, 'bench', '+447700901234', ?2, ?3, ?3, ?3, ?3, 487, 'delivered')",
            )
            .expect("prepare")
        });
        let mut rng = StdRng::seed_from_u64(7);
        // Spread over the last 20 days, oldest first, as they were written.
        let start = flashcall::engine::now_ms() - 20 * 86_400_000;
        for n in 0..rows {
            let at = start + (n * 20 * 86_400_000 / rows.max(1)) as i64;
            let id = flashcall::verification::new_id(at, &mut rng);
            let phone = format!("+4479111{:05}", n % 100_000);
            v.execute(rusqlite::params![id, phone, at, at + 300_000])
                .expect("prefill");
            if let Some(a) = a.as_mut() {
                a.execute(rusqlite::params![id, phone, at])
                    .expect("prefill");
            }
        }
    }
    tx.commit().expect("commit");
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .expect("checkpoint");
    c.execute_batch("PRAGMA journal_mode = DELETE")
        .expect("no WAL");
    drop(c);
    std::fs::rename(&building, &path).expect("keep template");
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "prefill: {rows} verifications in {:.1} s ({})",
        t0.elapsed().as_secs_f64(),
        path.display()
    );
    path
}

fn mixed(template: &Path, rate: u64, webhook: bool) {
    let dir = db_dir("mixed");
    let path = dir.join("bench.db");
    std::fs::copy(template, &path).expect("copy template");
    let projects = if webhook {
        HashSet::from(["bench".to_string()])
    } else {
        HashSet::new()
    };
    let store = Arc::new(SqliteStore::open(&path, projects).expect("open"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    // The SIP driver's writes: `calling` as the INVITE goes out, the call
    // record and `delivered` when the call ends ~1 ms later.
    let (calls, started) = std::sync::mpsc::channel::<String>();
    let driver = {
        let store = store.clone();
        std::thread::spawn(move || {
            let mut ringing = std::collections::VecDeque::<(Instant, String)>::new();
            let mut closed = false;
            loop {
                let wait = ringing
                    .front()
                    .map_or(Duration::from_millis(100), |(t, _)| {
                        t.saturating_duration_since(Instant::now())
                    });
                if closed {
                    if ringing.is_empty() {
                        break;
                    }
                    std::thread::sleep(wait);
                } else {
                    match started.recv_timeout(wait) {
                        Ok(id) => {
                            let at = flashcall::engine::now_ms();
                            store
                                .update(&id, &mut |v| v.call_started("bench", at))
                                .expect("update");
                            ringing.push_back((Instant::now() + Duration::from_millis(1), id));
                        }
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => closed = true,
                    }
                }
                let now = Instant::now();
                while ringing.front().is_some_and(|(t, _)| *t <= now) {
                    let (_, id) = ringing.pop_front().expect("front");
                    let at = flashcall::engine::now_ms();
                    store
                        .update(&id, &mut |v| {
                            let record = CallRecord {
                                trunk: "bench".into(),
                                outcome: None,
                                sip_code: Some(487),
                                invited_at_ms: v.call.invited_at_ms,
                                ringing_at_ms: Some(at),
                                cancel_at_ms: Some(at),
                                ended_at_ms: Some(at),
                            };
                            v.call_ended(Outcome::Delivered, record);
                        })
                        .expect("update");
                }
            }
        })
    };

    let total = rate * run_ms() / 1_000;
    let warm = total / 10;
    let (commits0, jobs0) = store.writer_stats();
    let (writer0, checkpoint0, proc0) = (
        thread_cpu_ns("flashcall-store"),
        thread_cpu_ns("flashcall-check"),
        process_cpu_ns(),
    );
    let t0 = Instant::now();
    let hist = rt.block_on({
        let store = store.clone();
        async move {
            let start = tokio::time::Instant::now();
            let mut rng = StdRng::seed_from_u64(rate);
            let now = flashcall::engine::now_ms();
            let mut tasks = Vec::with_capacity(total as usize);
            for n in 0..total {
                tokio::time::sleep_until(start + Duration::from_micros(n * 1_000_000 / rate)).await;
                // The id the engine gives a create now (time-ordered).
                let v = verification(
                    flashcall::verification::new_id(flashcall::engine::now_ms(), &mut rng),
                    now,
                    n,
                );
                let store = store.clone();
                let calls = calls.clone();
                tasks.push(tokio::spawn(async move {
                    let id = v.id.clone();
                    let t = Instant::now();
                    store.insert(v, None).await.expect("insert");
                    let us = t.elapsed().as_micros() as u64;
                    let _ = calls.send(id);
                    (n, us)
                }));
            }
            drop(calls);
            let mut hist = Histogram::<u64>::new(3).expect("histogram");
            for t in tasks {
                let (n, us) = t.await.expect("task");
                if n >= warm {
                    let _ = hist.record(us.max(1));
                }
            }
            hist
        }
    });
    driver.join().expect("driver");
    rt.block_on(store.flush()).expect("flush");
    let secs = t0.elapsed().as_secs_f64();
    let (commits1, jobs1) = store.writer_stats();
    let (writer1, checkpoint1, proc1) = (
        thread_cpu_ns("flashcall-store"),
        thread_cpu_ns("flashcall-check"),
        process_cpu_ns(),
    );
    let commits = commits1 - commits0;
    let wal_mb = std::fs::metadata(dir.join("bench.db-wal")).map_or(0, |m| m.len()) / 1_000_000;
    let per_v = |ns: u64| ns as f64 / 1_000.0 / total as f64;
    println!(
        "store_mixed{}: {total} verifications at {rate}/s (insert + calling + delivered): \
         create p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {:.0} commits/s, {:.1} jobs/commit; \
         CPU per verification: writer {:.1} us, checkpointer {:.1} us, whole process {:.1} us; \
         WAL {wal_mb} MB",
        if webhook { "_webhooks" } else { "" },
        hist.value_at_quantile(0.50) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.max() as f64 / 1000.0,
        commits as f64 / secs,
        (jobs1 - jobs0) as f64 / commits.max(1) as f64,
        per_v(writer1 - writer0),
        per_v(checkpoint1 - checkpoint0),
        per_v(proc1 - proc0),
    );
    drop(rt);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "paced" {
        paced_create_latency(1_000);
    }
    if only.is_empty() || only == "saturation" {
        saturation(256);
    }
    if only.is_empty() || only == "mixed" {
        let rows = if std::env::args().any(|a| a == "--bench") {
            std::env::var("BENCH_PREFILL")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(1_000_000)
        } else {
            1_000
        };
        let template = prefilled(rows);
        // BENCH_MIXED="1000,4000,4000w": the cases (rate, w = webhooks on).
        let cases = std::env::var("BENCH_MIXED").unwrap_or_else(|_| "1000,4000,4000w".into());
        for case in cases.split(',') {
            let webhook = case.ends_with('w');
            let rate = case
                .trim_end_matches('w')
                .parse()
                .expect("BENCH_MIXED: rates");
            mixed(&template, rate, webhook);
        }
    }
}
