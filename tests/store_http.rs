//! The API on a SQLite store that cannot write (read-only or full disk):
//! creates and checks answer 503 problem+json, never 201 or 200 for
//! something not stored. In-process (router + tower), no socket.

use axum::body::Body;
use axum::http::Request;
use flashcall::config::Config;
use flashcall::engine::{EngineShared, Trunk};
use flashcall::http::{router, AppState};
use flashcall::pool::Pool;
use flashcall::store::sqlite::{Fault, SqliteStore};
use flashcall::store::Store;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use tower::ServiceExt;

const CONFIG: &str = r#"
[sandbox]
enabled = true
[[projects]]
login = "t"
secret = "s"
senders = [{ code = "T", status = "active" }]
"#;
// base64("t:s")
const AUTH: &str = "Basic dDpz";
/// One send per phone per 10 minutes: the second create is refused.
const ONE_SEND_PER_PHONE: &str = "[limits.per_phone]\nmax = 1\nper_secs = 600\n";
/// The 429's detail when the destination's own limit refused a create
/// (not the project's request rate).
const PHONE_LIMITED: &str = "limit reached for sends to this phone number";

fn request(method: &str, path: &str, body: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .header("authorization", AUTH)
        .body(Body::from(body.to_string()))
        .expect("request")
}

/// A create of `body`.
fn post(body: &str) -> Request<Body> {
    request("POST", "/v1/verifications", body)
}

async fn call(app: &axum::Router, method: &str, path: &str, body: &str) -> (u16, String) {
    let req = request(method, path, body);
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status().as_u16();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// The API on a fresh SQLite store in the target's scratch dir `name`,
/// with one trunk whose queue nothing drains (no SIP driver runs).
fn api_on_sqlite(name: &str) -> (Arc<SqliteStore>, Arc<EngineShared>, axum::Router) {
    api_on_sqlite_with(name, "")
}

/// [`api_on_sqlite`] with `extra` appended to the config.
fn api_on_sqlite_with(
    name: &str,
    extra: &str,
) -> (Arc<SqliteStore>, Arc<EngineShared>, axum::Router) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = Config::parse(&format!("{CONFIG}\n{extra}"), Path::new("t.toml"), |_| None)
        .expect("config");
    let engine = Arc::new(EngineShared::new(vec![Trunk {
        name: "t".into(),
        addr: "127.0.0.1:5070".parse().expect("literal"),
        host: "127.0.0.1:5070".into(),
        cps: 1_000,
        queue_cap: 1_000,
        weight: 1,
        credentials: None,
        caller_id: Default::default(),
    }]));
    let sqlite = Arc::new(SqliteStore::open(&dir.join("t.db"), HashSet::new()).expect("open"));
    let store: Arc<dyn Store> = sqlite.clone();
    let pool = Pool::parse("+44770090XXXX\n", 4, "t", &mut StdRng::seed_from_u64(1)).expect("pool");
    let app = router(Arc::new(AppState::new(&cfg, pool, store, engine.clone())));
    (sqlite, engine, app)
}

/// A second connection to the store `name` holding its write lock: the
/// writer's commits wait (its busy timeout is 5 s, then they fail) until
/// the returned connection rolls back.
fn hold_write_lock(name: &str) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(
        Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(name)
            .join("t.db"),
    )
    .expect("second connection");
    c.execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    c
}

#[tokio::test]
async fn unwritable_store_answers_503_never_201() {
    // The engine's recorder, before the store's writer takes its metric
    // handles. Global to this binary: the other test's store may count
    // into it too, which only adds commits (never failures).
    let prom = flashcall::metrics::install().expect("recorder");
    let (sqlite, _engine, app) = api_on_sqlite("store-http-503");

    let (s, body) = call(
        &app,
        "POST",
        "/v1/verifications",
        r#"{"phone":"+447911123456","sender":"T","code":"1234"}"#,
    )
    .await;
    assert_eq!(s, 201, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    for fault in [Fault::ReadOnly, Fault::Full] {
        sqlite.inject_fault(fault).expect("fault");
        let before = sqlite.len();
        // Full needs the free pages used up first: a few creates may still
        // fit. Every answer is a 201 that is readable, or a 503.
        let mut saw_503 = false;
        for i in 0..2_000 {
            let body = format!(r#"{{"phone":"+44791112{i:04}","sender":"T"}}"#);
            let (s, resp) = call(&app, "POST", "/v1/verifications", &body).await;
            match s {
                201 => {
                    let id = serde_json::from_str::<serde_json::Value>(&resp).unwrap()["id"]
                        .as_str()
                        .unwrap()
                        .to_string();
                    assert!(sqlite.get(&id).unwrap().is_some());
                }
                503 => {
                    let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
                    assert_eq!(v["type"], "overloaded", "{resp}");
                    saw_503 = true;
                    break;
                }
                _ => panic!("{s} {resp}"),
            }
        }
        assert!(saw_503, "{fault:?}: a create must fail");
        assert!(sqlite.len() >= before);
    }
    // Each fault's failed commits are counted; the commits that worked
    // (the first create, and any that fitted before the disk was full)
    // are timed.
    let text = prom.render();
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert!(
        value("flashcall_store_commit_failures_total") >= 2.0,
        "{text}"
    );
    assert!(
        value("flashcall_store_commit_seconds_count") >= 1.0,
        "{text}"
    );
    // A check cannot be made durable either: 503, not a `verified`.
    let (s, resp) = call(
        &app,
        "POST",
        &format!("/v1/verifications/{id}/check"),
        r#"{"code":"1234"}"#,
    )
    .await;
    assert_eq!(s, 503, "{resp}");
}

/// A create refused 503 because its record could not be stored used
/// none of the destination's allowance: with one send per phone per 10
/// minutes, the same phone's create once the disk is back is a 201, and
/// the one after it a 429 (the limit itself still holds). Before session
/// 13 the failed create had counted the send and the retry got 429.
#[tokio::test]
async fn a_create_the_store_refused_gives_its_per_phone_send_back() {
    let (sqlite, _engine, app) = api_on_sqlite_with("store-http-refund", ONE_SEND_PER_PHONE);
    let create = r#"{"phone":"+447911123456","sender":"T"}"#;
    // Read-only: every write fails (a full disk fails the same way, see
    // above, but needs hundreds of creates first, past the project's rate).
    sqlite.inject_fault(Fault::ReadOnly).expect("fault");
    for _ in 0..3 {
        let (s, resp) = call(&app, "POST", "/v1/verifications", create).await;
        assert_eq!(s, 503, "{resp}");
    }
    sqlite.inject_fault(Fault::Healed).expect("heal");
    let (s, resp) = call(&app, "POST", "/v1/verifications", create).await;
    assert_eq!(s, 201, "{resp}");
    let (s, resp) = call(&app, "POST", "/v1/verifications", create).await;
    assert_eq!(s, 429, "{resp}");
    assert!(resp.contains(PHONE_LIMITED), "{resp}");
}

/// The same refund on the other path: a create whose client hung up while
/// its insert waited (hyper drops the handler), and whose insert then
/// failed. Nobody heard a 503, nothing was stored and no call went out, so
/// the phone's send comes back here too: once the disk is back the same
/// phone gets its 201, and the limit still holds after it.
#[tokio::test]
async fn a_dropped_create_the_store_refused_gives_its_per_phone_send_back() {
    use futures_util::FutureExt;
    let (sqlite, engine, app) = api_on_sqlite_with("store-http-drop-refund", ONE_SEND_PER_PHONE);
    let create = r#"{"phone":"+447911123457","sender":"T"}"#;
    // Another connection holds the write lock, so the writer cannot finish
    // the insert inside the poll below (on a busy machine the woken writer
    // may preempt this thread, and a read-only store fails at once): the
    // insert waits out the writer's 5 s busy timeout and fails.
    let blocker = hold_write_lock("store-http-drop-refund");
    // One poll runs the handler up to its wait for the commit; then the
    // request is dropped, as hyper does for a client that left.
    assert!(
        app.clone().oneshot(post(create)).now_or_never().is_none(),
        "the request was dropped while its insert waited"
    );
    // Read-only from the writer's next batch on: queued behind the dropped
    // insert, so this returns once that insert failed (on the lock, or
    // read-only if both came in one batch), and it cannot commit when the
    // lock is let go. In one batch with it, the fault is applied first
    // and its answer is that batch's failed commit: an Err here too.
    let _ = sqlite.inject_fault(Fault::ReadOnly);
    blocker
        .execute_batch("ROLLBACK")
        .expect("release the write lock");
    sqlite.inject_fault(Fault::Healed).expect("heal");
    // The dropped create's task hears of the failure when this runtime
    // next runs it; until it has, the phone is still at its limit (a 429
    // uses nothing up). Without the refund every try is a 429.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut last = (0, String::new());
    while std::time::Instant::now() < deadline {
        last = call(&app, "POST", "/v1/verifications", create).await;
        if last.0 != 429 {
            break;
        }
        // Slow enough to stay under the project's request rate.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(last.0, 201, "{}", last.1);
    let (s, resp) = call(&app, "POST", "/v1/verifications", create).await;
    assert_eq!(s, 429, "{resp}");
    assert!(resp.contains(PHONE_LIMITED), "{resp}");
    // Only the 201's call went out: the dropped create stored nothing.
    let mut sent = Vec::new();
    engine.take_submitted(&mut sent);
    assert_eq!(sent.len(), 1, "one call, for the stored create");
    assert_eq!(sqlite.len(), 1, "one record: the dropped create left none");
}

/// A create whose request is dropped while its insert waits for the
/// commit (hyper drops the handler when the client hangs up or times out)
/// still sends its call once the record is stored: every stored
/// verification gets its call, none is left `pending` without one.
#[tokio::test]
async fn a_create_dropped_before_its_commit_still_sends_its_call() {
    use futures_util::FutureExt;
    let (sqlite, engine, app) = api_on_sqlite("store-http-dropped");
    // Another connection holds the database's write lock while the
    // requests are polled, so no commit can finish inside a poll: without
    // it, on a busy machine the woken writer could preempt the test's
    // thread and commit before the handler's first poll looked, and no
    // request was dropped mid-wait (4 runs in 20 with both cores loaded).
    // The writer waits for the lock (its busy timeout is 5 s).
    let blocker = hold_write_lock("store-http-dropped");

    const N: usize = 20;
    // Every request carries an Idempotency-Key, as a client that retries
    // after a timeout would send.
    let request = |i: usize| {
        Request::builder()
            .method("POST")
            .uri("/v1/verifications")
            .header("content-type", "application/json")
            .header("authorization", AUTH)
            .header("idempotency-key", format!("k{i}"))
            .body(Body::from(format!(
                r#"{{"phone":"+44791113{i:04}","sender":"T"}}"#
            )))
            .expect("request")
    };
    let mut dropped = Vec::new();
    for i in 0..N {
        // One poll runs the handler up to its wait for the commit; then
        // the request is dropped, as hyper does for a client that left.
        match app.clone().oneshot(request(i)).now_or_never() {
            None => dropped.push(i),
            Some(resp) => assert_eq!(resp.expect("infallible").status(), 201),
        }
    }
    // No commit could finish: every request was dropped mid-wait.
    assert_eq!(
        dropped.len(),
        N,
        "every request was dropped before its commit"
    );
    // The retry of a dropped one, at once: the dropped create's task has
    // not run yet (this runtime has one thread and the test has not
    // yielded), so its key is still in flight: 409, not a second
    // verification.
    let i = dropped[dropped.len() - 1];
    let resp = app.clone().oneshot(request(i)).await.expect("infallible");
    assert_eq!(resp.status(), 409, "retry while the dropped create waits");
    blocker
        .execute_batch("ROLLBACK")
        .expect("release the write lock");

    let mut sent = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while sent.len() < N && std::time::Instant::now() < deadline {
        let mut out = Vec::new();
        engine.take_submitted(&mut out);
        sent.extend(out);
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let mut stored = Vec::new();
    sqlite
        .scan("t", 0, i64::MAX, &mut |v| {
            stored.push(v.id.clone());
            true
        })
        .expect("scan");
    let mut called: Vec<String> = sent.iter().map(|c| c.id.clone()).collect();
    called.sort();
    stored.sort();
    assert_eq!(stored.len(), N, "every create was stored");
    assert_eq!(
        called,
        stored,
        "{} dropped: each stored verification gets its call",
        dropped.len()
    );
    // Each call holds its place in the trunk's queue until the driver
    // takes it (none runs here).
    assert_eq!(engine.queued(0), N);
    // Once it is stored, the same retry is the replay of the dropped
    // create: its id, and still no second verification.
    let resp = app.clone().oneshot(request(i)).await.expect("infallible");
    assert_eq!(resp.status(), 201);
    assert!(resp.headers().contains_key("idempotent-replayed"));
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    let replayed: serde_json::Value = serde_json::from_slice(&body).expect("json");
    let id = replayed["id"].as_str().expect("id").to_string();
    assert!(
        stored.contains(&id),
        "the replay names a stored verification"
    );
    let mut count = 0;
    sqlite
        .scan("t", 0, i64::MAX, &mut |_| {
            count += 1;
            true
        })
        .expect("scan");
    assert_eq!(count, N, "no second verification");
}

/// What the handlers on this test's thread log, as text.
#[derive(Clone, Default)]
struct Log(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log")).into_owned()
    }
}

/// During a write outage a keyed retry of a stored create is answered
/// with its stored 201, and nothing is logged as a failed request: the
/// store's refusal of its insert is logged only when it is what the
/// client hears. Before, every such retry logged "request failed" at
/// error level, so an operator saw failures for requests that succeeded.
#[tokio::test]
async fn a_replayed_create_in_a_write_outage_logs_no_failed_request() {
    let log = Log::default();
    let writer = log.clone();
    // This thread only (the test's runtime has one): the handlers run here.
    let _logging = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish(),
    );
    let (sqlite, _engine, app) = api_on_sqlite("store-http-replay-log");
    let keyed = || {
        Request::builder()
            .method("POST")
            .uri("/v1/verifications")
            .header("content-type", "application/json")
            .header("authorization", AUTH)
            .header("idempotency-key", "replay-1")
            .body(Body::from(r#"{"phone":"+447911123458","sender":"T"}"#))
            .expect("request")
    };
    let read = |resp: axum::response::Response| async move {
        let replayed = resp.headers().contains_key("idempotent-replayed");
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        (
            status,
            replayed,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    };
    let first = read(app.clone().oneshot(keyed()).await.expect("infallible")).await;
    assert_eq!((first.0, first.1), (201, false), "{}", first.2);

    sqlite.inject_fault(Fault::ReadOnly).expect("fault");
    let retry = read(app.clone().oneshot(keyed()).await.expect("infallible")).await;
    assert_eq!((retry.0, retry.1), (201, true), "{}", retry.2);
    assert_eq!(retry.2, first.2, "the stored answer, byte for byte");
    assert!(
        !log.text().contains("request failed"),
        "a replayed create logged a failure:\n{}",
        log.text()
    );
    // The log is captured: a create nobody stored is logged as failed.
    let (s, resp) = call(
        &app,
        "POST",
        "/v1/verifications",
        r#"{"phone":"+447911123459","sender":"T"}"#,
    )
    .await;
    assert_eq!(s, 503, "{resp}");
    assert!(log.text().contains("request failed"), "{}", log.text());
}
