//! The SIP side of `flashcall serve`: per-trunk INVITE queues paced by CPS,
//! the pure endpoint driven by [`crate::io::udp::run`], and call outcomes
//! written back to the store.
//!
//! Where the driver runs is `sip.thread` (config::SipThread): on a thread
//! of its own, where the SIP loop never waits behind HTTP work (the
//! 180 -> CANCEL delay is the product's edge), or as a task on the HTTP
//! runtime's one worker, which saves the wake-ups of two threads handing
//! work to each other and gives up that isolation: a handler's work (a
//! point read of SQLite for a finished call's check, say) delays the next
//! tick by as long. HTTP handlers talk to it through [`EngineShared`]: one
//! inbox behind a mutex (held for a push or a swap, never across I/O) and
//! a `Notify`; no task, channel or lock per call.

use governor::clock::{Clock, DefaultClock};
use governor::{Quota, RateLimiter};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

use crate::io::udp;
use crate::metrics::{self as m, CallMetrics, TrunkMetrics};
use crate::sip::{
    CallRequest, CallerId, Credentials, Endpoint, EndpointConfig, Event, Outcome, TimerConfig,
};
use crate::store::Store;
use crate::verification::{CallRecord, Status};

/// A trunk as the engine uses it.
#[derive(Debug, Clone)]
pub struct Trunk {
    pub name: String,
    pub addr: SocketAddr,
    /// `host:port` as configured: the Request-URI's host part.
    pub host: String,
    pub cps: u32,
    pub queue_cap: usize,
    pub weight: u32,
    pub credentials: Option<Credentials>,
    pub caller_id: CallerId,
}

/// One call to place for a verification.
#[derive(Debug, Clone)]
pub struct CallCmd {
    pub id: String,
    pub project: String,
    pub trunk: usize,
    pub to: String,
    pub caller: String,
}

/// Why no trunk can take a call now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// Every usable trunk's queue is full.
    QueueFull,
    /// Every trunk is backing off after a 503; the first is back in this
    /// many whole seconds (rounded up, at least 1).
    BackingOff {
        retry_after_secs: u64,
    },
    ShuttingDown,
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The part of the engine the HTTP side sees.
pub struct EngineShared {
    pub trunks: Vec<Trunk>,
    inbox: Mutex<Vec<CallCmd>>,
    queued: Vec<AtomicUsize>,
    backoff_until_ms: Vec<AtomicI64>,
    notify: Arc<Notify>,
    shutting_down: AtomicBool,
}

/// A reserved place in a trunk's queue; released unless sent. It owns a
/// handle to the engine so that a create whose request was dropped can
/// still send its call from a task of its own (see `http::Accepted`).
pub struct Reservation {
    shared: Arc<EngineShared>,
    trunk: usize,
    sent: bool,
}

impl Reservation {
    pub fn trunk(&self) -> usize {
        self.trunk
    }

    pub fn send(mut self, cmd: CallCmd) {
        debug_assert_eq!(cmd.trunk, self.trunk);
        self.sent = true;
        match self.shared.inbox.lock() {
            Ok(mut inbox) => inbox.push(cmd),
            // A panic elsewhere poisoned it; the data is still a Vec.
            Err(p) => p.into_inner().push(cmd),
        }
        self.shared.notify.notify_one();
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.sent {
            self.shared.queued[self.trunk].fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl EngineShared {
    pub fn new(trunks: Vec<Trunk>) -> Self {
        let n = trunks.len();
        EngineShared {
            trunks,
            inbox: Mutex::new(Vec::new()),
            queued: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            backoff_until_ms: (0..n).map(|_| AtomicI64::new(0)).collect(),
            notify: Arc::new(Notify::new()),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// Chooses a trunk by weight among those not backing off after a 503
    /// and with room in their queue, and reserves a place in its queue.
    pub fn reserve(
        self: &Arc<Self>,
        now_ms: i64,
        rng: &mut impl Rng,
    ) -> Result<Reservation, Unavailable> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(Unavailable::ShuttingDown);
        }
        let healthy: Vec<usize> = (0..self.trunks.len())
            .filter(|&i| self.backoff_until_ms[i].load(Ordering::Acquire) <= now_ms)
            .collect();
        if healthy.is_empty() {
            let first_back = self
                .backoff_until_ms
                .iter()
                .map(|b| b.load(Ordering::Acquire))
                .min()
                .unwrap_or(now_ms);
            let ms = u64::try_from(first_back - now_ms).unwrap_or(0);
            return Err(Unavailable::BackingOff {
                retry_after_secs: ms.div_ceil(1000).max(1),
            });
        }
        let mut candidates = healthy;
        while !candidates.is_empty() {
            let total: u64 = candidates
                .iter()
                .map(|&i| u64::from(self.trunks[i].weight))
                .sum();
            let mut x = rng.gen_range(0..total);
            let mut pos = 0;
            for (k, &i) in candidates.iter().enumerate() {
                let w = u64::from(self.trunks[i].weight);
                if x < w {
                    pos = k;
                    break;
                }
                x -= w;
            }
            let i = candidates[pos];
            let cap = self.trunks[i].queue_cap;
            let reserved = self.queued[i]
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                    (q < cap).then_some(q + 1)
                })
                .is_ok();
            if reserved {
                return Ok(Reservation {
                    shared: Arc::clone(self),
                    trunk: i,
                    sent: false,
                });
            }
            candidates.swap_remove(pos);
        }
        Err(Unavailable::QueueFull)
    }

    /// Stops taking calls; the driver cancels what is in flight.
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    /// Moves every submitted call into `out` (swapping buffers, so the lock
    /// is held for a pointer swap). Their queue places stay taken until
    /// [`EngineShared::dequeued`].
    pub fn take_submitted(&self, out: &mut Vec<CallCmd>) {
        let mut inbox = match self.inbox.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        std::mem::swap(&mut *inbox, out);
    }

    /// A call left `trunk`'s queue (its INVITE went out, or it was dropped).
    pub fn dequeued(&self, trunk: usize) {
        self.queued[trunk].fetch_sub(1, Ordering::AcqRel);
    }

    pub fn queued(&self, trunk: usize) -> usize {
        self.queued[trunk].load(Ordering::Acquire)
    }
}

/// Call settings for every call the engine places.
#[derive(Debug, Clone, Copy)]
pub struct CallSettings {
    pub ring: Duration,
    pub ring_timeout: Duration,
    pub shutdown_grace: Duration,
    /// The UDP driver's coalescing tick (`sip.batch_window_us`).
    pub batch_window: Duration,
}

type Limiter = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    DefaultClock,
    governor::middleware::NoOpMiddleware<<DefaultClock as Clock>::Instant>,
>;

struct Active {
    id: String,
    project: String,
    trunk: usize,
}

/// The driver's application: moves calls from the queues into the endpoint
/// and outcomes into the store.
struct Driver {
    shared: Arc<EngineShared>,
    store: Arc<dyn Store>,
    settings: CallSettings,
    queues: Vec<VecDeque<CallCmd>>,
    limiters: Vec<Limiter>,
    clock: DefaultClock,
    calls: HashMap<u64, Active>,
    /// Calls placed so far: the sequence part of the next tag.
    next_seq: u64,
    /// Converts the endpoint's Instants into wall-clock milliseconds.
    epoch: (Instant, i64),
    trunk_metrics: Vec<TrunkMetrics>,
    metrics: CallMetrics,
    stats_seen: crate::sip::Stats,
    shutdown_at: Option<Instant>,
    swap: Vec<CallCmd>,
    /// `flashcall_sip_responses_total` handles by (trunk index, code).
    responses: HashMap<(usize, u16), metrics::Counter>,
    /// When a receive-queue overflow was last logged (at most once a
    /// minute; the counter has every one).
    drops_logged: Option<Instant>,
    /// Per trunk: 503s without Retry-After since its last other answer.
    plain_503s: Vec<u32>,
}

/// 503s without Retry-After in a row after which a trunk is given
/// [`PLAIN_503_BACKOFF_SECS`] of rest. One alone is the call's own failure:
/// RFC 3261 §21.5.4 says to take a 503 without Retry-After as a 500, and
/// carriers map per-call causes (no circuit, congestion on one route:
/// Q.850 34/38/41/42, RFC 3398) to 503. Backing the whole trunk off on
/// each one refused every create for 5 s because one destination's route
/// was busy. A trunk that answers everything 503 still gets rest.
const PLAIN_503_STREAK: u32 = 5;
const PLAIN_503_BACKOFF_SECS: u32 = 5;
/// Rest for a trunk the transport reports unreachable (its calls end
/// `trunk_error` with no SIP code): as long as a plain 503 streak's. After
/// it one round of calls finds out whether the trunk is back.
const UNREACHABLE_BACKOFF_SECS: u32 = 5;
/// The longest rest after a 503 that the calls already queued for the
/// trunk wait out; past it they end unplaced (see `Driver::poll`).
const QUEUE_HOLD_MAX_MS: i64 = 10_000;
/// Retry-After is honoured up to an hour: a larger value (or a garbled
/// one near u32::MAX) would take the trunk out for days.
const RETRY_AFTER_MAX_SECS: u32 = 3_600;

impl Driver {
    fn wall(&self, at: Instant) -> i64 {
        let (i0, w0) = self.epoch;
        if at >= i0 {
            w0 + (at - i0).as_millis() as i64
        } else {
            w0 - (i0 - at).as_millis() as i64
        }
    }

    /// The tag of the next call to trunk `t`: the trunk is in it (tag mod
    /// the number of trunks), so what comes after a call has left `calls`
    /// (the 200 to our BYE, a retransmitted final, a late 503) is put down
    /// to its own trunk even when several trunks share one SBC address.
    fn next_tag(&mut self, t: usize) -> u64 {
        let tag = call_tag(self.next_seq, t, self.shared.trunks.len());
        self.next_seq += 1;
        tag
    }

    /// The trunk a call's tag names (see `next_tag`).
    fn trunk_of(&self, tag: u64) -> Option<usize> {
        tag_trunk(tag, self.shared.trunks.len())
    }

    /// Trunk `t` gets no INVITE for `secs` from `from` (its 503 asked, or
    /// a streak of them: see PLAIN_503_STREAK, or it is unreachable);
    /// creates meanwhile get 503.
    fn rest_trunk(&self, t: usize, from: Instant, secs: u32, why: &'static str) {
        let secs = secs.min(RETRY_AFTER_MAX_SECS);
        let until = self.wall(from) + i64::from(secs) * 1000;
        let before = self.shared.backoff_until_ms[t].fetch_max(until, Ordering::AcqRel);
        // Only when the trunk was not resting already: not once per call
        // that ends with the reason (a sweep of an unreachable trunk ends
        // many, and the calls in flight there end over the next sweeps).
        if before <= self.wall(from) {
            tracing::warn!(trunk = %self.shared.trunks[t].name, secs, "trunk {why}: backing off");
        }
    }

    fn start(&mut self, now: Instant, ep: &mut Endpoint<StdRng>, cmd: CallCmd) {
        self.shared.dequeued(cmd.trunk);
        let shared = self.shared.clone();
        let trunk = &shared.trunks[cmd.trunk];
        let at_ms = self.wall(now);
        // A verification that expired (or was checked) while it waited in
        // the queue must not ring anyone's phone.
        let mut placed = false;
        let updated = self.store.update_status(&cmd.id, &mut |v| {
            if !v.status.is_final() && !v.expire_if_due(at_ms) {
                v.call_started(&trunk.name, at_ms);
                placed = true;
            }
        });
        match updated {
            Ok(Some(status)) if placed => m::verification(&cmd.project, status),
            Ok(Some(status)) => {
                if status == Status::Expired {
                    m::verification(&cmd.project, Status::Expired);
                }
                return;
            }
            Ok(None) => return,
            Err(e) => {
                tracing::error!(id = %cmd.id, error = %e, "store update failed; call not placed");
                return;
            }
        }
        let tag = self.next_tag(cmd.trunk);
        ep.start_call(
            now,
            CallRequest {
                trunk: trunk.addr,
                trunk_host: trunk.host.clone(),
                to: cmd.to,
                caller: cmd.caller,
                caller_id: trunk.caller_id,
                ring: self.settings.ring,
                ring_timeout: self.settings.ring_timeout,
                credentials: trunk.credentials.clone(),
                tag,
            },
        );
        self.metrics.in_flight.increment(1.0);
        self.calls.insert(
            tag,
            Active {
                id: cmd.id,
                project: cmd.project,
                trunk: cmd.trunk,
            },
        );
    }
}

/// Tag of call number `seq` to trunk `t` of `trunks`: `seq · trunks + t`,
/// so `tag mod trunks` gives the trunk back ([`tag_trunk`]) and tags stay
/// unique (wrapping after 2^64 / trunks calls, centuries at any rate).
fn call_tag(seq: u64, t: usize, trunks: usize) -> u64 {
    seq.wrapping_mul(trunks.max(1) as u64)
        .wrapping_add(t as u64)
}

/// The trunk [`call_tag`] put in `tag`.
fn tag_trunk(tag: u64, trunks: usize) -> Option<usize> {
    (trunks > 0).then(|| (tag % trunks as u64) as usize)
}

impl Driver {
    /// Closes the queued calls that shutdown leaves unplaced: each
    /// verification becomes `failed` with call outcome `interrupted` now,
    /// with its status change (and webhook event) written like any other.
    /// Left `pending`, they waited for the next start's recovery to be
    /// closed the same way, and the memory store lost them.
    fn close_unplaced(&mut self) {
        for t in 0..self.queues.len() {
            self.close_queued(t, Outcome::Interrupted);
        }
    }

    /// Closes the calls queued for trunk `t` unplaced, with `outcome`:
    /// each verification becomes `failed`, with no call times (never
    /// invited), its status change and webhook event written as any other.
    fn close_queued(&mut self, t: usize, outcome: Outcome) {
        let trunk = self.shared.trunks[t].name.clone();
        while let Some(cmd) = self.queues[t].pop_front() {
            self.shared.dequeued(t);
            let mut before = Status::Pending;
            let closed = self.store.update_status(&cmd.id, &mut |v| {
                before = v.status;
                if matches!(v.status, Status::Pending | Status::Calling) {
                    v.call_ended(
                        outcome,
                        // Never invited: no call times, as the next
                        // start's recovery writes them.
                        CallRecord {
                            trunk: trunk.clone(),
                            ..Default::default()
                        },
                    );
                }
            });
            match closed {
                Ok(Some(status)) if status != before => {
                    self.trunk_metrics[t].call(outcome).increment(1);
                    m::verification(&cmd.project, status);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(id = %cmd.id, error = %e, "store update failed; an unplaced call was not closed")
                }
            }
        }
        self.trunk_metrics[t].queue.set(0.0);
    }
}

impl udp::App for Driver {
    fn poll(&mut self, now: Instant, ep: &mut Endpoint<StdRng>) -> Option<Instant> {
        self.shared.take_submitted(&mut self.swap);
        for cmd in self.swap.drain(..) {
            self.queues[cmd.trunk].push_back(cmd);
        }
        let stats = ep.stats();
        self.metrics
            .parse_errors
            .increment(stats.parse_errors - self.stats_seen.parse_errors);
        self.metrics
            .stray
            .increment(stats.stray_responses - self.stats_seen.stray_responses);
        self.metrics
            .transport_failures
            .increment(stats.transport_failures - self.stats_seen.transport_failures);
        self.stats_seen = stats;

        if self.shared.shutting_down.load(Ordering::Acquire) {
            if self.shutdown_at.is_none() {
                self.shutdown_at = Some(now);
                let waiting: usize = self.queues.iter().map(VecDeque::len).sum();
                tracing::info!(
                    in_flight = ep.active_calls(),
                    queued = waiting,
                    "shutting down: cancelling calls in flight; queued calls are not placed \
                     and are closed as failed (interrupted)"
                );
                for h in ep.active_handles() {
                    ep.cancel_call(now, h);
                }
                // The CANCELs go out at the end of this turn; the queues
                // (up to 10 s of calls, a store update each) are closed on
                // the next, at once.
                return Some(now);
            }
            // Every poll of the grace period: creates that were waiting for
            // their commit at the signal still submit their calls.
            self.close_unplaced();
            return self.shutdown_at.map(|t| t + self.settings.shutdown_grace);
        }

        let mut next: Option<Instant> = None;
        let now_ms = self.wall(now);
        for t in 0..self.queues.len() {
            // A trunk backing off after a 503 gets no INVITE until its
            // Retry-After has passed (RFC 3261 §21.5.4: SHOULD NOT forward
            // other requests for the duration), the queued ones included:
            // they wait in its queue (creates meanwhile get 503 from
            // `reserve`), and one that expires meanwhile rings no one.
            let back_at = self.shared.backoff_until_ms[t].load(Ordering::Acquire);
            if back_at > now_ms && !self.queues[t].is_empty() {
                if back_at - now_ms > QUEUE_HOLD_MAX_MS {
                    // A long rest (maintenance): the callers have been told
                    // 201 and wait for a call; holding them past this would
                    // let their codes expire unseen. They end now as
                    // `trunk_error` (never invited), and a client's retry
                    // goes to a trunk that takes calls, or gets 503 with
                    // the Retry-After.
                    tracing::warn!(
                        trunk = %self.shared.trunks[t].name,
                        queued = self.queues[t].len(),
                        "trunk resting after 503: its queued calls end unplaced as trunk_error"
                    );
                    self.close_queued(t, Outcome::TrunkError);
                } else {
                    let wait = u64::try_from(back_at - now_ms).unwrap_or(0);
                    let at = now + Duration::from_millis(wait);
                    next = Some(next.map_or(at, |n: Instant| n.min(at)));
                    self.trunk_metrics[t].queue.set(self.queues[t].len() as f64);
                }
                continue;
            }
            while !self.queues[t].is_empty() {
                match self.limiters[t].check() {
                    Ok(()) => {
                        if let Some(cmd) = self.queues[t].pop_front() {
                            self.start(now, ep, cmd);
                        }
                    }
                    Err(nu) => {
                        let at = now + nu.wait_time_from(self.clock.now());
                        next = Some(next.map_or(at, |n: Instant| n.min(at)));
                        break;
                    }
                }
            }
            self.trunk_metrics[t].queue.set(self.queues[t].len() as f64);
        }
        next
    }

    fn on_event(&mut self, _ep: &mut Endpoint<StdRng>, event: Event) {
        match event {
            Event::Response { tag, code } => {
                // A call that has its outcome is gone from `calls`, but the
                // responses after it (the 200 to our BYE, a retransmitted
                // final, a late 2xx from a fork) are the trunk's answers too:
                // its tag still names the trunk.
                let t = match self.calls.get(&tag) {
                    Some(a) => Some(a.trunk),
                    None => self.trunk_of(tag),
                };
                if let Some(t) = t {
                    let trunks = &self.shared.trunks;
                    self.responses
                        .entry((t, code))
                        .or_insert_with(|| m::sip_response(&trunks[t].name, code))
                        .increment(1);
                }
            }
            Event::Ringing { .. } => {}
            Event::TrunkRetryAfter { tag, secs } => {
                if let Some(t) = self.trunk_of(tag) {
                    self.rest_trunk(t, Instant::now(), secs, "answered 503");
                }
            }
            Event::Ended(r) => {
                let Some(a) = self.calls.remove(&r.tag) else {
                    return;
                };
                self.metrics.in_flight.decrement(1.0);
                self.trunk_metrics[a.trunk].call(r.outcome).increment(1);
                if let Some(d) = r.post_dial_delay() {
                    self.metrics.post_dial.record(d.as_secs_f64());
                }
                if let Some(d) = r.cancel_delay() {
                    self.metrics.cancel.record(d.as_secs_f64());
                }
                // Honour Retry-After; without one, rest the trunk only
                // after PLAIN_503_STREAK such 503s with no other answer
                // between them (see there).
                let rest = match (r.outcome, r.retry_after) {
                    // No SIP code: the transport said the trunk cannot be
                    // reached (ICMP unreachable, no route). That is about
                    // the trunk, not one destination's route: rest it at
                    // once, so creates go to the other trunks (or get 503)
                    // instead of failing one after another.
                    (Outcome::TrunkError, _) if r.sip_code.is_none() => {
                        Some(UNREACHABLE_BACKOFF_SECS)
                    }
                    (Outcome::TrunkError, Some(secs)) => Some(secs),
                    (Outcome::TrunkError, None) => {
                        let n = &mut self.plain_503s[a.trunk];
                        *n += 1;
                        (*n >= PLAIN_503_STREAK).then(|| {
                            *n = 0;
                            PLAIN_503_BACKOFF_SECS
                        })
                    }
                    // A timeout proves nothing about the trunk's health;
                    // any other answer (or a delivered call) ends a streak.
                    (Outcome::Delivered, _) => {
                        self.plain_503s[a.trunk] = 0;
                        None
                    }
                    _ => {
                        if r.sip_code.is_some() {
                            self.plain_503s[a.trunk] = 0;
                        }
                        None
                    }
                };
                if let Some(secs) = rest {
                    let why = match r.sip_code {
                        None => "unreachable (ICMP or no route)",
                        Some(_) => "answered 503",
                    };
                    self.rest_trunk(a.trunk, r.ended_at, secs, why);
                }
                let record = CallRecord {
                    trunk: self.shared.trunks[a.trunk].name.clone(),
                    outcome: Some(r.outcome),
                    sip_code: r.sip_code,
                    invited_at_ms: Some(self.wall(r.invited_at)),
                    ringing_at_ms: r.ringing_at.map(|t| self.wall(t)),
                    cancel_at_ms: r.cancel_at.map(|t| self.wall(t)),
                    ended_at_ms: Some(self.wall(r.ended_at)),
                };
                let mut before = Status::Pending;
                match self.store.update_status(&a.id, &mut |v| {
                    before = v.status;
                    v.call_ended(r.outcome, record.clone());
                }) {
                    Ok(Some(status)) if status != before => m::verification(&a.project, status),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(id = %a.id, error = %e, "store update failed; call outcome not recorded")
                    }
                }
            }
        }
    }

    fn done(&self, ep: &Endpoint<StdRng>) -> bool {
        match self.shutdown_at {
            // Also until no queue place is taken: a create that was waiting
            // for its commit at the signal still submits its call, which
            // `close_unplaced` must see (bounded by the grace, as the calls
            // in flight are).
            Some(t) => {
                let settled = ep.active_calls() == 0
                    && (0..self.queues.len()).all(|q| self.shared.queued(q) == 0);
                settled || Instant::now() >= t + self.settings.shutdown_grace
            }
            None => false,
        }
    }

    fn waker(&self) -> Option<Arc<Notify>> {
        Some(self.shared.notify.clone())
    }

    fn on_receive_drops(&mut self, n: u64) {
        self.metrics.receive_drops.increment(n);
        let now = Instant::now();
        if self
            .drops_logged
            .is_none_or(|t| now >= t + Duration::from_secs(60))
        {
            self.drops_logged = Some(now);
            tracing::warn!(
                dropped = n,
                "the SIP socket's receive queue overflowed: the kernel dropped datagrams \
                 (counted in flashcall_sip_receive_drops_total); calls rely on \
                 retransmissions, and the machine or the SIP thread is overloaded"
            );
        }
    }
}

/// What our requests advertise, from the bound address and
/// `sip.public_host` (SPEC §2: the host of Via, Contact and From): the
/// address of the SDP offer, and the Via sent-by / Contact `host:port`
/// when it is not the bound address (`None`). The port is always the bound
/// one. `public_host` is used as given (a hostname too), except a
/// loopback `public_host`, the default, beside a specific non-loopback
/// bind: that is an operator who set `listen` and not `public_host`, and a
/// loopback Via or Contact can never be reached from a trunk, so the bound
/// address is kept. `resolved`: a hostname `public_host` looked up (the
/// SDP offer needs an address; the bound one without it).
fn advertise(
    bound: SocketAddr,
    public_host: &str,
    resolved: Option<IpAddr>,
) -> (IpAddr, Option<String>) {
    let port = bound.port();
    match public_host.parse::<IpAddr>() {
        Ok(ip) if ip == bound.ip() => (ip, None),
        Ok(ip) if ip.is_loopback() && !bound.ip().is_unspecified() && !bound.ip().is_loopback() => {
            (bound.ip(), None)
        }
        Ok(ip) => (ip, Some(SocketAddr::new(ip, port).to_string())),
        Err(_) => (
            resolved.unwrap_or(bound.ip()),
            Some(format!("{public_host}:{port}")),
        ),
    }
}

/// Runs the SIP driver until shutdown; returns how many calls were still
/// without an outcome when the grace period ended.
pub async fn run(
    socket: tokio::net::UdpSocket,
    public_host: &str,
    user_agent: &str,
    shared: Arc<EngineShared>,
    store: Arc<dyn Store>,
    settings: CallSettings,
) -> std::io::Result<usize> {
    let bound = socket.local_addr()?;
    // A hostname: the SDP offer needs an address, looked up once here
    // (bounded: a resolver that does not answer must not hold the start).
    let resolved = if public_host.parse::<IpAddr>().is_err() {
        let lookup = tokio::net::lookup_host((public_host, 0));
        match tokio::time::timeout(Duration::from_secs(2), lookup).await {
            Ok(Ok(mut addrs)) => addrs.next().map(|a| a.ip()),
            Ok(Err(e)) => {
                tracing::warn!(public_host, error = %e, "sip.public_host does not resolve: the SDP offer carries the bound address");
                None
            }
            Err(_) => {
                tracing::warn!(public_host, "sip.public_host: no DNS answer in 2 s: the SDP offer carries the bound address");
                None
            }
        }
    } else {
        None
    };
    let (media_ip, sent_by) = advertise(bound, public_host, resolved);
    if bound.ip().is_unspecified() && media_ip.is_loopback() {
        tracing::warn!(
            public_host,
            "sip.listen is a wildcard address and sip.public_host a loopback one: Via and \
             Contact name loopback, which no remote trunk can reach; set sip.public_host"
        );
    }
    // Kept to the end of the run: dropping it stops the sink.
    let (media, _rtp) = crate::io::rtp::spawn_sink(SocketAddr::new(bound.ip(), 0)).await?;
    let mut ep = Endpoint::new(
        EndpointConfig {
            timers: TimerConfig::default(),
            local: bound,
            sent_by,
            public_host: public_host.to_string(),
            user_agent: user_agent.to_string(),
            media: SocketAddr::new(media_ip, media.port()),
        },
        StdRng::from_entropy(),
    );
    let limiters = shared
        .trunks
        .iter()
        .map(|t| {
            // A burst of 10 ms worth of calls: more than the driver's
            // coalescing tick (`sip.batch_window_us`, 500 µs by default; a
            // window configured longer than 10 ms paces calls in bursts per
            // tick instead), and a burst of 1 at high CPS would wake it
            // once per call.
            let cps = NonZeroU32::new(t.cps).unwrap_or(NonZeroU32::MIN);
            let burst = NonZeroU32::new((t.cps / 100).max(1)).unwrap_or(NonZeroU32::MIN);
            RateLimiter::direct(Quota::per_second(cps).allow_burst(burst))
        })
        .collect();
    let n_trunks = shared.trunks.len();
    let mut driver = Driver {
        queues: shared.trunks.iter().map(|_| VecDeque::new()).collect(),
        trunk_metrics: shared
            .trunks
            .iter()
            .map(|t| TrunkMetrics::new(&t.name))
            .collect(),
        shared,
        store,
        settings,
        limiters,
        clock: DefaultClock::default(),
        calls: HashMap::new(),
        next_seq: 0,
        epoch: (Instant::now(), now_ms()),
        metrics: CallMetrics::new(),
        stats_seen: Default::default(),
        drops_logged: None,
        plain_503s: vec![0; n_trunks],
        shutdown_at: None,
        swap: Vec::new(),
        responses: HashMap::new(),
    };
    let window = driver.settings.batch_window;
    udp::run(&socket, &mut ep, &mut driver, window).await;
    Ok(ep.active_calls())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trunk(name: &str, weight: u32, queue_cap: usize) -> Trunk {
        Trunk {
            name: name.into(),
            addr: "127.0.0.1:5070".parse().unwrap(),
            host: "127.0.0.1:5070".into(),
            cps: 10,
            queue_cap,
            weight,
            credentials: None,
            caller_id: CallerId::From,
        }
    }

    fn cmd(trunk: usize) -> CallCmd {
        CallCmd {
            id: "v".into(),
            project: "p".into(),
            trunk,
            to: "+447911123456".into(),
            caller: "+447700900001".into(),
        }
    }

    /// A call's tag gives its trunk back after the call has left the
    /// driver's table (late responses, a late 503), whatever the trunks'
    /// addresses: before, that took the first trunk with the response's
    /// address, so of two trunks on one SBC address the second's late
    /// responses were counted (and its 503 rests taken) as the first's.
    #[test]
    fn a_calls_tag_names_its_trunk() {
        for trunks in 1..=5usize {
            let mut seen = std::collections::HashSet::new();
            for seq in [0u64, 1, 2, 7, 1_000_003, u64::MAX / 8] {
                for t in 0..trunks {
                    let tag = call_tag(seq, t, trunks);
                    assert_eq!(tag_trunk(tag, trunks), Some(t), "{seq} {t} of {trunks}");
                    assert!(seen.insert(tag), "tag {tag} given twice");
                }
            }
        }
        assert_eq!(tag_trunk(5, 0), None);
    }

    #[test]
    fn trunks_share_calls_by_weight() {
        let e = Arc::new(EngineShared::new(vec![
            trunk("a", 3, 1_000_000),
            trunk("b", 1, 1_000_000),
        ]));
        let mut rng = StdRng::seed_from_u64(7);
        let mut per = [0u32; 2];
        for _ in 0..40_000 {
            let r = e.reserve(0, &mut rng).unwrap();
            per[r.trunk()] += 1;
            let t = r.trunk();
            r.send(cmd(t));
        }
        // 3:1 expected, 30,000 vs 10,000; binomial sd ~87, so 5 sd = 435.
        assert!((per[0] as i64 - 30_000).abs() < 435, "{per:?}");
        assert_eq!(e.queued(0) + e.queued(1), 40_000);
    }

    #[test]
    fn full_queue_spills_to_the_other_trunk_then_refuses() {
        let e = Arc::new(EngineShared::new(vec![trunk("a", 1, 2), trunk("b", 1, 1)]));
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..3 {
            let r = e.reserve(0, &mut rng).unwrap();
            let t = r.trunk();
            r.send(cmd(t));
        }
        assert_eq!((e.queued(0), e.queued(1)), (2, 1));
        assert!(matches!(
            e.reserve(0, &mut rng),
            Err(Unavailable::QueueFull)
        ));
        // The driver takes one from trunk a: its place comes back.
        let mut out = Vec::new();
        e.take_submitted(&mut out);
        assert_eq!(out.len(), 3);
        e.dequeued(0);
        assert_eq!(e.reserve(0, &mut rng).unwrap().trunk(), 0);
    }

    #[test]
    fn an_unsent_reservation_gives_its_place_back() {
        let e = Arc::new(EngineShared::new(vec![trunk("a", 1, 1)]));
        let mut rng = StdRng::seed_from_u64(1);
        drop(e.reserve(0, &mut rng).unwrap());
        assert_eq!(e.queued(0), 0);
        assert!(e.reserve(0, &mut rng).is_ok());
    }

    #[test]
    fn backing_off_trunks_are_skipped_until_retry_after_passes() {
        let e = Arc::new(EngineShared::new(vec![
            trunk("a", 1, 10),
            trunk("b", 1, 10),
        ]));
        e.backoff_until_ms[0].store(5_000, Ordering::Release);
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..50 {
            assert_eq!(e.reserve(4_999, &mut rng).unwrap().trunk(), 1);
        }
        e.backoff_until_ms[1].store(5_000, Ordering::Release);
        assert!(matches!(
            e.reserve(4_999, &mut rng),
            Err(Unavailable::BackingOff {
                retry_after_secs: 1
            })
        ));
        assert!(e.reserve(5_000, &mut rng).is_ok());
        // Retry-After: until the first trunk is back, rounded up.
        e.backoff_until_ms[0].store(12_000, Ordering::Release);
        e.backoff_until_ms[1].store(7_500, Ordering::Release);
        assert!(matches!(
            e.reserve(5_000, &mut rng),
            Err(Unavailable::BackingOff {
                retry_after_secs: 3
            })
        ));
        assert!(e.reserve(7_500, &mut rng).is_ok());
        e.shutdown();
        assert!(matches!(
            e.reserve(6_000, &mut rng),
            Err(Unavailable::ShuttingDown)
        ));
    }

    /// Via/Contact and the SDP address from `listen` and `public_host`.
    #[test]
    fn advertise_uses_public_host_except_a_default_loopback_one() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // The defaults: loopback both.
        assert_eq!(
            advertise(a("127.0.0.1:5060"), "127.0.0.1", None),
            (ip("127.0.0.1"), None)
        );
        // Wildcard bind, public address: that address, the bound port.
        assert_eq!(
            advertise(a("0.0.0.0:5060"), "203.0.113.5", None),
            (ip("203.0.113.5"), Some("203.0.113.5:5060".into()))
        );
        // Behind NAT: a private bind, the public address advertised.
        assert_eq!(
            advertise(a("10.0.0.5:5062"), "203.0.113.5", None),
            (ip("203.0.113.5"), Some("203.0.113.5:5062".into()))
        );
        // `listen` set, `public_host` left at its loopback default: the
        // bound address, not an unreachable 127.0.0.1.
        assert_eq!(
            advertise(a("10.0.0.5:5060"), "127.0.0.1", None),
            (ip("10.0.0.5"), None)
        );
        // A hostname: in Via and Contact as given; the SDP carries what it
        // resolved to, else the bound address.
        assert_eq!(
            advertise(
                a("0.0.0.0:5060"),
                "sip.example.com",
                Some(ip("198.51.100.7"))
            ),
            (ip("198.51.100.7"), Some("sip.example.com:5060".into()))
        );
        assert_eq!(
            advertise(a("10.0.0.5:5060"), "sip.example.com", None),
            (ip("10.0.0.5"), Some("sip.example.com:5060".into()))
        );
        // IPv6: bracketed in sent-by.
        assert_eq!(
            advertise(a("[::]:5060"), "2001:db8::1", None),
            (ip("2001:db8::1"), Some("[2001:db8::1]:5060".into()))
        );
    }
}
