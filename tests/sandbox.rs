//! The real UAC (`Endpoint` + the UDP driver, as `flashcall dial` runs them)
//! against the in-process sandbox callee over real UDP on 127.0.0.1.
//!
//! Nothing here sleeps for ordering: the UAC's driver returns once every call
//! has its outcome, and the sandbox's counters are awaited as a condition.
//! Every wait is bounded by a timeout. The silent `0408` destination is left
//! to the unit tests: its outcome only comes at Timer B, 32 s.

use flashcall::io::udp;
use flashcall::sandbox::{self, Sandbox, SandboxConfig, SandboxStats};
use flashcall::sip::{
    CallReport, CallRequest, CallerId, Endpoint, EndpointConfig, Event, Outcome, TimerConfig,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// A bound on each whole exchange: far more than loopback needs, far less
/// than any SIP timer that would signal a bug (Timer B is 32 s).
const LIMIT: Duration = Duration::from_secs(10);

/// Starts every call at once and collects the reports.
struct Calls {
    trunk: SocketAddr,
    to: Vec<String>,
    started: bool,
    reports: Vec<CallReport>,
}

impl udp::App for Calls {
    fn poll(&mut self, now: Instant, ep: &mut Endpoint<StdRng>) -> Option<Instant> {
        if !self.started {
            self.started = true;
            for (i, to) in self.to.iter().enumerate() {
                ep.start_call(
                    now,
                    CallRequest {
                        trunk: self.trunk,
                        trunk_host: self.trunk.to_string(),
                        to: to.clone(),
                        caller: "+447700900001".into(),
                        caller_id: CallerId::From,
                        ring: Duration::ZERO,
                        ring_timeout: Duration::from_secs(15),
                        credentials: None,
                        tag: i as u64,
                    },
                );
            }
        }
        None
    }

    fn on_event(&mut self, _ep: &mut Endpoint<StdRng>, event: Event) {
        if let Event::Ended(r) = event {
            self.reports.push(r);
        }
    }

    fn done(&self, _ep: &Endpoint<StdRng>) -> bool {
        self.reports.len() == self.to.len()
    }
}

/// Places one call per destination against the sandbox, exactly as
/// `flashcall dial` wires the endpoint; returns the reports in call order.
async fn dial(sandbox: &Sandbox, to: &[&str]) -> Vec<CallReport> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind UAC");
    socket.connect(sandbox.addr).await.expect("connect");
    let local = socket.local_addr().expect("local addr");
    let mut ep = Endpoint::new(
        EndpointConfig {
            timers: TimerConfig::default(),
            local,
            sent_by: None,
            public_host: local.ip().to_string(),
            user_agent: "flashcall-tests".into(),
            media: SocketAddr::new(local.ip(), 9),
        },
        StdRng::seed_from_u64(7),
    );
    let mut app = Calls {
        trunk: sandbox.addr,
        to: to.iter().map(|s| (*s).to_owned()).collect(),
        started: false,
        reports: Vec::new(),
    };
    let stats = tokio::time::timeout(LIMIT, udp::run(&socket, &mut ep, &mut app, udp::COALESCE))
        .await
        .expect("every call ends well before any SIP timer");
    assert_eq!(stats.malformed, 0, "the sandbox's responses all parse");
    assert_eq!(
        ep.stats().stray_responses,
        0,
        "every response matched a call"
    );
    app.reports.sort_by_key(|r| r.tag);
    app.reports
}

async fn sandbox_stats_until(
    sandbox: &Sandbox,
    pred: impl FnMut(&SandboxStats) -> bool,
) -> SandboxStats {
    match tokio::time::timeout(LIMIT, sandbox.wait_for(pred)).await {
        Ok(s) => s,
        Err(_) => panic!("sandbox counters never got there: {:?}", sandbox.stats()),
    }
}

#[tokio::test]
async fn fifty_calls_are_all_delivered() {
    let sandbox = sandbox::spawn(SandboxConfig::default())
        .await
        .expect("spawn");
    let numbers: Vec<String> = (0..50).map(|i| format!("+4477009{i:05}")).collect();
    let to: Vec<&str> = numbers.iter().map(String::as_str).collect();
    let reports = dial(&sandbox, &to).await;
    for r in &reports {
        assert_eq!(r.outcome, Outcome::Delivered, "{r:?}");
        assert_eq!(r.sip_code, Some(487), "{r:?}");
        assert!(r.ringing_at.is_some() && r.cancel_at.is_some());
    }
    // The UAC ACKs each 487 before it reports the outcome; wait until the
    // sandbox has absorbed all 50 ACKs.
    let s = sandbox_stats_until(&sandbox, |s| s.acks >= 50).await;
    assert_eq!(s.invites, 50, "{s:?}");
    assert_eq!(s.rang, 50, "{s:?}");
    assert_eq!(s.terminated, 50, "{s:?}");
    assert_eq!(s.acks, 50, "{s:?}");
    assert_eq!(
        s.malformed + s.unknown_transactions + s.overloaded,
        0,
        "{s:?}"
    );
    sandbox.shutdown();
}

#[tokio::test]
async fn magic_numbers_give_their_outcomes() {
    let sandbox = sandbox::spawn(SandboxConfig {
        // A real ring delay changes nothing in the outcomes, and exercises
        // the sandbox's timer path over a real socket.
        ring_delay: Duration::from_millis(20),
        ..SandboxConfig::default()
    })
    .await
    .expect("spawn");
    let cases = [
        ("+447700900486", Outcome::Busy, 486),
        ("+447700900404", Outcome::InvalidNumber, 404),
        ("+447700900480", Outcome::Unavailable, 480),
        ("+447700900503", Outcome::TrunkError, 503),
        ("+447700900200", Outcome::Answered, 200),
        ("+447700900123", Outcome::Delivered, 487),
    ];
    let to: Vec<&str> = cases.iter().map(|c| c.0).collect();
    let reports = dial(&sandbox, &to).await;
    for (r, (to, outcome, code)) in reports.iter().zip(cases) {
        assert_eq!(
            (r.outcome, r.sip_code),
            (outcome, Some(code)),
            "{to}: {r:?}"
        );
    }
    assert_eq!(reports[3].retry_after, Some(5), "503 carries Retry-After");
    // Four failure ACKs, the 2xx ACK (to the Contact) and the 487 ACK; the
    // answered call's BYE is answered 200 by the sandbox.
    let s = sandbox_stats_until(&sandbox, |s| s.acks >= 6 && s.byes >= 1).await;
    assert_eq!((s.invites, s.acks, s.byes), (6, 6, 1), "{s:?}");
    assert_eq!(s.unknown_transactions, 0, "the BYE found its dialog: {s:?}");
}

#[tokio::test]
async fn a_port_in_use_is_an_error_from_spawn() {
    let first = sandbox::spawn(SandboxConfig::default())
        .await
        .expect("spawn");
    let err = sandbox::spawn(SandboxConfig {
        bind: first.addr,
        ..SandboxConfig::default()
    })
    .await
    .err()
    .expect("second bind on the same port fails");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
}
