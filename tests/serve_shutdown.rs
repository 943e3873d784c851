//! Graceful shutdown of a real `flashcall serve`: SIGTERM while calls ring
//! at a SIPp callee CANCELs every one of them properly (SIPp, not the
//! engine, says each call ended with CANCEL, 487 and its ACK), exits 0 in
//! bounded time, and closes the listeners; an idle engine exits 0 at once;
//! clients that stall mid-request do not hold the exit past the grace.

mod support;

use serde_json::json;
use std::net::TcpStream;
use std::time::{Duration, Instant};
use support::sipp::{scenario, Sipp};
use support::{config, test_dir, with_http_keys, Engine, SANDBOX};

/// One sample of an unlabelled-or-labelled counter, by exact line prefix.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn assert_refused(addr: std::net::SocketAddr, what: &str) {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(_) => panic!("{what} {addr} still accepts connections after exit"),
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{what} {addr}: {e}"
        ),
    }
}

const CALLS: u32 = 5;

#[test]
fn sigterm_cancels_ringing_calls_and_exits_zero() {
    sigterm_cancels_ringing_calls(15_420, "own");
}

/// The same with the SIP driver as a task on the HTTP worker: its end is
/// awaited as a task's, not joined as a thread's.
#[test]
fn sigterm_cancels_ringing_calls_with_the_driver_on_the_http_worker() {
    sigterm_cancels_ringing_calls(15_421, "shared");
}

fn sigterm_cancels_ringing_calls(port: u16, sip_thread: &str) {
    let dir = test_dir(&format!("shutdown-ringing-{sip_thread}"));
    let mut sipp = Sipp::start(&dir, &scenario("uas_ring_cancel.xml"), port, CALLS);
    // ring_ms of a minute: the calls would ring on for 60 s, so only the
    // shutdown can be what CANCELs them.
    let trunk = format!("[[trunks]]\nname = \"sipp\"\naddress = \"127.0.0.1:{port}\"\ncps = 50\n");
    let cfg = config(&dir, "+44770090XXXX\n", &trunk, "[call]\nring_ms = 60000\n");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let sip = "[sip]\nlisten = \"127.0.0.1:0\"\n";
    assert!(text.contains(sip), "{text}");
    let text = text.replace(sip, &format!("{sip}thread = \"{sip_thread}\"\n"));
    std::fs::write(&cfg, text).unwrap();
    let mut e = Engine::start(&cfg);

    let ids: Vec<String> = (0..CALLS)
        .map(|i| {
            let v = e.create(json!({"phone": format!("+44791112340{i}"), "sender": "SHOP"}));
            v["id"].as_str().unwrap().to_string()
        })
        .collect();
    // Every call is `calling` and its 180 from SIPp has reached the engine.
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let m = e.metrics_text();
        let rung = metric(
            &m,
            "flashcall_sip_responses_total{trunk=\"sipp\",code=\"180\"}",
        );
        let in_flight = metric(&m, "flashcall_calls_in_flight");
        if rung >= f64::from(CALLS) && in_flight == f64::from(CALLS) {
            break;
        }
        assert!(
            Instant::now() < end,
            "calls not ringing: 180s {rung}, in flight {in_flight}\n{}",
            e.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for id in &ids {
        let v = e.get(&format!("/v1/verifications/{id}")).json();
        assert_eq!(v["status"], "calling", "{v}");
    }
    assert!(sipp.running(), "SIPp exited early");

    let t0 = Instant::now();
    let status = e
        .terminate(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no exit 10 s after SIGTERM\n{}", e.log_text()));
    let took = t0.elapsed();
    assert!(status.success(), "exit {status}\n{}", e.log_text());
    // The calls were closed, not abandoned when the 3 s grace ran out.
    assert!(
        took < Duration::from_millis(2_500),
        "shutdown took {took:?}\n{}",
        e.log_text()
    );
    let log = e.log_text();
    assert!(log.contains("every call in flight was closed"), "{log}");
    assert!(!log.contains("panicked"), "{log}");

    // SIPp counts a call successful only once it got the CANCEL, sent the
    // 487 and received its ACK.
    let (ok, failed) = sipp.finish(Duration::from_secs(15));
    assert_eq!(
        (ok, failed),
        (u64::from(CALLS), 0),
        "SIPp successful/failed calls"
    );

    assert_refused(e.http, "HTTP");
    assert_refused(e.metrics, "metrics");
}

#[test]
fn sigterm_on_an_idle_engine_exits_zero_quickly() {
    let dir = test_dir("shutdown-idle");
    let cfg = config(&dir, "+44770090XXXX\n", SANDBOX, "");
    let mut e = Engine::start(&cfg);
    assert_eq!(e.request("GET", "/healthz", None, &[], None).status, 200);
    let t0 = Instant::now();
    let status = e
        .terminate(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no exit 5 s after SIGTERM\n{}", e.log_text()));
    assert!(status.success(), "exit {status}\n{}", e.log_text());
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "idle shutdown took {:?}",
        t0.elapsed()
    );
    assert_refused(e.http, "HTTP");
    assert!(!e.log_text().contains("panicked"));
}

/// Calls still queued behind the trunk's CPS at SIGTERM are not placed,
/// and their verifications are closed then (`failed`, call outcome
/// `interrupted`, with their status-change rows), not left `pending` for
/// the next start to find.
#[test]
fn sigterm_closes_the_calls_it_does_not_place() {
    let dir = test_dir("shutdown-queued");
    // One INVITE a second: of six creates made at once, the first goes out
    // and the rest wait in the queue.
    let sandbox = "[sandbox]\nenabled = true\ncps = 1\n";
    let cfg = config(&dir, "+44770090XXXX\n", "", sandbox);
    let mut e = Engine::start(&cfg);
    let ids: Vec<String> = (0..6)
        .map(|i| {
            let v = e.create(json!({"phone": format!("+44791112350{i}"), "sender": "SHOP"}));
            v["id"].as_str().unwrap().to_string()
        })
        .collect();
    let status = e
        .terminate(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no exit 10 s after SIGTERM\n{}", e.log_text()));
    assert!(status.success(), "exit {status}\n{}", e.log_text());

    let db = rusqlite::Connection::open(dir.join("flashcall.db")).expect("open db");
    let mut unplaced = 0;
    for id in &ids {
        let (st, outcome, invited): (String, Option<String>, Option<i64>) = db
            .query_row(
                "SELECT status, call_outcome, call_invited_at_ms FROM verifications WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .expect("stored");
        assert_ne!(st, "pending", "{id} left pending\n{}", e.log_text());
        if invited.is_none() {
            unplaced += 1;
            assert_eq!(
                (st.as_str(), outcome.as_deref()),
                ("failed", Some("interrupted")),
                "{id}"
            );
        }
    }
    // The queue held most of them (one INVITE a second), so the test is
    // about those.
    assert!(unplaced >= 3, "only {unplaced} were still queued");
}

/// Requests still in progress at SIGTERM get the grace to finish, and no
/// more. A create whose body was half sent at the signal and completes
/// within the grace is answered (503: the engine takes no new calls once
/// shutting down); a client that sent half a request head, and one whose
/// body stops short, are cut off when the grace ends. Before, the drain
/// waited for them, and the process never exited. The read timeout is set
/// far beyond the test, so only the grace can end them.
#[test]
fn sigterm_answers_requests_in_progress_and_cuts_stalled_ones_at_the_grace() {
    use std::io::{Read, Write};
    let dir = test_dir("shutdown-stalled");
    let cfg = config(&dir, "+44770090XXXX\n", SANDBOX, "");
    with_http_keys(&cfg, "read_timeout_ms = 600000", 2000);
    let mut e = Engine::start(&cfg);
    let (half_head, short_body) = support::stalled_requests(e.http);
    let body = format!("{:<100}", r#"{"phone": "+447911123456", "sender": "SHOP"}"#);
    let mut finishing = TcpStream::connect(e.http).expect("connect");
    write!(finishing, "{}{}", support::create_head(100), &body[..20]).expect("write");
    // All three requests are in the engine's hands before the signal (hyper
    // closes at once, at a shutdown, a connection it has read nothing from).
    support::wait_read_by_server(e.http, &[&half_head, &short_body, &finishing]);

    e.send_sigterm();
    let end = Instant::now() + Duration::from_secs(10);
    while !e.log_text().contains("shutdown requested") {
        assert!(Instant::now() < end, "no shutdown line\n{}", e.log_text());
        std::thread::sleep(Duration::from_millis(10));
    }
    finishing
        .write_all(&body.as_bytes()[20..])
        .expect("write the rest");
    finishing
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut answer = String::new();
    finishing
        .read_to_string(&mut answer)
        .unwrap_or_else(|err| panic!("no answer within the grace: {err}\n{}", e.log_text()));
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.contains("shutting down"), "{answer}");

    let status = e.wait_exit(Duration::from_secs(15)).unwrap_or_else(|| {
        panic!(
            "no exit 15 s after SIGTERM with a 2 s grace\n{}",
            e.log_text()
        )
    });
    assert!(status.success(), "exit {status}\n{}", e.log_text());
    let log = e.log_text();
    let cut = log
        .lines()
        .find(|l| l.contains("HTTP connections still open"))
        .unwrap_or_else(|| panic!("no line for the connections cut\n{log}"));
    assert!(cut.contains("connections=2"), "{cut}");
    assert!(!log.contains("panicked"), "{log}");
    // The two stalled ones were closed, not answered.
    for (mut s, what) in [(half_head, "half head"), (short_body, "short body")] {
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut got = Vec::new();
        match s.read_to_end(&mut got) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("{what}: {e}"),
        }
        assert!(
            got.is_empty(),
            "{what}: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    assert_refused(e.http, "HTTP");
}
