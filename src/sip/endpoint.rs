//! The flash-call UAC as a pure state machine.
//!
//! Shaped like quinn-proto: no sockets, no clock, no global RNG. The driver
//! feeds datagrams ([`Endpoint::handle_input`]) and the passage of time
//! ([`Endpoint::handle_timeout`]) and drains what the core wants done
//! ([`Endpoint::poll_transmit`], [`Endpoint::poll_event`],
//! [`Endpoint::poll_timeout`]). Because `now` and the RNG are inputs, the
//! RFC 3261 timer schedules are tested as data with a virtual clock.
//!
//! One endpoint holds every call in a slab. A transaction's Via branch encodes
//! the call's slot, so a response is matched to its call without a map lookup
//! (RFC 3261 §17.1.3: top Via branch + CSeq method). All timers sit in one
//! binary heap; stale heap entries are skipped by comparing with the call's
//! own deadline for that timer, which is cheaper than removing them.

use bytes::Bytes;
use rand::RngCore;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::digest;
use super::message::{addr_uri, unfold, Message, Name, ParseError, StartLine};
use super::render::{self, Dialog};

/// RFC 3261 §17 timer values. T1 is the RTT estimate, T2 the cap for
/// non-INVITE retransmission, T4 the time a message may stay in the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerConfig {
    pub t1: Duration,
    pub t2: Duration,
    pub t4: Duration,
}

impl Default for TimerConfig {
    fn default() -> Self {
        TimerConfig {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
        }
    }
}

impl TimerConfig {
    /// Timer B and F: 64·T1.
    pub fn b(&self) -> Duration {
        self.t1 * 64
    }
    /// Timer D: at least 32 s over UDP, to absorb retransmitted finals.
    pub fn d(&self) -> Duration {
        Duration::from_secs(32).max(self.t1 * 64)
    }
}

/// Static settings of the endpoint.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    pub timers: TimerConfig,
    /// Address our SIP socket is bound to: the Via sent-by and Contact.
    pub local: SocketAddr,
    /// Host used in From / P-Asserted-Identity URIs.
    pub public_host: String,
    pub user_agent: String,
    /// Where the RTP sink listens: the SDP offer's connection address.
    pub media: SocketAddr,
}

/// Where the caller number is presented (SPEC §2 `caller_id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CallerId {
    #[default]
    From,
    Pai,
    Both,
}

/// Digest credentials for a trunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// One flash call to place.
#[derive(Debug, Clone)]
pub struct CallRequest {
    pub trunk: SocketAddr,
    /// Host (and port) used in the Request-URI and To, as configured.
    pub trunk_host: String,
    /// Destination number, E.164 with `+`.
    pub to: String,
    /// Caller number shown to the user, E.164 with `+`.
    pub caller: String,
    pub caller_id: CallerId,
    /// How long to let it ring after 180/183 before the CANCEL.
    pub ring: Duration,
    /// No 180/183 by then: CANCEL, outcome `no_ringing`.
    pub ring_timeout: Duration,
    pub credentials: Option<Credentials>,
    /// Opaque to the core; handed back in events.
    pub tag: u64,
}

/// How a flash call ended (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Delivered,
    Answered,
    Busy,
    InvalidNumber,
    Unavailable,
    Rejected,
    TrunkError,
    Failed,
    Timeout,
    NoRinging,
    /// The engine stopped (crash, kill -9) before the call's outcome was
    /// known; set by the durable store at startup. The SIP core never
    /// produces it.
    Interrupted,
}

impl Outcome {
    pub const ALL: [Outcome; 11] = [
        Outcome::Delivered,
        Outcome::Answered,
        Outcome::Busy,
        Outcome::InvalidNumber,
        Outcome::Unavailable,
        Outcome::Rejected,
        Outcome::TrunkError,
        Outcome::Failed,
        Outcome::Timeout,
        Outcome::NoRinging,
        Outcome::Interrupted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Answered => "answered",
            Outcome::Busy => "busy",
            Outcome::InvalidNumber => "invalid_number",
            Outcome::Unavailable => "unavailable",
            Outcome::Rejected => "rejected",
            Outcome::TrunkError => "trunk_error",
            Outcome::Failed => "failed",
            Outcome::Timeout => "timeout",
            Outcome::NoRinging => "no_ringing",
            Outcome::Interrupted => "interrupted",
        }
    }

    /// The inverse of [`Outcome::as_str`] (reading the store back).
    pub fn parse(s: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == s)
    }

    /// SPEC §4 mapping of a final response we did not provoke with a CANCEL.
    pub fn for_final(code: u16) -> Outcome {
        match code {
            200..=299 => Outcome::Answered,
            486 | 600 => Outcome::Busy,
            404 | 484 | 604 => Outcome::InvalidNumber,
            480 | 408 => Outcome::Unavailable,
            403 | 603 => Outcome::Rejected,
            503 => Outcome::TrunkError,
            _ => Outcome::Failed,
        }
    }
}

/// Identifies a call inside one endpoint: slab slot plus generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CallHandle {
    slot: u32,
    gen: u32,
}

/// Everything known about a finished call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallReport {
    pub call: CallHandle,
    pub tag: u64,
    pub trunk: SocketAddr,
    pub outcome: Outcome,
    /// The final response code, when one arrived.
    pub sip_code: Option<u16>,
    pub invited_at: Instant,
    pub first_provisional_at: Option<Instant>,
    pub ringing_at: Option<Instant>,
    pub cancel_at: Option<Instant>,
    pub ended_at: Instant,
    /// Retry-After of a 503, for the trunk's back-off.
    pub retry_after: Option<u32>,
}

impl CallReport {
    /// INVITE -> first 180/183.
    pub fn post_dial_delay(&self) -> Option<Duration> {
        self.ringing_at.map(|r| r - self.invited_at)
    }
    /// 180/183 received -> CANCEL sent.
    pub fn cancel_delay(&self) -> Option<Duration> {
        Some(self.cancel_at? - self.ringing_at?)
    }
}

/// What the core tells its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Every response received for a call, for per-code metrics.
    Response {
        tag: u64,
        trunk: SocketAddr,
        code: u16,
    },
    /// First 180/183.
    Ringing {
        call: CallHandle,
        tag: u64,
        at: Instant,
    },
    /// The call's outcome; emitted once per call.
    Ended(CallReport),
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub dest: SocketAddr,
    pub payload: Bytes,
}

/// Counters of what did not fit a call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub parse_errors: u64,
    pub stray_responses: u64,
    pub requests_answered: u64,
}

/// Result of feeding one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// A response that matched a call.
    Response,
    /// A request from the peer, answered (or an ACK, absorbed).
    Request,
    /// A response for no transaction of ours: ignored and counted.
    Stray,
    /// Not SIP: dropped and counted.
    Malformed(ParseError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
enum Timer {
    /// INVITE retransmission (Timer A).
    Retransmit = 0,
    /// INVITE gives up (Timer B).
    InviteTimeout,
    /// End of the `ring_ms` hold.
    RingHold,
    /// No 180/183 in `ring_timeout_ms`.
    RingTimeout,
    /// CANCEL retransmission (Timer E).
    CancelRetransmit,
    /// CANCEL gives up (Timer F).
    CancelTimeout,
    /// No final response 64·T1 after the CANCEL: give the INVITE up.
    FinalWait,
    ByeRetransmit,
    ByeTimeout,
    /// Keep state to answer retransmitted finals (Timer D, or 64·T1 for 2xx).
    Linger,
}
const TIMERS: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InviteState {
    Calling,
    Proceeding,
    /// Non-2xx final ACKed; waiting out Timer D.
    Completed,
    /// 2xx ACKed, BYE sent.
    Accepted,
    /// Timer B fired; no response has arrived.
    TimedOut,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CancelReason {
    Rang,
    NoRinging,
    Shutdown,
}

/// Branch kinds: the last character of a branch.
const KIND_INVITE: u8 = b'i';
const KIND_INVITE_AUTH: u8 = b'j';
const KIND_ACK2XX: u8 = b'a';
const KIND_BYE: u8 = b'b';

#[derive(Debug)]
struct NonInvite {
    payload: Bytes,
    dest: SocketAddr,
    interval: Duration,
    done: bool,
}

#[derive(Debug)]
struct Call {
    gen: u32,
    tag: u64,
    trunk: SocketAddr,
    dialog: Dialog,
    credentials: Option<Credentials>,
    ring: Duration,
    cseq: u32,
    /// Branch kind of the live INVITE transaction.
    invite_kind: u8,
    state: InviteState,
    /// The INVITE, kept only while Timer A may resend it.
    invite: Option<Bytes>,
    retransmit_interval: Duration,
    rang: bool,
    cancel_wanted: Option<CancelReason>,
    cancel: Option<NonInvite>,
    bye: Option<NonInvite>,
    /// To of the final response (with its tag), for re-sending the ACK.
    final_to: Option<Vec<u8>>,
    final_code: Option<u16>,
    /// 2xx ACK, re-sent for each retransmitted 2xx.
    ack_2xx: Option<(SocketAddr, Bytes)>,
    /// The ACK for a 401/407 answered by the auth retry.
    auth_ack: Option<Bytes>,
    invited_at: Instant,
    first_provisional_at: Option<Instant>,
    ringing_at: Option<Instant>,
    cancel_at: Option<Instant>,
    ended: bool,
    deadlines: [Option<Instant>; TIMERS],
}

/// The flash-call user agent client.
pub struct Endpoint<R: RngCore> {
    cfg: EndpointConfig,
    rng: R,
    /// Random per endpoint: makes our branches and tags unique across
    /// restarts and lets us reject responses meant for another process.
    salt: u32,
    via_prefix: String,
    sdp: Bytes,
    slots: Vec<Option<Call>>,
    free: Vec<u32>,
    next_gen: u32,
    heap: BinaryHeap<Reverse<(Instant, u32, u32, Timer)>>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    active: usize,
    stats: Stats,
}

impl<R: RngCore> Endpoint<R> {
    pub fn new(cfg: EndpointConfig, mut rng: R) -> Self {
        let salt = rng.next_u32();
        // SocketAddr's Display brackets IPv6 literals, as a SIP URI wants.
        let via_prefix = format!("SIP/2.0/UDP {};rport", cfg.local);
        let sdp = render::sdp_offer(cfg.media, u64::from(rng.next_u32()));
        Endpoint {
            cfg,
            rng,
            salt,
            via_prefix,
            sdp,
            slots: Vec::new(),
            free: Vec::new(),
            next_gen: 1,
            heap: BinaryHeap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            active: 0,
            stats: Stats::default(),
        }
    }

    pub fn config(&self) -> &EndpointConfig {
        &self.cfg
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Calls whose outcome is not known yet.
    pub fn active_calls(&self) -> usize {
        self.active
    }

    /// Calls holding state, including those lingering after their outcome.
    pub fn calls_in_memory(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Sends the INVITE for a new call and arms its timers.
    pub fn start_call(&mut self, now: Instant, req: CallRequest) -> CallHandle {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        let handle = CallHandle { slot, gen };
        let from_tag = self.token(handle, b't');
        let call_id = format!(
            "{:016x}{:016x}@{}",
            self.rng.next_u64(),
            self.rng.next_u64(),
            self.cfg.public_host
        );
        let uri_of = |num: &str, host: &str| format!("sip:{num}@{host};user=phone");
        let caller_uri = uri_of(&req.caller, &self.cfg.public_host);
        let from = match req.caller_id {
            CallerId::From | CallerId::Both => format!("<{caller_uri}>;tag={from_tag}"),
            // With the number only in PAI, From names the engine, not a number.
            CallerId::Pai => format!("<sip:flashcall@{}>;tag={from_tag}", self.cfg.public_host),
        };
        let pai = matches!(req.caller_id, CallerId::Pai | CallerId::Both)
            .then(|| format!("<{caller_uri}>"));
        let request_uri = uri_of(&req.to, &req.trunk_host);
        let dialog = Dialog {
            to: format!("<{request_uri}>"),
            request_uri,
            from,
            call_id,
            via_prefix: self.via_prefix.clone(),
            contact: format!("<sip:{}@{}>", req.caller, self.cfg.local),
            pai,
            user_agent: self.cfg.user_agent.clone(),
        };
        let cseq = 1;
        let branch = self.branch(handle, KIND_INVITE);
        let invite = render::invite(&dialog, &branch, cseq, None, &self.sdp);
        self.transmits.push_back(Transmit {
            dest: req.trunk,
            payload: invite.clone(),
        });
        let t1 = self.cfg.timers.t1;
        let call = Call {
            gen,
            tag: req.tag,
            trunk: req.trunk,
            dialog,
            credentials: req.credentials,
            ring: req.ring,
            cseq,
            invite_kind: KIND_INVITE,
            state: InviteState::Calling,
            invite: Some(invite),
            retransmit_interval: t1,
            rang: false,
            cancel_wanted: None,
            cancel: None,
            bye: None,
            final_to: None,
            final_code: None,
            ack_2xx: None,
            auth_ack: None,
            invited_at: now,
            first_provisional_at: None,
            ringing_at: None,
            cancel_at: None,
            ended: false,
            deadlines: [None; TIMERS],
        };
        self.slots[slot as usize] = Some(call);
        self.active += 1;
        self.arm(handle, Timer::Retransmit, now + t1);
        self.arm(handle, Timer::InviteTimeout, now + self.cfg.timers.b());
        self.arm(handle, Timer::RingTimeout, now + req.ring_timeout);
        handle
    }

    /// Stops a call early (shutdown): CANCEL now if a provisional has
    /// arrived, else as soon as one does; Timer B bounds the wait.
    pub fn cancel_call(&mut self, now: Instant, handle: CallHandle) {
        if self
            .call(handle)
            .is_some_and(|c| !c.ended && c.cancel_wanted.is_none())
        {
            self.want_cancel(now, handle, CancelReason::Shutdown);
        }
    }

    /// Handles of calls whose outcome is not known yet.
    pub fn active_handles(&self) -> Vec<CallHandle> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                s.as_ref().filter(|c| !c.ended).map(|c| CallHandle {
                    slot: i as u32,
                    gen: c.gen,
                })
            })
            .collect()
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The earliest instant at which [`Endpoint::handle_timeout`] has work.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, slot, gen, timer))) = self.heap.peek().copied() {
            if self.deadline(slot, gen, timer) == Some(at) {
                return Some(at);
            }
            self.heap.pop();
        }
        None
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((at, slot, gen, timer))) = self.heap.peek().copied() {
            if at > now {
                break;
            }
            self.heap.pop();
            if self.deadline(slot, gen, timer) != Some(at) {
                continue;
            }
            let handle = CallHandle { slot, gen };
            if let Some(c) = self.call_mut(handle) {
                c.deadlines[timer as usize] = None;
            }
            self.on_timer(now, handle, timer);
        }
    }

    /// Feeds one datagram from `from`.
    pub fn handle_input(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) -> Input {
        let msg = match Message::parse(datagram) {
            Ok(m) => m,
            Err(e) => {
                self.stats.parse_errors += 1;
                return Input::Malformed(e);
            }
        };
        match msg.start {
            StartLine::Response { code, .. } => {
                if self.on_response(now, code, &msg) {
                    Input::Response
                } else {
                    self.stats.stray_responses += 1;
                    Input::Stray
                }
            }
            StartLine::Request { method, .. } => {
                self.on_request(from, method, &msg);
                Input::Request
            }
        }
    }

    // ----- responses -------------------------------------------------------

    fn on_response(&mut self, now: Instant, code: u16, msg: &Message<'_>) -> bool {
        let Some((handle, kind)) = msg.top_via_branch.and_then(|b| self.parse_branch(b)) else {
            return false;
        };
        let Some(call) = self.call(handle) else {
            return false;
        };
        if msg.call_id != call.dialog.call_id {
            return false;
        }
        let (tag, trunk, invite_kind, cseq) = (call.tag, call.trunk, call.invite_kind, call.cseq);
        let method = msg.cseq.method;
        // The Response event goes before any event the response causes (a
        // final's Ended), so the application still knows the call by its
        // tag when it counts the code.
        let first_event = self.events.len();
        let matched = match kind {
            k if k == invite_kind && method == "INVITE" && msg.cseq.number == cseq => {
                self.on_invite_response(now, handle, code, msg);
                true
            }
            k if k == invite_kind && method == "CANCEL" => {
                self.on_cancel_response(now, handle, code);
                true
            }
            KIND_INVITE if invite_kind == KIND_INVITE_AUTH && method == "INVITE" => {
                // A retransmission of the 401/407 we already answered.
                if code >= 300 {
                    if let Some(ack) = self.call(handle).and_then(|c| c.auth_ack.clone()) {
                        self.transmits.push_back(Transmit {
                            dest: trunk,
                            payload: ack,
                        });
                    }
                }
                true
            }
            KIND_BYE if method == "BYE" => {
                let t2 = self.cfg.timers.t2;
                if let Some(c) = self.call_mut(handle) {
                    if let Some(bye) = c.bye.as_mut() {
                        if code >= 200 {
                            bye.done = true;
                        } else {
                            bye.interval = t2;
                        }
                    }
                }
                if code >= 200 {
                    self.disarm(handle, Timer::ByeRetransmit);
                    self.disarm(handle, Timer::ByeTimeout);
                }
                true
            }
            _ => false,
        };
        if matched {
            self.events
                .insert(first_event, Event::Response { tag, trunk, code });
        }
        matched
    }

    fn on_invite_response(&mut self, now: Instant, h: CallHandle, code: u16, msg: &Message<'_>) {
        let Some(c) = self.call_mut(h) else { return };
        match (code, c.state) {
            (100..=199, InviteState::Calling | InviteState::Proceeding | InviteState::TimedOut) => {
                let was_timed_out = c.state == InviteState::TimedOut;
                c.state = InviteState::Proceeding;
                c.invite = None;
                c.first_provisional_at.get_or_insert(now);
                let ringing = (code == 180 || code == 183) && !c.rang;
                if ringing {
                    c.rang = true;
                    c.ringing_at = Some(now);
                }
                let (ring, tag, pending) = (c.ring, c.tag, c.cancel_wanted);
                self.disarm(h, Timer::Retransmit);
                self.disarm(h, Timer::InviteTimeout);
                if was_timed_out {
                    // Timer B already gave the outcome, yet the phone now
                    // rings: cancel so it does not ring on unattended.
                    self.want_cancel(now, h, CancelReason::Shutdown);
                    return;
                }
                if ringing {
                    self.disarm(h, Timer::RingTimeout);
                    self.events.push_back(Event::Ringing {
                        call: h,
                        tag,
                        at: now,
                    });
                    if pending.is_none() {
                        if ring.is_zero() {
                            self.want_cancel(now, h, CancelReason::Rang);
                        } else {
                            self.arm(h, Timer::RingHold, now + ring);
                        }
                    }
                }
                if let Some(reason) = pending {
                    self.send_cancel(now, h, reason);
                }
            }
            (100..=199, _) => {}
            (200..=299, InviteState::Accepted) => {
                if let Some((dest, ack)) = c.ack_2xx.clone() {
                    self.transmits.push_back(Transmit { dest, payload: ack });
                }
            }
            (200..=299, _) => self.on_2xx(now, h, code, msg),
            (300..=699, InviteState::Completed) => self.send_final_ack(h),
            (401 | 407, InviteState::Calling | InviteState::Proceeding)
                if c.credentials.is_some() && c.invite_kind == KIND_INVITE =>
            {
                self.auth_retry(now, h, code, msg)
            }
            (300..=699, InviteState::Accepted) => {}
            (300..=699, _) => {
                c.state = InviteState::Completed;
                c.final_code = Some(code);
                let mut to = Vec::with_capacity(msg.to.len());
                unfold(msg.to, &mut to);
                c.final_to = Some(to);
                c.invite = None;
                let outcome = match (code, c.cancel_wanted) {
                    (487, Some(CancelReason::Rang)) => Outcome::Delivered,
                    (487, Some(CancelReason::NoRinging)) => Outcome::NoRinging,
                    (487, Some(CancelReason::Shutdown)) if c.rang => Outcome::Delivered,
                    _ => Outcome::for_final(code),
                };
                self.send_final_ack(h);
                for t in [
                    Timer::Retransmit,
                    Timer::InviteTimeout,
                    Timer::RingHold,
                    Timer::RingTimeout,
                    Timer::FinalWait,
                ] {
                    self.disarm(h, t);
                }
                let retry_after = if code == 503 { msg.retry_after } else { None };
                self.end(now, h, outcome, Some(code), retry_after);
                self.arm(h, Timer::Linger, now + self.cfg.timers.d());
            }
            _ => {}
        }
    }

    /// 2xx: the callee answered before the CANCEL won (or the network gives
    /// false answer supervision). ACK it to the Contact and hang up at once.
    fn on_2xx(&mut self, now: Instant, h: CallHandle, code: u16, msg: &Message<'_>) {
        let mut to = Vec::with_capacity(msg.to.len());
        unfold(msg.to, &mut to);
        // The route set is the Record-Route values, reversed (§12.1.2).
        let mut routes: Vec<String> = msg
            .values(Name::RecordRoute)
            .map(|v| {
                let mut o = Vec::new();
                unfold(v, &mut o);
                String::from_utf8_lossy(&o).into_owned()
            })
            .collect();
        routes.reverse();
        let ack_branch = self.branch(h, KIND_ACK2XX);
        let bye_branch = self.branch(h, KIND_BYE);
        let t1 = self.cfg.timers.t1;
        let Some(c) = self.call_mut(h) else { return };
        // A Contact we could not put on a request line (spaces, controls,
        // not a URI) would make the ACK and BYE unparsable: fall back to the
        // Request-URI, which reaches the callee through the trunk.
        let target = msg
            .contact_uri
            .filter(|u| is_sendable_uri(u))
            .map(str::to_owned)
            .unwrap_or_else(|| c.dialog.request_uri.clone());
        // Loose routing: the request goes to the first route, else to the
        // Contact. Names we cannot resolve without DNS fall back to the trunk.
        let next_hop = routes
            .first()
            .and_then(|r| addr_uri(r.as_bytes()))
            .or(Some(target.as_str()))
            .and_then(uri_socket_addr)
            .unwrap_or(c.trunk);
        let ack = render::ack(&c.dialog, &target, &ack_branch, c.cseq, &to, &routes);
        let bye = render::bye(&c.dialog, &target, &bye_branch, c.cseq + 1, &to, &routes);
        c.state = InviteState::Accepted;
        c.invite = None;
        c.final_code = Some(code);
        c.ack_2xx = Some((next_hop, ack.clone()));
        c.bye = Some(NonInvite {
            payload: bye.clone(),
            dest: next_hop,
            interval: t1,
            done: false,
        });
        // The CANCEL, if any, no longer matters: the call is up.
        c.cancel = None;
        self.transmits.push_back(Transmit {
            dest: next_hop,
            payload: ack,
        });
        self.transmits.push_back(Transmit {
            dest: next_hop,
            payload: bye,
        });
        for t in [
            Timer::Retransmit,
            Timer::InviteTimeout,
            Timer::RingHold,
            Timer::RingTimeout,
            Timer::CancelRetransmit,
            Timer::CancelTimeout,
            Timer::FinalWait,
        ] {
            self.disarm(h, t);
        }
        self.arm(h, Timer::ByeRetransmit, now + t1);
        self.arm(h, Timer::ByeTimeout, now + self.cfg.timers.b());
        self.arm(h, Timer::Linger, now + self.cfg.timers.b());
        self.end(now, h, Outcome::Answered, Some(code), None);
    }

    /// 401/407: ACK the challenge, then one new INVITE with credentials,
    /// CSeq+1 and a new branch (RFC 3261 §22.2).
    fn auth_retry(&mut self, now: Instant, h: CallHandle, code: u16, msg: &Message<'_>) {
        let wanted = if code == 401 {
            Name::WwwAuthenticate
        } else {
            Name::ProxyAuthenticate
        };
        let challenge = digest::choose(
            msg.values(wanted)
                .filter_map(|v| std::str::from_utf8(v).ok()),
        );
        let cnonce = format!("{:016x}", self.rng.next_u64());
        let old_branch = self.branch(h, KIND_INVITE);
        let new_branch = self.branch(h, KIND_INVITE_AUTH);
        let t1 = self.cfg.timers.t1;
        let sdp = self.sdp.clone();
        let Some(c) = self.call_mut(h) else { return };
        let mut to = Vec::with_capacity(msg.to.len());
        unfold(msg.to, &mut to);
        let ack = render::ack(
            &c.dialog,
            &c.dialog.request_uri,
            &old_branch,
            c.cseq,
            &to,
            &[],
        );
        c.auth_ack = Some(ack.clone());
        let trunk = c.trunk;
        self.transmits.push_back(Transmit {
            dest: trunk,
            payload: ack,
        });
        let Some(c) = self.call_mut(h) else { return };
        let (Some(challenge), Some(creds)) = (challenge, c.credentials.as_ref()) else {
            // No usable challenge: the final stands as it is.
            c.invite_kind = KIND_INVITE_AUTH; // old branch now only re-ACKs
            c.state = InviteState::Completed;
            c.final_code = Some(code);
            c.final_to = Some(to);
            self.end(now, h, Outcome::Failed, Some(code), None);
            self.arm(h, Timer::Linger, now + self.cfg.timers.d());
            return;
        };
        let header = if code == 401 {
            "Authorization"
        } else {
            "Proxy-Authorization"
        };
        let value = digest::authorization(
            &challenge,
            &creds.username,
            &creds.password,
            "INVITE",
            &c.dialog.request_uri,
            &cnonce,
            1,
        );
        c.cseq += 1;
        c.invite_kind = KIND_INVITE_AUTH;
        c.state = InviteState::Calling;
        c.retransmit_interval = t1;
        let invite = render::invite(&c.dialog, &new_branch, c.cseq, Some((header, &value)), &sdp);
        c.invite = Some(invite.clone());
        self.transmits.push_back(Transmit {
            dest: trunk,
            payload: invite,
        });
        self.arm(h, Timer::Retransmit, now + t1);
        self.arm(h, Timer::InviteTimeout, now + self.cfg.timers.b());
    }

    fn on_cancel_response(&mut self, _now: Instant, h: CallHandle, code: u16) {
        let t2 = self.cfg.timers.t2;
        let Some(c) = self.call_mut(h) else { return };
        let Some(cancel) = c.cancel.as_mut() else {
            return;
        };
        if code < 200 {
            // §17.1.2.2: a provisional moves the retransmit interval to T2.
            cancel.interval = t2;
            return;
        }
        cancel.done = true;
        // Never sent again: free it now rather than after Timer D, so the
        // next calls reuse the memory instead of faulting in fresh pages.
        cancel.payload = Bytes::new();
        self.disarm(h, Timer::CancelRetransmit);
        self.disarm(h, Timer::CancelTimeout);
    }

    // ----- requests from the peer -----------------------------------------

    fn on_request(&mut self, from: SocketAddr, method: &str, msg: &Message<'_>) {
        if method == "ACK" {
            return; // never answered
        }
        let known_dialog = msg
            .to_tag
            .and_then(|t| self.parse_token(t, b't'))
            .is_some_and(|h| {
                self.call(h)
                    .is_some_and(|c| c.dialog.call_id == msg.call_id)
            });
        let tag = format!("{:08x}", self.salt);
        let allow = [("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS")];
        let reply = match method {
            "OPTIONS" => render::response(
                msg,
                200,
                "OK",
                &tag,
                &[
                    ("Allow", allow[0].1),
                    ("Accept", "application/sdp"),
                    ("User-Agent", self.cfg.user_agent.as_str()),
                ],
            ),
            "BYE" if known_dialog => render::response(msg, 200, "OK", &tag, &[]),
            _ if msg.to_tag.is_some() && !known_dialog => {
                render::response(msg, 481, "Call/Transaction Does Not Exist", &tag, &[])
            }
            "CANCEL" => render::response(msg, 481, "Call/Transaction Does Not Exist", &tag, &[]),
            _ => render::response(msg, 501, "Not Implemented", &tag, &allow),
        };
        self.stats.requests_answered += 1;
        self.transmits.push_back(Transmit {
            dest: from,
            payload: reply,
        });
    }

    // ----- timers ----------------------------------------------------------

    fn on_timer(&mut self, now: Instant, h: CallHandle, timer: Timer) {
        let t2 = self.cfg.timers.t2;
        let Some(c) = self.call_mut(h) else { return };
        match timer {
            Timer::Retransmit => {
                if let (InviteState::Calling, Some(invite)) = (c.state, c.invite.clone()) {
                    // Timer A doubles with no cap (§17.1.1.2).
                    c.retransmit_interval *= 2;
                    let (dest, next) = (c.trunk, now + c.retransmit_interval);
                    self.transmits.push_back(Transmit {
                        dest,
                        payload: invite,
                    });
                    self.arm(h, Timer::Retransmit, next);
                }
            }
            Timer::InviteTimeout => {
                if c.state == InviteState::Calling {
                    c.state = InviteState::TimedOut;
                    c.invite = None;
                    self.disarm(h, Timer::Retransmit);
                    self.disarm(h, Timer::RingTimeout);
                    self.end(now, h, Outcome::Timeout, None, None);
                    // Linger so a late provisional can still be cancelled.
                    self.arm(h, Timer::Linger, now + self.cfg.timers.d());
                }
            }
            Timer::RingHold => self.want_cancel(now, h, CancelReason::Rang),
            Timer::RingTimeout => {
                if !c.rang && c.cancel_wanted.is_none() {
                    self.want_cancel(now, h, CancelReason::NoRinging);
                }
            }
            Timer::CancelRetransmit => {
                if let Some(cancel) = c.cancel.as_mut().filter(|x| !x.done) {
                    let (dest, payload) = (cancel.dest, cancel.payload.clone());
                    // Timer E: doubling, capped at T2 (§17.1.2.2).
                    cancel.interval = (cancel.interval * 2).min(t2);
                    let next = now + cancel.interval;
                    self.transmits.push_back(Transmit { dest, payload });
                    self.arm(h, Timer::CancelRetransmit, next);
                }
            }
            Timer::CancelTimeout => {
                if let Some(cancel) = c.cancel.as_mut() {
                    cancel.done = true;
                }
                self.disarm(h, Timer::CancelRetransmit);
            }
            Timer::FinalWait => {
                // §9.1: no final response 64·T1 after the CANCEL. If the phone
                // rang it was delivered; the final simply never came.
                let outcome = match c.cancel_wanted {
                    Some(CancelReason::NoRinging) => Outcome::NoRinging,
                    _ if c.rang => Outcome::Delivered,
                    _ => Outcome::Failed,
                };
                self.end(now, h, outcome, None, None);
                self.free(h);
            }
            Timer::ByeRetransmit => {
                if let Some(bye) = c.bye.as_mut().filter(|x| !x.done) {
                    let (dest, payload) = (bye.dest, bye.payload.clone());
                    bye.interval = (bye.interval * 2).min(t2);
                    let next = now + bye.interval;
                    self.transmits.push_back(Transmit { dest, payload });
                    self.arm(h, Timer::ByeRetransmit, next);
                }
            }
            Timer::ByeTimeout => {
                if let Some(bye) = c.bye.as_mut() {
                    bye.done = true;
                }
                self.disarm(h, Timer::ByeRetransmit);
            }
            Timer::Linger => self.free(h),
        }
    }

    fn want_cancel(&mut self, now: Instant, h: CallHandle, reason: CancelReason) {
        let Some(c) = self.call_mut(h) else { return };
        if c.cancel_wanted.is_some()
            || matches!(c.state, InviteState::Completed | InviteState::Accepted)
        {
            return;
        }
        c.cancel_wanted = Some(reason);
        self.disarm(h, Timer::RingHold);
        self.disarm(h, Timer::RingTimeout);
        if self
            .call(h)
            .is_some_and(|c| c.state == InviteState::Proceeding)
        {
            self.send_cancel(now, h, reason);
        }
        // In Calling, RFC 3261 §9.1 forbids a CANCEL before a provisional;
        // the first provisional sends it (see on_invite_response).
    }

    fn send_cancel(&mut self, now: Instant, h: CallHandle, reason: CancelReason) {
        let branch = {
            let Some(c) = self.call(h) else { return };
            if c.cancel.is_some() {
                return;
            }
            self.branch(h, c.invite_kind)
        };
        let t1 = self.cfg.timers.t1;
        let Some(c) = self.call_mut(h) else { return };
        c.cancel_wanted = Some(reason);
        let payload = render::cancel(&c.dialog, &branch, c.cseq);
        c.cancel = Some(NonInvite {
            payload: payload.clone(),
            dest: c.trunk,
            interval: t1,
            done: false,
        });
        c.cancel_at = Some(now);
        let dest = c.trunk;
        self.transmits.push_back(Transmit { dest, payload });
        self.arm(h, Timer::CancelRetransmit, now + t1);
        self.arm(h, Timer::CancelTimeout, now + self.cfg.timers.b());
        self.arm(h, Timer::FinalWait, now + self.cfg.timers.b());
    }

    fn send_final_ack(&mut self, h: CallHandle) {
        let branch = match self.call(h) {
            Some(c) => self.branch(h, c.invite_kind),
            None => return,
        };
        let Some(c) = self.call(h) else { return };
        let Some(to) = c.final_to.as_deref() else {
            return;
        };
        let payload = render::ack(&c.dialog, &c.dialog.request_uri, &branch, c.cseq, to, &[]);
        let dest = c.trunk;
        self.transmits.push_back(Transmit { dest, payload });
    }

    fn end(
        &mut self,
        now: Instant,
        h: CallHandle,
        outcome: Outcome,
        sip_code: Option<u16>,
        retry_after: Option<u32>,
    ) {
        let Some(c) = self.call_mut(h) else { return };
        if c.ended {
            return;
        }
        c.ended = true;
        let report = CallReport {
            call: h,
            tag: c.tag,
            trunk: c.trunk,
            outcome,
            sip_code,
            invited_at: c.invited_at,
            first_provisional_at: c.first_provisional_at,
            ringing_at: c.ringing_at,
            cancel_at: c.cancel_at,
            ended_at: now,
            retry_after,
        };
        self.active -= 1;
        self.events.push_back(Event::Ended(report));
    }

    fn free(&mut self, h: CallHandle) {
        if self.call(h).is_some() {
            if self.call(h).is_some_and(|c| !c.ended) {
                self.active -= 1;
            }
            self.slots[h.slot as usize] = None;
            self.free.push(h.slot);
        }
    }

    // ----- slab, timers, tokens -------------------------------------------

    fn call(&self, h: CallHandle) -> Option<&Call> {
        self.slots
            .get(h.slot as usize)?
            .as_ref()
            .filter(|c| c.gen == h.gen)
    }

    fn call_mut(&mut self, h: CallHandle) -> Option<&mut Call> {
        self.slots
            .get_mut(h.slot as usize)?
            .as_mut()
            .filter(|c| c.gen == h.gen)
    }

    fn deadline(&self, slot: u32, gen: u32, timer: Timer) -> Option<Instant> {
        self.call(CallHandle { slot, gen })?.deadlines[timer as usize]
    }

    fn arm(&mut self, h: CallHandle, timer: Timer, at: Instant) {
        if let Some(c) = self.call_mut(h) {
            c.deadlines[timer as usize] = Some(at);
            self.heap.push(Reverse((at, h.slot, h.gen, timer)));
        }
    }

    fn disarm(&mut self, h: CallHandle, timer: Timer) {
        if let Some(c) = self.call_mut(h) {
            c.deadlines[timer as usize] = None;
        }
    }

    /// `z9hG4bK` + salt + slot + generation + kind: RFC 3261 magic cookie,
    /// unique per transaction, and decodable back to the call.
    fn branch(&self, h: CallHandle, kind: u8) -> String {
        format!("z9hG4bK{}", self.token(h, kind))
    }

    fn token(&self, h: CallHandle, kind: u8) -> String {
        format!(
            "{:08x}{:08x}{:08x}{}",
            self.salt, h.slot, h.gen, kind as char
        )
    }

    fn parse_branch(&self, branch: &str) -> Option<(CallHandle, u8)> {
        let rest = branch.strip_prefix("z9hG4bK")?;
        let kind = *rest.as_bytes().last()?;
        self.parse_token(rest, kind).map(|h| (h, kind))
    }

    fn parse_token(&self, token: &str, kind: u8) -> Option<CallHandle> {
        let b = token.as_bytes();
        if b.len() != 25 || b[24] != kind {
            return None;
        }
        let hex = |s: &[u8]| u32::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok();
        if hex(&b[0..8])? != self.salt {
            return None;
        }
        Some(CallHandle {
            slot: hex(&b[8..16])?,
            gen: hex(&b[16..24])?,
        })
    }
}

/// The socket address of a SIP URI whose host is an IP literal (rsip parses
/// URIs correctly; it is the header grammar it is weak on).
fn uri_socket_addr(uri: &str) -> Option<SocketAddr> {
    let parsed = rsip::Uri::try_from(uri).ok()?;
    parsed.host_with_port.try_into().ok()
}

/// Whether a URI can stand on a request line: a scheme and no whitespace or
/// control characters.
fn is_sendable_uri(uri: &str) -> bool {
    uri.contains(':')
        && !uri
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
}
