//! SIP-only CPU comparison, in one run on one machine: `flashcall dial` and
//! SIPp's own caller place the same INVITE/180/CANCEL/487/ACK calls at the
//! same rate against the same SIPp callee; CPU time (user+sys) per call of
//! each caller is taken from getrusage(RUSAGE_CHILDREN) around its run.
//!
//! `cargo bench --bench dial_vs_sipp` (env: DIAL_COUNT, default 20000;
//! DIAL_RATE, default 4000). Needs `sipp` on PATH. Loopback only.

mod common;

use common::callee;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// CPU time (user + sys) and voluntary context switches of reaped children.
fn children_cpu() -> (Duration, i64) {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (tv(ru.ru_utime) + tv(ru.ru_stime), ru.ru_nvcsw)
}

/// Runs a caller to completion; returns (cpu, voluntary context switches,
/// wall, exit ok).
fn measure(cmd: &mut Command) -> (Duration, i64, Duration, bool) {
    let (cpu0, cs0) = children_cpu();
    let t0 = Instant::now();
    let status = cmd.status().expect("spawn caller");
    let (cpu1, cs1) = children_cpu();
    (cpu1 - cpu0, cs1 - cs0, t0.elapsed(), status.success())
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not, and
    // then this runs once at a tiny rate to prove the harness works.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let env = |k: &str, full: u64, tiny: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(if smoke { tiny } else { full })
    };
    let count = env("DIAL_COUNT", 20_000, 100);
    let rate = env("DIAL_RATE", 4_000, 100);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = Path::new(env!("CARGO_BIN_EXE_flashcall"));
    let _uas = callee(16_070);
    let summary = std::env::temp_dir().join("flashcall-dial-bench.json");
    let out = std::fs::File::create(&summary).expect("temp file");
    let (fc_cpu, fc_cs, fc_wall, fc_ok) = measure(
        Command::new(exe)
            .args([
                "dial",
                "--trunk",
                "127.0.0.1:16070",
                "--to-prefix",
                "+4477009",
            ])
            .args([
                "--count",
                &count.to_string(),
                "--rate",
                &rate.to_string(),
                "--json",
            ])
            .stdout(out),
    );
    let text = std::fs::read_to_string(&summary).unwrap_or_default();
    let last = text.lines().last().unwrap_or("").to_string();
    drop(_uas);

    let _uas = callee(16_072);
    let (sp_cpu, sp_cs, sp_wall, sp_ok) = measure(
        Command::new("sipp")
            .arg("-sf")
            .arg(root.join("tests/sipp/uac_ring_cancel.xml"))
            .args(["-i", "127.0.0.1", "-p", "16073", "-s", "+447700900123"])
            .args([
                "-m",
                &count.to_string(),
                "-r",
                &rate.to_string(),
                "-l",
                "100000",
                "-buff_size",
                "4194304",
                // A call whose datagram was lost fails after 10 s instead of
                // holding the run until the global timeout.
                "-recv_timeout",
                "10000",
            ])
            .args([
                "-max_recv_loops",
                "100000",
                "-nostdin",
                "-timeout",
                "120s",
                "127.0.0.1:16072",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );

    let per = |cpu: Duration| cpu.as_secs_f64() * 1e6 / count as f64;
    println!("flash calls: {count} at {rate}/s against SIPp uas_ring_cancel.xml on 127.0.0.1");
    let cs = |n: i64| n as f64 / count as f64;
    println!(
        "flashcall dial: {:>7.1} us CPU/call, {:.2} wake-ups/call, wall {:.2} s, all delivered: {fc_ok}",
        per(fc_cpu),
        cs(fc_cs),
        fc_wall.as_secs_f64()
    );
    println!("  {last}");
    println!(
        "sipp caller:    {:>7.1} us CPU/call, {:.2} wake-ups/call, wall {:.2} s, all successful: {sp_ok}",
        per(sp_cpu),
        cs(sp_cs),
        sp_wall.as_secs_f64()
    );
    println!("ratio flashcall/sipp: {:.2}", per(fc_cpu) / per(sp_cpu));
    if !(fc_ok && sp_ok) {
        eprintln!("a caller did not complete every call");
        std::process::exit(1);
    }
}
