//! Restart safety (issue 4): drive creates at a real `flashcall serve`,
//! kill -9 it mid-load, restart on the same database. Every id that got a
//! 201 is there, closed with a legal status (a call in flight when the
//! process died is `failed` with outcome `interrupted`), still checkable
//! with its code; the database passes SQLite's integrity check and holds
//! no half-written change (every status change has its webhook event).

mod support;

use serde_json::{json, Value};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{config, test_dir, Engine};

const HOOKED: (&str, &str) = ("hooked", "hooked-secret");

/// One create as the `hooked` project; `Err` when the connection failed
/// (the process is gone), so the load threads survive the kill.
fn create(
    agent: &ureq::Agent,
    http: SocketAddr,
    phone: &str,
    code: &str,
) -> Result<(u16, String), String> {
    use base64::Engine as _;
    let token =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", HOOKED.0, HOOKED.1));
    let body = json!({"phone": phone, "sender": "HOOK", "code": code}).to_string();
    let mut resp = agent
        .post(&format!("http://{http}/v1/verifications"))
        .header("authorization", &format!("Basic {token}"))
        .header("content-type", "application/json")
        .send(body.as_bytes())
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| e.to_string())?;
    Ok((status, text))
}

#[test]
fn kill_9_mid_load_loses_no_acknowledged_verification() {
    let dir = test_dir("crash");
    // The sandbox rings only after 60 s, so calls stay `calling`; at 200
    // CPS many verifications are still `pending` in the queue at the kill.
    let sandbox = "[sandbox]\nenabled = true\nring_delay_ms = 60000\ncps = 200\n";
    let extra = r#"
[[projects]]
login = "hooked"
secret = "hooked-secret"
rate = 100000
burst = 100000
webhook_url = "http://127.0.0.1:9/hook"
webhook_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
senders = [{ code = "HOOK", status = "active" }]
[limits.per_phone]
max = 1000
per_secs = 1
"#;
    let cfg = config(&dir, "+44770090XXXX\n", sandbox, extra);
    let engine = Engine::start(&cfg);
    let http = engine.http;

    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let counter = Arc::new(AtomicU32::new(0));
    let hard_stop = Instant::now() + Duration::from_secs(20);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let acked = acked.clone();
            let counter = counter.clone();
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(5)))
                    .build()
                    .into();
                let mut refused = 0u32;
                while Instant::now() < hard_stop {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let phone = format!("+447700900{:03}", n % 1000);
                    let code = format!("{:04}", n % 10_000);
                    match create(&agent, http, &phone, &code) {
                        Ok((201, body)) => {
                            let v: Value = serde_json::from_str(&body).expect("201 body is JSON");
                            let id = v["id"].as_str().expect("id").to_string();
                            acked.lock().unwrap().push((id, code));
                        }
                        Ok((_, _)) => {}
                        Err(_) => {
                            // Connection refused or reset: the engine is gone.
                            refused += 1;
                            if refused >= 3 {
                                return;
                            }
                        }
                    }
                }
            })
        })
        .collect();

    std::thread::sleep(Duration::from_millis(1_500));
    let before_kill = acked.lock().unwrap().len();
    // Drop sends SIGKILL (Child::kill) and reaps the process.
    drop(engine);
    for t in threads {
        t.join().expect("load thread");
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        before_kill >= 20,
        "load too light: {before_kill} creates before the kill"
    );
    assert!(
        acked.len() >= before_kill,
        "{} acked, {before_kill} before the kill",
        acked.len()
    );

    // Restart on the same database.
    let engine = Engine::start(&cfg);
    let log = engine.log_text();
    assert!(
        log.contains("interrupted"),
        "startup says it closed calls:\n{log}"
    );
    let mut interrupted_calls = 0;
    for (id, _) in &acked {
        let r = engine.request(
            "GET",
            &format!("/v1/verifications/{id}"),
            Some(HOOKED),
            &[],
            None,
        );
        assert_eq!(r.status, 200, "acknowledged {id} lost: {}", r.body);
        let v = r.json();
        // Every one was pending or calling at the kill: closed as failed.
        assert_eq!(v["status"], "failed", "{v}");
        if !v["call"].is_null() {
            assert_eq!(v["call"]["outcome"], "interrupted", "{v}");
            interrupted_calls += 1;
        }
    }
    assert!(
        interrupted_calls > 0,
        "some calls were in flight at the kill"
    );
    eprintln!(
        "{} acknowledged before the kill, all back; {interrupted_calls} calls interrupted",
        acked.len()
    );

    // Still checkable: a wrong code spends an attempt, the right one
    // verifies (and that survives another restart).
    for (i, (id, code)) in acked.iter().enumerate() {
        if i % 10 == 0 {
            let wrong = if code == "0000" { "1111" } else { "0000" };
            let r = engine.post_as(
                HOOKED,
                &format!("/v1/verifications/{id}/check"),
                &json!({ "code": wrong }),
                &[],
            );
            assert_eq!(r.status, 200, "{}", r.body);
            assert_eq!(r.json()["verified"], false);
        }
        let r = engine.post_as(
            HOOKED,
            &format!("/v1/verifications/{id}/check"),
            &json!({ "code": code }),
            &[],
        );
        assert_eq!(r.status, 200, "check {id}: {}", r.body);
        assert_eq!(r.json()["verified"], true, "{}", r.body);
    }
    drop(engine);

    // The file itself: intact, and every change with its event.
    let db = rusqlite::Connection::open(dir.join("flashcall.db")).expect("open db");
    let check: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    assert_eq!(check, "ok");
    let ids: HashSet<String> = {
        let mut stmt = db.prepare("SELECT id FROM verifications").unwrap();
        let rows = stmt.query_map([], |r| r.get(0)).unwrap();
        rows.collect::<Result<_, _>>().unwrap()
    };
    for (id, _) in &acked {
        assert!(ids.contains(id), "{id} not in the database");
    }
    let count = |sql: &str| -> i64 { db.query_row(sql, [], |r| r.get(0)).expect(sql) };
    assert_eq!(
        count("SELECT count(*) FROM verifications WHERE status = 'verified'"),
        acked.len() as i64
    );
    // Rows created but never acknowledged (killed between commit and
    // answer) may exist; each has its pending event all the same.
    for t in ["pending", "failed", "verified"] {
        let events = count(&format!(
            "SELECT count(DISTINCT verification_id) FROM webhook_outbox \
             WHERE payload LIKE '%\"verification.{t}\"%'"
        ));
        let expected = if t == "verified" {
            acked.len() as i64
        } else {
            ids.len() as i64
        };
        assert_eq!(events, expected, "verifications with a {t} event");
    }
    assert_eq!(
        count("SELECT count(*) FROM call_attempts a LEFT JOIN verifications v ON v.id = a.verification_id WHERE v.id IS NULL"),
        0,
        "no call attempt without its verification"
    );
    assert_eq!(
        count("SELECT count(*) FROM checks WHERE result = 'verified'"),
        acked.len() as i64
    );
}

/// A database serve must not touch: one `error:` line naming the file,
/// exit 2, before anything listens.
#[test]
fn serve_refuses_a_garbage_or_newer_database() {
    for (name, expect) in [("garbage", "not a SQLite database"), ("newer", "newer")] {
        let dir = test_dir(&format!("crash-refuse-{name}"));
        let cfg = config(&dir, "+44770090XXXX\n", support::SANDBOX, "");
        let db = dir.join("flashcall.db");
        if name == "garbage" {
            std::fs::write(&db, "not a database\n".repeat(100)).unwrap();
        } else {
            let c = rusqlite::Connection::open(&db).unwrap();
            c.pragma_update(None, "user_version", 999).unwrap();
        }
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_flashcall"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .output()
            .expect("run serve");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(
            errors[0].contains(&db.display().to_string()) && errors[0].contains(expect),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
