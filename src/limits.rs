//! Request limits (SPEC §5) on governor's GCRA: per project (`rate`,
//! `burst`) and per destination phone (`limits.per_phone`). The per-trunk
//! CPS limiter lives with the SIP driver, which paces its INVITE queue.
//!
//! Why a sweep: governor's keyed limiter never forgets a key by itself, so a
//! client sending to a million distinct phones would grow it without bound.
//! [`Limits::sweep`] drops keys whose state is indistinguishable from fresh
//! (their allowance has fully refilled), which loses nothing. Housekeeping
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

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use crate::config::{PerPhoneConfig, ProjectConfig};

type Direct<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;
type Keyed<C> = RateLimiter<u64, DashMapStateStore<u64>, C, NoOpMiddleware<<C as Clock>::Instant>>;

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
    projects: HashMap<String, Direct<C>>,
    phone: Option<Keyed<C>>,
    max_tracked: usize,
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
        // GCRA's reading of "max per per_secs": a burst of `max`, refilled
        // one send every per_secs/max. Like a sliding window, it never
        // allows more than `max` within any `per_secs`.
        let phone = (per_phone.max > 0).then(|| {
            let period = Duration::from_secs(per_phone.per_secs) / per_phone.max;
            let q = Quota::with_period(period)
                .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
                .allow_burst(nz(per_phone.max));
            RateLimiter::dashmap_with_clock(q, clock.clone())
        });
        Limits {
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

    /// One send to `phone` (its digits as a number).
    pub fn check_phone(&self, phone: u64) -> Result<(), Limited> {
        let Some(l) = &self.phone else {
            return Ok(());
        };
        // No sweep here, at the cap either: housekeeping does it (module
        // docs).
        l.check_key(&phone).map_err(|nu| Limited {
            scope: Scope::Phone,
            retry_after: nu.wait_time_from(self.clock.now()),
        })
    }

    /// Whether `max_tracked` destinations are remembered: housekeeping
    /// then sweeps without waiting for its 10 s turn.
    pub fn at_cap(&self) -> bool {
        self.tracked_phones() >= self.max_tracked
    }

    /// Forgets destinations whose allowance has fully refilled.
    pub fn sweep(&self) {
        if let Some(l) = &self.phone {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// Destinations currently remembered.
    pub fn tracked_phones(&self) -> usize {
        self.phone.as_ref().map_or(0, |l| l.len())
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
        assert_eq!(e.retry_after, Duration::from_secs(200));
        assert_eq!(e.retry_after_secs(), 200);
        // Another destination is not affected.
        l.check_phone(447700900124).unwrap();
        clock.advance(Duration::from_secs(200));
        l.check_phone(447700900123).unwrap();
        assert!(l.check_phone(447700900123).is_err());
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
        // governor keeps a key one emission interval (200 s) past the
        // moment its allowance refilled (200 s): forgotten by 400 s.
        clock.advance(Duration::from_secs(300));
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
        // Housekeeping's sweep before any allowance refilled forgets
        // nothing (that would reset a limit).
        clock.advance(Duration::from_millis(19_500));
        l.sweep();
        assert_eq!(l.tracked_phones(), 101);
        assert!(l.at_cap());
        // Refilled at 10 s, forgettable one interval later.
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
