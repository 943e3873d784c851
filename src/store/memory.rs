//! The in-memory store: DashMap shards, so HTTP workers and the SIP driver
//! rarely wait on each other. Nothing survives a restart; records are
//! dropped `retention` after they expire so memory stays bounded.
//!
//! The webhook outbox lives here too: an event is pushed under the same
//! shard lock as the status change it reports (so the events of one
//! verification are written in order), and removed once delivered or
//! given up.

use dashmap::DashMap;
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

use super::{DeliveryAttempt, Idempotent, OutboxEvent, Store, StoreError, StoreFuture};
use crate::verification::{event_payload, Verification};

/// Most events the outbox holds: past it (receivers down for long under
/// heavy traffic) the event retried the longest is dropped, so memory stays
/// bounded. The durable store keeps them all on disk instead.
const OUTBOX_CAP: usize = 100_000;

#[derive(Default)]
struct Outbox {
    /// Each event with its write sequence number.
    events: HashMap<String, (u64, OutboxEvent)>,
    /// (next_attempt_ms, seq, id): what is due, in order, without a scan;
    /// `seq` keeps events written in the same millisecond in write order,
    /// so a receiver usually hears "pending" before "calling".
    due: BTreeSet<(i64, u64, String)>,
    seq: u64,
}

/// When a record is dropped: (drop_at_ms, id, its idempotency key).
type DropAt = Reverse<(i64, String, Option<(String, String)>)>;

pub struct MemoryStore {
    by_id: DashMap<String, Verification>,
    idem: DashMap<(String, String), Idempotent>,
    /// (expires_at_ms, id): a heap so the expiry sweep touches only what is
    /// due instead of scanning every record each second.
    expiries: Mutex<BinaryHeap<Reverse<(i64, String)>>>,
    drops: Mutex<BinaryHeap<DropAt>>,
    retention_ms: i64,
    /// Projects with a webhook: only their status changes go to the outbox.
    webhook_projects: HashSet<String>,
    outbox: Mutex<Outbox>,
    /// Notified on every new event, so the delivery worker starts at once
    /// instead of at its next poll.
    wake: Arc<Notify>,
}

impl MemoryStore {
    /// `webhook_projects`: the logins whose status changes are written to
    /// the outbox.
    pub fn new(retention_ms: i64, webhook_projects: HashSet<String>) -> Self {
        MemoryStore {
            by_id: DashMap::new(),
            idem: DashMap::new(),
            expiries: Mutex::new(BinaryHeap::new()),
            drops: Mutex::new(BinaryHeap::new()),
            retention_ms,
            webhook_projects,
            outbox: Mutex::new(Outbox::default()),
            wake: Arc::new(Notify::new()),
        }
    }

    /// What the delivery worker waits on besides its poll timer.
    pub fn outbox_wake(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Events waiting in the outbox.
    pub fn outbox_len(&self) -> usize {
        self.outbox.lock().map_or(0, |o| o.events.len())
    }

    /// Writes the event reporting `v`'s current status, if its project has
    /// a webhook.
    fn push_event(&self, v: &Verification) -> Result<(), StoreError> {
        if !self.webhook_projects.contains(&v.project) {
            return Ok(());
        }
        let now = crate::engine::now_ms();
        let ev = OutboxEvent {
            id: crate::webhook::new_event_id(),
            project: v.project.clone(),
            payload: event_payload(v, now),
            created_at_ms: now,
            attempts: 0,
            next_attempt_ms: now,
        };
        {
            let mut ob = self.outbox.lock().map_err(|_| poisoned())?;
            if ob.events.len() >= OUTBOX_CAP {
                if let Some((_, _, id)) = ob.due.pop_last() {
                    ob.events.remove(&id);
                    crate::metrics::webhook_delivery("given_up");
                    tracing::warn!(
                        id,
                        "webhook outbox full: dropped the event retried the longest"
                    );
                }
            }
            ob.seq += 1;
            let seq = ob.seq;
            ob.due.insert((ev.next_attempt_ms, seq, ev.id.clone()));
            ob.events.insert(ev.id.clone(), (seq, ev));
        }
        self.wake.notify_one();
        Ok(())
    }

    fn prune(&self, now_ms: i64) {
        let Ok(mut drops) = self.drops.lock() else {
            return;
        };
        while let Some(Reverse((at, _, _))) = drops.peek() {
            if *at > now_ms {
                break;
            }
            if let Some(Reverse((_, id, key))) = drops.pop() {
                self.by_id.remove(&id);
                if let Some(k) = key {
                    self.idem.remove(&k);
                }
            }
        }
    }
}

fn poisoned() -> StoreError {
    StoreError::Unavailable("a lock was poisoned by a panic".into())
}

impl Store for MemoryStore {
    fn insert(
        &self,
        v: Verification,
        idem: Option<(String, Idempotent)>,
    ) -> StoreFuture<'static, ()> {
        let r = (|| {
            if self.by_id.contains_key(&v.id) {
                return Err(StoreError::Duplicate(v.id.clone()));
            }
            // As the SQLite store: a key already stored refuses the insert
            // and writes nothing.
            let key = match idem {
                None => None,
                Some((k, rec)) => match self.idem.entry((v.project.clone(), k)) {
                    dashmap::mapref::entry::Entry::Occupied(e) => {
                        let (p, k) = e.key();
                        return Err(StoreError::KeyTaken(format!("{p}/{k}")));
                    }
                    dashmap::mapref::entry::Entry::Vacant(e) => {
                        let key = e.key().clone();
                        e.insert(rec);
                        Some(key)
                    }
                },
            };
            self.expiries
                .lock()
                .map_err(|_| poisoned())?
                .push(Reverse((v.expires_at_ms, v.id.clone())));
            self.drops.lock().map_err(|_| poisoned())?.push(Reverse((
                v.expires_at_ms + self.retention_ms,
                v.id.clone(),
                key,
            )));
            // Pending is the first status change a receiver hears of.
            self.push_event(&v)?;
            self.by_id.insert(v.id.clone(), v);
            Ok(())
        })();
        Box::pin(std::future::ready(r))
    }

    fn get(&self, id: &str) -> Result<Option<Verification>, StoreError> {
        Ok(self.by_id.get(id).map(|v| v.clone()))
    }

    fn update(
        &self,
        id: &str,
        f: &mut dyn FnMut(&mut Verification),
    ) -> Result<Option<Verification>, StoreError> {
        let Some(mut v) = self.by_id.get_mut(id) else {
            return Ok(None);
        };
        let before = v.status;
        f(&mut v);
        if v.status != before {
            // Under the shard lock: events of one verification in order.
            self.push_event(&v)?;
        }
        Ok(Some(v.clone()))
    }

    fn idempotent(&self, project: &str, key: &str) -> Result<Option<Idempotent>, StoreError> {
        Ok(self
            .idem
            .get(&(project.to_string(), key.to_string()))
            .map(|r| r.clone()))
    }

    fn expire_due(&self, now_ms: i64) -> Result<Vec<Verification>, StoreError> {
        let due = super::pop_due(&self.expiries, now_ms)?;
        let mut expired = Vec::new();
        for id in due {
            if let Some(mut v) = self.by_id.get_mut(&id) {
                if v.expire_if_due(now_ms) {
                    self.push_event(&v)?;
                    expired.push(v.clone());
                }
            }
        }
        self.prune(now_ms);
        Ok(expired)
    }

    fn scan(
        &self,
        project: &str,
        from_ms: i64,
        to_ms: i64,
        sink: &mut dyn FnMut(&Verification) -> bool,
    ) -> Result<(), StoreError> {
        // Memory holds everything anyway: collect the range, then sort.
        let mut rows: Vec<Verification> = self
            .by_id
            .iter()
            .filter(|v| v.project == project && (from_ms..to_ms).contains(&v.created_at_ms))
            .map(|v| v.clone())
            .collect();
        rows.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        for v in &rows {
            if !sink(v) {
                break;
            }
        }
        Ok(())
    }

    fn outbox_due(&self, now_ms: i64, limit: usize) -> Result<Vec<OutboxEvent>, StoreError> {
        let ob = self.outbox.lock().map_err(|_| poisoned())?;
        Ok(ob
            .due
            .iter()
            .take_while(|(at, _, _)| *at <= now_ms)
            .filter_map(|(_, _, id)| ob.events.get(id).map(|(_, e)| e.clone()))
            .take(limit)
            .collect())
    }

    fn outbox_record(&self, id: &str, attempt: DeliveryAttempt) -> Result<(), StoreError> {
        // Memory keeps no attempt history: only what the next attempt
        // needs. A delivered or ended event is removed.
        let mut ob = self.outbox.lock().map_err(|_| poisoned())?;
        let Some((seq, mut ev)) = ob.events.remove(id) else {
            return Ok(());
        };
        ob.due.remove(&(ev.next_attempt_ms, seq, ev.id.clone()));
        if let (Some(next), false) = (attempt.next_attempt_ms, attempt.delivered) {
            ev.attempts += 1;
            ev.next_attempt_ms = next;
            ob.due.insert((next, seq, ev.id.clone()));
            ob.events.insert(ev.id.clone(), (seq, ev));
        }
        Ok(())
    }

    fn len(&self) -> usize {
        self.by_id.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verification::{CallRecord, Status};

    fn v(id: &str, expires: i64) -> Verification {
        Verification {
            id: id.into(),
            project: "p".into(),
            phone: "+447911123456".into(),
            sender: "S".into(),
            code: "1234".into(),
            client_code: false,
            caller: "+447700901234".into(),
            reference: None,
            created_at_ms: 0,
            expires_at_ms: expires,
            attempts_left: 3,
            status: Status::Pending,
            call: CallRecord::default(),
        }
    }

    fn block<T>(f: StoreFuture<'_, T>) -> Result<T, StoreError> {
        // The memory store's futures are ready at once.
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut f = f;
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(r) => r,
            std::task::Poll::Pending => panic!("memory store future pending"),
        }
    }

    #[test]
    fn insert_get_update_expire_prune() {
        let s = MemoryStore::new(1_000, HashSet::new());
        let idem = Idempotent {
            body_sha256: [1; 32],
            verification_id: "a".into(),
            response: "{}".into(),
        };
        block(s.insert(v("a", 100), Some(("k".into(), idem.clone())))).unwrap();
        block(s.insert(v("b", 200), None)).unwrap();
        assert!(matches!(
            block(s.insert(v("a", 100), None)),
            Err(StoreError::Duplicate(_))
        ));
        // A retry with the stored key: refused, nothing written.
        assert!(matches!(
            block(s.insert(v("c", 300), Some(("k".into(), idem.clone())))),
            Err(StoreError::KeyTaken(_))
        ));
        assert!(s.get("c").unwrap().is_none());
        assert_eq!(s.idempotent("p", "k").unwrap(), Some(idem));
        assert_eq!(s.idempotent("other", "k").unwrap(), None);
        let got = s
            .update("b", &mut |v| v.status = Status::Verified)
            .unwrap()
            .unwrap();
        assert_eq!(got.status, Status::Verified);
        assert!(s.update("zz", &mut |_| {}).unwrap().is_none());
        let expired = s.expire_due(150).unwrap();
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].id, "a");
        // b was verified: never expires.
        assert!(s.expire_due(250).unwrap().is_empty());
        assert_eq!(s.get("a").unwrap().unwrap().status, Status::Expired);
        s.expire_due(1_100).unwrap();
        assert!(s.get("a").unwrap().is_none());
        assert!(s.idempotent("p", "k").unwrap().is_none());
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn status_changes_go_to_the_outbox_of_webhook_projects() {
        let s = MemoryStore::new(1_000, HashSet::from(["p".to_string()]));
        let mut other = v("x", 100);
        other.project = "q".into();
        block(s.insert(other, None)).unwrap();
        s.update("x", &mut |v| v.status = Status::Calling).unwrap();
        assert_eq!(s.outbox_len(), 0, "project q has no webhook");

        block(s.insert(v("a", 100), None)).unwrap();
        // No status change, no event.
        s.update("a", &mut |v| v.attempts_left = 1).unwrap();
        s.update("a", &mut |v| v.status = Status::Calling).unwrap();
        s.expire_due(150).unwrap();
        let now = crate::engine::now_ms();
        let due = s.outbox_due(now, 10).unwrap();
        let types: Vec<String> = due
            .iter()
            .map(|e| {
                let j: serde_json::Value = serde_json::from_str(&e.payload).unwrap();
                assert_eq!(j["data"]["id"], "a");
                j["type"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(
            types,
            [
                "verification.pending",
                "verification.calling",
                "verification.expired"
            ]
        );
        assert!(due
            .iter()
            .all(|e| e.id.starts_with("msg_") && e.project == "p"));
        assert_eq!(s.outbox_due(now, 2).unwrap().len(), 2);
        assert!(s
            .outbox_due(due[0].next_attempt_ms - 1, 10)
            .unwrap()
            .is_empty());

        // A failed attempt: retried later, same id, one more attempt.
        let retry = DeliveryAttempt {
            at_ms: now,
            status: Some(500),
            error: None,
            next_attempt_ms: Some(now + 1_000),
            delivered: false,
            held: false,
        };
        s.outbox_record(&due[0].id, retry).unwrap();
        let left = s.outbox_due(now, 10).unwrap();
        assert_eq!(left.len(), 2);
        assert!(left.iter().all(|e| e.id != due[0].id));
        let later = s.outbox_due(now + 1_000, 10).unwrap();
        let again = later.iter().find(|e| e.id == due[0].id).unwrap();
        assert_eq!((again.attempts, again.next_attempt_ms), (1, now + 1_000));

        // Delivered or ended: gone from the outbox.
        for e in &due {
            let done = DeliveryAttempt {
                at_ms: now,
                status: Some(204),
                error: None,
                next_attempt_ms: None,
                delivered: true,
                held: false,
            };
            s.outbox_record(&e.id, done).unwrap();
        }
        assert_eq!(s.outbox_len(), 0);
        // Recording an unknown id is harmless.
        s.outbox_record(
            "msg_nope",
            DeliveryAttempt {
                at_ms: 0,
                status: None,
                error: None,
                next_attempt_ms: Some(1),
                delivered: false,
                held: false,
            },
        )
        .unwrap();
        assert_eq!(s.outbox_len(), 0);
    }
}
