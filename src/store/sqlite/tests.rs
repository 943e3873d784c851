//! The durable store on real files in a temp directory.

use super::*;

/// A fresh directory per test (tests run in parallel), removed when the
/// returned guard drops at the end of the test.
fn dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("flashcall-sqlite-{name}-"))
        .tempdir()
        .expect("temp dir")
}

fn v(id: &str, created: i64, expires: i64) -> Verification {
    Verification {
        id: id.into(),
        project: "p".into(),
        phone: "+447911123456".into(),
        sender: "S".into(),
        code: "1234".into(),
        client_code: true,
        caller: "+447700901234".into(),
        reference: Some("ref \"quoted\"".into()),
        created_at_ms: created,
        expires_at_ms: expires,
        attempts_left: 3,
        status: Status::Pending,
        call: CallRecord::default(),
    }
}

/// The call record of a call placed at `now + 5` that rang and was
/// cancelled (487); the outcome is set by `call_ended`.
fn ended(now: i64) -> CallRecord {
    CallRecord {
        trunk: "main".into(),
        sip_code: Some(487),
        invited_at_ms: Some(now + 5),
        ringing_at_ms: Some(now + 50),
        cancel_at_ms: Some(now + 60),
        ended_at_ms: Some(now + 70),
        outcome: None,
    }
}

fn block<T>(f: StoreFuture<'_, T>) -> Result<T, StoreError> {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// A database path in a fresh temp dir of its own; keep the guard alive
/// for as long as the test uses the path.
fn db(name: &str) -> (tempfile::TempDir, PathBuf) {
    let d = dir(name);
    let path = d.path().join("f.db");
    (d, path)
}

fn open(path: &Path) -> SqliteStore {
    SqliteStore::open(path, HashSet::from(["p".to_string()])).expect("open")
}

fn count(path: &Path, sql: &str) -> i64 {
    let c = Connection::open(path).expect("open raw");
    c.query_row(sql, [], |r| r.get(0)).expect(sql)
}

const FAR: i64 = i64::MAX / 4;

#[test]
fn insert_is_durable_and_reads_back_after_reopen() {
    let d = dir("durable");
    let path = d.path().join("sub/dir/f.db");
    let now = now_ms();
    {
        let s = open(&path);
        block(s.insert(v("a", now, now + 600_000), None)).unwrap();
        assert!(matches!(
            block(s.insert(v("a", now, now + 600_000), None)),
            Err(StoreError::Duplicate(_))
        ));
        // Kill-like: the store is leaked, nothing is flushed on drop.
        std::mem::forget(s);
    }
    let s = open(&path);
    let got = s.get("a").unwrap().expect("a survived");
    // It was pending: closed at startup as interrupted.
    assert_eq!(got.status, Status::Failed);
    assert_eq!(got.call.outcome, Some(Outcome::Interrupted));
    assert_eq!(got.reference.as_deref(), Some("ref \"quoted\""));
    assert_eq!(got.code, "1234");
    // Its call is over: read from the database, not held in memory.
    assert_eq!(s.len(), 0);
    // Still checkable.
    let r = s
        .update("a", &mut |v| {
            v.check(now, crate::verification::Guess::Code("1234"));
        })
        .unwrap()
        .unwrap();
    assert_eq!(r.status, Status::Verified);
    block(s.flush()).unwrap();
    drop(s);
    assert_eq!(
        open(&path).get("a").unwrap().unwrap().status,
        Status::Verified
    );
}

/// A second insert with a stored Idempotency-Key (a client's retry) is
/// refused as `KeyTaken` and writes nothing: not its verification, not its
/// key's record; an insert beside it in the same batch still commits. The
/// HTTP layer relies on this instead of looking the key up first.
#[test]
fn an_insert_with_a_stored_key_is_key_taken_and_writes_nothing() {
    let (_dir, path) = db("key-taken");
    let now = now_ms();
    let idem = |id: &str| Idempotent {
        body_sha256: [7; 32],
        verification_id: id.into(),
        response: format!("{{\"id\":\"{id}\"}}"),
    };
    let s = open(&path);
    block(s.insert(v("a", now, now + 600_000), Some(("k1".into(), idem("a"))))).unwrap();
    // Queued together, so one commit carries both.
    let retry = s.insert(v("b", now, now + 600_000), Some(("k1".into(), idem("b"))));
    let other = s.insert(v("c", now, now + 600_000), Some(("k2".into(), idem("c"))));
    assert!(
        matches!(block(retry), Err(StoreError::KeyTaken(ref k)) if k == "p/k1"),
        "the retry's insert"
    );
    block(other).unwrap();
    assert!(
        s.get("b").unwrap().is_none(),
        "no verification for the retry"
    );
    assert_eq!(s.idempotent("p", "k1").unwrap(), Some(idem("a")));
    assert_eq!(s.idempotent("p", "k2").unwrap(), Some(idem("c")));
    drop(s);
    assert_eq!(count(&path, "SELECT count(*) FROM verifications"), 2);
    assert_eq!(count(&path, "SELECT count(*) FROM idempotency"), 2);
}

#[test]
fn updates_expiry_idempotency_and_checks_persist() {
    let (_dir, path) = db("updates");
    let now = now_ms();
    let idem = Idempotent {
        body_sha256: [7; 32],
        verification_id: "a".into(),
        response: "{\"id\":\"a\"}".into(),
    };
    {
        let s = open(&path);
        block(s.insert(
            v("a", now, now + 600_000),
            Some(("k1".into(), idem.clone())),
        ))
        .unwrap();
        block(s.insert(v("b", now, now + 1_000), None)).unwrap();
        s.update("a", &mut |v| v.call_started("main", now + 5))
            .unwrap();
        let mut rec = CallRecord {
            trunk: "main".into(),
            sip_code: Some(487),
            invited_at_ms: Some(now + 5),
            ringing_at_ms: Some(now + 50),
            cancel_at_ms: Some(now + 60),
            ended_at_ms: Some(now + 70),
            outcome: None,
        };
        rec.outcome = None;
        s.update("a", &mut |v| v.call_ended(Outcome::Delivered, rec.clone()))
            .unwrap();
        s.record_check("a", now + 80, CheckResult::WrongCode);
        let expired = s.expire_due(now + 2_000).unwrap();
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].id, "b");
        block(s.flush()).unwrap();
        assert_eq!(s.idempotent("p", "k1").unwrap(), Some(idem.clone()));
    }
    let s = open(&path);
    let a = s.get("a").unwrap().unwrap();
    assert_eq!(a.status, Status::Delivered);
    assert_eq!(a.call.outcome, Some(Outcome::Delivered));
    assert_eq!(a.call.ringing_at_ms, Some(now + 50));
    assert_eq!(a.call.sip_code, Some(487));
    assert_eq!(s.get("b").unwrap().unwrap().status, Status::Expired);
    // From the database (the cache of idempotency keys starts empty).
    assert_eq!(s.idempotent("p", "k1").unwrap(), Some(idem));
    assert_eq!(s.idempotent("other", "k1").unwrap(), None);
    drop(s);
    assert_eq!(
        count(
            &path,
            "SELECT count(*) FROM checks WHERE result = 'wrong_code'"
        ),
        1
    );
    assert_eq!(
        count(
            &path,
            "SELECT count(*) FROM call_attempts WHERE outcome = 'delivered' AND ringing_at_ms IS NOT NULL"
        ),
        1
    );
}

#[test]
fn outbox_rows_follow_status_changes_in_the_same_transaction() {
    let (_dir, path) = db("outbox");
    let now = now_ms();
    let s = open(&path);
    block(s.insert(v("a", now, now + 600_000), None)).unwrap();
    let mut other = v("o", now, now + 600_000);
    other.project = "nohook".into();
    block(s.insert(other, None)).unwrap();
    // Status changes: calling, then failed. A change of attempts only: no event.
    s.update("a", &mut |v| v.call_started("t", now)).unwrap();
    s.update("a", &mut |v| v.attempts_left = 2).unwrap();
    s.update("a", &mut |v| v.call_ended(Outcome::Busy, v.call.clone()))
        .unwrap();
    s.update("o", &mut |v| v.call_started("t", now)).unwrap();
    block(s.flush()).unwrap();
    // Events are due from the moment of their change.
    let now = now_ms();
    let due = s.outbox_due(now, 100).unwrap();
    let types: Vec<String> = due
        .iter()
        .map(|e| {
            let j: serde_json::Value = serde_json::from_str(&e.payload).unwrap();
            j["type"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(due.len(), 3, "{types:?}");
    for t in [
        "verification.pending",
        "verification.calling",
        "verification.failed",
    ] {
        assert!(types.iter().any(|x| x == t), "{t} in {types:?}");
    }
    assert!(due
        .iter()
        .all(|e| e.project == "p" && e.id.len() == 36 && e.id.starts_with("msg_")));
    // Every outbox row has its status change committed with it.
    assert_eq!(
        count(
            &path,
            "SELECT count(*) FROM webhook_outbox o JOIN verifications v ON v.id = o.verification_id"
        ),
        3
    );
    // A failed attempt reschedules; a delivered one ends the event.
    let e = &due[0];
    s.outbox_record(
        &e.id,
        DeliveryAttempt {
            at_ms: now,
            status: Some(500),
            error: None,
            next_attempt_ms: Some(now + 10_000_000),
            delivered: false,
            held: false,
        },
    )
    .unwrap();
    assert_eq!(s.outbox_due(now, 100).unwrap().len(), 2);
    let later = s.outbox_due(now + 10_000_000, 100).unwrap();
    let again = later.iter().find(|x| x.id == e.id).expect("rescheduled");
    assert_eq!(again.attempts, 1);
    // The webhook worker's way (awaited, not blocking): resolved once
    // committed, so the next read already sees the event ended.
    block(s.outbox_record_async(
        &e.id,
        DeliveryAttempt {
            at_ms: now + 10_000,
            status: Some(204),
            error: None,
            next_attempt_ms: None,
            delivered: true,
            held: false,
        },
    ))
    .unwrap();
    assert_eq!(s.outbox_due(FAR, 100).unwrap().len(), 2);
    drop(s);
    assert_eq!(count(&path, "SELECT count(*) FROM webhook_deliveries"), 2);
    // Events survive a restart (`a` is failed already: nothing new).
    let s = open(&path);
    let due = s.outbox_due(FAR, 100).unwrap();
    assert_eq!(due.len(), 2);
    // A record the database cannot take is an error, and the event stays
    // due (the worker holds the attempt and records it first later).
    s.inject_fault(Fault::ReadOnly).unwrap();
    let refused = block(s.outbox_record_async(
        &due[0].id,
        DeliveryAttempt {
            at_ms: now + 20_000,
            status: Some(200),
            error: None,
            next_attempt_ms: None,
            delivered: true,
            held: false,
        },
    ));
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(s.outbox_due(FAR, 100).unwrap().len(), 2);
}

/// An event held for an endpoint that answered 410 Gone waits unsent to
/// the end of its life while the process runs, and is due at once after a
/// restart (the operator may have mended the URL): before, such events
/// were closed unsent and lost.
#[test]
fn events_held_for_a_gone_endpoint_are_due_again_after_a_restart() {
    let (_dir, path) = db("held");
    let now = now_ms();
    let end_of_life = now + 90_000_000;
    let s = open(&path);
    block(s.insert(v("a", now, now + 600_000), None)).unwrap();
    block(s.insert(v("b", now, now + 600_000), None)).unwrap();
    block(s.flush()).unwrap();
    let due = s.outbox_due(now, 100).unwrap();
    assert_eq!(due.len(), 2);
    let attempt = |next: Option<i64>, held: bool| DeliveryAttempt {
        at_ms: now,
        status: Some(410),
        error: None,
        next_attempt_ms: next,
        delivered: false,
        held,
    };
    // One held, one merely retried later: only the held one comes back.
    block(s.outbox_record_async(&due[0].id, attempt(Some(end_of_life), true))).unwrap();
    block(s.outbox_record_async(&due[1].id, attempt(Some(end_of_life), false))).unwrap();
    assert!(s.outbox_due(end_of_life - 1, 100).unwrap().is_empty());
    drop(s);
    // (The reopen also closes both still pending verifications as
    // interrupted, with events of their own: only the two above count.)
    let ours = |s: &SqliteStore| -> Vec<OutboxEvent> {
        let mut d = s.outbox_due(now_ms(), 100).unwrap();
        d.retain(|e| e.id == due[0].id || e.id == due[1].id);
        d
    };
    let s = open(&path);
    let due_now = ours(&s);
    assert_eq!(due_now.len(), 1, "{due_now:?}");
    assert_eq!(due_now[0].id, due[0].id);
    assert_eq!(due_now[0].attempts, 1);
    // Released once: a second restart finds nothing more held.
    drop(s);
    let s = open(&path);
    assert_eq!(ours(&s).len(), 1);
    assert_eq!(
        count(&path, "SELECT count(*) FROM webhook_outbox WHERE held = 1"),
        0
    );
}

#[test]
fn interrupted_calls_are_closed_on_reopen_with_their_event() {
    let (_dir, path) = db("interrupted");
    let now = now_ms();
    {
        let s = open(&path);
        block(s.insert(v("calling", now, now + 600_000), None)).unwrap();
        block(s.insert(v("pending", now, now + 600_000), None)).unwrap();
        block(s.insert(v("done", now, now + 600_000), None)).unwrap();
        s.update("calling", &mut |v| v.call_started("t", now))
            .unwrap();
        s.update("done", &mut |v| {
            v.check(now, crate::verification::Guess::Code("1234"));
        })
        .unwrap();
        block(s.flush()).unwrap();
        std::mem::forget(s);
    }
    let s = open(&path);
    let c = s.get("calling").unwrap().unwrap();
    assert_eq!(c.status, Status::Failed);
    assert_eq!(c.call.outcome, Some(Outcome::Interrupted));
    assert!(c.call.ended_at_ms.is_some());
    let p = s.get("pending").unwrap().unwrap();
    assert_eq!(p.status, Status::Failed);
    assert_eq!(s.get("done").unwrap().unwrap().status, Status::Verified);
    let failed_events = s
        .outbox_due(FAR, 100)
        .unwrap()
        .into_iter()
        .filter(|e| e.payload.contains("verification.failed"))
        .count();
    assert_eq!(failed_events, 2);
    drop(s);
    assert_eq!(
        count(
            &path,
            "SELECT count(*) FROM call_attempts WHERE outcome = 'interrupted'"
        ),
        1
    );
}

#[test]
fn newer_schema_is_refused() {
    let (_dir, path) = db("newer");
    drop(open(&path));
    let c = Connection::open(&path).unwrap();
    c.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(c);
    let e = SqliteStore::open(&path, HashSet::new())
        .err()
        .expect("refused");
    assert!(matches!(e, OpenError::NewerSchema { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("f.db") && msg.contains("newer"), "{msg}");
}

#[test]
fn garbage_and_corrupt_files_are_refused() {
    let d = dir("garbage");
    let path = d.path().join("f.db");
    std::fs::write(
        &path,
        "this is not a database, just some text\n".repeat(200),
    )
    .unwrap();
    let e = SqliteStore::open(&path, HashSet::new())
        .err()
        .expect("refused");
    assert!(matches!(e, OpenError::NotSqlite { .. }), "{e}");
    assert!(e.to_string().contains("f.db"), "{e}");

    // A real header over garbage pages.
    let path = d.path().join("g.db");
    drop(open(&path));
    let mut bytes = std::fs::read(&path).unwrap();
    for b in bytes.iter_mut().skip(100) {
        *b = 0xA5;
    }
    std::fs::write(&path, bytes).unwrap();
    let _ = std::fs::remove_file(d.path().join("g.db-wal"));
    let _ = std::fs::remove_file(d.path().join("g.db-shm"));
    let e = SqliteStore::open(&path, HashSet::new())
        .err()
        .expect("refused");
    assert!(
        matches!(e, OpenError::Corrupt { .. } | OpenError::NotSqlite { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("g.db"), "{e}");
}

#[test]
fn read_only_or_full_database_fails_inserts_without_panic() {
    let (_dir, path) = db("readonly");
    let now = now_ms();
    let s = open(&path);
    block(s.insert(v("ok", now, now + 600_000), None)).unwrap();
    s.inject_fault(Fault::ReadOnly).unwrap();
    let e = block(s.insert(v("no", now, now + 600_000), None)).unwrap_err();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
    assert!(
        s.get("no").unwrap().is_none(),
        "not visible when not stored"
    );
    // A queued update fails too, and the flush after it says so.
    s.update("ok", &mut |v| v.attempts_left = 1).unwrap();
    assert!(block(s.flush()).is_err());
    drop(s);
    let s = open(&path);
    assert!(s.get("ok").unwrap().is_some());
    assert!(s.get("no").unwrap().is_none());

    // Full: the database may not grow; some insert must fail, cleanly.
    s.inject_fault(Fault::Full).unwrap();
    let mut failed = None;
    for i in 0..20_000 {
        let id = format!("f{i}");
        if block(s.insert(v(&id, now, now + 600_000), None)).is_err() {
            failed = Some(id);
            break;
        }
    }
    let id = failed.expect("an insert fails once the database is full");
    assert!(s.get(&id).unwrap().is_none());
}

#[test]
fn prune_deletes_old_records_and_what_hangs_off_them() {
    let (_dir, path) = db("prune");
    let now = now_ms();
    let s = open(&path);
    let idem = |id: &str| Idempotent {
        body_sha256: [1; 32],
        verification_id: id.into(),
        response: "{}".into(),
    };
    for i in 0..25 {
        let id = format!("old{i}");
        block(s.insert(v(&id, 1_000 + i, 2_000), Some((id.clone(), idem(&id))))).unwrap();
        s.record_check(&id, 1_500, CheckResult::WrongCode);
    }
    block(s.insert(v("new", now, now + 600_000), None)).unwrap();
    block(s.flush()).unwrap();
    // One old event delivered: it goes with the old records, its delivery
    // attempt too.
    let delivered = s.outbox_due(now, 1).unwrap().remove(0);
    s.outbox_record(
        &delivered.id,
        DeliveryAttempt {
            at_ms: 1_100,
            status: Some(204),
            error: None,
            next_attempt_ms: None,
            delivered: true,
            held: false,
        },
    )
    .unwrap();
    // Batches of 10: 10, 10, 5.
    assert_eq!(s.prune(now - 1_000, 10).unwrap(), 10);
    assert_eq!(s.prune(now - 1_000, 10).unwrap(), 10);
    assert_eq!(s.prune(now - 1_000, 10).unwrap(), 5);
    assert_eq!(s.prune(now - 1_000, 10).unwrap(), 0);
    assert!(s.get("new").unwrap().is_some());
    drop(s);
    assert_eq!(count(&path, "SELECT count(*) FROM verifications"), 1);
    assert_eq!(count(&path, "SELECT count(*) FROM checks"), 0);
    assert_eq!(count(&path, "SELECT count(*) FROM idempotency"), 0);
    // Undelivered events are kept for the delivery worker.
    assert!(count(&path, "SELECT count(*) FROM webhook_outbox") >= 25);
    assert_eq!(
        count(&path, "SELECT count(*) FROM webhook_outbox WHERE done = 1"),
        0
    );
    assert_eq!(count(&path, "SELECT count(*) FROM webhook_deliveries"), 0);
}

#[test]
fn event_ids_grow() {
    let ids: Vec<String> = (0..1_000).map(|_| event_id()).collect();
    assert!(ids.iter().all(|i| i.len() == 36 && i.starts_with("msg_")));
    assert!(ids.windows(2).all(|w| w[0][..20] < w[1][..20]), "{ids:?}");
}

#[test]
fn scan_streams_in_order_and_stops() {
    let (_dir, path) = db("scan");
    let s = open(&path);
    for i in 0..10 {
        block(s.insert(v(&format!("v{i}"), 100 - i, FAR), None)).unwrap();
    }
    let mut seen = Vec::new();
    s.scan("p", 92, 100, &mut |v| {
        seen.push(v.created_at_ms);
        seen.len() < 5
    })
    .unwrap();
    assert_eq!(seen, vec![92, 93, 94, 95, 96]);
}

#[test]
fn many_concurrent_inserts_group_commit() {
    let (_dir, path) = db("group");
    let s = Arc::new(open(&path));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let now = now_ms();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..2_000 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.insert(v(&format!("g{i}"), now, now + 600_000), None)
                    .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    });
    drop(s);
    assert_eq!(count(&path, "SELECT count(*) FROM verifications"), 2_000);
}

/// A record leaves memory once its call is over and its writes are
/// committed; checks and the expiry sweep still work on it, serially.
#[test]
fn finished_calls_leave_memory_and_stay_checkable() {
    let (_dir, path) = db("evict");
    let now = now_ms();
    let s = open(&path);
    block(s.insert(v("a", now, now + 600_000), None)).unwrap();
    block(s.insert(v("b", now, now + 1_000), None)).unwrap();
    assert_eq!(s.len(), 2, "pending calls are held");
    let rec = ended(now);
    for id in ["a", "b"] {
        s.update(id, &mut |v| v.call_started("main", now + 5))
            .unwrap();
        s.update(id, &mut |v| v.call_ended(Outcome::Delivered, rec.clone()))
            .unwrap();
    }
    block(s.flush()).unwrap();
    assert_eq!(s.len(), 0, "delivered and committed: not held");
    assert_eq!(s.get("a").unwrap().unwrap().status, Status::Delivered);

    // Concurrent read-modify-writes of an evicted record: none is lost.
    let s = Arc::new(s);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            std::thread::spawn(move || {
                for _ in 0..25 {
                    s.update("a", &mut |v| v.attempts_left += 1).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(s.get("a").unwrap().unwrap().attempts_left, 3 + 200);
    block(s.flush()).unwrap();
    assert_eq!(s.len(), 0, "evicted again once committed");
    assert_eq!(
        count(
            &path,
            "SELECT attempts_left FROM verifications WHERE id = 'a'"
        ),
        203
    );
    // A check on the evicted record: right code, verified, durable.
    let r = s
        .update("a", &mut |v| {
            v.check(now + 100, crate::verification::Guess::Code("1234"));
        })
        .unwrap()
        .unwrap();
    assert_eq!(r.status, Status::Verified);
    // The sweep reaches the evicted, due record "b" and closes it.
    let expired = s.expire_due(now + 2_000).unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].id, "b");
    assert_eq!(expired[0].status, Status::Expired);
    // Unchanged records are not brought back into memory by a no-op.
    s.update("a", &mut |_| {}).unwrap();
    block(s.flush()).unwrap();
    assert_eq!(s.len(), 0);
    drop(s);
    let s = open(&path);
    assert_eq!(s.get("a").unwrap().unwrap().status, Status::Verified);
    assert_eq!(s.get("b").unwrap().unwrap().status, Status::Expired);
}

/// A verification as the v1 writer stored it: its row, and its call
/// attempt in the `call_attempts` table when a call was placed.
fn insert_v1(c: &Connection, v: &Verification) {
    let k = &v.call;
    c.execute(
        &format!(
            "INSERT INTO verifications ({V_COLS}) VALUES \
             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)"
        ),
        params![
            v.id,
            v.project,
            v.phone,
            v.sender,
            v.code,
            v.client_code,
            v.caller,
            v.reference,
            v.created_at_ms,
            v.expires_at_ms,
            v.attempts_left,
            v.status.as_str(),
            k.trunk,
            k.outcome.map(Outcome::as_str),
            k.sip_code,
            k.invited_at_ms,
            k.ringing_at_ms,
            k.cancel_at_ms,
            k.ended_at_ms,
        ],
    )
    .unwrap();
    if k.invited_at_ms.is_some() {
        c.execute(
            "INSERT INTO call_attempts (verification_id, trunk, caller, destination, \
             invited_at_ms, ringing_at_ms, cancel_at_ms, final_at_ms, sip_code, outcome) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                v.id,
                k.trunk,
                v.caller,
                v.phone,
                k.invited_at_ms,
                k.ringing_at_ms,
                k.cancel_at_ms,
                k.ended_at_ms,
                k.sip_code,
                k.outcome.map(Outcome::as_str),
            ],
        )
        .unwrap();
    }
}

#[test]
fn a_version_1_database_migrates_with_its_records_intact() {
    let (_dir, path) = db("v1");
    let now = now_ms();
    let call = |outcome| CallRecord {
        trunk: "main".into(),
        outcome,
        sip_code: Some(487),
        invited_at_ms: Some(now - 5_000),
        ringing_at_ms: Some(now - 4_000),
        cancel_at_ms: Some(now - 3_900),
        ended_at_ms: Some(now - 3_800),
    };
    // Finished long ago, with its call; delivered and still open; left
    // calling by a crash; verified, past its TTL, with no call.
    let mut old = v("old", 1_000, 2_000);
    old.status = Status::Expired;
    old.call = call(Some(Outcome::Delivered));
    let mut open_one = v("open", now - 6_000, now + 600_000);
    open_one.status = Status::Delivered;
    open_one.call = call(Some(Outcome::Delivered));
    let mut calling = v("calling", now - 6_000, now + 600_000);
    calling.status = Status::Calling;
    calling.call = CallRecord {
        trunk: "main".into(),
        invited_at_ms: Some(now - 5_000),
        ..CallRecord::default()
    };
    let mut verified = v("verified", now - 900_000, now - 600_000);
    verified.status = Status::Verified;
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch(MIGRATIONS[0]).unwrap();
        c.pragma_update(None, "user_version", 1).unwrap();
        for x in [&old, &open_one, &calling, &verified] {
            insert_v1(&c, x);
        }
        c.execute(
            "INSERT INTO webhook_outbox (id, project, verification_id, payload, created_at_ms, \
             next_attempt_ms) VALUES ('msg_1', 'p', 'open', '{}', 1, 1)",
            [],
        )
        .unwrap();
    }
    let s = open(&path);
    assert_eq!(count(&path, "PRAGMA user_version"), SCHEMA_VERSION);
    // Every record reads back as it was (the crash leftover closed).
    assert_eq!(s.get("old").unwrap().unwrap(), old);
    assert_eq!(s.get("open").unwrap().unwrap(), open_one);
    assert_eq!(s.get("verified").unwrap().unwrap(), verified);
    let c = s.get("calling").unwrap().unwrap();
    assert_eq!(c.status, Status::Failed);
    assert_eq!(c.call.outcome, Some(Outcome::Interrupted));
    // The delivered one stays checkable.
    let r = s
        .update("open", &mut |v| {
            v.check(now, crate::verification::Guess::Code("1234"));
        })
        .unwrap()
        .unwrap();
    assert_eq!(r.status, Status::Verified);
    block(s.flush()).unwrap();
    assert_eq!(s.outbox_due(FAR, 100).unwrap().len(), 3);
    drop(s);
    // The call attempts read as before, from the view.
    let db = Connection::open(&path).unwrap();
    let attempts: Vec<(String, String, Option<i64>, Option<String>)> = db
        .prepare(
            "SELECT verification_id, destination, ringing_at_ms, outcome FROM call_attempts \
             ORDER BY verification_id",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert_eq!(
        attempts,
        vec![
            (
                "calling".into(),
                old.phone.clone(),
                None,
                Some("interrupted".into())
            ),
            (
                "old".into(),
                old.phone.clone(),
                Some(now - 4_000),
                Some("delivered".into())
            ),
            (
                "open".into(),
                old.phone.clone(),
                Some(now - 4_000),
                Some("delivered".into())
            ),
        ]
    );
    let indexes: Vec<String> = db
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'verifications' \
             AND sql IS NOT NULL ORDER BY name",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert_eq!(
        indexes,
        vec!["verifications_open", "verifications_project_created"]
    );
    let check: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    // Startup and the crash sweep read open verifications by the index.
    for sql in [
        format!("SELECT expires_at_ms, id FROM verifications WHERE {OPEN}"),
        format!("SELECT id FROM verifications WHERE {OPEN} AND status IN ('pending', 'calling')"),
    ] {
        let plan: String = db
            .query_row(&format!("EXPLAIN QUERY PLAN {sql}"), [], |r| r.get(3))
            .unwrap();
        assert!(plan.contains("verifications_open"), "{sql}: {plan}");
    }
    // A status change evaluates the index's WHERE without a temporary
    // b-tree (as a long IN list would, at every update).
    let ops: Vec<String> = db
        .prepare("EXPLAIN UPDATE verifications SET status = 'calling' WHERE id = 'open'")
        .unwrap()
        .query_map([], |r| r.get(1))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert!(!ops.iter().any(|o| o == "OpenEphemeral"), "{ops:?}");
}

#[test]
fn updates_of_one_verification_in_a_batch_write_its_row_once_and_every_event() {
    let (_dir, path) = db("coalesce");
    drop(open(&path));
    let conn = connect(&path, OpenFlags::default()).unwrap();
    let hooks = Hooks {
        projects: HashSet::from(["p".to_string()]),
        wake: Arc::new(Notify::new()),
        wrote: std::cell::Cell::new(false),
    };
    let job = |op| Job {
        op,
        waiter: None,
        queued_at: Instant::now(),
    };
    let now = now_ms();
    let a0 = v("a", now, now + 600_000);
    let b0 = v("b", now, now + 600_000);
    let inserts = [
        job(Op::Insert {
            v: Box::new(a0.clone()),
            idem: None,
        }),
        job(Op::Insert {
            v: Box::new(b0.clone()),
            idem: None,
        }),
    ];
    commit(&conn, &hooks, &inserts).unwrap();
    let mut a1 = a0.clone();
    a1.call_started("t", now + 1);
    let mut b1 = b0.clone();
    b1.call_started("t", now + 1);
    let mut a2 = a1.clone();
    a2.call_ended(
        Outcome::Delivered,
        CallRecord {
            trunk: "t".into(),
            outcome: None,
            sip_code: Some(487),
            invited_at_ms: Some(now + 1),
            ringing_at_ms: Some(now + 2),
            cancel_at_ms: Some(now + 2),
            ended_at_ms: Some(now + 3),
        },
    );
    let update = |v: &Verification, before, at_ms| {
        job(Op::Update {
            v: Arc::new(v.clone()),
            before,
            at_ms,
        })
    };
    let batch = [
        update(&a1, Status::Pending, now + 1),
        update(&b1, Status::Pending, now + 1),
        update(&a2, Status::Calling, now + 3),
    ];
    let changes = conn.total_changes();
    let out = commit(&conn, &hooks, &batch).unwrap();
    assert!(out.iter().all(|r| matches!(r, Ok(1))), "{out:?}");
    // Two row updates (a once, in its last state; b) and three events.
    assert_eq!(conn.total_changes() - changes, 5);
    assert_eq!(load_one(&conn, "a").unwrap().unwrap(), a2);
    assert_eq!(load_one(&conn, "b").unwrap().unwrap(), b1);
    // a's events: each its own status and call record, in order.
    let events: Vec<serde_json::Value> = conn
        .prepare("SELECT payload FROM webhook_outbox WHERE verification_id = 'a' ORDER BY rowid")
        .unwrap()
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|p| serde_json::from_str(&p.unwrap()).unwrap())
        .collect();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "verification.pending",
            "verification.calling",
            "verification.delivered"
        ]
    );
    assert_eq!(
        events[1]["data"]["call"]["outcome"],
        serde_json::Value::Null
    );
    assert_eq!(events[2]["data"]["call"]["outcome"], "delivered");
}

#[test]
fn young_updates_wait_for_a_later_commit_unless_a_flush_or_an_older_one_goes_now() {
    let now = Instant::now();
    let old = now - COALESCE - Duration::from_millis(1);
    // Young however long the test takes to reach `defer_young` (which reads
    // the clock itself): a stall of COALESCE (2 ms) would age `now`.
    let young = now + Duration::from_secs(60);
    let update = |id: &str, queued_at| Job {
        op: Op::Update {
            v: Arc::new(v(id, 0, FAR)),
            before: Status::Pending,
            at_ms: 0,
        },
        waiter: None,
        queued_at,
    };
    let create = |id: &str| Job {
        op: Op::Insert {
            v: Box::new(v(id, 0, FAR)),
            idem: None,
        },
        waiter: Some(Waiter::Sync(mpsc::sync_channel(1).0)),
        queued_at: now,
    };
    let ids = |b: &[Job]| -> Vec<String> {
        b.iter()
            .map(|j| match &j.op {
                Op::Update { v, .. } => format!("u:{}", v.id),
                Op::Insert { v, .. } => format!("i:{}", v.id),
                Op::Flush => "flush".into(),
                _ => "other".into(),
            })
            .collect()
    };
    let mut batch = vec![
        update("a", old),
        update("b", young),
        update("a", young),
        create("c"),
    ];
    let mut carry = Vec::new();
    defer_young(&mut batch, &mut carry);
    // a's young update follows its due one; b's waits.
    assert_eq!(ids(&batch), ["u:a", "u:a", "i:c"]);
    assert_eq!(ids(&carry), ["u:b"]);
    // Nobody waiting: nothing to gain by waiting, all go.
    let mut batch = vec![update("b", young)];
    let mut carry = Vec::new();
    defer_young(&mut batch, &mut carry);
    assert_eq!((batch.len(), carry.len()), (1, 0));
    // A flush covers everything queued before it.
    let mut batch = vec![
        update("b", young),
        create("c"),
        Job {
            op: Op::Flush,
            waiter: Some(Waiter::Sync(mpsc::sync_channel(1).0)),
            queued_at: now,
        },
    ];
    let mut carry = Vec::new();
    defer_young(&mut batch, &mut carry);
    assert_eq!(ids(&batch), ["u:b", "i:c", "flush"]);
    assert!(carry.is_empty());
}

#[test]
fn the_expiry_sweep_reads_the_partial_index_of_open_records() {
    // A full scan here would read every record ever kept, once a second.
    let (_dir, path) = db("expire-plan");
    drop(open(&path));
    let c = Connection::open(&path).unwrap();
    let plan: Vec<String> = c
        .prepare(&format!("EXPLAIN QUERY PLAN {}", *EXPIRE_DUE))
        .unwrap()
        .query_map(params![0i64, 10i64], |r| r.get::<_, String>(3))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        plan.iter()
            .any(|l| l.contains("USING INDEX verifications_open")),
        "{plan:?}"
    );
    assert!(
        !plan.iter().any(|l| l.contains("SCAN verifications")),
        "{plan:?}"
    );
}

#[test]
fn nothing_of_a_finished_verification_stays_in_memory_and_expiry_still_finds_it() {
    let (_dir, path) = db("expire-batches");
    let now = now_ms();
    let s = open(&path);
    let idem = |id: &str| Idempotent {
        body_sha256: [1; 32],
        verification_id: id.into(),
        response: format!("{{\"id\":\"{id}\"}}"),
    };
    let rec = ended(now);
    // Seven due soon (one of them checked and verified first), one later.
    let ids: Vec<String> = (0..8).map(|i| format!("v{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let expires = if i == 7 { now + 600_000 } else { now + 1_000 };
        block(s.insert(v(id, now, expires), Some((format!("k{i}"), idem(id))))).unwrap();
        s.update(id, &mut |v| v.call_started("main", now + 5))
            .unwrap();
        s.update(id, &mut |v| v.call_ended(Outcome::Delivered, rec.clone()))
            .unwrap();
    }
    s.update("v0", &mut |v| {
        v.check(now + 100, crate::verification::Guess::Code("1234"));
    })
    .unwrap();
    block(s.flush()).unwrap();
    assert_eq!(s.len(), 0, "calls over and committed: nothing cached");
    // Replays are answered from the database.
    assert_eq!(s.idempotent("p", "k3").unwrap(), Some(idem("v3")));
    // Two per query: the sweep keeps going until the backlog is done.
    let mut expired: Vec<String> = s
        .expire_due_in_batches(now + 2_000, 2)
        .unwrap()
        .into_iter()
        .map(|v| {
            assert_eq!(v.status, Status::Expired);
            v.id
        })
        .collect();
    expired.sort();
    assert_eq!(expired, ["v1", "v2", "v3", "v4", "v5", "v6"]);
    block(s.flush()).unwrap();
    assert!(s.expire_due(now + 2_000).unwrap().is_empty(), "closed once");
    assert_eq!(s.len(), 0, "expired and committed: nothing cached");
    assert_eq!(s.get("v0").unwrap().unwrap().status, Status::Verified);
    assert_eq!(s.get("v7").unwrap().unwrap().status, Status::Delivered);
    assert_eq!(s.get("v6").unwrap().unwrap().status, Status::Expired);
}

#[test]
fn a_create_is_held_for_siblings_only_after_a_shared_commit() {
    let w = Duration::from_millis(4);
    // One create per commit: a client sending them one after another.
    assert!(!hold_for_siblings(1, Duration::ZERO, w));
    assert!(!hold_for_siblings(0, Duration::ZERO, w));
    // Two or more waited in the last commit, and it was recent.
    assert!(hold_for_siblings(2, Duration::from_millis(1), w));
    assert!(hold_for_siblings(40, Duration::from_micros(3_999), w));
    // Too long ago, or no window at all.
    assert!(!hold_for_siblings(40, w, w));
    assert!(!hold_for_siblings(40, Duration::ZERO, Duration::ZERO));
}

/// A client that waits for each create before sending the next is never
/// held: with a 30 s window, a hold would make each of these inserts take
/// 30 s, and the bound below (far above an unheld insert's milliseconds)
/// would fail.
#[test]
fn one_after_another_creates_are_not_held_by_a_long_window() {
    let (_d, path) = db("sequential");
    let s = SqliteStore::open_with_window(&path, HashSet::new(), Duration::from_secs(30))
        .expect("open");
    let now = now_ms();
    for i in 0..20 {
        let started = Instant::now();
        block(s.insert(v(&format!("seq{i}"), now, now + 600_000), None)).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "insert {i} was held for {:?}",
            started.elapsed()
        );
    }
    assert_eq!(count(&path, "SELECT count(*) FROM verifications"), 20);
}

/// An export reads in pages of `SCAN_PAGE` rows, going on from the last
/// row's (created at, id): every row of the range once, in order, though
/// pages end in the middle of a millisecond; other projects and rows out
/// of range are left out.
#[test]
fn scan_pages_cover_the_range_once_in_order() {
    let (_dir, path) = db("scan-pages");
    let s = open(&path);
    let n = 2 * SCAN_PAGE + 500;
    let mut want = Vec::new();
    for i in 0..n {
        // Seven rows a millisecond; ids out of creation order within one.
        let t = 1_000 + (i / 7) as i64;
        let id = format!("r{:02}-{i:05}", (i * 37) % 7);
        let mut row = v(&id, t, FAR);
        if i % 5 == 0 {
            row.project = "other".into();
        } else if t < 1_010 {
            // Before the range.
        } else {
            want.push((t, id.clone()));
        }
        block(s.insert(row, None)).unwrap();
    }
    want.sort();
    let mut seen = Vec::new();
    s.scan("p", 1_010, i64::MAX, &mut |v| {
        seen.push((v.created_at_ms, v.id.clone()));
        true
    })
    .unwrap();
    assert_eq!(seen.len(), want.len());
    assert!(seen == want, "rows missing, repeated or out of order");
}

/// While the export's sink waits (a slow client), no read transaction is
/// open: a TRUNCATE checkpoint completes, and the WAL can start over. One
/// cursor held across the whole export kept its snapshot, and the WAL grew
/// for as long as the client took.
#[test]
fn a_slow_export_holds_no_read_snapshot_between_rows() {
    let (_dir, path) = db("scan-snapshot");
    let s = open(&path);
    for i in 0..10 {
        block(s.insert(v(&format!("w{i}"), 100 + i, FAR), None)).unwrap();
    }
    let mut busy = Vec::new();
    s.scan("p", 0, i64::MAX, &mut |row| {
        if row.id == "w5" {
            // New frames in the WAL past any snapshot taken before.
            block(s.insert(v("late", 50, FAR), None)).unwrap();
            let c = Connection::open(&path).expect("open raw");
            c.busy_timeout(Duration::from_secs(3))
                .expect("busy timeout");
            let b: i64 = c
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
                .expect("checkpoint");
            busy.push(b);
        }
        true
    })
    .unwrap();
    assert_eq!(busy, vec![0], "the checkpoint was blocked by the export");
}

/// While commits fail, the updates kept for a retry can fill a whole batch
/// (`MAX_BATCH`); new jobs must still be taken, so a create gets its
/// error instead of waiting for ever. (With the batch bound alone, the
/// writer took nothing new and re-ran the failing batch in a loop.)
#[test]
fn a_full_retry_list_still_lets_a_create_fail_cleanly() {
    let (_dir, path) = db("retry-full");
    let now = now_ms();
    let s = Arc::new(open(&path));
    block(s.insert(v("ok", now, now + 600_000), None)).unwrap();
    s.inject_fault(Fault::ReadOnly).unwrap();
    for i in 0..(MAX_BATCH + 2_000) {
        s.update("ok", &mut |v| v.attempts_left = (i % 5) as u32)
            .unwrap();
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let s2 = s.clone();
    std::thread::spawn(move || {
        let _ = tx.send(block(s2.insert(v("no", now, now + 600_000), None)));
    });
    // A bound on the wait, not a measure of speed.
    let r = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the create got no answer while commits failed");
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
}
