//! Number pool micro-benchmarks (SPEC §3) on the target pool:
//! 1,000,000 numbers as 100 ranges of 10,000, code_length 4.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use flashcall::pool::Pool;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::time::{Duration, Instant};

fn million_text() -> String {
    (0..100)
        .map(|i| format!("+4477{i:02}00XXXX country=GB\n"))
        .collect()
}

fn benches(c: &mut Criterion) {
    let text = million_text();
    let mut group = c.benchmark_group("pool_1m");
    // One parse takes tens of milliseconds; ten samples are plenty.
    group.sample_size(10);
    group.bench_function("parse", |b| {
        let mut rng = StdRng::seed_from_u64(1);
        b.iter(|| Pool::parse(black_box(&text), 4, "bench", &mut rng).map(|p| p.len()))
    });
    group.finish();

    // StdRng is ChaCha12, the CSPRNG production would pass in.
    let mut rng = StdRng::seed_from_u64(2);
    let mut pool = match Pool::parse(&text, 4, "bench", &mut rng) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    };
    let t0 = Instant::now();
    let codes: Vec<String> = (0..10_000).map(|i| format!("{i:04}")).collect();
    let mut i = 0usize;
    c.bench_function("pool_1m/pick_client_code", |b| {
        b.iter(|| {
            i = (i + 1) % codes.len();
            pool.pick(Some(black_box(&codes[i])), t0, &mut rng)
        })
    });
    c.bench_function("pool_1m/pick_engine_code", |b| {
        b.iter(|| pool.pick(None, t0, &mut rng))
    });

    // A fresh pool with a 60 s cooldown and virtual time advancing 1 ms per
    // pick: the production shape. At most 60,000 of the 1,000,000 numbers
    // are cooling at once, so the rejection loop almost always succeeds on
    // its first try.
    let fresh = |rng: &mut StdRng| match Pool::parse(&text, 4, "bench", rng) {
        Ok(mut p) => {
            p.set_cooldown(Duration::from_secs(60));
            p
        }
        Err(e) => panic!("{e}"),
    };
    let mut pool = fresh(&mut rng);
    let mut tick = 0u64;
    c.bench_function("pool_1m/pick_engine_code_cooldown_60s", |b| {
        b.iter(|| {
            tick += 1;
            pool.pick(None, t0 + Duration::from_millis(tick), &mut rng)
        })
    });

    // Worst case: every number is cooling, so each draw makes 32 rejected
    // tries, then scans all 10,000 suffixes exactly, then reports Exhausted.
    let mut pool = fresh(&mut rng);
    for code in &codes {
        for _ in 0..100 {
            if let Err(e) = pool.pick(Some(code), t0, &mut rng) {
                panic!("{e}");
            }
        }
    }
    c.bench_function("pool_1m/pick_engine_code_all_cooling_exhausted", |b| {
        b.iter(|| pool.pick(None, t0 + Duration::from_millis(1), &mut rng))
    });
}

criterion_group!(pool_benches, benches);
criterion_main!(pool_benches);
