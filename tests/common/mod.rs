//! Helpers shared by the parser integration tests (`mod common;` in each).
#![allow(dead_code)] // each test crate uses a different subset

use flashcall::sip::message::{unfold, Message, Name, StartLine};
use flashcall::sip::{Endpoint, EndpointConfig, Input, TimerConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

/// Every header name the parser distinguishes.
pub const ALL_NAMES: [Name; 15] = [
    Name::Via,
    Name::From,
    Name::To,
    Name::CallId,
    Name::CSeq,
    Name::Contact,
    Name::ContentLength,
    Name::ContentType,
    Name::MaxForwards,
    Name::RecordRoute,
    Name::Route,
    Name::RetryAfter,
    Name::WwwAuthenticate,
    Name::ProxyAuthenticate,
    Name::Other,
];

/// Where the trunk's datagrams come from in these tests.
pub fn peer() -> SocketAddr {
    "127.0.0.1:5070".parse().unwrap()
}

/// A fresh endpoint on 127.0.0.1 with default RFC 3261 timers.
pub fn endpoint(seed: u64) -> Endpoint<StdRng> {
    Endpoint::new(
        EndpointConfig {
            timers: TimerConfig::default(),
            local: "127.0.0.1:5060".parse().unwrap(),
            sent_by: None,
            public_host: "flash.example.org".to_owned(),
            user_agent: "flashcall-tests".to_owned(),
            media: "127.0.0.1:40000".parse().unwrap(),
        },
        StdRng::seed_from_u64(seed),
    )
}

/// `tests/sip_messages/<kind>`.
pub fn messages_dir(kind: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sip_messages")
        .join(kind)
}

/// Sorted `*.sip` file names of a directory.
pub fn sip_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".sip"))
        .collect();
    names.sort();
    names
}

/// The bytes of `tests/sip_messages/<kind>/<file>`.
pub fn load(kind: &str, file: &str) -> Vec<u8> {
    let path = messages_dir(kind).join(file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Offset of `part` inside `whole`; panics when `part` does not borrow from it.
pub fn offset_in(whole: &[u8], part: &[u8]) -> usize {
    let start = whole.as_ptr() as usize;
    let p = part.as_ptr() as usize;
    assert!(
        p >= start && p + part.len() <= start + whole.len(),
        "slice does not point into the datagram"
    );
    p - start
}

/// The Content-Length header's value, when there is one.
pub fn content_length(m: &Message<'_>) -> Option<usize> {
    let v = m.values(Name::ContentLength).next()?;
    let s = std::str::from_utf8(v).ok()?;
    s.trim().parse().ok()
}

/// Feeds one datagram to a fresh endpoint that has no call; see
/// [`check_idle`]. Returns the reply, if any.
pub fn feed_idle_endpoint(datagram: &[u8]) -> Option<Vec<u8>> {
    let mut ep = endpoint(0x5eed);
    check_idle(&mut ep, Instant::now(), datagram)
}

/// Feeds one datagram to an endpoint that has no call and checks what a UAC
/// must do with it: a response is stray, a request other than ACK is
/// answered with one reply our own parser reads back (same Call-ID, CSeq and
/// top Via branch), anything unparsable is counted as malformed, and no call
/// state, event or timer is ever created. Returns the reply, if any.
pub fn check_idle(ep: &mut Endpoint<StdRng>, now: Instant, datagram: &[u8]) -> Option<Vec<u8>> {
    assert_eq!(ep.calls_in_memory(), 0, "precondition: an idle endpoint");
    let before = ep.stats();
    let from = peer();
    let input = ep.handle_input(now, from, datagram);
    let parsed = Message::parse(datagram);
    let after = ep.stats();
    let mut reply = None;
    match (&parsed, input) {
        (Err(e), Input::Malformed(got)) => {
            assert_eq!(*e, got, "endpoint and parser disagree on the error");
            assert_eq!(after.parse_errors, before.parse_errors + 1);
        }
        (Ok(m), Input::Stray) => {
            assert!(m.status().is_some(), "a request was reported as stray");
            assert_eq!(after.stray_responses, before.stray_responses + 1);
        }
        (Ok(m), Input::Request) => {
            let StartLine::Request { method, .. } = m.start else {
                panic!("a response was reported as a request");
            };
            let out = ep.poll_transmit();
            if method == "ACK" {
                assert!(out.is_none(), "an ACK must never be answered");
            } else {
                let t = out.expect("a request must be answered");
                assert_eq!(t.dest, from, "reply must go back to the sender");
                let r = Message::parse(&t.payload).unwrap_or_else(|e| {
                    panic!(
                        "our reply does not parse ({e:?}):\n{}\nrequest was:\n{}",
                        String::from_utf8_lossy(&t.payload),
                        String::from_utf8_lossy(datagram)
                    )
                });
                let code = r.status().expect("reply must be a response");
                assert!(matches!(code, 200 | 481 | 501), "reply code {code}");
                assert_eq!(r.call_id, m.call_id, "reply Call-ID");
                assert_eq!(r.cseq, m.cseq, "reply CSeq");
                // The reply unfolds what it copies, so a branch that spans
                // a folded line comes back with one SP for the line break.
                let unfolded = m.top_via_branch.map(|b| {
                    let mut v = Vec::new();
                    unfold(b.as_bytes(), &mut v);
                    String::from_utf8(v).expect("unfolded UTF-8 stays UTF-8")
                });
                assert_eq!(
                    r.top_via_branch.map(str::to_owned),
                    unfolded,
                    "reply top Via branch"
                );
                reply = Some(t.payload.to_vec());
            }
        }
        (p, i) => panic!("endpoint returned {i:?} for parse result {p:?}"),
    }
    assert!(
        ep.poll_transmit().is_none(),
        "at most one reply per datagram"
    );
    assert!(ep.poll_event().is_none(), "no call, so no event");
    assert_eq!(ep.calls_in_memory(), 0, "a datagram created call state");
    assert_eq!(ep.active_calls(), 0);
    assert_eq!(ep.poll_timeout(), None, "a datagram armed a timer");
    reply
}
