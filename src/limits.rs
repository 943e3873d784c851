//! Request limits (SPEC §5): per project on governor's GCRA (`rate`,
//! `burst`), and per destination phone (`limits.per_phone`) as a sliding
//! window of its sends. The per-trunk CPS limiter lives with the SIP
//! driver, which paces its INVITE queue.
//!
//! Why not governor for the phones too (it was, until session 13): GCRA
//! with a burst of `max` refilled one every `per_secs/max` lets through
//! `max` at once and then one more every interval, so `max = 3` per 600 s
//! passed 5 sends within 600 s (at 0, 0, 0, 200 and 400 s). The config
//! says "sends to one destination within this many seconds", and for
//! flash calls that cap is what stops a number being flooded (or pumped
//! for fraud): a destination keeps the times of its sends within the
//! window (at most `max` of them; ~56 bytes a destination with up to 4
//! inline), and a send passes while
//! fewer than `max` are there. The log also allows what GCRA cannot: a
//! send given back ([`Limits::refund`]) when the create failed after it
//! counted (its record could not be stored), so a failing disk does not
//! use up the destinations' allowance for a call that never came.
//!
//! Why a sweep: a destination's entry is not dropped by itself, so a
//! client sending to a million distinct phones would grow the map without
//! bound. [`Limits::sweep`] drops entries with no send left in the window
//! (indistinguishable from fresh), which loses nothing. Housekeeping
//! sweeps every 10 s, and at each 1 s tick while `max_tracked` is reached
//! ([`Limits::at_cap`]). Keys are tracked past the cap meanwhile, and
//! whenever more destinations are within their window than the cap:
//! forgetting any of those would lose a limit.
//!
//! Why not sweep on the request that reaches the cap: a sweep scans every
//! key (a million at the default cap: milliseconds), and the request path
//! runs on the one HTTP thread, which would answer nothing meanwhile. Run
//! elsewhere, the sweep write-locks one of the map's shards at a time, so
//! a create to a phone in that shard still waits for an eighth or so of
//! the scan (shards: 4 per core, rounded up to a power of two).
//!
//! The clock is a type parameter so tests run on governor's
//! `FakeRelativeClock` (virtual time) and the engine on the monotonic clock.

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use crate::config::{PerPhoneConfig, ProjectConfig};

type Direct<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// Which limit refused a request: the `scope` label of
/// `flashcall_rate_limited_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Project,
    Phone,
    Trunk,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Project => "project",
            Scope::Phone => "phone",
            Scope::Trunk => "trunk",
        }
    }
}

/// A refusal: which limit, and how long until a retry can pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub scope: Scope,
    pub retry_after: Duration,
}

impl Limited {
    /// `Retry-After` in whole seconds, rounded up (never 0: a client told
    /// "0" would retry at once and be refused again).
    pub fn retry_after_secs(&self) -> u64 {
        let d = self.retry_after;
        (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
    }
}

pub struct Limits<C: Clock = DefaultClock> {
    clock: C,
    /// Time zero of the phone log's timestamps.
    start: C::Instant,
    projects: HashMap<String, Direct<C>>,
    phone: Option<PhoneLog>,
    max_tracked: usize,
}

/// Per destination, the times (ns since `start`) of its sends that may
/// still be within the window, oldest first (the clock is monotonic and a
/// refund removes in place). Inline up to [`INLINE_SENDS`]: a `Vec`
/// allocated for every new destination made a check of one ~60% slower
/// (556 -> 881 ns in `limits_check_phone_distinct_keys`) and the sweep,
/// which follows every entry's pointer, 6x slower.
struct PhoneLog {
    max: usize,
    window_ns: u64,
    sends: DashMap<u64, Times>,
}

/// Sends kept in place per destination; the default `max` is 3.
const INLINE_SENDS: usize = 4;
type Times = smallvec::SmallVec<[u64; INLINE_SENDS]>;
// Up to `max_tracked` (1,000,000 by default) of these are held: smallvec's
// `union` keeps the inline and heap forms in the same bytes (48 without).
const _: () = assert!(std::mem::size_of::<Times>() == 40);

/// A send that [`Limits::check_phone`] counted: what [`Limits::refund`]
/// takes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhoneSend {
    phone: u64,
    at_ns: u64,
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN)
}

impl Limits<DefaultClock> {
    pub fn new(projects: &[ProjectConfig], per_phone: &PerPhoneConfig) -> Self {
        Self::with_clock(projects, per_phone, DefaultClock::default())
    }
}

impl<C: Clock + Clone> Limits<C> {
    pub fn with_clock(projects: &[ProjectConfig], per_phone: &PerPhoneConfig, clock: C) -> Self {
        let projects = projects
            .iter()
            .map(|p| {
                let q = Quota::per_second(nz(p.rate)).allow_burst(nz(p.burst));
                (
                    p.login.clone(),
                    RateLimiter::direct_with_clock(q, clock.clone()),
                )
            })
            .collect();
        let phone = (per_phone.max > 0).then(|| PhoneLog {
            max: per_phone.max as usize,
            window_ns: per_phone.per_secs.saturating_mul(1_000_000_000),
            sends: DashMap::new(),
        });
        Limits {
            start: clock.now(),
            clock,
            projects,
            phone,
            max_tracked: per_phone.max_tracked,
        }
    }

    /// One create request by `project`.
    pub fn check_project(&self, project: &str) -> Result<(), Limited> {
        let Some(l) = self.projects.get(project) else {
            return Ok(());
        };
        l.check().map_err(|nu| Limited {
            scope: Scope::Project,
            retry_after: nu.wait_time_from(self.clock.now()),
        })
    }

    fn now_ns(&self) -> u64 {
        self.clock.now().duration_since(self.start).as_u64()
    }

    /// One send to `phone` (its digits as a number): counted if fewer than
    /// `max` were counted within the last `per_secs`, else refused with
    /// the time until the oldest of them leaves the window.
    pub fn check_phone(&self, phone: u64) -> Result<PhoneSend, Limited> {
        let Some(l) = &self.phone else {
            return Ok(PhoneSend { phone, at_ns: 0 });
        };
        // No sweep here, at the cap either: housekeeping does it (module
        // docs). The entry's shard is locked only for this, and the clock
        // is read under that lock so a key's times stay in order even for
        // callers not serialised elsewhere.
        let mut e = l.sends.entry(phone).or_default();
        let now = self.now_ns();
        let times = e.value_mut();
        let expired = times
            .iter()
            .take_while(|&&t| now.saturating_sub(t) >= l.window_ns)
            .count();
        if expired > 0 {
            times.drain(..expired);
        }
        if times.len() >= l.max {
            let oldest = times.first().copied().unwrap_or(now);
            return Err(Limited {
                scope: Scope::Phone,
                retry_after: Duration::from_nanos((oldest + l.window_ns).saturating_sub(now)),
            });
        }
        times.push(now);
        Ok(PhoneSend { phone, at_ns: now })
    }

    /// Gives back a send that [`check_phone`](Self::check_phone) counted,
    /// for a create that then failed (nothing was stored, no call made).
    pub fn refund(&self, send: PhoneSend) {
        let Some(l) = &self.phone else {
            return;
        };
        if let Some(mut times) = l.sends.get_mut(&send.phone) {
            if let Some(i) = times.iter().position(|&t| t == send.at_ns) {
                times.remove(i);
            }
        }
    }

    /// Whether `max_tracked` destinations are remembered: housekeeping
    /// then sweeps without waiting for its 10 s turn.
    pub fn at_cap(&self) -> bool {
        self.tracked_phones() >= self.max_tracked
    }

    /// Forgets destinations with no send left in the window.
    pub fn sweep(&self) {
        if let Some(l) = &self.phone {
            let now = self.now_ns();
            // The newest send is the last one.
            l.sends.retain(|_, times| {
                // A log that spilled to the heap (max > 4) and has emptied
                // since gives its capacity back.
                if times.spilled() && times.len() <= INLINE_SENDS {
                    times.shrink_to_fit();
                }
                times
                    .last()
                    .is_some_and(|&t| now.saturating_sub(t) < l.window_ns)
            });
            l.sends.shrink_to_fit();
        }
    }

    /// Destinations currently remembered.
    pub fn tracked_phones(&self) -> usize {
        self.phone.as_ref().map_or(0, |l| l.sends.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn project(rate: u32, burst: u32) -> ProjectConfig {
        ProjectConfig {
            login: "p".into(),
            secret: Some("s".into()),
            rate,
            burst,
            ..Default::default()
        }
    }

    /// Moves the fake clock to `secs` after its start.
    fn advance_to(clock: &FakeRelativeClock, secs: u64) {
        let now: Duration = clock.now().into();
        clock.advance(Duration::from_secs(secs) - now);
    }

    fn phones(max: u32, per_secs: u64) -> PerPhoneConfig {
        PerPhoneConfig {
            max,
            per_secs,
            max_tracked: 10_000_000,
        }
    }

    #[test]
    fn project_burst_then_limited_with_retry_after() {
        let clock = FakeRelativeClock::default();
        let l = Limits::with_clock(&[project(2, 5)], &phones(0, 1), clock.clone());
        for _ in 0..5 {
            l.check_project("p").unwrap();
        }
        let e = l.check_project("p").unwrap_err();
        assert_eq!(e.scope, Scope::Project);
        assert_eq!(e.retry_after, Duration::from_millis(500));
        assert_eq!(e.retry_after_secs(), 1);
        clock.advance(Duration::from_millis(500));
        l.check_project("p").unwrap();
        assert!(l.check_project("p").is_err());
    }

    #[test]
    fn per_phone_allows_max_within_the_window() {
        let clock = FakeRelativeClock::default();
        let l = Limits::with_clock(&[project(1, 1)], &phones(3, 600), clock.clone());
        for _ in 0..3 {
            l.check_phone(447700900123).unwrap();
        }
        let e = l.check_phone(447700900123).unwrap_err();
        assert_eq!(e.scope, Scope::Phone);
        assert_eq!(e.retry_after, Duration::from_secs(600));
        assert_eq!(e.retry_after_secs(), 600);
        // Another destination is not affected.
        l.check_phone(447700900124).unwrap();
        // GCRA (governor, before session 13) let one more through at 200 s
        // and another at 400 s: 5 within 600 s. The window lets none
        // until the first three are 600 s old.
        for t in [200, 400, 599] {
            advance_to(&clock, t);
            let e = l.check_phone(447700900123).unwrap_err();
            assert_eq!(e.retry_after, Duration::from_secs(600 - t), "at {t} s");
        }
        clock.advance(Duration::from_secs(1));
        for _ in 0..3 {
            l.check_phone(447700900123).unwrap();
        }
        assert!(l.check_phone(447700900123).is_err());
    }

    /// Spread sends: at most `max` in any `per_secs`, and each slot comes
    /// back exactly `per_secs` after its send.
    #[test]
    fn per_phone_is_a_sliding_window() {
        let clock = FakeRelativeClock::default();
        let l = Limits::with_clock(&[project(1, 1)], &phones(3, 600), clock.clone());
        let phone = 447700900123;
        let mut passed = Vec::new();
        // One attempt every 50 s for an hour.
        for t in (0..3600).step_by(50) {
            advance_to(&clock, t);
            if l.check_phone(phone).is_ok() {
                passed.push(t);
            }
        }
        assert_eq!(passed[..6], [0, 50, 100, 600, 650, 700], "{passed:?}");
        for (i, &t) in passed.iter().enumerate() {
            let within = passed[i..].iter().take_while(|&&u| u < t + 600).count();
            assert!(within <= 3, "{within} sends from {t} s: {passed:?}");
        }
    }

    /// A send given back (its create failed) frees its slot at once; the
    /// others keep theirs.
    #[test]
    fn a_refunded_send_frees_its_slot() {
        let clock = FakeRelativeClock::default();
        let l = Limits::with_clock(&[project(1, 1)], &phones(2, 600), clock.clone());
        let phone = 447700900123;
        let first = l.check_phone(phone).unwrap();
        clock.advance(Duration::from_secs(10));
        let second = l.check_phone(phone).unwrap();
        assert!(l.check_phone(phone).is_err());
        l.refund(second);
        l.check_phone(phone).unwrap();
        assert!(l.check_phone(phone).is_err());
        // Refunding the first one frees a slot too; refunding it again
        // (or a send to another destination) frees nothing more.
        l.refund(first);
        l.refund(first);
        l.refund(l.check_phone(447700900124).unwrap());
        l.check_phone(phone).unwrap();
        assert!(l.check_phone(phone).is_err());
        // With the limit off, a refund is a no-op.
        let off = Limits::with_clock(&[project(1, 1)], &phones(0, 600), clock.clone());
        off.refund(off.check_phone(phone).unwrap());
        assert_eq!(off.tracked_phones(), 0);
    }

    #[test]
    fn retry_after_rounds_up() {
        let l = Limited {
            scope: Scope::Phone,
            retry_after: Duration::from_millis(1001),
        };
        assert_eq!(l.retry_after_secs(), 2);
        let l = Limited {
            scope: Scope::Phone,
            retry_after: Duration::ZERO,
        };
        assert_eq!(l.retry_after_secs(), 1);
    }

    /// A million distinct destinations: the sweep gives the memory back once
    /// their allowance has refilled, and a fresh key is limited as before.
    #[test]
    fn a_million_phones_are_swept() {
        let clock = FakeRelativeClock::default();
        let l = Limits::with_clock(&[project(1, 1)], &phones(3, 600), clock.clone());
        for i in 0..1_000_000u64 {
            l.check_phone(447_000_000_000 + i).unwrap();
        }
        assert_eq!(l.tracked_phones(), 1_000_000);
        // Not yet refilled: nothing may be forgotten (that would reset a limit).
        clock.advance(Duration::from_secs(100));
        l.sweep();
        assert_eq!(l.tracked_phones(), 1_000_000);
        // Not one second short of the window either; forgotten at 600 s.
        clock.advance(Duration::from_secs(499));
        l.sweep();
        assert_eq!(l.tracked_phones(), 1_000_000);
        clock.advance(Duration::from_secs(1));
        l.sweep();
        assert_eq!(l.tracked_phones(), 0);
        for _ in 0..3 {
            l.check_phone(447_000_000_000).unwrap();
        }
        assert!(l.check_phone(447_000_000_000).is_err());
    }

    /// One send per 10 s, at most 100 destinations: filled to the cap.
    fn at_cap(clock: &FakeRelativeClock) -> Limits<FakeRelativeClock> {
        let mut cfg = phones(1, 10);
        cfg.max_tracked = 100;
        let l = Limits::with_clock(&[project(1, 1)], &cfg, clock.clone());
        for i in 0..100u64 {
            l.check_phone(i).unwrap();
        }
        l
    }

    #[test]
    fn a_request_at_the_cap_keeps_every_limit_and_leaves_the_sweep_to_housekeeping() {
        let clock = FakeRelativeClock::default();
        let l = at_cap(&clock);
        assert!(l.at_cap());
        // At the cap, a destination within its window is still limited,
        // and a new one is tracked past the cap: the request does not
        // sweep itself.
        assert_eq!(l.check_phone(7).unwrap_err().scope, Scope::Phone);
        l.check_phone(1000).unwrap();
        assert_eq!(l.tracked_phones(), 101);
        // Housekeeping's sweep while every send is within its window
        // forgets nothing (that would reset a limit).
        clock.advance(Duration::from_millis(9_500));
        l.sweep();
        assert_eq!(l.tracked_phones(), 101);
        assert!(l.at_cap());
        // Out of the window at 10 s: forgettable.
        clock.advance(Duration::from_millis(1_500));
        l.check_phone(1001).unwrap();
        l.sweep();
        assert_eq!(l.tracked_phones(), 1);
        assert!(!l.at_cap());
        assert!(
            l.check_phone(1001).is_err(),
            "the key checked since the sweep kept its limit"
        );
    }
}
