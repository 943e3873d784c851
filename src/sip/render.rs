//! Rendering of the requests a flash call sends, straight into bytes.
//!
//! Why not a generic message builder: a flash call sends the same five shapes
//! thousands of times a second (INVITE, CANCEL, ACK, BYE, and replies to the
//! trunk's requests). Each shape is a fixed sequence of byte appends into one
//! buffer sized to fit: one allocation per datagram, no intermediate tree and
//! no `format!`. A call keeps no pre-formatted header strings either: the
//! [`Dialog`] is a view of its parts (the two numbers, the trunk host, the
//! tag and Call-ID digits), and the URIs are written from them each time,
//! which costs less than keeping them for the 32 s of Timer D.

use bytes::{BufMut, Bytes, BytesMut};
use std::fmt::Write as _;
use std::net::SocketAddr;

use super::endpoint::CallerId;
use super::message::{unfold, Message, Name};

/// What every request of an endpoint repeats, fixed when it starts.
#[derive(Debug, Clone)]
pub struct Local {
    /// `SIP/2.0/UDP host:port;rport` — `;branch=` and the branch follow.
    pub via_prefix: String,
    /// `host:port` of our socket, for the Contact.
    pub addr: String,
    /// Host in From / P-Asserted-Identity URIs and after a Call-ID's `@`.
    pub public_host: String,
    pub user_agent: String,
}

impl Local {
    /// `sent_by`: the `host:port` for Via and Contact when it is not the
    /// socket's own address (a hostname, or a public address in front of
    /// the bound one); `None` writes `local`.
    pub fn new(
        local: SocketAddr,
        sent_by: Option<&str>,
        public_host: &str,
        user_agent: &str,
    ) -> Local {
        // SocketAddr's Display brackets IPv6 literals, as a SIP URI wants.
        let addr = sent_by.map_or_else(|| local.to_string(), str::to_owned);
        Local {
            via_prefix: format!("SIP/2.0/UDP {addr};rport"),
            addr,
            public_host: public_host.to_owned(),
            user_agent: user_agent.to_owned(),
        }
    }
}

/// One call's identity, as the parts its requests are written from.
#[derive(Debug, Clone, Copy)]
pub struct Dialog<'a> {
    pub local: &'a Local,
    /// Destination number: user part of the Request-URI and of To.
    pub to: &'a str,
    /// `host[:port]` of the trunk, as configured: host of the Request-URI.
    pub trunk_host: &'a str,
    /// Caller number.
    pub caller: &'a str,
    /// Where the caller number goes: From, P-Asserted-Identity or both.
    pub caller_id: CallerId,
    /// Our From tag.
    pub tag: &'a [u8],
    /// The Call-ID up to its `@`; the endpoint's public host follows.
    pub call_id: &'a [u8],
}

/// `sip:<to>@<trunk_host>;user=phone`, the INVITE's Request-URI.
fn request_uri(buf: &mut Vec<u8>, d: &Dialog<'_>) {
    buf.put_slice(b"sip:");
    buf.put_slice(d.to.as_bytes());
    buf.put_u8(b'@');
    buf.put_slice(d.trunk_host.as_bytes());
    buf.put_slice(b";user=phone");
}

/// The Request-URI as a string (the digest response covers it).
pub fn request_uri_string(d: &Dialog<'_>) -> String {
    let mut buf = Vec::with_capacity(64);
    request_uri(&mut buf, d);
    String::from_utf8_lossy(&buf).into_owned()
}

/// `<sip:<caller>@<public_host>;user=phone>`
fn caller_uri(buf: &mut Vec<u8>, d: &Dialog<'_>) {
    buf.put_slice(b"<sip:");
    buf.put_slice(d.caller.as_bytes());
    buf.put_u8(b'@');
    buf.put_slice(d.local.public_host.as_bytes());
    buf.put_slice(b";user=phone>");
}

/// Where a request goes: the dialog's Request-URI, or a Contact's URI.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    RequestUri,
    Uri(&'a str),
}

/// Room for everything but the variable parts, in every shape.
const FIXED: usize = 320;

fn capacity(d: &Dialog<'_>, extra: usize) -> usize {
    let l = d.local;
    FIXED
        + 3 * d.to.len()
        + 2 * d.trunk_host.len()
        + 3 * d.caller.len()
        + 3 * l.public_host.len()
        + l.via_prefix.len()
        + l.addr.len()
        + l.user_agent.len()
        + d.tag.len()
        + d.call_id.len()
        + extra
}

fn head(buf: &mut Vec<u8>, method: &str, target: Target<'_>, d: &Dialog<'_>, branch: &[u8]) {
    buf.put_slice(method.as_bytes());
    buf.put_u8(b' ');
    match target {
        Target::RequestUri => request_uri(buf, d),
        Target::Uri(u) => buf.put_slice(u.as_bytes()),
    }
    buf.put_slice(b" SIP/2.0\r\nVia: ");
    buf.put_slice(d.local.via_prefix.as_bytes());
    buf.put_slice(b";branch=");
    buf.put_slice(branch);
    buf.put_slice(b"\r\nMax-Forwards: 70\r\nFrom: ");
    match d.caller_id {
        CallerId::From | CallerId::Both => caller_uri(buf, d),
        // With the number only in PAI, From names the engine, not a number.
        CallerId::Pai => {
            buf.put_slice(b"<sip:flashcall@");
            buf.put_slice(d.local.public_host.as_bytes());
            buf.put_u8(b'>');
        }
    }
    buf.put_slice(b";tag=");
    buf.put_slice(d.tag);
    buf.put_slice(b"\r\n");
}

/// The To of the INVITE (and of its CANCEL): the Request-URI, no tag.
fn invite_to(buf: &mut Vec<u8>, d: &Dialog<'_>) {
    buf.put_slice(b"To: <");
    request_uri(buf, d);
    buf.put_slice(b">\r\n");
}

fn tail(buf: &mut Vec<u8>, d: &Dialog<'_>, cseq: u32, method: &str) {
    buf.put_slice(b"Call-ID: ");
    buf.put_slice(d.call_id);
    buf.put_u8(b'@');
    buf.put_slice(d.local.public_host.as_bytes());
    buf.put_slice(b"\r\nCSeq: ");
    put_u32(buf, cseq);
    buf.put_u8(b' ');
    buf.put_slice(method.as_bytes());
    buf.put_slice(b"\r\nUser-Agent: ");
    buf.put_slice(d.local.user_agent.as_bytes());
    buf.put_slice(b"\r\n");
}

/// Clears the caller's scratch buffer and makes room. Each request is
/// written there and copied out at its exact size: a `BytesMut` frozen with
/// spare capacity costs a second allocation (bytes' shared header) per
/// datagram, and the scratch never needs to grow after the first calls.
fn start(out: &mut Vec<u8>, cap: usize) -> &mut Vec<u8> {
    out.clear();
    out.reserve(cap);
    out
}

/// Decimal digits without the formatting machinery (CSeq, Content-Length).
fn put_u32(buf: &mut Vec<u8>, n: u32) {
    buf.put_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// The INVITE, with an optional `(header name, value)` credentials line.
pub fn invite(
    out: &mut Vec<u8>,
    d: &Dialog<'_>,
    branch: &[u8],
    cseq: u32,
    auth: Option<(&str, &str)>,
    sdp: &[u8],
) -> Bytes {
    let auth_len = auth.map_or(0, |(n, v)| n.len() + v.len() + 4);
    let buf = start(out, capacity(d, branch.len() + auth_len + sdp.len()));
    head(buf, "INVITE", Target::RequestUri, d, branch);
    invite_to(buf, d);
    tail(buf, d, cseq, "INVITE");
    buf.put_slice(b"Contact: <sip:");
    buf.put_slice(d.caller.as_bytes());
    buf.put_u8(b'@');
    buf.put_slice(d.local.addr.as_bytes());
    buf.put_slice(b">\r\n");
    if matches!(d.caller_id, CallerId::Pai | CallerId::Both) {
        buf.put_slice(b"P-Asserted-Identity: ");
        caller_uri(buf, d);
        buf.put_slice(b"\r\n");
    }
    if let Some((name, value)) = auth {
        buf.put_slice(name.as_bytes());
        buf.put_slice(b": ");
        buf.put_slice(value.as_bytes());
        buf.put_slice(b"\r\n");
    }
    buf.put_slice(b"Allow: INVITE, ACK, CANCEL, BYE, OPTIONS\r\nContent-Type: application/sdp\r\n");
    buf.put_slice(b"Content-Length: ");
    put_u32(buf, sdp.len() as u32);
    buf.put_slice(b"\r\n\r\n");
    buf.put_slice(sdp);
    Bytes::copy_from_slice(buf)
}

/// CANCEL: RFC 3261 §9.1 — same Request-URI, Call-ID, From, To (no tag), CSeq
/// number and top Via (branch included) as the INVITE being cancelled.
pub fn cancel(out: &mut Vec<u8>, d: &Dialog<'_>, branch: &[u8], cseq: u32) -> Bytes {
    let buf = start(out, capacity(d, branch.len()));
    head(buf, "CANCEL", Target::RequestUri, d, branch);
    invite_to(buf, d);
    tail(buf, d, cseq, "CANCEL");
    buf.put_slice(b"Content-Length: 0\r\n\r\n");
    Bytes::copy_from_slice(buf)
}

/// ACK. For a non-2xx final it is part of the INVITE transaction (same URI and
/// branch, To copied from the response, RFC 3261 §17.1.1.3); for a 2xx it is
/// its own transaction to the Contact with a new branch and the route set.
// Each part named, as in `in_dialog` below: a struct would only move the list.
#[allow(clippy::too_many_arguments)]
pub fn ack(
    out: &mut Vec<u8>,
    d: &Dialog<'_>,
    target: Target<'_>,
    branch: &[u8],
    cseq: u32,
    to: &[u8],
    routes: &[String],
    auth: Option<(&str, &str)>,
) -> Bytes {
    in_dialog(out, d, "ACK", target, branch, cseq, to, routes, auth)
}

/// BYE for a call that was answered before the CANCEL won.
// Each part named, as in `in_dialog` below: a struct would only move the list.
#[allow(clippy::too_many_arguments)]
pub fn bye(
    out: &mut Vec<u8>,
    d: &Dialog<'_>,
    target: Target<'_>,
    branch: &[u8],
    cseq: u32,
    to: &[u8],
    routes: &[String],
    auth: Option<(&str, &str)>,
) -> Bytes {
    in_dialog(out, d, "BYE", target, branch, cseq, to, routes, auth)
}

// Private: `ack` and `bye` name each part; a struct would only move the list.
#[allow(clippy::too_many_arguments)]
fn in_dialog(
    out: &mut Vec<u8>,
    d: &Dialog<'_>,
    method: &str,
    target: Target<'_>,
    branch: &[u8],
    cseq: u32,
    to: &[u8],
    routes: &[String],
    auth: Option<(&str, &str)>,
) -> Bytes {
    let target_len = match target {
        Target::RequestUri => 0,
        Target::Uri(u) => u.len(),
    };
    let routes_len: usize = routes.iter().map(|r| r.len() + 9).sum();
    let auth_len = auth.map_or(0, |(n, v)| n.len() + v.len() + 4);
    let buf = start(
        out,
        capacity(
            d,
            branch.len() + target_len + to.len() + routes_len + auth_len,
        ),
    );
    head(buf, method, target, d, branch);
    buf.put_slice(b"To: ");
    buf.put_slice(to);
    buf.put_slice(b"\r\n");
    for r in routes {
        buf.put_slice(b"Route: ");
        buf.put_slice(r.as_bytes());
        buf.put_slice(b"\r\n");
    }
    tail(buf, d, cseq, method);
    if let Some((name, value)) = auth {
        buf.put_slice(name.as_bytes());
        buf.put_slice(b": ");
        buf.put_slice(value.as_bytes());
        buf.put_slice(b"\r\n");
    }
    buf.put_slice(b"Content-Length: 0\r\n\r\n");
    Bytes::copy_from_slice(buf)
}

/// A response to a request from the trunk (RFC 3261 §8.2.6): Via lines, From,
/// Call-ID and CSeq copied; To copied with a tag added when it had none.
pub fn response(
    req: &Message<'_>,
    code: u16,
    reason: &str,
    to_tag: &str,
    extra: &[(&str, &str)],
) -> Bytes {
    let mut buf = BytesMut::with_capacity(512);
    let _ = write!(buf, "SIP/2.0 {code} {reason}\r\n");
    let mut scratch = Vec::with_capacity(128);
    for (name, _, value) in req.headers() {
        let label: &[u8] = match name {
            Name::Via => b"Via",
            Name::From => b"From",
            Name::CallId => b"Call-ID",
            Name::CSeq => b"CSeq",
            Name::To => b"To",
            _ => continue,
        };
        scratch.clear();
        unfold(value, &mut scratch);
        buf.put_slice(label);
        buf.put_slice(b": ");
        buf.put_slice(&scratch);
        if name == Name::To && req.to_tag.is_none() && code > 100 {
            buf.put_slice(b";tag=");
            buf.put_slice(to_tag.as_bytes());
        }
        buf.put_slice(b"\r\n");
    }
    for (name, value) in extra {
        buf.put_slice(name.as_bytes());
        buf.put_slice(b": ");
        buf.put_slice(value.as_bytes());
        buf.put_slice(b"\r\n");
    }
    buf.put_slice(b"Content-Length: 0\r\n\r\n");
    buf.freeze()
}

/// The SDP offer: PCMU/PCMA and telephone-event, receive-only, on the port
/// the RTP sink really listens on, so early media lands somewhere and is
/// counted rather than bouncing as ICMP errors.
pub fn sdp_offer(media: SocketAddr, session_id: u64) -> Bytes {
    let family = if media.is_ipv4() { "IP4" } else { "IP6" };
    let ip = media.ip();
    let mut out = String::with_capacity(256);
    let _ = write!(
        out,
        "v=0\r\no=flashcall {session_id} {session_id} IN {family} {ip}\r\ns=flashcall\r\n\
         c=IN {family} {ip}\r\nt=0 0\r\nm=audio {port} RTP/AVP 0 8 101\r\n\
         a=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\n\
         a=fmtp:101 0-15\r\na=ptime:20\r\na=recvonly\r\n",
        port = media.port()
    );
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> Local {
        Local::new(
            "127.0.0.1:5060".parse().unwrap(),
            None,
            "flash.example",
            "flashcall",
        )
    }

    fn dialog<'a>(l: &'a Local, caller_id: CallerId) -> Dialog<'a> {
        Dialog {
            local: l,
            to: "+447700900123",
            trunk_host: "trunk.example:5070",
            caller: "+447700900000",
            caller_id,
            tag: b"0000000a000000010000002at",
            call_id: b"0123456789abcdef0123456789abcdef",
        }
    }

    /// The exact text, as the string-per-header renderer before produced it.
    #[test]
    fn requests_render_byte_for_byte() {
        let l = local();
        let d = dialog(&l, CallerId::Both);
        let mut out = Vec::new();
        let inv = invite(
            &mut out,
            &d,
            b"z9hG4bKbr",
            1,
            Some(("Proxy-Authorization", "Digest x")),
            b"v=0\r\n",
        );
        assert_eq!(
            std::str::from_utf8(&inv).unwrap(),
            "INVITE sip:+447700900123@trunk.example:5070;user=phone SIP/2.0\r\n\
             Via: SIP/2.0/UDP 127.0.0.1:5060;rport;branch=z9hG4bKbr\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:+447700900000@flash.example;user=phone>;tag=0000000a000000010000002at\r\n\
             To: <sip:+447700900123@trunk.example:5070;user=phone>\r\n\
             Call-ID: 0123456789abcdef0123456789abcdef@flash.example\r\n\
             CSeq: 1 INVITE\r\n\
             User-Agent: flashcall\r\n\
             Contact: <sip:+447700900000@127.0.0.1:5060>\r\n\
             P-Asserted-Identity: <sip:+447700900000@flash.example;user=phone>\r\n\
             Proxy-Authorization: Digest x\r\n\
             Allow: INVITE, ACK, CANCEL, BYE, OPTIONS\r\n\
             Content-Type: application/sdp\r\n\
             Content-Length: 5\r\n\r\nv=0\r\n"
        );
        let d = dialog(&l, CallerId::Pai);
        let c = cancel(&mut out, &d, b"z9hG4bKbr", 4_000_000_000);
        assert_eq!(
            std::str::from_utf8(&c).unwrap(),
            "CANCEL sip:+447700900123@trunk.example:5070;user=phone SIP/2.0\r\n\
             Via: SIP/2.0/UDP 127.0.0.1:5060;rport;branch=z9hG4bKbr\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:flashcall@flash.example>;tag=0000000a000000010000002at\r\n\
             To: <sip:+447700900123@trunk.example:5070;user=phone>\r\n\
             Call-ID: 0123456789abcdef0123456789abcdef@flash.example\r\n\
             CSeq: 4000000000 CANCEL\r\n\
             User-Agent: flashcall\r\n\
             Content-Length: 0\r\n\r\n"
        );
        let d = dialog(&l, CallerId::From);
        let routes = ["<sip:p1;lr>".to_string()];
        let a = ack(
            &mut out,
            &d,
            Target::Uri("sip:c@1.2.3.4"),
            b"z9hG4bKa",
            1,
            b"<sip:x>;tag=t",
            &routes,
            None,
        );
        assert_eq!(
            std::str::from_utf8(&a).unwrap(),
            "ACK sip:c@1.2.3.4 SIP/2.0\r\n\
             Via: SIP/2.0/UDP 127.0.0.1:5060;rport;branch=z9hG4bKa\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:+447700900000@flash.example;user=phone>;tag=0000000a000000010000002at\r\n\
             To: <sip:x>;tag=t\r\n\
             Route: <sip:p1;lr>\r\n\
             Call-ID: 0123456789abcdef0123456789abcdef@flash.example\r\n\
             CSeq: 1 ACK\r\n\
             User-Agent: flashcall\r\n\
             Content-Length: 0\r\n\r\n"
        );
        assert_eq!(
            request_uri_string(&d),
            "sip:+447700900123@trunk.example:5070;user=phone"
        );
    }

    /// A `sent_by` (a hostname, or the public address before a NAT) is
    /// what Via and Contact carry, in place of the socket's address.
    #[test]
    fn sent_by_goes_in_via_and_contact() {
        let l = Local::new(
            "0.0.0.0:5060".parse().unwrap(),
            Some("sip.example.com:5060"),
            "sip.example.com",
            "flashcall",
        );
        let d = dialog(&l, CallerId::From);
        let mut out = Vec::new();
        let inv = invite(&mut out, &d, b"z9hG4bKbr", 1, None, b"");
        let text = std::str::from_utf8(&inv).unwrap();
        assert!(
            text.contains("\r\nVia: SIP/2.0/UDP sip.example.com:5060;rport;branch=z9hG4bKbr\r\n"),
            "{text}"
        );
        assert!(
            text.contains("\r\nContact: <sip:+447700900000@sip.example.com:5060>\r\n"),
            "{text}"
        );
        assert!(!text.contains("0.0.0.0"), "{text}");
    }

    /// The scratch is sized up front: no regrowth for long parts either.
    #[test]
    fn capacity_fits_without_regrowth() {
        let mut l = local();
        l.user_agent = "u".repeat(300);
        let d = dialog(&l, CallerId::Both);
        let sdp = vec![b'x'; 900];
        let mut out = Vec::new();
        let inv = invite(&mut out, &d, b"z9hG4bKbr", 1, None, &sdp);
        assert!(inv.len() <= capacity(&d, 9 + sdp.len()));
        assert!(out.capacity() <= capacity(&d, 9 + sdp.len()) + 64);
    }
}
