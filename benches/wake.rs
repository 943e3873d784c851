//! What one thread wake-up costs on this machine, the figure behind the
//! engine's CPU per verification (README, Performance): every time a thread
//! sleeps and is woken (a timer, or another thread handing it work), the
//! woken thread is charged for the switch, and in a VM an idle vCPU's wake
//! goes through the hypervisor.
//!
//! Three measurements, each as CPU time per wake-up and wall time per
//! wake-up:
//! - a thread sleeping 1 ms, again and again (the SIP loop's batch tick
//!   and the store writer's gather are such sleeps);
//! - two threads handing a turn back and forth with park/unpark (a futex,
//!   what a std channel does when its receiver waits), both pinned to one
//!   CPU;
//! - the same with the two threads pinned to different CPUs.
//!
//! `cargo bench --bench wake` (a plain program: harness = false). Under
//! `cargo test` it runs a few iterations of each, to prove it works.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// CPU time of `clock` (a thread's or the process's) in µs.
fn cpu_us(clock: libc::clockid_t) -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(clock, &mut t) };
    t.tv_sec as f64 * 1e6 + t.tv_nsec as f64 / 1e3
}

/// Pins the calling thread to `cpu`; false if the kernel refused.
fn pin(cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and
    // sched_setaffinity only touch the set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// (CPU µs, wall µs) per sleep of `d`, over `n` sleeps.
fn sleeps(d: Duration, n: u32) -> (f64, f64) {
    let (c0, t0) = (cpu_us(libc::CLOCK_THREAD_CPUTIME_ID), Instant::now());
    for _ in 0..n {
        std::thread::sleep(d);
    }
    let cpu = cpu_us(libc::CLOCK_THREAD_CPUTIME_ID) - c0;
    let wall = t0.elapsed().as_secs_f64() * 1e6;
    (cpu / f64::from(n), wall / f64::from(n))
}

/// The turn that tells the other thread to stop.
const STOP: u64 = u64::MAX;

/// Two threads on `cpus` pass a turn back and forth `n` times, each
/// parking until it is its turn: (process CPU µs, wall µs) per wake-up,
/// two wake-ups per round trip. None if a thread could not be pinned.
fn ping_pong(cpus: (usize, usize), n: u64) -> Option<(f64, f64)> {
    let turn = Arc::new(AtomicU64::new(0));
    let main = std::thread::current();
    let (tx, rx) = std::sync::mpsc::channel();
    let other = {
        let turn = turn.clone();
        std::thread::spawn(move || {
            let _ = tx.send((std::thread::current(), pin(cpus.1)));
            for i in 0..n {
                loop {
                    match turn.load(Ordering::Acquire) {
                        STOP => return,
                        t if t == 2 * i + 1 => break,
                        _ => std::thread::park(),
                    }
                }
                turn.store(2 * i + 2, Ordering::Release);
                main.unpark();
            }
        })
    };
    let (peer, pinned) = rx.recv().ok()?;
    if !pinned || !pin(cpus.0) {
        turn.store(STOP, Ordering::Release);
        peer.unpark();
        return None;
    }
    let (c0, t0) = (cpu_us(libc::CLOCK_PROCESS_CPUTIME_ID), Instant::now());
    for i in 0..n {
        turn.store(2 * i + 1, Ordering::Release);
        peer.unpark();
        while turn.load(Ordering::Acquire) != 2 * i + 2 {
            std::thread::park();
        }
    }
    let cpu = cpu_us(libc::CLOCK_PROCESS_CPUTIME_ID) - c0;
    let wall = t0.elapsed().as_secs_f64() * 1e6;
    other.join().ok()?;
    let wakes = (2 * n) as f64;
    Some((cpu / wakes, wall / wakes))
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (sleeps_n, trips) = if bench { (2_000, 5_000) } else { (20, 50) };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let idle = std::fs::read_to_string("/sys/devices/system/cpu/cpuidle/current_driver")
        .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned());
    println!("wake-up cost: {cpus} CPUs, cpuidle driver {idle}");
    let report = |what: &str, r: Option<(f64, f64)>| match r {
        Some((cpu, wall)) => {
            println!("  {what:<44} {cpu:8.1} µs CPU  {wall:8.1} µs wall  per wake-up")
        }
        None => println!("  {what:<44} not measured (could not pin threads)"),
    };
    report(
        "sleep 1 ms (timer wake-up)",
        Some(sleeps(Duration::from_millis(1), sleeps_n)),
    );
    report("hand-off, both threads on CPU 0", ping_pong((0, 0), trips));
    if cpus > 1 {
        report(
            "hand-off, threads on CPUs 0 and 1",
            ping_pong((0, 1), trips),
        );
    }
}
