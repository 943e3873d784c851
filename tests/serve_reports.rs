//! `GET /v1/stats` and `GET /v1/reports/verifications.csv` (SPEC §7)
//! through a real `flashcall serve` process on the sandbox callee: real
//! calls end with real outcomes, then the CSV is parsed by a real CSV
//! parser (the `csv` crate, and Python's `csv` module when python3 is
//! there) and the statistics must add up to its rows.

mod support;

use serde_json::{json, Value};
use std::collections::BTreeMap;
use support::{config, id_of, test_dir, Engine, Resp, LOGIN, SANDBOX};

const POOL: &str = "+44770090XXXX\n";
const OTHER: (&str, &str) = ("other", "other-secret");
const CSV: &str = "/v1/reports/verifications.csv";

const HEADER: [&str; 17] = [
    "id",
    "created_at",
    "status",
    "phone",
    "sender",
    "reference",
    "caller",
    "code_length",
    "attempts_left",
    "expires_at",
    "call_outcome",
    "sip_code",
    "trunk",
    "invited_at",
    "ringing_at",
    "ended_at",
    "post_dial_delay_ms",
];

fn engine(name: &str) -> Engine {
    let dir = test_dir(&format!("reports-{name}"));
    Engine::start(&config(&dir, POOL, SANDBOX, ""))
}

fn get_as(e: &Engine, auth: (&str, &str), path: &str) -> Resp {
    e.request("GET", path, Some(auth), &[], None)
}

/// The CSV as header + rows, by the `csv` crate (RFC 4180, strict about
/// field counts).
fn parse_csv(body: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut r = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(body.as_bytes());
    let header: Vec<String> = r
        .headers()
        .expect("CSV header")
        .iter()
        .map(str::to_owned)
        .collect();
    let rows = r
        .records()
        .map(|rec| rec.expect("CSV record").iter().map(str::to_owned).collect())
        .collect();
    (header, rows)
}

/// The same rows read by Python's csv module, when python3 is installed:
/// a parser we did not pick the options of.
fn python_rows(body: &str) -> Option<Vec<Vec<String>>> {
    use std::io::Write;
    let mut child = std::process::Command::new("python3")
        .args([
            "-c",
            "import csv,io,json,sys; \
             print(json.dumps(list(csv.reader(io.StringIO(sys.stdin.read(), newline='')))))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write to python");
    let out = child.wait_with_output().expect("python3");
    assert!(out.status.success(), "python csv failed");
    Some(serde_json::from_slice(&out.stdout).expect("python JSON"))
}

fn ms(v: &Value) -> i64 {
    let s = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{s}: {e}"));
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// A JSON value as the CSV renders it: null is an empty field.
fn field(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[test]
fn csv_rows_match_get_and_stats_add_up() {
    let e = engine("csv-stats");
    let busy = e.create(json!({
        "phone": "+447700900486", "sender": "SHOP", "reference": "order 1, aisle 2"
    }));
    let answered = e.create(json!({
        "phone": "+447700900200", "sender": "SHOP", "reference": "say \"hi\""
    }));
    let verified = e.create(json!({
        "phone": "+447700900123", "sender": "SHOP", "code": "4321",
        "reference": "line one\nline two, \"quoted\""
    }));
    let plain = e.create(json!({"phone": "+447700900124", "sender": "SHOP"}));
    let theirs = e
        .post_as(
            OTHER,
            "/v1/verifications",
            &json!({"phone": "+447700900125", "sender": "OTHER"}),
            &[],
        )
        .json();
    let ours: Vec<String> = [&busy, &answered, &verified, &plain]
        .iter()
        .map(|v| id_of(v))
        .collect();
    for id in &ours {
        e.wait_call_done(id);
    }
    let vid = id_of(&verified);
    let r = e.post(
        &format!("/v1/verifications/{vid}/check"),
        &json!({"code": "4321"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["status"], "verified");

    // ---- the CSV
    let r = e.get(CSV);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.content_type, "text/csv; charset=utf-8");
    let cd = r
        .header("content-disposition")
        .expect("content-disposition");
    assert!(
        cd.starts_with("attachment; filename=\"verifications-") && cd.ends_with(".csv\""),
        "{cd}"
    );
    let (header, rows) = parse_csv(&r.body);
    assert_eq!(header, HEADER);
    assert_eq!(
        rows.len(),
        ours.len(),
        "one row per verification:\n{}",
        r.body
    );
    let col = |name: &str| HEADER.iter().position(|h| *h == name).expect(name);
    // Oldest first (creates within one millisecond in id order), and
    // exactly our verifications.
    let keys: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r[col("created_at")].as_str(), r[col("id")].as_str()))
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "rows oldest first");
    let mut row_ids: Vec<&str> = keys.iter().map(|k| k.1).collect();
    row_ids.sort();
    let mut want: Vec<&str> = ours.iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(row_ids, want);
    for row in &rows {
        let g = e
            .get(&format!("/v1/verifications/{}", row[col("id")]))
            .json();
        let c = &g["call"];
        let expect = [
            ("created_at", field(&g["created_at"])),
            ("status", field(&g["status"])),
            ("phone", field(&g["phone"])),
            ("sender", field(&g["sender"])),
            ("reference", field(&g["reference"])),
            ("caller", field(&c["caller"])),
            ("code_length", field(&g["code_length"])),
            ("attempts_left", field(&g["attempts_left"])),
            ("expires_at", field(&g["expires_at"])),
            ("call_outcome", field(&c["outcome"])),
            ("sip_code", field(&c["sip_code"])),
            ("trunk", field(&c["trunk"])),
            ("invited_at", field(&c["invited_at"])),
            ("ringing_at", field(&c["ringing_at"])),
            ("ended_at", field(&c["ended_at"])),
        ];
        for (name, want) in expect {
            assert_eq!(row[col(name)], want, "{name} of {g}");
        }
        let pdd = if c["ringing_at"].is_null() {
            String::new()
        } else {
            (ms(&c["ringing_at"]) - ms(&c["invited_at"])).to_string()
        };
        assert_eq!(row[col("post_dial_delay_ms")], pdd, "{g}");
    }
    let by_id: BTreeMap<&str, &Vec<String>> =
        rows.iter().map(|r| (r[col("id")].as_str(), r)).collect();
    // Quoted fields round-trip: commas, quotes, a line break.
    assert_eq!(
        by_id[id_of(&busy).as_str()][col("reference")],
        "order 1, aisle 2"
    );
    assert_eq!(
        by_id[id_of(&answered).as_str()][col("reference")],
        "say \"hi\""
    );
    assert_eq!(
        by_id[vid.as_str()][col("reference")],
        "line one\nline two, \"quoted\""
    );
    assert_eq!(by_id[id_of(&busy).as_str()][col("call_outcome")], "busy");
    assert_eq!(by_id[id_of(&busy).as_str()][col("sip_code")], "486");
    assert_eq!(
        by_id[id_of(&answered).as_str()][col("call_outcome")],
        "answered"
    );
    assert_eq!(by_id[vid.as_str()][col("status")], "verified");
    assert!(r.body.contains("\r\n"), "RFC 4180 line breaks are CRLF");
    if let Some(py) = python_rows(&r.body) {
        assert_eq!(py[0], HEADER);
        assert_eq!(&py[1..], &rows[..], "Python's csv reads the same rows");
    }

    // ---- the statistics add up to the rows
    let mut status_counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut outcome_counts: BTreeMap<String, u64> = BTreeMap::new();
    for row in &rows {
        *status_counts.entry(row[col("status")].clone()).or_default() += 1;
        if !row[col("call_outcome")].is_empty() {
            *outcome_counts
                .entry(row[col("call_outcome")].clone())
                .or_default() += 1;
        }
    }
    // Every parameter empty, as a filled-in URL template sends them: the
    // defaults, the same as none.
    for q in [
        "",
        "?from=&to=&group_by=&sender=",
        "?group_by=day",
        "?group_by=month",
        "?sender=SHOP",
    ] {
        let r = e.get(&format!("/v1/stats{q}"));
        assert_eq!(r.status, 200, "{q}: {}", r.body);
        assert_eq!(r.content_type, "application/json");
        let s = r.json();
        let t = &s["totals"];
        assert_eq!(t["total"], rows.len(), "{q}: {s}");
        for (k, n) in t["by_status"].as_object().expect("by_status") {
            assert_eq!(
                n.as_u64(),
                Some(status_counts.get(k).copied().unwrap_or(0)),
                "{q}: status {k} in {s}"
            );
        }
        assert_eq!(t["by_status"].as_object().map(|o| o.len()), Some(7));
        for (k, n) in t["by_outcome"].as_object().expect("by_outcome") {
            assert_eq!(
                n.as_u64(),
                Some(outcome_counts.get(k).copied().unwrap_or(0)),
                "{q}: outcome {k} in {s}"
            );
        }
        // The ten SIP outcomes and `interrupted` (closed by a restart).
        assert_eq!(t["by_outcome"].as_object().map(|o| o.len()), Some(11));
        let with_outcome: u64 = outcome_counts.values().sum();
        let delivered = outcome_counts.get("delivered").copied().unwrap_or(0);
        assert_eq!(
            t["delivery_rate"].as_f64(),
            Some(delivered as f64 / with_outcome as f64),
            "{s}"
        );
        assert_eq!(t["verification_rate"].as_f64(), Some(0.25), "{s}");
        assert!(t["median_post_dial_delay_ms"].is_u64(), "{s}");
        // Periods sum to the totals, key by key.
        let periods = s["periods"].as_array().expect("periods");
        assert!(!periods.is_empty());
        let sum = |f: &dyn Fn(&Value) -> &Value| -> u64 {
            periods.iter().map(|p| f(p).as_u64().unwrap_or(0)).sum()
        };
        assert_eq!(sum(&|p| &p["total"]), rows.len() as u64, "{s}");
        for k in status_counts.keys() {
            assert_eq!(
                sum(&|p| &p["by_status"][k]),
                t["by_status"][k].as_u64().unwrap_or(0),
                "{k}"
            );
        }
        for k in outcome_counts.keys() {
            assert_eq!(
                sum(&|p| &p["by_outcome"][k]),
                t["by_outcome"][k].as_u64().unwrap_or(0),
                "{k}"
            );
        }
        let month = q.contains("month");
        assert_eq!(s["group_by"], if month { "month" } else { "day" });
        for p in periods {
            let len = p["period"].as_str().map(str::len);
            assert_eq!(len, Some(if month { 7 } else { 10 }), "{p}");
        }
    }
    // A sender the project does not use: nothing, rates null.
    let s = e.get("/v1/stats?sender=NOPE").json();
    assert_eq!(s["totals"]["total"], 0, "{s}");
    assert!(s["totals"]["delivery_rate"].is_null(), "{s}");
    assert_eq!(s["sender"], "NOPE");
    let (_, none) = parse_csv(&e.get(&format!("{CSV}?sender=NOPE")).body);
    assert!(none.is_empty());
    // Explicit dates around today (UTC), `to` exclusive.
    let today = time::OffsetDateTime::now_utc().date();
    let (from, to) = (
        today.previous_day().expect("date"),
        today.next_day().and_then(|d| d.next_day()).expect("date"),
    );
    let s = e.get(&format!("/v1/stats?from={from}&to={to}")).json();
    assert_eq!(s["totals"]["total"], rows.len(), "{s}");
    assert_eq!(s["periods"].as_array().map(Vec::len), Some(3), "{s}");
    let (_, dated) = parse_csv(&e.get(&format!("{CSV}?from={from}&to={to}")).body);
    assert_eq!(dated.len(), rows.len());
    let (_, empty) = parse_csv(&e.get(&format!("{CSV}?from=&to=&sender=")).body);
    assert_eq!(empty.len(), rows.len(), "empty parameters are the defaults");
    // A range that ends before the verifications: none.
    let before = from - time::Duration::days(10);
    let s = e.get(&format!("/v1/stats?from={before}&to={from}")).json();
    assert_eq!(s["totals"]["total"], 0, "{s}");

    // ---- another project sees only its own
    let r = get_as(&e, OTHER, CSV);
    assert_eq!(r.status, 200);
    let (_, rows) = parse_csv(&r.body);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0][0], id_of(&theirs));
    let s = get_as(&e, OTHER, "/v1/stats").json();
    assert_eq!(s["totals"]["total"], 1, "{s}");
}

#[test]
fn bad_parameters_are_400_and_no_auth_is_401() {
    let e = engine("bad-params");
    let bad = [
        "from=2026-11-25&to=2026-11-25",
        "from=2026-11-26&to=2026-11-25",
        "from=2024-01-01&to=2025-01-02",
        "from=yesterday",
        "to=2026-13-01",
        "from=2026-11-25T00:00:00",
    ];
    for path in ["/v1/stats", CSV] {
        for q in bad {
            e.get(&format!("{path}?{q}"))
                .assert_problem(400, "invalid_request");
        }
        let r = e.request("GET", path, None, &[], None);
        r.assert_problem(401, "unauthorized");
        let r = e.request("GET", path, Some((LOGIN, "wrong")), &[], None);
        r.assert_problem(401, "unauthorized");
    }
    for g in ["week", "DAY", "%20"] {
        e.get(&format!("/v1/stats?group_by={g}"))
            .assert_problem(400, "invalid_request");
    }
    // A full leap year is allowed.
    let r = e.get("/v1/stats?from=2024-01-01&to=2025-01-01&group_by=month");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["periods"].as_array().map(Vec::len), Some(12));
    // Offsets are converted to UTC in the answer.
    let r = e.get("/v1/stats?from=2026-11-25T01:00:00%2B01:00&to=2026-11-26");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["from"], "2026-11-25T00:00:00.000Z");
}
