//! Every metric name in one place (SPEC §6), the recorder setup, and the
//! metric handles the hot paths keep so they do not look a name up per call.
//!
//! Labels carry only bounded values from the config or the code (project
//! login, trunk name, outcome, status, route template, SIP status code):
//! never a phone number or an ID.

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};

use crate::limits::Scope;
use crate::sip::Outcome;
use crate::verification::{CheckResult, Status};

pub const VERIFICATIONS: &str = "flashcall_verifications_total";
pub const CALLS: &str = "flashcall_calls_total";
pub const SIP_RESPONSES: &str = "flashcall_sip_responses_total";
pub const CALLS_IN_FLIGHT: &str = "flashcall_calls_in_flight";
pub const POST_DIAL_DELAY: &str = "flashcall_post_dial_delay_seconds";
pub const CANCEL_DELAY: &str = "flashcall_cancel_delay_seconds";
pub const RATE_LIMITED: &str = "flashcall_rate_limited_total";
pub const POOL_NUMBERS: &str = "flashcall_pool_numbers";
pub const POOL_COVERAGE: &str = "flashcall_pool_suffix_coverage_ratio";
pub const CHECKS: &str = "flashcall_checks_total";
pub const HTTP_REQUESTS: &str = "flashcall_http_requests_total";
pub const HTTP_DURATION: &str = "flashcall_http_request_duration_seconds";
pub const SIP_PARSE_ERRORS: &str = "flashcall_sip_parse_errors_total";
pub const TRUNK_QUEUE: &str = "flashcall_trunk_queue_depth";
pub const SIP_STRAY: &str = "flashcall_sip_stray_responses_total";
/// Calls ended `trunk_error` because the transport reported their trunk
/// unreachable (ICMP port/host/network unreachable, no route).
pub const SIP_TRANSPORT_FAILURES: &str = "flashcall_sip_transport_failures_total";
/// Datagrams the kernel dropped for the SIP socket (its receive queue was
/// full: the SIP thread fell behind); a retransmission may bring them back.
pub const SIP_RECEIVE_DROPS: &str = "flashcall_sip_receive_drops_total";
pub const WEBHOOK_DELIVERIES: &str = "flashcall_webhook_deliveries_total";
/// Destinations the per-phone limiter remembers, set by housekeeping each
/// second: an operator sees it near `limits.per_phone.max_tracked` before
/// keys are tracked past the cap.
pub const LIMITER_TRACKED: &str = "flashcall_limiter_tracked_phones";
/// The durable store's writer: how long each successful group commit took
/// (its count is the number of commits), the writes committed (inserts,
/// status changes, checks, webhook deliveries, prunes), and the commits
/// that failed (a full disk, a read-only database). A create waits for
/// one commit, so this is most of its latency.
pub const STORE_COMMIT: &str = "flashcall_store_commit_seconds";
pub const STORE_WRITES: &str = "flashcall_store_writes_total";
pub const STORE_COMMIT_FAILURES: &str = "flashcall_store_commit_failures_total";
/// The `result` label values of [`WEBHOOK_DELIVERIES`]: `failed` counts
/// every failed attempt (non-2xx, timeout, connect error), `given_up` each
/// event abandoned after `max_age_hours`, `gone` each 410 answer, `held`
/// each event kept unsent because its endpoint had answered 410 (sent
/// after the next start), `dropped` each event of a project that has no
/// webhook any more.
pub const WEBHOOK_RESULTS: [&str; 6] =
    ["delivered", "failed", "gone", "held", "given_up", "dropped"];

/// Installs the global recorder with histogram buckets for every
/// histogram (the exporter's default would render summaries).
pub fn install() -> Result<PrometheusHandle, BuildError> {
    // The delays a flash call cares about: sub-millisecond cancels up to
    // post-dial delays of tens of seconds.
    let delay = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
        30.0,
    ];
    // 180 -> CANCEL is the engine's own reaction time, targeted at
    // p99 <= 1 ms: fine buckets below a millisecond so the load benchmark
    // can read its quantiles, then the same tail as the other delays.
    let cancel = [
        0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
        0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0,
    ];
    // A group commit takes ~0.1-1 ms on an idle disk.
    let commit = [
        0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0,
    ];
    // Finer around 10 ms, the create p99 target, so that the load
    // benchmark can read the engine's own p99 there.
    let http = [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25,
        1.0,
    ];
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(POST_DIAL_DELAY.into()), &delay)?
        .set_buckets_for_metric(Matcher::Full(CANCEL_DELAY.into()), &cancel)?
        .set_buckets_for_metric(Matcher::Full(HTTP_DURATION.into()), &http)?
        .set_buckets_for_metric(Matcher::Full(STORE_COMMIT.into()), &commit)?
        .install_recorder()
}

/// Describes every metric and registers the label sets known at start,
/// so a scrape shows each name (at 0) before the first call.
pub fn describe(projects: &[String], trunks: &[String]) {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(VERIFICATIONS, "Verifications entering each status");
    describe_counter!(
        CALLS,
        "Flash calls by trunk and outcome (interrupted: not placed, or not finished, at shutdown)"
    );
    describe_counter!(SIP_RESPONSES, "SIP responses received by trunk and code");
    describe_gauge!(CALLS_IN_FLIGHT, "Calls whose outcome is not known yet");
    describe_histogram!(
        POST_DIAL_DELAY,
        Unit::Seconds,
        "INVITE sent to first 180/183"
    );
    describe_histogram!(
        CANCEL_DELAY,
        Unit::Seconds,
        "180/183 received to CANCEL sent"
    );
    describe_counter!(RATE_LIMITED, "Requests refused by a limit, by scope");
    describe_gauge!(POOL_NUMBERS, "Caller numbers in the pool");
    describe_gauge!(POOL_COVERAGE, "Share of code suffixes the pool can serve");
    describe_counter!(CHECKS, "Code checks by result");
    describe_counter!(HTTP_REQUESTS, "HTTP requests by route template and status");
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "HTTP request duration by route"
    );
    describe_counter!(SIP_PARSE_ERRORS, "Malformed SIP datagrams dropped");
    describe_gauge!(TRUNK_QUEUE, "INVITEs waiting for a CPS slot, by trunk");
    describe_counter!(SIP_STRAY, "SIP responses matching no transaction");
    describe_counter!(
        SIP_TRANSPORT_FAILURES,
        "Calls ended trunk_error because the transport reported the trunk unreachable (ICMP, no route)"
    );
    describe_counter!(
        SIP_RECEIVE_DROPS,
        "SIP datagrams the kernel dropped: the socket's receive queue was full"
    );
    describe_counter!(WEBHOOK_DELIVERIES, "Webhook delivery attempts by result");
    describe_histogram!(
        STORE_COMMIT,
        Unit::Seconds,
        "Durable store group commits: time each took"
    );
    describe_counter!(
        STORE_WRITES,
        "Writes the durable store committed: inserts, status changes, checks, \
         webhook deliveries, prunes"
    );
    describe_counter!(STORE_COMMIT_FAILURES, "Durable store commits that failed");
    describe_gauge!(
        LIMITER_TRACKED,
        "Destinations the per-phone limiter remembers"
    );

    let by_project = projects
        .iter()
        .map(|p| {
            let counters = Status::ALL
                .iter()
                .map(|s| {
                    let c = counter!(VERIFICATIONS, "project" => p.clone(), "status" => s.as_str());
                    c.absolute(0);
                    c
                })
                .collect();
            (p.clone(), counters)
        })
        .collect();
    // Set once per process; a second describe() keeps the first handles,
    // which stay valid since the recorder is installed once.
    let _ = VERIFICATION_COUNTERS.set(by_project);
    for t in trunks {
        for o in Outcome::ALL {
            counter!(CALLS, "trunk" => t.clone(), "outcome" => o.as_str()).absolute(0);
        }
        gauge!(TRUNK_QUEUE, "trunk" => t.clone()).set(0.0);
    }
    for s in [Scope::Project, Scope::Phone, Scope::Trunk] {
        counter!(RATE_LIMITED, "scope" => s.as_str()).absolute(0);
    }
    for r in [
        CheckResult::Verified,
        CheckResult::AlreadyVerified,
        CheckResult::WrongCode,
        CheckResult::Exhausted,
        CheckResult::NoAttemptsLeft,
        CheckResult::Expired,
    ] {
        counter!(CHECKS, "result" => r.as_str()).absolute(0);
    }
    for r in WEBHOOK_RESULTS {
        counter!(WEBHOOK_DELIVERIES, "result" => r).absolute(0);
    }
    gauge!(CALLS_IN_FLIGHT).set(0.0);
    gauge!(LIMITER_TRACKED).set(0.0);
    counter!(SIP_PARSE_ERRORS).absolute(0);
    counter!(SIP_STRAY).absolute(0);
    counter!(SIP_TRANSPORT_FAILURES).absolute(0);
    counter!(SIP_RECEIVE_DROPS).absolute(0);
    let _ = histogram!(STORE_COMMIT);
    counter!(STORE_WRITES).absolute(0);
    counter!(STORE_COMMIT_FAILURES).absolute(0);
    let _ = histogram!(POST_DIAL_DELAY);
    let _ = histogram!(CANCEL_DELAY);
}

/// Handles the SIP driver updates per call, resolved once per trunk.
pub struct TrunkMetrics {
    pub calls: Vec<Counter>,
    pub queue: Gauge,
    pub name: String,
}

impl TrunkMetrics {
    pub fn new(name: &str) -> Self {
        TrunkMetrics {
            calls: Outcome::ALL
                .iter()
                .map(|o| counter!(CALLS, "trunk" => name.to_string(), "outcome" => o.as_str()))
                .collect(),
            queue: gauge!(TRUNK_QUEUE, "trunk" => name.to_string()),
            name: name.to_string(),
        }
    }

    pub fn call(&self, o: Outcome) -> &Counter {
        // Outcome::ALL lists every variant, so the position exists.
        let i = Outcome::ALL.iter().position(|x| *x == o).unwrap_or(0);
        &self.calls[i]
    }
}

/// Handles the store writer updates per commit, resolved once.
pub struct StoreMetrics {
    pub commit: Histogram,
    pub writes: Counter,
    pub failures: Counter,
}

impl StoreMetrics {
    pub fn new() -> Self {
        StoreMetrics {
            commit: histogram!(STORE_COMMIT),
            writes: counter!(STORE_WRITES),
            failures: counter!(STORE_COMMIT_FAILURES),
        }
    }
}

impl Default for StoreMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Handles the SIP driver updates for every call.
pub struct CallMetrics {
    pub in_flight: Gauge,
    pub post_dial: Histogram,
    pub cancel: Histogram,
    pub parse_errors: Counter,
    pub stray: Counter,
    pub transport_failures: Counter,
    pub receive_drops: Counter,
}

impl CallMetrics {
    pub fn new() -> Self {
        CallMetrics {
            in_flight: gauge!(CALLS_IN_FLIGHT),
            post_dial: histogram!(POST_DIAL_DELAY),
            cancel: histogram!(CANCEL_DELAY),
            parse_errors: counter!(SIP_PARSE_ERRORS),
            stray: counter!(SIP_STRAY),
            transport_failures: counter!(SIP_TRANSPORT_FAILURES),
            receive_drops: counter!(SIP_RECEIVE_DROPS),
        }
    }
}

impl Default for CallMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `flashcall_verifications_total` handles of the configured projects, one
/// per status in `Status::ALL` order, resolved once by [`describe`]: the
/// macro builds the label set (two allocations) and hashes it into the
/// registry, three times per verification.
static VERIFICATION_COUNTERS: OnceLock<HashMap<String, Vec<Counter>>> = OnceLock::new();

pub fn verification(project: &str, status: Status) {
    let cached = VERIFICATION_COUNTERS
        .get()
        .and_then(|m| m.get(project))
        .and_then(|v| v.get(Status::ALL.iter().position(|s| *s == status)?));
    match cached {
        Some(c) => c.increment(1),
        None => {
            counter!(VERIFICATIONS, "project" => project.to_string(), "status" => status.as_str())
                .increment(1)
        }
    }
}

/// The HTTP handles of one route template: its duration histogram and a
/// request counter per status seen so far.
struct HttpRoute {
    route: Box<str>,
    duration: Histogram,
    by_status: Vec<(u16, Counter)>,
}

/// HTTP handles, resolved the first time a (route, status) pair is seen:
/// the macros built two label strings and hashed them into the registry
/// twice per request. Routes are the router's templates (a handful) and
/// statuses the few the API answers, so a scan under a read lock is all a
/// request pays.
static HTTP_ROUTES: RwLock<Vec<HttpRoute>> = RwLock::new(Vec::new());

/// Counts one HTTP request of `route` (a template, never a raw path)
/// answered with `status` and records how long it took.
pub fn http_request(route: &str, status: u16, secs: f64) {
    {
        let routes = HTTP_ROUTES.read().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = routes.iter().find(|r| &*r.route == route) {
            if let Some((_, c)) = r.by_status.iter().find(|(s, _)| *s == status) {
                c.increment(1);
                r.duration.record(secs);
                return;
            }
        }
    }
    let mut routes = HTTP_ROUTES.write().unwrap_or_else(|e| e.into_inner());
    let i = match routes.iter().position(|r| &*r.route == route) {
        Some(i) => i,
        None => {
            routes.push(HttpRoute {
                route: route.into(),
                duration: histogram!(HTTP_DURATION, "route" => route.to_string()),
                by_status: Vec::new(),
            });
            routes.len() - 1
        }
    };
    let r = &mut routes[i];
    let counter = match r.by_status.iter().find(|(s, _)| *s == status) {
        Some((_, c)) => c.clone(),
        None => {
            let c = counter!(HTTP_REQUESTS, "route" => route.to_string(), "status" => status.to_string());
            r.by_status.push((status, c.clone()));
            c
        }
    };
    counter.increment(1);
    r.duration.record(secs);
}

pub fn rate_limited(scope: Scope) {
    counter!(RATE_LIMITED, "scope" => scope.as_str()).increment(1);
}

pub fn check(result: CheckResult) {
    counter!(CHECKS, "result" => result.as_str()).increment(1);
}

/// The `flashcall_sip_responses_total` handle of a trunk and code; the SIP
/// driver keeps them, so the label set is built once per pair.
pub fn sip_response(trunk: &str, code: u16) -> Counter {
    counter!(SIP_RESPONSES, "trunk" => trunk.to_string(), "code" => code.to_string())
}

pub fn pool(numbers: usize, coverage: f64) {
    gauge!(POOL_NUMBERS).set(numbers as f64);
    gauge!(POOL_COVERAGE).set(coverage);
}

pub fn limiter_tracked(phones: usize) {
    gauge!(LIMITER_TRACKED).set(phones as f64);
}

pub fn webhook_delivery(result: &'static str) {
    counter!(WEBHOOK_DELIVERIES, "result" => result).increment(1);
}
