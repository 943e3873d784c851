//! Table-driven parser tests over our own tricky messages in
//! `tests/sip_messages/{valid,invalid}/*.sip`.
//!
//! The files are byte-exact datagrams as a trunk sends them: CRLF line ends
//! (`.gitattributes` keeps git from touching them), bare LF only where a file
//! is about bare LF. They were written for this suite after the cases RFC 4475
//! describes, not copied from it. Every file has exactly one entry below
//! (`every_file_has_an_expectation` checks both directions).
//!
//! Each valid file asserts: start line (method + URI, or status + reason),
//! Call-ID, CSeq number and method, top Via branch, and the body (bytes or
//! length); plus, through `check_valid`, that the body is the slice right
//! after the blank line and matches Content-Length, and that an idle
//! `Endpoint` handles the datagram without creating call state (answering a
//! request with a reply our parser reads back). Each invalid file asserts the
//! exact `ParseError` from both `Message::parse` and `Endpoint::handle_input`.
//!
//! `parser_bugs::*` are valid messages an earlier parser got wrong (quoted
//! `;`/`,` in parameters, a Latin-1 reason phrase, long zero padding); they
//! stay as regression tests.

mod common;

use common::{content_length, feed_idle_endpoint, load, messages_dir, offset_in, sip_files};
use flashcall::sip::message::{param, unfold, Message, Name, ParseError, StartLine};

#[derive(Clone, Copy)]
enum Start {
    Req(&'static str, &'static str),
    Resp(u16, &'static [u8]),
}

#[derive(Clone, Copy)]
enum Body {
    Empty,
    Exact(&'static [u8]),
}

struct Expect {
    start: Start,
    call_id: &'static str,
    cseq: (u32, &'static str),
    branch: Option<&'static str>,
    body: Body,
}

/// The SDP most trunk files carry (CRLF lines).
const SDP: &[u8] = b"v=0\r\n\
o=trunk 81921 81921 IN IP4 203.0.113.20\r\n\
s=-\r\n\
c=IN IP4 203.0.113.21\r\n\
t=0 0\r\n\
m=audio 31544 RTP/AVP 8 101\r\n\
a=rtpmap:8 PCMA/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\n\
a=sendrecv\r\n";

/// The same kind of SDP with bare LF line ends.
const LF_SDP: &[u8] = b"v=0\n\
o=gw 1 1 IN IP4 203.0.113.21\n\
s=-\n\
c=IN IP4 203.0.113.21\n\
t=0 0\n\
m=audio 40000 RTP/AVP 0\n\
a=rtpmap:0 PCMU/8000\n";

fn check_valid<'a>(file: &str, bytes: &'a [u8], e: &Expect) -> Message<'a> {
    let m = Message::parse(bytes).unwrap_or_else(|err| panic!("{file}: refused with {err:?}"));
    match (e.start, m.start) {
        (
            Start::Req(method, uri),
            StartLine::Request {
                method: gm,
                uri: gu,
            },
        ) => {
            assert_eq!(gm, method, "{file}: method");
            assert_eq!(gu, uri, "{file}: Request-URI");
            assert_eq!(m.status(), None, "{file}: status() of a request");
        }
        (
            Start::Resp(code, reason),
            StartLine::Response {
                code: gc,
                reason: gr,
            },
        ) => {
            assert_eq!(gc, code, "{file}: status code");
            assert_eq!(gr, reason, "{file}: reason phrase");
            assert_eq!(m.status(), Some(code), "{file}: status()");
        }
        (_, got) => panic!("{file}: wrong kind of start line: {got:?}"),
    }
    assert_eq!(m.call_id, e.call_id, "{file}: Call-ID");
    assert_eq!((m.cseq.number, m.cseq.method), e.cseq, "{file}: CSeq");
    assert_eq!(m.top_via_branch, e.branch, "{file}: top Via branch");
    match e.body {
        Body::Empty => assert!(m.body.is_empty(), "{file}: body should be empty"),
        Body::Exact(b) => assert_eq!(m.body, b, "{file}: body"),
    }
    // The body starts right after the blank line and matches Content-Length.
    let at = offset_in(bytes, m.body);
    assert!(
        bytes[..at].ends_with(b"\n\n") || bytes[..at].ends_with(b"\n\r\n"),
        "{file}: body does not start after the blank line"
    );
    if let Some(n) = content_length(&m) {
        assert_eq!(m.body.len(), n, "{file}: body length vs Content-Length");
    } else {
        assert_eq!(at + m.body.len(), bytes.len(), "{file}: no Content-Length");
    }
    feed_idle_endpoint(bytes);
    m
}

fn check_invalid(file: &str, want: ParseError) {
    let bytes = load("invalid", file);
    match Message::parse(&bytes) {
        Ok(m) => panic!("{file}: accepted, expected {want:?}: {m:?}"),
        Err(got) => assert_eq!(got, want, "{file}: error variant"),
    }
    assert!(feed_idle_endpoint(&bytes).is_none());
}

/// The `branch` of each Via value, in order.
fn via_branches<'a>(m: &Message<'a>) -> Vec<Option<&'a str>> {
    m.values(Name::Via).map(|v| param(v, "branch")).collect()
}

fn strs<'a>(it: impl Iterator<Item = &'a [u8]>) -> Vec<&'a str> {
    it.map(|v| std::str::from_utf8(v).expect("utf-8 value"))
        .collect()
}

fn unfolded(v: &[u8]) -> String {
    let mut out = Vec::new();
    unfold(v, &mut out);
    String::from_utf8(out).expect("utf-8 value")
}

/// One `#[test]` per valid file: `name: "file" => Expect, |m| { extra }`.
macro_rules! valid_files {
    ($($test:ident: $file:literal => $expect:expr $(, |$m:ident| $extra:block)?;)*) => {
        pub const FILES: &[&str] = &[$($file),*];
        $(
            #[test]
            fn $test() {
                let bytes = load("valid", $file);
                let _msg = check_valid($file, &bytes, &$expect);
                $( let $m = _msg; $extra )?
            }
        )*
    };
}

mod valid {
    use super::*;
    use Body::*;
    use Start::*;

    valid_files! {
        trunk_100_trying: "trunk_100_trying.sip" => Expect {
            start: Resp(100, b"Trying"),
            call_id: "6c1e9b0a55d24f3e8e2b7d40a1f0c9aa@flash.example.org",
            cseq: (1, "INVITE"),
            branch: Some("z9hG4bK3a9f00010000000000000001i"),
            body: Empty,
        }, |m| {
            assert_eq!(m.from_tag, Some("3a9f00010000000000000001t"));
            assert_eq!(m.to_tag, None);
            assert_eq!(m.contact_uri, None);
        };

        trunk_180_contact_record_route: "trunk_180_contact_record_route.sip" => Expect {
            start: Resp(180, b"Ringing"),
            call_id: "0d9b7c1e2f3a4b5c6d7e8f9012345678@flash.example.org",
            cseq: (1, "INVITE"),
            branch: Some("z9hG4bK3a9f00010000000200000007i"),
            body: Empty,
        }, |m| {
            assert_eq!(m.to_tag, Some("as5c3e1f0b"));
            assert_eq!(m.contact_uri, Some("sip:+447700900456@203.0.113.20:5060;transport=udp"));
            assert_eq!(
                strs(m.values(Name::RecordRoute)),
                [
                    "<sip:203.0.113.20;lr;ftag=3a9f00010000000200000007t>",
                    "<sip:10.20.0.4;lr>",
                    "<sip:core-2.trunk.example.net;transport=udp;lr>",
                ]
            );
        };

        trunk_183_sdp: "trunk_183_sdp.sip" => Expect {
            start: Resp(183, b"Session Progress"),
            call_id: "early-media-183@flash.example.org",
            cseq: (1, "INVITE"),
            branch: Some("z9hG4bKearly183a"),
            body: Exact(SDP),
        }, |m| {
            assert_eq!(m.to_tag, Some("SDJ8sdf7"));
            assert_eq!(strs(m.values(Name::ContentType)), ["application/sdp"]);
        };

        trunk_200_ok_sdp: "trunk_200_ok_sdp.sip" => Expect {
            start: Resp(200, b"OK"),
            call_id: "answered-200@flash.example.org",
            cseq: (1, "INVITE"),
            branch: Some("z9hG4bKanswered200"),
            body: Exact(SDP),
        }, |m| {
            assert_eq!(m.to_tag, Some("ans-t"));
            assert_eq!(m.contact_uri, Some("sip:+15550199@203.0.113.20:5062"));
            assert_eq!(
                strs(m.values(Name::RecordRoute)),
                ["<sip:203.0.113.20;lr>", "<sip:10.20.0.4;lr>", "<sip:10.20.0.5;lr;transport=tcp>"]
            );
        };

        trunk_487_terminated: "trunk_487_terminated.sip" => Expect {
            start: Resp(487, b"Request Terminated"),
            call_id: "cancelled-487@flash.example.org",
            cseq: (1, "INVITE"),
            branch: Some("z9hG4bKcancelled487"),
            body: Empty,
        }, |m| {
            assert_eq!(m.to_tag, Some("c487t"));
            assert_eq!(m.retry_after, None);
        };

        trunk_503_retry_after: "trunk_503_retry_after.sip" => Expect {
            start: Resp(503, b"Service Unavailable"),
            call_id: "overload-503@flash.example.org",
            cseq: (1, "INVITE"),
            branch: Some("z9hG4bKoverload503"),
            body: Empty,
        }, |m| {
            assert_eq!(m.retry_after, Some(300));
        };

        trunk_401_www_authenticate: "trunk_401_www_authenticate.sip" => Expect {
            start: Resp(401, b"Unauthorized"),
            call_id: "challenge-401@flash.example.org",
            cseq: (1, "INVITE"),
            branch: Some("z9hG4bKchallenge401"),
            body: Empty,
        }, |m| {
            // Challenges are not split at their parameter commas.
            assert_eq!(
                strs(m.values(Name::WwwAuthenticate)),
                [r#"Digest realm="trunk.example.net", nonce="5f1b3c7a9e2d4f60", opaque="", algorithm=MD5, qop="auth,auth-int""#]
            );
            assert_eq!(m.values(Name::ProxyAuthenticate).count(), 0);
        };

        trunk_407_two_proxy_authenticate: "trunk_407_two_proxy_authenticate.sip" => Expect {
            start: Resp(407, b"Proxy Authentication Required"),
            call_id: "challenge-407@flash.example.org",
            cseq: (2, "INVITE"),
            branch: Some("z9hG4bKchallenge407"),
            body: Empty,
        }, |m| {
            let challenges = strs(m.values(Name::ProxyAuthenticate));
            assert_eq!(challenges.len(), 2, "{challenges:?}");
            assert!(challenges[0].contains("algorithm=SHA-256") && challenges[0].contains("a1b2c3d4e5f6"));
            assert!(challenges[1].contains("algorithm=MD5") && challenges[1].ends_with("stale=FALSE"));
            assert_eq!(m.values(Name::WwwAuthenticate).count(), 0);
        };

        trunk_200_cancel_trailing_bytes: "trunk_200_cancel_trailing_bytes.sip" => Expect {
            start: Resp(200, b"OK"),
            call_id: "cancel-ok@flash.example.org",
            cseq: (1, "CANCEL"),
            branch: Some("z9hG4bKcancel200"),
            body: Empty,
        }, |m| {
            // The second message glued on after Content-Length is not seen.
            assert_eq!(m.headers().count(), 6);
            assert_eq!(m.values(Name::Via).count(), 1);
            assert_eq!(m.to_tag, None);
        };

        body_then_garbage: "body_then_garbage.sip" => Expect {
            start: Req("MESSAGE", "sip:flash@198.51.100.7:5060"),
            call_id: "body-then-garbage@trunk.example.net",
            cseq: (31, "MESSAGE"),
            branch: Some("z9hG4bKmsgbody1"),
            body: Exact(b"hello trunk"),
        };

        line_folding: "line_folding.sip" => Expect {
            start: Resp(180, b"Ringing"),
            call_id: "folded.7a8b9c@flash.example.org",
            cseq: (4711, "INVITE"),
            branch: Some("z9hG4bKfolded180"),
            body: Empty,
        }, |m| {
            assert_eq!(m.from_tag, Some("fold-from-1"));
            assert_eq!(m.to_tag, Some("fold-to-9"));
            assert_eq!(m.contact_uri, Some("sip:+15550199@203.0.113.20:5060"));
            assert_eq!(via_branches(&m), [Some("z9hG4bKfolded180"), Some("z9hG4bKsecondvia")]);
            let long = m.headers().find(|(_, raw, _)| *raw == b"X-Long-Header").expect("X-Long-Header");
            assert_eq!(unfolded(long.2), "first part, second part, third part");
            assert_eq!(unfolded(m.to), r#""Folded Display Name" <sip:+15550199@trunk.example.net>;tag= fold-to-9"#);
        };

        odd_whitespace: "odd_whitespace.sip" => Expect {
            start: Resp(180, b"Ringing"),
            call_id: "spaces.0001@flash.example.org",
            cseq: (12, "INVITE"),
            branch: Some("z9hG4bKspaces180"),
            body: Empty,
        }, |m| {
            assert_eq!(m.from_tag, Some("ws-from"));
            assert_eq!(m.to_tag, Some("ws-to"));
            assert_eq!(m.contact_uri, Some("sip:gw@203.0.113.20"));
        };

        mixed_case_names: "mixed_case_names.sip" => Expect {
            start: Resp(180, b"Ringing"),
            call_id: "MixedCase.Value@Flash.Example.Org",
            cseq: (3, "INVITE"),
            branch: Some("z9hG4bKMiXeDcAsE"),
            body: Empty,
        }, |m| {
            assert_eq!(m.from_tag, Some("MixedFrom"));
            assert_eq!(m.to_tag, Some("MixedTo"));
            assert_eq!(m.contact_uri, Some("sip:+15550199@203.0.113.20"));
            assert_eq!(m.retry_after, Some(7));
        };

        compact_names: "compact_names.sip" => Expect {
            start: Resp(183, b"Session Progress"),
            call_id: "compact-183@flash.example.org",
            cseq: (1, "INVITE"),
            branch: Some("z9hG4bKcompact183"),
            body: Exact(SDP),
        }, |m| {
            let names: Vec<Name> = m.headers().map(|(n, _, _)| n).collect();
            assert_eq!(names, [
                Name::Via, Name::Via, Name::From, Name::To, Name::CallId, Name::CSeq,
                Name::Contact, Name::ContentType, Name::ContentLength,
            ]);
            assert_eq!(m.from_tag, Some("cf1"));
            assert_eq!(m.to_tag, Some("ct9"));
            assert_eq!(m.contact_uri, Some("sip:+15550199@203.0.113.20:5060"));
            assert_eq!(strs(m.values(Name::ContentType)), ["application/sdp"]);
        };

        via_lists: "via_lists.sip" => Expect {
            start: Req("OPTIONS", "sip:198.51.100.7:5060"),
            call_id: "via-lists@trunk.example.net",
            cseq: (9001, "OPTIONS"),
            branch: Some("z9hG4bKvia1st"),
            body: Empty,
        }, |m| {
            assert_eq!(via_branches(&m), [
                Some("z9hG4bKvia1st"), Some("z9hG4bKvia2nd"), Some("z9hG4bKvia3rd"),
                Some("z9hG4bKvia4th"), Some("z9hG4bKvia5th"), Some("z9hG4bKvia6th"),
            ]);
        };

        escapes_and_quotes: "escapes_and_quotes.sip" => Expect {
            start: Req("INVITE", "sip:%2B15550100@flash.example.org;user=phone"),
            call_id: "esc-%25-call@trunk.example.net",
            cseq: (77, "INVITE"),
            branch: Some("z9hG4bKesc%41pe1"),
            body: Empty,
        }, |m| {
            // `;tag=` inside a quoted display name or inside <> is no tag.
            assert_eq!(m.from_tag, Some("real-from"));
            assert_eq!(m.to_tag, None);
            assert_eq!(m.contact_uri, Some("sip:b%6Fb@203.0.113.20:5060;transport=udp"));
            // A comma inside a quoted display name does not split Contact.
            assert_eq!(m.values(Name::Contact).count(), 1);
        };

        utf8_reason_phrase: "utf8_reason_phrase.sip" => Expect {
            start: Resp(480, "Абонент временно недоступен ☎".as_bytes()),
            call_id: "utf8-reason-480@flash.example.org",
            cseq: (1, "INVITE"),
            branch: Some("z9hG4bKutf8reason"),
            body: Empty,
        };

        empty_reason_phrase: "empty_reason_phrase.sip" => Expect {
            start: Resp(180, b""),
            call_id: "empty-reason-180@flash.example.org",
            cseq: (1, "INVITE"),
            branch: Some("z9hG4bKnoreason180"),
            body: Empty,
        }, |m| {
            assert_eq!(m.to_tag, Some("nr-t"));
        };

        bare_lf_body: "bare_lf_body.sip" => Expect {
            start: Resp(183, b"Session Progress"),
            call_id: "bare-lf-body@flash.example.org",
            cseq: (1, "INVITE"),
            branch: Some("z9hG4bKbarelfbody"),
            body: Exact(LF_SDP),
        };

        bare_lf_everywhere: "bare_lf_everywhere.sip" => Expect {
            start: Resp(183, b"Session Progress"),
            call_id: "bare-lf-all@flash.example.org",
            cseq: (1, "INVITE"),
            branch: Some("z9hG4bKbarelfall"),
            body: Exact(LF_SDP),
        }, |m| {
            assert_eq!(m.to_tag, Some("lfa-t"));
            assert_eq!(m.headers().count(), 7);
        };

        leading_crlf_keepalive: "leading_crlf_keepalive.sip" => Expect {
            start: Resp(100, b"Trying"),
            call_id: "leading-crlf@flash.example.org",
            cseq: (1, "INVITE"),
            branch: Some("z9hG4bKleadingcrlf"),
            body: Empty,
        };

        no_content_length: "no_content_length.sip" => Expect {
            start: Resp(183, b"Session Progress"),
            call_id: "no-content-length@flash.example.org",
            cseq: (1, "INVITE"),
            branch: Some("z9hG4bKnoclen"),
            // Over UDP the body is the rest of the datagram (RFC 3261 §18.3).
            body: Exact(SDP),
        }, |m| {
            assert_eq!(m.values(Name::ContentLength).count(), 0);
        };

        zero_padded_numbers: "zero_padded_numbers.sip" => Expect {
            start: Resp(180, b"Ringing"),
            call_id: "padded@flash.example.org",
            cseq: (42, "INVITE"),
            branch: Some("z9hG4bKpadded"),
            body: Empty,
        }, |m| {
            assert_eq!(m.retry_after, Some(30));
        };

        cseq_max: "cseq_max.sip" => Expect {
            start: Resp(486, b"Busy Here"),
            call_id: "cseq-max@flash.example.org",
            cseq: (2_147_483_647, "INVITE"),
            branch: Some("z9hG4bKcseqmax"),
            body: Empty,
        };

        options_keepalive: "options_keepalive.sip" => Expect {
            start: Req("OPTIONS", "sip:198.51.100.7:5060"),
            call_id: "keepalive-0001@203.0.113.20",
            cseq: (101, "OPTIONS"),
            branch: Some("z9hG4bKka0001"),
            body: Empty,
        }, |m| {
            assert_eq!(m.to_tag, None);
            let reply = feed_idle_endpoint(&load("valid", "options_keepalive.sip")).expect("reply");
            let r = Message::parse(&reply).expect("reply parses");
            assert_eq!(r.status(), Some(200));
            assert!(r.to_tag.is_some(), "a 200 must add a To tag");
        };

        bye_with_route: "bye_with_route.sip" => Expect {
            start: Req("BYE", "sip:+15550100@198.51.100.7:5060"),
            call_id: "answered-200@flash.example.org",
            cseq: (8801, "BYE"),
            branch: Some("z9hG4bKbye0001"),
            body: Empty,
        }, |m| {
            assert_eq!(m.from_tag, Some("ans-t"));
            assert_eq!(m.to_tag, Some("ans-f"));
            assert_eq!(strs(m.values(Name::Route)), ["<sip:198.51.100.7:5060;lr>"]);
            // No such dialog in an idle endpoint.
            let reply = feed_idle_endpoint(&load("valid", "bye_with_route.sip")).expect("reply");
            assert_eq!(Message::parse(&reply).expect("reply parses").status(), Some(481));
        };

        identical_duplicates: "identical_duplicates.sip" => Expect {
            start: Resp(180, b"Ringing"),
            call_id: "dup-same@flash.example.org",
            cseq: (1, "INVITE"),
            branch: Some("z9hG4bKdupsame"),
            body: Empty,
        }, |m| {
            assert_eq!(m.values(Name::CallId).count(), 2);
            assert_eq!(m.values(Name::CSeq).count(), 2);
            assert_eq!(m.values(Name::ContentLength).count(), 2);
        };

        via_without_branch: "via_without_branch.sip" => Expect {
            start: Req("OPTIONS", "sip:198.51.100.7"),
            call_id: "rfc2543-style@old-gw.trunk.example.net",
            cseq: (1, "OPTIONS"),
            branch: None,
            body: Empty,
        };

        unknown_headers: "unknown_headers.sip" => Expect {
            start: Resp(180, b"Ringing"),
            call_id: "unknown-headers@flash.example.org",
            cseq: (1, "INVITE"),
            branch: Some("z9hG4bKunknownhdrs"),
            body: Empty,
        }, |m| {
            let other: Vec<(&[u8], &[u8])> = m
                .headers()
                .filter(|(n, _, _)| *n == Name::Other)
                .map(|(_, raw, v)| (raw, v))
                .collect();
            assert_eq!(other, [
                (&b"X-Empty"[..], &b""[..]),
                (b"X-Punctuation", b";;,,;;,;"),
                (b"P-Charging-Vector", b"icid-value=AyretyU0dm+6O2IrT5tAFrbHLso=;orig-ioi=trunk.example.net"),
                (b"Odd-Token-!.%*_+`'~", b"still a header"),
                (b"s", b"subject in compact form"),
            ]);
        };
    }
}

/// Valid messages an earlier parser refused or misread: regression tests,
/// with expectations taken from the RFC 3261 grammar.
mod parser_bugs {
    use super::*;
    use Body::*;
    use Start::*;

    valid_files! {
        // `param()` splits at every `,` and `;`, even inside a quoted
        // gen-value, so the branch after `x-route="edge-1,edge-2"` is lost
        // (today: None) and the response would be dropped as stray.
        via_quoted_param_with_comma: "via_quoted_param_with_comma.sip" => Expect {
            start: Resp(180, b"Ringing"),
            call_id: "quoted-comma@flash.example.org",
            cseq: (1, "INVITE"),
            branch: Some("z9hG4bKquotedcomma"),
            body: Empty,
        };

        // Same root cause: a `;` inside a quoted header parameter starts a
        // new parameter, so the To tag reads as `bogus"` (today) instead of
        // `real-to-tag`, and the ACK for this 486 would carry a wrong tag.
        to_quoted_param_with_semicolon: "to_quoted_param_with_semicolon.sip" => Expect {
            start: Resp(486, b"Busy Here"),
            call_id: "quoted-semicolon@flash.example.org",
            cseq: (1, "INVITE"),
            branch: Some("z9hG4bKquotedsemi"),
            body: Empty,
        }, |m| {
            assert_eq!(m.to_tag, Some("real-to-tag"));
        };

        // Reason-Phrase allows a lone UTF8-CONT octet (%x80-BF, RFC 3261
        // §25.1); 0xA3 is also Latin-1 `£`. `parse_start_line` converts the
        // whole line with `str::from_utf8` before it looks for `SIP/2.0`, so
        // the response is refused with `StartLine` (today) and the 402 final
        // is never ACKed.
        reason_latin1_octet: "reason_latin1_octet.sip" => Expect {
            start: Resp(402, b"Credit below \xa31"),
            call_id: "latin1-reason@flash.example.org",
            cseq: (1, "INVITE"),
            branch: Some("z9hG4bKlatin1reason"),
            body: Empty,
        };

        // `1*DIGIT` has no length limit and `parse_uint` promises that
        // leading zeros are fine, but it refuses more than 20 characters:
        // a 25-character zero-padded CSeq is refused as `BadHeader("CSeq")`
        // (today), and so would such a Content-Length.
        numbers_long_zero_padding: "numbers_long_zero_padding.sip" => Expect {
            start: Resp(180, b"Ringing"),
            call_id: "long-padding@flash.example.org",
            cseq: (7, "INVITE"),
            branch: Some("z9hG4bKlongpadding"),
            body: Empty,
        };
    }
}

/// One `#[test]` per invalid file: `name: "file" => ParseError`.
macro_rules! invalid_files {
    ($($test:ident: $file:literal => $err:expr;)*) => {
        pub const FILES: &[&str] = &[$($file),*];
        $(
            #[test]
            fn $test() {
                check_invalid($file, $err);
            }
        )*
    };
}

mod invalid {
    use super::*;
    use ParseError::*;

    invalid_files! {
        content_length_non_numeric: "content_length_non_numeric.sip" => BadHeader("Content-Length");
        content_length_trailing_junk: "content_length_trailing_junk.sip" => BadHeader("Content-Length");
        content_length_negative: "content_length_negative.sip" => BadHeader("Content-Length");
        content_length_larger_than_body: "content_length_larger_than_body.sip" => Truncated;
        content_length_overflow: "content_length_overflow.sip" => BadHeader("Content-Length");
        content_length_u64_max: "content_length_u64_max.sip" => Truncated;
        content_length_conflicting: "content_length_conflicting.sip" => Duplicate("Content-Length");
        missing_via: "missing_via.sip" => Missing("Via");
        missing_from: "missing_from.sip" => Missing("From");
        missing_to: "missing_to.sip" => Missing("To");
        missing_call_id: "missing_call_id.sip" => Missing("Call-ID");
        missing_cseq: "missing_cseq.sip" => Missing("CSeq");
        cseq_2_pow_32: "cseq_2_pow_32.sip" => BadHeader("CSeq");
        cseq_2_pow_31: "cseq_2_pow_31.sip" => BadHeader("CSeq");
        cseq_20_nines: "cseq_20_nines.sip" => BadHeader("CSeq");
        cseq_negative: "cseq_negative.sip" => BadHeader("CSeq");
        cseq_no_method: "cseq_no_method.sip" => BadHeader("CSeq");
        cseq_no_space: "cseq_no_space.sip" => BadHeader("CSeq");
        cseq_method_mismatch: "cseq_method_mismatch.sip" => CSeqMismatch;
        status_99: "status_99.sip" => StatusCode;
        status_700: "status_700.sip" => StatusCode;
        status_2000: "status_2000.sip" => StatusCode;
        status_20x: "status_20x.sip" => StatusCode;
        bad_sip_version: "bad_sip_version.sip" => Version;
        call_id_conflicting: "call_id_conflicting.sip" => Duplicate("Call-ID");
        call_id_empty: "call_id_empty.sip" => BadHeader("Call-ID");
        to_conflicting: "to_conflicting.sip" => Duplicate("To");
        via_bad_protocol: "via_bad_protocol.sip" => BadHeader("Via");
        garbage_start_line: "garbage_start_line.sip" => StartLine;
        http_probe: "http_probe.sip" => StartLine;
        request_line_without_version: "request_line_without_version.sip" => StartLine;
        header_without_colon: "header_without_colon.sip" => HeaderLine;
        no_blank_line: "no_blank_line.sip" => Unterminated;
        headers_cut_mid_line: "headers_cut_mid_line.sip" => Unterminated;
        keepalive_only: "keepalive_only.sip" => Empty;
    }
}

#[test]
fn every_file_has_an_expectation() {
    let mut listed: Vec<String> = valid::FILES
        .iter()
        .chain(parser_bugs::FILES)
        .map(|s| s.to_string())
        .collect();
    listed.sort();
    assert_eq!(sip_files(&messages_dir("valid")), listed, "valid/ vs table");
    let mut listed: Vec<String> = invalid::FILES.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(
        sip_files(&messages_dir("invalid")),
        listed,
        "invalid/ vs table"
    );
}

/// Guards against an editor or git turning the datagrams into LF text: the
/// header section of every file uses CRLF unless the file is about bare LF.
#[test]
fn files_are_crlf_datagrams() {
    for kind in ["valid", "invalid"] {
        for file in sip_files(&messages_dir(kind)) {
            if file.starts_with("bare_lf_everywhere") {
                continue;
            }
            let bytes = load(kind, &file);
            let head_end = bytes
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .unwrap_or(bytes.len());
            for (i, _) in bytes[..head_end]
                .iter()
                .enumerate()
                .filter(|(_, &b)| b == b'\n')
            {
                assert!(
                    i > 0 && bytes[i - 1] == b'\r',
                    "{kind}/{file}: bare LF at byte {i} in the header section"
                );
            }
        }
    }
}
