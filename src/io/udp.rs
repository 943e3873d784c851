//! The UDP driver: one socket, one loop, no task, channel or lock per call.
//!
//! Each turn drains every datagram already queued on the socket, fires due
//! timers, lets the application start calls, flushes the core's transmits and
//! hands its events to the application, then sleeps until the socket is
//! readable or the next deadline (core timer or application pacing).

use rand::rngs::StdRng;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::UdpSocket;
use tokio::sync::Notify;

use crate::sip::{Endpoint, Event, Input};

/// What drives the endpoint: starts calls and consumes events.
pub trait App {
    /// Start what is due at `now`; return when to be called again.
    fn poll(&mut self, now: Instant, ep: &mut Endpoint<StdRng>) -> Option<Instant>;
    fn on_event(&mut self, ep: &mut Endpoint<StdRng>, event: Event);
    /// ICMP port unreachable came back for something we sent.
    fn on_refused(&mut self) {}
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
    pub malformed: u64,
}

/// Runs `app` over `ep` on `socket` until the app is done.
pub async fn run(socket: &UdpSocket, ep: &mut Endpoint<StdRng>, app: &mut impl App) -> DriverStats {
    let mut stats = DriverStats::default();
    let mut buf = vec![0u8; 65_536];
    let mut refused_seen = 0;
    let waker = app.waker();
    loop {
        let now = Instant::now();
        // A bounded drain keeps timers and pacing on time under a flood.
        for _ in 0..1024 {
            match socket.try_recv_from(&mut buf) {
                Ok((n, from)) => {
                    stats.datagrams_in += 1;
                    if let Input::Malformed(e) = ep.handle_input(now, from, &buf[..n]) {
                        stats.malformed += 1;
                        tracing::debug!(%from, error = %e, "dropped malformed datagram");
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => stats.refused += 1,
                Err(e) => {
                    tracing::warn!(error = %e, "SIP socket receive error");
                    break;
                }
            }
        }
        ep.handle_timeout(now);
        let app_next = app.poll(now, ep);
        flush(socket, ep, &mut stats).await;
        while let Some(ev) = ep.poll_event() {
            app.on_event(ep, ev);
        }
        flush(socket, ep, &mut stats).await;
        // The kernel reports ICMP unreachable on whichever call comes next,
        // a receive or a send: both count, and the app hears of it once.
        if stats.refused > refused_seen {
            refused_seen = stats.refused;
            app.on_refused();
        }
        if app.done(ep) {
            return stats;
        }
        let next = match (ep.poll_timeout(), app_next) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = socket.readable() => { if let Err(e) = r { tracing::warn!(error = %e, "socket"); } }
            _ = sleep => {}
            _ = async {
                match &waker {
                    Some(w) => w.notified().await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

async fn flush(socket: &UdpSocket, ep: &mut Endpoint<StdRng>, stats: &mut DriverStats) {
    while let Some(t) = ep.poll_transmit() {
        loop {
            match socket.try_send_to(&t.payload, t.dest) {
                Ok(_) => {
                    stats.datagrams_out += 1;
                    break;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if socket.writable().await.is_err() {
                        stats.send_errors += 1;
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    // The error belonged to an earlier datagram; this one
                    // was not sent, so try it once more.
                    stats.refused += 1;
                    if socket.try_send_to(&t.payload, t.dest).is_ok() {
                        stats.datagrams_out += 1;
                    }
                    break;
                }
                Err(e) => {
                    stats.send_errors += 1;
                    tracing::debug!(dest = %t.dest, error = %e, "send failed");
                    break;
                }
            }
        }
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
