//! `flashcall dial` against real SIPp callees on 127.0.0.1.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// Kills and reaps the SIPp child on every path.
struct Sipp(Child);
impl Drop for Sipp {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn shared(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/sipp")
        .join(name)
}

/// A SIPp callee that stops by itself after `calls` calls (`-m`).
fn callee(scenario: &Path, port: u16, calls: u32) -> Sipp {
    let child = Command::new("sipp")
        .arg("-sf")
        .arg(scenario)
        .args([
            "-i",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-m",
            &calls.to_string(),
        ])
        .args(["-nostdin", "-timeout", "60s", "-max_recv_loops", "100000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sipp on PATH (apt-get install sip-tester)");
    std::thread::sleep(Duration::from_millis(300));
    Sipp(child)
}

fn dial(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flashcall"))
        .arg("dial")
        .args(args)
        .output()
        .expect("run flashcall")
}

fn json_lines(out: &Output) -> (Vec<Value>, Value) {
    let mut lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let summary = lines.pop().expect("summary line");
    (lines, summary)
}

#[test]
fn ring_cancel_200_calls_all_delivered_and_all_successful_in_sipp() {
    let mut uas = callee(&shared("uas_ring_cancel.xml"), 15_170, 200);
    let out = dial(&[
        "--trunk",
        "127.0.0.1:15170",
        "--to-prefix",
        "+4477009",
        "--count",
        "200",
        "--rate",
        "200",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (calls, summary) = json_lines(&out);
    assert_eq!(calls.len(), 200);
    for c in &calls {
        assert_eq!(c["outcome"], "delivered", "{c}");
        assert_eq!(c["sip_code"], 487, "{c}");
        assert!(c["post_dial_delay_ms"].as_f64().is_some());
    }
    assert_eq!(summary["summary"]["outcomes"]["delivered"], 200);
    // SIPp exits 0 only when every call of -m completed successfully
    // (it counts a call successful when the ACK for the 487 arrives).
    let status = uas.0.wait().expect("sipp exit");
    assert!(status.success(), "SIPp counted failed calls: {status}");
}

#[test]
fn busy_callee_gives_busy_and_exit_1() {
    let mut uas = callee(&shared("uas_busy.xml"), 15_172, 1);
    let out = dial(&[
        "--trunk",
        "127.0.0.1:15172",
        "--to",
        "+447700900123",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let (calls, _) = json_lines(&out);
    assert_eq!(calls[0]["outcome"], "busy");
    assert_eq!(calls[0]["sip_code"], 486);
    assert!(
        uas.0.wait().expect("sipp exit").success(),
        "SIPp did not get the ACK"
    );
}

#[test]
fn nothing_listening_is_a_clear_unreachable_error() {
    // Bind then drop to find a loopback port nobody listens on.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = dial(&[
        "--trunk",
        &format!("127.0.0.1:{port}"),
        "--to",
        "+447700900123",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unreachable"), "{err}");
}

#[test]
fn bad_arguments_are_named() {
    let out = dial(&["--trunk", "127.0.0.1:5070", "--to", "12345"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"12345\""));
    let out = dial(&[
        "--trunk",
        "no-such-host.invalid:5060",
        "--to",
        "+447700900123",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--trunk"));
    let out = dial(&[
        "--trunk",
        "127.0.0.1:5070",
        "--to-prefix",
        "+4477009",
        "--rate",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rate"));
}
