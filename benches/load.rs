//! End-to-end load benchmark, side by side with SIPp, in one run on one
//! machine (issue 5):
//!
//! 1. `flashcall serve` (release binary) with a benchmark config: real
//!    SQLite store, sandbox off, one trunk pointing at SIPp's callee
//!    (../shared/sipp/uas_ring_cancel.xml) on 127.0.0.1, a pool of
//!    1,000,000 caller numbers;
//! 2. HTTP creates driven open-loop at fixed rates (default 1,000 and 2,000
//!    per second for 20 s, then 4,000 per second for 60 s) over 64
//!    keep-alive HTTP/1.1 connections (hyper). Each request has
//!    an intended send time on a fixed schedule and its latency is measured
//!    from that time, not from when it was actually sent, so a stalled
//!    engine shows up in the figures instead of slowing the generator down
//!    (no coordinated omission). Tokio's timer wakes the generator once a
//!    millisecond, so up to 1 ms of the figure can be the generator's;
//! 3. per rate: creates/s answered 201, calls/s completed, call outcomes
//!    (from `flashcall_calls_total`), create latency p50/p99/p999
//!    (hdrhistogram), the same of the requests due after the rate's first
//!    LOAD_WARMUP_SECS (at most half its run; only the first rate follows
//!    a fresh start, the others leave out the same span so that the rows
//!    compare), 180->CANCEL p50/p99 (from the engine's
//!    `flashcall_cancel_delay_seconds` buckets, interpolated as Prometheus'
//!    `histogram_quantile` does), engine CPU per verification (utime+stime
//!    of the process from /proc, all threads: HTTP, store writer, SIP;
//!    and split by thread: the SIP thread, store writer and checkpointer
//!    by name, the HTTP runtime and the rest as the remainder),
//!    the engine's context switches per verification (voluntary ones are
//!    wake-ups of its threads, whose cost `cargo bench --bench wake`
//!    measures; involuntary ones preemptions),
//!    peak RSS (VmHWM) and RSS half-way through and at the end of the
//!    run (a slope between them is memory kept per verification), and the
//!    machine's steal time over the run, and over steps 4 and 5 below
//!    (/proc/stat: the hypervisor running something else while a vCPU had
//!    work);
//! 4. SIPp's own caller (tests/sipp/uac_ring_cancel.xml) through the same
//!    INVITE/180/CANCEL/487/ACK flow at each rate against a fresh callee:
//!    its CPU per call (getrusage of the reaped child);
//! 5. `flashcall dial` (SIP only) the same way, for the SIP-only ratio;
//! 6. a table on stdout, and the same as JSON and Markdown in
//!    `target/load-bench.json` and `target/load-bench.md`.
//!
//! `cargo bench --bench load`. Environment: LOAD_RATES (default
//! "1000,2000,4000"), LOAD_SECS (20, each rate but the last),
//! LOAD_SUSTAIN_SECS (60, the last rate), LOAD_POOL (1000000 numbers),
//! LOAD_SIPP_SECS (10: calls per caller run = rate × this), LOAD_CONNS (64),
//! LOAD_SIP_WINDOW_US and LOAD_SIP_REALTIME (the engine's `[sip]`
//! `batch_window_us` and `realtime_priority`; its defaults when unset),
//! LOAD_HTTP_WORKERS (`[http] workers`), LOAD_SIP_THREAD (`[sip] thread`:
//! auto, shared or own), LOAD_WARMUP_SECS (2), LOAD_IDEMPOTENCY (1: every
//! create carries an Idempotency-Key of its own, as a careful client
//! sends; 0 by default).
//! Under `cargo test --all-targets` (no `--bench`) it runs once at 100/s
//! for 2 s with a 10,000-number pool and fails unless every create got a
//! 201 and every call and every SIPp / dial call completed: it proves the
//! harness works, it asserts no time. Loopback only; every process it
//! starts is killed when it ends.

mod common;
// Both this and `common` hold tests/support/bound.rs: two copies of one
// small stateless function, so that `common` also serves dial_vs_sipp.
#[allow(clippy::duplicate_mod)]
#[path = "../tests/support/mod.rs"]
mod support;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::Bytes;
use common::callee;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};
use support::Engine;

/// Ports of the SIPp peers (the engine itself binds port 0).
const CALLEE_PORT: u16 = 16_180;
const SIPP_CALLEE_PORT: u16 = 16_182;
const SIPP_CALLER_PORT: u16 = 16_183;
const DIAL_CALLEE_PORT: u16 = 16_184;

struct Opts {
    smoke: bool,
    rates: Vec<u64>,
    secs: u64,
    sustain_secs: u64,
    pool: u64,
    sipp_secs: u64,
    conns: usize,
    /// `[sip] batch_window_us` and `realtime_priority` of the engine; None
    /// leaves the engine's default.
    sip_window_us: Option<u64>,
    sip_realtime: Option<u64>,
    /// `[sip] thread`; None leaves the engine's default (auto).
    sip_thread: Option<String>,
    /// `[http] workers`.
    http_workers: Option<u64>,
    /// Every create with an Idempotency-Key of its own (each a lookup in
    /// the store that finds nothing, then a row written with the record).
    idempotency: bool,
    /// The first seconds of each rate that `create_after_warmup_ms` leaves
    /// out. Before the engine decoded its phone metadata ahead of serving,
    /// its first 100 ms after start were slow (up to 111 ms at 4,000/s);
    /// the split shows whatever else a fresh start still costs.
    warmup_secs: u64,
}

impl Opts {
    /// The warm-up of a rate's run of `secs`: at most half of it, so the
    /// figures after it always have requests behind them.
    fn warmup(&self, secs: u64) -> Duration {
        Duration::from_secs(self.warmup_secs.min(secs / 2))
    }

    fn from_env() -> Opts {
        // `cargo bench` passes --bench; `cargo test --all-targets` does not.
        let smoke = !std::env::args().any(|a| a == "--bench");
        // A setting that does not parse stops the run with its name: a
        // benchmark silently run with defaults would report the wrong thing.
        let bad = |k: &str, v: &str, want: &str| -> ! {
            eprintln!("error: {k}={v:?}: expected {want}");
            std::process::exit(2)
        };
        let num = |k: &str, full: u64, tiny: u64| match std::env::var(k) {
            Ok(v) => match v.trim().parse::<u64>() {
                Ok(n) if n > 0 => n,
                _ => bad(k, &v, "a positive whole number"),
            },
            Err(_) => {
                if smoke {
                    tiny
                } else {
                    full
                }
            }
        };
        let opt = |k: &str, max: u64| {
            std::env::var(k)
                .ok()
                .map(|v| match v.trim().parse::<u64>() {
                    Ok(n) if n <= max => n,
                    _ => bad(k, &v, &format!("a whole number from 0 to {max}")),
                })
        };
        let rates = match std::env::var("LOAD_RATES") {
            Ok(v) => {
                let r: Result<Vec<u64>, _> = v.split(',').map(|r| r.trim().parse()).collect();
                match r {
                    Ok(r) if !r.is_empty() && r.iter().all(|&x| x > 0) => r,
                    _ => bad(
                        "LOAD_RATES",
                        &v,
                        "comma-separated positive rates, e.g. 1000,2000",
                    ),
                }
            }
            Err(_) if smoke => vec![100],
            Err(_) => vec![1000, 2000, 4000],
        };
        Opts {
            smoke,
            rates,
            secs: num("LOAD_SECS", 20, 2),
            sustain_secs: num("LOAD_SUSTAIN_SECS", 60, 2),
            pool: num("LOAD_POOL", 1_000_000, 10_000).max(10_000),
            sipp_secs: num("LOAD_SIPP_SECS", 10, 1),
            conns: num("LOAD_CONNS", 64, 8).max(1) as usize,
            sip_window_us: opt("LOAD_SIP_WINDOW_US", 100_000),
            sip_realtime: opt("LOAD_SIP_REALTIME", 99),
            http_workers: opt("LOAD_HTTP_WORKERS", 1024),
            sip_thread: std::env::var("LOAD_SIP_THREAD")
                .ok()
                .map(|v| match v.trim() {
                    t @ ("auto" | "shared" | "own") => t.to_string(),
                    _ => bad("LOAD_SIP_THREAD", &v, "auto, shared or own"),
                }),
            warmup_secs: opt("LOAD_WARMUP_SECS", 3600).unwrap_or(2),
            idempotency: opt("LOAD_IDEMPOTENCY", 1).unwrap_or(0) == 1,
        }
    }
}

impl Opts {
    /// The `[sip]` lines the environment asked for.
    fn sip_settings_toml(&self) -> String {
        let mut s = String::new();
        if let Some(w) = self.sip_window_us {
            s += &format!("batch_window_us = {w}\n");
        }
        if let Some(p) = self.sip_realtime {
            s += &format!("realtime_priority = {p}\n");
        }
        if let Some(t) = &self.sip_thread {
            s += &format!("thread = \"{t}\"\n");
        }
        s
    }

    /// The same, for the report.
    fn sip_settings(&self) -> String {
        format!(
            "HTTP workers {}, SIP batch window {}, realtime priority {}, SIP thread {}{}",
            self.http_workers
                .map_or("default".into(), |n| n.to_string()),
            self.sip_window_us.map_or_else(
                || {
                    let w = flashcall::config::SipConfig::default().batch_window_us;
                    format!("default ({w} µs)")
                },
                |w| format!("{w} µs"),
            ),
            self.sip_realtime
                .map_or("default (off)".into(), |p| p.to_string()),
            self.sip_thread.as_deref().unwrap_or("default (auto)"),
            if self.idempotency {
                ", an Idempotency-Key on every create"
            } else {
                ""
            },
        )
    }
}

/// CPU seconds (user + sys) of a live process, from /proc/<pid>/stat.
fn proc_cpu(pid: u32) -> f64 {
    proc_cpu_of(&format!("/proc/{pid}/stat"))
}

/// utime + stime in seconds from a `stat` file (a process's or a thread's).
fn proc_cpu_of(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the ")" that closes the command name: state is the 3rd
    // field of the whole line, utime the 14th and stime the 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (tick(11) + tick(12)) / hz
}

/// CPU seconds so far of the engine's SIP thread, store writer and
/// checkpointer (by thread name, /proc/<pid>/task/*/stat). The rest of
/// the process (the HTTP runtime's workers, its blocking pool, the main
/// thread) is the process total minus these.
fn proc_thread_cpu(pid: u32) -> ThreadCpu {
    let mut t = ThreadCpu::default();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return t;
    };
    for task in tasks.filter_map(Result::ok) {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let cpu = proc_cpu_of(&format!("/proc/{pid}/task/{tid}/stat"));
        // Thread names are cut to 15 bytes ("flashcall-checkpoint").
        match comm.trim() {
            "flashcall-sip" => t.sip += cpu,
            "flashcall-store" => t.store += cpu,
            c if c.starts_with("flashcall-check") => t.checkpoint += cpu,
            _ => {}
        }
    }
    t
}

/// CPU seconds of the engine's named threads (see [`proc_thread_cpu`]).
#[derive(Default, Clone, Copy)]
struct ThreadCpu {
    sip: f64,
    store: f64,
    checkpoint: f64,
}

/// Context switches so far of every live thread of a process, from
/// /proc/<pid>/task/*/status: (voluntary, involuntary). A voluntary one is
/// a thread that waited and was woken again, each such wake-up a cost of
/// its own (`cargo bench --bench wake`); an involuntary one is a thread
/// preempted while it still had work.
fn proc_switches(pid: u32) -> (u64, u64) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    let count = |status: &str, name: &str| status_number(status, name).unwrap_or(0.0) as u64;
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .fold((0, 0), |(v, n), status| {
            (
                v + count(&status, "voluntary_ctxt_switches"),
                n + count(&status, "nonvoluntary_ctxt_switches"),
            )
        })
}

/// The machine's CPU time so far from the first line of /proc/stat:
/// (steal, total) in ticks. Steal is time the hypervisor ran something
/// else while a vCPU had work: the figures of a run with much of it are
/// the host's as much as ours.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    (f.get(7).copied().unwrap_or(0), f.iter().sum())
}

/// Steal as a share of all CPU time between two `machine_ticks`.
fn steal_share(before: (u64, u64), after: (u64, u64)) -> f64 {
    let total = after.1.saturating_sub(before.1);
    after.0.saturating_sub(before.0) as f64 / total.max(1) as f64
}

/// A field of /proc/<pid>/status in MiB (VmHWM, VmRSS).
fn proc_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status_number(&status, field).map_or(0.0, |kb| kb / 1024.0)
}

/// The number after `field:` in a /proc status file (its unit, such as
/// "kB", left off).
fn status_number(status: &str, field: &str) -> Option<f64> {
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .strip_prefix(':')?
                .split_whitespace()
                .next()
        })?
        .parse()
        .ok()
}

/// CPU time (user + sys) of this thread or of reaped children.
fn rusage(who: i32) -> f64 {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// One scrape of /metrics: the values we read, summed over label sets.
#[derive(Clone, Default)]
struct Scrape {
    outcomes: BTreeMap<String, f64>,
    /// Cumulative count per `le` bound of the 180->CANCEL histogram.
    cancel: BTreeMap<u64, f64>,
    /// The same of the create route's handler time (the engine's
    /// `flashcall_http_request_duration_seconds`: from the routed request
    /// to the response built, before hyper writes it).
    handler: BTreeMap<u64, f64>,
    /// `flashcall_sip_receive_drops_total`: datagrams the kernel dropped
    /// for the engine's SIP socket (its queue was full).
    sip_drops: f64,
    /// The store writer's group commits: duration buckets (their +Inf is
    /// the number of commits) and the writes they committed.
    commit: BTreeMap<u64, f64>,
    writes: f64,
}

/// `le` bounds as nanoseconds, so they sort; +Inf is u64::MAX.
fn le_key(le: &str) -> Option<u64> {
    if le == "+Inf" {
        return Some(u64::MAX);
    }
    le.parse::<f64>().ok().map(|s| (s * 1e9).round() as u64)
}

fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut s = Scrape::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let labels = labels.trim_end_matches('}');
            if name == "flashcall_calls_total" {
                if let Some(o) = label(labels, "outcome") {
                    *s.outcomes.entry(o.to_string()).or_default() += value;
                }
            } else if name == "flashcall_cancel_delay_seconds_bucket" {
                if let Some(le) = label(labels, "le").and_then(le_key) {
                    *s.cancel.entry(le).or_default() += value;
                }
            } else if name == "flashcall_sip_receive_drops_total" {
                s.sip_drops += value;
            } else if name == "flashcall_store_writes_total" {
                s.writes += value;
            } else if name == "flashcall_store_commit_seconds_bucket" {
                if let Some(le) = label(labels, "le").and_then(le_key) {
                    *s.commit.entry(le).or_default() += value;
                }
            } else if name == "flashcall_http_request_duration_seconds_bucket"
                && label(labels, "route") == Some("/v1/verifications")
            {
                if let Some(le) = label(labels, "le").and_then(le_key) {
                    *s.handler.entry(le).or_default() += value;
                }
            }
        }
        s
    }

    fn calls(&self) -> f64 {
        self.outcomes.values().sum()
    }

    /// What happened between `before` and `self`.
    fn since(&self, before: &Scrape) -> Scrape {
        Scrape {
            // Outcomes that did not happen in this step are left out.
            outcomes: minus(&self.outcomes, &before.outcomes)
                .into_iter()
                .filter(|(_, v)| *v > 0.0)
                .collect(),
            cancel: minus(&self.cancel, &before.cancel),
            handler: minus(&self.handler, &before.handler),
            sip_drops: self.sip_drops - before.sip_drops,
            commit: minus(&self.commit, &before.commit),
            writes: self.writes - before.writes,
        }
    }

    fn cancel_quantile_ms(&self, q: f64) -> Option<f64> {
        quantile_ms(&self.cancel, q)
    }
}

/// The q-quantile in ms of a histogram's cumulative buckets, linear within
/// a bucket (Prometheus' histogram_quantile). None without observations;
/// the last finite bound when the quantile lies in +Inf.
fn quantile_ms(buckets: &BTreeMap<u64, f64>, q: f64) -> Option<f64> {
    let total = *buckets.get(&u64::MAX)?;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for (&le, &cum) in buckets {
        if le == u64::MAX {
            return Some(lo);
        }
        let hi = le as f64 / 1e6;
        if cum >= rank {
            let share = if cum > below {
                (rank - below) / (cum - below)
            } else {
                1.0
            };
            return Some(lo + (hi - lo) * share);
        }
        (lo, below) = (hi, cum);
    }
    Some(lo)
}

/// `a - b` per key.
fn minus<K: Ord + Clone>(a: &BTreeMap<K, f64>, b: &BTreeMap<K, f64>) -> BTreeMap<K, f64> {
    a.iter()
        .map(|(k, v)| (k.clone(), v - b.get(k).copied().unwrap_or(0.0)))
        .collect()
}

/// What the generator saw in one step.
struct Sent {
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    first_error: Option<String>,
    latency_us: Histogram<u64>,
    /// The same, of requests due after the rate's first `warmup`.
    steady_us: Histogram<u64>,
    /// The same requests' latency split at the generator's two hand-offs
    /// (after the warm-up only): due -> queued (the generator's own timer
    /// and scheduling), queued -> taken by a connection (every connection
    /// busy with an earlier answer), taken -> answer read (the round trip:
    /// the engine, loopback TCP, and the generator reading the answer).
    late_us: Histogram<u64>,
    wait_us: Histogram<u64>,
    rtt_us: Histogram<u64>,
    wall: Duration,
    cpu: f64,
}

impl Sent {
    fn new() -> Sent {
        Sent {
            statuses: BTreeMap::new(),
            errors: 0,
            first_error: None,
            latency_us: Histogram::new_with_bounds(1, 120_000_000, 3).expect("bounds"),
            steady_us: Histogram::new_with_bounds(1, 120_000_000, 3).expect("bounds"),
            late_us: Histogram::new_with_bounds(1, 120_000_000, 3).expect("bounds"),
            wait_us: Histogram::new_with_bounds(1, 120_000_000, 3).expect("bounds"),
            rtt_us: Histogram::new_with_bounds(1, 120_000_000, 3).expect("bounds"),
            wall: Duration::ZERO,
            cpu: 0.0,
        }
    }

    fn merge(&mut self, other: Sent) {
        for (k, v) in other.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        let _ = self.latency_us.add(&other.latency_us);
        let _ = self.steady_us.add(&other.steady_us);
        let _ = self.late_us.add(&other.late_us);
        let _ = self.wait_us.add(&other.wait_us);
        let _ = self.rtt_us.add(&other.rtt_us);
    }

    fn error(&mut self, e: impl ToString) {
        self.errors += 1;
        self.first_error.get_or_insert_with(|| e.to_string());
    }
}

/// A request on the schedule: when it was due, when the generator queued
/// it, whether it was due after the warm-up, and its body.
/// Due, queued, after the warm-up, body, Idempotency-Key.
type Job = (
    tokio::time::Instant,
    tokio::time::Instant,
    bool,
    Bytes,
    Option<String>,
);
type Queue = Rc<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Job>>>;

/// One keep-alive HTTP/1.1 connection taking the next due request from
/// the shared queue until it is closed. Latency runs from the request's
/// due time (see the module docs), so time spent queued behind a slow
/// answer counts.
async fn connection(addr: std::net::SocketAddr, auth: Rc<str>, queue: Queue) -> Sent {
    let mut sent = Sent::new();
    let mut conn: Option<http1::SendRequest<Full<Bytes>>> = None;
    loop {
        let Some((due, queued, steady, body, key)) = queue.lock().await.recv().await else {
            return sent;
        };
        let taken = tokio::time::Instant::now();
        if conn.as_ref().is_none_or(|c| c.is_closed()) {
            conn = match tokio::net::TcpStream::connect(addr).await {
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    match http1::handshake(TokioIo::new(tcp)).await {
                        Ok((send, driver)) => {
                            tokio::task::spawn_local(driver);
                            Some(send)
                        }
                        Err(e) => {
                            sent.error(e);
                            None
                        }
                    }
                }
                Err(e) => {
                    sent.error(e);
                    None
                }
            };
        }
        let Some(c) = conn.as_mut() else { continue };
        let mut req = hyper::Request::post("/v1/verifications")
            .header("host", addr.to_string())
            .header("content-type", "application/json")
            .header("authorization", &*auth);
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        let req = req.body(Full::new(body)).expect("a valid request");
        let r = match c.ready().await {
            Ok(()) => c.send_request(req).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(resp) => {
                let status = resp.status().as_u16();
                // Read the body so the connection can be reused.
                match resp.into_body().collect().await {
                    Ok(_) => {
                        *sent.statuses.entry(status).or_default() += 1;
                        let now = tokio::time::Instant::now();
                        let us = |d: Duration| (d.as_micros() as u64).clamp(1, 120_000_000);
                        let _ = sent.latency_us.record(us(now - due));
                        if steady {
                            let _ = sent.steady_us.record(us(now - due));
                            let _ = sent.late_us.record(us(queued - due));
                            let _ = sent.wait_us.record(us(taken - queued));
                            let _ = sent.rtt_us.record(us(now - taken));
                        }
                    }
                    Err(e) => sent.error(e),
                }
            }
            Err(e) => {
                sent.error(e);
                conn = None;
            }
        }
    }
}

/// Sends `rate × secs` creates open-loop over `conns` connections; phones
/// are `+44740` + 7 digits from `phone0`, each used once (UK mobile
/// numbers, valid per libphonenumber, so the engine's validity check runs
/// on every one).
async fn drive(
    addr: std::net::SocketAddr,
    conns: usize,
    rate: u64,
    secs: u64,
    warmup: Duration,
    phone0: u64,
    idempotency: bool,
) -> Sent {
    let n = rate * secs;
    let cpu0 = rusage(libc::RUSAGE_THREAD);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
    let queue: Queue = Rc::new(tokio::sync::Mutex::new(rx));
    let auth: Rc<str> = format!("Basic {}", B64.encode("load:load-secret")).into();
    let workers: Vec<_> = (0..conns)
        .map(|_| tokio::task::spawn_local(connection(addr, auth.clone(), queue.clone())))
        .collect();
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    for i in 0..n {
        let offset = Duration::from_nanos(i * 1_000_000_000 / rate);
        let due = start + offset;
        tokio::time::sleep_until(due).await;
        let body = format!(r#"{{"phone":"+44740{:07}","sender":"LOAD"}}"#, phone0 + i);
        // Unbounded: the schedule never waits for the engine (open loop).
        let queued = tokio::time::Instant::now();
        let key = idempotency.then(|| format!("load-{}", phone0 + i));
        let _ = tx.send((due, queued, offset >= warmup, Bytes::from(body), key));
    }
    drop(tx);
    let mut sent = Sent::new();
    for w in workers {
        match w.await {
            Ok(s) => sent.merge(s),
            Err(e) => sent.error(e),
        }
    }
    sent.wall = start.elapsed();
    sent.cpu = rusage(libc::RUSAGE_THREAD) - cpu0;
    sent
}

/// One row of the table.
#[derive(Default)]
struct Row {
    rate: u64,
    secs: u64,
    requested: u64,
    created: u64,
    other_status: BTreeMap<u16, u64>,
    errors: u64,
    first_error: Option<String>,
    creates_per_s: f64,
    calls_per_s: f64,
    outcomes: BTreeMap<String, f64>,
    create_ms: [f64; 3],
    /// `create_ms` of the requests due after the warm-up.
    steady_ms: [f64; 3],
    /// The warm-up `steady_ms` leaves out, in seconds.
    warmup_secs: u64,
    /// `steady_ms` split by hop (see `Sent`), p50 / p99 / p999: late in
    /// the generator, waiting for a free connection, the round trip.
    late_ms: [f64; 3],
    wait_ms: [f64; 3],
    rtt_ms: [f64; 3],
    /// The engine's own create handler time, p50 / p99 / p999 (from its
    /// histogram's buckets: coarse, every request of the rate's run).
    handler_ms: [Option<f64>; 3],
    /// Datagrams the kernel dropped for the engine's SIP socket during the
    /// rate's run, and for `dial`'s (from its summary; None if unread).
    engine_sip_drops: f64,
    dial_sip_drops: Option<u64>,
    /// The store writer over the rate's run: commits per second, writes
    /// per commit, commit time p50 / p99 (ms, from coarse buckets).
    commits_per_s: f64,
    writes_per_commit: f64,
    commit_ms: [Option<f64>; 2],
    cancel_ms: [Option<f64>; 2],
    engine_us: f64,
    /// `engine_us` by thread: SIP, store writer, checkpointer, and the
    /// rest (the HTTP runtime, mostly).
    engine_sip_us: f64,
    engine_store_us: f64,
    engine_checkpoint_us: f64,
    engine_rest_us: f64,
    /// Context switches of the engine's threads per verification:
    /// voluntary (wake-ups after a wait) and involuntary (preemptions).
    engine_wakes: f64,
    engine_preempts: f64,
    callee_us: f64,
    loadgen_us: f64,
    /// The machine's steal time during the rate's HTTP run: a fraction of
    /// all CPU time of all vCPUs, idle included.
    steal: f64,
    /// The same during its SIPp caller run and its `dial` run: the ratios
    /// set figures of three runs against each other.
    sipp_steal: f64,
    dial_steal: f64,
    sipp_us: Option<f64>,
    sipp_ok: bool,
    dial_us: Option<f64>,
    dial_ok: bool,
    hwm_mib: f64,
    /// RSS (VmRSS) half-way through the rate's run and at its end: a
    /// store that keeps something per verification shows up as a slope
    /// even in a short run (peak RSS alone hid one for a 60 s run).
    rss_mid_mib: f64,
    rss_end_mib: f64,
}

impl Row {
    fn failed_calls(&self) -> f64 {
        self.outcomes
            .iter()
            .filter(|(k, _)| k.as_str() != "delivered")
            .map(|(_, v)| v)
            .sum()
    }

    fn json(&self) -> Value {
        json!({
            "rate": self.rate,
            "secs": self.secs,
            "requested": self.requested,
            "created": self.created,
            "other_status": self.other_status.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
            "transport_errors": self.errors,
            "first_error": self.first_error,
            "creates_per_s": self.creates_per_s,
            "calls_per_s": self.calls_per_s,
            "outcomes": self.outcomes,
            "create_ms": {"p50": self.create_ms[0], "p99": self.create_ms[1], "p999": self.create_ms[2]},
            "create_after_warmup_ms": {"p50": self.steady_ms[0], "p99": self.steady_ms[1], "p999": self.steady_ms[2]},
            "warmup_secs": self.warmup_secs,
            "create_after_warmup_by_hop_ms": {
                "generator_late": {"p50": self.late_ms[0], "p99": self.late_ms[1], "p999": self.late_ms[2]},
                "connection_wait": {"p50": self.wait_ms[0], "p99": self.wait_ms[1], "p999": self.wait_ms[2]},
                "round_trip": {"p50": self.rtt_ms[0], "p99": self.rtt_ms[1], "p999": self.rtt_ms[2]},
            },
            "engine_sip_receive_drops": self.engine_sip_drops,
            "store_commits_per_s": self.commits_per_s,
            "store_writes_per_commit": self.writes_per_commit,
            "store_commit_ms": {"p50": self.commit_ms[0], "p99": self.commit_ms[1]},
            "dial_sip_receive_drops": self.dial_sip_drops,
            "engine_create_handler_ms": {"p50": self.handler_ms[0], "p99": self.handler_ms[1], "p999": self.handler_ms[2]},
            "cancel_ms": {"p50": self.cancel_ms[0], "p99": self.cancel_ms[1]},
            "engine_cpu_us_per_verification": self.engine_us,
            "engine_cpu_us_per_verification_by_thread": {
                "sip": self.engine_sip_us,
                "store_writer": self.engine_store_us,
                "checkpointer": self.engine_checkpoint_us,
                "http_and_rest": self.engine_rest_us,
            },
            "engine_wakeups_per_verification": self.engine_wakes,
            "engine_preemptions_per_verification": self.engine_preempts,
            "callee_cpu_us_per_call": self.callee_us,
            "loadgen_cpu_us_per_request": self.loadgen_us,
            "steal_share": self.steal,
            "sipp_steal_share": self.sipp_steal,
            "dial_steal_share": self.dial_steal,
            "sipp_caller_cpu_us_per_call": self.sipp_us,
            "sipp_all_successful": self.sipp_ok,
            "dial_cpu_us_per_call": self.dial_us,
            "dial_all_delivered": self.dial_ok,
            "engine_over_sipp": self.sipp_us.map(|s| self.engine_us / s),
            "dial_over_sipp": self.sipp_us.zip(self.dial_us).map(|(s, d)| d / s),
            "engine_peak_rss_mib": self.hwm_mib,
            "engine_rss_mid_mib": self.rss_mid_mib,
            "engine_rss_end_mib": self.rss_end_mib,
        })
    }
}

fn main() {
    let opts = Opts::from_env();
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap_or(Path::new("target"))
        .to_path_buf();
    let dir = target.join("load-bench");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench dir");

    let mut rows: Vec<Row> = opts
        .rates
        .iter()
        .enumerate()
        .map(|(i, &rate)| Row {
            rate,
            secs: if i + 1 == opts.rates.len() {
                opts.sustain_secs
            } else {
                opts.secs
            },
            ..Row::default()
        })
        .collect();

    end_to_end(&opts, &dir, &mut rows);
    for row in &mut rows {
        sip_only(&opts, row);
    }
    report(&opts, &target, &rows);
    if opts.smoke {
        let bad: Vec<String> = rows
            .iter()
            .filter(|r| {
                r.created != r.requested
                    || r.failed_calls() > 0.0
                    || r.outcomes.get("delivered").copied().unwrap_or(0.0) != r.created as f64
                    || !r.sipp_ok
                    || !r.dial_ok
            })
            .map(|r| format!("{}", r.json()))
            .collect();
        if !bad.is_empty() {
            eprintln!("load smoke run: not every create / call completed: {bad:?}");
            std::process::exit(1);
        }
    }
}

/// Steps 1-3: the engine under HTTP load, one row per rate.
fn end_to_end(opts: &Opts, dir: &Path, rows: &mut [Row]) {
    let _callee = callee(CALLEE_PORT);
    let pool: String = (0..opts.pool.div_ceil(10_000))
        .map(|i| format!("+4420{i:04}XXXX\n"))
        .collect();
    std::fs::write(dir.join("numbers.txt"), pool).expect("pool file");
    let config = dir.join("flashcall.toml");
    std::fs::write(
        &config,
        format!(
            r#"# The load benchmark's engine (benches/load.rs).
[http]
listen = "127.0.0.1:0"
{http_extra}[metrics]
listen = "127.0.0.1:0"
[sip]
listen = "127.0.0.1:0"
{sip_extra}[[trunks]]
name = "sipp"
address = "127.0.0.1:{CALLEE_PORT}"
cps = 50000
queue = 100000
[pool]
file = "{pool}"
[store]
backend = "sqlite"
path = "{db}"
[sandbox]
enabled = false
[[projects]]
login = "load"
secret = "load-secret"
rate = 100000
burst = 100000
senders = [{{ code = "LOAD", status = "active" }}]
"#,
            pool = dir.join("numbers.txt").display(),
            sip_extra = opts.sip_settings_toml(),
            http_extra = opts
                .http_workers
                .map_or(String::new(), |n| format!("workers = {n}\n")),
            db = dir.join("flashcall.db").display(),
        ),
    )
    .expect("config");
    let engine = Engine::start(&config);
    let pid = engine.pid();
    let callee_pid = _callee.0.id();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut phone0 = 0;
    for row in rows.iter_mut() {
        let before = Scrape::parse(&engine.metrics_text());
        let (cpu0, callee0) = (proc_cpu(pid), proc_cpu(callee_pid));
        let switches0 = proc_switches(pid);
        let threads0 = proc_thread_cpu(pid);
        let ticks0 = machine_ticks();
        let half = Duration::from_millis(row.secs * 500);
        let rss_mid = std::thread::spawn(move || {
            std::thread::sleep(half);
            proc_mib(pid, "VmRSS")
        });
        let sent = tokio::task::LocalSet::new().block_on(
            &rt,
            drive(
                engine.http,
                opts.conns,
                row.rate,
                row.secs,
                opts.warmup(row.secs),
                phone0,
                opts.idempotency,
            ),
        );
        // The store's figures over the generator's run only (divided by
        // its wall time below), before the wait for the last calls.
        let store = Scrape::parse(&engine.metrics_text()).since(&before);
        let commits = store.commit.get(&u64::MAX).copied().unwrap_or(0.0);
        phone0 += row.rate * row.secs;
        let rss_end_mib = proc_mib(pid, "VmRSS");
        let ticks1 = machine_ticks();
        let created = sent.statuses.get(&201).copied().unwrap_or(0);
        // Every accepted verification ends in exactly one call outcome;
        // wait (bounded) for the last calls to finish.
        let end = Instant::now() + Duration::from_secs(60);
        let mut after = Scrape::parse(&engine.metrics_text());
        while after.calls() - before.calls() < created as f64 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(100));
            after = Scrape::parse(&engine.metrics_text());
        }
        let delta = after.since(&before);
        let done = delta.calls();
        let q = |p: f64| sent.latency_us.value_at_quantile(p) as f64 / 1e3;
        let qs = |p: f64| sent.steady_us.value_at_quantile(p) as f64 / 1e3;
        let q3 =
            |h: &Histogram<u64>| [0.5, 0.99, 0.999].map(|p| h.value_at_quantile(p) as f64 / 1e3);
        // Over the same span as the CPU figure below.
        let switches1 = proc_switches(pid);
        let (cpu1, threads1) = (proc_cpu(pid), proc_thread_cpu(pid));
        let per_verif = |secs: f64| secs * 1e6 / created.max(1) as f64;
        let named = |t: &ThreadCpu| t.sip + t.store + t.checkpoint;
        *row = Row {
            requested: row.rate * row.secs,
            created,
            other_status: sent
                .statuses
                .iter()
                .filter(|(k, _)| **k != 201)
                .map(|(k, v)| (*k, *v))
                .collect(),
            errors: sent.errors,
            first_error: sent.first_error.clone(),
            creates_per_s: created as f64 / sent.wall.as_secs_f64(),
            calls_per_s: done / sent.wall.as_secs_f64(),
            create_ms: [q(0.5), q(0.99), q(0.999)],
            steady_ms: [qs(0.5), qs(0.99), qs(0.999)],
            warmup_secs: opts.warmup(row.secs).as_secs(),
            late_ms: q3(&sent.late_us),
            wait_ms: q3(&sent.wait_us),
            rtt_ms: q3(&sent.rtt_us),
            handler_ms: [0.5, 0.99, 0.999].map(|p| quantile_ms(&delta.handler, p)),
            engine_sip_drops: delta.sip_drops,
            commits_per_s: commits / sent.wall.as_secs_f64(),
            writes_per_commit: store.writes / commits.max(1.0),
            commit_ms: [0.5, 0.99].map(|p| quantile_ms(&store.commit, p)),
            cancel_ms: [
                delta.cancel_quantile_ms(0.5),
                delta.cancel_quantile_ms(0.99),
            ],
            engine_us: per_verif(cpu1 - cpu0),
            engine_sip_us: per_verif(threads1.sip - threads0.sip),
            engine_store_us: per_verif(threads1.store - threads0.store),
            engine_checkpoint_us: per_verif(threads1.checkpoint - threads0.checkpoint),
            engine_rest_us: per_verif((cpu1 - cpu0) - (named(&threads1) - named(&threads0))),
            engine_wakes: switches1.0.saturating_sub(switches0.0) as f64 / created.max(1) as f64,
            engine_preempts: switches1.1.saturating_sub(switches0.1) as f64 / created.max(1) as f64,
            callee_us: (proc_cpu(callee_pid) - callee0) * 1e6 / done.max(1.0),
            loadgen_us: sent.cpu * 1e6 / row.requested().max(1) as f64,
            steal: steal_share(ticks0, ticks1),
            hwm_mib: proc_mib(pid, "VmHWM"),
            rss_mid_mib: rss_mid.join().unwrap_or(f64::NAN),
            rss_end_mib,
            outcomes: delta.outcomes,
            ..std::mem::take(row)
        };
        eprintln!("load: {}/s for {} s: {}", row.rate, row.secs, row.json());
    }
}

impl Row {
    fn requested(&self) -> u64 {
        self.rate * self.secs
    }
}

/// Steps 4-5: SIPp's caller and `flashcall dial` at the row's rate.
fn sip_only(opts: &Opts, row: &mut Row) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let count = (row.rate * opts.sipp_secs).max(1);
    let per_call = |cpu: f64| cpu * 1e6 / count as f64;

    let uas = callee(SIPP_CALLEE_PORT);
    let ticks0 = machine_ticks();
    let cpu0 = rusage(libc::RUSAGE_CHILDREN);
    let ok = Command::new("sipp")
        .arg("-sf")
        .arg(root.join("tests/sipp/uac_ring_cancel.xml"))
        .args(["-i", "127.0.0.1", "-p", &SIPP_CALLER_PORT.to_string()])
        .args(["-s", "+447700900123"])
        .args(["-m", &count.to_string(), "-r", &row.rate.to_string()])
        .args(["-l", "1000000", "-buff_size", "4194304"])
        // A call whose datagram was lost fails after 10 s instead of
        // holding the run until the global timeout.
        .args(["-recv_timeout", "10000", "-max_recv_loops", "1000000"])
        .args(["-nostdin", "-timeout", "300s"])
        .arg(format!("127.0.0.1:{SIPP_CALLEE_PORT}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    row.sipp_us = Some(per_call(rusage(libc::RUSAGE_CHILDREN) - cpu0));
    row.sipp_steal = steal_share(ticks0, machine_ticks());
    row.sipp_ok = ok;
    drop(uas);

    let uas = callee(DIAL_CALLEE_PORT);
    let out = std::env::temp_dir().join(format!("flashcall-load-dial-{}.json", std::process::id()));
    let ticks0 = machine_ticks();
    let cpu0 = rusage(libc::RUSAGE_CHILDREN);
    let ok = Command::new(env!("CARGO_BIN_EXE_flashcall"))
        .args(["dial", "--trunk", &format!("127.0.0.1:{DIAL_CALLEE_PORT}")])
        .args(["--to-prefix", "+4477009"])
        .args([
            "--count",
            &count.to_string(),
            "--rate",
            &row.rate.to_string(),
        ])
        .arg("--json")
        .stdout(std::fs::File::create(&out).expect("temp file"))
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    row.dial_us = Some(per_call(rusage(libc::RUSAGE_CHILDREN) - cpu0));
    row.dial_steal = steal_share(ticks0, machine_ticks());
    row.dial_ok = ok;
    row.dial_sip_drops = std::fs::read_to_string(&out).ok().and_then(|t| {
        let last = t.lines().last()?;
        serde_json::from_str::<Value>(last).ok()?["summary"]["receive_drops"].as_u64()
    });
    let _ = std::fs::remove_file(&out);
    drop(uas);
    eprintln!("load: SIP only at {}/s: {}", row.rate, row.json());
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    // SAFETY: sysconf has no memory effects.
    let cores = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|m| m.trim().to_string()))
        .unwrap_or_default();
    format!("{cores} cores, {cpu}, {mem} RAM")
}

/// One entry per rate, joined: the report's per-rate sentences.
fn per_rate(rows: &[Row], sep: &str, f: impl Fn(&Row) -> String) -> String {
    rows.iter().map(f).collect::<Vec<_>>().join(sep)
}

/// Above this share of steal in any run the figures are not comparable
/// with a quiet machine's: on session 16's shared VM, 3–30% steal doubled
/// SIPp's own CPU per call (against session 12's VM) and took the
/// engine's create p99 at 4,000/s from 6.5 ms there to 13–564 ms.
const STEAL_WARN: f64 = 0.02;

/// The line that says a run drew too much steal to compare, if one did.
fn steal_warning(rows: &[Row]) -> Option<String> {
    let (share, what, rate) = rows
        .iter()
        .flat_map(|r| {
            [
                (r.steal, "end-to-end", r.rate),
                (r.sipp_steal, "SIPp caller", r.rate),
                (r.dial_steal, "dial", r.rate),
            ]
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))?;
    (share > STEAL_WARN).then(|| {
        format!(
            "Steal time reached {:.1}% (the {what} run at {rate}/s): the host ran something \
             else on this VM's CPUs, so CPU per call and the latency tails are inflated and \
             not comparable with a quiet machine's. Rerun when steal stays under {:.0}%.",
            share * 100.0,
            STEAL_WARN * 100.0
        )
    })
}

/// Step 6: stdout, target/load-bench.{json,md}.
fn report(opts: &Opts, target: &Path, rows: &[Row]) {
    let fmt_opt =
        |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Machine: {}. Engine, load generator and SIPp share it. Pool {} numbers, SQLite store, {}.\n",
        machine(),
        opts.pool,
        opts.sip_settings()
    );
    md.push_str(
        "| rate/s | secs | creates/s | calls/s | not 201 | failed calls | create p50 / p99 / p999 ms \
         | same after warm-up | 180->CANCEL p50 / p99 ms | engine CPU µs/verif | SIPp caller µs/call | engine/SIPp \
         | dial µs/call | dial/SIPp | peak RSS MiB |\n",
    );
    md.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let not_201: u64 = r.other_status.values().sum::<u64>() + r.errors;
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {} | {} | {:.2} / {:.2} / {:.2} | {:.2} / {:.2} / {:.2} | {} / {} | {:.1} | {} | {} | {} | {} | {:.0} |",
            r.rate,
            r.secs,
            r.creates_per_s,
            r.calls_per_s,
            not_201,
            r.failed_calls() as u64,
            r.create_ms[0],
            r.create_ms[1],
            r.create_ms[2],
            r.steady_ms[0],
            r.steady_ms[1],
            r.steady_ms[2],
            fmt_opt(r.cancel_ms[0], 3),
            fmt_opt(r.cancel_ms[1], 3),
            r.engine_us,
            fmt_opt(r.sipp_us, 1),
            fmt_opt(r.sipp_us.map(|s| r.engine_us / s), 2),
            fmt_opt(r.dial_us, 1),
            fmt_opt(r.sipp_us.zip(r.dial_us).map(|(s, d)| d / s), 2),
            r.hwm_mib,
        );
    }
    if let Some(w) = steal_warning(rows) {
        eprintln!("load: {w}");
        let _ = writeln!(md, "\n**{w}**");
    }
    let _ = writeln!(
        md,
        "\nCPU of SIPp's callee per call during the end-to-end runs: {}. CPU of the load generator per request: {}.",
        per_rate(rows, ", ", |r| format!("{:.1} µs at {}/s", r.callee_us, r.rate)),
        per_rate(rows, ", ", |r| format!("{:.1} µs at {}/s", r.loadgen_us, r.rate)),
    );
    let _ = writeln!(
        md,
        "\nEngine CPU per verification by thread, SIP / store writer / checkpointer / HTTP runtime and the rest (the SIP thread alone is what compares with SIPp's caller; with the SIP driver on the HTTP worker, `sip.thread` shared, its CPU is in the HTTP column and the SIP one is 0): {}.",
        per_rate(rows, ", ", |r| format!(
            "{:.1} / {:.1} / {:.1} / {:.1} µs at {}/s",
            r.engine_sip_us, r.engine_store_us, r.engine_checkpoint_us, r.engine_rest_us, r.rate
        )),
    );
    let _ = writeln!(
        md,
        "\nEngine context switches per verification, voluntary (a thread woken after a wait) + involuntary (preempted): {}.",
        per_rate(rows, ", ", |r| format!("{:.2} + {:.2} at {}/s", r.engine_wakes, r.engine_preempts, r.rate)),
    );
    let _ = writeln!(
        md,
        "\nSteal time (the hypervisor running something else while a vCPU had work; a share of all CPU time, idle included) during the end-to-end / SIPp caller / dial runs: {}.",
        per_rate(rows, ", ", |r| format!("{:.1}% / {:.1}% / {:.1}% at {}/s", r.steal * 100.0, r.sipp_steal * 100.0, r.dial_steal * 100.0, r.rate)),
    );
    let _ = writeln!(
        md,
        "\n\"Same after warm-up\": the requests due after the first {} of each rate's run (at most half of it; only the first rate follows a fresh start); the columns before it count every request.",
        per_rate(rows, ", ", |r| format!("{} s at {}/s", r.warmup_secs, r.rate)),
    );
    let _ = writeln!(
        md,
        "\nThe same requests' create latency by hop, p50 / p99 / p999 ms: late in the generator (due -> queued), waiting for a free connection, the round trip (taken -> answer read); then the engine's own handler time from its histogram (every request, interpolated within coarse buckets): {}.",
        per_rate(rows, "; ", |r| {
                let f = |v: [f64; 3]| format!("{:.2} / {:.2} / {:.2}", v[0], v[1], v[2]);
                format!(
                    "{}, {}, {}; handler {} / {} / {} at {}/s",
                    f(r.late_ms),
                    f(r.wait_ms),
                    f(r.rtt_ms),
                    fmt_opt(r.handler_ms[0], 2),
                    fmt_opt(r.handler_ms[1], 2),
                    fmt_opt(r.handler_ms[2], 2),
                    r.rate
                )
            }),
    );
    let _ = writeln!(
        md,
        "\nThe store writer's group commits (each create waits for one): {}.",
        per_rate(rows, ", ", |r| format!(
            "{:.0}/s of {:.1} writes each, taking p50 {} / p99 {} ms at {}/s",
            r.commits_per_s,
            r.writes_per_commit,
            fmt_opt(r.commit_ms[0], 2),
            fmt_opt(r.commit_ms[1], 2),
            r.rate
        )),
    );
    let _ = writeln!(
        md,
        "\nSIP datagrams the kernel dropped for a full receive queue, the engine's socket during the end-to-end run / `dial`'s: {}.",
        per_rate(rows, ", ", |r| format!(
                "{:.0} / {} at {}/s",
                r.engine_sip_drops,
                r.dial_sip_drops.map_or("-".to_string(), |d| d.to_string()),
                r.rate
            )),
    );
    let _ = writeln!(
        md,
        "\nEngine RSS half-way through each rate's run and at its end: {}.",
        per_rate(rows, ", ", |r| format!(
            "{:.0} -> {:.0} MiB at {}/s",
            r.rss_mid_mib, r.rss_end_mib, r.rate
        )),
    );
    for r in rows
        .iter()
        .filter(|r| r.first_error.is_some() || !r.other_status.is_empty())
    {
        let _ = writeln!(
            md,
            "\nAt {}/s: statuses other than 201 {:?}, transport errors {} (first: {}).",
            r.rate,
            r.other_status,
            r.errors,
            r.first_error.as_deref().unwrap_or("-")
        );
    }
    println!("{md}");
    let json = json!({
        "machine": machine(),
        "pool": opts.pool,
        "sip_settings": opts.sip_settings(),
        "smoke": opts.smoke,
        "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
    });
    let (jp, mp): (PathBuf, PathBuf) =
        (target.join("load-bench.json"), target.join("load-bench.md"));
    let _ = std::fs::write(&jp, serde_json::to_string_pretty(&json).unwrap_or_default());
    let _ = std::fs::write(&mp, &md);
    println!("written: {} and {}", jp.display(), mp.display());
}
