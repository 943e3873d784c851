//! Rendering of the requests a flash call sends, straight into `BytesMut`.
//!
//! Why not a generic message builder: a flash call sends the same five shapes
//! thousands of times a second (INVITE, CANCEL, ACK, BYE, and replies to the
//! trunk's requests). Writing each shape as a fixed sequence of byte appends
//! costs one allocation per datagram and no intermediate tree.

use bytes::{BufMut, Bytes, BytesMut};
use std::fmt::Write as _;
use std::net::SocketAddr;

use super::message::{unfold, Message, Name};

/// Everything about a call's dialog that every request repeats.
#[derive(Debug, Clone)]
pub struct Dialog {
    /// Request-URI of the INVITE (and so of CANCEL / non-2xx ACK).
    pub request_uri: String,
    /// From header value including `;tag=`.
    pub from: String,
    /// To header value as sent in the INVITE (no tag).
    pub to: String,
    pub call_id: String,
    /// `SIP/2.0/UDP host:port;rport` — the branch is appended per transaction.
    pub via_prefix: String,
    pub contact: String,
    /// P-Asserted-Identity value, when the caller ID goes there.
    pub pai: Option<String>,
    pub user_agent: String,
}

fn head(buf: &mut BytesMut, method: &str, uri: &str, d: &Dialog, branch: &str) {
    buf.put_slice(method.as_bytes());
    buf.put_u8(b' ');
    buf.put_slice(uri.as_bytes());
    buf.put_slice(b" SIP/2.0\r\nVia: ");
    buf.put_slice(d.via_prefix.as_bytes());
    buf.put_slice(b";branch=");
    buf.put_slice(branch.as_bytes());
    buf.put_slice(b"\r\nMax-Forwards: 70\r\nFrom: ");
    buf.put_slice(d.from.as_bytes());
    buf.put_slice(b"\r\n");
}

fn tail(buf: &mut BytesMut, d: &Dialog, cseq: u32, method: &str) {
    buf.put_slice(b"Call-ID: ");
    buf.put_slice(d.call_id.as_bytes());
    // Writing an integer into BytesMut cannot fail.
    let _ = write!(buf, "\r\nCSeq: {cseq} ");
    buf.put_slice(method.as_bytes());
    buf.put_slice(b"\r\nUser-Agent: ");
    buf.put_slice(d.user_agent.as_bytes());
    buf.put_slice(b"\r\n");
}

/// The INVITE, with an optional `(header name, value)` credentials line.
pub fn invite(
    d: &Dialog,
    branch: &str,
    cseq: u32,
    auth: Option<(&str, &str)>,
    sdp: &[u8],
) -> Bytes {
    // Sized to fit: the fixed text is under 256 bytes. A generous round
    // figure (it was 640 + SDP) made a >1 KiB request per call, which sends
    // glibc's malloc through a fastbin consolidation every time.
    let auth_len = auth.map_or(0, |(n, v)| n.len() + v.len() + 4);
    let pai_len = d.pai.as_ref().map_or(0, |p| p.len() + 23);
    let mut buf = BytesMut::with_capacity(
        256 + d.request_uri.len()
            + d.via_prefix.len()
            + branch.len()
            + d.from.len()
            + d.to.len()
            + d.call_id.len()
            + d.user_agent.len()
            + d.contact.len()
            + pai_len
            + auth_len
            + sdp.len(),
    );
    head(&mut buf, "INVITE", &d.request_uri, d, branch);
    buf.put_slice(b"To: ");
    buf.put_slice(d.to.as_bytes());
    buf.put_slice(b"\r\n");
    tail(&mut buf, d, cseq, "INVITE");
    buf.put_slice(b"Contact: ");
    buf.put_slice(d.contact.as_bytes());
    buf.put_slice(b"\r\n");
    if let Some(pai) = &d.pai {
        buf.put_slice(b"P-Asserted-Identity: ");
        buf.put_slice(pai.as_bytes());
        buf.put_slice(b"\r\n");
    }
    if let Some((name, value)) = auth {
        buf.put_slice(name.as_bytes());
        buf.put_slice(b": ");
        buf.put_slice(value.as_bytes());
        buf.put_slice(b"\r\n");
    }
    buf.put_slice(b"Allow: INVITE, ACK, CANCEL, BYE, OPTIONS\r\nContent-Type: application/sdp\r\n");
    let _ = write!(buf, "Content-Length: {}\r\n\r\n", sdp.len());
    buf.put_slice(sdp);
    buf.freeze()
}

/// CANCEL: RFC 3261 §9.1 — same Request-URI, Call-ID, From, To (no tag), CSeq
/// number and top Via (branch included) as the INVITE being cancelled.
pub fn cancel(d: &Dialog, branch: &str, cseq: u32) -> Bytes {
    let mut buf = BytesMut::with_capacity(512);
    head(&mut buf, "CANCEL", &d.request_uri, d, branch);
    buf.put_slice(b"To: ");
    buf.put_slice(d.to.as_bytes());
    buf.put_slice(b"\r\n");
    tail(&mut buf, d, cseq, "CANCEL");
    buf.put_slice(b"Content-Length: 0\r\n\r\n");
    buf.freeze()
}

/// ACK. For a non-2xx final it is part of the INVITE transaction (same URI and
/// branch, To copied from the response, RFC 3261 §17.1.1.3); for a 2xx it is
/// its own transaction to the Contact with a new branch and the route set.
pub fn ack(d: &Dialog, uri: &str, branch: &str, cseq: u32, to: &[u8], routes: &[String]) -> Bytes {
    let mut buf = BytesMut::with_capacity(512);
    head(&mut buf, "ACK", uri, d, branch);
    in_dialog_tail(&mut buf, d, cseq, "ACK", to, routes);
    buf.freeze()
}

/// BYE for a call that was answered before the CANCEL won.
pub fn bye(d: &Dialog, uri: &str, branch: &str, cseq: u32, to: &[u8], routes: &[String]) -> Bytes {
    let mut buf = BytesMut::with_capacity(512);
    head(&mut buf, "BYE", uri, d, branch);
    in_dialog_tail(&mut buf, d, cseq, "BYE", to, routes);
    buf.freeze()
}

fn in_dialog_tail(
    buf: &mut BytesMut,
    d: &Dialog,
    cseq: u32,
    method: &str,
    to: &[u8],
    routes: &[String],
) {
    buf.put_slice(b"To: ");
    buf.put_slice(to);
    buf.put_slice(b"\r\n");
    for r in routes {
        buf.put_slice(b"Route: ");
        buf.put_slice(r.as_bytes());
        buf.put_slice(b"\r\n");
    }
    tail(buf, d, cseq, method);
    buf.put_slice(b"Content-Length: 0\r\n\r\n");
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
