//! The in-memory store: DashMap shards, so HTTP workers and the SIP driver
//! rarely wait on each other. Nothing survives a restart; records are
//! dropped `retention` after they expire so memory stays bounded.

use dashmap::DashMap;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Mutex;

use super::{DeliveryAttempt, Idempotent, OutboxEvent, Store, StoreError, StoreFuture};
use crate::verification::Verification;

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
}

impl MemoryStore {
    pub fn new(retention_ms: i64) -> Self {
        MemoryStore {
            by_id: DashMap::new(),
            idem: DashMap::new(),
            expiries: Mutex::new(BinaryHeap::new()),
            drops: Mutex::new(BinaryHeap::new()),
            retention_ms,
        }
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
    fn insert(&self, v: Verification, idem: Option<(String, Idempotent)>) -> StoreFuture<'_, ()> {
        let r = (|| {
            if self.by_id.contains_key(&v.id) {
                return Err(StoreError::Duplicate(v.id.clone()));
            }
            let key = idem.map(|(k, rec)| {
                let key = (v.project.clone(), k);
                self.idem.insert(key.clone(), rec);
                key
            });
            self.expiries
                .lock()
                .map_err(|_| poisoned())?
                .push(Reverse((v.expires_at_ms, v.id.clone())));
            self.drops.lock().map_err(|_| poisoned())?.push(Reverse((
                v.expires_at_ms + self.retention_ms,
                v.id.clone(),
                key,
            )));
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
        Ok(self.by_id.get_mut(id).map(|mut v| {
            f(&mut v);
            v.clone()
        }))
    }

    fn idempotent(&self, project: &str, key: &str) -> Result<Option<Idempotent>, StoreError> {
        Ok(self
            .idem
            .get(&(project.to_string(), key.to_string()))
            .map(|r| r.clone()))
    }

    fn expire_due(&self, now_ms: i64) -> Result<Vec<Verification>, StoreError> {
        let mut due = Vec::new();
        {
            let mut heap = self.expiries.lock().map_err(|_| poisoned())?;
            while let Some(Reverse((at, _))) = heap.peek() {
                if *at > now_ms {
                    break;
                }
                if let Some(Reverse((_, id))) = heap.pop() {
                    due.push(id);
                }
            }
        }
        let mut expired = Vec::new();
        for id in due {
            if let Some(mut v) = self.by_id.get_mut(&id) {
                if v.expire_if_due(now_ms) {
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

    fn outbox_due(&self, _now_ms: i64, _limit: usize) -> Result<Vec<OutboxEvent>, StoreError> {
        Ok(Vec::new())
    }

    fn outbox_record(&self, _id: &str, _attempt: DeliveryAttempt) -> Result<(), StoreError> {
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
        let s = MemoryStore::new(1_000);
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
}
