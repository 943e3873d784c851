//! `/metrics` of a real `flashcall serve` (sandbox callee), after real
//! traffic: parsed by real Prometheus parsers (`promtool check metrics` from
//! Debian's `prometheus` package, and the Python `prometheus_client` text
//! parser), every SPEC §6 name present with its type, values that add up to
//! what the test did, no phone number or ID in any label, and the SIP parse
//! error counter moving on a garbage datagram.
//!
//! A missing parser fails the test under `CI=true` (.ci/run installs both)
//! and is skipped with a loud message elsewhere.

mod support;

use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{config, test_dir, Engine, SANDBOX};

/// 1,000 caller numbers ending 1000..=1999: 10% of the 4-digit suffixes.
const POOL: &str = "# partial pool\n+4477009001XXX country=GB\n";
const POOL_SIZE: f64 = 1000.0;
const POOL_COVERAGE: f64 = 0.1;

/// A project whose burst is a single request.
const TINY: &str = r#"
[[projects]]
login = "tiny"
secret = "tiny-secret"
rate = 1
burst = 1
senders = [{ code = "TINY", status = "active" }]
"#;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// A parser that is not installed: a failure in CI, a loud skip elsewhere.
fn missing(what: &str, install: &str) {
    let msg = format!("{what} is not installed ({install})");
    assert!(!in_ci(), "CI=true: {msg}; .ci/run must install it");
    eprintln!("\n*** SKIPPED PART OF serve_metrics: {msg} ***\n");
}

/// `promtool check metrics` on the text. Returns false when promtool is
/// missing (and not in CI).
fn promtool_check(text: &str) -> bool {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            missing("promtool", "apt-get install prometheus");
            return false;
        }
        Err(e) => panic!("promtool: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n--- the text:\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

const PY_PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for f in text_string_to_metric_families(sys.stdin.read()):
    out.append({"name": f.name, "type": f.type,
                "samples": [[s.name, s.labels, s.value] for s in f.samples]})
print(json.dumps(out))
"#;

/// The Python `prometheus_client` parser's view: family name (as exposed,
/// counters with `_total`) -> (type, sample count). None when it is missing.
fn python_parse(text: &str) -> Option<BTreeMap<String, (String, usize)>> {
    let probe = Command::new("python3")
        .args(["-c", "import prometheus_client.parser"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        missing(
            "the Python prometheus_client parser",
            "pip install prometheus_client",
        );
        return None;
    }
    let mut child = Command::new("python3")
        .args(["-c", PY_PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client could not parse /metrics:\n{}\n--- the text:\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let families: Vec<Value> = serde_json::from_slice(&out.stdout).expect("parser JSON");
    Some(
        families
            .iter()
            .map(|f| {
                let ty = f["type"].as_str().unwrap().to_string();
                let mut name = f["name"].as_str().unwrap().to_string();
                // prometheus_client names a counter family without `_total`.
                if ty == "counter" {
                    name.push_str("_total");
                }
                (name, (ty, f["samples"].as_array().unwrap().len()))
            })
            .collect(),
    )
}

/// One sample line.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The exposition as the assertions read it: `# TYPE` lines and samples.
/// Both real parsers above must accept the same text first.
struct Scrape {
    types: HashMap<String, String>,
    samples: Vec<Sample>,
    text: String,
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (k, after) = rest.split_once("=\"").expect("label =\"");
        let mut v = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next().expect("closing quote");
            match c {
                '\\' => match chars.next().expect("escape").1 {
                    'n' => v.push('\n'),
                    other => v.push(other),
                },
                '"' => break i,
                c => v.push(c),
            }
        };
        out.insert(k.trim_start_matches(',').trim().to_string(), v);
        rest = after[end + 1..].trim_start_matches(',');
    }
    out
}

impl Scrape {
    fn parse(text: String) -> Scrape {
        let mut types = HashMap::new();
        let mut samples = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(t) = line.strip_prefix("# TYPE ") {
                let (n, ty) = t.split_once(' ').expect("TYPE name type");
                types.insert(n.to_string(), ty.trim().to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (head, value) = line.rsplit_once(' ').expect("sample value");
            let (name, labels) = match head.split_once('{') {
                Some((n, l)) => (n, parse_labels(l.strip_suffix('}').expect("}"))),
                None => (head, BTreeMap::new()),
            };
            samples.push(Sample {
                name: name.to_string(),
                labels,
                value: value.parse().unwrap_or_else(|_| panic!("value in {line}")),
            });
        }
        Scrape {
            types,
            samples,
            text,
        }
    }

    /// The sample of `name` whose labels include all of `want`, summed.
    fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                want.iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(v))
            })
            .map(|s| s.value)
            .sum()
    }

    fn has(&self, name: &str, want: &[(&str, &str)]) -> bool {
        self.samples.iter().any(|s| {
            s.name == name
                && want
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(v))
        })
    }

    /// Asserts the family's type and that its samples carry exactly these
    /// label names (histograms: on `_count`).
    fn assert_family(&self, name: &str, ty: &str, labels: &[&str]) {
        assert_eq!(
            self.types.get(name).map(String::as_str),
            Some(ty),
            "# TYPE of {name}\n{}",
            self.text
        );
        let sample = if ty == "histogram" {
            format!("{name}_count")
        } else {
            name.to_string()
        };
        let found: Vec<&Sample> = self.samples.iter().filter(|s| s.name == sample).collect();
        assert!(!found.is_empty(), "no sample of {sample}\n{}", self.text);
        for s in found {
            let keys: Vec<&str> = s.labels.keys().map(String::as_str).collect();
            let mut want: Vec<&str> = labels.to_vec();
            want.sort_unstable();
            assert_eq!(keys, want, "labels of {s:?}");
        }
        if ty == "histogram" {
            assert!(
                self.has(&format!("{name}_bucket"), &[("le", "+Inf")]),
                "{name} +Inf bucket"
            );
            assert!(self.has(&format!("{name}_sum"), &[]), "{name}_sum");
        }
    }
}

/// Scrapes and runs both real parsers on the text.
fn scrape(e: &Engine) -> Scrape {
    let text = e.metrics_text();
    let checked = promtool_check(&text);
    let s = Scrape::parse(text);
    if let Some(py) = python_parse(&s.text) {
        // The real parser sees the same families with the same types.
        for (name, ty) in &s.types {
            let got = py.get(name).map(|(t, _)| t.as_str());
            assert_eq!(got, Some(ty.as_str()), "prometheus_client's type of {name}");
        }
        assert_eq!(py.len(), s.types.len(), "families: {py:?}");
    }
    let _ = checked;
    s
}

fn wait_final(e: &Engine, id: &str) -> Value {
    e.wait_status(id, Duration::from_secs(10), |s| {
        !matches!(s, "pending" | "calling")
    })
}

/// The SPEC §6 names: (name, type, label names).
const SPEC: &[(&str, &str, &[&str])] = &[
    (
        "flashcall_verifications_total",
        "counter",
        &["project", "status"],
    ),
    ("flashcall_calls_total", "counter", &["trunk", "outcome"]),
    (
        "flashcall_sip_responses_total",
        "counter",
        &["trunk", "code"],
    ),
    ("flashcall_calls_in_flight", "gauge", &[]),
    ("flashcall_post_dial_delay_seconds", "histogram", &[]),
    ("flashcall_cancel_delay_seconds", "histogram", &[]),
    ("flashcall_rate_limited_total", "counter", &["scope"]),
    ("flashcall_pool_numbers", "gauge", &[]),
    ("flashcall_pool_suffix_coverage_ratio", "gauge", &[]),
    ("flashcall_checks_total", "counter", &["result"]),
    (
        "flashcall_http_requests_total",
        "counter",
        &["route", "status"],
    ),
    (
        "flashcall_http_request_duration_seconds",
        "histogram",
        &["route"],
    ),
    ("flashcall_sip_parse_errors_total", "counter", &[]),
];

#[test]
fn metrics_parse_name_every_spec_metric_and_add_up() {
    let dir = test_dir("metrics");
    let cfg = config(&dir, POOL, SANDBOX, TINY);
    let e = Engine::start(&cfg);

    // Before any call: the call histograms and the pool gauges are there.
    let s = scrape(&e);
    for name in [
        "flashcall_post_dial_delay_seconds",
        "flashcall_cancel_delay_seconds",
    ] {
        s.assert_family(name, "histogram", &[]);
        assert_eq!(s.sum(&format!("{name}_count"), &[]), 0.0);
    }
    assert_eq!(s.sum("flashcall_pool_numbers", &[]), POOL_SIZE);

    // Traffic: three delivered calls with client codes, one busy (the
    // sandbox's magic 0486), one wrong and one right check.
    let mut ids = Vec::new();
    for (i, code) in ["1234", "1500", "1999"].iter().enumerate() {
        let phone = format!("+44770090010{i}");
        let v = e.create(json!({"phone": phone, "sender": "SHOP", "code": code}));
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let busy = e.create(json!({"phone": "+447700900486", "sender": "SHOP"}));
    ids.push(busy["id"].as_str().unwrap().to_string());
    for id in &ids[..3] {
        let v = wait_final(&e, id);
        assert_eq!(v["status"], "delivered", "{v}");
    }
    let v = wait_final(&e, &ids[3]);
    assert_eq!(
        (v["status"].as_str(), v["call"]["outcome"].as_str()),
        (Some("failed"), Some("busy")),
        "{v}"
    );
    let check = |code: &str| {
        let r = e.post(
            &format!("/v1/verifications/{}/check", ids[0]),
            &json!({"code": code}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    };
    assert_eq!(check("1235")["verified"], false);
    assert_eq!(check("1234")["verified"], true);

    // A project with a burst of 1: the second create at once is 429.
    let tiny = ("tiny", "tiny-secret");
    let first = e.post_as(
        tiny,
        "/v1/verifications",
        &json!({"phone": "+447700900300", "sender": "TINY", "code": "1777"}),
        &[],
    );
    assert_eq!(first.status, 201, "{}", first.body);
    let tiny_id = first.json()["id"].as_str().unwrap().to_string();
    let second = e.post_as(
        tiny,
        "/v1/verifications",
        &json!({"phone": "+447700900301", "sender": "TINY"}),
        &[],
    );
    second.assert_problem(429, "rate_limited");
    // Its call, polled as that project (IDs are per project).
    let end = Instant::now() + Duration::from_secs(10);
    let v = loop {
        let r = e.request(
            "GET",
            &format!("/v1/verifications/{tiny_id}"),
            Some(tiny),
            &[],
            None,
        );
        let v = r.json();
        if !matches!(v["status"].as_str(), Some("pending" | "calling")) || Instant::now() >= end {
            break v;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(v["status"], "delivered", "{v}");
    ids.push(tiny_id);
    // The driver counts a status just after the store makes it visible:
    // wait (briefly) for the count of the status we just saw.
    let end = Instant::now() + Duration::from_secs(5);
    while Scrape::parse(e.metrics_text()).sum(
        "flashcall_verifications_total",
        &[("project", "tiny"), ("status", "delivered")],
    ) < 1.0
        && Instant::now() < end
    {
        std::thread::sleep(Duration::from_millis(20));
    }

    // Housekeeping reports the limiter's size each second: the five
    // destinations checked against the per-phone limit (the tiny
    // project's 429 was refused before its phone was counted).
    let end = Instant::now() + Duration::from_secs(5);
    while Scrape::parse(e.metrics_text()).sum("flashcall_limiter_tracked_phones", &[]) != 5.0
        && Instant::now() < end
    {
        std::thread::sleep(Duration::from_millis(50));
    }

    let s = scrape(&e);
    // (b) every SPEC §6 name with its type and labels.
    s.assert_family("flashcall_limiter_tracked_phones", "gauge", &[]);
    // The SQLite store's writer: every create and status change went
    // through a commit (each create waits for one).
    s.assert_family("flashcall_store_commit_seconds", "histogram", &[]);
    let commits = s.sum("flashcall_store_commit_seconds_count", &[]);
    let writes = s.sum("flashcall_store_writes_total", &[]);
    assert!(commits >= 1.0, "{}", s.text);
    // 5 creates, 4 + 1 + 1 status changes at least, 2 checks.
    assert!(writes >= 13.0, "{}", s.text);
    assert_eq!(
        s.sum("flashcall_store_commit_failures_total", &[]),
        0.0,
        "{}",
        s.text
    );
    // Registered at 0 from the start; a few calls overflow no queue.
    s.assert_family("flashcall_sip_receive_drops_total", "counter", &[]);
    assert_eq!(
        s.sum("flashcall_sip_receive_drops_total", &[]),
        0.0,
        "{}",
        s.text
    );
    assert_eq!(
        s.sum("flashcall_limiter_tracked_phones", &[]),
        5.0,
        "{}",
        s.text
    );
    for (name, ty, labels) in SPEC {
        s.assert_family(name, ty, labels);
    }

    // (c) values that add up.
    let calls = |o: &str| {
        s.sum(
            "flashcall_calls_total",
            &[("trunk", "sandbox"), ("outcome", o)],
        )
    };
    assert_eq!(calls("delivered"), 4.0, "{}", s.text);
    assert_eq!(calls("busy"), 1.0, "{}", s.text);
    assert_eq!(s.sum("flashcall_calls_total", &[]), 5.0, "{}", s.text);
    assert_eq!(s.sum("flashcall_calls_in_flight", &[]), 0.0);
    let sip = |code: &str| {
        s.sum(
            "flashcall_sip_responses_total",
            &[("trunk", "sandbox"), ("code", code)],
        )
    };
    assert_eq!(sip("486"), 1.0, "{}", s.text);
    assert_eq!(sip("487"), 4.0, "{}", s.text);
    assert!(sip("180") >= 4.0, "{}", s.text);
    // Four calls rang and were cancelled; the busy one never rang.
    assert_eq!(
        s.sum("flashcall_post_dial_delay_seconds_count", &[]),
        4.0,
        "{}",
        s.text
    );
    assert_eq!(
        s.sum("flashcall_cancel_delay_seconds_count", &[]),
        4.0,
        "{}",
        s.text
    );
    let ver = |p: &str, st: &str| {
        s.sum(
            "flashcall_verifications_total",
            &[("project", p), ("status", st)],
        )
    };
    assert_eq!(ver("shop", "pending"), 4.0, "{}", s.text);
    assert_eq!(ver("shop", "calling"), 4.0, "{}", s.text);
    assert_eq!(ver("shop", "delivered"), 3.0, "{}", s.text);
    assert_eq!(ver("shop", "failed"), 1.0, "{}", s.text);
    assert_eq!(ver("shop", "verified"), 1.0, "{}", s.text);
    assert_eq!(ver("tiny", "pending"), 1.0, "{}", s.text);
    assert_eq!(ver("tiny", "delivered"), 1.0, "{}", s.text);
    assert_eq!(ver("other", "pending"), 0.0, "{}", s.text);
    assert_eq!(
        s.sum("flashcall_checks_total", &[("result", "wrong_code")]),
        1.0
    );
    assert_eq!(
        s.sum("flashcall_checks_total", &[("result", "verified")]),
        1.0
    );
    assert_eq!(s.sum("flashcall_checks_total", &[]), 2.0);
    assert_eq!(
        s.sum("flashcall_rate_limited_total", &[("scope", "project")]),
        1.0
    );
    assert_eq!(s.sum("flashcall_rate_limited_total", &[]), 1.0);
    assert_eq!(s.sum("flashcall_pool_numbers", &[]), POOL_SIZE);
    assert!(
        (s.sum("flashcall_pool_suffix_coverage_ratio", &[]) - POOL_COVERAGE).abs() < 1e-9,
        "{}",
        s.text
    );
    let http = |route: &str, status: &str| {
        s.sum(
            "flashcall_http_requests_total",
            &[("route", route), ("status", status)],
        )
    };
    assert_eq!(http("/v1/verifications", "201"), 5.0, "{}", s.text);
    assert_eq!(http("/v1/verifications", "429"), 1.0, "{}", s.text);
    assert_eq!(
        http("/v1/verifications/{id}/check", "200"),
        2.0,
        "{}",
        s.text
    );
    assert!(http("/v1/verifications/{id}", "200") >= 5.0, "{}", s.text);
    assert_eq!(http("/v1/verifications/{id}", "404"), 0.0, "{}", s.text);
    assert_eq!(
        s.sum(
            "flashcall_http_request_duration_seconds_count",
            &[("route", "/v1/verifications")]
        ),
        6.0,
        "{}",
        s.text
    );

    // (d) no phone number or ID in any label value.
    for sample in &s.samples {
        for (k, v) in &sample.labels {
            let mut run = 0;
            let mut longest = 0;
            for b in v.bytes() {
                run = if b.is_ascii_digit() { run + 1 } else { 0 };
                longest = longest.max(run);
            }
            assert!(
                longest < 7,
                "label {k}={v:?} looks like a phone number: {sample:?}"
            );
            for id in &ids {
                assert!(
                    !v.contains(id.as_str()),
                    "label {k}={v:?} holds an ID: {sample:?}"
                );
            }
        }
    }

    // (e) a garbage datagram to the SIP port is a counted parse error.
    let before = s.sum("flashcall_sip_parse_errors_total", &[]);
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.send_to(b"\x00\x01garbage, not SIP at all\r\n\r\n", e.sip)
        .unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    let mut after = before;
    for _ in 0..100 {
        after = Scrape::parse(e.metrics_text()).sum("flashcall_sip_parse_errors_total", &[]);
        if after > before || Instant::now() >= end {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(after, before + 1.0, "flashcall_sip_parse_errors_total");
    // And the text still passes the real parsers.
    scrape(&e);
}
