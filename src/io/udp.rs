//! The UDP driver: one socket, one loop, no task, channel or lock per call.
//!
//! Each turn drains every datagram already queued on the socket, fires due
//! timers, lets the application start calls, hands the core's events to the
//! application and flushes the core's transmits, then sleeps until the socket
//! is readable, the next deadline (core timer or application pacing) or the
//! application's waker.
//!
//! Where the CPU goes at a few thousand calls per second is not SIP but the
//! kernel: with one wake-up per datagram through tokio's reactor, half of the
//! engine's time was context switching (perf: `finish_task_switch` under
//! `epoll_wait`), and each datagram cost its own `recvfrom`/`sendto`. So:
//!
//! * **Wake coalescing.** Under load (more than [`COALESCE_ABOVE`] datagrams
//!   in the last 10 ms), after a turn that received anything, the loop does
//!   not wait for readability (which would wake it again for the very next
//!   datagram, ~16 000 times a second at 4 000 calls/s) but sleeps until the
//!   next tick (the batch window: `sip.batch_window_us` for `serve`,
//!   [`COALESCE`] for `dial`) at most, and then takes everything that queued up
//!   meanwhile in one go. This is interrupt coalescing as network cards and
//!   Linux NAPI do it: on an idle socket the first datagram still wakes the
//!   loop at once; under load the wake-ups are bounded by the tick rate, not
//!   the packet rate. That sleep is a plain thread sleep, not a tokio timer:
//!   the socket stays registered in tokio's epoll set, and a runtime parked
//!   there is woken (a context switch) by every arriving datagram even when
//!   no task waits for it, which measured as many switches as before. The
//!   sleep is bounded by the window and by the next deadline, happens only
//!   while datagrams keep coming, and the loop yields to the runtime after it
//!   so other tasks on the thread run every tick; an [`App::waker`] wake-up
//!   waits at most that tick. With `sip.thread = "shared"` the thread is
//!   the HTTP runtime's worker and the sleep holds HTTP too, on purpose:
//!   the requests that arrive meanwhile are read at the same tick, with no
//!   wake-up of their own (config::SipThread). The price is at most one window of extra
//!   latency on a busy socket: a window's wait for a new INVITE and for
//!   the CANCEL after a 180 (500 µs by default in `serve`). A busy-poll window was the other candidate and was
//!   rejected: spinning is CPU time, which is what this loop must save, and on
//!   a 2-core machine the spinner takes the core the peer needs to answer.
//! * **recvmmsg / sendmmsg.** One system call moves up to [`BATCH`] datagrams
//!   each way instead of one `recvfrom`/`sendto` per datagram (tokio's
//!   `UdpSocket` has no batched API). Called through libc rather than
//!   `quinn-udp`: quinn-udp batches receives but sends one destination per
//!   call (segmentation offload of equal-sized QUIC packets), while our
//!   datagrams differ in size and, for a 2xx Contact, in destination. The
//!   calls go through [`UdpSocket::try_io`] so tokio's readiness stays right.
//! * A larger kernel receive buffer, so a burst that arrives while the loop
//!   sleeps out a tick (or is descheduled by other work on the machine) waits
//!   in the queue instead of being dropped. What the kernel drops all the
//!   same is counted from SO_RXQ_OVFL and reported to the app
//!   ([`App::on_receive_drops`]): a lost 180 costs a retransmission, and
//!   an operator must be able to see that the SIP thread fell behind.
//! * **ICMP errors.** The socket is not connected (a connected UDP socket
//!   drops every datagram from another address, and trunks answer from
//!   other ports and nodes), so it asks for its ICMP errors with
//!   IP_RECVERR: the error queue names the destination that bounced, and
//!   [`Endpoint::transport_failed`] fails the calls waiting on it. The
//!   queue is read when the socket reports an error (on a receive, a send,
//!   or error readiness while the loop waits), never polled.

use rand::rngs::StdRng;
use std::io::{self, ErrorKind};
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::Notify;

use crate::sip::{Endpoint, Event, Input, Transmit};

/// What drives the endpoint: starts calls and consumes events.
pub trait App {
    /// Start what is due at `now`; return when to be called again.
    fn poll(&mut self, now: Instant, ep: &mut Endpoint<StdRng>) -> Option<Instant>;
    fn on_event(&mut self, ep: &mut Endpoint<StdRng>, event: Event);
    /// ICMP port unreachable came back for something we sent.
    fn on_refused(&mut self) {}
    /// The kernel dropped `n` more datagrams for this socket because its
    /// receive queue was full (SO_RXQ_OVFL): lost before the loop saw
    /// them; a retransmission may still bring their content.
    fn on_receive_drops(&mut self, _n: u64) {}
    /// The loop ends once this is true.
    fn done(&self, ep: &Endpoint<StdRng>) -> bool;
    /// Woken from outside (new work queued by another task): the loop then
    /// runs a turn at once instead of sleeping until the socket or a timer.
    fn waker(&self) -> Option<Arc<Notify>> {
        None
    }
}

/// Counters of the driver's own drops.
#[derive(Debug, Default, Clone, Copy)]
pub struct DriverStats {
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    pub send_errors: u64,
    /// ICMP port unreachable reported on the socket.
    pub refused: u64,
    /// Transport errors naming a destination (ICMP port, host or network
    /// unreachable read from the socket's error queue, or a send the
    /// kernel refused for its route), each handed to
    /// [`Endpoint::transport_failed`].
    pub unreachable: u64,
    pub malformed: u64,
    /// Datagrams the kernel dropped because the receive queue was full.
    pub receive_drops: u64,
    /// Loop turns (wake-ups), to see the coalescing at work.
    pub turns: u64,
}

/// Datagrams per recvmmsg / sendmmsg call.
pub const BATCH: usize = 32;
/// `flashcall dial`'s batch window: the longest a busy loop leaves queued
/// datagrams waiting (see module docs). `serve` takes its window from
/// `sip.batch_window_us`, 500 µs by default since session 10 (see
/// `config::SipConfig`), for the 180 -> CANCEL delay.
///
/// Why 1 ms for `dial`, a load tool whose target is CPU (issue 5: at most
/// half of SIPp's per call): measured with `flashcall dial` against SIPp
/// (20,000 calls at 4,000/s, four interleaved runs each), 1 ms 29.5–34.5
/// µs CPU per call and 0.23 context switches per call; 2 ms 28.5–32.5 and
/// 0.12; 4 ms 27.5–29 and 0.065. 1 ms already keeps it near a third of
/// SIPp's, and a 180 waits at most about a millisecond for its CANCEL.
pub const COALESCE: Duration = Duration::from_millis(1);
/// Receive buffer asked of the kernel (capped there by net.core.rmem_max).
const RECV_BUFFER: usize = 4 << 20;
/// Largest UDP payload; a longer datagram is truncated and counted malformed.
const DATAGRAM_MAX: usize = 65_535;
/// Coalescing starts only above this many datagrams per [`LOAD_WINDOW`]
/// (here 2 per ms, about 500 flash calls/s, four datagrams in per call):
/// below it a wake-up per datagram costs little CPU and every datagram is
/// handled at once, so the 180 -> CANCEL delay of a lightly loaded engine
/// carries no tick. Above it one wake-up per tick is cheaper than one per
/// datagram: on the 2-vCPU VM of the benchmarks a thread's wake-up from
/// idle costs ~35 µs of CPU. At 1,000 calls/s, 40 (the old threshold) left
/// the loop flipping between modes; 20 took the engine from 318-332 to
/// 297-299 µs per verification (two interleaved load runs each) with the
/// same 180 -> CANCEL p99.
const COALESCE_ABOVE: u32 = 20;
const LOAD_WINDOW: Duration = Duration::from_millis(10);
/// Bound on datagrams taken per turn, so timers and pacing stay on time
/// under a flood.
const DRAIN_MAX: usize = 1024;

/// Runs `app` over `ep` on `socket` until the app is done.
///
/// `window` is the coalescing tick (`serve` passes `sip.batch_window_us`,
/// `dial` [`COALESCE`]); zero turns coalescing off, so every datagram wakes
/// the loop at once.
pub async fn run(
    socket: &UdpSocket,
    ep: &mut Endpoint<StdRng>,
    app: &mut impl App,
    window: Duration,
) -> DriverStats {
    let mut stats = DriverStats::default();
    enlarge_recv_buffer(socket);
    if let Err(e) = enable_timestamps(socket.as_raw_fd()) {
        tracing::debug!(error = %e, "no kernel receive timestamps; delays start at handling");
    }
    if let Err(e) = enable_drop_count(socket.as_raw_fd()) {
        tracing::debug!(error = %e, "no kernel drop count; receive queue overflows go uncounted");
    }
    // One contiguous allocation; calloc'd zero pages cost nothing until a
    // datagram lands in them, so 32 x 64 KiB is cheap.
    let mut rx = RecvBatch::new();
    let mut tx: Vec<Transmit> = Vec::with_capacity(BATCH * 4);
    if let Err(e) = enable_icmp_errors(socket) {
        tracing::warn!(error = %e, "no ICMP errors on the SIP socket: calls to an unreachable trunk run to Timer B");
    }
    // Set when the socket reported an error: its error queue is read
    // before the loop sleeps again.
    let mut errors = false;
    let (mut refused_seen, mut drops_seen) = (0, 0);
    let waker = app.waker();
    // Datagrams in the current and the previous load window.
    let mut window_start = Instant::now();
    let (mut window_in, mut busy) = (0u32, false);
    loop {
        stats.turns += 1;
        let now = Instant::now();
        let received = drain(socket, ep, &mut rx, &mut stats, &mut errors);
        if errors {
            errors = false;
            take_errors(socket, ep, now, &mut stats);
        }
        if stats.receive_drops > drops_seen {
            app.on_receive_drops(stats.receive_drops - drops_seen);
            drops_seen = stats.receive_drops;
        }
        window_in = window_in.saturating_add(received as u32);
        if now >= window_start + LOAD_WINDOW {
            busy = window_in > COALESCE_ABOVE;
            window_start = now;
            window_in = 0;
        }
        ep.handle_timeout(now);
        let app_next = app.poll(now, ep);
        while let Some(ev) = ep.poll_event() {
            app.on_event(ep, ev);
        }
        flush(socket, ep, &mut tx, &mut stats, &mut errors).await;
        // The kernel reports ICMP unreachable on whichever call comes next,
        // a receive or a send: both count, and the app hears of it once.
        if stats.refused > refused_seen {
            refused_seen = stats.refused;
            app.on_refused();
        }
        if app.done(ep) {
            return stats;
        }
        if errors {
            // A send just failed: read why (and fail the calls to that
            // address) in a turn of its own rather than after a sleep.
            continue;
        }
        let next = match (ep.poll_timeout(), app_next) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let woken = async {
            match &waker {
                Some(w) => w.notified().await,
                None => std::future::pending().await,
            }
        };
        if received > 0 && busy && !window.is_zero() {
            // Busy: let the next datagrams gather for a tick (module docs).
            let tick = now + window;
            let at = next.map_or(tick, |n| n.min(tick));
            let wait = at.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
            tokio::task::yield_now().await;
            continue;
        }
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = socket.readable() => { if let Err(e) = r { tracing::warn!(error = %e, "socket"); } }
            // An ICMP error queued while the loop slept (EPOLLERR, which
            // readability does not include).
            r = socket.ready(Interest::ERROR) => match r {
                Ok(_) => errors = true,
                Err(e) => tracing::warn!(error = %e, "socket"),
            },
            _ = sleep => {}
            _ = woken => {}
        }
    }
}

/// Takes what is queued on the socket into the core; returns how many
/// datagrams arrived.
fn drain(
    socket: &UdpSocket,
    ep: &mut Endpoint<StdRng>,
    rx: &mut RecvBatch,
    stats: &mut DriverStats,
    errors: &mut bool,
) -> usize {
    let mut total = 0;
    while total < DRAIN_MAX {
        match socket.try_io(Interest::READABLE, || rx.recv(socket.as_raw_fd())) {
            Ok(n) => {
                // One clock pair per batch maps kernel arrival stamps (wall
                // clock) onto the core's monotonic time.
                let (wall, mono) = (SystemTime::now(), Instant::now());
                for i in 0..n {
                    let arrived = rx.arrival(i, wall, mono).unwrap_or(mono);
                    let (from, datagram, truncated) = rx.get(i);
                    stats.datagrams_in += 1;
                    let Some(from) = from else {
                        stats.malformed += 1;
                        continue;
                    };
                    if truncated {
                        stats.malformed += 1;
                        tracing::debug!(%from, "dropped truncated datagram");
                        continue;
                    }
                    // The core dates what the datagram reports at its
                    // arrival and acts at `mono`, so the 180 -> CANCEL and
                    // post-dial delays include the time it waited in the
                    // socket queue (a coalescing tick, a busy machine). The
                    // CANCEL leaves at the end of this turn's drain, a few
                    // µs per datagram still queued behind it later.
                    if let Input::Malformed(e) = ep.handle_input_at(mono, arrived, from, datagram) {
                        stats.malformed += 1;
                        tracing::debug!(%from, error = %e, "dropped malformed datagram");
                    }
                }
                // The kernel's drop count rides on every datagram queued
                // after the first drop; the last one of the batch has the
                // newest. Cumulative u32, so the difference wraps.
                if let Some(d) = n.checked_sub(1).and_then(|last| rx.drops(last)) {
                    stats.receive_drops += u64::from(d.wrapping_sub(rx.drops_seen));
                    rx.drops_seen = d;
                }
                total += n;
                if n < BATCH {
                    // A short batch means the queue is empty: skip the
                    // receive call that would only say EAGAIN.
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            // A pending ICMP error, reported by whichever call comes next;
            // the error queue says for which destination.
            // (Counted when the queue is read, once per error.)
            Err(e) if e.kind() == ErrorKind::ConnectionRefused || unreachable(&e) => {
                *errors = true;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(error = %e, "SIP socket receive error");
                break;
            }
        }
    }
    total
}

/// Sends every transmit the core has queued, [`BATCH`] per sendmmsg.
async fn flush(
    socket: &UdpSocket,
    ep: &mut Endpoint<StdRng>,
    tx: &mut Vec<Transmit>,
    stats: &mut DriverStats,
    errors: &mut bool,
) {
    tx.clear();
    while let Some(t) = ep.poll_transmit() {
        tx.push(t);
    }
    let mut sent = 0;
    let mut retried = false;
    while sent < tx.len() {
        let end = tx.len().min(sent + BATCH);
        match socket.try_io(Interest::WRITABLE, || {
            send_batch(socket.as_raw_fd(), &tx[sent..end])
        }) {
            Ok(n) => {
                stats.datagrams_out += n as u64;
                sent += n;
                retried = false;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if socket.writable().await.is_err() {
                    stats.send_errors += (tx.len() - sent) as u64;
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if (e.kind() == ErrorKind::ConnectionRefused || unreachable(&e)) && !retried => {
                // A pending ICMP error: it belonged to an earlier datagram
                // (the error queue says which destination, and is where it
                // is counted); this one was not sent, so try it once more.
                *errors = true;
                retried = true;
            }
            Err(e) => {
                // This datagram cannot go (or failed twice): skip it. A
                // destination with no route (or one a local firewall
                // rejects) fails the calls waiting on it, as an ICMP
                // error would.
                let dest = tx[sent].dest;
                if unreachable(&e) {
                    stats.unreachable += 1;
                    ep.transport_failed(Instant::now(), dest);
                }
                stats.send_errors += 1;
                tracing::debug!(%dest, error = %e, "send failed");
                sent += 1;
                retried = false;
            }
        }
    }
    tx.clear();
}

/// Buffers and addresses for one recvmmsg call. Only plain data is kept
/// between calls (the `mmsghdr` array with its raw pointers is rebuilt on the
/// stack each call), so the driver's future stays `Send`.
/// Room for the control messages of one datagram: a `timespec` behind a
/// `cmsghdr` takes 32 bytes on 64-bit Linux, the drop count's u32 24;
/// u64s keep it aligned.
const CTRL_WORDS: usize = 8;

/// Asks for the receive buffer the module docs explain; past
/// `net.core.rmem_max` only a privileged process gets it (SO_RCVBUFFORCE),
/// and otherwise the operator is told, once per socket, what caps it: a
/// small queue drops bursts (counted, see [`App::on_receive_drops`]).
fn enlarge_recv_buffer(socket: &UdpSocket) {
    let sock = socket2::SockRef::from(socket);
    if let Err(e) = sock.set_recv_buffer_size(RECV_BUFFER) {
        tracing::debug!(error = %e, "could not enlarge the SIP socket's receive buffer");
    }
    // Linux reports twice what was set (the doubling covers its own
    // bookkeeping), so half of it is what compares with the ask.
    let granted = || sock.recv_buffer_size().map_or(0, |n| n / 2);
    if granted() >= RECV_BUFFER {
        return;
    }
    // Refused (EPERM) without CAP_NET_ADMIN; what was granted is read
    // back either way.
    let _ = set_socket_int(
        socket.as_raw_fd(),
        libc::SO_RCVBUFFORCE,
        RECV_BUFFER as libc::c_int,
    );
    let got = granted();
    if got < RECV_BUFFER {
        tracing::warn!(
            granted_kib = got / 1024,
            wanted_kib = RECV_BUFFER / 1024,
            "the SIP socket's receive buffer is smaller than wanted: net.core.rmem_max caps \
             it; raise it (sysctl -w net.core.rmem_max={RECV_BUFFER}) or run with \
             CAP_NET_ADMIN, so that bursts are queued rather than dropped"
        );
    }
}

/// An integer `SOL_SOCKET` option that socket2 has no setter for.
fn set_socket_int(fd: i32, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    set_int(fd, libc::SOL_SOCKET, option, value)
}

/// An integer socket option at `level`.
fn set_int(fd: i32, level: libc::c_int, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `value`.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asks the kernel to report, with each datagram, how many it dropped for
/// this socket so far (`SO_RXQ_OVFL`, a control message by recvmmsg).
fn enable_drop_count(fd: i32) -> io::Result<()> {
    set_socket_int(fd, libc::SO_RXQ_OVFL, 1)
}

/// Asks the kernel to stamp each received datagram with its arrival time
/// (`SO_TIMESTAMPNS`, delivered as a control message by recvmmsg).
fn enable_timestamps(fd: i32) -> io::Result<()> {
    set_socket_int(fd, libc::SO_TIMESTAMPNS, 1)
}

/// The receive side of recvmmsg: buffers, senders, and the kernel's arrival
/// stamp of each datagram.
struct RecvBatch {
    bufs: Vec<u8>,
    ctrl: [[u64; CTRL_WORDS]; BATCH],
    ctrl_lens: [usize; BATCH],
    addrs: [libc::sockaddr_storage; BATCH],
    lens: [usize; BATCH],
    addr_lens: [libc::socklen_t; BATCH],
    truncated: [bool; BATCH],
    /// The kernel's cumulative drop count as last reported.
    drops_seen: u32,
}

impl RecvBatch {
    fn new() -> Self {
        RecvBatch {
            bufs: vec![0u8; BATCH * DATAGRAM_MAX],
            // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
            addrs: unsafe { std::mem::zeroed() },
            lens: [0; BATCH],
            addr_lens: [0; BATCH],
            truncated: [false; BATCH],
            ctrl: [[0; CTRL_WORDS]; BATCH],
            ctrl_lens: [0; BATCH],
            drops_seen: 0,
        }
    }

    /// Datagram `i`'s control message of `level`/`kind`, read as a `T`.
    fn control<T: Copy>(&self, i: usize, level: i32, kind: i32) -> Option<T> {
        // SAFETY: msghdr is plain old data; all-zero is valid.
        let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
        h.msg_control = self.ctrl[i].as_ptr() as *mut libc::c_void;
        h.msg_controllen = self.ctrl_lens[i] as _;
        // SAFETY: `h` describes our control buffer with the length the
        // kernel wrote; CMSG_FIRSTHDR/NXTHDR stay within it.
        let mut c = unsafe { libc::CMSG_FIRSTHDR(&h) };
        while !c.is_null() {
            // SAFETY: non-null cmsg pointers from the macros point into the
            // buffer, which is u64-aligned.
            let hdr = unsafe { &*c };
            let len = hdr.cmsg_len as usize;
            // SAFETY: CMSG_LEN is arithmetic on its argument.
            let want = unsafe { libc::CMSG_LEN(std::mem::size_of::<T>() as u32) } as usize;
            if hdr.cmsg_level == level && hdr.cmsg_type == kind && len >= want {
                // SAFETY: the kernel wrote a `T` behind this header (its
                // length says so); read_unaligned needs no alignment.
                return Some(unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(c).cast()) });
            }
            // SAFETY: as above.
            c = unsafe { libc::CMSG_NXTHDR(&h, c) };
        }
        None
    }

    /// The kernel's count of datagrams dropped for the socket before
    /// datagram `i` was queued; None until the first drop.
    fn drops(&self, i: usize) -> Option<u32> {
        self.control(i, libc::SOL_SOCKET, libc::SO_RXQ_OVFL)
    }

    /// When datagram `i` arrived, on the monotonic clock: its kernel stamp
    /// (wall clock) moved back from `mono` by its age at `wall`. None
    /// without a stamp, or with an age no queue explains (over 10 s: the
    /// wall clock was stepped), when the caller's `now` is the best guess.
    fn arrival(&self, i: usize, wall: SystemTime, mono: Instant) -> Option<Instant> {
        let ts: libc::timespec = self.control(i, libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS)?;
        let at = UNIX_EPOCH
            + Duration::new(
                u64::try_from(ts.tv_sec).ok()?,
                u32::try_from(ts.tv_nsec).ok()?,
            );
        // A stamp after `wall` (clock noise) is an age of zero.
        let age = wall.duration_since(at).unwrap_or(Duration::ZERO);
        (age <= Duration::from_secs(10)).then(|| mono.checked_sub(age).unwrap_or(mono))
    }

    /// One non-blocking recvmmsg(2); returns how many datagrams arrived.
    fn recv(&mut self, fd: i32) -> io::Result<usize> {
        // SAFETY: iovec and mmsghdr are plain old data; all-zero is valid.
        let mut iovs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        let base = self.bufs.as_mut_ptr();
        for i in 0..BATCH {
            // SAFETY: i * DATAGRAM_MAX + DATAGRAM_MAX <= bufs.len().
            iovs[i].iov_base = unsafe { base.add(i * DATAGRAM_MAX) }.cast();
            iovs[i].iov_len = DATAGRAM_MAX;
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = self.ctrl[i].as_mut_ptr().cast();
            h.msg_controllen = std::mem::size_of::<[u64; CTRL_WORDS]>() as _;
        }
        // SAFETY: every pointer in `hdrs` points into `self` or `iovs`,
        // which outlive the call; the kernel writes within the given lengths.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (i, h) in hdrs.iter().take(n).enumerate() {
            self.lens[i] = (h.msg_len as usize).min(DATAGRAM_MAX);
            self.addr_lens[i] = h.msg_hdr.msg_namelen;
            self.truncated[i] = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            self.ctrl_lens[i] = h.msg_hdr.msg_controllen;
        }
        Ok(n)
    }

    /// Datagram `i` of the last batch: (sender, payload, truncated).
    fn get(&self, i: usize) -> (Option<SocketAddr>, &[u8], bool) {
        let start = i * DATAGRAM_MAX;
        let data = &self.bufs[start..start + self.lens[i]];
        (
            from_sockaddr(&self.addrs[i], self.addr_lens[i]),
            data,
            self.truncated[i],
        )
    }
}

/// The std address of a sockaddr the kernel filled in.
fn from_sockaddr(ss: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match i32::from(ss.ss_family) {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, and
            // sockaddr_storage is large and aligned enough for it.
            let a = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// The sockaddr for a destination, with its length.
fn to_sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any
            // sockaddr type.
            let s = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            s.sin_family = libc::AF_INET as libc::sa_family_t;
            s.sin_port = a.port().to_be();
            s.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above.
            let s = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            s.sin6_port = a.port().to_be();
            s.sin6_addr.s6_addr = a.ip().octets();
            s.sin6_flowinfo = a.flowinfo();
            s.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// One non-blocking sendmmsg(2) of up to [`BATCH`] transmits; returns how
/// many were sent (the first unsent one is where an error, if any, lies).
fn send_batch(fd: i32, batch: &[Transmit]) -> io::Result<usize> {
    let n = batch.len().min(BATCH);
    // Only the first `n` entries are written and passed to the kernel, so
    // the arrays stay uninitialised: zeroing 32 of each (6.6 KB) on every
    // call cost more than filling the few that a turn sends.
    let mut addrs = [const { MaybeUninit::<libc::sockaddr_storage>::uninit() }; BATCH];
    let mut iovs = [const { MaybeUninit::<libc::iovec>::uninit() }; BATCH];
    let mut hdrs = [const { MaybeUninit::<libc::mmsghdr>::uninit() }; BATCH];
    for (i, t) in batch.iter().take(n).enumerate() {
        let (ss, namelen) = to_sockaddr(t.dest);
        let name = addrs[i].write(ss) as *mut libc::sockaddr_storage;
        let iov = iovs[i].write(libc::iovec {
            iov_base: t.payload.as_ptr() as *mut libc::c_void,
            iov_len: t.payload.len(),
        });
        // SAFETY: msghdr and mmsghdr are plain old data; all-zero is valid
        // (no control data, no flags), then the fields we use are set.
        let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
        h.msg_hdr.msg_name = name.cast();
        h.msg_hdr.msg_namelen = namelen;
        h.msg_hdr.msg_iov = iov;
        h.msg_hdr.msg_iovlen = 1;
        hdrs[i].write(h);
    }
    // SAFETY: entries 0..n of `hdrs` are initialised and point at `addrs`,
    // `iovs` and the payloads in `batch`, all alive for the call; the kernel
    // only reads them (and writes msg_len of those n entries).
    let r = unsafe {
        libc::sendmmsg(
            fd,
            hdrs.as_mut_ptr().cast::<libc::mmsghdr>(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// Errors that say a destination cannot be reached (RFC 3261 §18.4's
/// transport failures), besides ICMP port unreachable's
/// `ConnectionRefused`: no route, host or network unreachable (ICMP or
/// the local routing table), a local firewall's reject.
fn unreachable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EACCES
                | libc::EPERM
        )
    )
}

/// Asks the kernel to queue ICMP errors on the socket with the address
/// they are about (IP_RECVERR / IPV6_RECVERR). Without it an unconnected
/// UDP socket never hears of them, and a call to a trunk where nothing
/// listens retransmits its INVITE for Timer B's 32 s.
///
/// An IPv6 socket asks for both: IPv4 trunks reached through it (`listen =
/// "[::]:5060"`) have their errors queued only under IP_RECVERR.
fn enable_icmp_errors(socket: &UdpSocket) -> io::Result<()> {
    let set = |level, option| set_int(socket.as_raw_fd(), level, option, 1);
    match socket.local_addr()? {
        SocketAddr::V4(_) => set(libc::SOL_IP, libc::IP_RECVERR),
        SocketAddr::V6(_) => {
            set(libc::SOL_IPV6, libc::IPV6_RECVERR)?;
            // A v6-only socket may refuse it; it has no IPv4 peers then.
            let _ = set(libc::SOL_IP, libc::IP_RECVERR);
            Ok(())
        }
    }
}

/// Reads the socket's error queue to the end and fails the calls to each
/// destination an ICMP error names. Reading it also clears the socket's
/// pending error.
fn take_errors(
    socket: &UdpSocket,
    ep: &mut Endpoint<StdRng>,
    now: Instant,
    stats: &mut DriverStats,
) {
    let mut found = Vec::new();
    read_errors(socket, &mut found);
    for (dest, errno) in found {
        if errno == libc::ECONNREFUSED {
            stats.refused += 1;
        }
        stats.unreachable += 1;
        tracing::debug!(%dest, errno, "ICMP: destination unreachable");
        ep.transport_failed(now, dest);
    }
}

/// The unreachable destinations (with their errno) queued on the socket's
/// error queue, read to its end.
///
/// Read directly rather than through `try_io(Interest::ERROR)`: that runs
/// nothing until tokio's reactor has seen the EPOLLERR, and when a receive
/// or send has just reported the error it usually has not, so the queue
/// stayed unread (under load, where the loop does not wait on the reactor,
/// until the next ICMP). Tokio's error readiness is cleared afterwards, so
/// the driver's wait on it does not fire again for what was read.
fn read_errors(socket: &UdpSocket, found: &mut Vec<(SocketAddr, i32)>) {
    // Bounded like `drain`, so a flood of errors cannot hold the loop.
    for _ in 0..DRAIN_MAX {
        match recv_error(socket.as_raw_fd()) {
            Ok(Some(x)) => found.push(x),
            // Not about reachability (a path MTU report, a TTL exceeded).
            Ok(None) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // WouldBlock: the queue is empty.
            Err(_) => break,
        }
    }
    let _ = socket.try_io(Interest::ERROR, || -> io::Result<()> {
        Err(ErrorKind::WouldBlock.into())
    });
}

/// One entry of the error queue: the destination it names and the errno,
/// if it is an ICMP error that says the destination cannot be reached.
fn recv_error(fd: i32) -> io::Result<Option<(SocketAddr, i32)>> {
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
    let mut name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    // The bounced datagram's first bytes: not needed (see
    // `Endpoint::transport_failed`), so a small buffer, truncated.
    let mut data = [0u8; 64];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // sock_extended_err and the offender's address behind a cmsghdr;
    // u64s keep it aligned.
    let mut control = [0u64; 16];
    // SAFETY: msghdr is plain old data; all-zero is valid, then the
    // fields used are set.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: every pointer in `msg` is to a live local of the size given.
    let r = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = None;
    // SAFETY: the CMSG macros walk the control buffer the kernel filled in,
    // within msg_controllen.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: a non-null header from CMSG_FIRSTHDR/NXTHDR is in bounds.
        let c = unsafe { &*cmsg };
        let ours = (c.cmsg_level == libc::SOL_IP && c.cmsg_type == libc::IP_RECVERR)
            || (c.cmsg_level == libc::SOL_IPV6 && c.cmsg_type == libc::IPV6_RECVERR);
        // SAFETY: CMSG_LEN only computes a length.
        let need = unsafe { libc::CMSG_LEN(std::mem::size_of::<libc::sock_extended_err>() as _) };
        if ours && c.cmsg_len as usize >= need as usize {
            // SAFETY: this cmsg type carries a sock_extended_err first;
            // read unaligned, as CMSG_DATA promises no alignment.
            let ee = unsafe {
                std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::sock_extended_err>())
            };
            // Destination unreachable only (ICMP type 3, ICMPv6 type 1),
            // any code but "fragmentation needed" (a path MTU report).
            // RFC 3261 §18.4 has TTL exceeded and source quench ignored:
            // a brief routing loop must not fail every call and rest
            // the trunk.
            let unreach = matches!(
                (ee.ee_origin, ee.ee_type),
                (libc::SO_EE_ORIGIN_ICMP, 3) | (libc::SO_EE_ORIGIN_ICMP6, 1)
            );
            let errno = i32::try_from(ee.ee_errno).unwrap_or(0);
            if unreach && errno != libc::EMSGSIZE {
                found = from_sockaddr(&name, msg.msg_namelen).map(|a| (canonical(a), errno));
            }
        }
        // SAFETY: as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok(found)
}

/// An IPv4 peer of an IPv6 socket as the IPv4 address it is
/// (`::ffff:a.b.c.d` -> `a.b.c.d`), the form trunks are configured in.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

/// The address to bind for talking to `trunk`: loopback stays on loopback.
pub fn default_bind(trunk: SocketAddr) -> SocketAddr {
    match (trunk.is_ipv4(), trunk.ip().is_loopback()) {
        (true, true) => "127.0.0.1:0".parse().expect("literal"),
        (true, false) => "0.0.0.0:0".parse().expect("literal"),
        (false, true) => "[::1]:0".parse().expect("literal"),
        (false, false) => "[::]:0".parse().expect("literal"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_round_trip() {
        for a in ["127.0.0.1:5060", "[::1]:5070", "[fe80::1%2]:5080"] {
            let a: SocketAddr = a.parse().expect("literal");
            let (ss, len) = to_sockaddr(a);
            assert_eq!(from_sockaddr(&ss, len), Some(a));
        }
    }

    /// Many datagrams each way through the batched calls, with the
    /// senders' addresses right.
    #[tokio::test]
    async fn batches_round_trip() {
        let a = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let b = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let to = b.local_addr().expect("addr");
        let batch: Vec<Transmit> = (0..BATCH + 5)
            .map(|i| Transmit {
                dest: to,
                payload: bytes::Bytes::from(format!("datagram {i}")),
            })
            .collect();
        let mut sent = 0;
        while sent < batch.len() {
            sent += send_batch(a.as_raw_fd(), &batch[sent..]).expect("sendmmsg");
        }
        let mut rx = RecvBatch::new();
        let mut got = Vec::new();
        while got.len() < batch.len() {
            b.readable().await.expect("readable");
            match b.try_io(Interest::READABLE, || rx.recv(b.as_raw_fd())) {
                Ok(n) => {
                    for i in 0..n {
                        let (from, data, truncated) = rx.get(i);
                        assert_eq!(from, Some(a.local_addr().expect("addr")));
                        assert!(!truncated);
                        got.push(String::from_utf8(data.to_vec()).expect("utf8"));
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        let want: Vec<String> = (0..batch.len()).map(|i| format!("datagram {i}")).collect();
        assert_eq!(got, want);
    }

    /// One batch to two destinations: each datagram reaches its own
    /// receiver, in order.
    #[tokio::test]
    async fn one_batch_reaches_two_destinations() {
        let a = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let b = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let c = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let (bb, cc) = (b.local_addr().expect("addr"), c.local_addr().expect("addr"));
        let batch: Vec<Transmit> = (0..6)
            .map(|i| Transmit {
                dest: if i % 2 == 0 { bb } else { cc },
                payload: bytes::Bytes::from(format!("d{i}")),
            })
            .collect();
        let sent = send_batch(a.as_raw_fd(), &batch).expect("sendmmsg");
        assert_eq!(sent, 6);
        let mut buf = [0u8; 64];
        for (sock, want) in [(&b, ["d0", "d2", "d4"]), (&c, ["d1", "d3", "d5"])] {
            for w in want {
                let n = sock.recv(&mut buf).await.expect("recv");
                assert_eq!(&buf[..n], w.as_bytes());
            }
        }
    }

    /// A datagram to a port where nothing listens comes back as an ICMP
    /// port unreachable in the error queue, naming that port's address;
    /// the error readiness wakes a waiter, and reading the queue empties it
    /// (no second report, no error left on the next receive).
    #[tokio::test]
    async fn icmp_port_unreachable_names_the_destination() {
        let a = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        enable_icmp_errors(&a).expect("IP_RECVERR");
        let closed = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            s.local_addr().expect("addr")
        };
        let open = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let to = |dest, payload| Transmit {
            dest,
            payload: bytes::Bytes::from_static(payload),
        };
        let nobody = [to(closed, b"nobody")];
        assert_eq!(send_batch(a.as_raw_fd(), &nobody).expect("sendmmsg"), 1);
        // While the loop waits: error readiness wakes it.
        tokio::time::timeout(Duration::from_secs(5), a.ready(Interest::ERROR))
            .await
            .expect("an ICMP error within 5 s")
            .expect("ready");
        let mut found = Vec::new();
        read_errors(&a, &mut found);
        assert_eq!(found, [(closed, libc::ECONNREFUSED)]);
        // Read to its end, and the readiness cleared: no second wake-up
        // for the same error.
        let woke = tokio::time::timeout(Duration::from_millis(50), a.ready(Interest::ERROR));
        assert!(woke.await.is_err(), "error readiness left set");
        let mut rx = RecvBatch::new();
        assert_eq!(
            rx.recv(a.as_raw_fd()).map_err(|e| e.kind()),
            Err(ErrorKind::WouldBlock),
            "reading the error queue clears the socket's pending error"
        );
        // Right after a send, before tokio's reactor has seen the error
        // (the driver's case when a receive or send reports it): read too.
        assert_eq!(send_batch(a.as_raw_fd(), &nobody).expect("sendmmsg"), 1);
        found.clear();
        read_errors(&a, &mut found);
        assert_eq!(found, [(closed, libc::ECONNREFUSED)]);
        // Nor on the next send (it would fail ECONNREFUSED).
        let somebody = [to(open.local_addr().expect("addr"), b"somebody")];
        assert_eq!(send_batch(a.as_raw_fd(), &somebody).expect("sendmmsg"), 1);
        let mut buf = [0u8; 16];
        let n = open.recv(&mut buf).await.expect("recv");
        assert_eq!(&buf[..n], b"somebody");
    }

    /// The same over IPv6 (ICMPv6, IPV6_RECVERR), and for an IPv4 peer of
    /// an IPv6 socket (`listen = "[::]:5060"` with an IPv4 trunk): its
    /// error is queued under IP_RECVERR and named `::ffff:a.b.c.d`, which
    /// must come back as the IPv4 address the trunk is configured with.
    #[tokio::test]
    async fn icmp_errors_over_ipv6_and_for_ipv4_peers_of_an_ipv6_socket() {
        // Bound to the v4-mapped loopback rather than `[::]`, so the
        // socket stays on loopback.
        for (bind, peer) in [
            ("[::1]:0", "[::1]:0"),
            ("[::ffff:127.0.0.1]:0", "127.0.0.1:0"),
        ] {
            // A machine with IPv6 off (some containers) cannot run these.
            let a = match UdpSocket::bind(bind).await {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("skipped {bind}: no IPv6 here ({e})");
                    continue;
                }
            };
            enable_icmp_errors(&a).expect("IPV6_RECVERR");
            let closed = {
                let s = std::net::UdpSocket::bind(peer).expect("bind");
                s.local_addr().expect("addr")
            };
            let nobody = [Transmit {
                dest: closed,
                payload: bytes::Bytes::from_static(b"nobody"),
            }];
            assert_eq!(send_batch(a.as_raw_fd(), &nobody).expect("sendmmsg"), 1);
            let mut found = Vec::new();
            let end = Instant::now() + Duration::from_secs(5);
            while found.is_empty() && Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(10)).await;
                read_errors(&a, &mut found);
            }
            assert_eq!(found, [(closed, libc::ECONNREFUSED)], "{bind} -> {peer}");
        }
    }

    /// A datagram that waited in the socket queue is seen at its arrival:
    /// the kernel's stamp, mapped onto the monotonic clock, is at least the
    /// wait before the receive call (what the delay histograms rely on).
    #[tokio::test]
    async fn arrival_is_the_kernel_stamp_not_the_receive_call() {
        let a = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let b = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        enable_timestamps(a.as_raw_fd()).expect("SO_TIMESTAMPNS");
        let mut rx = RecvBatch::new();
        // Sends one datagram, waits `queued`, reads it: (sent before, read
        // at, its arrival stamp).
        let mut probe = async |queued: Duration| {
            let before = Instant::now();
            b.send_to(b"queued", a.local_addr().expect("addr"))
                .expect("send");
            std::thread::sleep(queued);
            loop {
                match rx.recv(a.as_raw_fd()) {
                    Ok(n) => {
                        assert_eq!(n, 1);
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        a.readable().await.expect("readable");
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            let (wall, mono) = (SystemTime::now(), Instant::now());
            let at = rx.arrival(0, wall, mono).expect("a kernel timestamp");
            (before, mono, at)
        };
        // The kernel turns receive stamping on from a work queue: a datagram
        // that comes before that is stamped only when it is read. Probe
        // (for at most 2 s) until stamps come at arrival.
        let end = Instant::now() + Duration::from_secs(2);
        while {
            let (_, read, at) = probe(Duration::from_millis(5)).await;
            read - at < Duration::from_millis(4) && Instant::now() < end
        } {}
        let (sent, mono, at) = probe(Duration::from_millis(30)).await;
        assert!(
            mono - at >= Duration::from_millis(25),
            "arrival {:?} before the receive, slept 30 ms",
            mono - at
        );
        // And not before it was sent (1 ms of clock-mapping slack).
        assert!(at + Duration::from_millis(1) >= sent);
        // Without a control message there is no stamp.
        let mut empty = RecvBatch::new();
        empty.ctrl_lens[0] = 0;
        assert_eq!(empty.arrival(0, SystemTime::now(), mono), None);
    }

    /// Datagrams in a burst at [`flooded`]'s socket.
    const SENT: usize = 200;

    /// A socket counting drops (what `run` turns on) with the smallest
    /// receive queue the kernel allows (a few KiB: room for a handful of
    /// datagrams), after a burst of [`SENT`] from the peer returned.
    async fn flooded() -> (UdpSocket, std::net::UdpSocket, SocketAddr) {
        let a = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = a.local_addr().expect("addr");
        enable_drop_count(a.as_raw_fd()).expect("SO_RXQ_OVFL");
        socket2::SockRef::from(&a)
            .set_recv_buffer_size(1)
            .expect("SO_RCVBUF");
        for _ in 0..SENT {
            peer.send_to(&[b'x'; 200], to).expect("send");
        }
        // Loopback delivery can be left to ksoftirqd on a busy machine:
        // let the burst land (queued or dropped) before anyone reads.
        std::thread::sleep(Duration::from_millis(50));
        (a, peer, to)
    }

    /// A receive queue too small for a burst: the kernel drops the rest,
    /// and the next datagram queued carries how many (SO_RXQ_OVFL).
    #[tokio::test]
    async fn kernel_drops_ride_on_the_next_datagram() {
        let (a, b, to) = flooded().await;
        let mut rx = RecvBatch::new();
        let mut queued = 0;
        loop {
            match rx.recv(a.as_raw_fd()) {
                Ok(n) => {
                    // No drop had happened when these were queued.
                    assert!((0..n).all(|i| rx.drops(i).is_none()));
                    queued += n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(queued > 0 && queued < SENT, "{queued} of {SENT} queued");
        b.send_to(b"after", to).expect("send");
        // Read until it: a straggler of the burst would come first.
        let drops = loop {
            a.readable().await.expect("readable");
            match rx.recv(a.as_raw_fd()) {
                Ok(n) => {
                    if let Some(i) = (0..n).find(|&i| rx.get(i).1 == b"after") {
                        queued += i;
                        break rx.drops(i);
                    }
                    queued += n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(drops, Some((SENT - queued) as u32));
    }

    /// An endpoint for the driver tests, seeded, at `to`.
    fn endpoint_at(to: SocketAddr) -> Endpoint<StdRng> {
        Endpoint::new(
            crate::sip::EndpointConfig {
                timers: Default::default(),
                local: to,
                sent_by: None,
                public_host: "127.0.0.1".into(),
                user_agent: "test".into(),
                media: to,
            },
            <StdRng as rand::SeedableRng>::seed_from_u64(1),
        )
    }

    /// The driver counts those drops and tells the app once per report:
    /// a burst overflows a small queue before the loop runs, then the app
    /// sends one more datagram, which carries the kernel's count.
    #[tokio::test]
    async fn the_driver_reports_kernel_drops_to_the_app() {
        struct Flooded {
            peer: std::net::UdpSocket,
            to: SocketAddr,
            turns: u32,
            drops: u64,
            reports: u32,
            until: Instant,
        }
        impl App for Flooded {
            fn poll(&mut self, now: Instant, _ep: &mut Endpoint<StdRng>) -> Option<Instant> {
                self.turns += 1;
                // The first turn took the queued burst; now one more.
                if self.turns == 2 {
                    self.peer.send_to(b"after", self.to).expect("send");
                }
                Some(now + Duration::from_millis(1))
            }
            fn on_event(&mut self, _ep: &mut Endpoint<StdRng>, _event: Event) {}
            fn on_receive_drops(&mut self, n: u64) {
                self.drops += n;
                self.reports += 1;
            }
            fn done(&self, _ep: &Endpoint<StdRng>) -> bool {
                self.drops > 0 || Instant::now() >= self.until
            }
        }
        // `run` enlarges the queue when it starts, after the drops.
        let (a, peer, to) = flooded().await;
        let mut ep = endpoint_at(to);
        let mut app = Flooded {
            peer,
            to,
            turns: 0,
            drops: 0,
            reports: 0,
            until: Instant::now() + Duration::from_secs(5),
        };
        let stats = run(&a, &mut ep, &mut app, COALESCE).await;
        // Every datagram that got in (the burst's first few and the last
        // one) was garbage to the parser; the rest were dropped.
        assert_eq!(stats.malformed, stats.datagrams_in);
        assert_eq!(app.drops, SENT as u64 + 1 - stats.datagrams_in, "{stats:?}");
        assert_eq!(stats.receive_drops, app.drops);
        assert_eq!(app.reports, 1);
    }

    /// With `sip.thread = "shared"` the driver is a task on a runtime of one
    /// worker, and under load its tick's sleep blocks that worker: the
    /// other tasks (the HTTP side) must still run at every tick, not wait
    /// for the load to end. A peer floods the socket past the busy
    /// threshold while a second task counts its 1 ms timer turns.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_busy_driver_on_a_shared_worker_lets_other_tasks_run() {
        struct Busy {
            until: Instant,
        }
        impl App for Busy {
            fn poll(&mut self, now: Instant, _ep: &mut Endpoint<StdRng>) -> Option<Instant> {
                Some(now + Duration::from_millis(5))
            }
            fn on_event(&mut self, _ep: &mut Endpoint<StdRng>, _event: Event) {}
            fn done(&self, _ep: &Endpoint<StdRng>) -> bool {
                Instant::now() >= self.until
            }
        }
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let to = socket.local_addr().expect("addr");
        let span = Duration::from_millis(400);
        // Four datagrams every 100 µs or so, many times the busy threshold
        // and so evenly that every tick has some, for the driver's whole
        // run; loopback only, and bounded (at most 20,000). Four at a time:
        // on a machine busy with other tests a 100 µs sleep can take 300 µs
        // and more, and one datagram a sleep then came to under two per
        // 500 µs tick, which made the coalescing check below fail now and
        // then with the coalescing working.
        let flood = std::thread::spawn(move || {
            let peer = std::net::UdpSocket::bind("127.0.0.1:0").expect("peer");
            let end = Instant::now() + span + Duration::from_millis(100);
            while Instant::now() < end {
                for _ in 0..4 {
                    let _ = peer.send_to(b"not sip", to);
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        });
        let ticks = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counter = {
            let ticks = ticks.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        };
        let driver = tokio::spawn(async move {
            let mut ep = endpoint_at(to);
            let mut app = Busy {
                until: Instant::now() + span,
            };
            run(&socket, &mut ep, &mut app, Duration::from_micros(500)).await
        });
        let stats = driver.await.expect("driver task");
        let turns_of_the_other = ticks.load(std::sync::atomic::Ordering::Relaxed);
        counter.abort();
        flood.join().expect("flood thread");
        // Coalescing ran: far fewer turns than datagrams.
        assert!(stats.datagrams_in > 500, "{stats:?}");
        assert!(stats.turns * 2 < stats.datagrams_in, "{stats:?}");
        // Starved, the other task would have counted nothing until the
        // driver ended; run every tick, it counted about one a millisecond.
        assert!(
            turns_of_the_other >= 40,
            "the other task ran {turns_of_the_other} times in {span:?}: {stats:?}"
        );
    }
}
