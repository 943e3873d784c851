//! The sandbox callee (SPEC §9): a SIP UAS on a loopback UDP port, run as a
//! tokio task inside the engine, so the whole flash-call flow — real SIP over
//! a real socket — can be tried with no trunk.
//!
//! Like the UAC ([`crate::sip::Endpoint`]) the protocol logic is a pure state
//! machine, [`SandboxCore`]: datagrams and time go in
//! ([`SandboxCore::handle_input`], [`SandboxCore::handle_timeout`]), datagrams
//! and the next deadline come out ([`SandboxCore::poll_transmit`],
//! [`SandboxCore::poll_timeout`]), so every schedule is tested on a virtual
//! clock. [`spawn`] binds the socket and drives the core from a small loop.
//!
//! # Behaviour
//!
//! - INVITE: `100 Trying` at once, `180 Ringing` (To tag, Contact) after
//!   `ring_delay` (in the same turn when it is zero), then it rings until a
//!   CANCEL, which gets `200 OK` followed by `487 Request Terminated`. A phone
//!   left ringing for [`RING_OUT`] gets `480` so no state is held forever.
//! - Responses copy every Via (in order), From, To (plus our tag), Call-ID and
//!   CSeq; the top Via gets `received` and its empty `rport` filled
//!   (RFC 3581). They go to the datagram's source address: the sandbox only
//!   binds loopback, where the source is exactly what `rport` asks for.
//! - A retransmitted INVITE (same Call-ID and branch) gets the last response
//!   again; a retransmitted CANCEL gets `200` again. Finals are retransmitted
//!   (0.5 s doubling to 4 s, RFC 3261 Timer G and §13.3.1.4) until the ACK,
//!   for at most 32 s; the dialog is forgotten 32 s after its final.
//! - ACK: absorbed. BYE: `200`, or `481` for an unknown dialog. OPTIONS:
//!   `200`. CANCEL for no known INVITE: `481`. Anything else: `501`.
//! - Malformed datagrams and responses are counted and dropped. Beyond
//!   [`MAX_DIALOGS`] live dialogs a new INVITE gets `503` (counted).
//!
//! # Magic destinations
//!
//! The last four digits of the Request-URI's user part
//! (`sip:+447700900486@host`) pick a failure, so clients and tests can try
//! every outcome without a trunk:
//!
//! | ends in | reply after `100` | UAC outcome |
//! |---|---|---|
//! | `0486` | `486 Busy Here` | `busy` |
//! | `0404` | `404 Not Found` | `invalid_number` |
//! | `0480` | `480 Temporarily Unavailable` | `unavailable` |
//! | `0503` | `503 Service Unavailable`, `Retry-After: 5` | `trunk_error` |
//! | `0200` | `180`, then `200 OK` with an SDP answer and Contact | `answered` |
//! | `0408` | nothing at all, not even `100` | `timeout` (Timer B) |
//! | other | `180`, then waits for the CANCEL | `delivered` |

use bytes::{BufMut, Bytes, BytesMut};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::sip::message::{split_top, unfold, Message, Name, StartLine};
use crate::sip::Transmit;

/// Live dialogs held at most; beyond this a new INVITE gets `503`, so a flood
/// cannot grow memory without bound.
pub const MAX_DIALOGS: usize = 100_000;

/// A phone left ringing this long gets `480`: the network's no-answer timer,
/// and the bound on how long a never-cancelled dialog holds memory.
pub const RING_OUT: Duration = Duration::from_secs(120);

/// RFC 3261 T1 and T2: the final-response retransmission schedule.
const T1: Duration = Duration::from_millis(500);
const T2: Duration = Duration::from_secs(4);
/// 64·T1: how long a final is retransmitted and a finished dialog is kept to
/// absorb retransmitted requests (Timer H / Timer J over UDP).
const LINGER: Duration = Duration::from_secs(32);

const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS";
const SERVER: &str = "flashcall-sandbox";

/// Settings of the in-process sandbox callee.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxConfig {
    /// Where to listen; must be a loopback address.
    pub bind: SocketAddr,
    /// Delay between `100 Trying` and `180 Ringing`.
    pub ring_delay: Duration,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            ring_delay: Duration::ZERO,
        }
    }
}

/// Counters of what the sandbox saw and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SandboxStats {
    /// New INVITE transactions (retransmissions not included).
    pub invites: u64,
    pub invite_retransmits: u64,
    pub cancels: u64,
    pub acks: u64,
    pub byes: u64,
    pub options: u64,
    /// Requests answered `501 Not Implemented`.
    pub unsupported: u64,
    /// CANCEL / BYE / in-dialog INVITE for nothing we know: `481`.
    pub unknown_transactions: u64,
    /// `180 Ringing` sent.
    pub rang: u64,
    /// `487 Request Terminated` sent (first time only).
    pub terminated: u64,
    /// Final responses sent again by the retransmission timer.
    pub final_retransmits: u64,
    /// INVITEs refused with `503` because [`MAX_DIALOGS`] was reached.
    pub overloaded: u64,
    /// Datagrams that were not SIP: dropped.
    pub malformed: u64,
    /// Responses received (a callee sends no requests): dropped.
    pub stray_responses: u64,
    /// Dialogs held right now.
    pub dialogs: u64,
}

/// What a destination number asks the sandbox to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// Ring and wait for the CANCEL.
    Ring,
    /// Ring, then answer with `200 OK`.
    Answer,
    /// A final failure right after `100`.
    Reject(u16),
    /// Never answer (the UAC's Timer B fires).
    Silent,
}

impl Behaviour {
    fn for_uri(uri: &str) -> Behaviour {
        let digits: Vec<u8> = uri_user(uri).bytes().filter(u8::is_ascii_digit).collect();
        let last4 = digits.get(digits.len().saturating_sub(4)..).unwrap_or(&[]);
        match last4 {
            b"0486" => Behaviour::Reject(486),
            b"0404" => Behaviour::Reject(404),
            b"0480" => Behaviour::Reject(480),
            b"0503" => Behaviour::Reject(503),
            b"0200" => Behaviour::Answer,
            b"0408" => Behaviour::Silent,
            _ => Behaviour::Ring,
        }
    }
}

/// The user part of a `sip:`/`sips:`/`tel:` URI, without user parameters.
fn uri_user(uri: &str) -> &str {
    let rest = uri.split_once(':').map_or(uri, |(_, r)| r);
    let user = match rest.split_once('@') {
        Some((user, _)) => user,
        // `tel:+44...` has no host: the number is the whole rest.
        None if uri.len() >= 4 && uri[..4].eq_ignore_ascii_case("tel:") => rest,
        None => "",
    };
    user.split(';').next().unwrap_or(user)
}

fn reason(code: u16) -> &'static str {
    match code {
        100 => "Trying",
        180 => "Ringing",
        200 => "OK",
        404 => "Not Found",
        480 => "Temporarily Unavailable",
        481 => "Call/Transaction Does Not Exist",
        486 => "Busy Here",
        487 => "Request Terminated",
        488 => "Not Acceptable Here",
        500 => "Server Internal Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// `100` sent, `180` due after `ring_delay`.
    Trying,
    /// `180` sent, waiting for a CANCEL.
    Ringing,
    /// A final was sent; retransmitted until the ACK.
    Completed,
    /// The final was ACKed (or given up on); kept only to absorb
    /// retransmissions until the entry expires.
    Confirmed,
    /// Silent destination: nothing is ever sent.
    Silent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
enum Timer {
    /// Send the `180` (and the `200` for an answering destination).
    Ring = 0,
    /// Retransmit the final (Timer G).
    Retransmit,
    /// The phone rang for [`RING_OUT`]: `480`.
    RingOut,
    /// Forget the dialog.
    Expire,
}
const TIMERS: usize = 4;

#[derive(Debug)]
struct Dialog {
    /// Distinguishes a reused Call-ID from the entry a stale timer was for.
    gen: u64,
    /// Top Via branch of the INVITE: identifies its transaction.
    branch: Option<Box<str>>,
    to_tag: Box<str>,
    peer: SocketAddr,
    behaviour: Behaviour,
    state: State,
    /// The INVITE's Via/From/To(+tag)/Call-ID/CSeq lines, rendered once:
    /// every response to the INVITE repeats them, including the 487 that is
    /// built while handling a CANCEL (whose CSeq method differs).
    head: Bytes,
    /// Last response sent for the INVITE, re-sent for a retransmitted INVITE.
    last: Option<Bytes>,
    interval: Duration,
    deadlines: [Option<Instant>; TIMERS],
}

/// A heap entry: when, which dialog generation, which timer, whose Call-ID.
/// Stale entries stay in the heap and are skipped by comparing with the
/// dialog's own deadline, which is cheaper than removing them.
type TimerEntry = (Instant, u64, Timer, Arc<str>);

/// The sandbox UAS as a pure state machine (time is an input).
pub struct SandboxCore {
    local: SocketAddr,
    ring_delay: Duration,
    max_dialogs: usize,
    dialogs: HashMap<Arc<str>, Dialog>,
    heap: BinaryHeap<Reverse<TimerEntry>>,
    transmits: VecDeque<Transmit>,
    next_gen: u64,
    stats: SandboxStats,
    sdp: Bytes,
}

impl SandboxCore {
    /// A core answering as `local` (its Contact and SDP address).
    pub fn new(local: SocketAddr, ring_delay: Duration) -> Self {
        let family = if local.is_ipv4() { "IP4" } else { "IP6" };
        let ip = local.ip();
        // The sandbox never sends media, and says so (`inactive`); the port is
        // only there because an m= line needs one.
        let sdp = format!(
            "v=0\r\no=sandbox 1 1 IN {family} {ip}\r\ns=flashcall-sandbox\r\n\
             c=IN {family} {ip}\r\nt=0 0\r\nm=audio 9 RTP/AVP 0\r\n\
             a=rtpmap:0 PCMU/8000\r\na=inactive\r\n"
        );
        SandboxCore {
            local,
            ring_delay,
            max_dialogs: MAX_DIALOGS,
            dialogs: HashMap::new(),
            heap: BinaryHeap::new(),
            transmits: VecDeque::new(),
            next_gen: 1,
            stats: SandboxStats::default(),
            sdp: Bytes::from(sdp),
        }
    }

    /// Overrides [`MAX_DIALOGS`] (tests use a small cap).
    pub fn with_max_dialogs(mut self, max: usize) -> Self {
        self.max_dialogs = max;
        self
    }

    pub fn stats(&self) -> SandboxStats {
        SandboxStats {
            dialogs: self.dialogs.len() as u64,
            ..self.stats
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The earliest instant at which [`SandboxCore::handle_timeout`] has work.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, gen, timer, key))) = self.heap.peek() {
            if self.deadline(key, *gen, *timer) == Some(*at) {
                return Some(*at);
            }
            self.heap.pop();
        }
        None
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((at, ..))) = self.heap.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, gen, timer, key))) = self.heap.pop() else {
                break;
            };
            if self.deadline(&key, gen, timer) != Some(at) {
                continue; // stale: re-armed, disarmed or the dialog is gone
            }
            if let Some(d) = self.dialogs.get_mut(&key) {
                d.deadlines[timer as usize] = None;
            }
            self.on_timer(now, &key, timer);
        }
    }

    /// Feeds one datagram from `from`. Never panics on any input.
    pub fn handle_input(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        let msg = match Message::parse(datagram) {
            Ok(m) => m,
            Err(e) => {
                self.stats.malformed += 1;
                tracing::debug!(%from, error = %e, "sandbox: dropped malformed datagram");
                return;
            }
        };
        let StartLine::Request { method, uri } = msg.start else {
            self.stats.stray_responses += 1;
            return;
        };
        match method {
            "INVITE" => self.on_invite(now, from, uri, &msg),
            "CANCEL" => self.on_cancel(now, from, &msg),
            "ACK" => self.on_ack(&msg),
            "BYE" => self.on_bye(from, &msg),
            "OPTIONS" => {
                self.stats.options += 1;
                self.reply(
                    from,
                    &msg,
                    200,
                    "",
                    &[("Allow", ALLOW), ("Accept", "application/sdp")],
                );
            }
            _ => {
                self.stats.unsupported += 1;
                self.reply(from, &msg, 501, "", &[("Allow", ALLOW)]);
            }
        }
    }

    // ----- requests --------------------------------------------------------

    fn on_invite(&mut self, now: Instant, from: SocketAddr, uri: &str, msg: &Message<'_>) {
        let branch = msg.top_via_branch;
        if let Some(d) = self.dialogs.get(msg.call_id) {
            if d.branch.as_deref() == branch {
                // A retransmission: the last response again, never a new dialog.
                self.stats.invite_retransmits += 1;
                let (peer, last, silent) = (d.peer, d.last.clone(), d.state == State::Silent);
                if let Some(payload) = last {
                    self.transmits.push_back(Transmit {
                        dest: peer,
                        payload,
                    });
                } else if silent {
                    // Keep absorbing for as long as the UAC keeps trying.
                    self.arm(msg.call_id, Timer::Expire, now + LINGER);
                }
                return;
            }
            if !matches!(d.state, State::Completed | State::Confirmed) {
                // RFC 3261 §14.2: a second INVITE while the first is pending.
                self.reply(from, msg, 500, "", &[("Retry-After", "1")]);
                return;
            }
            // The old transaction is over (e.g. a retry after a final): the
            // new INVITE starts afresh below and replaces it.
        }
        if msg.to_tag.is_some() {
            // Re-INVITEs are not supported; one for an unknown dialog is 481.
            let known = self
                .dialogs
                .get(msg.call_id)
                .is_some_and(|d| Some(&*d.to_tag) == msg.to_tag);
            if known {
                self.reply(from, msg, 488, "", &[]);
            } else {
                self.stats.unknown_transactions += 1;
                self.reply(from, msg, 481, "", &[]);
            }
            return;
        }
        if self.dialogs.len() >= self.max_dialogs && !self.dialogs.contains_key(msg.call_id) {
            self.stats.overloaded += 1;
            self.reply(from, msg, 503, "", &[("Retry-After", "5")]);
            return;
        }
        self.stats.invites += 1;
        let gen = self.next_gen;
        self.next_gen += 1;
        let to_tag = format!("sbx{gen:x}");
        let behaviour = Behaviour::for_uri(uri);
        let key: Arc<str> = Arc::from(msg.call_id);
        let dialog = Dialog {
            gen,
            branch: branch.map(Box::from),
            head: copy_head(msg, from, &to_tag),
            to_tag: to_tag.into_boxed_str(),
            peer: from,
            behaviour,
            state: State::Trying,
            last: None,
            interval: T1,
            deadlines: [None; TIMERS],
        };
        self.dialogs.insert(key.clone(), dialog);
        match behaviour {
            Behaviour::Silent => {
                self.set_state(&key, State::Silent);
                self.arm(&key, Timer::Expire, now + LINGER);
            }
            Behaviour::Reject(code) => {
                self.send_invite_response(&key, 100);
                self.send_final(now, &key, code);
            }
            Behaviour::Ring | Behaviour::Answer => {
                self.send_invite_response(&key, 100);
                if self.ring_delay.is_zero() {
                    self.ring(now, &key);
                } else {
                    self.arm(&key, Timer::Ring, now + self.ring_delay);
                }
            }
        }
    }

    fn on_cancel(&mut self, now: Instant, from: SocketAddr, msg: &Message<'_>) {
        self.stats.cancels += 1;
        let matched = self
            .dialogs
            .get(msg.call_id)
            .filter(|d| d.branch.as_deref() == msg.top_via_branch)
            .map(|d| (d.state, d.to_tag.clone()));
        let Some((state, to_tag)) = matched else {
            self.stats.unknown_transactions += 1;
            self.reply(from, msg, 481, "", &[]);
            return;
        };
        if state == State::Silent {
            return; // a silent destination answers nothing at all
        }
        // §9.2: the CANCEL is answered 200 whatever the INVITE's state; it
        // only terminates an INVITE that has no final yet. A retransmitted
        // CANCEL finds the INVITE completed and so just gets 200 again.
        self.reply(from, msg, 200, &to_tag, &[]);
        if matches!(state, State::Trying | State::Ringing) {
            self.stats.terminated += 1;
            let key: Arc<str> = Arc::from(msg.call_id);
            self.disarm(&key, Timer::Ring);
            self.disarm(&key, Timer::RingOut);
            self.send_final(now, &key, 487);
        }
    }

    fn on_ack(&mut self, msg: &Message<'_>) {
        self.stats.acks += 1;
        let Some(d) = self.dialogs.get_mut(msg.call_id) else {
            return; // absorbed: an ACK is never answered
        };
        // The ACK of a non-2xx reuses the INVITE's branch, the ACK of a 2xx
        // has its own: the Call-ID and our To tag identify both.
        if d.state == State::Completed && msg.to_tag == Some(&*d.to_tag) {
            d.state = State::Confirmed;
            d.deadlines[Timer::Retransmit as usize] = None;
        }
    }

    fn on_bye(&mut self, from: SocketAddr, msg: &Message<'_>) {
        self.stats.byes += 1;
        let known = self
            .dialogs
            .get(msg.call_id)
            .filter(|d| msg.to_tag == Some(&*d.to_tag))
            .map(|d| d.to_tag.clone());
        match known {
            Some(tag) => {
                // A BYE also implies the 2xx arrived, whatever became of the ACK.
                if let Some(d) = self.dialogs.get_mut(msg.call_id) {
                    if d.state == State::Completed {
                        d.state = State::Confirmed;
                        d.deadlines[Timer::Retransmit as usize] = None;
                    }
                }
                self.reply(from, msg, 200, &tag, &[]);
            }
            None => {
                self.stats.unknown_transactions += 1;
                self.reply(from, msg, 481, "", &[]);
            }
        }
    }

    // ----- timers ----------------------------------------------------------

    fn on_timer(&mut self, now: Instant, key: &Arc<str>, timer: Timer) {
        let Some(d) = self.dialogs.get_mut(key) else {
            return;
        };
        match timer {
            Timer::Ring => {
                if d.state == State::Trying {
                    self.ring(now, key);
                }
            }
            Timer::Retransmit => {
                if d.state != State::Completed {
                    return;
                }
                let (peer, last) = (d.peer, d.last.clone());
                // Timer G: doubling, capped at T2 (§17.2.1, and §13.3.1.4 for 2xx).
                d.interval = (d.interval * 2).min(T2);
                let next = now + d.interval;
                if let Some(payload) = last {
                    self.stats.final_retransmits += 1;
                    self.transmits.push_back(Transmit {
                        dest: peer,
                        payload,
                    });
                }
                self.arm(key, Timer::Retransmit, next);
            }
            Timer::RingOut => {
                if d.state == State::Ringing {
                    self.send_final(now, key, 480);
                }
            }
            Timer::Expire => {
                self.dialogs.remove(key);
            }
        }
    }

    /// `180 Ringing`, then the `200` for an answering destination.
    fn ring(&mut self, now: Instant, key: &Arc<str>) {
        self.stats.rang += 1;
        self.set_state(key, State::Ringing);
        self.send_invite_response(key, 180);
        let answer = self
            .dialogs
            .get(key)
            .is_some_and(|d| d.behaviour == Behaviour::Answer);
        if answer {
            self.send_final(now, key, 200);
        } else {
            self.arm(key, Timer::RingOut, now + RING_OUT);
        }
    }

    /// Sends a final for the INVITE, retransmitted until ACKed, and arms the
    /// dialog's expiry 32 s out.
    fn send_final(&mut self, now: Instant, key: &Arc<str>, code: u16) {
        self.set_state(key, State::Completed);
        self.send_invite_response(key, code);
        if let Some(d) = self.dialogs.get_mut(key) {
            d.interval = T1;
        }
        self.disarm(key, Timer::RingOut);
        self.arm(key, Timer::Retransmit, now + T1);
        // Retransmission stops with the entry: both at 64·T1 (Timer H).
        self.arm(key, Timer::Expire, now + LINGER);
    }

    // ----- rendering -------------------------------------------------------

    /// A response to the dialog's INVITE, remembered for retransmission.
    fn send_invite_response(&mut self, key: &Arc<str>, code: u16) {
        let local = self.local;
        let sdp = self.sdp.clone();
        let Some(d) = self.dialogs.get_mut(key) else {
            return;
        };
        let contact = format!("<sip:sandbox@{local}>");
        let mut extra: Vec<(&str, &str)> = Vec::with_capacity(3);
        if matches!(code, 180 | 200) {
            extra.push(("Contact", &contact));
        }
        if code == 200 {
            extra.push(("Allow", ALLOW));
        }
        if code == 503 {
            extra.push(("Retry-After", "5"));
        }
        let body = (code == 200).then_some(&sdp[..]);
        let payload = render(code, &d.head, &extra, body);
        d.last = Some(payload.clone());
        self.transmits.push_back(Transmit {
            dest: d.peer,
            payload,
        });
    }

    /// A one-off response to `msg` (not an INVITE we keep state for).
    fn reply(
        &mut self,
        to: SocketAddr,
        msg: &Message<'_>,
        code: u16,
        to_tag: &str,
        extra: &[(&str, &str)],
    ) {
        // A stateless reply still needs a To tag (§8.2.6.2); one derived from
        // nothing in particular is fine since no dialog follows.
        let tag = if to_tag.is_empty() { "sbx0" } else { to_tag };
        let head = copy_head(msg, to, tag);
        self.transmits.push_back(Transmit {
            dest: to,
            payload: render(code, &head, extra, None),
        });
    }

    // ----- timer plumbing --------------------------------------------------

    fn set_state(&mut self, key: &str, state: State) {
        if let Some(d) = self.dialogs.get_mut(key) {
            d.state = state;
        }
    }

    fn deadline(&self, key: &str, gen: u64, timer: Timer) -> Option<Instant> {
        self.dialogs.get(key).filter(|d| d.gen == gen)?.deadlines[timer as usize]
    }

    fn arm(&mut self, key: &str, timer: Timer, at: Instant) {
        let Some((k, d)) = self.dialogs.get_key_value(key) else {
            return;
        };
        let (k, gen) = (k.clone(), d.gen);
        if let Some(d) = self.dialogs.get_mut(key) {
            d.deadlines[timer as usize] = Some(at);
        }
        self.heap.push(Reverse((at, gen, timer, k)));
    }

    fn disarm(&mut self, key: &str, timer: Timer) {
        if let Some(d) = self.dialogs.get_mut(key) {
            d.deadlines[timer as usize] = None;
        }
    }
}

/// The request's Via (one value per line, in order; the top one with
/// `received` and `rport` filled per RFC 3581), From, To (with `to_tag` added
/// when it had none), Call-ID and CSeq, as response header lines.
fn copy_head(msg: &Message<'_>, source: SocketAddr, to_tag: &str) -> Bytes {
    let mut buf = BytesMut::with_capacity(384);
    let mut scratch = Vec::with_capacity(128);
    let mut top = true;
    for (name, _, value) in msg.headers() {
        scratch.clear();
        unfold(value, &mut scratch);
        match name {
            Name::Via => {
                for v in split_top(&scratch) {
                    buf.put_slice(b"Via: ");
                    if top {
                        top = false;
                        put_top_via(&mut buf, v, source);
                    } else {
                        buf.put_slice(v);
                    }
                    buf.put_slice(b"\r\n");
                }
            }
            Name::From | Name::CallId | Name::CSeq | Name::To => {
                buf.put_slice(match name {
                    Name::From => b"From: ",
                    Name::CallId => b"Call-ID: ",
                    Name::CSeq => b"CSeq: ",
                    _ => b"To: ",
                });
                buf.put_slice(&scratch);
                if name == Name::To && msg.to_tag.is_none() {
                    buf.put_slice(b";tag=");
                    buf.put_slice(to_tag.as_bytes());
                }
                buf.put_slice(b"\r\n");
            }
            _ => {}
        }
    }
    buf.freeze()
}

/// RFC 3581 §4 / RFC 3261 §18.2.1: an empty `rport` gets the source port and
/// then `received` the source IP, so the client learns how it was seen.
fn put_top_via(buf: &mut BytesMut, via: &[u8], source: SocketAddr) {
    let mut filled = false;
    for (i, part) in via.split(|&b| b == b';').enumerate() {
        if i > 0 {
            buf.put_u8(b';');
        }
        if i > 0 && !filled && crate::sip::message::trim(part).eq_ignore_ascii_case(b"rport") {
            filled = true;
            let _ = write!(buf, "rport={}", source.port());
        } else {
            buf.put_slice(part);
        }
    }
    if filled {
        let _ = write!(buf, ";received={}", source.ip());
    }
}

fn render(code: u16, head: &[u8], extra: &[(&str, &str)], body: Option<&[u8]>) -> Bytes {
    let body = body.unwrap_or_default();
    let mut buf = BytesMut::with_capacity(head.len() + 160 + body.len());
    let _ = write!(buf, "SIP/2.0 {code} {}\r\n", reason(code));
    buf.put_slice(head);
    for (name, value) in extra {
        let _ = write!(buf, "{name}: {value}\r\n");
    }
    let _ = write!(buf, "Server: {SERVER}\r\n");
    if !body.is_empty() {
        buf.put_slice(b"Content-Type: application/sdp\r\n");
    }
    let _ = write!(buf, "Content-Length: {}\r\n\r\n", body.len());
    buf.put_slice(body);
    buf.freeze()
}

// ----- the async driver ------------------------------------------------------

/// A running sandbox callee. Dropping it (or [`Sandbox::shutdown`]) stops it.
pub struct Sandbox {
    /// Where the callee listens: point the trunk address here.
    pub addr: SocketAddr,
    stats: watch::Receiver<SandboxStats>,
    task: JoinHandle<()>,
}

impl Sandbox {
    /// A snapshot of the counters as of the driver's last turn.
    pub fn stats(&self) -> SandboxStats {
        *self.stats.borrow()
    }

    /// Waits until the counters satisfy `pred` (they are published after every
    /// turn of the driver), so tests can wait for a condition instead of
    /// sleeping. Callers bound the wait with a timeout.
    pub async fn wait_for(&self, pred: impl FnMut(&SandboxStats) -> bool) -> SandboxStats {
        let mut rx = self.stats.clone();
        let snapshot = match rx.wait_for(pred).await {
            Ok(s) => *s,
            // The task ended (aborted or panicked): the last value is final.
            Err(_) => *self.stats.borrow(),
        };
        snapshot
    }

    /// Stops the callee.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds the sandbox socket, then runs the callee as a tokio task.
///
/// Binding happens before the task starts so a port in use is an error here,
/// for the caller to report. A non-loopback `bind` is refused
/// ([`ErrorKind::InvalidInput`]): the sandbox must never answer real traffic.
pub async fn spawn(cfg: SandboxConfig) -> std::io::Result<Sandbox> {
    if !cfg.bind.ip().is_loopback() {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            format!(
                "sandbox bind address {} is not a loopback address",
                cfg.bind
            ),
        ));
    }
    let socket = UdpSocket::bind(cfg.bind).await?;
    let addr = socket.local_addr()?;
    let core = SandboxCore::new(addr, cfg.ring_delay);
    let (tx, rx) = watch::channel(core.stats());
    tracing::warn!(%addr, "SANDBOX callee listening: calls sent here never reach a phone");
    let task = tokio::spawn(drive(socket, core, tx));
    Ok(Sandbox {
        addr,
        stats: rx,
        task,
    })
}

/// Socket <-> core: drain the socket, fire timers, flush, publish the
/// counters, sleep until the socket is readable or the next deadline.
async fn drive(socket: UdpSocket, mut core: SandboxCore, stats: watch::Sender<SandboxStats>) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let now = Instant::now();
        // Bounded so timers stay on time under a flood.
        for _ in 0..1024 {
            match socket.try_recv_from(&mut buf) {
                Ok((n, from)) => core.handle_input(now, from, &buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                // ICMP from an earlier send to a client that went away.
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
                Err(e) => {
                    tracing::warn!(error = %e, "sandbox socket receive error");
                    break;
                }
            }
        }
        core.handle_timeout(now);
        while let Some(t) = core.poll_transmit() {
            send(&socket, &t).await;
        }
        let snapshot = core.stats();
        stats.send_if_modified(|s| std::mem::replace(s, snapshot) != snapshot);
        let next = core.poll_timeout();
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = socket.readable() => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "sandbox socket");
                }
            }
            _ = sleep => {}
        }
    }
}

async fn send(socket: &UdpSocket, t: &Transmit) {
    loop {
        match socket.try_send_to(&t.payload, t.dest) {
            Ok(_) => return,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if socket.writable().await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // A client that went away: its retransmissions stop with it.
                tracing::debug!(dest = %t.dest, error = %e, "sandbox send failed");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: &str = "127.0.0.1:5061";
    const LOCAL: &str = "127.0.0.1:5070";

    fn peer() -> SocketAddr {
        PEER.parse().expect("literal")
    }

    fn core() -> SandboxCore {
        SandboxCore::new(LOCAL.parse().expect("literal"), Duration::ZERO)
    }

    /// A request as our UAC shapes it, plus a second (proxy) Via on the same
    /// line to check that every Via comes back, in order.
    fn request(
        method: &str,
        to: &str,
        call_id: &str,
        branch: &str,
        cseq: u32,
        to_tag: &str,
    ) -> Vec<u8> {
        let to_tag = if to_tag.is_empty() {
            String::new()
        } else {
            format!(";tag={to_tag}")
        };
        format!(
            "{method} sip:{to}@sandbox;user=phone SIP/2.0\r\n\
             Via: SIP/2.0/UDP {PEER};rport;branch={branch} , SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKproxy\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:+447700900000@flash.example.org;user=phone>;tag=from1\r\n\
             To: <sip:{to}@sandbox;user=phone>{to_tag}\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: {cseq} {method}\r\n\
             Content-Length: 0\r\n\r\n"
        )
        .into_bytes()
    }

    fn invite(to: &str, call_id: &str, branch: &str) -> Vec<u8> {
        request("INVITE", to, call_id, branch, 1, "")
    }

    fn cancel(to: &str, call_id: &str, branch: &str) -> Vec<u8> {
        request("CANCEL", to, call_id, branch, 1, "")
    }

    fn ack(to: &str, call_id: &str, branch: &str, to_tag: &str) -> Vec<u8> {
        request("ACK", to, call_id, branch, 1, to_tag)
    }

    /// Everything the core wants sent, as raw datagrams (all to the peer).
    fn drain(c: &mut SandboxCore) -> Vec<Bytes> {
        std::iter::from_fn(|| c.poll_transmit())
            .map(|t| {
                assert_eq!(t.dest, peer(), "replies go to the datagram's source");
                t.payload
            })
            .collect()
    }

    fn parse(b: &Bytes) -> Message<'_> {
        Message::parse(b).expect("the sandbox renders parsable responses")
    }

    fn codes(out: &[Bytes]) -> Vec<u16> {
        out.iter().filter_map(|b| parse(b).status()).collect()
    }

    fn header(m: &Message<'_>, name: &str) -> Option<String> {
        m.headers()
            .find(|(_, raw, _)| raw.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, _, v)| String::from_utf8_lossy(v).into_owned())
    }

    fn vias(m: &Message<'_>) -> Vec<String> {
        m.values(Name::Via)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    /// Drives the timers until `end`, returning when each datagram went out.
    fn run_until(c: &mut SandboxCore, t0: Instant, end: Instant) -> Vec<(Duration, u16)> {
        let mut sent = Vec::new();
        while let Some(at) = c.poll_timeout().filter(|&at| at <= end) {
            c.handle_timeout(at);
            for b in drain(c) {
                sent.push((at - t0, parse(&b).status().unwrap_or(0)));
            }
        }
        sent
    }

    #[test]
    fn invite_gets_100_and_180_with_the_request_headers_and_a_to_tag() {
        let mut c = core();
        let now = Instant::now();
        c.handle_input(now, peer(), &invite("+447700900123", "c1@h", "z9hG4bK1"));
        let out = drain(&mut c);
        assert_eq!(
            codes(&out),
            [100, 180],
            "180 in the same turn when ring_delay is 0"
        );
        let expected_vias = [
            format!("SIP/2.0/UDP {PEER};rport=5061;branch=z9hG4bK1;received=127.0.0.1"),
            "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKproxy".to_owned(),
        ];
        for b in &out {
            let m = parse(b);
            assert_eq!(vias(&m), expected_vias);
            assert_eq!(m.top_via_branch, Some("z9hG4bK1"));
            assert_eq!(m.call_id, "c1@h");
            assert_eq!((m.cseq.number, m.cseq.method), (1, "INVITE"));
            assert_eq!(m.from_tag, Some("from1"));
            assert!(m.body.is_empty());
            assert_eq!(header(&m, "Content-Length").as_deref(), Some("0"));
        }
        let ringing = parse(&out[1]);
        assert!(ringing.to_tag.is_some_and(|t| !t.is_empty()));
        assert_eq!(ringing.contact_uri, Some("sip:sandbox@127.0.0.1:5070"));
        let s = c.stats();
        assert_eq!((s.invites, s.rang, s.dialogs), (1, 1, 1));
    }

    #[test]
    fn ring_delay_holds_the_180() {
        let mut c = SandboxCore::new(LOCAL.parse().expect("literal"), Duration::from_millis(300));
        let t0 = Instant::now();
        c.handle_input(t0, peer(), &invite("+447700900123", "c1@h", "z9hG4bK1"));
        assert_eq!(codes(&drain(&mut c)), [100]);
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_millis(300)));
        let sent = run_until(&mut c, t0, t0 + Duration::from_millis(300));
        assert_eq!(sent, [(Duration::from_millis(300), 180)]);

        // A CANCEL before the 180 terminates the INVITE, and no 180 follows.
        c.handle_input(t0, peer(), &invite("+447700900123", "c2@h", "z9hG4bK2"));
        drain(&mut c);
        c.handle_input(t0, peer(), &cancel("+447700900123", "c2@h", "z9hG4bK2"));
        assert_eq!(codes(&drain(&mut c)), [200, 487]);
        let sent = run_until(&mut c, t0, t0 + Duration::from_millis(400));
        assert!(sent.iter().all(|(_, code)| *code == 487), "{sent:?}");
    }

    #[test]
    fn cancel_gets_200_then_487_with_the_same_to_tag() {
        let mut c = core();
        let now = Instant::now();
        c.handle_input(now, peer(), &invite("+447700900123", "c1@h", "z9hG4bK1"));
        let out = drain(&mut c);
        let tag = parse(&out[1]).to_tag.expect("180 has a tag").to_owned();
        c.handle_input(now, peer(), &cancel("+447700900123", "c1@h", "z9hG4bK1"));
        let out = drain(&mut c);
        assert_eq!(codes(&out), [200, 487]);
        let ok = parse(&out[0]);
        assert_eq!((ok.cseq.number, ok.cseq.method), (1, "CANCEL"));
        assert_eq!(ok.to_tag, Some(tag.as_str()));
        let terminated = parse(&out[1]);
        assert_eq!(
            (terminated.cseq.number, terminated.cseq.method),
            (1, "INVITE")
        );
        assert_eq!(terminated.to_tag, Some(tag.as_str()));
        assert_eq!(terminated.top_via_branch, Some("z9hG4bK1"));
        assert_eq!(vias(&terminated).len(), 2);

        // A retransmitted CANCEL: 200 again, no second 487.
        c.handle_input(now, peer(), &cancel("+447700900123", "c1@h", "z9hG4bK1"));
        assert_eq!(codes(&drain(&mut c)), [200]);
        let s = c.stats();
        assert_eq!((s.cancels, s.terminated), (2, 1));
    }

    #[test]
    fn the_487_is_retransmitted_on_timer_g_until_32_s_then_forgotten() {
        let mut c = core();
        let t0 = Instant::now();
        c.handle_input(t0, peer(), &invite("+447700900123", "c1@h", "z9hG4bK1"));
        c.handle_input(t0, peer(), &cancel("+447700900123", "c1@h", "z9hG4bK1"));
        drain(&mut c);
        let sent = run_until(&mut c, t0, t0 + Duration::from_secs(60));
        let ms: Vec<u64> = sent.iter().map(|(d, _)| d.as_millis() as u64).collect();
        assert_eq!(
            ms,
            [500, 1_500, 3_500, 7_500, 11_500, 15_500, 19_500, 23_500, 27_500, 31_500]
        );
        assert!(sent.iter().all(|(_, code)| *code == 487));
        assert_eq!(c.stats().dialogs, 0, "dropped 32 s after the final");
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn the_ack_stops_the_487_retransmission() {
        let mut c = core();
        let t0 = Instant::now();
        c.handle_input(t0, peer(), &invite("+447700900123", "c1@h", "z9hG4bK1"));
        let tag = parse(&drain(&mut c)[1]).to_tag.expect("tag").to_owned();
        c.handle_input(t0, peer(), &cancel("+447700900123", "c1@h", "z9hG4bK1"));
        drain(&mut c);
        let sent = run_until(&mut c, t0, t0 + Duration::from_millis(1_500));
        assert_eq!(sent.len(), 2);
        let t = t0 + Duration::from_millis(1_600);
        c.handle_input(t, peer(), &ack("+447700900123", "c1@h", "z9hG4bK1", &tag));
        assert!(drain(&mut c).is_empty(), "an ACK is never answered");
        // Only the expiry is left, 32 s after the final.
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(32)));
        assert!(run_until(&mut c, t0, t0 + Duration::from_secs(60)).is_empty());
        assert_eq!(c.stats().dialogs, 0);
        // A late retransmitted CANCEL after expiry: the transaction is gone.
        c.handle_input(t, peer(), &cancel("+447700900123", "c1@h", "z9hG4bK1"));
        assert_eq!(codes(&drain(&mut c)), [481]);
    }

    #[test]
    fn a_retransmitted_invite_gets_the_last_response_not_a_new_dialog() {
        let mut c = core();
        let now = Instant::now();
        let inv = invite("+447700900123", "c1@h", "z9hG4bK1");
        c.handle_input(now, peer(), &inv);
        let first = drain(&mut c);
        c.handle_input(now, peer(), &inv);
        let again = drain(&mut c);
        assert_eq!(again, [first[1].clone()], "the 180, byte for byte");
        // After the CANCEL the last response is the 487.
        c.handle_input(now, peer(), &cancel("+447700900123", "c1@h", "z9hG4bK1"));
        drain(&mut c);
        c.handle_input(now, peer(), &inv);
        assert_eq!(codes(&drain(&mut c)), [487]);
        let s = c.stats();
        assert_eq!((s.invites, s.invite_retransmits, s.dialogs), (1, 2, 1));
    }

    #[test]
    fn a_second_invite_while_the_first_is_pending_gets_500() {
        let mut c = core();
        let now = Instant::now();
        c.handle_input(now, peer(), &invite("+447700900123", "c1@h", "z9hG4bK1"));
        drain(&mut c);
        c.handle_input(now, peer(), &invite("+447700900123", "c1@h", "z9hG4bK2"));
        let out = drain(&mut c);
        assert_eq!(codes(&out), [500]);
        assert_eq!(parse(&out[0]).retry_after, Some(1));
    }

    #[test]
    fn magic_destinations_give_their_finals_retransmitted_until_acked() {
        for (to, code) in [
            ("+447700900486", 486),
            ("+447700900404", 404),
            ("+447700900480", 480),
            ("+447700900503", 503),
        ] {
            let mut c = core();
            let t0 = Instant::now();
            c.handle_input(t0, peer(), &invite(to, "m@h", "z9hG4bKm"));
            let out = drain(&mut c);
            assert_eq!(codes(&out), [100, code], "{to}");
            let fin = parse(&out[1]);
            let tag = fin.to_tag.expect("final has a To tag").to_owned();
            let expected_retry = (code == 503).then_some(5);
            assert_eq!(fin.retry_after, expected_retry, "{to}");
            let sent = run_until(&mut c, t0, t0 + Duration::from_millis(500));
            assert_eq!(sent, [(Duration::from_millis(500), code)], "{to}");
            c.handle_input(t0, peer(), &ack(to, "m@h", "z9hG4bKm", &tag));
            assert_eq!(
                c.poll_timeout(),
                Some(t0 + LINGER),
                "{to}: only the expiry left"
            );
            assert_eq!(c.stats().rang, 0, "{to}: no 180 before a failure");
        }
    }

    #[test]
    fn magic_0200_answers_after_the_180_and_takes_ack_and_bye() {
        let mut c = core();
        let t0 = Instant::now();
        let to = "+447700900200";
        c.handle_input(t0, peer(), &invite(to, "a@h", "z9hG4bKa"));
        let out = drain(&mut c);
        assert_eq!(codes(&out), [100, 180, 200]);
        let ok = parse(&out[2]);
        let tag = ok.to_tag.expect("tag").to_owned();
        assert_eq!(parse(&out[1]).to_tag, Some(tag.as_str()), "one dialog");
        assert_eq!(ok.contact_uri, Some("sip:sandbox@127.0.0.1:5070"));
        assert!(ok.body.starts_with(b"v=0\r\n"));
        assert_eq!(
            header(&ok, "Content-Type").as_deref(),
            Some("application/sdp")
        );
        assert_eq!(
            header(&ok, "Content-Length"),
            Some(ok.body.len().to_string())
        );
        // The 2xx is retransmitted until the ACK (RFC 3261 §13.3.1.4).
        assert_eq!(
            run_until(&mut c, t0, t0 + Duration::from_millis(500)).len(),
            1
        );
        // The UAC's ACK for a 2xx has its own branch; BYE has CSeq 2.
        c.handle_input(t0, peer(), &ack(to, "a@h", "z9hG4bKack", &tag));
        assert!(drain(&mut c).is_empty());
        assert_eq!(c.poll_timeout(), Some(t0 + LINGER));
        c.handle_input(
            t0,
            peer(),
            &request("BYE", to, "a@h", "z9hG4bKbye", 2, &tag),
        );
        let out = drain(&mut c);
        assert_eq!(codes(&out), [200]);
        let bye_ok = parse(&out[0]);
        assert_eq!((bye_ok.cseq.number, bye_ok.cseq.method), (2, "BYE"));
        assert_eq!(bye_ok.to_tag, Some(tag.as_str()));
        // A CANCEL that crossed the 200 is answered 200 and changes nothing.
        c.handle_input(t0, peer(), &cancel(to, "a@h", "z9hG4bKa"));
        assert_eq!(codes(&drain(&mut c)), [200]);
        assert_eq!(c.stats().terminated, 0);
    }

    #[test]
    fn magic_0408_is_silent_and_forgotten_after_the_last_retransmission() {
        let mut c = core();
        let t0 = Instant::now();
        let inv = invite("+447700900408", "s@h", "z9hG4bKs");
        c.handle_input(t0, peer(), &inv);
        assert!(drain(&mut c).is_empty(), "not even a 100");
        // The UAC's Timer A retransmissions: still silent, still one dialog.
        for ms in [500, 1_500, 3_500, 7_500, 15_500, 31_500] {
            let t = t0 + Duration::from_millis(ms);
            c.handle_timeout(t);
            c.handle_input(t, peer(), &inv);
            assert!(drain(&mut c).is_empty());
        }
        c.handle_input(t0, peer(), &cancel("+447700900408", "s@h", "z9hG4bKs"));
        assert!(drain(&mut c).is_empty(), "not even to a CANCEL");
        let s = c.stats();
        assert_eq!((s.invites, s.invite_retransmits, s.dialogs), (1, 6, 1));
        let last = t0 + Duration::from_millis(31_500);
        assert_eq!(c.poll_timeout(), Some(last + LINGER));
        c.handle_timeout(last + LINGER);
        assert_eq!(c.stats().dialogs, 0);
    }

    #[test]
    fn a_phone_left_ringing_gets_480_after_ring_out() {
        let mut c = core();
        let t0 = Instant::now();
        c.handle_input(t0, peer(), &invite("+447700900123", "r@h", "z9hG4bKr"));
        drain(&mut c);
        let sent = run_until(&mut c, t0, t0 + RING_OUT);
        assert_eq!(sent, [(RING_OUT, 480)]);
    }

    #[test]
    fn unknown_cancel_and_bye_get_481() {
        let mut c = core();
        let now = Instant::now();
        c.handle_input(now, peer(), &cancel("+447700900123", "nope@h", "z9hG4bK1"));
        assert_eq!(codes(&drain(&mut c)), [481]);
        // Right Call-ID, wrong branch: not that INVITE's transaction either.
        c.handle_input(now, peer(), &invite("+447700900123", "c1@h", "z9hG4bK1"));
        drain(&mut c);
        c.handle_input(
            now,
            peer(),
            &cancel("+447700900123", "c1@h", "z9hG4bKother"),
        );
        assert_eq!(codes(&drain(&mut c)), [481]);
        c.handle_input(
            now,
            peer(),
            &request("BYE", "+447700900123", "c1@h", "z9hG4bKb", 2, "wrong"),
        );
        assert_eq!(codes(&drain(&mut c)), [481]);
        assert_eq!(c.stats().unknown_transactions, 3);
    }

    #[test]
    fn options_200_other_methods_501_ack_absorbed() {
        let mut c = core();
        let now = Instant::now();
        c.handle_input(
            now,
            peer(),
            &request("OPTIONS", "+447700900123", "o@h", "z9hG4bKo", 1, ""),
        );
        let out = drain(&mut c);
        assert_eq!(codes(&out), [200]);
        let ok = parse(&out[0]);
        assert!(header(&ok, "Allow").is_some_and(|a| a.contains("INVITE")));
        assert!(ok.to_tag.is_some());
        c.handle_input(
            now,
            peer(),
            &request("INFO", "+447700900123", "o@h", "z9hG4bKi", 2, ""),
        );
        assert_eq!(codes(&drain(&mut c)), [501]);
        c.handle_input(
            now,
            peer(),
            &ack("+447700900123", "stray@h", "z9hG4bKx", "t"),
        );
        assert!(drain(&mut c).is_empty());
        let s = c.stats();
        assert_eq!((s.options, s.unsupported, s.acks, s.dialogs), (1, 1, 1, 0));
    }

    #[test]
    fn a_via_without_rport_is_copied_as_it_came() {
        let mut c = core();
        let inv = String::from_utf8(invite("+447700900123", "v@h", "z9hG4bKv"))
            .expect("ascii")
            .replace(";rport;", ";");
        c.handle_input(Instant::now(), peer(), inv.as_bytes());
        let out = drain(&mut c);
        assert_eq!(
            vias(&parse(&out[0]))[0],
            format!("SIP/2.0/UDP {PEER};branch=z9hG4bKv")
        );
    }

    #[test]
    fn garbage_and_responses_are_counted_and_dropped() {
        let mut c = core();
        let now = Instant::now();
        c.handle_input(now, peer(), b"");
        c.handle_input(now, peer(), b"\x00\xff\xfe garbage");
        c.handle_input(
            now,
            peer(),
            b"INVITE sip:x@y SIP/2.0\r\nVia: SIP/2.0/UDP h\r\n\r\n",
        );
        // Every truncation of a real INVITE: no panic, each either parses or is counted.
        let inv = invite("+447700900123", "t@h", "z9hG4bKt");
        for n in 0..inv.len() {
            c.handle_input(now, peer(), &inv[..n]);
        }
        drain(&mut c);
        let ringing = b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKq\r\n\
From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>\r\nCall-ID: q\r\nCSeq: 1 INVITE\r\n\r\n";
        c.handle_input(now, peer(), ringing);
        assert!(drain(&mut c).is_empty());
        let s = c.stats();
        assert!(s.malformed >= 3, "{s:?}");
        assert_eq!(s.stray_responses, 1);
    }

    #[test]
    fn beyond_the_dialog_cap_invites_get_503() {
        let mut c = core().with_max_dialogs(2);
        let now = Instant::now();
        for i in 0..3 {
            c.handle_input(
                now,
                peer(),
                &invite("+447700900123", &format!("cap{i}@h"), "z9hG4bKc"),
            );
        }
        let out = drain(&mut c);
        assert_eq!(codes(&out), [100, 180, 100, 180, 503]);
        assert_eq!(parse(&out[4]).retry_after, Some(5));
        let s = c.stats();
        assert_eq!((s.overloaded, s.dialogs), (1, 2));
    }

    #[test]
    fn uri_user_and_behaviour() {
        assert_eq!(uri_user("sip:+447700900486@h;user=phone"), "+447700900486");
        assert_eq!(uri_user("sip:+447700900486;npdi@h"), "+447700900486");
        assert_eq!(uri_user("tel:+447700900404"), "+447700900404");
        assert_eq!(uri_user("sip:h"), "");
        assert_eq!(
            Behaviour::for_uri("sip:+44-7700-900-503@h"),
            Behaviour::Reject(503)
        );
        assert_eq!(Behaviour::for_uri("sip:+447700900200@h"), Behaviour::Answer);
        assert_eq!(Behaviour::for_uri("sip:+447700900408@h"), Behaviour::Silent);
        assert_eq!(Behaviour::for_uri("sip:486@h"), Behaviour::Ring);
        assert_eq!(Behaviour::for_uri("sip:h"), Behaviour::Ring);
    }

    #[tokio::test]
    async fn spawn_refuses_a_non_loopback_address() {
        let cfg = SandboxConfig {
            bind: "0.0.0.0:0".parse().expect("literal"),
            ..SandboxConfig::default()
        };
        let err = spawn(cfg).await.err().expect("refused");
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert!(err.to_string().contains("0.0.0.0:0"), "{err}");
    }
}
