//! The durable store's cost (issue 4), as a plain program (harness=false):
//!
//! 1. Create latency through the whole in-process `POST /v1/verifications`
//!    handler (as benches/serve.rs, but on the SQLite store: the 201 waits
//!    for the group commit), paced open-loop at 1,000 creates/s; p50/p99/max
//!    from an HDR histogram.
//! 2. Records written per second at saturation: many concurrent inserts
//!    straight into the store, every one awaited until committed.
//!
//! `cargo bench --bench store` (env BENCH_SECS to change the run length;
//! `cargo test` runs it for 300 ms to prove it works).
//! The database lives in the system temp dir and is removed afterwards.

use axum::body::Body;
use axum::http::Request;
use flashcall::config::Config;
use flashcall::engine::{EngineShared, Trunk};
use flashcall::http::{router, AppState};
use flashcall::pool::Pool;
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
max = 1000000
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
                    let v = Verification {
                        id: format!("{w:04}-{i:012}"),
                        project: "bench".into(),
                        phone: "+447911123456".into(),
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
                    };
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

fn main() {
    paced_create_latency(1_000);
    saturation(256);
}
