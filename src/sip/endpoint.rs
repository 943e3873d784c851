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
//! (RFC 3261 §17.1.3: top Via branch + CSeq method).
//!
//! A call whose INVITE got a non-2xx final (the flash call's 487) shrinks to
//! a [`Tomb`] for Timer D: about 120 bytes inline in the slab, no heap
//! memory, yet enough to ACK a retransmitted final again (the ACK is
//! re-rendered with the retransmission's To, as §17.1.1.3 asks), absorb a
//! late answer to the CANCEL or a late provisional, and even take the call
//! up again for a 2xx from a forked leg. Keeping the whole call for 32 s
//! meant ~130,000 calls' buffers alive at 4,000 calls/s, and page faults for
//! fresh memory on every call; now the live part of a call is freed when it
//! ends and the next call reuses it.
//!
//! Requests are rendered from the call's compact ids each time they are sent
//! (a retransmission renders the same bytes), so no message buffer outlives
//! its send, except the INVITE carrying credentials, whose digest is not
//! recomputed.
//!
//! Timers: each call has at most one entry in the [`TimerQueue`], at its
//! earliest deadline (`Call::queued`); disarming only clears the call's own
//! deadline, and an entry that fires early is moved to the call's next
//! deadline. So a flash call costs two queue entries in all instead of one per
//! armed timer.

use bytes::Bytes;
use rand::RngCore;
use std::cell::Cell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::digest;
use super::ids::{self, Text};
use super::message::{addr_uri, unfold, Message, Name, ParseError, StartLine};
use super::render::{self, Dialog, Local, Target};
use super::timers::TimerQueue;

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
    /// Address our SIP socket is bound to: the Via sent-by and Contact,
    /// unless `sent_by` says otherwise.
    pub local: SocketAddr,
    /// `host:port` for Via and Contact in place of `local` (see
    /// `engine::sent_by`); `None` writes `local`.
    pub sent_by: Option<String>,
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
    /// The engine stopped before the call's outcome was known: set by the
    /// durable store at startup after a crash or kill -9, and by the
    /// driver at shutdown for a call it did not place. The SIP core never
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
    /// The CANCEL went out because the phone rang (not for the ring
    /// timeout or a shutdown): only then is 180/183 -> CANCEL the engine's
    /// reaction time.
    pub cancelled_for_ringing: bool,
}

impl CallReport {
    /// INVITE -> first 180/183.
    pub fn post_dial_delay(&self) -> Option<Duration> {
        self.ringing_at.map(|r| r - self.invited_at)
    }
    /// 180/183 received -> CANCEL sent, for a CANCEL the ringing caused.
    /// `None` otherwise: a call cancelled for `no_ringing` that rang late
    /// (the pending CANCEL then goes out at once, or went before) has no
    /// such delay, and a 0 in the histogram would flatter it.
    pub fn cancel_delay(&self) -> Option<Duration> {
        if !self.cancelled_for_ringing {
            return None;
        }
        self.cancel_at?.checked_duration_since(self.ringing_at?)
    }
}

/// What the core tells its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Every response received for a call, for per-code metrics (the
    /// call's tag names its trunk too, after the call has its outcome).
    Response { tag: u64, code: u16 },
    /// First 180/183.
    Ringing {
        call: CallHandle,
        tag: u64,
        at: Instant,
    },
    /// The call's outcome; emitted once per call.
    Ended(CallReport),
    /// A 503 with Retry-After for a call that already had its outcome
    /// (Timer B gave `timeout`, then the slow trunk's 503 came): the trunk
    /// still asks for that much rest (RFC 3261 §21.5.4), which the outcome
    /// could no longer carry.
    TrunkRetryAfter { tag: u64, secs: u32 },
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
    /// Responses to a finished call, taken by its tombstone: retransmitted
    /// finals (ACKed again), late answers to the CANCEL, late provisionals.
    pub late_responses: u64,
    /// Calls ended `trunk_error` because the transport reported their
    /// trunk unreachable ([`Endpoint::transport_failed`]).
    pub transport_failures: u64,
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
/// Index -> timer, for firing a call's due deadlines in order.
const ALL_TIMERS: [Timer; TIMERS] = [
    Timer::Retransmit,
    Timer::InviteTimeout,
    Timer::RingHold,
    Timer::RingTimeout,
    Timer::CancelRetransmit,
    Timer::CancelTimeout,
    Timer::FinalWait,
    Timer::ByeRetransmit,
    Timer::ByeTimeout,
    Timer::Linger,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InviteState {
    Calling,
    Proceeding,
    /// Non-2xx final ACKed; waiting out Timer D. A call in this state is
    /// a [`Tomb`] except for the instant between the ACK and the compaction,
    /// and after a tombstone was taken up again by a 2xx.
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
/// The ACK and the BYE to an answered leg past [`FORK_LEGS`] more: sent
/// once per copy of its 2xx, with no transaction kept, on branches that
/// all such legs share (a tenth answered leg is not worth a table).
const KIND_ACK_FORK: u8 = b'9';
const KIND_BYE_FORK: u8 = b'f';
/// The BYE resent with credentials after a 401/407.
const KIND_BYE_AUTH: u8 = b'g';
/// Branch kinds of the ACK, the BYE and the BYE with credentials of each
/// further answered leg of a forked call, up to [`FORK_LEGS`]: each such
/// leg's requests are transactions of their own (RFC 3261 §8.1.1.7: a
/// branch is unique per transaction), so its 200 or 401 is never taken
/// for another leg's.
/// Digits and lower case only, none of the kinds above, so no two kinds
/// fold together in an element that lower-cases branches.
const FORK_ACK_KINDS: &[u8; FORK_LEGS] = b"12345678";
const FORK_BYE_KINDS: &[u8; FORK_LEGS] = b"klmnopqr";
const FORK_AUTH_KINDS: &[u8; FORK_LEGS] = b"cdehsuvw";
/// Answered legs after the first that get a BYE transaction of their own
/// (Timer E, Timer F, a digest retry). Parallel ringing answers on two legs
/// at most in practice; past this a leg's 2xx gets an ACK and a one-shot
/// BYE per copy.
const FORK_LEGS: usize = 8;
/// The kind byte of our From tag.
const KIND_TAG: u8 = b't';

/// A CANCEL in progress. Its bytes are rendered again for each
/// retransmission rather than kept.
#[derive(Debug)]
struct CancelTx {
    interval: Duration,
    done: bool,
}

/// An answered leg (rare: kept as sent): the ACK of its dialog, sent
/// again for each copy of its 2xx, and the BYE transaction that hangs it
/// up (Timer E doubling to T2, Timer F at 64·T1, RFC 3261 §17.1.2.2).
#[derive(Debug)]
struct Leg {
    /// Its ACK and BYE, where they go and what they were written from;
    /// `dialog.bye` is the BYE as last sent (with credentials after a
    /// challenge).
    dialog: DialogRequests,
    /// Branch kinds of this leg's BYE and of its resend with credentials.
    bye_kind: u8,
    auth_kind: u8,
    interval: Duration,
    /// Timer E and Timer F of the BYE transaction; the call's own
    /// `ByeRetransmit` / `ByeTimeout` deadlines are the earliest of its
    /// legs' (see `Endpoint::arm_byes`).
    resend_at: Instant,
    give_up_at: Instant,
    done: bool,
    /// It was challenged and resent with credentials (once only).
    challenged: bool,
}

/// The ACK and BYE for a dialog a 2xx made, and what they were written
/// from (for the BYE's one resend with credentials after a 401/407).
#[derive(Debug)]
struct DialogRequests {
    /// The dialog's To tag: a 2xx with another is a further leg of a
    /// forked call.
    to_tag: Box<str>,
    next_hop: SocketAddr,
    ack: Bytes,
    bye: Bytes,
    /// The Contact the requests go to (`None`: the Request-URI).
    target: Option<Box<str>>,
    /// The dialog's To and route set.
    to: Box<[u8]>,
    routes: Vec<String>,
}

/// What a call's requests are written from, in every state including the
/// tombstone: the two numbers inline, the Call-ID's digits, the trunk as an
/// index into the endpoint's table. Tags and branches derive from the slot.
#[derive(Debug, Clone)]
struct Ids {
    to: Text,
    caller: Text,
    call_id: [u8; 32],
    trunk: u32,
    caller_id: CallerId,
}

#[derive(Debug)]
struct Call {
    gen: u32,
    tag: u64,
    ids: Ids,
    ring: Duration,
    cseq: u32,
    /// Branch kind of the live INVITE transaction.
    invite_kind: u8,
    state: InviteState,
    /// The INVITE with credentials, kept for Timer A: its digest has a
    /// cnonce, so it is resent as it was rather than rendered again. (The
    /// first INVITE is rendered again: the same bytes.)
    auth_invite: Option<Bytes>,
    /// The INVITE's credentials (header name, value): an ACK for a 2xx
    /// carries the same (RFC 3261 §13.2.2.4).
    auth_header: Option<(&'static str, Box<str>)>,
    retransmit_interval: Duration,
    rang: bool,
    cancel_wanted: Option<CancelReason>,
    cancel: Option<CancelTx>,
    /// The answered legs, the first 2xx's first; empty until a 2xx.
    legs: Vec<Leg>,
    invited_at: Instant,
    first_provisional_at: Option<Instant>,
    ringing_at: Option<Instant>,
    cancel_at: Option<Instant>,
    ended: bool,
    deadlines: [Option<Instant>; TIMERS],
    /// Deadline of this call's one entry in the timer queue, if any; it is
    /// never later than the earliest of `deadlines`.
    queued: Option<Instant>,
}

impl Call {
    fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.iter().flatten().min().copied()
    }
}

/// A finished call waiting out Timer D after its non-2xx final: no buffers,
/// no timers of its own, just what re-ACKing a retransmitted final needs.
/// It has one timer-queue entry pending at any time: the live call's, or
/// `expires`.
#[derive(Debug)]
struct Tomb {
    gen: u32,
    /// CSeq of the last INVITE (2 after a digest retry).
    cseq: u32,
    invite_kind: u8,
    tag: u64,
    expires: Instant,
    ids: Ids,
}

#[derive(Debug)]
enum Slot {
    Free,
    /// Boxed so that the slab's entries stay the size of a tombstone, the
    /// kind most of them hold; the box of an ended call is reused by the
    /// next call's.
    Live(Box<Call>),
    Tomb(Tomb),
}

/// The shortest gap between two sweeps for one unreachable address: a
/// sweep walks every slot (tombstones too, ~130,000 at 4,000 calls/s),
/// and a dead trunk's ICMP errors can come back a thousand a second. 50 ms
/// bounds the walk to 20 a second per address, and a call to a dead trunk
/// fails that much later at most, instead of 32 s (Timer B) later.
const SWEEP_GAP: Duration = Duration::from_millis(50);

/// An address the transport reported unreachable, and the calls to it yet
/// to be failed.
#[derive(Debug)]
struct Sweep {
    dest: SocketAddr,
    /// The last report not yet swept: calls sent before it are failed.
    pending: Option<Instant>,
    /// When the last sweep for `dest` ran.
    last_run: Option<Instant>,
}

impl Sweep {
    /// When the pending report may be swept. (A report with no sweep in
    /// the last gap is swept at once, so `pending` implies `last_run`.)
    fn due(&self) -> Option<Instant> {
        self.pending.and(self.last_run).map(|t| t + SWEEP_GAP)
    }

    /// No sweep for `dest` within the last gap: a report is swept at once.
    fn gap_over(&self, now: Instant) -> bool {
        self.last_run.is_none_or(|t| now >= t + SWEEP_GAP)
    }
}

/// A trunk as calls name it.
#[derive(Debug)]
struct TrunkEntry {
    addr: SocketAddr,
    host: Box<str>,
    credentials: Option<Credentials>,
}

/// The flash-call user agent client.
pub struct Endpoint<R: RngCore> {
    cfg: EndpointConfig,
    rng: R,
    /// Random per endpoint: makes our branches and tags unique across
    /// restarts and lets us reject responses meant for another process.
    salt: u32,
    local: Local,
    sdp: Bytes,
    /// Where requests are written before being copied out at their exact
    /// size (see `render`); a `Cell` so that rendering needs only `&self`.
    scratch: Cell<Vec<u8>>,
    /// Trunk address, Request-URI host and credentials of each call,
    /// interned: a call (and its tombstone, for a forked leg's 2xx after the
    /// final) keeps an index, not a copy of the host and the secret.
    trunks: Vec<TrunkEntry>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    next_gen: u32,
    timers: TimerQueue,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    active: usize,
    tombs: usize,
    stats: Stats,
    /// When the datagram being handled arrived (see `handle_input_at`).
    arrived: Option<Instant>,
    /// Addresses reported unreachable, swept at most every [`SWEEP_GAP`].
    sweeps: Vec<Sweep>,
}

impl<R: RngCore> Endpoint<R> {
    pub fn new(cfg: EndpointConfig, mut rng: R) -> Self {
        let salt = rng.next_u32();
        let local = Local::new(
            cfg.local,
            cfg.sent_by.as_deref(),
            &cfg.public_host,
            &cfg.user_agent,
        );
        let sdp = render::sdp_offer(cfg.media, u64::from(rng.next_u32()));
        Endpoint {
            cfg,
            rng,
            salt,
            local,
            sdp,
            scratch: Cell::new(Vec::with_capacity(2048)),
            arrived: None,
            trunks: Vec::new(),
            slots: Vec::new(),
            free: Vec::new(),
            next_gen: 1,
            timers: TimerQueue::default(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            active: 0,
            tombs: 0,
            stats: Stats::default(),
            sweeps: Vec::new(),
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

    /// Calls holding state, including those lingering after their outcome
    /// (tombstones among them).
    pub fn calls_in_memory(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Finished calls kept in compact form for Timer D.
    pub fn tombstones(&self) -> usize {
        self.tombs
    }

    /// Entries in the timer queue, stale ones included (tests bound it).
    #[cfg(test)]
    pub(crate) fn timer_entries(&self) -> usize {
        self.timers.len()
    }

    /// Sends the INVITE for a new call and arms its timers.
    pub fn start_call(&mut self, now: Instant, req: CallRequest) -> CallHandle {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Slot::Free);
                (self.slots.len() - 1) as u32
            }
        };
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        let handle = CallHandle { slot, gen };
        let ids = Ids {
            to: Text::new(&req.to),
            caller: Text::new(&req.caller),
            call_id: ids::call_id_hex(self.rng.next_u64(), self.rng.next_u64()),
            trunk: self.intern_trunk(req.trunk, &req.trunk_host, req.credentials),
            caller_id: req.caller_id,
        };
        let cseq = 1;
        let invite = self.render_invite(handle, &ids, cseq);
        self.transmits.push_back(Transmit {
            dest: req.trunk,
            payload: invite,
        });
        let t1 = self.cfg.timers.t1;
        let call = Call {
            gen,
            tag: req.tag,
            ids,
            ring: req.ring,
            cseq,
            invite_kind: KIND_INVITE,
            state: InviteState::Calling,
            auth_invite: None,
            auth_header: None,
            retransmit_interval: t1,
            rang: false,
            cancel_wanted: None,
            cancel: None,
            legs: Vec::new(),
            invited_at: now,
            first_provisional_at: None,
            ringing_at: None,
            cancel_at: None,
            ended: false,
            deadlines: [None; TIMERS],
            queued: None,
        };
        self.slots[slot as usize] = Slot::Live(Box::new(call));
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
            .filter_map(|(i, s)| match s {
                Slot::Live(c) if !c.ended => Some(CallHandle {
                    slot: i as u32,
                    gen: c.gen,
                }),
                _ => None,
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
        let sweep = self.sweeps.iter().filter_map(Sweep::due).min();
        match (self.next_timer(), sweep) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The earliest call timer or tombstone expiry.
    fn next_timer(&mut self) -> Option<Instant> {
        // Entries that would fire for nothing (their call's timers were
        // disarmed, or a tombstone is not due yet) move to where the call
        // really has work, so an idle driver does not wake for them.
        while let Some((at, slot, gen)) = self.timers.peek() {
            let moved_to = match self.slots.get_mut(slot as usize) {
                Some(Slot::Live(c)) if c.gen == gen && c.queued == Some(at) => {
                    match c.next_deadline() {
                        Some(n) if n <= at => return Some(at),
                        next => {
                            c.queued = next;
                            next
                        }
                    }
                }
                Some(Slot::Tomb(t)) if t.gen == gen => {
                    if t.expires <= at {
                        return Some(at);
                    }
                    Some(t.expires)
                }
                _ => None,
            };
            self.timers.pop();
            if let Some(n) = moved_to {
                self.timers.push((n, slot, gen));
            }
        }
        None
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if !self.sweeps.is_empty() {
            self.run_due_sweeps(now);
        }
        while let Some((at, slot, gen)) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let h = CallHandle { slot, gen };
            match self.slots.get_mut(slot as usize) {
                Some(Slot::Live(c)) if c.gen == gen && c.queued == Some(at) => {
                    c.queued = None;
                    self.fire_due(now, h);
                }
                Some(Slot::Tomb(t)) if t.gen == gen => {
                    if t.expires <= now {
                        self.free(h);
                    } else {
                        let e = t.expires;
                        self.timers.push((e, slot, gen));
                    }
                }
                // Stale: the call moved its entry, ended or the slot was reused.
                _ => {}
            }
        }
    }

    /// The transport says `dest` cannot be reached: an ICMP port, host or
    /// network unreachable came back for a datagram sent there, or the
    /// send itself failed. RFC 3261 treats that as a 503 from the next hop
    /// (§8.1.3.1) and ends the client transaction at once (§17.1.4), so
    /// every call whose INVITE went to `dest` (a trunk's address) and has
    /// had no response yet ends `trunk_error` (no SIP code), where it
    /// would otherwise retransmit for Timer B's 32 s and end `timeout`. Calls that already have a
    /// response are left to their timers: the trunk answered them, and one
    /// lost CANCEL or BYE says little.
    ///
    /// Which call's datagram bounced is not used: hosts rate-limit ICMP
    /// (Linux sends about one port unreachable a second to a peer), so
    /// most calls to a dead trunk get no error of their own. Every call
    /// sent to `dest` before the report is failed instead, in one sweep
    /// per [`SWEEP_GAP`] at most.
    pub fn transport_failed(&mut self, now: Instant, dest: SocketAddr) {
        // Errors for other addresses (a 2xx Contact, the source of a
        // request we answered, perhaps spoofed) fail nothing, and must not
        // cost a walk of every slot each.
        if !self.trunks.iter().any(|t| t.addr == dest) {
            return;
        }
        let i = match self.sweeps.iter().position(|s| s.dest == dest) {
            Some(i) => i,
            None => {
                self.sweeps.push(Sweep {
                    dest,
                    pending: None,
                    last_run: None,
                });
                self.sweeps.len() - 1
            }
        };
        let s = &mut self.sweeps[i];
        s.pending = Some(now);
        if s.gap_over(now) {
            self.sweep(now, i);
        }
    }

    fn run_due_sweeps(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.sweeps.len() {
            let s = &self.sweeps[i];
            if s.due().is_some_and(|d| d <= now) {
                self.sweep(now, i);
            }
            let s = &self.sweeps[i];
            // An address quiet for a gap needs no entry: its next report
            // is swept at once.
            if s.pending.is_none() && s.gap_over(now) {
                self.sweeps.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// Fails the calls that sweep `i`'s pending report covers.
    fn sweep(&mut self, now: Instant, i: usize) {
        let s = &mut self.sweeps[i];
        let (dest, Some(reported)) = (s.dest, s.pending.take()) else {
            return;
        };
        s.last_run = Some(now);
        let hit: Vec<CallHandle> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(slot, x)| match x {
                // The first INVITE only: one resent with credentials had
                // its 401/407, so the trunk was there. Strictly before the
                // report: the driver reads errors at the start of a turn
                // and starts that turn's calls at the same instant after.
                Slot::Live(c)
                    if !c.ended
                        && c.state == InviteState::Calling
                        && c.invite_kind == KIND_INVITE
                        && c.invited_at < reported
                        && self.trunks[c.ids.trunk as usize].addr == dest =>
                {
                    Some(CallHandle {
                        slot: slot as u32,
                        gen: c.gen,
                    })
                }
                _ => None,
            })
            .collect();
        for h in hit {
            let Some(c) = self.call_mut(h) else { continue };
            // As Timer B does: the call ends, and lingers so that a late
            // provisional (the error was for an older datagram, the trunk
            // is back) is still cancelled rather than left ringing.
            c.state = InviteState::TimedOut;
            c.auth_invite = None;
            self.disarm(h, Timer::Retransmit);
            self.disarm(h, Timer::RingTimeout);
            self.disarm(h, Timer::InviteTimeout);
            self.stats.transport_failures += 1;
            self.end(now, h, Outcome::TrunkError, None, None);
            self.arm(h, Timer::Linger, now + self.cfg.timers.d());
        }
    }

    /// Fires a live call's due timers in deadline order, then queues its
    /// entry at its next deadline.
    fn fire_due(&mut self, now: Instant, h: CallHandle) {
        loop {
            let Some(c) = self.call_mut(h) else { return };
            let due = c
                .deadlines
                .iter()
                .enumerate()
                .filter_map(|(i, d)| d.filter(|d| *d <= now).map(|d| (d, i)))
                .min();
            let Some((_, i)) = due else { break };
            c.deadlines[i] = None;
            self.on_timer(now, h, ALL_TIMERS[i]);
        }
        self.requeue(h);
    }

    /// Feeds one datagram from `from`.
    pub fn handle_input(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) -> Input {
        self.handle_input_at(now, now, from, datagram)
    }

    /// [`Endpoint::handle_input`] for a datagram that `arrived` (on the
    /// socket, by the kernel's stamp) before it is handled at `now`. What
    /// the datagram reports (first provisional, ringing) is dated at its
    /// arrival; what the core does about it (a CANCEL, timers) at `now`. So
    /// the 180 -> CANCEL and post-dial delays include the time it waited in
    /// the socket queue, which is the delay the trunk sees.
    pub fn handle_input_at(
        &mut self,
        now: Instant,
        arrived: Instant,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Input {
        self.arrived = Some(arrived.min(now));
        let input = self.handle_datagram(now, from, datagram);
        self.arrived = None;
        input
    }

    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) -> Input {
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
        let (tag, invite_kind, cseq) = match self.slots.get(handle.slot as usize) {
            Some(Slot::Live(c))
                if c.gen == handle.gen
                    && ids::call_id_is(&c.ids.call_id, &self.local.public_host, msg.call_id) =>
            {
                (c.tag, c.invite_kind, c.cseq)
            }
            Some(Slot::Tomb(t))
                if t.gen == handle.gen
                    && ids::call_id_is(&t.ids.call_id, &self.local.public_host, msg.call_id) =>
            {
                let tag = t.tag;
                let first_event = self.events.len();
                if !self.on_tomb_response(now, handle, kind, code, msg) {
                    return false;
                }
                self.stats.late_responses += 1;
                self.events
                    .insert(first_event, Event::Response { tag, code });
                return true;
            }
            _ => return false,
        };
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
                // A retransmission of the 401/407 we already answered: the
                // same ACK again (old branch and CSeq, the response's To).
                if code >= 300 {
                    self.send_final_ack(handle, KIND_INVITE, msg.cseq.number, msg.to);
                }
                true
            }
            // The 200 (or anything) for an untracked leg's BYE: nothing waits.
            KIND_BYE_FORK if method == "BYE" => true,
            k if method == "BYE" => match self.leg_of(handle, k) {
                Some(i) => {
                    self.on_bye_response(now, handle, i, k, code, msg);
                    true
                }
                None => false,
            },
            _ => false,
        };
        if matched {
            self.events
                .insert(first_event, Event::Response { tag, code });
        }
        matched
    }

    /// A response to the BYE (branch kind `kind`) of leg `i`.
    fn on_bye_response(
        &mut self,
        now: Instant,
        h: CallHandle,
        i: usize,
        kind: u8,
        code: u16,
        msg: &Message<'_>,
    ) {
        let t2 = self.cfg.timers.t2;
        let Some(c) = self.call(h) else { return };
        let Some(leg) = c.legs.get(i) else { return };
        let first_bye = kind == leg.bye_kind;
        let creds = self.credentials(&c.ids).is_some();
        if first_bye && leg.challenged {
            // The first BYE's transaction, replaced by the one with
            // credentials: a late copy of its answer changes nothing.
        } else if first_bye && creds && matches!(code, 401 | 407) {
            self.bye_auth_retry(now, h, i, code, msg);
        } else if code >= 200 {
            // 2xx, or any other final (a second challenge too): no more can
            // be done for this BYE.
            self.bye_done(h, i);
        } else if let Some(leg) = self.call_mut(h).and_then(|c| c.legs.get_mut(i)) {
            // Proceeding: Timer E goes on at T2 (§17.1.2.2).
            leg.interval = t2;
        }
    }

    /// A response for a call that is now a tombstone. Returns whether it
    /// belonged to one of the call's transactions.
    fn on_tomb_response(
        &mut self,
        now: Instant,
        h: CallHandle,
        kind: u8,
        code: u16,
        msg: &Message<'_>,
    ) -> bool {
        let Some(Slot::Tomb(t)) = self.slots.get(h.slot as usize) else {
            return false;
        };
        let number = msg.cseq.number;
        let (last_kind, last_cseq) = (t.invite_kind, t.cseq);
        let this_invite = kind == last_kind && number == last_cseq;
        // The INVITE a digest retry replaced: its 401/407 may come again.
        let first_invite =
            kind == KIND_INVITE && last_kind == KIND_INVITE_AUTH && number + 1 == last_cseq;
        match msg.cseq.method {
            "INVITE" if this_invite || first_invite => match code {
                100..=199 => {}
                200..=299 if this_invite => {
                    // Another leg of a forked call answered after the final:
                    // take the call up again to ACK and hang it up (§13.2.2.4).
                    self.revive(now, h);
                    self.on_2xx(now, h, code, msg);
                }
                200..=299 => {}
                // §17.1.1.2: each retransmission of the final is ACKed again.
                _ => self.send_final_ack(h, kind, number, msg.to),
            },
            // The 200 for our CANCEL, arriving after the 487.
            "CANCEL" if kind == last_kind => {}
            _ => return false,
        }
        true
    }

    fn on_invite_response(&mut self, now: Instant, h: CallHandle, code: u16, msg: &Message<'_>) {
        // Set by handle_input_at for the datagram being handled.
        let arrived = self.arrived.map_or(now, |a| a.min(now));
        let has_credentials = self
            .call(h)
            .is_some_and(|c| self.credentials(&c.ids).is_some());
        let Some(c) = self.call_mut(h) else { return };
        match (code, c.state) {
            (100..=199, InviteState::Calling | InviteState::Proceeding | InviteState::TimedOut) => {
                let was_timed_out = c.state == InviteState::TimedOut;
                c.state = InviteState::Proceeding;
                c.first_provisional_at.get_or_insert(arrived);
                let ringing = (code == 180 || code == 183) && !c.rang;
                if ringing {
                    c.rang = true;
                    c.ringing_at = Some(arrived);
                }
                let (ring, tag, pending) = (c.ring, c.tag, c.cancel_wanted);
                c.auth_invite = None;
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
                        at: arrived,
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
                // A 2xx without a To tag is taken for the first leg's.
                let leg = match msg.to_tag {
                    Some(t) => c.legs.iter().find(|l| *l.dialog.to_tag == *t),
                    None => c.legs.first(),
                };
                if let Some(leg) = leg {
                    // A retransmission of that leg's answer: its ACK again
                    // (its BYE keeps to its own timers).
                    let (dest, payload) = (leg.dialog.next_hop, leg.dialog.ack.clone());
                    self.transmits.push_back(Transmit { dest, payload });
                } else if let Some(n) = c.legs.len().checked_sub(1).filter(|&n| n < FORK_LEGS) {
                    // Another leg of a forked call answered too (§13.2.2.4:
                    // an ACK for each 2xx): ACK and hang up that dialog as
                    // well, with a BYE transaction of its own.
                    let kinds = (FORK_ACK_KINDS[n], FORK_BYE_KINDS[n], FORK_AUTH_KINDS[n]);
                    self.answer_leg(now, h, msg, kinds);
                } else if let Some(DialogRequests {
                    next_hop: dest,
                    ack,
                    bye,
                    ..
                }) = self.dialog_requests(h, msg, (KIND_ACK_FORK, KIND_BYE_FORK))
                {
                    // Past FORK_LEGS: sent once per 2xx. A leg that missed
                    // our ACK retransmits its 2xx, and each copy gets both
                    // again.
                    self.transmits.push_back(Transmit { dest, payload: ack });
                    self.transmits.push_back(Transmit { dest, payload: bye });
                }
            }
            (200..=299, _) => self.on_2xx(now, h, code, msg),
            (300..=699, InviteState::Completed) => {
                let kind = c.invite_kind;
                self.send_final_ack(h, kind, msg.cseq.number, msg.to);
            }
            (401 | 407, InviteState::Calling | InviteState::Proceeding)
                if has_credentials && c.invite_kind == KIND_INVITE =>
            {
                self.auth_retry(now, h, code, msg)
            }
            (300..=699, InviteState::Accepted) => {}
            (300..=699, _) => {
                c.state = InviteState::Completed;
                c.auth_invite = None;
                // The phone rang and we cancelled: the missed call was shown
                // (SPEC §4's `delivered`) when the final is one a cancelled
                // or refused ringing call ends with. Not only 487: a carrier
                // interworking with ISUP may close a cancelled call with 480
                // or 603, and a user who rejected while our CANCEL was on
                // its way gives 486/600/603. Any other final (404 after a
                // 183 announcing "not in service", a 5xx, a 503) says the
                // phone never rang, and keeps its own outcome.
                let closed_by_cancel = matches!(code, 480 | 486 | 487 | 600 | 603);
                let outcome = match c.cancel_wanted {
                    Some(CancelReason::Rang) if closed_by_cancel => Outcome::Delivered,
                    Some(CancelReason::Shutdown) if c.rang && closed_by_cancel => {
                        Outcome::Delivered
                    }
                    Some(CancelReason::NoRinging) if closed_by_cancel => Outcome::NoRinging,
                    _ => Outcome::for_final(code),
                };
                let kind = c.invite_kind;
                self.send_final_ack(h, kind, msg.cseq.number, msg.to);
                let retry_after = if code == 503 { msg.retry_after } else { None };
                self.end(now, h, outcome, Some(code), retry_after);
                self.entomb(now, h);
            }
            _ => {}
        }
    }

    /// 2xx: the callee answered before the CANCEL won (or the network gives
    /// false answer supervision). ACK it to the Contact and hang up at once.
    fn on_2xx(&mut self, now: Instant, h: CallHandle, code: u16, msg: &Message<'_>) {
        if !self.answer_leg(now, h, msg, (KIND_ACK2XX, KIND_BYE, KIND_BYE_AUTH)) {
            return;
        }
        let Some(c) = self.call_mut(h) else { return };
        c.state = InviteState::Accepted;
        c.auth_invite = None;
        // The CANCEL, if any, no longer matters: the call is up.
        c.cancel = None;
        // Every timer of the INVITE and the CANCEL.
        for &t in &ALL_TIMERS[..=Timer::FinalWait as usize] {
            self.disarm(h, t);
        }
        self.end(now, h, Outcome::Answered, Some(code), None);
    }

    /// A leg answered: send the ACK and the BYE of its dialog, with the
    /// branch kinds `(ack, bye, bye with credentials)`, and keep the BYE's
    /// transaction and the call's state until 64·T1 after it (the `Linger`
    /// of the last leg to answer). Returns whether it could.
    fn answer_leg(
        &mut self,
        now: Instant,
        h: CallHandle,
        msg: &Message<'_>,
        (ack_kind, bye_kind, auth_kind): (u8, u8, u8),
    ) -> bool {
        let Some(dialog) = self.dialog_requests(h, msg, (ack_kind, bye_kind)) else {
            return false;
        };
        let (next_hop, ack, bye) = (dialog.next_hop, dialog.ack.clone(), dialog.bye.clone());
        let (t1, b) = (self.cfg.timers.t1, self.cfg.timers.b());
        let Some(c) = self.call_mut(h) else {
            return false;
        };
        c.legs.push(Leg {
            dialog,
            bye_kind,
            auth_kind,
            interval: t1,
            resend_at: now + t1,
            give_up_at: now + b,
            done: false,
            challenged: false,
        });
        let linger = c.deadlines[Timer::Linger as usize]
            .filter(|_| c.state == InviteState::Accepted)
            .map_or(now + b, |d| d.max(now + b));
        self.transmits.push_back(Transmit {
            dest: next_hop,
            payload: ack,
        });
        self.transmits.push_back(Transmit {
            dest: next_hop,
            payload: bye,
        });
        self.arm_byes(h);
        self.arm(h, Timer::Linger, linger);
        true
    }

    /// Sets the call's `ByeRetransmit` and `ByeTimeout` deadlines to the
    /// earliest of its open BYE transactions', or clears them.
    fn arm_byes(&mut self, h: CallHandle) {
        let Some(c) = self.call(h) else { return };
        let open = || c.legs.iter().filter(|l| !l.done);
        let resend = open().map(|l| l.resend_at).min();
        let give_up = open().map(|l| l.give_up_at).min();
        for (timer, at) in [(Timer::ByeRetransmit, resend), (Timer::ByeTimeout, give_up)] {
            match at {
                Some(at) => self.arm(h, timer, at),
                None => self.disarm(h, timer),
            }
        }
    }

    /// The leg whose BYE (or BYE with credentials) has branch kind `kind`.
    fn leg_of(&self, h: CallHandle, kind: u8) -> Option<usize> {
        self.call(h)?
            .legs
            .iter()
            .position(|l| l.bye_kind == kind || l.auth_kind == kind)
    }

    /// The ACK and the BYE for the dialog a 2xx made, and where they go:
    /// to the first Record-Route, else the Contact, else the trunk. They
    /// take the branches of `(ack_kind, bye_kind)`.
    fn dialog_requests(
        &mut self,
        h: CallHandle,
        msg: &Message<'_>,
        (ack_kind, bye_kind): (u8, u8),
    ) -> Option<DialogRequests> {
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
        let ack_branch = self.branch(h, ack_kind);
        let bye_branch = self.branch(h, bye_kind);
        let c = self.call(h)?;
        // A Contact we could not put on a request line (spaces, controls,
        // not a URI) would make the ACK and BYE unparsable: fall back to the
        // Request-URI, which reaches the callee through the trunk.
        let target = match msg.contact_uri.filter(|u| is_sendable_uri(u)) {
            Some(u) => Target::Uri(u),
            None => Target::RequestUri,
        };
        let trunk = self.trunk_addr(&c.ids);
        // Loose routing: the request goes to the first route, else to the
        // Contact. Names we cannot resolve without DNS fall back to the trunk.
        let next_hop = match routes.first().and_then(|r| addr_uri(r.as_bytes())) {
            Some(r) => uri_socket_addr(r),
            None => match target {
                Target::Uri(u) => uri_socket_addr(u),
                Target::RequestUri => None,
            },
        }
        .unwrap_or(trunk);
        let tag = self.tag(h);
        let d = self.dialog(&c.ids, &tag);
        let auth = c.auth_header.as_ref().map(|(n, v)| (*n, &**v));
        let ack = self.with_scratch(|out| {
            render::ack(out, &d, target, &ack_branch, c.cseq, &to, &routes, auth)
        });
        let bye = self.with_scratch(|out| {
            render::bye(out, &d, target, &bye_branch, c.cseq + 1, &to, &routes, None)
        });
        Some(DialogRequests {
            to_tag: msg.to_tag.unwrap_or("").into(),
            next_hop,
            ack,
            bye,
            target: match target {
                Target::Uri(u) => Some(u.into()),
                Target::RequestUri => None,
            },
            to: to.into(),
            routes,
        })
    }

    /// What a 401/407 asks for: its strongest usable challenge, a fresh
    /// cnonce, and the header our credentials go in.
    fn challenge(
        &mut self,
        code: u16,
        msg: &Message<'_>,
    ) -> (Option<digest::Challenge>, String, &'static str) {
        let (wanted, header) = if code == 401 {
            (Name::WwwAuthenticate, "Authorization")
        } else {
            (Name::ProxyAuthenticate, "Proxy-Authorization")
        };
        let challenge = digest::choose(
            msg.values(wanted)
                .filter_map(|v| std::str::from_utf8(v).ok()),
        );
        (challenge, format!("{:016x}", self.rng.next_u64()), header)
    }

    /// A 401/407 to the BYE of leg `i`: the BYE once more with credentials
    /// for it, CSeq+1 and a new branch (RFC 3261 §22.2). Without a usable
    /// challenge the BYE is done: nothing more can be sent.
    fn bye_auth_retry(
        &mut self,
        now: Instant,
        h: CallHandle,
        i: usize,
        code: u16,
        msg: &Message<'_>,
    ) {
        let (challenge, cnonce, header) = self.challenge(code, msg);
        let (t1, b) = (self.cfg.timers.t1, self.cfg.timers.b());
        let tag = self.tag(h);
        let Some(c) = self.call(h) else { return };
        let creds = self.credentials(&c.ids);
        let (Some(challenge), Some(creds), Some(leg)) = (challenge, creds, c.legs.get(i)) else {
            self.bye_done(h, i);
            return;
        };
        let branch = self.branch(h, leg.auth_kind);
        let d = self.dialog(&c.ids, &tag);
        let target = leg
            .dialog
            .target
            .as_deref()
            .map_or(Target::RequestUri, Target::Uri);
        let uri = match target {
            Target::Uri(u) => u.to_string(),
            Target::RequestUri => render::request_uri_string(&d),
        };
        let value = digest::authorization(
            &challenge,
            &creds.username,
            &creds.password,
            "BYE",
            &uri,
            &cnonce,
            1,
        );
        let payload = self.with_scratch(|out| {
            render::bye(
                out,
                &d,
                target,
                &branch,
                c.cseq + 2,
                &leg.dialog.to,
                &leg.dialog.routes,
                Some((header, &value)),
            )
        });
        let Some(leg) = self.call_mut(h).and_then(|c| c.legs.get_mut(i)) else {
            return;
        };
        leg.dialog.bye = payload.clone();
        leg.interval = t1;
        leg.resend_at = now + t1;
        leg.give_up_at = now + b;
        leg.done = false;
        leg.challenged = true;
        let dest = leg.dialog.next_hop;
        self.transmits.push_back(Transmit { dest, payload });
        self.arm_byes(h);
        let linger = self
            .call(h)
            .and_then(|c| c.deadlines[Timer::Linger as usize])
            .map_or(now + b, |d| d.max(now + b));
        self.arm(h, Timer::Linger, linger);
    }

    /// The BYE of leg `i` got its final answer (or can get none): stop
    /// sending it.
    fn bye_done(&mut self, h: CallHandle, i: usize) {
        if let Some(leg) = self.call_mut(h).and_then(|c| c.legs.get_mut(i)) {
            leg.done = true;
        }
        self.arm_byes(h);
    }

    /// 401/407: ACK the challenge, then one new INVITE with credentials,
    /// CSeq+1 and a new branch (RFC 3261 §22.2).
    fn auth_retry(&mut self, now: Instant, h: CallHandle, code: u16, msg: &Message<'_>) {
        let (challenge, cnonce, header) = self.challenge(code, msg);
        let t1 = self.cfg.timers.t1;
        let Some(c) = self.call(h) else { return };
        let (cseq, has_credentials) = (c.cseq, self.credentials(&c.ids).is_some());
        self.send_final_ack(h, KIND_INVITE, cseq, msg.to);
        let Some(c) = self.call_mut(h) else { return };
        let Some(challenge) = challenge.filter(|_| has_credentials) else {
            // No usable challenge: the final stands as it is, and the
            // tombstone re-ACKs it on this branch.
            c.state = InviteState::Completed;
            self.end(now, h, Outcome::Failed, Some(code), None);
            self.entomb(now, h);
            return;
        };
        // From here on the old branch only re-ACKs.
        c.invite_kind = KIND_INVITE_AUTH;
        let Some(c) = self.call(h) else { return };
        let Some(creds) = self.credentials(&c.ids) else {
            return;
        };
        let tag = self.tag(h);
        let d = self.dialog(&c.ids, &tag);
        let value = digest::authorization(
            &challenge,
            &creds.username,
            &creds.password,
            "INVITE",
            &render::request_uri_string(&d),
            &cnonce,
            1,
        );
        let branch = self.branch(h, KIND_INVITE_AUTH);
        let invite = self.with_scratch(|out| {
            render::invite(
                out,
                &d,
                &branch,
                cseq + 1,
                Some((header, &value)),
                &self.sdp,
            )
        });
        let trunk = self.trunk_addr(&c.ids);
        let Some(c) = self.call_mut(h) else { return };
        c.cseq += 1;
        c.state = InviteState::Calling;
        c.retransmit_interval = t1;
        c.auth_invite = Some(invite.clone());
        c.auth_header = Some((header, value.into()));
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
        self.disarm(h, Timer::CancelRetransmit);
        self.disarm(h, Timer::CancelTimeout);
    }

    // ----- requests from the peer -----------------------------------------

    fn on_request(&mut self, from: SocketAddr, method: &str, msg: &Message<'_>) {
        if method == "ACK" {
            return; // never answered
        }
        // Only a live call has a dialog: a tombstone's call ended with a
        // non-2xx final, which makes none (§12.1), so requests in it get 481.
        let known_dialog = msg
            .to_tag
            .and_then(|t| ids::parse_token(self.salt, t.as_bytes()))
            .filter(|&(_, _, kind)| kind == KIND_TAG)
            .is_some_and(|(slot, gen, _)| {
                self.call(CallHandle { slot, gen }).is_some_and(|c| {
                    ids::call_id_is(&c.ids.call_id, &self.local.public_host, msg.call_id)
                })
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
                if c.state == InviteState::Calling {
                    // Timer A doubles with no cap (§17.1.1.2).
                    c.retransmit_interval *= 2;
                    let next = now + c.retransmit_interval;
                    let payload = match c.auth_invite.clone() {
                        Some(p) => p,
                        None => {
                            let Some(c) = self.call(h) else { return };
                            self.render_invite(h, &c.ids, c.cseq)
                        }
                    };
                    let Some(c) = self.call(h) else { return };
                    let dest = self.trunk_addr(&c.ids);
                    self.transmits.push_back(Transmit { dest, payload });
                    self.arm(h, Timer::Retransmit, next);
                }
            }
            Timer::InviteTimeout => {
                if c.state == InviteState::Calling {
                    c.state = InviteState::TimedOut;
                    c.auth_invite = None;
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
                    // Timer E: doubling, capped at T2 (§17.1.2.2).
                    cancel.interval = (cancel.interval * 2).min(t2);
                    let next = now + cancel.interval;
                    self.push_cancel(h);
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
                // Timer E of each leg's BYE that is due: doubling, capped
                // at T2 (§17.1.2.2).
                let transmits = &mut self.transmits;
                let Some(Slot::Live(c)) = self.slots.get_mut(h.slot as usize) else {
                    return;
                };
                for leg in c.legs.iter_mut().filter(|l| !l.done && l.resend_at <= now) {
                    leg.interval = (leg.interval * 2).min(t2);
                    leg.resend_at = now + leg.interval;
                    transmits.push_back(Transmit {
                        dest: leg.dialog.next_hop,
                        payload: leg.dialog.bye.clone(),
                    });
                }
                self.arm_byes(h);
            }
            Timer::ByeTimeout => {
                // Timer F: that BYE gets no answer; the leg's own timers
                // end it on the far side.
                for leg in c.legs.iter_mut().filter(|l| l.give_up_at <= now) {
                    leg.done = true;
                }
                self.arm_byes(h);
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
        let proceeding = c.state == InviteState::Proceeding;
        self.disarm(h, Timer::RingHold);
        self.disarm(h, Timer::RingTimeout);
        if proceeding {
            self.send_cancel(now, h, reason);
        }
        // In Calling, RFC 3261 §9.1 forbids a CANCEL before a provisional;
        // the first provisional sends it (see on_invite_response).
    }

    fn send_cancel(&mut self, now: Instant, h: CallHandle, reason: CancelReason) {
        let t1 = self.cfg.timers.t1;
        let Some(c) = self.call_mut(h) else { return };
        if c.cancel.is_some() {
            return;
        }
        c.cancel_wanted = Some(reason);
        c.cancel = Some(CancelTx {
            interval: t1,
            done: false,
        });
        c.cancel_at = Some(now);
        self.push_cancel(h);
        self.arm(h, Timer::CancelRetransmit, now + t1);
        self.arm(h, Timer::CancelTimeout, now + self.cfg.timers.b());
        self.arm(h, Timer::FinalWait, now + self.cfg.timers.b());
    }

    /// Renders and queues the CANCEL: the live INVITE's branch and CSeq.
    fn push_cancel(&mut self, h: CallHandle) {
        let Some(c) = self.call(h) else { return };
        let branch = self.branch(h, c.invite_kind);
        let tag = self.tag(h);
        let d = self.dialog(&c.ids, &tag);
        let payload = self.with_scratch(|out| render::cancel(out, &d, &branch, c.cseq));
        let dest = self.trunk_addr(&c.ids);
        self.transmits.push_back(Transmit { dest, payload });
    }

    /// The ACK of a non-2xx final, in the INVITE transaction `kind`/`cseq`,
    /// with the To of the response it acknowledges (§17.1.1.3). Works for a
    /// live call and for a tombstone alike.
    fn send_final_ack(&mut self, h: CallHandle, kind: u8, cseq: u32, to: &[u8]) {
        let ids = match self.slots.get(h.slot as usize) {
            Some(Slot::Live(c)) if c.gen == h.gen => &c.ids,
            Some(Slot::Tomb(t)) if t.gen == h.gen => &t.ids,
            _ => return,
        };
        let mut unfolded = Vec::new();
        let to = if to.contains(&b'\n') || to.contains(&b'\r') {
            unfold(to, &mut unfolded);
            &unfolded[..]
        } else {
            to
        };
        let branch = self.branch(h, kind);
        let tag = self.tag(h);
        let d = self.dialog(ids, &tag);
        let payload = self.with_scratch(|out| {
            render::ack(out, &d, Target::RequestUri, &branch, cseq, to, &[], None)
        });
        let dest = self.trunk_addr(ids);
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
        let Some(c) = self.call(h) else { return };
        if c.ended {
            if let Some(secs) = retry_after {
                let tag = c.tag;
                self.events.push_back(Event::TrunkRetryAfter { tag, secs });
            }
            return;
        }
        let report = CallReport {
            call: h,
            tag: c.tag,
            trunk: self.trunk_addr(&c.ids),
            outcome,
            sip_code,
            invited_at: c.invited_at,
            first_provisional_at: c.first_provisional_at,
            ringing_at: c.ringing_at,
            cancel_at: c.cancel_at,
            ended_at: now,
            retry_after,
            cancelled_for_ringing: c.cancel_wanted == Some(CancelReason::Rang),
        };
        if let Some(c) = self.call_mut(h) {
            c.ended = true;
        }
        self.active -= 1;
        self.events.push_back(Event::Ended(report));
    }

    /// Shrinks a call whose INVITE got its non-2xx final (already ACKed and
    /// reported) to a tombstone for Timer D.
    fn entomb(&mut self, now: Instant, h: CallHandle) {
        let expires = now + self.cfg.timers.d();
        let Some(slot) = self.slots.get_mut(h.slot as usize) else {
            return;
        };
        let Slot::Live(c) = slot else { return };
        if c.gen != h.gen {
            return;
        }
        let tomb = Tomb {
            gen: c.gen,
            cseq: c.cseq,
            invite_kind: c.invite_kind,
            tag: c.tag,
            expires,
            ids: c.ids.clone(),
        };
        // The call's pending entry, if it is no later than Timer D, becomes
        // the tombstone's (it moves to `expires` when it fires); else the
        // tombstone needs its own.
        let keeps_entry = c.queued.is_some_and(|q| q <= expires);
        if !c.ended {
            self.active -= 1;
        }
        *slot = Slot::Tomb(tomb);
        self.tombs += 1;
        if !keeps_entry {
            self.timers.push((expires, h.slot, h.gen));
        }
    }

    /// Takes a tombstoned call up again as a live call in state Completed,
    /// its outcome already reported (for a 2xx after the final).
    fn revive(&mut self, now: Instant, h: CallHandle) {
        let Some(slot) = self.slots.get_mut(h.slot as usize) else {
            return;
        };
        let Slot::Tomb(t) = slot else { return };
        if t.gen != h.gen {
            return;
        }
        let call = Call {
            gen: t.gen,
            tag: t.tag,
            ids: t.ids.clone(),
            ring: Duration::ZERO,
            cseq: t.cseq,
            invite_kind: t.invite_kind,
            state: InviteState::Completed,
            auth_invite: None,
            auth_header: None,
            retransmit_interval: self.cfg.timers.t1,
            rang: false,
            cancel_wanted: None,
            cancel: None,
            legs: Vec::new(),
            invited_at: now,
            first_provisional_at: None,
            ringing_at: None,
            cancel_at: None,
            ended: true,
            deadlines: [None; TIMERS],
            queued: None,
        };
        *slot = Slot::Live(Box::new(call));
        self.tombs -= 1;
    }

    fn free(&mut self, h: CallHandle) {
        let Some(slot) = self.slots.get_mut(h.slot as usize) else {
            return;
        };
        match slot {
            Slot::Live(c) if c.gen == h.gen => {
                if !c.ended {
                    self.active -= 1;
                }
            }
            Slot::Tomb(t) if t.gen == h.gen => self.tombs -= 1,
            _ => return,
        }
        *slot = Slot::Free;
        self.free.push(h.slot);
    }

    // ----- slab, timers, tokens -------------------------------------------

    fn call(&self, h: CallHandle) -> Option<&Call> {
        match self.slots.get(h.slot as usize)? {
            Slot::Live(c) if c.gen == h.gen => Some(c),
            _ => None,
        }
    }

    fn call_mut(&mut self, h: CallHandle) -> Option<&mut Call> {
        match self.slots.get_mut(h.slot as usize)? {
            Slot::Live(c) if c.gen == h.gen => Some(c),
            _ => None,
        }
    }

    fn arm(&mut self, h: CallHandle, timer: Timer, at: Instant) {
        let Some(c) = self.call_mut(h) else { return };
        c.deadlines[timer as usize] = Some(at);
        if c.queued.is_none_or(|q| at < q) {
            c.queued = Some(at);
            self.timers.push((at, h.slot, h.gen));
        }
    }

    /// Clears a deadline; the call's queue entry, if it was for this one,
    /// moves on when it comes up (see `poll_timeout`).
    fn disarm(&mut self, h: CallHandle, timer: Timer) {
        if let Some(c) = self.call_mut(h) {
            c.deadlines[timer as usize] = None;
        }
    }

    /// After a call's timers fired: one entry at its next deadline.
    fn requeue(&mut self, h: CallHandle) {
        let Some(c) = self.call_mut(h) else { return };
        if let Some(n) = c.next_deadline() {
            if c.queued.is_none_or(|q| n < q) {
                c.queued = Some(n);
                self.timers.push((n, h.slot, h.gen));
            }
        }
    }

    /// Index of a trunk in the table, adding it the first time. Trunks are
    /// few (configured), so a scan is cheaper than hashing.
    fn intern_trunk(
        &mut self,
        addr: SocketAddr,
        host: &str,
        credentials: Option<Credentials>,
    ) -> u32 {
        if let Some(i) = self
            .trunks
            .iter()
            .position(|t| t.addr == addr && *t.host == *host && t.credentials == credentials)
        {
            return i as u32;
        }
        self.trunks.push(TrunkEntry {
            addr,
            host: host.into(),
            credentials,
        });
        (self.trunks.len() - 1) as u32
    }

    fn trunk_addr(&self, ids: &Ids) -> SocketAddr {
        self.trunks[ids.trunk as usize].addr
    }

    /// The digest credentials of the call's trunk, if it has any.
    fn credentials(&self, ids: &Ids) -> Option<&Credentials> {
        self.trunks[ids.trunk as usize].credentials.as_ref()
    }

    fn dialog<'a>(&'a self, ids: &'a Ids, tag: &'a [u8]) -> Dialog<'a> {
        Dialog {
            local: &self.local,
            to: ids.to.as_str(),
            trunk_host: &self.trunks[ids.trunk as usize].host,
            caller: ids.caller.as_str(),
            caller_id: ids.caller_id,
            tag,
            call_id: &ids.call_id,
        }
    }

    /// The INVITE without credentials: rendered the same way each time.
    fn render_invite(&self, h: CallHandle, ids: &Ids, cseq: u32) -> Bytes {
        let tag = self.tag(h);
        let branch = self.branch(h, KIND_INVITE);
        let d = self.dialog(ids, &tag);
        self.with_scratch(|out| render::invite(out, &d, &branch, cseq, None, &self.sdp))
    }

    /// Lends the scratch buffer to a renderer.
    fn with_scratch(&self, f: impl FnOnce(&mut Vec<u8>) -> Bytes) -> Bytes {
        let mut out = self.scratch.take();
        let b = f(&mut out);
        self.scratch.set(out);
        b
    }

    /// `z9hG4bK` + salt + slot + generation + kind: RFC 3261 magic cookie,
    /// unique per transaction, and decodable back to the call.
    fn branch(&self, h: CallHandle, kind: u8) -> [u8; ids::BRANCH_LEN] {
        ids::branch(self.salt, h.slot, h.gen, kind)
    }

    /// Our From tag.
    fn tag(&self, h: CallHandle) -> [u8; ids::TOKEN_LEN] {
        ids::token(self.salt, h.slot, h.gen, KIND_TAG)
    }

    fn parse_branch(&self, branch: &str) -> Option<(CallHandle, u8)> {
        let rest = branch.as_bytes().strip_prefix(ids::COOKIE)?;
        let (slot, gen, kind) = ids::parse_token(self.salt, rest)?;
        Some((CallHandle { slot, gen }, kind))
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

#[cfg(test)]
mod size_tests {
    use super::*;

    /// Most slots hold tombstones (~130,000 at 4,000 calls/s for Timer D):
    /// keep a slot small, and the live call out of line.
    #[test]
    fn a_slot_is_the_size_of_a_tombstone() {
        let (slot, tomb, call) = (
            std::mem::size_of::<Slot>(),
            std::mem::size_of::<Tomb>(),
            std::mem::size_of::<Call>(),
        );
        assert!(slot <= 128, "Slot is {slot} bytes");
        assert!(slot <= tomb + 8, "Slot {slot} vs Tomb {tomb}");
        assert!(call > slot, "Call {call} should be boxed");
    }
}
