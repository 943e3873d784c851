//! Virtual-time tests of the UAC state machine: the RFC 3261 schedules are
//! asserted as data (offsets from the call's start), and every response is
//! produced from the request we actually sent, as a callee would.

use super::endpoint::*;
use super::message::{Message, StartLine};
use super::render;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const TRUNK: &str = "127.0.0.1:5070";

fn endpoint() -> Endpoint<StdRng> {
    Endpoint::new(
        EndpointConfig {
            timers: TimerConfig::default(),
            local: "127.0.0.1:5060".parse().unwrap(),
            sent_by: None,
            public_host: "127.0.0.1".into(),
            user_agent: "flashcall-test".into(),
            media: "127.0.0.1:40000".parse().unwrap(),
        },
        StdRng::seed_from_u64(7),
    )
}

fn request(ring_ms: u64, ring_timeout_ms: u64) -> CallRequest {
    CallRequest {
        trunk: TRUNK.parse().unwrap(),
        trunk_host: TRUNK.into(),
        to: "+447700900999".into(),
        caller: "+447700901234".into(),
        caller_id: CallerId::Both,
        ring: Duration::from_millis(ring_ms),
        ring_timeout: Duration::from_millis(ring_timeout_ms),
        credentials: None,
        tag: 42,
    }
}

/// [`request`] (no ring hold, 15 s ring timeout) to a trunk that asks for
/// digest credentials.
fn with_credentials(username: &str, password: &str) -> CallRequest {
    CallRequest {
        credentials: Some(Credentials {
            username: username.into(),
            password: password.into(),
        }),
        ..request(0, 15_000)
    }
}

/// A call that Timer B ended as `timeout` after 32 s of silence: the
/// endpoint, the call's start and its INVITE.
fn timed_out_call() -> (Endpoint<StdRng>, Instant, Transmit) {
    let mut ep = endpoint();
    let t0 = Instant::now();
    ep.start_call(t0, request(0, 60_000));
    let invite = drain(&mut ep).remove(0);
    run_until(&mut ep, t0, Duration::from_secs(32));
    assert_eq!(ended(&mut ep)[0].outcome, Outcome::Timeout);
    (ep, t0, invite)
}

fn drain(ep: &mut Endpoint<StdRng>) -> Vec<Transmit> {
    std::iter::from_fn(|| ep.poll_transmit()).collect()
}

fn events(ep: &mut Endpoint<StdRng>) -> Vec<Event> {
    std::iter::from_fn(|| ep.poll_event()).collect()
}

fn ended(ep: &mut Endpoint<StdRng>) -> Vec<CallReport> {
    events(ep)
        .into_iter()
        .filter_map(|e| match e {
            Event::Ended(r) => Some(r),
            _ => None,
        })
        .collect()
}

fn method(t: &Transmit) -> String {
    match Message::parse(&t.payload).unwrap().start {
        StartLine::Request { method, .. } => method.to_string(),
        StartLine::Response { code, .. } => code.to_string(),
    }
}

/// The callee's answer to one of our requests.
fn reply(req: &Transmit, code: u16, extra: &[(&str, &str)]) -> Vec<u8> {
    let msg = Message::parse(&req.payload).unwrap();
    render::response(&msg, code, "Reason", "callee1", extra).to_vec()
}

/// A 2xx to `invite` from the forked leg with To tag `tag` and Contact
/// `contact`.
fn leg_ok(invite: &Transmit, tag: &str, contact: &str) -> Vec<u8> {
    let inv = Message::parse(&invite.payload).unwrap();
    render::response(&inv, 200, "OK", tag, &[("Contact", contact)]).to_vec()
}

fn feed(ep: &mut Endpoint<StdRng>, at: Instant, bytes: &[u8]) -> Input {
    ep.handle_input(at, TRUNK.parse().unwrap(), bytes)
}

/// Runs the clock forward to `until`, returning (offset, method) of every
/// datagram sent on the way.
fn run_until(ep: &mut Endpoint<StdRng>, t0: Instant, until: Duration) -> Vec<(Duration, String)> {
    let mut sent = Vec::new();
    while let Some(at) = ep.poll_timeout() {
        if at > t0 + until {
            break;
        }
        ep.handle_timeout(at);
        for t in drain(ep) {
            sent.push((at - t0, method(&t)));
        }
    }
    sent
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

#[test]
fn timer_a_doubles_until_timer_b_gives_timeout() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    ep.start_call(t0, request(0, 60_000));
    assert_eq!(method(&drain(&mut ep)[0]), "INVITE");
    let sent = run_until(&mut ep, t0, Duration::from_secs(40));
    let offsets: Vec<u64> = sent.iter().map(|(d, _)| d.as_millis() as u64).collect();
    // Intervals 0.5, 1, 2, 4, 8, 16 s (§17.1.1.2), then B at 64·T1 = 32 s.
    assert_eq!(offsets, [500, 1500, 3500, 7500, 15500, 31500]);
    assert!(sent.iter().all(|(_, m)| m == "INVITE"));
    let reports = ended(&mut ep);
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].outcome, Outcome::Timeout);
    assert_eq!(reports[0].ended_at - t0, Duration::from_secs(32));
    assert_eq!(ep.active_calls(), 0);
}

#[test]
fn no_cancel_before_a_provisional_then_cancel_on_the_first_one() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    ep.start_call(t0, request(0, 1_000));
    let invite = drain(&mut ep).remove(0);
    // Ring timeout fires at 1 s with nothing heard: RFC 3261 §9.1 forbids a CANCEL.
    let sent = run_until(&mut ep, t0, ms(2_000));
    assert!(sent.iter().all(|(_, m)| m == "INVITE"), "{sent:?}");
    // A 100 Trying arrives: now the pending CANCEL goes out at once.
    feed(&mut ep, t0 + ms(2_100), &reply(&invite, 100, &[]));
    let out = drain(&mut ep);
    assert_eq!(out.len(), 1);
    assert_eq!(method(&out[0]), "CANCEL");
    // The callee confirms; outcome no_ringing.
    feed(&mut ep, t0 + ms(2_150), &reply(&out[0], 200, &[]));
    feed(&mut ep, t0 + ms(2_160), &reply(&invite, 487, &[]));
    let acks = drain(&mut ep);
    assert_eq!(acks.iter().map(method).collect::<Vec<_>>(), ["ACK"]);
    let r = ended(&mut ep);
    assert_eq!(r[0].outcome, Outcome::NoRinging);
    assert_eq!(r[0].sip_code, Some(487));
}

#[test]
fn cancel_and_ack_repeat_the_invite_identity() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    ep.start_call(t0, request(0, 15_000));
    let invite = drain(&mut ep).remove(0);
    feed(&mut ep, t0 + ms(20), &reply(&invite, 180, &[]));
    let cancel = drain(&mut ep).remove(0);
    let (i, c) = (
        Message::parse(&invite.payload).unwrap(),
        Message::parse(&cancel.payload).unwrap(),
    );
    let uri = |m: &Message| match m.start {
        StartLine::Request { uri, .. } => uri.to_string(),
        _ => panic!("not a request"),
    };
    assert_eq!(uri(&c), uri(&i));
    assert_eq!(c.call_id, i.call_id);
    assert_eq!(c.from, i.from);
    assert_eq!(c.to, i.to);
    assert_eq!(c.to_tag, None);
    assert_eq!(c.cseq.number, i.cseq.number);
    assert_eq!(c.cseq.method, "CANCEL");
    assert_eq!(c.top_via_branch, i.top_via_branch);
    assert!(i.top_via_branch.unwrap().starts_with("z9hG4bK"));
    assert_eq!(cancel.dest, invite.dest);

    feed(&mut ep, t0 + ms(25), &reply(&cancel, 200, &[]));
    let final_487 = reply(&invite, 487, &[]);
    feed(&mut ep, t0 + ms(30), &final_487);
    let ack = drain(&mut ep).remove(0);
    let a = Message::parse(&ack.payload).unwrap();
    assert_eq!(uri(&a), uri(&i));
    assert_eq!(a.top_via_branch, i.top_via_branch);
    assert_eq!(a.cseq.number, i.cseq.number);
    assert_eq!(a.cseq.method, "ACK");
    assert_eq!(a.to_tag, Some("callee1"));
    assert_eq!(a.call_id, i.call_id);
    let r = ended(&mut ep);
    assert_eq!(r[0].outcome, Outcome::Delivered);
    assert_eq!(r[0].post_dial_delay(), Some(ms(20)));
    assert_eq!(r[0].cancel_delay(), Some(ms(0)));

    // A retransmitted 487 is ACKed again with the same ACK.
    feed(&mut ep, t0 + ms(530), &final_487);
    assert_eq!(drain(&mut ep)[0].payload, ack.payload);
    // Timer D (32 s) frees the state.
    assert_eq!(ep.calls_in_memory(), 1);
    run_until(&mut ep, t0, Duration::from_secs(33));
    assert_eq!(ep.calls_in_memory(), 0);
    assert!(ended(&mut ep).is_empty(), "outcome reported twice");
}

#[test]
fn cancel_retransmits_per_timer_e_capped_at_t2_until_f() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    ep.start_call(t0, request(0, 15_000));
    let invite = drain(&mut ep).remove(0);
    feed(&mut ep, t0, &reply(&invite, 180, &[]));
    assert_eq!(method(&drain(&mut ep)[0]), "CANCEL");
    let sent = run_until(&mut ep, t0, Duration::from_secs(40));
    let cancels: Vec<u64> = sent
        .iter()
        .filter(|(_, m)| m == "CANCEL")
        .map(|(d, _)| d.as_millis() as u64)
        .collect();
    // Intervals 0.5, 1, 2, 4, 4, 4, ... (§17.1.2.2) until F at 32 s.
    let mut expected = vec![500, 1500, 3500, 7500];
    let mut t = 7500;
    while t + 4000 < 32_000 {
        t += 4000;
        expected.push(t);
    }
    assert_eq!(cancels, expected);
    // No final ever came: the phone rang, so the call counts as delivered.
    let r = ended(&mut ep);
    assert_eq!(r[0].outcome, Outcome::Delivered);
    assert_eq!(r[0].sip_code, None);
    assert_eq!(ep.calls_in_memory(), 0);
}

#[test]
fn provisional_to_cancel_moves_interval_to_t2() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    ep.start_call(t0, request(0, 15_000));
    let invite = drain(&mut ep).remove(0);
    feed(&mut ep, t0, &reply(&invite, 183, &[]));
    let cancel = drain(&mut ep).remove(0);
    feed(&mut ep, t0 + ms(100), &reply(&cancel, 100, &[]));
    let sent = run_until(&mut ep, t0, ms(9_000));
    let cancels: Vec<u64> = sent.iter().map(|(d, _)| d.as_millis() as u64).collect();
    // The first retransmission was armed at 0.5 s; after it the interval is T2.
    assert_eq!(cancels, [500, 4500, 8500]);
}

#[test]
fn ring_hold_delays_the_cancel() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    ep.start_call(t0, request(2_000, 15_000));
    let invite = drain(&mut ep).remove(0);
    feed(&mut ep, t0 + ms(300), &reply(&invite, 180, &[]));
    assert!(drain(&mut ep).is_empty());
    let sent = run_until(&mut ep, t0, ms(2_300));
    assert_eq!(sent, [(ms(2_300), "CANCEL".to_string())]);
}

#[test]
fn final_codes_map_to_outcomes_and_are_acked_in_the_transaction() {
    let table = [
        (486, Outcome::Busy),
        (600, Outcome::Busy),
        (404, Outcome::InvalidNumber),
        (484, Outcome::InvalidNumber),
        (604, Outcome::InvalidNumber),
        (480, Outcome::Unavailable),
        (408, Outcome::Unavailable),
        (403, Outcome::Rejected),
        (603, Outcome::Rejected),
        (503, Outcome::TrunkError),
        (500, Outcome::Failed),
        (302, Outcome::Failed),
        (487, Outcome::Failed), // 487 that we did not ask for
        (401, Outcome::Failed), // challenge without credentials configured
    ];
    for (code, outcome) in table {
        let mut ep = endpoint();
        let t0 = Instant::now();
        ep.start_call(t0, request(0, 15_000));
        let invite = drain(&mut ep).remove(0);
        feed(&mut ep, t0 + ms(5), &reply(&invite, 100, &[]));
        feed(
            &mut ep,
            t0 + ms(10),
            &reply(&invite, code, &[("Retry-After", "120")]),
        );
        let out = drain(&mut ep);
        assert_eq!(out.len(), 1, "{code}");
        let ack = Message::parse(&out[0].payload).unwrap();
        assert_eq!(ack.cseq.method, "ACK");
        assert_eq!(
            ack.top_via_branch,
            Message::parse(&invite.payload).unwrap().top_via_branch,
            "{code}: ACK for a non-2xx uses the INVITE's branch"
        );
        let r = ended(&mut ep);
        assert_eq!(r[0].outcome, outcome, "{code}");
        assert_eq!(r[0].sip_code, Some(code));
        assert_eq!(r[0].retry_after, (code == 503).then_some(120));
    }
}

#[test]
fn answer_before_cancel_gets_ack_to_contact_and_bye() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    ep.start_call(t0, request(0, 15_000));
    let invite = drain(&mut ep).remove(0);
    feed(&mut ep, t0 + ms(10), &reply(&invite, 180, &[]));
    let cancel = drain(&mut ep).remove(0);
    let ok = reply(
        &invite,
        200,
        &[
            ("Contact", "<sip:callee@127.0.0.1:5080>"),
            (
                "Record-Route",
                "<sip:127.0.0.1:5071;lr>, <sip:127.0.0.1:5072;lr>",
            ),
        ],
    );
    feed(&mut ep, t0 + ms(20), &ok);
    let out = drain(&mut ep);
    assert_eq!(out.iter().map(method).collect::<Vec<_>>(), ["ACK", "BYE"]);
    let inv = Message::parse(&invite.payload).unwrap();
    let (ack, bye) = (
        Message::parse(&out[0].payload).unwrap(),
        Message::parse(&out[1].payload).unwrap(),
    );
    assert_ne!(
        ack.top_via_branch, inv.top_via_branch,
        "2xx ACK is a new transaction"
    );
    assert_ne!(bye.top_via_branch, ack.top_via_branch);
    assert!(matches!(
        ack.start,
        StartLine::Request {
            uri: "sip:callee@127.0.0.1:5080",
            ..
        }
    ));
    assert_eq!(ack.cseq.number, inv.cseq.number);
    assert_eq!(bye.cseq.number, inv.cseq.number + 1);
    assert_eq!(ack.to_tag, Some("callee1"));
    // Route set = Record-Route reversed; sent to the first route.
    let routes: Vec<_> = bye.values(super::message::Name::Route).collect();
    assert_eq!(
        routes,
        [&b"<sip:127.0.0.1:5072;lr>"[..], b"<sip:127.0.0.1:5071;lr>"]
    );
    assert_eq!(out[0].dest, "127.0.0.1:5072".parse::<SocketAddr>().unwrap());
    let r = ended(&mut ep);
    assert_eq!(r[0].outcome, Outcome::Answered);
    assert_eq!(r[0].sip_code, Some(200));

    // The 200 is retransmitted: re-ACK, byte for byte; no second BYE.
    feed(&mut ep, t0 + ms(520), &ok);
    let again = drain(&mut ep);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].payload, out[0].payload);
    // The CANCEL stopped retransmitting; the BYE follows Timer E until answered.
    let sent = run_until(&mut ep, t0, ms(1_600));
    assert_eq!(sent, [(ms(520), "BYE".into()), (ms(1_520), "BYE".into())]);
    feed(&mut ep, t0 + ms(1_600), &reply(&out[1], 200, &[]));
    assert!(run_until(&mut ep, t0, Duration::from_secs(30)).is_empty());
    let _ = cancel;
    assert!(ended(&mut ep).is_empty());
}

/// Two legs of a forked call answer (parallel ringing): each 2xx gets an
/// ACK of its own dialog (§13.2.2.4: one for each 2xx) and a BYE. The
/// second leg's ACK and BYE have branches of their own, so its 200 does
/// not end the first leg's BYE, which keeps to Timer E until its own 200.
/// Before, the second leg got the first leg's ACK and no BYE, and stayed
/// up.
#[test]
fn a_second_forked_leg_that_answers_gets_its_own_ack_and_bye() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    ep.start_call(t0, request(0, 15_000));
    let invite = drain(&mut ep).remove(0);
    feed(&mut ep, t0 + ms(10), &reply(&invite, 180, &[]));
    assert_eq!(method(&drain(&mut ep)[0]), "CANCEL");
    let ok1 = reply(&invite, 200, &[("Contact", "<sip:leg1@127.0.0.1:5080>")]);
    feed(&mut ep, t0 + ms(20), &ok1);
    let leg1 = drain(&mut ep);
    assert_eq!(leg1.iter().map(method).collect::<Vec<_>>(), ["ACK", "BYE"]);
    let ok2 = leg_ok(&invite, "callee2", "<sip:leg2@127.0.0.1:5081>");
    feed(&mut ep, t0 + ms(30), &ok2);
    let leg2 = drain(&mut ep);
    assert_eq!(leg2.iter().map(method).collect::<Vec<_>>(), ["ACK", "BYE"]);
    let (ack2, bye2) = (
        Message::parse(&leg2[0].payload).unwrap(),
        Message::parse(&leg2[1].payload).unwrap(),
    );
    assert_eq!(ack2.to_tag, Some("callee2"));
    assert_eq!(bye2.to_tag, Some("callee2"));
    assert!(matches!(
        ack2.start,
        StartLine::Request {
            uri: "sip:leg2@127.0.0.1:5081",
            ..
        }
    ));
    assert_eq!(
        leg2[1].dest,
        "127.0.0.1:5081".parse::<SocketAddr>().unwrap()
    );
    let (ack1, bye1) = (
        Message::parse(&leg1[0].payload).unwrap(),
        Message::parse(&leg1[1].payload).unwrap(),
    );
    assert_ne!(bye2.top_via_branch, bye1.top_via_branch);
    assert_ne!(ack2.top_via_branch, ack1.top_via_branch);
    // Leg 2's 200 to its BYE is taken (not a stray) and leaves leg 1's
    // BYE retransmitting.
    let input = feed(&mut ep, t0 + ms(40), &reply(&leg2[1], 200, &[]));
    assert!(matches!(input, Input::Response), "{input:?}");
    assert_eq!(run_until(&mut ep, t0, ms(600)), [(ms(520), "BYE".into())]);
    // Each leg's retransmitted 2xx gets that leg's ACK again, and no BYE
    // (each BYE keeps to its own transaction).
    for (ok, leg) in [(&ok1, &leg1), (&ok2, &leg2)] {
        feed(&mut ep, t0 + ms(700), ok);
        let again = drain(&mut ep);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].payload, leg[0].payload);
        assert_eq!(again[0].dest, leg[0].dest);
    }
    // One outcome for the call: answered.
    let r = ended(&mut ep);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].outcome, Outcome::Answered);
}

#[test]
fn timed_out_call_that_starts_ringing_late_is_cancelled() {
    let (mut ep, t0, invite) = timed_out_call();
    feed(
        &mut ep,
        t0 + Duration::from_secs(33),
        &reply(&invite, 180, &[]),
    );
    assert_eq!(
        drain(&mut ep).iter().map(method).collect::<Vec<_>>(),
        ["CANCEL"]
    );
    assert!(ended(&mut ep).is_empty(), "one outcome per call");
}

#[test]
fn requests_from_the_trunk_are_answered() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    let options = b"OPTIONS sip:127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKo1\r\nFrom: <sip:sbc@127.0.0.1>;tag=a\r\nTo: <sip:127.0.0.1>\r\nCall-ID: o1\r\nCSeq: 7 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(feed(&mut ep, t0, options), Input::Request);
    let out = drain(&mut ep);
    let r = Message::parse(&out[0].payload).unwrap();
    assert_eq!(r.status(), Some(200));
    assert_eq!(r.top_via_branch, Some("z9hG4bKo1"));
    assert_eq!(r.cseq.number, 7);
    assert!(r.to_tag.is_some());
    assert_eq!(out[0].dest, TRUNK.parse::<SocketAddr>().unwrap());

    let bye = b"BYE sip:x@127.0.0.1:5060 SIP/2.0\r\nv: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKb1\r\nf: <sip:a@b>;tag=a\r\nt: <sip:c@d>;tag=nosuch\r\ni: b1\r\nCSeq: 1 BYE\r\nl: 0\r\n\r\n";
    feed(&mut ep, t0, bye);
    assert_eq!(
        Message::parse(&drain(&mut ep)[0].payload).unwrap().status(),
        Some(481)
    );

    let msg = b"MESSAGE sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKm1\r\nFrom: <sip:a@b>;tag=a\r\nTo: <sip:c@d>\r\nCall-ID: m1\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n";
    feed(&mut ep, t0, msg);
    assert_eq!(
        Message::parse(&drain(&mut ep)[0].payload).unwrap().status(),
        Some(501)
    );

    let ack = b"ACK sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKa1\r\nFrom: <sip:a@b>;tag=a\r\nTo: <sip:c@d>;tag=b\r\nCall-ID: a1\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n";
    feed(&mut ep, t0, ack);
    assert!(drain(&mut ep).is_empty(), "an ACK is never answered");
    assert_eq!(ep.stats().requests_answered, 3);
}

#[test]
fn bye_from_the_callee_in_an_answered_call_gets_200() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    ep.start_call(t0, request(0, 15_000));
    let invite = drain(&mut ep).remove(0);
    feed(
        &mut ep,
        t0,
        &reply(&invite, 200, &[("Contact", "<sip:c@127.0.0.1:5070>")]),
    );
    drain(&mut ep);
    let inv = Message::parse(&invite.payload).unwrap();
    let bye = format!(
        "BYE sip:x@127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKcb\r\nFrom: <sip:c@d>;tag=callee1\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n",
        String::from_utf8_lossy(inv.from),
        inv.call_id
    );
    feed(&mut ep, t0, bye.as_bytes());
    assert_eq!(
        Message::parse(&drain(&mut ep)[0].payload).unwrap().status(),
        Some(200)
    );
}

#[test]
fn stray_and_garbage_are_counted_never_fatal() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    let stray = b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKnotours\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(feed(&mut ep, t0, stray), Input::Stray);
    assert!(matches!(
        feed(&mut ep, t0, b"\x00\xffhello"),
        Input::Malformed(_)
    ));
    assert_eq!(ep.stats().stray_responses, 1);
    assert_eq!(ep.stats().parse_errors, 1);
    assert_eq!(ep.calls_in_memory(), 0);
}

#[test]
fn shutdown_cancels_a_ringing_call() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    let h = ep.start_call(t0, request(10_000, 15_000));
    let invite = drain(&mut ep).remove(0);
    feed(&mut ep, t0 + ms(10), &reply(&invite, 180, &[]));
    assert!(drain(&mut ep).is_empty(), "ring hold in effect");
    ep.cancel_call(t0 + ms(50), h);
    assert_eq!(
        drain(&mut ep).iter().map(method).collect::<Vec<_>>(),
        ["CANCEL"]
    );
    feed(&mut ep, t0 + ms(60), &reply(&invite, 487, &[]));
    assert_eq!(ended(&mut ep)[0].outcome, Outcome::Delivered);
}

#[test]
fn proxy_challenge_is_answered_once_with_digest_and_cancel_uses_the_new_branch() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    ep.start_call(t0, with_credentials("trunkuser", "s3cret"));
    let invite = drain(&mut ep).remove(0);
    let challenge = "Digest realm=\"carrier\", nonce=\"abc123\", qop=\"auth\", algorithm=SHA-256";
    let first = reply(
        &invite,
        407,
        &[
            (
                "Proxy-Authenticate",
                "Digest realm=\"carrier\", nonce=\"abc123\", qop=\"auth\", algorithm=MD5",
            ),
            ("Proxy-Authenticate", challenge),
        ],
    );
    feed(&mut ep, t0 + ms(10), &first);
    let out = drain(&mut ep);
    assert_eq!(
        out.iter().map(method).collect::<Vec<_>>(),
        ["ACK", "INVITE"]
    );
    let (i1, ack, i2) = (
        Message::parse(&invite.payload).unwrap(),
        Message::parse(&out[0].payload).unwrap(),
        Message::parse(&out[1].payload).unwrap(),
    );
    assert_eq!(ack.top_via_branch, i1.top_via_branch);
    assert_ne!(i2.top_via_branch, i1.top_via_branch);
    assert_eq!(i2.cseq.number, i1.cseq.number + 1);
    assert_eq!(i2.call_id, i1.call_id);
    assert_eq!(i2.from, i1.from);
    let auth = header_of(&out[1], "Proxy-Authorization").expect("Proxy-Authorization");
    assert!(auth.contains("algorithm=SHA-256"), "{auth}");
    let uri = match i2.start {
        StartLine::Request { uri, .. } => uri,
        _ => unreachable!(),
    };
    assert_digest(&auth, challenge, "INVITE", uri);

    // The 407 retransmitted: ACKed again, no third INVITE.
    feed(&mut ep, t0 + ms(20), &first);
    assert_eq!(
        drain(&mut ep).iter().map(method).collect::<Vec<_>>(),
        ["ACK"]
    );
    // A second challenge is not answered again: one retry only.
    let retry = out[1].clone();
    feed(&mut ep, t0 + ms(30), &reply(&retry, 180, &[]));
    let sent = drain(&mut ep);
    let cancel = Message::parse(&sent[0].payload).unwrap();
    assert_eq!(cancel.top_via_branch, i2.top_via_branch);
    assert_eq!(cancel.cseq.number, i2.cseq.number);
    feed(&mut ep, t0 + ms(40), &reply(&retry, 487, &[]));
    assert_eq!(ended(&mut ep)[0].outcome, Outcome::Delivered);
}

#[test]
fn a_second_challenge_ends_the_call() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    ep.start_call(t0, with_credentials("u", "p"));
    let invite = drain(&mut ep).remove(0);
    let ch = [("WWW-Authenticate", "Digest realm=\"r\", nonce=\"n\"")];
    feed(&mut ep, t0, &reply(&invite, 401, &ch));
    let retry = drain(&mut ep).remove(1);
    feed(&mut ep, t0 + ms(5), &reply(&retry, 401, &ch));
    assert_eq!(
        drain(&mut ep).iter().map(method).collect::<Vec<_>>(),
        ["ACK"]
    );
    let r = ended(&mut ep);
    assert_eq!((r[0].outcome, r[0].sip_code), (Outcome::Failed, Some(401)));
}

/// One ringing call taken to its 487: (invite, cancel, the 487, the ACK).
fn call_to_487(ep: &mut Endpoint<StdRng>, t0: Instant) -> (Transmit, Transmit, Vec<u8>, Transmit) {
    call_to_487_of(ep, t0, request(0, 15_000))
}

/// [`call_to_487`] for the call `req`.
fn call_to_487_of(
    ep: &mut Endpoint<StdRng>,
    t0: Instant,
    req: CallRequest,
) -> (Transmit, Transmit, Vec<u8>, Transmit) {
    ep.start_call(t0, req);
    let invite = drain(ep).remove(0);
    feed(ep, t0 + ms(10), &reply(&invite, 180, &[]));
    let cancel = drain(ep).remove(0);
    feed(ep, t0 + ms(11), &reply(&cancel, 200, &[]));
    let r487 = reply(&invite, 487, &[]);
    feed(ep, t0 + ms(12), &r487);
    let ack = drain(ep).remove(0);
    (invite, cancel, r487, ack)
}

/// SPEC §4: `delivered` = the phone rang and the call was cancelled. A
/// cancelled call that rang is delivered when a final that closes a
/// cancelled or refused ringing call follows (487, or 480/486/600/603 from
/// carriers and users), ACKed and its code reported; a final that says the
/// phone never rang (404 after a 183 announcement, a 5xx) keeps its own
/// outcome, and so do these finals with no CANCEL of ours.
#[test]
fn a_rung_and_cancelled_call_is_delivered_by_the_finals_that_close_one() {
    for (code, want) in [
        (480u16, Outcome::Delivered),
        (486, Outcome::Delivered),
        (603, Outcome::Delivered),
        (404, Outcome::InvalidNumber),
        (500, Outcome::Failed),
        (503, Outcome::TrunkError),
    ] {
        let mut ep = endpoint();
        let t0 = Instant::now();
        ep.start_call(t0, request(0, 15_000));
        let invite = drain(&mut ep).remove(0);
        feed(&mut ep, t0 + ms(10), &reply(&invite, 180, &[]));
        let cancel = drain(&mut ep).remove(0);
        assert_eq!(method(&cancel), "CANCEL");
        feed(&mut ep, t0 + ms(11), &reply(&cancel, 200, &[]));
        feed(&mut ep, t0 + ms(12), &reply(&invite, code, &[]));
        let out = drain(&mut ep);
        assert_eq!(
            out.iter().map(method).collect::<Vec<_>>(),
            ["ACK"],
            "{code}"
        );
        let r = ended(&mut ep);
        assert_eq!(r[0].outcome, want, "{code}");
        assert_eq!(r[0].sip_code, Some(code));
    }
    // The same final during a ring hold (no CANCEL sent yet) is the
    // callee's own answer: 486 is busy.
    let mut ep = endpoint();
    let t0 = Instant::now();
    ep.start_call(t0, request(2_000, 15_000));
    let invite = drain(&mut ep).remove(0);
    feed(&mut ep, t0 + ms(10), &reply(&invite, 180, &[]));
    assert!(drain(&mut ep).is_empty(), "no CANCEL during the hold");
    feed(&mut ep, t0 + ms(500), &reply(&invite, 486, &[]));
    assert_eq!(ended(&mut ep)[0].outcome, Outcome::Busy);
}

#[test]
fn a_finished_call_shrinks_to_a_tombstone_that_still_acks_and_absorbs() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    let (invite, cancel, r487, ack) = call_to_487(&mut ep, t0);
    assert_eq!(ended(&mut ep)[0].outcome, Outcome::Delivered);
    assert_eq!((ep.tombstones(), ep.calls_in_memory()), (1, 1));
    assert_eq!(ep.active_calls(), 0);

    // A retransmitted 487 after compaction: the same ACK, byte for byte.
    assert_eq!(feed(&mut ep, t0 + ms(600), &r487), Input::Response);
    let again = drain(&mut ep);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].payload, ack.payload);
    assert_eq!(again[0].dest, ack.dest);
    // A late 200 for the CANCEL and a late 180 are absorbed, not answered.
    assert_eq!(
        feed(&mut ep, t0 + ms(700), &reply(&cancel, 200, &[])),
        Input::Response
    );
    assert_eq!(
        feed(&mut ep, t0 + ms(710), &reply(&invite, 180, &[])),
        Input::Response
    );
    assert!(drain(&mut ep).is_empty());
    assert_eq!(ep.stats().late_responses, 3);
    // Every response still reaches the application for its per-code
    // metrics, but the outcome is never reported twice.
    let ev = events(&mut ep);
    assert_eq!(ev.len(), 3);
    assert!(ev
        .iter()
        .all(|e| matches!(e, Event::Response { tag: 42, .. })));

    // Responses that match no transaction of the tombstone are strays:
    // another Call-ID on its branch, a CSeq it never sent, a BYE answer.
    let other_id = String::from_utf8(r487.clone())
        .unwrap()
        .replace("Call-ID: ", "Call-ID: x");
    assert_eq!(
        feed(&mut ep, t0 + ms(800), other_id.as_bytes()),
        Input::Stray
    );
    let other_cseq = String::from_utf8(r487.clone())
        .unwrap()
        .replace("CSeq: 1 INVITE", "CSeq: 7 INVITE");
    assert_eq!(
        feed(&mut ep, t0 + ms(800), other_cseq.as_bytes()),
        Input::Stray
    );
    assert_eq!(ep.stats().stray_responses, 2);
    assert!(drain(&mut ep).is_empty());

    // A BYE in the "dialog" of a call that ended with a 487 gets 481: a
    // non-2xx final makes no dialog.
    let i = Message::parse(&invite.payload).unwrap();
    let bye = format!(
        "BYE sip:x@127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKtb\r\nFrom: <sip:c@d>;tag=callee1\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n",
        String::from_utf8_lossy(i.from),
        i.call_id
    );
    feed(&mut ep, t0 + ms(900), bye.as_bytes());
    assert_eq!(
        Message::parse(&drain(&mut ep)[0].payload).unwrap().status(),
        Some(481)
    );

    // Timer D: 32 s after the 487 the tombstone goes; nothing is sent.
    assert!(run_until(&mut ep, t0, ms(32_011)).is_empty());
    assert_eq!(ep.tombstones(), 1);
    run_until(&mut ep, t0, ms(32_012));
    assert_eq!((ep.tombstones(), ep.calls_in_memory()), (0, 0));
    assert_eq!(ep.poll_timeout(), None);
    // After it, the 487 is a stray.
    assert_eq!(feed(&mut ep, t0 + ms(40_000), &r487), Input::Stray);
    assert!(drain(&mut ep).is_empty());
}

#[test]
fn a_2xx_from_a_forked_leg_after_the_487_is_acked_and_hung_up() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    let (invite, _, _, _) = call_to_487(&mut ep, t0);
    ended(&mut ep);
    let ok = leg_ok(&invite, "leg2", "<sip:leg2@127.0.0.1:5090>");
    assert_eq!(feed(&mut ep, t0 + ms(50), &ok), Input::Response);
    let out = drain(&mut ep);
    assert_eq!(out.iter().map(method).collect::<Vec<_>>(), ["ACK", "BYE"]);
    let ack = Message::parse(&out[0].payload).unwrap();
    assert_eq!(ack.to_tag, Some("leg2"));
    assert_eq!(out[0].dest, "127.0.0.1:5090".parse::<SocketAddr>().unwrap());
    // The call is live again (BYE transaction), its outcome not re-reported.
    assert_eq!((ep.tombstones(), ep.calls_in_memory()), (0, 1));
    assert!(ended(&mut ep).is_empty());
    // The BYE is retransmitted until answered, then the state goes at 64·T1.
    let sent = run_until(&mut ep, t0, ms(600));
    assert_eq!(sent, [(ms(550), "BYE".into())]);
    feed(&mut ep, t0 + ms(600), &reply(&out[1], 200, &[]));
    run_until(&mut ep, t0, Duration::from_secs(40));
    assert_eq!(ep.calls_in_memory(), 0);
    assert_eq!(ep.active_calls(), 0);
}

#[test]
fn tombstone_after_a_digest_retry_acks_both_finals() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    ep.start_call(t0, with_credentials("u", "p"));
    let invite = drain(&mut ep).remove(0);
    let ch = [("Proxy-Authenticate", "Digest realm=\"r\", nonce=\"n\"")];
    let r407 = reply(&invite, 407, &ch);
    feed(&mut ep, t0, &r407);
    let out = drain(&mut ep);
    let (ack1, retry) = (out[0].clone(), out[1].clone());
    feed(&mut ep, t0 + ms(5), &reply(&retry, 180, &[]));
    let cancel = drain(&mut ep).remove(0);
    feed(&mut ep, t0 + ms(6), &reply(&cancel, 200, &[]));
    let r487 = reply(&retry, 487, &[]);
    feed(&mut ep, t0 + ms(7), &r487);
    let ack2 = drain(&mut ep).remove(0);
    assert_eq!(ended(&mut ep)[0].outcome, Outcome::Delivered);
    assert_eq!(ep.tombstones(), 1);
    // Both finals come again: each gets its own transaction's ACK.
    feed(&mut ep, t0 + ms(500), &r407);
    feed(&mut ep, t0 + ms(501), &r487);
    let again = drain(&mut ep);
    assert_eq!(again.len(), 2);
    assert_eq!(again[0].payload, ack1.payload);
    assert_eq!(again[1].payload, ack2.payload);
    let a1 = Message::parse(&again[0].payload).unwrap();
    assert_eq!(a1.cseq.number, 1);
    assert_eq!(
        a1.top_via_branch,
        Message::parse(&invite.payload).unwrap().top_via_branch
    );
}

#[test]
fn a_challenge_without_credentials_leaves_a_tombstone_that_reacks_it() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    ep.start_call(t0, request(0, 15_000));
    let invite = drain(&mut ep).remove(0);
    let r401 = reply(
        &invite,
        401,
        &[("WWW-Authenticate", "Digest realm=\"r\", nonce=\"n\"")],
    );
    feed(&mut ep, t0, &r401);
    let ack = drain(&mut ep).remove(0);
    assert_eq!(ended(&mut ep)[0].outcome, Outcome::Failed);
    assert_eq!(ep.tombstones(), 1);
    feed(&mut ep, t0 + ms(500), &r401);
    assert_eq!(drain(&mut ep)[0].payload, ack.payload);
}

/// Thousands of calls through their 487: the tombstones hold no timers of
/// their own, so the queue keeps at most about one entry per call, and the
/// INVITE retransmission entry of each call moves to Timer D, not more.
#[test]
fn timer_queue_keeps_about_one_entry_per_call() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    let n = 5_000u64;
    for i in 0..n {
        let now = t0 + Duration::from_micros(250 * i);
        ep.handle_timeout(now);
        let _ = call_to_487(&mut ep, now);
    }
    assert_eq!(ep.tombstones(), n as usize);
    assert!(
        ep.timer_entries() <= n as usize + 8,
        "{} entries for {n} calls",
        ep.timer_entries()
    );
    // Nothing is due before the first tombstone expires: no wake-up for
    // the disarmed INVITE and CANCEL timers.
    assert_eq!(
        ep.poll_timeout(),
        Some(t0 + ms(12) + Duration::from_secs(32))
    );
    run_until(&mut ep, t0, Duration::from_secs(40));
    assert_eq!(ep.calls_in_memory(), 0);
    assert_eq!(ep.timer_entries(), 0);
}

/// A 180 that waited in the socket queue: ringing is dated at its arrival,
/// the CANCEL at its handling, so the cancel delay shows the wait.
#[test]
fn a_queued_180_counts_its_wait_in_the_cancel_delay() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    ep.start_call(t0, request(0, 15_000));
    let invite = drain(&mut ep).remove(0);
    let (arrived, handled) = (t0 + ms(20), t0 + ms(23));
    let from = invite.dest;
    ep.handle_input_at(handled, arrived, from, &reply(&invite, 180, &[]));
    let cancel = drain(&mut ep).remove(0);
    assert_eq!(method(&cancel), "CANCEL");
    feed(&mut ep, t0 + ms(25), &reply(&cancel, 200, &[]));
    feed(&mut ep, t0 + ms(30), &reply(&invite, 487, &[]));
    let r = ended(&mut ep);
    assert_eq!(r[0].post_dial_delay(), Some(ms(20)));
    assert_eq!(r[0].cancel_delay(), Some(ms(3)));
    // A stamp after the handling time (clock noise) is taken as the
    // handling time: no negative delays.
    let mut ep = endpoint();
    ep.start_call(t0, request(0, 15_000));
    let invite = drain(&mut ep).remove(0);
    ep.handle_input_at(
        t0 + ms(5),
        t0 + ms(9),
        invite.dest,
        &reply(&invite, 180, &[]),
    );
    let cancel = drain(&mut ep).remove(0);
    feed(&mut ep, t0 + ms(6), &reply(&cancel, 200, &[]));
    feed(&mut ep, t0 + ms(7), &reply(&invite, 487, &[]));
    let r = ended(&mut ep);
    assert_eq!(r[0].post_dial_delay(), Some(ms(5)));
    assert_eq!(r[0].cancel_delay(), Some(ms(0)));
}

/// `auth` (credentials we sent for trunkuser / s3cret) answers
/// `challenge` for `method` on `uri`: the response recomputed from the
/// cnonce it carries.
fn assert_digest(auth: &str, challenge: &str, method: &str, uri: &str) {
    let cnonce = auth
        .split("cnonce=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("a cnonce");
    let ch = super::digest::Challenge::parse(challenge).unwrap();
    let expected = super::digest::response(&ch, "trunkuser", "s3cret", method, uri, cnonce, 1);
    assert!(auth.contains(&format!("response=\"{expected}\"")), "{auth}");
}

/// The value of header `name` in a request we sent.
fn header_of(t: &Transmit, name: &str) -> Option<String> {
    Message::parse(&t.payload)
        .unwrap()
        .headers()
        .find(|(_, raw, _)| raw.eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, _, v)| std::str::from_utf8(v).unwrap().to_string())
}

/// An authenticated trunk whose callee answers: the ACK for the 2xx
/// carries the INVITE's credentials (RFC 3261 §13.2.2.4), and a 407 to
/// our BYE is answered once with a BYE of its own digest (method BYE, the
/// Contact as uri), CSeq+1 and a new branch, retransmitted until its 200.
/// Before, the ACK had no credentials and the challenged BYE was taken as
/// final: the call stayed up (and billed) until the far end gave up.
#[test]
fn an_answered_authenticated_call_acks_with_credentials_and_answers_a_bye_challenge() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    ep.start_call(t0, with_credentials("trunkuser", "s3cret"));
    let invite = drain(&mut ep).remove(0);
    let challenge = "Digest realm=\"carrier\", nonce=\"n1\", qop=\"auth\", algorithm=SHA-256";
    feed(
        &mut ep,
        t0 + ms(10),
        &reply(&invite, 407, &[("Proxy-Authenticate", challenge)]),
    );
    let out = drain(&mut ep);
    let invite2 = out[1].clone();
    let invite_auth = header_of(&invite2, "Proxy-Authorization").expect("credentials");
    let ok = reply(&invite2, 200, &[("Contact", "<sip:callee@127.0.0.1:5080>")]);
    feed(&mut ep, t0 + ms(20), &ok);
    let out = drain(&mut ep);
    assert_eq!(out.iter().map(method).collect::<Vec<_>>(), ["ACK", "BYE"]);
    assert_eq!(
        header_of(&out[0], "Proxy-Authorization").as_deref(),
        Some(invite_auth.as_str()),
        "the 2xx ACK carries the INVITE's credentials"
    );
    let bye1 = out[1].clone();
    assert_eq!(header_of(&bye1, "Proxy-Authorization"), None);

    // The BYE is challenged.
    let bye_challenge = "Digest realm=\"carrier\", nonce=\"n2\", qop=\"auth\", algorithm=SHA-256";
    let c407 = reply(&bye1, 407, &[("Proxy-Authenticate", bye_challenge)]);
    feed(&mut ep, t0 + ms(30), &c407);
    let out = drain(&mut ep);
    assert_eq!(out.iter().map(method).collect::<Vec<_>>(), ["BYE"]);
    let bye2 = out[0].clone();
    let (m1, m2) = (
        Message::parse(&bye1.payload).unwrap(),
        Message::parse(&bye2.payload).unwrap(),
    );
    assert_eq!(m2.cseq.number, m1.cseq.number + 1);
    assert_ne!(m2.top_via_branch, m1.top_via_branch);
    assert_eq!(m2.to_tag, m1.to_tag);
    assert_eq!(bye2.dest, bye1.dest);
    let auth = header_of(&bye2, "Proxy-Authorization").expect("BYE credentials");
    assert_digest(&auth, bye_challenge, "BYE", "sip:callee@127.0.0.1:5080");
    // A retransmitted 407 of the first BYE changes nothing; the new BYE
    // follows Timer E until its 200, then nothing more is sent.
    feed(&mut ep, t0 + ms(40), &c407);
    assert!(drain(&mut ep).is_empty());
    let sent = run_until(&mut ep, t0, ms(600));
    assert_eq!(sent, [(ms(530), "BYE".into())]);
    feed(&mut ep, t0 + ms(600), &reply(&bye2, 200, &[]));
    assert!(run_until(&mut ep, t0, Duration::from_secs(40))
        .iter()
        .all(|(_, m)| m != "BYE"));
}

/// A call cancelled for `no_ringing` that then rings has no 180 -> CANCEL
/// delay (the CANCEL came first): `None`, not a 0 that would pull the
/// cancel-delay histogram down.
#[test]
fn a_cancel_before_the_ringing_has_no_cancel_delay() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    ep.start_call(t0, request(0, 1_000));
    let invite = drain(&mut ep).remove(0);
    feed(&mut ep, t0 + ms(10), &reply(&invite, 100, &[]));
    let sent = run_until(&mut ep, t0, ms(1_000));
    assert!(sent.contains(&(ms(1_000), "CANCEL".into())), "{sent:?}");
    feed(&mut ep, t0 + ms(1_100), &reply(&invite, 180, &[]));
    feed(&mut ep, t0 + ms(1_120), &reply(&invite, 487, &[]));
    let r = ended(&mut ep);
    assert_eq!(r[0].outcome, Outcome::NoRinging);
    assert!(r[0].ringing_at.is_some(), "the late 180 is recorded");
    assert_eq!(r[0].cancel_delay(), None);

    // The ring timeout before any provisional: the CANCEL waits, and the
    // late 180 sends it at once. Still no cancel delay (it was ~0), and a
    // 480 closing it is still `no_ringing`.
    let mut ep = endpoint();
    ep.start_call(t0, request(0, 1_000));
    let invite = drain(&mut ep).remove(0);
    run_until(&mut ep, t0, ms(1_000));
    feed(&mut ep, t0 + ms(1_100), &reply(&invite, 180, &[]));
    assert!(drain(&mut ep).iter().any(|t| method(t) == "CANCEL"));
    feed(&mut ep, t0 + ms(1_120), &reply(&invite, 480, &[]));
    let r = ended(&mut ep);
    assert_eq!(r[0].outcome, Outcome::NoRinging);
    assert!(r[0].cancel_at >= r[0].ringing_at);
    assert_eq!(r[0].cancel_delay(), None);
}

/// A slow trunk's 503 with Retry-After after Timer B already gave the
/// call `timeout`: ACKed, no second outcome, and the trunk's request for
/// rest still reaches the driver (it was dropped with the late final).
#[test]
fn a_503_after_timer_b_still_asks_for_the_trunks_rest() {
    let (mut ep, t0, invite) = timed_out_call();
    feed(
        &mut ep,
        t0 + Duration::from_secs(33),
        &reply(&invite, 503, &[("Retry-After", "30")]),
    );
    assert_eq!(
        drain(&mut ep).iter().map(method).collect::<Vec<_>>(),
        ["ACK"]
    );
    let evs = events(&mut ep);
    assert!(
        evs.contains(&Event::TrunkRetryAfter { tag: 42, secs: 30 }),
        "{evs:?}"
    );
    assert!(!evs.iter().any(|e| matches!(e, Event::Ended(_))), "{evs:?}");
}

/// A call answered on two forked legs, whose INVITE was `invite`: the
/// transmits each leg's 2xx brought (ACK, BYE), leg 1 at 20 ms, leg 2 at
/// 30 ms, to 127.0.0.1:5080 and :5081.
fn answered_on_two_legs(
    ep: &mut Endpoint<StdRng>,
    t0: Instant,
    invite: &Transmit,
) -> (Vec<Transmit>, Vec<Transmit>) {
    feed(
        ep,
        t0 + ms(20),
        &leg_ok(invite, "callee1", "<sip:leg1@127.0.0.1:5080>"),
    );
    let leg1 = drain(ep);
    feed(
        ep,
        t0 + ms(30),
        &leg_ok(invite, "callee2", "<sip:leg2@127.0.0.1:5081>"),
    );
    let leg2 = drain(ep);
    assert_eq!(leg2.iter().map(method).collect::<Vec<_>>(), ["ACK", "BYE"]);
    (leg1, leg2)
}

/// A lost BYE on a second forked leg is sent again on that leg's own
/// Timer E (T1 doubling, RFC 3261 §17.1.2.2), though the first leg's BYE
/// got its 200; an unanswered BYE stops at Timer F (64·T1), and the
/// call's state goes when the last leg's does. (The test above has the
/// first leg's BYE go on after the second's 200.)
/// Before, the second leg's BYE was sent once per copy of its 2xx: with
/// the 2xx ACKed and the BYE lost, that leg stayed up (and billed).
#[test]
fn a_forked_legs_bye_is_retransmitted_on_its_own_timer_e() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    ep.start_call(t0, request(0, 15_000));
    let invite = drain(&mut ep).remove(0);
    let (leg1, leg2) = answered_on_two_legs(&mut ep, t0, &invite);
    // Leg 1's BYE (sent at 20 ms) is answered at once; leg 2's is lost.
    feed(&mut ep, t0 + ms(25), &reply(&leg1[1], 200, &[]));
    let sent = run_until(&mut ep, t0, ms(4_000));
    assert_eq!(
        sent,
        [530u64, 1_530, 3_530]
            .iter()
            .map(|&at| (ms(at), "BYE".to_string()))
            .collect::<Vec<_>>(),
        "leg 2's BYE at T1, 2·T1, 4·T1 after it"
    );
    let resent = {
        let mut ep2 = endpoint();
        ep2.start_call(t0, request(0, 15_000));
        let invite2 = drain(&mut ep2).remove(0);
        let (_, leg2b) = answered_on_two_legs(&mut ep2, t0, &invite2);
        feed(&mut ep2, t0 + ms(25), &reply(&leg1[1], 200, &[]));
        ep2.handle_timeout(t0 + ms(530));
        let out = drain(&mut ep2);
        assert_eq!(out.len(), 1);
        assert_eq!(leg2b[1].payload, leg2[1].payload, "same seed, same call");
        out.into_iter().next().unwrap()
    };
    assert_eq!(resent.payload, leg2[1].payload, "the same BYE, same branch");
    assert_eq!(resent.dest, leg2[1].dest);
    // Capped at T2 (4 s): then every 4 s until Timer F, 32 s after it.
    let sent = run_until(&mut ep, t0, Duration::from_secs(40));
    let byes: Vec<Duration> = sent
        .iter()
        .filter(|(_, m)| m == "BYE")
        .map(|(at, _)| *at)
        .collect();
    assert_eq!(byes.first(), Some(&ms(7_530)));
    assert!(
        byes.windows(2).all(|w| w[1] - w[0] == ms(4_000)),
        "{byes:?}"
    );
    assert!(byes.last().is_some_and(|&l| l <= ms(32_030)), "{byes:?}");
    assert_eq!(ep.calls_in_memory(), 0, "freed 64·T1 after the last leg");
    assert_eq!(ep.poll_timeout(), None);
}

/// Each leg's BYE answers its own 401 once with credentials (CSeq+1, a
/// branch of its own: no two of the six requests share one), and stops
/// at its own 200.
#[test]
fn a_forked_legs_bye_stops_at_its_200_and_answers_its_challenge() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    ep.start_call(t0, with_credentials("trunkuser", "s3cret"));
    let invite = drain(&mut ep).remove(0);
    let (leg1, leg2) = answered_on_two_legs(&mut ep, t0, &invite);
    let ch1 = "Digest realm=\"carrier\", nonce=\"n8\", qop=\"auth\"";
    let r1 = reply(&leg1[1], 401, &[("WWW-Authenticate", ch1)]);
    feed(&mut ep, t0 + ms(25), &r1);
    let retry1 = drain(&mut ep);
    assert_eq!(retry1.iter().map(method).collect::<Vec<_>>(), ["BYE"]);
    assert_eq!(retry1[0].dest, leg1[1].dest);
    let auth1 = header_of(&retry1[0], "Authorization").expect("leg 1 credentials");
    assert_digest(&auth1, ch1, "BYE", "sip:leg1@127.0.0.1:5080");
    feed(&mut ep, t0 + ms(26), &reply(&retry1[0], 200, &[]));
    let challenge = "Digest realm=\"carrier\", nonce=\"n9\", qop=\"auth\"";
    let c401 = reply(&leg2[1], 401, &[("WWW-Authenticate", challenge)]);
    assert_eq!(feed(&mut ep, t0 + ms(40), &c401), Input::Response);
    let out = drain(&mut ep);
    assert_eq!(out.iter().map(method).collect::<Vec<_>>(), ["BYE"]);
    let (first, retry) = (
        Message::parse(&leg2[1].payload).unwrap(),
        Message::parse(&out[0].payload).unwrap(),
    );
    assert_eq!(retry.cseq.number, first.cseq.number + 1);
    assert_eq!(retry.to_tag, Some("callee2"));
    let branches: Vec<_> = [&leg1[0], &leg1[1], &retry1[0], &leg2[0], &leg2[1], &out[0]]
        .iter()
        .map(|t| {
            Message::parse(&t.payload)
                .unwrap()
                .top_via_branch
                .unwrap()
                .to_string()
        })
        .collect();
    let unique: std::collections::HashSet<_> = branches.iter().collect();
    assert_eq!(unique.len(), branches.len(), "{branches:?}");
    assert_eq!(out[0].dest, leg2[1].dest);
    let auth = header_of(&out[0], "Authorization").expect("credentials");
    assert_digest(&auth, challenge, "BYE", "sip:leg2@127.0.0.1:5081");
    // The retry keeps to Timer E until its 200; then nothing more.
    assert_eq!(run_until(&mut ep, t0, ms(600)), [(ms(540), "BYE".into())]);
    feed(&mut ep, t0 + ms(600), &reply(&out[0], 200, &[]));
    assert!(run_until(&mut ep, t0, Duration::from_secs(40)).is_empty());
    assert_eq!(ep.calls_in_memory(), 0);
}

/// A forked leg's 2xx after the 487, on a trunk with credentials: the
/// revived call still has them (through the trunk), so a challenge to its
/// BYE is answered. Before, the tombstone kept no credentials and the
/// challenged BYE ended there: the leg stayed up.
#[test]
fn a_revived_call_answers_a_bye_challenge() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    let (invite, ..) = call_to_487_of(&mut ep, t0, with_credentials("trunkuser", "s3cret"));
    assert_eq!(ep.tombstones(), 1);
    let ok = leg_ok(&invite, "leg2", "<sip:leg2@127.0.0.1:5090>");
    feed(&mut ep, t0 + ms(50), &ok);
    let out = drain(&mut ep);
    assert_eq!(out.iter().map(method).collect::<Vec<_>>(), ["ACK", "BYE"]);
    let challenge = "Digest realm=\"carrier\", nonce=\"n3\", qop=\"auth\"";
    let c407 = reply(&out[1], 407, &[("Proxy-Authenticate", challenge)]);
    feed(&mut ep, t0 + ms(60), &c407);
    let retry = drain(&mut ep);
    assert_eq!(retry.iter().map(method).collect::<Vec<_>>(), ["BYE"]);
    let auth = header_of(&retry[0], "Proxy-Authorization").expect("credentials");
    assert_digest(&auth, challenge, "BYE", "sip:leg2@127.0.0.1:5090");
}

/// A trunk that answers with many forked legs (or a hostile one, a new To
/// tag per 2xx): the legs kept are bounded (the first and 8 more, each
/// with a BYE transaction), the rest get an ACK and a one-shot BYE per
/// copy; nothing panics and the state goes at 64·T1.
#[test]
fn forked_legs_past_the_table_are_answered_and_bounded() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    ep.start_call(t0, request(0, 15_000));
    let invite = drain(&mut ep).remove(0);
    let mut branches = std::collections::HashSet::new();
    for n in 0..14u64 {
        let ok = leg_ok(&invite, &format!("leg{n}"), "<sip:leg@127.0.0.1:5080>");
        assert_eq!(feed(&mut ep, t0 + ms(10 + n), &ok), Input::Response);
        let out = drain(&mut ep);
        assert_eq!(
            out.iter().map(method).collect::<Vec<_>>(),
            ["ACK", "BYE"],
            "leg {n}"
        );
        for t in &out {
            let b = Message::parse(&t.payload)
                .unwrap()
                .top_via_branch
                .unwrap()
                .to_string();
            branches.insert(b);
        }
    }
    // 9 legs with branches of their own (ACK and BYE each), then one shared
    // pair for the rest.
    assert_eq!(branches.len(), 9 * 2 + 2, "{branches:?}");
    let sent = run_until(&mut ep, t0, Duration::from_secs(40));
    // Only the 9 kept BYEs are retransmitted.
    let first_round = sent
        .iter()
        .filter(|(at, m)| m == "BYE" && *at < ms(600))
        .count();
    assert_eq!(first_round, 9, "{sent:?}");
    assert_eq!(ep.calls_in_memory(), 0);
    assert_eq!(ep.poll_timeout(), None);
}

/// A transport failure for the trunk (RFC 3261 §8.1.3.1: as a 503) ends at
/// once, `trunk_error` with no SIP code, every call still waiting there for
/// its first response, and only those: a call the trunk already answered,
/// a call to another trunk and a call placed after the report keep going.
/// A second report within the sweep gap is swept at the gap's end, and a
/// late 180 for a failed call is still cancelled.
#[test]
fn transport_failure_ends_the_calls_waiting_on_that_trunk() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    let other: SocketAddr = "127.0.0.1:5080".parse().unwrap();
    let trunk: SocketAddr = TRUNK.parse().unwrap();
    let call = |tag: u64, to: SocketAddr| CallRequest {
        tag,
        trunk: to,
        trunk_host: to.to_string(),
        ..request(0, 15_000)
    };
    ep.start_call(t0, call(1, trunk));
    ep.start_call(t0, call(2, trunk));
    ep.start_call(t0, call(3, other));
    // Call 7 had a 401 and was sent again with credentials: it is back in
    // the state of a call with no response, but the trunk answered it.
    ep.start_call(
        t0,
        CallRequest {
            tag: 7,
            ..with_credentials("u", "p")
        },
    );
    let sent = drain(&mut ep);
    // Call 2 got its 100 Trying: the trunk answered it.
    assert!(matches!(
        feed(&mut ep, t0, &reply(&sent[1], 100, &[])),
        Input::Response
    ));
    let ch = [("WWW-Authenticate", "Digest realm=\"r\", nonce=\"n\"")];
    feed(&mut ep, t0, &reply(&sent[3], 401, &ch));
    assert_eq!(
        drain(&mut ep).iter().map(method).collect::<Vec<_>>(),
        ["ACK", "INVITE"]
    );
    // An error for an address no call was sent to fails nothing.
    ep.transport_failed(
        t0 + Duration::from_millis(1),
        "127.0.0.1:5999".parse().unwrap(),
    );
    assert!(ended(&mut ep).is_empty());
    let t1 = t0 + Duration::from_millis(5);
    ep.transport_failed(t1, trunk);
    let r = ended(&mut ep);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(
        (r[0].tag, r[0].outcome, r[0].sip_code, r[0].ended_at),
        (1, Outcome::TrunkError, None, t1)
    );
    assert_eq!(ep.stats().transport_failures, 1);
    assert_eq!(ep.active_calls(), 3);
    // No retransmission of the failed INVITE: Timer A stopped with it. The
    // other trunk's call and call 7 do retransmit at 500 ms.
    let until_a = run_until(&mut ep, t0, Duration::from_millis(600));
    assert_eq!(
        until_a,
        vec![
            (Duration::from_millis(500), "INVITE".to_string()),
            (Duration::from_millis(500), "INVITE".to_string())
        ]
    );

    // The gap has passed: a call placed after that, and its own report,
    // swept at once.
    let t2 = t0 + Duration::from_millis(610);
    ep.start_call(t2, call(4, trunk));
    drain(&mut ep);
    ep.transport_failed(t2 + Duration::from_millis(1), trunk);
    let r = ended(&mut ep);
    assert_eq!(
        r.iter().map(|r| (r.tag, r.outcome)).collect::<Vec<_>>(),
        vec![(4, Outcome::TrunkError)]
    );
    // Within the gap after that sweep: a new call and its report wait for
    // the gap's end.
    ep.start_call(t2 + Duration::from_millis(2), call(5, trunk));
    let fifth = drain(&mut ep).remove(0);
    let t3 = t2 + Duration::from_millis(20);
    ep.transport_failed(t3, trunk);
    assert!(ended(&mut ep).is_empty(), "swept again within the gap");
    // Placed after the last report: the sweep does not cover it.
    ep.start_call(t2 + Duration::from_millis(40), call(6, trunk));
    drain(&mut ep);
    let due = ep.poll_timeout().expect("a sweep is due");
    assert_eq!(due, t2 + Duration::from_millis(51));
    ep.handle_timeout(due);
    let r = ended(&mut ep);
    assert_eq!(
        r.iter().map(|r| (r.tag, r.outcome)).collect::<Vec<_>>(),
        vec![(5, Outcome::TrunkError)]
    );
    assert_eq!(ep.stats().transport_failures, 3);
    // Calls 2 (answered), 3 (other trunk), 6 (after the report) and 7
    // (challenged).
    assert_eq!(ep.active_calls(), 4);

    // The trunk was back after all: a late 180 for the failed call is
    // cancelled, not left ringing.
    let late = due + Duration::from_millis(1);
    feed(&mut ep, late, &reply(&fifth, 180, &[]));
    let out = drain(&mut ep);
    assert_eq!(
        out.iter().map(method).collect::<Vec<_>>(),
        vec!["CANCEL".to_string()]
    );
    assert!(ended(&mut ep).is_empty(), "ended once only");
}
