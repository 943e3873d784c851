//! `flashcall dial`: flash calls straight to a trunk, no HTTP, for testing a
//! trunk and for load (SPEC §1).

use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::net::UdpSocket;

use crate::io::{rtp, udp};
use crate::sip::{
    CallRequest, CallerId, Credentials, Endpoint, EndpointConfig, Event, Outcome, TimerConfig,
};

/// Options of `flashcall dial` (the CLI parses straight into this).
#[derive(Debug, Clone, clap::Args)]
pub struct DialOptions {
    /// Trunk HOST:PORT (UDP).
    #[arg(long)]
    pub trunk: String,
    /// Destination number, E.164.
    #[arg(long, conflicts_with = "to_prefix")]
    pub to: Option<String>,
    /// Number the destinations: prefix + index.
    #[arg(long)]
    pub to_prefix: Option<String>,
    /// Caller number shown to the callee, E.164.
    #[arg(long, default_value = "+447700900000")]
    pub from: String,
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    /// Calls per second.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    #[arg(long)]
    pub username: Option<String>,
    #[arg(long)]
    pub password: Option<String>,
    /// Hold after 180/183 before the CANCEL.
    #[arg(long, default_value_t = 0)]
    pub ring_ms: u64,
    /// No 180/183 by then: CANCEL, outcome no_ringing.
    #[arg(long, default_value_t = 15_000)]
    pub ring_timeout_ms: u64,
    /// Where the caller number goes: from, pai or both.
    #[arg(long, default_value = "from", value_parser = parse_caller_id)]
    pub caller_id: CallerId,
    /// Local SIP address (default: loopback for a loopback trunk, else any).
    #[arg(long)]
    pub bind: Option<SocketAddr>,
    /// One JSON line per call, then a summary line.
    #[arg(long)]
    pub json: bool,
}

fn parse_caller_id(s: &str) -> Result<CallerId, String> {
    match s {
        "from" => Ok(CallerId::From),
        "pai" => Ok(CallerId::Pai),
        "both" => Ok(CallerId::Both),
        _ => Err(format!("{s:?}: expected from, pai or both")),
    }
}

#[derive(Debug, Error)]
pub enum DialError {
    #[error("invalid --trunk {0:?}: expected HOST:PORT ({1})")]
    Trunk(String, String),
    #[error("invalid {0} {1:?}: expected E.164, '+' then 7 to 15 digits")]
    Number(&'static str, String),
    #[error("give --to or --to-prefix")]
    NoDestination,
    #[error("--to-prefix {0:?} leaves too few digits for {1} numbers within 15")]
    Prefix(String, u64),
    #[error("--rate must be a positive number of calls per second")]
    Rate,
    #[error("--username and --password go together")]
    Credentials,
    #[error("cannot bind the SIP socket on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("trunk {0} is unreachable: ICMP port unreachable and no SIP response (is anything listening there?)")]
    Unreachable(SocketAddr),
}

/// E.164: `+` then 7 to 15 digits, first digit not 0.
pub fn is_e164(s: &str) -> bool {
    let Some(d) = s.strip_prefix('+') else {
        return false;
    };
    (7..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()) && !d.starts_with('0')
}

/// How the destination of call `i` is made: one fixed number, or a prefix
/// and the index zero-padded to a width.
enum Destinations {
    Fixed(String),
    Numbered { prefix: String, width: usize },
}

impl Destinations {
    /// Writes the destination of call `i` into `out` (cleared first), `i`
    /// zero-padded to `width`. itoa, not `format!`: padding through the
    /// formatting machinery cost more than the rest of starting a call, and
    /// this runs twice per call (INVITE and `--json` line).
    fn write(&self, i: u64, out: &mut String) {
        out.clear();
        match self {
            Destinations::Fixed(to) => out.push_str(to),
            Destinations::Numbered { prefix, width } => {
                out.push_str(prefix);
                crate::pool::push_digits(out, i, *width);
            }
        }
    }

    fn get(&self, i: u64) -> String {
        let mut s = String::with_capacity(16);
        self.write(i, &mut s);
        s
    }
}

fn destinations(opts: &DialOptions) -> Result<Destinations, DialError> {
    if let Some(to) = &opts.to {
        if !is_e164(to) {
            return Err(DialError::Number("--to", to.clone()));
        }
        return Ok(Destinations::Fixed(to.clone()));
    }
    let prefix = opts.to_prefix.clone().ok_or(DialError::NoDestination)?;
    let digits = prefix.strip_prefix('+').unwrap_or("");
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DialError::Number("--to-prefix", prefix));
    }
    let need = opts.count.saturating_sub(1).max(1).to_string().len();
    let width = need.max(12usize.saturating_sub(digits.len()));
    if digits.len() + width > 15 {
        return Err(DialError::Prefix(prefix, opts.count));
    }
    Ok(Destinations::Numbered { prefix, width })
}

/// One `--json` line per call.
#[derive(serde::Serialize)]
struct CallLine<'a> {
    caller: &'a str,
    cancel_delay_ms: Option<f64>,
    outcome: Outcome,
    post_dial_delay_ms: Option<f64>,
    sip_code: Option<u16>,
    to: &'a str,
}

struct Dialer<'a> {
    opts: &'a DialOptions,
    trunk: SocketAddr,
    dest: Destinations,
    /// Scratch for the destination in a `--json` line.
    scratch: String,
    t0: Instant,
    started: u64,
    ended: u64,
    stop: bool,
    outcomes: BTreeMap<&'static str, u64>,
    pdd: Histogram<u64>,
    cancel: Histogram<u64>,
    out: std::io::BufWriter<std::io::StdoutLock<'static>>,
    any_response: bool,
    refused: bool,
}

impl udp::App for Dialer<'_> {
    fn poll(&mut self, now: Instant, ep: &mut Endpoint<StdRng>) -> Option<Instant> {
        if self.stop {
            return None;
        }
        // Open loop: call i is due at t0 + i / rate, whatever the replies do.
        let period = Duration::from_secs_f64(1.0 / self.opts.rate);
        while self.started < self.opts.count {
            let due = self.t0 + period.mul_f64(self.started as f64);
            // Calls due within the driver's coalescing tick start now: one
            // wake-up per call would cost more CPU in context switches than
            // the calls themselves, and under load the driver wakes once a
            // tick anyway (a 1 ms window here woke it every millisecond,
            // whatever the tick).
            if due > now + udp::COALESCE {
                return Some(due);
            }
            let i = self.started;
            ep.start_call(
                now,
                CallRequest {
                    trunk: self.trunk,
                    trunk_host: self.opts.trunk.clone(),
                    to: self.dest.get(i),
                    caller: self.opts.from.clone(),
                    caller_id: self.opts.caller_id,
                    ring: Duration::from_millis(self.opts.ring_ms),
                    ring_timeout: Duration::from_millis(self.opts.ring_timeout_ms),
                    credentials: match (&self.opts.username, &self.opts.password) {
                        (Some(u), Some(p)) => Some(Credentials {
                            username: u.clone(),
                            password: p.clone(),
                        }),
                        _ => None,
                    },
                    tag: i,
                },
            );
            self.started += 1;
        }
        None
    }

    fn on_event(&mut self, _ep: &mut Endpoint<StdRng>, event: Event) {
        match event {
            Event::Response { .. } => self.any_response = true,
            // A load tool keeps its pace: a trunk's request for rest is
            // for the operator to read in the outcomes (trunk_error).
            Event::Ringing { .. } | Event::TrunkRetryAfter { .. } => {}
            Event::Ended(r) => {
                self.ended += 1;
                *self.outcomes.entry(r.outcome.as_str()).or_default() += 1;
                let pdd = r.post_dial_delay().map(|d| d.as_secs_f64() * 1e3);
                let cancel = r.cancel_delay().map(|d| d.as_secs_f64() * 1e3);
                if let Some(d) = r.post_dial_delay() {
                    let _ = self.pdd.record(d.as_micros() as u64);
                }
                if let Some(d) = r.cancel_delay() {
                    let _ = self.cancel.record(d.as_micros() as u64);
                }
                if self.opts.json {
                    self.dest.write(r.tag, &mut self.scratch);
                    // A struct straight to the writer: the same text as a
                    // `json!` map (fields in its sorted key order) without
                    // building a map of owned strings for every call.
                    let line = CallLine {
                        caller: &self.opts.from,
                        cancel_delay_ms: cancel,
                        outcome: r.outcome,
                        post_dial_delay_ms: pdd,
                        sip_code: r.sip_code,
                        to: &self.scratch,
                    };
                    let _ = serde_json::to_writer(&mut self.out, &line);
                    let _ = self.out.write_all(b"\n");
                }
            }
        }
    }

    fn on_refused(&mut self) {
        if !self.any_response {
            self.refused = true;
        }
    }

    fn done(&self, _ep: &Endpoint<StdRng>) -> bool {
        // Nothing listens at the trunk: no point waiting out Timer B.
        if self.refused && !self.any_response {
            return true;
        }
        self.ended >= self.started && (self.started >= self.opts.count || self.stop)
    }
}

fn percentiles(h: &Histogram<u64>) -> serde_json::Value {
    if h.is_empty() {
        return json!({"p50": null, "p99": null});
    }
    let ms = |q: f64| (h.value_at_quantile(q) as f64 / 1e3 * 1000.0).round() / 1000.0;
    json!({"p50": ms(0.5), "p99": ms(0.99)})
}

/// Places the calls; returns whether every call was delivered.
pub async fn run(opts: DialOptions) -> anyhow::Result<bool> {
    if !(opts.rate.is_finite() && opts.rate > 0.0) {
        return Err(DialError::Rate.into());
    }
    if opts.username.is_some() != opts.password.is_some() {
        return Err(DialError::Credentials.into());
    }
    if !is_e164(&opts.from) {
        return Err(DialError::Number("--from", opts.from.clone()).into());
    }
    let dest = destinations(&opts)?;
    let trunk = opts
        .trunk
        .to_socket_addrs()
        .map_err(|e| DialError::Trunk(opts.trunk.clone(), e.to_string()))?
        .next()
        .ok_or_else(|| DialError::Trunk(opts.trunk.clone(), "no address".into()))?;
    let bind = opts.bind.unwrap_or_else(|| udp::default_bind(trunk));
    let socket = UdpSocket::bind(bind)
        .await
        .map_err(|e| DialError::Bind(bind, e))?;
    // Not connected to the trunk: a connected socket drops every datagram
    // from another address, and trunks answer from elsewhere (an SBC that
    // sends from another port or node, a 2xx Contact answering our BYE).
    // ICMP unreachable still comes back: the driver asks for the socket's
    // error queue (IP_RECVERR).
    let local = socket.local_addr()?;
    let (media, rtp) = rtp::spawn_sink(SocketAddr::new(local.ip(), 0))
        .await
        .map_err(|e| DialError::Bind(bind, e))?;
    let mut ep = Endpoint::new(
        EndpointConfig {
            timers: TimerConfig::default(),
            local,
            sent_by: None,
            public_host: local.ip().to_string(),
            user_agent: "flashcall-dial".into(),
            media,
        },
        StdRng::from_entropy(),
    );
    let stdout: &'static std::io::Stdout = Box::leak(Box::new(std::io::stdout()));
    let mut app = Dialer {
        opts: &opts,
        trunk,
        dest,
        scratch: String::new(),
        t0: Instant::now(),
        started: 0,
        ended: 0,
        stop: false,
        outcomes: BTreeMap::new(),
        pdd: Histogram::new(3)?,
        cancel: Histogram::new(3)?,
        // 64 KiB: one write(2) per ~600 call lines rather than per ~70.
        out: std::io::BufWriter::with_capacity(64 << 10, stdout.lock()),
        any_response: false,
        refused: false,
    };
    let stats = udp::run(&socket, &mut ep, &mut app, udp::COALESCE).await;
    // Nothing listens at the trunk: still the summary (SPEC §1: always
    // one, and a script reads the last line), then the error, exit 2.
    let unreachable = app.refused && !app.any_response;
    let elapsed = app.t0.elapsed().as_secs_f64();
    let delivered = app
        .outcomes
        .get(Outcome::Delivered.as_str())
        .copied()
        .unwrap_or(0);
    let summary = json!({"summary": {
        "calls": app.ended,
        "outcomes": app.outcomes,
        "post_dial_delay_ms": percentiles(&app.pdd),
        "cancel_delay_ms": percentiles(&app.cancel),
        "elapsed_s": (elapsed * 1000.0).round() / 1000.0,
        "early_media_packets": rtp.counters.rtp_packets.load(std::sync::atomic::Ordering::Relaxed),
        "malformed_datagrams": stats.malformed,
        "receive_drops": stats.receive_drops,
        "datagrams_in": stats.datagrams_in,
        "datagrams_out": stats.datagrams_out,
        "stray_responses": ep.stats().stray_responses,
        "trunk_unreachable": unreachable,
    }});
    if opts.json {
        writeln!(app.out, "{summary}")?;
    } else {
        writeln!(app.out, "{}", serde_json::to_string_pretty(&summary)?)?;
    }
    app.out.flush()?;
    if unreachable {
        return Err(DialError::Unreachable(trunk).into());
    }
    Ok(delivered == opts.count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_destinations_match_zero_padded_format() {
        let d = Destinations::Numbered {
            prefix: "+4477009".into(),
            width: 7,
        };
        let mut out = String::new();
        for i in [0u64, 1, 9, 10, 12_345, 9_999_999, 12_345_678, u64::MAX] {
            d.write(i, &mut out);
            assert_eq!(out, format!("+4477009{i:07}"));
            assert_eq!(d.get(i), out);
        }
        let f = Destinations::Fixed("+447700900123".into());
        f.write(5, &mut out);
        assert_eq!(out, "+447700900123");
    }
}
