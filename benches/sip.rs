//! Micro-benchmarks of the SIP hot path: parse a 180 and a 487, render an
//! INVITE, and one whole INVITE/180/CANCEL/487/ACK call through the core.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use flashcall::sip::message::Message;
use flashcall::sip::render::{self, Dialog, Local};
use flashcall::sip::{CallRequest, CallerId, Endpoint, EndpointConfig, TimerConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::time::{Duration, Instant};

const R180: &[u8] = b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;rport=5060;branch=z9hG4bK6aa8fbbe0000000000000001i\r\nFrom: <sip:+447700900000@127.0.0.1;user=phone>;tag=6aa8fbbe0000000000000001t\r\nTo: <sip:+447700900123@127.0.0.1:5070;user=phone>;tag=1234SIPpTag011\r\nCall-ID: 9f8e7d6c5b4a39281716151413121110@127.0.0.1\r\nCSeq: 1 INVITE\r\nContact: <sip:callee@127.0.0.1:5070>\r\nContent-Length: 0\r\n\r\n";
const R487: &[u8] = b"SIP/2.0 487 Request Terminated\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;rport=5060;branch=z9hG4bK6aa8fbbe0000000000000001i\r\nFrom: <sip:+447700900000@127.0.0.1;user=phone>;tag=6aa8fbbe0000000000000001t\r\nTo: <sip:+447700900123@127.0.0.1:5070;user=phone>;tag=1234SIPpTag011\r\nCall-ID: 9f8e7d6c5b4a39281716151413121110@127.0.0.1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";

fn endpoint() -> Endpoint<StdRng> {
    Endpoint::new(
        EndpointConfig {
            timers: TimerConfig::default(),
            local: "127.0.0.1:5060".parse().unwrap(),
            sent_by: None,
            public_host: "127.0.0.1".into(),
            user_agent: "flashcall".into(),
            media: "127.0.0.1:40000".parse().unwrap(),
        },
        StdRng::seed_from_u64(1),
    )
}

fn benches(c: &mut Criterion) {
    c.bench_function("parse_180", |b| {
        b.iter(|| Message::parse(black_box(R180)).unwrap().status())
    });
    c.bench_function("parse_487", |b| {
        b.iter(|| Message::parse(black_box(R487)).unwrap().status())
    });
    let local = Local::new(
        "127.0.0.1:5060".parse().unwrap(),
        None,
        "127.0.0.1",
        "flashcall",
    );
    let dialog = Dialog {
        local: &local,
        to: "+447700900123",
        trunk_host: "127.0.0.1:5070",
        caller: "+447700900000",
        caller_id: CallerId::From,
        tag: b"6aa8fbbe0000000000000001t",
        call_id: b"9f8e7d6c5b4a39281716151413121110",
    };
    let sdp = render::sdp_offer("127.0.0.1:40000".parse().unwrap(), 1);
    let mut out = Vec::new();
    c.bench_function("render_invite", |b| {
        b.iter(|| {
            render::invite(
                &mut out,
                black_box(&dialog),
                b"z9hG4bK6aa8fbbe0000000000000001i",
                1,
                None,
                &sdp,
            )
        })
    });
    // A whole flash call through the pure core, callee replies included.
    c.bench_function("core_call_invite_180_cancel_487", |b| {
        let mut ep = endpoint();
        let t0 = Instant::now();
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            let now = t0 + Duration::from_micros(n);
            ep.start_call(
                now,
                CallRequest {
                    trunk: "127.0.0.1:5070".parse().unwrap(),
                    trunk_host: "127.0.0.1:5070".into(),
                    to: "+447700900123".into(),
                    caller: "+447700900000".into(),
                    caller_id: CallerId::From,
                    ring: Duration::ZERO,
                    ring_timeout: Duration::from_secs(15),
                    credentials: None,
                    tag: n,
                },
            );
            let invite = ep.poll_transmit().unwrap();
            let inv = Message::parse(&invite.payload).unwrap();
            let r180 = render::response(&inv, 180, "Ringing", "callee", &[]);
            ep.handle_input(now, invite.dest, &r180);
            let cancel = ep.poll_transmit().unwrap();
            let can = Message::parse(&cancel.payload).unwrap();
            let ok = render::response(&can, 200, "OK", "callee", &[]);
            ep.handle_input(now, invite.dest, &ok);
            let r487 = render::response(&inv, 487, "Request Terminated", "callee", &[]);
            ep.handle_input(now, invite.dest, &r487);
            while ep.poll_transmit().is_some() {}
            while ep.poll_event().is_some() {}
            // Keep memory flat: let Timer D expire for old calls.
            ep.handle_timeout(now + Duration::from_secs(1));
        })
    });
}

criterion_group! {
    name = sip;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = benches
}
criterion_main!(sip);
