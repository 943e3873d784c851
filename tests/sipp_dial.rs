//! `flashcall dial --json` against SIPp callees on 127.0.0.1: one test per
//! callee behaviour (ring/cancel at load, busy, answer, 183 with SDP,
//! silence, 407 and 401 digest auth) plus the error paths (unreachable trunk, bad input).
//!
//! Every SIPp child is owned by a [`Sipp`] guard that kills and reaps it on
//! every path, panics included. Each test has its own port (15300-15399) so
//! the tests run in parallel with each other and with `sipp_flows`.

#[path = "support/bound.rs"]
mod bound;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// A SIPp callee; killed and reaped on drop.
struct Sipp {
    child: Child,
    name: &'static str,
}

impl Sipp {
    /// Waits for SIPp to exit by itself (it stops after `-m` calls), at most
    /// `limit`; `None` if it was still running (the guard then kills it).
    fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("sipp wait") {
                return Some(status);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Successful and failed call counts from the `-trace_stat` file SIPp
    /// writes when it exits, if it could be read.
    fn stats(&self) -> Option<(u64, u64)> {
        let text = std::fs::read_to_string(artifact(self.name, "stat.csv")).ok()?;
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let header: Vec<&str> = lines.next()?.split(';').collect();
        let last: Vec<&str> = lines.next_back()?.split(';').collect();
        let col = |name: &str| -> Option<u64> {
            let i = header.iter().position(|h| *h == name)?;
            last.get(i)?.trim().parse().ok()
        };
        Some((col("SuccessfulCall(C)")?, col("FailedCall(C)")?))
    }

    /// SIPp's error log, for assertion messages.
    fn errors(&self) -> String {
        std::fs::read_to_string(artifact(self.name, "errors.log")).unwrap_or_default()
    }
}

impl Drop for Sipp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn shared(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/sipp")
        .join(name)
}

fn ours(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sipp")
        .join(name)
}

/// Per-test files (SIPp statistics and error log) under cargo's test tmpdir.
fn artifact(test: &str, what: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("sipp_dial-{test}-{what}"))
}

/// Starts a SIPp callee on 127.0.0.1:`port` that stops by itself after
/// `calls` calls (`-m`), with a 60 s global safety timeout.
fn callee(name: &'static str, scenario: &Path, port: u16, calls: u32, extra: &[&str]) -> Sipp {
    assert!(scenario.exists(), "missing scenario {}", scenario.display());
    for what in ["stat.csv", "errors.log"] {
        let _ = std::fs::remove_file(artifact(name, what));
    }
    let child = Command::new("sipp")
        .arg("-sf")
        .arg(scenario)
        .args(["-i", "127.0.0.1", "-mi", "127.0.0.1"])
        .args(["-p", &port.to_string(), "-m", &calls.to_string()])
        .args(["-nostdin", "-timeout", "60s", "-max_recv_loops", "100000"])
        .args(["-trace_stat", "-stf"])
        .arg(artifact(name, "stat.csv"))
        .args(["-trace_err", "-error_file"])
        .arg(artifact(name, "errors.log"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sipp on PATH (apt-get install sip-tester)");
    let mut sipp = Sipp { child, name };
    // `dial` gives up on the port-unreachable of a port SIPp has not bound
    // yet (its calls end trunk_error at once), so wait for the bind (and fail fast if
    // SIPp died: bad scenario, port taken).
    if let Some(status) = bound::wait_udp_bound(&mut sipp.child, port) {
        panic!(
            "SIPp exited at start ({status}) for {}: {}",
            scenario.display(),
            sipp.errors()
        );
    }
    sipp
}

fn dial(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flashcall"))
        .arg("dial")
        .args(args)
        .output()
        .expect("run flashcall")
}

/// The per-call JSON lines and the summary line of `dial --json`.
fn json_lines(out: &Output) -> (Vec<Value>, Value) {
    let mut lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("JSON line {l:?}: {e}")))
        .collect();
    let summary = lines.pop().expect("summary line");
    assert!(summary.get("summary").is_some(), "last line {summary}");
    (lines, summary)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// One call to `port`; asserts the exit code and one JSON call line, and
/// returns it.
fn one_call(port: u16, extra: &[&str], exit: i32) -> Value {
    let trunk = format!("127.0.0.1:{port}");
    let mut args = vec!["--trunk", &trunk, "--to", "+447700900123", "--json"];
    args.extend_from_slice(extra);
    let out = dial(&args);
    assert_eq!(
        out.status.code(),
        Some(exit),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    let (calls, summary) = json_lines(&out);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(summary["summary"]["calls"], 1, "{summary}");
    let call = calls.into_iter().next().unwrap();
    assert_eq!(call["to"], "+447700900123", "{call}");
    call
}

/// SIPp exited by itself with status 0 (all `-m` calls successful) and, in
/// its statistics file, counted `calls` successful, 0 failed.
fn assert_sipp_success(uas: &mut Sipp, calls: u64) {
    let status = uas.wait_exit(Duration::from_secs(15));
    let status = status.unwrap_or_else(|| panic!("SIPp still running: {}", uas.errors()));
    assert!(
        status.success(),
        "SIPp counted failed calls ({status}): {:?} {}",
        uas.stats(),
        uas.errors()
    );
    let (ok, failed) = uas.stats().expect("SIPp -trace_stat file");
    assert_eq!(
        (ok, failed),
        (calls, 0),
        "SIPp statistics: successful, failed"
    );
}

#[test]
fn ring_cancel_200_calls_at_200_per_second() {
    let mut uas = callee(
        "ring_cancel",
        &shared("uas_ring_cancel.xml"),
        15_300,
        200,
        // Asks for 4 MiB like the benchmarks' callee (the kernel caps it at
        // net.core.rmem_max): with SIPp's default 64 KiB, a SIPp
        // descheduled for a moment drops datagrams.
        &["-buff_size", "4194304"],
    );
    let out = dial(&[
        "--trunk",
        "127.0.0.1:15300",
        "--to-prefix",
        "+4477009",
        "--count",
        "200",
        "--rate",
        "200",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let (calls, summary) = json_lines(&out);
    assert_eq!(calls.len(), 200);
    let mut to: Vec<&str> = calls.iter().map(|c| c["to"].as_str().unwrap()).collect();
    to.sort_unstable();
    to.dedup();
    assert_eq!(to.len(), 200, "every destination once");
    for c in &calls {
        assert_eq!(c["outcome"], "delivered", "{c}");
        assert_eq!(c["sip_code"], 487, "{c}");
        assert!(c["post_dial_delay_ms"].as_f64().is_some(), "{c}");
        assert!(c["cancel_delay_ms"].as_f64().is_some(), "{c}");
    }
    assert_eq!(summary["summary"]["calls"], 200, "{summary}");
    assert_eq!(
        summary["summary"]["outcomes"]["delivered"], 200,
        "{summary}"
    );
    // SIPp counts a call successful only when the ACK for the 487 arrives.
    assert_sipp_success(&mut uas, 200);
}

#[test]
fn busy_gives_busy_486_and_exit_1() {
    let mut uas = callee("busy", &shared("uas_busy.xml"), 15_310, 1, &[]);
    let call = one_call(15_310, &[], 1);
    assert_eq!(call["outcome"], "busy", "{call}");
    assert_eq!(call["sip_code"], 486, "{call}");
    assert_sipp_success(&mut uas, 1);
}

#[test]
fn answer_gives_answered_200_and_the_caller_hangs_up() {
    let mut uas = callee("answer", &ours("uas_answer.xml"), 15_320, 1, &[]);
    let call = one_call(15_320, &[], 1);
    assert_eq!(call["outcome"], "answered", "{call}");
    assert_eq!(call["sip_code"], 200, "{call}");
    // The scenario completes only with the ACK and then the BYE.
    assert_sipp_success(&mut uas, 1);
}

#[test]
fn session_progress_with_sdp_is_delivered() {
    let mut uas = callee("183_sdp", &ours("uas_183_sdp.xml"), 15_330, 1, &[]);
    let call = one_call(15_330, &[], 0);
    assert_eq!(call["outcome"], "delivered", "{call}");
    assert_eq!(call["sip_code"], 487, "{call}");
    assert_sipp_success(&mut uas, 1);
}

#[test]
fn silent_callee_times_out_after_timer_b() {
    let _uas = callee("silent", &ours("uas_silent.xml"), 15_340, 1, &[]);
    let t0 = Instant::now();
    let call = one_call(15_340, &[], 1);
    let took = t0.elapsed();
    assert_eq!(call["outcome"], "timeout", "{call}");
    assert!(call["sip_code"].is_null(), "{call}");
    // Timer B = 64*T1 = 32 s.
    assert!(
        took >= Duration::from_secs(31) && took < Duration::from_secs(40),
        "took {took:?}"
    );
}

/// The digest parameters of an Authorization or Proxy-Authorization value.
fn digest_params(value: &str) -> std::collections::HashMap<String, String> {
    let rest = value.trim().strip_prefix("Digest").expect("Digest scheme");
    rest.split(',')
        .filter_map(|kv| kv.trim().split_once('='))
        .map(|(k, v)| {
            (
                k.trim().to_ascii_lowercase(),
                v.trim().trim_matches('"').to_string(),
            )
        })
        .collect()
}

fn md5_hex(s: &str) -> String {
    use md5::{Digest, Md5};
    hex::encode(Md5::digest(s.as_bytes()))
}

/// Whether a digest (RFC 2617/3261, MD5, qop=auth or none) answers for
/// `password` on an INVITE.
fn digest_ok(value: &str, username: &str, password: &str) -> bool {
    let p = digest_params(value);
    let get = |k: &str| p.get(k).map(String::as_str).unwrap_or("");
    let ha1 = md5_hex(&format!("{username}:{}:{password}", get("realm")));
    let ha2 = md5_hex(&format!("INVITE:{}", get("uri")));
    let expected = if p.contains_key("qop") {
        md5_hex(&format!(
            "{ha1}:{}:{}:{}:{}:{ha2}",
            get("nonce"),
            get("nc"),
            get("cnonce"),
            get("qop")
        ))
    } else {
        md5_hex(&format!("{ha1}:{}:{ha2}", get("nonce")))
    };
    get("username") == username && !get("response").is_empty() && get("response") == expected
}

#[test]
fn proxy_auth_407_retry_carries_a_valid_digest_and_is_delivered() {
    let trace = artifact("auth_407", "messages.log");
    let _ = std::fs::remove_file(&trace);
    let trace_arg = trace.to_str().unwrap().to_string();
    let mut uas = callee(
        "auth_407",
        &ours("uas_407.xml"),
        15_350,
        1,
        &["-trace_msg", "-message_file", &trace_arg],
    );
    let call = one_call(15_350, &["--username", "flash", "--password", "s3cret"], 0);
    assert_eq!(call["outcome"], "delivered", "{call}");
    assert_eq!(call["sip_code"], 487, "{call}");
    // SIPp checked (regexp, check_it) that the second INVITE carries a
    // Digest Proxy-Authorization; the call completes only then.
    assert_sipp_success(&mut uas, 1);
    // SIPp 3.6.1's verifyauth only reads Authorization, so the digest of
    // the Proxy-Authorization SIPp received is checked here.
    let log = std::fs::read_to_string(&trace).expect("SIPp -trace_msg file");
    let value = log
        .lines()
        .find_map(|l| l.strip_prefix("Proxy-Authorization:"))
        .unwrap_or_else(|| panic!("no Proxy-Authorization in SIPp's log:\n{log}"));
    let p = digest_params(value);
    assert_eq!(p.get("realm").map(String::as_str), Some("sipp"), "{value}");
    assert_eq!(
        p.get("nonce").map(String::as_str),
        Some("5f8a1c0e7b2d4a69"),
        "{value}"
    );
    assert_eq!(p.get("qop").map(String::as_str), Some("auth"), "{value}");
    assert!(digest_ok(value, "flash", "s3cret"), "bad digest: {value}");
    assert!(!digest_ok(value, "flash", "wrong"), "verifier: {value}");
}

#[test]
fn auth_401_retry_is_verified_by_sipp_and_delivered() {
    let mut uas = callee("auth_401", &ours("uas_401.xml"), 15_355, 1, &[]);
    let call = one_call(15_355, &["--username", "flash", "--password", "s3cret"], 0);
    assert_eq!(call["outcome"], "delivered", "{call}");
    assert_eq!(call["sip_code"], 487, "{call}");
    // The scenario reaches the ring/cancel part only if verifyauth accepted
    // the Authorization of the second INVITE.
    assert_sipp_success(&mut uas, 1);
}

#[test]
fn auth_401_with_a_wrong_password_is_refused() {
    // The negative control for the test above: verifyauth really checks.
    let mut uas = callee("auth_401_bad", &ours("uas_401.xml"), 15_360, 1, &[]);
    let call = one_call(15_360, &["--username", "flash", "--password", "wrong"], 1);
    assert_ne!(call["outcome"], "delivered", "{call}");
    assert_eq!(call["sip_code"], 403, "{call}");
    let status = uas.wait_exit(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| !s.success()),
        "SIPp should count the call failed: {status:?}"
    );
}

/// A trunk whose answers come from another address than the one the
/// INVITE went to (an SBC that sends from another socket or node). A relay
/// takes `dial`'s requests on one port and hands them to SIPp, and sends
/// SIPp's answers back from a second port: the calls are still delivered.
/// (`dial`'s socket used to be connected to the trunk, so the kernel
/// dropped every answer and each call ended `timeout` after 32 s.)
#[test]
fn answers_from_another_port_of_the_trunk_are_taken() {
    use std::net::UdpSocket;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    struct Relay {
        stop: Arc<AtomicBool>,
        threads: Vec<std::thread::JoinHandle<()>>,
        answers: Arc<AtomicU64>,
    }
    impl Drop for Relay {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }

    let mut uas = callee("other_port", &shared("uas_ring_cancel.xml"), 15_380, 5, &[]);
    let front = UdpSocket::bind("127.0.0.1:15381").expect("bind the relay's front");
    let back = UdpSocket::bind("127.0.0.1:15382").expect("bind the relay's back");
    let to_sipp = UdpSocket::bind("127.0.0.1:0").expect("bind");
    to_sipp.connect("127.0.0.1:15380").expect("connect");
    for s in [&front, &to_sipp] {
        s.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
    }
    let dialer: Arc<Mutex<Option<std::net::SocketAddr>>> = Arc::default();
    let relay = Relay {
        stop: Arc::default(),
        threads: Vec::new(),
        answers: Arc::default(),
    };
    let mut relay = relay;
    let to_sipp = Arc::new(to_sipp);
    {
        let (stop, dialer, to_sipp) = (relay.stop.clone(), dialer.clone(), to_sipp.clone());
        relay.threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 65_535];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = front.recv_from(&mut buf) {
                    *dialer.lock().unwrap() = Some(from);
                    let _ = to_sipp.send(&buf[..n]);
                }
            }
        }));
    }
    {
        let (stop, dialer, answers) = (relay.stop.clone(), dialer, relay.answers.clone());
        relay.threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 65_535];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = to_sipp.recv(&mut buf) {
                    let to = *dialer.lock().unwrap();
                    if let Some(to) = to {
                        let _ = back.send_to(&buf[..n], to);
                        answers.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let out = dial(&[
        "--trunk",
        "127.0.0.1:15381",
        "--to-prefix",
        "+4477009",
        "--count",
        "5",
        "--rate",
        "50",
        "--json",
    ]);
    let (calls, summary) = json_lines(&out);
    assert_eq!(out.status.code(), Some(0), "{summary} {}", stderr(&out));
    assert_eq!(calls.len(), 5);
    for c in &calls {
        assert_eq!(c["outcome"], "delivered", "{c}");
        assert_eq!(c["sip_code"], 487, "{c}");
    }
    // 100, 180, 200 (CANCEL) and 487 per call, all from the other port.
    assert!(
        relay.answers.load(Ordering::Relaxed) >= 20,
        "{}",
        relay.answers.load(Ordering::Relaxed)
    );
    drop(relay);
    assert_sipp_success(&mut uas, 5);
}

#[test]
fn unreachable_trunk_exits_2() {
    // A port of this file's range that no test binds: below the ephemeral
    // range, so no port-0 socket of a parallel test lands on it either
    // (a bound-then-dropped ephemeral port could be reused meanwhile).
    let port = 15_399;
    let t0 = Instant::now();
    let out = dial(&[
        "--trunk",
        &format!("127.0.0.1:{port}"),
        "--to",
        "+447700900123",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("unreachable"), "{err}");
    // The summary still comes, last (SPEC §1: always a final summary).
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("a JSON summary line");
    let summary = &last["summary"];
    assert_eq!(summary["trunk_unreachable"], true, "{last}");
    assert_eq!(summary["outcomes"].get("delivered"), None, "{last}");
    // The port unreachable is a transport failure, a 503 to RFC 3261
    // (§8.1.3.1): the call ends trunk_error, not timeout after Timer B.
    assert_eq!(summary["outcomes"]["trunk_error"], 1, "{last}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "not fast: {:?}",
        t0.elapsed()
    );
}

#[test]
fn bad_number_exits_2_and_names_it() {
    let out = dial(&["--trunk", "127.0.0.1:15370", "--to", "12345", "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("12345"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn unresolvable_trunk_exits_2_with_a_clear_message() {
    let out = dial(&[
        "--trunk",
        "nosuchhost.invalid:5060",
        "--to",
        "+447700900123",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("--trunk") && err.contains("nosuchhost.invalid:5060"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}
