//! Webhooks (SPEC §7): Standard Webhooks signing and the delivery worker.
//!
//! The store writes an [`OutboxEvent`] with every status change; this
//! worker reads what is due (`Store::outbox_due`), POSTs it signed per
//! <https://www.standardwebhooks.com> and records every attempt
//! (`Store::outbox_record`), so the durable store keeps one row per attempt
//! and a restart resumes where it stopped.
//!
//! HTTP client: `reqwest` (default features off, `rustls-tls`). It is the
//! most used and best kept Rust client, built on the hyper stack axum
//! already brings in; it gives a per-request timeout and HTTPS without a
//! system OpenSSL (rustls with the webpki roots, so a fresh machine needs
//! nothing installed). hyper-util's legacy client would need TLS, timeouts
//! and URL handling assembled by hand.

use base64::Engine as _;
use futures_util::future::join_all;
use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::Sha256;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::store::{DeliveryAttempt, OutboxEvent, Store};

/// The `whsec_` prefix of a Standard Webhooks secret.
pub const SECRET_PREFIX: &str = "whsec_";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("expected \"whsec_\" followed by base64")]
    Prefix,
    #[error("the part after \"whsec_\" is not valid base64")]
    Base64,
    #[error("the key is empty")]
    Empty,
}

/// The key bytes of a `whsec_<base64>` secret. Padding is optional, as in
/// the reference libraries (they append "==" before decoding).
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, SecretError> {
    let b64 = secret
        .strip_prefix(SECRET_PREFIX)
        .ok_or(SecretError::Prefix)?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(b64))
        .map_err(|_| SecretError::Base64)?;
    if key.is_empty() {
        return Err(SecretError::Empty);
    }
    Ok(key)
}

/// The `webhook-signature` value: `v1,` + base64 of HMAC-SHA256 over
/// `{id}.{timestamp}.{body}`.
pub fn sign(key: &[u8], id: &str, timestamp_secs: i64, body: &str) -> String {
    // HMAC accepts keys of any length, so new_from_slice cannot fail here;
    // the fallback keeps this total without an unwrap.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp_secs.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    let sig = mac.finalize().into_bytes();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(sig)
    )
}

/// A new `webhook-id`: `msg_` + 32 random hex digits (128 bits).
pub fn new_event_id() -> String {
    let bytes: [u8; 16] = rand::thread_rng().gen();
    format!("msg_{}", hex::encode(bytes))
}

/// One project's endpoint.
pub struct Endpoint {
    pub url: String,
    pub key: Vec<u8>,
    /// Set after a 410 Gone: nothing more is sent to this URL until the
    /// process restarts (with, presumably, a changed config); the events
    /// meanwhile are held for that start (`DeliveryAttempt::held`).
    pub disabled: AtomicBool,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub timeout: Duration,
    /// Retries stop this long after the event was created.
    pub max_age_ms: i64,
    pub concurrency: usize,
    /// Back-off before retry n (from 0): uniform in [0, base * 2^n],
    /// capped at `retry_cap_ms` (full jitter).
    pub retry_base_ms: u64,
    pub retry_cap_ms: u64,
    /// How often the outbox is polled when nothing wakes the worker.
    pub poll: Duration,
}

/// The delay before the retry that follows failed attempt number
/// `attempts` (1 = the first attempt failed): full jitter, so receivers
/// that failed together are not hit again together.
pub fn backoff_ms(settings: &Settings, attempts: u32, rng: &mut impl Rng) -> u64 {
    let exp = attempts.saturating_sub(1).min(40);
    let ceiling = settings
        .retry_base_ms
        .saturating_mul(1u64 << exp)
        .min(settings.retry_cap_ms)
        .max(1);
    rng.gen_range(1..=ceiling)
}

/// How one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Gone,
    Failed,
}

/// What the worker decides after an attempt: the record to store and the
/// metric results to count (`durable`: the store outlives the process, see
/// [`hold`]). Pure, so the retry rules are unit-tested.
pub fn decide(
    settings: &Settings,
    ev: &OutboxEvent,
    now_ms: i64,
    status: Option<u16>,
    error: Option<String>,
    durable: bool,
    rng: &mut impl Rng,
) -> (DeliveryAttempt, Outcome, bool) {
    let outcome = match status {
        Some(s) if (200..300).contains(&s) => Outcome::Delivered,
        Some(410) => Outcome::Gone,
        _ => Outcome::Failed,
    };
    let (next_attempt_ms, held, given_up) = match outcome {
        Outcome::Delivered => (None, false, false),
        Outcome::Failed => {
            let next = now_ms + backoff_ms(settings, ev.attempts + 1, rng) as i64;
            if next > end_of_life(settings, ev) {
                (None, false, true)
            } else {
                (Some(next), false, false)
            }
        }
        Outcome::Gone => hold(settings, ev, now_ms, durable),
    };
    (
        DeliveryAttempt {
            at_ms: now_ms,
            status,
            error,
            next_attempt_ms,
            delivered: outcome == Outcome::Delivered,
            held,
        },
        outcome,
        given_up,
    )
}

/// When retries of `ev` stop: `max_age` after it was written.
fn end_of_life(settings: &Settings, ev: &OutboxEvent) -> i64 {
    ev.created_at_ms.saturating_add(settings.max_age_ms)
}

/// `(next_attempt_ms, held, given_up)` for an event whose endpoint is gone
/// (410): held to the end of its life, or given up when that has come.
/// Standard Webhooks asks the sender to stop sending to a 410 endpoint, not
/// to drop what it has: the next start sends the held events (SPEC §7:
/// none lost across a restart). On a store that starts empty (`durable`
/// false) there is no next start to wait for: the event ends unsent, as a
/// 410 asks.
fn hold(
    settings: &Settings,
    ev: &OutboxEvent,
    now_ms: i64,
    durable: bool,
) -> (Option<i64>, bool, bool) {
    let end = end_of_life(settings, ev);
    if !durable {
        (None, false, false)
    } else if end > now_ms {
        (Some(end), true, false)
    } else {
        (None, false, true)
    }
}

/// Runs the delivery worker until aborted. `wake` is notified by the store
/// when it writes an event, so deliveries start without waiting for the
/// next poll.
pub async fn run(
    store: Arc<dyn Store>,
    endpoints: HashMap<String, Arc<Endpoint>>,
    settings: Settings,
    wake: Arc<Notify>,
) {
    let client = match reqwest::Client::builder()
        .timeout(settings.timeout)
        .user_agent(concat!("flashcall-webhooks/", env!("CARGO_PKG_VERSION")))
        // A receiver's redirect is its own business: we report its status.
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "webhooks: cannot build the HTTP client; no delivery");
            return;
        }
    };
    let settings = Arc::new(settings);
    let concurrency = settings.concurrency.max(1);
    let mut in_flight: HashSet<String> = HashSet::new();
    let mut tasks: JoinSet<(String, Option<Unrecorded>)> = JoinSet::new();
    // Attempts made whose outcome the store could not record (full disk,
    // read-only database). Their events are still due in the store, so
    // without this the next poll sent them again at once, back to back
    // for as long as the disk stayed full. Each is recorded before its
    // event may go out again, and no new delivery starts while any is
    // left: at most `concurrency` attempts are ever unrecorded. They live
    // in memory only: at shutdown (the worker is aborted) their events are
    // sent again after the next start, under the same webhook-id.
    let mut unrecorded: HashMap<String, DeliveryAttempt> = HashMap::new();
    // When the pause line was last logged: at most one per 10 s, for a
    // disk that keeps filling and freeing (the resume line follows each
    // pause once).
    let mut paused_logged: Option<std::time::Instant> = None;
    loop {
        if !unrecorded.is_empty() {
            // All queued before any is awaited: they share one commit.
            let (ids, tries): (Vec<String>, Vec<_>) = unrecorded
                .iter()
                .map(|(id, a)| (id.clone(), store.outbox_record_async(id, a.clone())))
                .unzip();
            for (id, r) in ids.into_iter().zip(join_all(tries).await) {
                if r.is_ok() {
                    unrecorded.remove(&id);
                }
            }
            if unrecorded.is_empty() {
                tracing::info!("webhooks: delivery attempts are recorded again; deliveries resume");
            }
        }
        let free = if unrecorded.is_empty() {
            concurrency.saturating_sub(in_flight.len())
        } else {
            0
        };
        if free > 0 {
            // Events being delivered are still due in the store until their
            // attempt is recorded: ask for enough to find `free` others.
            match store.outbox_due(crate::engine::now_ms(), free + in_flight.len()) {
                Ok(due) => {
                    let fresh: Vec<OutboxEvent> = due
                        .into_iter()
                        .filter(|e| !in_flight.contains(&e.id))
                        .take(free)
                        .collect();
                    for ev in fresh {
                        in_flight.insert(ev.id.clone());
                        let client = client.clone();
                        let store = store.clone();
                        let settings = settings.clone();
                        let endpoint = endpoints.get(&ev.project).cloned();
                        tasks.spawn(async move {
                            let id = ev.id.clone();
                            let left =
                                deliver(&client, &*store, endpoint.as_deref(), &settings, ev).await;
                            (id, left)
                        });
                    }
                }
                Err(e) => tracing::error!(error = %e, "webhooks: cannot read the outbox"),
            }
        }
        tokio::select! {
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                match done {
                    Ok((id, left)) => {
                        in_flight.remove(&id);
                        if let Some(Unrecorded { attempt, error }) = left {
                            if unrecorded.is_empty()
                                && paused_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
                            {
                                paused_logged = Some(std::time::Instant::now());
                                tracing::error!(%id, %error, "webhooks: cannot record delivery attempts; deliveries pause until the store takes them");
                            }
                            unrecorded.insert(id, attempt);
                        }
                    }
                    Err(e) => {
                        // A panicked delivery: its id is unknown here, so
                        // start afresh rather than leak the slot, keeping
                        // the outcomes of those that finished unrecorded.
                        tracing::error!(error = %e, "webhooks: a delivery task failed");
                        tasks.abort_all();
                        while let Some(r) = tasks.join_next().await {
                            if let Ok((id, Some(u))) = r {
                                unrecorded.insert(id, u.attempt);
                            }
                        }
                        in_flight.clear();
                    }
                }
            }
            _ = tokio::time::sleep(settings.poll) => {}
            _ = wake.notified() => {}
        }
    }
}

/// An attempt the store refused to record, and why.
struct Unrecorded {
    attempt: DeliveryAttempt,
    error: crate::store::StoreError,
}

/// The record of an event not sent at `now`, and why.
fn unsent(now: i64, why: &str, next_attempt_ms: Option<i64>, held: bool) -> DeliveryAttempt {
    DeliveryAttempt {
        at_ms: now,
        status: None,
        error: Some(why.into()),
        next_attempt_ms,
        delivered: false,
        held,
    }
}

/// One attempt of one event, recorded; the attempt back if the store
/// could not record it.
async fn deliver(
    client: &reqwest::Client,
    store: &dyn Store,
    endpoint: Option<&Endpoint>,
    settings: &Settings,
    ev: OutboxEvent,
) -> Option<Unrecorded> {
    let now = crate::engine::now_ms();
    // The event ends unsent, counted under `result`.
    let close = |why: &str, result: &'static str| {
        crate::metrics::webhook_delivery(result);
        unsent(now, why, None, false)
    };
    let Some(ep) = endpoint else {
        // The project has no webhook any more.
        let attempt = close("the project has no webhook endpoint any more", "dropped");
        return record(store, &ev.id, attempt).await;
    };
    if now >= end_of_life(settings, &ev) {
        // Past its life (`max_age_hours`): an event held for an endpoint
        // that answered 410, made due by this start after it was too old
        // already, ends unsent. (A retry is never scheduled past it.)
        let attempt = close("older than max_age_hours: given up unsent", "given_up");
        tracing::warn!(
            project = %ev.project,
            id = %ev.id,
            "webhook event given up: older than max_age_hours"
        );
        return record(store, &ev.id, attempt).await;
    }
    if ep.disabled.load(Ordering::Relaxed) {
        // The endpoint answered 410: the event waits for the next start
        // (or, on the memory store, ends unsent).
        let (next_attempt_ms, held, given_up) = hold(settings, &ev, now, store.durable());
        let why = "endpoint disabled (410 Gone): held until restart";
        let attempt = unsent(now, why, next_attempt_ms, held);
        crate::metrics::webhook_delivery(match (held, given_up) {
            (true, _) => "held",
            (false, true) => "given_up",
            (false, false) => "gone",
        });
        if given_up {
            tracing::warn!(
                project = %ev.project,
                id = %ev.id,
                "webhook event given up: its endpoint answered 410 Gone and max_age_hours passed"
            );
        }
        return record(store, &ev.id, attempt).await;
    }
    let ts = now.div_euclid(1000);
    let signature = sign(&ep.key, &ev.id, ts, &ev.payload);
    let sent = client
        .post(&ep.url)
        .header("content-type", "application/json")
        .header("webhook-id", &ev.id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", signature)
        .body(ev.payload.clone())
        .send()
        .await;
    let (status, error) = match sent {
        Ok(r) => (Some(r.status().as_u16()), None),
        Err(e) => {
            let kind = if e.is_timeout() {
                "timeout"
            } else if e.is_connect() {
                "connect"
            } else {
                "request"
            };
            (None, Some(format!("{kind}: {e}")))
        }
    };
    let done = crate::engine::now_ms();
    let (attempt, outcome, given_up) = {
        let mut rng = rand::thread_rng();
        decide(
            settings,
            &ev,
            done,
            status,
            error,
            store.durable(),
            &mut rng,
        )
    };
    match outcome {
        Outcome::Delivered => crate::metrics::webhook_delivery("delivered"),
        Outcome::Gone => {
            if !ep.disabled.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    project = %ev.project,
                    url = %ep.url,
                    "webhook endpoint answered 410 Gone: disabled until restart; \
                     its events are held and sent after the next start"
                );
            }
            crate::metrics::webhook_delivery("gone");
            if given_up {
                crate::metrics::webhook_delivery("given_up");
            }
        }
        Outcome::Failed => {
            crate::metrics::webhook_delivery("failed");
            tracing::debug!(
                id = %ev.id,
                status = ?attempt.status,
                error = ?attempt.error,
                retry_at = ?attempt.next_attempt_ms,
                "webhook attempt failed"
            );
            if given_up {
                crate::metrics::webhook_delivery("given_up");
                tracing::warn!(
                    project = %ev.project,
                    id = %ev.id,
                    attempts = ev.attempts + 1,
                    "webhook event given up: no success within max_age_hours"
                );
            }
        }
    }
    record(store, &ev.id, attempt).await
}

/// Records `attempt`, waiting for the commit without holding the thread;
/// gives it back if the store refused it.
async fn record(store: &dyn Store, id: &str, attempt: DeliveryAttempt) -> Option<Unrecorded> {
    match store.outbox_record_async(id, attempt.clone()).await {
        Ok(()) => None,
        Err(error) => Some(Unrecorded { attempt, error }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// The test vector of the Standard Webhooks reference libraries
    /// (github.com/standard-webhooks/standard-webhooks, used by its
    /// libraries' test suites and many independent verifiers); the PyPI
    /// `standardwebhooks` package's `Webhook.sign` gives the same value.
    #[test]
    fn signature_matches_the_standard_webhooks_test_vector() {
        let key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            sign(
                &key,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                r#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn secrets_are_checked() {
        assert_eq!(decode_secret("MfKQ9r8G"), Err(SecretError::Prefix));
        assert_eq!(decode_secret("whsec_not base64!"), Err(SecretError::Base64));
        assert_eq!(decode_secret("whsec_"), Err(SecretError::Empty));
        // Padded and unpadded forms give the same key.
        assert_eq!(
            decode_secret("whsec_c2hvcnQ=").unwrap(),
            decode_secret("whsec_c2hvcnQ").unwrap()
        );
    }

    #[test]
    fn event_ids_are_msg_and_32_hex() {
        let a = new_event_id();
        assert_eq!(a.len(), 36);
        assert!(a.starts_with("msg_"));
        assert!(a[4..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, new_event_id());
    }

    fn settings() -> Settings {
        Settings {
            timeout: Duration::from_secs(5),
            max_age_ms: 25 * 3_600_000,
            concurrency: 8,
            retry_base_ms: 5_000,
            retry_cap_ms: 3_600_000,
            poll: Duration::from_millis(200),
        }
    }

    fn ev(attempts: u32) -> OutboxEvent {
        OutboxEvent {
            id: "msg_1".into(),
            project: "p".into(),
            payload: "{}".into(),
            created_at_ms: 0,
            attempts,
            next_attempt_ms: 0,
        }
    }

    #[test]
    fn backoff_is_exponential_capped_and_jittered() {
        let s = settings();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for attempts in 1..60 {
            let ceiling = (5_000u64 << (attempts - 1).min(40)).min(3_600_000);
            for _ in 0..50 {
                let d = backoff_ms(&s, attempts, &mut rng);
                assert!((1..=ceiling).contains(&d), "{attempts}: {d}");
            }
        }
        // Full jitter: not always the ceiling.
        let ds: HashSet<u64> = (0..20).map(|_| backoff_ms(&s, 10, &mut rng)).collect();
        assert!(ds.len() > 10);
    }

    #[test]
    fn results_map_to_records() {
        let s = settings();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let (a, o, g) = decide(&s, &ev(0), 10, Some(204), None, true, &mut rng);
        assert_eq!(
            (o, g, a.delivered, a.next_attempt_ms),
            (Outcome::Delivered, false, true, None)
        );
        // 410: held, unsent, to the end of the event's life (created at 0,
        // max age 25 h), for the next start; past that, given up.
        let (a, o, g) = decide(&s, &ev(0), 10, Some(410), None, true, &mut rng);
        assert_eq!(
            (o, g, a.delivered, a.held, a.next_attempt_ms),
            (Outcome::Gone, false, false, true, Some(s.max_age_ms))
        );
        let (a, o, g) = decide(&s, &ev(0), s.max_age_ms, Some(410), None, true, &mut rng);
        assert_eq!(
            (o, g, a.held, a.next_attempt_ms),
            (Outcome::Gone, true, false, None)
        );
        // The memory store starts empty: nothing to hold for; it ends.
        let (a, o, g) = decide(&s, &ev(0), 10, Some(410), None, false, &mut rng);
        assert_eq!(
            (o, g, a.held, a.next_attempt_ms),
            (Outcome::Gone, false, false, None)
        );
        let (a, o, g) = decide(&s, &ev(0), 10, Some(500), None, true, &mut rng);
        assert_eq!((o, g), (Outcome::Failed, false));
        assert!(a.next_attempt_ms.is_some_and(|t| (11..=5_010).contains(&t)));
        let (a, _, g) = decide(&s, &ev(3), 10, None, Some("timeout".into()), true, &mut rng);
        assert!(!g && a.next_attempt_ms.is_some());
        assert_eq!(a.error.as_deref(), Some("timeout"));
        // Past max_age: given up.
        let late = s.max_age_ms;
        let (a, o, g) = decide(&s, &ev(30), late, Some(503), None, true, &mut rng);
        assert_eq!((o, g, a.next_attempt_ms), (Outcome::Failed, true, None));
    }

    #[test]
    fn retries_last_at_least_24_hours() {
        // The event ends only when a retry would fall past max_age (25 h);
        // a back-off is at most 1 h, so the last attempt is past 24 h
        // whatever the jitter draws.
        let s = settings();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut e = ev(0);
        let mut now = 0;
        loop {
            let (a, _, given_up) = decide(&s, &e, now, Some(500), None, true, &mut rng);
            if given_up {
                break;
            }
            e.attempts += 1;
            now = a.next_attempt_ms.unwrap();
        }
        assert!(now >= 24 * 3_600_000, "gave up at {now} ms");
    }

    /// A store that keeps every attempt recorded, around the memory store;
    /// while `refuse` is set it fails every record, as a full disk does.
    struct Recording {
        inner: crate::store::memory::MemoryStore,
        attempts: std::sync::Mutex<Vec<(String, DeliveryAttempt)>>,
        refuse: AtomicBool,
    }

    impl Recording {
        fn new(inner: crate::store::memory::MemoryStore) -> Self {
            Recording {
                inner,
                attempts: std::sync::Mutex::new(Vec::new()),
                refuse: AtomicBool::new(false),
            }
        }
    }

    impl Store for Recording {
        fn insert(
            &self,
            v: crate::verification::Verification,
            idem: Option<(String, crate::store::Idempotent)>,
        ) -> crate::store::StoreFuture<'static, ()> {
            self.inner.insert(v, idem)
        }
        fn get(
            &self,
            id: &str,
        ) -> Result<Option<crate::verification::Verification>, crate::store::StoreError> {
            self.inner.get(id)
        }
        fn update(
            &self,
            id: &str,
            f: &mut dyn FnMut(&mut crate::verification::Verification),
        ) -> Result<Option<crate::verification::Verification>, crate::store::StoreError> {
            self.inner.update(id, f)
        }
        fn idempotent(
            &self,
            project: &str,
            key: &str,
        ) -> Result<Option<crate::store::Idempotent>, crate::store::StoreError> {
            self.inner.idempotent(project, key)
        }
        fn expire_due(
            &self,
            now_ms: i64,
        ) -> Result<Vec<crate::verification::Verification>, crate::store::StoreError> {
            self.inner.expire_due(now_ms)
        }
        fn scan(
            &self,
            project: &str,
            from_ms: i64,
            to_ms: i64,
            sink: &mut dyn FnMut(&crate::verification::Verification) -> bool,
        ) -> Result<(), crate::store::StoreError> {
            self.inner.scan(project, from_ms, to_ms, sink)
        }
        fn outbox_due(
            &self,
            now_ms: i64,
            limit: usize,
        ) -> Result<Vec<OutboxEvent>, crate::store::StoreError> {
            self.inner.outbox_due(now_ms, limit)
        }
        fn outbox_record(
            &self,
            id: &str,
            attempt: DeliveryAttempt,
        ) -> Result<(), crate::store::StoreError> {
            if self.refuse.load(Ordering::SeqCst) {
                return Err(crate::store::StoreError::Unavailable(
                    "commit failed: database or disk is full".into(),
                ));
            }
            self.attempts
                .lock()
                .unwrap()
                .push((id.to_string(), attempt.clone()));
            self.inner.outbox_record(id, attempt)
        }
        fn len(&self) -> usize {
            self.inner.len()
        }
    }

    /// Timeouts and connection errors are retried under the same id, each
    /// attempt recorded with its cause; the worker never waits on a
    /// receiver longer than the timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn timeouts_and_connect_errors_are_recorded_and_retried() {
        // `slow` accepts and never answers; `closed` is a port nobody
        // listens on any more.
        let slow = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let slow_addr = slow.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((c, _)) = slow.accept().await {
                conns.push(c);
            }
        });
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);

        let memory = crate::store::memory::MemoryStore::new(
            60_000,
            HashSet::from(["slow".to_string(), "closed".to_string()]),
        );
        let wake = memory.outbox_wake();
        let store = Arc::new(Recording::new(memory));
        let ep = |addr: std::net::SocketAddr| {
            Arc::new(Endpoint {
                url: format!("http://{addr}/hook"),
                key: b"key".to_vec(),
                disabled: AtomicBool::new(false),
            })
        };
        let endpoints = HashMap::from([
            ("slow".to_string(), ep(slow_addr)),
            ("closed".to_string(), ep(closed_addr)),
        ]);
        let settings = Settings {
            timeout: Duration::from_millis(200),
            max_age_ms: 3_600_000,
            concurrency: 4,
            retry_base_ms: 20,
            retry_cap_ms: 100,
            poll: Duration::from_millis(20),
        };
        let worker = tokio::spawn(run(store.clone(), endpoints, settings, wake));
        for (id, project) in [("a", "slow"), ("b", "closed")] {
            store.insert(pending(id, project), None).await.unwrap();
        }
        let end = std::time::Instant::now() + Duration::from_secs(10);
        let (slow_ids, closed_ids) = loop {
            let got = store.attempts.lock().unwrap().clone();
            let by = |cause: &str| -> Vec<String> {
                got.iter()
                    .filter(|(_, a)| a.error.as_deref().is_some_and(|e| e.starts_with(cause)))
                    .map(|(id, a)| {
                        assert!(a.status.is_none() && !a.delivered, "{a:?}");
                        assert!(a.next_attempt_ms.is_some(), "retried: {a:?}");
                        id.clone()
                    })
                    .collect()
            };
            let (t, c) = (by("timeout"), by("connect"));
            if t.len() >= 2 && c.len() >= 2 {
                break (t, c);
            }
            assert!(std::time::Instant::now() < end, "attempts: {got:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // One event each, retried under the same webhook-id.
        assert!(slow_ids.iter().all(|i| *i == slow_ids[0]), "{slow_ids:?}");
        assert!(
            closed_ids.iter().all(|i| *i == closed_ids[0]),
            "{closed_ids:?}"
        );
        assert_ne!(slow_ids[0], closed_ids[0]);
        worker.abort();
        hold.abort();
    }

    /// An event past `max_age` when it comes due (one held after a 410,
    /// released by a start long after) ends unsent, recorded as given up:
    /// no request reaches the receiver. (`max_age_ms` 0 makes every event
    /// that old at once.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_past_its_max_age_is_given_up_unsent() {
        let receiver = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = receiver.local_addr().unwrap();
        let memory =
            crate::store::memory::MemoryStore::new(60_000, HashSet::from(["p".to_string()]));
        let wake = memory.outbox_wake();
        let store = Arc::new(Recording::new(memory));
        let endpoints = endpoint_of_p(addr);
        let settings = quick(Duration::from_millis(200), 0);
        let worker = tokio::spawn(run(store.clone(), endpoints, settings, wake));
        store.insert(pending("a", "p"), None).await.unwrap();
        let end = std::time::Instant::now() + Duration::from_secs(10);
        let got = loop {
            let got = store.attempts.lock().unwrap().clone();
            if !got.is_empty() {
                break got;
            }
            assert!(std::time::Instant::now() < end, "no attempt recorded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let (_, a) = &got[0];
        assert!(
            a.error
                .as_deref()
                .is_some_and(|e| e.starts_with("older than max_age_hours")),
            "{a:?}"
        );
        assert_eq!(
            (a.status, a.next_attempt_ms, a.delivered),
            (None, None, false)
        );
        let accepted = tokio::time::timeout(Duration::from_millis(300), receiver.accept()).await;
        assert!(accepted.is_err(), "the receiver was called");
        assert_eq!(store.attempts.lock().unwrap().len(), 1, "ended: tried once");
        worker.abort();
    }

    /// Project "p"'s endpoint, at `addr`.
    fn endpoint_of_p(addr: std::net::SocketAddr) -> HashMap<String, Arc<Endpoint>> {
        HashMap::from([(
            "p".to_string(),
            Arc::new(Endpoint {
                url: format!("http://{addr}/hook"),
                key: b"key".to_vec(),
                disabled: AtomicBool::new(false),
            }),
        )])
    }

    /// Fast retries and polls, for the worker tests.
    fn quick(timeout: Duration, max_age_ms: i64) -> Settings {
        Settings {
            timeout,
            max_age_ms,
            concurrency: 4,
            retry_base_ms: 20,
            retry_cap_ms: 100,
            poll: Duration::from_millis(20),
        }
    }

    fn pending(id: &str, project: &str) -> crate::verification::Verification {
        let now = crate::engine::now_ms();
        crate::verification::Verification {
            id: id.into(),
            project: project.into(),
            phone: "+447700900123".into(),
            sender: "S".into(),
            code: "1234".into(),
            client_code: true,
            caller: "+447700901234".into(),
            reference: None,
            created_at_ms: now,
            expires_at_ms: now + 60_000,
            attempts_left: 3,
            status: crate::verification::Status::Pending,
            call: Default::default(),
        }
    }

    /// An attempt whose outcome the store cannot record (full disk) is not
    /// sent again while the store refuses: the event stays due in the store,
    /// and the worker used to POST it at every poll. Once the store takes
    /// records again, the held outcome is recorded and the event is done.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_attempt_the_store_cannot_record_is_not_sent_again() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A receiver that answers 200 to every request on every
        // connection, counting them.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let posts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = posts.clone();
        let receiver = tokio::spawn(async move {
            while let Ok((mut c, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        // One whole request (headers and the body their
                        // Content-Length names) per answer.
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                            let len: usize = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse().ok())
                                .unwrap_or(0);
                            if buf.len() < end + 4 + len {
                                break;
                            }
                            buf.drain(..end + 4 + len);
                            counted.fetch_add(1, Ordering::SeqCst);
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                            if c.write_all(ok).await.is_err() {
                                return;
                            }
                        }
                        match c.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });

        let memory =
            crate::store::memory::MemoryStore::new(60_000, HashSet::from(["p".to_string()]));
        let wake = memory.outbox_wake();
        let store = Arc::new(Recording::new(memory));
        store.refuse.store(true, Ordering::SeqCst);
        let endpoints = endpoint_of_p(addr);
        let settings = quick(Duration::from_secs(5), 3_600_000);
        store.insert(pending("v", "p"), None).await.unwrap();
        let worker = tokio::spawn(run(store.clone(), endpoints, settings, wake));

        // The first POST, then half a second of polls every 10 ms while the
        // store refuses its record.
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while posts.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < end, "no delivery");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A second event meanwhile waits: no new delivery starts while an
        // outcome is unrecorded.
        store.insert(pending("w", "p"), None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            posts.load(Ordering::SeqCst),
            1,
            "sent while an outcome was unrecorded"
        );
        assert!(store.attempts.lock().unwrap().is_empty());

        // The store takes records again: the held outcome is recorded
        // (delivered) without a second POST of its event, and then the
        // waiting event goes out once.
        store.refuse.store(false, Ordering::SeqCst);
        let got = loop {
            let got = store.attempts.lock().unwrap().clone();
            if got.len() >= 2 {
                break got;
            }
            assert!(std::time::Instant::now() < end, "recorded: {got:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(store.attempts.lock().unwrap().len(), 2, "{got:?}");
        assert!(
            got.iter()
                .all(|(_, a)| a.delivered && a.status == Some(200)),
            "{got:?}"
        );
        assert_ne!(got[0].0, got[1].0, "two events, each recorded once");
        assert_eq!(posts.load(Ordering::SeqCst), 2, "each event POSTed once");
        assert!(store
            .outbox_due(crate::engine::now_ms(), 10)
            .unwrap()
            .is_empty());
        worker.abort();
        receiver.abort();
    }
}
