//! `flashcall serve` end to end: HTTP in, real SIP out to a SIPp callee on
//! 127.0.0.1, and back. SIPp logs every message it receives, so the caller
//! number the INVITE presented is read from SIPp's side, not ours.

mod support;

use serde_json::json;
use std::time::Duration;
use support::sipp::{scenario, Sipp};
use support::{config, test_dir, Engine};

/// A SIPp scenario of this repository's own (tests/sipp).
fn ours(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sipp")
        .join(name)
}

/// `n` creates sent at once, one thread each (so they are all reserved
/// on the trunk before the first call's answer), to `prefix` + 0..n;
/// their ids.
fn create_together(e: &Engine, n: usize, prefix: &str) -> Vec<String> {
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..n)
            .map(|i| {
                s.spawn(move || {
                    let v = e.create(json!({"phone": format!("{prefix}{i}"), "sender": "SHOP"}));
                    v["id"].as_str().unwrap().to_string()
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    })
}

/// A create refused because the only trunk rests after a 503: 503
/// `overloaded` with a Retry-After in `secs`.
fn assert_trunk_resting(r: &support::Resp, secs: std::ops::RangeInclusive<u64>) {
    r.assert_problem(503, "overloaded");
    let got: u64 = r
        .header("retry-after")
        .and_then(|s| s.parse().ok())
        .expect("Retry-After");
    assert!(secs.contains(&got), "Retry-After {got}, not in {secs:?}");
}

fn trunk(port: u16) -> String {
    format!("[[trunks]]\nname = \"sipp\"\naddress = \"127.0.0.1:{port}\"\ncps = 50\n")
}

#[test]
fn client_code_and_engine_code_verified_through_sipp() {
    let dir = test_dir("sipp-flow");
    let mut sipp = Sipp::start(&dir, &scenario("uas_ring_cancel.xml"), 15_410, 2);
    let cfg = config(&dir, "+44770090XXXX\n", &trunk(15_410), "");
    let e = Engine::start(&cfg);

    // 1. The client chooses the code.
    let v = e.create(
        json!({"phone": "+447911123456", "sender": "SHOP", "code": "4821", "reference": "order-1"}),
    );
    assert_eq!(v["code"], "4821", "{v}");
    assert_eq!(v["status"], "pending");
    assert_eq!(v["caller_prefix"], "+44770090");
    assert_eq!(v["cli_filter"], "+44770090XXXX");
    assert_eq!(v["code_length"], 4);
    assert_eq!(v["reference"], "order-1");
    let id = v["id"].as_str().unwrap().to_string();
    let got = e.wait_call_done(&id);
    assert_eq!(got["status"], "delivered", "{got}");
    assert_eq!(got["call"]["outcome"], "delivered", "{got}");
    assert_eq!(got["call"]["sip_code"], 487, "{got}");
    assert_eq!(got["call"]["trunk"], "sipp", "{got}");
    assert_eq!(got["call"]["caller"], "+447700904821", "{got}");
    for k in ["invited_at", "ringing_at", "ended_at"] {
        assert!(got["call"][k].is_string(), "{k}: {got}");
    }
    assert_eq!(got["attempts_left"], 5);

    let wrong = e.post(
        &format!("/v1/verifications/{id}/check"),
        &json!({"code": "4822"}),
    );
    assert_eq!(wrong.status, 200, "{}", wrong.body);
    let w = wrong.json();
    assert_eq!(
        (w["verified"].clone(), w["attempts_left"].clone()),
        (json!(false), json!(4))
    );
    assert_eq!(w["status"], "delivered");
    let right = e.post(
        &format!("/v1/verifications/{id}/check"),
        &json!({"code": "4821"}),
    );
    let r = right.json();
    assert_eq!(
        (r["verified"].clone(), r["status"].clone()),
        (json!(true), json!("verified")),
        "{r}"
    );
    assert_eq!(r["attempts_left"], 4);

    // 2. The engine chooses the code; the app checks the full caller number.
    let v = e.create(json!({"phone": "+4915123456789", "sender": "SHOP"}));
    assert!(
        v.get("code").is_none(),
        "engine-chosen code must not be echoed: {v}"
    );
    let id2 = v["id"].as_str().unwrap().to_string();
    let got = e.wait_call_done(&id2);
    assert_eq!(got["status"], "delivered", "{got}");
    let caller = got["call"]["caller"].as_str().unwrap().to_string();
    assert!(
        caller.starts_with("+44770090") && caller.len() == 13,
        "{caller}"
    );
    let r = e
        .post(
            &format!("/v1/verifications/{id2}/check"),
            &json!({"cli": caller}),
        )
        .json();
    assert_eq!(r["verified"], true, "{r}");

    // SIPp saw both INVITEs with those callers and counted both calls good.
    let (ok, failed) = sipp.finish(Duration::from_secs(15));
    assert_eq!((ok, failed), (2, 0), "SIPp successful/failed calls");
    let invites = sipp.invites();
    assert!(
        invites.contains(&("+447911123456".into(), "+447700904821".into())),
        "{invites:?}"
    );
    assert!(
        invites.contains(&("+4915123456789".into(), caller.clone())),
        "{invites:?}"
    );
}

#[test]
fn busy_callee_gives_failed_with_the_outcome() {
    let dir = test_dir("sipp-busy");
    let _sipp = Sipp::start(&dir, &scenario("uas_busy.xml"), 15_411, 1);
    let cfg = config(&dir, "+44770090XXXX\n", &trunk(15_411), "");
    let e = Engine::start(&cfg);
    let v = e.create(json!({"phone": "+447911123457", "sender": "SHOP"}));
    let got = e.wait_call_done(v["id"].as_str().unwrap());
    assert_eq!(got["status"], "failed", "{got}");
    assert_eq!(got["call"]["outcome"], "busy", "{got}");
    assert_eq!(got["call"]["sip_code"], 486, "{got}");
    let m = e.metrics_text();
    assert!(
        m.contains("flashcall_calls_total{trunk=\"sipp\",outcome=\"busy\"} 1"),
        "{m}"
    );
}

/// A 503 without Retry-After is that call's failure (RFC 3261 §21.5.4:
/// act as on a 500; carriers send it for one congested route), not the
/// trunk's: the next create is taken and called. Before, each such 503
/// rested the whole trunk for 5 s and the next create got 503. Only
/// five in a row rest it: then creates get 503 `overloaded`, Retry-After.
#[test]
fn a_503_without_retry_after_fails_its_call_and_five_in_a_row_rest_the_trunk() {
    let dir = test_dir("sipp-503");
    let ours = ours("uas_503.xml");
    let _sipp = Sipp::start(&dir, &ours, 15_414, 5);
    let cfg = config(&dir, "+44770090XXXX\n", &trunk(15_414), "");
    let e = Engine::start(&cfg);
    for i in 0..5 {
        let v = e.create(json!({"phone": format!("+44791112346{i}"), "sender": "SHOP"}));
        let got = e.wait_call_done(v["id"].as_str().unwrap());
        assert_eq!(got["status"], "failed", "{i}: {got}");
        assert_eq!(got["call"]["outcome"], "trunk_error", "{i}: {got}");
        assert_eq!(got["call"]["sip_code"], 503, "{i}: {got}");
    }
    let r = e.post(
        "/v1/verifications",
        &json!({"phone": "+447911123465", "sender": "SHOP"}),
    );
    assert_trunk_resting(&r, 1..=5);
}

/// A 503 with Retry-After rests the trunk for that long, the INVITEs
/// already queued for it included (RFC 3261 §21.5.4: no other requests
/// for the duration): three creates taken together, so two wait in the
/// trunk's queue when the first call's 503 arrives, are invited at least
/// Retry-After (2 s) apart. Before, the queued ones went out at the
/// trunk's CPS pace (20 ms apart here) straight into the rest asked for.
#[test]
fn a_503_retry_after_holds_the_calls_queued_for_the_trunk() {
    let dir = test_dir("sipp-503-retry-after");
    let ours = ours("uas_503_retry_after.xml");
    let _sipp = Sipp::start(&dir, &ours, 15_415, 3);
    let cfg = config(&dir, "+44770090XXXX\n", &trunk(15_415), "");
    let e = Engine::start(&cfg);
    let ids = create_together(&e, 3, "+44791112347");
    let mut invited: Vec<i128> = ids
        .iter()
        .map(|id| {
            let got = e.wait_status(id, Duration::from_secs(15), |s| {
                !matches!(s, "pending" | "calling")
            });
            assert_eq!(got["call"]["outcome"], "trunk_error", "{got}");
            let at = got["call"]["invited_at"].as_str().expect("invited_at");
            time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
                .expect("RFC 3339")
                .unix_timestamp_nanos()
                / 1_000_000
        })
        .collect();
    invited.sort_unstable();
    for w in invited.windows(2) {
        // Retry-After counts from the 503's arrival, a few ms after its
        // INVITE; the clock's millisecond rounding allows a little less.
        assert!(
            w[1] - w[0] >= 1_990,
            "invited {} ms apart: {invited:?}",
            w[1] - w[0]
        );
    }
}

/// A long rest (Retry-After 60 s, a trunk in maintenance): the calls
/// already queued for the trunk are not held for a minute while their
/// callers wait for a missed call; they end at once as `trunk_error`,
/// never invited (no SIP code, no INVITE time), and the next create gets
/// 503 `overloaded` with about that Retry-After.
#[test]
fn a_long_503_rest_ends_the_calls_queued_for_the_trunk_unplaced() {
    let dir = test_dir("sipp-503-long-rest");
    let ours = ours("uas_503_long_rest.xml");
    let sipp = Sipp::start(&dir, &ours, 15_417, 3);
    let cfg = config(&dir, "+44770090XXXX\n", &trunk(15_417), "");
    let e = Engine::start(&cfg);
    let ids = create_together(&e, 3, "+44791112349");
    let got: Vec<serde_json::Value> = ids.iter().map(|id| e.wait_call_done(id)).collect();
    let invited: Vec<&serde_json::Value> = got
        .iter()
        .filter(|v| v["call"]["sip_code"] == 503)
        .collect();
    assert_eq!(invited.len(), 1, "one call reached the trunk: {got:?}");
    for v in &got {
        assert_eq!(v["status"], "failed", "{v}");
        assert_eq!(v["call"]["outcome"], "trunk_error", "{v}");
    }
    for v in got.iter().filter(|v| v["call"]["sip_code"] != 503) {
        assert!(v["call"]["sip_code"].is_null(), "{v}");
        assert!(v["call"]["invited_at"].is_null(), "never invited: {v}");
    }
    assert_eq!(sipp.invites().len(), 1, "SIPp saw one INVITE");
    let r = e.post(
        "/v1/verifications",
        &json!({"phone": "+447911123499", "sender": "SHOP"}),
    );
    assert_trunk_resting(&r, 50..=60);
}

/// An answered call (the callee picked up before the CANCEL won): ACK and
/// BYE at once, outcome `answered`; and the trunk's 200 to that BYE, which
/// arrives after the call has its outcome, is still counted in
/// `flashcall_sip_responses_total` (it was lost: the count looked the call
/// up among those still open).
#[test]
fn an_answered_call_is_hung_up_and_every_response_is_counted() {
    let dir = test_dir("sipp-answer");
    let ours = ours("uas_answer.xml");
    let mut sipp = Sipp::start(&dir, &ours, 15_416, 1);
    let cfg = config(&dir, "+44770090XXXX\n", &trunk(15_416), "");
    let e = Engine::start(&cfg);
    let v = e.create(json!({"phone": "+447911123480", "sender": "SHOP"}));
    let got = e.wait_call_done(v["id"].as_str().unwrap());
    assert_eq!(got["call"]["outcome"], "answered", "{got}");
    // SIPp's scenario ends with its 200 to our BYE: it counts the call
    // successful only once the ACK and BYE came.
    let (ok, failed) = sipp.finish(Duration::from_secs(10));
    assert_eq!((ok, failed), (1, 0), "SIPp's view of the call");
    let want = "flashcall_sip_responses_total{trunk=\"sipp\",code=\"200\"} 2";
    let end = std::time::Instant::now() + Duration::from_secs(5);
    let mut m = e.metrics_text();
    while !m.contains(want) && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
        m = e.metrics_text();
    }
    assert!(m.contains(want), "the INVITE's 200 and the BYE's 200:\n{m}");
}

/// The value of `name{labels}` in Prometheus text (0 when absent).
fn metric(text: &str, name: &str, labels: &str) -> f64 {
    let series = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Two trunks on one address (one SBC, two accounts or routes): every
/// response is counted against the trunk that placed its call, the 200
/// to the BYE too, which arrives after the call has its outcome. Before,
/// responses after the outcome went to the first trunk with that
/// address, so `sipp_a` got `sipp_b`'s BYE answers. The calls are spread
/// by weight (1:9), so `sipp_b` takes nearly all of them; each trunk must
/// show two 200s (the INVITE's and the BYE's) per answered call.
#[test]
fn trunks_on_one_address_count_their_own_late_responses() {
    let dir = test_dir("sipp-shared-address");
    let mut sipp = Sipp::start(&dir, &ours("uas_answer.xml"), 15_418, 6);
    let trunks = "[[trunks]]\nname = \"sipp_a\"\naddress = \"127.0.0.1:15418\"\ncps = 50\nweight = 1\n\
                  [[trunks]]\nname = \"sipp_b\"\naddress = \"127.0.0.1:15418\"\ncps = 50\nweight = 9\n";
    let cfg = config(&dir, "+44770090XXXX\n", trunks, "");
    let e = Engine::start(&cfg);
    for i in 0..6 {
        let v = e.create(json!({"phone": format!("+44791112350{i}"), "sender": "SHOP"}));
        let got = e.wait_call_done(v["id"].as_str().unwrap());
        assert_eq!(got["call"]["outcome"], "answered", "{got}");
    }
    let (ok, failed) = sipp.finish(Duration::from_secs(10));
    assert_eq!((ok, failed), (6, 0), "SIPp's view of the calls");
    let counts = |m: &str, t: &str| {
        let answered = metric(
            m,
            "flashcall_calls_total",
            &format!("trunk=\"{t}\",outcome=\"answered\""),
        );
        let ok200 = metric(
            m,
            "flashcall_sip_responses_total",
            &format!("trunk=\"{t}\",code=\"200\""),
        );
        (answered, ok200)
    };
    let settled = |m: &str| {
        let (a, b) = (counts(m, "sipp_a"), counts(m, "sipp_b"));
        a.0 + b.0 == 6.0 && a.1 + b.1 == 12.0
    };
    let end = std::time::Instant::now() + Duration::from_secs(5);
    let mut m = e.metrics_text();
    while !settled(&m) && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
        m = e.metrics_text();
    }
    assert!(settled(&m), "6 answered calls, 12 200s in all:\n{m}");
    let (a, b) = (counts(&m, "sipp_a"), counts(&m, "sipp_b"));
    // 1 in 10^6 that weight 9 of 10 gets none of 6 calls.
    assert!(b.0 >= 1.0, "sipp_b placed no call: {a:?} {b:?}");
    assert_eq!(a.1, 2.0 * a.0, "sipp_a: 200s {a:?}");
    assert_eq!(b.1, 2.0 * b.0, "sipp_b: 200s {b:?}");
}

/// `sip.realtime_priority` (SCHED_FIFO), with `sip.batch_window_us = 0`
/// accepted beside it: calls still complete, and the SIP thread runs under
/// the scheduling asked for, or the engine said plainly that the OS refused
/// it. (Three calls never reach the driver's busy threshold, so this does
/// not exercise the window itself; the load bench does.)
#[test]
fn sip_thread_under_sched_fifo_delivers() {
    let dir = test_dir("sipp-fifo");
    let _sipp = Sipp::start(&dir, &scenario("uas_ring_cancel.xml"), 15_412, 3);
    let cfg = config(&dir, "+44770090XXXX\n", &trunk(15_412), "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let sip = "[sip]\nlisten = \"127.0.0.1:0\"\n";
    assert!(text.contains(sip), "{text}");
    let text = text.replace(
        sip,
        &format!("{sip}batch_window_us = 0\nrealtime_priority = 5\n"),
    );
    std::fs::write(&cfg, text).unwrap();
    let e = Engine::start(&cfg);
    let ids: Vec<String> = ["+447911123460", "+447911123461", "+447911123462"]
        .iter()
        .map(|p| support::id_of(&e.create(json!({"phone": p, "sender": "SHOP"}))))
        .collect();
    for id in &ids {
        let got = e.wait_call_done(id);
        assert_eq!(got["status"], "delivered", "{got}");
        assert_eq!(got["call"]["sip_code"], 487, "{got}");
    }

    let log = e.log_text();
    // The thread's scheduling policy, field 41 of /proc/<pid>/task/<tid>/stat
    // (after the parenthesised name): 1 is SCHED_FIFO, 0 SCHED_OTHER.
    let policy = std::fs::read_dir(format!("/proc/{}/task", e.pid()))
        .unwrap()
        .filter_map(Result::ok)
        .find(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim() == "flashcall-sip")
        })
        .and_then(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .and_then(|s| {
            let after = &s[s.rfind(')')? + 2..];
            after.split(' ').nth(38).map(str::to_string)
        })
        .expect("the flashcall-sip thread and its policy");
    if log.contains("SIP thread runs under SCHED_FIFO") {
        assert_eq!(policy, "1", "{log}");
    } else {
        assert!(
            log.contains("sip.realtime_priority: the OS refused SCHED_FIFO"),
            "neither FIFO nor a warning: {log}"
        );
        assert_eq!(policy, "0");
    }
}

/// `sip.thread`: with "own" the SIP driver has a thread of its own
/// (`flashcall-sip`), with "shared" it is a task on the HTTP runtime and
/// there is no such thread; calls complete either way, the engine's log
/// says which it is, and SIGTERM ends it cleanly.
#[test]
fn sip_driver_on_its_own_thread_or_on_the_http_worker() {
    for (mode, port, own) in [("own", 15_413, true), ("shared", 15_414, false)] {
        let dir = test_dir(&format!("sipp-thread-{mode}"));
        let _sipp = Sipp::start(&dir, &scenario("uas_ring_cancel.xml"), port, 2);
        let cfg = config(&dir, "+44770090XXXX\n", &trunk(port), "");
        let text = std::fs::read_to_string(&cfg).unwrap();
        let sip = "[sip]\nlisten = \"127.0.0.1:0\"\n";
        assert!(text.contains(sip), "{text}");
        std::fs::write(
            &cfg,
            text.replace(sip, &format!("{sip}thread = \"{mode}\"\n")),
        )
        .unwrap();
        let mut e = Engine::start(&cfg);
        for phone in ["+447911123470", "+447911123471"] {
            let id = support::id_of(&e.create(json!({"phone": phone, "sender": "SHOP"})));
            let got = e.wait_call_done(&id);
            assert_eq!(got["status"], "delivered", "{mode}: {got}");
            assert_eq!(got["call"]["sip_code"], 487, "{mode}: {got}");
        }
        let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", e.pid()))
            .unwrap()
            .filter_map(Result::ok)
            .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
            .map(|c| c.trim().to_string())
            .collect();
        assert_eq!(
            threads.iter().any(|t| t == "flashcall-sip"),
            own,
            "{mode}: {threads:?}"
        );
        // Its end is awaited either way: a clean exit.
        let status = e
            .terminate(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{mode}: no exit after SIGTERM\n{}", e.log_text()));
        let log = e.log_text();
        assert!(status.success(), "{mode}: exit {status}\n{log}");
        assert!(
            log.contains("every call in flight was closed"),
            "{mode}: {log}"
        );
        assert_eq!(
            log.contains("the SIP driver runs on the HTTP worker"),
            !own,
            "{mode}: {log}"
        );
    }
}

/// A trunk where nothing listens (its SBC is down: ICMP port unreachable)
/// beside a live one. The call placed there ends at once `trunk_error`
/// with no SIP code (RFC 3261 §8.1.3.1: a transport failure is a 503),
/// where before it retransmitted for Timer B's 32 s and ended `timeout`;
/// the dead trunk then rests, so the next creates all go to the live one
/// and are delivered. Weights 1000:1 send the first call to the dead
/// trunk nearly always; the assertions hold whichever trunk a call got.
#[test]
fn an_unreachable_trunk_fails_its_call_at_once_and_rests() {
    let dir = test_dir("sipp-unreachable");
    // A port of this file's range that nothing binds (below the ephemeral
    // range, so no port-0 socket of a parallel test lands on it).
    let dead = 15_423;
    let trunks = format!(
        "[[trunks]]\nname = \"dead\"\naddress = \"127.0.0.1:{dead}\"\ncps = 50\nweight = 1000\n\
         [[trunks]]\nname = \"live\"\naddress = \"127.0.0.1:15422\"\ncps = 50\nweight = 1\n"
    );
    let cfg = config(&dir, "+44770090XXXX\n", &trunks, "");
    let e = Engine::start(&cfg);
    let mut sipp = Sipp::start(&dir, &scenario("uas_ring_cancel.xml"), 15_422, 3);
    let (mut on_dead, mut on_live) = (0, 0);
    for i in 0..4 {
        let v = e.create(json!({"phone": format!("+44791112360{i}"), "sender": "SHOP"}));
        let id = v["id"].as_str().unwrap();
        let got = e.wait_call_done(id);
        match got["call"]["trunk"].as_str() {
            Some("dead") => {
                on_dead += 1;
                assert_eq!(got["status"], "failed", "{got}");
                assert_eq!(got["call"]["outcome"], "trunk_error", "{got}");
                assert_eq!(got["call"]["sip_code"], serde_json::Value::Null, "{got}");
            }
            Some("live") => {
                on_live += 1;
                assert_eq!(got["status"], "delivered", "{got}");
            }
            other => panic!("no trunk {other:?}: {got}"),
        }
    }
    assert_eq!(on_dead, 1, "after its failure the dead trunk rests");
    assert_eq!(on_live, 3);
    let m = e.metrics_text();
    assert!(
        m.contains("flashcall_sip_transport_failures_total 1"),
        "one call ended by the transport failure:\n{m}"
    );
    assert_eq!(
        metric(
            &m,
            "flashcall_calls_total",
            "trunk=\"dead\",outcome=\"trunk_error\""
        ),
        1.0
    );
    assert!(
        e.log_text()
            .contains("trunk unreachable (ICMP or no route): backing off"),
        "{}",
        e.log_text()
    );
    let (ok, failed) = sipp.finish(Duration::from_secs(10));
    assert_eq!((ok, failed), (3, 0), "SIPp's view of the live calls");
}
