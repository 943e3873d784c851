//! Peak memory of a 1,000,000-number pool (the target: the whole
//! process under 64 MiB). Writes the pool file, loads it, draws 1,000,000
//! engine codes so every number's last-use stamp page is touched, then
//! prints the time to load and VmHWM/VmRSS from /proc/self/status.
//!
//! `cargo bench --bench pool_rss` (a plain program: harness = false)

use flashcall::pool::Pool;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let text: String = (0..100)
        .map(|i| format!("+4477{i:02}00XXXX country=GB\n"))
        .collect();
    let path = std::env::temp_dir().join(format!("flashcall-pool-rss-{}.txt", std::process::id()));
    std::fs::write(&path, &text)?;
    drop(text);

    let mut rng = StdRng::seed_from_u64(1);
    let started = Instant::now();
    let loaded = Pool::load(&path, 4, &mut rng);
    let load_time = started.elapsed();
    std::fs::remove_file(&path)?;
    let mut pool = loaded?;

    let t0 = Instant::now();
    for _ in 0..1_000_000 {
        pool.pick(None, t0, &mut rng)?;
    }
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .map_or("?".to_owned(), |l| l[name.len()..].trim().to_owned())
    };
    println!(
        "numbers {} covered {} coverage {:.3} load {:.1} ms VmHWM {} VmRSS {}",
        pool.len(),
        pool.covered_suffixes(),
        pool.coverage_ratio(),
        load_time.as_secs_f64() * 1e3,
        field("VmHWM:"),
        field("VmRSS:")
    );
    Ok(())
}
