//! Micro-benchmarks of the create path of `serve`: the phone check (ours
//! and, for comparison, the `phonenumber` crate's), the limiter checks and
//! the whole `POST /v1/verifications` handler in-process (auth, JSON,
//! phone validation, limits, a pick from a 1,000,000-number pool, the
//! in-memory store, queueing the call), driven through the router with
//! tower's `oneshot`, so no socket is involved.

use axum::body::Body;
use axum::http::Request;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use flashcall::config::Config;
use flashcall::config::PerPhoneConfig;
use flashcall::engine::{EngineShared, Trunk};
use flashcall::http::{router, AppState};
use flashcall::limits::Limits;
use flashcall::pool::Pool;
use flashcall::store::memory::MemoryStore;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::path::Path;
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
senders = [{ code = "BENCH", status = "active" }]
"#;

fn pool() -> Pool {
    let text: String = (0..100).map(|i| format!("+4477{i:02}00XXXX\n")).collect();
    Pool::parse(&text, 4, "bench", &mut StdRng::seed_from_u64(1)).expect("pool")
}

/// Numbers the phone benches cycle through: the UK mobiles of the handler
/// bench, then a mix — +1 US and Canada (found after the US patterns
/// fail), +7 Russia and Kazakhstan, Italy's leading zero, Argentina's
/// transform rule, a non-geographic code, and refusals (drama range, too
/// short, no such calling code).
const MIXED: &[&str] = &[
    "+447911123456",
    "+16502530000",
    "+14163492000",
    "+74957397000",
    "+77012345678",
    "+390236618300",
    "+5491123456789",
    "+4930123456",
    "+919876543210",
    "+80012345678",
    "+447700900123",
    "+4412345",
    "+9991234567",
];

fn phone_benches(c: &mut Criterion) {
    let uk: Vec<String> = (0..1000).map(|n| format!("+4479111{n:05}")).collect();
    for (name, check) in [
        (
            "phone_check_fast",
            flashcall::phone::is_valid as fn(&str) -> bool,
        ),
        ("phone_check_crate", flashcall::phone::crate_is_valid),
    ] {
        // Both sides warm: patterns compiled, the crate's LRU filled.
        for p in uk.iter().map(String::as_str).chain(MIXED.iter().copied()) {
            check(p);
        }
        let mut i = 0;
        c.bench_function(&format!("{name}_uk_mobile"), |b| {
            b.iter(|| {
                i = (i + 1) % uk.len();
                check(black_box(&uk[i]))
            })
        });
        c.bench_function(&format!("{name}_mixed"), |b| {
            b.iter(|| {
                i = (i + 1) % MIXED.len();
                check(black_box(MIXED[i]))
            })
        });
    }
}

fn benches(c: &mut Criterion) {
    phone_benches(c);
    let cfg = Config::parse(CONFIG, Path::new("bench.toml"), |_| None).expect("config");

    let limits = Limits::new(&cfg.projects, &cfg.limits.per_phone);
    c.bench_function("limits_check_project", |b| {
        b.iter(|| limits.check_project(black_box("bench")))
    });
    // A new key each time, on a limiter that starts empty every CHUNK
    // keys: one that kept growing across criterion's samples (millions of
    // keys by the last) measured its own table's rehashes and cache misses,
    // and its interval spanned 0.3-2.6 µs from one run to the next.
    c.bench_function("limits_check_phone_distinct_keys", |b| {
        let mut state = Chunked::new(|| {
            let fresh = Limits::new(&cfg.projects, &cfg.limits.per_phone);
            move |i: u64| {
                let _ = fresh.check_phone(black_box(447_000_000_000 + i));
            }
        });
        b.iter_custom(|iters| state.run(iters))
    });

    // The housekeeping sweep of the per-phone limiter with the default
    // limit (3 per 600 s) after 240,000 distinct destinations (60 s at
    // 4,000/s): every key is within its window, so it scans them all and
    // keeps them, the work the sweep does at that load every 10 s.
    let swept = Limits::new(&cfg.projects, &PerPhoneConfig::default());
    for i in 0..240_000u64 {
        let _ = swept.check_phone(447_100_000_000 + i);
    }
    c.bench_function("limits_sweep_240k_recent_keys", |b| {
        b.iter(|| swept.sweep())
    });
    assert_eq!(swept.tracked_phones(), 240_000, "the sweep kept every key");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // A fresh engine, store and limiter every CHUNK creates, as in the
    // limiter bench above: the in-memory store otherwise held every record
    // of every sample (millions) and the interval spanned 7-29 µs.
    c.bench_function("create_handler_1m_pool", |b| {
        let mut state = Chunked::new(|| {
            let engine = Arc::new(EngineShared::new(vec![Trunk {
                name: "bench".into(),
                addr: "127.0.0.1:5070".parse().expect("literal"),
                host: "127.0.0.1:5070".into(),
                cps: 1_000_000,
                queue_cap: 1_000_000,
                weight: 1,
                credentials: None,
                caller_id: Default::default(),
            }]));
            let store = Arc::new(MemoryStore::new(0, Default::default()));
            let state = Arc::new(AppState::new(&cfg, pool(), store, engine.clone()));
            let app = router(state);
            let rt = &rt;
            let mut drained = Vec::new();
            move |i: u64| {
                let body = format!(r#"{{"phone":"+4479111{:05}","sender":"BENCH"}}"#, i);
                let req = Request::post("/v1/verifications")
                    .header("content-type", "application/json")
                    // base64("bench:bench-secret")
                    .header("authorization", "Basic YmVuY2g6YmVuY2gtc2VjcmV0")
                    .body(Body::from(body))
                    .expect("request");
                let resp = rt.block_on(app.clone().oneshot(req)).expect("infallible");
                assert_eq!(resp.status(), 201);
                // Stand in for the SIP driver: take the queued call.
                engine.take_submitted(&mut drained);
                for cmd in drained.drain(..) {
                    engine.dequeued(cmd.trunk);
                }
            }
        });
        b.iter_custom(|iters| state.run(iters))
    });
}

/// Keys (and creates) per fresh state in the benches that add one each
/// time: 100,000 phones are also what the create bench's numbers span.
const CHUNK: u64 = 100_000;

/// A state that is replaced by a fresh one from `make` every [`CHUNK`]
/// steps, kept across criterion's samples so that every sample, small or
/// large, measures steps on a state holding 0 to CHUNK entries.
struct Chunked<F, M> {
    make: M,
    cur: Option<F>,
    used: u64,
}

impl<F: FnMut(u64), M: FnMut() -> F> Chunked<F, M> {
    fn new(make: M) -> Self {
        Chunked {
            make,
            cur: None,
            used: 0,
        }
    }

    /// Times `iters` steps; making and dropping states is not timed.
    fn run(&mut self, iters: u64) -> Duration {
        let mut total = Duration::ZERO;
        let mut done = 0;
        while done < iters {
            if self.cur.is_none() || self.used == CHUNK {
                self.cur = None;
                self.cur = Some((self.make)());
                self.used = 0;
            }
            let n = (iters - done).min(CHUNK - self.used);
            let (step, from) = (self.cur.as_mut().expect("made above"), self.used);
            let t = Instant::now();
            for i in from..from + n {
                step(i);
            }
            total += t.elapsed();
            self.used += n;
            done += n;
        }
        total
    }
}

criterion_group!(serve, benches);
criterion_main!(serve);
